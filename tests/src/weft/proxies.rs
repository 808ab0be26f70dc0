//! The node proxies' processes: started, killed, stopped as Kubernetes
//! does, and upgraded (a new process beside the running one takes its
//! sockets over).

use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{HANDED_OVER, STARTUP_TIMEOUT, WeftMesh, weft_binary};
use crate::{Process, Target, Testbed};

impl WeftMesh {
    /// Kills `node`'s proxy with SIGKILL, as a crash or an OOM kill would:
    /// none of its own clean-up runs.
    pub fn kill_proxy(&mut self, node: &str) -> Result<()> {
        let process = self
            .proxies
            .remove(node)
            .with_context(|| format!("no proxy runs on {node}"))?;
        process.signal(nix::sys::signal::Signal::SIGKILL)?;
        process.wait(STARTUP_TIMEOUT)?;
        Ok(())
    }

    /// Stops `node`'s proxy as Kubernetes does (SIGTERM, its drain) and
    /// returns how it exited.
    pub fn stop_proxy(&mut self, node: &str) -> Result<std::process::ExitStatus> {
        self.proxies
            .remove(node)
            .with_context(|| format!("no proxy runs on {node}"))?
            .stop()
    }

    /// Starts `node`'s proxy (again), with the state directory it had.
    pub fn start_proxy(&mut self, testbed: &Testbed, node: &str) -> Result<()> {
        if self.proxies.contains_key(node) {
            bail!("a proxy already runs on {node}");
        }
        let process = self.spawn_proxy(testbed, node)?;
        self.proxies.insert(node.to_owned(), process);
        Ok(())
    }

    /// Upgrades `node`'s proxy as a DaemonSet rollout with `maxSurge: 1`
    /// does: starts a new proxy process beside the running one (it takes
    /// the sockets over), waits until the old one says the new one serves,
    /// then sends the old one SIGTERM. Returns the old process, draining
    /// its open connections: it exits once they have ended.
    pub fn upgrade_proxy(&mut self, testbed: &Testbed, node: &str) -> Result<Process> {
        self.upgrade_proxy_with(testbed, node, &[])
    }

    /// [`WeftMesh::upgrade_proxy`] to a proxy with more arguments.
    pub fn upgrade_proxy_with(
        &mut self,
        testbed: &Testbed,
        node: &str,
        more_args: &[&str],
    ) -> Result<Process> {
        let new = self.spawn_proxy_with(testbed, node, more_args)?;
        self.upgrade_proxy_to(node, new)
    }

    /// [`WeftMesh::upgrade_proxy_with`] to a proxy whose log (stdout) goes
    /// to `stdout`, such as a FIFO the test holds open and never reads (a
    /// log sink that has stopped).
    pub fn upgrade_proxy_logging_to(
        &mut self,
        testbed: &Testbed,
        node: &str,
        more_args: &[&str],
        stdout: &std::path::Path,
    ) -> Result<Process> {
        let proxy = self.proxy_command(testbed, node, more_args)?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"out="$1"; shift; exec "$@" > "$out""#)
            .arg("sh")
            .arg(stdout)
            .arg(proxy.get_program())
            .args(proxy.get_args());
        for (name, value) in proxy.get_envs() {
            if let Some(value) = value {
                command.env(name, value);
            }
        }
        let new = testbed.spawn(Target::Node(node), command)?;
        self.upgrade_proxy_to(node, new)
    }

    /// The second half of an upgrade: `new` runs beside the old proxy.
    fn upgrade_proxy_to(&mut self, node: &str, new: Process) -> Result<Process> {
        let old = self
            .proxies
            .insert(node.to_owned(), new)
            .with_context(|| format!("no proxy runs on {node}"))?;
        old.wait_for_output(HANDED_OVER, STARTUP_TIMEOUT)
            .with_context(|| format!("{node}'s running proxy never handed over"))?;
        old.signal(nix::sys::signal::Signal::SIGTERM)?;
        Ok(old)
    }

