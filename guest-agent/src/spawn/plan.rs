//! Everything a new process does between clone and execve, prepared by the
//! agent beforehand: C strings, file descriptors, BPF programs. The child
//! only walks this plan with raw syscalls, so it never allocates or takes a
//! lock that another thread of the agent may have held at clone time.

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;

/// A NULL-terminated `char *[]` over owned C strings, for execve.
pub struct CStringArray {
    strings: Vec<CString>,
    pointers: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the heap buffers of `strings`, which this
// struct owns and never changes after construction; moving the struct to
// another thread moves those buffers' ownership with it.
unsafe impl Send for CStringArray {}

impl CStringArray {
    pub fn new(strings: Vec<CString>) -> Self {
        let mut pointers: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        Self { strings, pointers }
    }

    pub fn as_ptr(&self) -> *const *const libc::c_char {
        self.pointers.as_ptr()
    }

    pub fn strings(&self) -> &[CString] {
        &self.strings
    }
}

/// Where the new process's 0, 1 and 2 come from.
pub enum ChildStdio {
    /// Pipe ends (or /dev/null for stdin) made by the agent.
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The child opens `/dev/ptmx` of its own (container) /dev once its root
    /// is in place, sends the master back over the sync socket and takes the
    /// slave as its controlling terminal.
    Pty { rows: u16, columns: u16 },
}

/// One `mount(2)` of the spec, with paths resolved inside the rootfs.
pub struct MountStep {
    /// Directories to create first (outermost first); EEXIST is fine.
    pub mkdirs: Vec<CString>,
    /// For a bind mount of a file: create this empty file as the target.
    pub create_file: Option<CString>,
    pub source: Option<CString>,
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    /// A bind mount takes its flags (ro, nosuid, ...) only on a remount.
    pub bind_remount_flags: Option<libc::c_ulong>,
    /// Propagation changes (MS_SHARED, MS_PRIVATE, ...) after the mount.
    pub propagation: Vec<libc::c_ulong>,
}

/// A device node to create under the container's /dev.
pub struct DeviceNode {
    pub mkdirs: Vec<CString>,
    pub path: CString,
    /// File type bits and permissions.
    pub mode: libc::mode_t,
    pub device: libc::dev_t,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// The container's filesystem view (only for a container's first process).
pub struct RootfsPlan {
    /// The rootfs directory as the agent sees it.
    pub root: CString,
    /// Applied to "/" first, so nothing done here reaches the agent's view.
    pub initial_propagation: libc::c_ulong,
    /// Applied to the new "/" after pivot_root (spec rootfsPropagation).
    pub final_propagation: Option<libc::c_ulong>,
    pub mounts: Vec<MountStep>,
    pub devices: Vec<DeviceNode>,
    /// (target, link path) pairs such as ("/proc/self/fd", "<root>/dev/fd").
    /// The link path is unlinked first.
    pub symlinks: Vec<(CString, CString)>,
    /// Paths inside the container (after pivot_root).
    pub masked_paths: Vec<CString>,
    pub readonly_paths: Vec<CString>,
    pub readonly_root: bool,
}

/// Capability sets as bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilitySets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub additional_gids: Vec<libc::gid_t>,
}

/// One seccomp BPF program.
pub struct SeccompProgram {
    pub filter: Vec<libc::sock_filter>,
}

pub struct ChildPlan {
    /// CLONE_NEW* flags for clone3.
    pub new_namespaces: u64,
    /// A PID namespace to create the process in (set on the spawning thread
    /// before clone, since it only affects children).
    pub join_pid_namespace: Option<OwnedFd>,
    /// Namespaces the child enters with setns(fd, nstype) first thing. A
    /// pidfd with several CLONE_NEW* flags enters all of them at once.
    pub setns: Vec<(OwnedFd, libc::c_int)>,
    /// The cgroup directory the process starts in (CLONE_INTO_CGROUP).
    pub cgroup: Option<OwnedFd>,
    /// Child end of the SOCK_SEQPACKET sync socket (see [`super::sync`]).
    pub sync: OwnedFd,
    pub stdio: ChildStdio,
    pub rootfs: Option<RootfsPlan>,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    /// (path under /proc/sys, value), written after pivot_root.
    pub sysctls: Vec<(CString, CString)>,
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
    /// ioprio_set value for the process.
    pub io_priority: Option<libc::c_int>,
    pub umask: Option<libc::mode_t>,
    pub credentials: Credentials,
    /// None: keep the capabilities the process has (root keeps all).
    pub capabilities: Option<CapabilitySets>,
    /// /proc/sys/kernel/cap_last_cap of the running kernel.
    pub last_capability: u32,
    pub no_new_privileges: bool,
    /// Installed in order, each with `seccomp_flags`.
    pub seccomp: Vec<SeccompProgram>,
    pub seccomp_flags: libc::c_ulong,
    pub cwd: CString,
    /// Paths tried in order for execve (PATH search done ahead).
    pub exec_candidates: Vec<CString>,
    pub argv: CStringArray,
    pub envp: CStringArray,
    /// A container's first process waits for Start before execve; an exec'd
    /// process goes straight on.
    pub wait_for_start: bool,
    /// Start a process that only holds namespaces: it ignores SIGCHLD (so
    /// orphans it inherits are reaped) and sleeps until killed.
    pub namespace_holder: bool,
}

/// A C string from Rust text, refusing interior NULs with the field's name.
pub fn c_string(field: &str, text: &str) -> Result<CString, InteriorNul> {
    CString::new(text).map_err(|_| InteriorNul(field.to_owned()))
}

/// `CStr` to text for messages.
pub fn lossy(text: &CStr) -> String {
    text.to_string_lossy().into_owned()
}

#[derive(Debug, thiserror::Error)]
#[error("{0} contains a NUL byte")]
pub struct InteriorNul(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_string_array_is_null_terminated() {
        let array = CStringArray::new(vec![c"a".to_owned(), c"bc".to_owned()]);
        // SAFETY: the array has three pointers (two strings and NULL) and
        // lives until the end of the test.
        unsafe {
            let pointers = std::slice::from_raw_parts(array.as_ptr(), 3);
            assert_eq!(CStr::from_ptr(pointers[0]), c"a");
            assert_eq!(CStr::from_ptr(pointers[1]), c"bc");
            assert!(pointers[2].is_null());
        }
        assert_eq!(array.strings().len(), 2);
    }

    #[test]
    fn c_string_refuses_nul() {
        assert!(c_string("env", "A=\0").is_err());
        assert_eq!(c_string("env", "A=1").unwrap(), c"A=1".to_owned());
    }
}
