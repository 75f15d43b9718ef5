//! Postgres backup benchmark: a database of 2.2 million rows over 4 tables, backed up by
//! `backup_postgres` (pg_dump -Z0 + multithreaded zstd, streamed into a file:// repository)
//! side by side with the runbook's plain `pg_dump --format=custom --no-owner --no-acl`.
//!
//! `cargo bench -p repository --bench pg_backup` (`BENCH_ROWS_SCALE=2` doubles the rows).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::process::Command;
use std::time::{Duration, Instant};

use ephemeral_pg::Cluster;
use repository::*;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
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

    let dir = tempfile::tempdir().expect("tempdir");
    let plain_file = dir.path().join("plain.dump");
    let _ = Command::new("sync").status();

    // The runbook's command, as is.
    let started = Instant::now();
    let status = Command::new(cluster.bin_dir().join("pg_dump"))
        .arg(cluster.url("app"))
        .args(["--format=custom", "--no-owner", "--no-acl", "--file"])
        .arg(&plain_file)
        .status()
        .expect("pg_dump");
    assert!(status.success());
    let plain_time = started.elapsed();
    let plain_size = std::fs::metadata(&plain_file).expect("size").len();

    let repo = Repository::open(
        &format!("file://{}", dir.path().join("repo").display()),
        RepositoryOptions::default(),
    )
    .await
    .expect("repo");
    let counts = vec![
        CountSpec::table("sessions"),
        CountSpec::table("session_events"),
        CountSpec::table("artifact_index"),
        CountSpec::grouped("channel_deliveries", "status"),
    ];
    println!(
        "\n{:<48} {:>9} {:>12} {:>9} {:>9}",
        "backup", "seconds", "bytes", "speed-up", "size"
    );
    print_row(
        "pg_dump --format=custom (runbook)",
        plain_time,
        plain_size,
        plain_time,
        plain_size,
    );
    // For context: pg_dump without compression into /dev/null is the floor for any pipeline
    // built on one pg_dump process.
    let started = Instant::now();
    let status = Command::new(cluster.bin_dir().join("pg_dump"))
        .arg(cluster.url("app"))
        .args(["--format=custom", "--no-owner", "--no-acl", "-Z0"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("pg_dump");
    assert!(status.success());
    print_row(
        "(floor: pg_dump -Z0 > /dev/null)",
        started.elapsed(),
        0,
        plain_time,
        plain_size,
    );
    for (label, compression) in [
        (
            "rollcall: pg_dump -Z0 + zstd-3 (default)",
            Compression::default(),
        ),
        (
            "rollcall: pg_dump -Z0 + zstd-1",
            Compression::Zstd {
                level: 1,
                workers: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            },
        ),
        ("rollcall: pg_dump's own compression", Compression::PgDump),
    ] {
        let id = PointId::new("bench", chrono::Utc::now()).expect("id");
        let mut options = PgBackupOptions::new(id, cluster.url("app"));
        options.bin_dir = Some(cluster.bin_dir().to_path_buf());
        options.counts = counts.clone();
        options.compression = compression;
        let started = Instant::now();
        let part = backup_postgres(&repo, &options).await.expect("backup");
        let elapsed = started.elapsed();
        print_row(label, elapsed, part.size, plain_time, plain_size);
    }
    println!(
        "\n{} cores; times include counting the 4 tables in the dump's snapshot; the repository \
         is a local directory with fsync.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

fn print_row(label: &str, elapsed: Duration, size: u64, base_time: Duration, base_size: u64) {
    println!(
        "{label:<48} {:>9.2} {size:>12} {:>8.2}× {:>8.2}×",
        elapsed.as_secs_f64(),
        base_time.as_secs_f64() / elapsed.as_secs_f64(),
        size as f64 / base_size as f64
    );
}
