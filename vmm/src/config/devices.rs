use super::ConfigError;
pub use microvm_devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use microvm_devices::virtio::vsock::VsockLimits;
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
    /// Open connections at most (both directions); more are refused (RST).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Guest bytes buffered per connection while the host side does not read
    /// (also the credit advertised to the guest). Host memory for vsock is
    /// bounded by `max_connections * conn_buffer_bytes`.
    #[serde(default = "default_conn_buffer_bytes")]
    pub conn_buffer_bytes: u32,
}

fn default_max_connections() -> usize {
    VsockLimits::default().max_connections
}

fn default_conn_buffer_bytes() -> u32 {
    VsockLimits::default().conn_tx_buf_size
}

/// Largest per-connection buffer accepted: 16 MiB.
pub const MAX_CONN_BUFFER_BYTES: u32 = 16 << 20;
/// Most connections accepted.
pub const MAX_VSOCK_CONNECTIONS: usize = 65_536;

impl VsockConfig {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Self {
        Self {
            guest_cid,
            uds_path,
            max_connections: default_max_connections(),
            conn_buffer_bytes: default_conn_buffer_bytes(),
        }
    }

    pub fn limits(&self) -> VsockLimits {
        VsockLimits {
            max_connections: self.max_connections,
            conn_tx_buf_size: self.conn_buffer_bytes,
            ..VsockLimits::default()
        }
    }
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
    /// Token buckets on request bytes and count; unlimited without.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name of the tap device to open (created if it does not exist).
    pub tap: String,
    /// Guest MAC address; random locally administered if absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Token buckets on frames to the guest.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Token buckets on frames from the guest.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
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
        for (key, limiter) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if let Some(limiter) = limiter {
                limiter
                    .validate()
                    .map_err(|source| ConfigError::RateLimiter {
                        key: format!("net[{index}].{key}"),
                        source,
                    })?;
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
    fn limits_parse_with_defaults() {
        let v: VsockConfig =
            serde_json::from_str(r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#).unwrap();
        assert_eq!(v.limits().max_connections, 1024);
        assert_eq!(v.limits().conn_tx_buf_size, 128 * 1024);
        let v: VsockConfig = serde_json::from_str(
            r#"{"guest_cid": 3, "uds_path": "/v.sock", "max_connections": 8, "conn_buffer_bytes": 4096}"#,
        )
        .unwrap();
        assert_eq!(v.limits().max_connections, 8);
        assert_eq!(v.limits().conn_tx_buf_size, 4096);
        let d: DiskConfig = serde_json::from_str(
            r#"{"path": "/d", "rate_limiter": {"bandwidth": {"size": 100, "refill_time_ms": 10}}}"#,
        )
        .unwrap();
        assert_eq!(d.rate_limiter.unwrap().bandwidth.unwrap().size, 100);
        let n: NetConfig = serde_json::from_str(
            r#"{"tap": "t0", "tx_rate_limiter": {"ops": {"size": 0, "refill_time_ms": 10}}}"#,
        )
        .unwrap();
        let err = n.validate(2).unwrap_err().to_string();
        assert!(err.contains("net[2].tx_rate_limiter"), "{err}");
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:00:00:00:0a:FF"), Some([2, 0, 0, 0, 10, 255]));
        assert_eq!(parse_mac("02:00:00:00:0a"), None);
        assert_eq!(parse_mac("02:00:00:00:0a:ff:00"), None);
        assert_eq!(parse_mac("2:00:00:00:0a:ff"), None);
        assert_eq!(parse_mac("zz:00:00:00:0a:ff"), None);
    }
}
