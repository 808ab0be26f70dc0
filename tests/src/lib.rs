//! A weft cluster made of Linux network namespaces on one machine, for the end-to-end
//! tests and the latency benchmark: real namespaces, real veths, real processes and
//! sockets. It is not a Kubernetes emulator (nothing watches or changes the objects
//! in [`Testbed::manifests`]) and not a network simulator (no delay or loss), and it
//! needs root. Start reading at [`Testbed::builder`].
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use weft_testbed::{PodSpec, Target, Testbed};
//! # fn main() -> anyhow::Result<()> {
//! let testbed = Testbed::builder()
//!     .node("node-1")
//!     .node("node-2")
//!     .pod(PodSpec { node: "node-1", name: "client", ..PodSpec::default() })
//!     .pod(PodSpec { node: "node-2", name: "server", ..PodSpec::default() })
//!     .build()?;
//! let server = testbed.start_echo_server(Target::Pod("server"), 8080)?;
//! let to = (testbed.pod_ip("server")?, 8080).into();
//! let mut stream = testbed.connect(Target::Pod("client"), to)?;
//! stream.write_all(b"ping")?;
//! let mut echoed = [0u8; 4];
//! stream.read_exact(&mut echoed)?;
//! assert_eq!(server.peers()[0].ip(), testbed.pod_ip("client")?);
//!
//! // Real processes, e.g. a node proxy, run the same way; their output is captured.
//! let proxy = testbed.spawn(Target::Node("node-1"), std::process::Command::new("sleep"))?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! ```text
//!                    fabric namespace: bridge br0
//!                 n1 /                        \ n2
//!   node-1 namespace: eth0 172.30.0.2/24    node-2 namespace: eth0 172.30.0.3/24
//!     pod0 (10.244.1.1/32)   pod1 ...         pod0 (10.244.2.1/32)   ...
//!       |                                       |
//!   pod namespace: eth0 10.244.1.2/32       pod namespace: eth0 10.244.2.2/32
//! ```
//!
//! Nodes are numbered from 1 in declaration order. Node `n` has `eth0` with
//! `172.30.0.<n+1>/24` on the bridge and the pod CIDR `10.244.<n>.0/24`. Its `k`-th pod
//! (from 0) has `eth0` with `10.244.<n>.<k+2>/32` in its own namespace; the node end of
//! that veth is `pod<k>`. Every node-side pod veth carries the same gateway address
//! `10.244.<n>.1/32`, so a pod resolves its gateway on its own link without proxy ARP.
//! Routes:
//! - pod: `10.244.<n>.1 dev eth0 scope link` and `default via 10.244.<n>.1`, so all
//!   traffic, also to pods on the same node, goes through the node namespace (where
//!   the mesh's capture rules will sit);
//! - node: `10.244.<n>.<k+2>/32 dev pod<k>` for each local pod and
//!   `10.244.<m>.0/24 via 172.30.0.<m+1>` for each other node `m`; `ip_forward=1` and
//!   `rp_filter=0` (all, default and each interface).
//!
//! That is the default, [`PodNetwork::PointToPoint`]. With
//! `.pod_network(PodNetwork::Bridge)` the pods are wired as the standard `bridge` CNI
//! plugin wires them: the `pod<k>` veths are ports of a bridge `cni0` in the node
//! namespace, which carries the gateway as `10.244.<n>.1/24`; a pod's `eth0` has
//! `10.244.<n>.<k+2>/24` and `default via 10.244.<n>.1`, so pods of one node talk
//! across the bridge, not through the node's routing. br_netfilter's
//! `net.bridge.bridge-nf-call-iptables` (and `-ip6tables`) is set to 1 in each node
//! namespace (a per-namespace setting; the host's is never touched).
//!
//! With `.ip_families(IpFamilies::DualStack)` (or `V6Only`) pods also (or only) get
//! `fd00:10:244:<n>::<k+2>` behind the gateway `fd00:10:244:<n>::1`, nodes an uplink
//! `fd00:172:30::<n+1>/64` and routes to each other's `fd00:10:244:<m>::/64`, with
//! IPv6 forwarding on; the manifests list the pods' addresses in that order.
//!
//! Services get ClusterIPs 10.96.1.1, 10.96.1.2, ... in declaration order. No
//! namespace routes or translates them: they exist in the manifests for the mesh to
//! resolve. Nothing is ever created in the host's root namespace, and all traffic
//! stays inside the testbed's namespaces.
//!
//! # A real Kubernetes API
//!
//! [`apiserver::KubeApiServer`] runs the upstream kube-apiserver with its own etcd
//! on 127.0.0.1 (built from the Go module in `tests/apiserver/` by
//! `scripts/apiserver.sh build`), for tests that need real authentication, RBAC,
//! admission, TokenRequest and TokenReview. It is independent of the network
//! namespaces.
//!
//! # A real Kubernetes cluster
//!
//! [`real_cluster::RealCluster`] starts the real thing on this machine: etcd, the
//! API server, controller-manager and scheduler, and nodes with containerd, runc,
//! the kubelet, kube-proxy and a CNI plugin (`bridge` with br_netfilter, or
//! `ptp`), plus CoreDNS, from binaries and images that `scripts/kube.sh build`
//! makes. Tests install weft into it with helm, as a user does.
//!
//! # Cleanup
//!
//! Namespaces are named `wft<pid>x<counter>-fabric`, `...-n-<node>` and
//! `...-p-<pod>`, so parallel tests and test binaries never collide. Dropping the
//! [`Testbed`] (also during a panic) stops its processes and deletes its namespaces.
//! SIGINT and SIGTERM do the same for every live testbed before the process exits.
//! Runs killed outright are cleaned up by the next [`TestbedBuilder::build`], which
//! deletes namespaces whose creating pid no longer exists, and kills what still runs
//! in them. The temp dir with process output ([`Testbed::dir`]) is removed on a
//! normal drop, and kept (its path printed) when the test panicked.

