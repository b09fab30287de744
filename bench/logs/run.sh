#!/usr/bin/env bash
# Syslog over TCP into per-host files: bastide versus rsyslog (imtcp -> omfile with a
# per-host dynaFile template), side by side in one run, same generator (bench's
# `syslog-gen`: one connection per host, RFC 5424, octet-counted, 200-byte messages).
#
#   bench/logs/run.sh                      # 4 hosts x 250,000 lines, 3 runs each
#   LINES=100000 CONNS=2 RUNS=5 bench/logs/run.sh
#
# Figure: lines/s from the first byte sent until every host's file ends with the
# generator's END-MARKER line (median over RUNS), and the ratio bastide / rsyslog.
# bastide fsyncs every group commit (its store's durability contract); rsyslog's omfile
# with default settings does not fsync at all.
# Needs: rsyslog. Not part of the test suite.
set -euo pipefail

LINES=${LINES:-250000}
CONNS=${CONNS:-4}
SIZE=${SIZE:-200}
RUNS=${RUNS:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/bastide-logs-bench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    rm -rf "$WORK"
}
trap cleanup EXIT
command -v rsyslogd >/dev/null || PATH=$PATH:/usr/sbin
command -v rsyslogd >/dev/null || { echo "rsyslogd missing: apt-get install -y rsyslog" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet -p bastide -p bastide-bench --manifest-path "$ROOT/Cargo.toml"
BASTIDE=$ROOT/target/release/bastide
GEN=$ROOT/target/release/syslog-gen

# Waits until each host file under $1 holds END-MARKER; prints elapsed seconds since $2.
# $3: how host h's directory is named: "address" (bastide files a sender that is not an
# agent under its source address, ip-127-0-1-<h+1>) or "hostname" (rsyslog's %HOSTNAME%).
# Cheap check first: the marker in the file's last 300 bytes. rsyslog does not always write
# a connection's lines in order (a run had END-MARKER 1 line before the end), so a file whose
# size did not change since the previous poll is searched whole.
wait_done() {
    local dir=$1 start=$2 naming=$3
    declare -A size=()
    while :; do
        local done=0
        for h in $(seq 0 $((CONNS - 1))); do
            local name=bench-h$h
            [ "$naming" = address ] && name=ip-127-0-1-$((h + 1))
            f=$(ls "$dir"/$name/*.log 2>/dev/null | tail -1 || true)
            [ -n "$f" ] || continue
            if tail -c 300 "$f" | grep -q END-MARKER; then
                done=$((done + 1))
                continue
            fi
            s=$(stat -c %s "$f")
            if [ "${size[$h]:-}" = "$s" ] && grep -q END-MARKER "$f"; then
                done=$((done + 1))
            fi
            size[$h]=$s
        done
        [ "$done" -eq "$CONNS" ] && break
        sleep 0.05
    done
    python3 -c "import time; print(f'{time.time() - $start:.3f}')"
}

run_bastide() {
    local d=$WORK/bastide-$1 p
    p=$(port)
    "$BASTIDE" init --dir "$d" --project bench --agents-listen "127.0.0.1:$(port)" --metrics-listen "127.0.0.1:$(port)" >/dev/null
    cat >>"$d/bastide.toml" <<CONF

[logs]
dir = "$d/logs"

[syslog]
tcp = ["127.0.0.1:$p"]
allow = ["127.0.0.0/8"]
CONF
    "$BASTIDE" --config "$d/bastide.toml" serve 2>"$d/log" &
    local pid=$!
    PIDS+=("$pid")
    until grep -q "syslog TCP listening" "$d/log"; do sleep 0.1; done
    local start
    start=$(python3 -c 'import time; print(time.time())')
    "$GEN" --target "127.0.0.1:$p" --lines "$LINES" --conns "$CONNS" --size "$SIZE" >/dev/null
    local secs
    secs=$(wait_done "$d/logs" "$start" address)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$secs"
}

run_rsyslog() {
    local d=$WORK/rsyslog-$1 p
    p=$(port)
    mkdir -p "$d/work" "$d/logs"
    cat >"$d/rsyslog.conf" <<CONF
global(workDirectory="$d/work")
module(load="imtcp")
template(name="perhost" type="string" string="$d/logs/%HOSTNAME%/%\$YEAR%-%\$MONTH%-%\$DAY%.log")
template(name="line" type="string" string="%TIMESTAMP:::date-rfc3339% %HOSTNAME% %syslogtag% %syslogfacility-text%.%syslogseverity-text% %msg%\n")
ruleset(name="bench") {
    action(type="omfile" dynaFile="perhost" template="line" dynaFileCacheSize="100")
}
input(type="imtcp" address="127.0.0.1" port="$p" ruleset="bench")
CONF
    rsyslogd -n -f "$d/rsyslog.conf" -i "$d/pid" 2>"$d/log" &
    local pid=$!
    PIDS+=("$pid")
    until python3 -c "import socket; socket.create_connection(('127.0.0.1', $p)).close()" 2>/dev/null; do sleep 0.1; done
    local start
    start=$(python3 -c 'import time; print(time.time())')
    "$GEN" --target "127.0.0.1:$p" --lines "$LINES" --conns "$CONNS" --size "$SIZE" >/dev/null
    local secs
    secs=$(wait_done "$d/logs" "$start" hostname)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$secs"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
TOTAL=$((LINES * CONNS))
B=() R=()
for i in $(seq 1 "$RUNS"); do
    b=$(run_bastide "$i"); r=$(run_rsyslog "$i")
    B+=("$b"); R+=("$r")
    echo "run $i: bastide ${b}s, rsyslog ${r}s"
done
bm=$(printf '%s\n' "${B[@]}" | median)
rm_=$(printf '%s\n' "${R[@]}" | median)
python3 - "$TOTAL" "$bm" "$rm_" <<'PY'
import sys
n, b, r = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print(f"syslog TCP -> per-host files, {n} lines of {__import__('os').environ.get('SIZE','200')} bytes (median):")
print(f"  bastide  {n/b:12.0f} lines/s  ({b:.2f}s, fsynced)")
print(f"  rsyslog  {n/r:12.0f} lines/s  ({r:.2f}s, omfile, no fsync)")
print(f"  ratio bastide/rsyslog: {r/b:.2f}x")
PY
