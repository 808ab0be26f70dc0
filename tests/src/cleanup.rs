//! Leaving nothing behind when a run ends badly.
//!
//! Normal ends (including panics) are handled by `Drop` on the testbed and on each
//! process. This module covers the rest:
//! - a process-wide record of the live namespaces and process groups, so that SIGINT
//!   and SIGTERM can clean them up before the process exits;
//! - a sweep, run whenever a testbed is built, that deletes namespaces left by
//!   processes that were killed outright (SIGKILL), and kills what still runs in them.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, Once};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::{cgroups, netns};

struct Live {
    netns: BTreeSet<String>,
    process_groups: BTreeSet<i32>,
    /// Cgroup roots of real-cluster nodes (names, made in every hierarchy).
    cgroups: BTreeSet<String>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    netns: BTreeSet::new(),
    process_groups: BTreeSet::new(),
    cgroups: BTreeSet::new(),
});

fn live() -> MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn track_netns(name: &str) {
    live().netns.insert(name.to_owned());
}

pub(crate) fn untrack_netns(name: &str) {
    live().netns.remove(name);
}

pub(crate) fn track_cgroup(name: &str) {
    live().cgroups.insert(name.to_owned());
}

pub(crate) fn untrack_cgroup(name: &str) {
    live().cgroups.remove(name);
}

pub(crate) fn track_process_group(pgid: i32) {
    live().process_groups.insert(pgid);
}

pub(crate) fn untrack_process_group(pgid: i32) {
    live().process_groups.remove(&pgid);
}

/// On SIGINT or SIGTERM, kill the tracked process groups, delete the tracked
/// namespaces, and exit with 128 + the signal number. Installed once per process.
pub(crate) fn install_signal_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(signals) => signals,
            Err(e) => {
                tracing::warn!("cannot handle SIGINT/SIGTERM, relying on the sweep: {e}");
                return;
            }
        };
        let started = std::thread::Builder::new()
            .name("weft-testbed signals".to_owned())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    eprintln!("weft-testbed: signal {signal}, removing testbed namespaces");
                    clean_up_everything();
                    std::process::exit(128 + signal);
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot start the signal thread, relying on the sweep: {e}");
        }
    });
}

fn clean_up_everything() {
    let live = live();
    // Daemons first (a kubelet would start containers again), then what
    // runs in the cgroups, then the namespaces and cgroups themselves.
    for pgid in &live.process_groups {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
    for name in live.netns.iter().rev() {
        // Daemons that left our process groups (containerd's shims) still
        // sit in their node's namespace.
        if let Ok(pids) = netns::open(name).and_then(|ns| netns::pids_in(&ns)) {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    for name in &live.cgroups {
        cgroups::kill(name);
    }
    for name in live.netns.iter().rev() {
        if let Err(e) = netns::delete(name) {
            eprintln!("weft-testbed: {e:#}");
        }
    }
    for name in &live.cgroups {
        cgroups::remove(name);
    }
}

/// Deletes every testbed namespace whose creating process is gone, after killing the
/// processes still inside it. Errors are logged, not returned: a sweep that loses a
/// race with another process sweeping the same namespace is fine.
pub(crate) fn sweep_stale() {
    sweep_stale_namespaces();
    // After the namespaces' processes (a real cluster's kubelet and
    // containerd among them) are gone, nothing restarts containers.
    sweep_stale_cgroups();
}

fn sweep_stale_namespaces() {
    let names = match netns::list() {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!("sweeping stale testbed namespaces: {e:#}");
            return;
        }
    };
    for name in names {
        let Some(pid) = netns::creator_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        tracing::info!(
            netns = name,
            pid,
            "deleting namespace left by a dead process"
        );
        // Hold the namespace, delete its name, then kill what is inside: this also
        // catches a process that entered between the listing and the deletion.
        let Ok(ns) = netns::open(&name) else {
            continue; // swept by someone else meanwhile
        };
        if let Err(e) = netns::delete(&name) {
            tracing::debug!("sweeping {name}: {e:#}");
        }
        match netns::pids_in(&ns) {
            Ok(pids) => {
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Err(e) => tracing::warn!("listing processes in {name}: {e:#}"),
        }
    }
}

/// Kills the processes of, and removes, every node cgroup root left by a
/// real cluster whose creating process is gone.
fn sweep_stale_cgroups() {
    let Ok(hierarchies) = cgroups::hierarchies() else {
        return;
    };
    let mut stale = BTreeSet::new();
    for hierarchy in hierarchies {
        let Ok(entries) = std::fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = netns::creator_pid(&name) else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                stale.insert(name);
            }
        }
    }
    for name in stale {
        tracing::info!(cgroup = name, "removing a cgroup left by a dead process");
        cgroups::kill(&name);
        cgroups::remove(&name);
    }
}
