//! weft's chained CNI plugin (the `weft-cni` binary): the container
//! runtime runs it for every new pod after the network plugins that gave
//! the pod its interface and addresses, and before the pod's first
//! container starts. It tells the node proxy about the pod over the CNI
//! socket ([`crate::cni_api`]) and returns only once the proxy captures
//! it, so a meshed pod's first packet, an init container's included, is
//! already redirected. It never changes the result of the plugins before
//! it.
//!
//! Failing closed: if the proxy cannot be reached, a pod of a namespace the
//! proxy last knew as meshed (`meshed-namespaces.json` in the proxy's state
//! directory) is refused ("try again later", code 11): the runtime retries,
//! and the pod starts once a proxy serves it. So is every pod while that
//! file is missing: the proxy installs this plugin when it starts, so it
//! has run here, but has not learned from a config what is meshed. Pods of
//! namespaces the last config did not mesh, and of the namespaces the
//! plugin is configured to leave alone (weft's own, `kube-system`), start
//! as if weft were not there.
//!
//! The network configuration's own keys (all optional):
//! `"socket"` (the proxy's CNI socket, default [`DEFAULT_SOCKET`]),
//! `"state_dir"` (the proxy's state directory, default
//! [`DEFAULT_STATE_DIR`]) and `"exclude_namespaces"` (default
//! `["kube-system"]`).

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::cni_api::{CniReply, CniRequest, Command};

/// Where the proxy's CNI socket is by default.
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";

/// Where the proxy keeps its state by default (the chart's hostPath).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft/proxy";

/// The CNI versions this plugin speaks (its results are its
/// predecessors', so it speaks theirs).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The largest network configuration read from stdin.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// CNI error code: the request may succeed later.
pub const TRY_AGAIN_LATER: u32 = 11;
/// CNI error code: the configuration's version is not supported.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// CNI error code: a needed environment variable is missing or invalid.
pub const INVALID_ENVIRONMENT: u32 = 4;
/// CNI error code: the network configuration is invalid.
pub const INVALID_CONFIG: u32 = 7;

/// What the runtime handed the plugin.
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_NETNS`.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_UID=…`).
    pub args: String,
    /// The network configuration (stdin).
    pub config: Vec<u8>,
}

/// What the plugin answers: a result to print (exit 0) or an error (its
/// JSON printed, exit 1).
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Success, with what to print (possibly nothing).
    Done(String),
    /// Failure.
    Failed {
        /// The CNI error code.
        code: u32,
        /// The message.
        msg: String,
    },
}

impl Answer {
    /// The JSON printed for a failure, in `cni_version`.
    pub fn error_json(code: u32, msg: &str, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": code, "msg": msg}).to_string()
    }
}

/// The plugin's part of the network configuration.
#[derive(Debug, Deserialize)]
pub struct PluginConfig {
    /// The CNI version of the configuration.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The proxy's CNI socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// The proxy's state directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Namespaces left alone.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// The result of the plugins before this one.
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".to_owned()]
}

/// Parses the network configuration.
pub fn parse_config(config: &[u8]) -> Result<PluginConfig, String> {
    let parsed: PluginConfig =
        serde_json::from_slice(config).map_err(|e| format!("reading the network config: {e}"))?;
    if let Some(prev) = &parsed.prev_result
        && !prev.is_object()
    {
        return Err("prevResult is not an object".to_owned());
    }
    Ok(parsed)
}

/// The addresses in a CNI result (`ips[].address`, `10.244.1.5/24`).
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|address| address.split('/').next()?.parse().ok())
        .collect()
}

