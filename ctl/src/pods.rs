//! The node's pods, from the shims' records (`<state_dir>/<ns>/<pod>/pod.json`).

use microvm_shim::config::Config;
use microvm_shim::record::{PodRecord, RecordError};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error(transparent)]
    Config(#[from] microvm_shim::config::ConfigError),
    #[error("no microVM pod matches {0:?} (see `microvm-ctl ps`)")]
    NotFound(String),
    #[error("{query:?} matches several pods: {matches}; give more of the id")]
    Ambiguous { query: String, matches: String },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// A pod and where its record is.
#[derive(Debug, Clone)]
pub struct FoundPod {
    pub dir: PathBuf,
    pub record: PodRecord,
}

pub fn load_config(path: &Path) -> Result<Config, PodsError> {
    Ok(Config::load(Some(path)).or_else(|err| {
        // A node without a config runs the defaults (as the shim does).
        if !path.exists() && path == Path::new(microvm_shim::config::DEFAULT_CONFIG_PATH) {
            Ok(Config::default())
        } else {
            Err(err)
        }
    })?)
}

/// Every pod record under `state_dir`, sorted by creation. Unreadable
/// records are reported on stderr, not guessed at.
pub fn all(state_dir: &Path) -> Vec<FoundPod> {
    let mut found = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(state_dir) else {
        return found;
    };
    for namespace in namespaces.filter_map(Result::ok) {
        let Ok(pods) = std::fs::read_dir(namespace.path()) else {
            continue;
        };
        for pod in pods.filter_map(Result::ok) {
            let dir = pod.path();
            if !PodRecord::path_in(&dir).exists() {
                continue;
            }
            match PodRecord::read(&dir) {
                Ok(record) => found.push(FoundPod { dir, record }),
                Err(err) => eprintln!("microvm-ctl: skipping {}: {err}", dir.display()),
            }
        }
    }
    found.sort_by_key(|pod| pod.record.created_unix_ms);
    found
}

/// The pod whose id starts with `query`, or whose CRI name (or
/// namespace/name) is `query`.
pub fn find(state_dir: &Path, query: &str) -> Result<FoundPod, PodsError> {
    let pods = all(state_dir);
    let matches: Vec<&FoundPod> = pods
        .iter()
        .filter(|pod| {
            let record = &pod.record;
            record.pod_id == query
                || (!query.is_empty() && record.pod_id.starts_with(query))
                || (!record.pod_name.is_empty()
                    && (record.pod_name == query
                        || format!("{}/{}", record.pod_namespace, record.pod_name) == query))
        })
        .collect();
    match matches.as_slice() {
        [] => Err(PodsError::NotFound(query.to_owned())),
        [one] => Ok((*one).clone()),
        many => {
            if let Some(exact) = many.iter().find(|pod| pod.record.pod_id == query) {
                return Ok((*exact).clone());
            }
            Err(PodsError::Ambiguous {
                query: query.to_owned(),
                matches: many
                    .iter()
                    .map(|pod| pod.record.pod_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }
}

/// Proportional set size in bytes (/proc/<pid>/smaps_rollup) of `pid`
/// and the processes below it, only while it is still the recorded
/// process. The tree counts: the jailed VMM is its supervisor's child, and
/// a sandboxed virtiofsd forks its worker.
pub fn pss_bytes(pid: u32, start_time: Option<u64>) -> Option<u64> {
    if microvm_shim::vm::supervisor::process_start_time(pid) != start_time || start_time.is_none() {
        return None;
    }
    let own = own_pss_bytes(pid)?;
    Some(
        own + microvm_shim::vm::supervisor::descendants(pid)
            .into_iter()
            .filter_map(own_pss_bytes)
            .sum::<u64>(),
    )
}

fn own_pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss_kib(&text).map(|kib| kib * 1024)
}

pub fn parse_pss_kib(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The VM's own process: the VMM (builtin) or QEMU.
pub fn vm_process(record: &PodRecord) -> Option<&microvm_shim::record::HostProcess> {
    record
        .processes
        .iter()
        .find(|process| process.name == "vmm" || process.name == "qemu")
}

/// Running, booting, teardown-failed (its state dir is left; the record
/// says why), or stale (its shim is gone).
pub fn state(record: &PodRecord) -> &'static str {
    use microvm_shim::record::PodState;
    match record.state {
        PodState::TeardownFailed => "teardown-failed",
        _ if !record.shim_alive() => "stale",
        PodState::Booting => "booting",
        PodState::Running => "running",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_parses_from_smaps_rollup() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  2048 kB\nPss:  1536 kB\n";
        assert_eq!(parse_pss_kib(text), Some(1536));
        assert_eq!(parse_pss_kib("Rss: 1 kB\n"), None);
        let own = std::process::id();
        let start = microvm_shim::vm::supervisor::process_start_time(own);
        assert!(pss_bytes(own, start).unwrap() > 0);
        assert_eq!(pss_bytes(own, start.map(|time| time + 1)), None);
    }

    #[test]
    fn pss_counts_the_process_tree() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while microvm_shim::vm::supervisor::descendants(pid).is_empty()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let below = microvm_shim::vm::supervisor::descendants(pid);
        assert_eq!(below.len(), 1, "sh's sleep: {below:?}");
        let start = microvm_shim::vm::supervisor::process_start_time(pid);
        let tree = pss_bytes(pid, start).unwrap();
        assert!(tree > own_pss_bytes(pid).unwrap(), "{tree}");
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::process::Command::new("kill")
            .args(["-9", &below[0].to_string()])
            .status();
    }
}
