//! The node-local API through which weft's CNI plugin tells the proxy about
//! pods as the container runtime creates and deletes them: a Unix socket
//! (`--cni-socket`, root only) taking one JSON request per connection and
//! answering one JSON reply, each a single line.
//!
//! ```text
//! {"command":"add","netns":"/var/run/netns/cni-…","ips":["10.244.1.5"],
//!  "pod_namespace":"shop","pod_name":"web-1"}
//! {"ok":true}
//! ```
//!
//! An `add` records the pod (see [`PodDirectory`]) and is answered once
//! the proxy serves it (its redirection installed, its listeners open) or
//! found it is not meshed: the runtime starts the pod's first container
//! only after that. If neither happens within [`ADD_WAIT`] (no config
//! yet, the namespace cannot be entered), the answer is an error, and the
//! runtime tries again later. A `del` forgets the pod.
//!
//! Plain JSON lines rather than gRPC: the plugin is a short-lived binary
//! the runtime starts for every pod, and should start fast and small.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::listening::Listening;
use crate::pod_directory::{AnnouncedPod, Outcome, PodDirectory};

/// The longest request line taken (a pod's request is well under 1 KiB).
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;

/// How long one request may take to arrive, and the plugin waits for the
/// answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an `add` waits for the pod to be served before it fails.
pub const ADD_WAIT: Duration = Duration::from_secs(3);

/// Requests served at once; more wait to be accepted.
const MAX_CONCURRENT_REQUESTS: usize = 32;

/// What the CNI plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A pod was created, its network set up.
    Add,
    /// A pod is being deleted.
    Del,
}

/// One request. Fields it does not know are ignored: a plugin binary of
/// another weft version (an upgrade or a rollback in progress) still gets
/// its pods announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    /// What happened.
    pub command: Command,
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses (from the previous plugins' result); may be
    /// empty for `del`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The pod's Kubernetes namespace, for the logs.
    #[serde(default)]
    pub pod_namespace: String,
    /// The pod's name, for the logs.
    #[serde(default)]
    pub pod_name: String,
    /// The pod's UID (`metadata.uid`), which tells a pod from an earlier
    /// one of the same name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniReply {
    /// Whether the request was taken.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Parses one request line; what is wrong with it, if anything.
pub fn parse_request(line: &[u8]) -> Result<CniRequest, String> {
    let request: CniRequest = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if !request.netns.is_absolute() {
        return Err(format!(
            "the network namespace {} is not an absolute path",
            request.netns.display()
        ));
    }
    if request.command == Command::Add && request.ips.is_empty() {
        return Err("an add names no pod address".to_owned());
    }
    Ok(request)
}

/// Binds the socket at `path` (replacing a stale one), accessible to root
/// only; non-blocking, for [`serve`].
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests while it is this process's turn (see [`Listening`]);
/// returns once the socket went to a successor.
pub async fn serve(listener: UnixListener, directory: Arc<PodDirectory>, listening: Listening) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(accepted) = listening.node_endpoint_accept(|| listener.accept()).await else {
            return;
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "CNI socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let directory = directory.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &directory)).await;
            if answered.is_err() {
                warn!("CNI socket: a request did not arrive in time; closed");
            }
        });
    }
}

async fn answer(stream: tokio::net::UnixStream, directory: &PodDirectory) {
    let (reader, mut writer) = stream.into_split();
    let mut line = Vec::new();
    let read = tokio::io::BufReader::new(reader)
        .take(MAX_REQUEST_BYTES)
        .read_until(b'\n', &mut line)
        .await;
    let request = read
        .map_err(|e| e.to_string())
        .and_then(|_| parse_request(&line));
    let outcome = match request {
        Ok(request) => apply(request, directory).await,
        Err(error) => Err(error),
    };
    let reply = match outcome {
        Ok(()) => CniReply {
            ok: true,
            error: None,
        },
        Err(error) => {
            warn!(%error, "CNI socket: a request failed");
            CniReply {
                ok: false,
                error: Some(error),
            }
        }
    };
    let mut text = serde_json::to_vec(&reply).unwrap_or_default();
    text.push(b'\n');
    let _ = writer.write_all(&text).await;
}

async fn apply(request: CniRequest, directory: &PodDirectory) -> Result<(), String> {
    let pod = format!("{}/{}", request.pod_namespace, request.pod_name);
    match request.command {
        Command::Add => {
            info!(%pod, ips = ?request.ips, netns = %request.netns.display(), "CNI: pod added");
            if !request.netns.exists() {
                return Err(format!(
                    "the proxy cannot see the network namespace {} of pod {pod}: is the \
                     runtime's namespace directory mounted into the proxy's container?",
                    request.netns.display()
                ));
            }
            let netns = request.netns.clone();
            directory.add(AnnouncedPod {
                netns: request.netns,
                ips: request.ips,
                namespace: request.pod_namespace,
                name: request.pod_name,
                uid: request.pod_uid,
                found: false,
            });
            match directory.settled(&netns, ADD_WAIT).await {
                Some(Outcome::Served | Outcome::NotMeshed) => Ok(()),
                Some(Outcome::Pending(why)) => Err(format!("pod {pod} is not captured yet: {why}")),
                None => Err(format!("pod {pod} is not captured yet")),
            }
        }
        Command::Del => {
            info!(%pod, netns = %request.netns.display(), "CNI: pod deleted");
            directory.remove(&request.netns);
            Ok(())
        }
    }
}

/// Sends `request` to the proxy at `socket` and waits for its answer
/// (for the CNI plugin; blocking).
pub fn send(socket: &Path, request: &CniRequest) -> std::io::Result<CniReply> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut text = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    text.push(b'\n');
    stream.write_all(&text)?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_REQUEST_BYTES)).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let add = br#"{"command":"add","netns":"/run/netns/cni-1","ips":["10.244.1.5"],"pod_namespace":"shop","pod_name":"web-1"}"#;
        assert!(parse_request(add).is_ok());
        // A field of another weft version's plugin is ignored.
        let newer = br#"{"command":"del","netns":"/x","pod_uid":"u-1","extra":1}"#;
        assert!(parse_request(newer).is_ok());
        for bad in [
            &br#"{"command":"add","netns":"/run/netns/cni-1","ips":[]}"#[..],
            br#"{"command":"add","netns":"relative","ips":["10.244.1.5"]}"#,
            br#"{"command":"nuke","netns":"/x"}"#,
            b"\xff\xfe",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
