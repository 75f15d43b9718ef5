//! The receiving end of channel deliveries: what a Slack or webhook endpoint is to the real
//! gateway. It accepts every message idempotently (by `public_delivery_id`) and *counts* the
//! duplicates and out-of-order arrivals, so a test or a drill can prove the gateway resumed
//! from its cursors without sending anything twice.
//!
//! Two forms: an HTTP server (`cowork-sim sink`), optionally logging what it accepted to a
//! JSONL file it reloads on start; and a JSONL file the gateway appends to directly. Both are
//! read back by [`jsonl_stats`].

use std::collections::{HashMap, HashSet};
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The idempotency header; its value must equal the body's `public_delivery_id`.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// One delivery as sent to a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryMessage {
    pub public_delivery_id: String,
    pub binding_id: String,
    pub channel: String,
    pub target: String,
    pub session_id: String,
    pub event_sequence: i64,
    pub attempt: i32,
    pub payload: Value,
    /// When the sink took it (stamped as it is logged; absent on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<DateTime<Utc>>,
}

/// What a sink has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStats {
    /// Messages accepted, duplicates included.
    pub received: u64,
    /// Distinct `public_delivery_id`s.
    pub unique: u64,
    /// Messages whose `public_delivery_id` had been received before.
    pub duplicates: u64,
    /// First arrivals whose sequence was not above the last one of their (binding, session).
    pub out_of_order: u64,
    /// Attempts refused on purpose (`--fail-first`).
    pub refused: u64,
}

/// Duplicate and order bookkeeping shared by both sink forms.
#[derive(Debug, Default)]
struct Tally {
    /// Every id with its first arrival time (when the log recorded one).
    seen: HashMap<String, Option<DateTime<Utc>>>,
    /// Ids received again, each once.
    repeated: HashSet<String>,
    last_sequence: HashMap<(String, String), i64>,
    stats: SinkStats,
}

impl Tally {
    /// Records a message; returns whether it was a duplicate.
    fn record(&mut self, message: &DeliveryMessage) -> bool {
        self.stats.received += 1;
        if self.seen.contains_key(&message.public_delivery_id) {
            self.stats.duplicates += 1;
            self.repeated.insert(message.public_delivery_id.clone());
            return true;
        }
        self.seen
            .insert(message.public_delivery_id.clone(), message.received_at);
        self.stats.unique += 1;
        let pair = (message.binding_id.clone(), message.session_id.clone());
        let last = self.last_sequence.entry(pair).or_insert(i64::MIN);
        if message.event_sequence <= *last {
            self.stats.out_of_order += 1;
        } else {
            *last = message.event_sequence;
        }
        false
    }
}

/// Reads a JSONL sink file (one [`DeliveryMessage`] per line) and tallies it. A missing file
/// is an empty sink.
pub fn jsonl_stats(path: &Path) -> Result<SinkStats> {
    Ok(read_jsonl(path)?.1.stats)
}

/// The deliveries of a JSONL sink file that arrived again although their first arrival came
/// before `before`, sorted. After a restore to a point taken at `before`, a delivery the
/// gateway had sent by then is recorded as sent in the restored database and must never be
/// sent again (later ones may be: the point has them pending).
pub fn resent_before(path: &Path, before: DateTime<Utc>) -> Result<Vec<String>> {
    let (_, tally) = read_jsonl(path)?;
    let mut resent: Vec<String> = tally
        .repeated
        .iter()
        .filter(|id| {
            tally
                .seen
                .get(*id)
                .copied()
                .flatten()
                .is_some_and(|first| first < before)
        })
        .cloned()
        .collect();
    resent.sort();
    Ok(resent)
}

/// The messages of a JSONL sink file, in arrival order.
pub fn jsonl_messages(path: &Path) -> Result<Vec<DeliveryMessage>> {
    Ok(read_jsonl(path)?.0)
}

fn read_jsonl(path: &Path) -> Result<(Vec<DeliveryMessage>, Tally)> {
    let mut tally = Tally::default();
    let mut messages = Vec::new();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((messages, tally)),
        Err(e) => {
            return Err(e).with_context(|| format!("open sink file {}", path.display()));
        }
    };
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("read sink file {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let message: DeliveryMessage = serde_json::from_str(&line).with_context(|| {
            format!(
                "sink file {} line {}: not a delivery message; was it written by cowork-sim?",
                path.display(),
                n + 1
            )
        })?;
        tally.record(&message);
        messages.push(message);
    }
    Ok((messages, tally))
}

/// Appends one message as a JSON line.
/// Stamps `received_at` (now) unless the message already carries it.
pub fn append_jsonl(file: &mut std::fs::File, message: &DeliveryMessage) -> Result<()> {
    let stamped;
    let message = if message.received_at.is_none() {
        stamped = DeliveryMessage {
            received_at: Some(Utc::now()),
            ..message.clone()
        };
        &stamped
    } else {
        message
    };
    let mut line = serde_json::to_vec(message).context("encode a delivery message")?;
    line.push(b'\n');
    // One write per line: a killed writer leaves whole lines behind.
    file.write_all(&line).context("append to the sink file")
}

/// Opens (creating) a JSONL sink file for appending.
pub fn open_jsonl(path: &Path) -> Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the sink directory {}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open sink file {} for appending", path.display()))
}

#[derive(Debug, Clone, Default)]
pub struct SinkServerConfig {
    /// Where accepted messages are logged (and reloaded from on start).
    pub log: Option<PathBuf>,
    /// Refuse (HTTP 503) the first N attempts of every delivery id: exercises retries.
    pub fail_first: u32,
}

