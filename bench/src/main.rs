//! `weft-bench`: what the mesh costs on this machine. It builds a sandbox cluster on
//! the testbed (a client pod and a server pod on different nodes, the control plane
//! on its local-manifests default, a node proxy per node) and measures, in one run
//! and interleaved, three paths over the same namespaces, veths and routes:
//!
//! - `direct`: a second client/server pair in an unmeshed namespace, no proxy;
//! - `relay`: that pair through two plain TCP relays (one per node) started here,
//!   the floor of any design with a userspace proxy on each node;
//! - `mesh`: the meshed pair, captured transparently by weft.
//!
//! Scenarios live in [`load`], the relay in [`relay`], the numbers in [`report`]
//! and [`chart`], the proxies' CPU and memory in [`procstat`]. Needs root.
//! `weft-bench control-plane` ([`scale`]) measures the control plane at scale instead.

mod chart;
mod load;
mod noisy;
mod output;
mod procstat;
mod relay;
mod report;
mod scale;
mod upgrade;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use weft_testbed::{PodSpec, Target, Testbed, WeftMesh};

use crate::load::Measured;
use crate::procstat::ProcEntry;
use crate::report::{BulkScenario, IdleScenario, LatencyScenario, PathBulk, ProxyMemory, Report};

const ECHO_PORT: u16 = 8080;
const RELAY_PORT: u16 = 18080;
const MIB: f64 = 1024.0 * 1024.0;

/// Measures what weft adds over no proxy and over two plain TCP relays.
#[derive(Parser, Debug, Serialize)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Config {
    /// Another scenario instead of the data-plane ones.
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<scale::Command>,
    /// Nodes in the cluster (client on the first, server on the last).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    nodes: u8,
    /// Request/response: requests per second, all connections together.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Request/response: persistent connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Request/response: seconds per path.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// New connection per request: connections per second.
    #[arg(long, default_value_t = 200.0)]
    connect_rate: f64,
    /// New connection per request: seconds per path.
    #[arg(long, default_value_t = 5.0)]
    connect_duration: f64,
    /// Upgrade: seconds of traffic before, between and after the nodes'
    /// proxy upgrades.
    #[arg(long, default_value_t = 3.0)]
    upgrade_settle: f64,
    /// Upgrade: persistent connections (each sending a request every
    /// `--upgrade-interval-ms`, as does the new-connection generator).
    #[arg(long, default_value_t = 4)]
    upgrade_connections: usize,
    /// Upgrade: milliseconds between two requests of one generator.
    #[arg(long, default_value_t = 10)]
    upgrade_interval_ms: u64,
    /// Bulk: seconds per direction and path.
    #[arg(long, default_value_t = 3.0)]
    bulk_duration: f64,
    /// Idle: connections held open at once.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Request and response size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Slices each path's time is cut into, interleaved with the other paths.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Copy buffer of the plain relays, bytes each way.
    #[arg(long, default_value_t = 256 * 1024)]
    relay_buffer: usize,
    /// Paths to measure (the mesh's added cost needs all three).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,relay,mesh"
    )]
    paths: Vec<PathName>,
    /// Scenarios to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rr,connect,bulk,idle,noisy,upgrade"
    )]
    scenarios: Vec<Scenario>,
    /// Write the results as JSON to this file (`-` or no value: stdout, and the
    /// table goes to stderr).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    json: Option<String>,
    /// Write the latency-by-percentile chart (SVG) here.
    #[arg(long, default_value = "weft-bench.svg")]
    chart: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// Open-loop request/response over persistent connections.
    Rr,
    /// A new connection per request.
    Connect,
    /// Single-stream bulk, both directions.
    Bulk,
    /// Many idle connections: proxy memory per connection.
    Idle,
    /// The client's request/response latency alone and beside a
    /// same-node pod's bulk transfer (mesh path).
    Noisy,
    /// The node proxies upgraded under load (last: it replaces the proxies
    /// the other scenarios measure).
    Upgrade,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PathName {
    /// Unmeshed pods, no proxy.
    Direct,
    /// Two plain TCP relays.
    Relay,
    /// weft.
    Mesh,
}

