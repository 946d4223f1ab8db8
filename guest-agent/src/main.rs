//! `microvm-agent`: PID 1 of every pod VM.
//!
//! PLACEHOLDER. This is the boot-path stub that proves the guest image works;
//! the agent issue replaces it with the real agent (vsock API, containers).
//! It does only what the boot checks and the VMM need:
//!
//! 1. mounts proc, sysfs and devtmpfs;
//! 2. if `iopl(3)` succeeds, writes [`vmm_ports::BOOT_TIMER_VALUE`] to the
//!    VMM's boot timer port;
//! 3. prints `microvm-agent: ready uptime=<seconds>` (the first field of
//!    /proc/uptime) on the console and waits until the UART has sent it;
//! 4. optionally (debug image, `microvm_debug_shell=1` on the kernel command
//!    line) runs `/bin/sh` on the console until it exits;
//! 5. writes the VMM's shutdown port, then `reboot(RB_AUTOBOOT)`. Under QEMU
//!    with `-no-reboot` and `reboot=t` that ends the VM; under our VMM
//!    `reboot=k` turns it into an i8042 reset.
//!
//! Run as anything but PID 1 it refuses, with exit code 2.

mod vmm_ports;

use nix::mount::MsFlags;
use nix::sys::reboot::RebootMode;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Prefix of the line the host waits for. Host tests parse it; keep in sync
/// with `microvm_guest_image::READY_LINE_PREFIX`.
const READY_LINE_PREFIX: &str = "microvm-agent: ready uptime=";

/// The kernel passes unknown `name=value` boot parameters (without a dot) to
/// init as environment variables; this one asks for a console shell.
const DEBUG_SHELL_ENV: &str = "microvm_debug_shell";
const DEBUG_SHELL: &str = "/bin/sh";

/// Exit code when started as anything other than PID 1.
const EXIT_NOT_PID1: u8 = 2;

/// A pseudo filesystem PID 1 mounts before anything else.
struct EarlyMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
}

const EARLY_MOUNTS: [EarlyMount; 3] = [
    EarlyMount {
        fstype: "proc",
        target: "/proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    EarlyMount {
        fstype: "sysfs",
        target: "/sys",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    // Device nodes live here, so no MS_NODEV.
    EarlyMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
    },
];

fn main() -> ExitCode {
    let pid = std::process::id();
    if pid != 1 {
        eprintln!(
            "microvm-agent: refusing to run as pid {pid}: this is the init (PID 1) of a \
             pod VM and would mount filesystems and reboot the machine"
        );
        return ExitCode::from(EXIT_NOT_PID1);
    }
    run_as_init()
}

/// Everything PID 1 does. Failures are printed and the boot goes on: the
/// host learns more from a ready line with a warning above it than from a
/// kernel panic. Returning at all means reboot failed; PID 1 exiting makes
/// the kernel panic, and `panic=-1` then ends the VM anyway.
fn run_as_init() -> ExitCode {
    for early in &EARLY_MOUNTS {
        if let Err(err) = mount_early(early) {
            eprintln!(
                "microvm-agent: mounting {} on {} failed: {err}",
                early.fstype, early.target
            );
        }
    }

    let ports = match vmm_ports::VmmPorts::acquire() {
        Ok(ports) => Some(ports),
        Err(err) => {
            eprintln!("microvm-agent: no VMM ports (iopl: {err}); not signalling the VMM");
            None
        }
    };
    if let Some(ports) = &ports {
        ports.signal_boot_done();
    }

    match std::fs::read_to_string("/proc/uptime")
        .map_err(|err| err.to_string())
        .and_then(|text| uptime_seconds(&text).map(str::to_owned))
    {
        Ok(uptime) => print_console(&format!("{READY_LINE_PREFIX}{uptime}\n")),
        Err(err) => eprintln!("microvm-agent: cannot read /proc/uptime: {err}"),
    }

    if std::env::var_os(DEBUG_SHELL_ENV).is_some() {
        run_debug_shell();
    }

    if let Some(ports) = &ports {
        ports.signal_shutdown();
    }
    nix::unistd::sync();
    match nix::sys::reboot::reboot(RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(err) => {
            eprintln!("microvm-agent: reboot failed: {err}");
            ExitCode::FAILURE
        }
    }
}

fn mount_early(early: &EarlyMount) -> std::io::Result<()> {
    match std::fs::create_dir(early.target) {
        Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => return Err(err),
        _ => {}
    }
    match nix::mount::mount(
        Some(early.fstype),
        early.target,
        Some(early.fstype),
        early.flags,
        None::<&str>,
    ) {
        // EBUSY: already mounted (e.g. by the kernel); that is fine.
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Writes `text` to stdout (the console) and waits until the UART has sent
/// it: the VMM may stop the VM at the next doorbell, and bytes still in the
/// tty buffer would be lost.
fn print_console(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("microvm-agent: console write failed: {err}");
        return;
    }
    // ENOTTY when stdout is not a terminal: nothing to drain then.
    match nix::sys::termios::tcdrain(&stdout) {
        Ok(()) | Err(nix::errno::Errno::ENOTTY) => {}
        Err(err) => eprintln!("microvm-agent: console drain failed: {err}"),
    }
}

fn run_debug_shell() {
    if !Path::new(DEBUG_SHELL).exists() {
        eprintln!("microvm-agent: {DEBUG_SHELL_ENV} set but {DEBUG_SHELL} is missing (not the debug image?)");
        return;
    }
    match std::process::Command::new(DEBUG_SHELL).status() {
        Ok(status) => eprintln!("microvm-agent: debug shell exited ({status})"),
        Err(err) => eprintln!("microvm-agent: starting {DEBUG_SHELL} failed: {err}"),
    }
}

/// The first field of /proc/uptime ("12.34 5.67\n" -> "12.34"), checked to
/// be a non-negative number so the ready line always carries one.
fn uptime_seconds(proc_uptime: &str) -> Result<&str, String> {
    let first = proc_uptime
        .split_whitespace()
        .next()
        .ok_or_else(|| "empty".to_owned())?;
    match first.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(first),
        _ => Err(format!("not a number of seconds: {first:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_takes_the_first_field() {
        assert_eq!(uptime_seconds("12.34 5.67\n"), Ok("12.34"));
        assert_eq!(uptime_seconds("0.41 0.00"), Ok("0.41"));
    }

    #[test]
    fn uptime_rejects_garbage() {
        assert!(uptime_seconds("").is_err());
        assert!(uptime_seconds("   \n").is_err());
        assert!(uptime_seconds("abc 1.0").is_err());
        assert!(uptime_seconds("-1.0 1.0").is_err());
        assert!(uptime_seconds("NaN 1.0").is_err());
    }

    #[test]
    fn early_mounts_cover_proc_sys_dev() {
        let targets: Vec<_> = EARLY_MOUNTS.iter().map(|m| m.target).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev"]);
        // Device nodes under /dev must stay usable.
        let dev = &EARLY_MOUNTS[2];
        assert!(!dev.flags.contains(MsFlags::MS_NODEV));
        assert!(EARLY_MOUNTS
            .iter()
            .all(|m| m.flags.contains(MsFlags::MS_NOSUID)));
    }

    #[test]
    fn ready_line_matches_the_documented_form() {
        let line = format!("{READY_LINE_PREFIX}{}", "1.23");
        assert_eq!(line, "microvm-agent: ready uptime=1.23");
    }
}
