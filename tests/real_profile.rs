//! Rollcall against cowork-sim's real profile, the service that is not kind to it (`cloud_`
//! tables, no maintenance mode, web that migrates on boot and exits when Postgres ends its
//! connection, roles that need their overlay file): the example configs in
//! `deploy/cowork-sim-real/` load, and a real-process fleet of that profile (no gateway, the
//! service running as a non-superuser owner of its database) is backed up, broken and drilled
//! with the default plan, writes frozen at the database.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use e2e::fleet::*;
use e2e::*;

/// Every agent config in `deploy/cowork-sim-real/` parses and passes the agent's checks of
/// its checks, data plane and role control (the overlay directory included); the coordinator's
/// maps every runbook row to a `cloud_` count key.
#[test]
fn the_real_profile_example_configs_load() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cowork-sim-real");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&deploy).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml")
            && path.file_name().is_some_and(|n| n != "rollcall.toml")
        {
            files.push(path);
        }
    }
    files.sort();
    assert_eq!(files.len(), 5, "{files:?}");
    let state = tempfile::tempdir().unwrap();
    for file in &files {
        let shown = file.display();
        let config: agent::config::AgentConfig =
            api::config::load_toml(file, "deploy/agent.toml").unwrap_or_else(|e| panic!("{e}"));
        agent::checks::Checks::from_config(
            file,
            &config.checks,
            &config.invariants,
            &config.references,
            config.smoke.as_ref(),
        )
        .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
        agent::data::DataPlane::from_config(
            file,
            &config.name,
            &config.environment,
            config.postgres.as_ref(),
            config.objects.as_ref(),
        )
        .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
        agent::control::RoleControl::from_config(
            file,
            &config.control,
            &state.path().join(&config.name),
        )
        .unwrap_or_else(|e| panic!("{shown}: {e:#}"));
        // No maintenance mode to freeze through.
        assert!(config.control.freeze.is_none(), "{shown}");
        for invariant in &config.invariants {
            assert!(
                invariant.sql.contains("cloud_"),
                "{shown}: {}",
                invariant.name
            );
        }
    }
    let overlay = std::fs::read_to_string(deploy.join("overlay/cowork-sim.toml")).unwrap();
    assert!(overlay.contains("profile = \"real\""), "{overlay}");

    let loaded = coordinator::config::load(&deploy.join("rollcall.toml")).unwrap();
    let staging = &loaded.environments["staging"];
    assert!(!staging.fleet.contains_key("gateway"));
    let rows: Vec<(&str, &str)> = staging
        .report_rows
        .iter()
        .map(|r| (r.label.as_str(), r.count.as_str()))
        .collect();
    assert_eq!(rows.len(), 8, "{rows:?}");
    assert!(
        rows.iter().all(|(_, count)| count.starts_with("cloud_")),
        "{rows:?}"
    );
    assert_eq!(rows[0], ("Sessions", "cloud_sessions"));
    assert_eq!(
        rows[7],
        ("Dead deliveries", "cloud_channel_deliveries[status=dead]")
    );
}

