//! Runs a backend's plan: starts each process in order, waits for its
//! socket, records its pid (with its start time, so the crash cleanup never
//! kills a recycled pid), watches it and reaps it. A [`PodVm`] that is
//! dropped kills what it started; [`PodVm::shutdown`] also waits for the
//! processes and removes their pid files and sockets.

use super::cgroup::{join_in_child, PodCgroups};
use super::console::{PodLog, Stream};
use super::layout::PodLayout;
use super::ProcessSpec;
use crate::network::NetnsForChild;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// How many lines of the pod's log a launch failure quotes.
const LOG_TAIL_LINES: usize = 10;
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(10);
/// How long a process may take to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a stopped process may take to be reaped.
const REAP_TIMEOUT: Duration = STOP_GRACE.saturating_add(Duration::from_secs(5));

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {name} in the pod's network namespace: {detail}")]
    Netns { name: &'static str, detail: String },
    #[error("cannot create {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {name} ({program})")]
    Spawn {
        name: &'static str,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before creating {socket}; the last lines of {log}:\n{tail}")]
    ExitedEarly {
        name: &'static str,
        socket: PathBuf,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} did not create {socket} within {timeout:?} (see {log})")]
    NotReady {
        name: &'static str,
        socket: PathBuf,
        timeout: Duration,
        log: PathBuf,
    },
}

/// One watched process.
#[derive(Debug)]
struct Supervised {
    name: &'static str,
    pid: u32,
    is_vmm: bool,
    /// Dropping or sending kills the process.
    kill: Option<oneshot::Sender<()>>,
    /// `Some(description)` once reaped.
    exited: watch::Receiver<Option<String>>,
}

/// A process of the pod that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExit {
    pub name: &'static str,
    pub is_vmm: bool,
    pub status: String,
}

