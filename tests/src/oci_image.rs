//! A busybox OCI image built from Debian's `busybox-static`, as an OCI
//! image-layout tar that `ctr images import` takes. Reproducible: entries
//! sorted, mtime 0, uid/gid 0; the layer is an uncompressed tar, so its
//! digest is also its diff id.

use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BUSYBOX: &str = "/bin/busybox";

/// `sha256:<hex>` of `data`.
fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    // Paths here are short and ASCII; set_path only fails on longer ones.
    let _ = header.set_path(path);
    header
}

fn append_file(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
) -> Result<(), String> {
    let mut header = header(path, data.len() as u64, mode, tar::EntryType::Regular);
    header.set_cksum();
    builder
        .append(&header, data)
        .map_err(|err| format!("tar {path}: {err}"))
}

fn append_dir(builder: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> Result<(), String> {
    let mut header = header(path, 0, mode, tar::EntryType::Directory);
    header.set_cksum();
    builder
        .append(&header, std::io::empty())
        .map_err(|err| format!("tar {path}: {err}"))
}

fn append_symlink(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    target: &str,
) -> Result<(), String> {
    let mut header = header(path, 0, 0o777, tar::EntryType::Symlink);
    header
        .set_link_name(target)
        .map_err(|err| format!("tar {path}: {err}"))?;
    header.set_cksum();
    builder
        .append(&header, std::io::empty())
        .map_err(|err| format!("tar {path}: {err}"))
}

/// The applets `busybox --list` names.
fn applets() -> Result<Vec<String>, String> {
    let output = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(|err| format!("{BUSYBOX} --list: {err} (apt-get install busybox-static)"))?;
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/') && *name != "busybox")
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The rootfs layer: busybox with one symlink per applet in /bin.
pub fn busybox_layer() -> Result<Vec<u8>, String> {
    let busybox = std::fs::read(BUSYBOX).map_err(|err| format!("reading {BUSYBOX}: {err}"))?;
    let mut builder = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        append_dir(&mut builder, dir, mode)?;
    }
    append_file(&mut builder, "bin/busybox", 0o755, &busybox)?;
    for applet in applets()? {
        append_symlink(&mut builder, &format!("bin/{applet}"), "busybox")?;
    }
    append_file(
        &mut builder,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    )?;
    append_file(&mut builder, "etc/group", 0o644, b"root:x:0:\n")?;
    builder
        .into_inner()
        .map_err(|err| format!("finishing the layer: {err}"))
}

/// Writes the image-layout tar for `name` (for example
/// `docker.io/library/busybox:microvm`) to `dir`, returns its path.
pub fn write_busybox_image(dir: &Path, name: &str) -> Result<PathBuf, String> {
    write_busybox_image_running(dir, name, &["/bin/sh"], "busybox-oci.tar")
}

/// A pause image for CRI sandboxes: busybox whose command sleeps until it
/// is killed (CRI's pod needs a sandbox process that keeps running).
pub fn write_pause_image(dir: &Path, name: &str) -> Result<PathBuf, String> {
    write_busybox_image_running(dir, name, &["/bin/sleep", "2147483647"], "pause-oci.tar")
}

/// The busybox image with `cmd` as its command, written to `dir/file`.
pub fn write_busybox_image_running(
    dir: &Path,
    name: &str,
    cmd: &[&str],
    file: &str,
) -> Result<PathBuf, String> {
    let layer = busybox_layer()?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "microvm-tests: Debian busybox-static"}]
    }))
    .map_err(|err| err.to_string())?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len()
        }]
    }))
    .map_err(|err| err.to_string())?;
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest")
            }
        }]
    }))
    .map_err(|err| err.to_string())?;

    let mut archive = tar::Builder::new(Vec::new());
    append_file(
        &mut archive,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append_file(&mut archive, "index.json", 0o644, &index)?;
    append_dir(&mut archive, "blobs", 0o755)?;
    append_dir(&mut archive, "blobs/sha256", 0o755)?;
    let mut blobs = [
        (config_digest, config),
        (layer_digest, layer),
        (manifest_digest, manifest),
    ];
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    for (blob_digest, data) in &blobs {
        let hex = blob_digest.trim_start_matches("sha256:");
        append_file(&mut archive, &format!("blobs/sha256/{hex}"), 0o644, data)?;
    }
    let bytes = archive
        .into_inner()
        .map_err(|err| format!("finishing the archive: {err}"))?;
    let path = dir.join(file);
    std::fs::write(&path, bytes).map_err(|err| format!("writing {}: {err}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn members(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut reader = tar::Archive::new(archive);
        reader
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                (path, data)
            })
            .collect()
    }

    #[test]
    fn image_layout_is_consistent_and_reproducible() {
        if !Path::new(BUSYBOX).is_file() {
            eprintln!("skipped: {BUSYBOX} missing (busybox-static)");
            return;
        }
        let dir = crate::harness::TempDir::new("oci");
        let path = write_busybox_image(dir.path(), "docker.io/library/busybox:microvm").unwrap();
        let first = std::fs::read(&path).unwrap();
        write_busybox_image(dir.path(), "docker.io/library/busybox:microvm").unwrap();
        assert_eq!(first, std::fs::read(&path).unwrap(), "not reproducible");

        let entries = members(&first);
        let find = |name: &str| {
            entries
                .iter()
                .find(|(path, _)| path == name)
                .map(|(_, data)| data.clone())
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let index: serde_json::Value = serde_json::from_slice(&find("index.json")).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest_blob = find(&format!("blobs/sha256/{}", &manifest_digest[7..]));
        assert_eq!(digest(&manifest_blob), manifest_digest);
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_blob).unwrap();
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        let layer = find(&format!("blobs/sha256/{}", &layer_digest[7..]));
        assert_eq!(digest(&layer), layer_digest);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        let layer_entries = members(&layer);
        assert!(layer_entries.iter().any(|(path, _)| path == "bin/busybox"));
        assert!(layer_entries.iter().any(|(path, _)| path == "bin/uname"));
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "docker.io/library/busybox:microvm"
        );
    }
}
