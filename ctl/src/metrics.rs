//! `microvm-ctl metrics`: Prometheus text for every microVM pod on the
//! node. Per pod it reads the shim's record (boot times, host pids), the
//! shim's metrics socket (agent RPC count, errors, latency), /proc (host
//! PSS per process) and the agent (guest memory, CPU, OOM kills). Nothing
//! registers with containerd: the shims' state dirs are the registry.

use crate::pods::{self, FoundPod};
use microvm_proto::agent::v1 as api;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to serve: HOST:PORT (loopback by default) or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: String,
    /// Print one scrape on stdout and exit.
    #[arg(long)]
    once: bool,
}

/// How long one pod's agent or shim may take to answer a scrape.
const POD_TIMEOUT: Duration = Duration::from_secs(3);

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pod: &FoundPod, extra: &[(&str, &str)]) -> String {
    let record = &pod.record;
    let mut pairs = vec![
        ("pod_id", record.pod_id.as_str()),
        ("pod", record.pod_name.as_str()),
        ("pod_namespace", record.pod_namespace.as_str()),
        ("backend", record.backend.as_str()),
    ];
    pairs.extend_from_slice(extra);
    let inner: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

async fn guest_metrics(socket: &Path) -> Option<api::GuestMetricsResponse> {
    let attempt = async {
        let agent = microvm_shim::agent::AgentClient::connect(
            socket,
            microvm_proto::abi::vsock::AGENT_PORT,
        )
        .await
        .ok()?;
        agent
            .debug
            .clone()
            .guest_metrics(api::GuestMetricsRequest {})
            .await
            .ok()
            .map(tonic::Response::into_inner)
    };
    tokio::time::timeout(POD_TIMEOUT, attempt)
        .await
        .ok()
        .flatten()
}

/// One scrape of every pod under `state_dir`.
pub async fn scrape(state_dir: &Path) -> String {
    let mut families = vec![
        Family { name: "microvm_pod_info", help: "A microVM pod (value 1) and its shim's and agent's versions.", kind: "gauge", samples: vec![] },
        Family { name: "microvm_pod_boot_seconds", help: "Time from the shim's launch of the VM until the agent answered, by phase (launch, guest, agent).", kind: "gauge", samples: vec![] },
        Family { name: "microvm_pod_vcpus", help: "vCPUs the pod's VM was given.", kind: "gauge", samples: vec![] },
        Family { name: "microvm_pod_memory_bytes", help: "Memory the pod's VM was given.", kind: "gauge", samples: vec![] },
        Family { name: "microvm_host_process_pss_bytes", help: "Proportional set size of each host process of the pod (/proc/<pid>/smaps_rollup).", kind: "gauge", samples: vec![] },
        Family { name: "microvm_agent_rpc_total", help: "Agent RPCs the pod's shim made, by method.", kind: "counter", samples: vec![] },
        Family { name: "microvm_agent_rpc_errors_total", help: "Agent RPCs that failed (transport error or non-OK status), by method.", kind: "counter", samples: vec![] },
        Family { name: "microvm_agent_rpc_seconds_sum", help: "Total latency of the shim's agent RPCs (to the response headers), by method.", kind: "counter", samples: vec![] },
        Family { name: "microvm_agent_rpc_seconds_max", help: "Slowest agent RPC, by method.", kind: "gauge", samples: vec![] },
        Family { name: "microvm_guest_memory_bytes", help: "Guest memory (/proc/meminfo), by kind (total, free, available).", kind: "gauge", samples: vec![] },
        Family { name: "microvm_guest_cpu_seconds_total", help: "Guest CPU time of all vCPUs (/proc/stat), by mode.", kind: "counter", samples: vec![] },
        Family { name: "microvm_guest_oom_kills_total", help: "Processes the guest kernel's OOM killer killed (/proc/vmstat oom_kill).", kind: "counter", samples: vec![] },
        Family { name: "microvm_guest_up", help: "Whether the pod's agent answered this scrape.", kind: "gauge", samples: vec![] },
        Family { name: "microvm_vmm_metric", help: "The builtin VMM's own counters (its control API's metrics): KVM exits, serial and each virtio device's, by part and name.", kind: "untyped", samples: vec![] },
        Family { name: "microvm_pod_teardown_failures_total", help: "Container dirs the pod's shim could not remove (mounts or files left; Delete failed and can be retried).", kind: "counter", samples: vec![] },
    ];
    let mut push =
        |index: usize, labels: String, value: f64| families[index].samples.push((labels, value));
    for pod in pods::all(state_dir) {
        let record = &pod.record;
        let state = pods::state(record);
        push(
            0,
            labels(
                &pod,
                &[
                    ("state", state),
                    ("shim_version", &record.shim_version),
                    ("agent_version", &record.agent_version),
                ],
            ),
            1.0,
        );
        push(2, labels(&pod, &[]), f64::from(record.vcpus));
        push(
            3,
            labels(&pod, &[]),
            f64::from(record.memory_mib) * 1024.0 * 1024.0,
        );
        for process in &record.processes {
            if let Some(pss) = pods::pss_bytes(process.pid, process.start_time) {
                let pid = process.pid.to_string();
                push(
                    4,
                    labels(&pod, &[("process", &process.name), ("pid", &pid)]),
                    pss as f64,
                );
            }
        }
        if state != "running" {
            continue;
        }
        if let Some(socket) = record.vmm_api_socket.clone() {
            let read =
                tokio::task::spawn_blocking(move || crate::vmm_metrics::read(&socket, POD_TIMEOUT))
                    .await;
            match read {
                Ok(Ok(counters)) => {
                    for counter in counters {
                        push(
                            13,
                            labels(&pod, &[("part", &counter.part), ("name", &counter.name)]),
                            counter.value,
                        );
                    }
                }
                Ok(Err(err)) => eprintln!(
                    "microvm-ctl metrics: pod {}: {}",
                    record.pod_id,
                    microvm_shim::pod::error_chain(&err)
                ),
                Err(_) => {}
            }
        }
        let socket = record.metrics_socket.clone();
        let shim =
            tokio::task::spawn_blocking(move || microvm_shim::metrics::read(&socket, POD_TIMEOUT))
                .await
                .ok()
                .and_then(Result::ok);
        if let Some(shim) = shim {
            for (phase, seconds) in [
                ("launch", shim.boot_launch_seconds),
                ("guest", shim.boot_guest_seconds),
                ("agent", shim.boot_agent_seconds),
            ] {
                push(1, labels(&pod, &[("phase", phase)]), seconds);
            }
            for (method, stats) in &shim.rpcs {
                let method = method.as_str();
                push(5, labels(&pod, &[("method", method)]), stats.count as f64);
                push(6, labels(&pod, &[("method", method)]), stats.errors as f64);
                push(7, labels(&pod, &[("method", method)]), stats.seconds_sum);
                push(8, labels(&pod, &[("method", method)]), stats.seconds_max);
            }
            push(14, labels(&pod, &[]), shim.teardown_failures as f64);
        }
        match guest_metrics(&record.agent_socket).await {
            Some(guest) => {
                push(12, labels(&pod, &[]), 1.0);
                for (kind, bytes) in [
                    ("total", guest.memory_total_bytes),
                    ("free", guest.memory_free_bytes),
                    ("available", guest.memory_available_bytes),
                ] {
                    push(9, labels(&pod, &[("kind", kind)]), bytes as f64);
                }
                for (mode, seconds) in [
                    ("user", guest.cpu_user_seconds),
                    ("system", guest.cpu_system_seconds),
                    ("idle", guest.cpu_idle_seconds),
                    ("iowait", guest.cpu_iowait_seconds),
                ] {
                    push(10, labels(&pod, &[("mode", mode)]), seconds);
                }
                push(11, labels(&pod, &[]), guest.oom_kills as f64);
            }
            None => push(12, labels(&pod, &[]), 0.0),
        }
    }
    let mut text = String::new();
    for family in families {
        let _ = writeln!(text, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(text, "# TYPE {} {}", family.name, family.kind);
        for (labels, value) in family.samples {
            let _ = writeln!(text, "{}{labels} {value}", family.name);
        }
    }
    text
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Answers one HTTP/1.x request with `body` and closes. Hand-written: a
/// scrape is one GET with no keep-alive, and the endpoint must also speak
/// over a unix socket; an HTTP server crate would be most of this binary.
fn answer(stream: &mut (impl Read + Write), body: &str) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") && request.len() < 16 << 10 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => request.extend_from_slice(&buffer[..count]),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let response = if path == "/metrics" || path == "/" {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    };
    let _ = stream.write_all(response.as_bytes());
}

pub fn run(config: &Path, args: &Args) -> anyhow::Result<()> {
    let config = pods::load_config(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.once {
        print!("{}", runtime.block_on(scrape(&config.paths.state_dir)));
        return Ok(());
    }
    let listener = match args.listen.strip_prefix("unix:") {
        Some(path) => {
            let path = PathBuf::from(path);
            let _ = std::fs::remove_file(&path);
            Listener::Unix(std::os::unix::net::UnixListener::bind(&path)?)
        }
        None => Listener::Tcp(std::net::TcpListener::bind(&args.listen)?),
    };
    eprintln!(
        "microvm-ctl: serving metrics on {} (GET /metrics)",
        args.listen
    );
    loop {
        let scrape = || runtime.block_on(scrape(&config.paths.state_dir));
        match &listener {
            Listener::Tcp(listener) => {
                let (mut stream, _) = listener.accept()?;
                let _ = stream.set_read_timeout(Some(POD_TIMEOUT));
                answer(&mut stream, &scrape());
            }
            Listener::Unix(listener) => {
                let (mut stream, _) = listener.accept()?;
                let _ = stream.set_read_timeout(Some(POD_TIMEOUT));
                answer(&mut stream, &scrape());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_get_metrics_and_404s_the_rest() {
        let (mut client, mut server) = std::os::unix::net::UnixStream::pair().unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        answer(&mut server, "a 1\n");
        drop(server);
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.ends_with("\r\n\r\na 1\n"), "{text}");
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
