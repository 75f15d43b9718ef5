//! The drill report's fields, as its JSON form names them, and that form. `journal.rs` fills
//! them, `markdown.rs` renders them.

use std::collections::BTreeMap;

use api::redact::{redact_json, redact_reference_json};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// The `format` field of the JSON form; bump it when a field changes meaning.
pub const FORMAT: &str = "rollcall.drill-report.v1";

/// What a missing value reads as.
pub const NOT_RECORDED: &str = "not recorded";

/// The sources of a declared exclusion.
pub const EXCLUDED_BY_OPERATOR: &str = "operator";
pub const EXCLUDED_BY_CONFIG: &str = "environment config";

/// Data a run leaves out of the restore on purpose, as journaled in the run's params when it
/// started: the environment's `[environments.NAME.report] excluded` and `--exclude TEXT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Exclusion {
    pub text: String,
    /// [`EXCLUDED_BY_OPERATOR`] or [`EXCLUDED_BY_CONFIG`].
    pub source: String,
}

/// A filled-in drill report. Strings in it are already redacted.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub format: &'static str,
    pub generated_at: DateTime<Utc>,
    /// `passed`, `passed with warnings`, `failed`, `blocked`, `aborted` or `in progress`.
    pub outcome: String,
    pub environment: EnvironmentInfo,
    pub run: RunInfo,
    pub target: Target,
    pub postgres: PostgresInfo,
    pub objects: ObjectsInfo,
    /// Secret names, managers, references, versions and KMS keys: never values.
    pub secret_refs: Vec<SecretRefRow>,
    /// Before (live, at preflight) → at the point → after (at verify): the environment's
    /// runbook rows (`[environments.NAME.report] rows`) in their order, then every other count
    /// recorded, by key.
    pub counts: Vec<CountRow>,
    /// Every preflight, verify (HTTP, count, invariant) and smoke check with its result.
    pub checks: Vec<CheckRow>,
    /// What happened on the way, in time order: phases that blocked, operators' retries and
    /// resumes, commands re-sent after a failure, coordinators that took the run over, agents
    /// lost and back. Empty when the run went straight through.
    pub incidents: Vec<Incident>,
    /// The runbook's managed-worker drill (worker recovery, checkpoint restore, workflow
    /// consistency, BYOK secret-reference integrity), for a drill or recovery whose plan has
    /// worker phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<WorkerDrillRow>>,
    /// Data intentionally left out of the restore: what was declared (the run's exclusions,
    /// journaled at its start, with their source), then what the restore moved aside.
    pub excluded: Vec<String>,
    /// Whether the operator or the environment declared any exclusion.
    pub exclusions_declared: bool,
    /// The live database before the restore, kept under this name.
    pub pre_restore_database: Option<String>,
    /// Where objects the restore replaced or removed were moved.
    pub quarantine_prefix: Option<String>,
    pub follow_ups: Vec<FollowUp>,
    pub phases: Vec<PhaseRow>,
    pub rto: Rto,
    pub rpo: Rpo,
    /// What an undo run took back (undo runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undo: Option<UndoInfo>,
    /// What a restore test tested and tore down (runs of restore-test environments only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_test: Option<RestoreTestInfo>,
    /// Approvals a run of a protected environment waited for (0: none), and the decisions.
    pub approvals_required: u32,
    pub approvals: Vec<ApprovalRow>,
}

/// A restore test: whose point it restored into which environment, the proof that the source
/// was not commanded, how long the restore took, and the teardown.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreTestInfo {
    /// The environment whose point was tested.
    pub source: String,
    /// The restore-test environment the point was restored into.
    pub target: String,
    /// Every agent the run's journal holds a command for, by name.
    pub agents_commanded: Vec<String>,
    /// The source's agents (as the coordinator knows them when the report is built) that the
    /// journal holds a command for: empty when the source was not touched.
    pub source_agents_commanded: Vec<String>,
    /// The source's agents the coordinator knew when the report was built (the comparison's
    /// other side); None when it was not given them.
    pub source_agents_known: Option<Vec<String>>,
    /// True when no command of the run went to an agent of the source (and the coordinator
    /// knew the source's agents to compare with).
    pub source_untouched: bool,
    /// From the start of the first phase that restores (prepare-postgres, commit-postgres,
    /// restore-postgres, restore-objects) to the end of the last of them.
    pub restore_ms: Option<i64>,
    /// The environment's teardown setting when the run started: always, on-success, never.
    pub teardown_setting: String,
    /// `done`, `kept (teardown = never)`, `not reached`, `failed: ...`, `running`.
    pub teardown: String,
    /// Databases the teardown dropped, and whether the target's previous database is live again.
    pub databases_dropped: Vec<String>,
    pub database_put_back: Option<bool>,
    /// Objects the teardown deleted from the target store, objects it put back, and repository
    /// keys of the run's quarantines it deleted; summed over shards.
    pub objects_deleted: Option<u64>,
    pub objects_put_back: Option<u64>,
    pub quarantine_keys_deleted: Option<u64>,
}

