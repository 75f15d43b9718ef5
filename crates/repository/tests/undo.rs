//! Undoing an object restore from the repository alone: the records a restore leaves beside its
//! quarantine, and `undo_objects` putting the live store back byte for byte (sharded, retried,
//! and with writes made after the restore kept in the undo's quarantine).

mod common;

use std::sync::Arc;

use common::*;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use repository::*;

fn restore_options(shard: Shard) -> RestoreObjectsOptions {
    let mut options = RestoreObjectsOptions::new("file:///live");
    options.quarantine_in_repository = true;
    options.quarantine_prefix = Some(Path::from("quarantine/rdrill"));
    options.shard = Some(shard);
    options
}

fn undo_options(shard: Shard) -> UndoObjectsOptions {
    UndoObjectsOptions {
        target_label: "file:///live".into(),
        restore_quarantine: Path::from("quarantine/rdrill"),
        undo_quarantine: Path::from("quarantine/rundo"),
        shard,
        parallelism: 4,
    }
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: &str) {
    store
        .put(&Path::from(key), body.as_bytes().to_vec().into())
        .await
        .expect("put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_retried_restore_is_undone_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = local_store(&dir.path().join("live"));
    let repo = file_repo(&dir.path().join("repo")).await;
    fill(&live, "uploads", 20, 300).await;
    let snapshot = snapshot_objects(
        &repo,
        live.clone(),
        &SnapshotOptions::new("file:///live"),
        None,
    )
    .await
    .expect("snapshot")
    .snapshot_id;

    // The disaster: objects replaced (another size, and the same size), removed, and added.
    put(&live, "uploads/00001", "replaced after the point").await;
    let same_size = vec![b'x'; 300];
    live.put(&Path::from("uploads/00002"), same_size.into())
        .await
        .expect("put");
    live.delete(&Path::from("uploads/00003"))
        .await
        .expect("delete");
    put(&live, "uploads/new-since", "added after the point").await;
    let before = digest_store(&live).await;

    // No record yet: nothing to undo.
    let nothing = undo_objects(&repo, live.clone(), &undo_options(Shard::WHOLE))
        .await
        .expect("undo nothing");
    assert_eq!(nothing, UndoObjectsReport::default());

    // Two shards; the first is run twice (a retry records again, finding its keys restored).
    for shard in [Shard::new(0, 2), Shard::new(0, 2), Shard::new(1, 2)] {
        let shard = shard.expect("shard");
        restore_objects(&repo, &snapshot, live.clone(), &restore_options(shard))
            .await
            .expect("restore");
    }
    let records = read_records(&repo, &Path::from("quarantine/rdrill"))
        .await
        .expect("records");
    assert_eq!(records.len(), 3);
    // The first record of a key says what it held before any attempt (the retry recorded
    // the keys it found restored, as present).
    let mut first = std::collections::BTreeMap::new();
    for k in records.iter().flat_map(|r| &r.keys) {
        first.entry(k.key.clone()).or_insert(k.before);
    }
    let recorded: Vec<(String, Before)> = first.into_iter().collect();
    assert_eq!(
        recorded,
        [
            (
                "uploads/00001".to_owned(),
                Before::Present {
                    size: "replaced after the point".len() as u64
                }
            ),
            ("uploads/00002".to_owned(), Before::Present { size: 300 }),
            ("uploads/00003".to_owned(), Before::Absent),
            (
                "uploads/new-since".to_owned(),
                Before::Present {
                    size: "added after the point".len() as u64
                }
            ),
        ]
    );

    // Written after the restore (the fleet was unfrozen): a key the restore wrote.
    put(&live, "uploads/00003", "written after the unfreeze").await;
    let mut put_back = Vec::new();
    let mut removed = Vec::new();
    for index in 0..2 {
        let shard = Shard::new(index, 2).expect("shard");
        let report = undo_objects(&repo, live.clone(), &undo_options(shard))
            .await
            .expect("undo");
        assert_eq!(report.records, 3);
        put_back.extend(report.put_back);
        removed.extend(report.removed);
    }
    put_back.sort();
    assert_eq!(
        put_back,
        ["uploads/00001", "uploads/00002", "uploads/new-since"]
    );
    assert_eq!(removed, ["uploads/00003"]);
    assert_eq!(
        digest_store(&live).await,
        before,
        "the live store is as it was just before the restore"
    );
    // What the undo displaced is kept: the restored objects and the write since.
    let kept = |key: &str| {
        let repo = repo.clone();
        let key = key.to_owned();
        async move {
            repo.store()
                .get(&Path::from(format!("quarantine/rundo/{key}")))
                .await
                .expect("kept by the undo")
                .bytes()
                .await
                .expect("body")
        }
    };
    assert_eq!(
        kept("uploads/00003").await.as_ref(),
        b"written after the unfreeze"
    );
    assert_eq!(
        kept("uploads/00001").await,
        content("uploads/00001", 0, 300)
    );

    // Again: everything is as it was, nothing moves.
    let again = undo_objects(&repo, live.clone(), &undo_options(Shard::WHOLE))
        .await
        .expect("undo again");
    assert!(again.put_back.is_empty() && again.removed.is_empty());
    assert_eq!(again.unchanged, 4);
    assert_eq!(digest_store(&live).await, before);
}
