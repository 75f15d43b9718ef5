//! The Postgres part of a drill's freeze window, before and after prepare/commit (issue 18):
//! the 2.2-million-row dataset of `pg_backup` backed up into a file:// repository, then put in
//! place of the live database `app` by the same code the database agent runs. One phase (the
//! old plan, `restore-postgres` after the freeze): `prepare_swap` and `commit_swap` both count
//! against the freeze window. Two phases (the default plan): `prepare_swap` runs while traffic
//! is served and only `commit_swap` (block connections, end sessions, two renames) is inside
//! the window. Alternating, same run; prints each round and the medians.
//!
//! `cargo bench -p repository --bench pg_swap` (`BENCH_ROUNDS=N`, default 3;
//! `BENCH_ROWS_SCALE=2` doubles the rows: the commit should not grow with them).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

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
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let rounds = pg_dataset::rounds();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = pg_dataset::file_repo(dir.path()).await;
    let id = PointId::new("bench", chrono::Utc::now()).expect("id");
    let mut backup = PgBackupOptions::new(id.clone(), cluster.url("app"));
    backup.bin_dir = Some(cluster.bin_dir().to_path_buf());
    backup.counts = CountSelection::Listed(
        [
            "sessions",
            "session_events",
            "artifact_index",
            "channel_deliveries",
        ]
        .map(CountSpec::table)
        .to_vec(),
    );
    let part = backup_postgres(&repo, &backup).await.expect("backup");
    repo.write_point(NewPoint {
        id: id.clone(),
        postgres: Some(part.clone()),
        objects: None,
        secrets: vec![],
    })
    .await
    .expect("point");
    println!("point {id}: {} bytes stored", part.size);

    let mut restore = PgRestoreOptions::new(cluster.url("app"));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore.jobs = cores;
    // (prepare, commit) of each round, per plan shape.
    let (mut one_phase, mut two_phase) = (Vec::new(), Vec::new());
    // The machine's busy CPU time of each prepare (what the service shares its cores with).
    let mut prepare_cpu = Vec::new();
    for round in 0..rounds {
        for (shape, out) in [("a", &mut one_phase), ("b", &mut two_phase)] {
            let tag = format!("{shape}{round}");
            let mut swap =
                DatabaseSwap::connect(&cluster.url("app"), &tag, Duration::from_secs(10))
                    .await
                    .expect("connect");
            let (started, cpu) = (Instant::now(), pg_dataset::busy_cpu());
            prepare_swap(&repo, &id, &mut swap, &restore, &[])
                .await
                .expect("prepare");
            let prepared = started.elapsed();
            prepare_cpu.push(pg_dataset::busy_cpu() - cpu);
            let started = Instant::now();
            commit_swap(&mut swap, &id).await.expect("commit");
            let committed = started.elapsed();
            swap.close().await;
            out.push((prepared, committed));
            // Keep the disk in bounds: the database this swap replaced is not needed here.
            cluster
                .psql("postgres", &format!("DROP DATABASE app_pre_{tag}"))
                .expect("drop the replaced copy");
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let secs = |d: Duration| format!("{:.3}", d.as_secs_f64());
    println!("\nround  prepare s  commit s   (each shape swaps the whole dataset in)");
    for (round, (a, b)) in one_phase.iter().zip(&two_phase).enumerate() {
        println!(
            "{round:>5}  {:>9}  {:>8}   {:>9}  {:>8}",
            secs(a.0),
            secs(a.1),
            secs(b.0),
            secs(b.1)
        );
    }
    let window_one = median(one_phase.iter().map(|(p, c)| *p + *c).collect());
    let window_two = median(two_phase.iter().map(|(_, c)| *c).collect());
    println!(
        "\nthe Postgres part of the freeze window (medians, {cores} cores):\n  one phase \
         (restore-postgres after the freeze): {} s\n  prepare, then commit (the default plan): \
         {} s (prepare, outside the window: {} s, {} busy CPU s)",
        secs(window_one),
        secs(window_two),
        secs(median(two_phase.iter().map(|(p, _)| *p).collect())),
        secs(median(prepare_cpu)),
    );
}
