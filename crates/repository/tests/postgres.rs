//! Postgres backups and restores against a throwaway cluster: consistent counts, round trip,
//! damaged dumps, and the errors an operator meets (bad URL, missing pg_dump).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ephemeral_pg::Cluster;
use repository::*;
use sqlx::Connection;

const SCHEMA: &str = "
CREATE TABLE sessions (
    id bigint PRIMARY KEY, tenant text NOT NULL, title text NOT NULL, status text NOT NULL);
CREATE TABLE session_events (
    session_id bigint NOT NULL REFERENCES sessions (id), sequence bigint NOT NULL,
    kind text NOT NULL, payload jsonb NOT NULL, PRIMARY KEY (session_id, sequence));
CREATE TABLE artifact_index (
    id bigint PRIMARY KEY, session_id bigint NOT NULL REFERENCES sessions (id),
    object_key text NOT NULL, size_bytes bigint NOT NULL, sha256 text NOT NULL);
CREATE TABLE channel_deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, session_id bigint NOT NULL,
    status text NOT NULL, payload jsonb NOT NULL);
INSERT INTO sessions SELECT g, 'tenant-' || (g % 7), 'session ' || g,
    (ARRAY['idle','running','closed'])[1 + g % 3] FROM generate_series(1, 20000) g;
INSERT INTO session_events SELECT 1 + (g % 20000), g, 'message',
    jsonb_build_object('text', repeat('x', 40), 'n', g) FROM generate_series(1, 100000) g;
INSERT INTO artifact_index SELECT g, 1 + (g % 20000), 'artifacts/' || g,
    g * 10, md5(g::text) || md5(g::text) FROM generate_series(1, 10000) g;
INSERT INTO channel_deliveries (session_id, status, payload) SELECT 1 + (g % 20000),
    (ARRAY['pending','sent','failed','dead'])[1 + g % 4], '{}'::jsonb
    FROM generate_series(1, 30000) g;
";

fn counts() -> Vec<CountSpec> {
    vec![
        CountSpec::table("sessions"),
        CountSpec::table("session_events"),
        CountSpec::table("artifact_index"),
        CountSpec::grouped("channel_deliveries", "status"),
    ]
}

/// The same counts, taken by psql in another database.
fn live_counts(cluster: &Cluster, db: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for table in [
        "sessions",
        "session_events",
        "artifact_index",
        "channel_deliveries",
    ] {
        let n = cluster
            .psql(db, &format!("SELECT count(*) FROM {table}"))
            .expect("count");
        out.insert(table.to_owned(), n.trim().parse().expect("number"));
    }
    let rows = cluster
        .psql(
            db,
            "SELECT status || '|' || count(*) FROM channel_deliveries GROUP BY status",
        )
        .expect("grouped");
    for line in rows.lines().filter(|l| !l.is_empty()) {
        let (status, n) = line.split_once('|').expect("row");
        out.insert(
            format!("channel_deliveries[status={status}]"),
            n.parse().expect("number"),
        );
    }
    out
}

fn start_cluster() -> Cluster {
    let cluster = Cluster::start().expect("start a throwaway Postgres");
    cluster.create_database("app").expect("create app");
    cluster.psql("app", SCHEMA).expect("load schema");
    cluster
}

async fn open_repo(dir: &std::path::Path) -> Repository {
    Repository::open(&format!("file://{}", dir.display()), test_options())
        .await
        .expect("open repo")
}

