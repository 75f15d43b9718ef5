//! Webhooks on run events (`[[notify]]` in rollcall.toml): when a run finishes, blocks or
//! fails, the coordinator POSTs a JSON body signed with HMAC-SHA256 to every webhook that
//! wants the event.
//!
//! Delivery never holds a run up: the engine hands a notice to [`Notifier::notify`], which only
//! `try_send`s it to each webhook's bounded queue (a full queue drops it, logged and counted);
//! one task per webhook delivers its queue in order, retrying with jittered exponential backoff
//! (`backon`) a bounded number of times. Every outcome is counted
//! (`rollcall_coordinator_notifications_total{event, outcome}`).
//!
//! What is signed: the bytes `<timestamp>.<body>`, where `<timestamp>` is the decimal unix time
//! in seconds sent in `X-Rollcall-Timestamp` and `<body>` is the exact request body; the
//! signature is `X-Rollcall-Signature: sha256=<lowercase hex>`. Each attempt is signed afresh
//! with its own timestamp; `X-Rollcall-Delivery` stays the same across retries, for receivers
//! to drop a repeat.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::NotifyCounters;
use crate::store::{RunRecord, RunState};

/// Notices waiting per webhook before new ones are dropped.
pub const QUEUE: usize = 64;
/// The longest wait between two attempts of one delivery.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The most retries a webhook may ask for: with [`MAX_BACKOFF`], about 20 minutes.
pub const MAX_RETRIES: usize = 20;
/// The version of the body's shape, sent as `version`.
pub const BODY_VERSION: u32 = 1;

pub const SIGNATURE_HEADER: &str = "x-rollcall-signature";
pub const TIMESTAMP_HEADER: &str = "x-rollcall-timestamp";
pub const EVENT_HEADER: &str = "x-rollcall-event";
pub const DELIVERY_HEADER: &str = "x-rollcall-delivery";

/// The run events a webhook may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RunEvent {
    /// The run ended for good: succeeded, or aborted by an operator (`state` says which).
    Finished,
    /// A gate failed: the run waits for an operator (`retry`, `resume`, `abort`, `undo`).
    Blocked,
    /// The coordinator itself could not go on driving the run (its journal or plan failed);
    /// the run is left blocked with that reason, for an operator to resume once it is fixed.
    Failed,
}

impl RunEvent {
    pub const ALL: [RunEvent; 3] = [RunEvent::Finished, RunEvent::Blocked, RunEvent::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            RunEvent::Finished => "run.finished",
            RunEvent::Blocked => "run.blocked",
            RunEvent::Failed => "run.failed",
        }
    }

    pub fn parse(text: &str) -> Option<RunEvent> {
        RunEvent::ALL.into_iter().find(|e| e.as_str() == text)
    }
}

/// A webhook's shared secret: the key of its signatures. Never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(withheld)")
    }
}

/// One `[[notify]]` webhook, validated.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// How logs name it: `notify[N] (host)`; never the whole URL, which may carry a token.
    pub name: String,
    pub url: reqwest::Url,
    pub events: Vec<RunEvent>,
    pub secret: Secret,
    /// One attempt's limit, connecting included.
    pub timeout: Duration,
    /// Attempts after the first one that failed for a reason that may pass (no answer, 408,
    /// 429, 5xx).
    pub retries: usize,
    /// The wait before the first retry; it doubles (with jitter) up to [`MAX_BACKOFF`].
    pub backoff: Duration,
}

/// What happened to a run, for the webhooks.
#[derive(Debug, Clone)]
pub struct Notice {
    pub event: RunEvent,
    pub run: RunRecord,
    /// The state the run reached (the record may be older).
    pub state: RunState,
    pub reason: Option<String>,
    /// When it reached that state.
    pub at: DateTime<Utc>,
}

/// The JSON body of a delivery (its schema is documented in the README).
#[derive(Debug, Serialize)]
pub struct Body<'a> {
    pub version: u32,
    pub event: &'static str,
    pub delivery: &'a str,
    pub run_id: &'a str,
    pub environment: &'a str,
    pub kind: &'static str,
    pub state: &'static str,
    pub reason: Option<String>,
    pub point: Option<&'a str>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub summary: String,
}

