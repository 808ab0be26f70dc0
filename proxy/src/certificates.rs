//! A valid certificate for every identity of the node's meshed pods, so the
//! data plane always has one to present.
//!
//! For each identity in [`NodeView::meshed_local_identities`] one renewal
//! task runs: it generates a key and CSR on the node (the key never leaves
//! it), has the control plane sign it (`Certificates.Sign`), checks the
//! result and publishes it; at the certificate's `renew_at` it does it all
//! again, the old certificate serving until the new one replaces it or it
//! expires. Failures are retried with backoff. When the last meshed pod of
//! an identity leaves the node, its task stops and its certificate is
//! dropped. Several pods with one identity share one certificate.
//!
//! The tasks report to one loop, the only writer of the published map, so a
//! task stopped a moment ago cannot put back a certificate that was dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};
use weft_api::v1::SignRequest;
use weft_api::v1::certificates_client::CertificatesClient;
use weft_certs::{CertificateRequest, Identity, TrustBundle, WorkloadCertificate};

use crate::backoff::Backoff;
use crate::control_plane::ViewReceiver;
use crate::node_state::NodeState;
use crate::transport::SharedTransport;
use crate::wall_clock::{rfc3339, sleep_until};
use crate::{Error, error_chain};

/// The first delay before retrying a failed signing, doubled after each
/// failure.
const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// The longest delay between signing attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The certificates the node holds, by identity.
pub type CertificateMap = Arc<BTreeMap<Identity, WorkloadCertificate>>;

/// Keeps the node's workload certificates. Create it, take
/// [`subscribe`](NodeCertificates::subscribe), then
/// [`run`](NodeCertificates::run) it for the life of the proxy.
pub struct NodeCertificates {
    transport: SharedTransport,
    view: ViewReceiver,
    published: watch::Sender<CertificateMap>,
    /// Where certificates are kept on the node, if anywhere.
    state: Option<NodeState>,
}

/// What a renewal task reports.
enum Report {
    Issued(WorkloadCertificate),
    Expired,
}

/// A renewal task; stopping it is dropping it.
struct RenewalTask {
    /// Tells this task's reports from those of an earlier task for the same
    /// identity.
    generation: u64,
    handle: tokio::task::AbortHandle,
}

impl Drop for RenewalTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl NodeCertificates {
    /// Certificates for the meshed local identities of `view`, signed
    /// through `transport`.
    pub fn new(transport: SharedTransport, view: ViewReceiver) -> NodeCertificates {
        let (published, _) = watch::channel(CertificateMap::default());
        NodeCertificates {
            transport,
            view,
            published,
            state: None,
        }
    }

    /// Keeps every certificate (with its key) in `state` from now on, and
    /// starts from those stored there that the current view still wants
    /// and that verify against its roots: a restarted proxy serves its
    /// pods at once, also while the control plane is unreachable. Each is
    /// renewed at its own renewal time. Returns how many were restored.
    pub fn keep_in(&mut self, state: NodeState) -> usize {
        let restored = match self.view.borrow().as_ref() {
            Some(view) => state.load_certificates(
                &view.meshed_local_identities(),
                &view.trust().bundle,
                SystemTime::now(),
            ),
            None => Vec::new(),
        };
        for certificate in &restored {
            info!(
                identity = %certificate.identity(),
                not_after = %rfc3339(certificate.not_after()),
                "restored a certificate from the node"
            );
        }
        let count = restored.len();
        self.published.send_replace(Arc::new(
            restored
                .into_iter()
                .map(|certificate| (certificate.identity().clone(), certificate))
                .collect(),
        ));
        self.state = Some(state);
        count
    }

    /// The current certificates, updated on every issue, renewal and drop.
    pub fn subscribe(&self) -> watch::Receiver<CertificateMap> {
        self.published.subscribe()
    }

