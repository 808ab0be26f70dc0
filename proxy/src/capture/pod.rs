//! Redirection inside a pod's network namespace (see the module above for
//! why): a small table in each meshed pod's namespace sends its TCP to
//! listeners the proxy opens inside that namespace.
//!
//! In the pod's namespace ([`pod_ruleset`]):
//! - TCP the pod opens (`output`) goes to `127.0.0.1:<outbound>` (`[::1]`
//!   for IPv6) by `redirect`, except the proxy's own (its `SO_MARK`) and
//!   the pod's connections to itself (`lo`);
//! - TCP arriving for the pod (`prerouting`) goes to `<pod IP>:<inbound
//!   plaintext>`, except to the HBONE port, where the proxy listens itself,
//!   and from the node itself to the pod's probe ports (the kubelet's
//!   probes), which the node sends from its own source address
//!   ([`super::node_source`]);
//! - the proxy reaches the pod's application from the client's own address
//!   (a transparent socket, marked): conntrack remembers the mark, and the
//!   application's replies are routed to `lo` (policy routing on the
//!   capture mark), back to that socket, instead of out of the pod.
//!
//! It fails closed by construction: while no proxy listens in the pod, the
//! redirected connections are refused (a reset), in both directions; the
//! table stays with the pod's namespace whatever happens to the proxy.
//! The proxy learns where a redirected connection was going from
//! `SO_ORIGINAL_DST` ([`crate::sockets::redirected_destination`]), and
//! which pod it came from from the listener that accepted it, which no
//! other pod can forge.
//!
//! This file installs and removes those rules, finds and enters namespaces
//! ([`PodNetns`]); `dataplane::pods` serves pods through it, and the CNI
//! plugin (`cni_plugin`) has it set up before a pod's first container runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::command::run;
use super::node_source::{NODE_SOURCE, NODE_SOURCE_V6};
use super::routing::{self, Family};
use super::{CaptureConfig, CaptureError, TABLE_NAME};

/// Identifies a network namespace on the node (its `nsfs` inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetnsId {
    /// `st_dev` of the namespace file.
    pub dev: u64,
    /// `st_ino` of the namespace file.
    pub ino: u64,
}

/// An open handle on a pod's network namespace (its nsfs file, e.g.
/// `/var/run/netns/cni-...` or `/proc/<pid>/ns/net`). Holding it keeps the
/// namespace alive, so hold it only while the pod is.
#[derive(Debug)]
pub struct PodNetns {
    file: File,
    path: PathBuf,
}

impl PodNetns {
    /// Opens the namespace at `path`, which must be one (an `nsfs` file):
    /// opened without blocking, so that a path that names a FIFO or a
    /// device cannot hang the proxy.
    pub fn open(path: &Path) -> Result<PodNetns, CaptureError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let failed = |source| CaptureError::Namespace {
            operation: format!("opening the network namespace {}", path.display()),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(failed)?;
        let namespace = nix::sys::statfs::fstatfs(&file)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
        if !namespace {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a namespace",
            )));
        }
        Ok(PodNetns {
            file,
            path: path.to_owned(),
        })
    }

    /// Where it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which namespace this is: another open of the same one has the same
    /// id, whatever path it was opened from.
    pub fn id(&self) -> Result<NetnsId, CaptureError> {
        let stat = nix::sys::stat::fstat(&self.file).map_err(|errno| CaptureError::Namespace {
            operation: format!("reading the network namespace {}", self.path.display()),
            source: std::io::Error::from(errno),
        })?;
        Ok(NetnsId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }

    /// Runs `f` inside this namespace, on a thread of its own (a thread
    /// that entered another namespace is not given back): sockets `f`
    /// makes belong to the pod's namespace, and so do the commands it
    /// starts.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, CaptureError> {
        let entered = |source| CaptureError::Namespace {
            operation: format!("entering the network namespace {}", self.path.display()),
            source,
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|errno| entered(std::io::Error::from(errno)))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(entered(std::io::Error::other(
                        "the thread in the namespace panicked",
                    )))
                })
        })
    }
}

