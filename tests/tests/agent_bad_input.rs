//! Bad input gets the right gRPC code and a message naming the object, and
//! the agent goes on serving after each.

use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{
    process, process_ref, rootfs, spec, unix_channel, AgentClient, AgentUnderTest,
};
use serde_json::json;
use std::time::{Duration, Instant};
use tonic::Code;

fn ok<T>(agent: &AgentUnderTest, result: Result<T, tonic::Status>) -> T {
    result.unwrap_or_else(|status| panic!("{status:?}\nagent log:\n{}", agent.log_text()))
}

/// The error's code is `code` and its message mentions every `words`.
fn expect_error<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, words: &[&str]) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    for word in words {
        assert!(
            status.message().contains(word),
            "message {:?} should mention {word:?}",
            status.message()
        );
    }
}

/// The agent still answers, and still runs containers.
async fn still_serving(agent: &AgentUnderTest, client: &mut AgentClient) {
    let check = client
        .health
        .check(api::CheckRequest {
            client_version: Some(api::ApiVersion::current()),
        })
        .await;
    ok(agent, check);
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_and_ids_are_refused() {
    let agent = AgentUnderTest::start("badspec");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;

    // Not JSON at all.
    let garbage = client
        .containers
        .create_container(api::CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: b"{ not json".to_vec().into(),
            bundle_path: String::new(),
            stdin: false,
        })
        .await;
    expect_error(garbage, Code::InvalidArgument, &["c1", "spec"]);
    still_serving(&agent, &mut client).await;

    // Valid JSON, unsupported or invalid content.
    let mut user_ns = spec(&rootfs, &["true"]);
    user_ns["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "user"}]);
    expect_error(
        client.create("c1", &user_ns, false).await,
        Code::InvalidArgument,
        &["c1", "user namespaces"],
    );
    let mut no_args = spec(&rootfs, &["true"]);
    no_args["process"]["args"] = json!([]);
    expect_error(
        client.create("c1", &no_args, false).await,
        Code::InvalidArgument,
        &["c1", "process.args"],
    );
    let mut relative_mount = spec(&rootfs, &["true"]);
    relative_mount["mounts"] =
        json!([{"destination": "relative", "type": "tmpfs", "source": "tmpfs"}]);
    expect_error(
        client.create("c1", &relative_mount, false).await,
        Code::InvalidArgument,
        &["mounts[0]"],
    );
    let mut bad_seccomp = spec(&rootfs, &["true"]);
    bad_seccomp["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    expect_error(
        client.create("c1", &bad_seccomp, false).await,
        Code::InvalidArgument,
        &["SCMP_ACT_NOTIFY"],
    );

    // Missing rootfs and missing executable.
    let missing = spec(&agent.dir.join("no-such-rootfs"), &["true"]);
    expect_error(
        client.create("c1", &missing, false).await,
        Code::NotFound,
        &["c1", "no-such-rootfs"],
    );
    expect_error(
        client
            .create("c1", &spec(&rootfs, &["no-such-program"]), false)
            .await,
        Code::NotFound,
        &["c1", "no-such-program"],
    );
    // A bad id.
    expect_error(
        client
            .create("../x", &spec(&rootfs, &["true"]), false)
            .await,
        Code::InvalidArgument,
        &["../x"],
    );

    // Nothing was left behind by the failures, and the id is free.
    assert_eq!(agent.children(), Vec::<u32>::new());
    assert_eq!(
        microvm_tests::agent::child_cgroups(agent.cgroup.path()),
        Vec::<String>::new()
    );
    let output = ok(
        &agent,
        client.run("c1", &spec(&rootfs, &["echo", "fine"])).await,
    );
    assert_eq!(output.stdout_text(), "fine\n");
    still_serving(&agent, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_unknown_ids_and_wrong_states() {
    let agent = AgentUnderTest::start("states");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;

    ok(
        &agent,
        client
            .create("c1", &spec(&rootfs, &["sleep", "1000"]), false)
            .await,
    );
    expect_error(
        client.create("c1", &spec(&rootfs, &["true"]), false).await,
        Code::AlreadyExists,
        &["c1"],
    );
    // Exec before start, into a created container.
    expect_error(
        client.exec("c1", "e1", &process(&["true"]), false).await,
        Code::FailedPrecondition,
        &["c1", "created"],
    );
    ok(&agent, client.start("c1").await);
    expect_error(
        client.start("c1").await,
        Code::FailedPrecondition,
        &["c1", "running"],
    );
    expect_error(
        client.remove("c1", false).await,
        Code::FailedPrecondition,
        &["c1", "running"],
    );

    ok(
        &agent,
        client.exec("c1", "e1", &process(&["true"]), false).await,
    );
    expect_error(
        client.exec("c1", "e1", &process(&["true"]), false).await,
        Code::AlreadyExists,
        &["e1", "c1"],
    );
    assert_eq!(ok(&agent, client.wait("c1", "e1").await), 0);
    // A signal to an exited process.
    expect_error(
        client.signal("c1", "e1", libc::SIGTERM).await,
        Code::FailedPrecondition,
        &["e1", "c1", "exited"],
    );
    // Bad signal numbers.
    expect_error(
        client.signal("c1", "", 0).await,
        Code::InvalidArgument,
        &["0"],
    );
    expect_error(
        client.signal("c1", "", 999).await,
        Code::InvalidArgument,
        &["999"],
    );
    // No terminal, no stdin.
    expect_error(
        client
            .processes
            .resize_tty(api::ResizeTtyRequest {
                process: process_ref("c1", ""),
                width: 80,
                height: 24,
            })
            .await,
        Code::FailedPrecondition,
        &["c1", "terminal"],
    );
    expect_error(
        client
            .processes
            .close_stdin(api::CloseStdinRequest {
                process: process_ref("c1", ""),
            })
            .await,
        Code::FailedPrecondition,
        &["c1", "stdin"],
    );

    // Exec in a stopped container.
    ok(&agent, client.signal("c1", "", libc::SIGKILL).await);
    assert_eq!(ok(&agent, client.wait("c1", "").await), 137);
    expect_error(
        client.exec("c1", "e2", &process(&["true"]), false).await,
        Code::FailedPrecondition,
        &["c1", "stopped"],
    );
    expect_error(
        client.signal("c1", "", libc::SIGTERM).await,
        Code::FailedPrecondition,
        &["c1", "exited"],
    );
    ok(&agent, client.remove("c1", false).await);

    // Unknown ids everywhere.
    expect_error(client.start("nope").await, Code::NotFound, &["nope"]);
    expect_error(client.remove("nope", true).await, Code::NotFound, &["nope"]);
    expect_error(client.wait("nope", "").await, Code::NotFound, &["nope"]);
    expect_error(
        client.signal("nope", "", 15).await,
        Code::NotFound,
        &["nope"],
    );
    expect_error(client.wait("c1", "").await, Code::NotFound, &["c1"]);
    expect_error(
        client
            .containers
            .container_stats(api::ContainerStatsRequest {
                container_id: "nope".into(),
            })
            .await,
        Code::NotFound,
        &["nope"],
    );
    expect_error(
        client
            .containers
            .list_pids(api::ListPidsRequest {
                container_id: "nope".into(),
            })
            .await,
        Code::NotFound,
        &["nope"],
    );
    expect_error(
        client.read_output("nope", "", false).await,
        Code::NotFound,
        &["nope"],
    );
    ok(
        &agent,
        client
            .create("c2", &spec(&rootfs, &["sleep", "1000"]), false)
            .await,
    );
    ok(&agent, client.start("c2").await);
    expect_error(
        client.wait("c2", "ghost").await,
        Code::NotFound,
        &["ghost", "c2"],
    );
    ok(&agent, client.remove("c2", true).await);
    still_serving(&agent, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_leaves_the_rest_for_the_next() {
    let agent = AgentUnderTest::start("disconnect");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    ok(
        &agent,
        client
            .create("c1", &spec(&rootfs, &["yes", "0123456789"]), false)
            .await,
    );
    ok(&agent, client.start("c1").await);
    {
        // A separate connection that reads a little and goes away.
        let mut quitter = AgentClient::connect(&agent.socket)
            .await
            .expect("second connection");
        let mut stream = ok(
            &agent,
            quitter
                .processes
                .read_output(api::ReadOutputRequest {
                    process: process_ref("c1", ""),
                    stream: api::OutputStream::Stdout as i32,
                })
                .await,
        )
        .into_inner();
        let chunk = ok(&agent, stream.message().await).expect("some output");
        assert!(chunk.data.starts_with(b"0123456789\n"));
        // While it holds the stream, a second reader is refused.
        expect_error(
            client
                .processes
                .read_output(api::ReadOutputRequest {
                    process: process_ref("c1", ""),
                    stream: api::OutputStream::Stdout as i32,
                })
                .await
                .map(|_| ()),
            Code::FailedPrecondition,
            &["stdout", "already being read"],
        );
    }
    // The connection is gone; the next reader gets the stream.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stream = loop {
        match client
            .processes
            .read_output(api::ReadOutputRequest {
                process: process_ref("c1", ""),
                stream: api::OutputStream::Stdout as i32,
            })
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(status)
                if status.code() == Code::FailedPrecondition && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let chunk = ok(&agent, stream.message().await).expect("output goes on");
    assert!(!chunk.data.is_empty());
    drop(stream);

    // A stdin writer that goes away mid-stream, and a waiter that does.
    let mut waiter = AgentClient::connect(&agent.socket)
        .await
        .expect("third connection");
    let pending = tokio::spawn(async move { waiter.wait("c1", "").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    pending.abort();
    ok(&agent, client.remove("c1", true).await);
    still_serving(&agent, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabytes_on_stdin() {
    let agent = AgentUnderTest::start("bigstdin");
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    const SIZE: usize = 100 * 1024 * 1024;

    // All of it through to a reader.
    ok(
        &agent,
        client
            .create("wc", &spec(&rootfs, &["wc", "-c"]), true)
            .await,
    );
    ok(&agent, client.start("wc").await);
    let mut reader = client.clone();
    let output = tokio::spawn(async move { reader.collect("wc", "").await });
    let written = ok(
        &agent,
        client.write_stdin("wc", "", vec![b'z'; SIZE], true).await,
    );
    assert_eq!(written, SIZE as u64);
    let output = ok(&agent, output.await.expect("collect task"));
    assert_eq!(output.stdout_text().trim(), SIZE.to_string());
    assert_eq!(output.code, 0);

    // To a process that never reads: the writer waits (the agent buffers
    // nothing), other calls are served, and killing the process ends the
    // write with FAILED_PRECONDITION.
    ok(
        &agent,
        client
            .create("idle", &spec(&rootfs, &["sleep", "1000"]), true)
            .await,
    );
    ok(&agent, client.start("idle").await);
    let mut writer = AgentClient::connect(&agent.socket)
        .await
        .expect("writer connection");
    let write = tokio::spawn(async move {
        writer
            .write_stdin("idle", "", vec![b'z'; SIZE], false)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the write waits for a reader");
    let started = Instant::now();
    still_serving(&agent, &mut client).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let rss = agent.rss_kib().unwrap_or(0);
    assert!(
        rss < 64 * 1024,
        "the agent does not buffer stdin: RSS {rss} KiB"
    );
    ok(&agent, client.signal("idle", "", libc::SIGKILL).await);
    let result = tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("the write ends when the process dies")
        .expect("writer task");
    expect_error(result, Code::FailedPrecondition, &["idle", "stdin"]);
    ok(&agent, client.remove("idle", false).await);
    ok(&agent, client.remove("wc", false).await);
    still_serving(&agent, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_or_missing_api_versions_are_refused() {
    let agent = AgentUnderTest::start("version");
    let channel = unix_channel(&agent.socket).await.expect("connect");

    // No version metadata at all.
    let mut bare = api::health_client::HealthClient::new(channel.clone());
    let err = bare
        .check(api::CheckRequest {
            client_version: None,
        })
        .await
        .expect_err("refused without a version");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("microvm-agent-api-version"),
        "{err:?}"
    );

    // Another major in the metadata.
    let mut future = api::containers_client::ContainersClient::with_interceptor(
        channel.clone(),
        |mut request: tonic::Request<()>| {
            request.metadata_mut().insert(
                microvm_proto::API_VERSION_METADATA_KEY,
                "2.0".parse().expect("ascii"),
            );
            Ok(request)
        },
    );
    let err = future
        .list_containers(api::ListContainersRequest {})
        .await
        .expect_err("refused with major 2");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("2.0") && err.message().contains("incompatible"),
        "{err:?}"
    );

    // Check with an incompatible body version.
    let mut client = agent.client().await;
    let err = client
        .health
        .check(api::CheckRequest {
            client_version: Some(api::ApiVersion { major: 9, minor: 0 }),
        })
        .await
        .expect_err("refused with major 9 in the body");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A compatible client (same major, newer minor) is served.
    let response = ok(
        &agent,
        client
            .health
            .check(api::CheckRequest {
                client_version: Some(api::ApiVersion {
                    major: 1,
                    minor: 42,
                }),
            })
            .await,
    )
    .into_inner();
    assert_eq!(response.agent_version, Some(api::ApiVersion::current()));
    assert!(response.guest_uptime_seconds > 0.0);
}
