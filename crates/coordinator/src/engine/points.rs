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

impl<L: AgentLink + Clone + 'static> Engine<L> {
    /// Reads each environment's newest recovery point (in commit order) once, for the
    /// point-age metric.
    pub async fn observe_points(&self) {
        for (name, env) in &self.inner.environments {
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

    /// The point a restore uses: `latest` is the environment's newest point in commit order
    /// (the last one committed, whatever its stamp says); an id must exist and
    /// belong to the environment. Checked before the run exists, so a bad id touches nothing.
    pub(super) async fn resolve_point(
        &self,
        env: &Environment,
        point: Option<&str>,
    ) -> Result<String> {
        let Some(point) = point else {
            bail!(
                "this plan restores data: name the recovery point with --point ID or --point latest \
                 (`rollcall points --env {}` lists them)",
                env.name
            );
        };
        let repo = env.repository_ref.open().await?;
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
}

impl<L: AgentLink + Clone + 'static> Inner<L> {
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
