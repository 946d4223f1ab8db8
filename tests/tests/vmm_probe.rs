//! KVM integration: the probe guest boots under `microvm-vmm` through the
//! same loader path as Linux (PVH ELF), talks to its devices, and stops.

use microvm_tests::harness::{
    binary, run_with_timeout, wait_for_path, wait_for_text, ChildGuard, TempDir,
};
use microvm_tests::probe::{echo_socket_path, probe_guest_elf, spawn_echo, write_disk};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn make_disk(dir: &TempDir) -> PathBuf {
    let disk = dir.join("disk.img");
    write_disk(&disk).unwrap();
    disk
}

fn echo_for(uds: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    spawn_echo(UnixListener::bind(echo_socket_path(uds)).unwrap())
}

fn probe() -> PathBuf {
    probe_guest_elf().expect("building the probe guest")
}

#[test]
fn probe_guest_uses_serial_boot_timer_vsock_and_blk_then_powers_off() {
    let dir = TempDir::new("probe-full");
    let disk = make_disk(&dir);
    let uds = dir.join("v.sock");
    let echo = echo_for(&uds);
    let console = dir.join("console.log");
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.args(["--kernel", probe().to_str().unwrap()])
        .args(["--disk", disk.to_str().unwrap()])
        .args(["--vsock-uds", uds.to_str().unwrap()])
        .args(["--serial-output", console.to_str().unwrap()]);
    let done = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let serial = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        done.code(),
        Some(0),
        "serial:\n{serial}\nstderr:\n{}",
        done.stderr
    );
    for line in [
        "probe: hello",
        "probe: vsock ok",
        "probe: blk read hello-from-host!",
        "probe: blk ok",
        "probe: done status=0",
    ] {
        assert!(
            serial.contains(line),
            "missing {line:?} in serial:\n{serial}"
        );
    }
    assert!(
        done.stderr.contains("guest boot timer:"),
        "stderr:\n{}",
        done.stderr
    );
    assert!(
        done.stderr.contains("guest shut down with status 0"),
        "stderr:\n{}",
        done.stderr
    );
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written[512..].starts_with(b"probe-blk-write-ok"),
        "sector 1: {:?}",
        &written[512..540]
    );
    assert_eq!(echo.join().unwrap(), b"probe-vsock-echo");
    // The VMM removed its own vsock socket; only the test's files remain.
    let leftovers = dir.entries();
    assert_eq!(
        leftovers,
        vec!["console.log", "disk.img", "v.sock_52"],
        "{leftovers:?}"
    );
}

#[test]
fn guest_failure_status_becomes_exit_code_3() {
    // No echo listener: the guest's vsock connect is refused, the probe
    // reports failure through the shutdown port.
    let dir = TempDir::new("probe-fail");
    let uds = dir.join("v.sock");
    let console = dir.join("console.log");
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.args(["--kernel", probe().to_str().unwrap()])
        .args(["--vsock-uds", uds.to_str().unwrap()])
        .args(["--serial-output", console.to_str().unwrap()]);
    let done = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let serial = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        done.code(),
        Some(3),
        "serial:\n{serial}\nstderr:\n{}",
        done.stderr
    );
    assert!(serial.contains("probe: vsock FAIL"), "serial:\n{serial}");
    assert!(
        done.stderr.contains("guest shut down with status 1"),
        "stderr:\n{}",
        done.stderr
    );
}

struct Api {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Api {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn call(&mut self, request: serde_json::Value) -> serde_json::Value {
        writeln!(self.writer, "{request}").unwrap();
        self.next_line()
    }

    fn next_line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }
}

#[test]
fn api_configure_start_state_metrics_and_stop_event() {
    let dir = TempDir::new("probe-api");
    let sock = dir.join("api.sock");
    let console = dir.join("console.log");
    let mut child = ChildGuard(Some(
        Command::new(binary("microvm-vmm"))
            .args(["--api-sock", sock.to_str().unwrap(), "--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    assert!(
        wait_for_path(&sock, Duration::from_secs(10)),
        "API socket never appeared"
    );
    let mut api = Api::connect(&sock);
    let mut events = Api::connect(&sock);

    let state = api.call(serde_json::json!({"action": "state"}));
    assert_eq!(state["result"]["state"], "not-configured", "{state}");
    let refused = api.call(serde_json::json!({"action": "start"}));
    assert_eq!(refused["ok"], false);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("cannot start: VM is not-configured"),
        "{refused}"
    );
    let bad = api
        .call(serde_json::json!({"action": "configure", "config": {"boot": {"kernel": "/nope"}}}));
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("/nope"), "{bad}");

    let config = serde_json::json!({
        "boot": {"kernel": probe(), "cmdline": "probe.quick=1"},
        "serial": {"output": console},
        "machine": {"vcpus": 2, "memory_mib": 64},
    });
    let configured = api.call(serde_json::json!({"action": "configure", "config": config}));
    assert_eq!(configured["ok"], true, "{configured}");
    let subscribed = events.call(serde_json::json!({"action": "subscribe"}));
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    let started = api.call(serde_json::json!({"action": "start"}));
    assert_eq!(started["ok"], true, "{started}");

    // Events until the stop: state running, boot timer, stopped.
    let mut seen = Vec::new();
    loop {
        let event = events.next_line();
        let stopped = event["event"] == "stopped";
        seen.push(event);
        if stopped {
            break;
        }
    }
    let kinds: Vec<&str> = seen.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"boot-timer"), "{seen:?}");
    let last = seen.last().unwrap();
    assert_eq!(last["reason"], "guest-shutdown", "{last}");
    assert_eq!(last["status"], 0);
    assert_eq!(last["exit_code"], 0);

    let status = child.0.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(0));
    child.0 = None;
    assert!(!sock.exists(), "API socket left behind");
    let serial = std::fs::read_to_string(&console).unwrap();
    assert!(serial.contains("probe: hello"), "{serial}");
}

