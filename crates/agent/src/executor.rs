//! Executes commands with the guarantees every action relies on: stale epochs are refused,
//! a command id runs at most once (a repeat gets the recorded result), deadlines are enforced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use api::model::output::{ChecksOutput, FreezeOutput, VerifyOutput};
use api::model::{
    Action, ActionOutput, AgentName, Command, CommandId, CommandResult, Description, Environment,
    Epoch, Outcome, ResultDetail, Role,
};
use opentelemetry::propagation::Extractor;
use tokio::sync::watch;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::control::RoleControl;
use crate::data::DataPlane;
use crate::progress::Reporter;
use crate::state::{EpochCheck, StateDir};

/// Who this agent is, for `Describe`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
}

pub struct Executor {
    identity: Identity,
    started: SystemTime,
    state: Mutex<StateDir>,
    in_flight: Mutex<HashMap<CommandId, watch::Receiver<Option<CommandResult>>>>,
    pings: AtomicU64,
    control: Option<Arc<RoleControl>>,
    data: Option<Arc<DataPlane>>,
    checks: Option<Arc<crate::checks::Checks>>,
}

enum Claim {
    Replay(Box<CommandResult>),
    Wait(watch::Receiver<Option<CommandResult>>),
    Run(watch::Sender<Option<CommandResult>>),
}

struct MapExtractor<'a>(&'a std::collections::BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl Executor {
    pub fn new(identity: Identity, state: StateDir) -> Executor {
        Executor {
            identity,
            started: SystemTime::now(),
            state: Mutex::new(state),
            in_flight: Mutex::new(HashMap::new()),
            pings: AtomicU64::new(0),
            control: None,
            data: None,
            checks: None,
        }
    }

    /// HTTP checks, invariants and the smoke command for verify and smoke actions.
    pub fn with_checks(mut self, checks: Arc<crate::checks::Checks>) -> Executor {
        self.checks = Some(checks);
        self
    }

    /// The data plane for backup, preflight and restore actions.
    pub fn with_data(mut self, data: Arc<DataPlane>) -> Executor {
        self.data = Some(data);
        self
    }

    /// Role control for freeze, unfreeze, scale and restart.
    pub fn with_control(mut self, control: Arc<RoleControl>) -> Executor {
        self.control = Some(control);
        self
    }

