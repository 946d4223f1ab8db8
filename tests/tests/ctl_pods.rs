//! microvm-ctl against live pods, through a private containerd and ctr, on
//! `qemu` under TCG on the host and on `builtin` (the jailed microvm-vmm) in
//! the KVM harness: `ps` lists the pod from its shim's record with the
//! VM's host processes and their PSS; `logs` prints (and `-f` follows until
//! the pod is gone) its console; `console` reaches a shell in the VM
//! outside every container, and is refused, by microvm-ctl and by the
//! agent, for a pod booted with the console off; `metrics` is scraped while
//! the pod runs and its figures are checked against /proc and the agent.

use microvm_proto::agent::v1 as api;
use microvm_tests::containerd::{ShimSetup, TestBackend};
use microvm_tests::harness::{binary, Finished};
use microvm_tests::kvm::Suite;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/library/ctl-busybox:latest";
const RUNTIME: &str = "io.containerd.microvm.v2";
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

fn ctl(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary("microvm-ctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run microvm-ctl")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn run_detached(setup: &ShimSetup, id: &str) {
    let config = setup.config.to_string_lossy().into_owned();
    let done: Result<Finished, String> = setup.containerd.ctr_ok(
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &config,
            IMAGE,
            id,
            "sleep",
            "600",
        ],
        RUN_TIMEOUT,
    );
    if let Err(err) = done {
        panic!("{err}\n{}", setup.containerd.log());
    }
}

