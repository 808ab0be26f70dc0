//! What an [`AuthorizationPolicy`](v1::AuthorizationPolicy) means: the one
//! evaluation that the node proxy enforces and the control plane's `explain`
//! prints, so that the two cannot disagree.
//!
//! Order of decision: any matching DENY refuses; otherwise, if any ALLOW
//! policy applies to the workload, one of them must match; otherwise the
//! connection is allowed. AUDIT policies never change the outcome; the ones
//! that match are reported next to it.

use std::fmt;
use std::net::IpAddr;

use crate::v1;

/// What the destination proxy knows about a new connection.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The source's SPIFFE ID, verified by mutual TLS; `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The source's address as the destination sees it.
    pub source_ip: IpAddr,
    /// The port of the destination workload.
    pub destination_port: u16,
}

/// A policy's rule: `<namespace>/<name>` and the rule's index in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// The policy, `<namespace>/<name>`.
    pub policy: String,
    /// The index of the matching rule (from 0).
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule {}", self.policy, self.rule)
    }
}

/// Why a connection was allowed or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No ALLOW policy applies and no DENY policy matched.
    AllowedByDefault,
    /// This ALLOW rule matched.
    Allowed(RuleRef),
    /// This DENY rule matched.
    Denied(RuleRef),
    /// These ALLOW policies apply, and none matched.
    NotAllowed(Vec<String>),
}

/// The outcome and the AUDIT rules that matched along the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allowed or refused, and by what.
    pub outcome: Outcome,
    /// Matching AUDIT rules (reported, never enforced).
    pub audits: Vec<RuleRef>,
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn allowed(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::AllowedByDefault | Outcome::Allowed(_)
        )
    }

    /// The policy that decided, for logs and metrics (empty when none did).
    pub fn policy(&self) -> String {
        match &self.outcome {
            Outcome::AllowedByDefault => String::new(),
            Outcome::Allowed(rule) | Outcome::Denied(rule) => rule.policy.clone(),
            Outcome::NotAllowed(policies) => policies.join(","),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::AllowedByDefault => write!(f, "allowed: no policy restricts this workload")?,
            Outcome::Allowed(rule) => write!(f, "allowed by ALLOW {rule}")?,
            Outcome::Denied(rule) => write!(f, "denied by DENY {rule}")?,
            Outcome::NotAllowed(policies) => write!(
                f,
                "denied: no rule of the ALLOW policies {} matches",
                policies.join(", ")
            )?,
        }
        for audit in &self.audits {
            write!(f, "; audited by AUDIT {audit}")?;
        }
        Ok(())
    }
}

/// Decides `connection` against the policies that apply to its destination.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p v1::AuthorizationPolicy>,
    connection: &Connection<'_>,
) -> Decision {
    let mut denied = None;
    let mut allowed = None;
    let mut allow_policies = Vec::new();
    let mut audits = Vec::new();
    for policy in policies {
        let key = format!("{}/{}", policy.namespace, policy.name);
        let matched = policy
            .rules
            .iter()
            .position(|rule| rule_matches(rule, connection))
            .map(|rule| RuleRef {
                policy: key.clone(),
                rule,
            });
        match v1::AuthorizationAction::try_from(policy.action) {
            Ok(v1::AuthorizationAction::Deny) => {
                if denied.is_none() {
                    denied = matched;
                }
            }
            Ok(v1::AuthorizationAction::Allow) => {
                allow_policies.push(key);
                if allowed.is_none() {
                    allowed = matched;
                }
            }
            Ok(v1::AuthorizationAction::Audit) => audits.extend(matched),
            // An action this build does not know: refuse rather than guess.
            Err(_) => {
                if denied.is_none() {
                    denied = Some(RuleRef {
                        policy: key,
                        rule: 0,
                    });
                }
            }
        }
    }
    let outcome = match (denied, allowed) {
        (Some(rule), _) => Outcome::Denied(rule),
        (None, Some(rule)) => Outcome::Allowed(rule),
        (None, None) if allow_policies.is_empty() => Outcome::AllowedByDefault,
        (None, None) => Outcome::NotAllowed(allow_policies),
    };
    Decision { outcome, audits }
}

/// Whether every field the rule sets matches.
pub fn rule_matches(rule: &v1::AuthorizationRule, connection: &Connection<'_>) -> bool {
    let principal = connection.source_principal;
    let namespace = principal.and_then(namespace_of);
    let port = u32::from(connection.destination_port);
    let ip = connection.source_ip;
    let principal_in = |list: &[String]| {
        principal.is_some_and(|p| list.iter().any(|pattern| principal_matches(pattern, p)))
    };
    let namespace_in = |list: &[String]| namespace.is_some_and(|ns| list.iter().any(|n| n == ns));
    let ip_in = |list: &[String]| list.iter().any(|block| ip_block_contains(block, ip));
    (rule.principals.is_empty() || principal_in(&rule.principals))
        && !principal_in(&rule.not_principals)
        && (rule.namespaces.is_empty() || namespace_in(&rule.namespaces))
        && !namespace_in(&rule.not_namespaces)
        && (rule.ip_blocks.is_empty() || ip_in(&rule.ip_blocks))
        && !ip_in(&rule.not_ip_blocks)
        && (rule.ports.is_empty() || rule.ports.contains(&port))
        && !rule.not_ports.contains(&port)
}

/// `*` (any), `prefix*`, `*suffix`, or an exact SPIFFE ID.
pub fn principal_matches(pattern: &str, principal: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        principal.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        principal.ends_with(suffix)
    } else {
        pattern == principal
    }
}

/// The namespace of `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
pub fn namespace_of(principal: &str) -> Option<&str> {
    let path = principal.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segments = path.split('/');
    match (segments.next(), segments.next(), segments.next()) {
        (Some("ns"), Some(namespace), Some("sa")) if !namespace.is_empty() => Some(namespace),
        _ => None,
    }
}

/// Whether `block` (an IP or a CIDR, as text) contains `ip`. A block that
/// does not parse contains nothing.
pub fn ip_block_contains(block: &str, ip: IpAddr) -> bool {
    let (address, prefix) = match block.split_once('/') {
        Some((address, prefix)) => (address, prefix.parse::<u8>().ok()),
        None => (block, None),
    };
    let Ok(network) = address.parse::<IpAddr>() else {
        return false;
    };
    let ip = match (network, ip) {
        // An IPv4 block also covers the IPv4-mapped form of its addresses.
        (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        _ => ip,
    };
    match (network, ip) {
        (IpAddr::V4(network), IpAddr::V4(ip)) => {
            let bits = prefix.unwrap_or(32);
            bits <= 32
                && masked(u128::from(u32::from(network)), bits, 32)
                    == masked(u128::from(u32::from(ip)), bits, 32)
        }
        (IpAddr::V6(network), IpAddr::V6(ip)) => {
            let bits = prefix.unwrap_or(128);
            bits <= 128
                && masked(u128::from(network), bits, 128) == masked(u128::from(ip), bits, 128)
        }
        _ => false,
    }
}

fn masked(value: u128, bits: u8, width: u8) -> u128 {
    let host_bits = u32::from(width - bits.min(width));
    value.checked_shr(host_bits).unwrap_or(0)
}

#[cfg(test)]
mod tests;
