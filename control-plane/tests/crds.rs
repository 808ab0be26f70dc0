//! The weft CRDs: the checked-in YAML is what the Rust types generate, the
//! example objects survive a round trip, and the schemas carry the
//! validations the API server needs to refuse bad objects.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use serde_json::{Value, json};
use weft_control_plane::crd::{
    Action, AuthorizationPolicy, LoadBalancingMode, MtlsMode, MtlsPolicy, REGENERATE_COMMAND,
    TrafficPolicy, crds, crds_yaml, parse_duration,
};

/// Read at run time: a test binary built by another checkout into a shared
/// target directory must still compare this checkout's files.
fn repo_root() -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    package.parent().unwrap().to_owned()
}

/// The generated file and its copy in the Helm chart must both equal
/// `crds_yaml()`. `WEFT_BLESS=1` rewrites them.
#[test]
fn checked_in_crds_are_up_to_date() {
    let want = crds_yaml();
    let copies = [
        ("deploy/crds/weft.dev.yaml", REGENERATE_COMMAND.to_owned()),
        (
            "deploy/helm/weft/crds/weft.dev.yaml",
            "cp deploy/crds/weft.dev.yaml deploy/helm/weft/crds/weft.dev.yaml".to_owned(),
        ),
    ];
    let bless = std::env::var_os("WEFT_BLESS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (path, fix) in copies {
        let full = repo_root().join(path);
        let have = std::fs::read_to_string(&full).unwrap_or_default();
        if have == want {
            continue;
        }
        if bless {
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, &want).unwrap();
        } else {
            stale.push(format!("{path} is stale; regenerate it with `{fix}`"));
        }
    }
    assert!(
        stale.is_empty(),
        "{} (or run this test with WEFT_BLESS=1)",
        stale.join("; ")
    );
}

#[test]
fn crds_yaml_parses_back_to_the_crds() {
    let text = crds_yaml();
    assert!(text.starts_with("# weft's CustomResourceDefinitions"));
    assert!(text.contains(REGENERATE_COMMAND));
    let docs: Vec<Value> = text
        .split("\n---\n")
        .skip(1)
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .collect();
    let want: Vec<Value> = crds()
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    assert_eq!(docs, want);
}

const AUTHZ: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: frontend-only, namespace: shop}
spec:
  selector:
    matchLabels: {app: cart}
  action: ALLOW
  rules:
  - from:
      principals: ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/*", "*/sa/prober"]
      notNamespaces: [kube-system]
      ipBlocks: [10.0.0.0/8, "2001:db8::/32", 192.0.2.7]
    to:
      ports: [8080, 9090]
  - to:
      notPorts: [22]
"#;

const MTLS: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: mesh-strict, namespace: weft-system}
spec:
  mode: STRICT
"#;

const TRAFFIC: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  loadBalancing: {mode: LEAST_CONNECTIONS}
  connectTimeout: 2s
  idleTimeout: 1h30m
  maxConnections: 1000
  retries: {attempts: 2}
  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 10s, maxEjectionTime: 2m}
  split:
  - {service: reviews, weight: 90}
  - {service: reviews-v2, weight: 10}
"#;

/// Parses `yaml` as `T`, and checks that `T` writes back what was read.
fn round_trip<T>(yaml: &str) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let input: Value = serde_saphyr::from_str(yaml).unwrap();
    let object: T = serde_saphyr::from_str(yaml).unwrap();
    assert_eq!(serde_json::to_value(&object).unwrap(), input);
    let again: T = serde_json::from_value(serde_json::to_value(&object).unwrap()).unwrap();
    assert_eq!(again, object);
    let via_yaml: T = serde_saphyr::from_str(&serde_saphyr::to_string(&object).unwrap()).unwrap();
    assert_eq!(via_yaml, object);
    object
}

