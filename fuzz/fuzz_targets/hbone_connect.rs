//! Arbitrary CONNECT requests as an HBONE server receives them after the
//! HTTP/2 layer: method, authority and `forwarded` header into the checks
//! that decide 400/405 or a target. Nothing may panic, and an accepted
//! target is always on the connection's local address.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use weft_proxy::hbone::{check_connect, parse_forwarded_for};

fuzz_target!(|data: &[u8]| {
    let local: SocketAddr = ([10, 244, 2, 2], 15008).into();
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(method), Some(uri)) = (parts.next(), parts.next()) else {
        return;
    };
    if let Ok(forwarded) = http::HeaderValue::from_bytes(parts.next().unwrap_or_default()) {
        let _ = parse_forwarded_for(&forwarded);
    }
    let (Ok(method), Ok(uri)) = (
        http::Method::from_bytes(method),
        http::Uri::try_from(uri),
    ) else {
        return;
    };
    let Ok(request) = http::Request::builder().method(method).uri(uri).body(()) else {
        return;
    };
    if let Ok(target) = check_connect(&request, local) {
        assert_eq!(target.ip().to_canonical(), local.ip(), "accepted a foreign target");
    }
});
