//! What an [`AuthorizationPolicy`](v1::AuthorizationPolicy) means: the one
//! decision that the node proxy enforces and the control plane's `explain`
//! prints, so that the two cannot disagree.
//!
//! A wire policy is compiled once, when a config is applied
//! ([`Policy::compile`]): principal patterns, address blocks and ports are
//! parsed into typed values then, and a value that does not parse refuses
//! the policy with an [`Error`] naming the field. Per connection nothing is
//! parsed.
//!
//! Order of decision ([`decide`]): a quarantined workload refuses
//! everything; plaintext into a STRICT workload is refused; a policy the
//! workload refers to but that is not applied (refused as invalid) refuses
//! everything (fail closed); any matching DENY
//! refuses; otherwise, if any ALLOW policy applies to the workload, one of
//! them must match; otherwise the connection is allowed. AUDIT policies
//! never change the outcome; the ones that match are reported next to it.

use std::fmt;
use std::net::IpAddr;

use crate::{Error, v1};

/// What the destination proxy knows about a new connection.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The source's SPIFFE ID, verified by mutual TLS (or, for two pods of
    /// one node, known from the node's config); `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The source's address as the destination sees it.
    pub source_ip: IpAddr,
    /// The port of the destination workload.
    pub destination_port: u16,
}

/// What the decision needs to know about the destination workload.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    /// Whether plaintext is refused (mTLS mode STRICT).
    pub mtls_strict: bool,
    /// The MtlsPolicy that set the mode, `<namespace>/<name>` (empty: the
    /// default).
    pub mtls_policy: &'a str,
    /// The keys of the AuthorizationPolicies that apply to the workload.
    pub policies: &'a [String],
    /// Those of `policies` that were refused as invalid.
    pub invalid_policies: &'a [String],
    /// Why every connection to the workload is refused, if it is.
    pub quarantine: Option<&'a str>,
}

/// A compiled AuthorizationPolicy: every value parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `<namespace>/<name>`.
    pub key: String,
    /// What a match means.
    pub action: Action,
    /// The rules; the policy matches when any does.
    pub rules: Vec<Rule>,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Admit (and once any ALLOW applies, only what one matches).
    Allow,
    /// Refuse.
    Deny,
    /// Report only.
    Audit,
}

impl Action {
    /// The name operators write: `ALLOW`, `DENY`, `AUDIT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// A compiled rule: matches when every field it sets matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Source principals, any of which must match (empty: any source).
    pub principals: Vec<PrincipalPattern>,
    /// Source principals none of which may match.
    pub not_principals: Vec<PrincipalPattern>,
    /// Namespaces of the source's identity.
    pub namespaces: Vec<String>,
    /// Namespaces the source's identity must not be in.
    pub not_namespaces: Vec<String>,
    /// Source address blocks.
    pub ip_blocks: Vec<IpBlock>,
    /// Source address blocks that must not contain the source.
    pub not_ip_blocks: Vec<IpBlock>,
    /// Destination ports.
    pub ports: Vec<u16>,
    /// Destination ports that must not match.
    pub not_ports: Vec<u16>,
}

/// A principal pattern: `*`, `prefix*`, `*suffix` or an exact SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrincipalPattern {
    /// `*`: any authenticated source.
    Any,
    /// `<prefix>*`.
    Prefix(String),
    /// `*<suffix>`.
    Suffix(String),
    /// An exact SPIFFE ID.
    Exact(String),
}

impl PrincipalPattern {
    /// Parses a pattern; a `*` anywhere but at one end, or an empty
    /// pattern, is refused.
    pub fn parse(text: &str) -> Result<PrincipalPattern, String> {
        let pattern = if text == "*" {
            PrincipalPattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            PrincipalPattern::Prefix(prefix.to_owned())
        } else if let Some(suffix) = text.strip_prefix('*') {
            PrincipalPattern::Suffix(suffix.to_owned())
        } else {
            PrincipalPattern::Exact(text.to_owned())
        };
        let rest = match &pattern {
            PrincipalPattern::Any => "",
            PrincipalPattern::Prefix(s)
            | PrincipalPattern::Suffix(s)
            | PrincipalPattern::Exact(s) => s,
        };
        if text.is_empty() {
            return Err("empty principal pattern".to_owned());
        }
        if rest.contains('*') {
            return Err(format!(
                "{text:?}: `*` may only stand alone, at the start or at the end"
            ));
        }
        if rest.chars().any(char::is_whitespace) {
            return Err(format!("{text:?}: contains whitespace"));
        }
        Ok(pattern)
    }

