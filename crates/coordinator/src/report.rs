//! The restore drill report: every field of the runbook's "Restore Drill Report Requirements",
//! filled from the run journal (runs, phases, commands with their results, events), never
//! typed by hand. [`build`] reads the journal; [`DrillReport::to_markdown`] renders it as the
//! runbook's `docs/runbooks/restore-drill-report.md`, [`DrillReport::to_json`] for scripts.
//!
//! Every string that came from command output, an operator or the config passes through
//! `api::redact::redact` while the report is built, so both renderings are safe to publish.
//! Data the journal does not hold is shown as "not recorded", never left out: a gap in a drill
//! report must be visible.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::model::output::{Counts, RestoreObjectsOutput};
use api::model::{ActionKind, ActionOutput, Outcome};
use api::redact::{redact, redact_json};
use chrono::{DateTime, Utc};
use repository::Point;
use serde::Serialize;
use serde_json::Value;

use crate::config::Environment;
use crate::plan::{Action, Plan};
use crate::store::{
    CommandRecord, EventRecord, PhaseRecord, PhaseState, ResultRecord, RunRecord, RunState, Store,
};

/// The `format` field of the JSON form; bump it when a field changes meaning.
pub const FORMAT: &str = "rollcall.drill-report.v1";

/// What a missing value reads as.
pub const NOT_RECORDED: &str = "not recorded";

/// The counts the runbook requires, in its order, with the labels the report shows. Keys are
/// those of a point's `table_counts` (grouped counts are `table[column=value]`).
pub const REQUIRED_COUNTS: [(&str, &str); 8] = [
    ("sessions", "Sessions"),
    ("session_projections", "Session projections"),
    ("artifact_index", "Artifacts"),
    ("workflows", "Workflows"),
    ("channel_bindings", "Channel bindings"),
    ("channel_deliveries[status=pending]", "Pending deliveries"),
    ("channel_deliveries[status=failed]", "Failed deliveries"),
    ("channel_deliveries[status=dead]", "Dead deliveries"),
];

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
    /// Before (live, at preflight) → at the point → after (at verify).
    pub counts: Vec<CountRow>,
    /// Every preflight, verify (HTTP, count, invariant) and smoke check with its result.
    pub checks: Vec<CheckRow>,
    /// Data intentionally left out of the restore.
    pub excluded: Vec<String>,
    /// The live database before the restore, kept under this name.
    pub pre_restore_database: Option<String>,
    /// Where objects the restore replaced or removed were moved.
    pub quarantine_prefix: Option<String>,
    pub follow_ups: Vec<FollowUp>,
    pub phases: Vec<PhaseRow>,
    pub rto: Rto,
    pub rpo: Rpo,
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub point_id: Option<String>,
    /// When the point was committed; from the point id when the point file was not read.
    pub point_created_at: Option<DateTime<Utc>>,
    /// Whether the point file itself was read (its sources, counts and secret references).
    pub point_file_read: bool,
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
    pub label: String,
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

/// Builds the report of `run_id` from the journal in `store`. `point` is the run's recovery
/// point when the caller could read it (its sources, counts at backup time and secret
/// references); `follow_ups` are `"text@owner"` strings; `excluded` names data intentionally
/// left out of the restore.
pub async fn build(
    store: &dyn Store,
    run_id: &str,
    env: &Environment,
    point: Option<&Point>,
    follow_ups: &[String],
    excluded: &[String],
) -> Result<DrillReport> {
    let run = store
        .run(run_id)
        .await
        .with_context(|| format!("read run {run_id} from the journal"))?
        .with_context(|| format!("no run {run_id} in the journal (`rollcall runs` lists them)"))?;
    if run.environment != env.name.as_str() {
        bail!(
            "run {run_id} belongs to environment {}, not {}: pass that environment",
            run.environment,
            env.name
        );
    }
    if let (Some(point), Some(id)) = (point, &run.point_id)
        && point.id.as_str() != id
    {
        bail!(
            "run {run_id} restored point {id}, not {}: pass the run's own point",
            point.id
        );
    }
    let phases = store
        .phases(run_id)
        .await
        .with_context(|| format!("read the phases of run {run_id}"))?;
    let commands = store
        .commands(run_id)
        .await
        .with_context(|| format!("read the commands of run {run_id}"))?;
    let mut events = Vec::new();
    loop {
        const PAGE: u32 = 1000;
        let after = events.last().map_or(0, |e: &EventRecord| e.seq);
        let page = store
            .events(run_id, after, PAGE)
            .await
            .with_context(|| format!("read the events of run {run_id}"))?;
        let full = page.len() as u32 == PAGE;
        events.extend(page);
        if !full {
            break;
        }
    }
    let journal = Journal {
        run,
        phases,
        commands,
        events,
    };
    Ok(journal.report(env, point, follow_ups, excluded, Utc::now()))
}

/// One run's journal, read once.
struct Journal {
    run: RunRecord,
    phases: Vec<PhaseRecord>,
    commands: Vec<(CommandRecord, Option<ResultRecord>)>,
    events: Vec<EventRecord>,
}

/// The newest command of one agent for one action in one phase, with its result.
struct Exec<'a> {
    command: &'a CommandRecord,
    result: Option<&'a ResultRecord>,
}

impl Exec<'_> {
    fn output(&self) -> Option<&ActionOutput> {
        self.result.and_then(|r| r.output.as_ref())
    }

    fn succeeded(&self) -> bool {
        self.result.is_some_and(|r| r.outcome == Outcome::Succeeded)
    }
}

impl Journal {
    fn report(
        &self,
        env: &Environment,
        point: Option<&Point>,
        follow_ups: &[String],
        excluded: &[String],
        now: DateTime<Utc>,
    ) -> DrillReport {
        let run = &self.run;
        let plan = Plan::parse(Path::new("journaled plan"), &run.plan, Some(&env.fleet))
            .or_else(|_| Plan::parse(Path::new("journaled plan"), &run.plan, None))
            .ok();
        let actions = self.phase_actions(plan.as_ref());
        let execs = self.latest_execs();
        let of = |action: ActionKind| -> Vec<&Exec<'_>> {
            execs
                .iter()
                .filter(|e| e.command.action == action)
                .collect()
        };
        let phase_of = |index: u32| self.phases.iter().find(|p| p.index == index);
        let phase_name = |index: u32| {
            phase_of(index)
                .map(|p| p.name.clone())
                .or_else(|| {
                    plan.as_ref()
                        .and_then(|pl| pl.phases.get(index as usize))
                        .map(|p| p.name.clone())
                })
                .unwrap_or_else(|| format!("phase {index}"))
        };
        // The engine journals a failed optional phase as `failed` (a required one `blocked`).
        let phase_required = |index: u32| {
            phase_of(index).is_none_or(|p| p.state != PhaseState::Failed)
                && plan
                    .as_ref()
                    .and_then(|pl| pl.phases.get(index as usize))
                    .is_none_or(|p| p.required)
        };

        // Run timestamps.
        let started_at = self
            .events
            .iter()
            .find(|e| e.kind == "run.started")
            .map(|e| e.at)
            .or_else(|| self.phases.iter().filter_map(|p| p.started_at).min());

        // The point: its id and time, from the file when read, else from the id.
        let point_id = point
            .map(|p| p.id.to_string())
            .or_else(|| run.point_id.clone());
        let point_created_at = point.map(|p| p.created_at).or_else(|| {
            run.point_id
                .as_deref()
                .and_then(|id| repository::PointId::parse(id).ok())
                .map(|id| id.timestamp())
        });

        // Postgres: the source from the point, the restore from the journal.
        let mut postgres = PostgresInfo::default();
        if let Some(pg) = point.and_then(|p| p.postgres.as_ref()) {
            postgres.backup_key = Some(r(&pg.key));
            postgres.backup_sha256 = Some(r(&pg.sha256));
            postgres.backup_bytes = Some(pg.size);
            postgres.backup_started_at = Some(pg.started_at);
            postgres.backup_finished_at = Some(pg.finished_at);
            postgres.server_version = Some(r(&pg.server_version));
            postgres.pg_dump_version = Some(r(&pg.pg_dump_version));
            postgres.database = Some(r(&pg.database));
        }
        if let Some(exec) = pick(&of(ActionKind::RestorePostgres)) {
            if let Some(ActionOutput::RestorePostgres(out)) = exec.output() {
                postgres.database = Some(r(&out.database));
                postgres.pre_restore_database = Some(r(&out.pre_restore_database));
                postgres.archive_bytes = Some(out.archive_bytes);
                postgres.elapsed_ms = Some(out.elapsed_ms);
                postgres.resumed = Some(r(&out.resumed)).filter(|s| !s.is_empty());
            }
            postgres.restore_agent = Some(r(&exec.command.agent));
            let phase = phase_of(exec.command.phase_index);
            postgres.restore_started_at = phase.and_then(|p| p.started_at);
            postgres.restored_at = exec
                .succeeded()
                .then(|| {
                    phase
                        .and_then(|p| p.finished_at)
                        .or(exec.result.map(|r| r.received_at))
                })
                .flatten();
        }