fn backup_options(cluster: &Cluster, id: &PointId) -> PgBackupOptions {
    let mut options = PgBackupOptions::new(id.clone(), cluster.url("app"));
    options.bin_dir = Some(cluster.bin_dir().to_path_buf());
    options.counts = counts();
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_and_restore_round_trip_with_counts_from_the_dump_snapshot() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = open_repo(&dir.path().join("repo")).await;

    // Writers keep inserting during the backup: counts taken outside the dump's snapshot
    // would not match what the dump holds.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let url = cluster.url("app");
        let stop = stop.clone();
        let written = written.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .expect("writer connects");
            let mut id = 1_000_000i64;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                sqlx::query("INSERT INTO sessions VALUES ($1, 't', 'live', 'idle')")
                    .bind(id)
                    .execute(&mut conn)
                    .await
                    .expect("insert session");
                sqlx::query(
                    "INSERT INTO channel_deliveries (session_id, status, payload) \
                     VALUES ($1, 'pending', '{}')",
                )
                .bind(id)
                .execute(&mut conn)
                .await
                .expect("insert delivery");
                written.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    while written.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    let part = backup_postgres(&repo, &backup_options(&cluster, &id))
        .await
        .expect("backup");
    let at_backup_end = written.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    assert!(at_backup_end > 20, "writes happened during the backup");
    assert!(part.key.ends_with(".dump.zst"), "{}", part.key);
    assert!(
        part.size < part.dump_size,
        "compressed {} of {}",
        part.size,
        part.dump_size
    );
    assert!(
        part.pg_dump_version.contains("pg_dump"),
        "{}",
        part.pg_dump_version
    );

    let point = repo
        .write_point(NewPoint {
            id: id.clone(),
            postgres: Some(part.clone()),
            objects: None,
            secrets: vec![],
        })
        .await
        .expect("point");
    assert_eq!(point.table_counts(), Some(&part.table_counts));
    assert!(repo.verify_point(&id, true).await.expect("verify").is_ok());

    // Streamed restore into a database that does not exist yet.
    let mut restore = PgRestoreOptions::new(cluster.url("restored"));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore.create_database = true;
    let report = restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore");
    assert!(report.streamed);
    assert_eq!(report.archive_bytes, part.dump_size);
    let restored = live_counts(&cluster, "restored");
    assert_eq!(&restored, point.table_counts().expect("counts"));
    assert!(
        live_counts(&cluster, "app")["sessions"] > restored["sessions"],
        "the live database moved on after the backup"
    );

    // Parallel restore from a scratch file.
    let mut restore = PgRestoreOptions::new(cluster.url("restored_parallel"));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore.create_database = true;
    restore.jobs = 2;
    restore.scratch_dir = Some(dir.path().join("scratch"));
    let report = restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore -j");
    assert!(!report.streamed);
    assert_eq!(
        &live_counts(&cluster, "restored_parallel"),
        point.table_counts().expect("counts")
    );
    assert!(
        files_under(&dir.path().join("scratch")).is_empty(),
        "scratch file removed"
    );

    // fetch_dump gives a file pg_restore reads as is.
    let file = dir.path().join("fetched.dump");
    let bytes = fetch_dump(&repo, &id, &file).await.expect("fetch");
    assert_eq!(bytes, part.dump_size);
    let listed = std::process::Command::new(cluster.bin_dir().join("pg_restore"))
        .arg("--list")
        .arg(&file)
        .output()
        .expect("pg_restore --list");
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("TABLE DATA public session_events"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_catches_a_flipped_byte_in_the_dump_and_restore_refuses_it() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = open_repo(&repo_dir).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    let part = backup_postgres(&repo, &backup_options(&cluster, &id))
        .await
        .expect("backup");
    repo.write_point(NewPoint {
        id: id.clone(),
        postgres: Some(part.clone()),
        objects: None,
        secrets: vec![],
    })
    .await
    .expect("point");

    flip_byte(&repo_dir.join(&part.key));
    let report = repo.verify_point(&id, false).await.expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains(&part.key) && report.problems[0].contains("is damaged"),
        "{:?}",
        report.problems
    );

    let mut restore = PgRestoreOptions::new(cluster.url("restored"));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore.create_database = true;
    restore_postgres(&repo, &id, &restore)
        .await
        .expect_err("a damaged dump is not restored");
    let tables = cluster
        .psql(
            "restored",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
        )
        .expect("tables");
    assert_eq!(
        tables.trim(),
        "0",
        "the single restore transaction rolled back"
    );

    let file = dir.path().join("fetched.dump");
    let err = fetch_dump(&repo, &id, &file).await.expect_err("damaged");
    assert!(!file.exists(), "no partial file is left");
    assert!(format!("{err:#}").contains(&part.key), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_urls_missing_tools_and_missing_tables_are_clear_errors() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = open_repo(&dir.path().join("repo")).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");

    // A database that does not answer; the password must not leak into the message.
    let port = free_port();
    let mut options = backup_options(&cluster, &id);
    options.database_url = format!("postgres://app:hunter2@127.0.0.1:{port}/app");
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("no server");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}/app")) && text.contains("check"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // pg_dump missing from the configured directory.
    let empty = tempfile::tempdir().expect("tempdir");
    let mut options = backup_options(&cluster, &id);
    options.bin_dir = Some(empty.path().to_path_buf());
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("no pg_dump");
    let text = format!("{err:#}");
    assert!(
        text.contains("pg_dump was not found in") && text.contains("install"),
        "{text}"
    );

    // A table to count that does not exist.
    let mut options = backup_options(&cluster, &id);
    options.counts.push(CountSpec::table("workflows"));
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("no such table");
    assert!(err.to_string().contains("table workflows"), "{err}");

    // No partial dump or point was left by any of these.
    assert!(files_under(&dir.path().join("repo").join("postgres")).is_empty());
    assert!(
        repo.list_points(None)
            .await
            .expect("list")
            .points
            .is_empty()
    );

    // Restore errors: no Postgres part, and a point that does not exist.
    let err = restore_postgres(&repo, &id, &PgRestoreOptions::new(cluster.url("x")))
        .await
        .expect_err("no such point");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_dump_failure_aborts_the_upload() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = open_repo(&dir.path().join("repo")).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    // A fake pg_dump that writes half an archive and fails, as a dump cut off by the server.
    let tools = tempfile::tempdir().expect("tempdir");
    let fake = tools.path().join("pg_dump");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 99.0'; exit 0; fi\n\
         printf 'PGDMP partial'\necho 'pg_dump: error: connection lost' >&2\nexit 1\n",
    )
    .expect("write fake");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut options = backup_options(&cluster, &id);
    options.bin_dir = Some(tools.path().to_path_buf());
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("pg_dump fails");
    let text = format!("{err:#}");
    assert!(
        text.contains("pg_dump failed") && text.contains("connection lost"),
        "{text}"
    );
    assert!(
        files_under(&dir.path().join("repo").join("postgres")).is_empty(),
        "the aborted upload left nothing"
    );
}
