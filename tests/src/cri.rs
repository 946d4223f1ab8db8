//! A private containerd with the CRI plugin for the CRI pod tests and the
//! CRI benchmark: its own root, state and socket; runtimes `runc`
//! (`io.containerd.runc.v2`) and `microvm` (our shim); a CNI bridge with
//! host-local IPAM; busybox and pause images imported into `k8s.io`. It runs
//! in a network namespace the fixture creates, so the CNI bridge, the pods'
//! veths and all test traffic stay out of the host's network.
//!
//! Dropping [`CriEnv`] stops and removes every pod through CRI, then stops
//! containerd and deletes the namespace.

use crate::containerd::{mounts_under, Containerd};
use crate::harness::TempDir;
use crate::oci_image::{write_busybox_image, write_pause_image};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:microvm-cri";
pub const PAUSE_IMAGE: &str = "docker.io/library/pause:microvm-cri";
pub const MICROVM_HANDLER: &str = "microvm";
pub const RUNC_HANDLER: &str = "runc";
/// containerd's namespace for CRI.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// How long one CRI call may take (a pod VM boots under TCG here).
pub const CRI_TIMEOUT: Duration = Duration::from_secs(300);

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct NetNs {
    pub name: String,
    pub path: PathBuf,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self, String> {
        // A namespace left by a killed run of the same name.
        let _ = Command::new("ip")
            .args(["netns", "delete", name])
            .stderr(std::process::Stdio::null())
            .status();
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .map_err(|err| format!("ip netns add {name} (apt-get install iproute2): {err}"))?;
        if !status.success() {
            return Err(format!("ip netns add {name} failed: {status}"));
        }
        let netns = Self {
            name: name.to_owned(),
            path: PathBuf::from("/var/run/netns").join(name),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .map_err(|err| format!("ip {args:?}: {err}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "ip -n {} {args:?}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Runs `work` on a thread that entered this namespace (setns moves
    /// only the calling thread, so the test's other threads stay put).
    pub fn run_in<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let file = std::fs::File::open(&self.path)
            .map_err(|err| format!("opening {}: {err}", self.path.display()))?;
        std::thread::spawn(move || {
            // SAFETY: setns(2) on an fd we own, for this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(work())
        })
        .join()
        .map_err(|_| "the thread in the network namespace panicked".to_owned())?
    }
}

impl NetNs {
    /// Like [`NetNs::run_in`], without waiting: for a server the test runs
    /// in this namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T, String>>, String> {
        let file = std::fs::File::open(&self.path)
            .map_err(|err| format!("opening {}: {err}", self.path.display()))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns(2) on an fd we own, for this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(work())
        }))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A CRI client (runtime and image services) on a unix socket, with
/// blocking calls.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|err| format!("tokio runtime: {err}"))?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                Endpoint::from_static("http://cri.invalid")
                    .timeout(CRI_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    })),
            )
            .map_err(|err| format!("connecting to CRI at {}: {err}", socket.display()))?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// Runs one CRI call to completion.
    pub fn call<T, F>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt.block_on(call).map(tonic::Response::into_inner)
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    pub fn run_pod(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        }))
        .map(|response| response.pod_sandbox_id)
    }

    pub fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        }))
        .map(|response| response.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.start_container(cri::StartContainerRequest {
            container_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_seconds: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.exec_sync(cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|arg| (*arg).to_owned()).collect(),
            timeout: timeout_seconds,
        }))
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.container_status(cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        }))?
        .status
        .ok_or_else(|| tonic::Status::internal("ContainerStatus without a status"))
    }

    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.container_stats(cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        }))?
        .stats
        .ok_or_else(|| tonic::Status::internal("ContainerStats without stats"))
    }

    pub fn pod_status(&self, id: &str) -> Result<cri::PodSandboxStatus, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        }))?
        .status
        .ok_or_else(|| tonic::Status::internal("PodSandboxStatus without a status"))
    }

    /// The pod's IPv4 address from CNI, as CRI reports it.
    pub fn pod_ip(&self, id: &str) -> Result<String, tonic::Status> {
        let status = self.pod_status(id)?;
        status
            .network
            .map(|network| network.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| tonic::Status::not_found(format!("pod {id} has no IP")))
    }

    pub fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.stop_container(cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: timeout_seconds,
        }))
        .map(|_| ())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn list_pods(&self) -> Result<Vec<cri::PodSandbox>, tonic::Status> {
        let mut runtime = self.runtime.clone();
        self.call(runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }))
            .map(|response| response.items)
    }

    /// Stops and removes every pod (and so its containers).
    pub fn remove_all_pods(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for pod in self.list_pods().unwrap_or_default() {
            if let Err(err) = self.stop_pod(&pod.id) {
                errors.push(format!("StopPodSandbox {}: {}", pod.id, err.message()));
            }
            if let Err(err) = self.remove_pod(&pod.id) {
                errors.push(format!("RemovePodSandbox {}: {}", pod.id, err.message()));
            }
        }
        errors
    }
}

