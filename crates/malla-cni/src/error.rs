//! CNI error results: the spec's codes and the JSON a runtime reads from stdout.

use serde::Serialize;

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const UNSUPPORTED_FIELD: u32 = 2;
pub const UNKNOWN_CONTAINER: u32 = 3;
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;

/// A spec error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg} ({details})")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: "1.1.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Answers in the version the runtime asked in, when it is one we speak.
    pub fn with_version(mut self, version: &str) -> Self {
        if crate::SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_string();
        }
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"1.1.0","code":{},"msg":"unprintable error"}}"#,
                self.code
            )
        })
    }
}
