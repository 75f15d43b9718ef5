//! Postgres restore benchmark: the 2.2-million-row dataset of `pg_backup` backed up with
//! `backup_postgres` into a file:// repository, then restored by `restore_postgres` (fetch,
//! check and decompress the archives while pg_restore reads them) against a plain
//! `pg_restore -j <cores> --no-owner --no-acl` of the runbook's `pg_dump --format=custom`
//! file, each into a fresh database, alternating, in the same run. Prints both times, the
//! machine's busy CPU seconds and our overhead; also our restore with one `COPY` per table
//! (`copy_streams = 1`, as pg_restore loads a table), to show what sharing the largest table's
//! rows over connections gains.
//!
//! `cargo bench -p repository --bench pg_restore` (`BENCH_ROUNDS=N`, default 3;
//! `BENCH_ROWS_SCALE=2` doubles the rows; `BENCH_STAGES=1` prints when each stage of our
//! restores began: pre-data, each data archive done, post-data, done).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::process::Command;
use std::time::{Duration, Instant};

use ephemeral_pg::Cluster;
use repository::*;

mod pg_dataset;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let cluster = pg_dataset::start();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let rounds = pg_dataset::rounds();
    let dir = tempfile::tempdir().expect("tempdir");

    // The runbook's dump file, and an uncompressed one (pg_restore then inflates nothing).
    let plain_file = dir.path().join("plain.dump");
    let raw_file = dir.path().join("raw.dump");
    for (file, extra) in [(&plain_file, None), (&raw_file, Some("--compress=0"))] {
        let status = Command::new(cluster.bin_dir().join("pg_dump"))
            .arg(cluster.url("app"))
            .args(["--format=custom", "--no-owner", "--no-acl"])
            .args(extra)
            .arg("--file")
            .arg(file)
            .status()
            .expect("pg_dump");
        assert!(status.success());
    }

    let repo = pg_dataset::file_repo(dir.path()).await;
    let id = PointId::new("bench", chrono::Utc::now()).expect("id");
    let mut options = PgBackupOptions::new(id.clone(), cluster.url("app"));
    options.bin_dir = Some(cluster.bin_dir().to_path_buf());
    options.counts = CountSelection::Listed(vec![
        CountSpec::table("sessions"),
        CountSpec::table("session_events"),
        CountSpec::table("artifact_index"),
        CountSpec::table("channel_deliveries"),
    ]);
    let part = backup_postgres(&repo, &options).await.expect("backup");
    let point = repo
        .write_point(NewPoint {
            id: id.clone(),
            postgres: Some(part.clone()),
            objects: None,
            secrets: vec![],
        })
        .await
        .expect("point");
    println!(
        "point {id}: {} archives, {} bytes stored",
        part.files.len(),
        part.size
    );
    let _ = Command::new("sync").status();

    // Wall time and the machine's busy CPU time of each restore.
    let mut plain = Vec::new();
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    let mut one_copy = Vec::new();
    for round in 0..rounds {
        plain.push(pg_restore_file(
            &cluster,
            &plain_file,
            cores,
            &format!("plain_{round}"),
        ));
        ours.push(
            our_restore(
                &cluster,
                &repo,
                &point,
                cores,
                None,
                &format!("ours_{round}"),
            )
            .await,
        );
        one_copy.push(
            our_restore(
                &cluster,
                &repo,
                &point,
                cores,
                Some(1),
                &format!("one_{round}"),
            )
            .await,
        );
        raw.push(pg_restore_file(
            &cluster,
            &raw_file,
            cores,
            &format!("raw_{round}"),
        ));
    }

    println!(
        "\n{:<58} {:>13} {:>8}  each round",
        "restore into a fresh database (seconds)", "", "CPU s"
    );
    let base = median(&plain);
    for (label, times) in [
        (
            format!("pg_restore -j {cores} of pg_dump -Fc (runbook)"),
            &plain,
        ),
        (
            format!("pg_restore -j {cores} of pg_dump -Fc -Z0 (no inflate)"),
            &raw,
        ),
        (format!("rollcall restore_postgres, jobs {cores}"), &ours),
        (
            format!("rollcall restore_postgres, jobs {cores}, one COPY per table"),
            &one_copy,
        ),
    ] {
        let each: Vec<String> = times
            .iter()
            .map(|t| format!("{:.2}", t.0.as_secs_f64()))
            .collect();
        let cpu: Vec<Duration> = times.iter().map(|t| t.1).collect();
        println!(
            "{label:<58} median {:>6.2} {:>8.2}  [{}]",
            median(times).as_secs_f64(),
            median_of(&cpu).as_secs_f64(),
            each.join(" ")
        );
    }
    let overhead =
        |base: Duration| (median(&ours).as_secs_f64() / base.as_secs_f64() - 1.0) * 100.0;
    println!(
        "\noverhead of restore_postgres (medians): {:+.1}% against the runbook's file, {:+.1}% \
         against an uncompressed file\n{cores} cores; times of pg_restore exclude creating the \
         database, ours exclude it too and include fetching, checking and decompressing the \
         archives from the repository.",
        overhead(base),
        overhead(median(&raw)),
    );
}

