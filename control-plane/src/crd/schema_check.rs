//! Checks an object of a weft kind against its CRD's OpenAPI schema, as the
//! API server does on admission (and `kubectl apply`'s strict field
//! validation does for unknown fields). Local manifests have no API server:
//! this is what refuses, with the field named, what it would have refused.
//!
//! Not here: the CRDs' CEL rules. Their meaning (a timeout above 0s, a
//! split with a weight above 0, ...) is checked by the conversion every
//! object goes through before it is sent ([`crate::traffic::to_wire`],
//! [`crate::policy::to_checked_wire`]), which reports it as `Invalid`.

use std::sync::LazyLock;

use serde_json::Value;

/// Errors reported per object at most; the first ones say what to fix.
const MAX_ERRORS: usize = 8;

/// One compiled validator per weft kind, from the generated CRDs.
static VALIDATORS: LazyLock<Vec<(String, Result<jsonschema::Validator, String>)>> =
    LazyLock::new(|| {
        super::crds()
            .into_iter()
            .filter_map(|crd| {
                let kind = crd.spec.names.kind.clone();
                let schema = crd.spec.versions.first()?.schema.as_ref()?;
                let mut schema = serde_json::to_value(schema.open_api_v3_schema.as_ref()?).ok()?;
                // The API server adds these to every kind's schema.
                let properties = schema.get_mut("properties")?.as_object_mut()?;
                properties.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
                properties.insert("kind".into(), serde_json::json!({"type": "string"}));
                properties.insert("metadata".into(), serde_json::json!({"type": "object"}));
                let validator = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft4)
                    .build(&as_json_schema(schema))
                    .map_err(|e| format!("the {kind} CRD's schema does not compile: {e}"));
                Some((kind, validator))
            })
            .collect()
    });

