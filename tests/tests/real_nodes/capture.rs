//! The scenarios of `real_nodes` about the capture itself: proxies killed
//! and restarted without a control plane, a new pod's first packet, a pod
//! that forges a neighbour's address, a namespace leaving the mesh, and
//! `helm uninstall`.

use std::net::SocketAddr;

use weft_testbed::real_cluster::{self, RealCluster};

use super::{MESHED, allow, pod, policy};

/// The client's node proxy is killed (SIGKILL), then replaced while the
/// control plane is scaled to zero: the client's requests to web-2, on the
/// other node, fail or wait meanwhile, never cross the link in plaintext,
/// and flow again (meshed) once a proxy serves the client, also without a
/// control plane, from the state the proxy kept on the node; a DENY of the
/// client at web-1 (on the client's node) stays a DENY throughout.
pub(super) fn proxy_restarts_fail_closed(cluster: &RealCluster) {
    let client = pod(cluster, MESHED, "client");
    let server = pod(cluster, MESHED, "web-2");
    let to = SocketAddr::from((server.ip, real_cluster::APP_PORT));
    let to_web_1 = SocketAddr::from((pod(cluster, MESHED, "web-1").ip, real_cluster::APP_PORT));
    let marker = "/?fail-closed-marker-91c4";
    cluster
        .apply(&policy("web-1-not-from-client", "web-1", "DENY", "client"))
        .unwrap();
    cluster
        .wait_until("the client denied by web-1", || {
            Ok(cluster.http_get_from(&client, to_web_1, "/").is_err())
        })
        .unwrap();
    let capture = cluster.capture_node_link("node-1").unwrap();

    cluster.kill_proxy_on("node-1").unwrap();
    // While no proxy serves it (the kubelet restarts it after a backoff).
    for _ in 0..3 {
        let _ = cluster.http_get_from(&client, to, marker);
    }
    cluster.wait_for_http(&client, to, marker).unwrap();
    cluster.wait_for_proxies().unwrap();

    cluster.scale_control_plane(0).unwrap();
    cluster.replace_proxy_on("node-1").unwrap();
    cluster.replace_proxy_on("node-2").unwrap();
    let body = cluster.wait_for_http(&client, to, marker).unwrap();
    assert_eq!(body.trim(), server.name);
    // web-2, which the policy does not name, reaches web-1 meanwhile: the
    // client is refused by the DENY, not by a web-1 nobody can reach.
    let web_2 = pod(cluster, MESHED, "web-2");
    cluster.wait_for_http(&web_2, to_web_1, "/").unwrap();
    for _ in 0..3 {
        assert!(
            cluster.http_get_from(&client, to_web_1, "/").is_err(),
            "a proxy restarted without its control plane let a denied client in"
        );
    }
    cluster.scale_control_plane(2).unwrap();
    cluster
        .kubectl(&[
            "-n",
            MESHED,
            "delete",
            "authorizationpolicy",
            "web-1-not-from-client",
        ])
        .unwrap();
    cluster.wait_for_http(&client, to_web_1, "/").unwrap();

    let seen = capture
        .finish_after(&format!("src host {} and src port 15008", server.ip))
        .unwrap();
    assert!(
        !seen.contains(marker.as_bytes()),
        "a request crossed the link in plaintext while a proxy restarted"
    );
    assert!(
        seen.count(&format!("host {} and port 15008", server.ip))
            .unwrap()
            > 0,
        "the capture saw no tunnel"
    );
}

/// Runs `f` while web-2 admits only `from`'s identity (from when the
/// meshed client is refused by it); then the policy goes, and the client
/// reaches web-2 again.
fn with_web_2_admitting_only(cluster: &RealCluster, from: &str, f: impl FnOnce()) {
    let client = pod(cluster, MESHED, "client");
    let to = SocketAddr::from((pod(cluster, MESHED, "web-2").ip, real_cluster::APP_PORT));
    let name = format!("web-2-from-{from}");
    cluster.apply(&allow(&name, "web-2", from)).unwrap();
    cluster
        .wait_until("the client refused by web-2", || {
            Ok(cluster.http_get_from(&client, to, "/").is_err())
        })
        .unwrap();
    f();
    cluster
        .kubectl(&["-n", MESHED, "delete", "authorizationpolicy", &name])
        .unwrap();
    cluster.wait_for_http(&client, to, "/").unwrap();
}

