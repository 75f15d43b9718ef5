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

    // teardown = "never": the restored data stay in the target for inspection.
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

    // On its schedule, rt-sched tests a random point of prod from the last hour (the only
    // one) by itself, and tears it down; slots before the backup found no point and started
    // nothing.
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
    assert!(files(&targets[3].objects).is_empty());

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
