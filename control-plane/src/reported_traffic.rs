//! Who talked to whom over the last minutes, from the traffic reports the
//! node proxies send up their config streams (`weft.v1.TrafficReport`):
//! what the dashboard's traffic graph and table show.
//!
//! Reports are summed into time buckets; a bucket older than the window is
//! dropped whole. Bounded: at most `max_edges` pairs are held over all
//! buckets (more are counted as left out), a report's strings are checked
//! for length and kind before anything of it is kept, and at most
//! `max_edges_per_report` edges of one report are read. A proxy reports
//! each connection from the end it serves; a connection between two meshed
//! pods is seen by both, and the summary counts it once, from the
//! destination's report when there is one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tracing::{debug, warn};
use weft_api::v1 as pb;

/// The bounds of what is kept (see the control plane's config).
#[derive(Clone, Copy, Debug)]
pub struct TrafficLimits {
    /// How far back the summary reaches.
    pub window: Duration,
    /// Pairs held over the whole window.
    pub max_edges: usize,
    /// Edges read from one report.
    pub max_edges_per_report: usize,
}

/// The longest workload, principal, Service or policy name a report may
/// carry (a SPIFFE URI or `<namespace>/<name>` is far shorter).
const MAX_NAME_BYTES: usize = 512;
/// Buckets per window: the window moves in steps of a thirtieth.
const BUCKETS_PER_WINDOW: u32 = 30;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct EdgeKey {
    /// Whether the destination's proxy reported it (else the source's).
    by_destination: bool,
    source: String,
    destination: String,
    source_principal: String,
    service: String,
    security: &'static str,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Counts {
    opened: u64,
    closed: u64,
    bytes_received: u64,
    bytes_sent: u64,
    denied: BTreeMap<String, u64>,
    audited: BTreeMap<String, u64>,
}

