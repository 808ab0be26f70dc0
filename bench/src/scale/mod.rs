//! `weft-bench control-plane`: the control plane at scale (issue 18). It
//! writes a cluster of N nodes and P pods as local manifests
//! ([`cluster`]), starts the real `weft-control-plane` on them
//! ([`process`]), opens one config stream per simulated node from this
//! process ([`clients`]), and measures ([`report`]):
//!
//! - how long until every node has its full state, and how big it is;
//! - the control plane's memory and CPU;
//! - single pod IP changes, one at a time: from the manifest's rename until
//!   the last node has the new IP, the CPU each costs, how many nodes hear
//!   of it; and one label-only change, which only the pod's node needs;
//! - a churn of many changes per second: how long after the last one every
//!   node holds every changed pod's final IP;
//! - what one node's proxy pays for all of it: memory per remote workload,
//!   and the data plane's stall per delta ([`proxy_side`]);
//! - what the proxies' traffic reports cost, and how fast the dashboard
//!   answers ([`dashboard`]).
//!
//! Needs no root and no testbed: everything is on loopback, each node
//! connecting from its own address in 127.1.0.0/16.

mod changes;
mod clients;
mod cluster;
mod dashboard;
mod grpc;
mod light;
mod process;
mod proxy_side;
mod report;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::procstat::{self, ProcEntry};
use clients::{NodeRecord, Streams};
use cluster::Cluster;
use process::{ControlPlane, Paths};
use report::{
    ClusterFigures, ControlPlaneFigures, FullStateFigures, ScaleReport, StreamFigures, percentile,
};

/// `weft-bench`'s subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// The control plane at scale: N simulated nodes (one config stream
    /// each, from this process) on a generated cluster of P pods; full
    /// state, memory, CPU, and the time a pod change takes to reach every
    /// node. Needs no root.
    ControlPlane(ScaleArgs),
    /// The proxy's side of `control-plane`, in a process of its own:
    /// applies the updates recorded in FILE as a proxy does and prints the
    /// figures as JSON.
    #[command(hide = true)]
    ProxyReplay {
        /// The recorded updates.
        file: std::path::PathBuf,
    },
}

/// Settings of the control-plane scenario.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ScaleArgs {
    /// Simulated nodes, one config stream each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    nodes: u32,
    /// Pods, 100 per namespace, 5 per app (one Service each).
    #[arg(long, default_value_t = 3000,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(cluster::MAX_PODS)))]
    pods: u32,
    /// Single pod IP changes, one at a time (each waits until every node
    /// has it).
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// Churn: pod IP changes per second (0: no churn).
    #[arg(long, default_value_t = 100.0)]
    churn_rate: f64,
    /// Churn: for how many seconds.
    #[arg(long, default_value_t = 10.0)]
    churn_seconds: f64,
    /// Streams being opened at once; a node holds its place until its full
    /// state has arrived.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The longest any one wait may take, in seconds; then the run fails,
    /// saying what it waited for.
    #[arg(long, default_value_t = 300.0)]
    deadline: f64,
    /// After a change has reached every node, how long the control plane's
    /// CPU is still counted to the change, in milliseconds.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Edges in each node's traffic report in the dashboard phase (0: no
    /// dashboard phase).
    #[arg(long, default_value_t = 20)]
    report_edges: u32,
    /// The interval the dashboard phase spreads the reports over (and
    /// measures a quiet interval of), in seconds: the proxies' default.
    #[arg(long, default_value_t = 10.0)]
    report_interval_seconds: f64,
    /// Seed of the choice of pods to change.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the results as JSON to this file (`-` or no value: stdout, and
    /// the table goes to stderr).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    json: Option<String>,
    /// Keep the manifests, the control plane's state and its log (they are
    /// kept anyway when the run fails).
    #[arg(long)]
    keep: bool,
}

/// Runs a subcommand.
pub fn run(command: Command) -> Result<()> {
    let args = match command {
        Command::ControlPlane(args) => args,
        Command::ProxyReplay { file } => return proxy_side::replay(&file),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async {
        tokio::select! {
            report = run_keeping_files_on_failure(&args) => report,
            signal = interrupted() => Err(anyhow!("interrupted by {}", signal?)),
        }
    });
    // The simulated nodes' tasks go with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(2));
    report::output(args.json.as_deref(), &report?)
}

