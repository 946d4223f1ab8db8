//! The initramfs: a newc cpio with the static `microvm-agent` as `/init` and
//! only what it needs before devtmpfs is up (`/dev/console`, mount points).
//! The debug variant adds Debian's static busybox as `/bin/sh`.
//!
//! Reproducible: entries sorted by path, uid/gid 0, mtime 0, inode numbers
//! by position. The file is cached under `<cache>/initramfs/`, named by a
//! hash of its bytes, so an unchanged agent gives the same path.

use crate::cache;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the agent is built for: static glibc (`+crt-static`), since no
/// musl target can be installed here.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Kept apart from the host build's target dir so neither evicts the other.
pub const AGENT_TARGET_SUBDIR: &str = "guest";
/// Where the debug variant's shell comes from (Debian `busybox-static`).
pub const BUSYBOX_PATH: &str = "/bin/busybox";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Fixed mtime of every entry.
const MTIME: u32 = 0;
const S_IFMT: u32 = 0o170000;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot start cargo to build the agent")]
    CargoSpawn(#[source] std::io::Error),
    #[error("building the static agent failed ({status}):\n{stderr_tail}")]
    CargoFailed {
        status: std::process::ExitStatus,
        stderr_tail: String,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a statically linked x86-64 ELF (it would not run as /init)")]
    NotStatic(PathBuf),
    #[error("installing {BUSYBOX_PACKAGE} with apt-get failed: {0}")]
    BusyboxInstall(String),
    #[error("entry {0:?} does not fit a newc archive (over 4 GiB)")]
    TooLarge(String),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// What pods boot: `/init` and nothing else to run.
    Release,
    /// Adds `/bin/busybox` and `/bin/sh`; the agent runs the shell on the
    /// console when the command line has `microvm_debug_shell=1`.
    Debug,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    Symlink(String),
}

/// One archive member. `path` is relative to the archive root ("dev/console").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// Permission bits only; the file type comes from `kind`.
    pub permissions: u32,
    pub kind: EntryKind,
}

impl Entry {
    pub fn dir(path: &str, permissions: u32) -> Self {
        Self {
            path: path.to_owned(),
            permissions,
            kind: EntryKind::Dir,
        }
    }

    pub fn file(path: &str, permissions: u32, data: Vec<u8>) -> Self {
        Self {
            path: path.to_owned(),
            permissions,
            kind: EntryKind::File(data),
        }
    }

    fn mode(&self) -> u32 {
        let file_type = match self.kind {
            EntryKind::Dir => 0o040000,
            EntryKind::File(_) => 0o100000,
            EntryKind::CharDevice { .. } => 0o020000,
            EntryKind::Symlink(_) => 0o120000,
        };
        file_type | (self.permissions & !S_IFMT)
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            EntryKind::File(data) => data,
            EntryKind::Symlink(target) => target.as_bytes(),
            EntryKind::Dir | EntryKind::CharDevice { .. } => &[],
        }
    }
}

/// Writes `entries` as a newc archive, sorted by path whatever their order,
/// so the same set of entries always gives the same bytes.
pub fn write_newc<W: Write>(entries: &[Entry], mut out: W) -> Result<W, InitramfsError> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let io_error = |source| InitramfsError::Write {
        path: PathBuf::from("<initramfs>"),
        source,
    };
    for (index, entry) in sorted.into_iter().enumerate() {
        let data = entry.data();
        let size =
            u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge(entry.path.clone()))?;
        let (rdev_major, rdev_minor) = match entry.kind {
            EntryKind::CharDevice { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let inode =
            u32::try_from(index + 1).map_err(|_| InitramfsError::TooLarge(entry.path.clone()))?;
        let mut writer = cpio::NewcBuilder::new(&entry.path)
            .ino(inode)
            .mode(entry.mode())
            .uid(0)
            .gid(0)
            .nlink(if entry.kind == EntryKind::Dir { 2 } else { 1 })
            .mtime(MTIME)
            .rdev_major(rdev_major)
            .rdev_minor(rdev_minor)
            .write(out, size);
        writer.write_all(data).map_err(io_error)?;
        out = writer.finish().map_err(io_error)?;
    }
    cpio::newc::trailer(out).map_err(io_error)
}

