//! Privileged containers see the guest's devices, as runc's see the host's.
//!
//! containerd's CRI, with `privileged_without_host_devices = true` (right
//! for a VM runtime: the host's devices mean nothing in the guest), gives a
//! privileged container no devices and no device rule beyond the defaults.
//! The agent adds the guest's own device nodes (devtmpfs under `/dev`) and
//! an allow rule for each. The spec does not say "privileged": the agent
//! recognises containerd's `oci.WithPrivileged` (every capability
//! containerd has, no masked or read-only paths, no seccomp filter). A container with all of
//! that already owns the guest, so the devices give it nothing more.

use super::process::capability_mask;
use super::SpecError;
use oci_spec::runtime::{
    Capability, LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, Spec,
};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where the guest's devices live (the agent mounts devtmpfs there).
pub const GUEST_DEV: &str = "/dev";

/// Bounds on the walk: devtmpfs of a microVM holds a few dozen nodes.
const MAX_DEPTH: usize = 3;
const MAX_DEVICES: usize = 1024;

/// Capabilities that mark a privileged container: none of them is in
/// containerd's default set, and together they own the guest anyway.
const PRIVILEGED_CAPABILITIES: [Capability; 5] = [
    Capability::SysAdmin,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::NetAdmin,
    Capability::Mknod,
];

/// Dirs and nodes every container gets its own of (devpts, its console,
/// shm and mqueue mounts), never the guest's.
const OWN_PER_CONTAINER: &[&str] = &["pts", "ptmx", "console", "shm", "mqueue"];

/// Whether `spec` is what containerd's `oci.WithPrivileged` makes: the
/// capabilities no default container has in the bounding set, no masked
/// or read-only paths, no seccomp filter.
pub fn is_privileged(spec: &Spec, last_capability: u32) -> Result<bool, SpecError> {
    let Some(process) = spec.process() else {
        return Ok(false);
    };
    let bounding = process
        .capabilities()
        .as_ref()
        .and_then(|caps| caps.bounding().as_ref());
    // containerd grants the capabilities it has itself, which may be fewer
    // than all (root without CAP_SYS_RESOURCE, as on our CI hosts): the
    // ones no unprivileged container gets by default must be there.
    let required = capability_mask(Some(&PRIVILEGED_CAPABILITIES.into()), last_capability)?;
    if capability_mask(bounding, last_capability)? & required != required {
        return Ok(false);
    }
    let Some(linux) = spec.linux() else {
        return Ok(true);
    };
    let empty = |paths: &Option<Vec<String>>| paths.as_ref().is_none_or(Vec::is_empty);
    Ok(empty(linux.masked_paths()) && empty(linux.readonly_paths()) && linux.seccomp().is_none())
}

/// The character and block devices under `dev` (symlinks and other files
/// left out), as spec devices with their owner and mode.
pub fn guest_devices(dev: &Path) -> Vec<LinuxDevice> {
    let mut found = Vec::new();
    walk(dev, Path::new(GUEST_DEV), 0, &mut found);
    found.sort_by(|a, b| a.path().cmp(b.path()));
    found
}

fn walk(dir: &Path, as_path: &Path, depth: usize, found: &mut Vec<LinuxDevice>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if found.len() >= MAX_DEVICES {
            return;
        }
        let name = entry.file_name();
        if depth == 0 && OWN_PER_CONTAINER.iter().any(|own| name == *own) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let file_type = meta.file_type();
        let kind = if file_type.is_char_device() {
            LinuxDeviceType::C
        } else if file_type.is_block_device() {
            LinuxDeviceType::B
        } else {
            if file_type.is_dir() && depth + 1 < MAX_DEPTH {
                walk(&entry.path(), &as_path.join(&name), depth + 1, found);
            }
            continue;
        };
        let rdev = meta.rdev();
        let device = LinuxDeviceBuilder::default()
            .path(as_path.join(&name))
            .typ(kind)
            .major(i64::from(nix::sys::stat::major(rdev) as u32))
            .minor(i64::from(nix::sys::stat::minor(rdev) as u32))
            .file_mode(meta.mode() & 0o7777)
            .uid(meta.uid())
            .gid(meta.gid())
            .build();
        if let Ok(device) = device {
            found.push(device);
        }
    }
}

