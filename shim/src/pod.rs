//! The pod: its VM (backend processes), its agent, its shared directory.
//! [`Pod::boot`] fails with a message that says which step failed: the
//! kernel or initramfs is missing, a host process did not start, the VM did
//! not boot (no ready line from the agent in time, or the VMM exited), or
//! the agent did not answer in time.

use crate::agent::{AgentClient, AgentError};
use crate::config::{BackendKind, Config};
use crate::network::{Bandwidth, NetworkError, PodNetwork, TapOwner};
use crate::rootfs::{self, RootfsError};
use crate::vm::cgroup::{CgroupError, PodCgroups};
use crate::vm::console::PodLog;
use crate::vm::layout::{PodLayout, GUEST_SHARED_DIR, SHARED_FS_TAG};
use crate::vm::supervisor::{ExitWatch, LaunchError, PodVm};
use crate::vm::{self, BackendError, PodVmSpec, VmNic};
use microvm_proto::agent::v1 as api;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long one connection attempt to the agent may take.
const AGENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const AGENT_RETRY: Duration = Duration::from_millis(100);
/// How many console lines a boot failure quotes.
const CONSOLE_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Image(#[from] BackendError),
    #[error("preparing the pod's shared directory")]
    Shared(#[source] RootfsError),
    #[error("starting the VM")]
    Launch(#[source] LaunchError),
    #[error("the VM did not boot: {name} exited ({status}) before the agent answered; console: {log}\n{tail}")]
    VmExited {
        name: &'static str,
        status: String,
        log: String,
        tail: String,
    },
    #[error(
        "the VM did not boot within {timeout:?} (no agent ready line); console: {log}\n{tail}"
    )]
    BootTimeout {
        timeout: Duration,
        log: String,
        tail: String,
    },
    #[error("the guest booted but the agent did not answer within {timeout:?}: {last_error}; console: {log}")]
    AgentTimeout {
        timeout: Duration,
        last_error: String,
        log: String,
    },
    #[error("the agent refused the sandbox: {}", agent_status(.0))]
    Sandbox(tonic::Status),
    #[error("the agent could not mount the shared directory: {}", agent_status(.0))]
    MountShared(tonic::Status),
    #[error("placing the VM in the pod's host cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("connecting the pod's network namespace to the VM")]
    Network(#[source] NetworkError),
    #[error(
        "the agent could not configure the guest network ({step}): {}",
        agent_status(status)
    )]
    GuestNetwork {
        step: &'static str,
        status: tonic::Status,
    },
    #[error("pod {0} asks for the host's network (hostNetwork: its sandbox has no network namespace); a microVM cannot share the host's network namespace. Set network.allow_host_network = true in the shim config to run such pods with loopback only")]
    HostNetworkRefused(String),
}

/// An agent's refusal as people read it: its message, then its code
/// (tonic's Display quotes and escapes the message).
fn agent_status(status: &tonic::Status) -> String {
    format!("{} ({:?})", status.message(), status.code())
}

/// What the pod's sandbox spec (its first container) says about the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSettings {
    /// The pod's network namespace (CRI's, with the CNI veth in it).
    pub netns: Option<PathBuf>,
    /// The spec has no network namespace at all: it wants the host's.
    pub host_network: bool,
    pub hostname: String,
    pub sysctls: HashMap<String, String>,
    /// The sandbox's host cgroup (a cgroupfs or systemd-driver path),
    /// where the VM's host processes run.
    pub cgroups_path: Option<String>,
}

impl PodSettings {
    pub fn from_spec(spec: &oci_spec::runtime::Spec, pod_id: &str) -> Self {
        let linux = spec.linux().as_ref();
        let network = linux
            .and_then(|linux| linux.namespaces().as_ref())
            .and_then(|namespaces| {
                namespaces.iter().find(|namespace| {
                    namespace.typ() == oci_spec::runtime::LinuxNamespaceType::Network
                })
            });
        let hostname = spec
            .hostname()
            .clone()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| pod_id.chars().take(63).collect());
        Self {
            netns: network.and_then(|namespace| namespace.path().clone()),
            host_network: network.is_none(),
            hostname,
            sysctls: linux
                .and_then(|linux| linux.sysctl().clone())
                .unwrap_or_default(),
            cgroups_path: linux
                .and_then(|linux| linux.cgroups_path().clone())
                .map(|path| path.to_string_lossy().into_owned())
                .filter(|path| !path.is_empty()),
        }
    }
}

/// Timings of one boot, for the log and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    pub launch: Duration,
    pub boot: Duration,
    pub agent: Duration,
}

