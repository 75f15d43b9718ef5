//! `rollcall run undo` end to end, on the restore tests' fleet of real processes
//! (`e2e::fleet`): after a finished drill (refused without --force, then the rows and objects
//! from just before the drill are back and the restored database is kept), after a drill that
//! blocked after the swap and the object restore (no --force needed: traffic never resumed),
//! and after a drill that changed nothing (refused, no run started). Bad input is named.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use e2e::fleet::*;

/// The smoke's sessions: the worker smoke of a drill and of an undo each add one.
const NOT_SMOKE: &str =
    "session_id NOT IN (SELECT id FROM sessions WHERE title = 'rollcall smoke')";

/// What the live database holds, table by table (a digest of every row, smoke sessions left
/// out, and the count).
fn rows(cluster: &ephemeral_pg::Cluster, db: &str) -> BTreeMap<&'static str, String> {
    let digest = |table: &str, filter: &str| {
        cluster
            .psql(
                db,
                &format!(
                    "SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, '|' ORDER BY \
                     t::text)), '-') FROM {table} t WHERE {filter}"
                ),
            )
            .unwrap()
            .trim()
            .to_owned()
    };
    BTreeMap::from([
        ("sessions", digest("sessions", "title <> 'rollcall smoke'")),
        ("session_events", digest("session_events", NOT_SMOKE)),
        (
            "session_projections",
            digest("session_projections", NOT_SMOKE),
        ),
        ("artifact_index", digest("artifact_index", NOT_SMOKE)),
        ("workflows", digest("workflows", "true")),
    ])
}

