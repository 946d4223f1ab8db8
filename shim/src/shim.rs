//! The shim process's life: `start` (one shim per pod, found by the
//! sandbox-id annotation), serving the task API, and `delete` (cleanup of
//! what a dead shim left: VM processes, mounts, sockets, state). A serving
//! shim that gets SIGTERM or SIGINT stops its pod VM and exits.

use crate::config::CONFIG_PATH_ENV;
use crate::events::{self, EventQueue};
use crate::pod_files::{cleanup_after_dead_shim, pod_id_of, stop_own_pod};
use crate::service::{config_path_from_options, TaskService};
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::{DeleteResponse, Flags, StartOpts};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::reload;

pub const RUNTIME_ID: &str = "io.containerd.microvm.v2";
/// Exit status `delete` reports for a task whose shim died (SIGKILL).
const KILLED_EXIT_STATUS: u32 = 128 + 9;
/// How long `start` waits for the new shim to listen.
const SERVE_START_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_ENV: &str = "MICROVM_SHIM_LOG";
/// How long a stop signal waits for the orderly pod shutdown.
const ORDERLY_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// After a stop signal and the pod teardown, how long the crate's orderly
/// server shutdown may take (ttrpc waits up to 10 s per connection for
/// requests in flight) before the shim exits anyway.
const SIGNAL_EXIT_GRACE: Duration = Duration::from_secs(3);

fn shim_error(message: String) -> containerd_shim::Error {
    containerd_shim::Error::Other(message)
}

pub struct MicrovmShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: PathBuf,
    /// The ttrpc socket this shim serves (`-socket`), removed on a forced
    /// exit.
    socket: String,
    log_level: Option<LevelHandle>,
    /// SIGTERM and SIGINT, watched from the start of serve mode. The
    /// crate's own handler only logs them, so without this a shim whose
    /// containerd is gone could not be stopped short of SIGKILL.
    stop_signals: Option<StopSignals>,
    /// The task service, once created: a stop signal shuts its pod down
    /// in order (agent power-off, VM, tap, host cgroup, mounts).
    service: Arc<std::sync::OnceLock<TaskService>>,
}

struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The name of the next stop signal.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

type LevelHandle = reload::Handle<Targets, tracing_subscriber::Registry>;

/// `level,target=level,...`; a filter that does not parse falls back to
/// `fallback`. `Targets` rather than `EnvFilter`: the latter compiles its
/// directives with a regex engine at every shim start, which costs CPU
/// time and resident memory for no use here.
fn parse_filter(filter: &str, fallback: &str) -> Targets {
    filter
        .parse()
        .or_else(|_| filter_for(fallback).parse())
        .unwrap_or_default()
}

/// Sets up `tracing`: the serve process writes to containerd's `log` FIFO
/// in the bundle, the others to stderr (containerd logs it).
fn init_logging(serving: bool, debug: bool) -> Option<LevelHandle> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if debug { "debug" } else { "info" };
    let filter = match std::env::var(LOG_ENV) {
        Ok(filter) => parse_filter(&filter, default),
        Err(_) => parse_filter(&filter_for(default), default),
    };
    let (filter, handle) = reload::Layer::new(filter);
    // O_NONBLOCK only for the open: it fails with ENXIO instead of
    // blocking when containerd has no reader on the FIFO.
    let fifo = serving
        .then(|| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("log")
                .ok()
        })
        .flatten()
        .and_then(|file| {
            use std::os::fd::AsFd;
            let flags = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_GETFL).ok()?;
            let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
            flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
            nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
            Some(file)
        });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_target(false);
    let result = match fifo {
        Some(file) => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.with_writer(std::sync::Mutex::new(file)))
            .try_init(),
        None => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.with_writer(std::io::stderr))
            .try_init(),
    };
    result.ok().map(|()| handle)
}

#[async_trait]
impl Shim for MicrovmShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut containerd_shim::Config) -> Self {
        config.no_setup_logger = true;
        let serving = args.action.is_empty();
        let log_level = init_logging(serving, args.debug);
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        let stop_signals = serving
            .then(|| {
                StopSignals::new()
                    .map_err(|err| tracing::warn!("cannot watch SIGTERM/SIGINT: {err}"))
                    .ok()
            })
            .flatten();
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
            socket: args.socket.clone(),
            log_level,
            stop_signals,
            service: Arc::new(std::sync::OnceLock::new()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        start(opts, &self.bundle).await
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd logs a failed `delete`; the pod's record says why too.
        cleanup_after_dead_shim(&self.bundle, &self.id)
            .map_err(|err| containerd_shim::Error::Other(crate::pod::error_chain(&err)))?;
        let mut response = DeleteResponse::new();
        response.exit_status = KILLED_EXIT_STATUS;
        response.exited_at = Some(events::timestamp(SystemTime::now())).into();
        Ok(response)
    }