/// What the service watches to learn that the VM died.
#[derive(Debug, Clone)]
pub struct ExitWatch {
    watched: Vec<(&'static str, bool, watch::Receiver<Option<String>>)>,
}

/// How long a helper's exit waits for the VMM's: when the VMM dies, its
/// vhost-user back-ends exit too and may be reaped first.
const VMM_EXIT_GRACE: Duration = Duration::from_millis(500);

impl ExitWatch {
    /// The first process of the pod to exit; the VMM's exit if it follows
    /// a helper's within [`VMM_EXIT_GRACE`] (it is the telling one).
    pub async fn first_exit(mut self) -> ProcessExit {
        async fn exit_of(
            name: &'static str,
            is_vmm: bool,
            exited: &mut watch::Receiver<Option<String>>,
        ) -> ProcessExit {
            let status = match exited.wait_for(Option::is_some).await {
                Ok(status) => status.clone().unwrap_or_default(),
                Err(_) => "supervisor gone".to_owned(),
            };
            ProcessExit {
                name,
                is_vmm,
                status,
            }
        }
        let mut vmm = self
            .watched
            .iter()
            .find(|(_, is_vmm, _)| *is_vmm)
            .map(|(name, _, exited)| (*name, exited.clone()));
        let waits: Vec<_> = self
            .watched
            .iter_mut()
            .map(|(name, is_vmm, exited)| Box::pin(exit_of(name, *is_vmm, exited)))
            .collect();
        if waits.is_empty() {
            return std::future::pending().await;
        }
        let (first, _, _) = futures_util::future::select_all(waits).await;
        if first.is_vmm {
            return first;
        }
        if let Some((name, exited)) = vmm.as_mut() {
            if let Ok(vmm_exit) =
                tokio::time::timeout(VMM_EXIT_GRACE, exit_of(name, true, exited)).await
            {
                return vmm_exit;
            }
        }
        first
    }
}

#[derive(Debug)]
pub struct PodVm {
    layout: PodLayout,
    /// Every process's output goes here, line by line.
    log: PodLog,
    processes: Vec<Supervised>,
    sockets: Vec<PathBuf>,
    /// The pod's cgroups; each process joins its leaf.
    cgroups: Option<PodCgroups>,
}

impl PodVm {
    /// Starts `plan` in order. On any error, what was started is killed
    /// and reaped before this returns.
    pub async fn launch(
        plan: Vec<ProcessSpec>,
        layout: &PodLayout,
        ready_timeout: Duration,
        cgroups: Option<&PodCgroups>,
        log: PodLog,
    ) -> Result<Self, LaunchError> {
        for dir in [layout.dir.clone(), layout.pid_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| LaunchError::Prepare { path: dir, source })?;
        }
        let socket_dir = layout.socket_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&socket_dir)
            .map_err(|source| LaunchError::Prepare {
                path: socket_dir,
                source,
            })?;
        let mut vm = Self {
            layout: layout.clone(),
            log,
            processes: Vec::new(),
            sockets: Vec::new(),
            cgroups: cgroups.cloned(),
        };
        for process in plan {
            if let Err(err) = vm.start_one(process, ready_timeout).await {
                vm.shutdown().await;
                return Err(err);
            }
        }
        Ok(vm)
    }

    async fn start_one(
        &mut self,
        spec: ProcessSpec,
        ready_timeout: Duration,
    ) -> Result<(), LaunchError> {
        let log = &self.layout.log_file;
        if let Some(socket) = &spec.ready_socket {
            // A stale socket from a crashed run would look ready at once.
            let _ = std::fs::remove_file(socket);
            self.sockets.push(socket.clone());
        }
        if let Some(root) = &spec.empty_root {
            make_empty_root(root)?;
        }
        if let Some((uid, gid)) = spec.socket_owner {
            self.give_sockets_to(uid, gid)?;
        }
        let netns = match &spec.netns {
            Some(path) => Some(NetnsForChild::open(path).map_err(|err| LaunchError::Netns {
                name: spec.name,
                detail: err.to_string(),
            })?),
            None => None,
        };
        let mut command = tokio::process::Command::new(&spec.program);
        if let Some(cgroups) = &self.cgroups {
            let procs = cgroups.procs_files(spec.cgroup);
            // SAFETY: join_in_child only opens, writes and closes files
            // whose paths were built before the fork.
            unsafe {
                command.pre_exec(move || join_in_child(&procs));
            }
        }
        if let Some(netns) = netns {
            // SAFETY: `enter` is one setns(2) on an fd opened before the
            // fork: async-signal-safe, and it moves only the child.
            unsafe {
                command.pre_exec(move || netns.enter());
            }
        }
        // SAFETY: runs in the forked child before exec; prctl is
        // async-signal-safe and touches no state of this process.
        unsafe {
            command.pre_exec(|| {
                // The pod's processes die with the shim (a kill -9 of the
                // shim included). The spawning thread is a runtime worker,
                // which lives as long as the shim.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| LaunchError::Spawn {
            name: spec.name,
            program: spec.program.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        // The VMM's stdout is the guest's serial console.
        let stdout_is = if spec.is_vmm {
            Stream::Console
        } else {
            Stream::Process(spec.name)
        };
        if let Some(stdout) = child.stdout.take() {
            drop(self.log.relay(stdout_is, stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            drop(self.log.relay(Stream::Process(spec.name), stderr));
        }
        record_pid(&self.layout.pid_dir(), spec.name, pid);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exited_tx, exited_rx) = watch::channel(None);
        let name = spec.name;
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
                    // SIGTERM first: the jailed VMM's supervisor removes
                    // its jail dir and cgroup only when it can forward a
                    // stop; SIGKILL for whatever ignores it. Best effort:
                    // it may have exited meanwhile.
                    // pid 0 (unknown) would signal the shim's own group.
                    if let Some(raw) = i32::try_from(pid).ok().filter(|raw| *raw > 0) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(raw),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                    }
                    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            let _ = child.start_kill();
                            child.wait().await
                        }
                    }
                }
            };
            let description = match status {
                Ok(status) => status.to_string(),
                Err(err) => format!("wait failed: {err}"),
            };
            tracing::debug!("{name} (pid {pid}) exited: {description}");
            let _ = exited_tx.send(Some(description));
        });
        let mut exited = exited_rx.clone();
        self.processes.push(Supervised {
            name: spec.name,
            pid,
            is_vmm: spec.is_vmm,
            kill: Some(kill_tx),
            exited: exited_rx,
        });
        tracing::info!("started {} (pid {pid})", spec.name);
        let Some(socket) = spec.ready_socket else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + ready_timeout;
        loop {
            if socket.exists() {
                return Ok(());
            }
            let exited_with = exited.borrow_and_update().clone();
            if let Some(status) = exited_with {
                // Its last words reach the log through the relay: give them
                // a moment.
                tokio::time::sleep(POLL * 5).await;
                return Err(LaunchError::ExitedEarly {
                    name: spec.name,
                    socket,
                    status,
                    log: log.clone(),
                    tail: self.log.tail(LOG_TAIL_LINES),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    name: spec.name,
                    socket,
                    timeout: ready_timeout,
                    log: log.clone(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The socket dir and the sockets in it (those of the processes
    /// started so far) to `uid`/`gid`. The pod dir above stays root's 0700,
    /// so only a process handed this dir (the jailed VMM) can reach them.
    fn give_sockets_to(&self, uid: Option<u32>, gid: Option<u32>) -> Result<(), LaunchError> {
        let dir = self.layout.socket_dir();
        let chown = |path: &Path| {
            std::os::unix::fs::lchown(path, uid, gid).map_err(|source| LaunchError::Prepare {
                path: path.to_path_buf(),
                source,
            })
        };
        chown(&dir)?;
        let entries = std::fs::read_dir(&dir).map_err(|source| LaunchError::Prepare {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            chown(&entry.path())?;
        }
        Ok(())
    }

    /// The pod's log (the console's ready line, the tail for errors).
    pub fn log(&self) -> &PodLog {
        &self.log
    }

    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch {
            watched: self
                .processes
                .iter()
                .map(|p| (p.name, p.is_vmm, p.exited.clone()))
                .collect(),
        }
    }

    /// The pids of the running processes, by name (the benchmark reads
    /// their RSS).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes.iter().map(|p| (p.name, p.pid)).collect()
    }

    /// Whether any process of the pod has exited.
    /// The VMM's exit if it exited (helpers exit when it does, and the
    /// VMM's is the telling one), else a helper's.
    pub fn any_exited(&self) -> Option<ProcessExit> {
        let exit = |p: &Supervised| {
            p.exited.borrow().clone().map(|status| ProcessExit {
                name: p.name,
                is_vmm: p.is_vmm,
                status,
            })
        };
        let vmm = self.processes.iter().filter(|p| p.is_vmm).find_map(exit);
        vmm.or_else(|| self.processes.iter().find_map(exit))
    }

    /// Stops every process (the VMM first; SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`]), waits until each is reaped,
    /// and removes the pid files and sockets. Idempotent.
    pub async fn shutdown(&mut self) {
        for process in self.processes.iter_mut().rev() {
            if let Some(kill) = process.kill.take() {
                let _ = kill.send(());
            }
            let reaped =
                tokio::time::timeout(REAP_TIMEOUT, process.exited.wait_for(Option::is_some)).await;
            if reaped.is_err() {
                tracing::error!(
                    "{} (pid {}) was not reaped within {REAP_TIMEOUT:?}",
                    process.name,
                    process.pid
                );
            }
            let _ = std::fs::remove_file(self.layout.pid_dir().join(process.name));
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
        let _ = std::fs::remove_file(self.layout.agent_socket());
        let _ = std::fs::remove_dir(self.layout.socket_dir());
        let _ = std::fs::remove_dir(self.layout.pid_dir());
    }
}

/// The root of a chrooted process: empty, and not writable by it once it
/// dropped root. A dir left by an earlier run is reused only if empty.
fn make_empty_root(dir: &Path) -> Result<(), LaunchError> {
    use std::os::unix::fs::PermissionsExt;
    let prepare = |source| LaunchError::Prepare {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o555).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            if std::fs::read_dir(dir).map_err(prepare)?.next().is_some() {
                return Err(prepare(std::io::Error::other("a chroot dir must be empty")));
            }
        }
        Err(err) => return Err(prepare(err)),
    }
    // The umask may have narrowed the mode above.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).map_err(prepare)
}

/// `<pid> <starttime>`: the start time (field 22 of /proc/<pid>/stat) tells
/// a recycled pid apart. A failure only weakens the crash cleanup.
fn record_pid(pid_dir: &Path, name: &str, pid: u32) {
    let Some(start_time) = process_start_time(pid) else {
        tracing::warn!("cannot read the start time of {name} (pid {pid})");
        return;
    };
    if let Err(err) = std::fs::write(pid_dir.join(name), format!("{pid} {start_time}\n")) {
        tracing::warn!("cannot record the pid of {name}: {err}");
    }
}

/// Field 3 (state) and field 22 (starttime) of /proc/<pid>/stat.
fn state_and_start_time(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parens: skip past its
    // last ')'. Field 3 is then the first word.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.to_owned();
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// A VM's host process has a child or two; the bound only stops a loop.
const MAX_DESCENDANTS: usize = 64;

/// The processes below `pid` (/proc/<pid>/task/<tid>/children).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if found.len() >= MAX_DESCENDANTS || found.contains(&child) {
                    return found;
                }
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// Field 22 (starttime) of /proc/<pid>/stat.
pub fn process_start_time(pid: u32) -> Option<u64> {
    state_and_start_time(pid).map(|(_, start_time)| start_time)
}

/// Whether `pid` is still the process started at `start_time` and has not
/// exited. A zombie has: a SIGKILLed shim stays one until it is reaped,
/// and the crash cleanup must not take it for a live one.
pub fn still_running(pid: u32, start_time: u64) -> bool {
    matches!(state_and_start_time(pid),
        Some((state, started)) if started == start_time && state != "Z" && state != "X")
}

/// Kills every process recorded in `pid_dir` that is still the same process
/// (same start time), and removes the pid files. For a pod whose shim died.
/// Returns the names of the processes it killed.
pub fn kill_recorded(pid_dir: &Path) -> Vec<String> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pid_dir) else {
        return killed;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut words = text.split_whitespace();
        let pid = words.next().and_then(|w| w.parse::<u32>().ok());
        let start_time = words.next().and_then(|w| w.parse::<u64>().ok());
        if let (Some(pid), Some(start_time)) = (pid, start_time) {
            if pid > 1 && process_start_time(pid) == Some(start_time) {
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(raw),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    wait_gone(pid, start_time);
                    killed.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_dir(pid_dir);
    killed
}

/// Waits (bounded) until `pid` with `start_time` is gone: reaped by its
/// parent, or a zombie of a parent that is gone too.
fn wait_gone(pid: u32, start_time: u64) {
    let deadline = std::time::Instant::now() + REAP_TIMEOUT;
    while std::time::Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next().map(|s| s == "Z"))
            .unwrap_or(false);
        if process_start_time(pid) != Some(start_time) || zombie {
            return;
        }
        std::thread::sleep(POLL);
    }
}

impl Drop for PodVm {
    fn drop(&mut self) {
        for process in &mut self.processes {
            if let Some(kill) = process.kill.take() {
                let _ = kill.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dir: &Path) -> PodLayout {
        PodLayout {
            dir: dir.join("pod"),
            log_file: dir.join("logs").join("pod.log"),
        }
    }

    fn test_log(layout: &PodLayout) -> PodLog {
        PodLog::open(&layout.log_file, 1 << 20).unwrap()
    }

    fn sh(name: &'static str, script: &str, ready: Option<PathBuf>, is_vmm: bool) -> ProcessSpec {
        ProcessSpec {
            name,
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ready_socket: ready,
            is_vmm,
            netns: None,
            empty_root: None,
            socket_owner: None,
            cgroup: crate::vm::cgroup::Leaf::Helpers,
        }
    }

    fn alive(pid: u32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && !stat.contains(") Z ")
    }

    #[tokio::test]
    async fn launches_in_order_and_shutdown_reaps_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path());
        let ready = layout.dir.join("a.sock");
        let plan = vec![
            sh(
                "backend",
                &format!("echo backend-log; touch {}; exec sleep 60", ready.display()),
                Some(ready.clone()),
                false,
            ),
            // Starts only after the first one's socket exists.
            sh(
                "vmm",
                &format!("test -e {} && exec sleep 60", ready.display()),
                None,
                true,
            ),
        ];
        let mut vm = PodVm::launch(
            plan,
            &layout,
            Duration::from_secs(5),
            None,
            test_log(&layout),
        )
        .await
        .unwrap();
        let pids = vm.pids();
        assert_eq!(pids.len(), 2);
        // The pid files hold the processes' pid and start time.
        let recorded = std::fs::read_to_string(layout.pid_dir().join("vmm")).unwrap();
        assert!(recorded.starts_with(&format!("{} ", pids[1].1)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(vm.any_exited().is_none(), "the vmm saw no socket");
        vm.shutdown().await;
        for (_, pid) in pids {
            assert!(!alive(pid), "{pid} still alive");
        }
        assert!(!ready.exists());
        assert!(!layout.pid_dir().exists());
        let log = std::fs::read_to_string(&layout.log_file).unwrap();
        assert!(log.contains("backend-log"));
    }

    #[tokio::test]
    async fn a_process_that_dies_early_fails_the_launch_and_kills_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path());
        let plan = vec![
            sh("first", "exec sleep 60", None, false),
            sh(
                "second",
                "echo no socket for you >&2; exit 3",
                Some(layout.dir.join("never.sock")),
                true,
            ),
        ];
        let err = PodVm::launch(
            plan,
            &layout,
            Duration::from_secs(5),
            None,
            test_log(&layout),
        )
        .await
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("second exited (exit status: 3) before creating"),
            "{message}"
        );
        // The reason the process gave is in the error, not only in the log.
        assert!(message.contains("[second] no socket for you"), "{message}");
        let first_pid: u32 = std::fs::read_to_string(layout.pid_dir().join("first"))
            .map(|text| {
                text.split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap()
            })
            .unwrap_or(0);
        assert_eq!(first_pid, 0, "pid file of the killed process is removed");
        let log = std::fs::read_to_string(&layout.log_file).unwrap();
        assert!(log.contains("no socket for you"));
    }

    #[tokio::test]
    async fn a_missing_socket_times_out_and_a_missing_binary_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path());
        let plan = vec![sh(
            "slow",
            "exec sleep 60",
            Some(layout.dir.join("never.sock")),
            false,
        )];
        let err = PodVm::launch(
            plan,
            &layout,
            Duration::from_millis(100),
            None,
            test_log(&layout),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, LaunchError::NotReady { name: "slow", .. }));

        let plan = vec![ProcessSpec {
            name: "vmm",
            program: "/nonexistent/microvm-vmm".into(),
            args: vec![],
            ready_socket: None,
            is_vmm: true,
            netns: None,
            empty_root: None,
            socket_owner: None,
            cgroup: crate::vm::cgroup::Leaf::Vmm,
        }];
        let err = PodVm::launch(
            plan,
            &layout,
            Duration::from_millis(100),
            None,
            test_log(&layout),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/microvm-vmm"));
    }

    #[tokio::test]
    async fn a_chrooted_process_gets_an_empty_read_only_root() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path());
        let root = layout.dir.join("empty");
        let mut vmm = sh(
            "vmm",
            &format!("test -d {} && exec sleep 60", root.display()),
            None,
            true,
        );
        vmm.empty_root = Some(root.clone());
        let mut vm = PodVm::launch(
            vec![vmm.clone()],
            &layout,
            Duration::from_secs(5),
            None,
            test_log(&layout),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(vm.any_exited().is_none(), "the root was not there");
        vm.shutdown().await;
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

        // A leftover with something in it is refused, not chrooted into.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("host-file"), "x").unwrap();
        let err = PodVm::launch(
            vec![vmm],
            &layout,
            Duration::from_secs(5),
            None,
            test_log(&layout),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, LaunchError::Prepare { ref path, .. } if *path == root),
            "{err}"
        );
    }

    #[tokio::test]
    async fn exit_watch_reports_the_vmm_dying() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path());
        let plan = vec![
            sh("helper", "exec sleep 60", None, false),
            sh("vmm", "sleep 0.2; exit 7", None, true),
        ];
        let mut vm = PodVm::launch(
            plan,
            &layout,
            Duration::from_secs(5),
            None,
            test_log(&layout),
        )
        .await
        .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), vm.exit_watch().first_exit())
            .await
            .unwrap();
        assert_eq!(exit.name, "vmm");
        assert!(exit.is_vmm);
        assert!(exit.status.contains('7'), "{}", exit.status);
        vm.shutdown().await;
    }

    #[test]
    fn kill_recorded_kills_only_the_same_process() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_dir = tmp.path().join("pids");
        std::fs::create_dir_all(&pid_dir).unwrap();
        let mut live = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = live.id();
        let start = process_start_time(pid).unwrap();
        std::fs::write(pid_dir.join("vmm"), format!("{pid} {start}\n")).unwrap();
        // A recycled pid: same number, another start time. Not killed.
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        std::fs::write(
            pid_dir.join("stale"),
            format!("{} {}\n", other.id(), start.wrapping_add(12345)),
        )
        .unwrap();
        std::fs::write(pid_dir.join("garbage"), "not a pid").unwrap();

        // Reap concurrently, as a parent would.
        let reaper = std::thread::spawn(move || live.wait().unwrap());
        let killed = kill_recorded(&pid_dir);
        assert_eq!(killed, ["vmm"]);
        assert!(!reaper.join().unwrap().success());
        assert!(alive(other.id()));
        assert!(!pid_dir.exists());
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn a_zombie_is_not_running() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert!(still_running(me, start));
        assert!(!still_running(me, start + 1), "a recycled pid");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = process_start_time(pid).unwrap();
        // Exited, not yet reaped: a zombie, with its start time intact.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while still_running(pid, start) {
            assert!(std::time::Instant::now() < deadline, "true never exited");
            std::thread::sleep(POLL);
        }
        assert_eq!(process_start_time(pid), Some(start));
        child.wait().unwrap();
    }

    #[test]
    fn start_time_parses_names_with_spaces() {
        let me = std::process::id();
        assert!(process_start_time(me).is_some());
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
