//! The pod as a whole: hostname, DNS and hosts files, sysctls and the
//! optional shared PID namespace. The VM's own network, IPC and UTS
//! namespaces are the pod's.

use crate::runtime::{Runtime, RuntimeError};
use crate::storage::Storage;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {0} already exists")]
    Exists(String),
    #[error("there is no sandbox")]
    NotFound,
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("sysctl {0} does not exist in this kernel")]
    NoSuchSysctl(String),
    #[error("setting {what} failed")]
    Apply {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl SandboxError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Exists(_) => tonic::Code::AlreadyExists,
            Self::NotFound | Self::NoSuchSysctl(_) => tonic::Code::NotFound,
            Self::Invalid { .. } => tonic::Code::InvalidArgument,
            Self::Apply { .. } => tonic::Code::FailedPrecondition,
            Self::Runtime(err) => err.grpc_code(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    pub id: String,
    pub hostname: String,
    pub dns: Dns,
    pub sysctls: Vec<(String, String)>,
    pub share_pid_namespace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxFiles {
    pub resolv_conf: PathBuf,
    pub hostname: PathBuf,
    pub hosts: PathBuf,
}

pub struct Sandbox {
    dir: PathBuf,
    /// The id of the sandbox, once created.
    current: Mutex<Option<String>>,
}

pub fn resolv_conf(dns: &Dns) -> Result<String, SandboxError> {
    let mut text = String::new();
    for server in &dns.servers {
        server
            .parse::<IpAddr>()
            .map_err(|_| SandboxError::Invalid {
                field: "dns.servers".into(),
                reason: format!("{server:?} is not an IP address"),
            })?;
        text.push_str(&format!("nameserver {server}\n"));
    }
    let words_ok = |words: &[String]| {
        words
            .iter()
            .all(|word| !word.is_empty() && !word.contains(char::is_whitespace))
    };
    if !words_ok(&dns.searches) || !words_ok(&dns.options) {
        return Err(SandboxError::Invalid {
            field: "dns".into(),
            reason: "search domains and options are single words".into(),
        });
    }
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(text)
}

fn validate_hostname(name: &str) -> Result<(), SandboxError> {
    let valid = name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if valid {
        Ok(())
    } else {
        Err(SandboxError::Invalid {
            field: "hostname".into(),
            reason: format!("{name:?} is not a host name (at most 64 of [A-Za-z0-9._-])"),
        })
    }
}

/// Checks every sysctl first (only namespaced ones; all refused keys
/// named), then writes them in order. The agent's namespaces are the VM's,
/// which are the pod's.
fn write_sysctls(sysctls: &[(String, String)]) -> Result<(), SandboxError> {
    let checked = crate::sysctl::check(
        sysctls
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str())),
    )
    .map_err(|err| SandboxError::Invalid {
        field: "sysctls".into(),
        reason: err.to_string(),
    })?;
    for ((key, value), (path, _)) in sysctls.iter().zip(checked) {
        if !Path::new(&path).exists() {
            return Err(SandboxError::NoSuchSysctl(key.to_owned()));
        }
        std::fs::write(&path, value).map_err(|source| SandboxError::Apply {
            what: format!("sysctl {key}={value}"),
            source,
        })?;
    }
    Ok(())
}

impl Sandbox {
    /// `run_dir`: where the sandbox's files go.
    pub fn new(run_dir: &Path) -> Self {
        Self {
            dir: run_dir.join("sandbox"),
            current: Mutex::new(None),
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        crate::lock::lock(&self.current)
    }

    pub fn files(&self) -> SandboxFiles {
        SandboxFiles {
            resolv_conf: self.dir.join("resolv.conf"),
            hostname: self.dir.join("hostname"),
            hosts: self.dir.join("hosts"),
        }
    }

    pub async fn create(
        &self,
        runtime: &Runtime,
        request: SandboxRequest,
    ) -> Result<SandboxFiles, SandboxError> {
        if let Some(existing) = self.current().as_ref() {
            return Err(SandboxError::Exists(existing.clone()));
        }
        if request.id.is_empty() {
            return Err(SandboxError::Invalid {
                field: "sandbox_id".into(),
                reason: "empty".into(),
            });
        }
        validate_hostname(&request.hostname)?;
        let resolv = resolv_conf(&request.dns)?;
        write_sysctls(&request.sysctls)?;
        if !request.hostname.is_empty() {
            nix::unistd::sethostname(&request.hostname).map_err(|errno| SandboxError::Apply {
                what: format!("hostname {}", request.hostname),
                source: errno.into(),
            })?;
        }
        let files = self.files();
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(|source| SandboxError::Apply {
                what: format!("file {}", path.display()),
                source,
            })
        };
        std::fs::create_dir_all(&self.dir).map_err(|source| SandboxError::Apply {
            what: format!("directory {}", self.dir.display()),
            source,
        })?;
        write(&files.resolv_conf, &resolv)?;
        write(&files.hostname, &format!("{}\n", request.hostname))?;
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if !request.hostname.is_empty() {
            hosts.push_str(&format!("127.0.1.1\t{}\n", request.hostname));
        }
        write(&files.hosts, &hosts)?;
        if request.share_pid_namespace {
            runtime.create_pod_pid_namespace().await?;
        }
        *self.current() = Some(request.id.clone());
        tracing::info!(sandbox = request.id, "sandbox created");
        Ok(files)
    }

    /// Removes every container, unmounts API storage, drops the pod PID
    /// namespace and the sandbox's files.
    pub async fn destroy(&self, runtime: &Runtime, storage: &Storage) -> Result<(), SandboxError> {
        let Some(id) = self.current().clone() else {
            return Err(SandboxError::NotFound);
        };
        let errors = runtime.remove_all().await;
        if let Some(first) = errors.into_iter().next() {
            return Err(first.into());
        }
        storage.unmount_all();
        runtime.destroy_pod_pid_namespace();
        let _ = std::fs::remove_dir_all(&self.dir);
        *self.current() = None;
        tracing::info!(sandbox = id, "sandbox destroyed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers_searches_and_options() {
        let text = resolv_conf(&Dns {
            servers: vec!["10.96.0.10".into(), "fd00::a".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        })
        .unwrap();
        assert_eq!(
            text,
            "nameserver 10.96.0.10\nnameserver fd00::a\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        let bad = resolv_conf(&Dns {
            servers: vec!["not-an-ip".into()],
            ..Dns::default()
        })
        .unwrap_err();
        assert_eq!(bad.grpc_code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn hostnames_and_sysctl_names_are_checked() {
        assert!(validate_hostname("pod-1.example").is_ok());
        assert!(validate_hostname("bad host").is_err());
        assert!(validate_hostname(&"x".repeat(65)).is_err());
        let one = |key: &str| write_sysctls(&[(key.to_owned(), "1".to_owned())]);
        assert!(matches!(
            one("net.no.such.sysctl.anywhere"),
            Err(SandboxError::NoSuchSysctl(_))
        ));
        assert!(matches!(one("../etc"), Err(SandboxError::Invalid { .. })));
        // Not namespaced: refused by name before anything is written.
        let refused = write_sysctls(&[
            ("net.no.such.sysctl".to_owned(), "1".to_owned()),
            ("kernel.panic".to_owned(), "1".to_owned()),
        ])
        .unwrap_err();
        assert_eq!(refused.grpc_code(), tonic::Code::InvalidArgument);
        assert!(
            refused.to_string().contains("\"kernel.panic\""),
            "{refused}"
        );
    }
}
