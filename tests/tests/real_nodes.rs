//! weft on real Kubernetes nodes: kubelet, containerd, runc, a CNI plugin,
//! kube-proxy and CoreDNS (see `weft_testbed::real_cluster`), with weft
//! installed the way a user installs it (`helm install` of deploy/helm/weft
//! with the images of scripts/images.sh) and the checks a user makes in
//! their first hour. Each CNI configuration runs the same scenarios, in
//! order, on a cluster of its own; one cluster runs at a time.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use weft_testbed::real_cluster::{self, Cni, PodRef, RealCluster, SERVICE_PORT};

/// Two clusters at once would only compete for the machine's two cores.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

#[path = "real_nodes/capture.rs"]
mod capture;
#[path = "real_nodes/upgrade.rs"]
mod upgrade;

use capture::{
    a_pod_that_takes_a_neighbours_address_is_refused,
    an_init_containers_first_request_is_meshed_as_itself, proxy_restarts_fail_closed,
    uninstall_leaves_nothing, unlabelling_the_namespace_releases_its_pods,
};

const MESHED: &str = "shop";
const PLAIN: &str = "legacy";
/// The NodePort of the meshed web-1.
const NODE_PORT: u16 = 30080;

fn start(cni: Cni) -> (std::sync::MutexGuard<'static, ()>, RealCluster) {
    let guard = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let images = real_cluster::weft_images().unwrap();
    let cluster = RealCluster::start(cni, 2, &images).unwrap();
    (guard, cluster)
}

/// In each of a meshed and an unmeshed namespace: `web-1` on node-1,
/// `web-2` on node-2, each with a Service, and a `client` on node-1.
fn deploy_apps(cluster: &RealCluster) {
    let mut yaml = String::new();
    for (namespace, meshed) in [(MESHED, true), (PLAIN, false)] {
        yaml.push_str(&real_cluster::namespace(namespace, meshed));
        for (app, node) in [
            ("web-1", "node-1"),
            ("web-2", "node-2"),
            ("client", "node-1"),
        ] {
            yaml.push_str("---\n");
            yaml.push_str(&real_cluster::app(namespace, app, 1, Some(node)));
        }
        yaml.push_str("---\n");
    }
    yaml.push_str(&real_cluster::node_port(MESHED, "web-1", NODE_PORT));
    cluster.deploy(&yaml).unwrap();
}

/// Every pod of the meshed namespace is Ready and was never restarted:
/// the kubelet's probes (from the node itself) pass through the capture.
fn meshed_pods_stay_ready(cluster: &RealCluster) {
    let text = cluster
        .kubectl(&[
            "-n",
            MESHED,
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].ready} {.status.containerStatuses[0].restartCount}{\"\\n\"}{end}",
        ])
        .unwrap();
    for line in text.lines() {
        assert!(
            line.ends_with(" true 0"),
            "a meshed pod is not ready or restarted: {line}"
        );
    }
}

fn pod(cluster: &RealCluster, namespace: &str, app: &str) -> PodRef {
    cluster.pod(namespace, app).unwrap()
}

/// Every client reaches every server, by pod IP and by Service name, on
/// its node and across nodes; the answer comes from the pod addressed.
fn every_pair_connects(cluster: &RealCluster) {
    for client_ns in [MESHED, PLAIN] {
        let client = pod(cluster, client_ns, "client");
        for server_ns in [MESHED, PLAIN] {
            for web in ["web-1", "web-2"] {
                let server = pod(cluster, server_ns, web);
                let by_ip = SocketAddr::from((server.ip, real_cluster::APP_PORT));
                let body = cluster.wait_for_http(&client, by_ip, "/").unwrap();
                assert_eq!(body.trim(), server.name, "{client_ns} -> {by_ip}");
                let name = format!("{web}.{server_ns}.svc.cluster.local");
                let vip = cluster.resolve_from(&client, &name).unwrap();
                let by_name = SocketAddr::from((vip, SERVICE_PORT));
                let body = cluster.wait_for_http(&client, by_name, "/").unwrap();
                assert_eq!(body.trim(), server.name, "{client_ns} -> {name}");
            }
        }
    }
}