fn remove(setup: &ShimSetup, id: &str) {
    let ctr = |args: &[&str]| setup.containerd.ctr(args, Duration::from_secs(60));
    let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let listed = ctr(&["tasks", "ls"])
            .map(|done| done.stdout)
            .unwrap_or_default();
        if !listed
            .lines()
            .any(|line| line.starts_with(id) && line.contains("RUNNING"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctr(&["tasks", "delete", id]);
    let _ = ctr(&["containers", "delete", id]);
}

/// PSS of `pid` and the processes below it, as microvm-ctl counts a host
/// process (the jailed VMM is its supervisor's child).
fn tree_pss_kib(pid: u32) -> u64 {
    pss_kib(pid)
        + microvm_shim::vm::supervisor::descendants(pid)
            .into_iter()
            .map(pss_kib)
            .sum::<u64>()
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The value of the sample whose name and labels contain all of `parts`.
fn sample(metrics: &str, name: &str, parts: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| parts.iter().all(|part| line.contains(part)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

fn console(config: &Path, pod: &str, input: &str) -> std::process::Output {
    let mut child = Command::new(binary("microvm-ctl"))
        .arg("--config")
        .arg(config)
        .args(["console", pod])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run microvm-ctl console");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    receiver
        .recv_timeout(Duration::from_secs(120))
        .expect("microvm-ctl console did not end within 120 s")
        .unwrap()
}

fn agent_socket(state_dir: &Path, pod: &str) -> PathBuf {
    microvm_shim::record::PodRecord::read(
        &state_dir
            .join(microvm_tests::containerd::NAMESPACE)
            .join(pod),
    )
    .expect("the pod's record")
    .agent_socket
}

const CASE: &str = "ps_logs_console_and_metrics_on_live_pods";

fn main() {
    let mut suite = Suite::new("ctl_pods", Duration::from_secs(900));
    suite.host(libtest_mimic::Trial::test(
        format!("qemu_tcg::{CASE}"),
        || {
            on_live_pods(TestBackend::QemuTcg);
            Ok(())
        },
    ));
    suite.kvm(format!("builtin::{CASE}"), || {
        on_live_pods(TestBackend::Builtin);
        Ok(())
    });
    suite.run()
}

fn on_live_pods(backend: TestBackend) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(ps_logs_console_and_metrics(backend));
}

/// The VM's host processes the record lists, by backend.
fn host_process_names(backend: TestBackend) -> &'static [&'static str] {
    match backend {
        TestBackend::Builtin => &["virtiofsd", "vmm"],
        TestBackend::QemuKvm | TestBackend::QemuTcg => &["virtiofsd", "vhost-device-vsock", "qemu"],
    }
}

async fn ps_logs_console_and_metrics(backend: TestBackend) {
    let setup = ShimSetup::start_on(backend, "ctl-pods", IMAGE, "\n[console]\nenabled = true\n");
    let config = setup.config.clone();
    let state_dir = setup.work.join("state");
    let started = Instant::now();
    run_detached(&setup, "ctlpod");
    eprintln!("pod ctlpod up in {:?}", started.elapsed());

    // ps: the record, with live pids.
    let output = ctl(&config, &["ps", "--json"]);
    assert!(output.status.success(), "{}", text(&output));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["pod_id"], "ctlpod");
    let backend_name = if backend == TestBackend::Builtin {
        "builtin"
    } else {
        "qemu"
    };
    assert_eq!(row["backend"], backend_name);
    assert_eq!(row["state"], "running");
    assert_eq!(row["namespace"], microvm_tests::containerd::NAMESPACE);
    assert_eq!(row["vcpus"], 1);
    assert_eq!(row["memory_mib"], 256);
    let vm_pid = row["vm_pid"].as_u64().expect("a VM pid") as u32;
    let comm = std::fs::read_to_string(format!("/proc/{vm_pid}/comm")).unwrap();
    // comm holds 15 bytes of the name.
    let vmm = &backend.vmm_process()[..15.min(backend.vmm_process().len())];
    assert_eq!(comm.trim_end(), vmm);
    let mut names: Vec<&str> = row["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    let mut expected = host_process_names(backend).to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
    let ps_pss = row["pss_bytes_total"].as_u64().unwrap();
    // Without the jailed VMM (its supervisor's child) a builtin pod's
    // processes came to 2.3 MB; QEMU alone is over 20 MiB.
    let least: u64 = if backend == TestBackend::Builtin {
        3 << 20
    } else {
        10 << 20
    };
    assert!(ps_pss > least, "PSS of the pod's processes: {ps_pss}");
    let table = text(&ctl(&config, &["ps"]));
    assert!(table.starts_with("POD ID"), "{table}");
    assert!(
        table.contains("ctlpod") && table.contains(&vm_pid.to_string()),
        "{table}"
    );
    eprintln!("{table}");

    // logs: the console, with the agent's ready line.
    let logs = ctl(&config, &["logs", "ctlpod"]);
    assert!(logs.status.success(), "{}", text(&logs));
    assert!(
        text(&logs).contains("microvm-agent: ready"),
        "{}",
        text(&logs)
    );

    // console: a shell in the VM's own namespaces: PID 1 there is the
    // agent (/init of the initramfs), not the container's sleep.
    let output = console(
        &config,
        "ctlpod",
        "echo marker-$((6*7)); cat /proc/1/comm; ls /run/microvm/shared; exit\n",
    );
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("marker-42"), "{said}");
    assert!(said.lines().any(|line| line.trim() == "init"), "{said}");
    assert!(
        said.contains("ctlpod"),
        "the shared dir lists the container: {said}"
    );

    // metrics: against the agent and /proc.
    let scrape = ctl(&config, &["metrics", "--once"]);
    assert!(scrape.status.success(), "{}", text(&scrape));
    let metrics = String::from_utf8_lossy(&scrape.stdout).into_owned();
    let agent = microvm_shim::agent::AgentClient::connect(
        &agent_socket(&state_dir, "ctlpod"),
        microvm_proto::abi::vsock::AGENT_PORT,
    )
    .await
    .expect("connect to the agent");
    let details = agent
        .sandbox
        .clone()
        .get_guest_details(api::GetGuestDetailsRequest {})
        .await
        .unwrap()
        .into_inner();
    let total = sample(
        &metrics,
        "microvm_guest_memory_bytes",
        &["pod_id=\"ctlpod\"", "kind=\"total\""],
    );
    assert_eq!(total, Some(details.memory_total_bytes as f64), "{metrics}");
    let available = sample(
        &metrics,
        "microvm_guest_memory_bytes",
        &["kind=\"available\""],
    )
    .unwrap();
    assert!(available > 0.0 && available <= details.memory_total_bytes as f64);
    let user = sample(
        &metrics,
        "microvm_guest_cpu_seconds_total",
        &["mode=\"user\""],
    )
    .unwrap();
    let system = sample(
        &metrics,
        "microvm_guest_cpu_seconds_total",
        &["mode=\"system\""],
    )
    .unwrap();
    let idle = sample(
        &metrics,
        "microvm_guest_cpu_seconds_total",
        &["mode=\"idle\""],
    )
    .unwrap();
    // One vCPU: its times add up to about the guest's uptime.
    let cpu = user + system + idle;
    assert!(
        cpu > 0.5 * details.uptime_seconds && cpu < 1.5 * details.uptime_seconds + 5.0,
        "cpu {cpu} uptime {}",
        details.uptime_seconds
    );
    assert_eq!(
        sample(&metrics, "microvm_guest_oom_kills_total", &[]),
        Some(0.0)
    );
    assert_eq!(sample(&metrics, "microvm_guest_up", &[]), Some(1.0));
    let pid_label = format!("pid=\"{vm_pid}\"");
    let scraped_pss = sample(&metrics, "microvm_host_process_pss_bytes", &[&pid_label]).unwrap();
    let proc_pss = (tree_pss_kib(vm_pid) * 1024) as f64;
    assert!(
        (scraped_pss - proc_pss).abs() < 0.2 * proc_pss,
        "scraped {scraped_pss} /proc {proc_pss}"
    );
    let creates = sample(
        &metrics,
        "microvm_agent_rpc_total",
        &["method=\"/microvm.agent.v1.Containers/CreateContainer\""],
    );
    assert_eq!(creates, Some(1.0), "{metrics}");
    let checks = sample(&metrics, "microvm_agent_rpc_total", &["Health/Check"]).unwrap();
    assert!(checks >= 2.0, "boot and version checks: {checks}");
    let rpc_seconds = sample(
        &metrics,
        "microvm_agent_rpc_seconds_sum",
        &["CreateContainer"],
    )
    .unwrap();
    assert!(rpc_seconds > 0.0 && rpc_seconds < RUN_TIMEOUT.as_secs_f64());
    if backend == TestBackend::Builtin {
        // The VMM's own counters, from its control API: the agent's
        // answers crossed its vsock device, and the vCPU exited to it.
        let vsock_tx = sample(
            &metrics,
            "microvm_vmm_metric",
            &["part=\"vsock\"", "name=\"tx_bytes\""],
        );
        assert!(vsock_tx.is_some_and(|bytes| bytes > 0.0), "{metrics}");
        let exits = ["io_out", "mmio_write"].map(|name| {
            sample(
                &metrics,
                "microvm_vmm_metric",
                &["part=\"exits\"", &format!("name=\"{name}\"")],
            )
            .unwrap_or(0.0)
        });
        assert!(exits.iter().sum::<f64>() > 0.0, "{metrics}");
    } else {
        assert!(!metrics.contains("microvm_vmm_metric{"), "{metrics}");
    }
    let boot = sample(&metrics, "microvm_pod_boot_seconds", &["phase=\"guest\""]).unwrap();
    assert!(boot > 0.0 && boot < RUN_TIMEOUT.as_secs_f64(), "{boot}");
    eprintln!(
        "metrics: guest boot {boot:.2} s, VMM PSS scraped {:.1} MiB (/proc {:.1} MiB), guest memory {} MiB, CreateContainer {rpc_seconds:.3} s",
        scraped_pss / 1048576.0,
        proc_pss / 1048576.0,
        details.memory_total_bytes >> 20
    );
    // The HTTP endpoint serves the same text.
    let socket = setup.work.join("metrics.sock");
    let mut server = Command::new(binary("microvm-ctl"))
        .arg("--config")
        .arg(&config)
        .args(["metrics", "--listen", &format!("unix:{}", socket.display())])
        .spawn()
        .unwrap();
    assert!(microvm_tests::harness::wait_for_listener(
        &socket,
        Duration::from_secs(10)
    ));
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains("microvm_guest_up{pod_id=\"ctlpod\""),
        "{response}"
    );

    // logs -f ends once the pod is gone.
    let mut follow = Command::new(binary("microvm-ctl"))
        .arg("--config")
        .arg(&config)
        .args(["logs", "-f", "ctlpod"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f must keep following"
    );
    remove(&setup, "ctlpod");
    let ended = Instant::now();
    let status = loop {
        if let Some(status) = follow.try_wait().unwrap() {
            break Some(status);
        }
        if ended.elapsed() > Duration::from_secs(30) {
            let _ = follow.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "logs -f did not end with the pod"
    );

    // A pod booted with the console off: refused by microvm-ctl and by the
    // agent, and the policy the shim set cannot be changed.
    let text_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_config.replace("enabled = true", "enabled = false"),
    )
    .unwrap();
    run_detached(&setup, "ctlpod2");
    let refused = console(&config, "ctlpod2", "exit\n");
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("console is disabled"),
        "{}",
        text(&refused)
    );
    let agent = microvm_shim::agent::AgentClient::connect(
        &agent_socket(&state_dir, "ctlpod2"),
        microvm_proto::abi::vsock::AGENT_PORT,
    )
    .await
    .unwrap();
    let open = api::ConsoleInput {
        kind: Some(api::console_input::Kind::Open(api::ConsoleOpen {
            argv: vec!["sh".into()],
            ..Default::default()
        })),
    };
    let status = agent
        .debug
        .clone()
        .console(tokio_stream::iter(vec![open]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("console.enabled"), "{status:?}");
    let again = agent
        .debug
        .clone()
        .set_console_policy(api::ConsolePolicy { enabled: true })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    remove(&setup, "ctlpod2");
    let output = ctl(&config, &["ps", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert!(rows.is_empty(), "no pod left: {rows:?}");
}
