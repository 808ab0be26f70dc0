//! Watching a link for plaintext: tcpdump on an interface of a testbed
//! namespace, writing every TCP packet to a file the test then searches for
//! a marker its pods sent. A marker found there crossed the link in the
//! clear; TLS records found there show the watch saw the traffic at all.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::{Process, STARTUP_TIMEOUT, Target, Testbed};

/// A running capture; [`WireWatch::finish`] stops it and reads what it saw.
pub struct WireWatch {
    tcpdump: Process,
    file: PathBuf,
}

/// What a [`WireWatch`] saw, as the raw capture file.
pub struct WireCapture {
    bytes: Vec<u8>,
}

impl WireWatch {
    /// Starts tcpdump on `interface` of `target`'s namespace and waits until
    /// it listens.
    pub fn start(testbed: &Testbed, target: Target<'_>, interface: &str) -> Result<WireWatch> {
        let name = match target {
            Target::Node(name) | Target::Pod(name) => name,
        };
        let mut file = testbed.dir().join(format!("wire-{name}-{interface}.pcap"));
        for n in 1.. {
            if !file.exists() {
                break;
            }
            file = testbed
                .dir()
                .join(format!("wire-{name}-{interface}-{n}.pcap"));
        }
        let mut command = std::process::Command::new("tcpdump");
        command
            .args(["-i", interface, "--immediate-mode", "-U", "-w"])
            .arg(&file)
            .arg("tcp");
        let tcpdump = testbed.spawn(target, command)?;
        tcpdump
            .wait_for_output("listening on", STARTUP_TIMEOUT)
            .context("tcpdump never started listening")?;
        Ok(WireWatch { tcpdump, file })
    }

    /// Stops the capture (after a moment for the last packets to be
    /// written) and returns what it saw.
    pub fn finish(self) -> Result<WireCapture> {
        std::thread::sleep(Duration::from_millis(300));
        self.tcpdump.stop()?;
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        Ok(WireCapture { bytes })
    }
}

impl WireCapture {
    /// Whether `needle` appears anywhere in the captured packets.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.bytes
            .windows(needle.len())
            .any(|window| window == needle)
    }

    /// Fails unless the capture holds TLS 1.3 application-data records (so
    /// it did see the mesh's traffic) and never `marker`.
    pub fn check_only_tls(&self, marker: &[u8]) -> Result<()> {
        ensure!(
            self.bytes.len() > 1000,
            "tcpdump saw almost nothing ({} bytes)",
            self.bytes.len()
        );
        ensure!(
            self.contains(&[0x17, 0x03, 0x03]),
            "no TLS application-data records on the wire"
        );
        ensure!(
            !self.contains(marker),
            "the marker {:?} crossed the link in plaintext",
            String::from_utf8_lossy(marker)
        );
        Ok(())
    }
}
