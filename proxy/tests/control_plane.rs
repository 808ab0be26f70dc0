//! The proxy against a real (test) control plane over TLS on loopback: the
//! config stream, its acknowledgements and reconnects, certificates, and
//! what the admin endpoint shows of it all.

mod support;

use std::time::SystemTime;

use support::*;
use weft_api::v1::proxy_message::Kind;
use weft_api::v1::{Ack, Nack};
use weft_certs::{Identity, MeshCa, SigningPolicy};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_names_the_node_with_the_token_and_a_good_update_is_acked() {
    let mut cp = TestControlPlane::start().await;
    let (proxy, _files) = start_proxy(&cp).await;

    let mut stream = cp.next_stream().await;
    assert_eq!(stream.hello.node, NODE);
    assert_eq!(stream.hello.proxy_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        stream.token.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    let local = vec![workload("default", "web", "web", NODE, "10.0.1.5", true)];
    let remote = vec![workload("shop", "cart", "cart", "node-2", "10.0.2.7", true)];
    stream.send(full_state(&cp, 1, local, remote)).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));
    wait_for("version 1 to be applied", &proxy.view(), |v| {
        v.as_ref().is_some_and(|v| v.version() == 1)
    })
    .await;

    let dump = admin_json(proxy.admin_addr(), "/config_dump").await;
    assert_eq!(dump["applied_version"], 1);
    assert_eq!(dump["control_plane"]["connected"], true);
    assert_eq!(dump["proxy"]["node"], NODE);
    assert_eq!(dump["trust"]["trust_domain"], "cluster.local");
    assert_eq!(dump["trust"]["roots"], 1);
    assert_eq!(dump["local_workloads"][0]["uid"], "default/web");
    assert_eq!(dump["local_workloads"][0]["identity"], WEB);
    assert_eq!(dump["local_workloads"][0]["ips"][0], "10.0.1.5");
    assert_eq!(dump["remote_workloads"][0]["node"], "node-2");
    assert_eq!(dump["last_nack"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_is_refused_alone_and_the_rest_flows_on() {
    let mut cp = TestControlPlane::start().await;
    let (proxy, _files) = start_proxy(&cp).await;
    let mut stream = cp.next_stream().await;
    let local = vec![workload("default", "web", "web", NODE, "10.0.1.5", true)];
    stream.send(full_state(&cp, 1, local, vec![])).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));

    // A delta that removes web, adds db, and adds a pod with a broken
    // identity: only the broken pod is refused.
    let mut bad = delta(2);
    bad.removed_local_workloads = vec!["default/web".into()];
    let mut broken = workload("default", "api", "api", NODE, "10.0.1.6", true);
    broken.identity = "spiffe://cluster.local/namespace/default/sa/api".into();
    let db = workload("default", "db", "db", NODE, "10.0.1.7", true);
    bad.local_workloads = vec![broken, db];
    stream.send(bad).await;
    let Kind::Nack(Nack {
        version,
        reason,
        applied,
    }) = stream.reply().await
    else {
        panic!("expected a Nack");
    };
    assert_eq!(version, 2);
    assert!(applied, "the rest of the update is applied");
    assert!(
        reason.starts_with(
            "local workload default/api: identity \
             \"spiffe://cluster.local/namespace/default/sa/api\": "
        ),
        "{reason}"
    );
    wait_for("the Nack to be recorded", &proxy.status(), |s| {
        s.last_nack.as_ref().is_some_and(|n| n.version == 2)
    })
    .await;
    let view = proxy.view().borrow().clone().unwrap();
    assert_eq!(view.version(), 2);
    let uids: Vec<_> = view
        .local_workloads()
        .keys()
        .map(|uid| uid.to_string())
        .collect();
    assert_eq!(uids, ["default/db"]);
    let dump = admin_json(proxy.admin_addr(), "/config_dump").await;
    assert_eq!(dump["applied_version"], 2);
    assert_eq!(dump["last_nack"]["version"], 2);
    assert_eq!(dump["last_nack"]["reason"], reason.as_str());

    // The control plane's next delta builds on version 2, which the proxy
    // holds: it follows on.
    let mut next = delta(3);
    next.local_workloads = vec![workload("default", "api", "api", NODE, "10.0.1.6", true)];
    stream.send(next).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 3 }));
    let view = proxy.view().borrow().clone().unwrap();
    let uids: Vec<_> = view
        .local_workloads()
        .keys()
        .map(|uid| uid.to_string())
        .collect();
    assert_eq!(uids, ["default/api", "default/db"]);

    // A delta that skips a version cannot be followed: the proxy says so,
    // keeps what it has and comes back for a full state on a new stream.
    stream.send(delta(5)).await;
    let Kind::Nack(Nack {
        version,
        reason,
        applied,
    }) = stream.reply().await
    else {
        panic!("expected a Nack");
    };
    assert_eq!((version, applied), (5, false));
    assert_eq!(
        reason,
        "delta version 5 does not follow the applied version 3"
    );
    let mut stream = cp.next_stream().await;
    assert_eq!(proxy.view().borrow().as_ref().map(|v| v.version()), Some(3));
    let local = vec![workload("default", "api", "api", NODE, "10.0.1.6", true)];
    stream.send(full_state(&cp, 6, local, vec![])).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 6 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_stream_drops_the_proxy_reconnects_and_gets_a_full_state() {
    let mut cp = TestControlPlane::start().await;
    let (proxy, files) = start_proxy(&cp).await;
    let mut stream = cp.next_stream().await;
    let local = vec![workload("default", "web", "web", NODE, "10.0.1.5", true)];
    stream.send(full_state(&cp, 1, local, vec![])).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));
    let mut next = delta(2);
    next.local_workloads = vec![workload("default", "db", "db", NODE, "10.0.1.6", false)];
    stream.send(next).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 2 }));

    // The token is rotated, then the control plane goes away.
    files.rotate_token("rotated-token");
    stream.drop_stream();

    let mut stream = cp.next_stream().await;
    assert_eq!(stream.hello.node, NODE);
    assert_eq!(stream.token.as_deref(), Some("Bearer rotated-token"));
    // Disconnected, the proxy kept serving what it had.
    assert_eq!(proxy.view().borrow().as_ref().map(|v| v.version()), Some(2));

    // A restarted control plane counts from 1 again; a full state is
    // accepted at any version and replaces everything.
    let local = vec![workload(
        "default", "cache", "cache", NODE, "10.0.1.7", true,
    )];
    stream.send(full_state(&cp, 1, local, vec![])).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));
    wait_for("the new full state", &proxy.view(), |v| {
        v.as_ref().is_some_and(|v| {
            v.local_workloads()
                .keys()
                .map(|uid| uid.to_string())
                .eq(["default/cache"])
        })
    })
    .await;
    wait_for("the proxy to be connected", &proxy.status(), |s| {
        s.connected && s.streams_opened == 2
    })
    .await;
    let dump = admin_json(proxy.admin_addr(), "/config_dump").await;
    assert_eq!(dump["control_plane"]["streams_opened"], 2);
    let last_error = dump["control_plane"]["last_error"].as_str().unwrap();
    assert!(last_error.contains("ended the stream"), "{last_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_obtained_for_local_meshed_identities_only() {
    let mut cp = TestControlPlane::start().await;
    let denied = "spiffe://cluster.local/ns/default/sa/denied";
    cp.deny(denied);
    let (proxy, _files) = start_proxy(&cp).await;
    let mut stream = cp.next_stream().await;
    let local = vec![
        workload("default", "web-0", "web", NODE, "10.0.1.5", true),
        workload("default", "web-1", "web", NODE, "10.0.1.6", true),
        workload("default", "db", "db", NODE, "10.0.1.7", false),
        workload("default", "denied", "denied", NODE, "10.0.1.8", true),
        workload("default", "api", "api", NODE, "10.0.1.9", true),
    ];
    let remote = vec![workload("shop", "cart", "cart", "node-2", "10.0.2.7", true)];
    stream.send(full_state(&cp, 1, local, remote)).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));

    let certificates = proxy.certificates();
    wait_for("certificates for web and api", &certificates, |certs| {
        certs.len() == 2
    })
    .await;
    // The refused identity is asked for again, with backoff.
    eventually("a retry for the denied identity", || {
        cp.sign_calls_for(denied) >= 2
    })
    .await;
    // All signing on one connection beside the config stream's: a node
    // starting many pods must not dial once per certificate.
    assert_eq!(cp.connections(), 2);
    // Two pods of one ServiceAccount share one certificate; unmeshed and
    // remote pods get none; every call carries the node's token.
    assert_eq!(cp.sign_calls_for(WEB), 1);
    assert_eq!(cp.sign_calls_for(DB), 0);
    assert_eq!(cp.sign_calls_for(CART), 0);
    assert!(
        cp.sign_calls()
            .iter()
            .all(|call| call.token.as_deref() == Some(format!("Bearer {TOKEN}").as_str()))
    );
    let held: Vec<String> = certificates
        .borrow()
        .keys()
        .map(ToString::to_string)
        .collect();
    let api = "spiffe://cluster.local/ns/default/sa/api";
    assert_eq!(held, [api, WEB]);
    let cert = certificates.borrow()[&Identity::parse(WEB).unwrap()].clone();
    assert!(!cert.is_expired(SystemTime::now()));
    assert_eq!(cert.trust().roots(), cp.ca.trust_bundle().roots());
    // The control plane's dashboard learns them from the traffic reports.
    let not_after = cert
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    loop {
        let report = stream.report().await;
        if report.certificates.len() < 2 {
            continue; // an earlier report, sent as the first came
        }
        let reported: Vec<(&str, i64)> = report
            .certificates
            .iter()
            .map(|c| (c.identity.as_str(), c.not_after))
            .collect();
        assert_eq!(reported.len(), 2, "{reported:?}");
        assert!(reported.contains(&(WEB, not_after)), "{reported:?}");
        assert!(reported.iter().any(|(id, _)| *id == api), "{reported:?}");
        break;
    }

    let listed = admin_json(proxy.admin_addr(), "/certs").await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let web = listed.iter().find(|c| c["identity"] == WEB).unwrap();
    assert_eq!(web["chain_len"], 1);
    assert!(web["seconds_until_expiry"].as_i64().unwrap() > 3600);
    for field in ["not_before", "not_after", "renew_at"] {
        let text = web[field].as_str().unwrap();
        assert!(text.ends_with('Z') && text.contains('T'), "{field}: {text}");
    }

    // When the last web pod leaves the node, its certificate goes.
    let mut update = delta(2);
    update.removed_local_workloads = vec!["default/web-0".into(), "default/web-1".into()];
    stream.send(update).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 2 }));
    wait_for(
        "the web certificate to be dropped",
        &certificates,
        |certs| certs.len() == 1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_renewed_before_it_expires() {
    // Four-second certificates: renewal is due about two seconds in.
    let policy = SigningPolicy {
        lifetime: std::time::Duration::from_secs(4),
        backdate: std::time::Duration::ZERO,
    };
    let mut cp = TestControlPlane::start_with_policy(policy).await;
    let (proxy, _files) = start_proxy(&cp).await;
    let mut stream = cp.next_stream().await;
    let local = vec![workload("default", "web", "web", NODE, "10.0.1.5", true)];
    stream.send(full_state(&cp, 1, local, vec![])).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));

    let certificates = proxy.certificates();
    wait_for("a first certificate", &certificates, |certs| {
        !certs.is_empty()
    })
    .await;
    let first = certificates.borrow().values().next().unwrap().clone();
    wait_for("a renewed certificate", &certificates, |certs| {
        certs
            .values()
            .next()
            .is_some_and(|cert| cert.chain() != first.chain())
    })
    .await;
    assert!(cp.sign_calls_for(WEB) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_proving_another_identity_is_refused() {
    let ca = MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
    let mut impostor =
        TestControlPlane::start_with(ca, "spiffe://cluster.local/ns/weft-system/sa/impostor").await;
    let (proxy, _files) = start_proxy(&impostor).await;

    wait_for("the proxy to refuse the server", &proxy.status(), |s| {
        s.last_error.as_deref().is_some_and(|e| {
            e.contains(
                "expected spiffe://cluster.local/ns/weft-system/sa/weft-control-plane, \
                 the peer is spiffe://cluster.local/ns/weft-system/sa/impostor",
            )
        })
    })
    .await;
    let status = proxy.status().borrow().clone();
    assert!(!status.connected);
    assert_eq!(status.streams_opened, 0);
    assert!(!impostor.has_pending_stream());
    assert!(proxy.view().borrow().is_none());
    let dump = admin_json(proxy.admin_addr(), "/config_dump").await;
    assert_eq!(dump["applied_version"], serde_json::Value::Null);
    assert_eq!(dump["control_plane"]["connected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_answers_health_and_refuses_the_rest() {
    let cp = TestControlPlane::start().await;
    let (proxy, _files) = start_proxy(&cp).await;
    let addr = proxy.admin_addr();
    assert!(addr.ip().is_loopback());
    assert_eq!(admin_get(addr, "GET", "/healthz").await, (200, "ok".into()));
    assert_eq!(admin_get(addr, "GET", "/nope").await.0, 404);
    assert_eq!(admin_get(addr, "POST", "/config_dump").await.0, 403);
    assert_eq!(admin_json(addr, "/certs").await, serde_json::json!([]));
    let dump = admin_json(addr, "/config_dump").await;
    assert_eq!(dump["proxy"]["control_plane"], cp.addr.to_string());
    assert_eq!(
        dump["proxy"]["control_plane_identity"],
        "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane"
    );
    assert_eq!(dump["local_workloads"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_larger_than_four_mebibytes_is_delivered_and_applied() {
    let mut cp = TestControlPlane::start().await;
    let (proxy, _files) = start_proxy(&cp).await;
    let mut stream = cp.next_stream().await;
    // 40,000 pods on other nodes: a cluster of over 1,000 nodes.
    let remote: Vec<_> = (0..40_000u32)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", 64 + i / 65_536, (i / 256) % 256, i % 256);
            workload("shop", &format!("pod-{i}"), "cart", "node-2", &ip, true)
        })
        .collect();
    let update = full_state(&cp, 1, vec![], remote);
    let bytes = prost::Message::encoded_len(&update);
    assert!(bytes > 4 * 1024 * 1024, "only {bytes} bytes");
    stream.send(update).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));
    let view = proxy.view().borrow().clone().unwrap();
    assert_eq!(view.remote_workloads().len(), 40_000);
}

/// `update` in parts of about `bytes`, as the control plane sends them.
fn in_parts(update: &weft_api::v1::ConfigUpdate, bytes: usize) -> Vec<weft_api::v1::ConfigUpdate> {
    weft_api::parts::split(update, bytes)
        .iter()
        .map(|part| prost::Message::decode(part.bytes().clone()).expect("a part decodes"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_parts_is_applied_once_whole_and_a_stray_part_restarts_the_stream() {
    let mut cp = TestControlPlane::start().await;
    let (proxy, _files) = start_proxy(&cp).await;
    let mut stream = cp.next_stream().await;
    assert!(stream.hello.accepts_parts);
    let pod = |i: u32| {
        let ip = format!("10.64.{}.{}", i / 256, i % 256);
        workload("shop", &format!("pod-{i}"), "cart", "node-2", &ip, true)
    };
    let local = vec![workload("default", "web", "web", NODE, "10.0.1.5", true)];
    let full = full_state(&cp, 1, local, (0..2_000).map(pod).collect());
    let parts = in_parts(&full, 8 * 1024);
    assert!(parts.len() > 10, "{} parts", parts.len());
    for part in parts {
        stream.send(part).await;
    }
    // One Ack, for the whole: had a part been applied alone as a full
    // state, the parts after it would have replaced it.
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));
    let view = proxy.view().borrow().clone().unwrap();
    assert_eq!(view.remote_workloads().len(), 2_000);
    assert_eq!(view.local_workloads().len(), 1);

    // A delta in parts, whole: applied once.
    let delta = weft_api::v1::ConfigUpdate {
        version: 2,
        remote_workloads: (2_000..2_300).map(pod).collect(),
        removed_remote_workloads: (0..300).map(|i| format!("shop/pod-{i}")).collect(),
        ..Default::default()
    };
    let parts = in_parts(&delta, 2 * 1024);
    assert!(parts.len() > 3);
    for part in parts {
        stream.send(part).await;
    }
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 2 }));
    let view = proxy.view().borrow().clone().unwrap();
    assert_eq!(view.remote_workloads().len(), 2_000);
    assert!(
        view.remote_workloads()
            .keys()
            .any(|uid| *uid == "shop/pod-2299")
    );

    // A part that does not continue the update before it: nothing of the
    // update is applied, and the proxy asks for a new stream.
    let delta = weft_api::v1::ConfigUpdate {
        version: 3,
        removed_remote_workloads: (300..600).map(|i| format!("shop/pod-{i}")).collect(),
        ..Default::default()
    };
    let mut parts = in_parts(&delta, 1024);
    parts[1].version = 4;
    for part in parts.into_iter().take(2) {
        stream.send(part).await;
    }
    let again = cp.next_stream().await;
    assert!(again.hello.accepts_parts);
    let view = proxy.view().borrow().clone().unwrap();
    assert_eq!(view.version(), 2);
    assert_eq!(view.remote_workloads().len(), 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_serves_its_last_config_and_certificates_without_the_control_plane() {
    let mut cp = TestControlPlane::start().await;
    let files = ProxyFiles::new(&cp);
    let state_dir = files.dir.path().join("state");
    let mut config = files.config(&cp);
    config.state_dir = Some(state_dir.clone());
    config.state_write_interval_ms = 10;
    init_logging();
    let proxy = weft_proxy::NodeProxy::start(config.clone()).await.unwrap();
    let mut stream = cp.next_stream().await;
    let local = vec![workload("default", "web", "web", NODE, "10.0.1.5", true)];
    stream.send(full_state(&cp, 1, local, vec![])).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 1 }));
    let mut added = delta(2);
    added
        .local_workloads
        .push(workload("default", "db", "db", NODE, "10.0.1.7", true));
    stream.send(added).await;
    assert_eq!(stream.reply().await, Kind::Ack(Ack { version: 2 }));
    wait_for("certificates for web and db", &proxy.certificates(), |c| {
        c.len() == 2
    })
    .await;
    let state = weft_proxy::NodeState::open(&state_dir).unwrap();
    eventually("version 2 stored on the node", || {
        state
            .load_config(1 << 20)
            .ok()
            .flatten()
            .is_some_and(|stored| stored.version == 2)
    })
    .await;
    let before = proxy.certificates().borrow().clone();
    proxy.shutdown().await;

    // The control plane is gone; the proxy starts again on the same node.
    drop(stream);
    drop(cp);
    let proxy = weft_proxy::NodeProxy::start(config).await.unwrap();
    let view = proxy
        .view()
        .borrow()
        .clone()
        .expect("a view restored at start");
    assert_eq!(view.version(), 2);
    let uids: Vec<_> = view
        .local_workloads()
        .keys()
        .map(|uid| uid.to_string())
        .collect();
    assert_eq!(uids, ["default/db", "default/web"]);
    let restored = proxy.certificates().borrow().clone();
    assert_eq!(restored.len(), 2);
    for (identity, certificate) in before.iter() {
        assert_eq!(
            restored[identity].chain(),
            certificate.chain(),
            "{identity}"
        );
    }
    assert!(!proxy.status().borrow().connected);
    let dump = admin_json(proxy.admin_addr(), "/config_dump").await;
    assert_eq!(dump["applied_version"], 2);
}
