//! An encrypted repository through the real binary (`rollcall repo init --encrypt`): the
//! break-glass round trips are exact, no plaintext (a marker in a row, an object's content and
//! name, a content hash) is findable in the repository's files, a wrong or missing key and one
//! flipped byte in a dump, a manifest or a blob are each refused in one line with the live
//! data untouched, and a rotated key replaces the old one.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use e2e::{fails_with, files, ok, rollcall_bin};
use sha2::{Digest, Sha256};

const MARKER: &str = "ZEBRA-MARKER-7f3c";

/// `rollcall args` with exactly the repository keys given (none inherited).
fn rollcall_keyed(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(rollcall_bin())
        .args(args)
        .env_remove("ROLLCALL_TOKEN")
        .env_remove("ROLLCALL_OPERATOR")
        .env_remove("ROLLCALL_CERTS")
        .env_remove("ROLLCALL_REPOSITORY_KEY")
        .env_remove("ROLLCALL_REPOSITORY_KEY_FILE")
        .env_remove("ROLLCALL_REPOSITORY_NEW_KEY")
        .env_remove("ROLLCALL_REPOSITORY_NEW_KEY_FILE")
        .env_remove("ROLLCALL_REPOSITORY_KEY_COMMAND")
        .env_remove("ROLLCALL_REPOSITORY_NEW_KEY_COMMAND")
        .envs(env.iter().copied())
        .output()
        .expect("run rollcall")
}

fn new_key() -> String {
    repository::RepositoryKey::generate().unwrap().to_base64()
}

/// Every file under `dir`, relative path → bytes.
fn repository_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files(dir).into_iter().collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn live_store(dir: &Path) {
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    std::fs::write(
        dir.join(format!("docs/{MARKER}-report.txt")),
        format!("quarterly numbers {MARKER} ").repeat(400),
    )
    .unwrap();
    // Over a chunk (1 MiB), so a body spans chunks.
    let big: Vec<u8> = (0..(3 << 20) + 11).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(dir.join("big.bin"), big).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
}

