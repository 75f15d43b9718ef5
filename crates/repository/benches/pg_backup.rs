//! Postgres backup benchmark: a database of 2.2 million rows over 4 tables, backed up by
//! `backup_postgres` (parallel pg_dump -Z0 processes under one snapshot, each compressed with
//! zstd and streamed into a file:// repository) side by side with the runbook's plain
//! `pg_dump --format=custom --no-owner --no-acl`.
//!
//! `cargo bench -p repository --bench pg_backup` (`BENCH_ROWS_SCALE=2` doubles the rows).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::process::Command;
use std::time::{Duration, Instant};

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

    let dir = tempfile::tempdir().expect("tempdir");
    let plain_file = dir.path().join("plain.dump");
    let _ = Command::new("sync").status();

    // The runbook's command, as is.
    let cpu = pg_dataset::busy_cpu();
    let started = Instant::now();
    let status = Command::new(cluster.bin_dir().join("pg_dump"))
        .arg(cluster.url("app"))
        .args(["--format=custom", "--no-owner", "--no-acl", "--file"])
        .arg(&plain_file)
        .status()
        .expect("pg_dump");
    assert!(status.success());
    let plain_time = started.elapsed();
    let plain_cpu = pg_dataset::busy_cpu() - cpu;
    let plain_size = std::fs::metadata(&plain_file).expect("size").len();

    let repo = pg_dataset::file_repo(dir.path()).await;
    let counts = vec![
        CountSpec::table("sessions"),
        CountSpec::table("session_events"),
        CountSpec::table("artifact_index"),
        CountSpec::grouped("channel_deliveries", "status"),
    ];
    println!(
        "\n{:<48} {:>9} {:>12} {:>9} {:>9} {:>9}",
        "backup", "seconds", "bytes", "speed-up", "size", "CPU s"
    );
    print_row(
        "pg_dump --format=custom (runbook)",
        (plain_time, plain_cpu),
        plain_size,
        plain_time,
        plain_size,
    );
    // For context: pg_dump without compression into /dev/null is the floor for any pipeline
    // built on one pg_dump process.
    let cpu = pg_dataset::busy_cpu();
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
        (started.elapsed(), pg_dataset::busy_cpu() - cpu),
        0,
        plain_time,
        plain_size,
    );
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let zstd3 = Compression::Zstd {
        level: 3,
        workers: cores,
    };
    let rounds = pg_dataset::rounds();
    let mut variants = Vec::new();
    for round in 1..=rounds {
        variants.push((
            format!("rollcall: {cores} data jobs, zstd-1 (default) #{round}"),
            Compression::default(),
            cores,
        ));
    }
    variants.extend([
        (
            format!("rollcall: {cores} data jobs, zstd-3 x{cores} threads"),
            zstd3,
            cores,
        ),
        (
            "rollcall: 1 data job, zstd-1".to_owned(),
            Compression::default(),
            1,
        ),
        (
            "rollcall: 1 data job, zstd-3 (previous)".to_owned(),
            zstd3,
            1,
        ),
        (
            format!("rollcall: {cores} data jobs, pg_dump's compression"),
            Compression::PgDump,
            cores,
        ),
    ]);
    for (label, compression, jobs) in variants {
        let id = PointId::new("bench", chrono::Utc::now()).expect("id");
        let mut options = PgBackupOptions::new(id, cluster.url("app"));
        options.bin_dir = Some(cluster.bin_dir().to_path_buf());
        options.counts = CountSelection::Listed(counts.clone());
        options.compression = compression;
        options.jobs = jobs;
        let cpu = pg_dataset::busy_cpu();
        let started = Instant::now();
        let part = backup_postgres(&repo, &options).await.expect("backup");
        let elapsed = (started.elapsed(), pg_dataset::busy_cpu() - cpu);
        print_row(&label, elapsed, part.size, plain_time, plain_size);
    }
    println!(
        "\n{} cores; times include counting the 4 tables in the dump's snapshot; the repository \
         is a local directory with fsync. CPU s: busy CPU time of the whole machine (the server's \
         backends, pg_dump, zstd, us) during the backup; wall time cannot drop below it divided \
         by the cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// Busy CPU seconds of the whole machine so far (all of /proc/stat's `cpu` line but idle and
/// iowait), in the kernel's fixed USER_HZ of 100 ticks per second.
fn print_row(
    label: &str,
    (elapsed, cpu): (Duration, Duration),
    size: u64,
    base_time: Duration,
    base_size: u64,
) {
    println!(
        "{label:<48} {:>9.2} {size:>12} {:>8.2}× {:>8.2}× {:>9.2}",
        elapsed.as_secs_f64(),
        base_time.as_secs_f64() / elapsed.as_secs_f64(),
        size as f64 / base_size as f64,
        cpu.as_secs_f64()
    );
}
