//! weft's deployment artifacts against a real kube-apiserver: everything in
//! `deploy/` (the CRDs, `weft.yaml`, the rendered Helm chart) is accepted by
//! server-side apply; the control plane's RBAC grants what it needs and
//! nothing more, and the node proxy's none (policy admission itself is in
//! `crd_admission.rs`). Also, without an API server: the chart with its
//! defaults renders the objects of `weft.yaml`.
//!
//! The chart is rendered with `scripts/helm.sh`, which builds Helm (Go module
//! proxy) the first time.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};
use weft_testbed::apiserver::KubeApiServer;
use weft_testbed::kube_cluster::{self, deploy_dir, yaml_objects};

const CONTROL_PLANE: &str = "system:serviceaccount:weft-system:weft-control-plane";
const NODE_PROXY: &str = "system:serviceaccount:weft-system:weft-node-proxy";
const UNINSTALL: &str = "system:serviceaccount:weft-system:weft-uninstall";

fn read_objects(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    yaml_objects(&text).unwrap()
}

/// Renders the chart (`scripts/helm.sh render`) and returns its objects.
fn rendered_chart() -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("weft.yaml");
    let script = deploy_dir().join("../scripts/helm.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg("render")
        .arg(&out)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{} render failed: {status}",
        script.display()
    );
    read_objects(&out)
}

/// Renders the chart with extra `helm template` arguments.
fn helm_template(args: &[&str]) -> Vec<Value> {
    let script = deploy_dir().join("../scripts/helm.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("path")
        .output()
        .unwrap();
    assert!(output.status.success(), "helm.sh path failed");
    let helm = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let output = Command::new(helm)
        .args(["template", "weft"])
        .arg(deploy_dir().join("helm/weft"))
        .args(["--namespace", "weft-system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    yaml_objects(&String::from_utf8(output.stdout).unwrap()).unwrap()
}

fn key(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap(),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap()
    )
}

/// Drops the labels only Helm adds, so chart objects compare with `weft.yaml`.
fn without_helm_labels(mut object: Value) -> Value {
    if let Some(labels) = object["metadata"]["labels"].as_object_mut() {
        for label in [
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/version",
            "helm.sh/chart",
        ] {
            labels.remove(label);
        }
    }
    object
}

/// Whether Helm runs `object` as a hook rather than installing it.
fn is_hook(object: &Value) -> bool {
    object["metadata"]["annotations"]
        .as_object()
        .is_some_and(|annotations| annotations.contains_key("helm.sh/hook"))
}

/// Drops Helm's hook annotations, so hook objects compare with
/// `uninstall.yaml`.
fn without_hook_annotations(mut object: Value) -> Value {
    let metadata = &mut object["metadata"];
    if let Some(annotations) = metadata["annotations"].as_object_mut() {
        annotations.retain(|key, _| !key.starts_with("helm.sh/"));
        if annotations.is_empty() {
            metadata.as_object_mut().map(|m| m.remove("annotations"));
        }
    }
    object
}

#[test]
fn the_chart_renders_the_objects_of_weft_yaml() {
    let rendered = rendered_chart();
    let (crds, rendered): (Vec<_>, Vec<_>) = rendered
        .into_iter()
        .partition(|o| o["kind"] == "CustomResourceDefinition");
    assert_eq!(crds, read_objects(&deploy_dir().join("crds/weft.dev.yaml")));
    let (hooks, rendered): (Vec<_>, Vec<_>) = rendered.into_iter().partition(is_hook);

    // The uninstall announcement runs before anything is deleted, and is
    // what `uninstall.yaml` gives kubectl users.
    for hook in &hooks {
        assert_eq!(
            hook["metadata"]["annotations"]["helm.sh/hook"], "pre-delete",
            "{hook}"
        );
    }
    let hooks: BTreeMap<String, Value> = hooks
        .into_iter()
        .map(|o| (key(&o), without_hook_annotations(without_helm_labels(o))))
        .collect();
    let uninstall: BTreeMap<String, Value> = read_objects(&deploy_dir().join("uninstall.yaml"))
        .into_iter()
        .map(|o| (key(&o), o))
        .collect();
    assert_eq!(
        hooks, uninstall,
        "the chart's hooks and uninstall.yaml differ"
    );
    assert_eq!(
        uninstall["Job weft-system/weft-uninstall"]["spec"]["template"]["spec"]["containers"][0]["args"]
            [0],
        "uninstall"
    );

    let chart: BTreeMap<String, Value> = rendered
        .into_iter()
        .map(|o| (key(&o), without_helm_labels(o)))
        .collect();
    let manifests: BTreeMap<String, Value> = read_objects(&deploy_dir().join("weft.yaml"))
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .map(|o| (key(&o), o))
        .collect();
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        manifests.keys().collect::<Vec<_>>()
    );
    for (key, object) in &manifests {
        assert_eq!(
            &chart[key], object,
            "{key} differs between the chart and weft.yaml"
        );
    }
}

#[test]
fn the_chart_values_change_what_they_should() {
    let objects = helm_template(&[
        "--set",
        "byoCA.enabled=true",
        "--set",
        "trustDomain=example.org",
        "--set",
        "controlPlane.replicas=1",
        "--set",
        "namespace.create=true",
        "--set",
        "image.proxy.tag=dev",
    ]);
    let find = |kind: &str| objects.iter().find(|o| o["kind"] == kind).unwrap();
    assert!(objects.iter().all(|o| o["kind"] != "PodDisruptionBudget"));
    assert_eq!(find("Namespace")["metadata"]["name"], "weft-system");

    let deployment = find("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--ca-cert=/etc/weft/ca/ca.crt"), "{args:?}");
    assert!(args.contains(&"--ca-key=/etc/weft/ca/ca.key"), "{args:?}");
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "WEFT_TRUST_DOMAIN", "value": "example.org"}))
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "byo-ca")
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], "weft-ca-byo");
    assert_eq!(volume["secret"]["defaultMode"], 0o440);

    let proxy = &find("DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(proxy["image"], "ghcr.io/weft-mesh/weft-proxy:dev");
    assert!(proxy["env"].as_array().unwrap().contains(&json!({
        "name": "WEFT_CONTROL_PLANE_IDENTITY",
        "value": "spiffe://example.org/ns/weft-system/sa/weft-control-plane",
    })));
}

