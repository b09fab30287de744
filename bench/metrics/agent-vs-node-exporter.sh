#!/usr/bin/env bash
# Agent collection cost side by side with prometheus-node-exporter on the same machine:
# bastide-agent ships host metrics every INTERVAL over its session to a local bastion;
# node_exporter is scraped by curl at the same interval. Prints CPU and RSS of each over
# WINDOW seconds and the ratio agent/node_exporter. Usage: bench/metrics/agent-vs-node-exporter.sh [WINDOW] [INTERVAL]
set -euo pipefail
cd "$(dirname "$0")/../.."
WINDOW=${1:-60}
INTERVAL=${2:-15}
command -v prometheus-node-exporter >/dev/null || { echo "apt-get install -y prometheus-node-exporter"; exit 1; }
cargo build --release --quiet -p bastide -p bastide-agent
B=$PWD/target/release
D=$(mktemp -d /tmp/bastide-mbench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
AP=$(port); MP=$(port); NP=$(port)
"$B/bastide" init --dir "$D/st" --project bench --agents-listen "127.0.0.1:$AP" --metrics-listen "127.0.0.1:$MP" >/dev/null
"$B/bastide" --config "$D/st/bastide.toml" serve 2>/dev/null &
# The admin socket appears once the daemon is up; a fixed sleep raced it (and set -e then
# ended the script silently).
T=
for _ in $(seq 100); do
  T=$("$B/bastide" --config "$D/st/bastide.toml" token create 2>/dev/null) && break
  sleep 0.1
done
[ -n "$T" ] || { echo "bastide did not start"; exit 1; }
"$B/bastide-agent" enroll --bastion 127.0.0.1:$AP --token "$T" --ca-pin "$("$B/bastide" ca-pin --dir "$D/st")" --name bench --state-dir "$D/ag" >/dev/null
printf 'metrics_interval = "%ss"\nadvertise_addresses = ["127.0.0.1"]\n' "$INTERVAL" > "$D/ag.toml"
"$B/bastide-agent" run --state-dir "$D/ag" --config "$D/ag.toml" 2>"$D/agent.log" &
AGENT=$!
prometheus-node-exporter --web.listen-address=127.0.0.1:$NP >/dev/null 2>&1 &
NODE=$!
( while sleep "$INTERVAL"; do curl -s -o /dev/null "http://127.0.0.1:$NP/metrics"; done ) &
sleep 3
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
a0=$(ticks $AGENT); n0=$(ticks $NODE)
sleep "$WINDOW"
kill -0 $AGENT 2>/dev/null || { echo "agent died:"; cat "$D/agent.log"; exit 1; }
a1=$(ticks $AGENT); n1=$(ticks $NODE)
HZ=$(getconf CLK_TCK)
python3 - "$a0" "$a1" "$n0" "$n1" "$(rss $AGENT)" "$(rss $NODE)" "$HZ" "$WINDOW" "$INTERVAL" <<'PY'
import sys
a0,a1,n0,n1,ar,nr,hz,w,i=map(float,sys.argv[1:])
n=w/i
ac=(a1-a0)/hz/n*1000; nc=(n1-n0)/hz/n*1000
print(f"collections            {n:.0f} each (interval {i:.0f}s, window {w:.0f}s)")
print(f"CPU per collection     agent {ac:.2f} ms   node_exporter {nc:.2f} ms   ratio {ac/nc if nc else float('nan'):.2f}")
print(f"RSS                    agent {ar/1024:.1f} MiB   node_exporter {nr/1024:.1f} MiB   ratio {ar/nr:.2f}")
PY
