#!/usr/bin/env bash
# Benchmark (c) of issue 6: bastide-agent CPU and RSS while it follows a file written at
# RATE lines/s (200-byte lines) and ships them to a local bastion, and when idle.
# Usage: bench/logs/agent-cost.sh [WINDOW_SECONDS] [RATE] [RUNS]
# BASTIDE=path/to/bastide picks the bastion binary (it is not what is measured here).
# When the bastion has no log store (ShipLogs unimplemented), the agent still reads,
# batches and fsyncs everything into its disk buffer; the script says which case it ran.
set -euo pipefail
cd "$(dirname "$0")/../.."
WINDOW=${1:-20}
RATE=${2:-10000}
RUNS=${3:-3}
if [ -z "${BASTIDE:-}" ]; then
  [ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p bastide -p bastide-agent
  BASTIDE=$PWD/target/release/bastide
else
  [ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p bastide-agent
fi
B=$PWD/target/release
D=$(mktemp -d /tmp/bastide-lbench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
AP=$(port); MP=$(port)
"$BASTIDE" init --dir "$D/st" --project bench --agents-listen "127.0.0.1:$AP" --metrics-listen "127.0.0.1:$MP" >/dev/null
# TODO(lead): the log store key chosen on the logs-bastion branch ([logs] dir assumed).
cp "$D/st/bastide.toml" "$D/st/bastide.toml.orig"
printf '\n[logs]\ndir = "%s"\n' "$D/store" >> "$D/st/bastide.toml"
if ! "$BASTIDE" --config "$D/st/bastide.toml" check-config >/dev/null 2>&1; then
  cp "$D/st/bastide.toml.orig" "$D/st/bastide.toml"
  STORE="no (this bastion has no [logs] store: the agent buffers only)"
else
  STORE="yes ($D/store)"
fi
"$BASTIDE" --config "$D/st/bastide.toml" serve 2>"$D/bastide.log" &
sleep 1
T=$("$BASTIDE" --config "$D/st/bastide.toml" token create 2>/dev/null)
"$B/bastide-agent" enroll --bastion 127.0.0.1:$AP --token "$T" --ca-pin "$("$BASTIDE" ca-pin --dir "$D/st")" --name bench --state-dir "$D/ag" >/dev/null
mkdir -p "$D/app"
cat > "$D/ag.toml" <<CONF
metrics_interval = "15s"
advertise_addresses = ["127.0.0.1"]
[logs]
buffer_max_bytes = 1073741824
[[logs.sources]]
path = "$D/app/*.log"
CONF
# The agent runs with the environment its systemd unit sets (MALLOC_ARENA_MAX...), read from
# the unit itself so that the two cannot drift apart; NO_UNIT_ENV=1 runs it bare.
UNIT_ENV=()
if [ -z "${NO_UNIT_ENV:-}" ]; then
  read -r -a UNIT_ENV <<<"$(sed -n 's/^Environment=//p' systemd/bastide-agent.service | tr '\n' ' ')"
fi
echo "agent environment: ${UNIT_ENV[*]:-(none)}"
env "${UNIT_ENV[@]}" "$B/bastide-agent" run --state-dir "$D/ag" --config "$D/ag.toml" 2>"$D/agent.log" &
AGENT=$!
sleep 3
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
# RSS split: file-backed pages (the binary's code and data) and anonymous memory (heap, stacks).
split() { awk '/^Rss:/{r=$2} /^Anonymous:/{a=$2} END{printf "%.1f MiB file-backed + %.1f MiB anonymous", (r-a)/1024, a/1024}' "/proc/$1/smaps_rollup"; }
HZ=$(getconf CLK_TCK)
idle_cpu=(); idle_rss=(); load_cpu=(); load_rss=(); rates=()
for run in $(seq 1 "$RUNS"); do
  # Idle: sources configured, nothing written.
  t0=$(ticks $AGENT); sleep "$WINDOW"; t1=$(ticks $AGENT)
  idle_cpu+=("$(python3 -c "print(($t1-$t0)/$HZ/$WINDOW*100)")"); idle_rss+=("$(rss $AGENT)")
  echo "idle window $run: RSS $(rss $AGENT) KiB = $(split $AGENT)"
  # Load: RATE lines/s of 200 bytes for WINDOW seconds.
  t0=$(ticks $AGENT)
  python3 - "$D/app/app.log" "$RATE" "$WINDOW" "$run" <<'PY' > "$D/writer.out"
import sys, time
path, rate, window, run = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
pad = "x" * 160
start = time.time(); n = 0
with open(path, "a", buffering=1 << 16) as f:
    while True:
        el = time.time() - start
        if el >= window: break
        due = int(el * rate)
        while n < due:
            f.write(f"run={run} seq={n:09d} {pad}\n"); n += 1
        f.flush(); time.sleep(0.01)
print(n / window)
PY
  t1=$(ticks $AGENT)
  kill -0 $AGENT 2>/dev/null || { echo "agent died:"; cat "$D/agent.log"; exit 1; }
  load_cpu+=("$(python3 -c "print(($t1-$t0)/$HZ/$WINDOW*100)")"); load_rss+=("$(rss $AGENT)")
  echo "load window $run: RSS $(rss $AGENT) KiB = $(split $AGENT)"
  rates+=("$(cat "$D/writer.out")")
  sleep 5
done
SHIPPED=$(curl -s "http://127.0.0.1:$MP/metrics/agents/bench" | awk '/^bastide_agent_log_events_shipped_total/{v=$2} /^bastide_agent_log_lines_read_total.*file/{r=$2} END{printf "read %s, shipped (acknowledged) %s", r, v}')
python3 - "${idle_cpu[*]}" "${idle_rss[*]}" "${load_cpu[*]}" "${load_rss[*]}" "${rates[*]}" "$STORE" "$SHIPPED" "$WINDOW" <<'PY'
import sys, statistics as st
f = lambda s: [float(x) for x in s.split()]
ic, ir, lc, lr, rt = map(f, sys.argv[1:6])
print(f"log store on the bastion: {sys.argv[6]}")
print(f"agent counters at the end: {sys.argv[7]}")
print(f"runs {len(ic)}, window {sys.argv[8]}s each, medians:")
print(f"idle      CPU {st.median(ic):6.2f} % of a core   RSS {st.median(ir)/1024:6.1f} MiB   (goal < 10 MiB)")
print(f"shipping  CPU {st.median(lc):6.2f} % of a core   RSS {st.median(lr)/1024:6.1f} MiB   at {st.median(rt):.0f} lines/s of 200 bytes")
PY
grep -E "WARN|ERROR" "$D/agent.log" | sort | uniq -c | head -5 || true
