#!/bin/sh
# A whole default-plan drill, two builds paired (issue 18's target: verifying every byte before
# the freeze and preparing Postgres outside it may make the whole drill at most 15% slower).
#
#   bench/whole-drill.sh OLD_ROLLCALL NEW_ROLLCALL
#
# Runs `rollcall demo --sessions $BENCH_SESSIONS` (default 400) with each binary in turn,
# BENCH_ROUNDS times each (default 5), alternating so the machine's drift hits both alike, and
# reads each drill's report.json: the drill's wall time (first phase started to last phase
# finished) and the freeze window (the freeze phase started to unfreeze finished). Prints each
# round, the medians and the ratio NEW/OLD. Build the old binary from the commit to compare
# against (`git worktree add /tmp/old <commit>; cargo build --release --bin rollcall`).
set -eu
[ $# -eq 2 ] || { echo "usage: $0 OLD_ROLLCALL NEW_ROLLCALL" >&2; exit 2; }
old="$1"; new="$2"
rounds="${BENCH_ROUNDS:-5}"
sessions="${BENCH_SESSIONS:-400}"
base="$(mktemp -d "${TMPDIR:-/tmp}/rollcall-bench-whole-XXXXXX")"
trap 'rm -rf "$base"' EXIT
# Postgres runs as the postgres user when we are root: it must reach the cluster directory.
chmod 755 "$base"
i=1
while [ "$i" -le "$rounds" ]; do
  for which in old new; do
    if [ "$which" = old ]; then bin="$old"; else bin="$new"; fi
    dir="$base/$which-$i"
    "$bin" demo --dir "$dir" --sessions "$sessions" >"$base/$which-$i.log" 2>&1 || {
      echo "$which round $i: rollcall demo failed; its output:" >&2
      cat "$base/$which-$i.log" >&2
      exit 1
    }
  done
  i=$((i + 1))
done
python3 - "$base" "$rounds" <<'PY'
import json, statistics, sys
from datetime import datetime

def at(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00"))

base, rounds = sys.argv[1], int(sys.argv[2])
walls = {"old": [], "new": []}
freezes = {"old": [], "new": []}
print(f"{'round':>5} {'build':>5} {'drill':>8} {'freeze window':>14}")
for i in range(1, rounds + 1):
    for which in ("old", "new"):
        report = json.load(open(f"{base}/{which}-{i}/report.json"))
        phases = [p for p in report["phases"] if p.get("started_at") and p.get("finished_at")]
        wall = (max(at(p["finished_at"]) for p in phases)
                - min(at(p["started_at"]) for p in phases)).total_seconds()
        freeze = next(p for p in phases if p["action"] == "freeze")
        unfreeze = next(p for p in phases if p["action"] == "unfreeze")
        window = (at(unfreeze["finished_at"]) - at(freeze["started_at"])).total_seconds()
        walls[which].append(wall)
        freezes[which].append(window)
        print(f"{i:>5} {which:>5} {wall:>7.2f}s {window:>13.2f}s")
m = {k: statistics.median(v) for k, v in walls.items()}
f = {k: statistics.median(v) for k, v in freezes.items()}
print(f"drill, median: old {m['old']:.2f} s, new {m['new']:.2f} s, new/old {m['new'] / m['old']:.3f} "
      f"(target <= 1.15)")
print(f"freeze window, median: old {f['old']:.2f} s, new {f['new']:.2f} s, "
      f"new/old {f['new'] / f['old']:.3f}")
PY
