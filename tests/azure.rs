//! `az://` repositories and live stores on Azure Blob Storage, through the real `rollcall`
//! binary and object_store's Azure client against Azurite (the Azure Storage emulator, npm
//! package `azurite`, on 127.0.0.1). Skipped, saying so, when Azurite is not installed,
//! unless ROLLCALL_REQUIRE_EMULATORS is set (as `.ci/run` does).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use e2e::{Azurite, fails_with, files, ok, rollcall_with_env};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn snapshot_verify_and_restore_on_azure_blob_storage() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    for container in ["backups", "live"] {
        azurite.create_container(container);
    }
    let env = azurite.env();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..50 {
        write(
            &src.join(format!("uploads/{}/{i:03}.bin", i % 5)),
            format!("object {i} ").repeat(i * 40 + 1).as_bytes(),
        );
    }
    // Larger than one multipart part: staged by blocks, then copied server-side.
    let big: Vec<u8> = (0..9u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    write(&src.join("checkpoints/big.bin"), &big);
    let src_url = format!("file://{}", src.display());
    let repo = "az://backups/cowork";
    let snapshot = |store: &str| {
        ok(
            &rollcall_with_env(
                &["repo", "snapshot", "--store", store, "--repo", repo],
                &env,
            ),
            &format!("snapshot of {store}"),
        )
    };
    let restore = |point: &serde_json::Value, store: &str| {
        let point = point["point"].as_str().unwrap();
        ok(
            &rollcall_with_env(
                &[
                    "repo",
                    "restore-objects",
                    "--repo",
                    repo,
                    "--point",
                    point,
                    "--store",
                    store,
                ],
                &env,
            ),
            &format!("restore of {point} into {store}"),
        )
    };

    // A local store into an Azure repository.
    let first = snapshot(&src_url);
    assert_eq!(first["objects"]["objects"], 51, "{first}");
    assert_eq!(first["objects"]["copied_objects"], 51, "{first}");

    let verify = rollcall_with_env(&["repo", "verify", "--repo", repo, "--full"], &env);
    ok(&verify, "verify --full on az://");
    let text = String::from_utf8_lossy(&verify.stdout);
    let p1 = first["point"].as_str().unwrap();
    assert!(text.contains(p1) && text.contains("ok"), "{text}");

    // Restore into a live Azure container, then snapshot that container: every body is
    // already in the repository, so nothing is copied, and the manifest is the same.
    let restored = restore(&first, "az://live");
    assert_eq!(restored["restored"], 51, "{restored}");
    let second = snapshot("az://live");
    assert_eq!(second["objects"]["objects"], 51, "{second}");
    assert_eq!(second["objects"]["copied_objects"], 0, "{second}");
    assert_eq!(
        second["objects"]["bytes"], first["objects"]["bytes"],
        "{second}"
    );

    // Drift the live container away from the point (a point of changed data restored over
    // it), then restore the first point: the displaced objects go to quarantine, and the
    // container holds exactly the source again.
    let changed = dir.path().join("changed");
    for (name, bytes) in files(&src) {
        write(&changed.join(&name), &bytes);
    }
    write(
        &changed.join("uploads/0/000.bin"),
        b"overwritten after the point",
    );
    write(&changed.join("uploads/new.bin"), b"created after the point");
    let drift = snapshot(&format!("file://{}", changed.display()));
    restore(&drift, "az://live");
    let back = restore(&first, "az://live");
    assert_eq!(
        back["replaced"],
        serde_json::json!(["uploads/0/000.bin"]),
        "{back}"
    );
    assert_eq!(
        back["removed"],
        serde_json::json!(["uploads/new.bin"]),
        "{back}"
    );
    assert_eq!(back["restored"], 1, "only the overwritten object: {back}");

    // Out of Azure again: the live container's content, restored into a directory.
    let third = snapshot("az://live");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    restore(&third, &format!("file://{}", out.display()));
    assert_eq!(files(&out), files(&src), "az://live equals the first point");

    // A wrong account key and a container that does not exist: one clear line each.
    let mut wrong_key = env.clone();
    wrong_key.push((
        "AZURE_STORAGE_ACCOUNT_KEY".into(),
        "d3JvbmcgYnV0IHZhbGlkIGJhc2U2NCBrZXk=".into(),
    ));
    fails_with(
        &rollcall_with_env(&["repo", "verify", "--repo", repo], &wrong_key),
        &[
            "repository az://backups/cowork is unreachable",
            "credentials",
            "403 Forbidden: AuthorizationFailure",
        ],
    );
    fails_with(
        &rollcall_with_env(
            &["repo", "verify", "--repo", "az://no-such-container/x"],
            &env,
        ),
        &[
            "repository az://no-such-container/x is unreachable",
            "ContainerNotFound: The specified container does not exist.",
        ],
    );
}

/// Commit numbers on Azure: three `repo snapshot` processes committing to one `az://`
/// repository at once each claim their own number (a create-only put, `If-None-Match: *`),
/// and `repo points` lists them in that order.
#[test]
fn racing_snapshots_on_azure_get_distinct_commit_numbers() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    azurite.create_container("backups");
    let env = azurite.env();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("a.bin"), b"object");
    let store = format!("file://{}", src.display());
    let repo = "az://backups/race";
    let racers: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(e2e::rollcall_bin())
                .args(["repo", "snapshot", "--store", &store, "--repo", repo])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut points = Vec::new();
    for racer in racers {
        let out = racer.wait_with_output().unwrap();
        points.push(
            ok(&out, "racing snapshot")["point"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let listed = ok(
        &rollcall_with_env(&["repo", "points", "--repo", repo, "--json"], &env),
        "repo points --json",
    );
    let listed = listed["points"].as_array().unwrap();
    let numbers: Vec<u64> = listed
        .iter()
        .map(|p| p["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3], "{listed:?}");
    let mut ids: Vec<&str> = listed.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    points.sort_unstable();
    assert_eq!(ids, points, "every racer's point is listed");
}
