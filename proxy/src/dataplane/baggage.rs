//! What a tunnel's source tells its destination about itself, in Istio's
//! baggage keys: built here from the node's config for the tunnels this
//! node opens, and checked here against the peer's proven identity for the
//! tunnels it serves.

use weft_certs::Identity;

use crate::hbone::{Baggage, WorkloadKind};
use crate::node_view::Workload;

/// The labels Istio reads a pod's canonical service from, in order; the
/// workload's name when none is set.
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];

/// The labels Istio reads a pod's canonical revision from, in order;
/// `latest` when none is set.
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// The baggage a tunnel from `source` carries, in cluster `cluster`.
pub fn for_source(cluster: &str, source: &Workload) -> Baggage {
    let label = |keys: [&str; 3]| {
        keys.iter()
            .find_map(|key| source.local().labels.get(*key))
            .filter(|value| !value.is_empty())
            .cloned()
    };
    // A pod whose workload is itself (no controller) is named as a pod.
    let kind = if source.is_named(source.workload_name()) {
        WorkloadKind::Pod
    } else {
        WorkloadKind::Deployment
    };
    Baggage {
        cluster: Some(cluster.to_owned()).filter(|c| !c.is_empty()),
        namespace: Some(source.namespace().to_string()),
        workload: Some(source.workload_name().to_string()),
        workload_kind: kind,
        service: label(CANONICAL_NAME_LABELS).or_else(|| Some(source.workload_name().to_string())),
        revision: label(CANONICAL_REVISION_LABELS).or_else(|| Some("latest".to_owned())),
    }
}

/// `baggage` as far as `peer` can vouch for it: a peer speaks only for its
/// own namespace (its identity's), and for the workload the config knows at
/// its address (`known`), so baggage naming another namespace or workload
/// is dropped whole, and so is baggage naming no namespace. What is left
/// (cluster, canonical service and revision) is the peer's word, for the
/// access log only, never for metric labels.
pub fn vouched_by(baggage: Baggage, peer: &Identity, known: Option<&Workload>) -> Option<Baggage> {
    let namespace = baggage.namespace.as_deref()?;
    let other_workload = match (known, baggage.workload.as_deref()) {
        (Some(known), Some(claimed)) => claimed != known.workload_name(),
        _ => false,
    };
    if namespace != peer.namespace() || other_workload {
        tracing::debug!(
            claimed_namespace = namespace,
            claimed_workload = baggage.workload.as_deref().unwrap_or(""),
            peer = %peer,
            "inbound: ignoring baggage that names another namespace or workload than the peer's"
        );
        return None;
    }
    Some(baggage)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    fn workload(name: &str, workload_name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload::new(
            format!("shop/{name}").into(),
            [].into_iter().collect(),
            "node-1",
            "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            workload_name,
            true,
            crate::node_view::LocalDetails {
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_deployments_pod_is_named_by_its_workload_and_labels() {
        let pod = workload(
            "web-5d4f-x2",
            "web",
            &[("app", "storefront"), ("version", "v3")],
        );
        let baggage = for_source("Kubernetes", &pod);
        assert_eq!(
            baggage.header().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,\
             service.name=storefront,service.version=v3"
        );
    }

    #[test]
    fn istios_labels_win_and_defaults_fill_the_rest() {
        let pod = workload(
            "web-0",
            "web",
            &[("app", "a"), ("service.istio.io/canonical-name", "canon")],
        );
        let baggage = for_source("", &pod);
        assert_eq!(baggage.service.as_deref(), Some("canon"));
        assert_eq!(baggage.revision.as_deref(), Some("latest"));
        assert_eq!(baggage.cluster, None);
        let bare = for_source("east", &workload("debug", "debug", &[]));
        assert_eq!(bare.workload_kind, WorkloadKind::Pod);
        assert_eq!(bare.service.as_deref(), Some("debug"));
    }

    #[test]
    fn a_peer_vouches_only_for_its_own_namespace() {
        let peer: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let mine = Baggage {
            namespace: Some("shop".into()),
            workload: Some("web".into()),
            ..Baggage::default()
        };
        assert_eq!(vouched_by(mine.clone(), &peer, None), Some(mine.clone()));
        let known = workload("web-0", "web", &[]);
        assert_eq!(vouched_by(mine.clone(), &peer, Some(&known)), Some(mine));
        let theirs = Baggage {
            namespace: Some("bank".into()),
            workload: Some("vault".into()),
            ..Baggage::default()
        };
        assert_eq!(vouched_by(theirs, &peer, None), None);
        assert_eq!(vouched_by(Baggage::default(), &peer, None), None);
        // Its own namespace, but another workload than the config knows.
        let neighbours = Baggage {
            namespace: Some("shop".into()),
            workload: Some("payments".into()),
            ..Baggage::default()
        };
        assert_eq!(vouched_by(neighbours, &peer, Some(&known)), None);
    }
}
