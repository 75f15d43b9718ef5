//! An encrypted repository through the library: prune keeps every blob a remaining snapshot
//! references (blob names are keyed hashes, so prune, verify and snapshot must map the same
//! way), multipart bodies round-trip, and damage is named at read.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{content, digest_store, files_under, flip_byte, local_store, test_options};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use repository::{
    NewPoint, PointId, PruneOptions, Repository, RepositoryKey, RepositoryOptions,
    RestoreObjectsOptions, SnapshotOptions, restore_objects, snapshot_objects,
};
use sha2::{Digest, Sha256};

fn options(key: &RepositoryKey) -> RepositoryOptions {
    RepositoryOptions {
        key: Some(key.clone()),
        ..test_options()
    }
}

async fn encrypted_repo(dir: &std::path::Path, key: &RepositoryKey) -> Repository {
    let url = format!("file://{}", dir.display());
    Repository::init(&url, options(key), Some(key))
        .await
        .expect("init");
    let repo = Repository::open(&url, options(key)).await.expect("open");
    assert_eq!(repo.encryption_key_id(), Some(key.id().as_str()));
    repo
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: bytes::Bytes) {
    store
        .put(&Path::from(key), body.into())
        .await
        .expect("put live object");
}

fn sha(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

#[tokio::test]
async fn prune_of_an_encrypted_repository_keeps_referenced_blobs_and_deletes_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = RepositoryKey::generate().expect("key");
    let repo_dir = dir.path().join("repo");
    let repo = encrypted_repo(&repo_dir, &key).await;
    let live = local_store(&dir.path().join("live"));
    let shared = content("shared", 0, 3000);
    let old_only = content("old", 0, 2000);
    let new_only = content("new", 0, 1000);
    put(&live, "a/shared.bin", shared.clone()).await;
    put(&live, "a/changing.bin", old_only.clone()).await;

    let snap = |env: &'static str| {
        let mut o = SnapshotOptions::new("file:///live");
        o.environment = Some(env.into());
        o
    };
    let now = Utc::now();
    let old_part = snapshot_objects(&repo, live.clone(), &snap("prod"), None)
        .await
        .expect("old snapshot");
    let old = repo
        .write_point_stamped(
            NewPoint {
                id: PointId::new("prod", now - chrono::Duration::days(3)).expect("id"),
                postgres: None,
                objects: Some(old_part),
                secrets: vec![],
            },
            now - chrono::Duration::days(3),
        )
        .await
        .expect("old point");
    put(&live, "a/changing.bin", new_only.clone()).await;
    let new_part = snapshot_objects(&repo, live.clone(), &snap("prod"), None)
        .await
        .expect("new snapshot");
    let new = repo
        .write_point(NewPoint {
            id: PointId::new("prod", now).expect("id"),
            postgres: None,
            objects: Some(new_part.clone()),
            secrets: vec![],
        })
        .await
        .expect("new point");

    let blob_files = || -> Vec<String> {
        files_under(&repo_dir)
            .into_iter()
            .filter(|f| f.starts_with("objects/blobs/"))
            .collect()
    };
    assert_eq!(blob_files().len(), 3, "{:?}", blob_files());
    // Named by keyed hashes: no file name carries a content's sha256.
    for body in [&shared, &old_only, &new_only] {
        let digest = sha(body);
        assert!(
            !files_under(&repo_dir).iter().any(|f| f.contains(&digest)),
            "a blob is named by its content's sha256"
        );
    }

    let mut prune = PruneOptions::new("prod", Duration::from_secs(24 * 3600));
    prune.now = Some(now);
    let report = repo.prune(&prune).await.expect("prune");
    assert_eq!(
        report
            .deleted_points
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        vec![old.id.as_str()],
        "{report:?}"
    );
    assert_eq!(
        report.deleted_blobs, 1,
        "only the old body goes: {report:?}"
    );
    assert_eq!(
        report.deleted_blob_bytes,
        old_only.len() as u64,
        "{report:?}"
    );
    assert_eq!(blob_files().len(), 2);

    // What is left verifies in full and restores exactly.
    let verified = repo.verify_point(&new.id, true).await.expect("verify");
    assert!(verified.is_ok(), "{verified:?}");
    let target_dir = dir.path().join("target");
    let target = local_store(&target_dir);
    restore_objects(
        &repo,
        &new_part.snapshot_id,
        target.clone(),
        &RestoreObjectsOptions::new("file:///target"),
    )
    .await
    .expect("restore");
    assert_eq!(digest_store(&target).await, digest_store(&live).await);

    // Opened as a plaintext reader would (the raw files), a blob is ciphertext.
    for file in blob_files() {
        let raw = std::fs::read(repo_dir.join(&file)).expect("read blob file");
        assert!(
            ![&shared, &new_only]
                .iter()
                .any(|b| raw.windows(64).any(|w| w == &b[..64])),
            "{file} holds plaintext"
        );
    }
}

