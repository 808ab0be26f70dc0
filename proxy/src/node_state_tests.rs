#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::os::unix::fs::PermissionsExt;

use weft_api::v1;
use weft_certs::{CertificateRequest, MeshCa};

use super::*;
use crate::node_view::NodeView;

fn workload(uid: &str, ip: &str) -> v1::Workload {
    let (namespace, name) = uid.split_once('/').unwrap();
    v1::Workload {
        uid: uid.into(),
        namespace: namespace.into(),
        name: name.into(),
        service_account: "web".into(),
        identity: format!("spiffe://cluster.local/ns/{namespace}/sa/web"),
        node: "node-1".into(),
        ips: vec![ip.into()],
        meshed: true,
        ..v1::Workload::default()
    }
}

/// A kept config with the view beside it, folded into as the client does.
#[derive(Default)]
struct Kept {
    config: StoredConfig,
    view: Option<NodeView>,
}

impl Kept {
    fn fold_in(&mut self, update: &v1::ConfigUpdate, refused: &RefusedKeys) {
        let view = NodeView::apply(self.view.as_ref(), update, "node-1")
            .unwrap()
            .view;
        self.config.fold_in(update, refused, &view);
        self.view = Some(view);
    }

    fn to_update(&self) -> v1::ConfigUpdate {
        self.config.to_update()
    }
}

fn policy(name: &str) -> v1::AuthorizationPolicy {
    v1::AuthorizationPolicy {
        namespace: "shop".into(),
        name: name.into(),
        action: v1::AuthorizationAction::Deny as i32,
        rules: Vec::new(),
    }
}

fn full_state(ca: &MeshCa) -> v1::ConfigUpdate {
    v1::ConfigUpdate {
        version: 1,
        full_state: true,
        local_workloads: vec![
            workload("shop/web-1", "10.244.1.2"),
            workload("shop/web-2", "10.244.1.3"),
        ],
        authorization_policies: vec![policy("deny-all")],
        trust: Some(v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: ca.trust_bundle().to_pem(),
        }),
        ..v1::ConfigUpdate::default()
    }
}

#[test]
fn merged_deltas_give_the_view_the_deltas_gave() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let full = full_state(&ca);
    let mut web_1 = workload("shop/web-1", "10.244.1.9");
    web_1.authorization_policies = vec!["shop/deny-all".into()];
    let deltas = [
        v1::ConfigUpdate {
            version: 2,
            local_workloads: vec![web_1, workload("shop/web-3", "10.244.1.4")],
            removed_local_workloads: vec!["shop/web-2".into()],
            ..v1::ConfigUpdate::default()
        },
        v1::ConfigUpdate {
            version: 3,
            authorization_policies: vec![policy("deny-more")],
            removed_authorization_policies: vec!["shop/deny-all".into()],
            ..v1::ConfigUpdate::default()
        },
    ];

    let mut view = NodeView::apply(None, &full, "node-1").unwrap().view;
    let mut kept = Kept::default();
    kept.fold_in(&full, &RefusedKeys::default());
    for delta in &deltas {
        view = NodeView::apply(Some(&view), delta, "node-1").unwrap().view;
        kept.fold_in(delta, &RefusedKeys::default());
    }
    let stored = kept.to_update();
    assert!(stored.full_state);
    assert_eq!(stored.version, 3);
    let replayed = NodeView::apply(None, &stored, "node-1").unwrap().view;
    // Alike but for the generation: the replay is this proxy's first view.
    let dump = |view: &NodeView| {
        let mut dump = serde_json::to_value(view).unwrap();
        dump["generation"] = serde_json::Value::Null;
        dump
    };
    assert_eq!(dump(&replayed), dump(&view));
}

#[test]
fn the_stored_config_after_random_deltas_replays_to_the_view_they_gave() {
    use crate::test_configs::{Dice, NODE, first_full_state, random_delta};
    let dump = |view: &NodeView| {
        let mut dump = serde_json::to_value(view).unwrap();
        dump["generation"] = serde_json::Value::Null;
        dump["version"] = serde_json::Value::Null;
        dump
    };
    for seed in 1..=10u64 {
        let mut dice = Dice(seed * 104_729);
        let first = first_full_state();
        let mut view = NodeView::apply(None, &first, NODE).unwrap().view;
        let mut kept = Kept::default();
        kept.fold_in(&first, &RefusedKeys::default());
        for step in 0..100u64 {
            let update = random_delta(&mut dice, step + 2, &view);
            view = NodeView::apply(Some(&view), &update, NODE).unwrap().view;
            kept.fold_in(&update, &RefusedKeys::default());
            let replayed = NodeView::apply(None, &kept.to_update(), NODE).unwrap();
            assert!(replayed.refused.is_empty(), "{:?}", replayed.refused);
            assert_eq!(dump(&replayed.view), dump(&view), "seed {seed} step {step}");
        }
    }
}

