#!/usr/bin/env bash
# Soak and scale (issue 10, point 4): AGENTS simulated agents (default 5000) against a real
# release bastide for DURATION (default 30m), each shipping 1 log line/s (a batch every 5 s
# over ShipLogs), one metrics batch per 15 s and heartbeats over its Session, with a config
# change pushed every minute. Samples the bastion's RSS, fds, threads and CPU every 30 s to
# CSV (default bench/soak/samples.csv), then checks every config round was ACKed by every agent
# and every acknowledged log line is in the store exactly once.
# Usage: bench/soak/run.sh [AGENTS] [DURATION] [extra bastide-soak flags...]
#   e.g. bench/soak/run.sh 500 3m          (smoke)
#        bench/soak/run.sh                 (the full run: 5000 agents, 30 minutes)
# MALLOC_ARENA_MAX defaults to 2, as in systemd/bastide.service; set it to 0 to leave glibc's
# default (8 arenas per core).
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS=${1:-5000}
DURATION=${2:-30m}
shift $(( $# > 2 ? 2 : $# ))
# One socket per agent in this tool and one in the bastion, plus files: the soft limit goes
# up to the hard one (the tool says so and stops when that is still too low).
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet -p bastide -p bastide-bench --bin bastide --bin bastide-soak
ARENA=${MALLOC_ARENA_MAX:-2}
if [ "$ARENA" = 0 ]; then unset MALLOC_ARENA_MAX; else export MALLOC_ARENA_MAX=$ARENA; fi
# Exported: the bastion (the tool's child) inherits it; the summary prints what the bastion's
# environment really held.
exec ./target/release/bastide-soak --agents "$AGENTS" --duration "$DURATION" \
  --csv "${CSV:-bench/soak/samples.csv}" "$@"
