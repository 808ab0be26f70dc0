//! Probes the policy tests share: does a connection get through, what do
//! the proxy's metrics count, and what does `explain` say about it.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use crate::{Target, Testbed, WeftMesh, echo_round_trip, weft_binary};

/// Whether one echo round trip from the pod `from` to `to` works: the
/// connection is accepted, carried and answered. A connection that a policy
/// refuses is closed before the echo comes back.
pub fn echoes(testbed: &Testbed, from: &str, to: SocketAddr) -> bool {
    let Ok(mut stream) = testbed.connect(Target::Pod(from), to) else {
        return false;
    };
    echo_round_trip(&mut stream, b"ping").is_ok_and(|echoed| echoed == b"ping")
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
