//! The node's capture rules: nftables and policy routing that steer the TCP
//! traffic of the node's meshed pods into the proxy's transparent listeners
//! (see [`crate::sockets`]), without touching the pods.
//!
//! [`NodeCapture::install`] puts one nftables table, `table inet weft`, and
//! one policy rule with its routing table into the network namespace of the
//! calling thread (the node's: the proxy runs there). The rules only ever
//! match the IPs of meshed local pods, kept in nftables sets that
//! [`NodeCapture::set_meshed_pods`] updates element by element as pods come
//! and go; traffic from and to every other pod passes untouched:
//! - TCP from a meshed pod goes to the outbound listener (15001);
//! - TCP to a meshed pod's port 15008 goes to the HBONE listener (15008);
//! - other TCP to a meshed pod goes to the inbound plaintext listener (15006);
//! - packets of the proxy's transparent sockets are delivered to them, also
//!   after their pod left the mesh, and packets carrying the proxy's mark
//!   are never steered;
//! - connections the node itself opens (kubelet probes, hostNetwork
//!   clients) are never steered, their replies included: conntrack marks
//!   them as the node's when they leave;
//! - pods behind a Linux bridge (the `bridge` CNI) are captured too. With
//!   br_netfilter on (`bridge-nf-call-iptables=1`, as kube-proxy needs),
//!   so is TCP between two pods of the same bridge; with it off, such
//!   frames never reach IP's hooks and pass uncaptured.
//!
//! - connections kube-proxy translates to a meshed pod after the capture
//!   hook (an unmeshed client's ClusterIP, a NodePort) are captured after
//!   the translation into the inbound plaintext listener, and its gate;
//!   the proxy's own pass-through connections that the node translates to
//!   one of its meshed pods (a meshed client dialling a NodePort, a
//!   hostPort or a ClusterIP the proxy does not know yet) are reset: they
//!   would reach the pod past the gate.
//!
//! The rule by rule account is with the table, in `ruleset.rs`. Limits: a
//! connection a pod opened before it was meshed is reset, as its next
//! packet is steered to a listener that does not know it.
//!
//! This module programs the kernel and nothing else: it does not open the
//! listeners, and it does not decide which pods are meshed.
//!
//! It drives the `nft` (nftables) and `ip` (iproute2) tools rather than
//! netlink directly: the netlink libraries for nftables in Rust support
//! neither the `tproxy` nor the `socket` expression (and the most complete
//! one is GPL-licensed), while `nft -f` applies a whole script atomically
//! and reports errors against the script's lines. Both tools must be
//! installed on the node.
//!
//! ```no_run
//! # use std::collections::BTreeSet;
//! # use weft_proxy::capture::{CaptureConfig, CaptureError, NodeCapture};
//! # fn main() -> Result<(), CaptureError> {
//! let mut capture = NodeCapture::install(CaptureConfig::default())?;
//! let meshed = BTreeSet::from(["10.244.1.2".parse().expect("an IP")]);
//! capture.set_meshed_pods(&meshed)?;
//! // ... serve ...
//! capture.remove()?;
//! # Ok(()) }
//! ```

mod command;
pub mod pod;
mod routing;
mod ruleset;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::ExitStatus;

use crate::sockets::{
    CAPTURE_MARK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT, PROXY_MARK,
};
use command::{NetnsId, run};

/// The family and name of weft's table, in a node's namespace or a pod's.
pub(crate) const TABLE_NAME: &str = ruleset::TABLE;
use routing::Family;

/// The conntrack mark bit the capture sets on every TCP connection the
/// node opens itself (in its `output` hook): replies to those connections
/// are never steered. A conntrack mark, not a packet mark; it differs from
/// [`CAPTURE_MARK`] and [`PROXY_MARK`] all the same, so that a component
/// that copies conntrack marks to packets cannot turn it into either.
pub const NODE_CONNECTION_MARK: u32 = 0x4;

