//! Container filesystems on the host side of virtio-fs. The pod's shared
//! directory is bind-mounted onto itself and made a shared mount, so the
//! mounts the shim adds under it later reach virtiofsd's own mount
//! namespace. Each container gets `shared/<id>/rootfs` (containerd's
//! snapshot mounts, or a bind of the bundle's rootfs) and
//! `shared/<id>/mounts/<n>` for the spec's host bind mounts; the spec is
//! rewritten to the guest's view of those paths.

use crate::beneath::{self, BeneathError};
use crate::vm::layout::{PodLayout, GUEST_SHARED_DIR};
use containerd_shim::protos::api::Mount as ContainerdMount;
use microvm_host::mountinfo::MountinfoError;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Spec;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Unmount passes over a tree before giving up (mounts can be stacked).
const UNMOUNT_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spec has no root path and containerd gave no rootfs mounts")]
    NoRoot,
    #[error("container id {0:?} is not a single path component")]
    BadId(String),
    #[error("in the shared dir")]
    Beneath(#[from] BeneathError),
    #[error("cannot list mounts; removing nothing")]
    Mountinfo(#[source] MountinfoError),
    #[error("not removing {path}: {count} mount(s) left under it")]
    MountsLeft { path: PathBuf, count: usize },
}

fn create_dir(path: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(|source| RootfsError::Create {
        path: path.to_path_buf(),
        source,
    })
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce(nix::Error) -> RootfsError {
    let (what, target) = (what.to_string(), target.to_path_buf());
    move |errno| RootfsError::Mount {
        what,
        target,
        source: errno.into(),
    }
}

/// Creates the pod's shared directory as a shared mount of its own,
/// `nosuid,nodev`. Runs before the guest exists, on host-owned paths.
pub fn prepare_shared_dir(layout: &PodLayout) -> Result<(), RootfsError> {
    let shared = layout.shared_dir();
    create_dir(&shared)?;
    // The pod's sockets, pid files and shared files: root only.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| RootfsError::Create {
                path: layout.dir.clone(),
                source,
            },
        )?;
    }
    mount(
        Some(&shared),
        &shared,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("the shared dir", &shared))?;
    mount(
        None::<&str>,
        &shared,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(mount_err("nosuid,nodev", &shared))?;
    mount(
        None::<&str>,
        &shared,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(mount_err("shared propagation", &shared))
}

/// Unmounts everything at and below `path` (deepest first, lazily) and
/// removes it. Idempotent. A failure is logged and counted (the
/// `teardown_failures` metric) here, the one place every teardown passes,
/// and returned for the caller to report.
pub fn remove_mounted_tree(path: &Path) -> Result<(), RootfsError> {
    try_remove_mounted_tree(path, microvm_host::mountinfo::mounts_under).inspect_err(|err| {
        crate::metrics::record_teardown_failure();
        tracing::error!(
            "teardown of {}: {}",
            path.display(),
            crate::pod::error_chain(err)
        );
    })
}

/// [`remove_mounted_tree`] with the mount list injected. Fails closed: if
/// the mounts cannot be listed, or one is left, nothing is removed; and the
/// removal itself never crosses a mount point nor follows a symlink
/// ([`beneath::remove_tree`]), so even a mount the list missed keeps its
/// source. Unmounts go through [`beneath::unmount_below`].
pub fn try_remove_mounted_tree(
    path: &Path,
    mounts_under: impl Fn(&Path) -> Result<Vec<PathBuf>, MountinfoError>,
) -> Result<(), RootfsError> {
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(meta) if !meta.is_dir() => {
            // The guest replaced a container dir by a link or file: the
            // entry itself goes, nothing it points to.
            return beneath::remove_tree(path).map_err(RootfsError::from);
        }
        _ => {}
    }
    let root = beneath::open_root(path)?;
    for _ in 0..UNMOUNT_ROUNDS {
        let points = mounts_under(path).map_err(RootfsError::Mountinfo)?;
        if points.is_empty() {
            break;
        }
        for point in &points {
            if let Err(err) = beneath::unmount_below(root.as_fd(), path, point) {
                tracing::warn!("{}", crate::pod::error_chain(&err));
            }
        }
    }
    let left = mounts_under(path).map_err(RootfsError::Mountinfo)?;
    if !left.is_empty() {
        return Err(RootfsError::MountsLeft {
            path: path.to_path_buf(),
            count: left.len(),
        });
    }
    drop(root);
    beneath::remove_tree(path).map_err(RootfsError::from)
}