#[derive(Debug)]
pub struct Pod {
    pub id: String,
    pub layout: PodLayout,
    pub agent: AgentClient,
    pub times: BootTimes,
    pub settings: PodSettings,
    /// The tap and redirects in the pod's netns, removed at shutdown.
    pub network: Option<PodNetwork>,
    /// The VM's host cgroups, removed at shutdown.
    cgroup: Option<PodCgroups>,
    vm: Mutex<PodVm>,
    /// Keeps the guest clock on the host's while the pod lives.
    clock: std::sync::OnceLock<crate::clock::SyncTask>,
    /// CRI PortForward: the pod netns's loopback carried to the VM.
    port_forward: std::sync::OnceLock<crate::port_forward::PortForwarder>,
}

impl Pod {
    /// Boots the pod's VM and brings its agent and sandbox up.
    pub async fn boot(
        config: &Config,
        namespace: &str,
        pod_id: &str,
        settings: PodSettings,
    ) -> Result<Self, BootError> {
        let backend = vm::backend_for(config);
        if settings.host_network && !config.network.allow_host_network {
            return Err(BootError::HostNetworkRefused(pod_id.to_owned()));
        }
        let (kernel, initramfs) = vm::guest_image(config)?;
        let layout = PodLayout::new(
            &config.paths.state_dir,
            &config.paths.log_dir,
            namespace,
            pod_id,
        );
        tracing::info!(
            "pod {pod_id}: booting a {} VM; guest console and agent log: {}",
            backend.name(),
            layout.log_file.display()
        );
        let started = Instant::now();
        crate::pod_files::record_shim(&layout);
        if let Err(err) = rootfs::prepare_shared_dir(&layout) {
            // The boot error is the one to report.
            let _ = crate::pod_files::remove_pod_dir(&layout.dir);
            return Err(BootError::Shared(err));
        }
        let cgroup = match PodCgroups::create(
            settings.cgroups_path.as_deref(),
            namespace,
            &layout.unique_name(),
        ) {
            Ok(cgroup) => {
                cgroup.record(&layout.cgroups_file());
                Some(cgroup)
            }
            Err(err) => {
                // The boot error is the one to report.
                let _ = crate::pod_files::remove_pod_dir(&layout.dir);
                return Err(BootError::Cgroup(err));
            }
        };
        let network = match &settings.netns {
            Some(netns) => {
                let bandwidth = Bandwidth {
                    guest_rx_bytes_per_second: config.network.guest_rx_bytes_per_second,
                    guest_tx_bytes_per_second: config.network.guest_tx_bytes_per_second,
                };
                let attached = attach_network(
                    netns,
                    &config.network.tap_name,
                    tap_owner(config),
                    bandwidth,
                );
                match attached.await {
                    Ok(network) => Some(network),
                    Err(err) => {
                        // The boot error is the one to report.
                        let _ = crate::pod_files::remove_pod_dir(&layout.dir);
                        remove_cgroup(cgroup.as_ref()).await;
                        return Err(err);
                    }
                }
            }
            None => None,
        };
        let spec = PodVmSpec {
            layout: layout.clone(),
            kernel,
            initramfs,
            kernel_args: config.vm.kernel_args.clone(),
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            debug_console: config.vm.debug_console,
            virtiofsd: config.paths.virtiofsd.clone(),
            host_cgroup: cgroup
                .as_ref()
                .map(|cgroup| cgroup.pod_relative().to_path_buf()),
            nic: network.as_ref().map(|network| VmNic {
                netns: network.netns.clone(),
                tap: network.tap.clone(),
                mac: network.interface.mac.clone(),
            }),
        };
        let result = Self::launch_and_connect(
            config,
            &layout,
            backend.plan(&spec),
            cgroup.as_ref(),
            started,
        )
        .await;
        match result {
            Ok((vm, agent, times)) => {
                let pod = Self {
                    id: pod_id.to_owned(),
                    layout,
                    agent,
                    times,
                    settings,
                    network,
                    cgroup,
                    vm: Mutex::new(vm),
                    clock: std::sync::OnceLock::new(),
                    port_forward: std::sync::OnceLock::new(),
                };
                if let Err(err) = pod.set_up_sandbox().await {
                    pod.shutdown().await;
                    return Err(err);
                }
                pod.start_port_forward();
                tracing::info!(
                    "pod {pod_id}: ready (host processes {:?}, guest boot {:?}, agent {:?})",
                    times.launch,
                    times.boot,
                    times.agent
                );
                Ok(pod)
            }
            Err(err) => {
                // The boot error is the one to report.
                let _ = crate::pod_files::remove_pod_dir(&layout.dir);
                detach_network(network.as_ref()).await;
                remove_cgroup(cgroup.as_ref()).await;
                Err(err)
            }
        }
    }

