//! End to end on the testbed: the real control plane and a real node proxy on
//! each node, talking over the testbed's network. What each proxy holds, which
//! certificates it gets, how manifest changes travel, and what happens when
//! the control plane goes away.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_testbed::{PodSpec, ServiceSpec, Target, Testbed, WeftMesh, uids, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// Two nodes; on node-1 a meshed web pod and an opted-out batch pod, on
/// node-2 two meshed db pods behind a Service and a pod of an unmeshed
/// namespace.
fn cluster() -> Testbed {
    Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "web-1",
            service_account: "web",
            labels: &[("app", "web")],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "batch-1",
            service_account: "batch",
            labels: &[],
            meshed: false,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "shop",
            name: "db-1",
            service_account: "db",
            labels: &[("app", "db")],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "shop",
            name: "db-2",
            service_account: "db",
            labels: &[("app", "db")],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "legacy",
            name: "old-1",
            service_account: "default",
            labels: &[],
            meshed: false,
            probe_ports: &[],
        })
        .service(ServiceSpec {
            namespace: "shop",
            name: "db",
            port: 5432,
            target_port: 5432,
            selector: &[("app", "db")],
        })
        .build()
        .unwrap()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn dump(mesh: &WeftMesh, testbed: &Testbed, node: &str) -> Value {
    mesh.config_dump(testbed, node).unwrap()
}

fn wait_for_dump(
    mesh: &WeftMesh,
    testbed: &Testbed,
    node: &str,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) {
    mesh.wait_for_dump(testbed, node, what, condition).unwrap();
}

fn cert_identities(mesh: &WeftMesh, testbed: &Testbed, node: &str) -> BTreeSet<String> {
    mesh.cert_identities(testbed, node)
}

/// One Sign call from a test thread, over a socket opened in a node.
fn sign_over(
    socket: std::net::TcpStream,
    roots: weft_certs::TrustBundle,
    token: &str,
    identity: &weft_certs::Identity,
) -> Result<weft_api::v1::SignResponse, tonic::Status> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(weft_testbed::sign_over(socket, roots, token, identity))
        .unwrap()
}

fn has_local(uid: &'static str) -> impl Fn(&Value) -> bool {
    move |dump| uids(dump, "local_workloads").contains(uid)
}

#[test]
fn each_proxy_holds_its_nodes_workloads_and_exactly_its_identities() {
    let testbed = cluster();
    let mesh = WeftMesh::start(&testbed).unwrap();
    wait_for_dump(&mesh, &testbed, "node-1", "first config", |d| {
        d["applied_version"].is_u64()
    });
    wait_for_dump(&mesh, &testbed, "node-2", "first config", |d| {
        d["applied_version"].is_u64()
    });

    let node1 = dump(&mesh, &testbed, "node-1");
    let node2 = dump(&mesh, &testbed, "node-2");
    assert_eq!(
        uids(&node1, "local_workloads"),
        set(&["shop/web-1", "shop/batch-1"])
    );
    assert_eq!(
        uids(&node1, "remote_workloads"),
        set(&["shop/db-1", "shop/db-2", "legacy/old-1"])
    );
    assert_eq!(
        uids(&node2, "local_workloads"),
        set(&["shop/db-1", "shop/db-2", "legacy/old-1"])
    );
    assert_eq!(
        uids(&node2, "remote_workloads"),
        set(&["shop/web-1", "shop/batch-1"])
    );
    let web = node1["local_workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["uid"] == "shop/web-1")
        .unwrap();
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(web["ips"][0], testbed.pod_ip("web-1").unwrap().to_string());
    assert_eq!(web["meshed"], true);
    let db = node1["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "db")
        .unwrap();
    assert_eq!(db["endpoints"].as_array().unwrap().len(), 2);

    // Certificates for exactly the local meshed identities: the two db pods
    // share one; batch-1 and old-1 are not meshed.
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let db_id = "spiffe://cluster.local/ns/shop/sa/db";
    wait_until(WAIT, || {
        Ok(cert_identities(&mesh, &testbed, "node-1") == set(&[web_id]))
    })
    .unwrap();
    wait_until(WAIT, || {
        Ok(cert_identities(&mesh, &testbed, "node-2") == set(&[db_id]))
    })
    .unwrap();
    let certs: Value =
        serde_json::from_str(&mesh.proxy_admin(&testbed, "node-1", "/certs").unwrap()).unwrap();
    let expires_in = certs[0]["seconds_until_expiry"].as_u64().unwrap();
    assert!(expires_in > 23 * 3600 && expires_in <= 24 * 3600, "{certs}");

    // The control plane saw both proxies apply their config.
    let nodes: Value =
        serde_json::from_str(&mesh.control_plane_page(&testbed, "/debug/nodes").unwrap()).unwrap();
    for node in ["node-1", "node-2"] {
        assert_eq!(nodes[node]["streams"], 1, "{nodes}");
        assert!(
            nodes[node]["acked_version"].as_u64().unwrap() >= 1,
            "{nodes}"
        );
    }
}

#[test]
fn a_proxy_is_refused_an_identity_of_another_node() {
    let testbed = cluster();
    let mesh = WeftMesh::start(&testbed).unwrap();
    let control_plane = mesh.control_plane_addr(&testbed).unwrap();
    let token = mesh.token("node-1").unwrap().to_owned();
    let roots = weft_certs::TrustBundle::from_pem(&mesh.roots_pem().unwrap()).unwrap();

    // From node-1, with node-1's credentials, ask for db (which runs on node-2 only).
    let db: weft_certs::Identity = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
    let socket = testbed
        .connect(Target::Node("node-1"), control_plane)
        .unwrap();
    let status = sign_over(socket, roots, &token, &db).unwrap_err();

    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node node-1"),
        "{}",
        status.message()
    );
    let metrics = mesh.control_plane_page(&testbed, "/metrics").unwrap();
    assert!(
        metrics.contains("weft_control_plane_certificates_total{outcome=\"denied\"} 1"),
        "{metrics}"
    );
}

const EXTRA_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: cache-1, namespace: shop, labels: {app: cache}}
spec: {nodeName: node-2, serviceAccountName: cache, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.50, podIPs: [{ip: 10.244.2.50}]}
";

