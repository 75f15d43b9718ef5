//! Loading Rollcall's TOML config files with errors an operator can act on.
//!
//! The coordinator and the agent both read a TOML file; both want the same promise: a bad
//! file produces one line naming the file, the line and key, and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file could not be used. `Display` is the one line an operator sees.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.file.display(), self.problem, self.fix)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(file: &Path, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Reads and parses a TOML config file. `example` names a shipped example to copy from.
pub fn load_toml<T: DeserializeOwned>(path: &Path, example: &str) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let fix = if e.kind() == std::io::ErrorKind::NotFound {
            format!("create it (see {example}) or pass the right path to --config")
        } else {
            "check that the file is readable by this user".to_owned()
        };
        ConfigError::new(path, format!("cannot read config file ({e})"), fix)
    })?;
    parse_toml(path, &text, example)
}

/// Parses TOML text that came from `path`; split out so tests need no files.
pub fn parse_toml<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    example: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let location = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: ")
            })
            .unwrap_or_default();
        // toml's message spans several lines with a source excerpt; keep the first sentence.
        let message = e.message().lines().next().unwrap_or("invalid TOML").trim();
        ConfigError::new(
            path,
            format!("{location}{message}"),
            format!("fix that line (the keys are documented in {example})"),
        )
    })
}

/// Resolves a path from a config file against the file's directory.
pub fn resolve(config_file: &Path, value: &Path) -> PathBuf {
    if value.is_absolute() {
        return value.to_path_buf();
    }
    config_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(value)
}

/// `[tls]`, shared by the coordinator's and the agent's config files: PEM files of the fleet's
/// CA and of this process's certificate and key, relative to the config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Logging and tracing settings, shared by the coordinator's and the agent's config files.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint for traces, e.g. `http://127.0.0.1:4317`. No export when unset
    /// (the standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable is honoured too).
    pub otlp_endpoint: Option<String>,
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        #[serde(default)]
        port: u16,
    }

    #[test]
    fn names_the_file_line_and_unknown_key() {
        let err = parse_toml::<Sample>(
            Path::new("a.toml"),
            "name = \"x\"\nprot = 3\n",
            "deploy/a.toml",
        )
        .expect_err("unknown key");
        let line = err.to_string();
        assert!(
            line.starts_with("a.toml: line 2: unknown field `prot`"),
            "{line}"
        );
        assert!(line.contains("deploy/a.toml"), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn reports_syntax_errors_on_one_line() {
        let err = parse_toml::<Sample>(Path::new("a.toml"), "name = \"x\nport = 1\n", "ex")
            .expect_err("syntax");
        let line = err.to_string();
        assert!(line.starts_with("a.toml: line 1:"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn missing_file_says_what_to_do() {
        let err = load_toml::<Sample>(Path::new("/nonexistent/rollcall.toml"), "deploy/x.toml")
            .expect_err("missing");
        let line = err.to_string();
        assert!(
            line.contains("/nonexistent/rollcall.toml: cannot read config file"),
            "{line}"
        );
        assert!(line.contains("--config"), "{line}");
    }

    #[test]
    fn resolves_relative_paths_against_the_file() {
        assert_eq!(
            resolve(
                Path::new("/etc/rollcall/agent.toml"),
                Path::new("certs/ca.pem")
            ),
            PathBuf::from("/etc/rollcall/certs/ca.pem")
        );
        assert_eq!(
            resolve(Path::new("agent.toml"), Path::new("/abs/ca.pem")),
            PathBuf::from("/abs/ca.pem")
        );
    }
}
