//! Objects at a time on a store without versions (a directory): the newest snapshot finished
//! at or before T is restored, with the uncertainty window from its start to T; a time before
//! the first snapshot is refused.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::*;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use repository::*;

const LABEL: &str = "file:///live";

async fn snapshot(repo: &Repository, live: &Arc<dyn ObjectStore>) -> ObjectSnapshotPart {
    snapshot_objects(repo, live.clone(), &SnapshotOptions::new(LABEL), None)
        .await
        .expect("snapshot")
}

async fn text(store: &Arc<dyn ObjectStore>, key: &str) -> Option<String> {
    match store.get(&Path::from(key)).await {
        Ok(got) => {
            Some(String::from_utf8(got.bytes().await.expect("body").to_vec()).expect("utf8"))
        }
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("get {key}: {e}"),
    }
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: &str) {
    store
        .put(&Path::from(key), body.to_owned().into())
        .await
        .expect("put");
}

fn between(a: DateTime<Utc>, b: DateTime<Utc>) -> DateTime<Utc> {
    assert!(a < b, "{a} < {b}");
    a + (b - a) / 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_without_versions_restores_the_snapshot_before_the_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let live = local_store(&dir.path().join("live"));
    put(&live, "a.txt", "a first").await;
    put(&live, "b.txt", "b first").await;
    let s1 = snapshot(&repo, &live).await;
    put(&live, "a.txt", "a second").await;
    put(&live, "c.txt", "c first").await;
    tokio::fs::remove_file(dir.path().join("live/b.txt"))
        .await
        .expect("remove b");
    let s2 = snapshot(&repo, &live).await;
    put(&live, "a.txt", "a third").await;

    let t = between(s1.finished_at, s2.started_at);
    let options = RestoreObjectsOptions::new(LABEL);

    // Dry run: names S1 and the window, writes nothing.
    let dry = restore_snapshot_to_time(&repo, live.clone(), &options, t, true)
        .await
        .expect("dry run");
    assert_eq!(dry.rule, "snapshot");
    assert_eq!(dry.snapshot_id, s1.snapshot_id);
    assert!(dry.restore.is_none());
    assert_eq!(text(&live, "a.txt").await.as_deref(), Some("a third"));

    let report = restore_snapshot_to_time(&repo, live.clone(), &options, t, false)
        .await
        .expect("restore to time");
    assert_eq!(
        report.snapshot_id, s1.snapshot_id,
        "the snapshot before T, not after"
    );
    assert_eq!(report.snapshot_started_at, s1.started_at);
    assert_eq!(report.snapshot_finished_at, s1.finished_at);
    assert_eq!(report.uncertainty.from, s1.started_at);
    assert_eq!(report.uncertainty.to, t);
    let gap = (t - s1.started_at).num_milliseconds() as f64 / 1000.0;
    assert!(
        (report.uncertainty.seconds - gap).abs() < 0.002,
        "{report:?}"
    );
    assert_eq!(text(&live, "a.txt").await.as_deref(), Some("a first"));
    assert_eq!(text(&live, "b.txt").await.as_deref(), Some("b first"));
    assert_eq!(text(&live, "c.txt").await, None);
    let restore = report.restore.expect("restored");
    assert_eq!(restore.snapshot_id.as_ref(), Some(&s1.snapshot_id));
    assert_eq!(
        restore.removed,
        vec!["c.txt".to_owned()],
        "c is quarantined"
    );

    // At S2's finish exactly, S2 is the one.
    let at_s2 = restore_snapshot_to_time(&repo, live.clone(), &options, s2.finished_at, false)
        .await
        .expect("restore to S2");
    assert_eq!(at_s2.snapshot_id, s2.snapshot_id);
    assert_eq!(text(&live, "a.txt").await.as_deref(), Some("a second"));
    assert_eq!(text(&live, "b.txt").await, None);

    // Before S1: refused, naming S1 and the earliest time that works.
    let early = s1.started_at - chrono::Duration::seconds(1);
    let err = restore_snapshot_to_time(&repo, live.clone(), &options, early, false)
        .await
        .expect_err("a time before the first snapshot");
    let message = format!("{err:#}");
    assert!(
        message.contains("before the first snapshot")
            && message.contains(s1.snapshot_id.as_str())
            && message.contains(&s1.finished_at.to_rfc3339()),
        "{message}"
    );
    assert_eq!(
        text(&live, "a.txt").await.as_deref(),
        Some("a second"),
        "nothing changed"
    );

    // Another store's snapshots are never used.
    let other = RestoreObjectsOptions::new("file:///elsewhere");
    let err = restore_snapshot_to_time(&repo, live.clone(), &other, t, true)
        .await
        .expect_err("no snapshot of that store");
    assert!(
        format!("{err:#}").contains("no object snapshot of file:///elsewhere"),
        "{err:#}"
    );
}
