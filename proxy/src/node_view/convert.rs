//! Wire messages to typed values, refusing what does not parse. Every
//! refusal names the entry, the field and the value at fault.

use std::net::IpAddr;
use std::sync::Arc;

use weft_api::v1;
use weft_certs::{Identity, TrustBundle};

use weft_api::authorization::Policy;

use super::{
    Endpoint, EntryKind, LocalDetails, PodUid, Service, ServicePort, ServicePorts, TargetPorts,
    TrafficPolicy, Trust, UpdateProblem, Workload, names,
};

pub(super) fn trust(wire: &v1::TrustBundle) -> Result<Trust, UpdateProblem> {
    let invalid = |reason: String| UpdateProblem::InvalidTrust { reason };
    weft_certs::validate_trust_domain_name(&wire.trust_domain)
        .map_err(|e| invalid(e.to_string()))?;
    let bundle = TrustBundle::from_pem(&wire.roots_pem).map_err(|e| invalid(e.to_string()))?;
    Ok(Trust {
        trust_domain: wire.trust_domain.clone(),
        bundle,
    })
}

/// Converts a workload; for a local one, `local_node` is the proxy's node,
/// which the workload must run on (an empty `node` is taken as "this one").
pub(super) fn workload(
    kind: EntryKind,
    wire: &v1::Workload,
    local_node: Option<&str>,
) -> Result<(PodUid, Workload), UpdateProblem> {
    if wire.uid.is_empty() {
        return Err(UpdateProblem::EmptyKey {
            kind,
            reason: "uid is empty",
        });
    }
    let invalid = |reason: String| UpdateProblem::InvalidEntry {
        kind,
        key: wire.uid.clone(),
        reason,
    };
    let identity = Identity::parse_shared(names::shared(&wire.identity)).map_err(|e| {
        invalid(format!(
            "identity {:?}: {}",
            wire.identity,
            identity_problem(&e)
        ))
    })?;
    for (field, value, part) in [
        ("namespace", &wire.namespace, identity.namespace()),
        (
            "service account",
            &wire.service_account,
            identity.service_account(),
        ),
    ] {
        if !value.is_empty() && value != part {
            return Err(invalid(format!(
                "identity {identity} does not match its {field} {value:?}"
            )));
        }
    }
    if let Some(local_node) = local_node
        && !wire.node.is_empty()
        && wire.node != local_node
    {
        return Err(invalid(format!(
            "sent as local to node {local_node:?} but runs on node {:?}",
            wire.node
        )));
    }
    let ips = wire
        .ips
        .iter()
        .map(|ip| ip_addr(ip).map_err(|reason| invalid(format!("ip {ip:?}: {reason}"))))
        .collect::<Result<_, _>>()?;
    let probe_ports = wire
        .probe_ports
        .iter()
        .map(|port| {
            u16::try_from(*port)
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| invalid(format!("probe port {port}")))
        })
        .collect::<Result<_, _>>()?;
    // The name is read from the uid (a node holds every pod: each byte
    // counts 50,000 times), so the two must agree.
    if !wire.name.is_empty() && wire.uid != format!("{}/{}", identity.namespace(), wire.name) {
        return Err(invalid(format!(
            "uid is not <namespace>/<name> ({}/{})",
            identity.namespace(),
            wire.name
        )));
    }
    let uid = PodUid::new(&wire.uid);
    let (_, name) = super::entries::key_parts(&wire.uid);
    // An older control plane sends no workload name: the pod's will do.
    let workload_name = if wire.workload_name.is_empty() {
        name
    } else {
        &wire.workload_name
    };
    let local = LocalDetails {
        // Only a pod's own node tells it from another of its name (an
        // older control plane sends it for every pod).
        pod_uid: if local_node.is_some() {
            wire.pod_uid.as_str().into()
        } else {
            Box::default()
        },
        labels: wire
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        authorization_policies: wire.authorization_policies.clone(),
        invalid_authorization_policies: wire.invalid_authorization_policies.clone(),
        quarantine: Some(wire.quarantine.clone()).filter(|q| !q.is_empty()),
        mtls_strict: match v1::MtlsMode::try_from(wire.mtls_mode) {
            Ok(v1::MtlsMode::Permissive) => false,
            Ok(v1::MtlsMode::Strict) => true,
            Err(_) => {
                return Err(invalid(format!("unknown mtls_mode {}", wire.mtls_mode)));
            }
        },
        mtls_policy: names::shared(&wire.mtls_policy),
        probe_ports,
    };
    let workload = Workload::new(
        uid.clone(),
        ips,
        &wire.node,
        identity,
        workload_name,
        wire.meshed,
        local,
    );
    Ok((uid, workload))
}

