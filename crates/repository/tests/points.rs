//! Recovery points ordered by the repository's commit numbers, never by the stamps of the
//! machines that took them: a point stamped by a clock running fast, points written before
//! commit numbers existed, racing writers, and retention's "newest point".

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use repository::*;
use sha2::{Digest, Sha256};

/// One object snapshot of a small live store, for points to name.
async fn snapshot(repo: &Repository, dir: &std::path::Path) -> ObjectSnapshotPart {
    let live = local_store(&dir.join("live"));
    fill(&live, "uploads", 3, 64).await;
    snapshot_objects(repo, live, &SnapshotOptions::new("file:///live"), None)
        .await
        .expect("snapshot")
}

/// Commits a point of `env` named `snapshot`, as a machine whose clock reads `stamp` would.
async fn point_at(
    repo: &Repository,
    env: &str,
    snapshot: &ObjectSnapshotPart,
    stamp: DateTime<Utc>,
) -> Point {
    repo.write_point_stamped(
        NewPoint {
            id: PointId::new(env, stamp).expect("id"),
            postgres: None,
            objects: Some(snapshot.clone()),
            secrets: vec![],
        },
        stamp,
    )
    .await
    .expect("write point")
}

fn ids(points: &[Point]) -> Vec<&str> {
    points.iter().map(|p| p.id.as_str()).collect()
}

#[tokio::test]
async fn points_list_and_latest_is_the_last_committed_whatever_the_stamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let part = snapshot(&repo, dir.path()).await;
    let now = Utc::now();
    // Committed first while the clock ran 10 minutes fast; then an ordinary one.
    let fast = point_at(&repo, "prod", &part, now + chrono::Duration::minutes(10)).await;
    let real = point_at(&repo, "prod", &part, now).await;
    // Another environment shares the repository's numbers.
    let other = point_at(&repo, "staging", &part, now - chrono::Duration::hours(1)).await;
    assert_eq!(
        (fast.sequence, real.sequence, other.sequence),
        (Some(1), Some(2), Some(3))
    );

    let listing = repo.list_points(Some("prod")).await.expect("list");
    assert_eq!(ids(&listing.points), [fast.id.as_str(), real.id.as_str()]);
    let latest = listing.points.last().expect("a point");
    assert_eq!(latest.id, real.id, "latest is the last committed point");
    assert_eq!(
        listing.points[0].stamped_ahead(now),
        Some(Duration::from_secs(600)),
        "the fast point is flagged as stamped in the future"
    );
    assert_eq!(latest.stamped_ahead(now), None);

    let all = repo.list_points(None).await.expect("list all");
    assert_eq!(
        ids(&all.points),
        [fast.id.as_str(), real.id.as_str(), other.id.as_str()],
        "every environment in one commit order"
    );
    // What was committed is what is read back.
    assert_eq!(repo.read_point(&fast.id).await.expect("read"), fast);
}

/// A point file as rollcall wrote it before commit numbers: the same envelope, no `sequence`.
fn write_legacy_point(repo_dir: &std::path::Path, point: &Point) {
    let mut body = serde_json::to_value(point).expect("json");
    body.as_object_mut().expect("object").remove("sequence");
    let body = serde_json::to_string(&body).expect("json");
    let sha = hex::encode(Sha256::digest(body.as_bytes()));
    let file =
        format!("{{\"format\":\"rollcall.point.v1\",\"sha256\":\"{sha}\",\"body\":{body}}}\n");
    let path = repo_dir.join(format!("points/{}.json", point.id));
    std::fs::write(path, file).expect("write legacy point");
}

#[tokio::test]
async fn points_without_a_number_still_read_and_order_before_numbered_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = file_repo(&repo_dir).await;
    let part = snapshot(&repo, dir.path()).await;
    let now = Utc::now();
    // Two old points (stamped an hour apart, written newest first), made legacy by hand.
    let mut legacy = Vec::new();
    for stamp in [now, now - chrono::Duration::hours(1)] {
        let point = point_at(&repo, "prod", &part, stamp).await;
        write_legacy_point(&repo_dir, &point);
        legacy.push(point);
    }
    for point in &legacy {
        let read = repo
            .read_point(&point.id)
            .await
            .expect("a legacy point reads");
        assert_eq!(read.sequence, None);
        assert_eq!(read.created_at, point.created_at);
    }
    // A new point stamped before both still orders after them.
    let new = point_at(&repo, "prod", &part, now - chrono::Duration::days(1)).await;
    assert_eq!(
        new.sequence,
        Some(3),
        "numbers already claimed are never reused"
    );

    let listing = repo.list_points(Some("prod")).await.expect("list");
    assert!(listing.damaged.is_empty(), "{:?}", listing.damaged);
    assert_eq!(
        ids(&listing.points),
        [
            legacy[1].id.as_str(),
            legacy[0].id.as_str(),
            new.id.as_str()
        ],
        "unnumbered first, by stamp; then by number"
    );
}

