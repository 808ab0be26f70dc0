//! A real Kubernetes cluster on this machine, for the tests that must see
//! what a user's cluster does: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler in a control-plane namespace, and two (or more) nodes,
//! each a network namespace with its own containerd, runc, kubelet,
//! kube-proxy (nftables mode) and CNI plugin (`bridge` with br_netfilter on,
//! or `ptp`), plus CoreDNS. Pods are real containers from locally built
//! images; nothing is pulled from a registry.
//!
//! It is not the network-namespace testbed ([`crate::Testbed`]): nothing here
//! knows about weft. A test installs weft the way a user does (`helm
//! install` through [`RealCluster::helm`]) and drives it with `kubectl`.
//!
//! # Layout
//!
//! ```text
//!   control-plane namespace: br0 10.99.0.1/24, etcd, kube-apiserver :6443,
//!                            controller-manager, scheduler
//!        | n1                         | n2
//!   node-1: eth0 10.99.0.11        node-2: eth0 10.99.0.12
//!     pods 10.244.1.0/24             pods 10.244.2.0/24
//! ```
//!
//! Services are in 10.96.0.0/16 (`kubernetes` 10.96.0.1, cluster DNS
//! 10.96.0.10). Each node's daemons share a mount namespace of their own
//! (a slave of the host's) with fresh tmpfs over `/run`, `/var/lib` and
//! `/var/log`, and read-only files over the `/proc/sys` entries the kubelet
//! would otherwise change machine-wide; their containers live in cgroups
//! under `/<prefix>-<node>` in every hierarchy.
//!
//! # Cleanup
//!
//! Dropping the [`RealCluster`] (also in a panic) kills every container by
//! its cgroups, every process of a node by its mount namespace, removes
//! the cgroups and the namespaces. SIGINT/SIGTERM and the sweep of a later
//! run cover the rest, as for the testbed (see `cleanup`).

mod binaries;
mod control_plane;
mod mesh;
mod node;
mod pki;
mod upgrade;
mod workloads;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cleanup, netns};
pub use binaries::{KubeBinaries, weft_images};
use control_plane::ControlPlane;
pub use mesh::{Captured, LinkCapture, RELEASE, WEFT_NAMESPACE};
use node::Node;
use pki::Credentials;
pub use upgrade::ProxyPod;
pub use workloads::{
    APP_IMAGE, APP_PORT, PodRef, SERVICE_PORT, app, http_get, namespace, node_port,
};

/// The API server's address on the control-plane bridge.
pub const APISERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The API server's port.
pub const APISERVER_PORT: u16 = 6443;
/// The `kubernetes` Service's ClusterIP.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The cluster DNS Service's ClusterIP.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Where Services get their ClusterIPs.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// All pods' addresses; node `n` (from 1) has `10.244.<n>.0/24`.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// How long nodes and system pods may take to become Ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The CNI plugin that wires pods to their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cni {
    /// All pods of a node on one Linux bridge `cni0` with the gateway on
    /// it; br_netfilter's `bridge-nf-call-iptables=1`, as kube-proxy wants.
    Bridge,
    /// A point-to-point veth per pod, routed by the node.
    Ptp,
}

impl std::fmt::Display for Cni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cni::Bridge => "bridge",
            Cni::Ptp => "ptp",
        })
    }
}

/// A running cluster; torn down on drop.
pub struct RealCluster {
    prefix: String,
    cni: Cni,
    // Dropped in field order: nodes before the control plane.
    nodes: Vec<Node>,
    control_plane: Option<ControlPlane>,
    binaries: KubeBinaries,
    credentials: Credentials,
    control_netns: String,
    dir: Option<tempfile::TempDir>,
}

