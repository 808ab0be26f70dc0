//! The rustls crypto provider of the mesh: aws-lc-rs, restricted to what
//! HBONE allows, with the key exchange the operator chose.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};

use crate::Error;

/// Which key exchange a weft TLS connection (HBONE, or the control plane's
/// gRPC) may use.
///
/// Traffic recorded today can be decrypted by whoever later has a quantum
/// computer, unless its keys were agreed with a post-quantum exchange: so
/// weft prefers the hybrid X25519MLKEM768 (X25519 and ML-KEM-768 together,
/// as safe as the stronger of the two) and, by default, still accepts a
/// peer that offers only X25519 (an older ztunnel, or one configured so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyExchange {
    /// X25519MLKEM768 first, X25519 allowed.
    #[default]
    PostQuantumPreferred,
    /// X25519MLKEM768 only: a peer without it fails the handshake (as
    /// ztunnel does with `COMPLIANCE_POLICY=pqc`).
    PostQuantumRequired,
}

impl KeyExchange {
    /// Every policy, for help texts and tests.
    pub const ALL: [KeyExchange; 2] = [
        KeyExchange::PostQuantumPreferred,
        KeyExchange::PostQuantumRequired,
    ];

    /// The name in flags and config dumps.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyExchange::PostQuantumPreferred => "post-quantum-preferred",
            KeyExchange::PostQuantumRequired => "post-quantum-required",
        }
    }
}

impl fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyExchange {
    type Err = Error;

    fn from_str(text: &str) -> Result<KeyExchange, Error> {
        KeyExchange::ALL
            .into_iter()
            .find(|policy| policy.as_str() == text)
            .ok_or_else(|| Error::UnknownKeyExchange {
                given: text.chars().take(64).collect(),
            })
    }
}

/// The crypto provider every weft TLS config uses: aws-lc-rs, with only the
/// two TLS 1.3 AES-GCM suites HBONE allows and the key-exchange groups of
/// `policy`. Built once per policy and shared.
pub fn hbone_crypto_provider(policy: KeyExchange) -> Arc<CryptoProvider> {
    static PREFERRED: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    static REQUIRED: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    let (cell, groups) = match policy {
        KeyExchange::PostQuantumPreferred => {
            (&PREFERRED, vec![kx_group::X25519MLKEM768, kx_group::X25519])
        }
        KeyExchange::PostQuantumRequired => (&REQUIRED, vec![kx_group::X25519MLKEM768]),
    };
    cell.get_or_init(|| {
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
            ],
            kx_groups: groups,
            ..default_provider()
        })
    })
    .clone()
}

/// The name of the key-exchange group a finished handshake used
/// (`X25519MLKEM768`, `X25519`), for logs and metrics; `unknown` before the
/// handshake is done.
pub fn key_exchange_group(connection: &rustls::CommonState) -> &'static str {
    match connection
        .negotiated_key_exchange_group()
        .map(|group| group.name())
    {
        Some(rustls::NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(rustls::NamedGroup::X25519) => "X25519",
        Some(_) => "other",
        None => "unknown",
    }
}
