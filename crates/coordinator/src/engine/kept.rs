//! Kept copies (`rollcall kept list|prune --env ENV`): what restores and undos kept so nothing
//! is ever destroyed — the databases they replaced (`<db>_pre_<tag>`, `<db>_undone_<tag>`, on
//! the environment's database agents) and the objects they displaced (`quarantine/<tag>/` with
//! its records, in the repository, which the coordinator opens itself) — listed with size, age
//! and run, and pruned by retention. Also listed: the copies restores prepared and never swapped
//! in (`<db>_restore_<tag>`, left by a run aborted or blocked after `prepare-postgres`), which
//! hold nothing the point does not; a prune drops one once its run is finished and never sent
//! its commit, whatever `--keep-last` says. Restores to a time keep data directories the same
//! way, on a database agent with `[postgres.physical]`: `DIR.pre_<tag>` like `_pre_`, and
//! `DIR.restore_<tag>` (or its partial build) like `_restore_`, named by their whole path.
//!
//! Each copy belongs to one restore run (drill or recovery): `_pre_<tag>` and
//! `quarantine/<tag>/` to the restore of that tag, `_undone_<tag>` to the restore an undo took
//! back, and an undo run's own quarantine to the restore it undid. Its age is measured from the
//! end of the run that made it (the restore, or the undo), as the journal has it: Postgres keeps
//! no creation time for a database, and a rename changes nothing a role may read. A quarantine
//! of a run the journal does not know is aged by its oldest object.
//!
//! [`select`] is the pure decision. Never pruned: the copies of a run the journal does not know,
//! of an unfinished run (or one an unfinished undo is taking back), of the newest finished
//! restore, of every restore an undo could still take back (newest first, past those already
//! undone, up to and including the first that changed live data), of the last `keep_last`
//! restores that changed live data, copies younger than `older_than` (or of unknown age when it
//! is given), and a database with sessions. The live database is never a kept copy (names are
//! matched exactly by the agent, `repository::kept_name`).
//!
//! A prune holds the engine's start lock, so no run or undo starts between the decision and the
//! deletions, and journals `kept.prune` on the restore run before it deletes anything and
//! `kept.pruned` after; `start_undo` refuses a run whose copies a prune deleted (or may have).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use api::model::output::{ListKeptOutput, PruneKeptOutput};
use api::model::{
    Action as AgentAction, ActionKind, ActionOutput, AgentName, Availability, CommandId, Outcome,
    ResultDetail,
};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::Engine;
use super::commands::RunParams;
use crate::link::{AgentLink, Outgoing};
use crate::store::{RunKind, RunRecord, RunState};

/// Restore runs whose copies a prune keeps when the operator names no `--keep-last`.
pub const DEFAULT_KEEP_LAST: u32 = 2;
/// How long a database agent may take to list its kept databases, and to drop them.
const LIST_DEADLINE: Duration = Duration::from_secs(60);
const PRUNE_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Journal events on a restore run: a prune is about to delete its copies / has.
pub const PRUNE_EVENT: &str = "kept.prune";
pub const PRUNED_EVENT: &str = "kept.pruned";

/// What a kept copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CopyKind {
    /// `<db>_pre_<tag>`: the database a restore replaced.
    DatabasePre,
    /// `<db>_undone_<tag>`: the restored database an undo replaced.
    DatabaseUndone,
    /// `quarantine/<tag>/` and its records: the objects a restore or undo displaced.
    Quarantine,
    /// `<db>_restore_<tag>`: the point a restore prepared and never swapped in.
    DatabasePrepared,
    /// `DIR.pre_<tag>`: the data directory a restore to a time replaced.
    DataDirPre,
    /// `DIR.restore_<tag>`: a data directory a restore to a time recovered (or began to)
    /// and never swapped in.
    DataDirPrepared,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::DatabasePre => "database_pre",
            CopyKind::DatabaseUndone => "database_undone",
            CopyKind::Quarantine => "quarantine",
            CopyKind::DatabasePrepared => "database_prepared",
            CopyKind::DataDirPre => "data_dir_pre",
            CopyKind::DataDirPrepared => "data_dir_prepared",
        }
    }

    /// A copy a restore prepared and never swapped in: it holds nothing the repository does
    /// not, so no undo needs it.
    pub fn prepared(self) -> bool {
        matches!(self, CopyKind::DatabasePrepared | CopyKind::DataDirPrepared)
    }
}

/// One kept copy, with the run it belongs to as far as the journal knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptCopy {
    pub kind: CopyKind,
    /// The database's name, or the quarantine's prefix (`quarantine/<tag>/`).
    pub name: String,
    /// The database agent holding it (databases only).
    pub agent: Option<AgentName>,
    pub tag: String,
    pub bytes: u64,
    /// A quarantine's objects and records.
    pub objects: u64,
    /// Sessions on a database when it was listed.
    pub sessions: u32,
    /// The restore run it belongs to (None: the journal knows no run of its tag).
    pub run: Option<String>,
    pub run_state: Option<RunState>,
    /// The undo run that made it (`_undone_`, an undo's quarantine) or took its restore back.
    pub undo_run: Option<String>,
    /// When the run that made it ended (see the module doc); None: unknown or still going.
    pub made_at: Option<DateTime<Utc>>,
}

