//! Containers through the agent's API on the host (root, no VM): output and
//! exit codes, environment and users, exec, signals, stdin, terminals,
//! seccomp and capabilities, namespaces, stats, events, and leaks.

use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{process, process_ref, rootfs, spec, AgentClient, AgentUnderTest};
use serde_json::json;
use std::time::Duration;

/// Fails with the agent's log attached.
fn ok<T>(agent: &AgentUnderTest, result: Result<T, tonic::Status>) -> T {
    result.unwrap_or_else(|status| panic!("{status:?}\nagent log:\n{}", agent.log_text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_prints_and_exit_code_comes_back() {
    let agent = AgentUnderTest::start("echo");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let output = ok(
        &agent,
        client
            .run(
                "c1",
                &spec(&rootfs, &["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
            )
            .await,
    );
    assert_eq!(output.stdout_text(), "hello\n");
    assert_eq!(output.stderr_text(), "oops\n");
    assert_eq!(output.code, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_cwd_user_groups_and_home_follow_the_spec() {
    let agent = AgentUnderTest::start("user");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut spec = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u; id -g; id -G; echo $HOME; umask",
        ],
    );
    spec["process"]["env"] = json!(["PATH=/bin", "GREETING=hi there"]);
    spec["process"]["cwd"] = json!("/tmp");
    spec["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 29], "umask": 23});
    let output = ok(&agent, client.run("c1", &spec).await);
    assert_eq!(output.code, 0, "stderr: {}", output.stderr_text());
    let lines: Vec<&str> = output
        .stdout
        .split(|b| *b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap_or(""))
        .collect();
    assert_eq!(lines[0], "hi there");
    assert_eq!(lines[1], "/tmp");
    assert_eq!(lines[2], "1000");
    assert_eq!(lines[3], "1000");
    let mut groups: Vec<&str> = lines[4].split_whitespace().collect();
    groups.sort_unstable();
    assert_eq!(groups, ["10", "1000", "29"]);
    assert_eq!(
        lines[5], "/home/user",
        "HOME comes from the rootfs's /etc/passwd"
    );
    assert_eq!(lines[6], "0027");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_the_process_and_exit_codes_say_which() {
    let agent = AgentUnderTest::start("signal");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;

    // A handler sees SIGTERM: the trap's exit code comes back.
    let trap = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    );
    ok(&agent, client.create("trap", &trap, false).await);
    ok(&agent, client.start("trap").await);
    let mut reader = client.clone();
    let mut stream = ok(
        &agent,
        reader
            .processes
            .read_output(api::ReadOutputRequest {
                process: process_ref("trap", ""),
                stream: api::OutputStream::Stdout as i32,
            })
            .await,
    )
    .into_inner();
    let first = ok(&agent, stream.message().await).expect("the ready line");
    assert_eq!(&first.data[..], b"ready\n");
    ok(&agent, client.signal("trap", "", libc::SIGTERM).await);
    assert_eq!(ok(&agent, client.wait("trap", "").await), 42);

    // No handler, SIGKILL: 128 + 9.
    let sleeper = spec(&rootfs, &["sleep", "1000"]);
    ok(&agent, client.create("kill", &sleeper, false).await);
    ok(&agent, client.start("kill").await);
    ok(&agent, client.signal("kill", "", libc::SIGKILL).await);
    assert_eq!(ok(&agent, client.wait("kill", "").await), 137);
    ok(&agent, client.remove("trap", false).await);
    ok(&agent, client.remove("kill", false).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_inside_the_running_container() {
    let agent = AgentUnderTest::start("exec");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    ok(
        &agent,
        client
            .create("c1", &spec(&rootfs, &["sleep", "1000"]), false)
            .await,
    );
    ok(&agent, client.start("c1").await);

    let mut exec = process(&[
        "sh",
        "-c",
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; echo $X; exit 5",
    ]);
    exec["env"] = json!(["PATH=/bin", "X=from-exec"]);
    ok(&agent, client.exec("c1", "e1", &exec, false).await);
    let output = ok(&agent, client.collect("c1", "e1").await);
    assert_eq!(output.code, 5);
    assert_eq!(
        output.stdout_text(),
        "sleep 1000 \ncontainer\nfrom-exec\n",
        "the exec sees the container's PID namespace (pid 1 is its sleep) and hostname"
    );
    // The exec is in the container's cgroup while it runs.
    ok(
        &agent,
        client
            .exec("c1", "e2", &process(&["sleep", "1000"]), false)
            .await,
    );
    let pids = ok(
        &agent,
        client
            .containers
            .list_pids(api::ListPidsRequest {
                container_id: "c1".into(),
            })
            .await,
    )
    .into_inner()
    .pids;
    assert_eq!(pids.len(), 2, "init and the second exec: {pids:?}");
    ok(&agent, client.remove("c1", true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_stdin_ends_cat() {
    let agent = AgentUnderTest::start("stdin");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    ok(
        &agent,
        client.create("c1", &spec(&rootfs, &["cat"]), true).await,
    );
    ok(&agent, client.start("c1").await);
    ok(
        &agent,
        client
            .write_stdin("c1", "", b"line one\n".to_vec(), false)
            .await,
    );
    ok(
        &agent,
        client
            .write_stdin("c1", "", b"line two\n".to_vec(), false)
            .await,
    );
    ok(
        &agent,
        client
            .processes
            .close_stdin(api::CloseStdinRequest {
                process: process_ref("c1", ""),
            })
            .await,
    );
    let output = tokio::time::timeout(Duration::from_secs(10), client.collect("c1", ""))
        .await
        .expect("cat ends once stdin is closed");
    let output = ok(&agent, output);
    assert_eq!(output.code, 0);
    assert_eq!(output.stdout_text(), "line one\nline two\n");
    ok(&agent, client.remove("c1", false).await);
}

/// Reads `stream` until the text seen so far contains `wanted`.
async fn read_until(
    stream: &mut tonic::Streaming<api::OutputChunk>,
    seen: &mut String,
    wanted: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(wanted) {
        let chunk = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?} within 10 s; got {seen:?}"))
            .expect("output stream")
            .unwrap_or_else(|| panic!("output ended before {wanted:?}; got {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk.data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_processes_get_a_pty_and_resize_works() {
    let agent = AgentUnderTest::start("tty");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut spec = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "tty; stty size; read line; stty size; echo got:$line",
        ],
    );
    spec["process"]["terminal"] = json!(true);
    spec["process"]["consoleSize"] = json!({"height": 24, "width": 80});
    ok(&agent, client.create("c1", &spec, false).await);
    ok(&agent, client.start("c1").await);
    let mut stream = ok(
        &agent,
        client
            .processes
            .read_output(api::ReadOutputRequest {
                process: process_ref("c1", ""),
                stream: api::OutputStream::Stdout as i32,
            })
            .await,
    )
    .into_inner();
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "24 80").await;
    assert!(
        seen.contains("/dev/pts/0"),
        "the pty is the container's own: {seen:?}"
    );
    ok(
        &agent,
        client
            .processes
            .resize_tty(api::ResizeTtyRequest {
                process: process_ref("c1", ""),
                width: 132,
                height: 43,
            })
            .await,
    );
    ok(
        &agent,
        client
            .write_stdin("c1", "", b"hello\n".to_vec(), false)
            .await,
    );
    read_until(&mut stream, &mut seen, "got:hello").await;
    assert!(seen.contains("43 132"), "stty size after resize: {seen:?}");
    assert_eq!(ok(&agent, client.wait("c1", "").await), 0);

    // An exec with a terminal, and stdin close as the EOF character.
    ok(
        &agent,
        client
            .create("c2", &spec_with_tty(&rootfs, &["sleep", "1000"]), false)
            .await,
    );
    ok(&agent, client.start("c2").await);
    let mut exec = process(&["cat"]);
    exec["terminal"] = json!(true);
    ok(&agent, client.exec("c2", "t", &exec, false).await);
    ok(
        &agent,
        client
            .write_stdin("c2", "t", b"typed\n".to_vec(), true)
            .await,
    );
    let output = ok(&agent, client.collect("c2", "t").await);
    assert_eq!(output.code, 0);
    assert!(
        output.stdout_text().contains("typed"),
        "{:?}",
        output.stdout_text()
    );
    ok(&agent, client.remove("c1", false).await);
    ok(&agent, client.remove("c2", true).await);
}

fn spec_with_tty(rootfs: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut spec = spec(rootfs, args);
    spec["process"]["terminal"] = json!(true);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_before_exit_is_not_lost() {
    let agent = AgentUnderTest::start("lost");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    // ~590 kB on stdout and a marker on stderr, then exit at once. Nothing
    // is read until the process has been reaped.
    let script = "seq 1 100000; echo done >&2";
    ok(
        &agent,
        client
            .create("c1", &spec(&rootfs, &["sh", "-c", script]), false)
            .await,
    );
    ok(&agent, client.start("c1").await);
    assert_eq!(ok(&agent, client.wait("c1", "").await), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stdout = ok(&agent, client.read_output("c1", "", false).await);
    let stderr = ok(&agent, client.read_output("c1", "", true).await);
    let expected: String = (1..=100_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(stdout.len(), expected.len());
    assert!(
        stdout == expected.as_bytes(),
        "stdout differs from seq 1 100000"
    );
    assert_eq!(stderr, b"done\n");
    // Read again after the end: empty, not an error.
    assert!(ok(&agent, client.read_output("c1", "", false).await).is_empty());
    ok(&agent, client.remove("c1", false).await);

    // Larger than the pipe: read while it runs, every byte arrives.
    let script = "head -c 20000000 /dev/zero | tr '\\0' 'x'";
    ok(
        &agent,
        client
            .create("c2", &spec(&rootfs, &["sh", "-c", script]), false)
            .await,
    );
    ok(&agent, client.start("c2").await);
    let output = ok(&agent, client.collect("c2", "").await);
    assert_eq!(output.code, 0);
    assert_eq!(output.stdout.len(), 20_000_000);
    assert!(output.stdout.iter().all(|b| *b == b'x'));
    ok(&agent, client.remove("c2", false).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cycles_leave_no_process_mount_cgroup_or_fd_behind() {
    let agent = AgentUnderTest::start("cycles");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    // Warm up once (lazy state such as the first connection's buffers).
    ok(&agent, client.run("warm", &spec(&rootfs, &["true"])).await);
    let mounts_before = agent.mounts();
    let fds_before = agent.open_fds();
    for cycle in 0..50 {
        let id = format!("cycle-{cycle}");
        let output = ok(
            &agent,
            client
                .run(&id, &spec(&rootfs, &["sh", "-c", "echo $$"]))
                .await,
        );
        assert_eq!(output.code, 0);
        assert_eq!(
            output.stdout_text(),
            "1\n",
            "pid 1 of its own PID namespace"
        );
    }
    assert_eq!(agent.children(), Vec::<u32>::new(), "no process left");
    assert_eq!(
        agent.mounts(),
        mounts_before,
        "no mount left in the agent's namespace"
    );
    assert_eq!(
        microvm_tests::agent::child_cgroups(agent.cgroup.path()),
        Vec::<String>::new(),
        "no cgroup left"
    );
    assert_eq!(agent.open_fds(), fds_before, "no descriptor left");
    let listed = ok(
        &agent,
        client
            .containers
            .list_containers(api::ListContainersRequest {})
            .await,
    )
    .into_inner();
    assert!(listed.containers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_settings_are_applied() {
    let agent = AgentUnderTest::start("security");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut spec = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "grep -E '^(NoNewPrivs|CapEff|CapBnd)' /proc/self/status; \
             ulimit -n; \
             mkdir /tmp/d 2>&1 || echo mkdir-denied; \
             touch /tmp/f && chown 1000 /tmp/f 2>&1 || echo chown-denied; \
             echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null || echo proc-sys-ro; \
             wc -c < /proc/keys; \
             ls /sys/firmware | wc -l",
        ],
    );
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 200, "soft": 100}]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let output = ok(&agent, client.run("c1", &spec).await);
    let text = output.stdout_text();
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    // CAP_AUDIT_WRITE(29), CAP_KILL(5), CAP_NET_BIND_SERVICE(10).
    let expected_caps = format!("{:016x}", (1u64 << 29) | (1 << 5) | (1 << 10));
    assert!(
        text.contains(&format!("CapEff:\t{expected_caps}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("CapBnd:\t{expected_caps}")),
        "{text}"
    );
    assert!(text.contains("\n100\n"), "ulimit -n: {text}");
    assert!(
        text.contains("mkdir-denied"),
        "seccomp denies mkdir: {text}"
    );
    assert!(text.contains("chown-denied"), "no CAP_CHOWN: {text}");
    assert!(
        text.contains("proc-sys-ro"),
        "/proc/sys is read-only: {text}"
    );
    assert!(
        text.contains("\n0\n0\n"),
        "/proc/keys and /sys/firmware are masked: {text}\nstderr: {}\ncode {}",
        output.stderr_text(),
        output.code
    );

    // A read-only root.
    let mut readonly =
        microvm_tests::agent::spec(&rootfs, &["sh", "-c", "touch /x 2>/dev/null || echo ro"]);
    readonly["root"]["readonly"] = json!(true);
    let output = ok(&agent, client.run("c2", &readonly).await);
    assert_eq!(output.stdout_text(), "ro\n");
}

/// `linux.resources.devices` becomes a cgroup device program: with
/// deny-all, a node the spec made still cannot be opened (the standard
/// devices stay usable); with an allow rule for it, it can; a bad rule is
/// refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_rules_are_enforced_by_the_cgroup() {
    let agent = AgentUnderTest::start("devices");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let probe = "head -c 0 /dev/loop-control && echo opened || echo denied; \
                 head -c 1 /dev/zero | wc -c";
    let mut denied = spec(&rootfs, &["sh", "-c", probe]);
    denied["linux"]["devices"] = json!([{
        "path": "/dev/loop-control", "type": "c", "major": 10, "minor": 237,
        "fileMode": 0o600, "uid": 0, "gid": 0
    }]);
    denied["linux"]["resources"] = json!({"devices": [{"allow": false, "access": "rwm"}]});
    let output = ok(&agent, client.run("denied", &denied).await);
    assert_eq!(
        output.stdout_text(),
        "denied\n1\n",
        "{:?}",
        output.stderr_text()
    );
    assert!(
        output.stderr_text().contains("Operation not permitted"),
        "{:?}",
        output.stderr_text()
    );

    let mut allowed = denied.clone();
    allowed["linux"]["resources"]["devices"] = json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 10, "minor": 237, "access": "r"}
    ]);
    let output = ok(&agent, client.run("allowed", &allowed).await);
    assert_eq!(
        output.stdout_text(),
        "opened\n1\n",
        "{:?}",
        output.stderr_text()
    );

    let mut bad = denied.clone();
    bad["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwx"}]);
    let status = client.create("bad", &bad, false).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("r, w and m"), "{status:?}");
}

/// The namespace inode of `kind` for a process seen through `path`.
fn namespace_of(path: &str) -> String {
    std::fs::read_link(path)
        .map(|link| link.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_with_a_path_are_the_pods_and_others_are_new() {
    let agent = AgentUnderTest::start("ns");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut shared = spec(&rootfs, &["sleep", "1000"]);
    shared["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"},
        {"type": "ipc", "path": "/proc/1/ns/ipc"},
        {"type": "uts", "path": "/proc/1/ns/uts"},
        {"type": "network", "path": "/var/run/netns/pod"}
    ]);
    let own = spec(&rootfs, &["sleep", "1000"]);
    let shared_pid = ok(&agent, client.create("shared", &shared, false).await);
    let own_pid = ok(&agent, client.create("own", &own, false).await);
    let agent_pid = agent.pid();
    for kind in ["ipc", "uts", "net"] {
        assert_eq!(
            namespace_of(&format!("/proc/{shared_pid}/ns/{kind}")),
            namespace_of(&format!("/proc/{agent_pid}/ns/{kind}")),
            "{kind} with a path is the pod's (the agent's)"
        );
    }
    for kind in ["ipc", "uts", "pid", "mnt"] {
        assert_ne!(
            namespace_of(&format!("/proc/{own_pid}/ns/{kind}")),
            namespace_of(&format!("/proc/{agent_pid}/ns/{kind}")),
            "{kind} without a path is new"
        );
    }
    ok(&agent, client.remove("shared", false).await);
    ok(&agent, client.remove("own", false).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_pids_and_exit_events() {
    let agent = AgentUnderTest::start("stats");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut events = ok(
        &agent,
        client
            .events
            .subscribe_events(api::SubscribeEventsRequest {})
            .await,
    )
    .into_inner();
    let busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000 & sleep 1000 & wait";
    ok(
        &agent,
        client
            .create("c1", &spec(&rootfs, &["sh", "-c", busy]), false)
            .await,
    );
    ok(&agent, client.start("c1").await);
    let mut pids = Vec::new();
    for _ in 0..200 {
        pids = ok(
            &agent,
            client
                .containers
                .list_pids(api::ListPidsRequest {
                    container_id: "c1".into(),
                })
                .await,
        )
        .into_inner()
        .pids;
        if pids.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(pids.len(), 3, "sh and two sleeps: {pids:?}");
    let stats = ok(
        &agent,
        client
            .containers
            .container_stats(api::ContainerStatsRequest {
                container_id: "c1".into(),
            })
            .await,
    )
    .into_inner();
    let cpu = stats.cpu.expect("cpu stats");
    assert!(cpu.usage_usec > 0, "the loop used CPU: {cpu:?}");
    assert!(
        stats.network.iter().any(|interface| interface.name == "lo"),
        "network stats list lo: {:?}",
        stats.network
    );
    ok(&agent, client.signal("c1", "", libc::SIGKILL).await);
    assert_eq!(ok(&agent, client.wait("c1", "").await), 137);

    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .expect("an exit event within 5 s");
    let event = ok(&agent, event).expect("the event stream is open");
    match event.kind {
        Some(api::event::Kind::ProcessExited(exited)) => {
            assert_eq!(exited.container_id, "c1");
            assert_eq!(exited.exec_id, "");
            assert_eq!(exited.exit_code, 137);
            assert!(exited.exited_at_unix_nanos > 0);
        }
        other => panic!("expected an exit event, got {other:?}"),
    }
    ok(&agent, client.remove("c1", false).await);
}

/// cgroup limits need the memory and pids controllers in the agent's
/// cgroup root. A cgroup v1 host binds them to v1, so there the agent must
/// refuse a limit with FAILED_PRECONDITION naming the controller; the
/// limits themselves are tested in the guest (agent_qemu).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_without_a_controller_are_refused_by_name() {
    let agent = AgentUnderTest::start("nolimits");
    if microvm_tests::agent::cgroup_controllers(agent.cgroup.path()).contains(&"memory".to_owned())
    {
        eprintln!("the memory controller is available here; covered by the limit tests");
        return;
    }
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut limited = spec(&rootfs, &["true"]);
    limited["linux"]["resources"] = json!({"memory": {"limit": 33554432}});
    let err = client.create("c1", &limited, false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("memory") && err.message().contains("c1"),
        "{err:?}"
    );
    // And the agent goes on.
    let output = ok(&agent, client.run("c2", &spec(&rootfs, &["true"])).await);
    assert_eq!(output.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_containers_can_be_removed_without_starting() {
    let agent = AgentUnderTest::start("created");
    let rootfs = rootfs(&agent.dir);
    let mut client: AgentClient = agent.client().await;
    let pid = ok(
        &agent,
        client.create("c1", &spec(&rootfs, &["true"]), false).await,
    );
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let listed = ok(
        &agent,
        client
            .containers
            .list_containers(api::ListContainersRequest {})
            .await,
    )
    .into_inner();
    assert_eq!(listed.containers.len(), 1);
    assert_eq!(
        listed.containers[0].status,
        api::ContainerStatus::Created as i32
    );
    ok(&agent, client.remove("c1", false).await);
    assert_eq!(agent.children(), Vec::<u32>::new());
}

/// A container without its own PID namespace leaves an orphan behind; the
/// agent (subreaper here, PID 1 in the VM) reaps it: no zombie stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped() {
    let agent = AgentUnderTest::start("orphans");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let mut shared_pid = spec(
        &rootfs,
        &["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"],
    );
    shared_pid["linux"]["namespaces"] =
        json!([{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]);
    let output = ok(&agent, client.run("c1", &shared_pid).await);
    let orphan: u32 = output
        .stdout_text()
        .trim()
        .parse()
        .expect("the orphan's pid");
    // Right after its parent exits the orphan is the agent's child ...
    let parent = std::fs::read_to_string(format!("/proc/{orphan}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .map(str::to_owned)
        });
    if let Some(parent) = parent {
        assert_eq!(parent, agent.pid().to_string(), "reparented to the agent");
    }
    // ... and once it exits, nothing of it is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {orphan} is still there (zombie?)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(agent.children(), Vec::<u32>::new());
}
