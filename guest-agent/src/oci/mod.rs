//! OCI runtime spec → what the agent does: the container's namespaces,
//! filesystem plan, process, seccomp filters and cgroup settings.
//!
//! Namespaces in a pod VM: the VM is the pod, so its own network, IPC and
//! UTS namespaces are the pod's. A spec entry with a `path` (a host path,
//! meaningless in the guest) means "the pod's": the container shares the
//! VM's namespace, or the sandbox's PID namespace. An entry without a path
//! gets a new namespace, as runc gives it. User namespaces and joining a
//! mount namespace are not supported.

pub mod mounts;
pub mod privileged;
pub mod process;
pub mod seccomp;

use crate::spawn::plan::{c_string, DeviceNode, MountStep, RootfsPlan};
use mounts::CgroupMountSource;
use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceType, LinuxNamespaceType, LinuxResources, Mount, Spec,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the OCI spec does not parse")]
    Parse(#[source] serde_json::Error),
    #[error("the OCI spec has no {0}")]
    Missing(&'static str),
    #[error("{field}: {reason}")]
    InvalidValue { field: String, reason: String },
    #[error("not supported in a pod VM: {0}")]
    Unsupported(String),
    #[error("the rootfs {path} does not exist or is not a directory")]
    RootfsMissing { path: String },
    #[error("the source {source_path} of the mount on {destination} is missing: {reason}")]
    MountSourceMissing {
        destination: String,
        source_path: String,
        reason: String,
    },
    #[error("the spec asks for the pod's PID namespace, but the sandbox was not created with share_pid_namespace")]
    NoPodPidNamespace,
    #[error(transparent)]
    Nul(#[from] crate::spawn::plan::InteriorNul),
}

impl SpecError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::RootfsMissing { .. } | Self::MountSourceMissing { .. } => tonic::Code::NotFound,
            Self::NoPodPidNamespace => tonic::Code::FailedPrecondition,
            _ => tonic::Code::InvalidArgument,
        }
    }
}

pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    serde_json::from_slice(json).map_err(SpecError::Parse)
}

/// How the container's namespaces come about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NamespacePlan {
    /// CLONE_NEW* flags for clone3.
    pub new_namespaces: u64,
    /// Join the sandbox's PID namespace.
    pub join_pod_pid: bool,
    pub own_uts: bool,
    pub own_cgroup: bool,
}

pub fn namespace_plan(
    spec: &Spec,
    pod_has_pid_namespace: bool,
) -> Result<NamespacePlan, SpecError> {
    let mut plan = NamespacePlan::default();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.namespaces().clone())
        .unwrap_or_default();
    let mut has_mount = false;
    for namespace in &namespaces {
        let shared = namespace.path().is_some();
        let flag = match namespace.typ() {
            LinuxNamespaceType::Mount => {
                if shared {
                    return Err(SpecError::Unsupported(
                        "joining an existing mount namespace".into(),
                    ));
                }
                has_mount = true;
                libc::CLONE_NEWNS
            }
            LinuxNamespaceType::User => {
                return Err(SpecError::Unsupported("user namespaces".into()))
            }
            LinuxNamespaceType::Time => {
                if shared {
                    return Err(SpecError::Unsupported(
                        "joining an existing time namespace".into(),
                    ));
                }
                libc::CLONE_NEWTIME
            }
            LinuxNamespaceType::Pid => {
                if shared {
                    if !pod_has_pid_namespace {
                        return Err(SpecError::NoPodPidNamespace);
                    }
                    plan.join_pod_pid = true;
                    continue;
                }
                libc::CLONE_NEWPID
            }
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => {
                plan.own_uts = !shared;
                libc::CLONE_NEWUTS
            }
            LinuxNamespaceType::Cgroup => {
                plan.own_cgroup = !shared;
                libc::CLONE_NEWCGROUP
            }
        };
        if !shared {
            plan.new_namespaces |= flag as u64;
        }
    }
    if !has_mount {
        return Err(SpecError::InvalidValue {
            field: "linux.namespaces".into(),
            reason: "a mount namespace is required (the agent pivots into the rootfs)".into(),
        });
    }
    Ok(plan)
}

