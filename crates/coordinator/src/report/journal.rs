//! One run's journal turned into a drill report: the newest execution of each command, the
//! Postgres and object restores, counts before/at/after, checks, phases, RTO and RPO, the
//! follow-ups the run left open and its outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::model::output::{Counts, RestoreObjectsOutput};
use api::model::{ActionKind, ActionOutput, Outcome};
use api::redact::redact;
use chrono::{DateTime, Utc};
use repository::Point;
use serde_json::Value;

use super::types::{
    ApprovalRow, CheckRow, CountRow, DrillReport, EXCLUDED_BY_CONFIG, EnvironmentInfo, Exclusion,
    FORMAT, FollowUp, Incident, NOT_RECORDED, ObjectsInfo, PhaseRow, PostgresInfo, RestoreTestInfo,
    Rpo, Rto, RunInfo, SecretRefRow, Target, ToTimeInfo, UndoInfo, WorkerDrillRow,
};
use crate::config::{Environment, ReportRow};
use crate::plan::{Action, Plan};
use crate::store::{
    CommandRecord, EventRecord, PhaseRecord, PhaseState, ResultRecord, RunKind, RunRecord,
    RunState, Store,
};

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
    let journal = Journal::read(store, run).await?;
    Ok(journal.report(env, point, follow_ups, excluded, Utc::now()))
}

/// One run's journal, read once.
pub(super) struct Journal {
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
    /// Reads the phases, commands (with their results) and events of `run`.
    pub(super) async fn read(store: &dyn Store, run: RunRecord) -> Result<Journal> {
        let run_id = run.id.as_str();
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
        Ok(Journal {
            run,
            phases,
            commands,
            events,
        })
    }

    /// The report of this run; `now` is its `generated_at`.
    pub(super) fn report(
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
        // One phase restores and swaps (restore-postgres), or a prepare restores into the copy
        // and a commit swaps it in: the restore starts with the prepare and ends with the swap.
        let prepare = pick(&of(ActionKind::PreparePostgres));
        if let Some(ActionOutput::PreparePostgres(out)) = prepare.and_then(|e| e.output()) {
            postgres.database = Some(r(&out.database));
            postgres.archive_bytes = Some(out.archive_bytes);
            postgres.elapsed_ms = Some(out.elapsed_ms);
        }
        let swap = pick(&of(ActionKind::RestorePostgres))
            .or_else(|| pick(&of(ActionKind::CommitPostgres)));
        if let Some(exec) = swap {
            if let Some(ActionOutput::RestorePostgres(out) | ActionOutput::CommitPostgres(out)) =
                exec.output()
            {
                postgres.database = Some(r(&out.database));
                postgres.pre_restore_database = Some(r(&out.pre_restore_database));
                if out.archive_bytes > 0 || postgres.archive_bytes.is_none() {
                    postgres.archive_bytes = Some(out.archive_bytes);
                }
                postgres.elapsed_ms = Some(
                    postgres
                        .elapsed_ms
                        .unwrap_or(0)
                        .saturating_add(out.elapsed_ms),
                );
                postgres.resumed = Some(r(&out.resumed)).filter(|s| !s.is_empty());
            }
            postgres.restore_agent = Some(r(&exec.command.agent));
            let phase = phase_of(exec.command.phase_index);
            let prepared = prepare.and_then(|e| phase_of(e.command.phase_index));
            postgres.restore_started_at = prepared.or(phase).and_then(|p| p.started_at);
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
        let counts = count_rows(&env.report_rows, before.as_ref(), at_point, after.as_ref());

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
        let (anchor, anchor_label) = match &freeze {
            Some((at, name)) => (Some(*at), format!("start of phase {}", r(name))),
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
            freeze_window_ms: freeze.as_ref().and_then(|(frozen, _)| {
                self.phases
                    .iter()
                    .filter(|p| actions.get(&p.index).is_some_and(|a| a == "unfreeze"))
                    .filter(|p| p.state == PhaseState::Passed)
                    .filter_map(|p| p.finished_at)
                    .max()
                    .map(|resumed| (resumed - *frozen).num_milliseconds())
            }),
            run_ms: match (started_at, &last_end) {
                (Some(from), Some((until, _))) => Some((*until - from).num_milliseconds()),
                _ => None,
            },
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
            // A point stamped in the future (a clock ran fast when it was taken) has no
            // knowable age, so it never meets the objective.
            met: age.map(|a| a <= rpo_ms as i64 && !stamped_in_future(a)),
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

        // Data left out of the restore: what the run journaled (the environment's list and
        // the operator's `--exclude`), the caller's, and the quarantine.
        let journaled: Vec<Exclusion> = run
            .params
            .get("excluded")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let mut excluded: Vec<String> = journaled
            .iter()
            .map(|e| {
                let by = if e.source == EXCLUDED_BY_CONFIG {
                    "declared in the environment config"
                } else {
                    "declared by the operator"
                };
                format!("{} ({by})", r(&e.text))
            })
            .chain(excluded.iter().map(|s| r(s)))
            .collect();
        let exclusions_declared = !excluded.is_empty();
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

        let secret_refs = secret_rows(point, env);
        let incidents = self.incidents(&phase_name);
        // The runbook's managed-worker drill is a restore's: not a backup's or an undo's.
        let restore = matches!(run.kind, RunKind::Drill | RunKind::Recovery);
        let workers = plan
            .as_ref()
            .filter(|pl| restore && has_worker_phases(pl))
            .map(|pl| {
                self.worker_drill(WorkerInputs {
                    plan: pl,
                    env,
                    point,
                    execs: &execs,
                    checks: &checks,
                    phases: &phases,
                    objects: &objects,
                    counts: &counts,
                    secret_refs: &secret_refs,
                })
            });

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
                started_by: crate::engine::started_by(&run.params).map(|s| r(&s.to_string())),
            },
            target: Target {
                to_time: self.to_time_info(
                    &of(ActionKind::PreparePostgres),
                    &of(ActionKind::CommitPostgres),
                    &of(ActionKind::RestoreObjects),
                ),
                point_id: point_id.as_deref().map(r),
                point_created_at,
                point_file_read: point.is_some(),
            },
            pre_restore_database: postgres.pre_restore_database.clone(),
            quarantine_prefix: objects.quarantine_prefix.clone(),
            postgres,
            objects,
            secret_refs,
            exclusions_declared,
            counts,
            checks,
            incidents,
            workers,
            excluded,
            follow_ups: follow,
            phases,
            rto,
            rpo,
            undo: self.undo_info(&of(ActionKind::UndoPostgres), &of(ActionKind::UndoObjects)),
            restore_test: self.restore_test_info(
                env,
                plan.as_ref(),
                &of(ActionKind::TeardownPostgres),
                &of(ActionKind::TeardownObjects),
            ),
            approvals_required: plan
                .as_ref()
                .and_then(|pl| pl.phases.iter().find(|p| p.action == Action::Approve))
                .map_or(0, |p| p.approvals()),
            approvals: self.approvals(),
        }
    }

