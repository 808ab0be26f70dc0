//! Ordinary applications on the real cluster, as a platform team's users
//! deploy them: namespaces (meshed or not), Deployments of the test app
//! (busybox httpd answering `/` with the pod's hostname and `/healthz`,
//! with readiness and liveness probes), Services; and the client side a
//! test needs: HTTP from inside a pod, cluster DNS lookups from a pod.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{DNS_SERVICE_IP, RealCluster};
use crate::MESH_LABEL;
use crate::netns;

/// The test app's image (from `scripts/kube.sh build`).
pub const APP_IMAGE: &str = "localhost/weft-test/app:1";
/// The port the test app serves HTTP on.
pub const APP_PORT: u16 = 8080;
/// The port of the test app's Services.
pub const SERVICE_PORT: u16 = 80;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a DNS query waits for its answer before it is sent again.
const DNS_RETRY: Duration = Duration::from_secs(2);
/// How many times a DNS query is sent.
const DNS_ATTEMPTS: usize = 5;

/// A namespace, labelled into the mesh or not.
pub fn namespace(name: &str, meshed: bool) -> String {
    let label = if meshed { "enabled" } else { "disabled" };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    \
         {MESH_LABEL}: {label}\n"
    )
}

/// A Deployment `app` of the test app with its own ServiceAccount (its
/// identity) and a Service on port 80; `node` pins its pods to a node.
pub fn app(namespace: &str, app: &str, replicas: u32, node: Option<&str>) -> String {
    let node_selector = node
        .map(|node| format!("      nodeSelector:\n        kubernetes.io/hostname: {node}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: {app}
  namespace: {namespace}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {app}
  namespace: {namespace}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {app}}}
  strategy:
    rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}
  template:
    metadata:
      labels: {{app: {app}}}
    spec:
      serviceAccountName: {app}
      terminationGracePeriodSeconds: 15
{node_selector}      containers:
      - name: app
        image: {APP_IMAGE}
        imagePullPolicy: Never
        ports:
        - {{name: http, containerPort: {APP_PORT}}}
        readinessProbe:
          httpGet: {{path: /healthz, port: {APP_PORT}}}
          periodSeconds: 1
          timeoutSeconds: 5
        livenessProbe:
          httpGet: {{path: /healthz, port: {APP_PORT}}}
          periodSeconds: 5
          timeoutSeconds: 5
        lifecycle:
          # What well-behaved apps do: keep serving while the endpoint's
          # removal reaches kube-proxy and the mesh.
          preStop:
            exec: {{command: [sleep, "5"]}}
---
apiVersion: v1
kind: Service
metadata:
  name: {app}
  namespace: {namespace}
spec:
  selector: {{app: {app}}}
  ports:
  - {{name: http, port: {SERVICE_PORT}, targetPort: {APP_PORT}}}
"#
    )
}

/// A NodePort Service `<app>-nodeport` in front of `app`, on `node_port`.
pub fn node_port(namespace: &str, app: &str, node_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {app}-nodeport\n  namespace: {namespace}\n\
         spec:\n  type: NodePort\n  selector: {{app: {app}}}\n  ports:\n  \
         - {{port: {SERVICE_PORT}, targetPort: {APP_PORT}, nodePort: {node_port}}}\n"
    )
}

/// A pod of the cluster as a test addresses it.
#[derive(Debug, Clone)]
pub struct PodRef {
    /// Its Kubernetes namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its IP address.
    pub ip: Ipv4Addr,
}

impl RealCluster {
    /// Applies `yaml` and waits until every Deployment in it has all its
    /// replicas updated and ready.
    pub fn deploy(&self, yaml: &str) -> Result<()> {
        self.apply(yaml)?;
        for document in yaml.split("\n---") {
            if !document.contains("kind: Deployment") {
                continue;
            }
            let field = |key: &str| {
                document
                    .lines()
                    .find_map(|line| line.trim().strip_prefix(key))
                    .map(str::trim)
                    .map(str::to_owned)
            };
            let (Some(name), Some(namespace)) = (field("name:"), field("namespace:")) else {
                bail!("a Deployment without name or namespace:\n{document}");
            };
            self.rollout_status(&namespace, &name)?;
        }
        Ok(())
    }

    /// Waits until Deployment `namespace/name` is rolled out.
    pub fn rollout_status(&self, namespace: &str, name: &str) -> Result<()> {
        self.kubectl(&[
            "-n",
            namespace,
            "rollout",
            "status",
            &format!("deployment/{name}"),
            &format!("--timeout={}s", super::READY_TIMEOUT.as_secs()),
        ])
        .map(drop)
    }

