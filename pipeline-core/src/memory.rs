//! Peak resident memory of a process (Linux `/proc/<pid>/status` `VmHWM`), reported by the
//! benchmark and by `producer --once` so memory targets are measured, not guessed.

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

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        if std::path::Path::new("/proc/self/status").exists() {
            let mb = super::peak_rss_mb(None).unwrap();
            assert!(mb > 0.5 && mb < 100_000.0, "{mb}");
        }
    }
}