/// What a test pod looks like.
pub fn pod_config(
    name: &str,
    log_dir: &Path,
    annotations: &[(&str, &str)],
) -> cri::PodSandboxConfig {
    let annotations: HashMap<String, String> = annotations
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_dir.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".to_owned()],
            searches: vec!["default.svc.cluster.local".to_owned()],
            options: vec!["ndots:5".to_owned()],
        }),
        annotations: annotations.clone(),
        labels: HashMap::from([("app".to_owned(), name.to_owned())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            // As kubelet's cgroupfs driver gives it: the pod's cgroup.
            cgroup_parent: format!("/{}/{name}", pods_cgroup()),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The CNI network namespaces (`cni-*`) that exist, sorted: CRI makes one
/// per pod and removes it with the pod.
pub fn cni_netns() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The cgroup (below each hierarchy's root) the test pods' cgroups go in.
pub fn pods_cgroup() -> String {
    format!("mvt-pods-{}", std::process::id())
}

/// The pods cgroup's directories that exist, in every hierarchy.
pub fn pods_cgroup_dirs() -> Vec<PathBuf> {
    let name = pods_cgroup();
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path().join(&name))
                .chain(std::iter::once(Path::new("/sys/fs/cgroup").join(&name)))
                .filter(|dir| dir.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// The pods' own cgroups (`<pods cgroup>/<pod name>/<sandbox id>`) that
/// exist, in every hierarchy: the runtime removes these; the pod-level
/// parents are kubelet's (here: the fixture's).
pub fn pod_leaf_cgroups() -> Vec<PathBuf> {
    let subdirs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| path.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    pods_cgroup_dirs()
        .iter()
        .flat_map(|dir| subdirs(dir))
        .flat_map(|pod| subdirs(&pod))
        .collect()
}

/// Removes the pods cgroup (runc leaves the pod-level parents, as kubelet
/// would remove them).
fn remove_pods_cgroup() {
    fn remove_tree(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false) {
                    remove_tree(&entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for dir in pods_cgroup_dirs() {
        remove_tree(&dir);
    }
}

/// What kubelet sends as `masked_paths` for the Default procMount
/// (k8s.io/kubernetes pkg/securitycontext).
pub const KUBELET_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
/// What kubelet sends as `readonly_paths` for the Default procMount.
pub const KUBELET_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A busybox container running `args`, logging to `<name>.log` in the
/// pod's log directory.
pub fn container_config(name: &str, args: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX_IMAGE.to_owned(),
            ..Default::default()
        }),
        command: args.iter().map(|arg| (*arg).to_owned()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            // As kubelet gives it without shareProcessNamespace.
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                // Kubelet's defaults for the Default procMount: containerd
                // masks and write-protects nothing it is not given.
                masked_paths: KUBELET_MASKED_PATHS
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect(),
                readonly_paths: KUBELET_READONLY_PATHS
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect(),
                ..Default::default()
            }),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// The CNI subnet of the test bridge.
pub const POD_SUBNET: &str = "10.88.91.0/24";
/// The bridge's (gateway's) address in the containerd namespace.
pub const BRIDGE_IP: &str = "10.88.91.1";

/// The private containerd with CRI, in its own network namespace.
pub struct CriEnv {
    pub client: CriClient,
    pub containerd: Containerd,
    pub netns: NetNs,
    /// Pod log directories, shim config and state.
    pub work: TempDir,
    _bin: TempDir,
}

impl CriEnv {
    /// `shim_config`: the shim's TOML config (ConfigPath of the `microvm`
    /// handler). `shim` is the shim binary linked into containerd's PATH.
    /// `extra_handlers`: more handlers of our runtime, each with its config.
    pub fn start(
        tag: &str,
        shim: &Path,
        shim_config: &Path,
        extra_handlers: &[(&str, &Path)],
    ) -> Result<Self, String> {
        let netns = NetNs::create(&format!("mvt-{tag}-{}", std::process::id()))?;
        let bin = TempDir::new(&format!("{tag}-bin"));
        std::os::unix::fs::symlink(shim, bin.join("containerd-shim-microvm-v2"))
            .map_err(|err| format!("linking the shim: {err}"))?;
        // The default config's VMM is `microvm-vmm` on containerd's PATH:
        // this build's, beside the shim (qemu backends do without).
        let vmm = shim.with_file_name("microvm-vmm");
        if vmm.exists() {
            std::os::unix::fs::symlink(&vmm, bin.join("microvm-vmm"))
                .map_err(|err| format!("linking the VMM: {err}"))?;
        }
        let work = TempDir::new(&format!("{tag}-work"));
        let dir = TempDir::new(tag);
        let cni_conf = dir.join("cni");
        std::fs::create_dir_all(&cni_conf).map_err(|err| format!("cni dir: {err}"))?;
        std::fs::write(
            cni_conf.join("10-microvm-test.conflist"),
            cni_conflist(&dir.join("ipam")),
        )
        .map_err(|err| format!("cni config: {err}"))?;
        let mut cri = cri_config(&cni_conf, MICROVM_HANDLER, shim_config);
        for (handler, config) in extra_handlers {
            cri.push_str(&microvm_handler(handler, config));
        }
        // Set-up times go to the log: per case they are a large share of an
        // emulated (L1) run.
        let started = std::time::Instant::now();
        let mut containerd =
            Containerd::start_with(dir, bin.path(), &[], Some(&cri), Some(&netns.path))?;
        let containerd_up = started.elapsed();
        containerd.namespace = CRI_NAMESPACE;
        let busybox = write_busybox_image(work.path(), BUSYBOX_IMAGE)?;
        containerd.import(&busybox)?;
        let pause = write_pause_image(work.path(), PAUSE_IMAGE)?;
        containerd.import(&pause)?;
        let client = CriClient::connect(&containerd.socket)?;
        eprintln!(
            "CRI set-up: containerd up in {:.1} s, images imported in {:.1} s",
            containerd_up.as_secs_f64(),
            (started.elapsed() - containerd_up).as_secs_f64()
        );
        Ok(Self {
            client,
            containerd,
            netns,
            work,
            _bin: bin,
        })
    }

    /// A new pod log directory.
    pub fn log_dir(&self, pod: &str) -> PathBuf {
        let dir = self.work.join(&format!("podlogs-{pod}"));
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    pub fn containerd_log(&self) -> String {
        self.containerd.log()
    }
}

impl Drop for CriEnv {
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        for error in self.client.remove_all_pods() {
            eprintln!("cleanup: {error}");
        }
        eprintln!(
            "CRI clean-up: pods removed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for point in mounts_under(self.work.path()) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
        remove_pods_cgroup();
    }
}

fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "microvm-test",
        "plugins": [{
            "type": "bridge",
            "bridge": "mvt-br0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam_dir.display().to_string(),
                "ranges": [[{"subnet": POD_SUBNET, "gateway": BRIDGE_IP}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    })
    .to_string()
}

/// The CRI section of the containerd config (see also
/// config/containerd-microvm.toml, the snippet for real nodes).
fn cri_config(cni_conf: &Path, handler: &str, shim_config: &Path) -> String {
    let mut text = format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"#,
        cni_conf = cni_conf.display(),
    );
    text.push_str(&microvm_handler(handler, shim_config));
    text
}

/// A CRI runtime handler of our shim with its own config file.
fn microvm_handler(handler: &str, shim_config: &Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}]
  runtime_type = "io.containerd.microvm.v2"
  pod_annotations = ["io.microvm.*"]
  privileged_without_host_devices = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}.options]
    ConfigPath = "{shim_config}"
"#,
        shim_config = shim_config.display(),
    )
}