    async fn wait(&mut self) {
        let exit = self.exit.clone();
        let Some(signals) = self.stop_signals.as_mut() else {
            exit.wait().await;
            return;
        };
        tokio::select! {
            () = exit.wait() => {}
            name = signals.recv() => {
                tracing::info!("{name}: stopping the pod VM and exiting");
                if let Some(service) = self.service.get() {
                    if tokio::time::timeout(ORDERLY_STOP_TIMEOUT, service.stop_pod())
                        .await
                        .is_err()
                    {
                        tracing::error!(
                            "the pod did not stop within {ORDERLY_STOP_TIMEOUT:?}; killing its processes"
                        );
                    }
                }
                // Whatever is still recorded (a pod still booting, or one
                // that did not stop in time).
                let (bundle, namespace, id) =
                    (self.bundle.clone(), self.namespace.clone(), self.id.clone());
                let stopped = tokio::task::spawn_blocking(move || {
                    stop_own_pod(&bundle, &namespace, &id)
                })
                .await;
                if let Err(err) = stopped {
                    tracing::error!("stopping the pod after {name}: {err}");
                }
                // The crate removes it only when `start` wrote the bundle's
                // address file; a signal must not leave it either way.
                let _ = std::fs::remove_file(socket_path(&self.socket));
                exit_after_grace(self.socket.clone());
            }
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let (queue, receiver) = EventQueue::new();
        tokio::spawn(events::forward(receiver, publisher, self.namespace.clone()));
        let handle = self.log_level.clone();
        let set_level = Box::new(move |level: &str| {
            // The environment variable wins over the config.
            if std::env::var_os(LOG_ENV).is_some() {
                return;
            }
            if let Some(handle) = &handle {
                let _ = handle.modify(|filter| *filter = parse_filter(&filter_for(level), "info"));
            }
        });
        tracing::info!(
            "serving {} (namespace {}, first container {})",
            RUNTIME_ID,
            self.namespace,
            self.id
        );
        let service = TaskService::new(&self.namespace, queue, self.exit.clone(), set_level);
        let _ = self.service.set(service.clone());
        service
    }
}

/// `level` for the shim, at most info for the HTTP/2 stack (its debug
/// lines are per frame).
fn filter_for(level: &str) -> String {
    format!("{level},h2=info,hyper=info,hyper_util=info,tower=info,tonic=info")
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

fn socket_alive(address: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(address)).is_ok()
}

/// `start`: reuses the pod's shim when one serves the pod already, else
/// starts one (this binary without an action) and waits until it listens.
/// Prints nothing itself: the caller prints the address.
async fn start(opts: StartOpts, bundle: &Path) -> containerd_shim::Result<String> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .map_err(|err| shim_error(format!("reading the bundle's config.json: {err}")))?;
    let pod_id = pod_id_of(&spec, &opts.id).map_err(|err| shim_error(err.to_string()))?;
    let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &pod_id);
    let write_address = |address: &str| {
        std::fs::write(bundle.join("address"), address)
            .map_err(|err| shim_error(format!("writing the address file: {err}")))
    };
    if socket_alive(&address) {
        write_address(&address)?;
        return Ok(address);
    }
    let exe = std::env::current_exe()
        .map_err(|err| shim_error(format!("finding the shim binary: {err}")))?;
    let mut command = std::process::Command::new(exe);
    command
        .current_dir(bundle)
        .args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: signals to containerd's group do not
        // reach the pod's shim.
        .process_group(0);
    if opts.debug {
        command.arg("-debug");
    }
    if let Some(config) = config_path_from_stdin() {
        command.env(CONFIG_PATH_ENV, config);
    }
    let mut child = command
        .spawn()
        .map_err(|err| shim_error(format!("starting the shim: {err}")))?;
    // The new shim closes its stdout once it listens (the crate dups
    // stderr over it); EOF here means listening, or dead.
    let stdout = child.stdout.take();
    let waited = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut sink = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_end(&mut sink);
        }
    });
    if tokio::time::timeout(SERVE_START_TIMEOUT, waited)
        .await
        .is_err()
    {
        let _ = child.kill();
        let _ = child.wait();
        return Err(shim_error(format!(
            "the shim did not listen on {address} within {SERVE_START_TIMEOUT:?}"
        )));
    }
    if !socket_alive(&address) {
        let status = child.try_wait().ok().flatten();
        return Err(shim_error(format!(
            "the shim exited before listening on {address} ({status:?})"
        )));
    }
    // Reap it if it ever exits while we are alive (we exit at once).
    std::thread::spawn(move || child.wait());
    write_address(&address)?;
    Ok(address)
}

/// containerd writes the runtime options (an Any) on `start`'s stdin; CRI's
/// name the config file. Tasks created later may not carry them again.
fn config_path_from_stdin() -> Option<PathBuf> {
    use containerd_shim::protos::protobuf::Message;
    use std::io::Read;
    let mut data = Vec::new();
    std::io::stdin().read_to_end(&mut data).ok()?;
    if data.is_empty() {
        return None;
    }
    let any =
        containerd_shim::protos::protobuf::well_known_types::any::Any::parse_from_bytes(&data)
            .ok()?;
    config_path_from_options(Some(&any))
}

/// Bounds the exit after a stop signal: the crate shuts its server down
/// once `wait` returns, which can wait on requests that never finish.
fn exit_after_grace(socket: String) {
    std::thread::spawn(move || {
        std::thread::sleep(SIGNAL_EXIT_GRACE);
        tracing::warn!("the server did not shut down within {SIGNAL_EXIT_GRACE:?}; exiting");
        let _ = std::fs::remove_file(socket_path(&socket));
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_parse_and_a_bad_one_falls_back() {
        use tracing::level_filters::LevelFilter;
        let filter = parse_filter(&filter_for("debug"), "info");
        assert!(filter.would_enable("microvm_shim::pod", &tracing::Level::DEBUG));
        assert!(!filter.would_enable("h2::codec", &tracing::Level::DEBUG));
        assert!(filter.would_enable("h2::codec", &tracing::Level::INFO));
        let fallback = parse_filter("debug,=bad=", "warn");
        assert_eq!(fallback.default_level(), Some(LevelFilter::WARN));
    }
}
