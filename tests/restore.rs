//! Backup and restore end to end with real processes: a throwaway Postgres cluster holding
//! cowork-sim's data, a file:// object store and repository, the `rollcall` coordinator and
//! four agents over mTLS — web and worker supervising real `cowork-sim` roles, a database agent
//! and an objects agent. A backup makes a point; a disaster deletes rows and objects and adds
//! junk; a drill restores the point; then a corrupted dump fails at preflight, before freeze,
//! and so does a point with a damaged blob of what the restore would write.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use e2e::fleet::*;
use e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_and_a_drill_bring_back_rows_and_objects_and_keep_what_they_replace() {
    let f = Fleet::start().await;
    let run = |args: &[&str]| f.run(args);
    let (cluster, repo, objects, web_addr) = (&f.cluster, &f.repo, &f.objects, f.web_addr);
    let operator_token = f.operator_token.clone();
    let data_env = [
        ("DATABASE_URL", f.db_url.as_str()),
        ("OBJECT_STORE_URL", f.objects_url.as_str()),
    ];
    // A backup: Postgres and objects at once, then the point.
    let backup = run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let backup: serde_json::Value = serde_json::from_slice(&backup.stdout).unwrap();
    let point_id = backup["point"].as_str().unwrap().to_owned();
    // A dry run names the point `latest` is.
    let dry = run(&["drill", "--env", "test", "--point", "latest", "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && text.contains(&format!("to point latest, which is {point_id}")),
        "{text}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let points = run(&["points", "--env", "test", "--json"]);
    let points: serde_json::Value = serde_json::from_slice(&points.stdout).unwrap();
    let listed = &points["points"][0];
    assert_eq!(listed["id"], point_id.as_str());
    assert!(
        listed["objects"].as_u64().unwrap() > 0 && listed["postgres_bytes"].as_u64().unwrap() > 0
    );
    assert_eq!(listed["stale"], false);
    assert_eq!(listed["secret_refs"], 1);
    let verified = run(&["points", "verify", &point_id, "--full"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let pruned = run(&["points", "prune", "--env", "test", "--dry-run"]);
    let pruned: serde_json::Value = serde_json::from_slice(&pruned.stdout).unwrap();
    assert_eq!(
        pruned["deleted_points"].as_array().unwrap().len(),
        0,
        "{pruned}"
    );
    assert_eq!(pruned["kept_points"][0]["reason"], "newest", "{pruned}");
    // Break-glass, no coordinator: the same repository read by hand.
    let repo_url = format!("file://{}", repo.display());
    let by_hand = rollcall(&["repo", "verify", "--repo", &repo_url, "--point", &point_id]);
    assert!(
        by_hand.status.success(),
        "{}",
        String::from_utf8_lossy(&by_hand.stderr)
    );
    let listed = rollcall(&["repo", "points", "--repo", &repo_url]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&point_id));
    let point: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.join(format!("points/{point_id}.json"))).unwrap(),
    )
    .unwrap();
    let at_point = point["body"]["postgres"]["table_counts"].clone();
    assert!(
        at_point["sessions"].as_i64().is_some_and(|n| n >= 12),
        "{point}"
    );

    // The disaster: projections deleted, an artifact deleted, junk added.
    assert!(count(cluster, "cowork", "session_projections") > 0);
    cluster
        .psql("cowork", "DELETE FROM session_projections")
        .unwrap();
    let artifact = f.delete_first_artifact();
    std::fs::create_dir_all(objects.join("junk")).unwrap();
    std::fs::write(objects.join("junk/extra.bin"), b"not in the point").unwrap();
    // And a column shipped after the point (the runbook: a rollback must not drop it silently).
    cluster
        .psql("cowork", "ALTER TABLE sessions ADD COLUMN triage_note text")
        .unwrap();

    // Bad input first: an unknown point changes nothing.
    let unknown = run(&[
        "drill",
        "--env",
        "test",
        "--point",
        "20200101T000000Z-test-00000000",
    ]);
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("recovery point 20200101T000000Z-test-00000000 cannot be used"),
        "{err}"
    );

    let drill = run(&["drill", "--env", "test", "--point", "latest", "--watch"]);
    let out = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&drill.stderr)
    );
    assert!(
        out.contains("phase prepare-postgres passed")
            && out.contains("phase commit-postgres passed")
            && out.contains("phase restore-objects passed"),
        "{out}"
    );
    // The copy stored in the repository was written again once the run finished: it tells
    // the whole run (the unfreeze included) and measures the RTO as `rollcall report` does.
    let runs = run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let drill_id = runs[0]["id"].as_str().unwrap().to_owned();
    let stored = eventually(
        "the stored report rewritten once the drill succeeded",
        Duration::from_secs(30),
        async || {
            let text = std::fs::read(repo.join(format!("reports/{drill_id}.json"))).ok()?;
            let stored: serde_json::Value = serde_json::from_slice(&text).ok()?;
            (stored["run"]["state"] == "succeeded").then_some(stored)
        },
    )
    .await;
    // (With a warning: the schema column the disaster added is rolled back.)
    assert_eq!(stored["outcome"], "passed with warnings", "{stored}");
    assert_eq!(stored["run"]["state"], "succeeded", "{stored}");
    assert_eq!(stored["rto"]["until_phase"], "unfreeze", "{stored}");
    let markdown = std::fs::read_to_string(repo.join(format!("reports/{drill_id}.md"))).unwrap();
    assert!(!markdown.contains("still running"), "{markdown}");
    let asked = run(&["report", &drill_id, "--format", "json"]);
    let asked: serde_json::Value = serde_json::from_slice(&asked.stdout).unwrap();
    assert_eq!(
        asked["rto"]["until_at"], stored["rto"]["until_at"],
        "{asked}"
    );
    // The agents' progress reached the watcher: off a terminal, one line per stage.
    let progress: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" agent ") && l.contains(" bytes, "))
        .collect();
    assert!(
        progress
            .iter()
            .any(|l| l.contains("phase restore-objects agent") && l.ends_with(", done")),
        "{out}"
    );
    assert!(
        progress
            .iter()
            .any(|l| l.contains("phase prepare-postgres agent") && l.ends_with(" archives, done")),
        "{out}"
    );

    // Postgres equals the point (verify checked every count before the smoke); the smoke added
    // exactly one session; the pre-restore database is kept with the disaster in it.
    assert_eq!(
        count(cluster, "cowork", "workflows"),
        at_point["workflows"].as_i64().unwrap()
    );
    assert_eq!(
        count(cluster, "cowork", "sessions"),
        at_point["sessions"].as_i64().unwrap() + 1,
        "the point's sessions and the smoke's"
    );
    let pre: String = cluster
        .psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE 'cowork_pre_%'",
        )
        .unwrap()
        .trim()
        .to_owned();
    assert!(pre.starts_with("cowork_pre_r"), "{pre}");
    // The old database is kept with the disaster's column in it (its projections are no
    // measure: the worker rebuilds them in the live database until it is scaled to zero).
    let has_note = |db: &str| {
        cluster
            .psql(
                db,
                "SELECT count(*) FROM information_schema.columns \
                 WHERE table_name = 'sessions' AND column_name = 'triage_note'",
            )
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(has_note(&pre), "1", "the old database, kept as it was");
    assert_eq!(has_note("cowork"), "0", "the point's schema is live");
    // Objects equal the point; what the restore displaced is in quarantine.
    assert!(
        objects.join(&artifact).exists(),
        "the deleted artifact is back"
    );
    assert!(!objects.join("junk/extra.bin").exists());
    let quarantined = walk(&repo.join("quarantine"));
    assert!(
        quarantined.iter().any(|p| p.ends_with("junk/extra.bin")),
        "{quarantined:?}"
    );
    cowork(&["verify"], &data_env);
    // Roles are back and traffic resumed.
    assert!(
        maintenance(web_addr, &operator_token)
            .await
            .contains("\"maintenance\":false")
    );
    let runs = run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let drill_id = runs[0]["id"].as_str().unwrap().to_owned();
    let show = run(&["run", "show", &drill_id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let restore = show["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["action"] == "commit-postgres")
        .unwrap();
    assert_eq!(restore["outcome"], "succeeded");
    // Preflight named the column the restore rolls back: a warning and a follow-up, not a block.
    let report = run(&["report", &drill_id, "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let schema = report_check(&report, "kind", "schema");
    assert_eq!(
        (&schema["phase"], &schema["required"], &schema["passed"]),
        (&"preflight".into(), &false.into(), &false.into()),
        "{schema}"
    );
    assert!(
        schema["detail"]
            .as_str()
            .unwrap()
            .contains("public.sessions.triage_note"),
        "{schema}"
    );
    assert!(
        report["follow_ups"].to_string().contains("triage_note"),
        "{}",
        report["follow_ups"]
    );
    let verified: Vec<&serde_json::Value> = show["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "verify")
        .collect();
    assert_eq!(verified.len(), 3, "web, database and objects verified");
    assert!(
        verified.iter().all(|c| c["outcome"] == "succeeded"),
        "{verified:?}"
    );
    let smoke = show["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["action"] == "smoke")
        .unwrap();
    assert_eq!(smoke["outcome"], "succeeded", "{smoke}");

    // A corrupt dump: the drill stops at preflight, before anything in the fleet changes.
    let dump = std::fs::read_dir(repo.join("postgres"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(&point_id))
        .unwrap();
    // A parallel dump is a directory of archives: damage the main data archive.
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
    let bad = run(&["points", "verify", &point_id]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("failed verification"));
    let broken = run(&["drill", "--env", "test", "--point", &point_id, "--watch"]);
    assert!(!broken.status.success());
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(
        err.contains("is blocked") && err.contains("phase preflight did not pass"),
        "{err}"
    );
    assert!(
        maintenance(web_addr, &operator_token)
            .await
            .contains("\"maintenance\":false"),
        "never frozen"
    );

    f.stop();
}

/// A coordinator whose clock runs 10 minutes fast takes a backup and drills it like any other;
/// once its clock is corrected (restarted without the offset), the next point is `latest`
/// although the first one is stamped 10 minutes later: points go by the order the repository
/// committed them, and the fast one is flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_ten_minutes_fast_backs_up_and_drills_and_latest_survives_the_fix() {
    let mut f = Fleet::start_opts("90s", false, &[("coordinator", "+10m")]).await;
    let backup = |f: &Fleet| {
        let out = f.run(&["backup", "--env", "test", "--wait", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["point"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The run list is by stamp, and a drill the fast coordinator started is stamped 10 minutes
    // later than one the corrected coordinator starts: the new drill is the one not listed yet.
    let drills = |f: &Fleet| -> Vec<serde_json::Value> {
        let runs = f.run(&["runs", "--json"]);
        let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
        runs.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "drill")
            .cloned()
            .collect()
    };
    let drill_latest = |f: &Fleet| -> String {
        let before: Vec<serde_json::Value> = drills(f).iter().map(|r| r["id"].clone()).collect();
        let out = f.run(&["drill", "--env", "test", "--point", "latest", "--watch"]);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let new: Vec<serde_json::Value> = drills(f)
            .into_iter()
            .filter(|r| !before.contains(&r["id"]))
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        new[0]["point"].as_str().unwrap().to_owned()
    };
    let fast = backup(&f);
    assert_eq!(drill_latest(&f), fast, "the fast coordinator's drill");

    f.crash_and_restart_coordinator();
    fleet_ready(
        f.operator_addr,
        &f.certs,
        &["web-1", "worker-1", "db-1", "obj-1"],
        f.dir.path(),
        Duration::from_secs(60),
    )
    .await;
    let corrected = backup(&f);
    assert!(
        fast.as_str() > corrected.as_str(),
        "the first point's id is stamped later: {fast} {corrected}"
    );
    let points = f.run(&["points", "--env", "test", "--json"]);
    let points: serde_json::Value = serde_json::from_slice(&points.stdout).unwrap();
    let listed: Vec<&serde_json::Value> = points["points"].as_array().unwrap().iter().collect();
    let ids: Vec<&str> = listed.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [fast.as_str(), corrected.as_str()],
        "commit order: {points}"
    );
    assert_eq!(listed[0]["stamped_in_future"], true, "{points}");
    assert_eq!(listed[1]["stamped_in_future"], false, "{points}");
    assert_eq!(
        drill_latest(&f),
        corrected,
        "latest after the clock was fixed"
    );
    f.stop();
}

/// Clocks off by ten minutes either way change nothing: the database agent's clock runs 10
/// minutes fast and the objects agent's 10 minutes slow (libfaketime), and a backup and a
/// drill pass as with agreeing clocks (commands carry how long they may take, measured by each
/// agent from receipt, where an absolute deadline used to be refused on arrival by the fast
/// clock). `rollcall agents` shows each offset and warns about both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_whose_clocks_are_ten_minutes_off_back_up_and_drill() {
    let f = Fleet::start_opts("90s", false, &[("db-1", "+10m"), ("obj-1", "-10m")]).await;
    let backup = f.run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let point = serde_json::from_slice::<serde_json::Value>(&backup.stdout).unwrap()["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let drill = f.run(&["drill", "--env", "test", "--point", &point, "--watch"]);
    assert!(
        drill.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&drill.stdout),
        String::from_utf8_lossy(&drill.stderr)
    );
    let agents = f.run(&["agents", "--json"]);
    let agents: serde_json::Value = serde_json::from_slice(&agents.stdout).unwrap();
    let offset = |name: &str| {
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {agents}"))["clock_offset_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name}'s offset in {agents}"))
    };
    let minutes = |ms: i64| (ms as f64 / 60_000.0).round() as i64;
    assert_eq!(minutes(offset("db-1")), 10, "{agents}");
    assert_eq!(minutes(offset("obj-1")), -10, "{agents}");
    assert!(offset("web-1").abs() < 5_000, "{agents}");
    let text = f.run(&["agents"]);
    let text = String::from_utf8_lossy(&text.stdout);
    let warning = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("warning: agent {name}'s clock is 10m")))
            .unwrap_or_else(|| panic!("no clock warning for {name}: {text}"))
    };
    assert!(
        warning("db-1").contains("ahead of the coordinator's"),
        "{text}"
    );
    assert!(
        warning("obj-1").contains("behind the coordinator's"),
        "{text}"
    );
    assert!(!text.contains("agent web-1's clock"), "{text}");
    f.stop();
}

/// A point whose blob has the right size and flipped bytes, for an object the disaster deleted
/// (so the restore would write it): the drill blocks at preflight naming the key, and the fleet
/// is untouched — never frozen, no database swapped or prepared, the live objects and rows as
/// they were. Repaired, `run retry` proves the blob again and the restore writes the objects
/// from what preflight kept. Then a point whose manifest holds keys no store can hold (an
/// absolute one, one with `//`) blocks the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_blocks_the_drill_at_preflight_with_the_fleet_untouched() {
    let f = Fleet::start().await;
    let run = |args: &[&str]| f.run(args);
    let backup = run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let point_id = serde_json::from_slice::<serde_json::Value>(&backup.stdout).unwrap()["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let point: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.repo.join(format!("points/{point_id}.json"))).unwrap(),
    )
    .unwrap();
    let manifest_key = point["body"]["objects"]["manifest_key"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.repo.join(manifest_key)).unwrap()).unwrap();

    // The disaster deletes an artifact; the point's blob of it has one byte flipped.
    let artifact = f.delete_first_artifact();
    let sha = manifest["body"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == artifact.as_str())
        .unwrap_or_else(|| panic!("{artifact} in {manifest}"))["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let blob = f.repo.join("objects/blobs").join(&sha[..2]).join(&sha);
    let size = std::fs::metadata(&blob).unwrap().len();
    let flip = || {
        let mut bytes = std::fs::read(&blob).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&blob, bytes).unwrap();
    };
    flip();
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), size, "same size");
    // Cheap verification (sizes) cannot see it: only hashing the delta does.
    let quick = run(&["points", "verify", &point_id]);
    assert!(
        quick.status.success(),
        "{}",
        String::from_utf8_lossy(&quick.stderr)
    );
    let objects_before = live_objects(&f.objects);
    let sessions_before = count(&f.cluster, "cowork", "sessions");

    let drill = run(&["drill", "--env", "test", "--point", &point_id, "--watch"]);
    assert!(!drill.status.success());
    let err = String::from_utf8_lossy(&drill.stderr);
    assert!(
        err.contains("is blocked")
            && err.contains("phase preflight did not pass")
            && err.contains(&format!("(object {artifact}) is corrupt"))
            && err.contains("traffic was not frozen"),
        "{err}"
    );
    let runs = run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let drill_id = runs[0]["id"].as_str().unwrap().to_owned();
    let show = run(&["run", "show", &drill_id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["run"]["state"], "blocked", "{show}");
    let reason = show["run"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&artifact)
            && reason.contains(
                "traffic was not frozen; the live database was not swapped and no object was \
                 written"
            )
            && !reason.contains("undo"),
        "{reason}"
    );
    let sent: Vec<&str> = show["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert!(sent.iter().all(|a| *a == "preflight"), "{sent:?}");

    // The fleet is untouched.
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":false"),
        "never frozen"
    );
    let databases = f
        .cluster
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'cowork\\_%'",
        )
        .unwrap();
    assert_eq!(databases.trim(), "0", "no database prepared or swapped");
    assert_eq!(count(&f.cluster, "cowork", "sessions"), sessions_before);
    assert_eq!(
        live_objects(&f.objects),
        objects_before,
        "live objects as they were"
    );

    // Repaired: the retried preflight proves it, and the restore writes what preflight kept.
    flip();
    let retried = run(&["run", "retry", &drill_id]);
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    let watched = run(&["run", "watch", &drill_id]);
    assert!(
        watched.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(f.objects.join(&artifact).exists(), "the artifact is back");
    let restored = recorded_restore(&f.dir.path().join("state/obj-1")).unwrap();
    assert!(
        restored.restored >= 1 && restored.from_scratch == restored.restored,
        "{restored:?}"
    );
    assert!(
        !f.dir
            .path()
            .join("scratch/obj-1")
            .join(run_tag(&drill_id))
            .exists(),
        "the restore consumed its scratch"
    );

    // A point whose manifest (consistent with the point's record of it) holds keys no store
    // can hold as written: blocked at preflight naming both keys, the fleet untouched.
    let backup = run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(backup.status.success());
    let point_id = serde_json::from_slice::<serde_json::Value>(&backup.stdout).unwrap()["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let point_file = f.repo.join(format!("points/{point_id}.json"));
    let point: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&point_file).unwrap()).unwrap();
    let manifest_file = f
        .repo
        .join(point["body"]["objects"]["manifest_key"].as_str().unwrap());
    let (absolute, doubled) = ("/etc/rollcall-escape", "uploads//twice");
    let (manifest_sha, manifest_size) = rewrite_document(&manifest_file, |m| {
        m["objects"][0]["key"] = absolute.into();
        m["objects"][1]["key"] = doubled.into();
    });
    rewrite_document(&point_file, |p| {
        p["objects"]["manifest_sha256"] = manifest_sha.clone().into();
        p["objects"]["manifest_size"] = manifest_size.into();
    });
    f.delete_first_artifact();
    let objects_before = live_objects(&f.objects);
    let sessions_before = count(&f.cluster, "cowork", "sessions");
    let drill = run(&["drill", "--env", "test", "--point", &point_id, "--json"]);
    assert!(drill.status.success());
    let drill_id = serde_json::from_slice::<serde_json::Value>(&drill.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let watched = run(&["run", "watch", &drill_id]);
    assert!(!watched.status.success());
    let show = run(&["run", "show", &drill_id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["run"]["state"], "blocked", "{show}");
    let reason = show["run"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("phase preflight did not pass")
            && reason.contains(&format!("object key {absolute:?} is absolute"))
            && reason.contains(&format!("object key {doubled:?} has an empty segment"))
            && reason.contains("traffic was not frozen"),
        "{reason}"
    );
    let sent: Vec<&str> = show["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert!(sent.iter().all(|a| *a == "preflight"), "{sent:?}");
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":false"),
        "never frozen"
    );
    let tag = run_tag(&drill_id);
    let databases = f
        .cluster
        .psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname LIKE 'cowork\\_%{tag}'"),
        )
        .unwrap();
    assert_eq!(databases.trim(), "0", "no database prepared or swapped");
    assert_eq!(count(&f.cluster, "cowork", "sessions"), sessions_before);
    assert_eq!(live_objects(&f.objects), objects_before);
    assert!(!Path::new(absolute).exists());
    f.stop();
}

