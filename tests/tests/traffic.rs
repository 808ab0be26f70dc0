//! End to end on the testbed: TrafficPolicy objects, written as manifests,
//! enforced by the source node's proxy on connections to a Service's VIP.
//! Every test asserts outcomes (which backend got the connection, whether it
//! worked, what the proxy counted), never how long something took.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use weft_testbed::{
    CONFIG_WAIT, EchoServer, PodSpec, ServiceSpec, Target, Testbed, WeftMesh, wait_until,
};

/// node-1: client-1; node-2: db-1 and db-2 (app=db, behind Service db),
/// db-dead (app=db too, but nothing listens in it) and v2-1 (app=db-v2,
/// behind Service db-v2). All meshed, namespace shop.
fn cluster(with_dead: bool) -> Testbed {
    let pod = |node, name, app| PodSpec {
        node,
        namespace: "shop",
        name,
        service_account: "default",
        labels: app,
        meshed: true,
        probe_ports: &[],
    };
    let service = |name, app| ServiceSpec {
        namespace: "shop",
        name,
        port: 5432,
        target_port: 5432,
        selector: app,
    };
    let mut builder = Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(pod("node-1", "client-1", &[("app", "client")]))
        .pod(pod("node-2", "db-1", &[("app", "db")]))
        .pod(pod("node-2", "db-2", &[("app", "db")]))
        .pod(pod("node-2", "v2-1", &[("app", "db-v2")]))
        .service(service("db", &[("app", "db")]))
        .service(service("db-again", &[("app", "db")]))
        .service(service("db-v2", &[("app", "db-v2")]));
    if with_dead {
        builder = builder.pod(pod("node-2", "db-dead", &[("app", "db")]));
    }
    builder.build().unwrap()
}

struct Bed {
    testbed: Testbed,
    mesh: WeftMesh,
    servers: Vec<(&'static str, EchoServer)>,
}

impl Bed {
    /// Starts the mesh with echo servers on db-1, db-2 and v2-1 (not on
    /// db-dead).
    fn start(with_dead: bool) -> Bed {
        let testbed = cluster(with_dead);
        let servers = ["db-1", "db-2", "v2-1"]
            .into_iter()
            .map(|pod| {
                let server = testbed.start_echo_server(Target::Pod(pod), 5432).unwrap();
                (pod, server)
            })
            .collect();
        let mesh = WeftMesh::start(&testbed).unwrap();
        mesh.wait_for_data_plane(&testbed).unwrap();
        Bed {
            testbed,
            mesh,
            servers,
        }
    }

    fn vip(&self, service: &str) -> SocketAddr {
        (self.testbed.service_vip("shop", service).unwrap(), 5432).into()
    }

    /// Opens a connection from client-1 to `service` and checks one echo
    /// round trip; `None` if the connection does not carry it.
    fn open(&self, service: &str) -> Option<TcpStream> {
        let mut stream = self
            .testbed
            .connect(Target::Pod("client-1"), self.vip(service))
            .ok()?;
        stream.write_all(b"ping").ok()?;
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).ok()?;
        (&echoed == b"ping").then_some(stream)
    }

    /// Connections each echo server has accepted so far.
    fn accepted(&self, pod: &str) -> usize {
        self.servers
            .iter()
            .find(|(name, _)| *name == pod)
            .map_or(0, |(_, server)| server.peers().len())
    }

    fn metric(&self, needle: &str) -> u64 {
        let text = self.mesh.proxy_metrics(&self.testbed, "node-1").unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn failures(&self, reason: &str) -> u64 {
        self.metric(&format!("reason=\"{reason}\""))
    }

    /// Writes a TrafficPolicy for `service` and waits until node-1's proxy
    /// holds it (`check` on the dumped policy).
    fn apply(
        &self,
        file: &str,
        service: &str,
        spec: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let yaml = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {file}, namespace: shop}}\nspec:\n  service: {service}\n{spec}"
        );
        self.mesh
            .write_manifest(&format!("{file}.yaml"), &yaml)
            .unwrap();
        self.mesh
            .wait_for_dump(&self.testbed, "node-1", "the traffic policy", |dump| {
                dump["services"].as_array().is_some_and(|services| {
                    services.iter().any(|s| {
                        s["name"] == service
                            && s["traffic"]["policy"] == format!("shop/{file}")
                            && check(&s["traffic"])
                    })
                })
            })
            .unwrap();
    }
}

