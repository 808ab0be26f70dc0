//! CPU time and memory of the processes and threads that carry traffic, read from
//! `/proc`: `stat` for user and system time, `status` for resident memory; and
//! what machine this is and how busy it was.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Where one proxy's or relay's counters live: a process (`/proc/<pid>`).
#[derive(Debug, Clone)]
pub struct ProcEntry(PathBuf);

impl ProcEntry {
    /// A whole process.
    pub fn process(pid: u32) -> ProcEntry {
        ProcEntry(PathBuf::from(format!("/proc/{pid}")))
    }

    /// User plus system CPU time so far, in seconds.
    pub fn cpu_seconds(&self, ticks_per_second: f64) -> Result<f64> {
        let file = self.0.join("stat");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let ticks =
            parse_stat_cpu_ticks(&text).with_context(|| format!("parsing {}", file.display()))?;
        Ok(ticks as f64 / ticks_per_second)
    }

    /// Resident memory now and at its peak.
    pub fn memory(&self) -> Result<Memory> {
        let file = self.0.join("status");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        parse_status_memory(&text).with_context(|| format!("parsing {}", file.display()))
    }

    /// The executable the process runs (`/proc/<pid>/exe`).
    pub fn exe(&self) -> Result<PathBuf> {
        let link = self.0.join("exe");
        std::fs::read_link(&link).with_context(|| format!("reading {}", link.display()))
    }
}

/// Resident set size now (`VmRSS`) and its peak (`VmHWM`), in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`.
    pub rss_kib: u64,
    /// `VmHWM`.
    pub peak_kib: u64,
    /// `RssAnon`: the heap and stacks, what the proxy itself allocated. The
    /// rest of the RSS is mapped files, mostly the binary's own code.
    pub anon_kib: u64,
}

/// Clock ticks per second for `/proc/*/stat` times: `getconf CLK_TCK`, else 100.
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

/// `utime + stime` (fields 14 and 15) of a `stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let (_, rest) = stat
        .rsplit_once(')')
        .context("no ')' after the command name")?;
    // rest starts at field 3 (state): utime is field 14, so index 11.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("only {} fields after the command name", fields.len()))?
            .parse::<u64>()
            .with_context(|| format!("field {} is not a number", index + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// `VmRSS`, `VmHWM` and `RssAnon` of a `status` file.
pub fn parse_status_memory(status: &str) -> Result<Memory> {
    let kib = |key: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .with_context(|| format!("no {key} line"))?;
        let value = line.trim_start_matches(':').split_whitespace().next();
        value
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{key} is not a number of kB: {line:?}"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS")?,
        peak_kib: kib("VmHWM")?,
        anon_kib: kib("RssAnon")?,
    })
}

/// The 1-minute load average (0 if unreadable).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// "2 CPUs (model), 3.9 GiB, Linux 6.x".
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem_gib:.1} GiB RAM, Linux {}",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (weft (proxy) x) S 1 4242 4242 0 -1 4194560 1500 0 0 0 \
                    731 269 0 0 20 0 9 0 12345 100000000 3000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 1000);
    }

    #[test]
    fn short_stat_lines_are_an_error() {
        assert!(parse_stat_cpu_ticks("1 (x) S 1 2 3").is_err());
    }

    #[test]
    fn memory_comes_from_vmrss_and_vmhwm() {
        let status = "Name:\tweft-proxy\nVmPeak:\t  900000 kB\nVmHWM:\t    8120 kB\n\
                      VmRSS:\t    6004 kB\nRssAnon:\t    1100 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status_memory(status).unwrap(),
            Memory {
                rss_kib: 6004,
                peak_kib: 8120,
                anon_kib: 1100,
            }
        );
    }

    #[test]
    fn this_process_is_readable() {
        let entry = ProcEntry::process(std::process::id());
        assert!(entry.cpu_seconds(100.0).unwrap() >= 0.0);
    }
}