#[tokio::test]
async fn multipart_bodies_round_trip_and_a_flipped_byte_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = RepositoryKey::generate().expect("key");
    let repo_dir = dir.path().join("repo");
    let repo = encrypted_repo(&repo_dir, &key).await;
    let live = local_store(&dir.path().join("live"));
    // Over the multipart threshold set below: staged in parts, renamed into blobs/.
    let big = content("big", 0, 13 * (1 << 20) + 17);
    let exact = content("exact", 0, 1 << 20);
    put(&live, "big.bin", big.clone()).await;
    put(&live, "exact.bin", exact.clone()).await;
    put(&live, "empty.bin", bytes::Bytes::new()).await;
    let mut options = SnapshotOptions::new("file:///live");
    options.multipart_threshold = 5 << 20;
    options.part_size = 5 << 20;
    let part = snapshot_objects(&repo, live.clone(), &options, None)
        .await
        .expect("snapshot");
    let point = repo
        .write_point(NewPoint {
            id: PointId::new("prod", Utc::now()).expect("id"),
            postgres: None,
            objects: Some(part.clone()),
            secrets: vec![],
        })
        .await
        .expect("point");
    let verified = repo.verify_point(&point.id, true).await.expect("verify");
    assert!(verified.is_ok(), "{verified:?}");
    let target = local_store(&dir.path().join("target"));
    restore_objects(
        &repo,
        &part.snapshot_id,
        target.clone(),
        &RestoreObjectsOptions::new("file:///target"),
    )
    .await
    .expect("restore");
    assert_eq!(digest_store(&target).await, digest_store(&live).await);

    // One flipped byte in the big blob: verify --full names it.
    let big_blob = files_under(&repo_dir)
        .into_iter()
        .filter(|f| f.starts_with("objects/blobs/"))
        .max_by_key(|f| std::fs::metadata(repo_dir.join(f)).map_or(0, |m| m.len()))
        .expect("a blob");
    flip_byte(&repo_dir.join(&big_blob));
    let verified = repo.verify_point(&point.id, true).await.expect("verify");
    assert!(!verified.is_ok(), "a flipped byte passed verification");
    let problems = verified.problems.join("; ");
    let id = big_blob.rsplit('/').next().expect("name");
    assert!(problems.contains(id), "{problems}");
    assert!(problems.contains("does not open"), "{problems}");

    // Without the key, or with another, the repository does not open.
    let url = format!("file://{}", repo_dir.display());
    let other = RepositoryKey::generate().expect("key");
    let err = Repository::open(&url, options_with(&other))
        .await
        .expect_err("wrong key");
    let text = format!("{err:#}");
    assert!(text.contains(&key.id()) && text.contains(&url), "{text}");
}

fn options_with(key: &RepositoryKey) -> RepositoryOptions {
    options(key)
}

/// On S3 (moto): the sealed multipart upload's parts are accepted (5 MiB or more but the
/// last), the staged blob's server-side copy into `objects/blobs/` still opens, and the
/// snapshot restores exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_repository_on_s3_round_trips_multipart_bodies() {
    let Some(moto) = common::Moto::start() else {
        return;
    };
    moto.create_bucket("live");
    moto.create_bucket("backups");
    let live = moto.store("live");
    let big = content("big", 0, 12 << 20);
    put(&live, "checkpoints/big", big.clone()).await;
    put(&live, "small", content("small", 0, 100)).await;
    let key = RepositoryKey::generate().expect("key");
    let raw: Arc<dyn ObjectStore> = Arc::new(object_store::prefix::PrefixStore::new(
        moto.store("backups"),
        "cowork",
    ));
    let config = repository::RepositoryConfig::encrypted(&key).expect("config");
    raw.put(
        &Path::from(repository::CONFIG_KEY),
        config.to_bytes().expect("encode").into(),
    )
    .await
    .expect("write config");
    let repo = Repository::from_store_configured(raw.clone(), "s3://backups/cowork", options(&key))
        .await
        .expect("open");
    let mut snap = SnapshotOptions::new("s3://live");
    snap.multipart_threshold = 5 << 20;
    snap.part_size = 5 << 20;
    let part = snapshot_objects(&repo, live.clone(), &snap, None)
        .await
        .expect("snapshot");
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = local_store(&tmp.path().join("target"));
    restore_objects(
        &repo,
        &part.snapshot_id,
        target.clone(),
        &RestoreObjectsOptions::new("file:///target"),
    )
    .await
    .expect("restore");
    assert_eq!(digest_store(&target).await, digest_store(&live).await);
    // Stored sealed, under keyed names.
    let stored: Vec<object_store::ObjectMeta> =
        futures::TryStreamExt::try_collect(raw.list(Some(&Path::from("objects/blobs"))))
            .await
            .expect("list");
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .all(|m| !m.location.as_ref().contains(&sha(&big)))
    );
    assert!(stored.iter().any(|m| m.size > big.len() as u64));
}

