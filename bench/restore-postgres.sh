#!/bin/sh
# Postgres restore benchmark (issue 5): 2.2 million rows over 4 tables on a throwaway cluster,
# backed up by rollcall, then restored by rollcall's restore_postgres against a plain
# `pg_restore -j <cores> --no-owner --no-acl` of the runbook's dump file, alternating, same
# run, and ours again with one COPY per table (as pg_restore loads a table). BENCH_ROUNDS=N
# sets the rounds (default 3), BENCH_ROWS_SCALE=N multiplies the rows, BENCH_STAGES=1 prints
# the stage times of our restores.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench pg_restore
