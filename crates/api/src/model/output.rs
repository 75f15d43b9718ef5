//! What agents report, typed: one output per action, produced by the agent and decoded once by
//! the coordinator ([`ActionOutput::decode`]) before it journals the result.
//!
//! On the wire, in an agent's state directory and in the coordinator's journal an output is
//! JSON ([`Output`]) with the version of its shape. Version 0 is an agent from before outputs
//! were versioned: its JSON has the keys of version 1, so it reads the same. A field added
//! later carries `#[serde(default)]`, so an older agent's output still reads; a change of
//! meaning bumps [`OUTPUT_VERSION`] and gives `decode` a branch for the older shape.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ActionKind, Invalid, ObjectReferences, ScaleOutput};

/// The version of the output shapes this build writes and reads.
pub const OUTPUT_VERSION: u32 = 1;

/// Row counts keyed as a point's `table_counts` (`table`, or `table[column=value]`).
pub type Counts = BTreeMap<String, i64>;

/// An action's output as it travels and is kept: the JSON of its typed form and the version of
/// that form. Reads the bare JSON an agent recorded before outputs were versioned (version 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OutputRepr")]
pub struct Output {
    pub version: u32,
    pub body: Value,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OutputRepr {
    Versioned {
        version: u32,
        body: Value,
    },
    /// No output of any version has both a `version` and a `body` key, so a bare one never
    /// reads as versioned.
    Bare(Value),
}

impl From<OutputRepr> for Output {
    fn from(repr: OutputRepr) -> Output {
        match repr {
            OutputRepr::Versioned { version, body } => Output { version, body },
            OutputRepr::Bare(body) => Output { version: 0, body },
        }
    }
}

/// What kind of thing a check looked at; the drill report groups and labels checks by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Something preflight found in the live system (a counted table gone).
    Preflight,
    /// The live schema against the point's.
    Schema,
    /// An HTTP endpoint of the role.
    Http,
    /// A table's rows against the point's count.
    Count,
    /// A SQL invariant.
    Invariant,
    /// The live object store against the point's manifest.
    Objects,
    /// Objects that restored rows refer to.
    Reference,
    /// A smoke command.
    Smoke,
    /// A kind this build does not know (a newer agent's).
    #[serde(other)]
    Other,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Preflight => "preflight",
            CheckKind::Schema => "schema",
            CheckKind::Http => "http",
            CheckKind::Count => "count",
            CheckKind::Invariant => "invariant",
            CheckKind::Objects => "objects",
            CheckKind::Reference => "reference",
            CheckKind::Smoke => "smoke",
            CheckKind::Other => "other",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One check's verdict, as the drill report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
    /// A failed required check fails its command; an optional one is a warning.
    pub required: bool,
    pub passed: bool,
    pub detail: String,
}

/// `preflight`: the point checked before anything is frozen, and what the live system holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreflightOutput {
    /// The point's verification (dump checksum, manifest, blobs).
    pub verify: Option<repository::VerifyReport>,
    /// The live database's counts before the restore (database agents only).
    pub live_counts: Option<Counts>,
    /// What preflight found beside the point: counted tables gone, the schema against the
    /// point's.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// `restore-postgres`: the point's dump restored and swapped in; the previous database kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePostgresOutput {
    /// The live database's name.
    pub database: String,
    /// Where the database the restore replaced is kept.
    pub pre_restore_database: String,
    pub point: String,
    /// Bytes of dump restored (0 when an earlier execution had restored them).
    pub archive_bytes: u64,
    /// How an interrupted restore was completed (`already swapped`, `finished an interrupted
    /// swap`); empty when this execution restored from the start.
    #[serde(default)]
    pub resumed: String,
    pub elapsed_ms: u64,
    /// A restore to a time: the data directories swapped (none for a dump's restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<PhysicalRestore>,
}

/// `prepare-postgres`: the point's dump restored into `<db>_restore_<run>`, its counts
/// checked against the point; nothing live changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparePostgresOutput {
    /// The live database's name.
    pub database: String,
    /// The prepared copy, swapped in by `commit-postgres`.
    pub restore_database: String,
    pub point: String,
    /// Bytes of dump restored (0 when an earlier execution had prepared the copy).
    pub archive_bytes: u64,
    /// The prepared copy's counts (each equals the point's).
    pub counts: Counts,
    pub elapsed_ms: u64,
    /// A restore to a time: the data directory recovered beside the live one (none for a
    /// dump's restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<PhysicalRestore>,
}

