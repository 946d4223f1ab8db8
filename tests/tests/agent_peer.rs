//! The agent's API is reachable only from the host side of vsock. Two real
//! guests (QEMU+TCG, our kernel and agent) share one vhost-device-vsock
//! process, as CIDs 3 and 4 of one sibling group; the host reaches each
//! agent through its hybrid-vsock socket.
//!
//! The client inside a container is the agent binary itself
//! (`/probe --probe-vsock <cid> <port>`, `/init` bind-mounted): it connects,
//! sends an HTTP/2 preface and prints `served` if anything comes back,
//! `closed` if the connection closes first, `refused: ...` if connect()
//! fails.
//!
//! - From guest 4 to guest 3's agent: vhost-device-vsock routes the
//!   connection, so guest 3's agent accepts a peer with CID 4. It must close
//!   it unserved and log the refusal. This is the case the peer-CID check
//!   exists for, end to end.
//! - From guest 3 to its own CID 3 and to CID 1 (local): our kernel has no
//!   vsock loopback transport (`CONFIG_VSOCKETS_LOOPBACK` is off), so
//!   connect() to the own CID fails with ENODEV, and to CID 1 it times out
//!   (the request leaves through virtio and the device drops it). With a
//!   loopback transport the agent would see the peer and must close it:
//!   `closed` with the refusal log is accepted too, `served` never.
//!
//! With the check disabled the first probe prints `served` and this test
//! fails (tried once by hand).
//!
//! Needs the same tools as agent_qemu; without them the test is reported
//! ignored with the reason, never passed.

use libtest_mimic::{Arguments, Failed, Trial};
use microvm_guest_image::initramfs::Entry;
use microvm_guest_image::kernel;
use microvm_tests::agent::{spec, AgentClient};
use microvm_tests::agent_qemu::{
    connect_agent, find_tool, missing_tools, qemu_command, spawn_helper, write_agent_initrd, Helper,
};
use microvm_tests::harness::TempDir;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SERVED_CID: u32 = 3;
const SIBLING_CID: u32 = 4;
const LOCAL_CID: u32 = 1;
/// An empty directory in the initramfs: the probe container's rootfs.
const PROBE_ROOT: &str = "/probe-root";
/// Where the agent binary is mounted inside the probe container.
const PROBE: &str = "/probe";
/// The line guest-agent/src/peer.rs logs for a refused peer.
const REFUSAL_LOG: &str = "refused a vsock connection from CID";
/// TCG is slow, but no call takes a minute.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

struct Guest {
    cid: u32,
    uds: PathBuf,
    console: PathBuf,
    _qemu: Helper,
}

impl Guest {
    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// Two guests, CIDs 3 and 4, behind one vhost-device-vsock.
struct Siblings {
    served: Guest,
    sibling: Guest,
    _vsock: Helper,
    dir: TempDir,
}

impl Siblings {
    fn boot() -> Result<Self, String> {
        let kernel = kernel::kernel().map_err(|err| format!("guest kernel: {err}"))?;
        let dir = TempDir::new("agent-peer");
        let initrd = dir.join("initrd.cpio");
        write_agent_initrd(
            &initrd,
            vec![Entry::dir(PROBE_ROOT.trim_start_matches('/'), 0o755)],
        )?;

        let vm = |cid: u32| {
            format!(
                "guest-cid={cid},socket={},uds-path={},groups=pod",
                dir.join(&format!("vhu{cid}.sock")).display(),
                dir.join(&format!("vm{cid}.vsock")).display()
            )
        };
        let vsock = spawn_helper(
            Command::new(find_tool("vhost-device-vsock").ok_or("vhost-device-vsock not found")?)
                .args(["--vm", &vm(SERVED_CID), "--vm", &vm(SIBLING_CID)]),
            &dir.join("vhost-device-vsock.log"),
        )?;
        let qemu = find_tool("qemu-system-x86_64").ok_or("qemu not found")?;
        let mut guests = Vec::new();
        for cid in [SERVED_CID, SIBLING_CID] {
            let vhost_socket = dir.join(&format!("vhu{cid}.sock"));
            if !microvm_tests::harness::wait_for_path(&vhost_socket, Duration::from_secs(10)) {
                return Err(format!("{} did not appear", vhost_socket.display()));
            }
            let console = dir.join(&format!("console{cid}.log"));
            let process = spawn_helper(
                &mut qemu_command(
                    &qemu,
                    256,
                    &kernel.vmlinux,
                    &initrd,
                    &console,
                    &vhost_socket,
                ),
                &dir.join(&format!("qemu{cid}.log")),
            )?;
            guests.push(Guest {
                cid,
                uds: dir.join(&format!("vm{cid}.vsock")),
                console,
                _qemu: process,
            });
        }
        let sibling = guests.pop().ok_or("no sibling guest")?;
        let served = guests.pop().ok_or("no served guest")?;
        Ok(Self {
            served,
            sibling,
            _vsock: vsock,
            dir,
        })
    }

