//! The spec's mounts, devices and paths, turned into [`MountStep`]s and
//! [`DeviceNode`]s with every path resolved inside the rootfs.

use super::SpecError;
use crate::spawn::plan::{c_string, DeviceNode, MountStep};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceBuilder, LinuxDeviceType, Mount};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Mount options split the way mount(2) wants them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedOptions {
    /// MS_* flags; options that clear one ("rw", "suid") apply in order.
    pub flags: libc::c_ulong,
    /// Propagation changes, applied after the mount in order.
    pub propagation: Vec<libc::c_ulong>,
    pub bind: bool,
    pub recursive: bool,
    /// Filesystem-specific options, comma-joined.
    pub data: Vec<String>,
}

/// Splits OCI mount options into flags, propagation and data, as runc does.
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut parsed = ParsedOptions::default();
    for option in options {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match option.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "remount" => (libc::MS_REMOUNT, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "atime" => (0, libc::MS_NOATIME),
            "noatime" => (libc::MS_NOATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "silent" => (libc::MS_SILENT, 0),
            "loud" => (0, libc::MS_SILENT),
            "lazytime" => (libc::MS_LAZYTIME, 0),
            "nolazytime" => (0, libc::MS_LAZYTIME),
            "bind" => {
                parsed.bind = true;
                continue;
            }
            "rbind" => {
                parsed.bind = true;
                parsed.recursive = true;
                continue;
            }
            "private" => {
                parsed.propagation.push(libc::MS_PRIVATE);
                continue;
            }
            "rprivate" => {
                parsed.propagation.push(libc::MS_PRIVATE | libc::MS_REC);
                continue;
            }
            "shared" => {
                parsed.propagation.push(libc::MS_SHARED);
                continue;
            }
            "rshared" => {
                parsed.propagation.push(libc::MS_SHARED | libc::MS_REC);
                continue;
            }
            "slave" => {
                parsed.propagation.push(libc::MS_SLAVE);
                continue;
            }
            "rslave" => {
                parsed.propagation.push(libc::MS_SLAVE | libc::MS_REC);
                continue;
            }
            "unbindable" => {
                parsed.propagation.push(libc::MS_UNBINDABLE);
                continue;
            }
            "runbindable" => {
                parsed.propagation.push(libc::MS_UNBINDABLE | libc::MS_REC);
                continue;
            }
            // containerd's copy-up hint; nothing to copy in a fresh VM.
            "tmpcopyup" => continue,
            data => {
                parsed.data.push(data.to_owned());
                continue;
            }
        };
        parsed.flags = (parsed.flags & !clear) | set;
    }
    parsed
}

/// `unsafe_path` resolved inside `root`: symlinks are followed as if `root`
/// were "/", and ".." never leaves it. Components that do not exist yet are
/// kept as written. Hand-written (the idea of Go's securejoin): no crate
/// does it for a path that may not exist.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> Result<PathBuf, std::io::Error> {
    const MAX_LINKS: usize = 255;
    let mut pending: Vec<std::ffi::OsString> = components_reversed(unsafe_path);
    let mut resolved = PathBuf::new();
    let mut links = 0usize;
    while let Some(part) = pending.pop() {
        match part.to_str() {
            Some("..") => {
                resolved.pop();
                continue;
            }
            Some(".") | Some("") => continue,
            _ => {}
        }
        let candidate = resolved.join(&part);
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&full)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(components_reversed(&target));
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

