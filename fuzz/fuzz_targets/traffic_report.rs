//! Arbitrary bytes as a proxy's traffic report (`weft.v1.ProxyMessage`),
//! as the control plane's dashboard takes them from a config stream: the
//! first byte picks the bounds. Nothing may panic, a summary never holds
//! more pairs than the bound, a node that runs none of the workloads adds
//! nothing, and the node registry keeps what it says it keeps.
#![no_main]

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_api::v1::ProxyMessage;
use weft_api::v1::proxy_message::Kind;
use weft_control_plane::registry::NodeRegistry;
use weft_control_plane::reported_traffic::{ReportedTraffic, TrafficLimits};

fuzz_target!(|data: &[u8]| {
    let Some((&bounds, rest)) = data.split_first() else {
        return;
    };
    let Ok(ProxyMessage {
        kind: Some(Kind::Traffic(report)),
    }) = ProxyMessage::decode(rest)
    else {
        return;
    };
    let mut metrics = prometheus_client::registry::Registry::default();
    let limits = TrafficLimits {
        window: Duration::from_secs(30 + u64::from(bounds & 0x0f) * 60),
        max_edges: usize::from(bounds >> 4),
        max_edges_per_report: usize::from(bounds & 0x0f),
    };
    let traffic = ReportedTraffic::new(limits, &mut metrics);
    let now = SystemTime::now();
    // node-1 runs every workload the report names; node-2 none of them,
    // so nothing it says is kept.
    let named: HashSet<String> = report
        .edges
        .iter()
        .flat_map(|e| [e.source_workload.clone(), e.destination_workload.clone()])
        .collect();
    traffic.record("node-1", &named, &report, now);
    let before = traffic.summary(now).edges.len();
    let later = now + Duration::from_secs(u64::from(bounds));
    traffic.record("node-2", &HashSet::new(), &report, later);
    assert!(traffic.summary(now).edges.len() <= before);
    let summary = traffic.summary(now + Duration::from_secs(u64::from(bounds)));
    assert!(summary.edges.len() <= limits.max_edges);

    let registry = NodeRegistry::new(&mut metrics);
    registry.reported("node-1", &report.certificates);
    let held = registry.snapshot();
    assert!(held.get("node-1").is_some_and(|n| n.certificates.len() <= report.certificates.len()));
});
