//! `cri-bench`: pods through CRI, several runtimes in one private
//! containerd and one run: our shim (containerd-shim-microvm-v2) on each
//! backend chosen with `--backends` (`builtin`, `qemu-kvm`, `qemu-tcg`), and
//! `runc` (io.containerd.runc.v2) as the peer every figure is compared
//! with. Reports RunPodSandbox and container start latency, pods started
//! at once, and host memory (PSS) per pod outside guest RAM split by
//! process kind, with the ratios builtin/qemu-kvm and X/runc and the
//! issue's targets (#12).
//!
//! `cargo build --release -p containerd-shim-microvm-v2 -p microvm-vmm
//!  -p microvm-kvm-harness --bins && cargo run --release -p microvm-tests
//!  --bin cri-bench -- --kvm-harness --runs 3`
//!
//! SIGINT or SIGTERM stops a run: the CRI calls in flight are abandoned,
//! every pod is stopped and removed, containerd is stopped, and whatever
//! the run started and is still alive is killed; then it exits with 128 +
//! the signal number. With `--kvm-harness` the signal goes to the harness,
//! which stops L1 and everything in it.

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, ValueEnum};
use k8s_cri::v1 as cri;
use microvm_guest_image::kernel;
use microvm_tests::bench::{
    self, initramfs_or_release, is_zombie, kib_field, kib_line, median, millis, ms, signal_if_same,
    stat_fields, unmount_under,
};
use microvm_tests::containerd::{write_shim_config_at, TestBackend};
use microvm_tests::cri::{cni_netns, container_config, pod_config, CriClient, CriEnv};
use microvm_tests::harness::TempDir;
use microvm_tests::kvm::in_nested_kvm;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const SHIM: &str = "containerd-shim-microvm-v2";
const RUNC_SHIM: &str = "containerd-shim-runc-v2";
const VMM: &str = "microvm-vmm";
/// The pause image's command (tests/src/oci_image.rs): the runc sandbox
/// process.
const PAUSE_ARGV: [&str; 2] = ["/bin/sleep", "2147483647"];
const SLEEP_COMMAND: [&str; 2] = ["sleep", "3600"];
/// QEMU's guest RAM: its `memory-backend-memfd` (shim/src/vm/mod.rs) names
/// the memfd after the backend's type (seen in QEMU 7.2's smaps); the
/// vhost-user back-ends map the same memfd, so it shows under this name in
/// their smaps too.
const QEMU_GUEST_RAM_MAPPING: &str = "/memfd:memory-backend-memfd";
/// The guest RAM the shim configs give each VM (write_shim_config).
const GUEST_MEMORY_MIB: u32 = 256;
const MAX_CONCURRENT: usize = 50;
/// Time the pods get after their last start before memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// The issue's targets (#12, part 3), for `builtin` against `qemu` with
/// KVM in the same run.
const HOST_MEMORY_TARGET_MIB: f64 = 20.0;
const MEMORY_VS_QEMU_KVM_TARGET: f64 = 0.25;
const RUN_POD_VS_QEMU_KVM_TARGET: f64 = 0.5;
const CONCURRENT_VS_ONE_TARGET: f64 = 3.0;
const CONCURRENT_TARGET_PODS: usize = 10;

const ABOUT: &str = "Pods through CRI: our shim's backends next to runc, in one private \
containerd and one run.";

const LONG_ABOUT: &str = "\
Pods through CRI: our shim's backends next to runc, in one private containerd and one run.

Starts a private containerd 1.6 with the CRI plugin and a CNI bridge (in its own network
namespace) and drives it as kubelet would, through CRI. Each runtime of --backends is a CRI
handler of its own, named after it, with its own shim config (tests/src/containerd.rs
write_shim_config, shim log level info, guest 256 MiB, 1 vCPU):
  builtin   containerd-shim-microvm-v2, backend builtin: microvm-vmm, jailed as 65534 (the
            default config). Needs real KVM.
  qemu-kvm  containerd-shim-microvm-v2, backend qemu, accel kvm. Needs real KVM.
  qemu-tcg  containerd-shim-microvm-v2, backend qemu, accel tcg: runs on any host.
  runc      io.containerd.runc.v2: always there, the peer every figure is compared with.

Measures, per runtime (the runtimes alternate pod by pod, so load drift hits all):
  RunPodSandbox        median over --runs pods (the call returns once the pod is ready)
  Create+Start         CreateContainer + StartContainer of a busybox `sleep` container in a
                       ready pod, median
  Stop+Remove          StopPodSandbox + RemovePodSandbox, median
  pods at once         --concurrent pods started by as many threads at the same moment: wall
                       time until every RunPodSandbox returned (all ready), that divided by
                       one pod's RunPodSandbox median, and failures (each one printed)
  host PSS per pod     PSS (proportional set size: shared pages split among the processes
                       mapping them) of the pod's host processes from
                       /proc/<pid>/smaps_rollup, while the --runs pods of every runtime (one
                       sleep container each) all run. Outside guest RAM, split by kind:
                       shim, VMM (microvm-vmm, its jail supervisor included, or
                       qemu-system-x86_64), virtiofsd, others (vhost-device-vsock; runc's
                       pause). The guest RAM is a shared memfd mapped by the VMM and the
                       vhost-user back-ends: `/memfd:microvm-guest-ram` for microvm-vmm
                       (vmm/src/memory.rs), `/memfd:memory-backend-memfd` for QEMU; its
                       PSS, from /proc/<pid>/smaps, is taken out and shown apart. runc's
                       container process is shown, not counted (in a microVM it lives in
                       guest RAM).

Prints one table with each runtime's figures and the ratios builtin/qemu-kvm and X/runc,
then the issue's targets, each `met` or `MISSED`: builtin host PSS per pod <= 20 MiB and <=
1/4 of qemu-kvm's; builtin RunPodSandbox <= 1/2 of qemu-kvm's; 10 builtin pods at once <= 3x
one pod.

Where KVM cannot boot Linux (a PVM host), --kvm-harness runs the whole bench inside the
repo's nested-KVM L1 (microvm-kvm-harness, built in the same profile as this binary): real
KVM, but every instruction emulated by TCG, so compare times only as ratios within a run.
PSS is not distorted by TCG.

Needs root, containerd, runc, the CNI plugins in /usr/lib/cni, iproute2, virtiofsd, and for
qemu-* qemu-system-x86_64 and vhost-device-vsock; and containerd-shim-microvm-v2 and
microvm-vmm built in the same profile as this binary (`cargo build --release -p
containerd-shim-microvm-v2 -p microvm-vmm --bins`). SIGINT/SIGTERM stop the run and clean everything up
(pods, shims, VMs, containerd, mounts).";

/// A runtime the bench compares: a CRI handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Runtime {
    /// containerd-shim-microvm-v2 on microvm-vmm (real KVM).
    Builtin,
    /// containerd-shim-microvm-v2 on QEMU with accel kvm (real KVM).
    QemuKvm,
    /// containerd-shim-microvm-v2 on QEMU with accel tcg.
    QemuTcg,
    /// io.containerd.runc.v2 (always compared with).
    Runc,
}

impl Runtime {
    /// Its CRI handler's name, and its name in the table.
    fn name(self) -> &'static str {
        match self {
            Runtime::Builtin => "builtin",
            Runtime::QemuKvm => "qemu-kvm",
            Runtime::QemuTcg => "qemu-tcg",
            Runtime::Runc => "runc",
        }
    }

    /// Our shim's backend; `None` for runc.
    fn backend(self) -> Option<TestBackend> {
        match self {
            Runtime::Builtin => Some(TestBackend::Builtin),
            Runtime::QemuKvm => Some(TestBackend::QemuKvm),
            Runtime::QemuTcg => Some(TestBackend::QemuTcg),
            Runtime::Runc => None,
        }
    }

    fn shim(self) -> &'static str {
        if self == Runtime::Runc {
            RUNC_SHIM
        } else {
            SHIM
        }
    }

    /// The mapping in /proc/<pid>/smaps that is this runtime's guest RAM.
    fn guest_ram_mapping(self) -> Option<String> {
        match self {
            Runtime::Builtin => Some(format!(
                "/memfd:{}",
                microvm_vmm::memory::GUEST_RAM_MEMFD_NAME.to_string_lossy()
            )),
            Runtime::QemuKvm | Runtime::QemuTcg => Some(QEMU_GUEST_RAM_MAPPING.to_owned()),
            Runtime::Runc => None,
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "cri-bench", about = ABOUT, long_about = LONG_ABOUT)]
struct Options {
    /// Pods per runtime for latency and memory.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = at_least_one)]
    runs: usize,
    /// Pods per runtime started at once (0 skips; at most 50).
    #[arg(long, default_value_t = 10, value_name = "N", value_parser = concurrent_pods)]
    concurrent: usize,
    /// The runtimes to compare, comma-separated; runc is always added.
    /// Default: builtin,qemu-kvm,runc where KVM boots Linux (or inside the
    /// KVM harness), else qemu-tcg,runc.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    backends: Option<Vec<Runtime>>,
    /// Guest kernel (vmlinux); default: the cached guest image.
    #[arg(long, env = "MICROVM_TEST_KERNEL", value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Guest initramfs; default: the release image, built and cached on
    /// first use.
    #[arg(long, env = "MICROVM_TEST_INITRAMFS", value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Run this bench under microvm-kvm-harness (built in this binary's
    /// profile): inside a nested-KVM L1 on a PVM host, directly where KVM
    /// boots Linux. The guest image is resolved here and passed on.
    #[arg(long)]
    kvm_harness: bool,
    /// With --kvm-harness: the harness's --timeout.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    harness_timeout: u64,
    /// With --kvm-harness: L1's memory (the harness's --memory-mib).
    #[arg(long, default_value_t = 8192, value_name = "MIB")]
    l1_memory_mib: u32,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(err) => Err(err.to_string()),
    }
}

