//! The sandbox on a fake pod ([`super::fake`]): state transitions, error
//! codes, event order, a failing or stalled agent, exec on a stopped
//! container, the VM's death, shutdown. Timed cases run on tokio's paused
//! clock, so a 10 s bound takes no real time.

use super::fake::{Behaviour, FakeBooter, FakePod};
use super::*;
use crate::events::TaskEvent;
use containerd_shim::protos::ttrpc::{self, Code};
use microvm_proto::agent::v1 as api;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

const POD: &str = "pod1";

struct Harness {
    sandbox: Sandbox,
    pod: Arc<FakePod>,
    booter: Arc<FakeBooter>,
    events: UnboundedReceiver<TaskEvent>,
}

fn harness() -> Harness {
    let pod = FakePod::new(POD);
    let booter = FakeBooter::new(pod.clone());
    let (queue, events) = EventQueue::new();
    let sandbox = Sandbox::new(queue, Box::new(booter.clone()));
    Harness {
        sandbox,
        pod,
        booter,
        events,
    }
}

fn task(id: &str) -> NewTask {
    NewTask {
        id: id.to_owned(),
        bundle: format!("/bundles/{id}"),
        spec: oci_spec::runtime::Spec::default(),
        config: Config::default(),
        pod_id: POD.to_owned(),
        settings: PodSettings::default(),
        rootfs: Vec::new(),
        stdio: StdioPaths::default(),
    }
}

fn topics(events: &mut UnboundedReceiver<TaskEvent>) -> Vec<&'static str> {
    let mut topics = Vec::new();
    while let Ok(event) = events.try_recv() {
        topics.push(event.topic());
    }
    topics
}

fn exit_statuses(events: &mut UnboundedReceiver<TaskEvent>) -> Vec<(String, u32)> {
    let mut exits = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let TaskEvent::Exit {
            id, exit_status, ..
        } = event
        {
            exits.push((id, exit_status));
        }
    }
    exits.sort();
    exits
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, ShimError>, code: Code) -> ShimError {
    let err = result.expect_err("an error");
    assert_eq!(err.code(), code, "{err}");
    err
}

async fn exited(sandbox: &Sandbox, id: &str, exec_id: &str) -> u32 {
    let status = tokio::time::timeout(Duration::from_secs(30), sandbox.wait(id, exec_id))
        .await
        .expect("the exit is reported")
        .unwrap();
    status.exit().expect("an exit status").code
}

