//! The `Certificates` service: signs a workload CSR for a node proxy, but
//! only for an identity that has a meshed pod with an IP (Pending with its
//! init containers, or Running) on that proxy's node.
//! This is the check that keeps a compromised node from minting identities
//! of workloads it does not host.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_api::v1 as pb;
use weft_certs::{Identity, MeshCa};

use crate::mesh::Mesh;
use crate::node_auth::NodeAuthenticator;
use crate::registry::NodeRegistry;

/// The signing service.
pub struct SigningService {
    ca: Arc<MeshCa>,
    mesh: watch::Receiver<Arc<Mesh>>,
    auth: Arc<NodeAuthenticator>,
    registry: Arc<NodeRegistry>,
}

impl SigningService {
    /// A service signing with `ca` for the pods `mesh` places on each node.
    pub fn new(
        ca: Arc<MeshCa>,
        mesh: watch::Receiver<Arc<Mesh>>,
        auth: Arc<NodeAuthenticator>,
        registry: Arc<NodeRegistry>,
    ) -> SigningService {
        SigningService {
            ca,
            mesh,
            auth,
            registry,
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
            .authenticate(request.metadata())
            .await
            .map_err(|status| self.refuse("unauthenticated", status))?;
        let pb::SignRequest { identity, csr_der } = request.into_inner();
        let identity = Identity::parse(&identity)
            .map_err(|e| self.refuse("invalid", Status::invalid_argument(e.to_string())))?;

        let mesh = self.mesh.borrow().clone();
        if !mesh.node_runs(&node, &identity) {
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