#[test]
fn added_changed_and_deleted_pods_reach_every_proxy() {
    let testbed = cluster();
    let mesh = WeftMesh::start(&testbed).unwrap();
    for node in ["node-1", "node-2"] {
        wait_for_dump(&mesh, &testbed, node, "first config", |d| {
            d["applied_version"].is_u64()
        });
    }

    // Added: node-2 holds it as local and gets its certificate; node-1 as remote.
    let started = Instant::now();
    mesh.write_manifest("extra.yaml", EXTRA_POD).unwrap();
    wait_for_dump(
        &mesh,
        &testbed,
        "node-2",
        "cache-1 added",
        has_local("shop/cache-1"),
    );
    wait_for_dump(&mesh, &testbed, "node-1", "cache-1 seen", |d| {
        uids(d, "remote_workloads").contains("shop/cache-1")
    });
    let propagation = started.elapsed();
    let cache_id = "spiffe://cluster.local/ns/shop/sa/cache";
    wait_until(WAIT, || {
        Ok(cert_identities(&mesh, &testbed, "node-2").contains(cache_id))
    })
    .unwrap();

    // Changed: a new IP reaches both.
    mesh.write_manifest(
        "extra.yaml",
        &EXTRA_POD.replace("10.244.2.50", "10.244.2.51"),
    )
    .unwrap();
    for node in ["node-1", "node-2"] {
        wait_for_dump(&mesh, &testbed, node, "cache-1's new IP", |d| {
            ["local_workloads", "remote_workloads"].iter().any(|list| {
                d[*list]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["uid"] == "shop/cache-1" && w["ips"][0] == "10.244.2.51")
            })
        });
    }

    // Deleted: gone from both, and node-2 drops the certificate of the
    // identity it no longer runs.
    std::fs::remove_file(mesh.manifests_dir().join("extra.yaml")).unwrap();
    for node in ["node-1", "node-2"] {
        wait_for_dump(&mesh, &testbed, node, "cache-1 removed", |d| {
            !uids(d, "local_workloads").contains("shop/cache-1")
                && !uids(d, "remote_workloads").contains("shop/cache-1")
        });
    }
    wait_until(WAIT, || {
        Ok(!cert_identities(&mesh, &testbed, "node-2").contains(cache_id))
    })
    .unwrap();

    // Every change went as a delta: each proxy has applied several versions
    // over one stream. (A proxy acks after it applies, and the control
    // plane records the ack in its own time: wait for it.)
    let nodes = || -> anyhow::Result<Value> {
        Ok(serde_json::from_str(
            &mesh.control_plane_page(&testbed, "/debug/nodes")?,
        )?)
    };
    let acked = |nodes: &Value| {
        ["node-1", "node-2"].iter().all(|node| {
            nodes[node]["acked_version"]
                .as_u64()
                .is_some_and(|v| v >= 4)
        })
    };
    wait_until(WAIT, || Ok(nodes().is_ok_and(|n| acked(&n))))
        .unwrap_or_else(|e| panic!("not every proxy acked version 4: {e}: {:?}", nodes().ok()));
    let nodes = nodes().unwrap();
    for node in ["node-1", "node-2"] {
        assert_eq!(nodes[node]["streams"], 1, "{nodes}");
    }
    eprintln!("manifest change to both proxies applied: {propagation:?}");
}

