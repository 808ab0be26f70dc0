//! weft on the real cluster, installed and removed the way the README tells
//! a user to (`helm install` of `deploy/helm/weft`, which carries the CRDs,
//! with the images of `scripts/images.sh` already on the nodes), and what a
//! user checks on a node: weft's rules, and the packets on the wire.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::RealCluster;
use crate::process::{self, Process};

/// The release and namespace weft is installed as.
pub const RELEASE: &str = "weft";
/// weft's namespace.
pub const WEFT_NAMESPACE: &str = "weft-system";
/// How long tcpdump may take to start listening.
/// Where the chart has node proxies keep their state on the node.
const PROXY_STATE_DIR: &str = "/var/lib/weft/proxy";
const CAPTURE_START: Duration = Duration::from_secs(30);

impl RealCluster {
    /// `helm install weft deploy/helm/weft -n weft-system --create-namespace`
    /// and waits until the control plane and a proxy on every node are
    /// ready.
    pub fn install_weft(&self) -> Result<()> {
        let chart = crate::repo_root().join("deploy/helm/weft");
        self.helm(&[
            "install",
            RELEASE,
            &chart.to_string_lossy(),
            "--namespace",
            WEFT_NAMESPACE,
            "--create-namespace",
            "--set",
            &format!("cni.binDir={}", super::node::CNI_BIN_DIR),
            "--set",
            &format!("cni.confDir={}", super::node::CNI_CONF_DIR),
        ])?;
        for workload in ["deployment/weft-control-plane", "daemonset/weft-node-proxy"] {
            self.kubectl(&[
                "-n",
                WEFT_NAMESPACE,
                "rollout",
                "status",
                workload,
                &format!("--timeout={}s", super::READY_TIMEOUT.as_secs()),
            ])?;
        }
        Ok(())
    }

    /// `helm uninstall weft`, then waits until no weft pod is left.
    pub fn uninstall_weft(&self) -> Result<()> {
        self.helm(&[
            "uninstall",
            RELEASE,
            "--namespace",
            WEFT_NAMESPACE,
            "--wait",
        ])?;
        self.wait_until("every weft pod gone", || {
            let pods = self.kubectl(&["-n", WEFT_NAMESPACE, "get", "pods", "-o", "name"])?;
            Ok(pods.trim().is_empty())
        })
    }

    /// Kills the node proxy on `node` with SIGKILL, as a crash or the OOM
    /// killer would (the kubelet restarts its container, after a backoff),
    /// and returns its pid.
    pub fn kill_proxy_on(&self, node: &str) -> Result<u32> {
        let proxy = *self
            .proxy_processes_on(node)?
            .last()
            .with_context(|| format!("no weft-proxy process in {node}'s network namespace"))?;
        let pid = i32::try_from(proxy).context("a pid that does not fit a pid_t")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .with_context(|| format!("killing weft-proxy {proxy} on {node}"))?;
        Ok(proxy)
    }

    /// Waits until every node proxy is ready again (a restarted or
    /// replaced one included).
    pub fn wait_for_proxies(&self) -> Result<()> {
        self.wait_until("every node proxy ready", || {
            let ready = self.kubectl(&[
                "-n",
                WEFT_NAMESPACE,
                "get",
                "daemonset/weft-node-proxy",
                "-o",
                "jsonpath={.status.numberReady}/{.status.desiredNumberScheduled}",
            ])?;
            let (ready, desired) = ready.trim().split_once('/').unwrap_or(("0", "-"));
            Ok(ready == desired)
        })?;
        self.kubectl(&[
            "-n",
            WEFT_NAMESPACE,
            "rollout",
            "status",
            "daemonset/weft-node-proxy",
            &format!("--timeout={}s", super::READY_TIMEOUT.as_secs()),
        ])
        .map(drop)
    }

    /// Runs `weft-control-plane check` (this checkout's build, as a user
    /// runs it) with `args`, as the admin in the control-plane namespace,
    /// where the API server is: whether it passed, and what it printed.
    pub fn weft_check(&self, args: &[&str]) -> Result<(bool, String)> {
        let mut command = Command::new(crate::weft_binary("weft-control-plane")?);
        command
            .arg("check")
            .args(args)
            .env("KUBECONFIG", self.admin_kubeconfig());
        let output = crate::netns::run_in(&self.control_netns, move || command.output())?
            .context("running weft-control-plane check")?;
        crate::check_outcome(&output)
    }

    /// Scales the control plane to `replicas` and waits until exactly that
    /// many of its pods run.
    pub fn scale_control_plane(&self, replicas: u32) -> Result<()> {
        self.kubectl(&[
            "-n",
            WEFT_NAMESPACE,
            "scale",
            "deployment/weft-control-plane",
            &format!("--replicas={replicas}"),
        ])?;
        self.wait_until(&format!("{replicas} control-plane pods"), || {
            let pods = self.kubectl(&[
                "-n",
                WEFT_NAMESPACE,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=weft-control-plane",
                "-o",
                "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
            ])?;
            let running = pods.lines().filter(|phase| *phase == "Running").count();
            Ok(running == replicas as usize && pods.lines().count() == replicas as usize)
        })?;
        if replicas > 0 {
            self.kubectl(&[
                "-n",
                WEFT_NAMESPACE,
                "rollout",
                "status",
                "deployment/weft-control-plane",
                &format!("--timeout={}s", super::READY_TIMEOUT.as_secs()),
            ])?;
        }
        Ok(())
    }