#[test]
fn the_config_survives_a_restart_and_a_damaged_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = NodeState::open(&dir.path().join("state")).unwrap();
    let mode = fs::metadata(state.dir()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(state.load_config(1 << 20).unwrap().is_none());

    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let full = full_state(&ca);
    state.store_config(&full).unwrap();
    let file = state.dir().join(CONFIG_FILE);
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = NodeState::open(state.dir()).unwrap();
    assert_eq!(again.load_config(1 << 20).unwrap(), Some(full.clone()));

    // Too large for the limit, a delta, garbage: errors, never a panic.
    assert!(again.load_config(16).is_err());
    let delta = v1::ConfigUpdate {
        version: 2,
        ..v1::ConfigUpdate::default()
    };
    again.store_config(&delta).unwrap();
    assert!(again.load_config(1 << 20).is_err());
    fs::write(&file, b"\xff\xff\xff garbage").unwrap();
    let error = again.load_config(1 << 20).unwrap_err();
    assert!(error.to_string().contains("config.pb"), "{error}");
}

#[test]
fn certificates_come_back_only_while_wanted_and_valid() {
    let dir = tempfile::tempdir().unwrap();
    let state = NodeState::open(dir.path()).unwrap();
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let now = SystemTime::now();
    let issue = |identity: &str| {
        let identity: Identity = identity.parse().unwrap();
        let request = CertificateRequest::generate(&identity).unwrap();
        let chain = ca.sign_csr(request.csr_der(), &identity, now).unwrap();
        request
            .complete(chain, ca.trust_bundle().clone(), now)
            .unwrap()
    };
    let web = issue("spiffe://cluster.local/ns/shop/sa/web");
    let db = issue("spiffe://cluster.local/ns/shop/sa/db");
    state.store_certificate(&web).unwrap();
    state.store_certificate(&db).unwrap();
    for entry in fs::read_dir(dir.path().join(CERTS_DIR)).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a key file others can read");
    }

    // Only web is still wanted: db's file goes.
    let wanted = BTreeSet::from([web.identity().clone()]);
    let restored = state.load_certificates(&wanted, ca.trust_bundle(), now);
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].identity(), web.identity());
    assert_eq!(restored[0].chain(), web.chain());
    assert_eq!(fs::read_dir(dir.path().join(CERTS_DIR)).unwrap().count(), 1);

    // Expired, or against other roots: not used, and removed.
    let later = web.not_after() + std::time::Duration::from_secs(1);
    assert!(
        state
            .load_certificates(&wanted, ca.trust_bundle(), later)
            .is_empty()
    );
    assert_eq!(fs::read_dir(dir.path().join(CERTS_DIR)).unwrap().count(), 0);

    state.store_certificate(&web).unwrap();
    state.remove_certificate(web.identity()).unwrap();
    state.remove_certificate(web.identity()).unwrap();
    assert!(
        state
            .load_certificates(&wanted, ca.trust_bundle(), now)
            .is_empty()
    );
}

#[test]
fn clearing_leaves_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = NodeState::open(dir.path()).unwrap();
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    state.store_config(&full_state(&ca)).unwrap();
    let writer = state.clone();
    state.clear().unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(state.load_config(1 << 20).unwrap().is_none());
    // A write that comes after (the writer task was mid-way) leaves nothing.
    writer.store_config(&full_state(&ca)).unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_refused_entry_keeps_its_stored_value_and_the_uninstall_is_not_stored() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let mut kept = Kept::default();
    kept.fold_in(&full_state(&ca), &RefusedKeys::default());
    // A delta whose new web-1 was refused (say, an unknown mTLS mode): the
    // stored web-1 stays the last good one, and so captured after a
    // restart; web-3, refused and new, is stored as sent (a restart
    // decides about it again).
    let mut bad = workload("shop/web-1", "10.244.1.9");
    bad.mtls_mode = 9;
    let mut new_bad = workload("shop/web-3", "10.244.1.4");
    new_bad.mtls_mode = 9;
    let delta = v1::ConfigUpdate {
        version: 2,
        local_workloads: vec![bad, new_bad.clone()],
        uninstalling: Some(true),
        ..v1::ConfigUpdate::default()
    };
    let refused = RefusedKeys {
        local_workloads: BTreeSet::from(["shop/web-1".to_owned(), "shop/web-3".to_owned()]),
        ..RefusedKeys::default()
    };
    kept.fold_in(&delta, &refused);
    let stored = kept.to_update();
    let web_1 = stored
        .local_workloads
        .iter()
        .find(|w| w.uid == "shop/web-1")
        .unwrap();
    assert_eq!(web_1.ips, ["10.244.1.2"]);
    assert!(stored.local_workloads.contains(&new_bad));
    assert_eq!(stored.uninstalling, None);
    // The same for a full state.
    let mut full = full_state(&ca);
    full.version = 3;
    full.local_workloads[0].mtls_mode = 9;
    let refused = RefusedKeys {
        local_workloads: BTreeSet::from(["shop/web-1".to_owned()]),
        ..RefusedKeys::default()
    };
    kept.fold_in(&full, &refused);
    let stored = kept.to_update();
    let web_1 = stored
        .local_workloads
        .iter()
        .find(|w| w.uid == "shop/web-1")
        .unwrap();
    assert_eq!(
        web_1.mtls_mode, 0,
        "the last good entry, not the refused one"
    );
}

