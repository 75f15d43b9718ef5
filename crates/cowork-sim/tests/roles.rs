//! The roles in-process against real Postgres and a LocalFileSystem object store: the worker's
//! pipeline, scheduler idempotency, gateway delivery and retries, maintenance mode, token
//! scopes, readiness, and seed.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use common::{Web, env, eventually, http, tenant, token};
use cowork_sim::auth::Scope;
use cowork_sim::gateway::{Gateway, GatewayConfig, SinkTarget};
use cowork_sim::scheduler::{Scheduler, SchedulerConfig};
use cowork_sim::sink::{SinkHandle, SinkServerConfig};
use cowork_sim::store;
use cowork_sim::worker::{Worker, WorkerConfig};
use object_store::ObjectStoreExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

async fn create_session(
    client: &reqwest::Client,
    web: &Web,
    token: &str,
    binding: Option<&str>,
) -> String {
    let response = client
        .post(web.url("/api/sessions"))
        .bearer_auth(token)
        .json(&json!({ "title": "test session", "channel_binding_id": binding }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

async fn prompt(client: &reqwest::Client, web: &Web, token: &str, session: &str, text: &str) {
    let response = client
        .post(web.url(&format!("/api/sessions/{session}/prompt")))
        .bearer_auth(token)
        .json(&json!({ "text": text }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

fn quick_worker(id: &str, max: u64) -> WorkerConfig {
    let mut config = WorkerConfig::new(id);
    config.max_commands = Some(max);
    config.max_wait = Some(Duration::from_secs(60));
    config.poll_interval = Duration::from_millis(20);
    config.artifact_bytes = 3000;
    config
}

#[tokio::test]
async fn worker_turns_prompts_into_events_projections_and_verified_artifacts() {
    let env = env("worker").await;
    let t = tenant(&env.deps, "acme").await;
    let binding =
        store::create_channel_binding(&env.deps.pool, env.deps.profile, &t.id, "slack", "#acme")
            .await
            .unwrap();
    let web = Web::start(&env.deps).await;
    let client = http();
    let session = create_session(&client, &web, &t.desktop.token, Some(&binding)).await;
    for text in ["plan the launch", "draft the email", "summarise the thread"] {
        prompt(&client, &web, &t.desktop.token, &session, text).await;
    }

    let report = Worker::new(env.deps.clone(), quick_worker("w1", 3))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.acked, report.failed), (3, 0));

    let status: Value = client
        .get(web.url(&format!("/api/sessions/{session}/projection-status")))
        .bearer_auth(&t.desktop.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status,
        json!({"session_id": session, "event_count": 12, "latest_event_sequence": 12,
               "projection_sequence": 12, "lag": 0})
    );
    let view: Value =
        sqlx::query_scalar("SELECT view FROM session_projections WHERE session_id = $1")
            .bind(&session)
            .fetch_one(&env.deps.pool)
            .await
            .unwrap();
    assert_eq!(view["prompts"], 3);
    assert_eq!(view["checkpoint_version"], 3);

    // Every indexed object is in the store with the bytes its sha256 promises.
    let check = store::verify_artifacts(
        &env.deps.pool,
        env.deps.profile,
        env.deps.objects.as_ref(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(check.checked, 6, "3 artifacts + 3 checkpoints: {check:?}");
    assert!(check.ok(), "{check:?}");
    let manifest_key = format!(
        "tenants/{}/sessions/{session}/checkpoints/00000003.json",
        t.id
    );
    let manifest: Value = serde_json::from_slice(
        &cowork_sim::objects::get_object(env.deps.objects.as_ref(), &manifest_key)
            .await
            .unwrap()
            .expect("checkpoint manifest exists"),
    )
    .unwrap();
    let listed = &manifest["artifacts"][0];
    let row = sqlx::query("SELECT size_bytes, sha256 FROM artifact_index WHERE object_key = $1")
        .bind(listed["key"].as_str().unwrap())
        .fetch_one(&env.deps.pool)
        .await
        .unwrap();
    assert_eq!(
        listed["sha256"].as_str(),
        Some(row.get::<String, _>("sha256").as_str())
    );
    assert_eq!(manifest["event_sequence"], 12);

    // A reply per prompt is queued for the bound channel; the worker heartbeat says stopped.
    let deliveries = store::delivery_counts(&env.deps.pool, env.deps.profile)
        .await
        .unwrap();
    assert_eq!(deliveries.pending, 3);
    let (status, processed): (String, i64) = sqlx::query_as(
        "SELECT status, commands_processed FROM worker_heartbeats WHERE worker_id = 'w1'",
    )
    .fetch_one(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), processed), ("stopped", 3));

    // A bad object restore shows: one object altered, one missing.
    let altered = listed["key"].as_str().unwrap();
    env.deps
        .objects
        .put(&altered.into(), Bytes::from_static(b"tampered").into())
        .await
        .unwrap();
    env.deps
        .objects
        .delete(&manifest_key.as_str().into())
        .await
        .unwrap();
    let check = store::verify_artifacts(
        &env.deps.pool,
        env.deps.profile,
        env.deps.objects.as_ref(),
        None,
    )
    .await
    .unwrap();
    assert_eq!((check.missing, check.mismatched), (1, 1), "{check:?}");
    assert_eq!(check.missing_keys, vec![manifest_key]);
    web.stop().await;
}

#[tokio::test]
async fn two_workers_keep_each_sessions_commands_in_order() {
    let env = env("order").await;
    let t = tenant(&env.deps, "order").await;
    let web = Web::start(&env.deps).await;
    let client = http();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let s = create_session(&client, &web, &t.desktop.token, None).await;
        for n in 0..4 {
            prompt(&client, &web, &t.desktop.token, &s, &format!("step {n}")).await;
        }
        sessions.push(s);
    }
    let cancel = CancellationToken::new();
    let mut a = WorkerConfig::new("wa");
    a.poll_interval = Duration::from_millis(10);
    let mut b = WorkerConfig::new("wb");
    b.poll_interval = Duration::from_millis(10);
    let ta = tokio::spawn(Worker::new(env.deps.clone(), a).run(cancel.clone()));
    let tb = tokio::spawn(Worker::new(env.deps.clone(), b).run(cancel.clone()));
    let pool = env.deps.pool.clone();
    eventually(
        "all 12 commands acked",
        Duration::from_secs(60),
        async || {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM session_commands WHERE status = 'acked'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (n == 12).then_some(())
        },
    )
    .await;
    cancel.cancel();
    let (ra, rb) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
    assert_eq!(ra.acked + rb.acked, 12);
    for s in &sessions {
        let prompts: Vec<String> = sqlx::query_scalar(
            "SELECT payload->>'text' FROM session_events
             WHERE session_id = $1 AND kind = 'user.prompt' ORDER BY sequence",
        )
        .bind(s)
        .fetch_all(&env.deps.pool)
        .await
        .unwrap();
        assert_eq!(prompts, ["step 0", "step 1", "step 2", "step 3"]);
    }
    let projections = store::verify_projections(&env.deps.pool, env.deps.profile)
        .await
        .unwrap();
    assert!(
        projections.consistent() && projections.lagging == 0,
        "{projections:?}"
    );
    web.stop().await;
}

#[tokio::test]
async fn a_prompt_without_text_fails_for_good_and_a_lagging_projection_catches_up() {
    let env = env("failing").await;
    let t = tenant(&env.deps, "failing").await;
    let web = Web::start(&env.deps).await;
    let client = http();
    let session = create_session(&client, &web, &t.desktop.token, None).await;
    sqlx::query(
        "INSERT INTO session_commands (id, session_id, kind, payload, status)
         VALUES ('cmd_bad', $1, 'prompt', '{}', 'pending')",
    )
    .bind(&session)
    .execute(&env.deps.pool)
    .await
    .unwrap();
    let report = Worker::new(env.deps.clone(), quick_worker("wf", 1))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.acked, report.failed), (0, 1));
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM session_commands WHERE id = 'cmd_bad'")
            .fetch_one(&env.deps.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.contains("no \"text\""), "{error}");

    // Events past the projection (as after a crash between append and projection) are folded
    // in by the worker's catch-up pass.
    sqlx::query(
        "INSERT INTO session_events (session_id, sequence, kind, payload)
         VALUES ($1, 1, 'user.prompt', '{\"text\": \"hi\"}')",
    )
    .bind(&session)
    .execute(&env.deps.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE sessions SET next_event_sequence = 2 WHERE id = $1")
        .bind(&session)
        .execute(&env.deps.pool)
        .await
        .unwrap();
    let lagging = store::projection_status(&env.deps.pool, env.deps.profile, &session, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lagging.lag, 1);
    let fixed = cowork_sim::worker::catch_up_lagging(&env.deps.pool, env.deps.profile)
        .await
        .unwrap();
    assert_eq!(fixed, 1);
    let status = store::projection_status(&env.deps.pool, env.deps.profile, &session, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status.projection_sequence, status.lag), (1, 0));
    web.stop().await;
}

#[tokio::test]
async fn a_due_time_fires_once_even_when_the_workflow_is_rewound() {
    let env = env("sched").await;
    let t = tenant(&env.deps, "sched").await;
    let due_ms = chrono_now_ms() - 1_000;
    let wf = store::create_workflow(
        &env.deps.pool,
        env.deps.profile,
        &t.id,
        "digest",
        "Summarise today",
        3600,
        due_ms,
    )
    .await
    .unwrap();
    let overdue = store::overdue_workflows(&env.deps.pool, env.deps.profile, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(overdue, 1);
    let a = Scheduler::new(env.deps.clone(), SchedulerConfig::new("sa"));
    let b = Scheduler::new(env.deps.clone(), SchedulerConfig::new("sb"));
    let (ra, rb) = tokio::join!(a.tick(), b.tick());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.runs_created + rb.runs_created, 1);
    let overdue = store::overdue_workflows(&env.deps.pool, env.deps.profile, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(overdue, 0);

    // A restore that rewinds the workflow but keeps its runs must not fire the due time again.
    sqlx::query("UPDATE workflows SET next_run_at = to_timestamp($2::float8 / 1000) WHERE id = $1")
        .bind(&wf)
        .bind(due_ms)
        .execute(&env.deps.pool)
        .await
        .unwrap();
    let again = a.tick().await.unwrap();
    assert_eq!((again.runs_created, again.duplicates_refused), (0, 1));
    let runs: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT idempotency_key, session_id FROM workflow_runs WHERE workflow_id = $1",
    )
    .bind(&wf)
    .fetch_all(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, format!("{wf}@{due_ms}"));
    // The run opened a session with its input uploaded and its prompt queued.
    let session = runs[0].1.clone().unwrap();
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM session_commands WHERE session_id = $1 AND status = 'pending'",
    )
    .bind(&session)
    .fetch_one(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(pending, 1);
    let check = store::verify_artifacts(
        &env.deps.pool,
        env.deps.profile,
        env.deps.objects.as_ref(),
        None,
    )
    .await
    .unwrap();
    assert!(check.ok() && check.checked == 1, "{check:?}");
    // The next due time is in the future: another tick fires nothing.
    assert_eq!(b.tick().await.unwrap().runs_created, 0);
}

fn chrono_now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Sessions bound to channels with `prompts` replies each, processed by a worker.
async fn deliveries_fixture(env: &common::Env, sessions: usize, prompts: usize) -> usize {
    let t = tenant(&env.deps, "chan").await;
    let slack =
        store::create_channel_binding(&env.deps.pool, env.deps.profile, &t.id, "slack", "#a")
            .await
            .unwrap();
    let hook = store::create_channel_binding(
        &env.deps.pool,
        env.deps.profile,
        &t.id,
        "webhook",
        "https://h/x",
    )
    .await
    .unwrap();
    let web = Web::start(&env.deps).await;
    let client = http();
    for i in 0..sessions {
        let binding = if i % 2 == 0 { &slack } else { &hook };
        let s = create_session(&client, &web, &t.desktop.token, Some(binding)).await;
        for n in 0..prompts {
            prompt(&client, &web, &t.desktop.token, &s, &format!("message {n}")).await;
        }
    }
    let total = (sessions * prompts) as u64;
    let report = Worker::new(env.deps.clone(), quick_worker("wd", total))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.acked, total);
    web.stop().await;
    sessions * prompts
}

