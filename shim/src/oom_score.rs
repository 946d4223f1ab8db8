//! The pod's OOM score on its host processes.
//!
//! The VMM, QEMU and the helpers are forked by the shim and would keep
//! containerd's `oom_score_adj` (close to -1000: nearly never killed). They
//! are the pod, so they get the pod's value instead: CRI puts the QoS value
//! in each container's `process.oomScoreAdj` (the sandbox's -998, then e.g.
//! 1000 for BestEffort or 2..999 for Burstable), and the host processes are
//! raised to the highest value seen. Only raised, never lowered: lowering
//! needs CAP_SYS_RESOURCE (which root here lacks), and a pod must not make
//! itself harder to kill than its containers' QoS says.

use oci_spec::runtime::Spec;
use std::path::Path;

pub const MIN: i32 = -1000;
pub const MAX: i32 = 1000;

/// The container's `process.oomScoreAdj`, clamped to the kernel's range.
pub fn of_spec(spec: &Spec) -> Option<i32> {
    let value = spec.process().as_ref()?.oom_score_adj()?;
    Some(value.clamp(MIN, MAX))
}

/// Raises `/proc/<pid>/oom_score_adj` of each process to `value` where it
/// is lower. Failures are logged (a process may just have exited).
pub fn raise(pids: &[(&'static str, u32)], value: i32) {
    for (name, pid) in pids {
        match raise_one(Path::new("/proc"), *pid, value) {
            Ok(true) => tracing::debug!("{name} (pid {pid}): oom_score_adj {value}"),
            Ok(false) => {}
            Err(err) => tracing::warn!("{name} (pid {pid}): setting oom_score_adj {value}: {err}"),
        }
    }
}

/// Whether it wrote.
fn raise_one(proc_root: &Path, pid: u32, value: i32) -> std::io::Result<bool> {
    let path = proc_root.join(pid.to_string()).join("oom_score_adj");
    let current: i32 = std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
    if current >= value {
        return Ok(false);
    }
    std::fs::write(&path, value.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{ProcessBuilder, SpecBuilder};

    #[test]
    fn the_spec_value_is_clamped() {
        let spec = |adj| {
            SpecBuilder::default()
                .process(
                    ProcessBuilder::default()
                        .oom_score_adj(adj)
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap()
        };
        assert_eq!(of_spec(&spec(5000)), Some(1000));
        assert_eq!(of_spec(&spec(-998)), Some(-998));
        assert_eq!(of_spec(&SpecBuilder::default().build().unwrap()), None);
    }

    #[test]
    fn a_host_process_is_raised_never_lowered() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let read = || {
            std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
                .unwrap()
                .trim()
                .parse::<i32>()
                .unwrap()
        };
        let before = read();
        let target = before.max(0) + 500;
        raise(&[("vmm", pid)], target);
        assert_eq!(read(), target);
        raise(&[("vmm", pid)], target - 100);
        assert_eq!(read(), target, "never lowered");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
