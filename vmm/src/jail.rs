//! The jail (`microvm-vmm --jail DIR ...`), after Firecracker's jailer.
//!
//! The invoked process stays on the host as a small supervisor; the VMM runs
//! in a child:
//! 1. The supervisor checks the config, creates `DIR` (which must not exist),
//!    writes the config rewritten to jail paths into `DIR/vm/config.json`,
//!    creates the cgroup(s) and writes the limits, and unshares a PID
//!    namespace, then forks.
//! 2. The child (PID 1 of that namespace) joins the cgroup, unshares a mount
//!    namespace (made private first, so nothing propagates back to the host),
//!    bind-mounts into `DIR` only what this VM needs: the kernel, initrd and
//!    disks (read-only where they are), the console file, the directories of
//!    its sockets, `/proc/meminfo`, device nodes for /dev/kvm,
//!    /dev/urandom and (with net) /dev/net/tun, and, read-only, the VMM
//!    binary with the shared libraries it is running with. It then
//!    pivot_roots into `DIR`, drops to `--uid`/`--gid`, closes every fd but
//!    0-2, and execs the VMM with an empty environment:
//!    `/microvm-vmm --config /vm/config.json [--api-sock ...]`.
//! 3. The supervisor forwards SIGTERM/SIGINT/SIGHUP to the child, waits,
//!    removes `DIR` and the cgroup, and exits with the child's status
//!    (128 + N if signal N killed it). A supervisor killed outright takes
//!    the VMM with it (parent-death signal), but leaves `DIR` and the
//!    cgroup to its caller: stop it with SIGTERM.
//!
//! `DIR` is only ever removed from the supervisor's mount namespace, where the
//! bind mounts never existed, so removing it cannot touch the files that
//! were mounted into the jail.

