//! The entries of a view: workloads, Services and their endpoints, as
//! the proxy holds them. A node holds every pod of the cluster, so these
//! are laid out for size: what many pods share is held once, what only
//! the pod's own node needs is behind one pointer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use serde::Serialize;
use weft_certs::Identity;

use super::{HasKey, PodUid, TrafficPolicy, display, names};
/// A pod, local or remote. A node holds every pod of the cluster, so each
/// byte here counts 50,000 times: the pod holds its own uid and addresses,
/// and one pointer each to what it shares with other pods: its node's name
/// and its profile (identity, workload, and what only its own node
/// needs), held once for all the pods of a workload (see `names`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `<namespace>/<pod name>`: the view's key. (The pod's name is read
    /// from it, its namespace and ServiceAccount from its identity: see
    /// [`Workload::name`].)
    pub uid: PodUid,
    /// The pod's addresses.
    pub ips: Addresses,
    /// The node the pod runs on.
    node: Arc<NodeName>,
    profile: Arc<Profile>,
}

/// What the pods of one workload have in common, held once for all of them
/// (a remote pod's local details are the one empty set).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Profile {
    identity: Identity,
    workload_name: Arc<str>,
    meshed: bool,
    local: Arc<LocalDetails>,
}

/// A node's name, behind one thin pointer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct NodeName(Arc<str>);

static PROFILES: names::Shared<Profile> = LazyLock::new(names::new_set);
static NODES: names::Shared<NodeName> = LazyLock::new(names::new_set);

/// What the proxy of a pod's own node needs to protect it; the control
/// plane leaves it empty for pods on other nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct LocalDetails {
    /// The pod's `metadata.uid` (as the container runtime knows it), empty
    /// if the control plane did not say: it tells this pod from a deleted
    /// one of the same name when the runtime announces it.
    pub pod_uid: Box<str>,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// Keys of the AuthorizationPolicies that apply to the pod. One that
    /// is not in the view (refused) refuses every connection to the pod.
    pub authorization_policies: Vec<String>,
    /// Those of `authorization_policies` the control plane refused as
    /// invalid: while one is listed, every connection is refused.
    pub invalid_authorization_policies: Vec<String>,
    /// Why every connection to the pod is refused, if it is: another pod
    /// claims its IP, or its last update was refused. Its addresses stay
    /// captured.
    pub quarantine: Option<String>,
    /// Whether plaintext inbound is refused.
    pub mtls_strict: bool,
    /// The MtlsPolicy that set the mode, empty for the default.
    pub mtls_policy: Arc<str>,
    /// The ports the kubelet probes: the node's own connections to them
    /// pass the pod's capture.
    pub probe_ports: std::collections::BTreeSet<u16>,
}

impl LocalDetails {
    /// `details`, or the one empty set every remote workload shares if
    /// they are empty.
    pub fn shared(details: LocalDetails) -> Arc<LocalDetails> {
        static EMPTY: std::sync::LazyLock<Arc<LocalDetails>> =
            std::sync::LazyLock::new(|| Arc::new(LocalDetails::default()));
        if details == LocalDetails::default() {
            EMPTY.clone()
        } else {
            Arc::new(details)
        }
    }
}

/// A Kubernetes Service with its endpoints. Laid out for size like
/// [`Workload`]: a node holds every Service of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `<namespace>/<name>`; the same string as the view's key.
    pub key: Arc<str>,
    /// Its cluster IPs.
    pub vips: Addresses,
    /// Its ports (shared with every Service that has the same).
    pub ports: Arc<ServicePorts>,
    /// Its endpoints.
    pub endpoints: Box<[Endpoint]>,
    /// The TrafficPolicy that configures it, if any (few Services have
    /// one: it is held apart, and shared with the connections it governs).
    pub traffic: Option<Arc<TrafficPolicy>>,
}

/// A Service's ports, held once per process for each distinct list (see
/// [`ServicePorts::shared`]): most Services have one port, named and
/// numbered like many others'.
#[derive(Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ServicePorts(Box<[ServicePort]>);

