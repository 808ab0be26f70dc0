//! What a run found, as data ([`Report`], serialised for `--json`) and as the
//! table printed on stdout. Latencies are in microseconds, sizes in KiB.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of the chart's curves.
pub const CURVE_PERCENTILES: [f64; 11] = [
    0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The machine it ran on.
    pub machine: String,
    /// The 1-minute load average at the start and at the end of the run: other
    /// work on the machine skews every figure.
    pub load_average: (f64, f64),
    /// Command line.
    pub command: String,
    /// The proxy binary the mesh ran, and whether it is a release build.
    pub proxy_binary: String,
    /// Whether `proxy_binary` sits in a `release` profile directory.
    pub proxy_is_release_build: bool,
    /// The settings used.
    pub config: serde_json::Value,
    /// Each mesh proxy's memory: idle before the load, and at the end.
    pub proxies: Vec<ProxyMemory>,
    /// Scenario 1.
    pub request_response: Option<LatencyScenario>,
    /// Scenario 2.
    pub connection_per_request: Option<LatencyScenario>,
    /// Scenario 3.
    pub bulk: Option<BulkScenario>,
    /// Scenario 4.
    pub idle: Option<IdleScenario>,
    /// Scenario 5.
    pub noisy_neighbour: Option<crate::noisy::NoisyScenario>,
    /// Scenario 6.
    pub upgrade: Option<crate::upgrade::UpgradeScenario>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_seconds: f64,
}

/// One node proxy's memory.
#[derive(Debug, Serialize)]
pub struct ProxyMemory {
    /// Its node.
    pub node: String,
    /// VmRSS once the data plane was ready, before any load.
    pub idle_rss_kib: u64,
    /// VmRSS at the end.
    pub final_rss_kib: u64,
    /// VmHWM at the end: the peak over the whole run.
    pub peak_rss_kib: u64,
    /// RssAnon (heap and stacks; the rest of the RSS is mapped files, mostly
    /// the binary's code) once ready, and at the end.
    pub idle_anon_kib: u64,
    /// RssAnon at the end.
    pub final_anon_kib: u64,
}

/// A latency scenario over all paths.
#[derive(Debug, Serialize)]
pub struct LatencyScenario {
    /// What ran.
    pub title: String,
    /// One row per path.
    pub paths: Vec<PathLatency>,
    /// What the relay and the mesh add, per percentile.
    pub added: Vec<Added>,
}

/// Latency of one path in one scenario.
#[derive(Debug, Serialize)]
pub struct PathLatency {
    /// `direct`, `relay` or `mesh`.
    pub path: String,
    /// Requests that completed.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Percentiles, µs.
    pub p50_us: f64,
    /// µs.
    pub p90_us: f64,
    /// µs.
    pub p99_us: f64,
    /// µs.
    pub p999_us: f64,
    /// µs.
    pub max_us: f64,
    /// How late the generator sent at p50, µs.
    pub generator_lag_p50_us: f64,
    /// How late the generator sent at p99, µs (large values: the client was starved).
    pub generator_lag_p99_us: f64,
    /// CPU seconds both proxies (or relays) used per 1,000 requests, together.
    pub proxy_cpu_seconds_per_1000: Option<f64>,
    /// (percentile, µs) points for the chart.
    pub curve: Vec<(f64, f64)>,
}

/// What the relay and the mesh add at one percentile.
#[derive(Debug, Serialize)]
pub struct Added {
    /// `p50`, `p90`, ...
    pub percentile: String,
    /// relay − direct, µs: the floor.
    pub relay_over_direct_us: f64,
    /// mesh − direct, µs.
    pub mesh_over_direct_us: f64,
    /// mesh − relay, µs.
    pub mesh_over_relay_us: f64,
    /// (mesh − direct) / (relay − direct): weft's target is ≤ 1.1.
    pub mesh_vs_floor: Option<f64>,
}