impl RealCluster {
    /// Starts a cluster of `nodes` nodes wired by `cni` and waits until
    /// every node is Ready and CoreDNS serves. The Kubernetes binaries and
    /// test images come from `scripts/kube.sh build` (or `WEFT_KUBE_DIR`);
    /// `images` are further archives (e.g. [`weft_images`]) imported into
    /// every node.
    pub fn start(cni: Cni, nodes: usize, images: &[PathBuf]) -> Result<RealCluster> {
        cleanup::install_signal_handler();
        cleanup::sweep_stale();
        let binaries = KubeBinaries::locate()?;
        let prefix = netns::unique_prefix();
        let dir = tempfile::Builder::new()
            .prefix("weft-real-cluster-")
            .tempdir()
            .context("creating the cluster's temp dir")?;
        let node_names: Vec<String> = (1..=nodes).map(|n| format!("node-{n}")).collect();
        let credentials = Credentials::write(&dir.path().join("pki"), APISERVER_IP, &node_names)?;
        let control_netns = format!("{prefix}-k8s");
        let mut cluster = RealCluster {
            prefix,
            cni,
            nodes: Vec::new(),
            control_plane: None,
            binaries,
            credentials,
            control_netns,
            dir: Some(dir),
        };
        cluster.boot(&node_names, images).inspect_err(|_| {
            if let Some(dir) = cluster.dir.take() {
                eprintln!(
                    "real cluster failed to start; logs kept in {}",
                    dir.keep().display()
                );
            }
        })?;
        Ok(cluster)
    }

