//! The API server's ServiceAccount token signing keys (its JWKS, served at
//! `/openid/v1/jwks`), to check a node token's signature before it costs a
//! TokenReview. Claims anyone can write; a signature only the API server
//! can make. A forged token is refused here, without an API request.
//!
//! The review still decides: a good signature does not say whether the pod
//! the token is bound to still exists, or which node it runs on. And when
//! the keys cannot be had (an API server without issuer discovery, or no
//! access to it), tokens go to review as before: this check only saves
//! reviews, it never admits a token on its own.
//!
//! Keys are fetched at first use, and again when a token names a key not
//! known yet (the API server rotated its key), at most once per refresh
//! interval, so tokens naming made-up keys cannot turn into a flood of
//! fetches.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine as _;
use serde::Deserialize;
use tracing::{debug, info, warn};

/// Keys kept from one JWKS at most (an API server has one or a few).
const MAX_KEYS: usize = 64;

/// How long fetching the keys may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the signature says about a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by one of the API server's keys.
    Signed,
    /// Not signed by any of them: refuse without review.
    Forged(String),
    /// Names a key not known yet, and the keys were fetched too recently
    /// to fetch them again: try again later (the API server may have
    /// just rotated its key).
    NotYet,
    /// Cannot tell (no keys, or a key of a kind not checked here).
    Unknown,
}

/// One public key of the JWKS.
#[derive(Debug, Clone)]
enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (0x04, x, y) on P-256 or P-384.
    Ec {
        p384: bool,
        point: Vec<u8>,
    },
    /// A key the API server may sign with that aws-lc-rs does not check (a
    /// P-521 key, for ES512): its tokens are left to the review.
    Unchecked,
}

/// The fields of a JWK this reads.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

/// The keys, and when they were last asked for.
#[derive(Default)]
struct Known {
    by_kid: HashMap<String, PublicKey>,
    /// Keys without a `kid` (tried for every token without one).
    unnamed: Vec<PublicKey>,
    /// Whether a fetch ever succeeded.
    fetched: bool,
    /// When the last successful fetch was made.
    fetched_at: Option<SystemTime>,
    last_attempt: Option<Instant>,
}

impl Known {
    fn has_key_for(&self, jwt: &SignedJwt<'_>) -> bool {
        match &jwt.kid {
            Some(kid) => self.by_kid.contains_key(kid),
            None => !self.unnamed.is_empty() || !self.by_kid.is_empty(),
        }
    }

    fn verdict(&self, jwt: &SignedJwt<'_>) -> Verdict {
        if !self.fetched {
            return Verdict::Unknown;
        }
        let candidates: Vec<&PublicKey> = match &jwt.kid {
            Some(kid) => self.by_kid.get(kid).into_iter().collect(),
            None => self.unnamed.iter().chain(self.by_kid.values()).collect(),
        };
        if candidates.is_empty() {
            return Verdict::Forged(
                "the node token names a key the API server does not have".into(),
            );
        }
        let mut checked = false;
        for key in candidates {
            match jwt.verify_with(key) {
                Some(true) => return Verdict::Signed,
                Some(false) => checked = true,
                None => {}
            }
        }
        if checked {
            Verdict::Forged("the node token's signature does not check out".into())
        } else {
            Verdict::Unknown
        }
    }
}

fn not_signed() -> Verdict {
    Verdict::Forged("the node token is not a signed JWT".into())
}

/// The verdict on `token` with the keys of the JWKS document `jwks` (for
/// the fuzz target: both come from outside).
pub fn verdict_with_jwks(jwks: &[u8], token: &str) -> Verdict {
    let Ok(set) = serde_json::from_slice::<JwkSet>(jwks) else {
        return Verdict::Unknown;
    };
    let (by_kid, unnamed) = read_keys(set);
    let known = Known {
        by_kid,
        unnamed,
        fetched: true,
        fetched_at: None,
        last_attempt: None,
    };
    match SignedJwt::read(token) {
        Some(jwt) => known.verdict(&jwt),
        None => not_signed(),
    }
}

