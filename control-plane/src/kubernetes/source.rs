//! The Kubernetes source: kube-rs watchers on the kinds the mesh is made of,
//! each feeding a reflector store. After every change (a burst of changes is
//! coalesced) the stores are read into one [`ClusterState`], the same shape
//! the local-manifests source produces.
//!
//! The reflectors make watch restarts safe: a relist (after a 410, an API
//! server restart or a network cut) is buffered and swapped in whole, so
//! objects deleted while the watch was down disappear and none are doubled.
//! Nothing is published until every store has listed once, so proxies never
//! see a half-loaded cluster; that includes weft's own kinds, so a cluster
//! without weft's CRDs installed keeps the control plane waiting (and saying
//! so) rather than serving without the policies it may have.

use std::fmt::Debug;
use std::hash::Hash;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::cluster::{ClusterState, ObjectKey, Objects};
use crate::crd::{AuthorizationPolicy, MtlsPolicy, TrafficPolicy};
use crate::mesh::NODE_PROXY_DAEMONSET;

/// Changes arriving within this window are published as one state.
const SETTLE: Duration = Duration::from_millis(10);
/// While waiting for the first lists, say what is still missing this often.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(10);
/// Applied by `kubectl apply`: a full copy of the object, never read here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The reflector stores of the watched kinds.
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    service_accounts: Store<ServiceAccount>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    authorization_policies: Store<AuthorizationPolicy>,
    mtls_policies: Store<MtlsPolicy>,
    traffic_policies: Store<TrafficPolicy>,
    /// Only weft's node proxies' DaemonSet, in the control plane's namespace.
    node_proxy_daemon_set: Store<DaemonSet>,
}

impl Stores {
    /// Whether every store has completed its first list.
    async fn wait_until_ready(&self) {
        loop {
            let missing: Vec<&str> = [
                ("namespaces", is_ready(&self.namespaces)),
                ("serviceaccounts", is_ready(&self.service_accounts)),
                ("pods", is_ready(&self.pods)),
                ("services", is_ready(&self.services)),
                ("endpointslices", is_ready(&self.endpoint_slices)),
                (
                    "authorizationpolicies.weft.dev",
                    is_ready(&self.authorization_policies),
                ),
                ("mtlspolicies.weft.dev", is_ready(&self.mtls_policies)),
                ("trafficpolicies.weft.dev", is_ready(&self.traffic_policies)),
                ("daemonsets", is_ready(&self.node_proxy_daemon_set)),
            ]
            .into_iter()
            .filter(|(_, ready)| !ready)
            .map(|(kind, _)| kind)
            .collect();
            if missing.is_empty() {
                return;
            }
            let all = async {
                let _ = self.namespaces.wait_until_ready().await;
                let _ = self.service_accounts.wait_until_ready().await;
                let _ = self.pods.wait_until_ready().await;
                let _ = self.services.wait_until_ready().await;
                let _ = self.endpoint_slices.wait_until_ready().await;
                let _ = self.authorization_policies.wait_until_ready().await;
                let _ = self.mtls_policies.wait_until_ready().await;
                let _ = self.traffic_policies.wait_until_ready().await;
                let _ = self.node_proxy_daemon_set.wait_until_ready().await;
            };
            if tokio::time::timeout(WAITING_LOG_EVERY, all).await.is_err() {
                warn!(
                    ?missing,
                    "still waiting for the first list from the API server"
                );
            }
        }
    }

    /// The stores as a cluster state, built on `previous`: an object the
    /// stores still hold as they did is shared, not copied or compared
    /// (the state holds the stores' own `Arc`s), so this costs a pointer
    /// comparison per object and a copy-on-write per change.
    fn snapshot(&self, previous: &ClusterState) -> ClusterState {
        let mut state = previous.clone();
        sync(&mut state.namespaces, &self.namespaces, false);
        sync(&mut state.service_accounts, &self.service_accounts, true);
        sync(&mut state.pods, &self.pods, true);
        sync(&mut state.services, &self.services, true);
        sync(&mut state.endpoint_slices, &self.endpoint_slices, true);
        sync(
            &mut state.authorization_policies,
            &self.authorization_policies,
            true,
        );
        sync(&mut state.mtls_policies, &self.mtls_policies, true);
        sync(&mut state.traffic_policies, &self.traffic_policies, true);
        sync(&mut state.daemon_sets, &self.node_proxy_daemon_set, true);
        state
    }
}

