//! The README's main job: a private containerd (CRI plugin, CNI bridge, our
//! runtime as handler `microvm`) runs a pod through CRI, as kubelet would.
//! The pod gets its own microVM (the `qemu` backend under TCG on these
//! hosts, whose KVM cannot run a stock guest kernel); its container prints
//! the guest's kernel release and the pod's IP, and the demo prints how long
//! the pod took to start.

use anyhow::{bail, Context, Result};
use microvm_guest_image::initramfs::{initramfs, Variant};
use microvm_guest_image::kernel::kernel;
use microvm_tests::containerd::write_qemu_shim_config;
use microvm_tests::cri::{container_config, pod_config, CriEnv, MICROVM_HANDLER};
use microvm_tests::harness::{binary, TempDir};
use std::time::{Duration, Instant};

const SHIM: &str = "containerd-shim-microvm-v2";

fn main() -> Result<()> {
    let kernel = kernel().context("guest kernel")?;
    let initramfs = initramfs(Variant::Release).context("guest initramfs")?;
    let work = TempDir::new("demo-shim");
    let config = write_qemu_shim_config(work.path(), &kernel.vmlinux, &initramfs.path)
        .map_err(anyhow::Error::msg)?;
    let env = CriEnv::start("demo", &binary(SHIM), &config, &[]).map_err(anyhow::Error::msg)?;
    let client = &env.client;
    let log_dir = env.log_dir("demo");
    let pod_cfg = pod_config("demo", &log_dir, &[]);

    println!("RunPodSandbox (handler {MICROVM_HANDLER})");
    let started = Instant::now();
    let pod = client
        .run_pod(&pod_cfg, MICROVM_HANDLER)
        .map_err(|err| anyhow::anyhow!("RunPodSandbox: {}", err.message()))?;
    let pod_ready = started.elapsed();
    let ip = client
        .pod_ip(&pod)
        .map_err(|err| anyhow::anyhow!("pod IP: {}", err.message()))?;

    let script = "echo \"hello from a container in a microVM: kernel $(uname -r), \
                  $(nproc) vCPU, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, \
                  pod IP $(ip -4 -o addr show eth0 | awk '{print $4}')\"; sleep 600";
    println!("CreateContainer + StartContainer: sh -c '...uname -r, ip addr...'");
    let started = Instant::now();
    let container = client
        .create_container(
            &pod,
            &container_config("hello", &["sh", "-c", script]),
            &pod_cfg,
        )
        .map_err(|err| anyhow::anyhow!("CreateContainer: {}", err.message()))?;
    client
        .start_container(&container)
        .map_err(|err| anyhow::anyhow!("StartContainer: {}", err.message()))?;
    let container_started = started.elapsed();

    // The container's output, from its CRI log file (what `crictl logs`
    // reads).
    let log_path = log_dir.join("hello.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(line) = log.lines().find(|line| line.contains("hello from")) {
            break line.to_owned();
        }
        if Instant::now() >= deadline {
            bail!("no output in {} within 30 s", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = line.splitn(4, ' ').nth(3).unwrap_or(&line);
    println!("{output}");
    println!("CRI reports pod IP {ip}");
    println!(
        "host kernel: {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    println!(
        "pod started in {:.2} s (RunPodSandbox: VM boot under QEMU+TCG, guest kernel code is emulated); container started in {:.0} ms",
        pod_ready.as_secs_f64(),
        container_started.as_secs_f64() * 1000.0
    );
    client
        .stop_pod(&pod)
        .map_err(|err| anyhow::anyhow!("StopPodSandbox: {}", err.message()))?;
    client
        .remove_pod(&pod)
        .map_err(|err| anyhow::anyhow!("RemovePodSandbox: {}", err.message()))?;
    Ok(())
}