use crate::config::VmConfig;
use microvm_host::cgroup::{Cgroup, CgroupError, Hierarchies};
use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail directory {0} already exists (it must be new; it is removed on exit)")]
    DirExists(PathBuf),
    #[error("jail directory {0} must be an absolute path with a final name")]
    BadDir(PathBuf),
    #[error("--cgroup {0:?}: expected FILE=VALUE, e.g. memory.limit_in_bytes=536870912")]
    BadCgroupArg(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{op} failed: {source}")]
    Sys { op: &'static str, source: io::Error },
    #[error("the VMM binary has no readable ELF interpreter: {0}")]
    Interpreter(String),
    #[error("socket path {0} has no parent directory")]
    SocketPath(PathBuf),
    #[error("the jail supervisor exited before the VMM started")]
    SupervisorGone,
    #[error("the jail's cgroup")]
    Cgroup(#[source] CgroupError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn sys(op: &'static str) -> JailError {
    JailError::Sys {
        op,
        source: io::Error::last_os_error(),
    }
}

/// What the shim (or a user) asks for.
#[derive(Debug, Clone)]
pub struct JailOptions {
    pub dir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `(file, value)`, e.g. `("memory.limit_in_bytes", "536870912")`.
    pub cgroups: Vec<(String, String)>,
    /// The cgroup is `<parent>/<jail dir name>` in each hierarchy.
    pub cgroup_parent: String,
    pub api_sock: Option<PathBuf>,
    pub no_seccomp: bool,
    pub log_level: String,
}

pub fn parse_cgroup_arg(arg: &str) -> Result<(String, String), JailError> {
    let bad = || JailError::BadCgroupArg(arg.to_owned());
    let (file, value) = arg.split_once('=').ok_or_else(bad)?;
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    if !file.contains('.') || file.starts_with('.') || !file.chars().all(valid) {
        return Err(bad());
    }
    if value.is_empty() || value.contains('\n') {
        return Err(bad());
    }
    Ok((file.to_owned(), value.to_owned()))
}

/// Limits applied when none of that controller is given: memory for the
/// guest plus room for the VMM and its vsock buffers, and a thread cap.
pub fn default_cgroups(config: &VmConfig) -> Vec<(String, String)> {
    let vsock_buffers = config.vsock.as_ref().map_or(0, |v| {
        v.max_connections as u64 * u64::from(v.conn_buffer_bytes)
    });
    let memory = (config.machine.memory_mib << 20) + (128 << 20) + vsock_buffers;
    vec![
        ("memory.limit_in_bytes".into(), memory.to_string()),
        (
            "pids.max".into(),
            (64 + u32::from(config.machine.vcpus)).to_string(),
        ),
    ]
}

/// One bind mount into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    /// Absolute inside the jail.
    pub jail: PathBuf,
    pub dir: bool,
    pub read_only: bool,
}

/// The config as the jailed VMM sees it, and what to mount for it.
#[derive(Debug)]
pub struct JailPlan {
    pub config: VmConfig,
    pub api_sock: Option<PathBuf>,
    pub mounts: Vec<Mount>,
    /// Device nodes to create: (jail path, major, minor, host path).
    pub devices: Vec<(PathBuf, u32, u32, PathBuf)>,
}

/// Rewrites every host path of `config` to its place in the jail.
pub fn plan(config: &VmConfig, api_sock: Option<&Path>) -> Result<JailPlan, JailError> {
    let mut config = config.clone();
    let mut mounts = Vec::new();
    let mut file = |host: &Path, jail: &str, read_only: bool| {
        mounts.push(Mount {
            host: host.to_owned(),
            jail: PathBuf::from(jail),
            dir: false,
            read_only,
        });
        PathBuf::from(jail)
    };
    config.boot.kernel = file(&config.boot.kernel, "/vm/kernel", true);
    if let Some(initrd) = &config.boot.initrd {
        config.boot.initrd = Some(file(initrd, "/vm/initrd", true));
    }
    for (i, disk) in config.disks.iter_mut().enumerate() {
        disk.path = file(&disk.path, &format!("/vm/disk{i}"), disk.read_only);
    }
    if let Some(output) = &config.serial.output {
        config.serial.output = Some(file(output, "/vm/console", false));
    }
    // Sockets are created by the VMM, so their directories are mounted; the
    // host keeps finding them at the paths it gave.
    let mut socket_dirs: Vec<PathBuf> = Vec::new();
    let mut socket = |host: &Path| -> Result<PathBuf, JailError> {
        let parent = host
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| JailError::SocketPath(host.to_owned()))?;
        let name = host
            .file_name()
            .ok_or_else(|| JailError::SocketPath(host.to_owned()))?;
        let index = match socket_dirs.iter().position(|d| d == parent) {
            Some(i) => i,
            None => {
                socket_dirs.push(parent.to_owned());
                socket_dirs.len() - 1
            }
        };
        Ok(Path::new(&format!("/run/sock{index}")).join(name))
    };
    if let Some(vsock) = &mut config.vsock {
        vsock.uds_path = socket(&vsock.uds_path)?;
    }
    // virtio-fs back-end sockets (virtiofsd listens; the VMM connects).
    for share in &mut config.fs {
        share.socket = socket(&share.socket)?;
    }
    let api_sock = api_sock.map(&mut socket).transpose()?;
    for (i, dir) in socket_dirs.iter().enumerate() {
        mounts.push(Mount {
            host: dir.clone(),
            jail: PathBuf::from(format!("/run/sock{i}")),
            dir: true,
            read_only: false,
        });
    }
    mounts.push(Mount {
        host: "/proc/meminfo".into(),
        jail: "/proc/meminfo".into(),
        dir: false,
        read_only: true,
    });
    let mut devices = vec![
        ("/dev/kvm".into(), 10, 232, "/dev/kvm".into()),
        ("/dev/urandom".into(), 1, 9, "/dev/urandom".into()),
    ];
    if !config.net.is_empty() {
        devices.push(("/dev/net/tun".into(), 10, 200, "/dev/net/tun".into()));
    }
    Ok(JailPlan {
        config,
        api_sock,
        mounts,
        devices,
    })
}

/// The program interpreter (PT_INTERP) of the ELF at `path`.
pub fn elf_interpreter(path: &Path) -> Result<PathBuf, JailError> {
    let bad = |m: &str| JailError::Interpreter(format!("{}: {m}", path.display()));
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.by_ref().take(1 << 20).read_to_end(&mut data))
        .map_err(|e| bad(&e.to_string()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return Err(bad("not a 64-bit ELF"));
    }
    let phoff = u64_at(0x20).ok_or_else(|| bad("short header"))? as usize;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(|| bad("short header"))?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(|| bad("short header"))?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = data
            .get(ph..ph + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes);
        if p_type != Some(3) {
            continue;
        }
        let offset = u64_at(ph + 8).ok_or_else(|| bad("short PT_INTERP"))? as usize;
        let size = u64_at(ph + 32).ok_or_else(|| bad("short PT_INTERP"))? as usize;
        let raw = data
            .get(offset..offset.saturating_add(size))
            .ok_or_else(|| bad("PT_INTERP outside the file"))?;
        let raw = raw.split(|b| *b == 0).next().unwrap_or_default();
        return Ok(PathBuf::from(OsStr::from_bytes(raw)));
    }
    Err(bad("no PT_INTERP (a static binary needs no libraries)"))
}

