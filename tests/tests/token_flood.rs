//! A flood of made-up node tokens against the control plane's gRPC port,
//! on a real kube-apiserver: each unknown token could cost a TokenReview.
//! What reaches the API server is counted there, and a real node proxy's
//! token still authenticates.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt as _;
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::{PodSpec, Target, Testbed, WeftMesh, control_plane_channel};

/// The control plane's defaults (`--token-review-burst`,
/// `--token-reviews-per-second`).
const BURST: f64 = 200.0;
const PER_SECOND: f64 = 50.0;

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
        .build()
        .unwrap()
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

/// One Sign call with `token`: the status code it failed with, or `Ok`.
async fn sign_with(channel: tonic::transport::Channel, token: String) -> tonic::Code {
    let mut call = tonic::Request::new(weft_api::v1::SignRequest {
        identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        csr_der: Vec::new(),
    });
    call.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match weft_api::v1::certificates_client::CertificatesClient::new(channel)
        .sign(call)
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_made_up_tokens_cost_the_api_server_a_bounded_number_of_reviews() {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = cluster();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    tokio::task::block_in_place(|| mesh.wait_for_data_plane(&testbed)).unwrap();
    let roots = weft_certs::TrustBundle::from_pem(&mesh.roots_pem().unwrap()).unwrap();
    let connect = || {
        let socket = testbed
            .connect(
                Target::Node("node-1"),
                mesh.control_plane_addr(&testbed).unwrap(),
            )
            .unwrap();
        control_plane_channel(socket, roots.clone())
    };
    let channel = connect().await.unwrap();

    let before = token_reviews(&client).await;
    let started = Instant::now();
    // 9,000 that are not even JWTs, 1,000 forged ones, each different.
    let tokens = (0..10_000).map(|n| {
        if n % 10 == 0 {
            forged_token(n)
        } else {
            format!("made-up-token-{n}")
        }
    });
    let codes: Vec<(usize, tonic::Code)> = futures::stream::iter(tokens.enumerate())
        .map(|(n, token)| {
            let channel = channel.clone();
            async move { (n, sign_with(channel, token).await) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = token_reviews(&client).await - before;
    eprintln!(
        "{reviews} TokenReviews reached the API server for 10,000 made-up tokens in {elapsed:.1} s"
    );

    assert!(
        codes.iter().all(|(_, code)| matches!(
            code,
            tonic::Code::Unauthenticated | tonic::Code::Unavailable
        )),
        "every made-up token is refused"
    );
    // The proxies' own reviews (a renewal) may fall in this window too.
    let bound = BURST + PER_SECOND * elapsed + 10.0;
    assert!(
        reviews <= bound,
        "{reviews} TokenReviews reached the API server in {elapsed:.1} s; at most {bound:.0} may"
    );
    // A forged token the API server refused stays refused for a while:
    // sending it again costs nothing.
    let reviewed: Vec<usize> = codes
        .iter()
        .filter(|(n, code)| n % 10 == 0 && *code == tonic::Code::Unauthenticated)
        .map(|(n, _)| *n)
        .take(50)
        .collect();
    assert!(!reviewed.is_empty(), "some forged tokens were reviewed");
    let again = token_reviews(&client).await;
    for n in &reviewed {
        let code = sign_with(channel.clone(), forged_token(*n)).await;
        assert_eq!(code, tonic::Code::Unauthenticated);
    }
    let more = token_reviews(&client).await - again;
    assert!(
        more <= 5.0,
        "{more} reviews for {} tokens refused before",
        reviewed.len()
    );

    // The node's real proxy token still authenticates (once the rate lets
    // a review through, as the proxy's backoff would).
    let real = mesh.token("node-1").unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let code = sign_with(connect().await.unwrap(), real.clone()).await;
        // Authenticated: the empty CSR is what is refused now.
        if !matches!(
            code,
            tonic::Code::Unauthenticated | tonic::Code::Unavailable
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the real token was refused: {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rejected = mesh.control_plane_page(&testbed, "/metrics").unwrap();
    assert!(
        rejected.contains(
            r#"weft_control_plane_rejected_total{listener="grpc",reason="token_malformed"} 9000"#
        ),
        "{rejected}"
    );
}
