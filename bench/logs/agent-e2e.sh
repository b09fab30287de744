#!/usr/bin/env bash
# Benchmark (b) of issue 6: agent to bastion end to end, with acknowledgements and fsync on
# both sides. LINES numbered lines of 200 bytes are written to a file before the agent starts;
# the figure is the time from the agent's start until the last line is in the bastion's store
# (every line counted there). Prints lines/s and MiB/s per run and the median.
# Usage: bench/logs/agent-e2e.sh [LINES] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
LINES=${1:-1000000}
RUNS=${2:-3}
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p bastide -p bastide-agent
B=$PWD/target/release
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rates=()
for run in $(seq 1 "$RUNS"); do
  D=$(mktemp -d /tmp/bastide-e2e.XXXXXX)
  AP=$(port); MP=$(port)
  "$B/bastide" init --dir "$D/st" --project bench --agents-listen "127.0.0.1:$AP" --metrics-listen "127.0.0.1:$MP" >/dev/null
  printf '\n[logs]\ndir = "%s"\n' "$D/store" >> "$D/st/bastide.toml"
  "$B/bastide" --config "$D/st/bastide.toml" serve 2>"$D/bastide.log" &
  BP=$!
  T=
  for _ in $(seq 100); do
    T=$("$B/bastide" --config "$D/st/bastide.toml" token create 2>/dev/null) && break
    sleep 0.1
  done
  "$B/bastide-agent" enroll --bastion 127.0.0.1:$AP --token "$T" --ca-pin "$("$B/bastide" ca-pin --dir "$D/st")" --name bench --state-dir "$D/ag" >/dev/null
  mkdir -p "$D/app"
  python3 - "$D/app/app.log" "$LINES" <<'PY'
import sys
n=int(sys.argv[2]); pad="x"*170
with open(sys.argv[1],"w") as f:
    for i in range(n):
        f.write(f"seq={i:010d} {pad}\n")
PY
  cat > "$D/ag.toml" <<CONF
metrics_interval = "0s"
advertise_addresses = ["127.0.0.1"]
[logs]
buffer_max_bytes = 2147483648
[[logs.sources]]
path = "$D/app/*.log"
CONF
  start=$(date +%s.%N)
  "$B/bastide-agent" run --state-dir "$D/ag" --config "$D/ag.toml" 2>"$D/agent.log" &
  AG=$!
  # The agent ships in order and the bastion stores in order: the run is over when the
  # last number is in the store (checked cheaply on the file's tail; counting every line at
  # each poll cost the machine more CPU than the measured processes). Every line is counted
  # once after the clock stops.
  last="seq=$(printf %010d $((LINES-1)))"
  while :; do
    if tail -c 400 "$D"/store/bench/*.log 2>/dev/null | grep -q "$last"; then break; fi
    kill -0 $AG 2>/dev/null || { echo "agent died"; cat "$D/agent.log"; exit 1; }
    sleep 0.05
  done
  end=$(date +%s.%N)
  n=$(cat "$D"/store/bench/*.log | grep -c 'seq=')
  [ "$n" -eq "$LINES" ] || { echo "run $run: the store holds $n lines, not $LINES"; exit 1; }
  # CPU time each process used (user + system): on a shared machine the wall-clock rate
  # depends on what else runs; lines per CPU second of both processes does not.
  cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/hz}' "/proc/$1/stat"; }
  ac=$(cpu $AG); bc=$(cpu $BP)
  kill $AG $BP; wait $AG $BP 2>/dev/null || true
  r=$(python3 -c "print(round($LINES/($end-$start)))")
  echo "run $run: $LINES lines in $(python3 -c "print(round($end-$start,2))") s: $r lines/s, $(python3 -c "print(round($r*200/1048576,1))") MiB/s; CPU agent ${ac} s, bastion ${bc} s ($(python3 -c "print(round($LINES/($ac+$bc)))") lines per CPU second); load average $(cut -d' ' -f1 /proc/loadavg)"
  rates+=("$r")
  rm -rf "$D"
done
med=$(printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
echo "median: $med lines/s ($(python3 -c "print(round($med*200/1048576,1))") MiB/s) of 200 bytes; goal 300000"
