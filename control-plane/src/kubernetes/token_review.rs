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
//!
//! Anyone who reaches the gRPC port can present a token, and each unknown
//! one would cost an API request: a flood of made-up tokens must not become
//! a flood on the API server. So a token is first read without trusting
//! it (a JWT for our audience and the proxies' ServiceAccount, not
//! expired: anything else is refused here), then its signature is checked
//! against the API server's signing keys (`signing_keys`: a forgery is
//! refused here too), a refused token stays refused for a while without
//! asking again, and the reviews sent are rate limited, per source address
//! and in all ([`TokenReviewLimits`]); over the rate, authentication fails
//! with UNAVAILABLE and the proxy tries again later. Calls that bring one
//! new token at once (a starting proxy's config stream and certificate
//! requests) share one review.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;

use super::signing_keys::{SigningKeys, Verdict};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tonic::Status;
use tracing::{debug, warn};

/// The key under which the API server names the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// A review is reused for this long, so that a proxy's calls do not each
/// cost an API request. Short, because a deleted pod invalidates its token.
const CACHE_FOR: Duration = Duration::from_secs(30);
/// Bound on cached reviews (and on remembered refusals); a cache is
/// cleared when it is full.
const CACHE_ENTRIES: usize = 4096;

/// The claims of a JWT, read without checking its signature; `None` if
/// `token` is not one. Faces anyone who reaches the gRPC port (a fuzz
/// target reads arbitrary input with it).
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .filter(serde_json::Value::is_object)
}

/// Bounds on the TokenReviews node authentication sends.
#[derive(Clone, Debug, clap::Args, Serialize, PartialEq, Eq)]
pub struct TokenReviewLimits {
    /// How long a refused node token stays refused without asking the API
    /// server again, in seconds.
    #[arg(
        long,
        env = "WEFT_TOKEN_REVIEW_NEGATIVE_CACHE_SECONDS",
        default_value_t = 60
    )]
    pub token_review_negative_cache_seconds: u64,

    /// TokenReviews sent per second at most, on average; over it, node
    /// authentication fails with UNAVAILABLE (the proxy retries with
    /// backoff, serving its last config meanwhile).
    #[arg(long, env = "WEFT_TOKEN_REVIEWS_PER_SECOND", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub token_reviews_per_second: u32,

    /// TokenReviews sent at once before the rate applies (all proxies
    /// reconnecting after a restart of the control plane).
    #[arg(long, env = "WEFT_TOKEN_REVIEW_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub token_review_burst: u32,

    /// TokenReviews one source address may cause per minute, on average:
    /// a node's proxy needs one per token it is given (hourly), so a pod
    /// sending made-up tokens uses up its own allowance, not the nodes'.
    #[arg(long, env = "WEFT_TOKEN_REVIEWS_PER_SOURCE_PER_MINUTE", default_value_t = 12,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub token_reviews_per_source_per_minute: u32,

    /// How often the API server's token signing keys may be fetched again
    /// when a token names a key not known yet, in seconds.
    #[arg(long, env = "WEFT_TOKEN_SIGNING_KEYS_REFRESH_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub token_signing_keys_refresh_seconds: u64,

    /// How long a TokenReview may take before the call it authenticates
    /// is told to try again (UNAVAILABLE), in milliseconds.
    #[arg(long, env = "WEFT_TOKEN_REVIEW_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub token_review_timeout_ms: u64,

    /// TokenReviews one source address may cause at once before its rate
    /// applies.
    #[arg(long, env = "WEFT_TOKEN_REVIEW_SOURCE_BURST", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub token_review_source_burst: u32,
}

/// The TokenReviews that may be sent now.
struct Allowance {
    all: Bucket,
    by_source: HashMap<IpAddr, Bucket>,
}

/// A token bucket: reviews that may be sent now, and when that was known.
struct Bucket {
    tokens: f64,
    since: Instant,
}

impl Bucket {
    fn full(burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            since: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant, per_second: f64, burst: u32) {
        let gained = now.saturating_duration_since(self.since).as_secs_f64() * per_second;
        self.tokens = (self.tokens + gained).min(f64::from(burst));
        self.since = now;
    }

    /// Takes one if there is one.
    fn take(&mut self, now: Instant, per_second: f64, burst: u32) -> bool {
        self.refill(now, per_second, burst);
        let taken = self.tokens >= 1.0;
        if taken {
            self.tokens -= 1.0;
        }
        taken
    }

    fn is_full_at(&mut self, now: Instant, per_second: f64, burst: u32) -> bool {
        self.refill(now, per_second, burst);
        self.tokens >= f64::from(burst)
    }
}

/// Where the calls with one token take turns, and find the outcome of the
/// review before them.
type ReviewGate = Arc<tokio::sync::Mutex<Option<Result<String, Status>>>>;

/// One call's place among the calls reviewing one token; the last one to
/// leave takes the token's entry out.
struct ReviewTurn<'a> {
    reviewer: &'a TokenReviewer,
    digest: [u8; 32],
    /// Held while one call reviews; then holds its outcome, for the calls
    /// that queued behind it.
    gate: ReviewGate,
}