impl PodNetns {
    /// Runs `f` on the calling thread inside this namespace, then returns
    /// the thread to the node's namespace: cheap enough for every socket
    /// the proxy makes in a pod (two `setns` calls), where
    /// [`PodNetns::run_in`] starts a thread. `f` must not block or yield.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T, CaptureError> {
        let home = home_namespace()?;
        nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|errno| {
            CaptureError::Namespace {
                operation: format!("entering the network namespace {}", self.path.display()),
                source: std::io::Error::from(errno),
            }
        })?;
        // Back home however `f` ends, a panic included (the runtime would
        // go on using this thread).
        let _home = ReturnHome(home);
        Ok(f())
    }
}

/// Returns the calling thread to the node's namespace when dropped.
struct ReturnHome(&'static File);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        if let Err(errno) = nix::sched::setns(self.0, nix::sched::CloneFlags::CLONE_NEWNET) {
            // A runtime thread left in a pod's namespace would make every
            // later socket of the node there: nothing safe can follow.
            tracing::error!(%errno, "cannot return to the node's network namespace; aborting");
            std::process::abort();
        }
    }
}

/// The node's network namespace, the one the process started in (its
/// main thread never leaves it), opened once.
fn home_namespace() -> Result<&'static File, CaptureError> {
    static HOME: std::sync::OnceLock<Result<File, std::io::ErrorKind>> = std::sync::OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").map_err(|e| e.kind()))
        .as_ref()
        .map_err(|kind| CaptureError::Namespace {
            operation: "opening the node's network namespace (/proc/self/ns/net)".to_owned(),
            source: std::io::Error::from(*kind),
        })
}

/// Finds the network namespaces that hold `ips` (pods already running when
/// the proxy starts, which no CNI call announced): every namespace mounted
/// under `mount_dirs` (where iproute2 and CNI runtimes keep them, e.g.
/// `/run/netns`) and every one a process under `proc_dir` is in, each
/// entered once to read its addresses. Namespaces that cannot be opened or
/// entered are skipped (a process that exited meanwhile). The proxy's own
/// namespace is never a pod's, and an address held by several namespaces
/// is left out.
pub fn find_pod_namespaces(
    ips: &BTreeSet<IpAddr>,
    mount_dirs: &[&Path],
    proc_dir: &Path,
) -> BTreeMap<IpAddr, PathBuf> {
    let own = std::fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino()));
    let mut seen = BTreeSet::new();
    if let Ok(own) = own {
        seen.insert(own);
    }
    let mounted = mount_dirs
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .map(|entry| entry.path());
    let of_processes = std::fs::read_dir(proc_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .map(|entry| entry.path().join("ns/net"));
    let mut claims: BTreeMap<IpAddr, Vec<PathBuf>> = BTreeMap::new();
    for path in mounted.chain(of_processes) {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(netns) = PodNetns::open(&path) else {
            continue;
        };
        for ip in addresses_of(&netns).into_iter().flatten() {
            if ips.contains(&ip) {
                claims.entry(ip).or_default().push(path.clone());
            }
        }
    }
    // An address two namespaces hold vouches for neither: a pod that took
    // a neighbour's address must not be served as that neighbour.
    claims
        .into_iter()
        .filter_map(|(ip, mut paths)| {
            if paths.len() > 1 {
                tracing::warn!(%ip, ?paths, "an address is held by several namespaces: serving none of them for it");
                return None;
            }
            paths.pop().map(|path| (ip, path))
        })
        .collect()
}

