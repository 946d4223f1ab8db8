//! The byte bridge of a forwarded connection (CRI `PortForward`), shared
//! by both ends: the shim copies between the TCP connection containerd
//! opened in the pod's network namespace and a vsock stream to the agent,
//! the agent between that stream and the container's port. The header
//! that starts each stream is ABI: [`crate::abi::port_forward`].
//!
//! Hand-written rather than `tokio::io::copy_bidirectional`, which waits
//! for both directions forever: a peer that never closes its half would
//! pin the bridge (and its buffers) for good.

use std::time::Duration;

/// What one forwarded connection carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies `a` <-> `b` until both directions end, through buffers of
/// `buffer` bytes each. A direction ends at EOF or an error; its
/// writer is then shut down, so the peer sees the half-close. Once one
/// direction has ended the other gets `linger` more; then both streams
/// are dropped (closed), whatever is left. Both sides of port
/// forwarding (the shim and the agent) bridge with this.
pub async fn bridge<A, B>(a: A, b: B, buffer: usize, linger: Duration) -> Carried
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    async fn one_way<R, W>(reader: R, mut writer: W, buffer: usize) -> u64
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut reader = tokio::io::BufReader::with_capacity(buffer, reader);
        let copied = tokio::io::copy_buf(&mut reader, &mut writer).await;
        // The peer may be gone already: nothing to tell it then.
        let _ = writer.shutdown().await;
        copied.unwrap_or(0)
    }
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let forward = one_way(a_read, b_write, buffer);
    let backward = one_way(b_read, a_write, buffer);
    tokio::pin!(forward, backward);
    let mut carried = Carried::default();
    tokio::select! {
        bytes = &mut forward => {
            carried.a_to_b = bytes;
            if let Ok(bytes) = tokio::time::timeout(linger, &mut backward).await {
                carried.b_to_a = bytes;
            }
        }
        bytes = &mut backward => {
            carried.b_to_a = bytes;
            if let Ok(bytes) = tokio::time::timeout(linger, &mut forward).await {
                carried.a_to_b = bytes;
            }
        }
    }
    carried
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Bytes both ways, a half-close that travels and an answer after
    /// it, then both ends closed.
    #[test]
    fn bridge_carries_both_ways_and_passes_half_closes() {
        runtime().block_on(async {
            let (mut client, a) = tokio::io::duplex(64);
            let (b, mut server) = tokio::io::duplex(64);
            let bridge =
                tokio::spawn(async move { bridge(a, b, 16, Duration::from_secs(5)).await });
            client
                .write_all(b"ping and more than sixteen bytes")
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            let mut request = Vec::new();
            server.read_to_end(&mut request).await.unwrap();
            assert_eq!(request, b"ping and more than sixteen bytes");
            server.write_all(b"pong").await.unwrap();
            drop(server);
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"pong");
            let carried = bridge.await.unwrap();
            assert_eq!(
                carried,
                Carried {
                    a_to_b: 32,
                    b_to_a: 4
                }
            );
        });
    }

    /// A side that never closes its half is cut off after the linger.
    #[test]
    fn bridge_closes_both_after_the_linger() {
        runtime().block_on(async {
            let (client, a) = tokio::io::duplex(64);
            let (b, mut server) = tokio::io::duplex(64);
            let bridge =
                tokio::spawn(async move { bridge(a, b, 16, Duration::from_millis(100)).await });
            drop(client);
            // The server sees EOF but keeps its half open (and unread
            // bytes stay in flight): the bridge still ends.
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            let started = std::time::Instant::now();
            let carried = tokio::time::timeout(Duration::from_secs(5), bridge)
                .await
                .expect("the bridge ends after its linger")
                .unwrap();
            assert!(started.elapsed() >= Duration::from_millis(50));
            assert_eq!(carried, Carried::default());
            // Both streams are closed: the server's writes now fail.
            assert!(server.write_all(&[0u8; 256]).await.is_err());
        });
    }
}
