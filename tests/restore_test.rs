//! Restore-test environments end to end with real processes: a throwaway Postgres cluster
//! holding cowork-sim's data (`cowork`, the source environment `prod`), a file:// object store
//! and repository, the `rollcall` coordinator, and three restore-test environments of `prod`,
//! each with its own database agent (another database on the cluster) and objects agent
//! (another directory): `rt` (teardown on success, its agents allow it), `rt-keep` (teardown
//! never) and `rt-noopt` (its agents do not allow teardowns). A backup of `prod` makes a point;
//! each restore test restores it into its own target, verifies and reports; throughout,
//! `prod`'s database and objects stay byte for byte as they were and its agents get no command.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::fleet::{count, report_check, run_tag};
use e2e::*;

const PLAN: &str = include_str!("plans/data-only.toml");

/// Every table of `db` with the md5 of its rows in order: equal when the data are.
fn table_digests(cluster: &ephemeral_pg::Cluster, db: &str) -> BTreeMap<String, String> {
    let tables = cluster
        .psql(
            db,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        )
        .unwrap();
    tables
        .lines()
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            let digest = cluster
                .psql(
                    db,
                    &format!(
                        "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY \
                         x::text)), '') FROM public.{t} x"
                    ),
                )
                .unwrap();
            (t.to_owned(), digest.trim().to_owned())
        })
        .collect()
}

