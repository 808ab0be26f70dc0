//! The simulated cluster of the control-plane scenario: N nodes and P pods in
//! the proportions of a real one, written as the local manifests the control
//! plane reads, one file per namespace, and changed one pod at a time.
//!
//! Pod `i` (from 0) belongs to app `i / 5` and namespace `i / 100` (20 apps
//! of 5 pods each), runs on node `i % N + 1`, and starts with the IP
//! `10.1.0.1 + i`. Each namespace is labelled meshed and holds, per app, a
//! ServiceAccount, a Service (ClusterIP from 10.96.0.0/12) and its one
//! EndpointSlice, the app's pods (owned by a ReplicaSet `<app>-<hash>`), and
//! one AuthorizationPolicy (ALLOW from the same namespace to the first app).
//! A changed pod gets a fresh IP from 10.128.0.1 on; its EndpointSlice
//! follows, as the EndpointSlice controller's would.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Pods of one app (one ReplicaSet, one Service).
pub const PODS_PER_APP: u32 = 5;
/// Apps of one namespace.
pub const APPS_PER_NAMESPACE: u32 = 20;
/// Pods of one namespace, so of one manifest file.
pub const PODS_PER_NAMESPACE: u32 = PODS_PER_APP * APPS_PER_NAMESPACE;
/// The port every app serves on.
const APP_PORT: u16 = 8080;
/// Pod `i` starts at this address plus `i`.
const FIRST_POD_IP: u32 = u32::from_be_bytes([10, 1, 0, 1]);
/// Changed pods get addresses from here on, never one used before.
const FIRST_CHANGED_IP: u32 = u32::from_be_bytes([10, 128, 0, 1]);
/// App `a`'s Service gets this address plus `a`, within 10.96.0.0/12.
const FIRST_CLUSTER_IP: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// The most pods the address plan has room for: the initial addresses stay
/// below the changed ones, the Services within 10.96.0.0/12.
pub const MAX_PODS: u32 = 1_000_000;

/// The cluster as the manifests on disk describe it.
pub struct Cluster {
    dir: PathBuf,
    nodes: u32,
    /// Each pod's current IP.
    ips: Vec<Ipv4Addr>,
    /// Each pod's `revision` label, bumped by a label-only change (0: none).
    revisions: Vec<u32>,
    next_ip: u32,
}

impl Cluster {
    /// `pods` pods over `nodes` nodes, with manifests in `dir` (not written
    /// yet: see [`Cluster::write_all`]).
    pub fn new(dir: &Path, nodes: u32, pods: u32) -> Result<Cluster> {
        if nodes == 0 || pods == 0 || pods > MAX_PODS {
            bail!(
                "a cluster needs at least one node and 1 to {MAX_PODS} pods, not {nodes} nodes and {pods} pods"
            );
        }
        Ok(Cluster {
            dir: dir.to_owned(),
            nodes,
            ips: (0..pods)
                .map(|i| Ipv4Addr::from(FIRST_POD_IP + i))
                .collect(),
            revisions: vec![0; pods as usize],
            next_ip: FIRST_CHANGED_IP,
        })
    }

    /// Number of pods.
    pub fn pods(&self) -> u32 {
        self.ips.len() as u32
    }

    /// Number of namespaces (manifest files).
    pub fn namespaces(&self) -> u32 {
        self.pods().div_ceil(PODS_PER_NAMESPACE)
    }

    /// Number of apps, so of Services.
    pub fn apps(&self) -> u32 {
        self.pods().div_ceil(PODS_PER_APP)
    }

    /// `node-1` .. `node-N`.
    pub fn node_name(node: u32) -> String {
        format!("node-{node}")
    }

    /// The node (1-based) pod `pod` runs on.
    pub fn node_of(&self, pod: u32) -> u32 {
        pod % self.nodes + 1
    }

    /// The pod's key on the wire, `<namespace>/<name>`.
    pub fn uid(&self, pod: u32) -> String {
        format!(
            "{}/{}",
            namespace_name(pod / PODS_PER_NAMESPACE),
            pod_name(pod)
        )
    }

    /// The pod's workload as proxies name it, `<namespace>/<app>` (its
    /// ReplicaSet's Deployment).
    pub fn workload(&self, pod: u32) -> String {
        format!(
            "{}/{}",
            namespace_name(pod / PODS_PER_NAMESPACE),
            app_name((pod / PODS_PER_APP) % APPS_PER_NAMESPACE)
        )
    }