/// Shared objects mapped into this process: the libraries the VMM runs with.
pub fn mapped_libraries(maps: &str) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && (p.ends_with(".so") || p.contains(".so.")))
        .map(PathBuf::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// Mounts that let the VMM binary run in the jail: itself at /microvm-vmm,
/// its interpreter at the path the binary names, its libraries in place.
fn binary_mounts() -> Result<Vec<Mount>, JailError> {
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(io_err("cannot read", "/proc/self/exe".as_ref()))?;
    let ro = |host: PathBuf, jail: PathBuf| Mount {
        host,
        jail,
        dir: false,
        read_only: true,
    };
    let mut mounts = vec![ro(exe.clone(), "/microvm-vmm".into())];
    if let Ok(interp) = elf_interpreter(&exe) {
        let real = std::fs::canonicalize(&interp).map_err(io_err("cannot resolve", &interp))?;
        mounts.push(ro(real, interp));
    }
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(io_err("cannot read", "/proc/self/maps".as_ref()))?;
    for lib in mapped_libraries(&maps) {
        if !mounts.iter().any(|m| m.jail == lib) {
            mounts.push(ro(lib.clone(), lib));
        }
    }
    Ok(mounts)
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: "NUL in path",
        path: path.to_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn jail_path(dir: &Path, inside: &Path) -> PathBuf {
    dir.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// Creates a mount point (empty file or directory) at `target`.
fn mount_point(target: &Path, dir: bool) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io_err("cannot create", parent))?;
    }
    if dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(target)
            .map_err(io_err("cannot create", target))?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(target)
            .map_err(io_err("cannot create", target))?;
    }
    Ok(())
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    let (src, dst) = (cstr(source)?, cstr(target)?);
    // SAFETY: valid NUL-terminated paths; null fs type and data are allowed
    // for a bind mount.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(JailError::Io {
            what: "cannot bind-mount into the jail",
            path: source.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    if read_only {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
        // SAFETY: as above; remounting our own bind mount read-only.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                dst.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(sys("remount read-only"));
        }
    }
    Ok(())
}

fn make_device(
    target: &Path,
    major: u32,
    minor: u32,
    host: &Path,
    owner: (Option<u32>, Option<u32>),
) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    let path = cstr(target)?;
    // SAFETY: valid path; creates a character device node.
    let rc = unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        // No CAP_MKNOD (or a nodev mount): share the host's node instead.
        mount_point(target, false)?;
        return bind(host, target, false);
    }
    let (uid, gid) = owner;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(target, uid, gid).map_err(io_err("cannot chown", target))?;
    }
    Ok(())
}

/// The jail's cgroup: `<parent>/<jail dir name>` in each hierarchy (the
/// shared host module: v1 and v2, controllers enabled down the tree), with
/// the limits written, removed when the VMM is gone.
pub struct Cgroups {
    cgroup: Cgroup,
}

/// The controllers the jail's limits use.
const JAIL_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "io"];

impl Cgroups {
    /// Creates `<parent>/<name>` and writes each setting.
    pub fn create(
        parent: &str,
        name: &str,
        settings: &[(String, String)],
    ) -> Result<Self, JailError> {
        let hierarchies = Hierarchies::detect().map_err(JailError::Cgroup)?;
        let relative = Path::new(parent.trim_start_matches('/')).join(name);
        let cgroup =
            Cgroup::create(&hierarchies, &relative, JAIL_CONTROLLERS).map_err(JailError::Cgroup)?;
        for (file, value) in settings {
            if let Err(err) = cgroup.set(file, value) {
                // Leave nothing half made behind.
                cgroup.remove();
                return Err(JailError::Cgroup(err));
            }
        }
        Ok(Self { cgroup })
    }

    /// Moves the calling process into the cgroup ("0" is the caller in
    /// both hierarchies and in any PID namespace).
    pub fn join(&self) -> Result<(), JailError> {
        self.cgroup.join().map_err(JailError::Cgroup)
    }

    /// Removes the (by then empty) cgroup.
    pub fn remove(&self) {
        self.cgroup.remove();
    }
}

