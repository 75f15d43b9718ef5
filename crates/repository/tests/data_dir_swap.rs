//! A data directory swap killed half-way (`repository::swap_data_dir`), finished at the next
//! agent start by `finish_interrupted_swap` with real Postgres 15 servers: the states a SIGKILL
//! leaves are built on disk exactly as the swap's steps leave them (marker written, live
//! server stopped, then zero, one or both renames done), and afterwards a server runs from the
//! live directory, on the live server's port, with the data the state calls for.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ephemeral_pg::Cluster;
use repository::{DataDirSwap, Interrupted, ServerTools, SwapMarker};

fn pg_ctl_stop(cluster: &Cluster, data: &Path) {
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(cluster.bin_dir().join("pg_ctl"));
        c
    } else {
        Command::new(cluster.bin_dir().join("pg_ctl"))
    };
    let out = cmd
        .args(["stop", "-m", "fast", "-w", "-D"])
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn tools(cluster: &Cluster) -> ServerTools {
    ServerTools {
        bin_dir: Some(cluster.bin_dir().to_path_buf()),
        run_as: None,
        timeout: Duration::from_secs(60),
    }
}

/// The swap's first steps: the marker with the live server's options, the live server stopped.
fn marker_and_stop(cluster: &Cluster, dirs: &DataDirSwap, tag: &str) {
    let marker = SwapMarker {
        tag: tag.to_owned(),
        options: repository::start_options(&dirs.live).unwrap(),
    };
    std::fs::write(&dirs.marker, serde_json::to_vec(&marker).unwrap()).unwrap();
    pg_ctl_stop(cluster, &dirs.live);
}

#[tokio::test]
async fn a_swap_killed_before_its_second_rename_puts_the_previous_directory_back() {
    let root = tempfile::tempdir().unwrap();
    let live_root = root.path().join("live");
    let cluster = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(live_root.clone()),
        settings: Vec::new(),
    })
    .unwrap();
    cluster
        .psql("postgres", "CREATE TABLE kept (id int)")
        .unwrap();
    cluster
        .psql("postgres", "INSERT INTO kept VALUES (7)")
        .unwrap();
    let live = live_root.join("data");
    let tag = "r0000abcd";
    let dirs = DataDirSwap::new(&live, tag);
    // Nothing under way: nothing to do.
    assert_eq!(
        repository::finish_interrupted_swap(&live, &tools(&cluster))
            .await
            .unwrap(),
        Interrupted::Nothing
    );
    // A recovered directory waits beside the live one (its contents do not matter here).
    std::fs::create_dir_all(&dirs.restored).unwrap();
    marker_and_stop(&cluster, &dirs, tag);
    std::fs::rename(&live, &dirs.kept).unwrap();

    let done = repository::finish_interrupted_swap(&live, &tools(&cluster))
        .await
        .unwrap();
    assert_eq!(done, Interrupted::PutBack { tag: tag.into() });
    assert_eq!(
        cluster
            .psql("postgres", "SELECT id FROM kept")
            .unwrap()
            .trim(),
        "7"
    );
    assert!(!dirs.kept.exists());
    assert!(
        dirs.restored.exists(),
        "the recovered directory is left for the retried commit"
    );
    assert!(!dirs.marker.exists());
}

#[tokio::test]
async fn a_swap_killed_after_both_renames_starts_the_recovered_server_on_the_live_port() {
    let root = tempfile::tempdir().unwrap();
    let live_root = root.path().join("live");
    let cluster = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(live_root.clone()),
        settings: Vec::new(),
    })
    .unwrap();
    cluster
        .psql("postgres", "CREATE TABLE previous (id int)")
        .unwrap();
    // Another cluster stands in for the recovered directory: stopped, then moved beside.
    let other = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(root.path().join("other")),
        settings: Vec::new(),
    })
    .unwrap();
    other
        .psql("postgres", "CREATE TABLE recovered (id int)")
        .unwrap();
    let other_data = root.path().join("other").join("data");
    pg_ctl_stop(&other, &other_data);
    let live = live_root.join("data");
    let tag = "r0000beef";
    let dirs = DataDirSwap::new(&live, tag);
    std::fs::rename(&other_data, &dirs.restored).unwrap();
    marker_and_stop(&cluster, &dirs, tag);
    std::fs::rename(&live, &dirs.kept).unwrap();
    std::fs::rename(&dirs.restored, &live).unwrap();

    let done = repository::finish_interrupted_swap(&live, &tools(&cluster))
        .await
        .unwrap();
    assert_eq!(done, Interrupted::Started { tag: tag.into() });
    // The live server's port answers with the recovered directory's data.
    let tables = cluster
        .psql(
            "postgres",
            "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'",
        )
        .unwrap();
    assert_eq!(tables.trim(), "recovered");
    assert!(
        dirs.kept.join("PG_VERSION").exists(),
        "the previous directory is kept"
    );
    assert!(!dirs.marker.exists());
}