/// Brings `objects` to what `store` holds, keyed `<namespace>/<name>` (or
/// `<name>` when not `namespaced`, as [`crate::cluster::ClusterObject::key`]
/// does).
fn sync<K>(objects: &mut Objects<K>, store: &Store<K>, namespaced: bool)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let listed = store.state();
    let mut keys = std::collections::HashSet::with_capacity(listed.len());
    for object in listed {
        let meta = object.meta();
        let name = meta.name.as_deref().unwrap_or("");
        let key = match meta.namespace.as_deref() {
            Some(namespace) if namespaced => format!("{namespace}/{name}"),
            _ => name.to_owned(),
        };
        if !objects
            .get(&key)
            .is_some_and(|held| Arc::ptr_eq(held, &object))
        {
            objects.insert(key.clone(), object);
        }
        keys.insert(key);
    }
    if objects.len() > keys.len() {
        let gone: Vec<ObjectKey> = objects
            .keys()
            .filter(|key| !keys.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            objects.remove(&key);
        }
    }
}

fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some()
}

/// Starts watching the cluster through `client`. Returns once every kind has
/// been listed, with a receiver of states (the first already there). Watch
/// failures are logged, counted in `watch_errors` and retried with backoff;
/// the last state stays in force meanwhile. Runs until the receiver is gone.
pub async fn watch_cluster(
    client: kube::Client,
    mesh_namespace: &str,
    watch_errors: Counter,
) -> watch::Receiver<Arc<ClusterState>> {
    let (tick_tx, mut ticks) = mpsc::unbounded_channel();
    let all = watcher::Config::default();
    let node_proxies =
        watcher::Config::default().fields(&format!("metadata.name={NODE_PROXY_DAEMONSET}"));
    let stores = Stores {
        namespaces: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        service_accounts: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        pods: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        services: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        endpoint_slices: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        authorization_policies: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        mtls_policies: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        traffic_policies: watch_kind(Api::all(client.clone()), &all, &tick_tx, &watch_errors),
        node_proxy_daemon_set: watch_kind(
            Api::namespaced(client, mesh_namespace),
            &node_proxies,
            &tick_tx,
            &watch_errors,
        ),
    };
    drop(tick_tx);
    stores.wait_until_ready().await;
    let first = Arc::new(stores.snapshot(&ClusterState::default()));
    info!(
        namespaces = first.namespaces.len(),
        pods = first.pods.len(),
        services = first.services.len(),
        "listed the cluster"
    );
    let (state_tx, state_rx) = watch::channel(first);
    tokio::spawn(async move {
        while ticks.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while ticks.try_recv().is_ok() {}
            // Reading the stores costs a pointer comparison per object:
            // not on the async workers, which answer the proxies meanwhile.
            let copy = stores.clone();
            let previous = state_tx.borrow().clone();
            let Ok(state) = tokio::task::spawn_blocking(move || copy.snapshot(&previous)).await
            else {
                break; // the runtime is shutting down
            };
            if state_tx.send(Arc::new(state)).is_err() {
                break;
            }
        }
    });
    state_rx
}

/// Watches one kind into a store, ticking `changes` after each change.
fn watch_kind<K>(
    api: Api<K>,
    config: &watcher::Config,
    changes: &mpsc::UnboundedSender<()>,
    errors: &Counter,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config.clone())
        .default_backoff()
        .modify(|object: &mut K| {
            // Neither is read, and on large clusters they are most of the bytes.
            object.meta_mut().managed_fields = None;
            object.annotations_mut().remove(LAST_APPLIED);
        })
        .reflect(writer);
    let (changes, errors) = (changes.clone(), errors.clone());
    tokio::spawn(async move {
        let mut stream = pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    if changes.send(()).is_err() {
                        break;
                    }
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(error) => {
                    errors.inc();
                    warn!(%kind, %error, "watch failed; retrying with backoff, the last state stays");
                }
            }
        }
    });
    reader
}
