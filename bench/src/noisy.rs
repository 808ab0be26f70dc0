//! The noisy-neighbour scenario: what one pod's bulk transfer through its
//! node's proxy costs another pod of that node. The client's open-loop
//! request/response latency over the mesh is measured alone, then again
//! while the `noisy` pod (same node, meshed) uploads to the server as fast
//! as it can; the two are reported side by side, with the neighbour's
//! throughput.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use weft_testbed::Target;

use crate::report::{self, PathLatency};
use crate::{Bench, load};

/// What the scenario found.
#[derive(Debug, Serialize)]
pub struct NoisyScenario {
    /// What ran.
    pub title: String,
    /// The client's latency alone.
    pub quiet: PathLatency,
    /// The same while the neighbour transfers.
    pub noisy: PathLatency,
    /// The neighbour's upload rate meanwhile, MiB/s.
    pub neighbour_mib_s: f64,
}

impl Bench {
    /// Runs the scenario on the mesh path.
    pub(crate) fn noisy_neighbour(&self) -> Result<NoisyScenario> {
        let c = &self.config;
        let path = self
            .paths
            .iter()
            .find(|path| path.name == "mesh")
            .context("the noisy-neighbour scenario runs on the mesh path: add it to --paths")?;
        let duration = Duration::from_secs_f64(c.duration);
        let victim = |to| load::request_response(to, c.rate, c.connections, duration, c.payload);

        self.bar.set_message("noisy neighbour · quiet");
        let quiet = self.in_client(path, victim)?;
        self.bar.inc(1);

        self.bar.set_message("noisy neighbour · noisy");
        let to = path.to;
        // The neighbour starts first and ends last: the whole measurement
        // runs beside its transfer.
        let ramp = Duration::from_millis(300);
        let (noisy, rate) = std::thread::scope(|scope| {
            let neighbour = scope.spawn(|| {
                self.testbed
                    .run_in(Target::Pod("noisy"), || {
                        load::upload(to, duration + 2 * ramp)
                    })?
                    .context("the noisy neighbour's upload")
            });
            std::thread::sleep(ramp);
            let measured = self.in_client(path, victim);
            let rate = neighbour
                .join()
                .map_err(|_| anyhow::anyhow!("the neighbour's thread panicked"))?;
            anyhow::Ok((measured?, rate?))
        })?;
        self.bar.inc(1);

        let summary = |name, m: &load::Measured| {
            report::summarize(name, &m.latency, &m.send_lag, m.errors, None)
        };
        Ok(NoisyScenario {
            title: format!(
                "noisy neighbour: request/response {} B, {} req/s over {} connections, {} s, \
                 alone and beside a same-node pod's bulk upload",
                c.payload, c.rate, c.connections, c.duration
            ),
            quiet: summary("alone", &quiet),
            noisy: summary("beside bulk", &noisy),
            neighbour_mib_s: rate / crate::MIB,
        })
    }
}

/// The scenario's lines of the printed table.
pub fn table(out: &mut String, noisy: &NoisyScenario) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "\n{}", noisy.title);
    let _ = writeln!(
        out,
        "  {:<12} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "client", "requests", "errors", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs"
    );
    for row in [&noisy.quiet, &noisy.noisy] {
        let _ = writeln!(
            out,
            "  {:<12} {:>8} {:>7} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            row.path, row.requests, row.errors, row.p50_us, row.p90_us, row.p99_us, row.p999_us
        );
    }
    let _ = writeln!(
        out,
        "  the neighbour uploaded {:.0} MiB/s meanwhile",
        noisy.neighbour_mib_s
    );
}