#[tokio::test]
async fn a_swap_carries_what_the_operator_keeps_in_the_live_directory() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let live_root = root.path().join("live");
    let cluster = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(live_root.clone()),
        settings: Vec::new(),
    })
    .unwrap();
    let live = live_root.join("data");
    // The operator's files: a directory postgresql.conf includes, a key only the server's
    // user reads, and a link. The recovered directory (a backup of before) has none of them.
    let other = Cluster::start_with(ephemeral_pg::Options {
        dir: Some(root.path().join("other")),
        settings: Vec::new(),
    })
    .unwrap();
    other
        .psql("postgres", "CREATE TABLE recovered (id int)")
        .unwrap();
    let other_data = root.path().join("other").join("data");
    pg_ctl_stop(&other, &other_data);
    let owner = std::fs::metadata(live.join("PG_VERSION")).unwrap();
    let give = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::lchown(path, Some(owner.uid()), Some(owner.gid())).unwrap();
    };
    std::fs::create_dir(live.join("conf.d")).unwrap();
    give(&live.join("conf.d"));
    std::fs::write(live.join("conf.d/extra.conf"), "work_mem = '7MB'\n").unwrap();
    give(&live.join("conf.d/extra.conf"));
    let conf = live.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\ninclude_dir 'conf.d'\n");
    std::fs::write(&conf, text).unwrap();
    std::fs::write(live.join("server-extra.pem"), "secret").unwrap();
    std::fs::set_permissions(
        live.join("server-extra.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    give(&live.join("server-extra.pem"));
    std::os::unix::fs::symlink("conf.d/extra.conf", live.join("linked.conf")).unwrap();
    give(&live.join("linked.conf"));
    // Access rules changed since the backup: the live ones hold on the restored server.
    let hba = live.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str("# changed after the backup\n");
    std::fs::write(&hba, &rules).unwrap();
    // The backup's copy of an include directory has a file the live one no longer has.
    std::fs::create_dir(other_data.join("conf.d")).unwrap();
    std::fs::write(other_data.join("conf.d/old.conf"), "bogus_setting = on\n").unwrap();

    let tag = "r0000cafe";
    let dirs = DataDirSwap::new(&live, tag);
    std::fs::rename(&other_data, &dirs.restored).unwrap();
    let swapped = repository::swap_data_dir(&dirs, tag, &tools(&cluster))
        .await
        .unwrap();
    assert_eq!(swapped, repository::Swapped::Now);

    // The recovered data on the live port, with the included setting (the server would not
    // have started without the directory postgresql.conf includes).
    let tables = cluster
        .psql(
            "postgres",
            "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'",
        )
        .unwrap();
    assert_eq!(tables.trim(), "recovered");
    assert_eq!(
        cluster.psql("postgres", "SHOW work_mem").unwrap().trim(),
        "7MB"
    );
    let key = live.join("server-extra.pem");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(live.join("linked.conf")).unwrap(),
        Path::new("conf.d/extra.conf")
    );
    assert_eq!(
        std::fs::read_to_string(live.join("pg_hba.conf")).unwrap(),
        rules
    );
    assert!(!live.join("conf.d/old.conf").exists(), "replaced whole");
    assert!(
        dirs.kept.join("conf.d/extra.conf").exists(),
        "the previous directory is kept whole"
    );
    assert!(!dirs.marker.exists());
    pg_ctl_stop(&cluster, &live);
}
