//! Scheduled base backups and the RPO of point-in-time recovery, against real processes over
//! mTLS (coordinator, a database agent with `[postgres.physical]`, a worker) and a real
//! Postgres 15 that archives its WAL into the repository with `rollcall repo wal-push`.
//!
//! * `base_backup_schedule = "*/3 * * * * *"` takes base backups on its own: backup runs of the
//!   built-in base-backup plan, each naming its base backup, which `rollcall repo base-backups`
//!   and `rollcall points --env` list under the environment.
//! * A drill to a time after a scheduled base backup restores from it: every row committed at
//!   or before T and none after (scheduled slots that meet the drill are skipped, and the drill
//!   waits for a running base backup to finish).
//! * `rollcall backup --env ENV --base --wait` takes one on demand; a database agent without
//!   `[postgres.physical]` refuses with a line naming it.
//! * `/metrics` shows the window: from the oldest base backup, until the newest archived
//!   segment, its age small after a `pg_switch_wal()`, and growing once archiving stops.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
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

/// The value of one sample line of a scrape (`name{labels}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Waits until the server has archived the segment it switched away from.
async fn switch_and_archive(cluster: &Cluster) -> String {
    let last = psql(cluster, "app", "SELECT pg_walfile_name(pg_switch_wal())");
    eventually(
        "the switched segment to be archived",
        Duration::from_secs(60),
        async || {
            let archived = psql(
                cluster,
                "postgres",
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            );
            (archived.as_str() >= last.as_str()).then_some(())
        },
    )
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_base_backups_open_a_window_a_drill_restores_into_and_its_rpo_is_served() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = runnable_rollcall(dir.path());
    let repo = dir.path().join("repository");
    std::fs::create_dir_all(&repo).unwrap();
    give_to_postgres(&repo);
    let repo_url = format!("file://{}", repo.display());
    // plain archives nothing, yet base backups are scheduled only into a repository of their
    // own: plain has another.
    std::fs::create_dir_all(dir.path().join("repository-plain")).unwrap();

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

    // The fleet: test takes base backups every 3 seconds; plain's database agent has no
    // [postgres.physical].
    let certs = certs_init(
        dir.path(),
        &["worker-1:worker", "db-1:database", "db-2:database"],
    );
    let (agents_addr, operator_addr, metrics_addr) = (free_addr(), free_addr(), free_addr());
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, include_str!("../deploy/plans/default.toml")).unwrap();
    let env = format!(
        r#"
[metrics]
observe_interval = "1s"

[environments.test]
rpo = "1h"
rto = "1h"
retention = "7days"
repository = "{repo_url}"
plan = "{plan}"
base_backup_schedule = "*/3 * * * * *"
fleet = {{ worker = 1, database = 1 }}

[environments.plain]
rpo = "1h"
rto = "1h"
retention = "7days"
repository = "{repo_url}-plain"
plan = "{plan}"
fleet = {{ worker = 1, database = 1 }}
"#,
        plan = plan.display()
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[tls]",
        &format!("metrics = \"{metrics_addr}\"\n\n[tls]"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let mut procs = vec![spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &[],
    )];
    let db = format!(
        "[postgres]\nurl_env = \"DATABASE_URL\"\nbin_dir = \"{tools}\"\n\
         [postgres.freeze]\nroles = [\"app\"]\n\
         [postgres.physical]\ndata_dir = \"{live}\"\nrun_as = \"postgres\"\nrollcall = \"{bin}\"\n",
        tools = cluster.bin_dir().display(),
        live = live.display(),
        bin = bin.display()
    );
    let plain_db = format!(
        "[postgres]\nurl_env = \"DATABASE_URL\"\nbin_dir = \"{}\"\n",
        cluster.bin_dir().display()
    );
    let db_url = cluster.url("app");
    let worker = "[control]\nscale = \"process\"\n[control.process]\nprogram = \"/bin/sleep\"\n\
                  args = [\"600\"]\nstop_grace = \"2s\"\n[smoke]\ncommand = [\"/bin/true\"]\n\
                  timeout = \"30s\"\n";
    for (name, role, extra) in [
        ("worker-1", "worker", worker),
        ("db-1", "database", db.as_str()),
        ("db-2", "database", plain_db.as_str()),
    ] {
        let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, extra);
        if name == "db-2" {
            let text = std::fs::read_to_string(&cfg)
                .unwrap()
                .replace("environment = \"test\"", "environment = \"plain\"");
            std::fs::write(&cfg, text).unwrap();
        }
        procs.push(spawn_rollcall(
            name,
            dir.path(),
            &["agent", "--config", cfg.to_str().unwrap()],
            &[("DATABASE_URL", db_url.as_str())],
        ));
    }
    fleet_ready(
        operator_addr,
        &certs,
        &["worker-1", "db-1", "db-2"],
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
    let base_backups = || -> Vec<serde_json::Value> {
        let out = Command::new(&bin)
            .args(["repo", "base-backups", "--repo", &repo_url, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listed["base_backups"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };

    // Scheduled base backups come on their own, recorded under the environment.
    eventually_explained(
        "two scheduled base backups",
        Duration::from_secs(120),
        async || (base_backups().len() >= 2).then_some(()),
        || log_tails(dir.path(), 40),
    )
    .await;
    let first = base_backups();
    assert!(
        first.iter().all(|b| b["env"] == "test"),
        "every base backup is test's: {first:?}"
    );
    let runs: serde_json::Value = serde_json::from_slice(&run(&["runs", "--json"]).stdout).unwrap();
    let done: Vec<&serde_json::Value> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "backup" && r["state"] == "succeeded")
        .collect();
    assert!(!done.is_empty(), "{runs}");
    // A scheduled base-backup run: one phase on the database agent, naming what it took, and
    // no recovery point.
    let id = done[0]["id"].as_str().unwrap();
    let show: serde_json::Value =
        serde_json::from_slice(&run(&["run", "show", id, "--json"]).stdout).unwrap();
    let phases = show["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 1, "{show}");
    assert_eq!(phases[0]["name"], "base-backup", "{show}");
    assert_eq!(show["run"]["plan"], "base-backup", "{show}");
    let detail = phases[0]["detail"].as_str().unwrap();
    let listed = base_backups();
    let named = listed
        .iter()
        .filter_map(|b| b["id"].as_str())
        .find(|b| detail.contains(&format!("base backup {b} taken")));
    assert!(named.is_some(), "{detail} names one of {listed:?}");
    assert_eq!(show["run"]["point"].as_str().unwrap_or_default(), "");
    let points: serde_json::Value =
        serde_json::from_slice(&run(&["points", "--env", "test", "--json"]).stdout).unwrap();
    assert_eq!(
        points["points"].as_array().map(Vec::len),
        Some(0),
        "{points}"
    );
    let window = &points["windows"][0];
    assert_eq!(window["environment"], "test", "{points}");
    assert!(window["base_backups"].as_u64().unwrap() >= 2, "{points}");
    assert_eq!(window["gap_at"], serde_json::Value::Null, "{points}");

    // The metrics: the window from the oldest base backup; the age small after a switch.
    psql(
        &cluster,
        "app",
        "INSERT INTO notes (id) SELECT generate_series(101, 110)",
    );
    switch_and_archive(&cluster).await;
    let oldest = chrono::DateTime::parse_from_rfc3339(first[0]["consistent_at"].as_str().unwrap())
        .unwrap()
        .timestamp() as f64;
    let switched_at = chrono::Utc::now().timestamp() as f64;
    let text = eventually(
        "the window gauges after the switch",
        Duration::from_secs(30),
        async || {
            let text = http_get(metrics_addr, "/metrics").await.ok()?;
            let until = sample(
                &text,
                r#"rollcall_recoverable_until_timestamp_seconds{environment="test"}"#,
            )?;
            (until >= switched_at - 1.0).then_some(text)
        },
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"rollcall_recoverable_from_timestamp_seconds{environment="test"}"#
        ),
        Some(oldest),
        "{text}"
    );
    let age = sample(
        &text,
        r#"rollcall_wal_newest_age_seconds{environment="test"}"#,
    )
    .unwrap();
    assert!((0.0..30.0).contains(&age), "age {age} right after a switch");
    assert_eq!(
        sample(&text, r#"rollcall_wal_gap{environment="test"}"#),
        Some(0.0)
    );
    assert!(
        !text.contains(r#"rollcall_wal_newest_age_seconds{environment="plain"}"#),
        "plain has no base backup, so no window: {text}"
    );
    // Which environments schedule base backups (RollcallNoRecoverableWindow reads it).
    assert_eq!(
        sample(
            &text,
            r#"rollcall_base_backup_scheduled{environment="test"}"#
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(r#"rollcall_base_backup_scheduled{environment="plain"}"#),
        "{text}"
    );

    // A drill to a time after a scheduled base backup: rows at or before T stay, none after.
    let target = psql(&cluster, "app", NOW_RFC3339);
    eventually(
        "the server's clock past T",
        Duration::from_secs(5),
        async || {
            (psql(
                &cluster,
                "app",
                &format!("SELECT clock_timestamp() > '{target}'"),
            ) == "t")
                .then_some(())
        },
    )
    .await;
    psql(
        &cluster,
        "app",
        "INSERT INTO notes (id) SELECT generate_series(111, 120)",
    );
    switch_and_archive(&cluster).await;
    let at = |text: &str| chrono::DateTime::parse_from_rfc3339(text).unwrap();
    let before_t: Vec<String> = base_backups()
        .iter()
        .filter(|b| at(b["consistent_at"].as_str().unwrap()) <= at(&target))
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!before_t.is_empty(), "a scheduled base backup before T");
    // The schedule keeps starting base backups; the drill starts once none is running.
    let run_id = eventually_explained(
        "the drill to start between scheduled base backups",
        Duration::from_secs(60),
        async || {
            let out = run(&["drill", "--env", "test", "--to-time", &target, "--json"]);
            if out.status.success() {
                let started: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                return Some(
                    started["run"]
                        .as_str()
                        .or(started["id"].as_str())?
                        .to_owned(),
                );
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("unfinished backup run"), "{err}");
            None
        },
        || log_tails(dir.path(), 40),
    )
    .await;
    eventually_explained(
        "the drill to a time to succeed",
        Duration::from_secs(240),
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
    assert_eq!(ids(&cluster), (1..=110).collect::<Vec<_>>());
    let report = run(&["report", &run_id, "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let from = report["target"]["to_time"]["base_backup"].as_str().unwrap();
    assert!(
        before_t.iter().any(|b| b == from),
        "restored from scheduled base backup {from}, one of {before_t:?}"
    );

    // On demand through the fleet (between scheduled ones), printing what it took.
    let taken = eventually_explained(
        "an on-demand base backup between scheduled ones",
        Duration::from_secs(120),
        async || {
            let out = run(&["backup", "--env", "test", "--base", "--wait", "--json"]);
            if out.status.success() {
                return serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("unfinished backup run"), "{err}");
            None
        },
        || log_tails(dir.path(), 40),
    )
    .await;
    let taken_id = taken["base_backup"]["base_backup"].as_str().unwrap();
    assert_eq!(taken["base_backup"]["environment"], "test", "{taken}");
    assert!(
        base_backups().iter().any(|b| b["id"] == taken_id),
        "{taken_id} is listed"
    );
    // A database agent without [postgres.physical] refuses, naming the section.
    let refused = run(&["backup", "--env", "plain", "--base", "--wait"]);
    fails_with(&refused, &["[postgres.physical]"]);

    // Archiving stops (the archive command fails, and the agent that takes base backups is
    // gone): the newest archived WAL stays where it was and its age grows.
    procs[2].terminate(Duration::from_secs(10));
    psql(
        &cluster,
        "postgres",
        "ALTER SYSTEM SET archive_command = '/bin/false'",
    );
    psql(&cluster, "postgres", "SELECT pg_reload_conf()");
    psql(&cluster, "app", "INSERT INTO notes (id) VALUES (5000)");
    psql(&cluster, "app", "SELECT pg_switch_wal()");
    // The archiver has tried the new segment with the failing command: whatever it archived
    // before is in, and nothing after.
    eventually(
        "the archiver to fail",
        Duration::from_secs(60),
        async || {
            let failed = psql(
                &cluster,
                "postgres",
                "SELECT failed_count > 0 FROM pg_stat_archiver",
            );
            (failed == "t").then_some(())
        },
    )
    .await;
    let scrape = async || http_get(metrics_addr, "/metrics").await.unwrap();
    let until_of = |text: &str| {
        sample(
            text,
            r#"rollcall_recoverable_until_timestamp_seconds{environment="test"}"#,
        )
    };
    // The coordinator has observed the archive since (the same window for 3 s: three observe
    // intervals).
    let mut seen: Option<(f64, std::time::Instant)> = None;
    let first_scrape = eventually(
        "the observed window to settle",
        Duration::from_secs(30),
        async || {
            let text = scrape().await;
            let until = until_of(&text)?;
            match seen {
                Some((was, since)) if was == until => {
                    (since.elapsed() >= Duration::from_secs(3)).then_some(text)
                }
                _ => {
                    seen = Some((until, std::time::Instant::now()));
                    None
                }
            }
        },
    )
    .await;
    let until = until_of(&first_scrape).unwrap();
    let age = sample(
        &first_scrape,
        r#"rollcall_wal_newest_age_seconds{environment="test"}"#,
    )
    .unwrap();
    let later = eventually(
        "the WAL age to grow by 3 seconds",
        Duration::from_secs(30),
        async || {
            let text = scrape().await;
            let now = sample(
                &text,
                r#"rollcall_wal_newest_age_seconds{environment="test"}"#,
            )?;
            (now >= age + 3.0).then_some(text)
        },
    )
    .await;
    assert_eq!(
        sample(
            &later,
            r#"rollcall_recoverable_until_timestamp_seconds{environment="test"}"#
        ),
        Some(until),
        "nothing newer was archived"
    );

    for p in &mut procs {
        p.terminate(Duration::from_secs(10));
    }
    drop(cluster);
}
