//! Running `microvm-agent` on the host for tests and the benchmark: in
//! private mount, UTS, IPC and network namespaces (so sandbox and network
//! calls cannot touch the host), on a unix socket, with its own cgroup v2
//! directory; plus a gRPC client and OCI spec helpers.

use crate::harness::{self, TempDir};
use hyper_util::rt::TokioIo;
use microvm_proto::agent::v1 as api;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

/// HTTP/2 windows for the client side of stdio streams (the receiver's
/// window bounds what the agent may send before an acknowledgement).
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame the client accepts. The receiver's setting bounds
/// the sender's frames: at h2's 16 KiB default a 256 KiB output chunk from
/// the agent arrives as 16 DATA frames, each a separate wakeup here.
pub const MAX_FRAME: u32 = 1024 * 1024;

/// The first mounted cgroup v2 hierarchy (on a v1 host, the empty
/// "unified" one), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Controllers enabled for children of `dir` in a cgroup v2 tree.
pub fn cgroup_controllers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Subdirectories of a cgroup directory (child cgroups), sorted.
pub fn child_cgroups(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Kills whatever is left in a cgroup tree and removes it, leaves first.
pub fn remove_cgroup_tree(dir: &Path) {
    for child in child_cgroups(dir) {
        remove_cgroup_tree(&dir.join(child));
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..200 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A test's own cgroup v2 directory, removed on drop.
pub struct TestCgroup(PathBuf);

impl TestCgroup {
    pub fn new(tag: &str) -> Result<Self, String> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mount = cgroup2_mount().ok_or("no cgroup2 hierarchy is mounted on this host")?;
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = mount
            .join("microvm-agent-tests")
            .join(format!("{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.0);
        // The shared parent, once the last test is done with it.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// An agent process under test and what it was given.
pub struct AgentUnderTest {
    child: Option<Child>,
    pub socket: PathBuf,
    pub cgroup: TestCgroup,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    /// Kept last: removed after the agent is gone.
    pub dir: TempDir,
}

pub struct AgentOptions {
    /// Extra agent arguments (e.g. --sysfs for storage tests).
    pub extra_args: Vec<String>,
    pub log_filter: String,
    /// Another agent build (default: $MICROVM_AGENT_BIN, else the
    /// workspace's target/<profile>/microvm-agent).
    pub binary: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            extra_args: Vec::new(),
            log_filter: "debug".into(),
            binary: None,
        }
    }
}

impl AgentUnderTest {
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, AgentOptions::default())
    }

    pub fn start_with(tag: &str, options: AgentOptions) -> Self {
        let dir = TempDir::new(tag);
        let cgroup = TestCgroup::new(tag).unwrap_or_else(|err| panic!("{err}"));
        let socket = dir.join("agent.sock");
        let run_dir = dir.join("run");
        let log = dir.join("agent.log");
        let log_file = std::fs::File::create(&log).expect("create the agent log");
        // MICROVM_AGENT_BIN runs another build (e.g. the static guest one).
        let agent = options
            .binary
            .clone()
            .or_else(|| std::env::var_os("MICROVM_AGENT_BIN").map(PathBuf::from))
            .unwrap_or_else(|| harness::binary("microvm-agent"));
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--propagation",
                "private",
                "--",
            ])
            .arg(agent)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--cgroup-root")
            .arg(cgroup.path())
            .arg("--run-dir")
            .arg(&run_dir)
            .args(&options.extra_args)
            .env("MICROVM_AGENT_LOG", &options.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn unshare + microvm-agent (util-linux unshare is needed)");
        let mut agent = Self {
            child: Some(child),
            socket,
            cgroup,
            run_dir,
            log,
            dir,
        };
        if !harness::wait_for_listener(&agent.socket, Duration::from_secs(10)) {
            let status = agent
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            panic!(
                "the agent did not listen on {} within 10 s (status {status:?}); log:\n{}",
                agent.socket.display(),
                agent.log_text()
            );
        }
        agent
    }

    /// The agent's pid (unshare execs it, so it is the child's pid).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.socket)
            .await
            .unwrap_or_else(|err| panic!("connect to the agent: {err}\nlog:\n{}", self.log_text()))
    }

    /// The agent's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Pids whose parent is the agent (its live children).
    pub fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        let mut children = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.filter_map(|task| task.ok()) {
                let path = task.path().join("children");
                let text = std::fs::read_to_string(path).unwrap_or_default();
                children.extend(
                    text.split_whitespace()
                        .filter_map(|pid| pid.parse::<u32>().ok()),
                );
            }
        }
        children.sort_unstable();
        children
    }

    /// The agent's mount table (mount points), to compare before and after.
    pub fn mounts(&self) -> Vec<String> {
        let text =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).unwrap_or_default();
        let mut points: Vec<String> = text
            .lines()
            .filter_map(|line| line.split_whitespace().nth(4).map(str::to_owned))
            .collect();
        points.sort();
        points
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    /// Resident set size of the agent, in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// A "<field> <n> kB" line of /proc/<agent>/status (VmRSS:, RssAnon:).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|line| {
            line.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    /// Runs `command` in the agent's namespaces (nsenter), for checks.
    pub fn nsenter(&self, namespaces: &[&str], command: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(self.pid().to_string());
        for namespace in namespaces {
            cmd.arg(format!("--{namespace}"));
        }
        cmd.arg("--").args(command);
        cmd.output().expect("run nsenter")
    }
}

