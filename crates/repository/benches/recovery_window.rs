//! The RPO gauges' cost (issue 21): `recovery_window` over `BENCH_SEGMENTS` (default 10,000)
//! WAL segments archived with `wal_push` (a record and a body each) into a file:// repository,
//! which the coordinator reads every `[metrics] observe_interval`. One listing of `wal/`, no
//! record read: prints the median, min and max of `BENCH_ROUNDS` (default 5) reads.
//!
//! `cargo bench -p repository --bench recovery_window`

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::time::Instant;

use futures::StreamExt as _;
use repository::*;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run() {
    let segments = env_number("BENCH_SEGMENTS", 10_000);
    let rounds = env_number("BENCH_ROUNDS", 5).max(1) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("repo");
    let repo = Repository::open(
        &format!("file://{}", root.display()),
        RepositoryOptions::default(),
    )
    .await
    .expect("repo");
    // Small segment files: the window reads names and times, never bodies.
    let pg_wal = dir.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).expect("pg_wal");
    let started = Instant::now();
    futures::stream::iter(1..=segments)
        .map(|n| {
            let (repo, pg_wal) = (&repo, &pg_wal);
            async move {
                let name = format!("00000001{:08X}{:08X}", n / 0x100, n % 0x100);
                let path = pg_wal.join(&name);
                std::fs::write(&path, format!("segment {n}")).expect("segment");
                wal_push(repo, &path).await.expect("push");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    println!(
        "archived {segments} segments in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The base backup the window starts from: its record only.
    let base = BaseBackup {
        id: "b1".into(),
        env: Some("prod".into()),
        system_identifier: "1".into(),
        server_version_num: 150_000,
        wal_segment_size: 16 << 20,
        timeline: 1,
        start_lsn: "0/1000028".into(),
        end_lsn: "0/1000100".into(),
        start_wal: "000000010000000000000001".into(),
        end_wal: "000000010000000000000001".into(),
        started_at: chrono::Utc::now(),
        consistent_at: chrono::Utc::now(),
        key: "base/b1/base.tar.zst".into(),
        size: 1,
        sha256: String::new(),
        tar_size: 1,
    };
    let mut took = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let window = recovery_window(&repo, std::slice::from_ref(&base))
            .await
            .expect("window")
            .expect("a window");
        took.push(started.elapsed());
        assert_eq!(
            window.newest_segment,
            format!("00000001{:08X}{:08X}", segments / 0x100, segments % 0x100),
            "the window reaches the newest segment"
        );
    }
    took.sort();
    println!(
        "recovery_window over {segments} archived segments ({} objects, file://): median {:?}, \
         min {:?}, max {:?}",
        segments * 2,
        took[took.len() / 2],
        took[0],
        took[took.len() - 1]
    );
}
