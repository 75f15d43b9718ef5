//! The `worker` role: claims pending prompt commands under a lease, writes the reply's artifact
//! and a checkpoint manifest to the object store, appends events, queues channel deliveries,
//! and advances the session's projection. Heartbeats while it runs.
//!
//! Order matters for restores: an object is written before the row that references it
//! commits, so a consistent restore never has an `artifact_index` row without its object.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::Deps;
use crate::Profile;
use crate::objects::{self, StoredObject};
use crate::projection::{SessionView, kind};
use crate::schema;
use crate::store::new_id;

/// How often the worker looks for sessions whose projection is behind their events.
const CATCH_UP_EVERY: Duration = Duration::from_secs(5);
/// Events folded per projection transaction.
const PROJECTION_BATCH: i64 = 1000;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    /// Sleep between polls when there is nothing to do.
    pub poll_interval: Duration,
    /// How long a claimed command and its session stay leased to this worker.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Stop after this many commands were processed (acked or failed): the smoke prompt.
    pub max_commands: Option<u64>,
    /// With `max_commands`: give up (error) if they are not processed within this time.
    pub max_wait: Option<Duration>,
    /// A command fails for good after this many attempts.
    pub max_attempts: i32,
    /// Size of each reply artifact.
    pub artifact_bytes: usize,
}

impl WorkerConfig {
    pub fn new(worker_id: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            worker_id: worker_id.into(),
            poll_interval: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(2),
            max_commands: None,
            max_wait: None,
            max_attempts: 3,
            artifact_bytes: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WorkerReport {
    pub acked: u64,
    pub failed: u64,
    /// Claims given back for a retry (by this or another worker).
    pub retried: u64,
    pub projections_caught_up: u64,
}

/// What happened to one claimed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    /// Failed for good (bad payload or out of attempts).
    Failed,
    /// Released for another attempt.
    Retry,
    /// Another worker took the lease meanwhile; nothing was recorded.
    LostLease,
}

struct Claimed {
    command_id: String,
    session_id: String,
    tenant_id: String,
    payload: Value,
    lease_token: String,
}

enum CommandError {
    /// Retrying cannot help (e.g. the payload has no text).
    Permanent(String),
    Retryable(anyhow::Error),
    LostLease,
}

impl From<anyhow::Error> for CommandError {
    fn from(e: anyhow::Error) -> CommandError {
        CommandError::Retryable(e)
    }
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> CommandError {
        CommandError::Retryable(e.into())
    }
}

pub struct Worker {
    deps: Deps,
    config: WorkerConfig,
}

impl Worker {
    pub fn new(deps: Deps, config: WorkerConfig) -> Worker {
        Worker { deps, config }
    }

    /// Runs until cancelled or, with `max_commands`, until that many commands were processed.
    pub async fn run(self, cancel: CancellationToken) -> Result<WorkerReport> {
        let pool = self.deps.pool.clone();
        let profile = self.deps.profile;
        schema::ensure_current(&pool, profile).await?;
        let processed = Arc::new(AtomicU64::new(0));
        heartbeat(&pool, profile, &self.config.worker_id, "running", 0, true)
            .await
            .context("record the first worker heartbeat")?;
        let beats = CancellationToken::new();
        let beat_task = tokio::spawn(heartbeat_loop(
            pool.clone(),
            profile,
            self.config.worker_id.clone(),
            self.config.heartbeat_interval,
            processed.clone(),
            beats.clone(),
        ));
        tracing::info!(worker = %self.config.worker_id, "worker started");
        let result = self.work(&cancel, &processed).await;
        beats.cancel();
        let _ = beat_task.await;
        if let Err(e) = heartbeat(
            &pool,
            profile,
            &self.config.worker_id,
            "stopped",
            processed.load(Ordering::Relaxed),
            false,
        )
        .await
        {
            tracing::warn!("record the final worker heartbeat: {e:#}");
        }
        tracing::info!(worker = %self.config.worker_id, ?result, "worker stopped");
        result
    }

