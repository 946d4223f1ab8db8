//! CRI pods end to end: a private containerd with the CRI plugin and a CNI
//! bridge (in a network namespace the test creates) runs pods with the
//! RuntimeClass handler `microvm` through our shim, driven by a CRI client
//! as crictl would. Every microvm case runs on each backend: `qemu` under
//! TCG here, and `builtin` (the default config) and `qemu` with KVM under
//! real KVM, which on these hosts is one nested-KVM L1 for all of them
//! (tests/src/kvm.rs).

use k8s_cri::v1 as cri;
use libtest_mimic::Trial;
use microvm_tests::containerd::{
    mounts_under, pids_matching, test_agent_binary, test_guest_image, write_shim_config,
    TestBackend, TEST_AGENT_ENV,
};
use microvm_tests::cri::{
    cni_netns, container_config, pod_config, CriEnv, BRIDGE_IP, MICROVM_HANDLER, RUNC_HANDLER,
};
use microvm_tests::harness::{binary, TempDir};
use microvm_tests::kvm::Suite;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One pod VM at a time: each is emulated on a 2-core machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// busybox's wget crashes (SIGSEGV) in this guest; nc does the same job.
const HTTP_GET_LOCALHOST: &str =
    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 nc 127.0.0.1 8080";

/// The handler whose shim config has a key the shim does not know.
const BAD_OPTION_HANDLER: &str = "microvm-badopt";

