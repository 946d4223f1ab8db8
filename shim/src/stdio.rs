//! Bridges containerd's stdio FIFOs to the agent's gRPC streams. FIFOs are
//! opened and written with std on blocking threads: opening a FIFO blocks
//! until the other side opens it, which tokio::fs cannot express well.
//!
//! Output: one task per stream reads `ReadOutput` and writes the FIFO; it
//! ends when the agent closes the stream (every writer in the guest closed
//! it), and the exit is reported only after that, so a process that prints
//! and exits at once loses nothing. A FIFO that cannot be opened or whose
//! reader left is drained to nowhere, so the guest process never blocks.
//!
//! Input: a thread reads the stdin FIFO and feeds `WriteStdin`; EOF on the
//! FIFO closes the process's stdin.

use crate::agent::AgentClient;
use bytes::Bytes;
use microvm_proto::agent::v1 as api;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

const STDIN_CHUNK: usize = 32 * 1024;

pub fn process_ref(container_id: &str, exec_id: &str) -> api::ProcessRef {
    api::ProcessRef {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
    }
}

/// Copies `stream` of the process to the FIFO at `path` (nowhere when
/// empty) until the agent ends the stream.
pub fn copy_output(
    agent: &AgentClient,
    process: api::ProcessRef,
    stream: api::OutputStream,
    path: String,
) -> JoinHandle<()> {
    let mut processes = agent.processes.clone();
    tokio::spawn(async move {
        let request = api::ReadOutputRequest {
            process: Some(process.clone()),
            stream: stream as i32,
        };
        let mut output = match processes.read_output(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(
                    "no {} of {}/{}: {status}",
                    stream.as_str_name(),
                    process.container_id,
                    process.exec_id
                );
                return;
            }
        };
        let mut fifo = if path.is_empty() {
            None
        } else {
            open_fifo_for_write(PathBuf::from(&path)).await
        };
        loop {
            let chunk = match output.message().await {
                Ok(Some(chunk)) => chunk.data,
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!("{} stream ended: {status}", stream.as_str_name());
                    break;
                }
            };
            if let Some(file) = fifo.take() {
                fifo = write_blocking(file, chunk).await;
                if fifo.is_none() {
                    tracing::debug!("reader of {path} went away; dropping the rest");
                }
            }
        }
    })
}

async fn open_fifo_for_write(path: PathBuf) -> Option<File> {
    let shown = path.display().to_string();
    match tokio::task::spawn_blocking(move || OpenOptions::new().write(true).open(&path)).await {
        Ok(Ok(file)) => Some(file),
        Ok(Err(err)) => {
            tracing::warn!("cannot open {shown}: {err}");
            None
        }
        Err(err) => {
            tracing::warn!("opening {shown} failed: {err}");
            None
        }
    }
}

/// Writes on a blocking thread; gives the file back unless the write failed.
async fn write_blocking(mut file: File, data: Bytes) -> Option<File> {
    tokio::task::spawn_blocking(move || file.write_all(&data).map(|()| file))
        .await
        .ok()?
        .ok()
}

/// Feeds the FIFO at `path` to the process's stdin; closes the process's
/// stdin at EOF. The reading thread blocks in open() until containerd's
/// side opens the FIFO; [`release_stdin_fifo`] unblocks it.
pub fn copy_stdin(agent: &AgentClient, process: api::ProcessRef, path: String) -> JoinHandle<()> {
    let (chunks_tx, chunks_rx) = mpsc::channel::<Option<Bytes>>(4);
    let fifo_path = PathBuf::from(&path);
    let reader = std::thread::Builder::new()
        .name("stdin-fifo".into())
        .spawn(move || {
            let mut file = match File::open(&fifo_path) {
                Ok(file) => file,
                Err(err) => {
                    tracing::warn!("cannot open {}: {err}", fifo_path.display());
                    return;
                }
            };
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if chunks_tx
                            .blocking_send(Some(Bytes::copy_from_slice(&buf[..n])))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        tracing::warn!("reading {}: {err}", fifo_path.display());
                        break;
                    }
                }
            }
            // EOF: close the process's stdin.
            let _ = chunks_tx.blocking_send(None);
        });
    if let Err(err) = reader {
        tracing::error!("cannot start the stdin thread for {path}: {err}");
    }
    let mut processes = agent.processes.clone();
    tokio::spawn(async move {
        let mut chunks = ReceiverStream::new(chunks_rx);
        // No RPC until there is input (or EOF): most FIFOs never see a
        // writer (`ctr run` without -i), and an idle stream would hold
        // agent resources for the process's whole life.
        let Some(first_chunk) = chunks.next().await else {
            return;
        };
        let first = api::StdinChunk {
            process: Some(process.clone()),
            close_stdin: first_chunk.is_none(),
            data: first_chunk.unwrap_or_default(),
        };
        // The receiver ends when the reader thread does, after EOF.
        let rest = chunks.map(|chunk| api::StdinChunk {
            process: None,
            close_stdin: chunk.is_none(),
            data: chunk.unwrap_or_default(),
        });
        let stream = tokio_stream::once(first).chain(rest);
        if let Err(status) = processes.write_stdin(stream).await {
            tracing::debug!(
                "stdin of {}/{} ended: {status}",
                process.container_id,
                process.exec_id
            );
        }
    })
}

/// Opens the stdin FIFO for writing without blocking and closes it again:
/// a reader thread still blocked in open() then sees EOF and ends.
pub fn release_stdin_fifo(path: &str) {
    if path.is_empty() {
        return;
    }
    // ENXIO (no reader left) is fine: then nothing is blocked.
    let _ = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}
