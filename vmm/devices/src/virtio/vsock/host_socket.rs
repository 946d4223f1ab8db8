//! The host side of hybrid vsock: the listener at `uds_path`, the
//! `CONNECT <port>\n` handshake and connects to `<uds_path>_<port>`.

use super::VsockError;
use crate::unix_socket::{OwnedListener, UnixSocketError};
use socket2::{Domain, SockAddr, Socket, Type};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest accepted handshake line, newline included ("CONNECT 4294967295\n"
/// is 19 bytes). Reading stops here, so a peer cannot make us buffer more.
pub const CONNECT_LINE_MAX: usize = 32;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectLineError {
    #[error("line does not end in a newline")]
    NoNewline,
    #[error("line does not start with \"CONNECT \"")]
    NoConnectVerb,
    #[error("port is not a decimal number")]
    BadPort,
    #[error("port does not fit in 32 bits")]
    PortOverflow,
}

/// Parses `CONNECT <port>\n`: exactly one space, decimal digits, a newline.
/// Anything looser (extra spaces, signs, `\r`) is refused so the grammar stays
/// trivially auditable.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    let body = line
        .strip_suffix(b"\n")
        .ok_or(ConnectLineError::NoNewline)?;
    let digits = body
        .strip_prefix(b"CONNECT ")
        .ok_or(ConnectLineError::NoConnectVerb)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ConnectLineError::BadPort);
    }
    digits.iter().try_fold(0u32, |acc, d| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u32::from(d - b'0')))
            .ok_or(ConnectLineError::PortOverflow)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer closed before finishing the CONNECT line")]
    Eof,
    #[error("CONNECT line longer than {CONNECT_LINE_MAX} bytes")]
    TooLong,
    #[error("bad CONNECT line")]
    BadLine(#[from] ConnectLineError),
    #[error("reading the CONNECT line failed")]
    Io(#[source] io::Error),
}

#[derive(Debug)]
pub enum HandshakeStep {
    /// The line is not complete yet; wait for more input.
    Pending,
    /// The host wants guest port `.0`.
    Done(u32),
    Failed(HandshakeError),
}

/// A host connection that has not finished its `CONNECT` line.
pub struct Handshake<S> {
    stream: S,
    line: Vec<u8>,
}

impl<S: Read> Handshake<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(CONNECT_LINE_MAX),
        }
    }

    /// Reads what is available of the line. Reads one byte at a time so that
    /// bytes after the newline stay in the socket for the guest.
    pub fn advance(&mut self) -> HandshakeStep {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Failed(HandshakeError::Eof),
                Ok(_) => {
                    self.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        return match parse_connect_line(&self.line) {
                            Ok(port) => HandshakeStep::Done(port),
                            Err(e) => HandshakeStep::Failed(e.into()),
                        };
                    }
                    if self.line.len() >= CONNECT_LINE_MAX {
                        return HandshakeStep::Failed(HandshakeError::TooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return HandshakeStep::Failed(HandshakeError::Io(e)),
            }
        }
    }

    pub fn into_stream(self) -> S {
        self.stream
    }
}

/// Connects without blocking: a unix connect to a listener whose backlog is
/// full would otherwise block the event loop (EAGAIN here instead). socket2,
/// because std has no non-blocking connect.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(OwnedFd::from(socket)))
}

/// `<uds_path>_<port>`, built on the raw OS string so odd paths survive.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// The listening socket at `uds_path` (see `crate::unix_socket` for how it is
/// published and removed).
#[derive(Debug)]
pub struct HostListener {
    owned: OwnedListener,
}

