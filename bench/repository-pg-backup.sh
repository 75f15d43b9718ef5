#!/bin/sh
# Postgres backup benchmark (issue 4): 2.2 million rows over 4 tables on a throwaway cluster,
# rollcall's backup (parallel pg_dump -Z0 processes under one snapshot, zstd, streamed into a
# repository) against the runbook's plain `pg_dump --format=custom`. BENCH_ROUNDS=N repeats the
# default backup (default 3), BENCH_ROWS_SCALE=N multiplies the rows.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench pg_backup
