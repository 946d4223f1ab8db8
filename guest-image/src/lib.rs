//! The two files every pod VM boots: the guest kernel (built from Debian's
//! `linux-source-6.1` and the fragments in `kernel-config/`) and the
//! initramfs (the static `microvm-agent` as `/init`), plus the kernel command
//! line the runtime passes.
//!
//! Both artifacts are cached outside the repo under [`cache::cache_root`]
//! (`$MICROVM_CACHE_DIR`, default `/var/cache/microvm`):
//! - `kernel/<source-version>-<hash>/{vmlinux,bzImage,config}`, keyed by the
//!   source package version and a hash of the fragments and build script;
//! - `initramfs/<variant>-<hash>.cpio`, keyed by its own content.
//!
//! [`kernel::kernel`] and [`initramfs::initramfs`] return those paths,
//! building what is missing. [`qemu`] boots them under QEMU+TCG (tests and
//! figures); [`figures`] measures them against Debian's cloud kernel.

pub mod cache;
pub mod figures;
pub mod initramfs;
pub mod kernel;
pub mod qemu;

/// The kernel command line the runtime boots every pod VM with. One word per
/// concern:
///
/// | word | why |
/// | --- | --- |
/// | `console=ttyS0` | kernel console on the one 16550 UART (0x3f8) |
/// | `quiet` | log level 4: a normal boot prints nothing but the agent's lines; every byte through an emulated UART costs an exit |
/// | `panic=-1` | reboot at once on panic, which ends the VM instead of hanging it |
/// | `reboot=k` | reboot through the keyboard controller: our VMM turns the i8042 reset (port 0x64) into VM exit. QEMU's microvm has no i8042, so [`qemu_cmdline`] swaps in `reboot=t` (triple fault, which `-no-reboot` turns into an exit) |
/// | `8250.nr_uarts=1` | register one UART, do not probe the three absent legacy ports |
/// | `tsc=reliable` | trust the TSC: no clocksource watchdog, no TSC sync checks |
/// | `no_timer_check` | skip the check that the IO-APIC timer IRQ works (slow, and wrong under virtualization) |
/// | `random.trust_cpu=on` | seed the RNG from RDRAND, nothing else feeds it early in a microVM |
///
/// Not here, on purpose: `i8042.*` (the kernel has no i8042 driver, see
/// `kernel-config/console.config`), `acpi=off`/`pci=off` (not built in;
/// unknown words would be passed to init). The VMM appends its
/// `virtio_mmio.device=...` words after these.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k 8250.nr_uarts=1 \
                                  tsc=reliable no_timer_check random.trust_cpu=on";

/// The line the agent prints when it is ready; the uptime in seconds follows.
pub const READY_LINE_PREFIX: &str = "microvm-agent: ready uptime=";

/// [`KERNEL_CMDLINE`] for QEMU's microvm machine: `reboot=t` (triple fault)
/// instead of `reboot=k`, because that machine has no i8042.
pub fn qemu_cmdline() -> String {
    KERNEL_CMDLINE
        .split_whitespace()
        .map(|word| if word == "reboot=k" { "reboot=t" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest uptime (seconds) from the agent's ready line in `serial`, if
/// the line is there.
pub fn ready_uptime(serial: &str) -> Option<f64> {
    serial.lines().find_map(|line| {
        let rest = line.trim().strip_prefix(READY_LINE_PREFIX)?;
        rest.trim().parse::<f64>().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_the_documented_words() {
        let words: Vec<_> = KERNEL_CMDLINE.split_whitespace().collect();
        for expected in ["console=ttyS0", "quiet", "panic=-1", "reboot=k"] {
            assert!(words.contains(&expected), "{expected} missing");
        }
        // Words with a dot in the name are module parameters, all others
        // must be known to the kernel: none may be a stray word for init.
        assert_eq!(words.len(), 8);
    }

    #[test]
    fn qemu_cmdline_swaps_only_the_reboot_method() {
        let qemu = qemu_cmdline();
        assert!(qemu.contains("reboot=t"));
        assert!(!qemu.contains("reboot=k"));
        assert_eq!(
            qemu.replace("reboot=t", "reboot=k"),
            KERNEL_CMDLINE
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    #[test]
    fn ready_uptime_parses_the_agent_line() {
        let serial = "noise\r\nmicrovm-agent: ready uptime=0.42\r\nreboot: Restarting system\r\n";
        assert_eq!(ready_uptime(serial), Some(0.42));
        assert_eq!(ready_uptime("microvm-agent: ready uptime=\n"), None);
        assert_eq!(ready_uptime("nothing here"), None);
    }
}