/// Deleting the config object must not turn the encryption off for a process that holds the
/// key: it refuses to open (and so to write plaintext into, or trust, the repository).
#[tokio::test]
async fn a_deleted_or_replaced_config_object_is_refused_while_a_key_is_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = RepositoryKey::generate().expect("key");
    let repo_dir = dir.path().join("repo");
    encrypted_repo(&repo_dir, &key).await;
    let url = format!("file://{}", repo_dir.display());
    let config = repo_dir.join("rollcall-repository.json");
    let kept = std::fs::read(&config).expect("config object");
    std::fs::remove_file(&config).expect("delete the config object");
    let err = Repository::open(&url, options(&key))
        .await
        .expect_err("opened without its config object");
    let text = format!("{err:#}");
    assert!(
        text.contains("reads as not encrypted (it has no rollcall-repository.json)")
            && text.contains("restore rollcall-repository.json from a copy"),
        "{text}"
    );
    // Replaced by a plaintext config object (this repository holds nothing else yet, so init
    // writes one): refused the same way.
    Repository::init(&url, options(&key), None)
        .await
        .expect("a plaintext config object written");
    let err = Repository::open(&url, options(&key))
        .await
        .expect_err("opened with a plaintext config object and a key held");
    let text = format!("{err:#}");
    assert!(
        text.contains("reads as not encrypted (its rollcall-repository.json says plaintext)"),
        "{text}"
    );
    // Put back, it opens again.
    std::fs::write(&config, kept).expect("restore the config object");
    Repository::open(&url, options(&key))
        .await
        .expect("open again");
}