/// The archive's members for `variant`, given the agent binary (and, for
/// the debug variant, busybox).
pub fn entries(agent: Vec<u8>, busybox: Option<Vec<u8>>) -> Vec<Entry> {
    let mut entries = vec![
        Entry::dir("dev", 0o755),
        // The kernel opens /dev/console for init's stdio before anything is
        // mounted, so the node must be in the archive itself.
        Entry {
            path: "dev/console".to_owned(),
            permissions: 0o600,
            kind: EntryKind::CharDevice { major: 5, minor: 1 },
        },
        Entry::file("init", 0o755, agent),
        Entry::dir("proc", 0o555),
        Entry::dir("sys", 0o555),
    ];
    if let Some(busybox) = busybox {
        entries.push(Entry::dir("bin", 0o755));
        entries.push(Entry::file("bin/busybox", 0o755, busybox));
        entries.push(Entry {
            path: "bin/sh".to_owned(),
            permissions: 0o777,
            kind: EntryKind::Symlink("busybox".to_owned()),
        });
    }
    entries
}

/// The built initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsArtifact {
    pub path: PathBuf,
    pub variant: Variant,
    /// The static agent binary that went in as `/init`.
    pub agent: PathBuf,
}

/// Builds the static agent, then writes the initramfs into the cache if an
/// identical one is not already there.
pub fn initramfs(variant: Variant) -> Result<InitramfsArtifact, InitramfsError> {
    let agent_path = build_agent()?;
    let agent = read(&agent_path)?;
    if !is_static_elf(&agent) {
        return Err(InitramfsError::NotStatic(agent_path));
    }
    let busybox = match variant {
        Variant::Release => None,
        Variant::Debug => Some(busybox()?),
    };
    let archive = write_newc(&entries(agent, busybox), Vec::new())?;
    let digest = Sha256::digest(&archive);
    let hash: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let dir = cache::cache_root().join("initramfs");
    let path = dir.join(format!("{}-{hash}.cpio", variant.name()));
    if !path.is_file() {
        write_atomically(&dir, &path, &archive)?;
        tracing::info!("wrote {}", path.display());
    }
    Ok(InitramfsArtifact {
        path,
        variant,
        agent: agent_path,
    })
}

/// Static glibc, stripped (the initramfs is copied and unpacked at every
/// boot), and packed relative relocations (DT_RELR): the static-pie
/// start-up reads a few KiB of them instead of a ~550 KiB RELA table whose
/// pages then stay resident in the agent for the VM's life.
pub const AGENT_RUSTFLAGS: &str =
    "-C target-feature=+crt-static -C strip=symbols -C link-arg=-Wl,-z,pack-relative-relocs";

/// `RUSTFLAGS=<AGENT_RUSTFLAGS> CARGO_PROFILE_RELEASE_LTO=fat
/// CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 cargo build --target
/// x86_64-unknown-linux-gnu --release -p microvm-agent --target-dir
/// target/guest`.
pub fn build_agent() -> Result<PathBuf, InitramfsError> {
    let repo = cache::repo_root();
    let target_dir = repo.join("target").join(AGENT_TARGET_SUBDIR);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(&repo)
        .args([
            "build",
            "--release",
            "-p",
            "microvm-agent",
            "--target",
            AGENT_TARGET,
        ])
        .arg("--manifest-path")
        .arg(repo.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", AGENT_RUSTFLAGS)
        // Whole-program LTO in one codegen unit, for this build only (its
        // own target dir): less code and fewer relocated vtables than the
        // workspace's thin LTO; the agent's idle RSS measured 4.67 MiB
        // with thin LTO, 4.00 MiB with this.
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        // Set by an outer cargo (tests) and stronger than RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(InitramfsError::CargoSpawn)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        return Err(InitramfsError::CargoFailed {
            status: output.status,
            stderr_tail: tail,
        });
    }
    Ok(target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join("microvm-agent"))
}

