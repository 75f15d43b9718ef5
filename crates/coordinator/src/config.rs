//! The coordinator's config file (`rollcall.toml`): listeners, TLS, state store, agent
//! liveness, operator tokens, telemetry. See `deploy/rollcall.toml` for a commented example.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use api::config::{ConfigError, TelemetryConfig, TlsConfig, load_toml, resolve};
use serde::Deserialize;

use crate::cron::BackupSchedule;
use crate::plan::Plan;
use crate::tls::TlsPaths;

pub const EXAMPLE: &str = "deploy/rollcall.toml";

/// The most approvals an environment may ask for: more is a typo, not a policy.
pub const MAX_APPROVALS: u32 = 10;

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
    /// One table per environment: objectives, repository, schedule, declared fleet.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentConfig>,
    /// `[[notify]]`: webhooks told when runs finish, block or fail.
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// `[metrics]`: how often the values read from repositories are refreshed.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// How often each environment's recoverable window (base backups and archived WAL) is
    /// read for the RPO gauges (`rollcall_wal_newest_age_seconds`); default 1 minute.
    #[serde(with = "humantime_serde", default = "default_observe_interval")]
    pub observe_interval: Duration,
}

fn default_observe_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            observe_interval: default_observe_interval(),
        }
    }
}

/// `[[notify]]`: a webhook the coordinator POSTs signed run events to (see `notify`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// `https://...` (or `http://`, for a receiver on a trusted network).
    pub url: String,
    /// Which of `run.finished`, `run.blocked`, `run.failed`; all when unset.
    pub events: Option<Vec<String>>,
    /// The signing key, as a reference, never the value: `env:NAME` (a variable of the
    /// coordinator's environment) or `file:PATH` (relative to this file; one trailing newline
    /// is ignored).
    pub secret: Option<String>,
    /// One attempt's limit.
    #[serde(with = "humantime_serde", default = "default_notify_timeout")]
    pub timeout: Duration,
    /// Attempts after a first one that failed for a reason that may pass.
    #[serde(default = "default_notify_retries")]
    pub retries: usize,
    /// The wait before the first retry; it doubles, with jitter, up to a minute.
    #[serde(with = "humantime_serde", default = "default_notify_backoff")]
    pub backoff: Duration,
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_notify_retries() -> usize {
    5
}

fn default_notify_backoff() -> Duration {
    Duration::from_secs(1)
}

/// `[environments.NAME]`: what an environment promises (RPO, RTO, retention), where its
/// recovery points live, and which agents belong to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// The newest recovery point may be at most this old.
    #[serde(with = "humantime_serde")]
    pub rpo: Duration,
    /// A restore must finish within this.
    #[serde(with = "humantime_serde")]
    pub rto: Duration,
    /// Recovery points (Postgres and objects alike) are kept this long.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// The backup repository: an object_store URL (`file://` relative to this file, `s3://`,
    /// `gs://`, `az://`). A restore-test environment has none of its own: it reads its
    /// source's points from the source's repository.
    pub repository: Option<String>,
    /// When the coordinator takes backups: a cron expression (minute hour day month weekday).
    pub backup_schedule: Option<String>,
    /// When the coordinator takes physical base backups (the database agent's
    /// `[postgres.physical]` server): a cron expression like `backup_schedule`'s.
    pub base_backup_schedule: Option<String>,
    /// The restore plan; the embedded default plan when unset.
    pub plan: Option<PathBuf>,
    /// The declared fleet: agents per role. Gates count against it, so an agent that never
    /// connected counts as not ready.
    pub fleet: BTreeMap<String, u32>,
    /// S3-compatible repositories: endpoint (e.g. DigitalOcean Spaces), region, path-style.
    /// Credentials come from the AWS_* environment of the coordinator and the agents.
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    #[serde(default)]
    pub s3_path_style: bool,
    /// Secret references recorded in every point (names, managers, versions, KMS refs; never
    /// values): a TOML file of [[secret]] tables, and/or inline [[environments.NAME.secret]].
    pub secrets_file: Option<PathBuf>,
    #[serde(default, rename = "secret")]
    pub secrets: Vec<repository::SecretRef>,
    /// How the drill report names this service's counts.
    #[serde(default)]
    pub report: ReportConfig,
    /// Drills, recoveries and undos of a protected environment take an admin
    /// (`access::needed`).
    #[serde(default)]
    pub protected: bool,
    /// The two-person rule: a drill, recovery or undo of this (protected) environment waits
    /// at an `approve` phase, before anything is frozen, until this many operators other
    /// than the one who started it ran `rollcall run approve RUN`. 0: none.
    #[serde(default)]
    pub approvals: u32,
    /// How long a run waits for its approvals before it blocks.
    #[serde(with = "humantime_serde", default = "default_approval_timeout")]
    pub approval_timeout: Duration,
    /// A restore-test environment: its drills restore the points of this environment into
    /// this environment's own fleet (never the source's), verify them, and tear down.
    pub restore_from: Option<String>,
    /// A restore test's teardown: `always`, `on-success` (the default) or `never`.
    pub teardown: Option<String>,
    /// When the coordinator runs a restore test (restore-test environments only): a cron
    /// expression like `backup_schedule`'s.
    pub drill_schedule: Option<String>,
    /// Which point a scheduled restore test takes: `latest` (the default).
    pub point: Option<String>,
    /// Or a random point of the source committed within this long before the run.
    #[serde(rename = "random-within", with = "humantime_serde", default)]
    pub random_within: Option<Duration>,
    /// What restores Postgres to a time (`--to-time`): `repository` (the default: base
    /// backups and WAL in the repository, `[postgres.physical]`) or `provider` (a managed
    /// provider's own, through the database agent's `[postgres.provider]` adapter).
    #[serde(default)]
    pub pitr: Pitr,
}

/// `[environments.NAME] pitr`: whose point-in-time recovery a run to a time uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pitr {
    /// Base backups and WAL archived in the environment's repository: the coordinator checks
    /// the window before it starts the run.
    #[default]
    Repository,
    /// The managed provider's own: its window is the database agent's adapter's to report,
    /// at preflight.
    Provider,
}

fn default_approval_timeout() -> Duration {
    Duration::from_secs(3600)
}

/// `[environments.NAME.report]`: the drill report's runbook rows for this service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// The rows the runbook asks for, in its order, each a label and the count it shows. Counts
    /// no row names follow, labelled by their key; with no rows, every count is listed so.
    #[serde(default)]
    pub rows: Vec<ReportRow>,
    /// Data this service leaves out of every restore on purpose (the runbook's "data
    /// intentionally excluded"), e.g. "local Desktop threads (stay local)"; `rollcall drill
    /// --exclude TEXT` adds to it for one run.
    #[serde(default)]
    pub excluded: Vec<String>,
}

/// One runbook row of the drill report: `{ label = "Sessions", count = "sessions" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRow {
    pub label: String,
    /// A key of a point's `table_counts`: `table`, `schema.table`, or `table[column=value]`
    /// for the rows of a table counted by a column (the database agent's `"table:column"`).
    pub count: String,
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
    /// New attachments admitted a second. After a coordinator restart the whole fleet
    /// reconnects at once; a second's worth more wait their turn and the rest are refused
    /// (the agents retry with backoff).
    #[serde(default = "default_attach_rate")]
    pub attach_rate: u64,
}

fn default_attach_rate() -> u64 {
    crate::limits::DEFAULT_ATTACH_RATE
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
            attach_rate: default_attach_rate(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// SHA-256 (hex) of each accepted operator bearer token; never the token itself.
    /// `printf %s "$TOKEN" | sha256sum` prints one. These tokens are admins named `token`.
    #[serde(default)]
    pub token_sha256: Vec<String>,
    /// Named tokens with a role: `[[operator.token]] name = "alice", role = "viewer",
    /// sha256 = "..."`.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// How long an operator call may take; `run watch`, `points verify` and `points prune`
    /// are exempt (`limits::LONG_CALLS`).
    #[serde(with = "humantime_serde", default = "default_call_timeout")]
    pub call_timeout: Duration,
    /// Operator calls served at once; one more is refused at once, asking to try again.
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: usize,
}

/// `[[operator.token]]`: one operator's bearer token (its SHA-256), name and role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    pub sha256: String,
}