    fn diagnostics(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- console of CID {} ---\n{}\n--- console of CID {} ---\n{}\n--- vhost-device-vsock ---\n{}",
            self.served.cid,
            self.served.console_text(),
            self.sibling.cid,
            self.sibling.console_text(),
            read("vhost-device-vsock.log")
        )
    }
}

/// A client of `guest`'s agent once it answers Check.
async fn client(guest: &Guest, timeout: Duration) -> Result<AgentClient, String> {
    connect_agent(&guest.uds, timeout)
        .await
        .map_err(|err| format!("the agent of CID {}: {err}", guest.cid))
}

/// Runs the probe against `cid:1024` in a container of `client`'s guest
/// and returns its one line.
async fn probe(client: &mut AgentClient, id: &str, cid: u32) -> Result<String, String> {
    let port = microvm_proto::abi::vsock::AGENT_PORT.to_string();
    let cid = cid.to_string();
    let mut probe = spec(
        Path::new(PROBE_ROOT),
        &[PROBE, "--probe-vsock", &cid, &port],
    );
    if let Some(mounts) = probe["mounts"].as_array_mut() {
        mounts.push(json!({
            "destination": PROBE, "type": "bind", "source": "/init", "options": ["bind", "ro"]
        }));
    }
    let output = tokio::time::timeout(CALL_TIMEOUT, client.run(id, &probe))
        .await
        .map_err(|_| format!("probe {id}: no answer within {CALL_TIMEOUT:?}"))?
        .map_err(|status| format!("probe {id}: {status:?}"))?;
    if output.code != 0 {
        return Err(format!(
            "probe {id} exited {}: {:?} / {:?}",
            output.code,
            output.stdout_text(),
            output.stderr_text()
        ));
    }
    Ok(output.stdout_text().trim().to_owned())
}

/// Waits for the agent's refusal of `peer_cid` on `guest`'s console.
async fn refusal_logged(guest: &Guest, peer_cid: u32) -> bool {
    let line = format!("{REFUSAL_LOG} {peer_cid} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if guest.console_text().contains(&line) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn scenario(guests: &Siblings) -> Result<(), String> {
    let (served, sibling) = tokio::join!(
        client(&guests.served, Duration::from_secs(180)),
        client(&guests.sibling, Duration::from_secs(180))
    );
    let (mut served, mut sibling) = (served?, sibling?);

    // The sibling's container reaches CID 3's agent: accepted by the
    // kernel, closed by the agent before a byte is served.
    let outcome = probe(&mut sibling, "probe-sibling", SERVED_CID).await?;
    println!("container in CID {SIBLING_CID} -> CID {SERVED_CID}: {outcome}");
    if outcome != "closed" {
        return Err(format!(
            "a sibling guest's container must connect and be closed unserved, got {outcome:?}"
        ));
    }
    if !refusal_logged(&guests.served, SIBLING_CID).await {
        return Err(format!(
            "no refusal of CID {SIBLING_CID} in the agent's log"
        ));
    }

    // Guest-local attempts: no route in our kernel; closed if there were.
    for (id, cid) in [
        ("probe-own-cid", SERVED_CID),
        ("probe-local-cid", LOCAL_CID),
    ] {
        let outcome = probe(&mut served, id, cid).await?;
        println!("container in CID {SERVED_CID} -> CID {cid}: {outcome}");
        let refused_by_kernel = outcome.starts_with("refused");
        let refused_by_agent = outcome == "closed" && refusal_logged(&guests.served, cid).await;
        if !(refused_by_kernel || refused_by_agent) {
            return Err(format!(
                "a container reaching its own agent through CID {cid}: {outcome:?}"
            ));
        }
    }

    // The host is still served after the refusals.
    served
        .health
        .check(microvm_proto::agent::v1::CheckRequest {
            client_version: Some(microvm_proto::agent::v1::ApiVersion::current()),
        })
        .await
        .map_err(|status| format!("host Check after the refusals: {status:?}"))?;
    Ok(())
}

/// Boot under TCG (about 2 s each, 180 s allowed) plus the probes.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

fn refused_in_real_guests() -> Result<(), Failed> {
    let guests = Siblings::boot()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    // Bounded: a hung vsock connection must fail the test, not stall CI.
    let result = runtime
        .block_on(async { tokio::time::timeout(SCENARIO_TIMEOUT, scenario(&guests)).await })
        .unwrap_or_else(|_| {
            Err(format!(
                "the scenario did not finish within {SCENARIO_TIMEOUT:?}"
            ))
        });
    println!("peer scenario took {:?}", started.elapsed());
    result.map_err(|err| format!("{err}\n{}", guests.diagnostics()).into())
}

fn main() {
    let args = Arguments::from_args();
    let missing = missing_tools();
    if let Some(reason) = &missing {
        println!("agent_peer: ignored on this host: {reason}");
    }
    let trial = Trial::test(
        "containers_in_guests_cannot_use_an_agent_api_over_vsock",
        refused_in_real_guests,
    )
    .with_ignored_flag(missing.is_some());
    libtest_mimic::run(&args, vec![trial]).exit();
}
