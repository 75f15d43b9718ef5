#!/bin/sh
# Postgres backup benchmark (issue 4): 2.2 million rows over 4 tables on a throwaway cluster,
# rollcall's backup (pg_dump -Z0 + multithreaded zstd, streamed into a repository) against the
# runbook's plain `pg_dump --format=custom`. BENCH_ROWS_SCALE=N multiplies the rows.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench pg_backup
