//! What can go wrong with an HBONE tunnel, each variant naming the step that
//! failed and the addresses or identities that explain it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use weft_certs::Identity;

/// Everything that can go wrong opening, serving or using an HBONE tunnel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    /// The TCP connection to the peer's HBONE port could not be made.
    #[error("dialing {address} (from {}): {source}", display_source_ip(*.source_ip))]
    Dial {
        /// The peer's HBONE address.
        address: SocketAddr,
        /// The local address dialed from, if one was asked for.
        source_ip: Option<IpAddr>,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// Dialing plus the TLS and HTTP/2 handshakes took too long.
    #[error("connecting to {address}: no HBONE connection within {after:?}")]
    ConnectTimeout {
        /// The peer's HBONE address.
        address: SocketAddr,
        /// The time allowed.
        after: Duration,
    },

    /// The TLS client config could not be built from the source certificate.
    #[error("building the HBONE TLS config for {identity}: {source}")]
    TlsConfig {
        /// The source workload's identity.
        identity: Identity,
        /// The underlying failure.
        source: weft_certs::Error,
    },

    /// The TLS handshake with the destination failed; `problem` is weft's
    /// reason when one of its verifiers refused the peer (a wrong identity,
    /// a foreign trust domain), else what rustls or the socket said.
    #[error("TLS handshake with {address} (expecting {expected}): {problem}")]
    TlsHandshake {
        /// The peer's HBONE address.
        address: SocketAddr,
        /// The identity the client required of the server.
        expected: Identity,
        /// Why the handshake failed.
        problem: String,
    },

    /// The TLS handshake of an inbound connection failed (garbage, plaintext,
    /// a client certificate the mesh does not trust).
    #[error("TLS handshake with client {peer}: {}", tls_problem(failure))]
    TlsAccept {
        /// The client's address.
        peer: SocketAddr,
        /// Why the handshake failed, whole, so that callers can tell the
        /// kinds apart (not a `source`: the message already says it).
        failure: std::io::Error,
    },

    /// An inbound client did not finish a handshake in time (TLS, or the
    /// HTTP/2 preface after TLS).
    #[error("{step} handshake with client {peer}: not done within {after:?}")]
    HandshakeTimeout {
        /// The client's address.
        peer: SocketAddr,
        /// "TLS" or "HTTP/2".
        step: &'static str,
        /// The time allowed.
        after: Duration,
    },

    /// The TLS peer's certificate does not name a workload identity.
    #[error("reading the identity of TLS peer {peer}: {source}")]
    PeerIdentity {
        /// The peer's address.
        peer: SocketAddr,
        /// The underlying failure.
        source: weft_certs::Error,
    },

    /// The HTTP/2 handshake over an established TLS connection failed.
    #[error("HTTP/2 handshake with {peer}: {source}")]
    Http2Handshake {
        /// The peer's address.
        peer: SocketAddr,
        /// The underlying failure.
        source: h2::Error,
    },

    /// The `CONNECT` request could not be built (an invalid extra header).
    #[error("building the CONNECT request for {target}: {source}")]
    BuildRequest {
        /// The tunnel's target.
        target: SocketAddr,
        /// The underlying failure.
        source: http::Error,
    },

    /// Sending the `CONNECT` request or waiting for its response failed.
    #[error("CONNECT {target} via {address}: {source}")]
    ConnectStream {
        /// The tunnel's target.
        target: SocketAddr,
        /// The peer's HBONE address.
        address: SocketAddr,
        /// The underlying failure.
        source: h2::Error,
    },

    /// The task dialing a connection ended without a result (the runtime
    /// is shutting down).
    #[error("dialing {address}: the dial was aborted")]
    DialAborted {
        /// The peer's HBONE address.
        address: SocketAddr,
    },

    /// Freshly dialed connections closed before they carried a stream
    /// (e.g. the peer is draining and answers every connection with GOAWAY).
    #[error("connecting to {address}: new connections closed before carrying a stream")]
    ClosedBeforeUse {
        /// The peer's HBONE address.
        address: SocketAddr,
    },

    /// The peer answered the `CONNECT` with something other than 200.
    #[error("CONNECT {target} via {address} refused with {status}")]
    Refused {
        /// The tunnel's target.
        target: SocketAddr,
        /// The peer's HBONE address.
        address: SocketAddr,
        /// What the peer answered: 400 malformed or not its address, 401
        /// denied by policy, 503 no such workload or the workload refused.
        status: StatusCode,
    },

    /// An inbound HBONE connection failed while streams were being accepted.
    #[error("serving the HBONE connection from {peer}: {source}")]
    Connection {
        /// The client's address.
        peer: SocketAddr,
        /// The underlying failure.
        source: h2::Error,
    },

    /// The memory budget of receive windows had not even a small window
    /// left for the connection (see [`super::Windows`]).
    #[error("HBONE connection with {peer}: no receive window left in the memory budget")]
    WindowBudget {
        /// The peer's address.
        peer: SocketAddr,
    },

    /// The peer stopped answering pings; the connection was given up.
    #[error("HBONE connection with {peer}: no answer to a ping within {after:?}")]
    KeepaliveTimeout {
        /// The peer's address.
        peer: SocketAddr,
        /// How long the ping went unanswered.
        after: Duration,
    },

    /// The peer reset a tunnel stream with an error code (a reset with
    /// `NO_ERROR` or `CANCEL` reads as the end of the stream instead).
    #[error("the tunnel stream was reset: {reason:?} ({reason})")]
    StreamReset {
        /// The peer's reason.
        reason: h2::Reason,
    },

    /// Reading or writing a tunnel stream failed at the HTTP/2 level.
    #[error("tunnel stream: {source}")]
    Stream {
        /// The underlying failure.
        source: h2::Error,
    },

    /// Another request was dialing the connection this one waited for, and
    /// that dial failed; the error is the one that dial met.
    #[error(transparent)]
    SharedDial(Arc<HboneError>),
}

