//! `seed`: realistic data at any scale, consistent the way the running service would leave it:
//! tenants with members, subscriptions, BYOK secrets (ciphertext or KMS refs, never keys) and
//! tokens (hashed); sessions with events, projections current to their last event, acked
//! commands, artifacts and checkpoints whose objects are really in the object store; workflows
//! with past runs; channel bindings with cursors and deliveries in every status.
//!
//! Built for millions of events: a generator thread renders chunks of sessions as `COPY` text
//! while the previous chunk streams into Postgres and its objects upload with bounded
//! parallelism. Everything lands in one transaction, committed only after every object is
//! written, so a failed seed leaves no rows behind.
//!
//! `generate` derives the plan from the config and the seed and renders sessions, and all that
//! hangs off them, as COPY text in chunks; `copy` holds that text format and streams a chunk
//! into its tables; `insert` writes the few rows of tenants, workflows and tokens one by one.
//! This module runs them together.

mod copy;
mod generate;
mod insert;

use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt as _, TryStreamExt as _};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::Deps;
use crate::auth::IssuedToken;
use crate::objects;
use crate::schema;
use crate::store::DeliveryCounts;

use copy::Chunk;
use generate::Plan;
pub use generate::seed_artifact_body;

/// Sessions rendered per chunk (bounds memory at any scale).
const CHUNK_SESSIONS: u64 = 2000;

#[derive(Debug, Clone)]
pub struct SeedConfig {
    pub tenants: u32,
    pub sessions: u64,
    pub events_per_session: u32,
    pub artifacts_per_session: u32,
    pub artifact_bytes: usize,
    pub workflows: u32,
    /// Every Nth session is bound to a channel (0: none).
    pub bind_every: u64,
    /// Extra prompt commands left pending (work for a worker after a restore).
    pub pending_commands: u64,
    /// Same seed, same data (ids included): use a new seed to seed the same database again.
    pub rng_seed: u64,
    pub object_concurrency: usize,
}

impl SeedConfig {
    pub fn new(sessions: u64) -> SeedConfig {
        SeedConfig {
            tenants: 3,
            sessions,
            events_per_session: 20,
            artifacts_per_session: 1,
            artifact_bytes: 2048,
            workflows: 10,
            bind_every: 4,
            pending_commands: 0,
            rng_seed: rand::rng().random(),
            object_concurrency: 32,
        }
    }

    fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.tenants >= 1, "--tenants must be at least 1");
        anyhow::ensure!(
            self.events_per_session >= self.artifacts_per_session + 3,
            "--events-per-session ({}) must be at least --artifacts-per-session ({}) + 3: a \
             session needs a prompt, a reply, its artifacts and a checkpoint",
            self.events_per_session,
            self.artifacts_per_session
        );
        anyhow::ensure!(
            self.object_concurrency >= 1,
            "--object-concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.artifact_bytes <= 64 * 1024 * 1024,
            "--artifact-bytes must be at most 64 MiB"
        );
        Ok(())
    }
}

/// What was seeded. Contains no secrets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeedReport {
    pub rng_seed: u64,
    pub tenants: u64,
    pub accounts: u64,
    pub sessions: u64,
    pub events: u64,
    pub commands: u64,
    pub objects: u64,
    pub object_bytes: u64,
    pub workflows: u64,
    pub workflow_runs: u64,
    pub channel_bindings: u64,
    pub bound_sessions: u64,
    pub deliveries: DeliveryCounts,
    pub seconds: f64,
}

/// Tokens issued by the seed, in plaintext: shown once, stored only as hashes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedTokens {
    pub operator: IssuedToken,
    pub gateway: IssuedToken,
    /// One per tenant, in tenant order.
    pub desktop: Vec<IssuedToken>,
}

pub struct Seeded {
    pub report: SeedReport,
    pub tokens: SeedTokens,
}

/// Seeds the database and object store.
pub async fn run(deps: &Deps, config: &SeedConfig) -> Result<Seeded> {
    config.validate()?;
    schema::ensure_current(&deps.pool, deps.profile).await?;
    let started = Instant::now();
    let now = Utc::now();
    let plan = Plan::new(config, now, deps.profile);
    let mut report = SeedReport {
        rng_seed: config.rng_seed,
        ..SeedReport::default()
    };

    let mut tx = deps
        .pool
        .begin()
        .await
        .context("begin the seed transaction")?;
    plan.insert_tenants(&mut tx, &mut report).await?;

    let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let generator = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || {
            let mut start = 0;
            while start < plan.config.sessions {
                let end = (start + CHUNK_SESSIONS).min(plan.config.sessions);
                let chunk = plan.render(start..end);
                if chunk_tx.blocking_send(chunk).is_err() {
                    return; // the consumer failed and said why
                }
                start = end;
            }
        })
    };
    let (object_tx, object_rx) = tokio::sync::mpsc::channel::<Vec<(String, Bytes)>>(4);
    let store = deps.objects.clone();
    // The real profile's checkpoints are private files on a file:// store (mode 0600).
    let private_url = (deps.profile == crate::Profile::Real).then(|| deps.objects_url.clone());
    let concurrency = config.object_concurrency;
    let uploader = tokio::spawn(async move {
        futures::stream::unfold(object_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|batch| (futures::stream::iter(batch), rx))
        })
        .flatten()
        .map(|(key, body)| {
            let store = store.clone();
            let private_url = private_url.clone();
            async move {
                objects::put_object(store.as_ref(), &key, body).await?;
                match private_url {
                    Some(url) if objects::is_checkpoint(&key) => objects::make_private(&url, &key),
                    _ => Ok(()),
                }
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
    });

    let copy_result: Result<()> = async {
        while let Some(chunk) = chunk_rx.recv().await {
            report.sessions += chunk.sessions;
            report.events += chunk.events;
            report.commands += chunk.commands;
            report.objects += chunk.objects.len() as u64;
            report.object_bytes += chunk
                .objects
                .iter()
                .map(|(_, b)| b.len() as u64)
                .sum::<u64>();
            report.bound_sessions += chunk.bound_sessions;
            add_counts(&mut report.deliveries, &chunk.deliveries);
            chunk.copy_into(&mut tx, deps.profile).await?;
            if object_tx.send(chunk.objects).await.is_err() {
                break; // the uploader failed; its error is reported below
            }
        }
        Ok(())
    }
    .await;
    drop(object_tx);
    drop(chunk_rx);
    let uploaded = uploader.await.context("join the object uploader")?;
    generator.await.context("join the seed generator")?;
    copy_result?;
    uploaded.context("upload seeded objects")?;

    plan.insert_pending_commands(&mut tx).await?;
    plan.insert_workflows(&mut tx, &mut report).await?;
    tx.commit().await.context("commit the seed")?;
    // Fresh bulk loads have no statistics yet; plans of the roles depend on them.
    sqlx::query("ANALYZE")
        .execute(&deps.pool)
        .await
        .context("analyze the seeded tables")?;

    let tokens = plan.issue_tokens(&deps.pool).await?;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(?report, "seed finished");
    Ok(Seeded { report, tokens })
}

fn add_counts(total: &mut DeliveryCounts, more: &DeliveryCounts) {
    total.pending += more.pending;
    total.claimed += more.claimed;
    total.sent += more.sent;
    total.failed += more.failed;
    total.dead += more.dead;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_too_few_events() {
        let mut config = SeedConfig::new(1);
        config.events_per_session = 3;
        let err = config.validate().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("at least --artifacts-per-session")));
    }
}
