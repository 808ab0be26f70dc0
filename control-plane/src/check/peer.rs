//! `weft-control-plane check-peer`: what the test connection's pods run
//! (hidden from `--help`). `serve` answers every connection with one line;
//! `dial` connects every `--every-ms` and prints what became of each
//! attempt, until it is stopped. Both print to stdout, which is the pod's
//! log.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the throwaway pod does.
#[derive(Clone, Debug, clap::Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    role: Role,
}

#[derive(Clone, Debug, clap::Subcommand)]
enum Role {
    /// Answer every connection with one line.
    Serve {
        /// The port to listen on.
        #[arg(long)]
        port: u16,
    },
    /// Connect again and again, printing each answer or failure.
    Dial {
        /// The server's `ip:port`.
        #[arg(long)]
        to: SocketAddr,
        /// Milliseconds between attempts.
        #[arg(long, default_value_t = 500)]
        every_ms: u64,
    },
}

/// The server's answer.
pub const ANSWER: &[u8] = b"weft-check\n";
/// How long one attempt may take (connect, then the answer).
const ATTEMPT: Duration = Duration::from_secs(2);

/// Runs the pod's role until it is stopped.
#[allow(clippy::print_stdout)] // the pod's log
pub async fn run(args: &PeerArgs) -> std::io::Result<()> {
    match &args.role {
        Role::Serve { port } => {
            // Dual-stack where the pod has IPv6, IPv4 alone where not.
            let listener = match tokio::net::TcpListener::bind(("::", *port)).await {
                Ok(listener) => listener,
                Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", *port)).await?,
            };
            println!("serving on {}", listener.local_addr()?);
            loop {
                let (mut stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        println!("accepting: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                tokio::spawn(async move {
                    let answered = tokio::time::timeout(ATTEMPT, stream.write_all(ANSWER)).await;
                    println!(
                        "{peer}: {}",
                        if matches!(answered, Ok(Ok(()))) {
                            "answered"
                        } else {
                            "could not answer"
                        }
                    );
                });
            }
        }
        Role::Dial { to, every_ms } => loop {
            println!("{to}: {}", attempt(*to).await);
            tokio::time::sleep(Duration::from_millis(*every_ms)).await;
        },
    }
}

/// One connection: what became of it.
async fn attempt(to: SocketAddr) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(to).await?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(ANSWER.len() as u64)
            .read_to_end(&mut answer)
            .await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(ATTEMPT, exchange).await {
        Ok(Ok(answer)) if answer == ANSWER => "answered".into(),
        Ok(Ok(answer)) if answer.is_empty() => "closed without an answer".into(),
        Ok(Ok(answer)) => format!("answered {:?}", String::from_utf8_lossy(&answer)),
        Ok(Err(error)) => format!("failed: {error}"),
        Err(_) => format!("no answer within {ATTEMPT:?}"),
    }
}
