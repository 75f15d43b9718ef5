#!/bin/sh
# A whole default-plan drill, two builds paired (issue 18's target: verifying every byte before
# the freeze and preparing Postgres outside it may make the whole drill at most 15% slower).
#
#   bench/whole-drill.sh OLD_ROLLCALL NEW_ROLLCALL
#
# Runs `rollcall demo --sessions $BENCH_SESSIONS` (default 400) with each binary in turn,
# BENCH_ROUNDS times each (default 5), alternating so the machine's drift hits both alike, and
# reads each drill's report.json: the drill's wall time (first phase started to last phase
# finished) and the freeze window (the freeze phase started to unfreeze finished), with the
# drill's preflight, data plane and smoke times. Prints each round, the medians and the ratio
# NEW/OLD. The smokes wait for the service (cowork-sim's worker catching up), so they, not
# Rollcall, make the occasional slow round. Build the old binary from the commit to compare
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
parts = {"old": [], "new": []}
DATA = ("restore-postgres", "prepare-postgres", "commit-postgres", "restore-objects")
print(f"{'round':>5} {'build':>5} {'drill':>8} {'freeze':>8} {'preflight':>10} {'data':>8} "
      f"{'smokes':>8}")
for i in range(1, rounds + 1):
    for which in ("old", "new"):
        report = json.load(open(f"{base}/{which}-{i}/report.json"))
        phases = [p for p in report["phases"] if p.get("started_at") and p.get("finished_at")]
        wall = (max(at(p["finished_at"]) for p in phases)
                - min(at(p["started_at"]) for p in phases)).total_seconds()
        freeze = next(p for p in phases if p["action"] == "freeze")
        unfreeze = next(p for p in phases if p["action"] == "unfreeze")
        window = (at(unfreeze["finished_at"]) - at(freeze["started_at"])).total_seconds()
        ms = lambda actions: sum(p["duration_ms"] for p in phases if p["action"] in actions) / 1000
        # The data plane: phases that restore run one after another except the object
        # restore, which runs beside the Postgres swap (or restore) in both plans.
        data = {p["action"]: p["duration_ms"] / 1000 for p in phases}
        plane = data.get("prepare-postgres", 0) + max(
            data.get(a, 0) for a in ("restore-postgres", "commit-postgres", "restore-objects"))
        row = (ms(("preflight",)), plane, ms(("smoke",)))
        walls[which].append(wall)
        freezes[which].append(window)
        parts[which].append(row)
        print(f"{i:>5} {which:>5} {wall:>7.2f}s {window:>7.2f}s {row[0]:>9.2f}s {row[1]:>7.2f}s "
              f"{row[2]:>7.2f}s")
m = {k: statistics.median(v) for k, v in walls.items()}
f = {k: statistics.median(v) for k, v in freezes.items()}
print(f"drill, median: old {m['old']:.2f} s, new {m['new']:.2f} s, new/old {m['new'] / m['old']:.3f} "
      f"(target <= 1.15)")
print(f"freeze window, median: old {f['old']:.2f} s, new {f['new']:.2f} s, "
      f"new/old {f['new'] / f['old']:.3f}")
for n, name in enumerate(("preflight", "data plane", "smokes")):
    o = statistics.median(r[n] for r in parts["old"])
    w = statistics.median(r[n] for r in parts["new"])
    print(f"{name}, median: old {o:.2f} s, new {w:.2f} s")
PY
