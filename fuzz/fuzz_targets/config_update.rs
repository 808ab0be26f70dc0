//! Arbitrary bytes as a protobuf `ConfigUpdate` from the control plane into
//! the proxy's `NodeView::apply`: first as they come, then replayed as a
//! delta on top of what was applied. Nothing may panic; a refused update
//! must not be half-applied; an applied one holds exactly its version, and
//! every refused entry is named. The update's AuthorizationPolicies and
//! TrafficPolicies also go through the compilers the control plane runs
//! before it sends them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_api::v1::ConfigUpdate;
use weft_proxy::{Applied, NodeView};

fuzz_target!(|data: &[u8]| {
    let Ok(update) = ConfigUpdate::decode(data) else {
        return;
    };
    for policy in &update.authorization_policies {
        if let Err(error) = weft_api::authorization::Policy::compile(policy) {
            assert!(!error.to_string().is_empty());
        }
    }
    for service in &update.services {
        if let Some(traffic) = &service.traffic_policy {
            let _ = weft_api::traffic::TrafficPolicy::from_wire(&service.namespace, traffic);
        }
    }
    let Ok(Applied { view: first, refused }) = NodeView::apply(None, &update, "node-1") else {
        return;
    };
    assert_eq!(first.version(), update.version);
    assert!(refused.iter().all(|problem| !problem.to_string().is_empty()));
    let mut delta = update.clone();
    delta.full_state = false;
    delta.version = first.version().wrapping_add(1);
    match NodeView::apply(Some(&first), &delta, "node-1") {
        Ok(second) => assert_eq!(second.view.version(), delta.version),
        Err(_) => assert_eq!(first.version(), update.version, "the base changed"),
    }
});
