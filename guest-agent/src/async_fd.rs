//! Registering owned descriptors with tokio's reactor.

use std::io;
use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `fd` registered for `interest`. Must run inside the tokio runtime.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor that stays open, and the same
    // number, until it is dropped; the AsyncFd owns it and deregisters it
    // before dropping it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|err| err.into_parts().1)
}
