//! The node's capture rules on the testbed (run as root): real nftables and
//! policy routing in node-1's namespace, real connections from real pods.
//! On node-1 a meshed pod `client` and an unmeshed pod `plain`; on node-2 a
//! pod `server` with an echo server on port 8080. Every rule is installed,
//! inspected and removed inside node-1's namespace, never on the host.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::capture::{CaptureConfig, CaptureError, NodeCapture};
use weft_proxy::sockets::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK, connect_from,
    original_destination, transparent_listener,
};
use weft_testbed::{PodSpec, Target, Testbed};

/// A bound on every wait, not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(30);
const ECHO_PORT: u16 = 8080;
const NODE_1: Target<'static> = Target::Node("node-1");

struct Cluster {
    testbed: Testbed,
    client: IpAddr,
    plain: IpAddr,
    server: IpAddr,
}

impl Cluster {
    fn build() -> Result<Cluster> {
        let testbed = Testbed::builder()
            .node("node-1")
            .node("node-2")
            .pod(PodSpec {
                node: "node-1",
                name: "client",
                ..PodSpec::default()
            })
            .pod(PodSpec {
                node: "node-1",
                name: "plain",
                meshed: false,
                ..PodSpec::default()
            })
            .pod(PodSpec {
                node: "node-2",
                name: "server",
                ..PodSpec::default()
            })
            .build()?;
        Ok(Cluster {
            client: testbed.pod_ip("client")?.into(),
            plain: testbed.pod_ip("plain")?.into(),
            server: testbed.pod_ip("server")?.into(),
            testbed,
        })
    }

    fn echo_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server, ECHO_PORT)
    }

    /// Runs the async test body on a runtime inside node-1's namespace, as
    /// the proxy runs: its sockets and commands all act there.
    fn on_node_1<T: Send>(&self, body: impl AsyncFnOnce() -> Result<T> + Send) -> Result<T> {
        self.testbed.run_in(NODE_1, || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("building a runtime on node-1")?
                .block_on(body())
        })?
    }

    /// Connects the pod to the echo server's address.
    fn connect(&self, pod: &str) -> Result<std::net::TcpStream> {
        self.testbed.connect(Target::Pod(pod), self.echo_addr())
    }

    /// Whether a round trip from the pod to the echo server works.
    fn ping(&self, pod: &str) -> Result<()> {
        round_trip(self.connect(pod)?)
    }

    /// What a command prints in node-1's namespace.
    fn on_node_1_output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .testbed
            .run_in(NODE_1, || Command::new(program).args(args).output())?
            .with_context(|| format!("running {program}"))?;
        ensure!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The three listeners the capture rules steer to.
struct Listeners {
    outbound: TcpListener,
    inbound_plaintext: TcpListener,
    hbone: TcpListener,
}

impl Listeners {
    fn bind() -> Result<Listeners> {
        let bind = |port| transparent_listener((Ipv4Addr::LOCALHOST, port).into());
        Ok(Listeners {
            outbound: bind(OUTBOUND_PORT)?,
            inbound_plaintext: bind(INBOUND_PLAINTEXT_PORT)?,
            hbone: bind(HBONE_PORT)?,
        })
    }
}

fn install_for(pods: &[IpAddr]) -> Result<NodeCapture> {
    let mut capture = NodeCapture::install(CaptureConfig::default())?;
    capture.set_meshed_pods(&pods.iter().copied().collect())?;
    Ok(capture)
}

/// The next connection a listener accepts: (stream, original destination,
/// peer).
async fn captured(listener: &TcpListener) -> Result<(TcpStream, SocketAddr, SocketAddr)> {
    let (stream, peer) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .context("waiting for a captured connection")??;
    let destination = original_destination(&stream)?;
    Ok((stream, destination, peer))
}

/// Writes a message and expects it echoed back.
fn round_trip(mut stream: std::net::TcpStream) -> Result<()> {
    stream.write_all(b"ping")?;
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed)?;
    ensure!(&echoed == b"ping", "echoed {echoed:?}");
    Ok(())
}

/// Connects from `source` (a pod's IP) to `destination`, as the proxy does.
async fn dial_from(source: IpAddr, destination: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(
        DEADLINE,
        connect_from(Some(source), destination, PROXY_MARK),
    )
    .await?
}

/// The same connection as a blocking std stream, for [`round_trip`].
fn blocking(stream: TcpStream) -> Result<std::net::TcpStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    Ok(stream)
}

