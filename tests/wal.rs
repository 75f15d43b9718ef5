//! WAL archiving into the repository with a real Postgres 15: `rollcall repo wal-push` as the
//! server's archive_command, then a base backup (`pg_basebackup -X none`, so every WAL byte
//! comes from the repository) recovered to a time between two commits with `rollcall repo
//! wal-fetch` as restore_command: every row committed at or before it is there, none after.
//! And the refusals: the same segment pushed twice is fine, other bytes under an archived
//! name are refused, a name the repository lacks ends recovery (exit 1).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::*;
use ephemeral_pg::Cluster;

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Gives `path` (recursively) to the postgres user when the tests run as root: the server runs
/// the archive and restore commands as that user.
fn give_to_postgres(path: &Path) {
    if as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A copy of the rollcall binary the postgres user may run (the build's own may sit under a
/// directory it cannot enter).
fn runnable_rollcall(dir: &Path) -> PathBuf {
    let bin = dir.join("rollcall");
    std::fs::copy(rollcall_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn psql(cluster: &Cluster, sql: &str) -> String {
    cluster.psql("postgres", sql).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_wal_recovers_a_base_backup_to_a_time_between_two_commits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = runnable_rollcall(dir.path());
    let repo = dir.path().join("repository");
    std::fs::create_dir_all(&repo).unwrap();
    give_to_postgres(&repo);
    let repo_url = format!("file://{}", repo.display());

    let source = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(dir.path().join("source")),
        settings: vec![
            ("wal_level".into(), "replica".into()),
            ("archive_mode".into(), "on".into()),
        ],
    })
    .unwrap();
    psql(
        &source,
        &format!(
            "ALTER SYSTEM SET archive_command = '{} repo wal-push --repo {repo_url} %p'",
            bin.display()
        ),
    );
    psql(&source, "SELECT pg_reload_conf()");
    psql(
        &source,
        "CREATE TABLE notes (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    );
    psql(
        &source,
        "INSERT INTO notes (id) SELECT generate_series(1, 100)",
    );

    let base = dir.path().join("restored");
    std::fs::create_dir_all(&base).unwrap();
    let out = Command::new(source.bin_dir().join("pg_basebackup"))
        .args([
            "-d",
            &source.url("postgres"),
            "-X",
            "none",
            "-c",
            "fast",
            "-D",
        ])
        .arg(base.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Rows 101..200 commit before T, 201..300 after.
    psql(
        &source,
        "INSERT INTO notes (id) SELECT generate_series(101, 200)",
    );
    let target = psql(&source, "SELECT clock_timestamp()");
    // The next commit must be stamped after T: wait until the server's clock has passed it.
    eventually(
        "the server's clock to pass T",
        Duration::from_secs(5),
        async || {
            (psql(&source, &format!("SELECT clock_timestamp() > '{target}'")) == "t").then_some(())
        },
    )
    .await;
    psql(
        &source,
        "INSERT INTO notes (id) SELECT generate_series(201, 300)",
    );
    let last = psql(&source, "SELECT pg_walfile_name(pg_switch_wal())");
    eventually_explained(
        "the last segment to be archived",
        Duration::from_secs(30),
        async || {
            let archived = psql(
                &source,
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            );
            (archived.as_str() >= last.as_str()).then_some(())
        },
        || {
            format!(
                "{}\n{}",
                psql(&source, "SELECT * FROM pg_stat_archiver"),
                std::fs::read_to_string(source.dir().join("postgres.log")).unwrap_or_default()
            )
        },
    )
    .await;
    assert_eq!(
        psql(&source, "SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "no push failed"
    );

    // The archive runs without gaps up to the last segment.
    let verified = rollcall(&["repo", "verify", "--repo", &repo_url]);
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success() && text.contains(&format!(".. {last}")),
        "{verified:?}"
    );

    // The same segment again: a success; other bytes under its name: refused.
    let segment = dir.path().join(&last);
    std::fs::copy(source.dir().join("data/pg_wal").join(&last), &segment).unwrap();
    let again = rollcall(&[
        "repo",
        "wal-push",
        "--repo",
        &repo_url,
        segment.to_str().unwrap(),
    ]);
    assert!(
        again.status.success()
            && String::from_utf8_lossy(&again.stdout).contains("already archived"),
        "{again:?}"
    );
    flip_last_byte(&segment);
    let other = rollcall(&[
        "repo",
        "wal-push",
        "--repo",
        &repo_url,
        segment.to_str().unwrap(),
    ]);
    fails_with(
        &other,
        &[
            "already archived",
            "with other contents",
            "nothing was written",
        ],
    );
    // A name the repository lacks: exit 1, which ends recovery.
    let missing = rollcall(&[
        "repo",
        "wal-fetch",
        "--repo",
        &repo_url,
        "0000000100000000000000FE",
        dir.path().join("fetched").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    fails_with(&missing, &["not in the repository"]);
    assert!(!dir.path().join("fetched").exists());
    drop(source);

    // Recover the base backup to T from the repository alone.
    let data = base.join("data");
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    conf.push_str(&format!(
        "restore_command = '{} repo wal-fetch --repo {repo_url} %f %p'\n\
         recovery_target_time = '{target}'\n\
         recovery_target_action = 'promote'\n\
         archive_mode = 'off'\n",
        bin.display()
    ));
    std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    give_to_postgres(&base);
    let restored = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(base.clone()),
        settings: Vec::new(),
    })
    .unwrap();
    eventually(
        "the restored server to promote",
        Duration::from_secs(30),
        async || (psql(&restored, "SELECT pg_is_in_recovery()") == "f").then_some(()),
    )
    .await;
    assert_eq!(
        psql(&restored, "SELECT count(*), min(id), max(id) FROM notes"),
        "200|1|200",
        "every row committed at or before T, none after"
    );
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}