fn default_call_timeout() -> Duration {
    crate::limits::DEFAULT_OPERATOR_CALL_TIMEOUT
}

fn default_max_concurrent_calls() -> usize {
    crate::limits::DEFAULT_OPERATOR_CALLS
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            token_sha256: Vec::new(),
            tokens: Vec::new(),
            call_timeout: default_call_timeout(),
            max_concurrent_calls: default_max_concurrent_calls(),
        }
    }
}

/// A loaded config with its paths resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: PathBuf,
    pub config: CoordinatorConfig,
    pub tls: TlsPaths,
    pub state_url: String,
    /// The unnamed `operator.token_sha256` (admins).
    pub token_hashes: Vec<[u8; 32]>,
    /// The named `[[operator.token]]`s.
    pub tokens: Vec<crate::grpc::OperatorToken>,
    pub environments: BTreeMap<String, Environment>,
    /// The `[[notify]]` webhooks, their secrets read.
    pub notify: Vec<crate::notify::Webhook>,
}

impl Loaded {
    /// The limits of the gRPC services this config asks for.
    pub fn limits(&self) -> crate::limits::Limits {
        crate::limits::Limits {
            attaches: self.config.agents.attach_rate,
            attach_window: Duration::from_secs(1),
            operator_calls: self.config.operator.max_concurrent_calls,
            operator_call_timeout: self.config.operator.call_timeout,
        }
    }
}

/// An environment with its paths resolved and its plan validated against its fleet.
#[derive(Debug, Clone)]
pub struct Environment {
    pub name: api::model::Environment,
    pub rpo: Duration,
    pub rto: Duration,
    pub retention: Duration,
    pub repository: String,
    pub backup_schedule: Option<String>,
    /// `base_backup_schedule`: when base-backup runs start (`schedule.rs`).
    pub base_backup_schedule: Option<String>,
    pub fleet: crate::plan::Fleet,
    pub plan: Plan,
    pub backup_plan: Plan,
    pub repository_ref: api::model::RepositoryRef,
    pub secrets: Vec<repository::SecretRef>,
    /// The drill report's runbook rows, validated; empty when none are configured.
    pub report_rows: Vec<ReportRow>,
    /// Data left out of every restore on purpose (`[environments.NAME.report] excluded`).
    pub report_excluded: Vec<String>,
    /// Drills, recoveries and undos take an admin.
    pub protected: bool,
    /// Approvals a drill, recovery or undo waits for (0: none), and for how long.
    pub approvals: u32,
    pub approval_timeout: Duration,
    /// Set on a restore-test environment (`restore_from`).
    pub restore_test: Option<RestoreTest>,
    /// Whose point-in-time recovery a run to a time uses.
    pub pitr: Pitr,
}

/// What makes an environment a restore-test environment: whose points it restores, what its
/// teardown drops, and when it runs by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreTest {
    /// The environment whose points are restored here; never commanded by these runs.
    pub source: String,
    pub teardown: Teardown,
    /// `drill_schedule`, validated.
    pub schedule: Option<String>,
    pub pick: PointPick,
}

/// When a restore test tears down what it restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    Always,
    OnSuccess,
    Never,
}

impl Teardown {
    pub fn parse(text: &str) -> Option<Teardown> {
        match text {
            "always" => Some(Teardown::Always),
            "on-success" => Some(Teardown::OnSuccess),
            "never" => Some(Teardown::Never),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Teardown::Always => "always",
            Teardown::OnSuccess => "on-success",
            Teardown::Never => "never",
        }
    }
}

/// Which point of the source a scheduled restore test restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointPick {
    Latest,
    /// A random point committed within this long before the run starts.
    RandomWithin(Duration),
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
    for (key, zero, example) in [
        ("agents.attach_rate", config.agents.attach_rate == 0, "500"),
        (
            "metrics.observe_interval",
            config.metrics.observe_interval.is_zero(),
            "\"1m\"",
        ),
        (
            "operator.max_concurrent_calls",
            config.operator.max_concurrent_calls == 0,
            "64",
        ),
        (
            "operator.call_timeout",
            config.operator.call_timeout.is_zero(),
            "\"60s\"",
        ),
    ] {
        if zero {
            bail!(ConfigError::new(
                file,
                format!("{key} must be positive"),
                format!("set it to e.g. {example}, or remove it for the default")
            ));
        }
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
    let tokens = named_tokens(file, &config.operator.tokens)?;
    let state_url = resolve_sqlite_url(file, &config.state.url);
    let mut environments = BTreeMap::new();
    for (name, env) in &config.environments {
        environments.insert(name.clone(), environment(file, name, env)?);
    }
    restore_tests(file, &config.environments, &mut environments)?;
    shared_wal_archives(file, &environments)?;
    let notify = config
        .notify
        .iter()
        .enumerate()
        .map(|(i, n)| webhook(file, i, n))
        .collect::<Result<_>>()?;
    Ok(Loaded {
        file: file.to_path_buf(),
        config,
        tls,
        state_url,
        token_hashes,
        tokens,
        environments,
        notify,
    })
}

/// Refuses base backups scheduled into a repository another environment also uses: WAL is
/// archived by segment name alone (`wal/<timeline>/`), so two clusters archiving into one
/// repository collide on their first shared name (the second server's archiver then fails
/// for good and its pg_wal fills), and one environment's window would be read from the other's
/// WAL.
fn shared_wal_archives(file: &Path, environments: &BTreeMap<String, Environment>) -> Result<()> {
    let own: Vec<&Environment> = environments
        .values()
        .filter(|e| e.restore_test.is_none())
        .collect();
    for env in own.iter().filter(|e| e.base_backup_schedule.is_some()) {
        let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
        if let Some(other) = own
            .iter()
            .find(|o| o.name != env.name && same(&o.repository, &env.repository))
        {
            bail!(ConfigError::new(
                file,
                format!(
                    "environments.{}.base_backup_schedule is set, and its repository {} is also \
                     environment {}'s",
                    env.name,
                    repository::redact_url(&env.repository),
                    other.name
                ),
                "give each environment that archives WAL a repository (or prefix) of its own: \
                 WAL segments are archived by name, and two clusters' names collide"
            ));
        }
    }
    Ok(())
}

