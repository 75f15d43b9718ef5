#!/bin/sh
# Objects preflight benchmark (issue 18): what hashing the blobs a restore would write costs on
# 5,000 × 4 KiB + 200 × 1 MiB + 4 × 64 MiB in a local repository: the old presence-and-size
# check, the delta against an empty live store (worst case, kept in scratch, and without),
# against a live store equal to the point (best case), every blob (`verify = "full"`), and the
# restore that follows, from the scratch and from the repository. BENCH_DIR and BENCH_ROUNDS
# tune it.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p repository --bench preflight_objects
