//! The mesh after a change of the cluster, re-deriving only what the change
//! touches: the two snapshots are compared with [`imbl::OrdMap::diff`],
//! which skips what they share, and each changed object marks what depends
//! on it.
//!
//! What depends on what (the rules of [`crate::mesh`] and
//! [`crate::policy`]):
//! - a workload on its pod, its Namespace (the mesh label), and the
//!   AuthorizationPolicies and MtlsPolicies of its namespace and of the
//!   control plane's namespace (mesh-wide), and on the trust domain;
//! - its quarantine on every workload claiming one of its IPs;
//! - a Service on itself, its namespace's EndpointSlices and
//!   TrafficPolicies, and whether the pods its endpoints name are being
//!   deleted.
//!
//! A change to a policy of the control plane's namespace, or of the trust
//! domain, re-derives every workload; anything else, its namespace at most.
//! [`Mesh::derive`] is this step from an empty cluster, so there is one
//! derivation, and the tests check that stepping through changes gives
//! what deriving afresh gives.

use std::collections::BTreeSet;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use weft_api::v1 as pb;

use crate::cluster::{ClusterState, Objects, in_namespace};
use crate::mesh::{
    MESH_LABEL, Mesh, MeshWorkload, NODE_PROXY_DAEMONSET, UNINSTALL_ANNOTATION, service_of,
    workload_of,
};
use crate::policy::AuthorizationPolicies;

