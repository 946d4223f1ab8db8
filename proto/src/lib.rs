//! The guest agent's gRPC API (tonic + prost), versioned by package:
//! `microvm.agent.v1`. Both the shim (client) and the agent (server) use
//! this crate, so they cannot disagree on the wire format.

/// API version spoken by this build. A peer with another major is refused.
pub const API_VERSION_MAJOR: u32 = 1;
pub const API_VERSION_MINOR: u32 = 0;

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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::agent::v1::{ApiVersion, CheckResponse};
    use prost::Message;

    #[test]
    fn messages_round_trip_and_versions_compare_by_major() {
        let response = CheckResponse {
            agent_version: Some(ApiVersion::current()),
            guest_uptime_seconds: 0.25,
        };
        let bytes = response.encode_to_vec();
        assert_eq!(CheckResponse::decode(bytes.as_slice()).unwrap(), response);
        let current = ApiVersion::current();
        assert!(current.compatible_with(&ApiVersion { major: 1, minor: 7 }));
        assert!(!current.compatible_with(&ApiVersion { major: 2, minor: 0 }));
    }
}