    /// The pods on `node` (1-based).
    pub fn pods_on(&self, node: u32) -> impl Iterator<Item = u32> {
        (node - 1..self.pods()).step_by(self.nodes as usize)
    }

    /// The pod's current IP.
    pub fn ip(&self, pod: u32) -> Ipv4Addr {
        self.ips[pod as usize]
    }

    /// Moves `pod` to a fresh IP (in memory; see [`Cluster::write_pod`]).
    pub fn move_pod(&mut self, pod: u32) -> Ipv4Addr {
        let ip = Ipv4Addr::from(self.next_ip);
        self.next_ip += 1;
        self.ips[pod as usize] = ip;
        ip
    }

    /// Changes one label of `pod` and nothing else (in memory).
    pub fn relabel_pod(&mut self, pod: u32) {
        self.revisions[pod as usize] += 1;
    }

    /// Writes every namespace's file and the node tokens; returns the number
    /// of files and their total size in bytes.
    pub fn write_all(&self, tokens: &Path) -> Result<(u32, u64)> {
        let mut bytes = 0;
        for namespace in 0..self.namespaces() {
            bytes += self.write_namespace(namespace)? as u64;
        }
        let mut text = String::new();
        for node in 1..=self.nodes {
            let _ = writeln!(text, "{} {}", Cluster::node_name(node), token(node));
        }
        std::fs::write(tokens, text).with_context(|| format!("writing {}", tokens.display()))?;
        Ok((self.namespaces(), bytes))
    }

    /// Rewrites the file of `pod`'s namespace, atomically: a hidden temporary
    /// file (the control plane ignores those), then a rename over the old one.
    pub fn write_pod(&self, pod: u32) -> Result<()> {
        self.write_namespace(pod / PODS_PER_NAMESPACE).map(drop)
    }

    fn write_namespace(&self, namespace: u32) -> Result<usize> {
        let name = format!("{}.yaml", namespace_name(namespace));
        let path = self.dir.join(&name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let text = self.namespace_yaml(namespace);
        std::fs::write(&temporary, &text)
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))?;
        Ok(text.len())
    }

    /// The manifests of one namespace: the Namespace, its policy, then each
    /// app's ServiceAccount, Service, EndpointSlice and pods.
    fn namespace_yaml(&self, namespace: u32) -> String {
        let ns = namespace_name(namespace);
        let mut out = String::with_capacity(PODS_PER_NAMESPACE as usize * 1200);
        let _ = write!(
            out,
            "apiVersion: v1
kind: Namespace
metadata: {{name: {ns}, labels: {{weft.dev/mesh: enabled}}}}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {first}-from-{ns}, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: {first}}}}}
  action: ALLOW
  rules:
  - from: {{namespaces: [{ns}]}}
    to: {{ports: [{APP_PORT}]}}
",
            first = app_name(0),
        );
        let first_app = namespace * APPS_PER_NAMESPACE;
        let last_app = (first_app + APPS_PER_NAMESPACE).min(self.apps());
        for app in first_app..last_app {
            let pods = app * PODS_PER_APP..((app + 1) * PODS_PER_APP).min(self.pods());
            self.app_yaml(&mut out, &ns, app, pods);
        }
        out
    }

    fn app_yaml(&self, out: &mut String, ns: &str, app: u32, pods: std::ops::Range<u32>) {
        let name = app_name(app % APPS_PER_NAMESPACE);
        let hash = letters(u64::from(app), 10);
        let cluster_ip = Ipv4Addr::from(FIRST_CLUSTER_IP + app);
        let _ = write!(
            out,
            "---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: {ns}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  clusterIPs: [{cluster_ip}]
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{slice}
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {name}, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}
addressType: IPv4
ports: [{{name: http, port: {APP_PORT}, protocol: TCP}}]
endpoints:
",
            slice = letters(u64::from(app) << 20, 5),
        );
        for pod in pods.clone() {
            let _ = write!(
                out,
                "- addresses: [{ip}]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: {node}
  targetRef: {{kind: Pod, name: {pod_name}, namespace: {ns}, uid: {uid}}}
",
                ip = self.ip(pod),
                node = Cluster::node_name(self.node_of(pod)),
                pod_name = pod_name(pod),
                uid = object_uid(u64::from(pod)),
            );
        }
        for pod in pods {
            let revision = match self.revisions[pod as usize] {
                0 => String::new(),
                n => format!(", revision: r{n}"),
            };
            let _ = write!(
                out,
                "---
apiVersion: v1
kind: Pod
metadata:
  name: {pod_name}
  namespace: {ns}
  uid: {uid}
  labels: {{app: {name}, pod-template-hash: {hash}{revision}}}
  ownerReferences:
  - {{apiVersion: apps/v1, kind: ReplicaSet, name: {name}-{hash}, uid: {owner}, controller: true, blockOwnerDeletion: true}}
spec:
  nodeName: {node}
  serviceAccountName: {name}
  containers:
  - name: app
    image: registry.example/{name}:1.0
    ports: [{{name: http, containerPort: {APP_PORT}, protocol: TCP}}]
    readinessProbe: {{httpGet: {{path: /healthz, port: http}}}}
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
",
                pod_name = pod_name(pod),
                uid = object_uid(u64::from(pod)),
                owner = object_uid(u64::from(app) | 1 << 40),
                node = Cluster::node_name(self.node_of(pod)),
                ip = self.ip(pod),
            );
        }
    }
}

