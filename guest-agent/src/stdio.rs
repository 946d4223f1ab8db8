//! A process's stdio on the agent's side: output pipes (or the pty master)
//! read on demand by one gRPC stream at a time, and a stdin writer.
//!
//! No output is lost: the agent holds the read end until a reader has seen
//! end-of-file, so bytes a process wrote before exiting wait in the pipe.
//! Reading happens only when the gRPC stream asks for the next chunk, so a
//! reader that goes away leaves everything it did not take in the pipe.

use bytes::{Bytes, BytesMut};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// Largest chunk one read (and one gRPC message) carries.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Pipe capacity asked for stdout/stderr: fewer wakeups, bigger chunks.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("{0} is already being read by another stream")]
    Busy(&'static str),
    #[error("stdin is closed")]
    StdinClosed,
    #[error("stdin is closed: the process closed it or exited")]
    BrokenPipe,
    #[error("stdio I/O failed")]
    Io(#[from] io::Error),
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A close-on-exec pipe, both ends at descriptor 3 or above (the child
/// dup2s them onto 0-2). Returns (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((above_stdio(read)?, above_stdio(write)?))
}

/// An output pipe with a larger buffer (best effort).
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = pipe()?;
    let _ = nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((read, write))
}

/// /dev/null for a process without stdin.
pub fn dev_null() -> io::Result<OwnedFd> {
    let file = std::fs::File::open("/dev/null")?;
    above_stdio(file.into())
}

/// `fd` itself, or a close-on-exec duplicate at 3 or above if it is 0-2
/// (possible when the agent was started with stdio closed).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let duplicate = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor owned by no one else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(duplicate) })
}

enum OutputState {
    Open { fd: AsyncFd<OwnedFd>, pty: bool },
    Finished,
}

/// One output stream of a process.
pub struct OutputPipe {
    name: &'static str,
    state: Arc<Mutex<OutputState>>,
}

impl OutputPipe {
    /// `pty`: the fd is a pty master, where EIO means the slave side is
    /// closed (end of output).
    pub fn new(name: &'static str, fd: OwnedFd, pty: bool) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            name,
            state: Arc::new(Mutex::new(OutputState::Open {
                fd: crate::async_fd::register(fd, Interest::READABLE)?,
                pty,
            })),
        })
    }

    /// A stream that is at its end from the start (stderr of a pty process).
    pub fn finished(name: &'static str) -> Self {
        Self {
            name,
            state: Arc::new(Mutex::new(OutputState::Finished)),
        }
    }

    /// The single reader; `Busy` while another stream reads.
    pub fn reader(&self) -> Result<OutputReader, StdioError> {
        let guard = Arc::clone(&self.state)
            .try_lock_owned()
            .map_err(|_| StdioError::Busy(self.name))?;
        Ok(OutputReader { guard })
    }
}

pub struct OutputReader {
    guard: OwnedMutexGuard<OutputState>,
}

impl OutputReader {
    /// The next chunk, or None at end of output (then the pipe is closed).
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let OutputState::Open { fd, pty } = &*self.guard else {
            return Ok(None);
        };
        let pty = *pty;
        let mut buffer = BytesMut::with_capacity(CHUNK_SIZE);
        let result = fd
            .async_io(Interest::READABLE, |fd| {
                let spare = buffer.spare_capacity_mut();
                // SAFETY: read writes at most `spare.len()` bytes into the
                // spare capacity of `buffer`, which is valid for writes.
                let read =
                    unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
                if read < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(read as usize)
                }
            })
            .await;
        match result {
            Ok(0) => {
                *self.guard = OutputState::Finished;
                Ok(None)
            }
            Ok(read) => {
                // SAFETY: the kernel initialised `read` bytes of the spare
                // capacity.
                unsafe { buffer.set_len(read) };
                Ok(Some(buffer.freeze()))
            }
            Err(err) if pty && err.raw_os_error() == Some(libc::EIO) => {
                *self.guard = OutputState::Finished;
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }
}

/// The writing side of a process's stdin: a pipe, or the pty master.
pub struct StdinPipe {
    writer: Mutex<Option<AsyncFd<OwnedFd>>>,
    pty: bool,
}

