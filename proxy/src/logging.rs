//! Logging: the subscriber the binary installs, and [`LogFilter`], the handle
//! through which the admin endpoint changes what is logged while the proxy
//! runs (turn on `debug` for one module at 3 a.m., without a restart that
//! would drop every connection on the node).
//!
//! Lines are written by a thread of their own, never by the thread that
//! logs: a slow or blocked sink (a full pipe to the container runtime)
//! must not stall the data plane, which logs every connection. When the
//! writer falls more than `--log-buffer-lines` behind, new lines are
//! dropped and counted ([`dropped_lines`], the metric
//! `weft_proxy_log_lines_dropped_total`).

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tracing::level_filters::LevelFilter;
use tracing_log::AsLog;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::{Error, LogFormat, ProxyConfig};

/// The filter layer the subscriber is built on; [`LogFilter`] swaps what it holds.
pub type FilterLayer = reload::Layer<EnvFilter, Registry>;

/// The live log filter, shared with the admin endpoint.
#[derive(Clone, Debug)]
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives as given: `EnvFilter`'s own rendering reorders them.
    current: Arc<Mutex<String>>,
}

impl LogFilter {
    /// A filter from `directives` (EnvFilter syntax), and the layer it controls.
    pub fn new(directives: &str) -> Result<(LogFilter, FilterLayer), Error> {
        let (layer, handle) = reload::Layer::new(parse(directives)?);
        let filter = LogFilter {
            handle,
            current: Arc::new(Mutex::new(directives.to_owned())),
        };
        Ok((filter, layer))
    }

    /// The directives in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter. A filter that does not parse changes nothing.
    pub fn set(&self, directives: &str) -> Result<(), Error> {
        let filter = parse(directives)?;
        // Hold the lock across the swap so `current` never names a filter
        // that lost a race with a concurrent `set`.
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        self.handle.reload(filter).map_err(|e| Error::Logging {
            operation: "reloading",
            reason: e.to_string(),
        })?;
        directives.clone_into(&mut current);
        // Crates that log through `log` (rustls) are filtered by its own
        // maximum, fixed when the subscriber was installed: follow along.
        tracing_log::log::set_max_level(LevelFilter::current().as_log());
        Ok(())
    }
}

/// What the writer thread dropped, once the subscriber is installed.
static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Log lines dropped because the sink did not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |dropped| dropped.dropped_lines() as u64)
}

/// `weft_proxy_log_lines_dropped_total`, read from the writer at each
/// scrape.
#[derive(Debug)]
pub struct DroppedLinesMetric;

impl prometheus_client::collector::Collector for DroppedLinesMetric {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter = prometheus_client::metrics::counter::ConstCounter::new(dropped_lines());
        let metric = encoder.encode_descriptor(
            "weft_proxy_log_lines_dropped",
            "Log lines dropped because the log sink did not keep up",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// Keeps the writer thread running; dropping it flushes what is buffered
/// and stops the thread. Hold it until the process exits.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogWriterGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

/// Installs the process-wide subscriber: `config.log_level` as the filter,
/// in `config.log_format`, colours only on a terminal, written to stdout
/// by a thread of its own.
pub fn init(config: &ProxyConfig) -> Result<(LogFilter, LogWriterGuard), Error> {
    let (filter, layer) = LogFilter::new(&config.log_level)?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(config.log_buffer_lines)
        .thread_name("weft-log-writer")
        .finish(std::io::stdout());
    let _ = DROPPED.set(writer.error_counter());
    let (text, json) = match config.log_format {
        LogFormat::Text => (Some(fmt::layer().with_ansi(ansi).with_writer(writer)), None),
        LogFormat::Json => (None, Some(fmt::layer().json().with_writer(writer))),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|e| Error::Logging {
            operation: "installing",
            reason: e.to_string(),
        })?;
    Ok((filter, LogWriterGuard(guard)))
}

fn parse(directives: &str) -> Result<EnvFilter, Error> {
    EnvFilter::try_new(directives).map_err(|e| Error::ParseLogFilter {
        directives: directives.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn set_changes_what_is_enabled_and_a_bad_filter_changes_nothing() {
        let (filter, layer) = LogFilter::new("info").unwrap();
        let _default = tracing_subscriber::registry().with(layer).set_default();
        assert!(tracing::enabled!(Level::INFO));
        assert!(!tracing::enabled!(Level::DEBUG));

        filter.set("debug").unwrap();
        assert!(tracing::enabled!(Level::DEBUG));
        assert_eq!(filter.current(), "debug");
        assert!(
            tracing_log::log::max_level() >= tracing_log::log::LevelFilter::Debug,
            "rustls's records too"
        );

        let refused = filter.set("weft_proxy=loud").unwrap_err();
        assert!(
            matches!(&refused, Error::ParseLogFilter { directives, .. } if directives == "weft_proxy=loud"),
            "{refused}"
        );
        assert_eq!(filter.current(), "debug");
        assert!(tracing::enabled!(Level::DEBUG));

        filter.set("warn").unwrap();
        assert!(!tracing::enabled!(Level::INFO));
    }
}