/// Checks one `[[notify]]` table and reads its secret.
fn webhook(file: &Path, i: usize, n: &NotifyConfig) -> Result<crate::notify::Webhook> {
    use crate::notify::{RunEvent, Secret, Webhook};
    let key = format!("notify[{i}]");
    let url = reqwest::Url::parse(&n.url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
    let Some(url) = url else {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.url {:?} is not an http:// or https:// URL",
                api::redact::redact(&n.url)
            ),
            "write the receiver's URL, e.g. url = \"https://hooks.example.com/rollcall\""
        ));
    };
    let name = format!("{key} ({})", url.host_str().unwrap_or_default());
    let events = match &n.events {
        None => RunEvent::ALL.to_vec(),
        Some(list) => {
            let mut events = Vec::new();
            for text in list {
                match RunEvent::parse(text) {
                    Some(e) if !events.contains(&e) => events.push(e),
                    Some(_) => {}
                    None => bail!(ConfigError::new(
                        file,
                        format!("{key}.events: {text:?} is not a run event"),
                        "name run.finished, run.blocked or run.failed (all three when events is \
                         left out)"
                    )),
                }
            }
            if events.is_empty() {
                bail!(ConfigError::new(
                    file,
                    format!("{key}.events is empty: the webhook would never be called"),
                    "name run.finished, run.blocked or run.failed, or remove the [[notify]] table"
                ));
            }
            events
        }
    };
    const SECRET_FIX: &str = "give the signing key as a reference: secret = \"env:NAME\" (a \
                              variable of the coordinator's environment) or secret = \
                              \"file:PATH\" (a file only the coordinator can read)";
    let Some(reference) = n.secret.as_deref() else {
        bail!(ConfigError::new(
            file,
            format!("{key} has no secret: its deliveries could not be signed"),
            SECRET_FIX
        ));
    };
    let bytes = if let Some(var) = reference.strip_prefix("env:") {
        match std::env::var_os(var) {
            Some(v) => v.into_encoded_bytes(),
            None => bail!(ConfigError::new(
                file,
                format!(
                    "{key}.secret {reference:?}: {var} is not set in the coordinator's environment"
                ),
                format!("set {var} for the coordinator, or point secret at another reference")
            )),
        }
    } else if let Some(path) = reference.strip_prefix("file:") {
        let path = resolve(file, Path::new(path));
        let mut bytes = std::fs::read(&path).map_err(|e| {
            ConfigError::new(
                file,
                format!("{key}.secret: cannot read {} ({e})", path.display()),
                "create the file with the signing key, or fix the path (relative to this file)",
            )
        })?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        bytes
    } else {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.secret is not a reference (env:NAME or file:PATH); a secret's value never \
                 goes in this file"
            ),
            SECRET_FIX
        ));
    };
    if bytes.is_empty() {
        bail!(ConfigError::new(
            file,
            format!("{key}.secret {reference:?} is empty"),
            "put the signing key there (at least 16 random bytes, e.g. `openssl rand -hex 32`)"
        ));
    }
    if n.timeout.is_zero() {
        bail!(ConfigError::new(
            file,
            format!("{key}.timeout must be positive"),
            "set it to e.g. \"10s\", or remove it for the default"
        ));
    }
    if n.retries > crate::notify::MAX_RETRIES {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.retries ({}) is more than {}: one delivery would hold the webhook's \
                 later ones for hours",
                n.retries,
                crate::notify::MAX_RETRIES
            ),
            "retry a few times (the default is 5); a failed delivery is logged and counted"
        ));
    }
    Ok(Webhook {
        name,
        url,
        events,
        secret: Secret::new(bytes),
        timeout: n.timeout,
        retries: n.retries,
        backoff: n.backoff,
    })
}

/// `[[operator.token]]` checked: a valid name, once; a known role; a SHA-256.
fn named_tokens(file: &Path, tokens: &[TokenConfig]) -> Result<Vec<crate::grpc::OperatorToken>> {
    let mut out: Vec<crate::grpc::OperatorToken> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let at = format!("operator.token[{i}]");
        if let Err(e) = api::identity::check_operator_name(&t.name) {
            bail!(ConfigError::new(
                file,
                format!("{at}.name: {e}"),
                "name the operator who holds the token, e.g. name = \"alice\""
            ));
        }
        if out.iter().any(|o| o.name == t.name) {
            bail!(ConfigError::new(
                file,
                format!("{at}.name {:?} is given to another token too", t.name),
                "give each operator's token its own name (approvals count per name)"
            ));
        }
        let role = api::identity::OperatorRole::parse(&t.role).map_err(|e| {
            ConfigError::new(
                file,
                format!("{at}.role: {e}"),
                "set role = \"viewer\", \"operator\" or \"admin\"",
            )
        })?;
        let Some(sha256) = hex::decode(t.sha256.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        else {
            bail!(ConfigError::new(
                file,
                format!("{at}.sha256 (token {:?}) is not 64 hex characters", t.name),
                "store the SHA-256 of the token (printf %s \"$TOKEN\" | sha256sum), never the token"
            ));
        };
        out.push(crate::grpc::OperatorToken {
            name: t.name.clone(),
            role,
            sha256,
        });
    }
    Ok(out)
}

fn environment(file: &Path, name: &str, env: &EnvironmentConfig) -> Result<Environment> {
    let key = format!("environments.{name}");
    let parsed = api::model::Environment::parse(name).map_err(|e| {
        ConfigError::new(
            file,
            format!("[{key}]: {e}"),
            "name environments with letters, digits, '-' and '_'",
        )
    })?;
    for (what, value) in [
        ("rpo", env.rpo),
        ("rto", env.rto),
        ("retention", env.retention),
    ] {
        if value.is_zero() {
            bail!(ConfigError::new(
                file,
                format!("{key}.{what} must be positive"),
                "set a duration such as \"24h\" or \"14days\""
            ));
        }
    }
    if env.retention < env.rpo {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.retention ({}) is shorter than its rpo ({}): no point would be kept long \
                 enough to meet it",
                humantime::format_duration(env.retention),
                humantime::format_duration(env.rpo)
            ),
            "make retention at least the rpo (the runbook keeps 7, 14 or 30 days)"
        ));
    }
    if env.fleet.is_empty() || env.fleet.values().all(|&n| n == 0) {
        bail!(ConfigError::new(
            file,
            format!("{key}.fleet declares no agents"),
            "declare agents per role, e.g. fleet = { web = 1, worker = 2, database = 1, objects = 1 }"
        ));
    }
    for role in env.fleet.keys() {
        if let Err(e) = api::model::Role::parse(role) {
            bail!(ConfigError::new(
                file,
                format!("{key}.fleet: {e}"),
                "name roles with letters, digits, '-' and '_'"
            ));
        }
    }
    if let Some(expr) = &env.backup_schedule
        && let Err(e) = BackupSchedule::parse(expr)
    {
        bail!(ConfigError::new(
            file,
            format!("{key}.{e}"),
            "fix the expression, or remove backup_schedule to back up only on demand"
        ));
    }
    if let Some(expr) = &env.base_backup_schedule {
        if env.pitr == Pitr::Provider {
            bail!(ConfigError::new(
                file,
                format!("{key}.base_backup_schedule is set, and {key}.pitr is \"provider\""),
                "the provider keeps its own backups for its point-in-time recovery: remove \
                 base_backup_schedule (or pitr, to restore from the repository's base backups)"
            ));
        }
        if let Err(e) = BackupSchedule::parse(expr) {
            bail!(ConfigError::new(
                file,
                format!(
                    "{key}.base_backup_schedule: {}",
                    api::errors::one_line(&*e).replace("backup_schedule ", "")
                ),
                "fix the expression (e.g. \"0 3 * * *\": daily at 03:00 UTC), or remove \
                 base_backup_schedule to take base backups only on demand"
            ));
        }
        if env.restore_from.is_none() && env.fleet.get("database").copied().unwrap_or(0) == 0 {
            bail!(ConfigError::new(
                file,
                format!(
                    "{key}.base_backup_schedule is set, but {key}.fleet declares no database agent"
                ),
                "declare the database agent that takes them (fleet = { database = 1, ... }, with \
                 [postgres.physical] in its agent.toml), or remove base_backup_schedule"
            ));
        }
    }
    let repository = match (&env.repository, &env.restore_from) {
        (Some(url), None) => resolve_file_url(file, url),
        (None, None) => bail!(ConfigError::new(
            file,
            format!("{key}.repository is missing"),
            "name the backup repository, e.g. repository = \"s3://bucket/prefix\" (or make the \
             environment a restore test with restore_from = \"SOURCE\")"
        )),
        (Some(_), Some(source)) => bail!(ConfigError::new(
            file,
            format!(
                "{key}.repository is set on a restore-test environment (restore_from = \
                 {source:?})"
            ),
            format!(
                "remove it: a restore test reads {source}'s points from \
                 environments.{source}.repository"
            )
        )),
        // Filled in from the source by `restore_tests`.
        (None, Some(_)) => String::new(),
    };
    if env.restore_from.is_none()
        && !["file://", "s3://", "gs://", "az://", "azure://"]
            .iter()
            .any(|p| repository.starts_with(p))
    {
        bail!(ConfigError::new(
            file,
            format!("{key}.repository {repository:?} is not a supported URL",),
            "use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
        ));
    }
    let plan = match (&env.plan, &env.restore_from) {
        (Some(path), _) => Plan::load(&resolve(file, path), Some(&env.fleet)),
        (None, None) => Plan::default_plan(Some(&env.fleet)),
        (None, Some(_)) => Plan::restore_test_plan(&env.fleet),
    }
    .map_err(|e| {
        anyhow::Error::new(api::errors::Problems::from(e))
            .context(format!("{}: [{key}] plan", file.display()))
    })?;
    let backup_plan = Plan::backup_plan(&env.fleet).map_err(|e| {
        anyhow::Error::new(api::errors::Problems::from(e))
            .context(format!("{}: [{key}] backup plan", file.display()))
    })?;
    let mut sources = vec![repository::SecretRefSource::List(env.secrets.clone())];
    if let Some(f) = &env.secrets_file {
        sources.push(repository::SecretRefSource::File(resolve(file, f)));
    }
    let secrets = repository::load_secret_refs(&sources)
        .map_err(|e| e.context(format!("{}: [{key}] secrets", file.display())))?;
    check_report_rows(file, &key, &env.report.rows)?;
    if env.approvals > 0 && !env.protected {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.approvals = {} on an environment that is not protected",
                env.approvals
            ),
            "set protected = true too (approvals are the two-person rule of protected \
             environments), or remove approvals"
        ));
    }
    if env.approvals > MAX_APPROVALS {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.approvals = {} is more than {MAX_APPROVALS}",
                env.approvals
            ),
            "ask for 1 or 2 approvals"
        ));
    }
    if env.approval_timeout.is_zero() || env.approval_timeout > crate::plan::MAX_PHASE_TIMEOUT {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.approval_timeout ({}) must be positive and at most {} days",
                humantime::format_duration(env.approval_timeout),
                crate::plan::MAX_PHASE_TIMEOUT_DAYS
            ),
            "set a duration such as \"1h\", or remove it for the default (1h)"
        ));
    }
    if plan.restore_test && env.restore_from.is_none() {
        bail!(ConfigError::new(
            file,
            format!(
                "{key}.plan {} restores without freezing (restore_test = true), but {name} is \
                 not a restore-test environment",
                plan.name
            ),
            format!(
                "use such a plan only on an environment with restore_from = \"SOURCE\"; drills \
                 of {name} itself need a plan that freezes writes"
            )
        ));
    }
    if env.restore_from.is_none() {
        for (what, set) in [
            ("teardown", env.teardown.is_some()),
            ("drill_schedule", env.drill_schedule.is_some()),
            ("point", env.point.is_some()),
            ("random-within", env.random_within.is_some()),
        ] {
            if set {
                bail!(ConfigError::new(
                    file,
                    format!("{key}.{what} is set, but {name} is not a restore-test environment"),
                    format!(
                        "add restore_from = \"SOURCE\" to restore SOURCE's points into {name}'s \
                         own fleet, or remove {what} (scheduled drills in place would roll {name} \
                         back; they are not offered)"
                    )
                ));
            }
        }
    }
    let repository_ref = api::model::RepositoryRef {
        url: repository.clone(),
        s3_endpoint: env.s3_endpoint.clone(),
        s3_region: env.s3_region.clone(),
        s3_path_style: env.s3_path_style,
    };
    Ok(Environment {
        name: parsed,
        rpo: env.rpo,
        rto: env.rto,
        retention: env.retention,
        repository,
        backup_schedule: env.backup_schedule.clone(),
        base_backup_schedule: env.base_backup_schedule.clone(),
        fleet: env.fleet.clone(),
        plan,
        backup_plan,
        repository_ref,
        secrets,
        report_rows: env.report.rows.clone(),
        report_excluded: env.report.excluded.clone(),
        protected: env.protected,
        approvals: env.approvals,
        approval_timeout: env.approval_timeout,
        restore_test: None,
        pitr: env.pitr,
    })
}

