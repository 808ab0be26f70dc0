//! `weft-proxy`: the node proxy binary. Parses the config, sets up logging,
//! starts the control side and runs until SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use weft_proxy::{AdminCommand, NodeProxy, ProxyConfig, ReadinessProbeConfig};

fn main() -> anyhow::Result<()> {
    raise_malloc_thresholds();
    match std::env::args().nth(1).as_deref() {
        Some("probe-ready") => {
            return probe_ready(&ReadinessProbeConfig::parse_from(std::env::args().skip(1)));
        }
        Some("admin") => return admin(&AdminCommand::parse_from(std::env::args().skip(1))),
        _ => {}
    }
    let config = ProxyConfig::parse();
    let (log_filter, _log_writer) = weft_proxy::logging::init(&config)?;
    info!(%config, version = env!("CARGO_PKG_VERSION"), "starting weft-proxy");
    raise_file_limit(config.limits.file_descriptors_needed());
    report_worst_case_memory(&config);
    // Control work (config stream, certificates, admin) gets a thread of
    // its own; the data plane runs on this one (or on its workers).
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("weft-control")
        .build()
        .context("starting the control runtime")?;
    let data_plane = runtime(config.worker_threads, config.event_interval)
        .context("starting the data-plane runtime")?;
    if config.bulk_lane_percent > 0 {
        let window = std::time::Duration::from_millis(config.bulk_lane_window_ms);
        weft_proxy::lanes::start_bulk_lane(
            data_plane.handle().clone(),
            weft_proxy::lanes::LaneSettings::new(config.bulk_lane_percent, window),
            config.event_interval,
        )
        .context("starting the bulk lane")?;
    }
    let result = data_plane.block_on(run(config, control.handle().clone(), log_filter));
    weft_proxy::lanes::stop_bulk_lane();
    // The control tasks are stopped by now; do not wait on what is left.
    control.shutdown_background();
    result
}

/// `weft-proxy admin`: one POST on the admin socket; the proxy's answer on
/// stdout, exit status 0 when it took the change.
fn admin(command: &AdminCommand) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let path = command.action.path();
    let socket = command.admin_socket.display();
    let mut stream = std::os::unix::net::UnixStream::connect(&command.admin_socket)
        .with_context(|| format!("connecting to the proxy's admin socket {socket}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .with_context(|| format!("asking on {socket}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer on {socket}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or((answer.as_str(), ""));
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    write!(std::io::stdout(), "{body}").context("writing the answer")?;
    if !status.starts_with('2') {
        anyhow::bail!(
            "the proxy refused: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(())
}

/// Raises the soft limit on open files to what the connection limits may
/// need (the usual soft limit, 1,024, would stop the proxy long before
/// them), within the hard limit; says so if the hard limit is lower.
fn raise_file_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        tracing::warn!("cannot read the limit on open files");
        return;
    };
    let wanted = needed.min(hard);
    if wanted > soft {
        match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
            Ok(()) => info!(open_files = wanted, "raised the limit on open files"),
            Err(error) => tracing::warn!(%error, "cannot raise the limit on open files"),
        }
    }
    if hard < needed {
        tracing::warn!(
            hard_limit = hard,
            needed,
            "the limit on open files is lower than --max-connections may need: lower it, or raise the limit"
        );
    }
}

