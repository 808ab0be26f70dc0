//! What a node proxy remembers about the Services its pods connect to, and
//! the choices a TrafficPolicy makes with it: which endpoint a new
//! connection goes to (round robin, least connections, power of two
//! choices), whether the Service admits another connection (max
//! connections), which endpoints sit out after failing (outlier ejection),
//! and where a split sends a connection.
//!
//! The state lives in [`Balancers`], one [`Balancer`] per Service key,
//! shared by every [`super::routes::RouteTable`] built from successive
//! config versions, so open-connection counts, failure streaks, ejections
//! and latency averages survive a config change for the endpoints that are
//! still there. Every function takes the time as an argument: the logic is
//! tested with a made-up clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::node_view::{LoadBalancing, OutlierDetection};

/// The weight of a new connect latency sample in the moving average.
const LATENCY_WEIGHT: f64 = 0.3;

/// The state of every Service this proxy has routed to, by
/// `<namespace>/<name>`.
#[derive(Debug, Default)]
pub struct Balancers {
    /// Only Services a connection went to have state: a node knows every
    /// Service of the cluster, its pods talk to few.
    services: Mutex<HashMap<Arc<str>, Arc<Balancer>>>,
}

impl Balancers {
    /// The state of the Service `key`, created on first use.
    pub fn get(&self, key: &Arc<str>) -> Arc<Balancer> {
        let mut services = lock(&self.services);
        if let Some(held) = services.get(&**key) {
            return held.clone();
        }
        services.entry(key.clone()).or_default().clone()
    }

    /// Whether Service `key` has state (a connection went to it).
    pub fn has(&self, key: &str) -> bool {
        lock(&self.services).contains_key(key)
    }

    /// How many Services have state.
    pub fn count(&self) -> usize {
        lock(&self.services).len()
    }

    /// Forgets the state of Service `key` (it left the config). Connections
    /// still open to it release nothing.
    pub fn forget(&self, key: &str) {
        lock(&self.services).remove(key);
    }

    /// Forgets, in Service `key`'s state, the endpoints `ready` does not
    /// list. Connections still open to a forgotten endpoint release
    /// nothing.
    pub fn keep_endpoints(&self, key: &str, ready: impl IntoIterator<Item = IpAddr>) {
        let Some(balancer) = lock(&self.services).get(key).cloned() else {
            return;
        };
        let ready: std::collections::HashSet<IpAddr> = ready.into_iter().collect();
        lock(&balancer.state)
            .endpoints
            .retain(|ip, _| ready.contains(ip));
    }
}

/// One Service's state.
#[derive(Debug, Default)]
pub struct Balancer {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The round-robin position.
    cursor: usize,
    /// Connections open to the Service as addressed (for max connections).
    open: u32,
    /// Smooth weighted round robin over split targets: each one's credit.
    split_credit: HashMap<String, i64>,
    endpoints: HashMap<IpAddr, EndpointState>,
}

#[derive(Clone, Copy, Debug, Default)]
struct EndpointState {
    /// Connections open (or being opened) to it.
    active: u32,
    /// Failed connects since the last success or ejection.
    failures: u32,
    /// Ejections in a row, without a successful connect in between.
    ejections: u32,
    /// Out of load balancing until then.
    ejected_until: Option<Instant>,
    /// Moving average of connect latency, seconds.
    latency: Option<f64>,
}

impl EndpointState {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection counted against a Service's `max_connections` until dropped.
#[derive(Debug)]
pub struct Admission {
    balancer: Arc<Balancer>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = lock(&self.balancer.state);
        state.open = state.open.saturating_sub(1);
    }
}

/// A connection counted as active on one endpoint until dropped; reports
/// how connecting to it went.
#[derive(Debug)]
pub struct EndpointLease {
    balancer: Arc<Balancer>,
    ip: IpAddr,
}

impl EndpointLease {
    /// The endpoint.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The connect succeeded after `latency`: the failure streak ends.
    pub fn succeeded(&self, latency: Duration) {
        let mut state = lock(&self.balancer.state);
        let endpoint = state.endpoints.entry(self.ip).or_default();
        endpoint.failures = 0;
        endpoint.ejections = 0;
        let sample = latency.as_secs_f64();
        endpoint.latency = Some(match endpoint.latency {
            Some(average) => average + LATENCY_WEIGHT * (sample - average),
            None => sample,
        });
    }

