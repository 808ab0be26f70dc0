//! Two lanes for the data plane's tasks, so that one pod's bulk transfer
//! does not make another pod's requests wait.
//!
//! The data plane runs on one thread. A bulk transfer keeps its tasks (the
//! copy loop, the HTTP/2 connection that encrypts it) runnable all the
//! time, and the kernel sees that thread as a CPU hog: a neighbour's
//! request, ready on its socket, waits for the bulk transfer's turns and
//! for the thread's next time slice, at each proxy of its path
//! (bench/RESULTS.md, noisy neighbour: ~1.8 ms at p50 where it took 0.27 ms
//! alone).
//!
//! So each connection task is metered: the time spent in its polls, per
//! window (confirmed by the thread's CPU clock, so that a node too busy to
//! run the proxy does not make every task look busy). A task that keeps
//! its thread busy for more than a share of a window moves to the *bulk
//! lane*, a second single-threaded runtime on a thread of its own. The
//! data-plane thread then carries only tasks that mostly sleep, and the
//! kernel runs it at once when one of them has work, as it does any thread
//! that sleeps more than it runs. A task that has been quiet on the bulk
//! lane for a while comes back (its next poll happens on the data-plane
//! thread).
//!
//! A task moves between polls, as a whole: its sockets stay registered with
//! the data-plane runtime's driver, which wakes it on the bulk lane. The
//! task that [`movable`] returns stays where it was spawned and stands for
//! the moved one: it ends when the moved task ends, and aborting or
//! dropping it drops the moved task, so `JoinSet`s and drains keep working.
//!
//! Not here: which connections exist or how they are copied; this only
//! decides where their tasks run.

use std::future::{Future, poll_fn};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

/// How tasks are metered and when they move.
#[derive(Clone, Copy, Debug)]
pub struct LaneSettings {
    /// The span over which a task's busy time is summed.
    pub window: Duration,
    /// Busy time within one window that makes a task bulk.
    pub bulk_after: Duration,
    /// A bulk task busy less than this in every window for
    /// [`LaneSettings::quiet_for`] comes back.
    pub quiet_below: Duration,
    /// See [`LaneSettings::quiet_below`].
    pub quiet_for: Duration,
}

impl LaneSettings {
    /// Settings from the proxy's config: a task busy more than `percent` of
    /// `window` is bulk; one busy less than a tenth of that for a second
    /// (or ten windows, if longer) is not any more.
    pub fn new(percent: u8, window: Duration) -> LaneSettings {
        let bulk_after = window.mul_f64(f64::from(percent.min(100)) / 100.0);
        LaneSettings {
            window,
            bulk_after,
            quiet_below: bulk_after / 10,
            quiet_for: (window * 10).max(Duration::from_secs(1)),
        }
    }
}

struct Lanes {
    home: tokio::runtime::Handle,
    bulk: tokio::runtime::Handle,
    settings: LaneSettings,
    /// Ends the bulk lane's thread, and that thread, for [`stop_bulk_lane`].
    stop: Mutex<Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>>,
}

static LANES: OnceLock<Lanes> = OnceLock::new();

/// Moves to the bulk lane and back, and the tasks on the bulk lane now.
static MOVED_TO_BULK: AtomicU64 = AtomicU64::new(0);
static MOVED_HOME: AtomicU64 = AtomicU64::new(0);
static ON_BULK_LANE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Which lane this thread runs: the bulk lane's thread says so; every
    /// other thread counts as home.
    static THIS_LANE: std::cell::Cell<Lane> = const { std::cell::Cell::new(Lane::Home) };
}

/// Starts the bulk lane beside `home` (the data plane's runtime) for the
/// whole process. Once per process; a second call changes nothing. Until
/// it is called (in tests that run the data plane in process), [`movable`]
/// tasks stay where they are spawned.
pub fn start_bulk_lane(
    home: tokio::runtime::Handle,
    settings: LaneSettings,
    event_interval: u32,
) -> std::io::Result<()> {
    static STARTING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = STARTING.lock().unwrap_or_else(PoisonError::into_inner);
    if LANES.get().is_some() {
        return Ok(());
    }
    let lanes = Lanes::start(home, settings, event_interval)?;
    let _ = LANES.set(lanes);
    tracing::info!(
        bulk_after = ?settings.bulk_after,
        window = ?settings.window,
        "bulk lane started"
    );
    Ok(())
}

