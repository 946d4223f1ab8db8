//! The pod's log: the guest console and the pod's host processes' output,
//! relayed by the shim from their pipes into one file.
//!
//! - Whole lines only, each written at once: a VMM log line can no longer
//!   split the guest's console line (the agent's ready line among them).
//!   Helper output is prefixed with its process's name; the console is not.
//! - Capped: past `max_bytes` the file moves to `<log>.1` (replacing an
//!   older one) and a new one starts, so a guest that prints without end
//!   costs at most twice the cap on disk, whatever the backend.
//! - The agent's ready line is noticed as it goes by ([`PodLog::ready`]),
//!   instead of rereading the file.

use microvm_proto::abi::console::READY_LINE_PREFIX;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// A console line longer than this is written in pieces.
const MAX_LINE: usize = 4096;

/// What a relayed stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The guest's serial console (the VMM's stdout): unprefixed, and
    /// watched for the agent's ready line.
    Console,
    /// A host process's own output, prefixed with its name.
    Process(&'static str),
}

struct LogFile {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
    rotations: u64,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            // The guest's console is the tenant's: root only.
            .mode(0o600)
            .create(true)
            .append(true)
            .open(path)
    }

    fn write_line(&mut self, line: &[u8]) {
        if self.written.saturating_add(line.len() as u64) > self.max_bytes {
            self.rotate();
        }
        if self.file.write_all(line).is_ok() {
            self.written += line.len() as u64;
        }
    }

    fn rotate(&mut self) {
        let old = rotated_path(&self.path);
        let _ = std::fs::rename(&self.path, &old);
        match Self::open(&self.path) {
            Ok(file) => {
                self.file = file;
                self.written = 0;
                self.rotations += 1;
                if self.rotations == 1 {
                    tracing::warn!(
                        "the pod's log reached {} bytes; older output is in {} (one file kept)",
                        self.max_bytes,
                        old.display()
                    );
                }
            }
            Err(err) => tracing::warn!("cannot reopen {}: {err}", self.path.display()),
        }
    }
}

/// `<log>.1`.
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The pod's log, shared by the relays of all its processes.
#[derive(Clone)]
pub struct PodLog {
    file: Arc<Mutex<LogFile>>,
    ready: watch::Sender<bool>,
}

impl std::fmt::Debug for PodLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.debug_struct("PodLog").field("path", &file.path).finish()
    }
}

impl PodLog {
    /// Opens (appends to) the log at `path`, making its directory.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = LogFile::open(path)?;
        let written = file.metadata().map(|meta| meta.len()).unwrap_or(0);
        Ok(Self {
            file: Arc::new(Mutex::new(LogFile {
                path: path.to_path_buf(),
                file,
                written,
                max_bytes: max_bytes.max(MAX_LINE as u64 * 2),
                rotations: 0,
            })),
            ready: watch::channel(false).0,
        })
    }

    /// Becomes true once the agent's ready line went by on the console.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Appends one line of `stream` (with its prefix and a newline).
    pub fn line(&self, stream: Stream, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut out = Vec::with_capacity(line.len() + 24);
        match stream {
            Stream::Console => {
                if line.starts_with(READY_LINE_PREFIX.as_bytes()) {
                    self.ready.send_replace(true);
                }
            }
            Stream::Process(name) => {
                out.push(b'[');
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"] ");
            }
        }
        out.extend_from_slice(line);
        out.push(b'\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_line(&out);
    }

    /// Relays `pipe` line by line until EOF (the process exited).
    pub fn relay(
        &self,
        stream: Stream,
        mut pipe: impl AsyncRead + Unpin + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            let mut pending: Vec<u8> = Vec::new();
            let mut chunk = vec![0u8; 8192];
            loop {
                let n = match pipe.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&chunk[..n]);
                let mut start = 0;
                while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
                    log.line(stream, &pending[start..start + end]);
                    start += end + 1;
                }
                pending.drain(..start);
                while pending.len() >= MAX_LINE {
                    let piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
                    log.line(stream, &piece);
                }
            }
            if !pending.is_empty() {
                log.line(stream, &pending);
            }
        })
    }

    /// The log's last `lines` lines (a boot failure quotes them).
    pub fn tail(&self, lines: usize) -> String {
        let path = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .path
            .clone();
        let text = std::fs::read(&path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_stay_whole_helpers_are_prefixed_and_ready_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.log");
        let log = PodLog::open(&path, 1 << 20).unwrap();
        let mut ready = log.ready();
        let (mut console_in, console_out) = tokio::io::duplex(64);
        let (mut vmm_in, vmm_out) = tokio::io::duplex(64);
        let console = log.relay(Stream::Console, console_out);
        let vmm = log.relay(Stream::Process("vmm"), vmm_out);
        use tokio::io::AsyncWriteExt;
        console_in.write_all(b"microvm-agent: re").await.unwrap();
        vmm_in.write_all(b"INFO guest boot timer\n").await.unwrap();
        tokio::task::yield_now().await;
        console_in.write_all(b"ady uptime=3.88\r\n").await.unwrap();
        drop((console_in, vmm_in));
        console.await.unwrap();
        vmm.await.unwrap();
        assert!(*ready.borrow_and_update());
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "[vmm] INFO guest boot timer",
                "microvm-agent: ready uptime=3.88"
            ]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn an_endless_console_is_rotated_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.log");
        let log = PodLog::open(&path, 64 << 10).unwrap();
        let (mut input, output) = tokio::io::duplex(1 << 16);
        let relay = log.relay(Stream::Console, output);
        use tokio::io::AsyncWriteExt;
        let writer = tokio::spawn(async move {
            // 1 MiB, part of it without any newline.
            for _ in 0..128 {
                input.write_all(&[b'x'; 4096]).await.unwrap();
                input.write_all(&[b'y'; 4095]).await.unwrap();
                input.write_all(b"\n").await.unwrap();
            }
        });
        writer.await.unwrap();
        relay.await.unwrap();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 64 << 10, "{}", size(&path));
        assert!(size(&rotated_path(&path)) <= 64 << 10);
        assert!(size(&rotated_path(&path)) > 0);
        assert!(!rotated_path(&rotated_path(&path)).exists());
        assert!(log.tail(1).starts_with('y') || log.tail(1).starts_with('x'));
    }
}
