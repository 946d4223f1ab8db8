//! A deadline on every agent call, as a layer over the agent's channel.
//!
//! A silent or stalled agent must fail that pod's calls with a clear error,
//! never hang containerd. One timeout covers every call up to its response
//! headers: the whole call for a unary RPC (Create, Start, Exec, Pids,
//! ResizePty, CloseIO, Update, Stats, ...), the stream's start for a
//! streaming one. Calls that wait by design (a process's exit, the event
//! stream, output and stdin streams) are exempt; their callers bound them
//! where needed.

use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codegen::http;

/// The default deadline (`timeouts.call_seconds`).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// gRPC methods that wait for the guest by design.
const EXEMPT: &[&str] = &[
    "/microvm.agent.v1.Processes/WaitProcess",
    "/microvm.agent.v1.Processes/ReadOutput",
    "/microvm.agent.v1.Processes/WriteStdin",
    "/microvm.agent.v1.Events/SubscribeEvents",
    "/microvm.agent.v1.Debug/Console",
];

pub fn is_exempt(path: &str) -> bool {
    EXEMPT.contains(&path)
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Deadline<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let call = self.inner.call(request);
        if is_exempt(&path) {
            return Box::pin(async move { call.await.map_err(Into::into) });
        }
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result.map_err(Into::into),
                // tonic keeps a boxed Status as the call's status.
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "{path}: the agent did not answer within {timeout:?} (timeouts.call_seconds)"
                ))) as Self::Error),
            }
        })
    }
}
