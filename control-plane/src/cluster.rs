//! The Kubernetes objects the control plane reads, as the sources deliver
//! them: raw, typed, keyed by namespace and name. Every source (a manifests
//! directory, the API server) fills the same `ClusterState`; the mesh model
//! is derived from it.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::crd::{AuthorizationPolicy, MtlsPolicy, TrafficPolicy};

/// `apiVersion` of weft's own kinds.
const WEFT_API_VERSION: &str = "weft.dev/v1alpha1";

/// The annotation the kubelet puts on the API server's mirror of a static
/// pod (one defined by a file on the node, not by the API).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// `<namespace>/<name>`, or just `<name>` for cluster-scoped objects.
pub type ObjectKey = String;

/// One Kubernetes object of a kind the control plane uses. Shared: the
/// manifests source holds each object once for its file and once in the
/// cluster state, and a pod's object is kilobytes.
#[derive(Clone, Debug)]
pub enum ClusterObject {
    /// A Namespace (its labels say whether its pods are meshed).
    Namespace(Arc<Namespace>),
    /// A ServiceAccount (one identity each).
    ServiceAccount(Arc<ServiceAccount>),
    /// A Pod (a workload).
    Pod(Arc<Pod>),
    /// A Service (VIPs and ports).
    Service(Arc<Service>),
    /// An EndpointSlice (a Service's endpoints).
    EndpointSlice(Arc<EndpointSlice>),
    /// Who may connect to which workloads.
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// Whether workloads accept plaintext.
    MtlsPolicy(Arc<MtlsPolicy>),
    /// How connections to a Service behave.
    TrafficPolicy(Arc<TrafficPolicy>),
    /// A DaemonSet; only weft's node proxies' is read (its annotations say
    /// whether the mesh is being uninstalled).
    DaemonSet(Arc<DaemonSet>),
}

/// Why a document could not be turned into a [`ClusterObject`].
#[derive(Debug, PartialEq, Eq)]
pub enum ObjectProblem {
    /// A kind the control plane does not use; not an error, just skipped.
    Ignored {
        /// `apiVersion/kind` of the object.
        kind: String,
    },
    /// The document is not a valid object of its kind.
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

impl ClusterObject {
    /// Decodes one object from its JSON form (as YAML documents and the API
    /// server both provide), checking `apiVersion`, `kind` and the name.
    pub fn from_value(value: Value) -> Result<ClusterObject, ObjectProblem> {
        let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or("");
        let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
        if api_version.is_empty() || kind.is_empty() {
            return Err(ObjectProblem::Invalid {
                reason: "missing apiVersion or kind".into(),
            });
        }
        let invalid = |e: serde_json::Error| ObjectProblem::Invalid {
            reason: format!("{api_version} {kind}: {e}"),
        };
        let object = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => ClusterObject::Namespace(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            ("v1", "ServiceAccount") => ClusterObject::ServiceAccount(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            ("v1", "Pod") => ClusterObject::Pod(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            ("v1", "Service") => ClusterObject::Service(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            ("discovery.k8s.io/v1", "EndpointSlice") => ClusterObject::EndpointSlice(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            (WEFT_API_VERSION, "AuthorizationPolicy") => ClusterObject::AuthorizationPolicy(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            (WEFT_API_VERSION, "MtlsPolicy") => ClusterObject::MtlsPolicy(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            (WEFT_API_VERSION, "TrafficPolicy") => ClusterObject::TrafficPolicy(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            ("apps/v1", "DaemonSet") => ClusterObject::DaemonSet(
                serde_json::from_value(value)
                    .map(Arc::new)
                    .map_err(invalid)?,
            ),
            _ => {
                return Err(ObjectProblem::Ignored {
                    kind: format!("{api_version}/{kind}"),
                });
            }
        };
        let meta = object.metadata();
        if meta.name.as_deref().unwrap_or("").is_empty() {
            return Err(ObjectProblem::Invalid {
                reason: format!("{kind} without metadata.name"),
            });
        }
        if !matches!(object, ClusterObject::Namespace(_))
            && meta.namespace.as_deref().unwrap_or("").is_empty()
        {
            return Err(ObjectProblem::Invalid {
                reason: format!(
                    "{kind} {} without metadata.namespace",
                    meta.name.as_deref().unwrap_or("")
                ),
            });
        }
        Ok(object)
    }

    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            ClusterObject::Namespace(o) => &o.metadata,
            ClusterObject::ServiceAccount(o) => &o.metadata,
            ClusterObject::Pod(o) => &o.metadata,
            ClusterObject::Service(o) => &o.metadata,
            ClusterObject::EndpointSlice(o) => &o.metadata,
            ClusterObject::AuthorizationPolicy(o) => &o.metadata,
            ClusterObject::MtlsPolicy(o) => &o.metadata,
            ClusterObject::TrafficPolicy(o) => &o.metadata,
            ClusterObject::DaemonSet(o) => &o.metadata,
        }
    }

    /// The object's key within its kind.
    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        let name = meta.name.as_deref().unwrap_or("");
        match meta.namespace.as_deref() {
            Some(ns) if !matches!(self, ClusterObject::Namespace(_)) => format!("{ns}/{name}"),
            _ => name.to_owned(),
        }
    }

    /// The object's kind, as Kubernetes spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            ClusterObject::Namespace(_) => "Namespace",
            ClusterObject::ServiceAccount(_) => "ServiceAccount",
            ClusterObject::Pod(_) => "Pod",
            ClusterObject::Service(_) => "Service",
            ClusterObject::EndpointSlice(_) => "EndpointSlice",
            ClusterObject::AuthorizationPolicy(_) => "AuthorizationPolicy",
            ClusterObject::MtlsPolicy(_) => "MtlsPolicy",
            ClusterObject::TrafficPolicy(_) => "TrafficPolicy",
            ClusterObject::DaemonSet(_) => "DaemonSet",
        }
    }

    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind(), self.key())
    }
}

/// Objects of one kind by key: a persistent map, so a copy of the cluster
/// is O(1) and two versions of it are compared ([`imbl::OrdMap::diff`]) in
/// proportion to what changed. Objects are shared, not copied, between
/// versions (and with the Kubernetes watch caches).
pub type Objects<T> = imbl::OrdMap<ObjectKey, Arc<T>>;

/// All objects the control plane knows, by kind and key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    /// Namespaces by name.
    pub namespaces: Objects<Namespace>,
    /// ServiceAccounts by `<namespace>/<name>`.
    pub service_accounts: Objects<ServiceAccount>,
    /// Pods by `<namespace>/<name>`.
    pub pods: Objects<Pod>,
    /// Services by `<namespace>/<name>`.
    pub services: Objects<Service>,
    /// EndpointSlices by `<namespace>/<name>`.
    pub endpoint_slices: Objects<EndpointSlice>,
    /// AuthorizationPolicies by `<namespace>/<name>`.
    pub authorization_policies: Objects<AuthorizationPolicy>,
    /// MtlsPolicies by `<namespace>/<name>`.
    pub mtls_policies: Objects<MtlsPolicy>,
    /// TrafficPolicies by `<namespace>/<name>`.
    pub traffic_policies: Objects<TrafficPolicy>,
    /// DaemonSets by `<namespace>/<name>` (from Kubernetes, only weft's
    /// node proxies').
    pub daemon_sets: Objects<DaemonSet>,
}

