//! The break-glass CLI's stable contract (DESIGN.md, "Operator CLI"): every `rollcall repo`
//! form exactly as written there, run as the real binary against a `file://` repository, plus
//! a sharded restore split over two processes and the one-line errors for bad input; and what
//! any command does when the reader of its output goes away.

#![allow(clippy::unwrap_used)]

use e2e::{fails_with, files, ok, rollcall, rollcall_bin};

/// `rollcall plan show | head -1`: the reader is gone before the command writes. Like any
/// command-line tool it stops quietly (exit 0, nothing on stderr), where `println!` would panic.
#[test]
fn a_reader_that_went_away_ends_the_output_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(rollcall_bin())
        .args(["plan", "show"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn the_object_forms_of_the_contract_work_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    for i in 0..40 {
        let path = live.join(format!("uploads/{}/{i:03}.bin", i % 4));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("object {i} ").repeat(i + 1)).unwrap();
    }
    let repo = format!("file://{}", dir.path().join("repo").display());
    let store = format!("file://{}", live.display());
    let expected = files(&live);

    // rollcall repo snapshot --store URL --repo URL
    let snap = ok(
        &rollcall(&["repo", "snapshot", "--store", &store, "--repo", &repo]),
        "snapshot",
    );
    let point = snap["point"].as_str().unwrap().to_owned();
    let snapshot = snap["objects"]["snapshot_id"].as_str().unwrap().to_owned();
    assert!(point.contains("-manual-"), "default environment: {point}");
    assert_eq!(snap["objects"]["objects"], 40, "{snap}");

    // rollcall repo verify --repo URL [--point ID] [--full]
    let all = rollcall(&["repo", "verify", "--repo", &repo]);
    ok(&all, "verify every point");
    let text = String::from_utf8_lossy(&all.stdout);
    assert!(text.contains(&point) && text.starts_with("ok"), "{text}");
    let one = ok(
        &rollcall(&[
            "repo", "verify", "--repo", &repo, "--point", &point, "--full",
        ]),
        "verify --point --full",
    );
    assert_eq!(one["objects_checked"], 40, "{one}");
    assert_eq!(one["full"], true, "{one}");

    // rollcall repo restore-objects --repo URL --snapshot ID --store URL, into a drifted store.
    std::fs::remove_file(live.join("uploads/1/001.bin")).unwrap();
    std::fs::write(live.join("uploads/2/002.bin"), b"drifted").unwrap();
    std::fs::write(live.join("extra.bin"), b"not in the snapshot").unwrap();
    let restored = ok(
        &rollcall(&[
            "repo",
            "restore-objects",
            "--repo",
            &repo,
            "--snapshot",
            &snapshot,
            "--store",
            &store,
        ]),
        "restore-objects --snapshot",
    );
    assert_eq!(restored["restored"], 2, "{restored}");
    assert_eq!(restored["removed"], serde_json::json!(["extra.bin"]));
    assert_eq!(files(&live), expected);

    // The same restore split over two processes: --shard 0/2 and 1/2 (by point this time).
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("junk")).unwrap();
    std::fs::write(target.join("junk/a"), b"a").unwrap();
    std::fs::write(target.join("junk/b"), b"b").unwrap();
    let target_url = format!("file://{}", target.display());
    let mut restored_total = 0;
    let mut removed = Vec::new();
    for shard in ["0/2", "1/2"] {
        let half = ok(
            &rollcall(&[
                "repo",
                "restore-objects",
                "--repo",
                &repo,
                "--point",
                &point,
                "--store",
                &target_url,
                "--shard",
                shard,
                "--parallelism",
                "4",
                "--quarantine",
                "by-hand",
            ]),
            shard,
        );
        assert_eq!(
            format!("{}/{}", half["shard"], half["shards"]),
            shard,
            "{half}"
        );
        let n = half["restored"].as_u64().unwrap();
        assert!(n > 0 && n < 40, "a shard restores part of the keys: {half}");
        restored_total += n;
        removed.extend(
            half["removed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(
        restored_total, 40,
        "each object restored by exactly one shard"
    );
    removed.sort();
    assert_eq!(removed, ["junk/a", "junk/b"], "each extra removed once");
    assert_eq!(files(&target), expected);
    // Both shards kept what they displaced under the one quarantine name they were given.
    let kept = target.join("rollcall-quarantine/by-hand/junk");
    assert!(
        kept.join("a").exists() && kept.join("b").exists(),
        "{}",
        kept.display()
    );

    // The older spelling still works.
    let old = ok(
        &rollcall(&[
            "repo",
            "--repository",
            &repo,
            "restore-objects",
            &point,
            "--target",
            &target_url,
        ]),
        "old form",
    );
    assert_eq!(old["unchanged"], 40, "{old}");

    // Bad input: one line naming it.
    let restore_with = |extra: &[&str]| {
        let mut args = vec!["repo", "restore-objects", "--repo", &repo, "--store"];
        args.push(&target_url);
        args.extend_from_slice(extra);
        rollcall(&args)
    };
    fails_with(
        &restore_with(&["--snapshot", &snapshot, "--shard", "2/2"]),
        &["--shard 2/2", "not a shard"],
    );
    fails_with(
        &restore_with(&["--snapshot", &snapshot, "--shard", "half"]),
        &["--shard half", "I/N"],
    );
    fails_with(
        &restore_with(&["--snapshot", &snapshot, "--quarantine", "../elsewhere"]),
        &["--quarantine \"../elsewhere\"", "no empty, '.' or '..'"],
    );
    fails_with(&restore_with(&[]), &["--snapshot ID or --point ID"]);
    fails_with(
        &restore_with(&["--snapshot", "yesterday"]),
        &["--snapshot yesterday", "not an object snapshot id"],
    );
    let no_repo = std::process::Command::new(e2e::rollcall_bin())
        .args(["repo", "verify"])
        .env_remove("ROLLCALL_REPOSITORY")
        .output()
        .unwrap();
    fails_with(&no_repo, &["--repo URL is required"]);

    // A damaged point makes `verify` without --point fail, naming the point.
    let manifest = dir
        .path()
        .join(format!("repo/objects/snapshots/{snapshot}.json"));
    let body = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, body.replacen("\"size\":", "\"size\":1", 1)).unwrap();
    let all = rollcall(&["repo", "verify", "--repo", &repo]);
    fails_with(&all, &["1 of 1 recovery points failed verification"]);
    let text = String::from_utf8_lossy(&all.stdout);
    assert!(text.contains(&format!("damaged  {point}")), "{text}");
    // A manifest rewritten whole (its own checksum right, one object fewer) is not the one the
    // point recorded: restoring the point refuses it before writing anything.
    let mut document: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut edited = document["body"].clone();
    edited["objects"].as_array_mut().unwrap().remove(0);
    let edited = serde_json::to_string(&edited).unwrap();
    {
        use sha2::Digest as _;
        document["sha256"] = hex::encode(sha2::Sha256::digest(edited.as_bytes())).into();
    }
    let rewritten = format!(
        "{{\"format\":{},\"sha256\":{},\"body\":{edited}}}\n",
        document["format"], document["sha256"]
    );
    std::fs::write(&manifest, rewritten).unwrap();
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    let from_point = rollcall(&[
        "repo",
        "restore-objects",
        "--repo",
        &repo,
        "--point",
        &point,
        "--store",
        &format!("file://{}", fresh.display()),
    ]);
    fails_with(
        &from_point,
        &[&format!("point {point} recorded"), "replaced or modified"],
    );
    assert!(
        std::fs::read_dir(&fresh).unwrap().next().is_none(),
        "nothing written"
    );
}

