//! Node authentication on Kubernetes: a node proxy presents a projected,
//! audience-bound ServiceAccount token, and the API server (TokenReview)
//! says whose it is and which node the pod it is bound to runs on.
//!
//! Three checks make the node trustworthy: the token is valid for our
//! audience (a token minted for another service is useless here), it belongs
//! to the node proxy's ServiceAccount (a workload on the node can get a token
//! for our audience too, but only for its own ServiceAccount), and it is bound
//! to a pod, whose node the API server reports. The node never comes from
//! anything the proxy says.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tonic::Status;
use tracing::{debug, warn};

/// The key under which the API server names the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// A review is reused for this long, so that a proxy's calls do not each
/// cost an API request. Short, because a deleted pod invalidates its token.
const CACHE_FOR: Duration = Duration::from_secs(30);
/// Bound on cached reviews; the cache is cleared when it is full.
const CACHE_ENTRIES: usize = 4096;

/// Checks node proxy tokens with the API server.
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the node proxies.
    proxy_user: String,
    cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl TokenReviewer {
    /// A reviewer accepting tokens for `audience` that belong to the
    /// ServiceAccount `namespace/service_account`.
    pub fn new(
        client: kube::Client,
        audience: &str,
        namespace: &str,
        service_account: &str,
    ) -> TokenReviewer {
        TokenReviewer {
            client,
            audience: audience.to_owned(),
            proxy_user: format!("system:serviceaccount:{namespace}:{service_account}"),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The node whose proxy holds `token`.
    pub async fn node_of(&self, token: &str, digest: [u8; 32]) -> Result<String, Status> {
        if let Some(node) = self.cached(&digest) {
            return Ok(node);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| {
                warn!(%error, "TokenReview failed; cannot authenticate node proxies");
                Status::unavailable(format!("reviewing the node token: {error}"))
            })?;
        let node = self.node_from_review(reviewed)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(digest, (node.clone(), Instant::now() + CACHE_FOR));
        }
        Ok(node)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<String> {
        let cache = self.cache.lock().ok()?;
        let (node, until) = cache.get(digest)?;
        (Instant::now() < *until).then(|| node.clone())
    }

    /// Reads the verdict; every way it can fall short is a refusal.
    fn node_from_review(&self, review: TokenReview) -> Result<String, Status> {
        let refuse = |why: String| {
            debug!(reason = %why, "node token refused");
            Status::unauthenticated(why)
        };
        let status = review
            .status
            .ok_or_else(|| refuse("the API server returned no review".into()))?;
        if status.authenticated != Some(true) {
            let error = status.error.unwrap_or_default();
            return Err(refuse(format!("the node token is not valid: {error}")));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(refuse(format!(
                "the node token is not meant for audience {}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.proxy_user {
            warn!(%username, expected = %self.proxy_user, "a token of another identity was presented as a node proxy's");
            return Err(refuse(format!(
                "the token belongs to {username}, not to the node proxy ({})",
                self.proxy_user
            )));
        }
        let nodes = user
            .extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .unwrap_or_default();
        match nodes.as_slice() {
            [node] if !node.is_empty() => Ok(node.clone()),
            _ => Err(refuse(
                "the node token is not bound to a pod on a node (use a projected \
                 ServiceAccount token)"
                    .into(),
            )),
        }
    }
}
