//! Where the cluster's programs and images come from: the Kubernetes
//! binaries, CoreDNS and the test images from `scripts/kube.sh build`, the
//! API server from `scripts/apiserver.sh build`, weft's images from
//! `scripts/images.sh`, helm from `scripts/helm.sh path`. Each is taken from
//! an environment variable when set (`WEFT_KUBE_DIR`,
//! `WEFT_KUBE_APISERVER`, `WEFT_IMAGES_DIR`, `WEFT_HELM`), so that
//! `scripts/test.sh` builds them once before the tests run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The programs a cluster runs.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    dir: PathBuf,
    apiserver: PathBuf,
}

impl KubeBinaries {
    /// Finds (or builds) everything.
    pub fn locate() -> Result<KubeBinaries> {
        let dir = match std::env::var_os("WEFT_KUBE_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => run_script("kube.sh", &["build"])?,
        };
        let apiserver = crate::apiserver::apiserver_binary()?;
        let binaries = KubeBinaries { dir, apiserver };
        for name in [
            "kubelet",
            "kube-proxy",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ] {
            let path = binaries.bin(name);
            if !path.is_file() {
                bail!(
                    "{} is missing (scripts/kube.sh build makes it)",
                    path.display()
                );
            }
        }
        Ok(binaries)
    }

    /// The path of Kubernetes program `name` (`kube-apiserver` included).
    pub fn bin(&self, name: &str) -> PathBuf {
        if name == "kube-apiserver" {
            return self.apiserver.clone();
        }
        self.dir.join("bin").join(name)
    }

    /// The test images every node gets: pause, CoreDNS, the test app.
    pub fn images(&self) -> Vec<PathBuf> {
        ["pause.tar", "coredns.tar", "app.tar"]
            .iter()
            .map(|name| self.dir.join("images").join(name))
            .collect()
    }

    /// CoreDNS for the cluster, as manifests: its account, its Corefile
    /// (cluster names only: nothing is forwarded outside the cluster), one
    /// replica, and the `kube-dns` Service at [`super::DNS_SERVICE_IP`].
    pub fn coredns_manifest(&self) -> String {
        // `images/refs` has "<file> <image name>" per archive.
        let refs = std::fs::read_to_string(self.dir.join("images/refs")).unwrap_or_default();
        let image = refs
            .lines()
            .find_map(|line| line.strip_prefix("coredns.tar "))
            .map_or("localhost/weft-test/coredns:1.15.0", str::trim)
            .to_owned();
        COREDNS
            .replace("@IMAGE@", &image)
            .replace("@DNS_IP@", &super::DNS_SERVICE_IP.to_string())
    }
}

/// weft's own images, as `scripts/images.sh` writes them (or the archives
/// in `WEFT_IMAGES_DIR`).
pub fn weft_images() -> Result<Vec<PathBuf>> {
    let dir = match std::env::var_os("WEFT_IMAGES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => run_script("images.sh", &[])?,
    };
    let mut archives = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tar") {
            archives.push(path);
        }
    }
    if archives.is_empty() {
        bail!("no image archives in {}", dir.display());
    }
    archives.sort();
    Ok(archives)
}

/// Helm: `WEFT_HELM`, or what `scripts/helm.sh path` prints.
pub(super) fn helm() -> Result<PathBuf> {
    match std::env::var_os("WEFT_HELM") {
        Some(path) => Ok(path.into()),
        None => run_script("helm.sh", &["path"]),
    }
}

/// Runs `scripts/<script> <args>` and returns the path it prints.
fn run_script(script: &str, args: &[&str]) -> Result<PathBuf> {
    let path = crate::repo_root().join("scripts").join(script);
    let output = Command::new("bash")
        .arg(&path)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed: {}",
            path.display(),
            args.join(" "),
            output.status
        );
    }
    let printed = String::from_utf8(output.stdout)?;
    let line = printed.lines().last().unwrap_or_default().trim();
    if line.is_empty() || !Path::new(line).exists() {
        bail!("{} printed no path: {printed:?}", path.display());
    }
    Ok(line.into())
}

const COREDNS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
- kind: ServiceAccount
  name: coredns
  namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loop
        reload
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      tolerations:
      - operator: Exists
      containers:
      - name: coredns
        image: @IMAGE@
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 2
        livenessProbe:
          httpGet: {path: /health, port: 8080}
          periodSeconds: 10
        volumeMounts:
        - {name: config, mountPath: /etc/coredns, readOnly: true}
      volumes:
      - name: config
        configMap:
          name: coredns
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  clusterIP: @DNS_IP@
  selector:
    k8s-app: kube-dns
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
"#;
