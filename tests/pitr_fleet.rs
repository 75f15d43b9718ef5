//! The fleet path of a restore to a time: `rollcall drill --env ENV --to-time T` against real
//! processes over mTLS (coordinator, a database agent with `[postgres.physical]`, an objects
//! agent) and a real Postgres 15 that archives its WAL into the repository with `rollcall repo
//! wal-push`. Rows are written before and after T, objects snapshotted before and after it.
//!
//! * A time before the first base backup is refused at start, naming the window; nothing
//!   changes (same server process, same data directory, no run).
//! * The commit fails (the restored server's start is made to fail once): the previous data
//!   directory is back in place and its server runs with every row, the recovered one is kept
//!   under its `restore_` name, the run blocks.
//! * `run retry` then swaps: every row committed at or before T is there and none after, the
//!   server answers on the same port, the previous data directory is kept as `DIR.pre_<tag>`,
//!   the objects are the newest snapshot's at or before T, and the report names T, the base
//!   backup and the kept directory.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::*;
use ephemeral_pg::Cluster;

fn psql(cluster: &Cluster, db: &str, sql: &str) -> String {
    cluster.psql(db, sql).unwrap().trim().to_owned()
}

fn ids(cluster: &Cluster) -> Vec<i64> {
    psql(cluster, "app", "SELECT id FROM notes ORDER BY id")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn postmaster_pid(data: &Path) -> String {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

/// Waits until the server's clock is past `t`, so the next commit is stamped after it.
async fn after(cluster: &Cluster, t: &str) {
    eventually(
        "the server's clock to pass a time",
        Duration::from_secs(5),
        async || {
            (psql(cluster, "app", &format!("SELECT clock_timestamp() > '{t}'")) == "t")
                .then_some(())
        },
    )
    .await;
}

/// A directory of the server's tools whose `pg_ctl start` of `live` fails while `switch`
/// exists and `live` holds a restored directory (`backup_manifest`), then removes `switch`:
/// the swap's start of the recovered server fails once; the start of the previous one works.
fn failing_start_tools(dir: &Path, real: &Path, live: &Path, switch: &Path) -> PathBuf {
    let bin = dir.join("pg-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for entry in std::fs::read_dir(real).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "pg_ctl" {
            std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
        }
    }
    let wrapper = bin.join("pg_ctl");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             dir=; prev=; start=\n\
             for a in \"$@\"; do\n  \
               [ \"$prev\" = -D ] && dir=\"$a\"\n  \
               [ \"$a\" = start ] && start=1\n  \
               prev=\"$a\"\n\
             done\n\
             if [ -n \"$start\" ] && [ \"$dir\" = {live} ] && [ -e {live}/backup_manifest ] && [ -e {switch} ]; then\n  \
               rm -f {switch}\n  \
               echo 'pg_ctl: could not start server (injected by the test)' >&2\n  \
               exit 1\n\
             fi\n\
             exec {real}/pg_ctl \"$@\"\n",
            live = live.display(),
            switch = switch.display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// The live object store of the test: a directory (the snapshot rule) or a versioned bucket
/// on moto (the versions rule).
enum Store {
    Dir(PathBuf),
    Bucket(Moto),
}

impl Store {
    fn url(&self) -> String {
        match self {
            Store::Dir(dir) => format!("file://{}", dir.display()),
            Store::Bucket(_) => "s3://live/app".to_owned(),
        }
    }

    /// `[objects]` connection settings, and the CLI flags that say the same.
    fn s3_config(&self) -> (String, Vec<String>) {
        match self {
            Store::Dir(_) => (String::new(), Vec::new()),
            Store::Bucket(moto) => (
                format!(
                    "s3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\ns3_path_style = true\n",
                    moto.endpoint()
                ),
                vec![
                    "--s3-endpoint".into(),
                    moto.endpoint(),
                    "--s3-region".into(),
                    "us-east-1".into(),
                    "--s3-path-style".into(),
                ],
            ),
        }
    }

    fn put(&self, key: &str, body: &[u8]) {
        match self {
            Store::Dir(dir) => std::fs::write(dir.join(key), body).unwrap(),
            Store::Bucket(moto) => moto.request("PUT", &format!("/live/app/{key}"), body, "200"),
        }
    }

    fn delete(&self, key: &str) {
        match self {
            Store::Dir(dir) => std::fs::remove_file(dir.join(key)).unwrap(),
            Store::Bucket(moto) => moto.request("DELETE", &format!("/live/app/{key}"), b"", "204"),
        }
    }

    /// Every key and its body.
    fn objects(&self, keys: &[&str]) -> std::collections::BTreeMap<String, Vec<u8>> {
        match self {
            Store::Dir(dir) => fleet::live_objects(dir),
            Store::Bucket(moto) => keys
                .iter()
                .filter_map(|k| {
                    moto.get(&format!("/live/app/{k}"))
                        .map(|b| ((*k).to_owned(), b))
                })
                .collect(),
        }
    }

    fn rule(&self) -> &'static str {
        match self {
            Store::Dir(_) => "snapshot",
            Store::Bucket(_) => "versions",
        }
    }
}

/// Moto checks no signature, but refuses a DELETE without credentials.
const MOTO_AUTH: &str = "AWS4-HMAC-SHA256 Credential=test/20261206/us-east-1/s3/aws4_request, \
                         SignedHeaders=host, Signature=00";

/// A moto S3 server with bucket `live`, versioning enabled.
struct Moto {
    child: std::process::Child,
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
            eprintln!(
                "SKIPPED: moto_server is not installed; the versioned-bucket drill did not run"
            );
            return None;
        }
        let port = free_addr().port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.request("PUT", "/live", b"", "200");
        moto.request(
            "PUT",
            "/live?versioning",
            br#"<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>"#,
            "200",
        );
        Some(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn send(&self, method: &str, path: &str, body: &[u8]) -> (String, Vec<u8>) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Authorization: {MOTO_AUTH}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(answer.len());
        let head = String::from_utf8_lossy(&answer[..split]).into_owned();
        let body = answer.get(split + 4..).unwrap_or_default().to_vec();
        (head, body)
    }

    fn request(&self, method: &str, path: &str, body: &[u8], status: &str) {
        let (head, _) = self.send(method, path, body);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{method} {path}: {head}"
        );
    }

    fn get(&self, path: &str) -> Option<Vec<u8>> {
        let (head, body) = self.send("GET", path, b"");
        head.starts_with("HTTP/1.1 200").then_some(body)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_drill_to_a_time_restores_postgres_and_objects_from_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("objects");
    std::fs::create_dir_all(&store).unwrap();
    drill_to_a_time(dir, Store::Dir(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_drill_to_a_time_restores_postgres_and_a_versioned_bucket() {
    let Some(moto) = Moto::start() else {
        return;
    };
    drill_to_a_time(tempfile::tempdir().unwrap(), Store::Bucket(moto)).await;
}

/// The data directories `rollcall kept list` shows: kind, path and the run's state.
fn kept_dirs(run: &dyn Fn(&[&str]) -> std::process::Output) -> Vec<(String, String, String)> {
    let out = run(&["kept", "list", "--env", "test", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listing["problems"], serde_json::json!([]), "{listing:#}");
    listing["copies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"].as_str().unwrap().starts_with("data_dir"))
        .map(|c| {
            assert!(c["bytes"].as_u64().unwrap() > 1_000_000, "{c}");
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["name"].as_str().unwrap().to_owned(),
                c["run_state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn drill_to_a_time(dir: tempfile::TempDir, store: Store) {
    install_crypto();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A rollcall binary the postgres user may run (archive and restore commands).
    let bin = runnable_rollcall(dir.path());
    let repo = dir.path().join("repository");
    std::fs::create_dir_all(&repo).unwrap();
    give_to_postgres(&repo);
    let repo_url = format!("file://{}", repo.display());
    let store_url = store.url();
    let (s3_config, s3_flags) = store.s3_config();
    // Moto takes any credentials; the agents and the CLI read them from the environment.
    let s3_env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];

    let pg_root = dir.path().join("pg");
    let cluster = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(pg_root.clone()),
        settings: vec![
            ("wal_level".into(), "replica".into()),
            ("archive_mode".into(), "on".into()),
        ],
    })
    .unwrap();
    let live = pg_root.join("data");
    let port = cluster.port();
    psql(
        &cluster,
        "postgres",
        &format!(
            "ALTER SYSTEM SET archive_command = '{} repo wal-push --repo {repo_url} %p'",
            bin.display()
        ),
    );
    psql(&cluster, "postgres", "SELECT pg_reload_conf()");
    cluster.create_database("app").unwrap();
    psql(&cluster, "postgres", "CREATE ROLE app LOGIN");
    psql(
        &cluster,
        "app",
        "CREATE TABLE notes (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    );
    psql(&cluster, "app", "GRANT ALL ON notes TO app");
    psql(
        &cluster,
        "app",
        "INSERT INTO notes (id) SELECT generate_series(1, 100)",
    );

    let cli = |args: &[&str]| {
        let out = Command::new(&bin).args(args).envs(s3_env).output().unwrap();
        assert!(out.status.success(), "rollcall {args:?}: {out:?}");
        out
    };
    cli(&[
        "repo",
        "base-backup",
        "--repo",
        &repo_url,
        "--database-url",
        &cluster.url("postgres"),
        "--env",
        "test",
    ]);
    let base_json: serde_json::Value = serde_json::from_slice(
        &cli(&["repo", "base-backups", "--repo", &repo_url, "--json"]).stdout,
    )
    .unwrap();
    let base_id = base_json["base_backups"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Objects: a.txt before T, b.txt before T (snapshotted after it), c.txt and a.txt's
    // deletion after T.
    let snapshot = || {
        let mut args = vec![
            "repo", "snapshot", "--repo", &repo_url, "--env", "test", "--store", &store_url,
        ];
        args.extend(s3_flags.iter().map(String::as_str));
        cli(&args);
    };
    store.put("a.txt", b"a at first");
    snapshot();
    psql(
        &cluster,
        "app",
        "INSERT INTO notes (id) SELECT generate_series(101, 110)",
    );
    store.put("b.txt", b"b before T");
    snapshot();
    let target = psql(&cluster, "app", NOW_RFC3339);
    after(&cluster, &target).await;
    // The snapshot rule's snapshot must have finished at or before T: the next one starts
    // after it (snapshot ids are stamped to the second), so wait for the clock to leave T's
    // second.
    let t_second = chrono::DateTime::parse_from_rfc3339(&target)
        .unwrap()
        .timestamp();
    eventually(
        "the clock past T's second",
        Duration::from_secs(10),
        async || (chrono::Utc::now().timestamp() > t_second).then_some(()),
    )
    .await;
    psql(
        &cluster,
        "app",
        "INSERT INTO notes (id) SELECT generate_series(111, 120)",
    );
    store.put("c.txt", b"c after T");
    store.delete("a.txt");
    snapshot();
    let last = psql(&cluster, "app", "SELECT pg_walfile_name(pg_switch_wal())");
    eventually(
        "the last segment to be archived",
        Duration::from_secs(30),
        async || {
            let archived = psql(
                &cluster,
                "postgres",
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            );
            (archived.as_str() >= last.as_str()).then_some(())
        },
    )
    .await;

    // The fleet.
    let certs = certs_init(
        dir.path(),
        &["worker-1:worker", "db-1:database", "obj-1:objects"],
    );
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    // The built-in default plan, fitted to a fleet of a worker (a stand-in process the run
    // scales to zero around the swap), a database and an objects agent.
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, include_str!("../deploy/plans/default.toml")).unwrap();
    let env = format!(
        r#"
    [environments.test]
    rpo = "1h"
    rto = "1h"
    retention = "7days"
    repository = "{repo_url}"
    plan = "{plan}"
    fleet = {{ worker = 1, database = 1, objects = 1 }}
    "#,
        plan = plan.display()
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let mut procs = vec![spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &[],
    )];
    let switch = pg_root.join("fail-next-start");
    let tools = failing_start_tools(dir.path(), cluster.bin_dir(), &live, &switch);
    let db = format!(
        "[postgres]\nurl_env = \"DATABASE_URL\"\nbin_dir = \"{tools}\"\n\
         [postgres.freeze]\nroles = [\"app\"]\n\
         [postgres.physical]\ndata_dir = \"{live}\"\nrun_as = \"postgres\"\nrollcall = \"{bin}\"\n",
        tools = tools.display(),
        live = live.display(),
        bin = bin.display()
    );
    let obj =
        format!("[objects]\nurl = \"{store_url}\"\nscratch_dir = \"scratch/obj-1\"\n{s3_config}");
    let db_url = cluster.url("app");
    let worker = "[control]\nscale = \"process\"\n[control.process]\nprogram = \"/bin/sleep\"\n\
                  args = [\"600\"]\nstop_grace = \"2s\"\n[smoke]\ncommand = [\"/bin/true\"]\n\
                  timeout = \"30s\"\n";
    for (name, role, extra) in [
        ("worker-1", "worker", worker),
        ("db-1", "database", db.as_str()),
        ("obj-1", "objects", obj.as_str()),
    ] {
        let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, extra);
        procs.push(spawn_rollcall(
            name,
            dir.path(),
            &["agent", "--config", cfg.to_str().unwrap()],
            &[
                ("DATABASE_URL", db_url.as_str()),
                s3_env[0],
                s3_env[1],
                s3_env[2],
            ],
        ));
    }
    fleet_ready(
        operator_addr,
        &certs,
        &["worker-1", "db-1", "obj-1"],
        dir.path(),
        Duration::from_secs(60),
    )
    .await;
    let operator = format!("https://127.0.0.1:{}", operator_addr.port());
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--coordinator",
            &operator,
            "--certs",
            certs.to_str().unwrap(),
        ]);
        rollcall(&all)
    };

    // Refused: a time before the first base backup, with the window named; nothing changed.
    let pid = postmaster_pid(&live);
    let early = run(&[
        "drill",
        "--env",
        "test",
        "--to-time",
        "2020-01-01T00:00:00Z",
    ]);
    fails_with(
        &early,
        &[
            "outside environment test's recoverable window",
            "nothing was started",
        ],
    );
    let both = run(&[
        "drill",
        "--env",
        "test",
        "--to-time",
        &target,
        "--point",
        "latest",
    ]);
    assert!(!both.status.success(), "{both:?}");
    let listed = run(&["runs", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    assert_eq!(postmaster_pid(&live), pid, "the server was not touched");
    assert_eq!(ids(&cluster).len(), 120);

    // The dry run names the time and the window.
    let dry = run(&["drill", "--env", "test", "--to-time", &target, "--dry-run"]);
    let dry_text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success(), "{dry:?}");
    assert!(
        dry_text.contains("to time") && dry_text.contains("inside the recoverable window"),
        "{dry_text}"
    );

    // The commit fails once: the previous server is back with every row.
    std::fs::write(&switch, b"").unwrap();
    give_to_postgres(&switch);
    let failed = run(&[
        "drill",
        "--env",
        "test",
        "--to-time",
        &target,
        "--watch",
        "--json",
    ]);
    assert!(
        !failed.status.success(),
        "{failed:?}\n{}",
        log_tails(dir.path(), 40)
    );
    assert!(!switch.exists(), "the restored server's start was tried");
    let listed: serde_json::Value =
        serde_json::from_slice(&run(&["runs", "--json"]).stdout).unwrap();
    let run_id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["state"], "blocked", "{listed}");
    let tag = fleet::run_tag(&run_id);
    assert_eq!(
        ids(&cluster),
        (1..=120).collect::<Vec<_>>(),
        "the previous server runs with every row"
    );
    assert!(
        !live.join("backup_manifest").exists(),
        "the previous directory is live"
    );
    let restored_dir = pg_root.join(format!("data.restore_{tag}"));
    let kept_dir = pg_root.join(format!("data.pre_{tag}"));
    assert!(
        restored_dir.join("PG_VERSION").exists(),
        "the recovered directory is kept"
    );
    assert!(!kept_dir.exists());
    assert_eq!(cluster.port(), port);
    // `kept list` shows the recovered directory the blocked run left, by path.
    let kept = kept_dirs(&run);
    assert_eq!(
        kept,
        [(
            "data_dir_prepared".to_owned(),
            restored_dir.display().to_string(),
            "blocked".to_owned()
        )],
        "{kept:?}"
    );

    // Retried: the swap goes through.
    let retried = run(&["run", "retry", &run_id, "--detach"]);
    assert!(retried.status.success(), "{retried:?}");
    eventually_explained(
        "the retried run to succeed",
        Duration::from_secs(180),
        async || {
            let out = run(&["run", "show", &run_id, "--json"]);
            let show: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            match show["run"]["state"].as_str()? {
                "succeeded" => Some(()),
                "blocked" | "failed" | "aborted" => panic!(
                    "run {run_id} ended {}: {}\n{}",
                    show["run"]["state"],
                    show["run"]["reason"],
                    log_tails(dir.path(), 40)
                ),
                _ => None,
            }
        },
        || log_tails(dir.path(), 40),
    )
    .await;

    // Rows: every one committed at or before T, none after; the same port answers.
    assert_eq!(ids(&cluster), (1..=110).collect::<Vec<_>>());
    assert_eq!(
        psql(
            &cluster,
            "app",
            &format!("SELECT count(*) FROM notes WHERE at > '{target}'")
        ),
        "0"
    );
    assert!(
        live.join("backup_manifest").exists(),
        "the recovered directory is live"
    );
    assert!(
        kept_dir.join("PG_VERSION").exists(),
        "the previous directory is kept"
    );
    assert!(!restored_dir.exists());
    // The previous directory is a kept copy of the run, and a prune keeps it (the newest
    // finished restore's).
    assert_eq!(
        kept_dirs(&run),
        [(
            "data_dir_pre".to_owned(),
            kept_dir.display().to_string(),
            "succeeded".to_owned()
        )]
    );
    let pruned = run(&[
        "kept",
        "prune",
        "--env",
        "test",
        "--keep-last",
        "0",
        "--json",
    ]);
    assert!(pruned.status.success(), "{pruned:?}");
    assert!(kept_dir.join("PG_VERSION").exists(), "{pruned:?}");
    // An undo cannot take a data directory swap back (yet): refused, naming the kept directory,
    // and no undo run starts.
    let undo = run(&["run", "undo", &run_id, "--force"]);
    assert!(!undo.status.success(), "{undo:?}");
    let err = String::from_utf8_lossy(&undo.stderr);
    assert!(
        err.contains("an undo cannot take back yet") && err.contains(&format!(".pre_{tag}")),
        "{err}"
    );
    // The restored server is writable (unfrozen) and archives on its new timeline.
    psql(&cluster, "app", "INSERT INTO notes (id) VALUES (1000)");
    let timeline: u32 = psql(
        &cluster,
        "postgres",
        "SELECT timeline_id FROM pg_control_checkpoint()",
    )
    .parse()
    .unwrap();
    assert!(timeline > 1, "a new timeline: {timeline}");
    let history = repo.join(format!("wal/history/{timeline:08X}.history.json"));
    eventually_explained(
        "the new timeline's history file to be archived",
        Duration::from_secs(30),
        async || history.exists().then_some(()),
        || {
            format!(
                "{}\n{:?}",
                psql(&cluster, "postgres", "SELECT * FROM pg_stat_archiver"),
                std::fs::read_dir(repo.join("wal/history")).map(|d| d
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>())
            )
        },
    )
    .await;

    // The window goes on along the new timeline (no new base backup): a segment the restored
    // server archives extends it, as recovery from the old base backup would follow it.
    let switched = psql(
        &cluster,
        "postgres",
        "SELECT pg_walfile_name(pg_switch_wal())",
    );
    assert!(
        switched.starts_with(&format!("{timeline:08X}")),
        "{switched} on timeline {timeline}"
    );
    eventually_explained(
        "the window to reach the new timeline's segment",
        Duration::from_secs(60),
        async || {
            let out = run(&["points", "--env", "test", "--json"]);
            let points: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let window = &points["windows"][0];
            (window["newest_segment"].as_str()? >= switched.as_str() && window["gap_at"].is_null())
                .then_some(())
        },
        || String::from_utf8_lossy(&run(&["points", "--env", "test", "--json"]).stdout).into(),
    )
    .await;

    // Objects: the newest snapshot finished at or before T.
    let live_objects = store.objects(&["a.txt", "b.txt", "c.txt"]);
    let names: Vec<&String> = live_objects.keys().collect();
    assert_eq!(names, ["a.txt", "b.txt"], "{live_objects:?}");
    assert_eq!(live_objects["a.txt"], b"a at first");

    // The report names T, the base backup and the kept directory.
    let report = run(&["report", &run_id, "--format", "json"]);
    assert!(report.status.success(), "{report:?}");
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let t = &report["target"]["to_time"];
    assert_eq!(t["base_backup"], base_id.as_str(), "{report}");
    assert!(
        t["note"].as_str().unwrap().contains("counts not recorded"),
        "{report}"
    );
    assert!(t["kept_dir"].as_str().is_some(), "{report}");
    assert!(
        t["objects_rule"]
            .as_str()
            .unwrap()
            .starts_with(store.rule()),
        "{report}"
    );
    // The snapshot rule reports its uncertainty window; versions have none.
    assert_eq!(
        t["objects_uncertainty"].as_str().is_some(),
        store.rule() == "snapshot",
        "{report}"
    );
    let md = run(&["report", &run_id]);
    let md = String::from_utf8_lossy(&md.stdout).into_owned();
    assert!(
        md.contains("Restored to a time") && md.contains(&base_id),
        "{md}"
    );

    for p in &mut procs {
        p.terminate(Duration::from_secs(10));
    }
    drop(cluster);
}
