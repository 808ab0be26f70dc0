//! The real control plane, run as a child process on loopback ports over the
//! scenario's manifests, killed whenever the scenario ends; its CPU and
//! memory from `/proc`, and what its log says.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::procstat::{self, Memory, ProcEntry};

/// The control plane's binary: next to this executable (or in
/// `WEFT_BIN_DIR`), like the proxies the other scenarios run.
pub fn binary() -> Result<PathBuf> {
    let dir = match std::env::var_os("WEFT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("locating weft-bench")?;
            exe.parent()
                .context("weft-bench has no directory")?
                .to_owned()
        }
    };
    let path = dir.join("weft-control-plane");
    if !path.is_file() {
        bail!(
            "no weft-control-plane in {}: build it with `cargo build --release --bins`, or set WEFT_BIN_DIR",
            dir.display()
        );
    }
    Ok(path)
}

/// Where the control plane reads and writes.
pub struct Paths {
    /// The manifests directory.
    pub manifests: PathBuf,
    /// The node tokens file.
    pub tokens: PathBuf,
    /// Its state directory (the CA, `root-cert.pem`).
    pub state: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

/// A running control plane; dropping it kills it.
pub struct ControlPlane {
    child: Child,
    entry: ProcEntry,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its monitoring address (metrics, the dashboard).
    pub monitoring: SocketAddr,
    /// When it was started.
    pub started: Instant,
    /// Its log file.
    pub log: PathBuf,
    state: PathBuf,
    ticks: f64,
    /// How it exited, once it has.
    exit: Option<String>,
    /// Its memory when [`ControlPlane::check_running`] last found it running,
    /// and how long after the start.
    last_memory: Option<(Duration, Memory)>,
}

impl ControlPlane {
    /// Starts `binary` on free loopback ports.
    pub fn start(binary: &Path, paths: &Paths) -> Result<ControlPlane> {
        let (grpc, monitoring) = (free_port()?, free_port()?);
        let log = std::fs::File::create(&paths.log)
            .with_context(|| format!("creating {}", paths.log.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("opening {} twice", paths.log.display()))?;
        let path = |p: &Path| p.as_os_str().to_owned();
        let started = Instant::now();
        let child = Command::new(binary)
            .arg("--manifests")
            .arg(path(&paths.manifests))
            .arg("--node-tokens")
            .arg(path(&paths.tokens))
            .arg("--state-dir")
            .arg(path(&paths.state))
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--monitoring-addr")
            .arg(monitoring.to_string())
            .env("WEFT_LOG", "warn")
            .env("WEFT_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(ControlPlane {
            entry: ProcEntry::process(child.id()),
            child,
            grpc,
            monitoring,
            started,
            log: paths.log.clone(),
            state: paths.state.clone(),
            ticks: procstat::ticks_per_second(),
            exit: None,
            last_memory: None,
        })
    }

    /// An error if the control plane has exited: how, and where its log is.
    pub fn check_running(&mut self) -> Result<()> {
        if self.exit.is_none()
            && let Some(status) = self
                .child
                .try_wait()
                .context("waiting for the control plane")?
        {
            self.exit = Some(match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(9)) => {
                    "was killed by SIGKILL (out of memory, or a memory limit)".to_owned()
                }
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                (None, None) => format!("ended: {status}"),
            });
        }
        match &self.exit {
            Some(exit) => bail!("the control plane {exit}; its log: {}", self.log.display()),
            None => {
                if let Ok(memory) = self.entry.memory() {
                    self.last_memory = Some((self.started.elapsed(), memory));
                }
                Ok(())
            }
        }
    }

    /// Its memory when it was last seen running, and how long after the
    /// start that was: what an error reports once it has died.
    pub fn last_memory(&self) -> Option<(Duration, Memory)> {
        self.last_memory
    }

    /// Waits until the control plane has written its roots; their PEM.
    pub async fn roots(&mut self, deadline: Instant) -> Result<String> {
        let file = self.state.join("root-cert.pem");
        loop {
            self.check_running()?;
            if let Ok(text) = std::fs::read_to_string(&file)
                && text.contains("-----END CERTIFICATE-----")
            {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane wrote no {} in time; its log: {}",
                    file.display(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// VmRSS and VmHWM now.
    pub fn memory(&self) -> Result<Memory> {
        self.entry.memory().context("the control plane's memory")
    }

    /// User and system CPU seconds so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        self.entry
            .cpu_seconds(self.ticks)
            .context("the control plane's CPU time")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on 127.0.0.1 that nothing listens on (as of now).
fn free_port() -> Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("finding a free port on 127.0.0.1")
}

/// What the control plane logged at warn and above.
#[derive(Debug, Default, Serialize)]
pub struct LogSummary {
    /// Lines at WARN.
    pub warnings: u64,
    /// Lines at ERROR.
    pub errors: u64,
    /// Distinct messages (level, message) and how often each came, most
    /// frequent first, at most 10.
    pub messages: Vec<(String, u64)>,
}

/// Reads the control plane's JSON log.
pub fn summarize_log(log: &Path) -> Result<LogSummary> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut summary = LogSummary::default();
    let mut messages: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let (level, message) = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(value) => {
                let field = |path: &[&str]| {
                    let mut value = &value;
                    for key in path {
                        value = value.get(key).unwrap_or(&serde_json::Value::Null);
                    }
                    value.as_str().unwrap_or("").to_owned()
                };
                (field(&["level"]), field(&["fields", "message"]))
            }
            // Not a log line: a panic, or the kernel's words on the way out.
            Err(_) => ("OUTPUT".to_owned(), line.to_owned()),
        };
        match level.as_str() {
            "WARN" => summary.warnings += 1,
            "ERROR" | "OUTPUT" => summary.errors += 1,
            _ => continue,
        }
        let key: String = format!("{level}: {message}").chars().take(200).collect();
        *messages.entry(key).or_default() += 1;
    }
    let mut messages: Vec<_> = messages.into_iter().collect();
    messages.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    messages.truncate(10);
    summary.messages = messages;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_counted_by_level_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(
            &log,
            r#"{"timestamp":"t","level":"WARN","fields":{"message":"slow"},"target":"x"}
{"timestamp":"t","level":"WARN","fields":{"message":"slow"},"target":"x"}
{"timestamp":"t","level":"ERROR","fields":{"message":"too big","bytes":5},"target":"x"}
{"timestamp":"t","level":"INFO","fields":{"message":"fine"},"target":"x"}
thread 'main' panicked
"#,
        )
        .unwrap();
        let summary = summarize_log(&log).unwrap();
        assert_eq!((summary.warnings, summary.errors), (2, 2));
        assert_eq!(summary.messages[0], ("WARN: slow".to_owned(), 2));
    }
}
