//! Encrypted against plaintext repository (issue 22): the same Postgres dataset (2.2 M rows,
//! `pg_dataset`) backed up and restored, and the same object dataset (5,000 × 4 KiB + 200 ×
//! 1 MiB + 4 × 64 MiB) snapshotted and restored, into a plaintext and an encrypted `file://`
//! repository, rounds interleaved (plain then encrypted, then encrypted then plain, ...).
//! Prints each operation's median and the encrypted/plain ratio (the target: within
//! 10%).
//!
//! `cargo bench -p repository --bench encrypted` (`BENCH_ROUNDS`, default 3;
//! `BENCH_ROWS_SCALE`; `BENCH_DIR` puts the data elsewhere than the system temp directory).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)] // shared by the Postgres benches; this one opens its own repositories
mod pg_dataset;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use repository::*;
use support::{bench_dir, dataset, median, sync_fs};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

#[derive(Default)]
struct Samples {
    pg_backup: Vec<Duration>,
    pg_restore: Vec<Duration>,
    snapshot: Vec<Duration>,
    restore_objects: Vec<Duration>,
}

async fn run() {
    let cluster = pg_dataset::start();
    let dir = bench_dir("rollcall-bench-encrypted-");
    let live: Arc<dyn ObjectStore> = common::local_store(&dir.path().join("live"));
    let figures = dataset(&live).await;
    let key = RepositoryKey::generate().expect("key");
    let rounds = pg_dataset::rounds();
    let (mut plain, mut sealed) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        // Alternate which goes first, so neither always meets a cold cache.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for encrypted in order {
            let samples = if encrypted { &mut sealed } else { &mut plain };
            let repo_dir = dir.path().join(format!("repo-{round}-{encrypted}"));
            let url = format!("file://{}", repo_dir.display());
            // A process holding a key refuses a plaintext repository (its config may have
            // been removed to turn encryption off): the plaintext runs hold none.
            let options = RepositoryOptions {
                key: encrypted.then(|| key.clone()),
                ..RepositoryOptions::default()
            };
            Repository::init(&url, options.clone(), encrypted.then_some(&key))
                .await
                .expect("init");
            let repo = Repository::open(&url, options).await.expect("open");
            assert_eq!(repo.encryption_key_id().is_some(), encrypted);
            one_round(&cluster, &repo, &live, &dir.path().join("target"), samples).await;
            let _ = std::fs::remove_dir_all(&repo_dir);
        }
    }
    println!(
        "\n{:<36} {:>10} {:>10} {:>8}",
        format!("median of {rounds} rounds"),
        "plain s",
        "encrypted s",
        "ratio"
    );
    let rows = [
        (
            "backup-postgres (2.2 M rows)",
            &mut plain.pg_backup,
            &mut sealed.pg_backup,
        ),
        (
            "restore-postgres",
            &mut plain.pg_restore,
            &mut sealed.pg_restore,
        ),
        (
            "snapshot objects",
            &mut plain.snapshot,
            &mut sealed.snapshot,
        ),
        (
            "restore objects",
            &mut plain.restore_objects,
            &mut sealed.restore_objects,
        ),
    ];
    for (label, p, s) in rows {
        let (p, s) = (median(p), median(s));
        println!(
            "{label:<36} {:>10.2} {:>10.2} {:>8.3}",
            p.as_secs_f64(),
            s.as_secs_f64(),
            s.as_secs_f64() / p.as_secs_f64()
        );
    }
    println!(
        "\nobjects: {} objects, {:.0} MB; repositories are local directories with fsync; {} cores",
        figures.objects,
        support::mb(figures.bytes),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

async fn one_round(
    cluster: &ephemeral_pg::Cluster,
    repo: &Repository,
    live: &Arc<dyn ObjectStore>,
    target_dir: &std::path::Path,
    samples: &mut Samples,
) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    sync_fs();
    let id = PointId::new("bench", chrono::Utc::now()).expect("id");
    let mut backup = PgBackupOptions::new(id.clone(), cluster.url("app"));
    backup.bin_dir = Some(cluster.bin_dir().to_path_buf());
    backup.jobs = cores;
    let started = Instant::now();
    let part = backup_postgres(repo, &backup).await.expect("backup");
    samples.pg_backup.push(started.elapsed());

    sync_fs();
    let started = Instant::now();
    let objects = snapshot_objects(
        repo,
        live.clone(),
        &SnapshotOptions::new("file:///live"),
        None,
    )
    .await
    .expect("snapshot");
    samples.snapshot.push(started.elapsed());
    let point = repo
        .write_point(NewPoint {
            id,
            postgres: Some(part),
            objects: Some(objects.clone()),
            secrets: vec![],
        })
        .await
        .expect("point");

    let db = "restored";
    cluster.create_database(db).expect("create database");
    let mut restore = PgRestoreOptions::new(cluster.url(db));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore.jobs = cores;
    sync_fs();
    let started = Instant::now();
    restore_postgres(repo, &point.id, &restore)
        .await
        .expect("restore");
    samples.pg_restore.push(started.elapsed());
    for (table, n) in point.table_counts().expect("counts") {
        let got = cluster
            .psql(db, &format!("SELECT count(*) FROM {table}"))
            .expect("count");
        assert_eq!(got.trim(), n.to_string(), "{table}");
    }
    cluster
        .psql("postgres", &format!("DROP DATABASE {db}"))
        .expect("drop");

    let _ = std::fs::remove_dir_all(target_dir);
    let target = common::local_store(target_dir);
    sync_fs();
    let started = Instant::now();
    restore_objects(
        repo,
        &objects.snapshot_id,
        target,
        &RestoreObjectsOptions::new("file:///target"),
    )
    .await
    .expect("restore objects");
    samples.restore_objects.push(started.elapsed());
}
