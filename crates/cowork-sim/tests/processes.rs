//! The built `cowork-sim` binary as real processes: racing schedulers, a gateway killed with
//! SIGKILL and restarted, and a web/worker fleet under `load` while maintenance freezes writes.
//! Every role must stop cleanly (exit 0) on SIGTERM.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Proc, env, eventually, free_addr, http, run_bin, tenant};
use cowork_sim::store;
use serde_json::{Value, json};

const STOP: Duration = Duration::from_secs(15);

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test]
async fn two_scheduler_processes_fire_exactly_one_run_per_due_time() {
    let env = env("sched_procs").await;
    let t = tenant(&env.deps, "race").await;
    let mut schedulers: Vec<Proc> = ["s1", "s2"]
        .iter()
        .map(|id| {
            Proc::spawn(
                id,
                env.dir.path(),
                &[
                    "scheduler",
                    "--database-url",
                    &env.db.url,
                    "--object-store",
                    &env.objects_url,
                    "--scheduler-id",
                    id,
                    "--tick",
                    "20ms",
                ],
                &[],
            )
        })
        .collect();
    // Due times start once both are polling, so a slow start cannot coalesce a missed slot.
    eventually(
        "both schedulers to start",
        Duration::from_secs(60),
        async || {
            schedulers
                .iter()
                .all(|s| s.log_text().contains("scheduler started"))
                .then_some(())
        },
    )
    .await;
    let first = now_ms() + 300;
    let mut workflows = BTreeMap::new();
    for i in 0..4 {
        let due = first + i * 100;
        let id = store::create_workflow(
            &env.deps.pool,
            env.deps.profile,
            &t.id,
            &format!("wf{i}"),
            "tick",
            1,
            due,
        )
        .await
        .unwrap();
        workflows.insert(id, due);
    }
    let pool = env.deps.pool.clone();
    eventually(
        "3 runs of every workflow",
        Duration::from_secs(60),
        async || {
            let fewest: Option<i64> = sqlx::query_scalar(
                "SELECT min(n) FROM (SELECT w.id, count(r.id) AS n FROM workflows w
                                 LEFT JOIN workflow_runs r ON r.workflow_id = w.id
                                 GROUP BY w.id) x",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (fewest.unwrap_or(0) >= 3).then_some(())
        },
    )
    .await;
    for s in &mut schedulers {
        let status = s.terminate(STOP);
        assert!(
            status.success(),
            "{} exited {status}: {}",
            s.name,
            s.log_text()
        );
        assert!(
            s.log_text().contains("scheduler stopped"),
            "{}",
            s.log_text()
        );
    }
    let runs: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT workflow_id, (extract(epoch FROM due_at) * 1000)::bigint, claimed_by
         FROM workflow_runs ORDER BY workflow_id, due_at",
    )
    .fetch_all(&env.deps.pool)
    .await
    .unwrap();
    let mut by_workflow: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (wf, due, claimed_by) in &runs {
        assert!(["s1", "s2"].contains(&claimed_by.as_str()), "{claimed_by}");
        by_workflow.entry(wf).or_default().push(*due);
    }
    for (wf, first_due) in &workflows {
        let dues = &by_workflow[wf.as_str()];
        // One run per due time, none skipped: first, first+1s, first+2s, ...
        let expected: Vec<i64> = (0..dues.len() as i64)
            .map(|k| first_due + k * 1000)
            .collect();
        assert_eq!(dues, &expected, "runs of {wf}");
    }
    let check = store::verify_artifacts(
        &env.deps.pool,
        env.deps.profile,
        env.deps.objects.as_ref(),
        None,
    )
    .await
    .unwrap();
    assert!(
        check.ok() && check.checked == runs.len() as u64,
        "{check:?}"
    );
}