impl Notice {
    /// The body's bytes for delivery `delivery`. The reason passes the redaction every log
    /// line passes.
    pub fn body(&self, delivery: &str) -> Bytes {
        let reason = self
            .reason
            .as_deref()
            .map(|r| api::redact::redact(r).into_owned());
        let seconds = (self.at - self.run.created_at).num_milliseconds().max(0) as f64 / 1000.0;
        let body = Body {
            version: BODY_VERSION,
            event: self.event.as_str(),
            delivery,
            run_id: &self.run.id,
            environment: &self.run.environment,
            kind: self.run.kind.as_str(),
            state: self.state.as_str(),
            summary: summary(self, reason.as_deref(), seconds),
            reason,
            point: self.run.point_id.as_deref(),
            started_at: self.run.created_at,
            finished_at: self.at,
            duration_seconds: seconds,
        };
        serde_json::to_vec(&body)
            .expect("a body of strings, numbers and timestamps always encodes")
            .into()
    }
}

/// One line for people: what ran, where, how it ended, and why; no links.
fn summary(n: &Notice, reason: Option<&str>, seconds: f64) -> String {
    let took = humantime::format_duration(Duration::from_secs(seconds.round() as u64));
    let point = n
        .run
        .point_id
        .as_deref()
        .map(|p| format!(" (point {p})"))
        .unwrap_or_default();
    let head = format!(
        "{} {} of {}{point}",
        n.run.kind, n.run.id, n.run.environment
    );
    match (n.event, n.state, reason) {
        (_, RunState::Succeeded, _) => format!("{head} succeeded in {took}"),
        (RunEvent::Blocked, _, Some(why)) => format!("{head} blocked after {took}: {why}"),
        (RunEvent::Failed, _, Some(why)) => format!("{head} failed after {took}: {why}"),
        (_, state, Some(why)) => format!("{head} ended {state} after {took}: {why}"),
        (_, state, None) => format!("{head} ended {state} after {took}"),
    }
}

/// `sha256=<hex>` of HMAC-SHA256 with `secret` over `<timestamp>.<body>`.
pub fn signature(secret: &Secret, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret.0);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// The engine's side of the webhooks: a cheap clone that never waits.
#[derive(Clone, Default)]
pub struct Notifier {
    queues: Arc<Vec<Queue>>,
    counters: Arc<NotifyCounters>,
}

struct Queue {
    name: String,
    events: Vec<RunEvent>,
    tx: mpsc::Sender<Delivery>,
}

#[derive(Debug, Clone)]
struct Delivery {
    event: RunEvent,
    id: String,
    body: Bytes,
}

impl Notifier {
    /// Starts one delivery task per webhook; they stop when `cancel` fires (the coordinator
    /// stopping): a delivery in progress and the notices still queued are not sent then.
    pub fn start(
        webhooks: Vec<Webhook>,
        counters: Arc<NotifyCounters>,
        cancel: CancellationToken,
    ) -> Result<Notifier> {
        if webhooks.is_empty() {
            return Ok(Notifier {
                queues: Arc::default(),
                counters,
            });
        }
        // reqwest needs a process-wide rustls provider; ours is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // A redirect would carry the signed body somewhere it was not configured to go.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("rollcall/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("build the webhooks' HTTP client")?;
        let mut queues = Vec::new();
        for hook in webhooks {
            for event in &hook.events {
                counters.declare(event.as_str());
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push(Queue {
                name: hook.name.clone(),
                events: hook.events.clone(),
                tx,
            });
            let (client, counters, cancel) = (client.clone(), counters.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = deliver_queue(client, hook, rx, counters) => {}
                }
            });
        }
        Ok(Notifier {
            queues: Arc::new(queues),
            counters,
        })
    }

    /// Queues `notice` for every webhook that wants its event; never waits. A full queue
    /// drops the notice for that webhook (logged, counted `dropped`).
    pub fn notify(&self, notice: &Notice) {
        let mut body = None;
        for q in self
            .queues
            .iter()
            .filter(|q| q.events.contains(&notice.event))
        {
            let delivery = body
                .get_or_insert_with(|| {
                    let id = hex::encode(rand::random::<[u8; 16]>());
                    Delivery {
                        event: notice.event,
                        body: notice.body(&id),
                        id,
                    }
                })
                .clone();
            if q.tx.try_send(delivery).is_err() {
                tracing::warn!(
                    webhook = %q.name,
                    run_id = %notice.run.id,
                    event = notice.event.as_str(),
                    "webhook notice dropped: {QUEUE} notices already wait for this webhook \
                     (it is slow or down)"
                );
                self.counters.count(notice.event.as_str(), "dropped");
            }
        }
    }
}