/// The API server's signing keys, fetched as needed.
pub struct SigningKeys {
    client: Option<kube::Client>,
    refresh_interval: Duration,
    /// A tokio mutex: one fetch at a time, and tokens wait for it.
    known: tokio::sync::Mutex<Known>,
}

impl SigningKeys {
    /// Keys from `client`'s API server, fetched again at most every
    /// `refresh_interval`.
    pub fn new(client: kube::Client, refresh_interval: Duration) -> SigningKeys {
        SigningKeys {
            client: Some(client),
            refresh_interval,
            known: tokio::sync::Mutex::default(),
        }
    }

    /// Checks `token`'s signature.
    pub async fn check(&self, token: &str) -> Verdict {
        let Some(jwt) = SignedJwt::read(token) else {
            return not_signed();
        };
        let mut known = self.known.lock().await;
        if !known.has_key_for(&jwt) {
            if !self.may_fetch(&known) {
                return match known.fetched_at {
                    // Issued since the keys were fetched, under a key they
                    // did not have: perhaps a new one.
                    Some(at) if jwt.issued_after(at) => Verdict::NotYet,
                    // Issued before: the key would have been there.
                    Some(_) => known.verdict(&jwt),
                    None => Verdict::Unknown,
                };
            }
            self.fetch(&mut known).await;
        }
        known.verdict(&jwt)
    }

    fn may_fetch(&self, known: &Known) -> bool {
        known
            .last_attempt
            .is_none_or(|at| at.elapsed() >= self.refresh_interval)
    }

    async fn fetch(&self, known: &mut Known) {
        known.last_attempt = Some(Instant::now());
        let Some(client) = &self.client else {
            return;
        };
        let request = match http::Request::get("/openid/v1/jwks").body(Vec::new()) {
            Ok(request) => request,
            Err(error) => {
                warn!(%error, "building the JWKS request");
                return;
            }
        };
        // Tokens wait for this fetch (under the lock): bounded, like a
        // review would be.
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, client.request::<JwkSet>(request)).await;
        match fetched {
            Err(_) => warn!(
                after = ?FETCH_TIMEOUT,
                "fetching the API server's token signing keys timed out; node tokens are reviewed meanwhile"
            ),
            Ok(Ok(set)) => {
                let (by_kid, unnamed) = read_keys(set);
                info!(
                    keys = by_kid.len() + unnamed.len(),
                    "fetched the API server's token signing keys"
                );
                known.by_kid = by_kid;
                known.unnamed = unnamed;
                known.fetched = true;
                known.fetched_at = Some(SystemTime::now());
            }
            Ok(Err(error)) => {
                // Reviews decide alone meanwhile; log once per attempt.
                warn!(%error, "cannot fetch the API server's token signing keys (/openid/v1/jwks); every node token costs a TokenReview");
            }
        }
    }

    #[cfg(test)]
    fn with_keys(set: JwkSet) -> SigningKeys {
        let (by_kid, unnamed) = read_keys(set);
        SigningKeys {
            client: None,
            refresh_interval: Duration::from_secs(3600),
            known: tokio::sync::Mutex::new(Known {
                by_kid,
                unnamed,
                fetched: true,
                fetched_at: Some(SystemTime::now()),
                last_attempt: Some(Instant::now()),
            }),
        }
    }
}

/// The usable keys of `set`, by `kid` and without one.
fn read_keys(set: JwkSet) -> (HashMap<String, PublicKey>, Vec<PublicKey>) {
    let (mut by_kid, mut unnamed) = (HashMap::new(), Vec::new());
    for jwk in set.keys.into_iter().take(MAX_KEYS) {
        let Some(key) = public_key(&jwk) else {
            debug!(kty = %jwk.kty, "a JWK of a kind not checked here");
            continue;
        };
        match jwk.kid {
            Some(kid) => {
                by_kid.insert(kid, key);
            }
            None => unnamed.push(key),
        }
    }
    (by_kid, unnamed)
}

