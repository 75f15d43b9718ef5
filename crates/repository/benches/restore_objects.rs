//! Object restore benchmark (issue 5): the snapshot dataset (5,000 × 4 KiB + 200 × 1 MiB +
//! 4 × 64 MiB) is snapshotted once into a local repository, then restored into an empty local
//! target (a) whole, against `rclone sync` of the same source data in the same run, and (b) split
//! into two shards restored concurrently (two restores, each `Shard {i, 2}`, as two objects
//! agents would), against the whole restore.
//!
//! Two agents sharing one host's cores cannot beat one agent that already keeps every core
//! busy; sharding pays when each agent brings its own host. So the benchmark also runs the
//! restores as separate processes pinned with `taskset`, one core per process: one process
//! restoring everything on one core, against two processes, each restoring its shard on a core
//! of its own (the scale-out the shard split is for; both write to the same disk).
//!
//! `cargo bench -p repository --bench restore_objects` (`BENCH_DIR` puts the data elsewhere
//! than the system temp directory, `BENCH_ROUNDS` sets the interleaved rounds, default 3,
//! `BENCH_PARALLELISM` the objects in flight per restore, default the restore's own default).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStore;
use repository::*;
use support::*;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--restore-child") {
        runtime.block_on(restore_child(&args[at + 1..]));
        return;
    }
    runtime.block_on(run());
}

/// A child process (pinned by its parent): restores `SNAPSHOT` of the repository at `REPO`
/// into the directory `TARGET`, one shard (`i/n`) or `all`.
async fn restore_child(args: &[String]) {
    let [repo, snapshot, target, shard] = args else {
        panic!("usage: --restore-child REPO SNAPSHOT TARGET SHARD|all");
    };
    let repo = Repository::open(repo, RepositoryOptions::default())
        .await
        .expect("open repo");
    let snapshot = SnapshotId::parse(snapshot).expect("snapshot id");
    let shard = (shard != "all").then(|| shard.parse::<Shard>().expect("shard"));
    restore(&repo, &snapshot, local_store(Path::new(target)), shard).await;
}

/// Runs one restore child per shard (`None`: one child restoring everything), child `i`
/// pinned to core `i`, and returns the wall time until the last one finished.
fn pinned_restores(repo: &str, snapshot: &SnapshotId, target: &Path, shards: u32) -> Duration {
    let started = Instant::now();
    let children: Vec<_> = (0..shards)
        .map(|i| {
            let shard = if shards == 1 {
                "all".to_owned()
            } else {
                format!("{i}/{shards}")
            };
            Command::new("taskset")
                .args(["--cpu-list", &i.to_string()])
                .arg(std::env::current_exe().expect("current exe"))
                .arg("--restore-child")
                .args([
                    repo,
                    snapshot.as_str(),
                    &target.display().to_string(),
                    &shard,
                ])
                .spawn()
                .expect("start taskset")
        })
        .collect();
    for mut child in children {
        let status = child.wait().expect("wait for restore child");
        assert!(status.success(), "restore child failed: {status}");
    }
    started.elapsed()
}