/// Rewrites a repository document (`{"format", "sha256", "body"}`) with `edit` applied to its
/// body and a matching sha256, as a writer with a bug would; returns the file's sha256 and size.
fn rewrite_document(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> (String, u64) {
    use sha2::{Digest, Sha256};
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut body = doc["body"].clone();
    edit(&mut body);
    let body = serde_json::to_string(&body).unwrap();
    let file = format!(
        "{{\"format\":{},\"sha256\":\"{}\",\"body\":{body}}}\n",
        doc["format"],
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    std::fs::write(path, &file).unwrap();
    (
        hex::encode(Sha256::digest(file.as_bytes())),
        file.len() as u64,
    )
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Postgres is prepared before anything is frozen: a prepare that fails (here pg_restore
/// meeting a full disk) blocks the drill with the live database, the objects and traffic as
/// they were, and `run retry` after the fix restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_blocks_with_the_fleet_untouched() {
    let f = Fleet::start_opts("90s", true, &[]).await;
    let backup = f.run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    // The disaster the drill would undo: a table emptied, an object gone.
    let projections = count(&f.cluster, "cowork", "session_projections");
    assert!(projections > 0);
    f.cluster
        .psql("cowork", "DELETE FROM session_projections")
        .unwrap();
    let artifact = f.delete_first_artifact();

    std::fs::write(&f.pg_restore_fails, b"").unwrap();
    let drill = f.run(&["drill", "--env", "test", "--point", "latest", "--watch"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&drill.stdout),
        String::from_utf8_lossy(&drill.stderr)
    );
    assert!(!drill.status.success(), "{out}");
    assert!(
        out.contains("phase prepare-postgres did not pass")
            && out.contains("No space left on device")
            && out.contains("traffic was not frozen"),
        "{out}"
    );
    assert!(
        !out.contains("phase freeze-writes"),
        "nothing after the prepare ran: {out}"
    );
    // Untouched: no swap, the live rows and objects as the disaster left them, web serving.
    let swapped = f
        .cluster
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'cowork_pre_%'",
        )
        .unwrap();
    assert_eq!(swapped.trim(), "0", "the live database was not swapped");
    assert_eq!(count(&f.cluster, "cowork", "session_projections"), 0);
    assert!(!f.objects.join(&artifact).exists(), "no object was written");
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":false"),
        "traffic was never frozen"
    );

    // The disk has room again: the retried prepare restores, and the drill finishes.
    std::fs::remove_file(&f.pg_restore_fails).unwrap();
    let runs = f.run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    let retried = f.run(&["run", "retry", &id]);
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    let watched = f.run(&["run", "watch", &id]);
    assert!(
        watched.status.success(),
        "{}{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(
        count(&f.cluster, "cowork", "session_projections") >= projections,
        "the point's projections are back (and the smoke's)"
    );
    assert!(f.objects.join(&artifact).exists(), "the object is back");
    f.stop();
}

