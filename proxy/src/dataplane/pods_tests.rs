//! Which pods of the directory are served, for what the runtime announced
//! and what weft's config says of their addresses.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::SystemTime;

use weft_api::v1;
use weft_certs::MeshCa;

use super::{Outcome, decide};
use crate::dataplane::found_pods;
use crate::dataplane::routes::RouteTable;
use crate::node_view::NodeView;
use crate::pod_directory::{AnnouncedPod, PodDirectory};

const IP: &str = "10.244.1.5";

/// The config: `name` of shop (ServiceAccount web, meshed) at [`IP`], and
/// shop meshed for new pods.
fn table_naming(name: &str, pod_uid: &str) -> RouteTable {
    RouteTable::new(&view_naming(name, pod_uid))
}

/// The same config, kept from the proxy's last run.
fn kept_table_naming(name: &str, pod_uid: &str) -> RouteTable {
    RouteTable::new(&view_naming(name, pod_uid).into_restored())
}

fn view_naming(name: &str, pod_uid: &str) -> NodeView {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let update = v1::ConfigUpdate {
        version: 1,
        full_state: true,
        local_workloads: vec![v1::Workload {
            uid: format!("shop/{name}"),
            namespace: "shop".into(),
            name: name.into(),
            pod_uid: pod_uid.into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            node: "node-1".into(),
            ips: vec![IP.into()],
            meshed: true,
            ..v1::Workload::default()
        }],
        meshed_namespaces: Some(v1::MeshedNamespaces {
            names: vec!["shop".into()],
        }),
        trust: Some(v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: ca.trust_bundle().to_pem(),
        }),
        ..v1::ConfigUpdate::default()
    };
    NodeView::apply(None, &update, "node-1").unwrap().view
}

fn pod(namespace: &str, name: &str, uid: &str, found: bool) -> AnnouncedPod {
    AnnouncedPod {
        netns: "/run/netns/cni-1".into(),
        ips: vec![IP.parse().unwrap()],
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
        found,
    }
}

#[test]
fn an_announced_pod_is_meshed_by_its_own_namespace_not_by_whom_its_address_had() {
    let stale = table_naming("gone-1", "uid-gone");
    // Announced in shop: meshed (shop is), as itself.
    assert_eq!(
        decide(&stale, &pod("shop", "new-1", "uid-new", false)),
        Outcome::Served
    );
    // Announced in an unmeshed namespace: the deleted shop pod's entry at
    // its address does not mesh it.
    assert_eq!(
        decide(&stale, &pod("legacy", "new-1", "uid-new", false)),
        Outcome::NotMeshed
    );
    // Nothing known yet: wait.
    let none = RouteTable::default();
    assert!(matches!(
        decide(&none, &pod("shop", "new-1", "uid-new", false)),
        Outcome::Pending(_)
    ));
}

#[test]
fn a_found_pod_is_the_pod_it_was_found_as_only_while_the_config_says_so() {
    let found = pod("shop", "web-1", "uid-1", true);
    assert_eq!(
        decide(&table_naming("web-1", "uid-1"), &found),
        Outcome::Served
    );
    // A control plane that sends no pod UIDs names it all the same.
    assert_eq!(decide(&table_naming("web-1", ""), &found), Outcome::Served);
    // A config kept from the last run that names another pod there (it may
    // be older than the pod) decides nothing: the capture stays.
    assert!(matches!(
        decide(&kept_table_naming("web-2", "uid-2"), &found),
        Outcome::Pending(_)
    ));
    assert!(matches!(
        decide(&RouteTable::default(), &found),
        Outcome::Pending(_)
    ));
}

