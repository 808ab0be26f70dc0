//! weft's own processes on a testbed: the control plane (real binary, on the
//! first node) and one node proxy per node, with credentials and the mesh
//! roots wired between them. The control plane reads the testbed's manifests
//! with bootstrap tokens ([`WeftMesh::start`]), or a real API server holding
//! the testbed's objects, with ServiceAccount tokens
//! ([`WeftMesh::start_on_kubernetes`]). Tests and the benchmark use this
//! instead of starting binaries themselves.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::apiserver::KubeApiServer;
use crate::kube_cluster;
use crate::{LoopbackForward, Process, Target, Testbed};

mod pod_setup;
mod proxies;

/// The control plane's gRPC port.
pub const CONTROL_PLANE_GRPC_PORT: u16 = 15012;
/// The control plane's monitoring port.
pub const CONTROL_PLANE_MONITORING_PORT: u16 = 15014;
/// The proxy's admin port (on the node's loopback).
pub const PROXY_ADMIN_PORT: u16 = 15000;
/// The proxy's Prometheus port.
pub const PROXY_METRICS_PORT: u16 = 15020;
/// The proxy's readiness port.
pub const PROXY_READINESS_PORT: u16 = 15021;
/// How long a weft process gets to come up before a test gives up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds a weft binary built by cargo next to the running test: `WEFT_BIN_DIR`
/// if set, else the profile directory the test executable lives in.
pub fn weft_binary(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("WEFT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("locating the test executable")?;
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_owned)
                .context("the test executable has no profile directory")?
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (`cargo build --bins`, which `cargo test --workspace` does), or set WEFT_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// The control plane and the node proxies of one testbed.
pub struct WeftMesh {
    control_plane_node: String,
    control_plane: Option<Process>,
    proxies: BTreeMap<String, Process>,
    tokens: BTreeMap<String, String>,
    manifests_dir: PathBuf,
    state_dir: PathBuf,
    tokens_file: PathBuf,
    kubernetes: Option<KubernetesSource>,
    /// The proxies' `WEFT_LOG_LEVEL`.
    proxy_log_level: String,
    /// Pods not created yet (see [`WeftMesh::start_without`]).
    later: Vec<String>,
}

/// What a proxy logs once a new process on its node serves in its place.
pub const HANDED_OVER: &str = "this one accepts nothing more";

/// The proxies' log filter in tests: debug for weft's own lines, so a failed
/// test's logs tell the story.
pub const TEST_PROXY_LOG_LEVEL: &str = "info,weft_proxy=debug";

/// A second control-plane replica (see [`WeftMesh::start_replica`]); stopped
/// on drop.
pub struct ControlPlaneReplica {
    /// The replica's process.
    pub process: Process,
    _forward: LoopbackForward,
}

/// How the control plane reaches a test's API server.
struct KubernetesSource {
    /// Credentials of the control plane's ServiceAccount.
    kubeconfig: PathBuf,
    /// The API server's host loopback port, forwarded into the control
    /// plane's node.
    _forward: LoopbackForward,
}

impl WeftMesh {
    /// Writes the testbed's manifests and node tokens, starts the control
    /// plane on the first node and a proxy on every node.
    pub fn start(testbed: &Testbed) -> Result<WeftMesh> {
        WeftMesh::start_with_proxy_log_level(testbed, TEST_PROXY_LOG_LEVEL)
    }

    /// [`WeftMesh::start`] with the proxies logging at `proxy_log_level`
    /// (the benchmark runs them at the production default, `info`).
    pub fn start_with_proxy_log_level(
        testbed: &Testbed,
        proxy_log_level: &str,
    ) -> Result<WeftMesh> {
        WeftMesh::start_configured(testbed, proxy_log_level, &[])
    }

    /// [`WeftMesh::start`] with the pods `later` not created yet:
    /// neither in the cluster's objects nor announced, until
    /// [`WeftMesh::create_pod`] creates one.
    pub fn start_without(testbed: &Testbed, later: &[&str]) -> Result<WeftMesh> {
        WeftMesh::start_configured(testbed, TEST_PROXY_LOG_LEVEL, later)
    }

    fn start_configured(
        testbed: &Testbed,
        proxy_log_level: &str,
        later: &[&str],
    ) -> Result<WeftMesh> {
        let nodes = testbed.node_names();
        let first = nodes.first().context("the testbed has no nodes")?.clone();
        let manifests_dir = testbed.dir().join("manifests");
        let state_dir = testbed.dir().join("control-plane-state");
        std::fs::create_dir_all(&manifests_dir)?;
        if later.is_empty() {
            testbed.write_manifests(&manifests_dir)?;
        } else {
            // JSON documents are YAML documents too.
            let now: Vec<String> = testbed
                .objects()
                .into_iter()
                .filter(|object| !later.iter().any(|pod| pod_setup::is_pod(object, pod)))
                .map(|object| object.to_string())
                .collect();
            std::fs::write(manifests_dir.join("testbed.yaml"), now.join("\n---\n"))?;
        }

        let tokens: BTreeMap<String, String> = nodes
            .iter()
            .map(|node| Ok((node.clone(), random_token()?)))
            .collect::<Result<_>>()?;
        let tokens_file = testbed.dir().join("node-tokens");
        let lines: String = tokens
            .iter()
            .map(|(node, token)| format!("{node} {token}\n"))
            .collect();
        std::fs::write(&tokens_file, lines)?;
        for (node, token) in &tokens {
            std::fs::write(testbed.dir().join(format!("token-{node}")), token)?;
        }

        let mut mesh = WeftMesh {
            control_plane_node: first,
            control_plane: None,
            proxies: BTreeMap::new(),
            tokens,
            manifests_dir,
            state_dir,
            tokens_file,
            kubernetes: None,
            proxy_log_level: proxy_log_level.to_owned(),
            later: later.iter().map(|pod| (*pod).to_owned()).collect(),
        };
        mesh.start_control_plane(testbed)?;
        let roots = mesh.state_dir.join("root-cert.pem");
        wait_until(STARTUP_TIMEOUT, || Ok(roots.is_file()))
            .context("the control plane never wrote the mesh roots")?;
        for node in nodes {
            mesh.start_proxy(testbed, &node)?;
        }
        mesh.announce_pods(testbed, later)?;
        Ok(mesh)
    }

    /// Loads the testbed into `api` the way a cluster would hold it (weft's
    /// `deploy/` objects, a Node per node, the testbed's objects with pod
    /// status), then starts the control plane on the first node with
    /// `--source kubernetes` as its own ServiceAccount and a proxy per node
    /// with a projected, pod-bound token, and publishes the roots to the
    /// proxies as the ConfigMap mount would, once the control plane wrote
    /// them (the proxies start without them, as on a cluster).
    pub async fn start_on_kubernetes(testbed: &Testbed, api: &KubeApiServer) -> Result<WeftMesh> {
        let client = api.client().await?;
        kube_cluster::install_weft(&client).await?;
        kube_cluster::load_testbed(&client, testbed).await?;
        let nodes = testbed.node_names();
        let first = nodes.first().context("the testbed has no nodes")?.clone();
        let mut tokens = BTreeMap::new();
        for node in &nodes {
            let token = kube_cluster::node_proxy_token(&client, node).await?;
            std::fs::write(testbed.dir().join(format!("token-{node}")), &token)?;
            tokens.insert(node.clone(), token);
        }
        let control_plane_token = kube_cluster::service_account_token(
            &client,
            kube_cluster::WEFT_NAMESPACE,
            "weft-control-plane",
            &[],
            None,
        )
        .await?;
        let kubeconfig = testbed.dir().join("control-plane.kubeconfig");
        api.write_kubeconfig_for(&kubeconfig, &control_plane_token)?;
        let forward = testbed.forward_host_port(Target::Node(&first), api.port())?;

        let mut mesh = WeftMesh {
            control_plane_node: first,
            control_plane: None,
            proxies: BTreeMap::new(),
            tokens,
            manifests_dir: testbed.dir().join("manifests-unused"),
            state_dir: testbed.dir().join("control-plane-state"),
            tokens_file: testbed.dir().join("node-tokens-unused"),
            kubernetes: Some(KubernetesSource {
                kubeconfig,
                _forward: forward,
            }),
            proxy_log_level: TEST_PROXY_LOG_LEVEL.to_owned(),
            later: Vec::new(),
        };
        std::fs::create_dir_all(&mesh.state_dir)?;
        tokio::task::block_in_place(|| mesh.start_control_plane(testbed))?;
        // As on a cluster, where the DaemonSet and the control plane start
        // together: the proxies come up before the roots ConfigMap exists
        // and must wait for its file to appear.
        for node in nodes {
            mesh.start_proxy(testbed, &node)?;
        }
        let roots = kube_cluster::wait_for_roots(&client, STARTUP_TIMEOUT).await?;
        let path = mesh.state_dir.join("root-cert.pem");
        let partial = mesh.state_dir.join(".root-cert.pem.partial");
        std::fs::write(&partial, roots)?;
        std::fs::rename(&partial, &path)?;
        tokio::task::block_in_place(|| mesh.announce_pods(testbed, &[]))?;
        Ok(mesh)
    }

    /// (Re)starts the control plane process; its state (the root CA, in a
    /// directory or in the API server) survives restarts.
    pub fn start_control_plane(&mut self, testbed: &Testbed) -> Result<()> {
        let node = self.control_plane_node.clone();
        self.control_plane = Some(self.spawn_control_plane(testbed, &node)?);
        Ok(())
    }

    /// On Kubernetes: starts another control-plane replica on `node`. It
    /// shares the API server, and so the CA, with the first one; proxies
    /// can use either.
    pub fn start_replica(
        &self,
        testbed: &Testbed,
        node: &str,
        api: &KubeApiServer,
    ) -> Result<ControlPlaneReplica> {
        if self.kubernetes.is_none() {
            bail!("replicas share state through the API server: start_on_kubernetes first");
        }
        let forward = testbed.forward_host_port(Target::Node(node), api.port())?;
        let process = self.spawn_control_plane(testbed, node)?;
        Ok(ControlPlaneReplica {
            process,
            _forward: forward,
        })
    }

    /// Starts a control-plane process on `node` and waits until it is healthy.
    fn spawn_control_plane(&self, testbed: &Testbed, node: &str) -> Result<Process> {
        let mut command = Command::new(weft_binary("weft-control-plane")?);
        match &self.kubernetes {
            None => command
                .arg("--manifests")
                .arg(&self.manifests_dir)
                .arg("--node-tokens")
                .arg(&self.tokens_file)
                .arg("--state-dir")
                .arg(&self.state_dir),
            Some(kubernetes) => command
                .args(["--source", "kubernetes"])
                .env("KUBECONFIG", &kubernetes.kubeconfig),
        };
        command.env("WEFT_LOG", "info,weft_control_plane=debug");
        // No Service in front of it here, so nobody to wait for on SIGTERM.
        command.args(["--shutdown-delay-seconds", "0"]);
        let target = Target::Node(node);
        let process = testbed.spawn(target, command)?;
        let monitoring = SocketAddr::from((Ipv4Addr::LOCALHOST, CONTROL_PLANE_MONITORING_PORT));
        wait_until(STARTUP_TIMEOUT, || {
            if !process.is_running() {
                bail!(
                    "the control plane exited: {}",
                    process.stderr().unwrap_or_default()
                );
            }
            Ok(http_get(testbed, target, monitoring, "/healthz").is_ok())
        })
        .context("the control plane did not become healthy")?;
        Ok(process)
    }

    /// Stops the control plane (SIGTERM, then SIGKILL after a grace period)
    /// and returns how it exited.
    pub fn stop_control_plane(&mut self) -> Result<std::process::ExitStatus> {
        let process = self
            .control_plane
            .take()
            .context("the control plane is not running")?;
        process.stop()
    }

    /// Does what `weft-control-plane uninstall` does to a cluster, for the
    /// manifests source: writes weft's node-proxy DaemonSet with the
    /// uninstall annotation, which the control plane passes on to every
    /// proxy.
    pub fn announce_uninstall(&self) -> Result<()> {
        self.write_manifest(
            "uninstall.yaml",
            "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: weft-node-proxy, namespace: weft-system, annotations: {weft.dev/uninstall: \"true\"}}
spec:
  selector: {matchLabels: {app: weft-node-proxy}}
  template:
    metadata: {labels: {app: weft-node-proxy}}
    spec: {containers: [{name: proxy, image: weft-proxy}]}
",
        )
    }

    /// Waits until `node`'s proxy confirms (on its readiness port, as
    /// `weft-control-plane uninstall` asks) that it will remove its capture
    /// when it stops.
    pub fn wait_for_uninstall_confirmed(&self, testbed: &Testbed, node: &str) -> Result<()> {
        let readiness = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_READINESS_PORT));
        wait_until(STARTUP_TIMEOUT, || {
            Ok(http_get(testbed, Target::Node(node), readiness, "/uninstall").is_ok())
        })
        .with_context(|| format!("the proxy of {node} never confirmed the uninstall"))
    }

    /// Where `node`'s proxy keeps its last good state (`--state-dir`).
    pub fn proxy_state_dir(&self, testbed: &Testbed, node: &str) -> PathBuf {
        testbed.dir().join(format!("proxy-state-{node}"))
    }

    /// Waits until `node`'s proxy has stored a config holding `needle` (a
    /// name: the file is the wire message, whose strings are plain bytes).
    pub fn wait_for_stored_config(
        &self,
        testbed: &Testbed,
        node: &str,
        needle: &str,
    ) -> Result<()> {
        let file = self.proxy_state_dir(testbed, node).join("config.pb");
        wait_until(STARTUP_TIMEOUT, || {
            let stored = std::fs::read(&file).unwrap_or_default();
            Ok(stored
                .windows(needle.len())
                .any(|window| window == needle.as_bytes()))
        })
        .with_context(|| format!("{node}'s proxy never stored a config with {needle:?}"))
    }

    /// Where proxies reach the control plane.
    pub fn control_plane_addr(&self, testbed: &Testbed) -> Result<SocketAddr> {
        let ip = testbed.node_ip(&self.control_plane_node)?;
        Ok(SocketAddr::from((ip, CONTROL_PLANE_GRPC_PORT)))
    }

    /// The node the control plane runs on.
    pub fn control_plane_node(&self) -> &str {
        &self.control_plane_node
    }

    /// The control plane process, while it runs.
    pub fn control_plane(&self) -> Option<&Process> {
        self.control_plane.as_ref()
    }

    /// The proxy process of `node`.
    pub fn proxy(&self, node: &str) -> Result<&Process> {
        self.proxies
            .get(node)
            .with_context(|| format!("no proxy on node {node}"))
    }

    /// The bootstrap token of `node`.
    pub fn token(&self, node: &str) -> Result<&str> {
        self.tokens
            .get(node)
            .map(String::as_str)
            .with_context(|| format!("no token for node {node}"))
    }

    /// The directory the control plane reads manifests from.
    pub fn manifests_dir(&self) -> &Path {
        &self.manifests_dir
    }

    /// The control plane's CA file (chain and key): tests that play an
    /// attacker holding a valid certificate issue from it.
    pub fn ca_file(&self) -> PathBuf {
        self.state_dir.join("ca.pem")
    }

    /// The mesh roots (PEM) as the control plane published them.
    pub fn roots_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(
            self.state_dir.join("root-cert.pem"),
        )?)
    }

    /// Replaces (or creates) a manifest file atomically, as an operator's
    /// tooling would, so the control plane never reads half a file.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.manifests_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests_dir.join(name))?;
        Ok(())
    }

    /// GETs `path` from the proxy admin endpoint of `node` (JSON as text).
    pub fn proxy_admin(&self, testbed: &Testbed, node: &str, path: &str) -> Result<String> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_ADMIN_PORT));
        http_get(testbed, Target::Node(node), admin, path)
    }

    /// The Prometheus text of the proxy of `node`.
    pub fn proxy_metrics(&self, testbed: &Testbed, node: &str) -> Result<String> {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_METRICS_PORT));
        http_get(testbed, Target::Node(node), metrics, "/metrics")
    }

    /// Waits until every proxy reports ready (config applied, listeners up)
    /// and holds a certificate for each meshed pod of its node, so traffic
    /// from any meshed pod can flow.
    pub fn wait_for_data_plane(&self, testbed: &Testbed) -> Result<()> {
        let readiness = SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_READINESS_PORT));
        for node in self.proxies.keys() {
            wait_until(STARTUP_TIMEOUT, || {
                Ok(http_get(testbed, Target::Node(node), readiness, "/healthz/ready").is_ok())
            })
            .with_context(|| format!("the proxy of {node} never became ready"))?;
            let later: Vec<&str> = self.later.iter().map(String::as_str).collect();
            let wanted = testbed.meshed_identities_on_without(node, &later);
            wait_until(STARTUP_TIMEOUT, || {
                let certs = self
                    .proxy_admin(testbed, node, "/certs")
                    .unwrap_or_default();
                Ok(wanted
                    .iter()
                    .all(|identity| certs.contains(identity.as_str())))
            })
            .with_context(|| {
                format!("the proxy of {node} never got certificates for {wanted:?}")
            })?;
        }
        Ok(())
    }

    /// GETs `path` from the control plane's monitoring port.
    pub fn control_plane_page(&self, testbed: &Testbed, path: &str) -> Result<String> {
        let monitoring = SocketAddr::from((Ipv4Addr::LOCALHOST, CONTROL_PLANE_MONITORING_PORT));
        http_get(
            testbed,
            Target::Node(&self.control_plane_node),
            monitoring,
            path,
        )
    }
}