/// What an undo run did, from its agents' outputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UndoInfo {
    /// The run whose restore was taken back.
    pub undoes: Option<String>,
    /// The live database and what undo-postgres did (`undone`, `nothing to undo: ...`).
    pub database: Option<String>,
    pub database_detail: Option<String>,
    /// Where the restored database is kept.
    pub restored_database_kept_as: Option<String>,
    /// Objects put back, objects the restore created (moved out), keys already as they were,
    /// and live objects moved to the undo's quarantine first; summed over shards.
    pub objects_put_back: Option<u64>,
    pub objects_removed: Option<u64>,
    pub objects_unchanged: Option<u64>,
    pub objects_displaced: Option<u64>,
    /// Where the undo keeps what it displaced.
    pub quarantine_prefix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvironmentInfo {
    pub name: String,
    /// The backup repository; a local path is withheld (the runbook forbids local paths).
    pub repository: String,
    /// Declared agents per role.
    pub fleet: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub reason: Option<String>,
    /// The plan's name.
    pub plan: Option<String>,
    pub epoch: u64,
    pub created_at: DateTime<Utc>,
    /// The `run.started` event (the first phase's start when that event is missing).
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The operator who started the run: name, role and how they authenticated (none for a
    /// scheduled backup or a run from before roles).
    pub started_by: Option<String>,
}

/// One operator's approval or rejection of the run (the two-person rule), in journal order.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalRow {
    pub at: DateTime<Utc>,
    pub by: String,
    pub role: String,
    /// `approved` or `rejected`.
    pub decision: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// A run to a time (`--to-time`): what restored to it (then `point_id` is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_time: Option<ToTimeInfo>,
    pub point_id: Option<String>,
    /// When the point was committed; from the point id when the point file was not read.
    pub point_created_at: Option<DateTime<Utc>>,
    /// Whether the point file itself was read (its sources, counts and secret references).
    pub point_file_read: bool,
}

