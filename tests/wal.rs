//! Point-in-time recovery with a real Postgres 15: `rollcall repo wal-push` as the server's
//! archive_command, `rollcall repo base-backup` (pg_basebackup's tar streamed into the
//! repository, no WAL in it: every WAL byte comes from the archive), then `rollcall repo
//! restore-postgres --to-time T --data-dir DIR` writes a data directory recovered to a time
//! between two commits (with `rollcall repo wal-fetch` as restore_command): every row committed
//! at or before T is there, none after, and it starts on another port. And the refusals: the
//! same segment pushed twice is fine, other bytes under an archived name are refused, a name
//! the repository lacks ends recovery (exit 1); a time before the first base backup or past
//! the archive, a data directory that is not empty and a damaged base backup are refused with
//! nothing written; a server that does not archive gets no base backup.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::*;
use ephemeral_pg::Cluster;

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

    let run = |args: &[&str]| {
        Command::new(&bin)
            .args(args)
            .env_remove("ROLLCALL_TOKEN")
            .output()
            .unwrap()
    };
    // A base backup killed while the server waits for its WAL to be archived commits nothing.
    psql(&source, "ALTER SYSTEM SET archive_command = 'false'");
    psql(&source, "SELECT pg_reload_conf()");
    let mut killed = Command::new(&bin)
        .args(["repo", "base-backup", "--repo", &repo_url, "--database-url"])
        .arg(source.url("postgres"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the base backup to wait for WAL archiving",
        Duration::from_secs(60),
        async || {
            (psql(
                &source,
                "SELECT count(*) FROM pg_stat_progress_basebackup \
                 WHERE phase ILIKE 'waiting for wal archiving%'",
            ) == "1")
                .then_some(())
        },
    )
    .await;
    killed.kill().unwrap();
    killed.wait().unwrap();
    psql(
        &source,
        &format!(
            "ALTER SYSTEM SET archive_command = '{} repo wal-push --repo {repo_url} %p'",
            bin.display()
        ),
    );
    psql(&source, "SELECT pg_reload_conf()");
    // Count the pushes that fail from here on, once one has succeeded with the restored
    // command (the segment the killed backup waited for).
    eventually(
        "a push to succeed after the failures",
        Duration::from_secs(60),
        async || {
            (psql(
                &source,
                "SELECT coalesce(last_archived_time > last_failed_time, false) \
                 FROM pg_stat_archiver",
            ) == "t")
                .then_some(())
        },
    )
    .await;
    psql(&source, "SELECT pg_stat_reset_shared('archiver')");
    let listed = run(&["repo", "base-backups", "--repo", &repo_url, "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["base_backups"], serde_json::json!([]), "{listed}");

    let before_base = psql(&source, NOW_RFC3339);
    let backed = run(&[
        "repo",
        "base-backup",
        "--repo",
        &repo_url,
        "--database-url",
        &source.url("postgres"),
        "--env",
        "dev",
    ]);
    assert!(backed.status.success(), "{backed:?}");
    let record: serde_json::Value = serde_json::from_slice(&backed.stdout).unwrap();
    let base_id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["timeline"], 1, "{record}");

    // Rows 101..200 commit before T, 201..300 after.
    psql(
        &source,
        "INSERT INTO notes (id) SELECT generate_series(101, 200)",
    );
    let target = psql(&source, NOW_RFC3339);
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

    // The window: from the base backup's consistent time to the newest segment's archiving.
    let listed = run(&["repo", "base-backups", "--repo", &repo_url, "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let window = &listed["window"];
    assert_eq!(window["earliest"], record["consistent_at"], "{listed}");
    assert_eq!(window["base_backups"], 1, "{listed}");
    assert_eq!(window["gap_at"], serde_json::Value::Null, "{listed}");
    assert!(
        window["newest_segment"].as_str().unwrap() >= last.as_str(),
        "{listed}"
    );

    // The coordinator's `rollcall points` shows the same window for the environment the base
    // backup was taken under, and none for another.
    let coordinator = coordinator_for(dir.path(), &repo).await;
    let listing = coordinator
        .handle
        .engine
        .list_points(Some("dev"))
        .await
        .unwrap();
    assert_eq!(listing.windows.len(), 1, "{:?}", listing.windows);
    let (env, shown) = &listing.windows[0];
    assert_eq!(env, "dev");
    assert_eq!(
        serde_json::to_value(shown.earliest).unwrap(),
        record["consistent_at"]
    );
    assert_eq!(shown.base_backups, 1);
    let other = coordinator
        .handle
        .engine
        .list_points(Some("other"))
        .await
        .unwrap();
    assert!(other.windows.is_empty(), "{:?}", other.windows);
    coordinator.stop().await;

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

    // Recover the base backup to T from the repository alone, into a directory that does not
    // exist yet (its parent belongs to the user the server runs as).
    let base = dir.path().join("restored");
    std::fs::create_dir_all(&base).unwrap();
    give_to_postgres(&base);
    let data = base.join("data");
    let target_utc = target.clone();
    // Killed while its recovery server runs: nothing at DIR; the next restore stops the
    // orphaned server and starts over.
    let mut killed = Command::new(&bin)
        .args(["repo", "restore-postgres", "--repo", &repo_url, "--to-time"])
        .arg(&target_utc)
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let partial = base.join(".data.rollcall-partial");
    eventually(
        "the recovery server to run",
        Duration::from_secs(120),
        async || partial.join("postmaster.pid").exists().then_some(()),
    )
    .await;
    killed.kill().unwrap();
    killed.wait().unwrap();
    let orphan: i32 = std::fs::read_to_string(partial.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!data.exists(), "nothing at DIR after the kill");
    let restored = run(&[
        "repo",
        "restore-postgres",
        "--repo",
        &repo_url,
        "--to-time",
        &target_utc,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(restored.status.success(), "{restored:?}");
    let report: serde_json::Value = serde_json::from_slice(&restored.stdout).unwrap();
    assert_eq!(report["base_backup"], base_id.as_str(), "{report}");
    assert_eq!(report["recovered"], true, "{report}");
    assert_eq!(report["timeline"], 2, "{report}");
    assert!(
        report["verified"]
            .as_str()
            .unwrap()
            .contains("pg_verifybackup"),
        "{report}"
    );
    assert!(!data.join("recovery.signal").exists(), "recovery ended");
    assert!(!partial.exists());
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(orphan), None).is_err(),
        "the killed restore's recovery server was stopped"
    );
    let restored = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(base.clone()),
        settings: Vec::new(),
    })
    .unwrap();
    assert_eq!(psql(&restored, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(
        psql(&restored, "SELECT count(*), min(id), max(id) FROM notes"),
        "200|1|200",
        "every row committed at or before T ({target_utc}), none after: {report}\n{}",
        std::fs::read_to_string(base.join("data.rollcall-recovery.log")).unwrap_or_default()
    );
    // The restored copy does not archive into the production repository.
    assert_eq!(psql(&restored, "SHOW archive_mode"), "off");
    let not_archiving = run(&[
        "repo",
        "base-backup",
        "--repo",
        &repo_url,
        "--database-url",
        &restored.url("postgres"),
    ]);
    fails_with(
        &not_archiving,
        &["does not archive its WAL", "archive_mode"],
    );
    drop(restored);

    // Refusals, each leaving nothing behind.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    give_to_postgres(&elsewhere);
    let attempt = |at: &str, into: &Path| {
        run(&[
            "repo",
            "restore-postgres",
            "--repo",
            &repo_url,
            "--to-time",
            at,
            "--data-dir",
            into.to_str().unwrap(),
        ])
    };
    let early = attempt(&before_base, &elsewhere.join("early"));
    fails_with(&early, &["before the earliest time", &base_id]);
    let late = attempt("2999-01-01T00:00:00Z", &elsewhere.join("late"));
    fails_with(&late, &["later than the archived WAL reaches"]);
    let occupied = elsewhere.join("occupied");
    std::fs::create_dir_all(&occupied).unwrap();
    std::fs::write(occupied.join("keep.txt"), "mine").unwrap();
    fails_with(&attempt(&target_utc, &occupied), &["is not empty"]);
    assert_eq!(
        std::fs::read_to_string(occupied.join("keep.txt")).unwrap(),
        "mine"
    );
    let body = repo.join(record["key"].as_str().unwrap());
    flip_last_byte(&body);
    fails_with(
        &attempt(&target_utc, &elsewhere.join("damaged")),
        &["does not match", "damaged"],
    );
    let checked = run(&["repo", "verify", "--repo", &repo_url, "--full"]);
    fails_with(&checked, &["failed verification"]);
    assert!(
        String::from_utf8_lossy(&checked.stdout)
            .contains(&format!("damaged  base backup {base_id}: its body")),
        "{checked:?}"
    );
    let mut left: Vec<_> = std::fs::read_dir(&elsewhere)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["occupied"], "no partial directory or tar left");
}

/// An in-process coordinator with environments `dev` and `other` on the repository in
/// `repository`.
async fn coordinator_for(dir: &Path, repository: &Path) -> InProcessCoordinator {
    install_crypto();
    let certs = certs(&dir.join("certs"), &["objects-1:objects"]);
    let state_url = format!("sqlite://{}/state.db", dir.display());
    let environments = ["dev", "other"]
        .into_iter()
        .map(|name| {
            let fleet = [("web", 1), ("worker", 1), ("objects", 1)];
            let plan = include_str!("plans/objects-only.toml");
            (
                name.to_owned(),
                test_environment(name, &fleet, repository, plan),
            )
        })
        .collect();
    InProcessCoordinator::start_full(
        &certs,
        &state_url,
        Duration::from_secs(5),
        Duration::from_millis(200),
        environments,
    )
    .await
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// `rollcall repo wal-push` SIGKILLed at moments spread over its run (real processes): after
/// each kill, `wal-fetch` gives either nothing (exit 1: recovery would end there) or the whole
/// segment, never a part or other bytes; the archiver's next push of the same file succeeds;
/// and at the end the repository serves the segment byte for byte.
#[test]
fn a_wal_push_killed_at_any_moment_leaves_the_whole_segment_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bin = rollcall_bin();
    let bin = bin.as_path();
    let repo_url = format!("file://{}", dir.path().join("repo").display());
    let pg_wal = dir.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    // 16 MiB that do not compress, so a push takes long enough to be killed inside it.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let body: Vec<u8> = (0..16 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    let fetch = |name: &str| {
        let dest = dir.path().join("fetched");
        let _ = std::fs::remove_file(&dest);
        let out = Command::new(bin)
            .args(["repo", "wal-fetch", "--repo", &repo_url, name])
            .arg(&dest)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| std::fs::read(&dest).unwrap())
            .or_else(|| {
                assert_eq!(out.status.code(), Some(1), "{out:?}");
                None
            })
    };
    // How long a whole push takes here: the kills are spread over it, and a little past it.
    let first = pg_wal.join("00000001000000000000000F");
    std::fs::write(&first, &body).unwrap();
    let started = std::time::Instant::now();
    let whole = Command::new(bin)
        .args(["repo", "wal-push", "--repo", &repo_url])
        .arg(&first)
        .output()
        .unwrap();
    assert!(whole.status.success(), "{whole:?}");
    let took = started.elapsed().as_millis() as u64;
    let mut fetched_whole = 0;
    let delays = [0u64, 5, 15, 30, 45, 60, 75, 90, 110].map(|percent| took * percent / 100);
    for (i, delay_ms) in delays.into_iter().enumerate() {
        let name = format!("0000000100000000000000{:02X}", 0x10 + i);
        let path = pg_wal.join(&name);
        std::fs::write(&path, &body).unwrap();
        let mut push = Command::new(bin)
            .args(["repo", "wal-push", "--repo", &repo_url])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // Child::kill is SIGKILL: nothing of the push runs after it.
        let _ = push.kill();
        push.wait().unwrap();
        match fetch(&name) {
            None => {}
            Some(got) => {
                assert!(got == body, "push killed after {delay_ms} ms: other bytes");
                fetched_whole += 1;
            }
        }
        // The archiver's retry.
        let again = Command::new(bin)
            .args(["repo", "wal-push", "--repo", &repo_url])
            .arg(&path)
            .output()
            .unwrap();
        assert!(again.status.success(), "after {delay_ms} ms: {again:?}");
        assert!(
            fetch(&name).is_some_and(|got| got == body),
            "after the retry of a push killed after {delay_ms} ms"
        );
    }
    // Where the kills land against the commit varies with the machine; what holds everywhere:
    // no kill ever left a fetchable part.
    eprintln!(
        "a whole push took {took} ms; {fetched_whole} of 9 killed pushes had committed before \
         the kill"
    );
}
