//! Undo runs (`rollcall run undo RUN [--force]`): a run of its own, with the built-in undo plan
//! (`deploy/plans/undo.toml`), that takes a drill's or recovery's restore back.
//!
//! Whether there is anything to take back is read from the journal before anything starts: a
//! run that never sent a command changing live data (commit-postgres, restore-postgres,
//! restore-objects) changed nothing, and no undo run is started. Which of the two stores it
//! changed, and how far, the agents find out from what exists (the databases of its swap, the
//! records its object restore left in the repository) and report in their outputs; an agent
//! killed mid-way answers the same way when the command is re-sent.
//!
//! Refused: an unknown run, a backup (it changes nothing in the fleet), a run still going
//! (pending or running), an undo (an undo is not undone: a new drill restores again), a run an
//! earlier undo already took back, a run a later restore (not undone) replaced, and — without
//! `force` — a run that unfroze the fleet, since writes made after the unfreeze are in the
//! restored data the undo replaces and stay only in the kept copies; and a run whose kept copies
//! `rollcall kept prune` deleted (or may have: `kept::pruned_copies`). A blocked run is aborted
//! when its undo starts (the undo replaces deciding about it), so the environment holds only
//! the undo.

use anyhow::{Context, Result, bail};
use api::model::{ActionKind, ActionOutput, Outcome};
use chrono::Utc;
use serde_json::json;

use super::commands::{RunId, RunParams, UndoOf};
use super::planner::conflicts;
use super::{Engine, RunConflict};
use crate::link::AgentLink;
use crate::plan::Plan;
use crate::store::{NewRun, RunKind, RunRecord, RunState};

/// What the journal says a run changed in the live fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Changed {
    /// A command that swaps the database was sent (it may or may not have run).
    database: bool,
    /// A command that writes objects was sent.
    objects: bool,
    /// An unfreeze succeeded: traffic resumed on the restored data.
    unfrozen: bool,
}

