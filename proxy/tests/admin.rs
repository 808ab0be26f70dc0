//! The admin endpoint's knobs: changing the log filter while the proxy runs
//! (and refusing a filter that does not parse), and asking for a drain.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use weft_proxy::NodeProxy;
use weft_proxy::logging::LogFilter;

async fn start_with_log_filter(
    cp: &TestControlPlane,
    filter: LogFilter,
) -> (NodeProxy, ProxyFiles) {
    let files = ProxyFiles::new(cp);
    let handle = tokio::runtime::Handle::current();
    let proxy = NodeProxy::start_in_process(files.config(cp), handle, Some(filter))
        .await
        .unwrap();
    (proxy, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_changes_at_run_time_and_a_bad_one_is_refused() {
    let (filter, layer) = LogFilter::new("info").unwrap();
    // The layer the filter controls, as this thread's subscriber: what is
    // enabled here is what the proxy would log.
    let _subscriber = tracing_subscriber::registry().with(layer).set_default();
    let cp = TestControlPlane::start().await;
    let (proxy, files) = start_with_log_filter(&cp, filter).await;
    let (addr, socket) = (proxy.admin_addr(), files.admin_socket());
    assert!(!tracing::enabled!(Level::DEBUG));
    assert_eq!(admin_json(addr, "/logging").await["level"], "info");

    let (status, body) = admin_post(&socket, "/logging?level=info,weft_proxy%3Ddebug").await;
    assert_eq!(status, 200, "{body}");
    let changed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(changed["level"], "info,weft_proxy=debug");
    assert_eq!(changed["before"], "info");
    assert!(tracing::enabled!(target: "weft_proxy::dataplane", Level::DEBUG));
    assert!(!tracing::enabled!(target: "h2", Level::DEBUG));
    assert_eq!(
        admin_json(addr, "/config_dump").await["log_level"],
        "info,weft_proxy=debug"
    );

    // A filter that does not parse, or no filter at all: 400, nothing changes.
    let (status, body) = admin_post(&socket, "/logging?level=weft_proxy%3Dloud").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("parsing the log filter"), "{body}");
    assert_eq!(admin_post(&socket, "/logging").await.0, 400);
    assert_eq!(admin_post(&socket, "/logging?lvl=debug").await.0, 400);
    assert_eq!(
        admin_json(addr, "/logging").await["level"],
        "info,weft_proxy=debug"
    );
    assert!(tracing::enabled!(target: "weft_proxy::dataplane", Level::DEBUG));
    assert_eq!(admin_get(addr, "DELETE", "/logging").await.0, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_log_filter_the_logging_knob_says_so() {
    let cp = TestControlPlane::start().await;
    let (proxy, files) = start_proxy(&cp).await;
    let addr = proxy.admin_addr();
    assert_eq!(admin_get(addr, "GET", "/logging").await.0, 501);
    assert_eq!(
        admin_post(&files.admin_socket(), "/logging?level=debug")
            .await
            .0,
        501
    );
    assert_eq!(
        admin_json(addr, "/config_dump").await["log_level"],
        serde_json::Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_requested_only_by_a_post_to_drain() {
    let cp = TestControlPlane::start().await;
    let (proxy, files) = start_proxy(&cp).await;
    let addr = proxy.admin_addr();
    let requested = proxy.drain_requested();
    tokio::pin!(requested);

    // Reading does not drain.
    assert_eq!(admin_get(addr, "GET", "/drain").await.0, 405);
    assert_eq!(
        admin_json(addr, "/config_dump").await["drain_requested"],
        false
    );
    let early = tokio::time::timeout(Duration::from_millis(200), &mut requested).await;
    assert!(early.is_err(), "a GET requested a drain");

    let (status, body) = admin_post(&files.admin_socket(), "/drain").await;
    assert_eq!(status, 202, "{body}");
    within("the drain request", &mut requested).await;
    assert_eq!(
        admin_json(addr, "/config_dump").await["drain_requested"],
        true
    );
    // A second waiter sees it too: the request is a state, not an event.
    within("the drain request", proxy.drain_requested()).await;
    proxy.shutdown().await;
}

/// `POST path` on the admin `socket` from `python3` started by `launcher`
/// (e.g. `unshare --mount`): the response's status line, or what failed.
fn post_from(launcher: &[&str], socket: &std::path::Path, path: &str) -> String {
    let script = format!(
        "import socket, sys\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect({socket:?})\n\
         s.sendall(b'POST {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n')\n\
         print(s.makefile().readline().strip())\n"
    );
    let output = std::process::Command::new(launcher[0])
        .args(&launcher[1..])
        .args(["python3", "-c", &script])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_come_only_from_the_proxys_own_container_on_its_admin_socket() {
    let (filter, _layer) = LogFilter::new("info").unwrap();
    let cp = TestControlPlane::start().await;
    let (proxy, files) = start_with_log_filter(&cp, filter).await;
    let (addr, socket) = (proxy.admin_addr(), files.admin_socket());
    let requested = proxy.drain_requested();
    tokio::pin!(requested);

    // On the TCP port, nobody may change anything: not even this process,
    // which runs as the proxy's user.
    let (status, body) = admin_get(addr, "POST", "/drain").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin socket"), "{body}");
    // A root process in another mount namespace (another container on the
    // node, or one reaching the socket through /proc/<pid>/root) is
    // refused on the socket too.
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap();
    if is_root {
        for path in ["/drain", "/logging?level=trace"] {
            let socket = socket.clone();
            let answer = tokio::task::spawn_blocking(move || {
                post_from(&["unshare", "--mount"], &socket, path)
            })
            .await
            .unwrap();
            assert!(answer.starts_with("HTTP/1.1 403"), "{path}: {answer:?}");
        }
    } else {
        eprintln!("not root: cannot make a mount namespace; only the TCP refusal is checked");
    }
    // A web page that rebound its name to 127.0.0.1 reads nothing.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /config_dump HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(!response.contains("control_plane"), "{response}");

    assert_eq!(admin_json(addr, "/logging").await["level"], "info");
    let early = tokio::time::timeout(Duration::from_millis(200), &mut requested).await;
    assert!(early.is_err(), "a refused POST requested a drain");
    // A process in the proxy's own mount namespace, as its user (here:
    // this test) can, on the socket.
    assert_eq!(admin_post(&socket, "/drain").await.0, 202);
    within("the drain request", &mut requested).await;
}
