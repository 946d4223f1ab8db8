//! Pod annotations that size and adjust the pod VM, applied on top of the
//! config when the pod's first container (CRI's sandbox) is created:
//!
//! 1. CRI's sandbox sizing (containerd 1.7 and later set these; 1.6 does
//!    not, and the config's defaults apply): `io.kubernetes.cri.sandbox-cpu-quota`
//!    / `-cpu-period` give the vCPUs (quota / period, rounded up), and
//!    `io.kubernetes.cri.sandbox-memory` (bytes, the pod's memory limit) is
//!    added to `vm.memory_mib`, which is then the guest's own base.
//! 2. `io.microvm.config.<key>` overrides, for the keys the config's
//!    `annotations.allowed` lists (containerd passes them on when the
//!    runtime's `pod_annotations` includes `io.microvm.*`).
//!
//! Every error names the annotation. An `io.microvm.config.` key that is
//! not a known key is an error, never silently ignored.

use crate::config::{Config, MAX_VCPUS, MIN_MEMORY_MIB};
use std::collections::HashMap;

pub const OVERRIDE_PREFIX: &str = "io.microvm.config.";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The config keys an annotation can override.
pub const OVERRIDABLE_KEYS: &[&str] = &[
    "vm.vcpus",
    "vm.memory_mib",
    "vm.kernel_args",
    "timeouts.boot_seconds",
    "timeouts.agent_seconds",
];

/// Longest kernel_args an annotation may add.
const MAX_KERNEL_ARGS: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {key}: unknown key; known: {}", OVERRIDABLE_KEYS.join(", "))]
    Unknown { key: String },
    #[error("annotation {key}: not allowed by this node's shim config (annotations.allowed = [{allowed}])")]
    NotAllowed { key: String, allowed: String },
    #[error("annotation {key}={value:?}: {message}")]
    Invalid {
        key: String,
        value: String,
        message: String,
    },
}

fn invalid(key: &str, value: &str, message: impl Into<String>) -> AnnotationError {
    AnnotationError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        message: message.into(),
    }
}

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, AnnotationError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|err: T::Err| invalid(key, value, format!("not a number: {err}")))
}

/// Applies the annotations to `config` (a copy of the node's config for
/// this pod). On error, `config` may be partly changed: the caller drops it.
pub fn apply(
    config: &mut Config,
    annotations: &HashMap<String, String>,
) -> Result<(), AnnotationError> {
    let cri = apply_cri_sizing(config, annotations)?;
    // Sorted: the first error is the same on every run.
    let mut overrides: Vec<(&String, &String)> = annotations
        .iter()
        .filter(|(key, _)| key.starts_with(OVERRIDE_PREFIX))
        .collect();
    overrides.sort();
    for (key, value) in overrides {
        let config_key = &key[OVERRIDE_PREFIX.len()..];
        if !OVERRIDABLE_KEYS.contains(&config_key) {
            return Err(AnnotationError::Unknown { key: key.clone() });
        }
        if !config
            .annotations
            .allowed
            .iter()
            .any(|allowed| allowed == config_key)
        {
            return Err(AnnotationError::NotAllowed {
                key: key.clone(),
                allowed: config.annotations.allowed.join(", "),
            });
        }
        apply_override(config, key, config_key, value)?;
        check_bounds(config, &cri, key, config_key, value)?;
    }
    check_bounds(config, &cri, "", "", "")
}

/// What CRI's sandbox sizing allowed, when containerd sent it.
#[derive(Debug, Default)]
struct CriLimits {
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
}

/// The VM stays within the node's maximum (`vm.max_vcpus`,
/// `vm.max_memory_mib`, by default the host's size) and, when the pod has
/// CRI limits, an override cannot go above what those limits gave.
fn check_bounds(
    config: &Config,
    cri: &CriLimits,
    key: &str,
    config_key: &str,
    value: &str,
) -> Result<(), AnnotationError> {
    let source = |default: &str| {
        if key.is_empty() {
            (default.to_owned(), String::new())
        } else {
            (key.to_owned(), value.to_owned())
        }
    };
    let (vcpus, mib) = (config.vm.vcpus, config.vm.memory_mib);
    if config_key.is_empty() || config_key == "vm.vcpus" {
        let (key, value) = source(SANDBOX_CPU_QUOTA);
        let node = config.vm.vcpu_limit();
        if vcpus > node {
            return Err(invalid(
                &key,
                &value,
                format!("{vcpus} vCPUs is above this node's maximum of {node} (vm.max_vcpus)"),
            ));
        }
        if let Some(limit) = cri.vcpus.filter(|limit| vcpus > *limit) {
            return Err(invalid(
                &key,
                &value,
                format!("{vcpus} vCPUs is above the pod's CPU limit ({limit} vCPUs)"),
            ));
        }
    }
    if config_key.is_empty() || config_key == "vm.memory_mib" {
        let (key, value) = source(SANDBOX_MEMORY);
        let node = config.vm.memory_limit_mib();
        if mib > node {
            return Err(invalid(
                &key,
                &value,
                format!("{mib} MiB is above this node's maximum of {node} MiB (vm.max_memory_mib)"),
            ));
        }
        if let Some(limit) = cri.memory_mib.filter(|limit| mib > *limit) {
            return Err(invalid(
                &key,
                &value,
                format!(
                    "{mib} MiB is above the pod's memory limit plus the guest's base ({limit} MiB)"
                ),
            ));
        }
    }
    Ok(())
}

