#!/bin/sh
# Object restore benchmark (issue 5): 5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB snapshotted once
# into a local repository, then restored into an empty local target whole (against `rclone sync`
# of the same source data; skipped when rclone is missing) and split into two shards restored
# concurrently (against the whole restore), and as processes pinned one core each with taskset:
# one restoring everything against two restoring a shard each (the scale-out of two agents on
# two hosts). BENCH_DIR and BENCH_ROUNDS tune it; BENCH_DIR=/dev/shm takes the disk's writeback
# out of the figures (3 rounds write ~8.5 GB).
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench restore_objects