/// What the proxy may have to hold, said against its memory limit: the
/// limits bound it, but only the operator can tell whether the bound fits.
fn report_worst_case_memory(config: &ProxyConfig) {
    const MIB: u64 = 1024 * 1024;
    // Heap, stacks and config beside the buffers, with room to spare.
    const OWN_USE: u64 = 64 * MIB;
    let worst_case = config.memory_limits.worst_case_bytes(&config.limits);
    let Some(limit) = cgroup_memory_limit() else {
        info!(
            worst_case_mib = worst_case / MIB,
            "the most peers and pods can make this proxy hold in buffers (no memory limit found)"
        );
        return;
    };
    if worst_case.saturating_add(OWN_USE) <= limit {
        info!(
            worst_case_mib = worst_case / MIB,
            memory_limit_mib = limit / MIB,
            "the most peers and pods can make this proxy hold fits its memory limit"
        );
        return;
    }
    match config.memory_limits.connections_fitting(limit, OWN_USE) {
        // The budgets fit; every connection at its buffers' limit at once
        // would not (peers that stop reading on thousands of tunnels).
        Some(fitting) => info!(
            worst_case_mib = worst_case / MIB,
            memory_limit_mib = limit / MIB,
            max_connections_that_fit = fitting,
            "were every connection at its buffers' limit at once, this proxy would hold more \
             than its memory limit: --max-connections bounds that"
        ),
        None => tracing::warn!(
            worst_case_mib = worst_case / MIB,
            memory_limit_mib = limit / MIB,
            "the window and held-buffer budgets alone may take more than this proxy's memory \
             limit: lower --hbone-window-budget-mib or --held-buffer-budget-mib, or raise the limit"
        ),
    }
}

/// The memory limit of the proxy's cgroup (v2, then v1), if it has one.
fn cgroup_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    // "max" (v2) or a near-2^63 number (v1) mean no limit.
    .find_map(|text| text.trim().parse::<u64>().ok())
    .filter(|&bytes| bytes < 1 << 60)
}

/// `weft-proxy probe-ready`: one line on stdout (the kubelet keeps it with
/// the probe's result), exit status 0 when ready.
fn probe_ready(config: &ReadinessProbeConfig) -> anyhow::Result<()> {
    let timeout = std::time::Duration::from_millis(config.timeout_ms);
    match weft_proxy::probe_ready(config.readiness_addr, &config.pod_uid, timeout) {
        Ok(answer) => {
            use std::io::Write;
            writeln!(std::io::stdout(), "{answer}").context("writing the answer")
        }
        Err(why) => anyhow::bail!("not ready: {why}"),
    }
}

/// One thread: a single-threaded runtime, so no task is ever woken on
/// another thread. More: a work-stealing runtime with that many workers.
fn runtime(worker_threads: u16, event_interval: u32) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(worker_threads));
        builder
    };
    builder
        .enable_all()
        .event_interval(event_interval)
        .thread_name("weft-data-plane")
        .build()
}

async fn run(
    config: ProxyConfig,
    control: tokio::runtime::Handle,
    log_filter: weft_proxy::logging::LogFilter,
) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut proxy = NodeProxy::start_in_process(config, control, Some(log_filter)).await?;
    let (drain_requested, handed_over) = (proxy.drain_requested(), proxy.handed_over());
    let mut signalled = true;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received; shutting down"),
        _ = interrupt.recv() => info!("SIGINT received; shutting down"),
        () = drain_requested => info!("drain requested; shutting down"),
        () = handed_over => {
            info!("a new proxy took over: draining, then waiting for SIGTERM");
            signalled = false;
        }
        why = proxy.stopped() => anyhow::bail!("{why}"),
    }
    proxy.shutdown().await;
    if !signalled {
        // Exiting by itself would make Kubernetes restart this container,
        // and the restarted proxy would take the sockets back from the new
        // one: stay, idle, until the pod is deleted.
        info!("drained; waiting for SIGTERM");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
    info!("stopped");
    Ok(())
}

/// glibc's malloc gives the top of its heap back to the kernel whenever
/// more than 128 KiB of it is free. A bulk transfer allocates and frees TLS
/// records and HTTP/2 frames of 16-64 KiB at a high rate, so the heap shrank
/// and grew again all the time, and page faults took a quarter of the
/// proxy's CPU. glibc raises that threshold to twice the size of any
/// `mmap`ed block once it is freed (see `mallopt(3)`, M_MMAP_THRESHOLD), so
/// one 4 MiB block allocated and freed here keeps up to 8 MiB of freed heap
/// for reuse. Other allocators ignore this; it costs nothing there.
fn raise_malloc_thresholds() {
    let block = std::hint::black_box(vec![0u8; 4 << 20]);
    drop(block);
}