#[tokio::test]
async fn gateway_resumes_from_its_cursors_after_sigkill_without_resending() {
    let env = env("gw_kill").await;
    let t = tenant(&env.deps, "kill").await;
    let binding = store::create_channel_binding(
        &env.deps.pool,
        env.deps.profile,
        &t.id,
        "webhook",
        "https://x/y",
    )
    .await
    .unwrap();
    const SESSIONS: i64 = 4;
    const PER_SESSION: i64 = 400;
    sqlx::query(
        "INSERT INTO sessions (id, tenant_id, title, status)
         SELECT 'ses_kill_' || g, $1, 'bound', 'idle' FROM generate_series(1, $2) g",
    )
    .bind(&t.id)
    .bind(SESSIONS)
    .execute(&env.deps.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO channel_session_bindings (binding_id, session_id)
         SELECT $1, id FROM sessions",
    )
    .bind(&binding)
    .execute(&env.deps.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO channel_deliveries (public_delivery_id, binding_id, session_id,
                                         event_sequence, payload, status)
         SELECT 'dlv_' || s.id || '_' || g, $1, s.id, g,
                jsonb_build_object('text', 'message ' || g), 'pending'
         FROM sessions s, generate_series(1, $2) g",
    )
    .bind(&binding)
    .bind(PER_SESSION)
    .execute(&env.deps.pool)
    .await
    .unwrap();
    let total = (SESSIONS * PER_SESSION) as u64;
    let sink = env.dir.path().join("sink.jsonl");
    let sink_arg = sink.display().to_string();
    let gateway = |id: &str| {
        Proc::spawn(
            id,
            env.dir.path(),
            &[
                "gateway",
                "--database-url",
                &env.db.url,
                "--object-store",
                &env.objects_url,
                "--gateway-id",
                id,
                "--sink-jsonl",
                &sink_arg,
                "--claim-ttl",
                "1s",
            ],
            &[],
        )
    };

    let mut first = gateway("g1");
    eventually(
        "the first gateway to deliver 200 messages",
        Duration::from_secs(60),
        async || {
            let lines = std::fs::read_to_string(&sink)
                .unwrap_or_default()
                .lines()
                .count();
            (lines >= 200).then_some(())
        },
    )
    .await;
    first.kill();
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM channel_deliveries WHERE status <> 'sent'")
            .fetch_one(&env.deps.pool)
            .await
            .unwrap();
    assert!(
        open > 0,
        "the gateway finished before it could be killed; raise PER_SESSION"
    );
    let cursors_at_kill = cursors(&env.deps.pool).await;

    let mut second = gateway("g2");
    let pool = env.deps.pool.clone();
    eventually(
        "every delivery sent",
        Duration::from_secs(120),
        async || {
            let sent: i64 =
                sqlx::query_scalar("SELECT count(*) FROM channel_deliveries WHERE status = 'sent'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (sent as u64 == total).then_some(())
        },
    )
    .await;
    let status = second.terminate(STOP);
    assert!(
        status.success(),
        "g2 exited {status}: {}",
        second.log_text()
    );

    let stats = cowork_sim::sink::jsonl_stats(&sink).unwrap();
    assert_eq!(stats.unique, total, "{stats:?}");
    assert_eq!(stats.out_of_order, 0, "{stats:?}");
    // Only the one message in flight when g1 died can arrive twice (same idempotency key).
    assert!(stats.duplicates <= 1, "{stats:?}");
    let delivered: BTreeSet<String> = cowork_sim::sink::jsonl_messages(&sink)
        .unwrap()
        .into_iter()
        .map(|m| m.public_delivery_id)
        .collect();
    let expected: BTreeSet<String> =
        sqlx::query_scalar("SELECT public_delivery_id FROM channel_deliveries")
            .fetch_all(&env.deps.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(delivered, expected);
    let cursors = cursors(&env.deps.pool).await;
    for (session, cursor) in &cursors {
        assert_eq!(*cursor, PER_SESSION, "{session}");
        assert!(*cursor >= cursors_at_kill[session]);
    }
}

/// Each bound session's delivery cursor: the last event the gateway delivered for it.
async fn cursors(pool: &sqlx::PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as("SELECT session_id, last_event_sequence FROM channel_session_bindings")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn load_sees_503s_while_web_is_frozen_and_every_role_stops_on_sigterm() {
    let db = common::fresh_db("fleet");
    let dir = tempfile::tempdir().unwrap();
    let objects_url = format!("file://{}", dir.path().join("objects").display());
    let tokens = dir.path().join("tokens.json");
    let tokens_arg = tokens.display().to_string();
    let db_env = [
        ("DATABASE_URL", db.url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];

    let (status, _, stderr) = run_bin(&["migrate"], &db_env);
    assert!(status.success(), "migrate: {stderr}");
    let (status, stdout, stderr) = run_bin(
        &[
            "seed",
            "--sessions",
            "8",
            "--rng-seed",
            "5",
            "--tokens-out",
            &tokens_arg,
        ],
        &db_env,
    );
    assert!(status.success(), "seed: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["sessions"], 8);
    assert_eq!(report["events"], 160);
    let tokens: Value = serde_json::from_str(&std::fs::read_to_string(&tokens).unwrap()).unwrap();
    let desktop = tokens["desktop"][0]["token"].as_str().unwrap().to_owned();
    let operator = tokens["operator"]["token"].as_str().unwrap().to_owned();

    let addr = free_addr().to_string();
    let web_url = format!("http://{addr}");
    let mut web = Proc::spawn("web", dir.path(), &["web", "--listen", &addr], &db_env);
    let client = http();
    eventually("web to be ready", Duration::from_secs(30), async || {
        let r = client.get(format!("{web_url}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let mut worker = Proc::spawn(
        "worker",
        dir.path(),
        &["worker", "--worker-id", "w-proc"],
        &db_env,
    );
    let mut load = Proc::spawn(
        "load",
        dir.path(),
        &["load", "--web-url", &web_url, "--rate", "40"],
        &[("COWORK_TOKEN", desktop.as_str())],
    );

    let pool = cowork_sim::connect(&db.url).await.unwrap();
    let writes = async || -> i64 {
        sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM session_commands)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = writes().await;
    eventually("load to write and the worker to ack", Duration::from_secs(60), async || {
        let acked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM session_commands WHERE status = 'acked' AND claimed_by = 'w-proc'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (writes().await > before + 10 && acked >= 3).then_some(())
    })
    .await;

    let maintenance = async |on: bool| {
        let r = client
            .post(format!("{web_url}/admin/maintenance"))
            .bearer_auth(&operator)
            .json(&json!({ "enabled": on }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    let rejected = async || -> u64 {
        let text = client
            .get(format!("{web_url}/api/metrics"))
            .bearer_auth(&operator)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("cowork_web_writes_rejected_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    maintenance(true).await;
    // The load client is sequential: once one write was refused, none is in flight.
    eventually("a refused write", Duration::from_secs(30), async || {
        (rejected().await >= 1).then_some(())
    })
    .await;
    let frozen_at = writes().await;
    eventually("ten refused writes", Duration::from_secs(30), async || {
        (rejected().await >= 10).then_some(())
    })
    .await;
    assert_eq!(
        writes().await,
        frozen_at,
        "a write got through maintenance mode"
    );
    let sessions = client
        .get(format!("{web_url}/api/sessions"))
        .bearer_auth(&desktop)
        .send()
        .await
        .unwrap();
    assert_eq!(sessions.status(), 200, "reads keep working while frozen");
    maintenance(false).await;
    eventually("writes to resume", Duration::from_secs(30), async || {
        (writes().await > frozen_at).then_some(())
    })
    .await;

    let status = load.terminate(STOP);
    assert!(
        status.success(),
        "load exited {status}: {}",
        load.log_text()
    );
    let report: Value = serde_json::from_str(&load.stdout_text()).unwrap();
    assert!(report["frozen"].as_u64().unwrap() >= 10, "{report}");
    assert!(report["accepted"].as_u64().unwrap() > 10, "{report}");
    assert_eq!(report["transport_errors"], 0, "{report}");
    for p in [&mut worker, &mut web] {
        let status = p.terminate(STOP);
        assert!(
            status.success(),
            "{} exited {status}: {}",
            p.name,
            p.log_text()
        );
    }

    let (status, stdout, stderr) = run_bin(&["verify"], &db_env);
    assert!(status.success(), "verify: {stdout} {stderr}");
    let (status, stdout, stderr) = run_bin(&["counts"], &db_env);
    assert!(status.success(), "counts: {stderr}");
    let counts: cowork_sim::RestoreCounts = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        counts,
        cowork_sim::counts(&pool, cowork_sim::Profile::Kind)
            .await
            .unwrap()
    );

    // Bad input gets one clear line, not a panic.
    let (status, _, stderr) = run_bin(
        &["worker", "--object-store", "ftp://nowhere"],
        &[("DATABASE_URL", db.url.as_str())],
    );
    assert!(!status.success());
    assert!(stderr.contains("unsupported object store URL"), "{stderr}");
    let (status, _, stderr) = run_bin(&["token", "--scope", "admin"], &db_env);
    assert!(!status.success());
    assert!(stderr.contains("desktop, operator, gateway"), "{stderr}");
}

/// `web --exit-on-db-loss` behaves like a service whose database client treats a terminated
/// connection as fatal: it serves until the database ends its connections, then exits with
/// status 70 (the restore tests' "real service" stand-in). Without the switch it stays up.
#[tokio::test]
async fn web_exits_when_its_database_connection_is_terminated_if_asked_to() {
    let db = common::fresh_db("exit_on_loss");
    let dir = tempfile::tempdir().unwrap();
    let objects_url = format!("file://{}", dir.path().join("objects").display());
    let db_env = [
        ("DATABASE_URL", db.url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];
    let (status, _, stderr) = run_bin(&["migrate"], &db_env);
    assert!(status.success(), "migrate: {stderr}");
    let client = http();
    let pool = cowork_sim::connect(&db.url).await.unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    for exits in [false, true] {
        let addr = free_addr().to_string();
        let mut args = vec!["web", "--listen", &addr];
        if exits {
            args.push("--exit-on-db-loss");
        }
        let mut web = Proc::spawn("web", dir.path(), &args, &db_env);
        let ready = format!("http://{addr}/readyz");
        eventually("web to be ready", Duration::from_secs(30), async || {
            let r = client.get(&ready).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        let web_pid = web.pid();
        // End every connection to the database but this test's own.
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()) t",
        )
        .bind(&database)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(ended >= 1, "the web role had a connection");
        if exits {
            let status = web.wait(Duration::from_secs(10));
            assert_eq!(status.code(), Some(70), "{}", web.log_text());
            assert!(
                web.log_text().contains("ended this web role's connection"),
                "{}",
                web.log_text()
            );
        } else {
            // Every connection of its pool was ended: answering readyz again means it
            // reconnected. Then SIGTERM finds it running and it stops cleanly (an exit of its
            // own would show as status 70 here).
            eventually(
                "web without the switch to serve again",
                Duration::from_secs(30),
                async || {
                    let r = client.get(&ready).send().await.ok()?;
                    (r.status() == 200).then_some(())
                },
            )
            .await;
            let status = web.terminate(Duration::from_secs(10));
            assert!(
                status.success(),
                "web {web_pid} without the switch keeps running: {status:?}\n{}",
                web.log_text()
            );
        }
    }
}
