//! What the VM is: kernel, memory, vCPUs, uptime.

/// The first field of /proc/uptime ("12.34 5.67\n" -> 12.34).
pub fn uptime_seconds(proc_uptime: &str) -> Option<f64> {
    let seconds: f64 = proc_uptime.split_whitespace().next()?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then_some(seconds)
}

pub fn read_uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| uptime_seconds(&text))
        .unwrap_or(0.0)
}

/// (MemTotal, MemAvailable) in bytes from /proc/meminfo text.
pub fn meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib.saturating_mul(1024))
    };
    (field("MemTotal"), field("MemAvailable"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct GuestDetails {
    pub kernel_release: String,
    pub kernel_version: String,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub online_vcpus: u32,
    pub uptime_seconds: f64,
}

pub fn details() -> GuestDetails {
    let (release, version) = match nix::sys::utsname::uname() {
        Ok(uts) => (
            uts.release().to_string_lossy().into_owned(),
            uts.version().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::new(), String::new()),
    };
    let (total, available) = std::fs::read_to_string("/proc/meminfo")
        .map(|text| meminfo(&text))
        .unwrap_or((0, 0));
    // SAFETY: sysconf takes an integer name and returns an integer.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    GuestDetails {
        kernel_release: release,
        kernel_version: version,
        memory_total_bytes: total,
        memory_available_bytes: available,
        online_vcpus: u32::try_from(online).unwrap_or(0),
        uptime_seconds: read_uptime(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_takes_the_first_field() {
        assert_eq!(uptime_seconds("12.34 5.67\n"), Some(12.34));
        assert_eq!(uptime_seconds(""), None);
        assert_eq!(uptime_seconds("-1 0"), None);
        assert_eq!(uptime_seconds("NaN 0"), None);
    }

    #[test]
    fn meminfo_reads_total_and_available() {
        let text = "MemTotal:        2000 kB\nMemFree:  10 kB\nMemAvailable:    1500 kB\n";
        assert_eq!(meminfo(text), (2000 * 1024, 1500 * 1024));
        assert_eq!(meminfo(""), (0, 0));
    }

    #[test]
    fn details_describe_this_machine() {
        let details = details();
        assert!(!details.kernel_release.is_empty());
        assert!(details.memory_total_bytes > 0);
        assert!(details.online_vcpus >= 1);
    }
}
