//! The proxy's side of the control-plane scenario: what one node proxy pays
//! for the cluster's config. Node [`super::clients::PROXY_NODE`] keeps every
//! update it received; after the run, a child process of this binary
//! (`weft-bench proxy-replay`, so that its memory starts clean) applies them
//! with the proxy's own code, in order:
//!
//! - the node view ([`NodeView::apply`]), on the proxy's control thread;
//! - the route table ([`Routes::prepare`]), on the same thread, before the
//!   view is published, as the proxy's control-plane client does;
//! - the kept config ([`StoredConfig`](weft_proxy::StoredConfig), what a
//!   restarted proxy serves), on the same thread.
//!
//! Meanwhile a second thread stands for the data plane: it asks for the
//! current table and resolves an address through it, over and over, as
//! connections do. Its longest single turn while a delta is applied is the
//! data plane's stall for that delta (waiting on a lock, building a table
//! itself, or freeing the old one).
//!
//! Memory is the growth of the child's anonymous resident memory (`RssAnon`:
//! its heap) over each step of taking the first full state, per remote
//! workload: glibc's own overhead and what it keeps of the conversion's
//! freed garbage included, as the proxy pays it. The whole resident set's
//! growth is reported beside it: it also counts the pages of the binary's
//! code that the first full state runs for the first time, a fixed cost
//! (about 0.6 MiB) that earlier steps divided by the workloads too.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use weft_api::v1 as pb;
use weft_proxy::NodeView;
use weft_proxy::dataplane::Routes;

use super::cluster::Cluster;
use crate::procstat::ProcEntry;

/// What one proxy paid.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ProxyFigures {
    /// The node it was.
    pub node: String,
    /// In its first full state: remote workloads, local ones, Services.
    pub remote_workloads: u64,
    /// Local workloads.
    pub local_workloads: u64,
    /// Services.
    pub services: u64,
    /// The first full state's size on the wire.
    pub full_state_bytes: u64,
    /// Anonymous memory the node view added, per remote workload, in bytes.
    pub view_bytes_per_remote_workload: f64,
    /// The same for the route table.
    pub routes_bytes_per_remote_workload: f64,
    /// The same for the kept config.
    pub kept_bytes_per_remote_workload: f64,
    /// The three together.
    pub total_bytes_per_remote_workload: f64,
    /// The whole resident set's growth over the three, code pages included
    /// (the figure of the steps before the seventh).
    #[serde(default)]
    pub total_resident_bytes_per_remote_workload: f64,
    /// Applying the first full state: the view, in milliseconds.
    pub full_state_view_ms: f64,
    /// The first full state's route table (on the control thread), in ms.
    pub full_state_routes_ms: f64,
    /// Deltas applied after it.
    pub deltas: u64,
    /// Entries (listed or removed) the deltas carried, all together.
    pub delta_entries: u64,
    /// Applying a delta to the view: p50, p99, max, in microseconds.
    pub delta_view_us: [f64; 3],
    /// A delta's route table, on the control thread: p50, p99, max, in µs.
    pub delta_routes_us: [f64; 3],
    /// Folding a delta into the kept config: p50, p99, max, in µs.
    pub delta_kept_us: [f64; 3],
    /// The data plane's longest turn while a delta was applied: p50, p99,
    /// max over the deltas, in µs.
    pub delta_stall_us: [f64; 3],
    /// Each delta: its entries, then view, route table, kept config and
    /// the data plane's longest turn in µs (the cost per entry shows here).
    pub each_delta: Vec<[f64; 5]>,
    /// Full states after the first (a stream that was opened again).
    pub later_full_states: u64,
    /// Entries the proxy refused, all updates together (should be 0).
    pub refused_entries: u64,
}

