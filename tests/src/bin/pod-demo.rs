//! The README's main job: a private containerd (CRI plugin, CNI bridge, our
//! runtime as handler `microvm`) runs a pod through CRI, as kubelet would.
//! The pod gets its own microVM on the default backend, `builtin`
//! (microvm-vmm, jailed): directly where this host's KVM boots Linux, else
//! inside a nested-KVM L1 through `microvm-kvm-harness` (these hosts' KVM
//! is PVM). Its container prints the guest's kernel release and the pod's
//! IP, and the demo prints how long the pod took to start.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use microvm_kvm_harness::host::{self, Kvm};
use microvm_tests::containerd::{test_guest_image, write_shim_config, TestBackend};
use microvm_tests::cri::{container_config, pod_config, CriEnv, MICROVM_HANDLER};
use microvm_tests::harness::{binary, TempDir};
use microvm_tests::kvm::in_nested_kvm;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const SHIM: &str = "containerd-shim-microvm-v2";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// microvm-vmm with the shipped config (jail on, uid 65534): the
    /// default. Needs KVM that boots Linux; on a PVM host the demo runs in
    /// a nested-KVM L1.
    Builtin,
    /// QEMU under TCG: runs on any host, guest code is emulated.
    QemuTcg,
}

/// Runs one Kubernetes pod in a microVM through containerd's CRI and our
/// shim, and shows where it ran and how long it took to start.
#[derive(Debug, Parser)]
#[command(name = "pod-demo")]
struct Args {
    /// The shim backend the pod's VM runs on.
    #[arg(long, value_enum, default_value = "builtin")]
    backend: Backend,
    /// Never re-run inside the KVM harness (fail instead if this host's
    /// KVM cannot boot Linux).
    #[arg(long)]
    no_harness: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pod-demo: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode> {
    let backend = match args.backend {
        Backend::Builtin => TestBackend::Builtin,
        Backend::QemuTcg => TestBackend::QemuTcg,
    };
    let kvm = host::detect();
    if backend.needs_real_kvm() && !kvm.boots_linux() && !in_nested_kvm() {
        if args.no_harness {
            bail!("backend builtin needs KVM that boots Linux, and this host has {kvm}");
        }
        return in_harness(kvm);
    }
    let place = if in_nested_kvm() {
        "inside the KVM harness's nested-KVM L1 (real /dev/kvm, cgroup v2)".to_owned()
    } else {
        format!("directly on this host ({kvm})")
    };
    println!("backend {}, {place}", backend.name());
    demo(backend)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs this same demo under `microvm-kvm-harness`, with the guest image
/// this host built (rebuilding it under emulation would take minutes).
fn in_harness(kvm: Kvm) -> Result<ExitCode> {
    println!(
        "this host's KVM cannot boot Linux ({kvm}): running the builtin pod in a nested-KVM L1 \
         through microvm-kvm-harness"
    );
    let (kernel, initramfs) = test_guest_image();
    let exe = std::env::current_exe().context("finding this binary")?;
    let status = Command::new(binary(microvm_kvm_harness::BINARY))
        .args(["run", "--quiet", "--timeout", "600", "--"])
        .arg(exe)
        .args(["--backend", "builtin", "--no-harness"])
        .env(microvm_tests::containerd::TEST_KERNEL_ENV, kernel)
        .env(microvm_tests::containerd::TEST_INITRAMFS_ENV, initramfs)
        .status()
        .context("starting microvm-kvm-harness")?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

fn demo(backend: TestBackend) -> Result<()> {
    let (kernel, initramfs) = test_guest_image();
    let work = TempDir::new("demo-shim");
    let config =
        write_shim_config(work.path(), &kernel, &initramfs, backend).map_err(anyhow::Error::msg)?;
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
    let outside = if in_nested_kvm() {
        "L1 (the VM's host) kernel"
    } else {
        "host kernel"
    };
    println!(
        "{outside}: {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    let how = match backend {
        TestBackend::Builtin if in_nested_kvm() => {
            "microvm-vmm on KVM, itself in an L1 that QEMU emulates: times are inflated"
        }
        TestBackend::Builtin => "microvm-vmm on KVM",
        TestBackend::QemuKvm => "QEMU on KVM",
        TestBackend::QemuTcg => "QEMU+TCG, guest kernel code is emulated",
    };
    println!(
        "pod started in {:.2} s (RunPodSandbox: VM boot, {how}); container started in {:.0} ms",
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
