//! End to end against a real kube-apiserver: the control plane runs with
//! `--source kubernetes` as its own ServiceAccount (with the RBAC from
//! `deploy/`), node proxies authenticate with projected, pod-bound tokens,
//! and the cluster changes through the API the way users and kubelets
//! change it.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::{Read, Write};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::kube_cluster::{self, apply_objects, write_pod_status};
use weft_testbed::{PodSpec, ServiceSpec, Target, Testbed, WeftMesh, uids};

const DB_ID: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// web-1 on node-1 and db-1 on node-2, both meshed, db behind a Service.
fn cluster() -> Testbed {
    Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(PodSpec {
            node: "node-1",
            namespace: "shop",
            name: "web-1",
            service_account: "web",
            labels: &[("app", "web")],
            meshed: true,
            probe_ports: &[],
        })
        .pod(PodSpec {
            node: "node-2",
            namespace: "shop",
            name: "db-1",
            service_account: "db",
            labels: &[("app", "db")],
            meshed: true,
            probe_ports: &[],
        })
        .service(ServiceSpec {
            namespace: "shop",
            name: "db",
            port: 5432,
            target_port: 5432,
            selector: &[("app", "db")],
        })
        .build()
        .unwrap()
}

/// Blocking testbed calls (they poll) off the async test's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn cache_pod(ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "cache-1", "namespace": "shop", "labels": { "app": "cache" } },
        "spec": {
            "nodeName": "node-2",
            "serviceAccountName": "cache",
            "containers": [{ "name": "c", "image": "x" }],
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn has_workload(uid: &'static str) -> impl Fn(&Value) -> bool {
    move |dump| {
        uids(dump, "local_workloads").contains(uid) || uids(dump, "remote_workloads").contains(uid)
    }
}

fn service_named<'a>(dump: &'a Value, name: &str) -> Option<&'a Value> {
    dump["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// One echo round trip from web-1 to the db Service's VIP.
fn echo_through_the_mesh(testbed: &Testbed) {
    let vip = testbed.service_vip("shop", "db").unwrap();
    let mut stream = testbed
        .connect(Target::Pod("web-1"), (vip, 5432).into())
        .unwrap();
    stream.write_all(b"over kubernetes").unwrap();
    let mut echoed = [0u8; 15];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"over kubernetes");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_services_and_endpoint_slices_changed_through_the_api_reach_the_proxies() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = cluster();
    let server = testbed
        .start_echo_server(Target::Pod("db-1"), 5432)
        .unwrap();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    blocking(|| mesh.wait_for_data_plane(&testbed)).unwrap();

    // The cluster as the API server holds it carries traffic, source IP kept.
    blocking(|| echo_through_the_mesh(&testbed));
    assert_eq!(server.peers()[0].ip(), testbed.pod_ip("web-1").unwrap());

    // Added: a pod created by a user, its IP written by "the kubelet".
    apply_objects(
        &client,
        &[json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": "cache", "namespace": "shop" },
        })],
    )
    .await
    .unwrap();
    let started = Instant::now();
    apply_objects(&client, &[cache_pod("10.244.2.50")])
        .await
        .unwrap();
    write_pod_status(&client, &cache_pod("10.244.2.50"))
        .await
        .unwrap();
    blocking(|| {
        mesh.wait_for_dump(&testbed, "node-2", "cache-1 added", |d| {
            uids(d, "local_workloads").contains("shop/cache-1")
        })?;
        mesh.wait_for_dump(&testbed, "node-1", "cache-1 seen", |d| {
            uids(d, "remote_workloads").contains("shop/cache-1")
        })
    })
    .unwrap();
    eprintln!(
        "pod status write to both proxies applied: {:?}",
        started.elapsed()
    );
    let cache_id = "spiffe://cluster.local/ns/shop/sa/cache";
    blocking(|| {
        weft_testbed::wait_until(weft_testbed::CONFIG_WAIT, || {
            Ok(mesh.cert_identities(&testbed, "node-2").contains(cache_id))
        })
    })
    .unwrap();

    // Changed: a new IP.
    write_pod_status(&client, &cache_pod("10.244.2.51"))
        .await
        .unwrap();
    blocking(|| {
        mesh.wait_for_dump(&testbed, "node-1", "cache-1's new IP", |d| {
            d["remote_workloads"].as_array().is_some_and(|ws| {
                ws.iter()
                    .any(|w| w["uid"] == "shop/cache-1" && w["ips"][0] == "10.244.2.51")
            })
        })
    })
    .unwrap();

    // A Service and its EndpointSlice appear, change and go.
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "cache", "namespace": "shop" },
        "spec": {
            "clusterIP": "10.96.1.50",
            "selector": { "app": "cache" },
            "ports": [{ "protocol": "TCP", "port": 6379, "targetPort": 6379 }],
        },
    });
    let slice = |addresses: &[&str]| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "cache-1", "namespace": "shop",
                "labels": { "kubernetes.io/service-name": "cache" },
            },
            "addressType": "IPv4",
            "endpoints": addresses.iter().map(|a| json!({
                "addresses": [a],
                "conditions": { "ready": true },
                "nodeName": "node-2",
            })).collect::<Vec<_>>(),
            "ports": [{ "name": "", "protocol": "TCP", "port": 6379 }],
        })
    };
    apply_objects(&client, &[service, slice(&["10.244.2.51"])])
        .await
        .unwrap();
    blocking(|| {
        mesh.wait_for_dump(&testbed, "node-1", "Service cache added", |d| {
            service_named(d, "cache").is_some_and(|s| {
                s["vips"][0] == "10.96.1.50"
                    && s["endpoints"].as_array().is_some_and(|e| e.len() == 1)
            })
        })
    })
    .unwrap();
    apply_objects(&client, &[slice(&["10.244.2.51", "10.244.2.52"])])
        .await
        .unwrap();
    blocking(|| {
        mesh.wait_for_dump(&testbed, "node-1", "a second endpoint", |d| {
            service_named(d, "cache")
                .is_some_and(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 2))
        })
    })
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .delete("cache-1", &DeleteParams::default())
        .await
        .unwrap();
    Api::<Service>::namespaced(client.clone(), "shop")
        .delete("cache", &DeleteParams::default())
        .await
        .unwrap();
    blocking(|| {
        mesh.wait_for_dump(&testbed, "node-1", "Service cache removed", |d| {
            service_named(d, "cache").is_none()
        })
    })
    .unwrap();

    // Deleted: the pod leaves both proxies, and node-2 its certificate.
    Api::<Pod>::namespaced(client.clone(), "shop")
        .delete("cache-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    blocking(|| {
        for node in ["node-1", "node-2"] {
            mesh.wait_for_dump(&testbed, node, "cache-1 removed", |d| {
                !has_workload("shop/cache-1")(d)
            })?;
        }
        weft_testbed::wait_until(weft_testbed::CONFIG_WAIT, || {
            Ok(!mesh.cert_identities(&testbed, "node-2").contains(cache_id))
        })
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_api_server_loses_nothing() {
    let mut api = blocking(KubeApiServer::start).unwrap();
    let testbed = cluster();
    let _server = testbed
        .start_echo_server(Target::Pod("db-1"), 5432)
        .unwrap();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    blocking(|| mesh.wait_for_data_plane(&testbed)).unwrap();
    let before: Vec<Value> = ["node-1", "node-2"]
        .iter()
        .map(|node| mesh.config_dump(&testbed, node).unwrap())
        .collect();

    blocking(|| api.restart_apiserver()).unwrap();

    // The watches resumed without a gap: nothing lost, nothing doubled, and
    // traffic never depended on the API server.
    for (node, before) in ["node-1", "node-2"].iter().zip(&before) {
        let after = mesh.config_dump(&testbed, node).unwrap();
        for list in ["local_workloads", "remote_workloads", "services"] {
            assert_eq!(after[list], before[list], "{node} {list} after the restart");
        }
    }
    blocking(|| echo_through_the_mesh(&testbed));

    // A change after the restart arrives: the watches are live again.
    let client = api.client().await.unwrap();
    apply_objects(
        &client,
        &[
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": { "name": "cache", "namespace": "shop" },
            }),
            cache_pod("10.244.2.50"),
        ],
    )
    .await
    .unwrap();
    write_pod_status(&client, &cache_pod("10.244.2.50"))
        .await
        .unwrap();
    blocking(|| {
        mesh.wait_for_dump(&testbed, "node-1", "a pod added after the restart", |d| {
            uids(d, "remote_workloads").contains("shop/cache-1")
        })?;
        // Its own node hears of it in its own time.
        mesh.wait_for_dump(&testbed, "node-2", "a pod added after the restart", |d| {
            uids(d, "local_workloads").contains("shop/cache-1")
        })
    })
    .unwrap();
    for (node, before) in ["node-1", "node-2"].iter().zip(&before) {
        let after = mesh.config_dump(&testbed, node).unwrap();
        let listed = uids(&after, "local_workloads").len() + uids(&after, "remote_workloads").len();
        let was = uids(before, "local_workloads").len() + uids(before, "remote_workloads").len();
        assert_eq!(listed, was + 1, "{node}: exactly one workload more");
    }
}

