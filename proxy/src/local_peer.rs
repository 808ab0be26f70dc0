//! Who is on the other end of a loopback TCP connection: the user owning
//! the peer's socket, from the kernel's socket table (`/proc/net/tcp`,
//! `/proc/net/tcp6`). The admin endpoint lets only the proxy's own user
//! change anything: on a node, any process can reach 127.0.0.1, and a
//! drain takes the capture rules away.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;

/// The uid this process runs as (the owner of `/proc/self`).
pub(crate) fn own_uid() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// The uid owning the socket at `peer` that is connected to `local`, if the
/// socket is in this network namespace.
pub(crate) fn socket_owner(peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<u32>> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // No IPv6 in this kernel: nothing to find there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(uid) = find_owner(&text, peer, local) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// The uid of the line of a socket table whose local address is `peer` and
/// remote address `local`. Lines that do not parse are skipped.
pub(crate) fn find_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (from, to, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        let matches = same(parse_endpoint(from)?, peer) && same(parse_endpoint(to)?, local);
        if matches { uid.parse().ok() } else { None }
    })
}

/// Equal, counting an IPv4-mapped IPv6 address as its IPv4 address.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6). The kernel
/// prints each 32-bit word of the address as a number in host byte order.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = address.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a test address")
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn finds_the_owner_of_the_peer_socket_and_skips_garbage() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A1B2 0100007F:3A98 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1
   2: garbage
   3: 0100007F:A1B3 0100007F:3A98 01 00000000:00000000 00:00000000 00000000
";
        let admin = addr("127.0.0.1:15000");
        assert_eq!(
            find_owner(table, addr("127.0.0.1:41394"), admin),
            Some(1000)
        );
        // The listener's own line is not the peer's.
        assert_eq!(find_owner(table, admin, addr("0.0.0.0:0")), Some(0));
        assert_eq!(find_owner(table, addr("127.0.0.1:41395"), admin), None);
        assert_eq!(find_owner(table, addr("127.0.0.1:9"), admin), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn reads_ipv6_and_mapped_ipv4_endpoints() {
        let table = "header
   0: 00000000000000000000000001000000:A1B2 00000000000000000000000001000000:3A98 01 0 0 0 7 0
   1: 0000000000000000FFFF00000100007F:A1B3 0000000000000000FFFF00000100007F:3A98 01 0 0 0 8 0
";
        assert_eq!(
            find_owner(table, addr("[::1]:41394"), addr("[::1]:15000")),
            Some(7)
        );
        assert_eq!(
            find_owner(table, addr("127.0.0.1:41395"), addr("127.0.0.1:15000")),
            Some(8)
        );
    }

    #[test]
    fn this_process_owns_its_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, peer) = listener.accept().expect("accept");
        let local = accepted.local_addr().expect("local");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        assert_eq!(
            socket_owner(peer, local).expect("the socket table"),
            Some(own_uid().expect("own uid"))
        );
    }
}
