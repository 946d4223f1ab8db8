//! The code a new process runs between clone3 and execve.
//!
//! Hand-written with raw libc calls on purpose: the agent is multi-threaded
//! (tokio), and after clone only async-signal-safe work is allowed in the
//! child. Every string, descriptor and BPF program comes ready-made in the
//! [`ChildPlan`]; nothing here allocates, locks, logs or panics. A failure is
//! sent to the agent as (step, index, errno) over the sync socket, then the
//! child exits with status 127.

use super::plan::{CapabilitySets, ChildPlan, ChildStdio, MountStep, RootfsPlan};
use super::sync::{Message, MessageKind, MESSAGE_LEN};
use std::ffi::CStr;
use std::os::fd::{AsRawFd, RawFd};

/// Declares [`Step`] and its decoding from the number a child reports, from
/// one list, so the two cannot drift apart.
macro_rules! steps {
    ($first:ident, $($rest:ident),* $(,)?) => {
        /// The steps a child reports failures of. The agent turns them into
        /// text ([`super::describe_failure`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Step {
            $first = 1,
            $($rest),*
        }

        impl Step {
            pub fn from_u32(value: u32) -> Option<Self> {
                const ALL: &[Step] = &[Step::$first, $(Step::$rest),*];
                ALL.iter().copied().find(|step| *step as u32 == value)
            }
        }
    };
}

steps!(
    CloseFds,
    Setsid,
    Setns,
    RootPropagation,
    BindRootfs,
    MountMkdir,
    Mount,
    BindRemount,
    MountPropagation,
    Mknod,
    Symlink,
    PivotRoot,
    MaskPath,
    ReadonlyPath,
    ReadonlyRoot,
    Hostname,
    Domainname,
    Sysctl,
    Pty,
    Stdio,
    Rlimit,
    IoPriority,
    ExecLookup,
    WaitForStart,
    Seccomp,
    CapabilityBounding,
    Groups,
    Setgid,
    Setuid,
    Capset,
    AmbientCapabilities,
    NoNewPrivileges,
    Chdir,
    Execve,
    ParentDeathSignal,
    Signals,
);

#[derive(Debug, Clone, Copy)]
struct Failure {
    step: Step,
    index: u32,
    errno: i32,
}

type StepResult = Result<(), Failure>;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Maps a libc return value (-1 on error) to a [`Failure`] for `step`.
fn check(rc: libc::c_long, step: Step, index: usize) -> StepResult {
    if rc < 0 {
        Err(Failure {
            step,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            errno: errno(),
        })
    } else {
        Ok(())
    }
}

fn fail(step: Step, index: usize, errno: i32) -> Failure {
    Failure {
        step,
        index: u32::try_from(index).unwrap_or(u32::MAX),
        errno,
    }
}

/// Runs `plan` in the freshly cloned child. Never returns.
pub fn run(plan: &ChildPlan) -> ! {
    let sync = plan.sync.as_raw_fd();
    let failure = match setup_and_exec(plan) {
        Ok(()) => fail(Step::Execve, 0, libc::EINVAL),
        Err(failure) => failure,
    };
    send_message(
        sync,
        Message {
            kind: MessageKind::Error as u32,
            step: failure.step as u32,
            index: failure.index,
            errno: failure.errno,
        },
    );
    // SAFETY: _exit ends this process without running atexit handlers or
    // destructors, which belong to the agent and must not run here.
    unsafe { libc::_exit(127) }
}

