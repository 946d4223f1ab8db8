//! `microvm-ctl`: puts the microvm runtime on a node and looks after it.
//! See docs/ctl.md.

mod check;
mod console;
mod containerd_config;
mod install;
mod logs;
mod metrics;
mod pods;
mod ps;
mod vmm_metrics;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "microvm-ctl",
    version = microvm_shim::version::VERSION_AND_REVISION,
    about = "Install, check and inspect the microvm runtime (io.containerd.microvm.v2) on this node",
    long_about = None
)]
struct Cli {
    /// The shim config to read (what the node's shims use).
    #[arg(
        long,
        global = true,
        env = "MICROVM_SHIM_CONFIG",
        default_value = "/etc/microvm/config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks that this node can run microVM pods: one line per requirement
    /// (ok, warn or fail, and what to do). Exits 0 only if pods can run.
    Check(check::Args),
    /// Installs the shim, the VMM, microvm-ctl and the guest image, writes a
    /// default shim config and registers the runtime with containerd.
    Install(install::InstallArgs),
    /// Reverses exactly what `install` did (from its manifest).
    Uninstall(install::UninstallArgs),
    /// Lists this node's microVM pods.
    Ps(ps::Args),
    /// Prints a pod's guest console and agent log.
    Logs(logs::Args),
    /// Opens a shell inside a pod's VM, outside every container (needs
    /// console.enabled = true in the shim config).
    Console(console::Args),
    /// Serves Prometheus metrics of every microVM pod on this node.
    Metrics(metrics::Args),
    #[command(hide = true, name = "__probe-pivot-root")]
    ProbePivotRoot,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(&cli.config, &args),
        Command::Install(args) => install::install(&cli.config, &args).map(|()| ExitCode::SUCCESS),
        Command::Uninstall(args) => install::uninstall(&args).map(|()| ExitCode::SUCCESS),
        Command::Ps(args) => ps::run(&cli.config, &args).map(|()| ExitCode::SUCCESS),
        Command::Logs(args) => logs::run(&cli.config, &args).map(|()| ExitCode::SUCCESS),
        Command::Console(args) => console::run(&cli.config, &args),
        Command::Metrics(args) => metrics::run(&cli.config, &args).map(|()| ExitCode::SUCCESS),
        Command::ProbePivotRoot => Ok(check::probe_pivot_root()),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("microvm-ctl: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