/// Everything the child needs, prepared before the fork.
struct ChildSetup {
    dir: PathBuf,
    mounts: Vec<Mount>,
    devices: Vec<(PathBuf, u32, u32, PathBuf)>,
    owner: (Option<u32>, Option<u32>),
    exec_args: Vec<CString>,
}

/// Runs the VMM in a jail and returns the exit status to exit with.
pub fn run(config: &VmConfig, options: &JailOptions) -> Result<u8, JailError> {
    let dir = &options.dir;
    let name = dir
        .file_name()
        .and_then(OsStr::to_str)
        .filter(|_| dir.is_absolute())
        .ok_or_else(|| JailError::BadDir(dir.clone()))?
        .to_owned();
    let jail_plan = plan(config, options.api_sock.as_deref())?;
    let mut mounts = jail_plan.mounts.clone();
    mounts.extend(binary_mounts()?);
    // A console file is ours to create (and hand to the jailed uid).
    if let Some(output) = &config.serial.output {
        if !output.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(output)
                .map_err(io_err("cannot create", output))?;
            std::os::unix::fs::chown(output, options.uid, options.gid)
                .map_err(io_err("cannot chown", output))?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(JailError::DirExists(dir.clone()))
        }
        Err(e) => return Err(io_err("cannot create", dir)(e)),
    }
    let cleanup_dir = DirGuard(dir.clone());
    let config_path = dir.join("vm/config.json");
    mount_point(&config_path, false)?;
    let text = serde_json::to_string_pretty(&jail_plan.config).map_err(|e| JailError::Io {
        what: "cannot serialise the config for",
        path: config_path.clone(),
        source: io::Error::other(e),
    })?;
    std::fs::write(&config_path, text).map_err(io_err("cannot write", &config_path))?;

    let mut settings = options.cgroups.clone();
    for (file, value) in default_cgroups(config) {
        let controller = file.split('.').next().unwrap_or_default().to_owned();
        if !settings
            .iter()
            .any(|(f, _)| f.starts_with(&format!("{controller}.")))
        {
            settings.push((file, value));
        }
    }
    let cgroups = Cgroups::create(&options.cgroup_parent, &name, &settings)?;

    let mut exec_args = vec!["microvm-vmm", "--config", "/vm/config.json", "--log-level"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    exec_args.push(options.log_level.clone());
    if let Some(sock) = &jail_plan.api_sock {
        exec_args.push("--api-sock".into());
        exec_args.push(sock.display().to_string());
    }
    if options.no_seccomp {
        exec_args.push("--no-seccomp".into());
    }
    let setup = ChildSetup {
        dir: dir.clone(),
        mounts,
        devices: jail_plan.devices,
        owner: (options.uid, options.gid),
        exec_args: exec_args
            .into_iter()
            .map(|a| CString::new(a).map_err(|_| JailError::BadDir(dir.clone())))
            .collect::<Result<_, _>>()?,
    };

    let status = spawn_and_wait(&setup, &cgroups);
    cgroups.remove();
    drop(cleanup_dir);
    status
}

/// Removes the jail directory on every way out of [`run`].
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the jail directory");
        }
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before use.
    let mut set = unsafe { std::mem::zeroed::<libc::sigset_t>() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

fn spawn_and_wait(setup: &ChildSetup, cgroups: &Cgroups) -> Result<u8, JailError> {
    // Signals are taken synchronously (sigwaitinfo), so block them first;
    // the child restores the old mask before exec.
    let forwarded = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    let waited = signal_set(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    // SAFETY: zeroed sigset_t is a valid out-parameter.
    let mut old_mask = unsafe { std::mem::zeroed::<libc::sigset_t>() };
    // SAFETY: valid sets; changes only this thread's mask.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &waited, &mut old_mask) } != 0 {
        return Err(sys("sigprocmask"));
    }
    // SAFETY: no arguments; affects children created from now on.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(sys("unshare(CLONE_NEWPID)"));
    }
    // The lifeline: this process holds the write end for as long as it
    // lives, so the child can tell whether it already died (see
    // die_with_supervisor).
    let mut lifeline = [0; 2];
    // SAFETY: `lifeline` is a two-element array, as pipe2 needs.
    if unsafe { libc::pipe2(lifeline.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(sys("pipe2"));
    }
    let [lifeline_read, lifeline_write] = lifeline;
    // SAFETY: the process is single-threaded here (no VMM thread exists yet),
    // so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(sys("fork"));
    }
    if pid == 0 {
        // SAFETY: the child's copy of the write end; only the supervisor's
        // may keep the pipe open.
        unsafe { libc::close(lifeline_write) };
        let error = enter_and_exec(setup, cgroups, &old_mask, lifeline_read);
        eprintln!("microvm-vmm: error: jail: {error}");
        // SAFETY: leave the child without running the parent's destructors
        // (which would remove the jail directory).
        unsafe { libc::_exit(2) };
    }
    // SAFETY: the parent's copy of the read end, unused here.
    unsafe { libc::close(lifeline_read) };
    tracing::info!(pid, dir = %setup.dir.display(), "jailed VMM started");
    loop {
        // SAFETY: valid set; a null info pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(&waited, std::ptr::null_mut()) };
        if sig < 0 {
            continue;
        }
        if forwarded.contains(&sig) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: our own child, valid status pointer.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped == pid {
            if libc::WIFEXITED(status) {
                return Ok(libc::WEXITSTATUS(status) as u8);
            }
            if libc::WIFSIGNALED(status) {
                let signal = libc::WTERMSIG(status);
                eprintln!("microvm-vmm: jailed VMM killed by signal {signal}");
                return Ok(128u8.saturating_add(signal as u8));
            }
        }
    }
}