    /// What a run to a time restored: from its params' time and its prepare, commit and
    /// object restores' outputs. None for a run to a point.
    fn to_time_info(
        &self,
        prepares: &[&Exec<'_>],
        commits: &[&Exec<'_>],
        objects: &[&Exec<'_>],
    ) -> Option<ToTimeInfo> {
        let to_time = crate::engine::to_time_of(&self.run.params)?;
        let shown = to_time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        let mut info = ToTimeInfo {
            to_time,
            note: format!("restored to time {shown}; counts not recorded"),
            ..ToTimeInfo::default()
        };
        let physical = prepares
            .iter()
            .chain(commits)
            .filter_map(|e| match e.output() {
                Some(ActionOutput::PreparePostgres(o)) => o.physical.clone(),
                Some(ActionOutput::CommitPostgres(o)) => o.physical.clone(),
                _ => None,
            });
        for p in physical {
            info.base_backup = Some(r(&p.base_backup))
                .filter(|b| !b.is_empty())
                .or(info.base_backup);
            info.data_dir = Some(r(&p.data_dir));
            if !p.kept_dir.is_empty() {
                info.kept_dir = Some(r(&p.kept_dir));
            }
            info.stopped = p.stopped.as_deref().map(r).or(info.stopped);
            info.last_transaction_at = p
                .last_transaction_at
                .as_deref()
                .map(r)
                .or(info.last_transaction_at);
            info.timeline = p.timeline.or(info.timeline);
        }
        for o in objects.iter().filter_map(|e| match e.output() {
            Some(ActionOutput::RestoreObjects(o)) => o.at_time.clone(),
            _ => None,
        }) {
            info.objects_rule = Some(format!("{} ({})", o.rule, r(&o.reason)));
            if o.rule == "snapshot" {
                info.objects_uncertainty = Some(format!(
                    "{} .. {} ({:.1} s): the store's changes in this window are not known",
                    o.uncertain_from,
                    o.uncertain_to,
                    o.uncertain_ms as f64 / 1000.0
                ));
            }
            info.objects_ambiguous
                .extend(o.ambiguous.iter().map(|k| r(k)));
        }
        Some(info)
    }

    /// The operators' approvals and rejections of the run, in journal order.
    fn approvals(&self) -> Vec<ApprovalRow> {
        self.events
            .iter()
            .filter(|e| matches!(e.kind.as_str(), "run.approved" | "run.rejected"))
            .filter_map(|e| {
                let d: crate::engine::planner::Decision =
                    serde_json::from_value(e.payload.clone()).ok()?;
                Some(ApprovalRow {
                    at: e.at,
                    by: r(&d.by),
                    role: r(&d.role),
                    decision: if d.approve { "approved" } else { "rejected" }.to_owned(),
                    reason: Some(d.reason).filter(|s| !s.is_empty()).map(|s| r(&s)),
                })
            })
            .collect()
    }

    /// The run's incidents in time order, from its events (phases blocked, operators' retries
    /// and resumes, coordinators taking over, agents lost and back) and its commands (re-sent
    /// after a failure; sent under a newer epoch than the run's when no event says why).
    fn incidents(&self, phase_name: &dyn Fn(u32) -> String) -> Vec<Incident> {
        let text = |e: &EventRecord, key: &str| {
            e.payload
                .get(key)
                .and_then(Value::as_str)
                .map(r)
                .filter(|s| !s.is_empty())
        };
        let mut incidents = Vec::new();
        let mut attempts: BTreeMap<String, u64> = BTreeMap::new();
        let mut taken_over = false;
        let mut operator = false;
        for e in &self.events {
            let phase = text(e, "phase");
            let agent = text(e, "agent");
            let mut push = |kind: &str, phase: Option<String>, agent, detail: String| {
                incidents.push(Incident {
                    at: Some(e.at),
                    kind: kind.to_owned(),
                    phase,
                    agent,
                    detail,
                })
            };
            match e.kind.as_str() {
                "phase.started" => {
                    if let (Some(name), Some(n)) =
                        (phase, e.payload.get("attempt").and_then(Value::as_u64))
                    {
                        attempts.insert(name, n);
                    }
                }
                "phase.finished" if text(e, "state").as_deref() == Some("blocked") => {
                    let attempt = phase
                        .as_ref()
                        .and_then(|p| attempts.get(p))
                        .map_or(String::new(), |n| format!("attempt {n}: "));
                    let detail = text(e, "detail").unwrap_or_else(|| NOT_RECORDED.to_owned());
                    push("phase blocked", phase, None, format!("{attempt}{detail}"));
                }
                // A run blocked by its phase is told by the phase; one blocked otherwise (the
                // coordinator could not continue) by the run.
                "run.blocked" if phase.is_none() => {
                    let reason = text(e, "reason").unwrap_or_else(|| NOT_RECORDED.to_owned());
                    push("run blocked", None, None, reason);
                }
                "run.retried" => {
                    operator = true;
                    push(
                        "operator retry",
                        None,
                        None,
                        "the blocked phases ran again as a new attempt (new command ids: \
                         everything ran again)"
                            .to_owned(),
                    );
                }
                "run.resumed" => {
                    operator = true;
                    push(
                        "operator resume",
                        None,
                        None,
                        "the blocked phases ran again with the same command ids (what had run \
                         was answered from the agents' records)"
                            .to_owned(),
                    );
                }
                "run.taken_over" => {
                    taken_over = true;
                    let epoch = e
                        .payload
                        .get("epoch")
                        .and_then(Value::as_u64)
                        .map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
                    push(
                        "coordinator took over",
                        None,
                        None,
                        format!(
                            "a restarted or replacement coordinator (epoch {epoch}) found the run \
                             unfinished and drove it on, re-sending its commands with the same \
                             ids"
                        ),
                    );
                }
                "agent.lost" => {
                    let role = text(e, "role").unwrap_or_else(|| "agent".to_owned());
                    let why = text(e, "reason").unwrap_or_else(|| NOT_RECORDED.to_owned());
                    push(
                        "agent lost",
                        None,
                        agent,
                        format!("{role} agent unavailable: {why}"),
                    );
                }
                "agent.back" => {
                    let role = text(e, "role").unwrap_or_else(|| "agent".to_owned());
                    let how = if e.payload.get("replaced").and_then(Value::as_bool) == Some(true) {
                        "attached again while its previous connection still looked open (it \
                         restarted or its connection was cut)"
                    } else {
                        "attached again"
                    };
                    push("agent back", None, agent, format!("{role} agent {how}"));
                }
                _ => {}
            }
        }

        // Commands re-sent after a failure (a phase's `retries`): one incident per command.
        let mut tries: BTreeMap<(u32, &str, u32, &str), Vec<&JournaledCommand>> = BTreeMap::new();
        for entry in &self.commands {
            let command = &entry.0;
            let Some((step, _)) = step_and_retry(&command.command_id) else {
                continue;
            };
            tries
                .entry((
                    command.phase_index,
                    command.agent.as_str(),
                    command.attempt,
                    step,
                ))
                .or_default()
                .push(entry);
        }
        for ((phase, agent, attempt, _), mut sent) in tries {
            sent.sort_by_key(|(c, _)| step_and_retry(&c.command_id).map_or(0, |(_, r)| r));
            if sent.len() < 2 {
                continue;
            }
            let outcome = |result: &Option<ResultRecord>| match result {
                Some(res) if res.detail.is_empty() => res.outcome.as_str().to_owned(),
                Some(res) => format!("{}: {}", res.outcome, r(&res.detail)),
                None => "never answered".to_owned(),
            };
            let (first, last) = (sent[0], sent[sent.len() - 1]);
            incidents.push(Incident {
                at: Some(last.0.created_at),
                kind: "command re-sent".to_owned(),
                phase: Some(r(&phase_name(phase))),
                agent: Some(r(agent)),
                detail: format!(
                    "{} sent {} times in attempt {attempt}: the first try {}; the last {}",
                    last.0.action,
                    sent.len(),
                    outcome(&first.1),
                    outcome(&last.1)
                ),
            });
        }

        // Journals from before `run.taken_over`: a command sent under a newer epoch than the
        // run's was sent by a coordinator that took the run over.
        if !taken_over && !operator {
            let mut newer: BTreeMap<u64, Option<DateTime<Utc>>> = BTreeMap::new();
            for (command, result) in &self.commands {
                if command.epoch > self.run.epoch {
                    let first = newer.entry(command.epoch.get()).or_default();
                    let at = result
                        .as_ref()
                        .filter(|res| res.epoch == command.epoch)
                        .map(|res| res.received_at);
                    *first = match (*first, at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            for (epoch, at) in newer {
                incidents.push(Incident {
                    at,
                    kind: "coordinator took over".to_owned(),
                    phase: None,
                    agent: None,
                    detail: format!(
                        "commands were sent under coordinator epoch {epoch} (the run started \
                         under epoch {}): another coordinator drove the run on",
                        self.run.epoch
                    ),
                });
            }
        }
        // In time order; an incident without a time last.
        incidents.sort_by_key(|i| (i.at.is_none(), i.at));
        incidents
    }

    /// The runbook's managed-worker drill, each line from what the journal holds: worker
    /// recovery (the worker phases' smoke results and replicas back), checkpoint restore (the
    /// object restore and the reference checks), workflow consistency (the scheduler's smoke
    /// and the invariant checks), BYOK secret-reference integrity (the point's references
    /// against the environment's, and any BYOK count).
    fn worker_drill(&self, i: WorkerInputs<'_>) -> Vec<WorkerDrillRow> {
        let targets = |index: u32, role: &str| {
            i.plan
                .phases
                .get(index as usize)
                .is_some_and(|p| p.roles.iter().any(|r| r == role))
        };
        let phase_state = |name: &str| {
            i.phases
                .iter()
                .find(|p| p.name == name)
                .map_or(NOT_RECORDED, |p| p.state.as_str())
        };
        let check_text = |c: &CheckRow| {
            let result = match c.passed {
                Some(true) => "passed",
                Some(false) => "failed",
                None => NOT_RECORDED,
            };
            format!("{} on {} {result} ({})", c.name, c.agent, c.detail)
        };

        // Worker recovery. The agents of worker-only phases are the workers.
        let worker_phases: Vec<&crate::plan::Phase> = i
            .plan
            .phases
            .iter()
            .filter(|p| {
                matches!(p.action, Action::Smoke | Action::Scale)
                    && p.roles.iter().any(|r| r == "worker")
            })
            .collect();
        let workers: BTreeSet<&str> = i
            .execs
            .iter()
            .filter(|e| {
                i.plan
                    .phases
                    .get(e.command.phase_index as usize)
                    .is_some_and(|p| p.roles.iter().all(|r| r == "worker"))
            })
            .map(|e| e.command.agent.as_str())
            .collect();
        let smoke_phases: BTreeSet<String> = worker_phases
            .iter()
            .filter(|p| p.action == Action::Smoke)
            .map(|p| r(&p.name))
            .collect();
        let smokes: Vec<&CheckRow> = i
            .checks
            .iter()
            .filter(|c| smoke_phases.contains(&c.phase))
            .collect();
        let mut evidence: Vec<String> = smokes
            .iter()
            .map(|c| format!("{}: {}", c.phase, check_text(c)))
            .collect();
        for exec in i.execs.iter().filter(|e| {
            e.command.action == ActionKind::Scale && workers.contains(e.command.agent.as_str())
        }) {
            if let Some(ActionOutput::Scale(out)) = exec.output()
                && out.now > 0
            {
                evidence.push(format!(
                    "{}: {} at {} replicas ({} before the run)",
                    r(&self.phase_name_of(exec.command.phase_index, i.plan)),
                    r(&exec.command.agent),
                    out.now,
                    out.prior
                ));
            }
        }
        let blocked: Vec<String> = worker_phases
            .iter()
            .filter(|p| matches!(phase_state(&p.name), "blocked" | "failed"))
            .map(|p| format!("phase {} {}", r(&p.name), phase_state(&p.name)))
            .collect();
        evidence.extend(blocked.iter().cloned());
        let recovery = if !blocked.is_empty() || smokes.iter().any(|c| c.passed == Some(false)) {
            "failed"
        } else if !smokes.is_empty() && smokes.iter().all(|c| c.passed == Some(true)) {
            "passed"
        } else {
            NOT_RECORDED
        };
        let declared = i.env.fleet.get("worker").copied().unwrap_or(0);
        let mut rows = vec![WorkerDrillRow {
            item: "worker recovery".to_owned(),
            result: recovery.to_owned(),
            evidence: if evidence.is_empty() {
                format!("no worker smoke or scale result recorded ({declared} workers declared)")
            } else {
                format!("{declared} workers declared; {}", evidence.join("; "))
            },
        }];

        // Checkpoint restore: the object restore, then the reference checks.
        let restores: Vec<&Exec<'_>> = i
            .execs
            .iter()
            .filter(|e| e.command.action == ActionKind::RestoreObjects)
            .collect();
        let references: Vec<&CheckRow> =
            i.checks.iter().filter(|c| c.kind == "reference").collect();
        let n = |v: Option<u64>| v.map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
        let mut evidence = Vec::new();
        if !restores.is_empty() {
            let o = i.objects;
            evidence.push(format!(
                "restore-objects on {}: {} (snapshot {}; {} written, {} already matching, {} \
                 replaced, {} removed)",
                o.restore_agent.as_deref().unwrap_or(NOT_RECORDED),
                if restores.iter().all(|e| e.succeeded()) {
                    "succeeded"
                } else {
                    "did not succeed"
                },
                o.snapshot_id.as_deref().unwrap_or(NOT_RECORDED),
                n(o.restored),
                n(o.unchanged),
                n(o.replaced),
                n(o.removed)
            ));
        }
        evidence.extend(
            references
                .iter()
                .map(|c| format!("{}: {}", c.phase, check_text(c))),
        );
        let checkpoint = if restores
            .iter()
            .any(|e| e.result.is_some() && !e.succeeded())
            || references.iter().any(|c| c.passed == Some(false))
        {
            "failed"
        } else if !restores.is_empty() && restores.iter().all(|e| e.succeeded()) {
            "passed"
        } else {
            NOT_RECORDED
        };
        if references.is_empty() && !restores.is_empty() {
            evidence.push("no reference check recorded".to_owned());
        }
        rows.push(WorkerDrillRow {
            item: "checkpoint restore".to_owned(),
            result: checkpoint.to_owned(),
            evidence: if evidence.is_empty() {
                "no object restore recorded".to_owned()
            } else {
                evidence.join("; ")
            },
        });

        // Workflow consistency: the scheduler's smoke and the invariant checks.
        let scheduler_phases: BTreeSet<String> = i
            .plan
            .phases
            .iter()
            .filter(|p| p.action == Action::Smoke && targets(p.index as u32, "scheduler"))
            .map(|p| r(&p.name))
            .collect();
        let workflow: Vec<&CheckRow> = i
            .checks
            .iter()
            .filter(|c| scheduler_phases.contains(&c.phase) || c.kind == "invariant")
            .collect();
        rows.push(WorkerDrillRow {
            item: "workflow consistency".to_owned(),
            result: verdict(&workflow).to_owned(),
            evidence: if workflow.is_empty() {
                "no scheduler smoke or invariant check recorded".to_owned()
            } else {
                workflow
                    .iter()
                    .map(|c| format!("{}: {}", c.phase, check_text(c)))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        });

        // BYOK secret-reference integrity: the references the point recorded at backup time
        // against the environment's now, and any BYOK count.
        let recorded: Vec<&SecretRefRow> = i
            .secret_refs
            .iter()
            .filter(|s| s.source == "recovery point")
            .collect();
        let differing: Vec<&SecretRefRow> = i
            .secret_refs
            .iter()
            .filter(|s| s.source != "recovery point")
            .collect();
        let point_kms: BTreeSet<&str> = i
            .point
            .map(|p| {
                p.secrets
                    .iter()
                    .filter_map(|s| s.kms_key.as_deref())
                    .collect()
            })
            .unwrap_or_default();
        let env_kms: BTreeSet<&str> = i
            .env
            .secrets
            .iter()
            .filter_map(|s| s.kms_key.as_deref())
            .collect();
        let lost_kms = point_kms.difference(&env_kms).count();
        let byok: Vec<&CountRow> = i
            .counts
            .iter()
            .filter(|c| c.key.to_ascii_lowercase().contains("byok"))
            .collect();
        let mut evidence = Vec::new();
        if i.point.is_some() {
            evidence.push(format!(
                "{} references recorded in the point, {} with a KMS key",
                recorded.len(),
                recorded.iter().filter(|s| s.kms_key.is_some()).count()
            ));
            if lost_kms > 0 {
                evidence.push(format!(
                    "{lost_kms} KMS keys the point recorded are no longer in the environment's \
                     references: data restored from it may not decrypt"
                ));
            }
        } else {
            evidence
                .push("the point file was not read: its references are not recorded".to_owned());
        }
        for s in &differing {
            evidence.push(format!(
                "{} in the environment config differs from the point (version {}, KMS key {})",
                s.name,
                s.version.as_deref().unwrap_or(NOT_RECORDED),
                s.kms_key.as_deref().unwrap_or(NOT_RECORDED)
            ));
        }
        let count = |v: Option<i64>| v.map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
        for c in &byok {
            evidence.push(format!(
                "{}: {} at the point, {} after",
                c.label,
                count(c.at_point),
                count(c.after)
            ));
        }
        let integrity = if lost_kms > 0 || byok.iter().any(|c| c.matches_point == Some(false)) {
            "failed"
        } else if i.point.is_some_and(|p| !p.secrets.is_empty())
            || (!byok.is_empty() && byok.iter().all(|c| c.matches_point == Some(true)))
        {
            "passed"
        } else {
            NOT_RECORDED
        };
        rows.push(WorkerDrillRow {
            item: "BYOK secret-reference integrity".to_owned(),
            result: integrity.to_owned(),
            evidence: evidence.join("; "),
        });
        rows
    }

    fn phase_name_of(&self, index: u32, plan: &Plan) -> String {
        self.phases
            .iter()
            .find(|p| p.index == index)
            .map(|p| p.name.clone())
            .or_else(|| plan.phases.get(index as usize).map(|p| p.name.clone()))
            .unwrap_or_else(|| format!("phase {index}"))
    }

    /// What an undo run's undo-postgres and undo-objects reported (None for other runs).
    fn undo_info(&self, db: &[&Exec<'_>], objects: &[&Exec<'_>]) -> Option<UndoInfo> {
        if db.is_empty() && objects.is_empty() {
            return None;
        }
        let r = |s: &str| redact(s).into_owned();
        let mut info = UndoInfo {
            undoes: db.iter().chain(objects).find_map(|e| {
                match serde_json::from_value(e.command.payload.clone()).ok()? {
                    api::model::Action::UndoPostgres { undone_run }
                    | api::model::Action::UndoObjects { undone_run, .. } => Some(r(&undone_run)),
                    _ => None,
                }
            }),
            ..UndoInfo::default()
        };
        if let Some(ActionOutput::UndoPostgres(out)) = db.first().and_then(|e| e.output()) {
            info.database = Some(r(&out.database));
            info.database_detail = Some(r(&out.detail));
            info.restored_database_kept_as = Some(r(&out.kept_as)).filter(|s| !s.is_empty());
        }
        let outs: Vec<_> = objects
            .iter()
            .filter_map(|e| match e.output() {
                Some(ActionOutput::UndoObjects(o)) => Some(o),
                _ => None,
            })
            .collect();
        if !outs.is_empty() {
            info.objects_put_back = Some(outs.iter().map(|o| o.put_back).sum());
            info.objects_removed = Some(outs.iter().map(|o| o.removed).sum());
            info.objects_unchanged = Some(outs.iter().map(|o| o.unchanged).sum());
            info.objects_displaced = Some(outs.iter().map(|o| o.displaced).sum());
            info.quarantine_prefix = outs.first().map(|o| r(&o.quarantine_prefix));
        }
        Some(info)
    }

    /// What a restore test tested and tore down, from its params (journaled at its start),
    /// its commands, its phases and its teardown outputs. None for other runs.
    fn restore_test_info(
        &self,
        env: &Environment,
        plan: Option<&Plan>,
        db: &[&Exec<'_>],
        objects: &[&Exec<'_>],
    ) -> Option<RestoreTestInfo> {
        let test = crate::engine::RestoreTestOf::of_params(&self.run.params)?;
        let r = |s: &str| redact(s).into_owned();
        let agents: BTreeSet<&str> = self
            .commands
            .iter()
            .map(|(c, _)| c.agent.as_str())
            .collect();
        // The restore's span: the phases whose action restores data, by the journaled plan.
        let restoring = |index: u32| {
            plan.and_then(|p| p.phases.get(index as usize))
                .is_some_and(|p| {
                    matches!(
                        p.action,
                        Action::PreparePostgres
                            | Action::CommitPostgres
                            | Action::RestorePostgres
                            | Action::RestoreObjects
                    )
                })
        };
        let spans: Vec<&PhaseRecord> = self.phases.iter().filter(|p| restoring(p.index)).collect();
        let from = spans.iter().filter_map(|p| p.started_at).min();
        let until = spans
            .iter()
            .map(|p| p.finished_at)
            .collect::<Option<Vec<_>>>();
        let restore_ms = match (from, until) {
            (Some(from), Some(until)) if !spans.is_empty() => until
                .into_iter()
                .max()
                .map(|u| (u - from).num_milliseconds()),
            _ => None,
        };
        let teardown_phases: Vec<&PhaseRecord> = self
            .phases
            .iter()
            .filter(|p| {
                plan.and_then(|pl| pl.phases.get(p.index as usize))
                    .is_some_and(|ph| ph.action.is_teardown())
            })
            .collect();
        let teardown = if teardown_phases.is_empty() {
            "not reached".to_owned()
        } else if teardown_phases
            .iter()
            .all(|p| p.state == PhaseState::Skipped)
        {
            "kept (teardown = never)".to_owned()
        } else if let Some(bad) = teardown_phases
            .iter()
            .find(|p| matches!(p.state, PhaseState::Blocked | PhaseState::Failed))
        {
            format!(
                "failed: phase {} did not pass: {}",
                bad.name,
                bad.detail.as_deref().map(r).unwrap_or_default()
            )
        } else if teardown_phases
            .iter()
            .all(|p| p.state == PhaseState::Passed)
        {
            "done".to_owned()
        } else {
            "running".to_owned()
        };
        let mut info = RestoreTestInfo {
            source: r(&test.source),
            target: r(env.name.as_str()),
            agents_commanded: agents.iter().map(|a| r(a)).collect(),
            source_agents_commanded: Vec::new(),
            source_agents_known: None,
            source_untouched: true,
            restore_ms,
            teardown_setting: r(&test.teardown),
            teardown,
            ..RestoreTestInfo::default()
        };
        for e in db {
            if let Some(ActionOutput::TeardownPostgres(out)) = e.output() {
                info.databases_dropped
                    .extend(out.dropped.iter().map(|d| r(d)));
                info.database_put_back = Some(out.put_back);
            }
        }
        let outs: Vec<_> = objects
            .iter()
            .filter_map(|e| match e.output() {
                Some(ActionOutput::TeardownObjects(o)) => Some(o),
                _ => None,
            })
            .collect();
        if !outs.is_empty() {
            info.objects_deleted = Some(outs.iter().map(|o| o.deleted).sum());
            info.objects_put_back = Some(outs.iter().map(|o| o.put_back).sum());
            // A sharded teardown's quarantines are deleted by the coordinator (its event).
            let by_coordinator: u64 = self
                .events
                .iter()
                .filter(|e| e.kind == "restore_test.quarantines_deleted")
                .filter_map(|e| e.payload["keys"].as_u64())
                .sum();
            info.quarantine_keys_deleted =
                Some(outs.iter().map(|o| o.quarantine_keys_deleted).sum::<u64>() + by_coordinator);
        }
        Some(info)
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

/// A journaled command with its result, when it has one.
type JournaledCommand = (CommandRecord, Option<ResultRecord>);

/// What the managed-worker drill reads.
struct WorkerInputs<'a> {
    plan: &'a Plan,
    env: &'a Environment,
    point: Option<&'a Point>,
    execs: &'a [Exec<'a>],
    checks: &'a [CheckRow],
    phases: &'a [PhaseRow],
    objects: &'a ObjectsInfo,
    counts: &'a [CountRow],
    secret_refs: &'a [SecretRefRow],
}

/// Whether the plan has worker phases (a smoke or scale phase targeting `worker`): the
/// runbook's managed-worker drill applies.
fn has_worker_phases(plan: &Plan) -> bool {
    plan.phases.iter().any(|p| {
        matches!(p.action, Action::Smoke | Action::Scale) && p.roles.iter().any(|r| r == "worker")
    })
}

/// `failed` when a check failed, `passed` when some were recorded and all passed, else
/// `not recorded`.
fn verdict(checks: &[&CheckRow]) -> &'static str {
    if checks.iter().any(|c| c.passed == Some(false)) {
        "failed"
    } else if !checks.is_empty() && checks.iter().all(|c| c.passed == Some(true)) {
        "passed"
    } else {
        NOT_RECORDED
    }
}

/// The step and retry of a command id (`run/phase/agent/aN/sK/rR`); None for another shape.
fn step_and_retry(id: &str) -> Option<(&str, u32)> {
    let mut parts = id.rsplit('/');
    let retry = parts.next()?.strip_prefix('r')?.parse().ok()?;
    let step = parts.next().filter(|s| s.starts_with('s'))?;
    Some((step, retry))
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

/// The environment's runbook rows in their order, then every other count any source recorded,
/// labelled by its key.
fn count_rows(
    configured: &[ReportRow],
    before: Option<&BTreeMap<String, i64>>,
    at_point: Option<&BTreeMap<String, i64>>,
    after: Option<&BTreeMap<String, i64>>,
) -> Vec<CountRow> {
    let sources = [before, at_point, after];
    let mut keys: Vec<(String, String, bool)> = configured
        .iter()
        .map(|row| (row.count.clone(), r(&row.label), true))
        .collect();
    let shown: BTreeSet<&str> = configured.iter().map(|row| row.count.as_str()).collect();
    let others: BTreeSet<String> = sources
        .iter()
        .flatten()
        .flat_map(|m| m.keys())
        .filter(|k| !shown.contains(k.as_str()))
        .map(|k| r(k))
        .collect();
    keys.extend(others.into_iter().map(|k| (k.clone(), k, false)));
    keys.into_iter()
        .map(|(key, label, configured)| {
            let [before, at_point, after] = sources.map(|s| s.and_then(|m| count_of(m, &key)));
            CountRow {
                matches_point: at_point.zip(after).map(|(p, a)| p == a),
                key: r(&key),
                label,
                configured,
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
            Some(v) if exec.succeeded() => {
                let mut detail = format!(
                    "dump checksum verified over {} bytes; {} snapshot objects present",
                    v.dump_bytes, v.objects_checked
                );
                // An objects agent also hashed what its restore would write.
                if v.blobs_hashed > 0 || v.delta_objects > 0 {
                    detail.push_str(&format!(
                        "; {} differ from the live store; {} blobs hashed ({})",
                        v.delta_objects,
                        v.blobs_hashed,
                        api::human::bytes(v.blob_bytes_hashed)
                    ));
                }
                detail
            }
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
    // References are names, not secrets; a local path in one is withheld.
    let r = |s: &str| api::redact::redact_reference(s).into_owned();
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

/// Whether a point age (measured at the report's anchor) is negative by more than clocks may
/// disagree: the point's stamp is in the future.
pub(super) fn stamped_in_future(age_ms: i64) -> bool {
    age_ms < -(repository::CLOCK_TOLERANCE.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
