//! The `gateway` role: delivers channel deliveries to a sink, in order per (binding, session),
//! with `public_delivery_id` as the idempotency key; retries with exponential backoff; marks a
//! delivery `dead` after `max_attempts`; advances the delivery cursor only forward.
//!
//! Only the head of each (binding, session) queue is ever claimed, so a later message never
//! overtakes an earlier one, across any number of gateways. Heads are found per cursor row
//! (`channel_session_bindings`, which every delivery references) with one index probe each.
//! A claim expires: a gateway killed mid-send leaves its claim to be taken again, and the
//! resend carries the same idempotency key. A delivery at or behind the stored cursor is marked sent without sending.
//! A message that links an artifact is only sent once the artifact exists in the object store:
//! a restore that lost objects shows up as failing deliveries, not as broken links.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng as _;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::Deps;
use crate::objects;
use crate::schema;
use crate::sink::{self, DeliveryMessage, IDEMPOTENCY_HEADER};

/// Where deliveries go.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// POST each delivery to this URL (e.g. `http://127.0.0.1:9100/deliveries`).
    Http(String),
    /// Append each delivery as one JSON line to this file.
    Jsonl(PathBuf),
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub gateway_id: String,
    pub sink: SinkTarget,
    /// Attempts before a delivery is `dead`.
    pub max_attempts: i32,
    /// Backoff after the first failed attempt; doubles per attempt, jittered.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How long a claim holds before another gateway may take the delivery.
    pub claim_ttl: Duration,
    pub batch: i64,
    pub poll_interval: Duration,
    pub send_timeout: Duration,
}

impl GatewayConfig {
    pub fn new(gateway_id: impl Into<String>, sink: SinkTarget) -> GatewayConfig {
        GatewayConfig {
            gateway_id: gateway_id.into(),
            sink,
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            claim_ttl: Duration::from_secs(30),
            batch: 16,
            poll_interval: Duration::from_millis(100),
            send_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GatewayReport {
    pub sent: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    pub dead: u64,
    /// Deliveries at or behind their cursor, marked sent without sending.
    pub skipped_behind_cursor: u64,
}

struct Claimed {
    id: i64,
    message: DeliveryMessage,
    attempt_count: i32,
}

enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Jsonl {
        path: PathBuf,
        file: std::fs::File,
    },
}

impl Sink {
    fn open(target: &SinkTarget, timeout: Duration) -> Result<Sink> {
        match target {
            SinkTarget::Http(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    anyhow::bail!(
                        "sink URL {url:?} is not an http(s):// URL: pass e.g. \
                         --sink-url http://127.0.0.1:9100/deliveries"
                    );
                }
                objects::install_crypto_provider();
                let client = reqwest::Client::builder()
                    .timeout(timeout)
                    .build()
                    .context("build the sink's HTTP client")?;
                Ok(Sink::Http {
                    client,
                    url: url.clone(),
                })
            }
            SinkTarget::Jsonl(path) => Ok(Sink::Jsonl {
                path: path.clone(),
                file: sink::open_jsonl(path)?,
            }),
        }
    }

    async fn send(&mut self, message: &DeliveryMessage) -> Result<(), String> {
        match self {
            Sink::Http { client, url } => {
                let response = client
                    .post(url.as_str())
                    .header(IDEMPOTENCY_HEADER, &message.public_delivery_id)
                    .json(message)
                    .send()
                    .await
                    .map_err(|e| format!("POST {url}: {e}"))?;
                let status = response.status();
                if status.is_success() {
                    return Ok(());
                }
                let body = response.text().await.unwrap_or_default();
                Err(format!(
                    "POST {url}: HTTP {status}: {}",
                    body.chars().take(200).collect::<String>()
                ))
            }
            Sink::Jsonl { path, file } => {
                sink::append_jsonl(file, message).map_err(|e| format!("{}: {e:#}", path.display()))
            }
        }
    }
}

/// The public id of the delivery of event `sequence` of `session_id` to `binding_id`:
/// `dlv_` and the first 32 hex digits of sha256("binding:session:sequence").
pub fn public_delivery_id(binding_id: &str, session_id: &str, sequence: i64) -> String {
    let digest = objects::sha256_hex(format!("{binding_id}:{session_id}:{sequence}").as_bytes());
    format!("dlv_{}", &digest[..32])
}

pub struct Gateway {
    deps: Deps,
    config: GatewayConfig,
}

impl Gateway {
    pub fn new(deps: Deps, config: GatewayConfig) -> Gateway {
        Gateway { deps, config }
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<GatewayReport> {
        anyhow::ensure!(
            self.config.max_attempts >= 1,
            "--max-attempts must be at least 1, got {}",
            self.config.max_attempts
        );
        schema::ensure_current(&self.deps.pool, self.deps.profile).await?;
        let mut sink = Sink::open(&self.config.sink, self.config.send_timeout)?;
        tracing::info!(gateway = %self.config.gateway_id, sink = ?self.config.sink, "gateway started");
        let mut report = GatewayReport::default();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let worked = match self.pass(&mut sink, &mut report, &cancel).await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!("gateway pass failed, retrying: {e:#}");
                    false
                }
            };
            if !worked {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
        tracing::info!(gateway = %self.config.gateway_id, ?report, "gateway stopped");
        Ok(report)
    }

