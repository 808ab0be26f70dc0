//! Pieces shared by every weft kind: the workload selector, the status, and
//! Gateway-API-style durations.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every weft kind.
pub const GROUP: &str = "weft.dev";
/// The API version of every weft kind.
pub const VERSION: &str = "v1alpha1";
/// The control plane's namespace unless `--namespace` says otherwise (the
/// Helm chart's and `deploy/weft.yaml`'s). A policy without a selector in
/// the control plane's namespace applies to the whole mesh (see each kind
/// for how it combines), and no workload there gets an identity.
pub const DEFAULT_MESH_NAMESPACE: &str = "weft-system";

/// The condition type every weft kind reports: `True` when the control plane
/// has taken the object into the mesh and sends it to the proxies, `False`
/// with a reason when it has not (for instance [`REASON_CONFLICTED`]).
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason of an `Accepted=True` condition.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason of `Accepted=False`: the object is valid for the API server but
/// not for the mesh (the message says why).
pub const REASON_INVALID: &str = "Invalid";
/// Reason of `Accepted=False`: another object of the same kind already
/// claims what this one would configure; the older one wins.
pub const REASON_CONFLICTED: &str = "Conflicted";

/// The condition type saying whether what an object refers to exists (the
/// pods its selector picks, the Services it names).
pub const CONDITION_RESOLVED_REFS: &str = "ResolvedRefs";
/// Reason of `ResolvedRefs=True`.
pub const REASON_RESOLVED: &str = "Resolved";
/// Reason of `ResolvedRefs=False`: the selector matches no pod (yet).
pub const REASON_NO_MATCHING_WORKLOADS: &str = "NoMatchingWorkloads";
/// Reason of `ResolvedRefs=False`: a Service the object names does not exist.
pub const REASON_SERVICE_NOT_FOUND: &str = "ServiceNotFound";

/// The Gateway API duration syntax: one to four `<number><unit>` groups,
/// unit `h`, `m`, `s` or `ms` (`"1h30m"`, `"250ms"`, `"5s"`).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// A DNS-1035 label, the shape of a Service name: lower-case letters, digits
/// and `-`, starting with a letter, not ending with `-` (at most 63).
pub const DNS1035_LABEL_PATTERN: &str = r"^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 label, the shape of a namespace name: lower-case letters,
/// digits and `-`, not starting or ending with `-` (at most 63).
pub const DNS1123_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Which pods a policy applies to, by their labels.
///
/// All the labels listed must be present on a pod with these values. When a
/// policy has no selector it applies to every pod in its namespace (and, in
/// the control plane's namespace, to every pod in the mesh).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must carry, all of them, with exactly these values. At
    /// least one: to select every pod, leave out the selector.
    #[schemars(extend("minProperties" = 1, "maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a pod with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// What the control plane made of an object; the same shape for every kind.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The latest observations, one per type (today only `Accepted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl PolicyStatus {
    /// The condition of this type, if there is one.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Records an observation for `generation`: replaces the condition of the
    /// same type, keeping its `lastTransitionTime` when the status did not
    /// change, and sets `observedGeneration`.
    pub fn set_condition(
        &mut self,
        generation: Option<i64>,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) {
        let status = if status { "True" } else { "False" };
        let last_transition_time = match self.condition(type_) {
            Some(old) if old.status == status => old.last_transition_time.clone(),
            _ => Time(k8s_openapi::jiff::Timestamp::now()),
        };
        let condition = Condition {
            last_transition_time,
            message: message.into(),
            observed_generation: generation,
            reason: reason.to_owned(),
            status: status.to_owned(),
            type_: type_.to_owned(),
        };
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(slot) => *slot = condition,
            None => self.conditions.push(condition),
        }
        self.observed_generation = generation;
    }
}

