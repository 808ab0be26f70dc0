//! Floods against the control plane's gRPC port, on a real kube-apiserver,
//! from a pod that is not a node: made-up node tokens (each could cost a
//! TokenReview; what reaches the API server is counted there) and
//! connections that never call. A node's real token authenticates at once
//! while they go on.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt as _;
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::{PodSpec, Target, Testbed, WeftMesh, control_plane_channel};

/// The control plane's defaults (`--token-review-source-burst`,
/// `--token-reviews-per-source-per-minute`): what one source may cost.
const SOURCE_BURST: f64 = 6.0;
const SOURCE_PER_SECOND: f64 = 12.0 / 60.0;

/// node-1 runs the control plane, a meshed pod, and an intruder: an
/// unmeshed pod that reaches the control plane's port like any other.
fn cluster() -> Testbed {
    Testbed::builder()
        .node("node-1")
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "web-1",
            service_account: "web",
            labels: &[],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec::named("node-1", "legacy", "intruder", false))
        .build()
        .unwrap()
}

/// A channel to the control plane from `from`.
async fn channel_from(
    testbed: &Testbed,
    mesh: &WeftMesh,
    from: Target<'_>,
) -> anyhow::Result<tonic::transport::Channel> {
    let roots = weft_certs::TrustBundle::from_pem(&mesh.roots_pem()?)?;
    let socket = testbed.connect(from, mesh.control_plane_addr(testbed)?)?;
    control_plane_channel(socket, roots).await
}