impl ReviewTurn<'_> {
    /// Takes the token's gate out of the map if it is still this one:
    /// callers that come later start a gate (and, past the caches, a
    /// review) of their own instead of taking an outcome they did not
    /// queue for.
    fn close(&self) {
        if let Ok(mut under_review) = self.reviewer.under_review.lock()
            && under_review
                .get(&self.digest)
                .is_some_and(|gate| Arc::ptr_eq(gate, &self.gate))
        {
            under_review.remove(&self.digest);
        }
    }
}

impl Drop for ReviewTurn<'_> {
    fn drop(&mut self) {
        // Ours and the map's: nobody else waits (a reviewer that was
        // cancelled leaves no outcome, and the gate to whoever comes next).
        if Arc::strong_count(&self.gate) <= 2 {
            self.close();
        }
    }
}

/// Checks node proxy tokens with the API server.
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the node proxies.
    proxy_user: String,
    cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    /// Tokens the API server (or the first reading) refused, and why.
    refused: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    /// Reviews that may be sent now: in all, and per source address.
    allowance: Mutex<Allowance>,
    /// The tokens under review now: calls with one token take turns, so
    /// that a proxy's many first calls cost one review, not one each.
    under_review: Mutex<HashMap<[u8; 32], ReviewGate>>,
    /// The API server's keys, to refuse forged tokens without a review.
    keys: SigningKeys,
    limits: TokenReviewLimits,
    rejections: crate::listeners::Rejections,
}

impl TokenReviewer {
    /// A reviewer accepting tokens for `audience` that belong to the
    /// ServiceAccount `namespace/service_account`.
    pub fn new(
        client: kube::Client,
        (audience, namespace, service_account): (&str, &str, &str),
        limits: TokenReviewLimits,
        rejections: crate::listeners::Rejections,
    ) -> TokenReviewer {
        let refresh = Duration::from_secs(limits.token_signing_keys_refresh_seconds);
        TokenReviewer {
            keys: SigningKeys::new(client.clone(), refresh),
            client,
            audience: audience.to_owned(),
            proxy_user: format!("system:serviceaccount:{namespace}:{service_account}"),
            cache: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            allowance: Mutex::new(Allowance {
                all: Bucket::full(limits.token_review_burst),
                by_source: HashMap::new(),
            }),
            under_review: Mutex::new(HashMap::new()),
            limits,
            rejections,
        }
    }

    /// The node whose proxy holds `token`, sent from `source` (if known).
    pub async fn node_of(
        &self,
        token: &str,
        digest: [u8; 32],
        source: Option<IpAddr>,
    ) -> Result<String, Status> {
        if let Some(known) = self.known_answer(&digest) {
            return known;
        }
        if let Err(why) = self.read_unverified(token) {
            // Cheap to tell again: not remembered, so that a flood of
            // these cannot push reviewed refusals out of the cache.
            self.rejections.count("grpc", "token_malformed");
            debug!(reason = %why, "node token refused unread");
            return Err(Status::unauthenticated(why));
        }
        match self.keys.check(token).await {
            Verdict::Signed | Verdict::Unknown => {}
            Verdict::Forged(why) => {
                // Cheap to tell again, like a malformed token: not
                // remembered.
                self.rejections.count("grpc", "token_forged");
                debug!(reason = %why, "node token refused unreviewed");
                return Err(Status::unauthenticated(why));
            }
            Verdict::NotYet => {
                self.rejections.count("grpc", "token_key_not_yet");
                return Err(Status::unavailable(
                    "the node token names a signing key not known yet; try again later",
                ));
            }
        }
        let turn = self.turn_for(digest);
        let mut outcome = turn.gate.lock().await;
        // Calls that queued behind a review take its outcome, a failure
        // too: asking again, one after another, would only repeat it.
        if let Some(outcome) = outcome.as_ref() {
            return outcome.clone();
        }
        let reviewed = self.review(token, digest, source).await;
        *outcome = Some(reviewed.clone());
        // Only those already queued take this outcome.
        turn.close();
        reviewed
    }

    /// The review itself, for the call whose turn it is.
    async fn review(
        &self,
        token: &str,
        digest: [u8; 32],
        source: Option<IpAddr>,
    ) -> Result<String, Status> {
        // A call with the same token may have been reviewed meanwhile.
        if let Some(known) = self.known_answer(&digest) {
            return known;
        }
        if let Err(reason) = self.take_allowance(source) {
            self.rejections.count("grpc", reason);
            return Err(Status::unavailable(
                "too many node authentications at once; try again later",
            ));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api = Api::<TokenReview>::all(self.client.clone());
        let timeout = Duration::from_millis(self.limits.token_review_timeout_ms);
        let reviewed = match tokio::time::timeout(
            timeout,
            api.create(&PostParams::default(), &review),
        )
        .await
        {
            Ok(Ok(reviewed)) => reviewed,
            Ok(Err(error)) => {
                warn!(%error, "TokenReview failed; cannot authenticate node proxies");
                return Err(Status::unavailable(format!(
                    "reviewing the node token: {error}"
                )));
            }
            Err(_) => {
                warn!(
                    timeout_ms = self.limits.token_review_timeout_ms,
                    "TokenReview timed out; cannot authenticate node proxies"
                );
                return Err(Status::unavailable("reviewing the node token timed out"));
            }
        };
        let node = self
            .node_from_review(reviewed)
            .map_err(|refused| self.refuse(digest, refused.message().to_owned()))?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(digest, (node.clone(), Instant::now() + CACHE_FOR));
        }
        Ok(node)
    }