    /// The connect failed at `now`. With outlier detection, the endpoint is
    /// ejected after its streak reaches the threshold, unless no other
    /// endpoint of `endpoints` (the Service's ready ones) would be left.
    /// Returns whether it was ejected. Releases the lease.
    pub fn failed(
        self,
        outlier: Option<&OutlierDetection>,
        endpoints: &[IpAddr],
        now: Instant,
    ) -> bool {
        let mut state = lock(&self.balancer.state);
        let others_left = endpoints
            .iter()
            .filter(|ip| **ip != self.ip)
            .any(|ip| !state.endpoints.get(ip).is_some_and(|e| e.ejected(now)));
        let endpoint = state.endpoints.entry(self.ip).or_default();
        endpoint.failures = endpoint.failures.saturating_add(1);
        let Some(outlier) = outlier else {
            return false;
        };
        if endpoint.failures < outlier.consecutive_failures || !others_left {
            return false;
        }
        endpoint.failures = 0;
        endpoint.ejections = endpoint.ejections.saturating_add(1);
        let length = outlier
            .base_ejection
            .saturating_mul(endpoint.ejections)
            .min(outlier.max_ejection);
        endpoint.ejected_until = Some(now + length);
        true
    }
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        if let Some(endpoint) = lock(&self.balancer.state).endpoints.get_mut(&self.ip) {
            endpoint.active = endpoint.active.saturating_sub(1);
        }
    }
}

impl Balancer {
    /// Counts one more connection to the Service, unless `max` are open.
    pub fn admit(self: &Arc<Self>, max: Option<u32>) -> Option<Admission> {
        let mut state = lock(&self.state);
        if max.is_some_and(|max| state.open >= max) {
            return None;
        }
        state.open += 1;
        Some(Admission {
            balancer: self.clone(),
        })
    }

