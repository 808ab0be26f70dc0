//! The `weft-control-plane` binary.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft_control_plane::config::{Command, ControlPlaneConfig, LogFormat};

#[tokio::main]
#[allow(clippy::print_stdout)] // `crds`, `explain` and `check` print for the user
async fn main() -> anyhow::Result<()> {
    let config = ControlPlaneConfig::parse();
    match &config.command {
        Some(Command::Crds) => {
            print!("{}", weft_control_plane::crd::crds_yaml());
            return Ok(());
        }
        Some(Command::Explain(args)) => {
            let cluster = weft_control_plane::explain::load_cluster(&config).await?;
            let trust = weft_api::v1::TrustBundle {
                trust_domain: config.trust_domain.clone(),
                roots_pem: String::new(),
            };
            let explanation =
                weft_control_plane::explain::explain(&cluster, trust, &config.namespace, args)
                    .map_err(anyhow::Error::msg)?;
            print!("{}", explanation.report);
            std::process::exit(if explanation.allowed { 0 } else { 1 });
        }
        Some(Command::Check(args)) => {
            let installation = weft_control_plane::check::Installation {
                namespace: config.namespace.clone(),
                trust_domain: config.trust_domain.clone(),
            };
            let results = weft_control_plane::check::run(args, &installation).await;
            match args.output {
                weft_control_plane::check::CheckOutput::Text => {
                    print!("{}", weft_control_plane::check::render(&results));
                }
                weft_control_plane::check::CheckOutput::Json => {
                    println!("{}", serde_json::to_string_pretty(&results)?);
                }
            }
            std::process::exit(if results.iter().all(|r| r.passed) {
                0
            } else {
                1
            });
        }
        Some(Command::CheckPeer(args)) => {
            weft_control_plane::check::peer::run(args).await?;
            return Ok(());
        }
        Some(Command::Uninstall(_)) | None => {}
    }
    let filter = EnvFilter::try_new(&config.log_level).context("parsing --log-level")?;
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    if let Some(Command::Uninstall(args)) = &config.command {
        let client = weft_control_plane::kubernetes::connect().await?;
        weft_control_plane::kubernetes::announce_uninstall(client, &config.namespace, args).await?;
        return Ok(());
    }
    tracing::info!(config = %serde_json::to_string(&config)?, "starting weft-control-plane");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
    };
    weft_control_plane::app::run(config, shutdown).await?;
    Ok(())
}
