//! The probe guest (`vmm/probe-guest`): a tiny PVH ELF that tests our VMM's
//! boot path, serial, debug port, virtio-vsock and virtio-blk. Built on demand
//! by the tests and benchmarks, and bootable under QEMU for comparison.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `isa-debug-exit` turns a write of `s` to its port into QEMU exit code
/// `s * 2 + 1`.
pub const QEMU_DEBUG_EXIT_PORT: &str = "0x441";

use crate::harness::repo_root;

/// What the probe finds in sector 0 of its disk (and prints).
pub const DISK_SECTOR0: &[u8] = b"hello-from-host!";
/// The host port the probe's vsock connection goes to: `<uds>_52`.
pub const ECHO_PORT: u32 = 52;

/// A 1 MiB disk image whose sector 0 starts with [`DISK_SECTOR0`].
pub fn write_disk(path: &Path) -> std::io::Result<()> {
    let mut data = vec![0u8; 1 << 20];
    data[..DISK_SECTOR0.len()].copy_from_slice(DISK_SECTOR0);
    std::fs::write(path, data)
}

/// Where the VMM connects the probe's vsock stream for the socket `uds`.
pub fn echo_socket_path(uds: &Path) -> PathBuf {
    PathBuf::from(format!("{}_{ECHO_PORT}", uds.display()))
}

/// Echoes the first connection on `listener` back to its sender; returns
/// what it received.
pub fn spawn_echo(listener: std::os::unix::net::UnixListener) -> std::thread::JoinHandle<Vec<u8>> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return Vec::new();
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        seen
    })
}

/// Builds the probe guest once per process and returns the ELF's path.
///
/// Runs its own cargo with its own target directory (`target/probe-guest`),
/// so it never waits on the lock of the cargo that runs the tests.
pub fn probe_guest_elf() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build(&repo_root()).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build(root: &Path) -> Result<PathBuf> {
    let package = root.join("vmm/probe-guest");
    let target_dir = root.join("target/probe-guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(package.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Cargo reads `.cargo/config.toml` from the working directory up:
        // the probe's own holds its code-generation flags.
        .current_dir(&package);
    // Flags meant for the outer build (static-pie, a target triple, another
    // target dir) would override the probe's config and break its link.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "building the probe guest failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = target_dir.join("release/probe-guest");
    if !elf.is_file() {
        bail!("cargo succeeded but {} is missing", elf.display());
    }
    Ok(elf)
}

/// A QEMU `-M microvm` command line that boots `kernel` (the probe) the way
/// the tests and the benchmark compare against: serial on stdio, the debug
/// exit device on the probe's shutdown port, modern virtio-mmio (QEMU
/// defaults to legacy, which the probe refuses). `accel` is `tcg` or `kvm`;
/// on a PVM host `-cpu host` trips over MSR 0x10a, so KVM gets
/// `host,-arch-capabilities`.
pub fn qemu_microvm_command(kernel: &Path, accel: &str, append: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
    ])
    .arg(format!(
        "isa-debug-exit,iobase={QEMU_DEBUG_EXIT_PORT},iosize=1"
    ))
    .args(["-accel", accel])
    .args([
        "-cpu",
        if accel == "kvm" {
            "host,-arch-capabilities"
        } else {
            "max"
        },
    ])
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", append]);
    cmd
}

/// The status the probe wrote to its shutdown port, from QEMU's exit code.
pub fn qemu_guest_status(exit_code: Option<i32>) -> Option<u8> {
    let code = exit_code?;
    (code % 2 == 1)
        .then(|| u8::try_from(code / 2).ok())
        .flatten()
}

