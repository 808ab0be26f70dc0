//! What the run prints and writes: the table, the JSON and the chart.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::report::{self, Report};
use crate::{Config, chart, title_short};

pub fn output(config: &Config, report: &Report) -> Result<()> {
    let table = report::render(report);
    let panels: Vec<(&str, &[report::PathLatency])> = [
        report.request_response.as_ref(),
        report.connection_per_request.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|s| (title_short(&s.title), s.paths.as_slice()))
    .collect();
    if !panels.is_empty() {
        std::fs::write(&config.chart, chart::svg(&panels))
            .with_context(|| format!("writing {}", config.chart.display()))?;
    }
    table_and_json(config.json.as_deref(), &table, report)?;
    if !panels.is_empty() {
        eprintln!("chart: {}", config.chart.display());
    }
    Ok(())
}

/// Prints `table` and writes `report` as JSON to `json` (`-`: the JSON on
/// stdout and the table on stderr; none: the table alone).
#[allow(clippy::print_stdout)] // the table and the JSON are this program's output
pub fn table_and_json(json: Option<&str>, table: &str, report: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    match json {
        Some("-") => {
            eprint!("{table}");
            println!("{text}");
        }
        Some(file) => {
            std::fs::write(file, text + "\n").with_context(|| format!("writing {file}"))?;
            print!("{table}");
            println!("JSON: {file}");
        }
        None => print!("{table}"),
    }
    Ok(())
}
