#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use super::*;
use crate::test_configs::{Dice, NODE, first_full_state, random_delta};

/// What a table resolves, in an order that does not depend on how it was built.
type Summary = (
    Vec<(IpAddr, Workload)>,
    Vec<(IpAddr, Workload)>,
    Vec<(IpAddr, String, Vec<IpAddr>)>,
    Vec<(String, Vec<IpAddr>)>,
);

fn summary(table: &RouteTable) -> Summary {
    let workloads = |book: &AddressBook<Workload>| {
        let mut all: Vec<_> = book.iter().map(|(ip, w)| (*ip, (**w).clone())).collect();
        all.sort_by_key(|(ip, _)| *ip);
        all
    };
    let mut services: Vec<_> = table
        .services
        .iter()
        .map(|(ip, service)| (*ip, service.key.to_string(), ready_endpoints(service)))
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
    book.change(&"shop/a".into(), &[], Some((&[ip], &a)), quarantine_all);
    assert_eq!(book.get(&ip).unwrap().local().quarantine, None);
    book.change(&"shop/b".into(), &[], Some((&[ip], &b)), quarantine_all);
    let both = book.get(&ip).unwrap();
    assert_eq!(&*both.uid, "shop/a", "the first by key stands, quarantined");
    assert!(
        both.local()
            .quarantine
            .as_deref()
            .unwrap()
            .contains("claimed by another pod")
    );
    book.change(&"shop/a".into(), &[ip], None, quarantine_all);
    assert!(
        Arc::ptr_eq(book.get(&ip).unwrap(), &b),
        "b alone, not quarantined"
    );
    book.change(&"shop/b".into(), &[ip], None, quarantine_all);
    assert!(book.get(&ip).is_none());
    assert_eq!(book.iter().count(), 0, "no empty entry is left behind");
}