    async fn launch_and_connect(
        config: &Config,
        layout: &PodLayout,
        plan: Vec<vm::ProcessSpec>,
        cgroup: Option<&PodCgroups>,
        started: Instant,
    ) -> Result<(PodVm, AgentClient, BootTimes), BootError> {
        let log = PodLog::open(&layout.log_file, u64::from(config.paths.log_max_mib) << 20)
            .map_err(|source| {
                BootError::Launch(LaunchError::Prepare {
                    path: layout.log_file.clone(),
                    source,
                })
            })?;
        let mut vm = PodVm::launch(plan, layout, config.timeouts.boot(), cgroup, log)
            .await
            .map_err(BootError::Launch)?;
        let launched = started.elapsed();
        match wait_for_agent(&vm, layout, config).await {
            Ok((agent, boot, agent_time)) => Ok((
                vm,
                agent,
                BootTimes {
                    launch: launched,
                    boot,
                    agent: agent_time,
                },
            )),
            Err(err) => {
                vm.shutdown().await;
                Err(err)
            }
        }
    }

    /// Port forwarding is best effort: without it (no iptables on the
    /// node) only `kubectl port-forward` breaks, so the pod still runs.
    fn start_port_forward(&self) {
        let Some(network) = &self.network else {
            return;
        };
        match crate::port_forward::PortForwarder::start(
            &self.id,
            &network.netns,
            self.layout.agent_socket(),
        ) {
            Ok(forwarder) => {
                let _ = self.port_forward.set(forwarder);
            }
            Err(err) => {
                tracing::warn!("pod {}: no port forwarding: {}", self.id, error_chain(&err))
            }
        }
    }

    async fn set_up_sandbox(&self) -> Result<(), BootError> {
        // The guest's wall clock before anything in it reads the time. A
        // failure (an agent older than API 1.1) costs only timestamps.
        match crate::clock::sync(&self.agent.clock).await {
            Ok(step_nanos) => tracing::info!(
                "pod {}: guest clock set (stepped by {step_nanos} ns)",
                self.id
            ),
            Err(err) => tracing::warn!("pod {}: guest clock not set: {err}", self.id),
        }
        let _ = self.clock.set(crate::clock::SyncTask::start(
            &self.id,
            self.agent.clock.clone(),
        ));
        self.agent
            .sandbox
            .clone()
            .create_sandbox(api::CreateSandboxRequest {
                sandbox_id: self.id.clone(),
                hostname: self.settings.hostname.clone(),
                sysctls: self.settings.sysctls.clone(),
                // Containers whose spec names a PID namespace by path
                // (shareProcessNamespace) join this one.
                share_pid_namespace: true,
                ..Default::default()
            })
            .await
            .map_err(BootError::Sandbox)?;
        if let Some(network) = &self.network {
            let (interface, routes) = network.agent_requests();
            let mut client = self.agent.network.clone();
            client
                .update_interface(interface)
                .await
                .map_err(|status| BootError::GuestNetwork {
                    step: "interface",
                    status,
                })?;
            client
                .update_routes(routes)
                .await
                .map_err(|status| BootError::GuestNetwork {
                    step: "routes",
                    status,
                })?;
            tracing::info!(
                "pod {}: guest {} has {:?} (tap {} in {})",
                self.id,
                network.interface.name,
                network.interface.addresses,
                network.tap,
                network.netns.display()
            );
        }
        self.agent
            .storage
            .clone()
            .mount_storage(api::MountStorageRequest {
                source: Some(api::mount_storage_request::Source::VirtioFsTag(
                    SHARED_FS_TAG.to_owned(),
                )),
                target: GUEST_SHARED_DIR.to_owned(),
                fstype: "virtiofs".to_owned(),
                options: Vec::new(),
            })
            .await
            .map_err(BootError::MountShared)?;
        Ok(())
    }

    pub async fn exit_watch(&self) -> ExitWatch {
        self.vm.lock().await.exit_watch()
    }

    pub async fn host_pids(&self) -> Vec<(&'static str, u32)> {
        self.vm.lock().await.pids()
    }

