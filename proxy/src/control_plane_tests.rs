#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::sync::Mutex;

use clap::Parser as _;
use weft_api::v1;

use super::*;
use crate::ProxyConfig;
use crate::transport::ControlPlaneTransport;

fn client() -> ControlPlaneClient {
    let config = ProxyConfig::try_parse_from([
        "weft-proxy",
        "--node",
        "node-1",
        "--token-file",
        "/nonexistent/token",
        "--root-cert",
        "/nonexistent/roots.pem",
    ])
    .unwrap();
    let transport = Arc::new(ControlPlaneTransport::new(&config).unwrap());
    ControlPlaneClient::new(transport, "node-1".into(), 1 << 20)
}

fn update(version: u64, full_state: bool, ip: &str) -> ConfigUpdate {
    ConfigUpdate {
        version,
        full_state,
        local_workloads: vec![v1::Workload {
            uid: "shop/web-1".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            node: "node-1".into(),
            ips: vec![ip.into()],
            meshed: true,
            ..v1::Workload::default()
        }],
        trust: full_state.then(|| {
            let ca = weft_certs::MeshCa::generate_root("cluster.local", SystemTime::now()).unwrap();
            v1::TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_pem: ca.trust_bundle().to_pem(),
            }
        }),
        ..ConfigUpdate::default()
    }
}

#[test]
fn work_before_publishing_sees_each_applied_view_before_anyone_else_does() {
    let mut client = client();
    let published = client.view();
    // What the work saw: the view's version, and what was published then.
    type Seen = Vec<(u64, Option<u64>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (recorder, watching) = (seen.clone(), published.clone());
    client.before_publishing(Arc::new(move |view: &NodeView| {
        let before = watching.borrow().as_ref().map(|v| v.version());
        recorder.lock().unwrap().push((view.version(), before));
    }));

    client.apply(&update(1, true, "10.244.1.5")).unwrap();
    client.apply(&update(2, false, "10.244.1.6")).unwrap();
    // A delta for a version the proxy does not have: refused whole, so
    // nothing is published and there is no work for it.
    assert!(client.apply(&update(4, false, "10.244.1.7")).is_err());

    assert_eq!(*seen.lock().unwrap(), vec![(1, None), (2, Some(1))]);
    assert_eq!(published.borrow().as_ref().map(|v| v.version()), Some(2));
}
