//! Upgrading weft on the real cluster the way an operator does: a new
//! proxy image rolled out by the DaemonSet (`kubectl set image`, one node
//! at a time, the new pod beside the old one), a rolling restart of the
//! control plane; and what a test watches meanwhile: which proxy processes
//! run on a node, what the proxies logged, an echo server inside a pod.

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

use anyhow::{Context, Result};

use super::RealCluster;
use super::mesh::WEFT_NAMESPACE;
use crate::{EchoServer, netns};

/// The node proxies' pods.
const PROXY_SELECTOR: &str = "app.kubernetes.io/name=weft-node-proxy";

/// A node proxy's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyPod {
    /// Its name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its proxy container's image.
    pub image: String,
    /// Whether it is being deleted (draining).
    pub terminating: bool,
    /// Whether it is Ready.
    pub ready: bool,
}

impl RealCluster {
    /// The node proxy DaemonSet's image.
    pub fn proxy_image(&self) -> Result<String> {
        let image = self.kubectl(&[
            "-n",
            WEFT_NAMESPACE,
            "get",
            "daemonset/weft-node-proxy",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])?;
        Ok(image.trim().to_owned())
    }

    /// Starts rolling the node proxies to a "new version": the current image
    /// under the tag `<tag>-<suffix>` (the same bits: a registry is not
    /// reachable here, and a rollout is about the pods, not the bytes), set
    /// with `kubectl set image`. Returns the new image; does not wait.
    pub fn start_proxy_rollout(&self, suffix: &str) -> Result<String> {
        let current = self.proxy_image()?;
        let new = format!("{current}-{suffix}");
        for node in &self.nodes {
            node.tag_image(&current, &new)?;
        }
        self.kubectl(&[
            "-n",
            WEFT_NAMESPACE,
            "set",
            "image",
            "daemonset/weft-node-proxy",
            &format!("proxy={new}"),
        ])?;
        Ok(new)
    }

    /// Every node proxy pod, draining ones included.
    pub fn proxy_pods(&self) -> Result<Vec<ProxyPod>> {
        let text = self.kubectl(&[
            "-n",
            WEFT_NAMESPACE,
            "get",
            "pods",
            "-l",
            PROXY_SELECTOR,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}|{.spec.nodeName}|{.spec.containers[0].image}|{.status.containerStatuses[0].ready}|{.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ])?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('|');
                Some(ProxyPod {
                    name: fields.next()?.to_owned(),
                    node: fields.next()?.to_owned(),
                    image: fields.next()?.to_owned(),
                    ready: fields.next()? == "true",
                    terminating: !fields.next()?.is_empty(),
                })
            })
            .collect())
    }

    /// The node proxy processes in `node`'s network namespace (not the
    /// readiness probes, `weft-proxy probe-ready`), oldest first.
    pub fn proxy_processes_on(&self, node: &str) -> Result<Vec<u32>> {
        let mut pids = Command::new("ip");
        pids.args(["netns", "pids", self.node_netns(node)?]);
        let pids = super::run_command(pids)?;
        let mut proxies: Vec<(u64, u32)> = pids
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .filter(|pid| {
                let proxy = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "weft-proxy");
                let probe = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    cmdline.split(|b| *b == 0).any(|arg| arg == b"probe-ready")
                });
                proxy && !probe
            })
            .filter_map(|pid| Some((start_time(pid)?, pid)))
            .collect();
        proxies.sort_unstable();
        Ok(proxies.into_iter().map(|(_, pid)| pid).collect())
    }

    /// What every node proxy container (running or not, of every proxy
    /// pod) has logged, each line prefixed with its pod.
    pub fn proxy_logs(&self) -> Result<String> {
        let mut all = String::new();
        for pod in self.proxy_pods()? {
            for previous in ["--previous=false", "--previous=true"] {
                // A container that never restarted has no previous log.
                if let Ok(log) = self.kubectl(&["-n", WEFT_NAMESPACE, "logs", &pod.name, previous])
                {
                    for line in log.lines() {
                        all.push_str(&format!("{}: {line}\n", pod.name));
                    }
                }
            }
        }
        Ok(all)
    }

    /// An echo server listening on `port` inside pod `namespace/name`, as
    /// the pod's own application would (the test process holds it: the
    /// test app's image serves HTTP only). Stops when dropped.
    pub fn start_echo_server_in_pod(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<EchoServer> {
        let pod = self.pod_netns(namespace, name)?;
        let listener =
            netns::run_in_file(&pod, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
                .with_context(|| format!("binding port {port} in pod {namespace}/{name}"))?;
        EchoServer::start(listener)
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` once it is gone.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}
