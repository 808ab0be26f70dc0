//! Traffic that an upgrade or a restart must not disturb, from one pod to an
//! echo server, of the three kinds users keep open through one:
//!
//! - request/response at a fixed rate over persistent connections;
//! - a new connection for every request;
//! - one long-lived stream that sends a byte every 100 ms and reads it back.
//!
//! Every request carries a marker, so a wire capture can tell whether any of
//! it crossed in plaintext. Each request's outcome is kept with its time, so
//! that a test counts failures and the benchmark reads the latency around a
//! moment (an upgrade) from the same run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{Target, Testbed};

/// How long one step (connect, a reply) may take before it counts as
/// failed: long, so that a busy machine is slow rather than failing.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The rates of a [`SteadyLoad`].
#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    /// Persistent connections, each sending a request every `interval`.
    pub persistent_connections: usize,
    /// Between two requests on one connection, and between two new
    /// connections.
    pub interval: Duration,
}

impl Default for LoadShape {
    fn default() -> LoadShape {
        LoadShape {
            persistent_connections: 2,
            interval: Duration::from_millis(50),
        }
    }
}

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Which kind of traffic.
    pub kind: LoadKind,
    /// When it was sent.
    pub at: Instant,
    /// How long until its reply.
    pub latency: Duration,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The three kinds of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadKind {
    /// A request on a persistent connection.
    Persistent,
    /// A request on a new connection (connect included).
    NewConnection,
    /// A byte on the long-lived stream.
    Stream,
}

/// Traffic running from a pod until [`SteadyLoad::stop`].
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    completed: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

/// What a [`SteadyLoad`] saw.
#[derive(Debug)]
pub struct LoadReport {
    /// Every request, in the order they completed.
    pub samples: Vec<Sample>,
}

impl SteadyLoad {
    /// Starts the traffic from `pod` to the echo server at `to`, each
    /// request carrying `marker`. Every connection is opened inside the
    /// pod, so it is captured as the pod's own.
    pub fn start(
        testbed: &Testbed,
        pod: &str,
        to: SocketAddr,
        marker: &'static [u8],
        shape: LoadShape,
    ) -> Result<SteadyLoad> {
        SteadyLoad::start_in(testbed.netns_file(Target::Pod(pod))?, to, marker, shape)
    }

    /// [`SteadyLoad::start`] from the network namespace `netns` (a real
    /// cluster's pod).
    pub fn start_in(
        netns: std::fs::File,
        to: SocketAddr,
        marker: &'static [u8],
        shape: LoadShape,
    ) -> Result<SteadyLoad> {
        let load = SteadyLoad {
            stop: Arc::new(AtomicBool::new(false)),
            samples: Arc::new(Mutex::new(Vec::new())),
            completed: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        };
        let connect = {
            move || -> std::io::Result<TcpStream> {
                let stream = crate::netns::run_in_file(&netns, || {
                    TcpStream::connect_timeout(&to, STEP_TIMEOUT)
                })
                .map_err(std::io::Error::other)??;
                stream.set_read_timeout(Some(STEP_TIMEOUT))?;
                stream.set_write_timeout(Some(STEP_TIMEOUT))?;
                stream.set_nodelay(true)?;
                Ok(stream)
            }
        };
        let connect = Arc::new(connect);
        let mut load = load;
        for _ in 0..shape.persistent_connections {
            let connect = connect.clone();
            load.spawn(LoadKind::Persistent, shape.interval, move |held| {
                if held.is_none() {
                    *held = Some(connect()?);
                }
                let stream = held
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("no stream"))?;
                round_trip(stream, marker)
            });
        }
        let per_request = connect.clone();
        load.spawn(LoadKind::NewConnection, shape.interval, move |_| {
            round_trip(&mut per_request()?, marker)
        });
        load.spawn(LoadKind::Stream, Duration::from_millis(100), move |held| {
            if held.is_none() {
                let mut stream = connect()?;
                stream.write_all(marker)?;
                read_back(&mut stream, marker)?;
                *held = Some(stream);
            }
            let stream = held
                .as_mut()
                .ok_or_else(|| std::io::Error::other("no stream"))?;
            round_trip(stream, b"*")
        });
        Ok(load)
    }

    /// Runs `request` every `interval` on a thread of its own until
    /// stopped. A failed request on a held connection ends that connection
    /// (the next request opens another).
    fn spawn<F>(&mut self, kind: LoadKind, interval: Duration, mut request: F)
    where
        F: FnMut(&mut Option<TcpStream>) -> std::io::Result<()> + Send + 'static,
    {
        let (stop, samples, completed) = (
            self.stop.clone(),
            self.samples.clone(),
            self.completed.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            let mut held = None;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                let outcome = request(&mut held);
                let latency = at.elapsed();
                if outcome.is_err() {
                    held = None;
                }
                let sample = Sample {
                    kind,
                    at,
                    latency,
                    error: outcome.err().map(|e| e.to_string()),
                };
                samples
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(sample);
                completed.fetch_add(1, Ordering::Relaxed);
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            // The held connection closes here, after the last request.
        }));
    }

    /// Requests completed so far (failed ones included).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests have completed (a busy machine
    /// is slow, not wrong: there is no deadline but the test's own).
    pub fn run_for_requests(&self, more: u64) {
        let target = self.completed() + more;
        while self.completed() < target {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the traffic (closing every connection) and reports.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        let samples = std::mem::take(
            &mut *self
                .samples
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        LoadReport { samples }
    }
}

impl LoadReport {
    /// The requests of `kind`.
    pub fn of(&self, kind: LoadKind) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |sample| sample.kind == kind)
    }

    /// Ok if every request succeeded and every kind of traffic ran; else
    /// what failed or did not run.
    pub fn check_nothing_failed(&self) -> Result<()> {
        let failures = self.failures();
        anyhow::ensure!(failures.is_empty(), "requests failed: {failures:?}");
        for kind in [
            LoadKind::Persistent,
            LoadKind::NewConnection,
            LoadKind::Stream,
        ] {
            anyhow::ensure!(self.of(kind).count() > 0, "no {kind:?} requests ran");
        }
        Ok(())
    }

    /// The failed requests, as `kind: why`.
    pub fn failures(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|sample| {
                let error = sample.error.as_ref()?;
                Some(format!("{:?}: {error}", sample.kind))
            })
            .collect()
    }
}

/// Writes `payload` and reads it back.
fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(payload)?;
    read_back(stream, payload)
}

/// Reads `expected` from `stream`: an error if something else or nothing
/// (the end of the stream) comes.
fn read_back(stream: &mut TcpStream, expected: &[u8]) -> std::io::Result<()> {
    let mut echoed = vec![0; expected.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != expected {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the echo differs from what was sent",
        ));
    }
    Ok(())
}