#[test]
fn the_chart_ships_the_dashboards_and_alerts_on_request() {
    let none = helm_template(&[]);
    assert!(none.iter().all(
        |o| o["kind"] != "PrometheusRule" && o["metadata"]["name"] != "weft-grafana-dashboards"
    ));
    let objects = helm_template(&[
        "--set",
        "observability.grafanaDashboards.enabled=true",
        "--set",
        "observability.prometheusRule.enabled=true",
    ]);
    let dashboards = objects
        .iter()
        .find(|o| o["metadata"]["name"] == "weft-grafana-dashboards")
        .unwrap();
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    let data = dashboards["data"].as_object().unwrap();
    let mut titles: Vec<String> = data
        .values()
        .map(|json| {
            let dashboard: Value = serde_json::from_str(json.as_str().unwrap()).unwrap();
            assert!(!dashboard["panels"].as_array().unwrap().is_empty());
            dashboard["title"].as_str().unwrap().to_owned()
        })
        .collect();
    titles.sort();
    assert_eq!(
        titles,
        [
            "weft / control plane",
            "weft / mesh overview",
            "weft / node proxy resources",
            "weft / workload traffic"
        ]
    );
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for alert in [
        "WeftNodeWithoutProxy",
        "WeftProxiesBehindConfig",
        "WeftConfigRefused",
        "WeftCertificateExpiringSoon",
        "WeftRefusalsSpiking",
        "WeftControlPlaneNotLeading",
    ] {
        assert!(alerts.contains(&alert), "{alert} in {alerts:?}");
    }
}

async fn start() -> (KubeApiServer, kube::Client) {
    let api = tokio::task::block_in_place(KubeApiServer::start).unwrap();
    let client = api.client().await.unwrap();
    (api, client)
}

