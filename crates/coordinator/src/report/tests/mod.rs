//! The drill report built from real journals (a SQLite store filled as the engine fills it):
//! a full drill, a blocked run without its point, and the refusals of `build`.

#![allow(clippy::unwrap_used)]

use api::model::output::{PreflightOutput, PreparePostgresOutput, RestorePostgresOutput};
use api::model::{ActionKind, ActionOutput, Outcome};
use repository::PointId;
use serde_json::json;

use super::*;
use crate::config::Environment;
use crate::store::{PhaseState, RunState};

mod fixture;

use fixture::*;

#[tokio::test]
async fn a_full_drill_fills_every_required_field_from_the_journal() {
    let j = journal().await;
    full_drill(&j).await;
    let point = point();
    let env = environment(vec![cookie_secret("v4")]);
    let report = build(
        &*j.store,
        RUN,
        &env,
        Some(&point),
        &[
            "re-run gateway smoke with a longer timeout@alice".to_owned(),
            format!("rotate the operator token {TOKEN}@bob"),
        ],
        &["local Desktop threads (stay local)".to_owned()],
    )
    .await
    .unwrap();
    let v = report.to_json();

    assert_eq!(v["format"], FORMAT);
    assert_eq!(v["environment"]["name"], "prod");
    assert_eq!(v["environment"]["repository"], "s3://cowork-backups/prod");
    assert_eq!(v["run"]["id"], RUN);
    assert_eq!(v["run"]["state"], "running");
    assert_eq!(v["run"]["plan"], "default");
    assert_eq!(v["run"]["started_at"], json!(at(10, 0, 0)));
    assert_eq!(v["target"]["point_id"], POINT);
    assert_eq!(v["target"]["point_created_at"], json!(at(7, 31, 0)));
    assert_eq!(
        v["postgres"]["backup_key"],
        format!("postgres/{POINT}.dump.zst")
    );
    assert_eq!(
        v["postgres"]["backup_sha256"],
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    assert_eq!(v["postgres"]["restored_at"], json!(at(10, 6, 0)));
    assert_eq!(v["postgres"]["database"], "cowork");
    assert_eq!(v["pre_restore_database"], "cowork_pre_r1a2b3c4d");
    assert_eq!(v["objects"]["snapshot_id"], "20261125T073000Z-3f2a9c01");
    assert_eq!(v["objects"]["replaced"], 3);
    assert_eq!(v["objects"]["removed"], 9);
    assert_eq!(v["quarantine_prefix"], "quarantine/r1a2b3c4d");

    // Secret references: the point's, plus the environment's newer version; no values.
    let refs = v["secret_refs"].as_array().unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0]["version"], "v3");
    assert_eq!(refs[0]["source"], "recovery point");
    assert_eq!(refs[1]["version"], "v4");
    assert_eq!(
        refs[0]["reference"],
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:cowork/cookie-AbCdEf"
    );
    assert_eq!(
        refs[0]["kms_key"],
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd"
    );

    // Counts before → point → after, the environment's runbook rows first and in its order.
    let row = |key: &str| {
        report
            .counts
            .iter()
            .find(|c| c.key == key)
            .cloned()
            .unwrap()
    };
    let keys: Vec<&str> = report
        .counts
        .iter()
        .take(8)
        .map(|c| c.key.as_str())
        .collect();
    let configured: Vec<String> = cowork_rows().into_iter().map(|r| r.count).collect();
    assert_eq!(keys, configured);
    assert!(report.counts.iter().take(8).all(|c| c.configured));
    assert!(report.counts.iter().skip(8).all(|c| !c.configured));
    assert_eq!(v["counts"][0]["label"], "Sessions");
    assert_eq!(v["counts"][0]["configured"], true);
    let sessions = row("sessions");
    assert_eq!(
        (
            sessions.before,
            sessions.at_point,
            sessions.after,
            sessions.matches_point
        ),
        (Some(131), Some(120), Some(120), Some(true))
    );
    let pending = row("channel_deliveries[status=pending]");
    assert_eq!(
        (pending.before, pending.at_point, pending.after),
        (Some(6), Some(4), Some(4))
    );
    // No dead deliveries at the point: counted by status, so 0 rather than unknown.
    let dead = row("channel_deliveries[status=dead]");
    assert_eq!(
        (dead.before, dead.at_point, dead.after),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(row("session_events").at_point, Some(5400));
    assert!(report.counts.iter().all(|c| c.matches_point == Some(true)));

    // Every check with its result, preflight and smoke included.
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "recovery point verification",
            "recovery point verification",
            "count parity",
            "no projection ahead of its events",
            "readyz",
            "operator diagnostics",
            "metrics",
            "artifact objects",
            "worker smoke",
            "scheduler smoke",
            "smoke",
        ]
    );
    let gateway = report.checks.last().unwrap();
    assert_eq!(gateway.passed, Some(false));
    assert_eq!(gateway.agent, "gateway-1");
    assert!(
        gateway
            .detail
            .starts_with("timed_out: smoke did not finish within 1m")
    );
    assert!(
        gateway.detail.contains("***@cowork.example"),
        "{}",
        gateway.detail
    );

    // Phases with durations; the report phase is still running.
    assert_eq!(report.phases.len(), 14);
    assert_eq!(report.phases[3].duration_ms, Some(300_000));
    assert_eq!(report.phases[3].action.as_deref(), Some("restore-postgres"));
    assert_eq!(report.phases[13].state, "not started");
    let reference = report
        .checks
        .iter()
        .find(|c| c.kind == "reference")
        .expect("the reference check is reported");
    assert_eq!(
        (
            reference.phase.as_str(),
            reference.name.as_str(),
            reference.passed
        ),
        ("check-references", "artifact objects", Some(true))
    );
    assert!(reference.detail.contains("checked all 40 rows"));

    // RTO from the freeze to the end of restore-replicas; RPO: the point's age then.
    assert_eq!(v["rto"]["measured_from"], "start of phase freeze-writes");
    assert_eq!(v["rto"]["measured_ms"], 11 * 60_000 + 20_000);
    assert_eq!(v["rto"]["until_phase"], "restore-replicas");
    assert_eq!(v["rto"]["objective_ms"], 4 * 3_600_000);
    assert_eq!(v["rto"]["met"], true);
    assert_eq!(v["rpo"]["point_age_ms"], (2 * 3600 + 29 * 60 + 40) * 1000);
    assert_eq!(v["rpo"]["met"], true);

    // Follow-ups: the operator's with owners, the failed optional phase and check.
    let follow: Vec<(String, Option<String>, String)> = report
        .follow_ups
        .iter()
        .map(|f| (f.text.clone(), f.owner.clone(), f.source.clone()))
        .collect();
    assert_eq!(follow[0].0, "re-run gateway smoke with a longer timeout");
    assert_eq!(follow[0].1.as_deref(), Some("alice"));
    assert_eq!(follow[1].0, "rotate the operator token [REDACTED]");
    assert_eq!(follow[1].1.as_deref(), Some("bob"));
    assert_eq!(
        follow[2].0,
        "optional phase gateway-smoke failed: 0 of 1 gateway; smoke on gateway-1: \
         timed_out: smoke did not finish within 1m; owner ***@cowork.example"
    );
    assert_eq!(
        (follow[2].1.as_deref(), follow[2].2.as_str()),
        (None, "phase")
    );
    assert_eq!(
        follow[3].0,
        "optional check metrics on web-1 failed: GET http://127.0.0.1:8080/api/metrics → 503"
    );
    assert_eq!(follow.len(), 4, "{follow:?}");
    assert_eq!(report.outcome, "passed with warnings");
    assert_eq!(
        report.excluded,
        [
            "local Desktop threads (stay local)".to_owned(),
            "objects the restore replaced (3) or removed (9) are not in the live store: \
             they are kept under quarantine/r1a2b3c4d"
                .to_owned()
        ]
    );

    let md = report.to_markdown();
    assert!(
        md.starts_with("# Restore drill report: prod — 2026-11-25\n"),
        "{md}"
    );
    assert!(
        md.contains("| Data | Key | Before | At point | After | After = point |"),
        "{md}"
    );
    assert!(
        md.contains("| Sessions | `sessions` | 131 | 120 | 120 | yes |"),
        "{md}"
    );
    assert!(
        md.contains("| Dead deliveries | `channel_deliveries[status=dead]` | 1 | 0 | 0 | yes |"),
        "{md}"
    );
    assert!(
        md.contains("| Pre-restore database (kept) | `cowork_pre_r1a2b3c4d` |"),
        "{md}"
    );
    assert!(
        md.contains("| Quarantine prefix | `quarantine/r1a2b3c4d` |"),
        "{md}"
    );
    assert!(md.contains("| re-run gateway smoke with a longer timeout | alice | operator |"));
    assert!(
        md.contains("11m 20s from start of phase freeze-writes — objective 4h — met"),
        "{md}"
    );
    for section in [
        "## Summary",
        "## Postgres",
        "## Object storage",
        "## Secret manager and KMS references",
        "## Counts before and after the restore",
        "## Checks and smoke commands",
        "## Data intentionally excluded",
        "## Pre-restore data kept",
        "## Phases",
        "## Recovery objectives",
        "## Follow-ups",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }

    // No planted secret in either form.
    let json_text = v.to_string();
    for secret in [TOKEN, PASSWORD, "ops@cowork.example"] {
        assert!(
            !md.contains(secret),
            "{secret} leaked into the Markdown:\n{md}"
        );
        assert!(!json_text.contains(secret), "{secret} leaked into the JSON");
    }
    // The message with the password is not a check here, but a phase detail could carry it.
    assert!(!md.contains("hunter2"));
}