/// A self-hosted server's data directory restored to a time (`prepare-postgres` and
/// `commit-postgres` of a run started with `--to-time`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysicalRestore {
    /// The time restored to (RFC 3339).
    pub to_time: String,
    /// The base backup the recovery started from.
    pub base_backup: String,
    /// The live server's data directory.
    pub data_dir: String,
    /// The recovered directory (prepare: beside the live one; commit: now in its place).
    pub restored_dir: String,
    /// Where the live server's previous data directory is kept (commit only; never removed).
    #[serde(default)]
    pub kept_dir: String,
    /// The recovery's own words on where it stopped, its last transaction, its new timeline.
    #[serde(default)]
    pub stopped: Option<String>,
    #[serde(default)]
    pub last_transaction_at: Option<String>,
    #[serde(default)]
    pub timeline: Option<u32>,
    /// What else people should know (a resumed commit, the managed provider's answer).
    #[serde(default)]
    pub detail: String,
}

/// `restore-objects`: one shard of the live store made equal to the point's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreObjectsOutput {
    /// The snapshot restored.
    pub snapshot: String,
    pub shard: u32,
    pub shards: u32,
    /// Objects written from the snapshot, and their bytes.
    pub restored: u64,
    pub restored_bytes: u64,
    /// Of those, objects written from the bodies preflight kept instead of read again from the
    /// repository.
    #[serde(default)]
    pub from_scratch: u64,
    /// Objects that already matched.
    pub unchanged: u64,
    /// Objects whose content was replaced, and objects the point lacks: both moved to the
    /// quarantine first.
    pub replaced: u64,
    pub removed: u64,
    /// Where in the repository replaced and removed objects are kept (`quarantine/<tag>`).
    pub quarantine_prefix: String,
    /// A restore to a time: which rule brought the store there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_time: Option<ObjectsAtTime>,
}

/// How an objects agent brought its store to a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectsAtTime {
    /// The time (RFC 3339).
    pub to_time: String,
    /// `versions` (each key's newest version at or before the time, from a versioned bucket)
    /// or `snapshot` (the newest snapshot finished at or before it).
    pub rule: String,
    /// Why the rule was chosen (e.g. "bucket versioning never enabled").
    #[serde(default)]
    pub reason: String,
    /// The snapshot rule's uncertainty: the store may have changed between these times and
    /// the restore cannot tell (RFC 3339; empty for versions).
    #[serde(default)]
    pub uncertain_from: String,
    #[serde(default)]
    pub uncertain_to: String,
    #[serde(default)]
    pub uncertain_ms: u64,
    /// Keys whose version at the time is ambiguous (a change within the time's own second).
    #[serde(default)]
    pub ambiguous: Vec<String>,
}

/// `undo-postgres`: the database a restore replaced put back under the live name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoPostgresOutput {
    /// The live database's name.
    pub database: String,
    /// Where the restored database is kept (`<db>_undone_<tag>`); empty when nothing had been
    /// swapped in.
    pub kept_as: String,
    /// False when the restore had not swapped the database in: nothing was undone.
    pub undone: bool,
    /// What happened, for people: `undone`, `already undone`, `finished an interrupted undo`,
    /// or why there was nothing to undo.
    pub detail: String,
    /// The live database's counts after the undo.
    pub counts: Counts,
    pub elapsed_ms: u64,
}

/// `undo-objects`: one shard of the live store put back as it was before a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoObjectsOutput {
    pub shard: u32,
    pub shards: u32,
    /// Records the restore left (0: it never started writing; nothing was undone).
    pub records: u64,
    /// Objects the restore replaced or removed, put back from its quarantine.
    pub put_back: u64,
    /// Objects the restore created, moved to the undo's quarantine.
    pub removed: u64,
    /// Keys already as they were before the restore.
    pub unchanged: u64,
    /// Live objects (the restore's, or written since) the undo moved to its quarantine before
    /// putting the old ones back.
    pub displaced: u64,
    /// Where in the repository the undo keeps what it displaced (`quarantine/<undo tag>`).
    pub quarantine_prefix: String,
}

