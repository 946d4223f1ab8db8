//! What the agent does as PID 1 of the VM before serving: the filesystems
//! every container setup relies on, the console ready line, the optional
//! debug shell, and powering off.

use crate::vmm_ports::VmmPorts;
use nix::mount::MsFlags;
use nix::sys::reboot::RebootMode;
use std::io::Write;
use std::path::Path;

pub use microvm_proto::abi::console::READY_LINE_PREFIX;

/// The kernel command-line word (`<word>=1`) that asks for the debug shell;
/// the kernel passes it to init as an environment variable.
pub use microvm_proto::abi::cmdline::DEBUG_SHELL as DEBUG_SHELL_ENV;
const DEBUG_SHELL: &str = "/bin/sh";

/// A filesystem PID 1 mounts before anything else.
#[derive(Debug, Clone, Copy)]
pub struct EarlyMount {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: later targets live inside earlier mounts.
pub const EARLY_MOUNTS: [EarlyMount; 7] = [
    EarlyMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    // Device nodes live here, so no MS_NODEV.
    EarlyMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: None,
    },
    EarlyMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=620,ptmxmode=666"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=755"),
    },
    EarlyMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Everything PID 1 sets up. Failures are printed and the boot goes on: the
/// host learns more from a log line than from a kernel panic.
pub fn setup() -> Option<VmmPorts> {
    // The initramfs root cannot be pivoted away from, and every container
    // setup ends in pivot_root: make "/" a bind mount of itself first.
    if let Err(err) = make_root_pivotable() {
        eprintln!("microvm-agent: cannot make / a mount point: {err}");
    }
    for early in &EARLY_MOUNTS {
        if let Err(err) = mount_early(early) {
            eprintln!(
                "microvm-agent: mounting {} on {} failed: {err}",
                early.fstype, early.target
            );
        }
    }
    // Containers of the pod talk over localhost: the VM's loopback must be
    // up (nothing else brings it up: there is no CNI loopback plugin here).
    if let Err(err) = bring_up_loopback() {
        eprintln!("microvm-agent: cannot bring up lo: {err}");
    }
    let ports = match VmmPorts::acquire() {
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
        .and_then(|text| uptime_field(&text).map(str::to_owned))
    {
        Ok(uptime) => print_console(&format!("{READY_LINE_PREFIX}{uptime}\n")),
        Err(err) => eprintln!("microvm-agent: cannot read /proc/uptime: {err}"),
    }
    ports
}

/// SIOCGIFFLAGS/SIOCSIFFLAGS on `lo`: one synchronous ioctl pair at boot,
/// before the agent's runtime (and its netlink connection) exists.
fn bring_up_loopback() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into `request`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS filled.
    unsafe {
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `request`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's own switch-root move: bind "/" at a staging directory,
/// step into it, move it over "/" and chroot there. A lookup of "/" never
/// crosses a mount on top of the root, so binding "/" onto itself alone
/// would not do.
fn make_root_pivotable() -> nix::Result<()> {
    const STAGING: &str = "/.agent-root";
    match nix::unistd::mkdir(STAGING, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(errno) => return Err(errno),
    }
    nix::mount::mount(
        Some("/"),
        STAGING,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    nix::unistd::chdir(STAGING)?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")?;
    // The staging directory shows up inside the new root too; it is empty.
    let _ = std::fs::remove_dir(STAGING);
    Ok(())
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
        early.data,
    ) {
        // EBUSY: already mounted (e.g. devtmpfs by the kernel); that is fine.
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Writes `text` to stdout (the console) and waits until the UART has sent
/// it: the VMM may stop the VM at the next doorbell, and bytes still in the
/// tty buffer would be lost.
pub fn print_console(text: &str) {
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

/// Runs /bin/sh on the console (debug image) until it exits. Runs before
/// the agent serves, while no other child exists to confuse its wait.
pub fn run_debug_shell_if_asked() {
    if std::env::var_os(DEBUG_SHELL_ENV).is_none() {
        return;
    }
    if !Path::new(DEBUG_SHELL).exists() {
        eprintln!("microvm-agent: {DEBUG_SHELL_ENV} set but {DEBUG_SHELL} is missing (not the debug image?)");
        return;
    }
    match std::process::Command::new(DEBUG_SHELL).status() {
        Ok(status) => eprintln!("microvm-agent: debug shell exited ({status})"),
        Err(err) => eprintln!("microvm-agent: starting {DEBUG_SHELL} failed: {err}"),
    }
}

/// Ends the VM: the VMM's shutdown doorbell, then reboot, which `reboot=k`
/// (our VMM) and `reboot=t` with `-no-reboot` (QEMU) turn into VM exit.
pub fn power_off(ports: Option<&VmmPorts>) -> std::process::ExitCode {
    nix::unistd::sync();
    if let Some(ports) = ports {
        ports.signal_shutdown();
    }
    match nix::sys::reboot::reboot(RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(err) => {
            eprintln!("microvm-agent: reboot failed: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The first field of /proc/uptime ("12.34 5.67\n" -> "12.34"), checked to
/// be a non-negative number so the ready line always carries one.
pub fn uptime_field(proc_uptime: &str) -> Result<&str, String> {
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
        assert_eq!(uptime_field("12.34 5.67\n"), Ok("12.34"));
        assert_eq!(uptime_field("0.41 0.00"), Ok("0.41"));
        assert!(uptime_field("").is_err());
        assert!(uptime_field("abc 1.0").is_err());
        assert!(uptime_field("-1.0 1.0").is_err());
        assert!(uptime_field("NaN 1.0").is_err());
    }

    #[test]
    fn early_mounts_cover_what_containers_need_in_order() {
        let targets: Vec<_> = EARLY_MOUNTS.iter().map(|m| m.target).collect();
        assert_eq!(
            targets,
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/sys/fs/cgroup"
            ]
        );
        // Each target's parent is mounted before it.
        for (index, mount) in EARLY_MOUNTS.iter().enumerate() {
            for later in &EARLY_MOUNTS[index + 1..] {
                assert!(!mount.target.starts_with(&format!("{}/", later.target)));
            }
        }
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
