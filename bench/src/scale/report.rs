//! What the control-plane scenario found, as data ([`ScaleReport`], written
//! by `--json`) and as the table printed on stdout. Times are in
//! milliseconds unless a name says seconds; sizes in bytes or KiB as named.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use super::process::LogSummary;

/// The whole run.
#[derive(Debug, Serialize)]
pub struct ScaleReport {
    /// The machine it ran on.
    pub machine: String,
    /// The 1-minute load average at the start and at the end: other work on
    /// the machine (the simulated nodes are on it too) skews every figure.
    pub load_average: (f64, f64),
    /// Command line.
    pub command: String,
    /// The control plane binary, and whether it is a release build.
    pub control_plane_binary: String,
    /// Whether `control_plane_binary` sits in a `release` profile directory.
    pub control_plane_is_release_build: bool,
    /// The settings used.
    pub config: serde_json::Value,
    /// What the simulated cluster holds.
    pub cluster: ClusterFigures,
    /// Until every node had its first full state.
    pub full_state: FullStateFigures,
    /// The control plane's memory and CPU.
    pub control_plane: ControlPlaneFigures,
    /// Single pod IP changes, one at a time.
    pub changes: ChangeFigures,
    /// One label-only change.
    pub label_change: Option<LabelChange>,
    /// Many pod IP changes per second.
    pub churn: Option<ChurnFigures>,
    /// The traffic reports' cost and the dashboard's pages.
    pub dashboard: Option<super::dashboard::DashboardFigures>,
    /// Streams: opened, broken, refused.
    pub streams: StreamFigures,
    /// What one node's proxy paid for it all (see [`super::proxy_side`]).
    pub proxy: Option<super::proxy_side::ProxyFigures>,
    /// CPU seconds of this process (the simulated nodes), which shares the
    /// machine with the control plane.
    pub bench_cpu_seconds: f64,
    /// Peak RSS (VmHWM) of this process, in KiB.
    pub bench_peak_rss_kib: u64,
    /// Wall-clock seconds of the whole run.
    pub elapsed_seconds: f64,
}

/// The simulated cluster.
#[derive(Debug, Serialize)]
pub struct ClusterFigures {
    /// Nodes, one config stream each.
    pub nodes: u32,
    /// Pods, all Running with an IP, in meshed namespaces.
    pub pods: u32,
    /// Namespaces, one manifest file each.
    pub namespaces: u32,
    /// Services, one EndpointSlice each.
    pub services: u32,
    /// Size of all manifest files.
    pub manifest_bytes: u64,
}

/// The nodes' first full states.
#[derive(Debug, Serialize)]
pub struct FullStateFigures {
    /// Nodes that got one (all of them, or the run fails).
    pub nodes: u32,
    /// While the nodes connected, about once a second: seconds since the
    /// control plane's start, nodes with their full state by then, and the
    /// control plane's RSS in KiB.
    pub timeline: Vec<(f64, u32, u64)>,
    /// From the control plane's start until the last node had its full state.
    pub all_nodes_seconds: f64,
    /// The same for the median node.
    pub p50_seconds: f64,
    /// The same for the first node.
    pub first_seconds: f64,
    /// Size of one node's full state: median and largest.
    pub bytes_p50: u64,
    /// Largest full state.
    pub bytes_max: u64,
    /// Workloads in a full state, fewest and most (every node should get
    /// every pod).
    pub workloads_min: u64,
    /// Most workloads in a full state.
    pub workloads_max: u64,
}

/// The control plane's resources.
#[derive(Debug, Serialize)]
pub struct ControlPlaneFigures {
    /// VmRSS once every node had its full state, in KiB.
    pub rss_connected_kib: u64,
    /// VmHWM (peak RSS) then.
    pub peak_connected_kib: u64,
    /// VmRSS at the end.
    pub rss_end_kib: u64,
    /// VmHWM at the end.
    pub peak_end_kib: u64,
    /// CPU seconds until every node had its full state.
    pub cpu_seconds_connected: f64,
    /// CPU seconds at the end.
    pub cpu_seconds_end: f64,
    /// What it logged at WARN and ERROR.
    pub log: LogSummary,
}

/// Single pod IP changes.
#[derive(Debug, Default, Serialize)]
pub struct ChangeFigures {
    /// How many.
    pub count: usize,
    /// From the file's rename until the last node had the new IP: p50.
    pub latency_p50_ms: f64,
    /// p99 (nearest rank: with few changes, the largest).
    pub latency_p99_ms: f64,
    /// Largest.
    pub latency_max_ms: f64,
    /// Control-plane CPU seconds per change (until the settle time after the
    /// last node had it): median.
    pub cpu_seconds_p50: f64,
    /// Mean.
    pub cpu_seconds_mean: f64,
    /// Nodes that received any update per change: fewest and most.
    pub nodes_updated_min: u32,
    /// Most.
    pub nodes_updated_max: u32,
    /// Bytes one node received per change: median over nodes and changes.
    pub delta_bytes_p50: u64,
    /// Each change.
    pub each: Vec<Change>,
}