impl Lanes {
    /// A single-threaded runtime on a thread of its own, beside `home`.
    fn start(
        home: tokio::runtime::Handle,
        settings: LaneSettings,
        event_interval: u32,
    ) -> std::io::Result<Lanes> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .event_interval(event_interval)
            .build()?;
        let bulk = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("weft-bulk-lane".into())
            .spawn(move || {
                THIS_LANE.set(Lane::Bulk);
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Drops the tasks still here while the data plane's
                // runtime, whose sockets and timers they hold, still runs.
                drop(runtime);
            })?;
        Ok(Lanes {
            home,
            bulk,
            settings,
            stop: Mutex::new(Some((stop, thread))),
        })
    }
}

/// Stops the bulk lane, dropping the tasks on it: call it before the data
/// plane's runtime is dropped (their sockets and timers are that runtime's).
/// Does nothing if there is no bulk lane or it was stopped already.
pub fn stop_bulk_lane() {
    let Some(lanes) = LANES.get() else {
        return;
    };
    let stop = lanes
        .stop
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some((stop, thread)) = stop {
        let _ = stop.send(());
        if thread.join().is_err() {
            tracing::warn!("the bulk lane's thread panicked while stopping");
        }
    }
}

/// `task`, metered: spawn the returned future where `task` would have been
/// spawned. When `task` turns out to be bulk it continues on the bulk lane
/// (and comes back when quiet); the returned future ends with it.
pub fn movable<T: Send + 'static>(
    task: impl Future<Output = T> + Send + 'static,
) -> impl Future<Output = T> + Send + 'static {
    movable_on(LANES.get(), task)
}

async fn movable_on<T: Send + 'static>(
    lanes: Option<&'static Lanes>,
    task: impl Future<Output = T> + Send + 'static,
) -> T {
    let Some(lanes) = lanes else {
        return task.await;
    };
    let mut task = task.boxed();
    let mut lane = Lane::Home;
    loop {
        let step = if THIS_LANE.get() == lane {
            run_metered(task, lanes, lane).await
        } else {
            let runtime = match lane {
                Lane::Home => &lanes.home,
                Lane::Bulk => &lanes.bulk,
            };
            let mut moved = AbortOnDrop(runtime.spawn(run_metered(task, lanes, lane)));
            match (&mut moved.0).await {
                Ok(step) => step,
                Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
                // The bulk lane was stopped (the proxy is exiting) or the
                // data plane's runtime is going: nothing is left to run.
                Err(_) => return std::future::pending().await,
            }
        };
        match step {
            Step::Done(output) => return output,
            Step::Move(moving) => {
                task = moving;
                lane = lane.other();
            }
        }
    }
}

/// Aborts the moved task when the task standing for it is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Lane {
    Home,
    Bulk,
}

impl Lane {
    fn other(self) -> Lane {
        match self {
            Lane::Home => Lane::Bulk,
            Lane::Bulk => Lane::Home,
        }
    }
}

