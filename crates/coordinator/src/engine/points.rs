//! Recovery points as runs see them: the point a restore uses (resolved before the run
//! exists), the point a backup run commits from its agents' outputs, retention and the
//! point-age metric.

use anyhow::{Context, Result, bail};
use api::model::{ActionOutput, Outcome};

use super::commands::RunContext;
use super::{Engine, Inner};
use crate::config::Environment;
use crate::link::AgentLink;
use crate::plan::{Action, Plan};
use crate::store::RunKind;

impl<L: AgentLink + Clone + 'static> Engine<L> {
    /// Refuses a run to a time (`--to-time`) that cannot restore there, before anything is
    /// journaled or sent: a time outside the environment's recoverable window (its base
    /// backups taken with `--env` and the WAL archived after them), a point named too, a kind
    /// or plan that cannot restore to a time. Returns the window; none for an environment
    /// restored to a time by its managed provider (`pitr = "provider"`), whose window only
    /// the database agent's adapter knows: its preflight refuses a time outside it.
    pub(super) async fn check_to_time(
        &self,
        env: &Environment,
        request: &super::StartRun,
        plan: &Plan,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<repository::RecoveryWindow>> {
        let shown = at.to_rfc3339();
        if request.point_id.is_some() {
            bail!("--to-time {shown} and --point both name what to restore: give one of them");
        }
        if !matches!(request.kind, RunKind::Drill | RunKind::Recovery) {
            bail!(
                "--to-time is for drills and recoveries, not a {}",
                request.kind
            );
        }
        if let Some(test) = &env.restore_test {
            bail!(
                "environment {} is a restore test of {}: it restores {}'s points \
                 (`--point`), not to a time",
                env.name,
                test.source,
                test.source
            );
        }
        if let Some(phase) = plan
            .phases
            .iter()
            .find(|p| p.action == Action::RestorePostgres)
        {
            bail!(
                "plan {} restores Postgres in one phase ({}, restore-postgres); a restore to a \
                 time prepares the recovered data directory while the server still serves and \
                 swaps it in later: use a plan with prepare-postgres and commit-postgres (the \
                 default plan)",
                plan.name,
                phase.name
            );
        }
        if env.pitr == crate::config::Pitr::Provider {
            return Ok(None);
        }
        let repo = env.repository_ref.open().await?;
        let mut bases = repository::list_base_backups(&repo).await?;
        bases.retain(|b| b.env.as_deref() == Some(env.name.as_str()));
        let window = repository::recovery_window(&repo, &bases)
            .await?
            .with_context(|| {
                format!(
                    "environment {} has no base backup in {} to restore to {shown} from: take \
                     one with `rollcall repo base-backup --repo URL --database-url URL --env {}` \
                     (the server must archive its WAL with `rollcall repo wal-push`)",
                    env.name, env.repository, env.name
                )
            })?;
        if at < window.earliest || at > window.latest {
            let gap = window
                .gap_at
                .as_ref()
                .map(|g| format!("; the archive misses segment {g}"))
                .unwrap_or_default();
            bail!(
                "{shown} is outside environment {}'s recoverable window, {} .. {} ({} base \
                 backups, WAL archived up to segment {}{gap}): pick a time inside it \
                 (`rollcall points --env {}` shows the window); nothing was started",
                env.name,
                window.earliest.to_rfc3339(),
                window.latest.to_rfc3339(),
                window.base_backups,
                window.newest_segment,
                env.name
            );
        }
        Ok(Some(window))
    }

    /// Reads each environment's newest recovery point (in commit order) once, for the
    /// point-age metric.
    pub async fn observe_points(&self) {
        // A restore-test environment's points are its source's, observed under the source.
        for (name, env) in self
            .inner
            .environments
            .iter()
            .filter(|(_, e)| e.restore_test.is_none())
        {
            let newest = match env.repository_ref.open().await {
                Ok(repo) => repo
                    .list_points(Some(name))
                    .await
                    .map(|l| l.points.last().cloned()),
                Err(e) => Err(e),
            };
            match newest {
                Ok(Some(p)) => self.inner.metrics.point(
                    name,
                    p.sequence,
                    p.created_at.timestamp(),
                    env.rpo.as_secs(),
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(environment = %name, "cannot list recovery points: {e:#}"),
            }
        }
    }

    /// Reads each environment's recoverable window (its base backups, taken with `--env`,
    /// and the WAL archived after them) for the RPO gauges (`rollcall_wal_newest_age_seconds`,
    /// `rollcall_recoverable_*`, `rollcall_wal_gap`). Called every observe interval: it costs
    /// one listing of `base/` (and a read of each base backup's record) and one of `wal/`
    /// per environment with base backups, no WAL record read (only the history files of
    /// timelines newer than the newest base backup's; bench/README.md has the figure for
    /// 10,000 segments). An environment without base backups has no such series.
    pub async fn observe_wal(&self, within: std::time::Duration) {
        // Each environment on its own, within one interval: an unreachable repository (its
        // retries) never holds up the others' observations.
        let observations = self
            .inner
            .environments
            .iter()
            .filter(|(_, e)| e.restore_test.is_none())
            .map(|(name, env)| async move {
                let window = async {
                    let repo = env.repository_ref.open().await?;
                    let mut bases = repository::list_base_backups(&repo).await?;
                    bases.retain(|b| b.env.as_deref() == Some(name.as_str()));
                    repository::recovery_window(&repo, &bases).await
                };
                match tokio::time::timeout(within, window).await {
                    Ok(Ok(window)) => self.inner.metrics.window(
                        name,
                        window.map(|w| crate::metrics::ObservedWindow {
                            from: w.earliest.timestamp(),
                            until: w.latest.timestamp(),
                            gap: w.gap_at.is_some(),
                        }),
                    ),
                    Ok(Err(e)) => tracing::warn!(
                        environment = %name,
                        "cannot read the recoverable window: {e:#}"
                    ),
                    Err(_) => tracing::warn!(
                        environment = %name,
                        "the recoverable window was not read within {} s (observe_interval)",
                        within.as_secs()
                    ),
                }
            });
        futures::future::join_all(observations).await;
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
        let repo = env.repository_ref.open().await?;
        repo.prune(&options).await
    }

    /// Verifies a point in its environment's repository.
    pub async fn verify_point(&self, id: &str, full: bool) -> Result<repository::VerifyReport> {
        let point = repository::PointId::parse(id)?;
        let env = self.environment(point.environment())?;
        let repo = env.repository_ref.open().await?;
        repo.verify_point(&point, full).await
    }

    /// The point a restore uses: `latest` is the newest point in commit order (the last one
    /// committed, whatever its stamp says) of the environment whose points it restores (its
    /// own, or a restore-test environment's source); an id must exist and belong to that
    /// environment. Checked before the run exists, so a bad id touches nothing.
    pub(super) async fn resolve_point(
        &self,
        env: &Environment,
        point: Option<&str>,
    ) -> Result<String> {
        let owner = points_of(env);
        let Some(point) = point else {
            bail!(
                "this plan restores data: name the recovery point with --point ID or --point latest \
                 (`rollcall points --env {owner}` lists them)"
            );
        };
        let repo = env.repository_ref.open().await?;
        if point == "latest" {
            let listing = repo.list_points(Some(owner)).await?;
            return listing
                .points
                .last()
                .map(|p| p.id.to_string())
                .ok_or_else(|| {
                    NoPoint(format!(
                        "environment {owner} has no recovery points yet; take one with `rollcall \
                         backup --env {owner}`"
                    ))
                    .into()
                });
        }
        let id = repository::PointId::parse(point).with_context(|| {
            format!(
                "--point {point:?} is not a point id (`rollcall points --env {owner}` lists them)"
            )
        })?;
        // A point of another environment is refused before its repository is read.
        if id.environment() != owner {
            bail!(cross_environment(
                &self.inner.environments,
                env,
                point,
                id.environment()
            ));
        }
        let found = repo.read_point(&id).await.with_context(|| {
            format!(
                "recovery point {point} cannot be used (`rollcall points --env {owner}` lists them)"
            )
        })?;
        if found.environment != owner {
            bail!(cross_environment(
                &self.inner.environments,
                env,
                point,
                &found.environment
            ));
        }
        Ok(id.to_string())
    }

    /// Picks a random point of `environment`'s source committed within `window` before `now`
    /// (`random-within`), with `choose(n)` giving an index below `n`.
    pub async fn random_point(
        &self,
        environment: &str,
        window: std::time::Duration,
        now: chrono::DateTime<chrono::Utc>,
        choose: impl FnOnce(usize) -> usize,
    ) -> Result<String> {
        let env = self.environment(environment)?;
        let owner = points_of(env);
        let repo = env.repository_ref.open().await?;
        let listing = repo.list_points(Some(owner)).await?;
        let stamps: Vec<(String, chrono::DateTime<chrono::Utc>)> = listing
            .points
            .iter()
            .map(|p| (p.id.to_string(), p.created_at))
            .collect();
        pick_within(&stamps, window, now, choose).ok_or_else(|| {
            NoPoint(format!(
                "environment {owner} has no recovery point committed in the last {} \
                 (random-within); take one with `rollcall backup --env {owner}` or widen the window",
                humantime::format_duration(window)
            ))
            .into()
        })
    }
}

/// No point to restore: the environment has none yet, or none within a restore test's
/// `random-within` window. A scheduled restore test records it as a failed run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoPoint(pub String);

/// Whose points a run of `env` restores: a restore-test environment's source's, else its own.
pub(super) fn points_of(env: &Environment) -> &str {
    match &env.restore_test {
        Some(test) => test.source.as_str(),
        None => env.name.as_str(),
    }
}

/// Why a point of `owner` cannot be restored into `env`: only a restore-test environment
/// whose `restore_from` names `owner` takes another environment's points.
fn cross_environment(
    environments: &std::collections::BTreeMap<String, Environment>,
    env: &Environment,
    point: &str,
    owner: &str,
) -> String {
    let testers: Vec<&str> = environments
        .values()
        .filter(|e| e.restore_test.as_ref().is_some_and(|t| t.source == owner))
        .map(|e| e.name.as_str())
        .collect();
    let into = match &env.restore_test {
        Some(test) => format!(
            "{} is a restore test of {} and restores only {}'s points",
            env.name, test.source, test.source
        ),
        None => format!(
            "a drill of {} restores only {}'s own points",
            env.name, env.name
        ),
    };
    let elsewhere = if testers.is_empty() {
        format!(
            "a point of {owner} is restored into another environment only when that one says \
             restore_from = \"{owner}\""
        )
    } else {
        format!("to test it, drill {}", testers.join(" or "))
    };
    format!(
        "recovery point {point} belongs to environment {owner}, not {}: {into}; {elsewhere}",
        points_of(env)
    )
}

/// The id of a point chosen by `choose` among `points` (id, commit stamp) created within
/// `window` before `now`; None when none was.
pub(crate) fn pick_within(
    points: &[(String, chrono::DateTime<chrono::Utc>)],
    window: std::time::Duration,
    now: chrono::DateTime<chrono::Utc>,
    choose: impl FnOnce(usize) -> usize,
) -> Option<String> {
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let since = now
        .checked_sub_signed(window)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let within: Vec<&String> = points
        .iter()
        .filter(|(_, at)| *at >= since && *at <= now)
        .map(|(id, _)| id)
        .collect();
    if within.is_empty() {
        return None;
    }
    let i = choose(within.len()).min(within.len() - 1);
    Some(within[i].clone())
}

impl<L: AgentLink + Clone + 'static> Inner<L> {
    /// After a base-backup phase passed: the base backup its agent reported, journaled as a
    /// `base_backup.taken` event (id, environment, when it is consistent, size, WAL range) and
    /// named in the phase's detail, so `run show` and the run's events say what it took.
    pub(super) async fn base_backup_taken(
        &self,
        run_id: &str,
        phase: &crate::plan::Phase,
    ) -> Result<(bool, String)> {
        let commands = self.store.commands(run_id).await?;
        let taken = commands.iter().rev().find_map(|(c, r)| {
            r.as_ref()
                .filter(|r| c.phase_index == phase.index as u32 && r.outcome == Outcome::Succeeded)
                .and_then(|r| match r.output.as_ref() {
                    Some(ActionOutput::BaseBackup(b)) => Some((**b).clone()),
                    _ => None,
                })
        });
        let Some(base) = taken else {
            return Ok((
                false,
                "the database agent reported no base backup in its output".to_owned(),
            ));
        };
        self.event(
            run_id,
            "base_backup.taken",
            serde_json::json!({
                "base_backup": base.id,
                "environment": base.env,
                "consistent_at": base.consistent_at,
                "size": base.size,
                "start_wal": base.start_wal,
                "end_wal": base.end_wal,
            }),
        )
        .await?;
        Ok((
            true,
            format!(
                "base backup {} taken ({}, consistent at {}, WAL {} .. {})",
                base.id,
                api::human::bytes(base.size),
                base.consistent_at.to_rfc3339(),
                base.start_wal,
                base.end_wal
            ),
        ))
    }

    /// Commits the recovery point from the outputs of the run's backup commands.
    pub(super) async fn write_point(
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
        // The newest successful output of the plan's phases of `action`; None when the plan
        // has no such phase.
        let output = |action: Action| -> Result<Option<&ActionOutput>> {
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
                    .filter(|r| phases.contains(&c.phase_index) && r.outcome == Outcome::Succeeded)
                    .and_then(|r| r.output.as_ref())
            });
            found
                .map(Some)
                .with_context(|| format!("no successful {action} output in the journal"))
        };
        let postgres = match output(Action::BackupPostgres)? {
            None => None,
            Some(ActionOutput::BackupPostgres(part)) => Some((**part).clone()),
            Some(other) => bail!("the database agent's backup reported {:?}", other.kind()),
        };
        let objects = match output(Action::SnapshotObjects)? {
            None => None,
            Some(ActionOutput::SnapshotObjects(part)) => Some((**part).clone()),
            Some(other) => bail!("the objects agent's snapshot reported {:?}", other.kind()),
        };
        let repo = env.repository_ref.open().await?;
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
            point.sequence,
            point.created_at.timestamp(),
            env.rpo.as_secs(),
        );
        Ok(point.id.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::{TimeZone, Utc};

    use super::pick_within;

    #[test]
    fn random_within_picks_only_points_committed_in_the_window() {
        let at = |d: u32| Utc.with_ymd_and_hms(2026, 12, d, 3, 0, 0).unwrap();
        let points: Vec<(String, _)> = [1, 3, 5, 6]
            .iter()
            .map(|&d| (format!("p{d}"), at(d)))
            .collect();
        let now = at(6) + chrono::Duration::hours(1);
        let week = std::time::Duration::from_secs(4 * 86400);
        // Within 4 days of Dec 6 04:00: Dec 3, 5 and 6, in commit order; the choice indexes them.
        let mut offered = 0;
        let first = pick_within(&points, week, now, |n| {
            offered = n;
            0
        });
        assert_eq!((first.as_deref(), offered), (Some("p3"), 3));
        assert_eq!(
            pick_within(&points, week, now, |_| 2).as_deref(),
            Some("p6")
        );
        // An index out of range takes the last one rather than panicking.
        assert_eq!(
            pick_within(&points, week, now, |_| 9).as_deref(),
            Some("p6")
        );
        // Nothing in the window: no point (the caller names the window).
        let hour = std::time::Duration::from_secs(1800);
        assert_eq!(pick_within(&points, hour, now, |_| 0), None);
        // A point stamped after now (a fast clock) is not in the window either.
        assert_eq!(
            pick_within(&points, week, at(5), |n| n - 1).as_deref(),
            Some("p5")
        );
    }
}
