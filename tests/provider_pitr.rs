//! A restore to a time of a managed Postgres through its provider's own point-in-time restore
//! (`[postgres.provider]`, the exec adapter), against real processes over mTLS (coordinator, a
//! database agent, a worker stand-in) and real Postgres 15.
//!
//! The "provider" is a stand-in adapter script ([`STAND_IN`]) over a real PITR: the live
//! server archives its WAL into a repository with `rollcall repo wal-push` and has a base
//! backup; the script's `window` reads the repository's window (`repo base-backups --json`),
//! its `restore` recovers a new data directory to `ROLLCALL_TO_TIME` with `rollcall repo
//! restore-postgres --to-time` and starts it on a free loopback port (a new instance, the live
//! server untouched), and `release` stops and removes it. Switch files in its directory make
//! it fail as a provider can.
//!
//! * A time outside the provider's window: the coordinator starts the run (the window is the
//!   provider's), the database agent's preflight refuses it naming the window; the adapter's
//!   `restore` is never called, nothing changes.
//! * The adapter's `restore` exits 3 with a message: the run blocks at prepare with it; the
//!   live database is unchanged and accepts connections.
//! * The adapter reports a later time than asked: refused at prepare, and the instance it
//!   reported is released.
//! * The drill: the live database holds exactly the rows committed at or before T, the one it
//!   replaced is kept as `app_pre_<tag>` with every row, the instance is released, and the
//!   report names the provider's instance.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::*;
use ephemeral_pg::Cluster;

/// The stand-in provider adapter. `@ROLLCALL@`, `@REPO@`, `@STATE@` and `@BIN@` are replaced
/// by the test. Switches in `@STATE@`: `fail-restore` makes `restore` exit 3 with a message on
/// stderr; `restored-to` holds a time `restore` reports instead of the one asked for;
/// `bad-url` makes it report an instance at a URL that takes no connection.
const STAND_IN: &str = r#"#!/bin/sh
# A stand-in managed Postgres provider for rollcall's exec adapter contract.
set -u
for verb; do :; done
state=@STATE@
echo "$verb to=${ROLLCALL_TO_TIME:-} instance=${ROLLCALL_INSTANCE:-} db=${ROLLCALL_DATABASE:-} env=${ROLLCALL_ENVIRONMENT:-} tag=${ROLLCALL_RUN_TAG:-} url=${DATABASE_URL:-}" >> "$state/calls.log"
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$verb" in
window)
  @ROLLCALL@ repo base-backups --repo @REPO@ --json | jq -ce '{earliest: .window.earliest, latest: .window.latest}'
  ;;
restore)
  if [ -e "$state/fail-restore" ]; then
    echo "restoring db-main to $ROLLCALL_TO_TIME" >&2
    echo "stand-in provider: quota exceeded for new instances" >&2
    exit 3
  fi
  id="pitr-$ROLLCALL_RUN_TAG-$$"
  dir="$state/$id"
  mkdir -p "$dir" && chmod 755 "$dir"
  if [ -e "$state/bad-url" ]; then
    printf '{"database_url": "postgres://postgres@127.0.0.1:1/%s", "restored_to": "%s", "instance": "%s"}\n' \
      "$ROLLCALL_DATABASE" "$ROLLCALL_TO_TIME" "$id"
    exit 0
  fi
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  if ! @ROLLCALL@ repo restore-postgres --repo @REPO@ --to-time "$ROLLCALL_TO_TIME" --data-dir "$dir/data" > "$dir/restore.json" 2> "$dir/restore.err"; then
    tail -n 1 "$dir/restore.err" >&2
    exit 4
  fi
  started=
  for try in 1 2 3 4 5; do
    port=$(shuf -i 20000-60000 -n 1)
    if as_postgres @BIN@/pg_ctl -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $port -h 127.0.0.1 -k $dir -c archive_mode=off" start > /dev/null 2>&1; then
      started=1; break
    fi
  done
  [ -n "$started" ] || { echo "stand-in provider: the new instance did not start" >&2; exit 5; }
  at=$ROLLCALL_TO_TIME
  [ -e "$state/restored-to" ] && at=$(cat "$state/restored-to")
  printf '{"database_url": "postgres://postgres@127.0.0.1:%s/%s", "restored_to": "%s", "instance": "%s"}\n' \
    "$port" "$ROLLCALL_DATABASE" "$at" "$id"
  ;;
