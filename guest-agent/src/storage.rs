//! Filesystems the host shares into the VM (rootfs and volumes): virtio-fs
//! by tag, virtio-blk disks found by serial or by virtio-mmio address.

use crate::oci::mounts::parse_options;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0}")]
    Invalid(String),
    #[error("no virtio-blk disk has serial {0:?}")]
    NoSuchSerial(String),
    #[error("no virtio-blk disk sits on the virtio-mmio device at {0:#x}")]
    NoSuchAddress(u64),
    #[error("{0} is already a storage mount")]
    AlreadyMounted(PathBuf),
    #[error("{0} is not a storage mount")]
    NotMounted(PathBuf),
    #[error("cannot create the mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {source_name} ({fstype}) on {target} failed")]
    Mount {
        source_name: String,
        fstype: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {target} failed")]
    Unmount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("scanning {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Invalid(_) => tonic::Code::InvalidArgument,
            Self::NoSuchSerial(_) | Self::NoSuchAddress(_) | Self::NotMounted(_) => {
                tonic::Code::NotFound
            }
            Self::AlreadyMounted(_) => tonic::Code::AlreadyExists,
            Self::Mount { .. } | Self::Unmount { .. } | Self::MountPoint { .. } => {
                tonic::Code::FailedPrecondition
            }
            Self::Scan { .. } => tonic::Code::Internal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSource {
    VirtioFs { tag: String },
    BlockSerial(String),
    BlockMmioAddress(u64),
}

#[derive(Debug, Clone)]
pub struct MountRequest {
    pub source: StorageSource,
    pub target: PathBuf,
    pub fstype: String,
    pub options: Vec<String>,
}

/// Storage mounts made through the API, so teardown can undo them.
pub struct Storage {
    /// /sys normally; tests point it at a fake tree.
    sysfs: PathBuf,
    /// /dev normally.
    dev: PathBuf,
    mounts: Mutex<HashMap<PathBuf, String>>,
}

impl Storage {
    pub fn new(sysfs: &Path, dev: &Path) -> Self {
        Self {
            sysfs: sysfs.to_path_buf(),
            dev: dev.to_path_buf(),
            mounts: Mutex::new(HashMap::new()),
        }
    }

    fn mounts(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, String>> {
        crate::lock::lock(&self.mounts)
    }

    /// The block devices under sysfs/block, by name.
    fn block_devices(&self) -> Result<Vec<String>, StorageError> {
        let dir = self.sysfs.join("block");
        let entries = std::fs::read_dir(&dir).map_err(|source| StorageError::Scan {
            path: dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The device node of the disk whose serial is `serial`.
    pub fn find_by_serial(&self, serial: &str) -> Result<PathBuf, StorageError> {
        for name in self.block_devices()? {
            let path = self.sysfs.join("block").join(&name).join("serial");
            if let Ok(found) = std::fs::read_to_string(&path) {
                if found.trim_end_matches(['\n', '\0']) == serial {
                    return Ok(self.dev.join(name));
                }
            }
        }
        Err(StorageError::NoSuchSerial(serial.to_owned()))
    }

    /// The device node of the disk on the virtio-mmio device at `address`:
    /// sysfs/block/<name> links to .../<address hex>.virtio_mmio/virtio<n>/block/<name>.
    pub fn find_by_mmio_address(&self, address: u64) -> Result<PathBuf, StorageError> {
        for name in self.block_devices()? {
            let Ok(link) = std::fs::read_link(self.sysfs.join("block").join(&name)) else {
                continue;
            };
            let matches = link.components().any(|component| {
                component
                    .as_os_str()
                    .to_str()
                    .and_then(|part| part.strip_suffix(".virtio_mmio"))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    == Some(address)
            });
            if matches {
                return Ok(self.dev.join(name));
            }
        }
        Err(StorageError::NoSuchAddress(address))
    }

    /// Mounts the request's source at its target; returns the source used.
    pub async fn mount(&self, request: MountRequest) -> Result<String, StorageError> {
        if !request.target.is_absolute() {
            return Err(StorageError::Invalid(format!(
                "target {:?} is not an absolute path",
                request.target
            )));
        }
        let (source, fstype) = match &request.source {
            StorageSource::VirtioFs { tag } => {
                if tag.is_empty() {
                    return Err(StorageError::Invalid("empty virtio-fs tag".into()));
                }
                (tag.clone(), "virtiofs".to_owned())
            }
            StorageSource::BlockSerial(serial) => {
                let device = self.find_by_serial(serial)?;
                (device.display().to_string(), request.fstype.clone())
            }
            StorageSource::BlockMmioAddress(address) => {
                let device = self.find_by_mmio_address(*address)?;
                (device.display().to_string(), request.fstype.clone())
            }
        };
        if fstype.is_empty() {
            return Err(StorageError::Invalid(format!(
                "a block device ({source}) needs an fstype"
            )));
        }
        {
            let mut mounts = self.mounts();
            if mounts.contains_key(&request.target) {
                return Err(StorageError::AlreadyMounted(request.target));
            }
            // Reserve the target while the mount runs.
            mounts.insert(request.target.clone(), source.clone());
        }
        let target = request.target.clone();
        let options = parse_options(&request.options);
        let source_for_mount = source.clone();
        let fstype_for_mount = fstype.clone();
        // A mount can block on the device (virtio-fs backend): off the
        // runtime's threads.
        let result = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&target).map_err(|source| StorageError::MountPoint {
                path: target.clone(),
                source,
            })?;
            let data = options.data.join(",");
            nix::mount::mount(
                Some(source_for_mount.as_str()),
                &target,
                Some(fstype_for_mount.as_str()),
                nix::mount::MsFlags::from_bits_truncate(options.flags),
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|errno| StorageError::Mount {
                source_name: source_for_mount.clone(),
                fstype: fstype_for_mount.clone(),
                target: target.clone(),
                source: errno.into(),
            })
        })
        .await
        .unwrap_or_else(|join| Err(StorageError::Invalid(format!("mount task failed: {join}"))));
        if let Err(err) = result {
            self.mounts().remove(&request.target);
            return Err(err);
        }
        tracing::info!(source, target = %request.target.display(), fstype, "storage mounted");
        Ok(source)
    }

    pub async fn unmount(&self, target: &Path) -> Result<(), StorageError> {
        if !self.mounts().contains_key(target) {
            return Err(StorageError::NotMounted(target.to_path_buf()));
        }
        let path = target.to_path_buf();
        tokio::task::spawn_blocking(move || {
            nix::mount::umount2(&path, nix::mount::MntFlags::empty())
        })
        .await
        .unwrap_or(Err(nix::errno::Errno::EINTR))
        .map_err(|errno| StorageError::Unmount {
            target: target.to_path_buf(),
            source: errno.into(),
        })?;
        self.mounts().remove(target);
        Ok(())
    }

    /// Lazily unmounts everything mounted through the API (teardown).
    pub fn unmount_all(&self) {
        let targets: Vec<PathBuf> = self.mounts().drain().map(|(target, _)| target).collect();
        for target in targets {
            if let Err(err) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting {}: {err}", target.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs/block tree with one virtio disk at 0xfeb00e00 (serial
    /// "rootfs") and one at 0xfeb01000 (no serial).
    fn fake_sysfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        for (addr, name, serial) in [
            ("feb00e00", "vda", Some("rootfs\n")),
            ("feb01000", "vdb", None),
        ] {
            let device = sys.join(format!(
                "devices/platform/{addr}.virtio_mmio/virtio0/block/{name}"
            ));
            std::fs::create_dir_all(&device).unwrap();
            if let Some(serial) = serial {
                std::fs::write(device.join("serial"), serial).unwrap();
            }
            std::fs::create_dir_all(sys.join("block")).unwrap();
            std::os::unix::fs::symlink(
                format!("../devices/platform/{addr}.virtio_mmio/virtio0/block/{name}"),
                sys.join("block").join(name),
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn disks_are_found_by_serial_and_by_mmio_address() {
        let sys = fake_sysfs();
        let storage = Storage::new(sys.path(), Path::new("/dev"));
        assert_eq!(
            storage.find_by_serial("rootfs").unwrap(),
            PathBuf::from("/dev/vda")
        );
        assert_eq!(
            storage.find_by_mmio_address(0xfeb0_1000).unwrap(),
            PathBuf::from("/dev/vdb")
        );
        let err = storage.find_by_serial("nope").unwrap_err();
        assert_eq!(err.grpc_code(), tonic::Code::NotFound);
        assert!(err.to_string().contains("\"nope\""));
        assert!(matches!(
            storage.find_by_mmio_address(0x1234),
            Err(StorageError::NoSuchAddress(0x1234))
        ));
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_mounting() {
        let sys = fake_sysfs();
        let storage = Storage::new(sys.path(), Path::new("/dev"));
        let relative = storage
            .mount(MountRequest {
                source: StorageSource::VirtioFs { tag: "x".into() },
                target: "relative".into(),
                fstype: String::new(),
                options: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(relative.grpc_code(), tonic::Code::InvalidArgument);
        let no_fstype = storage
            .mount(MountRequest {
                source: StorageSource::BlockSerial("rootfs".into()),
                target: "/mnt/x".into(),
                fstype: String::new(),
                options: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(no_fstype.grpc_code(), tonic::Code::InvalidArgument);
        assert!(matches!(
            storage.unmount(Path::new("/mnt/x")).await,
            Err(StorageError::NotMounted(_))
        ));
    }
}
