//! `microvm-image figures`: artifact sizes, and guest time from kernel start
//! to the agent's ready line under QEMU+TCG, for our kernel and for Debian's
//! cloud kernel booting the same initramfs in the same run.

use crate::kernel::KernelArtifacts;
use crate::qemu::{self, BootOutcome, QemuBoot};
use crate::{cache, qemu_cmdline};
use microvm_errors::error_chain;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian's metapackage for the cloud kernel; it depends on the versioned
/// image package, which is what gets downloaded (never installed).
pub const CLOUD_KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    #[error("running {command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("`apt-cache depends {CLOUD_KERNEL_METAPACKAGE}` names no linux-image package")]
    NoCloudImagePackage,
    #[error("no boot/vmlinuz-* in {0}")]
    NoVmlinuz(PathBuf),
    #[error("file operation on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
}

/// Debian's cloud kernel, extracted from its .deb into the cache.
#[derive(Debug, Clone)]
pub struct CloudKernel {
    pub package: String,
    pub vmlinuz: PathBuf,
}

/// Downloads (`apt-get download`) and extracts (`dpkg-deb -x`) the cloud
/// kernel into `<cache>/cloud-kernel/<package>/`, once.
pub fn cloud_kernel() -> Result<CloudKernel, FiguresError> {
    let depends = run(Command::new("apt-cache").args(["depends", CLOUD_KERNEL_METAPACKAGE]))?;
    let package = image_package(&depends).ok_or(FiguresError::NoCloudImagePackage)?;
    let dir = cache::cache_root().join("cloud-kernel").join(&package);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(CloudKernel { package, vmlinuz });
    }
    let download = dir.join("download");
    let extract = dir.join("extract");
    for path in [&download, &extract] {
        std::fs::create_dir_all(path).map_err(|source| io_error(path, source))?;
    }
    run(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&download))?;
    let deb = std::fs::read_dir(&download)
        .map_err(|source| io_error(&download, source))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| FiguresError::Command {
            command: format!("apt-get download {package}"),
            detail: "no .deb downloaded".to_owned(),
        })?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract))?;
    let boot = extract.join("boot");
    let found = std::fs::read_dir(&boot)
        .map_err(|source| io_error(&boot, source))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| FiguresError::NoVmlinuz(boot.clone()))?;
    std::fs::copy(&found, &vmlinuz).map_err(|source| io_error(&vmlinuz, source))?;
    // Only the kernel is kept; the modules tree is large and unused.
    let _ = std::fs::remove_dir_all(&extract);
    let _ = std::fs::remove_dir_all(&download);
    Ok(CloudKernel { package, vmlinuz })
}

/// The versioned image package from `apt-cache depends` output.
fn image_package(depends: &str) -> Option<String> {
    depends.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends:")?.trim();
        (name.starts_with("linux-image-") && name != CLOUD_KERNEL_METAPACKAGE)
            .then(|| name.to_owned())
    })
}

/// Boot results for one kernel.
#[derive(Debug, Clone)]
pub struct KernelRuns {
    pub label: String,
    pub outcomes: Vec<BootOutcome>,
    /// Why this kernel has no numbers, if it has none.
    pub error: Option<String>,
}

impl KernelRuns {
    fn new(label: String) -> Self {
        Self {
            label,
            outcomes: Vec::new(),
            error: None,
        }
    }

    pub fn uptimes(&self) -> Vec<f64> {
        self.outcomes
            .iter()
            .filter_map(BootOutcome::ready_uptime)
            .collect()
    }

    pub fn median_uptime(&self) -> Option<f64> {
        median(self.uptimes())
    }

    pub fn median_wall(&self) -> Option<f64> {
        median(self.outcomes.iter().map(|o| o.wall.as_secs_f64()).collect())
    }

