//! Where the proxy makes the sockets of served pods' connections: inside
//! the pod's own network namespace (see `pods` for why), by pod address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use tokio::net::TcpStream;

use super::ListenerPod;
use crate::capture::pod::PodNetns;
use crate::sockets::{self, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK};

/// The namespaces of the pods being served, by pod address: where the
/// proxy makes the sockets of their connections (any other socket is made
/// in the node's).
#[derive(Debug, Default)]
pub struct PodNamespaces {
    by_ip: RwLock<HashMap<IpAddr, (Arc<PodNetns>, ListenerPod)>>,
}

impl PodNamespaces {
    fn get(&self, ip: IpAddr) -> Option<Arc<PodNetns>> {
        self.by_ip
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ip)
            .map(|(netns, _)| netns.clone())
    }

    /// The served pod that holds `ip`, if one does.
    pub fn served(&self, ip: IpAddr) -> Option<ListenerPod> {
        self.by_ip
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ip)
            .map(|(_, pod)| pod.clone())
    }

    pub(super) fn set(&self, pod: &ListenerPod, netns: Option<&Arc<PodNetns>>) {
        let mut by_ip = self
            .by_ip
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ip in &pod.ips {
            match netns {
                Some(netns) => by_ip.insert(*ip, (netns.clone(), pod.clone())),
                None => by_ip.remove(ip),
            };
        }
    }

    /// Opens a TCP connection to `destination` from `source` (see
    /// [`sockets::connect_from`]), made inside the destination's namespace
    /// if it is a served pod, else inside the source's if that is one,
    /// else in the node's.
    ///
    /// A served pod's ports of the proxy's own listeners in it (15001,
    /// 15006, 15008) are refused: a connection there would reach the
    /// proxy's listener again, and again, until the node runs out of file
    /// descriptors.
    pub async fn connect(
        &self,
        source: Option<IpAddr>,
        destination: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let into_pod = self.get(destination.ip());
        if into_pod.is_some()
            && [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&destination.port())
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{destination}: the port is weft's own in a meshed pod"),
            ));
        }
        let netns = into_pod.or_else(|| source.and_then(|ip| self.get(ip)));
        let socket = match netns {
            Some(netns) => netns
                .enter(|| sockets::outgoing_socket(source, destination, PROXY_MARK))
                .map_err(std::io::Error::other)??,
            None => sockets::outgoing_socket(source, destination, PROXY_MARK)?,
        };
        sockets::connect_socket(socket, source, destination).await
    }
}
