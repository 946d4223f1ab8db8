//! The sandbox (pod) calls: hostname, DNS, sysctls, the shared PID
//! namespace, teardown, guest details and power off. The agent runs in its
//! own UTS, IPC, mount and network namespaces, so none of this reaches the
//! host.

use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{rootfs, spec, AgentUnderTest};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tonic::Code;

fn ok<T>(agent: &AgentUnderTest, result: Result<T, tonic::Status>) -> T {
    result.unwrap_or_else(|status| panic!("{status:?}\nagent log:\n{}", agent.log_text()))
}

fn sandbox_request(id: &str, share_pid_namespace: bool) -> api::CreateSandboxRequest {
    api::CreateSandboxRequest {
        sandbox_id: id.into(),
        hostname: "pod-a".into(),
        dns: Some(api::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        sysctls: HashMap::from([("net.ipv4.ip_forward".to_owned(), "1".to_owned())]),
        share_pid_namespace,
    }
}

fn text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_sets_hostname_dns_and_sysctls() {
    let agent = AgentUnderTest::start("sandbox");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let files = ok(
        &agent,
        client
            .sandbox
            .create_sandbox(sandbox_request("pod", false))
            .await,
    )
    .into_inner();
    assert_eq!(
        std::fs::read_to_string(&files.resolv_conf_path).expect("resolv.conf"),
        "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"
    );
    assert_eq!(
        std::fs::read_to_string(&files.hostname_path).expect("hostname"),
        "pod-a\n"
    );
    assert!(std::fs::read_to_string(&files.hosts_path)
        .expect("hosts")
        .contains("pod-a"));
    assert_eq!(text(&agent.nsenter(&["uts"], &["hostname"])), "pod-a");
    assert_eq!(
        text(&agent.nsenter(&["net"], &["cat", "/proc/sys/net/ipv4/ip_forward"])),
        "1"
    );
    let duplicate = client
        .sandbox
        .create_sandbox(sandbox_request("pod2", false))
        .await;
    let err = duplicate.expect_err("one sandbox per VM");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("pod"), "{err:?}");

    // A container in the pod's UTS namespace sees the pod's hostname, and
    // the resolv.conf the shim binds in.
    let mut pod_spec = spec(&rootfs, &["sh", "-c", "hostname; cat /etc/resolv.conf"]);
    pod_spec["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"}, {"type": "uts", "path": "/proc/1/ns/uts"}
    ]);
    pod_spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"destination": "/etc/resolv.conf", "type": "bind",
                     "source": files.resolv_conf_path, "options": ["rbind", "ro"]}));
    let output = ok(&agent, client.run("c1", &pod_spec).await);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert!(
        output
            .stdout_text()
            .starts_with("pod-a\nnameserver 10.96.0.10\n"),
        "{}",
        output.stdout_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sandbox_requests_are_refused() {
    let agent = AgentUnderTest::start("badsandbox");
    let mut client = agent.client().await;
    let mut bad_sysctl = sandbox_request("pod", false);
    bad_sysctl.sysctls = HashMap::from([("net.no.such.key".to_owned(), "1".to_owned())]);
    let err = client
        .sandbox
        .create_sandbox(bad_sysctl)
        .await
        .expect_err("unknown sysctl");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("net.no.such.key"), "{err:?}");
    let mut bad_dns = sandbox_request("pod", false);
    bad_dns.dns = Some(api::DnsConfig {
        servers: vec!["not-an-ip".into()],
        ..api::DnsConfig::default()
    });
    let err = client
        .sandbox
        .create_sandbox(bad_dns)
        .await
        .expect_err("bad DNS server");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("not-an-ip"), "{err:?}");
    let mut bad_host = sandbox_request("pod", false);
    bad_host.hostname = "no spaces allowed".into();
    let err = client
        .sandbox
        .create_sandbox(bad_host)
        .await
        .expect_err("bad hostname");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .sandbox
        .destroy_sandbox(api::DestroySandboxRequest {})
        .await
        .expect_err("no sandbox yet");
    assert_eq!(err.code(), Code::NotFound);
    // After all that, a good request works.
    ok(
        &agent,
        client
            .sandbox
            .create_sandbox(sandbox_request("pod", false))
            .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_pid_namespace_and_destroy() {
    let agent = AgentUnderTest::start("podpid");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    ok(
        &agent,
        client
            .sandbox
            .create_sandbox(sandbox_request("pod", true))
            .await,
    );
    let mut pod_spec = spec(&rootfs, &["sleep", "1000"]);
    pod_spec["linux"]["namespaces"] = json!([
        {"type": "mount"}, {"type": "ipc", "path": "/x"}, {"type": "pid", "path": "/proc/1/ns/pid"}
    ]);
    let first = ok(&agent, client.create("a", &pod_spec, false).await);
    let second = ok(&agent, client.create("b", &pod_spec, false).await);
    ok(&agent, client.start("a").await);
    ok(&agent, client.start("b").await);
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).expect("ns link");
    assert_eq!(ns(first), ns(second), "both in the pod's PID namespace");
    assert_ne!(ns(first), ns(agent.pid()), "which is not the agent's");
    // Inside, each sees the other: the holder is 1, so the sleeps are 2 and 3.
    let ps = microvm_tests::agent::process(&[
        "sh",
        "-c",
        "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '",
    ]);
    ok(&agent, client.exec("a", "ps", &ps, false).await);
    let output = ok(&agent, client.collect("a", "ps").await);
    assert!(
        output.stdout_text().starts_with("1 2 3 "),
        "{}",
        output.stdout_text()
    );

    ok(
        &agent,
        client
            .sandbox
            .destroy_sandbox(api::DestroySandboxRequest {})
            .await,
    );
    let listed = ok(
        &agent,
        client
            .containers
            .list_containers(api::ListContainersRequest {})
            .await,
    )
    .into_inner();
    assert!(listed.containers.is_empty(), "{listed:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        agent.children(),
        Vec::<u32>::new(),
        "containers and the namespace holder are gone"
    );
    assert_eq!(
        microvm_tests::agent::child_cgroups(agent.cgroup.path()),
        Vec::<String>::new()
    );
    // Without the pod PID namespace, such a spec is refused by name.
    let err = client
        .create("c", &pod_spec, false)
        .await
        .expect_err("no pod PID namespace");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("share_pid_namespace"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_details_describe_the_machine() {
    let agent = AgentUnderTest::start("details");
    let mut client = agent.client().await;
    let details = ok(
        &agent,
        client
            .sandbox
            .get_guest_details(api::GetGuestDetailsRequest {})
            .await,
    )
    .into_inner();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(details.kernel_release, release.trim());
    assert!(details.memory_total_bytes > 64 * 1024 * 1024);
    assert!(details.memory_available_bytes <= details.memory_total_bytes);
    assert!(details.online_vcpus >= 1);
    assert_eq!(details.api_version, Some(api::ApiVersion::current()));
    assert!(!details.agent_build_version.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_off_answers_then_stops_containers_and_exits() {
    let mut agent = AgentUnderTest::start("poweroff");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let pid = ok(
        &agent,
        client
            .create("c1", &spec(&rootfs, &["sleep", "1000"]), false)
            .await,
    );
    ok(&agent, client.start("c1").await);
    ok(
        &agent,
        client.sandbox.power_off(api::PowerOffRequest {}).await,
    );
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("the agent exits");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the container is gone"
    );
    assert_eq!(
        microvm_tests::agent::child_cgroups(agent.cgroup.path()),
        Vec::<String>::new()
    );
}

/// Container sysctls (issue #15): namespaced ones are written in the
/// container's namespaces although its /proc/sys is read-only (runc's
/// readonlyPaths); the pod's namespaces get them when the spec shares them;
/// a sysctl that is not namespaced fails CreateContainer by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_sysctls_apply_despite_a_read_only_proc_sys() {
    let agent = AgentUnderTest::start("ctrsysctl");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let read = "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced; \
                echo 0 > /proc/sys/kernel/shm_rmid_forced 2>/dev/null && echo writable || echo read-only";
    // Own network and IPC namespaces: the values are the container's.
    let mut own = spec(&rootfs, &["sh", "-c", read]);
    own["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"}
    ]);
    own["linux"]["sysctl"] = json!({
        "net.ipv4.ip_unprivileged_port_start": "1000",
        "kernel.shm_rmid_forced": "1"
    });
    let output = ok(&agent, client.run("own", &own).await);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert_eq!(output.stdout_text(), "1000\n1\nread-only\n");

    // The pod's (the agent's) network namespace: containerd 2.x's default.
    let before = text(&agent.nsenter(
        &["net"],
        &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
    ));
    let mut shared = spec(&rootfs, &["sh", "-c", read]);
    shared["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "mount"},
        {"type": "network", "path": "/proc/1/ns/net"}
    ]);
    shared["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0"});
    let output = ok(&agent, client.run("shared", &shared).await);
    assert_eq!(output.code, 0, "{}", output.stderr_text());
    assert!(
        output.stdout_text().starts_with("0\n"),
        "{}",
        output.stdout_text()
    );
    assert_eq!(
        text(&agent.nsenter(
            &["net"],
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        )),
        "0",
        "the pod's namespace has it (it was {before})"
    );

    let mut global = spec(&rootfs, &["true"]);
    global["linux"]["sysctl"] = json!({"kernel.panic": "1", "vm.swappiness": "1"});
    let err = client
        .create("global", &global, false)
        .await
        .expect_err("a sysctl that is not namespaced");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("sysctls \"kernel.panic\", \"vm.swappiness\" are not namespaced"),
        "{err:?}"
    );
}
