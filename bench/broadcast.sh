#!/usr/bin/env bash
# Broadcast round latency and coordinator memory per agent for N attached agents over mTLS
# (default N = 100, 1000, 10000), plus the RSS of an idle `rollcall agent` process.
#   bench/broadcast.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p e2e --bench broadcast -- "$@"
