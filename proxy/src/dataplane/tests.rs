#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use weft_api::v1;
use weft_certs::{CertificateRequest, MeshCa};

use super::*;
use crate::node_view::NodeView;

fn full_state(ca: &MeshCa, pod_ip: &str) -> v1::ConfigUpdate {
    v1::ConfigUpdate {
        version: 1,
        full_state: true,
        local_workloads: vec![v1::Workload {
            uid: "shop/web-1".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            pod_uid: "0b6c3e2a-web-1".into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            node: "node-1".into(),
            ips: vec![pod_ip.into()],
            meshed: true,
            ..v1::Workload::default()
        }],
        trust: Some(v1::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: ca.trust_bundle().to_pem(),
        }),
        ..v1::ConfigUpdate::default()
    }
}

/// The view of the pod at 10.244.1.5, and the view after a reconnect:
/// version 1 again, with the pod at 10.244.1.9.
fn view_and_reconnect() -> (NodeView, NodeView) {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let first = NodeView::apply(None, &full_state(&ca, "10.244.1.5"), "node-1")
        .unwrap()
        .view;
    let again = full_state(&ca, "10.244.1.9");
    let second = NodeView::apply(Some(&first), &again, "node-1")
        .unwrap()
        .view;
    (first, second)
}

#[tokio::test]
async fn the_table_follows_a_new_stream_whose_versions_start_over() {
    let (first, second) = view_and_reconnect();
    let (views, receiver) = watch::channel(Some(Arc::new(first)));
    let routes = Routes::follow(receiver);
    let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    assert!(routes.current().local_workload(ip("10.244.1.5")).is_some());

    views.send_replace(Some(Arc::new(second)));
    let table = routes.current();
    assert!(table.local_workload(ip("10.244.1.9")).is_some());
    assert!(table.local_workload(ip("10.244.1.5")).is_none());
}

#[tokio::test]
async fn a_prepared_table_is_the_one_the_data_plane_uses_without_building_again() {
    let (first, second) = view_and_reconnect();
    let (views, receiver) = watch::channel(Some(Arc::new(first.clone())));
    let routes = Routes::follow(receiver);

    // Made on the caller's thread, before the view is published: the
    // table is there already and those who follow tables are told.
    let mut tables = routes.subscribe();
    tables.borrow_and_update();
    routes.preparer()(&second);
    assert!(tables.has_changed().unwrap());
    let prepared = tables.borrow_and_update().clone();
    assert_eq!(prepared.generation, second.generation());
    let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    assert!(prepared.local_workload(ip("10.244.1.9")).is_some());

    // Published: the data plane takes that very table.
    views.send_replace(Some(Arc::new(second.clone())));
    assert!(Arc::ptr_eq(&routes.current(), &prepared));
    // The same view again, or an older one, builds nothing.
    routes.prepare(&second);
    routes.prepare(&first);
    assert!(!tables.has_changed().unwrap());
    assert!(Arc::ptr_eq(&routes.current(), &prepared));
}

#[tokio::test]
async fn a_pod_that_took_a_deleted_pods_address_is_not_that_pod() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    // The config still has web-1 (deleted) at the address.
    let view = NodeView::apply(None, &full_state(&ca, "10.244.1.5"), "node-1")
        .unwrap()
        .view;
    let (_views, receiver) = watch::channel(Some(Arc::new(view)));
    let table = Routes::follow(receiver).current();
    let ip: std::net::IpAddr = "10.244.1.5".parse().unwrap();
    let pod = |uid: &str| ServedPod {
        ips: [ip].into(),
        uid: uid.into(),
        pod_uid: String::new(),
    };

    assert!(pod("shop/web-1").workload(&table, ip).is_some());
    // Known by its addresses alone (found on the node, not announced).
    assert!(pod("").workload(&table, ip).is_some());
    // A new pod at web-1's old address gets nothing of web-1's.
    assert!(pod("shop/web-2").workload(&table, ip).is_none());
    assert!(pod("other/web-1").workload(&table, ip).is_none());
    // A later pod of the same name (a StatefulSet's) is not it either.
    let later = ServedPod {
        pod_uid: "6b3f0c1e-later".into(),
        ..pod("shop/web-1")
    };
    assert!(later.workload(&table, ip).is_none());
    let same = ServedPod {
        pod_uid: "0b6c3e2a-web-1".into(),
        ..pod("shop/web-1")
    };
    assert!(same.workload(&table, ip).is_some());
}

#[test]
fn a_peer_names_only_a_service_that_has_the_addressed_pod_behind_it() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let service = crate::node_view::tests::service;
    let update = v1::ConfigUpdate {
        services: vec![
            service("shop", "web", "10.244.1.5"),
            service("bank", "vault", "10.244.1.77"),
        ],
        ..full_state(&ca, "10.244.1.5")
    };
    let view = NodeView::apply(None, &update, "node-1").unwrap().view;
    let table = routes::RouteTable::new(&view);
    let pod: std::net::SocketAddr = "10.244.1.5:8080".parse().unwrap();
    assert_eq!(
        table
            .service_with_endpoint("web.shop.svc.cluster.local", pod)
            .as_deref(),
        Some("web.shop.svc.cluster.local")
    );
    // Another cluster domain names the same Service.
    assert!(
        table
            .service_with_endpoint("web.shop.svc.east.example", pod)
            .is_some()
    );
    // A port the Service does not lead to is not its traffic.
    let other_port = "10.244.1.5:9090".parse().unwrap();
    assert_eq!(
        table.service_with_endpoint("web.shop.svc.cluster.local", other_port),
        None
    );
    // A Service without this pod, one that does not exist, not a
    // Service hostname at all: none is believed.
    for claim in [
        "vault.bank.svc.cluster.local",
        "nope.shop.svc.cluster.local",
        "web.shop",
        "web.shop.pod.cluster.local",
        "",
    ] {
        assert_eq!(table.service_with_endpoint(claim, pod), None, "{claim}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_waits_a_bounded_time_for_its_certificate() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let (certificates, receiver) = watch::channel(CertificateMap::default());
    let wait = Duration::from_secs(5);

    // None comes: given up after the wait, not before.
    let start = tokio::time::Instant::now();
    assert!(certificates_with(&receiver, &web, wait).await.is_none());
    assert_eq!(start.elapsed(), wait);

    // One comes after a second: the connection goes on with it then.
    let request = CertificateRequest::generate(&web).unwrap();
    let chain = ca
        .sign_csr(request.csr_der(), &web, SystemTime::now())
        .unwrap();
    let certificate = request
        .complete(chain, ca.trust_bundle().clone(), SystemTime::now())
        .unwrap();
    let start = tokio::time::Instant::now();
    let waiting = tokio::spawn({
        let (receiver, web) = (receiver.clone(), web.clone());
        async move { certificates_with(&receiver, &web, wait).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    certificates.send_replace(Arc::new(BTreeMap::from([(web.clone(), certificate)])));
    let map = waiting.await.unwrap().unwrap();
    assert!(map.contains_key(&web));
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}
