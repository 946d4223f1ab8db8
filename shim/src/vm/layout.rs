//! Where one pod's files live: `<state_dir>/<namespace>/<pod>/`. Names are
//! short because unix socket paths are limited to 108 bytes and pod ids can
//! be 64 characters.

use std::path::{Path, PathBuf};

/// The virtio-fs tag of the pod's shared directory.
pub const SHARED_FS_TAG: &str = "microvm-shared";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/microvm/shared";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLayout {
    pub dir: PathBuf,
    pub log_file: PathBuf,
}

impl PodLayout {
    pub fn new(state_dir: &Path, log_dir: &Path, namespace: &str, pod_id: &str) -> Self {
        Self {
            dir: state_dir.join(namespace).join(pod_id),
            log_file: log_dir.join(format!("{namespace}-{pod_id}.log")),
        }
    }

    /// Hybrid vsock: the shim connects here and writes `CONNECT <port>`.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("vs.sock")
    }

    /// vhost-user socket between QEMU and vhost-device-vsock.
    pub fn vhost_vsock_socket(&self) -> PathBuf {
        self.dir.join("vu.sock")
    }

    /// vhost-user socket between the VMM and virtiofsd.
    pub fn virtiofs_socket(&self) -> PathBuf {
        self.dir.join("fs.sock")
    }

    /// Shared into the guest by virtiofsd; holds one directory per container.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
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
        assert_eq!(
            PodLayout::guest_rootfs("c1"),
            "/run/microvm/shared/c1/rootfs"
        );
    }
}
