//! Arbitrary bearer tokens into the control plane's readings of a node
//! token, which run on whatever anyone sends to the gRPC port before any
//! TokenReview: the first reading of its claims (`unverified_claims`), and
//! the signature check against a JWKS document (`verdict_with_jwks`; the
//! document comes from the API server, fuzzed too). Neither may panic;
//! accepted claims are a JSON object, and a token with nothing after its
//! last dot is never taken as signed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_control_plane::kubernetes::{Verdict, unverified_claims, verdict_with_jwks};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // "<jwks>\n<token>", or a token alone.
    let (jwks, token) = text.split_once('\n').unwrap_or(("", text));
    if let Some(claims) = unverified_claims(token) {
        assert!(claims.is_object(), "claims that are not an object: {claims}");
    }
    let verdict = verdict_with_jwks(jwks.as_bytes(), token);
    if token.ends_with('.') {
        assert_ne!(verdict, Verdict::Signed, "an empty signature was taken");
    }
});
