//! The entries' layout: what converts back to the wire, and what many
//! entries share.

use std::sync::Arc;

use weft_api::v1;

use super::tests::{NODE, applied, full, service, workload};
use super::*;

#[test]
fn a_workload_goes_back_to_the_wire_form_that_converts_to_it_again() {
    let full = v1::Workload {
        uid: "shop/web-1".into(),
        pod_uid: "0b6c3e2a-web-1".into(),
        workload_name: "web".into(),
        ips: vec!["10.244.1.5".into(), "fd00::5".into()],
        authorization_policies: vec!["shop/allow-web".into()],
        invalid_authorization_policies: vec!["shop/broken".into()],
        quarantine: "another pod claims 10.244.1.5".into(),
        mtls_mode: v1::MtlsMode::Strict.into(),
        mtls_policy: "shop/strict".into(),
        probe_ports: vec![8080, 9090],
        ..workload("shop", "web-1", "web", "10.244.1.5", true)
    };
    // And an older control plane's, without a workload name or anything
    // else it may leave out.
    let sparse = v1::Workload {
        workload_name: String::new(),
        labels: Default::default(),
        namespace: String::new(),
        service_account: String::new(),
        node: String::new(),
        ..workload("shop", "web-2", "web", "10.244.1.6", false)
    };
    // A uid that does not follow `<namespace>/<name>`, sent without a name
    // (as a remote pod is): taken as sent, and it must survive the trip.
    let odd_uid = v1::Workload {
        uid: "elsewhere/web-3".into(),
        name: String::new(),
        namespace: String::new(),
        ..workload("shop", "web-3", "web", "10.244.1.7", true)
    };
    for wire in [full, sparse, odd_uid] {
        let (key, workload) =
            convert::workload(EntryKind::LocalWorkload, &wire, Some(NODE)).unwrap();
        let again = workload.to_wire();
        let (key_again, converted_again) =
            convert::workload(EntryKind::LocalWorkload, &again, Some(NODE)).unwrap();
        assert_eq!((key_again, converted_again), (key, workload));
    }
}

#[test]
fn a_service_goes_back_to_the_wire_form_that_converts_to_it_again() {
    let mut full = service("shop", "checkout", "10.244.1.5");
    full.vips.push("fd00::10".into());
    full.ports.push(v1::ServicePort {
        name: "admin".into(),
        port: 9000,
        target_port: 0,
    });
    full.endpoints.push(v1::Endpoint {
        workload_uid: String::new(),
        ip: "fd00::5".into(),
        ready: false,
        ports: [("http".to_owned(), 8080), ("admin".to_owned(), 9001)].into(),
    });
    full.traffic_policy = Some(v1::TrafficPolicy {
        policy: "shop/checkout".into(),
        mode: v1::LoadBalancing::PowerOfTwoChoices.into(),
        connect_timeout_ms: 250,
        retry_attempts: 1,
        ..Default::default()
    });
    for wire in [full, service("shop", "plain", "10.244.1.6")] {
        let (key, service) = convert::service(&wire).unwrap();
        let again = service.to_wire();
        assert_eq!(again, wire, "every field survives");
        let (key_again, converted_again) = convert::service(&again).unwrap();
        assert_eq!((key_again, converted_again), (key, service));
    }
}

/// A node holds every pod of the cluster: what many of them have alike is
/// held once, and a uid is one string wherever the view refers to it.
#[test]
fn remote_workloads_and_endpoints_share_what_they_have_alike() {
    let mut update = full(1);
    update.remote_workloads = (0..3)
        .map(|n| v1::Workload {
            node: "node-2".into(),
            workload_name: "cart".into(),
            labels: Default::default(),
            // An older control plane sends it for remote pods too.
            pod_uid: format!("0b6c3e2a-cart-{n}"),
            ..workload(
                "shop",
                &format!("cart-{n}"),
                "cart",
                &format!("10.0.2.{n}"),
                true,
            )
        })
        .collect();
    let mut cart = service("shop", "cart", "10.0.2.0");
    cart.endpoints = (0..3)
        .map(|n| v1::Endpoint {
            workload_uid: format!("shop/cart-{n}"),
            ip: format!("10.0.2.{n}"),
            ready: true,
            ports: [("http".to_owned(), 8080)].into(),
        })
        .collect();
    update.services.push(cart);
    let view = applied(&update);
    let remote: Vec<&Arc<Workload>> = view.remote_workloads().values().collect();
    assert!(
        remote
            .windows(2)
            .all(|pair| std::ptr::eq(pair[0].local(), pair[1].local())),
        "remote workloads share one empty set of local details"
    );
    assert!(
        remote
            .windows(2)
            .all(|pair| std::ptr::eq(pair[0].identity(), pair[1].identity())
                && std::ptr::eq(pair[0].node(), pair[1].node())),
        "the pods of one workload share one profile, and one node name"
    );
    let local = &view.local_workloads()["default/web"];
    assert!(!std::ptr::eq(local.local(), remote[0].local()));
    assert_eq!(local.local().labels["app"], "web");
    let endpoints = &view.services()["shop/cart"].endpoints;
    for endpoint in endpoints {
        let uid = endpoint.workload_uid.as_ref().unwrap();
        let (key, workload) = view.remote_workloads().get_by_key(uid).unwrap();
        assert_eq!(uid, key, "the endpoint's uid is the view's key");
        assert!(
            uid.shares_stem(&workload.uid),
            "and shares its stem with the workload's own"
        );
        assert!(Arc::ptr_eq(&endpoint.ports, &endpoints[0].ports));
    }
    let (cart, web) = (
        &view.services()["shop/cart"],
        &view.services()["default/web"],
    );
    assert!(
        Arc::ptr_eq(&cart.ports, &web.ports),
        "Services with the same ports share one list"
    );
}

/// The pod's name is read from its uid: a workload whose name says
/// otherwise is refused, not shown under a name it does not have.
#[test]
fn a_workload_named_unlike_its_uid_is_refused() {
    let mut wire = workload("shop", "web-1", "web", "10.244.1.5", true);
    assert_eq!(
        convert::workload(EntryKind::LocalWorkload, &wire, Some(NODE))
            .unwrap()
            .1
            .name(),
        "web-1"
    );
    wire.name = "web-2".into();
    let refused = convert::workload(EntryKind::LocalWorkload, &wire, Some(NODE)).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "local workload shop/web-1: uid is not <namespace>/<name> (shop/web-2)"
    );
    // The remote form leaves the name out: the uid's stands.
    wire.name = String::new();
    let (_, remote) = convert::workload(EntryKind::RemoteWorkload, &wire, None).unwrap();
    assert_eq!(
        (remote.name().as_str(), remote.namespace()),
        ("web-1", "shop")
    );
}