/// Labels and keys of the report's count rows, with whether each is configured.
fn count_labels(report: &DrillReport) -> Vec<(String, String, bool)> {
    report
        .counts
        .iter()
        .map(|c| (c.label.clone(), c.key.clone(), c.configured))
        .collect()
}

#[tokio::test]
async fn without_report_rows_every_recorded_count_is_listed_by_its_key() {
    let j = journal().await;
    full_drill(&j).await;
    let env = Environment {
        report_rows: Vec::new(),
        ..environment(Vec::new())
    };
    let report = build(&*j.store, RUN, &env, Some(&point()), &[], &[])
        .await
        .unwrap();
    // Every key any source recorded, each once, sorted, labelled by itself.
    let mut recorded: Vec<String> = point()
        .table_counts()
        .unwrap()
        .keys()
        .chain(live_counts().keys())
        .cloned()
        .collect();
    recorded.sort();
    recorded.dedup();
    let want: Vec<(String, String, bool)> = recorded
        .iter()
        .map(|k| (k.clone(), k.clone(), false))
        .collect();
    assert_eq!(count_labels(&report), want);
    let dead = report
        .counts
        .iter()
        .find(|c| c.key == "channel_deliveries[status=dead]")
        .unwrap();
    assert_eq!((dead.before, dead.at_point), (Some(1), Some(0)));

    // Neither rendering carries another service's labels.
    let md = report.to_markdown();
    let json = report.to_json().to_string();
    for label in cowork_rows().iter().map(|r| &r.label) {
        assert!(!md.contains(&format!("| {label} |")), "{label}: {md}");
        assert!(!json.contains(&format!("\"{label}\"")), "{label}: {json}");
    }
    assert!(
        md.contains(
            "No report rows are configured for environment prod \
             (`[environments.prod.report] rows`)"
        ),
        "{md}"
    );
    assert!(
        md.contains("| sessions | `sessions` | 131 | 120 | 120 | yes |"),
        "{md}"
    );
    assert_eq!(report.to_json()["counts"][0]["configured"], false);
}