/// In the child: namespaces, mounts, pivot_root, credentials, exec. Returns
/// only on failure.
fn enter_and_exec(
    setup: &ChildSetup,
    cgroups: &Cgroups,
    old_mask: &libc::sigset_t,
    lifeline: libc::c_int,
) -> JailError {
    match prepare_child(setup, cgroups, lifeline) {
        Ok(()) => {}
        Err(e) => return e,
    }
    let mut argv: Vec<*const libc::c_char> = setup.exec_args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: restoring the mask saved before blocking.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old_mask, std::ptr::null_mut()) };
    // SAFETY: argv and envp are NULL-terminated arrays of valid C strings
    // that outlive the call; the environment is deliberately empty.
    unsafe { libc::execve(c"/microvm-vmm".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    sys("execve /microvm-vmm")
}

fn prepare_child(
    setup: &ChildSetup,
    cgroups: &Cgroups,
    lifeline: libc::c_int,
) -> Result<(), JailError> {
    cgroups.join()?;
    // SAFETY: plain syscalls on no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(sys("unshare(CLONE_NEWNS)"));
    }
    // Private first: otherwise mounts below would propagate to the host.
    // SAFETY: valid static path; null fs type and data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(sys("making / private"));
    }
    let dir = &setup.dir;
    // pivot_root needs the new root to be a mount point.
    bind(dir, dir, false)?;
    for m in &setup.mounts {
        let target = jail_path(dir, &m.jail);
        mount_point(&target, m.dir)?;
        bind(&m.host, &target, m.read_only)?;
    }
    for (jail, major, minor, host) in &setup.devices {
        make_device(&jail_path(dir, jail), *major, *minor, host, setup.owner)?;
    }
    let old = dir.join("old_root");
    std::fs::create_dir(&old).map_err(io_err("cannot create", &old))?;
    let (new_root, put_old) = (cstr(dir)?, cstr(&old)?);
    // SAFETY: valid paths; pivot_root has no libc wrapper.
    if unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) } != 0 {
        return Err(sys("pivot_root"));
    }
    // SAFETY: valid static paths.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(sys("chdir /"));
    }
    // SAFETY: valid static path; detaches the whole old root.
    if unsafe { libc::umount2(c"/old_root".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(sys("umount old root"));
    }
    let _ = std::fs::remove_dir("/old_root");
    drop_privileges(setup.owner)?;
    die_with_supervisor(lifeline)?;
    // SAFETY: sets a flag on this process only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    // Every fd but stdio: nothing of the supervisor's leaks into the VMM.
    // SAFETY: closes fds of this (single-threaded) child only.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(sys("close_range"));
    }
    Ok(())
}

/// The VMM is PID 1 of its own namespace: a supervisor killed outright
/// (SIGKILL, which it cannot forward) would otherwise leave it running with
/// nobody to reap or stop it. PR_SET_PDEATHSIG makes the kernel kill it
/// then. Set after the uid/gid change, which clears it; the lifeline pipe
/// catches a supervisor that died before this point.
fn die_with_supervisor(lifeline: libc::c_int) -> Result<(), JailError> {
    // SAFETY: sets a flag on this process only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(sys("prctl(PR_SET_PDEATHSIG)"));
    }
    let mut poll = libc::pollfd {
        fd: lifeline,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    if ready != 0 {
        // Nobody writes to the pipe: readable means every write end is
        // closed, so the supervisor is gone.
        return Err(JailError::SupervisorGone);
    }
    Ok(())
}