/// The second pass over the environments: each restore-test environment's source is checked
/// (declared, not itself, not a restore test), its repository taken from the source, and its
/// teardown, schedule and point choice read.
fn restore_tests(
    file: &Path,
    configs: &BTreeMap<String, EnvironmentConfig>,
    environments: &mut BTreeMap<String, Environment>,
) -> Result<()> {
    for (name, env) in configs {
        let Some(source) = &env.restore_from else {
            continue;
        };
        let key = format!("environments.{name}");
        let fix_source = format!(
            "set restore_from to the environment whose points {name} tests (declared: {})",
            configs
                .iter()
                .filter(|(n, c)| *n != name && c.restore_from.is_none())
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if source == name {
            bail!(ConfigError::new(
                file,
                format!("{key}.restore_from names {name} itself"),
                fix_source
            ));
        }
        let Some(source_config) = configs.get(source) else {
            bail!(ConfigError::new(
                file,
                format!("{key}.restore_from names {source:?}, which is not a declared environment"),
                fix_source
            ));
        };
        if let Some(further) = &source_config.restore_from {
            bail!(ConfigError::new(
                file,
                format!(
                    "{key}.restore_from names {source}, which is itself a restore test (of \
                     {further}) and has no points of its own"
                ),
                format!("set restore_from = {further:?} to test {further}'s points")
            ));
        }
        for role in ["database", "objects"] {
            if env.fleet.get(role).copied().unwrap_or(0) == 0
                && source_config.fleet.get(role).copied().unwrap_or(0) > 0
            {
                bail!(ConfigError::new(
                    file,
                    format!(
                        "{key}.fleet declares no {role} agent, but {source}'s points hold {role} \
                         data a restore test must restore"
                    ),
                    format!(
                        "declare a {role} agent of {name}, pointed at a target that is not \
                         {source}'s (another database or bucket), e.g. fleet = {{ database = 1, \
                         objects = 1 }}"
                    )
                ));
            }
        }
        if let Some(setting) = [
            ("backup_schedule", &env.backup_schedule),
            ("base_backup_schedule", &env.base_backup_schedule),
        ]
        .into_iter()
        .find_map(|(k, v)| v.as_ref().map(|_| k))
        {
            bail!(ConfigError::new(
                file,
                format!("{key}.{setting} is set on a restore-test environment"),
                format!(
                    "remove it: {name} holds restored copies of {source}'s data, and its points \
                     are {source}'s (back up {source})"
                )
            ));
        }
        let teardown = match env.teardown.as_deref() {
            None => Teardown::OnSuccess,
            Some(text) => Teardown::parse(text).ok_or_else(|| {
                ConfigError::new(
                    file,
                    format!("{key}.teardown {text:?} is not a teardown"),
                    "write teardown = \"always\", \"on-success\" (the default) or \"never\"",
                )
            })?,
        };
        if let Some(expr) = &env.drill_schedule
            && let Err(e) = BackupSchedule::parse(expr)
        {
            bail!(ConfigError::new(
                file,
                format!(
                    "{key}.drill_schedule: {}",
                    api::errors::one_line(&*e).replace("backup_schedule ", "")
                ),
                "fix the expression (e.g. \"0 4 * * *\": daily at 04:00 UTC), or remove \
                 drill_schedule to run restore tests only on demand"
            ));
        }
        let pick = match (env.point.as_deref(), env.random_within) {
            (Some("latest") | None, None) => PointPick::Latest,
            (None, Some(window)) if !window.is_zero() => PointPick::RandomWithin(window),
            (None, Some(_)) => bail!(ConfigError::new(
                file,
                format!("{key}.random-within must be positive"),
                "set a window such as \"7d\", or remove it to test the latest point"
            )),
            (Some(other), None) => bail!(ConfigError::new(
                file,
                format!("{key}.point {other:?} is not a point choice"),
                "write point = \"latest\", or random-within = \"7d\" for a random recent point"
            )),
            (Some(_), Some(_)) => bail!(ConfigError::new(
                file,
                format!("{key} sets both point and random-within"),
                "keep one: point = \"latest\" or random-within = \"7d\""
            )),
        };
        let (repository, repository_ref) = match environments.get(source) {
            Some(s) => (s.repository.clone(), s.repository_ref.clone()),
            None => bail!("environment {source} was not loaded before its restore test {name}"),
        };
        if let Some(target) = environments.get_mut(name) {
            target.repository = repository;
            target.repository_ref = repository_ref;
            target.restore_test = Some(RestoreTest {
                source: source.clone(),
                teardown,
                schedule: env.drill_schedule.clone(),
                pick,
            });
        }
    }
    Ok(())
}

/// Refuses a report row with no label, a count that is no count key, or a count two rows show.
fn check_report_rows(file: &Path, key: &str, rows: &[ReportRow]) -> Result<()> {
    const FIX: &str = "name a key of a point's table_counts: `table`, `schema.table`, or \
                       `table[column=value]` for a table counted by a column, e.g. \
                       { label = \"Pending deliveries\", count = \"deliveries[status=pending]\" }";
    for (i, row) in rows.iter().enumerate() {
        let at = format!("{key}.report.rows[{i}]");
        if row.label.trim().is_empty() {
            bail!(ConfigError::new(
                file,
                format!("{at}.label is empty (count {:?})", row.count),
                "give the row the label the report shows, e.g. label = \"Sessions\""
            ));
        }
        if let Err(why) = check_count_key(&row.count) {
            bail!(ConfigError::new(
                file,
                format!("{at}.count {:?} (row {:?}) {why}", row.count, row.label),
                FIX
            ));
        }
        if let Some(first) = rows[..i].iter().position(|r| r.count == row.count) {
            bail!(ConfigError::new(
                file,
                format!(
                    "{at}.count {:?} is already shown by {key}.report.rows[{first}] ({:?})",
                    row.count, rows[first].label
                ),
                "show each count once: remove one of the rows"
            ));
        }
    }
    Ok(())
}

/// Whether `count` can be a key of a point's `table_counts`; the reason when it cannot.
fn check_count_key(count: &str) -> std::result::Result<(), &'static str> {
    if count.trim().is_empty() {
        return Err("is empty");
    }
    if count.trim() != count {
        return Err("has spaces around it");
    }
    let Some((table, rest)) = count.split_once('[') else {
        return match count.contains([']', '=']) {
            true => Err("has `]` or `=` without `table[column=value]` around them"),
            false => Ok(()),
        };
    };
    let Some(group) = rest.strip_suffix(']') else {
        return Err("opens `[` but does not end with `]`");
    };
    let Some((column, _value)) = group.split_once('=') else {
        return Err("has no `=` between the brackets (`table[column=value]`)");
    };
    if table.is_empty() || table.contains(']') {
        return Err("names no table before `[`");
    }
    if column.is_empty() || column.contains(['[', ']']) {
        return Err("names no column before `=`");
    }
    Ok(())
}

