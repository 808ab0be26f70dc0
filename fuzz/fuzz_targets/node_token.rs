//! Arbitrary bearer tokens into the control plane's first reading of a
//! node token (`unverified_claims`), which runs on whatever anyone sends
//! to the gRPC port before any TokenReview: it must never panic, and what
//! it accepts is a JSON object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_control_plane::kubernetes::unverified_claims;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(claims) = unverified_claims(token) {
        assert!(claims.is_object(), "claims that are not an object: {claims}");
    }
});