/// The node's own clients (the kubelet, hostNetwork pods) reach meshed
/// pods on it and on the other node, and a client outside the nodes
/// reaches a meshed Service through its NodePort on either node.
fn node_traffic_and_node_ports_work(cluster: &RealCluster) {
    for web in ["web-1", "web-2"] {
        let server = pod(cluster, MESHED, web);
        let to = SocketAddr::from((server.ip, real_cluster::APP_PORT));
        let body = cluster.http_get_from_node("node-1", to, "/").unwrap();
        assert_eq!(body.trim(), server.name, "node-1 -> {web}");
    }
    let web_1 = pod(cluster, MESHED, "web-1");
    for node in cluster.node_names() {
        let to = SocketAddr::from((cluster.node_ip(&node).unwrap(), NODE_PORT));
        cluster
            .wait_until(&format!("the NodePort on {node}"), || {
                let body = cluster.http_get_from_outside(to, "/")?;
                Ok(body.trim() == web_1.name)
            })
            .unwrap();
    }
}

/// On the wire between the nodes, a meshed pair's request is TLS to port
/// 15008; an unmeshed pair's is the plaintext request itself.
fn only_tls_between_meshed_pods(cluster: &RealCluster) {
    for (namespace, meshed) in [(MESHED, true), (PLAIN, false)] {
        let client = pod(cluster, namespace, "client");
        let server = pod(cluster, namespace, "web-2");
        let marker = format!("/?wire-check-{namespace}");
        let capture = cluster.capture_node_link("node-1").unwrap();
        let to = SocketAddr::from((server.ip, real_cluster::APP_PORT));
        cluster.http_get_from(&client, to, &marker).unwrap();
        // The answer's packets: through the tunnel when meshed.
        let seen = capture.finish_after_answer(server.ip, meshed).unwrap();
        let plaintext = seen.contains(marker.as_bytes());
        let tunnel = seen
            .count(&format!("host {} and port 15008", server.ip))
            .unwrap();
        if meshed {
            assert!(
                !plaintext,
                "the meshed request crossed the link in plaintext"
            );
            assert!(tunnel > 0);
            let other = seen
                .count(&format!(
                    "host {} and host {} and not port 15008",
                    client.ip, server.ip
                ))
                .unwrap();
            assert_eq!(other, 0, "meshed pods exchanged packets outside the tunnel");
        } else {
            assert!(plaintext, "the capture did not see the unmeshed request");
            assert_eq!(tunnel, 0);
        }
    }
}

/// An AuthorizationPolicy `name` by which the pods of `app` admit only
/// ServiceAccount `from` (of the meshed namespace).
fn allow(name: &str, app: &str, from: &str) -> String {
    policy(name, app, "ALLOW", from)
}

/// An AuthorizationPolicy `name` of `action` for the pods of `app` that
/// matches ServiceAccount `from` (of the meshed namespace).
fn policy(name: &str, app: &str, action: &str, from: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: {name}\n  namespace: {MESHED}\nspec:\n  selector:\n    \
         matchLabels: {{app: {app}}}\n  action: {action}\n  rules:\n  - from:\n      \
         principals: [\"spiffe://cluster.local/ns/{MESHED}/sa/{from}\"]\n"
    )
}

