//! Boots a kernel + initramfs under QEMU's microvm machine with TCG (this
//! host's KVM cannot run a stock Linux guest, see ENVIRONMENT.md) and
//! collects the serial console. QEMU never outlives [`boot`]: on timeout or
//! any early return it is killed and reaped.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// How often the wait loop looks at QEMU when no output arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot start {QEMU_BINARY} (Debian package qemu-system-x86)")]
    Spawn(#[source] std::io::Error),
    #[error("waiting for QEMU failed")]
    Wait(#[source] std::io::Error),
}

/// One QEMU boot.
#[derive(Debug, Clone)]
pub struct QemuBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub memory_mib: u32,
    pub timeout: Duration,
    /// Typed into the serial console once `after` appears on it.
    pub serial_input: Option<SerialInput>,
}

#[derive(Debug, Clone)]
pub struct SerialInput {
    pub after: String,
    pub bytes: Vec<u8>,
}

impl QemuBoot {
    pub fn new(kernel: PathBuf, initrd: PathBuf, cmdline: String) -> Self {
        Self {
            kernel,
            initrd,
            cmdline,
            memory_mib: 256,
            timeout: Duration::from_secs(120),
            serial_input: None,
        }
    }

    /// The QEMU arguments (ENVIRONMENT.md's working microvm setup).
    /// `acpi=off` makes QEMU describe virtio-mmio devices on the command
    /// line. QEMU loads a bzImage (Debian's vmlinuz) as well as a PVH
    /// vmlinux without option ROMs.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "-M",
            "microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=off",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            &self.memory_mib.to_string(),
            "-nographic",
            "-no-reboot",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("-kernel".into());
        args.push(self.kernel.clone().into());
        args.push("-initrd".into());
        args.push(self.initrd.clone().into());
        args.push("-append".into());
        args.push(self.cmdline.clone().into());
        args
    }
}

/// What one boot produced.
#[derive(Debug, Clone)]
pub struct BootOutcome {
    /// Everything the guest wrote to the serial console.
    pub serial: String,
    pub qemu_stderr: String,
    /// `None`: QEMU did not exit by itself within the timeout and was killed.
    pub exit: Option<ExitStatus>,
    pub wall: Duration,
}

impl BootOutcome {
    pub fn exited_by_itself(&self) -> bool {
        self.exit.is_some()
    }

    /// The uptime the agent printed on its ready line.
    pub fn ready_uptime(&self) -> Option<f64> {
        crate::ready_uptime(&self.serial)
    }
}

/// Kills and reaps QEMU on every path out of [`boot`], panics included.
struct QemuProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.stdin = None;
        if matches!(self.child.try_wait(), Ok(None)) {
            // Best effort: the process may exit between the check and the kill.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Boots and waits until QEMU exits or `timeout` passes.
pub fn boot(config: &QemuBoot) -> Result<BootOutcome, QemuError> {
    let started = Instant::now();
    let mut command = Command::new(QEMU_BINARY);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl(), which is async-signal-safe and touches no parent state.
    unsafe {
        command.pre_exec(|| {
            // QEMU dies with the thread that started it, even if this
            // process is killed before the guard below can act (e.g. a CI
            // timeout killing the test harness).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command
        .args(config.args())
        .stdin(if config.serial_input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(QemuError::Spawn)?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let stdin = child.stdin.take();
    let mut qemu = QemuProcess { child, stdin };

    let (chunks_tx, chunks) = mpsc::channel::<Vec<u8>>();
    let stdout_reader = std::thread::spawn(move || {
        let Some(mut stdout) = stdout else { return };
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || chunks_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut stderr) = stderr {
            // A read error just ends the capture; stderr is diagnostics only.
            let _ = stderr.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    });

    let deadline = started + config.timeout;
    let mut serial = Vec::new();
    let mut pending_input = config.serial_input.clone();
    let exit = loop {
        while let Ok(chunk) = chunks.recv_timeout(POLL_INTERVAL) {
            serial.extend_from_slice(&chunk);
            if Instant::now() >= deadline {
                break;
            }
        }
        if let Some(input) = &pending_input {
            if contains(&serial, input.after.as_bytes()) {
                if let Some(stdin) = qemu.stdin.as_mut() {
                    // A failed write shows up as a missing answer on serial.
                    let _ = stdin.write_all(&input.bytes).and_then(|()| stdin.flush());
                }
                pending_input = None;
            }
        }
        if let Some(status) = qemu.child.try_wait().map_err(QemuError::Wait)? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
    };
    let wall = started.elapsed();
    // Reap (or kill) QEMU, which closes its pipes and ends the readers.
    drop(qemu);
    let _ = stdout_reader.join();
    serial.extend(chunks.try_iter().flatten());
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    Ok(BootOutcome {
        serial: String::from_utf8_lossy(&serial).into_owned(),
        qemu_stderr,
        exit,
        wall,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_match_the_documented_microvm_setup() {
        let boot = QemuBoot::new(
            "/k/vmlinux".into(),
            "/i/initramfs".into(),
            "console=ttyS0".into(),
        );
        let args: Vec<String> = boot
            .args()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-M microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=off"));
        assert!(joined.contains("-accel tcg -cpu max -m 256"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.ends_with("-kernel /k/vmlinux -initrd /i/initramfs -append console=ttyS0"));
    }

    #[test]
    fn contains_finds_split_needles() {
        assert!(contains(b"abc ready def", b"ready"));
        assert!(!contains(b"rea", b"ready"));
        assert!(contains(b"x", b""));
    }

    /// The guard kills a child that has not exited and reaps it.
    #[test]
    fn dropping_the_guard_kills_and_reaps_the_child() {
        // `boot` runs QEMU_BINARY; exercise the guard with a stand-in child.
        let child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        drop(QemuProcess { child, stdin: None });
        // The pid is reaped: /proc/<pid> is gone (or reused by another
        // process, which would not be our sleep).
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!cmdline.starts_with("sleep"));
    }
}