        // Objects: the snapshot from the point (or the restore's output), the restore's tally.
        let mut objects = ObjectsInfo::default();
        if let Some(o) = point.and_then(|p| p.objects.as_ref()) {
            objects.snapshot_id = Some(r(o.snapshot_id.as_str()));
            objects.snapshot_objects = Some(o.objects);
            objects.snapshot_bytes = Some(o.bytes);
        }
        // Several objects agents restore one shard each: their tallies add up.
        let restores = pick_per_agent(&of(ActionKind::RestoreObjects));
        if !restores.is_empty() {
            let outputs: Vec<&RestoreObjectsOutput> = restores
                .iter()
                .filter_map(|e| match e.output() {
                    Some(ActionOutput::RestoreObjects(o)) => Some(o),
                    _ => None,
                })
                .collect();
            let sum = |field: fn(&RestoreObjectsOutput) -> u64| {
                outputs.iter().map(|o| field(o)).reduce(|a, b| a + b)
            };
            objects.snapshot_id = objects
                .snapshot_id
                .or_else(|| outputs.first().map(|o| r(&o.snapshot)));
            objects.restored = sum(|o| o.restored);
            objects.restored_bytes = sum(|o| o.restored_bytes);
            objects.unchanged = sum(|o| o.unchanged);
            objects.replaced = sum(|o| o.replaced);
            objects.removed = sum(|o| o.removed);
            objects.quarantine_prefix = outputs
                .iter()
                .map(|o| o.quarantine_prefix.as_str())
                .find(|p| !p.is_empty())
                .map(r);
            objects.restore_agent = Some(
                restores
                    .iter()
                    .map(|e| r(&e.command.agent))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            // Restored when the last shard was.
            objects.restored_at = restores
                .iter()
                .map(|exec| {
                    exec.succeeded()
                        .then(|| {
                            phase_of(exec.command.phase_index)
                                .and_then(|p| p.finished_at)
                                .or(exec.result.map(|r| r.received_at))
                        })
                        .flatten()
                })
                .collect::<Option<Vec<_>>>()
                .and_then(|times| times.into_iter().max());
        }

        // Counts: before (preflight), at the point, after (verify).
        let before = merged_counts(of(ActionKind::Preflight).iter().filter_map(
            |e| match e.output() {
                Some(ActionOutput::Preflight(o)) => o.live_counts.as_ref(),
                _ => None,
            },
        ));
        let after = merged_counts(
            of(ActionKind::Verify)
                .iter()
                .filter_map(|e| match e.output() {
                    Some(ActionOutput::Verify(o)) => o.counts.as_ref(),
                    _ => None,
                }),
        );
        let at_point = point.and_then(Point::table_counts);
        let counts = count_rows(before.as_ref(), at_point, after.as_ref());

        // Checks, in phase order.
        let mut checks = Vec::new();
        for exec in &execs {
            if !matches!(
                exec.command.action,
                ActionKind::Preflight
                    | ActionKind::Verify
                    | ActionKind::CheckObjects
                    | ActionKind::Smoke
            ) {
                continue;
            }
            let phase = r(&phase_name(exec.command.phase_index));
            let agent = r(&exec.command.agent);
            let required = phase_required(exec.command.phase_index);
            checks.extend(check_rows(exec, &phase, &agent, required));
        }

        // Phases: the journal's, plus the plan's that never started.
        let mut phases: Vec<PhaseRow> = self
            .phases
            .iter()
            .map(|p| {
                let duration_ms = match (p.started_at, p.finished_at) {
                    (Some(s), Some(f)) => Some((f - s).num_milliseconds()),
                    _ => self.finished_event_duration(&p.name),
                };
                PhaseRow {
                    index: p.index,
                    name: r(&p.name),
                    action: actions.get(&p.index).map(|a| r(a)),
                    state: p.state.as_str().to_owned(),
                    attempt: Some(p.attempt),
                    started_at: p.started_at,
                    finished_at: p.finished_at,
                    duration_ms,
                    detail: p.detail.as_deref().map(r),
                }
            })
            .collect();
        if let Some(plan) = &plan {
            for phase in &plan.phases {
                let index = phase.index as u32;
                if !self.phases.iter().any(|p| p.index == index) {
                    phases.push(PhaseRow {
                        index,
                        name: r(&phase.name),
                        action: Some(phase.action.as_str().to_owned()),
                        state: "not started".to_owned(),
                        attempt: None,
                        started_at: None,
                        finished_at: None,
                        duration_ms: None,
                        detail: None,
                    });
                }
            }
        }
        phases.sort_by_key(|p| p.index);

        // RTO and RPO share one anchor: when writes stopped (the freeze), else the run start.
        let freeze = self
            .phases
            .iter()
            .filter(|p| actions.get(&p.index).is_some_and(|a| a == "freeze"))
            .filter_map(|p| p.started_at.map(|at| (at, p.name.clone())))
            .min();
        let (anchor, anchor_label) = match freeze {
            Some((at, name)) => (Some(at), format!("start of phase {}", r(&name))),
            None => (started_at, "run start".to_owned()),
        };
        let last_end = self
            .phases
            .iter()
            .filter_map(|p| p.finished_at.map(|at| (at, p.name.clone())))
            .max();
        let did_not_restore = matches!(
            run.state,
            RunState::Blocked | RunState::Failed | RunState::Aborted
        );
        let rto_ms = millis(env.rto);
        let measured = match (anchor, &last_end) {
            (Some(from), Some((until, _))) => Some((*until - from).num_milliseconds()),
            _ => None,
        };
        let rto = Rto {
            objective_ms: rto_ms,
            measured_from: anchor_label.clone(),
            from_at: anchor,
            until_at: last_end.as_ref().map(|(at, _)| *at),
            until_phase: last_end.as_ref().map(|(_, name)| r(name)),
            measured_ms: measured,
            met: if did_not_restore {
                Some(false)
            } else {
                measured.map(|m| m <= rto_ms as i64)
            },
            note: did_not_restore
                .then(|| format!("the run is {}: the service was not restored", run.state)),
        };
        let rpo_ms = millis(env.rpo);
        let age = match (anchor, point_created_at) {
            (Some(at), Some(created)) => Some((at - created).num_milliseconds()),
            _ => None,
        };
        let rpo = Rpo {
            objective_ms: rpo_ms,
            point_created_at,
            measured_at: anchor,
            measured_at_label: anchor_label,
            point_age_ms: age,
            met: age.map(|a| a <= rpo_ms as i64),
        };

        // Follow-ups: the operator's, then what the run itself left open.
        let mut follow = Vec::new();
        for text in follow_ups {
            follow.push(parse_follow_up(text));
        }
        // A failed optional phase is one follow-up, naming its failed checks; a failed optional
        // check in a phase that passed is one of its own.
        let failed_checks = |phase: &str| -> Vec<String> {
            checks
                .iter()
                .filter(|c| c.phase == phase && c.passed == Some(false))
                .map(|c| format!("{} on {}: {}", c.name, c.agent, c.detail))
                .collect()
        };
        for p in &phases {
            if p.state == PhaseState::Failed.as_str() {
                let mut text = format!(
                    "optional phase {} failed: {}",
                    p.name,
                    p.detail.as_deref().unwrap_or(NOT_RECORDED)
                );
                for check in failed_checks(&p.name) {
                    text.push_str("; ");
                    text.push_str(&check);
                }
                follow.push(FollowUp {
                    text,
                    owner: None,
                    source: "phase".to_owned(),
                });
            }
        }
        let failed_phases: BTreeSet<&str> = phases
            .iter()
            .filter(|p| p.state == PhaseState::Failed.as_str())
            .map(|p| p.name.as_str())
            .collect();
        for c in &checks {
            if !c.required && c.passed == Some(false) && !failed_phases.contains(c.phase.as_str()) {
                follow.push(FollowUp {
                    text: format!(
                        "optional check {} on {} failed: {}",
                        c.name, c.agent, c.detail
                    ),
                    owner: None,
                    source: "check".to_owned(),
                });
            }
        }
        if did_not_restore {
            follow.push(FollowUp {
                text: format!(
                    "run {}: {}",
                    run.state,
                    run.reason.as_deref().map_or(NOT_RECORDED.to_owned(), r)
                ),
                owner: None,
                source: "run".to_owned(),
            });
        }

        // Outcome.
        let report_index = plan.as_ref().and_then(|pl| {
            pl.phases
                .iter()
                .find(|p| p.action == Action::Report)
                .map(|p| p.index as u32)
        });
        let unfinished = phases.iter().any(|p| {
            report_index.is_none_or(|ri| p.index < ri)
                && matches!(p.state.as_str(), "not started" | "pending" | "running")
        });
        let outcome = match run.state {
            RunState::Blocked => "blocked",
            RunState::Failed => "failed",
            RunState::Aborted => "aborted",
            _ if phases.iter().any(|p| p.state == "blocked") => "blocked",
            _ if checks.iter().any(|c| c.required && c.passed == Some(false)) => "failed",
            RunState::Pending | RunState::Running if unfinished => "in progress",
            _ if phases.iter().any(|p| p.state == "failed")
                || checks.iter().any(|c| c.passed == Some(false)) =>
            {
                "passed with warnings"
            }
            _ => "passed",
        };

        // Data left out of the restore: the operator's list and the quarantine.
        let mut excluded: Vec<String> = excluded.iter().map(|s| r(s)).collect();
        if let Some(prefix) = &objects.quarantine_prefix {
            excluded.push(format!(
                "objects the restore replaced ({}) or removed ({}) are not in the live store: \
                 they are kept under {prefix}",
                objects
                    .replaced
                    .map_or(NOT_RECORDED.to_owned(), |n| n.to_string()),
                objects
                    .removed
                    .map_or(NOT_RECORDED.to_owned(), |n| n.to_string()),
            ));
        }

        DrillReport {
            format: FORMAT,
            generated_at: now,
            outcome: outcome.to_owned(),
            environment: EnvironmentInfo {
                name: r(env.name.as_str()),
                repository: repository_label(&env.repository),
                fleet: env.fleet.iter().map(|(k, v)| (r(k), *v)).collect(),
            },
            run: RunInfo {
                id: r(&run.id),
                kind: run.kind.as_str().to_owned(),
                state: run.state.as_str().to_owned(),
                reason: run.reason.as_deref().map(r),
                plan: plan.as_ref().map(|p| r(&p.name)),
                epoch: run.epoch.get(),
                created_at: run.created_at,
                started_at,
                finished_at: run.finished_at,
            },
            target: Target {
                point_id: point_id.as_deref().map(r),
                point_created_at,
                point_file_read: point.is_some(),
            },
            pre_restore_database: postgres.pre_restore_database.clone(),
            quarantine_prefix: objects.quarantine_prefix.clone(),
            postgres,
            objects,
            secret_refs: secret_rows(point, env),
            counts,
            checks,
            excluded,
            follow_ups: follow,
            phases,
            rto,
            rpo,
        }
    }

