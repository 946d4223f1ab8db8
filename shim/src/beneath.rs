//! Path work under a directory the guest can write to (`<pod>/shared/`).
//!
//! The guest reaches `shared/` through virtiofsd and can rename anything in
//! it, or plant symlinks, FIFOs and device nodes, at any moment. So the host
//! never resolves a path string there: every step starts from a directory
//! fd and goes through `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`,
//! mounts are attached to an fd (`move_mount`) and unmounts address the
//! mount point through an fd of its parent with `UMOUNT_NOFOLLOW`.
//! Removal never crosses a mount point (`RESOLVE_NO_XDEV`), so a bind the
//! shim failed to see can never have its source deleted.
//!
//! Hand-written over `rustix` because no crate in the registry cache does
//! fd-relative creation, mounting and mount-bounded removal together
//! (`rustix` gives the syscalls; `mount_setattr` it lacks, so that one is a
//! raw syscall below).

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{self as rmount, MoveMountFlags, OpenTreeFlags, UnmountFlags};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Nesting the remover follows; a deeper tree (the guest can make one) is
/// left in place and reported, never followed with unbounded recursion.
const MAX_DEPTH: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    #[error("{path}: {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a plain path component (absolute, `.` or `..`)")]
    BadComponent(PathBuf),
    #[error("{0}: is not a regular file")]
    NotRegular(PathBuf),
    #[error("{0}: is a mount point, not removed")]
    MountPoint(PathBuf),
    #[error("{0}: nested deeper than {MAX_DEPTH}, not removed")]
    TooDeep(PathBuf),
    #[error("{0}: is not below the tree root")]
    NotBelow(PathBuf),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> BeneathError {
    let path = path.to_path_buf();
    move |errno| BeneathError::Io {
        op,
        path,
        source: errno.into(),
    }
}

/// Resolution that stays below the dir fd and follows no symlink at all
/// (magic links included).
fn strict() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// `/proc/self/fd/N`: the exact object behind `fd`, for calls that only
/// take a path.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens a host-owned directory (the guest cannot change any of its
/// components), as an `O_PATH` handle; the last component is not followed.
pub fn open_root(path: &Path) -> Result<OwnedFd, BeneathError> {
    rfs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open", path))
}

/// Opens the directory `rel` below `dir`, never leaving it and following
/// no symlink. `O_PATH`: usable as a dir fd and as a mount target.
pub fn open_dir(dir: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, BeneathError> {
    rfs::openat2(
        dir,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        strict(),
    )
    .map_err(io("open", rel))
}

fn plain_components(rel: &Path) -> Result<Vec<&OsStr>, BeneathError> {
    rel.components()
        .map(|component| match component {
            Component::Normal(name) => Ok(name),
            _ => Err(BeneathError::BadComponent(rel.to_path_buf())),
        })
        .collect()
}

/// `mkdir -p rel` below `dir`: each component is created (if missing) and
/// then opened without following a symlink, so one the guest planted fails
/// the call instead of redirecting it.
pub fn mkdir_all(dir: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, BeneathError> {
    let components = plain_components(rel)?;
    let mut current: Option<OwnedFd> = None;
    for name in components {
        let parent = current.as_ref().map_or(dir, |fd| fd.as_fd());
        match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(errno) => return Err(io("mkdir", rel)(errno)),
        }
        current = Some(open_dir(parent, Path::new(name))?);
    }
    match current {
        Some(fd) => Ok(fd),
        None => Err(BeneathError::BadComponent(rel.to_path_buf())),
    }
}

/// An empty regular file `name` in `dir` (kept if it is already one, never
/// truncated), opened `O_PATH` for a bind mount onto it. Nothing is opened
/// for I/O, so a FIFO or device node planted there has no effect.
pub fn create_file(dir: BorrowedFd<'_>, name: &Path) -> Result<OwnedFd, BeneathError> {
    let [leaf] = plain_components(name)?[..] else {
        return Err(BeneathError::BadComponent(name.to_path_buf()));
    };
    match rfs::mknodat(
        dir,
        leaf,
        FileType::RegularFile,
        Mode::from_raw_mode(0o644),
        0,
    ) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(errno) => return Err(io("create", name)(errno)),
    }
    let fd = rfs::openat2(
        dir,
        leaf,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        strict(),
    )
    .map_err(io("open", name))?;
    let stat = rfs::fstat(&fd).map_err(io("stat", name))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(BeneathError::NotRegular(name.to_path_buf()));
    }
    Ok(fd)
}