impl Mesh {
    /// The mesh of `after`, this being the mesh of `before`.
    pub fn next(
        &self,
        before: &ClusterState,
        after: &ClusterState,
        trust: pb::TrustBundle,
        mesh_namespace: &str,
    ) -> Mesh {
        let mut mesh = self.clone();
        let trust_domain_changed = mesh.trust.trust_domain != trust.trust_domain;
        mesh.trust = trust;

        // Policies, and the namespaces whose workloads they may reach.
        let mut policies = AuthorizationPolicies {
            mesh_namespace: mesh_namespace.to_owned(),
            valid: mesh.authorization_policies.clone(),
            invalid: mesh.invalid_authorization_policies.clone(),
        };
        let mut workload_namespaces = BTreeSet::new();
        for key in changed(
            &before.authorization_policies,
            &after.authorization_policies,
        ) {
            let policy = after.authorization_policies.get(&key).map(|p| &**p);
            if policies.set(&key, policy) {
                let problem = &policies.invalid[&key];
                tracing::warn!(policy = %key, %problem, "AuthorizationPolicy is invalid: not sent; the pods it selects refuse every connection (an AUDIT one is only left out)");
            }
            workload_namespaces.insert(namespace_of(&key).to_owned());
        }
        for key in changed(&before.mtls_policies, &after.mtls_policies) {
            workload_namespaces.insert(namespace_of(&key).to_owned());
        }
        let namespaces = changed(&before.namespaces, &after.namespaces);
        workload_namespaces.extend(namespaces.iter().cloned());
        mesh.authorization_policies = policies.valid.clone();
        mesh.invalid_authorization_policies = policies.invalid.clone();

        // Workloads.
        let everything = trust_domain_changed || workload_namespaces.contains(mesh_namespace);
        let mut dirty: BTreeSet<String> = changed(&before.pods, &after.pods);
        if everything {
            dirty.extend(after.pods.keys().cloned());
            dirty.extend(mesh.workloads.keys().cloned());
        } else {
            for namespace in &workload_namespaces {
                dirty.extend(in_namespace(&after.pods, namespace).map(|(key, _)| key.clone()));
            }
        }
        let trust_domain = mesh.trust.trust_domain.clone();
        let mut claimed = BTreeSet::new();
        for uid in &dirty {
            let workload = after
                .pods
                .get(uid)
                .and_then(|pod| workload_of(after, &policies, uid, pod, &trust_domain));
            let old = match workload {
                Some(workload) => {
                    claimed.extend(workload.workload.ips.iter().cloned());
                    mesh.workloads.insert(uid.clone(), Arc::new(workload))
                }
                None => mesh.workloads.remove(uid),
            };
            if let Some(old) = old {
                claimed.extend(old.workload.ips.iter().cloned());
            }
        }
        mesh.quarantine(&dirty, &claimed);

        // Services.
        let mut service_namespaces: BTreeSet<String> = BTreeSet::new();
        for key in changed(&before.endpoint_slices, &after.endpoint_slices)
            .into_iter()
            .chain(changed(&before.traffic_policies, &after.traffic_policies))
        {
            service_namespaces.insert(namespace_of(&key).to_owned());
        }
        for item in before.pods.diff(&after.pods) {
            // Services read of a pod only whether it is being deleted.
            let (key, was, is) = match item {
                DiffItem::Add(key, pod) => (key, false, deleting(pod)),
                DiffItem::Update { old, new } => (old.0, deleting(old.1), deleting(new.1)),
                DiffItem::Remove(key, pod) => (key, deleting(pod), false),
            };
            if was != is {
                service_namespaces.insert(namespace_of(key).to_owned());
            }
        }
        for key in changed(&before.traffic_policies, &after.traffic_policies) {
            if let Some(traffic) = after.traffic_policies.get(&key) {
                let namespace = traffic.metadata.namespace.as_deref().unwrap_or("");
                if let Err(problem) = crate::traffic::to_wire(&key, namespace, traffic) {
                    tracing::warn!(policy = %key, %problem, "TrafficPolicy is invalid: it configures nothing");
                }
            }
        }
        let mut services = changed(&before.services, &after.services);
        for namespace in &service_namespaces {
            services.extend(in_namespace(&after.services, namespace).map(|(key, _)| key.clone()));
        }
        for key in services {
            match after.services.get(&key) {
                Some(service) => {
                    mesh.services
                        .insert(key, Arc::new(service_of(after, service)));
                }
                None => {
                    mesh.services.remove(&key);
                }
            }
        }

        // The mesh as a whole.
        mesh.uninstalling = after
            .daemon_sets
            .get(&format!("{mesh_namespace}/{NODE_PROXY_DAEMONSET}"))
            .and_then(|daemon_set| daemon_set.metadata.annotations.as_ref())
            .and_then(|annotations| annotations.get(UNINSTALL_ANNOTATION))
            .is_some_and(|value| value == "true");
        if !namespaces.is_empty() {
            mesh.meshed_namespaces = after
                .namespaces
                .iter()
                .filter(|(_, namespace)| {
                    namespace
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(MESH_LABEL))
                        .is_some_and(|value| value == "enabled")
                })
                .map(|(name, _)| name.clone())
                .collect();
        }
        mesh
    }

    /// Brings the IP claims of the `dirty` workloads up to date, and the
    /// quarantine of every workload claiming one of the `claimed` IPs (the
    /// dirty ones' IPs, before and after). An address claimed by two pods
    /// names neither, and is never resolved by which pod sorts first: every
    /// pod that claims it is quarantined (it keeps its addresses, so its
    /// traffic stays captured, and refuses every connection), which is
    /// logged, until only one claims it.
    fn quarantine(&mut self, dirty: &BTreeSet<String>, claimed: &BTreeSet<String>) {
        // The dirty workloads' claims as they are now, by IP.
        let mut now: std::collections::BTreeMap<&str, Vec<&String>> = Default::default();
        for uid in dirty {
            for ip in self
                .workloads
                .get(uid)
                .into_iter()
                .flat_map(|w| &w.workload.ips)
            {
                now.entry(ip.as_str()).or_default().push(uid);
            }
        }
        for ip in claimed {
            let owners: imbl::OrdSet<String> = self
                .ip_owners
                .get(ip)
                .into_iter()
                .flatten()
                .filter(|uid| !dirty.contains(*uid))
                .chain(now.get(ip.as_str()).into_iter().flatten().copied())
                .cloned()
                .collect();
            if owners.is_empty() {
                self.ip_owners.remove(ip);
            } else {
                if owners.len() > 1 {
                    tracing::warn!(%ip, pods = ?owners, "an IP is claimed by more than one pod; they refuse every connection until one remains");
                }
                self.ip_owners.insert(ip.clone(), owners);
            }
        }
        let mut affected: BTreeSet<&String> = dirty.iter().collect();
        let owners_of_claimed: Vec<String> = claimed
            .iter()
            .filter_map(|ip| self.ip_owners.get(ip))
            .flatten()
            .cloned()
            .collect();
        affected.extend(owners_of_claimed.iter());
        for uid in affected {
            let Some(workload) = self.workloads.get(uid) else {
                continue;
            };
            // The reason of its greatest shared IP, as in IP order the
            // last one set wins.
            let reason = workload
                .workload
                .ips
                .iter()
                .filter_map(|ip| Some((ip, self.ip_owners.get(ip)?)))
                .filter(|(_, owners)| owners.len() > 1)
                .max_by(|a, b| a.0.cmp(b.0))
                .map(|(ip, owners)| {
                    let pods: Vec<&str> = owners.iter().map(String::as_str).collect();
                    format!("IP {ip} is claimed by pods {}", pods.join(", "))
                })
                .unwrap_or_default();
            if workload.workload.quarantine != reason {
                let mut updated = MeshWorkload::clone(workload);
                updated.workload.quarantine = reason;
                self.workloads.insert(uid.clone(), Arc::new(updated));
            }
        }
    }
}

