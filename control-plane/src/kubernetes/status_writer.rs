//! Writes the conditions of [`crate::status::verdicts`] into the `status` of
//! weft's objects, while this replica holds the Lease. An object is written
//! only when what it says differs from the verdict (timestamps aside), so
//! the control plane's own writes, which come back through its watches, do
//! not cause more writes.

use std::fmt::Debug;
use std::sync::Arc;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cluster::ClusterState;
use crate::crd::PolicyStatus;
use crate::status::{Kind, Verdict, verdicts};

/// Field manager of the control plane's status writes.
const FIELD_MANAGER: &str = "weft-control-plane";

/// Keeps weft objects' status up to date with the cluster, while `leader`
/// says this replica holds the Lease. Runs until `cluster` closes.
pub async fn write_statuses(
    client: kube::Client,
    mut cluster: watch::Receiver<Arc<ClusterState>>,
    mut leader: watch::Receiver<bool>,
    mesh_namespace: String,
) {
    loop {
        if *leader.borrow_and_update() {
            let state = cluster.borrow_and_update().clone();
            write_all(&client, &state, &mesh_namespace).await;
        }
        tokio::select! {
            changed = cluster.changed() => if changed.is_err() { return },
            changed = leader.changed() => if changed.is_err() { return },
        }
    }
}

async fn write_all(client: &kube::Client, cluster: &ClusterState, mesh_namespace: &str) {
    for ((kind, key), verdict) in verdicts(cluster, mesh_namespace) {
        match kind {
            Kind::AuthorizationPolicy => {
                if let Some(object) = cluster.authorization_policies.get(&key) {
                    write_one(client, object.as_ref(), object.status.as_ref(), &verdict).await;
                }
            }
            Kind::MtlsPolicy => {
                if let Some(object) = cluster.mtls_policies.get(&key) {
                    write_one(client, object.as_ref(), object.status.as_ref(), &verdict).await;
                }
            }
            Kind::TrafficPolicy => {
                if let Some(object) = cluster.traffic_policies.get(&key) {
                    write_one(client, object.as_ref(), object.status.as_ref(), &verdict).await;
                }
            }
        }
    }
}

async fn write_one<K>(
    client: &kube::Client,
    object: &K,
    current: Option<&PolicyStatus>,
    verdict: &[Verdict],
) where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let generation = object.meta().generation;
    let mut status = current.cloned().unwrap_or_default();
    for v in verdict {
        status.set_condition(generation, v.type_, v.status, v.reason, v.message.clone());
    }
    if current.is_some_and(|current| same(current, &status)) {
        return;
    }
    let (Some(namespace), name) = (object.namespace(), object.name_any()) else {
        return;
    };
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
    {
        Ok(_) => {
            debug!(kind = %K::kind(&()), object = %format!("{namespace}/{name}"), "wrote status")
        }
        Err(error) => {
            warn!(kind = %K::kind(&()), object = %format!("{namespace}/{name}"), %error, "writing status failed; retried on the next change")
        }
    }
}

/// Whether two statuses say the same (transition times aside).
fn same(a: &PolicyStatus, b: &PolicyStatus) -> bool {
    let key = |s: &PolicyStatus| {
        let mut conditions: Vec<_> = s
            .conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                    c.observed_generation,
                )
            })
            .collect();
        conditions.sort();
        (conditions, s.observed_generation)
    };
    key(a) == key(b)
}
