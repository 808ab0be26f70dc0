//! Where a captured connection goes: the applied config indexed by address,
//! and the choice of a Service endpoint.
//!
//! A [`RouteTable`] is made once per applied config version (not per
//! connection), from the table before and what differs between the two
//! views, so a delta costs its own size, not the cluster's, and on the
//! control thread before the view is published (see [`super::Routes`]). The
//! per-connection work is two lookups and, for a Service, one
//! load-balancing step (see [`super::balancer`], whose state outlives the
//! table).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use weft_api::authorization::{self, Connection, Decision};

use super::addresses::AddressBook;
use super::balancer::{Admission, Balancer, Balancers, EndpointLease};
use crate::node_view::{
    Change, Keyed, LocalDetails, NodeView, PodUid, Policies, Service, ServicePort, TrafficPolicy,
    Workload,
};

/// The applied config, indexed for the data path.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The [generation](NodeView::generation) of the config this table was
    /// built from (0: none yet).
    pub generation: u64,
    /// The mesh roots of that version: peers are verified against these,
    /// not the (possibly older) roots a certificate was issued with.
    pub trust: Option<weft_certs::TrustBundle>,
    /// Whether the mesh is being uninstalled (see
    /// [`NodeView::uninstalling`]).
    pub uninstalling: bool,
    /// Whether the config was restored from the node's kept state (see
    /// [`NodeView::restored`]).
    pub restored: bool,
    /// The namespaces whose new pods are meshed (see
    /// [`NodeView::namespace_meshed`]); `None` while the config has not said.
    pub meshed_namespaces: Option<std::collections::BTreeSet<String>>,
    /// The view's maps this table indexes (shared with the view): the next
    /// table is this one plus their differences.
    view: ViewMaps,
    /// The node's own workloads by IP.
    local: AddressBook<Workload>,
    /// Every other known workload by IP.
    remote: AddressBook<Workload>,
    /// Services by cluster IP (by key, for splits, they are the view's).
    services: AddressBook<Service>,
    /// The Services' balancing state, shared with the tables of earlier
    /// and later versions.
    balancers: Arc<Balancers>,
}

/// The maps of the view a table was built from.
#[derive(Debug, Default)]
struct ViewMaps {
    local_workloads: Keyed<Workload>,
    remote_workloads: Keyed<Workload>,
    services: Keyed<Service>,
    authorization_policies: Policies,
}

/// Where a new connection is headed: straight to an address, or to a
/// Service, whose endpoint is still to be picked.
#[derive(Debug)]
pub enum Destination {
    /// Not a Service: to the address itself.
    Direct(Route),
    /// A Service (after any split): pick endpoints with
    /// [`RouteTable::next_endpoint`].
    Service(ServiceConnection),
}

/// A connection to a Service, on its way to an endpoint. Holds its place
/// against the addressed Service's `max_connections` until dropped.
#[derive(Debug)]
pub struct ServiceConnection {
    /// The addressed Service, `<namespace>/<name>`.
    pub addressed: String,
    /// The addressed Service's TrafficPolicy; it applies wherever a split
    /// sends the connection.
    pub policy: Option<Arc<TrafficPolicy>>,
    target: Arc<Service>,
    /// The target's ready endpoints' addresses, in the view's order (made
    /// per connection: a node knows every Service, its pods use few).
    ready: Vec<IpAddr>,
    /// The target's balancing state.
    balancer: Arc<Balancer>,
    port: ServicePort,
    tried: Vec<IpAddr>,
    _admission: Admission,
}

impl ServiceConnection {
    /// The Service the connection goes to (the split's choice, else the
    /// addressed one), `<namespace>/<name>`.
    pub fn target(&self) -> &str {
        &self.target.key
    }

    /// The target's ready endpoints.
    pub fn endpoints(&self) -> &[IpAddr] {
        &self.ready
    }
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
    /// The Service's TrafficPolicy limits this proxy's open connections,
    /// and that many are open.
    #[error("service {service} has its maximum of {max} connections open")]
    MaxConnections {
        /// The Service.
        service: String,
        /// The limit.
        max: u32,
    },
}

impl RouteTable {
    /// Indexes `view`, with fresh balancing state.
    pub fn new(view: &NodeView) -> RouteTable {
        RouteTable::default().next(view, &Arc::default())
    }

