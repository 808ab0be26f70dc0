//! The certificate authority over real TLS on loopback: it signs only the
//! identities running on the caller's node, waits for a pod it has not
//! seen yet, and signs with an operator's intermediate.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod support;

use std::time::{Duration, SystemTime};

use tonic::Code;
use weft_certs::{CertificateRequest, TrustBundle};

use support::*;

#[tokio::test]
async fn the_ca_signs_only_identities_running_on_the_callers_node() {
    // Refusals wait this long for a pod to show up.
    let cp = start_control_plane_with(&["--sign-wait-for-pod-ms", "100"]).await;
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let request = CertificateRequest::generate(&web.parse().unwrap()).unwrap();

    // node-1 runs web-1: signed, and the chain verifies against the roots.
    let response = sign(&cp, TOKEN_1, web, request.csr_der().to_vec())
        .await
        .unwrap();
    let trust = TrustBundle::from_pem(&response.trust.unwrap().roots_pem).unwrap();
    let chain = response.chain_der.into_iter().map(Into::into).collect();
    let cert = request.complete(chain, trust, SystemTime::now()).unwrap();
    assert_eq!(cert.identity().to_string(), web);

    // node-2 does not run web: refused, whatever the CSR.
    let again = CertificateRequest::generate(&web.parse().unwrap()).unwrap();
    let status = sign(&cp, TOKEN_2, web, again.csr_der().to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node node-2"),
        "{}",
        status.message()
    );

    // batch-1 runs on node-1 but is not meshed: refused.
    let batch = "spiffe://cluster.local/ns/shop/sa/batch";
    let batch_csr = CertificateRequest::generate(&batch.parse().unwrap()).unwrap();
    let status = sign(&cp, TOKEN_1, batch, batch_csr.csr_der().to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A CSR for db (on node-2) sent as a request for web from node-1: refused.
    let db_csr =
        CertificateRequest::generate(&"spiffe://cluster.local/ns/shop/sa/db".parse().unwrap())
            .unwrap();
    let status = sign(&cp, TOKEN_1, web, db_csr.csr_der().to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("SAN mismatch"),
        "{}",
        status.message()
    );

    // Garbage, a bad identity, and no token.
    let status = sign(&cp, TOKEN_1, web, vec![0x30, 0x03, 1, 2, 3])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = sign(&cp, TOKEN_1, "spiffe://cluster.local/ns/shop", vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = sign(&cp, "wrong-token-0123456789", web, vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let metrics = cp.debug_page("/metrics").await;
    assert!(
        metrics.contains("weft_control_plane_certificates_total{outcome=\"issued\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_control_plane_certificates_total{outcome=\"denied\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_for_a_pod_not_seen_yet_waits_for_it() {
    let cp = start_control_plane_with(&["--sign-wait-for-pod-ms", "600000"]).await;
    let api = "spiffe://cluster.local/ns/shop/sa/api";
    let request = CertificateRequest::generate(&api.parse().unwrap()).unwrap();
    let signed = sign(&cp, TOKEN_1, api, request.csr_der().to_vec());
    let pod_shows_up = async {
        // Once the request waits, the kubelet reports api-1's IP.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cp
            .debug_page("/metrics")
            .await
            .contains("weft_control_plane_certificate_requests_waiting 1")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the request never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let api_pod = "---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: api, containers: [{name: c, image: x}]}
status: {phase: Pending, podIP: 10.244.1.9}
";
        std::fs::write(
            cp.manifests.join("cluster.yaml"),
            manifests("10.244.1.2") + api_pod,
        )
        .unwrap();
    };
    let (signed, ()) = tokio::join!(signed, pod_shows_up);
    let chain = signed
        .unwrap()
        .chain_der
        .into_iter()
        .map(Into::into)
        .collect();
    let cert = request
        .complete(chain, cp.trust.clone(), SystemTime::now())
        .unwrap();
    assert_eq!(cert.identity().to_string(), api);
    let metrics = cp.debug_page("/metrics").await;
    assert!(
        metrics.contains("weft_control_plane_certificate_requests_waiting 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_operator_intermediate_signs_and_is_presented_in_chains() {
    // The operator's CA: a root kept offline and an intermediate for weft.
    let dir = tempfile::tempdir().unwrap();
    let ca_params = |name: &str| {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params
    };
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_params = ca_params("operator root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let intermediate = ca_params("weft intermediate")
        .signed_by(&key, &root_issuer)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    std::fs::write(&cert_file, format!("{}{}", intermediate.pem(), root.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let cp = start_control_plane_with(&[
        "--ca-cert",
        cert_file.to_str().unwrap(),
        "--ca-key",
        key_file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        cp.trust.roots(),
        [root.der().clone()],
        "proxies trust the operator root"
    );

    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let request = CertificateRequest::generate(&web.parse().unwrap()).unwrap();
    let response = sign(&cp, TOKEN_1, web, request.csr_der().to_vec())
        .await
        .unwrap();
    assert_eq!(response.chain_der.len(), 2, "leaf and intermediate");
    assert_eq!(response.chain_der[1], intermediate.der().to_vec());
    let chain = response.chain_der.into_iter().map(Into::into).collect();
    request
        .complete(chain, cp.trust.clone(), SystemTime::now())
        .unwrap();
}