    fn state(&self) -> MutexGuard<'_, StateDir> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn highest_epoch(&self) -> Option<Epoch> {
        self.state().highest_epoch()
    }

    /// Raises the highest epoch seen (on a coordinator's welcome); returns false if `epoch`
    /// is stale.
    pub fn observe_epoch(&self, epoch: Epoch) -> anyhow::Result<bool> {
        Ok(self.state().observe_epoch(epoch)? == EpochCheck::Current)
    }

    /// Executes `command` (or replays its recorded result) and returns the result to report.
    pub async fn execute(&self, command: Command) -> CommandResult {
        self.execute_reporting(command, Reporter::none()).await
    }

    /// [`Executor::execute`], telling `progress` how far a long command has come.
    pub async fn execute_reporting(&self, command: Command, progress: Reporter) -> CommandResult {
        let span = tracing::info_span!(
            "agent.command.execute",
            agent = %self.identity.name,
            command_id = %command.id,
            action = command.action.name(),
            epoch = %command.epoch,
            outcome = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&MapExtractor(&command.trace_context))
        });
        let _ = span.set_parent(parent);
        let result = self
            .execute_inner(command, progress)
            .instrument(span.clone())
            .await;
        span.record("outcome", result.outcome.as_str());
        result
    }

    async fn execute_inner(&self, command: Command, progress: Reporter) -> CommandResult {
        let received = SystemTime::now();
        // The command's time limit runs from here, on this machine's monotonic clock.
        let arrived = std::time::Instant::now();
        // The epoch is checked, and a newer one persisted, before anything else happens.
        let check = self.state().observe_epoch(command.epoch);
        match check {
            Ok(EpochCheck::Current) => {}
            Ok(EpochCheck::Stale { highest }) => {
                tracing::warn!(
                    "refusing command from stale coordinator: epoch {} < highest seen {highest}",
                    command.epoch
                );
                return refusal(
                    &command,
                    received,
                    Outcome::StaleEpoch,
                    format!(
                        "epoch {} is older than epoch {highest} this agent already obeys; the \
                         sending coordinator is stale",
                        command.epoch
                    ),
                );
            }
            Err(e) => {
                tracing::error!("cannot persist epoch: {e:#}");
                return refusal(
                    &command,
                    received,
                    Outcome::Failed,
                    api::errors::one_line(&*e),
                );
            }
        }

        let sender = match self.claim(&command.id) {
            Claim::Replay(mut recorded) => {
                recorded.replayed = true;
                return *recorded;
            }
            Claim::Wait(mut rx) => {
                let done = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                return match done {
                    Some(mut result) => {
                        result.replayed = true;
                        result
                    }
                    None => refusal(
                        &command,
                        received,
                        Outcome::Failed,
                        "the first execution of this command was abandoned".into(),
                    ),
                };
            }
            Claim::Run(sender) => sender,
        };

        let left = Some(command.time_limit.saturating_sub(arrived.elapsed()))
            .filter(|left| !left.is_zero());
        let mut result = match left {
            None if command.time_limit.is_zero() => refusal(
                &command,
                received,
                Outcome::TimedOut,
                "the command had no time left when it arrived (its phase's timeout had run \
                 out on the coordinator)"
                    .into(),
            ),
            None => refusal(
                &command,
                received,
                Outcome::TimedOut,
                format!(
                    "{} did not start within its time limit ({} after it arrived: this agent \
                     was busy)",
                    command.action.name(),
                    humantime::format_duration(command.time_limit)
                ),
            ),
            Some(left) => {
                match tokio::time::timeout(
                    left,
                    self.act(&command.action, &command.run_id, &progress),
                )
                .await
                {
                    Ok((outcome, message, detail)) => CommandResult {
                        command_id: command.id.clone(),
                        epoch: command.epoch,
                        outcome,
                        message,
                        replayed: false,
                        started: received,
                        finished: SystemTime::now(),
                        detail,
                    },
                    Err(_) => refusal(
                        &command,
                        received,
                        Outcome::TimedOut,
                        format!(
                            "{} did not finish within its time limit ({} after it arrived)",
                            command.action.name(),
                            humantime::format_duration(command.time_limit)
                        ),
                    ),
                }
            }
        };
        result.finished = SystemTime::now();
        if let Err(e) = self
            .state()
            .record(&result, command.action.has_side_effects())
        {
            tracing::error!("cannot record result: {e:#}");
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&command.id);
        let _ = sender.send(Some(result.clone()));
        result
    }

    fn claim(&self, id: &CommandId) -> Claim {
        // Lock order: state, then in_flight (the only place both are held).
        let state = self.state();
        if let Some(recorded) = state.recorded(id) {
            return Claim::Replay(Box::new(recorded.clone()));
        }
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = in_flight.get(id) {
            return Claim::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        in_flight.insert(id.clone(), rx);
        Claim::Run(tx)
    }

    /// The heavy actions are boxed: this future is in every command's task, and a ping
    /// should not allocate and copy the state of a Postgres restore.
    async fn act(
        &self,
        action: &Action,
        run_id: &str,
        progress: &Reporter,
    ) -> (Outcome, String, Option<ResultDetail>) {
        match action {
            Action::Verify {
                repository,
                point,
                to_time,
            } => {
                let mut checks = match &self.checks {
                    Some(c) => Box::pin(c.http_checks()).await,
                    None => Vec::new(),
                };
                let invariants = self.checks.as_ref().map_or(&[][..], |c| &c.invariants[..]);
                let references = self.checks.as_ref().map_or(&[][..], |c| &c.references[..]);
                let mut counts = None;
                let mut referenced = Vec::new();
                if let Some(data) = &self.data {
                    let verified = match to_time {
                        Some(at) => {
                            Box::pin(data.verify_to_time(*at, invariants, references)).await
                        }
                        None => {
                            Box::pin(data.verify(repository, point, invariants, references)).await
                        }
                    };
                    match verified {
                        Ok(verified) => {
                            checks.extend(verified.checks);
                            counts = verified.counts;
                            referenced = verified.references;
                        }
                        Err(e) => return (Outcome::Failed, api::errors::one_line(&*e), None),
                    }
                }
                let (outcome, message) = match crate::checks::failures(&checks) {
                    None => (
                        Outcome::Succeeded,
                        format!(
                            "{} checks passed",
                            checks.iter().filter(|c| c.passed).count()
                        ),
                    ),
                    Some(why) => (Outcome::Failed, why),
                };
                let output = ActionOutput::Verify(VerifyOutput {
                    checks,
                    counts,
                    references: referenced,
                });
                (outcome, message, output_detail(output))
            }
            Action::CheckObjects(sets) => {
                let Some(data) = self.data.as_ref().filter(|d| d.has_objects()) else {
                    return (
                        Outcome::Unsupported,
                        "check-objects needs [objects] in agent.toml".into(),
                        None,
                    );
                };
                if sets.is_empty() {
                    return (
                        Outcome::Succeeded,
                        "nothing to look up: no database verify returned [[reference]] keys".into(),
                        output_detail(ActionOutput::CheckObjects(ChecksOutput { checks: vec![] })),
                    );
                }
                match Box::pin(data.check_objects(sets)).await {
                    Ok(checks) => {
                        let (outcome, message) = match crate::checks::failures(&checks) {
                            None => (
                                Outcome::Succeeded,
                                format!("{} reference checks passed", checks.len()),
                            ),
                            Some(why) => (Outcome::Failed, why),
                        };
                        let output = ActionOutput::CheckObjects(ChecksOutput { checks });
                        (outcome, message, output_detail(output))
                    }
                    Err(e) => (Outcome::Failed, api::errors::one_line(&*e), None),
                }
            }
            Action::Smoke { point } => {
                let Some(checks) = &self.checks else {
                    return (Outcome::Unsupported, "no [smoke] configured".into(), None);
                };
                match Box::pin(checks.smoke(point.as_deref())).await {
                    Ok(check) => {
                        let outcome = if check.passed {
                            Outcome::Succeeded
                        } else {
                            Outcome::Failed
                        };
                        let message = check.detail.clone();
                        let output = ActionOutput::Smoke(ChecksOutput {
                            checks: vec![check],
                        });
                        (outcome, message, output_detail(output))
                    }
                    Err(e) => (Outcome::Unsupported, api::errors::one_line(&*e), None),
                }
            }
            Action::BackupPostgres { .. }
            | Action::SnapshotObjects { .. }
            | Action::BaseBackup { .. }
            | Action::Preflight { .. }
            | Action::RestorePostgres { .. }
            | Action::PreparePostgres { .. }
            | Action::CommitPostgres { .. }
            | Action::UndoPostgres { .. }
            | Action::UndoObjects { .. }
            | Action::RestoreObjects { .. }
            | Action::ListKept
            | Action::TeardownPostgres
            | Action::TeardownObjects { .. }
            | Action::PruneKept { .. } => {
                let Some(data) = &self.data else {
                    return (
                        Outcome::Unsupported,
                        format!(
                            "{} needs [postgres] or [objects] in agent.toml",
                            action.name()
                        ),
                        None,
                    );
                };
                match Box::pin(data_action(data, action, run_id, progress)).await {
                    Ok(output) => (
                        Outcome::Succeeded,
                        format!("{} done", action.name()),
                        output_detail(output),
                    ),
                    Err(e) => (Outcome::Failed, api::errors::one_line(&*e), None),
                }
            }
            Action::Freeze | Action::Unfreeze => {
                let freezing = matches!(action, Action::Freeze);
                match Box::pin(freeze_action(
                    self.control.as_deref(),
                    self.data.as_deref(),
                    freezing,
                ))
                .await
                {
                    Ok(out) => (
                        Outcome::Succeeded,
                        out.detail.clone(),
                        output_detail(if freezing {
                            ActionOutput::Freeze(out)
                        } else {
                            ActionOutput::Unfreeze(out)
                        }),
                    ),
                    Err(e) => (Outcome::Failed, api::errors::one_line(&*e), None),
                }
            }
            Action::Scale(_) | Action::Restart => {
                let Some(control) = &self.control else {
                    return (
                        Outcome::Unsupported,
                        format!(
                            "{} needs role control; configure [control] in this agent's agent.toml",
                            action.name()
                        ),
                        None,
                    );
                };
                match Box::pin(control_action(control, action, run_id)).await {
                    Ok((message, detail)) => (Outcome::Succeeded, message, detail),
                    Err(e) => (Outcome::Failed, api::errors::one_line(&*e), None),
                }
            }
            Action::Ping { hold } => {
                if !hold.is_zero() {
                    tokio::time::sleep(*hold).await;
                }
                let executions = self.pings.fetch_add(1, Ordering::Relaxed) + 1;
                (
                    Outcome::Succeeded,
                    "pong".into(),
                    Some(ResultDetail::Ping { executions }),
                )
            }
            Action::Describe => {
                let state = self.state();
                let description = Description {
                    name: self.identity.name.clone(),
                    role: self.identity.role.clone(),
                    environment: self.identity.environment.clone(),
                    capabilities: self.identity.capabilities.clone(),
                    version: api::VERSION.to_owned(),
                    highest_epoch: state.highest_epoch(),
                    recorded_results: state.recorded_count(),
                    started: self.started,
                };
                (
                    Outcome::Succeeded,
                    String::new(),
                    Some(ResultDetail::Describe(description)),
                )
            }
        }
    }
}