pub mod apiserver;
mod cgroups;
mod checksum;
mod cleanup;
mod echo;
mod forward;
pub mod kube_cluster;
mod manifests;
mod netns;
mod network;
mod observe;
mod policy_probe;
mod process;
pub mod real_cluster;
mod specs;
pub mod steady_load;
mod testbed;
mod topology;
mod weft;
mod wire;

pub use checksum::{Checksum, PseudoRandom, start_checksum_server};

/// The repository's root directory. Read at run time where cargo sets
/// `CARGO_MANIFEST_DIR` (for the package under test; every package sits one
/// level below the root): a test binary that another checkout built into a
/// shared target directory then still reads this checkout's files. Elsewhere
/// (the benchmark), the directory this library was built from.
pub fn repo_root() -> std::path::PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || env!("CARGO_MANIFEST_DIR").into(),
        std::path::PathBuf::from,
    );
    package
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or(package)
}
pub use echo::{EchoServer, echo_round_trip};
pub use forward::LoopbackForward;
pub use manifests::MESH_LABEL;
pub use netns::NETNS_PREFIX;
pub use observe::{CONFIG_WAIT, control_plane_channel, sign_over, uids};
pub use policy_probe::{
    ALLOW_WEB_TO_DB, DENY_BATCH_TO_DB, SHOP_DB_SERVICE, echoes, explain, legacy_pod, metric_sum,
    shop_db, shop_pod, shop_testbed, shop_testbed_builder, start_mesh_with_db_echo, wait_for_reach,
};
pub use process::Process;
pub use testbed::{IO_TIMEOUT, Testbed, TestbedBuilder};
pub use topology::{IpFamilies, Ipv4Cidr, PodNetwork, PodSpec, ServiceSpec, Target};
pub use weft::{
    CONTROL_PLANE_GRPC_PORT, CONTROL_PLANE_MONITORING_PORT, ControlPlaneReplica, PROXY_ADMIN_PORT,
    PROXY_METRICS_PORT, PROXY_READINESS_PORT, STARTUP_TIMEOUT, WeftMesh, check_outcome, http_get,
    http_request, wait_until, weft_binary,
};
pub use wire::{WireCapture, WireWatch};
