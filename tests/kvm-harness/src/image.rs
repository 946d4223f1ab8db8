//! L1's kernel and initramfs: Debian's cloud kernel (`apt-get download`,
//! `dpkg -x`, never installed), busybox, the modules L1 needs and the
//! stage-1 init, cached under `<cache>/l1-<kernel release>_<version>-<hash>`.
//! The hash covers everything else that goes in, so a changed module list
//! or init script builds a new image; a new kernel version in apt's lists
//! does too.

use crate::modules::{self, ModuleError};
use microvm_guest_image::initramfs::{write_newc, Entry, EntryKind};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage that names the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "/bin/busybox";
const INIT_SCRIPT: &str = include_str!("init.sh");
/// Written last into a complete image directory.
const COMPLETE: &str = "complete";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot find the L1 kernel package: {0} (apt-get update?)")]
    Resolve(String),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("the kernel package {0} holds no boot/vmlinuz-*")]
    NoVmlinuz(PathBuf),
    #[error("{BUSYBOX} is missing: apt-get install busybox-static")]
    NoBusybox,
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A ready L1 image.
#[derive(Debug, Clone)]
pub struct L1Image {
    /// The kernel release (`uname -r` in L1), e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The package version, e.g. `6.1.192-3`.
    pub version: String,
    pub kernel: PathBuf,
    /// busybox, the modules and stage 1; the per-run archive goes after it.
    pub initramfs: PathBuf,
}

/// The image for the cloud kernel apt names now, built if it is not in
/// `cache` yet. When apt cannot name one (no package lists, no mirror), the
/// newest complete image in the cache.
pub fn ensure(cache: &Path) -> Result<L1Image, ImageError> {
    let package = match resolve_package_cached(cache) {
        Ok(package) => package,
        Err(err) => return newest_cached(cache).ok_or(err),
    };
    let busybox = std::fs::read(BUSYBOX).map_err(|_| ImageError::NoBusybox)?;
    let mut hash = Sha256::new();
    hash.update(INIT_SCRIPT.as_bytes());
    hash.update(modules::WANTED.join(",").as_bytes());
    hash.update(b"unsigned,pvh");
    hash.update(&busybox);
    let digest = hash.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let dir = cache.join(format!("l1-{}_{}-{hex}", package.release, package.version));
    let image = L1Image {
        release: package.release.clone(),
        version: package.version.clone(),
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
    };
    if dir.join(COMPLETE).exists() {
        return Ok(image);
    }
    build(cache, &dir, &package, busybox)?;
    Ok(image)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Package {
    name: String,
    release: String,
    version: String,
}

/// apt's package lists; `apt-get update` replaces files in it, which
/// changes its mtime.
const APT_LISTS: &str = "/var/lib/apt/lists";

#[derive(serde::Serialize, serde::Deserialize)]
struct Resolved {
    lists_mtime_ns: u128,
    package: Package,
}

fn lists_mtime_ns() -> Option<u128> {
    let modified = std::fs::metadata(APT_LISTS).ok()?.modified().ok()?;
    Some(
        modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos(),
    )
}

/// [`resolve_package`], remembered until apt's lists change: asking
/// apt-cache costs seconds, and every nested run would pay them.
fn resolve_package_cached(cache: &Path) -> Result<Package, ImageError> {
    let file = cache.join("resolved.json");
    let mtime = lists_mtime_ns();
    if let Some(resolved) = std::fs::read(&file)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Resolved>(&bytes).ok())
        .filter(|resolved| Some(resolved.lists_mtime_ns) == mtime)
    {
        return Ok(resolved.package);
    }
    let package = resolve_package()?;
    if let Some(lists_mtime_ns) = lists_mtime_ns() {
        let resolved = Resolved {
            lists_mtime_ns,
            package: package.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&resolved) {
            let _ = std::fs::create_dir_all(cache);
            let _ = std::fs::write(&file, bytes);
        }
    }
    Ok(package)
}

