//! The testbed itself, checked the way the end-to-end tests will use it. These tests
//! create network namespaces, so they need root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use weft_testbed::{MESH_LABEL, NETNS_PREFIX, PodSpec, ServiceSpec, Target, Testbed};

/// Two nodes with two pods each: `client` and `other-client` on node-1, `server` and
/// `neighbour` on node-2. Only `server` is selected by the `echo` service.
fn two_by_two() -> Result<Testbed> {
    Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(PodSpec {
            node: "node-1",
            name: "client",
            service_account: "client",
            labels: &[("app", "client")],
            ..PodSpec::default()
        })
        .pod(PodSpec {
            node: "node-1",
            name: "other-client",
            meshed: false,
            ..PodSpec::default()
        })
        .pod(PodSpec {
            node: "node-2",
            name: "server",
            service_account: "server",
            labels: &[("app", "echo")],
            ..PodSpec::default()
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "other",
            name: "neighbour",
            labels: &[("app", "echo")],
            ..PodSpec::default()
        })
        .service(ServiceSpec {
            namespace: "default",
            name: "echo",
            port: 80,
            target_port: 7000,
            selector: &[("app", "echo")],
        })
        .build()
}

/// Sends `payload` from `from` to `to` and returns what came back.
fn round_trip(
    testbed: &Testbed,
    from: Target<'_>,
    to: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let mut stream = testbed.connect(from, to)?;
    stream.write_all(payload)?;
    let mut echoed = vec![0u8; payload.len()];
    stream
        .read_exact(&mut echoed)
        .with_context(|| format!("reading the echo from {to}"))?;
    Ok(echoed)
}

fn live_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Whether `pid` runs; a zombie (killed, not yet reaped by its parent) does not.
fn process_exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn pods_on_different_nodes_reach_each_other_by_pod_ip() -> Result<()> {
    let testbed = two_by_two()?;
    let server = testbed.start_echo_server(Target::Pod("server"), 7000)?;
    let server_addr = SocketAddr::new(testbed.pod_ip("server")?.into(), 7000);

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = round_trip(&testbed, Target::Pod("client"), server_addr, &payload)?;

    assert_eq!(echoed, payload);
    let peers = server.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip(), IpAddr::from(testbed.pod_ip("client")?));
    Ok(())
}

#[test]
fn pods_on_the_same_node_reach_each_other_and_nodes_reach_nodes() -> Result<()> {
    let testbed = two_by_two()?;
    let server = testbed.start_echo_server(Target::Pod("client"), 7000)?;
    let addr = SocketAddr::new(testbed.pod_ip("client")?.into(), 7000);
    assert_eq!(
        round_trip(&testbed, Target::Pod("other-client"), addr, b"hello")?,
        b"hello"
    );
    assert_eq!(
        server.peers()[0].ip(),
        IpAddr::from(testbed.pod_ip("other-client")?)
    );

    // A node proxy on node-2 is reachable from node-1 on the node network, and from a
    // pod on node-1 through its node.
    let _proxy = testbed.start_echo_server(Target::Node("node-2"), 15008)?;
    let addr = SocketAddr::new(testbed.node_ip("node-2")?.into(), 15008);
    assert_eq!(
        round_trip(&testbed, Target::Node("node-1"), addr, b"n2n")?,
        b"n2n"
    );
    assert_eq!(
        round_trip(&testbed, Target::Pod("client"), addr, b"p2n")?,
        b"p2n"
    );
    Ok(())
}

