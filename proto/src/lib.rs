//! The guest agent's gRPC API (tonic + prost), versioned by package:
//! `microvm.agent.v1`. Both the shim (client) and the agent (server) use
//! this crate, so they cannot disagree on the wire format.
//!
//! Every request carries the client's API version in the
//! [`API_VERSION_METADATA_KEY`] metadata entry ([`with_api_version`] adds
//! it); the agent refuses a missing or incompatible one with
//! `FAILED_PRECONDITION` ([`check_client_api_version`]).

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

/// API version spoken by this build. A peer with another major is refused.
pub const API_VERSION_MAJOR: u32 = 1;
/// 1: the Clock service and the port-forward vsock port
/// ([`abi::vsock::PORT_FORWARD_PORT`]).
pub const API_VERSION_MINOR: u32 = 1;

/// Metadata entry holding the client's API version, "<major>.<minor>".
pub const API_VERSION_METADATA_KEY: &str = "microvm-agent-api-version";

/// The host↔guest contract beyond the gRPC API (ports, the ready line,
/// the kernel command line, the shared directory).
pub use microvm_abi as abi;

// --- microvm-ctl: the Debug service (debug.proto) ---------------------------

/// The largest console shell (a static busybox is about 2 MiB) the agent
/// takes into a memfd.
pub const CONSOLE_SHELL_MAX_BYTES: usize = 32 << 20;
/// The console client sends the shell in chunks of this size.
pub const CONSOLE_SHELL_CHUNK_BYTES: usize = 256 << 10;
/// The agent reads the console's pty in chunks of at most this size.
pub const CONSOLE_OUTPUT_CHUNK_BYTES: usize = 16 << 10;

// --- end of microvm-ctl's block ---------------------------------------------

pub mod port_forward;

pub mod agent {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("microvm.agent.v1");

        impl ApiVersion {
            pub fn current() -> Self {
                Self {
                    major: crate::API_VERSION_MAJOR,
                    minor: crate::API_VERSION_MINOR,
                }
            }

            /// Same major version: the only compatibility rule.
            pub fn compatible_with(&self, other: &ApiVersion) -> bool {
                self.major == other.major
            }

            /// Parses "<major>.<minor>".
            pub fn parse(text: &str) -> Option<Self> {
                let (major, minor) = text.trim().split_once('.')?;
                Some(Self {
                    major: major.parse().ok()?,
                    minor: minor.parse().ok()?,
                })
            }
        }

        impl std::fmt::Display for ApiVersion {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}.{}", self.major, self.minor)
            }
        }
    }
}

use agent::v1::ApiVersion;

/// Client side: adds this build's API version to a request. Usable as a
/// tonic interceptor (`XClient::with_interceptor(channel, with_api_version)`).
pub fn with_api_version<T>(mut request: Request<T>) -> Result<Request<T>, Status> {
    let value = MetadataValue::try_from(ApiVersion::current().to_string())
        .map_err(|err| Status::internal(format!("API version metadata: {err}")))?;
    request
        .metadata_mut()
        .insert(API_VERSION_METADATA_KEY, value);
    Ok(request)
}

/// Server side: the client's version from `metadata`, refused with
/// `FAILED_PRECONDITION` when missing, malformed or of another major.
pub fn check_client_api_version(metadata: &MetadataMap) -> Result<ApiVersion, Status> {
    let ours = ApiVersion::current();
    let value = metadata.get(API_VERSION_METADATA_KEY).ok_or_else(|| {
        Status::failed_precondition(format!(
            "the request has no {API_VERSION_METADATA_KEY} metadata; this agent speaks API {ours}"
        ))
    })?;
    let text = value.to_str().unwrap_or_default();
    let theirs = ApiVersion::parse(text).ok_or_else(|| {
        Status::failed_precondition(format!(
            "{API_VERSION_METADATA_KEY} {text:?} is not <major>.<minor>"
        ))
    })?;
    if ours.compatible_with(&theirs) {
        Ok(theirs)
    } else {
        Err(Status::failed_precondition(format!(
            "client API version {theirs} is incompatible with this agent's {ours} (major versions differ)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::agent::v1::{ApiVersion, CheckResponse};
    use super::*;
    use prost::Message;

    #[test]
    fn messages_round_trip_and_versions_compare_by_major() {
        let response = CheckResponse {
            agent_version: Some(ApiVersion::current()),
            guest_uptime_seconds: 0.25,
            agent_build_version: "0.1.0".into(),
        };
        let bytes = response.encode_to_vec();
        assert_eq!(CheckResponse::decode(bytes.as_slice()).unwrap(), response);
        let current = ApiVersion::current();
        assert!(current.compatible_with(&ApiVersion { major: 1, minor: 7 }));
        assert!(!current.compatible_with(&ApiVersion { major: 2, minor: 0 }));
    }

    #[test]
    fn version_metadata_round_trips_and_refuses_other_majors() {
        let request = with_api_version(Request::new(())).unwrap();
        assert_eq!(
            check_client_api_version(request.metadata()).unwrap(),
            ApiVersion::current()
        );

        let mut metadata = MetadataMap::new();
        let missing = check_client_api_version(&metadata).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::FailedPrecondition);

        metadata.insert(API_VERSION_METADATA_KEY, "2.0".parse().unwrap());
        let other_major = check_client_api_version(&metadata).unwrap_err();
        assert_eq!(other_major.code(), tonic::Code::FailedPrecondition);
        assert!(other_major.message().contains("incompatible"));

        metadata.insert(API_VERSION_METADATA_KEY, "1.9".parse().unwrap());
        assert!(check_client_api_version(&metadata).is_ok());

        metadata.insert(API_VERSION_METADATA_KEY, "one".parse().unwrap());
        assert!(check_client_api_version(&metadata).is_err());
    }
}