/// Texts for the plan's steps, so a child's (step, index) failure reads as
/// "mount of proc on /proc".
#[derive(Debug, Default, Clone)]
pub struct SetupLabels {
    pub mounts: Vec<String>,
    pub devices: Vec<String>,
    pub symlinks: Vec<String>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctls: Vec<String>,
}

/// Everything about a container but its process, ready for the child.
pub struct ContainerSetup {
    pub rootfs_path: PathBuf,
    pub rootfs: RootfsPlan,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    pub sysctls: Vec<(CString, CString)>,
    pub seccomp: Option<seccomp::CompiledSeccomp>,
    pub labels: SetupLabels,
    pub resources: Option<LinuxResources>,
}

/// The rootfs directory of `spec`: root.path, relative to `bundle`.
pub fn rootfs_path(spec: &Spec, bundle: Option<&Path>) -> Result<PathBuf, SpecError> {
    let root = spec.root().as_ref().ok_or(SpecError::Missing("root"))?;
    let path = root.path();
    let full = if path.is_absolute() {
        path.clone()
    } else {
        match bundle {
            Some(bundle) => bundle.join(path),
            None => {
                return Err(SpecError::InvalidValue {
                    field: "root.path".into(),
                    reason: format!(
                        "{} is relative and the request has no bundle_path",
                        path.display()
                    ),
                })
            }
        }
    };
    if !full.is_dir() {
        return Err(SpecError::RootfsMissing {
            path: full.display().to_string(),
        });
    }
    Ok(full)
}

/// Everything about a container but its process, from `spec`: its mounts,
/// devices, /dev symlinks, masked and read-only paths, propagation,
/// sysctls, host and domain name, and seccomp filter.
pub fn container_setup(
    spec: &Spec,
    bundle: Option<&Path>,
    namespaces: &NamespacePlan,
    cgroup_dir: &Path,
) -> Result<ContainerSetup, SpecError> {
    let rootfs_path = rootfs_path(spec, bundle)?;
    let linux = spec.linux().clone().unwrap_or_default();
    let cgroup_source = if namespaces.own_cgroup {
        CgroupMountSource::Namespace
    } else {
        CgroupMountSource::Bind(cgroup_dir.to_path_buf())
    };
    let spec_mounts = spec.mounts().clone().unwrap_or_default();
    let planned_mounts = mount_steps(&spec_mounts, &rootfs_path, bundle, &cgroup_source)?;

    let has_dev_mount = spec_mounts
        .iter()
        .any(|mount| mount.destination() == Path::new("/dev"));
    let has_devpts = spec_mounts
        .iter()
        .any(|mount| mount.destination() == Path::new("/dev/pts"));
    let spec_devices = linux.devices().clone().unwrap_or_default();
    let devices = device_nodes(&spec_devices, has_dev_mount, &rootfs_path)?;
    let symlinks = if has_dev_mount {
        dev_symlinks(&rootfs_path, has_devpts)?
    } else {
        Labelled::default()
    };

    let masked = absolute_paths("linux.maskedPaths", linux.masked_paths().clone())?;
    let readonly = absolute_paths("linux.readonlyPaths", linux.readonly_paths().clone())?;
    let (initial_propagation, final_propagation) =
        rootfs_propagation(linux.rootfs_propagation().as_deref().unwrap_or(""))?;
    let sysctls = namespaced_sysctls(linux.sysctl().clone().unwrap_or_default())?;
    let (hostname, domainname) = uts_names(spec, namespaces)?;
    let seccomp = linux.seccomp().as_ref().map(seccomp::compile).transpose()?;
    let readonly_root = spec
        .root()
        .as_ref()
        .and_then(|root| root.readonly())
        .unwrap_or(false);

    let labels = SetupLabels {
        mounts: planned_mounts.labels,
        devices: devices.labels,
        symlinks: symlinks.labels,
        masked_paths: masked.iter().map(|(_, path)| path.clone()).collect(),
        readonly_paths: readonly.iter().map(|(_, path)| path.clone()).collect(),
        sysctls: sysctls.labels,
    };
    Ok(ContainerSetup {
        rootfs: RootfsPlan {
            root: mounts::path_c_string("root.path", &rootfs_path)?,
            initial_propagation,
            final_propagation,
            mounts: planned_mounts.items,
            devices: devices.items,
            symlinks: symlinks.items,
            masked_paths: masked.into_iter().map(|(path, _)| path).collect(),
            readonly_paths: readonly.into_iter().map(|(path, _)| path).collect(),
            readonly_root,
        },
        rootfs_path,
        hostname,
        domainname,
        sysctls: sysctls.items,
        seccomp,
        labels,
        resources: linux.resources().clone(),
    })
}

