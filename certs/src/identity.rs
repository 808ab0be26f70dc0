//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The parser is strict on purpose: an identity is compared byte for byte in
//! policy and in peer verification, so two spellings of the same workload must
//! not both parse. Segments therefore follow the Kubernetes name rules they come
//! from (namespaces are DNS labels, service accounts DNS subdomains), and the
//! trust domain follows the SPIFFE character set in lower case.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// The URI scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// SPIFFE caps a whole ID at 2048 bytes.
pub const MAX_IDENTITY_LEN: usize = 2048;
/// SPIFFE caps the trust domain at 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// A Kubernetes namespace is an RFC 1123 label.
const MAX_NAMESPACE_LEN: usize = 63;
/// A Kubernetes ServiceAccount name is an RFC 1123 subdomain.
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;
/// How much of a rejected input an error message repeats.
const ECHO_LEN: usize = 120;

/// The workload identity that weft authenticates and authorizes: one per
/// Kubernetes ServiceAccount.
///
/// Construct it with [`Identity::new`] or by parsing (`"spiffe://...".parse()`);
/// both validate, so an `Identity` in hand is always well formed and its
/// [`Display`](fmt::Display) form is the canonical URI.
///
/// It is one shared string plus offsets: cloning is a reference-count bump,
/// which matters because identities key connection pools and policy lookups.
#[derive(Clone)]
pub struct Identity {
    uri: Arc<str>,
    /// End of the trust domain in `uri`.
    trust_domain_end: u16,
    /// Start of the namespace in `uri`.
    namespace_start: u16,
    /// Start of the service account in `uri`.
    service_account_start: u16,
}

/// What is wrong with a string that was meant to be a SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityProblem {
    /// The input is longer than SPIFFE allows.
    #[error("{len} bytes long, the limit is {MAX_IDENTITY_LEN}")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input does not start with `spiffe://`.
    #[error("scheme must be \"spiffe://\"")]
    WrongScheme,
    /// A part of the ID is empty.
    #[error("{part} is empty")]
    Empty {
        /// Which part: "trust domain", "namespace" or "service account".
        part: &'static str,
    },
    /// A part is longer than its own limit.
    #[error("{part} is {len} bytes long, the limit is {max}")]
    PartTooLong {
        /// Which part.
        part: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit for that part.
        max: usize,
    },
    /// A part contains a character it may not contain.
    #[error("{part} contains {found:?}; allowed are {allowed}")]
    BadCharacter {
        /// Which part.
        part: &'static str,
        /// The first offending character.
        found: char,
        /// The allowed character set, for the message.
        allowed: &'static str,
    },
    /// A part starts or ends with a character that may only appear inside.
    #[error("{part} must start and end with a lower-case letter or digit")]
    BadEdge {
        /// Which part.
        part: &'static str,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("path must be /ns/<namespace>/sa/<service-account>, found {path:?}")]
    WrongPath {
        /// The path as found (shortened if long).
        path: String,
    },
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, Error> {
        let candidate = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let checked = validate_trust_domain(trust_domain)
            .and_then(|()| validate_namespace(namespace))
            .and_then(|()| validate_service_account(service_account));
        // Checking the parts first gives the precise problem even when a
        // part contains a '/' that would shift the parse of the whole.
        checked
            .and_then(|()| parse_parts(&candidate))
            .map_err(|problem| invalid(&candidate, problem))?;
        Identity::parse(&candidate)
    }

    /// Parses and validates a SPIFFE ID.
    pub fn parse(input: &str) -> Result<Identity, Error> {
        Identity::parse_shared(Arc::from(input))
    }

    /// Parses and validates a SPIFFE ID held in a shared string, which the
    /// identity then shares instead of copying: for a holder of many
    /// identities of few ServiceAccounts (a node proxy's view of a large
    /// cluster).
    pub fn parse_shared(input: Arc<str>) -> Result<Identity, Error> {
        parse_parts(&input)
            .map(
                |[trust_domain_end, namespace_start, service_account_start]| Identity {
                    uri: input.clone(),
                    trust_domain_end,
                    namespace_start,
                    service_account_start,
                },
            )
            .map_err(|problem| invalid(&input, problem))
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.trust_domain_end)]
    }

    /// The Kubernetes namespace of the workload.
    pub fn namespace(&self) -> &str {
        // The namespace ends where "/sa/" begins.
        &self.uri[usize::from(self.namespace_start)..usize::from(self.service_account_start) - 4]
    }

    /// The Kubernetes ServiceAccount of the workload.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.service_account_start)..]
    }

    /// The canonical URI, as a string slice.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

// Equality, ordering and hashing are those of the canonical URI; the offsets
// follow from it.
impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for Identity {}

