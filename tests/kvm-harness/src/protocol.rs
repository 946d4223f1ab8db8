//! What goes between the host and L1: the command (a JSON file in the
//! per-run initramfs), and one ordered stream of frames on a virtio-serial
//! port. One stream, not a port per output: everything the command wrote
//! reaches the host before its exit status does.
//!
//! A frame is `kind: u8`, `len: u32` (little endian), then `len` bytes.
//! After the exit frame the host answers one [`ACK`] byte, and only then
//! does L1 power off, so no frame is lost in QEMU's buffers.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The virtio-serial port's name (`/sys/class/virtio-ports/*/name` in L1).
pub const PORT_NAME: &str = "microvm-kvm-harness";
/// The virtio-fs tag of the host's `/`.
pub const HOST_FS_TAG: &str = "hostroot";
/// Set in the command's environment in L1.
pub const NESTED_ENV: &str = "MICROVM_KVM_HARNESS";
pub const ACK: u8 = 0x06;
/// No frame is larger: output is sent in pieces of at most this.
pub const MAX_FRAME: usize = 64 << 10;

/// The command to run, as the host saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Stage 2 runs; L1's uptime in milliseconds.
    Started {
        uptime_ms: u64,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command's status: its exit code, or 128 + the signal.
    Exited {
        status: i32,
    },
    /// Stage 2 could not run the command.
    Failed(String),
}

const STARTED: u8 = 1;
const STDOUT: u8 = 2;
const STDERR: u8 = 3;
const EXITED: u8 = 4;
const FAILED: u8 = 5;

impl Frame {
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Started { uptime_ms } => (STARTED, uptime_ms.to_le_bytes().to_vec().into()),
            Frame::Stdout(data) => (STDOUT, data.as_slice().into()),
            Frame::Stderr(data) => (STDERR, data.as_slice().into()),
            Frame::Exited { status } => (EXITED, status.to_le_bytes().to_vec().into()),
            Frame::Failed(message) => (FAILED, message.as_bytes().into()),
        };
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len as usize <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let mut bytes = Vec::with_capacity(5 + payload.len());
        bytes.push(kind);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&payload);
        out.write_all(&bytes)?;
        out.flush()
    }

    /// The next frame; `None` at a clean end of stream.
    pub fn read_from(input: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut header = [0u8; 5];
        match input.read_exact(&mut header[..1]) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        input.read_exact(&mut header[1..])?;
        let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_FRAME {
            return Err(invalid(format!("frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        input.read_exact(&mut payload)?;
        let fixed = |payload: &[u8]| -> io::Result<[u8; 8]> {
            let mut out = [0u8; 8];
            match payload.len() {
                4 | 8 => {
                    out[..payload.len()].copy_from_slice(payload);
                    Ok(out)
                }
                n => Err(invalid(format!("a {n}-byte number"))),
            }
        };
        Ok(Some(match header[0] {
            STARTED => Frame::Started {
                uptime_ms: u64::from_le_bytes(fixed(&payload)?),
            },
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            EXITED => {
                let bytes = fixed(&payload)?;
                Frame::Exited {
                    status: i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                }
            }
            FAILED => Frame::Failed(String::from_utf8_lossy(&payload).into_owned()),
            other => return Err(invalid(format!("frame kind {other}"))),
        }))
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad frame from L1: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_order() {
        let frames = [
            Frame::Started { uptime_ms: 3_900 },
            Frame::Stdout(b"hello\n".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::Exited { status: -1 },
            Frame::Failed("cannot exec".into()),
        ];
        let mut stream = Vec::new();
        for frame in &frames {
            frame.write_to(&mut stream).unwrap();
        }
        let mut reader = stream.as_slice();
        for frame in &frames {
            assert_eq!(Frame::read_from(&mut reader).unwrap().as_ref(), Some(frame));
        }
        assert_eq!(Frame::read_from(&mut reader).unwrap(), None);
    }

    #[test]
    fn oversized_truncated_and_unknown_frames_are_errors() {
        let mut big = vec![STDOUT];
        big.extend_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(Frame::read_from(&mut big.as_slice()).is_err());
        let truncated = [STDOUT, 4, 0, 0, 0, b'a'];
        assert!(Frame::read_from(&mut truncated.as_slice()).is_err());
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(Frame::read_from(&mut unknown.as_slice()).is_err());
        assert!(Frame::Stdout(vec![0; MAX_FRAME + 1])
            .write_to(&mut Vec::new())
            .is_err());
    }
}