impl Workload {
    /// The workload in the wire form it came in: what converting a workload takes
    /// back to the same value (the node keeps remote workloads this way,
    /// see [`crate::StoredConfig`]).
    pub fn to_wire(&self) -> v1::Workload {
        workload_to_wire(self)
    }
}

impl Service {
    /// The Service in the wire form it came in: what converting a Service takes
    /// back to the same value.
    pub fn to_wire(&self) -> v1::Service {
        service_to_wire(self)
    }
}

fn workload_to_wire(workload: &Workload) -> v1::Workload {
    let local = workload.local();
    let mtls_mode = if local.mtls_strict {
        v1::MtlsMode::Strict
    } else {
        v1::MtlsMode::Permissive
    };
    v1::Workload {
        uid: workload.uid.to_string(),
        namespace: workload.namespace().to_owned(),
        // The name is the uid's, as another node's pods are sent: written
        // out, it could only disagree with a uid that does not follow the
        // `<namespace>/<name>` rule and that was taken as sent.
        name: String::new(),
        pod_uid: local.pod_uid.to_string(),
        workload_name: workload.workload_name().to_owned(),
        service_account: workload.service_account().to_owned(),
        identity: workload.identity().to_string(),
        node: workload.node().to_owned(),
        ips: workload.ips.iter().map(ToString::to_string).collect(),
        meshed: workload.meshed(),
        labels: local
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        authorization_policies: local.authorization_policies.clone(),
        invalid_authorization_policies: local.invalid_authorization_policies.clone(),
        quarantine: local.quarantine.clone().unwrap_or_default(),
        mtls_mode: mtls_mode.into(),
        mtls_policy: local.mtls_policy.to_string(),
        probe_ports: local.probe_ports.iter().map(|p| u32::from(*p)).collect(),
    }
}

/// Compiles an AuthorizationPolicy: every principal pattern, address block
/// and port is parsed now, once, and one that does not parse refuses the
/// policy (never a rule that silently matches nothing).
pub(super) fn authorization_policy(
    wire: &v1::AuthorizationPolicy,
) -> Result<(Arc<str>, Policy), UpdateProblem> {
    let kind = EntryKind::AuthorizationPolicy;
    if wire.namespace.is_empty() || wire.name.is_empty() {
        return Err(UpdateProblem::EmptyKey {
            kind,
            reason: "namespace or name is empty",
        });
    }
    let key = format!("{}/{}", wire.namespace, wire.name);
    let policy = Policy::compile(wire).map_err(|error| UpdateProblem::InvalidEntry {
        kind,
        key: key.clone(),
        reason: error.to_string(),
    })?;
    Ok((key.into(), policy))
}