enum Step<T> {
    Done(T),
    /// Between two polls: to the other lane.
    Move(BoxFuture<'static, T>),
}

/// Counts a task on the bulk lane while it is there.
struct OnBulkLane;

impl OnBulkLane {
    fn enter() -> OnBulkLane {
        ON_BULK_LANE.fetch_add(1, Ordering::Relaxed);
        OnBulkLane
    }
}

impl Drop for OnBulkLane {
    fn drop(&mut self) {
        ON_BULK_LANE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polls `task` until it ends or belongs on the other lane.
///
/// Time in a poll is read from the wall clock (cheap: a vDSO call) while a
/// task looks quiet. On a busy node a poll can take long because the
/// thread was preempted, not because the task worked: so a task whose wall
/// time crosses the bulk level is timed by the thread's CPU clock (a
/// system call, ~0.3 µs) for a window, and moves only if that confirms it.
/// On the bulk lane tasks are always timed by the CPU clock: deciding that
/// one is quiet must not depend on how busy the node is either.
async fn run_metered<T>(
    mut task: BoxFuture<'static, T>,
    lanes: &'static Lanes,
    lane: Lane,
) -> Step<T> {
    let settings = lanes.settings;
    let _counted = (lane == Lane::Bulk).then(OnBulkLane::enter);
    let mut meter = Meter::new(Instant::now());
    let mut by_cpu = lane == Lane::Bulk;
    // A task moves back only after a poll here: its first poll on a lane
    // is what makes its wakers point to that lane.
    let mut polled_here = false;
    let output = poll_fn(|cx| {
        let start = Instant::now();
        if let Some(closed) = meter.roll(start, &settings) {
            // A confirmation window that did not confirm: wall time again.
            if lane == Lane::Home && by_cpu && closed <= settings.bulk_after {
                by_cpu = false;
            }
        }
        if lane == Lane::Bulk && polled_here && meter.quiet(start, &settings) {
            return Poll::Ready(None);
        }
        let cpu_start = if by_cpu { thread_cpu_time() } else { None };
        // What the task makes while on the bulk lane (streams it spawns,
        // timers, sockets it dials) belongs to the data plane's runtime,
        // as its sockets do: nothing of it waits behind bulk work, and it
        // stays valid when the task comes home.
        let home_context = (lane == Lane::Bulk).then(|| lanes.home.enter());
        let polled = task.as_mut().poll(cx);
        drop(home_context);
        polled_here = true;
        let spent = match cpu_start.zip(thread_cpu_time()) {
            Some((before, after)) => after.saturating_sub(before),
            None => start.elapsed(),
        };
        meter.busy += spent;
        match polled {
            Poll::Ready(output) => Poll::Ready(Some(output)),
            Poll::Pending if lane == Lane::Home && meter.busy > settings.bulk_after => {
                if by_cpu {
                    return Poll::Ready(None);
                }
                by_cpu = true;
                meter.restart(Instant::now());
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    // `None`: the task belongs on the other lane.
    match output {
        Some(output) => Step::Done(output),
        None => {
            tracing::debug!(to = ?lane.other(), "a connection task changes lanes");
            match lane {
                Lane::Home => MOVED_TO_BULK.fetch_add(1, Ordering::Relaxed),
                Lane::Bulk => MOVED_HOME.fetch_add(1, Ordering::Relaxed),
            };
            Step::Move(task)
        }
    }
}

/// The CPU time this thread has used, if the clock can be read.
fn thread_cpu_time() -> Option<Duration> {
    use nix::time::{ClockId, clock_gettime};
    let now = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(Duration::from(now))
}

/// `weft_proxy_lane_moves_total{to}` and `weft_proxy_bulk_lane_tasks`,
/// read at each scrape.
#[derive(Debug)]
pub struct LaneMetrics;

impl prometheus_client::collector::Collector for LaneMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let moves = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "weft_proxy_lane_moves",
            "Connection tasks moved to the bulk lane (busy) or back home (quiet)",
            None,
            moves.metric_type(),
        )?;
        for (to, count) in [
            ("bulk", MOVED_TO_BULK.load(Ordering::Relaxed)),
            ("home", MOVED_HOME.load(Ordering::Relaxed)),
        ] {
            let labels = [("to", to)];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        let tasks = ConstGauge::new(ON_BULK_LANE.load(Ordering::Relaxed));
        let metric = encoder.encode_descriptor(
            "weft_proxy_bulk_lane_tasks",
            "Connection tasks on the bulk lane now",
            None,
            tasks.metric_type(),
        )?;
        tasks.encode(metric)
    }
}

/// A task's busy time in the current window, and when a window last saw
/// more than the quiet level.
struct Meter {
    window_start: Instant,
    busy: Duration,
    last_busy: Instant,
}

impl Meter {
    fn new(now: Instant) -> Meter {
        Meter {
            window_start: now,
            busy: Duration::ZERO,
            last_busy: now,
        }
    }

    /// Starts a new window when the current one is over; the busy time
    /// of the window that closed, if one did.
    fn roll(&mut self, now: Instant, settings: &LaneSettings) -> Option<Duration> {
        if now.saturating_duration_since(self.window_start) < settings.window {
            return None;
        }
        let closed = self.busy;
        if closed >= settings.quiet_below {
            // When that busy time was spent: within the window, however
            // long after it the next poll came.
            self.last_busy = (self.window_start + settings.window).min(now);
        }
        self.restart(now);
        Some(closed)
    }

    /// Starts a new window now.
    fn restart(&mut self, now: Instant) {
        self.window_start = now;
        self.busy = Duration::ZERO;
    }

    /// Whether every window for the quiet span stayed under the quiet level.
    fn quiet(&self, now: Instant, settings: &LaneSettings) -> bool {
        self.busy < settings.quiet_below
            && now.saturating_duration_since(self.last_busy) >= settings.quiet_for
    }
}

#[cfg(test)]
#[path = "lanes_tests.rs"]
mod tests;
