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

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures::{StreamExt as _, TryStreamExt as _};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::Deps;
use crate::auth::{self, IssuedToken, Scope};
use crate::gateway::public_delivery_id;
use crate::objects::{self, sha256_hex};
use crate::projection::{SessionView, kind};
use crate::schema;
use crate::store::DeliveryCounts;
use crate::worker::reply_text;

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
    schema::ensure_current(&deps.pool).await?;
    let started = Instant::now();
    let now = Utc::now();
    let plan = Plan::new(config, now);
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
            async move { objects::put_object(store.as_ref(), &key, body).await }
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
            chunk.copy_into(&mut tx).await?;
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

/// Deterministic names and shapes derived from the config and the seed.
#[derive(Clone)]
struct Plan {
    config: SeedConfig,
    tag: u32,
    now: DateTime<Utc>,
    tenants: Vec<TenantPlan>,
}

#[derive(Clone)]
struct TenantPlan {
    id: String,
    slug: String,
    owner: String,
    accounts: Vec<String>,
    bindings: Vec<String>,
}

const TOPICS: [&str; 8] = [
    "quarterly report",
    "onboarding checklist",
    "incident timeline",
    "release notes",
    "customer interview",
    "budget forecast",
    "design review",
    "migration plan",
];
const VERBS: [&str; 6] = [
    "Summarise",
    "Draft",
    "Review",
    "Outline",
    "Compare",
    "Translate",
];
const TEAMS: [&str; 5] = ["finance", "platform", "support", "sales", "research"];

impl Plan {
    fn new(config: &SeedConfig, now: DateTime<Utc>) -> Plan {
        let tag = StdRng::seed_from_u64(config.rng_seed).random::<u32>();
        let tenants = (0..config.tenants)
            .map(|t| {
                let id = format!("ten_{tag:08x}{t:016x}");
                TenantPlan {
                    slug: format!("sim-{tag:08x}-{t}"),
                    owner: format!("acc_{tag:08x}{t:012x}0000"),
                    accounts: (0..3)
                        .map(|a| format!("acc_{tag:08x}{t:012x}{a:04x}"))
                        .collect(),
                    bindings: ["slack", "webhook"]
                        .iter()
                        .enumerate()
                        .map(|(b, _)| format!("chb_{tag:08x}{t:012x}{b:04x}"))
                        .collect(),
                    id,
                }
            })
            .collect();
        Plan {
            config: config.clone(),
            tag,
            now,
            tenants,
        }
    }

    fn tenant(&self, session: u64) -> &TenantPlan {
        let n = self.tenants.len() as u64;
        // `tenants` is never empty (validated); index 0 keeps this total.
        &self.tenants[usize::try_from(session % n.max(1)).unwrap_or(0)]
    }

    fn session_id(&self, idx: u64) -> String {
        format!("ses_{:08x}{idx:016x}", self.tag)
    }

