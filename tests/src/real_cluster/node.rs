//! One node of a real cluster: its network namespace wired to the control
//! plane's bridge, a mount namespace of its own (held by a `sleep`), its
//! cgroup root, and containerd, the kubelet and kube-proxy in them.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::pki::Credentials;
use super::{
    APISERVER_IP, CLUSTER_CIDR, Cni, DNS_SERVICE_IP, KubeBinaries, apiserver_url, run_command,
};
use crate::process::{self, Process};
use crate::{cgroups, cleanup, netns};

/// Where a node's container runtime finds CNI plugins (in the node's own
/// `/var/lib`): the host's network plugins, and what weft installs.
pub(crate) const CNI_BIN_DIR: &str = "/var/lib/cni/bin";

/// Where a node's container runtime reads its network configuration.
pub(crate) const CNI_CONF_DIR: &str = "/var/lib/cni/net.d";

/// The `/proc/sys` entries the kubelet sets machine-wide unless they
/// already hold these values.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];
/// How long a daemon may take to open its socket or port.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct NodeSpec<'a> {
    pub name: &'a str,
    /// From 1.
    pub index: usize,
    pub all_nodes: usize,
    pub prefix: &'a str,
    pub control_netns: &'a str,
    pub cni: Cni,
    pub dir: &'a Path,
    pub binaries: &'a KubeBinaries,
    pub credentials: &'a Credentials,
    pub images: &'a [PathBuf],
}

pub(super) struct Node {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    /// `<prefix>-<name>`: the cgroup root in every hierarchy.
    cgroup: String,
    holder: Option<Process>,
    /// Device and inode of the node's mount namespace.
    mount_ns: Option<(u64, u64)>,
    containerd: Option<Process>,
    /// Where the node's containerd listens.
    containerd_socket: PathBuf,
    kubelet: Option<Process>,
    kube_proxy: Option<Process>,
}

fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 10 + index as u8)
}

impl Node {
    pub fn start(spec: NodeSpec<'_>) -> Result<Node> {
        let mut node = Node {
            name: spec.name.to_owned(),
            netns: format!("{}-{}", spec.prefix, spec.name),
            ip: node_ip(spec.index),
            cgroup: format!("{}-{}", spec.prefix, spec.name),
            holder: None,
            mount_ns: None,
            containerd: None,
            containerd_socket: Self::containerd_socket(spec.dir),
            kubelet: None,
            kube_proxy: None,
        };
        // Torn down by the caller's drop of the cluster only once pushed:
        // tear down here what a failed start left.
        match node.boot(&spec) {
            Ok(()) => Ok(node),
            Err(e) => {
                node.tear_down();
                Err(e)
            }
        }
    }

