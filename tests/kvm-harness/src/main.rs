//! `microvm-kvm-harness`: see `--help` and the crate docs.

use anyhow::Context;
use clap::{Parser, Subcommand};
use microvm_kvm_harness::protocol::CommandSpec;
use microvm_kvm_harness::{direct, guest, host, image, nested, Mode, STOP_SIGNAL};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "microvm-kvm-harness",
    version,
    about = "Runs a command as root with a real /dev/kvm and this machine's files.",
    long_about = "Runs a command as root with a real /dev/kvm and this machine's files, and exits \
with its status; its stdout and stderr are this command's.\n\n\
Where the host's KVM boots Linux (kvm_intel or kvm_amd), the command runs here. On a PVM host \
(kvm_pvm) or one without /dev/kvm, it runs inside a nested-KVM Linux VM (L1): Debian's cloud \
kernel (fetched with apt-get download, cached by version) under qemu-system-x86_64 -accel tcg \
-cpu max, whose emulated AMD SVM lets kvm_amd load. L1 sees the host's / read-only through \
virtiofsd with tmpfs writes on top (nothing it writes reaches the host), has cgroup v2, its own \
/tmp, /run and loopback, and no stdin. Everything it runs is emulated: expect it to be 10-50x \
slower than the host.\n\n\
Exit status: the command's (128 + N if signal N ended it); 124 if it did not finish within \
--timeout; 75 if L1's own kernel wedged (a soft lockup of 2 min or more, a nested-KVM fault \
under TCG: the command may pass in a fresh L1); 125 if the harness itself failed (a missing tool or kernel module, no /dev/kvm in \
L1, L1 died); 128 + N if the harness got signal N. A run leaves no process, socket or temp dir \
behind."
)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Run COMMAND with a real /dev/kvm.
    Run(RunArgs),
    /// Print this host's KVM and where `run` would run a command.
    Detect {
        #[arg(long, value_enum, default_value_t = Mode::Auto, env = "MICROVM_KVM_HARNESS_MODE")]
        mode: Mode,
    },
    /// Fetch and cache L1's kernel and initramfs (what a first nested run
    /// would do), and print where they are.
    Prepare {
        #[arg(long, env = "MICROVM_KVM_HARNESS_CACHE", default_value_os_t = default_cache())]
        cache_dir: PathBuf,
    },
    /// Stage 2 inside L1 (PID 1); not for use on a host.
    #[command(hide = true)]
    L1Init { command_file: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where to run: auto picks direct on real KVM, nested otherwise.
    #[arg(long, value_enum, default_value_t = Mode::Auto, env = "MICROVM_KVM_HARNESS_MODE")]
    mode: Mode,
    /// Kill the command (and L1) after this many seconds, and exit 124.
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
    timeout: u64,
    /// L1's memory, in MiB (nested only). It is allocated as L1 touches it.
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    memory_mib: u32,
    /// L1's vCPUs (nested only); the default is this host's CPU count.
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// QEMU's CPU model for L1 (nested only). It must offer AMD SVM, which
    /// TCG's `max` does.
    #[arg(long, default_value = "max", value_name = "MODEL")]
    l1_cpu: String,
    /// Where L1's kernel and initramfs are cached.
    #[arg(long, env = "MICROVM_KVM_HARNESS_CACHE", default_value_os_t = default_cache())]
    cache_dir: PathBuf,
    /// Also write L1's whole console log here.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Print no summary line.
    #[arg(short, long)]
    quiet: bool,
    /// Echo L1's console to stderr as it boots, with timestamps.
    #[arg(short, long)]
    verbose: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn default_cache() -> PathBuf {
    microvm_guest_image::cache::cache_root().join("kvm-harness")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Action::L1Init { command_file } => guest::l1_init(&command_file),
        Action::Detect { mode } => {
            let kvm = host::detect();
            let (mode, why) = mode.resolve(kvm);
            println!("kvm: {kvm}");
            println!(
                "run: {} ({why})",
                match mode {
                    Mode::Direct => "direct",
                    _ => "nested",
                }
            );
            ExitCode::SUCCESS
        }
        Action::Prepare { cache_dir } => match image::ensure(&cache_dir) {
            Ok(image) => {
                println!(
                    "L1 kernel {} ({}): {}\nL1 initramfs: {}",
                    image.release,
                    image.version,
                    image.kernel.display(),
                    image.initramfs.display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("microvm-kvm-harness: {}", microvm_errors::error_chain(&err));
                ExitCode::from(125)
            }
        },
        Action::Run(args) => match run(args) {
            Ok(status) => exit_code(status),
            Err(err) => {
                eprintln!("microvm-kvm-harness: {err:#}");
                ExitCode::from(125)
            }
        },
    }
}

fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(125))
}

fn run(args: RunArgs) -> anyhow::Result<i32> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                STOP_SIGNAL.store(signal, Ordering::SeqCst);
            })
        }
        .context("cannot watch SIGINT/SIGTERM/SIGHUP")?;
    }
    let cwd = std::env::current_dir().context("no working directory")?;
    let spec = CommandSpec {
        argv: args.command,
        env: std::env::vars().collect(),
        cwd: cwd.to_string_lossy().into_owned(),
    };
    let timeout = Duration::from_secs(args.timeout);
    let kvm = host::detect();
    let (mode, why) = args.mode.resolve(kvm);
    if mode == Mode::Direct {
        return match direct::run(&spec, timeout) {
            Ok(status) => Ok(status),
            Err(err) => {
                eprintln!("microvm-kvm-harness: {}", microvm_errors::error_chain(&err));
                Ok(err.exit_status())
            }
        };
    }
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let config = nested::NestedConfig {
        memory_mib: args.memory_mib,
        cpus: args
            .cpus
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32)),
        timeout,
        cache: args.cache_dir,
        console: args.console,
        verbose: args.verbose,
        cpu: args.l1_cpu,
    };
    match nested::run(&spec, &exe, &config, &mut nested::Inherit) {
        Ok(outcome) => {
            if !args.quiet {
                eprintln!(
                    "microvm-kvm-harness: {why}; L1 kernel {} up in {:.1} s; the command exited {} after {:.1} s in all",
                    outcome.image.release,
                    outcome.l1_ready.as_secs_f64(),
                    outcome.status,
                    outcome.elapsed.as_secs_f64()
                );
            }
            Ok(outcome.status)
        }
        Err(err) => {
            eprintln!("microvm-kvm-harness: {}", microvm_errors::error_chain(&err));
            Ok(err.exit_status())
        }
    }
}