/// Server-side applies `objects` in order; the error names the object.
async fn apply(client: &kube::Client, objects: &[Value]) -> Result<(), String> {
    kube_cluster::apply_objects(client, objects)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

async fn apply_one(client: &kube::Client, object: &Value) -> Result<DynamicObject, kube::Error> {
    kube_cluster::apply_object(client, object).await
}

async fn install_weft(client: &kube::Client) {
    kube_cluster::install_weft(client).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manifests_and_the_chart_are_accepted() {
    let rendered = tokio::task::spawn_blocking(rendered_chart).await.unwrap();
    let (_api, client) = start().await;
    install_weft(&client).await;
    // The chart over the same objects: only labels change.
    apply(&client, &rendered).await.unwrap();

    // What the API server stored is what was meant (a typo in a field name
    // would have been refused by strict field validation).
    let manifests = read_objects(&deploy_dir().join("weft.yaml"));
    let daemonset = manifests.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let daemonset = apply_one(&client, daemonset).await.unwrap();
    let pod = &daemonset.data["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let security = &pod["containers"][0]["securityContext"];
    assert_eq!(
        security["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"])
    );
    let mounts = &pod["containers"][0]["volumeMounts"];
    let netns = mounts
        .as_array()
        .into_iter()
        .flatten()
        .find(|mount| mount["name"] == "netns")
        .unwrap();
    assert_eq!(netns["mountPropagation"], "HostToContainer");
    assert_eq!(security["privileged"], false);

    // Every example in deploy/examples is a valid object (namespaces first).
    let namespaces: Vec<Value> = ["shop", "legacy"]
        .iter()
        .map(|ns| json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }))
        .collect();
    apply(&client, &namespaces).await.unwrap();
    let mut examples = 0;
    for entry in std::fs::read_dir(deploy_dir().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        apply(&client, &read_objects(&path))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        examples += 1;
    }
    assert!(examples >= 4, "the examples are there");
}

/// One access check: `verb` on `resource` (`group/resource/subresource`,
/// group empty for core) in `namespace` (empty: cluster-wide), `name`.
struct Access {
    verb: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: &'static str,
}

const fn access(
    verb: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: &'static str,
) -> Access {
    Access {
        verb,
        resource,
        namespace,
        name,
    }
}

