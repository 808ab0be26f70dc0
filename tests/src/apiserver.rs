//! A real kube-apiserver with its own etcd on 127.0.0.1, for tests that need the
//! Kubernetes API itself: authentication, RBAC, admission, TokenRequest and
//! TokenReview, watches. No controller-manager, scheduler or kubelet runs, so
//! nothing acts on the objects a test creates: a test makes the ServiceAccounts its
//! pods use, and writes pod status itself.
//!
//! The binary is the upstream kube-apiserver built from the Kubernetes Go modules
//! in `tests/apiserver/` by `scripts/apiserver.sh build`, which also installs
//! Debian's etcd. `scripts/test.sh` builds it before `cargo test` and passes it in
//! `WEFT_KUBE_APISERVER`; without that variable [`KubeApiServer::start`] runs the
//! script itself (minutes on a cold Go cache, instant after).
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use k8s_openapi::api::core::v1::Namespace;
//! let api = weft_testbed::apiserver::KubeApiServer::start()?;
//! let namespaces: kube::Api<Namespace> = kube::Api::all(api.client().await?);
//! assert!(namespaces.get_opt("default").await?.is_some());
//! # Ok(()) }
//! ```

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// The issuer of the ServiceAccount tokens the API server mints.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audiences the API server accepts in tokens: weft's and the default one.
pub const API_AUDIENCES: [&str; 2] = ["weft", SERVICE_ACCOUNT_ISSUER];
/// How long [`KubeApiServer::start`] and [`KubeApiServer::restart_apiserver`] wait
/// for `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets between SIGTERM and SIGKILL when it is stopped.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running kube-apiserver and its etcd, stopped (and their temp dir removed) on
/// drop. The temp dir with both logs is kept, and its path printed, when the API
/// server failed to become ready or the dropping thread is panicking.
#[derive(Debug)]
pub struct KubeApiServer {
    dir: Option<tempfile::TempDir>,
    binary: PathBuf,
    etcd: Option<Child>,
    etcd_url: String,
    apiserver: Option<Child>,
    port: u16,
    ca_pem: String,
    token: String,
    kubeconfig: PathBuf,
    keep_dir: bool,
}

impl KubeApiServer {
    /// Starts etcd and the API server on free ports of 127.0.0.1 and waits until the
    /// API server is ready. The binary is `WEFT_KUBE_APISERVER`, or what
    /// `scripts/apiserver.sh build` prints.
    pub fn start() -> Result<KubeApiServer> {
        let binary = apiserver_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("weft-apiserver-")
            .tempdir()
            .context("creating the API server's temp dir")?;
        let path = dir.path().to_owned();
        let ca_pem = write_credentials(&path)?;
        let token = random_token()?;
        std::fs::write(
            path.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )?;

        // Hold all three listeners until the ports are chosen, so they differ.
        let listeners = (0..3)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(listeners);
        let (client, peer, port) = (ports[0], ports[1], ports[2]);
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = Command::new("etcd")
            .arg(format!("--data-dir={}", path.join("etcd").display()))
            .args([
                "--name=weft-test".to_owned(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=weft-test={peer_url}"),
                "--logger=zap".to_owned(),
                "--log-outputs=stderr".to_owned(),
            ])
            .stdin(Stdio::null())
            .stdout(log_file(&path.join("etcd.log"))?)
            .stderr(log_file(&path.join("etcd.log"))?)
            .spawn()
            .context("starting etcd (scripts/apiserver.sh build installs it)")?;

        let mut server = KubeApiServer {
            kubeconfig: path.join("kubeconfig"),
            dir: Some(dir),
            binary,
            etcd: Some(etcd),
            etcd_url,
            apiserver: None,
            port,
            ca_pem,
            token,
            keep_dir: false,
        };
        server.write_kubeconfig()?;
        server.start_apiserver()?;
        Ok(server)
    }

    /// Stops the API server and starts it again on the same port with the same etcd,
    /// so every object survives; returns once it is ready again.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        if let Some(child) = self.apiserver.take() {
            stop(child);
        }
        self.start_apiserver()
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The port the API server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PEM of the CA that signed the API server's serving certificate. It is also
    /// the `--client-ca-file`, though no test client certificate is issued.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// A bearer token of user `admin` in group `system:masters`.
    pub fn admin_token(&self) -> String {
        self.token.clone()
    }

    /// A kubeconfig file for the admin: server URL, CA data and token.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client authenticated as the admin.
    pub async fn client(&self) -> Result<kube::Client> {
        let config = self.config().await?;
        kube::Client::try_from(config).context("building a kube client")
    }

    /// The admin's [`kube::Config`], e.g. to change timeouts before building a client.
    pub async fn config(&self) -> Result<kube::Config> {
        config_from(&self.kubeconfig).await
    }

    fn dir(&self) -> Result<&Path> {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .context("the API server was stopped")
    }

    fn write_kubeconfig(&self) -> Result<()> {
        self.write_kubeconfig_for(&self.kubeconfig, &self.token)
    }

