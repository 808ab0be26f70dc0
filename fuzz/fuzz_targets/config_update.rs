//! Arbitrary bytes as a protobuf `ConfigUpdate` from the control plane into
//! the proxy's `NodeView::apply`: first as they come, then replayed as a
//! delta on top of what was applied. Nothing may panic, and a refused
//! update must not be half-applied.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_api::v1::ConfigUpdate;
use weft_proxy::NodeView;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = ConfigUpdate::decode(data) else {
        return;
    };
    let Ok(first) = NodeView::apply(None, &update, "node-1") else {
        return;
    };
    let mut delta = update.clone();
    delta.full_state = false;
    delta.version = first.version().wrapping_add(1);
    match NodeView::apply(Some(&first), &delta, "node-1") {
        Ok(second) => assert_eq!(second.version(), delta.version),
        Err(_) => assert_eq!(first.version(), update.version, "the base changed"),
    }
});