impl Drop for AgentUnderTest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

type Interceptor = fn(Request<()>) -> Result<Request<()>, Status>;
pub type Api = tonic::service::interceptor::InterceptedService<Channel, Interceptor>;

fn version_interceptor(request: Request<()>) -> Result<Request<()>, Status> {
    microvm_proto::with_api_version(request)
}

/// The agent's services on one connection.
#[derive(Clone)]
pub struct AgentClient {
    pub channel: Channel,
    pub health: api::health_client::HealthClient<Api>,
    pub sandbox: api::sandbox_client::SandboxClient<Api>,
    pub containers: api::containers_client::ContainersClient<Api>,
    pub processes: api::processes_client::ProcessesClient<Api>,
    pub events: api::events_client::EventsClient<Api>,
    pub storage: api::storage_client::StorageClient<Api>,
    pub network: api::network_client::NetworkClient<Api>,
}

/// A channel to a unix socket, with large HTTP/2 windows.
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://agent.invalid")
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

pub struct Output {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

pub fn process_ref(container_id: &str, exec_id: &str) -> Option<api::ProcessRef> {
    Some(api::ProcessRef {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
    })
}

impl AgentClient {
    pub async fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        let channel = unix_channel(socket).await?;
        Ok(Self::with_channel(channel))
    }

    pub fn with_channel(channel: Channel) -> Self {
        let interceptor: Interceptor = version_interceptor;
        let api = Api::new(channel.clone(), interceptor);
        Self {
            channel,
            health: api::health_client::HealthClient::new(api.clone()),
            sandbox: api::sandbox_client::SandboxClient::new(api.clone()),
            containers: api::containers_client::ContainersClient::new(api.clone()),
            processes: api::processes_client::ProcessesClient::new(api.clone()),
            events: api::events_client::EventsClient::new(api.clone()),
            storage: api::storage_client::StorageClient::new(api.clone()),
            network: api::network_client::NetworkClient::new(api),
        }
    }

    pub async fn create(&mut self, id: &str, spec: &Value, stdin: bool) -> Result<u32, Status> {
        let response = self
            .containers
            .create_container(api::CreateContainerRequest {
                container_id: id.to_owned(),
                oci_spec_json: serde_json::to_vec(spec).unwrap_or_default().into(),
                bundle_path: String::new(),
                stdin,
            })
            .await?;
        Ok(response.into_inner().pid)
    }