#[test]
fn the_kept_remote_workloads_are_the_views_and_a_refused_one_is_not_kept() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let remote = |uid: &str, ip: &str| v1::Workload {
        node: "node-2".into(),
        workload_name: String::new(),
        probe_ports: vec![8080],
        mtls_mode: v1::MtlsMode::Strict.into(),
        ..workload(uid, ip)
    };
    let first = v1::ConfigUpdate {
        remote_workloads: vec![
            remote("bank/vault-1", "10.244.2.7"),
            remote("bank/vault-2", "10.244.2.8"),
        ],
        ..full_state(&ca)
    };
    let mut kept = Kept::default();
    kept.fold_in(&first, &RefusedKeys::default());
    // Stored and read back, they are what the view holds.
    let replayed = NodeView::apply(None, &kept.to_update(), "node-1").unwrap();
    assert!(replayed.refused.is_empty());
    let view = kept.view.as_ref().unwrap();
    assert_eq!(replayed.view.remote_workloads(), view.remote_workloads());

    // vault-1's next update is refused: the view drops it (its address
    // vouches for no identity any more), and so does the kept config.
    let mut bad = remote("bank/vault-1", "10.244.2.9");
    bad.mtls_mode = 9;
    let delta = v1::ConfigUpdate {
        version: 2,
        remote_workloads: vec![bad],
        ..v1::ConfigUpdate::default()
    };
    kept.fold_in(&delta, &RefusedKeys::default());
    let stored = kept.to_update();
    let uids: Vec<&str> = stored
        .remote_workloads
        .iter()
        .map(|w| w.uid.as_str())
        .collect();
    assert_eq!(uids, ["bank/vault-2"]);
}

#[test]
fn the_meshed_namespaces_are_kept_until_an_update_replaces_them() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let meshed = |names: &[&str]| {
        Some(v1::MeshedNamespaces {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        })
    };
    let mut first = full_state(&ca);
    first.meshed_namespaces = meshed(&["shop"]);
    let mut kept = Kept::default();
    kept.fold_in(&first, &RefusedKeys::default());
    // A delta without them keeps them; one with them replaces them.
    let quiet = v1::ConfigUpdate {
        version: 2,
        ..v1::ConfigUpdate::default()
    };
    kept.fold_in(&quiet, &RefusedKeys::default());
    assert_eq!(kept.to_update().meshed_namespaces, meshed(&["shop"]));
    let relabelled = v1::ConfigUpdate {
        version: 3,
        meshed_namespaces: meshed(&["legacy"]),
        ..v1::ConfigUpdate::default()
    };
    kept.fold_in(&relabelled, &RefusedKeys::default());
    let stored = kept.to_update();
    assert_eq!(stored.meshed_namespaces, meshed(&["legacy"]));
    let view = NodeView::apply(None, &stored, "node-1").unwrap().view;
    assert!(view.namespace_meshed("legacy") && !view.namespace_meshed("shop"));
}

#[test]
fn a_cleared_state_can_still_say_nothing_is_meshed() {
    let dir = tempfile::tempdir().unwrap();
    let state = NodeState::open(dir.path()).unwrap();
    state
        .store_meshed_namespaces(&["shop".to_owned()].into())
        .unwrap();
    state.clear().unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    // weft-cni stayed chained: it must let pods start, not hold them.
    state.store_nothing_meshed().unwrap();
    let text = fs::read_to_string(dir.path().join(MESHED_NAMESPACES_FILE)).unwrap();
    let meshed: BTreeSet<String> = serde_json::from_str(&text).unwrap();
    assert!(meshed.is_empty());
}

#[test]
fn the_kept_services_are_the_views_and_a_refused_one_keeps_its_last_good_value() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let first = v1::ConfigUpdate {
        services: vec![
            crate::node_view::tests::service("shop", "web", "10.244.1.2"),
            crate::node_view::tests::service("shop", "cart", "10.244.1.3"),
        ],
        ..full_state(&ca)
    };
    let mut kept = Kept::default();
    kept.fold_in(&first, &RefusedKeys::default());
    let replayed = NodeView::apply(None, &kept.to_update(), "node-1").unwrap();
    assert!(replayed.refused.is_empty());
    assert_eq!(
        replayed.view.services(),
        kept.view.as_ref().unwrap().services()
    );

    // web's next update is refused (a port that is not one), and a new
    // Service, refused too, comes along: web keeps its last good value in
    // the view and so on disk; the new one is in neither.
    let mut bad = crate::node_view::tests::service("shop", "web", "10.244.1.9");
    bad.ports[0].port = 70_000;
    let mut new_bad = crate::node_view::tests::service("shop", "search", "10.244.1.4");
    new_bad.vips = vec!["not an address".into()];
    let delta = v1::ConfigUpdate {
        version: 2,
        services: vec![bad, new_bad],
        ..v1::ConfigUpdate::default()
    };
    kept.fold_in(&delta, &RefusedKeys::default());
    let stored = kept.to_update();
    let web = stored.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.endpoints[0].ip, "10.244.1.2");
    let names: Vec<&str> = stored.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cart", "web"]);
}