/// The value of `key` in `CNI_ARGS`.
fn cni_arg<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Runs the plugin: `send` delivers a request to the proxy.
pub fn run(
    invocation: &Invocation,
    send: impl FnOnce(&Path, &CniRequest) -> io::Result<CniReply>,
) -> Answer {
    let failed = |code, msg: String| Answer::Failed { code, msg };
    if invocation.command == "VERSION" {
        return Answer::Done(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let config = match parse_config(&invocation.config) {
        Ok(config) => config,
        // A pod must be deletable whatever its config says.
        Err(_) if invocation.command != "ADD" => return Answer::Done(String::new()),
        Err(msg) => return failed(INVALID_CONFIG, msg),
    };
    if invocation.command == "ADD"
        && !config.cni_version.is_empty()
        && !SUPPORTED_VERSIONS.contains(&config.cni_version.as_str())
    {
        return failed(
            INCOMPATIBLE_VERSION,
            format!(
                "CNI version {} is not supported (weft-cni speaks {SUPPORTED_VERSIONS:?})",
                config.cni_version
            ),
        );
    }
    let namespace = cni_arg(&invocation.args, "K8S_POD_NAMESPACE").unwrap_or_default();
    let name = cni_arg(&invocation.args, "K8S_POD_NAME").unwrap_or_default();
    let uid = cni_arg(&invocation.args, "K8S_POD_UID").unwrap_or_default();
    let left_alone =
        namespace.is_empty() || config.exclude_namespaces.iter().any(|n| n == namespace);
    match invocation.command.as_str() {
        "ADD" => {
            let Some(prev) = config.prev_result.clone() else {
                return failed(
                    INVALID_CONFIG,
                    "weft-cni is a chained plugin: it needs the result of a network plugin before it"
                        .to_owned(),
                );
            };
            let mut result = prev;
            if let Some(object) = result.as_object_mut()
                && !config.cni_version.is_empty()
            {
                object.insert(
                    "cniVersion".into(),
                    Value::String(config.cni_version.clone()),
                );
            }
            let done = Answer::Done(result.to_string());
            let ips = config
                .prev_result
                .as_ref()
                .map(result_ips)
                .unwrap_or_default();
            if left_alone || ips.is_empty() {
                return done;
            }
            let Some(netns) = invocation.netns.clone() else {
                return failed(INVALID_ENVIRONMENT, "CNI_NETNS is not set".to_owned());
            };
            let request = CniRequest {
                command: Command::Add,
                netns,
                ips,
                pod_namespace: namespace.to_owned(),
                pod_name: name.to_owned(),
                pod_uid: uid.to_owned(),
            };
            match send(&config.socket, &request) {
                Ok(reply) if reply.ok => done,
                Ok(reply) => failed(
                    TRY_AGAIN_LATER,
                    format!(
                        "weft: the node proxy did not capture pod {namespace}/{name}: {}",
                        reply.error.unwrap_or_default()
                    ),
                ),
                Err(error) => match meshed_namespaces(&config.state_dir) {
                    Ok(Some(meshed)) if !meshed.contains(namespace) => done,
                    Ok(Some(_)) => failed(
                        TRY_AGAIN_LATER,
                        format!(
                            "weft: namespace {namespace} is meshed and the node proxy cannot be reached \
                             ({error}); pod {name} starts once it serves it"
                        ),
                    ),
                    // The proxy installed this plugin, so it ran here, but it
                    // never learned what is meshed (it is starting, or has
                    // not heard from the control plane yet): the pod may be
                    // meshed, and nobody would capture it.
                    Ok(None) => failed(
                        TRY_AGAIN_LATER,
                        format!(
                            "weft: the node proxy cannot be reached ({error}) and has not yet learned \
                             which namespaces are meshed; pod {namespace}/{name} starts once it serves it"
                        ),
                    ),
                    Err(problem) => failed(
                        TRY_AGAIN_LATER,
                        format!(
                            "weft: the node proxy cannot be reached ({error}) and its list of meshed \
                             namespaces cannot be read ({problem})"
                        ),
                    ),
                },
            }
        }
        "DEL" => {
            // Never fails: the pod goes whatever the proxy says.
            if let Some(netns) = invocation.netns.clone().filter(|_| !left_alone) {
                let request = CniRequest {
                    command: Command::Del,
                    netns,
                    ips: Vec::new(),
                    pod_namespace: namespace.to_owned(),
                    pod_name: name.to_owned(),
                    pod_uid: uid.to_owned(),
                };
                let _ = send(&config.socket, &request);
            }
            Answer::Done(String::new())
        }
        "CHECK" | "GC" | "STATUS" => Answer::Done(String::new()),
        other => failed(
            INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
        ),
    }
}

/// The meshed namespaces the proxy last stored; `None` if it never stored
/// any (it has not had a config since it was installed).
fn meshed_namespaces(state_dir: &Path) -> Result<Option<BTreeSet<String>>, String> {
    let path = state_dir.join(crate::node_state::MESHED_NAMESPACES_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(config: Value, args: &str) -> Invocation {
        Invocation {
            command: "ADD".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            args: args.into(),
            config: config.to_string().into_bytes(),
        }
    }

    fn config(state_dir: &Path) -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "k8s", "type": "weft-cni",
            "state_dir": state_dir,
            "exclude_namespaces": ["kube-system", "weft-system"],
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}]}
        })
    }

    const SHOP: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1";

    #[test]
    fn an_add_is_announced_and_passes_the_result_on() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut sent = None;
        let answer = run(&add(config(dir.path()), SHOP), |socket, request| {
            sent = Some((socket.to_owned(), request.clone()));
            Ok(CniReply {
                ok: true,
                error: None,
            })
        });
        let Answer::Done(printed) = answer else {
            panic!("failed: {answer:?}");
        };
        assert!(printed.contains("10.244.1.5/24"));
        let (socket, request) = sent.expect("announced");
        assert_eq!(socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            request.ips,
            vec!["10.244.1.5".parse::<IpAddr>().expect("an IP")]
        );
        assert_eq!(
            (request.pod_namespace.as_str(), request.pod_name.as_str()),
            ("shop", "web-1")
        );
    }

    #[test]
    fn without_a_proxy_a_meshed_namespace_waits_and_others_start() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let unreachable = |_: &Path, _: &CniRequest| -> io::Result<CniReply> {
            Err(io::Error::from(io::ErrorKind::NotFound))
        };
        // The proxy never had a config here: any pod may be meshed.
        assert!(matches!(
            run(&add(config(dir.path()), SHOP), unreachable),
            Answer::Failed {
                code: TRY_AGAIN_LATER,
                ..
            }
        ));
        std::fs::write(
            dir.path().join(crate::node_state::MESHED_NAMESPACES_FILE),
            r#"["shop"]"#,
        )
        .expect("written");
        assert!(matches!(
            run(&add(config(dir.path()), SHOP), unreachable),
            Answer::Failed {
                code: TRY_AGAIN_LATER,
                ..
            }
        ));
        let other = "K8S_POD_NAMESPACE=legacy;K8S_POD_NAME=old-1";
        assert!(matches!(
            run(&add(config(dir.path()), other), unreachable),
            Answer::Done(_)
        ));
        // A refusal from the proxy fails the add too.
        let refused = run(&add(config(dir.path()), SHOP), |_, _| {
            Ok(CniReply {
                ok: false,
                error: Some("no config yet".into()),
            })
        });
        assert!(matches!(
            refused,
            Answer::Failed {
                code: TRY_AGAIN_LATER,
                ..
            }
        ));
    }

    #[test]
    fn excluded_namespaces_and_deletes_never_fail() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let never = |_: &Path, _: &CniRequest| -> io::Result<CniReply> {
            Err(io::Error::other("must not be asked"))
        };
        let system = "K8S_POD_NAMESPACE=weft-system;K8S_POD_NAME=weft-control-plane-0";
        assert!(matches!(
            run(&add(config(dir.path()), system), never),
            Answer::Done(_)
        ));
        let mut delete = add(config(dir.path()), SHOP);
        delete.command = "DEL".into();
        assert_eq!(run(&delete, never), Answer::Done(String::new()));
        let mut bad = add(config(dir.path()), SHOP);
        bad.config = b"{not json".to_vec();
        assert!(matches!(
            run(&bad, never),
            Answer::Failed {
                code: INVALID_CONFIG,
                ..
            }
        ));
    }
}
