//! virtio-fs shares: a vhost-user back-end (virtiofsd) serves the file
//! system; the VMM only offers the device and hands the rings over.

use super::ConfigError;
use microvm_devices::virtio::fs::VhostUserFsConfig;
pub use microvm_devices::virtio::fs::FS_TAG_MAX_LEN;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

/// Most request queues one share may ask for; the back-end may allow fewer
/// (virtiofsd serves one), which is checked when the VMM connects.
pub const FS_MAX_REQUEST_QUEUES: u16 = 16;
/// Largest split virtqueue the virtio spec allows.
pub const FS_MAX_QUEUE_SIZE: u16 = 32_768;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The back-end's vhost-user socket (`virtiofsd --socket-path`). It must
    /// be listening before the VM starts.
    pub socket: PathBuf,
    /// What the guest mounts: `mount -t virtiofs TAG /mnt`.
    pub tag: String,
    /// Request queues. The device also has one high-priority queue, so it
    /// has `num_queues + 1` queues in all.
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    /// Maximum size of each queue (a power of two).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
}

fn default_num_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    1024
}

impl FsConfig {
    pub fn new(socket: PathBuf, tag: String) -> Self {
        Self {
            socket,
            tag,
            num_queues: default_num_queues(),
            queue_size: default_queue_size(),
        }
    }

    /// What the device model needs (after [`validate`](Self::validate)).
    pub fn device_config(&self) -> VhostUserFsConfig {
        VhostUserFsConfig {
            socket: self.socket.clone(),
            tag: self.tag.clone(),
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// Parses the `--fs` flag: `SOCKET,tag=TAG[,num_queues=N][,queue_size=N]`.
    pub fn from_cli(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(',');
        let socket = parts.next().filter(|s| !s.is_empty()).ok_or_else(|| {
            format!("{spec:?}: expected SOCKET,tag=TAG[,num_queues=N][,queue_size=N]")
        })?;
        let mut config = Self::new(socket.into(), String::new());
        let mut tag = None;
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{spec:?}: {part:?} is not KEY=VALUE"))?;
            let number = || {
                value
                    .parse::<u16>()
                    .map_err(|_| format!("{spec:?}: {key}={value:?} is not a number"))
            };
            match key {
                "tag" => tag = Some(value.to_owned()),
                "num_queues" => config.num_queues = number()?,
                "queue_size" => config.queue_size = number()?,
                _ => return Err(format!("{spec:?}: unknown key {key:?}")),
            }
        }
        config.tag = tag.ok_or_else(|| format!("{spec:?}: tag=TAG is required"))?;
        Ok(config)
    }

    /// Checks what can be checked before connecting. `index` names the entry
    /// in errors (`fs[1].tag`).
    pub(super) fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let tag_error = |reason: &'static str| ConfigError::FsTag {
            index,
            tag: self.tag.clone(),
            reason,
        };
        if self.tag.is_empty() {
            return Err(tag_error("it is empty"));
        }
        if self.tag.len() > FS_TAG_MAX_LEN {
            return Err(tag_error("it is longer than 36 bytes"));
        }
        if self.tag.contains('\0') {
            return Err(tag_error("it contains a NUL byte"));
        }
        if !(1..=FS_MAX_REQUEST_QUEUES).contains(&self.num_queues) {
            return Err(ConfigError::FsQueues {
                index,
                got: self.num_queues,
                max: FS_MAX_REQUEST_QUEUES,
            });
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > FS_MAX_QUEUE_SIZE {
            return Err(ConfigError::FsQueueSize {
                index,
                got: self.queue_size,
            });
        }
        let is_socket = std::fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket());
        if !is_socket {
            return Err(ConfigError::FsSocketMissing {
                index,
                path: self.socket.clone(),
            });
        }
        Ok(())
    }
}

/// Tags must differ, or the guest could not tell the shares apart.
pub(super) fn validate_all(shares: &[FsConfig]) -> Result<(), ConfigError> {
    for (index, share) in shares.iter().enumerate() {
        share.validate(index)?;
        if shares[..index].iter().any(|other| other.tag == share.tag) {
            return Err(ConfigError::FsDuplicateTag {
                index,
                tag: share.tag.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn temp_socket(name: &str) -> (PathBuf, UnixListener) {
        let path = std::env::temp_dir().join(format!(
            "microvm-fs-config-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let fs: FsConfig =
            serde_json::from_str(r#"{"socket": "/run/fs.sock", "tag": "microvm-shared"}"#).unwrap();
        assert_eq!(fs.num_queues, 1);
        assert_eq!(fs.queue_size, 1024);
        let err = serde_json::from_str::<FsConfig>(r#"{"socket": "/s", "tag": "t", "cache": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache"), "{err}");
    }

    #[test]
    fn cli_spec_parses() {
        let fs = FsConfig::from_cli("/run/fs.sock,tag=microvm-shared").unwrap();
        assert_eq!(
            fs,
            FsConfig::new("/run/fs.sock".into(), "microvm-shared".into())
        );
        let fs = FsConfig::from_cli("/s,queue_size=256,tag=t,num_queues=2").unwrap();
        assert_eq!(
            (fs.num_queues, fs.queue_size, fs.tag.as_str()),
            (2, 256, "t")
        );
        for bad in [
            "",
            "/s",
            ",tag=t",
            "/s,tag",
            "/s,tag=t,color=red",
            "/s,tag=t,queue_size=big",
        ] {
            assert!(FsConfig::from_cli(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        let (path, _listener) = temp_socket("validate");
        let good = FsConfig::new(path.clone(), "shared".into());
        validate_all(std::slice::from_ref(&good)).unwrap();
        let check = |fs: FsConfig| validate_all(&[fs]).unwrap_err().to_string();
        let err = check(FsConfig {
            tag: String::new(),
            ..good.clone()
        });
        assert!(err.contains("fs[0].tag") && err.contains("empty"), "{err}");
        let err = check(FsConfig {
            tag: "x".repeat(37),
            ..good.clone()
        });
        assert!(err.contains("36 bytes"), "{err}");
        // 36 bytes exactly fits (the field need not be NUL-terminated).
        validate_all(&[FsConfig {
            tag: "y".repeat(36),
            ..good.clone()
        }])
        .unwrap();
        let err = check(FsConfig {
            num_queues: 0,
            ..good.clone()
        });
        assert!(err.contains("fs[0].num_queues"), "{err}");
        let err = check(FsConfig {
            queue_size: 1000,
            ..good.clone()
        });
        assert!(err.contains("fs[0].queue_size"), "{err}");
        let err = check(FsConfig {
            socket: "/nonexistent/fs.sock".into(),
            ..good.clone()
        });
        assert!(
            err.contains("/nonexistent/fs.sock") && err.contains("virtiofsd"),
            "{err}"
        );
        // A regular file is not a socket.
        let err = check(FsConfig {
            socket: std::env::current_exe().unwrap(),
            ..good.clone()
        });
        assert!(err.contains("fs[0].socket"), "{err}");
        let err = validate_all(&[good.clone(), good]).unwrap_err().to_string();
        assert!(err.contains("fs[1].tag") && err.contains("shared"), "{err}");
        let _ = std::fs::remove_file(path);
    }
}