/// The kept copies of one environment.
#[derive(Debug, Clone, Default)]
pub struct KeptListing {
    /// Databases first (by name), then quarantines (by tag).
    pub copies: Vec<KeptCopy>,
    /// What could not be listed.
    pub problems: Vec<String>,
}

/// What a prune decided for one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Goes (a dry run stops here).
    Prune,
    /// Stays, and why.
    Keep(String),
    /// Deleted.
    Pruned,
    /// Chosen, but the deletion failed or the agent refused it.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct PruneOutcome {
    pub decisions: Vec<(KeptCopy, Verdict)>,
    pub problems: Vec<String>,
}

/// What a prune may delete, beyond the rules that always hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneRules {
    pub keep_last: u32,
    pub older_than: Option<Duration>,
}

/// A run as the selection needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFacts {
    pub id: String,
    pub kind: RunKind,
    pub state: RunState,
    /// The journal's order of runs.
    pub seq: i64,
    /// A command that changes live data was sent (commit/restore-postgres, restore-objects).
    pub changed_live: bool,
    /// For an undo run: the restore it takes back.
    pub undoes: Option<String>,
    /// A `commit-postgres` command was sent: the agent may have swapped (or be swapping) its
    /// prepared copy in.
    pub sent_commit: bool,
}

/// Decides, for each copy, whether a prune deletes it (see the module doc). Pure: the copies
/// must carry `run`/`undo_run` as [`attribute`] sets them; `runs` are the environment's.
pub fn select(
    copies: &[KeptCopy],
    runs: &[RunFacts],
    rules: PruneRules,
    now: DateTime<Utc>,
) -> Vec<Verdict> {
    let by_id: BTreeMap<&str, &RunFacts> = runs.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut restores: Vec<&RunFacts> = runs
        .iter()
        .filter(|r| matches!(r.kind, RunKind::Drill | RunKind::Recovery))
        .collect();
    restores.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let undone = |id: &str| {
        runs.iter().any(|u| {
            u.kind == RunKind::Undo
                && u.state == RunState::Succeeded
                && u.undoes.as_deref() == Some(id)
        })
    };
    let newest_finished: Vec<&str> = [
        restores.iter().find(|r| r.state.is_final()),
        restores
            .iter()
            .find(|r| r.state.is_final() && r.changed_live),
    ]
    .into_iter()
    .flatten()
    .map(|r| r.id.as_str())
    .collect();
    // Restores an undo could take back: `start_undo` takes the newest restore not undone,
    // skipping those that changed nothing; once it is undone, the one before it.
    let mut undoable: Vec<&str> = Vec::new();
    for r in restores.iter().filter(|r| !undone(&r.id)) {
        undoable.push(&r.id);
        if r.changed_live {
            break;
        }
    }
    let last: Vec<&str> = restores
        .iter()
        .filter(|r| r.changed_live)
        .take(rules.keep_last as usize)
        .map(|r| r.id.as_str())
        .collect();

    copies
        .iter()
        .map(|copy| {
            let Some(run) = copy.run.as_deref() else {
                return Verdict::Keep(format!(
                    "no run of tag {} in the journal: drop it by hand once you know nothing \
                     needs it",
                    copy.tag
                ));
            };
            for id in [Some(run), copy.undo_run.as_deref()].into_iter().flatten() {
                match by_id.get(id) {
                    Some(r) if !r.state.is_final() => {
                        return Verdict::Keep(format!("run {id} is {}", r.state));
                    }
                    Some(_) => {}
                    None => {
                        return Verdict::Keep(format!("run {id} is not in the journal"));
                    }
                }
            }
            // An undo still going is a run of its own that names this restore.
            if let Some(u) = runs.iter().find(|u| {
                u.kind == RunKind::Undo && !u.state.is_final() && u.undoes.as_deref() == Some(run)
            }) {
                return Verdict::Keep(format!("undo run {} of it is {}", u.id, u.state));
            }
            // A prepared copy holds only the point (the repository has it): no undo ever needs
            // it, so retention by runs does not apply. Unless the run sent its commit: then the
            // database agent may be swapping it in, and it stays until the agent's listing no
            // longer shows it.
            if copy.kind.prepared() {
                if by_id.get(run).is_some_and(|r| r.sent_commit) {
                    return Verdict::Keep(format!(
                        "run {run} sent its commit: the database agent may swap it in; drop it \
                         by hand once you know no swap of {} is under way",
                        copy.tag
                    ));
                }
            } else if newest_finished.contains(&run) {
                return Verdict::Keep("the newest finished restore's".into());
            }
            if !copy.kind.prepared() && undoable.contains(&run) {
                return Verdict::Keep(format!(
                    "an undo could still need it (`rollcall run undo {run}`)"
                ));
            }
            if !copy.kind.prepared() && last.contains(&run) {
                return Verdict::Keep(format!(
                    "among the last {} restores (--keep-last)",
                    rules.keep_last
                ));
            }
            if let Some(older_than) = rules.older_than {
                match copy.made_at {
                    None => return Verdict::Keep("age unknown (--older-than)".into()),
                    Some(made) => {
                        let age = (now - made).to_std().unwrap_or_default();
                        if age < older_than {
                            return Verdict::Keep(format!(
                                "younger than {} (--older-than)",
                                humantime::format_duration(older_than)
                            ));
                        }
                    }
                }
            }
            if copy.sessions > 0 {
                return Verdict::Keep(format!("{} session(s) on it right now", copy.sessions));
            }
            Verdict::Prune
        })
        .collect()
}