fn concurrent_pods(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(count) if count > MAX_CONCURRENT => Err(format!(
            "more than {MAX_CONCURRENT} VMs at once on a shared host"
        )),
        Ok(count) => Ok(count),
        Err(err) => Err(err.to_string()),
    }
}

/// Where this process runs, for the defaults and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Inside the KVM harness's L1 (real KVM, emulated by TCG).
    Nested,
    /// A host whose KVM boots Linux.
    RealKvm,
    /// A host whose KVM cannot boot Linux (PVM, none).
    NoKvm,
}

fn place() -> Place {
    if in_nested_kvm() {
        Place::Nested
    } else if microvm_kvm_harness::host::detect().boots_linux() {
        Place::RealKvm
    } else {
        Place::NoKvm
    }
}

/// The runtimes of a run in table order: `chosen` (or the place's default)
/// without repeats, runc last.
fn runtimes(chosen: Option<&[Runtime]>, place: Place) -> Vec<Runtime> {
    let default: &[Runtime] = match place {
        Place::Nested | Place::RealKvm => &[Runtime::Builtin, Runtime::QemuKvm],
        Place::NoKvm => &[Runtime::QemuTcg],
    };
    let mut list: Vec<Runtime> = Vec::new();
    for runtime in chosen.unwrap_or(default) {
        if *runtime != Runtime::Runc && !list.contains(runtime) {
            list.push(*runtime);
        }
    }
    list.push(Runtime::Runc);
    list
}

/// Why `runtimes` cannot run here, if they cannot.
fn refused(runtimes: &[Runtime], place: Place) -> Option<String> {
    if runtimes.len() < 2 {
        return Some("--backends names no microvm backend to compare with runc".into());
    }
    let needs_kvm: Vec<&str> = runtimes
        .iter()
        .filter(|runtime| runtime.backend().is_some_and(TestBackend::needs_real_kvm))
        .map(|runtime| runtime.name())
        .collect();
    (place == Place::NoKvm && !needs_kvm.is_empty()).then(|| {
        format!(
            "{} need(s) a KVM that boots Linux, and this host's cannot ({}): add --kvm-harness",
            needs_kvm.join(", "),
            microvm_kvm_harness::host::detect()
        )
    })
}

/// A binary of this workspace built in the same profile as this one (its
/// directory: `target/<profile>/`).
fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let path = exe
        .parent()
        .context("this binary has no directory")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it in this binary's profile (`cargo build --release -p \
             containerd-shim-microvm-v2 -p microvm-vmm -p microvm-kvm-harness --bins`)",
            path.display()
        );
    }
    Ok(path)
}

/// The guest kernel and initramfs: the options' (or their environment
/// variables'), else the cached image.
fn guest_image(options: &Options) -> Result<(PathBuf, PathBuf)> {
    let kernel = match &options.kernel {
        Some(path) => path.clone(),
        None => kernel::kernel().context("guest kernel")?.vmlinux,
    };
    let initramfs = initramfs_or_release(options.initramfs.clone()).context("guest initramfs")?;
    Ok((kernel, initramfs))
}

/// The harness's arguments to run `exe` with `args` (this run's, less
/// `--kvm-harness`).
fn harness_args(
    exe: &Path,
    args: impl IntoIterator<Item = String>,
    timeout: u64,
    memory_mib: u32,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "run".into(),
        "--timeout".into(),
        timeout.to_string(),
        "--memory-mib".into(),
        memory_mib.to_string(),
        "--".into(),
        exe.display().to_string(),
    ];
    argv.extend(args.into_iter().filter(|arg| arg != "--kvm-harness"));
    argv
}

/// Runs this bench again under microvm-kvm-harness and exits with its
/// status. The guest image is resolved here, so L1 does not check its
/// inputs again under emulation (tests/src/kvm.rs does the same).
fn run_under_harness(options: &Options) -> Result<ExitCode> {
    let harness = sibling_binary(microvm_kvm_harness::BINARY)?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let (kernel, initramfs) = guest_image(options)?;
    let argv = harness_args(
        &exe,
        std::env::args().skip(1),
        options.harness_timeout,
        options.l1_memory_mib,
    );
    eprintln!(
        "cri-bench: running under the KVM harness ({}): {} {}",
        microvm_kvm_harness::host::detect(),
        harness.display(),
        argv.join(" ")
    );
    let mut child = Command::new(&harness)
        .args(&argv)
        .env("MICROVM_TEST_KERNEL", &kernel)
        .env("MICROVM_TEST_INITRAMFS", &initramfs)
        .spawn()
        .with_context(|| format!("starting {}", harness.display()))?;
    // A SIGTERM sent to this process alone goes on to the harness, which
    // stops L1 and leaves nothing behind; a terminal's Ctrl-C reaches both.
    let pid = i32::try_from(child.id()).context("harness pid")?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("watching SIGINT and SIGTERM")?;
    let status = loop {
        for signal in signals.pending() {
            eprintln!("cri-bench: signal {signal}: passing it on to the harness");
            // SAFETY: kill(2) with plain integers; `pid` is our child and
            // not reaped yet (try_wait below reaps it, and then the loop
            // ends), so it cannot be another process.
            unsafe { libc::kill(pid, signal) };
        }
        if let Some(status) = child.try_wait().context("waiting for the harness")? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn main() -> ExitCode {
    let options = Options::parse();
    let place = place();
    let runtimes = runtimes(options.backends.as_deref(), place);
    if options.kvm_harness && place != Place::Nested {
        return match run_under_harness(&options) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("cri-bench: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(reason) = refused(&runtimes, place) {
        let mut command = Options::command();
        command
            .error(clap::error::ErrorKind::ArgumentConflict, reason)
            .exit();
    }
    let interrupt = match watch_signals() {
        Ok(interrupt) => interrupt,
        Err(err) => {
            eprintln!("cri-bench: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    // Everything the run started is torn down before `run` returns.
    let result = run(&options, &runtimes, place, &interrupt);
    match (interrupt.signal(), result) {
        (0, Ok(())) => ExitCode::SUCCESS,
        (0, Err(err)) => {
            eprintln!("cri-bench: {err:#}");
            ExitCode::FAILURE
        }
        (signal, _) => {
            eprintln!("cri-bench: interrupted by signal {signal}; cleaned up");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
    }
}

/// SIGINT/SIGTERM: the first one cancels the CRI calls in flight, so the
/// run returns through the normal drops (which tear everything down).
type Interrupt = bench::Interrupt<watch::Sender<bool>>;

fn watch_signals() -> Result<Arc<Interrupt>> {
    Interrupt::watch(
        "cri-bench",
        "removing the pods and containerd",
        watch::Sender::new(false),
        |cancel| {
            cancel.send_replace(true);
        },
    )
}

/// CRI calls that a signal abandons. The harness's `CriClient` methods
/// block until the call ends (up to its 300 s timeout); a pod VM boot
/// under TCG is long, and an interrupted run must not wait for it.
#[derive(Clone, Copy)]
struct Cri<'a> {
    client: &'a CriClient,
    interrupt: &'a Interrupt,
}

impl Cri<'_> {
    fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        self.interrupt.check()?;
        let mut cancel = self.interrupt.stop.subscribe();
        let cancelled = async move {
            if cancel.wait_for(|stop| *stop).await.is_err() {
                // The sender lives as long as the process: never here.
                std::future::pending::<()>().await;
            }
        };
        let result = self.client.block_on(async move {
            tokio::select! {
                result = call => Some(result),
                () = cancelled => None,
            }
        });
        match result {
            None => bail!(
                "{what}: abandoned, interrupted by signal {}",
                self.interrupt.signal()
            ),
            Some(Ok(response)) => Ok(response.into_inner()),
            Some(Err(status)) => bail!("{what}: {:?}: {}", status.code(), status.message()),
        }
    }

    fn run_pod(&self, config: &cri::PodSandboxConfig, handler: &str) -> Result<String> {
        let mut runtime = self.client.runtime.clone();
        self.call(
            "RunPodSandbox",
            runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_owned(),
            }),
        )
        .map(|response| response.pod_sandbox_id)
    }

    fn create_container(
        &self,
        pod: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let mut runtime = self.client.runtime.clone();
        self.call(
            "CreateContainer",
            runtime.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.to_owned(),
                config: Some(config.clone()),
                sandbox_config: Some(pod_config.clone()),
            }),
        )
        .map(|response| response.container_id)
    }

    fn start_container(&self, id: &str) -> Result<()> {
        let mut runtime = self.client.runtime.clone();
        self.call(
            "StartContainer",
            runtime.start_container(cri::StartContainerRequest {
                container_id: id.to_owned(),
            }),
        )
        .map(|_| ())
    }

    fn stop_and_remove_pod(&self, id: &str) -> Result<()> {
        let mut runtime = self.client.runtime.clone();
        self.call(
            "StopPodSandbox",
            runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }),
        )?;
        self.call(
            "RemovePodSandbox",
            runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }),
        )
        .map(|_| ())
    }

    fn remove_every_pod(&self) -> Result<()> {
        let mut runtime = self.client.runtime.clone();
        let pods = self.call(
            "ListPodSandbox",
            runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
        )?;
        for pod in pods.items {
            self.stop_and_remove_pod(&pod.id)?;
        }
        Ok(())
    }
}

