//! Object snapshots, restores, verification, retention and damage, on local file-system
//! repositories (with a request-counting wrapper) and real directories.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use repository::*;

fn snapshot_options(label: &str) -> SnapshotOptions {
    let mut options = SnapshotOptions::new(label);
    options.environment = Some("dev".into());
    // Keep "large" objects small in tests; parts are at least 5 MiB.
    options.multipart_threshold = 1 << 20;
    options
}

/// Snapshots `live` with the test options; `what` names the snapshot if it fails.
async fn snapshot_live(
    repo: &Repository,
    live: &Arc<dyn ObjectStore>,
    what: &str,
) -> ObjectSnapshotPart {
    snapshot_objects(repo, live.clone(), &snapshot_options("file:///live"), None)
        .await
        .expect(what)
}

async fn point_with_snapshot(repo: &Repository, source: Arc<dyn ObjectStore>, env: &str) -> Point {
    let mut options = snapshot_options("file:///live");
    options.environment = Some(env.into());
    let part = snapshot_objects(repo, source, &options, None)
        .await
        .expect("snapshot");
    repo.write_point(NewPoint {
        id: PointId::new(env, chrono::Utc::now()).expect("id"),
        postgres: None,
        objects: Some(part),
        secrets: vec![],
    })
    .await
    .expect("write point")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_and_restore_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 300, 4096).await;
    fill(&live, "checkpoints", 3, 3 << 20).await; // multipart path
    // Two keys with the same body share one blob.
    live.put(&Path::from("dup/a"), content("same", 0, 1000).into())
        .await
        .expect("put");
    live.put(&Path::from("dup/b"), content("same", 0, 1000).into())
        .await
        .expect("put");
    let repo_dir = dir.path().join("repo");
    let repo = Repository::open(&format!("file://{}", repo_dir.display()), test_options())
        .await
        .expect("open repo");

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let progress: ProgressFn = Arc::new(move |p: &TransferProgress| {
        sink.lock().expect("progress").push(p.clone());
    });
    let part = snapshot_objects(
        &repo,
        live.clone(),
        &snapshot_options("file:///live"),
        Some(progress),
    )
    .await
    .expect("snapshot");
    assert_eq!(part.objects, 305);
    assert_eq!(part.copied_objects, 304, "duplicate bodies are stored once");
    let last = seen
        .lock()
        .expect("progress")
        .last()
        .cloned()
        .expect("reported");
    assert_eq!(last.phase, TransferPhase::Done);
    assert_eq!(last.objects_done, 305);
    assert_eq!(last.objects_total, 305);

    let point = repo
        .write_point(NewPoint {
            id: PointId::new("dev", chrono::Utc::now()).expect("id"),
            postgres: None,
            objects: Some(part.clone()),
            secrets: vec![SecretRef {
                name: "cookie-secret".into(),
                manager: "vault".into(),
                reference: "secret/data/cowork/cookie".into(),
                version: Some("7".into()),
                kms_key: None,
                rotated_at: None,
            }],
        })
        .await
        .expect("point");
    let report = repo.verify_point(&point.id, true).await.expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.objects_checked, 305);

    let listed = repo.list_points(Some("dev")).await.expect("list");
    assert_eq!(listed.points, vec![point.clone()]);
    assert!(listed.damaged.is_empty());

    let target = local_store(&dir.path().join("restored"));
    let restored = restore_objects(
        &repo,
        &part.snapshot_id,
        target.clone(),
        &RestoreObjectsOptions::new("file:///restored"),
    )
    .await
    .expect("restore");
    assert_eq!(restored.restored, 305);
    assert!(restored.replaced.is_empty() && restored.removed.is_empty());
    assert_eq!(digest_store(&live).await, digest_store(&target).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_snapshot_copies_only_the_changed_one_percent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = CountingStore::new(local_store(&dir.path().join("live")));
    let live_dyn: Arc<dyn ObjectStore> = live.clone();
    fill(&live_dyn, "uploads", 1000, 4096).await;
    let (repo, counting) = counting_repo(&dir.path().join("repo"));
    let gets_before = live.counts.get(&live.counts.gets);

    let first = snapshot_live(&repo, &live_dyn, "first snapshot").await;
    assert_eq!(first.copied_objects, 1000);
    assert_eq!(
        counting.counts.get(&counting.counts.blob_puts),
        1000,
        "one PUT per new object"
    );
    assert_eq!(counting.counts.get(&counting.counts.heads), 0, "no HEAD");
    assert_eq!(
        live.counts.get(&live.counts.gets) - gets_before,
        1000,
        "one GET per object"
    );

    // Change 1% of the objects.
    for i in (0..1000).step_by(100) {
        let key = format!("uploads/{i:05}");
        live_dyn
            .put(&Path::from(key.as_str()), content(&key, 1, 4096).into())
            .await
            .expect("change");
    }
    let puts = counting.counts.get(&counting.counts.blob_puts);
    let gets = live.counts.get(&live.counts.gets);
    let second = snapshot_live(&repo, &live_dyn, "second snapshot").await;
    assert_eq!(second.objects, 1000);
    assert_eq!(second.copied_objects, 10);
    assert_eq!(counting.counts.get(&counting.counts.blob_puts) - puts, 10);
    assert_eq!(
        live.counts.get(&live.counts.gets) - gets,
        10,
        "unchanged objects are not read"
    );
    assert_eq!(counting.counts.get(&counting.counts.heads), 0);
    assert_ne!(first.manifest_sha256, second.manifest_sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupted_snapshot_leaves_no_point_and_the_next_reuses_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 400, 4096).await;
    let (repo, counting) = counting_repo(&dir.path().join("repo"));
    counting
        .faults
        .notify_after_blob_puts
        .store(150, Ordering::SeqCst);

    let mut options = snapshot_options("file:///live");
    options.parallelism = 8;
    let snapshot = snapshot_objects(&repo, live.clone(), &options, None);
    tokio::select! {
        result = snapshot => panic!("the snapshot should have been interrupted: {result:?}"),
        () = counting.faults.after_puts.notified() => {} // the agent is "killed" here
    }
    counting
        .faults
        .notify_after_blob_puts
        .store(0, Ordering::SeqCst);
    let copied_before = counting.counts.get(&counting.counts.blob_puts);
    assert!((150..400).contains(&copied_before), "{copied_before}");
    assert!(
        repo.list_snapshots().await.expect("snapshots").is_empty(),
        "no manifest"
    );
    assert!(
        repo.list_points(None)
            .await
            .expect("points")
            .points
            .is_empty(),
        "no point"
    );

    // Wait until the aborted run is quiet, so the counts below belong to the second snapshot
    // alone: its copy tasks are cancelled at their next poll, but one being polled on another
    // worker at the moment of the abort can still start a PUT after we looked. No PUT in
    // flight and none started for 100 ms means none of its tasks is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = (
        counting.counts.get(&counting.counts.blob_puts),
        std::time::Instant::now(),
    );
    loop {
        let puts = counting.counts.get(&counting.counts.blob_puts);
        if puts != last.0 {
            last = (puts, std::time::Instant::now());
        }
        if counting.counts.get(&counting.counts.blob_puts_in_flight) == 0
            && last.1.elapsed() >= Duration::from_millis(100)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "blob PUTs of the interrupted snapshot never finished"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let copied_before = counting.counts.get(&counting.counts.blob_puts);
    let part = snapshot_objects(&repo, live.clone(), &options, None)
        .await
        .expect("second snapshot");
    let copied_now = counting.counts.get(&counting.counts.blob_puts) - copied_before;
    assert_eq!(part.objects, 400);
    assert_eq!(copied_now, part.copied_objects);
    assert!(
        copied_now <= 400 - 150,
        "blobs of the interrupted run are reused ({copied_now} copied again)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_errors_are_retried_and_permanent_ones_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 20, 1024).await;
    let (repo, counting) = counting_repo(&dir.path().join("repo"));

    counting.faults.status.store(503, Ordering::SeqCst);
    counting.faults.fail_blob_puts.store(3, Ordering::SeqCst);
    let part = snapshot_live(&repo, &live, "503s are retried").await;
    assert_eq!(part.copied_objects, 20);
    assert_eq!(counting.counts.get(&counting.counts.blob_puts), 23);

    let dir2 = tempfile::tempdir().expect("tempdir");
    let (repo, counting) = counting_repo(dir2.path());
    counting.faults.status.store(429, Ordering::SeqCst);
    counting.faults.fail_blob_puts.store(2, Ordering::SeqCst);
    snapshot_live(&repo, &live, "429s are retried").await;

    let dir3 = tempfile::tempdir().expect("tempdir");
    let (repo, counting) = counting_repo(dir3.path());
    counting.faults.status.store(403, Ordering::SeqCst);
    counting.faults.fail_blob_puts.store(1, Ordering::SeqCst);
    let mut options = snapshot_options("file:///live");
    options.parallelism = 1;
    let err = snapshot_objects(&repo, live.clone(), &options, None)
        .await
        .expect_err("403 is permanent");
    assert_eq!(
        counting.counts.get(&counting.counts.blob_puts),
        1,
        "not retried"
    );
    let text = format!("{err:#}");
    assert!(
        text.contains("no manifest was written") && text.contains("HTTP 403"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_catches_a_flipped_byte_and_a_missing_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 50, 4096).await;
    let repo_dir = dir.path().join("repo");
    let repo = Repository::open(&format!("file://{}", repo_dir.display()), test_options())
        .await
        .expect("open");
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    assert!(
        repo.verify_point(&point.id, true)
            .await
            .expect("verify")
            .is_ok()
    );

    let manifest = repo
        .read_manifest(&point.objects.as_ref().expect("objects").snapshot_id)
        .await
        .expect("manifest");
    let victim = &manifest.objects[7];
    let blob_path = repo_dir
        .join("objects/blobs")
        .join(&victim.sha256[..2])
        .join(&victim.sha256);
    flip_byte(&blob_path);

    let quick = repo.verify_point(&point.id, false).await.expect("verify");
    assert!(
        quick.is_ok(),
        "same size: only --full re-hashes ({:?})",
        quick.problems
    );
    let full = repo.verify_point(&point.id, true).await.expect("verify");
    assert_eq!(full.problems.len(), 1, "{:?}", full.problems);
    assert!(
        full.problems[0].contains(&victim.sha256) && full.problems[0].contains("is corrupt"),
        "{:?}",
        full.problems
    );
    // Restoring that object refuses the damaged body.
    let err = restore_objects(
        &repo,
        &manifest.id,
        local_store(&dir.path().join("target")),
        &RestoreObjectsOptions::new("file:///target"),
    )
    .await
    .expect_err("damaged blob");
    assert!(format!("{err:#}").contains("is damaged"), "{err:#}");

    let other = &manifest.objects[8];
    std::fs::remove_file(
        repo_dir
            .join("objects/blobs")
            .join(&other.sha256[..2])
            .join(&other.sha256),
    )
    .expect("remove blob");
    let quick = repo.verify_point(&point.id, false).await.expect("verify");
    assert_eq!(quick.problems.len(), 1, "{:?}", quick.problems);
    assert!(
        quick.problems[0].contains("is missing"),
        "{:?}",
        quick.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_point_and_tampered_manifest_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 10, 100).await;
    let repo_dir = dir.path().join("repo");
    let repo = Repository::open(&format!("file://{}", repo_dir.display()), test_options())
        .await
        .expect("open");
    let damaged = point_with_snapshot(&repo, live.clone(), "dev").await;
    let sound = point_with_snapshot(&repo, live.clone(), "dev").await;

    let point_file = repo_dir.join(format!("points/{}.json", damaged.id));
    let bytes = std::fs::read(&point_file).expect("read");
    std::fs::write(&point_file, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = repo.read_point(&damaged.id).await.expect_err("truncated");
    let text = err.to_string();
    assert!(
        matches!(err.downcast_ref(), Some(RepoError::Damaged { .. })),
        "{text}"
    );
    assert!(
        text.contains(&damaged.id.to_string()) && text.contains("truncated"),
        "{text}"
    );
    let listing = repo.list_points(Some("dev")).await.expect("list");
    assert_eq!(
        listing.points.iter().map(|p| &p.id).collect::<Vec<_>>(),
        vec![&sound.id]
    );
    assert_eq!(listing.damaged.len(), 1);
    assert_eq!(listing.damaged[0].id.as_ref(), Some(&damaged.id));

    // Edit a manifest entry but keep valid JSON.
    let snapshot = &sound.objects.as_ref().expect("objects").snapshot_id;
    let manifest_file = repo_dir.join(format!("objects/snapshots/{snapshot}.json"));
    let text = std::fs::read_to_string(&manifest_file).expect("read");
    let tampered = text.replacen("\"size\":100", "\"size\":101", 1);
    assert_ne!(text, tampered);
    std::fs::write(&manifest_file, tampered).expect("tamper");
    let report = repo.verify_point(&sound.id, false).await.expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("is damaged")
            && report.problems[0].contains("does not match its recorded sha256"),
        "{:?}",
        report.problems
    );
    let err = repo.read_manifest(snapshot).await.expect_err("tampered");
    assert!(matches!(
        err.downcast_ref(),
        Some(RepoError::Damaged { .. })
    ));

    // A missing point names itself and what to do.
    let missing = PointId::new("dev", chrono::Utc::now()).expect("id");
    let err = repo.read_point(&missing).await.expect_err("missing");
    assert!(err.to_string().contains("rollcall points"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_removes_exactly_what_it_should() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 40, 512).await;
    let repo_dir = dir.path().join("repo");
    let repo = Repository::open(&format!("file://{}", repo_dir.display()), test_options())
        .await
        .expect("open");

    // Five points of `dev`; each changes one object, so each snapshot has a unique blob.
    let mut points = Vec::new();
    for v in 0..5u32 {
        let key = "uploads/00000";
        live.put(&Path::from(key), content(key, v + 1, 512).into())
            .await
            .expect("change");
        points.push(point_with_snapshot(&repo, live.clone(), "dev").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prod = point_with_snapshot(&repo, live.clone(), "prod").await;
    // An unreferenced snapshot of dev (a break-glass `repo snapshot`).
    let orphan = snapshot_live(&repo, &live, "orphan snapshot").await;

    let window = Duration::from_secs(7 * 24 * 3600);
    // Cut-off exactly at p3's creation: p0, p1, p2 are past the window; p0 is in use.
    let now = points[3].created_at + chrono::Duration::from_std(window).expect("window");
    let mut options = PruneOptions::new("dev", window);
    options.now = Some(now);
    options.in_use = HashSet::from([points[0].id.clone()]);
    options.dry_run = true;

    let before = files_under(&repo_dir);
    let dry = repo.prune(&options).await.expect("dry run");
    assert_eq!(files_under(&repo_dir), before, "a dry run deletes nothing");
    assert_eq!(
        dry.deleted_points,
        vec![points[1].id.clone(), points[2].id.clone()]
    );

    options.dry_run = false;
    let report = repo.prune(&options).await.expect("prune");
    assert_eq!(report.deleted_points, dry.deleted_points);
    assert_eq!(report.deleted_blobs, dry.deleted_blobs);
    let kept: BTreeSet<_> = report
        .kept_points
        .iter()
        .map(|k| (k.id.clone(), k.reason))
        .collect();
    assert_eq!(
        kept,
        BTreeSet::from([
            (points[0].id.clone(), KeepReason::InUse),
            (points[3].id.clone(), KeepReason::WithinWindow),
            (points[4].id.clone(), KeepReason::Newest),
        ])
    );
    let snapshot_of = |p: &Point| p.objects.as_ref().expect("objects").snapshot_id.clone();
    assert_eq!(
        report.deleted_manifests.iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([&snapshot_of(&points[1]), &snapshot_of(&points[2])]),
        "the orphan snapshot is younger than the window and stays"
    );
    // p1's and p2's versions of uploads/00000 were only theirs: exactly 2 blobs go.
    assert_eq!(report.deleted_blobs, 2);

    let remaining = repo.list_points(None).await.expect("list");
    let ids: BTreeSet<_> = remaining.points.iter().map(|p| p.id.clone()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            points[0].id.clone(),
            points[3].id.clone(),
            points[4].id.clone(),
            prod.id.clone()
        ])
    );
    // The blobs left are exactly those the remaining manifests reference.
    let mut wanted = BTreeSet::new();
    for p in &remaining.points {
        let m = repo.read_manifest(&snapshot_of(p)).await.expect("manifest");
        wanted.extend(m.objects.into_iter().map(|e| e.sha256));
    }
    let orphan_manifest = repo
        .read_manifest(&orphan.snapshot_id)
        .await
        .expect("orphan");
    wanted.extend(orphan_manifest.objects.into_iter().map(|e| e.sha256));
    let blobs: BTreeSet<String> = files_under(&repo_dir.join("objects/blobs"))
        .into_iter()
        .filter_map(|f| f.rsplit('/').next().map(str::to_owned))
        .collect();
    assert_eq!(blobs, wanted);
    for p in &remaining.points {
        assert!(
            repo.verify_point(&p.id, true)
                .await
                .expect("verify")
                .is_ok()
        );
    }

    // Far in the future everything of dev is past the window: only the newest and the point
    // in use stay, and the orphan snapshot goes too. prod is untouched.
    let mut options = PruneOptions::new("dev", window);
    options.now = Some(now + chrono::Duration::days(365));
    options.in_use = HashSet::from([points[0].id.clone()]);
    let report = repo.prune(&options).await.expect("prune again");
    assert_eq!(report.deleted_points, vec![points[3].id.clone()]);
    assert!(report.deleted_manifests.contains(&orphan.snapshot_id));
    let ids: BTreeSet<_> = repo
        .list_points(None)
        .await
        .expect("list")
        .points
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([points[0].id.clone(), points[4].id.clone(), prod.id.clone()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_waits_for_a_running_snapshot_and_then_gives_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = CountingStore::new(local_store(&dir.path().join("live")));
    let live_dyn: Arc<dyn ObjectStore> = live.clone();
    fill(&live_dyn, "uploads", 20, 100).await;
    live.faults.get_delay_ms.store(200, Ordering::SeqCst);
    let repo_dir = dir.path().join("repo");
    let mut opts = test_options();
    opts.lock_wait = Duration::from_millis(500);
    let repo = Repository::open(&format!("file://{}", repo_dir.display()), opts)
        .await
        .expect("open");
    let mut options = snapshot_options("file:///live");
    options.parallelism = 1; // 20 × 200 ms: the snapshot holds its lock for ~4 s
    let running = tokio::spawn({
        let repo = repo.clone();
        async move { snapshot_objects(&repo, live_dyn, &options, None).await }
    });
    // Wait until the snapshot holds its lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while files_under(&repo_dir.join("locks")).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no lock appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = repo
        .prune(&PruneOptions::new("dev", Duration::from_secs(1)))
        .await
        .expect_err("prune must not run under a snapshot");
    assert!(
        matches!(err.downcast_ref(), Some(RepoError::Busy { .. })),
        "{err:#}"
    );
    assert!(err.to_string().contains("object snapshot"), "{err}");
    running.await.expect("join").expect("snapshot completes");
    assert!(
        files_under(&repo_dir.join("locks")).is_empty(),
        "lock released"
    );
    repo.prune(&PruneOptions::new("dev", Duration::from_secs(1)))
        .await
        .expect("prune runs afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_quarantines_what_it_replaces_or_removes_and_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 30, 2048).await;
    let repo = file_repo(&dir.path().join("repo")).await;
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let snapshot = point.objects.as_ref().expect("objects").snapshot_id.clone();
    let expected = digest_store(&live).await;

    // The live store drifts: one object changed, one added, one deleted.
    live.put(
        &Path::from("uploads/00003"),
        content("drift", 0, 2048).into(),
    )
    .await
    .expect("change");
    live.put(&Path::from("uploads/extra"), content("extra", 0, 10).into())
        .await
        .expect("add");
    live.delete(&Path::from("uploads/00004"))
        .await
        .expect("delete");

    let mut options = RestoreObjectsOptions::new("file:///live");
    options.quarantine_prefix = Some(Path::from("rollcall-quarantine/test-run"));
    let report = restore_objects(&repo, &snapshot, live.clone(), &options)
        .await
        .expect("restore");
    assert_eq!(report.replaced, vec!["uploads/00003".to_owned()]);
    assert_eq!(report.removed, vec!["uploads/extra".to_owned()]);
    assert_eq!(report.restored, 2);
    assert_eq!(report.unchanged, 28);
    let after = digest_store(&live).await;
    let restored: std::collections::BTreeMap<_, _> = after
        .iter()
        .filter(|(k, _)| !k.starts_with(QUARANTINE_ROOT))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(restored, expected);
    let drifted = live
        .get(&Path::from("rollcall-quarantine/test-run/uploads/00003"))
        .await
        .expect("quarantined")
        .bytes()
        .await
        .expect("body");
    assert_eq!(drifted, content("drift", 0, 2048));

    let again = restore_objects(&repo, &snapshot, live.clone(), &options)
        .await
        .expect("restore again");
    assert_eq!((again.restored, again.unchanged), (0, 30));
    assert!(again.replaced.is_empty() && again.removed.is_empty());

    // A snapshot of the restored store leaves the quarantine out.
    let part = snapshot_live(&repo, &live, "snapshot").await;
    assert_eq!(part.objects, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_extra_object_gone_before_its_quarantine_is_not_an_error() {
    // Quarantine beside the objects (a copy in the store) and in the repository (a read).
    for in_repository in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = CountingStore::new(local_store(&dir.path().join("live")));
        let live_dyn: Arc<dyn ObjectStore> = live.clone();
        fill(&live_dyn, "uploads", 5, 100).await;
        let repo = file_repo(&dir.path().join("repo")).await;
        let point = point_with_snapshot(&repo, live_dyn.clone(), "dev").await;
        let snapshot = point.objects.as_ref().expect("objects").snapshot_id.clone();
        // A role's health probe: listed by the restore, deleted by the role before the
        // restore reads or copies it to quarantine it.
        let probe = Path::from("_probe/web-1");
        live_dyn
            .put(&probe, content("probe", 0, 10).into())
            .await
            .expect("probe");
        live.faults
            .vanish_when_touched
            .lock()
            .expect("faults")
            .push(probe.clone());
        let extra = Path::from("uploads/extra");
        live_dyn
            .put(&extra, content("extra", 0, 10).into())
            .await
            .expect("extra");

        let mut options = RestoreObjectsOptions::new("file:///live");
        options.quarantine_in_repository = in_repository;
        let report = restore_objects(&repo, &snapshot, live_dyn.clone(), &options)
            .await
            .expect("a vanished extra object is no failure");
        assert_eq!(
            report.removed,
            vec!["uploads/extra".to_owned()],
            "in repository: {in_repository}"
        );
        for gone in [&probe, &extra] {
            assert!(
                matches!(
                    live_dyn.head(gone).await,
                    Err(object_store::Error::NotFound { .. })
                ),
                "{gone}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_or_missing_repositories_are_clear_errors() {
    let port = free_port(); // nothing listens there
    let s3 = S3Options {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        path_style: true,
        // Any variables that are always set: the request never gets far enough to use them.
        access_key_id_env: Some("PATH".into()),
        secret_access_key_env: Some("PATH".into()),
        max_retries: Some(1),
        retry_timeout: Some(Duration::from_secs(2)),
        connect_timeout: Some(Duration::from_secs(2)),
        ..S3Options::default()
    };
    let mut options = test_options();
    options.s3 = s3;
    options.retry.attempts = 2;
    let err = Repository::open("s3://backups/cowork", options)
        .await
        .expect_err("unreachable");
    let text = format!("{err:#}");
    assert!(
        text.contains("repository s3://backups/cowork is unreachable") && text.contains("check"),
        "{text}"
    );

    let mut options = test_options();
    options.create = false;
    let err = Repository::open("file:///nonexistent/rollcall-repo", options)
        .await
        .expect_err("missing dir");
    assert!(
        err.to_string()
            .contains("/nonexistent/rollcall-repo does not exist"),
        "{err}"
    );

    let mut options = test_options();
    options.s3.access_key_id_env = Some("ROLLCALL_TEST_SURELY_UNSET_VARIABLE".into());
    let err = Repository::open("s3://backups", options)
        .await
        .expect_err("unset credential variable");
    assert!(
        format!("{err:#}").contains("ROLLCALL_TEST_SURELY_UNSET_VARIABLE"),
        "{err:#}"
    );
}

/// The first `n` keys of `keys` that shard `index` of 2 owns.
fn owned_by(keys: impl IntoIterator<Item = String>, index: u32, n: usize) -> Vec<String> {
    keys.into_iter()
        .filter(|k| Shard::of_key(k, 2) == index)
        .take(n)
        .collect()
}

/// The keys a drift changed, deleted and added.
struct Drift {
    changed: Vec<String>,
    deleted: Vec<String>,
    extras: Vec<String>,
}

/// Fills `store` like the live store of the tests below (60 objects), then drifts it: per
/// shard (of 2), two objects changed, two deleted and two extras added.
async fn drift(store: &Arc<dyn ObjectStore>) -> Drift {
    fill(store, "uploads", 60, 1024).await;
    let keys = || (0..60).map(|i| format!("uploads/{i:05}"));
    let extra_keys = || (0..100).map(|i| format!("junk/{i}"));
    let mut d = Drift {
        changed: Vec::new(),
        deleted: Vec::new(),
        extras: Vec::new(),
    };
    for shard in 0..2 {
        let owned = owned_by(keys(), shard, 4);
        d.changed.extend(owned[..2].iter().cloned());
        d.deleted.extend(owned[2..].iter().cloned());
        d.extras.extend(owned_by(extra_keys(), shard, 2));
    }
    for key in &d.changed {
        store
            .put(&Path::from(key.as_str()), content("drift", 0, 1024).into())
            .await
            .expect("change");
    }
    for key in &d.deleted {
        store
            .delete(&Path::from(key.as_str()))
            .await
            .expect("delete");
    }
    for key in &d.extras {
        store
            .put(&Path::from(key.as_str()), content(key, 9, 10).into())
            .await
            .expect("add");
    }
    d
}

fn without_quarantine(
    digests: std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    digests
        .into_iter()
        .filter(|(k, _)| !k.starts_with(QUARANTINE_ROOT))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_shards_together_restore_exactly_what_one_whole_restore_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 60, 1024).await;
    let repo = file_repo(&dir.path().join("repo")).await;
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let snapshot = point.objects.as_ref().expect("objects").snapshot_id.clone();
    let expected = digest_store(&live).await;

    // Two identical drifted targets: one restored in two shards, one whole.
    let sharded = CountingStore::new(local_store(&dir.path().join("sharded")));
    let sharded_dyn: Arc<dyn ObjectStore> = sharded.clone();
    let whole = CountingStore::new(local_store(&dir.path().join("whole")));
    let whole_dyn: Arc<dyn ObjectStore> = whole.clone();
    let d = drift(&sharded_dyn).await;
    drift(&whole_dyn).await;
    let quarantine = "rollcall-quarantine/test-run";

    let mut whole_options = RestoreObjectsOptions::new("file:///whole");
    whole_options.quarantine_prefix = Some(Path::from(quarantine));
    whole.counts.written.lock().expect("written").clear();
    let all = restore_objects(&repo, &snapshot, whole_dyn.clone(), &whole_options)
        .await
        .expect("whole restore");
    assert_eq!((all.shard, all.shards), (0, 1));
    let all_written: BTreeSet<String> = whole.counts.written().into_iter().collect();

    let mut reports = Vec::new();
    let mut written = Vec::new();
    for index in 0..2 {
        let totals = Arc::new(std::sync::Mutex::new(None));
        let sink = totals.clone();
        let mut options = RestoreObjectsOptions::new("file:///sharded");
        options.quarantine_prefix = Some(Path::from(quarantine));
        options.shard = Some(Shard::new(index, 2).expect("shard"));
        options.progress = Some(Arc::new(move |p: &TransferProgress| {
            *sink.lock().expect("progress") = Some((p.objects_total, p.objects_done));
        }));
        sharded.counts.written.lock().expect("written").clear();
        let report = restore_objects(&repo, &snapshot, sharded_dyn.clone(), &options)
            .await
            .expect("sharded restore");
        assert_eq!((report.shard, report.shards), (index, 2));
        // Progress counts only this shard's entries.
        let owned = expected
            .keys()
            .filter(|k| Shard::of_key(k, 2) == index)
            .count() as u64;
        assert_eq!(
            *totals.lock().expect("progress"),
            Some((owned, owned)),
            "shard {index}"
        );
        assert_eq!(report.restored + report.unchanged, owned);
        let keys = sharded.counts.written();
        assert_eq!(
            keys.len() as u64,
            report.restored,
            "each object written once"
        );
        assert!(
            keys.iter().all(|k| Shard::of_key(k, 2) == index),
            "{keys:?}"
        );
        written.push(keys.into_iter().collect::<BTreeSet<_>>());
        reports.push(report);
    }

    // The target equals the point, and equals the whole restore's result.
    assert_eq!(
        without_quarantine(digest_store(&sharded_dyn).await),
        expected
    );
    assert_eq!(
        digest_store(&sharded_dyn).await,
        digest_store(&whole_dyn).await,
        "quarantine included"
    );
    // Restored sets are disjoint and together are the whole restore's.
    assert!(written[0].is_disjoint(&written[1]));
    assert_eq!(&written[0] | &written[1], all_written);
    assert_eq!(reports[0].restored + reports[1].restored, all.restored);
    assert_eq!(reports[0].unchanged + reports[1].unchanged, all.unchanged);
    assert_eq!(
        reports[0].restored_bytes + reports[1].restored_bytes,
        all.restored_bytes
    );
    // Replaced and removed objects were quarantined exactly once, by their own shard.
    let union = |pick: fn(&RestoreObjectsReport) -> &Vec<String>| {
        let mut out = pick(&reports[0]).clone();
        out.extend(pick(&reports[1]).iter().cloned());
        out.sort();
        out
    };
    let mut changed = d.changed.clone();
    changed.sort();
    let mut extras = d.extras.clone();
    extras.sort();
    assert_eq!(union(|r| &r.replaced), changed);
    assert_eq!(union(|r| &r.removed), extras);
    assert_eq!(all.replaced, changed);
    assert_eq!(all.removed, extras);
    for (index, report) in reports.iter().enumerate() {
        assert!(
            report
                .replaced
                .iter()
                .chain(&report.removed)
                .all(|k| Shard::of_key(k, 2) == index as u32)
        );
    }
    assert_eq!(
        sharded.counts.get(&sharded.counts.copies),
        (changed.len() + extras.len()) as u64,
        "one quarantine copy per displaced object"
    );
    let quarantined: BTreeSet<String> = digest_store(&sharded_dyn)
        .await
        .into_keys()
        .filter_map(|k| k.strip_prefix(&format!("{quarantine}/")).map(str::to_owned))
        .collect();
    assert_eq!(
        quarantined,
        changed
            .iter()
            .chain(&extras)
            .cloned()
            .collect::<BTreeSet<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_shard_leaves_the_other_shards_keys_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 60, 1024).await;
    let repo = file_repo(&dir.path().join("repo")).await;
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let snapshot = point.objects.as_ref().expect("objects").snapshot_id.clone();
    let expected = digest_store(&live).await;
    let target = local_store(&dir.path().join("target"));
    let d = drift(&target).await;
    let before = digest_store(&target).await;

    let mut options = RestoreObjectsOptions::new("file:///target");
    options.quarantine_prefix = Some(Path::from("rollcall-quarantine/half"));
    options.shard = Some(Shard::new(0, 2).expect("shard"));
    let report = restore_objects(&repo, &snapshot, target.clone(), &options)
        .await
        .expect("restore shard 0");
    let after = without_quarantine(digest_store(&target).await);

    let mine = |k: &String| Shard::of_key(k, 2) == 0;
    for key in d.changed.iter().chain(&d.deleted) {
        if mine(key) {
            assert_eq!(after.get(key), expected.get(key), "{key} restored");
        } else {
            assert_eq!(after.get(key), before.get(key), "{key} untouched");
        }
    }
    for key in &d.extras {
        assert_eq!(after.contains_key(key), !mine(key), "{key}");
    }
    // Everything shard 1 owns is exactly as it was.
    let theirs = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .filter(|(k, _)| !mine(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(theirs(&after), theirs(&before));
    assert_eq!(report.replaced.len(), 2);
    assert_eq!(report.removed.len(), 2);
    assert_eq!(report.restored, 4, "two replaced, two missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_shard_is_a_clear_error_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 5, 100).await;
    let repo = file_repo(&dir.path().join("repo")).await;
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let snapshot = point.objects.as_ref().expect("objects").snapshot_id.clone();

    let err = Shard::new(2, 2).expect_err("index = count").to_string();
    assert!(err.contains("shard 2/2 is not a shard"), "{err}");
    let err = Shard::new(0, 0).expect_err("no shards").to_string();
    assert!(
        err.contains("shard 0/0") && err.contains("at least 1"),
        "{err}"
    );

    let target = local_store(&dir.path().join("target"));
    for (index, count) in [(3, 2), (0, 0)] {
        let mut options = RestoreObjectsOptions::new("file:///target");
        options.shard = Some(Shard { index, count });
        let err = restore_objects(&repo, &snapshot, target.clone(), &options)
            .await
            .expect_err("invalid shard");
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("shard {index}/{count} is not a shard")),
            "{text}"
        );
    }
    assert!(files_under(&dir.path().join("target")).is_empty());
}

/// The blob file of manifest entry `key` in the file repository at `repo_dir`.
fn blob_file(repo_dir: &std::path::Path, manifest: &Manifest, key: &str) -> std::path::PathBuf {
    let entry = manifest
        .objects
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("{key} in the manifest"));
    repo_dir
        .join("objects/blobs")
        .join(&entry.sha256[..2])
        .join(&entry.sha256)
}

/// The live store `live` as the target of a restore whose preflight keeps blobs in `scratch`.
fn target(live: &Arc<dyn ObjectStore>, scratch: Option<BlobScratch>) -> VerifyOptions {
    VerifyOptions {
        full: false,
        restore_target: Some(RestoreTarget {
            store: live.clone(),
            label: "file:///live".into(),
            hash_all: false,
            scratch,
            parallelism: 8,
        }),
    }
}

fn without_quarantine_keys(
    digests: std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    digests
        .into_iter()
        .filter(|(k, _)| !k.starts_with(QUARANTINE_ROOT))
        .collect()
}

/// Preflight reads exactly the blobs a restore would write given the live store (a missing
/// object, one of another size, one rewritten at the same size), keeps them, and the restore
/// writes them from the scratch without reading the repository again. A damaged blob the
/// restore would not write passes the delta check and is named by `full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preflight_hashes_the_delta_and_the_restore_takes_it_from_scratch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 40, 4096).await;
    fill(&live, "big", 2, 3 << 20).await;
    let repo_dir = dir.path().join("repo");
    let (repo, counting) = counting_repo(&repo_dir);
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let manifest = repo
        .read_manifest(&point.objects.as_ref().expect("objects").snapshot_id)
        .await
        .expect("manifest");
    let expected = digest_store(&live).await;

    live.delete(&Path::from("uploads/00001"))
        .await
        .expect("delete");
    live.put(
        &Path::from("uploads/00002"),
        content("drift", 0, 100).into(),
    )
    .await
    .expect("resize");
    // Same size, other bytes: only a hash could tell, and the live store's etag changed.
    live.put(
        &Path::from("uploads/00003"),
        content("drift", 1, 4096).into(),
    )
    .await
    .expect("rewrite");
    live.delete(&Path::from("big/00000")).await.expect("delete");
    flip_byte(&blob_file(&repo_dir, &manifest, "uploads/00010"));

    let scratch_dir = dir.path().join("scratch/run");
    let scratch = BlobScratch::open(&scratch_dir, 1 << 30)
        .await
        .expect("scratch");
    let gets = || counting.counts.get(&counting.counts.blob_gets);
    let report = repo
        .verify_point_with(&point.id, &target(&live, Some(scratch.clone())))
        .await
        .expect("preflight");
    assert!(report.is_ok(), "{:?}", report.problems);
    let delta_bytes = (3 << 20) + 3 * 4096;
    assert_eq!(
        (
            report.delta_objects,
            report.blobs_hashed,
            report.blob_bytes_hashed,
            report.scratch_bytes
        ),
        (4, 4, delta_bytes, delta_bytes)
    );
    assert_eq!(gets(), 4, "only the delta's blobs were read");
    assert_eq!(files_under(&scratch_dir).len(), 4);
    assert_eq!(scratch.used(), delta_bytes);

    let mut full = target(&live, None);
    if let Some(t) = full.restore_target.as_mut() {
        t.hash_all = true;
    }
    let full = repo
        .verify_point_with(&point.id, &full)
        .await
        .expect("full");
    assert_eq!(full.blobs_hashed, manifest.objects.len() as u64);
    assert_eq!(full.problems.len(), 1, "{:?}", full.problems);
    assert!(
        full.problems[0].contains("(object uploads/00010) is corrupt"),
        "{:?}",
        full.problems
    );

    let before = gets();
    let mut options = RestoreObjectsOptions::new("file:///live");
    options.multipart_threshold = 1 << 20;
    options.scratch = Some(scratch);
    let restored = restore_objects(&repo, &manifest.id, live.clone(), &options)
        .await
        .expect("restore");
    assert_eq!(
        (restored.restored, restored.from_scratch, restored.unchanged),
        (4, 4, 38)
    );
    assert_eq!(gets(), before, "no blob read twice");
    assert_eq!(without_quarantine_keys(digest_store(&live).await), expected);
}

/// A same-size damaged blob of the delta fails preflight naming its key; after the repair a
/// second preflight of the same run reads only that blob again (the rest is re-hashed in the
/// scratch); a scratch copy damaged after preflight is caught by the restore, which reads the
/// repository's copy instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_delta_blob_fails_preflight_and_a_damaged_scratch_copy_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 20, 4096).await;
    let repo_dir = dir.path().join("repo");
    let (repo, counting) = counting_repo(&repo_dir);
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let manifest = repo
        .read_manifest(&point.objects.as_ref().expect("objects").snapshot_id)
        .await
        .expect("manifest");
    let expected = digest_store(&live).await;
    for key in ["uploads/00004", "uploads/00005"] {
        live.delete(&Path::from(key)).await.expect("delete");
    }
    let damaged = blob_file(&repo_dir, &manifest, "uploads/00004");
    flip_byte(&damaged);

    let scratch_dir = dir.path().join("scratch/run");
    let open = || BlobScratch::open(&scratch_dir, 1 << 30);
    let report = repo
        .verify_point_with(
            &point.id,
            &target(&live, Some(open().await.expect("scratch"))),
        )
        .await
        .expect("preflight");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("(object uploads/00004) is corrupt")
            && report.problems[0].contains(&blob_file_sha(&manifest, "uploads/00004")),
        "{:?}",
        report.problems
    );
    assert_eq!(
        files_under(&scratch_dir).len(),
        1,
        "only the sound blob kept"
    );

    flip_byte(&damaged); // the same byte back: repaired
    let gets = counting.counts.get(&counting.counts.blob_gets);
    let report = repo
        .verify_point_with(
            &point.id,
            &target(&live, Some(open().await.expect("scratch"))),
        )
        .await
        .expect("preflight again");
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.scratch_bytes, 2 * 4096);
    assert_eq!(
        counting.counts.get(&counting.counts.blob_gets) - gets,
        1,
        "the kept blob was not read again"
    );

    let kept = scratch_dir.join(blob_file_sha(&manifest, "uploads/00005"));
    flip_byte(&kept);
    let mut options = RestoreObjectsOptions::new("file:///live");
    options.scratch = Some(open().await.expect("scratch"));
    let restored = restore_objects(&repo, &manifest.id, live.clone(), &options)
        .await
        .expect("restore");
    assert_eq!((restored.restored, restored.from_scratch), (2, 1));
    assert!(!kept.exists(), "the damaged copy is discarded");
    assert_eq!(without_quarantine_keys(digest_store(&live).await), expected);
}

fn blob_file_sha(manifest: &Manifest, key: &str) -> String {
    manifest
        .objects
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.sha256.clone())
        .unwrap_or_else(|| panic!("{key} in the manifest"))
}

/// A new point whose manifest is `manifest` with its first key replaced by `key`, written with
/// a sound envelope and recorded checksum: only the key is wrong.
async fn point_with_first_key(
    repo: &Repository,
    repo_dir: &std::path::Path,
    part: &ObjectSnapshotPart,
    manifest: &Manifest,
    key: &str,
) -> Point {
    use sha2::{Digest, Sha256};
    let mut edited = manifest.clone();
    edited.objects[0].key = key.to_owned();
    let body = serde_json::to_string(&edited).expect("manifest json");
    let file = format!(
        "{{\"format\":\"rollcall.manifest.v1\",\"sha256\":\"{}\",\"body\":{body}}}\n",
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    std::fs::write(repo_dir.join(&part.manifest_key), &file).expect("write manifest");
    let mut part = part.clone();
    part.manifest_sha256 = hex::encode(Sha256::digest(file.as_bytes()));
    part.manifest_size = file.len() as u64;
    repo.write_point(NewPoint {
        id: PointId::new("dev", chrono::Utc::now()).expect("id"),
        postgres: None,
        objects: Some(part),
        secrets: vec![],
    })
    .await
    .expect("write point")
}

/// A manifest key no store can hold as written (empty, absolute, `a//b`, a trailing slash, a
/// dot segment, a control character) fails preflight naming the key, and a restore of the
/// point refuses it before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preflight_and_restore_refuse_keys_no_store_can_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    fill(&live, "uploads", 5, 100).await;
    let repo_dir = dir.path().join("repo");
    let repo = file_repo(&repo_dir).await;
    let point = point_with_snapshot(&repo, live.clone(), "dev").await;
    let part = point.objects.clone().expect("objects");
    let manifest = repo
        .read_manifest(&part.snapshot_id)
        .await
        .expect("manifest");
    live.delete(&Path::from("uploads/00000"))
        .await
        .expect("disaster");
    let before = digest_store(&live).await;

    for (key, why) in [
        ("", "is empty"),
        ("/uploads/00000", "is absolute"),
        ("uploads//00000", "has an empty segment"),
        ("uploads/00000/", "ends with /"),
        ("uploads/../00000", "has a \"..\" segment"),
        ("uploads/\u{7}bell", "holds the control character U+0007"),
    ] {
        let bad = point_with_first_key(&repo, &repo_dir, &part, &manifest, key).await;
        let report = repo
            .verify_point_with(&bad.id, &target(&live, None))
            .await
            .expect("preflight");
        assert_eq!(report.problems.len(), 1, "{key:?}: {:?}", report.problems);
        let named = format!("object key {key:?} {why}");
        assert!(
            report.problems[0].contains(&named) && report.problems[0].contains("is damaged"),
            "{key:?}: {:?}",
            report.problems
        );
        let quick = repo.verify_point(&bad.id, false).await.expect("verify");
        assert!(quick.problems[0].contains(&named), "{:?}", quick.problems);

        let err = restore_point_objects(
            &repo,
            &bad.id,
            live.clone(),
            &RestoreObjectsOptions::new("file:///live"),
        )
        .await
        .expect_err("a bad key is refused");
        assert!(format!("{err:#}").contains(&named), "{key:?}: {err:#}");
        assert_eq!(
            digest_store(&live).await,
            before,
            "{key:?}: nothing written"
        );
    }
}

/// A `file://` store's permission bits travel with the snapshot: a checkpoint the service
/// wrote 0600 comes back 0600 whether the restore rewrites it (deleted) or finds its content
/// unchanged (only its mode was loosened).
#[tokio::test]
async fn file_modes_are_recorded_and_given_back() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let live_dir = dir.path().join("live");
    let live = local_store(&live_dir);
    fill(&live, "checkpoints", 3, 100).await;
    let mode = |key: &str| {
        std::fs::metadata(live_dir.join(key))
            .expect("file")
            .permissions()
            .mode()
            & 0o7777
    };
    let set = |key: &str, m: u32| {
        std::fs::set_permissions(live_dir.join(key), std::fs::Permissions::from_mode(m))
            .expect("chmod");
    };
    set("checkpoints/00000", 0o600);
    set("checkpoints/00001", 0o640);
    let repo = file_repo(&dir.path().join("repo")).await;
    let mut options = snapshot_options("file:///live");
    options.local_root = repository::local_dir(&format!("file://{}", live_dir.display()));
    assert_eq!(options.local_root.as_deref(), Some(live_dir.as_path()));
    let part = snapshot_objects(&repo, live.clone(), &options, None)
        .await
        .expect("snapshot");
    let manifest = repo
        .read_manifest(&part.snapshot_id)
        .await
        .expect("manifest");
    let recorded: Vec<Option<u32>> = manifest.objects.iter().map(|e| e.mode).collect();
    assert_eq!(recorded[..2], [Some(0o600), Some(0o640)]);

    // The disaster: one checkpoint deleted, another loosened to 0644 (same bytes).
    std::fs::remove_file(live_dir.join("checkpoints/00000")).expect("delete");
    set("checkpoints/00001", 0o644);
    let mut restore = RestoreObjectsOptions::new("file:///live");
    restore.local_root = Some(live_dir.clone());
    let report = restore_objects(&repo, &part.snapshot_id, live.clone(), &restore)
        .await
        .expect("restore");
    assert_eq!((report.restored, report.unchanged), (1, 2), "{report:?}");
    assert_eq!(mode("checkpoints/00000"), 0o600, "rewritten with its mode");
    assert_eq!(
        mode("checkpoints/00001"),
        0o640,
        "unchanged bytes, mode given back"
    );

    // A store that is not a directory records no modes, and manifests without them restore.
    let plain = snapshot_objects(&repo, live.clone(), &snapshot_options("file:///live"), None)
        .await
        .expect("snapshot");
    let manifest = repo
        .read_manifest(&plain.snapshot_id)
        .await
        .expect("manifest");
    assert!(manifest.objects.iter().all(|e| e.mode.is_none()));
    restore_objects(&repo, &plain.snapshot_id, live.clone(), &restore)
        .await
        .expect("restore without modes");
    assert_eq!(mode("checkpoints/00000"), 0o600);
}