/// SIGKILL the coordinator at several moments of a drill (before the first phase, at phase
/// boundaries, inside the restores — wherever the delay lands) and start a new one: every
/// drill finishes, the swap happened once per run, and a command re-sent after the crash was
/// answered from the agent's record instead of running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_drill_is_replaced_and_the_drill_finishes_once() {
    let mut f = Fleet::start().await;
    let backup = f.run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let point: serde_json::Value = serde_json::from_slice(&backup.stdout).unwrap();
    let point = point["point"].as_str().unwrap().to_owned();

    let mut replayed = 0;
    for delay_ms in [0u64, 120, 300, 600, 1200] {
        let started = f.run(&["drill", "--env", "test", "--point", &point, "--json"]);
        assert!(
            started.status.success(),
            "{}",
            String::from_utf8_lossy(&started.stderr)
        );
        let run: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
        let id = run["id"].as_str().unwrap().to_owned();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        f.crash_and_restart_coordinator();

        let show = f.succeeded(&id, Duration::from_secs(120)).await;
        let restores: Vec<&serde_json::Value> = show["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["action"] == "commit-postgres")
            .collect();
        assert_eq!(
            restores.len(),
            1,
            "one swap command for the run: {restores:?}"
        );
        assert_eq!(restores[0]["outcome"], "succeeded");
        replayed += show["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["replayed"] == true)
            .count();
        let tag = run_tag(&id);
        let databases = f
            .cluster
            .psql(
                "postgres",
                &format!("SELECT datname FROM pg_database WHERE datname LIKE 'cowork_%{tag}'"),
            )
            .unwrap();
        assert_eq!(
            databases.trim(),
            format!("cowork_pre_{tag}"),
            "the old database kept, no half-done restore left"
        );
        assert!(
            maintenance(f.web_addr, &f.operator_token)
                .await
                .contains("\"maintenance\":false")
        );
    }
    // A phase that was running when the coordinator died keeps its start time: its journaled
    // start is no later than its attempt's first phase.started event (a restart used to
    // journal a fresh start, so the report's restore timestamps moved to after the crash).
    let store = coordinator::store::open(&format!("sqlite://{}/state.db", f.dir.path().display()))
        .await
        .unwrap();
    let mut kept = 0;
    for run in store.list_runs(50).await.unwrap() {
        let events = store.events(&run.id, 0, 10_000).await.unwrap();
        for phase in store.phases(&run.id).await.unwrap() {
            let starts: Vec<_> = events
                .iter()
                .filter(|e| {
                    e.kind == "phase.started"
                        && e.payload["phase"] == phase.name.as_str()
                        && e.payload["attempt"] == phase.attempt
                })
                .map(|e| e.at)
                .collect();
            let Some(first) = starts.first() else {
                continue;
            };
            let started = phase.started_at.unwrap();
            assert!(
                started <= *first,
                "run {} phase {}: journaled start {started} after its first start {first}",
                run.id,
                phase.name
            );
            kept += usize::from(starts.len() > 1);
        }
    }
    eprintln!("commands answered from agents' records after a crash: {replayed}");
    eprintln!("phases started again after a crash, keeping their start time: {kept}");
    f.stop();
}

/// Drills whose checks fail stop `blocked` with the failing check named, and go on after a
/// fix: a wrong operator token (401 named, the token in no output), a row deleted after the
/// restore (count parity names the table and both numbers), a smoke that hangs (its timeout
/// named), and an artifact row whose object is missing from the point (the key named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checks_block_the_drill_and_name_what_failed() {
    let f = Fleet::start_with("20s").await;
    let run = |args: &[&str]| f.run(args);
    let mut outputs: Vec<String> = Vec::new();
    let mut keep = |out: &std::process::Output| -> (bool, String) {
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(text.clone());
        (out.status.success(), text)
    };
    let backup = run(&["backup", "--env", "test", "--wait", "--json"]);
    let (ok, text) = keep(&backup);
    assert!(ok, "{text}");
    let point_id = serde_json::from_slice::<serde_json::Value>(&backup.stdout).unwrap()["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let point: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.repo.join(format!("points/{point_id}.json"))).unwrap(),
    )
    .unwrap();
    let projections = point["body"]["postgres"]["table_counts"]["session_projections"]
        .as_i64()
        .unwrap();
    assert!(projections > 1, "{point}");

    // 1. The operator token the web agent's check presents is wrong.
    let wrong = format!(
        "{}0badc0ffee",
        &f.operator_token[..f.operator_token.len() - 10]
    );
    let token_file = f.dir.path().join("operator-token");
    std::fs::write(&token_file, &wrong).unwrap();
    // 0. And the database is gone (moved away here, to bring it back below): preflight says
    //    how to go on, before anything is frozen.
    let moved = (0..20).any(|_| {
        f.cluster
            .psql(
                "postgres",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'cowork'; \
                 ALTER DATABASE cowork RENAME TO cowork_away",
            )
            .is_ok()
    });
    assert!(moved, "could not move the live database away");
    let (ok, text) = keep(&run(&[
        "drill", "--env", "test", "--point", &point_id, "--watch",
    ]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("phase preflight did not pass")
            && text
                .contains("does not exist. If it was lost, create it empty (createdb) and retry")
            && text.contains(
                "traffic was not frozen; the live database was not swapped and no object was \
                 written — fix the cause, then `rollcall run retry"
            ),
        "{text}"
    );
    let runs = run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let drill = runs[0]["id"].as_str().unwrap().to_owned();
    // Back, but without one of its counted tables: the retried preflight notes the table it
    // could not count and lets the restore bring it back; verify stops at the wrong token.
    f.cluster
        .psql("postgres", "ALTER DATABASE cowork_away RENAME TO cowork")
        .unwrap();
    f.cluster.psql("cowork", "DROP TABLE usage_events").unwrap();
    // `run retry` without --detach follows the run like `run watch`, and fails when it blocks
    // again.
    let (ok, text) = keep(&run(&["run", "retry", &drill]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("is blocked")
            && text.contains("phase commit-postgres passed")
            && text.contains("phase verify did not pass")
            && text.contains("operator diagnostics")
            && text.contains("answered 401"),
        "{text}"
    );
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":true"),
        "traffic stays frozen while blocked"
    );

    // 2. The token is fixed, but a row disappears from the restored database before verify
    //    runs again.
    std::fs::write(&token_file, &f.operator_token).unwrap();
    f.cluster
        .psql(
            "cowork",
            "CREATE TABLE rollcall_test_stash AS SELECT * FROM session_projections \
             WHERE session_id = (SELECT min(session_id) FROM session_projections); \
             DELETE FROM session_projections WHERE session_id IN \
             (SELECT session_id FROM rollcall_test_stash)",
        )
        .unwrap();
    let retry_and_watch = |keep: &mut dyn FnMut(&std::process::Output) -> (bool, String)| {
        let (ok, text) = keep(&run(&["run", "retry", "--detach", &drill]));
        assert!(ok, "{text}");
        keep(&run(&["run", "watch", &drill]))
    };
    let (ok, text) = retry_and_watch(&mut keep);
    assert!(!ok, "{text}");
    let reason = text.lines().last().unwrap_or_default().to_owned();
    let reason = text
        .lines()
        .find(|l| l.contains("is blocked"))
        .unwrap_or(&reason);
    assert!(
        reason.contains("phase verify did not pass")
            && reason.contains("count session_projections")
            && reason.contains(&format!(
                "restored {}, point {projections}",
                projections - 1
            ))
            && !reason.contains("operator diagnostics"),
        "{text}"
    );

    // 3. The row is back; now the worker's smoke hangs past its timeout.
    f.cluster
        .psql(
            "cowork",
            "INSERT INTO session_projections SELECT * FROM rollcall_test_stash; \
             DROP TABLE rollcall_test_stash",
        )
        .unwrap();
    std::fs::write(f.dir.path().join("hang-smoke"), b"").unwrap();
    let (ok, text) = retry_and_watch(&mut keep);
    assert!(!ok, "{text}");
    assert!(
        text.contains("phase check-references passed")
            && text.contains("phase worker-smoke did not pass")
            && text.contains("did not finish within 20s"),
        "{text}"
    );

    // 4. The smoke works again: the drill finishes and traffic resumes.
    std::fs::remove_file(f.dir.path().join("hang-smoke")).unwrap();
    let (ok, text) = retry_and_watch(&mut keep);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("run {drill} succeeded")), "{text}");
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":false")
    );
    let report = run(&["report", &drill, "--format", "json"]);
    let (ok, text) = keep(&report);
    assert!(ok, "{text}");
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let reference = report_check(&report, "kind", "reference");
    assert_eq!(reference["passed"], true, "{reference}");
    let absent = report_check(&report, "name", "counted tables present");
    assert!(
        absent["passed"] == false
            && absent["required"] == false
            && absent["detail"]
                .as_str()
                .unwrap()
                .starts_with("the live database lacks usage_events: no count before"),
        "{absent}"
    );
    assert!(
        reference["detail"]
            .as_str()
            .unwrap()
            .contains("every object present; checked all"),
        "{reference}"
    );

    // 5. An artifact row whose object was gone when the point was taken: verify passes (the
    //    store equals the manifest), the reference check names the missing key.
    let artifact: String = f
        .cluster
        .psql(
            "cowork",
            "SELECT object_key FROM artifact_index ORDER BY object_key DESC LIMIT 1",
        )
        .unwrap()
        .trim()
        .to_owned();
    std::fs::remove_file(f.objects.join(&artifact)).unwrap();
    let (ok, text) = keep(&run(&["backup", "--env", "test", "--wait"]));
    assert!(ok, "{text}");
    let (ok, text) = keep(&run(&[
        "drill", "--env", "test", "--point", "latest", "--watch",
    ]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("phase verify passed")
            && text.contains("phase check-references did not pass")
            && text.contains("artifact objects")
            && text.contains(&format!("1 missing from the store: {artifact}")),
        "{text}"
    );
    let runs = run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let second = runs[0]["id"].as_str().unwrap().to_owned();
    for id in [&drill, &second] {
        keep(&run(&["run", "show", id, "--json"]));
        keep(&run(&["report", id]));
    }
    let (ok, text) = keep(&run(&["run", "abort", &second]));
    assert!(ok && text.contains("frozen"), "{text}");

    // The wrong token reached no output: not the CLI's, not a log, not a stored report.
    let mut places = outputs;
    for file in walk(f.dir.path()) {
        let readable = file.ends_with(".log") || file.contains("/reports/");
        if readable && let Ok(text) = std::fs::read_to_string(&file) {
            places.push(format!("{file}:\n{text}"));
        }
    }
    assert!(places.len() > 10, "{}", places.len());
    for text in &places {
        assert!(!text.contains(&wrong), "the wrong token leaked:\n{text}");
        assert!(
            !text.contains(&f.operator_token),
            "the operator token leaked:\n{text}"
        );
    }
    f.stop();
}

