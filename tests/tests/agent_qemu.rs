//! The agent as PID 1 of a real guest (QEMU+TCG, our guest kernel): vsock
//! serving, virtio-fs storage, cgroup v2 memory limits with an OOM event,
//! a pids limit, resource updates, and power off.
//!
//! The host has cgroup v1 with memory and pids bound to it, so these limits
//! can only be exercised in the guest. Needs vhost-device-vsock and
//! virtiofsd (`cargo install`); without them the test is reported ignored
//! with the reason, never passed.

use libtest_mimic::{Arguments, Failed, Trial};
use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{spec, AgentClient};
use microvm_tests::agent_qemu::{missing_tools, GuestAgent, GUEST_ROOTFS, VIRTIOFS_TAG};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

fn check<T>(guest: &GuestAgent, what: &str, result: Result<T, tonic::Status>) -> Result<T, Failed> {
    result.map_err(|status| format!("{what}: {status:?}\n{}", guest.diagnostics()).into())
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

async fn stats(
    client: &mut AgentClient,
    id: &str,
) -> Result<api::ContainerStatsResponse, tonic::Status> {
    Ok(client
        .containers
        .container_stats(api::ContainerStatsRequest {
            container_id: id.into(),
        })
        .await?
        .into_inner())
}

async fn guest_scenario(guest: &mut GuestAgent) -> Result<(), Failed> {
    let mut client = guest.client(Duration::from_secs(180)).await?;

    let details = check(
        guest,
        "details",
        client
            .sandbox
            .get_guest_details(api::GetGuestDetailsRequest {})
            .await,
    )?
    .into_inner();
    ensure(details.kernel_release.starts_with("6.1"), || {
        format!("guest kernel {details:?}")
    })?;
    println!(
        "guest: kernel {}, {} vCPU, {} MiB",
        details.kernel_release,
        details.online_vcpus,
        details.memory_total_bytes >> 20
    );

    // A rootfs shared by virtio-fs, mounted through the Storage API.
    let shared = "/run/shared-rootfs";
    check(
        guest,
        "mount virtio-fs",
        client
            .storage
            .mount_storage(api::MountStorageRequest {
                source: Some(api::mount_storage_request::Source::VirtioFsTag(
                    VIRTIOFS_TAG.into(),
                )),
                target: shared.into(),
                fstype: String::new(),
                options: Vec::new(),
            })
            .await,
    )?;
    let output = check(
        guest,
        "container on virtio-fs",
        client
            .run(
                "fs",
                &spec(Path::new(shared), &["cat", "/etc/shared-marker"]),
            )
            .await,
    )?;
    ensure(output.stdout_text() == "virtio-fs\n", || {
        format!("{:?} / {:?}", output.stdout_text(), output.stderr_text())
    })?;

    let mut events = check(
        guest,
        "subscribe",
        client
            .events
            .subscribe_events(api::SubscribeEventsRequest {})
            .await,
    )?
    .into_inner();

    // Memory limit: 16 MiB, and dd wants a 64 MiB buffer.
    let mut hungry = spec(
        Path::new(GUEST_ROOTFS),
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    hungry["linux"]["resources"] =
        json!({"memory": {"limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024}});
    check(
        guest,
        "create oom",
        client.create("oom", &hungry, false).await,
    )?;
    let limit = stats(&mut client, "oom")
        .await
        .ok()
        .and_then(|s| s.memory)
        .map(|m| m.limit_bytes);
    ensure(limit == Some(16 * 1024 * 1024), || {
        format!("memory.max: {limit:?}")
    })?;
    check(guest, "start oom", client.start("oom").await)?;
    let code = check(guest, "wait oom", client.wait("oom", "").await)?;
    ensure(code == 137, || {
        format!(
            "OOM-killed dd exits 137, got {code}\n{}",
            guest.diagnostics()
        )
    })?;
    let mut saw_oom = false;
    let mut saw_exit = false;
    while !(saw_oom && saw_exit) {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .map_err(|_| {
                format!("no OOM and exit events within 30 s (oom {saw_oom}, exit {saw_exit})")
            })?;
        let event = check(guest, "events", event)?.ok_or("event stream ended")?;
        match event.kind {
            Some(api::event::Kind::OomKilled(oom)) if oom.container_id == "oom" => {
                ensure(!saw_exit, || {
                    "the OOM event comes before the exit event".into()
                })?;
                ensure(oom.oom_kill_count >= 1, || format!("{oom:?}"))?;
                saw_oom = true;
            }
            Some(api::event::Kind::ProcessExited(exited)) if exited.container_id == "oom" => {
                ensure(exited.exit_code == 137, || format!("{exited:?}"))?;
                saw_exit = true;
            }
            _ => {}
        }
    }
    let memory = check(guest, "stats oom", stats(&mut client, "oom").await)?
        .memory
        .ok_or("no memory stats")?;
    ensure(memory.oom_kill_events >= 1, || format!("{memory:?}"))?;
    check(guest, "remove oom", client.remove("oom", false).await)?;

    // pids limit: 8 processes, the shell tries for 13.
    let mut forky = spec(
        Path::new(GUEST_ROOTFS),
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 60 & done; echo forked; sleep 60",
        ],
    );
    forky["linux"]["resources"] = json!({"pids": {"limit": 8}});
    check(
        guest,
        "create pids",
        client.create("pids", &forky, false).await,
    )?;
    check(guest, "start pids", client.start("pids").await)?;
    let mut reader = client.clone();
    let stderr_task = tokio::spawn(async move { reader.read_output("pids", "", true).await });
    let mut pids = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pids = check(
            guest,
            "list pids",
            client
                .containers
                .list_pids(api::ListPidsRequest {
                    container_id: "pids".into(),
                })
                .await,
        )?
        .into_inner()
        .pids;
        if pids.len() == 8 {
            break;
        }
    }
    ensure(pids.len() == 8, || {
        format!("pids.max 8 holds the container at 8 processes: {pids:?}")
    })?;
    let pid_stats = check(guest, "stats pids", stats(&mut client, "pids").await)?
        .pids
        .ok_or("no pids stats")?;
    ensure(pid_stats.limit == 8 && pid_stats.current == 8, || {
        format!("{pid_stats:?}")
    })?;

    // Update: a new memory limit shows in the stats.
    let resources =
        serde_json::to_vec(&json!({"memory": {"limit": 48 * 1024 * 1024}, "pids": {"limit": 32}}))?;
    check(
        guest,
        "update",
        client
            .containers
            .update_container(api::UpdateContainerRequest {
                container_id: "pids".into(),
                oci_resources_json: resources.into(),
            })
            .await,
    )?;
    let updated = check(
        guest,
        "stats after update",
        stats(&mut client, "pids").await,
    )?;
    ensure(
        updated.memory.as_ref().map(|m| m.limit_bytes) == Some(48 * 1024 * 1024)
            && updated.pids.as_ref().map(|p| p.limit) == Some(32),
        || format!("{updated:?}"),
    )?;
    check(guest, "remove pids", client.remove("pids", true).await)?;
    let stderr = stderr_task.await.map_err(|err| err.to_string())?;
    let stderr = String::from_utf8_lossy(&check(guest, "pids stderr", stderr)?).into_owned();
    ensure(stderr.contains("fork"), || {
        format!("the shell could not fork past the limit: {stderr:?}")
    })?;

    // Power off: the answer comes back, then QEMU exits by itself.
    check(
        guest,
        "power off",
        client.sandbox.power_off(api::PowerOffRequest {}).await,
    )?;
    drop(client);
    let status = guest.wait_exit(Duration::from_secs(60));
    ensure(status.is_some(), || {
        format!("QEMU did not exit after PowerOff\n{}", guest.diagnostics())
    })?;
    let console = guest.console_text();
    ensure(!console.contains("Kernel panic"), || console.clone())?;
    ensure(console.contains("reboot: Restarting system"), || {
        console.clone()
    })?;
    Ok(())
}

fn agent_in_guest() -> Result<(), Failed> {
    let mut guest = GuestAgent::boot("guest-agent")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let result = runtime.block_on(guest_scenario(&mut guest));
    println!("guest scenario took {:?}", started.elapsed());
    result
}

fn main() {
    let args = Arguments::from_args();
    let missing = missing_tools();
    if let Some(reason) = &missing {
        println!("agent_qemu: ignored on this host: {reason}");
    }
    let trial = Trial::test(
        "agent_as_pid1_in_a_guest_with_cgroup_v2_limits",
        agent_in_guest,
    )
    .with_ignored_flag(missing.is_some());
    libtest_mimic::run(&args, vec![trial]).exit();
}
