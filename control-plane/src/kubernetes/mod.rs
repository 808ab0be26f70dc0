//! The control plane on Kubernetes: the cluster source (watchers on the API
//! server), node authentication with TokenReview, and the CA kept in a
//! Secret, status conditions written by the replica holding the Lease, and
//! the uninstall announcement.
//! Everything that talks to the API server lives here; the rest of
//! the control plane sees only [`crate::cluster::ClusterState`] and the
//! node name an authenticator returns.

mod ca_secret;
mod lease;
mod signing_keys;
mod source;
mod status_writer;
mod token_review;
mod uninstall;

pub use ca_secret::{CA_SECRET_KEY, ROOTS_CONFIG_MAP_KEY, load_or_create_ca, publish_roots};
pub use lease::{LEASE_DURATION, RENEW_EVERY, hold_lease};
pub use signing_keys::{Verdict, verdict_with_jwks};
pub use source::watch_cluster;
pub use status_writer::write_statuses;
pub use token_review::{NODE_NAME_EXTRA, TokenReviewLimits, TokenReviewer, unverified_claims};
pub use uninstall::{UninstallArgs, announce_uninstall};

/// A client from the environment: `KUBECONFIG` or `~/.kube/config` when
/// present, else the pod's in-cluster ServiceAccount.
pub async fn connect() -> Result<kube::Client, crate::Error> {
    kube::Client::try_default()
        .await
        .map_err(|source| crate::Error::Kubernetes {
            operation: "connecting to the API server (KUBECONFIG or in-cluster)".into(),
            source,
        })
}