struct Fixture {
    backend: TestBackend,
    env: CriEnv,
    shim_work: TempDir,
    netns_before: Vec<String>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn fixture(tag: &str, backend: TestBackend) -> Fixture {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initramfs) = test_guest_image();
    let shim_work = TempDir::new(&format!("{tag}-shim"));
    let config =
        write_shim_config(shim_work.path(), &kernel, &initramfs, backend).expect("shim config");
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
        backend,
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
        let mut text = format!("backend: {}\n", self.backend.name());
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
        // In the harness's L1 every process is emulated: a shim's exit
        // after RemovePodSandbox can take many seconds.
        let grace = if microvm_tests::kvm::in_nested_kvm() {
            60
        } else {
            15
        };
        let deadline = Instant::now() + Duration::from_secs(grace);
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

fn runc_pod_runs_through_the_same_cri_setup() {
    let fx = fixture("cri-runc", TestBackend::QemuTcg);
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
fn microvm_pod_runs_the_crictl_flow(backend: TestBackend) {
    let fx = fixture("cri-flow", backend);
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

    // microvm-vmm offers virtio-rng, and the guest kernel uses it as its
    // hardware RNG (the qemu backend offers none).
    if fx.backend == TestBackend::Builtin {
        let rng = fx.exec(&ctr, &["cat", "/sys/class/misc/hw_random/rng_current"]);
        assert!(rng.contains("virtio_rng"), "guest hw_random: {rng:?}");
    }

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
    // /dev/kmsg on its /dev (a guest tmpfs), but not open it; /dev/null
    // stays usable. On the shared rootfs (virtio-fs) the host refuses
    // device nodes outright (virtiofsd without CAP_MKNOD).
    let devices = fx.exec(
        &ctr,
        &[
            "sh",
            "-c",
            "mknod /dev/mvt-kmsg c 1 11 && echo made; (echo hi > /dev/mvt-kmsg) 2>&1; \
             mknod /tmp/kmsg c 1 11 2>/dev/null || echo refused-on-virtiofs; \
             echo null > /dev/null && echo null-ok",
        ],
    );
    assert!(
        devices.starts_with("made\n")
            && devices.contains("/dev/mvt-kmsg: Operation not permitted")
            && devices.contains("refused-on-virtiofs\n")
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
    let stats = client
        .container_stats(&ctr)
        .unwrap_or_else(|err| panic!("ContainerStats: {err}\n{}", fx.diagnostics()));
    let (cpu, memory) = cpu_and_memory(stats.cpu, stats.memory);
    assert!(
        cpu > 0 && memory > 0,
        "ContainerStats: cpu {cpu} ns, memory {memory} B"
    );
    let mut runtime = client.runtime.clone();
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
fn microvm_pod_networking(backend: TestBackend) {
    let fx = fixture("cri-net", backend);
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
fn microvm_bad_pods_fail_clearly(backend: TestBackend) {
    let fx = fixture("cri-bad", backend);
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
fn microvm_pods_cannot_reach_each_others_agent(backend: TestBackend) {
    let fx = fixture("cri-iso", backend);
    let agent = test_agent_binary();
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

/// A pod's cgroup directories on this host (v1: one per controller
/// hierarchy, v2: one), for a path relative to each hierarchy's root.
fn cgroup_dirs(relative: &Path) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path().join(relative))
                .collect()
        })
        .unwrap_or_default();
    dirs.push(root.join(relative));
    dirs.retain(|dir| dir.is_dir());
    dirs
}

/// The memory limit of a cgroup, in bytes (`memory.max` on v2,
/// `memory.limit_in_bytes` on v1), from whichever of `dirs` has one.
fn memory_limit(dirs: &[PathBuf], leaf: &str) -> Option<u64> {
    dirs.iter().find_map(|dir| {
        ["memory.max", "memory.limit_in_bytes"]
            .iter()
            .find_map(|file| std::fs::read_to_string(dir.join(leaf).join(file)).ok())
            .and_then(|text| text.trim().parse().ok())
    })
}

/// The command lines of the processes in `leaf` of the pod's cgroups.
fn processes_in(dirs: &[PathBuf], leaf: &str) -> Vec<String> {
    let mut found = Vec::new();
    for dir in dirs {
        let procs =
            std::fs::read_to_string(dir.join(leaf).join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !found.contains(&cmdline) {
                found.push(cmdline);
            }
        }
    }
    found
}

/// Two pods of different sizes, one with kubelet's cgroupfs driver and one
/// with its systemd driver (`<slice>:cri-containerd:<id>`): each gets a
/// cgroup of its own with the VM in its own leaf, one pod's limits never
/// change the other's, stats work for both, and both cgroups go with the
/// pods. On cgroup v1 here and v2 under the KVM harness.
fn pods_get_cgroups_of_their_own_with_either_driver(backend: TestBackend) {
    let fx = fixture("cri-cgroups", backend);
    let client = fx.client();
    let (small, small_cfg) = fx.run_pod("small", &[("io.microvm.config.vm.memory_mib", "256")]);
    let small_rel = PathBuf::from(format!(
        "{}/small/{small}",
        microvm_tests::cri::pods_cgroup()
    ));
    let small_dirs = cgroup_dirs(&small_rel);
    assert!(!small_dirs.is_empty(), "no cgroup {}", small_rel.display());

    // kubelet's systemd driver: a pod slice; containerd makes the
    // sandbox's path `<slice>:cri-containerd:<id>`.
    let slice_prefix = format!("mvtslice{}", std::process::id());
    let uid = "4f1d";
    let mut large_cfg = pod_config(
        "large",
        &fx.env.log_dir("large"),
        &[("io.microvm.config.vm.memory_mib", "384")],
    );
    large_cfg.linux.as_mut().unwrap().cgroup_parent =
        format!("{slice_prefix}-besteffort-pod{uid}.slice");
    let memory_before = memory_limit(&small_dirs, "vmm");
    let large = client
        .run_pod(&large_cfg, MICROVM_HANDLER)
        .unwrap_or_else(|err| {
            panic!(
                "RunPodSandbox (systemd driver): {err}\n{}",
                fx.diagnostics()
            )
        });
    let large_rel = PathBuf::from(format!(
        "{slice_prefix}.slice/{slice_prefix}-besteffort.slice/\
         {slice_prefix}-besteffort-pod{uid}.slice/cri-containerd-{large}.scope"
    ));
    let large_dirs = cgroup_dirs(&large_rel);
    assert!(
        !large_dirs.is_empty(),
        "no cgroup {} for the systemd driver\n{}",
        large_rel.display(),
        fx.diagnostics()
    );

    for (pod, dirs) in [(&small, &small_dirs), (&large, &large_dirs)] {
        let vm = processes_in(dirs, "vmm");
        assert!(
            vm.iter().any(|cmd| cmd.contains(backend.vmm_process())),
            "pod {pod}: no {} in its vmm cgroup: {vm:?}",
            backend.vmm_process()
        );
        let helpers = processes_in(dirs, "helpers");
        assert!(
            helpers.iter().any(|cmd| cmd.contains("virtiofsd")),
            "pod {pod}: no virtiofsd in its helpers cgroup: {helpers:?}"
        );
        assert!(
            !vm.iter().any(|cmd| cmd.contains("virtiofsd")),
            "pod {pod}: virtiofsd in the VM's cgroup: {vm:?}"
        );
    }
    if backend == TestBackend::Builtin {
        // The jail's limit: guest RAM plus the VMM's own room.
        let small_limit = memory_limit(&small_dirs, "vmm").expect("the small VM's memory limit");
        let large_limit = memory_limit(&large_dirs, "vmm").expect("the large VM's memory limit");
        assert_eq!(
            memory_before,
            Some(small_limit),
            "starting a pod changed another's limit"
        );
        assert!(
            small_limit >= (256 + 128) << 20,
            "small VM limit {small_limit}: less than its guest RAM and the VMM's room"
        );
        assert_eq!(
            large_limit.checked_sub(small_limit),
            Some(128 << 20),
            "large VM limit {large_limit}, small {small_limit}: not 128 MiB apart, as their guests"
        );
    }

    let large_ctr = fx.start_container(
        &large,
        &large_cfg,
        &container_config("c", &["sleep", "600"]),
    );
    let small_ctr = fx.start_container(
        &small,
        &small_cfg,
        &container_config("c", &["sleep", "600"]),
    );
    // containerd 1.6's PodSandboxStats loads the pod's cgroup_parent as a
    // literal cgroupfs path, which a systemd slice name is not (it fails so
    // for runc too): the systemd pod's stats are checked per container.
    let stats = client
        .container_stats(&large_ctr)
        .unwrap_or_else(|err| panic!("ContainerStats (systemd pod): {err}\n{}", fx.diagnostics()));
    let (_, memory) = cpu_and_memory(stats.cpu, stats.memory);
    assert!(
        memory > 0,
        "ContainerStats (systemd pod): memory {memory} B"
    );
    assert_eq!(fx.exec(&large_ctr, &["echo", "ok"]).trim(), "ok");
    {
        let (pod, ctr) = (&small, &small_ctr);
        assert_eq!(fx.exec(ctr, &["echo", "ok"]).trim(), "ok");
        let mut runtime = client.runtime.clone();
        let stats = client
            .call(runtime.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            }))
            .unwrap_or_else(|err| panic!("PodSandboxStats {pod}: {err}\n{}", fx.diagnostics()));
        let linux = stats
            .stats
            .and_then(|stats| stats.linux)
            .expect("linux stats");
        let (cpu, memory) = cpu_and_memory(linux.cpu, linux.memory);
        assert!(
            cpu > 0 && memory > 0,
            "PodSandboxStats {pod}: cpu {cpu} ns, memory {memory} B"
        );
    }
    let guest_memory = |ctr: &str| -> u64 {
        let meminfo = fx.exec(ctr, &["cat", "/proc/meminfo"]);
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .expect("MemTotal")
    };
    let (small_kib, large_kib) = (guest_memory(&small_ctr), guest_memory(&large_ctr));
    assert!(
        small_kib < 256 << 10 && large_kib > 256 << 10 && large_kib < 384 << 10,
        "guest MemTotal: small {small_kib} KiB, large {large_kib} KiB"
    );

    fx.remove_pod(&small);
    fx.remove_pod(&large);
    fx.assert_nothing_left();
    let left: Vec<PathBuf> = cgroup_dirs(&large_rel);
    // The pod slices are kubelet's to remove; the sandbox's scope is ours.
    assert!(left.is_empty(), "left behind: {left:?}");
    for dir in cgroup_dirs(Path::new(&format!("{slice_prefix}.slice"))) {
        let mut nested: Vec<PathBuf> = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            nested.push(dir.clone());
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .filter_map(Result::ok)
                        .map(|entry| entry.path())
                        .filter(|path| path.is_dir()),
                );
            }
        }
        for dir in nested.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A hostile guest: a privileged container (root in the guest, NET_ADMIN,
/// NET_RAW, the guest's devices) first gives the pod's interface another IP and pings the
/// bridge from it, which the host's tap guard drops (from the pod's own IP
/// the ping works); then it sets off a guest kernel panic (a memory cgroup
/// OOM with `vm.panic_on_oom = 2`), which ends the VM: the pod's
/// containers exit, the reason is in the logs, and removing the pod leaves
/// nothing.
fn a_hostile_guest_cannot_spoof_and_its_kernel_panic_exits_the_containers(backend: TestBackend) {
    let fx = fixture("cri-panic", backend);
    let client = fx.client();
    let mut pod_cfg = pod_config("panic-pod", &fx.env.log_dir("panic-pod"), &[]);
    let privileged = |context: &mut Option<cri::LinuxSandboxSecurityContext>| {
        context.get_or_insert_with(Default::default).privileged = true;
    };
    privileged(&mut pod_cfg.linux.as_mut().unwrap().security_context);
    let pod = client
        .run_pod(&pod_cfg, MICROVM_HANDLER)
        .unwrap_or_else(|err| panic!("RunPodSandbox: {err}\n{}", fx.diagnostics()));
    let victim = fx.start_container(
        &pod,
        &pod_cfg,
        &container_config("victim", &["sleep", "600"]),
    );
    let mut spoofer = container_config("spoofer", &["sleep", "600"]);
    if let Some(linux) = spoofer.linux.as_mut() {
        linux
            .security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
    }
    let spoofer = fx.start_container(&pod, &pod_cfg, &spoofer);
    // A privileged container sees the guest's devices (vsock, which the
    // agent's own link needs, is one) and may open them; the unprivileged
    // one sees only the defaults.
    let list_dev = |container: &str| {
        let out = client
            .exec_sync(container, &["ls", "/dev"], 30)
            .unwrap_or_else(|err| panic!("ExecSync ls /dev: {err}\n{}", fx.diagnostics()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (privileged_dev, plain_dev) = (list_dev(&spoofer), list_dev(&victim));
    let has = |listing: &str, name: &str| listing.split_whitespace().any(|entry| entry == name);
    assert!(
        has(&privileged_dev, "vsock") && !has(&plain_dev, "vsock"),
        "privileged /dev: {privileged_dev}\nunprivileged /dev: {plain_dev}"
    );
    assert!(
        !has(&privileged_dev, "kvm"),
        "the host's /dev/kvm is not the guest's: {privileged_dev}"
    );
    fx.exec(&spoofer, &["sh", "-c", "exec 3</dev/vsock"]);
    eprintln!(
        "/dev entries: privileged {}, unprivileged {}",
        privileged_dev.split_whitespace().count(),
        plain_dev.split_whitespace().count()
    );
    let ping = |source: Option<&str>| {
        let mut cmd = vec!["ping", "-c", "2", "-W", "3"];
        if let Some(source) = source {
            cmd.extend(["-I", source]);
        }
        cmd.push(BRIDGE_IP);
        let out = client
            .exec_sync(&spoofer, &cmd, 30)
            .unwrap_or_else(|err| panic!("ExecSync {cmd:?}: {err}\n{}", fx.diagnostics()));
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, output) = ping(None);
    assert_eq!(code, 0, "ping from the pod's own IP failed: {output}");
    let pod_ip = client.pod_ip(&pod).expect("pod IP");
    let spoofed = "10.88.91.250";
    assert_ne!(pod_ip, spoofed);
    fx.exec(
        &spoofer,
        &["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"],
    );
    let (code, output) = ping(Some(spoofed));
    assert_ne!(
        code,
        0,
        "a ping from the spoofed {spoofed} got answers: {output}\n{}",
        fx.diagnostics()
    );
    eprintln!("ping from the pod IP {pod_ip}: answered; from {spoofed}: exit {code}, no answer");
    let mut crasher = container_config(
        "crasher",
        &[
            "sh",
            "-c",
            "echo 2 > /proc/sys/vm/panic_on_oom && dd if=/dev/zero of=/dev/null bs=128M count=1; sleep 600",
        ],
    );
    if let Some(linux) = crasher.linux.as_mut() {
        linux
            .security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
    }
    fx.start_container(&pod, &pod_cfg, &crasher);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = client.container_status(&victim).expect("ContainerStatus");
        if status.state == cri::ContainerState::ContainerExited as i32 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the victim still runs 120 s after the panic was set off\n{}",
            fx.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // 255 (the shim's VM-died status) unless the agent reported the exit
    // first; never a clean exit.
    assert_ne!(status.exit_code, 0, "{status:?}");
    eprintln!("victim exited {} ({})", status.exit_code, status.reason);
    // The console log (with the guest's panic message) goes with the pod
    // when containerd shuts the sandbox down after its VM died, so the
    // reason is asserted where it stays: the shim's log in containerd's.
    let containerd_log = fx.env.containerd_log();
    assert!(
        containerd_log.contains("pod VM died"),
        "no reason in the shim's log\n{}",
        fx.diagnostics()
    );
    // The pod is no longer ready: containerd marks it once it has handled
    // the sandbox task's exit event, which can come after the containers'
    // (seen in L1: still ready right after the victim's exit).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod_status = client.pod_status(&pod).expect("PodSandboxStatus");
        if pod_status.state == cri::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod is still ready 60 s after its VM died\n{}",
            fx.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    fx.remove_pod(&pod);
    fx.assert_nothing_left();
}

/// Runs `work` on a thread that joined the network namespace `netns`
/// (which stays: this does not own it).
fn in_netns<T: Send + 'static>(netns: &Path, work: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns).expect("the pod's netns");
    std::thread::spawn(move || {
        // SAFETY: setns(2) on an fd we own, for this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .expect("the thread in the pod netns")
}

fn unix_now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i64)
}

/// Issue #15, pod sysctls: the namespaced ones kubelet passes and
/// containerd 2.x adds to every sandbox (`ip_unprivileged_port_start`)
/// reach the guest; one that is not namespaced, or a `net.*` one the
/// kernel keeps global, fails the pod with its name. And the guest clock:
/// set from the host at boot, so the guest's `date` and the timestamps of
/// ContainerStatus are the host's.
fn microvm_pod_sysctls_and_guest_clock(backend: TestBackend) {
    let fx = fixture("cri-sysctl", backend);
    let client = fx.client();
    let name = "sysctl-pod";
    let mut pod_cfg = pod_config(name, &fx.env.log_dir(name), &[]);
    pod_cfg.linux.as_mut().unwrap().sysctls = [
        ("net.ipv4.ip_unprivileged_port_start", "0"),
        ("kernel.shm_rmid_forced", "1"),
        ("net.ipv4.ip_local_port_range", "40000 50000"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    let pod = client
        .run_pod(&pod_cfg, MICROVM_HANDLER)
        .unwrap_or_else(|err| panic!("RunPodSandbox with sysctls: {err}\n{}", fx.diagnostics()));
    let ctr = fx.start_container(&pod, &pod_cfg, &container_config("c1", &["sleep", "600"]));
    let values = fx.exec(
        &ctr,
        &[
            "cat",
            "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            "/proc/sys/kernel/shm_rmid_forced",
            "/proc/sys/net/ipv4/ip_local_port_range",
        ],
    );
    let values: Vec<String> = values
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(values, ["0", "1", "40000 50000"], "{values:?}");
    // The container's /proc/sys stays read-only all the same.
    let write = client
        .exec_sync(
            &ctr,
            &["sh", "-c", "echo 0 > /proc/sys/kernel/shm_rmid_forced"],
            60,
        )
        .expect("ExecSync");
    assert_ne!(write.exit_code, 0, "the container could write /proc/sys");

    // The guest clock is the host's (QEMU's microvm has no RTC: without
    // the shim's sync it reads a few seconds after the epoch).
    let before = unix_now_nanos();
    let guest: i64 = fx
        .exec(&ctr, &["date", "+%s"])
        .trim()
        .parse()
        .expect("date +%s");
    let after = unix_now_nanos();
    let skew = guest * 1_000_000_000 - before;
    assert!(
        guest >= before / 1_000_000_000 - 2 && guest <= after / 1_000_000_000 + 2,
        "guest date {guest}, host {before}..{after} ns (skew {skew} ns)"
    );
    eprintln!("guest clock: date +%s {guest}, host {before}..{after} ns");

    // ContainerStatus of a container that ran and exited: host times, in
    // order.
    let short_started = unix_now_nanos();
    let short = fx.start_container(
        &pod,
        &pod_cfg,
        &container_config("short", &["sh", "-c", "sleep 2; exit 3"]),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = client.container_status(&short).expect("ContainerStatus");
        if status.state == cri::ContainerState::ContainerExited as i32 {
            break status;
        }
        assert!(Instant::now() < deadline, "still {:?}", status.state);
        std::thread::sleep(Duration::from_millis(200));
    };
    let seen_exited = unix_now_nanos();
    assert_eq!(status.exit_code, 3);
    let slack = 5_000_000_000;
    for (what, at) in [
        ("created_at", status.created_at),
        ("started_at", status.started_at),
        ("finished_at", status.finished_at),
    ] {
        assert!(
            at >= short_started - slack && at <= seen_exited + slack,
            "{what} {at} not within {short_started}..{seen_exited} ns (±5 s)"
        );
    }
    assert!(
        status.finished_at >= status.started_at,
        "finished_at {} before started_at {}",
        status.finished_at,
        status.started_at
    );
    // containerd stamps started_at when Start returns, after the process
    // began in the guest; under TCG that reply can lag by a few hundred ms,
    // so a 2 s sleep must show as at least 1 s.
    assert!(
        status.finished_at - status.started_at >= 1_000_000_000,
        "it slept 2 s: started {} finished {}",
        status.started_at,
        status.finished_at
    );
    eprintln!(
        "ContainerStatus: created {} started {} finished {} (host window {short_started}..{seen_exited})",
        status.created_at, status.started_at, status.finished_at
    );
    // Port forwarding as containerd's streaming server does it: dial
    // 127.0.0.1:<port> inside the pod's network namespace on the host. (No
    // SPDY/websocket client here: this is the path after containerd's
    // stream, not the stream.)
    let server = fx.start_container(
        &pod,
        &pod_cfg,
        &container_config(
            "web",
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo served-through-port-forward > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
            ],
        ),
    );
    let netns: Vec<String> = cni_netns()
        .into_iter()
        .filter(|name| !fx.netns_before.contains(name))
        .collect();
    assert_eq!(netns.len(), 1, "the pod's netns: {netns:?}");
    let pod_netns = PathBuf::from("/var/run/netns").join(&netns[0]);
    let get = |port: u16| -> Result<String, String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
            .map_err(|err| format!("connect: {err}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|err| err.to_string())?;
        stream
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|err| format!("write: {err}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|err| format!("read: {err}"))?;
        Ok(answer)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let answers = loop {
        let answers = in_netns(&pod_netns, move || {
            (0..3)
                .map(|_| get(8080))
                .collect::<Vec<Result<String, String>>>()
        });
        if answers.iter().all(
            |answer| matches!(answer, Ok(text) if text.contains("served-through-port-forward")),
        ) || Instant::now() >= deadline
        {
            break answers;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for answer in &answers {
        assert!(
            matches!(answer, Ok(text) if text.contains("served-through-port-forward")),
            "127.0.0.1:8080 in the pod netns: {answers:?}\n{}",
            fx.diagnostics()
        );
    }
    // A port nothing listens on in the VM: the connection is closed with
    // no byte.
    let closed = in_netns(&pod_netns, move || get(8081));
    assert!(
        matches!(&closed, Ok(text) if text.is_empty()) || closed.is_err(),
        "{closed:?}"
    );
    eprintln!("port forward: 3 connections to 8080 answered; 8081: {closed:?}");
    let _ = server;

    fx.remove_pod(&pod);
    fx.assert_nothing_left();

    // Refused by name: not namespaced, and net.* that the kernel keeps
    // for the initial namespace (the VM's, here) only.
    for (key, value, expected) in [
        ("kernel.panic", "1", "\"kernel.panic\" is not namespaced"),
        (
            "net.core.netdev_max_backlog",
            "10",
            "\"net.core.netdev_max_backlog\" is global in the VM",
        ),
    ] {
        let name = format!("bad-{}", key.replace(['.', '_'], "-"));
        let mut config = pod_config(&name, &fx.env.log_dir(&name), &[]);
        config.linux.as_mut().unwrap().sysctls =
            [(key.to_owned(), value.to_owned())].into_iter().collect();
        let err = client
            .run_pod(&config, MICROVM_HANDLER)
            .expect_err(&format!("a pod with {key}"));
        assert!(
            err.message().contains(expected),
            "{key}: expected {expected:?}, got: {}",
            err.message()
        );
        eprintln!("{key}: {}", err.message());
        fx.env.client.remove_all_pods();
        fx.assert_nothing_left();
    }
}

type Case = fn(TestBackend);

const MICROVM_CASES: &[(&str, Case)] = &[
    ("pod_runs_the_crictl_flow", microvm_pod_runs_the_crictl_flow),
    ("pod_networking", microvm_pod_networking),
    ("bad_pods_fail_clearly", microvm_bad_pods_fail_clearly),
    (
        "pods_cannot_reach_each_others_agent",
        microvm_pods_cannot_reach_each_others_agent,
    ),
    (
        "pods_get_cgroups_of_their_own_with_either_driver",
        pods_get_cgroups_of_their_own_with_either_driver,
    ),
    (
        "a_hostile_guest_cannot_spoof_and_its_kernel_panic_exits_the_containers",
        a_hostile_guest_cannot_spoof_and_its_kernel_panic_exits_the_containers,
    ),
    (
        "pod_sysctls_guest_clock_and_port_forward",
        microvm_pod_sysctls_and_guest_clock,
    ),
];

fn main() {
    let mut suite = Suite::new("cri_pods", Duration::from_secs(3000))
        .forward_env(TEST_AGENT_ENV, test_agent_binary);
    suite.host(Trial::test(
        "runc::pod_runs_through_the_same_cri_setup",
        || {
            runc_pod_runs_through_the_same_cri_setup();
            Ok(())
        },
    ));
    for (name, case) in MICROVM_CASES {
        let case = *case;
        suite.host(Trial::test(format!("qemu_tcg::{name}"), move || {
            case(TestBackend::QemuTcg);
            Ok(())
        }));
        suite.kvm(format!("builtin::{name}"), move || {
            case(TestBackend::Builtin);
            Ok(())
        });
        suite.kvm(format!("qemu_kvm::{name}"), move || {
            case(TestBackend::QemuKvm);
            Ok(())
        });
    }
    suite.run()
}
