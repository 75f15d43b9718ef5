//! A fleet (coordinator and agents as real processes) backs up into and drills from an
//! encrypted repository, each process holding the key in its environment; everything it
//! wrote is sealed.

#![allow(clippy::unwrap_used)]

use e2e::fleet::{Fleet, count};
use e2e::{SPAWN_ENV, files, ok, rollcall_with_env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_backs_up_and_drills_through_an_encrypted_repository() {
    let key = repository::RepositoryKey::generate().unwrap().to_base64();
    SPAWN_ENV
        .lock()
        .unwrap()
        .push(("ROLLCALL_REPOSITORY_KEY".into(), key.clone()));
    let f = Fleet::start().await;
    let repo = format!("file://{}", f.repo.display());
    std::fs::create_dir_all(&f.repo).unwrap();
    ok(
        &rollcall_with_env(
            &["repo", "init", "--repo", &repo, "--encrypt"],
            &[("ROLLCALL_REPOSITORY_KEY".into(), key.clone())],
        ),
        "repo init --encrypt",
    );

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
    // The drill's checks compared the restored rows with the counts the point recorded.
    assert!(count(&f.cluster, "cowork", "sessions") > 0);

    // Everything the fleet wrote is sealed, and the CLI without the key cannot read it.
    for (name, body) in files(&f.repo) {
        if name != "rollcall-repository.json" {
            assert!(body.starts_with(b"RCE1"), "{name} is not sealed");
        }
    }
    let keyless = rollcall_with_env(&["repo", "points", "--repo", &repo], &[]);
    assert!(!keyless.status.success());
    assert!(
        String::from_utf8_lossy(&keyless.stderr).contains("is encrypted"),
        "{keyless:?}"
    );
    f.stop();
}
