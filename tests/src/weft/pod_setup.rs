//! The pods of a testbed as a container runtime sets them up for weft: it
//! runs weft's CNI plugin for each new pod (announcing it to its node's
//! proxy), and the API server publishes the pod to the control plane.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::{STARTUP_TIMEOUT, WeftMesh, wait_until, weft_binary};
use crate::Testbed;

/// Whether `object` is the Pod named `name`.
pub(super) fn is_pod(object: &serde_json::Value, name: &str) -> bool {
    object["kind"] == "Pod" && object["metadata"]["name"] == name
}

impl WeftMesh {
    /// Creates a pod held back by [`WeftMesh::start_without`] the
    /// way a cluster does: the runtime sets up its sandbox (weft's CNI
    /// plugin must succeed, the namespace is meshed), then the API server
    /// publishes it. The caller's traffic from the pod may start in between,
    /// as an init container's does, before weft's config knows the pod.
    pub fn create_pod(&self, testbed: &Testbed, pod: &str) -> Result<()> {
        let node = testbed.node_of(pod)?;
        // As a runtime does: again after a "try again later" (a busy node
        // may take longer to serve the pod than the plugin waits).
        let mut last = String::new();
        wait_until(STARTUP_TIMEOUT, || {
            let (succeeded, said) = self.run_cni_plugin(testbed, node, pod, "ADD")?;
            last = said;
            Ok(succeeded)
        })
        .with_context(|| format!("weft-cni ADD of {pod} never succeeded: {last}"))
    }

    /// Publishes a pod held back by [`WeftMesh::start_without`]
    /// to the control plane.
    pub fn publish_pod(&self, testbed: &Testbed, pod: &str) -> Result<()> {
        let object = testbed
            .objects()
            .into_iter()
            .find(|object| is_pod(object, pod))
            .with_context(|| format!("no pod {pod} in the testbed"))?;
        self.write_manifest(&format!("pod-{pod}.yaml"), &object.to_string())
    }

    /// Tells every proxy about the pods of its node,
    /// as the container runtime does when it creates them: it runs weft's
    /// CNI plugin, after the network plugin's result, until it succeeds.
    pub fn announce_pods(&self, testbed: &Testbed, later: &[&str]) -> Result<()> {
        for node in self.proxies.keys() {
            // Without an answer from its proxy the plugin only lets pods of
            // namespaces the proxy's last config did not mesh start: wait
            // for the proxy to listen, then as a runtime does, until it says
            // yes.
            let socket = self.cni_socket(testbed, node);
            wait_until(STARTUP_TIMEOUT, || Ok(socket.exists()))
                .with_context(|| format!("{node}'s proxy never opened its CNI socket"))?;
            for pod in testbed.pods_on(node) {
                if later.contains(&pod.as_str()) {
                    continue;
                }
                let mut last = String::new();
                wait_until(STARTUP_TIMEOUT, || {
                    let (succeeded, said) = self.run_cni_plugin(testbed, node, &pod, "ADD")?;
                    last = said;
                    Ok(succeeded)
                })
                .with_context(|| {
                    format!("weft-cni ADD of {pod} on {node} never succeeded: {last}")
                })?;
            }
        }
        Ok(())
    }

    /// Runs weft's CNI plugin for `pod` on `node` with `command` (`ADD`,
    /// `DEL`) as a container runtime would: whether it succeeded, and what
    /// it printed.
    pub fn run_cni_plugin(
        &self,
        testbed: &Testbed,
        node: &str,
        pod: &str,
        command: &str,
    ) -> Result<(bool, String)> {
        use std::io::Write as _;
        let (netns, ips, namespace) = testbed.pod_network_of(pod)?;
        // The testbed's own UID, where its manifests are the cluster (an API
        // server gives pods UIDs of its own, which the runtime here does
        // not learn).
        let uid = if self.kubernetes.is_none() {
            format!(
                ";K8S_POD_UID={}",
                crate::manifests::pod_uid(&namespace, pod)
            )
        } else {
            String::new()
        };
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "testbed",
            "type": "weft-cni",
            "socket": self.cni_socket(testbed, node),
            "state_dir": self.proxy_state_dir(testbed, node),
            "exclude_namespaces": [],
            "prevResult": {
                "cniVersion": "1.0.0",
                "ips": ips.iter().map(|ip| serde_json::json!({"address": format!("{ip}/32")})).collect::<Vec<_>>(),
            },
        });
        let mut child = Command::new(weft_binary("weft-cni")?)
            .env("CNI_COMMAND", command)
            .env("CNI_NETNS", &netns)
            .env("CNI_CONTAINERID", pod)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}{uid}"),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting weft-cni")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(config.to_string().as_bytes())?;
        }
        let output = child.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok((output.status.success(), said))
    }

    /// The CNI socket of `node`'s proxy.
    pub fn cni_socket(&self, testbed: &Testbed, node: &str) -> PathBuf {
        testbed.dir().join(format!("cni-{node}.sock"))
    }
}