release)
  dir="$state/$ROLLCALL_INSTANCE"
  if [ -d "$dir/data" ]; then
    as_postgres @BIN@/pg_ctl -D "$dir/data" -m fast -w stop > /dev/null 2>&1
  fi
  rm -rf "$dir"
  ;;
*)
  echo "stand-in provider: unknown verb $verb" >&2
  exit 2
  ;;
esac
"#;

fn psql(cluster: &Cluster, db: &str, sql: &str) -> String {
    cluster.psql(db, sql).unwrap().trim().to_owned()
}

fn ids(cluster: &Cluster, db: &str) -> Vec<i64> {
    psql(cluster, db, "SELECT id FROM notes ORDER BY id")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// The databases of the live server beside `postgres` and the templates.
fn databases(cluster: &Cluster) -> Vec<String> {
    psql(
        cluster,
        "postgres",
        "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', \
         'template1') ORDER BY 1",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The stand-in's instances still there (directories named `pitr-*`).
fn instances(state: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(state)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pitr-"))
        .collect();
    found.sort();
    found
}

fn calls(state: &Path) -> Vec<String> {
    std::fs::read_to_string(state.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn plane_error<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    api::errors::one_line(&*result.unwrap_err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_to_a_time_through_a_managed_providers_adapter() {
    install_crypto();
    // The stand-in adapter reads rollcall's JSON with jq: a tool like the emulators.
    if !std::process::Command::new("jq")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            !emulators_required(),
            "jq is not installed (apt-get install jq) and ROLLCALL_REQUIRE_EMULATORS is set"
        );
        eprintln!("SKIPPED: jq is not installed (apt-get install jq)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A rollcall binary the postgres user may run (archive and restore commands).
    let bin = runnable_rollcall(dir.path());
    let repo = dir.path().join("repository");
    std::fs::create_dir_all(&repo).unwrap();
    give_to_postgres(&repo);
    let repo_url = format!("file://{}", repo.display());

    // The live server, whose WAL the "provider" keeps.
    let pg_root = dir.path().join("pg");
    let cluster = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(pg_root.clone()),
        settings: vec![
            ("wal_level".into(), "replica".into()),
            ("archive_mode".into(), "on".into()),
        ],
    })
    .unwrap();
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
        let out = Command::new(&bin).args(args).output().unwrap();
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
    ]);
    psql(
        &cluster,
        "app",
        "INSERT INTO notes (id) SELECT generate_series(101, 110)",
    );
    let target = psql(&cluster, "app", NOW_RFC3339);
    eventually(
        "the server's clock to pass T",
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

    // The stand-in provider.
    let state = dir.path().join("provider");
    std::fs::create_dir_all(&state).unwrap();
    give_to_postgres(&state);
    let adapter = dir.path().join("provider.sh");
    std::fs::write(
        &adapter,
        STAND_IN
            .replace("@ROLLCALL@", &bin.display().to_string())
            .replace("@REPO@", &repo_url)
            .replace("@STATE@", &state.display().to_string())
            .replace("@BIN@", &cluster.bin_dir().display().to_string()),
    )
    .unwrap();
    std::fs::set_permissions(&adapter, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The fleet: a worker stand-in, and a database agent restoring through the provider.
    let certs = certs_init(dir.path(), &["worker-1:worker", "db-1:database"]);
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
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
    pitr = "provider"
    fleet = {{ worker = 1, database = 1 }}
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
    let db = format!(
        "[postgres]\nurl_env = \"DATABASE_URL\"\nbin_dir = \"{tools}\"\n\
         [postgres.freeze]\nroles = [\"app\"]\n\
         [postgres.provider]\ncommand = [\"{adapter}\", \"--region\", \"test-1\"]\ntimeout_s = 300\n",
        tools = cluster.bin_dir().display(),
        adapter = adapter.display(),
    );
    let db_url = cluster.url("app");
    let worker = "[control]\nscale = \"process\"\n[control.process]\nprogram = \"/bin/sleep\"\n\
                  args = [\"600\"]\nstop_grace = \"2s\"\n[smoke]\ncommand = [\"/bin/true\"]\n\
                  timeout = \"30s\"\n";
    for (name, role, extra) in [
        ("worker-1", "worker", worker),
        ("db-1", "database", db.as_str()),
    ] {
        let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, extra);
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
        &["worker-1", "db-1"],
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
    // A drill that fails: the newest run blocked, its reason; the run aborted for the next.
    let blocked_drill = |at: &str| {
        let out = run(&["drill", "--env", "test", "--to-time", at, "--watch"]);
        assert!(
            !out.status.success(),
            "{out:?}\n{}",
            log_tails(dir.path(), 40)
        );
        let listed: serde_json::Value =
            serde_json::from_slice(&run(&["runs", "--json"]).stdout).unwrap();
        let newest = &listed[0];
        assert_eq!(newest["state"], "blocked", "{listed}");
        let id = newest["id"].as_str().unwrap().to_owned();
        let show: serde_json::Value =
            serde_json::from_slice(&run(&["run", "show", &id, "--json"]).stdout).unwrap();
        let reason = show["run"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let aborted = run(&["run", "abort", &id]);
        assert!(aborted.status.success(), "{aborted:?}");
        (id, reason)
    };

    // `points` and a dry run say the window is the provider's.
    let points = run(&["points", "--env", "test"]);
    let text = String::from_utf8_lossy(&points.stdout).into_owned();
    assert!(points.status.success(), "{points:?}");
    assert!(
        text.contains(
            "test: Postgres restorable to a time within the managed provider's own window"
        ),
        "{text}"
    );
    let points: serde_json::Value =
        serde_json::from_slice(&run(&["points", "--env", "test", "--json"]).stdout).unwrap();
    assert_eq!(points["windows"][0]["provider"], true, "{points}");
    let dry = run(&["drill", "--env", "test", "--to-time", &target, "--dry-run"]);
    let dry_text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success(), "{dry:?}");
    assert!(
        dry_text.contains("the window is the managed provider's"),
        "{dry_text}"
    );

    // Outside the provider's window: refused by the database agent's preflight, naming it.
    let (_, reason) = blocked_drill("2020-01-01T00:00:00Z");
    assert!(
        reason.contains("2020-01-01T00:00:00Z is outside the provider's recoverable window")
            && reason.contains("nothing was changed"),
        "{reason}"
    );
    let so_far = calls(&state);
    assert!(
        so_far.iter().all(|c| !c.starts_with("restore")),
        "{so_far:?}"
    );
    assert!(
        so_far
            .iter()
            .any(|c| c.starts_with("window ") && c.contains("db=app env=test")),
        "{so_far:?}"
    );
    // Never the live database's URL (its variable is withheld from the adapter).
    assert!(so_far.iter().all(|c| c.ends_with("url=")), "{so_far:?}");
    assert_eq!(ids(&cluster, "app"), (1..=120).collect::<Vec<_>>());
    assert_eq!(databases(&cluster), ["app"]);

    // The provider's restore fails: blocked at prepare with its message; nothing changed.
    std::fs::write(state.join("fail-restore"), b"").unwrap();
    let (_, reason) = blocked_drill(&target);
    std::fs::remove_file(state.join("fail-restore")).unwrap();
    assert!(
        reason.contains("--region test-1` restore failed (exit status: 3): stand-in provider: quota exceeded for new instances")
            && reason.contains("nothing live was changed"),
        "{reason}"
    );
    assert_eq!(ids(&cluster, "app"), (1..=120).collect::<Vec<_>>());
    psql(&cluster, "app", "SELECT 1");
    assert_eq!(databases(&cluster), ["app"]);
    assert!(instances(&state).is_empty());

    // The provider restores to another time than asked: refused, and its instance released.
    std::fs::write(state.join("restored-to"), b"2030-01-01T00:00:00Z").unwrap();
    let (_, reason) = blocked_drill(&target);
    std::fs::remove_file(state.join("restored-to")).unwrap();
    assert!(
        reason.contains("restored to 2030-01-01T00:00:00Z, not the") && reason.contains("released"),
        "{reason}"
    );
    let released: Vec<String> = calls(&state)
        .into_iter()
        .filter(|c| c.starts_with("release"))
        .collect();
    assert_eq!(released.len(), 1, "{:?}", calls(&state));
    assert!(instances(&state).is_empty(), "{:?}", instances(&state));
    assert_eq!(ids(&cluster, "app"), (1..=120).collect::<Vec<_>>());
    assert_eq!(databases(&cluster), ["app"]);

    // The database agent's prepare on its own (as a re-sent command runs it): a second prepare
    // of the same run and time keeps the copy the first made, without calling the provider.
    let url_file = dir.path().join("direct-url");
    std::fs::write(&url_file, &db_url).unwrap();
    let direct = |timeout_s: u64| {
        let config: agent::data::PostgresConfig = toml::from_str(&format!(
            "url_file = \"{}\"\nbin_dir = \"{}\"\n[provider]\ncommand = [\"{}\"]\n\
             timeout_s = {timeout_s}\n",
            url_file.display(),
            cluster.bin_dir().display(),
            adapter.display()
        ))
        .unwrap();
        agent::data::DataPlane::from_config(
            &dir.path().join("direct.toml"),
            "db-direct",
            "test",
            Some(&config),
            None,
        )
        .unwrap()
    };
    let plane = direct(300);
    let progress = agent::progress::Reporter::new(|_| {});
    let repo_ref = api::model::RepositoryRef {
        url: repo_url.clone(),
        ..Default::default()
    };
    let at = chrono::DateTime::parse_from_rfc3339(&target)
        .unwrap()
        .with_timezone(&chrono::Utc);
    let restores = || {
        calls(&state)
            .iter()
            .filter(|c| c.starts_with("restore "))
            .count()
    };
    let before = restores();
    let started = std::time::Instant::now();
    let first = plane
        .prepare_postgres_to_time(&repo_ref, at, "direct-1", &progress)
        .await
        .unwrap();
    eprintln!(
        "figure: a prepare through the stand-in provider (restore, copy, release) took {:?} \
         (the agent's elapsed_ms: {})",
        started.elapsed(),
        first.elapsed_ms
    );
    let copy = format!("app_restore_{}", fleet::run_tag("direct-1"));
    assert_eq!(first.restore_database, copy);
    assert_eq!(first.counts["notes"], 110, "{first:?}");
    assert_eq!(ids(&cluster, &copy), (1..=110).collect::<Vec<_>>());
    assert!(instances(&state).is_empty(), "{:?}", instances(&state));
    let again = plane
        .prepare_postgres_to_time(&repo_ref, at, "direct-1", &progress)
        .await
        .unwrap();
    assert_eq!(restores(), before + 1, "the provider was not called again");
    assert_eq!(again.counts["notes"], 110);
    assert!(
        again
            .physical
            .as_ref()
            .unwrap()
            .detail
            .starts_with("kept the copy an earlier prepare made"),
        "{again:?}"
    );
    // The copy a run never swapped in is what `kept` lists and prunes.
    let kept = plane.list_kept().await.unwrap();
    assert!(kept.kept.iter().any(|k| k.name == copy), "{:?}", kept.kept);
    let pruned = plane.prune_kept(std::slice::from_ref(&copy)).await;
    assert_eq!(pruned.dropped, std::slice::from_ref(&copy), "{pruned:?}");
    assert_eq!(databases(&cluster), ["app"]);

    // An endpoint that takes no connection (within the adapter's timeout_s): refused, the
    // instance released, nothing live changed.
    std::fs::write(state.join("bad-url"), b"").unwrap();
    let err = plane_error(
        direct(3)
            .prepare_postgres_to_time(&repo_ref, at, "direct-2", &progress)
            .await,
    );
    std::fs::remove_file(state.join("bad-url")).unwrap();
    assert!(
        err.contains("does not take connections")
            && err.contains("postgres://postgres@127.0.0.1:1/app")
            && err.contains("nothing live was changed; instance pitr-")
            && err.contains("released"),
        "{err}"
    );
    assert!(instances(&state).is_empty(), "{:?}", instances(&state));
    assert_eq!(databases(&cluster), ["app"]);
    assert_eq!(ids(&cluster, "app"), (1..=120).collect::<Vec<_>>());

    // The drill.
    let started = std::time::Instant::now();
    let done = run(&[
        "drill",
        "--env",
        "test",
        "--to-time",
        &target,
        "--watch",
        "--json",
    ]);
    assert!(
        done.status.success(),
        "{done:?}\n{}",
        log_tails(dir.path(), 60)
    );
    eprintln!(
        "figure: the drill to a time through the provider took {:?}",
        started.elapsed()
    );
    let listed: serde_json::Value =
        serde_json::from_slice(&run(&["runs", "--json"]).stdout).unwrap();
    let run_id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["state"], "succeeded", "{listed}");
    let tag = fleet::run_tag(&run_id);

    // Exactly the rows committed at or before T; the replaced database kept whole.
    assert_eq!(ids(&cluster, "app"), (1..=110).collect::<Vec<_>>());
    assert_eq!(
        psql(
            &cluster,
            "app",
            &format!("SELECT count(*) FROM notes WHERE at > '{target}'")
        ),
        "0"
    );
    let kept = format!("app_pre_{tag}");
    assert_eq!(databases(&cluster), ["app".to_owned(), kept.clone()]);
    assert_eq!(ids(&cluster, &kept), (1..=120).collect::<Vec<_>>());
    // Writable again (the freeze was carried across the swap, then thawed).
    psql(&cluster, "app", "INSERT INTO notes (id) VALUES (1000)");

    // The instance was released; each call had its inputs.
    assert!(instances(&state).is_empty(), "{:?}", instances(&state));
    let all = calls(&state);
    let restore = all
        .iter()
        .rfind(|c| c.starts_with("restore "))
        .unwrap()
        .clone();
    let asked = restore
        .split_whitespace()
        .find_map(|w| w.strip_prefix("to="))
        .unwrap();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(asked).unwrap(),
        chrono::DateTime::parse_from_rfc3339(&target).unwrap(),
        "{restore}"
    );
    assert!(
        restore.contains(&format!("tag={tag} ")) && restore.contains("db=app env=test"),
        "{restore}"
    );
    let release = all.last().unwrap();
    assert!(
        release.starts_with(&format!("release to= instance=pitr-{tag}-")),
        "{all:?}"
    );

    // A prepare of this run sent again after its commit: refused before the provider is
    // called, nothing changed.
    let before = restores();
    let late = plane_error(
        plane
            .prepare_postgres_to_time(&repo_ref, at, &run_id, &progress)
            .await,
    );
    assert!(
        late.contains("already swapped a restore in") && late.contains(&kept),
        "{late}"
    );
    assert_eq!(restores(), before);
    assert_eq!(
        ids(&cluster, "app"),
        (1..=110).chain([1000]).collect::<Vec<_>>()
    );

    // The report names the time and the provider's instance.
    let report = run(&["report", &run_id, "--format", "json"]);
    assert!(report.status.success(), "{report:?}");
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let t = &report["target"]["to_time"];
    assert!(
        t["base_backup"]
            .as_str()
            .unwrap()
            .starts_with(&format!("provider instance pitr-{tag}-")),
        "{report}"
    );
    assert_eq!(t["kept_dir"], kept.as_str(), "{report}");
    let md = run(&["report", &run_id]);
    let md = String::from_utf8_lossy(&md.stdout).into_owned();
    assert!(
        md.contains("Restored to a time")
            && md.contains(&format!("provider instance pitr-{tag}-"))
            && md.contains(&format!("`{kept}`")),
        "{md}"
    );

    for p in &mut procs {
        p.terminate(Duration::from_secs(10));
    }
    drop(cluster);
}
