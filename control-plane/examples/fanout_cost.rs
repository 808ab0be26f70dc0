//! What one pod change costs the control plane at scale, step by step, in
//! one process (no gRPC, no files): deriving the mesh afresh and by the
//! change, publishing the change, each node's delta, and one node's full
//! state written in parts.
//!
//! `cargo run --release -p weft-control-plane --example fanout_cost -- 1000 50000`
#![allow(clippy::print_stdout, clippy::unwrap_used)] // an example's output is its point

use std::sync::Arc;
use std::time::Instant;

use weft_api::v1 as pb;
use weft_control_plane::cluster::ClusterState;
use weft_control_plane::fanout::{NodeFeed, Published};
use weft_control_plane::manifests::parse_documents;
use weft_control_plane::mesh::Mesh;

fn cluster(nodes: usize, pods: usize, moved: Option<usize>) -> ClusterState {
    let mut yaml = String::new();
    for ns in 0..pods.div_ceil(100) {
        yaml += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{ns}, labels: {{weft.dev/mesh: enabled}}}}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: same-ns, namespace: ns{ns}}}\nspec: {{action: ALLOW, rules: [{{from: {{namespaces: [ns{ns}]}}}}]}}\n---\n"
        );
    }
    for app in 0..pods.div_ceil(5) {
        let ns = app * 5 / 100;
        let mut endpoints = String::new();
        for replica in 0..5 {
            let pod = app * 5 + replica;
            let node = pod % nodes + 1;
            let last = if moved == Some(pod) { 250 } else { pod % 250 };
            let ip = format!("10.{}.{}.{last}", pod / 62500, pod / 250 % 250);
            endpoints += &format!(
                "{{addresses: [{ip}], targetRef: {{kind: Pod, name: app{app}-{replica}, namespace: ns{ns}}}}},"
            );
            yaml += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: app{app}-{replica}, namespace: ns{ns}, labels: {{app: app{app}, pod-template-hash: abc}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: app{app}-abc, uid: u{app}, controller: true}}]}}\n\
                 spec: {{nodeName: node-{node}, serviceAccountName: app{app}, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n---\n"
            );
        }
        yaml += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: app{app}, namespace: ns{ns}}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: app{app}-x, namespace: ns{ns}, labels: {{kubernetes.io/service-name: app{app}}}}}\naddressType: IPv4\nendpoints: [{endpoints}]\nports: [{{port: 8080}}]\n---\n",
            app / 250 % 250,
            app % 250
        );
    }
    // One document at a time: the YAML parser refuses more than 1,024 in a text.
    let mut state = ClusterState::default();
    for text in yaml.split("---\n").filter(|t| !t.trim().is_empty()) {
        for document in parse_documents(text).unwrap() {
            let object = weft_control_plane::cluster::ClusterObject::from_value(document);
            state.insert(object.unwrap());
        }
    }
    state
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    println!(
        "{what:<44} {:>10.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    out
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (nodes, pods) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(50_000),
    );
    println!("{nodes} nodes, {pods} pods");
    let trust = pb::TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: "roots".into(),
    };
    let before = timed("generate the cluster", || cluster(nodes, pods, None));
    // The source's next snapshot: the first with one pod and its
    // EndpointSlice replaced (sharing everything else, as sources do).
    let changed = cluster(nodes, pods, Some(pods / 2));
    let (app, replica) = (pods / 2 / 5, pods / 2 % 5);
    let ns = app * 5 / 100;
    let mut after = before.clone();
    for (map_pods, key) in [
        (true, format!("ns{ns}/app{app}-{replica}")),
        (false, format!("ns{ns}/app{app}-x")),
    ] {
        if map_pods {
            after.pods.insert(key.clone(), changed.pods[&key].clone());
        } else {
            after
                .endpoint_slices
                .insert(key.clone(), changed.endpoint_slices[&key].clone());
        }
    }
    let mesh = timed("Mesh::derive", || {
        Mesh::derive(&before, trust.clone(), "weft-system")
    });
    timed("ClusterState clone", || before.clone());
    let first = timed("Published::first (encodes the shared entries)", || {
        Arc::new(Published::first(mesh))
    });
    let (feed, full) = timed("one node's full state (NodeFeed::start)", || {
        NodeFeed::start("node-1", &first, 1)
    });
    let (parts, bytes) = timed("  written in 64 KiB parts", || {
        full.parts(64 * 1024)
            .fold((0, 0), |(n, b), part| (n + 1, b + part.bytes().len()))
    });
    println!(
        "{:<44} {:>10.1} MiB in {parts} parts",
        "  its size",
        bytes as f64 / 1048576.0
    );
    drop(feed);
    let mut feeds: Vec<NodeFeed> = timed("every node's full state, written and dropped", || {
        (1..=nodes)
            .map(|n| {
                let (feed, full) = NodeFeed::start(&format!("node-{n}"), &first, 1);
                full.parts(64 * 1024).for_each(drop);
                feed
            })
            .collect()
    });
    timed("Mesh::derive afresh after one pod's IP changed", || {
        Mesh::derive(&after, trust.clone(), "weft-system")
    });
    let mesh = timed("Mesh::next by the change", || {
        first
            .mesh
            .next(&before, &after, trust.clone(), "weft-system")
    });
    let next = timed("  MeshChange::between and publish", || {
        Arc::new(first.next(mesh, 1024).unwrap())
    });
    let sent = timed("  every node's delta", || {
        feeds
            .iter_mut()
            .filter_map(|feed| feed.update(&next, 2))
            .count()
    });
    println!("{:<44} {sent:>10}", "  nodes sent a delta");
}
