//! The workload: an echo server for the server pods (tokio, one thread) and the
//! client side of each scenario (plain blocking sockets and threads, so a reply
//! is read by a thread that wakes up for it and nothing else).
//!
//! Every connection starts with one mode byte: [`ECHO`] echoes every byte back,
//! [`UPLOAD`] counts bytes until the client's FIN and answers the count (8 bytes,
//! big endian), [`DOWNLOAD`] (followed by a duration in ms, 4 bytes big endian)
//! sends as fast as it can for that long, then closes.
//!
//! The rate scenarios are open loop: request `k` is due at `start + k / rate`
//! whether or not earlier ones came back, and its latency is measured from that
//! due time, so a stall shows as latency instead of as a slower schedule.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Mode byte: echo everything.
pub const ECHO: u8 = b'E';
/// Mode byte: count bytes until FIN, answer the count.
pub const UPLOAD: u8 = b'U';
/// Mode byte: send for the given number of milliseconds.
pub const DOWNLOAD: u8 = b'D';

const BULK_CHUNK: usize = 256 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads that open connections in the connection-per-request scenario.
const CONNECT_WORKERS: usize = 32;

/// A latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("constant bounds are valid")
}

/// What a rate scenario measured on one path.
#[derive(Debug)]
pub struct Measured {
    /// Latency from each request's due time to its complete reply, in ns.
    pub latency: Histogram<u64>,
    /// How late the generator sent requests, in ns (its own health).
    pub send_lag: Histogram<u64>,
    /// Requests that failed (connect, write, read or timeout).
    pub errors: u64,
}

impl Measured {
    /// Empty histograms, no errors.
    pub fn new() -> Measured {
        Measured {
            latency: new_histogram(),
            send_lag: new_histogram(),
            errors: 0,
        }
    }
}

/// Serves the protocol above on `listener`, on a thread of its own with a
/// single-threaded tokio runtime. Called inside the pod's namespace.
pub fn serve(listener: std::net::TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("echo server".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => return tracing::error!("echo server runtime: {error}"),
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => return tracing::error!("echo server listener: {error}"),
                };
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if let Err(error) = serve_one(stream).await {
                            tracing::debug!("echo connection: {error}");
                        }
                    });
                }
            });
        })
        .context("starting the echo server thread")?;
    Ok(())
}

async fn serve_one(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mode = stream.read_u8().await?;
    match mode {
        ECHO => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return stream.shutdown().await;
                }
                stream.write_all(&buf[..n]).await?;
            }
        }
        UPLOAD => {
            let mut buf = vec![0u8; BULK_CHUNK];
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_u64(total).await?;
            stream.shutdown().await
        }
        DOWNLOAD => {
            let millis = stream.read_u32().await?;
            let until = Instant::now() + Duration::from_millis(millis.into());
            let buf = vec![0x5au8; BULK_CHUNK];
            while Instant::now() < until {
                stream.write_all(&buf).await?;
            }
            stream.shutdown().await
        }
        _ => Ok(()),
    }
}

/// Connects (from the calling thread's namespace) and sends the mode byte.
pub fn connect(to: SocketAddr, mode: u8) -> Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&[mode])?;
    Ok(stream)
}

/// One request/response on an echo connection, checked.
pub fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload)?;
    let mut reply = vec![0u8; payload.len()];
    stream.read_exact(&mut reply)?;
    if reply != payload {
        bail!("the echo came back different");
    }
    Ok(())
}

/// How long before a request is due the generator stops sleeping and spins, so
/// the scheduler's wake-up delay is not counted as the path's latency. Costs
/// about 5 % of a core at 1,000 req/s, the same on every path.
const SPIN_BEFORE_DUE: Duration = Duration::from_micros(60);

/// Lets this thread's sleeps end on time instead of up to 50 µs late.
fn precise_sleeps() {
    let _ = nix::sys::prctl::set_timerslack(1);
}

