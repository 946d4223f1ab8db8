//! Per-thread seccomp filters, built with `seccompiler`.
//!
//! Three kinds of thread, three allow-lists, each the system calls that kind
//! was seen making (`strace -f` on probe-guest runs with vsock, blk, net, the
//! API, pause/resume and teardown) plus what glibc and Rust need to allocate,
//! block on a futex, take a signal and exit:
//! - `vcpu`: KVM_RUN, the device models' MMIO/PIO work (serial writes,
//!   eventfd kicks, queue-event dups at activation, and the vhost-user
//!   requests a virtio-fs activation or reset makes: sendmsg with SCM_RIGHTS
//!   and recvmsg on the back-end socket, shutdown when it fails), exit.
//! - `vmm`: the controller and event loop (epoll, device back-ends, vCPU kicks)
//!   and the teardown after the VM stops (closing, unmapping, unlinking its
//!   sockets).
//! - `api`: the accept thread and its per-connection threads (which inherit
//!   its filter): socket I/O, channels, and spawning threads with `clone`.
//!
//! Anything else kills the whole process (SECCOMP_RET_KILL_PROCESS, seen by
//! the parent as SIGSYS). Filters are installed by each thread for itself
//! once setup is over: vCPU threads before their first KVM_RUN, the
//! controller right after it spawned them, the API thread when it starts.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {thread} seccomp filter: {source}")]
    Build {
        thread: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {thread} seccomp filter: {source}")]
    Install {
        thread: &'static str,
        source: seccompiler::Error,
    },
}

/// Which allow-list a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Vmm,
    Api,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Vmm => "vmm",
            Self::Api => "api",
        }
    }
}

/// `_IO(KVMIO, 0x80)`; kvm-ioctls keeps its request numbers private.
pub const KVM_RUN: u64 = 0xae80;

/// The compiled filters for every thread kind. Cheap to clone. Built once at
/// start-up, so a build error is a start-up error, not a vCPU failure.
#[derive(Clone)]
pub struct SeccompFilters(Arc<BTreeMap<&'static str, Vec<BpfProgram>>>);

impl std::fmt::Debug for SeccompFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SeccompFilters")
            .field(&self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SeccompFilters {
    /// `kick_signal` is the signal the controller sends vCPU threads to make
    /// KVM_RUN return; the controller may send it and nothing else.
    pub fn build(kick_signal: i32) -> Result<Self, SeccompError> {
        let mut map = BTreeMap::new();
        for kind in [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api] {
            // The allow-list goes last: it forbids the prctl and seccomp
            // calls that installing another filter would make.
            let mut programs = Vec::new();
            if kind == ThreadKind::Api {
                programs.push(clone3_enosys()?);
            }
            programs.push(compile(kind, allow_list(kind, kick_signal)?)?);
            map.insert(kind.name(), programs);
        }
        Ok(Self(Arc::new(map)))
    }

    /// Installs `kind`'s filter on the calling thread (and so on the threads
    /// it spawns later). Cannot be undone.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        for program in self.0.get(kind.name()).into_iter().flatten() {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                thread: kind.name(),
                source,
            })?;
        }
        Ok(())
    }
}

fn build_err(kind: ThreadKind) -> impl Fn(seccompiler::BackendError) -> SeccompError {
    move |source| SeccompError::Build {
        thread: kind.name(),
        source,
    }
}

fn compile(
    kind: ThreadKind,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build_err(kind))?;
    BpfProgram::try_from(filter).map_err(build_err(kind))
}

/// clone3 passes its flags in memory, where seccomp cannot look. Failing it
/// with ENOSYS makes glibc fall back to clone, whose flags the API filter
/// checks. Stacked under the allow-list (ERRNO beats ALLOW).
fn clone3_enosys() -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(build_err(ThreadKind::Api))?;
    BpfProgram::try_from(filter).map_err(build_err(ThreadKind::Api))
}

