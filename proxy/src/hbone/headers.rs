//! The `CONNECT` request's headers beyond the pseudo-headers, written and
//! read here, in the forms ztunnel writes and reads:
//!
//! - `forwarded: for="<client ip:port>";host=<service hostname>`: the
//!   original client, and the Service it addressed, if any;
//! - `baggage: k8s.cluster.name=..,k8s.namespace.name=..,k8s.<kind>.name=..,
//!   service.name=..,service.version=..`: who the source is, as Istio's
//!   telemetry names it (W3C baggage, Istio's keys);
//! - `traceparent: 00-<trace id>-<parent id>-<flags>` (W3C trace context),
//!   one per tunnel, so that both ends' logs of a connection can be joined.
//!
//! All of it is the peer's claim: the server checks what it uses against
//! what it knows (see the data plane's inbound side).

use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;
use http::header::HeaderName;

/// The `baggage` header's name.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// The `traceparent` header's name.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The longest value kept from a baggage entry or a `host`: a DNS name's
/// limit, which every Kubernetes name fits in.
const MAX_VALUE_LEN: usize = 253;

/// Baggage entries read at most; Istio sends seven.
const MAX_BAGGAGE_ENTRIES: usize = 32;

/// What a `forwarded` header says: the client, and the host it addressed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// `for`: the original client (port 0 when none was given).
    pub client: Option<SocketAddr>,
    /// `host`: the Service hostname the client addressed.
    pub host: Option<String>,
}

/// `for="<ip>:<port>"` (`for="[v6]:port"`), as RFC 7239 asks for an address
/// with a port, and `;host=<service hostname>` when there is one that is a
/// valid token.
pub(crate) fn forwarded(client: SocketAddr, host: Option<&str>) -> HeaderValue {
    let mut value = format!("for=\"{client}\"");
    if let Some(host) = host.filter(|h| is_token(h)) {
        value.push_str(";host=");
        value.push_str(host);
    }
    // An address and a checked token are visible ASCII, so this never
    // fails; fall back to nothing rather than panic.
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `for` and `host` of a `forwarded` header's first element, quoted or
/// not; `for` with or without a port. Obfuscated identifiers (`for=_hidden`,
/// `for=unknown`) give no client.
pub fn parse_forwarded(value: &HeaderValue) -> Forwarded {
    let Ok(text) = value.to_str() else {
        return Forwarded::default();
    };
    let first = text.split(',').next().unwrap_or_default();
    let mut forwarded = Forwarded::default();
    for pair in first.split(';') {
        let Some((name, value)) = pair.trim().split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        let name = name.trim();
        if name.eq_ignore_ascii_case("for") && forwarded.client.is_none() {
            forwarded.client = parse_node(value);
        } else if name.eq_ignore_ascii_case("host") && forwarded.host.is_none() {
            forwarded.host = Some(value)
                .filter(|v| !v.is_empty() && v.len() <= MAX_VALUE_LEN && is_token(v))
                .map(str::to_owned);
        }
    }
    forwarded
}

fn parse_node(node: &str) -> Option<SocketAddr> {
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = node.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// Letters, digits and `-._`: what Kubernetes names and hostnames are made
/// of, and safe inside any header syntax here (no `,;="` or spaces).
fn is_token(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Who a tunnel's source is, in Istio's baggage keys. Every field is
/// optional; an empty or unsafe one is left out when sending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// `k8s.<kind>.name`: the workload (Deployment, Job, ...) or the pod.
    pub workload: Option<String>,
    /// The kind in that key: `deployment`, `cronjob`, `job` or `pod`, the
    /// four ztunnel reads (it sends the workload of any other controller as
    /// a deployment, and so does weft).
    pub workload_kind: WorkloadKind,
    /// `service.name`: the canonical service.
    pub service: Option<String>,
    /// `service.version`: the canonical revision.
    pub revision: Option<String>,
}

/// The kind of workload a baggage names, as its key says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `k8s.deployment.name` (any controller but the ones below).
    #[default]
    Deployment,
    /// `k8s.cronjob.name`.
    CronJob,
    /// `k8s.job.name`.
    Job,
    /// `k8s.pod.name`: a pod without a controller.
    Pod,
}

impl WorkloadKind {
    fn key(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::Pod => "k8s.pod.name",
        }
    }
}