#[test]
fn round_robin_least_connections_and_power_of_two_choices_spread_connections() {
    let bed = Bed::start(false);
    // No policy: round robin, one connection at a time.
    let before = (bed.accepted("db-1"), bed.accepted("db-2"));
    for _ in 0..10 {
        drop(bed.open("db").unwrap());
    }
    assert_eq!(
        (
            bed.accepted("db-1") - before.0,
            bed.accepted("db-2") - before.1
        ),
        (5, 5)
    );

    // Least connections: held connections spread evenly.
    bed.apply(
        "lc",
        "db",
        "  loadBalancing: {mode: LEAST_CONNECTIONS}\n",
        |t| t["mode"] == "LEAST_CONNECTIONS",
    );
    let before = (bed.accepted("db-1"), bed.accepted("db-2"));
    let held: Vec<_> = (0..6).map(|_| bed.open("db").unwrap()).collect();
    assert_eq!(
        (
            bed.accepted("db-1") - before.0,
            bed.accepted("db-2") - before.1
        ),
        (3, 3)
    );
    drop(held);

    // Power of two choices: an endpoint's cost grows with its open
    // connections, so held connections reach both.
    bed.apply(
        "lc",
        "db",
        "  loadBalancing: {mode: POWER_OF_TWO_CHOICES}\n",
        |t| t["mode"] == "POWER_OF_TWO_CHOICES",
    );
    let before = (bed.accepted("db-1"), bed.accepted("db-2"));
    let held: Vec<_> = (0..16).map(|_| bed.open("db").unwrap()).collect();
    let got = (
        bed.accepted("db-1") - before.0,
        bed.accepted("db-2") - before.1,
    );
    assert_eq!(got.0 + got.1, 16);
    assert!(got.0 >= 1 && got.1 >= 1, "both endpoints used: {got:?}");
    drop(held);
}

#[test]
fn a_failed_connect_is_retried_on_another_endpoint_and_a_silent_one_times_out() {
    let bed = Bed::start(true);
    // db-dead refuses (nothing listens): without retries, round robin sends
    // every third connection there and it fails.
    let worked = (0..6).filter(|_| bed.open("db").is_some()).count();
    assert_eq!(worked, 4);
    assert!(bed.failures("connect_refused") >= 2);

    bed.apply("retry", "db", "  retries: {attempts: 1}\n", |t| {
        t["retry_attempts"] == 1
    });
    for i in 0..9 {
        assert!(bed.open("db").is_some(), "connection {i} retried");
    }
    assert!(bed.failures("connect_refused") >= 4, "db-dead still tried");

    // An endpoint that never answers (an address on the node network that
    // no host has): the connect timeout gives up on it and the retry goes
    // elsewhere.
    let blackhole = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-v2-blackhole
  namespace: shop
  labels: {kubernetes.io/service-name: db-v2}
addressType: IPv4
endpoints:
- addresses: [172.30.0.200]
  conditions: {ready: true}
ports:
- {name: '', protocol: TCP, port: 5432}
";
    bed.mesh
        .write_manifest("blackhole.yaml", blackhole)
        .unwrap();
    bed.apply(
        "timeout",
        "db-v2",
        "  connectTimeout: 200ms\n  retries: {attempts: 1}\n",
        |t| t["connect_timeout"]["nanos"] == 200_000_000,
    );
    bed.mesh
        .wait_for_dump(&bed.testbed, "node-1", "the blackhole endpoint", |dump| {
            dump["services"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["name"] == "db-v2" && s["endpoints"].as_array().is_some_and(|e| e.len() == 2)
                })
            })
        })
        .unwrap();
    // Round robin alternates: every other connection tries it first.
    for i in 0..4 {
        assert!(bed.open("db-v2").is_some(), "connection {i}");
    }
    assert!(
        bed.failures("connect_timeout") >= 1,
        "the silent endpoint timed out"
    );
}