    /// The action of each phase: from the journaled plan, else from the commands it sent.
    fn phase_actions(&self, plan: Option<&Plan>) -> BTreeMap<u32, String> {
        let mut actions = BTreeMap::new();
        for (command, _) in &self.commands {
            // A smoke phase scales first: the smoke names the phase, not the scale.
            let slot = actions
                .entry(command.phase_index)
                .or_insert_with(String::new);
            if slot.is_empty() || slot == ActionKind::Scale.as_str() {
                *slot = command.action.as_str().to_owned();
            }
        }
        if let Some(plan) = plan {
            for phase in &plan.phases {
                actions.insert(phase.index as u32, phase.action.as_str().to_owned());
            }
        }
        actions
    }

    /// Per (phase, agent, action): the command of the newest attempt, preferring one with a
    /// result, in journal order.
    fn latest_execs(&self) -> Vec<Exec<'_>> {
        let mut latest: BTreeMap<(u32, &str, ActionKind), Exec<'_>> = BTreeMap::new();
        for (command, result) in &self.commands {
            let key = (command.phase_index, command.agent.as_str(), command.action);
            let newer = match latest.get(&key) {
                None => true,
                Some(held) => match (held.result, result) {
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                    (Some(a), Some(b)) => {
                        (command.attempt, b.received_at) >= (held.command.attempt, a.received_at)
                    }
                    (None, None) => command.attempt >= held.command.attempt,
                },
            };
            if newer {
                latest.insert(
                    key,
                    Exec {
                        command,
                        result: result.as_ref(),
                    },
                );
            }
        }
        latest.into_values().collect()
    }

    fn finished_event_duration(&self, phase: &str) -> Option<i64> {
        self.events
            .iter()
            .rev()
            .filter(|e| e.kind == "phase.finished")
            .find(|e| e.payload.get("phase").and_then(Value::as_str) == Some(phase))
            .and_then(|e| e.payload.get("duration_ms"))
            .and_then(Value::as_i64)
    }
}

/// Redacts a string from the journal, an operator or the config.
fn r(s: &str) -> String {
    redact(s).into_owned()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The successful execution when there is one, else the newest.
fn pick<'e, 'a>(execs: &[&'e Exec<'a>]) -> Option<&'e Exec<'a>> {
    execs
        .iter()
        .rev()
        .find(|e| e.succeeded())
        .or_else(|| execs.last())
        .copied()
}

/// [`pick`] for each agent that ran the action, in agent order.
fn pick_per_agent<'e, 'a>(execs: &[&'e Exec<'a>]) -> Vec<&'e Exec<'a>> {
    let mut by_agent: BTreeMap<&str, Vec<&'e Exec<'a>>> = BTreeMap::new();
    for exec in execs {
        by_agent
            .entry(exec.command.agent.as_str())
            .or_default()
            .push(exec);
    }
    by_agent.values().filter_map(|e| pick(e)).collect()
}

/// Counts of several agents merged (one database agent normally has them all); None when no
/// agent reported any.
fn merged_counts<'a>(sources: impl Iterator<Item = &'a Counts>) -> Option<BTreeMap<String, i64>> {
    let mut merged: Option<BTreeMap<String, i64>> = None;
    for counts in sources {
        let into = merged.get_or_insert_with(BTreeMap::new);
        for (key, n) in counts {
            into.insert(r(key), *n);
        }
    }
    merged
}

/// A count from one source. A grouped key (`table[column=value]`) missing from a source that
/// counted the table by that column means no rows had that value: 0.
fn count_of(counts: &BTreeMap<String, i64>, key: &str) -> Option<i64> {
    if let Some(n) = counts.get(key) {
        return Some(*n);
    }
    let (table, rest) = key.split_once('[')?;
    let (column, _) = rest.split_once('=')?;
    let grouped = format!("{table}[{column}=");
    let counted = counts.contains_key(table) && counts.keys().any(|k| k.starts_with(&grouped));
    (counted || counts.get(table) == Some(&0)).then_some(0)
}

fn count_rows(
    before: Option<&BTreeMap<String, i64>>,
    at_point: Option<&BTreeMap<String, i64>>,
    after: Option<&BTreeMap<String, i64>>,
) -> Vec<CountRow> {
    let sources = [before, at_point, after];
    let mut keys: Vec<(String, String)> = REQUIRED_COUNTS
        .iter()
        .map(|(k, label)| ((*k).to_owned(), (*label).to_owned()))
        .collect();
    let required: BTreeSet<&str> = REQUIRED_COUNTS.iter().map(|(k, _)| *k).collect();
    let others: BTreeSet<String> = sources
        .iter()
        .flatten()
        .flat_map(|m| m.keys())
        .filter(|k| !required.contains(k.as_str()))
        .map(|k| r(k))
        .collect();
    keys.extend(others.into_iter().map(|k| (k.clone(), k)));
    keys.into_iter()
        .map(|(key, label)| {
            let [before, at_point, after] = sources.map(|s| s.and_then(|m| count_of(m, &key)));
            CountRow {
                matches_point: at_point.zip(after).map(|(p, a)| p == a),
                key,
                label,
                before,
                at_point,
                after,
            }
        })
        .collect()
}

/// The checks of one preflight, verify or smoke execution. An execution whose output lists no
/// checks (it failed before running them, timed out, or never answered) still gets a row.
fn check_rows(exec: &Exec<'_>, phase: &str, agent: &str, required: bool) -> Vec<CheckRow> {
    let action = exec.command.action.as_str();
    let row = |name: String, kind: String, required: bool, passed: Option<bool>, detail: String| {
        CheckRow {
            phase: phase.to_owned(),
            agent: agent.to_owned(),
            name,
            kind,
            required,
            passed,
            detail,
        }
    };
    let Some(result) = exec.result else {
        return vec![row(
            action.to_owned(),
            action.to_owned(),
            required,
            None,
            "the agent never answered".to_owned(),
        )];
    };
    let listed: Vec<CheckRow> = exec
        .output()
        .map(ActionOutput::checks)
        .unwrap_or_default()
        .iter()
        .map(|check| {
            row(
                r(&check.name),
                check.kind.as_str().to_owned(),
                check.required,
                Some(check.passed),
                r(&check.detail),
            )
        })
        .collect();
    if exec.command.action == ActionKind::Preflight {
        let verify = match exec.output() {
            Some(ActionOutput::Preflight(p)) => p.verify.as_ref(),
            _ => None,
        };
        let detail = match verify {
            Some(v) if exec.succeeded() => format!(
                "dump checksum verified over {} bytes; {} snapshot objects present",
                v.dump_bytes, v.objects_checked
            ),
            _ => r(&result.detail),
        };
        // The point's verification, then what the agent checked beside it (the counted
        // tables present, the schema against the point's).
        let mut rows = vec![row(
            "recovery point verification".to_owned(),
            "preflight".to_owned(),
            required,
            Some(exec.succeeded()),
            detail,
        )];
        rows.extend(listed);
        return rows;
    }
    if listed.is_empty() {
        let detail = if result.detail.is_empty() {
            result.outcome.as_str().to_owned()
        } else {
            format!("{}: {}", result.outcome, result.detail)
        };
        return vec![row(
            action.to_owned(),
            action.to_owned(),
            required,
            Some(exec.succeeded()),
            r(&detail),
        )];
    }
    listed
}

/// `"rotate the cookie secret@alice"` → text and owner. The owner follows the first `@` after
/// which no space comes, so an `@` inside the text does not split it.
fn parse_follow_up(raw: &str) -> FollowUp {
    let split = raw
        .char_indices()
        .filter(|&(_, c)| c == '@')
        .map(|(i, _)| i)
        .find(|&i| {
            let owner = &raw[i + 1..];
            !owner.is_empty() && !owner.contains(char::is_whitespace)
        });
    let (text, owner) = match split {
        Some(i) if !raw[..i].trim().is_empty() => (&raw[..i], Some(&raw[i + 1..])),
        _ => (raw, None),
    };
    FollowUp {
        text: r(text.trim()),
        owner: owner.map(r),
        source: "operator".to_owned(),
    }
}

/// The point's references as recorded at backup time, then any reference of the environment
/// the point lacks or records differently (a rotation since, a new secret).
fn secret_rows(point: Option<&Point>, env: &Environment) -> Vec<SecretRefRow> {
    let row = |s: &repository::SecretRef, source: &str| SecretRefRow {
        name: r(&s.name),
        manager: r(&s.manager),
        reference: r(&s.reference),
        version: s.version.as_deref().map(r),
        kms_key: s.kms_key.as_deref().map(r),
        rotated_at: s.rotated_at,
        source: source.to_owned(),
    };
    let recorded: &[repository::SecretRef] = point.map_or(&[], |p| &p.secrets);
    let mut rows: Vec<SecretRefRow> = recorded.iter().map(|s| row(s, "recovery point")).collect();
    for s in &env.secrets {
        if !recorded.contains(s) {
            rows.push(row(s, "environment config"));
        }
    }
    rows
}

