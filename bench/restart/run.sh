#!/bin/sh
# Restart storm (issue 18, goal 1): N enrolled agents connected to a release bastide, which
# is then killed (SIGKILL) or restarted gracefully (SIGTERM) RUNS times; prints, per restart,
# the time until every agent is online again (fleet side and bastion side), the bastion's and
# the simulated fleet's CPU, and the median. The load tool and the bastion share the machine.
#
#   bench/restart/run.sh [AGENTS] [RUNS] [MODES]     defaults: 5000 3 "kill graceful"
set -eu
cd "$(dirname "$0")/../.."
AGENTS=${1:-5000}
RUNS=${2:-3}
MODES=${3:-kill graceful}
cargo build --release -p bastide -p bastide-bench
# Both hold one socket per agent.
ulimit -n 65536 2>/dev/null || true
for mode in $MODES; do
    echo "== $mode, $AGENTS agents, $RUNS restarts, $(git rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"
    # As the unit file runs the bastion (systemd/bastide.service).
    MALLOC_ARENA_MAX=2 ./target/release/bastide-load --agents "$AGENTS" --window 2s \
        --restart "$mode" --restarts "$RUNS"
done