async fn interrupted() -> Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = tokio::signal::ctrl_c() => Ok("SIGINT"),
    }
}

async fn run_keeping_files_on_failure(args: &ScaleArgs) -> Result<ScaleReport> {
    let dir = tempfile::Builder::new()
        .prefix("weft-bench-scale-")
        .tempdir()
        .context("creating a temporary directory")?;
    let result = Scenario::run(args, dir.path()).await;
    if result.is_err() || args.keep {
        let kept = dir.keep();
        eprintln!(
            "kept {} (manifests/, state/, control-plane.log)",
            kept.display()
        );
    }
    result
}

/// Which pods change, chosen before the run so the nodes can track them.
struct Plan {
    singles: Vec<u32>,
    label: u32,
    churn: Vec<u32>,
}

impl Plan {
    fn new(args: &ScaleArgs) -> Plan {
        let mut state = cluster::mix(args.seed) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(args.pods)) as u32
        };
        let mut singles = Vec::new();
        let mut chosen = BTreeSet::new();
        while singles.len() < args.changes as usize {
            let pod = next();
            // Distinct pods while there are enough of them.
            if chosen.insert(pod) || chosen.len() >= args.pods as usize {
                singles.push(pod);
            }
        }
        let label = next();
        let churn_changes = (args.churn_rate * args.churn_seconds).round().max(0.0) as usize;
        let churn = (0..churn_changes).map(|_| next()).collect();
        Plan {
            singles,
            label,
            churn,
        }
    }

    fn tracked(&self) -> BTreeSet<u32> {
        let all = self.singles.iter().chain(&self.churn);
        all.copied().chain([self.label]).collect()
    }
}

struct Scenario<'a> {
    args: &'a ScaleArgs,
    cluster: Cluster,
    cp: ControlPlane,
    streams: Arc<Streams>,
    bar: ProgressBar,
    deadline: Duration,
    settle: Duration,
    ticks: f64,
    /// While the nodes connect, once a second: (seconds since the control
    /// plane's start, nodes with their full state, its RSS in KiB).
    timeline: Vec<(f64, u32, u64)>,
}

