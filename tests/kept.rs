//! `rollcall kept list|prune` end to end, on the restore tests' fleet of real processes
//! (`e2e::fleet`: real Postgres, mTLS, the built binary): three drills each keep the database
//! they replaced (`cowork_pre_<tag>`) and quarantine what they displaced; the listing shows all
//! six with sizes and runs; a dry run names only the oldest drill's copies; a database with a
//! session is kept even when retention would let it go; the prune drops the oldest database
//! and deletes its quarantine and records, the newest two stay; and an undo of the pruned run
//! is refused, saying why.

#![allow(clippy::unwrap_used)]

use e2e::fleet::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn newest_run(f: &Fleet) -> String {
    let runs = json(&f.run(&["runs", "--json"]));
    runs[0]["id"].as_str().unwrap().to_owned()
}

fn kept_databases(f: &Fleet) -> Vec<String> {
    f.cluster
        .psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE 'cowork\\_%' ORDER BY 1",
        )
        .unwrap()
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The copies of the listing or prune, as (kind, name) → the copy.
fn copy<'a>(listing: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    listing["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no copy {name} in {listing:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_copies_are_listed_and_the_oldest_pruned_while_the_newest_two_stay() {
    let f = Fleet::start().await;
    let backup = f.run(&["backup", "--env", "test", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));

    let mut drills = Vec::new();
    for i in 0..3 {
        // Something for each drill to quarantine: an object the point does not have.
        std::fs::create_dir_all(f.objects.join("junk")).unwrap();
        std::fs::write(
            f.objects.join(format!("junk/extra-{i}.bin")),
            vec![7u8; 4096],
        )
        .unwrap();
        let drill = f.run(&["drill", "--env", "test", "--point", "latest", "--watch"]);
        assert!(drill.status.success(), "drill {i}: {}", text(&drill));
        drills.push(newest_run(&f));
    }
    let tags: Vec<String> = drills.iter().map(|d| run_tag(d)).collect();
    let pre = |i: usize| format!("cowork_pre_{}", tags[i]);
    let quarantine = |i: usize| format!("quarantine/{}/", tags[i]);
    assert_eq!(
        kept_databases(&f),
        {
            let mut all = vec![pre(0), pre(1), pre(2)];
            all.sort();
            all
        },
        "each drill kept the database it replaced"
    );

    // The listing: every database and quarantine, with its size, age and run.
    let listing = json(&f.run(&["kept", "list", "--env", "test", "--json"]));
    assert_eq!(listing["problems"], serde_json::json!([]), "{listing:#}");
    assert_eq!(
        listing["copies"].as_array().unwrap().len(),
        6,
        "{listing:#}"
    );
    for (i, drill) in drills.iter().enumerate() {
        let db = copy(&listing, &pre(i));
        assert_eq!(db["kind"], "database_pre");
        assert_eq!(db["agent"], "db-1");
        assert_eq!(db["run"], drill.as_str());
        assert_eq!(db["run_state"], "succeeded");
        assert!(db["bytes"].as_u64().unwrap() > 1_000_000, "{db}");
        assert!(db["age_seconds"].as_u64().is_some(), "{db}");
        let q = copy(&listing, &quarantine(i));
        assert_eq!(q["kind"], "quarantine");
        assert_eq!(q["run"], drill.as_str());
        assert!(q["bytes"].as_u64().unwrap() >= 4096, "{q}");
        assert!(
            q["objects"].as_u64().unwrap() >= 2,
            "an object and a record: {q}"
        );
    }
    let table = f.run(&["kept", "list", "--env", "test"]);
    let table = text(&table);
    assert!(
        table.contains(&pre(0)) && table.contains(&quarantine(2)) && table.contains(&drills[1]),
        "{table}"
    );

    // The dry run names the oldest drill's copies only, and changes nothing.
    let dry = json(&f.run(&["kept", "prune", "--env", "test", "--dry-run", "--json"]));
    for name in [pre(0), quarantine(0)] {
        assert_eq!(copy(&dry, &name)["decision"], "prune", "{dry:#}");
    }
    for name in [pre(1), quarantine(1), pre(2), quarantine(2)] {
        assert_eq!(copy(&dry, &name)["decision"], "keep", "{dry:#}");
    }
    assert!(
        copy(&dry, &pre(2))["reason"]
            .as_str()
            .unwrap()
            .contains("newest finished restore"),
        "{dry:#}"
    );
    let dry_text = text(&f.run(&["kept", "prune", "--env", "test", "--dry-run"]));
    assert!(
        dry_text.contains("would prune")
            && dry_text.contains("kept: the newest finished restore's")
            && dry_text.contains("would free"),
        "{dry_text}"
    );
    assert_eq!(kept_databases(&f).len(), 3, "a dry run drops nothing");

    // A database in use is never chosen, whatever retention says.
    let session = HeldSession::open(&f.cluster, &pre(1), "").await;
    let busy = json(&f.run(&[
        "kept",
        "prune",
        "--env",
        "test",
        "--dry-run",
        "--keep-last",
        "0",
        "--json",
    ]));
    let busy_db = copy(&busy, &pre(1));
    assert_eq!(busy_db["decision"], "keep", "{busy:#}");
    assert!(
        busy_db["reason"].as_str().unwrap().contains("1 session(s)"),
        "{busy:#}"
    );
    assert_eq!(copy(&busy, &quarantine(1))["decision"], "prune", "{busy:#}");
    drop(session);

    // The prune: the oldest drill's database dropped, its quarantine and records deleted.
    let pruned = json(&f.run(&["kept", "prune", "--env", "test", "--json"]));
    assert_eq!(copy(&pruned, &pre(0))["decision"], "pruned", "{pruned:#}");
    assert_eq!(copy(&pruned, &quarantine(0))["decision"], "pruned");
    let mut left = vec![pre(1), pre(2)];
    left.sort();
    assert_eq!(kept_databases(&f), left);
    // The quarantine's files, by the first part of their path (`<tag>`, `<tag>.records`).
    let quarantined: std::collections::BTreeSet<String> = e2e::files(&f.repo.join("quarantine"))
        .into_keys()
        .filter_map(|k| k.split('/').next().map(str::to_owned))
        .collect();
    for gone in [tags[0].clone(), format!("{}.records", tags[0])] {
        assert!(!quarantined.contains(&gone), "{gone} left: {quarantined:?}");
    }
    for kept in [&tags[1], &tags[2]] {
        assert!(
            quarantined.contains(kept.as_str()),
            "{kept}: {quarantined:?}"
        );
        assert!(
            quarantined.contains(&format!("{kept}.records")),
            "{quarantined:?}"
        );
    }
    let listing = json(&f.run(&["kept", "list", "--env", "test", "--json"]));
    assert_eq!(
        listing["copies"].as_array().unwrap().len(),
        4,
        "{listing:#}"
    );

    // Nothing is left to put back: the undo of the pruned run is refused, saying why.
    let undo = f.run(&["run", "undo", &drills[0], "--force"]);
    assert!(!undo.status.success(), "{}", text(&undo));
    let err = String::from_utf8_lossy(&undo.stderr);
    assert!(
        err.contains(&format!("run {} cannot be undone", drills[0]))
            && err.contains("kept copies were pruned")
            && err.contains(&pre(0)),
        "{err}"
    );
    let runs = json(&f.run(&["runs", "--json"]));
    assert_eq!(runs[0]["id"], drills[2].as_str(), "no undo run started");
}