/// Why one attempt failed, and whether another may pass.
#[derive(Debug)]
struct AttemptError {
    why: String,
    transient: bool,
}

async fn deliver_queue(
    client: reqwest::Client,
    hook: Webhook,
    mut rx: mpsc::Receiver<Delivery>,
    counters: Arc<NotifyCounters>,
) {
    while let Some(delivery) = rx.recv().await {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(hook.backoff)
            .with_max_delay(MAX_BACKOFF.max(hook.backoff))
            .with_max_times(hook.retries)
            .with_jitter();
        let result = (|| attempt(&client, &hook, &delivery))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &AttemptError| e.transient)
            .notify(|e: &AttemptError, delay: Duration| {
                tracing::info!(
                    webhook = %hook.name,
                    delivery = %delivery.id,
                    "webhook delivery failed, retrying in {}: {}",
                    humantime::format_duration(delay),
                    e.why
                );
            })
            .await;
        let event = delivery.event.as_str();
        match result {
            Ok(()) => {
                tracing::debug!(webhook = %hook.name, delivery = %delivery.id, event, "webhook delivered");
                counters.count(event, "delivered");
            }
            Err(e) => {
                tracing::warn!(
                    webhook = %hook.name,
                    delivery = %delivery.id,
                    event,
                    "webhook not delivered: {}{}",
                    e.why,
                    if e.transient { " (retries used up)" } else { "" }
                );
                counters.count(event, "failed");
            }
        }
    }
}