#[tokio::test]
async fn report_rows_name_another_services_counts_in_their_order() {
    let j = journal().await;
    full_drill(&j).await;
    let row = |label: &str, count: &str| crate::config::ReportRow {
        label: label.to_owned(),
        count: count.to_owned(),
    };
    let env = Environment {
        report_rows: vec![
            row("Failed deliveries", "channel_deliveries[status=failed]"),
            row("Conversations", "sessions"),
            row("Invoices", "billing.invoices"),
        ],
        ..environment(Vec::new())
    };
    let report = build(&*j.store, RUN, &env, Some(&point()), &[], &[])
        .await
        .unwrap();
    let labels = count_labels(&report);
    assert_eq!(
        labels[..3],
        [
            (
                "Failed deliveries".to_owned(),
                "channel_deliveries[status=failed]".to_owned(),
                true
            ),
            ("Conversations".to_owned(), "sessions".to_owned(), true),
            ("Invoices".to_owned(), "billing.invoices".to_owned(), true),
        ]
    );
    // The rest: recorded keys no row shows, by key; none twice.
    assert!(labels[3..].iter().all(|(l, k, c)| l == k && !c));
    assert!(!labels[3..].iter().any(|(_, k, _)| k == "sessions"));
    assert!(labels[3..].iter().any(|(_, k, _)| k == "session_events"));

    let md = report.to_markdown();
    assert!(
        md.contains("| Conversations | `sessions` | 131 | 120 | 120 | yes |"),
        "{md}"
    );
    // A configured count nothing recorded is shown, as a gap.
    assert!(
        md.contains(
            "| Invoices | `billing.invoices` | not recorded | not recorded | not recorded | \
             not recorded |"
        ),
        "{md}"
    );
    assert!(!md.contains("No report rows are configured"), "{md}");
    let v = report.to_json();
    assert_eq!(v["counts"][2]["label"], "Invoices");
    assert_eq!(v["counts"][2]["at_point"], serde_json::Value::Null);
    assert_eq!(v["counts"][2]["configured"], true);
}