fn public_key(jwk: &Jwk) -> Option<PublicKey> {
    let decode = |field: &Option<String>| base64url(field.as_deref()?);
    match jwk.kty.as_str() {
        "RSA" => Some(PublicKey::Rsa {
            n: decode(&jwk.n)?,
            e: decode(&jwk.e)?,
        }),
        "EC" => {
            let (p384, size) = match jwk.crv.as_deref()? {
                "P-256" => (false, 32),
                "P-384" => (true, 48),
                "P-521" => return Some(PublicKey::Unchecked),
                _ => return None,
            };
            let (x, y) = (decode(&jwk.x)?, decode(&jwk.y)?);
            if x.len() != size || y.len() != size {
                return None;
            }
            let mut point = vec![0x04];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Some(PublicKey::Ec { p384, point })
        }
        _ => None,
    }
}

fn base64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

/// A JWT split for checking: what was signed, the signature, and the
/// header's algorithm and key id.
struct SignedJwt<'a> {
    signed: &'a str,
    signature: Vec<u8>,
    alg: String,
    kid: Option<String>,
    /// The `iat` claim (unverified), in seconds since the epoch.
    issued_at: Option<u64>,
}

#[derive(Deserialize)]
struct IssuedAt {
    #[serde(default)]
    iat: Option<u64>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

impl<'a> SignedJwt<'a> {
    fn read(token: &'a str) -> Option<SignedJwt<'a>> {
        let (signed, signature) = token.rsplit_once('.')?;
        let (header, payload) = signed.split_once('.')?;
        if header.len() > 4096 || signature.len() > 4096 || payload.len() > 16 * 1024 {
            return None;
        }
        let header: Header = serde_json::from_slice(&base64url(header)?).ok()?;
        let issued_at = base64url(payload)
            .and_then(|json| serde_json::from_slice::<IssuedAt>(&json).ok())
            .and_then(|claims| claims.iat);
        Some(SignedJwt {
            signed,
            signature: base64url(signature)?,
            alg: header.alg,
            kid: header.kid,
            issued_at,
        })
    }

    /// Whether the token says it was issued after `at` (allowing a
    /// minute of clock skew); one without `iat` does not.
    fn issued_after(&self, at: SystemTime) -> bool {
        let at = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.issued_at
            .is_some_and(|iat| iat.saturating_add(60) >= at)
    }

    /// Whether `key` signed this; `None` for a key aws-lc-rs does not check
    /// (P-521, for ES512). Any algorithm that does not fit the key is not
    /// the API server's signature.
    fn verify_with(&self, key: &PublicKey) -> Option<bool> {
        let message = self.signed.as_bytes();
        let signature = self.signature.as_slice();
        let verified = match (self.alg.as_str(), key) {
            ("RS256", PublicKey::Rsa { n, e }) => RsaPublicKeyComponents { n, e }.verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                message,
                signature,
            ),
            ("RS384", PublicKey::Rsa { n, e }) => RsaPublicKeyComponents { n, e }.verify(
                &signature::RSA_PKCS1_2048_8192_SHA384,
                message,
                signature,
            ),
            ("RS512", PublicKey::Rsa { n, e }) => RsaPublicKeyComponents { n, e }.verify(
                &signature::RSA_PKCS1_2048_8192_SHA512,
                message,
                signature,
            ),
            ("ES256", PublicKey::Ec { p384: false, point }) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
            }
            ("ES384", PublicKey::Ec { p384: true, point }) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, signature)
            }
            ("ES512", PublicKey::Unchecked) => return None,
            _ => return Some(false),
        };
        Some(verified.is_ok())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    use super::*;

    fn encode(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An ES256 key pair, and its JWK named `kid`.
    fn key(kid: &str) -> (EcdsaKeyPair, Jwk) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = Jwk {
            kty: "EC".into(),
            kid: Some(kid.into()),
            n: None,
            e: None,
            crv: Some("P-256".into()),
            x: Some(encode(&point[1..33])),
            y: Some(encode(&point[33..65])),
        };
        (pair, jwk)
    }

    fn token(pair: &EcdsaKeyPair, kid: &str, claims: &str) -> String {
        let header = format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#);
        let signed = format!(
            "{}.{}",
            encode(header.as_bytes()),
            encode(claims.as_bytes())
        );
        let signature = pair.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", encode(signature.as_ref()))
    }

    #[tokio::test]
    async fn the_api_servers_signature_passes_and_forgeries_do_not() {
        let (api_server, jwk) = key("api");
        let (forger, _) = key("api");
        let keys = SigningKeys::with_keys(JwkSet { keys: vec![jwk] });
        let claims = r#"{"sub":"system:serviceaccount:weft-system:weft-node-proxy"}"#;

        assert_eq!(
            keys.check(&token(&api_server, "api", claims)).await,
            Verdict::Signed
        );
        // Another key under the same name; the claims changed after
        // signing; a key the API server does not have; no signature.
        let forged = token(&forger, "api", claims);
        assert!(matches!(keys.check(&forged).await, Verdict::Forged(_)));
        let genuine = token(&api_server, "api", claims);
        let (signed, signature) = genuine.rsplit_once('.').unwrap();
        let (header, _) = signed.split_once('.').unwrap();
        let altered = format!("{header}.{}.{signature}", encode(b"{\"sub\":\"me\"}"));
        assert!(matches!(keys.check(&altered).await, Verdict::Forged(_)));
        // A key not known yet, with the keys just fetched: a token issued
        // since may be under a new key (later), one issued before is not.
        let elsewhere = token(&api_server, "other", claims);
        assert!(matches!(keys.check(&elsewhere).await, Verdict::Forged(_)));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let fresh = format!(r#"{{"iat":{}}}"#, now.as_secs());
        let new_key = token(&api_server, "other", &fresh);
        assert_eq!(keys.check(&new_key).await, Verdict::NotYet);
        assert!(matches!(
            keys.check(&format!("{signed}.")).await,
            Verdict::Forged(_)
        ));
        assert!(matches!(keys.check("not-a-jwt").await, Verdict::Forged(_)));
        // An algorithm the API server does not sign with is a forgery;
        // one it may use and aws-lc-rs does not check is left to the review.
        let with_alg = |alg: &str| {
            let header = format!(r#"{{"alg":"{alg}","kid":"api"}}"#);
            format!("{}.{}.c2ln", encode(header.as_bytes()), encode(b"{}"))
        };
        for alg in ["HS256", "none", "ES512", "RS256"] {
            let verdict = keys.check(&with_alg(alg)).await;
            assert!(matches!(verdict, Verdict::Forged(_)), "{alg}: {verdict:?}");
        }
        // A P-521 key (ES512) is left to the review, and only for tokens
        // naming it.
        let p521 = Jwk {
            kty: "EC".into(),
            kid: Some("p521".into()),
            n: None,
            e: None,
            crv: Some("P-521".into()),
            x: Some(encode(&[1; 66])),
            y: Some(encode(&[2; 66])),
        };
        let keys = SigningKeys::with_keys(JwkSet {
            keys: vec![p521, key("api").1],
        });
        let es512 = |kid: &str| {
            let header = format!(r#"{{"alg":"ES512","kid":"{kid}"}}"#);
            format!("{}.{}.c2ln", encode(header.as_bytes()), encode(b"{}"))
        };
        assert_eq!(keys.check(&es512("p521")).await, Verdict::Unknown);
        assert!(matches!(
            keys.check(&es512("api")).await,
            Verdict::Forged(_)
        ));
    }
}
