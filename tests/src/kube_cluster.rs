//! The testbed's cluster in a real API server: its objects applied as a user
//! would apply them, pod status written as a kubelet would write it, weft's
//! own objects from `deploy/`, and the credentials the weft processes get in
//! a real cluster (a projected token per node proxy, a ServiceAccount
//! kubeconfig for the control plane).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Scope, pinned_kind};
use serde_json::{Value, json};

use crate::Testbed;

/// Field manager of everything the testbed applies.
pub const FIELD_MANAGER: &str = "weft-testbed";
/// weft's namespace in `deploy/`.
pub const WEFT_NAMESPACE: &str = "weft-system";
/// How long a CRD may take to be served after it is applied.
const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);
/// The audience node proxy tokens are bound to.
pub const TOKEN_AUDIENCE: &str = "weft";

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> std::path::PathBuf {
    crate::repo_root().join("deploy")
}

/// Applies one object (a JSON value with apiVersion and kind) with
/// server-side apply and strict field validation, mapping its kind through
/// discovery, and returns it as the API server stored it.
pub async fn apply_object(
    client: &kube::Client,
    object: &Value,
) -> std::result::Result<DynamicObject, kube::Error> {
    let kind = discover(client, object).await?;
    apply_discovered(client, object, &kind).await
}

/// Applies objects in order (see [`apply_object`]), discovering each kind
/// once; the error names the object that was refused.
pub async fn apply_objects(client: &kube::Client, objects: &[Value]) -> Result<Vec<DynamicObject>> {
    let mut kinds: HashMap<(String, String), (ApiResource, Scope)> = HashMap::new();
    let mut applied = Vec::new();
    for object in objects {
        let what = || {
            format!(
                "applying {} {}/{}",
                object["kind"].as_str().unwrap_or("?"),
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap_or("?"),
            )
        };
        let key = (
            object["apiVersion"].as_str().unwrap_or_default().to_owned(),
            object["kind"].as_str().unwrap_or_default().to_owned(),
        );
        if !kinds.contains_key(&key) {
            let kind = discover(client, object).await.with_context(what)?;
            kinds.insert(key.clone(), kind);
        }
        let stored = apply_discovered(client, object, &kinds[&key])
            .await
            .with_context(what)?;
        applied.push(stored);
    }
    Ok(applied)
}

/// The resource and scope of an object's apiVersion and kind.
async fn discover(
    client: &kube::Client,
    object: &Value,
) -> std::result::Result<(ApiResource, Scope), kube::Error> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    };
    let kind = object["kind"].as_str().unwrap_or_default();
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = pinned_kind(client, &gvk).await?;
    Ok((resource, capabilities.scope))
}

/// Server-side applies `object` as the discovered `kind`, strictly.
async fn apply_discovered(
    client: &kube::Client,
    object: &Value,
    (resource, scope): &(ApiResource, Scope),
) -> std::result::Result<DynamicObject, kube::Error> {
    let api: Api<DynamicObject> = match scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default"),
            resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), resource),
    };
    let params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    api.patch(name, &params, &Patch::Apply(object)).await
}

/// Parses a multi-document YAML text into objects (empty documents skipped).
pub fn yaml_objects(text: &str) -> Result<Vec<Value>> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(text).context("parsing multi-document YAML")?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// Applies weft's CRDs (`deploy/crds/weft.dev.yaml`) and waits until the
/// API server serves them.
pub async fn install_crds(client: &kube::Client) -> Result<()> {
    let crds = read_deploy_file("crds/weft.dev.yaml")?;
    apply_objects(client, &crds).await?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + CRD_ESTABLISHED_TIMEOUT;
    for crd in &crds {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        loop {
            let stored = api.get(name).await?;
            let conditions = stored.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("CRD {name} not Established: {conditions:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Installs weft as `deploy/` describes it: the CRDs, then `weft.yaml`
/// (namespace, ServiceAccounts, RBAC, workloads: nothing runs the workloads
/// here, but the RBAC is real).
pub async fn install_weft(client: &kube::Client) -> Result<()> {
    install_crds(client).await?;
    apply_objects(client, &read_deploy_file("weft.yaml")?).await?;
    Ok(())
}

/// The objects of a YAML file under `deploy/`.
pub fn read_deploy_file(name: &str) -> Result<Vec<Value>> {
    let path = deploy_dir().join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    yaml_objects(&text)
}

/// Loads the testbed's objects (a Node per node, then the manifests) and
/// writes each pod's status as its kubelet would.
pub async fn load_testbed(client: &kube::Client, testbed: &Testbed) -> Result<()> {
    let nodes: Vec<Value> = testbed
        .node_names()
        .iter()
        .map(|node| json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": node } }))
        .collect();
    apply_objects(client, &nodes).await?;
    // The API server gives each pod its UID (and refuses one it is given).
    let mut objects = testbed.objects();
    for object in &mut objects {
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("uid");
        }
    }
    apply_objects(client, &objects).await?;
    for pod in objects.iter().filter(|o| o["kind"] == "Pod") {
        write_pod_status(client, pod).await?;
    }
    Ok(())
}

/// Writes `pod["status"]` through the status subresource, as a kubelet does.
pub async fn write_pod_status(client: &kube::Client, pod: &Value) -> Result<()> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let status = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "status": pod["status"],
    });
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply("weft-testbed-kubelet").force(),
            &Patch::Apply(status),
        )
        .await
        .with_context(|| format!("writing the status of pod {namespace}/{name}"))?;
    Ok(())
}

