//! The control plane's own TLS certificate for its gRPC port: issued by the
//! mesh CA to the control plane's SPIFFE identity (so proxies verify it the
//! same way they verify workloads), and renewed at half-life like theirs.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};
use weft_certs::{CertificateRequest, Identity, MeshCa, WorkloadCertificate};

use crate::Error;

/// The current serving certificate, swapped in place on renewal.
#[derive(Debug)]
pub struct ServingCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCertificate {
    /// Issues the first certificate for `identity` and keeps it renewed
    /// in a background task.
    pub fn start(ca: Arc<MeshCa>, identity: Identity) -> Result<Arc<ServingCertificate>, Error> {
        let cert = issue(&ca, &identity)?;
        let serving = Arc::new(ServingCertificate {
            current: RwLock::new(weft_certs::certified_key(&cert)?),
        });
        tokio::spawn(renew_forever(serving.clone(), ca, identity, cert));
        Ok(serving)
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn issue(ca: &MeshCa, identity: &Identity) -> Result<WorkloadCertificate, Error> {
    let now = SystemTime::now();
    let request = CertificateRequest::generate(identity)?;
    let chain = ca.sign_csr(request.csr_der(), identity, now)?;
    Ok(request.complete(chain, ca.trust_bundle().clone(), now)?)
}

async fn renew_forever(
    serving: Arc<ServingCertificate>,
    ca: Arc<MeshCa>,
    identity: Identity,
    mut cert: WorkloadCertificate,
) {
    loop {
        let wait = cert
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match issue(&ca, &identity).and_then(|next| {
            let key = weft_certs::certified_key(&next)?;
            Ok((next, key))
        }) {
            Ok((next, key)) => {
                *serving
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = key;
                cert = next;
                info!(%identity, "renewed the control plane's serving certificate");
            }
            Err(error) => {
                warn!(%identity, %error, "renewing the serving certificate failed; retrying");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}