    /// The table of `view`, made from this one (the table of an earlier
    /// view, or the empty default) by applying what differs between the
    /// two views, so that it costs what changed, not the size of the
    /// cluster. The balancing state in `balancers` (shared with the tables
    /// of earlier and later versions) is kept for the Services and
    /// endpoints still there.
    pub fn next(&self, view: &NodeView, balancers: &Arc<Balancers>) -> RouteTable {
        let local = follow_workloads(
            &self.local,
            (&self.view.local_workloads, view.local_workloads()),
            quarantine_all,
        );
        let remote = follow_workloads(
            &self.remote,
            (&self.view.remote_workloads, view.remote_workloads()),
            trust_none,
        );
        let mut services = self.services.changes(
            first_by_key,
            expected_addresses(&self.view.services, view.services()),
        );
        for change in self.view.services.diff(view.services()) {
            let (key, before, after) = sides(change);
            let Some(service) = after else {
                balancers.forget(key);
                services.change(before.map(cluster_ips), None);
                continue;
            };
            let ready = service.endpoints.iter().filter(|e| e.ready).map(|e| e.ip);
            balancers.keep_endpoints(key, ready);
            services.change(before.map(cluster_ips), Some(cluster_ips(service)));
        }
        let services = services.finish();
        RouteTable {
            generation: view.generation(),
            trust: Some(view.trust().bundle.clone()),
            uninstalling: view.uninstalling(),
            restored: view.restored(),
            meshed_namespaces: view.meshed_namespaces().cloned(),
            view: ViewMaps {
                local_workloads: view.local_workloads().clone(),
                remote_workloads: view.remote_workloads().clone(),
                services: view.services().clone(),
                authorization_policies: view.authorization_policies().clone(),
            },
            local,
            remote,
            services,
            balancers: balancers.clone(),
        }
    }

    /// Decides a connection to the local `workload`: its mTLS mode and the
    /// AuthorizationPolicies that apply to it (the gate, [`super::gate`],
    /// is the one caller on the data path).
    pub fn authorize(&self, workload: &Workload, connection: &Connection<'_>) -> Decision {
        let destination = authorization::Destination {
            mtls_strict: workload.local().mtls_strict,
            mtls_policy: &workload.local().mtls_policy,
            policies: &workload.local().authorization_policies,
            invalid_policies: &workload.local().invalid_authorization_policies,
            quarantine: workload.local().quarantine.as_deref(),
        };
        authorization::decide(
            &destination,
            |key| self.view.authorization_policies.get(key).map(|p| &**p),
            connection,
        )
    }

