//! The sync socket between the agent and a process it is setting up: a
//! SOCK_SEQPACKET pair, close-on-exec on both ends. The child sends fixed
//! 16-byte messages (ready, error, pty master with SCM_RIGHTS); the agent
//! sends one byte to let a created container's process go on to execve.
//! The child's end closes at execve, so end-of-file after Start means the
//! exec happened.

use nix::sys::socket::{
    recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub const MESSAGE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MessageKind {
    /// Set up and waiting for Start.
    Ready = 1,
    /// A step failed; `step`, `index` and `errno` say which and why.
    Error = 2,
    /// The pty master travels with this message.
    Pty = 3,
}

/// What the child reports. Plain integers: the child builds it on its stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub kind: u32,
    pub step: u32,
    pub index: u32,
    pub errno: i32,
}

impl Message {
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut bytes = [0u8; MESSAGE_LEN];
        bytes[0..4].copy_from_slice(&self.kind.to_ne_bytes());
        bytes[4..8].copy_from_slice(&self.step.to_ne_bytes());
        bytes[8..12].copy_from_slice(&self.index.to_ne_bytes());
        bytes[12..16].copy_from_slice(&self.errno.to_ne_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let word = |at: usize| -> Option<[u8; 4]> { bytes.get(at..at + 4)?.try_into().ok() };
        if bytes.len() != MESSAGE_LEN {
            return None;
        }
        Some(Self {
            kind: u32::from_ne_bytes(word(0)?),
            step: u32::from_ne_bytes(word(4)?),
            index: u32::from_ne_bytes(word(8)?),
            errno: i32::from_ne_bytes(word(12)?),
        })
    }
}

/// (agent end, child end).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (parent, child) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((parent, child))
}

/// What the agent reads from its end.
pub enum Received {
    Message(Message, Option<OwnedFd>),
    /// The child's end is closed: it exec'd or died.
    Closed,
}

/// The agent's end of a sync socket.
pub struct SyncSocket {
    fd: AsyncFd<OwnedFd>,
}

impl SyncSocket {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(Self {
            fd: crate::async_fd::register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    pub async fn receive(&self) -> io::Result<Received> {
        self.fd
            .async_io(Interest::READABLE, |fd| receive_now(fd.as_raw_fd()))
            .await
    }

    /// Lets a waiting container process go on to execve.
    pub async fn send_start(&self) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                send(fd.as_raw_fd(), &[1u8], MsgFlags::MSG_NOSIGNAL)
                    .map(drop)
                    .map_err(io::Error::from)
            })
            .await
    }
}

fn receive_now(fd: std::os::fd::RawFd) -> io::Result<Received> {
    let mut buffer = [0u8; MESSAGE_LEN];
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let mut cmsg_space = nix::cmsg_space!(std::os::fd::RawFd);
    let message = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut passed_fd = None;
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: SCM_RIGHTS gave this process a new descriptor that
                // nothing else owns; wrapping it makes sure it is closed.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                passed_fd.get_or_insert(owned);
            }
        }
    }
    let len = message.bytes;
    if len == 0 {
        return Ok(Received::Closed);
    }
    match Message::decode(buffer.get(..len).unwrap_or_default()) {
        Some(decoded) => Ok(Received::Message(decoded, passed_fd)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync message of {len} bytes, expected {MESSAGE_LEN}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let message = Message {
            kind: MessageKind::Error as u32,
            step: 7,
            index: 3,
            errno: libc::ENOENT,
        };
        assert_eq!(Message::decode(&message.encode()), Some(message));
        assert_eq!(Message::decode(&[0u8; 15]), None);
    }

    #[tokio::test]
    async fn agent_end_sees_messages_then_closed() {
        let (parent, child) = pair().unwrap();
        let socket = SyncSocket::new(parent).unwrap();
        let ready = Message {
            kind: MessageKind::Ready as u32,
            step: 0,
            index: 0,
            errno: 0,
        };
        send(child.as_raw_fd(), &ready.encode(), MsgFlags::empty()).unwrap();
        match socket.receive().await.unwrap() {
            Received::Message(message, fd) => {
                assert_eq!(message, ready);
                assert!(fd.is_none());
            }
            Received::Closed => panic!("expected a message"),
        }
        drop(child);
        assert!(matches!(socket.receive().await.unwrap(), Received::Closed));
    }
}
