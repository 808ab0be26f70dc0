//! Admission: whether a pod listener takes one more connection, and an
//! HBONE listener one more TLS handshake or one more connection of an
//! authenticated peer, within [`ConnectionLimits`]. Every pod's traffic
//! shares the proxy's file descriptors, memory and handshake slots; these
//! counts keep one pod (or one peer) from taking them all.
//!
//! What is counted, and against what:
//! - a connection, against the node's cap, its local pod's cap for its
//!   direction (what the pod opens, what is addressed to it: a flood into
//!   a pod does not stop it calling out, nor the other way round) and,
//!   inbound, its source address's cap;
//! - once the node is saturated ([`ConnectionLimits::saturated_at`]), a
//!   pod holding more than its fair share (the saturated count divided
//!   among the pods holding connections) is refused, so what is left goes
//!   to the pods holding few: a flood is refused before its neighbours'
//!   traffic is;
//! - a TLS handshake on 15008, against the node's and its source's caps;
//! - an established HBONE connection, against its peer identity's cap.
//!
//! Each grant is a guard that gives its count back when dropped, so no
//! path can forget to. A refusal is counted in
//! `weft_proxy_rejected_total`; the caller closes the connection.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use weft_certs::Identity;

use crate::limits::ConnectionLimits;
use crate::rejections::Rejections;

/// Why a listener refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `max_connections`.
    NodeLimit,
    /// The local pod holds `max_connections_per_pod`.
    PodLimit,
    /// The node is saturated and the pod holds more than its fair share.
    FairShare,
    /// The source address holds `max_inbound_connections_per_source`.
    SourceLimit,
    /// `max_handshakes` are in progress on the node.
    HandshakeLimit,
    /// The source has `max_handshakes_per_source` in progress.
    HandshakeSourceLimit,
    /// The peer identity holds `max_hbone_connections_per_peer`.
    PeerLimit,
}

impl Refused {
    /// The `reason` label of `weft_proxy_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::NodeLimit => "node_limit",
            Refused::PodLimit => "pod_limit",
            Refused::FairShare => "fair_share",
            Refused::SourceLimit => "source_limit",
            Refused::HandshakeLimit => "handshake_limit",
            Refused::HandshakeSourceLimit => "handshake_source_limit",
            Refused::PeerLimit => "peer_limit",
        }
    }
}

/// The counts, and the limits they are held to.
pub struct Admission {
    limits: ConnectionLimits,
    counts: Mutex<Counts>,
    rejections: Rejections,
}

#[derive(Default)]
struct Counts {
    connections: u32,
    /// By local pod and direction (inbound: `true`).
    by_pod: HashMap<(Arc<str>, bool), u32>,
    by_source: HashMap<IpAddr, u32>,
    handshakes: u32,
    handshakes_by_source: HashMap<IpAddr, u32>,
    by_peer: HashMap<Identity, u32>,
}

impl Admission {
    /// Nothing held yet; refusals are counted in `rejections`.
    pub fn new(limits: ConnectionLimits, rejections: Rejections) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counts: Mutex::default(),
            rejections,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// One more connection on `listener` for the local pod `pod`, from
    /// `source` if it came from outside the pod (inbound).
    pub fn connection(
        self: &Arc<Self>,
        listener: &'static str,
        pod: &Arc<str>,
        source: Option<IpAddr>,
    ) -> Result<AdmittedConnection, Refused> {
        let mut counts = self.lock();
        let key = (pod.clone(), source.is_some());
        let held = counts.by_pod.get(&key).copied().unwrap_or(0);
        let refused = if counts.connections >= self.limits.max_connections {
            Some(Refused::NodeLimit)
        } else if held >= self.limits.max_connections_per_pod {
            Some(Refused::PodLimit)
        } else if counts.connections >= self.limits.saturated_at()
            && held >= self.fair_share(&counts, held)
        {
            Some(Refused::FairShare)
        } else if source.is_some_and(|ip| {
            counts.by_source.get(&ip).copied().unwrap_or(0)
                >= self.limits.max_inbound_connections_per_source
        }) {
            Some(Refused::SourceLimit)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(counts);
            self.rejections.count(listener, refused.reason());
            return Err(refused);
        }
        counts.connections += 1;
        add(&mut counts.by_pod, key.clone());
        if let Some(ip) = source {
            add(&mut counts.by_source, ip);
        }
        Ok(AdmittedConnection {
            admission: self.clone(),
            pod: key,
            source,
        })
    }