    /// What a review of the token of `digest` said not long ago, if one
    /// did: its node, or its refusal.
    fn known_answer(&self, digest: &[u8; 32]) -> Option<Result<String, Status>> {
        if let Some(node) = self.cached(digest) {
            return Some(Ok(node));
        }
        let why = self.refused_before(digest)?;
        self.rejections.count("grpc", "token_refused_before");
        Some(Err(Status::unauthenticated(why)))
    }

    /// A place in the queue of calls reviewing the token of `digest`.
    fn turn_for(&self, digest: [u8; 32]) -> ReviewTurn<'_> {
        let gate = match self.under_review.lock() {
            Ok(mut under_review) => under_review.entry(digest).or_default().clone(),
            // Never poisoned (nothing panics holding it); were it, calls
            // would simply not share reviews.
            Err(_) => Arc::default(),
        };
        ReviewTurn {
            reviewer: self,
            digest,
            gate,
        }
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<String> {
        let cache = self.cache.lock().ok()?;
        let (node, until) = cache.get(digest)?;
        (Instant::now() < *until).then(|| node.clone())
    }

    fn refused_before(&self, digest: &[u8; 32]) -> Option<String> {
        let refused = self.refused.lock().ok()?;
        let (why, until) = refused.get(digest)?;
        (Instant::now() < *until).then(|| why.clone())
    }

    /// Refuses `digest`'s token for `why`, as the API server did, and
    /// remembers it.
    fn refuse(&self, digest: [u8; 32], why: String) -> Status {
        if let Ok(mut refused) = self.refused.lock() {
            if refused.len() >= CACHE_ENTRIES {
                refused.clear();
            }
            let until = Instant::now()
                + Duration::from_secs(self.limits.token_review_negative_cache_seconds);
            refused.insert(digest, (why.clone(), until));
        }
        Status::unauthenticated(why)
    }

    /// Whether a review may be sent now for `source`: its own bucket
    /// first, then everyone's; the refusal's reason if not.
    fn take_allowance(&self, source: Option<IpAddr>) -> Result<(), &'static str> {
        let mut allowance = self
            .allowance
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let limits = &self.limits;
        if let Some(source) = source {
            let per_second = f64::from(limits.token_reviews_per_source_per_minute) / 60.0;
            let burst = limits.token_review_source_burst;
            if allowance.by_source.len() >= CACHE_ENTRIES {
                // Full buckets say nothing a new one would not.
                allowance
                    .by_source
                    .retain(|_, bucket| !bucket.is_full_at(now, per_second, burst));
                if allowance.by_source.len() >= CACHE_ENTRIES {
                    allowance.by_source.clear();
                }
            }
            let bucket = allowance
                .by_source
                .entry(source)
                .or_insert_with(|| Bucket::full(burst));
            if !bucket.take(now, per_second, burst) {
                return Err("token_review_source_rate");
            }
        }
        let rate = f64::from(limits.token_reviews_per_second);
        if allowance.all.take(now, rate, limits.token_review_burst) {
            Ok(())
        } else {
            Err("token_review_rate")
        }
    }

    /// Reads `token` without trusting it: only a JWT that claims our
    /// audience and the node proxies' ServiceAccount, and has not expired,
    /// is worth a review (the API server checks the signature).
    fn read_unverified(&self, token: &str) -> Result<(), String> {
        let claims = unverified_claims(token)
            .ok_or_else(|| "the node token is not a ServiceAccount token (JWT)".to_owned())?;
        let audiences = match &claims["aud"] {
            serde_json::Value::String(one) => vec![one.as_str()],
            serde_json::Value::Array(many) => many.iter().filter_map(|a| a.as_str()).collect(),
            _ => Vec::new(),
        };
        if !audiences.contains(&self.audience.as_str()) {
            return Err(format!(
                "the node token is not meant for audience {}",
                self.audience
            ));
        }
        let subject = claims["sub"].as_str().unwrap_or_default();
        if subject != self.proxy_user {
            // What it claims, unverified: enough to tell an operator whose
            // token was sent where.
            return Err(format!(
                "the token belongs to {subject:?}, not to the node proxy ({})",
                self.proxy_user
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if claims["exp"].as_u64().is_some_and(|exp| exp <= now) {
            return Err("the node token has expired".into());
        }
        Ok(())
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

#[cfg(test)]
#[path = "token_review_tests.rs"]
mod tests;
