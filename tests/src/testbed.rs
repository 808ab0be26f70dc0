//! The [`Testbed`]: a built cluster of namespaces, and what a test does with it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::echo::EchoServer;
use crate::process::{self, Process, TrackedProcess};
use crate::topology::{
    IpFamilies, Ipv4Cidr, PodDecl, PodNetwork, PodSpec, ServiceDecl, ServiceSpec, Target, Topology,
};
use crate::{cleanup, manifests, netns, network};

/// Declares nodes, pods and services; [`TestbedBuilder::build`] creates them.
#[derive(Debug, Default)]
pub struct TestbedBuilder {
    nodes: Vec<String>,
    pods: Vec<PodDecl>,
    services: Vec<ServiceDecl>,
    pod_network: PodNetwork,
    ip_families: IpFamilies,
}

impl TestbedBuilder {
    /// Adds a node. Nodes are numbered from 1 in the order they are added; node `n`
    /// gets the IP `172.30.0.<n+1>` and the pod CIDR `10.244.<n>.0/24`.
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_owned());
        self
    }

    /// Adds a pod on one of the nodes.
    pub fn pod(mut self, spec: PodSpec<'_>) -> Self {
        self.pods.push(spec.into());
        self
    }

    /// Adds a service; services get ClusterIPs 10.96.1.1, 10.96.1.2, ... in order.
    pub fn service(mut self, spec: ServiceSpec<'_>) -> Self {
        self.services.push(spec.into());
        self
    }

    /// Wires every node's pods as `pod_network` says (the CNI the testbed
    /// plays); [`PodNetwork::PointToPoint`] unless set. Addresses are the
    /// same either way.
    pub fn pod_network(mut self, pod_network: PodNetwork) -> Self {
        self.pod_network = pod_network;
        self
    }

    /// Gives the pods these IP families ([`IpFamilies::V4`] unless set);
    /// with IPv6, the nodes get IPv6 uplinks and routes too.
    pub fn ip_families(mut self, ip_families: IpFamilies) -> Self {
        self.ip_families = ip_families;
        self
    }

    /// Sweeps namespaces left by dead runs, then creates and wires every namespace.
    /// On failure, whatever was created is deleted again.
    pub fn build(self) -> Result<Testbed> {
        cleanup::install_signal_handler();
        cleanup::sweep_stale();

        let prefix = netns::unique_prefix();
        let topology = Topology::plan(&prefix, &self.nodes, &self.pods, &self.services)?
            .with_pod_network(self.pod_network)
            .with_ip_families(self.ip_families);

        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-testbed-{prefix}-"))
            .tempdir()
            .context("creating the testbed's temp dir")?;
        // From here on, dropping `testbed` undoes whatever was done.
        let mut testbed = Testbed {
            prefix,
            topology,
            netns: Vec::new(),
            processes: Mutex::new(Vec::new()),
            next_log: AtomicUsize::new(0),
            dir: Some(dir),
        };
        network::create_namespaces(&testbed.topology, &mut testbed.netns)?;
        network::wire(&testbed.topology)?;
        tracing::info!(
            prefix = testbed.prefix,
            nodes = testbed.topology.nodes.len(),
            pods = testbed.topology.pods.len(),
            pod_network = ?testbed.topology.pod_network,
            "testbed ready"
        );
        Ok(testbed)
    }
}

/// How long [`Testbed::connect`] waits to connect, and its stream for each read or
/// write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A cluster made of network namespaces on this machine: one per node, one per pod,
/// and a fabric namespace with the bridge joining the nodes.
///
/// Dropping it stops every process it spawned and deletes every namespace it made,
/// also while unwinding from a panic.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    topology: Topology,
    /// Namespaces created so far, in creation order.
    netns: Vec<String>,
    processes: Mutex<Vec<Arc<TrackedProcess>>>,
    next_log: AtomicUsize,
    /// `None` only while dropping.
    dir: Option<TempDir>,
}

