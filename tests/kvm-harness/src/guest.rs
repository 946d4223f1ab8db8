//! Stage 2, inside L1: this binary as PID 1 (`l1-init`), in the root stage
//! 1 built. It enables the cgroup v2 controllers (as systemd does on a v2
//! host), runs the command with its output relayed as frames, reaps every
//! orphan, reports the exit status, waits for the host's ack and powers L1
//! off. PID 1 must never exit: that would panic L1's kernel.

use crate::protocol::{CommandSpec, Frame, ACK, MAX_FRAME, NESTED_ENV, PORT_NAME};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long output may still arrive from processes the command left
/// behind once it exited, before they are killed.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How long L1 waits for the host's ack of the exit status.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Runs stage 2 and powers off; never returns.
pub fn l1_init(command_file: &Path) -> ! {
    let port = match open_port() {
        Ok(port) => Arc::new(Mutex::new(port)),
        Err(message) => {
            // No channel to the host: the console is the only witness.
            eprintln!("microvm-kvm-harness: error: {message}");
            power_off();
        }
    };
    let send = |frame: Frame| {
        let mut port = port
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = frame.write_to(&mut *port);
    };
    send(Frame::Started {
        uptime_ms: uptime_ms(),
    });
    enable_cgroup_controllers();
    let last = match run_command(command_file, &port) {
        Ok(status) => Frame::Exited { status },
        Err(message) => Frame::Failed(message),
    };
    send(last);
    wait_for_ack(&port);
    power_off();
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |seconds| (seconds * 1000.0) as u64)
}

/// What a host with systemd has: every available controller enabled for
/// the root's children.
fn enable_cgroup_controllers() {
    let root = Path::new(CGROUP_ROOT);
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for controller in available.split_whitespace() {
        if let Err(err) = std::fs::write(
            root.join("cgroup.subtree_control"),
            format!("+{controller}"),
        ) {
            eprintln!("microvm-kvm-harness: cannot enable cgroup controller {controller}: {err}");
        }
    }
}

/// The virtio-serial port named [`PORT_NAME`].
fn open_port() -> Result<File, String> {
    let ports = Path::new("/sys/class/virtio-ports");
    let entries = std::fs::read_dir(ports)
        .map_err(|err| format!("no virtio-serial ports in L1 ({}): {err}", ports.display()))?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            let device = PathBuf::from("/dev").join(entry.file_name());
            return std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&device)
                .map_err(|err| format!("cannot open {}: {err}", device.display()));
        }
    }
    Err(format!("no virtio-serial port named {PORT_NAME} in L1"))
}

fn run_command(command_file: &Path, port: &Arc<Mutex<File>>) -> Result<i32, String> {
    let text = std::fs::read(command_file)
        .map_err(|err| format!("cannot read {}: {err}", command_file.display()))?;
    let spec: CommandSpec =
        serde_json::from_slice(&text).map_err(|err| format!("bad command file: {err}"))?;
    let (program, args) = spec.argv.split_first().ok_or("empty command")?;
    if !Path::new(&spec.cwd).is_dir() {
        return Err(format!(
            "the working directory {} does not exist in L1 (L1 has its own /tmp and /run); run from a directory of the host's files",
            spec.cwd
        ));
    }
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(NESTED_ENV, "nested")
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run {program} in L1: {err}"))?;
    let pid = child.id() as libc::pid_t;
    let (done, relays_done) = mpsc::channel();
    let relays = [
        child
            .stdout
            .take()
            .map(|pipe| relay(pipe, Frame::Stdout, port, &done)),
        child
            .stderr
            .take()
            .map(|pipe| relay(pipe, Frame::Stderr, port, &done)),
    ];
    drop(done);
    let status = reap_until(pid);
    // Output from orphans the command left, briefly; then they go.
    let deadline = std::time::Instant::now() + ORPHAN_GRACE;
    let mut finished = 0;
    while finished < relays.iter().flatten().count() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match relays_done.recv_timeout(left) {
            Ok(()) => finished += 1,
            Err(_) => break,
        }
    }
    // SAFETY: kill(-1) signals every process but PID 1 (this one).
    unsafe { libc::kill(-1, libc::SIGKILL) };
    for relay in relays.into_iter().flatten() {
        let _ = relay.join();
    }
    Ok(status)
}

/// Copies a pipe to the port as frames until EOF.
fn relay(
    mut pipe: impl Read + Send + 'static,
    frame: fn(Vec<u8>) -> Frame,
    port: &Arc<Mutex<File>>,
    done: &mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    let port = port.clone();
    let done = done.clone();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; MAX_FRAME];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    let mut port = port
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if frame(buffer[..n].to_vec()).write_to(&mut *port).is_err() {
                        break;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    })
}

/// Reaps every child (PID 1 inherits the orphans) until `pid` exits;
/// returns its status as a shell would: the code, or 128 + the signal.
fn reap_until(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: nothing left to wait for (cannot happen before `pid`).
            return 125;
        }
        if reaped == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        }
    }
}

fn wait_for_ack(port: &Arc<Mutex<File>>) {
    let mut port = port
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut poll = libc::pollfd {
        fd: port.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = i32::try_from(ACK_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut poll, 1, timeout) } > 0 {
        let mut byte = [0u8; 1];
        if port.read_exact(&mut byte).is_ok() && byte[0] != ACK {
            eprintln!(
                "microvm-kvm-harness: unexpected byte {:#x} from the host",
                byte[0]
            );
        }
    } else {
        eprintln!("microvm-kvm-harness: no ack from the host within {ACK_TIMEOUT:?}");
    }
    let _ = port.flush();
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; PID 1 powering off is the
    // point of the call.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