    async fn insert_tenants(
        &self,
        tx: &mut sqlx::PgConnection,
        report: &mut SeedReport,
    ) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(self.config.rng_seed ^ 0x7e7a);
        for (t, tenant) in self.tenants.iter().enumerate() {
            sqlx::query("INSERT INTO tenants (id, slug, name, created_at) VALUES ($1, $2, $3, $4::timestamptz)")
                .bind(&tenant.id)
                .bind(&tenant.slug)
                .bind(format!("Sim Tenant {t} ({:08x})", self.tag))
                .bind(ts(self.now - ChronoDuration::days(60)))
                .execute(&mut *tx)
                .await
                .with_context(|| {
                    format!(
                        "create tenant {}: was this database already seeded with --rng-seed {}? \
                         use another seed or a fresh database",
                        tenant.slug, self.config.rng_seed
                    )
                })?;
            report.tenants += 1;
            for (a, account) in tenant.accounts.iter().enumerate() {
                let role = ["owner", "admin", "member"][a % 3];
                sqlx::query("INSERT INTO accounts (id, email, display_name) VALUES ($1, $2, $3)")
                    .bind(account)
                    .bind(format!("user{a}@{}.example", tenant.slug))
                    .bind(format!("Sim User {a}"))
                    .execute(&mut *tx)
                    .await
                    .context("create an account")?;
                sqlx::query(
                    "INSERT INTO memberships (tenant_id, account_id, role) VALUES ($1, $2, $3)",
                )
                .bind(&tenant.id)
                .bind(account)
                .bind(role)
                .execute(&mut *tx)
                .await
                .context("create a membership")?;
                audit(&mut *tx, &tenant.id, "seed", "member.add", account).await?;
                report.accounts += 1;
            }
            let plan = ["free", "team", "enterprise"][t % 3];
            sqlx::query(
                "INSERT INTO subscriptions (id, tenant_id, plan, status, seats, current_period_end)
                 VALUES ($1, $2, $3, $4, $5, now() + interval '20 days')",
            )
            .bind(format!("sub_{:08x}{t:016x}", self.tag))
            .bind(&tenant.id)
            .bind(plan)
            .bind(["active", "trialing", "past_due", "active"][t % 4])
            .bind(i32::try_from(3 + t % 20).unwrap_or(3))
            .execute(&mut *tx)
            .await
            .context("create a subscription")?;
            // BYOK: one provider key wrapped as opaque ciphertext, one held by a KMS. The
            // plaintext key exists only in this scope, to take its last four characters.
            for (k, provider) in ["openai", "anthropic"].iter().enumerate() {
                let key: String = (0..40)
                    .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
                    .collect();
                let last4: String = key.chars().skip(36).collect();
                let (ciphertext, kms_ref) = if k == 0 {
                    let mut sealed = b"cwsim-envelope-v1:".to_vec();
                    let mut random = [0u8; 48];
                    rng.fill(&mut random);
                    sealed.extend_from_slice(&random);
                    (Some(sealed), None)
                } else {
                    (
                        None,
                        Some(format!(
                            "kms://cowork-sim/keyrings/{}/cryptoKeys/byok-{provider}/versions/1",
                            tenant.slug
                        )),
                    )
                };
                let id = format!("byok_{:08x}{t:012x}{k:04x}", self.tag);
                sqlx::query(
                    "INSERT INTO byok_secrets (id, tenant_id, provider, ciphertext, kms_ref, last4)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&id)
                .bind(&tenant.id)
                .bind(*provider)
                .bind(ciphertext)
                .bind(kms_ref)
                .bind(last4)
                .execute(&mut *tx)
                .await
                .context("create a BYOK secret")?;
                audit(&mut *tx, &tenant.id, "seed", "byok.create", &id).await?;
            }
            for (b, binding) in tenant.bindings.iter().enumerate() {
                let (channel, target) = if b == 0 {
                    ("slack", format!("#{}-updates", tenant.slug))
                } else {
                    (
                        "webhook",
                        format!("https://hooks.{}.example/cowork", tenant.slug),
                    )
                };
                sqlx::query(
                    "INSERT INTO channel_bindings (id, tenant_id, channel, target, status)
                     VALUES ($1, $2, $3, $4, 'active')",
                )
                .bind(binding)
                .bind(&tenant.id)
                .bind(channel)
                .bind(target)
                .execute(&mut *tx)
                .await
                .context("create a channel binding")?;
                report.channel_bindings += 1;
            }
        }
        for w in 1..=2 {
            sqlx::query(
                "INSERT INTO worker_heartbeats (worker_id, hostname, pid, status,
                                                commands_processed, started_at, last_seen_at)
                 VALUES ($1, 'seed-host', $2, 'stopped', $3, now() - interval '2 days',
                         now() - interval '1 day')
                 ON CONFLICT (worker_id) DO NOTHING",
            )
            .bind(format!("worker-seed-{w}"))
            .bind(1000 + w)
            .bind(i64::from(w) * 100)
            .execute(&mut *tx)
            .await
            .context("record seed worker heartbeats")?;
        }
        Ok(())
    }

    /// Renders sessions `range` (and everything hanging off them) as COPY text and objects.
    fn render(&self, range: std::ops::Range<u64>) -> Chunk {
        let mut chunk = Chunk::default();
        let cfg = &self.config;
        let span_secs = 30 * 24 * 3600;
        let n_body = u64::from(cfg.events_per_session - cfg.artifacts_per_session - 1);
        for idx in range {
            let mut rng =
                StdRng::seed_from_u64(cfg.rng_seed ^ idx.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let tenant = self.tenant(idx);
            let session_id = self.session_id(idx);
            let offset = i64::try_from(idx * span_secs / cfg.sessions.max(1)).unwrap_or(0);
            let created = self.now - ChronoDuration::seconds(span_secs as i64 - offset);
            let status = match idx % 10 {
                0..=5 => "idle",
                6 | 7 => "closed",
                8 => "running",
                _ => "errored",
            };
            let topic = TOPICS[rng.random_range(0..TOPICS.len())];
            let title = format!("{} ({})", capitalise(topic), TEAMS[(idx % 5) as usize]);
            let account = &tenant.accounts[(idx % 3) as usize];
            let prefix = objects::session_prefix(&tenant.id, &session_id);
            let mut view = SessionView::new(&title);
            let mut assistant_seqs = Vec::new();
            let mut last_reply = String::new();
            let mut prompt_words = 0i64;
            let mut seq: i64 = 0;
            let mut event = |chunk: &mut Chunk, seq: i64, kind: &str, payload: Value| {
                view.apply(kind, &payload);
                let at = created + ChronoDuration::seconds(seq * 7);
                Row::new(&mut chunk.events_copy)
                    .text(&session_id)
                    .int(seq)
                    .text(kind)
                    .text(&payload.to_string())
                    .text(&ts(at))
                    .end();
                chunk.events += 1;
            };
            for i in 1..=n_body {
                seq += 1;
                match (i - 1) % 4 {
                    0 => {
                        let prompt = format!(
                            "{} the {} for {} #{}",
                            VERBS[rng.random_range(0..VERBS.len())],
                            TOPICS[rng.random_range(0..TOPICS.len())],
                            TEAMS[rng.random_range(0..TEAMS.len())],
                            rng.random_range(1..1000)
                        );
                        prompt_words += prompt.split_whitespace().count() as i64;
                        let command_id = format!("cmd_{:08x}{idx:012x}{i:04x}", self.tag);
                        let at = created + ChronoDuration::seconds(seq * 7);
                        Row::new(&mut chunk.commands_copy)
                            .text(&command_id)
                            .text(&session_id)
                            .text("prompt")
                            .text(&json!({ "text": prompt }).to_string())
                            .text("acked")
                            .text("worker-seed-1")
                            .int(1)
                            .text(&ts(at))
                            .text(&ts(at))
                            .end();
                        chunk.commands += 1;
                        last_reply = reply_text(&prompt);
                        event(
                            &mut chunk,
                            seq,
                            kind::USER_PROMPT,
                            json!({ "text": prompt, "command_id": command_id }),
                        );
                    }
                    2 => event(
                        &mut chunk,
                        seq,
                        kind::TOOL_RESULT,
                        json!({ "tool": "search", "ok": true, "hits": rng.random_range(0..50) }),
                    ),
                    _ => {
                        assistant_seqs.push(seq);
                        event(
                            &mut chunk,
                            seq,
                            kind::ASSISTANT_MESSAGE,
                            json!({ "text": last_reply }),
                        );
                    }
                }
            }
            // Artifacts, then a checkpoint manifest listing them: objects first, rows after.
            let mut listed = Vec::new();
            for a in 0..cfg.artifacts_per_session {
                seq += 1;
                let key = format!("{prefix}/artifacts/seed-{a}/report.md");
                let body = Bytes::from(seed_artifact_body(&title, idx, a, cfg.artifact_bytes));
                let sha = sha256_hex(&body);
                let size = body.len() as i64;
                artifact_row(
                    &mut chunk,
                    self.tag,
                    &tenant.id,
                    &session_id,
                    ("artifact", "text/markdown"),
                    &key,
                    size,
                    &sha,
                    created,
                );
                event(
                    &mut chunk,
                    seq,
                    kind::ARTIFACT_CREATED,
                    json!({ "object_key": key, "size": size, "sha256": sha }),
                );
                listed.push(json!({ "key": key, "size": size, "sha256": sha }));
                chunk.objects.push((key, body));
            }
            seq += 1;
            let checkpoint_key = format!("{prefix}/checkpoints/{:08}.json", 1);
            let manifest = json!({
                "session_id": session_id,
                "tenant_id": tenant.id,
                "version": 1,
                "event_sequence": seq,
                "worker_id": "worker-seed-1",
                "artifacts": listed,
            });
            let body = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
            let sha = sha256_hex(&body);
            let size = body.len() as i64;
            artifact_row(
                &mut chunk,
                self.tag,
                &tenant.id,
                &session_id,
                ("checkpoint", "application/json"),
                &checkpoint_key,
                size,
                &sha,
                created,
            );
            event(
                &mut chunk,
                seq,
                kind::CHECKPOINT_SAVED,
                json!({ "version": 1, "object_key": checkpoint_key, "sha256": sha }),
            );
            chunk.objects.push((checkpoint_key, body));

            let updated = created + ChronoDuration::seconds(seq * 7);
            Row::new(&mut chunk.sessions_copy)
                .text(&session_id)
                .text(&tenant.id)
                .text(account)
                .text(&title)
                .text(status)
                .int(seq + 1)
                .text(&ts(created))
                .text(&ts(updated))
                .end();
            Row::new(&mut chunk.projections_copy)
                .text(&session_id)
                .int(seq)
                .text(&view.to_json().to_string())
                .text(&ts(updated))
                .end();
            Row::new(&mut chunk.leases_copy)
                .text(&session_id)
                .text("worker-seed-1")
                .text(&format!("lease_seed_{idx:x}"))
                .text(&ts(updated))
                .int(1)
                .end();
            Row::new(&mut chunk.usage_copy)
                .text(&tenant.id)
                .text(&session_id)
                .text("prompt_words")
                .int(prompt_words)
                .end();
            chunk.sessions += 1;

            if cfg.bind_every > 0 && idx.is_multiple_of(cfg.bind_every) {
                let bound = idx / cfg.bind_every;
                let binding = &tenant.bindings[(bound % 2) as usize];
                self.render_deliveries(
                    &mut chunk,
                    bound,
                    binding,
                    &session_id,
                    &assistant_seqs,
                    &last_reply,
                    &prefix,
                );
                chunk.bound_sessions += 1;
            }
        }
        chunk
    }

    /// Sent up to a cursor (one dead among them now and then), then one head in a varying
    /// status (pending, claimed with an expired claim, failed awaiting retry), then pending.
    #[allow(clippy::too_many_arguments)]
    fn render_deliveries(
        &self,
        chunk: &mut Chunk,
        bound: u64,
        binding: &str,
        session_id: &str,
        assistant_seqs: &[i64],
        reply: &str,
        prefix: &str,
    ) {
        let k = assistant_seqs.len();
        let delivered = k * 3 / 4;
        let cursor = if delivered > 0 {
            assistant_seqs[delivered - 1]
        } else {
            0
        };
        Row::new(&mut chunk.cursors_copy)
            .text(binding)
            .text(session_id)
            .int(cursor)
            .end();
        let past = ts(self.now - ChronoDuration::minutes(5));
        for (j, &seq) in assistant_seqs.iter().enumerate() {
            let mut payload = json!({ "text": reply });
            if j + 1 == k && self.config.artifacts_per_session > 0 {
                payload["artifact_key"] = json!(format!("{prefix}/artifacts/seed-0/report.md"));
            }
            let (status, attempts, claimed_by, claim_expires, last_error, sent_at) =
                if j < delivered {
                    if bound.is_multiple_of(3) && j == 0 {
                        (
                            "dead",
                            5,
                            None,
                            None,
                            Some("HTTP 410 from channel: gone"),
                            None,
                        )
                    } else {
                        ("sent", 1, None, None, None, Some(past.clone()))
                    }
                } else if j == delivered {
                    match bound % 4 {
                        1 => (
                            "claimed",
                            0,
                            Some("gateway-seed"),
                            Some(past.clone()),
                            None,
                            None,
                        ),
                        2 => ("failed", 2, None, None, Some("HTTP 503 from channel"), None),
                        _ => ("pending", 0, None, None, None, None),
                    }
                } else {
                    ("pending", 0, None, None, None, None)
                };
            match status {
                "dead" => chunk.deliveries.dead += 1,
                "sent" => chunk.deliveries.sent += 1,
                "claimed" => chunk.deliveries.claimed += 1,
                "failed" => chunk.deliveries.failed += 1,
                _ => chunk.deliveries.pending += 1,
            }
            Row::new(&mut chunk.deliveries_copy)
                .text(&public_delivery_id(binding, session_id, seq))
                .text(binding)
                .text(session_id)
                .int(seq)
                .text(&payload.to_string())
                .text(status)
                .int(attempts)
                .text(&past)
                .opt(claimed_by)
                .opt(claim_expires.as_deref())
                .opt(last_error)
                .opt(sent_at.as_deref())
                .end();
        }
    }

    async fn insert_pending_commands(&self, tx: &mut sqlx::PgConnection) -> Result<()> {
        let idle: Vec<u64> = (0..self.config.sessions)
            .filter(|idx| idx % 10 <= 5)
            .take(usize::try_from(self.config.pending_commands).unwrap_or(usize::MAX))
            .collect();
        for (n, idx) in idle.iter().enumerate() {
            sqlx::query(
                "INSERT INTO session_commands (id, session_id, kind, payload, status)
                 VALUES ($1, $2, 'prompt', $3, 'pending')",
            )
            .bind(format!("cmd_{:08x}{idx:012x}ffff", self.tag))
            .bind(self.session_id(*idx))
            .bind(json!({ "text": format!("Follow up on the last answer, please (#{n})") }))
            .execute(&mut *tx)
            .await
            .context("queue a pending command")?;
        }
        Ok(())
    }

    async fn insert_workflows(
        &self,
        tx: &mut sqlx::PgConnection,
        report: &mut SeedReport,
    ) -> Result<()> {
        const SCHEDULES: [i64; 4] = [60, 300, 3600, 86_400];
        let now_ms = self.now.timestamp_millis();
        for w in 0..self.config.workflows {
            let tenant = self.tenant(u64::from(w));
            let id = format!("wf_{:08x}{w:016x}", self.tag);
            let schedule = SCHEDULES[(w % 4) as usize];
            let status = match w % 6 {
                0..=2 => "active",
                3 => "paused",
                4 => "running",
                _ => "failed",
            };
            let next_ms = now_ms + (i64::from(w) * 37 % 600 + 60) * 1000;
            sqlx::query(
                "INSERT INTO workflows (id, tenant_id, name, prompt, schedule_seconds, status,
                                        next_run_at, last_run_at)
                 VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::float8 / 1000),
                         to_timestamp($8::float8 / 1000))",
            )
            .bind(&id)
            .bind(&tenant.id)
            .bind(format!(
                "{} digest {w}",
                capitalise(TOPICS[(w % 8) as usize])
            ))
            .bind(format!(
                "Summarise what changed in the {}",
                TOPICS[(w % 8) as usize]
            ))
            .bind(i32::try_from(schedule).unwrap_or(60))
            .bind(status)
            .bind(next_ms)
            .bind(next_ms - schedule * 1000)
            .execute(&mut *tx)
            .await
            .context("create a workflow")?;
            report.workflows += 1;
            for past in 1..=3i64 {
                let due_ms = next_ms - past * schedule * 1000;
                sqlx::query(
                    "INSERT INTO workflow_runs (id, workflow_id, due_at, idempotency_key,
                                                claimed_by, status)
                     VALUES ($1, $2, to_timestamp($3::float8 / 1000), $4, 'scheduler-seed', $5)",
                )
                .bind(format!("run_{:08x}{w:012x}{past:04x}", self.tag))
                .bind(&id)
                .bind(due_ms)
                .bind(format!("{id}@{due_ms}"))
                .bind(if past == 2 && w % 5 == 0 {
                    "failed"
                } else {
                    "succeeded"
                })
                .execute(&mut *tx)
                .await
                .context("record a past workflow run")?;
                report.workflow_runs += 1;
            }
        }
        Ok(())
    }

    async fn issue_tokens(&self, pool: &PgPool) -> Result<SeedTokens> {
        let operator =
            auth::issue_token(pool, Scope::Operator, None, None, "seed operator").await?;
        let gateway = auth::issue_token(pool, Scope::Gateway, None, None, "seed gateway").await?;
        let mut desktop = Vec::with_capacity(self.tenants.len());
        for tenant in &self.tenants {
            desktop.push(
                auth::issue_token(
                    pool,
                    Scope::Desktop,
                    Some(&tenant.id),
                    Some(&tenant.owner),
                    "seed desktop",
                )
                .await?,
            );
        }
        Ok(SeedTokens {
            operator,
            gateway,
            desktop,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn artifact_row(
    chunk: &mut Chunk,
    tag: u32,
    tenant_id: &str,
    session_id: &str,
    (kind, content_type): (&str, &str),
    key: &str,
    size: i64,
    sha: &str,
    created: DateTime<Utc>,
) {
    // The key is unique and names the seed's tag: its hash makes a unique id without a
    // counter shared across chunks.
    let digest = sha256_hex(key.as_bytes());
    Row::new(&mut chunk.artifacts_copy)
        .text(&format!("art_{tag:08x}{}", &digest[..16]))
        .text(tenant_id)
        .text(session_id)
        .text(kind)
        .text(key)
        .int(size)
        .text(sha)
        .text(content_type)
        .text(&ts(created))
        .end();
}

async fn audit(
    tx: &mut sqlx::PgConnection,
    tenant_id: &str,
    actor: &str,
    action: &str,
    target: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (tenant_id, actor, action, target) VALUES ($1, $2, $3, $4)",
    )
    .bind(tenant_id)
    .bind(actor)
    .bind(action)
    .bind(target)
    .execute(tx)
    .await
    .context("record an audit event")?;
    Ok(())
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A markdown report of about `size` bytes, deterministic per (session, artifact).
pub fn seed_artifact_body(title: &str, session: u64, artifact: u32, size: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(session.rotate_left(17) ^ u64::from(artifact));
    let mut body = format!("# {title}\n\nArtifact {artifact} of session {session}.\n\n");
    while body.len() < size {
        let _ = writeln!(
            body,
            "- {} the {} for {}: {:016x}",
            VERBS[rng.random_range(0..VERBS.len())],
            TOPICS[rng.random_range(0..TOPICS.len())],
            TEAMS[rng.random_range(0..TEAMS.len())],
            rng.random::<u64>()
        );
    }
    body.truncate(size.max(1));
    body.into_bytes()
}

/// Postgres text form of a UTC time.
fn ts(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// One chunk of sessions rendered as COPY text (tab-separated, `\N` for NULL).
#[derive(Default)]
struct Chunk {
    sessions_copy: Vec<u8>,
    events_copy: Vec<u8>,
    projections_copy: Vec<u8>,
    commands_copy: Vec<u8>,
    leases_copy: Vec<u8>,
    artifacts_copy: Vec<u8>,
    usage_copy: Vec<u8>,
    cursors_copy: Vec<u8>,
    deliveries_copy: Vec<u8>,
    objects: Vec<(String, Bytes)>,
    sessions: u64,
    events: u64,
    commands: u64,
    bound_sessions: u64,
    deliveries: DeliveryCounts,
}

impl Chunk {
    /// Streams the chunk into its tables, parents before children.
    async fn copy_into(&self, conn: &mut sqlx::PgConnection) -> Result<()> {
        let tables: [(&str, &Vec<u8>); 9] = [
            (
                "COPY sessions (id, tenant_id, account_id, title, status, next_event_sequence, \
                 created_at, updated_at) FROM STDIN",
                &self.sessions_copy,
            ),
            (
                "COPY session_events (session_id, sequence, kind, payload, created_at) FROM STDIN",
                &self.events_copy,
            ),
            (
                "COPY session_projections (session_id, sequence, view, updated_at) FROM STDIN",
                &self.projections_copy,
            ),
            (
                "COPY session_commands (id, session_id, kind, payload, status, claimed_by, \
                 attempt_count, created_at, updated_at) FROM STDIN",
                &self.commands_copy,
            ),
            (
                "COPY worker_leases (session_id, worker_id, lease_token, expires_at, \
                 checkpoint_version) FROM STDIN",
                &self.leases_copy,
            ),
            (
                "COPY artifact_index (id, tenant_id, session_id, kind, object_key, size_bytes, \
                 sha256, content_type, created_at) FROM STDIN",
                &self.artifacts_copy,
            ),
            (
                "COPY usage_events (tenant_id, session_id, kind, quantity) FROM STDIN",
                &self.usage_copy,
            ),
            (
                "COPY channel_session_bindings (binding_id, session_id, last_event_sequence) \
                 FROM STDIN",
                &self.cursors_copy,
            ),
            (
                "COPY channel_deliveries (public_delivery_id, binding_id, session_id, \
                 event_sequence, payload, status, attempt_count, next_attempt_at, claimed_by, \
                 claim_expires_at, last_error, sent_at) FROM STDIN",
                &self.deliveries_copy,
            ),
        ];
        for (statement, data) in tables {
            if data.is_empty() {
                continue;
            }
            let table = statement.split_whitespace().nth(1).unwrap_or("?");
            let mut copy = conn
                .copy_in_raw(statement)
                .await
                .with_context(|| format!("start copying into {table}"))?;
            copy.send(data.as_slice())
                .await
                .with_context(|| format!("copy rows into {table}"))?;
            copy.finish()
                .await
                .with_context(|| format!("finish copying into {table}"))?;
        }
        Ok(())
    }
}

/// One row of COPY text being written.
struct Row<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Row<'a> {
    fn new(buf: &'a mut Vec<u8>) -> Row<'a> {
        Row { buf, first: true }
    }

    fn sep(&mut self) {
        if !self.first {
            self.buf.push(b'\t');
        }
        self.first = false;
    }

    fn text(mut self, s: &str) -> Row<'a> {
        self.sep();
        for &b in s.as_bytes() {
            match b {
                b'\\' => self.buf.extend_from_slice(b"\\\\"),
                b'\t' => self.buf.extend_from_slice(b"\\t"),
                b'\n' => self.buf.extend_from_slice(b"\\n"),
                b'\r' => self.buf.extend_from_slice(b"\\r"),
                _ => self.buf.push(b),
            }
        }
        self
    }

    fn int(mut self, n: i64) -> Row<'a> {
        self.sep();
        self.buf.extend_from_slice(n.to_string().as_bytes());
        self
    }

    fn opt(mut self, s: Option<&str>) -> Row<'a> {
        match s {
            Some(s) => self.text(s),
            None => {
                self.sep();
                self.buf.extend_from_slice(b"\\N");
                self
            }
        }
    }

    fn end(self) {
        self.buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_and_nulls() {
        let mut buf = Vec::new();
        Row::new(&mut buf)
            .text("a\tb\\c\nd")
            .int(-4)
            .opt(None)
            .opt(Some("x"))
            .end();
        assert_eq!(buf, b"a\\tb\\\\c\\nd\t-4\t\\N\tx\n");
    }

    #[test]
    fn refuses_too_few_events() {
        let mut config = SeedConfig::new(1);
        config.events_per_session = 3;
        let err = config.validate().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("at least --artifacts-per-session")));
    }

    #[test]
    fn renders_consistent_sessions_with_every_delivery_status() {
        let mut config = SeedConfig::new(40);
        config.bind_every = 2;
        config.rng_seed = 7;
        let plan = Plan::new(&config, Utc::now());
        let chunk = plan.render(0..40);
        assert_eq!(chunk.sessions, 40);
        assert_eq!(chunk.events, 40 * 20);
        assert_eq!(chunk.objects.len(), 80);
        let d = chunk.deliveries;
        assert!(
            d.pending > 0 && d.claimed > 0 && d.sent > 0 && d.failed > 0 && d.dead > 0,
            "{d:?}"
        );
        // Same seed, same bytes.
        let again = plan.render(0..40);
        assert_eq!(again.events_copy, chunk.events_copy);
    }
}
