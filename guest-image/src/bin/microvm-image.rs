//! `microvm-image`: builds (or finds in the cache) the guest kernel and
//! initramfs every pod VM boots, and measures them.

use anyhow::Context;
use clap::{Parser, Subcommand};
use microvm_guest_image::initramfs::{self, Variant};
use microvm_guest_image::{cache, figures, kernel, qemu_cmdline, KERNEL_CMDLINE};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "microvm-image",
    about = "Build and cache the pod VM guest kernel and initramfs",
    long_about = "Builds the pod VM guest kernel (Debian linux-source-6.1 + kernel-config/ \
                  fragments) and the initramfs (static microvm-agent as /init), caching both \
                  outside the repo in $MICROVM_CACHE_DIR (default /var/cache/microvm). \
                  Commands print KEY=path lines that a shell can eval. The first kernel \
                  build takes minutes; later calls return the cached files at once.",
    after_help = "Examples:\n  eval \"$(microvm-image all)\"   # MICROVM_VMLINUX, MICROVM_INITRAMFS, ...\n  \
                  microvm-image figures --runs 5\n  RUST_LOG=debug microvm-image kernel   # show the kernel build log"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel if its inputs changed; print MICROVM_VMLINUX, MICROVM_BZIMAGE and
    /// MICROVM_KERNEL_CONFIG.
    Kernel,
    /// Build the static agent and the initramfs; print MICROVM_INITRAMFS.
    Initramfs {
        /// Add busybox as /bin/sh (started with `microvm_debug_shell=1` on the command line).
        #[arg(long)]
        debug: bool,
    },
    /// Both of the above.
    All {
        /// Build the debug initramfs (with busybox) instead of the release one.
        #[arg(long)]
        debug: bool,
    },
    /// Print the kernel command line the runtime uses.
    Cmdline {
        /// The QEMU variant (reboot=t instead of reboot=k).
        #[arg(long)]
        qemu: bool,
    },
    /// Print sizes and boot times (QEMU+TCG) next to Debian's cloud kernel.
    Figures {
        /// Boots per kernel; the table shows medians.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
        runs: u16,
    },
}

/// Exit codes by failing stage, so scripts can tell them apart.
#[derive(Clone, Copy)]
enum Failure {
    Other = 1,
    Kernel = 3,
    Initramfs = 4,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("microvm-image: error: {err:?}");
            let failure = if err.downcast_ref::<kernel::KernelError>().is_some() {
                Failure::Kernel
            } else if err.downcast_ref::<initramfs::InitramfsError>().is_some() {
                Failure::Initramfs
            } else {
                Failure::Other
            };
            ExitCode::from(failure as u8)
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Kernel => print_kernel(&kernel::kernel()?),
        Cmd::Initramfs { debug } => print_initramfs(&build_initramfs(debug)?),
        Cmd::All { debug } => {
            let kernel = kernel::kernel()?;
            let initramfs = build_initramfs(debug)?;
            print_kernel(&kernel);
            print_initramfs(&initramfs);
        }
        Cmd::Cmdline { qemu } => {
            println!(
                "{}",
                if qemu {
                    qemu_cmdline()
                } else {
                    KERNEL_CMDLINE.to_owned()
                }
            );
        }
        Cmd::Figures { runs } => {
            let kernel = kernel::kernel()?;
            let initramfs = build_initramfs(false)?;
            tracing::info!("cache: {}", cache::cache_root().display());
            let figures = figures::measure(&kernel, &initramfs.path, usize::from(runs));
            print!("{figures}");
            if figures.ours.median_uptime().is_none() {
                anyhow::bail!("the microvm kernel never reached the agent's ready line");
            }
        }
    }
    Ok(())
}

fn build_initramfs(debug: bool) -> anyhow::Result<initramfs::InitramfsArtifact> {
    let variant = if debug {
        Variant::Debug
    } else {
        Variant::Release
    };
    initramfs::initramfs(variant)
        .with_context(|| format!("building the {} initramfs", variant.name()))
}

fn print_kernel(kernel: &kernel::KernelArtifacts) {
    println!("MICROVM_VMLINUX={}", kernel.vmlinux.display());
    println!("MICROVM_BZIMAGE={}", kernel.bz_image.display());
    println!("MICROVM_KERNEL_CONFIG={}", kernel.config.display());
}

fn print_initramfs(initramfs: &initramfs::InitramfsArtifact) {
    println!("MICROVM_INITRAMFS={}", initramfs.path.display());
}
