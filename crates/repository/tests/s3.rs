//! The repository on a local S3-compatible server (moto): snapshot, incremental snapshot,
//! restore, verify and a Postgres dump by multipart upload, counting HTTP requests in the
//! server's request log. Skipped, saying so, when `moto_server` is not installed.

mod common;

use std::sync::Arc;

use common::*;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use repository::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_snapshot_counts_one_put_per_new_object_and_no_head() {
    let Some(moto) = Moto::start() else {
        return;
    };
    moto.create_bucket("live");
    moto.create_bucket("backups");
    let live = moto.store("live");
    fill(&live, "uploads", 200, 4096).await;
    live.put(
        &Path::from("checkpoints/big"),
        content("big", 0, 12 << 20).into(),
    )
    .await
    .expect("put big");
    let repo = Repository::from_store(
        Arc::new(object_store::prefix::PrefixStore::new(
            moto.store("backups"),
            "cowork",
        )),
        "s3://backups/cowork",
        test_options(),
    );
    repo.check_reachable().await.expect("reachable");

    let base = moto.requests().len();
    let part = snapshot_objects(
        &repo,
        live.clone(),
        &SnapshotOptions::new("s3://live"),
        None,
    )
    .await
    .expect("snapshot");
    assert_eq!(part.objects, 201);
    let count = |method: &str, prefix: &str| {
        moto.requests()[base..]
            .iter()
            .filter(|(m, p)| m == method && p.starts_with(prefix))
            .count()
    };
    // 200 small objects: one PUT each. The large one: one server-side copy (also a PUT) from
    // its staging upload.
    assert_eq!(
        count("PUT", "/backups/cowork/objects/blobs/"),
        201,
        "1 PUT per new object"
    );
    assert_eq!(count("HEAD", "/"), 0, "no HEAD at all");
    assert_eq!(count("GET", "/live/uploads/"), 200, "1 GET per object");
    // The 12 MiB object went through staging by multipart, then one server-side copy.
    assert_eq!(
        count("PUT", "/backups/cowork/objects/staging/"),
        2,
        "2 parts of 8 MiB"
    );

    // Change 1% (2 of 200) and snapshot again.
    for i in [17, 142] {
        let key = format!("uploads/{i:05}");
        live.put(&Path::from(key.as_str()), content(&key, 1, 4096).into())
            .await
            .expect("change");
    }
    let base = moto.requests().len();
    let second = snapshot_objects(
        &repo,
        live.clone(),
        &SnapshotOptions::new("s3://live"),
        None,
    )
    .await
    .expect("second snapshot");
    let count = |method: &str, prefix: &str| {
        moto.requests()[base..]
            .iter()
            .filter(|(m, p)| m == method && p.starts_with(prefix))
            .count()
    };
    assert_eq!(second.copied_objects, 2);
    assert_eq!(count("PUT", "/backups/cowork/objects/blobs/"), 2);
    assert_eq!(
        count("GET", "/live/"),
        2,
        "only the changed objects are read"
    );
    assert_eq!(count("HEAD", "/"), 0);

    let point = repo
        .write_point(NewPoint {
            id: PointId::new("private-beta", chrono::Utc::now()).expect("id"),
            postgres: None,
            objects: Some(second.clone()),
            secrets: vec![],
        })
        .await
        .expect("point");
    let report = repo.verify_point(&point.id, true).await.expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);

    moto.create_bucket("restored");
    let target = moto.store("restored");
    let restored = restore_point_objects(
        &repo,
        &point.id,
        target.clone(),
        &RestoreObjectsOptions::new("s3://restored"),
    )
    .await
    .expect("restore");
    assert_eq!(restored.restored, 201);
    assert_eq!(digest_store(&live).await, digest_store(&target).await);

    // Retention on S3 (bulk deletes): the first snapshot is unreferenced and young, so
    // nothing goes; with a zero window it goes, and exactly its 2 unique blobs with it.
    let mut prune = PruneOptions::new("private-beta", std::time::Duration::ZERO);
    prune.now = Some(chrono::Utc::now() + chrono::Duration::seconds(5));
    let report = repo.prune(&prune).await.expect("prune");
    assert_eq!(
        report.deleted_blobs, 0,
        "the unreferenced snapshot has no environment"
    );
    assert!(
        repo.verify_point(&point.id, false)
            .await
            .expect("verify")
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_postgres_backup_streams_by_multipart_and_restores() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let cluster = match ephemeral_pg::Cluster::start() {
        Ok(c) => c,
        Err(e) => panic!("start a throwaway Postgres: {e:#}"),
    };
    cluster.create_database("app").expect("db");
    cluster
        .psql(
            "app",
            "CREATE TABLE sessions (id bigint PRIMARY KEY, body text NOT NULL);
             INSERT INTO sessions SELECT g, md5(g::text) FROM generate_series(1, 300000) g;",
        )
        .expect("data");
    moto.create_bucket("backups");
    let repo = Repository::from_store(moto.store("backups"), "s3://backups", test_options());
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    let mut options = PgBackupOptions::new(id.clone(), cluster.url("app"));
    options.bin_dir = Some(cluster.bin_dir().to_path_buf());
    options.counts = CountSelection::Listed(vec![CountSpec::table("sessions")]);
    options.part_size = 5 << 20;
    // Fast, weak compression so the dump spans several parts.
    options.compression = Compression::Zstd {
        level: 1,
        workers: 2,
    };
    let base = moto.requests().len();
    let part = backup_postgres(&repo, &options).await.expect("backup");
    let uploads = moto.requests()[base..]
        .iter()
        .filter(|(m, p)| {
            m == "PUT" && p.starts_with("/backups/postgres/") && p.contains("partNumber")
        })
        .count();
    assert!(part.size > 5 << 20, "dump of {} bytes", part.size);
    assert_eq!(
        uploads as u64,
        part.files
            .iter()
            .map(|f| f.size.div_ceil(5 << 20))
            .sum::<u64>(),
        "one PUT per part of each archive"
    );
    write_pg_point(&repo, &id, &part).await;
    assert!(repo.verify_point(&id, true).await.expect("verify").is_ok());

    let mut restore = pg_restore_options(&cluster, "restored");
    restore.create_database = true;
    restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore");
    let n = cluster
        .psql("restored", "SELECT count(*) FROM sessions")
        .expect("count");
    assert_eq!(n.trim(), "300000");
    assert_eq!(part.table_counts["sessions"], 300000);
}