/// Recursively binds `source` (a host path from the spec) onto `target`.
/// The clone is made `nosuid,nodev` (and `ro`, recursively, when asked)
/// while still detached, so it is never visible with weaker flags; then it
/// is attached to exactly the object `target` refers to.
pub fn bind(source: &Path, target: BorrowedFd<'_>, readonly: bool) -> Result<(), BeneathError> {
    let tree = rmount::open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(io("open_tree", source))?;
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if readonly {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    mount_setattr(tree.as_fd(), set).map_err(io("mount_setattr", source))?;
    rmount::move_mount(
        &tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(io("move_mount", source))
}

/// Makes the mount whose root is `rel` below `dir` (reached without
/// following a symlink) `nosuid,nodev`, recursively. Fails (EINVAL) if
/// `rel` is not a mount root, e.g. the guest renamed something there.
pub fn harden_mount(dir: BorrowedFd<'_>, rel: &Path) -> Result<(), BeneathError> {
    let root = open_dir(dir, rel)?;
    mount_setattr(
        root.as_fd(),
        libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
    )
    .map_err(io("mount_setattr", rel))
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, {attr_set})`.
/// Raw: rustix 1.1 has no wrapper for it.
fn mount_setattr(fd: BorrowedFd<'_>, attr_set: u64) -> Result<(), Errno> {
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the path is a valid NUL-terminated empty string, `attr` is a
    // live, initialised `mount_attr` whose size is passed with it, and the
    // kernel only reads it; `fd` is borrowed for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL))
    }
}

/// Unmounts (lazily) the mount point `point`, which mountinfo placed below
/// the tree `root_path` (opened as `root`). Its parent is reached from
/// `root` without following any symlink, and the point itself is not
/// followed: if the guest swapped a directory on the way for a symlink,
/// this fails instead of unmounting something elsewhere.
pub fn unmount_below(
    root: BorrowedFd<'_>,
    root_path: &Path,
    point: &Path,
) -> Result<(), BeneathError> {
    let rel = point
        .strip_prefix(root_path)
        .map_err(|_| BeneathError::NotBelow(point.to_path_buf()))?;
    let flags = UnmountFlags::DETACH | UnmountFlags::NOFOLLOW;
    let components = plain_components(rel)?;
    let Some((leaf, parents)) = components.split_last() else {
        // The root itself: a host-owned path.
        return rmount::unmount(root_path, flags).map_err(io("umount", point));
    };
    let parent_rel: PathBuf = parents.iter().collect();
    let parent = if parent_rel.as_os_str().is_empty() {
        None
    } else {
        Some(open_dir(root, &parent_rel)?)
    };
    let parent_fd = parent.as_ref().map_or(root, |fd| fd.as_fd());
    let mut target = fd_path(parent_fd).into_os_string();
    target.push("/");
    target.push(leaf);
    rmount::unmount(Path::new(&target), flags).map_err(io("umount", point))
}

/// Removes everything in the directory `path` and then `path` itself,
/// without ever crossing a mount point or following a symlink: a
/// directory that is a mount point, or a file that is one, stops that
/// branch and the first such problem is returned (the rest is still
/// removed). `path`'s parent must be host-owned.
pub fn remove_tree(path: &Path) -> Result<(), BeneathError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(BeneathError::BadComponent(path.to_path_buf()));
    };
    let parent_fd = open_root(parent)?;
    remove_entry(parent_fd.as_fd(), Path::new(name), path, 0)
}

/// Removes `name` in `dir` (shown as `shown` in errors).
fn remove_entry(
    dir: BorrowedFd<'_>,
    name: &Path,
    shown: &Path,
    depth: usize,
) -> Result<(), BeneathError> {
    let stat = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(errno) => return Err(io("stat", shown)(errno)),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::BUSY) => Err(BeneathError::MountPoint(shown.to_path_buf())),
            Err(errno) => Err(io("unlink", shown)(errno)),
        };
    }
    if depth >= MAX_DEPTH {
        return Err(BeneathError::TooDeep(shown.to_path_buf()));
    }
    let child = match rfs::openat2(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        strict() | ResolveFlags::NO_XDEV,
    ) {
        Ok(fd) => fd,
        Err(Errno::XDEV) => return Err(BeneathError::MountPoint(shown.to_path_buf())),
        Err(Errno::NOENT) => return Ok(()),
        Err(errno) => return Err(io("open", shown)(errno)),
    };
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(&child).map_err(io("readdir", shown))? {
        let entry = entry.map_err(io("readdir", shown))?;
        let bytes = entry.file_name().to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(PathBuf::from(OsStr::from_bytes(bytes)));
        }
    }
    let mut first_error = None;
    for entry in names {
        if let Err(err) = remove_entry(child.as_fd(), &entry, &shown.join(&entry), depth + 1) {
            first_error.get_or_insert(err);
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::BUSY) => Err(BeneathError::MountPoint(shown.to_path_buf())),
        Err(errno) => Err(io("rmdir", shown)(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        if nix::unistd::Uid::effective().is_root() {
            true
        } else {
            eprintln!("skipped: needs root for mount(2)");
            false
        }
    }

    fn mounted(path: &Path) -> bool {
        microvm_host::mountinfo::mounts()
            .unwrap()
            .iter()
            .any(|m| m.mount_point == path)
    }

    #[test]
    fn mkdir_all_refuses_a_planted_symlink_and_creates_nothing_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let (inside, outside) = (tmp.path().join("in"), tmp.path().join("out"));
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        symlink(&outside, inside.join("c1")).unwrap();
        let root = open_root(&inside).unwrap();
        assert!(mkdir_all(root.as_fd(), Path::new("c1/mounts")).is_err());
        assert!(mkdir_all(root.as_fd(), Path::new("../out/x")).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        mkdir_all(root.as_fd(), Path::new("c2/mounts/3")).unwrap();
        assert!(inside.join("c2/mounts/3").is_dir());
    }

    #[test]
    fn create_file_neither_follows_nor_truncates() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let dir = tmp.path().join("mounts");
        std::fs::create_dir(&dir).unwrap();
        symlink(&victim, dir.join("0")).unwrap();
        nix::unistd::mkfifo(&dir.join("1"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(dir.join("2"), "old").unwrap();
        let root = open_root(&dir).unwrap();
        assert!(create_file(root.as_fd(), Path::new("0")).is_err());
        assert!(matches!(
            create_file(root.as_fd(), Path::new("1")),
            Err(BeneathError::NotRegular(_))
        ));
        create_file(root.as_fd(), Path::new("2")).unwrap();
        create_file(root.as_fd(), Path::new("3")).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(dir.join("2")).unwrap(), "old");
        assert!(dir.join("3").is_file());
    }

    #[test]
    fn a_readonly_bind_is_readonly_nosuid_nodev_on_the_host() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("vol");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("precious"), "v1").unwrap();
        let target = tmp.path().join("t");
        std::fs::create_dir(&target).unwrap();
        let fd = open_root(&target).unwrap();
        bind(&source, fd.as_fd(), true).unwrap();
        let err = std::fs::write(target.join("precious"), "evil").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        let mount = microvm_host::mountinfo::mounts()
            .unwrap()
            .into_iter()
            .find(|m| m.mount_point == target)
            .expect("the bind is mounted");
        for flag in ["ro", "nosuid", "nodev"] {
            assert!(
                mount.mount_options.split(',').any(|o| o == flag),
                "{flag} missing in {}",
                mount.mount_options
            );
        }
        assert_eq!(
            std::fs::read_to_string(source.join("precious")).unwrap(),
            "v1"
        );
        rmount::unmount(&target, UnmountFlags::DETACH).unwrap();
    }

    #[test]
    fn unmount_through_a_swapped_in_symlink_unmounts_nothing_else() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let pod = tmp.path().join("pod");
        let elsewhere = tmp.path().join("other-pod");
        std::fs::create_dir_all(pod.join("c1")).unwrap();
        std::fs::create_dir_all(elsewhere.join("3")).unwrap();
        let source = tmp.path().join("vol");
        std::fs::create_dir(&source).unwrap();
        let other = open_root(&elsewhere.join("3")).unwrap();
        bind(&source, other.as_fd(), false).unwrap();
        // The guest replaced `c1/mounts` by a link to the other pod's dir
        // after the shim read mountinfo.
        symlink(&elsewhere, pod.join("c1/mounts")).unwrap();
        let root = open_root(&pod).unwrap();
        assert!(unmount_below(root.as_fd(), &pod, &pod.join("c1/mounts/3")).is_err());
        assert!(mounted(&elsewhere.join("3")), "the other mount survived");
        // And a symlink as the point itself is not followed either.
        symlink(elsewhere.join("3"), pod.join("c1/point")).unwrap();
        assert!(unmount_below(root.as_fd(), &pod, &pod.join("c1/point")).is_err());
        assert!(mounted(&elsewhere.join("3")));
        rmount::unmount(elsewhere.join("3"), UnmountFlags::DETACH).unwrap();
    }

    #[test]
    fn removal_stops_at_a_mount_it_was_not_told_about() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("vol");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("data"), "keep").unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b/mnt")).unwrap();
        std::fs::write(tree.join("a/file"), "x").unwrap();
        symlink(&source, tree.join("a/link")).unwrap();
        let file_source = tmp.path().join("hosts");
        std::fs::write(&file_source, "keep").unwrap();
        let dir = open_root(&tree.join("a/b")).unwrap();
        let file_target = create_file(dir.as_fd(), Path::new("f")).unwrap();
        bind(&file_source, file_target.as_fd(), false).unwrap();
        let target = open_dir(dir.as_fd(), Path::new("mnt")).unwrap();
        bind(&source, target.as_fd(), false).unwrap();
        let err = remove_tree(&tree).unwrap_err();
        assert!(matches!(err, BeneathError::MountPoint(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(source.join("data")).unwrap(),
            "keep"
        );
        assert_eq!(std::fs::read_to_string(&file_source).unwrap(), "keep");
        assert!(!tree.join("a/file").exists() && !tree.join("a/link").exists());
        rmount::unmount(tree.join("a/b/mnt"), UnmountFlags::DETACH).unwrap();
        rmount::unmount(tree.join("a/b/f"), UnmountFlags::DETACH).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(source.join("data").exists());
    }

    #[test]
    fn a_tree_deeper_than_the_limit_is_refused_not_recursed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut deep = tmp.path().join("tree");
        for _ in 0..=MAX_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = remove_tree(&tmp.path().join("tree")).unwrap_err();
        assert!(matches!(err, BeneathError::TooDeep(_)), "{err}");
    }
}