const SHARDED_PLAN: &str = include_str!("plans/objects-only.toml");

/// The restore-objects output an agent recorded in its state directory (one result per JSON
/// file, as the agent replays them).
fn recorded_restore(state: &Path) -> Option<api::model::output::RestoreObjectsOutput> {
    use api::model::{ActionKind, ActionOutput, CommandResult, ResultDetail};
    walk(&state.join("results")).iter().find_map(|file| {
        let result: CommandResult = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        let Some(ResultDetail::Output(output)) = result.detail else {
            return None;
        };
        match ActionOutput::decode(ActionKind::RestoreObjects, &output) {
            Ok(ActionOutput::RestoreObjects(restore)) => Some(restore),
            _ => None,
        }
    })
}

/// Two objects agents on one live store (the fleet declares objects = 2) restore one point in
/// a drill: each restores its own shard of the keys, and together they make the store equal
/// the point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_objects_agents_restore_a_point_in_two_shards() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    for i in 0..60 {
        let path = objects.join(format!("artifacts/{}/{i:03}.bin", i % 5));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("artifact {i};").repeat(i + 1)).unwrap();
    }
    let objects_url = format!("file://{}", objects.display());
    let repo = dir.path().join("repository");
    let repo_url = format!("file://{}", repo.display());
    let snap = rollcall(&[
        "repo",
        "snapshot",
        "--store",
        &objects_url,
        "--repo",
        &repo_url,
        "--env",
        "test",
    ]);
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    let point = serde_json::from_slice::<serde_json::Value>(&snap.stdout).unwrap()["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut at_point = walk(&objects);
    at_point.sort();
    let bodies = |files: &[String]| -> Vec<Vec<u8>> {
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    };
    let expected = bodies(&at_point);

    // The disaster: ten objects deleted, five overwritten, junk added.
    for f in &at_point[..10] {
        std::fs::remove_file(f).unwrap();
    }
    for f in &at_point[10..15] {
        std::fs::write(f, b"overwritten").unwrap();
    }
    std::fs::create_dir_all(objects.join("junk")).unwrap();
    for i in 0..6 {
        std::fs::write(objects.join(format!("junk/{i}")), b"not in the point").unwrap();
    }

    let certs = certs_init(
        dir.path(),
        &[
            "web-1:web",
            "worker-1:worker",
            "obj-1:objects",
            "obj-2:objects",
        ],
    );
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, SHARDED_PLAN).unwrap();
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let env = format!(
        r#"
    [environments.test]
    rpo = "1h"
    rto = "1h"
    retention = "7days"
    repository = "{repo_url}"
    plan = "{plan}"
    fleet = {{ web = 1, worker = 1, objects = 2 }}
    "#,
        plan = plan.display()
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let spawn = |name: &str, args: &[&str]| spawn_rollcall(name, dir.path(), args, &[]);
    let _coordinator = spawn(
        "coordinator",
        &["coordinator", "--config", config.to_str().unwrap()],
    );
    let marker = dir.path().join("frozen");
    let web_control = format!(
        "[control]\nfreeze = \"exec\"\n[control.exec]\nfreeze = [\"touch\", \"{m}\"]\nunfreeze = [\"rm\", \"{m}\"]\n",
        m = marker.display()
    );
    let worker_control = "[control]\nscale = \"process\"\n[control.process]\nprogram = \"sleep\"\nargs = [\"3600\"]\nreplicas = 1\nstop_grace = \"1s\"\n";
    let obj_data = |name: &str| {
        format!(
            "[objects]\nurl = \"{objects_url}\"\nparallelism = 4\nscratch_dir = \"scratch/{name}\"\n"
        )
    };
    let (obj_1, obj_2) = (obj_data("obj-1"), obj_data("obj-2"));
    let names = ["web-1", "worker-1", "obj-1", "obj-2"];
    let mut agents = Vec::new();
    for (name, role, extra) in [
        ("web-1", "web", web_control.as_str()),
        ("worker-1", "worker", worker_control),
        ("obj-1", "objects", obj_1.as_str()),
        ("obj-2", "objects", obj_2.as_str()),
    ] {
        let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, extra);
        agents.push(spawn(name, &["agent", "--config", cfg.to_str().unwrap()]));
    }
    fleet_ready(
        operator_addr,
        &certs,
        &names,
        dir.path(),
        Duration::from_secs(60),
    )
    .await;

    let operator = format!("https://{operator_addr}");
    let drill = rollcall(&[
        "drill",
        "--env",
        "test",
        "--point",
        &point,
        "--watch",
        "--coordinator",
        &operator,
        "--certs",
        certs.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&drill.stderr)
    );
    assert!(
        out.contains("phase restore-objects passed") && out.contains("phase verify passed"),
        "{out}"
    );

    // The store equals the point; the junk went to the repository's quarantine.
    let mut now = walk(&objects);
    now.sort();
    assert_eq!(now, at_point);
    assert_eq!(bodies(&now), expected);
    // Beside the quarantine, each shard's record of what it was about to change (for undo).
    let (records, quarantined): (Vec<String>, Vec<String>) = walk(&repo.join("quarantine"))
        .into_iter()
        .partition(|p| p.contains(".records/"));
    assert_eq!(quarantined.len(), 6 + 5, "junk and overwritten, once each");
    assert_eq!(records.len(), 2, "one record per shard: {records:?}");

    // Each agent restored a different shard of 2; together every damaged object, once.
    let results: Vec<api::model::output::RestoreObjectsOutput> = ["obj-1", "obj-2"]
        .iter()
        .map(|n| {
            recorded_restore(&dir.path().join("state").join(n))
                .unwrap_or_else(|| panic!("{n} recorded no restore-objects result"))
        })
        .collect();
    let mut shards: Vec<(u32, u32)> = results.iter().map(|r| (r.shard, r.shards)).collect();
    shards.sort();
    assert_eq!(shards, [(0, 2), (1, 2)], "{results:?}");
    let sum = |field: fn(&api::model::output::RestoreObjectsOutput) -> u64| {
        results.iter().map(field).sum::<u64>()
    };
    assert_eq!(sum(|r| r.restored), 15, "{results:?}");
    assert_eq!(sum(|r| r.replaced), 5, "{results:?}");
    assert_eq!(sum(|r| r.removed), 6, "{results:?}");
    assert_eq!(sum(|r| r.unchanged), 45, "{results:?}");
    // The drill report adds the shards up.
    let run_id = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("run ")?.strip_suffix(" succeeded"))
        .unwrap_or_else(|| panic!("no run id in: {out}"));
    let report = rollcall(&[
        "report",
        run_id,
        "--format",
        "json",
        "--coordinator",
        &operator,
        "--certs",
        certs.to_str().unwrap(),
    ]);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let objects = &report["objects"];
    assert_eq!(
        (
            &objects["restored"],
            &objects["replaced"],
            &objects["removed"],
            &objects["unchanged"]
        ),
        (&15.into(), &5.into(), &6.into(), &45.into()),
        "{objects}"
    );
    assert_eq!(objects["restore_agent"], "obj-1, obj-2", "{objects}");
    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
}