/// A plain HTTP/1.1 GET from inside a namespace; the body of a 200 answer.
pub fn http_get(testbed: &Testbed, from: Target<'_>, to: SocketAddr, path: &str) -> Result<String> {
    let (status, body) = http_request(testbed, from, to, "GET", path)?;
    if status != 200 {
        bail!("GET {path} from {to}: status {status}: {body}");
    }
    Ok(body)
}

/// One plain HTTP/1.1 request without a body from inside a namespace:
/// the answer's status and body, whatever the status.
pub fn http_request(
    testbed: &Testbed,
    from: Target<'_>,
    to: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String)> {
    let mut stream = testbed.connect(from, to)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let malformed = || format!("{method} {path} from {to}: malformed response");
    let (head, body) = response.split_once("\r\n\r\n").with_context(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .with_context(malformed)?;
    Ok((status, body.to_owned()))
}

/// Polls `condition` until it holds, fails, or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .context("reading /dev/urandom for a node token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What `weft-control-plane check` said: whether every check passed (exit
/// 0; 1 when one failed), and its output; any other exit is an error.
pub fn check_outcome(output: &std::process::Output) -> Result<(bool, String)> {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    match output.status.code() {
        Some(0) => Ok((true, text)),
        Some(1) => Ok((false, text)),
        other => anyhow::bail!(
            "check exited with {other:?}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}