/// One process as /proc shows it.
#[derive(Debug, Clone)]
struct Process {
    pid: u32,
    ppid: u32,
    start_time: u64,
    argv: Vec<String>,
}

impl Process {
    fn program(&self) -> &str {
        let first = self.argv.first().map_or("?", String::as_str);
        first.rsplit('/').next().unwrap_or(first)
    }

    /// The value after `flag` on the command line.
    fn flag(&self, flag: &str) -> Option<&str> {
        let at = self.argv.iter().position(|arg| arg == flag)?;
        self.argv.get(at + 1).map(String::as_str)
    }
}

fn read_process(pid: u32) -> Option<Process> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&stat);
    // ppid is field 4, starttime field 22.
    let ppid = fields.get(1)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv = cmdline
        .split(|byte| *byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    Some(Process {
        pid,
        ppid,
        start_time,
        argv,
    })
}

/// Every process on the host (kernel threads have an empty argv).
fn process_table() -> Vec<Process> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(read_process)
                .collect()
        })
        .unwrap_or_default()
}

/// The serving shim of pod `pod` of this containerd: its program is
/// `shim`, and its command line names the pod (`-id`, the sandbox is the
/// pod's first container) and this containerd (`-address`).
fn shim_of<'a>(table: &'a [Process], shim: &str, socket: &str, pod: &str) -> Option<&'a Process> {
    table.iter().find(|process| {
        process.program() == shim
            && process.flag("-id") == Some(pod)
            && process.flag("-address") == Some(socket)
    })
}

/// The processes below `root` (children first, then theirs).
fn descendants(table: &[Process], root: u32) -> Vec<&Process> {
    let mut found: Vec<&Process> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for child in table.iter().filter(|process| process.ppid == parent) {
            parents.push(child.pid);
            found.push(child);
        }
    }
    found
}

/// `Pss:` of a smaps_rollup text, in KiB.
fn rollup_pss_kib(rollup: &str) -> Option<u64> {
    kib_line(rollup, "Pss:")
}

/// Sum of `Pss:` over the mappings of `name` (with or without the
/// ` (deleted)` a memfd's path carries) in a smaps text, in KiB.
fn mapping_pss_kib(smaps: &str, name: &str) -> u64 {
    let mut in_mapping = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if !first.ends_with(':') {
            // A mapping header: range, perms, offset, dev, inode, path.
            let path: Vec<&str> = words.skip(4).collect();
            let path = path.join(" ");
            in_mapping = path == name || path == format!("{name} (deleted)");
        } else if in_mapping {
            total += kib_field(line, "Pss:").unwrap_or(0);
        }
    }
    total
}

/// What a host process of a pod is, for the split of its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Shim,
    /// microvm-vmm (the jail's supervisor and the VMM) or QEMU.
    Vmm,
    Virtiofsd,
    /// vhost-device-vsock, runc's pause, anything else of the pod.
    Other,
    /// runc's container process: shown, not counted (in a microVM it lives
    /// in guest RAM).
    Container,
}

impl Kind {
    const COUNTED: [Kind; 4] = [Kind::Shim, Kind::Vmm, Kind::Virtiofsd, Kind::Other];

    fn label(self) -> &'static str {
        match self {
            Kind::Shim => "shim",
            Kind::Vmm => "VMM",
            Kind::Virtiofsd => "virtiofsd",
            Kind::Other => "others",
            Kind::Container => "container",
        }
    }

    /// The kind of `process`, found below the shim of a `runtime` pod.
    fn of(runtime: Runtime, process: &Process) -> Kind {
        let program = process.program();
        if runtime == Runtime::Runc {
            if process.argv == PAUSE_ARGV {
                Kind::Other
            } else {
                Kind::Container
            }
        } else if program == VMM || program.starts_with("qemu-system") {
            Kind::Vmm
        } else if program == "virtiofsd" {
            Kind::Virtiofsd
        } else {
            Kind::Other
        }
    }
}

/// What one host process of a pod costs.
#[derive(Debug, Clone)]
struct ProcessMemory {
    kind: Kind,
    /// The program (`pause` for runc's sandbox process).
    label: String,
    pss_kib: u64,
    guest_ram_kib: u64,
}

impl ProcessMemory {
    fn counted(&self) -> bool {
        self.kind != Kind::Container
    }

    fn outside_guest_ram_kib(&self) -> u64 {
        self.pss_kib.saturating_sub(self.guest_ram_kib)
    }
}

fn process_memory(
    process: &Process,
    kind: Kind,
    label: String,
    guest_ram: Option<&str>,
) -> Option<ProcessMemory> {
    let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", process.pid)).ok()?;
    let guest_ram_kib = match guest_ram {
        Some(name) => {
            let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", process.pid)).ok()?;
            mapping_pss_kib(&smaps, name)
        }
        None => 0,
    };
    Some(ProcessMemory {
        kind,
        label,
        pss_kib: rollup_pss_kib(&rollup)?,
        guest_ram_kib,
    })
}

/// The host memory of one pod.
#[derive(Debug, Clone, Default)]
struct PodMemory {
    processes: Vec<ProcessMemory>,
}

impl PodMemory {
    fn counted(&self) -> impl Iterator<Item = &ProcessMemory> {
        self.processes.iter().filter(|process| process.counted())
    }

    fn pss_kib(&self) -> u64 {
        self.counted().map(|process| process.pss_kib).sum()
    }

    fn guest_ram_kib(&self) -> u64 {
        self.counted().map(|process| process.guest_ram_kib).sum()
    }

    fn outside_guest_ram_kib(&self) -> u64 {
        self.pss_kib().saturating_sub(self.guest_ram_kib())
    }

    /// PSS outside guest RAM of the processes of `kind`.
    fn kind_kib(&self, kind: Kind) -> u64 {
        self.processes
            .iter()
            .filter(|process| process.kind == kind)
            .map(ProcessMemory::outside_guest_ram_kib)
            .sum()
    }

    /// The programs that map the guest RAM, sorted.
    fn guest_ram_mappers(&self) -> Vec<&str> {
        let mut mappers: Vec<&str> = self
            .processes
            .iter()
            .filter(|process| process.guest_ram_kib > 0)
            .map(|process| process.label.as_str())
            .collect();
        mappers.sort_unstable();
        mappers.dedup();
        mappers
    }

