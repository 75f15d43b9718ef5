//! Coordinator → agent: the welcome and the commands, with the actions they carry.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CommandId, Epoch, Invalid, add_saturating, required_time, to_unix_ms};
use crate::pb::agent as pb;

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
    /// Take a physical base backup of the agent's server, recorded under its environment
    /// (`[postgres.physical]`).
    BaseBackup { repository: RepositoryRef },
    Preflight {
        repository: RepositoryRef,
        point: String,
        /// A restore to a time instead of a point (`point` is then empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_time: Option<DateTime<Utc>>,
    },
    RestorePostgres {
        repository: RepositoryRef,
        point: String,
    },
    /// The first half of `RestorePostgres`: restore into `<db>_restore_<run>` and check its
    /// counts against the point; nothing live changes.
    PreparePostgres {
        repository: RepositoryRef,
        point: String,
        /// A restore to a time instead of a point (`point` is then empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_time: Option<DateTime<Utc>>,
    },
    /// The second half: swap the prepared copy in, keeping the live database renamed.
    CommitPostgres {
        repository: RepositoryRef,
        point: String,
        /// A restore to a time instead of a point (`point` is then empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_time: Option<DateTime<Utc>>,
    },
    /// Undo the database swap of run `undone_run` (its `<db>_pre_<tag>` live again, the
    /// restored database kept as `<db>_undone_<tag>`).
    UndoPostgres { undone_run: String },
    /// A restore test's teardown of what its own run's swap did: the database the swap kept
    /// takes the live name again and the restored one is dropped (restore-test agents only).
    TeardownPostgres,
    /// A restore test's teardown of this shard of what its own run's object restore did, and
    /// of the run's quarantines (restore-test agents only).
    TeardownObjects {
        repository: RepositoryRef,
        shard: u32,
        shards: u32,
    },
    /// List the databases restores and undos kept (`<db>_pre_<tag>`, `<db>_undone_<tag>`).
    ListKept,
    /// Drop these kept databases, named exactly as `ListKept` reported them.
    PruneKept { databases: Vec<String> },
    /// Put this shard of the live store back as it was before run `undone_run`'s object
    /// restore, from the repository's records and quarantine.
    UndoObjects {
        repository: RepositoryRef,
        undone_run: String,
        shard: u32,
        shards: u32,
    },
    RestoreObjects {
        repository: RepositoryRef,
        point: String,
        shard: u32,
        shards: u32,
        /// Objects to a time instead of a point (`point` is then empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_time: Option<DateTime<Utc>>,
    },
    Verify {
        repository: RepositoryRef,
        point: String,
        /// A restore to a time instead of a point (`point` is then empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_time: Option<DateTime<Utc>>,
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

impl RepositoryRef {
    /// Opens the repository with these settings; credentials come from this process's
    /// environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub async fn open(&self) -> anyhow::Result<repository::Repository> {
        let s3 = repository::S3Options::connection(
            self.s3_endpoint.clone(),
            self.s3_region.clone(),
            self.s3_path_style,
        );
        let options = repository::RepositoryOptions {
            s3,
            ..repository::RepositoryOptions::default()
        };
        repository::Repository::open(&self.url, options).await
    }
}

fn repository(r: Option<pb::Repository>) -> Result<RepositoryRef, Invalid> {
    match r {
        Some(r) if !r.url.is_empty() => Ok(r.into()),
        _ => Err(Invalid::new("repository", "is missing")),
    }
}

