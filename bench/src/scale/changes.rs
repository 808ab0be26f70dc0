//! The change phases of the control-plane scenario: single pod IP changes
//! one at a time, one label-only change, and a churn of many changes per
//! second. Each writes the manifests, then reads from the nodes' records
//! when each node heard of it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cluster::Cluster;
use super::report::{self, ChangeFigures, ChurnFigures, LabelChange, percentile};
use super::{Scenario, ms};

impl Scenario<'_> {
    /// Moves one pod at a time to a new IP and waits until every node has it.
    pub(super) async fn single_changes(&mut self, pods: &[u32]) -> Result<ChangeFigures> {
        self.bar.set_length(pods.len() as u64);
        self.bar.set_position(0);
        let mut each = Vec::new();
        let mut delta_bytes = Vec::new();
        for (index, &pod) in pods.iter().enumerate() {
            let uid = self.cluster.uid(pod);
            self.bar
                .set_message(format!("change {} of {}: {uid}", index + 1, pods.len()));
            let slot = self.slot(&uid)?;
            let cpu_before = self.cp.cpu_seconds()?;
            let ip = self.cluster.move_pod(pod);
            // Taken before the write: the control plane may act on the file
            // before this task runs again (seen once: 408 nodes had the
            // change "before" a timestamp taken after the write).
            let written = Instant::now();
            self.cluster.write_pod(pod)?;
            self.wait_for_nodes(&format!("had {uid} at {ip}"), false, |r| {
                r.seen[slot].is_some_and(|seen| seen.ip == Some(ip))
            })
            .await?;
            tokio::time::sleep(self.settle).await;
            let cpu_seconds = self.cp.cpu_seconds()? - cpu_before;
            let since: Vec<f64> = self.each_node(|r| {
                r.seen[slot].map_or(0.0, |seen| {
                    ms(seen.since.saturating_duration_since(written))
                })
            });
            let window = self.arrivals_since(written);
            delta_bytes.extend(window.iter().filter(|(n, _)| *n > 0).map(|(_, b)| *b));
            each.push(report::Change {
                pod: uid,
                ip: ip.to_string(),
                first_node_ms: percentile(&since, 0.0),
                last_node_ms: percentile(&since, 100.0),
                cpu_seconds,
                nodes_reached: self
                    .each_node(|r| r.seen[slot].is_some_and(|seen| seen.ip == Some(ip)))
                    .into_iter()
                    .filter(|reached| *reached)
                    .count() as u32,
                nodes_updated: window.iter().filter(|(n, _)| *n > 0).count() as u32,
                updates: window.iter().map(|(n, _)| *n as u32).sum(),
            });
            self.bar.inc(1);
        }
        let latencies: Vec<f64> = each.iter().map(|c| c.last_node_ms).collect();
        let cpu: Vec<f64> = each.iter().map(|c| c.cpu_seconds).collect();
        let updated: Vec<u32> = each.iter().map(|c| c.nodes_updated).collect();
        Ok(ChangeFigures {
            count: each.len(),
            latency_p50_ms: percentile(&latencies, 50.0),
            latency_p99_ms: percentile(&latencies, 99.0),
            latency_max_ms: percentile(&latencies, 100.0),
            cpu_seconds_p50: percentile(&cpu, 50.0),
            cpu_seconds_mean: cpu.iter().sum::<f64>() / cpu.len().max(1) as f64,
            nodes_updated_min: percentile(&updated, 0.0),
            nodes_updated_max: percentile(&updated, 100.0),
            delta_bytes_p50: percentile(&delta_bytes, 50.0),
            each,
        })
    }

    /// Changes one label of `pod`: only its own node needs to hear of it.
    /// Waits until that node has, then a quiet period for any other.
    pub(super) async fn label_change(
        &mut self,
        pod: u32,
        changes: &ChangeFigures,
    ) -> Result<Option<LabelChange>> {
        let uid = self.cluster.uid(pod);
        let slot = self.slot(&uid)?;
        let node = self.cluster.node_of(pod);
        self.bar.set_message(format!("label-only change of {uid}"));
        let cpu_before = self.cp.cpu_seconds()?;
        self.cluster.relabel_pod(pod);
        let written = Instant::now(); // before the write, as above
        self.cluster.write_pod(pod)?;
        let deadline = written + self.deadline;
        let own_node_at = loop {
            if let Some(seen) = self.streams.record(node).seen[slot]
                && seen.last > written
            {
                break seen.last;
            }
            self.cp
                .check_running()
                .with_context(|| format!("waiting until node-{node} heard of {uid}'s label"))?;
            if Instant::now() > deadline {
                bail!(
                    "node-{node} never heard of the label change of its pod {uid} within {:?}",
                    self.deadline
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Long enough for a delta the other nodes should not get to arrive.
        let quiet = (self.settle * 2)
            .max(Duration::from_secs_f64(
                changes.latency_max_ms * 3.0 / 1000.0,
            ))
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::time::sleep_until((own_node_at + quiet).into()).await;
        let window = self.arrivals_since(written);
        Ok(Some(LabelChange {
            pod: uid,
            node: Cluster::node_name(node),
            own_node_ms: ms(own_node_at - written),
            nodes_updated: window.iter().filter(|(n, _)| *n > 0).count() as u32,
            quiet_ms: ms(quiet),
            cpu_seconds: self.cp.cpu_seconds()? - cpu_before,
        }))
    }

    /// Moves pods at `--churn-rate` per second, then waits until every node
    /// holds the final IP of every pod moved.
    pub(super) async fn churn(&mut self, pods: &[u32]) -> Result<Option<ChurnFigures>> {
        if pods.is_empty() {
            return Ok(None);
        }
        let interval = Duration::from_secs_f64(1.0 / self.args.churn_rate);
        self.bar.set_length(pods.len() as u64);
        self.bar.set_position(0);
        self.bar.set_message(format!(
            "churn: {} changes at {}/s",
            pods.len(),
            self.args.churn_rate
        ));
        let cpu_before = self.cp.cpu_seconds()?;
        let mut last_ip: HashMap<usize, Ipv4Addr> = HashMap::new();
        let first = Instant::now();
        let mut last = first;
        for (index, &pod) in pods.iter().enumerate() {
            tokio::time::sleep_until((first + interval * index as u32).into()).await;
            let slot = self.slot(&self.cluster.uid(pod))?;
            last_ip.insert(slot, self.cluster.move_pod(pod));
            last = Instant::now(); // before the write, as above
            self.cluster.write_pod(pod)?;
            self.bar.inc(1);
            if index % 64 == 0 {
                self.cp.check_running().context("during the churn")?;
            }
        }
        self.bar
            .set_message("churn: waiting until every node is consistent");
        let finals: Vec<(usize, Ipv4Addr)> = last_ip.into_iter().collect();
        let consistent_at = self
            .wait_for_nodes(
                &format!("held the final IPs of all {} churned pods", finals.len()),
                false,
                |r| {
                    finals
                        .iter()
                        .all(|&(slot, ip)| r.seen[slot].is_some_and(|seen| seen.ip == Some(ip)))
                },
            )
            .await?;
        let cpu_seconds = self.cp.cpu_seconds()? - cpu_before;
        let lag = self
            .each_node(|r| {
                finals
                    .iter()
                    .filter_map(|&(slot, _)| r.seen[slot])
                    .map(|seen| ms(seen.since.saturating_duration_since(last)))
                    .fold(0.0, f64::max)
            })
            .into_iter()
            .fold(0.0, f64::max);
        let window = self.arrivals_since(first);
        let updates: Vec<u64> = window.iter().map(|(n, _)| *n).collect();
        let bytes: Vec<u64> = window.iter().map(|(_, b)| *b).collect();
        Ok(Some(ChurnFigures {
            rate: self.args.churn_rate,
            seconds: self.args.churn_seconds,
            changes: pods.len() as u32,
            pods_changed: finals.len() as u32,
            // The first change is written at once: the rate is of the rest.
            achieved_rate: (pods.len() - 1) as f64 / (last - first).as_secs_f64().max(1e-3),
            lag_ms: lag,
            consistent_after_first_ms: ms(consistent_at - first),
            updates_per_node_p50: percentile(&updates, 50.0),
            updates_per_node_max: percentile(&updates, 100.0),
            bytes_per_node_p50: percentile(&bytes, 50.0),
            cpu_seconds,
        }))
    }
}
