#!/usr/bin/env bash
# DNS benchmark: bastide's [dns] versus unbound (1 thread) and dnsmasq, same machine, same
# query file, one run. Each resolver forwards to the same local upstream (another unbound
# serving the fixture zone bench.test.); caches are warmed first, so the figures are
# cached-answer QPS and latency. Also bastide's zone-answer QPS. UDP and TCP (dnsperf -m tcp).
# Prints medians of RUNS runs of SECONDS seconds each and the ratios bastide/unbound and
# bastide/dnsmasq. Not part of the test suite.
#
# Needs: dnsperf, unbound, dnsmasq (Debian: dnsperf unbound dnsmasq-base), dig (dnsutils).
# Usage: bench/dns/run.sh   (env: RUNS=3 SECONDS_PER_RUN=5 CLIENTS=10; BASTIDE=path skips the build)
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECONDS_PER_RUN:-5}
CLIENTS=${CLIENTS:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
for p in dnsperf:dnsperf unbound:unbound dnsmasq:dnsmasq-base dig:dnsutils; do
    command -v "${p%%:*}" >/dev/null || [ -x "/usr/sbin/${p%%:*}" ] ||
        { echo "missing ${p%%:*}: apt-get install -y ${p##*:}" >&2; exit 1; }
done
export PATH="$PATH:/usr/sbin"

if [ -z "${BASTIDE:-}" ]; then
    echo "building bastide (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet -p bastide)
    BASTIDE="$ROOT/target/release/bastide"
fi

T=$(mktemp -d /tmp/bastide-bench-dns.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); PB=$(port); PU=$(port); PM=$(port)
N=1000

# The upstream: unbound serving bench.test. with N names.
{
    cat <<CONF
server:
  interface: 127.0.0.1@$UP
  port: $UP
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$T"
  pidfile: ""
  use-syslog: no
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  local-zone: "bench.test." static
  local-data: "bench.test. 86400 IN SOA ns.bench.test. h.bench.test. 1 3600 600 86400 300"
CONF
    for i in $(seq 0 $((N - 1))); do echo "  local-data: \"n$i.bench.test. 86400 IN A 10.$((i / 250)).$((i % 250)).1\""; done
    echo "remote-control:"; echo "  control-enable: no"
} > "$T/upstream.conf"
unbound -d -c "$T/upstream.conf" 2>"$T/upstream.log" & PIDS+=($!)

# unbound under test: 1 thread, forwarding everything to the upstream.
cat > "$T/unbound.conf" <<CONF
server:
  interface: 127.0.0.1@$PU
  port: $PU
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$T"
  pidfile: ""
  use-syslog: no
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  msg-cache-size: 64m
  rrset-cache-size: 64m
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$UP
remote-control:
  control-enable: no
CONF
unbound -d -c "$T/unbound.conf" 2>"$T/unbound.log" & PIDS+=($!)

# dnsmasq under test.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces --listen-address=127.0.0.1 \
    --port="$PM" --server="127.0.0.1#$UP" --cache-size=10000 --dns-forward-max=1000 \
    --user=root --pid-file="$T/dnsmasq.pid" 2>"$T/dnsmasq.log" & PIDS+=($!)

# bastide: zone bench.internal. with 100 static names, forwarding to the upstream.
"$BASTIDE" init --dir "$T/state" --project bench --zone bench.internal. \
    --agents-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >/dev/null
{
    echo; echo "[dns]"
    echo "listen = [\"127.0.0.1:$PB\"]"
    echo "upstreams = [\"127.0.0.1:$UP\"]"
    echo "allow = [\"127.0.0.0/8\"]"
    echo "rate_limit = 0"
    for i in $(seq 0 99); do
        printf '[[dns.records]]\nname = "z%d"\ntype = "A"\nvalue = "10.9.0.%d"\n' "$i" "$i"
    done
} >> "$T/state/bastide.toml"
RUST_LOG=warn "$BASTIDE" --config "$T/state/bastide.toml" serve 2>"$T/bastide.log" & PIDS+=($!)

for p in $UP $PU $PM $PB; do
    for _ in $(seq 50); do dig @127.0.0.1 -p "$p" +time=1 +tries=1 n1.bench.test >/dev/null 2>&1 && break; sleep 0.2; done
done

for i in $(seq 0 $((N - 1))); do echo "n$i.bench.test A"; done > "$T/cached.txt"
for i in $(seq 0 99); do echo "z$i.bench.internal A"; done > "$T/zone.txt"

# One dnsperf run: "qps avg_latency_ms lost_pct".
perf() { # port file mode
    dnsperf -s 127.0.0.1 -p "$1" -d "$2" -m "$3" -l "$SECS" -c "$CLIENTS" -q 200 2>&1 |
        awk '/Queries per second/ {q=$4} /Average Latency/ {l=$4*1000} /Queries lost/ {gsub(/[()%]/,"",$4); p=$4}
             END {printf "%.0f %.3f %s\n", q, l, p}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Warm the caches: every name once through each resolver.
for p in $PB $PU $PM; do dnsperf -s 127.0.0.1 -p "$p" -d "$T/cached.txt" -n 1 -c 1 >/dev/null 2>&1; done

declare -A Q L LOST
for mode in udp tcp; do
    for name in bastide unbound dnsmasq bastide-zone; do
        case $name in
            bastide) p=$PB f=$T/cached.txt ;; unbound) p=$PU f=$T/cached.txt ;;
            dnsmasq) p=$PM f=$T/cached.txt ;; bastide-zone) p=$PB f=$T/zone.txt ;;
        esac
        : > "$T/runs"
        for _ in $(seq "$RUNS"); do perf "$p" "$f" "$mode" >> "$T/runs"; done
        Q[$name,$mode]=$(cut -d' ' -f1 "$T/runs" | median)
        L[$name,$mode]=$(cut -d' ' -f2 "$T/runs" | median)
        LOST[$name,$mode]=$(cut -d' ' -f3 "$T/runs" | sort -n | tail -1)
        echo "$mode $name: runs (qps latency_ms lost%): $(tr '\n' ';' < "$T/runs")" >&2
    done
done

echo
echo "DNS benchmark: $RUNS runs x ${SECS}s, dnsperf -c $CLIENTS -q 200, $(nproc) CPUs, medians"
printf '%-6s %-13s %12s %14s %9s\n' mode server QPS "avg lat (ms)" "max lost%"
for mode in udp tcp; do
    for name in bastide unbound dnsmasq bastide-zone; do
        printf '%-6s %-13s %12s %14s %9s\n' "$mode" "$name" "${Q[$name,$mode]}" "${L[$name,$mode]}" "${LOST[$name,$mode]}"
    done
done
echo
for mode in udp tcp; do
    awk -v m="$mode" -v b="${Q[bastide,$mode]}" -v u="${Q[unbound,$mode]}" -v d="${Q[dnsmasq,$mode]}" \
        'BEGIN {printf "%s cached QPS ratio: bastide/unbound = %.2fx, bastide/dnsmasq = %.2fx\n", m, b/u, b/d}'
done
