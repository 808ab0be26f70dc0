//! The `CONNECT` request's headers beyond the pseudo-headers: `forwarded`,
//! which names the original client, written and read here.

use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;

/// `for="<ip>:<port>"` (`for="[v6]:port"`), as RFC 7239 asks for an address
/// with a port.
pub(crate) fn forwarded_for(client: SocketAddr) -> HeaderValue {
    let value = format!("for=\"{client}\"");
    // An address formats to ASCII digits, dots, colons and brackets only,
    // so this never fails; fall back to nothing rather than panic.
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The client address in a `forwarded` header: the `for` of its first
/// element, quoted or not, with or without a port (port 0 when absent).
/// Obfuscated identifiers (`for=_hidden`, `for=unknown`) give `None`.
pub fn parse_forwarded_for(value: &HeaderValue) -> Option<SocketAddr> {
    let text = value.to_str().ok()?;
    let first = text.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })?;
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = node.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<SocketAddr> {
        parse_forwarded_for(&HeaderValue::from_str(value).ok()?)
    }

    #[test]
    fn written_forms_read_back() {
        for addr in ["10.0.1.5:43210", "[fd00::5]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(addr)), Some(addr));
        }
    }

    #[test]
    fn other_spellings_are_understood() {
        let v4 = |s: &str| s.parse::<SocketAddr>().ok();
        assert_eq!(parse("for=10.0.0.1:80"), v4("10.0.0.1:80"));
        assert_eq!(parse("For=10.0.0.1"), v4("10.0.0.1:0"));
        assert_eq!(parse("for=\"[fd00::1]\""), v4("[fd00::1]:0"));
        assert_eq!(
            parse("proto=http;for=\"10.0.0.2:9\", for=10.0.0.3"),
            v4("10.0.0.2:9")
        );
        assert_eq!(parse("for=unknown"), None);
        assert_eq!(parse("by=10.0.0.1"), None);
    }
}
