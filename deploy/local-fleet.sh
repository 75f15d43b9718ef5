#!/usr/bin/env bash
# A coordinator and three agents on loopback with fresh development certificates, until Ctrl-C.
#   deploy/local-fleet.sh [DIR]     (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p cli --bin rollcall
bin="$PWD/target/debug/rollcall"
dir="${1:-$(mktemp -d -t rollcall-fleet-XXXX)}"
mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$bin" certs init --dir "$dir/certs" --agent web-1:web --agent worker-1:worker --agent db-1:database >/dev/null
cat > "$dir/rollcall.toml" <<TOML
[listen]
agents = "127.0.0.1:7400"
operator = "127.0.0.1:7401"
[tls]
ca = "certs/ca.pem"
cert = "certs/coordinator.pem"
key = "certs/coordinator-key.pem"
[state]
url = "sqlite://state.db"
TOML
"$bin" coordinator --config "$dir/rollcall.toml" 2>"$dir/coordinator.log" & pids+=($!)
for spec in web-1:web worker-1:worker db-1:database; do
  name=${spec%%:*}; role=${spec##*:}
  cat > "$dir/$name.toml" <<TOML
name = "$name"
role = "$role"
environment = "dev"
state_dir = "state/$name"
[coordinator]
url = "https://127.0.0.1:7400"
server_name = "localhost"
[tls]
ca = "certs/ca.pem"
cert = "certs/agents/$name.pem"
key = "certs/agents/$name-key.pem"
TOML
  "$bin" agent --config "$dir/$name.toml" 2>"$dir/$name.log" & pids+=($!)
done
for _ in $(seq 1 50); do
  if "$bin" agents --certs "$dir/certs" 2>/dev/null | grep -c ' yes ' | grep -q 3; then break; fi
  sleep 0.2
done
"$bin" agents --certs "$dir/certs"
echo
echo "fleet in $dir (logs: *.log). Try: $bin agents --certs $dir/certs --json"
echo "Ctrl-C stops it."
wait