/// TokenReviews the API server has received, from its own metrics.
async fn token_reviews(client: &kube::Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let metrics = client.request_text(request).await.unwrap();
    metrics
        .lines()
        .filter(|line| line.starts_with("apiserver_request_total{"))
        .filter(|line| line.contains(r#"resource="tokenreviews""#))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A JWT that claims to be a node proxy's token for weft's audience, with
/// a signature nobody made: only the API server can tell.
fn forged_token(n: usize) -> String {
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let claims = serde_json::json!({
        "aud": ["weft"],
        "sub": "system:serviceaccount:weft-system:weft-node-proxy",
        "exp": 4_000_000_000u64,
        "jti": n,
    });
    format!(
        "{}.{}.{}",
        encode(br#"{"alg":"RS256","kid":"forged"}"#),
        encode(claims.to_string().as_bytes()),
        encode(format!("signature-{n}").as_bytes())
    )
}

/// What became of one Sign call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The token was taken: the empty CSR is what is refused then
    /// (INVALID_ARGUMENT).
    Authenticated,
    /// UNAUTHENTICATED: the token was refused.
    Refused,
    /// UNAVAILABLE from the control plane: over a rate, try later.
    RateLimited,
    /// The connection went away under the call (closed for never
    /// authenticating).
    ConnectionGone,
    /// Anything else: a test failure wherever it shows.
    Unexpected(String),
}

/// One Sign call with `token`.
async fn sign_with(channel: tonic::transport::Channel, token: String) -> Outcome {
    let mut call = tonic::Request::new(weft_api::v1::SignRequest {
        identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        csr_der: Vec::new(),
    });
    call.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let answer = weft_api::v1::certificates_client::CertificatesClient::new(channel)
        .sign(call)
        .await;
    match answer {
        Err(status) if status.code() == tonic::Code::Unauthenticated => Outcome::Refused,
        Err(status) if status.message().contains("too many node authentications") => {
            Outcome::RateLimited
        }
        Err(status) if status.code() == tonic::Code::Unavailable => Outcome::ConnectionGone,
        Err(status) if status.code() == tonic::Code::InvalidArgument => Outcome::Authenticated,
        other => Outcome::Unexpected(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_made_up_tokens_cost_the_api_server_a_bounded_number_of_reviews() {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = cluster();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    tokio::task::block_in_place(|| mesh.wait_for_data_plane(&testbed)).unwrap();
    use weft_testbed::kube_cluster::{TOKEN_AUDIENCE, WEFT_NAMESPACE, service_account_token};
    // A fresh token of node-1's proxy, never reviewed before: it costs a
    // review, which must get through while the flood goes on.
    let pods =
        kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), WEFT_NAMESPACE);
    let proxy = pods.get("weft-node-proxy-node-1").await.unwrap();
    let proxy_token = |pod| {
        service_account_token(
            &client,
            WEFT_NAMESPACE,
            "weft-node-proxy",
            &[TOKEN_AUDIENCE],
            pod,
        )
    };
    let fresh = proxy_token(Some(&proxy)).await.unwrap();
    // 20 tokens the API server did sign, for the proxies' ServiceAccount
    // and weft's audience, but bound to no pod: each costs a review (only
    // the review tells), so they meet the per-source allowance.
    let mut unbound = Vec::new();
    for _ in 0..20 {
        unbound.push(proxy_token(None).await.unwrap());
    }
    // The signed ones first, then 9,000 that are not even JWTs and 1,000
    // forged ones (a signature nobody made), each different.
    let made_up = (0..10_000).map(|n| {
        if n % 10 == 0 {
            forged_token(n)
        } else {
            format!("made-up-token-{n}")
        }
    });
    let tokens: Vec<String> = unbound.iter().cloned().chain(made_up).collect();

    let before = token_reviews(&client).await;
    let started = Instant::now();
    // The intruder sends them 32 at a time, on a new connection every
    // 1,000 (the control plane closes a connection on which no call
    // authenticates for 10 s).
    let flood = async {
        let mut outcomes = Vec::new();
        for batch in tokens.chunks(1000) {
            let channel = channel_from(&testbed, &mesh, Target::Pod("intruder"))
                .await
                .unwrap();
            let sent = futures::stream::iter(batch.iter().cloned())
                .map(|token| sign_with(channel.clone(), token))
                // In order: the outcomes line up with the tokens.
                .buffered(32)
                .collect::<Vec<Outcome>>();
            outcomes.extend(sent.await);
        }
        outcomes
    };
    // While the flood goes on, the node's fresh token authenticates at
    // the first try: the intruder used up its own allowance of reviews,
    // not the node's.
    let node_meanwhile = async {
        wait_for_rejections(&mesh, &testbed, "token_review_source_rate").await;
        let node = channel_from(&testbed, &mesh, Target::Node("node-1"))
            .await
            .unwrap();
        sign_with(node, fresh).await
    };
    let (outcomes, node) = tokio::join!(flood, node_meanwhile);
    assert_eq!(node, Outcome::Authenticated, "the node's token");
    // A starting proxy sends a new token on many calls at once (its config
    // stream, a certificate per identity): they share one review, so more
    // of them than the source's burst of reviews all get through.
    let another = proxy_token(Some(&proxy)).await.unwrap();
    let node = channel_from(&testbed, &mesh, Target::Node("node-1"))
        .await
        .unwrap();
    let at_once = 3 * SOURCE_BURST as usize;
    let calls = (0..at_once).map(|_| sign_with(node.clone(), another.clone()));
    let answers = futures::future::join_all(calls).await;
    assert!(
        answers
            .iter()
            .all(|answer| *answer == Outcome::Authenticated),
        "{answers:?}"
    );
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = token_reviews(&client).await - before;
    eprintln!(
        "{reviews} TokenReviews reached the API server for 10,020 made-up tokens in {elapsed:.1} s"
    );

    let unexpected = outcomes.iter().find(|outcome| {
        !matches!(
            outcome,
            Outcome::Refused | Outcome::RateLimited | Outcome::ConnectionGone
        )
    });
    assert_eq!(unexpected, None, "every made-up token is refused");
    // One for each of the node's two tokens; the proxies' own reviews (a
    // renewal) may fall in this window too.
    let bound = SOURCE_BURST + SOURCE_PER_SECOND * elapsed + 2.0 + 5.0;
    assert!(
        reviews <= bound,
        "{reviews} TokenReviews reached the API server in {elapsed:.1} s; at most {bound:.0} may"
    );
    // Each refusal is counted for what it was: 9,000 not JWTs, 1,000
    // forgeries refused without review. A call on a connection closed
    // under it (the authentication deadline) may or may not have been
    // counted before the close.
    let (signed, made_up) = outcomes.split_at(unbound.len());
    let answered = |forged: bool, how: Outcome| {
        let kind = made_up.iter().enumerate();
        kind.filter(|(n, outcome)| (n % 10 == 0) == forged && **outcome == how)
            .count() as u64
    };
    let refused = |forged| answered(forged, Outcome::Refused);
    let gone = |forged| answered(forged, Outcome::ConnectionGone);
    let rejected = |reason: &str| {
        let needle =
            format!(r#"weft_control_plane_rejected_total{{listener="grpc",reason="{reason}"}} "#);
        let page = mesh.control_plane_page(&testbed, "/metrics").unwrap();
        page.lines()
            .filter_map(|line| line.strip_prefix(needle.as_str()))
            .filter_map(|value| value.trim().parse::<u64>().ok())
            .sum::<u64>()
    };
    for (reason, forged) in [("token_malformed", false), ("token_forged", true)] {
        let counted = rejected(reason);
        assert!(
            (refused(forged)..=refused(forged) + gone(forged)).contains(&counted),
            "{counted} counted as {reason}; {} refused, {} on a closed connection",
            refused(forged),
            gone(forged)
        );
    }
    // Most arrived: a closed connection loses the 32 calls under way.
    assert!(refused(true) >= 900, "{} forgeries arrived", refused(true));
    assert!(signed.contains(&Outcome::RateLimited), "{signed:?}");

    // A signed token the API server refused stays refused for a while:
    // sending it again costs nothing.
    let reviewed: Vec<&String> = unbound
        .iter()
        .zip(signed)
        .filter(|(_, outcome)| **outcome == Outcome::Refused)
        .map(|(token, _)| token)
        .collect();
    assert!(!reviewed.is_empty(), "some signed tokens were reviewed");
    let again = token_reviews(&client).await;
    let channel = channel_from(&testbed, &mesh, Target::Pod("intruder"))
        .await
        .unwrap();
    for token in &reviewed {
        let outcome = sign_with(channel.clone(), (*token).clone()).await;
        assert_eq!(outcome, Outcome::Refused);
    }
    let more = token_reviews(&client).await - again;
    assert!(
        more <= 5.0,
        "{more} reviews for {} tokens refused before",
        reviewed.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_call_are_capped_per_source_and_closed() {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let testbed = cluster();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    tokio::task::block_in_place(|| mesh.wait_for_data_plane(&testbed)).unwrap();

    // 40 TLS connections from one pod that never call, 8 at a time (the
    // handshakes one source may have under way): the control plane's
    // per-source cap of unauthenticated connections (16) takes the first
    // ones, resets the rest.
    let mut silent = Vec::new();
    for _ in 0..5 {
        let connecting = (0..8).map(|_| channel_from(&testbed, &mesh, Target::Pod("intruder")));
        let batch = futures::future::join_all(connecting).await;
        silent.extend(batch.into_iter().filter_map(Result::ok));
    }
    assert!(silent.len() <= 16, "{} connections held", silent.len());
    wait_for_rejections(&mesh, &testbed, "source_limit").await;
    // The node's proxy still gets a connection and is authenticated.
    let node = channel_from(&testbed, &mesh, Target::Node("node-1"))
        .await
        .unwrap();
    let real = mesh.token("node-1").unwrap().to_owned();
    assert_eq!(
        sign_with(node.clone(), real.clone()).await,
        Outcome::Authenticated
    );
    // Those that never called are closed once the deadline passes; the
    // node's, authenticated, stays.
    wait_for_rejections(&mesh, &testbed, "no_authenticated_call").await;
    assert_eq!(sign_with(node, real).await, Outcome::Authenticated);
    let gone = sign_with(silent[0].clone(), "made-up-token-0".into()).await;
    assert_eq!(
        gone,
        Outcome::ConnectionGone,
        "the silent connection is closed"
    );
}

/// Waits until the control plane has refused something on its gRPC port
/// for `reason`.
async fn wait_for_rejections(mesh: &WeftMesh, testbed: &Testbed, reason: &str) {
    let needle =
        format!(r#"weft_control_plane_rejected_total{{listener="grpc",reason="{reason}"}} "#);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = tokio::task::block_in_place(|| mesh.control_plane_page(testbed, "/metrics"));
        let count: f64 = page
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.strip_prefix(needle.as_str()))
            .filter_map(|value| value.trim().parse::<f64>().ok())
            .sum();
        if count > 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "nothing refused for {reason}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
