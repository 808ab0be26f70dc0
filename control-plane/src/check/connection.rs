//! The test connection: in a throwaway namespace of the mesh, a client pod
//! on one node connects again and again to a server pod on another; the
//! proxies' traffic reports (the dashboard's `/api/traffic`) must show the
//! pair's connections as mutual TLS, and, once a throwaway DENY for the
//! client's identity is in force, refused by that policy. The namespace is
//! deleted afterwards, also when a step fails (unless
//! `--keep-test-namespace`).
//!
//! The pods run the control plane's own image (`check-peer`, [`super::peer`]),
//! so nothing else needs pulling; they meet the `restricted` Pod Security
//! Standard.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::mesh::Replica;
use super::peer::ANSWER;
use super::{CheckArgs, CheckResult, Installation};
use crate::crd::AuthorizationPolicy;
use crate::mesh::MESH_LABEL;

/// The name of the check that stands for the whole test when it cannot run.
pub(super) const CHECK: &str = "test connection is mutual TLS";
/// Its name on a cluster where one node has a proxy.
const ONE_NODE_CHECK: &str = "test connection is meshed";
const DENY_CHECK: &str = "throwaway DENY refuses it";
/// Marks the throwaway namespaces (`kubectl delete ns -l weft.dev/check`).
const CHECK_LABEL: &str = "weft.dev/check";
/// The port the server pod listens on.
const SERVER_PORT: u16 = 8080;
/// How often the client connects.
const DIAL_EVERY_MS: u64 = 500;
/// How often the pods and the reports are looked at.
const POLL: Duration = Duration::from_millis(500);

/// One run of the test.
pub(super) struct Test<'a> {
    pub(super) client: &'a kube::Client,
    pub(super) replicas: &'a [Replica],
    /// Nodes whose proxy is connected.
    pub(super) nodes: &'a [String],
    pub(super) args: &'a CheckArgs,
    pub(super) installation: &'a Installation,
}