/// Writes node `PROXY_NODE`'s updates to `path` (each with its length
/// before it) and replays them in a child process; its figures.
pub fn measure(path: &Path, updates: &[Vec<u8>]) -> Result<ProxyFigures> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for update in updates {
        file.write_all(&(update.len() as u64).to_le_bytes())?;
        file.write_all(update)?;
    }
    file.into_inner()
        .context("writing the proxy's updates")?
        .sync_all()?;
    let binary = std::env::current_exe().context("finding this binary")?;
    let output = std::process::Command::new(binary)
        .arg("proxy-replay")
        .arg(path)
        .output()
        .context("running weft-bench proxy-replay")?;
    if !output.status.success() {
        bail!(
            "weft-bench proxy-replay failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("reading proxy-replay's figures")
}

/// `weft-bench proxy-replay FILE`: applies the updates in `path` as the
/// proxy of node `PROXY_NODE` would; prints the figures as JSON.
pub fn replay(path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    let updates = split(&bytes)?;
    let mut updates = updates.into_iter();
    let Some(first) = updates.next() else {
        bail!("no update was recorded");
    };
    let node = Cluster::node_name(super::clients::PROXY_NODE);
    let mut figures = ProxyFigures {
        full_state_bytes: first.len() as u64,
        ..ProxyFigures::default()
    };
    let first = pb::ConfigUpdate::decode(first).context("decoding the first update")?;
    if !first.full_state {
        bail!("the first update is not a full state");
    }
    let me = ProcEntry::process(std::process::id());
    let rss = || me.memory().map(|m| m.anon_kib * 1024);
    let resident = || me.memory().map(|m| m.rss_kib * 1024);
    let resident_before = resident()?;
    let before = rss()?;
    let started = Instant::now();
    let applied = NodeView::apply(None, &first, &node).context("applying the full state")?;
    figures.full_state_view_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut view = Arc::new(applied.view);
    figures.refused_entries += applied.refused.len() as u64;
    let with_view = rss()?;
    // Routes follows the view with a task of its own; none runs here (the
    // table is always prepared before the view is published).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("starting a runtime")?;
    let _entered = runtime.enter();
    let (views, receiver) = tokio::sync::watch::channel(None);
    let routes = Routes::follow(receiver);
    let prepare = routes.preparer();
    let started = Instant::now();
    prepare(&view);
    figures.full_state_routes_ms = started.elapsed().as_secs_f64() * 1e3;
    views.send_replace(Some(view.clone()));
    let with_routes = rss()?;
    let mut kept = weft_proxy::StoredConfig::default();
    kept.fold_in(&first, &Default::default(), &view);
    let with_kept = rss()?;
    let resident_with_kept = resident()?;
    let remote = view.remote_workloads().len() as u64;
    let per = |grown: u64| grown as f64 / remote.max(1) as f64;
    figures.remote_workloads = remote;
    figures.local_workloads = view.local_workloads().len() as u64;
    figures.services = view.services().len() as u64;
    figures.view_bytes_per_remote_workload = per(with_view.saturating_sub(before));
    figures.routes_bytes_per_remote_workload = per(with_routes.saturating_sub(with_view));
    figures.kept_bytes_per_remote_workload = per(with_kept.saturating_sub(with_routes));
    figures.total_bytes_per_remote_workload = per(with_kept.saturating_sub(before));
    figures.total_resident_bytes_per_remote_workload =
        per(resident_with_kept.saturating_sub(resident_before));
    drop(first);

    let target = view
        .remote_workloads()
        .values()
        .find_map(|w| w.ips.first().copied())
        .map_or_else(
            || SocketAddr::from(([10, 0, 0, 1], 80)),
            |ip| (ip, 80).into(),
        );
    let data_plane = DataPlaneProbe::default();
    std::thread::scope(|threads| -> Result<()> {
        threads.spawn(|| data_plane.run(&routes, target));
        let result = (|| -> Result<()> {
            for update in updates {
                let update = pb::ConfigUpdate::decode(update).context("decoding an update")?;
                if update.full_state {
                    figures.later_full_states += 1;
                }
                data_plane.longest_ns.store(0, Ordering::Relaxed);
                let started = Instant::now();
                let applied = NodeView::apply(Some(&view), &update, &node)
                    .with_context(|| format!("applying version {}", update.version))?;
                let view_took = started.elapsed();
                figures.refused_entries += applied.refused.len() as u64;
                let started = Instant::now();
                prepare(&applied.view);
                let routes_took = started.elapsed();
                let started = Instant::now();
                kept.fold_in(&update, &Default::default(), &applied.view);
                let kept_took = started.elapsed();
                view = Arc::new(applied.view);
                views.send_replace(Some(view.clone()));
                // The window closes once the data plane has used the new table.
                while data_plane.seen.load(Ordering::Acquire) < view.generation() {
                    std::thread::yield_now();
                }
                let stall_ns = data_plane.longest_ns.swap(0, Ordering::Relaxed);
                if !update.full_state {
                    figures.each_delta.push([
                        entries(&update) as f64,
                        view_took.as_secs_f64() * 1e6,
                        routes_took.as_secs_f64() * 1e6,
                        kept_took.as_secs_f64() * 1e6,
                        stall_ns as f64 / 1e3,
                    ]);
                }
            }
            Ok(())
        })();
        data_plane.stop.store(true, Ordering::Relaxed);
        result
    })?;
    let column = |i: usize| -> Vec<f64> { figures.each_delta.iter().map(|d| d[i]).collect() };
    let entries = column(0);
    figures.deltas = entries.len() as u64;
    figures.delta_entries = entries.iter().sum::<f64>() as u64;
    figures.delta_view_us = spread(&column(1));
    figures.delta_routes_us = spread(&column(2));
    figures.delta_kept_us = spread(&column(3));
    figures.delta_stall_us = spread(&column(4));
    figures.node = node;
    drop((routes, view, kept));
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &figures)?;
    writeln!(out)?;
    Ok(())
}