/// One change.
#[derive(Debug, Serialize)]
pub struct Change {
    /// The pod (`<namespace>/<name>`).
    pub pod: String,
    /// Its new IP.
    pub ip: String,
    /// Until the first node had it.
    pub first_node_ms: f64,
    /// Until the last node had it.
    pub last_node_ms: f64,
    /// Control-plane CPU seconds.
    pub cpu_seconds: f64,
    /// Nodes that had the new IP when the wait ended (all of them, or the
    /// run fails).
    pub nodes_reached: u32,
    /// Nodes that received any update meanwhile.
    pub nodes_updated: u32,
    /// Updates received meanwhile, all nodes together.
    pub updates: u32,
}

/// A change of one pod's labels, which only its own node needs.
#[derive(Debug, Serialize)]
pub struct LabelChange {
    /// The pod.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// Until its node had the update.
    pub own_node_ms: f64,
    /// Nodes that received any update within the quiet period after.
    pub nodes_updated: u32,
    /// The quiet period waited after the own node's update.
    pub quiet_ms: f64,
    /// Control-plane CPU seconds.
    pub cpu_seconds: f64,
}

/// The churn.
#[derive(Debug, Serialize)]
pub struct ChurnFigures {
    /// Changes asked per second.
    pub rate: f64,
    /// Seconds asked.
    pub seconds: f64,
    /// Changes written.
    pub changes: u32,
    /// Distinct pods changed.
    pub pods_changed: u32,
    /// Changes per second achieved (file writes).
    pub achieved_rate: f64,
    /// From the last change's rename until every node held the final IP of
    /// every changed pod.
    pub lag_ms: f64,
    /// From the first change until then.
    pub consistent_after_first_ms: f64,
    /// Updates each node received from the first change until consistent:
    /// median and most.
    pub updates_per_node_p50: u64,
    /// Most.
    pub updates_per_node_max: u64,
    /// Bytes each node received meanwhile: median.
    pub bytes_per_node_p50: u64,
    /// Control-plane CPU seconds from the first change until consistent.
    pub cpu_seconds: f64,
}

/// The streams' fates.
#[derive(Debug, Serialize)]
pub struct StreamFigures {
    /// Streams opened, all nodes together (one per node if none broke).
    pub opened: u64,
    /// Failed attempts and broken streams, by reason.
    pub failures: BTreeMap<String, u32>,
}