#[test]
fn example_objects_round_trip() {
    let authz: AuthorizationPolicy = round_trip(AUTHZ);
    assert_eq!(authz.spec.action, Action::Allow);
    assert_eq!(authz.spec.rules.len(), 2);
    let from = authz.spec.rules[0].from.as_ref().unwrap();
    assert_eq!(from.principals.len(), 3);
    assert_eq!(from.not_namespaces, ["kube-system"]);
    assert_eq!(authz.spec.rules[1].to.as_ref().unwrap().not_ports, [22]);

    let mtls: MtlsPolicy = round_trip(MTLS);
    assert_eq!(mtls.spec.mode, MtlsMode::Strict);
    assert!(mtls.spec.selector.is_none());

    let traffic: TrafficPolicy = round_trip(TRAFFIC);
    let spec = &traffic.spec;
    assert_eq!(
        spec.load_balancing.as_ref().unwrap().mode,
        LoadBalancingMode::LeastConnections
    );
    assert_eq!(spec.split[1].service, "reviews-v2");
    let idle = parse_duration(spec.idle_timeout.as_deref().unwrap()).unwrap();
    assert_eq!(idle.as_secs(), 5400);
    let outlier = spec.outlier_detection.as_ref().unwrap();
    assert_eq!(
        parse_duration(&outlier.max_ejection_time)
            .unwrap()
            .as_secs(),
        120
    );
}

#[test]
fn omitted_fields_take_their_defaults() {
    let authz: AuthorizationPolicy = serde_saphyr::from_str(
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {}\n",
    )
    .unwrap();
    assert_eq!(authz.spec.action, Action::Allow);
    assert!(authz.spec.rules.is_empty());
    let traffic: TrafficPolicy = serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "t"},
        "spec": {"service": "web", "loadBalancing": {}, "outlierDetection": {}},
    }))
    .unwrap();
    assert_eq!(
        traffic.spec.load_balancing.unwrap().mode,
        LoadBalancingMode::RoundRobin
    );
    let outlier = traffic.spec.outlier_detection.unwrap();
    assert_eq!(outlier.consecutive_failures, 5);
    assert_eq!(outlier.base_ejection_time, "30s");
    assert_eq!(outlier.max_ejection_time, "5m");
}

/// The OpenAPI schema of `kind`'s CRD, as JSON.
fn schema(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let crd = serde_json::to_value(crd).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The schema at a dotted path of properties (`[]` steps into list items).
fn at<'a>(schema: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(schema, |s, step| match step {
        "[]" => &s["items"],
        name => &s["properties"][name],
    })
}

