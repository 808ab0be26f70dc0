//! Where a captured connection goes: the applied config indexed by address,
//! and the choice of a Service endpoint.
//!
//! A [`RouteTable`] is rebuilt once per applied config version (not per
//! connection), so the per-connection work is two hash lookups and, for a
//! Service, one round-robin step.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use weft_api::authorization::{self, Connection, Decision};
use weft_api::v1;

use crate::node_view::{NodeView, Service, Workload};

/// The applied config, indexed for the data path.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The config version this table was built from (0: none yet).
    pub version: u64,
    /// The mesh roots of that version: peers are verified against these,
    /// not the (possibly older) roots a certificate was issued with.
    pub trust: Option<weft_certs::TrustBundle>,
    /// The node's own workloads by IP.
    local: HashMap<IpAddr, Arc<Workload>>,
    /// Every other known workload by IP.
    remote: HashMap<IpAddr, Arc<Workload>>,
    /// Services by cluster IP, with a round-robin cursor each.
    services: HashMap<IpAddr, Arc<ServiceRoute>>,
    /// Workloads by uid, to follow an endpoint to its pod.
    by_uid: HashMap<String, Arc<Workload>>,
    /// AuthorizationPolicies by `<namespace>/<name>`.
    authorization_policies: std::collections::BTreeMap<String, Arc<v1::AuthorizationPolicy>>,
}

/// A Service with its round-robin position.
#[derive(Debug)]
struct ServiceRoute {
    service: Arc<Service>,
    next: AtomicUsize,
}

/// The decision for one connection.
#[derive(Clone, Debug)]
pub struct Route {
    /// The address to connect to (an endpoint for a Service).
    pub target: SocketAddr,
    /// The pod behind `target`, if known.
    pub workload: Option<Arc<Workload>>,
    /// The Service the client addressed, if any, as Istio names it in
    /// metrics: `<name>.<namespace>.svc.cluster.local`.
    pub service: Option<String>,
    /// Whether the target pod runs on this node.
    pub local: bool,
}

/// Why a connection has nowhere to go.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// The Service has no such port.
    #[error("service {service} has no port {port}")]
    NoServicePort {
        /// The Service.
        service: String,
        /// The port asked for.
        port: u16,
    },
    /// The Service has no ready endpoint.
    #[error("service {service} has no ready endpoint")]
    NoReadyEndpoint {
        /// The Service.
        service: String,
    },
}

impl RouteTable {
    /// Indexes `view`.
    pub fn new(view: &NodeView) -> RouteTable {
        let index = |workloads: &std::collections::BTreeMap<String, Arc<Workload>>| {
            workloads
                .values()
                .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone())))
                .collect::<HashMap<_, _>>()
        };
        let services = view
            .services()
            .values()
            .flat_map(|service| {
                let route = Arc::new(ServiceRoute {
                    service: service.clone(),
                    next: AtomicUsize::new(0),
                });
                service.vips.iter().map(move |vip| (*vip, route.clone()))
            })
            .collect();
        let by_uid = view
            .local_workloads()
            .iter()
            .chain(view.remote_workloads())
            .map(|(uid, w)| (uid.clone(), w.clone()))
            .collect();
        RouteTable {
            version: view.version(),
            trust: Some(view.trust().bundle.clone()),
            local: index(view.local_workloads()),
            remote: index(view.remote_workloads()),
            services,
            by_uid,
            authorization_policies: view.authorization_policies().clone(),
        }
    }

    /// Decides a new connection to the local `workload` against the
    /// AuthorizationPolicies that apply to it.
    pub fn authorize(&self, workload: &Workload, connection: &Connection<'_>) -> Decision {
        let policies = workload
            .authorization_policies
            .iter()
            .filter_map(|key| self.authorization_policies.get(key))
            .map(|policy| &**policy);
        authorization::evaluate(policies, connection)
    }

    /// The local workload with this IP.
    pub fn local_workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.local.get(&ip)
    }

    /// The IPs of this node's meshed pods: what the capture rules steer.
    pub fn meshed_local_ips(&self) -> std::collections::BTreeSet<IpAddr> {
        self.local
            .iter()
            .filter(|(_, w)| w.meshed)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Any known workload (local or remote) with this IP.
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.local.get(&ip).or_else(|| self.remote.get(&ip))
    }

    /// Where a connection to `destination` goes: a Service's cluster IP
    /// resolves to one of its ready endpoints (round robin), any other
    /// address to itself.
    pub fn route(&self, destination: SocketAddr) -> Result<Route, NoRoute> {
        let Some(route) = self.services.get(&destination.ip()) else {
            return Ok(self.direct(destination, None));
        };
        let service = &route.service;
        let name = format!("{}/{}", service.namespace, service.name);
        let port = service
            .ports
            .iter()
            .find(|p| p.port == destination.port())
            .ok_or_else(|| NoRoute::NoServicePort {
                service: name.clone(),
                port: destination.port(),
            })?;
        let ready: Vec<_> = service.endpoints.iter().filter(|e| e.ready).collect();
        if ready.is_empty() {
            return Err(NoRoute::NoReadyEndpoint { service: name });
        }
        let endpoint = ready[route.next.fetch_add(1, Ordering::Relaxed) % ready.len()];
        let target_port = endpoint
            .ports
            .get(&port.name)
            .copied()
            .filter(|p| *p != 0)
            .unwrap_or(if port.target_port != 0 {
                port.target_port
            } else {
                port.port
            });
        let fqdn = format!("{}.{}.svc.cluster.local", service.name, service.namespace);
        let mut chosen = self.direct(SocketAddr::new(endpoint.ip, target_port), Some(fqdn));
        if chosen.workload.is_none() {
            chosen.workload = endpoint
                .workload_uid
                .as_ref()
                .and_then(|uid| self.by_uid.get(uid))
                .cloned();
        }
        Ok(chosen)
    }

    fn direct(&self, target: SocketAddr, service: Option<String>) -> Route {
        match self.local.get(&target.ip()) {
            Some(workload) => Route {
                target,
                workload: Some(workload.clone()),
                service,
                local: true,
            },
            None => Route {
                target,
                workload: self.remote.get(&target.ip()).cloned(),
                service,
                local: false,
            },
        }
    }
}
