//! The agent's config file (`agent.toml`): who it is, where the coordinator is, its TLS
//! files and state directory. See `deploy/agent.toml` for a commented example.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use api::config::{ConfigError, TelemetryConfig, TlsConfig, load_toml, resolve};
use api::identity::Identity;
use api::model::{AgentName, Environment, Role};
use serde::Deserialize;

pub const EXAMPLE: &str = "deploy/agent.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    pub role: String,
    pub environment: String,
    /// Holds the highest epoch seen and recorded command results. One per agent.
    pub state_dir: PathBuf,
    pub coordinator: CoordinatorAddress,
    pub tls: TlsConfig,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// How this agent freezes and scales its role (see `control`).
    #[serde(default)]
    pub control: crate::control::ControlConfig,
    /// The database agent's live database (backups, restores, counts).
    pub postgres: Option<crate::data::PostgresConfig>,
    /// The objects agent's live object store (snapshots, restores).
    pub objects: Option<crate::data::ObjectsConfig>,
    /// HTTP checks of the role, run by `verify`.
    #[serde(default, rename = "check")]
    pub checks: Vec<crate::checks::HttpCheck>,
    /// SQL invariants (database agents), run by `verify`.
    #[serde(default, rename = "invariant")]
    pub invariants: Vec<crate::checks::Invariant>,
    /// Object keys rows refer to (database agents), checked by the objects agent after verify.
    #[serde(default, rename = "reference")]
    pub references: Vec<crate::checks::Reference>,
    /// The role's bounded smoke command.
    pub smoke: Option<crate::checks::SmokeConfig>,
    /// `[restore_test]`: this agent serves a restore-test environment.
    #[serde(default)]
    pub restore_test: RestoreTestConfig,
}

/// `[restore_test]`: what this agent lets a restore test do beyond a drill.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreTestConfig {
    /// Allow `teardown-postgres`/`teardown-objects`: after a restore test, drop the database
    /// and delete the objects the run restored. Off by default, so no coordinator, however
    /// configured, can make an agent of a live environment drop its data.
    #[serde(default)]
    pub teardown: bool,
    /// This agent's database has the name the source's points were dumped from, and the
    /// operator vouches that it is on another server: the check that refuses the source's own
    /// database cannot prove it (the role may not read `pg_control_system()`, or the server is
    /// a clone of the source's, which keeps its system identifier).
    #[serde(default)]
    pub another_server: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorAddress {
    /// `https://HOST:PORT` of the coordinator's agent listener.
    pub url: String,
    /// The name to verify in the coordinator's certificate; defaults to the URL's host.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(with = "humantime_serde", default = "default_initial")]
    pub initial: Duration,
    #[serde(with = "humantime_serde", default = "default_max")]
    pub max: Duration,
    /// From dialing the coordinator to its welcome: an attempt that takes longer is given up
    /// and retried (a peer that accepts connections but never answers, such as a load balancer
    /// in front of a stopped coordinator, would otherwise hold the agent forever).
    #[serde(with = "humantime_serde", default = "default_attach_timeout")]
    pub attach_timeout: Duration,
}

fn default_initial() -> Duration {
    Duration::from_millis(200)
}

fn default_max() -> Duration {
    Duration::from_secs(10)
}

fn default_attach_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial: default_initial(),
            max: default_max(),
            attach_timeout: default_attach_timeout(),
        }
    }
}

/// Validated settings an `Agent` is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub state_dir: PathBuf,
    pub coordinator_url: String,
    pub server_name: String,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub reconnect: ReconnectConfig,
    pub control: crate::control::ControlConfig,
    pub postgres: Option<crate::data::PostgresConfig>,
    pub objects: Option<crate::data::ObjectsConfig>,
    pub checks: Vec<crate::checks::HttpCheck>,
    pub invariants: Vec<crate::checks::Invariant>,
    pub references: Vec<crate::checks::Reference>,
    pub smoke: Option<crate::checks::SmokeConfig>,
    /// `[restore_test] teardown = true`: teardown commands are obeyed.
    pub teardown_allowed: bool,
    /// `[restore_test] another_server = true`.
    pub another_server: bool,
    /// The file `control` paths are relative to.
    pub config_file: PathBuf,
}

