//! The `weft-cni` binary as a container runtime runs it, while the node
//! proxy is starting: its socket is there but nobody answers, or it is
//! left from a proxy that is gone. A pod that may be meshed must not start
//! uncaptured; the runtime is told to try again.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Runs the plugin's ADD of pod `shop/web-1` the way a runtime does: its
/// exit status and what it printed on stdout.
fn add(socket: &Path, state_dir: &Path) -> (bool, Value) {
    let config = json!({
        "cniVersion": "1.0.0", "name": "k8s", "type": "weft-cni",
        "socket": socket, "state_dir": state_dir,
        "exclude_namespaces": ["kube-system"],
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}]}
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_NETNS", "/var/run/netns/cni-test")
        .env("CNI_CONTAINERID", "c-1")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let printed = serde_json::from_slice(&output.stdout).unwrap();
    (output.status.success(), printed)
}

fn try_again_later(printed: &Value) -> bool {
    printed["code"] == json!(weft_proxy::cni_plugin::TRY_AGAIN_LATER)
}

#[test]
fn a_proxy_that_does_not_answer_holds_pods_it_may_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let socket = dir.path().join("cni.sock");
    // Bound and listening, never accepting: a proxy busy starting.
    let silent = UnixListener::bind(&socket).unwrap();

    // It never had a config: any pod may be meshed.
    let (started, printed) = add(&socket, &state_dir);
    assert!(!started, "started uncaptured: {printed}");
    assert!(try_again_later(&printed), "{printed}");

    // Its last config meshed the pod's namespace.
    let meshed = state_dir.join("meshed-namespaces.json");
    std::fs::write(&meshed, r#"["shop"]"#).unwrap();
    let (started, printed) = add(&socket, &state_dir);
    assert!(!started && try_again_later(&printed), "{printed}");

    // The proxy is gone, its socket left behind: still held.
    drop(silent);
    assert!(socket.exists());
    let (started, printed) = add(&socket, &state_dir);
    assert!(!started && try_again_later(&printed), "{printed}");

    // Its last config did not mesh the namespace: the pod starts, with
    // the network plugin's result passed on.
    std::fs::write(&meshed, r#"["payments"]"#).unwrap();
    let (started, printed) = add(&socket, &state_dir);
    assert!(started, "{printed}");
    assert_eq!(printed["ips"][0]["address"], json!("10.244.1.5/24"));
}
