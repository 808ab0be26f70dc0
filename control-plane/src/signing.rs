//! The `Certificates` service: signs a workload CSR for a node proxy, but
//! only for an identity that has a meshed pod with an IP (Pending with its
//! init containers, or Running) on that proxy's node.
//! This is the check that keeps a compromised node from minting identities
//! of workloads it does not host.
//!
//! A proxy asks as soon as its CNI plugin announces a pod, which is often
//! before the kubelet has reported the pod's IP to the API server: such a
//! request waits (briefly, and only so many at once) for the pod to show
//! up rather than being refused and retried after a backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_api::v1 as pb;
use weft_certs::{Identity, MeshCa};

use crate::fanout::Published;
use crate::mesh::Mesh;
use crate::node_auth::NodeAuthenticator;
use crate::registry::NodeRegistry;

/// The signing service.
pub struct SigningService {
    ca: Arc<MeshCa>,
    mesh: watch::Receiver<Arc<Published>>,
    auth: Arc<NodeAuthenticator>,
    registry: Arc<NodeRegistry>,
    /// How long a request waits for its pod to show up.
    pod_wait: Duration,
    /// Permits to wait so.
    waiting: Arc<Semaphore>,
}

impl SigningService {
    /// A service signing with `ca` for the pods `mesh` places on each node.
    pub fn new(
        ca: Arc<MeshCa>,
        mesh: watch::Receiver<Arc<Published>>,
        auth: Arc<NodeAuthenticator>,
        registry: Arc<NodeRegistry>,
    ) -> SigningService {
        SigningService {
            ca,
            mesh,
            auth,
            registry,
            pod_wait: Duration::ZERO,
            waiting: Arc::new(Semaphore::new(0)),
        }
    }

    /// Lets up to `at_once` requests for pods not seen yet wait up to
    /// `wait` for them (none wait by default).
    pub fn waiting_for_pods(mut self, wait: Duration, at_once: usize) -> SigningService {
        self.pod_wait = wait;
        self.waiting = Arc::new(Semaphore::new(at_once.min(Semaphore::MAX_PERMITS)));
        self
    }

    /// Whether `node` runs a meshed pod of `identity` with an IP, waiting
    /// for it (see the module's doc) if it does not yet; the mesh then.
    async fn pod_on_node(&self, node: &str, identity: &Identity) -> (bool, Arc<Mesh>) {
        let mesh = self.mesh.borrow().mesh.clone();
        let runs = mesh.node_runs(node, identity);
        if runs || self.pod_wait.is_zero() {
            return (runs, mesh);
        }
        let Ok(_permit) = self.waiting.try_acquire() else {
            return (false, mesh);
        };
        let _counted = self.registry.waiting_for_pod();
        let mut changes = self.mesh.clone();
        let seen = changes.wait_for(|published| published.mesh.node_runs(node, identity));
        match tokio::time::timeout(self.pod_wait, seen).await {
            Ok(Ok(published)) => (true, published.mesh.clone()),
            _ => (false, self.mesh.borrow().mesh.clone()),
        }
    }

    fn refuse(&self, outcome: &str, status: Status) -> Status {
        self.registry.certificate(outcome);
        status
    }
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for SigningService {
    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let node = self
            .auth
            .authenticate(&request)
            .await
            .map_err(|status| self.refuse("unauthenticated", status))?;
        let pb::SignRequest { identity, csr_der } = request.into_inner();
        let identity = Identity::parse(&identity)
            .map_err(|e| self.refuse("invalid", Status::invalid_argument(e.to_string())))?;

        let (runs, mesh) = self.pod_on_node(&node, &identity).await;
        if !runs {
            warn!(%node, %identity, "refusing to sign: no running meshed pod with this identity on the node");
            return Err(self.refuse(
                "denied",
                Status::permission_denied(format!(
                    "node {node} runs no meshed pod with an IP and identity {identity}"
                )),
            ));
        }
        let chain = self
            .ca
            .sign_csr(&csr_der, &identity, SystemTime::now())
            .map_err(|e| {
                warn!(%node, %identity, error = %e, "refusing to sign: bad CSR");
                self.refuse("invalid", Status::invalid_argument(e.to_string()))
            })?;
        self.registry.certificate("issued");
        info!(%node, %identity, "issued workload certificate");
        Ok(Response::new(pb::SignResponse {
            chain_der: chain.into_iter().map(|c| c.to_vec()).collect(),
            trust: Some(mesh.trust.clone()),
        }))
    }
}