impl<L: AgentLink + Clone + 'static> Engine<L> {
    /// Starts an undo run taking back run `id`'s restore (see the module doc); returns it.
    pub async fn start_undo(
        &self,
        id: &str,
        force: bool,
        started_by: Option<super::Starter>,
    ) -> Result<RunRecord> {
        let store = self.inner.store.clone();
        let _starting = self.inner.starting.lock().await;
        let target = store
            .run(id)
            .await?
            .with_context(|| format!("no run {id}; `rollcall runs` lists the runs to undo"))?;
        match target.kind {
            RunKind::Backup => bail!(
                "run {id} is a backup: it changed nothing in the fleet, so there is nothing to \
                 undo; `rollcall run undo` takes back a drill or a recovery"
            ),
            RunKind::Undo => bail!(
                "run {id} is itself an undo, and an undo is not undone: to have the restored \
                 data back, start a new drill or recovery (the database it replaced is kept as \
                 <db>_undone_<tag>)"
            ),
            RunKind::Drill | RunKind::Recovery => {}
        }
        if matches!(target.state, RunState::Pending | RunState::Running) {
            bail!(
                "run {id} is {}: an undo takes back a run that has stopped; wait for it \
                 (`rollcall run watch {id}`) or abort it, then undo it",
                target.state
            );
        }
        if let Some(at) = super::to_time_of(&target.params) {
            let by_provider = self
                .environment(&target.environment)
                .is_ok_and(|e| e.pitr == crate::config::Pitr::Provider);
            if by_provider {
                bail!(
                    "run {id} restored {} to {} from its managed provider's restore, which an \
                     undo cannot take back yet; no undo run was started. The database it \
                     replaced is kept on the live server as <db>_pre_{} (and the objects it \
                     changed as a versioned bucket's older versions, or in the repository's \
                     quarantine): to go back, rename that database into place",
                    target.environment,
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    repository::run_tag(id)
                );
            }
            bail!(
                "run {id} restored {} to {} by swapping the database server's data directory, \
                 which an undo cannot take back yet; no undo run was started. The data \
                 directory it replaced is kept beside the live one as <DIR>.pre_{} on the \
                 database host (and the objects it changed as a versioned bucket's older \
                 versions, or in the repository's quarantine): to go back, stop the server and \
                 rename that directory into place",
                target.environment,
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                repository::run_tag(id)
            );
        }
        let env = self.environment(&target.environment)?.clone();
        let tag = repository::run_tag(id);

        let mut changed = Changed {
            database: false,
            objects: false,
            unfrozen: false,
        };
        // The live database's name, as the agents reported it (for messages).
        let mut database = "<db>".to_owned();
        for (command, result) in store.commands(id).await? {
            if let Some(ActionOutput::CommitPostgres(out) | ActionOutput::RestorePostgres(out)) =
                result.as_ref().and_then(|r| r.output.as_ref())
            {
                database = out.database.clone();
            }
            match command.action {
                ActionKind::CommitPostgres | ActionKind::RestorePostgres => changed.database = true,
                ActionKind::RestoreObjects => changed.objects = true,
                ActionKind::Unfreeze => {
                    changed.unfrozen |= result.is_some_and(|r| r.outcome == Outcome::Succeeded);
                }
                _ => {}
            }
        }
        if !changed.database && !changed.objects {
            bail!(
                "run {id} ({}) changed nothing live: it never swapped the database or wrote \
                 an object, so there is nothing to undo and no undo run was started{}",
                target.state,
                if target.state == RunState::Blocked {
                    format!("; `rollcall run abort {id}` ends it (or retry it after a fix)")
                } else {
                    String::new()
                }
            );
        }
        let runs = store.list_runs(1000).await?;
        let undone_by = |run: &str| {
            runs.iter().find(|r| {
                r.kind == RunKind::Undo
                    && r.state == RunState::Succeeded
                    && RunParams::of(&r.params)
                        .undoes
                        .is_some_and(|u| u.run == run)
            })
        };
        if let Some(done) = undone_by(id) {
            bail!(
                "run {id} was already undone by run {}; its restore is no longer live (to have \
                 it back, start a new drill or recovery)",
                done.id
            );
        }
        if let Some(why) = self.pruned_copies(id).await? {
            bail!("run {id} cannot be undone: {why}");
        }
        // Only the newest restore still in place can be taken back: a later one replaced what
        // this one wrote, and putting this one's kept data back would skip over it.
        for later in runs.iter().filter(|r| {
            r.environment == target.environment
                && matches!(r.kind, RunKind::Drill | RunKind::Recovery)
                && r.seq > target.seq
                && undone_by(&r.id).is_none()
        }) {
            let restored = store.commands(&later.id).await?.iter().any(|(c, _)| {
                matches!(
                    c.action,
                    ActionKind::CommitPostgres
                        | ActionKind::RestorePostgres
                        | ActionKind::RestoreObjects
                )
            });
            if restored {
                bail!(
                    "run {} restored environment {} after run {id}: undo the newest restore \
                     first (`rollcall run undo {}`), then this one",
                    later.id,
                    target.environment,
                    later.id
                );
            }
        }
        if changed.unfrozen && !force {
            bail!(
                "run {id} unfroze the fleet: writes made since then are in the restored data, \
                 which the undo replaces, and would stay only in the kept copy \
                 ({database}_undone_{tag} for the database, quarantine/<undo tag>/ in the \
                 repository for objects); to undo anyway, run `rollcall run undo {id} --force`"
            );
        }
        let unfinished = store.unfinished_runs().await?;
        if let Some(other) = unfinished.iter().find(|r| {
            r.id != id && r.environment == target.environment && conflicts(RunKind::Undo, r)
        }) {
            return Err(RunConflict(format!(
                "environment {} has an unfinished {} run {} ({}); an undo cannot start next to \
                 it: finish or abort it first",
                target.environment, other.kind, other.id, other.state
            ))
            .into());
        }

        let plan = Plan::undo_plan(&env.fleet).map_err(|e| anyhow::anyhow!("{e}"))?;
        let plan = super::approving(&env, RunKind::Undo, false, plan)?;
        let now = Utc::now();
        let undo_id = RunId::new(RunKind::Undo, env.name.as_str(), now, rand::random()).to_string();
        let undoes = UndoOf {
            run: id.to_owned(),
            // A run that did not finish never brought its roles back.
            prior_of_undone: target.state != RunState::Succeeded,
        };
        let params = RunParams {
            plan: plan.name.clone(),
            undoes: Some(undoes),
            excluded: Vec::new(),
            started_by: started_by.clone(),
            restore_test: None,
        };
        let epoch = self.inner.link.epoch();
        store
            .create_run(&NewRun {
                id: undo_id.clone(),
                kind: RunKind::Undo,
                environment: env.name.to_string(),
                point_id: target.point_id.clone(),
                plan: plan.source.clone(),
                params: serde_json::to_value(&params).context("encode the undo's params")?,
                epoch,
                created_at: now,
            })
            .await?;
        self.inner
            .event(
                &undo_id,
                "run.created",
                json!({
                    "plan": plan.name,
                    "point": target.point_id,
                    "undoes": id,
                    "database_swap_sent": changed.database,
                    "objects_restore_sent": changed.objects,
                    "unfrozen": changed.unfrozen,
                    "forced": force,
                    "started_by": started_by,
                }),
            )
            .await?;
        if target.state == RunState::Blocked {
            let reason =
                format!("taken back by undo run {undo_id} (`rollcall run show {undo_id}`)");
            let at = Utc::now();
            store
                .set_run_state(id, RunState::Aborted, Some(&reason), at, epoch)
                .await?;
            self.inner.ended(
                &target,
                crate::notify::RunEvent::Finished,
                RunState::Aborted,
                Some(&reason),
                at,
            );
            self.inner
                .event(id, "run.aborted", json!({ "undo": undo_id }))
                .await?;
        }
        self.spawn_drive(undo_id.clone());
        store
            .run(&undo_id)
            .await?
            .with_context(|| format!("run {undo_id} vanished after it was created"))
    }
}