/// Single-stream bulk throughput.
#[derive(Debug, Serialize)]
pub struct BulkScenario {
    /// Seconds per direction and path.
    pub seconds: f64,
    /// One row per path.
    pub paths: Vec<PathBulk>,
}

/// Bulk throughput of one path.
#[derive(Debug, Serialize)]
pub struct PathBulk {
    /// `direct`, `relay` or `mesh`.
    pub path: String,
    /// Client to server, MiB/s.
    pub upload_mib_s: f64,
    /// Server to client, MiB/s.
    pub download_mib_s: f64,
    /// Upload as a fraction of direct.
    pub upload_vs_direct: f64,
    /// Download as a fraction of direct.
    pub download_vs_direct: f64,
    /// CPU seconds of both proxies (or relays) per GiB moved.
    pub proxy_cpu_seconds_per_gib: Option<f64>,
}

/// Many idle connections.
#[derive(Debug, Serialize)]
pub struct IdleScenario {
    /// Connections held open at once.
    pub connections: usize,
    /// Seconds to open them (sequentially), per path.
    pub open_seconds: Vec<(String, f64)>,
    /// Both mesh proxies' VmRSS before opening them, KiB.
    pub mesh_rss_before_kib: u64,
    /// ... and while they are open, KiB.
    pub mesh_rss_open_kib: u64,
    /// (open − before) / connections, bytes, both proxies together.
    pub mesh_bytes_per_connection: f64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// One path's row from its histograms (ns) and the proxies' CPU seconds.
pub fn summarize(
    path: &str,
    latency: &Histogram<u64>,
    send_lag: &Histogram<u64>,
    errors: u64,
    cpu_seconds: Option<f64>,
) -> PathLatency {
    let requests = latency.len();
    let at = |p: f64| us(latency.value_at_quantile(p / 100.0));
    PathLatency {
        path: path.to_owned(),
        requests,
        errors,
        p50_us: at(50.0),
        p90_us: at(90.0),
        p99_us: at(99.0),
        p999_us: at(99.9),
        max_us: us(latency.max()),
        generator_lag_p50_us: us(send_lag.value_at_quantile(0.5)),
        generator_lag_p99_us: us(send_lag.value_at_quantile(0.99)),
        proxy_cpu_seconds_per_1000: cpu_seconds
            .filter(|_| requests > 0)
            .map(|cpu| cpu / requests as f64 * 1000.0),
        curve: CURVE_PERCENTILES
            .iter()
            .map(|&p| (p, if p >= 100.0 { us(latency.max()) } else { at(p) }))
            .collect(),
    }
}

/// What the relay and the mesh add over direct, at each reported percentile.
pub fn added(paths: &[PathLatency]) -> Vec<Added> {
    let find = |name: &str| paths.iter().find(|p| p.path == name);
    let (Some(direct), Some(relay), Some(mesh)) = (find("direct"), find("relay"), find("mesh"))
    else {
        return Vec::new();
    };
    type Pick = fn(&PathLatency) -> f64;
    let pick: [(&str, Pick); 5] = [
        ("p50", |p| p.p50_us),
        ("p90", |p| p.p90_us),
        ("p99", |p| p.p99_us),
        ("p99.9", |p| p.p999_us),
        ("max", |p| p.max_us),
    ];
    pick.iter()
        .map(|(name, get)| {
            let floor = get(relay) - get(direct);
            let mesh_added = get(mesh) - get(direct);
            Added {
                percentile: (*name).to_owned(),
                relay_over_direct_us: floor,
                mesh_over_direct_us: mesh_added,
                mesh_over_relay_us: get(mesh) - get(relay),
                mesh_vs_floor: (floor > 0.0).then(|| mesh_added / floor),
            }
        })
        .collect()
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn latency_table(out: &mut String, scenario: &LatencyScenario) {
    let _ = writeln!(out, "\n{}", scenario.title);
    let _ = writeln!(
        out,
        "  {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>14}",
        "path",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "requests",
        "errors",
        "CPU s/1k req"
    );
    for p in &scenario.paths {
        let _ = writeln!(
            out,
            "  {:<7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>6} {:>14}",
            p.path,
            p.p50_us,
            p.p90_us,
            p.p99_us,
            p.p999_us,
            p.max_us,
            p.requests,
            p.errors,
            opt(p.proxy_cpu_seconds_per_1000, 3)
        );
    }
    if scenario.added.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<7} {:>13} {:>13} {:>13} {:>16}",
        "added", "relay−direct", "mesh−direct", "mesh−relay", "mesh/floor (≤1.1)"
    );
    for a in &scenario.added {
        let _ = writeln!(
            out,
            "  {:<7} {:>13.1} {:>13.1} {:>13.1} {:>16}",
            a.percentile,
            a.relay_over_direct_us,
            a.mesh_over_direct_us,
            a.mesh_over_relay_us,
            opt(a.mesh_vs_floor, 2)
        );
    }
    let worst = |get: fn(&PathLatency) -> f64| scenario.paths.iter().map(get).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "  (the generator sent late by ≤ {:.1} µs at p50, ≤ {:.1} µs at p99: included above)",
        worst(|p| p.generator_lag_p50_us),
        worst(|p| p.generator_lag_p99_us)
    );
}