    fn boot(&mut self, spec: &NodeSpec<'_>) -> Result<()> {
        std::fs::create_dir_all(spec.dir)?;
        let dir = spec.dir;
        self.wire(spec)?;
        self.make_cgroups()?;
        self.start_holder(dir)?;
        self.start_containerd(dir)?;
        for image in spec.images {
            self.import(dir, image)?;
        }
        self.write_cni_config(spec)?;
        self.start_kubelet(spec)?;
        self.start_kube_proxy(spec)?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn wire(&self, spec: &NodeSpec<'_>) -> Result<()> {
        cleanup::track_netns(&self.netns);
        netns::create(&self.netns)?;
        let port = format!("n{}", spec.index);
        let pod_cidr = |n: usize| format!("10.244.{n}.0/24");
        netns::ip_batch(
            spec.control_netns,
            &[
                format!(
                    "link add {port} type veth peer name eth0 netns {}",
                    self.netns
                ),
                format!("link set {port} master br0"),
                format!("link set {port} up"),
                format!("route add {} via {}", pod_cidr(spec.index), self.ip),
            ],
        )?;
        let mut commands = vec![
            format!("addr add {}/24 dev eth0", self.ip),
            "link set eth0 up".to_owned(),
            format!("route add default via {APISERVER_IP}"),
        ];
        for other in (1..=spec.all_nodes).filter(|&n| n != spec.index) {
            commands.push(format!(
                "route add {} via {}",
                pod_cidr(other),
                node_ip(other)
            ));
        }
        netns::ip_batch(&self.netns, &commands)?;
        let mut sysctls = vec![
            ("ipv4/ip_forward".to_owned(), "1"),
            ("ipv4/conf/all/rp_filter".to_owned(), "0"),
            ("ipv4/conf/default/rp_filter".to_owned(), "0"),
        ];
        if spec.cni == Cni::Bridge {
            sysctls.push(("bridge/bridge-nf-call-iptables".to_owned(), "1"));
        }
        netns::set_sysctls(&self.netns, &sysctls)
    }

    /// Creates the node's cgroup root in every hierarchy (the kubelet wants
    /// it everywhere), with cpuset's cpus and mems copied from the parent.
    fn make_cgroups(&self) -> Result<()> {
        cleanup::track_cgroup(&self.cgroup);
        for hierarchy in cgroups::hierarchies()? {
            let path = hierarchy.join(&self.cgroup);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating cgroup {}", path.display()))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                    std::fs::write(path.join(file), value.trim())
                        .with_context(|| format!("writing {}/{file}", path.display()))?;
                }
            }
        }
        Ok(())
    }

    /// Starts the `sleep` that holds the node's mount namespace and mounts
    /// what the node's daemons must not share with the host. Its `/` and
    /// `/run` are shared mounts inside it (as on a systemd host), so that a
    /// pod's `HostToContainer` volume sees later mounts, such as the
    /// runtime's new pod network namespaces; the host's own mounts are
    /// untouched.
    fn start_holder(&mut self, dir: &Path) -> Result<()> {
        let mut command = Command::new("unshare");
        command.args([
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sleep",
            "infinity",
        ]);
        let holder = self.spawn(dir, "mount-holder", command)?;
        let pid = holder.pid();
        self.holder = Some(holder);
        let ours = std::fs::metadata("/proc/self/ns/mnt")?;
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        let theirs = loop {
            let meta = std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                .context("the mount holder exited")?;
            if meta.ino() != ours.ino() || meta.dev() != ours.dev() {
                break meta;
            }
            if Instant::now() > deadline {
                bail!("the mount holder never entered a mount namespace of its own");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.mount_ns = Some((theirs.dev(), theirs.ino()));

        let sysctls = dir.join("sysctls");
        std::fs::create_dir_all(&sysctls)?;
        let mut script = String::from(
            "set -e\n\
             mount -t tmpfs -o mode=755 weft-run /run\n\
             mount -t tmpfs -o mode=755 weft-var-lib /var/lib\n\
             mount -t tmpfs -o mode=755 weft-var-log /var/log\n\
             mount --make-shared /\n\
             mount --make-shared /run\n",
        );
        // The node's CNI directories where a node has them by default, in
        // its private /var/lib: the network plugins (links to the host's),
        // and the configuration the harness writes (bound from the node's
        // directory), which weft's proxy edits as on any node.
        let conf_dir = dir.join("cni/net.d");
        std::fs::create_dir_all(&conf_dir)?;
        let _ = writeln!(
            script,
            "mkdir -p {CNI_BIN_DIR} {CNI_CONF_DIR}\n\
             for plugin in /usr/lib/cni/*; do ln -s \"$plugin\" {CNI_BIN_DIR}/; done\n\
             mount --bind {} {CNI_CONF_DIR}",
            conf_dir.display()
        );
        for (key, value) in KUBELET_SYSCTLS {
            let file = sysctls.join(key.replace('/', "."));
            std::fs::write(&file, format!("{value}\n"))?;
            let _ = writeln!(
                script,
                "mount --bind {file} /proc/sys/{key}\nmount -o remount,bind,ro /proc/sys/{key}",
                file = file.display()
            );
        }
        let mut mount = Command::new("nsenter");
        mount
            .arg("-t")
            .arg(pid.to_string())
            .args(["-m", "--", "sh", "-c", &script]);
        run_command(mount).context("mounting the node's private directories")?;
        Ok(())
    }

    /// The text of `file` on the node (empty if it cannot be read).
    pub fn read_file(&self, file: &str) -> Result<String> {
        let mut command = self.in_node(Path::new("cat"))?;
        command.arg(file);
        Ok(run_command(command).unwrap_or_default())
    }

    /// The files and directories under `dir` on the node (its own
    /// `/var/lib`, `/run`, ...), or nothing when `dir` does not exist.
    pub fn files_under(&self, dir: &str) -> Result<Vec<String>> {
        let mut command = self.in_node(Path::new("find"))?;
        command.args([dir, "-mindepth", "1"]);
        let listing = run_command(command).unwrap_or_default();
        Ok(listing.lines().map(str::to_owned).collect())
    }

    /// A command run by `nsenter` in the node's mount namespace (and,
    /// spawned from the node's network namespace, in that one).
    fn in_node(&self, program: &Path) -> Result<Command> {
        let holder = self
            .holder
            .as_ref()
            .context("the node has no mount holder")?;
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(holder.pid().to_string())
            .arg("-m")
            .arg("--")
            .arg(program);
        Ok(command)
    }

    fn spawn(&self, dir: &Path, label: &str, command: Command) -> Result<Process> {
        process::spawn(
            &self.netns,
            command,
            format!("{label} on {}", self.name),
            dir.join(format!("{label}.stdout")),
            dir.join(format!("{label}.log")),
        )
    }

    fn containerd_socket(dir: &Path) -> PathBuf {
        dir.join("containerd/containerd.sock")
    }

    fn start_containerd(&mut self, dir: &Path) -> Result<()> {
        let state = dir.join("containerd");
        std::fs::create_dir_all(&state)?;
        let config = state.join("config.toml");
        let d = state.display();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/weft-test/pause:3.10"
  restrict_oom_score_adj = true
  # Pods' namespaces in the node's own /run/netns, as on any node, where
  # weft's proxy finds them (the node's /run is private to it).
  netns_mounts_under_state_dir = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{CNI_CONF_DIR}"
"#,
            ),
        )?;
        let mut command = self.in_node(Path::new("/usr/bin/containerd"))?;
        command.arg("--config").arg(&config);
        self.containerd = Some(self.spawn(dir, "containerd", command)?);
        let socket = Self::containerd_socket(dir);
        crate::wait_until(DAEMON_TIMEOUT, || Ok(socket.exists()))
            .context("waiting for containerd's socket")
    }

    /// Gives image `from` (already on the node) a second name, `to`, as a
    /// registry would serve a new version under a new tag.
    pub fn tag_image(&self, from: &str, to: &str) -> Result<()> {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address")
            .arg(&self.containerd_socket)
            .args(["-n", "k8s.io", "images", "tag", "--force", from, to]);
        run_command(ctr).with_context(|| format!("tagging {from} as {to} on {}", self.name))?;
        Ok(())
    }

    fn import(&self, dir: &Path, archive: &Path) -> Result<()> {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address")
            .arg(Self::containerd_socket(dir))
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive);
        run_command(ctr)
            .with_context(|| format!("importing {} into {}", archive.display(), self.name))?;
        Ok(())
    }

    fn write_cni_config(&self, spec: &NodeSpec<'_>) -> Result<()> {
        let conf_dir = spec.dir.join("cni/net.d");
        std::fs::create_dir_all(&conf_dir)?;
        let ipam = format!(
            r#"{{"type": "host-local", "ranges": [[{{"subnet": "10.244.{}.0/24"}}]], "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}"#,
            spec.index,
            spec.dir.join("cni/ipam").display()
        );
        let plugin = match spec.cni {
            Cni::Bridge => format!(
                r#"{{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true, "ipam": {ipam}}}"#
            ),
            Cni::Ptp => format!(r#"{{"type": "ptp", "ipMasq": false, "ipam": {ipam}}}"#),
        };
        std::fs::write(
            conf_dir.join("10-weft-test.conflist"),
            format!(r#"{{"cniVersion": "0.4.0", "name": "weft-test", "plugins": [{plugin}]}}"#),
        )?;
        Ok(())
    }

    fn start_kubelet(&mut self, spec: &NodeSpec<'_>) -> Result<()> {
        let dir = spec.dir;
        let config = dir.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\n\
                 kind: KubeletConfiguration\n\
                 failCgroupV1: false\n\
                 cgroupDriver: cgroupfs\n\
                 cgroupRoot: /{cgroup}\n\
                 containerRuntimeEndpoint: unix://{socket}\n\
                 podLogsDir: {logs}\n\
                 address: {ip}\n\
                 readOnlyPort: 0\n\
                 healthzBindAddress: 127.0.0.1\n\
                 authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: true}}\n  \
                 x509: {{clientCAFile: {ca}}}\n\
                 authorization: {{mode: Webhook}}\n\
                 clusterDomain: cluster.local\n\
                 clusterDNS: [{DNS_SERVICE_IP}]\n\
                 resolvConf: \"\"\n\
                 failSwapOn: false\n\
                 protectKernelDefaults: false\n\
                 serializeImagePulls: false\n\
                 imageGCHighThresholdPercent: 100\n\
                 imageGCLowThresholdPercent: 99\n\
                 evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}}\n\
                 shutdownGracePeriod: 0s\n",
                cgroup = self.cgroup,
                socket = Self::containerd_socket(dir).display(),
                logs = dir.join("pod-logs").display(),
                ip = self.ip,
                ca = spec.credentials.file("ca.pem").display(),
            ),
        )?;
        let kubeconfig = dir.join("kubelet.kubeconfig");
        spec.credentials.write_kubeconfig(
            &kubeconfig,
            &apiserver_url(),
            &format!("system:node:{}", self.name),
        )?;
        let mut command = self.in_node(&spec.binaries.bin("kubelet"))?;
        command
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--hostname-override={}", self.name))
            .arg(format!("--node-ip={}", self.ip));
        self.kubelet = Some(self.spawn(dir, "kubelet", command)?);
        Ok(())
    }

    fn start_kube_proxy(&mut self, spec: &NodeSpec<'_>) -> Result<()> {
        let dir = spec.dir;
        let kubeconfig = dir.join("kube-proxy.kubeconfig");
        spec.credentials
            .write_kubeconfig(&kubeconfig, &apiserver_url(), "system:kube-proxy")?;
        let config = dir.join("kube-proxy.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
                 kind: KubeProxyConfiguration\n\
                 mode: nftables\n\
                 clientConnection: {{kubeconfig: {}}}\n\
                 hostnameOverride: {}\n\
                 clusterCIDR: {CLUSTER_CIDR}\n\
                 healthzBindAddress: 127.0.0.1:10256\n\
                 metricsBindAddress: 127.0.0.1:10249\n\
                 conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}\n",
                kubeconfig.display(),
                self.name,
            ),
        )?;
        let mut command = self.in_node(&spec.binaries.bin("kube-proxy"))?;
        command.arg(format!("--config={}", config.display()));
        self.kube_proxy = Some(self.spawn(dir, "kube-proxy", command)?);
        Ok(())
    }

    /// The network namespace of the pod with `uid`, through a process in
    /// its cgroup (any container of a pod shares the sandbox's namespace).
    pub fn pod_netns(&self, uid: &str) -> Result<std::fs::File> {
        let hierarchy = Path::new(cgroups::CGROUP_FS)
            .join("pids")
            .join(&self.cgroup);
        let wanted = format!("pod{uid}");
        let mut stack = vec![hierarchy];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_dir() {
                    continue;
                }
                if entry.file_name().to_string_lossy() == wanted {
                    for pid in cgroups::pids_below(&path) {
                        if let Ok(file) = std::fs::File::open(format!("/proc/{pid}/ns/net")) {
                            return Ok(file);
                        }
                    }
                    bail!("pod {uid} on {} has no running process", self.name);
                }
                stack.push(path);
            }
        }
        bail!("no cgroup of pod {uid} on {}", self.name)
    }

    /// Stops everything of the node and removes what it made. Best effort:
    /// problems are printed, never returned, so the rest still goes.
    pub fn tear_down(mut self) {
        self.tear_down_in_place();
    }

    fn tear_down_in_place(&mut self) {
        if let Some(kubelet) = self.kubelet.take() {
            let _ = kubelet.stop();
        }
        // Containers first (they live in the cgroups, not in any process
        // group of ours), then containerd and its shims.
        cgroups::kill(&self.cgroup);
        for process in [self.kube_proxy.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            let _ = process.stop();
        }
        if let Some((dev, ino)) = self.mount_ns.take() {
            kill_mount_namespace(dev, ino);
        }
        if let Some(holder) = self.holder.take() {
            let _ = holder.stop();
        }
        cgroups::kill(&self.cgroup);
        cgroups::remove(&self.cgroup);
        cleanup::untrack_cgroup(&self.cgroup);
        cleanup::untrack_netns(&self.netns);
        if let Err(e) = netns::delete(&self.netns) {
            eprintln!("real cluster: {e:#}");
        }
    }
}

/// SIGKILLs every process whose mount namespace is (`dev`, `ino`).
fn kill_mount_namespace(dev: u64, ino: u64) {
    for pid in netns::pids_sharing("mnt", dev, ino).unwrap_or_default() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
