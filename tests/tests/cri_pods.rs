//! CRI pods end to end: a private containerd with the CRI plugin and a CNI
//! bridge (in a network namespace the test creates) runs pods with the
//! RuntimeClass handler `microvm` through our shim (backend `qemu` under
//! TCG on these hosts), driven by a CRI client as crictl would.

use k8s_cri::v1 as cri;
use microvm_guest_image::initramfs::{self, Variant};
use microvm_guest_image::kernel;
use microvm_tests::containerd::{mounts_under, pids_matching, write_qemu_shim_config};
use microvm_tests::cri::{
    cni_netns, container_config, pod_config, CriEnv, BRIDGE_IP, MICROVM_HANDLER, RUNC_HANDLER,
};
use microvm_tests::harness::{binary, TempDir};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One pod VM at a time: each is QEMU under TCG on a 2-core machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// busybox's wget crashes (SIGSEGV) in this guest; nc does the same job.
const HTTP_GET_LOCALHOST: &str =
    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 nc 127.0.0.1 8080";

/// The handler whose shim config has a key the shim does not know.
const BAD_OPTION_HANDLER: &str = "microvm-badopt";

struct Fixture {
    env: CriEnv,
    shim_work: TempDir,
    netns_before: Vec<String>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn fixture(tag: &str) -> Fixture {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = kernel::kernel().unwrap_or_else(|err| panic!("guest kernel: {err}"));
    let initramfs: PathBuf = initramfs::initramfs(Variant::Release)
        .unwrap_or_else(|err| panic!("initramfs: {err}"))
        .path;
    let shim_work = TempDir::new(&format!("{tag}-shim"));
    let config =
        write_qemu_shim_config(shim_work.path(), &kernel.vmlinux, &initramfs).expect("shim config");
    let bad_config = shim_work.join("bad.toml");
    std::fs::write(&bad_config, "backend = \"qemu\"\n[vm]\nvcpu = 2\n").expect("bad config");
    let netns_before = cni_netns();
    let env = CriEnv::start(
        tag,
        &binary("containerd-shim-microvm-v2"),
        &config,
        &[(BAD_OPTION_HANDLER, &bad_config)],
    )
    .unwrap_or_else(|err| panic!("CRI containerd: {err}"));
    Fixture {
        env,
        shim_work,
        netns_before,
        _turn: turn,
    }
}

impl Fixture {
    fn client(&self) -> &microvm_tests::cri::CriClient {
        &self.env.client
    }

