//! Who talked to whom since the last traffic report: connections, bytes
//! and refusals per pair of workloads, as this proxy saw them. The data
//! plane writes to it ([`crate::dataplane`]'s telemetry and gate); the
//! control-plane client takes a report out of it every report interval and
//! sends it up the config stream, where the control plane's dashboard
//! draws the mesh's traffic from every node's reports.
//!
//! Bounded: at most `max_edges` pairs are held between two reports; events
//! of a pair beyond that are counted, not kept, and the report says how
//! many. Prometheus metrics are unaffected (they have their own families).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use weft_api::v1 as pb;
use weft_certs::{Identity, WorkloadCertificate};

/// One pair of ends, as a report names it.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct EdgeKey {
    /// "source" or "destination": which end this proxy serves.
    pub reporter: &'static str,
    /// `<namespace>/<workload name>`, empty when not a known pod.
    pub source_workload: String,
    /// The same for the destination.
    pub destination_workload: String,
    /// The source's identity, empty for plaintext.
    pub source_principal: String,
    /// The Service asked for, `<namespace>/<name>`, if any.
    pub destination_service: String,
    /// "mutual_tls", "node_local" or "none".
    pub security: &'static str,
}

#[derive(Debug, Default)]
struct EdgeCounts {
    opened: u64,
    closed: u64,
    received: u64,
    sent: u64,
    denied: BTreeMap<String, u64>,
    audited: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Held {
    edges: HashMap<EdgeKey, EdgeCounts>,
    left_out: u64,
    since: Instant,
}

/// The counts since the last report. Cheap to share: the data plane holds
/// it in an `Arc`.
#[derive(Debug)]
pub struct TrafficLedger {
    max_edges: usize,
    held: Mutex<Held>,
}

impl TrafficLedger {
    /// A ledger holding at most `max_edges` pairs between two reports.
    pub fn new(max_edges: usize) -> TrafficLedger {
        TrafficLedger {
            max_edges,
            held: Mutex::new(Held {
                edges: HashMap::new(),
                left_out: 0,
                since: Instant::now(),
            }),
        }
    }

    fn count(&self, key: &EdgeKey, add: impl FnOnce(&mut EdgeCounts)) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counts) = held.edges.get_mut(key) {
            add(counts);
        } else if held.edges.len() < self.max_edges {
            add(held.edges.entry(key.clone()).or_default());
        } else {
            held.left_out += 1;
        }
    }

    /// A connection between `key`'s ends opened.
    pub fn opened(&self, key: &EdgeKey) {
        self.count(key, |c| c.opened += 1);
    }

    /// A connection between `key`'s ends closed, having carried `received`
    /// bytes from the client and `sent` to it.
    pub fn closed(&self, key: &EdgeKey, received: u64, sent: u64) {
        self.count(key, |c| {
            c.closed += 1;
            c.received += received;
            c.sent += sent;
        });
    }

    /// `policy` refused a connection between `key`'s ends.
    pub fn denied(&self, key: &EdgeKey, policy: &str) {
        self.count(key, |c| {
            *c.denied.entry(policy.to_owned()).or_default() += 1
        });
    }

    /// The AUDIT policy `policy` matched a connection between `key`'s ends.
    pub fn audited(&self, key: &EdgeKey, policy: &str) {
        self.count(key, |c| {
            *c.audited.entry(policy.to_owned()).or_default() += 1
        });
    }

    /// Everything counted since the last report, as a report (without
    /// certificates), and a fresh start.
    pub fn take_report(&self) -> pb::TrafficReport {
        let (edges, left_out, since) = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let edges = std::mem::take(&mut held.edges);
            let left_out = std::mem::take(&mut held.left_out);
            let since = std::mem::replace(&mut held.since, Instant::now());
            (edges, left_out, since)
        };
        let counted = |policies: BTreeMap<String, u64>| {
            policies
                .into_iter()
                .map(|(policy, connections)| pb::PolicyCount {
                    policy,
                    connections,
                })
                .collect()
        };
        pb::TrafficReport {
            interval_seconds: u32::try_from(since.elapsed().as_secs()).unwrap_or(u32::MAX),
            edges: edges
                .into_iter()
                .map(|(key, counts)| pb::TrafficEdge {
                    reporter: key.reporter.to_owned(),
                    source_workload: key.source_workload,
                    destination_workload: key.destination_workload,
                    source_principal: key.source_principal,
                    destination_service: key.destination_service,
                    security: key.security.to_owned(),
                    connections_opened: counts.opened,
                    connections_closed: counts.closed,
                    bytes_received: counts.received,
                    bytes_sent: counts.sent,
                    denied: counted(counts.denied),
                    audited: counted(counts.audited),
                })
                .collect(),
            events_left_out: left_out,
            certificates: Vec::new(),
        }
    }
}

