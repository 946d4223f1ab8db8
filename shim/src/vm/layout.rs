//! Where one pod's files live: `<state_dir>/<namespace>/<pod>/`. Names are
//! short because unix socket paths are limited to 108 bytes and pod ids can
//! be 64 characters.

use std::path::{Path, PathBuf};

pub use microvm_proto::abi::shared_fs::{GUEST_DIR as GUEST_SHARED_DIR, TAG as SHARED_FS_TAG};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLayout {
    pub dir: PathBuf,
    pub log_file: PathBuf,
}

/// The longest socket path the pod dir must hold: `s/vu.sock` plus the
/// `_<port>` suffix vhost-device-vsock appends for guest-initiated
/// connections, within sun_path's 108 bytes (NUL included).
const LONGEST_SOCKET_SUFFIX: &str = "/s/vu.sock_4294967295";
const SUN_PATH_MAX: usize = 107;

impl PodLayout {
    /// The pod dir is named by the pod id; when a long state dir would push
    /// its sockets past sun_path, by a stable short form of the id instead
    /// (its first 12 characters and a hash of all of it).
    pub fn new(state_dir: &Path, log_dir: &Path, namespace: &str, pod_id: &str) -> Self {
        let parent = state_dir.join(namespace);
        let mut dir = parent.join(pod_id);
        if dir.as_os_str().len() + LONGEST_SOCKET_SUFFIX.len() > SUN_PATH_MAX {
            let prefix: String = pod_id.chars().take(12).collect();
            dir = parent.join(format!("{prefix}-{:016x}", fnv1a(pod_id.as_bytes())));
        }
        Self {
            dir,
            log_file: log_dir.join(format!("{namespace}-{pod_id}.log")),
        }
    }

    /// The pod dir's name and a hash of its whole path: unique on the node
    /// even across shims with other state dirs (the host cgroup of a pod
    /// without a cgroups path is named by it).
    pub fn unique_name(&self) -> String {
        let name = self
            .dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let hash = fnv1a(self.dir.as_os_str().as_encoded_bytes());
        format!("{name}-{:08x}", hash as u32)
    }

    /// The pod's unix sockets, apart from the rest of the pod dir: a jailed
    /// VMM gets this directory alone (owned by its uid when it drops to
    /// one), never the container rootfs or the shim's state. One letter:
    /// a 64-character pod id under /run/microvm/k8s.io must still fit
    /// sun_path.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("s")
    }

    /// Hybrid vsock: the shim connects here and writes `CONNECT <port>`.
    pub fn agent_socket(&self) -> PathBuf {
        self.socket_dir().join("vs.sock")
    }

    /// The builtin VMM's control API (docs/vmm-api.md): `microvm-ctl
    /// metrics` reads its device counters there.
    pub fn vmm_api_socket(&self) -> PathBuf {
        self.socket_dir().join("api.sock")
    }

    /// vhost-user socket between QEMU and vhost-device-vsock.
    pub fn vhost_vsock_socket(&self) -> PathBuf {
        self.socket_dir().join("vu.sock")
    }

    /// vhost-user socket between the VMM and virtiofsd.
    pub fn virtiofs_socket(&self) -> PathBuf {
        self.socket_dir().join("fs.sock")
    }

    /// Shared into the guest by virtiofsd; holds one directory per container.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The jailed QEMU's root: empty, so after init it sees no host file.
    pub fn qemu_root(&self) -> PathBuf {
        self.dir.join("qemu-root")
    }

    /// The jailed builtin VMM's root (made and removed by its jail; its
    /// cgroup is named after it).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join(super::cgroup::VMM)
    }

    /// The host cgroups the shim made for the pod, one per line.
    pub fn cgroups_file(&self) -> PathBuf {
        self.dir.join("cgroups")
    }

    /// One file per host process the pod runs, for the cleanup after a crash.
    pub fn pid_dir(&self) -> PathBuf {
        self.dir.join("pids")
    }

    /// The container's directory in the shared dir, on the host.
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.shared_dir().join(container_id)
    }

    /// The container's rootfs as the guest sees it.
    pub fn guest_rootfs(container_id: &str) -> String {
        format!("{GUEST_SHARED_DIR}/{container_id}/rootfs")
    }
}

/// FNV-1a: a hash that stays the same across builds (std's hasher may
/// not), so a newer shim's `delete` finds the dir an older one made.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_fit_sun_path_for_64_char_ids() {
        let id = "a".repeat(64);
        let layout = PodLayout::new(
            Path::new("/run/microvm"),
            Path::new("/var/log/microvm"),
            "k8s.io",
            &id,
        );
        for socket in [
            layout.agent_socket(),
            layout.vhost_vsock_socket(),
            layout.virtiofs_socket(),
        ] {
            // vhost-device-vsock appends `_<port>` for guest-initiated
            // connections; leave room for it.
            assert!(socket.as_os_str().len() + 11 < 108, "{}", socket.display());
        }
        assert_eq!(
            layout.log_file,
            PathBuf::from(format!("/var/log/microvm/k8s.io-{id}.log"))
        );
        assert_eq!(layout.dir, Path::new("/run/microvm/k8s.io").join(&id));
        assert_eq!(
            PodLayout::guest_rootfs("c1"),
            "/run/microvm/shared/c1/rootfs"
        );
    }

    #[test]
    fn a_long_state_dir_gets_a_short_stable_pod_dir() {
        let id = "f670e623546846e1eda3c716eda8fb515284e6a1db2e298b700b6c78bb96697a";
        let state = Path::new("/tmp/a-rather-long-test-directory-name/state");
        let layout = PodLayout::new(state, Path::new("/l"), "k8s.io", id);
        let again = PodLayout::new(state, Path::new("/l"), "k8s.io", id);
        assert_eq!(layout.dir, again.dir);
        let name = layout
            .dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("f670e6235468-"), "{name}");
        assert!(layout.vhost_vsock_socket().as_os_str().len() + 11 < 108);
        let other = PodLayout::new(state, Path::new("/l"), "k8s.io", &id.replace('f', "e"));
        assert_ne!(layout.dir, other.dir);
        // The log keeps the full id: it is not a socket.
        assert!(layout.log_file.to_string_lossy().contains(id));
    }
}
