//! What the policy tests share: the `shop` they protect (a meshed `db`
//! behind a Service, clients of several identities), and probes: does a
//! connection get through, what do the proxy's metrics count, and what does
//! `explain` say about it.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use crate::{
    CONFIG_WAIT, PodSpec, ServiceSpec, Target, Testbed, WeftMesh, echo_round_trip, wait_until,
    weft_binary,
};

/// A meshed pod of namespace `shop`.
pub fn shop_pod<'a>(
    node: &'a str,
    name: &'a str,
    service_account: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> PodSpec<'a> {
    PodSpec {
        node,
        namespace: "shop",
        name,
        service_account,
        labels,
        meshed: true,
        probe_ports: &[],
    }
}

/// A pod outside the mesh: namespace `legacy`, ServiceAccount `default`.
pub fn legacy_pod<'a>(node: &'a str, name: &'a str) -> PodSpec<'a> {
    PodSpec {
        node,
        namespace: "legacy",
        name,
        meshed: false,
        ..PodSpec::default()
    }
}

/// The shop: node-1 runs web-1 and batch-1 (meshed, namespace shop, each
/// its own ServiceAccount) and old-1 (an unmeshed namespace); node-2 runs
/// db-1 (meshed, shop, its port 5432 probed by the kubelet) behind
/// [`SHOP_DB_SERVICE`].
pub fn shop_testbed() -> Result<Testbed> {
    shop_testbed_builder().build()
}

/// [`shop_testbed`]'s plan, for a test that changes more of it (e.g. the
/// pod network) before building.
pub fn shop_testbed_builder() -> crate::TestbedBuilder {
    Testbed::builder()
        .node("node-1")
        .node("node-2")
        .pod(shop_pod("node-1", "web-1", "web", &[("app", "web")]))
        .pod(shop_pod("node-1", "batch-1", "batch", &[("app", "batch")]))
        .pod(legacy_pod("node-1", "old-1"))
        .pod(shop_pod("node-2", "db-1", "db", &[("app", "db")]).probed(&[5432]))
        .service(SHOP_DB_SERVICE)
}

/// db-1's port 5432 (where [`start_mesh_with_db_echo`] echoes).
pub fn shop_db(testbed: &Testbed) -> Result<SocketAddr> {
    Ok(SocketAddr::from((testbed.pod_ip("db-1")?, 5432)))
}

/// Starts an echo server on `db-1`'s port 5432, then weft on `testbed`,
/// and waits until its data plane serves.
pub fn start_mesh_with_db_echo(testbed: &Testbed) -> Result<(WeftMesh, crate::EchoServer)> {
    let server = testbed.start_echo_server(Target::Pod("db-1"), 5432)?;
    let mesh = WeftMesh::start(testbed)?;
    mesh.wait_for_data_plane(testbed)?;
    Ok((mesh, server))
}

/// Service `shop/db` on port 5432, selecting the pods labelled `app: db`.
pub const SHOP_DB_SERVICE: ServiceSpec<'static> = ServiceSpec {
    namespace: "shop",
    name: "db",
    port: 5432,
    target_port: 5432,
    selector: &[("app", "db")],
};

/// An ALLOW policy that admits only `shop/web` to the `db` pods' port 5432.
pub const ALLOW_WEB_TO_DB: &str = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: {principals: [\"spiffe://cluster.local/ns/shop/sa/web\"]}
    to: {ports: [5432]}
";

/// Whether one echo round trip from the pod `from` to `to` works: the
/// connection is accepted, carried and answered. A connection that a policy
/// refuses is closed before the echo comes back.
pub fn echoes(testbed: &Testbed, from: &str, to: SocketAddr) -> bool {
    let Ok(mut stream) = testbed.connect(Target::Pod(from), to) else {
        return false;
    };
    echo_round_trip(&mut stream, b"ping").is_ok_and(|echoed| echoed == b"ping")
}

/// A DENY policy that refuses `shop/batch` at the `db` pods.
pub const DENY_BATCH_TO_DB: &str = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-batch, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - from: {principals: [\"spiffe://cluster.local/ns/shop/sa/batch\"]}
";

/// Waits until `from` reaches `to` (or is refused), as a policy change
/// takes effect; panics naming the connection if it never does.
pub fn wait_for_reach(testbed: &Testbed, from: &str, to: SocketAddr, reachable: bool) {
    let waited = wait_until(CONFIG_WAIT, || Ok(echoes(testbed, from, to) == reachable));
    if waited.is_err() {
        let became = if reachable { "reachable" } else { "refused" };
        panic!("{from} -> {to} never became {became}");
    }
}

/// The sum of the samples of the node proxy's metric lines that contain
/// `needle` (e.g. a name with some of its labels).
pub fn metric_sum(mesh: &WeftMesh, testbed: &Testbed, node: &str, needle: &str) -> Result<u64> {
    let text = mesh.proxy_metrics(testbed, node)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Runs `weft-control-plane explain` on the mesh's manifests: its report,
/// and whether it says allowed (exit 0) or denied (exit 1).
pub fn explain(mesh: &WeftMesh, args: &[&str]) -> Result<(String, bool)> {
    let output = std::process::Command::new(weft_binary("weft-control-plane")?)
        .arg("--manifests")
        .arg(mesh.manifests_dir())
        .arg("explain")
        .args(args)
        .output()
        .context("running weft-control-plane explain")?;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    match output.status.code() {
        Some(0) => Ok((report, true)),
        Some(1) => Ok((report, false)),
        other => bail!(
            "explain failed ({other:?}): {report}{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}