fn apply_cri_sizing(
    config: &mut Config,
    annotations: &HashMap<String, String>,
) -> Result<CriLimits, AnnotationError> {
    let mut limits = CriLimits::default();
    let quota = annotations.get(SANDBOX_CPU_QUOTA);
    let period = annotations.get(SANDBOX_CPU_PERIOD);
    if let (Some(quota_text), Some(period_text)) = (quota, period) {
        let quota: i64 = parse_number(SANDBOX_CPU_QUOTA, quota_text)?;
        let period: u64 = parse_number(SANDBOX_CPU_PERIOD, period_text)?;
        // quota <= 0 or period 0: no CPU limit, the config's vCPUs apply.
        if quota > 0 && period > 0 {
            let vcpus = u64::try_from(quota).unwrap_or(0).div_ceil(period);
            config.vm.vcpus = u32::try_from(vcpus)
                .ok()
                .filter(|vcpus| (1..=MAX_VCPUS).contains(vcpus))
                .ok_or_else(|| {
                    invalid(
                        SANDBOX_CPU_QUOTA,
                        quota_text,
                        format!("{vcpus} vCPUs (quota / period) is not in 1..={MAX_VCPUS}"),
                    )
                })?;
            limits.vcpus = Some(config.vm.vcpus);
        }
    }
    if let Some(text) = annotations.get(SANDBOX_MEMORY) {
        let bytes: u64 = parse_number(SANDBOX_MEMORY, text)?;
        if bytes > 0 {
            let limit_mib = bytes.div_ceil(1 << 20);
            config.vm.memory_mib = u32::try_from(limit_mib)
                .ok()
                .and_then(|mib| config.vm.memory_mib.checked_add(mib))
                .ok_or_else(|| invalid(SANDBOX_MEMORY, text, "too large"))?;
            limits.memory_mib = Some(config.vm.memory_mib);
        }
    }
    Ok(limits)
}

