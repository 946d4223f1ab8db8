//! Starting processes and collecting their exits.
//!
//! All clones happen on one dedicated thread (the spawner) with every signal
//! blocked, so:
//! - a child never runs a signal handler of the agent before execve;
//! - descriptors meant for one child are closed in the agent right after
//!   its clone, before the next clone can copy them;
//! - joining a PID namespace (which only affects children of the calling
//!   thread) is done and undone on that thread alone.
//!
//! The [`Reaper`] collects every exit with waitpid(-1): as PID 1 the agent
//! inherits orphans and must reap them. The spawner registers a new pid
//! while holding the reaper's lock, so an exit cannot be collected before
//! someone waits for it.

pub mod child;
pub mod plan;
pub mod sync;

use plan::ChildPlan;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit status, or 128 + the signal number.
    pub code: i32,
    pub signal: Option<i32>,
    pub at: SystemTime,
}

impl ProcessExit {
    pub fn from_wait_status(status: libc::c_int, at: SystemTime) -> Self {
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            Self {
                code: 128 + signal,
                signal: Some(signal),
                at,
            }
        } else {
            Self {
                code: libc::WEXITSTATUS(status),
                signal: None,
                at,
            }
        }
    }
}

type Waiters = HashMap<libc::pid_t, oneshot::Sender<ProcessExit>>;

/// Collects the exit of every child (and, as PID 1 or subreaper, every
/// orphan) and hands registered ones to their waiter.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<Waiters>,
    orphans_reaped: std::sync::atomic::AtomicU64,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reaps on every SIGCHLD until the runtime ends.
    pub fn start(self: &Arc<Self>) -> io::Result<tokio::task::JoinHandle<()>> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let reaper = Arc::clone(self);
        Ok(tokio::spawn(async move {
            loop {
                reaper.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        crate::lock::lock(&self.waiters)
    }

    /// Collects every exited child without blocking.
    pub fn reap_all(&self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                // 0: children left, none exited; -1: ECHILD (none) or EINTR,
                // either way the next SIGCHLD brings us back.
                return;
            }
            let exit = ProcessExit::from_wait_status(status, SystemTime::now());
            match self.lock().remove(&pid) {
                Some(waiter) => {
                    // The waiter may be gone (container removed); fine.
                    let _ = waiter.send(exit);
                }
                None => {
                    self.orphans_reaped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(pid, code = exit.code, "reaped an orphan");
                }
            }
        }
    }

    pub fn orphans_reaped(&self) -> u64 {
        self.orphans_reaped
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A started process.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub exit: oneshot::Receiver<ProcessExit>,
}

struct Job {
    plan: ChildPlan,
    reply: oneshot::Sender<io::Result<Spawned>>,
}

pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Spawner {
    pub fn start(reaper: Arc<Reaper>) -> io::Result<Self> {
        let own_pid_namespace = std::fs::File::open("/proc/thread-self/ns/pid")?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || spawner_thread(&queue, &reaper, own_pid_namespace.into()))?;
        Ok(Self { jobs })
    }

    pub async fn spawn(&self, plan: ChildPlan) -> io::Result<Spawned> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Job { plan, reply })
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        result
            .await
            .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
    }
}

fn spawner_thread(
    queue: &std::sync::mpsc::Receiver<Job>,
    reaper: &Reaper,
    own_pid_namespace: OwnedFd,
) {
    // SAFETY: `all` is a local sigset filled before use; blocking signals
    // on this thread only changes which thread the kernel delivers to.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    while let Ok(job) = queue.recv() {
        let result = clone_child(&job.plan, reaper, &own_pid_namespace);
        // Close the child's ends of its descriptors before the next clone.
        drop(job.plan);
        let _ = job.reply.send(result);
    }
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn clone_child(
    plan: &ChildPlan,
    reaper: &Reaper,
    own_pid_namespace: &OwnedFd,
) -> io::Result<Spawned> {
    if let Some(pid_namespace) = &plan.join_pid_namespace {
        // SAFETY: setns on a namespace descriptor owned by the plan.
        if unsafe { libc::setns(pid_namespace.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone_args is plain integers; zero is "unset" for each.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = plan.new_namespaces | CLONE_PIDFD;
    args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Some(cgroup) = &plan.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cgroup.as_raw_fd() as u64;
    }

    let mut waiters = reaper.lock();
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of
    // this thread and memory. The child only runs `child::run`, which uses
    // async-signal-safe syscalls on the plan and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid == 0 {
        child::run(plan);
    }
    let clone_error = io::Error::last_os_error();
    let (exit_tx, exit_rx) = oneshot::channel();
    let pid = libc::pid_t::try_from(pid).unwrap_or(-1);
    if pid > 0 {
        waiters.insert(pid, exit_tx);
    }
    drop(waiters);

    if plan.join_pid_namespace.is_some() {
        // SAFETY: setns back to this thread's own PID namespace.
        if unsafe { libc::setns(own_pid_namespace.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            tracing::error!(
                "spawner cannot return to its PID namespace: {}",
                io::Error::last_os_error()
            );
        }
    }
    if pid <= 0 {
        return Err(clone_error);
    }
    // SAFETY: clone3 stored a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Spawned {
        pid,
        pidfd,
        exit: exit_rx,
    })
}

/// Sends `signal` through a pidfd (no pid reuse race).
pub fn pidfd_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let now = SystemTime::now();
        // exited with 3
        assert_eq!(ProcessExit::from_wait_status(3 << 8, now).code, 3);
        // killed by SIGKILL (9)
        let killed = ProcessExit::from_wait_status(9, now);
        assert_eq!(killed.code, 137);
        assert_eq!(killed.signal, Some(9));
    }
}