/// Steps of a plan and a label for each, for the child's failure messages.
struct Labelled<T> {
    items: Vec<T>,
    labels: Vec<String>,
}

impl<T> Default for Labelled<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            labels: Vec::new(),
        }
    }
}

/// The spec's mounts, resolved inside the rootfs, and their labels.
fn mount_steps(
    spec_mounts: &[Mount],
    rootfs_path: &Path,
    bundle: Option<&Path>,
    cgroup_source: &CgroupMountSource,
) -> Result<Labelled<MountStep>, SpecError> {
    let mut steps = Vec::with_capacity(spec_mounts.len());
    let mut labels = Vec::with_capacity(spec_mounts.len());
    for (index, mount) in spec_mounts.iter().enumerate() {
        steps.push(mounts::mount_step(
            index,
            mount,
            rootfs_path,
            bundle,
            cgroup_source,
        )?);
        labels.push(format!(
            "mount of {} {} on {}",
            mount.typ().as_deref().unwrap_or("(no type)"),
            mount
                .source()
                .as_ref()
                .map(|source| source.display().to_string())
                .unwrap_or_default(),
            mount.destination().display()
        ));
    }
    Ok(Labelled {
        items: steps,
        labels,
    })
}

/// The device nodes to create: the default ones when the spec mounts its
/// own /dev (unless the spec lists them itself), then the spec's.
fn device_nodes(
    spec_devices: &[LinuxDevice],
    has_dev_mount: bool,
    rootfs_path: &Path,
) -> Result<Labelled<DeviceNode>, SpecError> {
    let mut devices = Vec::new();
    let mut labels = Vec::new();
    if has_dev_mount {
        for device in mounts::default_devices() {
            if spec_devices
                .iter()
                .any(|spec_device| spec_device.path() == device.path())
            {
                continue;
            }
            devices.push(mounts::device_node(devices.len(), rootfs_path, &device)?);
            labels.push(format!("device {}", device.path().display()));
        }
    }
    for (index, device) in spec_devices.iter().enumerate() {
        if device.typ() == LinuxDeviceType::A {
            continue;
        }
        devices.push(mounts::device_node(index, rootfs_path, device)?);
        labels.push(format!("device {}", device.path().display()));
    }
    Ok(Labelled {
        items: devices,
        labels,
    })
}

/// The symlinks of a container's own /dev (fd, stdin, stdout, stderr, and
/// ptmx with a devpts), as (target, link path) pairs, and their labels.
fn dev_symlinks(
    rootfs_path: &Path,
    has_devpts: bool,
) -> Result<Labelled<(CString, CString)>, SpecError> {
    let mut links = vec![
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ];
    if has_devpts {
        links.push(("pts/ptmx", "/dev/ptmx"));
    }
    let mut symlinks = Vec::with_capacity(links.len());
    let mut labels = Vec::with_capacity(links.len());
    for (target, link) in links {
        let link_path = mounts::secure_join(rootfs_path, Path::new(link)).map_err(|err| {
            SpecError::InvalidValue {
                field: "mounts".into(),
                reason: format!("cannot resolve {link}: {err}"),
            }
        })?;
        symlinks.push((
            c_string("symlink", target)?,
            mounts::path_c_string("symlink", &link_path)?,
        ));
        labels.push(format!("symlink {link} -> {target}"));
    }
    Ok(Labelled {
        items: symlinks,
        labels,
    })
}

