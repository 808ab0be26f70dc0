//! Arbitrary CONNECT requests as an HBONE server receives them after the
//! HTTP/2 layer: method, authority and the `forwarded`, `baggage` and
//! `traceparent` headers into the checks and parsers that decide 400/405 or
//! a target and what the access log says. Nothing may panic, an accepted
//! target is always on the connection's local address, and what the parsers
//! accept is safe to send again (it reads back the same).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use weft_proxy::hbone::{Baggage, TraceParent, check_connect, parse_forwarded};

fuzz_target!(|data: &[u8]| {
    let local: SocketAddr = ([10, 244, 2, 2], 15008).into();
    let mut parts = data.splitn(6, |b| *b == b'\n');
    let (Some(method), Some(uri)) = (parts.next(), parts.next()) else {
        return;
    };
    let mut header = || http::HeaderValue::from_bytes(parts.next().unwrap_or_default()).ok();
    if let Some(forwarded) = header() {
        let parsed = parse_forwarded(&forwarded);
        if let Some(host) = &parsed.host {
            assert!(!host.is_empty() && !host.contains([',', ';', '"', ' ', '=']));
        }
    }
    let baggage_lines: Vec<_> = [header(), header()].into_iter().flatten().collect();
    let baggage = Baggage::parse(&baggage_lines);
    if let Some(sent) = baggage.header() {
        assert_eq!(Baggage::parse([&sent]), baggage, "baggage does not read back");
    }
    if let Some(traceparent) = header() {
        if let Some(trace) = TraceParent::parse(&traceparent) {
            assert_ne!(trace.trace_id, 0);
            assert_eq!(TraceParent::parse(&trace.header()), Some(trace));
        }
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