fn run(command: &mut Command) -> Result<String, ImageError> {
    let shown = format!("{command:?}").replace('"', "");
    let output = command.output().map_err(|err| ImageError::Command {
        command: shown.clone(),
        detail: err.to_string(),
    })?;
    if !output.status.success() {
        return Err(ImageError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `linux-image-<release>` and its version, from apt's lists; after one
/// `apt-get update` if the lists do not know the metapackage (a fresh
/// machine).
fn resolve_package() -> Result<Package, ImageError> {
    match resolve_from_lists() {
        Ok(package) => Ok(package),
        Err(_) => {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            resolve_from_lists()
        }
    }
}

fn resolve_from_lists() -> Result<Package, ImageError> {
    let depends = run(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))?;
    let name = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|name| name.starts_with("linux-image-"))
        .ok_or_else(|| ImageError::Resolve(format!("{KERNEL_METAPACKAGE} depends on no image")))?
        .to_owned();
    let release = name.trim_start_matches("linux-image-").to_owned();
    let shown = run(Command::new("apt-cache").args(["show", "--no-all-versions", &name]))?;
    let version = shown
        .lines()
        .find_map(|line| line.strip_prefix("Version: "))
        .ok_or_else(|| ImageError::Resolve(format!("{name} has no version")))?
        .trim()
        .to_owned();
    Ok(Package {
        name,
        release,
        version,
    })
}

fn newest_cached(cache: &Path) -> Option<L1Image> {
    let entries = std::fs::read_dir(cache).ok()?;
    entries
        .flatten()
        .filter(|entry| entry.path().join(COMPLETE).exists())
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.strip_prefix("l1-")?.to_owned();
            let (release, rest) = name.split_once('_')?;
            let version = rest.rsplit_once('-')?.0.to_owned();
            let modified = entry.metadata().ok()?.modified().ok()?;
            Some((
                modified,
                L1Image {
                    release: release.to_owned(),
                    version,
                    kernel: entry.path().join("vmlinuz"),
                    initramfs: entry.path().join("initramfs.cpio"),
                },
            ))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, image)| image)
}

/// Downloads the package (kept in `<cache>/debs`), extracts it into a
/// scratch dir, and writes the kernel and initramfs into `dir` atomically.
fn build(cache: &Path, dir: &Path, package: &Package, busybox: Vec<u8>) -> Result<(), ImageError> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(io_err("cannot create", &debs))?;
    let deb = debs.join(format!(
        "{}_{}_amd64.deb",
        package.name,
        package.version.replace(':', "%3a")
    ));
    if !deb.exists() {
        eprintln!(
            "microvm-kvm-harness: downloading {} {} (L1's kernel)",
            package.name, package.version
        );
        run(Command::new("apt-get")
            .current_dir(&debs)
            // apt's download sandbox user cannot write to a root-owned dir.
            .args(["-o", "APT::Sandbox::User=root", "download", "-qq"])
            .arg(format!("{}={}", package.name, package.version)))?;
    }
    let scratch = tempfile::Builder::new()
        .prefix(".l1-build-")
        .tempdir_in(cache)
        .map_err(io_err("cannot create a scratch dir in", cache))?;
    let extracted = scratch.path().join("x");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extracted))?;
    let kernel = extracted
        .join("boot")
        .join(format!("vmlinuz-{}", package.release));
    if !kernel.is_file() {
        return Err(ImageError::NoVmlinuz(deb));
    }
    let module_dir = extracted.join("lib/modules").join(&package.release);
    let order = modules::load_order(&module_dir, modules::WANTED)?;

    let staged = scratch.path().join("image");
    std::fs::create_dir_all(&staged).map_err(io_err("cannot create", &staged))?;
    let bzimage = std::fs::read(&kernel).map_err(io_err("cannot read", &kernel))?;
    // The unpacked ELF when the payload is LZ4 (QEMU boots it through its
    // PVH note), else the bzImage as it is.
    let boot = pvh_vmlinux(&bzimage).unwrap_or(bzimage);
    let kernel_out = staged.join("vmlinuz");
    std::fs::write(&kernel_out, boot).map_err(io_err("cannot write", &kernel_out))?;
    let mut entries = base_entries(busybox);
    let mut names = String::new();
    for module in &order {
        let bytes = std::fs::read(&module.path).map_err(io_err("cannot read", &module.path))?;
        entries.push(Entry::file(
            &format!("lib/modules/{}.ko", module.name),
            0o644,
            modules::without_signature(&bytes).to_vec(),
        ));
        names.push_str(&module.name);
        names.push('\n');
    }
    entries.push(Entry::file("harness/modules", 0o644, names.into_bytes()));
    write_archive(&entries, &staged.join("initramfs.cpio"))?;
    std::fs::write(staged.join(COMPLETE), "").map_err(io_err("cannot write", &staged))?;
    match std::fs::rename(&staged, dir) {
        Ok(()) => {}
        // Another run built the same image meanwhile.
        Err(_) if dir.join(COMPLETE).exists() => {}
        Err(err) => return Err(io_err("cannot move the image to", dir)(err)),
    }
    remove_other_images(cache, dir);
    Ok(())
}

