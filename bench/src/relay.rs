//! A plain userspace TCP relay: accept, connect upstream, copy both ways. No TLS,
//! no HTTP/2, no capture: the floor any design with a userspace proxy on each node
//! pays (DESIGN.md, "Performance facts"). One thread with a single-threaded tokio
//! runtime per relay, so it competes for the CPU the way a node proxy does.

use std::net::SocketAddr;
use std::sync::mpsc;

use anyhow::{Context, Result};

use crate::procstat::ProcEntry;

/// Starts a relay thread serving `listener` and forwarding each connection to
/// `upstream` with copy buffers of `buffer` bytes each way. Call it inside the
/// node's namespace: the thread inherits it, so upstream connects start there.
/// Returns the relay thread's `/proc` entry, for its CPU time.
pub fn start(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    buffer: usize,
) -> Result<ProcEntry> {
    listener.set_nonblocking(true)?;
    let (entry_tx, entry_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("relay to {upstream}"))
        .spawn(move || -> Result<()> {
            let _ = entry_tx.send(ProcEntry::this_thread());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("relay runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    let (mut inbound, _) = listener.accept().await?;
                    tokio::spawn(async move {
                        let result = async {
                            inbound.set_nodelay(true)?;
                            let mut outbound = tokio::net::TcpStream::connect(upstream).await?;
                            outbound.set_nodelay(true)?;
                            tokio::io::copy_bidirectional_with_sizes(
                                &mut inbound,
                                &mut outbound,
                                buffer,
                                buffer,
                            )
                            .await
                        }
                        .await;
                        if let Err(error) = result {
                            tracing::debug!("relay connection to {upstream}: {error}");
                        }
                    });
                }
            })
        })
        .context("starting a relay thread")?;
    entry_rx
        .recv()
        .context("the relay thread died before starting")?
}
