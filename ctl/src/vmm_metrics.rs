//! The builtin VMM's own counters (KVM exits, serial, every virtio device)
//! from its control API (docs/vmm-api.md), for `microvm-ctl metrics`.
//! The VMM is host code, but it runs the guest's devices: its answer is
//! bounded in size, time and samples, and only numbers are taken from it.

use microvm_vmm::api::{Request, Response};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A metrics answer is a few KiB; anything past this is not read.
const MAX_ANSWER_BYTES: u64 = 1 << 20;
/// Samples taken from one answer.
const MAX_SAMPLES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum VmmMetricsError {
    #[error("VMM API {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM API {path}: not a JSON answer: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("VMM API {path}: {message}")]
    Refused { path: String, message: String },
}

/// One counter: which part of the VMM (`exits`, `serial` or a virtio
/// device's name), its name, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    pub part: String,
    pub name: String,
    pub value: f64,
}

/// Asks the VMM behind `socket` for its metrics.
pub fn read(socket: &Path, timeout: Duration) -> Result<Vec<Counter>, VmmMetricsError> {
    let path = socket.display().to_string();
    let io = |source| VmmMetricsError::Io {
        path: path.clone(),
        source,
    };
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut request =
        serde_json::to_vec(&Request::Metrics {}).map_err(|source| VmmMetricsError::Json {
            path: path.clone(),
            source,
        })?;
    request.push(b'\n');
    stream.write_all(&request).map_err(io)?;
    let line = read_line_by(&mut stream, deadline).map_err(io)?;
    let response: Response =
        serde_json::from_slice(&line).map_err(|source| VmmMetricsError::Json {
            path: path.clone(),
            source,
        })?;
    if !response.ok {
        return Err(VmmMetricsError::Refused {
            path,
            message: response.error.unwrap_or_default(),
        });
    }
    Ok(counters(&response.result.unwrap_or_default()))
}

/// One answer line, read by `deadline` as a whole (a per-read timeout
/// alone lets a byte every few seconds hold the scrape forever), and at
/// most [`MAX_ANSWER_BYTES`].
fn read_line_by(stream: &mut UnixStream, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut buffer = [0u8; 8192];
    let late = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no whole answer in time");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        stream.set_read_timeout(Some(left))?;
        // A read cut by the timeout (EAGAIN) is the deadline passing too.
        let read = match stream.read(&mut buffer) {
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            other => other?,
        };
        if read == 0 {
            return Ok(line);
        }
        line.extend_from_slice(&buffer[..read]);
        if let Some(end) = line.iter().position(|&byte| byte == b'\n') {
            line.truncate(end);
            return Ok(line);
        }
        if line.len() as u64 >= MAX_ANSWER_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("answer longer than {MAX_ANSWER_BYTES} bytes"),
            ));
        }
    }
}

/// The numeric counters of a metrics result: `exits.<reason>`,
/// `serial.<name>` and `virtio.<device>.<name>` (a nested object's
/// leaves joined with `_`). Strings (a device's tag or state) are left out.
pub fn counters(result: &serde_json::Value) -> Vec<Counter> {
    let mut out = Vec::new();
    for part in ["exits", "serial"] {
        leaves(part, "", &result[part], &mut out);
    }
    if let Some(devices) = result["virtio"].as_object() {
        for (device, metrics) in devices {
            leaves(device, "", metrics, &mut out);
        }
    }
    out
}

fn leaves(part: &str, prefix: &str, value: &serde_json::Value, out: &mut Vec<Counter>) {
    if out.len() >= MAX_SAMPLES {
        return;
    }
    match value {
        serde_json::Value::Number(number) => {
            if let Some(value) = number.as_f64() {
                out.push(Counter {
                    part: part.to_owned(),
                    name: prefix.to_owned(),
                    value,
                });
            }
        }
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}_{key}")
                };
                leaves(part, &name, value, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn counters_are_the_numeric_leaves_by_part() {
        let result = serde_json::json!({
            "exits": {"hlt": 7, "io_out": 3},
            "serial": {"dropped_bytes": 0},
            "virtio": {
                "net0": {"rx_bytes": 1500, "queues": {"rx": 2}},
                "fs0": {"requests": 9, "tag": "microvm-shared", "state": "running"}
            },
            "guest_memory_bytes": 268435456
        });
        let mut got: Vec<(String, String, f64)> = counters(&result)
            .into_iter()
            .map(|c| (c.part, c.name, c.value))
            .collect();
        got.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let expected = [
            ("exits", "hlt", 7.0),
            ("exits", "io_out", 3.0),
            ("fs0", "requests", 9.0),
            ("net0", "queues_rx", 2.0),
            ("net0", "rx_bytes", 1500.0),
            ("serial", "dropped_bytes", 0.0),
        ]
        .map(|(p, n, v)| (p.to_owned(), n.to_owned(), v));
        assert_eq!(got, expected);
    }

    #[test]
    fn a_vmm_that_floods_drips_or_refuses_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            // A refusal, then an endless line.
            let (mut first, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&first).read_line(&mut request).unwrap();
            first
                .write_all(b"{\"ok\":false,\"error\":\"no VM\"}\n")
                .unwrap();
            let (mut second, _) = listener.accept().unwrap();
            let chunk = vec![b'7'; 64 << 10];
            while second.write_all(&chunk).is_ok() {}
            // A byte at a time, each within any per-read timeout.
            let (mut third, _) = listener.accept().unwrap();
            while third.write_all(b"{").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
            request
        });
        let err = read(&socket, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("no VM"), "{err}");
        let err = read(&socket, Duration::from_secs(5)).unwrap_err();
        assert!(
            microvm_shim::pod::error_chain(&err).contains("longer than"),
            "{err}"
        );
        let started = Instant::now();
        let err = read(&socket, Duration::from_secs(1)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{err}");
        assert!(
            microvm_shim::pod::error_chain(&err).contains("in time"),
            "{err}"
        );
        assert_eq!(server.join().unwrap(), "{\"action\":\"metrics\"}\n");
    }
}