/// A repository for the report: a local path is withheld (the runbook forbids local paths in
/// reports); anything else is shown redacted.
fn repository_label(url: &str) -> String {
    if url.starts_with("file://") {
        "local filesystem repository (path withheld)".to_owned()
    } else {
        r(url)
    }
}

impl DrillReport {
    /// The report as JSON (stable field names; `format` names the version). Redacted again as
    /// a whole, so a field added later cannot carry a secret out.
    pub fn to_json(&self) -> Value {
        let mut value =
            serde_json::to_value(self).expect("a drill report has string keys and serializes");
        redact_json(&mut value);
        value
    }

    /// The report as the runbook's `docs/runbooks/restore-drill-report.md`.
    pub fn to_markdown(&self) -> String {
        let mut md = Markdown::default();
        let run = &self.run;
        md.line(&format!(
            "# Restore drill report: {} — {}",
            self.environment.name,
            self.run
                .started_at
                .unwrap_or(self.run.created_at)
                .format("%Y-%m-%d")
        ));
        md.blank();
        md.line(&format!(
            "Filled from the journal of run `{}` by rollcall {} at {}. Secrets, signed URLs \
             and local paths are redacted; a value the journal does not hold reads \
             \"{NOT_RECORDED}\".",
            run.id,
            api::VERSION,
            time(Some(self.generated_at))
        ));

        md.section("Summary");
        let checks_passed = self
            .checks
            .iter()
            .filter(|c| c.passed == Some(true))
            .count();
        let checks_failed = self
            .checks
            .iter()
            .filter(|c| c.required && c.passed == Some(false))
            .count();
        let checks_warned = self
            .checks
            .iter()
            .filter(|c| !c.required && c.passed == Some(false))
            .count();
        let checks_unknown = self.checks.iter().filter(|c| c.passed.is_none()).count();
        md.table(
            &["Field", "Value"],
            vec![
                vec!["Outcome".into(), format!("**{}**", self.outcome)],
                vec!["Environment".into(), self.environment.name.clone()],
                vec![
                    "Restore target".into(),
                    match &self.target.point_id {
                        Some(id) => {
                            format!("point `{id}`, taken {}", time(self.target.point_created_at))
                        }
                        None => NOT_RECORDED.into(),
                    },
                ],
                vec![
                    "Run".into(),
                    format!(
                        "`{}` ({}, plan {}, epoch {})",
                        run.id,
                        run.kind,
                        opt(&run.plan),
                        run.epoch
                    ),
                ],
                vec![
                    "Run state".into(),
                    match &run.reason {
                        Some(reason) => format!("{}: {reason}", run.state),
                        None => run.state.clone(),
                    },
                ],
                vec!["Run started".into(), time(run.started_at)],
                vec![
                    "Run finished".into(),
                    match (run.finished_at, run.state.as_str()) {
                        (Some(at), _) => time(Some(at)),
                        (None, "running" | "pending") => {
                            "still running when this report was written".into()
                        }
                        (None, "blocked") => {
                            "not finished: blocked, waiting for an operator".into()
                        }
                        (None, _) => NOT_RECORDED.into(),
                    },
                ],
                vec![
                    "Postgres restored (swapped in)".into(),
                    time(self.postgres.restored_at),
                ],
                vec!["Object snapshot".into(), opt(&self.objects.snapshot_id)],
                vec!["Measured RTO".into(), self.rto.summary()],
                vec!["RPO achieved".into(), self.rpo.summary()],
                vec![
                    "Checks".into(),
                    format!(
                        "{checks_passed} passed, {checks_failed} failed, {checks_warned} \
                         warnings (optional checks that failed), {checks_unknown} not recorded"
                    ),
                ],
                vec!["Follow-ups".into(), self.follow_ups.len().to_string()],
            ],
        );

        md.section("Environment");
        let fleet = if self.environment.fleet.is_empty() {
            NOT_RECORDED.to_owned()
        } else {
            self.environment
                .fleet
                .iter()
                .map(|(role, n)| format!("{role} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.table(
            &["Field", "Value"],
            vec![
                vec!["Name".into(), self.environment.name.clone()],
                vec![
                    "Backup repository".into(),
                    self.environment.repository.clone(),
                ],
                vec!["Declared fleet".into(), fleet],
                vec!["RPO objective".into(), objective(self.rpo.objective_ms)],
                vec!["RTO objective".into(), objective(self.rto.objective_ms)],
            ],
        );

        md.section("Postgres");
        let pg = &self.postgres;
        md.table(
            &["Field", "Value"],
            vec![
                vec![
                    "Backup source".into(),
                    format!(
                        "{} in {}",
                        code(&pg.backup_key),
                        self.environment.repository
                    ),
                ],
                vec!["Backup sha256".into(), code(&pg.backup_sha256)],
                vec!["Backup size".into(), bytes(pg.backup_bytes)],
                vec![
                    "Backup taken".into(),
                    format!(
                        "{} → {}",
                        time(pg.backup_started_at),
                        time(pg.backup_finished_at)
                    ),
                ],
                vec![
                    "Versions".into(),
                    format!(
                        "server {}, pg_dump {}",
                        opt(&pg.server_version),
                        opt(&pg.pg_dump_version)
                    ),
                ],
                vec!["Database restored".into(), code(&pg.database)],
                vec!["Restore agent".into(), opt(&pg.restore_agent)],
                vec!["Restore started".into(), time(pg.restore_started_at)],
                vec![
                    "Restore timestamp (swapped in)".into(),
                    time(pg.restored_at),
                ],
                vec!["Archive read".into(), bytes(pg.archive_bytes)],
                vec![
                    "Restore took".into(),
                    pg.elapsed_ms
                        .map_or(NOT_RECORDED.into(), |ms| human_ms(ms as i64)),
                ],
                vec![
                    "Pre-restore database (kept)".into(),
                    code(&pg.pre_restore_database),
                ],
                vec![
                    "Resumed".into(),
                    pg.resumed.clone().unwrap_or_else(|| "no".into()),
                ],
            ],
        );

        md.section("Object storage");
        let o = &self.objects;
        let n = |v: Option<u64>| v.map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
        md.table(
            &["Field", "Value"],
            vec![
                vec!["Snapshot".into(), code(&o.snapshot_id)],
                vec![
                    "Snapshot size".into(),
                    format!(
                        "{} objects, {}",
                        n(o.snapshot_objects),
                        bytes(o.snapshot_bytes)
                    ),
                ],
                vec!["Restore agent".into(), opt(&o.restore_agent)],
                vec!["Restored at".into(), time(o.restored_at)],
                vec![
                    "Objects written".into(),
                    format!("{} objects, {}", n(o.restored), bytes(o.restored_bytes)),
                ],
                vec!["Objects already matching".into(), n(o.unchanged)],
                vec!["Objects replaced (quarantined)".into(), n(o.replaced)],
                vec!["Objects removed (quarantined)".into(), n(o.removed)],
                vec!["Quarantine prefix".into(), code(&o.quarantine_prefix)],
            ],
        );

        md.section("Secret manager and KMS references");
        md.line("Names, managers, references, versions and KMS keys only; never values.");
        md.blank();
        if self.secret_refs.is_empty() {
            md.line(&format!("No secret references: {NOT_RECORDED}."));
        } else {
            md.table(
                &[
                    "Secret",
                    "Manager",
                    "Reference",
                    "Version",
                    "KMS key",
                    "Rotated",
                    "Source",
                ],
                self.secret_refs
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.manager.clone(),
                            format!("`{}`", s.reference),
                            opt(&s.version),
                            code(&s.kms_key),
                            time(s.rotated_at),
                            s.source.clone(),
                        ]
                    })
                    .collect(),
            );
        }

        md.section("Counts before and after the restore");
        md.line(
            "Before: the live system at preflight. At point: taken in the dump's snapshot. \
             After: the restored system at verify.",
        );
        md.blank();
        let count = |v: Option<i64>| v.map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
        md.table(
            &[
                "Data",
                "Key",
                "Before",
                "At point",
                "After",
                "After = point",
            ],
            self.counts
                .iter()
                .map(|c| {
                    vec![
                        c.label.clone(),
                        format!("`{}`", c.key),
                        count(c.before),
                        count(c.at_point),
                        count(c.after),
                        match c.matches_point {
                            Some(true) => "yes".into(),
                            Some(false) => "**no**".into(),
                            None => NOT_RECORDED.into(),
                        },
                    ]
                })
                .collect(),
        );

        md.section("Checks and smoke commands");
        if self.checks.is_empty() {
            md.line(&format!("No checks: {NOT_RECORDED}."));
        } else {
            md.table(
                &[
                    "Phase", "Agent", "Check", "Kind", "Required", "Result", "Detail",
                ],
                self.checks
                    .iter()
                    .map(|c| {
                        vec![
                            c.phase.clone(),
                            c.agent.clone(),
                            c.name.clone(),
                            c.kind.clone(),
                            if c.required { "yes" } else { "no" }.into(),
                            match (c.passed, c.required) {
                                (Some(true), _) => "passed".into(),
                                (Some(false), true) => "**failed**".into(),
                                (Some(false), false) => "warning".into(),
                                (None, _) => NOT_RECORDED.into(),
                            },
                            c.detail.clone(),
                        ]
                    })
                    .collect(),
            );
        }

