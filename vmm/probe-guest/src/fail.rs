//! Why a probe step failed, printed after `FAIL`.

use core::fmt;

/// A short reason and, where it helps, the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    pub reason: &'static str,
    pub value: Option<u64>,
}

impl Fail {
    pub const fn new(reason: &'static str) -> Self {
        Self {
            reason,
            value: None,
        }
    }

    pub const fn with(reason: &'static str, value: u64) -> Self {
        Self {
            reason,
            value: Some(value),
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(value) => write!(f, "{} ({:#x})", self.reason, value),
            None => f.write_str(self.reason),
        }
    }
}

pub type Result<T> = core::result::Result<T, Fail>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_value_in_hex() {
        assert_eq!(
            std::format!("{}", Fail::with("bad id", 31)),
            "bad id (0x1f)"
        );
        assert_eq!(std::format!("{}", Fail::new("timeout")), "timeout");
    }
}
