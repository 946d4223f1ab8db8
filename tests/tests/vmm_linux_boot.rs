//! A stock Linux guest (our guest kernel + initramfs) boots under
//! `microvm-vmm` to the agent's ready line, and the boot timer is reported.
//!
//! Needs KVM that can run a stock guest kernel: on a PVM host (the
//! development and CI machines) it runs in the KVM harness's nested L1.

use libtest_mimic::Failed;
use microvm_guest_image::{ready_uptime, KERNEL_CMDLINE};
use microvm_tests::containerd::test_guest_image;
use microvm_tests::harness::{binary, run_with_timeout, TempDir};
use microvm_tests::kvm::Suite;
use std::process::Command;
use std::time::Duration;

fn linux_boots_to_agent_ready() -> Result<(), Failed> {
    let (kernel, initramfs) = test_guest_image();
    let dir = TempDir::new("linux-boot");
    let console = dir.join("console.log");
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initramfs)
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
    let mut suite = Suite::new("vmm_linux_boot", Duration::from_secs(300));
    suite.kvm(
        "linux_boots_to_agent_ready_under_microvm_vmm",
        linux_boots_to_agent_ready,
    );
    suite.run()
}
