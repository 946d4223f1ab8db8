//! Creating a persistent tap in the calling thread's netns.
//!
//! Hand-written ioctls: the kernel refuses to create tun/tap devices over
//! rtnetlink ("not supported"), so rtnetlink cannot do it, and the tap crates
//! on crates.io wrap a queue for I/O rather than make a persistent device.
//! Two ioctls on a `File` are less code than adapting one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::TapOwner;

const TUN_PATH: &str = "/dev/net/tun";

/// The step that failed, for the error message.
pub(super) type Step = &'static str;

/// Creates (or, if it exists and nobody holds it, reattaches to) the tap
/// `name` and makes it outlive this fd. /dev/net/tun is opened here, so the
/// tap lands in the calling thread's netns.
pub(super) fn create_persistent_tap(name: &str, owner: TapOwner) -> Result<(), (Step, io::Error)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|err| ("opening /dev/net/tun", err))?;
    let mut request = ifreq_for(name);
    // VNET_HDR is only the default of this fd: every later opener (the VMM)
    // sets its own flags in its TUNSETIFF.
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: `file` is an open tun fd and `request` a live, initialised
    // ifreq; TUNSETIFF reads and writes only that struct.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if ret < 0 {
        return Err(("TUNSETIFF", io::Error::last_os_error()));
    }
    // A tap without an owner can be attached by anyone who can open
    // /dev/net/tun in its netns; with one, only by that uid/gid (or with
    // CAP_NET_ADMIN): the jailed VMM's ids, and nobody else's.
    if let Some(uid) = owner.uid {
        set_owner(&file, libc::TUNSETOWNER, uid).map_err(|err| ("TUNSETOWNER", err))?;
    }
    if let Some(gid) = owner.gid {
        set_owner(&file, libc::TUNSETGROUP, gid).map_err(|err| ("TUNSETGROUP", err))?;
    }
    set_persist(&file, true).map_err(|err| ("TUNSETPERSIST", err))
}

fn set_owner(file: &File, request: libc::Ioctl, id: u32) -> io::Result<()> {
    // SAFETY: TUNSETOWNER/TUNSETGROUP take the id by value (no pointer) on a
    // tun fd attached by TUNSETIFF.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request, libc::c_ulong::from(id)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_persist(file: &File, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value (no pointer) on a tun
    // fd attached by TUNSETIFF.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `name` must have passed `validate_tap_name` (shorter than IFNAMSIZ).
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and pointers); all-zero is a valid value for it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // Keeps the last byte NUL even for an over-long name.
    let room = request.ifr_name.len() - 1;
    for (dst, src) in request.ifr_name.iter_mut().take(room).zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_names_are_nul_terminated() {
        let request = ifreq_for("tap0");
        assert_eq!(
            request.ifr_name[..5],
            [b't', b'a', b'p', b'0', 0].map(|b| b as libc::c_char)
        );
        let request = ifreq_for("0123456789abcdefXYZ");
        assert_eq!(request.ifr_name[libc::IFNAMSIZ - 1], 0);
        assert_eq!(request.ifr_name[14], b'e' as libc::c_char);
    }
}