    /// `label PSS (outside guest RAM)` per program, summed.
    fn breakdown(&self) -> String {
        let mut by_label: BTreeMap<&str, (u64, u64, usize, bool)> = BTreeMap::new();
        for process in &self.processes {
            let entry =
                by_label
                    .entry(process.label.as_str())
                    .or_insert((0, 0, 0, process.counted()));
            entry.0 += process.pss_kib;
            entry.1 += process.outside_guest_ram_kib();
            entry.2 += 1;
        }
        by_label
            .into_iter()
            .map(|(label, (pss, outside, processes, counted))| {
                let mut text = if pss == outside {
                    format!("{label} {}", mib(pss))
                } else {
                    format!("{label} {} ({} w/o guest RAM)", mib(pss), mib(outside))
                };
                if processes > 1 {
                    text.push_str(&format!(" [{processes} procs]"));
                }
                if !counted {
                    text.push_str(" [not counted]");
                }
                text
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The host memory of `pod`, a pod of `runtime`, or why it cannot be read.
fn pod_memory(table: &[Process], socket: &str, runtime: Runtime, pod: &str) -> Result<PodMemory> {
    let shim_name = runtime.shim();
    let guest_ram = runtime.guest_ram_mapping();
    let shim = shim_of(table, shim_name, socket, pod)
        .with_context(|| format!("no {shim_name} process for pod {pod}"))?;
    let mut memory = PodMemory::default();
    memory.processes.push(
        process_memory(shim, Kind::Shim, "shim".to_owned(), guest_ram.as_deref())
            .with_context(|| format!("reading the memory of {shim_name} (pid {})", shim.pid))?,
    );
    for process in descendants(table, shim.pid) {
        let kind = Kind::of(runtime, process);
        let label = match kind {
            Kind::Other if runtime == Runtime::Runc => "pause".to_owned(),
            Kind::Container => format!("container {}", process.program()),
            _ => process.program().to_owned(),
        };
        // A process that exited meanwhile has nothing left to count.
        if let Some(entry) = process_memory(process, kind, label, guest_ram.as_deref()) {
            memory.processes.push(entry);
        }
    }
    Ok(memory)
}

/// What runs a `runtime` pod's VM, from the first VMM process below one
/// of `shims`: QEMU's `-accel`, or microvm-vmm and whether it is jailed.
fn vmm_seen(table: &[Process], shims: &[u32]) -> Option<String> {
    shims.iter().find_map(|&shim| {
        let below = descendants(table, shim);
        if let Some(qemu) = below
            .iter()
            .find(|process| process.program().starts_with("qemu-system"))
        {
            return Some(format!(
                "qemu-system-x86_64 -accel {}",
                qemu.flag("-accel").unwrap_or("?")
            ));
        }
        let vmms = below
            .iter()
            .filter(|process| process.program() == VMM)
            .count();
        let jailed = below.iter().any(|process| process.flag("--jail").is_some());
        (vmms > 0).then(|| {
            if jailed {
                format!("{VMM} --jail (supervisor + jailed VMM)")
            } else {
                VMM.to_owned()
            }
        })
    })
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mib_f(kib: f64) -> String {
    if kib.is_nan() {
        "-".into()
    } else {
        format!("{:.1} MiB", kib / 1024.0)
    }
}

/// Everything one run starts. Dropping it (on success, error or signal)
/// removes every pod through CRI and stops containerd ([`CriEnv`]'s drop),
/// then kills whatever the run started that is still alive, unmounts what
/// is left under the shim's work dir, and says what (if anything) it found.
struct Bench {
    env: Option<CriEnv>,
    /// The shim configs, state dirs and VM logs (one subdir per runtime).
    shim_work: TempDir,
    /// containerd's dir (socket, config, root, state): in the command line
    /// of containerd and of every shim it starts.
    containerd_dir: PathBuf,
    cni_netns_before: Vec<String>,
}

impl Bench {
    /// Starts containerd with one CRI handler per microvm runtime of
    /// `runtimes` (named after it, each with its own shim config under
    /// `shim_work/<name>`), plus `runc`.
    fn start(options: &Options, runtimes: &[Runtime], interrupt: &Interrupt) -> Result<Self> {
        let (kernel, initramfs) = guest_image(options)?;
        interrupt.check()?;
        let shim_work = TempDir::new("cribench-shim");
        let mut configs: Vec<(&'static str, PathBuf)> = Vec::new();
        for runtime in runtimes {
            let Some(backend) = runtime.backend() else {
                continue;
            };
            let work = shim_work.join(runtime.name());
            std::fs::create_dir_all(&work)
                .with_context(|| format!("creating {}", work.display()))?;
            let config = write_shim_config_at(&work, &kernel, &initramfs, backend, "info")
                .map_err(anyhow::Error::msg)?;
            if backend == TestBackend::Builtin {
                // The VMM this build made (the default `microvm-vmm` is
                // looked up on containerd's PATH, where only the shim is).
                let mut text = std::fs::read_to_string(&config)?;
                text.push_str(&format!(
                    "[builtin]\nvmm = \"{}\"\n",
                    sibling_binary(VMM)?.display()
                ));
                std::fs::write(&config, text)
                    .with_context(|| format!("writing {}", config.display()))?;
            }
            configs.push((runtime.name(), config));
        }
        // CriEnv's own `microvm` handler gets the first config; the bench
        // uses the handlers named after the runtimes.
        let (_, first) = configs
            .first()
            .context("no microvm runtime to compare with runc")?;
        let extra: Vec<(&str, &Path)> = configs
            .iter()
            .map(|(name, config)| (*name, config.as_path()))
            .collect();
        let cni_netns_before = cni_netns();
        let env = CriEnv::start("cribench", &sibling_binary(SHIM)?, first, &extra)
            .map_err(anyhow::Error::msg)
            .context("starting containerd with CRI")?;
        Ok(Self {
            containerd_dir: env.containerd.dir.path().to_path_buf(),
            env: Some(env),
            shim_work,
            cni_netns_before,
        })
    }

    fn env(&self) -> Result<&CriEnv> {
        self.env.as_ref().context("containerd is stopped")
    }

    fn socket(&self) -> Result<String> {
        Ok(self.env()?.containerd.socket.to_string_lossy().into_owned())
    }

    /// Pids (with start times) of every shim of this containerd and of
    /// everything below them: a runc container outlives its shim if the
    /// shim is killed, and must go too.
    fn started_processes(&self) -> Vec<(u32, u64)> {
        let needle = self.containerd_dir.to_string_lossy().into_owned();
        let table = process_table();
        let mut found = Vec::new();
        for shim in table.iter().filter(|process| {
            process.program().starts_with("containerd-shim")
                && process.argv.iter().any(|arg| arg.contains(&needle))
        }) {
            found.push((shim.pid, shim.start_time));
            found.extend(
                descendants(&table, shim.pid)
                    .into_iter()
                    .map(|process| (process.pid, process.start_time)),
            );
        }
        found
    }

    /// What of this run is still alive: processes whose command line
    /// names containerd's or the shim's dir, and the recorded ones.
    fn survivors(&self, recorded: &[(u32, u64)]) -> Vec<Process> {
        let needles = [
            self.containerd_dir.to_string_lossy().into_owned(),
            self.shim_work.path().to_string_lossy().into_owned(),
        ];
        process_table()
            .into_iter()
            .filter(|process| process.pid != std::process::id())
            .filter(|process| !is_zombie(process.pid))
            .filter(|process| {
                recorded.contains(&(process.pid, process.start_time))
                    || process
                        .argv
                        .iter()
                        .any(|arg| needles.iter().any(|needle| arg.contains(needle.as_str())))
            })
            .collect()
    }
}

fn containerd_alive(dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    process_table().iter().any(|process| {
        process.program() == "containerd"
            && process.argv.iter().any(|arg| arg.contains(dir.as_ref()))
            && !is_zombie(process.pid)
    })
}

/// The CRI calls containerd logs at start and at end ("... returns ..." or
/// "... failed ..."), by the start of their message.
const LOGGED_CRI_CALLS: [&str; 3] = [
    "msg=\"RunPodSandbox for ",
    "msg=\"CreateContainer within sandbox ",
    "msg=\"StartContainer for ",
];

/// How many CRI calls containerd started and has not finished, from its
/// log.
fn calls_in_flight(log: &str) -> usize {
    let (mut started, mut ended) = (0usize, 0usize);
    for line in log.lines() {
        let Some(at) = LOGGED_CRI_CALLS.iter().find_map(|call| line.find(call)) else {
            continue;
        };
        let message = &line[at..];
        if message.contains(" returns ") || message.contains(" failed") {
            ended += 1;
        } else {
            started += 1;
        }
    }
    started.saturating_sub(ended)
}

/// A RunPodSandbox abandoned by a signal goes on in containerd, which
/// undoes it when it fails (VM, task, pod network namespace); a pod is in
/// the CRI store (for the removal through CRI) only once the call
/// succeeded. Stopping containerd before then would leak the network
/// namespace, so this waits for containerd to finish every call.
fn wait_for_abandoned_calls(env: &CriEnv, containerd_dir: &Path) {
    const LIMIT: Duration = Duration::from_secs(180);
    let started = Instant::now();
    let mut reported = Duration::ZERO;
    loop {
        let pending = calls_in_flight(&env.containerd_log());
        if pending == 0 {
            return;
        }
        if !containerd_alive(containerd_dir) {
            // A Ctrl-C in a terminal reaches containerd too (same process
            // group): nothing will finish those calls.
            eprintln!(
                "cri-bench: cleanup: containerd has exited with {pending} CRI call(s) in flight; \
                 their pods' network namespaces may be left behind"
            );
            return;
        }
        let waited = started.elapsed();
        if waited >= LIMIT {
            eprintln!(
                "cri-bench: cleanup: containerd still has {pending} CRI call(s) in flight after \
                 {LIMIT:?}; stopping it anyway"
            );
            return;
        }
        if waited >= reported {
            eprintln!(
                "cri-bench: cleanup: waiting for containerd to finish {pending} abandoned CRI \
                 call(s) (up to {LIMIT:?})"
            );
            reported = waited + Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(env) = &self.env {
            wait_for_abandoned_calls(env, &self.containerd_dir);
        }
        let recorded = self.started_processes();
        // Pods removed through CRI (the shims stop their VMs), containerd
        // stopped, shims that outlived it killed.
        drop(self.env.take());
        let mut survivors = self.survivors(&recorded);
        // VM processes go with their shim (parent-death signal) at once;
        // what is left after this is killed.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !survivors.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            survivors = self.survivors(&recorded);
        }
        if !survivors.is_empty() {
            eprintln!(
                "cri-bench: cleanup: killing {} leftover process(es):",
                survivors.len()
            );
            for process in &survivors {
                eprintln!("  {} {}", process.pid, process.argv.join(" "));
                signal_if_same(process.pid, process.start_time, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        unmount_under(self.shim_work.path());
        let left = self.survivors(&recorded);
        let netns: Vec<String> = cni_netns()
            .into_iter()
            .filter(|name| !self.cni_netns_before.contains(name))
            .collect();
        if left.is_empty() {
            eprintln!(
                "cri-bench: cleanup: no process of this run is left (containerd, shims, qemu, \
                 virtiofsd, vhost-device-vsock, pause)"
            );
        } else {
            for process in &left {
                eprintln!(
                    "cri-bench: cleanup: STILL RUNNING {} {}",
                    process.pid,
                    process.argv.join(" ")
                );
            }
        }
        for name in netns {
            if orphaned_netns(&name) {
                let deleted = Command::new("ip")
                    .args(["netns", "delete", &name])
                    .status()
                    .is_ok_and(|status| status.success());
                eprintln!(
                    "cri-bench: cleanup: {} orphaned pod network namespace {name} (left by \
                     containerd stopping mid-call)",
                    if deleted {
                        "deleted"
                    } else {
                        "COULD NOT DELETE"
                    }
                );
            } else {
                // A live pod's (maybe another run's on this host).
                eprintln!("cri-bench: cleanup: CNI network namespace {name} is new and in use");
            }
        }
    }
}

/// A pod network namespace nobody can use any more: no process in it and
/// no veth (a veth pair goes with the namespace of its other end, here the
/// deleted namespace of the bench's containerd). Another run's live pod
/// has its veth, or a process (pause, qemu) in it.
fn orphaned_netns(name: &str) -> bool {
    let output = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    matches!(
        (
            output(&["netns", "pids", name]),
            output(&["-n", name, "-o", "link", "show", "type", "veth"]),
        ),
        (Some(pids), Some(veths)) if pids.is_empty() && veths.is_empty()
    )
}

#[derive(Default)]
struct Latencies {
    run_pod: Vec<f64>,
    create: Vec<f64>,
    start: Vec<f64>,
    create_start: Vec<f64>,
    teardown: Vec<f64>,
}

struct LatencyPod {
    runtime: Runtime,
    id: String,
    name: String,
}

/// Runs a pod of `runtime` and a sleep container in it, timing both.
fn one_pod(
    bench: &Bench,
    cri: Cri,
    runtime: Runtime,
    name: String,
    latencies: &mut Latencies,
) -> Result<LatencyPod> {
    let handler = runtime.name();
    let env = bench.env()?;
    let config = pod_config(&name, &env.log_dir(&name), &[]);
    let started = Instant::now();
    let id = cri
        .run_pod(&config, handler)
        .with_context(|| format!("pod {name} ({handler})"))?;
    let run_pod = millis(started.elapsed());
    let pod = LatencyPod {
        runtime,
        id: id.clone(),
        name: name.clone(),
    };
    let container = container_config("sleeper", &SLEEP_COMMAND);
    let started = Instant::now();
    let container_id = cri
        .create_container(&id, &container, &config)
        .with_context(|| format!("pod {name} ({handler})"))?;
    let create = millis(started.elapsed());
    let started_start = Instant::now();
    cri.start_container(&container_id)
        .with_context(|| format!("pod {name} ({handler})"))?;
    let start = millis(started_start.elapsed());
    let create_start = millis(started.elapsed());
    eprintln!(
        "cri-bench: {name} ({handler}): RunPodSandbox {run_pod:.1} ms, CreateContainer \
         {create:.1} ms, StartContainer {start:.1} ms"
    );
    latencies.run_pod.push(run_pod);
    latencies.create.push(create);
    latencies.start.push(start);
    latencies.create_start.push(create_start);
    Ok(pod)
}

/// The outcome of starting pods at once.
#[derive(Default)]
struct Burst {
    wall_ms: f64,
    calls_ms: Vec<f64>,
    failures: Vec<String>,
    pods: usize,
}

/// Starts `count` pods of `runtime` from as many threads at once (sharing
/// one client: kubelet too has one CRI connection).
fn burst(bench: &Bench, cri: Cri, runtime: Runtime, count: usize) -> Result<Burst> {
    let env = bench.env()?;
    let handler = runtime.name();
    let configs: Vec<cri::PodSandboxConfig> = (0..count)
        .map(|index| {
            let name = format!("{handler}-burst-{index}");
            pod_config(&name, &env.log_dir(&name), &[])
        })
        .collect();
    let gate = std::sync::Barrier::new(count);
    let results: Vec<(Result<String>, Instant, Instant)> = std::thread::scope(|scope| {
        let threads: Vec<_> = configs
            .iter()
            .map(|config| {
                let gate = &gate;
                scope.spawn(move || {
                    gate.wait();
                    let started = Instant::now();
                    let result = cri.run_pod(config, handler);
                    (result, started, Instant::now())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread.join().unwrap_or_else(|_| {
                    let now = Instant::now();
                    (Err(anyhow::anyhow!("the thread panicked")), now, now)
                })
            })
            .collect()
    });
    let mut outcome = Burst {
        pods: count,
        ..Burst::default()
    };
    // From the first call's start to the last call's return.
    let first = results.iter().map(|(_, started, _)| *started).min();
    let last = results.iter().map(|(_, _, ended)| *ended).max();
    if let (Some(first), Some(last)) = (first, last) {
        outcome.wall_ms = millis(last.duration_since(first));
    }
    for (config, (result, started, ended)) in configs.iter().zip(results) {
        outcome.calls_ms.push(millis(ended.duration_since(started)));
        if let Err(err) = result {
            let name = config
                .metadata
                .as_ref()
                .map_or("?", |metadata| metadata.name.as_str());
            outcome.failures.push(format!("{name}: {err:#}"));
        }
    }
    Ok(outcome)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

/// What a run measured of one runtime.
struct Measured {
    runtime: Runtime,
    latencies: Latencies,
    /// The latency pods' memory, all read while every one of them ran.
    memory: Vec<(String, PodMemory)>,
    burst: Option<Burst>,
    /// What was seen running its VMs.
    vmm: Option<String>,
}

impl Measured {
    fn memory_mean(&self, value: impl Fn(&PodMemory) -> u64) -> f64 {
        mean(
            &self
                .memory
                .iter()
                .map(|(_, pod)| value(pod) as f64)
                .collect::<Vec<_>>(),
        )
    }

    fn run_pod_ms(&self) -> f64 {
        median(&self.latencies.run_pod)
    }

    /// All pods at once until all ready, over one pod's RunPodSandbox.
    fn burst_vs_one(&self) -> f64 {
        self.burst
            .as_ref()
            .map_or(f64::NAN, |burst| burst.wall_ms / self.run_pod_ms())
    }
}

/// One line of the table: the metric, a cell per runtime, a cell per
/// ratio column.
struct Line {
    metric: String,
    cells: Vec<String>,
    ratios: Vec<String>,
}

/// A ratio column: `runtimes[over] / runtimes[under]`.
struct RatioColumn {
    heading: String,
    over: usize,
    under: usize,
}

/// builtin/qemu-kvm where both ran, then X/runc for each microvm runtime.
fn ratio_columns(runtimes: &[Runtime]) -> Vec<RatioColumn> {
    let at = |wanted: Runtime| runtimes.iter().position(|runtime| *runtime == wanted);
    let mut columns = Vec::new();
    if let (Some(over), Some(under)) = (at(Runtime::Builtin), at(Runtime::QemuKvm)) {
        columns.push(RatioColumn {
            heading: "builtin/qemu-kvm".into(),
            over,
            under,
        });
    }
    if let Some(under) = at(Runtime::Runc) {
        for (over, runtime) in runtimes.iter().enumerate() {
            if *runtime != Runtime::Runc {
                columns.push(RatioColumn {
                    heading: format!("{}/runc", runtime.name()),
                    over,
                    under,
                });
            }
        }
    }
    columns
}

fn numbers(
    metric: impl Into<String>,
    show: fn(f64) -> String,
    values: &[f64],
    columns: &[RatioColumn],
) -> Line {
    Line {
        metric: metric.into(),
        cells: values.iter().map(|value| show(*value)).collect(),
        ratios: columns
            .iter()
            .map(|column| bench::ratio(values[column.over], values[column.under], 2))
            .collect(),
    }
}

fn words(metric: impl Into<String>, cells: Vec<String>, columns: &[RatioColumn]) -> Line {
    Line {
        metric: metric.into(),
        cells,
        ratios: columns.iter().map(|_| "-".to_owned()).collect(),
    }
}

fn print_lines(runtimes: &[Runtime], columns: &[RatioColumn], lines: &[Line]) {
    let metric_width = lines
        .iter()
        .map(|line| line.metric.len())
        .max()
        .unwrap_or(0)
        .max("metric".len());
    let mut widths: Vec<usize> = runtimes
        .iter()
        .enumerate()
        .map(|(at, runtime)| {
            lines
                .iter()
                .filter_map(|line| line.cells.get(at))
                .map(String::len)
                .chain([runtime.name().len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    widths.extend(columns.iter().enumerate().map(|(at, column)| {
        lines
            .iter()
            .filter_map(|line| line.ratios.get(at))
            .map(String::len)
            .chain([column.heading.len()])
            .max()
            .unwrap_or(0)
    }));
    let headings: Vec<&str> = runtimes
        .iter()
        .map(|runtime| runtime.name())
        .chain(columns.iter().map(|column| column.heading.as_str()))
        .collect();
    let render = |metric: &str, cells: Vec<&str>| {
        let mut text = format!("{metric:<metric_width$}");
        for (cell, width) in cells.iter().zip(&widths) {
            text.push_str(&format!("  {cell:>width$}"));
        }
        println!("{}", text.trim_end());
    };
    render("metric", headings);
    for line in lines {
        render(
            &line.metric,
            line.cells
                .iter()
                .chain(&line.ratios)
                .map(String::as_str)
                .collect(),
        );
    }
}

/// One of the issue's targets, checked.
#[derive(Debug, PartialEq)]
struct Verdict {
    target: String,
    measured: String,
    outcome: &'static str,
}

fn verdict(target: impl Into<String>, measured: String, met: Option<bool>) -> Verdict {
    Verdict {
        target: target.into(),
        measured,
        outcome: match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        },
    }
}

/// `value <= limit`, `None` where a figure is missing.
fn at_most(value: f64, limit: f64) -> Option<bool> {
    value.is_finite().then_some(value <= limit)
}

/// The issue's targets for `builtin` (against `qemu-kvm` where it ran).
fn verdicts(measured: &[Measured], concurrent: usize) -> Vec<Verdict> {
    let of = |wanted: Runtime| measured.iter().find(|m| m.runtime == wanted);
    let (builtin, qemu_kvm) = (of(Runtime::Builtin), of(Runtime::QemuKvm));
    let missing = |what: &str| format!("- ({what} not in --backends)");
    let mut list = Vec::new();
    let memory = builtin.map(|b| b.memory_mean(PodMemory::outside_guest_ram_kib) / 1024.0);
    list.push(match memory {
        Some(value) => verdict(
            format!("builtin host PSS per pod outside guest RAM <= {HOST_MEMORY_TARGET_MIB} MiB"),
            format!("{value:.1} MiB"),
            at_most(value, HOST_MEMORY_TARGET_MIB),
        ),
        None => verdict(
            "builtin host PSS per pod <= 20 MiB",
            missing("builtin"),
            None,
        ),
    });
    let against_qemu = |value: fn(&Measured) -> f64| match (builtin, qemu_kvm) {
        (Some(b), Some(q)) => Some(value(b) / value(q)),
        _ => None,
    };
    let pair = if builtin.is_none() {
        missing("builtin")
    } else {
        missing("qemu-kvm")
    };
    list.push(
        match against_qemu(|m| m.memory_mean(PodMemory::outside_guest_ram_kib)) {
            Some(ratio) => verdict(
                "builtin host PSS per pod <= 1/4 of qemu-kvm's",
                format!("{ratio:.2}x"),
                at_most(ratio, MEMORY_VS_QEMU_KVM_TARGET),
            ),
            None => verdict(
                "builtin host PSS per pod <= 1/4 of qemu-kvm's",
                pair.clone(),
                None,
            ),
        },
    );
    list.push(match against_qemu(Measured::run_pod_ms) {
        Some(ratio) => verdict(
            "builtin RunPodSandbox <= 1/2 of qemu-kvm's",
            format!("{ratio:.2}x"),
            at_most(ratio, RUN_POD_VS_QEMU_KVM_TARGET),
        ),
        None => verdict("builtin RunPodSandbox <= 1/2 of qemu-kvm's", pair, None),
    });
    let target = format!(
        "{CONCURRENT_TARGET_PODS} builtin pods at once <= {CONCURRENT_VS_ONE_TARGET}x one pod"
    );
    list.push(
        match builtin.and_then(|b| b.burst.as_ref().map(|burst| (b, burst))) {
            Some((b, burst)) => {
                let ratio = b.burst_vs_one();
                let mut text = format!("{ratio:.2}x");
                if concurrent != CONCURRENT_TARGET_PODS {
                    text.push_str(&format!(" (with {concurrent} pods)"));
                }
                let met = if burst.failures.is_empty() {
                    at_most(ratio, CONCURRENT_VS_ONE_TARGET)
                } else {
                    text.push_str(&format!(
                        ", {} of {} failed",
                        burst.failures.len(),
                        burst.pods
                    ));
                    Some(false)
                };
                verdict(target, text, met)
            }
            None if builtin.is_some() => verdict(target, "- (--concurrent 0)".into(), None),
            None => verdict(target, missing("builtin"), None),
        },
    );
    list
}

fn place_text(place: Place) -> String {
    match place {
        Place::Nested => "inside microvm-kvm-harness's nested-KVM L1 (real KVM whose every \
                          instruction TCG emulates: compare times only as ratios within this run)"
            .into(),
        Place::RealKvm => format!("on this host ({})", microvm_kvm_harness::host::detect()),
        Place::NoKvm => format!(
            "on this host ({}; KVM backends need --kvm-harness)",
            microvm_kvm_harness::host::detect()
        ),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn print_report(options: &Options, place: Place, load_before: &str, measured: &[Measured]) {
    let runtimes: Vec<Runtime> = measured.iter().map(|m| m.runtime).collect();
    let columns = ratio_columns(&runtimes);
    let values =
        |value: &dyn Fn(&Measured) -> f64| -> Vec<f64> { measured.iter().map(value).collect() };
    let mut lines = vec![
        numbers(
            format!("RunPodSandbox, pod ready (median of {})", options.runs),
            ms,
            &values(&Measured::run_pod_ms),
            &columns,
        ),
        numbers(
            format!("Create+StartContainer, sleep (median of {})", options.runs),
            ms,
            &values(&|m| median(&m.latencies.create_start)),
            &columns,
        ),
        numbers(
            "  CreateContainer",
            ms,
            &values(&|m| median(&m.latencies.create)),
            &columns,
        ),
        numbers(
            "  StartContainer",
            ms,
            &values(&|m| median(&m.latencies.start)),
            &columns,
        ),
        numbers(
            "Stop+RemovePodSandbox (median)",
            ms,
            &values(&|m| median(&m.latencies.teardown)),
            &columns,
        ),
    ];
    if options.concurrent > 0 {
        let burst =
            |value: fn(&Burst) -> f64| move |m: &Measured| m.burst.as_ref().map_or(f64::NAN, value);
        lines.push(numbers(
            format!("{} pods at once: all ready (wall)", options.concurrent),
            ms,
            &values(&burst(|b| b.wall_ms)),
            &columns,
        ));
        lines.push(numbers(
            "  that / one pod's RunPodSandbox median",
            times,
            &values(&Measured::burst_vs_one),
            &columns,
        ));
        lines.push(numbers(
            "  slowest single call",
            ms,
            &values(&burst(|b| max(&b.calls_ms))),
            &columns,
        ));
        lines.push(words(
            "  failed calls",
            measured
                .iter()
                .map(|m| {
                    m.burst.as_ref().map_or("-".into(), |b| {
                        format!("{} of {}", b.failures.len(), b.pods)
                    })
                })
                .collect(),
            &columns,
        ));
    }
    lines.push(numbers(
        format!(
            "host PSS per pod outside guest RAM (mean of {})",
            options.runs
        ),
        mib_f,
        &values(&|m| m.memory_mean(PodMemory::outside_guest_ram_kib)),
        &columns,
    ));
    for kind in Kind::COUNTED {
        lines.push(numbers(
            format!("  {}", kind.label()),
            mib_f,
            &values(&|m| m.memory_mean(|pod| pod.kind_kib(kind))),
            &columns,
        ));
    }
    lines.push(numbers(
        "guest RAM resident (memfd PSS, not in the above)",
        mib_f,
        &values(&|m| m.memory_mean(PodMemory::guest_ram_kib)),
        &columns,
    ));

    println!();
    println!(
        "cri-bench: {} pods per runtime for latency and memory, {} at once; containerd 1.6 \
         CRI, CNI bridge; guest {GUEST_MEMORY_MIB} MiB, 1 vCPU, shim log level info",
        options.runs, options.concurrent
    );
    println!("where: {}", place_text(place));
    println!(
        "host: kernel {}, {} CPUs, load average before the run {load_before}, after {}",
        kernel_release(),
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average()
    );
    for m in measured {
        let what = match m.runtime.backend() {
            None => "io.containerd.runc.v2".to_owned(),
            Some(_) => format!(
                "containerd-shim-microvm-v2, VMs seen running as: {}",
                m.vmm.as_deref().unwrap_or("NOTHING FOUND")
            ),
        };
        println!("  {:<9} {what}", m.runtime.name());
    }
    println!();
    print_lines(&runtimes, &columns, &lines);
    println!();
    println!("The issue's targets (#12):");
    for v in verdicts(measured, options.concurrent) {
        println!("  {:<62} {:>24}  {}", v.target, v.measured, v.outcome);
    }
    println!();
    println!(
        "Memory is PSS from /proc/<pid>/smaps_rollup (shared pages split among the processes \
         that map them, so the pods' figures add up; with fewer pods running, each gets a \
         larger share of the binaries' pages). Kernel memory (page tables, KVM's own, socket \
         buffers) is in no figure. How the guest RAM was identified and taken out:"
    );
    for m in measured {
        let Some(mapping) = m.runtime.guest_ram_mapping() else {
            continue;
        };
        let mut mappers: Vec<&str> = m
            .memory
            .iter()
            .flat_map(|(_, pod)| pod.guest_ram_mappers())
            .collect();
        mappers.sort_unstable();
        mappers.dedup();
        let source = if m.runtime == Runtime::Builtin {
            "microvm-vmm's memfd_create name, microvm_vmm::memory::GUEST_RAM_MEMFD_NAME \
             (vmm/src/memory.rs)"
        } else {
            "QEMU's memory-backend-memfd (shim/src/vm/mod.rs)"
        };
        if mappers.is_empty() {
            println!(
                "  {}: WARNING: no `{mapping}` mapping in any of its processes' smaps: its \
                 `outside guest RAM` includes the guest RAM",
                m.runtime.name()
            );
        } else {
            println!(
                "  {}: the `{mapping}` mappings in /proc/<pid>/smaps ({source}), found in {}",
                m.runtime.name(),
                mappers.join(", ")
            );
        }
    }
    println!();
    println!(
        "host PSS per pod ({} pods of each runtime running, one sleep container each):",
        options.runs
    );
    for m in measured {
        for (name, usage) in &m.memory {
            println!(
                "  {:<12} {:<9} total {:>9}, outside guest RAM {:>9}: {}",
                name,
                m.runtime.name(),
                mib(usage.pss_kib()),
                mib(usage.outside_guest_ram_kib()),
                usage.breakdown()
            );
        }
    }
    for m in measured {
        if let Some(burst) = &m.burst {
            for failure in &burst.failures {
                println!(
                    "failed ({}, {} at once): {failure}",
                    m.runtime.name(),
                    burst.pods
                );
            }
        }
    }
}

fn times(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}x")
    } else {
        "-".into()
    }
}

fn run(options: &Options, runtimes: &[Runtime], place: Place, interrupt: &Interrupt) -> Result<()> {
    let load_before = load_average();
    let setup = Instant::now();
    let bench = Bench::start(options, runtimes, interrupt)?;
    eprintln!(
        "cri-bench: setup (guest image, containerd, images) took {:.1} s; runtimes {}",
        setup.elapsed().as_secs_f64(),
        runtimes
            .iter()
            .map(|runtime| runtime.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    interrupt.check()?;
    let env = bench.env()?;
    let cri = Cri {
        client: &env.client,
        interrupt,
    };
    let socket = bench.socket()?;
    let mut measured: Vec<Measured> = runtimes
        .iter()
        .map(|runtime| Measured {
            runtime: *runtime,
            latencies: Latencies::default(),
            memory: Vec::new(),
            burst: None,
            vmm: None,
        })
        .collect();

    // Latency: the runtimes alternate; the pods stay up for the memory
    // reading.
    let mut pods: Vec<(usize, LatencyPod)> = Vec::new();
    for index in 0..options.runs {
        for (at, m) in measured.iter_mut().enumerate() {
            let name = format!("{}-{index}", m.runtime.name());
            let pod = one_pod(&bench, cri, m.runtime, name, &mut m.latencies)?;
            pods.push((at, pod));
        }
    }
    interrupt.sleep(SETTLE)?;

    // Memory, every pod at once.
    let table = process_table();
    for (at, pod) in &pods {
        let usage = pod_memory(&table, &socket, pod.runtime, &pod.id)?;
        measured[*at].memory.push((pod.name.clone(), usage));
    }
    for (at, m) in measured.iter_mut().enumerate() {
        let shims: Vec<u32> = pods
            .iter()
            .filter(|(pod_at, _)| *pod_at == at)
            .filter_map(|(_, pod)| {
                shim_of(&table, pod.runtime.shim(), &socket, &pod.id).map(|shim| shim.pid)
            })
            .collect();
        m.vmm = vmm_seen(&table, &shims);
    }

    for (at, pod) in &pods {
        let started = Instant::now();
        cri.stop_and_remove_pod(&pod.id)
            .with_context(|| format!("removing pod {}", pod.name))?;
        measured[*at]
            .latencies
            .teardown
            .push(millis(started.elapsed()));
    }

    // Pods at once, one runtime at a time.
    if options.concurrent > 0 {
        for m in &mut measured {
            let handler = m.runtime.name();
            eprintln!(
                "cri-bench: starting {} {handler} pods at once",
                options.concurrent
            );
            let outcome = burst(&bench, cri, m.runtime, options.concurrent)?;
            eprintln!(
                "cri-bench: {} {handler} pods: all RunPodSandbox calls returned after {:.1} ms, \
                 {} failed",
                options.concurrent,
                outcome.wall_ms,
                outcome.failures.len()
            );
            let started = Instant::now();
            cri.remove_every_pod()
                .context("removing the pods started at once")?;
            eprintln!(
                "cri-bench: removed them in {:.1} ms",
                millis(started.elapsed())
            );
            m.burst = Some(outcome);
        }
    }

    print_report(options, place, &load_before, &measured);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| (*word).to_owned()).collect()
    }

    fn parse(words: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("cri-bench").chain(words.iter().copied()))
    }

    #[test]
    fn arguments_parse_and_bad_ones_are_refused() {
        Options::command().debug_assert();
        let help = parse(&["--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("--kvm-harness"), "{help}");
        let options = parse(&[
            "--runs",
            "3",
            "--concurrent=4",
            "--initramfs",
            "/x.cpio",
            "--kernel",
            "/vmlinux",
            "--backends",
            "qemu-kvm,builtin",
            "--kvm-harness",
        ])
        .unwrap();
        assert_eq!((options.runs, options.concurrent), (3, 4));
        assert_eq!(options.initramfs, Some(PathBuf::from("/x.cpio")));
        assert_eq!(options.kernel, Some(PathBuf::from("/vmlinux")));
        assert_eq!(
            options.backends.as_deref(),
            Some(&[Runtime::QemuKvm, Runtime::Builtin][..])
        );
        assert!(options.kvm_harness);
        let defaults = parse(&[]).unwrap();
        assert_eq!((defaults.runs, defaults.concurrent), (5, 10));
        assert_eq!(defaults.backends, None);
        assert!(!defaults.kvm_harness);
        assert_eq!(parse(&["--concurrent", "0"]).unwrap().concurrent, 0);
        for bad in [
            &["--runs"][..],
            &["--runs", "many"],
            &["--runs", "0"],
            &["--runs", "-1"],
            &["--concurrent", "51"],
            &["--concurrent"],
            &["--initramfs"],
            &["--backends", "kata"],
            &["--backends", "builtin,qemu"],
            &["run"],
            &["--rns=3"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn runtimes_default_by_place_dedup_and_end_with_runc() {
        use Runtime::*;
        assert_eq!(runtimes(None, Place::Nested), [Builtin, QemuKvm, Runc]);
        assert_eq!(runtimes(None, Place::RealKvm), [Builtin, QemuKvm, Runc]);
        assert_eq!(runtimes(None, Place::NoKvm), [QemuTcg, Runc]);
        assert_eq!(
            runtimes(Some(&[Runc, QemuTcg, Builtin, QemuTcg]), Place::Nested),
            [QemuTcg, Builtin, Runc]
        );
        assert_eq!(refused(&runtimes(None, Place::NoKvm), Place::NoKvm), None);
        assert_eq!(refused(&runtimes(None, Place::Nested), Place::Nested), None);
        let no_kvm = refused(&[Builtin, QemuTcg, Runc], Place::NoKvm).unwrap();
        assert!(
            no_kvm.contains("builtin") && no_kvm.contains("--kvm-harness"),
            "{no_kvm}"
        );
        assert!(refused(&runtimes(Some(&[Runc]), Place::Nested), Place::Nested).is_some());
        assert_eq!(
            [Builtin, QemuKvm, QemuTcg, Runc].map(Runtime::name),
            ["builtin", "qemu-kvm", "qemu-tcg", "runc"]
        );
        // The names are the --backends values too.
        for runtime in [Builtin, QemuKvm, QemuTcg, Runc] {
            assert_eq!(Runtime::from_str(runtime.name(), false).unwrap(), runtime);
        }
    }

    #[test]
    fn the_harness_reruns_this_binary_without_kvm_harness() {
        let argv = harness_args(
            Path::new("/t/release/cri-bench"),
            args(&["--runs", "3", "--kvm-harness", "--concurrent", "10"]),
            3600,
            8192,
        );
        assert_eq!(
            argv,
            args(&[
                "run",
                "--timeout",
                "3600",
                "--memory-mib",
                "8192",
                "--",
                "/t/release/cri-bench",
                "--runs",
                "3",
                "--concurrent",
                "10"
            ])
        );
        // What the re-run parses is the same run, here.
        let rerun = parse(&argv[7..].iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert!(!rerun.kvm_harness);
        assert_eq!((rerun.runs, rerun.concurrent), (3, 10));
    }

    const SMAPS: &str = "\
55d4c0000000-55d4c0100000 r-xp 00000000 08:01 1234   /usr/bin/qemu-system-x86_64
Rss:                1024 kB
Pss:                 512 kB
VmFlags: rd ex mr mw me sd
7f0000000000-7f0010000000 rw-s 00000000 00:01 99     /memfd:memory-backend-memfd (deleted)
Size:             262144 kB
Pss:               40000 kB
VmFlags: rd wr sh mr mw me ms sd
7f0010000000-7f0010001000 rw-s 00000000 00:01 98     /memfd:memory-backend-memfd-log (deleted)
Pss:                   4 kB
7f0020000000-7f0030000000 rw-p 00000000 00:00 0
Pss:                9000 kB
7f1000000000-7f1010000000 rw-s 00000000 00:01 77     /memfd:microvm-guest-ram (deleted)
Pss:               30000 kB
";

    #[test]
    fn guest_ram_pss_is_the_runtimes_memfd_mapping_only() {
        let qemu = Runtime::QemuKvm.guest_ram_mapping().unwrap();
        assert_eq!(Runtime::QemuTcg.guest_ram_mapping().unwrap(), qemu);
        assert_eq!(mapping_pss_kib(SMAPS, &qemu), 40000);
        let builtin = Runtime::Builtin.guest_ram_mapping().unwrap();
        assert_eq!(builtin, "/memfd:microvm-guest-ram");
        assert_eq!(mapping_pss_kib(SMAPS, &builtin), 30000);
        assert_eq!(Runtime::Runc.guest_ram_mapping(), None);
        assert_eq!(mapping_pss_kib(SMAPS, "/memfd:other"), 0);
        assert_eq!(
            rollup_pss_kib(
                "00400000-7ffd0000 ---p 00000000 00:00 0 [rollup]\nRss: 9 kB\nPss:  49516 kB\n"
            ),
            Some(49516)
        );
        assert_eq!(rollup_pss_kib("Rss: 9 kB\n"), None);
    }

    /// The VMM's real guest memory shows in this process's smaps under
    /// the name the bench looks for.
    #[test]
    fn microvm_vmm_guest_ram_is_found_by_its_mapping_name() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = microvm_vmm::memory::create_guest_memory(8 << 20).unwrap();
        ram.memory
            .write_slice(&[1u8; 1 << 20], GuestAddress(0x10_0000))
            .unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mapping = Runtime::Builtin.guest_ram_mapping().unwrap();
        let kib = mapping_pss_kib(&smaps, &mapping);
        assert!(kib >= 1024, "{kib} KiB of {mapping} in smaps");
    }

    fn memory(entries: &[(Kind, &str, u64, u64)]) -> PodMemory {
        PodMemory {
            processes: entries
                .iter()
                .map(|(kind, label, pss_kib, guest_ram_kib)| ProcessMemory {
                    kind: *kind,
                    label: (*label).to_owned(),
                    pss_kib: *pss_kib,
                    guest_ram_kib: *guest_ram_kib,
                })
                .collect(),
        }
    }

    #[test]
    fn pod_memory_counts_only_counted_processes_and_splits_by_kind() {
        let memory = memory(&[
            (Kind::Shim, "shim", 3000, 0),
            (Kind::Vmm, "microvm-vmm", 1000, 0),
            (Kind::Vmm, "microvm-vmm", 50000, 40000),
            (Kind::Virtiofsd, "virtiofsd", 2500, 500),
            (Kind::Container, "container sleep", 100, 0),
        ]);
        assert_eq!(memory.pss_kib(), 56500);
        assert_eq!(memory.guest_ram_kib(), 40500);
        assert_eq!(memory.outside_guest_ram_kib(), 16000);
        assert_eq!(memory.kind_kib(Kind::Vmm), 11000);
        assert_eq!(memory.kind_kib(Kind::Virtiofsd), 2000);
        assert_eq!(memory.kind_kib(Kind::Other), 0);
        assert_eq!(memory.guest_ram_mappers(), ["microvm-vmm", "virtiofsd"]);
        let text = memory.breakdown();
        assert!(
            text.contains("container sleep 0.1 MiB [not counted]"),
            "{text}"
        );
        assert!(
            text.contains("microvm-vmm 49.8 MiB (10.7 MiB w/o guest RAM) [2 procs]"),
            "{text}"
        );
    }

    fn process(pid: u32, ppid: u32, argv: &[&str]) -> Process {
        Process {
            pid,
            ppid,
            start_time: 1,
            argv: args(argv),
        }
    }

    #[test]
    fn a_pods_shim_and_its_processes_are_found_and_classified() {
        let shim = |pid, id: &str, address: &str| {
            process(
                pid,
                1,
                &[
                    "/bin/containerd-shim-microvm-v2",
                    "-namespace",
                    "k8s.io",
                    "-id",
                    id,
                    "-address",
                    address,
                ],
            )
        };
        let table = vec![
            process(
                10,
                1,
                &["/usr/bin/containerd", "--config", "/tmp/c/containerd.toml"],
            ),
            shim(20, "podA", "/tmp/c/c.sock"),
            shim(21, "podA", "/tmp/other/c.sock"),
            shim(22, "podAB", "/tmp/c/c.sock"),
            shim(23, "podB", "/tmp/c/c.sock"),
            process(30, 20, &["/usr/bin/qemu-system-x86_64", "-accel", "kvm"]),
            process(31, 20, &["virtiofsd", "--socket-path", "x"]),
            process(32, 31, &["virtiofsd", "--socket-path", "x"]),
            process(33, 20, &["vhost-device-vsock", "--guest-cid", "3"]),
            process(40, 23, &["/t/release/microvm-vmm", "--jail", "/run/j"]),
            process(41, 40, &["microvm-vmm", "--config", "/vm/config.json"]),
            process(42, 23, &["/usr/bin/virtiofsd"]),
        ];
        let found = shim_of(&table, SHIM, "/tmp/c/c.sock", "podA").unwrap();
        assert_eq!(found.pid, 20);
        let mut below: Vec<u32> = descendants(&table, 20).iter().map(|p| p.pid).collect();
        below.sort_unstable();
        assert_eq!(below, [30, 31, 32, 33]);
        assert!(shim_of(&table, RUNC_SHIM, "/tmp/c/c.sock", "podA").is_none());
        assert_eq!(
            vmm_seen(&table, &[20]).as_deref(),
            Some("qemu-system-x86_64 -accel kvm")
        );
        assert_eq!(
            vmm_seen(&table, &[23]).as_deref(),
            Some("microvm-vmm --jail (supervisor + jailed VMM)")
        );
        assert_eq!(vmm_seen(&table, &[22]), None);
        let kinds = |runtime, pids: &[usize]| -> Vec<Kind> {
            pids.iter()
                .map(|at| Kind::of(runtime, &table[*at]))
                .collect()
        };
        assert_eq!(
            kinds(Runtime::QemuKvm, &[5, 6, 8]),
            [Kind::Vmm, Kind::Virtiofsd, Kind::Other]
        );
        assert_eq!(
            kinds(Runtime::Builtin, &[9, 10, 11]),
            [Kind::Vmm, Kind::Vmm, Kind::Virtiofsd]
        );
        let pause = process(50, 24, &PAUSE_ARGV);
        let sleep = process(51, 24, &["sleep", "3600"]);
        assert_eq!(Kind::of(Runtime::Runc, &pause), Kind::Other);
        assert_eq!(Kind::of(Runtime::Runc, &sleep), Kind::Container);
    }

    #[test]
    fn this_process_has_a_pss() {
        let me = read_process(std::process::id()).unwrap();
        assert!(!me.argv.is_empty());
        let memory = process_memory(&me, Kind::Shim, "me".into(), Some("/memfd:none")).unwrap();
        assert!(
            memory.pss_kib > 0 && memory.guest_ram_kib == 0,
            "{memory:?}"
        );
    }

    #[test]
    fn calls_in_flight_are_counted_from_containerds_log() {
        let log = r#"time="t" level=info msg="RunPodSandbox for &PodSandboxMetadata{Name:mv-0,Uid:u,Namespace:default,Attempt:0,}"
time="t" level=info msg="RunPodSandbox for &PodSandboxMetadata{Name:mv-0,Uid:u,Namespace:default,Attempt:0,} returns sandbox id \"abc\""
time="t" level=info msg="CreateContainer within sandbox \"abc\" for container &ContainerMetadata{Name:sleeper,Attempt:0,}"
time="t" level=info msg="CreateContainer within sandbox \"abc\" for &ContainerMetadata{Name:sleeper,Attempt:0,} returns container id \"def\""
time="t" level=info msg="StartContainer for \"def\""
time="t" level=info msg="StartContainer for \"def\" returns successfully"
time="t" level=info msg="RunPodSandbox for &PodSandboxMetadata{Name:mv-burst-0,Uid:u,Namespace:default,Attempt:0,}"
time="t" level=info msg="RunPodSandbox for &PodSandboxMetadata{Name:mv-burst-1,Uid:u,Namespace:default,Attempt:0,}"
time="t" level=error msg="RunPodSandbox for &PodSandboxMetadata{Name:mv-burst-1,Uid:u,Namespace:default,Attempt:0,} failed, error" error="context canceled"
time="t" level=info msg="StopPodSandbox for \"abc\""
"#;
        assert_eq!(calls_in_flight(log), 1);
        assert_eq!(calls_in_flight(""), 0);
    }

    fn measured(
        runtime: Runtime,
        run_pod: &[f64],
        outside_kib: u64,
        burst: Option<f64>,
    ) -> Measured {
        Measured {
            runtime,
            latencies: Latencies {
                run_pod: run_pod.to_vec(),
                ..Latencies::default()
            },
            memory: vec![(
                "p".into(),
                memory(&[(Kind::Vmm, "vmm", outside_kib + 1000, 1000)]),
            )],
            burst: burst.map(|wall_ms| Burst {
                wall_ms,
                calls_ms: vec![wall_ms],
                failures: Vec::new(),
                pods: 10,
            }),
            vmm: None,
        }
    }

    #[test]
    fn targets_are_met_or_missed_from_the_figures() {
        let runs = [
            measured(
                Runtime::Builtin,
                &[1000.0, 1200.0, 900.0],
                10 * 1024,
                Some(2500.0),
            ),
            measured(Runtime::QemuKvm, &[3000.0], 60 * 1024, Some(9000.0)),
            measured(Runtime::Runc, &[100.0], 5 * 1024, Some(400.0)),
        ];
        let list = verdicts(&runs, 10);
        let outcomes: Vec<(&str, &str)> = list
            .iter()
            .map(|v| (v.measured.as_str(), v.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("10.0 MiB", "met"),
                ("0.17x", "met"),
                ("0.33x", "met"),
                ("2.50x", "met")
            ]
        );
        let runs = [
            measured(Runtime::Builtin, &[2000.0], 30 * 1024, Some(8000.0)),
            measured(Runtime::QemuKvm, &[3000.0], 60 * 1024, None),
            measured(Runtime::Runc, &[100.0], 5 * 1024, None),
        ];
        let outcomes: Vec<&str> = verdicts(&runs, 10).iter().map(|v| v.outcome).collect();
        assert_eq!(outcomes, ["MISSED", "MISSED", "MISSED", "MISSED"]);
        let mut failing = measured(Runtime::Builtin, &[1000.0], 10 * 1024, Some(1500.0));
        if let Some(burst) = failing.burst.as_mut() {
            burst.failures.push("builtin-burst-3: boom".into());
        }
        let last = verdicts(&[failing], 10).pop().unwrap();
        assert_eq!(
            (last.measured.as_str(), last.outcome),
            ("1.50x, 1 of 10 failed", "MISSED")
        );
        // Without builtin or qemu-kvm in the run, nothing is claimed.
        let runs = [
            measured(Runtime::QemuTcg, &[3000.0], 60 * 1024, Some(9000.0)),
            measured(Runtime::Runc, &[100.0], 5 * 1024, None),
        ];
        assert!(verdicts(&runs, 10)
            .iter()
            .all(|v| v.outcome == "not measured"));
    }

    #[test]
    fn ratio_columns_follow_the_runtimes() {
        use Runtime::*;
        let headings = |runtimes: &[Runtime]| -> Vec<String> {
            ratio_columns(runtimes)
                .into_iter()
                .map(|column| column.heading)
                .collect()
        };
        assert_eq!(
            headings(&[Builtin, QemuKvm, Runc]),
            ["builtin/qemu-kvm", "builtin/runc", "qemu-kvm/runc"]
        );
        assert_eq!(headings(&[QemuTcg, Runc]), ["qemu-tcg/runc"]);
        let columns = ratio_columns(&[Builtin, QemuKvm, Runc]);
        let line = numbers("m", ms, &[300.0, 600.0, 100.0], &columns);
        assert_eq!(line.cells, ["300.0 ms", "600.0 ms", "100.0 ms"]);
        assert_eq!(line.ratios, ["0.50x", "3.00x", "6.00x"]);
        assert_eq!(max(&[1.0, 5.0, 2.0]), 5.0);
        assert!(max(&[]).is_nan());
        assert_eq!(times(2.5), "2.50x");
        assert_eq!(times(f64::NAN), "-");
    }
}
