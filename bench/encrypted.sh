#!/bin/sh
# Encrypted against plaintext repository (issue 22): backup-postgres, restore-postgres, an
# object snapshot and an object restore of the bench datasets into a plaintext and an encrypted
# file:// repository, rounds interleaved; prints medians and the encrypted/plain ratio.
# BENCH_ROUNDS=N (default 3), BENCH_ROWS_SCALE=N, BENCH_DIR=DIR.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench encrypted