/// Sign as `token` from `node`, asking for `identity`.
async fn sign_from(
    testbed: &Testbed,
    mesh: &WeftMesh,
    node: &str,
    token: &str,
    identity: &str,
) -> Result<weft_api::v1::SignResponse, tonic::Status> {
    let roots = weft_certs::TrustBundle::from_pem(&mesh.roots_pem().unwrap()).unwrap();
    let socket = testbed
        .connect(
            Target::Node(node),
            mesh.control_plane_addr(testbed).unwrap(),
        )
        .unwrap();
    let identity = weft_certs::Identity::parse(identity).unwrap();
    weft_testbed::sign_over(socket, roots, token, &identity)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn node_credentials_cannot_mint_another_nodes_identities() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = cluster();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    blocking(|| mesh.wait_for_data_plane(&testbed)).unwrap();

    // The real proxy of node-2 may have db's identity ...
    let node_2 = mesh.token("node-2").unwrap().to_owned();
    assert!(
        sign_from(&testbed, &mesh, "node-2", &node_2, DB_ID)
            .await
            .is_ok()
    );

    // ... node-1's may not, even though its token is perfectly valid.
    let node_1 = mesh.token("node-1").unwrap().to_owned();
    let status = sign_from(&testbed, &mesh, "node-1", &node_1, DB_ID)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node node-1"),
        "{}",
        status.message()
    );

    // A workload on node-2 gets a token for our audience, bound to its own
    // pod: it is not the node proxy, so it is no node at all.
    let db_pod = Api::<Pod>::namespaced(client.clone(), "shop")
        .get("db-1")
        .await
        .unwrap();
    let workload_token = kube_cluster::service_account_token(
        &client,
        "shop",
        "db",
        &[kube_cluster::TOKEN_AUDIENCE],
        Some(&db_pod),
    )
    .await
    .unwrap();
    let status = sign_from(&testbed, &mesh, "node-2", &workload_token, DB_ID)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("system:serviceaccount:shop:db"),
        "{}",
        status.message()
    );

    // The proxy's ServiceAccount, but a token for another audience (e.g. one
    // leaked from the API server's own audience) ...
    let proxy_pod = Api::<Pod>::namespaced(client.clone(), kube_cluster::WEFT_NAMESPACE)
        .get("weft-node-proxy-node-2")
        .await
        .unwrap();
    let wrong_audience = kube_cluster::service_account_token(
        &client,
        kube_cluster::WEFT_NAMESPACE,
        "weft-node-proxy",
        &["some-other-service"],
        Some(&proxy_pod),
    )
    .await
    .unwrap();
    let status = sign_from(&testbed, &mesh, "node-2", &wrong_audience, DB_ID)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // ... or one bound to no pod, which names no node.
    let unbound = kube_cluster::service_account_token(
        &client,
        kube_cluster::WEFT_NAMESPACE,
        "weft-node-proxy",
        &[kube_cluster::TOKEN_AUDIENCE],
        None,
    )
    .await
    .unwrap();
    let status = sign_from(&testbed, &mesh, "node-2", &unbound, DB_ID)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("bound to a pod"),
        "{}",
        status.message()
    );

    // A token whose pod is gone is dead, even before it expires.
    let gone = kube_cluster::create_pod(
        &client,
        kube_cluster::WEFT_NAMESPACE,
        "weft-node-proxy-gone",
        "weft-node-proxy",
        "node-1",
    )
    .await
    .unwrap();
    let orphaned = kube_cluster::service_account_token(
        &client,
        kube_cluster::WEFT_NAMESPACE,
        "weft-node-proxy",
        &[kube_cluster::TOKEN_AUDIENCE],
        Some(&gone),
    )
    .await
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), kube_cluster::WEFT_NAMESPACE)
        .delete(
            "weft-node-proxy-gone",
            &DeleteParams::default().grace_period(0),
        )
        .await
        .unwrap();
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let status = sign_from(&testbed, &mesh, "node-1", &orphaned, web_id)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_ca_and_serve_independently() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    let testbed = cluster();
    let mesh = WeftMesh::start_on_kubernetes(&testbed, &api).await.unwrap();
    blocking(|| mesh.wait_for_data_plane(&testbed)).unwrap();
    let secret_before = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
        client.clone(),
        kube_cluster::WEFT_NAMESPACE,
    )
    .get("weft-ca")
    .await
    .unwrap();

    // A second replica on node-2 loads the same CA and serves on its own:
    // node-2's proxy credentials get db's certificate from it, over a TLS
    // session that the first replica's roots verify.
    let replica = blocking(|| mesh.start_replica(&testbed, "node-2", &api)).unwrap();
    let second = std::net::SocketAddr::from((
        testbed.node_ip("node-2").unwrap(),
        weft_testbed::CONTROL_PLANE_GRPC_PORT,
    ));
    let roots = weft_certs::TrustBundle::from_pem(&mesh.roots_pem().unwrap()).unwrap();
    let socket = testbed.connect(Target::Node("node-2"), second).unwrap();
    let token = mesh.token("node-2").unwrap().to_owned();
    let db = weft_certs::Identity::parse(DB_ID).unwrap();
    let signed = weft_testbed::sign_over(socket, roots.clone(), &token, &db)
        .await
        .unwrap()
        .unwrap();
    let leaf = rustls_pki_types::CertificateDer::from(signed.chain_der[0].clone());
    assert_eq!(
        roots
            .verify(
                &leaf,
                &[],
                weft_certs::Usage::Client,
                std::time::SystemTime::now()
            )
            .unwrap(),
        db
    );
    assert!(replica.process.is_running());

    // Neither replica replaced the CA.
    let secret_after = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
        client.clone(),
        kube_cluster::WEFT_NAMESPACE,
    )
    .get("weft-ca")
    .await
    .unwrap();
    assert_eq!(
        secret_after.metadata.resource_version,
        secret_before.metadata.resource_version
    );
    assert_eq!(secret_after.data, secret_before.data);
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_racing_to_create_the_ca_end_up_with_one() {
    let api = blocking(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    apply_objects(
        &client,
        &[json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "weft-system" },
        })],
    )
    .await
    .unwrap();
    let race = |client: kube::Client| async move {
        weft_control_plane::kubernetes::load_or_create_ca(
            &client,
            "weft-system",
            "weft-ca",
            "cluster.local",
        )
        .await
        .unwrap()
    };
    let cas = futures::future::join_all((0..4).map(|_| race(client.clone()))).await;
    let roots: Vec<String> = cas.iter().map(|ca| ca.trust_bundle().to_pem()).collect();
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "one root for all: {roots:?}"
    );
    // And a later start loads it rather than making another.
    let later = race(client.clone()).await;
    assert_eq!(later.trust_bundle().to_pem(), roots[0]);
}
