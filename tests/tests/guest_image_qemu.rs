//! Boot checks for the guest image: QEMU+TCG boots the kernel built from
//! `kernel-config/` with the agent's initramfs, the agent prints its ready
//! line, and the VM ends by itself.
//!
//! The artifacts come through `microvm-guest-image` (cached outside the
//! repo), so only the first run builds the kernel (minutes). If they cannot
//! be built (no apt, no QEMU) these tests fail with the reason; they never
//! pass without booting.

use microvm_guest_image::initramfs::{self, InitramfsArtifact, Variant};
use microvm_guest_image::kernel::{self, KernelArtifacts};
use microvm_guest_image::qemu::{self, BootOutcome, QemuBoot, SerialInput};
use microvm_guest_image::{qemu_cmdline, READY_LINE_PREFIX};
use microvm_shim::pod::error_chain;
use std::time::Duration;

/// Generous: the machine is shared with other builds, and TCG emulates
/// every instruction. A healthy boot takes a few seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn guest_kernel() -> KernelArtifacts {
    kernel::kernel()
        .unwrap_or_else(|err| panic!("cannot build the guest kernel: {}", error_chain(&err)))
}

fn guest_initramfs(variant: Variant) -> InitramfsArtifact {
    initramfs::initramfs(variant).unwrap_or_else(|err| {
        panic!(
            "cannot build the {} initramfs: {}",
            variant.name(),
            error_chain(&err)
        )
    })
}

fn boot(config: &QemuBoot) -> BootOutcome {
    qemu::boot(config).unwrap_or_else(|err| panic!("QEMU: {}", error_chain(&err)))
}

fn describe(outcome: &BootOutcome) -> String {
    format!(
        "exit: {:?}, wall: {:?}\n--- serial ---\n{}\n--- qemu stderr ---\n{}",
        outcome.exit, outcome.wall, outcome.serial, outcome.qemu_stderr
    )
}

#[test]
fn guest_boots_to_agent_ready_and_powers_off() {
    let kernel = guest_kernel();
    let initramfs = guest_initramfs(Variant::Release);
    let mut config = QemuBoot::new(
        kernel.vmlinux.clone(),
        initramfs.path.clone(),
        qemu_cmdline(),
    );
    config.timeout = BOOT_TIMEOUT;
    let outcome = boot(&config);

    let uptime = outcome.ready_uptime();
    assert!(
        uptime.is_some(),
        "no `{READY_LINE_PREFIX}<seconds>` line on serial; {}",
        describe(&outcome)
    );
    assert!(
        outcome.exited_by_itself(),
        "QEMU did not exit within {BOOT_TIMEOUT:?} (killed); {}",
        describe(&outcome)
    );
    assert!(
        outcome.exit.is_some_and(|status| status.success()),
        "QEMU exited with an error; {}",
        describe(&outcome)
    );
    // The agent ran as PID 1 (not the refusal path) and had iopl.
    assert!(
        !outcome.serial.contains("refusing to run"),
        "{}",
        describe(&outcome)
    );
    assert!(
        !outcome.serial.contains("no VMM ports"),
        "{}",
        describe(&outcome)
    );
    // The boot ended by the agent's reboot, not by a kernel panic.
    assert!(
        outcome.serial.contains("reboot: Restarting system"),
        "{}",
        describe(&outcome)
    );
    assert!(
        !outcome.serial.contains("Kernel panic"),
        "{}",
        describe(&outcome)
    );
    eprintln!(
        "guest ready at uptime {:.3} s, QEMU wall {:?}",
        uptime.unwrap_or_default(),
        outcome.wall
    );
}

/// A second look at the final .config, independent of the build script's
/// own check: the options the runtime depends on are in, the excluded ones out.
#[test]
fn kernel_config_has_what_pods_need_and_nothing_excluded() {
    let kernel = guest_kernel();
    let config = std::fs::read_to_string(&kernel.config).expect("read the kernel .config");
    let lines: Vec<&str> = config.lines().collect();
    for wanted in [
        "CONFIG_PVH=y",
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_VIRTIO_NET=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_EROFS_FS=y",
        "CONFIG_MEMCG=y",
        "CONFIG_CGROUP_PIDS=y",
        "CONFIG_SECCOMP_FILTER=y",
        "CONFIG_USER_NS=y",
        "CONFIG_KVM_GUEST=y",
        "CONFIG_X86_IOPL_IOPERM=y",
    ] {
        assert!(
            lines.contains(&wanted),
            "{wanted} missing from {}",
            kernel.config.display()
        );
    }
    for unwanted in [
        "CONFIG_MODULES",
        "CONFIG_ACPI",
        "CONFIG_PCI",
        "CONFIG_KEXEC",
        "CONFIG_DEVMEM",
        "CONFIG_DEBUG_FS",
    ] {
        assert!(
            !lines.contains(&format!("{unwanted}=y").as_str()),
            "{unwanted} is enabled in {}",
            kernel.config.display()
        );
    }
}

/// The debug initramfs carries busybox; with `microvm_debug_shell=1` the
/// agent runs /bin/sh on the console, which must evaluate what is typed.
#[test]
fn debug_image_runs_a_shell_on_the_console() {
    let kernel = guest_kernel();
    let initramfs = guest_initramfs(Variant::Debug);
    let mut config = QemuBoot::new(
        kernel.vmlinux.clone(),
        initramfs.path.clone(),
        format!("{} microvm_debug_shell=1", qemu_cmdline()),
    );
    config.timeout = BOOT_TIMEOUT;
    config.serial_input = Some(SerialInput {
        after: READY_LINE_PREFIX.to_owned(),
        // The echo of the typed line shows `$((6*7))`; only a shell prints 42.
        bytes: b"echo shell-$((6*7))\nexit\n".to_vec(),
    });
    let outcome = boot(&config);
    assert!(outcome.ready_uptime().is_some(), "{}", describe(&outcome));
    assert!(
        outcome.serial.contains("shell-42"),
        "{}",
        describe(&outcome)
    );
    assert!(outcome.exited_by_itself(), "{}", describe(&outcome));
}

/// The build refuses a config where kconfig dropped a requested option, and
/// names it. Uses a throwaway fragment dir, so it stops after configuring.
#[test]
fn kernel_build_fails_naming_a_dropped_option() {
    let fragments = std::env::temp_dir().join(format!(
        "microvm-fragments-{}-{}",
        std::process::id(),
        line!()
    ));
    std::fs::create_dir_all(&fragments).expect("create a fragment dir");
    std::fs::copy(
        kernel::config_dir().join("base.config"),
        fragments.join("base.config"),
    )
    .expect("copy base.config");
    // PVH depends on HYPERVISOR_GUEST, which this fragment set never enables.
    std::fs::write(
        fragments.join("broken.config"),
        "# test: an option whose dependency is missing\nCONFIG_PVH=y\n",
    )
    .expect("write broken.config");
    let output = std::process::Command::new("bash")
        .arg(kernel::build_script())
        .env("MICROVM_KERNEL_CONFIG_DIR", &fragments)
        .output()
        .expect("run build-kernel.sh");
    let _ = std::fs::remove_dir_all(&fragments);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the build must fail:\n{stderr}");
    assert!(
        stderr.contains("option dropped by kconfig: CONFIG_PVH=y requested in broken.config"),
        "the failure must name the option:\n{stderr}"
    );
}
