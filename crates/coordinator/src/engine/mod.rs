//! The run engine: executes a plan against an environment's fleet, phase by phase, with gates,
//! and survives its own crash.
//!
//! The pure `planner` decides; the driver here applies its decisions. Every decision and result
//! is journaled in the `Store` before it is acted on: a phase is recorded `running` before its
//! commands go out, each command is recorded before it is sent, each result when it arrives.
//! A restarted coordinator finds unfinished runs in the journal and drives them again: phases
//! that were running are executed again with the same command ids, which agents dedupe (a
//! command that already ran is answered from the agent's record, not run twice).
//!
//! Where to read: this file is the facade the operator API calls (start, control, report, dry
//! run); `driver` runs a run's phases and holds their gates; `send` journals and sends one
//! agent's commands with retries; `points` resolves and writes recovery points; `planner` and
//! `commands` are the pure decisions (next phases, gates, conflicts, the commands a phase
//! sends, shards and ids), table-tested without I/O; `operator` answers the operator API's
//! reads (runs, their detail and events, points with their age against the RPO); `kept` lists
//! and prunes the copies restores and undos kept (its selection is a pure function too).

mod approve;
mod commands;
mod driver;
pub mod kept;
pub mod operator;
pub mod planner;
mod points;
mod send;
mod undo;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use api::model::{ActionKind, AgentName, AgentStatus, Availability};
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Environment;
use crate::link::AgentLink;
use crate::notify::RunEvent;
use crate::plan::{Action, Plan};
use crate::store::{self, NewRun, PhaseRecord, PhaseState, RunKind, RunRecord, RunState, Store};
pub use approve::DecisionRefused;
pub use commands::RestoreTestOf;
pub use commands::Starter;
use commands::{CommandKey, RunContext, RunId, RunParams, agent_actions, needs_point};
use planner::conflicts;
pub use points::NoPoint;

/// The agents the coordinator knows, connected or not.
pub trait Directory: Send + Sync + 'static {
    fn agents(&self) -> Vec<AgentStatus>;
}

impl Directory for crate::registry::Registry {
    fn agents(&self) -> Vec<AgentStatus> {
        self.list()
    }
}

/// What an operator asks for when starting a run.
#[derive(Debug, Clone)]
pub struct StartRun {
    pub environment: String,
    pub kind: RunKind,
    pub point_id: Option<String>,
    /// A plan document and the name to report errors under; the environment's plan when None.
    pub plan: Option<(String, String)>,
    /// Data the operator leaves out of the restore on purpose (`--exclude`), journaled in the
    /// run's params with the environment's `[environments.NAME.report] excluded`.
    pub excluded: Vec<String>,
    /// Restore to this time instead of a point (`--to-time`): Postgres from the environment's
    /// base backups and archived WAL, objects to the same time. Exclusive with `point_id`.
    pub to_time: Option<DateTime<Utc>>,
    /// A backup run that takes a physical base backup (the built-in base-backup plan,
    /// `rollcall backup --base`, `base_backup_schedule`) instead of a recovery point.
    pub base_backup: bool,
}

/// Why a run cannot start now: another run of the same environment is unfinished (see
/// [`Engine::start_run`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunConflict(String);

/// An operator's decision about a blocked (or stuck) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-run the blocked phases with the same command ids (after fixing the cause, e.g.
    /// restarting an agent): what already ran is not run again.
    Resume,
    /// Re-run the blocked phases as a new attempt (new command ids: everything runs again).
    Retry,
    /// Stop the run. Nothing is undone; a frozen fleet stays frozen.
    Abort,
    /// Start an undo run that takes the run's restore back (`undo.rs`); `force` accepts that
    /// writes made since the run unfroze stay only in the kept copies.
    Undo { force: bool },
}

/// Who hears how runs end: the metrics, and the `[[notify]]` webhooks.
#[derive(Clone, Default)]
pub struct Observers {
    pub metrics: Arc<crate::metrics::RunMetrics>,
    pub notifier: crate::notify::Notifier,
}

pub struct Engine<L> {
    inner: Arc<Inner<L>>,
}

impl<L> Clone for Engine<L> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<L> {
    store: Arc<dyn Store>,
    link: L,
    directory: Arc<dyn Directory>,
    environments: BTreeMap<String, Environment>,
    /// Runs being driven by this process, with the token that stops their driver.
    drives: Mutex<HashMap<String, CancellationToken>>,
    /// Held while a run is checked against the unfinished ones and journaled.
    starting: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    /// How long a phase waits for declared agents that are not attached yet (after a
    /// coordinator restart they reconnect within about this long).
    attach_grace: Duration,
    metrics: Arc<crate::metrics::RunMetrics>,
    notifier: crate::notify::Notifier,
}

