use crate::config::VmConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
// Unit-like actions are empty struct variants so that
// `deny_unknown_fields` also rejects stray keys on them.
pub enum Request {
    /// Sets (or replaces) the VM config. Only before `start`.
    Configure {
        config: Box<VmConfig>,
    },
    /// Creates the VM from the config and runs it.
    Start {},
    Pause {},
    Resume {},
    /// Stops the VM. Graceful asks the guest first (Ctrl-Alt-Del through the
    /// i8042) and forces the stop after `timeout_ms`.
    Shutdown {
        #[serde(default)]
        graceful: bool,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    State {},
    Metrics {},
    /// Streams events (`boot-timer`, `state`, `stopped`) on this connection.
    Subscribe {},
}

/// One response line: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            result: None,
        }
    }
}

pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(r#"{"action":"start"}"#),
            Ok(Request::Start {})
        );
        assert_eq!(
            parse_request(r#"{"action":"shutdown","graceful":true}"#),
            Ok(Request::Shutdown {
                graceful: true,
                timeout_ms: None
            })
        );
        let err = parse_request(r#"{"action":"explode"}"#).unwrap_err();
        assert!(err.contains("explode"), "{err}");
        let err = parse_request(r#"{"action":"pause","now":true}"#).unwrap_err();
        assert!(err.contains("now"), "{err}");
        assert!(parse_request("not json").is_err());
    }
}
