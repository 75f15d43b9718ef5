//! Drives one run: asks the planner what to start, runs each phase (journaled `running`
//! before its commands go out), sends a phase's commands to every targeted agent at once and
//! holds its gate against the declared fleet, and stops the run `blocked` with what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use api::model::{
    Action as AgentAction, ActionKind, ActionOutput, AgentStatus, Availability, Outcome,
    add_saturating,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Inner;
use super::commands::{RunContext, RunParams, agent_actions, assign_shards};
use super::planner::{self, AgentStanding, Next, freeze_note};
use super::send::run_steps;
use crate::config::Environment;
use crate::link::AgentLink;
use crate::notify::RunEvent;
use crate::plan::{Action, Phase, Plan};
use crate::store::{PhaseRecord, PhaseState, ResultRecord, RunState};

/// How often a readiness gate is re-evaluated while it waits.
const GATE_POLL: Duration = Duration::from_millis(250);

impl<L: AgentLink + Clone + 'static> Inner<L> {
    pub(super) async fn drive(self: Arc<Self>, id: &str, cancel: CancellationToken) -> Result<()> {
        let run = self
            .store
            .run(id)
            .await?
            .with_context(|| format!("no run {id}"))?;
        if run.state.is_final() || run.state == RunState::Blocked {
            return Ok(());
        }
        let Some(env) = self.environments.get(&run.environment).cloned() else {
            let reason = format!(
                "environment {} is no longer in the coordinator config; restore its \
                 [environments.{}] table and resume",
                run.environment, run.environment
            );
            let at = Utc::now();
            self.store
                .set_run_state(id, RunState::Blocked, Some(&reason), at, self.link.epoch())
                .await?;
            self.ended(
                &run,
                RunEvent::Blocked,
                RunState::Blocked,
                Some(&reason),
                at,
            );
            return Ok(());
        };
        // The run follows the plan it was started with, whatever the files say now.
        let plan = Plan::parse(Path::new("journaled plan"), &run.plan, Some(&env.fleet))
            .map_err(|e| anyhow!("the journaled plan no longer fits the fleet: {e}"))?;
        if run.state == RunState::Pending {
            self.store
                .set_run_state(id, RunState::Running, None, Utc::now(), self.link.epoch())
                .await?;
            self.event(
                id,
                "run.started",
                json!({ "epoch": self.link.epoch().get() }),
            )
            .await?;
        }
        let plan = Arc::new(plan);
        let env = Arc::new(env);
        let mut tasks: JoinSet<(usize, Result<()>)> = JoinSet::new();
        let mut in_flight = BTreeSet::new();
        loop {
            let journal = self.store.phases(id).await?;
            let mut states = vec![None; plan.phases.len()];
            for p in &journal {
                if let Some(slot) = states.get_mut(p.index as usize) {
                    *slot = Some(p.state);
                }
            }
            match planner::next(&plan, &states, &in_flight) {
                Next::Start(phases) => {
                    for index in phases {
                        let journaled = journal.iter().find(|p| p.index as usize == index);
                        let attempt = journaled.map_or(1, |p| p.attempt.max(1));
                        // A phase journaled as running was started by a coordinator that is
                        // gone: this is the same attempt, so it keeps its start time (the
                        // report's restore timestamps and durations).
                        let started_at = journaled
                            .filter(|p| p.state == PhaseState::Running && p.attempt == attempt)
                            .and_then(|p| p.started_at);
                        in_flight.insert(index);
                        let me = self.clone();
                        let (plan, env) = (plan.clone(), env.clone());
                        // The references are read when the phase starts (check-references).
                        let ctx = RunContext {
                            run_id: id.to_owned(),
                            repository: env.repository_ref.clone(),
                            point: run.point_id.clone(),
                            to_time: super::to_time_of(&run.params),
                            references: Vec::new(),
                            undo: RunParams::of(&run.params).undoes,
                            restore_test: RunParams::of(&run.params).restore_test,
                        };
                        let span = tracing::info_span!(
                            "rollcall.phase",
                            phase = %plan.phases[index].name,
                            action = %plan.phases[index].action,
                            attempt
                        );
                        tasks.spawn(
                            async move {
                                let result = me
                                    .run_phase(ctx, &plan, &env, index, attempt, started_at)
                                    .await;
                                (index, result)
                            }
                            .instrument(span),
                        );
                    }
                }
                Next::Wait => {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            tasks.abort_all();
                            return Ok(());
                        }
                        joined = tasks.join_next() => match joined {
                            Some(Ok((index, result))) => {
                                in_flight.remove(&index);
                                if let Err(e) = result {
                                    tasks.abort_all();
                                    return Err(e.context(format!("phase {}", plan.phases[index].name)));
                                }
                            }
                            Some(Err(e)) => {
                                tasks.abort_all();
                                bail!("a phase task ended abnormally: {e}");
                            }
                            None => bail!("the planner waits but no phase is in flight"),
                        }
                    }
                }
                Next::Done => {
                    let at = Utc::now();
                    self.store
                        .set_run_state(id, RunState::Succeeded, None, at, self.link.epoch())
                        .await?;
                    // The final report is stored before the event a watcher ends on.
                    let journal = self.store.phases(id).await?;
                    self.store_final_report(id, &plan, &env, run.point_id.as_deref(), &journal)
                        .await;
                    self.event(id, "run.succeeded", json!({})).await?;
                    self.ended(&run, RunEvent::Finished, RunState::Succeeded, None, at);
                    tracing::info!(run_id = %id, "run succeeded");
                    return Ok(());
                }
                Next::Blocked { phase } => {
                    let detail = journal
                        .iter()
                        .find(|p| p.index as usize == phase)
                        .and_then(|p| p.detail.clone())
                        .unwrap_or_default();
                    // A restore test with teardown = "always" tears down what it restored
                    // even when it failed, and then ends failed (nothing is left to resume).
                    if let Some(torn) = self
                        .teardown_after_failure(&run, &plan, &env, phase, &journal)
                        .await?
                    {
                        let reason = format!(
                            "phase {} did not pass: {detail}; {torn}",
                            plan.phases[phase].name
                        );
                        let at = Utc::now();
                        self.store
                            .set_run_state(
                                id,
                                RunState::Failed,
                                Some(&reason),
                                at,
                                self.link.epoch(),
                            )
                            .await?;
                        self.event(
                            id,
                            "run.failed",
                            json!({ "phase": plan.phases[phase].name, "reason": reason }),
                        )
                        .await?;
                        tracing::warn!(run_id = %id, "restore test failed: {reason}");
                        self.ended(&run, RunEvent::Failed, RunState::Failed, Some(&reason), at);
                        return Ok(());
                    }
                    let frozen = freeze_note(&plan, &journal);
                    // An agent keeps the result of a command it ran: `resume` re-sends the
                    // phase's commands and gets a failure back as it was. After fixing what
                    // made a command fail or time out, the phase must run as a new attempt.
                    let attempt = journal
                        .iter()
                        .find(|p| p.index as usize == phase)
                        .map(|p| p.attempt);
                    let commands = self.store.commands(id).await?;
                    let failed = planner::a_command_failed(&commands, phase, attempt);
                    let (changes, changed) = planner::changes_note(&plan, &commands);
                    let next = planner::next_steps(id, failed, changed);
                    let reason = if plan.phases[phase].action == Action::Approve {
                        // Its detail says what was decided and what to do; nothing changed.
                        format!("phase {} did not pass: {detail}", plan.phases[phase].name)
                    } else {
                        format!(
                            "phase {} did not pass: {detail}{frozen}{changes} — {next}",
                            plan.phases[phase].name
                        )
                    };
                    let at = Utc::now();
                    self.store
                        .set_run_state(id, RunState::Blocked, Some(&reason), at, self.link.epoch())
                        .await?;
                    self.event(
                        id,
                        "run.blocked",
                        json!({ "phase": plan.phases[phase].name, "reason": reason }),
                    )
                    .await?;
                    tracing::warn!(run_id = %id, "run blocked: {reason}");
                    self.store_final_report(id, &plan, &env, run.point_id.as_deref(), &journal)
                        .await;
                    self.ended(
                        &run,
                        RunEvent::Blocked,
                        RunState::Blocked,
                        Some(&reason),
                        at,
                    );
                    return Ok(());
                }
            }
        }
    }

    /// For a restore test with `teardown = "always"` that blocked before its teardown: runs
    /// the plan's teardown section now, in plan order — the roles stopped, the teardowns, the
    /// roles started again (`teardown_section`) — skipping what already passed (a coordinator
    /// that stopped halfway), and says what it did: `Ok(None)` when the run is no such restore
    /// test or the blocked phase is itself part of the teardown.
    async fn teardown_after_failure(
        &self,
        run: &crate::store::RunRecord,
        plan: &Plan,
        env: &Environment,
        blocked: usize,
        journal: &[crate::store::PhaseRecord],
    ) -> Result<Option<String>> {
        let params = RunParams::of(&run.params);
        let always = params
            .restore_test
            .as_ref()
            .is_some_and(|t| t.teardown == crate::config::Teardown::Always.as_str());
        let section = teardown_section(plan);
        if !always || section.is_empty() || section.contains(&blocked) {
            return Ok(None);
        }
        let ctx = RunContext {
            run_id: run.id.clone(),
            repository: env.repository_ref.clone(),
            point: run.point_id.clone(),
            to_time: super::to_time_of(&run.params),
            references: Vec::new(),
            undo: None,
            restore_test: params.restore_test.clone(),
        };
        let resumed = section
            .iter()
            .any(|&i| journal.iter().any(|j| j.index as usize == i));
        self.event(
            &run.id,
            "restore_test.teardown",
            json!({ "after_failure_of": plan.phases[blocked].name, "resumed": resumed }),
        )
        .await?;
        let mut failed = None;
        for &index in &section {
            let phases = self.store.phases(&run.id).await?;
            let journaled = phases.iter().find(|j| j.index as usize == index);
            if journaled.is_some_and(|j| j.state == PhaseState::Passed) {
                continue;
            }
            // A phase a stopped coordinator left running is the same attempt; one that ended
            // not passed is tried again as a new one (its agents keep the old result).
            let attempt = match journaled {
                Some(j) if j.state == PhaseState::Running => j.attempt.max(1),
                Some(j) => j.attempt + 1,
                None => 1,
            };
            self.run_phase(ctx.clone(), plan, env, index, attempt, None)
                .await?;
            let phases = self.store.phases(&run.id).await?;
            let ended = phases.iter().find(|j| j.index as usize == index);
            if !ended.is_some_and(|j| matches!(j.state, PhaseState::Passed | PhaseState::Skipped)) {
                let detail = ended.and_then(|j| j.detail.clone()).unwrap_or_default();
                failed = Some(format!("{}: {detail}", plan.phases[index].name));
                break;
            }
        }
        let names: Vec<&str> = section
            .iter()
            .map(|&i| plan.phases[i].name.as_str())
            .collect();
        Ok(Some(match failed {
            None => format!(
                "torn down all the same (teardown = \"always\"; ran {}): the restored data \
                 were dropped",
                names.join(", ")
            ),
            Some(why) => format!(
                "the teardown after it (teardown = \"always\") did not pass either, at phase \
                 {why}; the restored data may still be in the target: inspect it and drop them \
                 by hand"
            ),
        }))
    }

    async fn run_phase(
        &self,
        mut ctx: RunContext,
        plan: &Plan,
        env: &Environment,
        index: usize,
        attempt: u32,
        started_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let run_id = ctx.run_id.clone();
        let run_id = run_id.as_str();
        let phase = &plan.phases[index];
        let started = started_at.unwrap_or_else(Utc::now);
        let mut record = PhaseRecord {
            run_id: run_id.to_owned(),
            index: index as u32,
            name: phase.name.clone(),
            state: PhaseState::Running,
            attempt,
            started_at: Some(started),
            finished_at: None,
            detail: None,
        };
        self.store.put_phase(&record, self.link.epoch()).await?;
        self.event(
            run_id,
            "phase.started",
            json!({ "phase": phase.name, "action": phase.action.as_str(), "attempt": attempt }),
        )
        .await?;

        if phase.action == Action::CheckReferences {
            ctx.references = self.verified_references(run_id).await?;
        }
        let mut skipped = false;
        let refused = teardown_refused(
            run_id,
            ctx.restore_test.as_ref(),
            env.name.as_str(),
            env.restore_test.as_ref().map(|t| t.source.as_str()),
        );
        let (passed, detail) = match phase.action {
            Action::Report => match self.write_report(run_id, env, &ctx).await {
                Ok(where_) => (true, format!("drill report written: {where_}")),
                Err(e) => (false, api::errors::one_line(&*e)),
            },
            Action::Approve => {
                let run = self
                    .store
                    .run(run_id)
                    .await?
                    .with_context(|| format!("no run {run_id}"))?;
                self.await_approval(&run, phase, started).await?
            }
            Action::WritePoint => match self.write_point(run_id, plan, env, &ctx).await {
                Ok(id) => {
                    self.event(run_id, "point.written", json!({ "point": id }))
                        .await?;
                    (true, format!("recovery point {id} written"))
                }
                Err(e) => (false, api::errors::one_line(&*e)),
            },
            action if action.is_teardown() && refused.is_some() => {
                (false, refused.unwrap_or_default())
            }
            action if action.is_teardown() && !tears_down(&ctx) => {
                skipped = true;
                (
                    true,
                    "kept for inspection: the environment's teardown = \"never\" (nothing was \
                     dropped or deleted)"
                        .to_owned(),
                )
            }
            _ => {
                let (passed, detail) = self
                    .command_phase(run_id, phase, env, &ctx, attempt)
                    .await?;
                if passed && phase.action == Action::TeardownObjects {
                    self.sharded_quarantines(run_id, phase, env, attempt, detail)
                        .await?
                } else if passed && phase.action == Action::BaseBackup {
                    self.base_backup_taken(run_id, phase).await?
                } else {
                    (passed, detail)
                }
            }
        };

        record.state = if skipped {
            PhaseState::Skipped
        } else if passed {
            PhaseState::Passed
        } else if phase.required {
            PhaseState::Blocked
        } else {
            PhaseState::Failed
        };
        record.finished_at = Some(Utc::now());
        record.detail = Some(detail.clone());
        self.store.put_phase(&record, self.link.epoch()).await?;
        let millis = (Utc::now() - started).num_milliseconds();
        self.metrics
            .phase_ended(phase.action.as_str(), millis as f64 / 1000.0);
        self.event(
            run_id,
            "phase.finished",
            json!({ "phase": phase.name, "state": record.state.as_str(), "detail": detail, "duration_ms": millis }),
        )
        .await?;
        tracing::info!(phase = %phase.name, state = %record.state, %detail, "phase finished");
        Ok(())
    }

    /// Sends the phase's commands to every targeted agent at once, then holds the gate.
    async fn command_phase(
        &self,
        run_id: &str,
        phase: &Phase,
        env: &Environment,
        ctx: &RunContext,
        attempt: u32,
    ) -> Result<(bool, String)> {
        let steps = match agent_actions(phase, ctx) {
            Ok(steps) => steps,
            Err(why) => return Ok((false, why)),
        };
        // Plan check caps a timeout at a week; a journaled plan from before that cap must not
        // panic the phase either.
        let deadline = add_saturating(SystemTime::now(), phase.timeout);
        let targets = self.targets(phase, env, deadline).await;

        // Object restores split the keys by hash across the role's agents (DESIGN.md): each
        // agent gets a shard, and the number of shards is the declared count. A command id
        // names one command forever, so an agent keeps the shard the journal already holds.
        let shard_of = if matches!(
            phase.action,
            Action::RestoreObjects | Action::UndoObjects | Action::TeardownObjects
        ) {
            let journaled = self.journaled_shards(run_id, phase.index, attempt).await?;
            let names: Vec<String> = targets
                .iter()
                .filter(|a| a.role.as_str() == "objects")
                .map(|a| a.name.to_string())
                .collect();
            assign_shards(
                &journaled,
                &names,
                env.fleet.get("objects").copied().unwrap_or(0),
            )
        } else {
            BTreeMap::new()
        };

        let mut sends = JoinSet::new();
        for agent in &targets {
            let (me_store, link) = (self.store.clone(), self.link.clone());
            let mut steps = steps.clone();
            if let Some(&(index, count)) = shard_of.get(agent.name.as_str()) {
                for step in &mut steps {
                    if let AgentAction::RestoreObjects { shard, shards, .. }
                    | AgentAction::UndoObjects { shard, shards, .. }
                    | AgentAction::TeardownObjects { shard, shards, .. } = step
                    {
                        (*shard, *shards) = (index, count);
                    }
                }
            }
            let (run_id, name) = (run_id.to_owned(), agent.name.clone());
            let (phase_name, phase_index, retries) =
                (phase.name.clone(), phase.index, phase.retries);
            sends.spawn(
                async move {
                    let outcome = run_steps(
                        &*me_store,
                        &link,
                        &run_id,
                        &phase_name,
                        phase_index,
                        attempt,
                        retries,
                        &name,
                        &steps,
                        deadline,
                    )
                    .await;
                    (name, outcome)
                }
                .in_current_span(),
            );
        }
        let mut succeeded = BTreeMap::new();
        let mut failures = Vec::new();
        while let Some(joined) = sends.join_next().await {
            let (name, outcome) =
                joined.map_err(|e| anyhow!("a command task ended abnormally: {e}"))?;
            match outcome? {
                Ok(()) => {
                    succeeded.insert(name, true);
                }
                Err(why) => {
                    failures.push(format!("{name}: {why}"));
                    succeeded.insert(name, false);
                }
            }
        }

        // The gate: results under this epoch, readiness as observed now, against the declared
        // fleet. Readiness can lag a successful start; poll until the phase's deadline.
        loop {
            let standing: Vec<AgentStanding> = self
                .directory
                .agents()
                .into_iter()
                .filter(|a| succeeded.contains_key(&a.name))
                .map(|a| AgentStanding {
                    role: a.role.to_string(),
                    succeeded: succeeded.get(&a.name).copied().unwrap_or(false),
                    ready: a.availability == Availability::Connected && a.ready,
                })
                .collect();
            let verdict = planner::evaluate(phase, &env.fleet, &standing);
            // Readiness can still come; failed commands cannot. Wait only while the gate could
            // pass if every agent whose command succeeded became ready.
            let hopeful: Vec<AgentStanding> = standing
                .iter()
                .map(|a| AgentStanding {
                    ready: true,
                    ..a.clone()
                })
                .collect();
            let could_pass = planner::evaluate(phase, &env.fleet, &hopeful).passed;
            let waiting =
                planner::needs_readiness(phase) && could_pass && SystemTime::now() < deadline;
            if verdict.passed || !waiting {
                let mut detail = verdict.detail;
                if !failures.is_empty() {
                    detail.push_str("; ");
                    detail.push_str(&failures.join("; "));
                }
                let missing = declared_missing(env, phase, &targets);
                if !missing.is_empty() && !verdict.passed {
                    detail.push_str(&format!("; never connected: {}", missing.join(", ")));
                }
                if verdict.passed
                    && phase.action == Action::Freeze
                    && !planner::froze_something(
                        &self.store.commands(run_id).await?,
                        phase.index,
                        attempt,
                    )
                {
                    return Ok((false, format!("{detail}; {}", planner::NOTHING_FROZE)));
                }
                return Ok((verdict.passed, detail));
            }
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    /// After a sharded teardown-objects phase passed: each shard took its own objects out of
    /// the target, but none may delete the run's quarantines (the other shards still read
    /// their records), so the coordinator deletes them once every shard succeeded — the
    /// restore's and the teardown's, in the repository it holds — and journals how many keys
    /// (`restore_test.quarantines_deleted`, which the report adds). A whole (one-shard)
    /// teardown deleted them itself; a deletion that fails fails the phase, naming it.
    async fn sharded_quarantines(
        &self,
        run_id: &str,
        phase: &Phase,
        env: &Environment,
        attempt: u32,
        detail: String,
    ) -> Result<(bool, String)> {
        let mut shards = BTreeSet::new();
        let mut done = BTreeSet::new();
        for (command, result) in self.store.commands(run_id).await? {
            if command.phase_index as usize != phase.index || command.attempt != attempt {
                continue;
            }
            if let Ok(AgentAction::TeardownObjects {
                shard, shards: n, ..
            }) = serde_json::from_value::<AgentAction>(command.payload.clone())
            {
                shards.extend(0..n);
                if result.is_some_and(|r| r.outcome == Outcome::Succeeded) {
                    done.insert(shard);
                }
            }
        }
        if shards.len() <= 1 {
            return Ok((true, detail));
        }
        if done != shards {
            return Ok((
                false,
                format!(
                    "{detail}; {} of {} shards tore down, so the run's quarantines were kept \
                     (their records are what a retry reads): retry the run",
                    done.len(),
                    shards.len()
                ),
            ));
        }
        let repo = env.repository_ref.open().await?;
        let mut keys = 0;
        for tag in [
            repository::run_tag(&format!("{run_id}/teardown")),
            repository::run_tag(run_id),
        ] {
            match repo.delete_quarantine(&tag).await {
                Ok(n) => keys += n,
                Err(e) => {
                    return Ok((
                        false,
                        format!(
                            "{detail}; quarantine/{tag} of the restore test not deleted: {}; \
                             retry the run",
                            api::errors::one_line(&*e)
                        ),
                    ));
                }
            }
        }
        self.event(
            run_id,
            "restore_test.quarantines_deleted",
            json!({ "keys": keys, "shards": shards.len() }),
        )
        .await?;
        Ok((
            true,
            format!(
                "{detail}; the run's quarantines deleted once all {} shards were done ({keys} keys)",
                shards.len()
            ),
        ))
    }

    /// The shards already journaled for a restore-objects (or undo-objects) phase attempt: agent → (shard, of).
    async fn journaled_shards(
        &self,
        run_id: &str,
        phase_index: usize,
        attempt: u32,
    ) -> Result<BTreeMap<String, (u32, u32)>> {
        let mut out = BTreeMap::new();
        for (command, _) in self.store.commands(run_id).await? {
            if command.phase_index as usize != phase_index
                || command.attempt != attempt
                || !matches!(
                    command.action,
                    ActionKind::RestoreObjects
                        | ActionKind::UndoObjects
                        | ActionKind::TeardownObjects
                )
            {
                continue;
            }
            let action: AgentAction = serde_json::from_value(command.payload.clone())
                .with_context(|| format!("journaled command {}", command.command_id))?;
            if let AgentAction::RestoreObjects { shard, shards, .. }
            | AgentAction::UndoObjects { shard, shards, .. }
            | AgentAction::TeardownObjects { shard, shards, .. } = action
            {
                out.insert(command.agent, (shard, shards));
            }
        }
        Ok(out)
    }

    /// The object keys the run's database verifications returned (the newest successful verify
    /// of each agent), for the objects agents to look up. Read from the journal, so a resumed
    /// run sends the same command.
    async fn verified_references(&self, run_id: &str) -> Result<Vec<api::model::ObjectReferences>> {
        let mut newest: BTreeMap<String, Vec<api::model::ObjectReferences>> = BTreeMap::new();
        for (command, result) in self.store.commands(run_id).await? {
            let Some(ResultRecord {
                outcome: Outcome::Succeeded,
                output: Some(ActionOutput::Verify(verified)),
                ..
            }) = result
            else {
                continue;
            };
            if !verified.references.is_empty() {
                newest.insert(command.agent, verified.references);
            }
        }
        Ok(newest.into_values().flatten().collect())
    }

    /// The agents a phase targets: those of its roles in the run's environment. Waits (up to
    /// the attach grace, within the phase's deadline) for declared agents that have not
    /// attached yet, as after a coordinator restart.
    async fn targets(
        &self,
        phase: &Phase,
        env: &Environment,
        deadline: SystemTime,
    ) -> Vec<AgentStatus> {
        let until = add_saturating(SystemTime::now(), self.attach_grace).min(deadline);
        loop {
            let targets: Vec<AgentStatus> = self
                .directory
                .agents()
                .into_iter()
                .filter(|a| {
                    a.environment.as_str() == env.name.as_str()
                        && phase.roles.iter().any(|r| r == a.role.as_str())
                })
                .collect();
            let attached = |role: &String| {
                targets
                    .iter()
                    .filter(|a| {
                        a.role.as_str() == role && a.availability == Availability::Connected
                    })
                    .count() as u32
            };
            let complete = phase
                .roles
                .iter()
                .all(|r| attached(r) >= env.fleet.get(r).copied().unwrap_or(0));
            if complete || SystemTime::now() >= until {
                return targets;
            }
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    /// Builds the drill report from the journal, keeps its JSON in the journal and stores both
    /// forms in the repository (`reports/<run>.md|json`), before traffic resumes.
    async fn write_report(
        &self,
        run_id: &str,
        env: &Environment,
        ctx: &RunContext,
    ) -> Result<String> {
        let json = self.store_report(run_id, env, ctx.point.as_deref()).await?;
        self.event(run_id, "report", json).await?;
        Ok(format!(
            "reports/{run_id}.md in the repository, and the run's journal"
        ))
    }

    /// Builds the drill report as the journal stands and stores both forms in the repository
    /// (`reports/<run>.md|json`, replacing an earlier copy); returns its JSON.
    async fn store_report(
        &self,
        run_id: &str,
        env: &Environment,
        point: Option<&str>,
    ) -> Result<serde_json::Value> {
        let repo = env.repository_ref.open().await?;
        let point = match point {
            Some(p) => Some(repo.read_point(&repository::PointId::parse(p)?).await?),
            None => None,
        };
        let report = crate::report::build(&*self.store, run_id, env, point.as_ref(), &[], &[])
            .await?
            .with_source_agents(&self.source_agents(env));
        let json = report.to_json();
        let md_key = format!("reports/{run_id}.md");
        let json_key = format!("reports/{run_id}.json");
        use object_store::ObjectStoreExt as _;
        let store = repo.store();
        store
            .put(
                &md_key.as_str().into(),
                report.to_markdown().into_bytes().into(),
            )
            .await
            .with_context(|| format!("store {md_key} in the repository"))?;
        store
            .put(
                &json_key.as_str().into(),
                serde_json::to_vec_pretty(&json)?.into(),
            )
            .await
            .with_context(|| format!("store {json_key} in the repository"))?;
        Ok(json)
    }

    /// Once a run whose report phase passed ends (succeeded, or blocked after it), the stored
    /// copy is written again: the one written at the report phase said "still running" and
    /// knew nothing of the unfreeze. A failure to store it is logged; the run stands.
    async fn store_final_report(
        &self,
        run_id: &str,
        plan: &Plan,
        env: &Environment,
        point: Option<&str>,
        journal: &[crate::store::PhaseRecord],
    ) {
        let reported = plan.phases.iter().any(|p| {
            p.action == Action::Report
                && journal
                    .iter()
                    .any(|j| j.index as usize == p.index && j.state == PhaseState::Passed)
        });
        if !reported {
            return;
        }
        if let Err(e) = self.store_report(run_id, env, point).await {
            tracing::warn!(run_id, "the final drill report was not stored: {e:#}");
        }
    }
}

/// Whether a restore test's teardown phases send their commands (all but `teardown =
/// "never"`). A run without restore-test params never sends one.
fn tears_down(ctx: &RunContext) -> bool {
    ctx.restore_test
        .as_ref()
        .is_some_and(|t| t.teardown != crate::config::Teardown::Never.as_str())
}

/// Why a teardown phase of this run must not send anything, checked each time one starts
/// (a resumed run too): the run journaled no restore-test params, or the environment is no
/// longer a restore test of the same source in the config the coordinator runs now (a
/// teardown drops the target's database; it must never reach a live environment).
fn teardown_refused(
    run_id: &str,
    test: Option<&super::RestoreTestOf>,
    env: &str,
    source_now: Option<&str>,
) -> Option<String> {
    let Some(test) = test else {
        return Some(format!(
            "run {run_id} is no restore test (its journal has no restore-test parameters): a \
             teardown is never sent for it; abort the run"
        ));
    };
    if source_now == Some(test.source.as_str()) {
        return None;
    }
    Some(format!(
        "environment {env} is no longer a restore test of {} in the coordinator's config: its \
         teardown is not sent; put `restore_from = \"{}\"` back and resume, or abort the run",
        test.source, test.source
    ))
}

/// The phases a restore test runs to tear down, in plan order: its teardown phases, the
/// scale-downs they wait for directly (the roles stopped first) and the scale phases that
/// wait for them directly (the roles started again).
fn teardown_section(plan: &Plan) -> Vec<usize> {
    let teardowns: BTreeSet<usize> = plan
        .phases
        .iter()
        .filter(|p| p.action.is_teardown())
        .map(|p| p.index)
        .collect();
    plan.phases
        .iter()
        .filter(|p| {
            teardowns.contains(&p.index)
                || (p.action == Action::Scale
                    && (p.after.iter().any(|a| teardowns.contains(a))
                        || plan
                            .phases
                            .iter()
                            .any(|t| teardowns.contains(&t.index) && t.after.contains(&p.index))))
        })
        .map(|p| p.index)
        .collect()
}

/// Roles the environment declares more agents of than have ever connected.
fn declared_missing(env: &Environment, phase: &Phase, seen: &[AgentStatus]) -> Vec<String> {
    phase
        .roles
        .iter()
        .filter_map(|role| {
            let declared = env.fleet.get(role).copied().unwrap_or(0);
            let known = seen.iter().filter(|a| a.role.as_str() == role).count() as u32;
            (known < declared).then(|| format!("{} of {declared} {role}", declared - known))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::plan::tests::fleet;

    #[test]
    fn the_teardown_section_stops_the_roles_first_and_starts_them_after() {
        let names = |plan: &Plan| -> Vec<String> {
            teardown_section(plan)
                .into_iter()
                .map(|i| plan.phases[i].name.clone())
                .collect()
        };
        let whole = Plan::restore_test_plan(&fleet()).unwrap();
        assert_eq!(
            names(&whole),
            [
                "stop-roles",
                "teardown-postgres",
                "teardown-objects",
                "start-roles"
            ]
        );
        let data: crate::plan::Fleet =
            [("database".to_owned(), 1), ("objects".to_owned(), 1)].into();
        let small = Plan::restore_test_plan(&data).unwrap();
        assert_eq!(
            names(&small),
            ["teardown-postgres", "teardown-objects", "start-roles"]
        );
        // A plan without teardown phases has no section (a drill in place).
        let default = Plan::default_plan(Some(&fleet())).unwrap();
        assert!(teardown_section(&default).is_empty());
    }

    #[test]
    fn a_teardown_is_sent_only_for_a_restore_test_the_config_still_declares() {
        let test = super::super::RestoreTestOf {
            source: "prod".into(),
            teardown: "on-success".into(),
        };
        assert_eq!(
            teardown_refused("r1", Some(&test), "rt", Some("prod")),
            None
        );
        let none = teardown_refused("r1", None, "rt", Some("prod")).unwrap();
        assert!(
            none.contains("run r1 is no restore test") && none.contains("abort the run"),
            "{none}"
        );
        for now in [None, Some("staging")] {
            let moved = teardown_refused("r1", Some(&test), "rt", now).unwrap();
            assert!(
                moved.contains("environment rt is no longer a restore test of prod")
                    && moved.contains("restore_from = \"prod\""),
                "{moved}"
            );
        }
    }
}