/// STRICT and ALLOW policies applied with kubectl are enforced on one node
/// and across nodes, through NodePorts too, and reported Accepted.
fn policies_are_enforced_and_reported(cluster: &RealCluster) {
    let legacy = pod(cluster, PLAIN, "client");
    let client = pod(cluster, MESHED, "client");
    cluster
        .apply(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: MtlsPolicy\nmetadata:\n  name: strict\n  \
             namespace: {MESHED}\nspec:\n  mode: STRICT\n---\n{}---\n{}",
            allow("web-2-from-web-1", "web-2", "web-1"),
            allow("web-1-from-web-2", "web-1", "web-2"),
        ))
        .unwrap();
    // STRICT: plaintext from the unmeshed client is refused on its node
    // (web-1) and across (web-2), and through web-1's NodePort.
    for web in ["web-1", "web-2"] {
        let server = pod(cluster, MESHED, web);
        let to = SocketAddr::from((server.ip, real_cluster::APP_PORT));
        cluster
            .wait_until(&format!("plaintext to {web} refused"), || {
                Ok(cluster.http_get_from(&legacy, to, "/").is_err())
            })
            .unwrap();
    }
    for node in cluster.node_names() {
        let to = SocketAddr::from((cluster.node_ip(&node).unwrap(), NODE_PORT));
        assert!(
            cluster.http_get_from_outside(to, "/").is_err(),
            "plaintext through the NodePort on {node} reached a STRICT pod"
        );
    }
    // ALLOW: each web admits only the other web's identity. The meshed
    // client is refused by web-1 on its own node and by web-2 across, by
    // pod IP and through web-1's NodePort on its node; the webs reach
    // each other.
    let (web_1, web_2) = (pod(cluster, MESHED, "web-1"), pod(cluster, MESHED, "web-2"));
    let to_web_1 = SocketAddr::from((web_1.ip, real_cluster::APP_PORT));
    let to_web_2 = SocketAddr::from((web_2.ip, real_cluster::APP_PORT));
    for to in [to_web_1, to_web_2] {
        cluster
            .wait_until(&format!("the client refused by {to}"), || {
                Ok(cluster.http_get_from(&client, to, "/").is_err())
            })
            .unwrap();
    }
    let own_node_port = SocketAddr::from((cluster.node_ip("node-1").unwrap(), NODE_PORT));
    assert!(
        cluster.http_get_from(&client, own_node_port, "/").is_err(),
        "the meshed client reached web-1 through its node's NodePort"
    );
    let body = cluster.wait_for_http(&web_1, to_web_2, "/").unwrap();
    assert_eq!(body.trim(), web_2.name);
    let body = cluster.wait_for_http(&web_2, to_web_1, "/").unwrap();
    assert_eq!(body.trim(), web_1.name);

    cluster
        .wait_until("every policy Accepted", || {
            let table = cluster.kubectl(&["get", "authz,mtls", "-A"])?;
            let accepted = table.lines().filter(|l| l.contains("True")).count();
            Ok(accepted == 3)
        })
        .unwrap();
    let table = cluster.kubectl(&["get", "authz", "-A"]).unwrap();
    assert!(table.contains("ACCEPTED"), "{table}");

    cluster
        .kubectl(&[
            "-n",
            MESHED,
            "delete",
            "mtlspolicy,authorizationpolicy",
            "--all",
        ])
        .unwrap();
    cluster.wait_for_http(&legacy, to_web_1, "/").unwrap();
    cluster.wait_for_http(&client, to_web_2, "/").unwrap();
}

