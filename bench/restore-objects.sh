#!/bin/sh
# Object restore benchmark (issue 5): 5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB snapshotted once
# into a local repository, then restored into an empty local target whole (against `rclone sync`
# of the same source data; skipped when rclone is missing) and split into two shards restored
# concurrently (against the whole restore). BENCH_DIR and BENCH_ROUNDS tune it.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench restore_objects
