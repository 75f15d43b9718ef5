//! The benchmarks' Postgres dataset: 2.2 million rows over 4 tables shaped like the runbook's
//! service (`BENCH_ROWS_SCALE=N` multiplies the rows), and the set-up both benchmarks share.
//! Shared by `pg_backup` and `pg_restore`.

use std::time::Instant;

use ephemeral_pg::Cluster;
use repository::{Repository, RepositoryOptions};

/// `BENCH_ROUNDS`, default 3.
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// A `file://` repository in `dir/repo`, with the default options (fsync on).
pub async fn file_repo(dir: &std::path::Path) -> Repository {
    Repository::open(
        &format!("file://{}", dir.join("repo").display()),
        RepositoryOptions::default(),
    )
    .await
    .expect("repo")
}

/// Starts a cluster with database `app` holding the dataset, vacuumed and analyzed.
pub fn start() -> Cluster {
    let scale: i64 = std::env::var("BENCH_ROWS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let cluster = Cluster::start().expect("start Postgres");
    cluster.create_database("app").expect("create database");
    let (sessions, events, artifacts, deliveries) = (
        300_000 * scale,
        1_200_000 * scale,
        300_000 * scale,
        400_000 * scale,
    );
    println!(
        "loading {} rows: sessions {sessions}, session_events {events}, artifact_index \
         {artifacts}, channel_deliveries {deliveries}",
        sessions + events + artifacts + deliveries
    );
    let started = Instant::now();
    cluster
        .psql(
            "app",
            &format!(
                "
CREATE TABLE sessions (id bigint PRIMARY KEY, tenant_id text NOT NULL, title text NOT NULL,
    status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE session_events (session_id bigint NOT NULL, sequence bigint NOT NULL,
    kind text NOT NULL, payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, sequence));
CREATE TABLE artifact_index (id bigint PRIMARY KEY, session_id bigint NOT NULL,
    object_key text NOT NULL, size_bytes bigint NOT NULL, sha256 text NOT NULL,
    content_type text NOT NULL);
CREATE TABLE channel_deliveries (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id bigint NOT NULL, status text NOT NULL, attempt_count int NOT NULL,
    payload jsonb NOT NULL, last_error text);
INSERT INTO sessions SELECT g, 'tenant-' || (g % 97), 'Session about ' || md5(g::text),
    (ARRAY['idle','running','closed','errored'])[1 + g % 4], now() - g * interval '1 second'
    FROM generate_series(1, {sessions}) g;
INSERT INTO session_events SELECT 1 + g % {sessions}, g,
    (ARRAY['user_message','assistant_message','tool_call','tool_result'])[1 + g % 4],
    jsonb_build_object('text', 'event ' || g || ' ' || md5(g::text), 'tokens', g % 1000,
                       'model', 'model-' || (g % 5)),
    now() - g * interval '10 ms'
    FROM generate_series(1, {events}) g;
INSERT INTO artifact_index SELECT g, 1 + g % {sessions}, 'artifacts/' || md5(g::text),
    g * 37 % 1000000, md5(g::text) || md5((g + 1)::text), 'application/octet-stream'
    FROM generate_series(1, {artifacts}) g;
INSERT INTO channel_deliveries (session_id, status, attempt_count, payload, last_error)
    SELECT 1 + g % {sessions}, (ARRAY['pending','sent','sent','sent','failed','dead'])[1 + g % 6],
    g % 5, jsonb_build_object('channel', 'slack', 'event', g),
    CASE WHEN g % 6 >= 4 THEN 'timeout after ' || (g % 30) || 's' END
    FROM generate_series(1, {deliveries}) g;
"
            ),
        )
        .expect("load data");
    cluster.psql("app", "VACUUM ANALYZE").expect("vacuum");
    println!("loaded in {:.1}s", started.elapsed().as_secs_f64());
    cluster
}

/// CPU time the whole machine has been busy (all cores, all processes), from /proc/stat:
/// a restore's work is spread over pg_restore, Postgres backends and this process.
pub fn busy_cpu() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6)) // user, nice, system, irq, softirq
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    std::time::Duration::from_millis(ticks * 10)
}
