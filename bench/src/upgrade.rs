//! The upgrade scenario: steady traffic through the mesh (requests over
//! persistent connections, a new connection per request, a long-lived
//! stream; the testbed's [`SteadyLoad`]) while each node's proxy is
//! replaced by a new process, as a DaemonSet rollout with `maxSurge: 1`
//! does (the new process takes the old one's sockets over). Reports what
//! failed and the latency during each switch against the rest of the run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use weft_testbed::steady_load::{LoadKind, LoadReport, LoadShape, SteadyLoad};
use weft_testbed::{Target, Testbed, WeftMesh};

use crate::load::new_histogram;

/// Every request carries it (a wire capture would find plaintext by it).
const MARKER: &[u8] = b"weft-bench-upgrade";

/// The load's own echo server in the server pod (plain echo, where the
/// other scenarios' server expects a mode byte first).
const UPGRADE_ECHO_PORT: u16 = 8081;

/// How long after an old proxy let go counts as "during the switch": the
/// new one's first connections, new tunnels to it, the old one's GOAWAY.
const AFTER_SWITCH: Duration = Duration::from_secs(1);

/// What the scenario found.
#[derive(Debug, Serialize)]
pub struct UpgradeScenario {
    /// What ran.
    pub title: String,
    /// Each node's switch: from starting the new process to the old one
    /// letting go, in milliseconds.
    pub switches: Vec<(String, f64)>,
    /// One row per kind of traffic.
    pub kinds: Vec<KindFigures>,
    /// Whether the long-lived stream ran from start to end without a
    /// failure.
    pub stream_intact: bool,
    /// Whether every old proxy exited cleanly once its connections ended.
    pub old_proxies_exited: bool,
    /// When a request failed: the proxies' warnings and errors (the first
    /// few), to tell why.
    pub proxy_warnings: Vec<String>,
}

/// One kind of traffic's figures.
#[derive(Debug, Serialize)]
pub struct KindFigures {
    /// `persistent`, `new connection` or `stream`.
    pub kind: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (for `new connection`: connections that failed).
    pub failed: usize,
    /// Latency p50 / p99 / max outside the switches, in µs.
    pub steady_us: [f64; 3],
    /// Latency p50 / p99 / max during the switches, in µs.
    pub switch_us: [f64; 3],
    /// Why requests failed (the first few), each with when it was sent,
    /// in seconds since the load started.
    pub failures: Vec<String>,
}

/// Failures listed per kind of traffic; the count covers all of them.
const FAILURES_LISTED: usize = 5;

/// Runs the load from `client` to the echo server at `to`, upgrades the
/// proxy of each of `nodes` in turn with `settle` of traffic before, between
/// and after.
pub fn run(
    testbed: &Testbed,
    mesh: &mut WeftMesh,
    (client, to): (&str, SocketAddr),
    nodes: &[String],
    settle: Duration,
    shape: LoadShape,
) -> Result<UpgradeScenario> {
    let load = SteadyLoad::start(testbed, client, to, MARKER, shape)?;
    let load_started = Instant::now();
    std::thread::sleep(settle);
    let mut windows = Vec::new();
    let mut switches = Vec::new();
    let mut old_proxies = Vec::new();
    for node in nodes {
        let started = Instant::now();
        let old = mesh
            .upgrade_proxy(testbed, node)
            .with_context(|| format!("upgrading {node}'s proxy"))?;
        let done = Instant::now();
        switches.push((node.clone(), (done - started).as_secs_f64() * 1000.0));
        windows.push((started, done + AFTER_SWITCH));
        old_proxies.push(old);
        std::thread::sleep(settle);
    }
    let report = load.stop();
    let old_proxies_exited = old_proxies.iter().all(|old| {
        old.wait(Duration::from_secs(60))
            .is_ok_and(|status| status.success())
    });
    let any_failed = report.samples.iter().any(|sample| sample.error.is_some());
    let proxy_warnings = if any_failed {
        proxy_warnings(testbed.dir())
    } else {
        Vec::new()
    };
    let title = format!(
        "proxy upgrade under load: {} persistent connections and new connections every {} ms, a stream; nodes {}",
        shape.persistent_connections,
        shape.interval.as_millis(),
        nodes.join(", ")
    );
    Ok(UpgradeScenario {
        title,
        switches,
        kinds: [
            (LoadKind::Persistent, "persistent"),
            (LoadKind::NewConnection, "new connection"),
            (LoadKind::Stream, "stream"),
        ]
        .into_iter()
        .map(|(kind, name)| figures(&report, kind, name, load_started, &windows))
        .collect::<Result<_>>()?,
        stream_intact: report
            .of(LoadKind::Stream)
            .all(|sample| sample.error.is_none()),
        old_proxies_exited,
        proxy_warnings,
    })
}

/// Warnings listed when a request failed.
const WARNINGS_LISTED: usize = 20;

/// The warning and error lines the testbed's proxies logged.
fn proxy_warnings(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().contains("weft-proxy"))
        })
        .collect();
    files.sort();
    let mut warnings = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for line in text.lines() {
            if (line.contains("WARN") || line.contains("ERROR")) && warnings.len() < WARNINGS_LISTED
            {
                warnings.push(format!("{name}: {line}"));
            }
        }
    }
    warnings
}

fn figures(
    report: &LoadReport,
    kind: LoadKind,
    name: &str,
    load_started: Instant,
    windows: &[(Instant, Instant)],
) -> Result<KindFigures> {
    let (mut steady, mut switch) = (new_histogram(), new_histogram());
    let (mut requests, mut failed) = (0, 0);
    let mut failures = Vec::new();
    for sample in report.of(kind) {
        requests += 1;
        if let Some(error) = &sample.error {
            failed += 1;
            if failures.len() < FAILURES_LISTED {
                let at = sample.at.saturating_duration_since(load_started);
                failures.push(format!("at {:.3} s: {error}", at.as_secs_f64()));
            }
            continue;
        }
        let during = windows
            .iter()
            .any(|(from, to)| sample.at >= *from && sample.at <= *to);
        let nanos = u64::try_from(sample.latency.as_nanos()).unwrap_or(u64::MAX);
        if during { &mut switch } else { &mut steady }.record(nanos.max(1))?;
    }
    let us = |h: &hdrhistogram::Histogram<u64>| {
        [
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        ]
    };
    Ok(KindFigures {
        kind: name.to_owned(),
        requests,
        failed,
        steady_us: us(&steady),
        switch_us: us(&switch),
        failures,
    })
}

impl crate::Bench {
    /// The upgrade scenario, on the mesh path's pods (an echo server of its
    /// own in the server pod: the load speaks plain echo).
    pub(crate) fn upgrade(&self) -> Result<UpgradeScenario> {
        self.bar
            .set_message("upgrading the node proxies under load");
        let server = self
            .testbed
            .start_echo_server(Target::Pod("server"), UPGRADE_ECHO_PORT)?;
        let to = SocketAddr::from((self.testbed.pod_ip("server")?, UPGRADE_ECHO_PORT));
        let nodes: Vec<String> = self.proxies.iter().map(|(node, _)| node.clone()).collect();
        let shape = weft_testbed::steady_load::LoadShape {
            persistent_connections: self.config.upgrade_connections,
            interval: Duration::from_millis(self.config.upgrade_interval_ms.max(1)),
        };
        let mut mesh = self
            .mesh
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let scenario = run(
            &self.testbed,
            &mut mesh,
            ("client", to),
            &nodes,
            Duration::from_secs_f64(self.config.upgrade_settle),
            shape,
        );
        drop(server);
        self.bar.inc(1);
        scenario
    }
}