    /// Claims one batch of queue heads and works through it; returns how many were claimed.
    async fn pass(
        &self,
        sink: &mut Sink,
        report: &mut GatewayReport,
        cancel: &CancellationToken,
    ) -> Result<usize> {
        let claimed = self.claim().await?;
        let n = claimed.len();
        for delivery in claimed {
            if cancel.is_cancelled() {
                // Unprocessed claims expire and are taken again.
                break;
            }
            self.deliver(sink, delivery, report).await?;
        }
        Ok(n)
    }

    async fn claim(&self) -> Result<Vec<Claimed>> {
        let profile = self.deps.profile;
        let ttl_ms = i64::try_from(self.config.claim_ttl.as_millis()).unwrap_or(i64::MAX);
        let rows = sqlx::query(profile.sql(
            "WITH heads AS (
                SELECT h.id
                FROM {channel_session_bindings} c
                JOIN {channel_bindings} b ON b.id = c.binding_id AND b.status = 'active'
                CROSS JOIN LATERAL (
                    SELECT d.id FROM {channel_deliveries} d
                    WHERE d.binding_id = c.binding_id AND d.session_id = c.session_id
                      AND d.status IN ('pending', 'claimed', 'failed')
                    ORDER BY d.event_sequence
                    LIMIT 1
                ) h
             ), due AS (
                SELECT d.id FROM {channel_deliveries} d
                WHERE d.id IN (SELECT id FROM heads)
                  AND ((d.status IN ('pending', 'failed') AND d.next_attempt_at <= now())
                       OR (d.status = 'claimed' AND d.claim_expires_at < now()))
                ORDER BY d.next_attempt_at, d.id
                LIMIT $2
                FOR UPDATE OF d SKIP LOCKED
             )
             UPDATE {channel_deliveries} d
             SET status = 'claimed', claimed_by = $1,
                 claim_expires_at = now() + $3 * interval '1 millisecond', updated_at = now()
             FROM due, {channel_bindings} b
             WHERE d.id = due.id AND b.id = d.binding_id
             RETURNING d.id, d.public_delivery_id, d.binding_id, d.session_id, d.event_sequence,
                       d.payload, d.attempt_count, b.channel, b.target",
        ))
        .bind(&self.config.gateway_id)
        .bind(self.config.batch)
        .bind(ttl_ms)
        .fetch_all(&self.deps.pool)
        .await
        .context("claim due deliveries")?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let attempt_count: i32 = row.try_get("attempt_count")?;
            claimed.push(Claimed {
                id: row.try_get("id")?,
                attempt_count,
                message: DeliveryMessage {
                    public_delivery_id: row.try_get("public_delivery_id")?,
                    binding_id: row.try_get("binding_id")?,
                    channel: row.try_get("channel")?,
                    target: row.try_get("target")?,
                    session_id: row.try_get("session_id")?,
                    event_sequence: row.try_get("event_sequence")?,
                    attempt: attempt_count + 1,
                    payload: row.try_get("payload")?,
                    received_at: None,
                },
            });
        }
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    async fn deliver(
        &self,
        sink: &mut Sink,
        delivery: Claimed,
        report: &mut GatewayReport,
    ) -> Result<()> {
        let profile = self.deps.profile;
        let m = &delivery.message;
        let cursor: Option<i64> = sqlx::query_scalar(profile.sql(
            "SELECT last_event_sequence FROM {channel_session_bindings}
             WHERE binding_id = $1 AND session_id = $2",
        ))
        .bind(&m.binding_id)
        .bind(&m.session_id)
        .fetch_optional(&self.deps.pool)
        .await
        .context("read the delivery cursor")?;
        if cursor.is_some_and(|c| m.event_sequence <= c) {
            if self
                .finish(
                    &delivery,
                    "sent",
                    Some("not re-sent: at or behind the delivery cursor"),
                )
                .await?
            {
                report.skipped_behind_cursor += 1;
            }
            return Ok(());
        }
        let outcome = match self.artifact_missing(&m.payload).await {
            Some(problem) => Err(problem),
            None => sink.send(m).await,
        };
        match outcome {
            Ok(()) => {
                if self.finish(&delivery, "sent", None).await? {
                    report.sent += 1;
                    tracing::debug!(delivery = %m.public_delivery_id, "sent");
                }
            }
            Err(problem) => {
                let attempts = delivery.attempt_count + 1;
                if attempts >= self.config.max_attempts {
                    if self.finish(&delivery, "dead", Some(&problem)).await? {
                        report.dead += 1;
                        tracing::warn!(
                            delivery = %m.public_delivery_id,
                            attempts,
                            "delivery is dead after its last attempt: {problem}"
                        );
                    }
                } else {
                    let backoff = self.backoff(attempts);
                    if self.retry_later(&delivery, &problem, backoff).await? {
                        report.retried += 1;
                        tracing::info!(
                            delivery = %m.public_delivery_id,
                            attempts,
                            ?backoff,
                            "delivery attempt failed, will retry: {problem}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A reason not to send yet when the message links an artifact that is not in the store.
    async fn artifact_missing(&self, payload: &Value) -> Option<String> {
        let key = payload.get("artifact_key").and_then(Value::as_str)?;
        match objects::object_exists(self.deps.objects.as_ref(), key).await {
            Ok(true) => None,
            Ok(false) => Some(format!(
                "artifact {key} is missing from the object store; not sending a broken link"
            )),
            Err(e) => Some(format!("{e:#}")),
        }
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let exponent = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(16);
        let base = self.config.retry_base.saturating_mul(1u32 << exponent);
        let capped = base.min(self.config.retry_max);
        capped.mul_f64(rand::rng().random_range(0.8..1.2))
    }

    /// Marks a claimed delivery final (`sent` or `dead`) and moves the cursor forward to it.
    /// Returns false when the claim was lost (another gateway owns it now).
    async fn finish(&self, delivery: &Claimed, status: &str, note: Option<&str>) -> Result<bool> {
        let profile = self.deps.profile;
        let m = &delivery.message;
        let mut tx = self
            .deps
            .pool
            .begin()
            .await
            .context("begin finishing a delivery")?;
        let updated = sqlx::query(profile.sql(
            "UPDATE {channel_deliveries}
             SET status = $3, attempt_count = attempt_count + CASE WHEN $5 THEN 1 ELSE 0 END,
                 sent_at = CASE WHEN $3 = 'sent' THEN now() ELSE sent_at END,
                 last_error = $4, claimed_by = NULL, claim_expires_at = NULL, updated_at = now()
             WHERE id = $1 AND status = 'claimed' AND claimed_by = $2",
        ))
        .bind(delivery.id)
        .bind(&self.config.gateway_id)
        .bind(status)
        .bind(note)
        .bind(!(status == "sent" && note.is_some()))
        .execute(&mut *tx)
        .await
        .context("mark the delivery")?
        .rows_affected();
        if updated == 0 {
            tracing::warn!(
                delivery = %m.public_delivery_id,
                "lost the claim on this delivery (it expired); leaving it to its new owner"
            );
            return Ok(false);
        }
        sqlx::query(profile.sql(
            "INSERT INTO {channel_session_bindings} (binding_id, session_id, last_event_sequence)
             VALUES ($1, $2, $3)
             ON CONFLICT (binding_id, session_id) DO UPDATE
             SET last_event_sequence = GREATEST({channel_session_bindings}.last_event_sequence,
                                                EXCLUDED.last_event_sequence),
                 updated_at = now()",
        ))
        .bind(&m.binding_id)
        .bind(&m.session_id)
        .bind(m.event_sequence)
        .execute(&mut *tx)
        .await
        .context("advance the delivery cursor")?;
        tx.commit().await.context("commit the delivery")?;
        Ok(true)
    }

    async fn retry_later(
        &self,
        delivery: &Claimed,
        problem: &str,
        after: Duration,
    ) -> Result<bool> {
        let profile = self.deps.profile;
        let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let updated = sqlx::query(profile.sql(
            "UPDATE {channel_deliveries}
             SET status = 'failed', attempt_count = attempt_count + 1, last_error = $3,
                 next_attempt_at = now() + $4 * interval '1 millisecond',
                 claimed_by = NULL, claim_expires_at = NULL, updated_at = now()
             WHERE id = $1 AND status = 'claimed' AND claimed_by = $2",
        ))
        .bind(delivery.id)
        .bind(&self.config.gateway_id)
        .bind(problem)
        .bind(after_ms)
        .execute(&self.deps.pool)
        .await
        .context("schedule a delivery retry")?
        .rows_affected();
        Ok(updated == 1)
    }
}
