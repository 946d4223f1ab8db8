//! The README's main job: a private containerd runs a busybox container
//! through `containerd-shim-microvm-v2`; the pod gets its own microVM (QEMU
//! backend under TCG on these hosts, since their KVM cannot run a stock
//! guest kernel), and the container prints the guest's kernel release.

use anyhow::{bail, Context, Result};
use microvm_guest_image::initramfs::{initramfs, Variant};
use microvm_guest_image::kernel::kernel;
use microvm_tests::containerd::{write_qemu_shim_config, Containerd};
use microvm_tests::harness::{binary, TempDir};
use microvm_tests::oci_image::write_busybox_image;
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/library/busybox:microvm-demo";
const SHIM: &str = "containerd-shim-microvm-v2";

fn main() -> Result<()> {
    let kernel = kernel().context("guest kernel")?;
    let initramfs = initramfs(Variant::Release).context("guest initramfs")?;
    let bin = TempDir::new("demo-bin");
    std::os::unix::fs::symlink(binary(SHIM), bin.join(SHIM))?;
    let work = TempDir::new("demo-work");
    let config = write_qemu_shim_config(work.path(), &kernel.vmlinux, &initramfs.path)
        .map_err(anyhow::Error::msg)?;
    let containerd = Containerd::start("demo", bin.path(), &[]).map_err(anyhow::Error::msg)?;
    let archive = write_busybox_image(work.path(), IMAGE).map_err(anyhow::Error::msg)?;
    containerd.import(&archive).map_err(anyhow::Error::msg)?;

    let script = "echo \"hello from a container in a microVM: kernel $(uname -r), $(nproc) vCPU, \
                  $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB\"";
    let config = config.to_string_lossy().into_owned();
    let args = [
        "run",
        "--rm",
        "--runtime",
        "io.containerd.microvm.v2",
        "--runtime-config-path",
        &config,
        IMAGE,
        "demo",
        "sh",
        "-c",
        script,
    ];
    println!("$ ctr {}", args.join(" "));
    let start = Instant::now();
    let done = containerd
        .ctr(&args, Duration::from_secs(240))
        .map_err(anyhow::Error::msg)?;
    let elapsed = start.elapsed();
    print!("{}", done.stdout);
    eprint!("{}", done.stderr);
    println!(
        "host kernel: {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    println!(
        "ctr run to exit: {:.2} s (QEMU+TCG backend: guest kernel code is emulated)",
        elapsed.as_secs_f64()
    );
    if !done.status.success() {
        bail!(
            "ctr run failed with {}; containerd log:\n{}",
            done.status,
            containerd.log()
        );
    }
    Ok(())
}
