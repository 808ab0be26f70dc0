//! The noisy-neighbour scenario: what one pod's bulk transfer through its
//! node's proxy costs another pod of that node. The client's open-loop
//! request/response latency over the mesh is measured alone, then again
//! while the `noisy` pod (same node, meshed) uploads to the server as fast
//! as it can; the two are reported side by side, with the neighbour's
//! throughput. The same on the direct path (unmeshed pods, no proxy)
//! shows what the neighbour costs on this machine anyway: its client and
//! the server share the cores with everything else.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use weft_testbed::Target;

use crate::report::{self, PathLatency};
use crate::{Bench, load};

/// What the scenario found, per path.
#[derive(Debug, Serialize)]
pub struct NoisyScenario {
    /// What ran.
    pub title: String,
    /// `direct` and `mesh`, as far as they ran.
    pub paths: Vec<NoisyPath>,
}

/// One path's figures.
#[derive(Debug, Serialize)]
pub struct NoisyPath {
    /// `direct` or `mesh`.
    pub path: String,
    /// The client's latency alone.
    pub quiet: PathLatency,
    /// The same while the neighbour transfers.
    pub noisy: PathLatency,
    /// The neighbour's upload rate meanwhile, MiB/s.
    pub neighbour_mib_s: f64,
    /// Mesh path: connection tasks the proxies moved to their bulk lane
    /// and back during the run (`weft_proxy_lane_moves_total`, summed over
    /// the path's proxies).
    pub lane_moves: Option<LaneMoves>,
}

/// Moves between a proxy's lanes.
#[derive(Debug, Default, Serialize)]
pub struct LaneMoves {
    /// To the bulk lane (busy).
    pub to_bulk: u64,
    /// Back to the data-plane thread (quiet).
    pub home: u64,
}

impl Bench {
    /// Runs the scenario on the direct and mesh paths.
    pub(crate) fn noisy_neighbour(&self) -> Result<NoisyScenario> {
        let c = &self.config;
        let mut paths = Vec::new();
        for path in &self.paths {
            let neighbour = match path.name {
                "direct" => "plain-noisy",
                "mesh" => "noisy",
                _ => continue,
            };
            paths.push(self.noisy_path(path, neighbour)?);
        }
        Ok(NoisyScenario {
            title: format!(
                "noisy neighbour: request/response {} B, {} req/s over {} connections, {} s, \
                 alone and beside a same-node pod's bulk upload",
                c.payload, c.rate, c.connections, c.duration
            ),
            paths,
        })
    }

    fn noisy_path(&self, path: &crate::BenchPath, neighbour: &'static str) -> Result<NoisyPath> {
        let c = &self.config;
        let duration = Duration::from_secs_f64(c.duration);
        let victim = |to| load::request_response(to, c.rate, c.connections, duration, c.payload);

        let meshed = path.name == "mesh";
        let before = if meshed {
            self.lane_moves()?
        } else {
            LaneMoves::default()
        };
        self.bar
            .set_message(format!("noisy neighbour · {} · quiet", path.name));
        let quiet = self.in_client(path, victim)?;
        self.bar.inc(1);

        self.bar
            .set_message(format!("noisy neighbour · {} · noisy", path.name));
        let to = path.to;
        // The neighbour starts first and ends last: the whole measurement
        // runs beside its transfer.
        let ramp = Duration::from_millis(300);
        let (noisy, rate) = std::thread::scope(|scope| {
            let transfer = scope.spawn(|| {
                self.testbed
                    .run_in(Target::Pod(neighbour), || {
                        load::upload(to, duration + 2 * ramp)
                    })?
                    .context("the noisy neighbour's upload")
            });
            std::thread::sleep(ramp);
            let measured = self.in_client(path, victim);
            let rate = transfer
                .join()
                .map_err(|_| anyhow::anyhow!("the neighbour's thread panicked"))?;
            anyhow::Ok((measured?, rate?))
        })?;
        self.bar.inc(1);

        let summary = |name, m: &load::Measured| {
            report::summarize(name, &m.latency, &m.send_lag, m.errors, None)
        };
        let lane_moves = if meshed {
            let after = self.lane_moves()?;
            Some(LaneMoves {
                to_bulk: after.to_bulk.saturating_sub(before.to_bulk),
                home: after.home.saturating_sub(before.home),
            })
        } else {
            None
        };
        Ok(NoisyPath {
            path: path.name.to_owned(),
            quiet: summary("alone", &quiet),
            noisy: summary("beside bulk", &noisy),
            neighbour_mib_s: rate / crate::MIB,
            lane_moves,
        })
    }

    /// The lane moves of the mesh path's proxies so far.
    fn lane_moves(&self) -> Result<LaneMoves> {
        let mesh = self
            .mesh
            .lock()
            .map_err(|_| anyhow::anyhow!("the mesh's lock is poisoned"))?;
        let mut moves = LaneMoves::default();
        for (node, _) in &self.proxies {
            let sum = |to: &str| {
                let needle = format!(r#"weft_proxy_lane_moves_total{{to="{to}"}}"#);
                weft_testbed::metric_sum(&mesh, &self.testbed, node, &needle)
                    .with_context(|| format!("reading {node}'s proxy metrics"))
            };
            moves.to_bulk += sum("bulk")?;
            moves.home += sum("home")?;
        }
        Ok(moves)
    }
}

/// The scenario's lines of the printed table.
pub fn table(out: &mut String, noisy: &NoisyScenario) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "\n{}", noisy.title);
    let _ = writeln!(
        out,
        "  {:<7} {:<12} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>16}",
        "path",
        "client",
        "requests",
        "errors",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "neighbour MiB/s"
    );
    for path in &noisy.paths {
        for (row, rate) in [
            (&path.quiet, None),
            (&path.noisy, Some(path.neighbour_mib_s)),
        ] {
            let rate = rate.map(|r| format!("{r:.0}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<7} {:<12} {:>8} {:>7} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>16}",
                path.path,
                row.path,
                row.requests,
                row.errors,
                row.p50_us,
                row.p90_us,
                row.p99_us,
                row.p999_us,
                rate
            );
        }
        if let Some(moves) = &path.lane_moves {
            let _ = writeln!(
                out,
                "  {:<7} connection tasks moved to the proxies' bulk lane: {}, back: {}",
                path.path, moves.to_bulk, moves.home
            );
        }
    }
}
