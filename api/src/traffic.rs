//! What a [`TrafficPolicy`](v1::TrafficPolicy) means, as typed values: the
//! one conversion the client's node proxy applies and the control plane
//! runs on every object before it sends anything, so that an object the
//! control plane sends is one the proxy accepts.

use std::time::Duration;

use serde::Serialize;

use crate::{Error, v1};

/// More retries than this is not a policy but a mistake (the CRD allows 5).
pub const MAX_RETRY_ATTEMPTS: u32 = 16;

/// The longest duration the CRD's syntax can write (four groups of 99999
/// h), in milliseconds. Anything longer is refused: added to a clock, a
/// duration near `u64::MAX` milliseconds would overflow it.
pub const MAX_DURATION_MS: u64 = 4 * 99_999 * 3_600_000;

/// How connections to a Service behave, as its TrafficPolicy sets it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    /// The policy, `<namespace>/<name>`.
    pub policy: String,
    /// How an endpoint is picked.
    pub mode: LoadBalancing,
    /// The connect timeout; `None`: the proxy's default.
    pub connect_timeout: Option<Duration>,
    /// The idle timeout; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Connections this proxy keeps open to the Service at most.
    pub max_connections: Option<u32>,
    /// Further endpoints a failed connect is retried on.
    pub retry_attempts: u32,
    /// Ejection of failing endpoints.
    pub outlier: Option<OutlierDetection>,
    /// Weighted targets (`<namespace>/<name>`, weight); empty: no split.
    pub split: Vec<(String, u32)>,
}

/// The load-balancing algorithms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The fewest open connections.
    LeastConnections,
    /// The cheaper of two random endpoints.
    PowerOfTwoChoices,
}

/// Ejection of endpoints whose connects keep failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Failed connects in a row that eject an endpoint (at least 1).
    pub consecutive_failures: u32,
    /// The first ejection's length (above 0).
    pub base_ejection: Duration,
    /// The longest ejection (at least `base_ejection`).
    pub max_ejection: Duration,
}

impl TrafficPolicy {
    /// Converts the TrafficPolicy of a Service in `namespace`. Split targets
    /// must be Services of the same namespace, each named once; a target
    /// that does not exist is allowed (it gets no connections until it
    /// does). Field names in errors are the CRD's.
    pub fn from_wire(namespace: &str, wire: &v1::TrafficPolicy) -> Result<TrafficPolicy, Error> {
        let invalid = |field: &str, problem: String| Error::InvalidTrafficPolicy {
            policy: wire.policy.clone(),
            field: field.to_owned(),
            problem,
        };
        let mode = match v1::LoadBalancing::try_from(wire.mode) {
            Ok(v1::LoadBalancing::RoundRobin) => LoadBalancing::RoundRobin,
            Ok(v1::LoadBalancing::LeastConnections) => LoadBalancing::LeastConnections,
            Ok(v1::LoadBalancing::PowerOfTwoChoices) => LoadBalancing::PowerOfTwoChoices,
            Err(_) => {
                return Err(invalid(
                    "loadBalancing.mode",
                    format!("unknown load-balancing mode {}", wire.mode),
                ));
            }
        };
        for (field, ms) in [
            ("connectTimeout", wire.connect_timeout_ms),
            ("idleTimeout", wire.idle_timeout_ms),
            (
                "outlierDetection.baseEjectionTime",
                wire.outlier_base_ejection_ms,
            ),
            (
                "outlierDetection.maxEjectionTime",
                wire.outlier_max_ejection_ms,
            ),
        ] {
            if ms > MAX_DURATION_MS {
                return Err(invalid(
                    field,
                    format!("{ms} ms is longer than the longest duration, {MAX_DURATION_MS} ms"),
                ));
            }
        }
        if wire.retry_attempts > MAX_RETRY_ATTEMPTS {
            return Err(invalid(
                "retries.attempts",
                format!("{} is above {MAX_RETRY_ATTEMPTS}", wire.retry_attempts),
            ));
        }
        let outlier = match wire.outlier_consecutive_failures {
            0 => None,
            consecutive_failures => {
                let base_ejection = Duration::from_millis(wire.outlier_base_ejection_ms);
                let max_ejection = Duration::from_millis(wire.outlier_max_ejection_ms);
                if base_ejection.is_zero() {
                    return Err(invalid(
                        "outlierDetection.baseEjectionTime",
                        "must be longer than 0s".to_owned(),
                    ));
                }
                if max_ejection < base_ejection {
                    return Err(invalid(
                        "outlierDetection.maxEjectionTime",
                        format!(
                            "{} ms is shorter than baseEjectionTime {} ms",
                            wire.outlier_max_ejection_ms, wire.outlier_base_ejection_ms
                        ),
                    ));
                }
                Some(OutlierDetection {
                    consecutive_failures,
                    base_ejection,
                    max_ejection,
                })
            }
        };
        let mut split: Vec<(String, u32)> = Vec::new();
        for (index, target) in wire.split.iter().enumerate() {
            let field = format!("split[{index}].service");
            let same_namespace = target.service.split_once('/').is_some_and(|(ns, name)| {
                ns == namespace && !name.is_empty() && !name.contains('/')
            });
            if !same_namespace {
                return Err(invalid(
                    &field,
                    format!(
                        "{:?} is not a Service of namespace {namespace}",
                        target.service
                    ),
                ));
            }
            if split.iter().any(|(s, _)| *s == target.service) {
                return Err(invalid(
                    &field,
                    format!("{:?} is listed twice", target.service),
                ));
            }
            split.push((target.service.clone(), target.weight));
        }
        if !split.is_empty() && split.iter().all(|(_, w)| *w == 0) {
            return Err(invalid("split", "every weight is 0".to_owned()));
        }
        let millis = |ms: u64| Some(Duration::from_millis(ms)).filter(|d| !d.is_zero());
        Ok(TrafficPolicy {
            policy: wire.policy.clone(),
            mode,
            connect_timeout: millis(wire.connect_timeout_ms),
            idle_timeout: millis(wire.idle_timeout_ms),
            max_connections: Some(wire.max_connections).filter(|m| *m != 0),
            retry_attempts: wire.retry_attempts,
            outlier,
            split,
        })
    }

