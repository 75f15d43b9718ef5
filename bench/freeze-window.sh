#!/bin/sh
# The Postgres part of a drill's freeze window (issue 18): on the 2.2-million-row restore
# dataset, swapping the point in as one phase after the freeze (prepare + commit in the window)
# against the default plan's prepare-then-commit (only the commit in the window), alternating.
# BENCH_ROUNDS=N sets the rounds (default 3), BENCH_ROWS_SCALE=N multiplies the rows.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench pg_swap