fn rules_of(schema: &Value) -> Vec<String> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| r["rule"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_crds_have_the_names_scope_and_subresources() {
    for (crd, (kind, plural, short)) in crds().iter().zip([
        ("AuthorizationPolicy", "authorizationpolicies", "authz"),
        ("MtlsPolicy", "mtlspolicies", "mtls"),
        ("TrafficPolicy", "trafficpolicies", "traffic"),
    ]) {
        assert_eq!(crd.spec.group, "weft.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(&*format!("{plural}.weft.dev"))
        );
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["weft".to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let status = version.subresources.as_ref().unwrap().status.as_ref();
        assert!(status.is_some(), "{kind} has a status subresource");
        let columns = version.additional_printer_columns.as_ref().unwrap();
        assert!(columns.iter().any(|c| c.name == "Accepted"), "{kind}");
    }
}

#[test]
fn enums_list_exactly_their_values() {
    let authz = schema("AuthorizationPolicy");
    assert_eq!(
        at(&authz, "spec.action")["enum"],
        json!(["ALLOW", "DENY", "AUDIT"])
    );
    assert_eq!(at(&authz, "spec.action")["default"], json!("ALLOW"));
    let mtls = schema("MtlsPolicy");
    assert_eq!(
        at(&mtls, "spec.mode")["enum"],
        json!(["STRICT", "PERMISSIVE"])
    );
    assert_eq!(at(&mtls, "spec")["required"], json!(["mode"]));
    let traffic = schema("TrafficPolicy");
    assert_eq!(
        at(&traffic, "spec.loadBalancing.mode")["enum"],
        json!(["ROUND_ROBIN", "LEAST_CONNECTIONS", "POWER_OF_TWO_CHOICES"])
    );
    assert_eq!(
        at(&traffic, "spec.loadBalancing.mode")["default"],
        json!("ROUND_ROBIN")
    );
}

#[test]
fn authorization_fields_are_validated() {
    let authz = schema("AuthorizationPolicy");
    for field in ["ports", "notPorts"] {
        let port = at(&authz, &format!("spec.rules.[].to.{field}.[]"));
        assert_eq!(port["minimum"].as_f64(), Some(1.0), "{field}");
        assert_eq!(port["maximum"].as_f64(), Some(65535.0), "{field}");
    }
    for field in ["principals", "notPrincipals"] {
        let principal = at(&authz, &format!("spec.rules.[].from.{field}.[]"));
        assert_eq!(
            principal["pattern"],
            json!(weft_control_plane::crd::PRINCIPAL_PATTERN)
        );
    }
    for field in ["ipBlocks", "notIpBlocks"] {
        let list = at(&authz, &format!("spec.rules.[].from.{field}"));
        assert_eq!(
            list["items"]["pattern"],
            json!(weft_control_plane::crd::IP_BLOCK_PATTERN)
        );
        assert_eq!(rules_of(list), ["self.all(b, isIP(b) || isCIDR(b))"]);
    }
    let labels = at(&authz, "spec.selector.matchLabels");
    assert_eq!(labels["minProperties"].as_f64(), Some(1.0));
    assert_eq!(labels["additionalProperties"]["type"], json!("string"));
}

#[test]
fn traffic_fields_are_validated() {
    let traffic = schema("TrafficPolicy");
    let spec = at(&traffic, "spec");
    assert_eq!(spec["required"], json!(["service"]));
    assert_eq!(
        at(&traffic, "spec.service")["pattern"],
        json!(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    );
    for path in [
        "spec.connectTimeout",
        "spec.idleTimeout",
        "spec.outlierDetection.baseEjectionTime",
        "spec.outlierDetection.maxEjectionTime",
    ] {
        assert_eq!(
            at(&traffic, path)["pattern"],
            json!(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"),
            "{path}"
        );
    }
    assert_eq!(
        at(&traffic, "spec.maxConnections")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        at(&traffic, "spec.retries.attempts")["maximum"].as_f64(),
        Some(5.0)
    );
    let outlier = at(&traffic, "spec.outlierDetection");
    assert_eq!(
        at(outlier, "consecutiveFailures")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        at(outlier, "consecutiveFailures")["maximum"].as_f64(),
        Some(100.0)
    );
    // maxEjectionTime not below baseEjectionTime; baseEjectionTime above 0s.
    assert_eq!(rules_of(outlier).len(), 2);
    let split = at(&traffic, "spec.split");
    assert_eq!(split["maxItems"], json!(16));
    assert_eq!(split["x-kubernetes-list-type"], json!("map"));
    assert_eq!(split["x-kubernetes-list-map-keys"], json!(["service"]));
    assert_eq!(at(split, "[].weight")["minimum"].as_f64(), Some(0.0));
    assert_eq!(at(split, "[].weight")["maximum"].as_f64(), Some(1000.0));
    assert_eq!(rules_of(spec).len(), 2);
}

#[test]
fn status_has_conditions_and_observed_generation() {
    for kind in ["AuthorizationPolicy", "MtlsPolicy", "TrafficPolicy"] {
        let schema = schema(kind);
        let status = at(&schema, "status");
        let conditions = at(status, "conditions");
        assert_eq!(conditions["x-kubernetes-list-type"], json!("map"), "{kind}");
        assert_eq!(
            conditions["items"]["required"],
            json!(["lastTransitionTime", "message", "reason", "status", "type"])
        );
        assert_eq!(at(status, "observedGeneration")["type"], json!("integer"));
    }
}

/// Kubernetes requires structural schemas: every node has a type (no
/// `anyOf`/`oneOf` standing in for one) and nothing references definitions.
#[test]
fn schemas_are_structural() {
    fn walk(path: &str, schema: &Value) {
        let object = schema.as_object().unwrap();
        for banned in [
            "$ref",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
            "definitions",
            "$defs",
        ] {
            assert!(!object.contains_key(banned), "{path} has {banned}");
        }
        assert!(object.contains_key("type"), "{path} has no type");
        if let Some(properties) = object.get("properties").and_then(Value::as_object) {
            for (name, child) in properties {
                walk(&format!("{path}.{name}"), child);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = object.get(key).filter(|c| c.is_object()) {
                walk(&format!("{path}.{key}"), child);
            }
        }
    }
    for kind in ["AuthorizationPolicy", "MtlsPolicy", "TrafficPolicy"] {
        walk(kind, &schema(kind));
    }
}
