//! Bounded smoke checks, one per role, for restore drills (the runbook's steps 7–9):
//!
//! * `worker`: one prompt end to end — web's operator smoke hook creates a session with a
//!   prompt (allowed while frozen), and a worker must claim it, append events and bring the
//!   projection level with them.
//!   In the real profile web has no smoke hook and may be frozen read-only at the database, so
//!   [`worker_direct`] queues the prompt with its own connection (one that opts out of the
//!   freeze) and checks "the command was acked and the projection caught up", reading the
//!   projection through web.
//! * `scheduler`: no active workflow stays overdue (a started scheduler claims what is due;
//!   the unique idempotency key makes a second run per due time impossible).
//! * `gateway`: no delivery stays due unattempted, none arrived out of order, and none that
//!   reached the sink before the point arrived again (re-sends of deliveries made after the
//!   point are expected: the point has them pending, and the sink dedupes them by id).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::Profile;
use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;

const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Serialize)]
pub struct SmokeReport {
    pub role: &'static str,
    pub detail: Value,
    pub elapsed_ms: u64,
}

fn smoke_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("build the smoke HTTP client")
}

/// A session's projection status as web reports it (`base` without a trailing slash).
async fn projection_over_http(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    session: &str,
) -> Result<Value> {
    let url = format!("{base}/api/sessions/{session}/projection-status");
    client
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))
}

/// A worker processed the prompt: events were appended and the projection is level with them.
fn caught_up(projection: &Value) -> bool {
    let events = projection
        .get("event_count")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let lag = projection
        .get("lag")
        .and_then(Value::as_i64)
        .unwrap_or(i64::MAX);
    events > 0 && lag == 0
}

