#!/bin/sh
# Object snapshot benchmark (issue 4): 5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB local → local
# against `rclone sync`, then requests per object against a local S3 server (moto) for
# rollcall, `rclone sync` and `aws s3 sync`. Needs rclone, moto_server and awscli for the
# comparisons (each is skipped when missing). BENCH_DIR, BENCH_ROUNDS, BENCH_SKIP_S3 tune it.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench snapshot