    /// Whether `principal` matches.
    pub fn matches(&self, principal: &str) -> bool {
        match self {
            PrincipalPattern::Any => true,
            PrincipalPattern::Prefix(prefix) => principal.starts_with(prefix.as_str()),
            PrincipalPattern::Suffix(suffix) => principal.ends_with(suffix.as_str()),
            PrincipalPattern::Exact(exact) => principal == exact,
        }
    }
}

/// An address block: a network address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// Parses an IP address or a CIDR (`10.0.0.0/8`, `fd00::/8`,
    /// `192.0.2.7`). Host bits may be set; they are ignored.
    pub fn parse(text: &str) -> Result<IpBlock, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = address
            .parse::<IpAddr>()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(digits) => digits
                .parse::<u8>()
                .ok()
                .filter(|bits| *bits <= width && !digits.starts_with('+'))
                .ok_or_else(|| {
                    format!("{text:?}: the prefix length must be a number from 0 to {width}")
                })?,
        };
        Ok(IpBlock { network, prefix })
    }

    /// Whether `ip` is in the block. An IPv4 block also covers the
    /// IPv4-mapped IPv6 form of its addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(network)), self.prefix, 32)
                    == masked(u128::from(u32::from(ip)), self.prefix, 32)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                masked(u128::from(network), self.prefix, 128)
                    == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn masked(value: u128, bits: u8, width: u8) -> u128 {
    let host_bits = u32::from(width - bits.min(width));
    value.checked_shr(host_bits).unwrap_or(0)
}