    fn boot(&mut self, node_names: &[String], images: &[PathBuf]) -> Result<()> {
        let dir = self.dir()?.to_owned();
        cleanup::track_netns(&self.control_netns);
        netns::create(&self.control_netns)?;
        netns::ip_batch(
            &self.control_netns,
            &[
                "link add br0 type bridge".to_owned(),
                "link set br0 up".to_owned(),
                format!("addr add {APISERVER_IP}/24 dev br0"),
            ],
        )?;
        self.control_plane = Some(ControlPlane::start(
            &self.control_netns,
            &dir,
            &self.binaries,
            &self.credentials,
        )?);
        self.credentials
            .write_kubeconfig(&self.admin_kubeconfig(), &apiserver_url(), "admin")?;
        self.wait_for_apiserver()?;

        let mut archives = self.binaries.images();
        archives.extend(images.iter().cloned());
        for (index, name) in node_names.iter().enumerate() {
            let node = Node::start(node::NodeSpec {
                name,
                index: index + 1,
                all_nodes: node_names.len(),
                prefix: &self.prefix,
                control_netns: &self.control_netns,
                cni: self.cni,
                dir: &dir.join(name),
                binaries: &self.binaries,
                credentials: &self.credentials,
                images: &archives,
            })
            .with_context(|| format!("starting {name}"))?;
            self.nodes.push(node);
        }
        self.apply(&self.binaries.coredns_manifest())
            .context("installing CoreDNS")?;
        self.wait_until("every node Ready and CoreDNS available", || {
            let nodes = self.kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ])?;
            let ready = nodes.lines().filter(|l| l.trim() == "True").count();
            if ready < node_names.len() {
                return Ok(false);
            }
            let dns = self.kubectl(&[
                "-n",
                "kube-system",
                "get",
                "deployment",
                "coredns",
                "-o",
                "jsonpath={.status.availableReplicas}",
            ])?;
            Ok(dns.trim() == "1")
        })
    }

    /// The CNI this cluster runs.
    pub fn cni(&self) -> Cni {
        self.cni
    }

    /// The temp dir with every component's logs and state.
    pub fn dir(&self) -> Result<&Path> {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .context("the cluster was torn down")
    }

    /// The nodes' names, `node-1`, `node-2`, ...
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name().to_owned()).collect()
    }

    /// The network namespace of `node` (for `ip -n`, `nft`, tcpdump).
    pub fn node_netns(&self, node: &str) -> Result<&str> {
        Ok(self.node(node)?.netns())
    }

    /// The node's address on the cluster network.
    pub fn node_ip(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.node(node)?.ip())
    }

    fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .with_context(|| format!("no node {name}"))
    }

    /// The admin's kubeconfig (it names the API server at
    /// [`APISERVER_IP`], reachable from the control-plane namespace, where
    /// [`RealCluster::kubectl`] and [`RealCluster::helm`] run).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.credentials.file("admin.kubeconfig")
    }

    /// Runs `kubectl` as the admin in the control-plane namespace and returns
    /// its stdout; fails with its stderr when it fails.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(self.binaries.bin("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args);
        self.run_in_control_plane(command)
    }

    /// `kubectl apply --server-side -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let file = tempfile::NamedTempFile::new_in(self.dir()?)?;
        std::fs::write(file.path(), yaml)?;
        let path = file.path().to_string_lossy().into_owned();
        self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=weft-test",
            "-f",
            &path,
        ])
    }

    /// Runs `helm` (`WEFT_HELM`, or `scripts/helm.sh path`) as the admin in
    /// the control-plane namespace.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(binaries::helm()?);
        command
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .env("HELM_CACHE_HOME", self.dir()?.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir()?.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir()?.join("helm/data"))
            .args(args);
        self.run_in_control_plane(command)
    }

    fn run_in_control_plane(&self, command: Command) -> Result<String> {
        netns::run_in(&self.control_netns, || run_command(command))?
    }

    /// Runs `f` on a thread inside `node`'s network namespace.
    pub fn run_in_node<T: Send>(&self, node: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(self.node_netns(node)?, f)
    }

    /// Runs `f` on a thread inside the network namespace of pod
    /// `namespace/name` (found through its sandbox's cgroup on its node).
    pub fn run_in_pod<T: Send>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce() -> T + Send,
    ) -> Result<T> {
        netns::run_in_file(&self.pod_netns(namespace, name)?, f)
    }

    /// The network namespace of pod `namespace/name`, as an open file that
    /// [`connect_in`] can use again and again.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Result<std::fs::File> {
        let fields = self.kubectl(&[
            "-n",
            namespace,
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.metadata.uid} {.spec.nodeName}",
        ])?;
        let (uid, node) = fields
            .split_once(' ')
            .with_context(|| format!("pod {namespace}/{name} has no node yet"))?;
        self.node(node)?.pod_netns(uid)
    }

    /// A TCP connection from pod `namespace/name` to `to`.
    pub fn connect_from_pod(
        &self,
        namespace: &str,
        name: &str,
        to: SocketAddr,
    ) -> Result<std::net::TcpStream> {
        self.run_in_pod(namespace, name, || {
            std::net::TcpStream::connect_timeout(&to, crate::IO_TIMEOUT)
        })?
        .with_context(|| format!("connecting from pod {namespace}/{name} to {to}"))
    }

    fn wait_for_apiserver(&self) -> Result<()> {
        self.wait_until("the API server ready", || {
            Ok(self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|body| body.trim() == "ok"))
        })
    }

    /// Polls `condition` every half second until it holds, for at most
    /// [`READY_TIMEOUT`]; errors of `condition` count as "not yet" and the
    /// last one is reported.
    pub fn wait_until(
        &self,
        what: &str,
        mut condition: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = None;
        loop {
            match condition() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                let last = last.map(|e| format!(": {e:#}")).unwrap_or_default();
                bail!("waited {READY_TIMEOUT:?} for {what}{last}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Runs `command` to its end and returns its stdout; fails with its stderr
/// when it fails.
pub(crate) fn run_command(mut command: Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A TCP connection to `to` from inside network namespace `netns`.
pub fn connect_in(netns: &std::fs::File, to: SocketAddr) -> Result<std::net::TcpStream> {
    netns::run_in_file(netns, || {
        std::net::TcpStream::connect_timeout(&to, crate::IO_TIMEOUT)
    })?
    .with_context(|| format!("connecting to {to}"))
}

/// The nftables tables in the network namespace `netns` (e.g. a pod's,
/// from [`RealCluster::pod_netns`]), one `table <family> <name>` a line.
pub fn nft_tables_in(netns: &std::fs::File) -> Result<String> {
    let output = netns::run_in_file(netns, || {
        std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
    })?
    .context("running nft list tables")?;
    anyhow::ensure!(
        output.status.success(),
        "nft list tables: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The API server's URL inside the cluster's namespaces.
fn apiserver_url() -> String {
    format!("https://{APISERVER_IP}:{APISERVER_PORT}")
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        for node in self.nodes.drain(..).rev() {
            node.tear_down();
        }
        drop(self.control_plane.take());
        cleanup::untrack_netns(&self.control_netns);
        if let Err(e) = netns::delete(&self.control_netns) {
            eprintln!("real cluster: {e:#}");
        }
        if let Some(dir) = self.dir.take()
            && std::thread::panicking()
        {
            eprintln!("real cluster logs kept in {}", dir.keep().display());
        }
    }
}