fn setup_and_exec(plan: &ChildPlan) -> StepResult {
    reset_signal_dispositions(plan.namespace_holder)?;
    close_other_fds(plan)?;
    // Die with the agent (host tests; in the VM the agent is PID 1).
    set_parent_death_signal()?;
    // SAFETY: setsid takes no arguments; a new session lets the process
    // take a controlling terminal.
    let rc = unsafe { libc::setsid() };
    check(rc.into(), Step::Setsid, 0)?;
    for (index, (fd, nstype)) in plan.setns.iter().enumerate() {
        // SAFETY: `fd` is a namespace or pidfd descriptor owned by the plan.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), *nstype) };
        check(rc.into(), Step::Setns, index)?;
    }
    if plan.namespace_holder {
        hold_namespaces();
    }
    // Sysctls before the rootfs: /proc/sys is still the agent's (writable)
    // here, and a write under it reaches the namespaces of the writer, which
    // are now the container's. In the container's own /proc, /proc/sys is a
    // read-only path by the time the rootfs is done.
    for (index, (path, value)) in plan.sysctls.iter().enumerate() {
        write_file(path, value.as_bytes()).map_err(|errno| fail(Step::Sysctl, index, errno))?;
    }
    if let Some(rootfs) = &plan.rootfs {
        setup_rootfs(rootfs)?;
    }
    if let Some(hostname) = &plan.hostname {
        // SAFETY: pointer and length describe the plan's C string.
        let rc = unsafe { libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()) };
        check(rc.into(), Step::Hostname, 0)?;
    }
    if let Some(domainname) = &plan.domainname {
        // SAFETY: pointer and length describe the plan's C string.
        let rc = unsafe { libc::setdomainname(domainname.as_ptr(), domainname.as_bytes().len()) };
        check(rc.into(), Step::Domainname, 0)?;
    }
    setup_stdio(plan)?;
    for (index, (resource, limit)) in plan.rlimits.iter().enumerate() {
        // SAFETY: `limit` is a valid rlimit; a NULL old-limit pointer is
        // allowed. pid 0 is this process.
        let rc = unsafe {
            libc::prlimit(
                0,
                *resource as libc::__rlimit_resource_t,
                limit,
                std::ptr::null_mut(),
            )
        };
        check(rc.into(), Step::Rlimit, index)?;
    }
    if let Some(priority) = plan.io_priority {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        // SAFETY: ioprio_set takes three integers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0 as libc::c_long,
                libc::c_long::from(priority),
            )
        };
        check(rc, Step::IoPriority, 0)?;
    }
    if let Some(umask) = plan.umask {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(umask) };
    }
    let executable = find_executable(plan)?;

    if plan.wait_for_start {
        send_message(
            plan.sync.as_raw_fd(),
            Message {
                kind: MessageKind::Ready as u32,
                step: 0,
                index: 0,
                errno: 0,
            },
        );
        wait_for_start(plan.sync.as_raw_fd())?;
    }

    // Without no_new_privileges, installing a filter needs CAP_SYS_ADMIN,
    // which the process may be about to drop (runc does the same).
    if !plan.no_new_privileges {
        install_seccomp(plan)?;
    }
    if let Some(caps) = &plan.capabilities {
        drop_bounding_set(caps, plan.last_capability)?;
    }
    switch_user(plan)?;
    if let Some(caps) = &plan.capabilities {
        apply_capabilities(caps, plan.last_capability)?;
    }
    // A credential change clears the parent death signal.
    set_parent_death_signal()?;
    // SAFETY: chdir reads the plan's C string.
    let rc = unsafe { libc::chdir(plan.cwd.as_ptr()) };
    check(rc.into(), Step::Chdir, 0)?;
    if plan.no_new_privileges {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        check(rc.into(), Step::NoNewPrivileges, 0)?;
        install_seccomp(plan)?;
    }
    unblock_signals()?;
    // SAFETY: path, argv and envp are NUL-terminated strings and
    // NULL-terminated arrays owned by the plan.
    unsafe { libc::execve(executable.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
    Err(fail(Step::Execve, 0, errno()))
}

/// Every handler the agent installed goes back to default; the signal mask
/// stays as the spawner thread had it (all blocked) until just before
/// execve, so no handler of the agent can run in here.
fn reset_signal_dispositions(namespace_holder: bool) -> StepResult {
    for signal in 1..=libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let disposition = if namespace_holder && signal == libc::SIGCHLD {
            libc::SIG_IGN
        } else {
            libc::SIG_DFL
        };
        // SAFETY: signal() with SIG_DFL/SIG_IGN installs no handler code.
        // Errors (for the few signals glibc reserves) are harmless.
        unsafe { libc::signal(signal, disposition) };
    }
    Ok(())
}

fn unblock_signals() -> StepResult {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before
    // use; sigprocmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()).into(),
            Step::Signals,
            0,
        )
    }
}