    /// A pod's share of the saturated node for one direction: the
    /// saturated count divided among the pods (and directions) holding
    /// connections, this one among them.
    fn fair_share(&self, counts: &Counts, held: u32) -> u32 {
        let pods = counts.by_pod.len() + usize::from(held == 0);
        let pods = u32::try_from(pods.max(1)).unwrap_or(u32::MAX);
        (self.limits.saturated_at() / pods).max(1)
    }

    /// One more TLS handshake on 15008, from `source`.
    pub fn handshake(self: &Arc<Self>, source: IpAddr) -> Result<Handshaking, Refused> {
        let mut counts = self.lock();
        let refused = if counts.handshakes >= self.limits.max_handshakes {
            Some(Refused::HandshakeLimit)
        } else if counts
            .handshakes_by_source
            .get(&source)
            .copied()
            .unwrap_or(0)
            >= self.limits.max_handshakes_per_source
        {
            Some(Refused::HandshakeSourceLimit)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(counts);
            self.rejections.count("hbone", refused.reason());
            return Err(refused);
        }
        counts.handshakes += 1;
        add(&mut counts.handshakes_by_source, source);
        Ok(Handshaking {
            admission: self.clone(),
            source,
        })
    }

    /// One more established HBONE connection of the peer `identity`.
    pub fn peer(self: &Arc<Self>, identity: &Identity) -> Result<AdmittedPeer, Refused> {
        let mut counts = self.lock();
        if counts.by_peer.get(identity).copied().unwrap_or(0)
            >= self.limits.max_hbone_connections_per_peer
        {
            drop(counts);
            self.rejections.count("hbone", Refused::PeerLimit.reason());
            return Err(Refused::PeerLimit);
        }
        add(&mut counts.by_peer, identity.clone());
        Ok(AdmittedPeer {
            admission: self.clone(),
            identity: identity.clone(),
        })
    }

    /// Counts a refusal decided elsewhere (a handshake that timed out).
    pub fn count_rejection(&self, listener: &'static str, reason: &'static str) {
        self.rejections.count(listener, reason);
    }

    /// Connections held now: on the node, and by `pod` (both directions).
    pub fn held(&self, pod: &str) -> (u32, u32) {
        let counts = self.lock();
        let by_pod = |inbound| {
            let key = (Arc::from(pod), inbound);
            counts.by_pod.get(&key).copied().unwrap_or(0)
        };
        (counts.connections, by_pod(false) + by_pod(true))
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent across a panic elsewhere: every
        // change is made whole under the lock.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn add<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    *map.entry(key).or_default() += 1;
}

/// Takes one off `key`'s count, forgetting keys that hold nothing (the
/// maps stay as small as what is held now).
fn remove<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(key);
        }
    }
}

/// A connection admitted; dropping it gives its counts back.
pub struct AdmittedConnection {
    admission: Arc<Admission>,
    pod: (Arc<str>, bool),
    source: Option<IpAddr>,
}

impl Drop for AdmittedConnection {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.connections = counts.connections.saturating_sub(1);
        remove(&mut counts.by_pod, &self.pod);
        if let Some(ip) = self.source {
            remove(&mut counts.by_source, &ip);
        }
    }
}

/// A TLS handshake in progress; dropping it ends it for the counts.
pub struct Handshaking {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.handshakes = counts.handshakes.saturating_sub(1);
        remove(&mut counts.handshakes_by_source, &self.source);
    }
}

/// An established HBONE connection of a peer identity.
pub struct AdmittedPeer {
    admission: Arc<Admission>,
    identity: Identity,
}