/// Commit numbers on S3: the claim is a create-only put (`If-None-Match: *`), which the store
/// refuses for a number already taken, so racing writers never share one; a number claimed by
/// a writer that died before its point was written is skipped, never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_commit_numbers_are_claimed_create_only() {
    let Some(moto) = Moto::start() else {
        return;
    };
    moto.create_bucket("live");
    moto.create_bucket("backups");
    let live = moto.store("live");
    fill(&live, "uploads", 3, 64).await;
    let repo = Repository::from_store(moto.store("backups"), "s3://backups", test_options());
    let part = snapshot_objects(&repo, live, &SnapshotOptions::new("s3://live"), None)
        .await
        .expect("snapshot");
    let now = chrono::Utc::now();
    let write = |stamp: chrono::DateTime<chrono::Utc>| {
        let part = part.clone();
        let repo = repo.clone();
        async move {
            repo.write_point_stamped(
                NewPoint {
                    id: PointId::new("prod", stamp).expect("id"),
                    postgres: None,
                    objects: Some(part),
                    secrets: vec![],
                },
                stamp,
            )
            .await
            .expect("point")
        }
    };
    let fast = write(now + chrono::Duration::minutes(10)).await;
    assert_eq!(fast.sequence, Some(1));

    // The store refuses a second claim of a number: no writer falls back to plain puts here.
    let taken = Path::from("sequence/00000000000000000001");
    let err = moto
        .store("backups")
        .put_opts(&taken, "other".into(), object_store::PutMode::Create.into())
        .await
        .expect_err("a claimed number cannot be claimed again");
    assert!(
        matches!(err, object_store::Error::AlreadyExists { .. }),
        "{err}"
    );
    // Another writer claimed 2 and died before writing its point.
    moto.store("backups")
        .put(&Path::from("sequence/00000000000000000002"), "x".into())
        .await
        .expect("stray claim");

    let base = moto.requests().len();
    let real = write(now).await;
    assert_eq!(real.sequence, Some(3));
    let claims = moto.requests()[base..]
        .iter()
        .filter(|(m, p)| m == "PUT" && p.starts_with("/backups/sequence/"))
        .count();
    assert_eq!(claims, 1, "one claim per point when nobody races");
    let listing = repo.list_points(Some("prod")).await.expect("list");
    let ids: Vec<&PointId> = listing.points.iter().map(|p| &p.id).collect();
    assert_eq!(ids, [&fast.id, &real.id], "latest is the last committed");
}