    /// The local workload with this IP.
    pub fn local_workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.local.get(&ip)
    }

    /// The workload of pod `namespace/name`, wherever it runs, with or
    /// without addresses yet.
    pub fn workload_named(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        let uid = format!("{namespace}/{name}");
        (self.view.local_workloads.get(&uid)).or_else(|| self.view.remote_workloads.get(&uid))
    }

    /// The workload with this uid, local or remote.
    fn workload_by_uid(&self, uid: &PodUid) -> Option<&Arc<Workload>> {
        let (_, workload) = (self.view.local_workloads.get_by_key(uid))
            .or_else(|| self.view.remote_workloads.get_by_key(uid))?;
        Some(workload)
    }

    /// The IPs of this node's meshed pods: what the capture rules steer.
    pub fn meshed_local_ips(&self) -> std::collections::BTreeSet<IpAddr> {
        self.local
            .iter()
            .filter(|(_, w)| w.meshed())
            .map(|(ip, _)| ip)
            .collect()
    }

    /// Any known workload (local or remote) with this IP.
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.local.get(&ip).or_else(|| self.remote.get(&ip))
    }

    /// Whether a connection to `destination` may need a tunnel (and so the
    /// source's certificate): a meshed pod on another node, or a Service.
    /// Cheaper than [`RouteTable::resolve`], and without its admission.
    pub fn may_tunnel(&self, destination: SocketAddr) -> bool {
        self.services.get(&destination.ip()).is_some()
            || self
                .remote
                .get(&destination.ip())
                .is_some_and(|workload| workload.meshed())
    }

    /// Where a connection to `destination` goes: a Service's cluster IP
    /// resolves to a [`ServiceConnection`] (after its TrafficPolicy's
    /// connection limit and split), any other address to itself.
    pub fn resolve(&self, destination: SocketAddr) -> Result<Destination, NoRoute> {
        let Some(route) = self.services.get(&destination.ip()) else {
            return Ok(Destination::Direct(self.direct(destination, None)));
        };
        let port = route
            .ports
            .iter()
            .find(|p| p.port == destination.port())
            .ok_or_else(|| NoRoute::NoServicePort {
                service: route.key.to_string(),
                port: destination.port(),
            })?;
        let policy = route.traffic.clone();
        let max = policy.as_ref().and_then(|p| p.max_connections);
        let balancer = self.balancers.get(&route.key);
        let admission = balancer.admit(max).ok_or_else(|| NoRoute::MaxConnections {
            service: route.key.to_string(),
            max: max.unwrap_or(0),
        })?;
        let (target, port) = match policy.as_ref().filter(|p| !p.split.is_empty()) {
            None => (route.clone(), port.clone()),
            Some(policy) => self.split(route, &balancer, port, policy)?,
        };
        let balancer = if Arc::ptr_eq(&target, route) {
            balancer
        } else {
            self.balancers.get(&target.key)
        };
        let ready = ready_endpoints(&target);
        if ready.is_empty() {
            return Err(NoRoute::NoReadyEndpoint {
                service: target.key.to_string(),
            });
        }
        Ok(Destination::Service(ServiceConnection {
            addressed: route.key.to_string(),
            policy,
            target,
            ready,
            balancer,
            port,
            tried: Vec::new(),
            _admission: admission,
        }))
    }

    /// The split target for a new connection to `route`'s `port`. A target
    /// that is not in the view, has no ready endpoint or no port of the same
    /// number (or else name) gets none.
    fn split(
        &self,
        route: &Arc<Service>,
        balancer: &Balancer,
        port: &ServicePort,
        policy: &TrafficPolicy,
    ) -> Result<(Arc<Service>, ServicePort), NoRoute> {
        let targets: Vec<_> = policy
            .split
            .iter()
            .map(|(key, weight)| {
                let usable = self.view.services.get(key.as_str()).and_then(|target| {
                    let ports = &target.ports;
                    let port = ports
                        .iter()
                        .find(|p| p.port == port.port)
                        .or_else(|| ports.iter().find(|p| p.name == port.name))?;
                    let ready = target.endpoints.iter().any(|e| e.ready);
                    ready.then(|| (target.clone(), port.clone()))
                });
                let weight = if usable.is_some() { *weight } else { 0 };
                (key.as_str(), weight, usable)
            })
            .collect();
        let weights: Vec<(&str, u32)> = targets.iter().map(|(k, w, _)| (*k, *w)).collect();
        balancer
            .split(&weights)
            .and_then(|index| targets[index].2.clone())
            .ok_or_else(|| NoRoute::NoReadyEndpoint {
                service: route.key.to_string(),
            })
    }

    /// Picks the next endpoint for `connection`, one it has not tried yet,
    /// and counts a connection on it until the lease is dropped. `None`
    /// when every ready endpoint has been tried.
    pub fn next_endpoint(
        &self,
        connection: &mut ServiceConnection,
        now: Instant,
    ) -> Option<(Route, EndpointLease)> {
        let target = &connection.target;
        let mode = connection
            .policy
            .as_ref()
            .map(|p| p.mode)
            .unwrap_or_default();
        let lease = connection.balancer.pick(
            mode,
            &connection.ready,
            &connection.tried,
            now,
            &mut rand::rng(),
        )?;
        connection.tried.push(lease.ip());
        let endpoint = target.endpoints.iter().find(|e| e.ip == lease.ip())?;
        let port = &connection.port;
        let target_port = endpoint
            .ports
            .get(&port.name)
            .filter(|p| *p != 0)
            .unwrap_or(if port.target_port != 0 {
                port.target_port
            } else {
                port.port
            });
        let mut chosen = self.direct(
            SocketAddr::new(endpoint.ip, target_port),
            Some(hostname(target)),
        );
        if chosen.workload.is_none() {
            chosen.workload = endpoint
                .workload_uid
                .as_ref()
                .and_then(|uid| self.workload_by_uid(uid))
                .cloned();
        }
        Some((chosen, lease))
    }

    /// `host` (`<name>.<namespace>.svc.<domain>`, as a peer's `forwarded`
    /// header names the Service its client addressed) in the form metrics
    /// use, if that Service exists and has `target` (an address and port)
    /// behind it; `None` for any other claim.
    pub fn service_with_endpoint(&self, host: &str, target: SocketAddr) -> Option<String> {
        let mut labels = host.split('.');
        let (name, namespace) = (labels.next()?, labels.next()?);
        if labels.next() != Some("svc") {
            return None;
        }
        let service = self
            .view
            .services
            .get(format!("{namespace}/{name}").as_str())?;
        let port = target.port();
        let serves_port = |endpoint: &crate::node_view::Endpoint| {
            endpoint.ports.iter().any(|(_, p)| p == port)
                || service
                    .ports
                    .iter()
                    .any(|p| p.target_port == port || (p.target_port == 0 && p.port == port))
        };
        service
            .endpoints
            .iter()
            .any(|endpoint| endpoint.ip == target.ip() && serves_port(endpoint))
            .then(|| hostname(service))
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

/// A Service as Istio names it in metrics: `<name>.<namespace>.svc.cluster.local`.
fn hostname(service: &Service) -> String {
    format!(
        "{}.{}.svc.cluster.local",
        service.name(),
        service.namespace()
    )
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;

/// The key of a changed entry, its value before (if any) and after (if any).
fn sides<'a, K, T>(
    change: Change<'a, K, Arc<T>>,
) -> (&'a K, Option<&'a Arc<T>>, Option<&'a Arc<T>>) {
    match change {
        Change::Added(key, new) => (key, None, Some(new)),
        Change::Updated { key, old, new } => (key, Some(old), Some(new)),
        Change::Removed(key, old) => (key, Some(old), None),
    }
}

/// `book`, the addresses of the workloads in `before`, moved along to those
/// of `after`.
fn follow_workloads(
    book: &AddressBook<Workload>,
    (before, after): (&Keyed<Workload>, &Keyed<Workload>),
    settle: super::addresses::Settle<Workload>,
) -> AddressBook<Workload> {
    let mut changes = book.changes(settle, expected_addresses(before, after));
    for change in before.diff(after) {
        let (_, old, new) = sides(change);
        changes.change(old.map(addresses), new.map(addresses));
    }
    changes.finish()
}

/// How many addresses the move from the `before` map to `after` is likely
/// to touch: one per entry from an empty map (a first full state), else
/// few (a delta).
fn expected_addresses<T: crate::node_view::HasKey + PartialEq>(
    before: &Keyed<T>,
    after: &Keyed<T>,
) -> usize {
    if before.is_empty() { after.len() } else { 0 }
}

/// A workload's addresses, with it.
fn addresses(workload: &Arc<Workload>) -> (&[IpAddr], &Arc<Workload>) {
    (&workload.ips, workload)
}

/// The addresses of a Service's ready endpoints, in the view's order.
fn ready_endpoints(service: &Service) -> Vec<IpAddr> {
    service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| e.ip)
        .collect()
}

/// A Service's cluster IPs, with it.
fn cluster_ips(service: &Arc<Service>) -> (&[IpAddr], &Arc<Service>) {
    (&service.vips, service)
}

/// An address two local pods claim vouches for neither (the control plane
/// quarantines such pods; this holds if it did not): it stays captured,
/// and every connection to it is refused.
fn quarantine_all(ip: IpAddr, claims: &[Arc<Workload>]) -> Option<Arc<Workload>> {
    let first = claims.first()?;
    Some(Arc::new(first.with_local(LocalDetails {
        quarantine: Some(format!("IP {ip} is claimed by another pod too")),
        ..first.local().clone()
    })))
}

/// An address two remote pods claim vouches for neither: it is left out.
fn trust_none(_: IpAddr, _: &[Arc<Workload>]) -> Option<Arc<Workload>> {
    None
}

/// A cluster IP two Services claim goes to the first by key.
fn first_by_key(_: IpAddr, claims: &[Arc<Service>]) -> Option<Arc<Service>> {
    claims.first().cloned()
}
