//! One plain HTTP/1.1 GET to another weft process's HTTP port, for the
//! control plane's commands: `uninstall` asks each node proxy's readiness
//! port, `check` asks a replica's monitoring port.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::StatusCode;
use hyper::body::Bytes;

/// GETs `path` from `authority` (`host:port`) within `timeout`: the body of
/// a 200 answer, or why there was none (every caller wants a 200 alone).
pub async fn get(authority: &str, path: &str, timeout: Duration) -> Result<Bytes, String> {
    let ask = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!("GET {path} answered {status}"));
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}
