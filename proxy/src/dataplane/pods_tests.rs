//! Which pods of the directory are served, for what the runtime announced
//! and what weft's config says of their addresses.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::SystemTime;

use weft_api::v1;
use weft_certs::MeshCa;

use super::{Outcome, decide};
use crate::dataplane::routes::RouteTable;
use crate::node_view::NodeView;
use crate::pod_directory::AnnouncedPod;

const IP: &str = "10.244.1.5";

/// The config: `name` of shop (ServiceAccount web, meshed) at [`IP`], and
/// shop meshed for new pods.
fn table_naming(name: &str, pod_uid: &str) -> RouteTable {
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
    let view = NodeView::apply(None, &update, "node-1").unwrap().view;
    RouteTable::new(&view)
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
    // The config gives its address to another pod, or to a later pod of
    // the same name: it is not served as either.
    assert_eq!(
        decide(&table_naming("web-2", "uid-2"), &found),
        Outcome::NotMeshed
    );
    assert_eq!(
        decide(&table_naming("web-1", "uid-9"), &found),
        Outcome::NotMeshed
    );
    assert!(matches!(
        decide(&RouteTable::default(), &found),
        Outcome::Pending(_)
    ));
}
