//! `microvm-vmm`: runs one microVM. See `--help` and docs/vmm-api.md.

use anyhow::{bail, Context, Result};
use clap::Parser;
use microvm_vmm::api::ApiServer;
use microvm_vmm::config::{
    BootConfig, CpuTemplate, DiskConfig, FsConfig, MachineConfig, NetConfig, SerialConfig,
    VmConfig, VsockConfig,
};
use microvm_vmm::jail;
use microvm_vmm::seccomp::SeccompFilters;
use microvm_vmm::stop::ExitCode;
use microvm_vmm::vmm::{error_chain, Vmm};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Run one KVM microVM.
///
/// Either give a full config (`--config vm.json`, or the `--kernel` family of
/// flags) and the VM starts at once, or give only `--api-sock` and drive it
/// over the control socket (configure, start, pause, resume, shutdown, state,
/// metrics; see docs/vmm-api.md).
///
/// Exit status: 0 guest powered off (status 0) or shutdown requested;
/// 1 VMM error while running; 2 bad arguments/config or the VM could not be
/// created (nothing is left behind); 3 guest powered off with non-zero status;
/// 4 guest rebooted; 5 guest triple-faulted; 6 KVM cannot run the guest.
#[derive(Parser, Debug)]
#[command(name = "microvm-vmm", version, about, long_about)]
struct Args {
    /// Control socket path. Refused if a live process already listens there.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// VM config as JSON (same shape as the API's `configure`).
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    config: Option<PathBuf>,

    /// Kernel: vmlinux ELF (PVH entry used if present) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,

    /// Kernel command line (virtio_mmio.device= entries are appended).
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,

    #[arg(long, default_value_t = 1, requires = "kernel")]
    vcpus: u8,

    #[arg(long, default_value_t = 128, requires = "kernel")]
    memory_mib: u64,

    /// CPU feature template: host or baseline.
    #[arg(long, value_parser = ["host", "baseline"], default_value = "host", requires = "kernel")]
    cpu_template: String,

    /// Serial console output file or fifo (default: stdout).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    serial_output: Option<PathBuf>,

    /// Disk image; append `:ro` for read-only. Repeatable.
    #[arg(long, value_name = "PATH[:ro]", requires = "kernel")]
    disk: Vec<String>,

    /// Hybrid vsock unix socket path (guest connections to port P go to PATH_P).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    vsock_uds: Option<PathBuf>,

    /// Guest CID for vsock.
    #[arg(long, default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,

    /// Tap device for a virtio-net interface, optionally with the guest
    /// MAC: `tap0` or `tap0,mac=02:00:00:00:00:01`. Repeatable.
    #[arg(long, value_name = "NAME[,mac=MAC]", requires = "kernel")]
    tap: Vec<String>,

    /// virtio-fs share served by a vhost-user back-end listening on SOCKET
    /// (e.g. `virtiofsd --socket-path SOCKET --shared-dir DIR`); the guest
    /// mounts it with `mount -t virtiofs TAG /mnt`. Optional keys:
    /// num_queues=N (request queues, default 1), queue_size=N (default 1024).
    /// Repeatable.
    #[arg(long, value_name = "SOCKET,tag=TAG", value_parser = FsConfig::from_cli, requires = "kernel")]
    fs: Vec<FsConfig>,

    /// Do not offer a virtio-rng device.
    #[arg(long, requires = "kernel")]
    no_rng: bool,

    /// Run without seccomp filters (they are on by default: each thread may
    /// make only the system calls it needs; see docs/vmm-api.md).
    #[arg(long)]
    no_seccomp: bool,

    /// Run the VMM jailed, rooted at DIR (an absolute path that must not
    /// exist; created, and removed on exit): own mount and PID namespaces, a
    /// root holding only this VM's files, a cgroup, --uid/--gid, no inherited
    /// fds, an empty environment. Needs root and the VM config on the command
    /// line. The shim passes it for every pod (see docs/vmm-api.md).
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,

    /// Unprivileged user the jailed VMM runs as (default: stays root).
    #[arg(long, requires = "jail")]
    uid: Option<u32>,

    /// Group the jailed VMM runs as.
    #[arg(long, requires = "jail")]
    gid: Option<u32>,

    /// A cgroup setting for the jail, e.g. memory.limit_in_bytes=536870912 or
    /// pids.max=64. Repeatable; controllers not named get default limits.
    #[arg(long = "cgroup", value_name = "FILE=VALUE", requires = "jail")]
    cgroups: Vec<String>,

    /// Parent of the jail's cgroup in each hierarchy.
    #[arg(long, default_value = "microvm", requires = "jail")]
    cgroup_parent: String,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info", env = "MICROVM_LOG")]
    log_level: String,
}