async fn attempt(
    client: &reqwest::Client,
    hook: &Webhook,
    delivery: &Delivery,
) -> Result<(), AttemptError> {
    let timestamp = Utc::now().timestamp();
    let response = client
        .post(hook.url.clone())
        .timeout(hook.timeout)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, delivery.event.as_str())
        .header(DELIVERY_HEADER, &delivery.id)
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(
            SIGNATURE_HEADER,
            signature(&hook.secret, timestamp, &delivery.body),
        )
        .body(delivery.body.clone())
        .send()
        .await;
    match response {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status();
            Err(AttemptError {
                why: format!("the receiver answered {status}"),
                transient: status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT,
            })
        }
        Err(e) => Err(AttemptError {
            // Without the URL: it may carry a token.
            why: if e.is_timeout() {
                format!(
                    "no answer within {} (timeout)",
                    humantime::format_duration(hook.timeout)
                )
            } else {
                api::errors::one_line(&e.without_url())
            },
            transient: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::RunKind;

    fn run() -> RunRecord {
        let created = DateTime::parse_from_rfc3339("2026-12-06T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        RunRecord {
            id: "drill-prod-1".into(),
            kind: RunKind::Drill,
            environment: "prod".into(),
            point_id: Some("prod-20261206T0300".into()),
            plan: String::new(),
            params: serde_json::json!({}),
            state: RunState::Running,
            reason: None,
            epoch: api::model::Epoch::new(1).unwrap(),
            created_at: created,
            updated_at: created,
            finished_at: None,
            seq: 1,
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        let got = signature(
            &Secret::new(b"s3cret".to_vec()),
            1_700_000_000,
            br#"{"a":1}"#,
        );
        assert_eq!(
            got,
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
        // Another timestamp, another body or another secret: another signature.
        let s = Secret::new(b"s3cret".to_vec());
        assert_ne!(got, signature(&s, 1_700_000_001, br#"{"a":1}"#));
        assert_ne!(got, signature(&s, 1_700_000_000, br#"{"a":2}"#));
        assert_ne!(
            got,
            signature(
                &Secret::new(b"other".to_vec()),
                1_700_000_000,
                br#"{"a":1}"#
            )
        );
    }

    #[test]
    fn bodies_say_what_ended_how_and_why_without_secrets() {
        let at = run().created_at + chrono::Duration::seconds(125);
        let blocked = Notice {
            event: RunEvent::Blocked,
            run: run(),
            state: RunState::Blocked,
            reason: Some(
                "phase preflight did not pass: cannot reach postgres://app:hunter2@db/app".into(),
            ),
            at,
        };
        let body: serde_json::Value = serde_json::from_slice(&blocked.body("d-1")).unwrap();
        assert_eq!(body["version"], 1);
        assert_eq!(body["event"], "run.blocked");
        assert_eq!(body["delivery"], "d-1");
        assert_eq!(body["run_id"], "drill-prod-1");
        assert_eq!(body["environment"], "prod");
        assert_eq!(body["kind"], "drill");
        assert_eq!(body["state"], "blocked");
        assert_eq!(body["point"], "prod-20261206T0300");
        assert_eq!(body["started_at"], "2026-12-06T08:00:00Z");
        assert_eq!(body["finished_at"], "2026-12-06T08:02:05Z");
        assert_eq!(body["duration_seconds"], 125.0);
        let text = body.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        let summary = body["summary"].as_str().unwrap();
        assert!(
            summary.starts_with(
                "drill drill-prod-1 of prod (point prod-20261206T0300) blocked after 2m 5s: \
                 phase preflight did not pass"
            ),
            "{summary}"
        );

        let finished = Notice {
            event: RunEvent::Finished,
            state: RunState::Succeeded,
            reason: None,
            ..blocked
        };
        let body: serde_json::Value = serde_json::from_slice(&finished.body("d-2")).unwrap();
        assert_eq!(body["event"], "run.finished");
        assert_eq!(body["state"], "succeeded");
        assert_eq!(body["reason"], serde_json::Value::Null);
        assert_eq!(
            body["summary"],
            "drill drill-prod-1 of prod (point prod-20261206T0300) succeeded in 2m 5s"
        );
    }

    #[test]
    fn events_parse_by_their_names_only() {
        for e in RunEvent::ALL {
            assert_eq!(RunEvent::parse(e.as_str()), Some(e));
        }
        assert_eq!(RunEvent::parse("run.done"), None);
        assert_eq!(RunEvent::parse("finished"), None);
    }

    /// A webhook that never answers holds one delivery in flight and [`QUEUE`] waiting; more
    /// notices are dropped and counted at once, and `notify` never waits for any of it.
    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = mpsc::channel(1);
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                let _ = accepted_tx.try_send(());
            }
        });
        let counters = Arc::new(NotifyCounters::default());
        let cancel = CancellationToken::new();
        let notifier = Notifier::start(
            vec![Webhook {
                name: "notify[0] (127.0.0.1)".into(),
                url: format!("http://{addr}/hook").parse().unwrap(),
                events: vec![RunEvent::Blocked],
                secret: Secret::new(b"k".to_vec()),
                timeout: Duration::from_secs(600),
                retries: 0,
                backoff: Duration::from_millis(10),
            }],
            counters.clone(),
            cancel.clone(),
        )
        .unwrap();
        let notice = |event| Notice {
            event,
            run: run(),
            state: RunState::Blocked,
            reason: Some("gate".into()),
            at: Utc::now(),
        };
        notifier.notify(&notice(RunEvent::Blocked));
        // The first is in flight (the receiver holds its connection) ...
        accepted.recv().await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..QUEUE + 3 {
            notifier.notify(&notice(RunEvent::Blocked));
        }
        // ... a webhook that does not want an event is not offered it ...
        notifier.notify(&notice(RunEvent::Finished));
        assert!(started.elapsed() < Duration::from_secs(1));
        // ... and the three past the queue were dropped.
        assert_eq!(counters.get("run.blocked", "dropped"), 3);
        assert_eq!(counters.get("run.finished", "dropped"), 0);
        assert_eq!(counters.get("run.blocked", "delivered"), 0);
        cancel.cancel();
        hold.abort();
    }

    #[test]
    fn a_secret_is_never_printed() {
        let s = Secret::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "Secret(withheld)");
    }
}