/// Nearest-rank percentile `p` (0–100) of `values`; 0 when empty.
pub fn percentile<T: Copy + PartialOrd + Default>(values: &[T], p: f64) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The table.
pub fn render(r: &ScaleReport) -> String {
    let mut out = String::new();
    let c = &r.cluster;
    let _ = writeln!(out, "weft-bench control-plane on {}", r.machine);
    let _ = writeln!(
        out,
        "control plane: {}{}",
        r.control_plane_binary,
        if r.control_plane_is_release_build {
            " (release build)"
        } else {
            "  ** NOT A RELEASE BUILD: numbers are meaningless **"
        }
    );
    let _ = writeln!(
        out,
        "load average (1 min): {:.2} at the start, {:.2} at the end",
        r.load_average.0, r.load_average.1
    );
    let _ = writeln!(
        out,
        "the simulated nodes (this process): {:.1} CPU s, peak RSS {:.0} MiB",
        r.bench_cpu_seconds,
        r.bench_peak_rss_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "cluster: {} nodes, {} pods, {} namespaces, {} Services, {:.1} MiB of manifests",
        c.nodes,
        c.pods,
        c.namespaces,
        c.services,
        c.manifest_bytes as f64 / MIB
    );
    let f = &r.full_state;
    let _ = writeln!(out, "\nfull state");
    row(
        &mut out,
        "every node has it",
        format!(
            "{:.2} s after the start (p50 {:.2} s, first {:.2} s)",
            f.all_nodes_seconds, f.p50_seconds, f.first_seconds
        ),
    );
    row(
        &mut out,
        "bytes per node",
        format!(
            "p50 {:.1} KiB, max {:.1} KiB ({} to {} workloads)",
            f.bytes_p50 as f64 / 1024.0,
            f.bytes_max as f64 / 1024.0,
            f.workloads_min,
            f.workloads_max
        ),
    );
    let cp = &r.control_plane;
    let _ = writeln!(out, "\ncontrol plane");
    row(
        &mut out,
        "RSS, all connected",
        format!(
            "{:.1} MiB (peak {:.1} MiB), {:.1} KiB per node",
            cp.rss_connected_kib as f64 / 1024.0,
            cp.peak_connected_kib as f64 / 1024.0,
            cp.rss_connected_kib as f64 / f64::from(c.nodes.max(1))
        ),
    );
    row(
        &mut out,
        "RSS at the end",
        format!(
            "{:.1} MiB (peak {:.1} MiB)",
            cp.rss_end_kib as f64 / 1024.0,
            cp.peak_end_kib as f64 / 1024.0
        ),
    );
    row(
        &mut out,
        "CPU",
        format!(
            "{:.2} s until all connected, {:.2} s in all",
            cp.cpu_seconds_connected, cp.cpu_seconds_end
        ),
    );
    row(
        &mut out,
        "log",
        format!("{} warnings, {} errors", cp.log.warnings, cp.log.errors),
    );
    for (message, count) in cp.log.messages.iter().take(5) {
        let _ = writeln!(out, "    {count:>6} × {message}");
    }
    let ch = &r.changes;
    if ch.count > 0 {
        let _ = writeln!(out, "\n{} single pod IP changes, one at a time", ch.count);
        row(
            &mut out,
            "until the last node has it",
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                ch.latency_p50_ms, ch.latency_p99_ms, ch.latency_max_ms
            ),
        );
        row(
            &mut out,
            "CPU per change",
            format!(
                "p50 {:.3} s, mean {:.3} s",
                ch.cpu_seconds_p50, ch.cpu_seconds_mean
            ),
        );
        row(
            &mut out,
            "nodes updated per change",
            format!(
                "{} to {} of {}; {:.1} KiB per node (p50)",
                ch.nodes_updated_min,
                ch.nodes_updated_max,
                c.nodes,
                ch.delta_bytes_p50 as f64 / 1024.0
            ),
        );
    }
    if let Some(l) = &r.label_change {
        let _ = writeln!(out, "\none label-only change ({} on {})", l.pod, l.node);
        row(
            &mut out,
            "its node has it",
            format!("{:.1} ms; CPU {:.3} s", l.own_node_ms, l.cpu_seconds),
        );
        row(
            &mut out,
            "nodes updated",
            format!(
                "{} of {} within {:.0} ms",
                l.nodes_updated, c.nodes, l.quiet_ms
            ),
        );
    }
    if let Some(u) = &r.churn {
        let _ = writeln!(
            out,
            "\nchurn: {} pod IP changes ({} pods) at {:.0}/s asked, {:.1}/s written",
            u.changes, u.pods_changed, u.rate, u.achieved_rate
        );
        row(
            &mut out,
            "consistent after the last",
            format!(
                "{:.1} ms ({:.2} s after the first)",
                u.lag_ms,
                u.consistent_after_first_ms / 1000.0
            ),
        );
        row(
            &mut out,
            "updates per node",
            format!(
                "p50 {}, max {}; {:.1} KiB per node (p50)",
                u.updates_per_node_p50,
                u.updates_per_node_max,
                u.bytes_per_node_p50 as f64 / 1024.0
            ),
        );
        row(&mut out, "CPU", format!("{:.2} s", u.cpu_seconds));
    }
    if let Some(d) = &r.dashboard {
        let _ = writeln!(
            out,
            "\ndashboard: {} traffic reports of {} edges over {:.0} s ({} pairs kept)",
            d.reports, d.edges_per_report, d.interval_seconds, d.edges_kept
        );
        row(
            &mut out,
            "CPU of the reports",
            format!(
                "{:.1} % of one core ({:.2} s against {:.2} s quiet)",
                d.cpu_share_of_one_core * 100.0,
                d.cpu_reporting_seconds,
                d.cpu_quiet_seconds
            ),
        );
        for page in &d.pages {
            row(
                &mut out,
                &format!("GET {}", page.path),
                format!("{:.1} ms, {:.1} KiB", page.ms, page.bytes as f64 / 1024.0),
            );
        }
    }
    if let Some(proxy) = &r.proxy {
        super::proxy_side::render(&mut out, proxy);
    }
    let s = &r.streams;
    let _ = writeln!(out, "\nstreams: {} opened for {} nodes", s.opened, c.nodes);
    for (reason, count) in &s.failures {
        let _ = writeln!(out, "    {count:>6} × {reason}");
    }
    let _ = writeln!(out, "elapsed: {:.1} s", r.elapsed_seconds);
    out
}

const MIB: f64 = 1024.0 * 1024.0;

pub(super) fn row(out: &mut String, label: &str, value: String) {
    let _ = writeln!(out, "  {label:<28} {value}");
}

/// Prints the table and writes the JSON (`-`: the JSON on stdout and the
/// table on stderr).
pub fn output(json: Option<&str>, report: &ScaleReport) -> Result<()> {
    crate::output::table_and_json(json, &render(report), report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 10.0);
        assert_eq!(percentile(&values, 99.0), 20.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile::<f64>(&[], 50.0), 0.0);
    }
}
