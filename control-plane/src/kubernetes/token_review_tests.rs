//! The token reviewer's tests: what is read unverified, and how calls
//! with one token share a review (against a fake API server).
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use super::*;

fn jwt(claims: &serde_json::Value) -> String {
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!(
        "{}.{}.{}",
        encode(br#"{"alg":"RS256"}"#),
        encode(claims.to_string().as_bytes()),
        encode(b"signature")
    )
}

/// A reviewer whose API server answers every TokenReview with node
/// `node-1`, slowly (so that calls overlap), counting the reviews.
fn reviewer_counting(
    reviews: Arc<std::sync::atomic::AtomicUsize>,
    limits: TokenReviewLimits,
) -> TokenReviewer {
    let api = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let reviews = reviews.clone();
        async move {
            if !request.uri().path().ends_with("/tokenreviews") {
                let missing = http::Response::builder()
                    .status(404)
                    .body(kube::client::Body::from(b"{}".to_vec()))?;
                return Ok::<_, http::Error>(missing);
            }
            reviews.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let review = serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {},
                "status": {"authenticated": true, "audiences": ["weft"], "user": {
                    "username": "system:serviceaccount:weft-system:weft-node-proxy",
                    "extra": {NODE_NAME_EXTRA: ["node-1"]}
                }}
            });
            http::Response::builder()
                .header("content-type", "application/json")
                .body(kube::client::Body::from(review.to_string().into_bytes()))
        }
    });
    TokenReviewer::new(
        kube::Client::new(api, "default"),
        ("weft", "weft-system", "weft-node-proxy"),
        limits,
        crate::listeners::Rejections::default(),
    )
}

fn limits() -> TokenReviewLimits {
    TokenReviewLimits {
        token_review_negative_cache_seconds: 60,
        token_reviews_per_second: 50,
        token_review_burst: 200,
        token_reviews_per_source_per_minute: 12,
        token_signing_keys_refresh_seconds: 10,
        token_review_timeout_ms: 5000,
        token_review_source_burst: 6,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_bringing_one_new_token_share_one_review() {
    let reviews = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reviewer = Arc::new(reviewer_counting(reviews.clone(), limits()));
    let token = jwt(&serde_json::json!({
        "aud": ["weft"], "sub": "system:serviceaccount:weft-system:weft-node-proxy",
        "exp": 4_000_000_000u64,
    }));
    let source = Some(IpAddr::from([192, 168, 0, 1]));
    // More calls at once than the source's burst of reviews.
    let calls = (0..20).map(|_| {
        let (reviewer, token) = (reviewer.clone(), token.clone());
        tokio::spawn(async move {
            let digest = crate::node_auth::digest(&token);
            reviewer.node_of(&token, digest, source).await
        })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap(), "node-1");
    }
    assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(reviewer.under_review.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_that_times_out_fails_every_call_queued_behind_it_at_once() {
    let reviews = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The API server answers after 200 ms; reviews may take 50.
    let limits = TokenReviewLimits {
        token_review_timeout_ms: 50,
        ..limits()
    };
    let reviewer = Arc::new(reviewer_counting(reviews.clone(), limits));
    let token = jwt(&serde_json::json!({
        "aud": ["weft"], "sub": "system:serviceaccount:weft-system:weft-node-proxy",
        "exp": 4_000_000_000u64,
    }));
    let calls = (0..10).map(|_| {
        let (reviewer, token) = (reviewer.clone(), token.clone());
        tokio::spawn(async move {
            let digest = crate::node_auth::digest(&token);
            reviewer.node_of(&token, digest, None).await
        })
    });
    for call in futures::future::join_all(calls).await {
        let status = call.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("timed out"), "{status:?}");
    }
    // One review was sent, not one after another per call.
    assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(reviewer.under_review.lock().unwrap().is_empty());
}

#[test]
fn only_a_jwt_is_read_and_its_claims_are_what_they_are() {
    let claims = serde_json::json!({
        "aud": ["weft"], "sub": "system:serviceaccount:weft-system:weft-node-proxy",
        "exp": 4_000_000_000u64,
    });
    assert_eq!(unverified_claims(&jwt(&claims)), Some(claims));
    for garbage in [
        "",
        "a.b",
        "a.b.c.d",
        "x.!!!.y",
        "e30.bm90IGpzb24.x",
        "a.W10.b",
    ] {
        assert_eq!(unverified_claims(garbage), None, "{garbage}");
    }
}
