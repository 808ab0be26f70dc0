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
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};
use weft_api::v1::SignRequest;
use weft_api::v1::certificates_client::CertificatesClient;
use weft_certs::{CertificateRequest, Identity, TrustBundle, WorkloadCertificate};

use crate::backoff::Backoff;
use crate::control_plane::ViewReceiver;
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
        }
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
            let renewal = keep_certified(
                identity.clone(),
                *generation,
                self.transport.clone(),
                self.view.clone(),
                reports.clone(),
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
}

/// Obtains and renews the certificate of one identity until aborted.
async fn keep_certified(
    identity: Identity,
    generation: u64,
    transport: SharedTransport,
    view: ViewReceiver,
    reports: mpsc::Sender<(Identity, u64, Report)>,
) {
    let report = |report| reports.send((identity.clone(), generation, report));
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    let mut expires: Option<SystemTime> = None;
    loop {
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
                tokio::time::sleep(delay).await;
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
    let channel = transport.connect(known_roots.as_ref()).await?;
    let token = transport.token().await?;
    let response = CertificatesClient::with_interceptor(channel, token)
        .sign(SignRequest {
            identity: identity.to_string(),
            csr_der: request.csr_der().to_vec(),
        })
        .await
        .map_err(|status| Error::Sign {
            identity: identity.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        })?
        .into_inner();

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