impl Counts {
    /// Adds `other`; a proxy's numbers may be anything, so the sums
    /// saturate.
    fn add(&mut self, other: &Counts) {
        self.opened = self.opened.saturating_add(other.opened);
        self.closed = self.closed.saturating_add(other.closed);
        self.bytes_received = self.bytes_received.saturating_add(other.bytes_received);
        self.bytes_sent = self.bytes_sent.saturating_add(other.bytes_sent);
        for (held, more) in [
            (&mut self.denied, &other.denied),
            (&mut self.audited, &other.audited),
        ] {
            for (policy, n) in more {
                let sum = held.entry(policy.clone()).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Buckets {
    /// (bucket number, its edges), oldest first.
    buckets: VecDeque<(u64, HashMap<EdgeKey, Counts>)>,
    held: usize,
}

/// The traffic of the last window, as the proxies reported it.
#[derive(Debug)]
pub struct ReportedTraffic {
    limits: TrafficLimits,
    buckets: Mutex<Buckets>,
    left_out: Counter,
    refused: Counter,
    not_local: Counter,
}

/// One pair of ends over the window, counted once.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Edge {
    /// `<namespace>/<workload>` of the client, or its identity when it is
    /// not a known pod, or "unknown".
    pub source: String,
    /// `<namespace>/<workload>` of the server, or "unknown".
    pub destination: String,
    /// The client's SPIFFE identity, empty for plaintext.
    pub source_principal: String,
    /// The Service the client asked for, if any.
    pub service: String,
    /// "mutual_tls", "node_local" or "none".
    pub security: String,
    /// "destination" or "source": whose proxy's counts these are.
    pub reported_by: String,
    /// Connections opened and closed.
    pub opened: u64,
    #[allow(missing_docs)]
    pub closed: u64,
    /// Bytes from client to server, and back.
    pub bytes_received: u64,
    #[allow(missing_docs)]
    pub bytes_sent: u64,
    /// Connections refused, by the deciding policy.
    pub denied: BTreeMap<String, u64>,
    /// AUDIT matches, by policy.
    pub audited: BTreeMap<String, u64>,
}

/// What the dashboard's traffic page shows.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficSummary {
    /// The window, in seconds.
    pub window_seconds: u64,
    /// Every pair seen in it.
    pub edges: Vec<Edge>,
    /// Connection events the proxies or this control plane left out to
    /// stay in their bounds, since the start.
    pub left_out: u64,
}

impl ReportedTraffic {
    /// An empty record within `limits`; its counters are registered in
    /// `metrics`.
    pub fn new(limits: TrafficLimits, metrics: &mut Registry) -> ReportedTraffic {
        let traffic = ReportedTraffic {
            limits,
            buckets: Mutex::default(),
            left_out: Counter::default(),
            refused: Counter::default(),
            not_local: Counter::default(),
        };
        metrics.register(
            "weft_control_plane_traffic_events_left_out",
            "Connection events of traffic reports not kept: over a proxy's or this control plane's bound",
            traffic.left_out.clone(),
        );
        metrics.register(
            "weft_control_plane_traffic_edges_refused",
            "Edges of traffic reports refused as malformed (unknown kind, name too long) or over the bound of a report",
            traffic.refused.clone(),
        );
        metrics.register(
            "weft_control_plane_traffic_edges_not_local",
            "Edges of traffic reports not kept because their reporting end has no pod on the reporting node (a pod that just left, or a proxy speaking for others)",
            traffic.not_local.clone(),
        );
        traffic
    }

    fn bucket_of(&self, at: SystemTime) -> u64 {
        let step = (self.limits.window / BUCKETS_PER_WINDOW).as_secs().max(1);
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / step)
    }

    /// Adds `report`, from `node`'s proxy, at `at`. `local` are the
    /// workloads (`<namespace>/<name>`) with a pod on `node`: a proxy
    /// speaks only for its own pods, so an edge whose reporting end is not
    /// one of them is not kept (a node cannot put words in another node's
    /// proxy; it can still name any peer at the far end, as the peer's
    /// own proxy would). A report that arrives just after its pod left is
    /// dropped by the same rule, and counted apart.
    pub fn record(
        &self,
        node: &str,
        local: &HashSet<String>,
        report: &pb::TrafficReport,
        at: SystemTime,
    ) {
        self.left_out.inc_by(report.events_left_out);
        let bucket = self.bucket_of(at);
        let (mut refused, mut not_local) = (0u64, 0u64);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut buckets, bucket);
        if buckets.buckets.back().is_none_or(|(n, _)| *n != bucket) {
            buckets.buckets.push_back((bucket, HashMap::new()));
        }
        let read = report.edges.len().min(self.limits.max_edges_per_report);
        let over = report.edges.len() - read;
        for edge in &report.edges[..read] {
            let Some((key, counts)) = checked(edge) else {
                refused += 1;
                continue;
            };
            let reporting_end = if key.by_destination {
                &key.destination
            } else {
                &key.source
            };
            if !local.contains(reporting_end) {
                not_local += 1;
                continue;
            }
            let Buckets { buckets, held } = &mut *buckets;
            let Some((_, edges)) = buckets.back_mut() else {
                continue;
            };
            match edges.get_mut(&key) {
                Some(held_counts) => held_counts.add(&counts),
                None if *held < self.limits.max_edges => {
                    edges.insert(key, counts);
                    *held += 1;
                }
                None => {
                    self.left_out.inc_by(counts.opened.max(1));
                }
            }
        }
        drop(buckets);
        if not_local > 0 {
            self.not_local.inc_by(not_local);
            debug!(
                node,
                edges = not_local,
                "traffic report edges whose reporting end has no pod on the node were not kept"
            );
        }
        if refused > 0 || over > 0 {
            self.refused.inc_by(refused + over as u64);
            warn!(
                node,
                malformed = refused,
                over_the_bound = over,
                "a traffic report had edges that were not kept"
            );
        }
    }

    fn expire(&self, buckets: &mut Buckets, now: u64) {
        let oldest = now.saturating_sub(u64::from(BUCKETS_PER_WINDOW) - 1);
        while let Some((n, edges)) = buckets.buckets.front() {
            if *n >= oldest {
                break;
            }
            buckets.held -= edges.len();
            buckets.buckets.pop_front();
        }
    }

