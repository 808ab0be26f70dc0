//! Which TLS key exchange HBONE connections agreed on, counted for the
//! metrics, so that an operator can see whether the mesh's traffic is
//! protected by the post-quantum exchange or still by X25519 alone (a peer
//! without ML-KEM, such as an older ztunnel).

use std::sync::atomic::{AtomicU64, Ordering};

/// The groups counted apart; anything else counts as `other`.
const GROUPS: [&str; 3] = ["X25519MLKEM768", "X25519", "other"];

/// Handshakes by side (dialled, served) and group.
static HANDSHAKES: [[AtomicU64; 3]; 2] = [
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
];

/// The side of a handshake.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    /// This proxy dialled (the source side of a tunnel).
    Client,
    /// This proxy accepted (the destination side).
    Server,
}

/// Counts (and logs at debug) the group a finished handshake used.
pub(crate) fn count(side: Side, connection: &rustls::CommonState) {
    let group = weft_certs::key_exchange_group(connection);
    tracing::debug!(?side, group, "HBONE TLS established");
    let column = GROUPS.iter().position(|g| *g == group).unwrap_or(2);
    HANDSHAKES[side as usize][column].fetch_add(1, Ordering::Relaxed);
}

/// `weft_proxy_hbone_handshakes_total{side, group}`, read at each scrape.
#[derive(Debug)]
pub struct KeyExchangeMetrics;

impl prometheus_client::collector::Collector for KeyExchangeMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let mut family = encoder.encode_descriptor(
            "weft_proxy_hbone_handshakes",
            "Completed HBONE TLS handshakes by side and key exchange group",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (side, name) in [(Side::Client, "client"), (Side::Server, "server")] {
            for (column, group) in GROUPS.iter().enumerate() {
                let count = HANDSHAKES[side as usize][column].load(Ordering::Relaxed);
                let labels = [("side", name), ("group", group)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