impl Hash for Identity {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.uri.hash(state);
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.uri.cmp(&other.uri)
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Identity::parse(input)
    }
}

/// Checks a trust domain on its own, e.g. one given in configuration.
pub fn validate_trust_domain_name(trust_domain: &str) -> Result<(), Error> {
    validate_trust_domain(trust_domain).map_err(|problem| Error::InvalidTrustDomain {
        input: echo(trust_domain),
        problem,
    })
}

fn invalid(input: &str, problem: IdentityProblem) -> Error {
    Error::InvalidIdentity {
        input: echo(input),
        problem,
    }
}

/// Shortens hostile input before it goes into a log line.
fn echo(input: &str) -> String {
    match input.char_indices().nth(ECHO_LEN) {
        Some((cut, _)) => format!("{}...", &input[..cut]),
        None => input.to_owned(),
    }
}

/// Validates a SPIFFE ID; the offsets of its parts: the end of the trust
/// domain, the start of the namespace and of the service account.
fn parse_parts(input: &str) -> Result<[u16; 3], IdentityProblem> {
    if input.len() > MAX_IDENTITY_LEN {
        return Err(IdentityProblem::TooLong { len: input.len() });
    }
    let rest = input
        .strip_prefix(SCHEME)
        .ok_or(IdentityProblem::WrongScheme)?;
    let (trust_domain, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    validate_trust_domain(trust_domain)?;

    let wrong_path = || IdentityProblem::WrongPath { path: echo(path) };
    let mut segments = path.split('/');
    // The path starts with '/', so the first segment is always empty.
    let _ = segments.next();
    let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(wrong_path());
    };
    validate_namespace(namespace)?;
    validate_service_account(service_account)?;
    // All offsets fit: the whole input is at most MAX_IDENTITY_LEN bytes.
    let offset = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    let trust_domain_end = SCHEME.len() + trust_domain.len();
    let namespace_start = trust_domain_end + "/ns/".len();
    let service_account_start = namespace_start + namespace.len() + "/sa/".len();
    Ok([
        offset(trust_domain_end),
        offset(namespace_start),
        offset(service_account_start),
    ])
}

fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityProblem> {
    const PART: &str = "trust domain";
    check_part(PART, trust_domain, MAX_TRUST_DOMAIN_LEN)?;
    check_chars(PART, trust_domain, "a-z 0-9 . - _", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
    })
}

fn validate_namespace(namespace: &str) -> Result<(), IdentityProblem> {
    const PART: &str = "namespace";
    check_part(PART, namespace, MAX_NAMESPACE_LEN)?;
    check_chars(PART, namespace, "a-z 0-9 -", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })?;
    check_edges(PART, namespace)
}

fn validate_service_account(service_account: &str) -> Result<(), IdentityProblem> {
    const PART: &str = "service account";
    check_part(PART, service_account, MAX_SERVICE_ACCOUNT_LEN)?;
    check_chars(PART, service_account, "a-z 0-9 - .", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')
    })?;
    check_edges(PART, service_account)
}

fn check_part(part: &'static str, value: &str, max: usize) -> Result<(), IdentityProblem> {
    if value.is_empty() {
        return Err(IdentityProblem::Empty { part });
    }
    if value.len() > max {
        return Err(IdentityProblem::PartTooLong {
            part,
            len: value.len(),
            max,
        });
    }
    Ok(())
}

fn check_chars(
    part: &'static str,
    value: &str,
    allowed: &'static str,
    is_allowed: impl Fn(char) -> bool,
) -> Result<(), IdentityProblem> {
    match value.chars().find(|&c| !is_allowed(c)) {
        Some(found) => Err(IdentityProblem::BadCharacter {
            part,
            found,
            allowed,
        }),
        None => Ok(()),
    }
}