    async fn work(
        &self,
        cancel: &CancellationToken,
        processed: &AtomicU64,
    ) -> Result<WorkerReport> {
        let started = Instant::now();
        let mut report = WorkerReport::default();
        let mut last_catch_up: Option<Instant> = None;
        loop {
            if cancel.is_cancelled() {
                return Ok(report);
            }
            let done = report.acked + report.failed;
            if let Some(max) = self.config.max_commands {
                if done >= max {
                    return Ok(report);
                }
                if let Some(wait) = self.config.max_wait
                    && started.elapsed() > wait
                {
                    anyhow::bail!(
                        "worker {} processed {done} of {max} command(s) within --max-wait {}: \
                         is a prompt pending (POST /api/sessions/ID/prompt) and is the database \
                         reachable?",
                        self.config.worker_id,
                        humantime::format_duration(wait)
                    );
                }
            }
            if last_catch_up.is_none_or(|t| t.elapsed() >= CATCH_UP_EVERY) {
                last_catch_up = Some(Instant::now());
                match catch_up_lagging(&self.deps.pool, self.deps.profile).await {
                    Ok(n) => report.projections_caught_up += n,
                    Err(e) => tracing::warn!("catch up lagging projections: {e:#}"),
                }
            }
            let idle = match self.process_one().await {
                Ok(Some(Outcome::Acked)) => {
                    report.acked += 1;
                    false
                }
                Ok(Some(Outcome::Failed)) => {
                    report.failed += 1;
                    false
                }
                Ok(Some(Outcome::Retry)) => {
                    report.retried += 1;
                    false
                }
                Ok(Some(Outcome::LostLease)) => false,
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!("worker poll failed, retrying: {e:#}");
                    true
                }
            };
            processed.store(report.acked + report.failed, Ordering::Relaxed);
            if idle {
                tokio::select! {
                    () = cancel.cancelled() => return Ok(report),
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
    }

    /// Claims and processes one command; `None` when nothing is claimable.
    pub async fn process_one(&self) -> Result<Option<Outcome>> {
        let Some(claimed) = self.claim().await? else {
            return Ok(None);
        };
        let outcome = match self.execute(&claimed).await {
            Ok(()) => Outcome::Acked,
            Err(CommandError::LostLease) => {
                tracing::warn!(
                    command = %claimed.command_id,
                    "lost the lease on session {} while processing; leaving the command to its new holder",
                    claimed.session_id
                );
                Outcome::LostLease
            }
            Err(CommandError::Permanent(reason)) => {
                self.record_failure(&claimed, &reason, true).await?
            }
            Err(CommandError::Retryable(e)) => {
                tracing::warn!(command = %claimed.command_id, "command attempt failed: {e:#}");
                self.record_failure(&claimed, &format!("{e:#}"), false)
                    .await?
            }
        };
        if outcome == Outcome::Acked
            && let Err(e) =
                catch_up_projection(&self.deps.pool, self.deps.profile, &claimed.session_id).await
        {
            // The periodic catch-up pass retries it.
            tracing::warn!(session = %claimed.session_id, "advance projection: {e:#}");
        }
        Ok(Some(outcome))
    }

    async fn claim(&self) -> Result<Option<Claimed>> {
        let profile = self.deps.profile;
        let lease_token = new_id("lease");
        let ttl_ms = i64::try_from(self.config.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let mut tx = self.deps.pool.begin().await.context("begin a claim")?;
        // The oldest open command whose session has no earlier open command and no live lease
        // held by another worker: commands of one session run in order, one at a time.
        let row = sqlx::query(profile.sql(
            "WITH candidate AS (
                SELECT c.id FROM {session_commands} c
                WHERE (c.status = 'pending'
                       OR (c.status = 'running' AND c.lease_expires_at < now()))
                  AND NOT EXISTS (
                      SELECT 1 FROM {session_commands} e
                      WHERE e.session_id = c.session_id
                        AND e.status IN ('pending', 'running')
                        AND (e.created_at, e.id) < (c.created_at, c.id))
                  AND NOT EXISTS (
                      SELECT 1 FROM {worker_leases} l
                      WHERE l.session_id = c.session_id AND l.expires_at > now()
                        AND l.worker_id <> $1)
                ORDER BY c.created_at, c.id
                LIMIT 1
                FOR UPDATE OF c SKIP LOCKED
             )
             UPDATE {session_commands} c
             SET status = 'running', claimed_by = $1, lease_token = $2,
                 lease_expires_at = now() + $3 * interval '1 millisecond',
                 attempt_count = c.attempt_count + 1, updated_at = now()
             FROM candidate, {sessions} s
             WHERE c.id = candidate.id AND s.id = c.session_id
             RETURNING c.id, c.session_id, s.tenant_id, c.payload",
        ))
        .bind(&self.config.worker_id)
        .bind(&lease_token)
        .bind(ttl_ms)
        .fetch_optional(&mut *tx)
        .await
        .context("claim a pending command")?;
        let Some(row) = row else { return Ok(None) };
        let claimed = Claimed {
            command_id: row.try_get("id")?,
            session_id: row.try_get("session_id")?,
            tenant_id: row.try_get("tenant_id")?,
            payload: row.try_get("payload")?,
            lease_token,
        };
        let leased: Option<i64> = sqlx::query_scalar(profile.sql(
            "INSERT INTO {worker_leases} (session_id, worker_id, lease_token, expires_at)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
             ON CONFLICT (session_id) DO UPDATE
             SET worker_id = EXCLUDED.worker_id, lease_token = EXCLUDED.lease_token,
                 expires_at = EXCLUDED.expires_at, updated_at = now()
             WHERE {worker_leases}.expires_at <= now()
                OR {worker_leases}.worker_id = EXCLUDED.worker_id
             RETURNING checkpoint_version",
        ))
        .bind(&claimed.session_id)
        .bind(&self.config.worker_id)
        .bind(&claimed.lease_token)
        .bind(ttl_ms)
        .fetch_optional(&mut *tx)
        .await
        .context("lease the command's session")?;
        if leased.is_none() {
            // Another worker leased the session between our check and our upsert.
            tx.rollback().await.context("give back a claim")?;
            return Ok(None);
        }
        sqlx::query(
            profile
                .sql("UPDATE {sessions} SET status = 'running', updated_at = now() WHERE id = $1"),
        )
        .bind(&claimed.session_id)
        .execute(&mut *tx)
        .await
        .context("mark the session running")?;
        tx.commit().await.context("commit the claim")?;
        tracing::debug!(command = %claimed.command_id, session = %claimed.session_id, "claimed");
        Ok(Some(claimed))
    }

    async fn execute(&self, claimed: &Claimed) -> Result<(), CommandError> {
        let profile = self.deps.profile;
        let text = claimed
            .payload
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                CommandError::Permanent(
                    "the prompt payload has no \"text\" string; nothing to do".to_owned(),
                )
            })?;
        let store = self.deps.objects.as_ref();
        let prefix = objects::session_prefix(&claimed.tenant_id, &claimed.session_id);
        let reply = reply_text(&text);
        let artifact_key = format!("{prefix}/artifacts/{}/reply.md", claimed.command_id);
        let artifact = objects::put_object(
            store,
            &artifact_key,
            Bytes::from(artifact_body(
                &claimed.command_id,
                &text,
                self.config.artifact_bytes,
            )),
        )
        .await?;

        let mut tx = self.deps.pool.begin().await?;
        let next: i64 = sqlx::query_scalar(
            profile.sql("SELECT next_event_sequence FROM {sessions} WHERE id = $1 FOR UPDATE"),
        )
        .bind(&claimed.session_id)
        .fetch_one(&mut *tx)
        .await?;
        let version: Option<i64> = sqlx::query_scalar(profile.sql(
            "SELECT l.checkpoint_version FROM {worker_leases} l
             JOIN {session_commands} c ON c.session_id = l.session_id
             WHERE l.session_id = $1 AND l.lease_token = $2
               AND c.id = $3 AND c.lease_token = $2 AND c.status = 'running'
             FOR UPDATE OF l",
        ))
        .bind(&claimed.session_id)
        .bind(&claimed.lease_token)
        .bind(&claimed.command_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(version) = version.map(|v| v + 1) else {
            return Err(CommandError::LostLease);
        };
        let (seq_prompt, seq_reply, seq_artifact, seq_checkpoint) =
            (next, next + 1, next + 2, next + 3);
        let checkpoint_key = format!("{prefix}/checkpoints/{version:08}.json");
        let manifest = json!({
            "session_id": claimed.session_id,
            "tenant_id": claimed.tenant_id,
            "version": version,
            "event_sequence": seq_checkpoint,
            "command_id": claimed.command_id,
            "worker_id": self.config.worker_id,
            "artifacts": [&artifact],
        });
        let checkpoint = objects::put_object(
            store,
            &checkpoint_key,
            Bytes::from(serde_json::to_vec_pretty(&manifest).context("encode a checkpoint")?),
        )
        .await?;
        if self.deps.profile == crate::Profile::Real {
            objects::make_private(&self.deps.objects_url, &checkpoint.key)?;
        }

        let events = [
            (
                seq_prompt,
                kind::USER_PROMPT,
                json!({ "text": text, "command_id": claimed.command_id }),
            ),
            (
                seq_reply,
                kind::ASSISTANT_MESSAGE,
                json!({ "text": reply, "command_id": claimed.command_id }),
            ),
            (
                seq_artifact,
                kind::ARTIFACT_CREATED,
                json!({ "object_key": artifact.key, "size": artifact.size,
                        "sha256": artifact.sha256 }),
            ),
            (
                seq_checkpoint,
                kind::CHECKPOINT_SAVED,
                json!({ "version": version, "object_key": checkpoint.key,
                        "sha256": checkpoint.sha256 }),
            ),
        ];
        sqlx::query(profile.sql(
            "INSERT INTO {session_events} (session_id, sequence, kind, payload)
             SELECT $1, u.seq, u.kind, u.payload::jsonb
             FROM UNNEST($2::bigint[], $3::text[], $4::text[]) AS u(seq, kind, payload)",
        ))
        .bind(&claimed.session_id)
        .bind(events.iter().map(|e| e.0).collect::<Vec<i64>>())
        .bind(
            events
                .iter()
                .map(|e| e.1.to_owned())
                .collect::<Vec<String>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.2.to_string())
                .collect::<Vec<String>>(),
        )
        .execute(&mut *tx)
        .await?;
        for (object, kind, content_type) in [
            (&artifact, "artifact", "text/markdown"),
            (&checkpoint, "checkpoint", "application/json"),
        ] {
            index_object(&mut tx, claimed, object, kind, content_type, profile).await?;
        }
        sqlx::query(profile.sql(
            "UPDATE {sessions} SET next_event_sequence = $2, status = 'idle', updated_at = now()
             WHERE id = $1",
        ))
        .bind(&claimed.session_id)
        .bind(seq_checkpoint + 1)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            profile.sql("UPDATE {worker_leases} SET checkpoint_version = $3, expires_at = now(), updated_at = now()
             WHERE session_id = $1 AND lease_token = $2"),
        )
        .bind(&claimed.session_id)
        .bind(&claimed.lease_token)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        sqlx::query(profile.sql(
            "UPDATE {session_commands}
             SET status = 'acked', lease_expires_at = NULL, last_error = NULL, updated_at = now()
             WHERE id = $1",
        ))
        .bind(&claimed.command_id)
        .execute(&mut *tx)
        .await?;
        // One delivery per active channel bound to the session, for the assistant's reply.
        // The public id is derived from (binding, session, sequence) as in
        // `gateway::public_delivery_id`: a retry cannot mint a second id for one message.
        sqlx::query(profile.sql(
            "INSERT INTO {channel_deliveries}
                 (public_delivery_id, binding_id, session_id, event_sequence, payload, status)
             SELECT 'dlv_' || left(encode(sha256(convert_to(
                        csb.binding_id || ':' || csb.session_id || ':' || $2::text, 'UTF8')),
                        'hex'), 32),
                    csb.binding_id, csb.session_id, $2, $3, 'pending'
             FROM {channel_session_bindings} csb
             JOIN {channel_bindings} b ON b.id = csb.binding_id AND b.status = 'active'
             WHERE csb.session_id = $1
             ON CONFLICT DO NOTHING",
        ))
        .bind(&claimed.session_id)
        .bind(seq_reply)
        .bind(json!({
            "text": reply,
            "artifact_key": artifact.key,
            "artifact_sha256": artifact.sha256,
        }))
        .execute(&mut *tx)
        .await?;
        sqlx::query(profile.sql(
            "INSERT INTO {usage_events} (tenant_id, session_id, kind, quantity)
             VALUES ($1, $2, 'prompt_words', $3)",
        ))
        .bind(&claimed.tenant_id)
        .bind(&claimed.session_id)
        .bind(i64::try_from(text.split_whitespace().count()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            command = %claimed.command_id,
            session = %claimed.session_id,
            checkpoint = version,
            "command acked"
        );
        Ok(())
    }

    /// Gives a failed attempt back (or fails the command for good) and releases the session.
    async fn record_failure(
        &self,
        claimed: &Claimed,
        reason: &str,
        permanent: bool,
    ) -> Result<Outcome> {
        let profile = self.deps.profile;
        let mut tx = self
            .deps
            .pool
            .begin()
            .await
            .context("begin recording a failure")?;
        let status: Option<String> = sqlx::query_scalar(profile.sql(
            "UPDATE {session_commands}
             SET status = CASE WHEN $3 OR attempt_count >= $4 THEN 'failed' ELSE 'pending' END,
                 last_error = $2, claimed_by = NULL, lease_token = NULL,
                 lease_expires_at = NULL, updated_at = now()
             WHERE id = $1 AND lease_token = $5
             RETURNING status",
        ))
        .bind(&claimed.command_id)
        .bind(reason)
        .bind(permanent)
        .bind(self.config.max_attempts)
        .bind(&claimed.lease_token)
        .fetch_optional(&mut *tx)
        .await
        .context("record a failed command attempt")?;
        sqlx::query(profile.sql(
            "UPDATE {worker_leases} SET expires_at = now(), updated_at = now()
             WHERE session_id = $1 AND lease_token = $2",
        ))
        .bind(&claimed.session_id)
        .bind(&claimed.lease_token)
        .execute(&mut *tx)
        .await
        .context("release the session lease")?;
        let outcome = match status.as_deref() {
            Some("failed") => {
                sqlx::query(profile.sql(
                    "UPDATE {sessions} SET status = 'errored', updated_at = now() WHERE id = $1",
                ))
                .bind(&claimed.session_id)
                .execute(&mut *tx)
                .await
                .context("mark the session errored")?;
                tracing::warn!(command = %claimed.command_id, "command failed for good: {reason}");
                Outcome::Failed
            }
            Some(_) => {
                sqlx::query(profile.sql(
                    "UPDATE {sessions} SET status = 'idle', updated_at = now() WHERE id = $1",
                ))
                .bind(&claimed.session_id)
                .execute(&mut *tx)
                .await
                .context("mark the session idle")?;
                Outcome::Retry
            }
            None => Outcome::LostLease,
        };
        tx.commit().await.context("commit a failed attempt")?;
        Ok(outcome)
    }
}

async fn index_object(
    tx: &mut sqlx::PgConnection,
    claimed: &Claimed,
    object: &StoredObject,
    kind: &str,
    content_type: &str,
    profile: Profile,
) -> Result<(), CommandError> {
    sqlx::query(profile.sql(
        "INSERT INTO {artifact_index}
             (id, tenant_id, session_id, kind, object_key, size_bytes, sha256, content_type)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (object_key) DO UPDATE
         SET size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256",
    ))
    .bind(new_id("art"))
    .bind(&claimed.tenant_id)
    .bind(&claimed.session_id)
    .bind(kind)
    .bind(&object.key)
    .bind(i64::try_from(object.size).unwrap_or(i64::MAX))
    .bind(&object.sha256)
    .bind(content_type)
    .execute(tx)
    .await?;
    Ok(())
}

/// The assistant's (deterministic) answer to a prompt.
pub fn reply_text(prompt: &str) -> String {
    let words = prompt.split_whitespace().count();
    let preview: String = prompt.chars().take(80).collect();
    format!("Noted {words} word(s). You asked: {preview}")
}

/// A markdown artifact of about `size` bytes derived from the prompt (deterministic).
pub fn artifact_body(command_id: &str, prompt: &str, size: usize) -> Vec<u8> {
    let mut body = format!(
        "# Reply to {command_id}\n\n> {}\n\n",
        prompt.replace('\n', " ")
    );
    let mut line = 0u64;
    while body.len() < size {
        let digest = objects::sha256_hex(format!("{command_id}:{line}").as_bytes());
        body.push_str(&format!("- line {line}: {digest}\n"));
        line += 1;
    }
    body.into_bytes()
}

/// Folds any events past the session's projection into it; returns the events applied.
pub async fn catch_up_projection(pool: &PgPool, profile: Profile, session_id: &str) -> Result<u64> {
    let mut applied = 0u64;
    loop {
        let mut tx = pool.begin().await.context("begin a projection update")?;
        sqlx::query(profile.sql(
            "INSERT INTO {session_projections} (session_id, sequence, view)
             SELECT id, 0, jsonb_build_object('title', title) FROM {sessions} WHERE id = $1
             ON CONFLICT (session_id) DO NOTHING",
        ))
        .bind(session_id)
        .execute(&mut *tx)
        .await
        .context("create a missing projection")?;
        let row = sqlx::query(profile.sql(
            "SELECT p.sequence, p.view, s.title FROM {session_projections} p
             JOIN {sessions} s ON s.id = p.session_id
             WHERE p.session_id = $1 FOR UPDATE OF p",
        ))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await
        .context("lock the projection")?;
        let Some(row) = row else { return Ok(applied) };
        let mut sequence: i64 = row.try_get("sequence")?;
        let stored: Value = row.try_get("view")?;
        let title: String = row.try_get("title")?;
        let mut view = match serde_json::from_value::<SessionView>(stored) {
            Ok(view) => view,
            Err(e) => {
                if sequence > 0 {
                    tracing::warn!(
                        session = session_id,
                        "projection view does not decode ({e}); rebuilding it from events"
                    );
                }
                sequence = 0;
                SessionView::new(&title)
            }
        };
        let events = sqlx::query(profile.sql(
            "SELECT sequence, kind, payload FROM {session_events}
             WHERE session_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
        ))
        .bind(session_id)
        .bind(sequence)
        .bind(PROJECTION_BATCH)
        .fetch_all(&mut *tx)
        .await
        .context("read events past the projection")?;
        if events.is_empty() {
            tx.commit().await.context("commit the projection")?;
            return Ok(applied);
        }
        for event in &events {
            let seq: i64 = event.try_get("sequence")?;
            let kind: String = event.try_get("kind")?;
            let payload: Value = event.try_get("payload")?;
            view.apply(&kind, &payload);
            sequence = seq;
            applied += 1;
        }
        sqlx::query(profile.sql(
            "UPDATE {session_projections} SET sequence = $2, view = $3, updated_at = now()
             WHERE session_id = $1",
        ))
        .bind(session_id)
        .bind(sequence)
        .bind(view.to_json())
        .execute(&mut *tx)
        .await
        .context("store the projection")?;
        tx.commit().await.context("commit the projection")?;
        if (events.len() as i64) < PROJECTION_BATCH {
            return Ok(applied);
        }
    }
}

/// Catches up every session whose projection is behind or missing; returns sessions fixed.
pub async fn catch_up_lagging(pool: &PgPool, profile: Profile) -> Result<u64> {
    let ids: Vec<String> = sqlx::query_scalar(profile.sql(
        "SELECT s.id FROM {sessions} s LEFT JOIN {session_projections} p ON p.session_id = s.id
         WHERE coalesce(p.sequence, -1) < s.next_event_sequence - 1
         LIMIT 100",
    ))
    .fetch_all(pool)
    .await
    .context("find lagging projections")?;
    let mut fixed = 0;
    for id in ids {
        catch_up_projection(pool, profile, &id).await?;
        fixed += 1;
    }
    Ok(fixed)
}

async fn heartbeat(
    pool: &PgPool,
    profile: Profile,
    worker_id: &str,
    status: &str,
    processed: u64,
    restart: bool,
) -> Result<()> {
    sqlx::query(profile.sql(
        "INSERT INTO {worker_heartbeats} (worker_id, hostname, pid, status, commands_processed)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (worker_id) DO UPDATE
         SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, status = EXCLUDED.status,
             commands_processed = EXCLUDED.commands_processed, last_seen_at = now(),
             started_at = CASE WHEN $6 THEN now() ELSE {worker_heartbeats}.started_at END",
    ))
    .bind(worker_id)
    .bind(hostname())
    .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
    .bind(status)
    .bind(i64::try_from(processed).unwrap_or(i64::MAX))
    .bind(restart)
    .execute(pool)
    .await
    .with_context(|| format!("record a heartbeat for worker {worker_id}"))?;
    Ok(())
}

async fn heartbeat_loop(
    pool: PgPool,
    profile: Profile,
    worker_id: String,
    every: Duration,
    processed: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let n = processed.load(Ordering::Relaxed);
        if let Err(e) = heartbeat(&pool, profile, &worker_id, "running", n, false).await {
            tracing::warn!("{e:#}");
        }
    }
}

/// This host's name, for heartbeats and default role ids.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_is_deterministic_and_sized() {
        let a = artifact_body("cmd_1", "hello\nworld", 1000);
        assert!(a.len() >= 1000 && a.len() < 1100);
        assert_eq!(a, artifact_body("cmd_1", "hello\nworld", 1000));
        assert_ne!(a, artifact_body("cmd_2", "hello\nworld", 1000));
        assert!(reply_text("a b c").starts_with("Noted 3 word(s)"));
    }
}