    /// The ready pods of `app` in `namespace` that are not being deleted.
    pub fn pods(&self, namespace: &str, app: &str) -> Result<Vec<PodRef>> {
        let text = self.kubectl(&[
            "-n",
            namespace,
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            "-o",
            "json",
        ])?;
        let list: serde_json::Value = serde_json::from_str(&text)?;
        let mut pods = Vec::new();
        for pod in list["items"].as_array().into_iter().flatten() {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if !ready || !pod["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let ip = text(&pod["status"]["podIP"]);
            pods.push(PodRef {
                namespace: namespace.to_owned(),
                name: text(&pod["metadata"]["name"]),
                node: text(&pod["spec"]["nodeName"]),
                ip: ip.parse().with_context(|| format!("pod IP {ip:?}"))?,
            });
        }
        Ok(pods)
    }

    /// The first running pod of `app` in `namespace`.
    pub fn pod(&self, namespace: &str, app: &str) -> Result<PodRef> {
        self.pods(namespace, app)?
            .into_iter()
            .next()
            .with_context(|| format!("no running pod of {namespace}/{app}"))
    }

    /// `GET path` with HTTP/1.0 from inside `from` to `to`; the body when
    /// the answer is 200, an error otherwise.
    pub fn http_get_from(&self, from: &PodRef, to: SocketAddr, path: &str) -> Result<String> {
        let stream = self.connect_from_pod(&from.namespace, &from.name, to)?;
        http_get(stream, to, path)
            .with_context(|| format!("GET http://{to}{path} from {}", from.name))
    }

    /// `GET path` from `node` itself (as a hostNetwork pod or the kubelet).
    pub fn http_get_from_node(&self, node: &str, to: SocketAddr, path: &str) -> Result<String> {
        let stream = self
            .run_in_node(node, || TcpStream::connect_timeout(&to, crate::IO_TIMEOUT))?
            .with_context(|| format!("connecting from {node} to {to}"))?;
        http_get(stream, to, path).with_context(|| format!("GET http://{to}{path} from {node}"))
    }

    /// `GET path` from outside the nodes (the control plane's namespace, on
    /// the nodes' network), as a client of a NodePort.
    pub fn http_get_from_outside(&self, to: SocketAddr, path: &str) -> Result<String> {
        let stream = netns::run_in(&self.control_netns, || {
            TcpStream::connect_timeout(&to, crate::IO_TIMEOUT)
        })?
        .with_context(|| format!("connecting from outside the nodes to {to}"))?;
        http_get(stream, to, path).with_context(|| format!("GET http://{to}{path} from outside"))
    }

    /// [`RealCluster::http_get_from`] until it succeeds: Services and
    /// policies reach kube-proxy and weft's proxies some time after the API
    /// server has them.
    pub fn wait_for_http(&self, from: &PodRef, to: SocketAddr, path: &str) -> Result<String> {
        let mut body = String::new();
        self.wait_until(&format!("GET http://{to}{path} from {}", from.name), || {
            body = self.http_get_from(from, to, path)?;
            Ok(true)
        })?;
        Ok(body)
    }

    /// The address cluster DNS gives `name`, asked from inside `from`.
    pub fn resolve_from(&self, from: &PodRef, name: &str) -> Result<Ipv4Addr> {
        let query = dns_query(name)?;
        let answer = self.run_in_pod(&from.namespace, &from.name, || -> Result<Vec<u8>> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(DNS_RETRY))?;
            socket.connect((DNS_SERVICE_IP, 53))?;
            let mut buf = vec![0; 1500];
            // UDP: a lost query or answer is asked again, as resolvers do.
            let mut last = None;
            for _ in 0..DNS_ATTEMPTS {
                socket.send(&query)?;
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.map_or_else(|| anyhow::anyhow!("no DNS answer"), anyhow::Error::from))
        })??;
        first_a_record(&answer).with_context(|| format!("resolving {name} from {}", from.name))
    }
}

/// One HTTP/1.0 GET on `stream`; the body of a 200.
pub fn http_get(mut stream: TcpStream, to: SocketAddr, path: &str) -> Result<String> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("answered {status:?}");
    }
    Ok(body.to_owned())
}

/// A DNS query for the A record of `name`, recursion desired.
fn dns_query(name: &str) -> Result<Vec<u8>> {
    let mut query = vec![0x77, 0x66, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|&n| (1..64).contains(&n))
            .with_context(|| format!("bad DNS label in {name:?}"))?;
        query.push(len);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    Ok(query)
}

/// The first A record in the answer section of DNS response `msg`.
fn first_a_record(msg: &[u8]) -> Result<Ipv4Addr> {
    let byte = |i: usize| msg.get(i).copied().context("truncated DNS response");
    let word =
        |i: usize| -> Result<usize> { Ok(usize::from(byte(i)?) << 8 | usize::from(byte(i + 1)?)) };
    let rcode = byte(3)? & 0x0f;
    if rcode != 0 {
        bail!("DNS answered rcode {rcode}");
    }
    let (questions, answers) = (word(4)?, word(6)?);
    let skip_name = |mut i: usize| -> Result<usize> {
        loop {
            let len = byte(i)?;
            if len & 0xc0 == 0xc0 {
                return Ok(i + 2);
            }
            if len == 0 {
                return Ok(i + 1);
            }
            i += 1 + usize::from(len);
        }
    };
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(at)? + 4;
    }
    for _ in 0..answers {
        at = skip_name(at)?;
        let (kind, length) = (word(at)?, word(at + 8)?);
        let data = at + 10;
        if kind == 1 && length == 4 {
            return Ok(Ipv4Addr::new(
                byte(data)?,
                byte(data + 1)?,
                byte(data + 2)?,
                byte(data + 3)?,
            ));
        }
        at = data + length;
    }
    bail!("no A record in the answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_are_read_past_the_question_and_other_answers() {
        let mut msg = dns_query("web.shop.svc.cluster.local").expect("a valid name");
        msg[2] = 0x81;
        msg[3] = 0x80;
        msg[7] = 2;
        // A CNAME-like record (type 5) by pointer, then the A record.
        msg.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 2, 0xc0, 12]);
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 96, 3, 7]);
        assert_eq!(first_a_record(&msg).ok(), Some(Ipv4Addr::new(10, 96, 3, 7)));
        assert!(first_a_record(&msg[..20]).is_err());
    }
}