fn drop_privileges(owner: (Option<u32>, Option<u32>)) -> Result<(), JailError> {
    let (uid, gid) = owner;
    if let Some(gid) = gid {
        // SAFETY: a one-element group list on the stack.
        if unsafe { libc::setgroups(1, &gid) } != 0 {
            return Err(sys("setgroups"));
        }
        // SAFETY: plain credential syscall.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(sys("setresgid"));
        }
    }
    if let Some(uid) = uid {
        // SAFETY: plain credential syscall.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(sys("setresuid"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, VsockConfig};

    fn config() -> VmConfig {
        let mut c = VmConfig::from_json(
            r#"{"boot": {"kernel": "/images/vmlinux", "initrd": "/images/initrd"},
                "serial": {"output": "/run/pod/console.log"}}"#,
        )
        .unwrap();
        c.disks.push(DiskConfig {
            path: "/images/rootfs.img".into(),
            read_only: true,
            serial: None,
            rate_limiter: None,
        });
        c.disks.push(DiskConfig {
            path: "/data/scratch.img".into(),
            read_only: false,
            serial: None,
            rate_limiter: None,
        });
        c.vsock = Some(VsockConfig::new(3, "/run/pod/vsock.sock".into()));
        c
    }

    #[test]
    fn plan_maps_every_host_path_into_the_jail() {
        let p = plan(&config(), Some(Path::new("/run/api/api.sock"))).unwrap();
        assert_eq!(p.config.boot.kernel, Path::new("/vm/kernel"));
        assert_eq!(
            p.config.boot.initrd.as_deref(),
            Some(Path::new("/vm/initrd"))
        );
        assert_eq!(p.config.disks[0].path, Path::new("/vm/disk0"));
        assert_eq!(p.config.disks[1].path, Path::new("/vm/disk1"));
        assert_eq!(
            p.config.serial.output.as_deref(),
            Some(Path::new("/vm/console"))
        );
        let vsock = p.config.vsock.as_ref().unwrap();
        assert_eq!(vsock.uds_path, Path::new("/run/sock0/vsock.sock"));
        assert_eq!(
            p.api_sock.as_deref(),
            Some(Path::new("/run/sock1/api.sock"))
        );
        let find = |jail: &str| p.mounts.iter().find(|m| m.jail == Path::new(jail)).unwrap();
        assert!(find("/vm/disk0").read_only);
        assert!(!find("/vm/disk1").read_only);
        assert!(find("/vm/kernel").read_only);
        assert_eq!(find("/run/sock0").host, Path::new("/run/pod"));
        assert!(find("/run/sock0").dir);
        assert_eq!(find("/run/sock1").host, Path::new("/run/api"));
        // No tap, no tun device.
        assert!(p.devices.iter().all(|d| d.0 != Path::new("/dev/net/tun")));
    }

    #[test]
    fn sockets_in_one_directory_share_a_mount() {
        let p = plan(&config(), Some(Path::new("/run/pod/api.sock"))).unwrap();
        assert_eq!(
            p.api_sock.as_deref(),
            Some(Path::new("/run/sock0/api.sock"))
        );
        assert_eq!(p.mounts.iter().filter(|m| m.dir).count(), 1);
    }

    #[test]
    fn cgroup_args_are_checked() {
        assert_eq!(
            parse_cgroup_arg("memory.limit_in_bytes=512M").unwrap(),
            ("memory.limit_in_bytes".into(), "512M".into())
        );
        for bad in [
            "memory",
            "=1",
            "memory.max=",
            "../x.y=1",
            "pids.max=1\n2",
            "nodot=1",
        ] {
            assert!(parse_cgroup_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_limits_cover_guest_memory_and_vsock_buffers() {
        let c = config();
        let d = default_cgroups(&c);
        let memory: u64 = d[0].1.parse().unwrap();
        assert_eq!(memory, (128 << 20) + (128 << 20) + 1024 * 128 * 1024);
        assert_eq!(d[1], ("pids.max".into(), "65".into()));
    }

    #[test]
    fn interpreter_and_libraries_of_this_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&exe).unwrap();
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libs = mapped_libraries(&maps);
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(elf_interpreter(Path::new("/proc/self/status")).is_err());
    }
}
