//! The credentials of a real cluster: one CA for the API server's serving
//! certificate and the client certificate it shows kubelets, the
//! ServiceAccount signing key, and a static bearer token per component
//! (admin, controller-manager, scheduler, kube-proxy, each kubelet as
//! `system:node:<name>` so that the Node authorizer and NodeRestriction see
//! a real node).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};

/// A component's name toward the API server: its user and groups.
#[derive(Debug, Clone)]
pub(super) struct Account {
    pub user: String,
    pub groups: Vec<String>,
    pub token: String,
}

/// The files every control-plane component and kubelet reads.
#[derive(Debug)]
pub(super) struct Credentials {
    pub dir: PathBuf,
    pub accounts: Vec<Account>,
}

impl Credentials {
    /// Writes the CA, the serving and kubelet-client certificates, the
    /// ServiceAccount key pair and `tokens.csv` into `dir`, with a token for
    /// the admin, the controller-manager, the scheduler, kube-proxy and a
    /// kubelet per node name.
    pub fn write(dir: &Path, apiserver_ip: Ipv4Addr, nodes: &[String]) -> Result<Credentials> {
        std::fs::create_dir_all(dir)?;
        let (ca_cert, issuer) = crate::apiserver::kube_ca("weft real-cluster CA")?;

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
            "localhost".to_owned(),
        ])?;
        for ip in [
            apiserver_ip,
            Ipv4Addr::LOCALHOST,
            super::KUBERNETES_SERVICE_IP,
        ] {
            serving
                .subject_alt_names
                .push(SanType::IpAddress(ip.into()));
        }
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        // What the API server shows a kubelet for logs, exec and port-forward.
        let kubelet_client_key = KeyPair::generate()?;
        let mut kubelet_client = CertificateParams::new(Vec::<String>::new())?;
        kubelet_client
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        kubelet_client
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        kubelet_client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let kubelet_client_cert = kubelet_client.signed_by(&kubelet_client_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("serving.pem", serving_cert.pem()),
            ("serving-key.pem", serving_key.serialize_pem()),
            ("kubelet-client.pem", kubelet_client_cert.pem()),
            ("kubelet-client-key.pem", kubelet_client_key.serialize_pem()),
            ("sa-key.pem", sa_key.serialize_pem()),
            ("sa.pub.pem", sa_key.public_key_pem()),
        ] {
            std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
        }

        let mut accounts = vec![
            account("admin", &["system:masters"])?,
            account("system:kube-controller-manager", &[])?,
            account("system:kube-scheduler", &[])?,
            account("system:kube-proxy", &[])?,
        ];
        for node in nodes {
            accounts.push(account(&format!("system:node:{node}"), &["system:nodes"])?);
        }
        let mut csv = String::new();
        for (uid, a) in accounts.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{uid},\"{}\"",
                a.token,
                a.user,
                a.groups.join(",")
            );
        }
        std::fs::write(dir.join("tokens.csv"), csv).context("writing tokens.csv")?;
        Ok(Credentials {
            dir: dir.to_owned(),
            accounts,
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The token of `user`.
    pub fn token(&self, user: &str) -> Result<&str> {
        self.accounts
            .iter()
            .find(|a| a.user == user)
            .map(|a| a.token.as_str())
            .with_context(|| format!("no credentials for {user}"))
    }

    /// Writes a kubeconfig for `user` against `server` into `path`.
    pub fn write_kubeconfig(&self, path: &Path, server: &str, user: &str) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-real\n  cluster:\n    \
             server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    \
             token: {}\ncontexts:\n- name: weft-real\n  context:\n    cluster: weft-real\n    \
             user: user\ncurrent-context: weft-real\n",
            self.file("ca.pem").display(),
            self.token(user)?,
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

fn account(user: &str, groups: &[&str]) -> Result<Account> {
    Ok(Account {
        user: user.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        token: crate::apiserver::random_token()?,
    })
}