fn databases(cluster: &ephemeral_pg::Cluster) -> Vec<String> {
    cluster
        .psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE 'cowork%' ORDER BY 1",
        )
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The names of the results an agent recorded in its state directory (one per command).
fn recorded(dir: &Path, agent: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("state").join(agent).join("results"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

struct Target {
    env: &'static str,
    db: &'static str,
    objects: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_test_restores_prod_s_point_elsewhere_verifies_and_tears_down_without_touching_prod()
 {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    cluster.create_database("cowork").unwrap();
    let db_url = cluster.url("cowork");
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    let objects_url = format!("file://{}", objects.display());
    let data_env = [
        ("DATABASE_URL", db_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];
    cowork(&["migrate"], &data_env);
    cowork(&["seed", "--sessions", "4"], &data_env);
    let targets = [
        Target {
            env: "rt",
            db: "cowork_rt",
            objects: dir.path().join("objects-rt"),
        },
        Target {
            env: "rt-keep",
            db: "cowork_keep",
            objects: dir.path().join("objects-keep"),
        },
        Target {
            env: "rt-noopt",
            db: "cowork_noopt",
            objects: dir.path().join("objects-noopt"),
        },
        Target {
            env: "rt-sched",
            db: "cowork_sched",
            objects: dir.path().join("objects-sched"),
        },
    ];
    // Each target database exists, empty: a restore swaps the point's in and keeps it.
    for t in &targets {
        cluster.create_database(t.db).unwrap();
        std::fs::create_dir_all(&t.objects).unwrap();
    }

    let mut names = vec!["db-1:database".to_owned(), "obj-1:objects".to_owned()];
    for t in &targets {
        names.push(format!("db-{}:database", t.env));
        names.push(format!("obj-{}:objects", t.env));
    }
    // rt-shard: two objects agents share its target store, each tearing down a shard.
    names.extend([
        "db-rt-shard:database".to_owned(),
        "obj-shard-1:objects".to_owned(),
        "obj-shard-2:objects".to_owned(),
    ]);
    let shard_objects = dir.path().join("objects-shard");
    std::fs::create_dir_all(&shard_objects).unwrap();
    cluster.create_database("cowork_shard").unwrap();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let certs = certs_init(dir.path(), &names);
    let repo = dir.path().join("repository");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let env = format!(
        r#"
[environments.prod]
rpo = "1h"
rto = "1h"
retention = "7days"
repository = "file://{repo}"
plan = "{plan}"
fleet = {{ database = 1, objects = 1 }}

[environments.rt]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
fleet = {{ database = 1, objects = 1 }}

[environments.rt-keep]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
teardown = "never"
fleet = {{ database = 1, objects = 1 }}

[environments.rt-noopt]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
fleet = {{ database = 1, objects = 1 }}

[environments.rt-sched]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
drill_schedule = "*/15 * * * * *"
random-within = "1h"
fleet = {{ database = 1, objects = 1 }}

[environments.rt-shard]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
fleet = {{ database = 1, objects = 2 }}
"#,
        repo = repo.display(),
        plan = plan.display(),
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let _coordinator = spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &[],
    );
    let checks = "[[invariant]]\nname = \"no projection ahead of its events\"\n\
                  sql = \"SELECT p.session_id FROM session_projections p WHERE p.sequence > (SELECT coalesce(max(e.sequence), 0) FROM session_events e WHERE e.session_id = p.session_id)\"\n\
                  [[reference]]\nname = \"artifact objects\"\nsql = \"SELECT object_key FROM artifact_index\"\n";
    let mut agents = Vec::new();
    let mut spawn_pair = |env: &str, db: &str, objects: &Path, extra: &str| {
        let (db_name, obj_name) = if env == "prod" {
            ("db-1".to_owned(), "obj-1".to_owned())
        } else {
            (format!("db-{env}"), format!("obj-{env}"))
        };
        let url = cluster.url(db);
        for (name, role, data) in [
            (
                &db_name,
                "database",
                format!("[postgres]\nurl_env = \"DATABASE_URL\"\n{checks}{extra}"),
            ),
            (
                &obj_name,
                "objects",
                format!(
                    "[objects]\nurl = \"file://{}\"\nscratch_dir = \"scratch/{obj_name}\"\n{extra}",
                    objects.display()
                ),
            ),
        ] {
            let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, &data);
            let text = std::fs::read_to_string(&cfg).unwrap().replacen(
                "environment = \"test\"",
                &format!("environment = \"{env}\""),
                1,
            );
            std::fs::write(&cfg, text).unwrap();
            agents.push(spawn_rollcall(
                name,
                dir.path(),
                &["agent", "--config", cfg.to_str().unwrap()],
                &[("DATABASE_URL", url.as_str())],
            ));
        }
    };
    spawn_pair("prod", "cowork", &objects, "");
    let opt_in = "[restore_test]\nteardown = true\n";
    spawn_pair("rt", "cowork_rt", &targets[0].objects, opt_in);
    spawn_pair("rt-keep", "cowork_keep", &targets[1].objects, "");
    spawn_pair("rt-noopt", "cowork_noopt", &targets[2].objects, "");
    spawn_pair("rt-sched", "cowork_sched", &targets[3].objects, opt_in);
    let shard_url = cluster.url("cowork_shard");
    agents.push(spawn_agent(
        dir.path(),
        &certs,
        agents_addr,
        "db-rt-shard",
        "database",
        "rt-shard",
        &format!("[postgres]\nurl_env = \"DATABASE_URL\"\n{checks}{opt_in}"),
        &[("DATABASE_URL", shard_url.as_str())],
    ));
    for name in ["obj-shard-1", "obj-shard-2"] {
        agents.push(spawn_agent(
            dir.path(),
            &certs,
            agents_addr,
            name,
            "objects",
            "rt-shard",
            &format!(
                "[objects]\nurl = \"file://{}\"\nscratch_dir = \"scratch/{name}\"\n{opt_in}",
                shard_objects.display()
            ),
            &[],
        ));
    }
    let all: Vec<&str> = names.iter().map(|n| n.split(':').next().unwrap()).collect();
    fleet_ready(
        operator_addr,
        &certs,
        &all,
        dir.path(),
        Duration::from_secs(60),
    )
    .await;
    let operator = format!("https://{operator_addr}");
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&[
            "--coordinator",
            &operator,
            "--certs",
            certs.to_str().unwrap(),
        ]);
        rollcall(&all)
    };

    // The point of prod.
    let backup = ok(
        &run(&["backup", "--env", "prod", "--wait", "--json"]),
        "backup of prod",
    );
    let point_id = backup["point"].as_str().unwrap().to_owned();
    let point: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.join(format!("points/{point_id}.json"))).unwrap(),
    )
    .unwrap();
    let at_point = point["body"]["postgres"]["table_counts"].clone();
    let sessions_at_point = at_point["sessions"].as_i64().unwrap();
    assert!(sessions_at_point >= 4, "{point}");
    let objects_at_point = files(&objects).len();
    assert!(objects_at_point > 0);

    // What prod holds, and what its agents recorded, before any restore test.
    let prod_tables = table_digests(&cluster, "cowork");
    let prod_objects = files(&objects);
    let prod_db_commands = recorded(dir.path(), "db-1");
    let prod_obj_commands = recorded(dir.path(), "obj-1");
    assert!(
        !prod_db_commands.is_empty(),
        "the backup's commands are recorded"
    );

    // Refusals, before anything runs: each one line naming what to do, nothing changed.
    let other = point_id.replacen("-prod-", "-rt-", 1);
    fails_with(
        &run(&["drill", "--env", "rt", "--point", &other]),
        &[
            &format!("recovery point {other} belongs to environment rt, not prod"),
            "rt is a restore test of prod and restores only prod's points",
        ],
    );
    // The reverse direction: a restore test's "point" into the source is refused.
    fails_with(
        &run(&["drill", "--env", "prod", "--point", &other]),
        &[
            "belongs to environment rt, not prod",
            "a drill of prod restores only prod's own points",
        ],
    );
    fails_with(
        &run(&["backup", "--env", "rt"]),
        &[
            "environment rt is a restore test of prod",
            "back up prod (`rollcall backup --env prod`)",
        ],
    );
    // `latest` is prod's newest point, named by the dry run.
    let dry = run(&["drill", "--env", "rt", "--point", "latest", "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && text.contains(&format!("to point latest, which is {point_id}")),
        "{text}{}",
        String::from_utf8_lossy(&dry.stderr)
    );

    // The restore test: passes on its own plan.
    let drill = run(&["drill", "--env", "rt", "--point", "latest", "--watch"]);
    let out = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success(),
        "{out}\n{}\n{}",
        String::from_utf8_lossy(&drill.stderr),
        log_tails(dir.path(), 30)
    );
    assert!(
        out.contains("phase commit-postgres passed")
            && out.contains("phase restore-objects passed")
            && out.contains("phase teardown-postgres passed")
            && out.contains("phase teardown-objects passed"),
        "{out}"
    );
    let runs = ok(&run(&["runs", "--json"]), "runs");
    let rt_run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["environment"] == "rt")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = ok(
        &run(&["report", &rt_run, "--format", "json"]),
        "report of the restore test",
    );
    // An empty target warns that it had nothing to count before the restore; nothing else.
    assert_eq!(report["outcome"], "passed with warnings", "{report}");
    let failed: Vec<&serde_json::Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] != true)
        .collect();
    assert!(
        failed.len() == 1 && failed[0]["name"] == "counted tables present",
        "{failed:?}"
    );
    assert_eq!(report["target"]["point_id"], point_id.as_str());
    let test = &report["restore_test"];
    assert_eq!(
        (&test["source"], &test["target"], &test["teardown_setting"]),
        (&"prod".into(), &"rt".into(), &"on-success".into()),
        "{test}"
    );
    assert_eq!(
        test["agents_commanded"],
        serde_json::json!(["db-rt", "obj-rt"]),
        "{test}"
    );
    assert_eq!(
        test["source_agents_known"],
        serde_json::json!(["db-1", "obj-1"]),
        "{test}"
    );
    assert_eq!(test["source_untouched"], true, "{test}");
    assert_eq!(test["source_agents_commanded"], serde_json::json!([]));
    let restore_ms = test["restore_ms"].as_i64().unwrap();
    assert!(restore_ms > 0, "{test}");
    assert_eq!(test["teardown"], "done", "{test}");
    let dropped = test["databases_dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{test}");
    assert!(
        dropped[0]
            .as_str()
            .unwrap()
            .starts_with("cowork_rt_undone_r"),
        "{test}"
    );
    assert_eq!(test["database_put_back"], true, "{test}");
    assert_eq!(
        test["objects_deleted"].as_u64().unwrap() as usize,
        objects_at_point,
        "{test}"
    );
    assert!(
        test["quarantine_keys_deleted"].as_u64().unwrap() > 0,
        "{test}"
    );
    // During verification the target held the point's rows: the verify counts of the target
    // equal the point's, and every reference check passed against the target's objects.
    let sessions = report["counts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "sessions")
        .unwrap_or_else(|| panic!("{}", report["counts"]))
        .clone();
    assert_eq!(
        sessions["at_point"].as_i64(),
        Some(sessions_at_point),
        "{sessions}"
    );
    assert_eq!(
        sessions["after"].as_i64(),
        Some(sessions_at_point),
        "{sessions}"
    );
    let references = report_check(&report, "kind", "reference");
    assert_eq!(references["passed"], true, "{references}");
    let show = ok(&run(&["run", "show", &rt_run, "--json"]), "run show");
    assert!(
        show["commands"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["agent"] == "db-rt" || c["agent"] == "obj-rt"),
        "{show}"
    );
    let markdown = run(&["report", &rt_run]);
    let markdown = String::from_utf8_lossy(&markdown.stdout);
    assert!(
        markdown.contains("## Restore test") && markdown.contains("prod untouched"),
        "{markdown}"
    );
    // Torn down: the target database is back as it was (empty), no copy is left beside it,
    // and the target store and the run's quarantine are empty.
    assert!(table_digests(&cluster, "cowork_rt").is_empty());
    assert!(
        files(&targets[0].objects).is_empty(),
        "{:?}",
        files(&targets[0].objects).keys()
    );
    let tag = run_tag(&rt_run);
    assert!(!repo.join("quarantine").join(&tag).exists());
    eprintln!("measured: restore test of {point_id} restored in {restore_ms} ms");

    // teardown = "never": the restored data stay in the target for inspection. An object
    // the target held before is not in the point: the restore moves it into the run's
    // quarantine, in prod's repository.
    std::fs::write(targets[1].objects.join("stale-before-the-test.txt"), b"old").unwrap();
    let keep = run(&["drill", "--env", "rt-keep", "--point", &point_id, "--watch"]);
    assert!(
        keep.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&keep.stdout),
        String::from_utf8_lossy(&keep.stderr)
    );
    assert_eq!(
        count(&cluster, "cowork_keep", "sessions"),
        sessions_at_point
    );
    assert_eq!(files(&targets[1].objects), prod_objects);
    let runs = ok(&run(&["runs", "--json"]), "runs");
    let keep_run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["environment"] == "rt-keep")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = ok(&run(&["report", &keep_run, "--format", "json"]), "report");
    assert_eq!(
        report["restore_test"]["teardown"], "kept (teardown = never)",
        "{report}"
    );
    assert_eq!(
        report["restore_test"]["databases_dropped"],
        serde_json::json!([])
    );
    // Its quarantine is in prod's repository, and only rt-keep's kept list shows it (and so
    // only rt-keep's prune would delete it).
    let keep_tag = run_tag(&keep_run);
    assert!(repo.join("quarantine").join(&keep_tag).exists());
    let kept_tags = |env: &str| -> Vec<String> {
        let listing = ok(&run(&["kept", "list", "--env", env, "--json"]), "kept list");
        listing["copies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["tag"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(kept_tags("rt-keep").contains(&keep_tag));
    for other in ["prod", "rt"] {
        assert!(!kept_tags(other).contains(&keep_tag), "{other}");
    }

    // An agent that does not allow teardowns refuses them: the run blocks naming why, and
    // nothing is dropped or deleted.
    let noopt = run(&["drill", "--env", "rt-noopt", "--point", "latest", "--watch"]);
    assert!(!noopt.status.success());
    let err = String::from_utf8_lossy(&noopt.stderr);
    assert!(
        err.contains("is blocked")
            && err.contains("does not allow restore-test teardowns")
            && err.contains("[restore_test] teardown = true"),
        "{err}"
    );
    assert_eq!(
        count(&cluster, "cowork_noopt", "sessions"),
        sessions_at_point
    );
    assert_eq!(files(&targets[2].objects), prod_objects);

    // A sharded teardown: each objects agent takes its shard out of the target; the run's
    // quarantines, which no single shard may delete, are deleted once both are done.
    let shard = run(&[
        "drill", "--env", "rt-shard", "--point", &point_id, "--watch",
    ]);
    assert!(
        shard.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&shard.stdout),
        String::from_utf8_lossy(&shard.stderr)
    );
    let runs = ok(&run(&["runs", "--json"]), "runs");
    let shard_run = runs_of(&runs, "rt-shard")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = ok(&run(&["report", &shard_run, "--format", "json"]), "report");
    let test = &report["restore_test"];
    assert_eq!(test["teardown"], "done", "{test}");
    assert!(
        test["quarantine_keys_deleted"].as_u64().unwrap() > 0,
        "{test}"
    );
    assert!(files(&shard_objects).is_empty());
    assert!(!repo.join("quarantine").join(run_tag(&shard_run)).exists());
    assert!(
        !repo
            .join("quarantine")
            .join(run_tag(&format!("{shard_run}/teardown")))
            .exists()
    );
    let show = ok(&run(&["run", "show", &shard_run, "--json"]), "run show");
    let teardown = show["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "teardown-objects")
        .unwrap()
        .clone();
    assert!(
        teardown["detail"]
            .as_str()
            .unwrap()
            .contains("the run's quarantines deleted once all 2 shards were done"),
        "{teardown}"
    );

    // On its schedule, rt-sched tests a random point of prod from the last hour (the only
    // one) by itself, and tears it down; slots before the backup found no point and are
    // failed runs saying so.
    let scheduled = eventually(
        "a scheduled restore test of rt-sched to succeed",
        Duration::from_secs(90),
        async || {
            let runs = ok(&run(&["runs", "--json"]), "runs");
            runs.as_array()?
                .iter()
                .find(|r| r["environment"] == "rt-sched" && r["state"] == "succeeded")
                .cloned()
        },
    )
    .await;
    assert_eq!(scheduled["kind"], "drill", "{scheduled}");
    assert_eq!(scheduled["point"], point_id.as_str(), "{scheduled}");
    let id = scheduled["id"].as_str().unwrap();
    let report = ok(&run(&["report", id, "--format", "json"]), "report");
    assert_eq!(report["restore_test"]["teardown"], "done", "{report}");
    assert_eq!(report["restore_test"]["source_untouched"], true, "{report}");
    // Torn down: empty between two of its runs (the schedule goes on firing).
    eventually(
        "rt-sched's target empty with no restore test under way",
        Duration::from_secs(60),
        async || {
            let runs = ok(&run(&["runs", "--json"]), "runs");
            let idle = runs_of(&runs, "rt-sched").iter().all(|r| {
                ["succeeded", "failed", "aborted"].contains(&r["state"].as_str().unwrap_or(""))
            });
            (idle && files(&targets[3].objects).is_empty()).then_some(())
        },
    )
    .await;
    let runs = ok(&run(&["runs", "--json"]), "runs");
    for early in runs_of(&runs, "rt-sched")
        .iter()
        .filter(|r| r["state"] == "failed")
    {
        assert!(
            early["point"].is_null()
                && early["reason"].as_str().unwrap().contains(
                    "environment prod has no recovery point committed in the last 1h \
                     (random-within)"
                ),
            "{early}"
        );
    }

    // Throughout, prod was not touched: the same rows and objects, no kept copy beside its
    // database, and its agents recorded no command since the backup.
    assert_eq!(table_digests(&cluster, "cowork"), prod_tables);
    assert_eq!(files(&objects), prod_objects);
    let dbs = databases(&cluster);
    assert!(!dbs.iter().any(|d| d.starts_with("cowork_pre_")), "{dbs:?}");
    assert_eq!(recorded(dir.path(), "db-1"), prod_db_commands);
    assert_eq!(recorded(dir.path(), "obj-1"), prod_obj_commands);

    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
}

/// Writes an agent's config for environment `env` and starts it as a real process.
#[allow(clippy::too_many_arguments)]
fn spawn_agent(
    dir: &Path,
    certs: &Path,
    agents_addr: std::net::SocketAddr,
    name: &str,
    role: &str,
    env: &str,
    data: &str,
    vars: &[(&str, &str)],
) -> Proc {
    let cfg = write_agent_config(dir, certs, agents_addr, name, role, data);
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "environment = \"test\"",
        &format!("environment = \"{env}\""),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    spawn_rollcall(
        name,
        dir,
        &["agent", "--config", cfg.to_str().unwrap()],
        vars,
    )
}

/// The pids an agent's process supervisor says it runs (`children.json` in its state).
fn supervised_pids(dir: &Path, agent: &str) -> Vec<u32> {
    fn find(dir: &Path) -> Option<PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if let Some(found) = find(&path) {
                    return Some(found);
                }
            } else if path.file_name().is_some_and(|n| n == "children.json") {
                return Some(path);
            }
        }
        None
    }
    let Some(file) = find(&dir.join("state").join(agent)) else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    json["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect()
}

