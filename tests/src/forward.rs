//! A host loopback port made reachable on the loopback of a testbed
//! namespace: the kube-apiserver of a test listens on the host's 127.0.0.1,
//! and the control plane runs inside a node's namespace, where 127.0.0.1 is
//! another interface. The listening socket is opened inside the namespace and
//! the outgoing ones in the host's, so both ends stay on a loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{Target, Testbed};

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// A forwarded port; stops forwarding (and cuts open connections) on drop.
pub struct LoopbackForward {
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Testbed {
    /// Forwards `127.0.0.1:port` inside the target's namespace to
    /// `127.0.0.1:port` on the host.
    pub fn forward_host_port(&self, target: Target<'_>, port: u16) -> Result<LoopbackForward> {
        let listener = self
            .run_in(target, || TcpListener::bind((Ipv4Addr::LOCALHOST, port)))?
            .with_context(|| format!("binding 127.0.0.1:{port} in {target}"))?;
        listener.set_nonblocking(true)?;
        let forward = LoopbackForward {
            stop: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
        };
        let (stop, open) = (forward.stop.clone(), forward.open.clone());
        let host = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let inside = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(_) => break,
                };
                let Ok(outside) = TcpStream::connect(host) else {
                    continue; // dropping `inside` tells the client
                };
                if inside.set_nonblocking(false).is_err() {
                    continue;
                }
                if let Ok(mut open) = open.lock() {
                    open.retain(|s| s.peer_addr().is_ok());
                    open.extend(inside.try_clone().ok());
                    open.extend(outside.try_clone().ok());
                }
                splice(inside, outside);
            }
        });
        Ok(forward)
    }
}

/// Copies both ways on two threads; each direction's end is passed on as a
/// half-close, and a failure closes both.
fn splice(a: TcpStream, b: TcpStream) {
    let pairs = [
        (a.try_clone(), b.try_clone()),
        (b.try_clone(), a.try_clone()),
    ];
    for pair in pairs {
        let (Ok(mut from), Ok(mut to)) = pair else {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            return;
        };
        std::thread::spawn(move || {
            let mut buf = vec![0; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    }
}

impl Drop for LoopbackForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(open) = self.open.lock() {
            for stream in open.iter() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}