fn components_reversed(path: &Path) -> Vec<std::ffi::OsString> {
    let mut parts: Vec<std::ffi::OsString> = path
        .components()
        .filter_map(|component| match component {
            Component::Normal(part) => Some(part.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    parts.reverse();
    parts
}

/// Every directory from just below `root` down to `path`, outermost first.
pub fn dirs_to_create(root: &Path, path: &Path) -> Vec<PathBuf> {
    let Ok(relative) = path.strip_prefix(root) else {
        return Vec::new();
    };
    let mut current = root.to_path_buf();
    relative
        .components()
        .map(|component| {
            current.push(component);
            current.clone()
        })
        .collect()
}

pub fn path_c_string(field: &str, path: &Path) -> Result<CString, SpecError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SpecError::InvalidValue {
        field: field.to_owned(),
        reason: format!("{} contains a NUL byte", path.display()),
    })
}

/// Where the container's cgroup shows up for a `cgroup` mount.
pub enum CgroupMountSource {
    /// The container has a cgroup namespace: mount cgroup2 itself.
    Namespace,
    /// No cgroup namespace: bind the container's own cgroup directory.
    Bind(PathBuf),
}

/// One spec mount as a [`MountStep`]. `bundle` resolves relative bind
/// sources.
pub fn mount_step(
    index: usize,
    mount: &Mount,
    root: &Path,
    bundle: Option<&Path>,
    cgroup: &CgroupMountSource,
) -> Result<MountStep, SpecError> {
    let field = format!("mounts[{index}]");
    let destination = mount.destination();
    if !destination.is_absolute() {
        return Err(SpecError::InvalidValue {
            field: format!("{field}.destination"),
            reason: format!("{} is not an absolute path", destination.display()),
        });
    }
    let target = secure_join(root, destination).map_err(|err| SpecError::InvalidValue {
        field: format!("{field}.destination"),
        reason: format!(
            "cannot resolve {} in the rootfs: {err}",
            destination.display()
        ),
    })?;
    let options = parse_options(mount.options().as_deref().unwrap_or_default());
    let mut fstype = mount.typ().clone().unwrap_or_default();
    let mut source = mount.source().clone();
    let mut bind = options.bind || fstype == "bind";
    let mut recursive = options.recursive;
    // The container's cgroup directory is made after the plan.
    let mut source_checked = false;

    if fstype == "cgroup" || fstype == "cgroup2" {
        match cgroup {
            CgroupMountSource::Namespace => {
                fstype = "cgroup2".into();
                source = Some("cgroup2".into());
            }
            CgroupMountSource::Bind(dir) => {
                bind = true;
                recursive = false;
                source = Some(dir.clone());
                source_checked = true;
            }
        }
    }

    let mut source_is_dir = true;
    if bind {
        let Some(raw_source) = source.clone() else {
            return Err(SpecError::InvalidValue {
                field: format!("{field}.source"),
                reason: "a bind mount needs a source".into(),
            });
        };
        let absolute = if raw_source.is_absolute() {
            raw_source
        } else {
            match bundle {
                Some(bundle) => bundle.join(raw_source),
                None => raw_source,
            }
        };
        match std::fs::metadata(&absolute) {
            _ if source_checked => {}
            Ok(meta) => source_is_dir = meta.is_dir(),
            Err(err) => {
                return Err(SpecError::MountSourceMissing {
                    destination: destination.display().to_string(),
                    source_path: absolute.display().to_string(),
                    reason: err.to_string(),
                })
            }
        }
        source = Some(absolute);
    }

    let (mkdirs, create_file) = if source_is_dir {
        (dirs_to_create(root, &target), None)
    } else {
        let parent = target.parent().unwrap_or(root);
        (
            dirs_to_create(root, parent),
            Some(path_c_string(&field, &target)?),
        )
    };

    let mut flags = options.flags;
    let mut bind_remount_flags = None;
    if bind {
        // mount(2) ignores every flag but MS_BIND|MS_REC on a new bind
        // mount; the rest take a remount.
        let rest = flags & !libc::MS_REMOUNT;
        flags = libc::MS_BIND | if recursive { libc::MS_REC } else { 0 };
        if rest != 0 {
            bind_remount_flags = Some(libc::MS_BIND | libc::MS_REMOUNT | rest);
        }
    }
    let data = if options.data.is_empty() {
        None
    } else {
        Some(c_string(
            &format!("{field}.options"),
            &options.data.join(","),
        )?)
    };
    Ok(MountStep {
        mkdirs: mkdirs
            .iter()
            .map(|dir| path_c_string(&field, dir))
            .collect::<Result<_, _>>()?,
        create_file,
        source: source
            .as_deref()
            .map(|source| path_c_string(&format!("{field}.source"), source))
            .transpose()?,
        target: path_c_string(&format!("{field}.destination"), &target)?,
        fstype: if bind || fstype.is_empty() {
            None
        } else {
            Some(c_string(&format!("{field}.type"), &fstype)?)
        },
        flags,
        data,
        bind_remount_flags,
        propagation: options.propagation,
    })
}

/// The devices every container gets, as runc creates them.
pub fn default_devices() -> Vec<LinuxDevice> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/tty", 5, 0),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
    ]
    .into_iter()
    .filter_map(|(path, major, minor)| {
        LinuxDeviceBuilder::default()
            .path(path)
            .typ(LinuxDeviceType::C)
            .major(major)
            .minor(minor)
            .file_mode(0o666u32)
            .build()
            .ok()
    })
    .collect()
}