/// `teardown-postgres`: what a restore test's teardown did to the database its run restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownPostgresOutput {
    /// The live database's name.
    pub database: String,
    /// The databases dropped: the restored one (as `<db>_undone_<tag>` once it left the live
    /// name), and nothing else.
    pub dropped: Vec<String>,
    /// Whether the database the run's swap kept (`<db>_pre_<tag>`) took the live name again.
    pub put_back: bool,
    /// What happened, for people.
    pub detail: String,
    pub elapsed_ms: u64,
}

/// `teardown-objects`: one shard of a restore test's objects taken out of the target store,
/// and the run's quarantines deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownObjectsOutput {
    pub shard: u32,
    pub shards: u32,
    /// Objects the run's restore created, deleted from the target store.
    pub deleted: u64,
    /// Objects the restore replaced or removed, put back as they were before the run.
    pub put_back: u64,
    /// Repository keys deleted from the run's quarantines (`quarantine/<tag>` and the
    /// teardown's own), with their restore records.
    pub quarantine_keys_deleted: u64,
    pub elapsed_ms: u64,
}

/// `list-kept`: the databases restores and undos kept beside the live one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListKeptOutput {
    /// The live database's name.
    pub database: String,
    pub kept: Vec<repository::KeptDatabase>,
}

/// `prune-kept`: what was dropped, and what was refused and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneKeptOutput {
    pub dropped: Vec<String>,
    /// Named databases that were already gone.
    pub gone: Vec<String>,
    pub refused: Vec<KeptRefusal>,
}

/// A kept database the agent would not drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRefusal {
    pub database: String,
    pub reason: String,
}

/// `verify`: the checks against the point, the live counts, and the object keys the restored
/// rows refer to (for `check-objects` on the objects agents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyOutput {
    pub checks: Vec<Check>,
    /// The live database's counts after the restore (database agents only).
    pub counts: Option<Counts>,
    #[serde(default)]
    pub references: Vec<ObjectReferences>,
}

/// `check-objects` and `smoke`: their checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksOutput {
    pub checks: Vec<Check>,
}

/// `freeze` and `unfreeze`: what holds writes at this agent. An agent with nothing to freeze
/// (no `control.freeze`, no `[postgres.freeze]`) answers with `by` empty, so a plan may name
/// every role that could freeze and the coordinator checks that one did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeOutput {
    /// What froze or thawed writes: "http", "exec", "database"; empty for nothing.
    pub by: String,
    /// Whether writes are frozen at this agent now.
    pub frozen: bool,
    /// What it did, for people ("made role app read-only in cowork, ended 3 sessions").
    #[serde(default)]
    pub detail: String,
}

impl FreezeOutput {
    /// An agent with nothing to freeze.
    pub fn nothing() -> FreezeOutput {
        FreezeOutput {
            by: String::new(),
            frozen: false,
            detail: "nothing to freeze here: no control.freeze and no [postgres.freeze]".into(),
        }
    }
}

/// The typed output of one action.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ActionOutput {
    Scale(ScaleOutput),
    Freeze(FreezeOutput),
    Unfreeze(FreezeOutput),
    BackupPostgres(Box<repository::PgBackupPart>),
    SnapshotObjects(Box<repository::ObjectSnapshotPart>),
    /// The base backup's record as committed (id, environment, `consistent_at`, size, the WAL
    /// range it needs).
    BaseBackup(Box<repository::BaseBackup>),
    Preflight(PreflightOutput),
    RestorePostgres(RestorePostgresOutput),
    PreparePostgres(PreparePostgresOutput),
    /// `commit-postgres` reports what `restore-postgres` does.
    CommitPostgres(RestorePostgresOutput),
    UndoPostgres(UndoPostgresOutput),
    UndoObjects(UndoObjectsOutput),
    RestoreObjects(RestoreObjectsOutput),
    Verify(VerifyOutput),
    CheckObjects(ChecksOutput),
    Smoke(ChecksOutput),
    ListKept(ListKeptOutput),
    PruneKept(PruneKeptOutput),
    TeardownPostgres(TeardownPostgresOutput),
    TeardownObjects(TeardownObjectsOutput),
}