/// Our restore of the point into a new database `db`, checked and dropped afterwards. Returns
/// the wall time and the machine's busy CPU time.
async fn our_restore(
    cluster: &Cluster,
    repo: &Repository,
    point: &Point,
    cores: u32,
    copy_streams: Option<u32>,
    db: &str,
) -> (Duration, Duration) {
    cluster.create_database(db).expect("create database");
    let mut restore = PgRestoreOptions::new(cluster.url(db));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore.jobs = cores;
    restore.copy_streams = copy_streams;
    let cpu = pg_dataset::busy_cpu();
    let started = Instant::now();
    if std::env::var_os("BENCH_STAGES").is_some() {
        println!("{db}:");
        restore.progress = Some(PgProgressFn(std::sync::Arc::new(move |p: &PgProgress| {
            println!(
                "  {:>6.2} s  {} ({}/{} archives)",
                started.elapsed().as_secs_f64(),
                p.stage,
                p.archives_done,
                p.archives_total
            );
        })));
    }
    restore_postgres(repo, &point.id, &restore)
        .await
        .expect("restore");
    let elapsed = (started.elapsed(), pg_dataset::busy_cpu() - cpu);
    // Same rows as the point recorded: the restore is complete.
    for (table, n) in point.table_counts().expect("counts") {
        let got = cluster
            .psql(db, &format!("SELECT count(*) FROM {table}"))
            .expect("count");
        assert_eq!(got.trim(), n.to_string(), "{table} in {db}");
    }
    drop_database(cluster, db);
    elapsed
}

/// `pg_restore -j` of a dump file into a new database; drops the database afterwards.
/// Returns the wall time and the machine's busy CPU time.
fn pg_restore_file(
    cluster: &Cluster,
    file: &std::path::Path,
    jobs: u32,
    db: &str,
) -> (Duration, Duration) {
    cluster.create_database(db).expect("create database");
    let cpu = pg_dataset::busy_cpu();
    let started = Instant::now();
    let status = Command::new(cluster.bin_dir().join("pg_restore"))
        .args(["--no-owner", "--no-acl", "--exit-on-error"])
        .arg(format!("--jobs={jobs}"))
        .arg(format!("--dbname={}", cluster.url(db)))
        .arg(file)
        .status()
        .expect("pg_restore");
    let elapsed = (started.elapsed(), pg_dataset::busy_cpu() - cpu);
    assert!(status.success());
    drop_database(cluster, db);
    elapsed
}

fn drop_database(cluster: &Cluster, db: &str) {
    cluster
        .psql("postgres", &format!("DROP DATABASE {db}"))
        .expect("drop database");
}

/// The median wall time.
fn median(times: &[(Duration, Duration)]) -> Duration {
    median_of(&times.iter().map(|t| t.0).collect::<Vec<_>>())
}

fn median_of(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
