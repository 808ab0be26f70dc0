//! The pre-install checks (`check --pre`), against the API server with the
//! user's credentials: is the cluster new enough, are weft's CRDs absent
//! or the ones this binary ships, may the user create what the install
//! creates, and is every node's kernel new enough for the capture (the
//! API server knows kernel releases, not modules: the proxy finds a
//! missing nftables module when it programs its first pod)?
//!
//! What the install creates is read from the manifests this binary was
//! built with (`deploy/weft.yaml`, `deploy/uninstall.yaml`; the chart
//! renders the same objects), so the permissions checked cannot drift from
//! the install.

use std::collections::BTreeSet;

use futures::StreamExt as _;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::Value;

use super::CheckResult;

/// The oldest Kubernetes weft runs on: its CRDs validate addresses with
/// CEL's `isIP` and `isCIDR`, which the API server has from 1.31.
const MIN_KUBERNETES: (u32, u32) = (1, 31);
/// The oldest Linux whose nftables can do the capture: the pod's table
/// redirects IPv4 and IPv6 in one `inet` table, and NAT chains in the
/// `inet` family arrived in 5.2.
const MIN_KERNEL: (u32, u32) = (5, 2);
/// What `kubectl apply -f deploy/weft.yaml` (or the chart) creates, and
/// what the chart's pre-delete hook creates on uninstall.
const INSTALL_MANIFESTS: [&str; 2] = [
    include_str!("../../../deploy/weft.yaml"),
    include_str!("../../../deploy/uninstall.yaml"),
];
/// How many access reviews are asked at once.
const REVIEWS_AT_ONCE: usize = 8;

/// Runs the pre-install checks against the API server.
pub(super) async fn run(client: &kube::Client, namespace: &str) -> Vec<CheckResult> {
    vec![
        version_check(client).await,
        crd_check(client).await,
        permission_check(client, namespace).await,
        kernel_check(client).await,
    ]
}

async fn version_check(client: &kube::Client) -> CheckResult {
    const CHECK: &str = "Kubernetes version";
    let info = match client.apiserver_version().await {
        Ok(info) => info,
        Err(error) => {
            return CheckResult::fail(
                CHECK,
                format!(
                    "asking the API server for its version: {}",
                    super::said(&error)
                ),
                "is KUBECONFIG this cluster's? (kubectl version)",
            );
        }
    };
    let (major, minor) = (leading_number(&info.major), leading_number(&info.minor));
    match major.zip(minor) {
        Some(version) if version >= MIN_KUBERNETES => CheckResult::pass(
            CHECK,
            format!("{} (at least {})", info.git_version, dotted(MIN_KUBERNETES)),
        ),
        Some(_) => CheckResult::fail(
            CHECK,
            format!(
                "{}: weft needs {} or newer",
                info.git_version,
                dotted(MIN_KUBERNETES)
            ),
            "upgrade the cluster: weft's CRDs validate addresses with CEL functions (isIP, isCIDR) the API server has from 1.31",
        ),
        None => CheckResult::fail(
            CHECK,
            format!("cannot read the version {}.{}", info.major, info.minor),
            "check kubectl version",
        ),
    }
}

/// `major.minor`.
fn dotted((major, minor): (u32, u32)) -> String {
    format!("{major}.{minor}")
}

/// The number a version field starts with: `31` of `31+` (as some
/// providers write it).
fn leading_number(text: &str) -> Option<u32> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Major and minor of a kernel release (`6.1.0-28-cloud-amd64`).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let major = leading_number(parts.next()?)?;
    let minor = leading_number(parts.next()?)?;
    Some((major, minor))
}

