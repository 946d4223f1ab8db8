//! A stock Linux guest (our guest kernel + initramfs) boots under
//! `microvm-vmm` to the agent's ready line, and the boot timer is reported.
//!
//! Needs KVM that can run a stock guest kernel. On a PVM host (like the
//! development and CI machines) the test is reported as ignored, with the
//! reason printed, never as passed. Force it with `--ignored`.

use libtest_mimic::{Arguments, Failed, Trial};
use microvm_guest_image::initramfs::{initramfs, Variant};
use microvm_guest_image::kernel::kernel;
use microvm_guest_image::{ready_uptime, KERNEL_CMDLINE};
use microvm_tests::harness::{binary, kvm_linux_boot_unsupported, run_with_timeout, TempDir};
use std::process::Command;
use std::time::Duration;

fn linux_boots_to_agent_ready() -> Result<(), Failed> {
    let kernel = kernel().map_err(|e| format!("guest kernel: {e}"))?;
    let initramfs = initramfs(Variant::Release).map_err(|e| format!("initramfs: {e}"))?;
    let dir = TempDir::new("linux-boot");
    let console = dir.join("console.log");
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel.vmlinux)
        .arg("--initrd")
        .arg(&initramfs.path)
        .args(["--cmdline", KERNEL_CMDLINE, "--memory-mib", "256"])
        .arg("--serial-output")
        .arg(&console);
    let done = run_with_timeout(&mut cmd, Duration::from_secs(120))?;
    let serial = std::fs::read_to_string(&console).unwrap_or_default();
    let uptime = ready_uptime(&serial).ok_or_else(|| {
        format!(
            "no agent ready line\nserial:\n{serial}\nstderr:\n{}",
            done.stderr
        )
    })?;
    if !done.stderr.contains("guest boot timer:") {
        return Err(format!("no boot timer in the VMM log:\n{}", done.stderr).into());
    }
    if done.code() != Some(0) {
        return Err(format!("exit status {:?}\nstderr:\n{}", done.code(), done.stderr).into());
    }
    let timer_line = done
        .stderr
        .lines()
        .find(|l| l.contains("guest boot timer:"))
        .unwrap_or_default();
    println!("agent ready at guest uptime {uptime:.3} s; {timer_line}");
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let unsupported = kvm_linux_boot_unsupported();
    if let Some(reason) = &unsupported {
        println!("vmm_linux_boot: ignored on this host: {reason}");
    }
    let trial = Trial::test(
        "linux_boots_to_agent_ready_under_microvm_vmm",
        linux_boots_to_agent_ready,
    )
    .with_ignored_flag(unsupported.is_some());
    libtest_mimic::run(&args, vec![trial]).exit();
}