fn run_probe_with(
    dir: &TempDir,
    cmdline: &str,
    extra: &[&str],
) -> (microvm_tests::harness::Finished, String) {
    let console = dir.join("console.log");
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.args(["--kernel", probe().to_str().unwrap(), "--cmdline", cmdline])
        .args(["--serial-output", console.to_str().unwrap()])
        .args(extra);
    let done = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let serial = std::fs::read_to_string(&console).unwrap_or_default();
    (done, serial)
}

#[test]
fn guest_reboot_is_exit_code_4() {
    let dir = TempDir::new("probe-reboot");
    let (done, serial) = run_probe_with(&dir, "probe.exit=reboot", &[]);
    assert_eq!(
        done.code(),
        Some(4),
        "serial:\n{serial}\nstderr:\n{}",
        done.stderr
    );
    assert!(serial.contains("probe: rebooting"), "{serial}");
    assert!(
        done.stderr.contains("VM stopped: guest rebooted"),
        "{}",
        done.stderr
    );
}

#[test]
fn triple_fault_is_exit_code_5() {
    let dir = TempDir::new("probe-triple");
    let (done, serial) = run_probe_with(&dir, "probe.exit=triple-fault", &[]);
    assert_eq!(
        done.code(),
        Some(5),
        "serial:\n{serial}\nstderr:\n{}",
        done.stderr
    );
    assert!(serial.contains("probe: triple faulting"), "{serial}");
    assert!(
        done.stderr.contains("VM stopped: guest triple-faulted"),
        "{}",
        done.stderr
    );
}

#[test]
fn tap_backed_net_device_is_offered_and_the_tap_removed_after() {
    if !Path::new("/dev/net/tun").exists() {
        panic!("/dev/net/tun is missing: this test needs tap support");
    }
    let dir = TempDir::new("probe-tap");
    let tap = format!("mvt{}", std::process::id() % 100_000);
    let (done, serial) = run_probe_with(&dir, "console=ttyS0", &["--tap", &tap]);
    assert_eq!(
        done.code(),
        Some(0),
        "serial:\n{serial}\nstderr:\n{}",
        done.stderr
    );
    assert!(
        serial.contains(" id=1 version=2"),
        "no virtio-net device seen by the guest:\n{serial}"
    );
    assert!(
        serial.contains(" id=4 version=2"),
        "no virtio-rng device seen by the guest:\n{serial}"
    );
    assert!(
        !Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "tap {tap} left behind"
    );
}

#[test]
fn api_pause_resume_metrics_and_graceful_shutdown_timeout() {
    let dir = TempDir::new("probe-pause");
    let sock = dir.join("api.sock");
    let console = dir.join("console.log");
    let mut child = ChildGuard(Some(
        Command::new(binary("microvm-vmm"))
            .args(["--api-sock", sock.to_str().unwrap(), "--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    assert!(
        wait_for_path(&sock, Duration::from_secs(10)),
        "API socket never appeared"
    );
    let mut api = Api::connect(&sock);
    let config = serde_json::json!({
        "boot": {"kernel": probe(), "cmdline": "probe.idle=1"},
        "serial": {"output": console},
        "disks": [{"path": make_disk(&dir), "read_only": true}],
    });
    assert_eq!(
        api.call(serde_json::json!({"action": "configure", "config": config}))["ok"],
        true
    );
    assert_eq!(api.call(serde_json::json!({"action": "start"}))["ok"], true);
    assert!(
        wait_for_text(&console, "probe: idle status=0", Duration::from_secs(30)),
        "probe never went idle:\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let paused = api.call(serde_json::json!({"action": "pause"}));
    assert_eq!(paused["result"]["state"], "paused", "{paused}");
    let again = api.call(serde_json::json!({"action": "pause"}));
    assert!(
        again["error"]
            .as_str()
            .unwrap()
            .contains("cannot pause: VM is paused"),
        "{again}"
    );
    let state = api.call(serde_json::json!({"action": "state"}));
    assert_eq!(state["result"]["state"], "paused");
    assert!(
        state["result"]["boot_time_ms"].as_f64().unwrap() > 0.0,
        "{state}"
    );
    let metrics = api.call(serde_json::json!({"action": "metrics"}));
    let m = &metrics["result"];
    assert!(m["exits"]["io_out"].as_u64().unwrap() > 10, "{metrics}");
    assert!(m["exits"]["mmio_write"].as_u64().unwrap() > 0, "{metrics}");
    assert!(
        m["serial"]["bytes_written"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(m["virtio"]["disks[0]"].is_object(), "{metrics}");
    let resumed = api.call(serde_json::json!({"action": "resume"}));
    assert_eq!(resumed["result"]["state"], "running", "{resumed}");
    // The probe has no keyboard driver, so graceful shutdown times out and
    // the VMM forces it.
    let shutdown =
        api.call(serde_json::json!({"action": "shutdown", "graceful": true, "timeout_ms": 200}));
    assert_eq!(shutdown["ok"], true, "{shutdown}");
    let status = child.0.as_mut().unwrap().wait().unwrap();
    child.0 = None;
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists());
}