        md.section("Data intentionally excluded");
        if self.excluded.is_empty() {
            md.line("None declared.");
        } else {
            for item in &self.excluded {
                md.line(&format!("- {}", inline(item)));
            }
        }

        md.section("Pre-restore data kept");
        md.table(
            &["What", "Where"],
            vec![
                vec![
                    "The database as it was before the restore".into(),
                    code(&self.pre_restore_database),
                ],
                vec![
                    "Objects the restore replaced or removed".into(),
                    code(&self.quarantine_prefix),
                ],
            ],
        );

        md.section("Phases");
        md.table(
            &[
                "#", "Phase", "Action", "State", "Attempt", "Started", "Finished", "Duration",
                "Detail",
            ],
            self.phases
                .iter()
                .map(|p| {
                    vec![
                        p.index.to_string(),
                        p.name.clone(),
                        opt(&p.action),
                        p.state.clone(),
                        p.attempt.map_or(NOT_RECORDED.to_owned(), |a| a.to_string()),
                        time(p.started_at),
                        time(p.finished_at),
                        p.duration_ms.map_or(NOT_RECORDED.to_owned(), human_ms),
                        opt(&p.detail),
                    ]
                })
                .collect(),
        );

        md.section("Recovery objectives");
        md.table(
            &["Objective", "Target", "Measured", "From", "To", "Met"],
            vec![
                vec![
                    "RTO".into(),
                    objective(self.rto.objective_ms),
                    self.rto
                        .measured_ms
                        .map_or(NOT_RECORDED.to_owned(), human_ms),
                    format!("{} ({})", self.rto.measured_from, time(self.rto.from_at)),
                    match &self.rto.until_phase {
                        Some(phase) => {
                            format!("end of phase {phase} ({})", time(self.rto.until_at))
                        }
                        None => NOT_RECORDED.into(),
                    },
                    met(self.rto.met),
                ],
                vec![
                    "RPO (point age)".into(),
                    objective(self.rpo.objective_ms),
                    self.rpo
                        .point_age_ms
                        .map_or(NOT_RECORDED.to_owned(), human_ms),
                    format!("point taken ({})", time(self.rpo.point_created_at)),
                    format!(
                        "{} ({})",
                        self.rpo.measured_at_label,
                        time(self.rpo.measured_at)
                    ),
                    met(self.rpo.met),
                ],
            ],
        );

        md.section("Follow-ups");
        if self.follow_ups.is_empty() {
            md.line("None.");
        } else {
            md.table(
                &["Follow-up", "Owner", "Source"],
                self.follow_ups
                    .iter()
                    .map(|f| {
                        vec![
                            f.text.clone(),
                            f.owner.clone().unwrap_or_else(|| "unassigned".into()),
                            f.source.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        md.0
    }
}

impl Rto {
    fn summary(&self) -> String {
        match self.measured_ms {
            Some(ms) => {
                let mut text = format!(
                    "{} from {} — objective {} — {}",
                    human_ms(ms),
                    self.measured_from,
                    objective(self.objective_ms),
                    met(self.met)
                );
                if let Some(note) = &self.note {
                    text.push_str(&format!(" ({note})"));
                }
                text
            }
            None => format!(
                "{NOT_RECORDED} — objective {}",
                objective(self.objective_ms)
            ),
        }
    }
}

impl Rpo {
    fn summary(&self) -> String {
        match self.point_age_ms {
            Some(ms) => format!(
                "point {} old at {} — objective {} — {}",
                human_ms(ms),
                self.measured_at_label,
                objective(self.objective_ms),
                met(self.met)
            ),
            None => format!(
                "{NOT_RECORDED} — objective {}",
                objective(self.objective_ms)
            ),
        }
    }
}

/// A Markdown document under construction.
#[derive(Default)]
struct Markdown(String);

impl Markdown {
    fn line(&mut self, text: &str) {
        self.0.push_str(text);
        self.0.push('\n');
    }

    fn blank(&mut self) {
        self.0.push('\n');
    }

    fn section(&mut self, title: &str) {
        self.blank();
        self.line(&format!("## {title}"));
        self.blank();
    }

    fn table(&mut self, headers: &[&str], rows: Vec<Vec<String>>) {
        self.line(&format!("| {} |", headers.join(" | ")));
        self.line(&format!(
            "|{}",
            headers.iter().map(|_| " --- |").collect::<String>()
        ));
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| inline(c)).collect();
            self.line(&format!("| {} |", cells.join(" | ")));
        }
    }
}

/// Text fit for one table cell or list item: no line breaks, no column separators.
fn inline(text: &str) -> String {
    text.replace('|', "\\|")
        .replace("\r\n", " ")
        .replace(['\n', '\r'], " ")
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| NOT_RECORDED.to_owned())
}

fn code(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("`{}`", v.replace('`', "'")),
        None => NOT_RECORDED.to_owned(),
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or(NOT_RECORDED.to_owned(), |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}

fn bytes(n: Option<u64>) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let Some(n) = n else {
        return NOT_RECORDED.to_owned();
    };
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {} ({n} bytes)", UNITS[unit])
    }
}

fn human_ms(ms: i64) -> String {
    if ms < 0 {
        return format!("-{}", human_ms(-ms));
    }
    if ms < 1000 {
        return format!("{ms} ms");
    }
    if ms < 60_000 {
        return format!("{:.1} s", ms as f64 / 1000.0);
    }
    humantime::format_duration(Duration::from_secs(ms as u64 / 1000)).to_string()
}