/// A process's command line, its arguments joined by spaces; None once it is gone.
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_owned(),
    )
}

/// The runs of `env` in `rollcall runs --json`.
fn runs_of(runs: &serde_json::Value, env: &str) -> Vec<serde_json::Value> {
    runs.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["environment"] == env)
        .cloned()
        .collect()
}

/// Issue 20's scheduled test: `prod` runs a real web role (cowork-sim web, supervised by its
/// web agent) next to its database and objects agents; `rt` restore-tests prod every three
/// seconds by itself. A slot before prod has any point is a failed run saying so; after the
/// backup two scheduled restore tests pass. Throughout, prod's web process keeps its pid and
/// is never in maintenance (polled all along), no prod row or object is removed, no
/// `cowork_pre_*` appears and prod's agents record no command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_restore_tests_pass_twice_by_themselves_and_the_source_never_notices() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    cluster.create_database("cowork").unwrap();
    cluster.create_database("cowork_rt").unwrap();
    let db_url = cluster.url("cowork");
    let objects = dir.path().join("objects");
    let target_objects = dir.path().join("objects-rt");
    std::fs::create_dir_all(&objects).unwrap();
    std::fs::create_dir_all(&target_objects).unwrap();
    let objects_url = format!("file://{}", objects.display());
    let data_env = [
        ("DATABASE_URL", db_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];
    cowork(&["migrate"], &data_env);
    cowork(&["seed", "--sessions", "4"], &data_env);
    let token = cowork(&["token", "--scope", "operator"], &data_env)["token"]
        .as_str()
        .unwrap()
        .to_owned();

    let certs = certs_init(
        dir.path(),
        &[
            "web-1:web",
            "db-1:database",
            "obj-1:objects",
            "db-rt:database",
            "obj-rt:objects",
        ],
    );
    let repo = dir.path().join("repository");
    let (agents_addr, operator_addr, web_addr) = (free_addr(), free_addr(), free_addr());
    let env = format!(
        r#"
[environments.prod]
rpo = "1h"
rto = "1h"
retention = "7days"
repository = "file://{repo}"
fleet = {{ web = 1, database = 1, objects = 1 }}

[environments.rt]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
drill_schedule = "*/3 * * * * *"
fleet = {{ database = 1, objects = 1 }}
"#,
        repo = repo.display(),
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let _coordinator = spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &[],
    );
    let sim = cowork_sim_bin();
    let web_control = format!(
        r#"
[control]
scale = "process"
freeze = "http"
[control.process]
program = "{sim}"
args = ["web", "--listen", "{web_addr}"]
health_url = "http://{web_addr}/readyz"
stop_grace = "5s"
frozen_args = ["--maintenance"]
[control.http]
url = "http://{web_addr}/admin/maintenance"
token_env = "COWORK_OPERATOR_TOKEN"
[[check]]
name = "readyz"
url = "http://{web_addr}/readyz"
"#,
        sim = sim.display(),
    );
    let checks = "[[invariant]]\nname = \"no projection ahead of its events\"\n\
                  sql = \"SELECT p.session_id FROM session_projections p WHERE p.sequence > (SELECT coalesce(max(e.sequence), 0) FROM session_events e WHERE e.session_id = p.session_id)\"\n\
                  [[reference]]\nname = \"artifact objects\"\nsql = \"SELECT object_key FROM artifact_index\"\n";
    let rt_url = cluster.url("cowork_rt");
    let prod_vars = [
        ("DATABASE_URL", db_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
        ("COWORK_OPERATOR_TOKEN", token.as_str()),
    ];
    let opt_in = "[restore_test]\nteardown = true\n";
    let mut agents = vec![
        spawn_agent(
            dir.path(),
            &certs,
            agents_addr,
            "web-1",
            "web",
            "prod",
            &web_control,
            &prod_vars,
        ),
        spawn_agent(
            dir.path(),
            &certs,
            agents_addr,
            "db-1",
            "database",
            "prod",
            &format!("[postgres]\nurl_env = \"DATABASE_URL\"\n{checks}"),
            &prod_vars,
        ),
        spawn_agent(
            dir.path(),
            &certs,
            agents_addr,
            "obj-1",
            "objects",
            "prod",
            &format!(
                "[objects]\nurl = \"{objects_url}\"\nverify_ignore = [\"_probe/\"]\nscratch_dir = \"scratch/obj-1\"\n"
            ),
            &prod_vars,
        ),
        spawn_agent(
            dir.path(),
            &certs,
            agents_addr,
            "db-rt",
            "database",
            "rt",
            &format!("[postgres]\nurl_env = \"DATABASE_URL\"\n{checks}{opt_in}"),
            &[("DATABASE_URL", rt_url.as_str())],
        ),
        spawn_agent(
            dir.path(),
            &certs,
            agents_addr,
            "obj-rt",
            "objects",
            "rt",
            &format!(
                "[objects]\nurl = \"file://{}\"\nverify_ignore = [\"_probe/\"]\nscratch_dir = \"scratch/obj-rt\"\n{opt_in}",
                target_objects.display()
            ),
            &[],
        ),
    ];
    fleet_ready(
        operator_addr,
        &certs,
        &["web-1", "db-1", "obj-1", "db-rt", "obj-rt"],
        dir.path(),
        Duration::from_secs(60),
    )
    .await;
    let operator = format!("https://{operator_addr}");
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&[
            "--coordinator",
            &operator,
            "--certs",
            certs.to_str().unwrap(),
        ]);
        rollcall(&all)
    };

    // prod's web process, serving and not in maintenance.
    let web_pid = eventually(
        "prod's web role to be up under its agent",
        Duration::from_secs(60),
        async || {
            let pids = supervised_pids(dir.path(), "web-1");
            let (status, _) = http_request(web_addr, "GET", "/readyz", None, None)
                .await
                .ok()?;
            (pids.len() == 1 && status == 200).then(|| pids[0])
        },
    )
    .await;
    assert!(
        cmdline(web_pid).is_some_and(|c| c.contains("web --listen")),
        "{:?}",
        cmdline(web_pid)
    );
    // The maintenance flag, polled from now until the end: every answer is kept.
    let polling = tokio_util::sync::CancellationToken::new();
    let poller = {
        let (polling, token) = (polling.clone(), token.clone());
        tokio::spawn(async move {
            let mut answers: Vec<Result<bool, String>> = Vec::new();
            while !polling.is_cancelled() {
                let answer =
                    match http_request(web_addr, "GET", "/admin/maintenance", Some(&token), None)
                        .await
                    {
                        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                            .map_err(|e| format!("{e}: {body}"))
                            .and_then(|v| {
                                v["maintenance"]
                                    .as_bool()
                                    .ok_or_else(|| format!("no maintenance flag in {body}"))
                            }),
                        Ok((status, body)) => Err(format!("{status}: {body}")),
                        Err(e) => Err(format!("{e:#}")),
                    };
                answers.push(answer);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };

    // A slot before prod has any point: a failed restore test saying so, not a log line.
    let failed = eventually(
        "a scheduled restore test without a point to fail visibly",
        Duration::from_secs(30),
        async || {
            let runs = ok(&run(&["runs", "--json"]), "runs");
            runs_of(&runs, "rt")
                .into_iter()
                .find(|r| r["state"] == "failed")
        },
    )
    .await;
    let failed_id = failed["id"].as_str().unwrap();
    let show = ok(&run(&["run", "show", failed_id, "--json"]), "run show");
    let reason = show["run"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("scheduled restore test found no point to restore")
            && reason.contains("environment prod has no recovery points yet")
            && reason.contains("rollcall backup --env prod"),
        "{show}"
    );

    // The point of prod, and prod as it stands after its backup.
    let backup = ok(
        &run(&["backup", "--env", "prod", "--wait", "--json"]),
        "backup of prod",
    );
    let point_id = backup["point"].as_str().unwrap().to_owned();
    let prod_tables = table_digests(&cluster, "cowork");
    let prod_objects = e2e::fleet::live_objects(&objects);
    assert!(!prod_objects.is_empty());
    let prod_commands: Vec<Vec<String>> = ["web-1", "db-1", "obj-1"]
        .iter()
        .map(|a| recorded(dir.path(), a))
        .collect();
    let after_backup = chrono::Utc::now();

    // Two scheduled restore tests of that point pass, started by the schedule alone.
    let passed = eventually(
        "two scheduled restore tests of rt to pass",
        Duration::from_secs(240),
        async || {
            let runs = ok(&run(&["runs", "--json"]), "runs");
            let passed: Vec<serde_json::Value> = runs_of(&runs, "rt")
                .into_iter()
                .filter(|r| r["state"] == "succeeded")
                .collect();
            (passed.len() >= 2).then_some(passed)
        },
    )
    .await;
    polling.cancel();
    let answers = poller.await.unwrap();
    for r in &passed {
        let id = r["id"].as_str().unwrap();
        assert_eq!(
            (&r["kind"], &r["point"]),
            (&"drill".into(), &point_id.as_str().into())
        );
        let show = ok(&run(&["run", "show", id, "--json"]), "run show");
        // Started by the schedule: no operator, after the backup.
        assert_eq!(show["run"]["started_by"], "", "{show}");
        let created = show["run"]["created_unix_ms"].as_i64().unwrap();
        assert!(created > after_backup.timestamp_millis(), "{show}");
        assert!(
            show["commands"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["agent"] == "db-rt" || c["agent"] == "obj-rt"),
            "{show}"
        );
        let report = ok(&run(&["report", id, "--format", "json"]), "report");
        let test = &report["restore_test"];
        assert_eq!(test["source_untouched"], true, "{report}");
        assert_eq!(test["source_agents_commanded"], serde_json::json!([]));
        assert_eq!(
            test["source_agents_known"],
            serde_json::json!(["db-1", "obj-1", "web-1"]),
            "{test}"
        );
        assert_eq!(test["teardown"], "done", "{test}");
        eprintln!(
            "measured: scheduled restore test {id} restored in {} ms",
            test["restore_ms"]
        );
    }
    // Torn down each time: the target is empty again. The schedule goes on firing, so look
    // between two runs: when none of rt's runs is unfinished.
    eventually(
        "the target empty with no restore test under way",
        Duration::from_secs(120),
        async || {
            let runs = ok(&run(&["runs", "--json"]), "runs");
            let idle = runs_of(&runs, "rt").iter().all(|r| {
                ["succeeded", "failed", "aborted"].contains(&r["state"].as_str().unwrap_or(""))
            });
            (idle
                && table_digests(&cluster, "cowork_rt").is_empty()
                && files(&target_objects).is_empty())
            .then_some(())
        },
    )
    .await;

    // prod never noticed: the same web process, never in maintenance, every answer a 200.
    assert!(answers.len() > 20, "polled {} times", answers.len());
    let not_open: Vec<&Result<bool, String>> =
        answers.iter().filter(|a| *a != &Ok(false)).collect();
    assert!(not_open.is_empty(), "prod's web said: {not_open:?}");
    assert_eq!(supervised_pids(dir.path(), "web-1"), vec![web_pid]);
    assert!(cmdline(web_pid).is_some_and(|c| c.contains("web --listen")));
    assert_eq!(table_digests(&cluster, "cowork"), prod_tables);
    let now = e2e::fleet::live_objects(&objects);
    assert_eq!(now, prod_objects);
    let dbs = databases(&cluster);
    assert!(!dbs.iter().any(|d| d.starts_with("cowork_pre_")), "{dbs:?}");
    let after: Vec<Vec<String>> = ["web-1", "db-1", "obj-1"]
        .iter()
        .map(|a| recorded(dir.path(), a))
        .collect();
    assert_eq!(after, prod_commands);

    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
}

const WEBHOOK_SECRET: &str = "restore-test-webhook-secret-42";

/// A delivery checked the way a receiver must (the signature over `<timestamp>.<body>` with
/// the shared secret, by ring's HMAC); returns its body.
fn signed_body(r: &Received) -> serde_json::Value {
    let timestamp = &r.headers["x-rollcall-timestamp"];
    let signature = r.headers["x-rollcall-signature"]
        .strip_prefix("sha256=")
        .unwrap();
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&r.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
    ring::hmac::verify(&key, &signed, &hex::decode(signature).unwrap())
        .expect("the signature verifies with the shared secret");
    let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"not the secret");
    assert!(ring::hmac::verify(&other, &signed, &hex::decode(signature).unwrap()).is_err());
    serde_json::from_slice(&r.body).unwrap()
}

/// Issue 20's failure tests. `rt-always` (teardown = "always", a worker role and a database
/// invariant that never holds) fails its verification after restoring: its worker is
/// stopped, the restored data are torn down all the same, the worker comes back, and the run
/// ends failed naming both the phase that failed and the teardown. Then prod's dump is
/// damaged in the repository: a restore test of `rt-dmg` (teardown on success) blocks, keeps
/// its target as it was for inspection (no teardown runs), and a `run.blocked` webhook
/// reaches a real receiver, signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restore_tests_tear_down_when_always_and_a_damaged_point_blocks_and_notifies() {
    install_crypto();
    let receiver = WebhookReceiver::start(0, false).await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    for db in ["cowork", "cowork_always", "cowork_dmg"] {
        cluster.create_database(db).unwrap();
    }
    let db_url = cluster.url("cowork");
    let objects = dir.path().join("objects");
    let (always_objects, dmg_objects) = (
        dir.path().join("objects-always"),
        dir.path().join("objects-dmg"),
    );
    let copied_objects = dir.path().join("objects-copied");
    for d in [&objects, &always_objects, &dmg_objects, &copied_objects] {
        std::fs::create_dir_all(d).unwrap();
    }
    let objects_url = format!("file://{}", objects.display());
    let data_env = [
        ("DATABASE_URL", db_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];
    cowork(&["migrate"], &data_env);
    cowork(&["seed", "--sessions", "4"], &data_env);
    let certs = certs_init(
        dir.path(),
        &[
            "db-1:database",
            "obj-1:objects",
            "db-always:database",
            "obj-always:objects",
            "worker-always:worker",
            "db-dmg:database",
            "obj-dmg:objects",
            "db-copied:database",
            "obj-copied:objects",
        ],
    );
    let repo = dir.path().join("repository");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let env = format!(
        r#"
[[notify]]
url = "{hook}"
secret = "env:ROLLCALL_WEBHOOK_SECRET"
retries = 2
backoff = "100ms"

[environments.prod]
rpo = "1h"
rto = "1h"
retention = "7days"
repository = "file://{repo}"
plan = "{plan}"
fleet = {{ database = 1, objects = 1 }}

[environments.rt-always]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
teardown = "always"
fleet = {{ worker = 1, database = 1, objects = 1 }}

[environments.rt-dmg]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
fleet = {{ database = 1, objects = 1 }}

[environments.rt-copied]
rpo = "1h"
rto = "1h"
retention = "7days"
restore_from = "prod"
fleet = {{ database = 1, objects = 1 }}
"#,
        hook = receiver.url(),
        repo = repo.display(),
        plan = plan.display(),
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let _coordinator = spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &[("ROLLCALL_WEBHOOK_SECRET", WEBHOOK_SECRET)],
    );
    let opt_in = "[restore_test]\nteardown = true\n";
    let db = |extra: &str| format!("[postgres]\nurl_env = \"DATABASE_URL\"\n{extra}");
    let obj = |path: &Path, name: &str, extra: &str| {
        format!(
            "[objects]\nurl = \"file://{}\"\nscratch_dir = \"scratch/{name}\"\n{extra}",
            path.display()
        )
    };
    let never_holds = "[[invariant]]\nname = \"never holds\"\nsql = \"SELECT 'always a row'\"\n";
    let (always_url, dmg_url) = (cluster.url("cowork_always"), cluster.url("cowork_dmg"));
    let worker = "[control]\nscale = \"process\"\n[control.process]\nprogram = \"/bin/sleep\"\nargs = [\"600\"]\nstop_grace = \"2s\"\n";
    // name, role, environment, data config, process environment
    type Spec<'a> = (&'a str, &'a str, &'a str, String, Vec<(&'a str, &'a str)>);
    let specs: Vec<Spec> = vec![
        (
            "db-1",
            "database",
            "prod",
            db(""),
            vec![("DATABASE_URL", db_url.as_str())],
        ),
        (
            "obj-1",
            "objects",
            "prod",
            obj(&objects, "obj-1", ""),
            vec![],
        ),
        (
            "db-always",
            "database",
            "rt-always",
            db(&format!("{never_holds}{opt_in}")),
            vec![("DATABASE_URL", always_url.as_str())],
        ),
        (
            "obj-always",
            "objects",
            "rt-always",
            obj(&always_objects, "obj-always", opt_in),
            vec![],
        ),
        (
            "worker-always",
            "worker",
            "rt-always",
            worker.to_owned(),
            vec![],
        ),
        (
            "db-dmg",
            "database",
            "rt-dmg",
            db(opt_in),
            vec![("DATABASE_URL", dmg_url.as_str())],
        ),
        (
            "obj-dmg",
            "objects",
            "rt-dmg",
            obj(&dmg_objects, "obj-dmg", opt_in),
            vec![],
        ),
        // A restore test whose database URL was copied from prod's.
        (
            "db-copied",
            "database",
            "rt-copied",
            db(opt_in),
            vec![("DATABASE_URL", db_url.as_str())],
        ),
        (
            "obj-copied",
            "objects",
            "rt-copied",
            obj(&copied_objects, "obj-copied", opt_in),
            vec![],
        ),
    ];
    let mut agents: Vec<Proc> = specs
        .iter()
        .map(|(name, role, env, data, vars)| {
            spawn_agent(dir.path(), &certs, agents_addr, name, role, env, data, vars)
        })
        .collect();
    let names: Vec<&str> = specs.iter().map(|s| s.0).collect();
    fleet_ready(
        operator_addr,
        &certs,
        &names,
        dir.path(),
        Duration::from_secs(60),
    )
    .await;
    let operator = format!("https://{operator_addr}");
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&[
            "--coordinator",
            &operator,
            "--certs",
            certs.to_str().unwrap(),
        ]);
        rollcall(&all)
    };
    let backup = ok(
        &run(&["backup", "--env", "prod", "--wait", "--json"]),
        "backup of prod",
    );
    let point_id = backup["point"].as_str().unwrap().to_owned();
    let worker_pid = eventually(
        "rt-always's worker to run",
        Duration::from_secs(30),
        async || {
            let pids = supervised_pids(dir.path(), "worker-always");
            (pids.len() == 1).then(|| pids[0])
        },
    )
    .await;

    // teardown = "always": verification fails after the restore; the teardown runs anyway,
    // the roles stopped first, and the run ends failed saying both.
    let drill = run(&[
        "drill",
        "--env",
        "rt-always",
        "--point",
        "latest",
        "--watch",
    ]);
    assert!(!drill.status.success());
    let runs = ok(&run(&["runs", "--json"]), "runs");
    let always = runs_of(&runs, "rt-always");
    let always_id = always[0]["id"].as_str().unwrap().to_owned();
    let show = ok(&run(&["run", "show", &always_id, "--json"]), "run show");
    assert_eq!(show["run"]["state"], "failed", "{show}");
    let reason = show["run"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("phase verify did not pass")
            && reason.contains("never holds")
            && reason.contains(
                "torn down all the same (teardown = \"always\"; ran stop-roles, \
                 teardown-postgres, teardown-objects, start-roles)"
            ),
        "{reason}"
    );
    let phase = |name: &str| {
        show["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no phase {name} in {show}"))
    };
    for name in [
        "stop-roles",
        "teardown-postgres",
        "teardown-objects",
        "start-roles",
    ] {
        assert_eq!(phase(name)["state"], "passed", "{name}: {show}");
    }
    // No report: the run never got that far.
    assert!(
        show["phases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "report" || p["state"] != "passed"),
        "{show}"
    );
    // The worker was stopped before the teardown touched the data, and runs again after.
    let index = |name: &str| phase(name)["index"].clone();
    assert!(
        show["commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["phase_index"] == index("stop-roles")
                && c["agent"] == "worker-always"
                && c["outcome"] == "succeeded"),
        "{show}"
    );
    assert!(
        phase("stop-roles")["finished_unix_ms"].as_i64().unwrap()
            <= phase("teardown-postgres")["started_unix_ms"]
                .as_i64()
                .unwrap(),
        "{show}"
    );
    let restarted = supervised_pids(dir.path(), "worker-always");
    assert_eq!(restarted.len(), 1, "{restarted:?}");
    assert_ne!(
        restarted[0], worker_pid,
        "the worker was stopped and started again"
    );
    assert!(cmdline(worker_pid).is_none(), "the old worker is gone");
    // Torn down: the target database is empty again, nothing kept beside it, no objects.
    assert!(table_digests(&cluster, "cowork_always").is_empty());
    let dbs = databases(&cluster);
    assert!(
        !dbs.iter().any(|d| d.starts_with("cowork_always_")),
        "{dbs:?}"
    );
    assert!(files(&always_objects).is_empty());

    // A restore test into prod's own database (its URL copied): refused at preflight, prod
    // as it was.
    let prod_tables = table_digests(&cluster, "cowork");
    let copied = run(&[
        "drill",
        "--env",
        "rt-copied",
        "--point",
        &point_id,
        "--watch",
    ]);
    assert!(!copied.status.success());
    let err = String::from_utf8_lossy(&copied.stderr);
    assert!(
        err.contains("phase preflight did not pass")
            && err.contains(&format!(
                "point {point_id} of environment prod was dumped from database cowork on the \
                 server this agent's database"
            ))
            && err.contains("a restore test must restore into another database or server"),
        "{err}"
    );
    assert_eq!(table_digests(&cluster, "cowork"), prod_tables);
    let dbs = databases(&cluster);
    assert!(!dbs.iter().any(|d| d.starts_with("cowork_pre_")), "{dbs:?}");

    // A damaged point: one byte of prod's dump flipped in the repository.
    let dump = std::fs::read_dir(repo.join("postgres"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(&point_id))
        .unwrap();
    let dump = if dump.is_dir() {
        std::fs::read_dir(&dump)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("data."))
            })
            .unwrap()
    } else {
        dump
    };
    let mut bytes = std::fs::read(&dump).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&dump, bytes).unwrap();
    // What the target holds before: a table and an object an operator would look at.
    cluster
        .psql(
            "cowork_dmg",
            "CREATE TABLE inspect_me (n int); INSERT INTO inspect_me VALUES (7)",
        )
        .unwrap();
    std::fs::write(dmg_objects.join("inspect-me.txt"), b"kept").unwrap();
    let target_tables = table_digests(&cluster, "cowork_dmg");
    let target_files = files(&dmg_objects);

    let drill = run(&["drill", "--env", "rt-dmg", "--point", &point_id, "--watch"]);
    assert!(!drill.status.success());
    let err = String::from_utf8_lossy(&drill.stderr);
    assert!(
        err.contains("is blocked") && err.contains("phase preflight did not pass"),
        "{err}"
    );
    let runs = ok(&run(&["runs", "--json"]), "runs");
    let dmg_id = runs_of(&runs, "rt-dmg")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let show = ok(&run(&["run", "show", &dmg_id, "--json"]), "run show");
    assert_eq!(show["run"]["state"], "blocked", "{show}");
    // Kept for inspection: no teardown ran, the target is as it was.
    assert!(
        show["phases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| !p["name"].as_str().unwrap().starts_with("teardown")),
        "{show}"
    );
    assert_eq!(table_digests(&cluster, "cowork_dmg"), target_tables);
    assert_eq!(files(&dmg_objects), target_files);

    // The webhooks: rt-always's failure and rt-dmg's block, each signed.
    let bodies = eventually(
        "the run.failed and run.blocked webhooks",
        Duration::from_secs(30),
        async || {
            let bodies: Vec<serde_json::Value> =
                receiver.received().iter().map(signed_body).collect();
            let has = |event: &str, id: &str| {
                bodies
                    .iter()
                    .any(|b| b["event"] == event && b["run_id"] == id)
            };
            (has("run.failed", &always_id) && has("run.blocked", &dmg_id)).then_some(bodies)
        },
    )
    .await;
    let blocked = bodies
        .iter()
        .find(|b| b["event"] == "run.blocked" && b["run_id"] == dmg_id.as_str())
        .unwrap();
    assert_eq!(blocked["environment"], "rt-dmg", "{blocked}");
    assert_eq!(blocked["state"], "blocked", "{blocked}");
    assert!(
        blocked.to_string().contains("phase preflight did not pass"),
        "{blocked}"
    );

    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
}