impl Testbed {
    /// Starts declaring a testbed.
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder::default()
    }

    /// Starts `command` inside the target's namespace, with stdin from /dev/null and
    /// stdout and stderr captured to files in [`Testbed::dir`]. The process is
    /// stopped when the returned handle or the testbed is dropped, whichever is first.
    pub fn spawn(&self, target: Target<'_>, command: Command) -> Result<Process> {
        let netns = self.topology.netns_of(target)?;
        let program = Path::new(command.get_program())
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target_name = match target {
            Target::Node(name) => format!("node-{name}"),
            Target::Pod(name) => format!("pod-{name}"),
        };
        let n = self.next_log.fetch_add(1, Ordering::Relaxed);
        let base = format!("{n:02}-{target_name}-{program}");
        let process = process::spawn(
            netns,
            command,
            format!("{program} in {target}"),
            self.dir().join(format!("{base}.stdout")),
            self.dir().join(format!("{base}.stderr")),
        )?;
        self.processes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(process.tracked());
        Ok(process)
    }

    /// Runs `f` inside the target's namespace, on a thread of its own, and returns
    /// its result; a panic in `f` is passed on.
    ///
    /// Sockets opened in `f` belong to that namespace for good, so a test can bind or
    /// connect here and then use the socket from any thread (or hand it to tokio with
    /// `from_std`). Processes started in `f` also start in that namespace.
    pub fn run_in<T, F>(&self, target: Target<'_>, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        netns::run_in(self.topology.netns_of(target)?, f)
    }

    /// The target's network namespace, opened: a thread that enters it
    /// later ([`crate::netns::run_in_file`]) needs no lookup, and the
    /// namespace stays while the file is open.
    pub(crate) fn netns_file(&self, target: Target<'_>) -> Result<std::fs::File> {
        netns::open(self.topology.netns_of(target)?)
    }

    /// Starts an [`EchoServer`] on 0.0.0.0:`port` inside the target's namespace
    /// (port 0 picks a free one, see [`EchoServer::local_addr`]).
    pub fn start_echo_server(&self, target: Target<'_>, port: u16) -> Result<EchoServer> {
        let listener = self
            .run_in(target, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("binding an echo server to port {port} in {target}"))?;
        EchoServer::start(listener)
    }

    /// Opens a TCP connection from inside the target's namespace. Connecting, reading
    /// and writing each time out after [`IO_TIMEOUT`], so a broken path fails the
    /// test instead of hanging it.
    pub fn connect(&self, from: Target<'_>, to: SocketAddr) -> Result<TcpStream> {
        let stream = self
            .run_in(from, || TcpStream::connect_timeout(&to, IO_TIMEOUT))?
            .with_context(|| format!("connecting from {from} to {to}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// The pod's IP (`10.244.<node>.<2..>`).
    pub fn pod_ip(&self, pod: &str) -> Result<Ipv4Addr> {
        Ok(self.topology.pod(pod)?.ip)
    }

    /// The pod's IPv6 address (`fd00:10:244:<node>::<2..>`); configured only
    /// with [`TestbedBuilder::ip_families`] other than [`IpFamilies::V4`].
    pub fn pod_ip6(&self, pod: &str) -> Result<std::net::Ipv6Addr> {
        let planned = self.topology.pod(pod)?;
        anyhow::ensure!(
            self.topology.ip_families.v6(),
            "pod {pod} has no IPv6 address: the testbed is IPv4 only"
        );
        Ok(planned.ip6)
    }

    /// Starts an echo server bound to `addr` in the target's namespace
    /// (e.g. a pod's IPv6 address, to serve that family only).
    pub fn start_echo_server_at(&self, target: Target<'_>, addr: SocketAddr) -> Result<EchoServer> {
        let listener = self
            .run_in(target, || TcpListener::bind(addr))?
            .with_context(|| format!("binding an echo server to {addr} in {target}"))?;
        EchoServer::start(listener)
    }

    /// What a CNI plugin learns of `pod` when the runtime creates it: its
    /// network namespace (the nsfs mount), its addresses and its
    /// Kubernetes namespace.
    pub fn pod_network_of(&self, pod: &str) -> Result<(PathBuf, Vec<std::net::IpAddr>, String)> {
        let planned = self.topology.pod(pod)?;
        let mut ips = Vec::new();
        if self.topology.ip_families.v4() {
            ips.push(planned.ip.into());
        }
        if self.topology.ip_families.v6() {
            ips.push(planned.ip6.into());
        }
        let netns = self.netns_name(Target::Pod(pod))?;
        Ok((
            Path::new("/run/netns").join(netns),
            ips,
            planned.namespace.clone(),
        ))
    }

    /// The node's IP on the node network (`172.30.0.<n+1>`).
    pub fn node_ip(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.topology.node(node)?.ip)
    }

    /// The node a pod runs on.
    pub fn node_of(&self, pod: &str) -> Result<&str> {
        let pod = self.topology.pod(pod)?;
        Ok(&self.topology.nodes[pod.node].name)
    }

    /// The names of the nodes, in declaration order.
    pub fn node_names(&self) -> Vec<String> {
        self.topology.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The names of the pods on `node`, in declaration order.
    pub fn pods_on(&self, node: &str) -> Vec<String> {
        self.topology
            .pods
            .iter()
            .filter(|p| self.topology.nodes[p.node].name == node)
            .map(|p| p.name.clone())
            .collect()
    }

    /// The SPIFFE identities (trust domain `cluster.local`) of the meshed pods on `node`.
    pub fn meshed_identities_on(&self, node: &str) -> Vec<String> {
        self.meshed_identities_on_without(node, &[])
    }

    /// [`Testbed::meshed_identities_on`] leaving out the pods `except`.
    pub fn meshed_identities_on_without(&self, node: &str, except: &[&str]) -> Vec<String> {
        let mut identities: Vec<String> = self
            .topology
            .pods
            .iter()
            .filter(|p| p.meshed && self.topology.nodes[p.node].name == node)
            .filter(|p| !except.contains(&p.name.as_str()))
            .map(|p| {
                format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    p.namespace, p.service_account
                )
            })
            .collect();
        identities.sort();
        identities.dedup();
        identities
    }

    /// The node's pod CIDR (`10.244.<n>.0/24`).
    pub fn pod_cidr(&self, node: &str) -> Result<Ipv4Cidr> {
        Ok(self.topology.node(node)?.pod_cidr)
    }

    /// The gateway of the node's pods (`10.244.<n>.1`), an address of the
    /// node: its own connections to its pods come from it.
    pub fn pod_gateway(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.topology.node(node)?.pod_gateway)
    }

    /// How the pods are wired to their nodes.
    pub fn pod_network(&self) -> PodNetwork {
        self.topology.pod_network
    }

    /// The service's ClusterIP (`10.96.1.<k>`); it exists only in the manifests.
    pub fn service_vip(&self, namespace: &str, name: &str) -> Result<Ipv4Addr> {
        Ok(self.topology.service(namespace, name)?.vip)
    }

    /// The name of the network namespace behind a target, for `ip -n NAME ...` or
    /// `ip netns exec NAME ...`.
    pub fn netns_name(&self, target: Target<'_>) -> Result<&str> {
        self.topology.netns_of(target)
    }

    /// Every network namespace this testbed made.
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }

    /// A temp dir that lives as long as the testbed: process output is here, and
    /// tests may put config, certificates or manifests here.
    pub fn dir(&self) -> &Path {
        match &self.dir {
            Some(dir) => dir.path(),
            None => Path::new("/nonexistent"),
        }
    }

    /// The cluster as multi-document Kubernetes YAML: Namespaces, ServiceAccounts,
    /// Pods, Services and EndpointSlices.
    pub fn manifests(&self) -> Result<String> {
        manifests::render(&self.topology)
    }

    /// The same objects as [`Testbed::manifests`], as JSON values in apply
    /// order (pods carry the status a kubelet would write).
    pub fn objects(&self) -> Vec<serde_json::Value> {
        manifests::objects(&self.topology)
    }

    /// Writes [`Testbed::manifests`] to `dir/testbed.yaml` (creating `dir`) and
    /// returns the file's path.
    pub fn write_manifests(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("testbed.yaml");
        std::fs::write(&file, self.manifests()?)
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(file)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let processes = std::mem::take(
            &mut *self
                .processes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        process::stop_all(&processes);
        for name in self.netns.iter().rev() {
            if let Err(e) = netns::delete(name) {
                tracing::warn!("{e:#}");
            }
            cleanup::untrack_netns(name);
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                let kept = dir.keep();
                eprintln!(
                    "weft-testbed {}: test panicked, kept process output in {}",
                    self.prefix,
                    kept.display()
                );
            } else if let Err(e) = dir.close() {
                tracing::warn!("removing the testbed's temp dir: {e}");
            }
        }
    }
}