    pub async fn start(&mut self, id: &str) -> Result<(), Status> {
        self.containers
            .start_container(api::StartContainerRequest {
                container_id: id.to_owned(),
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&mut self, id: &str, force: bool) -> Result<(), Status> {
        self.containers
            .remove_container(api::RemoveContainerRequest {
                container_id: id.to_owned(),
                force,
            })
            .await?;
        Ok(())
    }

    pub async fn wait(&mut self, id: &str, exec_id: &str) -> Result<i32, Status> {
        Ok(self
            .processes
            .wait_process(api::WaitProcessRequest {
                process: process_ref(id, exec_id),
            })
            .await?
            .into_inner()
            .exit_code)
    }

    pub async fn signal(&mut self, id: &str, exec_id: &str, signal: i32) -> Result<(), Status> {
        self.processes
            .signal_process(api::SignalProcessRequest {
                process: process_ref(id, exec_id),
                signal: signal as u32,
                all: false,
            })
            .await?;
        Ok(())
    }

    pub async fn exec(
        &mut self,
        id: &str,
        exec_id: &str,
        process: &Value,
        stdin: bool,
    ) -> Result<u32, Status> {
        Ok(self
            .processes
            .exec_process(api::ExecProcessRequest {
                process: process_ref(id, exec_id),
                oci_process_json: serde_json::to_vec(process).unwrap_or_default().into(),
                stdin,
            })
            .await?
            .into_inner()
            .pid)
    }

    /// The whole output stream of a process, to its end.
    pub async fn read_output(
        &mut self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, Status> {
        let stream = if stderr {
            api::OutputStream::Stderr
        } else {
            api::OutputStream::Stdout
        };
        let mut response = self
            .processes
            .read_output(api::ReadOutputRequest {
                process: process_ref(id, exec_id),
                stream: stream as i32,
            })
            .await?
            .into_inner();
        let mut all = Vec::new();
        while let Some(chunk) = response.message().await? {
            all.extend_from_slice(&chunk.data);
        }
        Ok(all)
    }

    /// Writes `data` to stdin in chunks of at most 1 MiB, closing it after
    /// when `close` is set.
    pub async fn write_stdin(
        &mut self,
        id: &str,
        exec_id: &str,
        data: Vec<u8>,
        close: bool,
    ) -> Result<u64, Status> {
        const CHUNK: usize = 1024 * 1024;
        let data = bytes::Bytes::from(data);
        let mut chunks = Vec::new();
        let mut offset = 0;
        loop {
            let end = (offset + CHUNK).min(data.len());
            let last = end == data.len();
            chunks.push(api::StdinChunk {
                process: if offset == 0 {
                    process_ref(id, exec_id)
                } else {
                    None
                },
                data: data.slice(offset..end),
                close_stdin: close && last,
            });
            if last {
                break;
            }
            offset = end;
        }
        Ok(self
            .processes
            .write_stdin(tokio_stream::iter(chunks))
            .await?
            .into_inner()
            .bytes_written)
    }

    /// stdout and stderr of a process read concurrently to their ends,
    /// then its exit code.
    pub async fn collect(&mut self, id: &str, exec_id: &str) -> Result<Output, Status> {
        let mut out_client = self.clone();
        let mut err_client = self.clone();
        let (stdout, stderr) = tokio::join!(
            out_client.read_output(id, exec_id, false),
            err_client.read_output(id, exec_id, true)
        );
        let code = self.wait(id, exec_id).await?;
        Ok(Output {
            code,
            stdout: stdout?,
            stderr: stderr?,
        })
    }

    /// create + start + output + wait + remove.
    pub async fn run(&mut self, id: &str, spec: &Value) -> Result<Output, Status> {
        self.create(id, spec, false).await?;
        self.start(id).await?;
        let output = self.collect(id, "").await?;
        self.remove(id, false).await?;
        Ok(output)
    }
}

/// A runc-like default process: root, PATH/TERM env, cwd /, the default
/// capabilities, no_new_privileges.
pub fn process(args: &[&str]) -> Value {
    let default_caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            "bounding": default_caps, "effective": default_caps, "permitted": default_caps
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A runc-like default spec (what `runc spec` writes) for `rootfs`, with
/// the network namespace shared (the pod's).
pub fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process(args),
        "root": {"path": rootfs, "readonly": false},
        "hostname": "container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A rootfs for one test under `dir`.
pub fn rootfs(dir: &TempDir) -> PathBuf {
    let path = dir.join("rootfs");
    crate::rootfs::build_busybox_rootfs(&path).expect("build the busybox rootfs");
    path
}
