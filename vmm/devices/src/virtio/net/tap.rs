//! A Linux tap device opened through /dev/net/tun.
//!
//! Hand-written ioctls: the tap crates on crates.io either lack IFF_VNET_HDR /
//! TUNSETVNETHDRSZ or pull in async runtimes; two ioctls on a `File` are less
//! code than adapting them. libc supplies the request numbers and `ifreq`.

use super::backend::NetBackend;
use super::VNET_HDR_LEN;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty, too long (max 15 bytes) or contains NUL")]
    InvalidName(String),
    #[error("tap {name}: cannot open {TUN_PATH}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: TUNSETIFF failed")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: TUNSETVNETHDRSZ failed")]
    SetVnetHdrSize {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// An open tap queue. The interface goes away with the last fd unless it was
/// made persistent elsewhere (`ip tuntap add`); closing happens on drop.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or, as root, creates) the tap `name` in non-blocking mode, with
    /// a 12-byte virtio-net header in front of every frame.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut req = ifreq_for(name).ok_or_else(|| TapError::InvalidName(name.to_string()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: `file` is an open tun fd and `req` a valid, initialised
        // ifreq that outlives the call; TUNSETIFF reads and writes only it.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut req as *mut libc::ifreq,
            )
        };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
        // points at a live local.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Builds an ifreq naming `name`, or None if the kernel would not accept it.
fn ifreq_for(name: &str) -> Option<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and pointers); all-zero is a valid value for it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Some(req)
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    #[test]
    fn names_are_validated() {
        assert!(ifreq_for("tap0").is_some());
        assert!(ifreq_for("").is_none());
        assert!(ifreq_for("a-name-of-16-byt").is_none());
        assert!(ifreq_for("nul\0").is_none());
        assert!(matches!(
            Tap::open("much-too-long-tap-name"),
            Err(TapError::InvalidName(_))
        ));
    }

    #[test]
    fn real_tap_is_created_and_removed_on_drop() {
        if let Err(e) = File::open(TUN_PATH) {
            println!("skipping: cannot open {TUN_PATH}: {e}");
            return;
        }
        let name = format!("mvt{}", std::process::id() % 1_000_000_000);
        let sys = Path::new("/sys/class/net").join(&name);
        let tap = match Tap::open(&name) {
            Ok(tap) => tap,
            Err(e @ TapError::SetIff { .. }) => {
                println!("skipping: cannot create a tap here (not root?): {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tap.name(), name);
        assert!(sys.exists(), "{} missing", sys.display());
        let flags = std::fs::read_to_string(sys.join("tun_flags")).unwrap();
        let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        let wanted = i64::from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        assert_eq!(flags & wanted, wanted);
        // Nothing to read on a fresh, down interface: non-blocking says so.
        let mut tap = tap;
        let mut buf = [0u8; 64];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(tap);
        let deadline = Instant::now() + Duration::from_secs(2);
        while sys.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!sys.exists(), "{} still present after drop", sys.display());
    }

    #[test]
    fn open_error_names_the_tap() {
        // Creating a tap under an existing non-tap name fails in TUNSETIFF.
        if File::open(TUN_PATH).is_err() {
            println!("skipping: cannot open {TUN_PATH}");
            return;
        }
        match Tap::open("lo") {
            Err(e) => assert!(e.to_string().contains("tap lo"), "{e}"),
            Ok(_) => panic!("opening lo as a tap succeeded"),
        }
    }
}
