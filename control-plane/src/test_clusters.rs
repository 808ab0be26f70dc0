//! Random clusters for the property tests of the mesh and the fan-out:
//! a fixed set of object slots, each holding a random variant or nothing,
//! so that a test can re-roll every slot (a new cluster) or one (a single
//! change).

use crate::cluster::ClusterState;

/// The nodes of the random clusters.
pub const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// A small deterministic generator (xorshift), so a failure repeats.
pub struct Dice(pub u64);

impl Dice {
    /// A number below `sides`.
    pub fn roll(&mut self, sides: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % sides as u64) as usize
    }
}

/// How many slots a cluster has.
pub const SLOTS: usize = 22;

/// A random variant of the object in `slot` (YAML), or nothing. Pods have
/// labels, nodes and IPs that collide now and then and are sometimes
/// being deleted; Services have endpoints naming pods; policies select by
/// label, in the pods' namespaces and mesh-wide; namespaces turn the mesh
/// on and off.
pub fn random_object(dice: &mut Dice, slot: usize) -> Option<String> {
    match slot {
        0 | 1 => {
            let ns = ["shop", "bank"][slot];
            let label = ["enabled", "disabled"][dice.roll(2)];
            Some(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{weft.dev/mesh: {label}}}}}\n"
            ))
        }
        2..=9 => {
            let pod = slot - 2;
            if dice.roll(5) == 0 {
                return None;
            }
            let ns = ["shop", "bank"][pod % 2];
            let node = NODES[(pod + dice.roll(4) / 3) % 3];
            let app = ["web", "db"][dice.roll(2)];
            let tier = ["a", "b", "c"][dice.roll(3)];
            let ip = format!("10.244.0.{}", pod + dice.roll(10) / 9);
            let deleting = if dice.roll(6) == 0 {
                ", deletionTimestamp: \"2026-01-01T00:00:00Z\""
            } else {
                ""
            };
            Some(format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{pod}, namespace: {ns}, labels: {{app: {app}, tier: {tier}}}{deleting}}}\nspec: {{nodeName: {node}, serviceAccountName: {app}, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
            ))
        }
        10..=13 => {
            let service = ["web", "db"][slot % 2];
            if dice.roll(4) == 0 {
                return None;
            }
            if slot < 12 {
                let port = 8000 + dice.roll(2);
                return Some(format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}, namespace: shop}}\nspec: {{clusterIP: 10.96.0.{}, ports: [{{port: {port}}}]}}\n",
                    port - 7990
                ));
            }
            // Two endpoints: one being deleted matters while the other is
            // ready (with none ready, the terminating ones serve).
            let endpoint = |dice: &mut Dice| {
                let ready = ["true", "false"][dice.roll(2)];
                let target = dice.roll(4) * 2; // a shop pod
                format!(
                    "{{addresses: [10.244.0.{target}], conditions: {{ready: {ready}}}, targetRef: {{kind: Pod, name: p{target}, namespace: shop}}}}"
                )
            };
            let endpoints = [endpoint(dice), endpoint(dice)].join(", ");
            Some(format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{endpoints}]\nports: [{{port: {}}}]\n",
                8000 + dice.roll(2)
            ))
        }
        14..=17 => {
            if dice.roll(3) == 0 {
                return None;
            }
            let policy = slot - 14;
            // The last one lives in the control plane's namespace: mesh-wide.
            let ns = if policy == 3 {
                "weft-system"
            } else {
                ["shop", "bank"][dice.roll(2)]
            };
            let selector = if dice.roll(3) == 0 {
                String::new()
            } else {
                format!(
                    "selector: {{matchLabels: {{tier: {}}}}}, ",
                    ["a", "b", "c"][dice.roll(3)]
                )
            };
            let action = ["ALLOW", "DENY", "AUDIT"][dice.roll(3)];
            // Now and then an invalid one (an address block that is none).
            let rule = [
                "{to: {ports: [80]}}",
                "{to: {ports: [81]}}",
                "{from: {ipBlocks: [10.0.0.0/99]}}",
            ][dice.roll(3)];
            Some(format!(
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{policy}, namespace: {ns}}}\nspec: {{{selector}action: {action}, rules: [{rule}]}}\n"
            ))
        }
        18..=20 => {
            if dice.roll(3) == 0 {
                return None;
            }
            let policy = slot - 18;
            let ns = ["shop", "bank", "weft-system"][policy];
            let mode = ["STRICT", "PERMISSIVE"][dice.roll(2)];
            let selector = if dice.roll(2) == 0 {
                String::new()
            } else {
                format!(
                    "selector: {{matchLabels: {{app: {}}}}}, ",
                    ["web", "db"][dice.roll(2)]
                )
            };
            Some(format!(
                "apiVersion: weft.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {{name: m{policy}, namespace: {ns}}}\nspec: {{{selector}mode: {mode}}}\n"
            ))
        }
        _ => {
            if dice.roll(2) == 0 {
                return None;
            }
            Some(format!(
                "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t, namespace: shop}}\nspec: {{service: web, connectTimeout: {}ms}}\n",
                100 + dice.roll(3) * 100
            ))
        }
    }
}

/// The cluster of `slots`.
pub fn cluster_of(slots: &[Option<String>]) -> ClusterState {
    let yaml: Vec<&str> = slots.iter().flatten().map(String::as_str).collect();
    ClusterState::from_yaml(&yaml.join("---\n"))
}

/// Every slot rolled afresh.
pub fn random_slots(dice: &mut Dice) -> Vec<Option<String>> {
    (0..SLOTS).map(|slot| random_object(dice, slot)).collect()
}

/// A whole random cluster.
pub fn random_cluster(dice: &mut Dice) -> ClusterState {
    cluster_of(&random_slots(dice))
}
