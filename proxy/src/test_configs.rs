//! Random configs for tests: a full state to start from and deltas that
//! change a few entries of a small, crowded node (addresses claimed twice,
//! pods that move between local and remote, Services that come and go).

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::sync::LazyLock;
use std::time::SystemTime;

use weft_api::v1;

use crate::node_view::NodeView;

pub(crate) const NODE: &str = "node-1";

static ROOTS_PEM: LazyLock<String> = LazyLock::new(|| {
    weft_certs::MeshCa::generate_root("cluster.local", SystemTime::now())
        .unwrap()
        .trust_bundle()
        .to_pem()
});

/// A deterministic source of small random numbers.
pub(crate) struct Dice(pub(crate) u64);

impl Dice {
    pub(crate) fn roll(&mut self, sides: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % sides as u64) as usize
    }
}

/// Few addresses for many entries, so that claims collide often.
/// One of a few addresses of either family, so that pods and Services
/// collide on them, in both of the route table's address maps.
fn address(dice: &mut Dice) -> String {
    match dice.roll(3) {
        0 => format!("fd00::{}", 1 + dice.roll(3)),
        _ => format!("10.0.0.{}", 1 + dice.roll(6)),
    }
}

pub(crate) fn workload(dice: &mut Dice, slot: usize, local: bool) -> v1::Workload {
    let name = format!("pod-{slot}");
    let ips = (0..1 + dice.roll(2)).map(|_| address(dice)).collect();
    v1::Workload {
        uid: format!("shop/{name}"),
        namespace: "shop".into(),
        name,
        service_account: "sa".into(),
        identity: "spiffe://cluster.local/ns/shop/sa/sa".into(),
        node: if local { NODE.into() } else { "node-2".into() },
        ips,
        meshed: dice.roll(4) != 0,
        workload_name: format!("version-{}", dice.roll(3)),
        ..v1::Workload::default()
    }
}

pub(crate) fn service(dice: &mut Dice, slot: usize) -> v1::Service {
    v1::Service {
        namespace: "shop".into(),
        name: format!("svc-{slot}"),
        vips: vec![format!("10.96.0.{}", dice.roll(3))],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
        }],
        endpoints: (0..dice.roll(4))
            .map(|_| v1::Endpoint {
                workload_uid: String::new(),
                ip: address(dice),
                ready: dice.roll(3) != 0,
                ports: [("http".to_owned(), 8080)].into(),
            })
            .collect(),
        traffic_policy: None,
    }
}

/// A delta of a few random changes: local pods in slots 0..8, remote pods
/// in 8..16 (so that a pod moves between the lists), Services in 0..5.
pub(crate) fn random_delta(dice: &mut Dice, version: u64, view: &NodeView) -> v1::ConfigUpdate {
    let mut update = v1::ConfigUpdate {
        version,
        ..v1::ConfigUpdate::default()
    };
    for _ in 0..1 + dice.roll(4) {
        let slot = dice.roll(16);
        let uid = format!("shop/pod-{slot}");
        let (local, known) = if slot < 8 {
            (true, view.local_workloads().contains_key(uid.as_str()))
        } else {
            (false, view.remote_workloads().contains_key(uid.as_str()))
        };
        let listed = |u: &v1::ConfigUpdate| {
            u.local_workloads
                .iter()
                .chain(&u.remote_workloads)
                .any(|w| w.uid == uid)
                || u.removed_local_workloads.contains(&uid)
                || u.removed_remote_workloads.contains(&uid)
        };
        if listed(&update) {
            continue;
        }
        match (dice.roll(3), local, known) {
            (0, true, true) => update.removed_local_workloads.push(uid),
            (0, false, true) => update.removed_remote_workloads.push(uid),
            (_, true, _) => update.local_workloads.push(workload(dice, slot, true)),
            (_, false, _) => update.remote_workloads.push(workload(dice, slot, false)),
        }
    }
    let slot = dice.roll(5);
    let key = format!("shop/svc-{slot}");
    if dice.roll(3) == 0 && view.services().contains_key(key.as_str()) {
        update.removed_services.push(key);
    } else {
        update.services.push(service(dice, slot));
    }
    update
}

/// An empty full state with the mesh roots, version 1.
pub(crate) fn first_full_state() -> v1::ConfigUpdate {
    v1::ConfigUpdate {
        version: 1,
        full_state: true,
        trust: Some(v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: ROOTS_PEM.clone(),
        }),
        ..v1::ConfigUpdate::default()
    }
}
