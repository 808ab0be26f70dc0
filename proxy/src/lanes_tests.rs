//! Tests of `lanes`: moves between the lanes, what a moved task keeps,
//! and the meter.

use super::*;

fn settings() -> LaneSettings {
    LaneSettings::new(20, Duration::from_millis(50))
}

#[test]
fn settings_follow_the_share() {
    let s = settings();
    assert_eq!(s.bulk_after, Duration::from_millis(10));
    assert_eq!(s.quiet_below, Duration::from_millis(1));
    assert_eq!(s.quiet_for, Duration::from_secs(1));
}

/// A home runtime, and lanes with `settings` beside it.
fn lanes_with(settings: LaneSettings) -> (tokio::runtime::Runtime, &'static Lanes) {
    let home = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let lanes = Lanes::start(home.handle().clone(), settings, 2).expect("the bulk lane");
    (home, Box::leak(Box::new(lanes)))
}

/// Lanes under which a task changes lanes at (nearly) every poll.
fn restless() -> (tokio::runtime::Runtime, &'static Lanes) {
    lanes_with(LaneSettings {
        window: Duration::from_secs(3600),
        bulk_after: Duration::ZERO,
        quiet_below: Duration::from_secs(3600),
        quiet_for: Duration::ZERO,
    })
}

/// The lanes a task ran its 40 turns on, each turn taking `turn` and
/// yielding.
fn lanes_of_turns(turn: fn()) -> std::collections::HashSet<Lane> {
    let (home, lanes) = lanes_with(settings());
    let task = movable_on(Some(lanes), async move {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            seen.insert(THIS_LANE.get());
            turn();
            tokio::task::yield_now().await;
        }
        seen
    });
    home.block_on(async { tokio::spawn(task).await })
        .expect("the task")
}

#[test]
fn a_task_that_burns_cpu_moves_to_the_bulk_lane() {
    // 5 ms of CPU a turn: past 10 ms of a 50 ms window in three turns.
    let seen = lanes_of_turns(|| {
        let start = thread_cpu_time().expect("the thread's CPU clock");
        while thread_cpu_time().expect("the CPU clock") - start < Duration::from_millis(5) {}
    });
    assert!(seen.contains(&Lane::Bulk), "{seen:?}");
}

/// Pending until the task has moved to the bulk lane (under `restless`,
/// the second pending poll moves it: the first starts timing it by the CPU
/// clock), at most 100 turns.
async fn yield_until_on_the_bulk_lane() {
    for _ in 0..100 {
        if THIS_LANE.get() == Lane::Bulk {
            return;
        }
        tokio::task::yield_now().await;
    }
}

#[test]
fn what_a_task_spawns_on_the_bulk_lane_runs_home() {
    let (home, lanes) = restless();
    let task = movable_on(Some(lanes), async {
        yield_until_on_the_bulk_lane().await;
        let spawned_from = THIS_LANE.get();
        let ran_on = tokio::spawn(async { THIS_LANE.get() }).await;
        (spawned_from, ran_on.expect("the spawned task"))
    });
    let (from, on) = home
        .block_on(async { tokio::spawn(task).await })
        .expect("the task");
    assert_eq!((from, on), (Lane::Bulk, Lane::Home));
}

#[test]
fn a_task_whose_thread_is_off_the_cpu_stays_home() {
    // Each turn takes 5 ms of wall time off the CPU, as a preempted
    // thread on a busy node does: the wall clock says busy, the CPU
    // clock does not, and the task stays.
    let seen = lanes_of_turns(|| std::thread::sleep(Duration::from_millis(5)));
    assert_eq!(seen, std::collections::HashSet::from([Lane::Home]));
}

#[test]
fn a_task_that_changes_lanes_at_every_poll_carries_a_connection_intact() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (home, lanes) = restless();
    let (seen, moved) = home
        .block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?;
            // An echo server whose task moves between the lanes.
            let server = tokio::spawn(movable_on(Some(lanes), async move {
                let (mut socket, _) = listener.accept().await?;
                let mut seen = std::collections::HashSet::new();
                let mut buffer = vec![0u8; 4096];
                loop {
                    seen.insert(THIS_LANE.get());
                    let read = socket.read(&mut buffer).await?;
                    if read == 0 {
                        return std::io::Result::Ok(seen);
                    }
                    socket.write_all(&buffer[..read]).await?;
                    // A turn ends here at least: a chance to move.
                    tokio::task::yield_now().await;
                }
            }));
            let mut client = tokio::net::TcpStream::connect(address).await?;
            let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            let (mut reader, mut writer) = client.split();
            let mut echoed = Vec::new();
            let (written, read) = tokio::join!(
                async {
                    for chunk in sent.chunks(1000) {
                        writer.write_all(chunk).await?;
                    }
                    writer.shutdown().await
                },
                reader.read_to_end(&mut echoed)
            );
            written?;
            read?;
            assert_eq!(echoed, sent, "the echo came back whole and in order");
            let seen = server.await.expect("the server task")?;
            std::io::Result::Ok((seen, echoed.len()))
        })
        .expect("the echo");
    assert_eq!(moved, 200_000);
    assert!(
        seen.contains(&Lane::Home) && seen.contains(&Lane::Bulk),
        "the task ran on both lanes: {seen:?}"
    );
}

#[test]
fn dropping_the_task_that_stands_for_a_moved_one_drops_it() {
    let (home, lanes) = restless();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    struct Guard(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    home.block_on(async move {
        let (running_tx, running_rx) = tokio::sync::oneshot::channel::<Lane>();
        let task = tokio::spawn(movable_on(Some(lanes), async move {
            let _guard = Guard(Some(dropped_tx));
            yield_until_on_the_bulk_lane().await;
            let _ = running_tx.send(THIS_LANE.get());
            std::future::pending::<()>().await;
        }));
        let lane = running_rx.await.expect("the task runs");
        assert_eq!(lane, Lane::Bulk, "it moved to the bulk lane");
        task.abort();
        dropped_rx
            .await
            .expect("aborting the standing task dropped the moved one");
    });
}

#[test]
fn a_burst_is_dated_by_its_window_not_by_the_next_poll() {
    // A burst, then nothing for two seconds: the poll that closes the
    // burst's window finds the task quiet since the window ended.
    let s = settings();
    let t0 = Instant::now();
    let mut meter = Meter::new(t0);
    meter.busy = Duration::from_millis(5);
    let later = t0 + Duration::from_secs(2);
    meter.roll(later, &s);
    assert!(meter.quiet(later, &s));
}

#[test]
fn a_busy_window_keeps_a_task_from_being_quiet() {
    let s = settings();
    let t0 = Instant::now();
    let mut meter = Meter::new(t0);
    meter.busy = Duration::from_millis(5);
    meter.roll(t0 + Duration::from_millis(60), &s);
    assert_eq!(meter.busy, Duration::ZERO);
    assert!(!meter.quiet(t0 + Duration::from_millis(900), &s));
    // A second of windows under the quiet level: quiet.
    meter.roll(t0 + Duration::from_millis(1100), &s);
    assert!(meter.quiet(t0 + Duration::from_millis(1100), &s));
    assert!(!meter.quiet(t0 + Duration::from_millis(1000), &s));
}
