//! Peak resident memory (Linux `/proc/<pid>/status` `VmHWM`) and CPU time (`/proc/<pid>/stat`)
//! of a process, reported by the benchmark and by `producer --once` so resource figures are
//! measured, not guessed.

/// Peak resident set size of `pid` (or of this process) in MiB; None where `/proc` is absent.
pub fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// User + system CPU seconds used so far by `pid` (or this process).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let mut ticks = || fields.next()?.parse::<f64>().ok();
    let (utime, stime) = (ticks()?, ticks()?);
    // Clock ticks are USER_HZ, 100 per second on Linux whatever the kernel's HZ.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        if std::path::Path::new("/proc/self/status").exists() {
            let mb = super::peak_rss_mb(None).unwrap();
            assert!(mb > 0.5 && mb < 100_000.0, "{mb}");
            assert!(super::cpu_seconds(None).unwrap() >= 0.0);
        }
    }
}
