//! Upgrades on the real cluster, under load, as an operator runs them: a
//! new proxy image rolled out by the DaemonSet (node by node, the new pod
//! beside the old one, which hands its sockets over and drains), a rolling
//! restart of the control plane, and a rollout during which the old proxy
//! is killed in the middle of its hand-over.
//!
//! The load runs from the meshed client (node-1) to an echo server in the
//! meshed web-2 (node-2): requests over persistent connections, a new
//! connection per request, a long-lived stream (see `SteadyLoad`). Every
//! request carries a marker that node-1's link must never carry in
//! plaintext.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use weft_testbed::real_cluster::{self, RealCluster};
use weft_testbed::steady_load::{LoadKind, LoadReport, LoadShape, SteadyLoad};

use super::{MESHED, pod};

const MARKER: &[u8] = b"weft-real-upgrade-marker-5d02";
/// The echo server's port in web-2.
const ECHO_PORT: u16 = 9100;
/// Requests (of all kinds together) run before and after each step.
const REQUESTS_AROUND_STEPS: u64 = 100;
/// What the proxies log when a certificate request fails.
const CERTIFICATE_FAILURE: &str = "could not obtain a certificate";

struct Load<'a> {
    cluster: &'a RealCluster,
    client: String,
    to: SocketAddr,
}

impl Load<'_> {
    fn start(&self) -> SteadyLoad {
        let netns = self.cluster.pod_netns(MESHED, &self.client).unwrap();
        let load = SteadyLoad::start_in(netns, self.to, MARKER, LoadShape::default()).unwrap();
        load.run_for_requests(REQUESTS_AROUND_STEPS);
        load
    }

    /// A new connection and a round trip on it.
    fn round_trip(&self) -> anyhow::Result<()> {
        let netns = self.cluster.pod_netns(MESHED, &self.client)?;
        let mut stream = real_cluster::connect_in(&netns, self.to)?;
        let echoed = weft_testbed::echo_round_trip(&mut stream, MARKER)?;
        anyhow::ensure!(echoed == MARKER, "the echo came back different");
        Ok(())
    }
}

fn stop(load: SteadyLoad) -> LoadReport {
    load.run_for_requests(REQUESTS_AROUND_STEPS);
    load.stop()
}

/// Waits until every node has a ready proxy pod on `image` (the old ones
/// may still drain beside them).
fn wait_until_serving(cluster: &RealCluster, image: &str) {
    cluster
        .wait_until(
            &format!("a ready proxy pod on {image} on every node"),
            || {
                let mut nodes: Vec<String> = cluster
                    .proxy_pods()?
                    .into_iter()
                    .filter(|pod| pod.ready && !pod.terminating && pod.image == image)
                    .map(|pod| pod.node)
                    .collect();
                nodes.sort();
                nodes.dedup();
                Ok(nodes.len() == cluster.node_names().len())
            },
        )
        .unwrap();
}

/// Waits until every node runs exactly one proxy pod, on `image`: the old
/// ones, once their connections ended, have exited.
fn wait_until_only(cluster: &RealCluster, image: &str) {
    let nodes = cluster.node_names().len();
    cluster
        .wait_until(&format!("one proxy pod per node, on {image}"), || {
            let pods = cluster.proxy_pods()?;
            Ok(pods.len() == nodes
                && pods
                    .iter()
                    .all(|pod| pod.image == image && !pod.terminating))
        })
        .unwrap();
}

pub(super) fn upgrades_drop_nothing(cluster: &RealCluster) {
    let server = pod(cluster, MESHED, "web-2");
    let _echo = cluster
        .start_echo_server_in_pod(MESHED, &server.name, ECHO_PORT)
        .unwrap();
    let load = Load {
        cluster,
        client: pod(cluster, MESHED, "client").name,
        to: SocketAddr::from((server.ip, ECHO_PORT)),
    };
    cluster
        .wait_until("the echo server reachable through the mesh", || {
            Ok(load.round_trip().is_ok())
        })
        .unwrap();
    let capture = cluster.capture_node_link("node-1").unwrap();

    new_proxy_image_rolls_out_dropping_nothing(cluster, &load);
    control_plane_restart_drops_nothing(cluster, &load);
    killing_the_old_proxy_during_a_rollout_fails_closed(cluster, &load);

    let seen = capture.finish().unwrap();
    assert!(
        !seen.contains(MARKER),
        "a request crossed node-1's link in plaintext"
    );
    let tunnel = seen
        .count(&format!("host {} and port 15008", server.ip))
        .unwrap();
    assert!(tunnel > 0, "the load did not go through the tunnel");
}