    fn diagnostics(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.shim_work.join("logs")) {
            for entry in entries.filter_map(Result::ok) {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                text.push_str(&format!(
                    "--- {} ---\n{}\n",
                    entry.path().display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        let log = self.env.containerd_log();
        let tail: Vec<&str> = log
            .lines()
            .filter(|line| !line.contains("ImageCreate") && !line.contains("ImageUpdate"))
            .rev()
            .take(60)
            .collect();
        text.push_str("--- containerd ---\n");
        text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        text
    }

    fn run_pod(&self, name: &str, annotations: &[(&str, &str)]) -> (String, cri::PodSandboxConfig) {
        let config = pod_config(name, &self.env.log_dir(name), annotations);
        let id = self
            .client()
            .run_pod(&config, MICROVM_HANDLER)
            .unwrap_or_else(|err| panic!("RunPodSandbox: {err}\n{}", self.diagnostics()));
        (id, config)
    }

    fn start_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: &cri::ContainerConfig,
    ) -> String {
        let id = self
            .client()
            .create_container(pod, config, pod_config)
            .unwrap_or_else(|err| panic!("CreateContainer: {err}\n{}", self.diagnostics()));
        self.client()
            .start_container(&id)
            .unwrap_or_else(|err| panic!("StartContainer: {err}\n{}", self.diagnostics()));
        id
    }

    /// ExecSync that must exit 0; its stdout.
    fn exec(&self, container: &str, cmd: &[&str]) -> String {
        let out = self
            .client()
            .exec_sync(container, cmd, 60)
            .unwrap_or_else(|err| panic!("ExecSync {cmd:?}: {err}\n{}", self.diagnostics()));
        assert_eq!(
            out.exit_code,
            0,
            "{cmd:?} exited {}: {}{}",
            out.exit_code,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn remove_pod(&self, pod: &str) {
        self.client().stop_pod(pod).expect("StopPodSandbox");
        self.client().remove_pod(pod).expect("RemovePodSandbox");
    }

    /// No shim, VM or helper process, mount, pod state or pod netns is left.
    fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let state = self.shim_work.join("state");
        loop {
            let shims: Vec<_> = pids_matching(&self.env.containerd.socket.to_string_lossy())
                .into_iter()
                .filter(|(_, cmd)| cmd.contains("containerd-shim-microvm"))
                .collect();
            let vms = pids_matching(&state.to_string_lossy());
            let mounts = mounts_under(self.shim_work.path());
            let pod_dirs: Vec<_> = std::fs::read_dir(state.join("k8s.io"))
                .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            let cgroups = microvm_tests::cri::pod_leaf_cgroups();
            let netns: Vec<_> = cni_netns()
                .into_iter()
                .filter(|name| !self.netns_before.contains(name))
                .collect();
            if shims.is_empty()
                && vms.is_empty()
                && mounts.is_empty()
                && pod_dirs.is_empty()
                && netns.is_empty()
                && cgroups.is_empty()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "left behind: shims {shims:?}, VM processes {vms:?}, mounts {mounts:?}, \
                     pod dirs {pod_dirs:?}, netns {netns:?}, cgroups {cgroups:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// CPU time (ns) and working set (bytes) of a CRI stats record; 0 if absent.
fn cpu_and_memory(cpu: Option<cri::CpuUsage>, memory: Option<cri::MemoryUsage>) -> (u64, u64) {
    let cpu = cpu
        .and_then(|cpu| cpu.usage_core_nano_seconds)
        .map_or(0, |value| value.value);
    let memory = memory
        .and_then(|memory| memory.working_set_bytes)
        .map_or(0, |value| value.value);
    (cpu, memory)
}

fn read_until(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn runc_pod_runs_through_the_same_cri_setup() {
    let fx = fixture("cri-runc");
    let client = fx.client();
    let pod_cfg = pod_config("runc-pod", &fx.env.log_dir("runc-pod"), &[]);
    let pod = client
        .run_pod(&pod_cfg, RUNC_HANDLER)
        .unwrap_or_else(|err| panic!("RunPodSandbox: {err}\n{}", fx.diagnostics()));
    let ip = client.pod_ip(&pod).expect("pod IP");
    assert!(ip.starts_with("10.88.91."), "pod IP {ip}");
    let ctr = fx.start_container(&pod, &pod_cfg, &container_config("c1", &["sleep", "600"]));
    assert_eq!(fx.exec(&ctr, &["echo", "hi"]).trim(), "hi");
    fx.remove_pod(&pod);
    fx.assert_nothing_left();
}

/// crictl's flow: runp, create, start, exec, stats, logs, update, stop, rm,
/// stopp, rmp; plus the CRI-provided files and a volume updated on the host.
#[test]
fn microvm_pod_runs_the_crictl_flow() {
    let fx = fixture("cri-flow");
    let client = fx.client();
    let volume = fx.env.work.join("volume");
    std::fs::create_dir_all(volume.join("..2026_01")).unwrap();
    std::fs::write(volume.join("..2026_01/greeting"), "first\n").unwrap();
    std::os::unix::fs::symlink("..2026_01", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/greeting", volume.join("greeting")).unwrap();

    let started = Instant::now();
    let (pod, pod_cfg) = fx.run_pod("vm-pod", &[]);
    let pod_ready = started.elapsed();
    let mut config = container_config(
        "c1",
        &[
            "sh",
            "-c",
            "echo hello-from-the-guest; echo to-stderr >&2; exec sleep 600",
        ],
    );
    config.mounts.push(cri::Mount {
        container_path: "/config".into(),
        host_path: volume.display().to_string(),
        readonly: true,
        ..Default::default()
    });
    let started = Instant::now();
    let ctr = fx.start_container(&pod, &pod_cfg, &config);
    let ctr_started = started.elapsed();
    eprintln!("RunPodSandbox {pod_ready:?}, create+start {ctr_started:?}");

    // The pod's state (sockets included) and its console log: root only.
    use std::os::unix::fs::PermissionsExt;
    let pod_dirs: Vec<PathBuf> = std::fs::read_dir(fx.shim_work.join("state/k8s.io"))
        .expect("pod state dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    assert_eq!(pod_dirs.len(), 1, "{pod_dirs:?}");
    let mode = std::fs::metadata(&pod_dirs[0])
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "{}", pod_dirs[0].display());
    let console = fx.shim_work.join(&format!("logs/k8s.io-{pod}.log"));
    let mode = std::fs::metadata(&console).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", console.display());

    // It runs in the guest.
    let guest_kernel = fx.exec(&ctr, &["uname", "-r"]);
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert_ne!(
        guest_kernel.trim(),
        host_kernel.trim(),
        "ran on the host kernel"
    );

    // Its own PID namespace (kubelet's default): it sees only itself.
    let ps = fx.exec(&ctr, &["ps", "-o", "pid,args"]);
    assert!(
        !ps.contains("2147483647"),
        "the pause process is visible:\n{ps}"
    );
    assert!(
        ps.lines().any(|line| line.trim_start().starts_with("1 ")),
        "{ps}"
    );

    // CRI's device rules (deny all but the standard devices) hold in the
    // guest: the container has CAP_MKNOD, so it can make a node for
    // /dev/kmsg, but not open it; /dev/null stays usable.
    let devices = fx.exec(
        &ctr,
        &[
            "sh",
            "-c",
            "mknod /tmp/kmsg c 1 11 && echo made; (echo hi > /tmp/kmsg) 2>&1; echo null > /dev/null && echo null-ok",
        ],
    );
    assert!(
        devices.starts_with("made\n")
            && devices.contains("/tmp/kmsg: Operation not permitted")
            && devices.ends_with("null-ok\n"),
        "{devices}"
    );

    // CRI's files: hostname, DNS, hosts.
    assert_eq!(fx.exec(&ctr, &["cat", "/etc/hostname"]).trim(), "vm-pod");
    let resolv = fx.exec(&ctr, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(
        resolv.contains("search default.svc.cluster.local"),
        "{resolv}"
    );
    let hosts = fx.exec(&ctr, &["cat", "/etc/hosts"]);
    assert!(hosts.contains("localhost"), "{hosts}");

    // A configMap-style volume, updated on the host the way kubelet does
    // (a new dir, then an atomic swap of the ..data link), shows within 5 s.
    assert_eq!(fx.exec(&ctr, &["cat", "/config/greeting"]).trim(), "first");
    std::fs::create_dir_all(volume.join("..2026_02")).unwrap();
    std::fs::write(volume.join("..2026_02/greeting"), "second\n").unwrap();
    std::os::unix::fs::symlink("..2026_02", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    let updated = Instant::now();
    loop {
        let seen = fx.exec(&ctr, &["cat", "/config/greeting"]);
        if seen.trim() == "second" {
            break;
        }
        assert!(
            updated.elapsed() < Duration::from_secs(5),
            "the update did not show in the guest within 5 s (still {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("volume update seen after {:?}", updated.elapsed());

    // Logs land in the CRI log path, in CRI's format.
    let log_path = fx.env.log_dir("vm-pod").join("c1.log");
    let log = read_until(&log_path, "to-stderr", Duration::from_secs(10));
    assert!(log.contains(" stdout F hello-from-the-guest"), "{log}");
    assert!(log.contains(" stderr F to-stderr"), "{log}");

    // Stats come from inside the guest.
    fx.exec(
        &ctr,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        ],
    );
    let mut runtime = client.runtime.clone();
    let stats = client
        .call(runtime.container_stats(cri::ContainerStatsRequest {
            container_id: ctr.clone(),
        }))
        .unwrap_or_else(|err| panic!("ContainerStats: {err}\n{}", fx.diagnostics()))
        .stats
        .expect("stats");
    let (cpu, memory) = cpu_and_memory(stats.cpu, stats.memory);
    assert!(
        cpu > 0 && memory > 0,
        "ContainerStats: cpu {cpu} ns, memory {memory} B"
    );
    let pod_stats = client.call(runtime.pod_sandbox_stats(cri::PodSandboxStatsRequest {
        pod_sandbox_id: pod.clone(),
    }));
    match pod_stats {
        Ok(response) => {
            let linux = response
                .stats
                .and_then(|stats| stats.linux)
                .expect("linux stats");
            let (cpu, memory) = cpu_and_memory(linux.cpu, linux.memory);
            assert!(
                cpu > 0 && memory > 0,
                "PodSandboxStats: cpu {cpu} ns, memory {memory} B"
            );
        }
        Err(err) => panic!("PodSandboxStats: {err}"),
    }

    // UpdateContainerResources reaches the container's cgroup in the guest.
    assert_eq!(
        fx.exec(&ctr, &["cat", "/sys/fs/cgroup/memory.max"]).trim(),
        "67108864"
    );
    client
        .call(
            runtime.update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: ctr.clone(),
                linux: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 96 << 20,
                    cpu_period: 100_000,
                    cpu_quota: 20_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .unwrap_or_else(|err| panic!("UpdateContainerResources: {err}\n{}", fx.diagnostics()));
    assert_eq!(
        fx.exec(&ctr, &["cat", "/sys/fs/cgroup/memory.max"]).trim(),
        (96u64 << 20).to_string()
    );
    assert_eq!(
        fx.exec(&ctr, &["cat", "/sys/fs/cgroup/cpu.max"]).trim(),
        "20000 100000"
    );

    client.stop_container(&ctr, 2).expect("StopContainer");
    let status = client.container_status(&ctr).expect("ContainerStatus");
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
    client.remove_container(&ctr).expect("RemoveContainer");
    fx.remove_pod(&pod);
    fx.assert_nothing_left();
}

/// Two containers of a pod share its network (localhost); the pod has its
/// CNI IP and reaches, and is reached from, the test's network namespace.
#[test]
fn microvm_pod_networking() {
    let fx = fixture("cri-net");
    let (pod, pod_cfg) = fx.run_pod("net-pod", &[]);
    let ip = fx.client().pod_ip(&pod).expect("pod IP");
    assert!(ip.starts_with("10.88.91."), "pod IP {ip}");
    let server = fx.start_container(
        &pod,
        &pod_cfg,
        &container_config(
            "server",
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo served-from-the-pod > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
            ],
        ),
    );
    let client_ctr = fx.start_container(
        &pod,
        &pod_cfg,
        &container_config("client", &["sleep", "600"]),
    );
    let addrs = fx.exec(&server, &["ip", "-4", "addr"]);
    assert!(addrs.contains(&format!("inet {ip}/")), "{addrs}");

    // Containers of one pod: localhost.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = fx
            .client()
            .exec_sync(&client_ctr, &["sh", "-c", HTTP_GET_LOCALHOST], 30)
            .unwrap_or_else(|err| {
                let mut dump = String::new();
                for cmd in [
                    &["ip", "addr"][..],
                    &["ip", "route"],
                    &["netstat", "-ltn"],
                    &["ps"],
                ] {
                    if let Ok(out) = fx.client().exec_sync(&server, cmd, 10) {
                        dump.push_str(&format!(
                            "{cmd:?}:\n{}{}\n",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
                panic!("ExecSync wget: {err}\n{dump}\n{}", fx.diagnostics())
            });
        if out.exit_code == 0 || Instant::now() >= deadline {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        eprintln!(
            "nc: {} {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(body.contains("served-from-the-pod"), "{body}");

    // The test's netns reaches the pod's IP.
    let target = format!("{ip}:8080");
    let fetched = fx
        .env
        .netns
        .run_in(move || -> Result<String, String> {
            let mut stream = std::net::TcpStream::connect_timeout(
                &target.parse().map_err(|err| format!("{target}: {err}"))?,
                Duration::from_secs(10),
            )
            .map_err(|err| format!("connect {target}: {err}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
            stream
                .write_all(b"GET / HTTP/1.0\r\n\r\n")
                .map_err(|err| err.to_string())?;
            let mut reply = String::new();
            stream
                .read_to_string(&mut reply)
                .map_err(|err| err.to_string())?;
            Ok(reply)
        })
        .expect("netns thread");
    let fetched = fetched.unwrap_or_else(|err| panic!("{err}\n{}", fx.diagnostics()));
    assert!(fetched.contains("served-from-the-pod"), "{fetched}");

    // The pod reaches a server in the test's netns (the bridge's address).
    let listener = fx
        .env
        .netns
        .run_in(|| std::net::TcpListener::bind((BRIDGE_IP, 0)))
        .expect("netns thread")
        .expect("listen on the bridge address");
    let port = listener.local_addr().unwrap().port();
    let served = std::thread::spawn(move || -> std::io::Result<String> {
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut request = [0u8; 512];
        let _ = stream.read(&mut request)?;
        stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\nhello-the-pod\n")?;
        Ok(peer.ip().to_string())
    });
    let fetch = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 nc {BRIDGE_IP} {port}");
    let reply = fx.exec(&client_ctr, &["sh", "-c", &fetch]);
    assert!(reply.contains("hello-the-pod"), "{reply}");
    let peer = served.join().expect("server thread").expect("server");
    assert_eq!(peer, ip, "the connection came from the pod's IP");

    fx.remove_pod(&pod);
    fx.assert_nothing_left();
}

/// What is wrong, the handler, the pod's annotations, the expected error.
type BadPod<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

/// Bad input gets a clear CRI error and leaves nothing behind.
#[test]
fn microvm_bad_pods_fail_clearly() {
    let fx = fixture("cri-bad");
    let client = fx.client();
    let cases: &[BadPod] = &[
        (
            "unknown handler option",
            BAD_OPTION_HANDLER,
            &[],
            "key `vm.vcpu`",
        ),
        (
            "unknown annotation",
            MICROVM_HANDLER,
            &[("io.microvm.config.vm.turbo", "1")],
            "annotation io.microvm.config.vm.turbo: unknown key",
        ),
        (
            "malformed annotation",
            MICROVM_HANDLER,
            &[("io.microvm.config.vm.vcpus", "lots")],
            "annotation io.microvm.config.vm.vcpus=\"lots\": not a number",
        ),
        (
            "memory below the guest minimum",
            MICROVM_HANDLER,
            &[("io.microvm.config.vm.memory_mib", "32")],
            "below the guest minimum of 64 MiB",
        ),
        (
            "a VM that cannot boot",
            MICROVM_HANDLER,
            &[("io.microvm.config.vm.kernel_args", "rdinit=/nonexistent")],
            "the VM did not boot",
        ),
    ];
    for (what, handler, annotations, expected) in cases {
        let name = format!("bad-{}", what.replace(' ', "-"));
        let config = pod_config(&name, &fx.env.log_dir(&name), annotations);
        let err = client
            .run_pod(&config, handler)
            .expect_err(&format!("{what}: RunPodSandbox succeeded"));
        assert!(
            err.message().contains(expected),
            "{what}: expected {expected:?} in the error, got: {}",
            err.message()
        );
        eprintln!("{what}: {}", err.message());
        // CRI keeps a failed sandbox in its store at most as NOTREADY.
        for pod in client.list_pods().unwrap_or_default() {
            assert_ne!(
                pod.state,
                cri::PodSandboxState::SandboxReady as i32,
                "{what}"
            );
        }
        fx.env.client.remove_all_pods();
        fx.assert_nothing_left();
    }
    // hostNetwork: refused by default (a VM cannot share the node's netns).
    let mut host_net = pod_config("host-net", &fx.env.log_dir("host-net"), &[]);
    if let Some(options) = host_net
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
        .and_then(|context| context.namespace_options.as_mut())
    {
        options.network = cri::NamespaceMode::Node as i32;
    }
    let err = client
        .run_pod(&host_net, MICROVM_HANDLER)
        .expect_err("a hostNetwork pod");
    assert!(
        err.message().contains("asks for the host's network"),
        "{}",
        err.message()
    );
    fx.env.client.remove_all_pods();
    fx.assert_nothing_left();

    let err = client
        .run_pod(
            &pod_config("no-handler", &fx.env.log_dir("no-handler"), &[]),
            "nonexistent",
        )
        .expect_err("an unknown handler");
    assert!(err.message().contains("nonexistent"), "{}", err.message());
}

/// Two pods, two VMs: a root process in one pod's container cannot reach
/// the other pod's agent, nor its own, over vsock. The probe is our static
/// agent binary (`--probe-vsock CID PORT`: served, closed or refused),
/// bind-mounted into the container through virtio-fs.
#[test]
fn microvm_pods_cannot_reach_each_others_agent() {
    let fx = fixture("cri-iso");
    let agent = initramfs::build_agent().unwrap_or_else(|err| panic!("static agent: {err}"));
    let (pod_a, pod_a_cfg) = fx.run_pod("pod-a", &[]);
    let (pod_b, pod_b_cfg) = fx.run_pod("pod-b", &[]);
    let mut prober = container_config("prober", &["sleep", "600"]);
    prober.mounts.push(cri::Mount {
        container_path: "/probe".into(),
        host_path: agent.display().to_string(),
        readonly: true,
        ..Default::default()
    });
    let in_a = fx.start_container(&pod_a, &pod_a_cfg, &prober);
    let in_b = fx.start_container(
        &pod_b,
        &pod_b_cfg,
        &container_config("b", &["sleep", "600"]),
    );
    // CID 2: the host side of pod A's own vsock device; 3: every guest's
    // CID (its own, and pod B's behind another device); 1: loopback; 4: a
    // sibling CID.
    for cid in ["1", "2", "3", "4"] {
        let out = fx
            .client()
            .exec_sync(&in_a, &["/probe", "--probe-vsock", cid, "1024"], 30)
            .unwrap_or_else(|err| panic!("probe CID {cid}: {err}\n{}", fx.diagnostics()));
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        eprintln!("pod A -> CID {cid} port 1024: {said}");
        assert!(
            said.starts_with("refused") || said == "closed",
            "pod A reached an agent at CID {cid}: {said:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Both agents still serve their own shim.
    assert_eq!(fx.exec(&in_b, &["echo", "b-ok"]).trim(), "b-ok");
    assert_eq!(fx.exec(&in_a, &["echo", "a-ok"]).trim(), "a-ok");
    fx.remove_pod(&pod_a);
    fx.remove_pod(&pod_b);
    fx.assert_nothing_left();
}
