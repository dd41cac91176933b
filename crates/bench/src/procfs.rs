//! What the generator reads about processes from `/proc`: resident memory (VmRSS, and the
//! peak VmHWM) from `/proc/<pid>/status`, CPU time from `/proc/<pid>/stat`, and the
//! open-files limit it raises for itself.

use anyhow::Context;
use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ProcSample {
    pub(crate) pid: u32,
    /// Resident set now, KiB.
    pub(crate) rss_kib: u64,
    /// Peak resident set since start (or since the last [`reset_peak_rss`]), KiB.
    pub(crate) peak_rss_kib: u64,
    /// User + system CPU time so far, seconds.
    pub(crate) cpu_seconds: f64,
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Returns user + system CPU seconds from the text of a `/proc/<pid>/stat` file.
fn cpu_seconds_from_stat(stat: &str) -> f64 {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|both| both.iter().filter_map(|f| f.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / clock_ticks_per_second()
}

fn kib_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// Reads process `pid`.
///
/// # Errors
/// When the process does not exist (or is not readable).
pub(crate) fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ProcSample {
        pid,
        rss_kib: kib_field(&status, "VmRSS"),
        peak_rss_kib: kib_field(&status, "VmHWM"),
        cpu_seconds: cpu_seconds_from_stat(&stat),
    })
}

/// Reads every process in `pids`.
///
/// # Errors
/// When one of them cannot be read.
pub(crate) fn sample_all(pids: &[u32]) -> anyhow::Result<Vec<ProcSample>> {
    pids.iter().map(|pid| sample(*pid)).collect()
}

/// Returns this process's CPU seconds so far (user + system).
pub(crate) fn self_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .map(|stat| cpu_seconds_from_stat(&stat))
        .unwrap_or(0.0)
}

/// Resets the peak resident set (VmHWM) of `pid` to its current size by writing 5 to
/// `/proc/<pid>/clear_refs`. Returns false when not permitted.
pub(crate) fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Raises this process's soft open-files limit to the hard limit; returns the soft limit.
pub(crate) fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit not above the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_fields_are_read_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        let seconds = cpu_seconds_from_stat(stat);
        assert!((seconds - 300.0 / clock_ticks_per_second()).abs() < 1e-9);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(kib_field(status, "VmRSS"), 1024);
        assert_eq!(kib_field(status, "VmHWM"), 2048);
        assert_eq!(kib_field(status, "VmSwap"), 0);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = sample(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kib > 0);
    }
}
