//! Run verdicts people see: `[[notify]]` webhooks to real HTTP receivers on loopback (signed,
//! retried, never in a run's way), the per-environment verdict metrics on a real coordinator's
//! `/metrics` (across a restart), and the shipped Prometheus alert rules (promtool, and the
//! series they read against a real scrape).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coordinator::config::Environment;
use coordinator::engine::{Control, StartRun};
use coordinator::notify::{RunEvent, Secret, Webhook};
use coordinator::store::{RunKind, RunRecord, RunState};
use e2e::*;

const PLAN: &str = include_str!("plans/roles-only.toml");
const SECRET: &[u8] = b"webhook-test-secret-0123456789";

fn environment(repository: &Path) -> BTreeMap<String, Environment> {
    let env = test_environment("test", &[("web", 1), ("worker", 2)], repository, PLAN);
    BTreeMap::from([("test".to_owned(), env)])
}

fn webhook(i: usize, url: &str, events: &[RunEvent], timeout: Duration, retries: usize) -> Webhook {
    Webhook {
        name: format!("notify[{i}]"),
        url: url.parse().unwrap(),
        events: events.to_vec(),
        secret: Secret::new(SECRET.to_vec()),
        timeout,
        retries,
        backoff: Duration::from_millis(50),
    }
}

struct Fleet3 {
    dir: tempfile::TempDir,
    certs: PathBuf,
    state_url: String,
}

impl Fleet3 {
    fn new() -> Fleet3 {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(
            dir.path(),
            &["web-1:web", "worker-1:worker", "worker-2:worker"],
        );
        let state_url = format!("sqlite://{}/state.db", dir.path().display());
        Fleet3 {
            dir,
            certs,
            state_url,
        }
    }

    /// While this file exists, web-1's freeze fails (and a run blocks at its first phase).
    fn broken_freeze(&self) -> PathBuf {
        self.dir.path().join("freeze-fails")
    }

    fn agents(&self, url: &str) -> Vec<InProcessAgent> {
        let mut web = agent_settings(&self.certs, self.dir.path(), url, "web-1", "web");
        web.control = toml::from_str(&format!(
            r#"
            freeze = "exec"
            [exec]
            freeze = ["sh", "-c", "test ! -e {marker}"]
            unfreeze = ["true"]
            "#,
            marker = self.broken_freeze().display()
        ))
        .unwrap();
        let mut agents = vec![InProcessAgent::start(web)];
        for name in ["worker-1", "worker-2"] {
            let mut s = agent_settings(&self.certs, self.dir.path(), url, name, "worker");
            s.control = toml::from_str(
                r#"
                scale = "process"
                [process]
                program = "sh"
                args = ["-c", "while true; do sleep 0.05; done"]
                replicas = 1
                stop_grace = "1s"
                "#,
            )
            .unwrap();
            agents.push(InProcessAgent::start(s));
        }
        agents
    }

    async fn coordinator(&self, notify: Vec<Webhook>) -> InProcessCoordinator {
        InProcessCoordinator::start_notifying(
            &self.certs,
            &self.state_url,
            environment(&self.dir.path().join("repository")),
            notify,
        )
        .await
    }
}

fn drill() -> StartRun {
    StartRun {
        environment: "test".into(),
        kind: RunKind::Drill,
        point_id: None,
        plan: None,
        excluded: Vec::new(),
        to_time: None,
        base_backup: false,
    }
}

async fn wait_state(c: &InProcessCoordinator, id: &str, want: RunState) -> RunRecord {
    let store = c.handle.store().clone();
    eventually(
        &format!("run {id} {want}"),
        Duration::from_secs(60),
        async || {
            let run = store.run(id).await.unwrap().unwrap();
            (run.state == want).then_some(run)
        },
    )
    .await
}

/// The value of the sample `series` (name and labels exactly as exposed) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

async fn scrape(c: &InProcessCoordinator) -> String {
    http_get(c.handle.metrics_addr.unwrap(), "/metrics")
        .await
        .unwrap()
}

/// Waits until the scrape holds `series` at `value`; returns the scrape.
async fn wait_sample(c: &InProcessCoordinator, series: &str, value: f64) -> String {
    let addr = c.handle.metrics_addr.unwrap();
    eventually(
        &format!("{series} {value} on /metrics"),
        Duration::from_secs(30),
        async || {
            let text = http_get(addr, "/metrics").await.ok()?;
            (sample(&text, series) == Some(value)).then_some(text)
        },
    )
    .await
}

