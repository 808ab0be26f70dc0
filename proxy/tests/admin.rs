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
    let (proxy, _files) = start_with_log_filter(&cp, filter).await;
    let addr = proxy.admin_addr();
    assert!(!tracing::enabled!(Level::DEBUG));
    assert_eq!(admin_json(addr, "/logging").await["level"], "info");

    let (status, body) = admin_get(addr, "POST", "/logging?level=info,weft_proxy%3Ddebug").await;
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
    let (status, body) = admin_get(addr, "POST", "/logging?level=weft_proxy%3Dloud").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("parsing the log filter"), "{body}");
    assert_eq!(admin_get(addr, "POST", "/logging").await.0, 400);
    assert_eq!(admin_get(addr, "POST", "/logging?lvl=debug").await.0, 400);
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
    let (proxy, _files) = start_proxy(&cp).await;
    let addr = proxy.admin_addr();
    assert_eq!(admin_get(addr, "GET", "/logging").await.0, 501);
    assert_eq!(admin_get(addr, "POST", "/logging?level=debug").await.0, 501);
    assert_eq!(
        admin_json(addr, "/config_dump").await["log_level"],
        serde_json::Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_requested_only_by_a_post_to_drain() {
    let cp = TestControlPlane::start().await;
    let (proxy, _files) = start_proxy(&cp).await;
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

    let (status, body) = admin_get(addr, "POST", "/drain").await;
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

/// `POST path` from a shell running as `uid` (bash's /dev/tcp), the
/// response's status line.
fn post_as(uid: u32, addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf 'POST {path} HTTP/1.1\\r\\nHost: admin\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3",
        addr.ip(),
        addr.port()
    );
    let output = std::process::Command::new("bash")
        .args(["-c", &script])
        .uid(uid)
        .gid(uid)
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_proxys_own_user_may_drain_or_change_the_log_filter() {
    let (filter, _layer) = LogFilter::new("info").unwrap();
    let cp = TestControlPlane::start().await;
    let (proxy, _files) = start_with_log_filter(&cp, filter).await;
    let addr = proxy.admin_addr();
    let requested = proxy.drain_requested();
    tokio::pin!(requested);

    // The attack: an unprivileged process on the node (uid 65534, nobody).
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap();
    if is_root {
        for path in ["/drain", "/logging?level=trace"] {
            let status = tokio::task::spawn_blocking(move || post_as(65534, addr, path))
                .await
                .unwrap()
                .unwrap();
            assert!(status.starts_with("HTTP/1.1 403"), "{path}: {status:?}");
        }
    } else {
        eprintln!("not root: cannot run a process as another user; only the Origin check runs");
    }
    // A web page's request, even from the right user.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /drain HTTP/1.1\r\nHost: admin\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");

    assert_eq!(admin_json(addr, "/logging").await["level"], "info");
    let early = tokio::time::timeout(Duration::from_millis(200), &mut requested).await;
    assert!(early.is_err(), "a refused POST requested a drain");
    // The proxy's own user still can.
    assert_eq!(admin_get(addr, "POST", "/drain").await.0, 202);
    within("the drain request", &mut requested).await;
}
