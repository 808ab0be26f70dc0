//! The rustls crypto provider of the mesh: ring, restricted to what HBONE allows.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, default_provider};

/// The crypto provider every weft TLS config uses: ring, with only the two
/// TLS 1.3 AES-GCM suites HBONE allows. Built once and shared.
///
/// ring rather than aws-lc-rs: both have assembly AES-GCM and P-256, and ring
/// builds without cmake or a C toolchain beyond `cc`, which keeps builds fast.
pub fn hbone_crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                ..default_provider()
            })
        })
        .clone()
}