async fn allowed(client: &kube::Client, user: &str, check: &Access) -> bool {
    let mut parts = check.resource.split('/');
    let group = parts.next().unwrap();
    let resource = parts.next().unwrap();
    let subresource = parts.next();
    let namespace = user.split(':').nth(2).unwrap();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(check.verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                subresource: subresource.map(str::to_owned),
                namespace: (!check.namespace.is_empty()).then(|| check.namespace.to_owned()),
                name: (!check.name.is_empty()).then(|| check.name.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviewed = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    reviewed.status.unwrap().allowed
}

#[tokio::test(flavor = "multi_thread")]
async fn rbac_is_least_privilege() {
    let (_api, client) = start().await;
    install_weft(&client).await;

    let control_plane_may = [
        access("list", "/pods", "", ""),
        access("watch", "/pods", "", ""),
        access("watch", "/namespaces", "", ""),
        access("list", "/services", "", ""),
        access("watch", "/serviceaccounts", "", ""),
        access("watch", "discovery.k8s.io/endpointslices", "", ""),
        access("list", "weft.dev/authorizationpolicies", "", ""),
        access("watch", "weft.dev/mtlspolicies", "", ""),
        access("watch", "weft.dev/trafficpolicies", "", ""),
        access(
            "patch",
            "weft.dev/authorizationpolicies/status",
            "shop",
            "allow-web",
        ),
        access("update", "weft.dev/trafficpolicies/status", "shop", "web"),
        access("create", "authentication.k8s.io/tokenreviews", "", ""),
        access("get", "/secrets", "weft-system", "weft-ca"),
        access("create", "/secrets", "weft-system", ""),
        access("get", "/configmaps", "weft-system", "weft-root-ca"),
        access("patch", "/configmaps", "weft-system", "weft-root-ca"),
        access(
            "update",
            "coordination.k8s.io/leases",
            "weft-system",
            "weft-control-plane",
        ),
        access("create", "coordination.k8s.io/leases", "weft-system", ""),
        access("watch", "apps/daemonsets", "weft-system", "weft-node-proxy"),
        access("list", "apps/daemonsets", "weft-system", "weft-node-proxy"),
    ];
    let control_plane_may_not = [
        // Patching the node proxies' DaemonSet would run any image as root
        // on every node.
        access("patch", "apps/daemonsets", "weft-system", "weft-node-proxy"),
        access("watch", "apps/daemonsets", "weft-system", ""),
        access("list", "apps/daemonsets", "", ""),
        access("get", "/secrets", "default", "weft-ca"),
        access("get", "/secrets", "shop", "weft-ca"),
        access("get", "/secrets", "weft-system", "other"),
        access("list", "/secrets", "", ""),
        access("list", "/secrets", "weft-system", ""),
        access("watch", "/secrets", "weft-system", ""),
        access("update", "/secrets", "weft-system", "weft-ca"),
        access("delete", "/secrets", "weft-system", "weft-ca"),
        access("create", "/secrets", "shop", ""),
        access("create", "/pods", "shop", ""),
        access("update", "/pods", "shop", "web-1"),
        access("delete", "/pods", "shop", "web-1"),
        access("create", "/pods/exec", "shop", "web-1"),
        access(
            "patch",
            "weft.dev/authorizationpolicies",
            "shop",
            "allow-web",
        ),
        access("delete", "weft.dev/trafficpolicies", "shop", "web"),
        access("get", "/configmaps", "weft-system", "other"),
        access("delete", "/configmaps", "weft-system", "weft-root-ca"),
        access("patch", "/configmaps", "shop", "weft-root-ca"),
        access(
            "update",
            "coordination.k8s.io/leases",
            "weft-system",
            "other",
        ),
        access(
            "create",
            "/serviceaccounts/token",
            "weft-system",
            "weft-node-proxy",
        ),
        access("get", "/nodes", "", ""),
        access(
            "create",
            "authorization.k8s.io/subjectaccessreviews",
            "",
            "",
        ),
        access(
            "update",
            "rbac.authorization.k8s.io/clusterroles",
            "",
            "weft-control-plane",
        ),
    ];
    let node_proxy_may_not = [
        access("get", "/pods", "weft-system", ""),
        access("list", "/pods", "", ""),
        access("get", "/nodes", "", ""),
        access("get", "/secrets", "weft-system", "weft-ca"),
        access("get", "/configmaps", "weft-system", "weft-root-ca"),
        access("create", "authentication.k8s.io/tokenreviews", "", ""),
        access(
            "create",
            "/serviceaccounts/token",
            "weft-system",
            "weft-node-proxy",
        ),
        access("list", "weft.dev/authorizationpolicies", "", ""),
        access("watch", "discovery.k8s.io/endpointslices", "", ""),
        access(
            "get",
            "coordination.k8s.io/leases",
            "weft-system",
            "weft-control-plane",
        ),
    ];
    // The uninstall hook's account, while it exists, may announce and check
    // and nothing else.
    apply(&client, &read_objects(&deploy_dir().join("uninstall.yaml")))
        .await
        .unwrap();
    let uninstall_may = [
        access("patch", "apps/daemonsets", "weft-system", "weft-node-proxy"),
        access("list", "/pods", "weft-system", ""),
    ];
    let uninstall_may_not = [
        access("patch", "apps/daemonsets", "weft-system", "other"),
        access("patch", "apps/daemonsets", "shop", "weft-node-proxy"),
        access(
            "update",
            "apps/daemonsets",
            "weft-system",
            "weft-node-proxy",
        ),
        access("list", "/pods", "", ""),
        access("patch", "/pods", "weft-system", "weft-node-proxy-x"),
        access("get", "/secrets", "weft-system", "weft-ca"),
        access("create", "/pods/exec", "weft-system", "weft-node-proxy-x"),
    ];
    let mut wrong = Vec::new();
    for (user, checks, want) in [
        (CONTROL_PLANE, &control_plane_may[..], true),
        (CONTROL_PLANE, &control_plane_may_not[..], false),
        (NODE_PROXY, &node_proxy_may_not[..], false),
        (UNINSTALL, &uninstall_may[..], true),
        (UNINSTALL, &uninstall_may_not[..], false),
    ] {
        for check in checks {
            if allowed(&client, user, check).await != want {
                wrong.push(format!(
                    "{user} {} {} {} in {:?} {:?}",
                    if want {
                        "should be able to"
                    } else {
                        "must not"
                    },
                    check.verb,
                    check.resource,
                    check.namespace,
                    check.name
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