/// Asks web's operator smoke hook for a session with one prompt (it works while web is frozen)
/// and waits until a worker has processed it: events appended, projection level with them.
pub async fn worker(web_url: &str, token: &str, timeout: Duration) -> Result<SmokeReport> {
    let started = Instant::now();
    crate::objects::install_crypto_provider();
    let base = web_url.trim_end_matches('/');
    let client = smoke_client()?;
    let created: Value = post(&client, &format!("{base}/admin/smoke"), token, json!({})).await?;
    let session = created
        .get("session_id")
        .and_then(Value::as_str)
        .with_context(|| format!("web answered a smoke without a session: {created}"))?
        .to_owned();
    loop {
        let status = projection_over_http(&client, base, token, &session).await?;
        if caught_up(&status) {
            return Ok(SmokeReport {
                role: "worker",
                detail: json!({ "session": session, "projection": status }),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        if started.elapsed() > timeout {
            bail!(
                "no worker processed the smoke prompt of session {session} within {}: {status}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The real profile's worker smoke: queues a smoke prompt directly in the database through
/// `pool` (a connection that may write while web's role is frozen read-only), then waits until
/// a worker acked it and the projection caught up. A worker may retry a command, so it checks
/// "acked, projection level with the events", never an exact event count. The projection is
/// read through web (`web`: base URL and operator token) when given, else from the database.
pub async fn worker_direct(
    pool: &PgPool,
    profile: Profile,
    web: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<SmokeReport> {
    let started = Instant::now();
    crate::objects::install_crypto_provider();
    let created = crate::store::create_smoke_session(pool, profile, "cowork-sim smoke")
        .await?
        .context("there is no tenant to run a smoke session in; seed the service first")?;
    let client = smoke_client()?;
    let session = &created.session_id;
    loop {
        let (status, error): (String, Option<String>) = sqlx::query_as(
            profile.sql("SELECT status, last_error FROM {session_commands} WHERE id = $1"),
        )
        .bind(&created.command_id)
        .fetch_one(pool)
        .await
        .with_context(|| format!("read the smoke command {}", created.command_id))?;
        if status == "failed" {
            bail!(
                "the worker failed the smoke prompt of session {session}: {}",
                error.unwrap_or_default()
            );
        }
        let projection = if status == "acked" {
            Some(match web {
                Some((base, token)) => {
                    projection_over_http(&client, base.trim_end_matches('/'), token, session)
                        .await?
                }
                None => json!(crate::store::projection_status(pool, profile, session, None).await?),
            })
        } else {
            None
        };
        if let Some(projection) = projection.as_ref().filter(|p| caught_up(p)) {
            return Ok(SmokeReport {
                role: "worker",
                detail: json!({
                    "session": session,
                    "command": created.command_id,
                    "command_status": status,
                    "projection": projection,
                    "read_through": if web.is_some() { "web" } else { "database" },
                }),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        if started.elapsed() > timeout {
            bail!(
                "no worker processed the smoke prompt of session {session} within {} (command \
                 {status}{})",
                humantime::format_duration(timeout),
                projection
                    .map(|p| format!(", projection {p}"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn post(client: &reqwest::Client, url: &str, token: &str, body: Value) -> Result<Value> {
    let response = client
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {url} answered {status}: {}", text.trim());
    }
    serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON: {text}"))
}

/// Waits until no active workflow is overdue by more than `grace`.
pub async fn scheduler(
    pool: &PgPool,
    profile: Profile,
    grace: Duration,
    timeout: Duration,
) -> Result<SmokeReport> {
    let started = Instant::now();
    loop {
        let overdue = crate::store::overdue_workflows(pool, profile, grace).await?;
        let duplicates: i64 = sqlx::query_scalar(profile.sql(
            "SELECT count(*) FROM (SELECT idempotency_key FROM {workflow_runs} \
             GROUP BY idempotency_key HAVING count(*) > 1) d",
        ))
        .fetch_one(pool)
        .await
        .context("look for duplicate workflow runs")?;
        if duplicates > 0 {
            bail!("{duplicates} due times ran more than once");
        }
        if overdue == 0 {
            return Ok(SmokeReport {
                role: "scheduler",
                detail: json!({ "overdue": 0, "duplicate_runs": 0 }),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        if started.elapsed() > timeout {
            bail!(
                "{overdue} active workflows are still overdue after {}: is the scheduler running?",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How long a delivery may take from the sink to its `sent` row: a delivery first received
/// this close before the point may still be pending in it, and its re-send is legitimate.
pub const SENT_COMMIT_MARGIN: Duration = Duration::from_secs(1);

/// Waits until no pending delivery is due, then checks the sink: nothing out of order, and
/// (given the point's time) nothing received before the point received again.
pub async fn gateway(
    pool: &PgPool,
    profile: Profile,
    sink: &Path,
    point_time: Option<DateTime<Utc>>,
    timeout: Duration,
) -> Result<SmokeReport> {
    let started = Instant::now();
    loop {
        let due: i64 = sqlx::query_scalar(
            profile.sql("SELECT count(*) FROM {channel_deliveries} WHERE status = 'pending' AND next_attempt_at <= now()"),
        )
        .fetch_one(pool)
        .await
        .context("count due deliveries")?;
        if due == 0 {
            let stats = if sink.exists() {
                crate::sink::jsonl_stats(sink)?
            } else {
                crate::sink::SinkStats::default()
            };
            // Deliveries sent after the point are sent again after a restore (the sink dedupes
            // them by public_delivery_id); an arrival out of order means a cursor went wrong.
            if stats.out_of_order > 0 {
                bail!(
                    "the sink {} received {} deliveries out of order",
                    sink.display(),
                    stats.out_of_order
                );
            }
            let resent = match point_time {
                Some(point) => {
                    let margin = chrono::Duration::from_std(SENT_COMMIT_MARGIN)
                        .unwrap_or_else(|_| chrono::Duration::zero());
                    crate::sink::resent_before(sink, point - margin)?
                }
                None => Vec::new(),
            };
            if !resent.is_empty() {
                let shown: Vec<&str> = resent.iter().take(10).map(String::as_str).collect();
                bail!(
                    "the sink {} received {} deliveries again that it had already received \
                     before the point ({}): {}{}; the gateway did not resume from its stored \
                     cursors",
                    sink.display(),
                    resent.len(),
                    point_time.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    shown.join(", "),
                    if resent.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                );
            }
            return Ok(SmokeReport {
                role: "gateway",
                detail: json!({
                    "due": 0,
                    "sink": stats,
                    "point_time": point_time,
                    "resent_before_point": resent.len(),
                }),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        if started.elapsed() > timeout {
            bail!(
                "{due} deliveries are still due after {}: is the gateway running?",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