#[tokio::test]
async fn a_blocked_run_without_its_point_shows_the_gaps() {
    let j = journal().await;
    let reason = format!(
        "phase restore-postgres did not pass: db-1: restore-postgres failed: connect to \
         postgres://rollcall:{PASSWORD}@db.internal/cowork refused; traffic stays frozen"
    );
    j.run(RunState::Blocked, Some(&reason)).await;
    use PhaseState::{Blocked, Passed};
    j.phase(
        0,
        "preflight",
        Passed,
        at(10, 0, 1),
        Some(at(10, 0, 31)),
        "ok",
    )
    .await;
    j.command(
        (0, "preflight"),
        "db-1",
        ActionKind::Preflight,
        0,
        Some(Outcome::Succeeded),
        "verified",
        Some(ActionOutput::Preflight(PreflightOutput {
            verify: None,
            live_counts: Some(live_counts()),
            checks: vec![],
        })),
        at(10, 0, 30),
    )
    .await;
    j.phase(
        1,
        "freeze-writes",
        Passed,
        at(10, 0, 40),
        Some(at(10, 0, 42)),
        "ok",
    )
    .await;
    j.phase(
        2,
        "scale-to-zero",
        Passed,
        at(10, 0, 43),
        Some(at(10, 0, 50)),
        "ok",
    )
    .await;
    j.phase(
        3,
        "restore-postgres",
        Blocked,
        at(10, 1, 0),
        Some(at(10, 2, 0)),
        &reason,
    )
    .await;
    j.command(
        (3, "restore-postgres"),
        "db-1",
        ActionKind::RestorePostgres,
        0,
        Some(Outcome::Failed),
        &format!("connect to postgres://rollcall:{PASSWORD}@db.internal/cowork refused"),
        None,
        at(10, 1, 59),
    )
    .await;
    // A command the agent never answered.
    j.command(
        (6, "verify"),
        "web-1",
        ActionKind::Verify,
        0,
        None,
        "",
        None,
        at(10, 2, 1),
    )
    .await;

    let report = build(&*j.store, RUN, &environment(Vec::new()), None, &[], &[])
        .await
        .unwrap();
    assert_eq!(report.outcome, "blocked");
    assert!(!report.target.point_file_read);
    assert_eq!(report.target.point_id.as_deref(), Some(POINT));
    // Without the point file, its time comes from its id.
    assert_eq!(report.target.point_created_at, Some(at(7, 30, 0)));
    assert_eq!(report.postgres.backup_key, None);
    assert_eq!(report.postgres.restored_at, None);
    assert_eq!(report.rto.met, Some(false));
    assert_eq!(
        report.rto.note.as_deref(),
        Some("the run is blocked: the service was not restored")
    );
    let sessions = report.counts.iter().find(|c| c.key == "sessions").unwrap();
    assert_eq!(
        (sessions.before, sessions.at_point, sessions.after),
        (Some(131), None, None)
    );
    let unanswered = report.checks.iter().find(|c| c.agent == "web-1").unwrap();
    assert_eq!(unanswered.passed, None);
    assert!(report.follow_ups.iter().any(|f| f.source == "run"));
    assert!(
        report
            .phases
            .iter()
            .any(|p| p.name == "verify" && p.state == "not started")
    );

    let md = report.to_markdown();
    assert!(md.contains("| Backup sha256 | not recorded |"), "{md}");
    assert!(
        md.contains("| Sessions | `sessions` | 131 | not recorded | not recorded | not recorded |"),
        "{md}"
    );
    assert!(md.contains("No secret references: not recorded."), "{md}");
    assert!(md.contains("**not met**"), "{md}");
    assert!(
        md.contains("postgres://rollcall:***@db.internal/cowork"),
        "{md}"
    );
    let json_text = report.to_json().to_string();
    assert!(!md.contains(PASSWORD), "{md}");
    assert!(!json_text.contains(PASSWORD));
}