pub fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{run_with_timeout, TempDir};
    use std::time::Duration;

    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    struct Segment {
        kind: u32,
        offset: usize,
        paddr: u64,
        filesz: usize,
        memsz: u64,
    }

    fn segments(elf: &[u8]) -> Vec<Segment> {
        let (phoff, phentsize, phnum) = (
            u64_at(elf, 0x20) as usize,
            u16_at(elf, 0x36),
            u16_at(elf, 0x38),
        );
        assert_eq!(phentsize, 56);
        (0..usize::from(phnum))
            .map(|i| {
                let ph = phoff + i * 56;
                Segment {
                    kind: u32_at(elf, ph),
                    offset: u64_at(elf, ph + 8) as usize,
                    paddr: u64_at(elf, ph + 24),
                    filesz: u64_at(elf, ph + 32) as usize,
                    memsz: u64_at(elf, ph + 40),
                }
            })
            .collect()
    }

    /// The PVH entry from the Xen note, parsed the way linux-loader does.
    fn pvh_entry(elf: &[u8], note: &Segment) -> Option<u32> {
        let mut at = note.offset;
        while at + 12 <= note.offset + note.filesz {
            let (namesz, descsz, kind) = (
                u32_at(elf, at) as usize,
                u32_at(elf, at + 4) as usize,
                u32_at(elf, at + 8),
            );
            let name = &elf[at + 12..at + 12 + namesz];
            let desc = at + 12 + namesz.next_multiple_of(4);
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
                return Some(u32_at(elf, desc));
            }
            at = desc + descsz.next_multiple_of(4);
        }
        None
    }

    #[test]
    fn probe_elf_loads_at_1mib_with_a_pvh_note() {
        let elf = std::fs::read(probe_guest_elf().unwrap()).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(
            (elf[4], elf[5], u16_at(&elf, 0x12)),
            (2, 1, 62),
            "ELF64, LE, x86-64"
        );
        let segs = segments(&elf);
        let loads: Vec<&Segment> = segs.iter().filter(|s| s.kind == 1).collect();
        assert_eq!(loads.len(), 1, "one PT_LOAD");
        let load = loads[0];
        assert_eq!(load.paddr, 0x10_0000);
        let end = load.paddr + load.memsz;
        assert!(end < 0x20_0000, "image ends at {end:#x}: keep it small");
        let note = segs.iter().find(|s| s.kind == 4).expect("a PT_NOTE");
        let entry = u64::from(pvh_entry(&elf, note).expect("a Xen PHYS32_ENTRY note"));
        assert!((load.paddr..end).contains(&entry), "PVH entry {entry:#x}");
        let e_entry = u64_at(&elf, 0x18);
        assert!(
            (load.paddr..end).contains(&e_entry) && e_entry != entry,
            "64-bit entry {e_entry:#x}"
        );
    }

    #[test]
    fn qemu_exit_code_decodes_to_guest_status() {
        assert_eq!(qemu_guest_status(Some(1)), Some(0));
        assert_eq!(qemu_guest_status(Some(3)), Some(1));
        assert_eq!(qemu_guest_status(Some(0)), None);
        assert_eq!(qemu_guest_status(None), None);
    }

    /// Boots the probe under QEMU + TCG (works on any host). QEMU is a test
    /// dependency (scripts/install-deps.sh), so its absence is a failure.
    fn boot_under_qemu(append: &str, extra: &[&str]) -> Option<(Option<u8>, String)> {
        assert!(
            qemu_available(),
            "qemu-system-x86_64 is not installed: run scripts/install-deps.sh"
        );
        let elf = probe_guest_elf().unwrap();
        let mut cmd = qemu_microvm_command(&elf, "tcg", append);
        cmd.args(extra);
        let done = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
        Some((
            qemu_guest_status(done.code()),
            format!("{}{}", done.stdout, done.stderr),
        ))
    }

    #[test]
    fn probe_quick_boot_under_qemu_prints_and_powers_off() {
        let Some((status, out)) = boot_under_qemu("probe.quick=1", &[]) else {
            return;
        };
        assert_eq!(status, Some(0), "{out}");
        assert!(out.starts_with("probe: hello\n"), "{out}");
        assert!(out.contains("probe: done status=0\n"), "{out}");
        assert!(
            !out.contains("probe: boot"),
            "quick mode did more than hello: {out}"
        );
    }

    #[test]
    fn probe_reads_and_writes_virtio_blk_under_qemu() {
        let dir = TempDir::new("probe-qemu-blk");
        let disk = dir.join("disk.img");
        let mut image = vec![0u8; 1 << 20];
        image[..16].copy_from_slice(b"hello-probe-disk");
        image[512..1024].fill(0xaa);
        std::fs::write(&disk, image).unwrap();
        let drive = format!("file={},format=raw,if=none,id=d0", disk.display());
        let extra = ["-drive", &drive, "-device", "virtio-blk-device,drive=d0"];
        let Some((status, out)) = boot_under_qemu("console=ttyS0", &extra) else {
            return;
        };
        assert_eq!(status, Some(0), "{out}");
        for line in [
            "probe: boot pvh ram=127MiB",
            "probe: vsock absent",
            "probe: blk read hello-probe-disk",
            "probe: blk ok",
            "probe: done status=0",
        ] {
            assert!(out.contains(line), "missing {line:?} in:\n{out}");
        }
        let written = std::fs::read(&disk).unwrap();
        let mut expected = vec![0u8; 512];
        expected[..18].copy_from_slice(b"probe-blk-write-ok");
        assert_eq!(&written[512..1024], &expected[..], "sector 1");
    }

    #[test]
    fn probe_reports_a_legacy_device_as_failure_under_qemu() {
        let extra = [
            "-global",
            "virtio-mmio.force-legacy=true",
            "-drive",
            "file=/dev/null,format=raw,if=none,id=d0,readonly=on",
            "-device",
            "virtio-blk-device,drive=d0",
        ];
        let Some((status, out)) = boot_under_qemu("", &extra) else {
            return;
        };
        assert_eq!(status, Some(1), "{out}");
        assert!(
            out.contains("probe: blk FAIL legacy virtio-mmio version 1"),
            "{out}"
        );
        assert!(out.contains("probe: done status=1"), "{out}");
    }
}