/// Fills each copy's run, undo run and age from the environment's runs.
pub fn attribute(copies: &mut [KeptCopy], runs: &[RunRecord]) {
    // A restore test's teardown quarantines under a tag of its own (`<run>/teardown`): what
    // a teardown displaced belongs to its run too.
    let by_tag: BTreeMap<String, &RunRecord> = runs
        .iter()
        .flat_map(|r| {
            [
                (repository::run_tag(&r.id), r),
                (repository::run_tag(&format!("{}/teardown", r.id)), r),
            ]
        })
        .collect();
    let undoes = |r: &RunRecord| RunParams::of(&r.params).undoes.map(|u| u.run);
    let ended = |r: &RunRecord| r.finished_at.filter(|_| r.state.is_final());
    for copy in copies.iter_mut() {
        let Some(tagged) = by_tag.get(&copy.tag).copied() else {
            continue;
        };
        // The restore it belongs to, and the undo involved.
        let (restore, undo) = match tagged.kind {
            RunKind::Undo => {
                let Some(restore) = undoes(tagged) else {
                    continue;
                };
                (runs.iter().find(|r| r.id == restore), Some(tagged))
            }
            _ => {
                // The newest undo that names it (the one that made `_undone_`, or took the
                // restore back).
                let undo = runs
                    .iter()
                    .filter(|u| u.kind == RunKind::Undo && undoes(u).as_deref() == Some(&tagged.id))
                    .max_by_key(|u| u.seq);
                (Some(tagged), undo)
            }
        };
        let Some(restore) = restore else {
            continue;
        };
        copy.run = Some(restore.id.clone());
        copy.run_state = Some(restore.state);
        copy.undo_run = undo.map(|u| u.id.clone());
        let maker = match copy.kind {
            CopyKind::DatabaseUndone => undo,
            // A quarantine is its tag's run's: the restore's, or the undo's own.
            CopyKind::DatabasePre
            | CopyKind::Quarantine
            | CopyKind::DatabasePrepared
            | CopyKind::DataDirPre
            | CopyKind::DataDirPrepared => Some(tagged),
        };
        if let Some(made) = maker.and_then(ended) {
            copy.made_at = Some(made);
        }
    }
}