#[test]
fn break_glass_round_trips_are_exact_and_the_repository_holds_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    cluster.create_database("live").unwrap();
    cluster
        .psql(
            "live",
            &format!(
                "CREATE TABLE notes (id int primary key, body text);
                 INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 500) i;
                 INSERT INTO notes VALUES (1000, '{MARKER}');"
            ),
        )
        .unwrap();
    let repo_dir = dir.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let key = new_key();
    let with_key = [("ROLLCALL_REPOSITORY_KEY", key.as_str())];

    // Without a key, init --encrypt says what to set; with one it initialises, once.
    fails_with(
        &rollcall_keyed(&["repo", "init", "--repo", &repo, "--encrypt"], &[]),
        &["ROLLCALL_REPOSITORY_KEY", "ROLLCALL_REPOSITORY_KEY_FILE"],
    );
    let init = rollcall_keyed(&["repo", "init", "--repo", &repo, "--encrypt"], &with_key);
    ok(&init, "repo init --encrypt");
    assert!(
        String::from_utf8_lossy(&init.stdout).contains("initialised encrypted repository"),
        "{init:?}"
    );
    fails_with(
        &rollcall_keyed(&["repo", "init", "--repo", &repo, "--encrypt"], &with_key),
        &[&repo, "already initialised"],
    );

    // Postgres: backup-postgres, then restore-postgres --create; rows equal.
    let backup = ok(
        &rollcall_keyed(
            &[
                "repo",
                "backup-postgres",
                "--database-url",
                &cluster.url("live"),
                "--repo",
                &repo,
            ],
            &with_key,
        ),
        "backup-postgres",
    );
    let pg_point = backup["point"].as_str().unwrap().to_owned();
    ok(
        &rollcall_keyed(
            &[
                "repo",
                "restore-postgres",
                "--repo",
                &repo,
                "--point",
                &pg_point,
                "--database-url",
                &cluster.url("copy"),
                "--create",
            ],
            &with_key,
        ),
        "restore-postgres --create",
    );
    let rows = "SELECT string_agg(id || ':' || body, ',' ORDER BY id) FROM notes";
    assert_eq!(
        cluster.psql("copy", rows).unwrap(),
        cluster.psql("live", rows).unwrap()
    );

    // Objects: snapshot, then restore-objects into an empty store; bytes and names equal.
    let live = dir.path().join("live");
    live_store(&live);
    let snap = ok(
        &rollcall_keyed(
            &[
                "repo",
                "snapshot",
                "--store",
                &format!("file://{}", live.display()),
                "--repo",
                &repo,
            ],
            &with_key,
        ),
        "snapshot",
    );
    let snapshot = snap["objects"]["snapshot_id"].as_str().unwrap().to_owned();
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    ok(
        &rollcall_keyed(
            &[
                "repo",
                "restore-objects",
                "--repo",
                &repo,
                "--snapshot",
                &snapshot,
                "--store",
                &format!("file://{}", target.display()),
            ],
            &with_key,
        ),
        "restore-objects",
    );
    assert_eq!(files(&target), files(&live));
    let verified = rollcall_keyed(&["repo", "verify", "--repo", &repo, "--full"], &with_key);
    ok(&verified, "verify --full");

    // No marker, no content hash, in any file's bytes or name; every object but the config
    // is sealed (starts with the framing's magic).
    let hashes: Vec<String> = files(&live)
        .values()
        .map(|body| hex::encode(Sha256::digest(body)))
        .collect();
    let stored = repository_files(&repo_dir);
    assert!(
        stored.len() > 5,
        "{:?}",
        stored.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (name, body) in &stored {
        assert!(!name.contains(MARKER), "{name}");
        assert!(
            !contains(body, MARKER.as_bytes()),
            "{name} holds the marker"
        );
        for hash in &hashes {
            assert!(
                !name.contains(hash.as_str()),
                "{name} is named by a content hash"
            );
            assert!(
                !contains(body, hash.as_bytes()),
                "{name} holds a content hash"
            );
        }
        if name != "rollcall-repository.json" {
            assert!(body.starts_with(b"RCE1"), "{name} is not sealed");
        }
    }

    // Rotation: the new key opens it and restores exactly, the old one is refused.
    let new = new_key();
    let rotated = rollcall_keyed(
        &["repo", "key", "rotate", "--repo", &repo],
        &[
            ("ROLLCALL_REPOSITORY_KEY", key.as_str()),
            ("ROLLCALL_REPOSITORY_NEW_KEY", new.as_str()),
        ],
    );
    ok(&rotated, "repo key rotate");
    fails_with(
        &rollcall_keyed(&["repo", "points", "--repo", &repo], &with_key),
        &[&repo, "is encrypted with key", "ROLLCALL_REPOSITORY_KEY"],
    );
    let key_file = dir.path().join("new.key");
    std::fs::write(&key_file, format!("{new}\n")).unwrap();
    let with_new = [("ROLLCALL_REPOSITORY_KEY_FILE", key_file.to_str().unwrap())];
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    ok(
        &rollcall_keyed(
            &[
                "repo",
                "restore-objects",
                "--repo",
                &repo,
                "--snapshot",
                &snapshot,
                "--store",
                &format!("file://{}", again.display()),
            ],
            &with_new,
        ),
        "restore-objects with the new key",
    );
    assert_eq!(files(&again), files(&live));
    ok(
        &rollcall_keyed(
            &[
                "repo",
                "restore-postgres",
                "--repo",
                &repo,
                "--point",
                &pg_point,
                "--database-url",
                &cluster.url("copy2"),
                "--create",
            ],
            &with_new,
        ),
        "restore-postgres with the new key",
    );
    assert_eq!(
        cluster.psql("copy2", rows).unwrap(),
        cluster.psql("live", rows).unwrap()
    );
}

