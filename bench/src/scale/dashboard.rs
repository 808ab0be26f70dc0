//! The dashboard's phase of the control-plane scenario: what the proxies'
//! traffic reports cost the control plane, and how fast its dashboard
//! answers, at the scenario's size. Every node sends one report of
//! `--report-edges` edges, spread over `--report-interval-seconds` as real
//! proxies' reports are (each on its own clock); the control plane's CPU over that
//! interval, less its CPU over as long a quiet interval before, is what
//! the reports cost. Then each of the dashboard's JSON pages is fetched.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_api::v1 as pb;

use super::Scenario;

/// What the dashboard costs.
#[derive(Debug, Serialize)]
pub struct DashboardFigures {
    /// The interval the reports were spread over, in seconds (the proxies'
    /// default report interval).
    pub interval_seconds: f64,
    /// Reports sent, one per node, and edges in each.
    pub reports: u32,
    /// Edges per report.
    pub edges_per_report: u32,
    /// Edges the control plane held afterwards (at most
    /// `--dashboard-traffic-max-edges`).
    pub edges_kept: u64,
    /// Control-plane CPU seconds over a quiet interval, and over the
    /// interval with the reports.
    pub cpu_quiet_seconds: f64,
    #[allow(missing_docs)]
    pub cpu_reporting_seconds: f64,
    /// What the reports cost: the difference, as a share of one CPU.
    pub cpu_share_of_one_core: f64,
    /// Each page fetched after the reports: path, milliseconds, bytes.
    pub pages: Vec<Page>,
}

/// One page of the dashboard.
#[derive(Debug, Serialize)]
pub struct Page {
    /// Its path.
    pub path: &'static str,
    /// How long the answer took, in milliseconds.
    pub ms: f64,
    /// Its size.
    pub bytes: usize,
}

const PAGES: &[&str] = &[
    "/api/overview",
    "/api/nodes",
    "/api/traffic",
    "/api/workloads",
    "/api/policies",
    "/",
];

impl Scenario<'_> {
    /// Measures the reports' cost and the pages (see the module's doc).
    pub(super) async fn dashboard(&mut self) -> Result<DashboardFigures> {
        let nodes = self.args.nodes;
        let edges = self.args.report_edges;
        let interval = Duration::try_from_secs_f64(self.args.report_interval_seconds)
            .context("--report-interval-seconds is not a number of seconds")?;
        self.bar.set_message("dashboard: a quiet interval");
        let before = self.cp.cpu_seconds()?;
        tokio::time::sleep(interval).await;
        let quiet = self.cp.cpu_seconds()? - before;

        self.bar.set_message(format!(
            "dashboard: {nodes} traffic reports of {edges} edges"
        ));
        let started = Instant::now();
        let before = self.cp.cpu_seconds()?;
        for node in 1..=nodes {
            let due = started + interval.mul_f64(f64::from(node - 1) / f64::from(nodes));
            tokio::time::sleep_until(due.into()).await;
            let Some(sender) = self.streams.record(node).sender.clone() else {
                bail!("node-{node} has no open stream to report on");
            };
            let local: Vec<String> = self
                .cluster
                .pods_on(node)
                .map(|pod| self.cluster.workload(pod))
                .collect();
            sender.report(report(node, edges, &local)).await?;
        }
        tokio::time::sleep_until((started + interval).into()).await;
        let reporting = self.cp.cpu_seconds()? - before;

        self.bar.set_message("dashboard: fetching the pages");
        let mut pages = Vec::new();
        for &path in PAGES {
            let started = Instant::now();
            let bytes = get(self.cp.monitoring, path).await?;
            pages.push(Page {
                path,
                ms: started.elapsed().as_secs_f64() * 1e3,
                bytes,
            });
        }
        // The reports were kept, not refused (each names its own node's
        // workloads): the pages above measured a full window.
        let traffic: serde_json::Value =
            serde_json::from_str(&get_body(self.cp.monitoring, "/api/traffic?limit=1").await?)
                .context("/api/traffic is not JSON")?;
        let kept = traffic["total"].as_u64().unwrap_or(0);
        if nodes > 0 && edges > 0 && kept == 0 {
            bail!("the control plane kept none of the {nodes} reports' edges");
        }
        Ok(DashboardFigures {
            edges_kept: kept,
            interval_seconds: interval.as_secs_f64(),
            reports: nodes,
            edges_per_report: edges,
            cpu_quiet_seconds: quiet,
            cpu_reporting_seconds: reporting,
            cpu_share_of_one_core: (reporting - quiet).max(0.0) / interval.as_secs_f64(),
            pages,
        })
    }
}

/// Node `node`'s report: `edges` pairs from clients to its own pods'
/// workloads (`local`; a proxy speaks only for its own pods), the clients
/// distinct from every other node's (the worst case for the bound).
fn report(node: u32, edges: u32, local: &[String]) -> pb::TrafficReport {
    pb::TrafficReport {
        interval_seconds: 10,
        edges: (0..edges)
            .map(|n| pb::TrafficEdge {
                reporter: "destination".into(),
                source_workload: format!("team-{:04}/node-{node}-client-{n:02}", node % 500),
                destination_workload: local
                    .get(n as usize % local.len().max(1))
                    .cloned()
                    .unwrap_or_default(),
                source_principal: format!(
                    "spiffe://cluster.local/ns/team-{:04}/sa/node-{node}-client-{n:02}",
                    node % 500
                ),
                destination_service: String::new(),
                security: "mutual_tls".into(),
                connections_opened: 10,
                connections_closed: 10,
                bytes_received: 10_000,
                bytes_sent: 100_000,
                denied: Vec::new(),
                audited: Vec::new(),
            })
            .collect(),
        events_left_out: 0,
        certificates: vec![pb::HeldCertificate {
            identity: format!(
                "spiffe://cluster.local/ns/team-{:04}/sa/default",
                node % 500
            ),
            not_after: 4_000_000_000,
        }],
    }
}

/// GETs `path` from `address` over HTTP/1.1: the body's size.
async fn get(address: std::net::SocketAddr, path: &str) -> Result<usize> {
    Ok(get_body(address, path).await?.len())
}

/// The body of `path`'s answer.
async fn get_body(address: std::net::SocketAddr, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: control-plane\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {path}: no complete answer");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}