fn check_edges(part: &'static str, value: &str) -> Result<(), IdentityProblem> {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if alnum(value.chars().next()) && alnum(value.chars().last()) {
        Ok(())
    } else {
        Err(IdentityProblem::BadEdge { part })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(input: &str) -> IdentityProblem {
        match Identity::parse(input) {
            Err(Error::InvalidIdentity { problem, .. }) => problem,
            other => panic!("{input:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn parses_and_formats_round_trip() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/web-frontend").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web-frontend");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/web-frontend"
        );
        assert_eq!(
            Identity::new("cluster.local", "default", "web-frontend").unwrap(),
            id
        );
    }

    #[test]
    fn exposes_the_canonical_uri() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            format!("{id:?}"),
            "Identity(spiffe://cluster.local/ns/default/sa/web)"
        );
    }

    #[test]
    fn accessors_work_at_the_length_limits() {
        let td = "t".repeat(MAX_TRUST_DOMAIN_LEN);
        let ns = "n".repeat(63);
        let sa = "s".repeat(253);
        let id = Identity::new(&td, &ns, &sa).unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            (&*td, &*ns, &*sa)
        );
        let id = Identity::new("a", "b", "c").unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("a", "b", "c")
        );
    }

    #[test]
    fn service_accounts_may_contain_dots() {
        let id: Identity = "spiffe://td/ns/a/sa/b.c".parse().unwrap();
        assert_eq!(id.service_account(), "b.c");
    }

    #[test]
    fn refuses_wrong_scheme() {
        assert_eq!(
            problem("https://cluster.local/ns/a/sa/b"),
            IdentityProblem::WrongScheme
        );
        assert_eq!(
            problem("SPIFFE://cluster.local/ns/a/sa/b"),
            IdentityProblem::WrongScheme
        );
        assert_eq!(problem(""), IdentityProblem::WrongScheme);
    }

    #[test]
    fn refuses_empty_segments() {
        assert_eq!(
            problem("spiffe:///ns/a/sa/b"),
            IdentityProblem::Empty {
                part: "trust domain"
            }
        );
        assert_eq!(
            problem("spiffe://td/ns//sa/b"),
            IdentityProblem::Empty { part: "namespace" }
        );
        assert_eq!(
            problem("spiffe://td/ns/a/sa/"),
            IdentityProblem::Empty {
                part: "service account"
            }
        );
    }

    #[test]
    fn refuses_extra_or_missing_segments() {
        for path in [
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/a",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/sa/b/ns/a",
            "spiffe://td//ns/a/sa/b",
        ] {
            assert!(
                matches!(problem(path), IdentityProblem::WrongPath { .. }),
                "{path}"
            );
        }
    }

    #[test]
    fn refuses_bad_characters() {
        for (input, part, found) in [
            ("spiffe://Cluster.local/ns/a/sa/b", "trust domain", 'C'),
            ("spiffe://td:443/ns/a/sa/b", "trust domain", ':'),
            ("spiffe://user@td/ns/a/sa/b", "trust domain", '@'),
            ("spiffe://td/ns/a_b/sa/b", "namespace", '_'),
            ("spiffe://td/ns/a/sa/b?x=1", "service account", '?'),
            ("spiffe://td/ns/a/sa/b%2Fc", "service account", '%'),
            ("spiffe://td/ns/ä/sa/b", "namespace", 'ä'),
        ] {
            assert!(
                matches!(problem(input), IdentityProblem::BadCharacter { part: p, found: f, .. } if p == part && f == found),
                "{input}: {:?}",
                problem(input)
            );
        }
        assert_eq!(
            problem("spiffe://td/ns/-a/sa/b"),
            IdentityProblem::BadEdge { part: "namespace" }
        );
        assert_eq!(
            problem("spiffe://td/ns/a/sa/b."),
            IdentityProblem::BadEdge {
                part: "service account"
            }
        );
    }

    #[test]
    fn refuses_over_long_input_and_parts() {
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(MAX_IDENTITY_LEN));
        assert!(matches!(problem(&long), IdentityProblem::TooLong { .. }));
        let long_ns = format!("spiffe://td/ns/{}/sa/b", "a".repeat(64));
        assert_eq!(
            problem(&long_ns),
            IdentityProblem::PartTooLong {
                part: "namespace",
                len: 64,
                max: 63
            }
        );
        let long_td = format!("spiffe://{}/ns/a/sa/b", "t".repeat(256));
        assert!(matches!(
            problem(&long_td),
            IdentityProblem::PartTooLong {
                part: "trust domain",
                ..
            }
        ));
    }

    #[test]
    fn error_message_names_the_input_and_the_problem() {
        let err = Identity::parse("spiffe://td/ns/a/sa/B")
            .unwrap_err()
            .to_string();
        assert!(err.contains("spiffe://td/ns/a/sa/B"), "{err}");
        assert!(err.contains("service account contains 'B'"), "{err}");
    }

    #[test]
    fn error_message_does_not_echo_huge_input() {
        let huge = "x".repeat(100_000);
        let err = Identity::parse(&huge).unwrap_err().to_string();
        assert!(err.len() < 400, "{} bytes", err.len());
    }

    #[test]
    fn new_validates_its_parts() {
        assert!(Identity::new("cluster.local", "ns", "sa/../x").is_err());
        assert!(Identity::new("", "ns", "sa").is_err());
        assert!(validate_trust_domain_name("cluster.local").is_ok());
        assert!(validate_trust_domain_name("bad/domain").is_err());
    }
}
