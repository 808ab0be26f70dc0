//! The one error type of `weft-proxy`: each variant names the operation that
//! failed and carries the values that explain it. A config update the proxy
//! refuses is not an error of the proxy but of the update; why it was refused
//! is an [`UpdateProblem`](crate::UpdateProblem), sent back as the NACK reason.

use std::path::PathBuf;

use weft_certs::Identity;

/// Everything that can go wrong in `weft-proxy`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token file could not be read.
    #[error("reading the control-plane token from {path}: {source}")]
    ReadToken {
        /// The token file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The token file holds nothing usable as a bearer token.
    #[error("reading the control-plane token from {path}: {reason}")]
    InvalidToken {
        /// The token file.
        path: PathBuf,
        /// What is wrong with its content (never the content itself).
        reason: &'static str,
    },

    /// The file of mesh roots that authenticate the control plane could not
    /// be read.
    #[error("reading the control-plane roots from {path}: {source}")]
    ReadRoots {
        /// The root certificate file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The file of mesh roots does not hold usable root certificates.
    #[error("loading the control-plane roots from {path}: {source}")]
    ParseRoots {
        /// The root certificate file.
        path: PathBuf,
        /// The underlying failure.
        source: weft_certs::Error,
    },

    /// The TLS client config for the control plane could not be built.
    #[error("building the TLS config for the control plane: {source}")]
    ControlPlaneTls {
        /// The underlying failure.
        source: weft_certs::Error,
    },

    /// A file of the node's stored state could not be read.
    #[error("reading the stored state {path}: {source}")]
    ReadState {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// A file of the node's stored state does not hold what it should.
    #[error("reading the stored state {path}: {reason}")]
    DecodeState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The node's stored state could not be written.
    #[error("writing the stored state {path}: {source}")]
    WriteState {
        /// The file or directory.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The control-plane address is not `host:port`.
    #[error("parsing the control-plane address {address:?}: {reason}")]
    ControlPlaneAddress {
        /// The address as configured.
        address: String,
        /// What is wrong with it.
        reason: String,
    },

    /// TCP, TLS or HTTP/2 to the control plane failed. The message of
    /// `source` alone is vague ("transport error"); log it with
    /// [`error_chain`](crate::error_chain) to see the cause.
    #[error("connecting to the control plane at {address}: {source}")]
    Connect {
        /// The control plane's address.
        address: String,
        /// The underlying failure.
        source: tonic::transport::Error,
    },

    /// The control plane refused to open the config stream.
    #[error("opening the config stream to {address}: {code:?}: {message}")]
    OpenStream {
        /// The control plane's address.
        address: String,
        /// The gRPC status code it answered with.
        code: tonic::Code,
        /// The status message.
        message: String,
    },

    /// The config stream broke while the proxy was reading it.
    #[error("reading the config stream from {address}: {code:?}: {message}")]
    StreamBroken {
        /// The control plane's address.
        address: String,
        /// The gRPC status code the stream ended with.
        code: tonic::Code,
        /// The status message.
        message: String,
    },

    /// The control plane sent parts that do not make one update (out of
    /// place, or more in all than the proxy accepts): the stream is left
    /// and a new one asked for, which starts with a full state.
    #[error("reading the config stream from {address}: {problem}")]
    BadUpdateParts {
        /// The control plane's address.
        address: String,
        /// What was wrong.
        problem: weft_api::Error,
    },

    /// The control plane closed the config stream without an error.
    #[error("reading the config stream from {address}: the control plane ended the stream")]
    StreamEnded {
        /// The control plane's address.
        address: String,
    },

    /// The proxy could not send its Hello, Ack or Nack: the stream is gone.
    #[error("sending {what} to the control plane at {address}: the stream is closed")]
    StreamClosed {
        /// Which message could not be sent.
        what: &'static str,
        /// The control plane's address.
        address: String,
    },

    /// The proxy holds a config the control plane's deltas no longer follow
    /// and asks for a full state by opening a new stream.
    #[error("following the config stream from {address}: {problem}; reconnecting for a full state")]
    OutOfSync {
        /// The control plane's address.
        address: String,
        /// Why the update could not be applied.
        problem: crate::UpdateProblem,
    },

    /// Generating the key or CSR for a workload certificate failed.
    #[error("preparing a CSR for {identity}: {source}")]
    PrepareCsr {
        /// The identity.
        identity: Identity,
        /// The underlying failure.
        source: weft_certs::Error,
    },

    /// The control plane refused or failed to sign a CSR.
    #[error("signing a certificate for {identity}: {code:?}: {message}")]
    Sign {
        /// The identity asked for.
        identity: Identity,
        /// The gRPC status code the control plane answered with.
        code: tonic::Code,
        /// The status message, the control plane's reason.
        message: String,
    },

    /// The control plane's answer to a signing request is not usable.
    #[error("signing a certificate for {identity}: unusable response: {reason}")]
    SignResponse {
        /// The identity asked for.
        identity: Identity,
        /// What is wrong with the response.
        reason: String,
    },

    /// The signed chain does not fit the request (key, identity, roots).
    #[error("completing the certificate for {identity}: {source}")]
    CompleteCertificate {
        /// The identity asked for.
        identity: Identity,
        /// The underlying failure.
        source: weft_certs::Error,
    },

    /// One of the node's listening sockets could not be bound.
    #[error("binding the {kind:?} socket to {addr}: {source}")]
    BindNodeSocket {
        /// Which socket.
        kind: crate::handover::NodeSocketKind,
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The admin socket could not be bound.
    #[error("binding the admin socket {path}: {source}")]
    BindAdminSocket {
        /// The socket's path.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The hand-over socket could not be bound or taken over.
    #[error("binding the hand-over socket {path}: {source}")]
    BindHandover {
        /// The socket's path.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// A copy of a node socket, kept for the next hand-over, could not be
    /// made (out of file descriptors).
    #[error("copying the {kind:?} socket for a later hand-over: {source}")]
    CopySocket {
        /// Which socket.
        kind: crate::handover::NodeSocketKind,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// A thread of the proxy's own could not be started.
    #[error("starting the {what} thread: {source}")]
    SpawnThread {
        /// What the thread is for.
        what: &'static str,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// Installing the node's capture rules failed (the error names the step).
    #[error(transparent)]
    Capture(crate::capture::CaptureError),

    /// The `weft-cni` binary beside this program could not be located.
    #[error("locating the weft-cni binary beside this program: {source}")]
    FindCniPlugin {
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The CNI plugin's socket could not be bound.
    #[error("binding the CNI socket {path}: {source}")]
    BindCniSocket {
        /// The socket's path.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// A log filter (from `--log-level` or the admin endpoint) does not parse.
    #[error("parsing the log filter {directives:?}: {reason}")]
    ParseLogFilter {
        /// The filter as given.
        directives: String,
        /// Why it does not parse.
        reason: String,
    },

    /// The log subscriber could not be installed or changed.
    #[error("{operation} the log subscriber: {reason}")]
    Logging {
        /// What was being done (`installing`, `reloading`).
        operation: &'static str,
        /// The underlying failure.
        reason: String,
    },
}

/// An error and all its causes on one line, `outer: inner: innermost`. A
/// wrapper that repeats its cause's text (as many do) is not repeated, and
/// a TLS refusal by one of weft's verifiers reads as weft's reason rather
/// than rustls's debug dump of it.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    // (what the link says, what the line shows for it)
    let mut links: Vec<(String, String)> = Vec::new();
    let mut next = Some(error);
    while let Some(link) = next {
        let says = link.to_string();
        let shown = describe(link);
        if let Some((last_says, last_shown)) = links.last_mut() {
            if *last_says == says {
                // The wrapper only repeats its cause: show the cause.
                links.pop();
            } else if let Some(head) = last_says.strip_suffix(says.as_str()) {
                // "operation: cause": keep the operation, the cause follows.
                let head = head.trim_end_matches(": ").to_owned();
                *last_shown = head.clone();
                *last_says = head;
            }
        }
        links.push((says, shown));
        next = link.source();
    }
    links
        .into_iter()
        .map(|(_, shown)| shown)
        .filter(|shown| !shown.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// One link of a chain; TLS errors from weft's verifiers by their reason.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
        error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    });
    match tls.and_then(weft_certs::refusal_reason) {
        Some(reason) => format!("TLS handshake refused: {reason}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_shows_every_cause_once() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer: inner");
        let repeated = Error::ReadToken {
            path: "/t".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(
            error_chain(&repeated),
            "reading the control-plane token from /t: gone"
        );
    }
}