fn single_component(id: &str) -> Result<&Path, RootfsError> {
    let path = Path::new(id);
    let mut components = path.components();
    match (components.next(), components.next()) {
        (Some(std::path::Component::Normal(_)), None) => Ok(path),
        _ => Err(RootfsError::BadId(id.to_string())),
    }
}

/// Mounts the container's rootfs and host bind mounts under the shared dir
/// and points `spec` at the guest's view of them. Every step below the
/// shared dir is fd-relative ([`beneath`]): a symlink the guest planted
/// fails the container instead of redirecting the host.
pub async fn prepare_container(
    layout: &PodLayout,
    container_id: &str,
    bundle: &Path,
    rootfs_mounts: &[ContainerdMount],
    spec: &mut Spec,
) -> Result<(), RootfsError> {
    let shared = beneath::open_root(&layout.shared_dir())?;
    let container = beneath::mkdir_all(shared.as_fd(), single_component(container_id)?)?;
    let rootfs = beneath::mkdir_all(container.as_fd(), Path::new("rootfs"))?;
    let rootfs_path = layout.container_dir(container_id).join("rootfs");
    if rootfs_mounts.is_empty() {
        let root = spec
            .root()
            .as_ref()
            .map(|root| root.path().clone())
            .ok_or(RootfsError::NoRoot)?;
        let host_root = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        beneath::bind(&host_root, rootfs.as_fd(), false)?;
    } else {
        // containerd's helper takes a path: the fd's magic link names
        // exactly the directory opened above.
        let target = beneath::fd_path(rootfs.as_fd());
        for m in rootfs_mounts {
            containerd_shim::asynchronous::util::mount_rootfs(m, &target)
                .await
                .map_err(|err| RootfsError::Mount {
                    what: format!("{} ({})", m.source, m.type_),
                    target: rootfs_path.clone(),
                    source: std::io::Error::other(err.to_string()),
                })?;
        }
        // containerd's mount options rarely say nosuid,nodev; the guest
        // writes the upper layer (setuid bits and device nodes included),
        // so the host's view of it gets neither.
        drop(rootfs);
        beneath::harden_mount(container.as_fd(), Path::new("rootfs"))?;
    }
    adapt_namespaces(spec);
    let guest_container_dir = format!("{GUEST_SHARED_DIR}/{container_id}");
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(format!("{guest_container_dir}/rootfs")));
    }
    share_bind_mounts(container.as_fd(), &guest_container_dir, spec)
}

/// Namespaces for the guest: the pod's network is the VM's own, so a
/// container never gets a network namespace of its own; a namespace given
/// by a host path (CRI's `/proc/<pause pid>/ns/...`) means nothing in the
/// guest, so the container shares the VM's; except a PID namespace given by
/// path (kubelet's shareProcessNamespace), which is kept: the agent then
/// joins the pod's PID namespace (the sandbox is created with one).
pub fn adapt_namespaces(spec: &mut Spec) {
    use oci_spec::runtime::LinuxNamespaceType;
    let Some(linux) = spec.linux_mut() else {
        return;
    };
    let Some(namespaces) = linux.namespaces().clone() else {
        return;
    };
    let kept: Vec<_> = namespaces
        .into_iter()
        .filter(|ns| {
            ns.typ() != LinuxNamespaceType::Network
                && (ns.path().is_none() || ns.typ() == LinuxNamespaceType::Pid)
        })
        .collect();
    linux.set_namespaces(Some(kept));
}

