//! `weft_proxy_rejected_total{listener,reason}`: connections and requests
//! a listener refused because a bound in the config bit (too many at once,
//! too slow, not allowed). One family for every listener, the pods' and
//! the proxy's own HTTP ports, so one alert covers them all.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// The counter family; clones count into the same family.
#[derive(Clone, Debug, Default)]
pub struct Rejections {
    family: Family<RejectedLabels, Counter>,
}

impl Rejections {
    /// Registers the family in `registry` as `weft_proxy_rejected`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_proxy_rejected",
            "Connections and requests refused because a configured bound was reached",
            self.family.clone(),
        );
    }

    /// Counts one refusal by `listener` (`outbound`, `hbone`, `metrics`, ...)
    /// for `reason` (`pod_limit`, `header_timeout`, ...).
    pub fn count(&self, listener: &'static str, reason: &'static str) {
        self.family
            .get_or_create(&RejectedLabels { listener, reason })
            .inc();
    }

    /// How many refusals were counted for `listener` and `reason`.
    pub fn get(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.family
            .get_or_create(&RejectedLabels { listener, reason })
            .get()
    }
}