impl Test<'_> {
    /// Runs the test and removes its namespace: its two results (or why it
    /// could not run).
    pub(super) async fn run(&self) -> Vec<CheckResult> {
        let namespace = throwaway_name();
        let fail = |error: String| {
            vec![CheckResult::fail(
                CHECK,
                format!("in namespace {namespace}: {error}"),
                &format!(
                    "look at the pods (kubectl -n {namespace} describe pods; rerun with --keep-test-namespace) and the proxies' logs (kubectl -n {} logs ds/weft-node-proxy)",
                    self.installation.namespace
                ),
            )]
        };
        // Only a namespace this run created is deleted.
        if let Err(error) = self.create_namespace(&namespace).await {
            return fail(error);
        }
        let mut results = tokio::select! {
            outcome = self.in_namespace(&namespace) => outcome.unwrap_or_else(fail),
            _ = tokio::signal::ctrl_c() => fail("interrupted".into()),
        };
        if self.args.keep_test_namespace {
            for result in &mut results {
                result.detail += &format!(" (namespace {namespace} kept)");
            }
            return results;
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        match namespaces
            .delete(&namespace, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => results.push(CheckResult::fail(
                "throwaway namespace removed",
                format!("deleting {namespace}: {}", super::said(&error)),
                "delete it yourself: kubectl delete namespace -l weft.dev/check",
            )),
        }
        results
    }

    async fn create_namespace(&self, namespace: &str) -> Result<(), String> {
        let created = serde_json::from_value::<Namespace>(json!({
            "metadata": {
                "name": namespace,
                "labels": {MESH_LABEL: "enabled", CHECK_LABEL: "connection"},
            }
        }))
        .map_err(|e| e.to_string())?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &created)
            .await
            .map_err(|e| format!("creating the namespace: {}", super::said(&e)))?;
        Ok(())
    }

    async fn in_namespace(&self, namespace: &str) -> Result<Vec<CheckResult>, String> {
        let image = match &self.args.test_image {
            Some(image) => image.clone(),
            None => self.control_plane_image().await?,
        };
        let (server_node, client_node) = match self.nodes {
            [] => return Err("no node has a connected proxy".into()),
            [only] => (only.clone(), only.clone()),
            [first, second, ..] => (first.clone(), second.clone()),
        };
        // Pods that outlive the test (the namespace kept, or its deletion
        // failed) stop by themselves.
        let deadline_seconds = 2 * self.args.connection_test_timeout_seconds + 60;
        let peer_pod = |app: &str, node: &str, args: &[String]| {
            peer_pod(app, node, &image, args, deadline_seconds)
        };
        let client = self.client.clone();
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        for name in ["server", "client"] {
            let account = serde_json::from_value::<ServiceAccount>(json!({
                "metadata": {"name": name},
                "automountServiceAccountToken": false,
            }))
            .map_err(|e| e.to_string())?;
            accounts
                .create(&PostParams::default(), &account)
                .await
                .map_err(|e| format!("creating ServiceAccount {name}: {}", super::said(&e)))?;
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let serve = [
            "check-peer".to_owned(),
            "serve".into(),
            "--port".into(),
            SERVER_PORT.to_string(),
        ];
        pods.create(
            &PostParams::default(),
            &peer_pod("server", &server_node, &serve)?,
        )
        .await
        .map_err(|e| format!("creating the server pod: {}", super::said(&e)))?;
        let server_ip = self.running_pod_ip(&pods, "server").await?;
        let to = if server_ip.contains(':') {
            format!("[{server_ip}]:{SERVER_PORT}")
        } else {
            format!("{server_ip}:{SERVER_PORT}")
        };
        let dial = [
            "check-peer".to_owned(),
            "dial".into(),
            "--to".into(),
            to,
            "--every-ms".into(),
            DIAL_EVERY_MS.to_string(),
        ];
        pods.create(
            &PostParams::default(),
            &peer_pod("client", &client_node, &dial)?,
        )
        .await
        .map_err(|e| format!("creating the client pod: {}", super::said(&e)))?;
        self.running_pod_ip(&pods, "client").await?;

        let (source, destination) = (format!("{namespace}/client"), format!("{namespace}/server"));
        let mut results = Vec::new();
        let same_node = server_node == client_node;
        // On a cluster of one node, the pair never leaves its proxy.
        let (check, expected) = if same_node {
            (ONE_NODE_CHECK, "node_local")
        } else {
            (CHECK, "mutual_tls")
        };
        // The server's proxy says so, and the server's answer went through.
        let answered = |edge: &Value| {
            let bytes = edge["bytes_sent"].as_u64().unwrap_or(0)
                + edge["bytes_received"].as_u64().unwrap_or(0);
            edge["reported_by"] == "destination"
                && edge["opened"].as_u64().unwrap_or(0) > 0
                && bytes >= ANSWER.len() as u64
        };
        let edge = self
            .wait_for_edge(namespace, &source, &destination, answered)
            .await;
        match edge {
            Some(edge) if edge["security"] == expected => results.push(CheckResult::pass(
                check,
                format!(
                    "{source} on {client_node} → {destination} on {server_node}: {} answered, {}",
                    connections(&edge["opened"]),
                    if same_node {
                        "inside the node's proxy (only one node has a connected proxy, so no tunnel between nodes was tested)"
                    } else {
                        "mutual TLS between the nodes"
                    }
                ),
            )),
            Some(edge) => {
                return Ok(vec![CheckResult::fail(
                    check,
                    format!(
                        "{source} → {destination} was reported as {} (expected {expected})",
                        edge["security"]
                    ),
                    &format!("the pods' traffic is not in the mesh's tunnel: look at the proxies' logs (kubectl -n {} logs ds/weft-node-proxy)", self.installation.namespace),
                )]);
            }
            None => {
                return Ok(vec![CheckResult::fail(
                    check,
                    format!(
                        "no answered connection {source} → {destination} reported by the server's proxy within {} s",
                        self.args.connection_test_timeout_seconds
                    ),
                    "the proxies report every 10 s: look at the client pod's log (it prints each attempt) and the proxies' logs; rerun with --keep-test-namespace",
                )]);
            }
        }

        let principal = format!(
            "spiffe://{}/ns/{namespace}/sa/client",
            self.installation.trust_domain
        );
        let policy = serde_json::from_value::<AuthorizationPolicy>(json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-client", "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": {"app": "server"}},
                "action": "DENY",
                "rules": [{"from": {"principals": [principal]}}],
            }
        }))
        .map_err(|e| format!("building the DENY: {e}"))?;
        Api::<AuthorizationPolicy>::namespaced(client, namespace)
            .create(&PostParams::default(), &policy)
            .await
            .map_err(|e| format!("creating the DENY: {}", super::said(&e)))?;
        let policy_name = format!("{namespace}/deny-client");
        let refused = self
            .wait_for_edge(namespace, &source, &destination, |edge| {
                edge["denied"][&policy_name].as_u64().unwrap_or(0) > 0
            })
            .await;
        results.push(match refused {
            Some(edge) => CheckResult::pass(
                DENY_CHECK,
                format!(
                    "{} refused by {policy_name}",
                    connections(&edge["denied"][&policy_name])
                ),
            ),
            None => CheckResult::fail(
                DENY_CHECK,
                format!(
                    "no connection {source} → {destination} reported refused by {policy_name} within {} s",
                    self.args.connection_test_timeout_seconds
                ),
                "is the policy Accepted (kubectl -n <namespace> get authz)? does every proxy apply its config (the checks above)?",
            ),
        });
        Ok(results)
    }

    /// The image of the control plane's container (its pods found by
    /// their label, as the replicas are).
    async fn control_plane_image(&self) -> Result<String, String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.installation.namespace);
        let listed = pods
            .list(&ListParams::default().labels(super::mesh::CONTROL_PLANE_SELECTOR))
            .await
            .map_err(|e| {
                format!(
                    "listing the control plane's pods for their image (or pass --test-image): {}",
                    super::said(&e)
                )
            })?;
        listed
            .items
            .into_iter()
            .filter_map(|pod| pod.spec)
            .filter_map(|spec| spec.containers.into_iter().next())
            .find_map(|container| container.image)
            .ok_or_else(|| "no control-plane pod names an image (pass --test-image)".into())
    }

    /// Waits until pod `name` runs; its IP.
    async fn running_pod_ip(&self, pods: &Api<Pod>, name: &str) -> Result<String, String> {
        let deadline = Instant::now() + self.timeout();
        let mut last = String::from("not created");
        while Instant::now() < deadline {
            match pods.get(name).await {
                Ok(pod) => {
                    let status = pod.status.unwrap_or_default();
                    let phase = status.phase.unwrap_or_default();
                    match (phase.as_str(), status.pod_ip) {
                        ("Running", Some(ip)) => return Ok(ip),
                        ("Failed" | "Succeeded", _) => {
                            return Err(format!("pod {name} stopped ({phase})"));
                        }
                        _ => {
                            last = waiting_reason(&status.container_statuses.unwrap_or_default())
                                .unwrap_or(phase);
                        }
                    }
                }
                Err(error) => last = super::said(&error),
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!(
            "pod {name} not running within {} s: {last}",
            self.args.connection_test_timeout_seconds
        ))
    }

    /// Waits until a replica reports the edge `source` → `destination`
    /// passing `done`; that edge.
    async fn wait_for_edge(
        &self,
        namespace: &str,
        source: &str,
        destination: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + self.timeout();
        let path = format!("/api/traffic?namespace={namespace}");
        let request = Duration::from_secs(self.args.timeout_seconds);
        while Instant::now() < deadline {
            for replica in self.replicas {
                let Ok(traffic) = replica.get_json(&path, request).await else {
                    continue;
                };
                let found =
                    traffic["edges"].as_array().into_iter().flatten().find(|e| {
                        e["source"] == source && e["destination"] == destination && done(e)
                    });
                if let Some(edge) = found {
                    return Some(edge.clone());
                }
            }
            tokio::time::sleep(POLL).await;
        }
        None
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.connection_test_timeout_seconds)
    }
}

