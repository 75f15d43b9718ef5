//! Object snapshot benchmark: 5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB, local → local, against
//! `rclone sync` of the same data in the same run; then requests per object against a local S3
//! server (moto) for our snapshot, `rclone sync` and `aws s3 sync`.
//!
//! `cargo bench -p repository --bench snapshot` (set `BENCH_DIR` to put the data elsewhere
//! than the system temp directory, `BENCH_SKIP_S3=1` to skip the S3 part).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path as FsPath;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use repository::*;
use support::*;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let dir = bench_dir("rollcall-bench-snapshot-");
    let live_dir = dir.path().join("live");
    let live = local_store(&live_dir);
    println!("generating {DATASET} in {}", live_dir.display());
    let data = dataset(&live).await;
    let rounds = rounds();
    println!(
        "\n== local → local ({} objects, {:.1} MB; {rounds} interleaved rounds, medians) ==",
        data.objects,
        mb(data.bytes)
    );
    let has_rclone = which("rclone");
    if !has_rclone {
        println!("rclone is not installed (apt-get install rclone): no comparison");
    }
    let mut first = [Vec::new(), Vec::new()];
    let mut unchanged = [Vec::new(), Vec::new()];
    let mut rclone = Vec::new();
    let mut rclone_durable = Vec::new();
    for round in 0..rounds {
        for (i, fsync) in [true, false].into_iter().enumerate() {
            let repo_dir = dir.path().join(format!("repo-{round}-{fsync}"));
            let options = RepositoryOptions {
                fsync,
                ..RepositoryOptions::default()
            };
            let repo = Repository::open(&format!("file://{}", repo_dir.display()), options)
                .await
                .expect("open repo");
            let started = Instant::now();
            let part = snapshot_objects(
                &repo,
                live.clone(),
                &SnapshotOptions::new("file:///live"),
                None,
            )
            .await
            .expect("snapshot");
            first[i].push(started.elapsed());
            assert_eq!(part.objects, data.objects);
            let started = Instant::now();
            let again = snapshot_objects(
                &repo,
                live.clone(),
                &SnapshotOptions::new("file:///live"),
                None,
            )
            .await
            .expect("snapshot again");
            unchanged[i].push(started.elapsed());
            assert_eq!(again.copied_objects, 0);
            let _ = std::fs::remove_dir_all(&repo_dir);
        }
        if has_rclone {
            let dest = dir.path().join(format!("rclone-{round}"));
            rclone.push(rclone_sync(&live_dir, &dest, false));
            let _ = std::fs::remove_dir_all(&dest);
            sync_fs();
            // Like for like with fsync=true: rclone's copy on disk, not only in the page cache.
            rclone_durable.push(rclone_sync(&live_dir, &dest, true));
            let _ = std::fs::remove_dir_all(&dest);
        }
        sync_fs();
    }
    header();
    let first = [median(&mut first[0]), median(&mut first[1])];
    report("rollcall snapshot, first (fsync=true)", first[0], &data);
    report("rollcall snapshot, first (fsync=false)", first[1], &data);
    report(
        "rollcall snapshot, unchanged (fsync=true)",
        median(&mut unchanged[0]),
        &data,
    );
    report(
        "rollcall snapshot, unchanged (fsync=false)",
        median(&mut unchanged[1]),
        &data,
    );
    if has_rclone {
        let theirs = median(&mut rclone);
        report("rclone sync (defaults)", theirs, &data);
        for (label, ours) in [("fsync=true", first[0]), ("fsync=false", first[1])] {
            println!(
                "  rollcall first snapshot ({label}) vs rclone sync: {:.2}× the objects/s",
                theirs.as_secs_f64() / ours.as_secs_f64()
            );
        }
        let durable = median(&mut rclone_durable);
        report("rclone sync, then sync -f of its copy", durable, &data);
        println!(
            "  rollcall first snapshot (fsync=true) vs rclone sync + sync -f: {:.2}× the objects/s",
            durable.as_secs_f64() / first[0].as_secs_f64()
        );
    }

    if std::env::var_os("BENCH_SKIP_S3").is_none() {
        s3(dir.path()).await;
    }
}

