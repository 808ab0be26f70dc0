//! Where the node's pods live: each pod sandbox's network namespace and
//! addresses, as the CNI plugin announced them (or a search found them),
//! and what became of each (served, not meshed, not yet). Shared by the CNI
//! socket (`cni_api`), which fills it and waits for outcomes, and the
//! data plane's pod serving (`dataplane::pods`), which reads it and
//! reports them. Knows nothing of either.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A pod sandbox on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedPod {
    /// Its network namespace (an nsfs path such as `/var/run/netns/cni-…`).
    pub netns: PathBuf,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its Kubernetes namespace, if known (a pod found by a search is
    /// known by its addresses alone).
    #[serde(default)]
    pub namespace: String,
    /// Its name, if known.
    #[serde(default)]
    pub name: String,
    /// Its UID (`metadata.uid`), if the runtime said.
    #[serde(default)]
    pub uid: String,
    /// Found on the node by its addresses, not announced by the runtime:
    /// its namespace and name are what weft's config said of those
    /// addresses when it was found, and it is that pod only while the
    /// config still says so.
    #[serde(default)]
    pub found: bool,
}

/// What became of an announced pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Captured and served by the proxy.
    Served,
    /// Not part of the mesh: left alone.
    NotMeshed,
    /// Meshed, but not served yet, and why.
    Pending(String),
}

/// The node's pod sandboxes, keyed by network namespace.
#[derive(Debug)]
pub struct PodDirectory {
    pods: Mutex<BTreeMap<PathBuf, AnnouncedPod>>,
    changes: watch::Sender<u64>,
    outcomes: watch::Sender<BTreeMap<PathBuf, Outcome>>,
}

impl Default for PodDirectory {
    fn default() -> Self {
        PodDirectory {
            pods: Mutex::default(),
            changes: watch::channel(0).0,
            outcomes: watch::channel(BTreeMap::new()).0,
        }
    }
}

impl PodDirectory {
    /// Records a pod (replacing what was known of its namespace, and any
    /// other namespace that claimed its addresses: a pod that is gone).
    pub fn add(&self, pod: AnnouncedPod) {
        let mut pods = self.lock();
        pods.retain(|netns, known| {
            *netns == pod.netns || !known.ips.iter().any(|ip| pod.ips.contains(ip))
        });
        pods.insert(pod.netns.clone(), pod);
        drop(pods);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Forgets the pod in `netns` (it is being deleted).
    pub fn remove(&self, netns: &Path) {
        self.lock().remove(netns);
        self.outcomes.send_modify(|outcomes| {
            outcomes.remove(netns);
        });
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Forgets every pod whose namespace no longer exists.
    pub fn prune(&self) {
        self.lock().retain(|netns, _| netns.exists());
    }

    /// Every known pod.
    pub fn pods(&self) -> Vec<AnnouncedPod> {
        self.lock().values().cloned().collect()
    }

    /// The pod that has `ip`, if known.
    pub fn pod_with(&self, ip: IpAddr) -> Option<AnnouncedPod> {
        self.lock()
            .values()
            .find(|pod| pod.ips.contains(&ip))
            .cloned()
    }

    /// Wakes whenever a pod is added or removed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Replaces what became of each pod.
    pub fn report(&self, outcomes: BTreeMap<PathBuf, Outcome>) {
        self.outcomes.send_if_modified(|current| {
            let changed = *current != outcomes;
            *current = outcomes;
            changed
        });
    }

    /// Waits until the pod in `netns` is served or found not meshed; the
    /// last outcome if neither happens within `wait`.
    pub async fn settled(&self, netns: &Path, wait: std::time::Duration) -> Option<Outcome> {
        let mut outcomes = self.outcomes.subscribe();
        let settled = |all: &BTreeMap<PathBuf, Outcome>| {
            matches!(all.get(netns), Some(Outcome::Served | Outcome::NotMeshed))
        };
        let _ = tokio::time::timeout(wait, outcomes.wait_for(settled)).await;
        outcomes.borrow().get(netns).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, AnnouncedPod>> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(netns: &str, ip: &str) -> AnnouncedPod {
        AnnouncedPod {
            netns: netns.into(),
            ips: vec![ip.parse().expect("an IP")],
            namespace: "shop".into(),
            name: "web".into(),
            uid: String::new(),
            found: false,
        }
    }

    #[test]
    fn a_new_sandbox_with_an_old_address_replaces_the_old_one() {
        let directory = PodDirectory::default();
        directory.add(pod("/run/netns/a", "10.244.1.2"));
        directory.add(pod("/run/netns/b", "10.244.1.3"));
        directory.add(pod("/run/netns/c", "10.244.1.2"));
        let ip = "10.244.1.2".parse().expect("an IP");
        assert_eq!(
            directory.pod_with(ip).map(|p| p.netns),
            Some(PathBuf::from("/run/netns/c"))
        );
        assert_eq!(directory.pods().len(), 2);
        directory.remove(Path::new("/run/netns/c"));
        assert!(directory.pod_with(ip).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_announcement_waits_for_its_outcome_a_bounded_time() {
        let directory = std::sync::Arc::new(PodDirectory::default());
        let netns = Path::new("/run/netns/a");
        let wait = std::time::Duration::from_secs(3);
        directory.report(BTreeMap::from([(
            netns.to_owned(),
            Outcome::Pending("no config yet".into()),
        )]));
        let start = tokio::time::Instant::now();
        assert_eq!(
            directory.settled(netns, wait).await,
            Some(Outcome::Pending("no config yet".into()))
        );
        assert_eq!(start.elapsed(), wait);

        let waiting = tokio::spawn({
            let directory = directory.clone();
            async move { directory.settled(Path::new("/run/netns/a"), wait).await }
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        directory.report(BTreeMap::from([(netns.to_owned(), Outcome::Served)]));
        assert_eq!(waiting.await.ok().flatten(), Some(Outcome::Served));
    }
}