#[test]
fn addresses_follow_the_documented_scheme() -> Result<()> {
    let testbed = two_by_two()?;
    assert_eq!(testbed.node_ip("node-1")?.to_string(), "172.30.0.2");
    assert_eq!(testbed.node_ip("node-2")?.to_string(), "172.30.0.3");
    assert_eq!(testbed.pod_cidr("node-2")?.to_string(), "10.244.2.0/24");
    assert_eq!(testbed.pod_ip("client")?.to_string(), "10.244.1.2");
    assert_eq!(testbed.pod_ip("neighbour")?.to_string(), "10.244.2.3");
    assert_eq!(
        testbed.service_vip("default", "echo")?.to_string(),
        "10.96.1.1"
    );
    assert_eq!(testbed.node_of("neighbour")?, "node-2");
    assert!(testbed.pod_ip("nobody").is_err());

    // A spawned process runs in its pod's namespace, and its output is captured.
    let mut ip = Command::new("ip");
    ip.args(["-o", "-4", "addr", "show", "dev", "eth0"]);
    let process = testbed.spawn(Target::Pod("server"), ip)?;
    process.wait_for_output("10.244.2.2/32", Duration::from_secs(10))?;
    assert!(process.wait(Duration::from_secs(10))?.success());

    let mut fails = Command::new("sh");
    fails.args(["-c", "echo oops >&2; exit 3"]);
    let process = testbed.spawn(Target::Node("node-1"), fails)?;
    assert_eq!(process.wait(Duration::from_secs(10))?.code(), Some(3));
    assert_eq!(process.stderr()?, "oops\n");
    Ok(())
}

#[test]
fn dropping_the_testbed_deletes_namespaces_and_stops_processes() -> Result<()> {
    let testbed = two_by_two()?;
    let names = testbed.netns_names().to_vec();
    assert_eq!(names.len(), 1 + 2 + 4);
    assert!(names.iter().all(|n| n.starts_with(NETNS_PREFIX)));
    let live = live_namespaces()?;
    assert!(names.iter().all(|n| live.contains(n)));

    let mut ignores_term = Command::new("sh");
    ignores_term.args(["-c", "trap '' TERM; echo started; sleep 600 & wait"]);
    let stubborn = testbed.spawn(Target::Pod("server"), ignores_term)?;
    stubborn.wait_for_output("started", Duration::from_secs(10))?;
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let polite = testbed.spawn(Target::Node("node-1"), sleep)?;
    let pids = [stubborn.pid(), polite.pid()];
    let dir = testbed.dir().to_owned();
    assert!(dir.exists());

    // The handles outlive the testbed: the testbed stops the processes anyway.
    drop(testbed);

    let live = live_namespaces()?;
    assert!(
        names.iter().all(|n| !live.contains(n)),
        "left behind: {live:?}"
    );
    assert!(pids.iter().all(|pid| !process_exists(*pid)));
    assert!(!stubborn.is_running() && !polite.is_running());
    assert!(!dir.exists());
    Ok(())
}

#[test]
fn a_panicking_test_leaves_no_namespaces_behind() -> Result<()> {
    let mut names = Vec::new();
    let mut pid = 0;
    let mut dir = std::path::PathBuf::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let testbed = two_by_two().expect("building the testbed");
        names = testbed.netns_names().to_vec();
        dir = testbed.dir().to_owned();
        let mut sleep = Command::new("sleep");
        sleep.arg("600");
        let process = testbed
            .spawn(Target::Pod("client"), sleep)
            .expect("spawning");
        pid = process.pid();
        std::mem::forget(process); // only the testbed is left to stop it
        panic!("the scenario failed");
    }));

    assert!(outcome.is_err());
    assert_eq!(names.len(), 7);
    let live = live_namespaces()?;
    assert!(
        names.iter().all(|n| !live.contains(n)),
        "left behind: {live:?}"
    );
    assert!(!process_exists(pid));
    // The process output is kept for a look at what went wrong.
    assert!(dir.exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn testbeds_built_at_the_same_time_do_not_collide() -> Result<()> {
    let run = || -> Result<Vec<String>> {
        let testbed = two_by_two()?;
        let _server = testbed.start_echo_server(Target::Pod("server"), 7000)?;
        let addr = SocketAddr::new(testbed.pod_ip("server")?.into(), 7000);
        for _ in 0..10 {
            assert_eq!(
                round_trip(&testbed, Target::Pod("client"), addr, b"ping")?,
                b"ping"
            );
        }
        Ok(testbed.netns_names().to_vec())
    };
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(run);
        let b = scope.spawn(run);
        (a.join(), b.join())
    });
    let (a, b) = (a.expect("thread a")?, b.expect("thread b")?);
    assert!(a.iter().all(|name| !b.contains(name)));
    Ok(())
}

