//! What the report tests build on: a point, an environment, and a SQLite journal filled as the
//! engine fills it, up to a whole drill.

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

use crate::config::{Environment, ReportRow};
use crate::plan::Plan;
use crate::store::{
    CommandRecord, NewRun, PhaseRecord, PhaseState, ResultRecord, RunKind, RunState, Store,
};

/// The plan the fixture's drill journals: Postgres restored in one phase.
pub(super) const ONE_PHASE_PLAN: &str = include_str!("one-phase-restore.toml");

pub(super) const POINT: &str = "20261125T073000Z-prod-399b4d21";
pub(super) const RUN: &str = "20261125T100000Z-drill-prod-7c1e";
pub(super) const TOKEN: &str = "cws_operator_5f0c2a9be1d84c7f9e3a6b2d1c0f4e8a7b6c5d4e";
pub(super) const PASSWORD: &str = "hunter2-Pg-Secret";

pub(super) fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap()
}

pub(super) fn environment(secrets: Vec<SecretRef>) -> Environment {
    let fleet = crate::plan::tests::fleet();
    Environment {
        name: api::model::Environment::parse("prod").unwrap(),
        rpo: Duration::from_secs(24 * 3600),
        rto: Duration::from_secs(4 * 3600),
        retention: Duration::from_secs(14 * 24 * 3600),
        repository: "s3://cowork-backups/prod".to_owned(),
        backup_schedule: None,
        base_backup_schedule: None,
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
        report_rows: cowork_rows(),
        report_excluded: Vec::new(),
        protected: false,
        approvals: 0,
        approval_timeout: std::time::Duration::from_secs(3600),
        restore_test: None,
        pitr: crate::config::Pitr::Repository,
    }
}

/// cowork-sim's runbook rows, as its example configs map them (the fixture's data are
/// cowork-sim's).
pub(super) fn cowork_rows() -> Vec<ReportRow> {
    [
        ("Sessions", "sessions"),
        ("Session projections", "session_projections"),
        ("Artifacts", "artifact_index"),
        ("Workflows", "workflows"),
        ("Channel bindings", "channel_bindings"),
        ("Pending deliveries", "channel_deliveries[status=pending]"),
        ("Failed deliveries", "channel_deliveries[status=failed]"),
        ("Dead deliveries", "channel_deliveries[status=dead]"),
    ]
    .into_iter()
    .map(|(label, count)| ReportRow {
        label: label.to_owned(),
        count: count.to_owned(),
    })
    .collect()
}

pub(super) fn cookie_secret(version: &str) -> SecretRef {
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

pub(super) fn point() -> Point {
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
            server: None,
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
        sequence: Some(1),
    }
}

pub(super) struct TestJournal {
    pub(super) store: std::sync::Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

pub(super) async fn journal() -> TestJournal {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    let store = crate::store::open(&url).await.unwrap();
    TestJournal { store, _dir: dir }
}

impl TestJournal {
    pub(super) async fn run(&self, state: RunState, reason: Option<&str>) {
        self.run_with(ONE_PHASE_PLAN, state, reason).await;
    }

    /// The run, started at 10:00 under `plan`, in `state`.
    pub(super) async fn run_with(&self, plan: &str, state: RunState, reason: Option<&str>) {
        self.run_with_params(plan, json!({}), state, reason).await;
    }

    /// [`Self::run_with`] with the run's journaled params.
    pub(super) async fn run_with_params(
        &self,
        plan: &str,
        params: serde_json::Value,
        state: RunState,
        reason: Option<&str>,
    ) {
        self.store
            .create_run(&NewRun {
                id: RUN.to_owned(),
                kind: RunKind::Drill,
                environment: "prod".to_owned(),
                point_id: Some(POINT.to_owned()),
                plan: plan.to_owned(),
                params,
                epoch: Epoch::new(3).unwrap(),
                created_at: at(9, 59, 50),
            })
            .await
            .unwrap();
        self.store
            .append_event(
                RUN,
                at(9, 59, 50),
                "run.created",
                &json!({}),
                Epoch::new(3).unwrap(),
            )
            .await
            .unwrap();
        self.store
            .set_run_state(
                RUN,
                RunState::Running,
                None,
                at(10, 0, 0),
                Epoch::new(3).unwrap(),
            )
            .await
            .unwrap();
        self.store
            .append_event(
                RUN,
                at(10, 0, 0),
                "run.started",
                &json!({ "epoch": 3 }),
                Epoch::new(3).unwrap(),
            )
            .await
            .unwrap();
        if state != RunState::Running {
            self.store
                .set_run_state(RUN, state, reason, at(10, 30, 0), Epoch::new(3).unwrap())
                .await
                .unwrap();
        }
    }

    /// An event of the run at `at`.
    pub(super) async fn event(&self, at: DateTime<Utc>, kind: &str, payload: serde_json::Value) {
        self.store
            .append_event(RUN, at, kind, &payload, Epoch::new(3).unwrap())
            .await
            .unwrap();
    }

    pub(super) async fn phase(
        &self,
        index: u32,
        name: &str,
        state: PhaseState,
        from: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        detail: &str,
    ) {
        self.store
            .put_phase(
                &PhaseRecord {
                    run_id: RUN.to_owned(),
                    index,
                    name: name.to_owned(),
                    state,
                    attempt: 1,
                    started_at: Some(from),
                    finished_at: until,
                    detail: (!detail.is_empty()).then(|| detail.to_owned()),
                },
                Epoch::new(3).unwrap(),
            )
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
                    Epoch::new(3).unwrap(),
                )
                .await
                .unwrap();
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn command(
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
                .record_result(
                    &ResultRecord {
                        command_id: id,
                        agent: agent.to_owned(),
                        epoch: Epoch::new(3).unwrap(),
                        outcome,
                        replayed: false,
                        detail: message.to_owned(),
                        output,
                        received_at: received,
                    },
                    Epoch::new(3).unwrap(),
                )
                .await
                .unwrap();
        }
    }
}

pub(super) fn live_counts() -> Counts {
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
pub(super) fn verified(elapsed_ms: u64) -> repository::VerifyReport {
    repository::VerifyReport {
        point: PointId::parse(POINT).unwrap(),
        full: false,
        problems: vec![],
        dump_bytes: 3_145_728,
        objects_checked: 340,
        blob_bytes_hashed: 0,
        elapsed_ms,
        delta_objects: 0,
        blobs_hashed: 0,
        scratch_bytes: 0,
    }
}

/// A passed check.
pub(super) fn check(name: &str, kind: CheckKind, required: bool, detail: &str) -> Check {
    Check {
        name: name.to_owned(),
        kind,
        required,
        passed: true,
        detail: detail.to_owned(),
    }
}

/// A drill that went through every phase up to the report, as the engine journals it.
pub(super) async fn full_drill(j: &TestJournal) {
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
            physical: None,
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
            from_scratch: 0,
            unchanged: 328,
            replaced: 3,
            removed: 9,
            quarantine_prefix: "quarantine/r1a2b3c4d".to_owned(),
            at_time: None,
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
