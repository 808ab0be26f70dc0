//! `weft-control-plane check`: can weft be installed here, and is the
//! installed mesh healthy? One line per check, ✓ or ✗ with the reason and
//! what to do; the exit code says whether all passed, `-o json` prints the
//! same for machines.
//!
//! - `check --pre` (`preflight.rs`), before installing: the API server's
//!   version, weft's CRDs (absent, or the ones this binary ships), the
//!   permissions the install needs, the nodes' kernels.
//! - `check` (`mesh.rs`), after: the control plane ready, a proxy on every
//!   node that runs pods of the mesh, each on its latest config and not
//!   refusing, certificates valid, no manifest refused, policies Accepted;
//!   then (`connection.rs`) a test connection between two pods of a
//!   throwaway namespace is mutual TLS and is refused by a throwaway DENY.
//!
//! It reads what the dashboard draws (the control plane's monitoring port,
//! through the API server's pod proxy or at `--url`), and the API server
//! with the user's own credentials (`KUBECONFIG`); it never changes weft's
//! objects. `peer.rs` is what the throwaway pods run.

mod connection;
mod mesh;
pub mod peer;
mod preflight;

use std::time::Duration;

use serde::Serialize;

/// What to check, and where.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// Run the pre-install checks against the API server (`KUBECONFIG`)
    /// instead of checking an installed mesh.
    #[arg(long)]
    pub pre: bool,
    /// A control-plane replica's monitoring address, e.g.
    /// `http://127.0.0.1:15014` (a `kubectl port-forward`); once per
    /// replica. Without it, every control-plane pod in `--namespace` is
    /// asked through the API server's pod proxy.
    #[arg(long = "url")]
    pub urls: Vec<String>,
    /// A certificate valid for less than this long fails the check, in
    /// seconds (they are renewed at half their lifetime, 12 h by default).
    #[arg(long, default_value_t = 3600)]
    pub min_certificate_validity_seconds: i64,
    /// How long one request may take, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_seconds: u64,
    /// Leave out the test connection through a throwaway namespace (it
    /// needs the API server: create a namespace, pods and a policy).
    #[arg(long)]
    pub skip_connection_test: bool,
    /// The image the throwaway pods run (`weft-control-plane check-peer`);
    /// by default the control plane's own.
    #[arg(long)]
    pub test_image: Option<String>,
    /// How long the test connection may take to be reported, each of its
    /// two steps, in seconds (proxies report every 10 s by default).
    #[arg(long, default_value_t = 120)]
    pub connection_test_timeout_seconds: u64,
    /// Keep the throwaway namespace afterwards, to look into a failure.
    #[arg(long)]
    pub keep_test_namespace: bool,
    /// `text` (✓/✗ lines) or `json`.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = CheckOutput::Text)]
    pub output: CheckOutput,
}

/// How the results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckOutput {
    /// One line per check.
    Text,
    /// One JSON document.
    Json,
}

/// One check's result.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CheckResult {
    /// What was checked.
    pub check: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why it failed (or what it found).
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl CheckResult {
    fn pass(check: &str, detail: String) -> CheckResult {
        CheckResult {
            check: check.to_owned(),
            passed: true,
            detail,
            fix: String::new(),
        }
    }

    fn fail(check: &str, detail: String, fix: &str) -> CheckResult {
        CheckResult {
            check: check.to_owned(),
            passed: false,
            detail,
            fix: fix.to_owned(),
        }
    }
}

/// Where weft runs: its namespace and trust domain (the control plane's
/// own flags).
#[derive(Clone, Debug)]
pub struct Installation {
    /// The control plane's namespace.
    pub namespace: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

/// Runs every check; the results in order.
pub async fn run(args: &CheckArgs, installation: &Installation) -> Vec<CheckResult> {
    let client = api_client(Duration::from_secs(args.timeout_seconds)).await;
    if args.pre {
        return match client {
            Ok(client) => preflight::run(&client, &installation.namespace).await,
            Err(error) => vec![no_api_server(&error)],
        };
    }
    // The API server is optional with --url: the local-manifests sandbox
    // has none.
    let replicas = match mesh::replicas(args, client.as_ref().ok(), installation).await {
        Ok(replicas) => replicas,
        Err(result) => return vec![result],
    };
    let (mut results, connected) = mesh::run(&replicas, args, &installation.namespace).await;
    // With --url and --skip-connection-test only the monitoring port is
    // asked: a KUBECONFIG of another cluster must not speak for this one.
    let use_api = args.urls.is_empty() || !args.skip_connection_test;
    if let (Ok(client), true) = (&client, use_api) {
        results.push(mesh::proxies_scheduled(client, &installation.namespace).await);
    }
    if args.skip_connection_test || results.is_empty() {
        return results;
    }
    if results.iter().any(|r| !r.passed) {
        results.push(CheckResult::fail(
            connection::CHECK,
            "not run while a check above fails".into(),
            "fix what failed above first",
        ));
        return results;
    }
    match &client {
        Ok(client) => {
            let test = connection::Test {
                client,
                replicas: &replicas,
                nodes: &connected,
                args,
                installation,
            };
            results.extend(test.run().await);
        }
        Err(error) => results.push(no_api_server(error)),
    }
    results
}

/// A client of the API server from `KUBECONFIG` (or in-cluster) whose
/// every request gives up after `timeout`: a check never hangs.
async fn api_client(timeout: Duration) -> Result<kube::Client, String> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| format!("no API server configured (KUBECONFIG or in-cluster): {e}"))?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    kube::Client::try_from(config).map_err(|e| format!("a client of the API server: {e}"))
}

fn no_api_server(error: &str) -> CheckResult {
    CheckResult::fail(
        "API server reachable",
        error.to_owned(),
        "set KUBECONFIG to a cluster admin's kubeconfig (on the local-manifests sandbox, pass --url and --skip-connection-test)",
    )
}

/// The results as the user reads them.
pub fn render(results: &[CheckResult]) -> String {
    let mut out = String::new();
    for result in results {
        let mark = if result.passed { "✓" } else { "✗" };
        out += &format!("{mark} {}: {}\n", result.check, result.detail);
        if !result.fix.is_empty() {
            out += &format!("    → {}\n", result.fix);
        }
    }
    out
}

/// What the API server said: the message of its refusal rather than the
/// whole status object.
fn said(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}
