#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use super::*;
use crate::test_configs::{Dice, NODE, first_full_state, random_delta, service, workload};

/// What a table resolves, in an order that does not depend on how it was built.
type Summary = (
    Vec<(IpAddr, Workload)>,
    Vec<(IpAddr, Workload)>,
    Vec<(IpAddr, String, Vec<IpAddr>)>,
    Vec<(String, Vec<IpAddr>)>,
);

fn summary(table: &RouteTable) -> Summary {
    let workloads = |book: &AddressBook<Workload>| {
        let mut all: Vec<_> = book.iter().map(|(ip, w)| (ip, (**w).clone())).collect();
        all.sort_by_key(|(ip, _)| *ip);
        all
    };
    let mut services: Vec<_> = table
        .services
        .iter()
        .map(|(ip, service)| (ip, service.key.to_string(), ready_endpoints(service)))
        .collect();
    services.sort();
    let mut by_key: Vec<_> = table
        .view
        .services
        .iter()
        .map(|(key, service)| (key.to_string(), ready_endpoints(service)))
        .collect();
    by_key.sort();
    (
        workloads(&table.local),
        workloads(&table.remote),
        services,
        by_key,
    )
}

#[test]
fn a_table_brought_along_delta_by_delta_is_the_table_of_its_view() {
    let mut collisions = 0;
    for seed in 1..=20u64 {
        let mut dice = Dice(seed * 7919);
        let balancers = Arc::new(Balancers::default());
        let mut view = NodeView::apply(None, &first_full_state(), NODE)
            .unwrap()
            .view;
        let mut table = RouteTable::default().next(&view, &balancers);
        // Connections went to every Service of the first view.
        let first_services: Vec<Arc<str>> = table.view.services.keys().cloned().collect();
        for key in &first_services {
            balancers.get(key);
        }
        for step in 0..150u64 {
            let update = random_delta(&mut dice, step + 2, &view);
            let applied = NodeView::apply(Some(&view), &update, NODE).unwrap();
            assert!(applied.refused.is_empty(), "{:?}", applied.refused);
            view = applied.view;
            table = table.next(&view, &balancers);
            let fresh = RouteTable::new(&view);
            assert_eq!(summary(&table), summary(&fresh), "seed {seed} step {step}");
            assert_eq!(table.generation, view.generation());
            collisions += table
                .local
                .iter()
                .filter(|(_, w)| w.local().quarantine.is_some())
                .count();
        }
        // The balancing state follows the table: a Service gone from the
        // view is forgotten, and none was made without a connection.
        for key in &first_services {
            let kept = table.view.services.contains_key(key);
            assert!(
                !balancers.has(key) || kept,
                "{key} is gone, its state is not"
            );
        }
        assert!(balancers.count() <= first_services.len());
    }
    assert!(
        collisions > 0,
        "the walk made two local pods claim one address"
    );
}

/// After a reconnect's full state (every entry listed anew), the table
/// holds the view's entries, not copies of the ones before: the entries
/// that did not change are one object in both views.
#[test]
fn a_reconnects_full_state_leaves_one_copy_of_each_entry() {
    let mut update = first_full_state();
    let mut dice = Dice(7);
    for slot in 0..40 {
        // An address of its own: a contested one resolves to nothing.
        let mut pod = workload(&mut dice, slot, false);
        pod.ips = vec![format!("10.1.0.{slot}")];
        update.remote_workloads.push(pod);
        update.services.push(service(&mut dice, slot));
    }
    let balancers = Arc::new(Balancers::default());
    let first = NodeView::apply(None, &update, NODE).unwrap().view;
    let table = RouteTable::default().next(&first, &balancers);
    let again = NodeView::apply(Some(&first), &update, NODE).unwrap().view;
    let table = table.next(&again, &balancers);
    let mut checked = 0;
    for workload in again.remote_workloads().values() {
        for ip in workload.ips.iter() {
            if let Some(held) = table.workload(*ip) {
                assert!(Arc::ptr_eq(held, workload), "{ip}: the view's own entry");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 40);
}

#[test]
fn a_withdrawn_claim_leaves_the_address_to_the_other() {
    let mut book: AddressBook<Workload> = AddressBook::default();
    let pod = |name: &str| {
        Arc::new(Workload::new(
            format!("shop/{name}").into(),
            ["10.0.0.1".parse().unwrap()].into_iter().collect(),
            NODE,
            weft_certs::Identity::new("cluster.local", "shop", "sa").unwrap(),
            name,
            true,
            Default::default(),
        ))
    };
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let (a, b) = (pod("a"), pod("b"));
    book.change(None, Some((&[ip], &a)), quarantine_all);
    assert_eq!(book.get(&ip).unwrap().local().quarantine, None);
    book.change(None, Some((&[ip], &b)), quarantine_all);
    let both = book.get(&ip).unwrap();
    assert_eq!(both.uid, "shop/a", "the first by key stands, quarantined");
    assert!(
        both.local()
            .quarantine
            .as_deref()
            .unwrap()
            .contains("claimed by another pod")
    );
    book.change(Some((&[ip], &a)), None, quarantine_all);
    assert!(
        Arc::ptr_eq(book.get(&ip).unwrap(), &b),
        "b alone, not quarantined"
    );
    assert_eq!(book.contested(), 0, "one claim left: not contested");
    book.change(Some((&[ip], &b)), None, quarantine_all);
    assert!(book.get(&ip).is_none());
    assert_eq!(book.iter().count(), 0, "no empty entry is left behind");
}

/// Remote pods that claim one address vouch for neither, in either family,
/// and the address goes back to the pod left when the other withdraws.
#[test]
fn a_contested_address_resolves_to_nothing_until_one_claim_is_left() {
    let mut book: AddressBook<Workload> = AddressBook::default();
    let v4: IpAddr = "10.0.0.1".parse().unwrap();
    let v6: IpAddr = "fd00::1".parse().unwrap();
    let pod = |name: &str| {
        Arc::new(Workload::new(
            format!("shop/{name}").into(),
            [v4, v6].into_iter().collect(),
            NODE,
            weft_certs::Identity::new("cluster.local", "shop", name).unwrap(),
            name,
            true,
            Default::default(),
        ))
    };
    let (a, b) = (pod("a"), pod("b"));
    book.change(None, Some((&a.ips, &a)), trust_none);
    book.change(None, Some((&b.ips, &b)), trust_none);
    assert!(book.get(&v4).is_none() && book.get(&v6).is_none());
    assert_eq!(book.contested(), 2);
    assert_eq!(book.iter().count(), 0);
    book.change(Some((&a.ips, &a)), None, trust_none);
    for ip in [v4, v6] {
        assert!(Arc::ptr_eq(book.get(&ip).unwrap(), &b), "{ip} is b's again");
    }
    assert_eq!(book.contested(), 0);
    assert_eq!(book.iter().count(), 2);
}