#[test]
fn a_missing_or_wrong_key_and_a_flipped_byte_are_refused_with_the_live_data_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    cluster.create_database("live").unwrap();
    cluster
        .psql(
            "live",
            "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 300);",
        )
        .unwrap();
    let repo_dir = dir.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let key = new_key();
    let with_key = [("ROLLCALL_REPOSITORY_KEY", key.as_str())];
    ok(
        &rollcall_keyed(&["repo", "init", "--repo", &repo, "--encrypt"], &with_key),
        "init",
    );
    let backup = ok(
        &rollcall_keyed(
            &[
                "repo",
                "backup-postgres",
                "--database-url",
                &cluster.url("live"),
                "--repo",
                &repo,
            ],
            &with_key,
        ),
        "backup-postgres",
    );
    let pg_point = backup["point"].as_str().unwrap().to_owned();
    let live = dir.path().join("live");
    live_store(&live);
    let snap = ok(
        &rollcall_keyed(
            &[
                "repo",
                "snapshot",
                "--store",
                &format!("file://{}", live.display()),
                "--repo",
                &repo,
            ],
            &with_key,
        ),
        "snapshot",
    );
    let snapshot = snap["objects"]["snapshot_id"].as_str().unwrap().to_owned();

    // Missing key, wrong key, a key that is not a key: one line naming the repository and
    // what to set.
    fails_with(
        &rollcall_keyed(&["repo", "points", "--repo", &repo], &[]),
        &[&repo, "is encrypted", "ROLLCALL_REPOSITORY_KEY"],
    );
    let wrong = new_key();
    fails_with(
        &rollcall_keyed(
            &[
                "repo",
                "restore-objects",
                "--repo",
                &repo,
                "--snapshot",
                &snapshot,
                "--store",
                &format!("file://{}", live.display()),
            ],
            &[("ROLLCALL_REPOSITORY_KEY", wrong.as_str())],
        ),
        &[&repo, "is encrypted with key", "ROLLCALL_REPOSITORY_KEY"],
    );
    fails_with(
        &rollcall_keyed(
            &["repo", "points", "--repo", &repo],
            &[("ROLLCALL_REPOSITORY_KEY", "c2hvcnQ=")],
        ),
        &["ROLLCALL_REPOSITORY_KEY", "holds 5 bytes"],
    );

    let flip = |rel: &str| {
        let path = repo_dir.join(rel);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
    };
    let repo_files: Vec<String> = files(&repo_dir).into_keys().collect();
    let live_files = files(&live);
    let rows = "SELECT count(*), sum(id) FROM t";
    let live_rows = cluster.psql("live", rows).unwrap();

    // A flipped byte in a blob: verify --full names it; a restore into the live store
    // refuses it and leaves the object as it is.
    let blob = repo_files
        .iter()
        .filter(|f| f.starts_with("objects/blobs/"))
        .max_by_key(|f| std::fs::metadata(repo_dir.join(f)).unwrap().len())
        .unwrap()
        .clone();
    flip(&blob);
    let verify = rollcall_keyed(&["repo", "verify", "--repo", &repo, "--full"], &with_key);
    assert!(!verify.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let blob_name = blob.rsplit('/').next().unwrap();
    assert!(said.contains(blob_name), "{said}");
    assert!(said.contains("does not open"), "{said}");
    std::fs::write(live.join("big.bin"), b"drifted").unwrap();
    let drifted = files(&live);
    let restore_objects = rollcall_keyed(
        &[
            "repo",
            "restore-objects",
            "--repo",
            &repo,
            "--snapshot",
            &snapshot,
            "--store",
            &format!("file://{}", live.display()),
        ],
        &with_key,
    );
    assert!(!restore_objects.status.success());
    let stderr = String::from_utf8_lossy(&restore_objects.stderr);
    assert!(
        stderr.contains(blob_name) && stderr.contains(&repo),
        "{stderr}"
    );
    assert_eq!(files(&live).get("big.bin"), drifted.get("big.bin"));
    flip(&blob); // back as it was

    // A flipped byte in the manifest: refused before anything is written.
    let manifest = format!("objects/snapshots/{snapshot}.json");
    flip(&manifest);
    fails_with(
        &rollcall_keyed(
            &[
                "repo",
                "restore-objects",
                "--repo",
                &repo,
                "--snapshot",
                &snapshot,
                "--store",
                &format!("file://{}", live.display()),
            ],
            &with_key,
        ),
        &[&manifest, &repo, "does not open"],
    );
    assert_eq!(files(&live), drifted);
    flip(&manifest);

    // A flipped byte in a dump archive: the swap restore fails; the live database is as it was.
    let dump = repo_files
        .iter()
        .filter(|f| f.starts_with(&format!("postgres/{pg_point}")))
        .max_by_key(|f| std::fs::metadata(repo_dir.join(f)).unwrap().len())
        .unwrap()
        .clone();
    flip(&dump);
    let swap = rollcall_keyed(
        &[
            "repo",
            "restore-postgres",
            "--repo",
            &repo,
            "--point",
            &pg_point,
            "--database-url",
            &cluster.url("live"),
            "--swap",
        ],
        &with_key,
    );
    assert!(!swap.status.success());
    let stderr = String::from_utf8_lossy(&swap.stderr);
    assert!(stderr.contains(&dump), "{stderr}");
    assert_eq!(cluster.psql("live", rows).unwrap(), live_rows);
    let verify = rollcall_keyed(
        &[
            "repo", "verify", "--repo", &repo, "--point", &pg_point, "--full",
        ],
        &with_key,
    );
    assert!(!verify.status.success());
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains(&dump)
            || String::from_utf8_lossy(&verify.stderr).contains(&dump)
    );
    flip(&dump);
    assert_eq!(live_files.len(), files(&live).len());

    // A flipped byte in a point file: that point is listed apart as damaged while the other
    // still lists, and `repo verify` names it and fails.
    let point_file = format!("points/{pg_point}.json");
    flip(&point_file);
    let points = rollcall_keyed(&["repo", "points", "--repo", &repo, "--json"], &with_key);
    let listed = ok(&points, "points despite a damaged point file");
    let damaged = listed["damaged"].to_string();
    assert!(
        damaged.contains(&point_file) && damaged.contains("does not open"),
        "{listed}"
    );
    assert_eq!(
        listed["points"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let verify = rollcall_keyed(&["repo", "verify", "--repo", &repo], &with_key);
    assert!(!verify.status.success());
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        said.lines()
            .any(|l| l.starts_with("damaged") && l.contains(&point_file)),
        "{said}"
    );
    flip(&point_file);
}