    /// Writes a kubeconfig file for this API server that authenticates with
    /// `token` (e.g. a ServiceAccount's, to act as that account).
    pub fn write_kubeconfig_for(&self, path: &Path, token: &str) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-test\n  cluster:\n    \
             server: {}\n    certificate-authority-data: {}\nusers:\n- name: user\n  user:\n    \
             token: {}\ncontexts:\n- name: weft-test\n  context:\n    cluster: weft-test\n    \
             user: user\ncurrent-context: weft-test\n",
            self.url(),
            base64(self.ca_pem.as_bytes()),
            token,
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let dir = self.dir()?.to_owned();
        let log = dir.join("kube-apiserver.log");
        let mut command = Command::new(&self.binary);
        for (flag, name) in [
            ("cert-dir", "certs"),
            ("tls-cert-file", "serving.pem"),
            ("tls-private-key-file", "serving-key.pem"),
            ("client-ca-file", "ca.pem"),
            ("token-auth-file", "tokens.csv"),
            ("service-account-key-file", "sa.pub.pem"),
            ("service-account-signing-key-file", "sa-key.pem"),
        ] {
            command.arg(format!("--{flag}={}", dir.join(name).display()));
        }
        let child = command
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!("--api-audiences={}", API_AUDIENCES.join(",")))
            .args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                // The endpoints of the `kubernetes` Service would be 127.0.0.1,
                // which Endpoints validation rejects: keep that reconciler off.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ])
            .stdin(Stdio::null())
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.apiserver = Some(child);
        self.wait_ready().map_err(|e| {
            self.keep_dir = true;
            let tail = std::fs::read_to_string(&log)
                .map(|text| tail(&text))
                .unwrap_or_default();
            e.context(format!(
                "kube-apiserver not ready; the end of {}:\n{tail}",
                log.display()
            ))
        })
    }

    /// Polls `/readyz` as the admin until it answers `ok`.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // A thread of its own: the caller may be inside a tokio runtime already.
        let (kubeconfig, apiserver, etcd) = (&self.kubeconfig, &mut self.apiserver, &mut self.etcd);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Client::try_from spawns its buffer task: inside the runtime.
                    let client = runtime.block_on(async {
                        anyhow::Ok(kube::Client::try_from(config_from(kubeconfig).await?)?)
                    })?;
                    let mut last = String::new();
                    while Instant::now() < deadline {
                        for (name, child) in
                            [("kube-apiserver", &mut *apiserver), ("etcd", &mut *etcd)]
                        {
                            if let Some(status) =
                                child.as_mut().map(Child::try_wait).transpose()?.flatten()
                            {
                                bail!("{name} exited: {status}");
                            }
                        }
                        let request = http::Request::get("/readyz").body(Vec::new())?;
                        match runtime.block_on(client.request_text(request)) {
                            Ok(body) if body.trim() == "ok" => return Ok(()),
                            Ok(body) => last = body,
                            Err(e) => last = format!("{e:#}"),
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    bail!("/readyz not ok after {READY_TIMEOUT:?}: {last}")
                })
                .join()
                .unwrap_or_else(|_| bail!("the readiness poller panicked"))
        })
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        if let Some(dir) = self.dir.take()
            && (self.keep_dir || std::thread::panicking())
        {
            eprintln!(
                "kube-apiserver and etcd logs kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// The [`kube::Config`] of a kubeconfig file.
async fn config_from(kubeconfig: &Path) -> Result<kube::Config> {
    // kube installs no rustls crypto provider itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let options = kube::config::KubeConfigOptions::default();
    Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?)
}

/// The kube-apiserver binary: `WEFT_KUBE_APISERVER`, or built by the script.
pub(crate) fn apiserver_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEFT_KUBE_APISERVER") {
        return Ok(path.into());
    }
    let script = crate::repo_root().join("scripts/apiserver.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("build")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} build failed: {}", script.display(), output.status);
    }
    let path = String::from_utf8(output.stdout)?.trim().to_owned();
    if path.is_empty() {
        bail!("{} build printed no path", script.display());
    }
    Ok(path.into())
}

/// Writes the CA, the serving certificate and the ServiceAccount key pair into
/// `dir` and returns the CA's PEM.
fn write_credentials(dir: &Path) -> Result<String> {
    let (ca_cert, issuer) = kube_ca("weft test kube CA")?;

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    serving
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let sa_key = KeyPair::generate()?;
    for (name, pem) in [
        ("ca.pem", ca_cert.pem()),
        ("serving.pem", serving_cert.pem()),
        ("serving-key.pem", serving_key.serialize_pem()),
        ("sa-key.pem", sa_key.serialize_pem()),
        ("sa.pub.pem", sa_key.public_key_pem()),
    ] {
        std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
    }
    Ok(ca_cert.pem())
}

/// A self-signed CA for a test cluster's API server (serving and client
/// certificates), named `common_name`, and the issuer that signs with it.
pub(crate) fn kube_ca(common_name: &str) -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    Ok((ca_cert, Issuer::new(ca, ca_key)))
}

/// 32 random bytes from the kernel, hex-encoded.
pub(crate) fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL; always reaps.
fn stop(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_pads() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foob"), "Zm9vYg==");
    }
}
