//! The host side of a nested run: virtiofsd serving the host's `/`
//! read-only, QEMU under TCG booting L1 with the run's initramfs, and the
//! frame stream from stage 2. Everything the run makes is its own: a temp
//! dir (removed as soon as L1 is up; QEMU and virtiofsd hold what they
//! opened), and two children that die with this process (parent-death
//! signal) and are reaped on every way out.

use crate::image::{self, ImageError, L1Image};
use crate::protocol::{CommandSpec, Frame, ACK, HOST_FS_TAG, PORT_NAME};
use crate::STOP_SIGNAL;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long QEMU may take to connect its control port, and virtiofsd to
/// listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long L1 may take to power off after the ack.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(20);
/// How many console lines an error quotes.
const CONSOLE_TAIL: usize = 25;
/// A soft lockup in L1's own kernel that lasts this long is taken as a
/// wedged L1: it was seen once (kvm-amd's vCPU and PIT threads stuck for
/// 20+ min under TCG's emulated SVM) and never recovered. Shorter ones can
/// be TCG's slowness alone.
const WEDGED_AFTER_SECONDS: u64 = 120;
/// How often the console is checked for such a lockup.
const WEDGE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const TEMP_PREFIX: &str = "microvm-kvm-harness.";

#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0} not found (install-deps installs it: qemu-system-x86 from apt, virtiofsd from crates.io)")]
    MissingTool(String),
    #[error("cannot start {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Setup { what: &'static str, detail: String },
    #[error(
        "L1 failed before running the command: {message}\nL1 console (last lines):\n{console}"
    )]
    L1Failed { message: String, console: String },
    #[error("L1 stopped ({status}) without reporting the command's exit\nL1 console (last lines):\n{console}\n{logs}")]
    L1Died {
        status: String,
        console: String,
        logs: String,
    },
    #[error(
        "the command did not finish within {0:?}; L1 was killed\nL1 console (last lines):\n{1}"
    )]
    TimedOut(Duration, String),
    #[error("L1's kernel is wedged (a soft lockup of {0} s; a nested-KVM fault under TCG, not the command's); L1 was killed\nL1 console (last lines):\n{1}")]
    Wedged(u64, String),
    #[error("interrupted by signal {0}; L1 was killed")]
    Interrupted(i32),
}

impl NestedError {
    /// The harness's exit status for this error (`timeout(1)`'s
    /// convention: 124 for a timeout, 125 for the harness's own failures).
    pub fn exit_status(&self) -> i32 {
        match self {
            NestedError::TimedOut(..) => 124,
            NestedError::Wedged(..) => WEDGED_EXIT_STATUS,
            NestedError::Interrupted(signal) => 128 + signal,
            _ => 125,
        }
    }
}

/// The exit status of a run whose L1 wedged: EX_TEMPFAIL, as the run may
/// well pass in a fresh L1.
pub const WEDGED_EXIT_STATUS: i32 = 75;

/// The longest soft lockup L1's kernel reports on `console`, in seconds.
fn longest_soft_lockup(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|line| {
            line.split_once("soft lockup - CPU#")?
                .1
                .split_once("stuck for ")
        })
        .filter_map(|(_, rest)| rest.split_once("s!")?.0.parse::<u64>().ok())
        .max()
}

#[derive(Debug, Clone)]
pub struct NestedConfig {
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    pub cache: PathBuf,
    /// Keep L1's whole console log here.
    pub console: Option<PathBuf>,
    /// Echo L1's console to stderr as it comes, with the time since start.
    pub verbose: bool,
    /// QEMU's CPU model for L1; it must offer SVM.
    pub cpu: String,
}

/// How a nested run went.
#[derive(Debug, Clone)]
pub struct NestedOutcome {
    pub status: i32,
    pub image: L1Image,
    /// From QEMU's start to stage 2 running.
    pub l1_ready: Duration,
    pub elapsed: Duration,
}

/// Where the command's output goes.
pub trait Output {
    fn stdout(&mut self, data: &[u8]);
    fn stderr(&mut self, data: &[u8]);
}

/// The harness's own stdout and stderr.
pub struct Inherit;

impl Output for Inherit {
    fn stdout(&mut self, data: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(data);
        let _ = out.flush();
    }

    fn stderr(&mut self, data: &[u8]) {
        let _ = std::io::stderr().write_all(data);
    }
}