/// weft's CRDs: absent (the install creates them) or present as this
/// binary ships them. Helm installs the CRDs of its `crds/` directory only
/// when they are absent and never upgrades them, so an older schema would
/// silently stay.
async fn crd_check(client: &kube::Client) -> CheckResult {
    const CHECK: &str = "CRDs";
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let (mut absent, mut current, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for wanted in crate::crd::crds() {
        let name = wanted.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await {
            Ok(None) => absent.push(name),
            Ok(Some(installed)) => match crd_problem(&wanted, &installed) {
                None => current.push(name),
                Some(problem) => problems.push(format!("{name}: {problem}")),
            },
            Err(error) => {
                // Forbidden or unreachable for one, so for all.
                problems.push(format!("reading {name}: {}", super::said(&error)));
                break;
            }
        }
    }
    if !problems.is_empty() {
        return CheckResult::fail(
            CHECK,
            problems.join("; "),
            "apply the CRDs this version ships: weft-control-plane crds | kubectl apply --server-side -f - (helm does not upgrade CRDs)",
        );
    }
    CheckResult::pass(
        CHECK,
        match (absent.is_empty(), current.is_empty()) {
            (false, true) => "none installed yet: the install creates them".into(),
            (true, _) => format!("{} installed as this version ships them", current.len()),
            (false, false) => format!(
                "{} as this version ships them, {} not yet (the install creates them)",
                current.join(", "),
                absent.join(", ")
            ),
        },
    )
}

/// Why `installed` is not `wanted`: not Established, or a version's
/// schema differs.
fn crd_problem(
    wanted: &CustomResourceDefinition,
    installed: &CustomResourceDefinition,
) -> Option<String> {
    let established = installed
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    if !established {
        return Some("not Established".into());
    }
    for version in &wanted.spec.versions {
        let Some(theirs) = installed
            .spec
            .versions
            .iter()
            .find(|v| v.name == version.name && v.served)
        else {
            return Some(format!("does not serve {}", version.name));
        };
        let schema = |v: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion| {
            serde_json::to_value(&v.schema).unwrap_or(Value::Null)
        };
        if schema(theirs) != schema(version) {
            return Some(format!(
                "its {} schema is not the one this version ships",
                version.name
            ));
        }
    }
    None
}

/// A kind the install creates: group, version, kind, and whether it is
/// namespaced.
type InstalledKind = (String, String, String, bool);

/// One permission the install needs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Permission {
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: String,
        name: String,
        namespace: String,
    },
    Url {
        verb: String,
        path: String,
    },
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Permission::Resource {
                verb,
                group,
                resource,
                subresource,
                name,
                namespace,
            } => {
                write!(f, "{verb} {resource}")?;
                if !subresource.is_empty() {
                    write!(f, "/{subresource}")?;
                }
                if !group.is_empty() {
                    write!(f, ".{group}")?;
                }
                if !name.is_empty() {
                    write!(f, " {name}")?;
                }
                if namespace.is_empty() {
                    write!(f, " (cluster-wide)")
                } else {
                    write!(f, " in {namespace}")
                }
            }
            Permission::Url { verb, path } => write!(f, "{verb} {path}"),
        }
    }
}

/// The kinds the install creates (with whether they are namespaced) and
/// the permissions its Roles and ClusterRoles grant: Kubernetes lets a
/// user grant only what they hold.
fn install_needs(
    namespace: &str,
) -> Result<(BTreeSet<InstalledKind>, BTreeSet<Permission>), String> {
    let mut kinds = BTreeSet::new();
    let mut granted = BTreeSet::new();
    for text in INSTALL_MANIFESTS {
        let objects: Vec<Value> = serde_saphyr::from_multiple(text)
            .map_err(|e| format!("reading the install's manifests: {e}"))?;
        for object in objects.iter().filter(|o| o.is_object()) {
            let (Some(api_version), Some(kind)) =
                (object["apiVersion"].as_str(), object["kind"].as_str())
            else {
                continue;
            };
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            let namespaced = object["metadata"]["namespace"].is_string();
            kinds.insert((
                group.to_owned(),
                version.to_owned(),
                kind.to_owned(),
                namespaced,
            ));
            if !matches!(kind, "Role" | "ClusterRole") {
                continue;
            }
            let rule_namespace = if namespaced { namespace } else { "" };
            for rule in object["rules"].as_array().into_iter().flatten() {
                granted.extend(rule_permissions(rule, rule_namespace));
            }
        }
    }
    // The CRDs, from the chart's crds/ directory.
    kinds.insert((
        "apiextensions.k8s.io".into(),
        "v1".into(),
        "CustomResourceDefinition".into(),
        false,
    ));
    Ok((kinds, granted))
}

