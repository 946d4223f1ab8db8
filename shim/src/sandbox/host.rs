//! [`PodHost`]: the host side of a booted pod that the sandbox uses (its
//! container dirs under the shared dir, its host processes, its teardown).
//! [`Pod`] is the product's implementation; the tests use a fake that
//! records what it was asked.

use crate::pod::Pod;
use crate::rootfs::{self, RootfsError};
use crate::vm::supervisor::ProcessExit;
use async_trait::async_trait;
use containerd_shim::protos::api::Mount as ContainerdMount;
use oci_spec::runtime::Spec;
use std::path::Path;

#[async_trait]
pub trait PodHost: Send + Sync + std::fmt::Debug {
    /// The pod's id (CRI's sandbox id).
    fn id(&self) -> &str;
    /// Where the guest console and agent log go (named in VM-death logs).
    fn console_log(&self) -> String;
    /// The VM's host processes get the pod's QoS OOM score.
    async fn set_oom_score(&self, adj: i32);
    /// Puts the container's rootfs and bind mounts under the shared dir and
    /// rewrites `spec` to the guest's view.
    async fn prepare_container(
        &self,
        container_id: &str,
        bundle: &Path,
        rootfs: &[ContainerdMount],
        spec: &mut Spec,
    ) -> Result<(), RootfsError>;
    /// Unmounts and removes the container's dir under the shared dir. An
    /// error leaves it in place (never half-removed through a mount).
    fn remove_container(&self, container_id: &str) -> Result<(), RootfsError>;
    /// Resolves when the VM (or one of its host processes) exits: the
    /// first to exit. Any number of callers may wait.
    async fn vm_exit(&self) -> ProcessExit;
    /// Stops the VM (asking the agent to power off first when
    /// `power_off`), then unmounts and removes the pod's host state.
    async fn shutdown(&self, power_off: bool);
}

#[async_trait]
impl PodHost for Pod {
    fn id(&self) -> &str {
        &self.id
    }

    fn console_log(&self) -> String {
        self.layout.log_file.display().to_string()
    }

    async fn set_oom_score(&self, adj: i32) {
        crate::oom_score::raise(&self.host_pids().await, adj);
    }

    async fn prepare_container(
        &self,
        container_id: &str,
        bundle: &Path,
        rootfs: &[ContainerdMount],
        spec: &mut Spec,
    ) -> Result<(), RootfsError> {
        rootfs::prepare_container(&self.layout, container_id, bundle, rootfs, spec).await
    }

    fn remove_container(&self, container_id: &str) -> Result<(), RootfsError> {
        rootfs::remove_mounted_tree(&self.layout.container_dir(container_id))
    }

    async fn vm_exit(&self) -> ProcessExit {
        self.exit_watch().await.first_exit().await
    }

    async fn shutdown(&self, power_off: bool) {
        if power_off {
            self.shutdown().await;
        } else {
            self.shutdown_without_agent().await;
        }
    }
}