/// Why a pod's container is waiting (`ImagePullBackOff`, ...), if it is.
fn waiting_reason(statuses: &[k8s_openapi::api::core::v1::ContainerStatus]) -> Option<String> {
    statuses
        .iter()
        .filter_map(|s| s.state.as_ref()?.waiting.as_ref())
        .map(|w| {
            format!(
                "{}: {}",
                w.reason.clone().unwrap_or_default(),
                w.message.clone().unwrap_or_default()
            )
        })
        .next()
}

/// A fresh namespace name: `weft-check-` and 8 random hex digits.
fn throwaway_name() -> String {
    format!("weft-check-{:08x}", rand::random::<u32>())
}

/// A pod of the test, pinned to `node`, running `args` in the control
/// plane's image as an unprivileged user.
fn peer_pod(
    app: &str,
    node: &str,
    image: &str,
    args: &[String],
    deadline_seconds: u64,
) -> Result<Pod, String> {
    serde_json::from_value(json!({
        "metadata": {"name": app, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": app,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "activeDeadlineSeconds": deadline_seconds,
            "tolerations": [{"operator": "Exists"}],
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": app,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": args,
                "resources": {
                    "requests": {"cpu": "10m", "memory": "16Mi"},
                    "limits": {"memory": "64Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        }
    }))
    .map_err(|e| format!("building pod {app}: {e}"))
}

/// "1 connection", "20 connections": a count the dashboard reported.
fn connections(count: &serde_json::Value) -> String {
    match count.as_u64() {
        Some(1) => "1 connection".to_owned(),
        Some(n) => format!("{n} connections"),
        None => format!("{count} connections"),
    }
}
