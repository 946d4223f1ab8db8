//! Socket side of the API: an accept thread plus one thread per connection.
//! Requests reach the controller over a channel and wake it through an
//! EventFd, so the controller never blocks on a client.

use super::protocol::{parse_request, Request, Response};
use crate::seccomp::{SeccompError, SeccompFilters, ThreadKind};
use microvm_devices::unix_socket::{OwnedListener, UnixSocketError};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted; a config with many devices fits easily.
const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error(transparent)]
    Socket(#[from] UnixSocketError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// A request on its way to the controller, with where to send the answer.
pub struct ApiCall {
    pub request: Request,
    pub reply: Sender<Response>,
    /// For `subscribe`: where the controller sends event lines.
    pub events: Option<Sender<String>>,
}

/// Owns the socket file: dropping the server removes it, even though the
/// accept thread (holding a clone of the fd) lives until process exit.
pub struct ApiServer {
    listener: OwnedListener,
}

impl ApiServer {
    /// Binds the socket and starts accepting. Calls arrive on the returned
    /// receiver; each one is followed by a write to `wake`. With `seccomp`,
    /// the accept thread installs the API filter (inherited by the connection
    /// threads) before it accepts anything.
    pub fn start(
        path: &Path,
        wake: Arc<EventFd>,
        seccomp: Option<SeccompFilters>,
    ) -> Result<(Self, Receiver<ApiCall>), ApiStartError> {
        let listener = OwnedListener::bind(path)?;
        let (tx, rx) = mpsc::channel();
        let io_error = |source| UnixSocketError::Bind {
            path: path.to_owned(),
            source,
        };
        let accept_listener = listener.listener().try_clone().map_err(io_error)?;
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let filtered = match &seccomp {
                    Some(filters) => filters.apply(ThreadKind::Api),
                    None => Ok(()),
                };
                let ok = filtered.is_ok();
                let _ = ready_tx.send(filtered);
                if ok {
                    accept_loop(&accept_listener, tx, wake);
                }
            })
            .map_err(io_error)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((Self { listener }, rx)),
            Ok(Err(e)) => Err(ApiStartError::Seccomp(e)),
            Err(_) => Err(io_error(std::io::Error::other("API thread died at start")).into()),
        }
    }

    pub fn path(&self) -> &Path {
        self.listener.path()
    }
}

fn accept_loop(listener: &UnixListener, calls: Sender<ApiCall>, wake: Arc<EventFd>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("api: accept failed: {e}");
                continue;
            }
        };
        let calls = calls.clone();
        let wake = wake.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || serve_connection(stream, calls, wake));
        if let Err(e) = spawned {
            tracing::error!("api: cannot start a connection thread: {e}");
        }
    }
}

fn serve_connection(stream: UnixStream, calls: Sender<ApiCall>, wake: Arc<EventFd>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_REQUEST_BYTES as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() >= MAX_REQUEST_BYTES => {
                let _ = write_line(&mut writer, &Response::error("request line too long"));
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let request = match parse_request(line.trim()) {
            Ok(request) => request,
            Err(message) => {
                if write_line(&mut writer, &Response::error(message)).is_err() {
                    return;
                }
                continue;
            }
        };
        let subscribe = request == Request::Subscribe {};
        let (reply_tx, reply_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        let call = ApiCall {
            request,
            reply: reply_tx,
            events: subscribe.then_some(events_tx),
        };
        if calls.send(call).is_err() || wake.write(1).is_err() {
            let _ = write_line(&mut writer, &Response::error("VMM is shutting down"));
            return;
        }
        let response = reply_rx
            .recv()
            .unwrap_or_else(|_| Response::error("VMM is shutting down"));
        if write_line(&mut writer, &response).is_err() {
            return;
        }
        if subscribe && response.ok {
            for event in events_rx {
                if writer
                    .write_all(event.as_bytes())
                    .and_then(|_| writer.write_all(b"\n"))
                    .is_err()
                {
                    return;
                }
            }
            return;
        }
    }
}

fn write_line(writer: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(std::io::Error::other)?;
    text.push('\n');
    writer.write_all(text.as_bytes())
}