impl HboneError {
    /// A short, label-safe name of what failed, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Dial { .. } => "dial_failed",
            HboneError::ConnectTimeout { .. } => "connect_timeout",
            HboneError::DialAborted { .. } => "dial_aborted",
            HboneError::TlsConfig { .. } => "tls_config",
            HboneError::TlsHandshake { .. } => "tls_handshake",
            HboneError::TlsAccept { .. } => "tls_accept",
            HboneError::HandshakeTimeout { .. } => "handshake_timeout",
            HboneError::PeerIdentity { .. } => "peer_identity",
            HboneError::Http2Handshake { .. } => "http2_handshake",
            HboneError::BuildRequest { .. } => "build_request",
            HboneError::ConnectStream { .. } => "connect_stream",
            HboneError::ClosedBeforeUse { .. } => "closed_before_use",
            HboneError::Refused { status, .. } => match status.as_u16() {
                400 => "refused_bad_request",
                401 => "refused_unauthorized",
                503 => "refused_unavailable",
                _ => "refused",
            },
            HboneError::Connection { .. } => "connection_failed",
            HboneError::WindowBudget { .. } => "window_budget",
            HboneError::KeepaliveTimeout { .. } => "keepalive_timeout",
            HboneError::StreamReset { .. } => "stream_reset",
            HboneError::Stream { .. } => "stream_failed",
            HboneError::SharedDial(inner) => inner.reason(),
        }
    }
}

fn display_source_ip(ip: Option<IpAddr>) -> String {
    match ip {
        Some(ip) => ip.to_string(),
        None => "any local address".to_string(),
    }
}

/// What a failed TLS handshake tells about itself: weft's own refusal reason
/// if one of its verifiers said no, else the rustls or socket error.
pub(crate) fn tls_problem(error: &std::io::Error) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)) => {
            "no key exchange group in common: the peer offers none that this side's \
             --key-exchange allows (post-quantum-required allows X25519MLKEM768 only)"
                .to_owned()
        }
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)) => {
            "the peer refused the handshake (handshake_failure alert): it shares no key \
             exchange group or cipher suite with this side (with --key-exchange \
             post-quantum-required, this side offers X25519MLKEM768 only)"
                .to_owned()
        }
        Some(tls) => match weft_certs::refusal_reason(tls) {
            Some(reason) => reason.to_string(),
            None => tls.to_string(),
        },
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(error: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, error)
    }

    #[test]
    fn a_key_exchange_mismatch_is_named_on_both_sides() {
        let server_side = tls_problem(&wrapped(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoKxGroupsInCommon,
        )));
        assert!(
            server_side.contains("no key exchange group in common"),
            "{server_side}"
        );
        let client_side = tls_problem(&wrapped(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        )));
        assert!(client_side.contains("X25519MLKEM768"), "{client_side}");
    }
}
