//! The run engine: executes a plan against an environment's fleet, phase by phase, with gates,
//! and survives its own crash.
//!
//! The pure `planner` decides; the driver here applies its decisions. Every decision and result
//! is journaled in the `Store` before it is acted on: a phase is recorded `running` before its
//! commands go out, each command is recorded before it is sent, each result when it arrives.
//! A restarted coordinator finds unfinished runs in the journal and drives them again: phases
//! that were running are executed again with the same command ids, which agents dedupe (a
//! command that already ran is answered from the agent's record, not run twice).

pub mod operator;
pub mod planner;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use api::model::{
    Action as AgentAction, AgentName, AgentStatus, Availability, CommandId, Outcome, ResultDetail,
    ScaleTarget,
};
use chrono::Utc;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Environment;
use crate::link::{AgentLink, LinkError, Outgoing};
use crate::plan::{Action, Phase, Plan, Replicas};
use crate::store::{
    self, CommandRecord, NewRun, PhaseRecord, PhaseState, ResultRecord, RunKind, RunRecord,
    RunState, Store,
};
use planner::{AgentStanding, Next};

/// The agents the coordinator knows, connected or not.
pub trait Directory: Send + Sync + 'static {
    fn agents(&self) -> Vec<AgentStatus>;
}

impl Directory for crate::registry::Registry {
    fn agents(&self) -> Vec<AgentStatus> {
        self.list()
    }
}

/// How often a readiness gate is re-evaluated while it waits.
const GATE_POLL: Duration = Duration::from_millis(250);
/// Pause before re-sending a command whose agent was not reachable.
const RESEND_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between retries of a failed command.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(10);

/// What an operator asks for when starting a run.
#[derive(Debug, Clone)]
pub struct StartRun {
    pub environment: String,
    pub kind: RunKind,
    pub point_id: Option<String>,
    /// A plan document and the name to report errors under; the environment's plan when None.
    pub plan: Option<(String, String)>,
}

/// Why a run cannot start now: another run of the same environment is unfinished (see
/// [`Engine::start_run`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunConflict(String);

/// Whether an unfinished run `other` of the same environment keeps a new run of `kind` from
/// starting. A drill or recovery changes the fleet, so it runs alone: nothing else may be
/// unfinished, blocked runs included (a blocked drill leaves the fleet frozen mid-restore; a
/// blocked backup could be resumed in the middle of the restore). A backup may not start during
/// a drill or recovery either (its point would pair data from either side of the restore), nor
/// next to a running backup; a blocked backup does not stop the next one (the schedule keeps
/// the RPO while an operator looks at the blocked one).
fn conflicts(kind: RunKind, other: &RunRecord) -> bool {
    kind != RunKind::Backup || other.kind != RunKind::Backup || other.state != RunState::Blocked
}

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
}