/// Masked or read-only paths: each absolute, as (C string, text).
fn absolute_paths(
    field: &str,
    paths: Option<Vec<String>>,
) -> Result<Vec<(CString, String)>, SpecError> {
    paths
        .unwrap_or_default()
        .into_iter()
        .map(|path| {
            if !path.starts_with('/') {
                return Err(SpecError::InvalidValue {
                    field: field.to_owned(),
                    reason: format!("{path} is not absolute"),
                });
            }
            Ok((c_string(field, &path)?, path))
        })
        .collect()
}

/// linux.rootfsPropagation as (propagation of "/" before the mounts,
/// propagation of the new "/" after pivot_root).
fn rootfs_propagation(
    propagation: &str,
) -> Result<(libc::c_ulong, Option<libc::c_ulong>), SpecError> {
    Ok(match propagation {
        "" | "slave" | "rslave" => (libc::MS_SLAVE | libc::MS_REC, None),
        "private" | "rprivate" => (libc::MS_PRIVATE | libc::MS_REC, None),
        "shared" | "rshared" => (
            libc::MS_SLAVE | libc::MS_REC,
            Some(libc::MS_SHARED | libc::MS_REC),
        ),
        "unbindable" | "runbindable" => (
            libc::MS_SLAVE | libc::MS_REC,
            Some(libc::MS_UNBINDABLE | libc::MS_REC),
        ),
        other => {
            return Err(SpecError::InvalidValue {
                field: "linux.rootfsPropagation".into(),
                reason: format!("unknown propagation {other:?}"),
            })
        }
    })
}

/// linux.sysctl as (path under /proc/sys, value) pairs, sorted by key, and
/// their labels. Namespaced sysctls only, every refused key named
/// (crate::sysctl); the child writes them before /proc/sys goes read-only.
fn namespaced_sysctls(
    sysctl: HashMap<String, String>,
) -> Result<Labelled<(CString, CString)>, SpecError> {
    let mut sysctl_map: Vec<(String, String)> = sysctl.into_iter().collect();
    sysctl_map.sort();
    let checked = crate::sysctl::check(
        sysctl_map
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str())),
    )
    .map_err(|err| SpecError::InvalidValue {
        field: "linux.sysctl".into(),
        reason: err.to_string(),
    })?;
    let mut sysctls = Vec::with_capacity(checked.len());
    let mut labels = Vec::with_capacity(checked.len());
    for ((key, value), (path, _)) in sysctl_map.iter().zip(checked) {
        sysctls.push((
            c_string("linux.sysctl", &path)?,
            c_string("linux.sysctl", value)?,
        ));
        labels.push(format!("sysctl {key}={value}"));
    }
    Ok(Labelled {
        items: sysctls,
        labels,
    })
}