    fn ok_runs(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.exited_by_itself() && o.ready_uptime().is_some())
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct Figures {
    pub vmlinux_bytes: u64,
    pub bz_image_bytes: u64,
    pub initramfs_bytes: u64,
    pub cloud_vmlinuz_bytes: Option<u64>,
    pub runs: usize,
    pub ours: KernelRuns,
    pub cloud: KernelRuns,
}

/// Boots our kernel and the cloud kernel `runs` times each, alternating, so
/// both see the same load on this shared machine.
pub fn measure(kernel: &KernelArtifacts, initramfs: &Path, runs: usize) -> Figures {
    let size = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let kernel_name = kernel
        .dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut ours = KernelRuns::new(format!("microvm {kernel_name} (vmlinux, PVH)"));
    let mut ours_boot = QemuBoot::new(
        kernel.vmlinux.clone(),
        initramfs.to_path_buf(),
        qemu_cmdline(),
    );
    ours_boot.timeout = BOOT_TIMEOUT;

    let cloud_kernel = cloud_kernel();
    let mut cloud = KernelRuns::new(match &cloud_kernel {
        Ok(cloud) => format!("debian {} (vmlinuz)", cloud.package),
        Err(_) => format!("debian {CLOUD_KERNEL_METAPACKAGE}"),
    });
    let cloud_boot = match &cloud_kernel {
        Ok(cloud_kernel) => {
            // Same machine and command line as ours.
            let mut boot = QemuBoot::new(
                cloud_kernel.vmlinuz.clone(),
                initramfs.to_path_buf(),
                qemu_cmdline(),
            );
            boot.timeout = BOOT_TIMEOUT;
            Some(boot)
        }
        Err(err) => {
            cloud.error = Some(error_chain(err));
            None
        }
    };

    for run in 0..runs {
        tracing::info!("run {}/{runs}: microvm kernel", run + 1);
        record(&mut ours, qemu::boot(&ours_boot));
        if let Some(boot) = &cloud_boot {
            tracing::info!("run {}/{runs}: cloud kernel", run + 1);
            record(&mut cloud, qemu::boot(boot));
        }
    }
    Figures {
        vmlinux_bytes: size(&kernel.vmlinux),
        bz_image_bytes: size(&kernel.bz_image),
        initramfs_bytes: size(initramfs),
        cloud_vmlinuz_bytes: cloud_kernel.as_ref().ok().map(|c| size(&c.vmlinuz)),
        runs,
        ours,
        cloud,
    }
}

fn record(runs: &mut KernelRuns, outcome: Result<BootOutcome, qemu::QemuError>) {
    match outcome {
        Ok(outcome) => {
            if outcome.ready_uptime().is_none() {
                tracing::warn!(
                    "{}: no ready line; serial tail:\n{}",
                    runs.label,
                    tail(&outcome.serial, 15)
                );
            }
            runs.outcomes.push(outcome);
        }
        Err(err) => runs.error = Some(error_chain(&err)),
    }
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB ({bytes} B)", bytes as f64 / (1024.0 * 1024.0))
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |s| format!("{s:.3} s"))
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}x", n / d),
        _ => "-".to_owned(),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<54} size", "artifact")?;
        writeln!(f, "{:<54} {}", "vmlinux", mib(self.vmlinux_bytes))?;
        writeln!(f, "{:<54} {}", "bzImage", mib(self.bz_image_bytes))?;
        writeln!(
            f,
            "{:<54} {}",
            "initramfs (release)",
            mib(self.initramfs_bytes)
        )?;
        if let Some(bytes) = self.cloud_vmlinuz_bytes {
            writeln!(
                f,
                "{:<54} {}",
                "debian cloud vmlinuz (for comparison)",
                mib(bytes)
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "boot to agent ready, QEMU+TCG microvm, 256 MiB, {} run(s) each, medians",
            self.runs
        )?;
        writeln!(
            f,
            "{:<54} {:>14} {:>12} {:>8}",
            "kernel", "guest uptime", "wall", "ok runs"
        )?;
        for runs in [&self.ours, &self.cloud] {
            writeln!(
                f,
                "{:<54} {:>14} {:>12} {:>8}",
                runs.label,
                seconds(runs.median_uptime()),
                seconds(runs.median_wall()),
                format!("{}/{}", runs.ok_runs(), self.runs)
            )?;
        }
        writeln!(
            f,
            "{:<54} {:>14} {:>12}",
            "ratio cloud / microvm",
            ratio(self.cloud.median_uptime(), self.ours.median_uptime()),
            ratio(self.cloud.median_wall(), self.ours.median_wall())
        )?;
        writeln!(
            f,
            "note: both kernels boot the same initramfs on the same machine and command \
             line; the cloud kernel logs missing ACPI/PCI/RTC and goes on"
        )?;
        for runs in [&self.ours, &self.cloud] {
            if let Some(error) = &runs.error {
                writeln!(f, "note: {}: {error}", runs.label)?;
            }
            let samples: Vec<String> = runs.uptimes().iter().map(|s| format!("{s:.3}")).collect();
            writeln!(f, "note: {} uptimes: [{}]", runs.label, samples.join(", "))?;
            for (index, outcome) in runs.outcomes.iter().enumerate() {
                if !outcome.exited_by_itself() || outcome.ready_uptime().is_none() {
                    writeln!(
                        f,
                        "note: {} run {}: exited by itself: {}, ready line: {}; serial tail:\n{}",
                        runs.label,
                        index + 1,
                        outcome.exited_by_itself(),
                        outcome.ready_uptime().is_some(),
                        tail(&outcome.serial, 10)
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn run(command: &mut Command) -> Result<String, FiguresError> {
    let name = format!("{command:?}");
    let output = command.output().map_err(|err| FiguresError::Command {
        command: name.clone(),
        detail: err.to_string(),
    })?;
    if !output.status.success() {
        return Err(FiguresError::Command {
            command: name,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn io_error(path: &Path, source: std::io::Error) -> FiguresError {
    FiguresError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_package_comes_from_depends() {
        let depends = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-41-cloud-amd64\n";
        assert_eq!(
            image_package(depends).as_deref(),
            Some("linux-image-6.1.0-41-cloud-amd64")
        );
        assert_eq!(image_package("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    fn outcome(serial: &str, wall_ms: u64) -> BootOutcome {
        use std::os::unix::process::ExitStatusExt;
        BootOutcome {
            serial: serial.to_owned(),
            qemu_stderr: String::new(),
            exit: Some(std::process::ExitStatus::from_raw(0)),
            wall: Duration::from_millis(wall_ms),
        }
    }

    #[test]
    fn table_shows_medians_ratio_and_failed_runs() {
        let mut ours = KernelRuns::new("ours".to_owned());
        ours.outcomes = vec![
            outcome("microvm-agent: ready uptime=0.50\n", 1000),
            outcome("microvm-agent: ready uptime=0.70\n", 3000),
            outcome("microvm-agent: ready uptime=0.60\n", 2000),
        ];
        let mut cloud = KernelRuns::new("cloud".to_owned());
        cloud.outcomes = vec![
            outcome("microvm-agent: ready uptime=1.80\n", 4000),
            outcome("Kernel panic - not syncing\n", 9000),
        ];
        let figures = Figures {
            vmlinux_bytes: 1024 * 1024,
            bz_image_bytes: 0,
            initramfs_bytes: 0,
            cloud_vmlinuz_bytes: None,
            runs: 3,
            ours,
            cloud,
        };
        let table = figures.to_string();
        assert!(table.contains("1.00 MiB (1048576 B)"), "{table}");
        assert!(table.contains("0.600 s"), "{table}");
        assert!(table.contains("2.000 s"), "{table}");
        // 1.8 / 0.6 for uptime.
        assert!(table.contains("3.00x"), "{table}");
        assert!(table.contains("3/3"), "{table}");
        assert!(table.contains("1/3"), "{table}");
        assert!(
            table.contains("cloud run 2: exited by itself: true, ready line: false"),
            "{table}"
        );
        assert!(table.contains("Kernel panic"), "{table}");
    }

    #[test]
    fn ratio_needs_both_numbers() {
        assert_eq!(ratio(Some(3.0), Some(1.5)), "2.00x");
        assert_eq!(ratio(None, Some(1.0)), "-");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
    }
}