/// What the capture steers where, and the marks and routing it uses. The
/// default is what the rest of weft expects (the constants in
/// [`crate::sockets`]); change it only together with the listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Port of the outbound listener on 127.0.0.1 and `[::1]`.
    pub outbound_port: u16,
    /// Port of the inbound plaintext listener on 127.0.0.1 and `[::1]`.
    pub inbound_plaintext_port: u16,
    /// The HBONE port: TCP to a meshed pod's port of this number goes to
    /// the listener on the same port of 127.0.0.1 and `[::1]`.
    pub hbone_port: u16,
    /// The `SO_MARK` bits of the proxy's own connections, never steered.
    pub proxy_mark: u32,
    /// The bit the rules set to route a packet locally; must not overlap
    /// `proxy_mark`.
    pub capture_mark: u32,
    /// The conntrack mark bit of the connections the node opens itself,
    /// whose replies are never steered (see [`NODE_CONNECTION_MARK`]).
    pub node_connection_mark: u32,
    /// The routing table holding `local default dev lo`.
    pub route_table: u32,
    /// Priority of the policy rule; must come before `main` (32766).
    pub rule_priority: u32,
    /// Whether to capture IPv6 too (needs the proxy's listeners on `[::1]`
    /// as well). Without it, IPv6 addresses given to
    /// [`NodeCapture::set_meshed_pods`] are ignored (with a warning), and
    /// nothing of IPv6 is installed. On a node with IPv6 disabled,
    /// [`NodeCapture::install`] turns it off by itself.
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
    fn problem(&self) -> Option<String> {
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

    /// The calling thread's network namespace could not be identified.
    #[error("{operation}: identifying the network namespace of this thread: {source}")]
    Namespace {
        /// What was about to be done.
        operation: String,
        /// The underlying failure.
        source: std::io::Error,
    },

    /// The calling thread is not in the network namespace the capture was
    /// installed in; acting here would change another namespace's rules.
    #[error(
        "{operation}: this thread is in another network namespace than the one \
         the capture was installed in; refusing to touch it"
    )]
    WrongNamespace {
        /// What was refused.
        operation: String,
    },
}

/// The capture rules installed on this node, and the meshed pods they
/// currently steer. Dropping it removes the rules (logging what failed);
/// [`NodeCapture::remove`] does the same and reports it.
#[derive(Debug)]
pub struct NodeCapture {
    config: CaptureConfig,
    netns: NetnsId,
    meshed: BTreeSet<IpAddr>,
    /// Whether the sets were taken over from an earlier run: their content
    /// is unknown until the first update rewrites them whole.
    adopted: bool,
    installed: bool,
}