/// Freezes (or thaws) writes with what this agent has: the role's freeze adapter, the
/// database freeze, both, or neither (an agent with nothing to freeze says so, and the
/// coordinator checks that some agent of the phase froze).
async fn freeze_action(
    control: Option<&RoleControl>,
    data: Option<&DataPlane>,
    freeze: bool,
) -> anyhow::Result<FreezeOutput> {
    let mut done: Vec<FreezeOutput> = Vec::new();
    if let Some(control) = control
        && let Some(by) = control.freezer_kind()
    {
        let detail = if freeze {
            control.freeze().await?
        } else {
            control.unfreeze().await?
        };
        done.push(FreezeOutput {
            by: by.to_owned(),
            frozen: freeze,
            detail: if detail.is_empty() {
                format!("{} by {by}", if freeze { "frozen" } else { "unfrozen" })
            } else {
                detail
            },
        });
    }
    if let Some(data) = data
        && data.freezes()
    {
        done.push(if freeze {
            data.freeze_database().await?
        } else {
            data.thaw_database().await?
        });
    }
    Ok(match done.len() {
        0 => FreezeOutput::nothing(),
        1 => done.remove(0),
        _ => FreezeOutput {
            by: done
                .iter()
                .map(|d| d.by.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            frozen: freeze,
            detail: done
                .iter()
                .map(|d| d.detail.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        },
    })
}

async fn control_action(
    control: &RoleControl,
    action: &Action,
    run_id: &str,
) -> anyhow::Result<(String, Option<ResultDetail>)> {
    Ok(match action {
        Action::Restart => (control.restart().await?, None),
        Action::Scale(target) => {
            let out = control.scale(target.clone(), run_id).await?;
            (
                format!("scaled from {} to {} replicas", out.before, out.now),
                output_detail(ActionOutput::Scale(out)),
            )
        }
        _ => anyhow::bail!("{} is not a role-control action", action.name()),
    })
}

async fn data_action(
    data: &DataPlane,
    action: &Action,
    run_id: &str,
    progress: &Reporter,
) -> anyhow::Result<ActionOutput> {
    Ok(match action {
        Action::BackupPostgres { repository, point } => ActionOutput::BackupPostgres(Box::new(
            data.backup_postgres(repository, point, progress).await?,
        )),
        Action::SnapshotObjects { repository, point } => ActionOutput::SnapshotObjects(Box::new(
            data.snapshot_objects(repository, point, progress).await?,
        )),
        Action::BaseBackup { repository } => {
            ActionOutput::BaseBackup(Box::new(data.base_backup(repository).await?))
        }
        Action::Preflight {
            repository,
            point,
            to_time,
        } => ActionOutput::Preflight(match to_time {
            Some(at) => data.preflight_to_time(repository, *at).await?,
            None => data.preflight(repository, point, run_id).await?,
        }),
        Action::RestorePostgres { repository, point } => ActionOutput::RestorePostgres(
            data.restore_postgres(repository, point, run_id, progress)
                .await?,
        ),
        Action::PreparePostgres {
            repository,
            point,
            to_time,
        } => ActionOutput::PreparePostgres(match to_time {
            Some(at) => {
                data.prepare_postgres_to_time(repository, *at, run_id, progress)
                    .await?
            }
            None => {
                data.prepare_postgres(repository, point, run_id, progress)
                    .await?
            }
        }),
        Action::CommitPostgres { point, to_time, .. } => {
            ActionOutput::CommitPostgres(match to_time {
                Some(at) => data.commit_postgres_to_time(*at, run_id, progress).await?,
                None => data.commit_postgres(point, run_id, progress).await?,
            })
        }
        Action::RestoreObjects {
            repository,
            point,
            shard,
            shards,
            to_time,
        } => ActionOutput::RestoreObjects(match to_time {
            Some(at) => {
                data.restore_objects_to_time(repository, *at, run_id, *shard, *shards, progress)
                    .await?
            }
            None => {
                data.restore_objects(repository, point, run_id, *shard, *shards, progress)
                    .await?
            }
        }),
        Action::UndoPostgres { undone_run } => {
            ActionOutput::UndoPostgres(data.undo_postgres(undone_run).await?)
        }
        Action::UndoObjects {
            repository,
            undone_run,
            shard,
            shards,
        } => ActionOutput::UndoObjects(
            data.undo_objects(repository, undone_run, run_id, *shard, *shards)
                .await?,
        ),
        Action::TeardownPostgres => {
            ActionOutput::TeardownPostgres(data.teardown_postgres(run_id).await?)
        }
        Action::TeardownObjects {
            repository,
            shard,
            shards,
        } => ActionOutput::TeardownObjects(
            data.teardown_objects(repository, run_id, *shard, *shards)
                .await?,
        ),
        Action::ListKept => ActionOutput::ListKept(data.list_kept().await?),
        Action::PruneKept { databases } => {
            ActionOutput::PruneKept(data.prune_kept(databases).await)
        }
        _ => anyhow::bail!("{} is not a data action", action.name()),
    })
}

/// An action's typed output as the result carries it.
fn output_detail(output: ActionOutput) -> Option<ResultDetail> {
    Some(ResultDetail::Output(output.into()))
}

fn refusal(
    command: &Command,
    received: SystemTime,
    outcome: Outcome,
    message: String,
) -> CommandResult {
    CommandResult {
        command_id: command.id.clone(),
        epoch: command.epoch,
        outcome,
        message,
        replayed: false,
        started: received,
        finished: SystemTime::now(),
        detail: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn executor(dir: &std::path::Path) -> Arc<Executor> {
        Arc::new(Executor::new(
            Identity {
                name: AgentName::parse("web-1").expect("name"),
                role: Role::parse("web").expect("role"),
                environment: Environment::parse("dev").expect("env"),
                capabilities: vec![],
            },
            StateDir::open(dir).expect("state"),
        ))
    }

    fn ping(id: &str, epoch: u64, hold_ms: u64, deadline_in: Duration) -> Command {
        Command {
            id: CommandId::parse(id).expect("id"),
            epoch: Epoch::new(epoch).expect("epoch"),
            run_id: "r".into(),
            time_limit: deadline_in,
            trace_context: Default::default(),
            action: Action::Ping {
                hold: Duration::from_millis(hold_ms),
            },
        }
    }

    fn executions(r: &CommandResult) -> u64 {
        match r.detail {
            Some(ResultDetail::Ping { executions }) => executions,
            _ => 0,
        }
    }

    #[tokio::test]
    async fn concurrent_duplicates_execute_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = executor(dir.path());
        let a = tokio::spawn({
            let ex = ex.clone();
            async move { ex.execute(ping("c1", 1, 50, Duration::from_secs(5))).await }
        });
        let b = tokio::spawn({
            let ex = ex.clone();
            async move { ex.execute(ping("c1", 1, 50, Duration::from_secs(5))).await }
        });
        let (a, b) = (a.await.expect("a"), b.await.expect("b"));
        assert_eq!(executions(&a), 1);
        assert_eq!(executions(&b), 1);
        assert!(a.replayed != b.replayed, "exactly one is the replay");
        let c = ex.execute(ping("c1", 1, 0, Duration::from_secs(5))).await;
        assert!(c.replayed);
        assert_eq!(executions(&c), 1);
    }

    #[tokio::test]
    async fn stale_epochs_are_refused_and_not_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = executor(dir.path());
        assert_eq!(
            ex.execute(ping("a", 2, 0, Duration::from_secs(5)))
                .await
                .outcome,
            Outcome::Succeeded
        );
        let stale = ex.execute(ping("b", 1, 0, Duration::from_secs(5))).await;
        assert_eq!(stale.outcome, Outcome::StaleEpoch);
        assert!(
            stale.message.contains("epoch 1 is older than epoch 2"),
            "{}",
            stale.message
        );
        // The same id under a current epoch still runs: a refusal is not an execution.
        let retried = ex.execute(ping("b", 2, 0, Duration::from_secs(5))).await;
        assert_eq!(retried.outcome, Outcome::Succeeded);
        assert!(!retried.replayed);
    }

    #[tokio::test]
    async fn deadlines_are_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = executor(dir.path());
        // A second: the executor's own bookkeeping (the epoch and claim, fsync'd) comes out
        // of the limit too, and a loaded machine may spend a good part of 100 ms on it.
        let slow = ex
            .execute(ping("slow", 1, 10_000, Duration::from_secs(1)))
            .await;
        assert_eq!(slow.outcome, Outcome::TimedOut);
        assert!(
            slow.message
                .contains("did not finish within its time limit (1s after it arrived)"),
            "{}",
            slow.message
        );
        let late = ex.execute(ping("late", 1, 0, Duration::ZERO)).await;
        assert_eq!(late.outcome, Outcome::TimedOut);
        assert!(late.message.contains("no time left"), "{}", late.message);
        assert_eq!(
            executions(&ex.execute(ping("ok", 1, 0, Duration::from_secs(5))).await),
            1,
            "the timed-out pings never counted"
        );
    }

    #[test]
    fn a_command_does_not_carry_the_data_planes_state() {
        // Every command is spawned as one task: the data-plane actions' state machines (tens
        // of KiB in all) are boxed, so a ping or a describe moves little more than itself.
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = executor(dir.path());
        let future = ex.execute_reporting(
            ping("small", 1, 0, Duration::from_secs(5)),
            Reporter::none(),
        );
        let size = std::mem::size_of_val(&future);
        assert!(size <= 2048, "a command's future is {size} bytes");
    }
}