/// Images of older kernels or inputs are rebuilt from the kept .deb if
/// ever needed again; only the newest stays.
fn remove_other_images(cache: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_image = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with("l1-"));
        if is_image && path != keep {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// The kernel ELF inside a bzImage whose payload is LZ4 (the kernel's
/// "legacy" LZ4 framing: a magic number, then blocks of at most 8 MiB, each
/// after its little-endian u32 length; the build appends the unpacked size,
/// which reads as a short final "block" and ends the stream).
fn pvh_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    const LZ4_LEGACY_BLOCK: usize = 8 << 20;
    let u32_at = |at: usize| -> Option<usize> {
        let bytes = bzimage.get(at..at + 4)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
    };
    // The boot protocol's setup header: setup_sects, then the payload's
    // place relative to the protected-mode code after the setup sectors.
    let setup_sects = match *bzimage.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bzimage.get(start..start + u32_at(0x24c)?)?;
    let mut rest = payload.strip_prefix(&LZ4_LEGACY_MAGIC)?;
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while rest.len() > 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        let Some(compressed) = rest.get(4..4 + len) else {
            break;
        };
        let n = lz4_flex::block::decompress_into(compressed, &mut block).ok()?;
        out.extend_from_slice(&block[..n]);
        rest = &rest[4 + len..];
    }
    // Only an ELF with the PVH entry note boots this way.
    (out.starts_with(b"\x7fELF") && out.windows(4).any(|w| w == b"Xen\0")).then_some(out)
}

fn base_entries(busybox: Vec<u8>) -> Vec<Entry> {
    let mut entries: Vec<Entry> = ["bin", "dev", "proc", "sys", "lib", "lib/modules", "harness"]
        .into_iter()
        .map(|dir| Entry::dir(dir, 0o755))
        .collect();
    entries.push(Entry {
        path: "dev/console".into(),
        permissions: 0o600,
        kind: EntryKind::CharDevice { major: 5, minor: 1 },
    });
    entries.push(Entry::file("bin/busybox", 0o755, busybox));
    entries.push(Entry {
        path: "bin/sh".into(),
        permissions: 0o777,
        kind: EntryKind::Symlink("busybox".into()),
    });
    entries.push(Entry::file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec()));
    entries
}

fn write_archive(entries: &[Entry], path: &Path) -> Result<(), ImageError> {
    let file = std::fs::File::create(path).map_err(io_err("cannot create", path))?;
    let mut out = std::io::BufWriter::new(file);
    out = write_newc(entries, out).map_err(|err| ImageError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source: std::io::Error::other(err.to_string()),
    })?;
    use std::io::Write;
    out.flush().map_err(io_err("cannot write", path))
}

/// The initramfs for one run: the cached base with the run's own archive
/// appended (the kernel unpacks concatenated archives in order).
pub fn initramfs_for_run(
    image: &L1Image,
    command_json: &[u8],
    exe: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    std::fs::copy(&image.initramfs, out).map_err(io_err("cannot copy", &image.initramfs))?;
    let entries = [
        Entry::file("harness/command.json", 0o644, command_json.to_vec()),
        Entry::file(
            "harness/exe",
            0o644,
            exe.as_os_str().as_encoded_bytes().to_vec(),
        ),
    ];
    let mut extra = Vec::new();
    extra = write_newc(&entries, extra).map_err(|err| ImageError::Io {
        what: "cannot write",
        path: out.to_path_buf(),
        source: std::io::Error::other(err.to_string()),
    })?;
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(out)
        .and_then(|mut file| file.write_all(&extra))
        .map_err(io_err("cannot append to", out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_script_names_every_failure_and_ends_in_stage_two() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SCRIPT.contains("cannot load kernel module $module"));
        assert!(INIT_SCRIPT.contains("no /dev/kvm in L1"));
        assert!(INIT_SCRIPT.trim_end().ends_with(
            "exec switch_root /newroot \"$exe\" l1-init /run/microvm-kvm-harness/command.json"
        ));
    }

    #[test]
    fn a_cached_image_is_found_by_its_directory_name() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache
            .path()
            .join("l1-6.1.0-57-cloud-amd64_6.1.192-3-abcdef012345");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(newest_cached(cache.path()).is_none(), "incomplete");
        std::fs::write(dir.join(COMPLETE), "").unwrap();
        let image = newest_cached(cache.path()).unwrap();
        assert_eq!(image.release, "6.1.0-57-cloud-amd64");
        assert_eq!(image.version, "6.1.192-3");
        assert_eq!(image.kernel, dir.join("vmlinuz"));
    }
}