/// Host bind mounts in the spec (CRI's /etc/hosts, resolv.conf, volumes)
/// are bound into `mounts/<n>` and their source rewritten for the guest.
/// A mount with `ro` is read-only on the host bind too (the guest could
/// otherwise remount it or write through the raw share); all are
/// `nosuid,nodev`.
fn share_bind_mounts(
    container: std::os::fd::BorrowedFd<'_>,
    guest_container_dir: &str,
    spec: &mut Spec,
) -> Result<(), RootfsError> {
    let Some(mut mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    let mut mounts_dir = None;
    for (index, m) in mounts.iter_mut().enumerate() {
        let options = m.options().clone().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        let Some(source) = m.source().clone() else {
            continue;
        };
        if !is_bind || !source.is_absolute() || !source.exists() {
            continue;
        }
        let readonly = options.iter().any(|o| o == "ro");
        let dir = match &mounts_dir {
            Some(dir) => dir,
            None => mounts_dir.insert(beneath::mkdir_all(container, Path::new("mounts"))?),
        };
        let name = PathBuf::from(index.to_string());
        let target = if source.is_dir() {
            beneath::mkdir_all(dir.as_fd(), &name)?
        } else {
            beneath::create_file(dir.as_fd(), &name)?
        };
        beneath::bind(&source, target.as_fd(), readonly)?;
        m.set_source(Some(PathBuf::from(format!(
            "{guest_container_dir}/mounts/{index}"
        ))));
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{MountBuilder, RootBuilder, SpecBuilder};

    fn is_mountpoint(path: &Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let wanted = path.to_str().unwrap();
        mounts
            .lines()
            .any(|line| line.split_whitespace().nth(4) == Some(wanted))
    }

    #[test]
    fn network_and_host_path_namespaces_are_dropped_but_a_shared_pid_namespace() {
        use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, LinuxNamespaceType};
        let namespace = |typ, path: Option<&str>| {
            let mut builder = LinuxNamespaceBuilder::default().typ(typ);
            if let Some(path) = path {
                builder = builder.path(path);
            }
            builder.build().unwrap()
        };
        let mut spec = SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .namespaces(vec![
                        namespace(LinuxNamespaceType::Pid, None),
                        namespace(LinuxNamespaceType::Network, None),
                        namespace(LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc")),
                        namespace(LinuxNamespaceType::Mount, None),
                        namespace(LinuxNamespaceType::Pid, Some("/proc/42/ns/pid")),
                    ])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        adapt_namespaces(&mut spec);
        let kept: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|ns| ns.typ())
            .collect();
        assert_eq!(
            kept,
            [
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Pid
            ]
        );
    }

    /// Needs root (mount); the CI and dev machines run as root.
    #[tokio::test]
    async fn bundle_rootfs_and_bind_mounts_are_shared_and_removed() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for mount(2)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layout = PodLayout {
            dir: tmp.path().join("pod"),
            log_file: tmp.path().join("pod.log"),
        };
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        std::fs::write(bundle.join("rootfs/bin/hello"), "hi").unwrap();
        let hosts = tmp.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let mut spec = SpecBuilder::default()
            .root(RootBuilder::default().path("rootfs").build().unwrap())
            .mounts(vec![
                MountBuilder::default()
                    .destination("/proc")
                    .typ("proc")
                    .source("proc")
                    .build()
                    .unwrap(),
                MountBuilder::default()
                    .destination("/etc/hosts")
                    .typ("bind")
                    .source(&hosts)
                    .options(vec!["rbind".to_string(), "ro".to_string()])
                    .build()
                    .unwrap(),
            ])
            .build()
            .unwrap();
        prepare_shared_dir(&layout).unwrap();
        prepare_container(&layout, "c1", &bundle, &[], &mut spec)
            .await
            .unwrap();
        let shared = layout.shared_dir();
        assert!(is_mountpoint(&shared));
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/rootfs/bin/hello")).unwrap(),
            "hi"
        );
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/mounts/1")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/microvm/shared/c1/rootfs")
        );
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/microvm/shared/c1/mounts/1"))
        );

        remove_mounted_tree(&layout.dir).unwrap();
        assert!(!layout.dir.exists());
        assert!(!is_mountpoint(&shared));
        // The sources are untouched.
        assert!(bundle.join("rootfs/bin/hello").exists());
        assert!(hosts.exists());
    }

    fn bind_mount(destination: &str, source: &Path, options: &[&str]) -> oci_spec::runtime::Mount {
        MountBuilder::default()
            .destination(destination)
            .typ("bind")
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    struct Pod {
        tmp: tempfile::TempDir,
        layout: PodLayout,
        bundle: PathBuf,
        volume: PathBuf,
    }

    fn pod() -> Pod {
        let tmp = tempfile::tempdir().unwrap();
        let layout = PodLayout {
            dir: tmp.path().join("pod"),
            log_file: tmp.path().join("pod.log"),
        };
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(volume.join("precious"), "v1").unwrap();
        prepare_shared_dir(&layout).unwrap();
        Pod {
            tmp,
            layout,
            bundle,
            volume,
        }
    }

    fn spec_with(mounts: Vec<oci_spec::runtime::Mount>) -> Spec {
        SpecBuilder::default()
            .root(RootBuilder::default().path("rootfs").build().unwrap())
            .mounts(mounts)
            .build()
            .unwrap()
    }

    /// The mount options of the mount point `point` (which must be one).
    fn mount_options(point: &Path) -> String {
        microvm_host::mountinfo::mounts()
            .unwrap()
            .into_iter()
            .find(|m| m.mount_point == point)
            .unwrap_or_else(|| panic!("{} is not a mount point", point.display()))
            .mount_options
    }

    fn root() -> bool {
        if nix::unistd::Uid::effective().is_root() {
            true
        } else {
            eprintln!("skipped: needs root for mount(2)");
            false
        }
    }

    /// The attack: the guest renames the dir holding a container's
    /// `mounts/` to a name with byte 0xff. The old string parser then saw
    /// no mounts and `remove_dir_all` emptied the volume's source.
    #[tokio::test]
    async fn a_volume_under_a_non_utf8_parent_survives_teardown() {
        use std::os::unix::ffi::OsStrExt;
        if !root() {
            return;
        }
        let pod = pod();
        let mut spec = spec_with(vec![bind_mount("/data", &pod.volume, &["rbind", "rw"])]);
        prepare_container(&pod.layout, "c1", &pod.bundle, &[], &mut spec)
            .await
            .unwrap();
        let c1 = pod.layout.container_dir("c1");
        let renamed = c1.join(std::ffi::OsStr::from_bytes(b"m\xff"));
        std::fs::rename(c1.join("mounts"), &renamed).unwrap();
        assert!(renamed.join("0/precious").exists());
        remove_mounted_tree(&pod.layout.dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(pod.volume.join("precious")).unwrap(),
            "v1"
        );
        assert!(!pod.layout.dir.exists(), "the pod dir is removed");
        assert!(microvm_host::mountinfo::mounts_under(pod.tmp.path())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_failed_teardown_is_counted_returned_and_removes_nothing_more() {
        if !root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pod");
        let pinned = dir.join("c1/pinned");
        std::fs::create_dir_all(pinned.parent().unwrap()).unwrap();
        std::fs::write(&pinned, "").unwrap();
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&pinned)
                .status()
                .is_ok_and(|status| status.success())
        };
        // An immutable file cannot be unlinked, even by root.
        if !chattr("+i") {
            eprintln!("skipped: chattr +i failed (no chattr, or the temp dir's filesystem has no immutable flag)");
            return;
        }
        let before = crate::metrics::teardown_failures();
        let err = remove_mounted_tree(&dir).unwrap_err();
        assert!(matches!(err, RootfsError::Beneath(_)), "{err}");
        assert!(crate::metrics::teardown_failures() > before);
        assert!(pinned.exists());
        assert!(chattr("-i"));
        remove_mounted_tree(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn unreadable_mountinfo_removes_nothing() {
        if !root() {
            return;
        }
        let pod = pod();
        let mut spec = spec_with(vec![bind_mount("/data", &pod.volume, &["rbind"])]);
        prepare_container(&pod.layout, "c1", &pod.bundle, &[], &mut spec)
            .await
            .unwrap();
        let err = try_remove_mounted_tree(&pod.layout.dir, |_| {
            Err(MountinfoError::Malformed { line: 1 })
        })
        .unwrap_err();
        assert!(matches!(err, RootfsError::Mountinfo(_)), "{err}");
        // A mount list that lies (empty) still deletes nothing through a
        // bind: the removal stops at mount points.
        let err = try_remove_mounted_tree(&pod.layout.dir, |_| Ok(Vec::new())).unwrap_err();
        assert!(
            matches!(err, RootfsError::Beneath(BeneathError::MountPoint(_))),
            "{err}"
        );
        assert!(pod.volume.join("precious").exists());
        remove_mounted_tree(&pod.layout.dir).unwrap();
        assert!(!pod.layout.dir.exists());
        assert!(pod.volume.join("precious").exists());
    }

    #[tokio::test]
    async fn a_planted_symlink_in_shared_redirects_nothing() {
        use std::os::unix::fs::symlink;
        if !root() {
            return;
        }
        let pod = pod();
        let outside = pod.tmp.path().join("x");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("0"), "host file").unwrap();
        let shared = pod.layout.shared_dir();
        // The guest guessed the next container's id.
        std::fs::create_dir_all(shared.join("c2")).unwrap();
        symlink(&outside, shared.join("c2/mounts")).unwrap();
        symlink(&outside, shared.join("c3")).unwrap();
        let hosts = pod.tmp.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        for id in ["c2", "c3"] {
            let mut spec = spec_with(vec![bind_mount("/etc/hosts", &hosts, &["rbind"])]);
            let err = prepare_container(&pod.layout, id, &pod.bundle, &[], &mut spec)
                .await
                .unwrap_err();
            assert!(matches!(err, RootfsError::Beneath(_)), "{id}: {err}");
        }
        let err = prepare_container(
            &pod.layout,
            "../c4",
            &pod.bundle,
            &[],
            &mut spec_with(vec![]),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RootfsError::BadId(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(outside.join("0")).unwrap(),
            "host file"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        assert!(microvm_host::mountinfo::mounts_under(&outside)
            .unwrap()
            .is_empty());
        // Teardown removes the links, not what they point to.
        remove_mounted_tree(&pod.layout.container_dir("c3")).unwrap();
        remove_mounted_tree(&pod.layout.dir).unwrap();
        assert!(!pod.layout.dir.exists());
        assert!(outside.join("0").exists());
    }

    #[tokio::test]
    async fn a_readonly_volume_is_readonly_through_the_raw_share() {
        if !root() {
            return;
        }
        let pod = pod();
        let mut spec = spec_with(vec![
            bind_mount("/ro", &pod.volume, &["rbind", "ro"]),
            bind_mount("/rw", &pod.volume, &["rbind", "rw"]),
        ]);
        prepare_container(&pod.layout, "c1", &pod.bundle, &[], &mut spec)
            .await
            .unwrap();
        let mounts = pod.layout.container_dir("c1").join("mounts");
        let err = std::fs::write(mounts.join("0/precious"), "evil").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            std::fs::read_to_string(pod.volume.join("precious")).unwrap(),
            "v1"
        );
        std::fs::write(mounts.join("1/new"), "ok").unwrap();
        assert!(mount_options(&mounts.join("0")).starts_with("ro,"));
        for point in [mounts.join("0"), mounts.join("1"), pod.layout.shared_dir()] {
            let options = mount_options(&point);
            assert!(
                options.contains("nosuid") && options.contains("nodev"),
                "{options}"
            );
        }
        remove_mounted_tree(&pod.layout.dir).unwrap();
        assert!(pod.volume.join("new").exists());
    }

    #[tokio::test]
    async fn an_overlay_rootfs_is_nosuid_nodev_on_the_host() {
        if !root() {
            return;
        }
        let pod = pod();
        let layers = pod.tmp.path().join("layers");
        for dir in ["lower", "upper", "work"] {
            std::fs::create_dir_all(layers.join(dir)).unwrap();
        }
        std::fs::write(layers.join("lower/hello"), "hi").unwrap();
        let overlay = ContainerdMount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir={}", layers.join("lower").display()),
                format!("upperdir={}", layers.join("upper").display()),
                format!("workdir={}", layers.join("work").display()),
            ],
            ..Default::default()
        };
        let mut spec = spec_with(vec![]);
        prepare_container(&pod.layout, "c1", &pod.bundle, &[overlay], &mut spec)
            .await
            .unwrap();
        let rootfs = pod.layout.container_dir("c1").join("rootfs");
        assert_eq!(std::fs::read_to_string(rootfs.join("hello")).unwrap(), "hi");
        let options = mount_options(&rootfs);
        assert!(
            options.contains("nosuid") && options.contains("nodev"),
            "{options}"
        );
        remove_mounted_tree(&pod.layout.dir).unwrap();
        assert!(layers.join("lower/hello").exists());
    }
}