impl ActionOutput {
    /// The action that reports this output.
    pub fn kind(&self) -> ActionKind {
        match self {
            ActionOutput::Scale(_) => ActionKind::Scale,
            ActionOutput::Freeze(_) => ActionKind::Freeze,
            ActionOutput::Unfreeze(_) => ActionKind::Unfreeze,
            ActionOutput::BackupPostgres(_) => ActionKind::BackupPostgres,
            ActionOutput::SnapshotObjects(_) => ActionKind::SnapshotObjects,
            ActionOutput::BaseBackup(_) => ActionKind::BaseBackup,
            ActionOutput::Preflight(_) => ActionKind::Preflight,
            ActionOutput::RestorePostgres(_) => ActionKind::RestorePostgres,
            ActionOutput::PreparePostgres(_) => ActionKind::PreparePostgres,
            ActionOutput::CommitPostgres(_) => ActionKind::CommitPostgres,
            ActionOutput::UndoPostgres(_) => ActionKind::UndoPostgres,
            ActionOutput::UndoObjects(_) => ActionKind::UndoObjects,
            ActionOutput::RestoreObjects(_) => ActionKind::RestoreObjects,
            ActionOutput::Verify(_) => ActionKind::Verify,
            ActionOutput::CheckObjects(_) => ActionKind::CheckObjects,
            ActionOutput::Smoke(_) => ActionKind::Smoke,
            ActionOutput::ListKept(_) => ActionKind::ListKept,
            ActionOutput::PruneKept(_) => ActionKind::PruneKept,
            ActionOutput::TeardownPostgres(_) => ActionKind::TeardownPostgres,
            ActionOutput::TeardownObjects(_) => ActionKind::TeardownObjects,
        }
    }

    /// Reads the output an agent reported for `action`.
    pub fn decode(action: ActionKind, output: &Output) -> Result<ActionOutput, Invalid> {
        if output.version > OUTPUT_VERSION {
            return Err(Invalid::new(
                "output version",
                format!(
                    "{action} output version {} is newer than this build reads \
                     ({OUTPUT_VERSION}); upgrade the coordinator before its agents",
                    output.version
                ),
            ));
        }
        fn read<T: DeserializeOwned>(action: ActionKind, body: &Value) -> Result<T, Invalid> {
            T::deserialize(body)
                .map_err(|e| Invalid::new("output", format!("of {action} does not read: {e}")))
        }
        let body = &output.body;
        Ok(match action {
            ActionKind::Scale => ActionOutput::Scale(read(action, body)?),
            ActionKind::Freeze => ActionOutput::Freeze(read(action, body)?),
            ActionKind::Unfreeze => ActionOutput::Unfreeze(read(action, body)?),
            ActionKind::BackupPostgres => ActionOutput::BackupPostgres(read(action, body)?),
            ActionKind::SnapshotObjects => ActionOutput::SnapshotObjects(read(action, body)?),
            ActionKind::BaseBackup => ActionOutput::BaseBackup(read(action, body)?),
            ActionKind::Preflight => ActionOutput::Preflight(read(action, body)?),
            ActionKind::RestorePostgres => ActionOutput::RestorePostgres(read(action, body)?),
            ActionKind::PreparePostgres => ActionOutput::PreparePostgres(read(action, body)?),
            ActionKind::CommitPostgres => ActionOutput::CommitPostgres(read(action, body)?),
            ActionKind::UndoPostgres => ActionOutput::UndoPostgres(read(action, body)?),
            ActionKind::UndoObjects => ActionOutput::UndoObjects(read(action, body)?),
            ActionKind::RestoreObjects => ActionOutput::RestoreObjects(read(action, body)?),
            ActionKind::Verify => ActionOutput::Verify(read(action, body)?),
            ActionKind::CheckObjects => ActionOutput::CheckObjects(read(action, body)?),
            ActionKind::Smoke => ActionOutput::Smoke(read(action, body)?),
            ActionKind::ListKept => ActionOutput::ListKept(read(action, body)?),
            ActionKind::PruneKept => ActionOutput::PruneKept(read(action, body)?),
            ActionKind::TeardownPostgres => ActionOutput::TeardownPostgres(read(action, body)?),
            ActionKind::TeardownObjects => ActionOutput::TeardownObjects(read(action, body)?),
            ActionKind::Ping | ActionKind::Describe | ActionKind::Restart => {
                return Err(Invalid::new(
                    "output",
                    format!("{action} reports no output, yet one came"),
                ));
            }
        })
    }

