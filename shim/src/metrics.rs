//! What the shim measures of its pod, for `microvm-ctl metrics`: every
//! agent RPC (count, errors, latency) through [`Timed`], a layer over the
//! agent's channel, and the boot times. The shim answers on a unix socket
//! in its pod dir (root's, 0700): each connection gets one JSON document
//! ([`ShimMetrics`]) and is closed. The figures of the guest and of the
//! host processes are read by microvm-ctl itself (agent, /proc).

use crate::pod::BootTimes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;

/// One gRPC method's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RpcStats {
    pub count: u64,
    /// Transport errors and non-OK statuses in the response headers (how a
    /// unary call, or a stream refused up front, reports its error).
    pub errors: u64,
    /// Time to the response headers: the whole call for a unary RPC, the
    /// time to the stream's start for a streaming one.
    pub seconds_sum: f64,
    pub seconds_max: f64,
}

/// What the metrics socket answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShimMetrics {
    /// By gRPC path (`/microvm.agent.v1.Health/Check`).
    pub rpcs: BTreeMap<String, RpcStats>,
    pub boot_launch_seconds: f64,
    pub boot_guest_seconds: f64,
    pub boot_agent_seconds: f64,
    /// Host teardowns (a container's or the pod's dir) that left mounts or
    /// files behind: each was refused, never half-done.
    #[serde(default)]
    pub teardown_failures: u64,
}

/// One shim serves one pod: the figures of its agent client are the
/// process's.
static AGENT_RPCS: LazyLock<Mutex<BTreeMap<String, RpcStats>>> = LazyLock::new(Default::default);

fn record_rpc(path: &str, elapsed: Duration, failed: bool) {
    let mut rpcs = AGENT_RPCS.lock().unwrap_or_else(PoisonError::into_inner);
    // Paths come from the generated clients: a bounded set.
    let stats = rpcs.entry(path.to_owned()).or_default();
    let seconds = elapsed.as_secs_f64();
    stats.count += 1;
    stats.errors += u64::from(failed);
    stats.seconds_sum += seconds;
    stats.seconds_max = stats.seconds_max.max(seconds);
}

pub fn agent_rpcs() -> BTreeMap<String, RpcStats> {
    AGENT_RPCS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

static TEARDOWN_FAILURES: AtomicU64 = AtomicU64::new(0);

pub fn record_teardown_failure() {
    TEARDOWN_FAILURES.fetch_add(1, Ordering::Relaxed);
}

pub fn teardown_failures() -> u64 {
    TEARDOWN_FAILURES.load(Ordering::Relaxed)
}

/// A tower layer over the agent's channel that times every call.
#[derive(Debug, Clone)]
pub struct Timed<S> {
    inner: S,
}

impl<S> Timed<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

fn grpc_failed<B>(response: &http::Response<B>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() != b"0")
        || !response.status().is_success()
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Timed<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let failed = result.as_ref().map_or(true, grpc_failed);
            record_rpc(&path, started.elapsed(), failed);
            result
        })
    }
}

/// Serves [`ShimMetrics`] on `socket` for the shim's life (the socket goes
/// with the pod dir).
pub fn serve(socket: &Path, times: BootTimes) {
    let _ = std::fs::remove_file(socket);
    let listener = match tokio::net::UnixListener::bind(socket) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!("no metrics socket at {}: {err}", socket.display());
            return;
        }
    };
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut stream, _)) = listener.accept().await {
            let metrics = ShimMetrics {
                rpcs: agent_rpcs(),
                boot_launch_seconds: times.launch.as_secs_f64(),
                boot_guest_seconds: times.boot.as_secs_f64(),
                boot_agent_seconds: times.agent.as_secs_f64(),
                teardown_failures: teardown_failures(),
            };
            let text = serde_json::to_vec(&metrics).unwrap_or_default();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&text)).await;
            });
        }
    });
}

/// The client side (microvm-ctl): reads one document from `socket`.
pub fn read(socket: &Path, timeout: Duration) -> std::io::Result<ShimMetrics> {
    use std::io::Read;
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut text = Vec::new();
    stream.take(1 << 20).read_to_end(&mut text)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_serves_the_recorded_rpcs() {
        record_rpc("/test.Svc/Ok", Duration::from_millis(3), false);
        record_rpc("/test.Svc/Ok", Duration::from_millis(5), false);
        record_rpc("/test.Svc/Bad", Duration::from_millis(1), true);
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("m.sock");
        serve(
            &socket,
            BootTimes {
                launch: Duration::from_millis(10),
                ..Default::default()
            },
        );
        let socket_for_read = socket.clone();
        let metrics =
            tokio::task::spawn_blocking(move || read(&socket_for_read, Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        let ok = &metrics.rpcs["/test.Svc/Ok"];
        assert_eq!((ok.count, ok.errors), (2, 0));
        assert!((ok.seconds_sum - 0.008).abs() < 1e-9);
        assert!((ok.seconds_max - 0.005).abs() < 1e-9);
        assert_eq!(metrics.rpcs["/test.Svc/Bad"].errors, 1);
        assert!((metrics.boot_launch_seconds - 0.010).abs() < 1e-9);
    }
}