impl ClusterState {
    /// Removes the object of `kind` (as [`ClusterObject::kind`] names it)
    /// at `key`, if there is one.
    pub fn remove(&mut self, kind: &str, key: &str) {
        match kind {
            "Namespace" => drop(self.namespaces.remove(key)),
            "ServiceAccount" => drop(self.service_accounts.remove(key)),
            "Pod" => drop(self.pods.remove(key)),
            "Service" => drop(self.services.remove(key)),
            "EndpointSlice" => drop(self.endpoint_slices.remove(key)),
            "AuthorizationPolicy" => drop(self.authorization_policies.remove(key)),
            "MtlsPolicy" => drop(self.mtls_policies.remove(key)),
            "TrafficPolicy" => drop(self.traffic_policies.remove(key)),
            "DaemonSet" => drop(self.daemon_sets.remove(key)),
            _ => {}
        }
    }

    /// Adds or replaces an object. Returns whether it replaced one, so a
    /// source can report duplicates.
    pub fn insert(&mut self, object: ClusterObject) -> bool {
        let key = object.key();
        match object {
            ClusterObject::Namespace(o) => self.namespaces.insert(key, o).is_some(),
            ClusterObject::ServiceAccount(o) => self.service_accounts.insert(key, o).is_some(),
            ClusterObject::Pod(o) => self.pods.insert(key, o).is_some(),
            ClusterObject::Service(o) => self.services.insert(key, o).is_some(),
            ClusterObject::EndpointSlice(o) => self.endpoint_slices.insert(key, o).is_some(),
            ClusterObject::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(key, o).is_some()
            }
            ClusterObject::MtlsPolicy(o) => self.mtls_policies.insert(key, o).is_some(),
            ClusterObject::TrafficPolicy(o) => self.traffic_policies.insert(key, o).is_some(),
            ClusterObject::DaemonSet(o) => self.daemon_sets.insert(key, o).is_some(),
        }
    }
}

/// The objects of `map` (keyed `<namespace>/<name>`) in `namespace`: a
/// range of the sorted keys, so looking at one namespace costs in
/// proportion to it, not to the cluster.
pub fn in_namespace<'a, T>(
    map: &'a Objects<T>,
    namespace: &str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a Arc<T>)> {
    // '0' follows '/' in ASCII: the range holds exactly "<namespace>/...".
    map.range(format!("{namespace}/")..format!("{namespace}0"))
}

#[cfg(any(test, feature = "test-clusters"))]
impl ClusterState {
    /// The objects of a multi-document YAML text; panics on a bad one.
    pub(crate) fn from_yaml(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        for document in crate::manifests::parse_documents(yaml).expect("valid YAML") {
            state.insert(ClusterObject::from_value(document).expect("a valid object"));
        }
        state
    }
}
