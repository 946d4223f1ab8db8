//! `/proc/self/mountinfo`, read as bytes.
//!
//! The kernel escapes only space, tab, newline and backslash (as `\ooo`)
//! in a mount point, so a path can hold any other byte, including ones that
//! are not UTF-8. Code that decides what to unmount or delete must see
//! every mount: a reader that cannot parse the file fails, it never returns
//! a shorter list.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum MountinfoError {
    #[error("cannot read {MOUNTINFO}")]
    Read(#[source] std::io::Error),
    #[error("{MOUNTINFO} line {line} is malformed")]
    Malformed { line: usize },
}

/// One line of mountinfo: what the callers here need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Field 5, unescaped.
    pub mount_point: PathBuf,
    /// After the ` - ` separator: the filesystem type.
    pub fs_type: String,
    /// Field 6: per-mount options (`rw,nosuid,...`).
    pub mount_options: String,
    /// After the filesystem type and source: the superblock options.
    pub super_options: String,
}

/// Every mount of this process's mount namespace, in the file's order.
pub fn mounts() -> Result<Vec<Mount>, MountinfoError> {
    let bytes = std::fs::read(MOUNTINFO).map_err(MountinfoError::Read)?;
    parse(&bytes)
}

/// Mount points at or below `path`, deepest first.
pub fn mounts_under(path: &Path) -> Result<Vec<PathBuf>, MountinfoError> {
    let mut found: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|mount| mount.mount_point)
        .filter(|point| point.starts_with(path))
        .collect();
    found.sort_by_key(|point| std::cmp::Reverse(point.as_os_str().len()));
    found.dedup();
    Ok(found)
}

pub fn parse(bytes: &[u8]) -> Result<Vec<Mount>, MountinfoError> {
    let mut mounts = Vec::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let malformed = || MountinfoError::Malformed { line: index + 1 };
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let separator = fields
            .iter()
            .position(|field| *field == b"-")
            .ok_or_else(malformed)?;
        if separator < 6 || fields.len() < separator + 4 {
            return Err(malformed());
        }
        let text = |field: &[u8]| String::from_utf8_lossy(field).into_owned();
        mounts.push(Mount {
            mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
            mount_options: text(fields[5]),
            fs_type: text(fields[separator + 1]),
            super_options: text(fields[separator + 3]),
        });
    }
    Ok(mounts)
}

/// Decodes mountinfo's `\ooo` escapes.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            // In u32: `\777` must not overflow (it is not an escape the
            // kernel writes; it stays literal).
            .and_then(|d| {
                let value = d
                    .iter()
                    .fold(0u32, |acc, digit| acc * 8 + u32::from(digit - b'0'));
                u8::try_from(value).ok()
            });
        match (field[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    const SAMPLE: &[u8] = b"\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
40 22 0:40 / /run/a\\040b rw - tmpfs tmpfs rw\n\
41 22 0:41 / /run/p/\xff\xfe/mounts rw shared:7 master:2 - tmpfs tmpfs rw,size=10k\n";

    #[test]
    fn every_line_parses_non_utf8_points_included() {
        let mounts = parse(SAMPLE).unwrap();
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1].fs_type, "cgroup");
        assert_eq!(mounts[1].super_options, "rw,memory");
        assert_eq!(mounts[2].mount_point, PathBuf::from("/run/a b"));
        assert_eq!(
            mounts[3].mount_point.as_os_str().as_bytes(),
            b"/run/p/\xff\xfe/mounts"
        );
        assert_eq!(mounts[3].super_options, "rw,size=10k");
    }

    #[test]
    fn a_malformed_line_fails_the_whole_read() {
        assert!(parse(b"22 1 0:21 / / rw - ext4\n").is_err());
        assert!(parse(b"garbage\n").is_err());
    }

    #[test]
    fn escapes_decode_and_odd_backslashes_stay() {
        assert_eq!(unescape(b"/a\\011b\\134"), b"/a\tb\\");
        assert_eq!(unescape(b"/odd\\"), b"/odd\\");
        assert_eq!(unescape(b"/x\\9zz"), b"/x\\9zz");
        assert_eq!(unescape(b"/big\\777"), b"/big\\777");
        assert_eq!(unescape(b"/ff\\377"), b"/ff\xff");
    }

    #[test]
    fn this_process_mounts_are_read() {
        let mounts = mounts().unwrap();
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(mounts_under(Path::new("/proc"))
            .unwrap()
            .contains(&PathBuf::from("/proc")));
    }
}