/// The permissions one RBAC rule grants, one per verb × group × resource
/// × name.
fn rule_permissions(rule: &Value, namespace: &str) -> Vec<Permission> {
    let strings = |key: &str| -> Vec<String> {
        rule[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let (verbs, groups, resources) = (strings("verbs"), strings("apiGroups"), strings("resources"));
    let mut names = strings("resourceNames");
    if names.is_empty() {
        names.push(String::new());
    }
    let mut permissions = Vec::new();
    for verb in &verbs {
        for path in strings("nonResourceURLs") {
            permissions.push(Permission::Url {
                verb: verb.clone(),
                path,
            });
        }
        for group in &groups {
            for resource in &resources {
                let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
                for name in &names {
                    permissions.push(Permission::Resource {
                        verb: verb.clone(),
                        group: group.clone(),
                        resource: resource.to_owned(),
                        subresource: subresource.to_owned(),
                        name: name.clone(),
                        namespace: namespace.to_owned(),
                    });
                }
            }
        }
    }
    permissions
}

/// Whether the user may create every object of the install and holds
/// every permission it grants (SelfSubjectAccessReviews).
async fn permission_check(client: &kube::Client, namespace: &str) -> CheckResult {
    const CHECK: &str = "permissions to install";
    let (kinds, mut needed) = match install_needs(namespace) {
        Ok(needs) => needs,
        Err(error) => return CheckResult::fail(CHECK, error, "report this as a bug"),
    };
    let mut problems = Vec::new();
    for (group, version, kind, namespaced) in &kinds {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok((resource, _)) => {
                needed.insert(Permission::Resource {
                    verb: "create".into(),
                    group: gvk.group.clone(),
                    resource: resource.plural,
                    subresource: String::new(),
                    name: String::new(),
                    namespace: if *namespaced {
                        namespace.to_owned()
                    } else {
                        String::new()
                    },
                });
            }
            Err(error) => problems.push(format!(
                "the API server does not serve {}/{} {}: {}",
                gvk.group,
                gvk.version,
                gvk.kind,
                super::said(&error)
            )),
        }
    }
    let reviews = futures::stream::iter(needed.iter().cloned())
        .map(|permission| async move {
            let allowed = allowed(client, &permission).await;
            (permission, allowed)
        })
        .buffered(REVIEWS_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    let mut missing = Vec::new();
    for (permission, allowed) in reviews {
        match allowed {
            Ok(true) => {}
            Ok(false) => missing.push(permission.to_string()),
            Err(error) => problems.push(format!(
                "asking whether you may {permission}: {}",
                super::said(&error)
            )),
        }
    }
    if !missing.is_empty() {
        problems.push(format!("you may not {}", missing.join("; ")));
    }
    if problems.is_empty() {
        CheckResult::pass(
            CHECK,
            format!(
                "you may create the {} kinds the install creates and hold the {} permissions it grants",
                kinds.len(),
                needed.len()
            ),
        )
    } else {
        CheckResult::fail(
            CHECK,
            problems.join("; "),
            "install as a cluster admin, or have one grant you these: weft creates cluster-wide RBAC, and Kubernetes lets you grant only what you hold",
        )
    }
}

/// Asks the API server whether the user has `permission`.
async fn allowed(client: &kube::Client, permission: &Permission) -> Result<bool, kube::Error> {
    let some = |s: &String| (!s.is_empty()).then(|| s.clone());
    let spec = match permission {
        Permission::Resource {
            verb,
            group,
            resource,
            subresource,
            name,
            namespace,
        } => SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.clone()),
                group: Some(group.clone()),
                resource: Some(resource.clone()),
                subresource: some(subresource),
                name: some(name),
                namespace: some(namespace),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        Permission::Url { verb, path } => SelfSubjectAccessReviewSpec {
            non_resource_attributes: Some(NonResourceAttributes {
                verb: Some(verb.clone()),
                path: Some(path.clone()),
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
    };
    let review = SelfSubjectAccessReview {
        spec,
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Every Linux node's kernel can run the capture (the API server knows
/// each node's kernel release; the modules themselves the proxy finds out
/// when it programs the first pod).
async fn kernel_check(client: &kube::Client) -> CheckResult {
    const CHECK: &str = "node kernels";
    let nodes = match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(nodes) => nodes.items,
        Err(error) => {
            return CheckResult::fail(
                CHECK,
                format!("listing the nodes: {}", super::said(&error)),
                "the check needs to list nodes (the control plane does not, but the proxies run on each)",
            );
        }
    };
    if nodes.is_empty() {
        return CheckResult::fail(
            CHECK,
            "the cluster has no nodes".into(),
            "add nodes: the proxies run on every node",
        );
    }
    let (mut linux, mut other, mut old) = (0, Vec::new(), Vec::new());
    for node in &nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
        let Some(info) = info else {
            old.push(format!("{name} (no kernel reported yet)"));
            continue;
        };
        let (os, kernel) = (info.operating_system.as_str(), info.kernel_version.as_str());
        if os != "linux" {
            other.push(format!("{name} ({os})"));
            continue;
        }
        linux += 1;
        match kernel_version(kernel) {
            Some(version) if version >= MIN_KERNEL => {}
            _ => old.push(format!("{name} ({kernel})")),
        }
    }
    if !old.is_empty() {
        return CheckResult::fail(
            CHECK,
            format!(
                "too old for the capture (Linux {} or newer): {}",
                dotted(MIN_KERNEL),
                old.join(", ")
            ),
            "upgrade those nodes' kernels: the capture redirects IPv4 and IPv6 in one nftables inet table, which needs NAT in the inet family (Linux 5.2)",
        );
    }
    let mut detail = format!(
        "{linux} Linux nodes, each on Linux {} or newer",
        dotted(MIN_KERNEL)
    );
    if !other.is_empty() {
        detail += &format!(
            "; no proxy runs on {} (pods there are not meshed)",
            other.join(", ")
        );
    }
    CheckResult::pass(CHECK, detail)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn versions_are_read_as_providers_write_them() {
        assert_eq!(leading_number("31+"), Some(31));
        assert_eq!(leading_number("1"), Some(1));
        assert_eq!(leading_number(""), None);
        assert_eq!(kernel_version("6.1.0-28-cloud-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.0-1057-azure"), Some((5, 15)));
        assert_eq!(kernel_version("4.19.0"), Some((4, 19)));
        assert!(kernel_version("4.19.0").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.10.1").unwrap() >= MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
        assert!((1, 30) < MIN_KUBERNETES && (1, 31) >= MIN_KUBERNETES && (2, 0) > MIN_KUBERNETES);
    }

    #[test]
    fn the_install_needs_what_its_manifests_create_and_grant() {
        let (kinds, granted) = install_needs("mesh").unwrap();
        let kinds: BTreeSet<String> = kinds
            .iter()
            .map(|(_, _, kind, namespaced)| format!("{kind} {namespaced}"))
            .collect();
        for kind in [
            "Namespace false",
            "ClusterRole false",
            "ClusterRoleBinding false",
            "CustomResourceDefinition false",
            "Deployment true",
            "DaemonSet true",
            "Role true",
            "Job true",
        ] {
            assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
        }
        let granted: Vec<String> = granted.iter().map(ToString::to_string).collect();
        for permission in [
            "create tokenreviews.authentication.k8s.io (cluster-wide)",
            "watch pods (cluster-wide)",
            "patch authorizationpolicies/status.weft.dev (cluster-wide)",
            "get secrets weft-ca in mesh",
            "get /openid/v1/jwks",
        ] {
            assert!(
                granted.iter().any(|p| p == permission),
                "{permission} missing from {granted:?}"
            );
        }
    }
}
