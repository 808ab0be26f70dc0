//! `weft-control-plane explain`: what would happen to a connection, and
//! why. It derives the mesh from the same sources the control plane serves
//! from and decides with the same evaluation the destination proxy runs
//! ([`weft_api::authorization::decide`]: STRICT, policies refused as
//! invalid, DENY, ALLOW, AUDIT), so its answer is the proxy's answer on
//! every path: a tunnel from another node and a connection from a pod on
//! the destination's own node are decided alike, with the client's identity.

use std::fmt::Write as _;

use weft_api::authorization::{self, Connection};
use weft_api::v1 as pb;
use weft_certs::Identity;

use crate::Error;
use crate::cluster::ClusterState;
use crate::config::{ControlPlaneConfig, Source};
use crate::manifests::ManifestDir;
use crate::mesh::{Mesh, MeshWorkload};

/// The cluster as the configured source holds it right now (one read of
/// the manifests directory, or one list of the API server).
pub async fn load_cluster(config: &ControlPlaneConfig) -> Result<ClusterState, Error> {
    match config.source {
        Source::Manifests => {
            let dir = config.manifests.as_ref().ok_or_else(|| {
                Error::Config("explain needs --manifests or --source kubernetes".into())
            })?;
            let mut manifests = ManifestDir::new(dir);
            manifests.reload()?;
            Ok(manifests.state())
        }
        Source::Kubernetes => {
            let client = crate::kubernetes::connect().await?;
            let errors = prometheus_client::metrics::counter::Counter::default();
            let state = crate::kubernetes::watch_cluster(client, &config.namespace, errors).await;
            let cluster = ClusterState::clone(&state.borrow());
            Ok(cluster)
        }
    }
}

/// What to explain.
#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client: `<namespace>/<serviceaccount>` (its SPIFFE identity).
    #[arg(long)]
    pub from: String,
    /// The destination: `<namespace>/<service or pod>:<port>`, or a Service
    /// as `<name>.<namespace>[.svc.cluster.local]:<port>`.
    #[arg(long)]
    pub to: String,
    /// Explain a plaintext connection (a client outside the mesh) instead
    /// of a mutual-TLS one: no identity, and STRICT refuses it.
    #[arg(long)]
    pub plaintext: bool,
    /// The client's address, for rules on IP blocks (default 0.0.0.0,
    /// which only `0.0.0.0/0` matches).
    #[arg(long, default_value = "0.0.0.0")]
    pub from_ip: std::net::IpAddr,
}

/// The answer: a readable report, and whether every destination pod
/// would accept the connection.
pub struct Explanation {
    /// One line per destination pod, after a header.
    pub report: String,
    /// Whether all destination pods allow it.
    pub allowed: bool,
}

/// Explains `args` against `cluster`.
pub fn explain(
    cluster: &ClusterState,
    trust: pb::TrustBundle,
    mesh_namespace: &str,
    args: &ExplainArgs,
) -> Result<Explanation, String> {
    let trust_domain = trust.trust_domain.clone();
    let mesh = Mesh::derive(cluster, trust, mesh_namespace);
    explain_in(&mesh, &trust_domain, args)
}

/// Explains `args` against a derived `mesh` of `trust_domain` (the
/// dashboard's explain form asks the mesh the control plane serves).
pub fn explain_in(
    mesh: &Mesh,
    trust_domain: &str,
    args: &ExplainArgs,
) -> Result<Explanation, String> {
    let (namespace, service_account) = args.from.split_once('/').ok_or_else(|| {
        format!(
            "--from {:?}: expected <namespace>/<serviceaccount>",
            args.from
        )
    })?;
    let identity = Identity::new(trust_domain, namespace, service_account)
        .map_err(|e| format!("--from {:?}: {e}", args.from))?;
    let principal = identity.to_string();
    let (target, port) = args
        .to
        .rsplit_once(':')
        .and_then(|(target, port)| Some((target, port.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("--to {:?}: expected <target>:<port>", args.to))?;
    let destinations = destinations(mesh, target, port)?;
    // Compiled as the proxy compiles them when it applies its config.
    let compiled: std::collections::BTreeMap<&str, authorization::Policy> = mesh
        .authorization_policies
        .iter()
        .filter_map(|(key, wire)| Some((key.as_str(), authorization::Policy::compile(wire).ok()?)))
        .collect();

    let mut report = String::new();
    let source = if args.plaintext {
        format!("plaintext from {} (no identity)", args.from_ip)
    } else {
        format!("{principal} (mutual TLS)")
    };
    let _ = writeln!(report, "from {source} to {}", args.to);
    let mut allowed = true;
    for (workload, port) in &destinations {
        let pod = &workload.workload;
        let where_ = format!("  pod {} port {port}", pod.uid);
        if !pod.meshed {
            let _ = writeln!(
                report,
                "{where_}: allowed: the pod is not in the mesh, no policy applies"
            );
            continue;
        }
        let destination = authorization::Destination {
            mtls_strict: pod.mtls_mode == pb::MtlsMode::Strict as i32,
            mtls_policy: &pod.mtls_policy,
            policies: &pod.authorization_policies,
            invalid_policies: &pod.invalid_authorization_policies,
            quarantine: Some(pod.quarantine.as_str()).filter(|q| !q.is_empty()),
        };
        let decision = authorization::decide(
            &destination,
            |key| compiled.get(key),
            &Connection {
                source_principal: (!args.plaintext).then_some(principal.as_str()),
                source_ip: args.from_ip,
                destination_port: *port,
            },
        );
        allowed &= decision.allowed();
        let _ = writeln!(report, "{where_}: {decision}");
    }
    Ok(Explanation { report, allowed })
}

/// The pods `target` names, with the port each is reached on: a Service's
/// endpoints (its port resolved to the target port), or one pod.
fn destinations<'m>(
    mesh: &'m Mesh,
    target: &str,
    port: u16,
) -> Result<Vec<(&'m MeshWorkload, u16)>, String> {
    let service_key = match target.split_once('/') {
        Some(_) => target.to_owned(),
        None => {
            let mut parts = target.splitn(3, '.');
            match (parts.next(), parts.next()) {
                (Some(name), Some(namespace)) => format!("{namespace}/{name}"),
                _ => {
                    return Err(format!(
                        "--to {target:?}: expected <namespace>/<name> or <name>.<namespace>"
                    ));
                }
            }
        }
    };
    if let Some(service) = mesh.services.get(&service_key) {
        let service_port = service
            .ports
            .iter()
            .find(|p| p.port == u32::from(port))
            .ok_or_else(|| format!("Service {service_key} has no port {port}"))?;
        let mut found = Vec::new();
        for endpoint in service.endpoints.iter().filter(|e| e.ready) {
            let Some(workload) = mesh.workloads.get(&endpoint.workload_uid) else {
                continue;
            };
            let target_port = endpoint
                .ports
                .get(&service_port.name)
                .copied()
                .unwrap_or(service_port.target_port);
            found.push((
                workload.as_ref(),
                u16::try_from(target_port).unwrap_or(port),
            ));
        }
        if found.is_empty() {
            return Err(format!(
                "Service {service_key} has no ready endpoint that is a known pod"
            ));
        }
        return Ok(found);
    }
    match mesh.workloads.get(&service_key) {
        Some(workload) => Ok(vec![(workload.as_ref(), port)]),
        None => Err(format!("no Service or pod {service_key}")),
    }
}