/// Debian's static busybox, installed with apt if missing.
fn busybox() -> Result<Vec<u8>, InitramfsError> {
    let path = Path::new(BUSYBOX_PATH);
    if !path.is_file() {
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", BUSYBOX_PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|err| InitramfsError::BusyboxInstall(err.to_string()))?;
        if !status.success() {
            return Err(InitramfsError::BusyboxInstall(status.to_string()));
        }
    }
    let data = read(path)?;
    if !is_static_elf(&data) {
        return Err(InitramfsError::NotStatic(path.to_path_buf()));
    }
    Ok(data)
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write_atomically(dir: &Path, path: &Path, data: &[u8]) -> Result<(), InitramfsError> {
    let write_error = |source| InitramfsError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(write_error)?;
    // Unique per call: two threads may write the same archive at once.
    static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".tmp-{}-{serial}", std::process::id()));
    std::fs::write(&tmp, data).map_err(write_error)?;
    std::fs::rename(&tmp, path).map_err(write_error)
}

/// True for a 64-bit little-endian x86-64 ELF with no PT_INTERP (no dynamic
/// loader to find at boot). Hand-written: it reads three header fields, not
/// worth an ELF crate.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) || u16_at(0x12) != Some(EM_X86_64)
    {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|index| {
        let at = phoff.saturating_add(index.saturating_mul(usize::from(phentsize)));
        matches!(u32_at(at), Some(p_type) if p_type != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Member {
        name: String,
        mode: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Reads a newc archive back with the crate's reader.
    fn read_back(archive: &[u8]) -> Vec<Member> {
        let mut members = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let entry = reader.entry();
            let mut member = Member {
                name: entry.name().to_owned(),
                mode: entry.mode(),
                mtime: entry.mtime(),
                rdev: (entry.rdev_major(), entry.rdev_minor()),
                data: Vec::new(),
            };
            reader.read_to_end(&mut member.data).unwrap();
            members.push(member);
            rest = reader.finish().unwrap();
        }
        members
    }

    #[test]
    fn archive_is_sorted_with_fixed_metadata() {
        let archive = write_newc(&entries(b"agent".to_vec(), None), Vec::new()).unwrap();
        let members = read_back(&archive);
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "proc", "sys"]);
        assert!(members.iter().all(|m| m.mtime == MTIME));
        let console = &members[1];
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        let init = &members[2];
        assert_eq!(init.mode, 0o100755);
        assert_eq!(init.data, b"agent");
    }

    #[test]
    fn same_entries_in_any_order_give_the_same_bytes() {
        let entries = entries(b"agent".to_vec(), Some(b"busybox".to_vec()));
        let mut reversed = entries.clone();
        reversed.reverse();
        let a = write_newc(&entries, Vec::new()).unwrap();
        let b = write_newc(&reversed, Vec::new()).unwrap();
        assert_eq!(a, b);
        let c = write_newc(&self::entries(b"agent2".to_vec(), None), Vec::new()).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn debug_variant_has_a_shell_symlink() {
        let archive = write_newc(
            &entries(b"agent".to_vec(), Some(b"bb".to_vec())),
            Vec::new(),
        )
        .unwrap();
        let members = read_back(&archive);
        let sh = members.iter().find(|m| m.name == "bin/sh").unwrap();
        assert_eq!(sh.mode & S_IFMT, 0o120000);
        assert_eq!(sh.data, b"busybox");
        // Parents come before children.
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert!(names.iter().position(|n| *n == "bin") < names.iter().position(|n| *n == "bin/sh"));
    }

    #[test]
    fn static_elf_detection() {
        // This test binary is dynamically linked (it has an interpreter).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&[]));
        // A minimal ELF header with no program headers counts as static.
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        header[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        assert!(is_static_elf(&header));
        if Path::new(BUSYBOX_PATH).is_file() {
            assert!(is_static_elf(&std::fs::read(BUSYBOX_PATH).unwrap()));
        }
    }
}
