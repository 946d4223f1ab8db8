//! Container filesystems on the host side of virtio-fs. The pod's shared
//! directory is bind-mounted onto itself and made a shared mount, so the
//! mounts the shim adds under it later reach virtiofsd's own mount
//! namespace. Each container gets `shared/<id>/rootfs` (containerd's
//! snapshot mounts, or a bind of the bundle's rootfs) and
//! `shared/<id>/mounts/<n>` for the spec's host bind mounts; the spec is
//! rewritten to the guest's view of those paths.

use crate::vm::layout::{PodLayout, GUEST_SHARED_DIR};
use containerd_shim::protos::api::Mount as ContainerdMount;
use nix::mount::{mount, MntFlags, MsFlags};
use oci_spec::runtime::Spec;
use std::path::{Path, PathBuf};

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
}

fn create_dir(path: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(|source| RootfsError::Create {
        path: path.to_path_buf(),
        source,
    })
}

fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<(), RootfsError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC | flags,
        None::<&str>,
    )
    .map_err(|errno| RootfsError::Mount {
        what: source.display().to_string(),
        target: target.to_path_buf(),
        source: errno.into(),
    })
}

/// Creates the pod's shared directory as a shared mount of its own.
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
    bind(&shared, &shared, MsFlags::empty())?;
    mount(
        None::<&str>,
        &shared,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|errno| RootfsError::Mount {
        what: "shared propagation".into(),
        target: shared.clone(),
        source: errno.into(),
    })
}

/// Mount points at or below `path`, deepest first, from
/// /proc/self/mountinfo (field 5, with its octal escapes decoded).
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(path))
        .collect();
    found.sort_by_key(|point| std::cmp::Reverse(point.as_os_str().len()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at and below `path` (deepest first, lazily) and
/// removes it. Idempotent. If a mount is left (unmount failed), nothing is
/// removed: removing through a bind mount would delete its source.
pub fn remove_mounted_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    // `Path::starts_with` compares whole components: pod `a` never
    // matches pod `ab`.
    for point in mounts_under(path) {
        if let Err(err) = nix::mount::umount2(&point, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {err}", point.display());
        }
    }
    let left = mounts_under(path);
    if !left.is_empty() {
        tracing::error!(
            "not removing {}: {} mount(s) left under it",
            path.display(),
            left.len()
        );
        return;
    }
    if let Err(err) = std::fs::remove_dir_all(path) {
        tracing::warn!("removing {}: {err}", path.display());
    }
}

/// Mounts the container's rootfs and host bind mounts under the shared dir
/// and points `spec` at the guest's view of them.
pub async fn prepare_container(
    layout: &PodLayout,
    container_id: &str,
    bundle: &Path,
    rootfs_mounts: &[ContainerdMount],
    spec: &mut Spec,
) -> Result<(), RootfsError> {
    let dir = layout.container_dir(container_id);
    let rootfs = dir.join("rootfs");
    create_dir(&rootfs)?;
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
        bind(&host_root, &rootfs, MsFlags::empty())?;
    } else {
        for m in rootfs_mounts {
            containerd_shim::asynchronous::util::mount_rootfs(m, &rootfs)
                .await
                .map_err(|err| RootfsError::Mount {
                    what: format!("{} ({})", m.source, m.type_),
                    target: rootfs.clone(),
                    source: std::io::Error::other(err.to_string()),
                })?;
        }
    }
    adapt_namespaces(spec);
    let guest_container_dir = format!("{GUEST_SHARED_DIR}/{container_id}");
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(format!("{guest_container_dir}/rootfs")));
    }
    share_bind_mounts(&dir, &guest_container_dir, spec)
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
fn share_bind_mounts(
    container_dir: &Path,
    guest_container_dir: &str,
    spec: &mut Spec,
) -> Result<(), RootfsError> {
    let Some(mut mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    for (index, m) in mounts.iter_mut().enumerate() {
        let is_bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .as_ref()
                .is_some_and(|options| options.iter().any(|o| o == "bind" || o == "rbind"));
        let Some(source) = m.source().clone() else {
            continue;
        };
        if !is_bind || !source.is_absolute() || !source.exists() {
            continue;
        }
        let target = container_dir.join("mounts").join(index.to_string());
        if source.is_dir() {
            create_dir(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                create_dir(parent)?;
            }
            std::fs::write(&target, b"").map_err(|err| RootfsError::Create {
                path: target.clone(),
                source: err,
            })?;
        }
        bind(&source, &target, MsFlags::empty())?;
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

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/odd\\"), "/odd\\");
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

        remove_mounted_tree(&layout.dir);
        assert!(!layout.dir.exists());
        assert!(!is_mountpoint(&shared));
        // The sources are untouched.
        assert!(bundle.join("rootfs/bin/hello").exists());
        assert!(hosts.exists());
    }
}