impl<L: AgentLink + Clone + 'static> Engine<L> {
    pub fn new(
        store: Arc<dyn Store>,
        link: L,
        directory: Arc<dyn Directory>,
        environments: BTreeMap<String, Environment>,
        shutdown: CancellationToken,
        attach_grace: Duration,
        observers: Observers,
    ) -> Engine<L> {
        Engine {
            inner: Arc::new(Inner {
                store,
                link,
                directory,
                environments,
                drives: Mutex::new(HashMap::new()),
                starting: tokio::sync::Mutex::new(()),
                shutdown,
                attach_grace,
                metrics: observers.metrics,
                notifier: observers.notifier,
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::RunMetrics> {
        &self.inner.metrics
    }

    /// Feeds the verdict gauges the journal's newest ended and newest successful run of
    /// each environment and kind; returns how many runs were read.
    pub async fn observe_verdicts(&self) -> Result<usize> {
        let runs = self.inner.store.newest_verdicts().await?;
        // An environment no longer configured has no verdict to alert on.
        for run in runs
            .iter()
            .filter(|r| self.inner.environments.contains_key(&r.environment))
        {
            let ended = run.finished_at.unwrap_or(run.updated_at);
            self.inner.metrics.ending(crate::metrics::Ending {
                environment: &run.environment,
                kind: run.kind.as_str(),
                succeeded: run.state == RunState::Succeeded,
                started_unix: unix_seconds(run.created_at),
                ended_unix: unix_seconds(ended),
            });
        }
        Ok(runs.len())
    }

    /// Journals agents' progress reports as `command.progress` events of their runs, so
    /// `run watch` can draw them, until the registry goes away. Reports under another epoch
    /// are not this coordinator's and are dropped.
    pub async fn journal_progress(
        &self,
        mut reports: tokio::sync::broadcast::Receiver<(AgentName, api::model::CommandProgress)>,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let (agent, report) = match reports.recv().await {
                Ok(got) => got,
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "progress reports dropped: the journal fell behind");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            if report.epoch != self.inner.link.epoch() || report.run_id.is_empty() {
                continue;
            }
            let command = report.command_id.as_str();
            let payload = json!({
                "agent": agent.as_str(),
                "command_id": command,
                "phase": CommandKey::parse(&report.run_id, command).map(|k| k.phase),
                "progress": report.progress,
            });
            if let Err(e) = self
                .inner
                .event(&report.run_id, "command.progress", payload)
                .await
            {
                tracing::debug!("cannot journal progress of {command}: {e:#}");
            }
        }
    }

    /// Journals agents lost and back (the registry's presence changes) as `agent.lost` and
    /// `agent.back` events of every unfinished run of the agent's environment, so the drill
    /// report can tell them, until the registry goes away. Changes that arrive together (a
    /// reconnect storm) are journaled after one read of the unfinished runs.
    pub async fn journal_presence(
        &self,
        mut changes: tokio::sync::broadcast::Receiver<crate::registry::Presence>,
    ) {
        use crate::registry::PresenceChange;
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        loop {
            let mut batch = match changes.recv().await {
                Ok(change) => vec![change],
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "agents lost or back were not journaled: the journal fell behind"
                    );
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            loop {
                match changes.try_recv() {
                    Ok(change) => batch.push(change),
                    Err(TryRecvError::Lagged(missed)) => tracing::warn!(
                        missed,
                        "agents lost or back were not journaled: the journal fell behind"
                    ),
                    Err(_) => break,
                }
            }
            let runs = match self.inner.store.unfinished_runs().await {
                Ok(runs) => runs,
                Err(e) => {
                    tracing::warn!("cannot journal agents lost or back: {e:#}");
                    continue;
                }
            };
            for change in batch {
                let (kind, mut payload) = match &change.change {
                    PresenceChange::Lost(why) => ("agent.lost", json!({ "reason": why })),
                    PresenceChange::Back { replaced } => {
                        ("agent.back", json!({ "replaced": replaced }))
                    }
                };
                payload["agent"] = json!(change.agent.as_str());
                payload["role"] = json!(change.role.as_str());
                let at = chrono::DateTime::<Utc>::from(change.at);
                for run in runs
                    .iter()
                    .filter(|r| r.environment == change.environment.as_str())
                {
                    if let Err(e) = self
                        .inner
                        .store
                        .append_event(&run.id, at, kind, &payload, self.inner.link.epoch())
                        .await
                    {
                        tracing::warn!(run_id = %run.id, "cannot journal {kind}: {e:#}");
                    }
                }
            }
        }
    }

    pub fn environments(&self) -> &BTreeMap<String, Environment> {
        &self.inner.environments
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The drill report of a run as it stands now, from the journal.
    pub async fn report(
        &self,
        id: &str,
        follow_ups: &[String],
    ) -> Result<crate::report::DrillReport> {
        let run = self
            .inner
            .store
            .run(id)
            .await?
            .with_context(|| format!("no run {id}; `rollcall runs` lists them"))?;
        let env = self.environment(&run.environment)?;
        let point = match &run.point_id {
            Some(p) => {
                let repo = env.repository_ref.open().await?;
                repo.read_point(&repository::PointId::parse(p)?).await.ok()
            }
            None => None,
        };
        Ok(
            crate::report::build(&*self.inner.store, id, env, point.as_ref(), follow_ups, &[])
                .await?
                .with_source_agents(&self.inner.source_agents(env)),
        )
    }

    /// What `start_run` would do, as text for an operator; touches nothing.
    pub async fn dry_run(&self, request: &StartRun) -> Result<String> {
        let env = self.environment(&request.environment)?;
        restore_test_kind(env, request.kind)?;
        let plan = self.plan_for(env, request)?;
        // The point the run would restore: `latest` named, a bad one said, not hidden.
        let point = match request.point_id.as_deref() {
            None => "(none given)".to_owned(),
            Some(asked) => match self.resolve_point(env, Some(asked)).await {
                Ok(id) if asked == "latest" => format!("latest, which is {id}"),
                Ok(id) => id,
                Err(e) => format!(
                    "{asked} (it cannot be used: {})",
                    api::errors::one_line(&*e)
                ),
            },
        };
        let agents: Vec<AgentStatus> = self
            .inner
            .directory
            .agents()
            .into_iter()
            .filter(|a| a.environment.as_str() == env.name.as_str())
            .collect();
        let mut out = match request.to_time {
            Some(at) => {
                let window = match self.check_to_time(env, request, &plan, at).await {
                    Ok(Some(window)) => format!(
                        "inside the recoverable window {} .. {}",
                        window.earliest.to_rfc3339(),
                        window.latest.to_rfc3339()
                    ),
                    Ok(None) => "the window is the managed provider's: the database agent's \
                                 preflight asks its adapter"
                        .to_owned(),
                    Err(e) => format!("it cannot be used: {}", api::errors::one_line(&*e)),
                };
                format!(
                    "dry run: a {} of environment {} to time {} ({window}); nothing is changed\n",
                    request.kind,
                    env.name,
                    at.to_rfc3339()
                )
            }
            None => format!(
                "dry run: a {} of environment {} to point {}; nothing is changed\n",
                request.kind, env.name, point
            ),
        };
        out.push_str(&format!(
            "objectives: RPO {}, RTO {}; repository {}\n",
            humantime::format_duration(env.rpo),
            humantime::format_duration(env.rto),
            env.repository
        ));
        out.push_str(&plan.render(Some(&env.fleet)));
        out.push_str("agents each phase would command:\n");
        for phase in &plan.phases {
            let mut names = Vec::new();
            for role in &phase.roles {
                let mut seen = 0;
                for a in agents.iter().filter(|a| a.role.as_str() == role) {
                    seen += 1;
                    let state = match (a.availability, a.ready) {
                        (Availability::Connected, true) => "ready",
                        (Availability::Connected, false) => "not ready",
                        (Availability::Unavailable, _) => "unavailable",
                    };
                    names.push(format!("{} ({state})", a.name));
                }
                let declared = env.fleet.get(role).copied().unwrap_or(0);
                if seen < declared {
                    names.push(format!(
                        "{} declared {role} never attached",
                        declared - seen
                    ));
                }
            }
            let names = if phase.roles.is_empty() {
                "the coordinator".to_owned()
            } else {
                names.join(", ")
            };
            out.push_str(&format!("  {:<18} {names}\n", phase.name));
        }
        let ctx = RunContext {
            run_id: "dry-run".into(),
            repository: env.repository_ref.clone(),
            point: request.point_id.clone(),
            to_time: request.to_time,
            references: Vec::new(),
            undo: None,
            restore_test: None,
        };
        if let Err(why) = plan
            .phases
            .iter()
            .try_for_each(|p| agent_actions(p, &ctx).map(|_| ()))
        {
            out.push_str(&format!("warning: {why}\n"));
        }
        Ok(out)
    }

    fn plan_for(&self, env: &Environment, request: &StartRun) -> Result<Plan> {
        if request.base_backup {
            if request.kind != RunKind::Backup || request.plan.is_some() {
                bail!(
                    "a base backup is a backup run of the built-in base-backup plan: start it \
                     with `rollcall backup --env {} --base`, without a plan",
                    env.name
                );
            }
            return base_backup_plan(env);
        }
        let plan = match (&request.plan, request.kind) {
            (None, RunKind::Backup) => env.backup_plan.clone(),
            (None, RunKind::Undo) => Plan::undo_plan(&env.fleet).map_err(|e| anyhow!("{e}"))?,
            (None, _) => env.plan.clone(),
            (Some((name, text)), _) => {
                Plan::parse(Path::new(name), text, Some(&env.fleet)).map_err(|e| anyhow!("{e}"))?
            }
        };
        if plan.restore_test && env.restore_test.is_none() {
            bail!(
                "plan {} restores without freezing (restore_test = true), but environment {} is \
                 not a restore-test environment; drill {} with a plan that freezes writes, or \
                 restore into an environment with restore_from = \"{}\"",
                plan.name,
                env.name,
                env.name,
                env.name
            );
        }
        approving(env, request.kind, request.plan.is_some(), plan)
    }

    /// Validates the request, journals the run, and starts driving it. Fails with
    /// [`RunConflict`] while another run of the environment is in the way ([`conflicts`]).
    pub async fn start_run(&self, request: StartRun) -> Result<RunRecord> {
        self.start_run_by(request, None).await
    }

    /// [`Engine::start_run`], journaling who started the run (the operator API's caller).
    pub async fn start_run_by(
        &self,
        request: StartRun,
        started_by: Option<Starter>,
    ) -> Result<RunRecord> {
        let env = self.environment(&request.environment)?;
        restore_test_kind(env, request.kind)?;
        let plan = self.plan_for(env, &request)?;
        if let Some(at) = request.to_time {
            self.check_to_time(env, &request, &plan, at).await?;
        }
        // One decision at a time: two runs started at once must not both find the way clear.
        let _starting = self.inner.starting.lock().await;
        let unfinished = self.inner.store.unfinished_runs().await?;
        if let Some(other) = unfinished
            .iter()
            .find(|r| r.environment == env.name.as_str() && conflicts(request.kind, r))
        {
            let what = if other.state == RunState::Blocked {
                format!(
                    "finish it first (`rollcall run resume|retry|abort {}`)",
                    other.id
                )
            } else {
                format!(
                    "wait for it (`rollcall run watch {}`) or abort it",
                    other.id
                )
            };
            return Err(RunConflict(format!(
                "environment {} has an unfinished {} run {} ({}); a {} cannot start next to it: \
                 {what}",
                env.name, other.kind, other.id, other.state, request.kind
            ))
            .into());
        }
        let now = Utc::now();
        let point_id = if request.base_backup {
            None
        } else if request.kind == RunKind::Backup {
            Some(repository::PointId::new(env.name.as_str(), now)?.to_string())
        } else if request.to_time.is_none() && plan.phases.iter().any(|p| needs_point(p.action)) {
            Some(self.resolve_point(env, request.point_id.as_deref()).await?)
        } else {
            request.point_id.clone()
        };
        let id = RunId::new(request.kind, env.name.as_str(), now, rand::random()).to_string();
        let run = NewRun {
            id: id.clone(),
            kind: request.kind,
            environment: env.name.to_string(),
            point_id: point_id.clone(),
            plan: plan.source.clone(),
            params: with_to_time(
                serde_json::to_value(RunParams {
                    plan: plan.name.clone(),
                    undoes: None,
                    excluded: exclusions(env, &request.excluded),
                    started_by: started_by.clone(),
                    restore_test: env.restore_test.as_ref().map(|t| RestoreTestOf {
                        source: t.source.clone(),
                        teardown: t.teardown.as_str().to_owned(),
                    }),
                })
                .context("encode the run's params")?,
                request.to_time,
            ),
            epoch: self.inner.link.epoch(),
            created_at: now,
        };
        self.inner.store.create_run(&run).await?;
        self.inner
            .event(
                &id,
                "run.created",
                json!({
                    "plan": plan.name,
                    "point": point_id,
                    "to_time": request.to_time,
                    "started_by": started_by,
                }),
            )
            .await?;
        self.spawn_drive(id.clone());
        self.inner
            .store
            .run(&id)
            .await?
            .with_context(|| format!("run {id} vanished after it was created"))
    }

    /// A scheduled run that could not start for want of a point (`NoPoint`), journaled as a
    /// run that failed at once, so it shows where every verdict does: `rollcall runs`, the
    /// `run.failed` webhook, the environment's last-result metrics. Not while another run
    /// of the environment is in the way ([`RunConflict`]: the slot is skipped as usual).
    pub async fn fail_unstarted(&self, request: StartRun, reason: &str) -> Result<RunRecord> {
        let env = self.environment(&request.environment)?;
        let plan = self.plan_for(env, &request)?;
        let _starting = self.inner.starting.lock().await;
        let unfinished = self.inner.store.unfinished_runs().await?;
        if let Some(other) = unfinished
            .iter()
            .find(|r| r.environment == env.name.as_str() && conflicts(request.kind, r))
        {
            return Err(RunConflict(format!(
                "environment {} has an unfinished {} run {}",
                env.name, other.kind, other.id
            ))
            .into());
        }
        let now = Utc::now();
        let id = RunId::new(request.kind, env.name.as_str(), now, rand::random()).to_string();
        let run = NewRun {
            id: id.clone(),
            kind: request.kind,
            environment: env.name.to_string(),
            point_id: None,
            plan: plan.source.clone(),
            params: serde_json::to_value(RunParams {
                plan: plan.name.clone(),
                undoes: None,
                excluded: Vec::new(),
                started_by: None,
                restore_test: env.restore_test.as_ref().map(|t| RestoreTestOf {
                    source: t.source.clone(),
                    teardown: t.teardown.as_str().to_owned(),
                }),
            })
            .context("encode the run's params")?,
            epoch: self.inner.link.epoch(),
            created_at: now,
        };
        self.inner.store.create_run(&run).await?;
        self.inner
            .event(
                &id,
                "run.created",
                json!({ "plan": plan.name, "point": null }),
            )
            .await?;
        let read = async || {
            self.inner
                .store
                .run(&id)
                .await?
                .with_context(|| format!("run {id} vanished after it was created"))
        };
        self.fail_pending(&read().await?, reason).await?;
        read().await
    }

    /// Ends a run that never started as failed: journaled, notified, counted.
    async fn fail_pending(&self, run: &RunRecord, reason: &str) -> Result<()> {
        let at = Utc::now();
        self.inner
            .store
            .set_run_state(
                &run.id,
                RunState::Failed,
                Some(reason),
                at,
                self.inner.link.epoch(),
            )
            .await?;
        self.inner
            .event(&run.id, "run.failed", json!({ "reason": reason }))
            .await?;
        self.inner.ended(
            run,
            crate::notify::RunEvent::Failed,
            RunState::Failed,
            Some(reason),
            at,
        );
        Ok(())
    }

    /// Drives every run the journal says is unfinished and not waiting for an operator.
    pub async fn resume_unfinished(&self) -> Result<usize> {
        let runs = self.inner.store.unfinished_runs().await?;
        let mut n = 0;
        for run in runs {
            // A restore test with neither a point nor a time, journaled by a predecessor: its
            // `fail_unstarted` stopped before marking it failed. Driving it would fail every
            // phase (and run an always-teardown for nothing): finish what was begun.
            if run.state == RunState::Pending
                && run.epoch < self.inner.link.epoch()
                && matches!(run.kind, RunKind::Drill | RunKind::Recovery)
                && RunParams::of(&run.params).restore_test.is_some()
                && run.point_id.is_none()
                && to_time_of(&run.params).is_none()
            {
                let reason = "no recovery point to restore (a scheduled restore test found none; \
                              the coordinator stopped before it recorded that)";
                // One run that cannot be ended must not keep the others from resuming.
                if let Err(e) = self.fail_pending(&run, reason).await {
                    tracing::error!(run_id = %run.id, "cannot end a run without a point: {e:#}");
                }
                continue;
            }
            if matches!(run.state, RunState::Pending | RunState::Running) {
                tracing::info!(run_id = %run.id, "resuming unfinished run");
                // The report's incidents: this coordinator took the run over from one that
                // stopped (or was replaced) before it finished. Not journaling it only leaves
                // the report to infer it from the commands' epochs; the run goes on either way.
                let took =
                    json!({ "epoch": self.inner.link.epoch().get(), "state": run.state.as_str() });
                if let Err(e) = self.inner.event(&run.id, "run.taken_over", took).await {
                    tracing::warn!(run_id = %run.id, "cannot journal the takeover: {e:#}");
                }
                self.spawn_drive(run.id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies an operator's decision; returns the run as it now stands.
    pub async fn control(&self, id: &str, control: Control) -> Result<RunRecord> {
        self.control_by(id, control, None).await
    }

    /// [`Engine::control`], journaling who asked (an undo run records its starter).
    pub async fn control_by(
        &self,
        id: &str,
        control: Control,
        by: Option<Starter>,
    ) -> Result<RunRecord> {
        if let Control::Undo { force } = control {
            return self.start_undo(id, force, by).await;
        }
        let store = &self.inner.store;
        let run = store
            .run(id)
            .await?
            .with_context(|| format!("no run {id}; `rollcall runs` lists them"))?;
        if run.state.is_final() {
            bail!("run {id} is already {}; it cannot be changed", run.state);
        }
        match control {
            Control::Abort => {
                if let Some(token) = self.inner.drives_lock().remove(id) {
                    token.cancel();
                }
                let phases = store.phases(id).await?;
                let frozen = phase_passed(&phases, &run, Action::Freeze)
                    && !phase_passed(&phases, &run, Action::Unfreeze);
                let sent: Vec<ActionKind> = store
                    .commands(id)
                    .await?
                    .into_iter()
                    .map(|(c, _)| c.action)
                    .collect();
                // A copy prepare-postgres made and no commit took: it stays on the database
                // server (nothing is ever dropped unasked) until a prune.
                let prepared_left = sent.contains(&ActionKind::PreparePostgres)
                    && !sent.iter().any(|a| {
                        matches!(a, ActionKind::CommitPostgres | ActionKind::RestorePostgres)
                    });
                let mut reason = if frozen {
                    "aborted by an operator; the fleet stays frozen (writes are off) until an \
                     operator unfreezes it"
                        .to_owned()
                } else {
                    "aborted by an operator".to_owned()
                };
                if prepared_left {
                    reason.push_str(&format!(
                        "; the database the run prepared (<db>_restore_{}) stays beside the live \
                         one until `rollcall kept prune --env {}` drops it",
                        repository::run_tag(id),
                        run.environment
                    ));
                }
                let reason = reason.as_str();
                let at = Utc::now();
                store
                    .set_run_state(
                        id,
                        RunState::Aborted,
                        Some(reason),
                        at,
                        self.inner.link.epoch(),
                    )
                    .await?;
                self.inner.ended(
                    &run,
                    RunEvent::Finished,
                    RunState::Aborted,
                    Some(reason),
                    at,
                );
                self.inner
                    .event(id, "run.aborted", json!({ "frozen": frozen }))
                    .await?;
            }
            Control::Undo { .. } => bail!("an undo starts a run of its own"),
            Control::Resume | Control::Retry => {
                if run.state == RunState::Running && self.inner.drives_lock().contains_key(id) {
                    bail!("run {id} is running; resume and retry are for blocked runs");
                }
                for mut phase in store.phases(id).await? {
                    if matches!(phase.state, PhaseState::Blocked | PhaseState::Failed) {
                        if control == Control::Retry {
                            phase.attempt += 1;
                        }
                        phase.state = PhaseState::Pending;
                        phase.finished_at = None;
                        store.put_phase(&phase, self.inner.link.epoch()).await?;
                    }
                }
                let verb = if control == Control::Retry {
                    "retried"
                } else {
                    "resumed"
                };
                store
                    .set_run_state(
                        id,
                        RunState::Running,
                        None,
                        Utc::now(),
                        self.inner.link.epoch(),
                    )
                    .await?;
                self.inner
                    .event(id, &format!("run.{verb}"), json!({}))
                    .await?;
                self.spawn_drive(id.to_owned());
            }
        }
        store
            .run(id)
            .await?
            .with_context(|| format!("run {id} vanished"))
    }

    fn environment(&self, name: &str) -> Result<&Environment> {
        self.inner.environments.get(name).with_context(|| {
            let known: Vec<&str> = self.inner.environments.keys().map(String::as_str).collect();
            format!(
                "no environment {name:?} in the coordinator config (configured: {}); add \
                 [environments.{name}] to rollcall.toml",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })
    }

    fn spawn_drive(&self, id: String) {
        let token = self.inner.shutdown.child_token();
        {
            let mut drives = self.inner.drives_lock();
            if drives.contains_key(&id) {
                return;
            }
            drives.insert(id.clone(), token.clone());
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!("rollcall.run", run_id = %id);
            let result = inner
                .clone()
                .drive(&id, token.clone())
                .instrument(span)
                .await;
            inner.drives_lock().remove(&id);
            if let Err(e) = result {
                if token.is_cancelled() {
                    return;
                }
                if let Some(store::Error::Fenced { writer, newest }) =
                    e.downcast_ref::<store::Error>()
                {
                    // The newer coordinator drives the journal's runs now; this one only stops.
                    tracing::error!(
                        run_id = %id,
                        "a newer coordinator took epoch {newest} on the state store: this \
                         coordinator (epoch {writer}) stops driving runs and writes nothing more"
                    );
                    inner.shutdown.cancel();
                    return;
                }
                tracing::error!(run_id = %id, "run driver failed: {e:#}");
                let reason = format!(
                    "the coordinator could not continue: {}",
                    api::errors::one_line(&*e)
                );
                let at = Utc::now();
                let _ = inner
                    .store
                    .set_run_state(
                        &id,
                        RunState::Blocked,
                        Some(&reason),
                        at,
                        inner.link.epoch(),
                    )
                    .await;
                let _ = inner
                    .event(&id, "run.blocked", json!({ "reason": reason }))
                    .await;
                match inner.store.run(&id).await {
                    Ok(Some(run)) => {
                        let reason = Some(reason.as_str());
                        inner.ended(&run, RunEvent::Failed, RunState::Blocked, reason, at);
                    }
                    _ => inner.metrics.run_ended("unknown", "blocked"),
                }
            }
        });
    }

    /// Stops every run driver of this process; the journal keeps the runs for a successor.
    pub fn stop_drivers(&self) {
        self.inner.shutdown.cancel();
    }

    /// Waits until no run is being driven by this process (tests, shutdown).
    pub async fn idle(&self) {
        while !self.inner.drives_lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Who started a journaled run, from its params (none for scheduled backups and runs from
/// before roles).
pub fn started_by(params: &serde_json::Value) -> Option<Starter> {
    RunParams::of(params).started_by
}

/// A restore-test environment runs drills (restore tests) and undos of them, nothing else: its
/// data are copies of its source's, so a backup of it would only store them again under
/// another name (back up the source), and a recovery restores a live environment in place.
/// A run's params with the time it restores to (`--to-time`) beside [`RunParams`]' fields.
fn with_to_time(
    mut params: serde_json::Value,
    to_time: Option<DateTime<Utc>>,
) -> serde_json::Value {
    if let (Some(at), Some(map)) = (to_time, params.as_object_mut()) {
        map.insert("to_time".to_owned(), json!(at));
    }
    params
}

/// The time a journaled run restores to, if it was started with `--to-time`.
pub fn to_time_of(params: &serde_json::Value) -> Option<DateTime<Utc>> {
    #[derive(serde::Deserialize)]
    struct ToTime {
        to_time: Option<DateTime<Utc>>,
    }
    serde_json::from_value::<ToTime>(params.clone())
        .ok()
        .and_then(|t| t.to_time)
}

/// The built-in base-backup plan against `env`'s fleet, refused (naming what to declare) when
/// the fleet has no database agent to take it.
pub fn base_backup_plan(env: &Environment) -> Result<Plan> {
    if env.fleet.get("database").copied().unwrap_or(0) == 0 {
        bail!(
            "environment {} declares no database agent: a base backup is taken by the database \
             agent (with [postgres.physical] in its agent.toml); declare one in its fleet",
            env.name
        );
    }
    Plan::base_backup_plan(&env.fleet).map_err(|e| anyhow!("{e}"))
}

fn restore_test_kind(env: &Environment, kind: RunKind) -> Result<()> {
    let Some(test) = &env.restore_test else {
        return Ok(());
    };
    match kind {
        RunKind::Drill | RunKind::Undo => Ok(()),
        RunKind::Backup => bail!(
            "environment {} is a restore test of {} (restore_from): it has no points of its own \
             and is not backed up; back up {} (`rollcall backup --env {}`)",
            env.name,
            test.source,
            test.source,
            test.source
        ),
        other => bail!(
            "environment {} is a restore test of {} (restore_from): it runs restore tests \
             (`rollcall drill --env {} --point latest`), not a {other}",
            env.name,
            test.source,
            env.name
        ),
    }
}

/// Whether a run of `kind` must wait for approvals in `env`: drills, recoveries and undos of
/// an environment with `approvals`, and a backup with a plan of the caller's (a plan can do
/// anything); the built-in backup plan changes nothing in the fleet.
pub fn needs_approval(env: &Environment, kind: RunKind, own_plan: bool) -> bool {
    env.approvals > 0 && (kind != RunKind::Backup || own_plan)
}

/// The plan a run of `kind` follows in `env`: `plan`, with an approve phase when the run
/// needs approvals ([`crate::plan::with_approval`]).
fn approving(env: &Environment, kind: RunKind, own_plan: bool, plan: Plan) -> Result<Plan> {
    if !needs_approval(env, kind, own_plan) {
        return Ok(plan);
    }
    let text = crate::plan::with_approval(&plan.source, env.approvals, env.approval_timeout)
        .map_err(|e| anyhow!("plan {}: {e}", plan.name))?;
    Plan::parse(Path::new(&plan.name), &text, Some(&env.fleet)).map_err(|e| anyhow!("{e}"))
}

/// What a run leaves out on purpose: the environment's declared exclusions, then the
/// operator's (blank ones dropped, each once).
fn exclusions(env: &Environment, operator: &[String]) -> Vec<crate::report::Exclusion> {
    let mut out: Vec<crate::report::Exclusion> = Vec::new();
    let declared = env
        .report_excluded
        .iter()
        .map(|t| (t, crate::report::EXCLUDED_BY_CONFIG))
        .chain(
            operator
                .iter()
                .map(|t| (t, crate::report::EXCLUDED_BY_OPERATOR)),
        );
    for (text, source) in declared {
        let text = text.trim();
        if !text.is_empty() && !out.iter().any(|e| e.text == text) {
            out.push(crate::report::Exclusion {
                text: text.to_owned(),
                source: source.to_owned(),
            });
        }
    }
    out
}

fn unix_seconds(at: chrono::DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

fn phase_passed(phases: &[PhaseRecord], run: &RunRecord, action: Action) -> bool {
    let Ok(plan) = Plan::parse(Path::new("journal"), &run.plan, None) else {
        return false;
    };
    phases.iter().any(|p| {
        p.state == PhaseState::Passed
            && plan
                .phases
                .get(p.index as usize)
                .is_some_and(|ph| ph.action == action)
    })
}

impl<L: AgentLink + Clone + 'static> Inner<L> {
    /// The agents of a restore-test environment's source the coordinator knows (attached or
    /// lost), by name; none for other environments.
    fn source_agents(&self, env: &Environment) -> Vec<String> {
        let Some(test) = &env.restore_test else {
            return Vec::new();
        };
        self.directory
            .agents()
            .into_iter()
            .filter(|a| a.environment.as_str() == test.source)
            .map(|a| a.name.to_string())
            .collect()
    }

    fn drives_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.drives.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A run reached `state` (blocked, or a final state): counted in the metrics (runs by
    /// outcome, the verdict gauges, a restore's duration) and handed to the webhooks, which
    /// never wait. Called after the state is journaled `at`.
    fn ended(
        &self,
        run: &RunRecord,
        event: RunEvent,
        state: RunState,
        reason: Option<&str>,
        at: chrono::DateTime<Utc>,
    ) {
        let seconds = (at - run.created_at).num_milliseconds() as f64 / 1000.0;
        let kind = run.kind.as_str();
        if state == RunState::Succeeded {
            self.metrics.run_succeeded(kind, &run.environment, seconds);
        } else {
            self.metrics.run_ended(kind, state.as_str());
        }
        self.metrics.ending(crate::metrics::Ending {
            environment: &run.environment,
            kind,
            succeeded: state == RunState::Succeeded,
            started_unix: unix_seconds(run.created_at),
            ended_unix: unix_seconds(at),
        });
        self.notifier.notify(&crate::notify::Notice {
            event,
            run: run.clone(),
            state,
            reason: reason.map(str::to_owned),
            at,
        });
    }

    async fn event(&self, run_id: &str, kind: &str, payload: serde_json::Value) -> Result<()> {
        self.store
            .append_event(run_id, Utc::now(), kind, &payload, self.link.epoch())
            .await?;
        Ok(())
    }
}