    /// Picks the split target for a new connection: smooth weighted round
    /// robin over the `(target, weight)` pairs with a weight above 0, so
    /// the shares hold exactly over every sum-of-weights connections.
    /// Returns the index into `targets`.
    pub fn split(&self, targets: &[(&str, u32)]) -> Option<usize> {
        let total: i64 = targets.iter().map(|(_, w)| i64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut state = lock(&self.state);
        state
            .split_credit
            .retain(|key, _| targets.iter().any(|(t, w)| t == key && *w > 0));
        let mut best: Option<(usize, i64)> = None;
        for (index, (target, weight)) in targets.iter().enumerate() {
            if *weight == 0 {
                continue;
            }
            let credit = state.split_credit.entry((*target).to_owned()).or_default();
            *credit += i64::from(*weight);
            if best.is_none_or(|(_, c)| *credit > c) {
                best = Some((index, *credit));
            }
        }
        let (index, _) = best?;
        if let Some(credit) = state.split_credit.get_mut(targets[index].0) {
            *credit -= total;
        }
        Some(index)
    }

    /// Picks an endpoint of `candidates` (the Service's ready endpoints, in
    /// a stable order) not in `tried`, and counts a connection on it.
    /// Ejected endpoints are left out while any other remains. `None` when
    /// every candidate has been tried.
    pub fn pick(
        self: &Arc<Self>,
        mode: LoadBalancing,
        candidates: &[IpAddr],
        tried: &[IpAddr],
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<EndpointLease> {
        let mut state = lock(&self.state);
        let untried: Vec<IpAddr> = candidates
            .iter()
            .filter(|ip| !tried.contains(ip))
            .copied()
            .collect();
        let healthy: Vec<IpAddr> = untried
            .iter()
            .filter(|ip| !state.endpoints.get(ip).is_some_and(|e| e.ejected(now)))
            .copied()
            .collect();
        let pool = if healthy.is_empty() { untried } else { healthy };
        if pool.is_empty() {
            return None;
        }
        let stats =
            |state: &State, ip: &IpAddr| state.endpoints.get(ip).copied().unwrap_or_default();
        // A retry does not move the cursor: otherwise a failing endpoint
        // would be first again for every other connection.
        let cursor = state.cursor;
        if tried.is_empty() {
            state.cursor = state.cursor.wrapping_add(1);
        }
        let chosen = match mode {
            LoadBalancing::RoundRobin => pool[cursor % pool.len()],
            LoadBalancing::LeastConnections => {
                // The fewest active; ties in turn from the cursor, so that
                // short connections still spread.
                let rotated = pool
                    .iter()
                    .cycle()
                    .skip(cursor % pool.len())
                    .take(pool.len());
                let mut best = pool[cursor % pool.len()];
                for ip in rotated {
                    if stats(&state, ip).active < stats(&state, &best).active {
                        best = *ip;
                    }
                }
                best
            }
            LoadBalancing::PowerOfTwoChoices => {
                let first = pool[rng.random_range(0..pool.len())];
                let second = if pool.len() > 1 {
                    let mut index = rng.random_range(0..pool.len() - 1);
                    if pool[index] == first {
                        index = pool.len() - 1;
                    }
                    pool[index]
                } else {
                    first
                };
                let cost = |ip: &IpAddr| {
                    let s = stats(&state, ip);
                    (f64::from(s.active) + 1.0) * s.latency.unwrap_or(0.0)
                };
                let (a, b) = (cost(&first), cost(&second));
                if b < a || (b == a && stats(&state, &second).active < stats(&state, &first).active)
                {
                    second
                } else {
                    first
                }
            }
        };
        state.endpoints.entry(chosen).or_default().active += 1;
        Some(EndpointLease {
            balancer: self.clone(),
            ip: chosen,
        })
    }

    /// Connections open (or being opened) to `ip`, for tests and dumps.
    pub fn active(&self, ip: IpAddr) -> u32 {
        lock(&self.state).endpoints.get(&ip).map_or(0, |e| e.active)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn ips(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn round_robin_takes_each_in_turn_and_skips_tried_endpoints() {
        let b = Arc::new(Balancer::default());
        let eps = ips(3);
        let now = Instant::now();
        let picked: Vec<IpAddr> = (0..6)
            .map(|_| {
                b.pick(LoadBalancing::RoundRobin, &eps, &[], now, &mut rng())
                    .unwrap()
                    .ip()
            })
            .collect();
        assert_eq!(picked, [eps.clone(), eps.clone()].concat());
        let lease = b
            .pick(LoadBalancing::RoundRobin, &eps, &eps[..2], now, &mut rng())
            .unwrap();
        assert_eq!(lease.ip(), eps[2]);
        assert!(
            b.pick(LoadBalancing::RoundRobin, &eps, &eps, now, &mut rng())
                .is_none()
        );
    }

    #[test]
    fn a_retry_does_not_make_a_failing_endpoint_first_again() {
        let b = Arc::new(Balancer::default());
        let eps = ips(2);
        let now = Instant::now();
        let mut first = Vec::new();
        for _ in 0..4 {
            let lease = b
                .pick(LoadBalancing::RoundRobin, &eps, &[], now, &mut rng())
                .unwrap();
            first.push(lease.ip());
            if lease.ip() == eps[1] {
                // eps[1] fails; the retry goes to eps[0].
                let retry = b
                    .pick(LoadBalancing::RoundRobin, &eps, &[eps[1]], now, &mut rng())
                    .unwrap();
                assert_eq!(retry.ip(), eps[0]);
            }
        }
        assert_eq!(first, [eps[0], eps[1], eps[0], eps[1]]);
    }

    #[test]
    fn least_connections_prefers_the_idlest_and_releases_on_drop() {
        let b = Arc::new(Balancer::default());
        let eps = ips(3);
        let now = Instant::now();
        let held: Vec<_> = (0..6)
            .map(|_| {
                b.pick(LoadBalancing::LeastConnections, &eps, &[], now, &mut rng())
                    .unwrap()
            })
            .collect();
        for ip in &eps {
            assert_eq!(b.active(*ip), 2, "held connections spread evenly");
        }
        let (_kept, released): (Vec<_>, Vec<_>) = held.into_iter().partition(|l| l.ip() == eps[1]);
        drop(released);
        // Only eps[1] still has connections: the next four go elsewhere.
        let mut more = Vec::new();
        for _ in 0..4 {
            let lease = b
                .pick(LoadBalancing::LeastConnections, &eps, &[], now, &mut rng())
                .unwrap();
            assert_ne!(lease.ip(), eps[1]);
            more.push(lease);
        }
    }

    #[test]
    fn power_of_two_choices_avoids_the_slow_and_the_busy() {
        let b = Arc::new(Balancer::default());
        let eps = ips(2);
        let now = Instant::now();
        let mut rng = rng();
        // Teach it the latencies: eps[0] is ten times slower.
        for (ip, ms) in [(eps[0], 95), (eps[1], 10)] {
            let lease = b
                .pick(LoadBalancing::RoundRobin, &[ip], &[], now, &mut rng)
                .unwrap();
            lease.succeeded(Duration::from_millis(ms));
        }
        // With two endpoints both are always compared: the fast one wins
        // until it carries ten times the connections of the slow one.
        let mut held = Vec::new();
        for _ in 0..9 {
            let lease = b
                .pick(LoadBalancing::PowerOfTwoChoices, &eps, &[], now, &mut rng)
                .unwrap();
            assert_eq!(lease.ip(), eps[1]);
            held.push(lease);
        }
        let lease = b
            .pick(LoadBalancing::PowerOfTwoChoices, &eps, &[], now, &mut rng)
            .unwrap();
        assert_eq!(lease.ip(), eps[0], "(9+1)*10ms is more than 95ms");
    }

    #[test]
    fn max_connections_admits_up_to_the_limit() {
        let b = Arc::new(Balancer::default());
        let first = b.admit(Some(2)).unwrap();
        let _second = b.admit(Some(2)).unwrap();
        assert!(b.admit(Some(2)).is_none());
        drop(first);
        assert!(b.admit(Some(2)).is_some());
        assert!(b.admit(None).is_some(), "no limit");
    }

    #[test]
    fn an_outlier_is_ejected_for_a_growing_time_and_returns() {
        let b = Arc::new(Balancer::default());
        let eps = ips(2);
        let outlier = OutlierDetection {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
        };
        let t0 = Instant::now();
        let fail = |now: Instant| {
            let lease = b
                .pick(LoadBalancing::RoundRobin, &eps[..1], &[], now, &mut rng())
                .unwrap();
            lease.failed(Some(&outlier), &eps, now)
        };
        assert!(!fail(t0), "one failure is not a streak");
        assert!(fail(t0), "two are: ejected for 10 s");
        let picks = |now: Instant| -> Vec<IpAddr> {
            (0..4)
                .map(|_| {
                    b.pick(LoadBalancing::RoundRobin, &eps, &[], now, &mut rng())
                        .unwrap()
                        .ip()
                })
                .collect()
        };
        assert!(
            picks(t0 + Duration::from_secs(9))
                .iter()
                .all(|ip| *ip == eps[1])
        );
        let back = t0 + Duration::from_secs(10);
        assert!(picks(back).contains(&eps[0]), "returns after 10 s");
        // Failing again without a success in between: 20 s, then capped at 25 s.
        assert!(!fail(back));
        assert!(fail(back));
        assert!(!picks(back + Duration::from_secs(19)).contains(&eps[0]));
        let back = back + Duration::from_secs(20);
        assert!(picks(back).contains(&eps[0]));
        fail(back);
        assert!(fail(back));
        assert!(!picks(back + Duration::from_secs(24)).contains(&eps[0]));
        assert!(picks(back + Duration::from_secs(25)).contains(&eps[0]));
        // A success ends the series: the next ejection is 10 s again.
        let back = back + Duration::from_secs(25);
        b.pick(LoadBalancing::RoundRobin, &eps[..1], &[], back, &mut rng())
            .unwrap()
            .succeeded(Duration::from_millis(1));
        fail(back);
        assert!(fail(back));
        assert!(picks(back + Duration::from_secs(10)).contains(&eps[0]));
    }

    #[test]
    fn the_last_endpoint_is_never_ejected() {
        let b = Arc::new(Balancer::default());
        let eps = ips(1);
        let outlier = OutlierDetection {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(10),
        };
        let now = Instant::now();
        let lease = b
            .pick(LoadBalancing::RoundRobin, &eps, &[], now, &mut rng())
            .unwrap();
        assert!(!lease.failed(Some(&outlier), &eps, now));
        assert!(
            b.pick(LoadBalancing::RoundRobin, &eps, &[], now, &mut rng())
                .is_some()
        );
    }

    #[test]
    fn ejected_endpoints_still_serve_when_nothing_else_is_left() {
        let b = Arc::new(Balancer::default());
        let eps = ips(2);
        let outlier = OutlierDetection {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(10),
        };
        let now = Instant::now();
        let lease = b
            .pick(LoadBalancing::RoundRobin, &eps, &[], now, &mut rng())
            .unwrap();
        assert_eq!(lease.ip(), eps[0]);
        assert!(lease.failed(Some(&outlier), &eps, now));
        // A retry that already tried eps[1] may still go to the ejected one.
        let lease = b
            .pick(LoadBalancing::RoundRobin, &eps, &eps[1..], now, &mut rng())
            .unwrap();
        assert_eq!(lease.ip(), eps[0]);
    }

    #[test]
    fn split_follows_the_weights_exactly_and_skips_zero() {
        let b = Balancer::default();
        let targets = [("ns/a", 3), ("ns/b", 1), ("ns/c", 0)];
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[b.split(&targets).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
        assert!(b.split(&[("ns/a", 0)]).is_none());
    }

    #[test]
    fn state_survives_for_endpoints_still_listed() {
        let balancers = Balancers::default();
        let eps = ips(2);
        let b = balancers.get(&"ns/svc".into());
        let _lease = b
            .pick(
                LoadBalancing::RoundRobin,
                &eps,
                &[],
                Instant::now(),
                &mut rng(),
            )
            .unwrap();
        balancers.keep_endpoints("ns/svc", eps.iter().copied());
        assert_eq!(balancers.get(&"ns/svc".into()).active(eps[0]), 1);
        balancers.keep_endpoints("ns/svc", []);
        assert_eq!(balancers.get(&"ns/svc".into()).active(eps[0]), 0);
        balancers.forget("ns/svc");
        assert!(!Arc::ptr_eq(&balancers.get(&"ns/svc".into()), &b));
    }
}
