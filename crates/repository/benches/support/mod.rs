//! Shared by the object benchmarks: the dataset, timing medians and the figures table.

#![allow(dead_code)] // each bench uses part of it

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

use crate::common::fill;

pub struct Figures {
    pub objects: u64,
    pub bytes: u64,
}

/// Writes the dataset: 5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB.
pub async fn dataset(live: &Arc<dyn ObjectStore>) -> Figures {
    fill(live, "small", 5000, 4 << 10).await;
    fill(live, "medium", 200, 1 << 20).await;
    fill(live, "large", 4, 64 << 20).await;
    sync_fs();
    Figures {
        objects: 5204,
        bytes: 5000 * (4 << 10) + 200 * (1 << 20) + 4 * (64 << 20),
    }
}

pub const DATASET: &str = "5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB";

/// `BENCH_ROUNDS`, default 3.
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}

/// `BENCH_DIR`, default the system temp directory.
pub fn bench_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .expect("bench dir")
}

#[allow(clippy::print_stdout)]
pub fn report(label: &str, elapsed: Duration, data: &Figures) {
    let secs = elapsed.as_secs_f64();
    println!(
        "{label:<44} {secs:>9.2} {:>11.0} {:>9.1}",
        data.objects as f64 / secs,
        mb(data.bytes) / secs
    );
}

#[allow(clippy::print_stdout)]
pub fn header() {
    println!(
        "{:<44} {:>9} {:>11} {:>9}",
        "run", "seconds", "objects/s", "MB/s"
    );
}

pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Writes dirty pages out so one run's write-back does not land in the next one's time.
/// Times `rclone sync -q SRC DEST` (then `sync -f DEST` too with `durable`); panics if it fails.
pub fn rclone_sync(src: &std::path::Path, dest: &std::path::Path, durable: bool) -> Duration {
    let started = std::time::Instant::now();
    let status = Command::new("rclone")
        .args(["sync", "-q"])
        .arg(src)
        .arg(dest)
        .status()
        .expect("run rclone");
    assert!(status.success(), "rclone failed");
    if durable {
        let status = Command::new("sync")
            .arg("-f")
            .arg(dest)
            .status()
            .expect("run sync");
        assert!(status.success(), "sync -f failed");
    }
    started.elapsed()
}

pub fn sync_fs() {
    let _ = Command::new("sync").status();
}

/// The load averages, to print beside the figures (another build may share the machine).
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