    /// How far back the window reaches, in seconds.
    pub fn window_seconds(&self) -> u64 {
        self.limits.window.as_secs()
    }

    /// The window ending at `now`, each connection counted once.
    pub fn summary(&self, now: SystemTime) -> TrafficSummary {
        let mut merged: BTreeMap<EdgeKey, Counts> = BTreeMap::new();
        {
            let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
            self.expire(&mut buckets, self.bucket_of(now));
            for (_, edges) in &buckets.buckets {
                for (key, counts) in edges {
                    merged.entry(key.clone()).or_default().add(counts);
                }
            }
        }
        // A pair the destination reported is counted from its report only.
        let seen_by_destination: std::collections::BTreeSet<_> = merged
            .keys()
            .filter(|k| k.by_destination)
            .map(|k| (k.source.clone(), k.destination.clone(), k.security))
            .collect();
        let edges = merged
            .into_iter()
            .filter(|(key, _)| {
                key.by_destination
                    || !seen_by_destination.contains(&(
                        key.source.clone(),
                        key.destination.clone(),
                        key.security,
                    ))
            })
            .map(|(key, counts)| Edge {
                source: key.source,
                destination: key.destination,
                source_principal: key.source_principal,
                service: key.service,
                security: key.security.to_owned(),
                reported_by: if key.by_destination {
                    "destination"
                } else {
                    "source"
                }
                .to_owned(),
                opened: counts.opened,
                closed: counts.closed,
                bytes_received: counts.bytes_received,
                bytes_sent: counts.bytes_sent,
                denied: counts.denied,
                audited: counts.audited,
            })
            .collect();
        TrafficSummary {
            window_seconds: self.window_seconds(),
            edges,
            left_out: self.left_out.get(),
        }
    }
}

/// `edge` as kept, or `None` if it is malformed.
fn checked(edge: &pb::TrafficEdge) -> Option<(EdgeKey, Counts)> {
    let by_destination = match edge.reporter.as_str() {
        "destination" => true,
        "source" => false,
        _ => return None,
    };
    let security = match edge.security.as_str() {
        "mutual_tls" => "mutual_tls",
        "node_local" => "node_local",
        "none" => "none",
        _ => return None,
    };
    let short = |name: &str| name.len() <= MAX_NAME_BYTES;
    let policies_short =
        |counts: &[pb::PolicyCount]| counts.len() <= 64 && counts.iter().all(|c| short(&c.policy));
    if ![
        &edge.source_workload,
        &edge.destination_workload,
        &edge.source_principal,
        &edge.destination_service,
    ]
    .into_iter()
    .all(|name| short(name))
        || !policies_short(&edge.denied)
        || !policies_short(&edge.audited)
    {
        return None;
    }
    let named = |workload: &str, principal: &str| match (workload, principal) {
        ("", "") => "unknown".to_owned(),
        ("", principal) => principal.to_owned(),
        (workload, _) => workload.to_owned(),
    };
    let policies = |counts: &[pb::PolicyCount]| {
        let mut by_policy = BTreeMap::new();
        for count in counts {
            let sum: &mut u64 = by_policy.entry(count.policy.clone()).or_default();
            *sum = sum.saturating_add(count.connections);
        }
        by_policy
    };
    Some((
        EdgeKey {
            by_destination,
            source: named(&edge.source_workload, &edge.source_principal),
            destination: named(&edge.destination_workload, ""),
            source_principal: edge.source_principal.clone(),
            service: edge.destination_service.clone(),
            security,
        },
        Counts {
            opened: edge.connections_opened,
            closed: edge.connections_closed,
            bytes_received: edge.bytes_received,
            bytes_sent: edge.bytes_sent,
            denied: policies(&edge.denied),
            audited: policies(&edge.audited),
        },
    ))
}

#[cfg(test)]
#[path = "reported_traffic_tests.rs"]
mod tests;