pub fn load(file: &Path) -> Result<(Settings, TelemetryConfig)> {
    let config: AgentConfig = load_toml(file, EXAMPLE)?;
    let invalid = |key: &str, e: api::model::Invalid| {
        ConfigError::new(file, format!("{key}: {e}"), "fix the value")
    };
    let name = AgentName::parse(&config.name).map_err(|e| invalid("name", e))?;
    let role = Role::parse(&config.role).map_err(|e| invalid("role", e))?;
    let environment =
        Environment::parse(&config.environment).map_err(|e| invalid("environment", e))?;
    let url = config.coordinator.url.trim().to_owned();
    let Some(rest) = url.strip_prefix("https://") else {
        bail!(ConfigError::new(
            file,
            format!("coordinator.url = {url:?} must start with https:// (agents only speak TLS)"),
            "use e.g. \"https://127.0.0.1:7400\""
        ));
    };
    let host = rest
        .split('/')
        .next()
        .and_then(|hostport| hostport.rsplit_once(':').map(|(h, _)| h).or(Some(hostport)))
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = config.coordinator.server_name.clone().unwrap_or(host);
    if config.reconnect.initial.is_zero() || config.reconnect.max < config.reconnect.initial {
        bail!(ConfigError::new(
            file,
            "reconnect.initial must be positive and no larger than reconnect.max",
            "e.g. initial = \"200ms\", max = \"10s\""
        ));
    }
    if config.reconnect.attach_timeout.is_zero() {
        bail!(ConfigError::new(
            file,
            "reconnect.attach_timeout must be positive",
            "e.g. attach_timeout = \"30s\" (from dialing the coordinator to its welcome)"
        ));
    }
    let read = |key: &str, path: &Path| -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            ConfigError::new(
                file,
                format!("{key} = {}: cannot read ({e})", path.display()),
                "fix the path, or create the files with `rollcall certs init --dir DIR --agent NAME:ROLE`",
            )
            .into()
        })
    };
    let ca_pem = read("tls.ca", &resolve(file, &config.tls.ca))?;
    let cert_path = resolve(file, &config.tls.cert);
    let cert_pem = read("tls.cert", &cert_path)?;
    let key_pem = read("tls.key", &resolve(file, &config.tls.key))?;
    check_certificate(file, &cert_path, &cert_pem, &name, &role)?;
    let settings = Settings {
        name,
        role,
        environment,
        state_dir: resolve(file, &config.state_dir),
        coordinator_url: url,
        server_name,
        ca_pem,
        cert_pem,
        key_pem,
        reconnect: config.reconnect.clone(),
        control: config.control.clone(),
        postgres: config.postgres.clone(),
        objects: config.objects.clone(),
        checks: config.checks.clone(),
        invariants: config.invariants.clone(),
        references: config.references.clone(),
        smoke: config.smoke.clone(),
        teardown_allowed: config.restore_test.teardown,
        another_server: config.restore_test.another_server,
        config_file: file.to_path_buf(),
    };
    crate::checks::Checks::from_config(
        file,
        &settings.checks,
        &settings.invariants,
        &settings.references,
        settings.smoke.as_ref(),
    )?;
    crate::data::DataPlane::from_config(
        file,
        settings.name.as_str(),
        settings.environment.as_str(),
        settings.postgres.as_ref(),
        settings.objects.as_ref(),
    )?;
    // Adapter errors (a missing table, an empty command) surface at load, not at first use.
    crate::control::RoleControl::from_config(file, &settings.control, &settings.state_dir)?;
    Ok((settings, config.telemetry))
}

/// Fails at start-up, not at every connection attempt, when the certificate belongs to
/// someone else.
fn check_certificate(
    file: &Path,
    cert_path: &Path,
    pem: &[u8],
    name: &AgentName,
    role: &Role,
) -> Result<()> {
    let identities = api::identity::in_certificate_pem(pem);
    let wanted = Identity::Agent {
        name: name.clone(),
        role: role.clone(),
    };
    if identities.contains(&wanted) {
        return Ok(());
    }
    let carried = if identities.is_empty() {
        "no Rollcall agent identity".to_owned()
    } else {
        identities
            .iter()
            .map(Identity::to_uri)
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(ConfigError::new(
        file,
        format!(
            "tls.cert = {} carries {carried}, but this agent is {name} with role {role}",
            cert_path.display()
        ),
        format!("issue its certificate with `rollcall certs init --dir DIR --agent {name}:{role}`"),
    )
    .into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The shipped agent configs (deploy/) parse, and their checks and data sections are valid.
    #[test]
    fn shipped_configs_are_valid() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        let mut files = vec![deploy.join("agent.toml")];
        for entry in std::fs::read_dir(deploy.join("cowork-sim")).unwrap() {
            let path = entry.unwrap().path();
            // rollcall.toml there is the coordinator's (loaded by its config tests).
            if path.extension().is_some_and(|e| e == "toml")
                && path.file_name().is_some_and(|n| n != "rollcall.toml")
            {
                files.push(path);
            }
        }
        assert!(files.len() >= 7, "{files:?}");
        for file in files {
            let config: AgentConfig =
                load_toml(&file, EXAMPLE).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            crate::checks::Checks::from_config(
                &file,
                &config.checks,
                &config.invariants,
                &config.references,
                config.smoke.as_ref(),
            )
            .unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        }
    }
}