impl Baggage {
    /// The header value, in ztunnel's order, without spaces; `None` when
    /// no field is set.
    pub fn header(&self) -> Option<HeaderValue> {
        let entries = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (self.workload_kind.key(), &self.workload),
            ("service.name", &self.service),
            ("service.version", &self.revision),
        ];
        let value = entries
            .into_iter()
            .filter_map(|(key, value)| {
                let value = value.as_deref()?;
                (!value.is_empty() && value.len() <= MAX_VALUE_LEN && is_token(value))
                    .then(|| format!("{key}={value}"))
            })
            .collect::<Vec<_>>()
            .join(",");
        if value.is_empty() {
            return None;
        }
        HeaderValue::from_str(&value).ok()
    }

    /// Reads every `baggage` header value: the keys above (the workload
    /// under any of the kinds Istio's proxies send), trimmed, without
    /// percent-decoding (Istio sends names raw), properties after `;`
    /// dropped. Unknown keys, empty or unsafe values and entries past the
    /// first 32 are ignored; the last occurrence of a key wins.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Baggage {
        let mut baggage = Baggage::default();
        let entries = values
            .into_iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|text| text.split(','))
            .take(MAX_BAGGAGE_ENTRIES);
        for entry in entries {
            let member = entry.split(';').next().unwrap_or_default();
            let Some((key, value)) = member.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() || value.len() > MAX_VALUE_LEN || !is_token(value) {
                continue;
            }
            let value = Some(value.to_owned());
            match key {
                "k8s.cluster.name" => baggage.cluster = value,
                "k8s.namespace.name" => baggage.namespace = value,
                "service.name" => baggage.service = value,
                "service.version" => baggage.revision = value,
                _ => {
                    // The kinds Istio's proxies send for a workload; not
                    // `k8s.instance.name` (a pod of it), `k8s.node.name`,
                    // `k8s.container.name` or any other `k8s.*.name`.
                    let kind = match key {
                        "k8s.deployment.name"
                        | "k8s.statefulset.name"
                        | "k8s.daemonset.name"
                        | "k8s.replicaset.name"
                        | "k8s.workload.name" => WorkloadKind::Deployment,
                        "k8s.cronjob.name" => WorkloadKind::CronJob,
                        "k8s.job.name" => WorkloadKind::Job,
                        "k8s.pod.name" => WorkloadKind::Pod,
                        _ => continue,
                    };
                    baggage.workload = value;
                    baggage.workload_kind = kind;
                }
            }
        }
        baggage
    }
}

/// A W3C `traceparent`: version 00, a trace id, the sender's span id, and
/// flags (weft samples nothing, so it sends 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, never all zero.
    pub trace_id: u128,
    /// 8 bytes, never all zero.
    pub parent_id: u64,
    /// Bit 0: sampled.
    pub flags: u8,
}

impl TraceParent {
    /// A new trace: random ids, not sampled.
    pub fn random() -> TraceParent {
        TraceParent {
            trace_id: rand::random::<u128>().max(1),
            parent_id: rand::random::<u64>().max(1),
            flags: 0,
        }
    }

    /// The header value: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase.
    pub fn header(&self) -> HeaderValue {
        let value = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        );
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The trace id as the logs print it: 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// Parses a `traceparent` strictly: four fields of 2, 32, 16 and 2
    /// lowercase hex digits; version `ff` and all-zero ids are invalid.
    /// Versions after 00 may append fields, which are ignored.
    pub fn parse(value: &HeaderValue) -> Option<TraceParent> {
        let text = value.to_str().ok()?;
        let mut fields = text.split('-');
        let version = hex_field(fields.next()?, 2)?;
        let trace_id = hex_field(fields.next()?, 32)?;
        let parent_id = hex_field(fields.next()?, 16)?;
        let flags = hex_field(fields.next()?, 2)?;
        if version == 0xff || (version == 0 && fields.next().is_some()) {
            return None;
        }
        let parent = TraceParent {
            trace_id,
            parent_id: u64::try_from(parent_id).ok()?,
            flags: u8::try_from(flags).ok()?,
        };
        (parent.trace_id != 0 && parent.parent_id != 0).then_some(parent)
    }
}

/// A field of exactly `len` lowercase hex digits.
fn hex_field(field: &str, len: usize) -> Option<u128> {
    let lowercase_hex = field
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (field.len() == len && lowercase_hex)
        .then(|| u128::from_str_radix(field, 16).ok())
        .flatten()
}

#[cfg(test)]
#[path = "headers_tests.rs"]
mod tests;