/// A device node to create for `device` (from the spec or the defaults).
pub fn device_node(
    index: usize,
    root: &Path,
    device: &LinuxDevice,
) -> Result<DeviceNode, SpecError> {
    let field = format!("linux.devices[{index}]");
    let file_type = match device.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
        LinuxDeviceType::B => libc::S_IFBLK,
        LinuxDeviceType::P => libc::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(SpecError::InvalidValue {
                field: format!("{field}.type"),
                reason: "\"a\" (all devices) is a cgroup rule, not a device node".into(),
            })
        }
    };
    let path = device.path();
    if !path.starts_with("/dev") {
        return Err(SpecError::InvalidValue {
            field: format!("{field}.path"),
            reason: format!("{} is not under /dev", path.display()),
        });
    }
    let (Ok(major), Ok(minor)) = (u32::try_from(device.major()), u32::try_from(device.minor()))
    else {
        return Err(SpecError::InvalidValue {
            field,
            reason: format!(
                "device number {}:{} is out of range",
                device.major(),
                device.minor()
            ),
        });
    };
    let target = secure_join(root, path).map_err(|err| SpecError::InvalidValue {
        field: format!("{field}.path"),
        reason: err.to_string(),
    })?;
    let mkdirs = target
        .parent()
        .map(|parent| dirs_to_create(root, parent))
        .unwrap_or_default();
    Ok(DeviceNode {
        mkdirs: mkdirs
            .iter()
            .map(|dir| path_c_string(&field, dir))
            .collect::<Result<_, _>>()?,
        path: path_c_string(&field, &target)?,
        mode: file_type | (device.file_mode().unwrap_or(0o666) & 0o7777),
        device: libc::makedev(major, minor),
        uid: device.uid().unwrap_or(0),
        gid: device.gid().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let options: Vec<String> = [
            "nosuid",
            "noexec",
            "rw",
            "ro",
            "rbind",
            "rslave",
            "mode=755",
            "size=65536k",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parsed = parse_options(&options);
        assert_eq!(
            parsed.flags,
            libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_RDONLY
        );
        assert!(parsed.bind && parsed.recursive);
        assert_eq!(parsed.propagation, vec![libc::MS_SLAVE | libc::MS_REC]);
        assert_eq!(parsed.data, vec!["mode=755", "size=65536k"]);
        // A later "rw" clears an earlier "ro".
        let parsed = parse_options(&["ro".to_string(), "rw".to_string()]);
        assert_eq!(parsed.flags, 0);
    }

    #[test]
    fn secure_join_keeps_symlinks_and_dotdot_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("real/dir")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("real/escape")).unwrap();
        std::os::unix::fs::symlink("dir", root.join("real/rel")).unwrap();

        assert_eq!(
            secure_join(root, Path::new("/abs/dir/x")).unwrap(),
            root.join("real/dir/x")
        );
        assert_eq!(
            secure_join(root, Path::new("/real/escape/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/real/rel")).unwrap(),
            root.join("real/dir")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(secure_join(root, Path::new("/loop/x")).is_err());
    }

    #[test]
    fn dirs_to_create_lists_each_level() {
        let dirs = dirs_to_create(Path::new("/r"), Path::new("/r/a/b"));
        assert_eq!(dirs, vec![PathBuf::from("/r/a"), PathBuf::from("/r/a/b")]);
        assert!(dirs_to_create(Path::new("/r"), Path::new("/other")).is_empty());
    }

    #[test]
    fn bind_mount_flags_move_to_a_remount() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::create_dir(&source).unwrap();
        let mount: Mount = serde_json::from_value(serde_json::json!({
            "destination": "/data",
            "type": "bind",
            "source": source,
            "options": ["rbind", "ro", "nosuid"]
        }))
        .unwrap();
        let root = dir.path().join("root");
        let step = mount_step(0, &mount, &root, None, &CgroupMountSource::Namespace).unwrap();
        assert_eq!(step.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(
            step.bind_remount_flags,
            Some(libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID)
        );
        assert!(step.fstype.is_none());
        assert!(step.create_file.is_none());
        assert_eq!(
            step.target.to_str().unwrap(),
            root.join("data").to_str().unwrap()
        );
    }

    #[test]
    fn file_bind_creates_a_file_target_and_missing_source_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        let root = dir.path().join("root");
        let mount: Mount = serde_json::from_value(serde_json::json!({
            "destination": "/etc/hosts", "type": "bind", "source": file, "options": ["bind"]
        }))
        .unwrap();
        let step = mount_step(0, &mount, &root, None, &CgroupMountSource::Namespace).unwrap();
        assert!(step.create_file.is_some());
        assert_eq!(step.mkdirs.len(), 1, "only /etc is a directory");

        let missing: Mount = serde_json::from_value(serde_json::json!({
            "destination": "/x", "type": "bind", "source": "/nonexistent/src", "options": ["bind"]
        }))
        .unwrap();
        let err = mount_step(3, &missing, &root, None, &CgroupMountSource::Namespace)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/src"), "{err}");
    }

    #[test]
    fn devices_must_live_under_dev() {
        let root = Path::new("/r");
        let device = |path: &str| -> LinuxDevice {
            serde_json::from_value(serde_json::json!({
                "path": path, "type": "c", "major": 10, "minor": 229, "fileMode": 0o600
            }))
            .unwrap()
        };
        let node = device_node(0, root, &device("/dev/fuse")).unwrap();
        assert_eq!(node.mode, libc::S_IFCHR | 0o600);
        assert_eq!(node.device, libc::makedev(10, 229));
        assert!(device_node(0, root, &device("/etc/x")).is_err());
        assert_eq!(default_devices().len(), 6);
    }
}
