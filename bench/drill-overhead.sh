#!/bin/sh
# Orchestration overhead of a whole default-plan drill (issue 5): drill wall time minus the
# data-plane time (the Postgres prepare, then the longer of the concurrent commit and object
# restore) minus the smoke commands' own time (bounded commands the plan waits for by
# design). Everything else —
# preflight, freeze, scale, start and readiness, verify, report, unfreeze, and the gaps between
# phases — is overhead. Target: <= 2 s.
#
# Runs `rollcall demo` (release build) BENCH_ROUNDS times (default 3) and reads each drill's
# report.json. Needs PostgreSQL's server binaries, like the demo.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bin rollcall >/dev/null
rounds="${BENCH_ROUNDS:-3}"
base="$(mktemp -d "${TMPDIR:-/tmp}/rollcall-bench-drill-XXXXXX")"
trap 'rm -rf "$base"' EXIT
# Postgres runs as the postgres user when we are root: it must reach the cluster directory.
chmod 755 "$base"
i=1
while [ "$i" -le "$rounds" ]; do
  dir="$base/round-$i"
  target/release/rollcall demo --dir "$dir" >"$base/demo-$i.log" 2>&1 || {
    echo "round $i: rollcall demo failed; its output:" >&2
    cat "$base/demo-$i.log" >&2
    exit 1
  }
  i=$((i + 1))
done
python3 - "$base" "$rounds" <<'EOF'
import json, sys
from datetime import datetime

def at(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00"))

base, rounds = sys.argv[1], int(sys.argv[2])
print(f"{'round':>5} {'wall':>8} {'restore':>8} {'smokes':>8} {'gaps':>8} {'overhead':>9}")
overheads = []
for i in range(1, rounds + 1):
    report = json.load(open(f"{base}/round-{i}/report.json"))
    phases = [p for p in report["phases"] if p.get("started_at") and p.get("finished_at")]
    start = min(at(p["started_at"]) for p in phases)
    end = max(at(p["finished_at"]) for p in phases)
    wall = (end - start).total_seconds() * 1000
    # Postgres is prepared before the freeze, then committed beside the object restore.
    data = {p["action"]: p["duration_ms"] for p in phases}
    restore = data.get("prepare-postgres", 0) + max(
        data.get(a, 0) for a in ("restore-postgres", "commit-postgres", "restore-objects"))
    smokes = sum(p["duration_ms"] for p in phases if p["action"] == "smoke")
    # Time no phase was running: the coordinator's own share.
    spans = sorted((at(p["started_at"]), at(p["finished_at"])) for p in phases)
    gaps, cursor = 0.0, spans[0][0]
    for s, f in spans:
        if s > cursor:
            gaps += (s - cursor).total_seconds() * 1000
        cursor = max(cursor, f)
    overhead = wall - restore - smokes
    overheads.append(overhead)
    print(f"{i:>5} {wall:>6.0f}ms {restore:>6.0f}ms {smokes:>6.0f}ms {gaps:>6.0f}ms {overhead:>7.0f}ms")
overheads.sort()
print(f"orchestration overhead: median {overheads[len(overheads) // 2]:.0f} ms "
      f"(target <= 2000 ms), worst {overheads[-1]:.0f} ms")
EOF