    /// Follows the view until its sender is gone, running one renewal task
    /// per wanted identity.
    pub async fn run(mut self) {
        let (reports, mut incoming) = mpsc::channel::<(Identity, u64, Report)>(64);
        let mut tasks: HashMap<Identity, RenewalTask> = HashMap::new();
        let mut generation: u64 = 0;
        self.reconcile(&mut tasks, &mut generation, &reports);
        loop {
            tokio::select! {
                changed = self.view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.reconcile(&mut tasks, &mut generation, &reports);
                }
                Some((identity, from, report)) = incoming.recv() => {
                    let current = tasks.get(&identity).is_some_and(|t| t.generation == from);
                    if current {
                        self.publish(identity, report);
                    }
                }
            }
        }
    }

    /// Starts tasks for identities that gained a meshed pod, stops those
    /// whose last meshed pod left, and drops their certificates.
    fn reconcile(
        &mut self,
        tasks: &mut HashMap<Identity, RenewalTask>,
        generation: &mut u64,
        reports: &mpsc::Sender<(Identity, u64, Report)>,
    ) {
        let wanted: BTreeSet<Identity> = self
            .view
            .borrow_and_update()
            .as_ref()
            .map(|view| view.meshed_local_identities())
            .unwrap_or_default();
        tasks.retain(|identity, _| {
            let keep = wanted.contains(identity);
            if !keep {
                info!(%identity, "no meshed pod on this node has this identity any more; dropping its certificate");
                self.forget(identity);
            }
            keep
        });
        self.published.send_if_modified(|map| {
            if map.keys().all(|identity| wanted.contains(identity)) {
                return false;
            }
            Arc::make_mut(map).retain(|identity, _| wanted.contains(identity));
            true
        });
        for identity in wanted {
            if tasks.contains_key(&identity) {
                continue;
            }
            *generation += 1;
            let held = self.published.borrow().get(&identity).cloned();
            let renewal = keep_certified(
                identity.clone(),
                *generation,
                self.transport.clone(),
                self.view.clone(),
                reports.clone(),
                held,
            )
            .instrument(info_span!("certificate", identity = %identity));
            let handle = tokio::spawn(renewal).abort_handle();
            tasks.insert(
                identity,
                RenewalTask {
                    generation: *generation,
                    handle,
                },
            );
        }
    }

    fn publish(&self, identity: Identity, report: Report) {
        match &report {
            Report::Issued(cert) => self.keep(cert),
            Report::Expired => self.forget(&identity),
        }
        self.published.send_modify(|map| {
            let map = Arc::make_mut(map);
            match report {
                Report::Issued(cert) => {
                    map.insert(identity, cert);
                }
                Report::Expired => {
                    map.remove(&identity);
                }
            }
        });
    }

    /// Stores a new certificate on the node (a few hundred bytes, written
    /// and synced from this task: not worth a thread). A failure costs only
    /// the restart.
    fn keep(&self, certificate: &WorkloadCertificate) {
        if let Some(state) = &self.state
            && let Err(error) = state.store_certificate(certificate)
        {
            warn!(%error, identity = %certificate.identity(), "storing the certificate on the node failed");
        }
    }

    /// Removes a certificate the node no longer needs from its storage.
    fn forget(&self, identity: &Identity) {
        if let Some(state) = &self.state
            && let Err(error) = state.remove_certificate(identity)
        {
            warn!(%error, %identity, "removing the stored certificate failed");
        }
    }
}