impl Scenario<'_> {
    async fn run(args: &ScaleArgs, dir: &std::path::Path) -> Result<ScaleReport> {
        let load_at_start = procstat::load_average();
        let deadline = Duration::try_from_secs_f64(args.deadline)
            .context("--deadline is not a number of seconds")?;
        raise_file_limit(u64::from(args.nodes) + 1024)?;
        let binary = process::binary()?;
        let paths = Paths {
            manifests: dir.join("manifests"),
            tokens: dir.join("node-tokens"),
            state: dir.join("state"),
            log: dir.join("control-plane.log"),
        };
        std::fs::create_dir(&paths.manifests)
            .with_context(|| format!("creating {}", paths.manifests.display()))?;
        let bar = progress_bar(u64::from(args.nodes));
        bar.set_message("writing the manifests");
        let cluster = Cluster::new(&paths.manifests, args.nodes, args.pods)?;
        let (_, manifest_bytes) = cluster.write_all(&paths.tokens)?;
        let plan = Plan::new(args);
        let tracked: Vec<String> = plan.tracked().iter().map(|&p| cluster.uid(p)).collect();

        bar.set_message("starting the control plane");
        let mut cp = ControlPlane::start(&binary, &paths)?;
        let roots = cp.roots(Instant::now() + deadline).await?;
        let streams = Streams::new(cp.grpc, &roots, args.nodes, args.concurrency, &tracked)?;
        let mut nodes = JoinSet::new();
        for node in 1..=args.nodes {
            nodes.spawn(streams.clone().follow(node));
        }
        let mut scenario = Scenario {
            args,
            cluster,
            cp,
            streams,
            bar,
            deadline,
            settle: Duration::from_millis(args.settle_ms),
            ticks: procstat::ticks_per_second(),
            timeline: Vec::new(),
        };
        let result = scenario.measure(&plan, manifest_bytes).await;
        scenario.bar.finish_and_clear();
        let mut report = result.with_context(|| scenario.situation())?;
        drop(nodes); // the streams end, then the control plane
        let log = scenario.cp.log.clone();
        let recorded = std::mem::take(&mut scenario.streams.record(clients::PROXY_NODE).messages);
        drop(scenario);
        // With the control plane stopped, the proxy's side has the machine.
        report.proxy = Some(
            proxy_side::measure(&dir.join("proxy-updates.bin"), &recorded)
                .context("replaying the updates of the proxy's node")?,
        );
        drop(recorded);
        report.control_plane.log = process::summarize_log(&log)?;
        report.load_average = (load_at_start, procstat::load_average());
        report.control_plane_is_release_build =
            binary.parent().and_then(|dir| dir.file_name()) == Some("release".as_ref());
        report.control_plane_binary = binary.display().to_string();
        Ok(report)
    }

    async fn measure(&mut self, plan: &Plan, manifest_bytes: u64) -> Result<ScaleReport> {
        let nodes = self.args.nodes;
        self.bar.set_message("opening the nodes' streams");
        let started = self.cp.started;
        self.wait_for_nodes("got the full state", true, |r| r.first_full_state.is_some())
            .await?;
        let connected = self.cp.memory()?;
        let cpu_connected = self.cp.cpu_seconds()?;
        let full_states: Vec<_> = (1..=nodes)
            .filter_map(|n| self.streams.record(n).first_full_state)
            .collect();
        let since_start: Vec<f64> = full_states
            .iter()
            .map(|f| (f.at - started).as_secs_f64())
            .collect();
        let bytes: Vec<u64> = full_states.iter().map(|f| f.bytes as u64).collect();
        let workloads: Vec<u64> = full_states.iter().map(|f| f.workloads as u64).collect();
        let full_state = FullStateFigures {
            nodes: full_states.len() as u32,
            timeline: std::mem::take(&mut self.timeline),
            all_nodes_seconds: percentile(&since_start, 100.0),
            p50_seconds: percentile(&since_start, 50.0),
            first_seconds: percentile(&since_start, 0.0),
            bytes_p50: percentile(&bytes, 50.0),
            bytes_max: percentile(&bytes, 100.0),
            workloads_min: percentile(&workloads, 0.0),
            workloads_max: percentile(&workloads, 100.0),
        };

        let changes = self.single_changes(&plan.singles).await?;
        let label_change = self.label_change(plan.label, &changes).await?;
        let churn = self.churn(&plan.churn).await?;
        let dashboard = match self.args.report_edges {
            0 => None,
            _ => Some(self.dashboard().await?),
        };

        let end = self.cp.memory()?;
        let this_process = ProcEntry::process(std::process::id());
        let opened = (1..=nodes)
            .map(|n| u64::from(self.streams.record(n).opened))
            .sum();
        Ok(ScaleReport {
            machine: procstat::machine(),
            load_average: (0.0, 0.0),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            control_plane_binary: String::new(),
            control_plane_is_release_build: false,
            config: serde_json::to_value(self.args)?,
            cluster: ClusterFigures {
                nodes,
                pods: self.args.pods,
                namespaces: self.cluster.namespaces(),
                services: self.cluster.apps(),
                manifest_bytes,
            },
            full_state,
            control_plane: ControlPlaneFigures {
                rss_connected_kib: connected.rss_kib,
                peak_connected_kib: connected.peak_kib,
                rss_end_kib: end.rss_kib,
                peak_end_kib: end.peak_kib,
                cpu_seconds_connected: cpu_connected,
                cpu_seconds_end: self.cp.cpu_seconds()?,
                log: Default::default(),
            },
            changes,
            label_change,
            churn,
            dashboard,
            streams: StreamFigures {
                opened,
                failures: self.streams.failures(),
            },
            proxy: None,
            bench_cpu_seconds: this_process.cpu_seconds(self.ticks)?,
            bench_peak_rss_kib: this_process.memory()?.peak_kib,
            elapsed_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Waits until `done` holds for every node's record; when. Fails at the
    /// deadline, or when the control plane exits, saying how many nodes
    /// were still missing.
    async fn wait_for_nodes(
        &mut self,
        what: &str,
        show_progress: bool,
        mut done: impl FnMut(&NodeRecord) -> bool,
    ) -> Result<Instant> {
        let nodes = self.args.nodes;
        let deadline = Instant::now() + self.deadline;
        let mut pending: Vec<u32> = (1..=nodes).collect();
        loop {
            pending.retain(|&node| !done(&self.streams.record(node)));
            if show_progress {
                let served = nodes - pending.len() as u32;
                self.bar.set_position(u64::from(served));
                let seconds = self.cp.started.elapsed().as_secs_f64();
                let last = self.timeline.last().map_or(f64::MIN, |sample| sample.0);
                if let (true, Some((_, memory))) = (seconds >= last + 1.0, self.cp.last_memory()) {
                    self.timeline.push((seconds, served, memory.rss_kib));
                }
            }
            let Some(&first) = pending.first() else {
                return Ok(Instant::now());
            };
            let missing = || {
                format!(
                    "{} of {nodes} nodes never {what} (node-{first} among them)",
                    pending.len()
                )
            };
            self.cp.check_running().with_context(missing)?;
            if Instant::now() > deadline {
                bail!("{} within {:?}", missing(), self.deadline);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// For each node, `f` of its record.
    fn each_node<T>(&self, f: impl Fn(&NodeRecord) -> T) -> Vec<T> {
        (1..=self.args.nodes)
            .map(|n| f(&self.streams.record(n)))
            .collect()
    }

    /// For each node, the updates that arrived since `since` and their bytes.
    fn arrivals_since(&self, since: Instant) -> Vec<(u64, u64)> {
        self.each_node(|r| {
            let recent = r.arrivals.iter().rev().take_while(|a| a.at >= since);
            recent.fold((0, 0), |(n, b), a| (n + 1, b + u64::from(a.bytes)))
        })
    }

    fn slot(&self, uid: &str) -> Result<usize> {
        self.streams
            .slot(uid)
            .with_context(|| format!("{uid} is not a tracked pod"))
    }

    /// What the control plane and the streams look like now, for an error.
    fn situation(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let memory = match (self.cp.memory(), self.cp.last_memory()) {
            (Ok(m), _) => format!(
                "RSS {:.0} MiB, peak {:.0} MiB",
                mib(m.rss_kib),
                mib(m.peak_kib)
            ),
            (Err(_), Some((at, m))) => format!(
                "gone, last seen {:.1} s after its start with RSS {:.0} MiB, peak {:.0} MiB",
                at.as_secs_f64(),
                mib(m.rss_kib),
                mib(m.peak_kib)
            ),
            (Err(_), None) => "gone".to_owned(),
        };
        let opened: u32 = self.each_node(|r| r.opened).iter().sum();
        let mut failures: Vec<_> = self.streams.failures().into_iter().collect();
        failures.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        let failures: Vec<String> = failures
            .iter()
            .take(3)
            .map(|(reason, count)| format!("{count} × {reason}"))
            .collect();
        let failures = match failures.is_empty() {
            true => String::new(),
            false => format!("; failed attempts: {}", failures.join("; ")),
        };
        // Every tenth second of the nodes' connecting: how it went.
        let timeline: Vec<String> = self
            .timeline
            .iter()
            .step_by(10)
            .map(|(s, n, kib)| format!("{s:.0} s: {n} nodes, {:.0} MiB", mib(*kib)))
            .collect();
        let timeline = match timeline.is_empty() {
            true => String::new(),
            false => format!("; full states sent by then, RSS: {}", timeline.join(", ")),
        };
        format!(
            "after {:.1} s: control plane {memory}; {opened} streams opened{failures}{timeline}; control plane log: {}",
            self.cp.started.elapsed().as_secs_f64(),
            self.cp.log.display()
        )
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn progress_bar(length: u64) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:32}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Raises this process's open-file limit (and so the control plane's, which
/// inherits it) to at least `needed`, within the hard limit.
fn raise_file_limit(needed: u64) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        bail!("{needed} open files needed, but the hard limit (ulimit -Hn) is {hard}");
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard).context("raising RLIMIT_NOFILE")
}