fn objective(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

fn met(met: Option<bool>) -> String {
    match met {
        Some(true) => "met".into(),
        Some(false) => "**not met**".into(),
        None => NOT_RECORDED.into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use api::model::output::{ChecksOutput, PreflightOutput, RestorePostgresOutput, VerifyOutput};
    use api::model::{Check, CheckKind, Epoch, ScaleOutput};
    use chrono::TimeZone;
    use repository::{
        Compression, ObjectSnapshotPart, PgBackupPart, PointId, SecretRef, SnapshotId,
    };
    use serde_json::json;

    use super::*;
    use crate::store::{NewRun, RunKind};

    const POINT: &str = "20261125T073000Z-prod-399b4d21";
    const RUN: &str = "20261125T100000Z-drill-prod-7c1e";
    const TOKEN: &str = "cws_operator_5f0c2a9be1d84c7f9e3a6b2d1c0f4e8a7b6c5d4e";
    const PASSWORD: &str = "hunter2-Pg-Secret";

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap()
    }

    fn environment(secrets: Vec<SecretRef>) -> Environment {
        let fleet: crate::plan::Fleet = [
            ("web", 1),
            ("worker", 2),
            ("scheduler", 1),
            ("gateway", 1),
            ("database", 1),
            ("objects", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Environment {
            name: api::model::Environment::parse("prod").unwrap(),
            rpo: Duration::from_secs(24 * 3600),
            rto: Duration::from_secs(4 * 3600),
            retention: Duration::from_secs(14 * 24 * 3600),
            repository: "s3://cowork-backups/prod".to_owned(),
            backup_schedule: None,
            plan: Plan::default_plan(Some(&fleet)).unwrap(),
            backup_plan: Plan::backup_plan(&fleet).unwrap(),
            fleet,
            repository_ref: api::model::RepositoryRef {
                url: "s3://cowork-backups/prod".to_owned(),
                s3_endpoint: None,
                s3_region: Some("nyc3".to_owned()),
                s3_path_style: false,
            },
            secrets,
        }
    }

    fn cookie_secret(version: &str) -> SecretRef {
        SecretRef {
            name: "cookie-secret".to_owned(),
            manager: "aws-secrets-manager".to_owned(),
            reference: "arn:aws:secretsmanager:us-east-1:123456789012:secret:cowork/cookie-AbCdEf"
                .to_owned(),
            version: Some(version.to_owned()),
            kms_key: Some("arn:aws:kms:us-east-1:123456789012:key/1234abcd".to_owned()),
            rotated_at: Some(at(1, 0, 0)),
        }
    }

    fn point() -> Point {
        let counts: BTreeMap<String, i64> = [
            ("sessions", 120),
            ("session_events", 5400),
            ("session_projections", 120),
            ("artifact_index", 340),
            ("workflows", 18),
            ("channel_bindings", 9),
            ("channel_deliveries", 75),
            ("channel_deliveries[status=pending]", 4),
            ("channel_deliveries[status=failed]", 2),
            ("channel_deliveries[status=sent]", 69),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Point {
            id: PointId::parse(POINT).unwrap(),
            environment: "prod".to_owned(),
            created_at: at(7, 31, 0),
            postgres: Some(PgBackupPart {
                key: format!("postgres/{POINT}.dump.zst"),
                compression: Compression::Zstd {
                    level: 3,
                    workers: 2,
                },
                size: 3 * 1024 * 1024,
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                    .to_owned(),
                dump_size: 9 * 1024 * 1024,
                files: vec![],
                database: "cowork".to_owned(),
                server_version: "16.4".to_owned(),
                pg_dump_version: "pg_dump (PostgreSQL) 16.4".to_owned(),
                snapshot: "00000003-00000002-1".to_owned(),
                started_at: at(7, 30, 0),
                finished_at: at(7, 30, 40),
                table_counts: counts,
                columns: Default::default(),
            }),
            objects: Some(ObjectSnapshotPart {
                snapshot_id: SnapshotId::parse("20261125T073000Z-3f2a9c01").unwrap(),
                manifest_key: "objects/snapshots/20261125T073000Z-3f2a9c01.json".to_owned(),
                manifest_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                    .to_owned(),
                manifest_size: 4096,
                objects: 340,
                bytes: 52_428_800,
                copied_objects: 12,
                copied_bytes: 1_048_576,
                source: "s3://cowork-objects/prod".to_owned(),
                started_at: at(7, 30, 0),
                finished_at: at(7, 30, 55),
            }),
            secrets: vec![cookie_secret("v3")],
            tool_versions: BTreeMap::new(),
        }
    }

    struct TestJournal {
        store: std::sync::Arc<dyn Store>,
        _dir: tempfile::TempDir,
    }

    async fn journal() -> TestJournal {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let store = crate::store::open(&url).await.unwrap();
        TestJournal { store, _dir: dir }
    }

    impl TestJournal {
        async fn run(&self, state: RunState, reason: Option<&str>) {
            self.store
                .create_run(&NewRun {
                    id: RUN.to_owned(),
                    kind: RunKind::Drill,
                    environment: "prod".to_owned(),
                    point_id: Some(POINT.to_owned()),
                    plan: crate::plan::DEFAULT_PLAN.to_owned(),
                    params: json!({}),
                    epoch: Epoch::new(3).unwrap(),
                    created_at: at(9, 59, 50),
                })
                .await
                .unwrap();
            self.store
                .append_event(RUN, at(9, 59, 50), "run.created", &json!({}))
                .await
                .unwrap();
            self.store
                .set_run_state(RUN, RunState::Running, None, at(10, 0, 0))
                .await
                .unwrap();
            self.store
                .append_event(RUN, at(10, 0, 0), "run.started", &json!({ "epoch": 3 }))
                .await
                .unwrap();
            if state != RunState::Running {
                self.store
                    .set_run_state(RUN, state, reason, at(10, 30, 0))
                    .await
                    .unwrap();
            }
        }

        async fn phase(
            &self,
            index: u32,
            name: &str,
            state: PhaseState,
            from: DateTime<Utc>,
            until: Option<DateTime<Utc>>,
            detail: &str,
        ) {
            self.store
                .put_phase(&PhaseRecord {
                    run_id: RUN.to_owned(),
                    index,
                    name: name.to_owned(),
                    state,
                    attempt: 1,
                    started_at: Some(from),
                    finished_at: until,
                    detail: (!detail.is_empty()).then(|| detail.to_owned()),
                })
                .await
                .unwrap();
            if let Some(until) = until {
                self.store
                    .append_event(
                        RUN,
                        until,
                        "phase.finished",
                        &json!({ "phase": name, "state": state.as_str(), "detail": detail,
                                 "duration_ms": (until - from).num_milliseconds() }),
                    )
                    .await
                    .unwrap();
            }
        }

        #[allow(clippy::too_many_arguments)]
        async fn command(
            &self,
            phase: (u32, &str),
            agent: &str,
            action: ActionKind,
            step: u32,
            outcome: Option<Outcome>,
            message: &str,
            output: Option<ActionOutput>,
            received: DateTime<Utc>,
        ) {
            let id = format!("{RUN}/{}/{agent}/a1/s{step}/r0", phase.1);
            self.store
                .record_command(&CommandRecord {
                    command_id: id.clone(),
                    run_id: RUN.to_owned(),
                    phase_index: phase.0,
                    agent: agent.to_owned(),
                    action,
                    payload: json!({}),
                    attempt: 1,
                    epoch: Epoch::new(3).unwrap(),
                    created_at: received,
                })
                .await
                .unwrap();
            if let Some(outcome) = outcome {
                self.store
                    .record_result(&ResultRecord {
                        command_id: id,
                        agent: agent.to_owned(),
                        epoch: Epoch::new(3).unwrap(),
                        outcome,
                        replayed: false,
                        detail: message.to_owned(),
                        output,
                        received_at: received,
                    })
                    .await
                    .unwrap();
            }
        }
    }

    fn live_counts() -> Counts {
        [
            ("sessions", 131),
            ("session_events", 5900),
            ("session_projections", 131),
            ("artifact_index", 352),
            ("workflows", 19),
            ("channel_bindings", 9),
            ("channel_deliveries", 80),
            ("channel_deliveries[status=pending]", 6),
            ("channel_deliveries[status=failed]", 2),
            ("channel_deliveries[status=dead]", 1),
            ("channel_deliveries[status=sent]", 71),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect()
    }

    /// The point's verification as a preflight reports it.
    fn verified(elapsed_ms: u64) -> repository::VerifyReport {
        repository::VerifyReport {
            point: PointId::parse(POINT).unwrap(),
            full: false,
            problems: vec![],
            dump_bytes: 3_145_728,
            objects_checked: 340,
            blob_bytes_hashed: 0,
            elapsed_ms,
        }
    }

    /// A passed check.
    fn check(name: &str, kind: CheckKind, required: bool, detail: &str) -> Check {
        Check {
            name: name.to_owned(),
            kind,
            required,
            passed: true,
            detail: detail.to_owned(),
        }
    }

    /// A drill that went through every phase up to the report, as the engine journals it.
    async fn full_drill(j: &TestJournal) {
        use PhaseState::{Failed, Passed, Running};
        j.run(RunState::Running, None).await;

        j.phase(
            0,
            "preflight",
            Passed,
            at(10, 0, 1),
            Some(at(10, 0, 31)),
            "2 of 2 agents succeeded",
        )
        .await;
        j.command(
            (0, "preflight"),
            "db-1",
            ActionKind::Preflight,
            0,
            Some(Outcome::Succeeded),
            "point verified",
            Some(ActionOutput::Preflight(PreflightOutput {
                verify: Some(verified(900)),
                live_counts: Some(live_counts()),
                checks: vec![],
            })),
            at(10, 0, 30),
        )
        .await;
        j.command(
            (0, "preflight"),
            "objects-1",
            ActionKind::Preflight,
            0,
            Some(Outcome::Succeeded),
            "point verified",
            Some(ActionOutput::Preflight(PreflightOutput {
                verify: Some(verified(700)),
                live_counts: None,
                checks: vec![],
            })),
            at(10, 0, 29),
        )
        .await;

        j.phase(
            1,
            "freeze-writes",
            Passed,
            at(10, 0, 40),
            Some(at(10, 0, 42)),
            "1 of 1 web",
        )
        .await;
        j.command(
            (1, "freeze-writes"),
            "web-1",
            ActionKind::Freeze,
            0,
            Some(Outcome::Succeeded),
            "frozen",
            None,
            at(10, 0, 41),
        )
        .await;
        j.phase(
            2,
            "scale-to-zero",
            Passed,
            at(10, 0, 43),
            Some(at(10, 0, 50)),
            "4 of 4",
        )
        .await;
        j.command(
            (2, "scale-to-zero"),
            "worker-1",
            ActionKind::Scale,
            0,
            Some(Outcome::Succeeded),
            "scaled",
            Some(ActionOutput::Scale(ScaleOutput {
                before: 2,
                now: 0,
                prior: 2,
            })),
            at(10, 0, 49),
        )
        .await;

        j.phase(
            3,
            "restore-postgres",
            Passed,
            at(10, 1, 0),
            Some(at(10, 6, 0)),
            "1 of 1 database",
        )
        .await;
        j.command(
            (3, "restore-postgres"),
            "db-1",
            ActionKind::RestorePostgres,
            0,
            Some(Outcome::Succeeded),
            // A message that carries a connection URL with its password.
            &format!("restored via postgres://rollcall:{PASSWORD}@db.internal:5432/cowork"),
            Some(ActionOutput::RestorePostgres(RestorePostgresOutput {
                database: "cowork".to_owned(),
                pre_restore_database: "cowork_pre_r1a2b3c4d".to_owned(),
                point: POINT.to_owned(),
                archive_bytes: 3_145_728,
                resumed: String::new(),
                elapsed_ms: 298_000,
            })),
            at(10, 5, 58),
        )
        .await;
        j.phase(
            4,
            "restore-objects",
            Passed,
            at(10, 1, 0),
            Some(at(10, 3, 0)),
            "1 of 1 objects",
        )
        .await;
        j.command(
            (4, "restore-objects"),
            "objects-1",
            ActionKind::RestoreObjects,
            0,
            Some(Outcome::Succeeded),
            "restored",
            Some(ActionOutput::RestoreObjects(RestoreObjectsOutput {
                snapshot: "20261125T073000Z-3f2a9c01".to_owned(),
                shard: 0,
                shards: 1,
                restored: 12,
                restored_bytes: 1_048_576,
                unchanged: 328,
                replaced: 3,
                removed: 9,
                quarantine_prefix: "quarantine/r1a2b3c4d".to_owned(),
            })),
            at(10, 2, 59),
        )
        .await;

        j.phase(
            5,
            "start-web",
            Passed,
            at(10, 6, 1),
            Some(at(10, 6, 20)),
            "1 of 1 web ready",
        )
        .await;
        j.phase(
            6,
            "verify",
            Passed,
            at(10, 6, 21),
            Some(at(10, 7, 30)),
            "3 of 3 agents succeeded",
        )
        .await;
        j.command(
            (6, "verify"),
            "web-1",
            ActionKind::Verify,
            0,
            Some(Outcome::Succeeded),
            "5 checks passed",
            Some(ActionOutput::Verify(VerifyOutput {
                checks: vec![
                    check(
                        "readyz",
                        CheckKind::Http,
                        true,
                        "GET http://127.0.0.1:8080/readyz → 200",
                    ),
                    check(
                        "operator diagnostics",
                        CheckKind::Http,
                        true,
                        &format!("GET /api/diagnostics with Authorization: Bearer {TOKEN} → 200"),
                    ),
                    Check {
                        required: false,
                        passed: false,
                        ..check(
                            "metrics",
                            CheckKind::Http,
                            true,
                            "GET http://127.0.0.1:8080/api/metrics → 503",
                        )
                    },
                ],
                counts: None,
                references: vec![],
            })),
            at(10, 7, 0),
        )
        .await;
        let mut after = point().table_counts().unwrap().clone();
        after.insert("channel_deliveries[status=failed]".to_owned(), 2);
        j.command(
            (6, "verify"),
            "db-1",
            ActionKind::Verify,
            0,
            Some(Outcome::Succeeded),
            "2 checks passed",
            Some(ActionOutput::Verify(VerifyOutput {
                checks: vec![
                    check(
                        "count parity",
                        CheckKind::Count,
                        true,
                        "12 tables equal the point",
                    ),
                    check(
                        "no projection ahead of its events",
                        CheckKind::Invariant,
                        true,
                        "0 rows",
                    ),
                ],
                counts: Some(after),
                references: vec![],
            })),
            at(10, 7, 20),
        )
        .await;

        j.phase(
            7,
            "check-references",
            Passed,
            at(10, 7, 30),
            Some(at(10, 7, 31)),
            "1 of 1 objects",
        )
        .await;
        j.command(
            (7, "check-references"),
            "objects-1",
            ActionKind::CheckObjects,
            0,
            Some(Outcome::Succeeded),
            "1 reference checks passed",
            Some(ActionOutput::CheckObjects(ChecksOutput {
                checks: vec![check(
                    "artifact objects",
                    CheckKind::Reference,
                    true,
                    "every object present; checked all 40 rows",
                )],
            })),
            at(10, 7, 31),
        )
        .await;
        j.phase(
            8,
            "worker-smoke",
            Passed,
            at(10, 7, 31),
            Some(at(10, 9, 0)),
            "1 of 2 worker",
        )
        .await;
        j.command(
            (8, "worker-smoke"),
            "worker-1",
            ActionKind::Scale,
            0,
            Some(Outcome::Succeeded),
            "scaled",
            Some(ActionOutput::Scale(ScaleOutput {
                before: 0,
                now: 1,
                prior: 2,
            })),
            at(10, 7, 40),
        )
        .await;
        j.command(
            (8, "worker-smoke"),
            "worker-1",
            ActionKind::Smoke,
            1,
            Some(Outcome::Succeeded),
            "prompt processed",
            Some(ActionOutput::Smoke(ChecksOutput {
                checks: vec![check(
                    "worker smoke",
                    CheckKind::Smoke,
                    true,
                    &format!("cowork-sim smoke worker --token {TOKEN}: 1 prompt, 4 events"),
                )],
            })),
            at(10, 8, 59),
        )
        .await;
        j.phase(
            9,
            "scheduler-smoke",
            Passed,
            at(10, 9, 1),
            Some(at(10, 9, 40)),
            "1 of 1",
        )
        .await;
        j.command(
            (9, "scheduler-smoke"),
            "scheduler-1",
            ActionKind::Smoke,
            1,
            Some(Outcome::Succeeded),
            "claimed 2 due workflows once",
            Some(ActionOutput::Smoke(ChecksOutput {
                checks: vec![check(
                    "scheduler smoke",
                    CheckKind::Smoke,
                    true,
                    "2 due workflows claimed once",
                )],
            })),
            at(10, 9, 39),
        )
        .await;
        // An optional phase that failed: a warning and a follow-up, not a block.
        j.phase(
            10,
            "gateway-smoke",
            Failed,
            at(10, 9, 41),
            Some(at(10, 11, 0)),
            "0 of 1 gateway",
        )
        .await;
        j.command(
            (10, "gateway-smoke"),
            "gateway-1",
            ActionKind::Smoke,
            1,
            Some(Outcome::TimedOut),
            "smoke did not finish within 1m; owner ops@cowork.example",
            None,
            at(10, 10, 59),
        )
        .await;
        j.phase(
            11,
            "restore-replicas",
            Passed,
            at(10, 11, 1),
            Some(at(10, 12, 0)),
            "all roles ready",
        )
        .await;
        j.phase(12, "report", Running, at(10, 12, 1), None, "")
            .await;
    }

    #[tokio::test]
    async fn a_full_drill_fills_every_required_field_from_the_journal() {
        let j = journal().await;
        full_drill(&j).await;
        let point = point();
        let env = environment(vec![cookie_secret("v4")]);
        let report = build(
            &*j.store,
            RUN,
            &env,
            Some(&point),
            &[
                "re-run gateway smoke with a longer timeout@alice".to_owned(),
                format!("rotate the operator token {TOKEN}@bob"),
            ],
            &["local Desktop threads (stay local)".to_owned()],
        )
        .await
        .unwrap();
        let v = report.to_json();

        assert_eq!(v["format"], FORMAT);
        assert_eq!(v["environment"]["name"], "prod");
        assert_eq!(v["environment"]["repository"], "s3://cowork-backups/prod");
        assert_eq!(v["run"]["id"], RUN);
        assert_eq!(v["run"]["state"], "running");
        assert_eq!(v["run"]["plan"], "default");
        assert_eq!(v["run"]["started_at"], json!(at(10, 0, 0)));
        assert_eq!(v["target"]["point_id"], POINT);
        assert_eq!(v["target"]["point_created_at"], json!(at(7, 31, 0)));
        assert_eq!(
            v["postgres"]["backup_key"],
            format!("postgres/{POINT}.dump.zst")
        );
        assert_eq!(
            v["postgres"]["backup_sha256"],
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(v["postgres"]["restored_at"], json!(at(10, 6, 0)));
        assert_eq!(v["postgres"]["database"], "cowork");
        assert_eq!(v["pre_restore_database"], "cowork_pre_r1a2b3c4d");
        assert_eq!(v["objects"]["snapshot_id"], "20261125T073000Z-3f2a9c01");
        assert_eq!(v["objects"]["replaced"], 3);
        assert_eq!(v["objects"]["removed"], 9);
        assert_eq!(v["quarantine_prefix"], "quarantine/r1a2b3c4d");

        // Secret references: the point's, plus the environment's newer version; no values.
        let refs = v["secret_refs"].as_array().unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0]["version"], "v3");
        assert_eq!(refs[0]["source"], "recovery point");
        assert_eq!(refs[1]["version"], "v4");
        assert_eq!(
            refs[0]["reference"],
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:cowork/cookie-AbCdEf"
        );
        assert_eq!(
            refs[0]["kms_key"],
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd"
        );

        // Counts before → point → after, required keys first and in the runbook's order.
        let row = |key: &str| {
            report
                .counts
                .iter()
                .find(|c| c.key == key)
                .cloned()
                .unwrap()
        };
        let keys: Vec<&str> = report
            .counts
            .iter()
            .take(8)
            .map(|c| c.key.as_str())
            .collect();
        assert_eq!(keys, REQUIRED_COUNTS.map(|(k, _)| k));
        let sessions = row("sessions");
        assert_eq!(
            (
                sessions.before,
                sessions.at_point,
                sessions.after,
                sessions.matches_point
            ),
            (Some(131), Some(120), Some(120), Some(true))
        );
        let pending = row("channel_deliveries[status=pending]");
        assert_eq!(
            (pending.before, pending.at_point, pending.after),
            (Some(6), Some(4), Some(4))
        );
        // No dead deliveries at the point: counted by status, so 0 rather than unknown.
        let dead = row("channel_deliveries[status=dead]");
        assert_eq!(
            (dead.before, dead.at_point, dead.after),
            (Some(1), Some(0), Some(0))
        );
        assert_eq!(row("session_events").at_point, Some(5400));
        assert!(report.counts.iter().all(|c| c.matches_point == Some(true)));

        // Every check with its result, preflight and smoke included.
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "recovery point verification",
                "recovery point verification",
                "count parity",
                "no projection ahead of its events",
                "readyz",
                "operator diagnostics",
                "metrics",
                "artifact objects",
                "worker smoke",
                "scheduler smoke",
                "smoke",
            ]
        );
        let gateway = report.checks.last().unwrap();
        assert_eq!(gateway.passed, Some(false));
        assert_eq!(gateway.agent, "gateway-1");
        assert!(
            gateway
                .detail
                .starts_with("timed_out: smoke did not finish within 1m")
        );
        assert!(
            gateway.detail.contains("***@cowork.example"),
            "{}",
            gateway.detail
        );

        // Phases with durations; the report phase is still running.
        assert_eq!(report.phases.len(), 14);
        assert_eq!(report.phases[3].duration_ms, Some(300_000));
        assert_eq!(report.phases[3].action.as_deref(), Some("restore-postgres"));
        assert_eq!(report.phases[13].state, "not started");
        let reference = report
            .checks
            .iter()
            .find(|c| c.kind == "reference")
            .expect("the reference check is reported");
        assert_eq!(
            (
                reference.phase.as_str(),
                reference.name.as_str(),
                reference.passed
            ),
            ("check-references", "artifact objects", Some(true))
        );
        assert!(reference.detail.contains("checked all 40 rows"));

        // RTO from the freeze to the end of restore-replicas; RPO: the point's age then.
        assert_eq!(v["rto"]["measured_from"], "start of phase freeze-writes");
        assert_eq!(v["rto"]["measured_ms"], 11 * 60_000 + 20_000);
        assert_eq!(v["rto"]["until_phase"], "restore-replicas");
        assert_eq!(v["rto"]["objective_ms"], 4 * 3_600_000);
        assert_eq!(v["rto"]["met"], true);
        assert_eq!(v["rpo"]["point_age_ms"], (2 * 3600 + 29 * 60 + 40) * 1000);
        assert_eq!(v["rpo"]["met"], true);

        // Follow-ups: the operator's with owners, the failed optional phase and check.
        let follow: Vec<(String, Option<String>, String)> = report
            .follow_ups
            .iter()
            .map(|f| (f.text.clone(), f.owner.clone(), f.source.clone()))
            .collect();
        assert_eq!(follow[0].0, "re-run gateway smoke with a longer timeout");
        assert_eq!(follow[0].1.as_deref(), Some("alice"));
        assert_eq!(follow[1].0, "rotate the operator token [REDACTED]");
        assert_eq!(follow[1].1.as_deref(), Some("bob"));
        assert_eq!(
            follow[2].0,
            "optional phase gateway-smoke failed: 0 of 1 gateway; smoke on gateway-1: \
             timed_out: smoke did not finish within 1m; owner ***@cowork.example"
        );
        assert_eq!(
            (follow[2].1.as_deref(), follow[2].2.as_str()),
            (None, "phase")
        );
        assert_eq!(
            follow[3].0,
            "optional check metrics on web-1 failed: GET http://127.0.0.1:8080/api/metrics → 503"
        );
        assert_eq!(follow.len(), 4, "{follow:?}");
        assert_eq!(report.outcome, "passed with warnings");
        assert_eq!(
            report.excluded,
            [
                "local Desktop threads (stay local)".to_owned(),
                "objects the restore replaced (3) or removed (9) are not in the live store: \
                 they are kept under quarantine/r1a2b3c4d"
                    .to_owned()
            ]
        );

        let md = report.to_markdown();
        assert!(
            md.starts_with("# Restore drill report: prod — 2026-11-25\n"),
            "{md}"
        );
        assert!(
            md.contains("| Data | Key | Before | At point | After | After = point |"),
            "{md}"
        );
        assert!(
            md.contains("| Sessions | `sessions` | 131 | 120 | 120 | yes |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| Dead deliveries | `channel_deliveries[status=dead]` | 1 | 0 | 0 | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| Pre-restore database (kept) | `cowork_pre_r1a2b3c4d` |"),
            "{md}"
        );
        assert!(
            md.contains("| Quarantine prefix | `quarantine/r1a2b3c4d` |"),
            "{md}"
        );
        assert!(md.contains("| re-run gateway smoke with a longer timeout | alice | operator |"));
        assert!(
            md.contains("11m 20s from start of phase freeze-writes — objective 4h — met"),
            "{md}"
        );
        for section in [
            "## Summary",
            "## Postgres",
            "## Object storage",
            "## Secret manager and KMS references",
            "## Counts before and after the restore",
            "## Checks and smoke commands",
            "## Data intentionally excluded",
            "## Pre-restore data kept",
            "## Phases",
            "## Recovery objectives",
            "## Follow-ups",
        ] {
            assert!(md.contains(section), "{section} missing:\n{md}");
        }

        // No planted secret in either form.
        let json_text = v.to_string();
        for secret in [TOKEN, PASSWORD, "ops@cowork.example"] {
            assert!(
                !md.contains(secret),
                "{secret} leaked into the Markdown:\n{md}"
            );
            assert!(!json_text.contains(secret), "{secret} leaked into the JSON");
        }
        // The message with the password is not a check here, but a phase detail could carry it.
        assert!(!md.contains("hunter2"));
    }

    #[tokio::test]
    async fn a_blocked_run_without_its_point_shows_the_gaps() {
        let j = journal().await;
        let reason = format!(
            "phase restore-postgres did not pass: db-1: restore-postgres failed: connect to \
             postgres://rollcall:{PASSWORD}@db.internal/cowork refused; traffic stays frozen"
        );
        j.run(RunState::Blocked, Some(&reason)).await;
        use PhaseState::{Blocked, Passed};
        j.phase(
            0,
            "preflight",
            Passed,
            at(10, 0, 1),
            Some(at(10, 0, 31)),
            "ok",
        )
        .await;
        j.command(
            (0, "preflight"),
            "db-1",
            ActionKind::Preflight,
            0,
            Some(Outcome::Succeeded),
            "verified",
            Some(ActionOutput::Preflight(PreflightOutput {
                verify: None,
                live_counts: Some(live_counts()),
                checks: vec![],
            })),
            at(10, 0, 30),
        )
        .await;
        j.phase(
            1,
            "freeze-writes",
            Passed,
            at(10, 0, 40),
            Some(at(10, 0, 42)),
            "ok",
        )
        .await;
        j.phase(
            2,
            "scale-to-zero",
            Passed,
            at(10, 0, 43),
            Some(at(10, 0, 50)),
            "ok",
        )
        .await;
        j.phase(
            3,
            "restore-postgres",
            Blocked,
            at(10, 1, 0),
            Some(at(10, 2, 0)),
            &reason,
        )
        .await;
        j.command(
            (3, "restore-postgres"),
            "db-1",
            ActionKind::RestorePostgres,
            0,
            Some(Outcome::Failed),
            &format!("connect to postgres://rollcall:{PASSWORD}@db.internal/cowork refused"),
            None,
            at(10, 1, 59),
        )
        .await;
        // A command the agent never answered.
        j.command(
            (6, "verify"),
            "web-1",
            ActionKind::Verify,
            0,
            None,
            "",
            None,
            at(10, 2, 1),
        )
        .await;

        let report = build(&*j.store, RUN, &environment(Vec::new()), None, &[], &[])
            .await
            .unwrap();
        assert_eq!(report.outcome, "blocked");
        assert!(!report.target.point_file_read);
        assert_eq!(report.target.point_id.as_deref(), Some(POINT));
        // Without the point file, its time comes from its id.
        assert_eq!(report.target.point_created_at, Some(at(7, 30, 0)));
        assert_eq!(report.postgres.backup_key, None);
        assert_eq!(report.postgres.restored_at, None);
        assert_eq!(report.rto.met, Some(false));
        assert_eq!(
            report.rto.note.as_deref(),
            Some("the run is blocked: the service was not restored")
        );
        let sessions = report.counts.iter().find(|c| c.key == "sessions").unwrap();
        assert_eq!(
            (sessions.before, sessions.at_point, sessions.after),
            (Some(131), None, None)
        );
        let unanswered = report.checks.iter().find(|c| c.agent == "web-1").unwrap();
        assert_eq!(unanswered.passed, None);
        assert!(report.follow_ups.iter().any(|f| f.source == "run"));
        assert!(
            report
                .phases
                .iter()
                .any(|p| p.name == "verify" && p.state == "not started")
        );

        let md = report.to_markdown();
        assert!(md.contains("| Backup sha256 | not recorded |"), "{md}");
        assert!(
            md.contains(
                "| Sessions | `sessions` | 131 | not recorded | not recorded | not recorded |"
            ),
            "{md}"
        );
        assert!(md.contains("No secret references: not recorded."), "{md}");
        assert!(md.contains("**not met**"), "{md}");
        assert!(
            md.contains("postgres://rollcall:***@db.internal/cowork"),
            "{md}"
        );
        let json_text = report.to_json().to_string();
        assert!(!md.contains(PASSWORD), "{md}");
        assert!(!json_text.contains(PASSWORD));
    }

    #[tokio::test]
    async fn refuses_another_environment_or_point() {
        let j = journal().await;
        j.run(RunState::Running, None).await;
        let mut other = environment(Vec::new());
        other.name = api::model::Environment::parse("staging").unwrap();
        let err = build(&*j.store, RUN, &other, None, &[], &[])
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("belongs to environment prod"),
            "{err}"
        );
        let mut wrong = point();
        wrong.id = PointId::parse("20261124T073000Z-prod-00000000").unwrap();
        let err = build(
            &*j.store,
            RUN,
            &environment(Vec::new()),
            Some(&wrong),
            &[],
            &[],
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("restored point"), "{err}");
        let err = build(
            &*j.store,
            "no-such-run",
            &environment(Vec::new()),
            None,
            &[],
            &[],
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no run no-such-run"), "{err}");
    }

    #[test]
    fn follow_ups_split_at_the_owner() {
        let f = parse_follow_up("fix cursor replay@carol");
        assert_eq!(
            (f.text.as_str(), f.owner.as_deref()),
            ("fix cursor replay", Some("carol"))
        );
        let f = parse_follow_up("mail bob@example.com about it@dave");
        assert_eq!(f.owner.as_deref(), Some("dave"));
        assert_eq!(f.text, "mail ***@example.com about it");
        let f = parse_follow_up("no owner given");
        assert_eq!(
            (f.text.as_str(), f.owner.as_deref()),
            ("no owner given", None)
        );
        let f = parse_follow_up("rotate keys@ops@example.com");
        assert_eq!(f.owner.as_deref(), Some("***@example.com"));
    }

    #[test]
    fn grouped_counts_missing_from_a_source_are_zero_only_when_grouped() {
        let grouped: BTreeMap<String, i64> = [
            ("channel_deliveries".to_owned(), 3),
            ("channel_deliveries[status=sent]".to_owned(), 3),
        ]
        .into();
        assert_eq!(
            count_of(&grouped, "channel_deliveries[status=dead]"),
            Some(0)
        );
        assert_eq!(
            count_of(&grouped, "channel_deliveries[status=sent]"),
            Some(3)
        );
        let total_only: BTreeMap<String, i64> = [("channel_deliveries".to_owned(), 3)].into();
        assert_eq!(
            count_of(&total_only, "channel_deliveries[status=dead]"),
            None
        );
        assert_eq!(count_of(&total_only, "sessions"), None);
    }
}