/// `kubectl set image` of the proxy DaemonSet: each node's new proxy takes
/// over, the old one drains. Nothing fails; the old pods exit once the
/// load's connections, which they carried to the end, closed.
fn new_proxy_image_rolls_out_dropping_nothing(cluster: &RealCluster, load: &Load<'_>) {
    let old_pods = cluster.proxy_pods().unwrap();
    let running = load.start();
    let image = cluster.start_proxy_rollout("next").unwrap();
    // Not `rollout status`: a DaemonSet counts a node's oldest pod, and the
    // old proxy pods drain until the load's connections end.
    wait_until_serving(cluster, &image);
    let report = stop(running);
    report
        .check_nothing_failed()
        .context("rolling out a new proxy image")
        .unwrap();
    wait_until_only(cluster, &image);
    cluster.wait_for_proxies().unwrap();
    let now = cluster.proxy_pods().unwrap();
    assert!(
        old_pods
            .iter()
            .all(|old| now.iter().all(|pod| pod.name != old.name)),
        "an old proxy pod is still there: {now:?}"
    );
}

/// `kubectl rollout restart` of the control plane while a new identity
/// (web-3's) needs its first certificate: no request fails, no proxy
/// fails to obtain a certificate, and web-3 is meshed.
fn control_plane_restart_drops_nothing(cluster: &RealCluster, load: &Load<'_>) {
    let failures_before = cluster
        .proxy_logs()
        .unwrap()
        .matches(CERTIFICATE_FAILURE)
        .count();
    let running = load.start();
    cluster
        .kubectl(&[
            "-n",
            real_cluster::WEFT_NAMESPACE,
            "rollout",
            "restart",
            "deployment/weft-control-plane",
        ])
        .unwrap();
    cluster
        .apply(&real_cluster::app(MESHED, "web-3", 1, Some("node-2")))
        .unwrap();
    cluster
        .kubectl(&[
            "-n",
            real_cluster::WEFT_NAMESPACE,
            "rollout",
            "status",
            "deployment/weft-control-plane",
            &format!("--timeout={}s", real_cluster::READY_TIMEOUT.as_secs()),
        ])
        .unwrap();
    cluster.rollout_status(MESHED, "web-3").unwrap();
    let web_3 = pod(cluster, MESHED, "web-3");
    let web_1 = pod(cluster, MESHED, "web-1");
    let body = cluster
        .wait_for_http(
            &web_3,
            SocketAddr::from((web_1.ip, real_cluster::APP_PORT)),
            "/",
        )
        .unwrap();
    assert_eq!(body.trim(), web_1.name);
    let report = stop(running);
    report
        .check_nothing_failed()
        .context("restarting the control plane")
        .unwrap();
    let logs = cluster.proxy_logs().unwrap();
    assert_eq!(
        logs.matches(CERTIFICATE_FAILURE).count(),
        failures_before,
        "a certificate request failed during the restart:\n{}",
        logs.lines()
            .filter(|line| line.contains(CERTIFICATE_FAILURE))
            .collect::<Vec<_>>()
            .join("\n")
    );
    cluster
        .kubectl(&[
            "-n",
            MESHED,
            "delete",
            "deployment/web-3",
            "service/web-3",
            "serviceaccount/web-3",
        ])
        .unwrap();
}

/// A rollout during which the old proxy on the first node to roll is
/// killed (SIGKILL) as soon as the new one has started beside it, in the
/// middle of the hand-over: the connections it carried fail, nothing goes
/// out in plaintext (checked by the caller), and once the rollout is done
/// new connections work.
fn killing_the_old_proxy_during_a_rollout_fails_closed(cluster: &RealCluster, load: &Load<'_>) {
    let running = load.start();
    let image = cluster.start_proxy_rollout("next-2").unwrap();
    // Polled often: a hand-over takes a fraction of a second.
    let deadline = Instant::now() + real_cluster::READY_TIMEOUT;
    let killed = loop {
        let beside = cluster.node_names().into_iter().find_map(|node| {
            let processes = cluster.proxy_processes_on(&node).ok()?;
            (processes.len() > 1).then(|| (node, processes[0]))
        });
        if let Some((node, old)) = beside {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(old).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            break Some((node, old));
        }
        assert!(
            Instant::now() < deadline,
            "no new proxy started beside an old one"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let (node, pid) = killed.unwrap();
    eprintln!("killed the old proxy {pid} on {node} during its hand-over");
    wait_until_serving(cluster, &image);
    wait_until_only_after_stop(cluster, &image, running);
    load.round_trip().unwrap();
}

/// Stops the load (the old proxy pods hold its connections until then),
/// then waits for them to go.
fn wait_until_only_after_stop(cluster: &RealCluster, image: &str, running: SteadyLoad) {
    let report = running.stop();
    // The connections of the killed proxy failed; the rest ran.
    assert!(
        report
            .of(LoadKind::NewConnection)
            .any(|sample| sample.error.is_none()),
        "no new connection worked during the rollout"
    );
    wait_until_only(cluster, image);
    cluster.wait_for_proxies().unwrap();
}
