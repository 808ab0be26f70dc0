//! What HBONE's TLS costs in CPU, in one thread and in memory (no sockets):
//! a full mutual handshake with each key-exchange policy, and bulk data
//! through an established connection. A quiet, repeatable check of the
//! crypto provider and the key exchange; `weft-bench` measures the mesh.
//!
//! ```sh
//! cargo run --release -p weft-certs --example tls_cost -- [handshakes] [bulk MiB]
//! ```
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use weft_certs::{
    CertificateRequest, Identity, KeyExchange, MeshCa, WorkloadCertificate, hbone_client_config,
    hbone_server_config, key_exchange_group,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let handshakes: u32 = args.next().map_or(2_000, |a| a.parse().unwrap());
    let bulk_mib: usize = args.next().map_or(2048, |a| a.parse().unwrap());

    let now = SystemTime::now();
    let ca = MeshCa::generate_root("cluster.local", now).unwrap();
    let cert = |uri: &str| -> WorkloadCertificate {
        let id: Identity = uri.parse().unwrap();
        let request = CertificateRequest::generate(&id).unwrap();
        let chain = ca.sign_csr(request.csr_der(), &id, now).unwrap();
        request
            .complete(chain, ca.trust_bundle().clone(), now)
            .unwrap()
    };
    let frontend = cert("spiffe://cluster.local/ns/shop/sa/frontend");
    let checkout = cert("spiffe://cluster.local/ns/shop/sa/checkout");
    let expected = checkout.identity().clone();

    println!("provider: aws-lc-rs");
    for policy in KeyExchange::ALL {
        let client = hbone_client_config(&frontend, &expected, policy).unwrap();
        let server = hbone_server_config(&checkout, policy).unwrap();
        let (client_conn, _, hello) = handshake(&client, &server);
        let group = key_exchange_group(&client_conn);
        let (started, cpu) = (Instant::now(), thread_cpu_seconds());
        for _ in 0..handshakes {
            handshake(&client, &server);
        }
        let per_cpu = (thread_cpu_seconds() - cpu) / f64::from(handshakes);
        let per_wall = started.elapsed().as_secs_f64() / f64::from(handshakes);
        println!(
            "handshake {policy:<23} group {group:<15} CPU {:>6.0} µs, wall {:>6.0} µs (both sides), ClientHello {hello} B",
            per_cpu * 1e6,
            per_wall * 1e6
        );
    }

    let client = hbone_client_config(&frontend, &expected, KeyExchange::default()).unwrap();
    let server = hbone_server_config(&checkout, KeyExchange::default()).unwrap();
    let (mut client_conn, mut server_conn, _) = handshake(&client, &server);
    client_conn.set_buffer_limit(None);
    let chunk = vec![0x5a_u8; 256 * 1024];
    let mut sink = vec![0_u8; 256 * 1024];
    let mut wire = Vec::with_capacity(300 * 1024);
    let total = bulk_mib * 1024 * 1024;
    let (started, cpu) = (Instant::now(), thread_cpu_seconds());
    let mut moved = 0;
    while moved < total {
        client_conn.writer().write_all(&chunk).unwrap();
        wire.clear();
        while client_conn.wants_write() {
            client_conn.write_tls(&mut wire).unwrap();
        }
        let mut input = wire.as_slice();
        while !input.is_empty() {
            server_conn.read_tls(&mut input).unwrap();
            server_conn.process_new_packets().unwrap();
            loop {
                match server_conn.reader().read(&mut sink) {
                    Ok(0) => break,
                    Ok(n) => moved += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
    let seconds = thread_cpu_seconds() - cpu;
    let wall = started.elapsed().as_secs_f64();
    let suite = client_conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let mib = moved as f64 / 1024.0 / 1024.0;
    println!(
        "bulk {suite}: {:.0} MiB per CPU second, {:.0} MiB/s wall (encrypt and decrypt, one thread)",
        mib / seconds,
        mib / wall
    );
}

/// One full handshake in memory; both connections and the size of the
/// client's first flight (its ClientHello).
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (ClientConnection, ServerConnection, usize) {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut client = ClientConnection::new(client.clone(), name).unwrap();
    let mut server = ServerConnection::new(server.clone()).unwrap();
    let mut hello = 0;
    for round in 0.. {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        if round == 0 {
            hello = to_server.len();
        }
        server.read_tls(&mut to_server.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        let mut to_client = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut to_client).unwrap();
        }
        client.read_tls(&mut to_client.as_slice()).unwrap();
        client.process_new_packets().unwrap();
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    (client, server, hello)
}

/// This thread's CPU time (user and system) in seconds, from
/// `/proc/thread-self/stat` in clock ticks of 10 ms (Linux's USER_HZ): a
/// busy machine slows the wall clock of a run, not its CPU time.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}