    /// Asks the agent to power off (bounded), then stops every host
    /// process, unmounts and removes the pod's state. Idempotent.
    pub async fn shutdown(&self) {
        let mut sandbox = self.agent.sandbox.clone();
        let power_off = sandbox.power_off(api::PowerOffRequest {});
        if let Err(err) = tokio::time::timeout(Duration::from_secs(2), power_off).await {
            tracing::debug!("agent power-off did not answer: {err}");
        }
        self.shutdown_without_agent().await;
    }

    /// Stops every host process of the VM now (the VM died: its agent is
    /// not asked anything). Idempotent.
    pub async fn stop_processes(&self) {
        self.vm.lock().await.shutdown().await;
    }

    /// [`Self::shutdown`] without the power-off call: for a dead VM.
    pub async fn shutdown_without_agent(&self) {
        self.stop_processes().await;
        detach_network(self.network.as_ref()).await;
        remove_cgroup(self.cgroup.as_ref()).await;
        if crate::pod_files::remove_pod_dir(&self.layout.dir).is_err() {
            // Kept, with the console log, for whoever looks into it.
            tracing::error!(
                "pod {}: VM stopped, but its state {} is left (see `microvm-ctl ps`)",
                self.id,
                self.layout.dir.display()
            );
            return;
        }
        crate::pod_files::remove_logs(&self.layout.log_file);
        tracing::info!("pod {}: VM stopped and state removed", self.id);
    }
}

/// The jailed builtin VMM opens the tap after dropping to its uid/gid: the
/// tap is theirs, so no other unprivileged process can attach to it. QEMU
/// opens it before its drop, as root.
fn tap_owner(config: &Config) -> TapOwner {
    match config.backend {
        BackendKind::Builtin => {
            let (uid, gid) = config.builtin.jail_ids();
            TapOwner { uid, gid }
        }
        BackendKind::Qemu => TapOwner::default(),
    }
}

/// Creates the tap in the pod's netns and redirects the veth to it. The
/// netlink work blocks (it runs on a thread of its own in the netns).
async fn attach_network(
    netns: &Path,
    tap: &str,
    owner: TapOwner,
    bandwidth: Bandwidth,
) -> Result<PodNetwork, BootError> {
    let path = netns.to_path_buf();
    let tap = tap.to_owned();
    tokio::task::spawn_blocking(move || PodNetwork::attach_with(&path, &tap, owner, bandwidth))
        .await
        .map_err(|_| {
            BootError::Network(NetworkError::ThreadPanicked {
                netns: netns.to_path_buf(),
            })
        })?
        .map_err(BootError::Network)
}

/// Removes the tap; a failure is logged (the netns goes away with the pod).
async fn detach_network(network: Option<&PodNetwork>) {
    let Some(network) = network.cloned() else {
        return;
    };
    let detached = tokio::task::spawn_blocking(move || network.detach()).await;
    match detached {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!("removing the pod's tap: {}", error_chain(&err)),
        Err(err) => tracing::warn!("removing the pod's tap: {err}"),
    }
}

/// Removes the VM's host cgroup (it may retry briefly: off the runtime).
async fn remove_cgroup(cgroup: Option<&PodCgroups>) {
    if let Some(cgroup) = cgroup.cloned() {
        let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
    }
}

/// Waits until the agent answers its health check. The boot timeout runs
/// until the agent's ready line shows on the console (or it answers); the
/// agent timeout from then on.
async fn wait_for_agent(
    vm: &PodVm,
    layout: &PodLayout,
    config: &Config,
) -> Result<(AgentClient, Duration, Duration), BootError> {
    let started = Instant::now();
    let log = layout.log_file.display().to_string();
    let mut ready_at: Option<Instant> = None;
    let ready = vm.log().ready();
    loop {
        if let Some(exit) = vm.any_exited() {
            return Err(BootError::VmExited {
                name: exit.name,
                status: exit.status,
                log,
                tail: vm.log().tail(CONSOLE_TAIL_LINES),
            });
        }
        if ready_at.is_none() && *ready.borrow() {
            ready_at = Some(Instant::now());
        }
        // Dial only once the agent says it is up: a vsock CONNECT that
        // reaches vhost-device-vsock while the guest is still booting can
        // leave that connection (and later ones) hanging.
        let last_error = if ready_at.is_none() {
            "the agent's ready line is not on the console yet".to_owned()
        } else {
            let attempt = tokio::time::timeout(AGENT_ATTEMPT_TIMEOUT, async {
                let agent = AgentClient::connect_with_deadline(
                    &layout.agent_socket(),
                    microvm_proto::abi::vsock::AGENT_PORT,
                    config.timeouts.call(),
                )
                .await?;
                agent.check().await?;
                Ok::<_, AgentError>(agent)
            })
            .await;
            match attempt {
                Ok(Ok(agent)) => {
                    let now = Instant::now();
                    let ready = ready_at.unwrap_or(now);
                    return Ok((agent, ready - started, now - ready));
                }
                Ok(Err(err)) => error_chain(&err),
                Err(_) => format!("no answer within {AGENT_ATTEMPT_TIMEOUT:?}"),
            }
        };
        match ready_at {
            Some(ready) if ready.elapsed() >= config.timeouts.agent() => {
                return Err(BootError::AgentTimeout {
                    timeout: config.timeouts.agent(),
                    last_error,
                    log,
                });
            }
            None if started.elapsed() >= config.timeouts.boot() => {
                return Err(BootError::BootTimeout {
                    timeout: config.timeouts.boot(),
                    log,
                    tail: vm.log().tail(CONSOLE_TAIL_LINES),
                });
            }
            _ => tokio::time::sleep(AGENT_RETRY).await,
        }
    }
}

