use super::*;

fn limits(max_edges: usize) -> TrafficLimits {
    TrafficLimits {
        window: Duration::from_secs(300),
        max_edges,
        max_edges_per_report: 100,
    }
}

fn edge(reporter: &str, source: &str, destination: &str, opened: u64) -> pb::TrafficEdge {
    pb::TrafficEdge {
        reporter: reporter.into(),
        source_workload: source.into(),
        destination_workload: destination.into(),
        source_principal: format!("spiffe://cluster.local/ns/{source}"),
        security: "mutual_tls".into(),
        connections_opened: opened,
        connections_closed: opened,
        bytes_received: opened.saturating_mul(10),
        bytes_sent: opened.saturating_mul(100),
        ..pb::TrafficEdge::default()
    }
}

fn report(edges: Vec<pb::TrafficEdge>) -> pb::TrafficReport {
    pb::TrafficReport {
        interval_seconds: 10,
        edges,
        ..pb::TrafficReport::default()
    }
}

/// Records `report` from `node`, whose proxy serves every workload the
/// report names at its own end.
fn record(traffic: &ReportedTraffic, node: &str, report: &pb::TrafficReport, at: SystemTime) {
    let local = report
        .edges
        .iter()
        .map(|e| {
            if e.reporter == "destination" {
                e.destination_workload.clone()
            } else {
                e.source_workload.clone()
            }
        })
        .collect();
    traffic.record(node, &local, report, at);
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
}

#[test]
fn a_connection_both_ends_report_is_counted_once_from_the_destination() {
    let traffic = ReportedTraffic::new(limits(100), &mut Registry::default());
    record(
        &traffic,
        "node-1",
        &report(vec![edge("source", "shop/web", "shop/db", 3)]),
        at(0),
    );
    record(
        &traffic,
        "node-2",
        &report(vec![edge("destination", "shop/web", "shop/db", 3)]),
        at(1),
    );
    // Only the source reports a connection to a pod outside the mesh.
    let mut outside = edge("source", "shop/web", "", 2);
    outside.security = "none".into();
    record(&traffic, "node-1", &report(vec![outside]), at(12));
    record(
        &traffic,
        "node-2",
        &report(vec![edge("destination", "shop/web", "shop/db", 1)]),
        at(15),
    );

    let summary = traffic.summary(at(20));
    assert_eq!(summary.edges.len(), 2, "{:#?}", summary.edges);
    let db = summary
        .edges
        .iter()
        .find(|e| e.destination == "shop/db")
        .unwrap();
    assert_eq!(db.reported_by, "destination");
    assert_eq!((db.opened, db.bytes_received, db.bytes_sent), (4, 40, 400));
    let outside = summary
        .edges
        .iter()
        .find(|e| e.destination == "unknown")
        .unwrap();
    assert_eq!(
        (outside.reported_by.as_str(), outside.opened),
        ("source", 2)
    );
}

#[test]
fn refusals_are_counted_by_policy_and_name_the_source_by_identity_if_no_pod() {
    let traffic = ReportedTraffic::new(limits(100), &mut Registry::default());
    let mut denied = edge("destination", "", "shop/db", 0);
    denied.source_principal = "spiffe://cluster.local/ns/evil/sa/default".into();
    denied.denied = vec![pb::PolicyCount {
        policy: "shop/deny-evil".into(),
        connections: 2,
    }];
    record(&traffic, "node-2", &report(vec![denied.clone()]), at(0));
    record(&traffic, "node-2", &report(vec![denied]), at(1));
    let summary = traffic.summary(at(2));
    assert_eq!(
        summary.edges[0].source,
        "spiffe://cluster.local/ns/evil/sa/default"
    );
    assert_eq!(summary.edges[0].denied["shop/deny-evil"], 4);
}

#[test]
fn the_window_forgets_old_reports() {
    let traffic = ReportedTraffic::new(limits(100), &mut Registry::default());
    record(
        &traffic,
        "node-1",
        &report(vec![edge("destination", "a/x", "a/y", 1)]),
        at(0),
    );
    record(
        &traffic,
        "node-1",
        &report(vec![edge("destination", "a/x", "a/z", 1)]),
        at(200),
    );
    let summary = traffic.summary(at(320));
    let destinations: Vec<&str> = summary
        .edges
        .iter()
        .map(|e| e.destination.as_str())
        .collect();
    assert_eq!(destinations, ["a/z"]);
    assert!(traffic.summary(at(600)).edges.is_empty());
}

#[test]
fn edges_past_the_bound_are_left_out_and_hostile_ones_refused() {
    let traffic = ReportedTraffic::new(limits(2), &mut Registry::default());
    let mut hostile = vec![
        edge("destination", &"x".repeat(MAX_NAME_BYTES + 1), "a/y", 1),
        edge("sideways", "a/x", "a/y", 1),
        edge("destination", "a/x", "a/y", u64::MAX),
    ];
    hostile[2].security = "quantum".into();
    let mut huge = edge("destination", "a/x", "a/y", u64::MAX);
    huge.denied = vec![pb::PolicyCount {
        policy: "a/p".into(),
        connections: u64::MAX,
    }];
    hostile.push(huge.clone());
    hostile.push(huge);
    for n in 0..5 {
        hostile.push(edge("destination", &format!("a/client-{n}"), "a/y", 1));
    }
    let mut report = report(hostile);
    report.events_left_out = 7;
    record(&traffic, "node-1", &report, at(0));
    let summary = traffic.summary(at(1));
    assert_eq!(summary.edges.len(), 2);
    let huge = summary.edges.iter().find(|e| e.source == "a/x").unwrap();
    assert_eq!((huge.opened, huge.denied["a/p"]), (u64::MAX, u64::MAX));
    // 7 the proxy left out, 4 more pairs at 1 connection each here.
    assert_eq!(summary.left_out, 11);
}

#[test]
fn a_report_beyond_its_edge_bound_is_read_only_that_far() {
    let traffic = ReportedTraffic::new(
        TrafficLimits {
            max_edges_per_report: 3,
            ..limits(100)
        },
        &mut Registry::default(),
    );
    let edges = (0..10)
        .map(|n| edge("destination", &format!("a/client-{n}"), "a/y", 1))
        .collect();
    record(&traffic, "node-1", &report(edges), at(0));
    assert_eq!(traffic.summary(at(1)).edges.len(), 3);
}

#[test]
fn a_proxy_reports_only_for_its_own_pods() {
    let traffic = ReportedTraffic::new(limits(100), &mut Registry::default());
    let local: HashSet<String> = ["shop/db".to_owned(), "shop/web".to_owned()].into();
    traffic.record(
        "node-2",
        &local,
        &report(vec![
            edge("destination", "shop/web", "shop/db", 1),
            // Another node's pod, as destination and as source.
            edge("destination", "shop/web", "bank/vault", 5),
            edge("source", "bank/teller", "shop/db", 7),
            edge("source", "shop/web", "bank/vault", 2),
        ]),
        at(0),
    );
    let summary = traffic.summary(at(1));
    let pairs: Vec<(&str, &str, u64)> = summary
        .edges
        .iter()
        .map(|e| (e.source.as_str(), e.destination.as_str(), e.opened))
        .collect();
    assert_eq!(
        pairs,
        [("shop/web", "bank/vault", 2), ("shop/web", "shop/db", 1)]
    );
    assert_eq!(traffic.not_local.get(), 2);
    assert_eq!(traffic.refused.get(), 0);
}
