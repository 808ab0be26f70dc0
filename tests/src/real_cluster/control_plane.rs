//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler, as
//! processes in the control-plane namespace. etcd and the components'
//! own ports stay on that namespace's loopback; the API server listens on
//! the bridge, where nodes and pods reach it.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::pki::Credentials;
use super::{
    APISERVER_IP, APISERVER_PORT, CLUSTER_CIDR, KubeBinaries, SERVICE_CIDR, apiserver_url,
};
use crate::process::{self, Process};

/// The running control-plane processes; stopped on drop, newest first.
pub(super) struct ControlPlane {
    processes: Vec<Process>,
}

impl ControlPlane {
    pub fn start(
        netns: &str,
        dir: &Path,
        binaries: &KubeBinaries,
        credentials: &Credentials,
    ) -> Result<ControlPlane> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut control = ControlPlane {
            processes: Vec::new(),
        };
        let mut spawn = |label: &str, command: Command| -> Result<()> {
            let process = process::spawn(
                netns,
                command,
                label.to_owned(),
                logs.join(format!("{label}.stdout")),
                logs.join(format!("{label}.log")),
            )?;
            control.processes.push(process);
            Ok(())
        };

        let mut etcd = Command::new("etcd");
        etcd.arg(format!("--data-dir={}", dir.join("etcd").display()))
            .args([
                "--name=weft-real",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=weft-real=http://127.0.0.1:2380",
                "--logger=zap",
                "--log-outputs=stderr",
                "--unsafe-no-fsync",
            ]);
        spawn("etcd", etcd)?;

        let mut apiserver = Command::new(binaries.bin("kube-apiserver"));
        for (flag, name) in [
            ("tls-cert-file", "serving.pem"),
            ("tls-private-key-file", "serving-key.pem"),
            ("client-ca-file", "ca.pem"),
            ("token-auth-file", "tokens.csv"),
            ("service-account-key-file", "sa.pub.pem"),
            ("service-account-signing-key-file", "sa-key.pem"),
            ("kubelet-client-certificate", "kubelet-client.pem"),
            ("kubelet-client-key", "kubelet-client-key.pem"),
        ] {
            apiserver.arg(format!("--{flag}={}", credentials.file(name).display()));
        }
        apiserver
            .arg(format!(
                "--cert-dir={}",
                dir.join("apiserver-certs").display()
            ))
            .arg(format!("--advertise-address={APISERVER_IP}"))
            .arg(format!("--secure-port={APISERVER_PORT}"))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!(
                "--service-account-issuer={}",
                crate::apiserver::SERVICE_ACCOUNT_ISSUER
            ))
            .arg(format!(
                "--api-audiences={}",
                crate::apiserver::API_AUDIENCES.join(",")
            ))
            .args([
                "--etcd-servers=http://127.0.0.1:2379",
                "--bind-address=0.0.0.0",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--profiling=false",
            ]);
        spawn("kube-apiserver", apiserver)?;

        let kubeconfig = |user: &str, file: &str| -> Result<std::path::PathBuf> {
            let path = credentials.file(file);
            credentials.write_kubeconfig(&path, &apiserver_url(), user)?;
            Ok(path)
        };
        let mut controller_manager = Command::new(binaries.bin("kube-controller-manager"));
        controller_manager
            .arg(format!(
                "--kubeconfig={}",
                kubeconfig("system:kube-controller-manager", "kcm.kubeconfig")?.display()
            ))
            .arg(format!(
                "--service-account-private-key-file={}",
                credentials.file("sa-key.pem").display()
            ))
            .arg(format!(
                "--root-ca-file={}",
                credentials.file("ca.pem").display()
            ))
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .args([
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--allocate-node-cidrs=false",
                "--use-service-account-credentials=true",
                "--cluster-name=weft-real",
                "--profiling=false",
            ]);
        spawn("kube-controller-manager", controller_manager)?;

        let mut scheduler = Command::new(binaries.bin("kube-scheduler"));
        scheduler
            .arg(format!(
                "--kubeconfig={}",
                kubeconfig("system:kube-scheduler", "scheduler.kubeconfig")?.display()
            ))
            .args([
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--profiling=false",
            ]);
        spawn("kube-scheduler", scheduler)?;
        Ok(control)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for process in self.processes.drain(..).rev() {
            let _ = process.stop();
        }
    }
}