fn upgrade_table(out: &mut String, upgrade: &crate::upgrade::UpgradeScenario) {
    let _ = writeln!(out, "\n{}", upgrade.title);
    for (node, ms) in &upgrade.switches {
        let _ = writeln!(
            out,
            "  {node}: new proxy serving {ms:.0} ms after it started"
        );
    }
    let _ = writeln!(
        out,
        "  {:<15} {:>8} {:>7} {:>28} {:>28}",
        "traffic", "requests", "failed", "steady p50/p99/max µs", "switch p50/p99/max µs"
    );
    let triple = |v: &[f64; 3]| format!("{:.0} / {:.0} / {:.0}", v[0], v[1], v[2]);
    for k in &upgrade.kinds {
        let _ = writeln!(
            out,
            "  {:<15} {:>8} {:>7} {:>28} {:>28}",
            k.kind,
            k.requests,
            k.failed,
            triple(&k.steady_us),
            triple(&k.switch_us)
        );
        for failure in &k.failures {
            let _ = writeln!(out, "    {} failed {failure}", k.kind);
        }
    }
    let _ = writeln!(
        out,
        "  stream intact: {}; old proxies exited cleanly once drained: {}",
        if upgrade.stream_intact { "yes" } else { "NO" },
        if upgrade.old_proxies_exited {
            "yes"
        } else {
            "NO"
        }
    );
    if !upgrade.proxy_warnings.is_empty() {
        let _ = writeln!(out, "  the proxies warned:");
        for warning in &upgrade.proxy_warnings {
            let _ = writeln!(out, "    {warning}");
        }
    }
}

