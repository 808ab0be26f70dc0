//! Cgroups the real cluster's nodes make (one root per node, named like the
//! testbed's namespaces, in every hierarchy): listing their processes,
//! killing them, removing the cgroups.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill as send_signal};
use nix::unistd::Pid;

/// Where cgroup hierarchies are mounted.
pub(crate) const CGROUP_FS: &str = "/sys/fs/cgroup";

/// The mounted cgroup hierarchies (v1 controllers, named ones, and the
/// cgroup2 `unified` mount).
pub(crate) fn hierarchies() -> Result<Vec<PathBuf>> {
    let mut hierarchies = Vec::new();
    for entry in std::fs::read_dir(CGROUP_FS).with_context(|| format!("listing {CGROUP_FS}"))? {
        let path = entry?.path();
        if path.join("cgroup.procs").exists() {
            hierarchies.push(path);
        }
    }
    Ok(hierarchies)
}

/// Pids in the cgroup at `dir` and every cgroup below it.
pub(crate) fn pids_below(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    pids
}

/// SIGKILLs every process in cgroup `name` (and below) of every hierarchy
/// until none is left (a dying container's runc may still fork).
pub(crate) fn kill(name: &str) {
    let Ok(hierarchies) = hierarchies() else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = hierarchies
            .iter()
            .flat_map(|h| pids_below(&h.join(name)))
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = send_signal(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes cgroup `name` and everything below it in every hierarchy,
/// deepest first.
pub(crate) fn remove(name: &str) {
    let Ok(hierarchies) = hierarchies() else {
        return;
    };
    for hierarchy in hierarchies {
        let root = hierarchy.join(name);
        let mut dirs = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            dirs.push(dir);
        }
        // A cgroup whose last process just died may be busy a moment; one
        // deadline for the whole tree, so a stuck one cannot hold a drop up.
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in dirs.iter().rev() {
            while dir.exists() && std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if root.exists() {
            eprintln!("weft-testbed: could not remove cgroup {}", root.display());
        }
    }
}
