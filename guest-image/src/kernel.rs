//! The guest kernel: built by `guest-image/scripts/build-kernel.sh` (apt
//! source package, tinyconfig + `kernel-config/` fragments, option check)
//! and cached outside the repo. The script owns the cache key, so this module
//! always runs it: on a cache hit it only hashes the fragments and prints the
//! directory.

use crate::cache;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The script's last stdout line is `MICROVM_KERNEL_DIR=<dir>`.
const OUTPUT_DIR_KEY: &str = "MICROVM_KERNEL_DIR=";
/// How many lines of the script's log a failure carries.
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot start the kernel build script {script}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the kernel build script's output")]
    Output(#[source] std::io::Error),
    #[error("kernel build failed ({status}); last lines of its log:\n{log_tail}")]
    BuildFailed {
        status: ExitStatus,
        log_tail: String,
    },
    #[error("the kernel build script printed no {OUTPUT_DIR_KEY} line")]
    NoOutputDir,
    #[error("kernel artifact {0} is missing or empty")]
    MissingArtifact(PathBuf),
}

/// The cached kernel build: one directory per source version + config hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelArtifacts {
    pub dir: PathBuf,
    /// Uncompressed ELF with the PVH entry note: what the VMM and QEMU boot.
    pub vmlinux: PathBuf,
    /// Compressed image, for loaders that want the boot protocol.
    pub bz_image: PathBuf,
    /// The final .config, to check what went in.
    pub config: PathBuf,
}

impl KernelArtifacts {
    /// The artifacts in `dir`, checked to exist.
    pub fn in_dir(dir: &Path) -> Result<Self, KernelError> {
        let artifacts = Self {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            bz_image: dir.join("bzImage"),
            config: dir.join("config"),
        };
        for file in [&artifacts.vmlinux, &artifacts.bz_image, &artifacts.config] {
            let non_empty = std::fs::metadata(file)
                .map(|meta| meta.is_file() && meta.len() > 0)
                .unwrap_or(false);
            if !non_empty {
                return Err(KernelError::MissingArtifact(file.clone()));
            }
        }
        Ok(artifacts)
    }
}

pub fn build_script() -> PathBuf {
    cache::repo_root()
        .join("guest-image")
        .join("scripts")
        .join("build-kernel.sh")
}

pub fn config_dir() -> PathBuf {
    cache::repo_root().join("kernel-config")
}

/// The cached kernel, built first if the fragments, the script or the pinned
/// source version changed. A first build takes minutes (apt install, unpack,
/// compile); a cache hit takes milliseconds.
pub fn kernel() -> Result<KernelArtifacts, KernelError> {
    let script = build_script();
    let mut child = Command::new("bash")
        .arg(&script)
        .env(cache::CACHE_DIR_ENV, cache::cache_root())
        .env("MICROVM_KERNEL_CONFIG_DIR", config_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelError::Spawn {
            script: script.clone(),
            source,
        })?;

    // Drain stdout on its own thread so neither pipe can fill up and block
    // the script.
    let stdout = child.stdout.take();
    let stdout_reader = std::thread::spawn(move || -> std::io::Result<String> {
        let mut text = String::new();
        if let Some(mut stdout) = stdout {
            std::io::Read::read_to_string(&mut stdout, &mut text)?;
        }
        Ok(text)
    });
    let mut tail = VecDeque::with_capacity(LOG_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.map_err(KernelError::Output)?;
            if line.starts_with("build-kernel:") {
                tracing::info!("{line}");
            } else {
                tracing::debug!("{line}");
            }
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().map_err(KernelError::Output)?;
    let stdout = stdout_reader
        .join()
        .map_err(|_| KernelError::Output(std::io::Error::other("stdout reader panicked")))?
        .map_err(KernelError::Output)?;
    if !status.success() {
        return Err(KernelError::BuildFailed {
            status,
            log_tail: Vec::from(tail).join("\n"),
        });
    }
    let dir = output_dir(&stdout).ok_or(KernelError::NoOutputDir)?;
    KernelArtifacts::in_dir(&dir)
}

/// The directory named by the script's `MICROVM_KERNEL_DIR=` line.
fn output_dir(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(OUTPUT_DIR_KEY))
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dir_takes_the_last_marker_line() {
        let stdout = "noise\nMICROVM_KERNEL_DIR=/old\nMICROVM_KERNEL_DIR=/c/kernel/6.1-ab\n";
        assert_eq!(output_dir(stdout), Some(PathBuf::from("/c/kernel/6.1-ab")));
        assert_eq!(output_dir("MICROVM_KERNEL_DIR=\n"), None);
        assert_eq!(output_dir(""), None);
    }

    #[test]
    fn artifacts_must_exist_and_be_non_empty() {
        let dir = std::env::temp_dir().join(format!("microvm-kernel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["vmlinux", "bzImage", "config"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        assert!(KernelArtifacts::in_dir(&dir).is_ok());
        std::fs::write(dir.join("bzImage"), b"").unwrap();
        assert!(matches!(
            KernelArtifacts::in_dir(&dir),
            Err(KernelError::MissingArtifact(path)) if path.ends_with("bzImage")
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn build_script_and_fragments_are_in_the_repo() {
        if std::env::var_os(cache::REPO_DIR_ENV).is_none() {
            assert!(build_script().is_file());
            let fragments = std::fs::read_dir(config_dir())
                .unwrap()
                .filter_map(Result::ok)
                .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "config"))
                .count();
            assert!(fragments >= 9, "expected one fragment per concern");
        }
    }

    /// Every fragment starts with a comment saying why it is there, and none
    /// turns on what the pod VM kernel leaves out.
    #[test]
    fn every_fragment_starts_with_a_why_comment() {
        if std::env::var_os(cache::REPO_DIR_ENV).is_some() {
            return;
        }
        for entry in std::fs::read_dir(config_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "config") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# "),
                "{} has no leading comment",
                path.display()
            );
            for forbidden in [
                "CONFIG_MODULES=y",
                "CONFIG_ACPI=y",
                "CONFIG_PCI=y",
                "CONFIG_KEXEC=y",
            ] {
                assert!(
                    !text.contains(forbidden),
                    "{} sets {forbidden}",
                    path.display()
                );
            }
        }
    }
}