/// Closes every descriptor except 0-2 and the plan's: descriptors other
/// threads of the agent opened (another process's pipes) must not stay open
/// here while this process waits for Start.
fn close_other_fds(plan: &ChildPlan) -> StepResult {
    let mut kept = [0 as RawFd; 16];
    let mut count = 0;
    kept[count] = plan.sync.as_raw_fd();
    count += 1;
    for (fd, _) in &plan.setns {
        if count < kept.len() {
            kept[count] = fd.as_raw_fd();
            count += 1;
        }
    }
    if let ChildStdio::Pipes {
        stdin,
        stdout,
        stderr,
    } = &plan.stdio
    {
        for fd in [stdin, stdout, stderr] {
            if count < kept.len() {
                kept[count] = fd.as_raw_fd();
                count += 1;
            }
        }
    }
    let kept = &mut kept[..count];
    kept.sort_unstable();
    let mut next: u32 = 3;
    for fd in kept.iter() {
        let Ok(fd) = u32::try_from(*fd) else { continue };
        if fd > next {
            close_range(next, fd - 1)?;
        }
        next = next.max(fd.saturating_add(1));
    }
    close_range(next, u32::MAX)
}

fn close_range(first: u32, last: u32) -> StepResult {
    // SAFETY: close_range only closes descriptors of this process.
    check(
        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) },
        Step::CloseFds,
        0,
    )
}

fn set_parent_death_signal() -> StepResult {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into(),
        Step::ParentDeathSignal,
        0,
    )
}

/// The sandbox's namespace holder: sleeps until killed.
fn hold_namespaces() -> ! {
    loop {
        // SAFETY: pause takes no arguments. Every signal but SIGKILL is
        // blocked, so this sleeps until the agent kills the holder.
        unsafe { libc::pause() };
    }
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> libc::c_long {
    let ptr = |value: Option<&CStr>| value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is NULL or a NUL-terminated string of the plan
    // (or a literal) that outlives the call.
    unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    }
    .into()
}

fn mkdir(path: &CStr) -> Result<(), i32> {
    // SAFETY: mkdir reads a NUL-terminated path.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } == 0 {
        return Ok(());
    }
    match errno() {
        libc::EEXIST => Ok(()),
        other => Err(other),
    }
}

fn setup_rootfs(rootfs: &RootfsPlan) -> StepResult {
    check(
        mount(None, c"/", None, rootfs.initial_propagation, None),
        Step::RootPropagation,
        0,
    )?;
    check(
        mount(
            Some(&rootfs.root),
            &rootfs.root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        ),
        Step::BindRootfs,
        0,
    )?;
    for (index, step) in rootfs.mounts.iter().enumerate() {
        mount_step(step, index)?;
    }
    for (index, device) in rootfs.devices.iter().enumerate() {
        for dir in &device.mkdirs {
            mkdir(dir).map_err(|errno| fail(Step::Mknod, index, errno))?;
        }
        // SAFETY: mknod and chown read the plan's path.
        unsafe {
            libc::unlink(device.path.as_ptr());
            check(
                libc::mknod(device.path.as_ptr(), device.mode, device.device).into(),
                Step::Mknod,
                index,
            )?;
            check(
                libc::chown(device.path.as_ptr(), device.uid, device.gid).into(),
                Step::Mknod,
                index,
            )?;
            // mknod applies the umask; the spec's mode is exact.
            check(
                libc::chmod(device.path.as_ptr(), device.mode & 0o7777).into(),
                Step::Mknod,
                index,
            )?;
        }
    }
    for (index, (target, link)) in rootfs.symlinks.iter().enumerate() {
        // SAFETY: unlink and symlink read the plan's paths.
        unsafe {
            libc::unlink(link.as_ptr());
            check(
                libc::symlink(target.as_ptr(), link.as_ptr()).into(),
                Step::Symlink,
                index,
            )?;
        }
    }
    pivot_root(&rootfs.root)?;
    if let Some(propagation) = rootfs.final_propagation {
        check(
            mount(None, c"/", None, propagation, None),
            Step::RootPropagation,
            1,
        )?;
    }
    for (index, path) in rootfs.masked_paths.iter().enumerate() {
        mask_path(path).map_err(|errno| fail(Step::MaskPath, index, errno))?;
    }
    for (index, path) in rootfs.readonly_paths.iter().enumerate() {
        readonly_path(path).map_err(|errno| fail(Step::ReadonlyPath, index, errno))?;
    }
    if rootfs.readonly_root {
        remount_readonly(c"/").map_err(|errno| fail(Step::ReadonlyRoot, 0, errno))?;
    }
    Ok(())
}