impl PathName {
    fn as_str(self) -> &'static str {
        match self {
            PathName::Direct => "direct",
            PathName::Relay => "relay",
            PathName::Mesh => "mesh",
        }
    }
}

/// One of the three ways from a client pod to an echo server.
struct BenchPath {
    name: &'static str,
    client: &'static str,
    to: SocketAddr,
    /// Whose CPU this path costs: the relays or the proxies; none for direct.
    cpu: Vec<ProcEntry>,
}

struct Bench {
    config: Config,
    /// Declared before the testbed: its processes stop before the namespaces go.
    mesh: std::sync::Mutex<WeftMesh>,
    /// The plain relays, one process per node the path crosses.
    _relays: Vec<relay::RelayProcess>,
    testbed: Testbed,
    paths: Vec<BenchPath>,
    /// (node, proxy) of the nodes the mesh path crosses.
    proxies: Vec<(String, ProcEntry)>,
    ticks: f64,
    bar: ProgressBar,
}

fn main() -> Result<()> {
    if let Some(relayed) = relay::run_if_relay_process() {
        return relayed;
    }
    let mut config = Config::parse();
    if let Some(command) = config.command.take() {
        return scale::run(command);
    }
    use_binaries_next_to_this_one()?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if cfg!(debug_assertions) {
        eprintln!("warning: weft-bench is a debug build; use `cargo build --release --bins`");
    }
    let started = Instant::now();
    let load_at_start = procstat::load_average();
    let bench = Bench::start(config)?;
    let report = bench.run(started, load_at_start)?;
    bench.bar.finish_and_clear();
    output::output(&bench.config, &report)
}

/// `weft_binary` looks for the proxy in the profile directory of a test
/// executable (`target/<profile>/deps/..`); this binary sits in the profile
/// directory itself, so unless `WEFT_BIN_DIR` is set, run again with it
/// pointing next to this executable (exec: same pid, no unsafe env mutation).
fn use_binaries_next_to_this_one() -> Result<()> {
    if std::env::var_os("WEFT_BIN_DIR").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating weft-bench")?;
    let dir = exe.parent().context("weft-bench has no directory")?;
    if !dir.join("weft-proxy").is_file() {
        bail!(
            "no weft-proxy next to {}: build with `cargo build --release --bins`, or set WEFT_BIN_DIR",
            exe.display()
        );
    }
    let error = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env("WEFT_BIN_DIR", dir)
        .exec();
    Err(error).context("re-running weft-bench with WEFT_BIN_DIR")
}

fn steps(config: &Config) -> u64 {
    let rounds = u64::from(config.rounds);
    config
        .scenarios
        .iter()
        .map(|s| match s {
            Scenario::Rr | Scenario::Connect => 3 * rounds,
            Scenario::Bulk => 6,
            Scenario::Idle => 3,
            Scenario::Noisy => 4,
            Scenario::Upgrade => 1,
        })
        .sum::<u64>()
        + 1
}

impl Bench {
    fn start(config: Config) -> Result<Bench> {
        let bar = ProgressBar::new(steps(&config));
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:32}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.set_message("building the sandbox cluster");
        let nodes: Vec<String> = (1..=config.nodes).map(|n| format!("node-{n}")).collect();
        let (first, last) = (nodes[0].as_str(), nodes[nodes.len() - 1].as_str());
        let mut builder = Testbed::builder();
        for node in &nodes {
            builder = builder.node(node);
        }
        let pod = PodSpec::named;
        let testbed = builder
            .pod(pod(first, "bench", "client", true))
            .pod(pod(first, "bench", "noisy", true))
            .pod(pod(last, "bench", "server", true))
            .pod(pod(first, "plain", "plain-client", false))
            .pod(pod(first, "plain", "plain-noisy", false))
            .pod(pod(last, "plain", "plain-server", false))
            .build()
            .context("building the testbed (weft-bench needs root)")?;

