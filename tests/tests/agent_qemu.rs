//! The agent as PID 1 of a real guest (QEMU+TCG, our guest kernel): vsock
//! serving, containers on the initramfs and on virtio-fs storage, the spec's
//! masked paths and seccomp profile on the guest kernel, cgroup v2 memory
//! limits with an OOM event, a pids limit, resource updates, and power off.
//!
//! The host has cgroup v1 with memory and pids bound to it, so these limits
//! can only be exercised in the guest. Needs vhost-device-vsock and
//! virtiofsd (`cargo install`); without them the test is reported ignored
//! with the reason, never passed.

use libtest_mimic::{Arguments, Failed, Trial};
use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{process, spec, AgentClient};
use microvm_tests::agent_qemu::{missing_tools, GuestAgent, GUEST_ROOTFS, VIRTIOFS_TAG};
use serde_json::json;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// TCG is slow, but no call takes a minute.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Awaits `call`, turning an error or a timeout into a failure that carries
/// the guest's console and the helpers' logs.
async fn call<T>(
    guest: &GuestAgent,
    what: &str,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, Failed> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(status)) => Err(format!("{what}: {status:?}\n{}", guest.diagnostics()).into()),
        Err(_) => Err(format!(
            "{what}: no answer within {CALL_TIMEOUT:?}\n{}",
            guest.diagnostics()
        )
        .into()),
    }
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
    let details = call(
        guest,
        "details",
        client
            .sandbox
            .get_guest_details(api::GetGuestDetailsRequest {}),
    )
    .await?
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

    // A container on the rootfs inside the initramfs.
    let echo = spec(Path::new(GUEST_ROOTFS), &["echo", "hello from the guest"]);
    let output = call(
        guest,
        "container on the initramfs rootfs",
        client.run("echo", &echo),
    )
    .await?;
    ensure(output.stdout_text() == "hello from the guest\n", || {
        format!(
            "{:?} / {:?}\n{}",
            output.stdout_text(),
            output.stderr_text(),
            guest.diagnostics()
        )
    })?;

    // The guest kernel has /proc/kcore (the host's has none): a container
    // whose spec masks it sees /dev/null there; one whose spec does not sees
    // the kernel's core file. The spec's seccomp profile denies mkdir.
    // /dev/shm is a writable tmpfs: only seccomp can make mkdir fail (EPERM).
    let probe =
        "stat -c %F /proc/kcore; wc -c < /proc/kcore; mkdir /dev/shm/d 2>&1 || echo mkdir-denied";
    let mut masked = spec(Path::new(GUEST_ROOTFS), &["sh", "-c", probe]);
    masked["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let output = call(guest, "masked /proc/kcore", client.run("masked", &masked)).await?;
    let text = output.stdout_text();
    ensure(
        text.starts_with("character special file\n0\n")
            && text.contains("Operation not permitted")
            && text.ends_with("mkdir-denied\n"),
        || format!("{text:?} / {:?}", output.stderr_text()),
    )?;
    let mut unmasked = spec(
        Path::new(GUEST_ROOTFS),
        &["sh", "-c", "stat -c %F:%s /proc/kcore"],
    );
    unmasked["linux"]["maskedPaths"] = json!([]);
    let output = call(
        guest,
        "unmasked /proc/kcore",
        client.run("unmasked", &unmasked),
    )
    .await?;
    let unmasked_kcore = output.stdout_text();
    ensure(
        unmasked_kcore.starts_with("regular ") && !unmasked_kcore.ends_with(":0\n"),
        || {
            format!(
                "unmasked /proc/kcore: {unmasked_kcore:?} / {:?}",
                output.stderr_text()
            )
        },
    )?;

    // A rootfs shared by virtio-fs, mounted through the Storage API.
    let shared = "/run/shared-rootfs";
    let mount = api::MountStorageRequest {
        source: Some(api::mount_storage_request::Source::VirtioFsTag(
            VIRTIOFS_TAG.into(),
        )),
        target: shared.into(),
        fstype: String::new(),
        options: Vec::new(),
    };
    call(
        guest,
        "mount virtio-fs",
        client.storage.mount_storage(mount),
    )
    .await?;
    let marker = spec(Path::new(shared), &["cat", "/etc/shared-marker"]);
    let output = call(guest, "container on virtio-fs", client.run("fs", &marker)).await?;
    ensure(output.stdout_text() == "virtio-fs\n", || {
        format!("{:?} / {:?}", output.stdout_text(), output.stderr_text())
    })?;

    let mut events = call(
        guest,
        "subscribe",
        client
            .events
            .subscribe_events(api::SubscribeEventsRequest {}),
    )
    .await?
    .into_inner();

    // Memory limit: 16 MiB, and dd wants a 64 MiB buffer.
    let mut hungry = spec(
        Path::new(GUEST_ROOTFS),
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    hungry["linux"]["resources"] =
        json!({"memory": {"limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024}});
    call(guest, "create oom", client.create("oom", &hungry, false)).await?;
    let limit = call(guest, "stats oom", stats(&mut client, "oom"))
        .await?
        .memory
        .map(|memory| memory.limit_bytes);
    ensure(limit == Some(16 * 1024 * 1024), || {
        format!("memory.max: {limit:?}")
    })?;
    call(guest, "start oom", client.start("oom")).await?;
    let code = call(guest, "wait oom", client.wait("oom", "")).await?;
    ensure(code == 137, || {
        format!(
            "OOM-killed dd exits 137, got {code}\n{}",
            guest.diagnostics()
        )
    })?;
    let (mut saw_oom, mut saw_exit) = (false, false);
    while !(saw_oom && saw_exit) {
        let event = call(guest, "events", events.message())
            .await?
            .ok_or("the event stream ended")?;
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
    let memory = call(guest, "stats oom", stats(&mut client, "oom"))
        .await?
        .memory
        .ok_or("no memory stats")?;
    ensure(memory.oom_kill_events >= 1, || format!("{memory:?}"))?;
    call(guest, "remove oom", client.remove("oom", false)).await?;

    // pids limit 8: init and an exec'd shell that tries to start 12 more.
    let mut limited = spec(Path::new(GUEST_ROOTFS), &["sleep", "1000"]);
    limited["linux"]["resources"] = json!({"pids": {"limit": 8}});
    call(guest, "create pids", client.create("pids", &limited, false)).await?;
    call(guest, "start pids", client.start("pids")).await?;
    let forky = process(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 600 >/dev/null 2>&1 & done; echo all-forked",
    ]);
    call(
        guest,
        "exec forky",
        client.exec("pids", "forky", &forky, false),
    )
    .await?;
    let output = call(guest, "forky output", client.collect("pids", "forky")).await?;
    ensure(
        output.code != 0 && output.stderr_text().contains("fork"),
        || {
            format!(
                "the shell cannot fork past the limit: code {} {:?} {:?}",
                output.code,
                output.stdout_text(),
                output.stderr_text()
            )
        },
    )?;
    let list = api::ListPidsRequest {
        container_id: "pids".into(),
    };
    let pids = call(guest, "list pids", client.containers.list_pids(list))
        .await?
        .into_inner()
        .pids;
    ensure((2..=8).contains(&pids.len()), || {
        format!("at most 8 processes: {pids:?}")
    })?;
    let pid_stats = call(guest, "stats pids", stats(&mut client, "pids"))
        .await?
        .pids
        .ok_or("no pids stats")?;
    ensure(
        pid_stats.limit == 8 && pid_stats.current as usize == pids.len(),
        || format!("{pid_stats:?} vs {pids:?}"),
    )?;

    // Update: new limits show in the stats.
    let resources = json!({"memory": {"limit": 48 * 1024 * 1024}, "pids": {"limit": 32}});
    let update = api::UpdateContainerRequest {
        container_id: "pids".into(),
        oci_resources_json: serde_json::to_vec(&resources)?.into(),
    };
    call(guest, "update", client.containers.update_container(update)).await?;
    let updated = call(guest, "stats after update", stats(&mut client, "pids")).await?;
    ensure(
        updated.memory.as_ref().map(|m| m.limit_bytes) == Some(48 * 1024 * 1024)
            && updated.pids.as_ref().map(|p| p.limit) == Some(32),
        || format!("{updated:?}"),
    )?;
    call(guest, "remove pids", client.remove("pids", true)).await?;

    // Power off: the answer comes back, then QEMU exits by itself.
    call(
        guest,
        "power off",
        client.sandbox.power_off(api::PowerOffRequest {}),
    )
    .await?;
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