/// Converts a Service.
pub(super) fn service(wire: &v1::Service) -> Result<(Arc<str>, Service), UpdateProblem> {
    let kind = EntryKind::Service;
    let empty = |reason| Err(UpdateProblem::EmptyKey { kind, reason });
    if wire.namespace.is_empty() {
        return empty("namespace is empty");
    }
    if wire.name.is_empty() {
        return empty("name is empty");
    }
    let key = format!("{}/{}", wire.namespace, wire.name);
    let invalid = |reason: String| UpdateProblem::InvalidEntry {
        kind,
        key: key.clone(),
        reason,
    };
    // The Service's namespace and name are read back from its key (a node
    // holds every Service: one string, not three), so the key must split
    // where it was joined. Kubernetes names never hold a '/'.
    if wire.namespace.contains('/') || wire.name.contains('/') {
        return Err(invalid(format!(
            "namespace {:?} or name {:?} contains '/'",
            wire.namespace, wire.name
        )));
    }
    let vips = wire
        .vips
        .iter()
        .map(|ip| ip_addr(ip).map_err(|reason| invalid(format!("vip {ip:?}: {reason}"))))
        .collect::<Result<_, _>>()?;
    let ports = wire
        .ports
        .iter()
        .map(|p| {
            let port = port_number(p.port)
                .filter(|&n| n != 0)
                .ok_or_else(|| invalid(format!("port {:?}: {} is not a port", p.name, p.port)))?;
            let target_port = port_number(p.target_port).ok_or_else(|| {
                invalid(format!(
                    "port {:?}: target port {} is not a port",
                    p.name, p.target_port
                ))
            })?;
            Ok(ServicePort {
                name: names::shared(&p.name),
                port,
                target_port,
            })
        })
        .collect::<Result<Vec<_>, UpdateProblem>>()?;
    let ports = ServicePorts::shared(ports);
    let endpoints = wire
        .endpoints
        .iter()
        .map(|e| endpoint(e).map_err(|reason| invalid(format!("endpoint {:?}: {reason}", e.ip))))
        .collect::<Result<_, _>>()?;
    let traffic = wire
        .traffic_policy
        .as_ref()
        .map(|t| {
            TrafficPolicy::from_wire(&wire.namespace, t)
                .map(Arc::new)
                .map_err(|e| invalid(e.to_string()))
        })
        .transpose()?;
    let key: Arc<str> = key.into();
    let service = Service {
        key: key.clone(),
        vips,
        ports,
        endpoints,
        traffic,
    };
    Ok((key, service))
}

fn service_to_wire(service: &Service) -> v1::Service {
    v1::Service {
        namespace: service.namespace().to_owned(),
        name: service.name().to_owned(),
        vips: service.vips.iter().map(ToString::to_string).collect(),
        ports: service
            .ports
            .iter()
            .map(|p| v1::ServicePort {
                name: p.name.to_string(),
                port: u32::from(p.port),
                target_port: u32::from(p.target_port),
            })
            .collect(),
        endpoints: service
            .endpoints
            .iter()
            .map(|e| v1::Endpoint {
                ip: e.ip.to_string(),
                workload_uid: e
                    .workload_uid
                    .as_ref()
                    .map(PodUid::to_string)
                    .unwrap_or_default(),
                ready: e.ready,
                ports: e
                    .ports
                    .iter()
                    .map(|(name, port)| (name.to_owned(), u32::from(port)))
                    .collect(),
            })
            .collect(),
        traffic_policy: service.traffic.as_deref().map(TrafficPolicy::to_wire),
    }
}

fn endpoint(wire: &v1::Endpoint) -> Result<Endpoint, String> {
    let ip = ip_addr(&wire.ip)?;
    let ports = wire
        .ports
        .iter()
        .map(|(name, &port)| {
            port_number(port)
                .map(|p| (name.clone(), p))
                .ok_or_else(|| format!("port {name:?}: {port} is not a port"))
        })
        .collect::<Result<TargetPorts, _>>()?;
    let ports = TargetPorts::shared(ports);
    let workload_uid = match wire.workload_uid.as_str() {
        "" => None,
        uid => Some(PodUid::new(uid)),
    };
    Ok(Endpoint {
        workload_uid,
        ip,
        ready: wire.ready,
        ports,
    })
}

fn ip_addr(text: &str) -> Result<IpAddr, String> {
    text.parse::<IpAddr>().map_err(|e| e.to_string())
}

fn port_number(value: u32) -> Option<u16> {
    u16::try_from(value).ok()
}

/// The problem with a SPIFFE ID without repeating the input, which the
/// caller already quotes.
fn identity_problem(error: &weft_certs::Error) -> String {
    match error {
        weft_certs::Error::InvalidIdentity { problem, .. } => problem.to_string(),
        other => other.to_string(),
    }
}