/// A rolling restart of web-2 while the client sends requests through the
/// Service, each on a new connection, before, during and after it: none
/// fails, and the answers come from the old pod and then the new one.
fn rolling_restart_drops_nothing(cluster: &RealCluster) {
    let client = pod(cluster, MESHED, "client");
    let old = pod(cluster, MESHED, "web-2");
    let vip = cluster
        .resolve_from(&client, &format!("web-2.{MESHED}.svc.cluster.local"))
        .unwrap();
    let to = SocketAddr::from((vip, SERVICE_PORT));
    cluster.wait_for_http(&client, to, "/").unwrap();
    let netns = cluster.pod_netns(MESHED, &client.name).unwrap();
    let restarted = AtomicBool::new(false);
    let (answers, failures) = (Mutex::new(BTreeSet::new()), Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut after_restart = 0;
            // Requests go on until well after the rollout: connections the
            // old pod's removal could break come late.
            while after_restart < 30 {
                if restarted.load(Ordering::Relaxed) {
                    after_restart += 1;
                }
                let answer = real_cluster::connect_in(&netns, to)
                    .and_then(|stream| real_cluster::http_get(stream, to, "/"));
                match answer {
                    Ok(body) => lock(&answers).insert(body.trim().to_owned()),
                    Err(e) => {
                        lock(&failures).push(format!("{e:#}"));
                        false
                    }
                };
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let restart = cluster
            .kubectl(&["-n", MESHED, "rollout", "restart", "deployment/web-2"])
            .and_then(|_| cluster.rollout_status(MESHED, "web-2"));
        restarted.store(true, Ordering::Relaxed);
        restart.unwrap();
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    let new = pod(cluster, MESHED, "web-2");
    assert_ne!(new.name, old.name);
    let answers = answers.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        answers.contains(&old.name) && answers.contains(&new.name),
        "answers from {answers:?}, not from both {} and {}",
        old.name,
        new.name
    );
}

/// Before the install, `weft check --pre` finds the cluster ready for weft.
fn pre_install_checks_pass(cluster: &RealCluster) {
    let (passed, output) = cluster.weft_check(&["--pre"]).unwrap();
    assert!(passed, "{output}");
    assert!(output.contains("✓ node kernels: 2 Linux nodes"), "{output}");
}

/// After it, `weft check` finds the mesh healthy, through the API server:
/// the control plane ready, every proxy current, and a test connection
/// across the nodes in a throwaway namespace mutual TLS and refused by a
/// throwaway DENY; the namespace is gone afterwards. Each control-plane
/// replica's dashboard shows every node's proxy, whichever replica holds
/// its stream.
fn post_install_checks_pass(cluster: &RealCluster) {
    let (passed, output) = cluster.weft_check(&[]).unwrap();
    // What the README's Day 2 section shows (with --nocapture).
    eprintln!("$ weft-control-plane check\n{output}");
    assert!(passed, "{output}");
    for line in [
        "✓ control plane ready: pod weft-system/weft-control-plane-",
        "✓ a proxy on every node: ",
        "✓ every proxy on its latest config",
        "✓ test connection is mutual TLS: weft-check-",
        "mutual TLS between the nodes",
        "✓ throwaway DENY refuses it: ",
    ] {
        assert!(output.contains(line), "{line:?} missing from:\n{output}");
    }
    // Each replica's dashboard merges the others' views: every node's
    // proxy is connected on every replica's Nodes page, whichever replica
    // holds its stream.
    let replicas = cluster
        .kubectl(&[
            "-n",
            "weft-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=weft-control-plane",
            "-o",
            "name",
        ])
        .unwrap();
    for pod in replicas.lines().map(|p| p.trim_start_matches("pod/")) {
        let page = |path: &str| -> serde_json::Value {
            let raw = cluster
                .kubectl(&[
                    "get",
                    "--raw",
                    &format!("/api/v1/namespaces/weft-system/pods/{pod}:15014/proxy{path}"),
                ])
                .unwrap();
            serde_json::from_str(&raw).unwrap()
        };
        let nodes = page("/api/nodes");
        let connected: BTreeSet<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["connected"] == true)
            .filter_map(|n| n["name"].as_str())
            .collect();
        assert_eq!(
            connected,
            BTreeSet::from(["node-1", "node-2"]),
            "{pod}: {nodes}"
        );
        let overview = page("/api/overview");
        assert_eq!(
            overview["replicas"]["unanswered"],
            serde_json::json!([]),
            "{pod}: {overview}"
        );
    }
    cluster
        .wait_until("the throwaway namespace gone", || {
            let left =
                cluster.kubectl(&["get", "namespaces", "-l", "weft.dev/check", "-o", "name"])?;
            Ok(left.trim().is_empty())
        })
        .unwrap();
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn scenarios(cni: Cni) {
    let (_guard, cluster) = start(cni);
    deploy_apps(&cluster);
    pre_install_checks_pass(&cluster);
    cluster.install_weft().unwrap();
    // The meshed pods, probes and all, are still (and stay) Ready once the
    // proxies capture them.
    for app in ["web-1", "web-2", "client"] {
        cluster.rollout_status(MESHED, app).unwrap();
    }
    every_pair_connects(&cluster);
    post_install_checks_pass(&cluster);
    node_traffic_and_node_ports_work(&cluster);
    meshed_pods_stay_ready(&cluster);
    only_tls_between_meshed_pods(&cluster);
    policies_are_enforced_and_reported(&cluster);
    meshed_pods_stay_ready(&cluster);
    rolling_restart_drops_nothing(&cluster);
    upgrade::upgrades_drop_nothing(&cluster);
    proxy_restarts_fail_closed(&cluster);
    an_init_containers_first_request_is_meshed_as_itself(&cluster);
    a_pod_that_takes_a_neighbours_address_is_refused(&cluster);
    unlabelling_the_namespace_releases_its_pods(&cluster);
    uninstall_leaves_nothing(&cluster);
}

#[test]
fn on_a_bridge_cni_with_br_netfilter() {
    scenarios(Cni::Bridge);
}

#[test]
fn on_a_point_to_point_cni() {
    scenarios(Cni::Ptp);
}