/// Makes a relative `file://` path relative to the config file.
fn resolve_file_url(file: &Path, url: &str) -> String {
    match url.strip_prefix("file://") {
        Some(path) if !path.starts_with('/') => {
            // Absolute even when the config was named by a relative path (`--config
            // deploy/rollcall.toml`): `file://deploy/...` would read `deploy` as a host.
            let path = resolve(file, Path::new(path));
            let path = std::path::absolute(&path).unwrap_or(path);
            format!("file://{}", path.display())
        }
        _ => url.to_owned(),
    }
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

impl Loaded {
    /// What a running coordinator needs of each environment beyond its config parsing: a
    /// repository URL a store can be built from (for `file://`, a path; the first backup
    /// creates the directory). No network call (a store that is briefly unreachable must not stop a coordinator from
    /// starting); `rollcall coordinator` refuses to start on the first problem, naming it.
    pub fn check_repositories(&self) -> Result<()> {
        // A restore-test environment's repository is its source's, checked under the source.
        for (name, env) in self
            .environments
            .iter()
            .filter(|(_, e)| e.restore_test.is_none())
        {
            let key = format!("environments.{name}.repository");
            let shown = repository::redact_url(&env.repository);
            if env.repository.starts_with("file:") {
                // The first backup creates the directory; the URL must name one (no host).
                if repository::local_dir(&env.repository).is_none() {
                    bail!(ConfigError::new(
                        &self.file,
                        format!("{key} {shown} is not a local directory path"),
                        "write file:///absolute/dir, or file://relative/dir for a path relative to this file"
                    ));
                }
                continue;
            }
            let r = &env.repository_ref;
            let s3 = repository::S3Options::connection(
                r.s3_endpoint.clone(),
                r.s3_region.clone(),
                r.s3_path_style,
            );
            if let Err(e) = repository::store_from_url(&env.repository, &s3) {
                bail!(ConfigError::new(
                    &self.file,
                    format!("{key} {shown}: {}", api::errors::one_line(&*e)),
                    "fix the URL (file:///dir, s3://bucket/prefix, gs://bucket/prefix or \
                     az://container/prefix) and the s3_* settings"
                ));
            }
        }
        Ok(())
    }
}

/// The fleet environment `name` declares in the coordinator config `file`, read without
/// resolving anything else of the environment (its own plan may be broken: `rollcall plan
/// check FILE --env ENV` checks another plan against the fleet).
pub fn declared_fleet(file: &Path, name: &str) -> Result<crate::plan::Fleet> {
    let config: CoordinatorConfig = load_toml(file, EXAMPLE)?;
    match config.environments.get(name) {
        Some(env) => Ok(env.fleet.clone()),
        None => bail!(ConfigError::new(
            file,
            format!(
                "no environment {name:?} (declared: {})",
                config
                    .environments
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("add [environments.{name}] or pick one of those")
        )),
    }
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
        assert!(loaded.environments.is_empty());
        let limits = loaded.limits();
        assert_eq!(limits.attaches, 500);
        assert_eq!(limits.operator_calls, 64);
        assert_eq!(limits.operator_call_timeout, Duration::from_secs(60));
    }

    #[test]
    fn a_repository_no_store_can_use_stops_the_coordinator_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = |url: &str| {
            format!(
                "{MINIMAL}\n[environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\n\
                 retention = \"30days\"\nrepository = \"{url}\"\n\
                 fleet = {{ web = 1, database = 1, objects = 1 }}\n"
            )
        };
        let loaded = load(&write(dir.path(), &env("file://repo/prod"))).expect("load");
        loaded
            .check_repositories()
            .expect("a relative file:// path is fine");
        let loaded = load(&write(dir.path(), &env("s3:///prefix"))).expect("load");
        let err = loaded
            .check_repositories()
            .expect_err("no bucket")
            .to_string();
        assert!(
            err.contains("environments.prod.repository s3:///prefix")
                && err.contains("fix the URL"),
            "{err}"
        );
    }

    #[test]
    fn an_environment_restored_to_a_time_by_its_provider_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = |pitr: &str| {
            format!(
                "{MINIMAL}\n[environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\n\
                 retention = \"30days\"\nrepository = \"file://repo/prod\"\n{pitr}\n\
                 fleet = {{ web = 1, database = 1, objects = 1 }}\n"
            )
        };
        let loaded = load(&write(dir.path(), &env(""))).expect("load");
        assert_eq!(loaded.environments["prod"].pitr, Pitr::Repository);
        let loaded = load(&write(dir.path(), &env("pitr = \"provider\""))).expect("load");
        assert_eq!(loaded.environments["prod"].pitr, Pitr::Provider);
        let err = format!(
            "{:#}",
            load(&write(dir.path(), &env("pitr = \"rds\""))).expect_err("not a choice")
        );
        assert!(
            err.contains("rollcall.toml") && err.contains("repository") && err.contains("provider"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_example_loads() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/rollcall.toml");
        let loaded = load(&example).expect("deploy/rollcall.toml loads");
        assert_eq!(loaded.environments["staging"].fleet["worker"], 2);
        // Named relative to the working directory (tests run in the crate's directory), as
        // `rollcall coordinator --config deploy/rollcall.toml` does: the repository's file://
        // URL is still an absolute path the store accepts.
        let loaded = load(Path::new("../../deploy/rollcall.toml")).expect("relative path");
        let repository = &loaded.environments["staging"].repository;
        assert!(repository.starts_with("file:///"), "{repository}");
        assert!(
            repository.ends_with("/deploy/repository/staging"),
            "{repository}"
        );
    }

    /// The commented `[[notify]]` example, uncommented, loads as documented.
    #[test]
    fn the_shipped_notify_example_loads_uncommented() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/rollcall.toml");
        let text = std::fs::read_to_string(example).expect("read the example");
        let (before, notify) = text
            .split_once("# [[notify]]")
            .expect("a [[notify]] example");
        let notify: String = notify
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
            // A variable every test process has.
            .replace("env:ROLLCALL_WEBHOOK_SECRET", "env:PATH");
        let dir = tempfile::tempdir().expect("tempdir");
        let loaded =
            load(&write(dir.path(), &format!("{before}[[notify]]{notify}\n"))).expect("loads");
        let [hook] = &loaded.notify[..] else {
            panic!("one webhook: {:?}", loaded.notify)
        };
        assert_eq!(hook.url.as_str(), "https://hooks.example.com/rollcall");
        assert_eq!(hook.events, crate::notify::RunEvent::ALL);
        assert_eq!(
            (hook.timeout, hook.retries, hook.backoff),
            (Duration::from_secs(10), 5, Duration::from_secs(1))
        );
    }

    #[test]
    fn the_cowork_sim_example_maps_the_runbook_rows() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/cowork-sim/rollcall.toml");
        let loaded = load(&example).expect("deploy/cowork-sim/rollcall.toml loads");
        let rows = &loaded.environments["staging"].report_rows;
        assert_eq!(rows.len(), 8);
        assert_eq!(
            (rows[0].label.as_str(), rows[0].count.as_str()),
            ("Sessions", "sessions")
        );
        assert_eq!(rows[7].count, "channel_deliveries[status=dead]");
        assert_eq!(
            loaded.environments["staging"].report_excluded,
            ["local Desktop threads (they stay local unless users import them)"]
        );
        // The generic example names no service's rows.
        let generic = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/rollcall.toml");
        assert!(
            load(&generic).expect("loads").environments["staging"]
                .report_rows
                .is_empty()
        );
    }

    #[test]
    fn environments_resolve_their_repository_and_plan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "{MINIMAL}\n[environments.staging]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"14days\"\n\
             repository = \"file://repo/staging\"\nbackup_schedule = \"0 3 * * *\"\n\
             fleet = {{ web = 1, worker = 2, scheduler = 1, gateway = 1, database = 1, objects = 1 }}\n"
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        let env = &loaded.environments["staging"];
        assert_eq!(
            env.repository,
            format!("file://{}", dir.path().join("repo/staging").display())
        );
        assert_eq!(env.plan.name, "default");
        assert_eq!(env.fleet["worker"], 2);
        assert_eq!(env.base_backup_schedule, None);

        // A base-backup schedule beside the logical one, seconds first.
        let text = text.replace(
            "backup_schedule = \"0 3 * * *\"\n",
            "backup_schedule = \"0 3 * * *\"\nbase_backup_schedule = \"*/3 * * * * *\"\n",
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        let env = &loaded.environments["staging"];
        assert_eq!(env.base_backup_schedule.as_deref(), Some("*/3 * * * * *"));
        assert_eq!(env.backup_schedule.as_deref(), Some("0 3 * * *"));
    }

    fn with_report(rows: &str) -> String {
        format!(
            "{MINIMAL}\n[environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"14days\"\n\
             repository = \"file://repo\"\n\
             fleet = {{ web = 1, worker = 1, scheduler = 1, gateway = 1, database = 1, objects = 1 }}\n\
             [environments.prod.report]\nrows = [{rows}]\n"
        )
    }

    #[test]
    fn report_rows_keep_their_order_and_default_to_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = with_report(
            r#"{ label = "Orders", count = "orders" },
               { label = "Audit", count = "audit.events" },
               { label = "Failed jobs", count = "jobs[state=failed]" },
               { label = "Untitled", count = "docs[title=]" }"#,
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        let rows = &loaded.environments["prod"].report_rows;
        let pairs: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.label.as_str(), r.count.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("Orders", "orders"),
                ("Audit", "audit.events"),
                ("Failed jobs", "jobs[state=failed]"),
                ("Untitled", "docs[title=]"),
            ]
        );

        // Declared exclusions are kept as written, in order.
        let text = format!(
            "{}excluded = [\"local Desktop threads\", \"diagnostics bundles\"]\n",
            with_report("")
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        assert_eq!(
            loaded.environments["prod"].report_excluded,
            ["local Desktop threads", "diagnostics bundles"]
        );

        // No [report]: no rows, so no service's labels.
        let text = with_report("").replace("[environments.prod.report]\nrows = []\n", "");
        let loaded = load(&write(dir.path(), &text)).expect("load");
        assert!(loaded.environments["prod"].report_rows.is_empty());
    }

    #[test]
    fn bad_report_rows_are_refused_naming_environment_row_and_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (rows, problem) in [
            (
                r#"{ label = "", count = "orders" }"#,
                "environments.prod.report.rows[0].label is empty (count \"orders\")",
            ),
            (
                r#"{ label = "Orders", count = "orders" }, { label = "Jobs", count = "" }"#,
                "environments.prod.report.rows[1].count \"\" (row \"Jobs\") is empty",
            ),
            (
                r#"{ label = "Failed", count = "jobs[state=failed" }"#,
                "rows[0].count \"jobs[state=failed\" (row \"Failed\") opens `[` but does not end with `]`",
            ),
            (
                r#"{ label = "Failed", count = "jobs[failed]" }"#,
                "has no `=` between the brackets",
            ),
            (
                r#"{ label = "Failed", count = "jobs[=failed]" }"#,
                "names no column before `=`",
            ),
            (
                r#"{ label = "Failed", count = "[state=failed]" }"#,
                "names no table before `[`",
            ),
            (
                r#"{ label = "Failed", count = "jobs state=failed" }"#,
                "has `]` or `=` without `table[column=value]` around them",
            ),
            (
                r#"{ label = "Orders", count = " orders" }"#,
                "has spaces around it",
            ),
            (
                r#"{ label = "Orders", count = "orders" }, { label = "All orders", count = "orders" }"#,
                "rows[1].count \"orders\" is already shown by environments.prod.report.rows[0] (\"Orders\")",
            ),
        ] {
            let err = load(&write(dir.path(), &with_report(rows))).expect_err(rows);
            let text = err.to_string();
            assert!(text.contains(problem), "{rows}: {text}");
            assert!(text.contains("rollcall.toml: "), "{text}");
        }
        // The fix names the key forms.
        let err = load(&write(
            dir.path(),
            &with_report(r#"{ label = "Failed", count = "jobs[failed]" }"#),
        ))
        .expect_err("malformed");
        assert!(err.to_string().contains("`table[column=value]`"), "{err}");
        // A row with another field is refused by name.
        let err = load(&write(
            dir.path(),
            &with_report(r#"{ label = "Orders", table = "orders" }"#),
        ))
        .expect_err("unknown field");
        assert!(format!("{err:#}").contains("table"), "{err:#}");
    }

    #[test]
    fn notify_webhooks_load_with_their_secret_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hook.key"), "k3y\n").expect("write key");
        let text = format!(
            "{MINIMAL}\n[[notify]]\nurl = \"https://hooks.example.com/rollcall?t=1\"\n\
             secret = \"file:hook.key\"\n\
             [[notify]]\nurl = \"http://127.0.0.1:9/hook\"\nevents = [\"run.blocked\", \"run.failed\"]\n\
             secret = \"env:PATH\"\ntimeout = \"2s\"\nretries = 1\nbackoff = \"50ms\"\n"
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        let [all, some] = &loaded.notify[..] else {
            panic!("two webhooks: {:?}", loaded.notify)
        };
        assert_eq!(all.name, "notify[0] (hooks.example.com)");
        assert_eq!(all.events, crate::notify::RunEvent::ALL);
        assert_eq!(
            (all.timeout, all.retries, all.backoff),
            (Duration::from_secs(10), 5, Duration::from_secs(1))
        );
        // The file's trailing newline is not part of the key: same signature as "k3y".
        assert_eq!(
            crate::notify::signature(&all.secret, 1, b"x"),
            crate::notify::signature(&crate::notify::Secret::new(b"k3y".to_vec()), 1, b"x")
        );
        use crate::notify::RunEvent;
        assert_eq!(some.events, [RunEvent::Blocked, RunEvent::Failed]);
        assert_eq!(
            (some.timeout, some.retries, some.backoff),
            (Duration::from_secs(2), 1, Duration::from_millis(50))
        );
        // The secret never shows in the config's Debug form.
        assert!(!format!("{loaded:?}").contains("k3y"));
    }

    #[test]
    fn bad_notify_tables_are_refused_naming_the_key_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (table, problem, fix) in [
            (
                "url = \"ftp://hooks.example.com/x\"\nsecret = \"env:PATH\"",
                "notify[0].url \"ftp://hooks.example.com/x\" is not an http:// or https:// URL",
                "e.g. url = ",
            ),
            (
                "url = \"hooks.example.com/x\"\nsecret = \"env:PATH\"",
                "notify[0].url \"hooks.example.com/x\" is not an http:// or https:// URL",
                "e.g. url = ",
            ),
            (
                "url = \"https://hooks.example.com/x\"",
                "notify[0] has no secret",
                "secret = \"env:NAME\"",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"hunter2\"",
                "notify[0].secret is not a reference (env:NAME or file:PATH)",
                "secret = \"file:PATH\"",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"env:ROLLCALL_TEST_SURELY_UNSET_9F2\"",
                "ROLLCALL_TEST_SURELY_UNSET_9F2 is not set in the coordinator's environment",
                "set ROLLCALL_TEST_SURELY_UNSET_9F2 for the coordinator",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"file:missing.key\"",
                "notify[0].secret: cannot read",
                "create the file",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"env:PATH\"\nevents = [\"run.done\"]",
                "notify[0].events: \"run.done\" is not a run event",
                "run.finished, run.blocked or run.failed",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"env:PATH\"\nevents = []",
                "notify[0].events is empty",
                "remove the [[notify]] table",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"env:PATH\"\ntimeout = \"0s\"",
                "notify[0].timeout must be positive",
                "\"10s\"",
            ),
            (
                "url = \"https://hooks.example.com/x\"\nsecret = \"env:PATH\"\nretries = 21",
                "notify[0].retries (21) is more than 20",
                "the default is 5",
            ),
        ] {
            let text = format!("{MINIMAL}\n[[notify]]\n{table}\n");
            let err = load(&write(dir.path(), &text))
                .expect_err(table)
                .to_string();
            assert!(err.contains(problem), "{table}: {err}");
            assert!(err.contains(fix), "{table}: {err}");
            assert!(err.contains("rollcall.toml"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        std::fs::write(dir.path().join("empty.key"), "\n").expect("write");
        let text = format!(
            "{MINIMAL}\n[[notify]]\nurl = \"https://h.example.com/\"\nsecret = \"file:empty.key\"\n"
        );
        let err = load(&write(dir.path(), &text))
            .expect_err("empty")
            .to_string();
        assert!(
            err.contains("notify[0].secret \"file:empty.key\" is empty"),
            "{err}"
        );
        // Another key in the table is refused by name.
        let text = format!(
            "{MINIMAL}\n[[notify]]\nurl = \"https://h.example.com/\"\nsecret = \"env:PATH\"\nheaders = 1\n"
        );
        let err = load(&write(dir.path(), &text)).expect_err("unknown key");
        assert!(
            format!("{err:#}").contains("unknown field `headers`"),
            "{err:#}"
        );
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

        let text = format!(
            "{MINIMAL}\n[environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"1h\"\n\
             repository = \"file://repo\"\nfleet = {{ web = 1 }}\n"
        );
        let err = load(&write(dir.path(), &text)).expect_err("retention below rpo");
        assert!(
            err.to_string()
                .contains("environments.prod.retention (1h) is shorter than its rpo (1day)"),
            "{err}"
        );

        // The default plan fits itself to the fleet, but not down to restoring nothing.
        let text = format!(
            "{MINIMAL}\n[environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"30days\"\n\
             repository = \"file://repo\"\nfleet = {{ web = 1 }}\n"
        );
        let err = load(&write(dir.path(), &text)).expect_err("a plan that restores nothing");
        let err = api::errors::one_line(&*err);
        assert!(
            err.contains("[environments.prod] plan\n  deploy/plans/default.toml: the environment declares no agents for any store this plan restores"),
            "{err}"
        );

        let text = format!("{MINIMAL}\n[operator]\nmax_concurrent_calls = 0\n");
        let err = load(&write(dir.path(), &text)).expect_err("no calls at all");
        assert!(
            err.to_string()
                .contains("operator.max_concurrent_calls must be positive"),
            "{err}"
        );

        let text = MINIMAL.replace("[tls]", "[tls]\ncafile = \"x\"");
        let err = load(&write(dir.path(), &text)).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `cafile`"), "{err}");
    }

    #[test]
    fn named_tokens_and_protected_environments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = "a".repeat(64);
        let env = |extra: &str| {
            format!(
                "{MINIMAL}\n[operator]\ntoken_sha256 = [\"{hash}\"]\n\
                 [[operator.token]]\nname = \"alice\"\nrole = \"viewer\"\nsha256 = \"{hash}\"\n\
                 [environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"30days\"\n\
                 repository = \"file://repo\"\nfleet = {{ web = 1, database = 1, objects = 1 }}\n{extra}"
            )
        };
        let loaded = load(&write(
            dir.path(),
            &env("protected = true\napprovals = 1\n"),
        ))
        .expect("load");
        assert_eq!(loaded.token_hashes.len(), 1, "the unnamed list still works");
        assert_eq!(loaded.tokens.len(), 1);
        assert_eq!(loaded.tokens[0].name, "alice");
        assert_eq!(loaded.tokens[0].role, api::identity::OperatorRole::Viewer);
        let prod = &loaded.environments["prod"];
        assert!(prod.protected);
        assert_eq!(prod.approvals, 1);
        assert_eq!(prod.approval_timeout, Duration::from_secs(3600));

        let unprotected = load(&write(dir.path(), &env(""))).expect("load");
        assert!(!unprotected.environments["prod"].protected);
        assert_eq!(unprotected.environments["prod"].approvals, 0);

        let err = load(&write(dir.path(), &env("approvals = 1\n"))).expect_err("not protected");
        assert!(
            err.to_string().contains(
                "environments.prod.approvals = 1 on an environment that is not protected"
            ),
            "{err}"
        );
        let err = load(&write(
            dir.path(),
            &env("protected = true\napprovals = 1\napproval_timeout = \"0s\"\n"),
        ))
        .expect_err("zero timeout");
        assert!(
            err.to_string()
                .contains("environments.prod.approval_timeout (0s)"),
            "{err}"
        );

        let bad_role = env("").replace("role = \"viewer\"", "role = \"root\"");
        let err = load(&write(dir.path(), &bad_role)).expect_err("unknown role");
        assert!(
            err.to_string()
                .contains("operator.token[0].role: operator role \"root\" is not one of viewer, operator, admin"),
            "{err}"
        );
        let bad_hash = env("").replace(&format!("sha256 = \"{hash}\""), "sha256 = \"token\"");
        let err = load(&write(dir.path(), &bad_hash)).expect_err("not a hash");
        assert!(
            err.to_string()
                .contains("operator.token[0].sha256 (token \"alice\") is not 64 hex characters"),
            "{err}"
        );
    }

    fn restore_test_config(rt: &str) -> String {
        format!(
            "{MINIMAL}\n[environments.prod]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"30days\"\n\
             repository = \"file://repo\"\nfleet = {{ web = 1, database = 1, objects = 1 }}\n\
             [environments.rt]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"30days\"\n{rt}\n"
        )
    }

    #[test]
    fn a_restore_test_environment_reads_its_source_repository_with_its_own_plan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = restore_test_config(
            "restore_from = \"prod\"\nfleet = { database = 1, objects = 1 }\n\
             drill_schedule = \"*/10 * * * * *\"\nrandom-within = \"7d\"\n",
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        let (prod, rt) = (&loaded.environments["prod"], &loaded.environments["rt"]);
        assert_eq!(rt.repository, prod.repository);
        assert_eq!(rt.repository_ref, prod.repository_ref);
        assert_eq!(
            rt.restore_test,
            Some(RestoreTest {
                source: "prod".into(),
                teardown: Teardown::OnSuccess,
                schedule: Some("*/10 * * * * *".into()),
                pick: PointPick::RandomWithin(Duration::from_secs(7 * 86400)),
            })
        );
        assert!(rt.plan.restore_test && rt.plan.name == "restore-test");
        assert!(prod.restore_test.is_none() && !prod.plan.restore_test);
        loaded.check_repositories().expect("checked under prod");
        let text = restore_test_config(
            "restore_from = \"prod\"\nfleet = { database = 1, objects = 1 }\nteardown = \"never\"\n",
        );
        let loaded = load(&write(dir.path(), &text)).expect("load");
        let test = loaded.environments["rt"].restore_test.clone().expect("rt");
        assert_eq!(
            (test.teardown, test.pick),
            (Teardown::Never, PointPick::Latest)
        );
    }

    #[test]
    fn restore_test_mistakes_are_one_line_naming_the_key_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = "fleet = { database = 1, objects = 1 }\n";
        let cases: Vec<(String, &[&str])> = vec![
            (
                format!("restore_from = \"staging\"\n{fleet}"),
                &[
                    "environments.rt.restore_from names \"staging\", which is not a declared environment",
                    "prod",
                ],
            ),
            (
                format!("restore_from = \"rt\"\n{fleet}"),
                &["environments.rt.restore_from names rt itself"],
            ),
            (
                "restore_from = \"prod\"\nfleet = { database = 1 }\n".into(),
                &[
                    "environments.rt.fleet declares no objects agent",
                    "declare a objects agent of rt",
                ],
            ),
            (
                format!("restore_from = \"prod\"\n{fleet}repository = \"file://other\"\n"),
                &[
                    "environments.rt.repository is set on a restore-test environment",
                    "remove it",
                ],
            ),
            (
                format!("restore_from = \"prod\"\n{fleet}teardown = \"sometimes\"\n"),
                &[
                    "environments.rt.teardown \"sometimes\" is not a teardown",
                    "on-success",
                ],
            ),
            (
                format!("restore_from = \"prod\"\n{fleet}drill_schedule = \"every day\"\n"),
                &["environments.rt.drill_schedule", "fix the expression"],
            ),
            (
                format!(
                    "restore_from = \"prod\"\n{fleet}point = \"latest\"\nrandom-within = \"7d\"\n"
                ),
                &["environments.rt sets both point and random-within"],
            ),
            (
                format!("restore_from = \"prod\"\n{fleet}point = \"oldest\"\n"),
                &["environments.rt.point \"oldest\" is not a point choice"],
            ),
            (
                format!("restore_from = \"prod\"\n{fleet}backup_schedule = \"0 3 * * *\"\n"),
                &[
                    "environments.rt.backup_schedule is set on a restore-test environment",
                    "back up prod",
                ],
            ),
            (
                format!("restore_from = \"prod\"\n{fleet}base_backup_schedule = \"0 3 * * *\"\n"),
                &[
                    "environments.rt.base_backup_schedule is set on a restore-test environment",
                    "back up prod",
                ],
            ),
            (
                "repository = \"file://r\"\nfleet = { web = 1, database = 1, objects = 1 }\n\
                 base_backup_schedule = \"every hour of day x\"\n"
                    .into(),
                &[
                    "environments.rt.base_backup_schedule: \"every hour of day x\" is not a cron expression",
                    "remove base_backup_schedule to take base backups only on demand",
                ],
            ),
            (
                "repository = \"file://r\"\nfleet = { web = 1, database = 1, objects = 1 }\n\
                 base_backup_schedule = \"0 3 * *\"\n"
                    .into(),
                &["environments.rt.base_backup_schedule: \"0 3 * *\" has 4 fields"],
            ),
            (
                "repository = \"file://r\"\nfleet = { web = 1, objects = 1 }\n\
                 base_backup_schedule = \"0 3 * * *\"\n"
                    .into(),
                &[
                    "environments.rt.base_backup_schedule is set, but environments.rt.fleet \
                     declares no database agent",
                ],
            ),
            (
                "repository = \"file://r\"\nfleet = { web = 1, database = 1, objects = 1 }\n\
                 drill_schedule = \"0 3 * * *\"\n"
                    .into(),
                &[
                    "environments.rt.drill_schedule is set, but rt is not a restore-test environment",
                ],
            ),
            (fleet.to_owned(), &["environments.rt.repository is missing"]),
            (
                "repository = \"file://r\"\nfleet = { web = 1, database = 1, objects = 1 }\n\
                 pitr = \"provider\"\nbase_backup_schedule = \"0 3 * * *\"\n"
                    .into(),
                &[
                    "environments.rt.base_backup_schedule is set, and environments.rt.pitr is \"provider\"",
                ],
            ),
            (
                "repository = \"file://repo\"\nfleet = { web = 1, database = 1, objects = 1 }\n\
                 base_backup_schedule = \"0 3 * * *\"\n"
                    .into(),
                &[
                    "environments.rt.base_backup_schedule is set, and its repository",
                    "is also environment prod's",
                    "a repository (or prefix) of its own",
                ],
            ),
        ];
        for (rt, needles) in cases {
            let err = load(&write(dir.path(), &restore_test_config(&rt)))
                .expect_err(&rt)
                .to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            for needle in needles {
                assert!(err.contains(needle), "{needle:?} in {err}");
            }
        }
        // A restore test of a restore test.
        let text = restore_test_config(&format!("restore_from = \"prod\"\n{fleet}"))
            + "[environments.rt2]\nrpo = \"24h\"\nrto = \"4h\"\nretention = \"30days\"\n\
               restore_from = \"rt\"\nfleet = { database = 1, objects = 1 }\n";
        let err = load(&write(dir.path(), &text))
            .expect_err("chain")
            .to_string();
        assert!(
            err.contains(
                "environments.rt2.restore_from names rt, which is itself a restore test (of prod)"
            ) && err.contains("restore_from = \"prod\""),
            "{err}"
        );
        // The restore-test plan (no freeze) on an environment that serves traffic.
        let plan = dir.path().join("rt-plan.toml");
        std::fs::write(&plan, crate::plan::RESTORE_TEST_PLAN).expect("write plan");
        let text = restore_test_config(&format!(
            "repository = \"file://r\"\nfleet = {{ web = 1, database = 1, objects = 1 }}\n\
             plan = \"{}\"\n",
            plan.display()
        ));
        let err = load(&write(dir.path(), &text))
            .expect_err("plan")
            .to_string();
        assert!(
            err.contains("restores without freezing (restore_test = true), but rt is not a restore-test environment"),
            "{err}"
        );
    }
}
