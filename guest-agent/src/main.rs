//! `microvm-agent`: PID 1 of every pod VM (see the library docs).
//!
//! As PID 1 it mounts the base filesystems, prints the ready line, serves
//! the API on vsock port 1024 and powers the VM off when asked (or when it
//! cannot serve). Anywhere else it needs `--listen unix:<path>` (host tests)
//! and refuses otherwise, with exit code 2.

use anyhow::Context;
use microvm_agent::cli::{self, Args, Command};
use microvm_agent::events::EventBus;
use microvm_agent::init;
use microvm_agent::network::Network;
use microvm_agent::runtime::Runtime;
use microvm_agent::sandbox::Sandbox;
use microvm_agent::server::{self, AgentState, Listen};
use microvm_agent::spawn::Reaper;
use microvm_agent::storage::Storage;
use std::process::ExitCode;
use std::sync::Arc;

/// Exit code when started as anything other than PID 1 without --listen.
const EXIT_NOT_PID1: u8 = 2;
/// Exit code for a bad command line (as clap used).
const EXIT_USAGE: u8 = 2;
/// Exit code when serving failed.
const EXIT_SERVE_FAILED: u8 = 1;

fn main() -> ExitCode {
    // Hidden test client (peer.rs), checked first: it runs as a container's PID 1.
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    if let Some(code) = microvm_agent::peer::probe_command(&argv) {
        return code;
    }
    let pid1 = std::process::id() == 1;
    let env_log = std::env::var("MICROVM_AGENT_LOG").ok();
    let args = match cli::parse(&argv, env_log.clone()) {
        Ok(Command::Run(args)) => args,
        // As PID 1, stray kernel command line words arrive as arguments:
        // never die over them (nor exit after printing help).
        Err(_) | Ok(Command::Help | Command::Version) if pid1 => {
            eprintln!("microvm-agent: ignoring arguments: {argv:?}");
            Args {
                log: env_log,
                ..Args::default()
            }
        }
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("microvm-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("error: {err}\n\nFor more information, try '--help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !pid1 && args.listen.is_empty() {
        eprintln!(
            "microvm-agent: refusing to run as pid {}: without --listen this is the init \
             (PID 1) of a pod VM and would mount filesystems and reboot the machine",
            std::process::id()
        );
        return ExitCode::from(EXIT_NOT_PID1);
    }

    let ports = if pid1 {
        let ports = init::setup();
        init::run_debug_shell_if_asked();
        ports
    } else {
        // Orphans of containers come back to the agent to be reaped.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        None
    };
    init_logging(args.log.as_deref(), pid1);

    // One malloc arena: the runtime is one thread, and an arena made for
    // a helper thread keeps its own pages. (The mmap threshold stays
    // dynamic: it lets the 256 KiB output chunks come from the heap.)
    // SAFETY: mallopt takes two integers; a refusal only costs memory.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(args, pid1)));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::from(EXIT_SERVE_FAILED)
        }
    };
    if pid1 {
        init::power_off(ports.as_ref())
    } else {
        code
    }
}

fn init_logging(filter: Option<&str>, pid1: bool) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Every byte on the VM's console costs an exit: warnings only by default.
    let default = if pid1 { "warn" } else { "info" };
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var(microvm_proto::abi::cmdline::AGENT_LOG).ok())
        .unwrap_or_else(|| default.to_owned());
    // Targets ("info,microvm_agent=debug") rather than EnvFilter: no regex
    // engine in PID 1.
    let targets: Targets = filter
        .parse()
        .unwrap_or_else(|_| default.parse().unwrap_or_default());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(targets)
        .init();
}

async fn run(args: Args, pid1: bool) -> anyhow::Result<()> {
    let reaper = Reaper::new();
    reaper.start().context("watching SIGCHLD")?;
    let events = EventBus::default();
    let runtime =
        Runtime::new(&args.cgroup_root, events, reaper).context("starting the runtime")?;
    let state = Arc::new(AgentState {
        runtime: Arc::new(runtime),
        sandbox: Sandbox::new(&args.run_dir),
        storage: Storage::new(&args.sysfs, &args.dev_dir),
        network: Network::default(),
        power_off: tokio::sync::Notify::new(),
        clock: microvm_agent::clock::Clock::new(pid1),
    });
    let listen = if args.listen.is_empty() {
        vec![Listen::Vsock(microvm_proto::abi::vsock::AGENT_PORT)]
    } else {
        args.listen.clone()
    };

    // CRI port forwarding (issue #15): raw vsock, in the VM only. Its
    // failure leaves the API serving: only port-forward breaks.
    let port_forward = listen
        .iter()
        .any(|address| matches!(address, Listen::Vsock(_)))
        .then(|| {
            tokio::spawn(async {
                if let Err(err) = microvm_agent::port_forward::serve_vsock().await {
                    tracing::error!("{:#}", anyhow::Error::new(err));
                }
            })
        });

    let stop = Arc::new(tokio::sync::Notify::new());
    let mut servers = tokio::task::JoinSet::new();
    for address in listen {
        let state = Arc::clone(&state);
        let stop = Arc::clone(&stop);
        servers.spawn(async move {
            server::serve(state, address, async move { stop.notified().await }).await
        });
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("watching SIGTERM")?;
    let mut failures = Vec::new();
    loop {
        tokio::select! {
            () = state.power_off.notified() => break,
            _ = terminate.recv(), if !pid1 => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
            finished = servers.join_next() => match finished {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(err))) => {
                    tracing::error!("{:#}", anyhow::Error::new(err));
                    failures.push(());
                }
                Some(Err(join)) => {
                    tracing::error!("server task failed: {join}");
                    failures.push(());
                }
                None => break,
            }
        }
    }
    // Let the PowerOff answer leave before the connection goes away.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    stop.notify_waiters();
    servers.abort_all();
    if let Some(port_forward) = port_forward {
        port_forward.abort();
    }
    for err in state.runtime.remove_all().await {
        tracing::warn!("removing a container at shutdown: {err}");
    }
    state.storage.unmount_all();
    state.runtime.destroy_pod_pid_namespace();
    if !failures.is_empty() && servers.is_empty() {
        anyhow::bail!("no listener is serving");
    }
    Ok(())
}
