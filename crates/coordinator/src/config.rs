//! The coordinator's config file (`rollcall.toml`): listeners, TLS, state store, agent
//! liveness, operator tokens, telemetry. See `deploy/rollcall.toml` for a commented example.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use api::config::{ConfigError, TelemetryConfig, load_toml, resolve};
use serde::Deserialize;

use crate::tls::TlsPaths;

pub const EXAMPLE: &str = "deploy/rollcall.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    #[serde(default)]
    pub operator: OperatorConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Where agents attach (mTLS, client certificate required).
    pub agents: SocketAddr,
    /// The operator API (mTLS; operator certificate or bearer token).
    pub operator: SocketAddr,
    /// Prometheus metrics at `/metrics` (plain HTTP); off when unset.
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `sqlite://PATH` (relative to this file) or `postgres://...`.
    pub url: String,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            url: "sqlite://rollcall-state.db".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// How often agents send heartbeats (told to them on attach).
    #[serde(with = "humantime_serde", default = "default_heartbeat")]
    pub heartbeat_interval: Duration,
    /// An agent silent for this long is marked unavailable.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            heartbeat_interval: default_heartbeat(),
            timeout: default_timeout(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// SHA-256 (hex) of each accepted operator bearer token; never the token itself.
    /// `printf %s "$TOKEN" | sha256sum` prints one.
    #[serde(default)]
    pub token_sha256: Vec<String>,
}

/// A loaded config with its paths resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: PathBuf,
    pub config: CoordinatorConfig,
    pub tls: TlsPaths,
    pub state_url: String,
    pub token_hashes: Vec<[u8; 32]>,
}

pub fn load(file: &Path) -> Result<Loaded> {
    let config: CoordinatorConfig = load_toml(file, EXAMPLE)?;
    let tls = TlsPaths {
        ca: resolve(file, &config.tls.ca),
        cert: resolve(file, &config.tls.cert),
        key: resolve(file, &config.tls.key),
        key_prefix: "tls",
    };
    if config.agents.heartbeat_interval.is_zero() {
        bail!(ConfigError::new(
            file,
            "agents.heartbeat_interval must be positive",
            "set it to e.g. \"2s\""
        ));
    }
    if config.agents.timeout <= config.agents.heartbeat_interval {
        bail!(ConfigError::new(
            file,
            format!(
                "agents.timeout ({}) must be longer than agents.heartbeat_interval ({})",
                humantime::format_duration(config.agents.timeout),
                humantime::format_duration(config.agents.heartbeat_interval)
            ),
            "make the timeout at least three heartbeat intervals"
        ));
    }
    let mut token_hashes = Vec::new();
    for (i, hex_hash) in config.operator.token_sha256.iter().enumerate() {
        let bytes = hex::decode(hex_hash.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        match bytes {
            Some(hash) => token_hashes.push(hash),
            None => bail!(ConfigError::new(
                file,
                format!("operator.token_sha256[{i}] is not 64 hex characters"),
                "store the SHA-256 of the token (printf %s \"$TOKEN\" | sha256sum), never the token"
            )),
        }
    }
    let state_url = resolve_sqlite_url(file, &config.state.url);
    Ok(Loaded {
        file: file.to_path_buf(),
        config,
        tls,
        state_url,
        token_hashes,
    })
}

/// Makes a relative `sqlite://` path relative to the config file, not the working directory.
fn resolve_sqlite_url(file: &Path, url: &str) -> String {
    for prefix in ["sqlite://", "sqlite:"] {
        if let Some(path) = url.strip_prefix(prefix) {
            if path.starts_with('/') || path == ":memory:" || path.is_empty() {
                return url.to_owned();
            }
            return format!("sqlite://{}", resolve(file, Path::new(path)).display());
        }
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let file = dir.join("rollcall.toml");
        std::fs::write(&file, text).expect("write config");
        file
    }

    const MINIMAL: &str = r#"
[listen]
agents = "127.0.0.1:7400"
operator = "127.0.0.1:7401"
[tls]
ca = "certs/ca.pem"
cert = "certs/coordinator.pem"
key = "certs/coordinator-key.pem"
"#;

    #[test]
    fn resolves_paths_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loaded = load(&write(dir.path(), MINIMAL)).expect("load");
        assert_eq!(loaded.tls.ca, dir.path().join("certs/ca.pem"));
        assert_eq!(
            loaded.state_url,
            format!(
                "sqlite://{}",
                dir.path().join("rollcall-state.db").display()
            )
        );
        assert_eq!(loaded.config.agents.timeout, Duration::from_secs(10));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values_naming_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!("{MINIMAL}\n[agents]\ntimeout = \"1s\"\nheartbeat_interval = \"2s\"\n");
        let err = load(&write(dir.path(), &text)).expect_err("timeout too short");
        assert!(
            err.to_string()
                .contains("agents.timeout (1s) must be longer"),
            "{err}"
        );

        let text = format!("{MINIMAL}\n[operator]\ntoken_sha256 = [\"plaintext-token\"]\n");
        let err = load(&write(dir.path(), &text)).expect_err("not a hash");
        assert!(
            err.to_string().contains("operator.token_sha256[0]"),
            "{err}"
        );

        let text = MINIMAL.replace("[tls]", "[tls]\ncafile = \"x\"");
        let err = load(&write(dir.path(), &text)).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `cafile`"), "{err}");
    }
}