/// A token for ServiceAccount `namespace/name`, for `audiences`, bound to
/// `pod` when given (then the API server names the pod's node in reviews).
pub async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    audiences: &[&str],
    pod: Option<&Pod>,
) -> Result<String> {
    let bound_object_ref = pod.map(|pod| BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
    });
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            bound_object_ref,
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
    response
        .status
        .and_then(|s| s.token)
        .context("the TokenRequest came back without a token")
}

/// Creates a pod of ServiceAccount `namespace/service_account` on `node`
/// (for the API server only: nothing runs it) and returns it as stored.
pub async fn create_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
) -> Result<Pod> {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "containers": [{ "name": "main", "image": "weft-testbed/placeholder:latest" }],
        },
    });
    apply_objects(client, &[pod]).await?;
    Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading back pod {namespace}/{name}"))
}

/// The token a node proxy on `node` gets in a real cluster: a projected
/// token of `weft-node-proxy` for audience `weft`, bound to its pod there.
pub async fn node_proxy_token(client: &kube::Client, node: &str) -> Result<String> {
    let pod = create_pod(
        client,
        WEFT_NAMESPACE,
        &format!("weft-node-proxy-{node}"),
        "weft-node-proxy",
        node,
    )
    .await?;
    service_account_token(
        client,
        WEFT_NAMESPACE,
        "weft-node-proxy",
        &[TOKEN_AUDIENCE],
        Some(&pod),
    )
    .await
}

/// Waits until the control plane has published the mesh roots.
pub async fn wait_for_roots(client: &kube::Client, timeout: Duration) -> Result<String> {
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), WEFT_NAMESPACE);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(roots) = config_maps
            .get_opt("weft-root-ca")
            .await?
            .and_then(|cm| cm.data)
            .and_then(|mut data| data.remove("root-cert.pem"))
        {
            return Ok(roots);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the control plane never published ConfigMap weft-system/weft-root-ca");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A status condition of a weft object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// The message.
    pub message: String,
}

/// The condition `type_` of the weft object `plural/namespace/name`
/// (`plural` as in `authorizationpolicies`), if it has one.
pub async fn weft_condition(
    client: &kube::Client,
    plural: &str,
    namespace: &str,
    name: &str,
    type_: &str,
) -> Option<Condition> {
    let resource = kube::discovery::ApiResource {
        group: "weft.dev".into(),
        version: "v1alpha1".into(),
        api_version: "weft.dev/v1alpha1".into(),
        kind: String::new(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let object = api.get(name).await.ok()?;
    let conditions = object.data["status"]["conditions"].as_array()?;
    let condition = conditions.iter().find(|c| c["type"] == type_)?;
    Some(Condition {
        status: condition["status"].as_str()?.to_owned(),
        reason: condition["reason"].as_str()?.to_owned(),
        message: condition["message"].as_str()?.to_owned(),
    })
}

/// Waits until the condition `type_` of a weft object satisfies `wanted`;
/// the error shows the last one seen.
pub async fn wait_for_condition(
    client: &kube::Client,
    plural: &str,
    namespace: &str,
    name: &str,
    type_: &str,
    wanted: impl Fn(&Condition) -> bool,
) -> Result<Condition> {
    let deadline = tokio::time::Instant::now() + crate::CONFIG_WAIT;
    loop {
        let seen = weft_condition(client, plural, namespace, name, type_).await;
        match seen {
            Some(condition) if wanted(&condition) => return Ok(condition),
            _ if tokio::time::Instant::now() >= deadline => {
                bail!(
                    "{plural} {namespace}/{name}: condition {type_} never as wanted; last seen {seen:?}"
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