async fn run() {
    let dir = bench_dir("rollcall-bench-restore-");
    let live_dir = dir.path().join("live");
    let live = local_store(&live_dir);
    println!("generating {DATASET} in {}", live_dir.display());
    let data = dataset(&live).await;
    let repo_url = format!("file://{}", dir.path().join("repo").display());
    let repo = Repository::open(&repo_url, RepositoryOptions::default())
        .await
        .expect("open repo");
    let part = snapshot_objects(&repo, live, &SnapshotOptions::new("file:///live"), None)
        .await
        .expect("snapshot");
    assert_eq!(part.objects, data.objects);
    let snapshot = part.snapshot_id;
    sync_fs();

    let rounds = rounds();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n== restore, repository → empty local target ({} objects, {:.1} MB; {rounds} \
         interleaved rounds, medians; {cores} cores) ==",
        data.objects,
        mb(data.bytes)
    );
    println!("load before: {}", load());
    let has_rclone = which("rclone");
    if !has_rclone {
        println!("rclone is not installed (apt-get install rclone): no comparison");
    }
    // Targets stay until the end: deleting 5,204 files and creating as many again at once
    // makes ext4's inode allocator skip the recently freed ones (`recently_deleted` in a
    // profile), which would time the file system's churn instead of the restore.
    let (mut whole, mut sharded, mut rclone) = (Vec::new(), Vec::new(), Vec::new());
    // One core per restore process: needs `taskset` (util-linux) and at least 2 cores.
    let pinned = which("taskset") && cores >= 2;
    if !pinned {
        println!("taskset is missing or there is one core: no pinned-process comparison");
    }
    let (mut one_core, mut two_cores) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let target = dir.path().join(format!("whole-{round}"));
        let started = Instant::now();
        let report = restore(&repo, &snapshot, local_store(&target), None).await;
        whole.push(started.elapsed());
        assert_eq!(report.restored, data.objects);
        check_restored(&target, &data);
        sync_fs();

        let target = dir.path().join(format!("sharded-{round}"));
        let store = local_store(&target);
        let started = Instant::now();
        let halves = futures::future::join_all((0..2).map(|i| {
            let (repo, snapshot, store) = (repo.clone(), snapshot.clone(), store.clone());
            tokio::spawn(async move {
                let shard = Shard::new(i, 2).expect("shard");
                restore(&repo, &snapshot, store, Some(shard)).await
            })
        }))
        .await;
        sharded.push(started.elapsed());
        let restored: u64 = halves
            .into_iter()
            .map(|h| h.expect("join shard").restored)
            .sum();
        assert_eq!(restored, data.objects, "each object restored once");
        check_restored(&target, &data);
        sync_fs();

        if pinned {
            let target = dir.path().join(format!("pinned-one-{round}"));
            one_core.push(pinned_restores(&repo_url, &snapshot, &target, 1));
            check_restored(&target, &data);
            sync_fs();
            let target = dir.path().join(format!("pinned-two-{round}"));
            two_cores.push(pinned_restores(&repo_url, &snapshot, &target, 2));
            check_restored(&target, &data);
            sync_fs();
        }

        if has_rclone {
            let dest = dir.path().join(format!("rclone-{round}"));
            rclone.push(rclone_sync(&live_dir, &dest, false));
            sync_fs();
        }
    }

    header();
    let whole = median(&mut whole);
    let sharded = median(&mut sharded);
    report("rollcall restore, whole", whole, &data);
    report("rollcall restore, 2 shards concurrently", sharded, &data);
    if has_rclone {
        let theirs = median(&mut rclone);
        report("rclone sync (defaults), source → empty dir", theirs, &data);
        println!(
            "  whole restore vs rclone sync: {:.2}× the objects/s (target ≥ 1.5×)",
            ratio(theirs, whole)
        );
    }
    if pinned {
        let (one, two) = (median(&mut one_core), median(&mut two_cores));
        report("1 process on 1 core, whole", one, &data);
        report("2 processes, 1 core each, a shard each", two, &data);
        println!(
            "  2 shards vs whole, sharing {cores} cores: {:.2}× the objects/s; one core per \
             agent: {:.2}× (target ≥ 1.6×)",
            ratio(whole, sharded),
            ratio(one, two)
        );
    } else {
        println!(
            "  2 shards vs whole restore: {:.2}× the objects/s (target ≥ 1.6×)",
            ratio(whole, sharded)
        );
    }
    println!("load after: {}", load());
}

/// How many times faster `ours` is than `theirs`.
fn ratio(theirs: Duration, ours: Duration) -> f64 {
    theirs.as_secs_f64() / ours.as_secs_f64()
}

async fn restore(
    repo: &Repository,
    snapshot: &SnapshotId,
    target: Arc<dyn ObjectStore>,
    shard: Option<Shard>,
) -> RestoreObjectsReport {
    let mut options = RestoreObjectsOptions::new("file:///target");
    options.shard = shard;
    if let Some(n) = std::env::var("BENCH_PARALLELISM")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        options.parallelism = n;
    }
    restore_objects(repo, snapshot, target, &options)
        .await
        .expect("restore")
}

/// The target holds every object at its size (the restore hashed every body it wrote).
fn check_restored(target: &std::path::Path, data: &Figures) {
    let files = files_under(target);
    assert_eq!(files.len() as u64, data.objects, "objects in the target");
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(target.join(f)).map_or(0, |m| m.len()))
        .sum();
    assert_eq!(bytes, data.bytes, "bytes in the target");
}