#[test]
fn max_connections_refuses_the_one_too_many() {
    let bed = Bed::start(false);
    bed.apply("limit", "db", "  maxConnections: 2\n", |t| {
        t["max_connections"] == 2
    });
    let first = bed.open("db").unwrap();
    let _second = bed.open("db").unwrap();
    assert!(bed.open("db").is_none(), "the third is refused");
    assert!(bed.failures("max_connections") >= 1);
    // Other Services are not limited.
    assert!(bed.open("db-v2").is_some());
    // Closing one frees a place.
    drop(first);
    wait_until(CONFIG_WAIT, || Ok(bed.open("db").is_some())).unwrap();
}

#[test]
fn a_failing_endpoint_is_ejected_and_comes_back() {
    let bed = Bed::start(true);
    // On db a long ejection: once ejected, db-dead gets no more attempts.
    bed.apply(
        "eject",
        "db",
        "  retries: {attempts: 2}\n  outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 1h, maxEjectionTime: 1h}\n",
        |t| t["outlier"]["consecutive_failures"] == 2,
    );
    let ejected = "weft_outlier_ejections_total{service=\"shop/db\"}";
    wait_until(CONFIG_WAIT, || {
        assert!(bed.open("db").is_some());
        Ok(bed.metric(ejected) >= 1)
    })
    .unwrap();
    let refused = bed.failures("connect_refused");
    for _ in 0..9 {
        assert!(bed.open("db").is_some());
    }
    assert_eq!(bed.failures("connect_refused"), refused, "db-dead is out");
    assert_eq!(bed.metric(ejected), 1);

    // On db-again a short one: after it db-dead is tried again, and once
    // something listens there it serves.
    bed.apply(
        "eject-briefly",
        "db-again",
        "  retries: {attempts: 2}\n  outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 1s, maxEjectionTime: 2s}\n",
        |t| t["outlier"]["consecutive_failures"] == 1,
    );
    let ejected_again = "weft_outlier_ejections_total{service=\"shop/db-again\"}";
    wait_until(CONFIG_WAIT, || {
        assert!(bed.open("db-again").is_some());
        Ok(bed.metric(ejected_again) >= 2)
    })
    .unwrap();
    let revived = bed
        .testbed
        .start_echo_server(Target::Pod("db-dead"), 5432)
        .unwrap();
    wait_until(CONFIG_WAIT, || {
        assert!(bed.open("db-again").is_some());
        Ok(!revived.peers().is_empty())
    })
    .unwrap();
}

#[test]
fn split_sends_connections_by_weight() {
    let bed = Bed::start(false);
    bed.apply(
        "split",
        "db",
        "  split:\n  - {service: db, weight: 80}\n  - {service: db-v2, weight: 20}\n  - {service: not-there, weight: 50}\n",
        |t| t["split"].as_array().is_some_and(|s| s.len() == 3),
    );
    let before = bed.accepted("v2-1");
    let total = 200;
    for _ in 0..total {
        drop(bed.open("db").unwrap());
    }
    let to_v2 = bed.accepted("v2-1") - before;
    let to_db = bed.accepted("db-1") + bed.accepted("db-2");
    assert!(to_db + to_v2 >= total);
    assert!(
        (10..=80).contains(&to_v2),
        "about 20% of {total} to db-v2 (the absent target counts as 0): {to_v2}"
    );
}

#[test]
fn an_idle_connection_is_closed() {
    let bed = Bed::start(false);
    bed.apply("idle", "db", "  idleTimeout: 1s\n", |t| {
        t["idle_timeout"]["secs"] == 1
    });
    let mut stream = bed.open("db").unwrap();
    // Nothing moves: the proxy closes it (well before the read timeout).
    let mut buffer = [0u8; 4];
    let read = stream.read(&mut buffer);
    assert!(matches!(read, Ok(0)), "closed, not timed out: {read:?}");
    assert!(bed.failures("idle_timeout") >= 1);
    // A Service without the policy keeps its idle connections.
    let mut other = bed.open("db-v2").unwrap();
    other.write_all(b"ping").unwrap();
}