#[test]
fn namespaces_of_dead_runs_are_swept_by_the_next_build() -> Result<()> {
    // A shell stands in for a run that was killed: it makes a namespace named after
    // its own pid, leaves a process running in there, and exits.
    let script = r#"
        ns="wftNNx0-fabric"
        ip netns add "$ns" || exit 1
        ip netns exec "$ns" sleep 600 </dev/null >/dev/null 2>&1 &
        orphan=$!
        tries=0
        until ip netns pids "$ns" | grep -qx "$orphan"; do
            tries=$((tries + 1)); [ "$tries" -gt 1000 ] && exit 1; sleep 0.01
        done
        echo "$ns $orphan"
    "#
    .replace("wftNN", &format!("{NETNS_PREFIX}$$"));
    let out = Command::new("sh").args(["-c", &script]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout)?;
    let (stale, orphan) = out.trim().split_once(' ').context("script output")?;
    let orphan: u32 = orphan.parse()?;

    let _testbed = Testbed::builder().node("node-1").build()?;

    assert!(!live_namespaces()?.iter().any(|n| n == stale));
    // A concurrent test's build may be the one sweeping it, so allow a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while process_exists(orphan) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {orphan} survived the sweep"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[test]
fn manifests_parse_back_as_the_cluster_that_was_built() -> Result<()> {
    let testbed = two_by_two()?;
    let yaml = testbed.manifests()?;
    let objects: Vec<Value> = serde_saphyr::from_multiple(&yaml).context("parsing manifests")?;

    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for object in &objects {
        *kinds
            .entry(object["kind"].as_str().unwrap_or("?"))
            .or_default() += 1;
    }
    let expected = [
        ("Namespace", 2),
        ("ServiceAccount", 4),
        ("Pod", 4),
        ("Service", 1),
        ("EndpointSlice", 1),
    ];
    assert_eq!(kinds, BTreeMap::from(expected), "{yaml}");

    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in:\n{yaml}"))
    };
    assert_eq!(
        find("Namespace", "default")["metadata"]["labels"][MESH_LABEL],
        "enabled"
    );
    assert_eq!(
        find("Pod", "other-client")["metadata"]["labels"][MESH_LABEL],
        "disabled"
    );

    let pod = find("Pod", "server");
    assert_eq!(pod["spec"]["nodeName"], "node-2");
    assert_eq!(pod["spec"]["serviceAccountName"], "server");
    assert_eq!(pod["metadata"]["labels"]["app"], "echo");
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(
        pod["status"]["podIP"],
        testbed.pod_ip("server")?.to_string()
    );
    assert_eq!(
        pod["status"]["podIPs"][0]["ip"],
        testbed.pod_ip("server")?.to_string()
    );
    assert_eq!(pod["status"]["conditions"][0]["status"], "True");

    let service = find("Service", "echo");
    assert_eq!(service["spec"]["clusterIP"], "10.96.1.1");
    assert_eq!(service["spec"]["clusterIPs"][0], "10.96.1.1");
    assert_eq!(service["spec"]["ports"][0]["port"], 80);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 7000);
    assert_eq!(service["spec"]["selector"]["app"], "echo");

    // `neighbour` carries app=echo too, but in another namespace: not an endpoint.
    let slice = find("EndpointSlice", "echo-testbed");
    assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "echo"
    );
    let endpoints = slice["endpoints"].as_array().context("endpoints")?;
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["addresses"][0], "10.244.2.2");
    assert_eq!(endpoints[0]["conditions"]["ready"], true);
    assert_eq!(endpoints[0]["nodeName"], "node-2");
    assert_eq!(endpoints[0]["targetRef"]["kind"], "Pod");
    assert_eq!(endpoints[0]["targetRef"]["name"], "server");
    assert_eq!(slice["ports"][0]["port"], 7000);

    let file = testbed.write_manifests(&testbed.dir().join("manifests"))?;
    assert_eq!(std::fs::read_to_string(file)?, yaml);
    Ok(())
}
