//! Objects at a time on a versioned S3 bucket (moto): restore a prefix to T1, again (nothing
//! changes), then to T2, with a dry run first, keys with spaces and unicode, a multipart
//! body, listings of several pages, and an unversioned bucket refused. Skipped, saying so,
//! when `moto_server` is not installed.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use repository::*;

fn builder(moto: &Moto, bucket: &str) -> object_store::aws::AmazonS3Builder {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_virtual_hosted_style_request(false)
}

fn enable_versioning(moto: &Moto, bucket: &str) {
    use std::io::{Read, Write};
    let body = r#"<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>"#;
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", moto.port)).expect("connect to moto");
    write!(
        stream,
        "PUT /{bucket}?versioning HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        moto.port,
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "enable versioning: {answer}"
    );
}

/// Waits into the next wall-clock second: S3's LastModified has a resolution of one second,
/// so writes on either side of a time mark must fall in different seconds.
async fn next_second() {
    let now = Utc::now();
    let into = Duration::from_nanos(u64::from(now.timestamp_subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(50)).await;
}

async fn body(store: &Arc<dyn ObjectStore>, key: &str) -> Option<Vec<u8>> {
    match store.get(&Path::parse(key).expect("key")).await {
        Ok(got) => Some(got.bytes().await.expect("body").to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("get {key}: {e}"),
    }
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, bytes: Vec<u8>) {
    store
        .put(&Path::parse(key).expect("key"), bytes.into())
        .await
        .expect("put");
}

async fn delete(store: &Arc<dyn ObjectStore>, key: &str) {
    store
        .delete(&Path::parse(key).expect("key"))
        .await
        .expect("delete");
}

fn version_ids(versions: &[ObjectVersion]) -> BTreeSet<(String, String)> {
    versions
        .iter()
        .map(|v| (v.key.clone(), v.version_id.clone()))
        .collect()
}

fn keys_of(report: &VersionsRestoreReport) -> (Vec<&str>, Vec<&str>) {
    (
        report.brought_back.iter().map(|b| b.key.as_str()).collect(),
        report.removed.iter().map(String::as_str).collect(),
    )
}

async fn restore(
    bucket: &VersionedBucket,
    to_time: DateTime<Utc>,
    dry_run: bool,
) -> VersionsRestoreReport {
    let mut options = VersionsRestoreOptions::new(to_time);
    options.dry_run = dry_run;
    restore_versions_to_time(bucket, &options)
        .await
        .expect("restore to time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versioned_bucket_restores_each_key_to_its_version_at_the_time() {
    let Some(moto) = Moto::start() else {
        return;
    };
    moto.create_bucket("live");
    enable_versioning(&moto, "live");
    let live = moto.store("live");
    let mut bucket = VersionedBucket::from_builder(builder(&moto, "live"), "app", "s3://live/app")
        .expect("bucket");
    // Two keys per page: every listing below takes several pages.
    bucket.page_size = 2;

    let a = "app/a.txt";
    let b = "app/b c/é 日本.txt";
    let c = "app/c.txt";
    let big = "app/big.bin";
    let outside = "other/x.txt";
    let steady: Vec<String> = (0..3).map(|i| format!("app/steady/{i}")).collect();
    let big1 = content("big", 1, 9 << 20).to_vec();
    let big2 = content("big", 2, 9 << 20).to_vec();

    put(&live, a, b"a first".to_vec()).await;
    put(&live, b, b"b first".to_vec()).await;
    put(&live, big, big1.clone()).await;
    put(&live, outside, b"outside first".to_vec()).await;
    for key in &steady {
        put(&live, key, key.as_bytes().to_vec()).await;
    }
    next_second().await;
    let t1 = Utc::now();
    next_second().await;
    put(&live, a, b"a second".to_vec()).await;
    delete(&live, b).await;
    put(&live, c, b"c first".to_vec()).await;
    put(&live, big, big2.clone()).await;
    put(&live, outside, b"outside second".to_vec()).await;
    next_second().await;
    let t2 = Utc::now();
    next_second().await;
    put(&live, c, b"c second".to_vec()).await;

    let before = bucket.list_versions().await.expect("list versions");
    assert_eq!(before.len(), 11, "versions and delete markers: {before:#?}");
    assert!(
        moto.count("GET", "/live?versions") + moto.count("GET", "/live/?versions") >= 6,
        "11 versions listed two keys at a time take several pages: {:?}",
        moto.requests()
    );

    // Dry run: the changes are named, none is made.
    let dry = restore(&bucket, t1, true).await;
    assert!(dry.dry_run);
    assert_eq!(keys_of(&dry), (vec![a, b, big], vec![c]));
    assert_eq!(dry.unchanged, 3, "the steady keys");
    assert_eq!(dry.keys, 7);
    assert_eq!(body(&live, a).await.as_deref(), Some(&b"a second"[..]));
    assert_eq!(body(&live, b).await, None);
    assert_eq!(body(&live, c).await.as_deref(), Some(&b"c second"[..]));
    assert_eq!(
        version_ids(&bucket.list_versions().await.expect("list")),
        version_ids(&before),
        "a dry run writes nothing"
    );

    // To T1: a and big have their first content, b is back, c is gone.
    let first = restore(&bucket, t1, false).await;
    assert_eq!(keys_of(&first), (vec![a, b, big], vec![c]));
    assert_eq!(body(&live, a).await.as_deref(), Some(&b"a first"[..]));
    assert_eq!(body(&live, b).await.as_deref(), Some(&b"b first"[..]));
    assert_eq!(body(&live, c).await, None);
    assert!(
        body(&live, big).await == Some(big1.clone()),
        "big has its first body"
    );
    assert_eq!(
        body(&live, outside).await.as_deref(),
        Some(&b"outside second"[..]),
        "keys outside the prefix are not touched"
    );
    for key in &steady {
        assert_eq!(body(&live, key).await.as_deref(), Some(key.as_bytes()));
    }
    let after = bucket.list_versions().await.expect("list");
    let (kept, added) = (version_ids(&before), version_ids(&after));
    assert!(kept.is_subset(&added), "no version was destroyed");
    assert_eq!(
        added.len(),
        kept.len() + 4,
        "three versions written back, one delete marker"
    );

    // Again: nothing changes (the multipart body written back is compared, not rewritten).
    let again = restore(&bucket, t1, false).await;
    assert_eq!(keys_of(&again), (vec![], vec![]));
    assert_eq!(again.unchanged, 7);
    assert_eq!(
        version_ids(&bucket.list_versions().await.expect("list")),
        added,
        "a second run adds no version"
    );

    // To T2, from the state T1 left: a second content, b absent, c first content.
    let second = restore(&bucket, t2, false).await;
    assert_eq!(keys_of(&second), (vec![a, big, c], vec![b]));
    assert_eq!(body(&live, a).await.as_deref(), Some(&b"a second"[..]));
    assert_eq!(body(&live, b).await, None);
    assert_eq!(body(&live, c).await.as_deref(), Some(&b"c first"[..]));
    assert!(
        body(&live, big).await == Some(big2),
        "big has its second body"
    );
    let last = version_ids(&bucket.list_versions().await.expect("list"));
    assert!(added.is_subset(&last), "no version was destroyed");

    // Cut short: runs dropped once their writes began (the listing in one page, then a
    // growing delay) until one was cut with some keys written and others not; then a whole
    // run ends where one run would have: at T1.
    bucket.page_size = 1000;
    let started = std::time::Instant::now();
    let _ = restore(&bucket, t1, true).await;
    let listing = started.elapsed();
    let mut cut_halfway = false;
    // Where a cut lands depends on the machine's load: a run that finished (or was cut after
    // its last write) is taken back to T2 and the cuts start again, finer, up to five rounds.
    'rounds: for _ in 0..5 {
        for extra_ms in [0u64, 1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 60, 80, 120, 160] {
            let before_cut = bucket.list_versions().await.expect("list").len();
            let cut = tokio::time::timeout(
                listing + Duration::from_millis(extra_ms),
                restore_versions_to_time(&bucket, &VersionsRestoreOptions::new(t1)),
            )
            .await;
            let written = bucket.list_versions().await.expect("list").len() - before_cut;
            if written > 0 && written < 4 && cut.is_err() {
                cut_halfway = true;
                break 'rounds;
            }
            if cut.is_ok() || written >= 4 {
                let _ = restore(&bucket, t2, false).await;
                continue 'rounds;
            }
        }
    }
    assert!(
        cut_halfway,
        "no run was cut between its first and last write"
    );
    let finished = restore(&bucket, t1, false).await;
    assert_eq!(
        finished.brought_back.len() + finished.removed.len() + finished.unchanged as usize,
        7
    );
    assert_eq!(body(&live, a).await.as_deref(), Some(&b"a first"[..]));
    assert_eq!(body(&live, b).await.as_deref(), Some(&b"b first"[..]));
    assert_eq!(body(&live, c).await, None);
    assert!(
        body(&live, big).await == Some(big1),
        "big has its first body again"
    );
    let end = version_ids(&bucket.list_versions().await.expect("list"));
    assert!(last.is_subset(&end), "no version was destroyed");
    let settled = restore(&bucket, t1, true).await;
    assert_eq!(keys_of(&settled), (vec![], vec![]), "nothing left to do");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unversioned_bucket_is_refused_before_anything_changes() {
    let Some(moto) = Moto::start() else {
        return;
    };
    moto.create_bucket("plain");
    let live = moto.store("plain");
    put(&live, "app/a.txt", b"a".to_vec()).await;
    let bucket = VersionedBucket::from_builder(builder(&moto, "plain"), "app", "s3://plain/app")
        .expect("bucket");
    assert_eq!(
        bucket.versioning().await.expect("versioning"),
        Versioning::Off
    );
    let err = restore_versions_to_time(&bucket, &VersionsRestoreOptions::new(Utc::now()))
        .await
        .expect_err("an unversioned bucket is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("bucket plain has versioning never enabled")
            && text.contains("put-bucket-versioning")
            && text.contains("--repo"),
        "{text}"
    );
    assert_eq!(body(&live, "app/a.txt").await.as_deref(), Some(&b"a"[..]));
    assert_eq!(
        moto.count("GET", "/plain?versions") + moto.count("GET", "/plain/?versions"),
        0,
        "refused before listing"
    );
}
