//! The domain model: what the rest of Rollcall works with instead of prost types.
//!
//! Required fields are non-optional here. Every message is validated once, on receive, by
//! `TryFrom<pb::X>`; sending converts back with `From<X> for pb::X`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::pb::agent as pb;
use crate::pb::operator as op;

/// A message failed validation; names the field and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Invalid {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

fn check_token(field: &'static str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Invalid::new(field, format!("longer than {max} characters")));
    }
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(Invalid::new(
            field,
            format!(
                "{value:?} must start with a lowercase letter or digit and hold only a-z, 0-9, '-', '_', '.'"
            ),
        ));
    }
    Ok(())
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, Invalid> {
                check_token($field, value, 64)?;
                Ok($name(value.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad` honours width and alignment, so names line up in tables.
                f.pad(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Invalid;
            fn try_from(value: String) -> Result<Self, Invalid> {
                $name::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

token_type!(
    /// An agent's unique name within a coordinator, e.g. `web-1`.
    AgentName,
    "agent name"
);
token_type!(
    /// A role: `web`, `worker`, `scheduler`, `gateway`, `database`, `objects`, or a custom name.
    Role,
    "role"
);
token_type!(
    /// An environment name, e.g. `private-beta`.
    Environment,
    "environment"
);

/// The coordinator's fencing token. Zero is never issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(u64);

impl Epoch {
    pub fn new(value: u64) -> Result<Epoch, Invalid> {
        if value == 0 {
            return Err(Invalid::new("epoch", "must be at least 1"));
        }
        Ok(Epoch(value))
    }
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The deterministic id of one command (run, phase, agent, attempt); agents dedupe on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommandId(String);

impl CommandId {
    pub fn parse(value: &str) -> Result<CommandId, Invalid> {
        if value.is_empty() {
            return Err(Invalid::new("command_id", "must not be empty"));
        }
        if value.len() > 256 {
            return Err(Invalid::new("command_id", "longer than 256 characters"));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(Invalid::new("command_id", "holds control characters"));
        }
        Ok(CommandId(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn to_unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

pub fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn required_time(field: &'static str, ms: i64) -> Result<SystemTime, Invalid> {
    if ms <= 0 {
        return Err(Invalid::new(
            field,
            "must be a positive Unix time in milliseconds",
        ));
    }
    Ok(from_unix_ms(ms))
}

// ---------------------------------------------------------------------------------------------
// Agent → coordinator

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
    pub version: String,
    pub highest_epoch: Option<Epoch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub ready: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessage {
    Hello(Hello),
    Heartbeat(Heartbeat),
    Result(CommandResult),
    Progress(CommandProgress),
}

/// How far a long command has come (best effort; the result is what counts).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// What the command is doing now: `listing`, `copying`, `restoring`, `done`...
    pub stage: String,
    pub objects_done: u64,
    pub objects_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Objects or bytes actually written (the rest were already in place).
    pub objects_copied: u64,
    pub bytes_copied: u64,
    /// What the `objects_*` fields count: `objects`, or `archives` of a Postgres dump (empty:
    /// objects).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

/// [`Progress`] of one command, as it travels up the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandProgress {
    pub command_id: CommandId,
    pub epoch: Epoch,
    pub run_id: String,
    pub progress: Progress,
}

impl TryFrom<pb::CommandProgress> for CommandProgress {
    type Error = Invalid;
    fn try_from(m: pb::CommandProgress) -> Result<Self, Invalid> {
        if m.stage.len() > 64 {
            return Err(Invalid::new("progress stage", "longer than 64 characters"));
        }
        if m.unit.len() > 16 {
            return Err(Invalid::new("progress unit", "longer than 16 characters"));
        }
        if m.run_id.len() > 128 {
            return Err(Invalid::new(
                "progress run_id",
                "longer than 128 characters",
            ));
        }
        Ok(CommandProgress {
            command_id: CommandId::parse(&m.command_id)?,
            epoch: Epoch::new(m.epoch)?,
            run_id: m.run_id,
            progress: Progress {
                stage: m.stage,
                objects_done: m.objects_done,
                objects_total: m.objects_total,
                bytes_done: m.bytes_done,
                bytes_total: m.bytes_total,
                objects_copied: m.objects_copied,
                bytes_copied: m.bytes_copied,
                unit: m.unit,
            },
        })
    }
}

impl From<CommandProgress> for pb::CommandProgress {
    fn from(m: CommandProgress) -> Self {
        let p = m.progress;
        pb::CommandProgress {
            command_id: m.command_id.to_string(),
            epoch: m.epoch.get(),
            run_id: m.run_id,
            stage: p.stage,
            objects_done: p.objects_done,
            objects_total: p.objects_total,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            objects_copied: p.objects_copied,
            bytes_copied: p.bytes_copied,
            unit: p.unit,
        }
    }
}

impl TryFrom<pb::Hello> for Hello {
    type Error = Invalid;
    fn try_from(m: pb::Hello) -> Result<Self, Invalid> {
        for cap in &m.capabilities {
            check_token("capability", cap, 64)?;
        }
        if m.version.is_empty() {
            return Err(Invalid::new("version", "must not be empty"));
        }
        Ok(Hello {
            name: AgentName::parse(&m.name)?,
            role: Role::parse(&m.role)?,
            environment: Environment::parse(&m.environment)?,
            capabilities: m.capabilities,
            version: m.version,
            highest_epoch: Epoch::new(m.highest_epoch).ok(),
        })
    }
}

impl From<Hello> for pb::Hello {
    fn from(m: Hello) -> Self {
        pb::Hello {
            name: m.name.into(),
            role: m.role.into(),
            environment: m.environment.into(),
            capabilities: m.capabilities,
            version: m.version,
            highest_epoch: m.highest_epoch.map_or(0, Epoch::get),
        }
    }
}

impl TryFrom<pb::AgentMessage> for AgentMessage {
    type Error = Invalid;
    fn try_from(m: pb::AgentMessage) -> Result<Self, Invalid> {
        match m.msg {
            Some(pb::agent_message::Msg::Hello(h)) => Ok(AgentMessage::Hello(h.try_into()?)),
            Some(pb::agent_message::Msg::Heartbeat(h)) => Ok(AgentMessage::Heartbeat(Heartbeat {
                ready: h.ready,
                detail: h.detail,
            })),
            Some(pb::agent_message::Msg::Result(r)) => Ok(AgentMessage::Result(r.try_into()?)),
            Some(pb::agent_message::Msg::Progress(p)) => Ok(AgentMessage::Progress(p.try_into()?)),
            None => Err(Invalid::new("agent message", "is empty")),
        }
    }
}

impl From<AgentMessage> for pb::AgentMessage {
    fn from(m: AgentMessage) -> Self {
        let msg = match m {
            AgentMessage::Hello(h) => pb::agent_message::Msg::Hello(h.into()),
            AgentMessage::Heartbeat(h) => pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                ready: h.ready,
                detail: h.detail,
            }),
            AgentMessage::Result(r) => pb::agent_message::Msg::Result(r.into()),
            AgentMessage::Progress(p) => pb::agent_message::Msg::Progress(p.into()),
        };
        pb::AgentMessage { msg: Some(msg) }
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinator → agent

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub epoch: Epoch,
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    Command(Command),
}

/// What a command asks an agent to do. Later issues add freeze, scale, backup, restore, verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Answer, after holding for `hold` (a diagnostic for latency and deadlines).
    Ping { hold: Duration },
    /// Describe the agent and its state directory.
    Describe,
    /// Put the role into read-only maintenance.
    Freeze,
    /// Lift maintenance.
    Unfreeze,
    /// Run this many replicas of the role.
    Scale(ScaleTarget),
    /// Restart the role's processes.
    Restart,
    BackupPostgres {
        repository: RepositoryRef,
        point: String,
    },
    SnapshotObjects {
        repository: RepositoryRef,
        point: String,
    },
    Preflight {
        repository: RepositoryRef,
        point: String,
    },
    RestorePostgres {
        repository: RepositoryRef,
        point: String,
    },
    RestoreObjects {
        repository: RepositoryRef,
        point: String,
        shard: u32,
        shards: u32,
    },
    Verify {
        repository: RepositoryRef,
        point: String,
    },
    /// Run the agent's smoke command; `point` is the run's recovery point, if any.
    Smoke {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        point: Option<String>,
    },
    /// Whether the keys restored rows refer to exist in the agent's live store.
    CheckObjects(Vec<ObjectReferences>),
}

/// The object keys one reference query of a database agent returned (all rows up to its limit,
/// else a random sample), for the objects agent to look up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectReferences {
    pub name: String,
    pub keys: Vec<String>,
    /// Rows the query returned in all.
    pub total: u64,
    /// `keys` is a random sample of `total` rows.
    pub sampled: bool,
    pub required: bool,
}

impl From<pb::ObjectReferences> for ObjectReferences {
    fn from(r: pb::ObjectReferences) -> Self {
        ObjectReferences {
            name: r.name,
            keys: r.keys,
            total: r.total,
            sampled: r.sampled,
            required: r.required,
        }
    }
}

impl From<ObjectReferences> for pb::ObjectReferences {
    fn from(r: ObjectReferences) -> Self {
        pb::ObjectReferences {
            name: r.name,
            keys: r.keys,
            total: r.total,
            sampled: r.sampled,
            required: r.required,
        }
    }
}

/// A backup repository as commands name it: its URL and S3 connection settings; never
/// credentials (agents read those from their own environment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryRef {
    pub url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: bool,
}

impl From<pb::Repository> for RepositoryRef {
    fn from(r: pb::Repository) -> Self {
        RepositoryRef {
            url: r.url,
            s3_endpoint: (!r.s3_endpoint.is_empty()).then_some(r.s3_endpoint),
            s3_region: (!r.s3_region.is_empty()).then_some(r.s3_region),
            s3_path_style: r.s3_path_style,
        }
    }
}

impl From<RepositoryRef> for pb::Repository {
    fn from(r: RepositoryRef) -> Self {
        pb::Repository {
            url: r.url,
            s3_endpoint: r.s3_endpoint.unwrap_or_default(),
            s3_region: r.s3_region.unwrap_or_default(),
            s3_path_style: r.s3_path_style,
        }
    }
}

fn repository(r: Option<pb::Repository>) -> Result<RepositoryRef, Invalid> {
    match r {
        Some(r) if !r.url.is_empty() => Ok(r.into()),
        _ => Err(Invalid::new("repository", "is missing")),
    }
}

/// Point ids are the repository's (`20261125T093740Z-prod-399b4d21`); the repository parses
/// them fully, this only keeps the wire free of anything that is not an id.
fn point_id(p: String) -> Result<String, Invalid> {
    if p.is_empty() || p.len() > 128 {
        return Err(Invalid::new("point_id", "must hold 1 to 128 characters"));
    }
    if !p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Invalid::new(
            "point_id",
            format!("{p:?} holds characters other than letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(p)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScaleTarget {
    Replicas(u32),
    /// The count before this run first scaled the role.
    Prior,
}

impl Action {
    /// Whether executing the action changes anything outside the agent; such results are
    /// recorded durably (fsync) before they are reported.
    pub fn has_side_effects(&self) -> bool {
        match self {
            Action::Ping { .. } | Action::Describe => false,
            Action::Freeze | Action::Unfreeze | Action::Scale(_) | Action::Restart => true,
            Action::BackupPostgres { .. }
            | Action::SnapshotObjects { .. }
            | Action::RestorePostgres { .. }
            | Action::RestoreObjects { .. } => true,
            // Checks change nothing; a smoke drives the role through one real operation.
            Action::Preflight { .. } | Action::Verify { .. } | Action::CheckObjects(_) => false,
            Action::Smoke { .. } => true,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Action::Ping { .. } => "ping",
            Action::Describe => "describe",
            Action::Freeze => "freeze",
            Action::Unfreeze => "unfreeze",
            Action::Scale(_) => "scale",
            Action::Restart => "restart",
            Action::BackupPostgres { .. } => "backup-postgres",
            Action::SnapshotObjects { .. } => "snapshot-objects",
            Action::Preflight { .. } => "preflight",
            Action::RestorePostgres { .. } => "restore-postgres",
            Action::RestoreObjects { .. } => "restore-objects",
            Action::Verify { .. } => "verify",
            Action::Smoke { .. } => "smoke",
            Action::CheckObjects(_) => "check-objects",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: CommandId,
    pub epoch: Epoch,
    pub run_id: String,
    pub deadline: SystemTime,
    /// W3C trace context (`traceparent`, `tracestate`).
    pub trace_context: BTreeMap<String, String>,
    pub action: Action,
}

impl TryFrom<pb::Command> for Command {
    type Error = Invalid;
    fn try_from(m: pb::Command) -> Result<Self, Invalid> {
        let action = match m.action {
            Some(pb::command::Action::Ping(p)) => Action::Ping {
                hold: Duration::from_millis(p.hold_ms),
            },
            Some(pb::command::Action::Describe(_)) => Action::Describe,
            Some(pb::command::Action::Freeze(_)) => Action::Freeze,
            Some(pb::command::Action::Unfreeze(_)) => Action::Unfreeze,
            Some(pb::command::Action::Restart(_)) => Action::Restart,
            Some(pb::command::Action::BackupPostgres(a)) => Action::BackupPostgres {
                repository: repository(a.repository)?,
                point: point_id(a.point_id)?,
            },
            Some(pb::command::Action::SnapshotObjects(a)) => Action::SnapshotObjects {
                repository: repository(a.repository)?,
                point: point_id(a.point_id)?,
            },
            Some(pb::command::Action::Preflight(a)) => Action::Preflight {
                repository: repository(a.repository)?,
                point: point_id(a.point_id)?,
            },
            Some(pb::command::Action::RestorePostgres(a)) => Action::RestorePostgres {
                repository: repository(a.repository)?,
                point: point_id(a.point_id)?,
            },
            Some(pb::command::Action::Verify(a)) => Action::Verify {
                repository: repository(a.repository)?,
                point: point_id(a.point_id)?,
            },
            Some(pb::command::Action::Smoke(a)) => Action::Smoke {
                point: if a.point_id.is_empty() {
                    None
                } else {
                    Some(point_id(a.point_id)?)
                },
            },
            Some(pb::command::Action::CheckObjects(c)) => {
                Action::CheckObjects(c.sets.into_iter().map(Into::into).collect())
            }
            Some(pb::command::Action::RestoreObjects(a)) => {
                if a.shards == 0 || a.shard >= a.shards {
                    return Err(Invalid::new(
                        "restore_objects shard",
                        format!("{} of {} is not a shard", a.shard, a.shards),
                    ));
                }
                Action::RestoreObjects {
                    repository: repository(a.repository)?,
                    point: point_id(a.point_id)?,
                    shard: a.shard,
                    shards: a.shards,
                }
            }
            Some(pb::command::Action::Scale(s)) => Action::Scale(match s.target {
                Some(pb::scale::Target::Replicas(n)) => ScaleTarget::Replicas(n),
                Some(pb::scale::Target::Prior(true)) => ScaleTarget::Prior,
                Some(pb::scale::Target::Prior(false)) | None => {
                    return Err(Invalid::new("scale target", "is missing"));
                }
            }),
            None => {
                return Err(Invalid::new(
                    "command action",
                    "is missing or unknown to this agent",
                ));
            }
        };
        Ok(Command {
            id: CommandId::parse(&m.command_id)?,
            epoch: Epoch::new(m.epoch)?,
            run_id: m.run_id,
            deadline: required_time("deadline", m.deadline_unix_ms)?,
            trace_context: m.trace_context.into_iter().collect(),
            action,
        })
    }
}

impl From<Command> for pb::Command {
    fn from(m: Command) -> Self {
        let action = match m.action {
            Action::Ping { hold } => pb::command::Action::Ping(pb::Ping {
                hold_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            }),
            Action::Describe => pb::command::Action::Describe(pb::Describe {}),
            Action::Freeze => pb::command::Action::Freeze(pb::Freeze {}),
            Action::Unfreeze => pb::command::Action::Unfreeze(pb::Unfreeze {}),
            Action::Restart => pb::command::Action::Restart(pb::Restart {}),
            Action::BackupPostgres { repository, point } => {
                pb::command::Action::BackupPostgres(pb::BackupPostgres {
                    repository: Some(repository.into()),
                    point_id: point,
                })
            }
            Action::SnapshotObjects { repository, point } => {
                pb::command::Action::SnapshotObjects(pb::SnapshotObjects {
                    repository: Some(repository.into()),
                    point_id: point,
                })
            }
            Action::Preflight { repository, point } => {
                pb::command::Action::Preflight(pb::Preflight {
                    repository: Some(repository.into()),
                    point_id: point,
                })
            }
            Action::RestorePostgres { repository, point } => {
                pb::command::Action::RestorePostgres(pb::RestorePostgres {
                    repository: Some(repository.into()),
                    point_id: point,
                })
            }
            Action::Verify { repository, point } => pb::command::Action::Verify(pb::Verify {
                repository: Some(repository.into()),
                point_id: point,
            }),
            Action::Smoke { point } => pb::command::Action::Smoke(pb::Smoke {
                point_id: point.unwrap_or_default(),
            }),
            Action::CheckObjects(sets) => pb::command::Action::CheckObjects(pb::CheckObjects {
                sets: sets.into_iter().map(Into::into).collect(),
            }),
            Action::RestoreObjects {
                repository,
                point,
                shard,
                shards,
            } => pb::command::Action::RestoreObjects(pb::RestoreObjects {
                repository: Some(repository.into()),
                point_id: point,
                shard,
                shards,
            }),
            Action::Scale(target) => pb::command::Action::Scale(pb::Scale {
                target: Some(match target {
                    ScaleTarget::Replicas(n) => pb::scale::Target::Replicas(n),
                    ScaleTarget::Prior => pb::scale::Target::Prior(true),
                }),
            }),
        };
        pb::Command {
            command_id: m.id.0,
            epoch: m.epoch.get(),
            run_id: m.run_id,
            deadline_unix_ms: to_unix_ms(m.deadline),
            trace_context: m.trace_context.into_iter().collect(),
            action: Some(action),
        }
    }
}

impl TryFrom<pb::CoordinatorMessage> for CoordinatorMessage {
    type Error = Invalid;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, Invalid> {
        match m.msg {
            Some(pb::coordinator_message::Msg::Welcome(w)) => {
                if w.heartbeat_interval_ms == 0 {
                    return Err(Invalid::new("heartbeat_interval_ms", "must be positive"));
                }
                Ok(CoordinatorMessage::Welcome(Welcome {
                    epoch: Epoch::new(w.epoch)?,
                    heartbeat_interval: Duration::from_millis(w.heartbeat_interval_ms),
                }))
            }
            Some(pb::coordinator_message::Msg::Command(c)) => {
                Ok(CoordinatorMessage::Command(c.try_into()?))
            }
            None => Err(Invalid::new("coordinator message", "is empty")),
        }
    }
}

impl From<CoordinatorMessage> for pb::CoordinatorMessage {
    fn from(m: CoordinatorMessage) -> Self {
        let msg = match m {
            CoordinatorMessage::Welcome(w) => pb::coordinator_message::Msg::Welcome(pb::Welcome {
                epoch: w.epoch.get(),
                heartbeat_interval_ms: u64::try_from(w.heartbeat_interval.as_millis())
                    .unwrap_or(u64::MAX),
            }),
            CoordinatorMessage::Command(c) => pb::coordinator_message::Msg::Command(c.into()),
        };
        pb::CoordinatorMessage { msg: Some(msg) }
    }
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    StaleEpoch,
    Unsupported,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::StaleEpoch => "stale_epoch",
            Outcome::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
    pub version: String,
    pub highest_epoch: Option<Epoch>,
    pub recorded_results: u64,
    pub started: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultDetail {
    Ping {
        executions: u64,
    },
    Describe(Description),
    /// Structured output of the other actions; its shape is the action's (e.g. `ScaleOutput`).
    Output(serde_json::Value),
}

/// What `Scale` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleOutput {
    /// Replicas before this command.
    pub before: u32,
    /// Replicas now.
    pub now: u32,
    /// The count `prior` returns to for this run.
    pub prior: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: CommandId,
    pub epoch: Epoch,
    pub outcome: Outcome,
    pub message: String,
    /// True when the agent answered from its record of an earlier execution.
    pub replayed: bool,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub detail: Option<ResultDetail>,
}

impl TryFrom<pb::CommandResult> for CommandResult {
    type Error = Invalid;
    fn try_from(m: pb::CommandResult) -> Result<Self, Invalid> {
        let outcome = match pb::Outcome::try_from(m.outcome) {
            Ok(pb::Outcome::Succeeded) => Outcome::Succeeded,
            Ok(pb::Outcome::Failed) => Outcome::Failed,
            Ok(pb::Outcome::TimedOut) => Outcome::TimedOut,
            Ok(pb::Outcome::StaleEpoch) => Outcome::StaleEpoch,
            Ok(pb::Outcome::Unsupported) => Outcome::Unsupported,
            Ok(pb::Outcome::Unspecified) | Err(_) => {
                return Err(Invalid::new(
                    "outcome",
                    format!("unknown value {}", m.outcome),
                ));
            }
        };
        let detail = match m.detail {
            None => None,
            Some(pb::command_result::Detail::Ping(p)) => Some(ResultDetail::Ping {
                executions: p.executions,
            }),
            Some(pb::command_result::Detail::Describe(d)) => {
                Some(ResultDetail::Describe(Description {
                    name: AgentName::parse(&d.name)?,
                    role: Role::parse(&d.role)?,
                    environment: Environment::parse(&d.environment)?,
                    capabilities: d.capabilities,
                    version: d.version,
                    highest_epoch: Epoch::new(d.highest_epoch).ok(),
                    recorded_results: d.recorded_results,
                    started: from_unix_ms(d.started_unix_ms),
                }))
            }
            Some(pb::command_result::Detail::OutputJson(text)) => Some(ResultDetail::Output(
                serde_json::from_str(&text)
                    .map_err(|e| Invalid::new("result output", format!("is not JSON ({e})")))?,
            )),
        };
        Ok(CommandResult {
            command_id: CommandId::parse(&m.command_id)?,
            epoch: Epoch::new(m.epoch)?,
            outcome,
            message: m.message,
            replayed: m.replayed,
            started: from_unix_ms(m.started_unix_ms),
            finished: from_unix_ms(m.finished_unix_ms),
            detail,
        })
    }
}

impl From<CommandResult> for pb::CommandResult {
    fn from(m: CommandResult) -> Self {
        let outcome = match m.outcome {
            Outcome::Succeeded => pb::Outcome::Succeeded,
            Outcome::Failed => pb::Outcome::Failed,
            Outcome::TimedOut => pb::Outcome::TimedOut,
            Outcome::StaleEpoch => pb::Outcome::StaleEpoch,
            Outcome::Unsupported => pb::Outcome::Unsupported,
        };
        let detail = m.detail.map(|d| match d {
            ResultDetail::Ping { executions } => {
                pb::command_result::Detail::Ping(pb::PingResult { executions })
            }
            ResultDetail::Describe(d) => pb::command_result::Detail::Describe(pb::DescribeResult {
                name: d.name.into(),
                role: d.role.into(),
                environment: d.environment.into(),
                capabilities: d.capabilities,
                version: d.version,
                highest_epoch: d.highest_epoch.map_or(0, Epoch::get),
                recorded_results: d.recorded_results,
                started_unix_ms: to_unix_ms(d.started),
            }),
            ResultDetail::Output(value) => {
                pb::command_result::Detail::OutputJson(value.to_string())
            }
        });
        pb::CommandResult {
            command_id: m.command_id.0,
            epoch: m.epoch.get(),
            outcome: outcome as i32,
            message: m.message,
            replayed: m.replayed,
            started_unix_ms: to_unix_ms(m.started),
            finished_unix_ms: to_unix_ms(m.finished),
            detail,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operator API

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Connected,
    Unavailable,
}

/// One row of `rollcall agents`. Its serde form is the stable `--json` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
    pub version: String,
    pub availability: Availability,
    pub ready: bool,
    pub detail: String,
    pub last_heartbeat_unix_ms: i64,
    pub connected_since_unix_ms: i64,
    pub peer_address: String,
}

impl TryFrom<op::AgentStatus> for AgentStatus {
    type Error = Invalid;
    fn try_from(m: op::AgentStatus) -> Result<Self, Invalid> {
        let availability = match op::Availability::try_from(m.availability) {
            Ok(op::Availability::Connected) => Availability::Connected,
            Ok(op::Availability::Unavailable) => Availability::Unavailable,
            Ok(op::Availability::Unspecified) | Err(_) => {
                return Err(Invalid::new(
                    "availability",
                    format!("unknown value {}", m.availability),
                ));
            }
        };
        Ok(AgentStatus {
            name: AgentName::parse(&m.name)?,
            role: Role::parse(&m.role)?,
            environment: Environment::parse(&m.environment)?,
            capabilities: m.capabilities,
            version: m.version,
            availability,
            ready: m.ready,
            detail: m.detail,
            last_heartbeat_unix_ms: m.last_heartbeat_unix_ms,
            connected_since_unix_ms: m.connected_since_unix_ms,
            peer_address: m.peer_address,
        })
    }
}

impl From<AgentStatus> for op::AgentStatus {
    fn from(m: AgentStatus) -> Self {
        let availability = match m.availability {
            Availability::Connected => op::Availability::Connected,
            Availability::Unavailable => op::Availability::Unavailable,
        };
        op::AgentStatus {
            name: m.name.into(),
            role: m.role.into(),
            environment: m.environment.into(),
            capabilities: m.capabilities,
            version: m.version,
            availability: availability as i32,
            ready: m.ready,
            detail: m.detail,
            last_heartbeat_unix_ms: m.last_heartbeat_unix_ms,
            connected_since_unix_ms: m.connected_since_unix_ms,
            peer_address: m.peer_address,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> Command {
        Command {
            id: CommandId::parse("run-1/phase-0/web-1/1").expect("valid"),
            epoch: Epoch::new(7).expect("valid"),
            run_id: "run-1".into(),
            deadline: from_unix_ms(1_800_000_000_000),
            trace_context: BTreeMap::from([("traceparent".into(), "00-abc-def-01".into())]),
            action: Action::Ping {
                hold: Duration::from_millis(250),
            },
        }
    }

    #[test]
    fn command_round_trips_through_the_wire_type() {
        let wire: pb::Command = command().into();
        assert_eq!(Command::try_from(wire), Ok(command()));
        let check = Command {
            action: Action::CheckObjects(vec![ObjectReferences {
                name: "artifact objects".into(),
                keys: vec!["artifacts/a".into(), "artifacts/b".into()],
                total: 7,
                sampled: true,
                required: true,
            }]),
            ..command()
        };
        let wire: pb::Command = check.clone().into();
        assert_eq!(Command::try_from(wire), Ok(check));
    }

    #[test]
    fn rejects_commands_missing_required_fields() {
        type Mutation = fn(&mut pb::Command);
        let cases: [(&str, Mutation); 4] = [
            ("command_id", |c| c.command_id.clear()),
            ("epoch", |c| c.epoch = 0),
            ("deadline", |c| c.deadline_unix_ms = 0),
            ("command action", |c| c.action = None),
        ];
        for (field, mutate) in cases {
            let mut wire: pb::Command = command().into();
            mutate(&mut wire);
            let err = Command::try_from(wire).expect_err(field);
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(
            format!("[{:<7}]", AgentName::parse("web-1").expect("valid")),
            "[web-1  ]"
        );
        assert!(AgentName::parse("web-1").is_ok());
        assert!(AgentName::parse("").is_err());
        assert!(AgentName::parse("Web").is_err());
        assert!(AgentName::parse("-web").is_err());
        assert!(AgentName::parse("web/1").is_err());
        assert!(AgentName::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn hello_requires_a_valid_role_and_version() {
        let good = pb::Hello {
            name: "db-1".into(),
            role: "database".into(),
            environment: "dev".into(),
            capabilities: vec!["postgres".into()],
            version: "0.1.0".into(),
            highest_epoch: 0,
        };
        let hello = Hello::try_from(good.clone()).expect("valid hello");
        assert_eq!(hello.highest_epoch, None);
        let mut bad = good.clone();
        bad.role = "Data Base".into();
        assert_eq!(Hello::try_from(bad).expect_err("bad role").field, "role");
        let mut bad = good;
        bad.version.clear();
        assert_eq!(
            Hello::try_from(bad).expect_err("no version").field,
            "version"
        );
    }

    #[test]
    fn result_round_trips_and_rejects_unknown_outcomes() {
        let result = CommandResult {
            command_id: CommandId::parse("c1").expect("valid"),
            epoch: Epoch::new(3).expect("valid"),
            outcome: Outcome::TimedOut,
            message: "deadline passed".into(),
            replayed: true,
            started: from_unix_ms(1_000),
            finished: from_unix_ms(2_000),
            detail: Some(ResultDetail::Ping { executions: 2 }),
        };
        let wire: pb::CommandResult = result.clone().into();
        assert_eq!(CommandResult::try_from(wire.clone()), Ok(result));
        let mut bad = wire;
        bad.outcome = 99;
        assert_eq!(
            CommandResult::try_from(bad).expect_err("unknown").field,
            "outcome"
        );
    }
}