        bar.set_message("starting weft");
        // The proxies log as they would in production, not at the tests' debug level.
        let mesh = WeftMesh::start_with_proxy_log_level(&testbed, "info")?;
        mesh.wait_for_data_plane(&testbed)?;
        let mut proxies = vec![(
            first.to_owned(),
            ProcEntry::process(mesh.proxy(first)?.pid()),
        )];
        if last != first {
            proxies.push((last.to_owned(), ProcEntry::process(mesh.proxy(last)?.pid())));
        }

        for server in ["server", "plain-server"] {
            testbed
                .run_in(Target::Pod(server), || -> Result<()> {
                    load::serve(TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT))?)
                })?
                .with_context(|| format!("starting the echo server in {server}"))?;
        }
        let plain_server = SocketAddr::from((testbed.pod_ip("plain-server")?, ECHO_PORT));
        let last_relay = SocketAddr::from((testbed.node_ip(last)?, RELAY_PORT));
        let mut relays = Vec::new();
        let mut relay_cpu = Vec::new();
        // One relay per node the path crosses: node-last -> server, node-1 -> node-last.
        let hops = if first == last {
            vec![(first, plain_server)]
        } else {
            vec![(last, plain_server), (first, last_relay)]
        };
        for (node, upstream) in hops {
            let buffer = config.relay_buffer;
            let relay = testbed
                .run_in(Target::Node(node), || {
                    relay::start(RELAY_PORT, upstream, buffer)
                })?
                .with_context(|| format!("starting the relay on {node}"))?;
            relay_cpu.push(relay.proc_entry());
            relays.push(relay);
        }
        let mut paths = vec![
            BenchPath {
                name: "direct",
                client: "plain-client",
                to: plain_server,
                cpu: Vec::new(),
            },
            BenchPath {
                name: "relay",
                client: "plain-client",
                to: SocketAddr::from((testbed.node_ip(first)?, RELAY_PORT)),
                cpu: relay_cpu,
            },
            BenchPath {
                name: "mesh",
                client: "client",
                to: SocketAddr::from((testbed.pod_ip("server")?, ECHO_PORT)),
                cpu: proxies.iter().map(|(_, entry)| entry.clone()).collect(),
            },
        ];
        paths.retain(|path| config.paths.iter().any(|name| name.as_str() == path.name));
        let bench = Bench {
            config,
            mesh: std::sync::Mutex::new(mesh),
            _relays: relays,
            testbed,
            paths,
            proxies,
            ticks: procstat::ticks_per_second(),
            bar,
        };
        for path in &bench.paths {
            bench
                .in_client(path, |to| {
                    let mut stream = load::connect(to, load::ECHO)?;
                    load::round_trip(&mut stream, b"hello through the path")
                })
                .with_context(|| format!("the {} path does not carry traffic", path.name))?;
        }
        bench.bar.inc(1);
        Ok(bench)
    }

    /// Runs `f(to)` on a thread inside the path's client pod.
    fn in_client<T: Send>(
        &self,
        path: &BenchPath,
        f: impl FnOnce(SocketAddr) -> Result<T> + Send,
    ) -> Result<T> {
        let to = path.to;
        self.testbed
            .run_in(Target::Pod(path.client), move || f(to))?
    }

    /// CPU seconds the path's relays or proxies have used so far.
    fn cpu(&self, path: &BenchPath) -> Result<Option<f64>> {
        if path.cpu.is_empty() {
            return Ok(None);
        }
        let mut total = 0.0;
        for entry in &path.cpu {
            total += entry.cpu_seconds(self.ticks)?;
        }
        Ok(Some(total))
    }

    fn proxy_rss_kib(&self) -> Result<u64> {
        let mut total = 0;
        for (_, entry) in &self.proxies {
            total += entry.memory()?.rss_kib;
        }
        Ok(total)
    }

    /// Path order for round `round`: rotated, so no path always goes first.
    fn order(&self, round: u32) -> impl Iterator<Item = usize> + use<> {
        let n = self.paths.len();
        (0..n).map(move |i| (i + round as usize) % n)
    }

    fn run(&self, started: Instant, load_at_start: f64) -> Result<Report> {
        let idle_memory: Vec<_> = self
            .proxies
            .iter()
            .map(|(_, entry)| entry.memory())
            .collect::<Result<_>>()?;
        let c = &self.config;
        let mut report = Report {
            machine: procstat::machine(),
            load_average: (load_at_start, 0.0),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            proxy_binary: String::new(),
            proxy_is_release_build: false,
            config: serde_json::to_value(c)?,
            proxies: Vec::new(),
            request_response: None,
            connection_per_request: None,
            bulk: None,
            idle: None,
            noisy_neighbour: None,
            upgrade: None,
            elapsed_seconds: 0.0,
        };
        let exe = self.proxies[0].1.exe()?;
        report.proxy_is_release_build =
            exe.parent().and_then(|dir| dir.file_name()) == Some("release".as_ref());
        report.proxy_binary = exe.display().to_string();

        if c.scenarios.contains(&Scenario::Rr) {
            let title = format!(
                "request/response {} B, {} req/s over {} connections (open loop), {} s per path",
                c.payload, c.rate, c.connections, c.duration
            );
            let slice = Duration::from_secs_f64(c.duration / f64::from(c.rounds));
            let (rate, connections, payload) = (c.rate, c.connections, c.payload);
            report.request_response = Some(self.latency(title, |to| {
                load::request_response(to, rate, connections, slice, payload)
            })?);
        }
        if c.scenarios.contains(&Scenario::Connect) {
            let title = format!(
                "new connection per request {} B, {} conn/s, {} s per path",
                c.payload, c.connect_rate, c.connect_duration
            );
            let slice = Duration::from_secs_f64(c.connect_duration / f64::from(c.rounds));
            let (rate, payload) = (c.connect_rate, c.payload);
            report.connection_per_request = Some(self.latency(title, |to| {
                load::connection_per_request(to, rate, slice, payload)
            })?);
        }
        if c.scenarios.contains(&Scenario::Bulk) {
            report.bulk = Some(self.bulk()?);
        }
        if c.scenarios.contains(&Scenario::Idle) {
            report.idle = Some(self.idle()?);
        }
        for ((node, entry), idle) in self.proxies.iter().zip(idle_memory) {
            let now = entry.memory()?;
            report.proxies.push(ProxyMemory {
                node: node.clone(),
                idle_rss_kib: idle.rss_kib,
                final_rss_kib: now.rss_kib,
                peak_rss_kib: now.peak_kib,
                idle_anon_kib: idle.anon_kib,
                final_anon_kib: now.anon_kib,
            });
        }
        if c.scenarios.contains(&Scenario::Noisy) {
            report.noisy_neighbour = Some(self.noisy_neighbour()?);
        }
        if c.scenarios.contains(&Scenario::Upgrade) {
            report.upgrade = Some(self.upgrade()?);
        }
        report.load_average.1 = procstat::load_average();
        report.elapsed_seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// A latency scenario: `rounds` slices of `load` per path, interleaved.
    fn latency(
        &self,
        title: String,
        load: impl Fn(SocketAddr) -> Result<Measured> + Send + Sync,
    ) -> Result<LatencyScenario> {
        let mut totals: Vec<(Measured, f64)> =
            self.paths.iter().map(|_| (Measured::new(), 0.0)).collect();
        for round in 0..self.config.rounds {
            for i in self.order(round) {
                let path = &self.paths[i];
                self.bar
                    .set_message(format!("{} · {}", title_short(&title), path.name));
                let cpu_before = self.cpu(path)?;
                let measured = self.in_client(path, &load)?;
                let cpu_after = self.cpu(path)?;
                let (total, cpu) = &mut totals[i];
                total.latency.add(&measured.latency)?;
                total.send_lag.add(&measured.send_lag)?;
                total.errors += measured.errors;
                *cpu += cpu_after.unwrap_or(0.0) - cpu_before.unwrap_or(0.0);
                self.bar.inc(1);
            }
        }
        let paths: Vec<_> = self
            .paths
            .iter()
            .zip(&totals)
            .map(|(path, (m, cpu))| {
                let cpu = (!path.cpu.is_empty()).then_some(*cpu);
                report::summarize(path.name, &m.latency, &m.send_lag, m.errors, cpu)
            })
            .collect();
        Ok(LatencyScenario {
            title,
            added: report::added(&paths),
            paths,
        })
    }

    fn bulk(&self) -> Result<BulkScenario> {
        let seconds = self.config.bulk_duration;
        let duration = Duration::from_secs_f64(seconds);
        // (upload B/s, download B/s, bytes moved, cpu seconds)
        let mut rates = vec![(0.0, 0.0, 0.0, 0.0); self.paths.len()];
        for upload in [true, false] {
            for (i, path) in self.paths.iter().enumerate() {
                let direction = if upload { "upload" } else { "download" };
                self.bar
                    .set_message(format!("bulk {direction} · {}", path.name));
                let cpu_before = self.cpu(path)?;
                let started = Instant::now();
                let rate = self.in_client(path, |to| {
                    if upload {
                        load::upload(to, duration)
                    } else {
                        load::download(to, duration)
                    }
                })?;
                let moved = rate * started.elapsed().as_secs_f64();
                let cpu = self.cpu(path)?.unwrap_or(0.0) - cpu_before.unwrap_or(0.0);
                let entry = &mut rates[i];
                if upload {
                    entry.0 = rate;
                } else {
                    entry.1 = rate;
                }
                entry.2 += moved;
                entry.3 += cpu;
                self.bar.inc(1);
            }
        }
        let (direct_up, direct_down) = (rates[0].0.max(1.0), rates[0].1.max(1.0));
        let paths = self
            .paths
            .iter()
            .zip(rates)
            .map(|(path, (up, down, moved, cpu))| PathBulk {
                path: path.name.to_owned(),
                upload_mib_s: up / MIB,
                download_mib_s: down / MIB,
                upload_vs_direct: up / direct_up,
                download_vs_direct: down / direct_down,
                proxy_cpu_seconds_per_gib: (!path.cpu.is_empty() && moved > 0.0)
                    .then(|| cpu / (moved / (MIB * 1024.0))),
            })
            .collect();
        Ok(BulkScenario { seconds, paths })
    }

    fn idle(&self) -> Result<IdleScenario> {
        let count = self.config.idle_connections;
        let mut open_seconds = Vec::new();
        let (mut before, mut open) = (0, 0);
        for path in &self.paths {
            self.bar
                .set_message(format!("{count} idle connections · {}", path.name));
            let rss_before = self.proxy_rss_kib()?;
            let started = Instant::now();
            let streams = self.in_client(path, |to| load::open_idle(to, count))?;
            open_seconds.push((path.name.to_owned(), started.elapsed().as_secs_f64()));
            if path.name == "mesh" {
                std::thread::sleep(Duration::from_millis(500));
                (before, open) = (rss_before, self.proxy_rss_kib()?);
            }
            drop(streams);
            std::thread::sleep(Duration::from_millis(200));
            self.bar.inc(1);
        }
        Ok(IdleScenario {
            connections: count,
            open_seconds,
            mesh_rss_before_kib: before,
            mesh_rss_open_kib: open,
            mesh_bytes_per_connection: (open as f64 - before as f64) * 1024.0 / count.max(1) as f64,
        })
    }
}

fn title_short(title: &str) -> &str {
    title.split(',').next().unwrap_or(title)
}
