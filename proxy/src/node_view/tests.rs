use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::SystemTime;

use weft_api::v1;
use weft_certs::MeshCa;

use super::*;

pub(super) const NODE: &str = "node-1";

static ROOTS_PEM: LazyLock<String> = LazyLock::new(|| {
    MeshCa::generate_root("cluster.local", SystemTime::now())
        .unwrap()
        .trust_bundle()
        .to_pem()
});

pub(super) fn trust() -> v1::TrustBundle {
    v1::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: ROOTS_PEM.clone(),
    }
}

pub(super) fn workload(
    namespace: &str,
    pod: &str,
    sa: &str,
    ip: &str,
    meshed: bool,
) -> v1::Workload {
    v1::Workload {
        uid: format!("{namespace}/{pod}"),
        namespace: namespace.into(),
        name: pod.into(),
        service_account: sa.into(),
        identity: format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}"),
        node: NODE.into(),
        ips: vec![ip.into()],
        meshed,
        labels: [("app".to_owned(), pod.to_owned())].into(),
        workload_name: pod.into(),
        ..v1::Workload::default()
    }
}

pub(crate) fn service(namespace: &str, name: &str, endpoint_ip: &str) -> v1::Service {
    v1::Service {
        namespace: namespace.into(),
        name: name.into(),
        vips: vec!["10.96.0.10".into()],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
        }],
        endpoints: vec![v1::Endpoint {
            workload_uid: format!("{namespace}/{name}-0"),
            ip: endpoint_ip.into(),
            ready: true,
            ports: [("http".to_owned(), 8080)].into(),
        }],
        traffic_policy: None,
    }
}

pub(super) fn full(version: u64) -> v1::ConfigUpdate {
    v1::ConfigUpdate {
        version,
        full_state: true,
        local_workloads: vec![
            workload("default", "web", "web", "10.0.1.5", true),
            workload("default", "db", "db", "10.0.1.6", false),
        ],
        remote_workloads: vec![workload("shop", "cart", "cart", "10.0.2.7", true)],
        services: vec![service("default", "web", "10.0.1.5")],
        trust: Some(trust()),
        ..Default::default()
    }
}

pub(super) fn delta(version: u64) -> v1::ConfigUpdate {
    v1::ConfigUpdate {
        version,
        full_state: false,
        ..Default::default()
    }
}

pub(super) fn applied(update: &v1::ConfigUpdate) -> NodeView {
    let applied = NodeView::apply(None, update, NODE).unwrap();
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    applied.view
}

/// Applies an update of which exactly one entry must be refused; returns
/// the view and why.
pub(super) fn refused_entry(
    previous: Option<&NodeView>,
    update: &v1::ConfigUpdate,
) -> (NodeView, UpdateProblem) {
    let Applied { view, mut refused } = NodeView::apply(previous, update, NODE).unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(view.version(), update.version, "the rest is applied");
    (view, refused.remove(0))
}

/// Applies an update that must be refused as a whole, checks that the view
/// it was meant for is exactly as before, and returns the NACK reason.
pub(super) fn refused(previous: Option<&NodeView>, update: &v1::ConfigUpdate) -> UpdateProblem {
    let before = previous.map(|v| serde_json::to_value(v).unwrap());
    let problem = NodeView::apply(previous, update, NODE).unwrap_err();
    assert_eq!(previous.map(|v| serde_json::to_value(v).unwrap()), before);
    problem
}

pub(super) fn uids(map: &super::Keyed<Workload>) -> Vec<String> {
    map.keys().map(|key| key.to_string()).collect()
}