#[tokio::test]
async fn racing_writers_get_distinct_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = file_repo(&repo_dir).await;
    let part = snapshot(&repo, dir.path()).await;
    let now = Utc::now();
    // Eight writers, each with its own handle (as separate processes would be), at once.
    let mut writers = Vec::new();
    for i in 0..8 {
        let repo = file_repo(&repo_dir).await;
        let part = part.clone();
        let env = if i % 2 == 0 { "prod" } else { "manual" };
        writers.push(tokio::spawn(async move {
            point_at(&repo, env, &part, now).await
        }));
    }
    let mut numbers = Vec::new();
    for writer in writers {
        numbers.push(writer.await.expect("join").sequence.expect("numbered"));
    }
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=8).collect::<Vec<u64>>(),
        "each writer its own number"
    );

    let listing = repo.list_points(None).await.expect("list");
    let listed: Vec<u64> = listing.points.iter().filter_map(|p| p.sequence).collect();
    assert_eq!(listed, numbers, "listed in commit order");
}

#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_recognised_as_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (repo, counting) = counting_repo(&dir.path().join("repo"));
    let part = snapshot(&repo, dir.path()).await;
    // The create-only put lands, its answer does not: the retry meets AlreadyExists on the
    // marker it wrote itself, and keeps the number instead of skipping to the next.
    counting
        .faults
        .lose_create_answers
        .store(1, Ordering::SeqCst);
    let point = point_at(&repo, "prod", &part, Utc::now()).await;
    assert_eq!(point.sequence, Some(1));
    let next = point_at(&repo, "prod", &part, Utc::now()).await;
    assert_eq!(next.sequence, Some(2));
}

#[tokio::test]
async fn a_store_without_create_only_puts_still_numbers_points_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (repo, counting) = counting_repo(&dir.path().join("repo"));
    let part = snapshot(&repo, dir.path()).await;
    counting.faults.no_create_only.store(true, Ordering::SeqCst);
    let now = Utc::now();
    let first = point_at(&repo, "prod", &part, now + chrono::Duration::minutes(10)).await;
    let second = point_at(&repo, "prod", &part, now).await;
    assert_eq!((first.sequence, second.sequence), (Some(1), Some(2)));
    let listing = repo.list_points(Some("prod")).await.expect("list");
    assert_eq!(
        ids(&listing.points),
        [first.id.as_str(), second.id.as_str()]
    );
    let written = counting.counts.written();
    assert!(
        written.iter().any(|k| k == "sequence/00000000000000000002"),
        "the number is still recorded: {written:?}"
    );
}

#[tokio::test]
async fn prune_keeps_the_last_committed_point_though_an_earlier_one_is_stamped_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let part = snapshot(&repo, dir.path()).await;
    let now = Utc::now();
    let fast = point_at(&repo, "prod", &part, now + chrono::Duration::minutes(10)).await;
    // Committed later by a machine whose clock ran two days slow: past the window by its
    // stamp, yet the newest point, so it stays.
    let slow = point_at(&repo, "prod", &part, now - chrono::Duration::days(2)).await;
    let mut options = PruneOptions::new("prod", Duration::from_secs(24 * 3600));
    options.now = Some(now);
    let report = repo.prune(&options).await.expect("prune");
    assert!(report.deleted_points.is_empty(), "{report:?}");
    let kept: Vec<(&str, KeepReason)> = report
        .kept_points
        .iter()
        .map(|k| (k.id.as_str(), k.reason))
        .collect();
    assert!(
        kept.contains(&(slow.id.as_str(), KeepReason::Newest)),
        "{kept:?}"
    );
    assert!(
        kept.contains(&(fast.id.as_str(), KeepReason::WithinWindow)),
        "{kept:?}"
    );
    // The commit numbers survive the prune: the next point is still numbered after both.
    let next = point_at(&repo, "prod", &part, now).await;
    assert_eq!(next.sequence, Some(3));
}

/// Prune deletes commit-number markers far below the highest (one per point would otherwise
/// pile up forever) and keeps the newest 64, so the next point still gets the next number.
#[tokio::test]
async fn prune_keeps_only_the_newest_commit_number_markers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = file_repo(&repo_dir).await;
    let part = snapshot(&repo, dir.path()).await;
    let now = Utc::now();
    for _ in 0..70 {
        point_at(&repo, "prod", &part, now).await;
    }
    let markers = || -> Vec<u64> {
        let mut found: Vec<u64> = std::fs::read_dir(repo_dir.join("sequence"))
            .expect("sequence/")
            .map(|e| {
                let name = e.expect("entry").file_name();
                name.to_str().expect("utf-8").parse().expect("a number")
            })
            .collect();
        found.sort_unstable();
        found
    };
    assert_eq!(markers(), (1..=70).collect::<Vec<u64>>());

    let mut options = PruneOptions::new("prod", Duration::from_secs(24 * 3600));
    options.now = Some(now);
    options.dry_run = true;
    let dry = repo.prune(&options).await.expect("dry run");
    assert_eq!(dry.deleted_sequence_markers, 6);
    assert_eq!(markers().len(), 70, "a dry run deletes nothing");
    options.dry_run = false;
    let report = repo.prune(&options).await.expect("prune");
    assert_eq!(report.deleted_sequence_markers, 6, "{report:?}");
    assert!(report.deleted_points.is_empty(), "all within the window");
    assert_eq!(markers(), (7..=70).collect::<Vec<u64>>());
    let next = point_at(&repo, "prod", &part, now).await;
    assert_eq!(next.sequence, Some(71));
    let again = repo.prune(&options).await.expect("prune again");
    assert_eq!(again.deleted_sequence_markers, 1);
}