/// The schema of the standard `metav1.Condition` list, written out because
/// k8s-openapi's schemas are not compiled in. The list is a map keyed by
/// `type`, as in every Kubernetes API.
fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The latest observations of the object's state, one per type.",
        "type": "array",
        "maxItems": 8,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "reason", "message", "lastTransitionTime"],
            "properties": {
                "type": {
                    "description": "The aspect observed, in CamelCase (e.g. Accepted).",
                    "type": "string",
                    "maxLength": 316,
                },
                "status": {
                    "description": "True, False or Unknown.",
                    "type": "string",
                    "enum": ["True", "False", "Unknown"],
                },
                "reason": {
                    "description": "Why the status is what it is, in CamelCase.",
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 1024,
                },
                "message": {
                    "description": "Details for humans; may be empty.",
                    "type": "string",
                    "maxLength": 32768,
                },
                "lastTransitionTime": {
                    "description": "When the status last changed.",
                    "type": "string",
                    "format": "date-time",
                },
                "observedGeneration": {
                    "description": "The metadata.generation this condition was set for.",
                    "type": "integer",
                    "format": "int64",
                    "minimum": 0,
                },
            },
        },
    })
}

/// Parses a Gateway API duration ([`DURATION_PATTERN`]): one to four groups
/// of up to five digits followed by `h`, `m`, `s` or `ms`, e.g. `"1h30m"`,
/// `"10s"`, `"250ms"`, `"0s"`. Units may repeat and come in any order; the
/// groups add up.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid =
        |why: &str| format!("invalid duration {text:?}: {why} (expected e.g. 10s, 1h30m, 250ms)");
    let bytes = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut groups = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &text[start..i];
        if digits.is_empty() {
            return Err(invalid("expected a number"));
        }
        if digits.len() > 5 {
            return Err(invalid("more than 5 digits in a number"));
        }
        let number: u64 = digits.parse().map_err(|_| invalid("bad number"))?;
        let unit = match (bytes.get(i), bytes.get(i + 1)) {
            (Some(b'm'), Some(b's')) => {
                i += 2;
                Duration::from_millis(1)
            }
            (Some(b'h'), _) => {
                i += 1;
                Duration::from_secs(3600)
            }
            (Some(b'm'), _) => {
                i += 1;
                Duration::from_secs(60)
            }
            (Some(b's'), _) => {
                i += 1;
                Duration::from_secs(1)
            }
            _ => return Err(invalid("expected a unit h, m, s or ms after a number")),
        };
        groups += 1;
        if groups > 4 {
            return Err(invalid("more than 4 groups"));
        }
        // At most 4 × 99999 h: far from overflowing a Duration.
        total += unit * u32::try_from(number).map_err(|_| invalid("bad number"))?;
    }
    if groups == 0 {
        return Err(invalid("empty"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let cases = [
            ("0s", Duration::ZERO),
            ("10s", Duration::from_secs(10)),
            ("250ms", Duration::from_millis(250)),
            ("5m", Duration::from_secs(300)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
            ("1s1s", Duration::from_secs(2)),
            ("99999h", Duration::from_secs(99_999 * 3600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_are_refused() {
        for text in [
            "",
            "5",
            "s",
            "5 minutes",
            "1.5s",
            "-1s",
            "100000s",
            "1h1m1s1ms1us",
            "1us",
            "1d",
            "1h1m1s1ms1h",
            " 5s",
            "5s ",
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("invalid duration"), "{text}: {err}");
        }
    }

    #[test]
    fn selector_matches_all_labels() {
        let selector = WorkloadSelector {
            match_labels: [
                ("app".into(), "web".into()),
                ("tier".into(), "front".into()),
            ]
            .into(),
        };
        let mut labels: BTreeMap<String, String> = [("app".into(), "web".into())].into();
        assert!(!selector.matches(&labels));
        labels.insert("tier".into(), "front".into());
        labels.insert("extra".into(), "x".into());
        assert!(selector.matches(&labels));
    }

    #[test]
    fn set_condition_keeps_transition_time_while_status_holds() {
        let mut status = PolicyStatus::default();
        status.set_condition(Some(1), CONDITION_ACCEPTED, true, REASON_ACCEPTED, "ok");
        let first = status.conditions[0].last_transition_time.clone();
        status.set_condition(
            Some(2),
            CONDITION_ACCEPTED,
            true,
            REASON_ACCEPTED,
            "still ok",
        );
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(status.conditions[0].last_transition_time, first);
        assert_eq!(status.conditions[0].message, "still ok");
        assert_eq!(status.observed_generation, Some(2));
        status.set_condition(Some(3), CONDITION_ACCEPTED, false, REASON_INVALID, "bad");
        assert_eq!(status.conditions[0].status, "False");
        assert_eq!(status.conditions[0].observed_generation, Some(3));
    }
}