    /// The checks the output lists (preflight, verify, check-objects, smoke); none otherwise.
    pub fn checks(&self) -> &[Check] {
        match self {
            ActionOutput::Preflight(o) => &o.checks,
            ActionOutput::Verify(o) => &o.checks,
            ActionOutput::CheckObjects(o) | ActionOutput::Smoke(o) => &o.checks,
            ActionOutput::Scale(_)
            | ActionOutput::Freeze(_)
            | ActionOutput::Unfreeze(_)
            | ActionOutput::BackupPostgres(_)
            | ActionOutput::SnapshotObjects(_)
            | ActionOutput::BaseBackup(_)
            | ActionOutput::RestorePostgres(_)
            | ActionOutput::PreparePostgres(_)
            | ActionOutput::CommitPostgres(_)
            | ActionOutput::UndoPostgres(_)
            | ActionOutput::UndoObjects(_)
            | ActionOutput::RestoreObjects(_)
            | ActionOutput::ListKept(_)
            | ActionOutput::PruneKept(_)
            | ActionOutput::TeardownPostgres(_)
            | ActionOutput::TeardownObjects(_) => &[],
        }
    }
}

impl From<&ActionOutput> for Output {
    fn from(output: &ActionOutput) -> Output {
        Output {
            version: OUTPUT_VERSION,
            // Plain structs of strings, numbers, maps with string keys and options.
            body: serde_json::to_value(output).unwrap_or(Value::Null),
        }
    }
}

