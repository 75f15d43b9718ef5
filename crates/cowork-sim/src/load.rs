//! The `load` client: keeps creating sessions and prompts through the web role at a steady
//! rate, so a drill runs under write load and the freeze can be observed (writes answer 503
//! while the web role is in maintenance mode).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng as _;
use rand::seq::IndexedRandom as _;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::objects;

/// How many session ids the client remembers to prompt into.
const KNOWN_SESSIONS: usize = 256;
const REPORT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The web role's base URL, e.g. `http://127.0.0.1:8080`.
    pub web_url: String,
    /// A desktop token.
    pub token: String,
    /// Writes per second.
    pub rate: f64,
    /// Stop after this long (else run until cancelled).
    pub duration: Option<Duration>,
    /// Share of writes that create a session rather than prompt an existing one.
    pub new_session_share: f64,
    pub request_timeout: Duration,
}

impl LoadConfig {
    pub fn new(web_url: impl Into<String>, token: impl Into<String>, rate: f64) -> LoadConfig {
        LoadConfig {
            web_url: web_url.into(),
            token: token.into(),
            rate,
            duration: None,
            new_session_share: 0.2,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What the load client saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    pub attempted: u64,
    /// 2xx answers.
    pub accepted: u64,
    /// 503 answers: the service was frozen (or its database unavailable).
    pub frozen: u64,
    /// Other HTTP errors.
    pub rejected: u64,
    /// No HTTP answer at all (connection refused, timeout).
    pub transport_errors: u64,
    pub sessions_created: u64,
    pub prompts_accepted: u64,
}

/// Generates write load until cancelled or `duration` elapses.
pub async fn run(config: LoadConfig, cancel: CancellationToken) -> Result<LoadReport> {
    if !(config.rate.is_finite() && config.rate > 0.0 && config.rate <= 10_000.0) {
        anyhow::bail!(
            "--rate must be between 0 and 10000 writes per second, got {}",
            config.rate
        );
    }
    if !(0.0..=1.0).contains(&config.new_session_share) {
        anyhow::bail!(
            "the share of new sessions must be between 0 and 1, got {}",
            config.new_session_share
        );
    }
    let base = config.web_url.trim_end_matches('/').to_owned();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        anyhow::bail!(
            "web URL {:?} is not an http(s):// URL: pass e.g. --web-url http://127.0.0.1:8080",
            config.web_url
        );
    }
    objects::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(config.request_timeout)
        .build()
        .context("build the load client's HTTP client")?;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut report = LoadReport::default();
    let mut sessions: Vec<String> = Vec::new();
    tracing::info!(url = %base, rate = config.rate, "load started");
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if config.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let create = sessions.is_empty() || rand::rng().random_bool(config.new_session_share);
        let (url, body) = if create {
            let n = report.attempted;
            (
                format!("{base}/api/sessions"),
                json!({ "title": format!("load session {n}") }),
            )
        } else {
            let session = sessions
                .choose(&mut rand::rng())
                .cloned()
                .unwrap_or_default();
            (
                format!("{base}/api/sessions/{session}/prompt"),
                json!({ "text": format!("load prompt {} at {:?}", report.attempted,
                                        started.elapsed()) }),
            )
        };
        report.attempted += 1;
        let response = client
            .post(&url)
            .bearer_auth(&config.token)
            .json(&body)
            .send()
            .await;
        match response {
            Err(e) => {
                report.transport_errors += 1;
                tracing::debug!("load request failed: {e}");
            }
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    report.accepted += 1;
                    if create {
                        report.sessions_created += 1;
                        let created: Value = response.json().await.unwrap_or(Value::Null);
                        if let Some(id) = created.get("id").and_then(Value::as_str) {
                            if sessions.len() >= KNOWN_SESSIONS {
                                sessions.remove(0);
                            }
                            sessions.push(id.to_owned());
                        }
                    } else {
                        report.prompts_accepted += 1;
                    }
                } else if status == StatusCode::SERVICE_UNAVAILABLE {
                    report.frozen += 1;
                } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    let text = response.text().await.unwrap_or_default();
                    anyhow::bail!(
                        "the web role refused the load token (HTTP {status}: {}): pass a desktop \
                         token with --token (env COWORK_TOKEN), e.g. from `cowork-sim seed \
                         --tokens-out FILE` or `cowork-sim token --scope desktop --tenant ID`",
                        text.trim()
                    );
                } else {
                    report.rejected += 1;
                    if status == StatusCode::NOT_FOUND && !create {
                        // The session vanished (e.g. the database was restored to an earlier
                        // point); forget the ids we knew.
                        sessions.clear();
                    }
                }
            }
        }
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            tracing::info!(?report, "load progress");
        }
    }
    tracing::info!(?report, "load stopped");
    Ok(report)
}
