//! The capture: nftables and policy routing inside each meshed pod's
//! network namespace that steer the pod's TCP into the proxy's listeners
//! there, whatever the CNI does outside the pod ([`pod`], which says rule
//! by rule why), and the node's one rule for its own connections to its
//! meshed pods' probe ports ([`node_source`]).
//!
//! Why inside the pod: every packet a pod sends or receives passes its own
//! namespace's netfilter hooks, whatever the CNI (a bridge with or without
//! br_netfilter, point-to-point veths, overlays, eBPF CNIs that bypass the
//! node's netfilter). Rules in the node's namespace (TPROXY, weft's first
//! design) see pods' packets only where the CNI lets them through the
//! node's hooks, and broke probes and cross-node traffic on a bridge CNI.
//! What it costs: a small table and three listening sockets per meshed
//! pod, and a proxy that enters pods' namespaces (`CAP_SYS_ADMIN`).
//!
//! The rules belong to the pod, not to the proxy: they outlive a proxy
//! that stops or dies, and fail closed meanwhile (the redirection finds no
//! listener: the pod's TCP is refused). Which pods are meshed, and when to
//! install or remove them, is the data plane's decision
//! (`dataplane::pods`); this module programs the kernel and nothing else.
//!
//! It drives the `nft` (nftables) and `ip` (iproute2) tools rather than
//! netlink directly: the netlink libraries for nftables in Rust are
//! incomplete (and the most complete one is GPL-licensed), while `nft -f`
//! applies a whole script atomically and reports errors against the
//! script's lines. Both tools must be installed on the node.

mod command;
pub mod node_source;
pub mod pod;
mod routing;

use std::process::ExitStatus;

use crate::sockets::{
    CAPTURE_MARK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT, PROXY_MARK,
};

/// The family and name of weft's table in a pod's namespace.
pub(crate) const TABLE_NAME: &str = "inet weft";

/// The conntrack mark bit the node's rule sets on every TCP connection
/// the node opens itself to one of its meshed pods, to give it the node's
/// source address for them. A conntrack mark, not a packet mark; it
/// differs from [`CAPTURE_MARK`] and [`PROXY_MARK`] all the same, so that
/// a component that copies conntrack marks to packets cannot turn it into
/// either.
pub const NODE_CONNECTION_MARK: u32 = 0x4;

/// What the capture steers where, and the marks and routing it uses. The
/// default is what the rest of weft expects (the constants in
/// [`crate::sockets`]); change it only together with the listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Port of the outbound listener on the pod's 127.0.0.1 and `[::1]`.
    pub outbound_port: u16,
    /// Port of the inbound plaintext listener on the pod's addresses.
    pub inbound_plaintext_port: u16,
    /// The HBONE port: TCP to a meshed pod's port of this number goes to
    /// the proxy's listener on it in the pod, not redirected.
    pub hbone_port: u16,
    /// The `SO_MARK` bits of the proxy's own connections, never steered.
    pub proxy_mark: u32,
    /// The bit the rules set on replies to the proxy's transparent sockets
    /// in a pod, to route them locally; must not overlap `proxy_mark`.
    pub capture_mark: u32,
    /// The conntrack mark bit of the connections the node opens itself to
    /// its meshed pods (see [`NODE_CONNECTION_MARK`]).
    pub node_connection_mark: u32,
    /// The routing table holding `local default dev lo`.
    pub route_table: u32,
    /// Priority of the policy rule; must come before `main` (32766).
    pub rule_priority: u32,
    /// Whether to install the IPv6 policy routing too, in pods whose
    /// namespace has IPv6 (the redirection covers both families anyway).
    pub ipv6: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            outbound_port: OUTBOUND_PORT,
            inbound_plaintext_port: INBOUND_PLAINTEXT_PORT,
            hbone_port: HBONE_PORT,
            proxy_mark: PROXY_MARK,
            capture_mark: CAPTURE_MARK,
            node_connection_mark: NODE_CONNECTION_MARK,
            route_table: CAPTURE_ROUTE_TABLE,
            rule_priority: CAPTURE_RULE_PRIORITY,
            ipv6: true,
        }
    }
}

impl CaptureConfig {
    /// Why this config cannot work, if it cannot.
    pub(crate) fn problem(&self) -> Option<String> {
        let ports = [
            self.outbound_port,
            self.inbound_plaintext_port,
            self.hbone_port,
        ];
        if ports.contains(&0)
            || ports[0] == ports[1]
            || ports[0] == ports[2]
            || ports[1] == ports[2]
        {
            return Some(format!(
                "the listener ports must be distinct and not 0, got {ports:?}"
            ));
        }
        if self.capture_mark == 0 || self.proxy_mark == 0 || self.node_connection_mark == 0 {
            return Some("the capture, proxy and node connection marks must not be 0".to_owned());
        }
        if self.node_connection_mark & (self.capture_mark | self.proxy_mark) != 0 {
            return Some(format!(
                "the node connection mark {:#x} overlaps the capture or proxy mark",
                self.node_connection_mark
            ));
        }
        if self.capture_mark & self.proxy_mark != 0 {
            return Some(format!(
                "the capture mark {:#x} overlaps the proxy mark {:#x}: \
                 the proxy's own packets would be routed back to it",
                self.capture_mark, self.proxy_mark
            ));
        }
        if [0, 253, 254, 255].contains(&self.route_table) {
            return Some(format!(
                "routing table {} is reserved (unspec, default, main, local)",
                self.route_table
            ));
        }
        if !(1..32766).contains(&self.rule_priority) {
            return Some(format!(
                "rule priority {} must be in 1..=32765, after `local` and before `main`",
                self.rule_priority
            ));
        }
        None
    }
}

/// Why installing, updating or removing the capture failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The config cannot work.
    #[error("checking the capture config: {reason}")]
    Config {
        /// What is wrong with it.
        reason: String,
    },

    /// `nft` or `ip` could not be run at all.
    #[error("{operation}: running `{program}` (is it installed?): {source}")]
    Start {
        /// What the command was for.
        operation: String,
        /// `nft` or `ip`.
        program: &'static str,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// `nft` or `ip` ran and failed.
    #[error("{operation}: `{command}` failed ({status}): {stderr}")]
    Command {
        /// What the command was for.
        operation: String,
        /// The command line (with the lines fed to `ip -batch`).
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it said.
        stderr: String,
    },

    /// A listing from `ip -j` could not be understood.
    #[error("{operation}: reading the output of `{command}`: {reason}")]
    Output {
        /// What the listing was for.
        operation: String,
        /// The command line.
        command: String,
        /// What is wrong with the output.
        reason: String,
    },

    /// A network namespace could not be opened, entered or read.
    #[error("{operation}: {source}")]
    Namespace {
        /// What was about to be done.
        operation: String,
        /// The underlying failure.
        source: std::io::Error,
    },
}
