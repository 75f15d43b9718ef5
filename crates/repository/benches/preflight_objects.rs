//! Objects preflight benchmark (issue 18): what proving the blobs a restore would write costs,
//! on the object benchmarks' dataset (5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB) in a local
//! repository.
//!
//! * before: the old preflight, every blob's presence and size from one listing;
//! * delta, live store empty (worst case: every blob is read, hashed and kept in scratch);
//! * delta, live store equal to the point (best case: the snapshot's own source, etags match);
//! * full: every blob hashed, nothing kept;
//! * then the restore into the empty store with and without what preflight kept, so the
//!   preflight + restore pair can be compared before and after.
//!
//! `cargo bench -p repository --bench preflight_objects` (`BENCH_DIR` puts the data elsewhere
//! than the system temp directory, `BENCH_ROUNDS` sets the interleaved rounds, default 3).

#![allow(clippy::print_stdout)] // a benchmark prints its figures

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStore;
use repository::*;
use support::*;

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

const PARALLELISM: usize = 64;

fn target(store: &Arc<dyn ObjectStore>, scratch: Option<BlobScratch>, all: bool) -> VerifyOptions {
    VerifyOptions {
        full: false,
        restore_target: Some(RestoreTarget {
            store: store.clone(),
            label: "file:///target".into(),
            hash_all: all,
            scratch,
            parallelism: PARALLELISM,
        }),
    }
}

async fn timed(repo: &Repository, point: &PointId, options: &VerifyOptions) -> (Duration, u64) {
    let started = Instant::now();
    let report = repo
        .verify_point_with(point, options)
        .await
        .expect("preflight");
    let elapsed = started.elapsed();
    assert!(report.is_ok(), "{:?}", report.problems);
    (elapsed, report.blob_bytes_hashed)
}

async fn restore(
    repo: &Repository,
    snapshot: &SnapshotId,
    target: Arc<dyn ObjectStore>,
    scratch: Option<BlobScratch>,
) -> (Duration, RestoreObjectsReport) {
    let mut options = RestoreObjectsOptions::new("file:///target");
    options.scratch = scratch;
    let started = Instant::now();
    let report = restore_objects(repo, snapshot, target, &options)
        .await
        .expect("restore");
    (started.elapsed(), report)
}

async fn run() {
    let dir = bench_dir("rollcall-bench-preflight-");
    let live_dir = dir.path().join("live");
    let live = local_store(&live_dir);
    println!("generating {DATASET} in {}", live_dir.display());
    let data = dataset(&live).await;
    let repo = Repository::open(
        &format!("file://{}", dir.path().join("repo").display()),
        RepositoryOptions::default(),
    )
    .await
    .expect("open repo");
    let part = snapshot_objects(
        &repo,
        live.clone(),
        &SnapshotOptions::new("file:///live"),
        None,
    )
    .await
    .expect("snapshot");
    let snapshot = part.snapshot_id.clone();
    let point = repo
        .write_point(NewPoint {
            id: PointId::new("bench", chrono::Utc::now()).expect("point id"),
            postgres: None,
            objects: Some(part),
            secrets: vec![],
        })
        .await
        .expect("write point")
        .id;
    sync_fs();

    let rounds = rounds();
    println!(
        "\n== objects preflight on {} objects, {:.1} MB ({rounds} interleaved rounds, medians) ==",
        data.objects,
        mb(data.bytes)
    );
    println!("load before: {}", load());
    let mut samples: [Vec<Duration>; 7] = Default::default();
    for round in 0..rounds {
        let (elapsed, hashed) = timed_presence(&repo, &point).await;
        samples[0].push(elapsed);
        assert_eq!(hashed, 0);

        // Worst case: an empty live store, everything is delta and kept.
        let empty = local_store(&dir.path().join(format!("empty-{round}")));
        let scratch = BlobScratch::open(&dir.path().join(format!("scratch-{round}")), u64::MAX)
            .await
            .expect("scratch");
        let (elapsed, hashed) =
            timed(&repo, &point, &target(&empty, Some(scratch.clone()), false)).await;
        samples[1].push(elapsed);
        assert_eq!(hashed, data.bytes);
        sync_fs();

        let (elapsed, hashed) = timed(&repo, &point, &target(&empty, None, false)).await;
        samples[2].push(elapsed);
        assert_eq!(hashed, data.bytes);

        // Best case: the live store is the snapshot's source; nothing is read.
        let (elapsed, hashed) = timed(&repo, &point, &target(&live, None, false)).await;
        samples[3].push(elapsed);
        assert_eq!(hashed, 0);

        let (elapsed, hashed) = timed(&repo, &point, &target(&live, None, true)).await;
        samples[4].push(elapsed);
        assert_eq!(hashed, data.bytes);

        // The restores that follow: from the repository (as before), and from the scratch.
        let (elapsed, report) = restore(&repo, &snapshot, empty, Some(scratch)).await;
        samples[5].push(elapsed);
        assert_eq!(
            (report.restored, report.from_scratch),
            (data.objects, data.objects)
        );
        sync_fs();
        let plain = local_store(&dir.path().join(format!("plain-{round}")));
        let (elapsed, report) = restore(&repo, &snapshot, plain, None).await;
        samples[6].push(elapsed);
        assert_eq!((report.restored, report.from_scratch), (data.objects, 0));
        sync_fs();
    }

    header();
    let m: Vec<Duration> = samples.iter_mut().map(|s| median(s)).collect();
    report("before: presence and sizes", m[0], &data);
    report("delta, empty live store, kept in scratch", m[1], &data);
    report("delta, empty live store, no scratch", m[2], &data);
    report("delta, live store equal to the point", m[3], &data);
    report("full (every blob hashed)", m[4], &data);
    report("restore into the empty store, from scratch", m[5], &data);
    report("restore into the empty store, from repository", m[6], &data);
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "  preflight + restore, empty live store: before {:.2} s, after {:.2} s ({:+.0}%)",
        secs(m[0] + m[6]),
        secs(m[1] + m[5]),
        (secs(m[1] + m[5]) / secs(m[0] + m[6]) - 1.0) * 100.0
    );
    println!(
        "  preflight, live store equal to the point: before {:.3} s, after {:.3} s",
        secs(m[0]),
        secs(m[3])
    );
    println!("load after: {}", load());
}

/// The preflight before this change: presence and sizes only.
async fn timed_presence(repo: &Repository, point: &PointId) -> (Duration, u64) {
    timed(repo, point, &VerifyOptions::default()).await
}