    /// Deletes the node proxy's pod on `node` as a rollout does (SIGTERM,
    /// its drain) and waits until its replacement is ready.
    pub fn replace_proxy_on(&self, node: &str) -> Result<()> {
        let name = self.kubectl(&[
            "-n",
            WEFT_NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=weft-node-proxy",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        self.kubectl(&["-n", WEFT_NAMESPACE, "delete", "pod", name.trim()])?;
        self.wait_for_proxies()
    }

    /// What weft left on `node`: its nftables table, policy-routing rules
    /// and routes, and the files of the proxy's kept state (empty when
    /// nothing).
    pub fn weft_state_on(&self, node: &str) -> Result<Vec<String>> {
        let netns = self.node_netns(node)?.to_owned();
        let mut found = Vec::new();
        let run = |args: &[&str]| {
            let mut command = Command::new(args[0]);
            command.args(&args[1..]);
            super::run_command(command)
        };
        let tables = run(&["ip", "netns", "exec", &netns, "nft", "list", "tables"])?;
        found.extend(
            tables
                .lines()
                .filter(|l| l.contains("weft"))
                .map(str::to_owned),
        );
        for family in ["-4", "-6"] {
            let rules = run(&["ip", family, "-n", &netns, "rule", "show"])?;
            found.extend(
                rules
                    .lines()
                    .filter(|l| l.contains("lookup 100"))
                    .map(|l| format!("rule {l}")),
            );
            // A table nothing was ever put in does not exist.
            let routes = run(&["ip", family, "-n", &netns, "route", "show", "table", "100"])
                .or_else(|e| {
                    if format!("{e:#}").contains("does not exist") {
                        Ok(String::new())
                    } else {
                        Err(e)
                    }
                })?;
            found.extend(routes.lines().map(|l| format!("route {l}")));
        }
        let state = self.node(node)?.files_under(PROXY_STATE_DIR)?;
        found.extend(state.into_iter().map(|file| format!("file {file}")));
        // weft's CNI plugin: its binary, and its entry in the network
        // configuration.
        let plugins = self.node(node)?.files_under(super::node::CNI_BIN_DIR)?;
        found.extend(
            plugins
                .into_iter()
                .filter(|file| file.contains("weft"))
                .map(|file| format!("file {file}")),
        );
        for conflist in self.node(node)?.files_under(super::node::CNI_CONF_DIR)? {
            if self.node(node)?.read_file(&conflist)?.contains("weft-cni") {
                found.push(format!("weft-cni in {conflist}"));
            }
        }
        Ok(found)
    }

    /// Starts tcpdump on `node`'s link to the other nodes (its `eth0`).
    pub fn capture_node_link(&self, node: &str) -> Result<LinkCapture> {
        let file = self.dir()?.join(format!(
            "{node}-{}.pcap",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        let mut command = Command::new("tcpdump");
        command
            .args([
                "-i",
                "eth0",
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp");
        let process = process::spawn(
            self.node_netns(node)?,
            command,
            format!("tcpdump on {node}"),
            file.with_extension("stdout"),
            file.with_extension("stderr"),
        )?;
        process.wait_for_output("listening on", CAPTURE_START)?;
        Ok(LinkCapture { process, file })
    }
}

/// A running capture; [`LinkCapture::finish`] stops it.
pub struct LinkCapture {
    process: Process,
    file: PathBuf,
}

/// What a capture saw.
pub struct Captured {
    /// The raw pcap file.
    pub bytes: Vec<u8>,
    file: PathBuf,
}

impl LinkCapture {
    /// [`LinkCapture::finish_after`] the answer of `server` to a request:
    /// from its HBONE port when `meshed` (through the tunnel), else from
    /// the app's port.
    pub fn finish_after_answer(self, server: std::net::Ipv4Addr, meshed: bool) -> Result<Captured> {
        let port = if meshed { 15008 } else { super::APP_PORT };
        self.finish_after(&format!("src host {server} and src port {port}"))
    }

    /// Waits until tcpdump has written a packet matching `filter` (e.g. the
    /// last answer of an exchange: it writes packets in the order it sees
    /// them, so everything before is in the file too), then stops it.
    pub fn finish_after(self, filter: &str) -> Result<Captured> {
        let deadline = std::time::Instant::now() + CAPTURE_START;
        loop {
            let seen = Captured {
                bytes: Vec::new(),
                file: self.file.clone(),
            };
            if seen.count(filter)? > 0 {
                return self.finish();
            }
            if std::time::Instant::now() > deadline {
                bail!("tcpdump never wrote a packet matching {filter:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops tcpdump and reads what it wrote.
    pub fn finish(self) -> Result<Captured> {
        self.process.stop()?;
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        Ok(Captured {
            bytes,
            file: self.file,
        })
    }
}

impl Captured {
    /// Whether `needle` appears anywhere in the captured packets.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    /// How many captured packets match tcpdump filter `filter`.
    pub fn count(&self, filter: &str) -> Result<usize> {
        let output = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .arg(filter)
            .output()
            .context("running tcpdump -r")?;
        if !output.status.success() {
            bail!(
                "tcpdump -r {} {filter}: {}",
                self.file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).lines().count())
    }
}