/// The table printed on stdout.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "weft-bench on {}", report.machine);
    let _ = writeln!(
        out,
        "proxy: {}{}",
        report.proxy_binary,
        if report.proxy_is_release_build {
            " (release build)"
        } else {
            "  ** NOT A RELEASE BUILD: numbers are meaningless **"
        }
    );
    let _ = writeln!(
        out,
        "load average (1 min): {:.2} at the start, {:.2} at the end{}",
        report.load_average.0,
        report.load_average.1,
        if report.load_average.0 > 0.5 {
            " (the machine was busy before the run: figures are noisy)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "paths: direct = unmeshed pods, no proxy; relay = two plain TCP relays (the floor); mesh = weft"
    );
    let _ = writeln!(
        out,
        "CPU = user+system seconds of the relays / proxies on the path, summed (one per node)"
    );
    if let Some(s) = &report.request_response {
        latency_table(&mut out, s);
    }
    if let Some(s) = &report.connection_per_request {
        latency_table(&mut out, s);
    }
    if let Some(bulk) = &report.bulk {
        let _ = writeln!(out, "\nsingle-stream bulk, {:.0} s each way", bulk.seconds);
        let _ = writeln!(
            out,
            "  {:<7} {:>12} {:>9} {:>12} {:>9} {:>14}",
            "path", "up MiB/s", "vs direct", "down MiB/s", "vs direct", "CPU s/GiB"
        );
        for p in &bulk.paths {
            let _ = writeln!(
                out,
                "  {:<7} {:>12.1} {:>8.0}% {:>12.1} {:>8.0}% {:>14}",
                p.path,
                p.upload_mib_s,
                p.upload_vs_direct * 100.0,
                p.download_mib_s,
                p.download_vs_direct * 100.0,
                opt(p.proxy_cpu_seconds_per_gib, 2)
            );
        }
    }
    if let Some(idle) = &report.idle {
        let _ = writeln!(out, "\n{} idle connections", idle.connections);
        for (path, seconds) in &idle.open_seconds {
            let _ = writeln!(out, "  {path:<7} opened in {seconds:.2} s");
        }
        let _ = writeln!(
            out,
            "  mesh proxies' RSS {} KiB -> {} KiB: {:.0} bytes per connection (all proxies on the path)",
            idle.mesh_rss_before_kib, idle.mesh_rss_open_kib, idle.mesh_bytes_per_connection
        );
    }
    if let Some(noisy) = &report.noisy_neighbour {
        crate::noisy::table(&mut out, noisy);
    }
    if let Some(upgrade) = &report.upgrade {
        upgrade_table(&mut out, upgrade);
    }
    let _ = writeln!(
        out,
        "\nmesh proxies' memory (KiB; anon = heap and stacks, the rest is mapped code)"
    );
    let _ = writeln!(
        out,
        "  {:<8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "node", "idle RSS", "idle anon", "final RSS", "final anon", "peak RSS"
    );
    for p in &report.proxies {
        let _ = writeln!(
            out,
            "  {:<8} {:>10} {:>10} {:>10} {:>10} {:>10}",
            p.node,
            p.idle_rss_kib,
            p.idle_anon_kib,
            p.final_rss_kib,
            p.final_anon_kib,
            p.peak_rss_kib
        );
    }
    let _ = writeln!(out, "\ncompleted in {:.1} s", report.elapsed_seconds);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram_of(values_us: &[u64]) -> Histogram<u64> {
        let mut h = crate::load::new_histogram();
        for v in values_us {
            h.record(v * 1000).unwrap();
        }
        h
    }

    #[test]
    fn percentiles_come_from_the_histogram_in_microseconds() {
        let values: Vec<u64> = (1..=1000).collect();
        let row = summarize(
            "direct",
            &histogram_of(&values),
            &histogram_of(&[1]),
            2,
            Some(0.5),
        );
        assert_eq!(row.requests, 1000);
        assert!((row.p50_us - 500.0).abs() <= 1.0, "{}", row.p50_us);
        assert!((row.p99_us - 990.0).abs() <= 1.0, "{}", row.p99_us);
        assert!((row.max_us - 1000.0).abs() <= 1.0, "{}", row.max_us);
        assert_eq!(row.proxy_cpu_seconds_per_1000, Some(0.5));
        assert_eq!(row.curve.len(), CURVE_PERCENTILES.len());
        assert!(row.curve.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn added_latency_is_measured_against_direct_and_the_relay_floor() {
        let rows: Vec<PathLatency> = [("direct", 30), ("relay", 130), ("mesh", 140)]
            .iter()
            .map(|(name, us)| summarize(name, &histogram_of(&[*us]), &histogram_of(&[1]), 0, None))
            .collect();
        let p50 = &added(&rows)[0];
        assert_eq!(p50.percentile, "p50");
        assert!((p50.relay_over_direct_us - 100.0).abs() < 0.5);
        assert!((p50.mesh_over_direct_us - 110.0).abs() < 0.5);
        assert!((p50.mesh_over_relay_us - 10.0).abs() < 0.5);
        assert!((p50.mesh_vs_floor.unwrap() - 1.1).abs() < 0.01);
    }
}
