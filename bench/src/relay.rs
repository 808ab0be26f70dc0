//! A plain userspace TCP relay: accept, connect upstream, copy both ways. No TLS,
//! no HTTP/2, no capture: the floor any design with a userspace proxy on each node
//! pays (DESIGN.md, "Performance facts").
//!
//! Each relay is a process of its own (this executable, run again), with a
//! single-threaded tokio runtime, like the floor in DESIGN.md: a node proxy is a
//! process, and a switch between processes costs more than one between threads of
//! the same process, so a relay thread inside the benchmark would flatter the floor.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::procstat::ProcEntry;

/// Set in a relay process's environment: `<upstream> <buffer bytes>`.
const RELAY_ENV: &str = "WEFT_BENCH_RELAY";

/// The line a relay process prints once it listens.
const READY: &str = "listening";

/// A running relay process; killed when dropped.
pub struct RelayProcess {
    child: Child,
    /// Closing it tells the relay to exit, also when this process dies first.
    _stdin: ChildStdin,
}

impl RelayProcess {
    /// The relay's `/proc` entry, for its CPU time.
    pub fn proc_entry(&self) -> ProcEntry {
        ProcEntry::process(self.child.id())
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a relay process listening on 0.0.0.0:`port` and forwarding each
/// connection to `upstream` with copy buffers of `buffer` bytes each way. Call it
/// inside the node's namespace: the process inherits the calling thread's.
pub fn start(port: u16, upstream: SocketAddr, buffer: usize) -> Result<RelayProcess> {
    let exe = std::env::current_exe().context("locating weft-bench")?;
    let mut child = Command::new(exe)
        .env(RELAY_ENV, format!("{port} {upstream} {buffer}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a relay process")?;
    let stdin = child.stdin.take().context("the relay's stdin")?;
    let stdout = child.stdout.take().context("the relay's stdout")?;
    let relay = RelayProcess {
        child,
        _stdin: stdin,
    };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("waiting for the relay to listen")?;
    if line.trim() != READY {
        bail!("the relay process exited before listening (to {upstream})");
    }
    Ok(relay)
}

/// In a relay process (this executable started by [`start`]): relays until its
/// standard input closes. Returns `None` in any other process.
pub fn run_if_relay_process() -> Option<Result<()>> {
    let spec = std::env::var(RELAY_ENV).ok()?;
    Some(run(&spec))
}

fn run(spec: &str) -> Result<()> {
    let mut parts = spec.split_whitespace();
    let (Some(port), Some(upstream), Some(buffer), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("{RELAY_ENV}={spec:?}: expected `<port> <upstream> <buffer>`");
    };
    let port: u16 = port.parse().context("relay port")?;
    let upstream: SocketAddr = upstream.parse().context("relay upstream")?;
    let buffer: usize = buffer.parse().context("relay buffer")?;
    // The parent holds our stdin; when it goes, so do we.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("relay runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("binding the relay to port {port}"))?;
        #[allow(clippy::print_stdout)] // the readiness line the parent waits for
        {
            println!("{READY}");
        }
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
}