#[tokio::test(start_paused = true)]
async fn a_container_goes_created_running_stopped_deleted_with_its_events_in_order() {
    let Harness {
        sandbox,
        pod,
        booter,
        mut events,
    } = harness();
    let pid = sandbox.create(task("c1")).await.unwrap();
    assert_eq!(pid, 101);
    assert_eq!(sandbox.state("c1", "").unwrap().status, Status::Created);
    assert_eq!(sandbox.init_pid("c1"), Some(101));

    assert_eq!(sandbox.start("c1", "").await.unwrap(), 101);
    assert_eq!(sandbox.state("c1", "").unwrap().status, Status::Running);
    // A running task cannot be deleted.
    assert_code(sandbox.delete("c1", "").await, Code::FAILED_PRECONDITION);

    pod.exit("c1", "", 3);
    assert_eq!(exited(&sandbox, "c1", "").await, 3);
    let state = sandbox.state("c1", "").unwrap();
    assert_eq!(state.status.name(), "stopped");
    assert_eq!(state.bundle, "/bundles/c1");

    let deleted = sandbox.delete("c1", "").await.unwrap();
    assert_eq!((deleted.pid, deleted.exit.map(|e| e.code)), (101, Some(3)));
    assert_code(sandbox.state("c1", ""), Code::NOT_FOUND);
    assert_eq!(
        topics(&mut events),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let calls = pod.calls();
    for call in [
        "create_container c1",
        "start_container c1",
        "wait_process c1/",
        "remove_container c1",
    ] {
        assert!(calls.iter().any(|c| c == call), "{call} in {calls:?}");
    }
    assert_eq!(pod.removed_dirs(), ["c1"]);

    // A second container joins the same pod: no second boot.
    sandbox.create(task("c2")).await.unwrap();
    assert_eq!(*booter.boots.lock().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_delete_whose_host_teardown_fails_keeps_the_container_for_a_retry() {
    let Harness {
        sandbox,
        pod,
        mut events,
        ..
    } = harness();
    sandbox.create(task("c1")).await.unwrap();
    sandbox.start("c1", "").await.unwrap();
    pod.exit("c1", "", 0);
    assert_eq!(exited(&sandbox, "c1", "").await, 0);
    topics(&mut events);

    pod.fail_remove();
    let err = assert_code(sandbox.delete("c1", "").await, Code::INTERNAL);
    assert!(
        crate::pod::error_chain(&err).contains("mount(s) left"),
        "{}",
        crate::pod::error_chain(&err)
    );
    // Not deleted: still known, still stopped, no delete event yet.
    assert_eq!(sandbox.state("c1", "").unwrap().status.name(), "stopped");
    assert!(topics(&mut events).is_empty());
    assert!(pod.removed_dirs().is_empty());

    // containerd's retry redoes the clean-up and deletes.
    let deleted = sandbox.delete("c1", "").await.unwrap();
    assert_eq!(deleted.exit.map(|e| e.code), Some(0));
    assert_eq!(pod.removed_dirs(), ["c1"]);
    assert_eq!(topics(&mut events), ["/tasks/delete"]);
    assert_code(sandbox.state("c1", ""), Code::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn errors_carry_their_cause_in_the_code() {
    let Harness { sandbox, pod, .. } = harness();
    assert_code(sandbox.state("nope", ""), Code::NOT_FOUND);
    assert_code(sandbox.kill("nope", "", 9, false).await, Code::NOT_FOUND);
    assert_code(sandbox.pids("nope").await, Code::NOT_FOUND);

    sandbox.create(task("c1")).await.unwrap();
    assert_code(sandbox.create(task("c1")).await, Code::ALREADY_EXISTS);
    assert_code(sandbox.state("c1", "e9"), Code::NOT_FOUND);
    let mut other = task("c2");
    other.pod_id = "pod2".into();
    let err = assert_code(sandbox.create(other).await, Code::INVALID_ARGUMENT);
    assert_eq!(err.to_string(), "this shim serves pod pod1, not pod2");

    sandbox.start("c1", "").await.unwrap();
    let err = assert_code(sandbox.start("c1", "").await, Code::FAILED_PRECONDITION);
    assert_eq!(err.to_string(), "cannot start a process that is running");
    assert_code(
        sandbox.exec("c1", "e1", StdioPaths::default(), Vec::new()),
        Code::INVALID_ARGUMENT,
    );

    // A signal kills (the fake exits 128 + signal); a second one finds
    // nothing to signal, as containerd's own shims say.
    sandbox.kill("c1", "", 9, false).await.unwrap();
    assert_eq!(exited(&sandbox, "c1", "").await, 137);
    assert_code(sandbox.kill("c1", "", 9, false).await, Code::NOT_FOUND);
    assert_code(
        sandbox.update("c1", Vec::new()).await,
        Code::FAILED_PRECONDITION,
    );

    // The tenant's rootfs is wrong: its dir is cleaned up.
    pod.fail_prepare();
    assert_code(sandbox.create(task("c3")).await, Code::INVALID_ARGUMENT);
    assert_eq!(pod.removed_dirs(), ["c3"]);
    assert_code(sandbox.state("c3", ""), Code::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn a_failing_agent_keeps_its_code_and_leaves_nothing_behind() {
    let Harness {
        sandbox,
        pod,
        mut events,
        ..
    } = harness();
    pod.set(
        "create_container",
        Behaviour::Fail(tonic::Status::resource_exhausted("no memory")),
    );
    let err = assert_code(sandbox.create(task("c1")).await, Code::RESOURCE_EXHAUSTED);
    let ttrpc::Error::RpcStatus(status) = ttrpc::Error::from(err) else {
        panic!("not a status");
    };
    assert_eq!(status.message(), "agent CreateContainer: no memory");
    assert_eq!(pod.removed_dirs(), ["c1"]);
    assert_code(sandbox.state("c1", ""), Code::NOT_FOUND);
    assert!(topics(&mut events).is_empty());

    pod.clear("create_container");
    sandbox.create(task("c1")).await.unwrap();
    pod.set(
        "start_container",
        Behaviour::Fail(tonic::Status::not_found("no such container")),
    );
    assert_code(sandbox.start("c1", "").await, Code::NOT_FOUND);
    assert_eq!(sandbox.state("c1", "").unwrap().status, Status::Created);
    assert_eq!(topics(&mut events), ["/tasks/create"]);
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_does_not_boot_fails_the_create_and_the_next_create_boots_again() {
    let Harness {
        sandbox,
        booter,
        mut events,
        ..
    } = harness();
    booter.fail.lock().unwrap().insert(POD.into());
    let err = assert_code(sandbox.create(task("c1")).await, Code::INVALID_ARGUMENT);
    assert_eq!(
        error_chain(&err),
        "the agent refused the sandbox: bad sysctl net.ipv4.foo (InvalidArgument)"
    );
    // No pod: calls on a container that somehow exists say so.
    sandbox.insert_container(Container::new(
        "ghost",
        "/b",
        Arc::new(Process::new("ghost", "", StdioPaths::default())),
    ));
    assert_code(sandbox.pids("ghost").await, Code::FAILED_PRECONDITION);

    booter.fail.lock().unwrap().clear();
    sandbox.create(task("c1")).await.unwrap();
    assert_eq!(*booter.boots.lock().unwrap(), 2);
    assert_eq!(topics(&mut events), ["/tasks/create"]);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_agent_bounds_kill_and_delete() {
    let Harness { sandbox, pod, .. } = harness();
    sandbox.create(task("c1")).await.unwrap();
    sandbox.start("c1", "").await.unwrap();

    pod.set("signal_process", Behaviour::Stall);
    let since = Instant::now();
    let err = assert_code(
        sandbox.kill("c1", "", 15, false).await,
        Code::DEADLINE_EXCEEDED,
    );
    assert!(since.elapsed() >= AGENT_CLEANUP_TIMEOUT);
    assert_eq!(
        err.to_string(),
        "agent SignalProcess did not answer within 10s"
    );

    pod.exit("c1", "", 0);
    assert_eq!(exited(&sandbox, "c1", "").await, 0);
    pod.set("remove_container", Behaviour::Stall);
    let since = Instant::now();
    sandbox.delete("c1", "").await.unwrap();
    let took = since.elapsed();
    assert!(
        (AGENT_CLEANUP_TIMEOUT..AGENT_CLEANUP_TIMEOUT * 2).contains(&took),
        "{took:?}"
    );
    assert_eq!(pod.removed_dirs(), ["c1"]);
    assert_code(sandbox.state("c1", ""), Code::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn exec_needs_a_running_container() {
    let Harness {
        sandbox,
        pod,
        mut events,
        ..
    } = harness();
    sandbox.create(task("c1")).await.unwrap();
    let err = assert_code(
        sandbox.exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()),
        Code::FAILED_PRECONDITION,
    );
    assert_eq!(
        err.to_string(),
        "cannot exec in container c1: it is created"
    );

    sandbox.start("c1", "").await.unwrap();
    sandbox
        .exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())
        .unwrap();
    assert_code(
        sandbox.exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()),
        Code::ALREADY_EXISTS,
    );
    assert_eq!(sandbox.state("c1", "e1").unwrap().status, Status::Created);
    let pid = sandbox.start("c1", "e1").await.unwrap();
    assert_eq!(sandbox.state("c1", "e1").unwrap().pid, pid);
    pod.exit("c1", "e1", 0);
    assert_eq!(exited(&sandbox, "c1", "e1").await, 0);
    let deleted = sandbox.delete("c1", "e1").await.unwrap();
    assert_eq!(deleted.exit.map(|e| e.code), Some(0));
    assert_code(sandbox.state("c1", "e1"), Code::NOT_FOUND);

    pod.exit("c1", "", 1);
    assert_eq!(exited(&sandbox, "c1", "").await, 1);
    let err = assert_code(
        sandbox.exec("c1", "e2", StdioPaths::default(), b"{}".to_vec()),
        Code::FAILED_PRECONDITION,
    );
    assert_eq!(
        err.to_string(),
        "cannot exec in container c1: it is stopped"
    );
    // An exec's delete has no TaskDelete; only the container's would.
    assert_eq!(
        topics(&mut events),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_vm_ends_every_process_and_later_calls_fail_fast() {
    let Harness {
        sandbox,
        pod,
        mut events,
        ..
    } = harness();
    sandbox.create(task("c1")).await.unwrap();
    sandbox.start("c1", "").await.unwrap();
    sandbox
        .exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())
        .unwrap();
    sandbox.start("c1", "e1").await.unwrap();
    sandbox.create(task("c2")).await.unwrap();
    topics(&mut events);

    // A call that reached this agent would hang.
    pod.set("list_pids", Behaviour::Stall);
    pod.set("remove_container", Behaviour::Stall);
    let in_flight = tokio::spawn({
        let sandbox = sandbox.clone();
        async move { sandbox.pids("c1").await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!in_flight.is_finished());
    let since = Instant::now();
    pod.kill_vm();
    // The call in flight ends with the VM, not at some deadline.
    let ended = tokio::time::timeout(Duration::from_secs(60), in_flight)
        .await
        .expect("the call in flight ends with the VM");
    assert_code(ended.unwrap(), Code::UNAVAILABLE);
    assert_eq!(since.elapsed(), Duration::ZERO);
    for (id, exec_id) in [("c1", ""), ("c1", "e1"), ("c2", "")] {
        assert_eq!(exited(&sandbox, id, exec_id).await, VM_DIED_EXIT_STATUS);
    }
    assert_eq!(
        exit_statuses(&mut events),
        [
            ("c1".to_owned(), VM_DIED_EXIT_STATUS),
            ("c2".to_owned(), VM_DIED_EXIT_STATUS),
            ("e1".to_owned(), VM_DIED_EXIT_STATUS)
        ]
    );

    let since = Instant::now();
    let err = assert_code(sandbox.pids("c1").await, Code::UNAVAILABLE);
    assert!(
        err.to_string()
            .starts_with("agent ListPids: the pod VM is dead"),
        "{err}"
    );
    // Delete does not wait for the dead agent's clean-up bound either.
    sandbox.delete("c1", "").await.unwrap();
    assert_eq!(since.elapsed(), Duration::ZERO);
    let calls = pod.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("list_pids")).count(),
        1,
        "only the call in flight reached the agent: {calls:?}"
    );

    assert!(!sandbox.shutdown().await, "c2 is left");
    sandbox.delete("c2", "").await.unwrap();
    assert!(sandbox.shutdown().await);
    // A dead VM's agent is not asked to power off.
    assert_eq!(pod.shutdowns(), [false]);
}

#[tokio::test(start_paused = true)]
async fn concurrent_shutdowns_wait_for_the_one_teardown() {
    let Harness { sandbox, pod, .. } = harness();
    sandbox.create(task("c1")).await.unwrap();
    sandbox.delete("c1", "").await.unwrap();
    pod.hold_shutdown();
    let first = tokio::spawn({
        let sandbox = sandbox.clone();
        async move { sandbox.shutdown().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = tokio::spawn({
        let sandbox = sandbox.clone();
        async move { sandbox.shutdown().await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The second must not report "done" (the shim would exit) mid-teardown.
    assert!(!first.is_finished());
    assert!(!second.is_finished());
    pod.open_shutdown();
    assert!(first.await.unwrap());
    assert!(second.await.unwrap());
    assert_eq!(pod.shutdowns(), [true]);
}

/// ttrpc drops a handler at its caller's deadline; the teardown it
/// started must still finish, or the pod's state and the shim are left.
#[tokio::test(start_paused = true)]
async fn a_shutdown_or_delete_whose_caller_gives_up_still_finishes() {
    let Harness { sandbox, pod, .. } = harness();
    sandbox.create(task("c1")).await.unwrap();
    pod.set("remove_container", Behaviour::Stall);
    let gave_up = tokio::time::timeout(Duration::from_millis(100), sandbox.delete("c1", "")).await;
    assert!(gave_up.is_err(), "the stalled delete answered");
    // The delete goes on past its caller: bounded by the clean-up timeout.
    tokio::time::sleep(AGENT_CLEANUP_TIMEOUT + Duration::from_secs(1)).await;
    assert!(sandbox.container("c1").is_err(), "c1 is still known");
    assert_eq!(pod.removed_dirs(), ["c1"]);

    pod.hold_shutdown();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), sandbox.shutdown()).await;
    assert!(gave_up.is_err(), "the held shutdown answered");
    pod.open_shutdown();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pod.shutdowns(), [true], "the teardown was cut off");
}

#[tokio::test(start_paused = true)]
async fn oom_kills_of_this_pod_only_are_forwarded() {
    let Harness {
        sandbox,
        pod,
        mut events,
        ..
    } = harness();
    sandbox.create(task("c1")).await.unwrap();
    topics(&mut events);
    for id in ["stranger", "c1"] {
        pod.send_event(api::event::Kind::OomKilled(api::OomKilled {
            container_id: id.to_owned(),
            oom_kill_count: 1,
        }));
    }
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an OOM event")
        .unwrap();
    assert_eq!(
        event,
        TaskEvent::Oom {
            container_id: "c1".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn pass_through_calls_reach_the_agent() {
    let Harness { sandbox, pod, .. } = harness();
    sandbox.create(task("c1")).await.unwrap();
    sandbox.start("c1", "").await.unwrap();
    assert_eq!(sandbox.pids("c1").await.unwrap(), [101, 102]);
    let metrics = sandbox.stats("c1").await.unwrap();
    assert_eq!((metrics.pids.current, metrics.pids.limit), (2, 10));
    sandbox.update("c1", b"{}".to_vec()).await.unwrap();
    sandbox.resize_pty("c1", "", 80, 24).await.unwrap();
    sandbox.close_io("c1", "", false).await.unwrap();
    assert!(!pod.calls().iter().any(|c| c.starts_with("close_stdin")));
    sandbox.close_io("c1", "", true).await.unwrap();
    let calls = pod.calls();
    for call in [
        "update_container c1",
        "resize_tty c1/",
        "close_stdin c1/",
        "container_stats c1",
    ] {
        assert!(calls.iter().any(|c| c == call), "{call} in {calls:?}");
    }
}