/// Adds `devices` the spec does not list already to `linux.devices`, with
/// an allow rule each (appended: the last matching rule wins). Returns the
/// paths added.
pub fn add_devices(spec: &mut Spec, devices: Vec<LinuxDevice>) -> Vec<PathBuf> {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut listed = linux.devices().clone().unwrap_or_default();
    let defaults = super::mounts::default_devices();
    let mut resources = linux.resources().clone().unwrap_or_default();
    let mut rules = resources.devices().clone().unwrap_or_default();
    let mut added = Vec::new();
    for device in devices {
        let known = |list: &[LinuxDevice]| list.iter().any(|d| d.path() == device.path());
        if known(&listed) || known(&defaults) {
            continue;
        }
        let rule = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(device.typ())
            .major(device.major())
            .minor(device.minor())
            .access("rwm")
            .build();
        let Ok(rule) = rule else {
            continue;
        };
        rules.push(rule);
        added.push(device.path().clone());
        listed.push(device);
    }
    resources.set_devices(Some(rules));
    linux.set_resources(Some(resources));
    linux.set_devices(Some(listed));
    spec.set_linux(Some(linux));
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    fn all_caps() -> Vec<String> {
        caps::all().iter().map(|cap| cap.to_string()).collect()
    }

    #[test]
    fn only_containerds_privileged_shape_is_privileged() {
        let last = 40;
        let privileged = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0},
                        "capabilities": {"bounding": all_caps()}},
            "linux": {}
        }));
        assert!(is_privileged(&privileged, last).unwrap());
        // containerd running without CAP_SYS_RESOURCE grants all but it.
        let without_resource: Vec<String> = all_caps()
            .into_iter()
            .filter(|cap| cap != "CAP_SYS_RESOURCE")
            .collect();
        let short = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0},
                        "capabilities": {"bounding": without_resource}},
            "linux": {}
        }));
        assert!(is_privileged(&short, last).unwrap());

        let mut masked = privileged.clone();
        let mut linux = masked.linux().clone().unwrap();
        linux.set_masked_paths(Some(vec!["/proc/kcore".into()]));
        masked.set_linux(Some(linux));
        assert!(!is_privileged(&masked, last).unwrap());

        let mut filtered = privileged.clone();
        let mut linux = filtered.linux().clone().unwrap();
        linux.set_seccomp(Some(Default::default()));
        filtered.set_linux(Some(linux));
        assert!(!is_privileged(&filtered, last).unwrap());

        let fewer = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0},
                        "capabilities": {"bounding": ["CAP_SYS_ADMIN", "CAP_MKNOD"]}},
            "linux": {}
        }));
        assert!(!is_privileged(&fewer, last).unwrap());
    }

    #[test]
    fn guest_devices_are_listed_and_added_with_a_rule_each() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for mknod(2)");
            return;
        }
        let dev = tempfile::tempdir().unwrap();
        let node = |path: &str, kind: SFlag, major: u64, minor: u64| {
            mknod(
                &dev.path().join(path),
                kind,
                Mode::from_bits_truncate(0o660),
                makedev(major, minor),
            )
            .unwrap();
            // Past the umask.
            std::fs::set_permissions(
                dev.path().join(path),
                std::os::unix::fs::PermissionsExt::from_mode(0o660),
            )
            .unwrap();
        };
        std::fs::create_dir_all(dev.path().join("net")).unwrap();
        std::fs::create_dir_all(dev.path().join("pts")).unwrap();
        node("vsock", SFlag::S_IFCHR, 10, 121);
        node("vda", SFlag::S_IFBLK, 254, 0);
        node("net/tun", SFlag::S_IFCHR, 10, 200);
        node("null", SFlag::S_IFCHR, 1, 3);
        node("pts/0", SFlag::S_IFCHR, 136, 0);
        node("console", SFlag::S_IFCHR, 5, 1);
        std::fs::write(dev.path().join("plain"), "").unwrap();
        std::os::unix::fs::symlink("vsock", dev.path().join("link")).unwrap();

        let devices = guest_devices(dev.path());
        let paths: Vec<_> = devices.iter().map(|d| d.path().clone()).collect();
        let expected: Vec<PathBuf> = ["/dev/net/tun", "/dev/null", "/dev/vda", "/dev/vsock"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(paths, expected);
        let vda = &devices[2];
        assert_eq!(
            (vda.typ(), vda.major(), vda.minor(), vda.file_mode()),
            (LinuxDeviceType::B, 254, 0, Some(0o660))
        );

        let mut spec = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {
                "devices": [{"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}],
                "resources": {"devices": [{"allow": false, "access": "rwm"}]}
            }
        }));
        let added = add_devices(&mut spec, devices);
        // /dev/null is a default, /dev/vda the spec's own.
        assert_eq!(
            added,
            [PathBuf::from("/dev/net/tun"), PathBuf::from("/dev/vsock")]
        );
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.devices().as_ref().unwrap().len(), 3);
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap();
        assert_eq!(rules.len(), 3);
        assert!(!rules[0].allow(), "the deny-all rule stays first");
        assert!(rules[1..].iter().all(|rule| rule.allow()
            && rule.access().as_deref() == Some("rwm")
            && rule.typ() == Some(LinuxDeviceType::C)));
    }
}
