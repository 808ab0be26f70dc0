//! Named network namespaces, the way iproute2 keeps them (`/run/netns/NAME`): create,
//! delete, list, configure with `ip -batch`, and run code inside one.
//!
//! Every namespace a testbed makes is named `wft<pid>x<counter>-...`, so that parallel
//! runs never collide and a later run can tell which ones were left behind by a
//! process that no longer exists (see `cleanup::sweep_stale`).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Start of every namespace name the testbed creates.
pub const NETNS_PREFIX: &str = "wft";

/// Where iproute2 keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// A prefix no other testbed, in this process or another, uses at the same time:
/// `wft<pid>x<counter>`.
pub(crate) fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NETNS_PREFIX}{}x{n}", std::process::id())
}

/// The pid of the process that created a testbed namespace, read back from its name;
/// `None` for names the testbed did not make.
pub(crate) fn creator_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, _) = rest.split_once('-')?;
    if pid.is_empty() || counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(netns)
}

/// Names of all named network namespaces on the machine (empty if there are none).
pub(crate) fn list() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Creates a named namespace and brings its loopback up.
pub(crate) fn create(netns: &str) -> Result<()> {
    ip(&["netns", "add", netns]).with_context(|| format!("creating network namespace {netns}"))?;
    ip_batch(netns, &["link set lo up".to_owned()])
}

/// Deletes a named namespace. The kernel frees it, and the interfaces in it, once no
/// process or socket holds it any more.
pub(crate) fn delete(netns: &str) -> Result<()> {
    ip(&["netns", "delete", netns]).with_context(|| format!("deleting network namespace {netns}"))
}

/// Opens a named namespace. The open file keeps the namespace itself alive (not its
/// name), and identifies it even after [`delete`].
pub(crate) fn open(netns: &str) -> Result<File> {
    File::open(path(netns))
        .with_context(|| format!("opening network namespace {netns} in {NETNS_DIR}"))
}

/// Pids of the processes whose network namespace is the one `ns` refers to (as
/// `ip netns pids` finds them, but also after the name was deleted).
pub(crate) fn pids_in(ns: &File) -> Result<Vec<i32>> {
    let target = ns.metadata().context("stat of a network namespace")?;
    pids_sharing("net", target.dev(), target.ino())
}

/// Pids of the processes whose namespace of `kind` (`net`, `mnt`, ... as
/// in `/proc/<pid>/ns/`) is the one with device `dev` and inode `ino`.
pub(crate) fn pids_sharing(kind: &str, dev: u64, ino: u64) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Processes may exit while we look; they are not in the namespace any more.
        let Ok(meta) = std::fs::metadata(entry.path().join("ns").join(kind)) else {
            continue;
        };
        if meta.dev() == dev && meta.ino() == ino {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Runs `ip` commands inside `netns`, one per line, in a single `ip -batch` process.
/// Each command is written as after `ip`, e.g. `addr add 10.0.0.1/32 dev eth0`.
pub(crate) fn ip_batch(netns: &str, commands: &[String]) -> Result<()> {
    tracing::debug!(netns, ?commands, "ip -batch");
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `ip -batch`")?;
    let script = commands.join("\n") + "\n";
    child
        .stdin
        .take()
        .context("stdin of `ip -batch`")?
        .write_all(script.as_bytes())
        .context("writing to `ip -batch`")?;
    let out = child
        .wait_with_output()
        .context("waiting for `ip -batch`")?;
    if !out.status.success() {
        bail!(
            "`ip -n {netns} -batch` failed ({}): {}\ncommands:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    tracing::debug!(?args, "ip");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread that has joined `netns`, and returns what it returns.
/// A panic in `f` is passed on to the caller.
///
/// Sockets opened inside `f` stay in `netns` when used from other threads later, and
/// processes spawned inside it start in `netns`.
pub(crate) fn run_in<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    run_in_file(&open(netns)?, f).with_context(|| format!("in network namespace {netns}"))
}

/// [`run_in`] for a namespace given as an open file (e.g. `/proc/<pid>/ns/net`).
pub(crate) fn run_in_file<T, F>(ns_file: &File, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("in a netns".to_owned())
            .spawn_scoped(scope, move || -> Result<T> {
                setns(ns_file, CloneFlags::CLONE_NEWNET)
                    .context("entering a network namespace (setns)")?;
                Ok(f())
            })
            .context("starting a thread to enter a network namespace")?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Sets `net.*` sysctls inside `netns`, given as (`ipv4/conf/all/rp_filter`, `0`):
/// the path under `/proc/sys/net/` and the value. `/proc/sys/net` shows the
/// namespace of the thread that opens it, so this writes from inside `netns`.
pub(crate) fn set_sysctls(netns: &str, settings: &[(String, &str)]) -> Result<()> {
    run_in(netns, || -> Result<()> {
        for (key, value) in settings {
            let file = format!("/proc/sys/net/{key}");
            std::fs::write(&file, value)
                .with_context(|| format!("setting {file} to {value} in {netns}"))?;
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_creating_pid() {
        let prefix = unique_prefix();
        let name = format!("{prefix}-n-node-1");
        assert_eq!(creator_pid(&name), Some(std::process::id()));
        assert_ne!(unique_prefix(), prefix);
        assert_eq!(creator_pid("wftabc"), None);
        assert_eq!(creator_pid("wft12x-fabric"), None);
        assert_eq!(creator_pid("wft12x3-fabric"), Some(12));
        assert_eq!(creator_pid("cni-1234"), None);
    }
}