fn sleep_until(due: Instant) {
    let now = Instant::now();
    if due > now + SPIN_BEFORE_DUE {
        std::thread::sleep(due - now - SPIN_BEFORE_DUE);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// The open-loop schedule: `rate` sends per second for `duration`, each at
/// its due time whether or not earlier ones were answered. `send` gets the
/// send's index and due time and returns false to stop early. Returns how
/// late each send started (the generator's own lag).
fn on_schedule(
    rate: f64,
    duration: Duration,
    mut send: impl FnMut(u64, Instant) -> bool,
) -> Histogram<u64> {
    precise_sleeps();
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let mut lag = new_histogram();
    let start = Instant::now() + Duration::from_millis(1);
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        sleep_until(due);
        let _ = lag.record(elapsed_ns(due));
        if !send(k, due) {
            break;
        }
    }
    lag
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Open-loop request/response: `rate` requests per second in total, spread
/// round robin over `connections` persistent echo connections, for `duration`.
/// Requests may be pipelined; each reply is `payload` bytes.
pub fn request_response(
    to: SocketAddr,
    rate: f64,
    connections: usize,
    duration: Duration,
    payload: usize,
) -> Result<Measured> {
    let message = vec![0x42u8; payload];
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..connections.max(1) {
        let mut stream = connect(to, ECHO)?;
        for _ in 0..5 {
            round_trip(&mut stream, &message).context("warming up a connection")?;
        }
        let (due_tx, due_rx) = mpsc::channel::<Instant>();
        let mut reading = stream.try_clone()?;
        readers.push(std::thread::spawn(move || -> Measured {
            let mut measured = Measured::new();
            let mut reply = vec![0u8; payload];
            for due in due_rx {
                if measured.errors > 0 || reading.read_exact(&mut reply).is_err() {
                    measured.errors += 1;
                    continue;
                }
                let _ = measured.latency.record(elapsed_ns(due));
            }
            measured
        }));
        writers.push((stream, due_tx));
    }
    let lag = on_schedule(rate, duration, |k, due| {
        let (stream, due_tx) = &mut writers[k as usize % connections.max(1)];
        due_tx.send(due).is_ok() && stream.write_all(&message).is_ok()
    });
    let streams: Vec<TcpStream> = writers.into_iter().map(|(stream, _)| stream).collect();
    let mut measured = Measured::new();
    measured.send_lag = lag;
    for reader in readers {
        let part = reader
            .join()
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?;
        measured.latency.add(&part.latency)?;
        measured.errors += part.errors;
    }
    for stream in streams {
        let _ = stream.shutdown(Shutdown::Both);
    }
    Ok(measured)
}

/// Open loop, a new connection per request: `rate` connections per second for
/// `duration`, each sending `payload` bytes and reading them back, then closing.
/// Latency covers connect, request and reply.
pub fn connection_per_request(
    to: SocketAddr,
    rate: f64,
    duration: Duration,
    payload: usize,
) -> Result<Measured> {
    let mut message = vec![ECHO];
    message.extend(std::iter::repeat_n(0x42u8, payload));
    let message = Arc::new(message);
    let (job_tx, job_rx) = mpsc::channel::<Instant>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let workers: Vec<_> = (0..CONNECT_WORKERS)
        .map(|_| {
            let job_rx = Arc::clone(&job_rx);
            let message = Arc::clone(&message);
            std::thread::spawn(move || -> Measured {
                let mut measured = Measured::new();
                let mut reply = vec![0u8; payload];
                loop {
                    let job = job_rx
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .recv();
                    let Ok(due) = job else { return measured };
                    let result = (|| -> std::io::Result<()> {
                        let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
                        stream.set_nodelay(true)?;
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
                        stream.write_all(&message)?;
                        stream.read_exact(&mut reply)?;
                        Ok(())
                    })();
                    match result {
                        Ok(()) => {
                            let _ = measured.latency.record(elapsed_ns(due));
                        }
                        Err(_) => measured.errors += 1,
                    }
                }
            })
        })
        .collect();
    let lag = on_schedule(rate, duration, |_, due| job_tx.send(due).is_ok());
    drop(job_tx);
    let mut measured = Measured::new();
    measured.send_lag = lag;
    for worker in workers {
        let part = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a connect worker panicked"))?;
        measured.latency.add(&part.latency)?;
        measured.errors += part.errors;
    }
    Ok(measured)
}

/// Single-stream upload for `duration`; bytes per second the server received.
pub fn upload(to: SocketAddr, duration: Duration) -> Result<f64> {
    let mut stream = connect(to, UPLOAD)?;
    let chunk = vec![0x5au8; BULK_CHUNK];
    let start = Instant::now();
    while start.elapsed() < duration {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .context("reading the upload count")?;
    Ok(u64::from_be_bytes(count) as f64 / start.elapsed().as_secs_f64())
}

/// Single-stream download for `duration`; bytes per second received.
pub fn download(to: SocketAddr, duration: Duration) -> Result<f64> {
    let mut stream = connect(to, DOWNLOAD)?;
    let millis = u32::try_from(duration.as_millis()).unwrap_or(u32::MAX);
    stream.write_all(&millis.to_be_bytes())?;
    let start = Instant::now();
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Opens `count` echo connections and checks each carries a byte end to end,
/// so every proxy on the path holds its state for it. Closed when dropped.
pub fn open_idle(to: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    (0..count)
        .map(|i| {
            let mut stream = connect(to, ECHO)?;
            round_trip(&mut stream, b"i").with_context(|| format!("idle connection {i}"))?;
            Ok(stream)
        })
        .collect()
}