async fn start_sink(config: SinkServerConfig) -> (String, SinkHandle, CancellationToken) {
    let handle = SinkHandle::new(&config).unwrap();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let url = format!("http://{}/deliveries", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    tokio::spawn(cowork_sim::sink::serve_sink(
        listener,
        handle.clone(),
        cancel.clone(),
    ));
    (url, handle, cancel)
}

fn quick_gateway(id: &str, sink: SinkTarget, max_attempts: i32) -> GatewayConfig {
    let mut config = GatewayConfig::new(id, sink);
    config.max_attempts = max_attempts;
    config.retry_base = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(100);
    config.poll_interval = Duration::from_millis(20);
    config
}

async fn wait_for_no_open_deliveries(pool: &sqlx::PgPool) {
    eventually(
        "every delivery to be sent or dead",
        Duration::from_secs(60),
        async || {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM channel_deliveries WHERE status NOT IN ('sent', 'dead')",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            (open == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn gateway_sends_each_delivery_once_in_order_retrying_refusals() {
    let env = env("gw").await;
    let total = deliveries_fixture(&env, 4, 5).await;
    let (url, sink, sink_cancel) = start_sink(SinkServerConfig {
        log: None,
        fail_first: 1,
    })
    .await;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(
        Gateway::new(
            env.deps.clone(),
            quick_gateway("g1", SinkTarget::Http(url), 5),
        )
        .run(cancel.clone()),
    );
    wait_for_no_open_deliveries(&env.deps.pool).await;
    cancel.cancel();
    let report = task.await.unwrap().unwrap();
    sink_cancel.cancel();

    let stats = sink.stats();
    assert_eq!(stats.unique, total as u64, "{stats:?}");
    assert_eq!((stats.duplicates, stats.out_of_order), (0, 0), "{stats:?}");
    assert_eq!(
        stats.refused, total as u64,
        "each first attempt was refused"
    );
    assert_eq!(report.sent, total as u64);
    assert_eq!(report.retried, total as u64);
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT DISTINCT attempt_count FROM channel_deliveries WHERE status = 'sent'",
    )
    .fetch_all(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(attempts, [2]);
    // Cursors sit on the last delivered sequence of each (binding, session).
    let behind: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM channel_session_bindings c
         WHERE c.last_event_sequence <> (SELECT max(event_sequence) FROM channel_deliveries d
                                         WHERE d.binding_id = c.binding_id
                                           AND d.session_id = c.session_id)",
    )
    .fetch_one(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(behind, 0);
    // Per (binding, session), the sink saw sequences in increasing order.
    let mut last: BTreeMap<(String, String), i64> = BTreeMap::new();
    for m in sink.accepted() {
        let prev = last.insert(
            (m.binding_id.clone(), m.session_id.clone()),
            m.event_sequence,
        );
        assert!(prev.is_none_or(|p| p < m.event_sequence));
        assert_eq!(m.attempt, 2);
    }
    // The cursor refuses to move backwards, whoever tries.
    let err = sqlx::query("UPDATE channel_session_bindings SET last_event_sequence = 0")
        .execute(&env.deps.pool)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("may only move forward")));
}

#[tokio::test]
async fn gateway_smoke_fails_when_a_delivery_sent_before_the_point_arrives_again() {
    let env = env("gwsmoke").await;
    let total = deliveries_fixture(&env, 2, 2).await;
    let before_any = chrono::Utc::now() - chrono::Duration::seconds(5);
    let jsonl = env.dir.path().join("sink.jsonl");
    let send_all = async || {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            Gateway::new(
                env.deps.clone(),
                quick_gateway("gsm", SinkTarget::Jsonl(jsonl.clone()), 3),
            )
            .run(cancel.clone()),
        );
        wait_for_no_open_deliveries(&env.deps.pool).await;
        cancel.cancel();
        task.await.unwrap().unwrap()
    };
    assert_eq!(send_all().await.sent as usize, total);
    // A point taken after every delivery reached the sink (by more than the commit margin).
    let point = chrono::Utc::now() + chrono::Duration::seconds(2);
    let smoke = async |point| {
        cowork_sim::smoke::gateway(
            &env.deps.pool,
            env.deps.profile,
            &jsonl,
            point,
            Duration::from_secs(10),
        )
        .await
    };
    let clean = smoke(Some(point)).await.unwrap();
    assert_eq!(clean.detail["resent_before_point"], 0, "{:?}", clean.detail);

    // The gateway loses its cursors and the deliveries their state: everything goes again.
    sqlx::raw_sql(
        "ALTER TABLE channel_session_bindings DISABLE TRIGGER channel_session_bindings_forward_only;
         UPDATE channel_session_bindings SET last_event_sequence = 0;
         ALTER TABLE channel_session_bindings ENABLE TRIGGER channel_session_bindings_forward_only;
         UPDATE channel_deliveries SET status = 'pending', next_attempt_at = now(),
                claimed_by = NULL, claim_expires_at = NULL, sent_at = NULL, attempt_count = 0;",
    )
    .execute(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(send_all().await.sent as usize, total);

    let err = smoke(Some(point)).await.err().map(|e| format!("{e:#}"));
    let err = err.expect("re-sends of what the point had as sent fail the smoke");
    assert!(
        err.contains(&format!("received {total} deliveries again"))
            && err.contains("did not resume from its stored cursors"),
        "{err}"
    );
    let first = cowork_sim::sink::jsonl_messages(&jsonl).unwrap()[0]
        .public_delivery_id
        .clone();
    assert!(err.contains(&first), "names the deliveries: {err}");
    // Against a point older than every first arrival, the same re-sends are expected ones,
    // and without a point only order is checked.
    let expected = smoke(Some(before_any)).await.unwrap();
    assert_eq!(expected.detail["sink"]["duplicates"], total as u64);
    smoke(None).await.unwrap();
}

#[tokio::test]
async fn gateway_gives_up_after_max_attempts_and_holds_back_missing_artifacts() {
    let env = env("gwdead").await;
    let total = deliveries_fixture(&env, 2, 2).await;
    // The artifacts of one session's replies are gone (a bad object restore).
    let lost_session: String =
        sqlx::query_scalar("SELECT session_id FROM channel_deliveries ORDER BY session_id LIMIT 1")
            .fetch_one(&env.deps.pool)
            .await
            .unwrap();
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT payload->>'artifact_key' FROM channel_deliveries WHERE session_id = $1",
    )
    .bind(&lost_session)
    .fetch_all(&env.deps.pool)
    .await
    .unwrap();
    for key in &keys {
        env.deps.objects.delete(&key.as_str().into()).await.unwrap();
    }
    let jsonl = env.dir.path().join("sink.jsonl");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(
        Gateway::new(
            env.deps.clone(),
            quick_gateway("g2", SinkTarget::Jsonl(jsonl.clone()), 3),
        )
        .run(cancel.clone()),
    );
    wait_for_no_open_deliveries(&env.deps.pool).await;
    cancel.cancel();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.dead as usize, keys.len());
    assert_eq!(report.sent as usize, total - keys.len());
    let dead: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT session_id, attempt_count, last_error FROM channel_deliveries
         WHERE status = 'dead'",
    )
    .fetch_all(&env.deps.pool)
    .await
    .unwrap();
    for (session, attempts, error) in &dead {
        assert_eq!(session, &lost_session);
        assert_eq!(*attempts, 3);
        assert!(error.contains("missing from the object store"), "{error}");
    }
    let stats = cowork_sim::sink::jsonl_stats(&jsonl).unwrap();
    assert_eq!(stats.unique as usize, total - keys.len());
    assert_eq!(stats.duplicates, 0);
}