/// A fingerprint of what a restore must bring back exactly and what no smoke touches: the
/// point's tenants, bindings, BYOK metadata, subscriptions, cursors, deliveries, artifact rows
/// and the events of its sessions, workflow definitions.
fn fingerprint(cluster: &ephemeral_pg::Cluster, sessions: &str) -> Vec<(String, String)> {
    let queries = [
        ("tenants", "SELECT t::text FROM cloud_tenants t".to_owned()),
        (
            "bindings",
            "SELECT t::text FROM cloud_channel_bindings t".to_owned(),
        ),
        (
            "byok",
            "SELECT t::text FROM cloud_byok_secrets t".to_owned(),
        ),
        (
            "subscriptions",
            "SELECT t::text FROM cloud_subscriptions t".to_owned(),
        ),
        (
            "cursors",
            "SELECT t::text FROM cloud_channel_session_bindings t".to_owned(),
        ),
        (
            "deliveries",
            "SELECT t::text FROM cloud_channel_deliveries t".to_owned(),
        ),
        (
            "workflows",
            "SELECT (id, tenant_id, name, prompt, schedule_seconds)::text FROM cloud_workflows"
                .to_owned(),
        ),
        (
            "artifacts",
            format!("SELECT t::text FROM cloud_artifact_index t WHERE session_id IN ({sessions})"),
        ),
        (
            "events",
            format!("SELECT t::text FROM cloud_session_events t WHERE session_id IN ({sessions})"),
        ),
    ];
    queries
        .into_iter()
        .map(|(name, rows)| {
            let sql = format!("SELECT count(*) || ':' || md5(coalesce(string_agg(r, '|' ORDER BY r), '')) FROM ({rows}) AS x(r)");
            (
                name.to_owned(),
                cluster.psql("cowork", &sql).unwrap().trim().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_profile_fleet_drills_with_the_default_plan_frozen_at_the_database() {
    let f = Fleet::start_real().await;
    let run = |args: &[&str]| f.run(args);
    let cluster = &f.cluster;

    let backup = ok(
        &run(&["backup", "--env", "test", "--wait", "--json"]),
        "backup",
    );
    let point_id = backup["point"].as_str().unwrap().to_owned();
    let sessions = cluster
        .psql(
            "cowork",
            // The seeded sessions: a workflow's session may be mid-command at the point, and
            // the worker processes it again after the restore (new events, new artifact rows).
            "SELECT string_agg(quote_literal(s.id), ',' ORDER BY s.id) FROM cloud_sessions s \
             WHERE NOT EXISTS (SELECT 1 FROM cloud_workflow_runs r WHERE r.session_id = s.id) \
             AND NOT EXISTS (SELECT 1 FROM cloud_session_commands c \
                             WHERE c.session_id = s.id AND c.status <> 'acked')",
        )
        .unwrap()
        .trim()
        .to_owned();
    let at_point = fingerprint(cluster, &sessions);
    let objects_at_point = live_objects(&f.objects);
    assert!(!objects_at_point.is_empty());

    // The disaster: dead deliveries and an artifact lost, workflows and keys altered, junk.
    let dead: i64 = cluster
        .psql(
            "cowork",
            "SELECT count(*) FROM cloud_channel_deliveries WHERE status = 'dead'",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    cluster
        .psql(
            "cowork",
            "DELETE FROM cloud_channel_deliveries WHERE status IN ('dead', 'failed'); \
             UPDATE cloud_workflows SET name = 'broken'; \
             UPDATE cloud_byok_secrets SET last4 = 'XXXX'",
        )
        .unwrap();
    let artifact = cluster
        .psql(
            "cowork",
            "SELECT object_key FROM cloud_artifact_index ORDER BY object_key LIMIT 1",
        )
        .unwrap()
        .trim()
        .to_owned();
    std::fs::remove_file(f.objects.join(&artifact)).unwrap();
    std::fs::create_dir_all(f.objects.join("junk")).unwrap();
    std::fs::write(f.objects.join("junk/extra.bin"), b"not in the point").unwrap();
    assert_ne!(fingerprint(cluster, &sessions), at_point);

    // The default plan: no plan file in the environment.
    let drill = run(&["drill", "--env", "test", "--point", &point_id, "--watch"]);
    let out = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success(),
        "{out}\n{}\n{}",
        String::from_utf8_lossy(&drill.stderr),
        log_tails(f.dir.path(), 40)
    );
    let runs = ok(&run(&["runs", "--json"]), "runs");
    let drill_id = runs[0]["id"].as_str().unwrap().to_owned();
    let report = eventually(
        "the stored report rewritten once the drill succeeded",
        Duration::from_secs(30),
        async || {
            let text = std::fs::read(f.repo.join(format!("reports/{drill_id}.json"))).ok()?;
            let stored: serde_json::Value = serde_json::from_slice(&text).ok()?;
            (stored["run"]["state"] == "succeeded").then_some(stored)
        },
    )
    .await;
    assert!(
        report["outcome"].as_str().unwrap().starts_with("passed"),
        "{report}"
    );
    assert_eq!(report["run"]["plan"], "default", "{report}");
    assert_eq!(report["target"]["point_id"], point_id.as_str());
    // Every runbook row is filled: before, at the point, after, and after equals the point.
    let rows: Vec<&serde_json::Value> = report["counts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["configured"] == true)
        .collect();
    assert_eq!(rows.len(), 8, "{report}");
    for row in &rows {
        for key in ["before", "at_point", "after"] {
            assert!(row[key].is_i64(), "{key} of {row}");
        }
        assert_eq!(row["matches_point"], true, "{row}");
    }
    let dead_row = rows
        .iter()
        .find(|r| r["key"] == "cloud_channel_deliveries[status=dead]")
        .unwrap();
    assert_eq!(
        dead_row["before"], 0,
        "the disaster deleted them: {dead_row}"
    );
    assert_eq!(dead_row["at_point"], dead, "{dead_row}");
    let markdown = std::fs::read_to_string(f.repo.join(format!("reports/{drill_id}.md"))).unwrap();
    for row in &rows {
        let label = format!("| {} |", row["label"].as_str().unwrap());
        let line = markdown
            .lines()
            .find(|l| l.starts_with(&label))
            .unwrap_or_else(|| panic!("no {label} row: {markdown}"));
        assert!(!line.contains("not recorded"), "{line}");
    }
    // Web came back after the restore without migrating (its first_start_env), where its
    // first start migrated on boot.
    let web_logs = replica_logs(f.dir.path(), "web");
    assert!(
        !web_logs.is_empty(),
        "no web replica log under {}",
        f.dir.path().display()
    );
    assert!(
        web_logs.iter().any(|l| l.contains("not migrating on boot")),
        "{}",
        web_logs.join("\n---\n")
    );
    // The smokes ran and passed: the worker's wrote its prompt while web was frozen.
    for phase in ["worker-smoke", "scheduler-smoke"] {
        let smoke = report_check(&report, "phase", phase);
        assert_eq!(smoke["passed"], true, "{smoke}");
    }

    // Whether web noticed the freeze's ended connections before the scale-to-zero stopped it
    // is a race (it polls every 250 ms), so it is not asserted here: ending the sessions is
    // proven in tests/db_freeze.rs and crates/repository/tests/swap.rs.

    // The restored data equals the point; the objects too, the junk quarantined.
    assert_eq!(fingerprint(cluster, &sessions), at_point);
    let now = live_objects(&f.objects);
    for (key, bytes) in &objects_at_point {
        assert_eq!(now.get(key), Some(bytes), "{key}");
    }
    assert!(!f.objects.join("junk/extra.bin").exists());
    // The freeze is gone from the live database: the app role writes again.
    let settings = cluster
        .psql(
            "cowork",
            &format!(
                "SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole \
                 JOIN pg_database d ON d.oid = s.setdatabase \
                 WHERE r.rolname = '{REAL_APP_ROLE}' AND d.datname = 'cowork'"
            ),
        )
        .unwrap();
    assert_eq!(settings.trim(), "0", "the freeze was left on the role");
    let tokens: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.dir.path().join("tokens.json")).unwrap()).unwrap();
    let desktop = tokens["desktop"][0]["token"].as_str().unwrap().to_owned();
    eventually(
        "web to accept a write after the unfreeze",
        Duration::from_secs(30),
        async || {
            let (status, _) = http_request(
                f.web_addr,
                "POST",
                "/api/sessions",
                Some(&desktop),
                Some(r#"{"title":"after the drill"}"#),
            )
            .await
            .ok()?;
            (status == 201).then_some(())
        },
    )
    .await;
    f.stop();
}

/// The replica logs of the agents whose state directory names `role`.
fn replica_logs(dir: &Path, role: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("replica-"))
                && path.to_string_lossy().contains(role)
            {
                found.push(std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    found
}
