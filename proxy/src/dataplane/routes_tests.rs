#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::sync::LazyLock;
use std::time::SystemTime;

use weft_api::v1;

use super::*;

const NODE: &str = "node-1";

static ROOTS_PEM: LazyLock<String> = LazyLock::new(|| {
    weft_certs::MeshCa::generate_root("cluster.local", SystemTime::now())
        .unwrap()
        .trust_bundle()
        .to_pem()
});

/// A deterministic source of small random numbers.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % sides as u64) as usize
    }
}

/// Few addresses for many entries, so that claims collide often.
fn address(dice: &mut Dice) -> String {
    format!("10.0.0.{}", 1 + dice.roll(6))
}

fn workload(dice: &mut Dice, slot: usize, local: bool) -> v1::Workload {
    let name = format!("pod-{slot}");
    let ips = (0..1 + dice.roll(2)).map(|_| address(dice)).collect();
    v1::Workload {
        uid: format!("shop/{name}"),
        namespace: "shop".into(),
        name,
        service_account: "sa".into(),
        identity: "spiffe://cluster.local/ns/shop/sa/sa".into(),
        node: if local { NODE.into() } else { "node-2".into() },
        ips,
        meshed: dice.roll(4) != 0,
        workload_name: format!("version-{}", dice.roll(3)),
        ..v1::Workload::default()
    }
}

fn service(dice: &mut Dice, slot: usize) -> v1::Service {
    v1::Service {
        namespace: "shop".into(),
        name: format!("svc-{slot}"),
        vips: vec![format!("10.96.0.{}", dice.roll(3))],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
        }],
        endpoints: (0..dice.roll(4))
            .map(|_| v1::Endpoint {
                workload_uid: String::new(),
                ip: address(dice),
                ready: dice.roll(3) != 0,
                ports: [("http".to_owned(), 8080)].into(),
            })
            .collect(),
        traffic_policy: None,
    }
}

/// A delta of a few random changes: local pods in slots 0..8, remote pods
/// in 8..16 (so that a pod moves between the lists), Services in 0..5.
fn random_delta(dice: &mut Dice, version: u64, view: &NodeView) -> v1::ConfigUpdate {
    let mut update = v1::ConfigUpdate {
        version,
        ..v1::ConfigUpdate::default()
    };
    for _ in 0..1 + dice.roll(4) {
        let slot = dice.roll(16);
        let uid = format!("shop/pod-{slot}");
        let (local, known) = if slot < 8 {
            (true, view.local_workloads().contains_key(&uid))
        } else {
            (false, view.remote_workloads().contains_key(&uid))
        };
        let listed = |u: &v1::ConfigUpdate| {
            u.local_workloads
                .iter()
                .chain(&u.remote_workloads)
                .any(|w| w.uid == uid)
                || u.removed_local_workloads.contains(&uid)
                || u.removed_remote_workloads.contains(&uid)
        };
        if listed(&update) {
            continue;
        }
        match (dice.roll(3), local, known) {
            (0, true, true) => update.removed_local_workloads.push(uid),
            (0, false, true) => update.removed_remote_workloads.push(uid),
            (_, true, _) => update.local_workloads.push(workload(dice, slot, true)),
            (_, false, _) => update.remote_workloads.push(workload(dice, slot, false)),
        }
    }
    let slot = dice.roll(5);
    let key = format!("shop/svc-{slot}");
    if dice.roll(3) == 0 && view.services().contains_key(&key) {
        update.removed_services.push(key);
    } else {
        update.services.push(service(dice, slot));
    }
    update
}

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
        .map(|(ip, route)| (*ip, route.key.clone(), route.ready.clone()))
        .collect();
    services.sort();
    let mut by_key: Vec<_> = table
        .services_by_key
        .iter()
        .map(|(key, route)| (key.clone(), route.ready.clone()))
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
        let balancers = Balancers::default();
        let first = v1::ConfigUpdate {
            version: 1,
            full_state: true,
            trust: Some(v1::TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_pem: ROOTS_PEM.clone(),
            }),
            ..v1::ConfigUpdate::default()
        };
        let mut view = NodeView::apply(None, &first, NODE).unwrap().view;
        let mut table = RouteTable::default().next(&view, &balancers);
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
                .filter(|(_, w)| w.quarantine.is_some())
                .count();
        }
        // The balancing state follows the table: a Service gone from the
        // view is forgotten, one in it keeps only its ready endpoints.
        for (key, route) in table.services_by_key.iter() {
            assert!(Arc::ptr_eq(&route.balancer, &balancers.get(key)), "{key}");
        }
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
        Arc::new(Workload {
            uid: format!("shop/{name}"),
            namespace: "shop".into(),
            name: name.into(),
            pod_uid: String::new(),
            workload_name: name.into(),
            service_account: "sa".into(),
            identity: weft_certs::Identity::new("cluster.local", "shop", "sa").unwrap(),
            node: NODE.into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            meshed: true,
            labels: Default::default(),
            authorization_policies: Vec::new(),
            invalid_authorization_policies: Vec::new(),
            quarantine: None,
            mtls_strict: false,
            mtls_policy: String::new(),
            probe_ports: Default::default(),
        })
    };
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let (a, b) = (pod("a"), pod("b"));
    book.change("shop/a", &[], Some((&[ip], &a)), quarantine_all);
    assert_eq!(book.get(&ip).unwrap().quarantine, None);
    book.change("shop/b", &[], Some((&[ip], &b)), quarantine_all);
    let both = book.get(&ip).unwrap();
    assert_eq!(both.uid, "shop/a", "the first by key stands, quarantined");
    assert!(
        both.quarantine
            .as_deref()
            .unwrap()
            .contains("claimed by another pod")
    );
    book.change("shop/a", &[ip], None, quarantine_all);
    assert!(
        Arc::ptr_eq(book.get(&ip).unwrap(), &b),
        "b alone, not quarantined"
    );
    book.change("shop/b", &[ip], None, quarantine_all);
    assert!(book.get(&ip).is_none());
    assert_eq!(book.iter().count(), 0, "no empty entry is left behind");
}