fn apply_override(
    config: &mut Config,
    key: &str,
    config_key: &str,
    value: &str,
) -> Result<(), AnnotationError> {
    match config_key {
        "vm.vcpus" => {
            let vcpus: u32 = parse_number(key, value)?;
            if !(1..=MAX_VCPUS).contains(&vcpus) {
                return Err(invalid(key, value, format!("not in 1..={MAX_VCPUS}")));
            }
            config.vm.vcpus = vcpus;
        }
        "vm.memory_mib" => {
            let mib: u32 = parse_number(key, value)?;
            if mib < MIN_MEMORY_MIB {
                return Err(invalid(
                    key,
                    value,
                    format!("{mib} MiB is below the guest minimum of {MIN_MEMORY_MIB} MiB"),
                ));
            }
            config.vm.memory_mib = mib;
        }
        "vm.kernel_args" => {
            // The command line reaches the guest kernel as is: only plain
            // words, so an annotation cannot smuggle in a second line or
            // control characters.
            let plain = |c: char| c.is_ascii_alphanumeric() || " =._,:/+-".contains(c);
            if value.len() > MAX_KERNEL_ARGS || !value.chars().all(plain) {
                return Err(invalid(
                    key,
                    value,
                    format!(
                        "kernel args may hold only letters, digits, spaces and =._,:/+- (at most {MAX_KERNEL_ARGS} bytes)"
                    ),
                ));
            }
            let args = &mut config.vm.kernel_args;
            if !args.is_empty() && !value.is_empty() {
                args.push(' ');
            }
            args.push_str(value.trim());
        }
        "timeouts.boot_seconds" | "timeouts.agent_seconds" => {
            let seconds: f64 = parse_number(key, value)?;
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                return Err(invalid(key, value, "not in (0, 3600]"));
            }
            if config_key == "timeouts.boot_seconds" {
                config.timeouts.boot_seconds = seconds;
            } else {
                config.timeouts.agent_seconds = seconds;
            }
        }
        _ => {
            return Err(AnnotationError::Unknown {
                key: key.to_owned(),
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn applied(pairs: &[(&str, &str)]) -> Result<Config, AnnotationError> {
        let mut config = Config::default();
        apply(&mut config, &annotations(pairs)).map(|()| config)
    }

    #[test]
    fn no_annotations_keep_the_config() {
        assert_eq!(applied(&[]).unwrap(), Config::default());
        // Others' annotations are none of our business.
        assert_eq!(
            applied(&[("io.kubernetes.cri.container-type", "sandbox")]).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn cri_sizing_sets_vcpus_and_adds_memory() {
        let config = applied(&[
            (SANDBOX_CPU_QUOTA, "150000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "134217728"),
        ])
        .unwrap();
        assert_eq!(config.vm.vcpus, 2);
        assert_eq!(config.vm.memory_mib, 256 + 128);
        // No limit (quota -1, memory 0): the defaults.
        let config = applied(&[
            (SANDBOX_CPU_QUOTA, "-1"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "0"),
        ])
        .unwrap();
        assert_eq!((config.vm.vcpus, config.vm.memory_mib), (1, 256));
    }

    #[test]
    fn overrides_apply_after_cri_sizing() {
        let config = applied(&[
            (SANDBOX_MEMORY, "134217728"),
            ("io.microvm.config.vm.memory_mib", "320"),
            ("io.microvm.config.vm.vcpus", "2"),
            ("io.microvm.config.vm.kernel_args", "loglevel=4 quiet"),
        ])
        .unwrap();
        assert_eq!(config.vm.memory_mib, 320);
        assert_eq!(config.vm.vcpus, 2);
        assert_eq!(config.vm.kernel_args, "loglevel=4 quiet");
    }

    #[test]
    fn bad_annotations_are_named() {
        let err = applied(&[("io.microvm.config.vm.memory_mib", "16")]).unwrap_err();
        assert!(
            err.to_string().contains("io.microvm.config.vm.memory_mib"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("below the guest minimum of 64 MiB"),
            "{err}"
        );
        let err = applied(&[("io.microvm.config.vm.vcpus", "two")]).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
        let err = applied(&[("io.microvm.config.vm.flux", "1")]).unwrap_err();
        assert_eq!(
            err,
            AnnotationError::Unknown {
                key: "io.microvm.config.vm.flux".into()
            }
        );
        let err = applied(&[("io.microvm.config.vm.kernel_args", "a\nb")]).unwrap_err();
        assert!(
            err.to_string().contains("kernel args may hold only"),
            "{err}"
        );
        let err = applied(&[(SANDBOX_MEMORY, "lots")]).unwrap_err();
        assert!(err.to_string().contains(SANDBOX_MEMORY), "{err}");
        let err = applied(&[
            (SANDBOX_CPU_QUOTA, "99999999999"),
            (SANDBOX_CPU_PERIOD, "1"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("vCPUs"), "{err}");
    }

    #[test]
    fn the_vm_is_bounded_by_the_node_and_the_pods_limits() {
        let mut config = Config::default();
        config.vm.max_vcpus = 2;
        config.vm.max_memory_mib = 1024;
        let bounded = |pairs: &[(&str, &str)]| apply(&mut config.clone(), &annotations(pairs));
        let err = bounded(&[("io.microvm.config.vm.vcpus", "64")]).unwrap_err();
        assert!(err.to_string().contains("node's maximum of 2"), "{err}");
        let err = bounded(&[("io.microvm.config.vm.memory_mib", "999999")]).unwrap_err();
        assert!(
            err.to_string().contains("io.microvm.config.vm.memory_mib"),
            "{err}"
        );
        assert!(err.to_string().contains("maximum of 1024 MiB"), "{err}");
        // CRI sizing above the node's maximum is refused too, by its key.
        let err = bounded(&[(SANDBOX_MEMORY, "4294967296")]).unwrap_err();
        assert!(err.to_string().contains(SANDBOX_MEMORY), "{err}");
        // A pod limited to 128Mi cannot ask for more by annotation.
        let err = bounded(&[
            (SANDBOX_MEMORY, "134217728"),
            ("io.microvm.config.vm.memory_mib", "1000"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("pod's memory limit"), "{err}");
        let err = bounded(&[
            (SANDBOX_CPU_QUOTA, "100000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            ("io.microvm.config.vm.vcpus", "2"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("pod's CPU limit (1 vCPUs)"),
            "{err}"
        );
        // Within both: fine.
        bounded(&[
            (SANDBOX_MEMORY, "134217728"),
            ("io.microvm.config.vm.memory_mib", "300"),
            ("io.microvm.config.vm.vcpus", "2"),
        ])
        .unwrap();
        // The default maximum is the host's size.
        let host = Config::default();
        assert!(host.vm.vcpu_limit() >= 1 && host.vm.memory_limit_mib() >= 256);
        let err = apply(
            &mut Config::default(),
            &annotations(&[("io.microvm.config.vm.memory_mib", "4000000000")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("node's maximum"), "{err}");
    }

    #[test]
    fn keys_outside_the_allow_list_are_refused() {
        let mut config = Config::default();
        config.annotations.allowed = vec!["vm.vcpus".into()];
        let err = apply(
            &mut config,
            &annotations(&[("io.microvm.config.vm.memory_mib", "512")]),
        )
        .unwrap_err();
        assert!(matches!(err, AnnotationError::NotAllowed { .. }), "{err}");
        assert!(
            err.to_string().contains("annotations.allowed = [vm.vcpus]"),
            "{err}"
        );
    }
}