/// A stand-in for a KMS or Vault CLI: prints the file named by its first argument, or with
/// `--deny` says "AccessDenied" on stderr and exits 7.
fn kms_script(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("fake-kms");
    std::fs::write(
        &path,
        "#!/bin/sh\nif [ \"$1\" = --deny ]; then echo 'AccessDenied: not allowed' >&2; exit 7; fi\n\
         exec cat \"$1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// `ROLLCALL_REPOSITORY_KEY_COMMAND` and `ROLLCALL_REPOSITORY_NEW_KEY_COMMAND`: a command's
/// stdout is the key (init, backup, restore, rotation); a failing command is one line naming
/// the variable and the exit status after the command's own message, never the key.
#[test]
fn a_key_command_supplies_the_key_and_its_failure_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let kms = kms_script(dir.path());
    let (old_key, new_key) = (new_key(), new_key());
    let old_file = dir.path().join("old.key");
    let new_file = dir.path().join("new.key");
    std::fs::write(&old_file, format!("{old_key}\n")).unwrap();
    std::fs::write(&new_file, &new_key).unwrap();
    let old_cmd = format!("{kms} {}", old_file.display());
    let new_cmd = format!("{kms} {}", new_file.display());
    let repo_dir = dir.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let live = dir.path().join("live");
    live_store(&live);
    let store = format!("file://{}", live.display());
    let via_old = [("ROLLCALL_REPOSITORY_KEY_COMMAND", old_cmd.as_str())];
    ok(
        &rollcall_keyed(&["repo", "init", "--repo", &repo, "--encrypt"], &via_old),
        "init through the key command",
    );
    let snap = ok(
        &rollcall_keyed(
            &["repo", "snapshot", "--store", &store, "--repo", &repo],
            &via_old,
        ),
        "snapshot",
    );
    let snapshot = snap["objects"]["snapshot_id"].as_str().unwrap().to_owned();
    // The same key given directly opens it: the command's output was the key.
    ok(
        &rollcall_keyed(
            &["repo", "points", "--repo", &repo, "--json"],
            &[("ROLLCALL_REPOSITORY_KEY", old_key.as_str())],
        ),
        "points with the key itself",
    );

    // A failing command: its own message, then one line of ours naming the variable and the
    // exit status; the key appears nowhere.
    let denied = format!("{kms} --deny");
    let out = rollcall_keyed(
        &["repo", "points", "--repo", &repo],
        &[("ROLLCALL_REPOSITORY_KEY_COMMAND", denied.as_str())],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains("AccessDenied"), "{stderr}");
    for needle in [
        "ROLLCALL_REPOSITORY_KEY_COMMAND",
        "fake-kms",
        "exit status: 7",
        &repo,
    ] {
        assert!(lines[1].contains(needle), "{needle:?} in {stderr}");
    }
    for out_text in [&out.stdout[..], &out.stderr[..]] {
        assert!(!contains(out_text, old_key.as_bytes()));
        assert!(!contains(out_text, new_key.as_bytes()));
    }
    // A program that does not exist: one line naming the variable.
    fails_with(
        &rollcall_keyed(
            &["repo", "points", "--repo", &repo],
            &[("ROLLCALL_REPOSITORY_KEY_COMMAND", "/nonexistent/kms get")],
        ),
        &["ROLLCALL_REPOSITORY_KEY_COMMAND", "/nonexistent/kms"],
    );

    // Rotation with both keys from commands; afterwards the new command opens it, the old
    // one is refused as the wrong key, and a restore through the new command is exact.
    let both = [
        ("ROLLCALL_REPOSITORY_KEY_COMMAND", old_cmd.as_str()),
        ("ROLLCALL_REPOSITORY_NEW_KEY_COMMAND", new_cmd.as_str()),
    ];
    let rotated = rollcall_keyed(&["repo", "key", "rotate", "--repo", &repo], &both);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    fails_with(
        &rollcall_keyed(&["repo", "points", "--repo", &repo], &via_old),
        &[
            &repo,
            "is encrypted with key",
            "ROLLCALL_REPOSITORY_KEY_COMMAND",
        ],
    );
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let via_new = [("ROLLCALL_REPOSITORY_KEY_COMMAND", new_cmd.as_str())];
    ok(
        &rollcall_keyed(
            &[
                "repo",
                "restore-objects",
                "--repo",
                &repo,
                "--snapshot",
                &snapshot,
                "--store",
                &format!("file://{}", target.display()),
            ],
            &via_new,
        ),
        "restore through the new key command",
    );
    assert_eq!(files(&target), files(&live));
}