/// The HTTP sink's state; cheap to clone, readable by in-process tests.
#[derive(Clone)]
pub struct SinkHandle(Arc<Mutex<SinkInner>>);

struct SinkInner {
    tally: Tally,
    attempts: HashMap<String, u32>,
    fail_first: u32,
    log: Option<std::fs::File>,
    accepted: Vec<DeliveryMessage>,
}

impl SinkHandle {
    pub fn new(config: &SinkServerConfig) -> Result<SinkHandle> {
        let (accepted, tally, log) = match &config.log {
            Some(path) => {
                let (messages, tally) = read_jsonl(path)?;
                (messages, tally, Some(open_jsonl(path)?))
            }
            None => (Vec::new(), Tally::default(), None),
        };
        Ok(SinkHandle(Arc::new(Mutex::new(SinkInner {
            tally,
            attempts: HashMap::new(),
            fail_first: config.fail_first,
            log,
            accepted,
        }))))
    }

    pub fn stats(&self) -> SinkStats {
        self.lock().tally.stats
    }

    /// Every accepted message in arrival order, duplicates included.
    pub fn accepted(&self) -> Vec<DeliveryMessage> {
        self.lock().accepted.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkInner> {
        // A panic while holding the lock cannot leave the tally half-updated in a way that
        // matters more than losing the sink; keep serving.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub fn sink_router(handle: SinkHandle) -> Router {
    Router::new()
        .route("/deliveries", post(receive))
        .route("/stats", get(stats))
        .with_state(handle)
}

/// Serves the HTTP sink until `cancel` fires.
pub async fn serve_sink(
    listener: tokio::net::TcpListener,
    handle: SinkHandle,
    cancel: CancellationToken,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .context("read the sink's listen address")?;
    tracing::info!(%addr, "sink listening");
    axum::serve(listener, sink_router(handle))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .context("serve the sink")
}

async fn stats(State(handle): State<SinkHandle>) -> Json<SinkStats> {
    Json(handle.stats())
}

async fn receive(
    State(handle): State<SinkHandle>,
    headers: HeaderMap,
    body: Result<Json<DeliveryMessage>, JsonRejection>,
) -> Response {
    let mut message = match body {
        Ok(Json(message)) => message,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.body_text()})),
            )
                .into_response();
        }
    };
    let key = headers
        .get(IDEMPOTENCY_HEADER)
        .and_then(|v| v.to_str().ok());
    if key != Some(message.public_delivery_id.as_str()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "the Idempotency-Key header must equal public_delivery_id"})),
        )
            .into_response();
    }
    let mut guard = handle.lock();
    let inner = &mut *guard;
    let attempts = inner
        .attempts
        .entry(message.public_delivery_id.clone())
        .or_insert(0);
    *attempts += 1;
    if *attempts <= inner.fail_first {
        inner.tally.stats.refused += 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "this sink refuses the first attempts of every delivery"})),
        )
            .into_response();
    }
    message.received_at.get_or_insert_with(Utc::now);
    let duplicate = inner.tally.record(&message);
    if let Some(file) = inner.log.as_mut()
        && let Err(e) = append_jsonl(file, &message)
    {
        tracing::error!("sink log: {e:#}");
    }
    inner.accepted.push(message);
    (StatusCode::OK, Json(json!({ "duplicate": duplicate }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, seq: i64) -> DeliveryMessage {
        DeliveryMessage {
            public_delivery_id: id.into(),
            binding_id: "b".into(),
            channel: "slack".into(),
            target: "#x".into(),
            session_id: "s".into(),
            event_sequence: seq,
            attempt: 1,
            payload: json!({}),
            received_at: None,
        }
    }

    #[test]
    fn finds_deliveries_sent_again_after_a_first_arrival_before_the_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sink.jsonl");
        let at = |secs: i64| Some(DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("time"));
        let mut file = open_jsonl(&path).expect("open");
        for (id, when) in [
            ("early-once", at(0)),
            ("early-twice", at(1)),
            ("late-twice", at(20)),
            ("early-twice", at(30)),
            ("late-twice", at(31)),
        ] {
            let mut m = message(id, 1);
            m.received_at = when;
            append_jsonl(&mut file, &m).expect("append");
        }
        let point = at(10).expect("point");
        assert_eq!(
            resent_before(&path, point).expect("read"),
            ["early-twice"],
            "a re-send of what the point already had as sent is a duplicate; one of what came \
             after the point is expected"
        );
        // Unstamped lines (older sink files) are appended with the time they were written.
        let mut m = message("unstamped", 1);
        m.received_at = None;
        append_jsonl(&mut file, &m).expect("append");
        let last = jsonl_messages(&path).expect("read").pop().expect("one");
        assert!(last.received_at.is_some());
    }

    #[test]
    fn tallies_duplicates_and_order_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sink.jsonl");
        assert_eq!(
            jsonl_stats(&path).expect("missing file"),
            SinkStats::default()
        );
        let mut file = open_jsonl(&path).expect("open");
        for m in [
            message("a", 2),
            message("b", 6),
            message("a", 2),
            message("c", 4),
        ] {
            append_jsonl(&mut file, &m).expect("append");
        }
        let stats = jsonl_stats(&path).expect("stats");
        assert_eq!(stats.received, 4);
        assert_eq!(stats.unique, 3);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.out_of_order, 1);
        std::fs::write(&path, "not json\n").expect("write");
        let err = jsonl_stats(&path).err().map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("line 1")));
    }
}
