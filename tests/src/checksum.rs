//! Checking that bytes arrive intact through the mesh: a streaming checksum,
//! and a server in a pod that answers with the checksum of all it received.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::{Target, Testbed};

/// FNV-1a over a byte stream: however the stream is split into reads, the
/// result is the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum(pub u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    /// Adds `bytes` to the checksum.
    pub fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A cheap pseudo-random byte stream (xorshift64) for bulk transfers whose
/// bytes must not be all alike.
#[derive(Clone, Copy, Debug)]
pub struct PseudoRandom(pub u64);

impl PseudoRandom {
    /// Fills `chunk` with the stream's next bytes, 8 at a time (a trailing
    /// partial word takes the first bytes of the next one).
    pub fn fill(&mut self, chunk: &mut [u8]) {
        for word in chunk.chunks_mut(8) {
            let state = &mut self.0;
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
    }
}

/// Listens on `port` in `pod`; the first connection's bytes are checksummed
/// until the client half-closes, then the checksum (8 bytes, big endian) is
/// sent back. The thread returns what it computed.
pub fn start_checksum_server(
    testbed: &Testbed,
    pod: &str,
    port: u16,
) -> Result<JoinHandle<Result<Checksum>>> {
    let listener = testbed
        .run_in(Target::Pod(pod), || TcpListener::bind(("0.0.0.0", port)))?
        .with_context(|| format!("binding the checksum server to port {port} in {pod}"))?;
    Ok(std::thread::spawn(move || {
        let (mut stream, _) = listener.accept()?;
        let mut checksum = Checksum::default();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            checksum.update(&buf[..n]);
        }
        stream.write_all(&checksum.0.to_be_bytes())?;
        Ok(checksum)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_does_not_depend_on_how_the_stream_is_split() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Checksum::default();
        whole.update(&data);
        let mut pieces = Checksum::default();
        for chunk in data.chunks(333) {
            pieces.update(chunk);
        }
        assert_eq!(whole, pieces);
        let mut other = Checksum::default();
        other.update(&data[1..]);
        assert_ne!(whole, other);
    }
}