#[test]
fn a_malformed_manifest_is_reported_and_nothing_is_lost() {
    let testbed = cluster();
    let mesh = WeftMesh::start(&testbed).unwrap();
    mesh.write_manifest("extra.yaml", EXTRA_POD).unwrap();
    wait_for_dump(
        &mesh,
        &testbed,
        "node-2",
        "cache-1 added",
        has_local("shop/cache-1"),
    );
    wait_for_dump(&mesh, &testbed, "node-1", "cache-1 seen", |d| {
        uids(d, "remote_workloads").contains("shop/cache-1")
    });
    let before = uids(&dump(&mesh, &testbed, "node-1"), "remote_workloads");

    // extra.yaml gets a broken second document; a new file is not YAML at all.
    let broken =
        format!("{EXTRA_POD}---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop}}\n");
    mesh.write_manifest("extra.yaml", &broken).unwrap();
    mesh.write_manifest("garbage.yaml", "kind: [unclosed")
        .unwrap();

    wait_until(WAIT, || {
        let page = mesh.control_plane_page(&testbed, "/debug/manifests")?;
        Ok(page.contains("extra.yaml document 1") && page.contains("garbage.yaml"))
    })
    .unwrap();
    let log = mesh.control_plane().unwrap();
    let log = log
        .stdout_once(|log| log.contains("extra.yaml document 1"))
        .unwrap();
    assert!(
        log.contains("extra.yaml document 1"),
        "the problem is logged: {log}"
    );

    // Reading the directory is not a change: once the edits are handled, the
    // control plane stops re-reading.
    let reloads = || -> u64 {
        let metrics = mesh.control_plane_page(&testbed, "/metrics").unwrap();
        let line = metrics
            .lines()
            .find(|l| l.starts_with("weft_control_plane_manifest_reloads_total"))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let settled = reloads();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        reloads(),
        settled,
        "the control plane keeps re-reading an unchanged directory"
    );

    // Nothing was lost: both proxies still hold every workload, cache-1 included.
    assert_eq!(
        uids(&dump(&mesh, &testbed, "node-1"), "remote_workloads"),
        before
    );
    assert!(has_local("shop/cache-1")(&dump(&mesh, &testbed, "node-2")));
}

#[test]
fn proxies_keep_serving_without_the_control_plane_and_resync_after() {
    let testbed = cluster();
    let mut mesh = WeftMesh::start(&testbed).unwrap();
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    wait_until(WAIT, || {
        Ok(cert_identities(&mesh, &testbed, "node-1").contains(web_id))
    })
    .unwrap();
    let before = dump(&mesh, &testbed, "node-1");

    let exit = mesh.stop_control_plane().unwrap();
    assert!(
        exit.success(),
        "SIGTERM ends the config streams and exits cleanly: {exit:?}"
    );
    wait_for_dump(&mesh, &testbed, "node-1", "noticing the outage", |d| {
        d["control_plane"]["connected"] == false
    });
    // Still serving the last state and the certificate.
    let during = dump(&mesh, &testbed, "node-1");
    assert_eq!(
        uids(&during, "local_workloads"),
        uids(&before, "local_workloads")
    );
    assert_eq!(
        uids(&during, "remote_workloads"),
        uids(&before, "remote_workloads")
    );
    assert!(cert_identities(&mesh, &testbed, "node-1").contains(web_id));

    // The cluster changes while the control plane is down; after it returns
    // (same root, from its state directory) the proxies resync.
    mesh.write_manifest("extra.yaml", EXTRA_POD).unwrap();
    mesh.start_control_plane(&testbed).unwrap();
    for node in ["node-1", "node-2"] {
        wait_for_dump(&mesh, &testbed, node, "resync", |d| {
            d["control_plane"]["connected"] == true
                && (uids(d, "local_workloads").contains("shop/cache-1")
                    || uids(d, "remote_workloads").contains("shop/cache-1"))
        });
    }
    let cache_id = "spiffe://cluster.local/ns/shop/sa/cache";
    wait_until(WAIT, || {
        Ok(cert_identities(&mesh, &testbed, "node-2").contains(cache_id))
    })
    .unwrap();
    let after = dump(&mesh, &testbed, "node-1");
    assert_eq!(
        after["trust"], before["trust"],
        "the restarted control plane kept its root"
    );
}