/// One object that does not open is that object damaged, not the repository failing: a point
/// file with a flipped byte, cut short, or another point's file under its name is listed
/// apart as damaged while the others list, and prune still deletes what is out of its window;
/// a manifest, a lock, a WAL record and a WAL body that do not open are each named as damaged
/// where they are read.
#[tokio::test]
async fn an_object_that_does_not_open_is_damaged_and_the_rest_still_lists_and_prunes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = RepositoryKey::generate().expect("key");
    let repo_dir = dir.path().join("repo");
    let repo = encrypted_repo(&repo_dir, &key).await;
    let live = local_store(&dir.path().join("live"));
    put(&live, "a.bin", content("a", 0, 5000)).await;
    let now = Utc::now();
    let mut points = Vec::new();
    for days in [5i64, 3, 2, 1, 0] {
        let at = now - chrono::Duration::days(days);
        let mut snap = SnapshotOptions::new("file:///live");
        snap.environment = Some("prod".into());
        let part = snapshot_objects(&repo, live.clone(), &snap, None)
            .await
            .expect("snapshot");
        let point = repo
            .write_point_stamped(
                NewPoint {
                    id: PointId::new("prod", at).expect("id"),
                    postgres: None,
                    objects: Some(part),
                    secrets: vec![],
                },
                at,
            )
            .await
            .expect("point");
        points.push(point);
    }
    let file_of = |id: &PointId| repo_dir.join(format!("points/{id}.json"));
    // Flipped, cut short, and another point's (sealed) file put under this one's name.
    flip_byte(&file_of(&points[1].id));
    let cut = std::fs::read(file_of(&points[2].id)).expect("read");
    std::fs::write(file_of(&points[2].id), &cut[..cut.len() - 5]).expect("truncate");
    std::fs::copy(file_of(&points[4].id), file_of(&points[3].id)).expect("copy");

    let listing = repo
        .list_points(Some("prod"))
        .await
        .expect("list despite damage");
    let listed: Vec<&str> = listing.points.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(listed, vec![points[0].id.as_str(), points[4].id.as_str()]);
    let damaged: Vec<&str> = listing.damaged.iter().map(|d| d.key.as_str()).collect();
    let expect: Vec<String> = points[1..4]
        .iter()
        .map(|p| format!("points/{}.json", p.id))
        .collect();
    assert_eq!(
        damaged,
        expect.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for d in &listing.damaged {
        assert!(d.reason.contains("does not open"), "{}", d.reason);
    }
    let err = repo.read_point(&points[1].id).await.expect_err("damaged");
    assert!(
        matches!(
            err.downcast_ref::<repository::RepoError>(),
            Some(repository::RepoError::Damaged { .. })
        ),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains(&format!("points/{}.json", points[1].id)));

    // Prune deletes the point out of its window; the blob sweep waits for the damaged files.
    let mut prune = PruneOptions::new("prod", Duration::from_secs(4 * 24 * 3600));
    prune.now = Some(now);
    let report = repo.prune(&prune).await.expect("prune despite damage");
    assert_eq!(
        report
            .deleted_points
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        vec![points[0].id.as_str()],
        "{report:?}"
    );
    let skipped = report.sweep_skipped.clone().unwrap_or_default();
    assert!(skipped.contains(&expect[0]), "{report:?}");

    // A manifest that does not open: damaged, named.
    let snapshot = &points[4].objects.as_ref().expect("objects").snapshot_id;
    flip_byte(&repo_dir.join(format!("objects/snapshots/{snapshot}.json")));
    let err = repo.read_manifest(snapshot).await.expect_err("damaged");
    assert!(
        matches!(
            err.downcast_ref::<repository::RepoError>(),
            Some(repository::RepoError::Damaged { .. })
        ),
        "{err:#}"
    );
    let verified = repo
        .verify_point(&points[4].id, false)
        .await
        .expect("verify");
    assert!(
        verified
            .problems
            .join("; ")
            .contains(&format!("{snapshot}.json")),
        "{verified:?}"
    );

    // A lock file that does not open counts as held (it may be a live exclusive lock) until
    // it is older than any live lock, and is named.
    repo.store()
        .put(
            &Path::from("locks/x.json"),
            bytes::Bytes::from_static(b"{}").into(),
        )
        .await
        .expect("a sealed lock file");
    flip_byte(&repo_dir.join("locks/x.json"));
    let err = repo.prune(&prune).await.expect_err("busy");
    assert!(
        format!("{err:#}").contains("unreadable lock file locks/x.json"),
        "{err:#}"
    );
    std::fs::remove_file(repo_dir.join("locks/x.json")).expect("remove");

    // WAL: a record that does not open is damaged in verify and in fetch; a body likewise.
    let wal_dir = dir.path().join("pg_wal");
    std::fs::create_dir_all(&wal_dir).expect("wal dir");
    let names = ["000000010000000000000001", "000000010000000000000002"];
    for (i, name) in names.iter().enumerate() {
        std::fs::write(wal_dir.join(name), vec![i as u8 + 1; 1 << 16]).expect("wal file");
        repository::wal_push(&repo, &wal_dir.join(name))
            .await
            .expect("push");
    }
    let record = format!("wal/00000001/{}.json", names[0]);
    flip_byte(&repo_dir.join(&record));
    let report = repository::wal_verify(&repo, true)
        .await
        .expect("verify the WAL");
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert!(report.damaged[0].contains(&record), "{report:?}");
    let err = repository::wal_fetch(&repo, names[0], &dir.path().join("out"))
        .await
        .expect_err("damaged record");
    assert!(
        matches!(
            err.downcast_ref::<repository::RepoError>(),
            Some(repository::RepoError::Damaged { .. })
        ),
        "{err:#}"
    );
    let body = files_under(&repo_dir)
        .into_iter()
        .find(|f| f.starts_with(&format!("wal/00000001/{}-", names[1])) && f.ends_with(".zst"))
        .expect("the second body");
    flip_byte(&repo_dir.join(&body));
    let report = repository::wal_verify(&repo, true)
        .await
        .expect("verify the WAL");
    assert_eq!(report.damaged.len(), 2, "{report:?}");
    assert!(
        report.damaged.iter().any(|d| d.contains(&body)),
        "{report:?}"
    );
    let err = repository::wal_fetch(&repo, names[1], &dir.path().join("out"))
        .await
        .expect_err("damaged body");
    assert!(
        matches!(
            err.downcast_ref::<repository::RepoError>(),
            Some(repository::RepoError::Damaged { .. })
        ),
        "{err:#}"
    );
    assert!(!dir.path().join("out").exists());
}