/// Checks a delivery the way a receiver must: the timestamp header, and the signature over
/// `<timestamp>.<body>` with the shared secret (ring's HMAC, not the coordinator's code).
/// Returns the body.
fn verified(r: &Received) -> serde_json::Value {
    let timestamp = &r.headers["x-rollcall-timestamp"];
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..120).contains(&age), "a fresh timestamp: {timestamp}");
    let signature = r.headers["x-rollcall-signature"]
        .strip_prefix("sha256=")
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&r.body);
    ring::hmac::verify(&key, &signed, &hex::decode(signature).unwrap())
        .expect("the signature verifies with the shared secret");
    // Not with another secret, nor over the body alone.
    let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another secret");
    assert!(ring::hmac::verify(&other, &signed, &hex::decode(signature).unwrap()).is_err());
    assert!(ring::hmac::verify(&key, &r.body, &hex::decode(signature).unwrap()).is_err());
    assert_eq!(r.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.headers["x-rollcall-event"], body["event"]);
    assert_eq!(r.headers["x-rollcall-delivery"], body["delivery"]);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_tell_runs_signed_retry_and_never_hold_a_run_up_and_verdicts_survive_a_restart() {
    let f = Fleet3::new();
    let all = WebhookReceiver::start(0, false).await;
    let flaky = WebhookReceiver::start(2, false).await; // 503, 503, then 204
    let hangs = WebhookReceiver::start(0, true).await; // reads, never answers
    let nobody = free_addr(); // nothing listens: connections are refused
    let finished = [RunEvent::Finished];
    let c = f
        .coordinator(vec![
            webhook(0, &all.url(), &RunEvent::ALL, Duration::from_secs(5), 0),
            webhook(1, &flaky.url(), &finished, Duration::from_secs(5), 3),
            webhook(
                2,
                &format!("http://{nobody}/"),
                &finished,
                Duration::from_secs(5),
                2,
            ),
            webhook(3, &hangs.url(), &finished, Duration::from_secs(120), 0),
        ])
        .await;
    let agents = f.agents(&c.agents_url());
    c.wait_ready(&["web-1", "worker-1", "worker-2"]).await;

    // A drill that passes.
    let passed = c.handle.engine.start_run(drill()).await.unwrap();
    let passed = wait_state(&c, &passed.id, RunState::Succeeded).await;
    // The receiver that never answers holds its delivery for two minutes; the run's driver is
    // done long before (a delivery never waits in a run).
    eventually(
        "the hanging receiver got its request",
        Duration::from_secs(20),
        async || (!hangs.received().is_empty()).then_some(()),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), c.handle.engine.idle())
        .await
        .expect("the run's driver ended while a webhook hangs");

    let first = eventually(
        "run.finished at the receiver",
        Duration::from_secs(20),
        async || all.received().first().cloned(),
    )
    .await;
    let body = verified(&first);
    assert_eq!(body["version"], 1);
    assert_eq!(body["event"], "run.finished");
    assert_eq!(body["run_id"], passed.id.as_str());
    assert_eq!(body["environment"], "test");
    assert_eq!(body["kind"], "drill");
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["reason"], serde_json::Value::Null);
    assert_eq!(body["point"], serde_json::Value::Null);
    assert!(body["duration_seconds"].as_f64().unwrap() > 0.0, "{body}");
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!("drill {} of test succeeded in ", passed.id)),
        "{summary}"
    );
    assert!(!summary.contains("http"), "no links: {summary}");

    // The flaky receiver answered 503 twice; the third attempt, the same delivery signed
    // afresh, got through.
    let tries = eventually(
        "three attempts at the flaky receiver",
        Duration::from_secs(20),
        async || {
            let got = flaky.received();
            (got.len() == 3).then_some(got)
        },
    )
    .await;
    for t in &tries {
        // One body per event for every webhook and every attempt: the same delivery id.
        assert_eq!(verified(t), body);
        assert_eq!(t.body, first.body);
    }
    // Counted: the first and the flaky receiver delivered, the refused one failed after its
    // retries, the hanging one is still out (not counted yet).
    let text = wait_sample(
        &c,
        r#"rollcall_coordinator_notifications_total{event="run.finished",outcome="failed"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"rollcall_coordinator_notifications_total{event="run.finished",outcome="delivered"}"#
        ),
        Some(2.0),
        "{text}"
    );

    // The verdict metrics after a passed drill.
    let text = wait_sample(
        &c,
        r#"rollcall_last_run_succeeded{environment="test",kind="drill"}"#,
        1.0,
    )
    .await;
    let finished_at = passed.finished_at.unwrap().timestamp_millis() as f64 / 1000.0;
    let success = sample(
        &text,
        r#"rollcall_last_success_timestamp_seconds{environment="test",kind="drill"}"#,
    )
    .unwrap();
    assert_eq!(success, finished_at, "the journal's finish time");
    let took = sample(
        &text,
        r#"rollcall_last_success_duration_seconds{environment="test",kind="drill"}"#,
    )
    .unwrap();
    let measured = (passed.finished_at.unwrap() - passed.created_at).num_milliseconds() as f64;
    assert!(
        took > 0.0 && (took * 1000.0 - measured).abs() < 5000.0,
        "{took} s vs {measured} ms"
    );
    assert_eq!(
        sample(&text, r#"rollcall_rpo_seconds{environment="test"}"#),
        Some(3600.0)
    );

    // A drill that blocks: its freeze fails.
    std::fs::write(f.broken_freeze(), "").unwrap();
    let blocked = c.handle.engine.start_run(drill()).await.unwrap();
    let blocked = wait_state(&c, &blocked.id, RunState::Blocked).await;
    let second = eventually(
        "run.blocked at the receiver",
        Duration::from_secs(20),
        async || all.received().get(1).cloned(),
    )
    .await;
    let body = verified(&second);
    assert_eq!(body["event"], "run.blocked");
    assert_eq!(body["run_id"], blocked.id.as_str());
    assert_eq!(body["state"], "blocked");
    let reason = body["reason"].as_str().unwrap();
    assert_eq!(Some(reason), blocked.reason.as_deref());
    assert!(
        reason.contains("phase freeze-writes did not pass"),
        "{reason}"
    );
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!("drill {} of test blocked after ", blocked.id))
            && summary.contains("phase freeze-writes did not pass"),
        "{summary}"
    );
    assert_ne!(
        first.headers["x-rollcall-delivery"],
        second.headers["x-rollcall-delivery"]
    );

    // The verdict turns: the last drill failed; the last success stays the first drill's.
    let text = wait_sample(
        &c,
        r#"rollcall_last_run_succeeded{environment="test",kind="drill"}"#,
        0.0,
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"rollcall_last_success_timestamp_seconds{environment="test",kind="drill"}"#
        ),
        Some(success)
    );
    let ended = sample(
        &text,
        r#"rollcall_last_run_end_timestamp_seconds{environment="test",kind="drill"}"#,
    )
    .unwrap();
    assert!(ended > success, "{ended} after {success}");
    assert_eq!(
        sample(
            &text,
            r#"rollcall_coordinator_notifications_total{event="run.blocked",outcome="delivered"}"#
        ),
        Some(1.0),
        "{text}"
    );

    // Aborting it finishes it: run.finished, state aborted, with the operator's reason.
    c.handle
        .engine
        .control(&blocked.id, Control::Abort)
        .await
        .unwrap();
    let third = eventually(
        "the abort at the receiver",
        Duration::from_secs(20),
        async || all.received().get(2).cloned(),
    )
    .await;
    let body = verified(&third);
    assert_eq!(
        (&body["event"], &body["state"]),
        (&"run.finished".into(), &"aborted".into())
    );
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("aborted by an operator"),
        "{body}"
    );

    // The series the shipped alert rules read are on a real scrape, for this environment: all
    // but the newest point's, as the environment has no point yet, and the one only
    // restore-test environments have (the rules read it with `unless`, so its absence here
    // is what they expect of an ordinary environment).
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/rollcall-alerts.yml"),
    )
    .unwrap();
    let names = metric_names(&rules);
    assert!(names.len() >= 6, "{names:?}");
    assert!(
        names.iter().any(|n| n == "rollcall_restore_test_source"),
        "{names:?}"
    );
    // The recoverable window's series exist only for an environment with base backups, and
    // the schedule's for one with base_backup_schedule: tests/pitr_schedule.rs finds them on a
    // real scrape of one.
    let names: Vec<String> = names
        .into_iter()
        .filter(|n| n != "rollcall_restore_test_source" && n != "rollcall_base_backup_scheduled")
        .filter(|n| !n.starts_with("rollcall_recoverable_") && !n.starts_with("rollcall_wal_"))
        .collect();
    let (point_series, others): (Vec<&String>, Vec<&String>) = names
        .iter()
        .partition(|n| n.starts_with("rollcall_newest_point_"));
    assert_eq!(point_series.len(), 2, "{names:?}");
    let text = scrape(&c).await;
    for name in others {
        assert_series(&text, name);
    }

    // A point committed while the coordinator is down; the next one reads it at start.
    let stamp = chrono::Utc::now() - chrono::Duration::hours(2);
    let point = commit_point(&f, stamp).await;

    // A restarted coordinator reads the verdicts back from the journal.
    for a in agents {
        a.stop().await;
    }
    c.stop().await;
    let c = f.coordinator(Vec::new()).await;
    let text = wait_sample(
        &c,
        r#"rollcall_newest_point_timestamp_seconds{environment="test"}"#,
        point.created_at.timestamp() as f64,
    )
    .await;
    for name in point_series {
        assert_series(&text, name);
    }
    // Two hours old against an RPO of one: what RollcallNewestPointOlderThanRpo fires on.
    assert_eq!(
        sample(
            &text,
            r#"rollcall_newest_point_older_than_rpo{environment="test"}"#
        ),
        Some(1.0)
    );
    let finished_ms = |r: &RunRecord| r.finished_at.unwrap().timestamp_millis() as f64 / 1000.0;
    assert_eq!(
        sample(
            &text,
            r#"rollcall_last_run_succeeded{environment="test",kind="drill"}"#
        ),
        Some(0.0),
        "the aborted drill is the last: {text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"rollcall_last_success_timestamp_seconds{environment="test",kind="drill"}"#
        ),
        Some(finished_ms(&passed)),
        "{text}"
    );
    let took = sample(
        &text,
        r#"rollcall_last_success_duration_seconds{environment="test",kind="drill"}"#,
    )
    .unwrap();
    assert!(
        (took - measured / 1000.0).abs() < 0.01,
        "{took} s vs {measured} ms"
    );
    c.stop().await;
}

