//! The control plane's deltas, applied by the proxy's own code, keep every
//! node's view equal to the view a fresh full state gives it: random
//! clusters (pods that move, collide on IPs and get deleted; Services with
//! endpoints; policies; namespaces turning the mesh on and off) change one
//! object or all of them at a time; after every version each node's proxy
//! view, brought along by deltas (and by the parts of a full state when the
//! control plane sends one), is compared with a view made from nothing.
//! The data path's route table is brought along in the same way and must
//! resolve like one built afresh.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::sync::Arc;

use prost::Message as _;
use weft_api::parts::Assembler;
use weft_api::v1 as pb;
use weft_control_plane::fanout::{NodeFeed, Outgoing, Published};
use weft_control_plane::mesh::Mesh;
use weft_control_plane::test_clusters::{Dice, NODES, SLOTS, cluster_of, random_object};
use weft_proxy::NodeView;
use weft_proxy::dataplane::balancer::Balancers;
use weft_proxy::dataplane::routes::RouteTable;

/// Roots the proxy can parse: the view refuses a full state without.
fn trust() -> pb::TrustBundle {
    static PEM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        weft_certs::MeshCa::generate_root("cluster.local", std::time::SystemTime::now())
            .unwrap()
            .trust_bundle()
            .to_pem()
    });
    pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: PEM.clone(),
    }
}

fn mesh_of(slots: &[Option<String>]) -> Mesh {
    Mesh::derive(&cluster_of(slots), trust(), "weft-system")
}

/// An update as the proxy reads it: a full state's parts put together.
fn whole(outgoing: Outgoing) -> pb::ConfigUpdate {
    let parts: Vec<_> = match outgoing {
        Outgoing::Delta(delta) => delta.parts(400),
        Outgoing::Full(full) => full.parts(400).collect(),
    };
    let mut assembler = Assembler::default();
    let mut assembled = None;
    for part in parts {
        let decoded = pb::ConfigUpdate::decode(part.bytes().clone()).unwrap();
        assembled = assembler.push(decoded, 0, usize::MAX).unwrap();
    }
    assembled.unwrap()
}

/// A node's view made from nothing: a fresh stream's full state.
fn fresh(node: &str, published: &Arc<Published>) -> NodeView {
    let (_, full) = NodeFeed::start(node, published, 1);
    let applied = NodeView::apply(None, &whole(Outgoing::Full(full)), node).unwrap();
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    applied.view
}

/// Everything a view holds but its numbering.
fn assert_same(brought: &NodeView, fresh: &NodeView, context: &str) {
    assert_eq!(
        brought.local_workloads(),
        fresh.local_workloads(),
        "{context}"
    );
    assert_eq!(
        brought.remote_workloads(),
        fresh.remote_workloads(),
        "{context}"
    );
    assert_eq!(brought.services(), fresh.services(), "{context}");
    assert_eq!(
        brought.authorization_policies(),
        fresh.authorization_policies(),
        "{context}"
    );
    assert_eq!(
        brought.meshed_namespaces(),
        fresh.meshed_namespaces(),
        "{context}"
    );
    assert_eq!(brought.uninstalling(), fresh.uninstalling(), "{context}");
    assert_eq!(brought.trust().trust_domain, fresh.trust().trust_domain);
}

/// What a route table resolves for every address the random clusters use.
fn resolutions(table: &RouteTable) -> Vec<String> {
    let pods = (0..=10).map(|n| format!("10.244.0.{n}:80"));
    let services =
        (8..=12).flat_map(|n| [format!("10.96.0.{n}:8000"), format!("10.96.0.{n}:8001")]);
    pods.chain(services)
        .map(|target| {
            let target: std::net::SocketAddr = target.parse().unwrap();
            let ip = target.ip();
            let workload = table
                .workload(ip)
                .map(|w| (w.uid.clone(), w.local().quarantine.clone()));
            let destination = match table.resolve(target) {
                Ok(weft_proxy::dataplane::routes::Destination::Service(service)) => {
                    format!("service {} {:?}", service.target(), service.endpoints())
                }
                Ok(weft_proxy::dataplane::routes::Destination::Direct(route)) => {
                    format!("direct local={}", route.local)
                }
                Err(no_route) => no_route.to_string(),
            };
            format!("{target}: {workload:?} {destination}")
        })
        .collect()
}

/// `steps` versions on every node; returns how many updates were deltas.
fn follow(seed: u64, steps: usize) -> usize {
    let mut dice = Dice(seed);
    let mut slots: Vec<Option<String>> = (0..SLOTS).map(|s| random_object(&mut dice, s)).collect();
    let mut published = Arc::new(Published::first(mesh_of(&slots)));
    let balancers = std::sync::Arc::new(Balancers::default());
    let mut nodes: Vec<_> = NODES
        .iter()
        .map(|node| {
            let (feed, full) = NodeFeed::start(node, &published, 1);
            let view = NodeView::apply(None, &whole(Outgoing::Full(full)), node)
                .unwrap()
                .view;
            let table = RouteTable::default().next(&view, &balancers);
            (*node, feed, view, table, 1)
        })
        .collect();
    let mut deltas = 0;
    for step in 0..steps {
        // Mostly one object at a time, now and then a whole new cluster.
        if dice.roll(10) == 0 {
            slots = (0..SLOTS).map(|s| random_object(&mut dice, s)).collect();
        } else {
            let slot = dice.roll(SLOTS);
            slots[slot] = random_object(&mut dice, slot);
        }
        if let Some(next) = published.next(mesh_of(&slots), 1000) {
            published = Arc::new(next);
        }
        for (node, feed, view, table, version) in &mut nodes {
            let context = format!("seed {seed} step {step} {node}");
            if let Some(update) = feed.update(&published, *version + 1).map(whole) {
                *version += 1;
                deltas += usize::from(!update.full_state);
                let applied = NodeView::apply(Some(view), &update, node).unwrap();
                assert!(
                    applied.refused.is_empty(),
                    "{context}: {:?}",
                    applied.refused
                );
                *view = applied.view;
                *table = table.next(view, &balancers);
            }
            let fresh = fresh(node, &published);
            assert_same(view, &fresh, &context);
            let fresh_table = RouteTable::new(&fresh);
            assert_eq!(resolutions(table), resolutions(&fresh_table), "{context}");
        }
    }
    deltas
}

#[test]
fn the_proxys_view_brought_along_by_deltas_is_the_view_of_a_fresh_full_state() {
    let mut deltas = 0;
    for seed in 1..=8 {
        deltas += follow(seed * 6151, 80);
    }
    // The walk is about deltas: most versions must have been sent as one.
    assert!(deltas > 8 * 80, "only {deltas} deltas");
}