    /// Starts a new proxy process for `node` beside whatever runs there
    /// (see [`WeftMesh::upgrade_proxy`]) without tracking it as the node's
    /// proxy.
    pub fn spawn_proxy(&self, testbed: &Testbed, node: &str) -> Result<Process> {
        self.spawn_proxy_with(testbed, node, &[])
    }

    /// [`WeftMesh::spawn_proxy`] with more arguments.
    pub fn spawn_proxy_with(
        &self,
        testbed: &Testbed,
        node: &str,
        more_args: &[&str],
    ) -> Result<Process> {
        let command = self.proxy_command(testbed, node, more_args)?;
        testbed.spawn(Target::Node(node), command)
    }

    /// The command that starts `node`'s proxy, with `more_args`.
    fn proxy_command(&self, testbed: &Testbed, node: &str, more_args: &[&str]) -> Result<Command> {
        let mut command = Command::new(weft_binary("weft-proxy")?);
        command
            .arg("--node")
            .arg(node)
            .arg("--control-plane")
            .arg(self.control_plane_addr(testbed)?.to_string())
            .arg("--token-file")
            .arg(testbed.dir().join(format!("token-{node}")))
            .arg("--root-cert")
            .arg(self.state_dir.join("root-cert.pem"))
            .arg("--state-dir")
            .arg(self.proxy_state_dir(testbed, node))
            .arg("--admin-socket")
            .arg(self.admin_socket(testbed, node))
            .env("WEFT_LOG_LEVEL", &self.proxy_log_level)
            // The dashboard's traffic shows within a second, not ten.
            .env("WEFT_TRAFFIC_REPORT_INTERVAL_SECONDS", "1");
        // Several testbeds plan the same pod addresses side by side: pods
        // are known from announcements and the state directory, never from
        // a search of the machine's namespaces.
        command
            .arg("--cni-socket")
            .arg(self.cni_socket(testbed, node))
            .arg("--find-running-pods=false")
            .args(more_args);
        Ok(command)
    }

    /// Where `node`'s proxy takes changes (`--admin-socket`).
    pub fn admin_socket(&self, testbed: &Testbed, node: &str) -> std::path::PathBuf {
        testbed.dir().join(format!("admin-{node}.sock"))
    }

    /// Runs `weft-proxy admin <args>` against `node`'s proxy, as an
    /// operator does in the proxy's container: whether the proxy took the
    /// change, and what it answered.
    pub fn admin_command(
        &self,
        testbed: &Testbed,
        node: &str,
        args: &[&str],
    ) -> Result<(bool, String)> {
        let output = Command::new(weft_binary("weft-proxy")?)
            .arg("admin")
            .arg("--admin-socket")
            .arg(self.admin_socket(testbed, node))
            .args(args)
            .output()
            .context("running weft-proxy admin")?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok((output.status.success(), said))
    }

    /// Runs the DaemonSet's readiness probe (`weft-proxy probe-ready`) on
    /// `node` as the probe of pod `pod_uid`'s container does: `Ok(answer)`
    /// when ready, `Err(why)` when not.
    pub fn probe_ready(
        &self,
        testbed: &Testbed,
        node: &str,
        pod_uid: &str,
    ) -> Result<std::result::Result<String, String>> {
        let mut command = Command::new(weft_binary("weft-proxy")?);
        command.args(["probe-ready", "--pod-uid", pod_uid]);
        let probe = testbed.spawn(Target::Node(node), command)?;
        let status = probe.wait(STARTUP_TIMEOUT)?;
        Ok(if status.success() {
            Ok(probe.stdout()?.trim().to_owned())
        } else {
            Err(probe.stderr()?.trim().to_owned())
        })
    }

    /// Replaces the process tracked as `node`'s proxy (one started by
    /// [`WeftMesh::spawn_proxy`]); returns the one it was.
    pub fn replace_proxy(&mut self, node: &str, process: Process) -> Option<Process> {
        self.proxies.insert(node.to_owned(), process)
    }
}