/// The scrape has a sample of `name`: for this environment, or (a coordinator-wide series)
/// at all.
fn assert_series(text: &str, name: &str) {
    let labelled = if name.starts_with("rollcall_coordinator_") {
        format!("{name}{{")
    } else {
        format!("{name}{{environment=\"test\"")
    };
    assert!(
        text.lines().any(|l| l.starts_with(&labelled)),
        "the rules read {name}, which the scrape lacks as {labelled}…:\n{text}"
    );
}

/// Commits a recovery point of environment `test` stamped `stamp` (objects only: one small
/// object), as a backup would.
async fn commit_point(f: &Fleet3, stamp: chrono::DateTime<chrono::Utc>) -> repository::Point {
    let repo_url = format!("file://{}", f.dir.path().join("repository").display());
    let repo = repository::Repository::open(&repo_url, Default::default())
        .await
        .unwrap();
    let live = f.dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("a.bin"), b"object").unwrap();
    let (store, _) =
        repository::store_from_url(&format!("file://{}", live.display()), &Default::default())
            .unwrap();
    let part = repository::snapshot_objects(
        &repo,
        store,
        &repository::SnapshotOptions::new("file:///live"),
        None,
    )
    .await
    .unwrap();
    repo.write_point_stamped(
        repository::NewPoint {
            id: repository::PointId::new("test", stamp).unwrap(),
            postgres: None,
            objects: Some(part),
            secrets: vec![],
        },
        stamp,
    )
    .await
    .unwrap()
}

/// The metric names an alert rules file reads.
fn metric_names(rules: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = rules;
    while let Some(i) = rest.find("rollcall_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Alert names (`RollcallBackupFailed`) start with a capital; series with `rollcall_`.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// `promtool` from Debian's `prometheus` package: the shipped rules parse, and their unit tests
/// (`deploy/prometheus/rollcall-alerts.test.yml`) pass.
#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let promtool = ["promtool", "/usr/bin/promtool"].into_iter().find(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .is_ok()
    });
    let Some(promtool) = promtool else {
        assert!(
            std::env::var_os("ROLLCALL_REQUIRE_EMULATORS").is_none(),
            "promtool is required (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "rollcall-alerts.yml"],
        ["test", "rules", "rollcall-alerts.test.yml"],
    ] {
        let out = std::process::Command::new(promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