/// The certificates the node holds, by identity, as the certificate keeper
/// publishes them.
pub type HeldCertificates = watch::Receiver<Arc<BTreeMap<Identity, WorkloadCertificate>>>;

/// What the control-plane client reports up each config stream it opens.
#[derive(Debug)]
pub struct TrafficReporting {
    /// Where the data plane counts.
    pub ledger: Arc<TrafficLedger>,
    /// How often a report is sent.
    pub interval: Duration,
    /// The certificates the node holds now; a change is reported without
    /// waiting for the interval (`check` right after an install vouches for
    /// them only once the control plane has heard).
    pub certificates: HeldCertificates,
    /// How long after a certificate change the report goes: the changes of
    /// a node starting its pods (one certificate each) go in one report.
    pub certificates_settle: Duration,
}

/// Sends a report on `outgoing` at once (the control plane learns the
/// node's certificates as the stream opens), then every interval that
/// has something new and whenever the held certificates change, until the
/// stream is gone.
pub async fn send_reports(
    reporting: Arc<TrafficReporting>,
    outgoing: mpsc::Sender<pb::ProxyMessage>,
) {
    let mut certificates_watch = reporting.certificates.clone();
    let mut watching = true;
    let mut last_certificates = None;
    loop {
        let mut report = reporting.ledger.take_report();
        let certificates = held_certificates(&certificates_watch.borrow_and_update());
        let quiet = report.edges.is_empty() && report.events_left_out == 0;
        if !quiet || last_certificates.as_ref() != Some(&certificates) {
            report.certificates = certificates.clone();
            last_certificates = Some(certificates);
            let message = pb::ProxyMessage {
                kind: Some(pb::proxy_message::Kind::Traffic(report)),
            };
            if outgoing.send(message).await.is_err() {
                return;
            }
        }
        let tick = tokio::time::sleep(reporting.interval);
        tokio::pin!(tick);
        tokio::select! {
            () = &mut tick => {}
            changed = certificates_watch.changed(), if watching => {
                // A keeper that is gone changes nothing more: ticks only.
                watching = changed.is_ok();
                if watching {
                    tokio::select! {
                        () = &mut tick => {}
                        () = tokio::time::sleep(reporting.certificates_settle) => {}
                    }
                }
            }
        }
    }
}