/// The host and domain name to set: only in the container's own UTS
/// namespace, and only when not empty.
fn uts_names(
    spec: &Spec,
    namespaces: &NamespacePlan,
) -> Result<(Option<CString>, Option<CString>), SpecError> {
    let hostname = match spec.hostname() {
        Some(name) if namespaces.own_uts && !name.is_empty() => Some(c_string("hostname", name)?),
        _ => None,
    };
    let domainname = match spec.domainname() {
        Some(name) if namespaces.own_uts && !name.is_empty() => Some(c_string("domainname", name)?),
        _ => None,
    };
    Ok((hostname, domainname))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn namespaces_with_paths_are_the_pods() {
        let plan = namespace_plan(
            &spec(serde_json::json!({
                "ociVersion": "1.0.2",
                "linux": {"namespaces": [
                    {"type": "mount"}, {"type": "pid"}, {"type": "uts"},
                    {"type": "network", "path": "/var/run/netns/x"},
                    {"type": "ipc", "path": "/proc/1/ns/ipc"},
                    {"type": "cgroup"}
                ]}
            })),
            false,
        )
        .unwrap();
        assert_eq!(
            plan.new_namespaces,
            (libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP)
                as u64
        );
        assert!(plan.own_uts && plan.own_cgroup && !plan.join_pod_pid);
    }

    #[test]
    fn unsupported_namespace_setups_are_refused() {
        let no_mount = namespace_plan(
            &spec(
                serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}]}}),
            ),
            false,
        );
        assert!(matches!(no_mount, Err(SpecError::InvalidValue { .. })));
        let user = namespace_plan(
            &spec(
                serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "mount"}, {"type": "user"}]}}),
            ),
            false,
        );
        assert!(matches!(user, Err(SpecError::Unsupported(_))));
        let pod_pid = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [
            {"type": "mount"}, {"type": "pid", "path": "/proc/9/ns/pid"}]}}),
        );
        assert!(matches!(
            namespace_plan(&pod_pid, false),
            Err(SpecError::NoPodPidNamespace)
        ));
        assert!(namespace_plan(&pod_pid, true).unwrap().join_pod_pid);
    }

    #[test]
    fn only_namespaced_sysctls_pass_and_refused_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let with_sysctls = |sysctls: serde_json::Value| {
            spec(serde_json::json!({
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "linux": {"namespaces": [{"type": "mount"}], "sysctl": sysctls}
            }))
        };
        let setup = |spec: &Spec| {
            container_setup(
                spec,
                Some(dir.path()),
                &NamespacePlan::default(),
                Path::new("/sys/fs/cgroup/x"),
            )
        };
        let ok = setup(&with_sysctls(serde_json::json!({
            "net.ipv4.ip_unprivileged_port_start": "0",
            "kernel.shm_rmid_forced": "1"
        })))
        .ok()
        .unwrap();
        assert_eq!(
            ok.sysctls,
            vec![
                (
                    c"/proc/sys/kernel/shm_rmid_forced".to_owned(),
                    c"1".to_owned()
                ),
                (
                    c"/proc/sys/net/ipv4/ip_unprivileged_port_start".to_owned(),
                    c"0".to_owned()
                ),
            ]
        );
        let err = setup(&with_sysctls(
            serde_json::json!({"kernel.panic": "1", "net.ipv4.ip_forward": "1"}),
        ))
        .err()
        .unwrap();
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string()
                .contains("\"kernel.panic\" is not namespaced"),
            "{err}"
        );
    }

    #[test]
    fn setup_resolves_rootfs_devices_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let spec = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "box",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
            ],
            "linux": {
                "namespaces": [{"type": "mount"}, {"type": "uts"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
            }
        }));
        let namespaces = namespace_plan(&spec, false).unwrap();
        let setup = container_setup(
            &spec,
            Some(dir.path()),
            &namespaces,
            Path::new("/sys/fs/cgroup/x"),
        )
        .unwrap();
        assert_eq!(setup.rootfs_path, dir.path().join("rootfs"));
        assert!(setup.rootfs.readonly_root);
        assert_eq!(setup.rootfs.mounts.len(), 4);
        // No cgroup namespace: the container's cgroup directory is bound.
        let cgroup_mount = &setup.rootfs.mounts[3];
        assert_eq!(cgroup_mount.source.as_deref(), Some(c"/sys/fs/cgroup/x"));
        assert_eq!(cgroup_mount.flags, libc::MS_BIND);
        // Six default devices plus the spec's.
        assert_eq!(setup.rootfs.devices.len(), 7);
        assert_eq!(setup.rootfs.symlinks.len(), 5);
        assert_eq!(setup.hostname.as_deref(), Some(c"box"));
        assert_eq!(setup.labels.mounts[0], "mount of proc proc on /proc");
        assert_eq!(setup.sysctls.len(), 1);
    }

    #[test]
    fn missing_rootfs_is_not_found() {
        let spec = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/nonexistent/rootfs"},
            "linux": {"namespaces": [{"type": "mount"}]}
        }));
        let err = container_setup(
            &spec,
            None,
            &NamespacePlan::default(),
            Path::new("/sys/fs/cgroup/x"),
        )
        .err()
        .unwrap();
        assert_eq!(err.grpc_code(), tonic::Code::NotFound);
        assert!(err.to_string().contains("/nonexistent/rootfs"));
    }
}