fn mount_step(step: &MountStep, index: usize) -> StepResult {
    for dir in &step.mkdirs {
        mkdir(dir).map_err(|errno| fail(Step::MountMkdir, index, errno))?;
    }
    if let Some(file) = &step.create_file {
        // SAFETY: open reads the plan's path; the descriptor is closed at once.
        let fd = unsafe {
            libc::open(
                file.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            let errno = errno();
            // A target that is already there (e.g. a directory) is fine.
            if errno != libc::EISDIR && errno != libc::EEXIST {
                return Err(fail(Step::MountMkdir, index, errno));
            }
        } else {
            // SAFETY: `fd` was just opened here.
            unsafe { libc::close(fd) };
        }
    }
    check(
        mount(
            step.source.as_deref(),
            &step.target,
            step.fstype.as_deref(),
            step.flags,
            step.data.as_deref(),
        ),
        Step::Mount,
        index,
    )?;
    if let Some(flags) = step.bind_remount_flags {
        check(
            mount(None, &step.target, None, flags, None),
            Step::BindRemount,
            index,
        )?;
    }
    for propagation in &step.propagation {
        check(
            mount(None, &step.target, None, *propagation, None),
            Step::MountPropagation,
            index,
        )?;
    }
    Ok(())
}

/// pivot_root(".", ".") and a lazy unmount of the old root, as runc does:
/// no directory for the old root is needed inside the container.
fn pivot_root(root: &CStr) -> StepResult {
    let pivot_failed = |errno| fail(Step::PivotRoot, 0, errno);
    // SAFETY: plain syscalls on NUL-terminated literals and the plan's
    // path; both descriptors are closed before returning.
    unsafe {
        let old_root = libc::open(
            c"/".as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if old_root < 0 {
            return Err(pivot_failed(errno()));
        }
        let new_root = libc::open(
            root.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if new_root < 0 {
            let errno = errno();
            libc::close(old_root);
            return Err(pivot_failed(errno));
        }
        let result = (|| {
            if libc::fchdir(new_root) < 0
                || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) < 0
                || libc::fchdir(old_root) < 0
            {
                return Err(errno());
            }
            // Keep the unmount below from reaching the agent's mounts.
            if mount(None, c".", None, libc::MS_SLAVE | libc::MS_REC, None) < 0
                || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) < 0
                || libc::chdir(c"/".as_ptr()) < 0
            {
                return Err(errno());
            }
            Ok(())
        })();
        libc::close(old_root);
        libc::close(new_root);
        result.map_err(pivot_failed)
    }
}

fn is_directory(path: &CStr) -> Result<bool, i32> {
    // SAFETY: `stat` is a zeroed local the kernel fills in.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::stat(path.as_ptr(), &mut stat) < 0 {
            return Err(errno());
        }
        Ok(stat.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }
}

/// Masked path: a read-only empty tmpfs over a directory, /dev/null over
/// anything else. A path that does not exist needs no mask.
fn mask_path(path: &CStr) -> Result<(), i32> {
    let directory = match is_directory(path) {
        Ok(directory) => directory,
        Err(libc::ENOENT) => return Ok(()),
        Err(errno) => return Err(errno),
    };
    let rc = if directory {
        mount(Some(c"tmpfs"), path, Some(c"tmpfs"), libc::MS_RDONLY, None)
    } else {
        mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None)
    };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn readonly_path(path: &CStr) -> Result<(), i32> {
    if mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None) < 0 {
        return match errno() {
            libc::ENOENT => Ok(()),
            errno => Err(errno),
        };
    }
    remount_readonly(path)
}

/// Remounts the bind mount at `path` read-only, keeping its other flags
/// (a bind remount clears the flags it is not given).
fn remount_readonly(path: &CStr) -> Result<(), i32> {
    const KEPT: libc::c_ulong = libc::ST_NOSUID
        | libc::ST_NODEV
        | libc::ST_NOEXEC
        | libc::ST_SYNCHRONOUS
        | libc::ST_MANDLOCK
        | libc::ST_NOATIME
        | libc::ST_NODIRATIME
        | libc::ST_RELATIME;
    // SAFETY: `stats` is a zeroed local the kernel fills in.
    let current = unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stats) < 0 {
            return Err(errno());
        }
        stats.f_flag & KEPT
    };
    // The ST_* bits equal the MS_* bits they correspond to.
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | current;
    if mount(None, path, None, flags, None) < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn write_file(path: &CStr, data: &[u8]) -> Result<(), i32> {
    // SAFETY: open/write/close on the plan's path and data; the descriptor
    // is closed on every path.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let written = libc::write(fd, data.as_ptr().cast(), data.len());
        let result = if written < 0 { Err(errno()) } else { Ok(()) };
        libc::close(fd);
        result
    }
}