/// Checks `object` (a weft kind, `weft.dev/v1alpha1`) against its CRD's
/// schema. `Err` lists the problems, each naming the field as the API
/// server does (`spec.rules[0].to.ports[0]: 70000 is greater than the
/// maximum of 65535`). Objects of other kinds pass.
pub fn check_against_crd(object: &Value) -> Result<(), String> {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let Some((_, validator)) = VALIDATORS.iter().find(|(k, _)| k == kind) else {
        return Ok(());
    };
    let validator = validator.as_ref().map_err(Clone::clone)?;
    let problems: Vec<String> = validator
        .iter_errors(object)
        .take(MAX_ERRORS)
        .map(|error| {
            let path = field_path(&error.instance_path().to_string());
            api_server_message(&path, error.instance(), error.kind())
                .unwrap_or_else(|| format!("{}: {error}", shown_path(&path)))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The API server's (and `kubectl apply`'s) wording for a schema violation
/// at `path` by `value`, so that a manifest refused here reads as it would
/// have on a cluster. `None` for kinds of violation weft's schemas do not
/// produce.
fn api_server_message(
    path: &str,
    value: &Value,
    kind: &jsonschema::error::ValidationErrorKind,
) -> Option<String> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let shown = value.to_string();
    let child = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    let quoted = |list: &[Value]| {
        list.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(match kind {
        Kind::Maximum { limit } => {
            format!(
                "{path}: Invalid value: {shown}: {path} in body should be less than or equal to {}",
                number(limit)
            )
        }
        Kind::Minimum { limit } => {
            format!(
                "{path}: Invalid value: {shown}: {path} in body should be greater than or equal to {}",
                number(limit)
            )
        }
        Kind::Pattern { pattern } => {
            format!("{path}: Invalid value: {shown}: {path} in body should match '{pattern}'")
        }
        Kind::Enum { options } => format!(
            "{path}: Unsupported value: {shown}: supported values: {}",
            quoted(options.as_array().map(Vec::as_slice).unwrap_or_default())
        ),
        Kind::Required { property } => {
            format!("{}: Required value", child(property.as_str().unwrap_or("")))
        }
        Kind::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|name| format!("unknown field \"{}\"", child(name)))
            .collect::<Vec<_>>()
            .join("; "),
        Kind::MaxItems { limit } => {
            let count = value.as_array().map_or(0, Vec::len);
            format!("{path}: Too many: {count}: must have at most {limit} items")
        }
        Kind::MinItems { limit } => {
            format!(
                "{path}: Invalid value: {shown}: {path} in body should have at least {limit} items"
            )
        }
        Kind::MaxLength { limit } => {
            format!("{path}: Too long: may not be more than {limit} bytes")
        }
        Kind::MinLength { limit } => {
            format!(
                "{path}: Invalid value: {shown}: {path} in body should be at least {limit} chars long"
            )
        }
        Kind::MaxProperties { limit } => {
            format!("{path}: Too many: must have at most {limit} items")
        }
        Kind::MinProperties { limit } => {
            format!("{path}: Invalid value: {path} in body should have at least {limit} properties")
        }
        Kind::Type { kind } => {
            let actual = match value {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let expected = match kind {
                jsonschema::error::TypeKind::Single(expected) => expected.to_string(),
                // A nullable field: the type besides null.
                jsonschema::error::TypeKind::Multiple(types) => types
                    .iter()
                    .map(|t| t.to_string())
                    .filter(|t| t != "null")
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!(
                "{path}: Invalid value: \"{actual}\": {path} in body must be of type {expected}: {shown}"
            )
        }
        _ => return None,
    })
}

/// A number as the API server prints a schema's bound: `5`, not `5.0`.
fn number(value: &Value) -> String {
    match value.as_f64() {
        Some(n) if n.fract() == 0.0 && n.abs() < 1e15 => format!("{}", n as i64),
        _ => value.to_string(),
    }
}

/// A field path for a message: the object itself has none.
fn shown_path(path: &str) -> &str {
    if path.is_empty() { "<object>" } else { path }
}

/// `/spec/rules/0/to/ports/1` → `spec.rules[0].to.ports[1]`.
fn field_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    path
}

/// An OpenAPI v3 structural schema as plain JSON Schema: `nullable` becomes
/// a `null` type, and an object schema that lists its properties refuses
/// others (the API server prunes unknown fields; `kubectl apply` refuses
/// them), unless it preserves unknown fields.
fn as_json_schema(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        if object.remove("nullable") == Some(Value::Bool(true))
            && let Some(Value::String(kind)) = object.get("type").cloned()
        {
            object.insert("type".into(), serde_json::json!([kind, "null"]));
        }
        let preserves =
            object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if object.contains_key("properties")
            && !object.contains_key("additionalProperties")
            && !preserves
        {
            object.insert("additionalProperties".into(), Value::Bool(false));
        }
        for key in ["properties", "patternProperties"] {
            if let Some(Value::Object(properties)) = object.get_mut(key) {
                for value in properties.values_mut() {
                    *value = as_json_schema(value.take());
                }
            }
        }
        for key in ["items", "additionalProperties", "not"] {
            if let Some(value) = object.get_mut(key)
                && value.is_object()
            {
                *value = as_json_schema(value.take());
            }
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(Value::Array(list)) = object.get_mut(key) {
                for value in list.iter_mut() {
                    *value = as_json_schema(value.take());
                }
            }
        }
    }
    schema
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn traffic(spec: Value) -> Value {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "t", "namespace": "shop"}, "spec": spec,
        })
    }

    #[test]
    fn what_the_api_server_refuses_is_refused_naming_the_field() {
        assert_eq!(
            check_against_crd(&traffic(json!({"service": "db"}))),
            Ok(())
        );
        let cases = [
            (
                json!({"service": "db", "retries": {"attempts": 6}}),
                "spec.retries.attempts: Invalid value: 6: spec.retries.attempts in body should be less than or equal to 5",
            ),
            (
                json!({"service": "Bad_Name"}),
                "spec.service: Invalid value: \"Bad_Name\": spec.service in body should match '^[a-z]([-a-z0-9]*[a-z0-9])?$'",
            ),
            (
                json!({"service": "db", "acton": "x"}),
                "unknown field \"spec.acton\"",
            ),
            (json!({"retries": {}}), "spec.service: Required value"),
            (
                json!({"service": "db", "maxConnections": "many"}),
                "spec.maxConnections: Invalid value: \"string\": spec.maxConnections in body must be of type integer: \"many\"",
            ),
            (
                json!({"service": "db", "loadBalancing": {"mode": "RANDOM"}}),
                "spec.loadBalancing.mode: Unsupported value: \"RANDOM\": supported values: \"ROUND_ROBIN\", \"LEAST_CONNECTIONS\", \"POWER_OF_TWO_CHOICES\"",
            ),
            (
                json!({"service": "db", "split": (0..17).map(|i| json!({"service": format!("s{i}"), "weight": 1})).collect::<Vec<_>>()}),
                "spec.split: Too many: 17: must have at most 16 items",
            ),
        ];
        for (spec, message) in cases {
            let error = check_against_crd(&traffic(spec.clone())).unwrap_err();
            assert!(error.contains(message), "{spec}: {error}");
        }
        let authz = json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "a", "namespace": "shop"},
            "spec": {"rules": [{"to": {"ports": [1, 70000]}}]},
        });
        let error = check_against_crd(&authz).unwrap_err();
        assert!(
            error.starts_with("spec.rules[0].to.ports[1]: Invalid value: 70000: "),
            "{error}"
        );
        // Other kinds are not this module's business.
        assert_eq!(
            check_against_crd(&json!({"kind": "Pod", "spec": {"x": 1}})),
            Ok(())
        );
    }

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(
            field_path("/spec/rules/0/to/ports/12"),
            "spec.rules[0].to.ports[12]"
        );
        assert_eq!(field_path(""), "");
        assert_eq!(field_path("/metadata/labels/a~1b"), "metadata.labels.a/b");
    }
}
