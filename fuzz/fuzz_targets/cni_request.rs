//! Arbitrary bytes as a request line on the proxy's CNI socket
//! (`cni_api::parse_request`): nothing may panic, a refusal says why, and
//! an accepted request is one the proxy can act on (an absolute namespace
//! path; an `add` names an address) and survives a round trip through the
//! plugin's own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proxy::cni_api::{Command, parse_request};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Err(reason) => assert!(!reason.is_empty()),
        Ok(request) => {
            assert!(request.netns.is_absolute());
            assert!(request.command == Command::Del || !request.ips.is_empty());
            let encoded = serde_json::to_vec(&request).expect("a request encodes");
            assert_eq!(parse_request(&encoded).ok(), Some(request));
        }
    }
});