#[test]
fn a_full_state_becomes_the_view_with_typed_values() {
    let view = applied(&full(1));
    assert_eq!(view.version(), 1);
    assert_eq!(uids(view.local_workloads()), ["default/db", "default/web"]);
    assert_eq!(uids(view.remote_workloads()), ["shop/cart"]);
    let web = &view.local_workloads()["default/web"];
    assert_eq!(
        web.identity().as_str(),
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(*web.ips, ["10.0.1.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(web.local().labels["app"], "web");
    let svc = &view.services()["default/web"];
    assert_eq!(&*svc.key, "default/web");
    assert_eq!(svc.ports[0].target_port, 8080);
    assert_eq!(
        svc.endpoints[0]
            .workload_uid
            .as_ref()
            .map(|uid| uid.to_string()),
        Some("default/web-0".into())
    );
    assert_eq!(view.trust().trust_domain, "cluster.local");
    assert_eq!(view.trust().bundle.roots().len(), 1);
}

#[test]
fn a_full_state_replaces_everything_at_any_version() {
    let first = applied(&full(41));
    let mut second = full(3);
    second.local_workloads = vec![workload("other", "api", "api", "10.0.1.9", true)];
    second.remote_workloads.clear();
    second.services.clear();
    // Removed lists mean nothing in a full state.
    second.removed_local_workloads = vec!["other/api".into()];
    let view = NodeView::apply(Some(&first), &second, NODE).unwrap().view;
    assert_eq!(view.version(), 3);
    assert_eq!(uids(view.local_workloads()), ["other/api"]);
    assert!(view.remote_workloads().is_empty());
    assert!(view.services().is_empty());
}

#[test]
fn a_delta_adds_replaces_and_removes_whole_entries() {
    let base = applied(&full(1));
    let mut update = delta(2);
    let mut web = workload("default", "web", "web", "10.0.1.50", true);
    web.labels.clear();
    update.local_workloads = vec![web, workload("default", "cache", "cache", "10.0.1.7", true)];
    update.removed_local_workloads = vec!["default/db".into(), "default/never-existed".into()];
    update.removed_remote_workloads = vec!["shop/cart".into()];
    update.services = vec![service("shop", "cart", "10.0.2.7")];
    let view = NodeView::apply(Some(&base), &update, NODE).unwrap().view;

    assert_eq!(view.version(), 2);
    assert_eq!(
        uids(view.local_workloads()),
        ["default/cache", "default/web"]
    );
    let web = &view.local_workloads()["default/web"];
    assert_eq!(*web.ips, ["10.0.1.50".parse::<IpAddr>().unwrap()]);
    assert!(web.local().labels.is_empty(), "an entry is replaced whole");
    assert!(view.remote_workloads().is_empty());
    let services: Vec<_> = view.services().keys().map(|key| &**key).collect();
    assert_eq!(services, ["default/web", "shop/cart"]);
    assert_eq!(view.trust().bundle.roots(), base.trust().bundle.roots());
    // The base is untouched.
    assert_eq!(uids(base.local_workloads()), ["default/db", "default/web"]);
}

#[test]
fn a_delta_without_a_full_state_is_refused() {
    let problem = refused(None, &delta(1));
    assert_eq!(problem, UpdateProblem::DeltaWithoutBase { version: 1 });
    assert!(problem.needs_full_state());
}

#[test]
fn a_delta_must_be_exactly_the_next_version() {
    let base = applied(&full(5));
    for version in [5, 4, 7, u64::MAX] {
        let problem = refused(Some(&base), &delta(version));
        assert_eq!(
            problem,
            UpdateProblem::VersionGap {
                applied: 5,
                version
            }
        );
        assert!(problem.needs_full_state());
        assert_eq!(
            problem.to_string(),
            format!("delta version {version} does not follow the applied version 5")
        );
    }
    assert!(NodeView::apply(Some(&base), &delta(6), NODE).is_ok());
}

#[test]
fn an_invalid_identity_is_refused_naming_workload_and_value() {
    let base = applied(&full(1));
    let mut update = delta(2);
    let mut web = workload("default", "web", "web", "10.0.1.5", true);
    web.identity = "spiffe://cluster.local/ns/default/serviceaccount/web".into();
    update.local_workloads = vec![web];
    let problem = refused_entry(Some(&base), &update).1;
    let reason = problem.to_string();
    assert!(
        reason.starts_with(
            "local workload default/web: identity \
             \"spiffe://cluster.local/ns/default/serviceaccount/web\": path must be"
        ),
        "{reason}"
    );
    assert!(!problem.needs_full_state());
}

#[test]
fn an_identity_that_contradicts_the_pod_is_refused() {
    let mut update = full(1);
    update.local_workloads[0].service_account = "admin".into();
    let reason = refused_entry(None, &update).1.to_string();
    assert_eq!(
        reason,
        "local workload default/web: identity spiffe://cluster.local/ns/default/sa/web \
         does not match its service account \"admin\""
    );
}

#[test]
fn an_invalid_ip_is_refused() {
    let mut update = full(1);
    update.remote_workloads[0].ips.push("10.0.2.300".into());
    let reason = refused_entry(None, &update).1.to_string();
    assert!(
        reason.starts_with("remote workload shop/cart: ip \"10.0.2.300\": "),
        "{reason}"
    );

    let mut update = full(1);
    update.services[0].vips = vec!["fd00::zz".into()];
    let reason = refused_entry(None, &update).1.to_string();
    assert!(
        reason.starts_with("service default/web: vip \"fd00::zz\": "),
        "{reason}"
    );

    let mut update = full(1);
    update.services[0].endpoints[0].ip = String::new();
    let reason = refused_entry(None, &update).1.to_string();
    assert!(
        reason.starts_with("service default/web: endpoint \"\": "),
        "{reason}"
    );
}

#[test]
fn ports_must_fit_in_sixteen_bits() {
    let mut update = full(1);
    update.services[0].ports[0].target_port = 70000;
    let reason = refused_entry(None, &update).1.to_string();
    assert_eq!(
        reason,
        "service default/web: port \"http\": target port 70000 is not a port"
    );
    let mut update = full(1);
    update.services[0].ports[0].port = 0;
    assert!(
        refused_entry(None, &update)
            .1
            .to_string()
            .contains("0 is not a port")
    );
}

#[test]
fn empty_keys_are_refused() {
    let mut update = full(1);
    update.local_workloads[1].uid.clear();
    assert_eq!(
        refused_entry(None, &update).1,
        UpdateProblem::EmptyKey {
            kind: EntryKind::LocalWorkload,
            reason: "uid is empty"
        }
    );
    let mut update = full(1);
    update.services[0].name.clear();
    assert_eq!(
        refused_entry(None, &update).1.to_string(),
        "service with an empty key: name is empty"
    );
}

/// A Service's namespace and name are read back from its key: a '/' in
/// either would split it elsewhere (the dump, the metrics' host name).
#[test]
fn a_service_name_with_a_slash_is_refused() {
    for (namespace, name) in [("default/x", "web"), ("default", "we/b")] {
        let mut update = full(1);
        update.services[0].namespace = namespace.into();
        update.services[0].name = name.into();
        let reason = refused_entry(None, &update).1.to_string();
        assert!(reason.contains("contains '/'"), "{reason}");
    }
}

#[test]
fn a_local_workload_of_another_node_is_refused() {
    let mut update = full(1);
    update.local_workloads[0].node = "node-2".into();
    assert_eq!(
        refused_entry(None, &update).1.to_string(),
        "local workload default/web: sent as local to node \"node-1\" but runs on node \"node-2\""
    );
    // Remote workloads run elsewhere by definition.
    let mut update = full(1);
    update.remote_workloads[0].node = "node-2".into();
    assert!(NodeView::apply(None, &update, NODE).is_ok());
}

/// A pod listed twice whose second listing is refused is not taken from
/// its first: its addresses vouch for no identity (found in review: the
/// refusal's removal of a key the view did not hold yet was dropped).
#[test]
fn a_new_pod_listed_valid_then_refused_is_left_out() {
    for delta_of_a_new_pod in [false, true] {
        let base = applied(&full(1));
        let mut update = if delta_of_a_new_pod {
            delta(2)
        } else {
            full(1)
        };
        let valid = workload("shop", "new", "new", "10.0.2.9", true);
        let mut bad = valid.clone();
        bad.ips = vec!["not an address".into()];
        update.remote_workloads.extend([valid, bad]);
        let previous = delta_of_a_new_pod.then_some(&base);
        let (view, problem) = refused_entry(previous, &update);
        assert!(problem.to_string().contains("not an address"), "{problem}");
        assert!(!view.remote_workloads().contains_key("shop/new"));
    }
}

#[test]
fn duplicates_and_contradictions_are_refused() {
    let mut update = full(1);
    update
        .local_workloads
        .push(update.local_workloads[0].clone());
    assert_eq!(
        refused_entry(None, &update).1.to_string(),
        "local workload default/web is listed twice"
    );

    let base = applied(&full(1));
    let mut update = delta(2);
    update.services = vec![service("default", "web", "10.0.1.5")];
    update.removed_services = vec!["default/web".into()];
    assert_eq!(
        refused_entry(Some(&base), &update).1.to_string(),
        "service default/web is both updated and removed"
    );
}

#[test]
fn a_full_state_needs_valid_roots_and_a_delta_keeps_them() {
    let mut update = full(1);
    update.trust = None;
    assert_eq!(refused(None, &update), UpdateProblem::MissingTrust);

    let mut update = full(1);
    update.trust = Some(v1::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
    });
    let reason = refused(None, &update).to_string();
    assert!(reason.starts_with("trust bundle: "), "{reason}");

    let mut update = full(1);
    update.trust = Some(v1::TrustBundle {
        trust_domain: "Cluster.Local".into(),
        roots_pem: ROOTS_PEM.clone(),
    });
    assert!(refused(None, &update).to_string().contains("trust domain"));

    let base = applied(&full(1));
    let view = NodeView::apply(Some(&base), &delta(2), NODE).unwrap().view;
    assert_eq!(view.trust().bundle.roots(), base.trust().bundle.roots());
}

#[test]
fn a_refused_entry_never_loosens_anything_and_the_rest_applies() {
    let base = applied(&full(1));
    let mut update = delta(2);
    update.removed_local_workloads = vec!["default/db".into()];
    update.services = vec![service("shop", "cart", "10.0.2.7")];
    // Updates to known entries that do not convert, and a new one.
    let mut web = workload("default", "web", "web", "10.0.1.5", true);
    web.mtls_mode = 9;
    let mut svc = service("default", "web", "10.0.1.5");
    svc.vips = vec!["nope".into()];
    update.local_workloads = vec![web];
    update.services.push(svc);
    update.remote_workloads = vec![
        workload("shop", "cart", "cart", "not-an-ip", true),
        workload("shop", "bad", "bad", "not-an-ip", true),
    ];
    let Applied { view, refused } = NodeView::apply(Some(&base), &update, NODE).unwrap();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert_eq!(view.version(), 2);
    assert!(view.services().contains_key("shop/cart"));
    // A local pod keeps its last good entry, quarantined: still captured,
    // refusing every connection.
    assert_eq!(uids(view.local_workloads()), ["default/web"]);
    let web = &view.local_workloads()["default/web"];
    assert_eq!(web.ips, base.local_workloads()["default/web"].ips);
    let quarantine = web.local().quarantine.as_deref().unwrap();
    assert!(quarantine.contains("unknown mtls_mode 9"), "{quarantine}");
    // A Service keeps its last good routing.
    assert_eq!(
        view.services()["default/web"],
        base.services()["default/web"]
    );
    // A remote pod is dropped: its address vouches for no identity.
    assert!(view.remote_workloads().is_empty());
    // The base is untouched.
    assert_eq!(base.version(), 1);
    assert_eq!(uids(base.local_workloads()), ["default/db", "default/web"]);
    assert!(
        base.local_workloads()["default/web"]
            .local()
            .quarantine
            .is_none()
    );
}

#[test]
fn a_refused_entry_that_is_also_removed_stays_removed() {
    let base = applied(&full(1));
    let mut update = delta(2);
    let mut web = workload("default", "web", "web", "10.0.1.5", true);
    web.mtls_mode = 9;
    update.local_workloads = vec![web];
    update.removed_local_workloads = vec!["default/web".into()];
    let Applied { view, refused } = NodeView::apply(Some(&base), &update, NODE).unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(uids(view.local_workloads()), ["default/db"]);
}

#[test]
fn meshed_identities_are_deduplicated_and_unmeshed_left_out() {
    let mut update = full(1);
    update
        .local_workloads
        .push(workload("default", "web-2", "web", "10.0.1.8", true));
    let view = applied(&update);
    let ids: Vec<String> = view
        .meshed_local_identities()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/default/sa/web"]);
}

#[test]
fn the_view_serializes_for_the_config_dump() {
    let json = serde_json::to_value(applied(&full(1))).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["trust"]["roots"], 1);
    assert_eq!(
        json["local_workloads"]["default/web"]["identity"],
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(
        json["services"]["default/web"]["endpoints"][0]["ip"],
        "10.0.1.5"
    );
}

#[test]
fn the_uninstall_announcement_holds_until_the_control_plane_takes_it_back() {
    let base = applied(&full(1));
    assert!(
        !base.uninstalling(),
        "a full state without it: not uninstalling"
    );
    let mut announced = delta(2);
    announced.uninstalling = Some(true);
    let during = NodeView::apply(Some(&base), &announced, NODE).unwrap().view;
    assert!(during.uninstalling());
    let unrelated = NodeView::apply(Some(&during), &delta(3), NODE)
        .unwrap()
        .view;
    assert!(unrelated.uninstalling(), "a delta without it keeps it");
    let mut withdrawn = delta(4);
    withdrawn.uninstalling = Some(false);
    let after = NodeView::apply(Some(&unrelated), &withdrawn, NODE)
        .unwrap()
        .view;
    assert!(!after.uninstalling());
}