/// One rule: every condition must hold.
fn rule(
    kind: ThreadKind,
    conditions: &[(u8, SeccompCmpOp, u64)],
) -> Result<SeccompRule, SeccompError> {
    let conditions = conditions
        .iter()
        .map(|(arg, op, value)| {
            SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build_err(kind))?;
    SeccompRule::new(conditions).map_err(build_err(kind))
}

/// Any of `values` in argument `arg`.
fn arg_in(kind: ThreadKind, arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|v| rule(kind, &[(arg, SeccompCmpOp::Eq, *v)]))
        .collect()
}

/// What every thread does just by being a Rust thread on glibc: allocate,
/// wait on futexes, take signals, log to stderr, exit (or abort).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// fcntl commands: non-blocking flags and `try_clone` (F_DUPFD_CLOEXEC).
const FCNTL_CMDS: &[u64] = &[
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

fn allow_list(
    kind: ThreadKind,
    kick_signal: i32,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(libc::SYS_fcntl, arg_in(kind, 1, FCNTL_CMDS)?);
    // abort() raises SIGABRT; the controller also kicks vCPUs.
    let mut signals = vec![libc::SIGABRT as u64];
    if kind == ThreadKind::Vmm {
        signals.push(kick_signal as u64);
    }
    rules.insert(libc::SYS_tgkill, arg_in(kind, 2, &signals)?);
    let unconditional: &[i64] = match kind {
        // vhost-user requests at virtio-fs activation and reset, and the
        // shutdown of the back-end socket when one fails.
        ThreadKind::Vcpu => &[libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_shutdown],
        ThreadKind::Vmm => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_readv,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            // Teardown: removing our own socket files.
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
        ThreadKind::Api => &[
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            // Thread start-up in glibc and Rust std.
            libc::SYS_clone3,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_sched_getaffinity,
        ],
    };
    rules.extend(unconditional.iter().map(|&nr| (nr, Vec::new())));
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, arg_in(kind, 1, &[KVM_RUN])?);
        }
        ThreadKind::Vmm => {
            // std's set_nonblocking on accepted vsock streams.
            rules.insert(libc::SYS_ioctl, arg_in(kind, 1, &[libc::FIONBIO])?);
            // Guest connections to host ports are unix stream sockets.
            rules.insert(
                libc::SYS_socket,
                vec![rule(kind, &[(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])?],
            );
        }
        ThreadKind::Api => {
            // Threads only: no new processes from the API side.
            let thread = libc::CLONE_THREAD as u64;
            rules.insert(
                libc::SYS_clone,
                vec![rule(kind, &[(0, SeccompCmpOp::MaskedEq(thread), thread)])?],
            );
            rules.insert(
                libc::SYS_prctl,
                arg_in(kind, 0, &[libc::PR_SET_NAME as u64])?,
            );
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_for_every_thread_kind() {
        let filters = SeccompFilters::build(libc::SIGRTMIN()).unwrap();
        for kind in [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api] {
            let programs = filters.0.get(kind.name()).unwrap();
            assert!(!programs.is_empty() && !programs[0].is_empty());
        }
        // The API thread gets the clone3 -> ENOSYS filter on top.
        assert_eq!(filters.0["api"].len(), 2);
    }

    #[test]
    fn allow_lists_differ_where_they_should() {
        let vcpu = allow_list(ThreadKind::Vcpu, 34).unwrap();
        let vmm = allow_list(ThreadKind::Vmm, 34).unwrap();
        let api = allow_list(ThreadKind::Api, 34).unwrap();
        assert!(!vcpu.contains_key(&libc::SYS_socket));
        assert!(!vcpu.contains_key(&libc::SYS_epoll_wait));
        assert!(vmm.contains_key(&libc::SYS_epoll_wait));
        assert!(!vmm.contains_key(&libc::SYS_clone));
        assert!(!vmm.contains_key(&libc::SYS_clone3));
        assert!(api.contains_key(&libc::SYS_clone));
        for list in [&vcpu, &vmm, &api] {
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_fork,
                libc::SYS_mount,
            ] {
                assert!(!list.contains_key(&forbidden), "{forbidden}");
            }
        }
    }
}