/// Obtains and renews the certificate of one identity until aborted.
async fn keep_certified(
    identity: Identity,
    generation: u64,
    transport: SharedTransport,
    view: ViewReceiver,
    reports: mpsc::Sender<(Identity, u64, Report)>,
    held: Option<WorkloadCertificate>,
) {
    let report = |report| reports.send((identity.clone(), generation, report));
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    let mut expires: Option<SystemTime> = None;
    let mut view = view;
    if let Some(held) = held {
        // Restored from the node: it serves until its own renewal time.
        expires = Some(held.not_after());
        sleep_until(held.renew_at()).await;
    }
    loop {
        let attempted = tokio::time::Instant::now();
        // What the attempt was made with: a change from this wakes the wait
        // after a failure, even one that came while the attempt ran.
        let pods = pods_of(&identity, &mut view);
        match sign(&transport, &view, &identity).await {
            Ok(cert) => {
                backoff.reset();
                info!(
                    not_after = %rfc3339(cert.not_after()),
                    renew_at = %rfc3339(cert.renew_at()),
                    "obtained a certificate"
                );
                let renew_at = cert.renew_at();
                expires = Some(cert.not_after());
                if report(Report::Issued(cert)).await.is_err() {
                    return;
                }
                sleep_until(renew_at).await;
            }
            Err(error) => {
                let mut delay = backoff.next_delay();
                if let Some(not_after) = expires {
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    delay = delay.min(left);
                }
                warn!(
                    reason = %error_chain(&error),
                    retry_in_ms = delay.as_millis() as u64,
                    current_expires = %expires.map_or_else(|| "none".to_owned(), rfc3339),
                    "could not obtain a certificate"
                );
                wait_for_retry(&identity, &pods, attempted, delay, &mut view).await;
                if expires.is_some_and(|not_after| SystemTime::now() >= not_after) {
                    warn!("the certificate expired before it could be renewed; dropping it");
                    expires = None;
                    if report(Report::Expired).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Waits `delay` after a failed attempt, or less when the node's pods of
/// `identity` change meanwhile: the CA refuses an identity until the
/// node's pod of it has an IP, and the config that brings the IP is the
/// moment to ask again, not the end of a backoff grown to a minute. Other
/// config changes do not wake it (a busy cluster changes its config all
/// the time, and every proxy would ask the CA again with each change), and
/// it never asks sooner than [`RETRY_INITIAL`] after the attempt.
async fn wait_for_retry(
    identity: &Identity,
    before: &[(String, Vec<IpAddr>)],
    attempted: tokio::time::Instant,
    delay: Duration,
    view: &mut ViewReceiver,
) {
    let retry = tokio::time::Instant::now() + delay;
    let pods_changed = async {
        if pods_of(identity, view) != before {
            return;
        }
        while view.changed().await.is_ok() {
            if pods_of(identity, view) != before {
                return;
            }
        }
        // The view's sender is gone: only the delay is left.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = tokio::time::sleep_until(retry) => return,
        () = pods_changed => {}
    }
    tokio::time::sleep_until((attempted + RETRY_INITIAL).min(retry)).await;
    debug!("this identity's pods on the node changed; asking for the certificate again");
}

/// The node's meshed pods with `identity` and their IPs, as the current
/// view has them.
fn pods_of(identity: &Identity, view: &mut ViewReceiver) -> Vec<(String, Vec<IpAddr>)> {
    view.borrow_and_update()
        .as_ref()
        .map(|view| {
            view.local_workloads()
                .values()
                .filter(|w| w.meshed() && w.identity() == identity)
                .map(|w| (w.uid.to_string(), w.ips.to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// One signing round trip: key and CSR here, signature there, checks here.
async fn sign(
    transport: &SharedTransport,
    view: &ViewReceiver,
    identity: &Identity,
) -> Result<WorkloadCertificate, Error> {
    let request = CertificateRequest::generate(identity).map_err(|source| Error::PrepareCsr {
        identity: identity.clone(),
        source,
    })?;
    let known_roots = view
        .borrow()
        .as_ref()
        .map(|view| view.trust().bundle.clone());
    let channel = transport.signing_channel(known_roots.as_ref()).await?;
    let token = transport.token().await?;
    let signed = CertificatesClient::with_interceptor(channel, token)
        .sign(SignRequest {
            identity: identity.to_string(),
            csr_der: request.csr_der().to_vec(),
        })
        .await;
    let response = match signed {
        Ok(response) => response.into_inner(),
        Err(status) => {
            // A refusal leaves the connection as good as it was. A failure
            // of the connection itself (tonic gives its cause) may not, and
            // a replica that says "try later" (it cannot reach the API
            // server) may say it for long: the next call dials again, and
            // may reach another replica.
            if std::error::Error::source(&status).is_some()
                || status.code() == tonic::Code::Unavailable
            {
                transport.forget_signing_channel().await;
            }
            return Err(Error::Sign {
                identity: identity.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            });
        }
    };

    let unusable = |reason: String| Error::SignResponse {
        identity: identity.clone(),
        reason,
    };
    let trust = response
        .trust
        .ok_or_else(|| unusable("it carries no trust bundle".into()))?;
    if trust.trust_domain != identity.trust_domain() {
        return Err(unusable(format!(
            "its trust bundle is for trust domain {:?}",
            trust.trust_domain
        )));
    }
    let roots = TrustBundle::from_pem(&trust.roots_pem)
        .map_err(|e| unusable(format!("its trust bundle: {e}")))?;
    let chain = response
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    request
        .complete(chain, roots, SystemTime::now())
        .map_err(|source| Error::CompleteCertificate {
            identity: identity.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use std::sync::Arc;

    use tokio::time::Instant;
    use weft_api::v1;
    use weft_certs::MeshCa;

    use super::*;
    use crate::node_view::NodeView;

    /// A view of node-1 with the pod `shop/init-1` (identity `shop/init`)
    /// at `ips`, and a Service whose port is `port`.
    fn view(version: u64, ips: &[&str], port: u32) -> Option<Arc<NodeView>> {
        let roots = MeshCa::generate_root("cluster.local", SystemTime::now())
            .unwrap()
            .trust_bundle()
            .to_pem();
        let update = v1::ConfigUpdate {
            version,
            full_state: true,
            local_workloads: vec![v1::Workload {
                uid: "shop/init-1".into(),
                namespace: "shop".into(),
                name: "init-1".into(),
                service_account: "init".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/init".into(),
                node: "node-1".into(),
                ips: ips.iter().map(|ip| (*ip).to_owned()).collect(),
                meshed: true,
                ..v1::Workload::default()
            }],
            services: vec![v1::Service {
                namespace: "shop".into(),
                name: "db".into(),
                vips: vec!["10.96.0.10".into()],
                ports: vec![v1::ServicePort {
                    name: "sql".into(),
                    port,
                    target_port: port,
                }],
                ..v1::Service::default()
            }],
            trust: Some(v1::TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_pem: roots,
            }),
            ..v1::ConfigUpdate::default()
        };
        Some(Arc::new(
            NodeView::apply(None, &update, "node-1").unwrap().view,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_signing_is_retried_when_the_identitys_pod_gets_its_ip() {
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/init".parse().unwrap();
        let (config, mut receiver) = watch::channel(view(1, &[], 5432));
        let before = pods_of(&identity, &mut receiver);
        let start = Instant::now();
        let waiting = tokio::spawn(async move {
            let backoff = Duration::from_secs(60);
            wait_for_retry(&identity, &before, start, backoff, &mut receiver).await;
            Instant::now()
        });

        // Other changes leave the backoff alone.
        tokio::time::sleep(Duration::from_secs(5)).await;
        config.send_replace(view(2, &[], 5433));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished(), "woken by an unrelated change");

        // The pod gets its IP: the next attempt is now, not in 50 s.
        config.send_replace(view(3, &["10.244.1.40"], 5433));
        let woken = waiting.await.unwrap();
        assert_eq!(woken - start, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_never_come_sooner_than_the_first_backoff_step() {
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/init".parse().unwrap();
        // The IP arrived while the attempt ran: no wait for the change, but
        // not a tight loop either.
        let (_config, mut receiver) = watch::channel(view(2, &["10.244.1.40"], 5432));
        let start = Instant::now();
        let before = vec![("shop/init-1".to_owned(), Vec::new())];
        wait_for_retry(
            &identity,
            &before,
            start,
            Duration::from_secs(60),
            &mut receiver,
        )
        .await;
        assert_eq!(Instant::now() - start, RETRY_INITIAL);
    }
}
