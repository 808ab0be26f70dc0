//! CRD admission on a real kube-apiserver: weft's policies, as generated
//! from the Rust types, are accepted with their defaults filled in when
//! valid and refused with a message naming the field when not.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use rand::SeedableRng;
use serde_json::{Value, json};
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::kube_cluster::{apply_object, apply_objects, install_crds};

/// Valid policies are accepted, with the schema's defaults filled in; bad
/// ones are refused with a message that names the field.
#[tokio::test(flavor = "multi_thread")]
async fn policies_are_validated_by_the_api_server() {
    let (_api, client) = api_with_weft_crds().await;

    for object in [
        authz(json!({})),
        mtls(json!({"mode": "STRICT"})),
        traffic(json!({})),
    ] {
        apply_objects(&client, &[object]).await.unwrap();
    }
    let stored = apply_object(
        &client,
        &authz(json!({"rules": [{"from": {"principals": ["*"]}}]})),
    )
    .await
    .unwrap();
    assert_eq!(stored.data["spec"]["action"], "ALLOW", "the default action");
    let stored = apply_object(
        &client,
        &traffic(json!({"loadBalancing": {}, "outlierDetection": {}})),
    )
    .await
    .unwrap();
    assert_eq!(stored.data["spec"]["loadBalancing"]["mode"], "ROUND_ROBIN");
    assert_eq!(
        stored.data["spec"]["outlierDetection"],
        json!({"consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectionTime": "5m"})
    );
    let good = [
        authz(json!({"action": "DENY", "rules": [{
            "from": {
                "principals": ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/ops/*", "*/sa/prober"],
                "notNamespaces": ["kube-system"],
                "ipBlocks": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "fd00::7"],
            },
            "to": {"ports": [1, 65535], "notPorts": [22]},
        }]})),
        traffic(json!({
            "connectTimeout": "250ms", "idleTimeout": "1h30m", "maxConnections": 1,
            "retries": {"attempts": 5},
            "outlierDetection": {"consecutiveFailures": 100, "baseEjectionTime": "1s", "maxEjectionTime": "1s"},
            "split": (0..16).map(|i| json!({"service": format!("web-{i}"), "weight": i * 10})).collect::<Vec<_>>(),
        })),
    ];
    for object in good {
        apply_objects(&client, &[object]).await.unwrap();
    }

    let seventeen: Vec<Value> = (0..17)
        .map(|i| json!({"service": format!("web-{i}"), "weight": 1}))
        .collect();
    let bad = [
        (
            authz(json!({"action": "MAYBE"})),
            vec!["spec.action", "\"ALLOW\", \"DENY\", \"AUDIT\""],
        ),
        (
            authz(json!({"rules": [{"to": {"ports": [70000]}}]})),
            vec!["spec.rules[0].to.ports[0]", "65535"],
        ),
        (
            authz(json!({"rules": [{"to": {"notPorts": [0]}}]})),
            vec!["spec.rules[0].to.notPorts[0]", "greater than or equal to 1"],
        ),
        (
            authz(json!({"rules": [{"from": {"principals": ["spiffe://cluster.local/*/sa/x"]}}]})),
            vec!["spec.rules[0].from.principals[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"principals": ["cluster.local/ns/a/sa/b"]}}]})),
            vec!["spec.rules[0].from.principals[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"namespaces": ["Not_A_Namespace"]}}]})),
            vec!["spec.rules[0].from.namespaces[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"ipBlocks": ["10.0.0.0/33"]}}]})),
            vec!["spec.rules[0].from.ipBlocks[0]"],
        ),
        (
            authz(json!({"rules": [{"from": {"notIpBlocks": ["999.1.1.1"]}}]})),
            vec![
                "spec.rules[0].from.notIpBlocks",
                "must be IP addresses or CIDRs",
            ],
        ),
        (
            authz(json!({"selector": {"matchLabels": {}}})),
            vec!["spec.selector.matchLabels"],
        ),
        (
            authz(json!({"acton": "DENY"})),
            vec![".spec.acton", "not declared in schema"],
        ),
        (
            mtls(json!({"mode": "LOOSE"})),
            vec!["spec.mode", "\"STRICT\", \"PERMISSIVE\""],
        ),
        (
            mtls(json!({"selector": {"matchLabels": {"app": "web"}}})),
            vec!["spec.mode", "Required value"],
        ),
        (
            traffic(json!({"split": [{"service": "web", "weight": -1}]})),
            vec!["spec.split[0].weight", "greater than or equal to 0"],
        ),
        (
            traffic(json!({"split": [{"service": "web", "weight": 1001}]})),
            vec!["spec.split[0].weight", "1000"],
        ),
        (
            traffic(json!({"split": seventeen})),
            vec!["spec.split", "16"],
        ),
        (
            traffic(
                json!({"split": [{"service": "a", "weight": 1}, {"service": "a", "weight": 2}]}),
            ),
            vec!["spec.split", "duplicate entries for key [service=\"a\"]"],
        ),
        (
            traffic(json!({"split": [{"service": "a", "weight": 0}]})),
            vec!["spec.split", "at least one entry with a weight above 0"],
        ),
        (
            traffic(json!({"connectTimeout": "5 minutes"})),
            vec!["spec.connectTimeout", "should match"],
        ),
        (
            traffic(json!({"connectTimeout": "0s"})),
            vec!["spec.connectTimeout", "longer than 0s"],
        ),
        (
            traffic(json!({"idleTimeout": "1d"})),
            vec!["spec.idleTimeout"],
        ),
        (
            traffic(json!({"maxConnections": 0})),
            vec!["spec.maxConnections"],
        ),
        (
            traffic(json!({"retries": {"attempts": 6}})),
            vec!["spec.retries.attempts", "less than or equal to 5"],
        ),
        (
            traffic(json!({"outlierDetection": {"consecutiveFailures": 0}})),
            vec!["spec.outlierDetection.consecutiveFailures"],
        ),
        (
            traffic(
                json!({"outlierDetection": {"baseEjectionTime": "1m", "maxEjectionTime": "30s"}}),
            ),
            vec![
                "spec.outlierDetection.maxEjectionTime",
                "must not be shorter than baseEjectionTime",
            ],
        ),
        (
            traffic(json!({"service": "Bad_Name"})),
            vec!["spec.service"],
        ),
        (
            traffic(json!({"outlierDetection": {"baseEjectionTime": "0s"}})),
            vec![
                "spec.outlierDetection.baseEjectionTime",
                "must be longer than 0s",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (object, wanted) in bad {
        match apply_object(&client, &object).await {
            Ok(_) => failures.push(format!("accepted: {}", object["spec"])),
            Err(kube::Error::Api(status)) => {
                let message = &status.message;
                eprintln!("refused {}: {message}", object["spec"]);
                // 422 from validation; a field the schema lacks or a duplicate list
                // key fails earlier, in server-side apply (500).
                if !wanted.iter().all(|w| message.contains(w)) {
                    failures.push(format!(
                        "{}: got {} {message:?}, wanted {wanted:?}",
                        object["spec"], status.code
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", object["spec"])),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A real API server with weft's CRDs and namespace `shop`.
async fn api_with_weft_crds() -> (KubeApiServer, kube::Client) {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    install_crds(&client).await.unwrap();
    apply_objects(
        &client,
        &[json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})],
    )
    .await
    .unwrap();
    (api, client)
}

fn authz(spec: Value) -> Value {
    policy("AuthorizationPolicy", "authz", spec)
}

fn mtls(spec: Value) -> Value {
    policy("MtlsPolicy", "mtls", spec)
}

fn traffic(mut spec: Value) -> Value {
    if spec.get("service").is_none() {
        spec["service"] = json!("web");
    }
    policy("TrafficPolicy", "traffic", spec)
}

fn policy(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}

/// What the CRD admits, the proxy accepts: objects generated within the
/// schema (and its boundaries: `0s`, empty lists, the largest numbers and
/// lists) are admitted by the API server and then converted without
/// complaint by the control plane and the proxy's own conversion (which
/// the control plane runs before it sends anything). A generator that
/// strayed outside the schema is caught by the API server's refusal.
#[tokio::test(flavor = "multi_thread")]
async fn every_object_the_crd_admits_converts_for_the_proxy() {
    let (_api, client) = api_with_weft_crds().await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x3eef);
    let mut objects = generated::boundaries();
    for i in 0..60 {
        objects.push(policy(
            "AuthorizationPolicy",
            &format!("authz-{i}"),
            generated::authorization_spec(&mut rng),
        ));
        objects.push(policy(
            "TrafficPolicy",
            &format!("traffic-{i}"),
            generated::traffic_spec(&mut rng),
        ));
    }
    let mut failures = Vec::new();
    for object in &objects {
        // Admitted, with the API server's defaults filled in.
        let stored = match apply_object(&client, object).await {
            Ok(stored) => stored,
            Err(e) => {
                failures.push(format!("refused {}: {e}", object["spec"]));
                continue;
            }
        };
        let stored = serde_json::to_value(&stored).unwrap();
        if let Err(problem) = converts(stored) {
            failures.push(format!("admitted but not accepted: {problem}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // Many more, through the conversion alone (no API server round trip).
    for _ in 0..5_000 {
        for object in [
            policy(
                "AuthorizationPolicy",
                "a",
                generated::authorization_spec(&mut rng),
            ),
            policy("TrafficPolicy", "t", generated::traffic_spec(&mut rng)),
        ] {
            if let Err(problem) = converts(object) {
                failures.push(problem);
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Runs an object through the control plane's conversion, which checks
/// it with the proxy's.
fn converts(object: Value) -> Result<(), String> {
    use weft_control_plane::crd::{AuthorizationPolicy, TrafficPolicy};
    let spec = object["spec"].clone();
    match object["kind"].as_str() {
        Some("AuthorizationPolicy") => {
            let policy: AuthorizationPolicy =
                serde_json::from_value(object).map_err(|e| format!("{spec}: {e}"))?;
            weft_control_plane::policy::to_checked_wire(&policy)
                .map(drop)
                .map_err(|e| format!("{spec}: {e}"))
        }
        Some("TrafficPolicy") => {
            let policy: TrafficPolicy =
                serde_json::from_value(object).map_err(|e| format!("{spec}: {e}"))?;
            weft_control_plane::traffic::to_wire("shop/t", "shop", &policy)
                .map(drop)
                .map_err(|e| format!("{spec}: {e}"))
        }
        other => Err(format!("unexpected kind {other:?}")),
    }
}

/// Specs within the CRDs' schemas, by construction.
mod generated {
    use rand::Rng;
    use rand::seq::IndexedRandom;
    use serde_json::{Value, json};

    use super::policy;

    /// Objects at the edges of what the schema admits.
    pub fn boundaries() -> Vec<Value> {
        let max_duration = "99999h99999h99999h99999h";
        let long_principal = format!("spiffe://cluster.local/ns/shop/sa/{}", "a".repeat(2000));
        vec![
            policy("AuthorizationPolicy", "empty-rules", json!({"rules": []})),
            policy(
                "AuthorizationPolicy",
                "empty-rule",
                json!({"action": "DENY", "rules": [{}]}),
            ),
            policy(
                "AuthorizationPolicy",
                "empty-lists",
                json!({"rules": [{
                    "from": {"principals": [], "notPrincipals": [], "namespaces": [], "notNamespaces": [],
                             "ipBlocks": [], "notIpBlocks": []},
                    "to": {"ports": [], "notPorts": []},
                }]}),
            ),
            policy(
                "AuthorizationPolicy",
                "largest",
                json!({
                    "action": "AUDIT",
                    "rules": (0..128).map(|i| json!({
                        "from": {"principals": [long_principal.clone(), "*", "spiffe://*"],
                                 "ipBlocks": ["0.0.0.0/0", "::/0", "255.255.255.255/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]},
                        "to": {"ports": if i == 0 { (1..=256).collect::<Vec<u32>>() } else { vec![65535] }},
                    })).collect::<Vec<_>>(),
                }),
            ),
            policy(
                "TrafficPolicy",
                "zeroes",
                json!({
                    "service": "a", "idleTimeout": "0s", "connectTimeout": "1ms",
                    "retries": {"attempts": 0},
                    "split": [{"service": "a", "weight": 0}, {"service": "b", "weight": 1}],
                }),
            ),
            policy(
                "TrafficPolicy",
                "largest",
                json!({
                    "service": "a".repeat(63), "idleTimeout": max_duration, "connectTimeout": max_duration,
                    "maxConnections": u32::MAX, "retries": {"attempts": 5},
                    "outlierDetection": {"consecutiveFailures": 100, "baseEjectionTime": max_duration,
                                         "maxEjectionTime": max_duration},
                    "split": (0..16).map(|i| json!({"service": format!("s{i}"), "weight": 1000})).collect::<Vec<_>>(),
                }),
            ),
            policy(
                "TrafficPolicy",
                "smallest-ejection",
                json!({
                    "service": "a",
                    "outlierDetection": {"consecutiveFailures": 1, "baseEjectionTime": "1ms", "maxEjectionTime": "1ms"},
                }),
            ),
        ]
    }

    fn pick<'a, T>(rng: &mut impl Rng, items: &'a [T]) -> &'a T {
        items.choose(rng).expect("a non-empty list")
    }

    /// A Gateway API duration: 1-4 groups of 0-99999 in h, m, s or ms,
    /// with its length in milliseconds.
    fn duration(rng: &mut impl Rng) -> (String, u128) {
        let mut text = String::new();
        let mut millis = 0u128;
        for _ in 0..rng.random_range(1..=4) {
            let any = rng.random_range(0..=99_999);
            let number: u128 = *pick(rng, &[0, 1, 7, 59, 99_999, any]);
            let (unit, scale) = *pick(
                rng,
                &[("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)],
            );
            text.push_str(&format!("{number}{unit}"));
            millis += number * scale;
        }
        (text, millis)
    }

    fn positive_duration(rng: &mut impl Rng) -> (String, u128) {
        loop {
            let (text, millis) = duration(rng);
            if millis > 0 {
                return (text, millis);
            }
        }
    }

    /// A DNS-1035 label of 1-63 characters.
    fn label(rng: &mut impl Rng, prefix: &str) -> String {
        let len = rng.random_range(0..=(62 - prefix.len()));
        let tail: String = (0..len)
            .map(|_| *pick(rng, &['a', 'z', '0', '9', '-']))
            .collect();
        format!("{prefix}{}", tail.trim_end_matches('-'))
    }

    pub fn traffic_spec(rng: &mut impl Rng) -> Value {
        let mut spec = json!({"service": label(rng, "s")});
        if rng.random_bool(0.5) {
            let mode = *pick(
                rng,
                &["ROUND_ROBIN", "LEAST_CONNECTIONS", "POWER_OF_TWO_CHOICES"],
            );
            spec["loadBalancing"] = json!({"mode": mode});
        }
        if rng.random_bool(0.5) {
            spec["connectTimeout"] = json!(positive_duration(rng).0);
        }
        if rng.random_bool(0.5) {
            spec["idleTimeout"] = json!(duration(rng).0);
        }
        if rng.random_bool(0.5) {
            let any = rng.random_range(1..=u32::MAX);
            spec["maxConnections"] = json!(*pick(rng, &[1, u32::MAX, any]));
        }
        if rng.random_bool(0.5) {
            spec["retries"] = json!({"attempts": rng.random_range(0..=5)});
        }
        if rng.random_bool(0.5) {
            let (mut base, mut max) = (positive_duration(rng), positive_duration(rng));
            if max.1 < base.1 {
                std::mem::swap(&mut base, &mut max);
            }
            spec["outlierDetection"] = json!({
                "consecutiveFailures": rng.random_range(1..=100),
                "baseEjectionTime": base.0, "maxEjectionTime": max.0,
            });
        }
        if rng.random_bool(0.5) {
            let count = rng.random_range(1..=16);
            let mut split: Vec<Value> = (0..count)
                .map(|i| json!({"service": format!("t{i}"), "weight": rng.random_range(0..=1000)}))
                .collect();
            split[0]["weight"] = json!(rng.random_range(1..=1000));
            spec["split"] = json!(split);
        }
        spec
    }

    fn principal(rng: &mut impl Rng) -> String {
        let path = format!("/ns/{}/sa/{}", label(rng, "n"), label(rng, "a"));
        match rng.random_range(0..4) {
            0 => "*".to_owned(),
            1 => format!("*{path}"),
            2 => format!("spiffe://cluster.local{path}"),
            _ => format!(
                "spiffe://cluster.local{}*",
                &path[..rng.random_range(0..path.len())]
            ),
        }
    }

    fn ip_block(rng: &mut impl Rng) -> String {
        if rng.random_bool(0.5) {
            let ip = std::net::Ipv4Addr::from(rng.random::<u32>());
            match rng.random_range(0..2) {
                0 => ip.to_string(),
                _ => format!("{ip}/{}", rng.random_range(0..=32)),
            }
        } else {
            let ip = std::net::Ipv6Addr::from(rng.random::<u128>());
            match rng.random_range(0..2) {
                0 => ip.to_string(),
                _ => format!("{ip}/{}", rng.random_range(0..=128)),
            }
        }
    }

    fn list<R: Rng, T>(rng: &mut R, max: usize, mut item: impl FnMut(&mut R) -> T) -> Vec<T> {
        let len = rng.random_range(0..=max);
        let mut out = Vec::with_capacity(len);
        for _ in 0..len {
            out.push(item(rng));
        }
        out
    }

    pub fn authorization_spec(rng: &mut impl Rng) -> Value {
        let mut spec = json!({});
        if rng.random_bool(0.5) {
            spec["action"] = json!(*pick(rng, &["ALLOW", "DENY", "AUDIT"]));
        }
        if rng.random_bool(0.3) {
            spec["selector"] = json!({"matchLabels": {"app": label(rng, "x")}});
        }
        let rules: Vec<Value> = list(rng, 6, |rng| {
            let mut from = json!({});
            let mut to = json!({});
            for field in ["principals", "notPrincipals"] {
                if rng.random_bool(0.4) {
                    from[field] = json!(list(rng, 4, |r| principal(r)));
                }
            }
            for field in ["namespaces", "notNamespaces"] {
                if rng.random_bool(0.4) {
                    from[field] = json!(list(rng, 4, |r| label(r, "n")));
                }
            }
            for field in ["ipBlocks", "notIpBlocks"] {
                if rng.random_bool(0.4) {
                    from[field] = json!(list(rng, 4, |r| ip_block(r)));
                }
            }
            for field in ["ports", "notPorts"] {
                if rng.random_bool(0.4) {
                    to[field] = json!(list(rng, 4, |r| r.random_range(1..=65535u32)));
                }
            }
            json!({"from": from, "to": to})
        });
        spec["rules"] = json!(rules);
        spec
    }
}
