//! A node's config stream at the HTTP/2 level, with gRPC's framing done
//! here: each message's buffer is freed once it is decoded. (tonic's
//! `Streaming` keeps its read buffer as large as the largest message it has
//! read, so every stream would hold a full state's size, 13 MiB at 50,000
//! pods, for as long as it lives: 13 GiB for a thousand simulated nodes.)
//!
//! Updates are read as [`LightUpdate`]s.

use std::collections::VecDeque;
use std::convert::Infallible;

use anyhow::{Context, Result, bail};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use prost::Message as _;
use prost::bytes::{Buf as _, Bytes};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::{Service as _, ServiceExt as _};
use weft_api::v1 as pb;
use weft_api::v1::proxy_message::Kind;

use super::light::{LightUpdate, TrackedPods};

/// gRPC's message header: a compression flag and a 4-byte length.
const HEADER: usize = 5;

/// One node's open `NodeConfig/Stream` call.
pub struct ConfigStream {
    requests: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    body: tonic::body::Body,
    framer: Framer,
    /// Whether [`Received::messages`] keeps each update's bytes.
    keep_messages: bool,
}

/// One update, put together from its parts.
pub struct Received {
    /// Its size on the wire.
    pub bytes: usize,
    /// What the scenario reads of it.
    pub update: LightUpdate,
    /// Its parts' bytes one after the other, if the stream keeps them
    /// ([`ConfigStream::keep_messages`]), else empty. Protobuf merges
    /// concatenated messages, so they decode as the whole
    /// `weft.v1.ConfigUpdate` the proxy puts together.
    pub messages: Vec<u8>,
}

impl ConfigStream {
    /// Calls `NodeConfig/Stream` on `channel` as `node` with `token`, and
    /// sends the Hello.
    pub async fn open(mut channel: Channel, node: &str, token: &str) -> Result<ConfigStream> {
        let (requests, queue) = mpsc::channel(16);
        let hello = Kind::Hello(pb::Hello {
            node: node.to_owned(),
            proxy_version: concat!("weft-bench ", env!("CARGO_PKG_VERSION")).to_owned(),
            accepts_parts: true,
        });
        requests
            .send(Ok(Frame::data(framed(hello))))
            .await
            .context("queueing the Hello")?;
        let body = tonic::body::Body::new(StreamBody::new(ReceiverStream::new(queue)));
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri("http://control-plane/weft.v1.NodeConfig/Stream")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {token}"))
            .body(body)
            .context("building the request")?;
        let response = channel
            .ready()
            .await
            .context("the gRPC connection is not ready")?
            .call(request)
            .await
            .context("calling NodeConfig/Stream")?;
        if response.status() != http::StatusCode::OK {
            bail!("opening the stream: HTTP status {}", response.status());
        }
        // A call refused at once ends in its headers ("Trailers-Only").
        grpc_status(response.headers()).context("opening the stream")?;
        Ok(ConfigStream {
            requests,
            body: response.into_body(),
            framer: Framer::default(),
            keep_messages: false,
        })
    }

    /// Keeps every update's bytes from now on (see [`Received::messages`]).
    pub fn keep_messages(&mut self) {
        self.keep_messages = true;
    }