fn setup_stdio(plan: &ChildPlan) -> StepResult {
    match &plan.stdio {
        ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            for (index, (fd, target)) in [(stdin, 0), (stdout, 1), (stderr, 2)]
                .into_iter()
                .enumerate()
            {
                // SAFETY: dup2 onto 0-2; the plan's descriptors are all >= 3.
                let rc = unsafe { libc::dup2(fd.as_raw_fd(), target) };
                check(rc.into(), Step::Stdio, index)?;
            }
            Ok(())
        }
        ChildStdio::Pty { rows, columns } => setup_pty(plan.sync.as_raw_fd(), *rows, *columns),
    }
}

/// Opens a pty in the process's own /dev/pts, sends the master to the
/// agent and makes the slave the controlling terminal and stdio.
fn setup_pty(sync: RawFd, rows: u16, columns: u16) -> StepResult {
    // SAFETY: ioctls on descriptors opened here, with pointers to locals;
    // every descriptor is closed or dup'ed onto 0-2 before returning.
    unsafe {
        let master = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        check(master.into(), Step::Pty, 0)?;
        let unlock: libc::c_int = 0;
        let slave = if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) < 0 {
            -1
        } else {
            libc::ioctl(
                master,
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if slave < 0 {
            let errno = errno();
            libc::close(master);
            return Err(fail(Step::Pty, 1, errno));
        }
        if rows > 0 && columns > 0 {
            let size = libc::winsize {
                ws_row: rows,
                ws_col: columns,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            libc::ioctl(slave, libc::TIOCSWINSZ, &size);
        }
        let sent = send_fd(
            sync,
            Message {
                kind: MessageKind::Pty as u32,
                step: 0,
                index: 0,
                errno: 0,
            },
            master,
        );
        libc::close(master);
        if let Err(errno) = sent {
            libc::close(slave);
            return Err(fail(Step::Pty, 2, errno));
        }
        for target in 0..=2 {
            if libc::dup2(slave, target) < 0 {
                let errno = errno();
                libc::close(slave);
                return Err(fail(Step::Pty, 3, errno));
            }
        }
        libc::close(slave);
        check(libc::ioctl(0, libc::TIOCSCTTY, 0).into(), Step::Pty, 4)
    }
}

fn send_message(sync: RawFd, message: Message) {
    let bytes = message.encode();
    // SAFETY: sends a local buffer; failure leaves nothing to clean up (the
    // agent then sees the socket close without a message).
    unsafe { libc::send(sync, bytes.as_ptr().cast(), MESSAGE_LEN, libc::MSG_NOSIGNAL) };
}

/// sendmsg with one descriptor in SCM_RIGHTS, on a stack buffer.
fn send_fd(sync: RawFd, message: Message, fd: RawFd) -> Result<(), i32> {
    let bytes = message.encode();
    // Room for one cmsghdr and one int, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: `msghdr` points at locals that outlive the call; the CMSG_*
    // helpers stay inside `control`, which is large enough for one fd
    // (CMSG_SPACE(4) = 24 bytes on 64-bit Linux).
    unsafe {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: MESSAGE_LEN,
        };
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        if cmsg.is_null() {
            return Err(libc::EINVAL);
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sync, &header, libc::MSG_NOSIGNAL) < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

/// Blocks until the agent sends Start. End-of-file means the agent gave up
/// on this container.
fn wait_for_start(sync: RawFd) -> StepResult {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads one byte into a local.
        let read = unsafe { libc::recv(sync, (&mut byte as *mut u8).cast(), 1, 0) };
        if read == 1 {
            return Ok(());
        }
        if read == 0 {
            // SAFETY: see `run`.
            unsafe { libc::_exit(0) };
        }
        let errno = errno();
        if errno != libc::EINTR {
            return Err(fail(Step::WaitForStart, 0, errno));
        }
    }
}

/// The first candidate that is an executable regular file. Relative
/// candidates (resolved against cwd later) are taken as they are.
fn find_executable(plan: &ChildPlan) -> Result<&CStr, Failure> {
    let mut last_errno = libc::ENOENT;
    for candidate in &plan.exec_candidates {
        if !candidate.as_bytes().starts_with(b"/") {
            return Ok(candidate);
        }
        match is_directory(candidate) {
            Ok(false) => {}
            Ok(true) => {
                last_errno = libc::EACCES;
                continue;
            }
            Err(errno) => {
                if errno != libc::ENOENT {
                    last_errno = errno;
                }
                continue;
            }
        }
        // SAFETY: access reads the plan's path.
        if unsafe { libc::access(candidate.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
        last_errno = errno();
    }
    Err(fail(Step::ExecLookup, 0, last_errno))
}

fn install_seccomp(plan: &ChildPlan) -> StepResult {
    for (index, program) in plan.seccomp.iter().enumerate() {
        let Ok(len) = u16::try_from(program.filter.len()) else {
            return Err(fail(Step::Seccomp, index, libc::E2BIG));
        };
        let fprog = libc::sock_fprog {
            len,
            filter: program.filter.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` points at the plan's filter for the duration of
        // the call; the kernel copies the program.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                plan.seccomp_flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        check(rc, Step::Seccomp, index)?;
    }
    Ok(())
}

fn drop_bounding_set(caps: &CapabilitySets, last: u32) -> StepResult {
    for cap in 0..=last.min(63) {
        if caps.bounding & (1u64 << cap) == 0 {
            // SAFETY: prctl with integer arguments.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            // EINVAL: the kernel does not know this capability.
            if rc < 0 && errno() != libc::EINVAL {
                return Err(fail(Step::CapabilityBounding, cap as usize, errno()));
            }
        }
    }
    Ok(())
}

/// Raw syscalls, not glibc's setgroups/setresgid/setresuid: those
/// broadcast the change to every thread glibc believes the process has
/// (SIGSETXID) and wait for answers. This child is a clone of one thread of
/// the agent, but glibc still lists the agent's threads; one whose tid
/// equals this process's pid in its new PID namespace (the agent's main
/// thread, tid 1, when the agent is PID 1) makes glibc signal itself and
/// wait forever.
fn switch_user(plan: &ChildPlan) -> StepResult {
    let credentials = &plan.credentials;
    let uid = libc::c_long::from(credentials.uid);
    let gid = libc::c_long::from(credentials.gid);
    // SAFETY: setgroups reads `additional_gids` (length and pointer of the
    // plan's vector); the other calls take integers.
    unsafe {
        check(
            libc::syscall(
                libc::SYS_setgroups,
                credentials.additional_gids.len(),
                credentials.additional_gids.as_ptr(),
            ),
            Step::Groups,
            0,
        )?;
        check(
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
            Step::Setgid,
            0,
        )?;
        // Keep the permitted set across the uid change; capset below
        // reduces it to the spec's.
        if plan.capabilities.is_some() {
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        }
        check(
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
            Step::Setuid,
            0,
        )?;
        if plan.capabilities.is_some() {
            libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn apply_capabilities(caps: &CapabilitySets, last: u32) -> StepResult {
    let low = |mask: u64| (mask & 0xffff_ffff) as u32;
    let high = |mask: u64| (mask >> 32) as u32;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: low(caps.effective),
            permitted: low(caps.permitted),
            inheritable: low(caps.inheritable),
        },
        CapData {
            effective: high(caps.effective),
            permitted: high(caps.permitted),
            inheritable: high(caps.inheritable),
        },
    ];
    // SAFETY: capset reads the header and the two-element data array.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    check(rc, Step::Capset, 0)?;
    // SAFETY: prctl with integer arguments.
    unsafe {
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
            .into(),
            Step::AmbientCapabilities,
            0,
        )?;
        for cap in 0..=last.min(63) {
            if caps.ambient & (1u64 << cap) != 0 {
                check(
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                        0,
                        0,
                    )
                    .into(),
                    Step::AmbientCapabilities,
                    cap as usize,
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_through_their_numbers() {
        for value in 1..=36 {
            let step = Step::from_u32(value).expect("every number in range is a step");
            assert_eq!(step as u32, value);
        }
        assert_eq!(Step::from_u32(0), None);
        assert_eq!(Step::from_u32(37), None);
    }
}