/// A run id named by a command (the run an undo takes back): same characters as a point id.
fn required_run(r: String) -> Result<String, Invalid> {
    if r.is_empty() || r.len() > 128 {
        return Err(Invalid::new(
            "undone_run_id",
            "must hold 1 to 128 characters",
        ));
    }
    if !r
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Invalid::new(
            "undone_run_id",
            format!("{r:?} holds characters other than letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(r)
}

/// A database a prune-kept names: a Postgres identifier (at most 63 bytes), nothing else. The
/// agent checks that it is a kept copy of its live database.
fn kept_database(name: String) -> Result<String, Invalid> {
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control()) {
        return Err(Invalid::new(
            "prune_kept database",
            format!("{name:?} is not a database name (1 to 63 bytes, no control characters)"),
        ));
    }
    Ok(name)
}

/// Point ids are the repository's (`20261125T093740Z-prod-399b4d21`); the repository parses
/// them fully, this only keeps the wire free of anything that is not an id.
/// A restore's target: a point id, or a time (RFC 3339) with no point.
fn point_or_time(point: String, to_time: &str) -> Result<(String, Option<DateTime<Utc>>), Invalid> {
    if to_time.is_empty() {
        return Ok((point_id(point)?, None));
    }
    if !point.is_empty() {
        return Err(Invalid::new(
            "to_time",
            "names a time and point_id a point: a restore goes to one of them",
        ));
    }
    let at = DateTime::parse_from_rfc3339(to_time)
        .map_err(|e| Invalid::new("to_time", format!("{to_time:?} is not RFC 3339: {e}")))?;
    Ok((String::new(), Some(at.with_timezone(&Utc))))
}

fn time_text(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScaleTarget {
    Replicas(u32),
    /// The count before this run first scaled the role.
    Prior,
    /// The count before that run first scaled the role, when the agent remembers it (else
    /// `Prior`).
    PriorOf(String),
}

impl Action {
    /// Whether executing the action changes anything outside the agent; such results are
    /// recorded durably (fsync) before they are reported.
    pub fn has_side_effects(&self) -> bool {
        match self {
            Action::Ping { .. } | Action::Describe | Action::ListKept => false,
            Action::PruneKept { .. } => true,
            Action::Freeze | Action::Unfreeze | Action::Scale(_) | Action::Restart => true,
            Action::BackupPostgres { .. }
            | Action::SnapshotObjects { .. }
            | Action::BaseBackup { .. }
            | Action::RestorePostgres { .. }
            | Action::PreparePostgres { .. }
            | Action::CommitPostgres { .. }
            | Action::UndoPostgres { .. }
            | Action::UndoObjects { .. }
            | Action::TeardownPostgres
            | Action::TeardownObjects { .. }
            | Action::RestoreObjects { .. } => true,
            // Checks change nothing; a smoke drives the role through one real operation.
            Action::Preflight { .. } | Action::Verify { .. } | Action::CheckObjects(_) => false,
            Action::Smoke { .. } => true,
        }
    }

    /// What kind of action this is, without its parameters.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Ping { .. } => ActionKind::Ping,
            Action::Describe => ActionKind::Describe,
            Action::Freeze => ActionKind::Freeze,
            Action::Unfreeze => ActionKind::Unfreeze,
            Action::Scale(_) => ActionKind::Scale,
            Action::Restart => ActionKind::Restart,
            Action::BackupPostgres { .. } => ActionKind::BackupPostgres,
            Action::SnapshotObjects { .. } => ActionKind::SnapshotObjects,
            Action::BaseBackup { .. } => ActionKind::BaseBackup,
            Action::Preflight { .. } => ActionKind::Preflight,
            Action::RestorePostgres { .. } => ActionKind::RestorePostgres,
            Action::PreparePostgres { .. } => ActionKind::PreparePostgres,
            Action::CommitPostgres { .. } => ActionKind::CommitPostgres,
            Action::UndoPostgres { .. } => ActionKind::UndoPostgres,
            Action::UndoObjects { .. } => ActionKind::UndoObjects,
            Action::TeardownPostgres => ActionKind::TeardownPostgres,
            Action::TeardownObjects { .. } => ActionKind::TeardownObjects,
            Action::ListKept => ActionKind::ListKept,
            Action::PruneKept { .. } => ActionKind::PruneKept,
            Action::RestoreObjects { .. } => ActionKind::RestoreObjects,
            Action::Verify { .. } => ActionKind::Verify,
            Action::Smoke { .. } => ActionKind::Smoke,
            Action::CheckObjects(_) => ActionKind::CheckObjects,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// An [`Action`] without its parameters: what the journal records per command and what an
/// output is decoded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionKind {
    Ping,
    Describe,
    Freeze,
    Unfreeze,
    Scale,
    Restart,
    BackupPostgres,
    SnapshotObjects,
    Preflight,
    RestorePostgres,
    PreparePostgres,
    CommitPostgres,
    UndoPostgres,
    UndoObjects,
    RestoreObjects,
    Verify,
    Smoke,
    CheckObjects,
    ListKept,
    PruneKept,
    TeardownPostgres,
    TeardownObjects,
    BaseBackup,
}

impl ActionKind {
    pub const ALL: [ActionKind; 23] = [
        ActionKind::Ping,
        ActionKind::Describe,
        ActionKind::Freeze,
        ActionKind::Unfreeze,
        ActionKind::Scale,
        ActionKind::Restart,
        ActionKind::BackupPostgres,
        ActionKind::SnapshotObjects,
        ActionKind::Preflight,
        ActionKind::RestorePostgres,
        ActionKind::PreparePostgres,
        ActionKind::CommitPostgres,
        ActionKind::UndoPostgres,
        ActionKind::UndoObjects,
        ActionKind::RestoreObjects,
        ActionKind::Verify,
        ActionKind::Smoke,
        ActionKind::CheckObjects,
        ActionKind::ListKept,
        ActionKind::PruneKept,
        ActionKind::TeardownPostgres,
        ActionKind::TeardownObjects,
        ActionKind::BaseBackup,
    ];

    /// The action's name in command ids' logs, the journal and the drill report.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Ping => "ping",
            ActionKind::Describe => "describe",
            ActionKind::Freeze => "freeze",
            ActionKind::Unfreeze => "unfreeze",
            ActionKind::Scale => "scale",
            ActionKind::Restart => "restart",
            ActionKind::BackupPostgres => "backup-postgres",
            ActionKind::SnapshotObjects => "snapshot-objects",
            ActionKind::Preflight => "preflight",
            ActionKind::RestorePostgres => "restore-postgres",
            ActionKind::PreparePostgres => "prepare-postgres",
            ActionKind::CommitPostgres => "commit-postgres",
            ActionKind::UndoPostgres => "undo-postgres",
            ActionKind::UndoObjects => "undo-objects",
            ActionKind::RestoreObjects => "restore-objects",
            ActionKind::Verify => "verify",
            ActionKind::Smoke => "smoke",
            ActionKind::CheckObjects => "check-objects",
            ActionKind::ListKept => "list-kept",
            ActionKind::PruneKept => "prune-kept",
            ActionKind::TeardownPostgres => "teardown-postgres",
            ActionKind::TeardownObjects => "teardown-objects",
            ActionKind::BaseBackup => "base-backup",
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for ActionKind {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<ActionKind, Invalid> {
        ActionKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Invalid::new("action", format!("{s:?} is not an action this build knows"))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: CommandId,
    pub epoch: Epoch,
    pub run_id: String,
    /// How long the command may take from its receipt, measured on the agent's monotonic clock:
    /// no wall clock of another machine decides whether a command is late.
    pub time_limit: Duration,
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
            Some(pb::command::Action::BaseBackup(a)) => Action::BaseBackup {
                repository: repository(a.repository)?,
            },
            Some(pb::command::Action::Preflight(a)) => {
                let (point, to_time) = point_or_time(a.point_id, &a.to_time)?;
                Action::Preflight {
                    repository: repository(a.repository)?,
                    point,
                    to_time,
                }
            }
            Some(pb::command::Action::RestorePostgres(a)) => Action::RestorePostgres {
                repository: repository(a.repository)?,
                point: point_id(a.point_id)?,
            },
            Some(pb::command::Action::PreparePostgres(a)) => {
                let (point, to_time) = point_or_time(a.point_id, &a.to_time)?;
                Action::PreparePostgres {
                    repository: repository(a.repository)?,
                    point,
                    to_time,
                }
            }
            Some(pb::command::Action::CommitPostgres(a)) => {
                let (point, to_time) = point_or_time(a.point_id, &a.to_time)?;
                Action::CommitPostgres {
                    repository: repository(a.repository)?,
                    point,
                    to_time,
                }
            }
            Some(pb::command::Action::UndoPostgres(a)) => Action::UndoPostgres {
                undone_run: required_run(a.undone_run_id)?,
            },
            Some(pb::command::Action::UndoObjects(a)) => Action::UndoObjects {
                repository: repository(a.repository)?,
                undone_run: required_run(a.undone_run_id)?,
                shard: a.shard,
                shards: a.shards,
            },
            Some(pb::command::Action::TeardownPostgres(_)) => Action::TeardownPostgres,
            Some(pb::command::Action::TeardownObjects(a)) => Action::TeardownObjects {
                repository: repository(a.repository)?,
                shard: a.shard,
                shards: a.shards,
            },
            Some(pb::command::Action::ListKept(_)) => Action::ListKept,
            Some(pb::command::Action::PruneKept(a)) => Action::PruneKept {
                databases: a
                    .databases
                    .into_iter()
                    .map(kept_database)
                    .collect::<Result<_, _>>()?,
            },
            Some(pb::command::Action::Verify(a)) => {
                let (point, to_time) = point_or_time(a.point_id, &a.to_time)?;
                Action::Verify {
                    repository: repository(a.repository)?,
                    point,
                    to_time,
                }
            }
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
                let (point, to_time) = point_or_time(a.point_id, &a.to_time)?;
                Action::RestoreObjects {
                    repository: repository(a.repository)?,
                    point,
                    shard: a.shard,
                    shards: a.shards,
                    to_time,
                }
            }
            Some(pb::command::Action::Scale(s)) => Action::Scale(match s.target {
                Some(pb::scale::Target::Replicas(n)) => ScaleTarget::Replicas(n),
                Some(pb::scale::Target::Prior(true)) => ScaleTarget::Prior,
                Some(pb::scale::Target::PriorOf(run)) => ScaleTarget::PriorOf(required_run(run)?),
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
            time_limit: if m.timeout_ms > 0 {
                Duration::from_millis(m.timeout_ms)
            } else {
                // An older coordinator sends only its absolute deadline: what is left of it on
                // this machine's clock (the old rule, skew included).
                required_time("deadline", m.deadline_unix_ms)?
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            },
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
            Action::BaseBackup { repository } => pb::command::Action::BaseBackup(pb::BaseBackup {
                repository: Some(repository.into()),
            }),
            Action::Preflight {
                repository,
                point,
                to_time,
            } => pb::command::Action::Preflight(pb::Preflight {
                repository: Some(repository.into()),
                point_id: point,
                to_time: time_text(to_time),
            }),
            Action::RestorePostgres { repository, point } => {
                pb::command::Action::RestorePostgres(pb::RestorePostgres {
                    repository: Some(repository.into()),
                    point_id: point,
                })
            }
            Action::PreparePostgres {
                repository,
                point,
                to_time,
            } => pb::command::Action::PreparePostgres(pb::PreparePostgres {
                repository: Some(repository.into()),
                point_id: point,
                to_time: time_text(to_time),
            }),
            Action::CommitPostgres {
                repository,
                point,
                to_time,
            } => pb::command::Action::CommitPostgres(pb::CommitPostgres {
                repository: Some(repository.into()),
                point_id: point,
                to_time: time_text(to_time),
            }),
            Action::UndoPostgres { undone_run } => {
                pb::command::Action::UndoPostgres(pb::UndoPostgres {
                    undone_run_id: undone_run,
                })
            }
            Action::UndoObjects {
                repository,
                undone_run,
                shard,
                shards,
            } => pb::command::Action::UndoObjects(pb::UndoObjects {
                repository: Some(repository.into()),
                undone_run_id: undone_run,
                shard,
                shards,
            }),
            Action::TeardownPostgres => {
                pb::command::Action::TeardownPostgres(pb::TeardownPostgres {})
            }
            Action::TeardownObjects {
                repository,
                shard,
                shards,
            } => pb::command::Action::TeardownObjects(pb::TeardownObjects {
                repository: Some(repository.into()),
                shard,
                shards,
            }),
            Action::ListKept => pb::command::Action::ListKept(pb::ListKept {}),
            Action::PruneKept { databases } => {
                pb::command::Action::PruneKept(pb::PruneKept { databases })
            }
            Action::Verify {
                repository,
                point,
                to_time,
            } => pb::command::Action::Verify(pb::Verify {
                repository: Some(repository.into()),
                point_id: point,
                to_time: time_text(to_time),
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
                to_time,
            } => pb::command::Action::RestoreObjects(pb::RestoreObjects {
                repository: Some(repository.into()),
                point_id: point,
                shard,
                shards,
                to_time: time_text(to_time),
            }),
            Action::Scale(target) => pb::command::Action::Scale(pb::Scale {
                target: Some(match target {
                    ScaleTarget::Replicas(n) => pb::scale::Target::Replicas(n),
                    ScaleTarget::Prior => pb::scale::Target::Prior(true),
                    ScaleTarget::PriorOf(run) => pb::scale::Target::PriorOf(run),
                }),
            }),
        };
        pb::Command {
            command_id: m.id.0,
            epoch: m.epoch.get(),
            run_id: m.run_id,
            // For agents older than timeout_ms: the deadline on this (the sender's) clock.
            deadline_unix_ms: to_unix_ms(add_saturating(SystemTime::now(), m.time_limit)),
            timeout_ms: u64::try_from(m.time_limit.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
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