#[test]
fn the_postgres_forms_of_the_contract_work_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    cluster.create_database("live").unwrap();
    // Not cowork-sim's schema: the break-glass backup counts every user table by default.
    cluster
        .psql(
            "live",
            "CREATE TABLE sessions (id int); CREATE TABLE channel_deliveries (id int, status text);
             CREATE SCHEMA audit; CREATE TABLE audit.events (id int);
             CREATE VIEW recent_sessions AS SELECT * FROM sessions;
             INSERT INTO sessions SELECT generate_series(1, 25);
             INSERT INTO channel_deliveries VALUES (1, 'sent'), (2, 'pending');
             INSERT INTO audit.events VALUES (1), (2), (3);",
        )
        .unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());

    // rollcall repo backup-postgres --database-url URL --repo URL
    let backup = ok(
        &rollcall(&[
            "repo",
            "backup-postgres",
            "--database-url",
            &cluster.url("live"),
            "--repo",
            &repo,
        ]),
        "backup-postgres",
    );
    let point = backup["point"].as_str().unwrap().to_owned();
    assert_eq!(
        backup["postgres"]["table_counts"],
        serde_json::json!({ "sessions": 25, "channel_deliveries": 2, "audit.events": 3 }),
        "{backup}"
    );
    // Or the tables named, or none.
    let counted = ok(
        &rollcall(&[
            "repo",
            "backup-postgres",
            "--database-url",
            &cluster.url("live"),
            "--repo",
            &repo,
            "--count",
            "sessions",
            "--count",
            "channel_deliveries:status",
        ]),
        "backup-postgres --count",
    );
    assert_eq!(
        counted["postgres"]["table_counts"],
        serde_json::json!({
            "sessions": 25,
            "channel_deliveries": 2,
            "channel_deliveries[status=pending]": 1,
            "channel_deliveries[status=sent]": 1,
        }),
        "{counted}"
    );
    let uncounted = ok(
        &rollcall(&[
            "repo",
            "backup-postgres",
            "--database-url",
            &cluster.url("live"),
            "--repo",
            &repo,
            "--no-counts",
        ]),
        "backup-postgres --no-counts",
    );
    assert!(
        uncounted["postgres"]["table_counts"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{uncounted}"
    );
    fails_with(
        &rollcall(&[
            "repo",
            "backup-postgres",
            "--database-url",
            &cluster.url("live"),
            "--repo",
            &repo,
            "--count",
            "sessions; drop table x",
        ]),
        &["--count \"sessions; drop table x\"", "TABLE:COLUMN"],
    );

    // rollcall repo restore-postgres --repo URL --point ID --database-url URL
    cluster.create_database("restored").unwrap();
    ok(
        &rollcall(&[
            "repo",
            "restore-postgres",
            "--repo",
            &repo,
            "--point",
            &point,
            "--database-url",
            &cluster.url("restored"),
        ]),
        "restore-postgres",
    );
    let count = cluster
        .psql("restored", "SELECT count(*) FROM sessions")
        .unwrap();
    assert_eq!(count.trim(), "25");
    // With jobs, and connections that may share a table's rows.
    cluster.create_database("restored_j2").unwrap();
    ok(
        &rollcall(&[
            "repo",
            "restore-postgres",
            "--repo",
            &repo,
            "--point",
            &point,
            "--database-url",
            &cluster.url("restored_j2"),
            "--jobs",
            "2",
            "--copy-streams",
            "2",
        ]),
        "restore-postgres --jobs 2",
    );
    let count = cluster
        .psql("restored_j2", "SELECT count(*) FROM sessions")
        .unwrap();
    assert_eq!(count.trim(), "25");
    // --swap: the live database replaced by the point, kept under its pre name; a second run
    // finds the swap done; --create and --swap exclude each other.
    cluster
        .psql("restored", "INSERT INTO sessions VALUES (26)")
        .unwrap();
    let restored = cluster.url("restored");
    let swap = |extra: &[&str]| {
        let mut args = vec![
            "repo",
            "restore-postgres",
            "--repo",
            &repo,
            "--point",
            &point,
            "--database-url",
            &restored,
            "--swap",
        ];
        args.extend_from_slice(extra);
        rollcall(&args)
    };
    let swapped = ok(&swap(&[]), "restore-postgres --swap");
    let tag = format!("m{}", point.rsplit('-').next().unwrap());
    assert_eq!(
        swapped["pre_restore_database"],
        format!("restored_pre_{tag}")
    );
    assert_eq!(swapped["resumed"], "");
    let count = |db: &str| {
        cluster
            .psql(db, "SELECT count(*) FROM sessions")
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(count("restored"), "25", "the point's rows are live");
    assert_eq!(
        count(&format!("restored_pre_{tag}")),
        "26",
        "the database it replaced is kept"
    );
    let again = ok(&swap(&[]), "restore-postgres --swap, again");
    assert_eq!(again["resumed"], "already swapped");
    let both = swap(&["--create"]);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(
        !both.status.success() && stderr.contains("--create") && stderr.contains("--swap"),
        "{stderr}"
    );
    fails_with(&swap(&["--tag", "Bad_Tag"]), &["--tag \"Bad_Tag\""]);

    // Argument errors come from clap (with a usage hint after them).
    let zero_jobs = rollcall(&[
        "repo",
        "restore-postgres",
        "--repo",
        &repo,
        "--point",
        &point,
        "--database-url",
        &cluster.url("restored_j2"),
        "--jobs",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&zero_jobs.stderr);
    assert!(
        !zero_jobs.status.success() && stderr.contains("'0'") && stderr.contains("--jobs"),
        "{stderr}"
    );
    ok(
        &rollcall(&["repo", "verify", "--repo", &repo, "--point", &point]),
        "verify the dump",
    );
    fails_with(
        &rollcall(&[
            "repo",
            "restore-postgres",
            "--repo",
            &repo,
            "--point",
            "last-tuesday",
            "--database-url",
            &cluster.url("restored"),
        ]),
        &["--point last-tuesday"],
    );
}

/// `repo points` lists in commit order and flags a point committed while the clock ran 10
/// minutes fast (libfaketime) instead of showing it as the newest, in text and in JSON.
#[test]
fn repo_points_flags_a_point_stamped_in_the_future() {
    let faketime = std::process::Command::new("faketime")
        .arg("--version")
        .output();
    if faketime.is_err() {
        assert!(
            !e2e::emulators_required(),
            "faketime is not installed (apt-get install faketime) and \
             ROLLCALL_REQUIRE_EMULATORS is set"
        );
        eprintln!("SKIPPED: faketime is not installed (apt-get install faketime)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("a.bin"), b"object").unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let store = format!("file://{}", live.display());
    let snapshot = ["repo", "snapshot", "--store", &store, "--repo", &repo];

    // Committed first, by a machine whose clock runs 10 minutes fast; then an ordinary one.
    let fast = std::process::Command::new("faketime")
        .args(["-f", "+10m"])
        .arg(rollcall_bin())
        .args(snapshot)
        .env("DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap();
    let fast = ok(&fast, "snapshot with the clock 10 minutes fast")["point"]
        .as_str()
        .unwrap()
        .to_owned();
    let real = ok(&rollcall(&snapshot), "snapshot")["point"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        fast > real,
        "the fast point's id sorts later: {fast} {real}"
    );

    let listed = rollcall(&["repo", "points", "--repo", &repo]);
    assert!(listed.status.success());
    let text = String::from_utf8_lossy(&listed.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with(&fast), "commit order: {text}");
    assert!(
        lines[0].ends_with("#1  stamped 10m in the future (a clock ran fast when it was taken)"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&real) && lines[1].ends_with("#2"),
        "the last committed point is last, unflagged: {text}"
    );

    let listed = ok(
        &rollcall(&["repo", "points", "--repo", &repo, "--json"]),
        "repo points --json",
    );
    let points = listed["points"].as_array().unwrap();
    assert_eq!(points[0]["id"], fast.as_str(), "{listed}");
    assert_eq!(points[0]["sequence"], 1, "{listed}");
    assert_eq!(points[0]["stamped_in_future"], true, "{listed}");
    let ahead = points[0]["stamped_ahead_seconds"].as_u64().unwrap();
    assert!((540..=600).contains(&ahead), "{listed}");
    assert_eq!(points[1]["id"], real.as_str(), "{listed}");
    assert_eq!(points[1]["sequence"], 2, "{listed}");
    assert_eq!(points[1]["stamped_in_future"], false, "{listed}");
}

/// `rollcall plan check|show` against an environment without a gateway: the default plan fits
/// the fleet (the gateway's smoke skipped, and said so), another plan file is checked against
/// the fleet even while the environment's own plan is broken, and every problem of a broken
/// plan gets a line of its own.
#[test]
fn plans_fit_the_fleet_and_each_problem_has_its_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rollcall.toml"),
    )
    .unwrap();
    let no_gateway = shipped.replace(", gateway = 1", "");
    assert_ne!(no_gateway, shipped, "the shipped fleet declares a gateway");
    let config = dir.path().join("rollcall.toml");
    std::fs::write(&config, &no_gateway).unwrap();
    let config = config.to_str().unwrap();

    let show = rollcall(&["plan", "show", "--env", "staging", "--config", config]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(
        text.contains("skipped: gateway-smoke (the environment declares no gateway agents)")
            && !text.contains("gateway×"),
        "{text}"
    );

    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[[phase]]\nname = \"a\"\naction = \"freeze\"\nroles = [\"web\"]\n\n[[phase]]\n\
         name = \"b\"\naction = \"verify\"\nroles = [\"gatewy\"]\ngate = \"all\"\n\
         timeout = \"1m\"\n",
    )
    .unwrap();
    let out = rollcall(&["plan", "check", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        format!("error: 3 problems in {}", broken.display()),
        "{err}"
    );
    assert!(
        lines[1].starts_with("  ") && lines[1].contains("broken.toml:1: phase a: no gate"),
        "{err}"
    );
    assert!(lines[2].contains("phase a: no timeout"), "{err}");
    assert!(
        lines[3].contains("broken.toml:9: phase b: unknown role \"gatewy\""),
        "{err}"
    );

    // The environment's own plan is broken: config loading says so, one problem a line, yet
    // another plan is still checked against its fleet.
    let with_plan = no_gateway.replace(
        "[environments.staging]\n",
        &format!("[environments.staging]\nplan = \"{}\"\n", broken.display()),
    );
    std::fs::write(dir.path().join("rollcall.toml"), with_plan).unwrap();
    let shown = rollcall(&["plan", "show", "--env", "staging", "--config", config]);
    let err = String::from_utf8_lossy(&shown.stderr);
    assert!(!shown.status.success());
    assert!(
        err.lines().count() == 4 && err.contains("[environments.staging] plan\n  "),
        "{err}"
    );
    let default =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/plans/default.toml");
    let checked = rollcall(&[
        "plan",
        "check",
        default.to_str().unwrap(),
        "--env",
        "staging",
        "--config",
        config,
    ]);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        text.contains("valid against environment staging")
            && text.contains("skipped: gateway-smoke"),
        "{text}"
    );

    // On its own (no --env), every shipped plan is valid, and so is a plan for a custom role,
    // which is said to be unchecked; a near miss of a standard role stays an error (above).
    for plan in ["default", "backup", "undo"] {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../deploy/plans/{plan}.toml"));
        let out = rollcall(&["plan", "check", file.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("is valid against the standard roles"),
            "{plan}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let custom = dir.path().join("custom.toml");
    std::fs::write(
        &custom,
        "[[phase]]\nname = \"reindex\"\naction = \"smoke\"\nroles = [\"indexer\"]\n\
         gate = \"all\"\ntimeout = \"1m\"\n",
    )
    .unwrap();
    let out = rollcall(&["plan", "check", custom.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("not checked: role indexer"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