impl HostListener {
    /// Binds at `path`. A live listener already there is an error (its socket
    /// is never stolen); a stale socket file (connect refused) is replaced.
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        let owned = OwnedListener::bind(path)?;
        owned
            .listener()
            .set_nonblocking(true)
            .map_err(|source| UnixSocketError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self { owned })
    }

    /// Accepts one pending connection, non-blocking.
    pub fn accept(&self) -> io::Result<UnixStream> {
        let (stream, _) = self.owned.listener().accept()?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }

    pub fn path(&self) -> &Path {
        self.owned.path()
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> RawFd {
        self.owned.listener().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::test_utils::TempDir;
    use std::io::Write;

    #[test]
    fn connect_line_valid() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 0\n"), Ok(0));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Ok(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 007\n"), Ok(7));
    }

    #[test]
    fn connect_line_missing_newline() {
        assert_eq!(
            parse_connect_line(b"CONNECT 1024"),
            Err(ConnectLineError::NoNewline)
        );
        assert_eq!(parse_connect_line(b""), Err(ConnectLineError::NoNewline));
    }

    #[test]
    fn connect_line_non_numeric() {
        for line in [
            &b"CONNECT abc\n"[..],
            b"CONNECT 12a\n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT \n",
            b"CONNECT 1024\r\n",
        ] {
            assert_eq!(
                parse_connect_line(line),
                Err(ConnectLineError::BadPort),
                "{line:?}"
            );
        }
        assert_eq!(
            parse_connect_line(b"connect 1024\n"),
            Err(ConnectLineError::NoConnectVerb)
        );
        assert_eq!(
            parse_connect_line(b"\n"),
            Err(ConnectLineError::NoConnectVerb)
        );
    }

    #[test]
    fn connect_line_overflow() {
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967296\n"),
            Err(ConnectLineError::PortOverflow)
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 99999999999999999999\n"),
            Err(ConnectLineError::PortOverflow)
        );
    }

    #[test]
    fn connect_line_extra_spaces() {
        assert_eq!(
            parse_connect_line(b"CONNECT  1024\n"),
            Err(ConnectLineError::BadPort)
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 1024 \n"),
            Err(ConnectLineError::BadPort)
        );
        assert_eq!(
            parse_connect_line(b" CONNECT 1024\n"),
            Err(ConnectLineError::NoConnectVerb)
        );
    }

    fn nonblocking_pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn handshake_leaves_bytes_after_newline_in_the_socket() {
        let (ours, mut theirs) = nonblocking_pair();
        theirs.write_all(b"CONNECT 1024\nhello").unwrap();
        let mut hs = Handshake::new(ours);
        assert!(matches!(hs.advance(), HandshakeStep::Done(1024)));
        let mut rest = [0u8; 5];
        let mut stream = hs.into_stream();
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn handshake_waits_for_the_rest_of_the_line() {
        let (ours, mut theirs) = nonblocking_pair();
        let mut hs = Handshake::new(ours);
        theirs.write_all(b"CONN").unwrap();
        assert!(matches!(hs.advance(), HandshakeStep::Pending));
        theirs.write_all(b"ECT 5").unwrap();
        assert!(matches!(hs.advance(), HandshakeStep::Pending));
        theirs.write_all(b"\n").unwrap();
        assert!(matches!(hs.advance(), HandshakeStep::Done(5)));
    }

    #[test]
    fn handshake_huge_line_is_cut_at_the_cap() {
        let (ours, mut theirs) = nonblocking_pair();
        theirs.write_all(&[b'A'; 4096]).unwrap();
        let mut hs = Handshake::new(ours);
        assert!(matches!(
            hs.advance(),
            HandshakeStep::Failed(HandshakeError::TooLong)
        ));
        // Only the cap was consumed.
        let mut stream = hs.into_stream();
        let mut rest = vec![0u8; 4096 - CONNECT_LINE_MAX];
        stream.read_exact(&mut rest).unwrap();
    }

    #[test]
    fn handshake_missing_newline_then_eof_fails() {
        let (ours, mut theirs) = nonblocking_pair();
        theirs.write_all(b"CONNECT 1024").unwrap();
        drop(theirs);
        let mut hs = Handshake::new(ours);
        assert!(matches!(
            hs.advance(),
            HandshakeStep::Failed(HandshakeError::Eof)
        ));
    }

    #[test]
    fn handshake_garbage_fails() {
        let (ours, mut theirs) = nonblocking_pair();
        theirs.write_all(b"GET / HTTP/1.1\n").unwrap();
        let mut hs = Handshake::new(ours);
        assert!(matches!(
            hs.advance(),
            HandshakeStep::Failed(HandshakeError::BadLine(_))
        ));
    }

    #[test]
    fn bind_refuses_a_live_socket_through_the_shared_helper() {
        let dir = TempDir::new();
        let path = dir.path().join("v.sock");
        let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = HostListener::bind(&path).unwrap_err();
        assert!(
            matches!(err, VsockError::Socket(UnixSocketError::InUse(ref p)) if *p == path),
            "{err}"
        );
    }

    #[test]
    fn port_path_appends_the_port() {
        assert_eq!(
            port_path(Path::new("/run/vm/v.sock"), 52),
            PathBuf::from("/run/vm/v.sock_52")
        );
    }

    #[test]
    fn connect_nonblocking_refused_without_listener() {
        let dir = TempDir::new();
        let err = connect_nonblocking(&dir.path().join("none")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
