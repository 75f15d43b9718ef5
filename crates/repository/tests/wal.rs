//! WAL files in the repository, on a local directory: what a push killed half-way leaves is
//! finished by the next push (Postgres retries it), pushes racing on one file agree, a damaged
//! body is found by a fetch and nothing is written, and the records list in name order.

mod common;

use common::*;
use repository::*;

const SEGMENT: &str = "000000010000000000000003";

fn wal_file(dir: &std::path::Path, name: &str, fill: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    // A segment is 16 MiB of mostly compressible pages.
    let mut bytes = vec![fill; 1 << 20];
    bytes[..8].copy_from_slice(b"walpage!");
    std::fs::write(&path, bytes).expect("write a WAL file");
    path
}

fn files_named(dir: &std::path::Path, suffix: &str) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter(|f| f.ends_with(suffix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_killed_half_way_is_finished_by_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("repo");
    let repo = file_repo(&root).await;
    let pg_wal = dir.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).expect("pg_wal");
    let path = wal_file(&pg_wal, SEGMENT, 7);

    assert_eq!(
        wal_push(&repo, &path).await.expect("push"),
        Pushed::Archived
    );
    // Killed after the body, before the record that commits it: the next push writes both.
    let records = files_named(&root, ".json");
    assert_eq!(records.len(), 1, "{records:?}");
    std::fs::remove_file(root.join(&records[0])).expect("drop the record");
    assert_eq!(
        wal_push(&repo, &path).await.expect("push again"),
        Pushed::Archived
    );
    assert_eq!(
        wal_push(&repo, &path).await.expect("and again"),
        Pushed::AlreadyArchived
    );
    assert_eq!(files_named(&root, ".zst").len(), 1, "one body");

    // Other bytes under the committed name are refused; the committed file is still the one
    // fetched.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).expect("other");
    let other = wal_file(&other_dir, SEGMENT, 9);
    let refused = wal_push(&repo, &other)
        .await
        .expect_err("other bytes are refused");
    assert!(
        refused.to_string().contains("with other contents"),
        "{refused:#}"
    );
    let fetched = dir.path().join("fetched");
    let record = wal_fetch(&repo, SEGMENT, &fetched).await.expect("fetch");
    assert_eq!(record.size, 1 << 20);
    assert_eq!(
        std::fs::read(&fetched).expect("read"),
        std::fs::read(&path).expect("read")
    );

    // Two pushes of one file at once agree.
    let next = wal_file(&pg_wal, "000000010000000000000004", 1);
    let (a, b) = tokio::join!(wal_push(&repo, &next), wal_push(&repo, &next));
    let mut both = [a.expect("push a"), b.expect("push b")];
    both.sort_by_key(|p| *p == Pushed::AlreadyArchived);
    assert_eq!(both[0], Pushed::Archived);

    let history = wal_file(&pg_wal, "00000002.history", b'x');
    wal_push(&repo, &history)
        .await
        .expect("push a history file");
    let names: Vec<String> = wal_list(&repo)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(
        names,
        [
            "000000010000000000000003",
            "000000010000000000000004",
            "00000002.history"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_body_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("repo");
    let repo = file_repo(&root).await;
    let path = wal_file(dir.path(), SEGMENT, 3);
    wal_push(&repo, &path).await.expect("push");
    let body = files_named(&root, ".zst");
    assert_eq!(body.len(), 1);
    // A valid body of the right size with other bytes: only the hash can tell.
    let other = zstd_of(&vec![4u8; 1 << 20]);
    std::fs::write(root.join(&body[0]), other).expect("damage the body");
    let dest = dir.path().join("restored");
    let err = wal_fetch(&repo, SEGMENT, &dest)
        .await
        .expect_err("a damaged body is refused");
    assert!(format!("{err:#}").contains("is damaged"), "{err:#}");
    assert!(!dest.exists(), "nothing was written");
    assert!(
        std::fs::read_dir(dir.path()).expect("list").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .contains("rollcall-")),
        "no temporary file left"
    );

    let missing = wal_fetch(&repo, "0000000100000000000000FF", &dest)
        .await
        .expect_err("missing");
    assert!(missing.downcast_ref::<WalError>().is_some(), "{missing:#}");
}

fn zstd_of(bytes: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(bytes, 3).expect("compress")
}