impl From<ActionOutput> for Output {
    fn from(output: ActionOutput) -> Output {
        Output::from(&output)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn check(kind: CheckKind) -> Check {
        Check {
            name: "count orders".into(),
            kind,
            required: true,
            passed: true,
            detail: "restored 3, point 3".into(),
        }
    }

    #[test]
    fn every_output_round_trips_through_its_wire_form() {
        let outputs = [
            ActionOutput::Scale(ScaleOutput {
                before: 2,
                now: 0,
                prior: 2,
            }),
            ActionOutput::Freeze(FreezeOutput {
                by: "database".into(),
                frozen: true,
                detail: "made app read-only in cowork".into(),
            }),
            ActionOutput::Unfreeze(FreezeOutput::nothing()),
            ActionOutput::Preflight(PreflightOutput {
                verify: None,
                live_counts: Some(Counts::from([("orders".into(), 3)])),
                checks: vec![check(CheckKind::Schema)],
            }),
            ActionOutput::RestorePostgres(RestorePostgresOutput {
                database: "cowork".into(),
                pre_restore_database: "cowork_pre_r1a2b3c4d".into(),
                point: "20261125T073000Z-prod-3f2a9c01".into(),
                archive_bytes: 4096,
                resumed: String::new(),
                elapsed_ms: 1200,
                physical: None,
            }),
            ActionOutput::PreparePostgres(PreparePostgresOutput {
                database: "cowork".into(),
                restore_database: "cowork_restore_r1a2b3c4d".into(),
                point: "20261125T073000Z-prod-3f2a9c01".into(),
                archive_bytes: 4096,
                counts: Counts::from([("orders".into(), 3)]),
                elapsed_ms: 1100,
                physical: None,
            }),
            ActionOutput::CommitPostgres(RestorePostgresOutput {
                database: "cowork".into(),
                pre_restore_database: "cowork_pre_r1a2b3c4d".into(),
                point: "20261125T073000Z-prod-3f2a9c01".into(),
                archive_bytes: 0,
                resumed: "already swapped".into(),
                elapsed_ms: 100,
                physical: None,
            }),
            ActionOutput::UndoPostgres(UndoPostgresOutput {
                database: "cowork".into(),
                kept_as: "cowork_undone_r1a2b3c4d".into(),
                undone: true,
                detail: "undone".into(),
                counts: Counts::from([("orders".into(), 2)]),
                elapsed_ms: 90,
            }),
            ActionOutput::ListKept(ListKeptOutput {
                database: "cowork".into(),
                kept: vec![repository::KeptDatabase {
                    name: "cowork_pre_r1a2b3c4d".into(),
                    kind: repository::KeptKind::Pre,
                    tag: "r1a2b3c4d".into(),
                    bytes: 8_000_000,
                    sessions: 0,
                }],
            }),
            ActionOutput::PruneKept(PruneKeptOutput {
                dropped: vec!["cowork_pre_r1a2b3c4d".into()],
                gone: vec![],
                refused: vec![KeptRefusal {
                    database: "cowork_undone_r1a2b3c4d".into(),
                    reason: "has 1 session(s) right now".into(),
                }],
            }),
            ActionOutput::UndoObjects(UndoObjectsOutput {
                shard: 0,
                shards: 1,
                records: 1,
                put_back: 3,
                removed: 1,
                unchanged: 0,
                displaced: 3,
                quarantine_prefix: "quarantine/r9f8e7d6c".into(),
            }),
            ActionOutput::RestoreObjects(RestoreObjectsOutput {
                snapshot: "20261125T073000Z-3f2a9c01".into(),
                shard: 1,
                shards: 2,
                restored: 12,
                restored_bytes: 4096,
                from_scratch: 0,
                unchanged: 30,
                replaced: 3,
                removed: 9,
                quarantine_prefix: "quarantine/r1a2b3c4d".into(),
                at_time: None,
            }),
            ActionOutput::Verify(VerifyOutput {
                checks: vec![check(CheckKind::Count)],
                counts: Some(Counts::from([("orders".into(), 3)])),
                references: vec![ObjectReferences {
                    name: "artifacts".into(),
                    keys: vec!["a/1".into()],
                    total: 1,
                    sampled: false,
                    required: true,
                }],
            }),
            ActionOutput::CheckObjects(ChecksOutput {
                checks: vec![check(CheckKind::Reference)],
            }),
            ActionOutput::Smoke(ChecksOutput {
                checks: vec![check(CheckKind::Smoke)],
            }),
            ActionOutput::TeardownPostgres(TeardownPostgresOutput {
                database: "cowork_rt".into(),
                dropped: vec!["cowork_rt_undone_r1a2b3c4d".into()],
                put_back: true,
                detail: "undone".into(),
                elapsed_ms: 40,
            }),
            ActionOutput::TeardownObjects(TeardownObjectsOutput {
                shard: 0,
                shards: 1,
                deleted: 12,
                put_back: 1,
                quarantine_keys_deleted: 14,
                elapsed_ms: 30,
            }),
        ];
        for output in outputs {
            let wire = Output::from(&output);
            assert_eq!(wire.version, OUTPUT_VERSION);
            // Through JSON text as the agent's state directory and the journal keep it.
            let kept: Output =
                serde_json::from_str(&serde_json::to_string(&wire).unwrap()).unwrap();
            assert_eq!(ActionOutput::decode(output.kind(), &kept), Ok(output));
        }
    }

    #[test]
    fn an_output_from_before_versions_still_reads() {
        // What agents wrote before outputs were typed: bare JSON, no version.
        let bare: Output = serde_json::from_value(json!({
            "snapshot": "20261125T073000Z-3f2a9c01", "shard": 0, "shards": 1, "restored": 12,
            "restored_bytes": 4096, "unchanged": 30, "replaced": 3, "removed": 9,
            "quarantine_prefix": "quarantine/r1a2b3c4d",
        }))
        .unwrap();
        assert_eq!(bare.version, 0);
        let ActionOutput::RestoreObjects(o) =
            ActionOutput::decode(ActionKind::RestoreObjects, &bare).unwrap()
        else {
            panic!("not a restore-objects output");
        };
        assert_eq!(
            (o.restored, o.quarantine_prefix.as_str()),
            (12, "quarantine/r1a2b3c4d")
        );
        // A verify before references existed, a check kind this build does not know.
        let old_verify = Output {
            version: 0,
            body: json!({ "checks": [{ "name": "x", "kind": "quantum", "required": false,
                "passed": true, "detail": "" }], "counts": null }),
        };
        let ActionOutput::Verify(v) =
            ActionOutput::decode(ActionKind::Verify, &old_verify).unwrap()
        else {
            panic!("not a verify output");
        };
        assert!(v.references.is_empty());
        assert_eq!(v.checks[0].kind, CheckKind::Other);
    }

    #[test]
    fn a_newer_or_wrong_output_is_refused_with_what_to_do() {
        let newer = Output {
            version: OUTPUT_VERSION + 1,
            body: json!({ "checks": [] }),
        };
        let err = ActionOutput::decode(ActionKind::Smoke, &newer).unwrap_err();
        assert!(err.reason.contains("upgrade the coordinator"), "{err}");
        let wrong = Output {
            version: OUTPUT_VERSION,
            body: json!({ "database": "cowork" }),
        };
        let err = ActionOutput::decode(ActionKind::RestorePostgres, &wrong).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid output: of restore-postgres does not read"),
            "{err}"
        );
        let err = ActionOutput::decode(ActionKind::Restart, &wrong).unwrap_err();
        assert!(err.reason.contains("reports no output"), "{err}");
    }
}