#[tokio::test]
async fn maintenance_mode_answers_writes_503_and_keeps_reads() {
    let env = env("maint").await;
    let t = tenant(&env.deps, "maint").await;
    let operator = token(&env.deps, Scope::Operator).await;
    let web = Web::start(&env.deps).await;
    let client = http();
    let session = create_session(&client, &web, &t.desktop.token, None).await;

    let set = |on: bool, token: String| {
        let client = client.clone();
        let url = web.url("/admin/maintenance");
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({ "enabled": on }))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        set(true, t.desktop.token.clone()).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        set(true, operator.token.clone()).await.status(),
        StatusCode::OK
    );
    assert!(web.state.maintenance());

    let frozen = client
        .post(web.url("/api/sessions"))
        .bearer_auth(&t.desktop.token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(frozen.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(frozen.headers().contains_key("retry-after"));
    let frozen_prompt = client
        .post(web.url(&format!("/api/sessions/{session}/prompt")))
        .bearer_auth(&t.desktop.token)
        .json(&json!({ "text": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(frozen_prompt.status(), StatusCode::SERVICE_UNAVAILABLE);
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM session_commands")
        .fetch_one(&env.deps.pool)
        .await
        .unwrap();
    assert_eq!(commands, 0, "a frozen write must not reach the database");

    for (path, token) in [
        ("/api/sessions", &t.desktop.token),
        (
            &format!("/api/sessions/{session}/projection-status") as &str,
            &t.desktop.token,
        ),
        ("/api/workspace", &operator.token),
        ("/api/diagnostics", &operator.token),
        ("/api/metrics", &operator.token),
    ] {
        let r = client
            .get(web.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path} while frozen");
    }
    let ready: Value = client
        .get(web.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (ready["ready"].as_bool(), ready["maintenance"].as_bool()),
        (Some(true), Some(true))
    );
    let metrics = client
        .get(web.url("/api/metrics"))
        .bearer_auth(&operator.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cowork_web_writes_rejected_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("cowork_web_maintenance 1"), "{metrics}");

    assert_eq!(
        set(false, operator.token.clone()).await.status(),
        StatusCode::OK
    );
    prompt(&client, &web, &t.desktop.token, &session, "hello again").await;
    web.stop().await;
}

#[tokio::test]
async fn endpoints_reject_missing_wrong_and_underscoped_tokens() {
    let env = env("auth").await;
    let a = tenant(&env.deps, "alpha").await;
    let b = tenant(&env.deps, "beta").await;
    let operator = token(&env.deps, Scope::Operator).await;
    let gateway = token(&env.deps, Scope::Gateway).await;
    let revoked = token(&env.deps, Scope::Operator).await;
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1")
        .bind(&revoked.id)
        .execute(&env.deps.pool)
        .await
        .unwrap();
    let web = Web::start(&env.deps).await;
    let client = http();
    let session_a = create_session(&client, &web, &a.desktop.token, None).await;

    let bearer = |t: &str| Some(format!("Bearer {t}"));
    let cases: Vec<(&str, Option<String>, StatusCode)> = vec![
        ("/api/diagnostics", None, StatusCode::UNAUTHORIZED),
        (
            "/api/diagnostics",
            bearer("cws_operator_0000"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "/api/diagnostics",
            Some(format!("Basic {}", operator.token)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "/api/diagnostics",
            bearer(&revoked.token),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "/api/diagnostics",
            bearer(&a.desktop.token),
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/diagnostics",
            bearer(&gateway.token),
            StatusCode::FORBIDDEN,
        ),
        ("/api/diagnostics", bearer(&operator.token), StatusCode::OK),
        ("/api/metrics", None, StatusCode::UNAUTHORIZED),
        (
            "/api/metrics",
            bearer(&a.desktop.token),
            StatusCode::FORBIDDEN,
        ),
        ("/api/metrics", bearer(&operator.token), StatusCode::OK),
        ("/api/workspace", None, StatusCode::UNAUTHORIZED),
        (
            "/api/workspace",
            bearer(&gateway.token),
            StatusCode::FORBIDDEN,
        ),
        ("/api/workspace", bearer(&a.desktop.token), StatusCode::OK),
        ("/api/workspace", bearer(&operator.token), StatusCode::OK),
        ("/api/sessions", None, StatusCode::UNAUTHORIZED),
        (
            "/api/sessions",
            bearer(&gateway.token),
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/channels/status",
            bearer(&a.desktop.token),
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/channels/status",
            bearer(&gateway.token),
            StatusCode::OK,
        ),
        (
            "/admin/maintenance",
            bearer(&a.desktop.token),
            StatusCode::FORBIDDEN,
        ),
        ("/livez", None, StatusCode::OK),
    ];
    for (path, auth, expected) in cases {
        let mut request = client.get(web.url(path));
        if let Some(auth) = &auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, expected, "GET {path} with {auth:?}: {body}");
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            assert!(body.contains("\"error\""), "{body}");
        }
    }
    // Sessions belong to a tenant: another tenant's token cannot see or prompt them, and an
    // operator token cannot write them.
    let other = client
        .get(web.url(&format!("/api/sessions/{session_a}/projection-status")))
        .bearer_auth(&b.desktop.token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    let listed: Value = client
        .get(web.url("/api/sessions"))
        .bearer_auth(&b.desktop.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 0);
    let workspace: Value = client
        .get(web.url("/api/workspace"))
        .bearer_auth(&a.desktop.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(workspace["tenants"].as_array().unwrap().len(), 1);
    let create = client
        .post(web.url("/api/sessions"))
        .bearer_auth(&operator.token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), StatusCode::FORBIDDEN);
    let bad_body = client
        .post(web.url(&format!("/api/sessions/{session_a}/prompt")))
        .bearer_auth(&a.desktop.token)
        .json(&json!({ "txt": "typo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_body.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bad_limit = client
        .get(web.url("/api/sessions?limit=0"))
        .bearer_auth(&a.desktop.token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_limit.status(), StatusCode::BAD_REQUEST);
    web.stop().await;
}

#[tokio::test]
async fn readyz_needs_postgres_migrations_and_a_writable_object_store() {
    let db = common::fresh_db("ready");
    let dir = tempfile::tempdir().unwrap();
    let objects_dir = dir.path().join("objects");
    let deps = cowork_sim::Deps::connect(
        &db.url,
        &format!("file://{}", objects_dir.display()),
        &cowork_sim::ObjectStoreOptions::default(),
        cowork_sim::Profile::Kind,
    )
    .await
    .unwrap();
    let web = Web::start(&deps).await;
    let client = http();
    let r = client.get(web.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["migrations"]["ok"], false);
    assert!(
        body["migrations"]["detail"]
            .as_str()
            .unwrap()
            .contains("cowork-sim migrate")
    );

    cowork_sim::schema::migrate(&deps.pool, deps.profile)
        .await
        .unwrap();
    let r = client.get(web.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The object store's root is no longer a directory: the write probe fails.
    std::fs::remove_dir_all(&objects_dir).unwrap();
    std::fs::write(&objects_dir, b"not a directory").unwrap();
    let r = client.get(web.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (
            body["postgres"]["ok"].as_bool(),
            body["object_store"]["ok"].as_bool()
        ),
        (Some(true), Some(false))
    );
    web.stop().await;
}

#[tokio::test]
async fn seed_writes_consistent_data_that_the_roles_carry_on_from() {
    let env = env("seed").await;
    let mut config = cowork_sim::seed::SeedConfig::new(40);
    config.bind_every = 2;
    config.pending_commands = 3;
    config.rng_seed = 11;
    let seeded = cowork_sim::seed::run(&env.deps, &config).await.unwrap();
    let r = &seeded.report;
    let counts = cowork_sim::counts(&env.deps.pool, env.deps.profile)
        .await
        .unwrap();
    assert_eq!(counts.sessions, 40);
    assert_eq!(counts.session_events, 800);
    assert_eq!(counts.session_events as u64, r.events);
    assert_eq!(counts.session_projections, 40);
    assert_eq!(counts.artifact_index, 80);
    assert_eq!(counts.workflows, 10);
    assert_eq!(counts.channel_bindings, 6);
    assert_eq!(counts.channel_deliveries, r.deliveries);
    let d = counts.channel_deliveries;
    assert!(
        d.pending > 0 && d.claimed > 0 && d.sent > 0 && d.failed > 0 && d.dead > 0,
        "{d:?}"
    );
    let check = store::verify_artifacts(
        &env.deps.pool,
        env.deps.profile,
        env.deps.objects.as_ref(),
        None,
    )
    .await
    .unwrap();
    assert!(check.ok() && check.checked == 80, "{check:?}");
    let projections = store::verify_projections(&env.deps.pool, env.deps.profile)
        .await
        .unwrap();
    assert!(
        projections.consistent() && projections.lagging == 0,
        "{projections:?}"
    );

    // Secrets: an opaque ciphertext or a KMS ref, never both; tokens stored only as hashes.
    let odd: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM byok_secrets WHERE (ciphertext IS NULL) = (kms_ref IS NULL)",
    )
    .fetch_one(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(odd, 0);
    for issued in std::iter::once(&seeded.tokens.operator).chain(&seeded.tokens.desktop) {
        let stored: String =
            sqlx::query_scalar("SELECT token_sha256 FROM api_tokens WHERE id = $1")
                .bind(&issued.id)
                .fetch_one(&env.deps.pool)
                .await
                .unwrap();
        assert_eq!(stored, cowork_sim::auth::hash_token(&issued.token));
        assert_ne!(stored, issued.token);
    }
    let web = Web::start(&env.deps).await;
    let client = http();
    let workspace: Value = client
        .get(web.url("/api/workspace"))
        .bearer_auth(&seeded.tokens.operator.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(workspace["tenants"].as_array().unwrap().len(), 3);
    assert_eq!(workspace["tenants"][0]["byok"].as_array().unwrap().len(), 2);
    web.stop().await;

    // The same seed twice is refused with a way out.
    let again = cowork_sim::seed::run(&env.deps, &config)
        .await
        .err()
        .map(|e| format!("{e:#}"));
    assert!(again.is_some_and(|e| e.contains("use another seed or a fresh database")));

    // A worker carries on from the seeded checkpoints, the gateway from the seeded cursors.
    let report = Worker::new(env.deps.clone(), quick_worker("ws", 3))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.acked, 3);
    let version: i64 = sqlx::query_scalar(
        "SELECT max(checkpoint_version) FROM worker_leases WHERE worker_id = 'ws'",
    )
    .fetch_one(&env.deps.pool)
    .await
    .unwrap();
    assert_eq!(version, 2);
    let jsonl = env.dir.path().join("seed-sink.jsonl");
    let cancel = CancellationToken::new();
    let mut config = quick_gateway("gs", SinkTarget::Jsonl(jsonl.clone()), 5);
    config.claim_ttl = Duration::from_secs(30);
    let task = tokio::spawn(Gateway::new(env.deps.clone(), config).run(cancel.clone()));
    wait_for_no_open_deliveries(&env.deps.pool).await;
    cancel.cancel();
    let gw = task.await.unwrap().unwrap();
    let stats = cowork_sim::sink::jsonl_stats(&jsonl).unwrap();
    assert_eq!((stats.duplicates, stats.out_of_order), (0, 0), "{stats:?}");
    assert_eq!(stats.unique, gw.sent);
    let after = cowork_sim::counts(&env.deps.pool, env.deps.profile)
        .await
        .unwrap()
        .channel_deliveries;
    assert_eq!(
        (after.pending, after.claimed, after.failed),
        (0, 0, 0),
        "{after:?}"
    );
    assert!(after.sent > d.sent, "{after:?}");
    let check = store::verify_artifacts(
        &env.deps.pool,
        env.deps.profile,
        env.deps.objects.as_ref(),
        None,
    )
    .await
    .unwrap();
    assert!(check.ok(), "{check:?}");
}
