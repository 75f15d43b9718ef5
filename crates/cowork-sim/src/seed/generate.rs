//! The seed's plan and its bulk data: names and shapes of tenants derived from the config and
//! the random seed, and sessions with everything that hangs off them, rendered chunk by chunk
//! as COPY text along with their artifacts' bodies. Same seed, same bytes.

use std::fmt::Write as _;

use bytes::Bytes;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

use super::SeedConfig;
use super::copy::{Chunk, Row};
use crate::Profile;
use crate::gateway::public_delivery_id;
use crate::objects::{self, sha256_hex};
use crate::projection::{SessionView, kind};
use crate::worker::reply_text;

/// Deterministic names and shapes derived from the config and the seed.
#[derive(Clone)]
pub(super) struct Plan {
    pub(super) config: SeedConfig,
    pub(super) tag: u32,
    pub(super) now: DateTime<Utc>,
    pub(super) tenants: Vec<TenantPlan>,
    pub(super) profile: Profile,
}

#[derive(Clone)]
pub(super) struct TenantPlan {
    pub(super) id: String,
    pub(super) slug: String,
    pub(super) owner: String,
    pub(super) accounts: Vec<String>,
    pub(super) bindings: Vec<String>,
}

pub(super) const TOPICS: [&str; 8] = [
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
    pub(super) fn new(config: &SeedConfig, now: DateTime<Utc>, profile: Profile) -> Plan {
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
            profile,
        }
    }

    pub(super) fn tenant(&self, session: u64) -> &TenantPlan {
        let n = self.tenants.len() as u64;
        // `tenants` is never empty (validated); index 0 keeps this total.
        &self.tenants[usize::try_from(session % n.max(1)).unwrap_or(0)]
    }

    pub(super) fn session_id(&self, idx: u64) -> String {
        format!("ses_{:08x}{idx:016x}", self.tag)
    }

    /// Renders sessions `range` (and everything hanging off them) as COPY text and objects.
    pub(super) fn render(&self, range: std::ops::Range<u64>) -> Chunk {
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

pub(super) fn capitalise(s: &str) -> String {
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
pub(super) fn ts(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_consistent_sessions_with_every_delivery_status() {
        let mut config = SeedConfig::new(40);
        config.bind_every = 2;
        config.rng_seed = 7;
        let plan = Plan::new(&config, Utc::now(), crate::Profile::Kind);
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