impl Drop for AdmittedPeer {
    fn drop(&mut self) {
        remove(&mut self.admission.lock().by_peer, &self.identity);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    fn admission(limits: ConnectionLimits) -> (Arc<Admission>, Rejections) {
        let rejections = Rejections::default();
        (Admission::new(limits, rejections.clone()), rejections)
    }

    fn pod(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn a_pod_is_held_to_its_cap_and_gets_it_back_when_connections_close() {
        let (admission, rejections) = admission(ConnectionLimits {
            max_connections_per_pod: 3,
            ..ConnectionLimits::default()
        });
        let (flood, quiet) = (pod("shop/flood"), pod("shop/quiet"));
        let mut held: Vec<_> = (0..3)
            .map(|_| admission.connection("outbound", &flood, None).unwrap())
            .collect();
        assert_eq!(
            admission.connection("outbound", &flood, None).err(),
            Some(Refused::PodLimit)
        );
        assert_eq!(rejections.get("outbound", "pod_limit"), 1);
        // Another pod is not affected, nor what comes in for this one.
        let _other = admission.connection("outbound", &quiet, None).unwrap();
        let source: IpAddr = "10.0.0.9".parse().unwrap();
        let inbound = admission.connection("plaintext", &flood, Some(source));
        assert!(inbound.is_ok(), "a pod's inbound has a cap of its own");
        drop(inbound);
        held.pop();
        let _again = admission.connection("outbound", &flood, None).unwrap();
        assert_eq!(admission.held("shop/flood"), (4, 3));
        drop(held);
        drop(_again);
        assert_eq!(admission.held("shop/flood"), (1, 0));
    }

    #[test]
    fn a_saturated_node_refuses_the_pod_above_its_share_and_takes_the_quiet_one() {
        let (admission, rejections) = admission(ConnectionLimits {
            max_connections: 100,
            fair_share_above_percent: 75,
            ..ConnectionLimits::default()
        });
        let (flood, quiet) = (pod("shop/flood"), pod("shop/quiet"));
        // Alone, the flood is stopped at the saturation mark, not the cap.
        let mut flooding = Vec::new();
        while let Ok(admitted) = admission.connection("outbound", &flood, None) {
            flooding.push(admitted);
        }
        assert_eq!(flooding.len(), 75);
        assert_eq!(rejections.get("outbound", "fair_share"), 1);
        // The quiet pod gets in, up to the node's cap.
        let mut quiet_held = Vec::new();
        while let Ok(admitted) = admission.connection("plaintext", &quiet, None) {
            quiet_held.push(admitted);
        }
        assert_eq!(quiet_held.len(), 25);
        assert_eq!(rejections.get("plaintext", "node_limit"), 1);
        // And the flood stays refused while above its share of two pods.
        quiet_held.truncate(10);
        assert_eq!(
            admission.connection("outbound", &flood, None).err(),
            Some(Refused::FairShare)
        );
        assert!(admission.connection("plaintext", &quiet, None).is_ok());
    }

    #[test]
    fn inbound_sources_and_handshakes_and_peers_have_caps_of_their_own() {
        let (admission, rejections) = admission(ConnectionLimits {
            max_inbound_connections_per_source: 2,
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            max_hbone_connections_per_peer: 1,
            ..ConnectionLimits::default()
        });
        let web = pod("shop/web");
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let _inbound = [
            admission.connection("hbone", &web, Some(a)).unwrap(),
            admission.connection("plaintext", &web, Some(a)).unwrap(),
        ];
        assert_eq!(
            admission.connection("hbone", &web, Some(a)).err(),
            Some(Refused::SourceLimit)
        );
        assert!(admission.connection("hbone", &web, Some(b)).is_ok());

        let first = [
            admission.handshake(a).unwrap(),
            admission.handshake(a).unwrap(),
        ];
        assert_eq!(
            admission.handshake(a).err(),
            Some(Refused::HandshakeSourceLimit)
        );
        let _third = admission.handshake(b).unwrap();
        assert_eq!(admission.handshake(c).err(), Some(Refused::HandshakeLimit));
        drop(first);
        assert!(admission.handshake(c).is_ok());
        assert_eq!(rejections.get("hbone", "handshake_source_limit"), 1);
        assert_eq!(rejections.get("hbone", "handshake_limit"), 1);

        let client: Identity = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        let peer = admission.peer(&client).unwrap();
        assert_eq!(admission.peer(&client).err(), Some(Refused::PeerLimit));
        drop(peer);
        assert!(admission.peer(&client).is_ok());
    }
}
