//! A TCP echo server that runs in-process but listens inside a testbed namespace, and
//! remembers who connected: the workload end-to-end tests put behind the mesh.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// Writes `message` on `stream` and reads back as many bytes: one exchange
/// with an [`EchoServer`] (through the mesh or not).
pub fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) -> Result<Vec<u8>> {
    stream
        .write_all(message)
        .context("writing to the echo server")?;
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).context("reading the echo")?;
    Ok(echoed)
}

/// Echoes every byte back on each accepted connection until the peer closes. Stops
/// (closing the listener and every open connection) when dropped.
#[derive(Debug)]
pub struct EchoServer {
    local_addr: SocketAddr,
    listener: Arc<TcpListener>,
    state: Arc<Mutex<EchoState>>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct EchoState {
    peers: Vec<SocketAddr>,
    open: Vec<TcpStream>,
    stopping: bool,
}

fn lock(state: &Mutex<EchoState>) -> MutexGuard<'_, EchoState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EchoServer {
    /// Serves on `listener`, which was bound inside the namespace it should serve in.
    pub(crate) fn start(listener: TcpListener) -> Result<EchoServer> {
        let local_addr = listener.local_addr().context("echo server address")?;
        let listener = Arc::new(listener);
        let state = Arc::new(Mutex::new(EchoState::default()));
        let acceptor = {
            let listener = Arc::clone(&listener);
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name(format!("echo {local_addr}"))
                .spawn(move || accept_loop(&listener, &state))
                .context("starting the echo server thread")?
        };
        Ok(EchoServer {
            local_addr,
            listener,
            state,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on (the unspecified address if bound to 0.0.0.0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The peer address of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.state).peers.clone()
    }
}

fn accept_loop(listener: &TcpListener, state: &Mutex<EchoState>) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                if !lock(state).stopping {
                    tracing::warn!("echo server accept: {e}");
                }
                return;
            }
        };
        let mut guard = lock(state);
        if guard.stopping {
            return;
        }
        guard.peers.push(peer);
        match stream.try_clone() {
            Ok(clone) => guard.open.push(clone),
            Err(e) => tracing::warn!("echo server: {e}"),
        }
        drop(guard);
        let spawned = std::thread::Builder::new()
            .name(format!("echo {peer}"))
            .spawn(move || echo(stream));
        if let Err(e) = spawned {
            tracing::warn!("echo server: starting a connection thread: {e}");
        }
    }
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    // The server keeps a clone of every stream (to cut it on drop), so
    // dropping this one would not close the connection: close it explicitly.
    let _ = stream.shutdown(Shutdown::Both);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let open = {
            let mut state = lock(&self.state);
            state.stopping = true;
            std::mem::take(&mut state.open)
        };
        // Shutting a listening socket down wakes the thread blocked in accept().
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        for stream in open {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
