//! `rollcall repo restore-objects --to-time T`, run as the real binary: a versioned bucket on
//! moto (no repository needed; dry run, JSON, a second run that changes nothing), an
//! unversioned bucket refused without --repo and restored by the snapshot rule with it, and a
//! `file://` store by the snapshot rule (a time before the first snapshot refused). The moto
//! cases are skipped, saying so, when `moto_server` is not installed.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Option<Moto> {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("moto_server").is_file()))
            .unwrap_or(false);
        if !found {
            assert!(
                std::env::var_os("ROLLCALL_REQUIRE_EMULATORS")
                    .is_none_or(|v| v.is_empty() || v == "0"),
                "moto_server is not installed and ROLLCALL_REQUIRE_EMULATORS is set"
            );
            eprintln!("SKIPPED: moto_server is not installed (pip install 'moto[server]')");
            return None;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Moto { child, port })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends one unsigned request (moto accepts them for bucket settings).
    fn raw(&self, line: &str, body: &str) {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).unwrap();
        write!(
            stream,
            "{line} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{line}: {answer}");
    }

    fn bucket(&self, name: &str, versioned: bool) -> Arc<dyn ObjectStore> {
        self.raw(&format!("PUT /{name}"), "");
        if versioned {
            self.raw(
                &format!("PUT /{name}?versioning"),
                "<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>",
            );
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_bucket_name(name)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .with_virtual_hosted_style_request(false)
                .build()
                .unwrap(),
        )
    }

    /// `rollcall repo ARGS` against this server.
    fn rollcall(&self, args: &[&str]) -> Output {
        let endpoint = self.endpoint();
        let mut all = vec!["repo", "--s3-endpoint", &endpoint, "--s3-path-style"];
        all.extend_from_slice(args);
        rollcall(&all)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rollcall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .args(args)
        .env_remove("ROLLCALL_REPOSITORY")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap()
}

fn stdout(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output, what: &str) -> serde_json::Value {
    serde_json::from_str(&stdout(out, what)).unwrap()
}

/// One line on stderr holding every needle.
fn fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} in {stderr}");
    }
}

/// S3's LastModified has a resolution of one second: writes on either side of a time mark
/// must fall in different seconds.
fn next_second() {
    let into = Duration::from_nanos(u64::from(Utc::now().timestamp_subsec_nanos()));
    std::thread::sleep(Duration::from_secs(1) - into + Duration::from_millis(50));
}

