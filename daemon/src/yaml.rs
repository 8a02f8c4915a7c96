//! Strict YAML config files: read, size-checked, parsed, with errors naming file, line and key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Config files larger than this are refused before parsing.
pub const MAX_CONFIG_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: file is {size} bytes, the limit is {MAX_CONFIG_FILE_BYTES}", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    /// serde_yaml's message carries the line, column and offending key.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl ConfigFileError {
    pub fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigFileError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads `path` and parses it as `T` (which should use `deny_unknown_fields`).
pub fn read_yaml_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let read_err = |source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigFileError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_yaml(path, &text)
}

/// Parses YAML text; `path` names it in errors.
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigFileError> {
    serde_yaml::from_str(text).map_err(|e| ConfigFileError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}