/// The data plane's stand-in: a thread that takes the current route table
/// and resolves an address through it, as each connection does, and keeps
/// its longest turn.
#[derive(Default)]
struct DataPlaneProbe {
    stop: AtomicBool,
    /// The longest turn since it was last reset, in nanoseconds.
    longest_ns: AtomicU64,
    /// The generation of the newest table it has used.
    seen: AtomicU64,
}

impl DataPlaneProbe {
    fn run(&self, routes: &Routes, target: SocketAddr) {
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let table = routes.current();
            std::hint::black_box(table.resolve(target).is_ok());
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.longest_ns.fetch_max(took, Ordering::Relaxed);
            self.seen.fetch_max(table.generation, Ordering::Release);
        }
    }
}

/// The proxy's rows of the table.
pub fn render(out: &mut String, p: &ProxyFigures) {
    use super::report::row;
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\nthe proxy of {}: {} remote workloads, {} local, {} Services",
        p.node, p.remote_workloads, p.local_workloads, p.services
    );
    row(
        out,
        "memory per remote workload",
        format!(
            "{:.0} B of heap (view {:.0}, route table {:.0}, kept config {:.0}); {:.0} B resident with code pages",
            p.total_bytes_per_remote_workload,
            p.view_bytes_per_remote_workload,
            p.routes_bytes_per_remote_workload,
            p.kept_bytes_per_remote_workload,
            p.total_resident_bytes_per_remote_workload
        ),
    );
    row(
        out,
        "first full state",
        format!(
            "{:.1} KiB; view {:.1} ms, route table {:.1} ms",
            p.full_state_bytes as f64 / 1024.0,
            p.full_state_view_ms,
            p.full_state_routes_ms
        ),
    );
    let [p50, p99, max] = p.delta_stall_us;
    row(
        out,
        "data-plane stall per delta",
        format!(
            "p50 {p50:.1} µs, p99 {p99:.1} µs, max {max:.1} µs ({} deltas, {} entries)",
            p.deltas, p.delta_entries
        ),
    );
    let [v, r, k] = [p.delta_view_us, p.delta_routes_us, p.delta_kept_us];
    row(
        out,
        "delta on the control thread",
        format!(
            "p50 / p99 / max µs: view {:.1} / {:.1} / {:.1}; route table {:.1} / {:.1} / {:.1}; \
             kept config {:.1} / {:.1} / {:.1}",
            v[0], v[1], v[2], r[0], r[1], r[2], k[0], k[1], k[2]
        ),
    );
    if p.later_full_states > 0 || p.refused_entries > 0 {
        row(
            out,
            "also",
            format!(
                "{} later full states, {} refused entries",
                p.later_full_states, p.refused_entries
            ),
        );
    }
}

/// The length-prefixed updates of a replay file.
fn split(mut bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let mut updates = Vec::new();
    while !bytes.is_empty() {
        let Some((len, rest)) = bytes.split_first_chunk::<8>() else {
            bail!("a truncated length");
        };
        let len = usize::try_from(u64::from_le_bytes(*len))?;
        if rest.len() < len {
            bail!("an update of {len} bytes with {} left", rest.len());
        }
        let (update, rest) = rest.split_at(len);
        updates.push(update);
        bytes = rest;
    }
    Ok(updates)
}

/// Entries a delta lists or removes.
fn entries(update: &pb::ConfigUpdate) -> u64 {
    let counts = [
        update.local_workloads.len(),
        update.remote_workloads.len(),
        update.services.len(),
        update.authorization_policies.len(),
        update.removed_local_workloads.len(),
        update.removed_remote_workloads.len(),
        update.removed_services.len(),
        update.removed_authorization_policies.len(),
    ];
    counts.iter().sum::<usize>() as u64
}

/// p50, p99 and max of `samples` (zeros when there are none).
fn spread(samples: &[f64]) -> [f64; 3] {
    use super::report::percentile;
    [
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        percentile(samples, 100.0),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    #[test]
    fn a_replay_file_splits_into_its_updates_and_a_torn_one_is_an_error() {
        let mut file = Vec::new();
        for update in [&b"first"[..], b"", b"third"] {
            file.extend_from_slice(&(update.len() as u64).to_le_bytes());
            file.extend_from_slice(update);
        }
        let updates = split(&file).unwrap();
        assert_eq!(updates, [&b"first"[..], b"", b"third"]);
        assert!(split(&file[..file.len() - 1]).is_err());
        assert!(split(&file[..3]).is_err());
    }
}