/// A fleet restore's quarantine in an encrypted repository names what it keeps by keyed
/// hashes, not by the live store's keys, and the undo finds them through the sealed records.
#[tokio::test]
async fn quarantined_objects_are_named_by_keyed_hashes_and_undo_puts_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = RepositoryKey::generate().expect("key");
    let repo_dir = dir.path().join("repo");
    let repo = encrypted_repo(&repo_dir, &key).await;
    let live = local_store(&dir.path().join("live"));
    put(&live, "hr/salaries-2026.csv", content("pay", 0, 700)).await;
    put(&live, "hr/unchanged.txt", content("same", 0, 300)).await;
    let snapshot = snapshot_objects(
        &repo,
        live.clone(),
        &SnapshotOptions::new("file:///live"),
        None,
    )
    .await
    .expect("snapshot")
    .snapshot_id;
    put(&live, "hr/salaries-2026.csv", content("pay", 1, 900)).await;
    put(&live, "hr/layoffs-plan.txt", content("new", 0, 100)).await;
    let before = digest_store(&live).await;

    let mut options = RestoreObjectsOptions::new("file:///live");
    options.quarantine_in_repository = true;
    options.quarantine_prefix = Some(Path::from("quarantine/rdrill"));
    restore_objects(&repo, &snapshot, live.clone(), &options)
        .await
        .expect("restore");
    let quarantined: Vec<String> = files_under(&repo_dir)
        .into_iter()
        .filter(|f| f.starts_with("quarantine/rdrill/"))
        .collect();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    for name in files_under(&repo_dir) {
        assert!(
            !name.contains("salaries") && !name.contains("layoffs") && !name.contains("hr/"),
            "a repository name shows a live key: {name}"
        );
    }

    let undone = repository::undo_objects(
        &repo,
        live.clone(),
        &repository::UndoObjectsOptions {
            target_label: "file:///live".into(),
            restore_quarantine: Path::from("quarantine/rdrill"),
            undo_quarantine: Path::from("quarantine/rundo"),
            shard: repository::Shard::WHOLE,
            parallelism: 4,
        },
    )
    .await
    .expect("undo");
    assert!(
        undone.put_back.contains(&"hr/salaries-2026.csv".to_owned()),
        "{undone:?}"
    );
    assert_eq!(digest_store(&live).await, before);
    // What the undo displaced is kept under keyed names too.
    let displaced: Vec<String> = files_under(&repo_dir)
        .into_iter()
        .filter(|f| f.starts_with("quarantine/rundo/"))
        .collect();
    assert!(!displaced.is_empty(), "the undo kept what it displaced");
    assert!(
        displaced.iter().all(|f| !f.contains("salaries")),
        "{displaced:?}"
    );

    // A quarantine written before keyed names (its copy under the live key's plain name,
    // sealed like every object): the undo still finds it and puts it back.
    let legacy = Path::from("quarantine/rlegacy/hr/salaries-2026.csv");
    let original = content("pay", 7, 800);
    put(&live, "hr/salaries-2026.csv", content("pay", 8, 800)).await;
    put(repo.store(), legacy.as_ref(), original.clone()).await;
    let record = repository::RestoreRecord {
        version: repository::RESTORE_RECORD_VERSION,
        snapshot: snapshot.to_string(),
        shard: 0,
        shards: 1,
        recorded_at: chrono::Utc::now(),
        target_prefix: String::new(),
        keys: vec![repository::RecordedKey {
            key: "hr/salaries-2026.csv".into(),
            before: repository::Before::Present { size: 800 },
        }],
    };
    let records = repository::records_prefix(&Path::from("quarantine/rlegacy"));
    put(
        repo.store(),
        records
            .join("20260101T000000.000000Z-shard-0-of-1-00000001.json")
            .as_ref(),
        serde_json::to_vec(&record).expect("encode").into(),
    )
    .await;
    let undone = repository::undo_objects(
        &repo,
        live.clone(),
        &repository::UndoObjectsOptions {
            target_label: "file:///live".into(),
            restore_quarantine: Path::from("quarantine/rlegacy"),
            undo_quarantine: Path::from("quarantine/rundo2"),
            shard: repository::Shard::WHOLE,
            parallelism: 4,
        },
    )
    .await
    .expect("undo the legacy restore");
    assert_eq!(undone.put_back, ["hr/salaries-2026.csv"], "{undone:?}");
    let back = live
        .get(&Path::from("hr/salaries-2026.csv"))
        .await
        .expect("read")
        .bytes()
        .await
        .expect("body");
    assert_eq!(back, original);
}