static SERVICE_PORTS: names::Shared<ServicePorts> = LazyLock::new(names::new_set);

impl ServicePorts {
    /// `ports`, shared with every other holder of the same list.
    pub fn shared(ports: Vec<ServicePort>) -> Arc<ServicePorts> {
        let ports = ServicePorts(ports.into_boxed_slice());
        names::share_owned(&SERVICE_PORTS, ports)
    }
}

impl std::ops::Deref for ServicePorts {
    type Target = [ServicePort];
    fn deref(&self) -> &[ServicePort] {
        &self.0
    }
}

/// A port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePort {
    /// The port's name (may be empty for a single unnamed port); shared,
    /// most are called alike.
    pub name: Arc<str>,
    /// The port on the cluster IPs.
    pub port: u16,
    /// The port on the endpoints; 0 when it is a name no endpoint resolves.
    pub target_port: u16,
}

/// One endpoint of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The workload behind the endpoint, if it names a pod (its key in the
    /// view, when it is there).
    pub workload_uid: Option<PodUid>,
    /// The endpoint's address.
    pub ip: IpAddr,
    /// Whether the endpoint is ready for traffic.
    pub ready: bool,
    /// Target ports by service port name, as resolved by the EndpointSlice;
    /// shared by the endpoints of a Service that resolve them alike.
    pub ports: Arc<TargetPorts>,
}

/// An endpoint's target ports by the name of the Service port they serve,
/// sorted by name: a few entries in one small allocation (a map would
/// take a node of eleven for each). Held once per process for each
/// distinct set (see [`TargetPorts::shared`]): most Services' endpoints
/// resolve their ports alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TargetPorts(Box<[(Arc<str>, u16)]>);

static TARGET_PORTS: names::Shared<TargetPorts> = LazyLock::new(names::new_set);

impl TargetPorts {
    /// `ports`, shared with every other holder of the same set.
    pub fn shared(ports: TargetPorts) -> Arc<TargetPorts> {
        names::share_owned(&TARGET_PORTS, ports)
    }

    /// The target port of the Service port named `name`.
    pub fn get(&self, name: &str) -> Option<u16> {
        self.0
            .binary_search_by(|(held, _)| (**held).cmp(name))
            .ok()
            .map(|at| self.0[at].1)
    }

    /// Every (name, target port), by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u16)> {
        self.0.iter().map(|(name, port)| (&**name, *port))
    }
}

impl FromIterator<(String, u16)> for TargetPorts {
    /// The last port given for a name stands, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, u16)>>(ports: I) -> Self {
        let by_name: BTreeMap<String, u16> = ports.into_iter().collect();
        TargetPorts(
            by_name
                .into_iter()
                .map(|(name, port)| (names::shared(&name), port))
                .collect(),
        )
    }
}

impl Serialize for TargetPorts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// A pod's addresses: nearly always one, held inline then, so that most
/// pods need no allocation for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addresses {
    /// Exactly one.
    One(IpAddr),
    /// None, or more than one (dual-stack).
    Many(Box<[IpAddr]>),
}

impl std::ops::Deref for Addresses {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        match self {
            Addresses::One(ip) => std::slice::from_ref(ip),
            Addresses::Many(ips) => ips,
        }
    }
}

impl FromIterator<IpAddr> for Addresses {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(ips: I) -> Self {
        let ips: Vec<IpAddr> = ips.into_iter().collect();
        match ips[..] {
            [one] => Addresses::One(one),
            _ => Addresses::Many(ips.into_boxed_slice()),
        }
    }
}

impl Serialize for Addresses {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl Workload {
    /// A workload; what it shares with other pods is looked up in (or
    /// added to) the process-wide sets, so equal values are held once.
    pub fn new(
        uid: PodUid,
        ips: Addresses,
        node: &str,
        identity: Identity,
        workload_name: &str,
        meshed: bool,
        local: LocalDetails,
    ) -> Workload {
        let node = NodeName(names::shared(node));
        let profile = Profile {
            identity,
            workload_name: names::shared(workload_name),
            meshed,
            local: LocalDetails::shared(local),
        };
        Workload {
            uid,
            ips,
            node: names::share_owned(&NODES, node),
            profile: names::share_owned(&PROFILES, profile),
        }
    }