/// VEOF of a default termios: ends a line-buffered read on a pty.
const PTY_EOF: u8 = 0x04;

impl StdinPipe {
    pub fn new(fd: OwnedFd, pty: bool) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            writer: Mutex::new(Some(crate::async_fd::register(fd, Interest::WRITABLE)?)),
            pty,
        })
    }

    /// Writes all of `data`, waiting while the pipe is full.
    pub async fn write_all(&self, data: &[u8]) -> Result<(), StdioError> {
        let guard = self.writer.lock().await;
        let Some(fd) = guard.as_ref() else {
            return Err(StdioError::StdinClosed);
        };
        write_all(fd, data).await
    }

    /// Closes stdin: the process reads EOF after what was written. On a
    /// pty, sends the EOF character instead (the master stays open for
    /// output and resizes).
    pub async fn close(&self) -> Result<(), StdioError> {
        let mut guard = self.writer.lock().await;
        if self.pty {
            if let Some(fd) = guard.as_ref() {
                write_all(fd, &[PTY_EOF]).await?;
            }
        }
        guard.take();
        Ok(())
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> Result<(), StdioError> {
    while !data.is_empty() {
        let written = fd
            .async_io(Interest::WRITABLE, |fd| {
                // SAFETY: write reads at most data.len() bytes from `data`.
                let written =
                    unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if written < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(written as usize)
                }
            })
            .await
            .map_err(|err| {
                if err.raw_os_error() == Some(libc::EPIPE) || err.raw_os_error() == Some(libc::EIO)
                {
                    StdioError::BrokenPipe
                } else {
                    StdioError::Io(err)
                }
            })?;
        data = data.get(written..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_survives_the_writer_closing_and_reads_to_eof() {
        let (read, write) = output_pipe().unwrap();
        let pipe = OutputPipe::new("stdout", read, false).unwrap();
        nix::unistd::write(&write, b"hello ").unwrap();
        nix::unistd::write(&write, b"world").unwrap();
        drop(write);
        let mut reader = pipe.reader().unwrap();
        assert!(matches!(pipe.reader(), Err(StdioError::Busy("stdout"))));
        let mut all = Vec::new();
        while let Some(chunk) = reader.next_chunk().await.unwrap() {
            all.extend_from_slice(&chunk);
        }
        assert_eq!(all, b"hello world");
        drop(reader);
        // A later reader sees the end at once.
        let mut again = pipe.reader().unwrap();
        assert_eq!(again.next_chunk().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_dropped_reader_leaves_the_rest_for_the_next() {
        let (read, write) = output_pipe().unwrap();
        let pipe = OutputPipe::new("stdout", read, false).unwrap();
        nix::unistd::write(&write, b"first").unwrap();
        let mut reader = pipe.reader().unwrap();
        assert_eq!(reader.next_chunk().await.unwrap().unwrap(), "first");
        drop(reader);
        nix::unistd::write(&write, b"second").unwrap();
        drop(write);
        let mut next = pipe.reader().unwrap();
        assert_eq!(next.next_chunk().await.unwrap().unwrap(), "second");
        assert_eq!(next.next_chunk().await.unwrap(), None);
    }

    #[tokio::test]
    async fn stdin_writes_then_closes_and_reports_a_gone_reader() {
        let (read, write) = pipe().unwrap();
        let stdin = StdinPipe::new(write, false).unwrap();
        stdin.write_all(b"abc").await.unwrap();
        stdin.close().await.unwrap();
        assert!(matches!(
            stdin.write_all(b"x").await,
            Err(StdioError::StdinClosed)
        ));
        let mut buffer = [0u8; 8];
        assert_eq!(nix::unistd::read(&read, &mut buffer).unwrap(), 3);
        assert_eq!(nix::unistd::read(&read, &mut buffer).unwrap(), 0);

        let (read, write) = pipe().unwrap();
        let stdin = StdinPipe::new(write, false).unwrap();
        drop(read);
        assert!(matches!(
            stdin.write_all(b"x").await,
            Err(StdioError::BrokenPipe)
        ));
    }
}