/// The held certificates as a report names them: identity and expiry.
fn held_certificates(held: &BTreeMap<Identity, WorkloadCertificate>) -> Vec<pb::HeldCertificate> {
    held.iter()
        .map(|(identity, certificate)| pb::HeldCertificate {
            identity: identity.to_string(),
            not_after: certificate
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, destination: &str) -> EdgeKey {
        EdgeKey {
            reporter: "destination",
            source_workload: source.into(),
            destination_workload: destination.into(),
            source_principal: format!("spiffe://cluster.local/ns/{source}"),
            destination_service: String::new(),
            security: "mutual_tls",
        }
    }

    #[test]
    fn a_report_sums_each_pair_and_starts_the_next_one_empty() {
        let ledger = TrafficLedger::new(10);
        let web_db = key("shop/web", "shop/db");
        ledger.opened(&web_db);
        ledger.opened(&web_db);
        ledger.closed(&web_db, 100, 2000);
        ledger.denied(&key("shop/evil", "shop/db"), "shop/deny-evil");
        ledger.denied(&key("shop/evil", "shop/db"), "shop/deny-evil");
        ledger.audited(&web_db, "shop/audit-all");

        let mut report = ledger.take_report();
        report
            .edges
            .sort_by(|a, b| a.source_workload.cmp(&b.source_workload));
        assert_eq!(report.edges.len(), 2);
        let evil = &report.edges[0];
        assert_eq!(evil.source_workload, "shop/evil");
        assert_eq!(evil.connections_opened, 0);
        assert_eq!(
            evil.denied,
            [pb::PolicyCount {
                policy: "shop/deny-evil".into(),
                connections: 2
            }]
        );
        let web = &report.edges[1];
        assert_eq!((web.connections_opened, web.connections_closed), (2, 1));
        assert_eq!((web.bytes_received, web.bytes_sent), (100, 2000));
        assert_eq!(web.audited[0].connections, 1);
        assert_eq!(report.events_left_out, 0);

        assert!(ledger.take_report().edges.is_empty());
    }

    #[test]
    fn pairs_beyond_the_bound_are_counted_not_kept() {
        let ledger = TrafficLedger::new(2);
        for n in 0..5 {
            ledger.opened(&key(&format!("ns/client-{n}"), "ns/server"));
        }
        // A pair already held still counts.
        ledger.closed(&key("ns/client-0", "ns/server"), 1, 1);
        let report = ledger.take_report();
        assert_eq!(report.edges.len(), 2);
        assert_eq!(report.events_left_out, 3);
        let closed: u64 = report.edges.iter().map(|e| e.connections_closed).sum();
        assert_eq!(closed, 1);
    }

    fn certificate(identity: &str) -> (Identity, WorkloadCertificate) {
        let now = std::time::SystemTime::now();
        let ca = weft_certs::MeshCa::generate_root("cluster.local", now).unwrap();
        let identity: Identity = identity.parse().unwrap();
        let request = weft_certs::CertificateRequest::generate(&identity).unwrap();
        let chain = ca.sign_csr(request.csr_der(), &identity, now).unwrap();
        let certificate = request
            .complete(chain, ca.trust_bundle().clone(), now)
            .unwrap();
        (identity, certificate)
    }

    fn held(report: &pb::ProxyMessage) -> Vec<String> {
        match &report.kind {
            Some(pb::proxy_message::Kind::Traffic(traffic)) => traffic
                .certificates
                .iter()
                .map(|c| c.identity.clone())
                .collect(),
            other => panic!("not a traffic report: {other:?}"),
        }
    }

    /// The interval is an hour: only a certificate change can send the
    /// second and third reports; the paused clock makes "an hour" exact.
    #[tokio::test(start_paused = true)]
    async fn a_certificate_change_is_reported_without_waiting_for_the_interval() {
        let (keeper, certificates) = watch::channel(Arc::new(BTreeMap::new()));
        let reporting = Arc::new(TrafficReporting {
            ledger: Arc::new(TrafficLedger::new(10)),
            interval: Duration::from_secs(3600),
            certificates,
            certificates_settle: Duration::from_millis(500),
        });
        let (outgoing, mut reports) = mpsc::channel(8);
        let sender = tokio::spawn(send_reports(reporting, outgoing));
        let opened = Instant::now();
        assert!(held(&reports.recv().await.unwrap()).is_empty());

        // Two pods start together: one report names both.
        let web = certificate("spiffe://cluster.local/ns/shop/sa/web");
        let db = certificate("spiffe://cluster.local/ns/shop/sa/db");
        keeper.send_modify(|map| {
            Arc::make_mut(map).insert(web.0.clone(), web.1.clone());
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        keeper.send_modify(|map| {
            Arc::make_mut(map).insert(db.0.clone(), db.1.clone());
        });
        let both = held(&reports.recv().await.unwrap());
        assert_eq!(
            both,
            [
                "spiffe://cluster.local/ns/shop/sa/db",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        assert!(opened.elapsed() < Duration::from_secs(1));

        // A pod goes: its certificate is no longer reported.
        keeper.send_modify(|map| {
            Arc::make_mut(map).remove(&db.0);
        });
        assert_eq!(
            held(&reports.recv().await.unwrap()),
            ["spiffe://cluster.local/ns/shop/sa/web"]
        );
        assert!(opened.elapsed() < Duration::from_secs(2));

        // The keeper gone, reports go on at the interval (no busy loop).
        drop(keeper);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(reports.try_recv().is_err());
        sender.abort();
    }
}