impl NodeCapture {
    /// Installs weft's table and the policy routing in the calling
    /// thread's network namespace. The pods an earlier run left in the sets
    /// (a crash, a SIGKILL) stay captured, and fail closed until a
    /// listener serves them, up to the first
    /// [`set_meshed_pods`](NodeCapture::set_meshed_pods), which replaces
    /// them whole; on a clean node nothing is captured until then. On
    /// failure, what was installed is removed again.
    pub fn install(mut config: CaptureConfig) -> Result<NodeCapture, CaptureError> {
        if let Some(reason) = config.problem() {
            return Err(CaptureError::Config { reason });
        }
        // `/proc/sys/net` shows the namespace of the thread that reads it.
        if config.ipv6 && !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            tracing::warn!("IPv6 is disabled on this node: capturing IPv4 only");
            config.ipv6 = false;
        }
        let netns = NetnsId::current("installing the capture rules")?;
        let mut capture = NodeCapture {
            config,
            netns,
            meshed: BTreeSet::new(),
            adopted: true,
            // From here on, dropping `capture` undoes what was done.
            installed: true,
        };
        if let Err(error) = nft(
            "installing the capture rules, keeping the meshed pods of the last run",
            &ruleset::adopt_script(&capture.config),
        ) {
            tracing::warn!(%error, "cannot take over the table left behind; replacing it");
            capture.adopted = false;
            nft(
                "installing the capture rules (table inet weft)",
                &ruleset::install_script(&capture.config),
            )?;
        }
        for family in capture.families() {
            routing::install(&capture.config, family)?;
        }
        tracing::info!(config = ?capture.config, "installed the capture rules");
        Ok(capture)
    }

    /// Makes exactly `ips` the captured pods: adds the new ones to the
    /// sets and deletes the gone ones, in one nftables transaction. The
    /// rules themselves are not reloaded (but for one chain, whose hook is
    /// registered anew so that it keeps running ahead of br_netfilter's,
    /// see `ruleset.rs`), and connections already captured for a pod that
    /// leaves keep going through the proxy until they end.
    ///
    /// If the kernel's sets have diverged from what this `NodeCapture`
    /// last set (somebody edited them), the sets are rewritten whole.
    pub fn set_meshed_pods(&mut self, ips: &BTreeSet<IpAddr>) -> Result<(), CaptureError> {
        let operation = "updating the meshed pods";
        self.check_namespace(operation)?;
        let (wanted, ignored): (BTreeSet<IpAddr>, BTreeSet<IpAddr>) = ips
            .iter()
            .copied()
            .partition(|ip| ip.is_ipv4() || self.config.ipv6);
        if !ignored.is_empty() {
            tracing::warn!(?ignored, "IPv6 capture is off: not capturing these pod IPs");
        }
        if self.adopted {
            // Whatever the last run left in the sets becomes exactly
            // `wanted`, in one transaction: no pod of both is ever out.
            nft(
                "replacing the meshed pods of the last run",
                &ruleset::rewrite_script(&self.config, &wanted),
            )?;
            tracing::info!(meshed = ?wanted, "took over the capture of the last run");
            self.adopted = false;
            self.meshed = wanted;
            return Ok(());
        }
        let add: Vec<IpAddr> = wanted.difference(&self.meshed).copied().collect();
        let remove: Vec<IpAddr> = self.meshed.difference(&wanted).copied().collect();
        let Some(script) = ruleset::update_script(&self.config, &add, &remove) else {
            return Ok(());
        };
        let operation = format!("{operation} (adding {add:?}, removing {remove:?})");
        if let Err(error) = nft(&operation, &script) {
            tracing::warn!(%error, "rewriting the meshed pod sets whole");
            nft(
                "rewriting the meshed pod sets",
                &ruleset::rewrite_script(&self.config, &wanted),
            )?;
        }
        tracing::info!(added = ?add, removed = ?remove, "updated the meshed pods");
        self.meshed = wanted;
        Ok(())
    }

    /// The pods currently captured.
    pub fn meshed_pods(&self) -> &BTreeSet<IpAddr> {
        &self.meshed
    }

    /// The config it was installed with.
    pub fn config(&self) -> &CaptureConfig {
        &self.config
    }

    /// Stops managing the rules without removing them: the pods in the sets
    /// stay captured, and their TCP is dropped (held, as a lost SYN is
    /// retransmitted) while no proxy listens, until the next proxy
    /// [installs](NodeCapture::install) and takes them over. What a proxy
    /// does when it stops, unless the mesh is being uninstalled.
    pub fn leave(mut self) {
        self.installed = false;
        tracing::info!(
            meshed = self.meshed.len(),
            "leaving the capture rules in place for the next proxy: the meshed pods' \
             traffic is held until it serves them"
        );
    }

    /// Removes the table and the policy routing. Every part is tried even
    /// when one fails; the first failure is returned.
    pub fn remove(mut self) -> Result<(), CaptureError> {
        self.installed = false;
        self.uninstall()
    }

    fn uninstall(&self) -> Result<(), CaptureError> {
        self.check_namespace("removing the capture rules")?;
        let mut result = nft(
            "removing the capture rules (table inet weft)",
            &ruleset::remove_script(),
        );
        for family in self.families() {
            let removed = routing::remove(&self.config, family);
            result = result.and(removed);
        }
        if result.is_ok() {
            tracing::info!("removed the capture rules");
        }
        result
    }

    fn families(&self) -> Vec<Family> {
        if self.config.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    fn check_namespace(&self, operation: &str) -> Result<(), CaptureError> {
        if NetnsId::current(operation)? == self.netns {
            Ok(())
        } else {
            Err(CaptureError::WrongNamespace {
                operation: operation.to_owned(),
            })
        }
    }
}

impl Drop for NodeCapture {
    fn drop(&mut self) {
        if self.installed
            && let Err(error) = self.uninstall()
        {
            tracing::warn!(%error, "removing the capture rules on drop");
        }
    }
}

/// Applies an nftables script in one transaction.
fn nft(operation: &str, script: &str) -> Result<(), CaptureError> {
    run(operation, "nft", &["-f", "-"], Some(script)).map(drop)
}
