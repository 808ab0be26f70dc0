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
            format!("{path}: {error}")
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
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
    if path.is_empty() {
        "<object>".to_owned()
    } else {
        path
    }
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
                "spec.retries.attempts: ",
            ),
            (json!({"service": "Bad_Name"}), "spec.service: "),
            (
                json!({"service": "db", "connectTimeout": "5 minutes"}),
                "spec.connectTimeout: ",
            ),
            (json!({"service": "db", "acton": "x"}), "spec: "),
            (
                json!({"retries": {}}),
                "spec: \"service\" is a required property",
            ),
            (
                json!({"service": "db", "split": [{"service": "a", "weight": 1001}]}),
                "spec.split[0].weight: ",
            ),
        ];
        for (spec, field) in cases {
            let error = check_against_crd(&traffic(spec.clone())).unwrap_err();
            assert!(error.contains(field), "{spec}: {error}");
        }
        let authz = json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "a", "namespace": "shop"},
            "spec": {"rules": [{"to": {"ports": [1, 70000]}}]},
        });
        let error = check_against_crd(&authz).unwrap_err();
        assert!(error.starts_with("spec.rules[0].to.ports[1]: "), "{error}");
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
        assert_eq!(field_path(""), "<object>");
        assert_eq!(field_path("/metadata/labels/a~1b"), "metadata.labels.a/b");
    }
}