    /// The pod's name: its uid after the namespace (the control plane
    /// sends no other, see `convert::workload`).
    pub fn name(&self) -> String {
        self.uid.name()
    }

    /// Whether the pod is named `name`.
    pub fn is_named(&self, name: &str) -> bool {
        self.uid.name_is(name)
    }

    /// The pod's namespace: its identity's (the control plane sends
    /// nothing else, see `convert::workload`).
    pub fn namespace(&self) -> &str {
        self.identity().namespace()
    }

    /// The pod's ServiceAccount: its identity's.
    pub fn service_account(&self) -> &str {
        self.identity().service_account()
    }

    /// The SPIFFE identity of the pod's ServiceAccount.
    pub fn identity(&self) -> &Identity {
        &self.profile.identity
    }

    /// The workload (Deployment, StatefulSet, ...) the pod belongs to: the
    /// name metrics use, stable across rollouts.
    pub fn workload_name(&self) -> &str {
        &self.profile.workload_name
    }

    /// The node the pod runs on.
    pub fn node(&self) -> &str {
        &self.node.0
    }

    /// Whether weft captures and tunnels this pod's traffic.
    pub fn meshed(&self) -> bool {
        self.profile.meshed
    }

    /// How the pod is selected and protected: sent for local workloads
    /// only (remote ones share one empty set).
    pub fn local(&self) -> &LocalDetails {
        &self.profile.local
    }

    /// This workload with other local details (the rest is shared as it
    /// is).
    pub fn with_local(&self, local: LocalDetails) -> Workload {
        let profile = Profile {
            local: LocalDetails::shared(local),
            ..(*self.profile).clone()
        };
        Workload {
            profile: names::share_owned(&PROFILES, profile),
            ..self.clone()
        }
    }

    /// This workload refusing every connection, for `why`.
    pub(super) fn quarantined(&self, why: String) -> Workload {
        self.with_local(LocalDetails {
            quarantine: Some(why),
            ..self.local().clone()
        })
    }
}

/// The config dump shows a workload's fields as if they were its own.
impl Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Dump<'a> {
            uid: &'a PodUid,
            workload_name: &'a str,
            #[serde(serialize_with = "display")]
            identity: &'a Identity,
            node: &'a str,
            ips: &'a Addresses,
            meshed: bool,
            #[serde(flatten)]
            local: &'a LocalDetails,
        }
        Dump {
            uid: &self.uid,
            workload_name: self.workload_name(),
            identity: self.identity(),
            node: self.node(),
            ips: &self.ips,
            meshed: self.meshed(),
            local: self.local(),
        }
        .serialize(serializer)
    }
}

/// The config dump shows a Service's namespace and name, as the wire has
/// them.
impl Serialize for Service {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut fields = serializer.serialize_struct("Service", 6)?;
        fields.serialize_field("namespace", self.namespace())?;
        fields.serialize_field("name", self.name())?;
        fields.serialize_field("vips", &self.vips)?;
        fields.serialize_field("ports", &self.ports)?;
        fields.serialize_field("endpoints", &self.endpoints)?;
        fields.serialize_field("traffic", &self.traffic)?;
        fields.end()
    }
}

impl Service {
    /// The Service's namespace (the part of its key before the `/`).
    pub fn namespace(&self) -> &str {
        key_parts(&self.key).0
    }

    /// The Service's name (the part of its key after the `/`).
    pub fn name(&self) -> &str {
        key_parts(&self.key).1
    }
}

/// A `<namespace>/<name>` key's two parts; a key without a `/` is all
/// name.
pub(super) fn key_parts(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

impl HasKey for Workload {
    type Key = PodUid;
    fn key(&self) -> &PodUid {
        &self.uid
    }
}

impl HasKey for Service {
    type Key = Arc<str>;
    fn key(&self) -> &Arc<str> {
        &self.key
    }
}
