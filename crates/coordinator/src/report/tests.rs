//! The drill report built from real journals (a SQLite store filled as the engine fills it):
//! a full drill, a blocked run without its point, and the refusals of `build`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use api::model::output::{
    ChecksOutput, Counts, PreflightOutput, RestoreObjectsOutput, RestorePostgresOutput,
    VerifyOutput,
};
use api::model::{ActionKind, ActionOutput, Check, CheckKind, Epoch, Outcome, ScaleOutput};
use chrono::{DateTime, TimeZone, Utc};
use repository::{
    Compression, ObjectSnapshotPart, PgBackupPart, Point, PointId, SecretRef, SnapshotId,
};
use serde_json::json;

use super::*;
use crate::config::Environment;
use crate::plan::Plan;
use crate::store::{
    CommandRecord, NewRun, PhaseRecord, PhaseState, ResultRecord, RunKind, RunState, Store,
};

const POINT: &str = "20261125T073000Z-prod-399b4d21";
const RUN: &str = "20261125T100000Z-drill-prod-7c1e";
const TOKEN: &str = "cws_operator_5f0c2a9be1d84c7f9e3a6b2d1c0f4e8a7b6c5d4e";
const PASSWORD: &str = "hunter2-Pg-Secret";

fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap()
}

fn environment(secrets: Vec<SecretRef>) -> Environment {
    let fleet: crate::plan::Fleet = [
        ("web", 1),
        ("worker", 2),
        ("scheduler", 1),
        ("gateway", 1),
        ("database", 1),
        ("objects", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Environment {
        name: api::model::Environment::parse("prod").unwrap(),
        rpo: Duration::from_secs(24 * 3600),
        rto: Duration::from_secs(4 * 3600),
        retention: Duration::from_secs(14 * 24 * 3600),
        repository: "s3://cowork-backups/prod".to_owned(),
        backup_schedule: None,
        plan: Plan::default_plan(Some(&fleet)).unwrap(),
        backup_plan: Plan::backup_plan(&fleet).unwrap(),
        fleet,
        repository_ref: api::model::RepositoryRef {
            url: "s3://cowork-backups/prod".to_owned(),
            s3_endpoint: None,
            s3_region: Some("nyc3".to_owned()),
            s3_path_style: false,
        },
        secrets,
    }
}

fn cookie_secret(version: &str) -> SecretRef {
    SecretRef {
        name: "cookie-secret".to_owned(),
        manager: "aws-secrets-manager".to_owned(),
        reference: "arn:aws:secretsmanager:us-east-1:123456789012:secret:cowork/cookie-AbCdEf"
            .to_owned(),
        version: Some(version.to_owned()),
        kms_key: Some("arn:aws:kms:us-east-1:123456789012:key/1234abcd".to_owned()),
        rotated_at: Some(at(1, 0, 0)),
    }
}

fn point() -> Point {
    let counts: BTreeMap<String, i64> = [
        ("sessions", 120),
        ("session_events", 5400),
        ("session_projections", 120),
        ("artifact_index", 340),
        ("workflows", 18),
        ("channel_bindings", 9),
        ("channel_deliveries", 75),
        ("channel_deliveries[status=pending]", 4),
        ("channel_deliveries[status=failed]", 2),
        ("channel_deliveries[status=sent]", 69),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Point {
        id: PointId::parse(POINT).unwrap(),
        environment: "prod".to_owned(),
        created_at: at(7, 31, 0),
        postgres: Some(PgBackupPart {
            key: format!("postgres/{POINT}.dump.zst"),
            compression: Compression::Zstd {
                level: 3,
                workers: 2,
            },
            size: 3 * 1024 * 1024,
            sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".to_owned(),
            dump_size: 9 * 1024 * 1024,
            files: vec![],
            database: "cowork".to_owned(),
            server_version: "16.4".to_owned(),
            pg_dump_version: "pg_dump (PostgreSQL) 16.4".to_owned(),
            snapshot: "00000003-00000002-1".to_owned(),
            started_at: at(7, 30, 0),
            finished_at: at(7, 30, 40),
            table_counts: counts,
            columns: Default::default(),
        }),
        objects: Some(ObjectSnapshotPart {
            snapshot_id: SnapshotId::parse("20261125T073000Z-3f2a9c01").unwrap(),
            manifest_key: "objects/snapshots/20261125T073000Z-3f2a9c01.json".to_owned(),
            manifest_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .to_owned(),
            manifest_size: 4096,
            objects: 340,
            bytes: 52_428_800,
            copied_objects: 12,
            copied_bytes: 1_048_576,
            source: "s3://cowork-objects/prod".to_owned(),
            started_at: at(7, 30, 0),
            finished_at: at(7, 30, 55),
        }),
        secrets: vec![cookie_secret("v3")],
        tool_versions: BTreeMap::new(),
    }
}

struct TestJournal {
    store: std::sync::Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn journal() -> TestJournal {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    let store = crate::store::open(&url).await.unwrap();
    TestJournal { store, _dir: dir }
}

impl TestJournal {
    async fn run(&self, state: RunState, reason: Option<&str>) {
        self.store
            .create_run(&NewRun {
                id: RUN.to_owned(),
                kind: RunKind::Drill,
                environment: "prod".to_owned(),
                point_id: Some(POINT.to_owned()),
                plan: crate::plan::DEFAULT_PLAN.to_owned(),
                params: json!({}),
                epoch: Epoch::new(3).unwrap(),
                created_at: at(9, 59, 50),
            })
            .await
            .unwrap();
        self.store
            .append_event(RUN, at(9, 59, 50), "run.created", &json!({}))
            .await
            .unwrap();
        self.store
            .set_run_state(RUN, RunState::Running, None, at(10, 0, 0))
            .await
            .unwrap();
        self.store
            .append_event(RUN, at(10, 0, 0), "run.started", &json!({ "epoch": 3 }))
            .await
            .unwrap();
        if state != RunState::Running {
            self.store
                .set_run_state(RUN, state, reason, at(10, 30, 0))
                .await
                .unwrap();
        }
    }

    async fn phase(
        &self,
        index: u32,
        name: &str,
        state: PhaseState,
        from: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        detail: &str,
    ) {
        self.store
            .put_phase(&PhaseRecord {
                run_id: RUN.to_owned(),
                index,
                name: name.to_owned(),
                state,
                attempt: 1,
                started_at: Some(from),
                finished_at: until,
                detail: (!detail.is_empty()).then(|| detail.to_owned()),
            })
            .await
            .unwrap();
        if let Some(until) = until {
            self.store
                .append_event(
                    RUN,
                    until,
                    "phase.finished",
                    &json!({ "phase": name, "state": state.as_str(), "detail": detail,
                             "duration_ms": (until - from).num_milliseconds() }),
                )
                .await
                .unwrap();
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn command(
        &self,
        phase: (u32, &str),
        agent: &str,
        action: ActionKind,
        step: u32,
        outcome: Option<Outcome>,
        message: &str,
        output: Option<ActionOutput>,
        received: DateTime<Utc>,
    ) {
        let id = format!("{RUN}/{}/{agent}/a1/s{step}/r0", phase.1);
        self.store
            .record_command(&CommandRecord {
                command_id: id.clone(),
                run_id: RUN.to_owned(),
                phase_index: phase.0,
                agent: agent.to_owned(),
                action,
                payload: json!({}),
                attempt: 1,
                epoch: Epoch::new(3).unwrap(),
                created_at: received,
            })
            .await
            .unwrap();
        if let Some(outcome) = outcome {
            self.store
                .record_result(&ResultRecord {
                    command_id: id,
                    agent: agent.to_owned(),
                    epoch: Epoch::new(3).unwrap(),
                    outcome,
                    replayed: false,
                    detail: message.to_owned(),
                    output,
                    received_at: received,
                })
                .await
                .unwrap();
        }
    }
}

fn live_counts() -> Counts {
    [
        ("sessions", 131),
        ("session_events", 5900),
        ("session_projections", 131),
        ("artifact_index", 352),
        ("workflows", 19),
        ("channel_bindings", 9),
        ("channel_deliveries", 80),
        ("channel_deliveries[status=pending]", 6),
        ("channel_deliveries[status=failed]", 2),
        ("channel_deliveries[status=dead]", 1),
        ("channel_deliveries[status=sent]", 71),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect()
}

/// The point's verification as a preflight reports it.
fn verified(elapsed_ms: u64) -> repository::VerifyReport {
    repository::VerifyReport {
        point: PointId::parse(POINT).unwrap(),
        full: false,
        problems: vec![],
        dump_bytes: 3_145_728,
        objects_checked: 340,
        blob_bytes_hashed: 0,
        elapsed_ms,
    }
}

/// A passed check.
fn check(name: &str, kind: CheckKind, required: bool, detail: &str) -> Check {
    Check {
        name: name.to_owned(),
        kind,
        required,
        passed: true,
        detail: detail.to_owned(),
    }
}

/// A drill that went through every phase up to the report, as the engine journals it.
async fn full_drill(j: &TestJournal) {
    use PhaseState::{Failed, Passed, Running};
    j.run(RunState::Running, None).await;

    j.phase(
        0,
        "preflight",
        Passed,
        at(10, 0, 1),
        Some(at(10, 0, 31)),
        "2 of 2 agents succeeded",
    )
    .await;
    j.command(
        (0, "preflight"),
        "db-1",
        ActionKind::Preflight,
        0,
        Some(Outcome::Succeeded),
        "point verified",
        Some(ActionOutput::Preflight(PreflightOutput {
            verify: Some(verified(900)),
            live_counts: Some(live_counts()),
            checks: vec![],
        })),
        at(10, 0, 30),
    )
    .await;
    j.command(
        (0, "preflight"),
        "objects-1",
        ActionKind::Preflight,
        0,
        Some(Outcome::Succeeded),
        "point verified",
        Some(ActionOutput::Preflight(PreflightOutput {
            verify: Some(verified(700)),
            live_counts: None,
            checks: vec![],
        })),
        at(10, 0, 29),
    )
    .await;

    j.phase(
        1,
        "freeze-writes",
        Passed,
        at(10, 0, 40),
        Some(at(10, 0, 42)),
        "1 of 1 web",
    )
    .await;
    j.command(
        (1, "freeze-writes"),
        "web-1",
        ActionKind::Freeze,
        0,
        Some(Outcome::Succeeded),
        "frozen",
        None,
        at(10, 0, 41),
    )
    .await;
    j.phase(
        2,
        "scale-to-zero",
        Passed,
        at(10, 0, 43),
        Some(at(10, 0, 50)),
        "4 of 4",
    )
    .await;
    j.command(
        (2, "scale-to-zero"),
        "worker-1",
        ActionKind::Scale,
        0,
        Some(Outcome::Succeeded),
        "scaled",
        Some(ActionOutput::Scale(ScaleOutput {
            before: 2,
            now: 0,
            prior: 2,
        })),
        at(10, 0, 49),
    )
    .await;

    j.phase(
        3,
        "restore-postgres",
        Passed,
        at(10, 1, 0),
        Some(at(10, 6, 0)),
        "1 of 1 database",
    )
    .await;
    j.command(
        (3, "restore-postgres"),
        "db-1",
        ActionKind::RestorePostgres,
        0,
        Some(Outcome::Succeeded),
        // A message that carries a connection URL with its password.
        &format!("restored via postgres://rollcall:{PASSWORD}@db.internal:5432/cowork"),
        Some(ActionOutput::RestorePostgres(RestorePostgresOutput {
            database: "cowork".to_owned(),
            pre_restore_database: "cowork_pre_r1a2b3c4d".to_owned(),
            point: POINT.to_owned(),
            archive_bytes: 3_145_728,
            resumed: String::new(),
            elapsed_ms: 298_000,
        })),
        at(10, 5, 58),
    )
    .await;
    j.phase(
        4,
        "restore-objects",
        Passed,
        at(10, 1, 0),
        Some(at(10, 3, 0)),
        "1 of 1 objects",
    )
    .await;
    j.command(
        (4, "restore-objects"),
        "objects-1",
        ActionKind::RestoreObjects,
        0,
        Some(Outcome::Succeeded),
        "restored",
        Some(ActionOutput::RestoreObjects(RestoreObjectsOutput {
            snapshot: "20261125T073000Z-3f2a9c01".to_owned(),
            shard: 0,
            shards: 1,
            restored: 12,
            restored_bytes: 1_048_576,
            unchanged: 328,
            replaced: 3,
            removed: 9,
            quarantine_prefix: "quarantine/r1a2b3c4d".to_owned(),
        })),
        at(10, 2, 59),
    )
    .await;

    j.phase(
        5,
        "start-web",
        Passed,
        at(10, 6, 1),
        Some(at(10, 6, 20)),
        "1 of 1 web ready",
    )
    .await;
    j.phase(
        6,
        "verify",
        Passed,
        at(10, 6, 21),
        Some(at(10, 7, 30)),
        "3 of 3 agents succeeded",
    )
    .await;
    j.command(
        (6, "verify"),
        "web-1",
        ActionKind::Verify,
        0,
        Some(Outcome::Succeeded),
        "5 checks passed",
        Some(ActionOutput::Verify(VerifyOutput {
            checks: vec![
                check(
                    "readyz",
                    CheckKind::Http,
                    true,
                    "GET http://127.0.0.1:8080/readyz → 200",
                ),
                check(
                    "operator diagnostics",
                    CheckKind::Http,
                    true,
                    &format!("GET /api/diagnostics with Authorization: Bearer {TOKEN} → 200"),
                ),
                Check {
                    required: false,
                    passed: false,
                    ..check(
                        "metrics",
                        CheckKind::Http,
                        true,
                        "GET http://127.0.0.1:8080/api/metrics → 503",
                    )
                },
            ],
            counts: None,
            references: vec![],
        })),
        at(10, 7, 0),
    )
    .await;
    let mut after = point().table_counts().unwrap().clone();
    after.insert("channel_deliveries[status=failed]".to_owned(), 2);
    j.command(
        (6, "verify"),
        "db-1",
        ActionKind::Verify,
        0,
        Some(Outcome::Succeeded),
        "2 checks passed",
        Some(ActionOutput::Verify(VerifyOutput {
            checks: vec![
                check(
                    "count parity",
                    CheckKind::Count,
                    true,
                    "12 tables equal the point",
                ),
                check(
                    "no projection ahead of its events",
                    CheckKind::Invariant,
                    true,
                    "0 rows",
                ),
            ],
            counts: Some(after),
            references: vec![],
        })),
        at(10, 7, 20),
    )
    .await;

    j.phase(
        7,
        "check-references",
        Passed,
        at(10, 7, 30),
        Some(at(10, 7, 31)),
        "1 of 1 objects",
    )
    .await;
    j.command(
        (7, "check-references"),
        "objects-1",
        ActionKind::CheckObjects,
        0,
        Some(Outcome::Succeeded),
        "1 reference checks passed",
        Some(ActionOutput::CheckObjects(ChecksOutput {
            checks: vec![check(
                "artifact objects",
                CheckKind::Reference,
                true,
                "every object present; checked all 40 rows",
            )],
        })),
        at(10, 7, 31),
    )
    .await;
    j.phase(
        8,
        "worker-smoke",
        Passed,
        at(10, 7, 31),
        Some(at(10, 9, 0)),
        "1 of 2 worker",
    )
    .await;
    j.command(
        (8, "worker-smoke"),
        "worker-1",
        ActionKind::Scale,
        0,
        Some(Outcome::Succeeded),
        "scaled",
        Some(ActionOutput::Scale(ScaleOutput {
            before: 0,
            now: 1,
            prior: 2,
        })),
        at(10, 7, 40),
    )
    .await;
    j.command(
        (8, "worker-smoke"),
        "worker-1",
        ActionKind::Smoke,
        1,
        Some(Outcome::Succeeded),
        "prompt processed",
        Some(ActionOutput::Smoke(ChecksOutput {
            checks: vec![check(
                "worker smoke",
                CheckKind::Smoke,
                true,
                &format!("cowork-sim smoke worker --token {TOKEN}: 1 prompt, 4 events"),
            )],
        })),
        at(10, 8, 59),
    )
    .await;
    j.phase(
        9,
        "scheduler-smoke",
        Passed,
        at(10, 9, 1),
        Some(at(10, 9, 40)),
        "1 of 1",
    )
    .await;
    j.command(
        (9, "scheduler-smoke"),
        "scheduler-1",
        ActionKind::Smoke,
        1,
        Some(Outcome::Succeeded),
        "claimed 2 due workflows once",
        Some(ActionOutput::Smoke(ChecksOutput {
            checks: vec![check(
                "scheduler smoke",
                CheckKind::Smoke,
                true,
                "2 due workflows claimed once",
            )],
        })),
        at(10, 9, 39),
    )
    .await;
    // An optional phase that failed: a warning and a follow-up, not a block.
    j.phase(
        10,
        "gateway-smoke",
        Failed,
        at(10, 9, 41),
        Some(at(10, 11, 0)),
        "0 of 1 gateway",
    )
    .await;
    j.command(
        (10, "gateway-smoke"),
        "gateway-1",
        ActionKind::Smoke,
        1,
        Some(Outcome::TimedOut),
        "smoke did not finish within 1m; owner ops@cowork.example",
        None,
        at(10, 10, 59),
    )
    .await;
    j.phase(
        11,
        "restore-replicas",
        Passed,
        at(10, 11, 1),
        Some(at(10, 12, 0)),
        "all roles ready",
    )
    .await;
    j.phase(12, "report", Running, at(10, 12, 1), None, "")
        .await;
}

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

    // Counts before → point → after, required keys first and in the runbook's order.
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
    assert_eq!(keys, REQUIRED_COUNTS.map(|(k, _)| k));
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
