//! The Debug service (debug.proto): guest-wide metrics for `microvm-ctl
//! metrics`, and the debug console of `microvm-ctl console`.
//!
//! The console is a door into the guest, so it is off unless the shim turns
//! it on: the shim calls `SetConsolePolicy` once, right after boot, from its
//! node config, and the first call fixes the policy for the VM's life. The
//! release initramfs has no shell: the client sends a static busybox, which
//! lives only in a memfd and runs on a pty in the VM's own namespaces
//! (outside every container).

use crate::async_fd;
use bytes::Bytes;
use futures_util::Stream;
use microvm_proto::agent::v1 as api;
use microvm_proto::{CONSOLE_OUTPUT_CHUNK_BYTES, CONSOLE_SHELL_MAX_BYTES};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::sync::OnceLock;
use tokio::io::Interest;
use tonic::{Request, Response, Status, Streaming};

/// The console policy of this VM, set once by the shim.
static CONSOLE_POLICY: OnceLock<bool> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error("creating the shell's memfd")]
    Memfd(#[source] std::io::Error),
    #[error("opening a pty")]
    Pty(#[source] nix::Error),
    #[error("starting the shell")]
    Spawn(#[source] std::io::Error),
    #[error("registering the pty with the reactor")]
    Register(#[source] std::io::Error),
}

/// The Debug service: stateless apart from [`CONSOLE_POLICY`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DebugService;

pub fn server() -> api::debug_server::DebugServer<DebugService> {
    api::debug_server::DebugServer::new(DebugService)
        .max_decoding_message_size(2 * microvm_proto::CONSOLE_SHELL_CHUNK_BYTES)
}

/// Sums of the first `cpu` line of /proc/stat, in USER_HZ ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
}

/// The aggregate `cpu` line of /proc/stat: user nice system idle iowait ...
/// (nice counts as user, irq and softirq as system).
pub fn cpu_ticks(proc_stat: &str) -> CpuTicks {
    let Some(line) = proc_stat
        .lines()
        .find(|line| line.split_whitespace().next() == Some("cpu"))
    else {
        return CpuTicks::default();
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    let at = |index: usize| fields.get(index).copied().unwrap_or(0);
    CpuTicks {
        user: at(0) + at(1),
        system: at(2) + at(5) + at(6),
        idle: at(3),
        iowait: at(4),
    }
}

/// `name value` lines (/proc/vmstat): the value of `name`.
pub fn vmstat_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn meminfo_free(text: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix("MemFree:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

fn user_hz() -> f64 {
    // SAFETY: sysconf takes an integer and returns one.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

pub fn guest_metrics() -> api::GuestMetricsResponse {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let (total, available) = crate::guest::meminfo(&meminfo);
    let ticks = cpu_ticks(&read("/proc/stat"));
    let hz = user_hz();
    // SAFETY: sysconf takes an integer and returns one.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    api::GuestMetricsResponse {
        memory_total_bytes: total,
        memory_free_bytes: meminfo_free(&meminfo),
        memory_available_bytes: available,
        cpu_user_seconds: ticks.user as f64 / hz,
        cpu_system_seconds: ticks.system as f64 / hz,
        cpu_idle_seconds: ticks.idle as f64 / hz,
        cpu_iowait_seconds: ticks.iowait as f64 / hz,
        online_vcpus: u32::try_from(online).unwrap_or(0),
        oom_kills: vmstat_field(&read("/proc/vmstat"), "oom_kill"),
        uptime_seconds: crate::guest::read_uptime(),
    }
}

/// Sets the policy; only the first call counts.
pub fn set_console_policy(enabled: bool) -> Result<(), Status> {
    CONSOLE_POLICY.set(enabled).map_err(|_| {
        Status::failed_precondition(
            "the console policy is set once per VM, by the shim at boot; it is already set",
        )
    })
}

pub fn console_enabled() -> Result<(), Status> {
    match CONSOLE_POLICY.get() {
        Some(true) => Ok(()),
        _ => Err(Status::failed_precondition(
            "the debug console is disabled for this pod: the node's shim config does not set \
             console.enabled = true",
        )),
    }
}

/// A memfd holding the shell binary (sealed against writes once full).
fn shell_memfd() -> Result<std::fs::File, DebugError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"microvm-console-shell".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(DebugError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn seal(file: &std::fs::File) {
    // SAFETY: fcntl on an open descriptor with integer arguments.
    unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
}

fn window(size: Option<&api::WindowSize>) -> nix::pty::Winsize {
    let clamp = |value: u32, default: u16| match u16::try_from(value) {
        Ok(0) | Err(_) => default,
        Ok(value) => value,
    };
    nix::pty::Winsize {
        ws_row: clamp(size.map_or(0, |size| size.rows), 24),
        ws_col: clamp(size.map_or(0, |size| size.columns), 80),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn resize(master: &OwnedFd, size: &api::WindowSize) {
    let size = window(Some(size));
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, valid for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// Starts the shell in `memfd` on a new pty; returns the pty's master.
fn spawn_shell(memfd: &std::fs::File, open: &api::ConsoleOpen) -> Result<OwnedFd, DebugError> {
    let size = window(open.size.as_ref());
    let pty = nix::pty::openpty(Some(&size), None).map_err(DebugError::Pty)?;
    let slave = std::fs::File::from(pty.slave);
    let argv0 = open.argv.first().map_or("sh", String::as_str);
    let term = if open.term.is_empty() || open.term.len() > 64 {
        "xterm"
    } else {
        open.term.as_str()
    };
    let mut command = std::process::Command::new(format!("/proc/self/fd/{}", memfd.as_raw_fd()));
    command
        .arg0(argv0)
        .args(open.argv.iter().skip(1))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .env("TERM", term)
        .env("PS1", "microvm-console# ")
        .current_dir("/")
        .stdin(slave.try_clone().map_err(DebugError::Spawn)?)
        .stdout(slave.try_clone().map_err(DebugError::Spawn)?)
        .stderr(slave);
    // SAFETY: the closure only calls async-signal-safe syscalls (setsid,
    // ioctl) between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The agent's reaper collects the shell's exit (waitpid(-1)); the
    // session ends when the pty's last slave descriptor closes.
    let child = command.spawn().map_err(DebugError::Spawn)?;
    tracing::info!(pid = child.id(), "debug console: shell started");
    drop(child);
    Ok(pty.master)
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<api::ConsoleOutput, Status>> + Send>>;

fn internal(err: DebugError) -> Status {
    crate::server::status(tonic::Code::Internal, &err)
}

/// Receives the shell and the open request, starts the shell, and pumps
/// the pty both ways.
async fn console(mut input: Streaming<api::ConsoleInput>) -> Result<OutputStream, Status> {
    use api::console_input::Kind;
    let mut memfd = shell_memfd().map_err(internal)?;
    let mut received = 0usize;
    let open = loop {
        let Some(message) = input.message().await? else {
            return Err(Status::invalid_argument(
                "the console stream ended before its open message",
            ));
        };
        match message.kind {
            Some(Kind::ShellChunk(chunk)) => {
                received += chunk.len();
                if received > CONSOLE_SHELL_MAX_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "the console shell is larger than {CONSOLE_SHELL_MAX_BYTES} bytes"
                    )));
                }
                memfd
                    .write_all(&chunk)
                    .map_err(|err| internal(DebugError::Memfd(err)))?;
            }
            Some(Kind::Open(open)) => break open,
            _ => {
                return Err(Status::invalid_argument(
                    "the console stream sends the shell and then open, before anything else",
                ))
            }
        }
    };
    if received == 0 {
        return Err(Status::invalid_argument("the console stream sent no shell"));
    }
    seal(&memfd);
    let master = spawn_shell(&memfd, &open).map_err(internal)?;
    drop(memfd);
    let writer = master
        .try_clone()
        .map_err(|err| internal(DebugError::Spawn(err)))?;
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|err| internal(DebugError::Pty(err)))?;
    let reader = async_fd::register(master, Interest::READABLE)
        .map_err(|err| internal(DebugError::Register(err)))?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<api::ConsoleOutput, Status>>(16);
    let input_task = tokio::spawn(async move {
        while let Ok(Some(message)) = input.message().await {
            let written = match message.kind {
                Some(Kind::Stdin(data)) => write_all_blocking(&writer, data).await,
                Some(Kind::Resize(size)) => {
                    resize(&writer, &size);
                    Ok(())
                }
                _ => Ok(()),
            };
            if written.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut buffer = vec![0u8; CONSOLE_OUTPUT_CHUNK_BYTES];
        loop {
            let Ok(mut guard) = reader.readable().await else {
                break;
            };
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), &mut buffer).map_err(std::io::Error::from)
            }) {
                Ok(Ok(0)) | Ok(Err(_)) => break, // EIO: every slave fd closed
                Ok(Ok(count)) => {
                    let output = api::ConsoleOutput {
                        kind: Some(api::console_output::Kind::Output(Bytes::copy_from_slice(
                            &buffer[..count],
                        ))),
                    };
                    if sender.send(Ok(output)).await.is_err() {
                        break;
                    }
                }
                Err(_would_block) => continue,
            }
        }
        input_task.abort();
        tracing::info!("debug console: session ended");
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        receiver,
    )))
}

/// Writes `data` to the pty (blocking writes, off the runtime: a shell
/// that stops reading must not stall the agent).
async fn write_all_blocking(fd: &OwnedFd, data: Bytes) -> std::io::Result<()> {
    let fd = fd.try_clone()?;
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::from(fd);
        // The master is shared with the non-blocking reader: retry EAGAIN.
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            match file.write(rest) {
                Ok(written) => rest = &rest[written..],
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[tonic::async_trait]
impl api::debug_server::Debug for DebugService {
    async fn guest_metrics(
        &self,
        _request: Request<api::GuestMetricsRequest>,
    ) -> Result<Response<api::GuestMetricsResponse>, Status> {
        Ok(Response::new(guest_metrics()))
    }

    async fn set_console_policy(
        &self,
        request: Request<api::ConsolePolicy>,
    ) -> Result<Response<api::ConsolePolicyResponse>, Status> {
        let enabled = request.into_inner().enabled;
        set_console_policy(enabled)?;
        tracing::info!(enabled, "debug console policy set");
        Ok(Response::new(api::ConsolePolicyResponse {}))
    }

    type ConsoleStream = OutputStream;

    async fn console(
        &self,
        request: Request<Streaming<api::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        console_enabled()?;
        console(request.into_inner()).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_vmstat_parse() {
        let stat = "cpu  10 2 30 400 5 6 7 0 0 0\ncpu0 10 2 30 400 5 6 7 0 0 0\n";
        assert_eq!(
            cpu_ticks(stat),
            CpuTicks {
                user: 12,
                system: 43,
                idle: 400,
                iowait: 5
            }
        );
        assert_eq!(cpu_ticks("garbage"), CpuTicks::default());
        let vmstat = "nr_free_pages 100\noom_kill 3\n";
        assert_eq!(vmstat_field(vmstat, "oom_kill"), 3);
        assert_eq!(vmstat_field(vmstat, "missing"), 0);
        assert_eq!(meminfo_free("MemTotal: 10 kB\nMemFree:  4 kB\n"), 4096);
    }

    #[test]
    fn window_sizes_are_clamped_to_sane_defaults() {
        let size = window(Some(&api::WindowSize {
            rows: 0,
            columns: 100_000,
        }));
        assert_eq!((size.ws_row, size.ws_col), (24, 80));
        let size = window(Some(&api::WindowSize {
            rows: 50,
            columns: 132,
        }));
        assert_eq!((size.ws_row, size.ws_col), (50, 132));
    }

    /// The policy is set once: the first call wins, later ones are refused
    /// (the shim's call at boot cannot be overridden by another client).
    #[test]
    fn the_console_policy_is_set_once() {
        assert!(console_enabled().is_err());
        set_console_policy(false).unwrap();
        let again = set_console_policy(true).unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);
        let refused = console_enabled().unwrap_err();
        assert!(refused.message().contains("console.enabled"), "{refused:?}");
    }
}
