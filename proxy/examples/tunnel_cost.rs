//! What one request/response round trip costs through an HBONE tunnel, next to
//! a plain TCP relay, in one process on loopback: a quick, quiet check for
//! changes to the data path (`weft-bench` measures the real thing, across
//! network namespaces, and is much noisier).
//!
//! Everything runs on one single-threaded runtime, as in the proxy, so the
//! time per round trip is the CPU it takes: the echo server and the client's
//! system calls (the same on both paths) plus the relay or the tunnel.
//!
//! ```sh
//! cargo run --release -p weft-proxy --example tunnel_cost -- [round trips] [payload bytes]
//! ```
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_certs::{CertificateRequest, Identity, MeshCa, WorkloadCertificate};
use weft_proxy::hbone::{
    HbonePool, HboneRequest, InboundRequest, PoolConfig, Refusal, ServerSettings, accept_tls,
    direct_dialer, serve_connection,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(50_000), |a| a.parse())?;
    let payload: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(rounds, payload))
}

async fn run(rounds: usize, payload: usize) -> anyhow::Result<()> {
    let echo = echo_server().await?;

    let direct = TcpStream::connect(echo).await?;
    let direct_us = round_trips(direct, rounds, payload).await?;

    let relay = relay_to(echo).await?;
    let relayed = TcpStream::connect(relay).await?;
    let relay_us = round_trips(relayed, rounds, payload).await?;

    let ca = MeshCa::generate_root("cluster.local", SystemTime::now())?;
    let client = workload(&ca, "spiffe://cluster.local/ns/a/sa/client")?;
    let server = workload(&ca, "spiffe://cluster.local/ns/b/sa/server")?;
    let hbone = hbone_server(&server).await?;
    let pool = HbonePool::new(direct_dialer(), PoolConfig::default());
    let tunnel = pool
        .connect(HboneRequest {
            certificate: client,
            destination_identity: server.identity().clone(),
            hbone_addr: hbone,
            target: echo,
            source_ip: None,
            forwarded_for: None,
            service_host: None,
            headers: http::HeaderMap::new(),
        })
        .await?;
    let tunnel_us = round_trips(tunnel, rounds, payload).await?;

    println!("{rounds} round trips of {payload} bytes each way, one thread, loopback:");
    println!("  direct          {direct_us:7.2} µs per round trip");
    println!(
        "  plain relay     {relay_us:7.2} µs  (+{:.2})",
        relay_us - direct_us
    );
    println!(
        "  HBONE tunnel    {tunnel_us:7.2} µs  (+{:.2}; {:.2}× the relay's cost)",
        tunnel_us - direct_us,
        (tunnel_us - direct_us) / (relay_us - direct_us)
    );
    Ok(())
}

/// Mean microseconds per round trip of `payload` bytes each way.
async fn round_trips<S>(mut stream: S, rounds: usize, payload: usize) -> anyhow::Result<f64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = vec![7u8; payload];
    let mut response = vec![0u8; payload];
    // Warm up: the first trips pay for buffers and windows.
    for _ in 0..rounds / 10 {
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
    }
    let started = Instant::now();
    for _ in 0..rounds {
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / rounds as f64)
}

async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    Ok(addr)
}

async fn relay_to(upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = inbound.set_nodelay(true);
                let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = outbound.set_nodelay(true);
                let _ = weft_proxy::copy::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    Ok(addr)
}

async fn hbone_server(certificate: &WorkloadCertificate) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = weft_certs::hbone_server_config(certificate, weft_certs::KeyExchange::default())?;
    let (_drain, drain_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _drain = _drain;
        while let Ok((tcp, _)) = listener.accept().await {
            let local = tcp.local_addr().unwrap();
            let (config, drain) = (config.clone(), drain_rx.clone());
            tokio::spawn(async move {
                let Ok(tls) = accept_tls(tcp, config).await else {
                    return;
                };
                let handler = Arc::new(|request: InboundRequest| async move {
                    let upstream = TcpStream::connect(request.target)
                        .await
                        .map_err(|e| Refusal::service_unavailable(e.to_string()))?;
                    let _ = upstream.set_nodelay(true);
                    Ok::<_, Refusal>(upstream)
                });
                let _ =
                    serve_connection(tls, local, handler, drain, &ServerSettings::default()).await;
            });
        }
    });
    Ok(addr)
}

fn workload(ca: &MeshCa, identity: &str) -> anyhow::Result<WorkloadCertificate> {
    let identity: Identity = identity.parse()?;
    let request = CertificateRequest::generate(&identity)?;
    let chain = ca.sign_csr(request.csr_der(), &identity, SystemTime::now())?;
    Ok(request.complete(chain, ca.trust_bundle().clone(), SystemTime::now())?)
}