/// A point stamped 20 minutes after the drill froze the fleet (its clock ran fast): the RPO is
/// never "met" by an age below zero, and the report says why.
#[tokio::test]
async fn a_point_stamped_in_the_future_does_not_meet_the_rpo() {
    let j = journal().await;
    full_drill(&j).await;
    let mut point = point();
    point.created_at = at(10, 20, 0);
    let env = environment(vec![cookie_secret("v4")]);
    let report = build(&*j.store, RUN, &env, Some(&point), &[], &[])
        .await
        .unwrap();
    let v = report.to_json();
    assert!(v["rpo"]["point_age_ms"].as_i64().unwrap() < -60_000, "{v}");
    assert_eq!(v["rpo"]["met"], false);
    let text = report.to_markdown();
    assert!(
        text.contains(
            "point stamped 19m 20s in the future at start of phase freeze-writes (a clock ran \
             fast when it was taken): its age is unknown"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn refuses_another_environment_or_point() {
    let j = journal().await;
    j.run(RunState::Running, None).await;
    let mut other = environment(Vec::new());
    other.name = api::model::Environment::parse("staging").unwrap();
    let err = build(&*j.store, RUN, &other, None, &[], &[])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("belongs to environment prod"),
        "{err}"
    );
    let mut wrong = point();
    wrong.id = PointId::parse("20261124T073000Z-prod-00000000").unwrap();
    let err = build(
        &*j.store,
        RUN,
        &environment(Vec::new()),
        Some(&wrong),
        &[],
        &[],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("restored point"), "{err}");
    let err = build(
        &*j.store,
        "no-such-run",
        &environment(Vec::new()),
        None,
        &[],
        &[],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no run no-such-run"), "{err}");
}

/// The default plan prepares Postgres before the freeze and commits it after: the report reads
/// them as one restore that started with the prepare and was swapped in by the commit, and
/// shows the freeze window apart from the whole run.
#[tokio::test]
async fn a_prepared_and_committed_restore_reads_as_one() {
    use PhaseState::Passed;
    let j = journal().await;
    j.run_with(crate::plan::DEFAULT_PLAN, RunState::Running, None)
        .await;
    type Clock = (u32, u32, u32);
    let steps: [(u32, &str, Clock, Clock); 15] = [
        (0, "preflight", (10, 0, 1), (10, 0, 30)),
        (1, "prepare-postgres", (10, 0, 31), (10, 5, 0)),
        (2, "freeze-writes", (10, 5, 1), (10, 5, 2)),
        (3, "scale-to-zero", (10, 5, 3), (10, 5, 10)),
        (4, "commit-postgres", (10, 5, 11), (10, 5, 12)),
        (5, "restore-objects", (10, 5, 11), (10, 5, 20)),
        (6, "start-web", (10, 5, 21), (10, 5, 30)),
        (7, "verify", (10, 5, 31), (10, 6, 0)),
        (8, "check-references", (10, 6, 1), (10, 6, 2)),
        (9, "worker-smoke", (10, 6, 3), (10, 6, 30)),
        (10, "scheduler-smoke", (10, 6, 31), (10, 6, 40)),
        (11, "gateway-smoke", (10, 6, 41), (10, 6, 50)),
        (12, "restore-replicas", (10, 6, 51), (10, 7, 0)),
        (13, "report", (10, 7, 1), (10, 7, 2)),
        (14, "unfreeze", (10, 7, 3), (10, 7, 5)),
    ];
    for (index, name, (h, m, s), (h2, m2, s2)) in steps {
        j.phase(index, name, Passed, at(h, m, s), Some(at(h2, m2, s2)), "ok")
            .await;
    }
    j.command(
        (1, "prepare-postgres"),
        "db-1",
        ActionKind::PreparePostgres,
        0,
        Some(Outcome::Succeeded),
        "prepare-postgres done",
        Some(ActionOutput::PreparePostgres(PreparePostgresOutput {
            database: "cowork".to_owned(),
            restore_database: "cowork_restore_r1a2b3c4d".to_owned(),
            point: POINT.to_owned(),
            archive_bytes: 3_145_728,
            counts: live_counts(),
            elapsed_ms: 268_000,
            physical: None,
        })),
        at(10, 4, 59),
    )
    .await;
    j.command(
        (4, "commit-postgres"),
        "db-1",
        ActionKind::CommitPostgres,
        0,
        Some(Outcome::Succeeded),
        "commit-postgres done",
        Some(ActionOutput::CommitPostgres(RestorePostgresOutput {
            database: "cowork".to_owned(),
            pre_restore_database: "cowork_pre_r1a2b3c4d".to_owned(),
            point: POINT.to_owned(),
            archive_bytes: 0,
            resumed: String::new(),
            elapsed_ms: 900,
            physical: None,
        })),
        at(10, 5, 12),
    )
    .await;
    j.store
        .set_run_state(
            RUN,
            RunState::Succeeded,
            None,
            at(10, 7, 5),
            api::model::Epoch::new(3).unwrap(),
        )
        .await
        .unwrap();

    let report = build(
        &*j.store,
        RUN,
        &environment(vec![]),
        Some(&point()),
        &[],
        &[],
    )
    .await
    .unwrap();
    let pg = &report.postgres;
    assert_eq!(
        pg.restore_started_at,
        Some(at(10, 0, 31)),
        "with the prepare"
    );
    assert_eq!(
        pg.restored_at,
        Some(at(10, 5, 12)),
        "when the commit swapped"
    );
    assert_eq!(
        pg.archive_bytes,
        Some(3_145_728),
        "what the prepare restored"
    );
    assert_eq!(
        pg.pre_restore_database.as_deref(),
        Some("cowork_pre_r1a2b3c4d")
    );
    assert_eq!(pg.elapsed_ms, Some(268_900));
    assert_eq!(report.outcome, "passed");
    let rto = &report.rto;
    assert_eq!(rto.measured_from, "start of phase freeze-writes");
    assert_eq!(rto.freeze_window_ms, Some(124_000), "10:05:01 to 10:07:05");
    assert_eq!(rto.run_ms, Some(425_000), "10:00:00 to 10:07:05");
    let md = report.to_markdown();
    assert!(
        md.contains("| Freeze window (writes off) | 2m 4s |"),
        "{md}"
    );
}

/// References are names, not secrets: the report prints them as recorded (a harmless name or
/// reference that merely mentions "secret" or "token" is not a credential), but a local path
/// inside a reference is withheld, as the runbook forbids local paths in reports.
#[tokio::test]
async fn secret_references_print_as_they_are_and_local_paths_are_withheld() {
    let j = journal().await;
    full_drill(&j).await;
    let reference =
        |name: &str, manager: &str, reference: &str, kms: Option<&str>| repository::SecretRef {
            name: name.to_owned(),
            manager: manager.to_owned(),
            reference: reference.to_owned(),
            version: Some("AWSCURRENT".to_owned()),
            kms_key: kms.map(str::to_owned),
            rotated_at: None,
        };
    let shown = [
        reference(
            "cookie-secret",
            "aws-secrets-manager",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/cookie",
            Some("arn:aws:kms:us-east-1:123456789012:key/1234abcd"),
        ),
        reference(
            "stripe-webhook-secret",
            "vault",
            "secret:prod/stripe-webhook",
            None,
        ),
        reference(
            "gateway-service-token",
            "kubernetes",
            "secret=gateway/service-token",
            None,
        ),
        reference(
            "oidc-client-secret",
            "gcp-secret-manager",
            "projects/cowork/secrets/oidc-client-secret/versions/3",
            Some("projects/cowork/locations/global/keyRings/r/cryptoKeys/byok"),
        ),
    ];
    let local = [
        reference("channel-token", "file", "/home/alice/secrets/x", None),
        reference("tls-key", "file", "/etc/app/secret.key", None),
        reference(
            "billing",
            "sops",
            "file:///var/lib/app/secrets/billing.enc",
            None,
        ),
    ];
    let env = environment(shown.iter().chain(&local).cloned().collect());
    let mut point = point();
    point.secrets = Vec::new();
    let report = build(&*j.store, RUN, &env, Some(&point), &[], &[])
        .await
        .unwrap();
    let md = report.to_markdown();
    let json = report.to_json();
    let rows = json["secret_refs"].as_array().unwrap();
    for (i, s) in shown.iter().enumerate() {
        let row = format!(
            "| {} | {} | `{}` | AWSCURRENT | {} |",
            s.name,
            s.manager,
            s.reference,
            s.kms_key
                .as_ref()
                .map_or("not recorded".to_owned(), |k| format!("`{k}`"))
        );
        assert!(md.contains(&row), "{row} missing:\n{md}");
        assert_eq!(rows[i]["name"], s.name.as_str());
        assert_eq!(rows[i]["reference"], s.reference.as_str(), "{}", rows[i]);
        assert_eq!(rows[i]["kms_key"], json!(s.kms_key));
    }
    for (i, s) in local.iter().enumerate() {
        let row = format!(
            "| {} | {} | `[local path withheld]` | AWSCURRENT |",
            s.name, s.manager
        );
        assert!(md.contains(&row), "{row} missing:\n{md}");
        assert_eq!(rows[shown.len() + i]["reference"], "[local path withheld]");
    }
    let text = format!("{md}{json}");
    for leak in ["/home/", "alice", "/etc/app", "/var/lib/app"] {
        assert!(!text.contains(leak), "{leak} leaked:\n{text}");
    }
}

/// A drill that blocked on a lost agent, was retried by an operator, taken over by a restarted
/// coordinator and re-sent a failed command reads "passed" only beside its incidents, in time
/// order, with what the journal said about each.
#[tokio::test]
async fn incidents_tell_blocked_attempts_retries_takeovers_and_lost_agents() {
    let j = journal().await;
    full_drill(&j).await;
    let env = environment(vec![]);
    // Straight through: no incident.
    let report = build(&*j.store, RUN, &env, Some(&point()), &[], &[])
        .await
        .unwrap();
    assert!(report.incidents.is_empty(), "{:?}", report.incidents);
    let md = report.to_markdown();
    assert!(md.contains("| Incidents | none |"), "{md}");
    assert!(md.contains("Incidents: none."), "{md}");

    j.event(
        at(10, 1, 0),
        "phase.started",
        json!({ "phase": "restore-postgres", "action": "restore-postgres", "attempt": 1 }),
    )
    .await;
    j.event(
        at(10, 1, 30),
        "agent.lost",
        json!({ "agent": "db-1", "role": "database", "reason": "stream lost: connection reset" }),
    )
    .await;
    let detail = format!(
        "0 of 1 database succeeded; db-1: restore-postgres failed: connect to \
         postgres://rollcall:{PASSWORD}@db.internal/cowork refused"
    );
    j.event(
        at(10, 2, 0),
        "phase.finished",
        json!({ "phase": "restore-postgres", "state": "blocked", "detail": detail }),
    )
    .await;
    j.event(
        at(10, 2, 0),
        "run.blocked",
        json!({ "phase": "restore-postgres", "reason": format!("phase restore-postgres did not pass: {detail}") }),
    )
    .await;
    j.event(
        at(10, 2, 30),
        "agent.back",
        json!({ "agent": "db-1", "role": "database", "replaced": false }),
    )
    .await;
    j.event(at(10, 3, 0), "run.retried", json!({})).await;
    j.event(
        at(10, 3, 1),
        "phase.started",
        json!({ "phase": "restore-postgres", "action": "restore-postgres", "attempt": 2 }),
    )
    .await;
    j.event(
        at(10, 4, 0),
        "run.taken_over",
        json!({ "epoch": 4, "state": "running" }),
    )
    .await;
    // The gateway's smoke timed out and was sent again (the phase's `retries`).
    let resent = format!("{RUN}/gateway-smoke/gateway-1/a1/s1/r1");
    j.store
        .record_command(&crate::store::CommandRecord {
            command_id: resent.clone(),
            run_id: RUN.to_owned(),
            phase_index: 10,
            agent: "gateway-1".to_owned(),
            action: ActionKind::Smoke,
            payload: json!({}),
            attempt: 1,
            epoch: api::model::Epoch::new(3).unwrap(),
            created_at: at(10, 10, 59),
        })
        .await
        .unwrap();
    j.store
        .record_result(
            &crate::store::ResultRecord {
                command_id: resent,
                agent: "gateway-1".to_owned(),
                epoch: api::model::Epoch::new(3).unwrap(),
                outcome: Outcome::Failed,
                replayed: false,
                detail: "no delivery resumed".to_owned(),
                output: None,
                received_at: at(10, 11, 0),
            },
            api::model::Epoch::new(3).unwrap(),
        )
        .await
        .unwrap();

    let report = build(&*j.store, RUN, &env, Some(&point()), &[], &[])
        .await
        .unwrap();
    type Seen<'a> = (
        Option<chrono::DateTime<chrono::Utc>>,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
    );
    let got: Vec<Seen<'_>> = report
        .incidents
        .iter()
        .map(|i| {
            (
                i.at,
                i.kind.as_str(),
                i.phase.as_deref(),
                i.agent.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (Some(at(10, 1, 30)), "agent lost", None, Some("db-1")),
            (
                Some(at(10, 2, 0)),
                "phase blocked",
                Some("restore-postgres"),
                None
            ),
            (Some(at(10, 2, 30)), "agent back", None, Some("db-1")),
            (Some(at(10, 3, 0)), "operator retry", None, None),
            (Some(at(10, 4, 0)), "coordinator took over", None, None),
            (
                Some(at(10, 10, 59)),
                "command re-sent",
                Some("gateway-smoke"),
                Some("gateway-1")
            ),
        ]
    );
    assert_eq!(
        report.incidents[0].detail,
        "database agent unavailable: stream lost: connection reset"
    );
    assert_eq!(
        report.incidents[1].detail,
        "attempt 1: 0 of 1 database succeeded; db-1: restore-postgres failed: connect to \
         postgres://rollcall:***@db.internal/cowork refused"
    );
    assert!(
        report.incidents[4].detail.contains("(epoch 4)"),
        "{}",
        report.incidents[4].detail
    );
    assert_eq!(
        report.incidents[5].detail,
        "smoke sent 2 times in attempt 1: the first try timed_out: smoke did not finish \
         within 1m; owner ***@cowork.example; the last failed: no delivery resumed"
    );
    let md = report.to_markdown();
    assert!(
        md.contains(
            "| Incidents | 1 agent lost, 1 phase blocked, 1 agent back, 1 operator retry, 1 \
             coordinator took over, 1 command re-sent (see Incidents) |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| 2026-11-25 10:02:00 UTC | phase blocked | restore-postgres |  | attempt 1: 0 of 1 \
             database succeeded;"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| 2026-11-25 10:01:30 UTC | agent lost |  | db-1 | database agent unavailable"
        ),
        "{md}"
    );
    assert!(!md.contains(PASSWORD) && !report.to_json().to_string().contains(PASSWORD));
    assert_eq!(report.to_json()["incidents"].as_array().unwrap().len(), 6);
}

/// A journal from before `run.taken_over`: commands sent under a newer epoch than the run's
/// still tell that another coordinator drove the run on.
#[tokio::test]
async fn commands_under_a_newer_epoch_tell_a_takeover_without_its_event() {
    let j = journal().await;
    full_drill(&j).await;
    // The verify command re-sent by a coordinator of epoch 5 (the journal raises its epoch).
    j.store
        .record_command(&crate::store::CommandRecord {
            command_id: format!("{RUN}/verify/db-1/a1/s0/r0"),
            run_id: RUN.to_owned(),
            phase_index: 6,
            agent: "db-1".to_owned(),
            action: ActionKind::Verify,
            payload: json!({}),
            attempt: 1,
            epoch: api::model::Epoch::new(5).unwrap(),
            created_at: at(10, 7, 20),
        })
        .await
        .unwrap();
    let report = build(&*j.store, RUN, &environment(vec![]), None, &[], &[])
        .await
        .unwrap();
    assert_eq!(report.incidents.len(), 1, "{:?}", report.incidents);
    assert_eq!(report.incidents[0].kind, "coordinator took over");
    assert!(
        report.incidents[0].detail.starts_with(
            "commands were sent under coordinator epoch 5 (the run started under epoch 3)"
        ),
        "{}",
        report.incidents[0].detail
    );
}

/// What the operator (`--exclude`) and the environment config declared, journaled in the run's
/// params when it started, is what the report says was left out; nothing declared reads so.
#[tokio::test]
async fn declared_exclusions_come_from_the_runs_params() {
    let j = journal().await;
    j.run_with_params(
        ONE_PHASE_PLAN,
        json!({ "plan": "default", "excluded": [
            { "text": "local Desktop threads (stay local)", "source": "environment config" },
            { "text": "diagnostics bundles older than 7 days", "source": "operator" },
        ] }),
        RunState::Running,
        None,
    )
    .await;
    let env = environment(vec![]);
    let report = build(&*j.store, RUN, &env, None, &[], &[]).await.unwrap();
    assert_eq!(
        report.excluded,
        [
            "local Desktop threads (stay local) (declared in the environment config)",
            "diagnostics bundles older than 7 days (declared by the operator)",
        ]
    );
    assert!(report.exclusions_declared);
    let md = report.to_markdown();
    assert!(
        md.contains(
            "## Data intentionally excluded\n\n- local Desktop threads (stay local) (declared in \
             the environment config)\n- diagnostics bundles older than 7 days (declared by the \
             operator)\n"
        ),
        "{md}"
    );

    let j = journal().await;
    j.run(RunState::Running, None).await;
    let report = build(&*j.store, RUN, &env, None, &[], &[]).await.unwrap();
    assert!(report.excluded.is_empty() && !report.exclusions_declared);
    assert!(
        report.to_markdown().contains(
            "None declared (`rollcall drill --exclude TEXT`, or `[environments.prod.report] \
             excluded` in the coordinator config)."
        ),
        "{}",
        report.to_markdown()
    );
}

/// The runbook's managed-worker drill, when the plan has worker phases: every line from what
/// the journal holds, failed where it failed, "not recorded" where nothing was recorded.
#[tokio::test]
async fn the_managed_worker_drill_is_filled_from_the_journal() {
    let j = journal().await;
    full_drill(&j).await;
    let env = environment(vec![cookie_secret("v4")]);
    let report = build(&*j.store, RUN, &env, Some(&point()), &[], &[])
        .await
        .unwrap();
    let rows = report.workers.clone().expect("the plan has worker phases");
    let results: Vec<(&str, &str)> = rows
        .iter()
        .map(|w| (w.item.as_str(), w.result.as_str()))
        .collect();
    assert_eq!(
        results,
        [
            ("worker recovery", "passed"),
            ("checkpoint restore", "passed"),
            ("workflow consistency", "passed"),
            ("BYOK secret-reference integrity", "passed"),
        ]
    );
    assert_eq!(
        rows[0].evidence,
        "2 workers declared; worker-smoke: worker smoke on worker-1 passed (cowork-sim smoke \
         worker --token [REDACTED]: 1 prompt, 4 events); worker-smoke: worker-1 at 1 replicas \
         (2 before the run)"
    );
    assert_eq!(
        rows[1].evidence,
        "restore-objects on objects-1: succeeded (snapshot 20261125T073000Z-3f2a9c01; 12 \
         written, 328 already matching, 3 replaced, 9 removed); check-references: artifact \
         objects on objects-1 passed (every object present; checked all 40 rows)"
    );
    assert_eq!(
        rows[2].evidence,
        "verify: no projection ahead of its events on db-1 passed (0 rows); scheduler-smoke: \
         scheduler smoke on scheduler-1 passed (2 due workflows claimed once)"
    );
    assert_eq!(
        rows[3].evidence,
        "1 references recorded in the point, 1 with a KMS key; cookie-secret in the environment \
         config differs from the point (version v4, KMS key \
         arn:aws:kms:us-east-1:123456789012:key/1234abcd)"
    );
    let md = report.to_markdown();
    assert!(md.contains("## Managed-worker drill"), "{md}");
    assert!(
        md.contains("| worker recovery | passed | 2 workers declared;"),
        "{md}"
    );

    // A worker smoke that failed, and nothing else recorded: failed and not recorded, never
    // passed.
    let j = journal().await;
    j.run(RunState::Blocked, Some("phase worker-smoke did not pass"))
        .await;
    j.phase(
        8,
        "worker-smoke",
        PhaseState::Blocked,
        at(10, 7, 31),
        Some(at(10, 9, 0)),
        "0 of 2 worker",
    )
    .await;
    j.command(
        (8, "worker-smoke"),
        "worker-1",
        ActionKind::Smoke,
        1,
        Some(Outcome::Failed),
        "prompt never processed",
        None,
        at(10, 8, 59),
    )
    .await;
    let report = build(&*j.store, RUN, &environment(vec![]), None, &[], &[])
        .await
        .unwrap();
    let rows = report.workers.unwrap();
    let results: Vec<&str> = rows.iter().map(|w| w.result.as_str()).collect();
    assert_eq!(
        results,
        ["failed", "not recorded", "not recorded", "not recorded"]
    );
    assert_eq!(
        rows[0].evidence,
        "2 workers declared; worker-smoke: smoke on worker-1 failed (failed: prompt never \
         processed); phase worker-smoke blocked"
    );
    assert_eq!(rows[1].evidence, "no object restore recorded");
    assert_eq!(
        rows[3].evidence,
        "the point file was not read: its references are not recorded"
    );
}

/// A plan without worker phases has no managed-worker section.
#[tokio::test]
async fn no_worker_phases_no_managed_worker_section() {
    let j = journal().await;
    j.run_with(
        "name = \"db-only\"\n[[phase]]\nname = \"preflight\"\naction = \"preflight\"\nroles = [\"database\"]\ngate = \"all\"\ntimeout = \"1m\"\n",
        RunState::Running,
        None,
    )
    .await;
    let report = build(&*j.store, RUN, &environment(vec![]), None, &[], &[])
        .await
        .unwrap();
    assert_eq!(
        report.run.plan.as_deref(),
        Some("db-only"),
        "the plan was read"
    );
    assert!(report.workers.is_none());
    assert!(!report.to_markdown().contains("Managed-worker drill"));
    assert!(report.to_json().get("workers").is_none());

    // Nor has an undo, whatever its plan scales: the drill template is a restore's.
    let j = journal().await;
    j.store
        .create_run(&crate::store::NewRun {
            id: RUN.to_owned(),
            kind: crate::store::RunKind::Undo,
            environment: "prod".to_owned(),
            point_id: Some(POINT.to_owned()),
            plan: ONE_PHASE_PLAN.to_owned(),
            params: json!({}),
            epoch: api::model::Epoch::new(3).unwrap(),
            created_at: at(9, 59, 50),
        })
        .await
        .unwrap();
    let report = build(&*j.store, RUN, &environment(vec![]), None, &[], &[])
        .await
        .unwrap();
    assert!(report.workers.is_none());
}