impl<L: AgentLink + Clone + 'static> Engine<L> {
    /// The kept copies of `environment` (see the module doc).
    pub async fn list_kept(&self, environment: &str) -> Result<KeptListing> {
        let env = self.environment(environment)?.clone();
        let mut listing = KeptListing::default();
        // An environment without a database (objects only) keeps quarantines alone.
        let agents = if env.fleet.get("database").copied().unwrap_or(0) > 0 {
            self.database_agents(env.name.as_str(), &mut listing.problems)
        } else {
            Vec::new()
        };
        for agent in &agents {
            match self.agent_kept(agent).await {
                Ok(out) => listing
                    .copies
                    .extend(out.kept.into_iter().map(|db| KeptCopy {
                        kind: match db.kind {
                            repository::KeptKind::Pre => CopyKind::DatabasePre,
                            repository::KeptKind::Undone => CopyKind::DatabaseUndone,
                            repository::KeptKind::Prepared => CopyKind::DatabasePrepared,
                            repository::KeptKind::DataDirPre => CopyKind::DataDirPre,
                            repository::KeptKind::DataDirPrepared => CopyKind::DataDirPrepared,
                        },
                        name: db.name,
                        agent: Some(agent.clone()),
                        tag: db.tag,
                        bytes: db.bytes,
                        objects: 0,
                        sessions: db.sessions,
                        run: None,
                        run_state: None,
                        undo_run: None,
                        made_at: None,
                    })),
                Err(e) => listing.problems.push(format!(
                    "database agent {agent}: kept databases not listed: {e:#}"
                )),
            }
        }
        let repo = env.repository_ref.open().await?;
        let quarantines = repo.list_quarantines().await?;
        listing
            .copies
            .extend(quarantines.into_iter().map(|q| KeptCopy {
                kind: CopyKind::Quarantine,
                name: q.prefix(),
                agent: None,
                bytes: q.bytes + q.record_bytes,
                objects: q.objects + q.records,
                tag: q.tag,
                sessions: 0,
                run: None,
                run_state: None,
                undo_run: None,
                made_at: q.oldest,
            }));
        let runs = self.environment_runs(env.name.as_str()).await?;
        // A restore test keeps its quarantines in its source's repository: each environment
        // sharing those points lists (and prunes) only its own, never the others' runs'.
        let others = self.sharing_tags(&env).await?;
        listing
            .copies
            .retain(|c| c.kind != CopyKind::Quarantine || !others.contains(&c.tag));
        // A quarantine's oldest object stands in for its age only when no run is known.
        for copy in listing.copies.iter_mut().filter(|c| {
            c.kind == CopyKind::Quarantine
                && runs.iter().any(|r| repository::run_tag(&r.id) == c.tag)
        }) {
            copy.made_at = None;
        }
        attribute(&mut listing.copies, &runs);
        Ok(listing)
    }

    /// Deletes the kept copies of `environment` that [`select`] lets go (none on a dry run).
    pub async fn prune_kept(
        &self,
        environment: &str,
        dry_run: bool,
        rules: PruneRules,
    ) -> Result<PruneOutcome> {
        // No run or undo starts between the decision and the deletions.
        let _starting = self.inner.starting.lock().await;
        let listing = self.list_kept(environment).await?;
        if !listing.problems.is_empty() && !dry_run {
            bail!(
                "nothing pruned: {}; prune again once every database agent of {environment} \
                 answers (`rollcall agents`)",
                listing.problems.join("; ")
            );
        }
        let runs = self.environment_runs(environment).await?;
        let mut facts = Vec::with_capacity(runs.len());
        for r in &runs {
            let restore = matches!(r.kind, RunKind::Drill | RunKind::Recovery);
            let sent: Vec<ActionKind> = if restore {
                self.inner
                    .store
                    .commands(&r.id)
                    .await?
                    .iter()
                    .map(|(c, _)| c.action)
                    .collect()
            } else {
                Vec::new()
            };
            let changed_live = sent.iter().any(|a| {
                matches!(
                    a,
                    ActionKind::CommitPostgres
                        | ActionKind::RestorePostgres
                        | ActionKind::RestoreObjects
                )
            });
            let sent_commit = sent
                .iter()
                .any(|a| matches!(a, ActionKind::CommitPostgres | ActionKind::RestorePostgres));
            facts.push(RunFacts {
                id: r.id.clone(),
                kind: r.kind,
                state: r.state,
                seq: r.seq,
                changed_live,
                undoes: RunParams::of(&r.params).undoes.map(|u| u.run),
                sent_commit,
            });
        }
        let verdicts = select(&listing.copies, &facts, rules, Utc::now());
        let mut decisions: Vec<(KeptCopy, Verdict)> =
            listing.copies.into_iter().zip(verdicts).collect();
        let mut problems = listing.problems;
        if dry_run {
            return Ok(PruneOutcome {
                decisions,
                problems,
            });
        }

        // Journal the intent on each restore run before anything is deleted.
        let mut by_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (copy, verdict) in &decisions {
            if let (Verdict::Prune, Some(run)) = (verdict, &copy.run) {
                by_run
                    .entry(run.clone())
                    .or_default()
                    .push(copy.name.clone());
            }
        }
        for (run, names) in &by_run {
            self.inner
                .event(run, PRUNE_EVENT, json!({ "copies": names }))
                .await?;
        }

        // Databases, per agent.
        let mut per_agent: BTreeMap<AgentName, Vec<String>> = BTreeMap::new();
        for (copy, verdict) in &decisions {
            if let (Verdict::Prune, Some(agent)) = (verdict, &copy.agent) {
                per_agent
                    .entry(agent.clone())
                    .or_default()
                    .push(copy.name.clone());
            }
        }
        let mut outcome: BTreeMap<String, Verdict> = BTreeMap::new();
        // Copies that may be gone although no one said so: the agent's answer was lost, or a
        // quarantine's deletion stopped part way. An agent's refusal is certain (it refuses
        // before `DROP DATABASE`, which either drops or does not).
        let mut uncertain: Vec<String> = Vec::new();
        for (agent, names) in per_agent {
            match self.agent_prune(&agent, names.clone()).await {
                Ok(out) => {
                    for name in out.dropped.into_iter().chain(out.gone) {
                        outcome.insert(name, Verdict::Pruned);
                    }
                    for refusal in out.refused {
                        outcome.insert(refusal.database, Verdict::Failed(refusal.reason));
                    }
                }
                Err(e) => {
                    for name in names {
                        outcome.insert(name.clone(), Verdict::Failed(format!("{e:#}")));
                        uncertain.push(name);
                    }
                }
            }
        }
        // Quarantines, from the repository.
        let env = self.environment(environment)?.clone();
        let repo = env.repository_ref.open().await?;
        for (copy, verdict) in &decisions {
            if *verdict == Verdict::Prune && copy.kind == CopyKind::Quarantine {
                let result = match repo.delete_quarantine(&copy.tag).await {
                    Ok(_) => Verdict::Pruned,
                    Err(e) => {
                        uncertain.push(copy.name.clone());
                        Verdict::Failed(format!("{e:#}"))
                    }
                };
                outcome.insert(copy.name.clone(), result);
            }
        }
        for (copy, verdict) in &mut decisions {
            if *verdict == Verdict::Prune {
                *verdict = outcome.remove(&copy.name).unwrap_or_else(|| {
                    Verdict::Failed("the database agent did not report it".into())
                });
            }
        }
        for (run, _) in by_run {
            let of_run = |want: fn(&Verdict) -> bool| -> Vec<String> {
                decisions
                    .iter()
                    .filter(|(c, v)| c.run.as_deref() == Some(run.as_str()) && want(v))
                    .map(|(c, _)| c.name.clone())
                    .collect()
            };
            let deleted = of_run(|v| *v == Verdict::Pruned);
            let failed = of_run(|v| matches!(v, Verdict::Failed(_)));
            let maybe: Vec<&String> = failed.iter().filter(|n| uncertain.contains(n)).collect();
            if let Err(e) = self
                .inner
                .event(
                    &run,
                    PRUNED_EVENT,
                    json!({ "deleted": deleted, "failed": failed, "uncertain": maybe }),
                )
                .await
            {
                problems.push(format!("journal what was pruned of run {run}: {e:#}"));
            }
        }
        for (copy, verdict) in &decisions {
            match verdict {
                Verdict::Pruned => tracing::info!(copy = %copy.name, "kept copy pruned"),
                Verdict::Failed(why) => {
                    tracing::warn!(copy = %copy.name, "kept copy not pruned: {why}");
                }
                _ => {}
            }
        }
        Ok(PruneOutcome {
            decisions,
            problems,
        })
    }

    /// Why run `id`'s kept copies cannot be used by an undo, if a prune deleted them (or may
    /// have: one was interrupted).
    pub(super) async fn pruned_copies(&self, id: &str) -> Result<Option<String>> {
        let events = self.inner.store.events(id, 0, 100_000).await?;
        let mut asked: Option<Vec<String>> = None;
        let mut deleted = Vec::new();
        for e in events {
            let names = |key: &str| -> Vec<String> {
                e.payload[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            match e.kind.as_str() {
                PRUNE_EVENT => asked = Some(names("copies")),
                PRUNED_EVENT => {
                    asked = None;
                    deleted.extend(names("deleted"));
                    deleted.extend(names("uncertain"));
                }
                _ => {}
            }
        }
        Ok(if !deleted.is_empty() {
            Some(format!(
                "its kept copies were pruned (`rollcall kept prune`: {}), so there is nothing \
                 (or not all) to put back; to have that data again, restore a recovery point \
                 (`rollcall drill` or a recovery)",
                deleted.join(", ")
            ))
        } else {
            asked.map(|names| {
                format!(
                    "a prune of its kept copies ({}) was interrupted and may have deleted them; \
                     check `rollcall kept list --env ENV` and restore a recovery point instead",
                    names.join(", ")
                )
            })
        })
    }

    /// The quarantine tags of the runs of every other environment whose points are the same
    /// as `env`'s (a restore test and its source, or two restore tests of one source): a run's
    /// own tag and its teardown's (`agent/src/data/objects.rs` `teardown_objects`).
    async fn sharing_tags(
        &self,
        env: &crate::config::Environment,
    ) -> Result<std::collections::BTreeSet<String>> {
        let owner = super::points::points_of(env);
        let sharing: Vec<&str> = self
            .inner
            .environments
            .values()
            .filter(|e| e.name != env.name && super::points::points_of(e) == owner)
            .map(|e| e.name.as_str())
            .collect();
        if sharing.is_empty() {
            return Ok(Default::default());
        }
        Ok(self
            .inner
            .store
            .list_runs(u32::MAX)
            .await?
            .into_iter()
            .filter(|r| sharing.contains(&r.environment.as_str()))
            .flat_map(|r| {
                [
                    repository::run_tag(&r.id),
                    repository::run_tag(&format!("{}/teardown", r.id)),
                ]
            })
            .collect())
    }

    /// The environment's runs, oldest first.
    async fn environment_runs(&self, environment: &str) -> Result<Vec<RunRecord>> {
        let mut runs: Vec<RunRecord> = self
            .inner
            .store
            .list_runs(u32::MAX)
            .await?
            .into_iter()
            .filter(|r| r.environment == environment)
            .collect();
        runs.sort_by_key(|r| r.seq);
        Ok(runs)
    }

    /// The environment's database agents (those with `[postgres]`); a problem for each that is
    /// not attached or does not know the kept-copy actions.
    fn database_agents(&self, environment: &str, problems: &mut Vec<String>) -> Vec<AgentName> {
        let mut out = Vec::new();
        let mut any = false;
        for a in self.inner.directory.agents() {
            if a.environment.as_str() != environment
                || !a.capabilities.iter().any(|c| c == "undo-postgres")
            {
                continue;
            }
            any = true;
            if a.availability != Availability::Connected {
                problems.push(format!(
                    "database agent {} is not attached: its kept databases are not listed",
                    a.name
                ));
            } else if !a.capabilities.iter().any(|c| c == "list-kept") {
                problems.push(format!(
                    "database agent {} (version {}) predates kept copies: upgrade it to list \
                     and prune its kept databases",
                    a.name, a.version
                ));
            } else {
                out.push(a.name.clone());
            }
        }
        if !any {
            problems.push(format!(
                "no database agent of environment {environment} has attached since the \
                 coordinator started: kept databases are not listed"
            ));
        }
        out
    }

    async fn agent_kept(&self, agent: &AgentName) -> Result<ListKeptOutput> {
        match self
            .ad_hoc(agent, "list", AgentAction::ListKept, LIST_DEADLINE)
            .await?
        {
            ActionOutput::ListKept(out) => Ok(out),
            other => bail!("answered list-kept with {} output", other.kind()),
        }
    }

    async fn agent_prune(
        &self,
        agent: &AgentName,
        databases: Vec<String>,
    ) -> Result<PruneKeptOutput> {
        match self
            .ad_hoc(
                agent,
                "prune",
                AgentAction::PruneKept { databases },
                PRUNE_DEADLINE,
            )
            .await?
        {
            ActionOutput::PruneKept(out) => Ok(out),
            other => bail!("answered prune-kept with {} output", other.kind()),
        }
    }

    /// Sends one command outside any run (its id is fresh: it is never re-sent) and decodes
    /// its output.
    async fn ad_hoc(
        &self,
        agent: &AgentName,
        what: &str,
        action: AgentAction,
        within: Duration,
    ) -> Result<ActionOutput> {
        let link = &self.inner.link;
        let id = format!(
            "kept/{}/{what}/{agent}/{:016x}",
            link.epoch(),
            rand::random::<u64>()
        );
        let kind = action.kind();
        let command = Outgoing {
            id: CommandId::parse(&id).map_err(|e| anyhow::anyhow!("{e}"))?,
            run_id: String::new(),
            deadline: api::model::add_saturating(SystemTime::now(), within),
            action,
        };
        let result = link
            .send(agent, command)
            .await
            .with_context(|| format!("send {kind} to {agent}"))?;
        if result.outcome != Outcome::Succeeded {
            bail!("{kind} {}: {}", result.outcome, result.message);
        }
        match result.detail {
            Some(ResultDetail::Output(o)) => {
                ActionOutput::decode(kind, &o).map_err(|e| anyhow::anyhow!("{e}"))
            }
            _ => bail!("{kind} reported no output"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, kind: RunKind, state: RunState, seq: i64, changed: bool) -> RunFacts {
        RunFacts {
            id: id.into(),
            kind,
            state,
            seq,
            changed_live: changed,
            undoes: None,
            sent_commit: changed,
        }
    }

    fn drill(id: &str, seq: i64) -> RunFacts {
        run(id, RunKind::Drill, RunState::Succeeded, seq, true)
    }

    fn undo(id: &str, of: &str, state: RunState, seq: i64) -> RunFacts {
        RunFacts {
            undoes: Some(of.into()),
            ..run(id, RunKind::Undo, state, seq, false)
        }
    }

    fn pre(run: &str, days_ago: i64) -> KeptCopy {
        KeptCopy {
            kind: CopyKind::DatabasePre,
            name: format!("cowork_pre_{}", repository::run_tag(run)),
            agent: Some(AgentName::parse("db-1").expect("name")),
            tag: repository::run_tag(run),
            bytes: 1,
            objects: 0,
            sessions: 0,
            run: Some(run.into()),
            run_state: Some(RunState::Succeeded),
            undo_run: None,
            made_at: Some(Utc::now() - chrono::Duration::days(days_ago)),
        }
    }

    fn rules(keep_last: u32) -> PruneRules {
        PruneRules {
            keep_last,
            older_than: None,
        }
    }

    fn pruned(copies: &[KeptCopy], runs: &[RunFacts], rules: PruneRules) -> Vec<String> {
        select(copies, runs, rules, Utc::now())
            .into_iter()
            .zip(copies)
            .filter(|(v, _)| *v == Verdict::Prune)
            .map(|(_, c)| c.run.clone().unwrap_or_default())
            .collect()
    }

    fn prepared(run: &str) -> KeptCopy {
        KeptCopy {
            kind: CopyKind::DatabasePrepared,
            name: format!("cowork_restore_{}", repository::run_tag(run)),
            ..pre(run, 1)
        }
    }

    #[test]
    fn a_prepared_copy_goes_once_its_run_ended_without_a_commit_whatever_retention_says() {
        let aborted = |id: &str, seq| run(id, RunKind::Drill, RunState::Aborted, seq, false);
        let runs = [
            drill("d1", 1),
            aborted("a2", 2),
            // Blocked after its prepare: a retry still needs the copy.
            run("b3", RunKind::Drill, RunState::Blocked, 3, false),
            // Aborted after its commit went out: the agent may be swapping it in.
            RunFacts {
                sent_commit: true,
                ..aborted("c4", 4)
            },
            aborted("a5", 5),
        ];
        let copies = [
            prepared("a2"),
            prepared("b3"),
            prepared("c4"),
            prepared("a5"),
        ];
        // a5 is the newest run and a2 among the last two restores: neither rule keeps a
        // prepared copy.
        assert_eq!(
            pruned(&copies, &runs, rules(DEFAULT_KEEP_LAST)),
            ["a2", "a5"]
        );
        // A data directory a restore to a time recovered and never swapped in: the same.
        let dirs = copies.clone().map(|c| KeptCopy {
            kind: CopyKind::DataDirPrepared,
            ..c
        });
        assert_eq!(pruned(&dirs, &runs, rules(DEFAULT_KEEP_LAST)), ["a2", "a5"]);
        // The directory a swap replaced is kept like a replaced database (the newest's).
        let replaced = KeptCopy {
            kind: CopyKind::DataDirPre,
            ..prepared("a5")
        };
        assert!(matches!(
            &select(&[replaced], &runs, rules(0), Utc::now())[0],
            Verdict::Keep(why) if why.contains("newest")
        ));
        let verdicts = select(&copies, &runs, rules(DEFAULT_KEEP_LAST), Utc::now());
        assert_eq!(verdicts[1], Verdict::Keep("run b3 is blocked".into()));
        assert!(
            matches!(&verdicts[2], Verdict::Keep(why) if why.contains("sent its commit")),
            "{:?}",
            verdicts[2]
        );
        // --older-than and sessions still hold.
        let young = select(
            &copies,
            &runs,
            PruneRules {
                keep_last: 0,
                older_than: Some(Duration::from_secs(7 * 86_400)),
            },
            Utc::now(),
        );
        assert!(matches!(&young[0], Verdict::Keep(why) if why.contains("younger")));
        let busy = KeptCopy {
            sessions: 1,
            ..prepared("a2")
        };
        assert!(matches!(
            &select(&[busy], &runs, rules(0), Utc::now())[0],
            Verdict::Keep(why) if why.contains("session")
        ));
    }

    #[test]
    fn by_default_the_copies_of_the_last_two_restores_stay() {
        let runs = [
            drill("d1", 1),
            drill("d2", 2),
            drill("d3", 3),
            drill("d4", 4),
        ];
        let copies: Vec<_> = ["d1", "d2", "d3", "d4"].map(|r| pre(r, 1)).into();
        assert_eq!(
            pruned(&copies, &runs, rules(DEFAULT_KEEP_LAST)),
            ["d1", "d2"]
        );
        let verdicts = select(&copies, &runs, rules(DEFAULT_KEEP_LAST), Utc::now());
        assert_eq!(
            verdicts[3],
            Verdict::Keep("the newest finished restore's".into())
        );
        assert!(
            matches!(&verdicts[2], Verdict::Keep(why) if why.contains("--keep-last")),
            "{verdicts:?}"
        );
    }

    #[test]
    fn keep_last_zero_still_keeps_the_newest_and_what_an_undo_needs() {
        let runs = [drill("d1", 1), drill("d2", 2), drill("d3", 3)];
        let copies: Vec<_> = ["d1", "d2", "d3"].map(|r| pre(r, 1)).into();
        assert_eq!(pruned(&copies, &runs, rules(0)), ["d1", "d2"]);

        // d3 undone: d2 is what the next undo takes back, so it stays too.
        let mut runs = runs.to_vec();
        runs.push(undo("u3", "d3", RunState::Succeeded, 4));
        assert_eq!(pruned(&copies, &runs, rules(0)), ["d1"]);
    }

    #[test]
    fn a_newer_restore_that_changed_nothing_does_not_unprotect_the_one_an_undo_needs() {
        // d3 failed in preflight: an undo would take d2 back.
        let runs = [
            drill("d1", 1),
            drill("d2", 2),
            run("d3", RunKind::Drill, RunState::Failed, 3, false),
        ];
        let copies: Vec<_> = ["d1", "d2"].map(|r| pre(r, 1)).into();
        assert_eq!(pruned(&copies, &runs, rules(0)), ["d1"]);
    }

    #[test]
    fn unfinished_runs_keep_their_copies_and_those_they_undo() {
        let runs = [
            run("d1", RunKind::Drill, RunState::Blocked, 1, true),
            drill("d2", 2),
            drill("d3", 3),
            drill("d4", 4),
            drill("d5", 5),
            undo("u2", "d2", RunState::Running, 6),
        ];
        let copies: Vec<_> = ["d1", "d2", "d3"].map(|r| pre(r, 1)).into();
        let verdicts = select(&copies, &runs, rules(0), Utc::now());
        assert_eq!(verdicts[0], Verdict::Keep("run d1 is blocked".into()));
        assert!(
            matches!(&verdicts[1], Verdict::Keep(why) if why.contains("undo run u2")),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[2], Verdict::Prune);
    }

    #[test]
    fn copies_of_unknown_runs_with_sessions_or_too_young_stay() {
        let runs = [drill("d1", 1), drill("d2", 2), drill("d3", 3)];
        let mut unknown = pre("d0", 30);
        unknown.run = None;
        let mut busy = pre("d1", 30);
        busy.sessions = 2;
        let young = pre("d2", 1);
        let copies = [unknown, busy, young];
        let verdicts = select(
            &copies,
            &runs,
            PruneRules {
                keep_last: 0,
                older_than: Some(Duration::from_secs(7 * 86_400)),
            },
            Utc::now(),
        );
        assert!(matches!(&verdicts[0], Verdict::Keep(why) if why.contains("by hand")));
        assert!(matches!(&verdicts[1], Verdict::Keep(why) if why.contains("2 session(s)")));
        assert!(matches!(&verdicts[2], Verdict::Keep(why) if why.contains("younger than 7days")));

        let mut old = pre("d2", 8);
        assert_eq!(
            select(
                std::slice::from_ref(&old),
                &runs,
                PruneRules {
                    keep_last: 0,
                    older_than: Some(Duration::from_secs(7 * 86_400)),
                },
                Utc::now()
            ),
            [Verdict::Prune]
        );
        old.made_at = None;
        assert!(matches!(
            &select(
                &[old],
                &runs,
                PruneRules {
                    keep_last: 0,
                    older_than: Some(Duration::from_secs(60)),
                },
                Utc::now()
            )[0],
            Verdict::Keep(why) if why.contains("age unknown")
        ));
    }

    fn record(id: &str, kind: RunKind, seq: i64, undoes: Option<&str>) -> RunRecord {
        let at = Utc::now() - chrono::Duration::hours(10 - seq);
        RunRecord {
            id: id.into(),
            kind,
            environment: "prod".into(),
            point_id: None,
            plan: String::new(),
            params: match undoes {
                Some(run) => {
                    json!({ "plan": "undo", "undoes": { "run": run, "prior_of_undone": false } })
                }
                None => json!({}),
            },
            state: RunState::Succeeded,
            reason: None,
            epoch: api::model::Epoch::new(1).expect("epoch"),
            created_at: at,
            updated_at: at,
            finished_at: Some(at),
            seq,
        }
    }

    #[test]
    fn copies_belong_to_the_restore_they_keep_data_of() {
        let runs = [
            record("d1", RunKind::Drill, 1, None),
            record("u1", RunKind::Undo, 2, Some("d1")),
        ];
        let copy = |kind, tag: &str| KeptCopy {
            kind,
            name: tag.into(),
            agent: None,
            tag: repository::run_tag(tag),
            bytes: 0,
            objects: 0,
            sessions: 0,
            run: None,
            run_state: None,
            undo_run: None,
            made_at: None,
        };
        let mut copies = vec![
            copy(CopyKind::DatabaseUndone, "d1"),
            copy(CopyKind::Quarantine, "d1"),
            copy(CopyKind::Quarantine, "u1"),
            copy(CopyKind::Quarantine, "elsewhere"),
            // What a restore test's teardown displaced, under `<run>/teardown`'s tag.
            copy(CopyKind::Quarantine, "d1/teardown"),
        ];
        attribute(&mut copies, &runs);
        let got: Vec<_> = copies
            .iter()
            .map(|c| (c.run.as_deref(), c.undo_run.as_deref(), c.made_at))
            .collect();
        let (d1, u1) = (runs[0].finished_at, runs[1].finished_at);
        assert_eq!(
            got,
            [
                (Some("d1"), Some("u1"), u1),
                (Some("d1"), Some("u1"), d1),
                (Some("d1"), Some("u1"), u1),
                (None, None, None),
                (Some("d1"), Some("u1"), d1),
            ]
        );
    }
}