/// Whether `/proc/net/unix` (`table`) has a listening socket bound at
/// `path` (flag `__SO_ACCEPTCON`, 0x10000).
fn is_listening(table: &str, path: &Path) -> bool {
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Finds `name` on PATH or in cargo's bin dir (where virtiofsd installs).
pub fn find_tool(name: &str) -> Result<PathBuf, NestedError> {
    let cargo_bin = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin"))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo/bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([cargo_bin, PathBuf::from("/usr/libexec")])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| NestedError::MissingTool(name.to_owned()))
}

/// Children killed and reaped on drop; the parent-death signal covers a
/// harness that is killed outright.
struct Children(Vec<(&'static str, Child)>);

impl Children {
    fn spawn(&mut self, what: &'static str, command: &mut Command) -> Result<(), NestedError> {
        // SAFETY: prctl is async-signal-safe; it runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|source| NestedError::Spawn { what, source })?;
        self.0.push((what, child));
        Ok(())
    }

    fn get(&mut self, what: &str) -> Option<&mut Child> {
        self.0
            .iter_mut()
            .find(|(name, _)| *name == what)
            .map(|(_, child)| child)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Removes temp dirs that runs killed outright left (their pid is gone).
fn remove_stale_temp_dirs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn read_all(file: &mut File) -> String {
    let mut text = String::new();
    if file.rewind().is_ok() {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// Runs `spec` in a fresh L1 and returns its status once L1 is off.
pub fn run(
    spec: &CommandSpec,
    exe: &Path,
    config: &NestedConfig,
    output: &mut dyn Output,
) -> Result<NestedOutcome, NestedError> {
    let started = Instant::now();
    let deadline = started + config.timeout;
    let qemu = find_tool("qemu-system-x86_64")?;
    let virtiofsd = find_tool("virtiofsd")?;
    let image = image::ensure(&config.cache)?;
    remove_stale_temp_dirs();
    let temp = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}.", std::process::id()))
        .tempdir_in("/tmp")
        .map_err(|err| NestedError::Setup {
            what: "cannot create a temp dir in /tmp",
            detail: err.to_string(),
        })?;
    let dir = temp.path();
    let command_json = serde_json::to_vec(spec).map_err(|err| NestedError::Setup {
        what: "cannot encode the command",
        detail: err.to_string(),
    })?;
    let initramfs = dir.join("initramfs");
    image::initramfs_for_run(&image, &command_json, exe, &initramfs)?;
    let log = |name: &str| -> Result<File, NestedError> {
        std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(dir.join(name))
            .map_err(|err| NestedError::Setup {
                what: "cannot create a log in the temp dir",
                detail: err.to_string(),
            })
    };
    let mut console = log("console.log")?;
    let mut qemu_log = log("qemu.log")?;
    let mut virtiofsd_log = log("virtiofsd.log")?;
    let clone = |file: &File| -> Result<File, NestedError> {
        file.try_clone().map_err(|err| NestedError::Setup {
            what: "cannot duplicate a log fd",
            detail: err.to_string(),
        })
    };

    let echo = config
        .verbose
        .then(|| clone(&console).map(|file| echo_console(file, started)))
        .transpose()?;
    let _stop_echo = echo;
    let mut children = Children(Vec::new());
    let fs_socket = dir.join("fs.sock");
    children.spawn(
        "virtiofsd",
        Command::new(&virtiofsd)
            .arg("--shared-dir=/")
            .arg(format!("--socket-path={}", fs_socket.display()))
            .args([
                "--readonly",
                "--sandbox=none",
                "--cache=auto",
                "--log-level=error",
            ])
            .stdin(Stdio::null())
            .stdout(clone(&virtiofsd_log)?)
            .stderr(clone(&virtiofsd_log)?),
    )?;
    // The socket file appears at bind(2), before listen(2): QEMU connecting
    // in between is refused. A trial connection would use up virtiofsd's
    // one frontend, so the kernel's socket table says when it listens.
    wait_until(deadline.min(Instant::now() + START_TIMEOUT), || {
        is_listening(
            &std::fs::read_to_string("/proc/net/unix").unwrap_or_default(),
            &fs_socket,
        )
    })
    .ok_or_else(|| NestedError::Setup {
        what: "virtiofsd did not create its socket",
        detail: read_all(&mut virtiofsd_log),
    })?;

    let control_socket = dir.join("control.sock");
    let listener = UnixListener::bind(&control_socket).map_err(|err| NestedError::Setup {
        what: "cannot listen for L1's control port",
        detail: err.to_string(),
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|err| NestedError::Setup {
            what: "cannot poll the control socket",
            detail: err.to_string(),
        })?;
    let memory = format!("{}M", config.memory_mib);
    children.spawn(
        "qemu",
        Command::new(&qemu)
            .args(["-M", "q35", "-accel", "tcg", "-cpu", &config.cpu])
            .args(["-smp", &config.cpus.to_string(), "-m", &memory])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={memory},share=on"
            ))
            .args(["-numa", "node,memdev=mem"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 panic=-1 quiet mitigations=off"])
            .arg("-chardev")
            .arg(format!("socket,id=fs,path={}", fs_socket.display()))
            .arg("-device")
            .arg(format!("vhost-user-fs-pci,chardev=fs,tag={HOST_FS_TAG}"))
            .args(["-device", "virtio-serial-pci,id=serial0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=control,path={}",
                control_socket.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=serial0.0,chardev=control,name={PORT_NAME}"
            ))
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(clone(&console)?)
            .stderr(clone(&qemu_log)?),
    )?;

    let died = |children: &mut Children, console: &mut File, qemu_log: &mut File| {
        let status = children
            .get("qemu")
            .and_then(|qemu| qemu.try_wait().ok().flatten());
        status.map(|status| {
            let console_text = read_all(console);
            error_from_console(&console_text).unwrap_or_else(|| NestedError::L1Died {
                status: status.to_string(),
                console: tail(&console_text, CONSOLE_TAIL),
                logs: format!("QEMU: {}", read_all(qemu_log).trim()),
            })
        })
    };

    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => {
                return Err(NestedError::Setup {
                    what: "accepting L1's control port",
                    detail: err.to_string(),
                })
            }
        }
        if let Some(err) = died(&mut children, &mut console, &mut qemu_log) {
            return Err(err);
        }
        if Instant::now() > started + START_TIMEOUT {
            return Err(NestedError::Setup {
                what: "QEMU did not connect L1's control port",
                detail: read_all(&mut qemu_log),
            });
        }
        check_signal()?;
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = stream.set_nonblocking(false);
    let writer = stream.try_clone().map_err(|err| NestedError::Setup {
        what: "cannot duplicate the control stream",
        detail: err.to_string(),
    })?;
    let frames = spawn_reader(stream);

    let mut temp = Some(temp);
    let mut l1_ready = None;
    let mut next_wedge_check = Instant::now() + WEDGE_CHECK_INTERVAL;
    let status = loop {
        check_signal()?;
        if Instant::now() >= next_wedge_check {
            next_wedge_check = Instant::now() + WEDGE_CHECK_INTERVAL;
            let console_text = read_all(&mut console);
            if let Some(seconds) = longest_soft_lockup(&console_text)
                .filter(|seconds| *seconds >= WEDGED_AFTER_SECONDS)
            {
                return Err(NestedError::Wedged(
                    seconds,
                    tail(&console_text, CONSOLE_TAIL),
                ));
            }
        }
        if Instant::now() >= deadline {
            let console_text = read_all(&mut console);
            return Err(NestedError::TimedOut(
                config.timeout,
                tail(&console_text, CONSOLE_TAIL),
            ));
        }
        match frames.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(Frame::Started { .. })) => {
                l1_ready = Some(started.elapsed());
                // L1 is up: QEMU and virtiofsd hold every file they need
                // and this process holds the logs; a harness killed from
                // here on leaves nothing in /tmp.
                if let Some(temp) = temp.take() {
                    let _ = temp.close();
                }
            }
            Ok(Ok(Frame::Stdout(data))) => output.stdout(&data),
            Ok(Ok(Frame::Stderr(data))) => output.stderr(&data),
            Ok(Ok(Frame::Exited { status })) => break status,
            Ok(Ok(Frame::Failed(message))) => {
                ack(&writer);
                return Err(NestedError::L1Failed {
                    message,
                    console: tail(&read_all(&mut console), CONSOLE_TAIL),
                });
            }
            Ok(Err(err)) => {
                return Err(NestedError::Setup {
                    what: "reading L1's control port",
                    detail: err.to_string(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The stream ended: QEMU is gone or going.
                let _ = wait_until(Instant::now() + Duration::from_secs(5), || {
                    children
                        .get("qemu")
                        .is_none_or(|qemu| matches!(qemu.try_wait(), Ok(Some(_))))
                });
                return Err(
                    died(&mut children, &mut console, &mut qemu_log).unwrap_or_else(|| {
                        NestedError::L1Died {
                            status: "control port closed".into(),
                            console: tail(&read_all(&mut console), CONSOLE_TAIL),
                            logs: String::new(),
                        }
                    }),
                );
            }
        }
    };
    ack(&writer);
    if let Some(qemu) = children.get("qemu") {
        let off = wait_until(Instant::now() + POWER_OFF_TIMEOUT, || {
            matches!(qemu.try_wait(), Ok(Some(_)))
        });
        if off.is_none() {
            eprintln!(
                "microvm-kvm-harness: L1 did not power off within {POWER_OFF_TIMEOUT:?}; killed"
            );
        }
    }
    if let Some(path) = &config.console {
        let _ = std::fs::write(path, read_all(&mut console));
    }
    drop(children);
    Ok(NestedOutcome {
        status,
        image,
        l1_ready: l1_ready.unwrap_or_default(),
        elapsed: started.elapsed(),
    })
}

/// Stops the console echo when dropped.
struct EchoGuard(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for EchoGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Prints each new console line to stderr as `[L1 +s.s] line`.
fn echo_console(mut file: File, started: Instant) -> EchoGuard {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        let mut offset = 0u64;
        let mut pending = Vec::new();
        loop {
            let done = stopped.load(Ordering::SeqCst);
            let mut chunk = Vec::new();
            if file.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                let _ = file.read_to_end(&mut chunk);
            }
            offset += chunk.len() as u64;
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                eprintln!(
                    "[L1 +{:.1}s] {}",
                    started.elapsed().as_secs_f64(),
                    String::from_utf8_lossy(&line).trim_end()
                );
            }
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    EchoGuard(stop)
}

fn ack(mut writer: &UnixStream) {
    let _ = writer.write_all(&[ACK]);
}

/// Stage 1's own error line, if the console has one.
fn error_from_console(console: &str) -> Option<NestedError> {
    console
        .lines()
        .find_map(|line| line.split_once("microvm-kvm-harness: error: "))
        .map(|(_, message)| NestedError::L1Failed {
            message: message.trim().to_owned(),
            console: tail(console, CONSOLE_TAIL),
        })
}

fn check_signal() -> Result<(), NestedError> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => Err(NestedError::Interrupted(signal)),
    }
}

fn spawn_reader(mut stream: UnixStream) -> mpsc::Receiver<std::io::Result<Frame>> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || loop {
        match Frame::read_from(&mut stream) {
            Ok(Some(frame)) => {
                if send.send(Ok(frame)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                let _ = send.send(Err(err));
                return;
            }
        }
    });
    receive
}

/// Polls `done` until it holds or `deadline` passes.
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> Option<()> {
    loop {
        if done() {
            return Some(());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_socket_listens_only_once_the_table_says_so() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                     0000000000000000: 00000002 00000000 00000000 0001 01 1001 /run/fs.sock\n\
                     0000000000000000: 00000002 00000000 00010000 0001 01 1002 /run/other.sock\n";
        assert!(!is_listening(table, Path::new("/run/fs.sock")));
        assert!(is_listening(table, Path::new("/run/other.sock")));
        assert!(!is_listening(table, Path::new("/run/missing.sock")));
    }

    use super::*;

    #[test]
    fn stage_one_errors_are_found_on_the_console() {
        let console = "[    1.0] boot\nmicrovm-kvm-harness: error: cannot load kernel module kvm_amd into L1\n";
        match error_from_console(console) {
            Some(NestedError::L1Failed { message, .. }) => {
                assert_eq!(message, "cannot load kernel module kvm_amd into L1")
            }
            other => panic!("{other:?}"),
        }
        assert!(error_from_console("all fine\n").is_none());
    }

    #[test]
    fn errors_map_to_timeouts_conventions() {
        assert_eq!(
            NestedError::TimedOut(Duration::from_secs(1), String::new()).exit_status(),
            124
        );
        assert_eq!(NestedError::Interrupted(15).exit_status(), 143);
        assert_eq!(NestedError::Wedged(130, String::new()).exit_status(), 75);
        assert_eq!(NestedError::MissingTool("qemu".into()).exit_status(), 125);
    }

    #[test]
    fn a_long_soft_lockup_on_the_console_is_found() {
        let console = "[ 331.4] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [vcpu0:680]\n\
                       [ 1456.4] watchdog: BUG: soft lockup - CPU#1 stuck for 1147s! [vcpu0:680]\n\
                       [ 1484.3] watchdog: BUG: soft lockup - CPU#0 stuck for 1174s! [kvm-pit/1:678]\n";
        assert_eq!(longest_soft_lockup(console), Some(1174));
        assert_eq!(longest_soft_lockup("[ 1.0] all fine\n"), None);
        assert_eq!(
            longest_soft_lockup("soft lockup - CPU#0 stuck for xs!\n"),
            None
        );
    }

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