/// A restore to a time: Postgres from a base backup and the archived WAL, objects by a rule.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ToTimeInfo {
    pub to_time: DateTime<Utc>,
    /// "restored to time T; counts not recorded" (no counts exist at a time to compare with).
    pub note: String,
    pub base_backup: Option<String>,
    /// The live data directory, and where the previous one is kept (never removed).
    pub data_dir: Option<String>,
    pub kept_dir: Option<String>,
    /// The recovery's words: where it stopped, its last transaction, the new timeline.
    pub stopped: Option<String>,
    pub last_transaction_at: Option<String>,
    pub timeline: Option<u32>,
    /// `versions` or `snapshot`, with why, and the snapshot rule's uncertainty window.
    pub objects_rule: Option<String>,
    pub objects_uncertainty: Option<String>,
    /// Keys whose version at the time is ambiguous.
    pub objects_ambiguous: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PostgresInfo {
    /// Repository key of the dump.
    pub backup_key: Option<String>,
    pub backup_sha256: Option<String>,
    pub backup_bytes: Option<u64>,
    pub backup_started_at: Option<DateTime<Utc>>,
    pub backup_finished_at: Option<DateTime<Utc>>,
    pub server_version: Option<String>,
    pub pg_dump_version: Option<String>,
    /// The live database the restore replaced.
    pub database: Option<String>,
    pub pre_restore_database: Option<String>,
    pub restore_agent: Option<String>,
    pub restore_started_at: Option<DateTime<Utc>>,
    /// When the restored database was swapped in: the restore timestamp.
    pub restored_at: Option<DateTime<Utc>>,
    pub archive_bytes: Option<u64>,
    pub elapsed_ms: Option<u64>,
    /// How an interrupted restore was completed, when it was.
    pub resumed: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ObjectsInfo {
    pub snapshot_id: Option<String>,
    pub snapshot_objects: Option<u64>,
    pub snapshot_bytes: Option<u64>,
    pub restore_agent: Option<String>,
    pub restored_at: Option<DateTime<Utc>>,
    pub restored: Option<u64>,
    pub restored_bytes: Option<u64>,
    pub unchanged: Option<u64>,
    pub replaced: Option<u64>,
    pub removed: Option<u64>,
    pub quarantine_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecretRefRow {
    pub name: String,
    pub manager: String,
    pub reference: String,
    pub version: Option<String>,
    pub kms_key: Option<String>,
    pub rotated_at: Option<DateTime<Utc>>,
    /// `recovery point` (as recorded at backup time) or `environment config` (a reference the
    /// point lacks or records differently).
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountRow {
    pub key: String,
    /// The row's label in the environment's config; the key for a count no row names.
    pub label: String,
    /// Whether the row is one of the environment's runbook rows (shown even when nothing
    /// recorded its count).
    pub configured: bool,
    pub before: Option<i64>,
    pub at_point: Option<i64>,
    pub after: Option<i64>,
    /// Whether the count after the restore equals the point's; unknown when either is missing.
    pub matches_point: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    pub phase: String,
    pub agent: String,
    pub name: String,
    /// `preflight`, `http`, `count`, `invariant`, `objects`, `smoke`, ...
    pub kind: String,
    pub required: bool,
    /// None when the agent never answered.
    pub passed: Option<bool>,
    pub detail: String,
}

/// One incident of the run, from the journal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub at: Option<DateTime<Utc>>,
    /// `phase blocked`, `run blocked`, `operator retry`, `operator resume`, `command re-sent`,
    /// `coordinator took over`, `agent lost`, `agent back`.
    pub kind: String,
    pub phase: Option<String>,
    pub agent: Option<String>,
    pub detail: String,
}

/// One line of the managed-worker drill: what was checked, its result and the evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerDrillRow {
    /// `worker recovery`, `checkpoint restore`, `workflow consistency`,
    /// `BYOK secret-reference integrity`.
    pub item: String,
    /// `passed`, `failed` or `not recorded`.
    pub result: String,
    pub evidence: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FollowUp {
    pub text: String,
    pub owner: Option<String>,
    /// `operator`, `phase`, `check` or `run`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseRow {
    pub index: u32,
    pub name: String,
    pub action: Option<String>,
    /// A journal state, or `not started`.
    pub state: String,
    pub attempt: Option<u32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub detail: Option<String>,
}

/// The measured recovery time against the environment's objective.
#[derive(Debug, Clone, Serialize)]
pub struct Rto {
    pub objective_ms: u64,
    /// `start of phase <name>` (the freeze: when the service stopped taking writes) or
    /// `run start` when the run has no freeze phase.
    pub measured_from: String,
    pub from_at: Option<DateTime<Utc>>,
    /// The end of the last phase that finished.
    pub until_at: Option<DateTime<Utc>>,
    pub until_phase: Option<String>,
    pub measured_ms: Option<i64>,
    /// False when the run did not restore (blocked, failed, aborted) or took too long.
    pub met: Option<bool>,
    /// Why `met` is false regardless of the time, when it is.
    pub note: Option<String>,
    /// What users felt: from the freeze's start to the end of the unfreeze (None until traffic
    /// resumed, or in a run without a freeze).
    pub freeze_window_ms: Option<i64>,
    /// The whole run: its start to the end of the last phase that finished.
    pub run_ms: Option<i64>,
}

/// The recovery point's age when writes stopped (the data a real recovery would lose)
/// against the environment's objective.
#[derive(Debug, Clone, Serialize)]
pub struct Rpo {
    pub objective_ms: u64,
    pub point_created_at: Option<DateTime<Utc>>,
    /// Same anchor as the RTO: the freeze phase's start, else the run's start.
    pub measured_at: Option<DateTime<Utc>>,
    pub measured_at_label: String,
    pub point_age_ms: Option<i64>,
    pub met: Option<bool>,
}

impl DrillReport {
    /// The report as JSON (stable field names; `format` names the version). Redacted again as
    /// a whole, so a field added later cannot carry a secret out.
    /// Checks a restore test's commanded agents against the source's agents the coordinator
    /// knows (`source_agents`): the report then says which of them, if any, got a command.
    pub fn with_source_agents(mut self, source_agents: &[String]) -> DrillReport {
        if let Some(test) = &mut self.restore_test {
            let mut known: Vec<String> = source_agents
                .iter()
                .map(|a| api::redact::redact(a).into_owned())
                .collect();
            known.sort();
            test.source_agents_commanded = test
                .agents_commanded
                .iter()
                .filter(|a| known.contains(a))
                .cloned()
                .collect();
            // With none of the source's agents known (a coordinator restarted before they
            // attached again) there is nothing to compare with: not claimed untouched.
            test.source_untouched = !known.is_empty() && test.source_agents_commanded.is_empty();
            test.source_agents_known = Some(known);
        }
        self
    }

    pub fn to_json(&self) -> Value {
        let mut value =
            serde_json::to_value(self).expect("a drill report has string keys and serializes");
        // Secret references are names, not secrets: their own rule (local paths withheld).
        let refs = value.get_mut("secret_refs").map(Value::take);
        redact_json(&mut value);
        if let Some(mut refs) = refs {
            redact_reference_json(&mut refs);
            value["secret_refs"] = refs;
        }
        value
    }
}