fn databases(cluster: &ephemeral_pg::Cluster, like: &str) -> Vec<String> {
    cluster
        .psql(
            "postgres",
            &format!("SELECT datname FROM pg_database WHERE datname LIKE '{like}' ORDER BY 1"),
        )
        .unwrap()
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The newest run's id (`rollcall runs` lists newest first).
fn newest_run(f: &Fleet) -> String {
    let runs = f.run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    runs[0]["id"].as_str().unwrap().to_owned()
}

/// The live objects, leaving out what smoke sessions wrote (the worker smoke of the drill and
/// of the undo add artifacts; their sessions are in `dbs`).
fn objects_but_smoke(f: &Fleet, dbs: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let mut smoke = std::collections::BTreeSet::new();
    for db in dbs {
        let keys = f
            .cluster
            .psql(
                db,
                &format!("SELECT object_key FROM artifact_index WHERE {NOT_SMOKE_OR}"),
            )
            .unwrap();
        smoke.extend(keys.lines().map(|k| k.trim().to_owned()));
    }
    let mut objects = live_objects(&f.objects);
    objects.retain(|k, _| !smoke.contains(k));
    objects
}

const NOT_SMOKE_OR: &str = "session_id IN (SELECT id FROM sessions WHERE title = 'rollcall smoke')";

/// Rows changed, an object deleted, junk added: what a drill restores over. Only what the
/// service leaves alone while it runs (a worker rebuilds missing projections by itself), so
/// the rows from before the drill can be compared exactly after the undo.
fn disaster(f: &Fleet) {
    f.cluster
        .psql(
            "cowork",
            "UPDATE sessions SET title = title || ' (edited after the point)'; \
             UPDATE workflows SET name = name || ' (edited after the point)'",
        )
        .unwrap();
    f.delete_first_artifact();
    std::fs::create_dir_all(f.objects.join("junk")).unwrap();
    std::fs::write(f.objects.join("junk/extra.bin"), b"not in the point").unwrap();
}

/// The undo of a finished drill: refused without --force (writes since the unfreeze would stay
/// only in the kept copy), then the rows and the objects from just before the drill are back
/// exactly, the restored database is kept as `<db>_undone_<tag>`, traffic resumed, and the
/// undo has its own report. Unknown runs, backups and undos of undos are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_after_a_finished_drill_needs_force_and_brings_back_what_was_there() {
    let f = Fleet::start().await;
    let backup = f.run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(backup.status.success(), "{}", text(&backup));
    let backup_id = newest_run(&f);
    disaster(&f);
    let rows_before = rows(&f.cluster, "cowork");
    let objects_before = objects_but_smoke(&f, &["cowork"]);

    let drill = f.run(&["drill", "--env", "test", "--point", "latest", "--watch"]);
    assert!(drill.status.success(), "{}", text(&drill));
    let drill_id = newest_run(&f);
    let tag = run_tag(&drill_id);
    let undone = format!("cowork_undone_{tag}");
    assert_ne!(
        rows(&f.cluster, "cowork"),
        rows_before,
        "the drill restored"
    );
    assert_ne!(objects_but_smoke(&f, &["cowork"]), objects_before);

    // Bad input: one line naming it and what to do; nothing starts.
    let unknown = f.run(&["run", "undo", "drill-test-nope"]);
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("no run drill-test-nope") && err.contains("`rollcall runs` lists"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let of_backup = f.run(&["run", "undo", &backup_id]);
    assert!(!of_backup.status.success());
    let err = String::from_utf8_lossy(&of_backup.stderr);
    assert!(
        err.contains(&format!("run {backup_id} is a backup")) && err.contains("nothing to undo"),
        "{err}"
    );

    // The drill unfroze the fleet: writes since then are in the restored data.
    let refused = f.run(&["run", "undo", &drill_id]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("run {drill_id} unfroze the fleet"))
            && err.contains("would stay only in the kept copy")
            && err.contains(&format!("cowork_undone_{tag}"))
            && err.contains(&format!("rollcall run undo {drill_id} --force")),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(newest_run(&f), drill_id, "no undo run was started");

    let undo = f.run(&["run", "undo", &drill_id, "--force", "--watch"]);
    let out = text(&undo);
    assert!(undo.status.success(), "{out}");
    assert!(
        out.contains("phase undo-postgres passed") && out.contains("phase undo-objects passed"),
        "{out}"
    );
    let undo_id = newest_run(&f);
    assert!(undo_id.starts_with("undo-test-"), "{undo_id}");

    // Exactly what was there just before the drill (the smokes' sessions and artifacts aside).
    assert_eq!(rows(&f.cluster, "cowork"), rows_before);
    assert_eq!(
        objects_but_smoke(&f, &["cowork", &undone]),
        objects_before,
        "byte for byte"
    );
    // Nothing dropped: the restored database is kept, the drill's kept one is live again.
    assert_eq!(
        databases(&f.cluster, &format!("cowork_%{tag}")),
        [format!("cowork_undone_{tag}")]
    );
    assert_ne!(
        rows(&f.cluster, &undone)["sessions"],
        rows_before["sessions"],
        "the restored rows are kept"
    );
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":false"),
        "traffic resumed"
    );
    let show = f.run(&["run", "show", &undo_id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["run"]["kind"], "undo", "{show}");
    for action in ["undo-postgres", "undo-objects"] {
        let command = show["commands"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["action"] == action)
            .unwrap_or_else(|| panic!("no {action} in {show}"));
        assert_eq!(command["outcome"], "succeeded", "{command}");
    }
    let report = f.run(&["report", &undo_id, "--format", "json"]);
    assert!(report.status.success(), "{}", text(&report));
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let undid = &report["undo"];
    assert_eq!(
        (
            &undid["undoes"],
            &undid["restored_database_kept_as"],
            &undid["database_detail"]
        ),
        (
            &drill_id.as_str().into(),
            &undone.as_str().into(),
            &"undone".into()
        ),
        "{report}"
    );
    assert!(
        undid["objects_put_back"].as_u64().unwrap() > 0
            && undid["objects_removed"].as_u64().unwrap() > 0,
        "the junk the restore removed is back, the artifact it brought back is gone: {report}"
    );
    let markdown = f.run(&["report", &undo_id]);
    assert!(
        String::from_utf8_lossy(&markdown.stdout).contains("## Undo"),
        "{}",
        text(&markdown)
    );

    // Once undone, the drill is not undone again, and an undo is not undone.
    let again = f.run(&["run", "undo", &drill_id, "--force"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains(&format!("was already undone by run {undo_id}")),
        "{}",
        text(&again)
    );
    let of_undo = f.run(&["run", "undo", &undo_id, "--force"]);
    assert!(!of_undo.status.success());
    assert!(
        String::from_utf8_lossy(&of_undo.stderr).contains("is itself an undo"),
        "{}",
        text(&of_undo)
    );
    f.stop();
}

/// A drill that changed nothing (its prepare failed) is not undone: the refusal says so and no
/// run starts; aborted, the copy its prepare began is listed as kept and pruned at once. A drill that blocked after the swap and the object restore (its worker smoke
/// hangs) is undone without --force, since traffic never resumed: the rows and objects from
/// before it are back, roles run as before it, traffic resumes, and the drill is ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_after_a_blocked_drill_takes_back_what_it_changed() {
    let f = Fleet::start_opts("15s", true, &[]).await;
    let backup = f.run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(backup.status.success(), "{}", text(&backup));
    disaster(&f);

    // Blocked at prepare: nothing live changed, nothing to undo.
    std::fs::write(&f.pg_restore_fails, b"").unwrap();
    let drill = f.run(&["drill", "--env", "test", "--point", "latest", "--watch"]);
    assert!(!drill.status.success(), "{}", text(&drill));
    let unchanged_id = newest_run(&f);
    let refused = f.run(&["run", "undo", &unchanged_id]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!(
            "run {unchanged_id} (blocked) changed nothing live"
        )) && err.contains("no undo run was started"),
        "{err}"
    );
    assert_eq!(newest_run(&f), unchanged_id);
    let aborted = f.run(&["run", "abort", &unchanged_id]);
    assert!(aborted.status.success(), "{}", text(&aborted));
    std::fs::remove_file(&f.pg_restore_fails).unwrap();
    // The copy its prepare began stays (nothing is dropped unasked): the abort says so, `kept
    // list` shows it, and a prune drops it at once (it holds only the point), the live
    // database untouched.
    let prepared = format!("cowork_restore_{}", run_tag(&unchanged_id));
    assert_eq!(
        databases(&f.cluster, &format!("cowork_%{}", run_tag(&unchanged_id))),
        std::slice::from_ref(&prepared)
    );
    let show = f.run(&["run", "show", &unchanged_id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let reason = show["run"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("_restore_{}", run_tag(&unchanged_id)))
            && reason.contains("rollcall kept prune --env test"),
        "{show}"
    );
    let listed = f.run(&["kept", "list", "--env", "test", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let copy = listed["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == prepared.as_str())
        .unwrap_or_else(|| panic!("{prepared} not listed: {listed:#}"));
    assert_eq!(copy["kind"], "database_prepared", "{listed:#}");
    assert_eq!(copy["run"], unchanged_id.as_str(), "{listed:#}");
    assert_eq!(copy["run_state"], "aborted", "{listed:#}");
    let live_rows = rows(&f.cluster, "cowork");
    let pruned = f.run(&["kept", "prune", "--env", "test", "--json"]);
    assert!(pruned.status.success(), "{}", text(&pruned));
    assert!(
        databases(&f.cluster, &format!("cowork_%{}", run_tag(&unchanged_id))).is_empty(),
        "{}",
        text(&pruned)
    );
    assert_eq!(
        rows(&f.cluster, "cowork"),
        live_rows,
        "the live database untouched"
    );

    // Blocked after the swap and the object restore: the worker's smoke hangs.
    let rows_before = rows(&f.cluster, "cowork");
    let objects_before = objects_but_smoke(&f, &["cowork"]);
    let hang = f.dir.path().join("hang-smoke");
    std::fs::write(&hang, b"").unwrap();
    let started = f.run(&["drill", "--env", "test", "--point", "latest", "--json"]);
    assert!(started.status.success(), "{}", text(&started));
    let drill_id = newest_run(&f);
    // Still going: refused, naming its state.
    let early = f.run(&["run", "undo", &drill_id]);
    assert!(!early.status.success());
    let err = String::from_utf8_lossy(&early.stderr);
    assert!(
        (err.contains(&format!("run {drill_id} is running"))
            || err.contains(&format!("run {drill_id} is pending")))
            && err.contains("an undo takes back a run that has stopped"),
        "{err}"
    );
    let watched = f.run(&["run", "watch", &drill_id]);
    let out = text(&watched);
    assert!(!watched.status.success(), "{out}");
    assert!(
        out.contains("phase commit-postgres passed")
            && out.contains("phase restore-objects passed")
            && out.contains("phase worker-smoke did not pass"),
        "{out}"
    );
    assert_ne!(rows(&f.cluster, "cowork"), rows_before);
    std::fs::remove_file(&hang).unwrap();

    let undo = f.run(&["run", "undo", &drill_id, "--watch"]);
    let out = text(&undo);
    assert!(undo.status.success(), "{out}");
    let tag = run_tag(&drill_id);
    assert_eq!(rows(&f.cluster, "cowork"), rows_before);
    assert_eq!(
        objects_but_smoke(&f, &["cowork", &format!("cowork_undone_{tag}")]),
        objects_before,
        "byte for byte"
    );
    assert_eq!(
        databases(&f.cluster, &format!("cowork_%{tag}")),
        [format!("cowork_undone_{tag}")]
    );
    assert!(
        maintenance(f.web_addr, &f.operator_token)
            .await
            .contains("\"maintenance\":false"),
        "traffic resumed"
    );
    let show = f.run(&["run", "show", &drill_id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["run"]["state"], "aborted", "{show}");
    assert!(
        show["run"]["reason"]
            .as_str()
            .unwrap()
            .contains("taken back by undo run undo-test-"),
        "{show}"
    );
    f.stop();
}