fn config_from_flags(args: &Args) -> Option<VmConfig> {
    let kernel = args.kernel.clone()?;
    let disks = args
        .disk
        .iter()
        .map(|spec| match spec.strip_suffix(":ro") {
            Some(path) => DiskConfig {
                path: path.into(),
                read_only: true,
                serial: None,
                rate_limiter: None,
            },
            None => DiskConfig {
                path: spec.into(),
                read_only: false,
                serial: None,
                rate_limiter: None,
            },
        })
        .collect();
    Some(VmConfig {
        machine: MachineConfig {
            vcpus: args.vcpus,
            memory_mib: args.memory_mib,
            cpu_template: if args.cpu_template == "baseline" {
                CpuTemplate::Baseline
            } else {
                CpuTemplate::Host
            },
        },
        boot: BootConfig {
            kernel,
            initrd: args.initrd.clone(),
            cmdline: args
                .cmdline
                .clone()
                .unwrap_or_else(|| microvm_vmm::config::boot::DEFAULT_CMDLINE.into()),
        },
        serial: SerialConfig {
            output: args.serial_output.clone(),
            ..Default::default()
        },
        vsock: args
            .vsock_uds
            .clone()
            .map(|uds_path| VsockConfig::new(args.vsock_cid, uds_path)),
        disks,
        net: args
            .tap
            .iter()
            .map(|tap| {
                let (name, mac) = match tap.split_once(",mac=") {
                    Some((name, mac)) => (name, Some(mac.to_owned())),
                    None => (tap.as_str(), None),
                };
                NetConfig {
                    tap: name.to_owned(),
                    mac,
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                }
            })
            .collect(),
        fs: args.fs.clone(),
        rng: !args.no_rng,
        seccomp: true,
    })
}

/// Everything up to a running VM. Errors here mean nothing was started.
fn setup(args: &Args, process_start: Instant) -> Result<(Vmm, Option<ApiServer>)> {
    let config = match (&args.config, config_from_flags(args)) {
        (Some(path), _) => Some(VmConfig::from_file(path)?),
        (None, config) => config,
    };
    if config.is_none() && args.api_sock.is_none() {
        bail!("nothing to do: give --config, --kernel or --api-sock (see --help)");
    }
    let signal_stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, signal_stop.clone())
            .context("cannot install signal handlers")?;
    }
    let seccomp = if args.no_seccomp {
        None
    } else {
        Some(SeccompFilters::build(microvm_vmm::vcpu::kick_signal())?)
    };
    let mut vmm = Vmm::new(process_start, signal_stop)?;
    vmm.set_seccomp(seccomp.clone());
    if let Some(config) = config {
        vmm.configure(config)
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    }
    let api = match &args.api_sock {
        Some(path) => {
            let (server, calls) = ApiServer::start(path, vmm.wake_fd(), seccomp)?;
            vmm.set_api(calls);
            tracing::info!(
                "API socket ready at {} after {:.3} ms",
                path.display(),
                process_start.elapsed().as_secs_f64() * 1e3
            );
            Some(server)
        }
        None => None,
    };
    if args.config.is_some() || args.kernel.is_some() {
        vmm.start().map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    }
    Ok((vmm, api))
}

/// `--jail`: checks everything here, then hands over to the jail
/// supervisor, which returns the jailed VMM's exit status.
fn run_jailed(args: &Args) -> Result<u8> {
    let Some(dir) = args.jail.clone() else {
        bail!("no jail directory");
    };
    let config = match (&args.config, config_from_flags(args)) {
        (Some(path), _) => VmConfig::from_file(path)?,
        (None, Some(config)) => config,
        (None, None) => {
            bail!("--jail needs the VM config on the command line (--config or --kernel)")
        }
    };
    config
        .validate(microvm_vmm::config::host_memory_mib()?)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let cgroups = args
        .cgroups
        .iter()
        .map(|arg| jail::parse_cgroup_arg(arg))
        .collect::<Result<Vec<_>, _>>()?;
    let options = jail::JailOptions {
        dir,
        uid: args.uid,
        gid: args.gid,
        cgroups,
        cgroup_parent: args.cgroup_parent.clone(),
        api_sock: args.api_sock.clone(),
        no_seccomp: args.no_seccomp,
        log_level: args.log_level.clone(),
    };
    jail::run(&config, &options).map_err(|e| anyhow::anyhow!(error_chain(&e)))
}

fn main() -> std::process::ExitCode {
    let process_start = Instant::now();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    if args.jail.is_some() {
        return match run_jailed(&args) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("microvm-vmm: error: {e:#}");
                std::process::ExitCode::from(ExitCode::BadConfig as u8)
            }
        };
    }

    let (mut vmm, api) = match setup(&args, process_start) {
        Ok(parts) => parts,
        Err(e) => {
            eprintln!("microvm-vmm: error: {e:#}");
            return std::process::ExitCode::from(ExitCode::BadConfig as u8);
        }
    };
    let reason = vmm.run();
    // Drop the VM (and its sockets) and the API socket before exiting.
    drop(vmm);
    drop(api);
    std::process::ExitCode::from(reason.exit_code() as u8)
}
