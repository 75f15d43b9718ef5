//! The `scheduler` role: claims due workflows and fires exactly one run per due time, even
//! with several schedulers racing. A run opens a session in the workflow's tenant, uploads the
//! workflow input to the object store, and queues the prompt for a worker.
//!
//! Two guards: `FOR UPDATE SKIP LOCKED` keeps racing schedulers off the same workflow row, and
//! `workflow_runs.idempotency_key` (`<workflow>@<due unix ms>`) is unique, so even a scheduler
//! that read a stale due time cannot fire a second run for it. Missed due times (the scheduler
//! was down, or a restore went back in time) are coalesced: one run, then the next future slot.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::Deps;
use crate::objects;
use crate::projection::SessionView;
use crate::schema;
use crate::store::new_id;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub scheduler_id: String,
    /// How often to look for due workflows.
    pub tick: Duration,
    /// Workflows claimed per tick.
    pub batch: i64,
}

impl SchedulerConfig {
    pub fn new(scheduler_id: impl Into<String>) -> SchedulerConfig {
        SchedulerConfig {
            scheduler_id: scheduler_id.into(),
            tick: Duration::from_millis(250),
            batch: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SchedulerReport {
    pub runs_created: u64,
    /// Due times another scheduler had already fired (the idempotency key refused a second run).
    pub duplicates_refused: u64,
    pub ticks: u64,
}

pub struct Scheduler {
    deps: Deps,
    config: SchedulerConfig,
}

impl Scheduler {
    pub fn new(deps: Deps, config: SchedulerConfig) -> Scheduler {
        Scheduler { deps, config }
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<SchedulerReport> {
        schema::ensure_current(&self.deps.pool, self.deps.profile).await?;
        tracing::info!(scheduler = %self.config.scheduler_id, "scheduler started");
        let mut report = SchedulerReport::default();
        loop {
            match self.tick().await {
                Ok(tick) => {
                    report.runs_created += tick.runs_created;
                    report.duplicates_refused += tick.duplicates_refused;
                }
                Err(e) => tracing::warn!("scheduler tick failed, retrying: {e:#}"),
            }
            report.ticks += 1;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(self.config.tick) => {}
            }
        }
        tracing::info!(scheduler = %self.config.scheduler_id, ?report, "scheduler stopped");
        Ok(report)
    }

    /// Claims due workflows once and fires their runs.
    pub async fn tick(&self) -> Result<SchedulerReport> {
        let profile = self.deps.profile;
        let mut report = SchedulerReport::default();
        let mut tx = self
            .deps
            .pool
            .begin()
            .await
            .context("begin a scheduler tick")?;
        let due = sqlx::query(profile.sql(
            "SELECT id, tenant_id, name, prompt,
                    (extract(epoch FROM next_run_at) * 1000)::bigint AS due_ms
             FROM {workflows}
             WHERE status = 'active' AND next_run_at <= now()
             ORDER BY next_run_at, id
             LIMIT $1
             FOR UPDATE SKIP LOCKED",
        ))
        .bind(self.config.batch)
        .fetch_all(&mut *tx)
        .await
        .context("claim due workflows")?;
        for row in due {
            let workflow_id: String = row.try_get("id")?;
            let tenant_id: String = row.try_get("tenant_id")?;
            let name: String = row.try_get("name")?;
            let prompt: String = row.try_get("prompt")?;
            let due_ms: i64 = row.try_get("due_ms")?;
            let key = format!("{workflow_id}@{due_ms}");
            let run_id = new_id("run");
            let inserted: Option<String> = sqlx::query_scalar(profile.sql(
                "INSERT INTO {workflow_runs} (id, workflow_id, due_at, idempotency_key, claimed_by,
                                            status)
                 VALUES ($1, $2, to_timestamp($3::float8 / 1000), $4, $5, 'queued')
                 ON CONFLICT (idempotency_key) DO NOTHING
                 RETURNING id",
            ))
            .bind(&run_id)
            .bind(&workflow_id)
            .bind(due_ms)
            .bind(&key)
            .bind(&self.config.scheduler_id)
            .fetch_optional(&mut *tx)
            .await
            .with_context(|| format!("record the run of workflow {workflow_id} due {due_ms}"))?;
            if inserted.is_some() {
                self.fire(
                    &mut tx,
                    &run_id,
                    &workflow_id,
                    &tenant_id,
                    &name,
                    &prompt,
                    due_ms,
                )
                .await?;
                report.runs_created += 1;
            } else {
                tracing::warn!(
                    workflow = %workflow_id,
                    key = %key,
                    "a run for this due time exists already; not firing it twice"
                );
                report.duplicates_refused += 1;
            }
            sqlx::query(profile.sql(
                "UPDATE {workflows}
                 SET last_run_at = next_run_at,
                     next_run_at = next_run_at
                         + (floor(extract(epoch FROM (now() - next_run_at)) / schedule_seconds)
                            + 1) * schedule_seconds * interval '1 second'
                 WHERE id = $1",
            ))
            .bind(&workflow_id)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("advance workflow {workflow_id} to its next due time"))?;
        }
        tx.commit().await.context("commit the scheduler tick")?;
        if report.runs_created > 0 {
            tracing::info!(runs = report.runs_created, "workflow runs fired");
        }
        Ok(report)
    }

    /// Opens the run's session, uploads its input and queues its prompt.
    #[allow(clippy::too_many_arguments)]
    async fn fire(
        &self,
        tx: &mut sqlx::PgConnection,
        run_id: &str,
        workflow_id: &str,
        tenant_id: &str,
        name: &str,
        prompt: &str,
        due_ms: i64,
    ) -> Result<()> {
        let profile = self.deps.profile;
        let session_id = new_id("ses");
        let title = format!("{name} (scheduled run)");
        sqlx::query(profile.sql(
            "INSERT INTO {sessions} (id, tenant_id, title, status) VALUES ($1, $2, $3, 'idle')",
        ))
        .bind(&session_id)
        .bind(tenant_id)
        .bind(&title)
        .execute(&mut *tx)
        .await
        .context("open the run's session")?;
        sqlx::query(profile.sql(
            "INSERT INTO {session_projections} (session_id, sequence, view) VALUES ($1, 0, $2)",
        ))
        .bind(&session_id)
        .bind(SessionView::new(&title).to_json())
        .execute(&mut *tx)
        .await
        .context("create the run session's projection")?;
        let key = format!(
            "{}/uploads/workflow-input.json",
            objects::session_prefix(tenant_id, &session_id)
        );
        let input = json!({
            "workflow_id": workflow_id,
            "run_id": run_id,
            "due_unix_ms": due_ms,
            "prompt": prompt,
            "scheduler_id": self.config.scheduler_id,
        });
        let body = serde_json::to_vec_pretty(&input).context("encode the workflow input")?;
        let object = objects::put_object(self.deps.objects.as_ref(), &key, Bytes::from(body))
            .await
            .context("upload the workflow input")?;
        sqlx::query(profile.sql(
            "INSERT INTO {artifact_index}
                 (id, tenant_id, session_id, kind, object_key, size_bytes, sha256, content_type)
             VALUES ($1, $2, $3, 'upload', $4, $5, $6, 'application/json')",
        ))
        .bind(new_id("art"))
        .bind(tenant_id)
        .bind(&session_id)
        .bind(&object.key)
        .bind(i64::try_from(object.size).unwrap_or(i64::MAX))
        .bind(&object.sha256)
        .execute(&mut *tx)
        .await
        .context("index the workflow input")?;
        sqlx::query(profile.sql(
            "INSERT INTO {session_commands} (id, session_id, kind, payload, status)
             VALUES ($1, $2, 'prompt', $3, 'pending')",
        ))
        .bind(new_id("cmd"))
        .bind(&session_id)
        .bind(json!({ "text": prompt, "workflow_run_id": run_id }))
        .execute(&mut *tx)
        .await
        .context("queue the run's prompt")?;
        sqlx::query(profile.sql("UPDATE {workflow_runs} SET session_id = $2 WHERE id = $1"))
            .bind(run_id)
            .bind(&session_id)
            .execute(&mut *tx)
            .await
            .context("link the run to its session")?;
        sqlx::query(profile.sql(
            "INSERT INTO {audit_events} (tenant_id, actor, action, target, details)
             VALUES ($1, $2, 'workflow.run', $3, $4)",
        ))
        .bind(tenant_id)
        .bind(&self.config.scheduler_id)
        .bind(workflow_id)
        .bind(json!({ "run_id": run_id, "due_unix_ms": due_ms }))
        .execute(&mut *tx)
        .await
        .context("audit the workflow run")?;
        Ok(())
    }
}
