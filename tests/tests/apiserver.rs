//! The test kube-apiserver itself: it serves the API, mints pod-bound
//! ServiceAccount tokens for weft's audience, reviews them with the pod's node, and
//! keeps its objects in etcd across a restart.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use weft_testbed::apiserver::KubeApiServer;

const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_bound_token_reviews_with_its_node_and_objects_survive_a_restart() {
    let started = std::time::Instant::now();
    let mut api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    eprintln!("kube-apiserver ready after {:?}", started.elapsed());
    let client = api.client().await.unwrap();
    let pp = PostParams::default();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &pp,
            &Namespace {
                metadata: meta("shop"),
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    // No controller-manager runs: the test makes the ServiceAccount itself.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "shop");
    accounts
        .create(
            &pp,
            &ServiceAccount {
                metadata: meta("cart"),
                ..ServiceAccount::default()
            },
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pod = Pod {
        metadata: meta("cart-1"),
        spec: Some(PodSpec {
            node_name: Some("node-1".to_owned()),
            service_account_name: Some("cart".to_owned()),
            containers: vec![Container {
                name: "cart".to_owned(),
                image: Some("cart:1".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let pod = pods.create(&pp, &pod).await.unwrap();

    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["weft".to_owned()]),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let minted = accounts
        .create_token_request("cart", &pp, &request)
        .await
        .unwrap();
    let token = minted.status.unwrap().token.unwrap();

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: Some(vec!["weft".to_owned()]),
        },
        ..TokenReview::default()
    };
    let status = reviews.create(&pp, &review).await.unwrap().status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(status.audiences, Some(vec!["weft".to_owned()]));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:shop:cart")
    );
    let extra = user.extra.unwrap_or_default();
    eprintln!("TokenReview extra: {extra:#?}");
    assert_eq!(
        extra.get(NODE_NAME_KEY),
        Some(&vec!["node-1".to_owned()]),
        "{extra:?}"
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["cart-1".to_owned()])
    );

    let restarted = std::time::Instant::now();
    tokio::task::block_in_place(|| api.restart_apiserver()).unwrap();
    eprintln!("kube-apiserver ready again after {:?}", restarted.elapsed());
    let client = api.client().await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    assert!(namespaces.get_opt("shop").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kubeconfig_and_the_admin_token_reach_the_server() {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig_path()).unwrap();
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        api.url()
    );
    let client = kube::Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1", "{version:?}");
    assert!(api.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(api.admin_token().len(), 64);
}