/// Whether bytes flow both ways between the proxy's side of a captured
/// connection and the pod that opened it: the connection really is the
/// pod's.
async fn exchange(proxy_side: &mut TcpStream, pod_side: &mut std::net::TcpStream) -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    proxy_side.write_all(b"from the proxy").await?;
    let mut got = [0u8; 14];
    pod_side.read_exact(&mut got)?;
    ensure!(&got == b"from the proxy", "the pod got {got:?}");
    pod_side.write_all(b"from the pod")?;
    let mut got = [0u8; 12];
    tokio::time::timeout(DEADLINE, proxy_side.read_exact(&mut got))
        .await
        .context("waiting for the pod's bytes")??;
    ensure!(&got == b"from the pod", "the proxy got {got:?}");
    Ok(())
}

#[test]
fn meshed_pod_traffic_lands_on_the_proxy_and_unmeshed_traffic_does_not() -> Result<()> {
    let cluster = Cluster::build()?;
    let echo = cluster
        .testbed
        .start_echo_server(Target::Pod("server"), ECHO_PORT)?;
    let testbed = &cluster.testbed;
    let node_2_ip: IpAddr = testbed.node_ip("node-2")?.into();

    cluster.on_node_1(async || {
        let capture = install_for(&[cluster.client])?;
        let listeners = Listeners::bind()?;

        // Outbound from the meshed pod: steered to 15001, addressed as dialled.
        let mut pod_side = cluster.connect("client")?;
        let (mut stream, destination, peer) = captured(&listeners.outbound).await?;
        assert_eq!(destination, cluster.echo_addr());
        assert_eq!(peer.ip(), cluster.client);
        exchange(&mut stream, &mut pod_side).await?;

        // The unmeshed pod reaches the real server.
        cluster.ping("plain")?;
        assert!(echo.peers().iter().any(|p| p.ip() == cluster.plain));

        // HBONE from the other node to the meshed pod: steered to 15008.
        let pod_ip_hbone = SocketAddr::new(cluster.client, HBONE_PORT);
        let mut remote = testbed.connect(Target::Node("node-2"), pod_ip_hbone)?;
        let (mut stream, destination, peer) = captured(&listeners.hbone).await?;
        assert_eq!(destination, pod_ip_hbone);
        assert_eq!(peer.ip(), node_2_ip);
        exchange(&mut stream, &mut remote).await?;

        // Any other port of the meshed pod: steered to 15006.
        let app_port = SocketAddr::new(cluster.client, 9090);
        let mut remote = testbed.connect(Target::Pod("server"), app_port)?;
        let (mut stream, destination, peer) = captured(&listeners.inbound_plaintext).await?;
        assert_eq!(destination, app_port);
        assert_eq!(peer.ip(), cluster.server);
        exchange(&mut stream, &mut remote).await?;

        capture.remove()?;
        Ok(())
    })?;
    // Only the unmeshed pod's connection ever reached the server.
    let peers: Vec<IpAddr> = echo.peers().iter().map(SocketAddr::ip).collect();
    assert_eq!(peers, [cluster.plain]);
    Ok(())
}

#[test]
fn the_proxy_relays_a_captured_connection_with_the_pods_ip() -> Result<()> {
    let cluster = Cluster::build()?;
    let echo = cluster
        .testbed
        .start_echo_server(Target::Pod("server"), ECHO_PORT)?;

    cluster.on_node_1(async || {
        let capture = install_for(&[cluster.client])?;
        let listeners = Listeners::bind()?;

        // The proxy dials from the meshed pod's IP: the server sees the pod,
        // and the replies, addressed to the meshed pod, come back to the
        // proxy's socket instead of being captured as inbound traffic.
        let relay = dial_from(cluster.client, cluster.echo_addr()).await?;
        assert_eq!(relay.local_addr()?.ip(), cluster.client);
        round_trip(blocking(relay)?)?;
        assert_eq!(echo.peers().len(), 1);
        assert_eq!(echo.peers()[0].ip(), cluster.client);

        // The whole path: the pod's connection captured on 15001, relayed
        // from its own IP to where it was going.
        let pod_side = cluster.connect("client")?;
        let (captured, destination, peer) = captured(&listeners.outbound).await?;
        let relay = tokio::spawn(async move {
            let mut upstream = dial_from(peer.ip(), destination).await?;
            let mut captured = captured;
            tokio::io::copy_bidirectional(&mut captured, &mut upstream).await
        });
        round_trip(pod_side)?;
        assert_eq!(echo.peers().len(), 2);
        assert_eq!(echo.peers()[1].ip(), cluster.client);
        relay.abort();

        capture.remove()?;
        Ok(())
    })
}