async fn get(store: &Arc<dyn ObjectStore>, key: &str) -> Option<Vec<u8>> {
    match store.get(&Path::parse(key).unwrap()).await {
        Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("get {key}: {e}"),
    }
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: &[u8]) {
    store
        .put(&Path::parse(key).unwrap(), body.to_vec().into())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_bucket_to_a_time_from_the_cli() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let live = moto.bucket("live", true);
    put(&live, "app/a.txt", b"a first").await;
    put(&live, "app/b é.txt", b"b first").await;
    next_second();
    let t1 = Utc::now().to_rfc3339();
    next_second();
    put(&live, "app/a.txt", b"a second").await;
    live.delete(&Path::parse("app/b é.txt").unwrap())
        .await
        .unwrap();
    put(&live, "app/c.txt", b"c first").await;

    let store = "s3://live/app";
    let dry = stdout(
        &moto.rollcall(&[
            "restore-objects",
            "--store",
            store,
            "--to-time",
            &t1,
            "--dry-run",
        ]),
        "dry run",
    );
    assert!(
        dry.contains("rule: versions")
            && dry.contains("dry run, nothing changed")
            && dry.contains("bring back 2, remove 1, unchanged 0")
            && dry.contains("bring back \"app/b é.txt\"")
            && dry.contains("remove \"app/c.txt\""),
        "{dry}"
    );
    assert_eq!(get(&live, "app/a.txt").await.unwrap(), b"a second");

    let report = json(
        &moto.rollcall(&[
            "restore-objects",
            "--store",
            store,
            "--to-time",
            &t1,
            "--json",
        ]),
        "restore",
    );
    assert_eq!(report["rule"], "versions", "{report}");
    assert_eq!(report["dry_run"], false);
    let keys: Vec<&str> = report["brought_back"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["app/a.txt", "app/b é.txt"], "{report}");
    assert_eq!(report["removed"], serde_json::json!(["app/c.txt"]));
    assert_eq!(get(&live, "app/a.txt").await.unwrap(), b"a first");
    assert_eq!(get(&live, "app/b é.txt").await.unwrap(), b"b first");
    assert_eq!(get(&live, "app/c.txt").await, None);

    let again = json(
        &moto.rollcall(&[
            "restore-objects",
            "--store",
            store,
            "--to-time",
            &t1,
            "--json",
        ]),
        "again",
    );
    assert_eq!(again["brought_back"], serde_json::json!([]), "{again}");
    assert_eq!(again["removed"], serde_json::json!([]), "{again}");
    assert_eq!(again["unchanged"], 3, "{again}");

    // Flags that only mean something for a restore from snapshots are refused.
    fails_with(
        &moto.rollcall(&[
            "restore-objects",
            "--store",
            store,
            "--to-time",
            &t1,
            "--shard",
            "0/2",
        ]),
        &[
            "--shard and --quarantine are for restores from snapshots",
            "bucket",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unversioned_bucket_needs_the_repository_and_says_which_rule() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let live = moto.bucket("plain", false);
    put(&live, "app/a.txt", b"a first").await;
    let t0 = Utc::now().to_rfc3339();
    fails_with(
        &moto.rollcall(&[
            "restore-objects",
            "--store",
            "s3://plain/app",
            "--to-time",
            &t0,
        ]),
        &[
            "bucket plain has versioning never enabled",
            "put-bucket-versioning",
            "--repo URL",
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("repo")).unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let snap = json(
        &moto.rollcall(&["snapshot", "--store", "s3://plain/app", "--repo", &repo]),
        "snapshot",
    );
    let snapshot = snap["objects"]["snapshot_id"].as_str().unwrap().to_owned();
    put(&live, "app/a.txt", b"a second").await;
    let t1 = Utc::now().to_rfc3339();
    let report = json(
        &moto.rollcall(&[
            "restore-objects",
            "--store",
            "s3://plain/app",
            "--to-time",
            &t1,
            "--repo",
            &repo,
            "--json",
        ]),
        "snapshot rule",
    );
    assert_eq!(report["rule"], "snapshot", "{report}");
    assert_eq!(report["rule_reason"], "bucket versioning never enabled");
    assert_eq!(report["snapshot_id"], snapshot.as_str());
    assert_eq!(report["restore"]["restored"], 1, "{report}");
    assert_eq!(get(&live, "app/a.txt").await.unwrap(), b"a first");
}

#[test]
fn file_store_to_a_time_uses_the_snapshot_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(dir.path().join("repo")).unwrap();
    std::fs::write(live.join("a.txt"), "a first").unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let store = format!("file://{}", live.display());
    let before = Utc::now() - chrono::Duration::seconds(5);
    let snap = json(
        &rollcall(&["repo", "snapshot", "--store", &store, "--repo", &repo]),
        "snapshot",
    );
    let snapshot = snap["objects"]["snapshot_id"].as_str().unwrap().to_owned();
    std::fs::write(live.join("a.txt"), "a second").unwrap();
    let t = Utc::now().to_rfc3339();

    let text = stdout(
        &rollcall(&[
            "repo",
            "restore-objects",
            "--store",
            &store,
            "--to-time",
            &t,
            "--repo",
            &repo,
        ]),
        "restore to time",
    );
    assert!(
        text.contains("rule: snapshot (the store keeps no versions")
            && text.contains(&format!("snapshot {snapshot} taken"))
            && text.contains("uncertainty window: ")
            && text.contains(&format!("to {t} (")),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(live.join("a.txt")).unwrap(),
        "a first"
    );

    fails_with(
        &rollcall(&[
            "repo",
            "restore-objects",
            "--store",
            &store,
            "--to-time",
            &before.to_rfc3339(),
            "--repo",
            &repo,
        ]),
        &["before the first snapshot", &snapshot],
    );
    fails_with(
        &rollcall(&[
            "repo",
            "restore-objects",
            "--store",
            &store,
            "--to-time",
            &t,
        ]),
        &["--repo URL is required for `restore-objects --to-time`"],
    );
    // A repository inside the store it would take back is refused, the store untouched.
    let inner = format!("{store}/backups");
    fails_with(
        &rollcall(&[
            "repo",
            "restore-objects",
            "--store",
            &store,
            "--to-time",
            &t,
            "--repo",
            &inner,
        ]),
        &["lies inside store", "keep the repository outside"],
    );
    assert_eq!(
        std::fs::read_to_string(live.join("a.txt")).unwrap(),
        "a first"
    );
    fails_with(
        &rollcall(&[
            "repo",
            "restore-objects",
            "--store",
            &store,
            "--to-time",
            "yesterday",
            "--repo",
            &repo,
        ]),
        &["--to-time yesterday", "RFC 3339"],
    );
}

/// `repo key rotate` on a bucket that keeps versions says that the old config object (which
/// the old key opens) is still there; on a bucket without versioning it says nothing of it.
/// Here because this file holds the CLI's moto harness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_on_a_versioned_bucket_says_the_old_config_is_kept() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let _ = moto.bucket("vault", true);
    let _ = moto.bucket("plain", false);
    let keys = [
        repository::RepositoryKey::generate().unwrap().to_base64(),
        repository::RepositoryKey::generate().unwrap().to_base64(),
    ];
    let key = |n: usize| keys[n - 1].clone();
    let endpoint = moto.endpoint();
    let keyed = |args: &[&str], env: &[(&str, String)]| {
        let mut all = vec!["repo", "--s3-endpoint", &endpoint, "--s3-path-style"];
        all.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_rollcall"))
            .args(&all)
            .env_remove("ROLLCALL_REPOSITORY")
            .env_remove("ROLLCALL_REPOSITORY_KEY_FILE")
            .env_remove("ROLLCALL_REPOSITORY_KEY_COMMAND")
            .env_remove("ROLLCALL_REPOSITORY_NEW_KEY_FILE")
            .env_remove("ROLLCALL_REPOSITORY_NEW_KEY_COMMAND")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
    };
    for (bucket, versioned) in [("vault", true), ("plain", false)] {
        let url = format!("s3://{bucket}/repo");
        let old = [("ROLLCALL_REPOSITORY_KEY", key(1))];
        stdout(
            &keyed(&["init", "--repo", &url, "--encrypt"], &old),
            "init --encrypt",
        );
        let both = [
            ("ROLLCALL_REPOSITORY_KEY", key(1)),
            ("ROLLCALL_REPOSITORY_NEW_KEY", key(2)),
        ];
        let said = stdout(&keyed(&["key", "rotate", "--repo", &url], &both), "rotate");
        assert!(said.contains("is now encrypted with key"), "{said}");
        assert_eq!(
            said.contains("note: the bucket keeps versions")
                && said.contains("the old key still opens"),
            versioned,
            "{bucket}: {said}"
        );
        // The new key opens it, the old one is refused.
        let new = [("ROLLCALL_REPOSITORY_KEY", key(2))];
        stdout(&keyed(&["points", "--repo", &url], &new), "points");
        fails_with(
            &keyed(&["points", "--repo", &url], &old),
            &["is encrypted with key"],
        );
    }
}