/// The bootstrap token of node `node` (at least 16 characters).
pub fn token(node: u32) -> String {
    format!("bench-{node:06}-{}", letters(u64::from(node) | 1 << 48, 16))
}

fn namespace_name(namespace: u32) -> String {
    format!("team-{namespace:04}")
}

fn app_name(app_in_namespace: u32) -> String {
    format!("svc-{app_in_namespace:02}")
}

/// `<app>-<ReplicaSet hash>-<5 letters>`, as a Deployment names its pods.
fn pod_name(pod: u32) -> String {
    let app = pod / PODS_PER_APP;
    format!(
        "{}-{}-{}",
        app_name(app % APPS_PER_NAMESPACE),
        letters(u64::from(app), 10),
        letters(u64::from(pod) | 1 << 32, 5)
    )
}

/// A stable UUID-shaped `metadata.uid` for object number `n`.
fn object_uid(n: u64) -> String {
    let a = mix(n);
    let b = mix(a);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// `len` characters of the alphabet Kubernetes names generated objects
/// with, derived from `seed`.
fn letters(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut state = mix(seed);
    (0..len)
        .map(|i| {
            if i == 12 {
                state = mix(state);
            }
            let c = ALPHABET[(state % ALPHABET.len() as u64) as usize];
            state /= ALPHABET.len() as u64;
            char::from(c)
        })
        .collect()
}

/// splitmix64's finaliser: a well-spread function of `x`.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportions_and_names_follow_the_plan() {
        let cluster = Cluster::new(Path::new("/nonexistent"), 3, 230).unwrap();
        assert_eq!(cluster.namespaces(), 3);
        assert_eq!(cluster.apps(), 46);
        assert_eq!(cluster.node_of(0), 1);
        assert_eq!(cluster.node_of(4), 2);
        assert_eq!(cluster.ip(1), Ipv4Addr::new(10, 1, 0, 2));
        assert!(cluster.uid(101).starts_with("team-0001/svc-00-"));
        assert!(token(7).len() >= 16);
    }

    #[test]
    fn a_namespace_file_holds_its_pods_and_follows_their_changes() {
        let mut cluster = Cluster::new(Path::new("/nonexistent"), 2, 7).unwrap();
        let yaml = cluster.namespace_yaml(0);
        assert_eq!(yaml.matches("\nkind: Pod\n").count(), 7);
        assert_eq!(yaml.matches("\nkind: EndpointSlice\n").count(), 2);
        assert_eq!(yaml.matches("\nkind: AuthorizationPolicy\n").count(), 1);
        let ip = cluster.move_pod(6);
        cluster.relabel_pod(5);
        let yaml = cluster.namespace_yaml(0);
        // The pod and its endpoint both carry the new address.
        assert_eq!(yaml.matches(&format!("{ip}")).count(), 3);
        assert!(yaml.contains("revision: r1"));
    }

    #[test]
    fn generated_names_are_distinct() {
        let names: std::collections::BTreeSet<_> = (0..10_000).map(pod_name).collect();
        assert_eq!(names.len(), 10_000);
        let uids: std::collections::BTreeSet<_> = (0..10_000).map(object_uid).collect();
        assert_eq!(uids.len(), 10_000);
    }
}