/// A new pod's init container sends its request to web-2 (on the other
/// node) at once, while the pod is still Pending: it is captured from its
/// first packet, waits for the pod's config and certificate, and goes
/// meshed as the pod's own identity, the only one web-2 admits. The pod
/// never restarts its init container (`restartPolicy: Never`: a failed
/// first request fails the pod), and the request never crosses the link in
/// plaintext.
pub(super) fn an_init_containers_first_request_is_meshed_as_itself(cluster: &RealCluster) {
    let server = pod(cluster, MESHED, "web-2");
    let marker = "/?init-container-marker-5d2e";
    with_web_2_admitting_only(cluster, "init-client", || {
        let capture = cluster.capture_node_link("node-1").unwrap();
        cluster
            .apply(&format!(
                r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: init-client, namespace: {MESHED}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: init-client, namespace: {MESHED}}}
spec:
  serviceAccountName: init-client
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: node-1}}
  initContainers:
  - name: first-request
    image: {image}
    imagePullPolicy: Never
    command:
    - sh
    - -c
    - |
      printf 'GET {marker} HTTP/1.0\r\n\r\n' | nc -w 20 {ip} {port} | tee /dev/stderr | grep -q {name}
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
"#,
                image = real_cluster::APP_IMAGE,
                ip = server.ip,
                port = real_cluster::APP_PORT,
                name = server.name,
            ))
            .unwrap();
        let mut phase = String::new();
        cluster
            .wait_until("init-client running or failed", || {
                phase = cluster.kubectl(&[
                    "-n",
                    MESHED,
                    "get",
                    "pod",
                    "init-client",
                    "-o",
                    "jsonpath={.status.phase}",
                ])?;
                Ok(phase == "Running" || phase == "Failed")
            })
            .unwrap();
        let said = cluster
            .kubectl(&["-n", MESHED, "logs", "init-client", "-c", "first-request"])
            .unwrap_or_default();
        assert_eq!(
            phase, "Running",
            "the init container's request failed: {said}"
        );
        let seen = capture
            .finish_after(&format!("src host {} and src port 15008", server.ip))
            .unwrap();
        assert!(
            !seen.contains(marker.as_bytes()),
            "the init container's request crossed the link in plaintext"
        );
        assert!(
            seen.count(&format!("host {} and port 15008", server.ip))
                .unwrap()
                > 0,
            "the capture saw no tunnel"
        );
        cluster
            .kubectl(&["-n", MESHED, "delete", "pod", "init-client", "--wait"])
            .unwrap();
    });
}

/// The meshed client takes web-1's address on its own interface (as a pod
/// with `CAP_NET_ADMIN` can) and asks web-2, which admits web-1 alone,
/// from it: the client's proxy serves the client only and refuses the
/// connection; nothing reaches web-2.
pub(super) fn a_pod_that_takes_a_neighbours_address_is_refused(cluster: &RealCluster) {
    let client = pod(cluster, MESHED, "client");
    let web_1 = pod(cluster, MESHED, "web-1");
    let to = SocketAddr::from((pod(cluster, MESHED, "web-2").ip, real_cluster::APP_PORT));
    let spoofed = || -> String {
        let body = cluster.http_get_from_node(
            "node-1",
            SocketAddr::from((cluster.node_ip("node-1").unwrap(), 15020)),
            "/metrics",
        );
        body.unwrap()
            .lines()
            .filter(|line| line.contains("spoofed_address"))
            .collect()
    };
    with_web_2_admitting_only(cluster, "web-1", || {
        cluster.wait_for_http(&web_1, to, "/").unwrap();
        let before = spoofed();
        let forged = cluster
            .run_in_pod(MESHED, &client.name, || -> anyhow::Result<String> {
                let address = format!("{}/32", web_1.ip);
                let ip = |verb: &str| {
                    std::process::Command::new("ip")
                        .args(["addr", verb, &address, "dev", "eth0"])
                        .status()
                };
                anyhow::ensure!(ip("add")?.success(), "ip addr add {address}");
                let answer = (|| -> anyhow::Result<String> {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    socket.bind(&SocketAddr::from((web_1.ip, 0)).into())?;
                    socket.connect_timeout(&to.into(), weft_testbed::IO_TIMEOUT)?;
                    real_cluster::http_get(socket.into(), to, "/?forged")
                })();
                ip("del")?;
                answer
            })
            .unwrap();
        assert!(forged.is_err(), "a forged source reached web-2: {forged:?}");
        cluster
            .wait_until("the forgery counted", || Ok(spoofed() != before))
            .unwrap();
    });
}