    /// The next update, put together from its parts as the proxy does, and
    /// its size on the wire, or `None` when the control plane ended the
    /// call with status OK.
    pub async fn next(
        &mut self,
        max_bytes: usize,
        tracked: &TrackedPods,
    ) -> Result<Option<Received>> {
        let mut whole: Option<Received> = None;
        loop {
            while let Some(message) = self.framer.messages.pop_front() {
                let part =
                    LightUpdate::read(&message, tracked).context("reading a config update")?;
                let more_follows = part.more_follows;
                let mut received = match whole.take() {
                    None => Received {
                        bytes: 0,
                        update: part,
                        messages: Vec::new(),
                    },
                    Some(mut received) => {
                        received.update.extend(part)?;
                        received
                    }
                };
                received.bytes += message.len();
                if self.keep_messages {
                    received.messages.extend_from_slice(&message);
                }
                if !more_follows {
                    return Ok(Some(received));
                }
                whole = Some(received);
            }
            let Some(frame) = self.body.frame().await else {
                bail!("the stream ended without a gRPC status");
            };
            let frame = frame.map_err(|status| {
                anyhow::anyhow!(
                    "reading the stream: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })?;
            match frame.into_data() {
                Ok(data) => self.framer.feed(data, max_bytes)?,
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        grpc_status(trailers).context("the stream ended")?;
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// A handle that sends messages up this stream from elsewhere (traffic
    /// reports), for as long as the stream lives.
    pub fn sender(&self) -> MessageSender {
        MessageSender(self.requests.clone())
    }

    /// Acknowledges `version`.
    pub async fn ack(&mut self, version: u64) -> Result<()> {
        let ack = Kind::Ack(pb::Ack { version });
        self.requests
            .send(Ok(Frame::data(framed(ack))))
            .await
            .context("sending an Ack: the request stream is closed")
    }
}

/// Sends proxy messages up one node's stream.
#[derive(Clone, Debug)]
pub struct MessageSender(mpsc::Sender<Result<Frame<Bytes>, Infallible>>);

impl MessageSender {
    /// Sends `report`; an error once the stream is gone.
    pub async fn report(&self, report: pb::TrafficReport) -> Result<()> {
        self.0
            .send(Ok(Frame::data(framed(Kind::Traffic(report)))))
            .await
            .context("sending a traffic report: the stream is closed")
    }
}

/// A proxy message with gRPC's header (uncompressed).
fn framed(kind: Kind) -> Bytes {
    let message = pb::ProxyMessage { kind: Some(kind) }.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(&message);
    Bytes::from(out)
}

/// An error for a `grpc-status` other than 0 (OK) in `headers`.
fn grpc_status(headers: &http::HeaderMap) -> Result<()> {
    let Some(status) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code = status.to_str().unwrap_or("?");
    if code == "0" {
        return Ok(());
    }
    let code = code
        .parse::<i32>()
        .map(|n| format!("{:?}", tonic::Code::from_i32(n)))
        .unwrap_or_else(|_| code.to_owned());
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("");
    bail!("{code}: {}", percent_decoded(message))
}

/// gRPC percent-encodes `grpc-message`.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Cuts the response body into gRPC messages, each in a buffer of its own.
#[derive(Default)]
struct Framer {
    header: Vec<u8>,
    /// The message being read and its length, once its header is complete.
    message: Option<(Vec<u8>, usize)>,
    /// Complete messages not handed out yet.
    messages: VecDeque<Vec<u8>>,
}

impl Framer {
    fn feed(&mut self, mut data: Bytes, max_bytes: usize) -> Result<()> {
        while data.has_remaining() || matches!(self.message, Some((_, 0))) {
            match &mut self.message {
                None => {
                    let take = (HEADER - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..take]);
                    data.advance(take);
                    if self.header.len() == HEADER {
                        if self.header[0] != 0 {
                            bail!("a compressed gRPC message (weft-bench asked for none)");
                        }
                        let len = u32::from_be_bytes([
                            self.header[1],
                            self.header[2],
                            self.header[3],
                            self.header[4],
                        ]) as usize;
                        if len > max_bytes {
                            bail!("a config update of {len} bytes, over {max_bytes}");
                        }
                        self.header.clear();
                        self.message = Some((Vec::with_capacity(len), len));
                    }
                }
                Some((buffer, len)) => {
                    let take = (*len - buffer.len()).min(data.len());
                    buffer.extend_from_slice(&data[..take]);
                    data.advance(take);
                    if buffer.len() == *len {
                        let (buffer, _) = self.message.take().unwrap_or_default();
                        self.messages.push_back(buffer);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_out_of_any_chunking() {
        let messages: Vec<Vec<u8>> = vec![b"first".to_vec(), Vec::new(), vec![7; 300]];
        let mut wire = Vec::new();
        for message in &messages {
            wire.push(0);
            wire.extend_from_slice(&(message.len() as u32).to_be_bytes());
            wire.extend_from_slice(message);
        }
        for chunk in [1, 3, 5, 6, 64, wire.len()] {
            let mut framer = Framer::default();
            for piece in wire.chunks(chunk) {
                framer.feed(Bytes::copy_from_slice(piece), 1000).unwrap();
            }
            assert_eq!(Vec::from(framer.messages), messages, "chunks of {chunk}");
        }
        let mut framer = Framer::default();
        assert!(
            framer
                .feed(Bytes::from_static(&[0, 0, 0, 4, 0]), 1000)
                .is_err()
        );
    }

    #[test]
    fn a_refusal_in_the_headers_is_an_error_with_its_message() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("7"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("the token belongs to node-1%2C not node-2"),
        );
        let error = grpc_status(&headers).unwrap_err().to_string();
        assert_eq!(
            error,
            "PermissionDenied: the token belongs to node-1, not node-2"
        );
        headers.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert!(grpc_status(&headers).is_ok());
    }
}