impl<L: AgentLink + Clone + 'static> Engine<L> {
    pub fn new(
        store: Arc<dyn Store>,
        link: L,
        directory: Arc<dyn Directory>,
        environments: BTreeMap<String, Environment>,
        shutdown: CancellationToken,
        attach_grace: Duration,
        metrics: Arc<crate::metrics::RunMetrics>,
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
                metrics,
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::RunMetrics> {
        &self.inner.metrics
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
                "phase": phase_of_command(&report.run_id, command),
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

    /// Reads each environment's newest recovery point once, for the point-age metric.
    pub async fn observe_points(&self) {
        for (name, env) in &self.inner.environments {
            let newest = match open_repository(&env.repository_ref).await {
                Ok(repo) => repo
                    .list_points(Some(name))
                    .await
                    .map(|l| l.points.last().cloned()),
                Err(e) => Err(e),
            };
            match newest {
                Ok(Some(p)) => {
                    self.inner
                        .metrics
                        .point(name, p.created_at.timestamp(), env.rpo.as_secs())
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(environment = %name, "cannot list recovery points: {e:#}"),
            }
        }
    }

    pub fn environments(&self) -> &BTreeMap<String, Environment> {
        &self.inner.environments
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Applies an environment's retention window to its repository.
    pub async fn prune_points(
        &self,
        environment: &str,
        dry_run: bool,
    ) -> Result<repository::PruneReport> {
        let env = self.environment(environment)?;
        let mut options = repository::PruneOptions::new(env.name.as_str(), env.retention);
        options.dry_run = dry_run;
        for run in self.inner.store.unfinished_runs().await? {
            if let Some(p) = run.point_id.as_deref()
                && let Ok(id) = repository::PointId::parse(p)
            {
                options.in_use.insert(id);
            }
        }
        let repo = open_repository(&env.repository_ref).await?;
        repo.prune(&options).await
    }

    /// Verifies a point in its environment's repository.
    pub async fn verify_point(&self, id: &str, full: bool) -> Result<repository::VerifyReport> {
        let point = repository::PointId::parse(id)?;
        let env = self.environment(point.environment())?;
        let repo = open_repository(&env.repository_ref).await?;
        repo.verify_point(&point, full).await
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
                let repo = open_repository(&env.repository_ref).await?;
                repo.read_point(&repository::PointId::parse(p)?).await.ok()
            }
            None => None,
        };
        crate::report::build(&*self.inner.store, id, env, point.as_ref(), follow_ups, &[]).await
    }

    /// What `start_run` would do, as text for an operator; touches nothing.
    pub fn dry_run(&self, request: &StartRun) -> Result<String> {
        let env = self.environment(&request.environment)?;
        let plan = self.plan_for(env, request)?;
        let agents: Vec<AgentStatus> = self
            .inner
            .directory
            .agents()
            .into_iter()
            .filter(|a| a.environment.as_str() == env.name.as_str())
            .collect();
        let mut out = format!(
            "dry run: a {} of environment {} to point {}; nothing is changed\n",
            request.kind,
            env.name,
            request.point_id.as_deref().unwrap_or("(none given)")
        );
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
            references: Vec::new(),
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
        Ok(match (&request.plan, request.kind) {
            (None, RunKind::Backup) => env.backup_plan.clone(),
            (None, _) => env.plan.clone(),
            (Some((name, text)), _) => {
                Plan::parse(Path::new(name), text, Some(&env.fleet)).map_err(|e| anyhow!("{e}"))?
            }
        })
    }

    /// Validates the request, journals the run, and starts driving it. Fails with
    /// [`RunConflict`] while another run of the environment is in the way ([`conflicts`]).
    pub async fn start_run(&self, request: StartRun) -> Result<RunRecord> {
        let env = self.environment(&request.environment)?;
        let plan = self.plan_for(env, &request)?;
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
        let point_id = if request.kind == RunKind::Backup {
            Some(repository::PointId::new(env.name.as_str(), now)?.to_string())
        } else if plan.phases.iter().any(|p| needs_point(p.action)) {
            Some(resolve_point(env, request.point_id.as_deref()).await?)
        } else {
            request.point_id.clone()
        };
        let id = format!(
            "{}-{}-{}-{:04x}",
            request.kind,
            env.name,
            now.format("%Y%m%dT%H%M%S"),
            rand::random::<u16>()
        );
        let run = NewRun {
            id: id.clone(),
            kind: request.kind,
            environment: env.name.to_string(),
            point_id: point_id.clone(),
            plan: plan.source.clone(),
            params: json!({ "plan": plan.name }),
            epoch: self.inner.link.epoch(),
            created_at: now,
        };
        self.inner.store.create_run(&run).await?;
        self.inner
            .event(
                &id,
                "run.created",
                json!({ "plan": plan.name, "point": point_id }),
            )
            .await?;
        self.spawn_drive(id.clone());
        self.inner
            .store
            .run(&id)
            .await?
            .with_context(|| format!("run {id} vanished after it was created"))
    }

    /// Drives every run the journal says is unfinished and not waiting for an operator.
    pub async fn resume_unfinished(&self) -> Result<usize> {
        let runs = self.inner.store.unfinished_runs().await?;
        let mut n = 0;
        for run in runs {
            if matches!(run.state, RunState::Pending | RunState::Running) {
                tracing::info!(run_id = %run.id, "resuming unfinished run");
                self.spawn_drive(run.id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies an operator's decision; returns the run as it now stands.
    pub async fn control(&self, id: &str, control: Control) -> Result<RunRecord> {
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
                let reason = if frozen {
                    "aborted by an operator; the fleet stays frozen (writes are off) until an \
                     operator unfreezes it"
                } else {
                    "aborted by an operator"
                };
                store
                    .set_run_state(id, RunState::Aborted, Some(reason), Utc::now())
                    .await?;
                self.inner.metrics.run_ended(run.kind.as_str(), "aborted");
                self.inner
                    .event(id, "run.aborted", json!({ "frozen": frozen }))
                    .await?;
            }
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
                        store.put_phase(&phase).await?;
                    }
                }
                let verb = if control == Control::Retry {
                    "retried"
                } else {
                    "resumed"
                };
                store
                    .set_run_state(id, RunState::Running, None, Utc::now())
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
                tracing::error!(run_id = %id, "run driver failed: {e:#}");
                let reason = format!(
                    "the coordinator could not continue: {}",
                    api::errors::one_line(&*e)
                );
                let _ = inner
                    .store
                    .set_run_state(&id, RunState::Blocked, Some(&reason), Utc::now())
                    .await;
                inner.metrics.run_ended("unknown", "blocked");
                let _ = inner
                    .event(&id, "run.blocked", json!({ "reason": reason }))
                    .await;
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

/// What a blocked run's reason says about traffic: frozen only once a freeze phase passed (and
/// no unfreeze since); a plan without a freeze (a backup) says nothing.
fn freeze_note(plan: &Plan, journal: &[PhaseRecord]) -> &'static str {
    let states = |action: Action| -> Vec<PhaseState> {
        journal
            .iter()
            .filter(|p| {
                plan.phases
                    .get(p.index as usize)
                    .is_some_and(|ph| ph.action == action)
            })
            .map(|p| p.state)
            .collect()
    };
    if !plan.phases.iter().any(|ph| ph.action == Action::Freeze) {
        return "";
    }
    let (freeze, unfreeze) = (states(Action::Freeze), states(Action::Unfreeze));
    if unfreeze.contains(&PhaseState::Passed) {
        ""
    } else if freeze.contains(&PhaseState::Passed) {
        "; traffic stays frozen"
    } else if freeze.iter().any(|s| *s != PhaseState::Pending) {
        "; the freeze did not complete: traffic may be partly frozen"
    } else {
        "; traffic was not frozen"
    }
}

/// The phase a run's command belongs to, from the command id `run_steps` gives it.
fn phase_of_command<'a>(run_id: &str, command_id: &'a str) -> Option<&'a str> {
    command_id
        .strip_prefix(run_id)?
        .strip_prefix('/')?
        .split('/')
        .next()
        .filter(|p| !p.is_empty())
}

impl<L: AgentLink + Clone + 'static> Inner<L> {
    fn drives_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.drives.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn event(&self, run_id: &str, kind: &str, payload: serde_json::Value) -> Result<()> {
        self.store
            .append_event(run_id, Utc::now(), kind, &payload)
            .await?;
        Ok(())
    }

    async fn drive(self: Arc<Self>, id: &str, cancel: CancellationToken) -> Result<()> {
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
            self.store
                .set_run_state(id, RunState::Blocked, Some(&reason), Utc::now())
                .await?;
            return Ok(());
        };
        // The run follows the plan it was started with, whatever the files say now.
        let plan = Plan::parse(Path::new("journaled plan"), &run.plan, Some(&env.fleet))
            .map_err(|e| anyhow!("the journaled plan no longer fits the fleet: {e}"))?;
        if run.state == RunState::Pending {
            self.store
                .set_run_state(id, RunState::Running, None, Utc::now())
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
                        let attempt = journal
                            .iter()
                            .find(|p| p.index as usize == index)
                            .map_or(1, |p| p.attempt.max(1));
                        in_flight.insert(index);
                        let me = self.clone();
                        let (plan, env, run_id) = (plan.clone(), env.clone(), id.to_owned());
                        let point = run.point_id.clone();
                        let span = tracing::info_span!(
                            "rollcall.phase",
                            phase = %plan.phases[index].name,
                            action = %plan.phases[index].action,
                            attempt
                        );
                        tasks.spawn(
                            async move {
                                let result = me
                                    .run_phase(&run_id, &plan, &env, point, index, attempt)
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
                    self.store
                        .set_run_state(id, RunState::Succeeded, None, Utc::now())
                        .await?;
                    self.event(id, "run.succeeded", json!({})).await?;
                    self.metrics.run_succeeded(
                        run.kind.as_str(),
                        &run.environment,
                        (Utc::now() - run.created_at).num_milliseconds() as f64 / 1000.0,
                    );
                    tracing::info!(run_id = %id, "run succeeded");
                    return Ok(());
                }
                Next::Blocked { phase } => {
                    let detail = journal
                        .iter()
                        .find(|p| p.index as usize == phase)
                        .and_then(|p| p.detail.clone())
                        .unwrap_or_default();
                    let frozen = freeze_note(&plan, &journal);
                    // An agent keeps the result of a command it ran: `resume` re-sends the
                    // phase's commands and gets a failure back as it was. After fixing what
                    // made a command fail, the phase must run as a new attempt (`retry`).
                    let attempt = journal
                        .iter()
                        .find(|p| p.index as usize == phase)
                        .map(|p| p.attempt);
                    let failed = self.store.commands(id).await?.iter().any(|(c, r)| {
                        c.phase_index as usize == phase
                            && Some(c.attempt) == attempt
                            && r.as_ref()
                                .is_some_and(|r| r.outcome == Outcome::Failed.as_str())
                    });
                    let next = if failed {
                        format!(
                            "fix the cause, then `rollcall run retry {id}` (its failed commands \
                             run again; `resume` would replay their results), or `abort`"
                        )
                    } else {
                        format!(
                            "fix the cause, then `rollcall run resume {id}` (or `retry`, or `abort`)"
                        )
                    };
                    let reason = format!(
                        "phase {} did not pass: {detail}{frozen} — {next}",
                        plan.phases[phase].name
                    );
                    self.store
                        .set_run_state(id, RunState::Blocked, Some(&reason), Utc::now())
                        .await?;
                    self.event(
                        id,
                        "run.blocked",
                        json!({ "phase": plan.phases[phase].name, "reason": reason }),
                    )
                    .await?;
                    tracing::warn!(run_id = %id, "run blocked: {reason}");
                    self.metrics.run_ended(run.kind.as_str(), "blocked");
                    return Ok(());
                }
            }
        }
    }

    async fn run_phase(
        &self,
        run_id: &str,
        plan: &Plan,
        env: &Environment,
        point: Option<String>,
        index: usize,
        attempt: u32,
    ) -> Result<()> {
        let phase = &plan.phases[index];
        let started = Utc::now();
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
        self.store.put_phase(&record).await?;
        self.event(
            run_id,
            "phase.started",
            json!({ "phase": phase.name, "action": phase.action.as_str(), "attempt": attempt }),
        )
        .await?;

        let references = if phase.action == Action::CheckReferences {
            self.verified_references(run_id).await?
        } else {
            Vec::new()
        };
        let ctx = RunContext {
            run_id: run_id.to_owned(),
            repository: env.repository_ref.clone(),
            point,
            references,
        };
        let (passed, detail) = match phase.action {
            Action::Report => match self.write_report(run_id, env, &ctx).await {
                Ok(where_) => (true, format!("drill report written: {where_}")),
                Err(e) => (false, api::errors::one_line(&*e)),
            },
            Action::WritePoint => match self.write_point(run_id, plan, env, &ctx).await {
                Ok(id) => {
                    self.event(run_id, "point.written", json!({ "point": id }))
                        .await?;
                    (true, format!("recovery point {id} written"))
                }
                Err(e) => (false, api::errors::one_line(&*e)),
            },
            _ => {
                self.command_phase(run_id, phase, env, &ctx, attempt)
                    .await?
            }
        };

        record.state = if passed {
            PhaseState::Passed
        } else if phase.required {
            PhaseState::Blocked
        } else {
            PhaseState::Failed
        };
        record.finished_at = Some(Utc::now());
        record.detail = Some(detail.clone());
        self.store.put_phase(&record).await?;
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
        let deadline = SystemTime::now() + phase.timeout;
        let targets = self.targets(phase, env, deadline).await;

        // Object restores split the keys by hash across the role's agents (DESIGN.md): each
        // agent gets a shard, and the number of shards is the declared count. A command id
        // names one command forever, so an agent keeps the shard the journal already holds.
        let shard_of = if phase.action == Action::RestoreObjects {
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
                    if let AgentAction::RestoreObjects { shard, shards, .. } = step {
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
                return Ok((verdict.passed, detail));
            }
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    /// The shards already journaled for a restore-objects phase attempt: agent → (shard, of).
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
                || command.action != "restore-objects"
            {
                continue;
            }
            let action: AgentAction = serde_json::from_value(command.payload.clone())
                .with_context(|| format!("journaled command {}", command.command_id))?;
            if let AgentAction::RestoreObjects { shard, shards, .. } = action {
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
            let Some(result) = result.filter(|r| r.outcome == "succeeded") else {
                continue;
            };
            if command.action != "verify" {
                continue;
            }
            let sets: Vec<api::model::ObjectReferences> = match result.output.get("references") {
                Some(v) if !v.is_null() => {
                    serde_json::from_value(v.clone()).with_context(|| {
                        format!(
                            "the references in {}'s verify result {}",
                            command.agent, command.command_id
                        )
                    })?
                }
                _ => Vec::new(),
            };
            if !sets.is_empty() {
                newest.insert(command.agent, sets);
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
        let until = (SystemTime::now() + self.attach_grace).min(deadline);
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
        let repo = open_repository(&env.repository_ref).await?;
        let point = match &ctx.point {
            Some(p) => Some(repo.read_point(&repository::PointId::parse(p)?).await?),
            None => None,
        };
        let report =
            crate::report::build(&*self.store, run_id, env, point.as_ref(), &[], &[]).await?;
        let json = report.to_json();
        self.event(run_id, "report", json.clone()).await?;
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
        Ok(format!("{md_key} in the repository, and the run's journal"))
    }

    /// Commits the recovery point from the outputs of the run's backup commands.
    async fn write_point(
        &self,
        run_id: &str,
        plan: &Plan,
        env: &Environment,
        ctx: &RunContext,
    ) -> Result<String> {
        let id = repository::PointId::parse(
            ctx.point.as_deref().context("backup run has no point id")?,
        )?;
        let commands = self.store.commands(run_id).await?;
        let output = |action: Action| -> Result<Option<serde_json::Value>> {
            let phases: Vec<u32> = plan
                .phases
                .iter()
                .filter(|p| p.action == action)
                .map(|p| p.index as u32)
                .collect();
            if phases.is_empty() {
                return Ok(None);
            }
            let found = commands.iter().rev().find_map(|(c, r)| {
                r.as_ref()
                    .filter(|r| phases.contains(&c.phase_index) && r.outcome == "succeeded")
                    .map(|r| r.output.clone())
            });
            found
                .map(Some)
                .with_context(|| format!("no successful {action} result in the journal"))
        };
        let postgres = output(Action::BackupPostgres)?
            .map(serde_json::from_value::<repository::PgBackupPart>)
            .transpose()
            .context("the database agent's backup output")?;
        let objects = output(Action::SnapshotObjects)?
            .map(serde_json::from_value::<repository::ObjectSnapshotPart>)
            .transpose()
            .context("the objects agent's snapshot output")?;
        let repo = open_repository(&env.repository_ref).await?;
        let point = repo
            .write_point(repository::NewPoint {
                id,
                postgres,
                objects,
                secrets: env.secrets.clone(),
            })
            .await?;
        self.metrics.point(
            env.name.as_str(),
            point.created_at.timestamp(),
            env.rpo.as_secs(),
        );
        Ok(point.id.to_string())
    }
}

/// Shards for the objects agents of a restore: agents the journal already gave a shard keep
/// it; the others take the free shards in name order. The number of shards is the declared
/// count (at least the agents present, at least one), or the journal's when it has one.
fn assign_shards(
    journaled: &BTreeMap<String, (u32, u32)>,
    agents: &[String],
    declared: u32,
) -> BTreeMap<String, (u32, u32)> {
    let count = journaled
        .values()
        .map(|&(_, n)| n)
        .max()
        .unwrap_or_else(|| declared.max(agents.len() as u32).max(1));
    let mut out: BTreeMap<String, (u32, u32)> = journaled.clone();
    let taken: BTreeSet<u32> = out.values().map(|&(s, _)| s).collect();
    let mut free = (0..count).filter(|s| !taken.contains(s));
    let mut fresh: Vec<&String> = agents.iter().filter(|a| !out.contains_key(*a)).collect();
    fresh.sort();
    for agent in fresh {
        // More agents than shards: the extra ones repeat shard 0 (idempotent, harmless).
        let shard = free.next().unwrap_or(0);
        out.insert(agent.clone(), (shard, count));
    }
    out
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

/// What a run's commands need besides the phase: where its points live and which point.
#[derive(Debug, Clone)]
struct RunContext {
    run_id: String,
    repository: api::model::RepositoryRef,
    point: Option<String>,
    /// For `check-references`: the keys the database verifications returned.
    references: Vec<api::model::ObjectReferences>,
}

fn needs_point(action: Action) -> bool {
    matches!(
        action,
        Action::Preflight | Action::RestorePostgres | Action::RestoreObjects | Action::Verify
    )
}

/// The agent commands a phase sends to each targeted agent, in order.
fn agent_actions(phase: &Phase, ctx: &RunContext) -> std::result::Result<Vec<AgentAction>, String> {
    let target = |r: Replicas| match r {
        Replicas::Count(n) => ScaleTarget::Replicas(n),
        Replicas::Prior => ScaleTarget::Prior,
    };
    let repository = ctx.repository.clone();
    let point = || {
        ctx.point.clone().ok_or_else(|| {
            format!(
                "{} in run {} needs a recovery point; start the run with --point",
                phase.action, ctx.run_id
            )
        })
    };
    Ok(match phase.action {
        Action::Freeze => vec![AgentAction::Freeze],
        Action::Unfreeze => vec![AgentAction::Unfreeze],
        Action::Restart => vec![AgentAction::Restart],
        Action::Scale => match phase.replicas {
            Some(r) => vec![AgentAction::Scale(target(r))],
            None => return Err("scale phase without replicas (plan check refuses this)".into()),
        },
        Action::Report | Action::WritePoint => Vec::new(),
        Action::BackupPostgres => vec![AgentAction::BackupPostgres {
            repository,
            point: point()?,
        }],
        Action::SnapshotObjects => vec![AgentAction::SnapshotObjects {
            repository,
            point: point()?,
        }],
        Action::Preflight => vec![AgentAction::Preflight {
            repository,
            point: point()?,
        }],
        Action::RestorePostgres => vec![AgentAction::RestorePostgres {
            repository,
            point: point()?,
        }],
        Action::RestoreObjects => vec![AgentAction::RestoreObjects {
            repository,
            point: point()?,
            shard: 0,
            shards: 1,
        }],
        Action::Verify => vec![AgentAction::Verify {
            repository,
            point: point()?,
        }],
        Action::CheckReferences => vec![AgentAction::CheckObjects(ctx.references.clone())],
        // Start the replicas the smoke needs (workers never before objects are restored: plan
        // check orders that), then run the agent's smoke command.
        Action::Smoke => {
            let smoke = AgentAction::Smoke {
                point: ctx.point.clone(),
            };
            match phase.replicas {
                Some(r) => vec![AgentAction::Scale(target(r)), smoke],
                None => vec![smoke],
            }
        }
    })
}

/// Opens an environment's repository with its S3 settings; credentials come from this
/// process's environment.
pub async fn open_repository(r: &api::model::RepositoryRef) -> Result<repository::Repository> {
    let s3 = repository::S3Options::connection(
        r.s3_endpoint.clone(),
        r.s3_region.clone(),
        r.s3_path_style,
    );
    let options = repository::RepositoryOptions {
        s3,
        ..repository::RepositoryOptions::default()
    };
    repository::Repository::open(&r.url, options).await
}

/// The point a restore uses: `latest` is the environment's newest point; an id must exist and
/// belong to the environment. Checked before the run exists, so a bad id touches nothing.
async fn resolve_point(env: &Environment, point: Option<&str>) -> Result<String> {
    let Some(point) = point else {
        bail!(
            "this plan restores data: name the recovery point with --point ID or --point latest \
             (`rollcall points --env {}` lists them)",
            env.name
        );
    };
    let repo = open_repository(&env.repository_ref).await?;
    if point == "latest" {
        let listing = repo.list_points(Some(env.name.as_str())).await?;
        return listing
            .points
            .last()
            .map(|p| p.id.to_string())
            .with_context(|| {
                format!(
                    "environment {} has no recovery points yet; take one with `rollcall backup \
                 --env {}`",
                    env.name, env.name
                )
            });
    }
    let id = repository::PointId::parse(point).with_context(|| {
        format!(
            "--point {point:?} is not a point id (`rollcall points --env {}` lists them)",
            env.name
        )
    })?;
    let found = repo.read_point(&id).await.with_context(|| {
        format!(
            "recovery point {point} cannot be used (`rollcall points --env {}` lists them)",
            env.name
        )
    })?;
    if found.environment != env.name.as_str() {
        bail!(
            "recovery point {point} belongs to environment {}, not {}",
            found.environment,
            env.name
        );
    }
    Ok(id.to_string())
}

/// Runs a phase's steps on one agent with retries. The outer error is the journal failing
/// (the run cannot continue); the inner one is the agent's failure (the gate judges it).
#[allow(clippy::too_many_arguments)]
async fn run_steps<L: AgentLink>(
    store: &dyn Store,
    link: &L,
    run_id: &str,
    phase: &str,
    phase_index: usize,
    attempt: u32,
    retries: u32,
    agent: &AgentName,
    steps: &[AgentAction],
    deadline: SystemTime,
) -> Result<std::result::Result<(), String>> {
    for (step, action) in steps.iter().enumerate() {
        let mut last = String::new();
        let mut ok = false;
        for retry in 0..=retries {
            // The id's shape is read back by `phase_of_command`.
            let id = format!("{run_id}/{phase}/{agent}/a{attempt}/s{step}/r{retry}");
            'same_id: loop {
                let command_id =
                    CommandId::parse(&id).map_err(|e| anyhow!("command id {id}: {e}"))?;
                store
                    .record_command(&CommandRecord {
                        command_id: id.clone(),
                        run_id: run_id.to_owned(),
                        phase_index: phase_index as u32,
                        agent: agent.to_string(),
                        action: action.name().to_owned(),
                        payload: serde_json::to_value(action)?,
                        attempt,
                        epoch: link.epoch(),
                        created_at: Utc::now(),
                    })
                    .await?;
                let sent = link
                    .send(
                        agent,
                        Outgoing {
                            id: command_id,
                            run_id: run_id.to_owned(),
                            deadline,
                            action: action.clone(),
                        },
                    )
                    .await;
                match sent {
                    Ok(result) => {
                        let output = match &result.detail {
                            Some(ResultDetail::Output(v)) => v.clone(),
                            Some(other) => serde_json::to_value(other)?,
                            None => serde_json::Value::Null,
                        };
                        let recorded = store
                            .record_result(&ResultRecord {
                                command_id: id.clone(),
                                agent: agent.to_string(),
                                epoch: result.epoch,
                                outcome: result.outcome.as_str().to_owned(),
                                replayed: result.replayed,
                                detail: result.message.clone(),
                                output,
                                received_at: Utc::now(),
                            })
                            .await;
                        match recorded {
                            Ok(_) | Err(store::Error::Conflict(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        if result.outcome == Outcome::Succeeded {
                            ok = true;
                            break 'same_id;
                        }
                        last = format!("{} {}: {}", action.name(), result.outcome, result.message);
                        if matches!(result.outcome, Outcome::StaleEpoch | Outcome::Unsupported) {
                            return Ok(Err(last));
                        }
                    }
                    Err(
                        e @ (LinkError::NotConnected { .. }
                        | LinkError::Disconnected { .. }
                        | LinkError::Backlogged { .. }),
                    ) => {
                        // The command may not have arrived: send the same id again once the agent
                        // is back (it dedupes), for as long as the phase has time.
                        last = e.to_string();
                        if SystemTime::now() + RESEND_PAUSE < deadline {
                            tokio::time::sleep(RESEND_PAUSE).await;
                            continue 'same_id;
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
                break 'same_id;
            }
            if ok {
                break;
            }
            if retry < retries {
                let pause = Duration::from_secs(1 << retry.min(4)).min(MAX_RETRY_PAUSE);
                if SystemTime::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
        }
        if !ok {
            return Ok(Err(last));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_blocked_reason_says_frozen_only_after_the_freeze() {
        let plan = Plan::default_plan(None).unwrap();
        let index = |action| plan.phases.iter().position(|p| p.action == action).unwrap() as u32;
        let phase = |index, state| PhaseRecord {
            run_id: "r".into(),
            index,
            name: String::new(),
            state,
            attempt: 1,
            started_at: None,
            finished_at: None,
            detail: None,
        };
        let (freeze, unfreeze) = (index(Action::Freeze), index(Action::Unfreeze));
        let preflight_blocked = [phase(0, PhaseState::Blocked)];
        assert_eq!(
            freeze_note(&plan, &preflight_blocked),
            "; traffic was not frozen"
        );
        let freeze_blocked = [
            phase(0, PhaseState::Passed),
            phase(freeze, PhaseState::Blocked),
        ];
        assert!(freeze_note(&plan, &freeze_blocked).contains("partly frozen"));
        let later = [
            phase(0, PhaseState::Passed),
            phase(freeze, PhaseState::Passed),
            phase(freeze + 1, PhaseState::Blocked),
        ];
        assert_eq!(freeze_note(&plan, &later), "; traffic stays frozen");
        let unfrozen = [
            phase(freeze, PhaseState::Passed),
            phase(unfreeze, PhaseState::Passed),
        ];
        assert_eq!(freeze_note(&plan, &unfrozen), "");
        let backup = Plan::backup_plan(&crate::plan::tests::fleet()).unwrap();
        assert_eq!(freeze_note(&backup, &preflight_blocked), "");
    }

    #[test]
    fn a_drill_runs_alone_and_a_backup_only_passes_blocked_backups() {
        use RunKind::{Backup, Drill, Recovery};
        use RunState::{Blocked, Pending, Running};
        let run = |kind, state| RunRecord {
            id: "r".into(),
            kind,
            environment: "prod".into(),
            point_id: None,
            plan: String::new(),
            params: serde_json::Value::Null,
            state,
            reason: None,
            epoch: api::model::Epoch::new(1).unwrap(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            finished_at: None,
        };
        for other in [Drill, Recovery, Backup] {
            for state in [Pending, Running, Blocked] {
                for new in [Drill, Recovery] {
                    assert!(
                        conflicts(new, &run(other, state)),
                        "{new} next to {other} {state}"
                    );
                }
                let backup_may_start = other == Backup && state == Blocked;
                assert_eq!(
                    conflicts(Backup, &run(other, state)),
                    !backup_may_start,
                    "backup next to {other} {state}"
                );
            }
        }
    }

    #[test]
    fn progress_names_the_phase_from_the_command_id() {
        let id = "r-20261126-abc/restore-objects/obj-1/a1/s0/r0";
        assert_eq!(
            phase_of_command("r-20261126-abc", id),
            Some("restore-objects")
        );
        assert_eq!(phase_of_command("r-other", id), None);
        assert_eq!(phase_of_command("r-20261126-abc", "r-20261126-abc/"), None);
        assert_eq!(phase_of_command("r-20261126", id), None);
    }

    #[test]
    fn objects_agents_get_one_shard_each_and_keep_the_journaled_one() {
        let none = BTreeMap::new();
        let fresh = assign_shards(&none, &names(&["obj-2", "obj-1"]), 2);
        assert_eq!(fresh["obj-1"], (0, 2));
        assert_eq!(fresh["obj-2"], (1, 2));
        // One agent alone still restores one shard of the declared two (the gate then waits
        // for the other), and a single agent without a declaration restores everything.
        assert_eq!(assign_shards(&none, &names(&["obj-2"]), 2)["obj-2"], (0, 2));
        assert_eq!(assign_shards(&none, &names(&["obj-1"]), 0)["obj-1"], (0, 1));
        // After a coordinator restart obj-2 re-attached first: it keeps its journaled shard
        // and obj-1 takes the one left.
        let journaled = BTreeMap::from([("obj-2".to_owned(), (0, 2))]);
        let again = assign_shards(&journaled, &names(&["obj-1", "obj-2"]), 2);
        assert_eq!(again["obj-2"], (0, 2));
        assert_eq!(again["obj-1"], (1, 2));
    }
}