/// The keys whose objects differ between `before` and `after`.
fn changed<T: PartialEq>(before: &Objects<T>, after: &Objects<T>) -> BTreeSet<String> {
    crate::mesh_change::changed_keys(before, after)
        .into_keys()
        .collect()
}

/// The namespace of a `<namespace>/<name>` key (the key itself for a
/// cluster-scoped object).
fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(namespace, _)| namespace)
}

fn deleting(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_clusters::{Dice, SLOTS, cluster_of, random_object, random_slots};

    fn trust(domain: &str) -> pb::TrustBundle {
        pb::TrustBundle {
            trust_domain: domain.into(),
            roots_pem: "roots".into(),
        }
    }

    /// Walks `steps` clusters, each from the last by re-rolling `changes`
    /// slots (all of them: a new cluster); the mesh brought along by
    /// [`Mesh::next`] must be the mesh derived afresh.
    fn walk(seed: u64, steps: usize, changes: usize) -> usize {
        let mut dice = Dice(seed);
        let mut slots = random_slots(&mut dice);
        let mut cluster = cluster_of(&slots);
        let mut mesh = Mesh::derive(&cluster, trust("cluster.local"), "weft-system");
        let mut quarantined = 0;
        for step in 0..steps {
            for _ in 0..changes {
                let slot = dice.roll(SLOTS);
                slots[slot] = random_object(&mut dice, slot);
            }
            let domain = if dice.roll(40) == 0 {
                "other.local"
            } else {
                "cluster.local"
            };
            let next = cluster_of(&slots);
            mesh = mesh.next(&cluster, &next, trust(domain), "weft-system");
            let fresh = Mesh::derive(&next, trust(domain), "weft-system");
            assert_eq!(mesh, fresh, "seed {seed} step {step}");
            quarantined += mesh
                .workloads
                .values()
                .filter(|w| !w.workload.quarantine.is_empty())
                .count();
            cluster = next;
        }
        quarantined
    }

    #[test]
    fn one_change_at_a_time_gives_the_mesh_derived_afresh() {
        let quarantined: usize = (1..=20).map(|seed| walk(seed * 7_919, 100, 1)).sum();
        assert!(quarantined > 0, "the walks met shared IPs");
    }

    #[test]
    fn several_changes_at_once_give_the_mesh_derived_afresh() {
        for seed in 1..=10 {
            walk(seed * 104_729, 50, 3);
        }
    }

    #[test]
    fn new_clusters_give_the_mesh_derived_afresh() {
        for seed in 1..=10 {
            walk(seed * 31, 30, SLOTS * 2);
        }
    }

    #[test]
    fn a_change_shares_what_it_did_not_touch() {
        let mut dice = Dice(42);
        let mut slots = random_slots(&mut dice);
        // Every pod there, none being deleted, the mesh label on.
        for pod in 0..8 {
            slots[2 + pod] = Some(format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{pod}, namespace: {}}}\nspec: {{nodeName: node-1, serviceAccountName: web, containers: []}}\nstatus: {{phase: Running, podIP: 10.244.1.{pod}}}\n",
                ["shop", "bank"][pod % 2]
            ));
        }
        let before = cluster_of(&slots);
        let mesh = Mesh::derive(&before, trust("cluster.local"), "weft-system");
        slots[2] = slots[2]
            .as_ref()
            .map(|pod| pod.replace("10.244.1.0", "10.244.1.100"));
        let after = cluster_of(&slots);
        let next = mesh.next(&before, &after, trust("cluster.local"), "weft-system");
        let same: Vec<&String> = mesh
            .workloads
            .iter()
            .filter(|(uid, w)| Arc::ptr_eq(w, &next.workloads[*uid]))
            .map(|(uid, _)| uid)
            .collect();
        assert_eq!(same.len(), 7, "only shop/p0 was derived again: {same:?}");
        assert!(!same.contains(&&"shop/p0".to_owned()));
    }
}