/// `err: source: source...`, each level once (one helper for every crate).
pub use microvm_errors::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendKind;

    fn config_in(dir: &Path) -> Config {
        let mut config = Config::default();
        config.paths.state_dir = dir.join("state");
        config.paths.log_dir = dir.join("log");
        config.vm.kernel = dir.join("vmlinux");
        config.vm.initramfs = dir.join("initrd");
        config.timeouts.boot_seconds = 1.0;
        config.timeouts.agent_seconds = 0.5;
        config
    }

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn a_missing_kernel_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = config_in(tmp.path());
        config.backend = BackendKind::Qemu;
        let err = Pod::boot(&config, "ns", "pod", PodSettings::default())
            .await
            .unwrap_err();
        let message = error_chain(&err);
        assert!(message.contains("guest kernel"), "{message}");
        assert!(message.contains("vmlinux"), "{message}");
        assert!(!config.paths.state_dir.join("ns/pod").exists());
    }

    /// The qemu backend with stand-ins: a "VMM" that exits at once fails
    /// the boot with its status, and nothing is left behind.
    #[tokio::test]
    async fn a_vm_that_dies_during_boot_is_reported_and_cleaned_up() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut config = config_in(tmp.path());
        std::fs::write(&config.vm.kernel, "k").unwrap();
        std::fs::write(&config.vm.initramfs, "i").unwrap();
        config.backend = BackendKind::Qemu;
        let fake = |name: &str, body: &str| script(tmp.path(), name, body);
        // virtiofsd and vhost-device-vsock stand-ins create their sockets
        // (the path follows --socket-path / --socket).
        config.paths.virtiofsd = fake("virtiofsd", "touch \"$2\"; exec sleep 60");
        config.qemu.vhost_device_vsock = fake("vsock", "touch \"$4\"; exec sleep 60");
        config.qemu.binary = fake("qemu", "echo guest kernel panic; exit 1");
        let err = Pod::boot(&config, "ns", "pod", PodSettings::default())
            .await
            .unwrap_err();
        let message = error_chain(&err);
        assert!(
            message.contains("the VM did not boot: qemu exited"),
            "{message}"
        );
        assert!(message.contains("guest kernel panic"), "{message}");
        assert!(!config.paths.state_dir.join("ns/pod").exists());
        assert!(microvm_host::mountinfo::mounts_under(tmp.path())
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_silent_vm_times_out_as_a_boot_failure() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut config = config_in(tmp.path());
        std::fs::write(&config.vm.kernel, "k").unwrap();
        std::fs::write(&config.vm.initramfs, "i").unwrap();
        config.backend = BackendKind::Qemu;
        let script = |name: &str, body: &str| script(tmp.path(), name, body);
        config.paths.virtiofsd = script("virtiofsd", "touch \"$2\"; exec sleep 60");
        config.qemu.vhost_device_vsock = script("vsock", "touch \"$4\"; exec sleep 60");
        config.qemu.binary = script("qemu", "exec sleep 60");
        let err = Pod::boot(&config, "ns", "pod", PodSettings::default())
            .await
            .unwrap_err();
        assert!(matches!(err, BootError::BootTimeout { .. }), "{err}");

        // A ready line but no agent: the agent timeout.
        config.qemu.binary = script(
            "qemu",
            "echo 'microvm-agent: ready uptime=0.5'; exec sleep 60",
        );
        let err = Pod::boot(&config, "ns", "pod", PodSettings::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, BootError::AgentTimeout { .. }),
            "{}",
            error_chain(&err)
        );
        assert!(!config.paths.state_dir.join("ns/pod").exists());
    }
}