/// Requests per object against moto, on a smaller set (moto is a Python server).
async fn s3(dir: &FsPath) {
    let Some(moto) = Moto::start() else {
        return;
    };
    let live_dir = dir.join("s3-live");
    let live = local_store(&live_dir);
    fill(&live, "small", 500, 4 << 10).await;
    fill(&live, "medium", 20, 1 << 20).await;
    let data = Figures {
        objects: 520,
        bytes: 500 * (4 << 10) + 20 * (1 << 20),
    };
    println!(
        "\n== local → S3 (moto on {}; {} objects, {:.1} MB) ==",
        moto.endpoint(),
        data.objects,
        mb(data.bytes)
    );
    println!(
        "{:<34} {:>9} {:>6} {:>6} {:>6} {:>6} {:>13}",
        "run", "seconds", "PUT", "HEAD", "GET", "LIST", "requests/obj"
    );

    moto.create_bucket("rollcall");
    let repo = Repository::from_store(
        moto.store("rollcall"),
        "s3://rollcall",
        RepositoryOptions::default(),
    );
    for round in ["first", "unchanged"] {
        let base = moto.requests().len();
        let started = Instant::now();
        snapshot_objects(
            &repo,
            live.clone(),
            &SnapshotOptions::new("file:///s3-live"),
            None,
        )
        .await
        .expect("snapshot to S3");
        requests(
            &moto,
            base,
            &format!("rollcall snapshot ({round})"),
            started.elapsed(),
            &data,
        );
    }

    if which("rclone") {
        moto.create_bucket("rclone");
        for round in ["first", "unchanged"] {
            let base = moto.requests().len();
            let started = Instant::now();
            let status = Command::new("rclone")
                .args(["sync", "--s3-no-check-bucket"])
                .arg(&live_dir)
                .arg("moto:rclone/data")
                .env("RCLONE_CONFIG_MOTO_TYPE", "s3")
                .env("RCLONE_CONFIG_MOTO_PROVIDER", "Other")
                .env("RCLONE_CONFIG_MOTO_ENDPOINT", moto.endpoint())
                .env("RCLONE_CONFIG_MOTO_ACCESS_KEY_ID", "test")
                .env("RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY", "test")
                .env("RCLONE_CONFIG_MOTO_REGION", "us-east-1")
                // A custom CA bundle breaks rclone's plain-HTTP transport to moto.
                .env_remove("AWS_CA_BUNDLE")
                .status()
                .expect("rclone");
            assert!(status.success());
            requests(
                &moto,
                base,
                &format!("rclone sync ({round})"),
                started.elapsed(),
                &data,
            );
        }
    }
    if which("aws") {
        moto.create_bucket("awscli");
        for round in ["first", "unchanged"] {
            let base = moto.requests().len();
            let started = Instant::now();
            let status = Command::new("aws")
                .args([
                    "s3",
                    "sync",
                    "--only-show-errors",
                    "--endpoint-url",
                    &moto.endpoint(),
                ])
                .arg(&live_dir)
                .arg("s3://awscli/data")
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .status()
                .expect("aws");
            assert!(status.success());
            requests(
                &moto,
                base,
                &format!("aws s3 sync ({round})"),
                started.elapsed(),
                &data,
            );
        }
    }
}

fn requests(moto: &Moto, base: usize, label: &str, elapsed: Duration, data: &Figures) {
    let all = moto.requests();
    let seen = &all[base.min(all.len())..];
    let count = |method: &str| seen.iter().filter(|(m, _)| m == method).count();
    let (put, head, get) = (count("PUT"), count("HEAD"), count("GET"));
    let list = seen
        .iter()
        .filter(|(m, p)| {
            m == "GET"
                && (p.contains("list-type") || p.contains("delimiter") || p.contains("prefix="))
        })
        .count();
    println!(
        "{label:<34} {:>9.2} {put:>6} {head:>6} {:>6} {list:>6} {:>13.2}",
        elapsed.as_secs_f64(),
        get - list,
        seen.len() as f64 / data.objects as f64
    );
}