/// The meshed namespace is unlabelled: the capture leaves its pods (the
/// client's namespace has no weft table), and the client's request to
/// web-2 crosses the link as itself, in plaintext; labelled again, the pods
/// are captured again and the request is tunnelled.
pub(super) fn unlabelling_the_namespace_releases_its_pods(cluster: &RealCluster) {
    let client = pod(cluster, MESHED, "client");
    let server = pod(cluster, MESHED, "web-2");
    let to = SocketAddr::from((server.ip, real_cluster::APP_PORT));
    let netns = cluster.pod_netns(MESHED, &client.name).unwrap();
    let captured = || -> anyhow::Result<bool> {
        Ok(real_cluster::nft_tables_in(&netns)?.contains("table inet weft"))
    };
    for (label, meshed) in [("disabled", false), ("enabled", true)] {
        cluster
            .kubectl(&[
                "label",
                "namespace",
                MESHED,
                &format!("{}={label}", weft_testbed::MESH_LABEL),
                "--overwrite",
            ])
            .unwrap();
        cluster
            .wait_until(&format!("the client captured: {meshed}"), || {
                Ok(captured()? == meshed)
            })
            .unwrap();
        let marker = format!("/?unlabelled-{label}");
        let capture = cluster.capture_node_link("node-1").unwrap();
        let body = cluster.wait_for_http(&client, to, &marker).unwrap();
        assert_eq!(body.trim(), server.name);
        // Once tcpdump has written the answer (through the tunnel when
        // meshed), everything before it is in the file too.
        let seen = capture.finish_after_answer(server.ip, meshed).unwrap();
        assert_eq!(
            seen.contains(marker.as_bytes()),
            !meshed,
            "labelled {label}: the request {} the link in plaintext",
            if meshed { "crossed" } else { "did not cross" }
        );
    }
}

/// `helm uninstall` (its pre-delete hook tells every proxy first): pods
/// keep talking, unmeshed, and no weft table, rule, route or kept state is
/// left on any node or in any pod.
pub(super) fn uninstall_leaves_nothing(cluster: &RealCluster) {
    let client = pod(cluster, MESHED, "client");
    let netns = cluster.pod_netns(MESHED, &client.name).unwrap();
    assert!(
        real_cluster::nft_tables_in(&netns)
            .unwrap()
            .contains("table inet weft"),
        "the client was not captured in its own namespace"
    );
    let before = cluster.weft_state_on("node-1").unwrap();
    assert!(
        before.iter().any(|found| found.starts_with("weft-cni in")),
        "weft-cni was not chained into node-1's network configuration: {before:?}"
    );
    cluster.uninstall_weft().unwrap();
    for node in cluster.node_names() {
        let left = cluster.weft_state_on(&node).unwrap();
        assert!(left.is_empty(), "weft left on {node}: {left:?}");
    }
    let tables = real_cluster::nft_tables_in(&netns).unwrap();
    assert!(
        !tables.contains("weft"),
        "weft left in the client: {tables}"
    );
    for web in ["web-1", "web-2"] {
        let server = pod(cluster, MESHED, web);
        let to = SocketAddr::from((server.ip, real_cluster::APP_PORT));
        let body = cluster.http_get_from(&client, to, "/").unwrap();
        assert_eq!(body.trim(), server.name);
    }
}
