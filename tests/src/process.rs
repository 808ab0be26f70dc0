//! Real processes started inside a testbed namespace, with their output captured to
//! files, and stopped for sure: SIGTERM to the process group, a short grace, SIGKILL.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{cleanup, netns};

/// How long a process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

/// A process running in a testbed namespace.
///
/// It runs in its own process group; stopping it (explicitly, by dropping this handle,
/// or by dropping the testbed) signals the whole group, so helpers it forked go too.
/// Its stdout and stderr go to files in the testbed's temp dir.
#[derive(Debug)]
pub struct Process {
    tracked: Arc<TrackedProcess>,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// The part of a process the testbed keeps as well, to stop it on drop.
#[derive(Debug)]
pub(crate) struct TrackedProcess {
    label: String,
    pid: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    child: Child,
    /// Set once the process was reaped and its group killed.
    exit: Option<ExitStatus>,
}

/// Starts `command` inside `netns`, stdin from /dev/null, stdout and stderr to the
/// given files.
pub(crate) fn spawn(
    netns: &str,
    mut command: Command,
    label: String,
    stdout: PathBuf,
    stderr: PathBuf,
) -> Result<Process> {
    let out = File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?;
    let err = File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    tracing::debug!(netns, ?command, "spawning {label}");
    let child = netns::run_in(netns, || command.spawn())?
        .with_context(|| format!("spawning {label}: {command:?}"))?;
    let pid = child.id();
    cleanup::track_process_group(pgid(pid));
    Ok(Process {
        tracked: Arc::new(TrackedProcess {
            label,
            pid,
            state: Mutex::new(State { child, exit: None }),
        }),
        stdout,
        stderr,
    })
}

fn pgid(pid: u32) -> i32 {
    // Pids fit in i32 on Linux (pid_max is at most 2^22).
    i32::try_from(pid).unwrap_or(i32::MAX)
}

impl TrackedProcess {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reaps the process if it has exited; on the first reap also kills whatever is
    /// left of its process group (the pid cannot have been reused before the reap).
    fn poll(&self, state: &mut State) -> Result<Option<ExitStatus>> {
        if let Some(status) = state.exit {
            return Ok(Some(status));
        }
        let status = state
            .child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.label))?;
        if let Some(status) = status {
            self.finish(state, status);
        }
        Ok(status)
    }

    fn finish(&self, state: &mut State, status: ExitStatus) {
        let _ = killpg(Pid::from_raw(pgid(self.pid)), Signal::SIGKILL);
        cleanup::untrack_process_group(pgid(self.pid));
        state.exit = Some(status);
        tracing::debug!("{} (pid {}) ended: {status}", self.label, self.pid);
    }

    /// SIGTERM to the group, up to [`STOP_GRACE`] to exit, then SIGKILL; reaps it.
    pub(crate) fn stop(&self) -> Result<ExitStatus> {
        self.terminate()?;
        self.reap_by(Instant::now() + STOP_GRACE)
    }

    /// Sends SIGTERM to the group, unless the process has already exited.
    pub(crate) fn terminate(&self) -> Result<()> {
        let mut state = self.state();
        if self.poll(&mut state)?.is_none() {
            let _ = killpg(Pid::from_raw(pgid(self.pid)), Signal::SIGTERM);
        }
        Ok(())
    }

    /// Waits until `deadline` for the process to exit, then SIGKILLs its group; reaps.
    pub(crate) fn reap_by(&self, deadline: Instant) -> Result<ExitStatus> {
        let mut state = self.state();
        loop {
            if let Some(status) = self.poll(&mut state)? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        tracing::warn!(
            "{} (pid {}) did not exit after SIGTERM, killing it",
            self.label,
            self.pid
        );
        let _ = killpg(Pid::from_raw(pgid(self.pid)), Signal::SIGKILL);
        let status = state
            .child
            .wait()
            .with_context(|| format!("waiting for {} after SIGKILL", self.label))?;
        self.finish(&mut state, status);
        Ok(status)
    }
}

/// Stops several processes at once: SIGTERM to all, then one shared grace period.
pub(crate) fn stop_all(processes: &[Arc<TrackedProcess>]) {
    for process in processes {
        if let Err(e) = process.terminate() {
            tracing::warn!("stopping {}: {e:#}", process.label);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for process in processes {
        if let Err(e) = process.reap_by(deadline) {
            tracing::warn!("stopping {}: {e:#}", process.label);
        }
    }
}

impl Process {
    pub(crate) fn tracked(&self) -> Arc<TrackedProcess> {
        Arc::clone(&self.tracked)
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.tracked.pid
    }

    /// Whether it is still running (it is reaped if it has exited).
    pub fn is_running(&self) -> bool {
        let mut state = self.tracked.state();
        matches!(self.tracked.poll(&mut state), Ok(None))
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.tracked.poll(&mut self.tracked.state())? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}",
                    self.tracked.label,
                    self.pid()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the process itself (not its group): SIGTERM to ask
    /// it to stop, SIGSTOP and SIGCONT to hold it still for a moment.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.pid()).context("the pid does not fit a pid_t")?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.tracked.label))
    }

    /// Stops it now (SIGTERM, grace, SIGKILL) and returns how it ended. Dropping the
    /// handle does the same.
    pub fn stop(&self) -> Result<ExitStatus> {
        self.tracked.stop()
    }

    /// Everything it has written to stdout so far.
    pub fn stdout(&self) -> Result<String> {
        read_lossy(&self.stdout)
    }

    /// Everything it has written to stderr so far.
    pub fn stderr(&self) -> Result<String> {
        read_lossy(&self.stderr)
    }

    /// The file its stdout goes to.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// The file its stderr goes to.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Its stdout once `logged` holds for it, waiting up to a minute: a
    /// proxy writes its log on a thread of its own, so a line about what
    /// just happened may come a moment later (longer on a busy machine).
    /// The stdout as it is then if `logged` never holds, for the caller's
    /// assertion to show.
    pub fn stdout_once(&self, logged: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stdout = self.stdout()?;
            if logged(&stdout) || Instant::now() >= deadline || !self.is_running() {
                return Ok(stdout);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` until stdout or stderr contains `needle` (e.g. a log
    /// line saying it is ready). Fails early if the process exits without writing it.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Check for exit before reading, so output written just before exiting
            // is seen.
            let exited = !self.is_running();
            if self.stdout()?.contains(needle) || self.stderr()?.contains(needle) {
                return Ok(());
            }
            let why = if exited {
                "exited"
            } else if Instant::now() >= deadline {
                "timed out"
            } else {
                std::thread::sleep(POLL);
                continue;
            };
            bail!(
                "{} (pid {}) {why} before printing {needle:?}\n--- stdout tail:\n{}\n--- stderr tail:\n{}",
                self.tracked.label,
                self.pid(),
                tail(&self.stdout()?),
                tail(&self.stderr()?)
            );
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.tracked.stop() {
            tracing::warn!("stopping {}: {e:#}", self.tracked.label);
        }
    }
}

fn read_lossy(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