#[test]
fn meshing_and_unmeshing_a_pod_turns_its_capture_on_and_off() -> Result<()> {
    let cluster = Cluster::build()?;
    let echo = cluster
        .testbed
        .start_echo_server(Target::Pod("server"), ECHO_PORT)?;

    cluster.on_node_1(async || {
        // Early demux hands packets of established sockets their cached
        // route before routing looks at them; off, the capture rules alone
        // must keep a captured connection going once its pod is unmeshed.
        for demux in ["tcp_early_demux", "ip_early_demux"] {
            std::fs::write(format!("/proc/sys/net/ipv4/{demux}"), "0")?;
        }
        let mut capture = install_for(&[])?;
        let listeners = Listeners::bind()?;

        // Installed, but nobody is meshed yet: nothing is captured.
        cluster.ping("client")?;
        assert_eq!(echo.peers().len(), 1);

        capture.set_meshed_pods(&BTreeSet::from([cluster.client]))?;
        let mut pod_side = cluster.connect("client")?;
        let (mut stream, _, peer) = captured(&listeners.outbound).await?;
        assert_eq!(peer.ip(), cluster.client);
        exchange(&mut stream, &mut pod_side).await?;

        // Unmeshed: new connections go direct, the captured one carries on.
        capture.set_meshed_pods(&BTreeSet::new())?;
        cluster.ping("client")?;
        assert_eq!(echo.peers().len(), 2);
        exchange(&mut stream, &mut pod_side).await?;

        capture.set_meshed_pods(&BTreeSet::from([cluster.client, cluster.plain]))?;
        for pod in ["client", "plain"] {
            let mut pod_side = cluster.connect(pod)?;
            let (mut stream, destination, _) = captured(&listeners.outbound).await?;
            assert_eq!(destination, cluster.echo_addr());
            exchange(&mut stream, &mut pod_side).await?;
        }
        assert_eq!(echo.peers().len(), 2);
        assert_eq!(capture.meshed_pods().len(), 2);

        capture.remove()?;
        Ok(())
    })
}

#[test]
fn install_adopts_leftovers_and_remove_leaves_nothing_behind() -> Result<()> {
    let cluster = Cluster::build()?;
    let _echo = cluster
        .testbed
        .start_echo_server(Target::Pod("server"), ECHO_PORT)?;
    let fd00 = "fd00::5".parse::<IpAddr>()?;

    let capture = cluster
        .testbed
        .run_in(NODE_1, || install_for(&[cluster.client]))??;
    // A run that crashed: its rules stay behind.
    std::mem::forget(capture);
    let mut capture = cluster
        .testbed
        .run_in(NODE_1, || NodeCapture::install(CaptureConfig::default()))??;
    // The next run's install keeps the pods captured (failing closed while
    // no listener serves them) until its first update says which.
    let v4 = cluster.on_node_1_output("nft", &["list", "set", "inet", "weft", "meshed_v4"])?;
    assert!(v4.contains(&cluster.client.to_string()), "{v4}");
    let steered = cluster.connect("client");
    assert!(
        steered.and_then(round_trip).is_err(),
        "a meshed pod's connection went through with no proxy"
    );
    cluster.testbed.run_in(NODE_1, || {
        capture.set_meshed_pods(&BTreeSet::from([cluster.plain, fd00]))
    })??;
    let v4 = cluster.on_node_1_output("nft", &["list", "set", "inet", "weft", "meshed_v4"])?;
    assert!(!v4.contains(&cluster.client.to_string()), "{v4}");
    assert!(v4.contains(&cluster.plain.to_string()), "{v4}");

    let rules = cluster.on_node_1_output("ip", &["rule", "list"])?;
    assert_eq!(rules.matches("lookup 100").count(), 1, "{rules}");
    let rules = cluster.on_node_1_output("ip", &["-6", "rule", "list"])?;
    assert_eq!(rules.matches("lookup 100").count(), 1, "{rules}");
    let v6 = cluster.on_node_1_output("nft", &["list", "set", "inet", "weft", "meshed_v6"])?;
    assert!(v6.contains("fd00::5"), "{v6}");

    // From any other namespace the capture refuses to act.
    let elsewhere = cluster.testbed.run_in(Target::Node("node-2"), || {
        capture.set_meshed_pods(&BTreeSet::new())
    })?;
    assert!(
        matches!(elsewhere, Err(CaptureError::WrongNamespace { .. })),
        "{elsewhere:?}"
    );

    cluster.testbed.run_in(NODE_1, || capture.remove())??;
    let tables = cluster.on_node_1_output("nft", &["list", "tables"])?;
    assert!(!tables.contains("weft"), "{tables}");
    for family in ["-4", "-6"] {
        let rules = cluster.on_node_1_output("ip", &[family, "rule", "list"])?;
        assert!(!rules.contains("lookup 100"), "{rules}");
        let routes = cluster.on_node_1_output("ip", &[family, "route", "show", "table", "all"])?;
        assert!(!routes.contains("table 100"), "{routes}");
    }
    // And the pod talks to the server directly, as before.
    cluster.ping("client")
}