#[test]
fn a_found_pod_whose_address_the_config_gives_to_another_pod_is_that_pod() {
    let directory = PodDirectory::default();
    directory.add(pod("shop", "web-1", "uid-1", true));
    // Only a config from the control plane renames it.
    found_pods::rename(&directory, &kept_table_naming("web-2", "uid-2"));
    assert_eq!(directory.pods()[0].name, "web-1");
    let live = table_naming("web-2", "uid-2");
    found_pods::rename(&directory, &live);
    let renamed = &directory.pods()[0];
    assert_eq!(
        (renamed.name.as_str(), renamed.uid.as_str()),
        ("web-2", "uid-2")
    );
    assert!(renamed.found);
    assert_eq!(decide(&live, renamed), Outcome::Served);
    // An announced pod is never renamed.
    let announced = PodDirectory::default();
    announced.add(pod("shop", "web-1", "uid-1", false));
    found_pods::rename(&announced, &live);
    assert_eq!(announced.pods()[0].name, "web-1");
}

#[test]
fn a_config_that_does_not_say_what_is_meshed_holds_new_pods() {
    // A control plane older than `meshed_namespaces`: a full state without
    // it (or a kept one) tells nothing about new pods, and an empty list
    // would start a meshed namespace's pods uncaptured.
    let mut view = view_naming("web-1", "uid-1");
    let silent = v1::ConfigUpdate {
        version: 2,
        full_state: true,
        meshed_namespaces: None,
        trust: Some(v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: view.trust().bundle.to_pem(),
        }),
        ..v1::ConfigUpdate::default()
    };
    view = NodeView::apply(Some(&view), &silent, "node-1")
        .unwrap()
        .view;
    let table = RouteTable::new(&view);
    assert_eq!(table.meshed_namespaces, None);
    assert!(matches!(
        decide(&table, &pod("shop", "new-1", "uid-new", false)),
        Outcome::Pending(_)
    ));
    // A delta without the field keeps what the last full state said.
    let said = RouteTable::new(&view_naming("web-1", "uid-1"));
    let delta = v1::ConfigUpdate {
        version: 2,
        ..v1::ConfigUpdate::default()
    };
    let kept = NodeView::apply(Some(&view_naming("web-1", "uid-1")), &delta, "node-1")
        .unwrap()
        .view;
    assert_eq!(
        RouteTable::new(&kept).meshed_namespaces,
        said.meshed_namespaces
    );
    assert_eq!(
        decide(
            &RouteTable::new(&kept),
            &pod("shop", "new-1", "uid-new", false)
        ),
        Outcome::Served
    );
}

#[test]
fn a_pod_the_config_has_by_name_follows_its_own_label_before_it_has_an_address() {
    // shop is meshed; in it, `batch-1` opted out; in legacy (not meshed),
    // `opt-1` opted in. Neither has an address in the config yet: the API
    // server learns them only after the runtime set the pods up.
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let addressless = |namespace: &str, name: &str, pod_uid: &str, meshed: bool| v1::Workload {
        uid: format!("{namespace}/{name}"),
        namespace: namespace.into(),
        name: name.into(),
        pod_uid: pod_uid.into(),
        service_account: name.into(),
        identity: format!("spiffe://cluster.local/ns/{namespace}/sa/{name}"),
        node: "node-1".into(),
        meshed,
        ..v1::Workload::default()
    };
    let update = v1::ConfigUpdate {
        version: 1,
        full_state: true,
        local_workloads: vec![
            addressless("legacy", "opt-1", "uid-opt", true),
            addressless("shop", "batch-1", "uid-batch", false),
        ],
        meshed_namespaces: Some(v1::MeshedNamespaces {
            names: vec!["shop".into()],
        }),
        trust: Some(v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: ca.trust_bundle().to_pem(),
        }),
        ..v1::ConfigUpdate::default()
    };
    let table = RouteTable::new(&NodeView::apply(None, &update, "node-1").unwrap().view);
    assert_eq!(
        decide(&table, &pod("legacy", "opt-1", "uid-opt", false)),
        Outcome::Served
    );
    assert_eq!(
        decide(&table, &pod("shop", "batch-1", "uid-batch", false)),
        Outcome::NotMeshed
    );
    // Another pod of the same name (the config's one was deleted, a new
    // one made): its namespace decides until the config has it.
    assert_eq!(
        decide(&table, &pod("legacy", "opt-1", "uid-other", false)),
        Outcome::NotMeshed
    );
    assert_eq!(
        decide(&table, &pod("shop", "batch-1", "uid-other", false)),
        Outcome::Served
    );
}