impl Policy {
    /// Compiles a wire policy, refusing a value that does not parse. The
    /// field names in errors are the CRD's (`rules[0].from.ipBlocks[1]`).
    pub fn compile(wire: &v1::AuthorizationPolicy) -> Result<Policy, Error> {
        let key = format!("{}/{}", wire.namespace, wire.name);
        let invalid = |field: String, problem: String| Error::InvalidAuthorizationPolicy {
            policy: key.clone(),
            field,
            problem,
        };
        if wire.namespace.is_empty() || wire.name.is_empty() {
            return Err(invalid(
                "metadata".into(),
                "namespace or name is empty".into(),
            ));
        }
        let action = match v1::AuthorizationAction::try_from(wire.action) {
            Ok(v1::AuthorizationAction::Allow) => Action::Allow,
            Ok(v1::AuthorizationAction::Deny) => Action::Deny,
            Ok(v1::AuthorizationAction::Audit) => Action::Audit,
            Err(_) => {
                return Err(invalid(
                    "action".into(),
                    format!("unknown action {}", wire.action),
                ));
            }
        };
        let mut rules = Vec::with_capacity(wire.rules.len());
        for (index, rule) in wire.rules.iter().enumerate() {
            let field = |name: &str, i: usize| format!("rules[{index}].{name}[{i}]");
            let principals = |list: &[String], name: &str| {
                list.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        PrincipalPattern::parse(p).map_err(|e| invalid(field(name, i), e))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let blocks = |list: &[String], name: &str| {
                list.iter()
                    .enumerate()
                    .map(|(i, b)| IpBlock::parse(b).map_err(|e| invalid(field(name, i), e)))
                    .collect::<Result<Vec<_>, _>>()
            };
            let ports = |list: &[u32], name: &str| {
                list.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                            invalid(field(name, i), format!("{p} is not a port (1-65535)"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let namespaces = |list: &[String], name: &str| {
                list.iter()
                    .enumerate()
                    .map(|(i, n)| {
                        if n.is_empty() {
                            Err(invalid(field(name, i), "empty namespace".into()))
                        } else {
                            Ok(n.clone())
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            rules.push(Rule {
                principals: principals(&rule.principals, "from.principals")?,
                not_principals: principals(&rule.not_principals, "from.notPrincipals")?,
                namespaces: namespaces(&rule.namespaces, "from.namespaces")?,
                not_namespaces: namespaces(&rule.not_namespaces, "from.notNamespaces")?,
                ip_blocks: blocks(&rule.ip_blocks, "from.ipBlocks")?,
                not_ip_blocks: blocks(&rule.not_ip_blocks, "from.notIpBlocks")?,
                ports: ports(&rule.ports, "to.ports")?,
                not_ports: ports(&rule.not_ports, "to.notPorts")?,
            });
        }
        Ok(Policy { key, action, rules })
    }
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
    /// Plaintext into a workload whose mTLS mode is STRICT (set by this
    /// MtlsPolicy).
    PlaintextRefused(String),
    /// A policy that applies to the workload is not applied (it was refused
    /// as invalid): the workload refuses every connection until it is.
    PolicyNotApplied(String),
    /// The workload refuses every connection, for this reason.
    Quarantined(String),
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
            Outcome::PlaintextRefused(policy) | Outcome::PolicyNotApplied(policy) => policy.clone(),
            Outcome::Quarantined(_) => String::new(),
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
            Outcome::PlaintextRefused(policy) => write!(
                f,
                "denied: plaintext is refused, mTLS mode STRICT set by MtlsPolicy {policy}"
            )?,
            Outcome::PolicyNotApplied(policy) => write!(
                f,
                "denied: AuthorizationPolicy {policy} applies to this workload but is not applied (invalid); every connection is refused until it is fixed"
            )?,
            Outcome::Quarantined(reason) => {
                write!(f, "denied: the workload refuses every connection: {reason}")?
            }
        }
        for audit in &self.audits {
            write!(f, "; audited by AUDIT {audit}")?;
        }
        Ok(())
    }
}

/// Decides `connection` to `destination`, whose policies `lookup` finds by
/// key. This is the whole decision: the proxy's every path and `explain`
/// call it.
pub fn decide<'p>(
    destination: &Destination<'_>,
    lookup: impl Fn(&str) -> Option<&'p Policy>,
    connection: &Connection<'_>,
) -> Decision {
    let refuse = |outcome| Decision {
        outcome,
        audits: Vec::new(),
    };
    if let Some(reason) = destination.quarantine {
        return refuse(Outcome::Quarantined(reason.to_owned()));
    }
    if connection.source_principal.is_none() && destination.mtls_strict {
        return refuse(Outcome::PlaintextRefused(
            destination.mtls_policy.to_owned(),
        ));
    }
    if let Some(invalid) = destination.invalid_policies.first() {
        return refuse(Outcome::PolicyNotApplied(invalid.clone()));
    }
    let mut policies = Vec::with_capacity(destination.policies.len());
    for key in destination.policies {
        match lookup(key) {
            Some(policy) => policies.push(policy),
            None => return refuse(Outcome::PolicyNotApplied(key.clone())),
        }
    }
    evaluate(policies, connection)
}

/// Decides `connection` against the policies that apply to its destination
/// (the AuthorizationPolicy part of [`decide`]).
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    connection: &Connection<'_>,
) -> Decision {
    let mut denied = None;
    let mut allowed = None;
    let mut allow_policies = Vec::new();
    let mut audits = Vec::new();
    for policy in policies {
        let matched = policy
            .rules
            .iter()
            .position(|rule| rule.matches(connection))
            .map(|rule| RuleRef {
                policy: policy.key.clone(),
                rule,
            });
        match policy.action {
            Action::Deny => {
                if denied.is_none() {
                    denied = matched;
                }
            }
            Action::Allow => {
                allow_policies.push(policy.key.clone());
                if allowed.is_none() {
                    allowed = matched;
                }
            }
            Action::Audit => audits.extend(matched),
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

impl Rule {
    /// Whether every field the rule sets matches.
    pub fn matches(&self, connection: &Connection<'_>) -> bool {
        let principal = connection.source_principal;
        let namespace = principal.and_then(namespace_of);
        let port = connection.destination_port;
        let ip = connection.source_ip;
        let principal_in = |list: &[PrincipalPattern]| {
            principal.is_some_and(|p| list.iter().any(|pattern| pattern.matches(p)))
        };
        let namespace_in =
            |list: &[String]| namespace.is_some_and(|ns| list.iter().any(|n| n == ns));
        let ip_in = |list: &[IpBlock]| list.iter().any(|block| block.contains(ip));
        (self.principals.is_empty() || principal_in(&self.principals))
            && !principal_in(&self.not_principals)
            && (self.namespaces.is_empty() || namespace_in(&self.namespaces))
            && !namespace_in(&self.not_namespaces)
            && (self.ip_blocks.is_empty() || ip_in(&self.ip_blocks))
            && !ip_in(&self.not_ip_blocks)
            && (self.ports.is_empty() || self.ports.contains(&port))
            && !self.not_ports.contains(&port)
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

#[cfg(test)]
mod tests;