    /// The policy in wire form: what [`TrafficPolicy::from_wire`] takes
    /// back to this value (a node that keeps its config on disk keeps it so).
    pub fn to_wire(&self) -> v1::TrafficPolicy {
        let millis =
            |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let outlier = self.outlier.as_ref();
        v1::TrafficPolicy {
            policy: self.policy.clone(),
            mode: match self.mode {
                LoadBalancing::RoundRobin => v1::LoadBalancing::RoundRobin,
                LoadBalancing::LeastConnections => v1::LoadBalancing::LeastConnections,
                LoadBalancing::PowerOfTwoChoices => v1::LoadBalancing::PowerOfTwoChoices,
            }
            .into(),
            connect_timeout_ms: millis(self.connect_timeout),
            idle_timeout_ms: millis(self.idle_timeout),
            max_connections: self.max_connections.unwrap_or(0),
            retry_attempts: self.retry_attempts,
            outlier_consecutive_failures: outlier.map_or(0, |o| o.consecutive_failures),
            outlier_base_ejection_ms: millis(outlier.map(|o| o.base_ejection)),
            outlier_max_ejection_ms: millis(outlier.map(|o| o.max_ejection)),
            split: self
                .split
                .iter()
                .map(|(service, weight)| v1::WeightedService {
                    service: service.clone(),
                    weight: *weight,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_goes_back_to_the_wire_form_that_gives_it_again() {
        let full = v1::TrafficPolicy {
            policy: "shop/checkout".into(),
            mode: v1::LoadBalancing::LeastConnections.into(),
            connect_timeout_ms: 1_500,
            idle_timeout_ms: MAX_DURATION_MS,
            max_connections: 7,
            retry_attempts: 2,
            outlier_consecutive_failures: 3,
            outlier_base_ejection_ms: 30_000,
            outlier_max_ejection_ms: 300_000,
            split: vec![
                v1::WeightedService {
                    service: "shop/checkout-v1".into(),
                    weight: 90,
                },
                v1::WeightedService {
                    service: "shop/checkout-v2".into(),
                    weight: 10,
                },
            ],
        };
        let empty = v1::TrafficPolicy {
            policy: "shop/plain".into(),
            ..Default::default()
        };
        for wire in [full, empty] {
            let policy = TrafficPolicy::from_wire("shop", &wire).expect("a valid policy");
            assert_eq!(policy.to_wire(), wire);
            assert_eq!(
                TrafficPolicy::from_wire("shop", &policy.to_wire()).expect("valid again"),
                policy
            );
        }
    }
}
