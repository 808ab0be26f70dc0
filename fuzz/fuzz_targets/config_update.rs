//! Arbitrary bytes as a protobuf `ConfigUpdate` from the control plane into
//! the proxy's `NodeView::apply`: first as they come, then replayed as a
//! delta on top of what was applied. Nothing may panic; a refused update
//! must not be half-applied; an applied one holds exactly its version, and
//! every refused entry is named. The route table brought from the first
//! view to the second by change resolves every address of either like one
//! built afresh. What the node keeps of the view on disk reads back as the
//! same entries. The update's AuthorizationPolicies and TrafficPolicies
//! also go through the compilers the control plane runs before it sends
//! them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_api::v1::ConfigUpdate;
use weft_proxy::dataplane::balancer::Balancers;
use weft_proxy::dataplane::routes::{Destination, RouteTable};
use weft_proxy::{Applied, NodeView};

fuzz_target!(|data: &[u8]| {
    let Ok(update) = ConfigUpdate::decode(data) else {
        return;
    };
    for policy in &update.authorization_policies {
        if let Err(error) = weft_api::authorization::Policy::compile(policy) {
            assert!(!error.to_string().is_empty());
        }
    }
    for service in &update.services {
        if let Some(traffic) = &service.traffic_policy {
            let _ = weft_api::traffic::TrafficPolicy::from_wire(&service.namespace, traffic);
        }
    }
    let Ok(Applied { view: first, refused }) = NodeView::apply(None, &update, "node-1") else {
        return;
    };
    assert_eq!(first.version(), update.version);
    assert!(refused.iter().all(|problem| !problem.to_string().is_empty()));
    // The node keeps remote workloads and Services as the view holds them,
    // written back in wire form: read again, they are the same entries.
    let mut kept = weft_proxy::StoredConfig::default();
    kept.fold_in(&update, &Default::default(), &first);
    let again = NodeView::apply(None, &kept.to_update(), "node-1").expect("the kept config applies");
    assert_eq!(again.view.remote_workloads(), first.remote_workloads());
    assert_eq!(again.view.services(), first.services());
    let mut delta = update.clone();
    delta.full_state = false;
    delta.version = first.version().wrapping_add(1);
    match NodeView::apply(Some(&first), &delta, "node-1") {
        Ok(second) => {
            assert_eq!(second.view.version(), delta.version);
            let balancers = std::sync::Arc::new(Balancers::default());
            let brought = RouteTable::new(&first).next(&second.view, &balancers);
            let fresh = RouteTable::new(&second.view);
            for ip in addresses(&first).chain(addresses(&second.view)) {
                assert_eq!(resolved(&brought, ip), resolved(&fresh, ip), "{ip}");
            }
        }
        Err(_) => assert_eq!(first.version(), update.version, "the base changed"),
    }
});

/// Every address a view names: its workloads' and its Services' cluster IPs.
fn addresses(view: &NodeView) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    let workloads = view.local_workloads().values().chain(view.remote_workloads().values());
    let services = view.services().values().flat_map(|s| s.vips.iter().copied());
    workloads.flat_map(|w| w.ips.iter().copied()).chain(services)
}

/// What a table makes of a connection to `ip` on each Service port.
fn resolved(table: &RouteTable, ip: std::net::IpAddr) -> String {
    let workload = table.workload(ip).map(|w| (w.uid.clone(), w.local().quarantine.clone()));
    let destination = match table.resolve(std::net::SocketAddr::new(ip, 80)) {
        Ok(Destination::Service(service)) => {
            format!("{} {:?}", service.target(), service.endpoints())
        }
        Ok(Destination::Direct(route)) => format!("direct {}", route.local),
        Err(no_route) => no_route.to_string(),
    };
    format!("{workload:?} {destination}")
}
