//! What the net device talks to: a tap in production, a socketpair in tests.

use std::io;
use std::os::fd::RawFd;

/// A source and sink of whole frames, each starting with a 12-byte
/// virtio-net header. Non-blocking: `WouldBlock` means nothing to read or no
/// room to write.
pub trait NetBackend: Send {
    /// Reads one frame into `buf` and returns its length.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// The fd the event loop polls for readability.
    fn raw_fd(&self) -> RawFd;
}