/// The addresses of every interface in `netns`.
pub fn addresses_of(netns: &PodNetns) -> Result<BTreeSet<IpAddr>, CaptureError> {
    netns
        .run_in(|| {
            nix::ifaddrs::getifaddrs().map(|all| {
                all.filter_map(|interface| interface.address)
                    .filter_map(|address| {
                        address
                            .as_sockaddr_in()
                            .map(|a| IpAddr::V4(a.ip()))
                            .or_else(|| address.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
                    })
                    .collect()
            })
        })?
        .map_err(|errno| CaptureError::Namespace {
            operation: format!("listing the addresses in {}", netns.path().display()),
            source: std::io::Error::from(errno),
        })
}

/// Installs the redirection into the pod's namespace, replacing any that
/// is there (one `nft` transaction), with its policy routing; IPv6 too
/// when the namespace has it (an IPv6 routing that cannot be installed is
/// logged: the pod's IPv6 TCP is then refused).
/// `probe_ports` are the ports the node's own connections reach
/// uncaptured (the kubelet's probes).
pub fn install_in_pod(
    netns: &PodNetns,
    config: &CaptureConfig,
    probe_ports: &BTreeSet<u16>,
) -> Result<(), CaptureError> {
    if let Some(reason) = config.problem() {
        return Err(CaptureError::Config { reason });
    }
    netns.run_in(|| {
        let config = replace_pod_table(config, probe_ports)?;
        routing::install(&config, Family::V4)?;
        if config.ipv6
            && let Err(error) = routing::install(&config, Family::V6)
        {
            // The redirection covers IPv6 all the same: without the
            // routing (or the listeners) for it, the pod's IPv6 TCP is
            // refused, never passed, and its IPv4 is served.
            tracing::warn!(%error, "no IPv6 routing in the pod: its IPv6 TCP is refused");
        }
        Ok(())
    })?
}

/// Replaces the pod's table with one that lets the node reach
/// `probe_ports` (its probes changed); routing is left as it is.
pub fn set_probe_ports(
    netns: &PodNetns,
    config: &CaptureConfig,
    probe_ports: &BTreeSet<u16>,
) -> Result<(), CaptureError> {
    netns.run_in(|| replace_pod_table(config, probe_ports).map(drop))?
}

/// On the calling thread (inside the pod's namespace): replaces the pod's
/// table in one `nft` transaction, with IPv6 rules if the namespace has
/// IPv6; returns the config it used.
fn replace_pod_table(
    config: &CaptureConfig,
    probe_ports: &BTreeSet<u16>,
) -> Result<CaptureConfig, CaptureError> {
    let config = CaptureConfig {
        ipv6: config.ipv6 && Path::new("/proc/sys/net/ipv6").exists(),
        ..config.clone()
    };
    run(
        "replacing the capture in a pod's network namespace",
        "nft",
        &["-f", "-"],
        Some(&pod_ruleset(&config, probe_ports)),
    )?;
    Ok(config)
}

/// Removes the redirection and its routing from the pod's namespace (the
/// pod leaves the mesh); what is not there is not an error.
pub fn remove_from_pod(netns: &PodNetns, config: &CaptureConfig) -> Result<(), CaptureError> {
    netns.run_in(|| {
        let removed = run(
            "removing the capture from a pod's network namespace",
            "nft",
            &["-f", "-"],
            Some(&format!(
                "table {TABLE_NAME} {{}}\ndelete table {TABLE_NAME}\n"
            )),
        )
        .map(drop);
        let mut result = removed.and(routing::remove(config, Family::V4));
        if Path::new("/proc/sys/net/ipv6").exists() {
            result = result.and(routing::remove(config, Family::V6));
        }
        result
    })?
}

/// The pod's table, replacing whatever table of that name is there (see
/// the module docs for each rule's reason).
pub fn pod_ruleset(config: &CaptureConfig, probe_ports: &BTreeSet<u16>) -> String {
    let (proxy, capture) = (config.proxy_mark, config.capture_mark);
    let mut script = format!("table {TABLE_NAME} {{}}\ndelete table {TABLE_NAME}\n");
    let _ = writeln!(script, "table {TABLE_NAME} {{");
    let mut node_probes = Vec::new();
    if !probe_ports.is_empty() {
        let ports = probe_ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        node_probes.push(format!(
            "ip saddr {NODE_SOURCE} tcp dport {{ {ports} }} accept"
        ));
        if config.ipv6 {
            node_probes.push(format!(
                "ip6 saddr {NODE_SOURCE_V6} tcp dport {{ {ports} }} accept"
            ));
        }
    }
    let chains = [
        (
            "prerouting",
            "type nat hook prerouting priority -100; policy accept;",
            node_probes
                .into_iter()
                .chain([
                    format!("tcp dport {} accept", config.hbone_port),
                    format!(
                        "meta l4proto tcp redirect to :{}",
                        config.inbound_plaintext_port
                    ),
                ])
                .collect(),
        ),
        (
            "output",
            "type nat hook output priority -100; policy accept;",
            vec![
                format!("meta mark & {proxy:#x} == {proxy:#x} accept"),
                "oif \"lo\" accept".to_owned(),
                format!("meta l4proto tcp redirect to :{}", config.outbound_port),
            ],
        ),
        (
            "reply_routing",
            "type route hook output priority mangle; policy accept;",
            vec![
                format!(
                    "meta l4proto tcp ct state new meta mark & {proxy:#x} == {proxy:#x} \
                     ct mark set ct mark | {proxy:#x}"
                ),
                format!(
                    "meta l4proto tcp ct direction reply ct mark & {proxy:#x} == {proxy:#x} \
                     meta mark set meta mark | {capture:#x}"
                ),
            ],
        ),
    ];
    for (name, hook, rules) in chains {
        write_chain(&mut script, name, Some(hook), &rules);
    }
    script.push_str("}\n");
    script
}

/// One chain inside a `table ... {}` block: its name, its hook line (a base
/// chain) if any, and its rules, one per line.
fn write_chain(script: &mut String, name: &str, hook: Option<&str>, rules: &[String]) {
    let _ = writeln!(script, "\tchain {name} {{");
    if let Some(hook) = hook {
        let _ = writeln!(script, "\t\t{hook}");
    }
    for rule in rules {
        let _ = writeln!(script, "\t\t{rule}");
    }
    script.push_str("\t}\n");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    #[test]
    fn only_a_namespace_opens_and_a_fifo_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(PodNetns::open(&fifo).is_err());
        let file = dir.path().join("file");
        std::fs::write(&file, "not a namespace").unwrap();
        assert!(PodNetns::open(&file).is_err());
        assert!(PodNetns::open(Path::new("/proc/self/ns/net")).is_ok());
    }

    #[test]
    fn the_pod_table_redirects_all_but_the_proxys_own_and_hbone() {
        let script = pod_ruleset(&CaptureConfig::default(), &BTreeSet::from([8080, 9090]));
        assert!(script.starts_with("table inet weft {}\ndelete table inet weft\n"));
        for rule in [
            "ip saddr 169.254.7.127 tcp dport { 8080, 9090 } accept",
            "ip6 saddr fd00:7765:6674::7f tcp dport { 8080, 9090 } accept",
            "tcp dport 15008 accept",
            "meta l4proto tcp redirect to :15006",
            "meta mark & 0x2 == 0x2 accept",
            "oif \"lo\" accept",
            "meta l4proto tcp redirect to :15001",
            "meta l4proto tcp ct direction reply ct mark & 0x2 == 0x2 meta mark set meta mark | 0x1",
        ] {
            assert!(script.contains(rule), "{rule} missing from:\n{script}");
        }
        // Without probes the node source is captured like anyone.
        let unprobed = pod_ruleset(&CaptureConfig::default(), &BTreeSet::new());
        assert!(!unprobed.contains("169.254.7.127"), "{unprobed}");
        // The HBONE exception comes before the redirect.
        assert!(
            script.find("dport 15008").unwrap_or(usize::MAX) < script.find(":15006").unwrap_or(0)
        );
    }
}
