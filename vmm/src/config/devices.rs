use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Serial console output: a file (appended to) or a fifo. Without a path it
/// goes to the VMM's stdout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Bytes of console output kept; the rest is dropped and counted.
    #[serde(default = "default_serial_limit")]
    pub limit_bytes: u64,
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            output: None,
            limit_bytes: default_serial_limit(),
        }
    }
}

fn default_serial_limit() -> u64 {
    64 << 20
}

/// Hybrid vsock: the host side is a unix socket at `uds_path`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Reported through VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
    #[serde(default)]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name of the tap device to open (created if it does not exist).
    pub tap: String,
    /// Guest MAC address; random locally administered if absent.
    #[serde(default)]
    pub mac: Option<String>,
}

impl NetConfig {
    pub(super) fn validate(&self, index: usize) -> Result<(), ConfigError> {
        if self.tap.is_empty() || self.tap.len() > 15 || self.tap.contains(['/', ' ', '\0']) {
            return Err(ConfigError::TapName {
                index,
                tap: self.tap.clone(),
            });
        }
        if let Some(mac) = &self.mac {
            if parse_mac(mac).is_none() {
                return Err(ConfigError::Mac {
                    index,
                    mac: mac.clone(),
                });
            }
        }
        Ok(())
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:00:00:00:0a:FF"), Some([2, 0, 0, 0, 10, 255]));
        assert_eq!(parse_mac("02:00:00:00:0a"), None);
        assert_eq!(parse_mac("02:00:00:00:0a:ff:00"), None);
        assert_eq!(parse_mac("2:00:00:00:0a:ff"), None);
        assert_eq!(parse_mac("zz:00:00:00:0a:ff"), None);
    }
}
