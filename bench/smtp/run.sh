#!/usr/bin/env bash
# SMTP relay benchmark: bastide versus Postfix configured as a relay, side by side in one
# run on the same machine and the same file system, both driven by Postfix's smtp-source
# and both relaying to the same smtp-sink.
#
#   bench/smtp/run.sh                 # 20 sessions, 5000 messages of 4 KiB, 3 runs each
#   MSGS=2000 RUNS=5 bench/smtp/run.sh
#   NO_BUILD=1 BASTIDE=/path/to/bastide bench/smtp/run.sh    # a binary built elsewhere
#   LIMIT_KEY=concurrency ...        # for binaries older than destination_concurrency_limit
#   LIMIT=20 PER_CONN=100            # [smtp.relay] destination_concurrency_limit and
#                                    # messages_per_connection given to bastide
#
# Figures per target (medians over RUNS):
#   accepted/s  messages acknowledged (250 after DATA, on disk) per second: the time
#               smtp-source needs to get all its 250s;
#   relayed/s   end to end: from the first message sent until the sink holds them all.
# Zero loss is checked: the sink must hold exactly MSGS messages after each run.
# Needs: postfix (smtp-source, smtp-sink, postfix), python3; run as root (Postfix's own
# instance needs it). Not part of the test suite.
set -euo pipefail

MSGS=${MSGS:-5000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-4096}
RUNS=${RUNS:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/bastide-bench.XXXXXX")
SINKDIR=$(mktemp -d /dev/shm/bastide-bench-sink.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    postfix -c "$WORK/pf/etc" stop >/dev/null 2>&1 || true
    sleep 0.5
    rm -rf "$WORK" "$SINKDIR"
}
trap cleanup EXIT

for p in smtp-source smtp-sink postfix postconf; do
    command -v "$p" >/dev/null || PATH=$PATH:/usr/sbin
    command -v "$p" >/dev/null || { echo "$p missing: apt-get install -y postfix" >&2; exit 1; }
done

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK=$(port); BPORT=$(port); PPORT=$(port); APORT=$(port)

LIMIT=${LIMIT:-20}
LIMIT_KEY=${LIMIT_KEY:-destination_concurrency_limit}
PER_CONN=${PER_CONN:-100}
if [ -z "${NO_BUILD:-}" ]; then
    echo "building bastide (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet -p bastide)
fi
BASTIDE=${BASTIDE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/bastide}

# The smarthost: counts nothing, dumps every message to tmpfs so we can count them.
# SINK_OPTS: more smtp-sink options, e.g. -p (no PIPELINING offered).
# shellcheck disable=SC2086
smtp-sink -u root -m 512 ${SINK_OPTS:-} -d "$SINKDIR/%H%M%S." "127.0.0.1:$SINK" 1024 &
PIDS+=($!)

# bastide
"$BASTIDE" init --project bench --dir "$WORK/b/state" --agents-listen "127.0.0.1:$APORT" --metrics-listen 127.0.0.1:0 >/dev/null
cat >> "$WORK/b/state/bastide.toml" <<TOML

[smtp]
listen = "127.0.0.1:$BPORT"
allow = ["127.0.0.0/8"]
max_connections_per_client = 1000

[smtp.relay]
host = "127.0.0.1"
port = $SINK
tls = "none"
$LIMIT_KEY = $LIMIT
retry_initial = "1s"
TOML
[ "$LIMIT_KEY" = destination_concurrency_limit ] && echo "messages_per_connection = $PER_CONN" >> "$WORK/b/state/bastide.toml"
RUST_LOG=warn "$BASTIDE" --config "$WORK/b/state/bastide.toml" serve 2>"$WORK/bastide.log" &
PIDS+=($!)

# Postfix: a private instance (config, queue and data directories of its own).
PF=$WORK/pf
mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
chmod 755 "$WORK" "$PF" "$PF/queue"
chown postfix "$PF/data"
cp /etc/postfix/master.cf "$PF/etc/master.cf"
cp -r /etc/postfix/postfix-files /etc/postfix/postfix-files.d /etc/postfix/dynamicmaps.cf /etc/postfix/dynamicmaps.cf.d "$PF/etc/" 2>/dev/null || true
cat > "$PF/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
meta_directory = $PF/etc
myhostname = postfix.bench.test
mydestination =
local_transport = error:local delivery is off
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$SINK
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = $PF/maillog
default_process_limit = 100
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtp_destination_concurrency_limit = 20
default_destination_concurrency_limit = 20
alias_maps =
alias_database =
CF
postconf -c "$PF/etc" -F '*/*/chroot = n'
postconf -c "$PF/etc" -M# smtp/inet
postconf -c "$PF/etc" -Me "127.0.0.1:$PPORT/inet = 127.0.0.1:$PPORT inet n - n - - smtpd"
postfix -c "$PF/etc" check
postfix -c "$PF/etc" start || { echo "postfix did not start:" >&2; cat "$PF/maillog" >&2 2>/dev/null; exit 1; }

for p in $BPORT $PPORT; do
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break
        sleep 0.1
    done
done

count() { find "$SINKDIR" -type f | wc -l; }
now() { date +%s.%N; }

# run PORT -> "accepted_per_s relayed_per_s"
run() {
    local port=$1
    rm -f "$SINKDIR"/*
    local t0 t1 t2 n
    t0=$(now)
    smtp-source -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -f bench@example.com -t sink@example.org "127.0.0.1:$port"
    t1=$(now)
    for _ in $(seq 6000); do
        [ "$(count)" -ge "$MSGS" ] && break
        sleep 0.05
    done
    t2=$(now)
    sleep 1
    n=$(count)
    if [ "$n" -ne "$MSGS" ]; then
        echo "LOSS OR DUPLICATES: sink holds $n of $MSGS messages" >&2
        exit 1
    fi
    python3 -c "print(f'{$MSGS/($t1-$t0):.0f} {$MSGS/($t2-$t0):.0f}')"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

declare -A ACC REL
for target in bastide postfix; do
    port=$BPORT; [ $target = postfix ] && port=$PPORT
    acc=(); rel=()
    for i in $(seq "$RUNS"); do
        read -r a r < <(run "$port")
        echo "$target run $i: accepted $a msg/s, relayed $r msg/s" >&2
        acc+=("$a"); rel+=("$r")
    done
    ACC[$target]=$(printf '%s\n' "${acc[@]}" | median)
    REL[$target]=$(printf '%s\n' "${rel[@]}" | median)
    if [ $target = bastide ]; then
        # Connection reuse towards the smarthost, over all runs (newer binaries count it).
        "$BASTIDE" --config "$WORK/b/state/bastide.toml" mail queue --json 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin).get("metrics", {})
c, t = m.get("bastide_smtp_relay_connections_total"), m.get("bastide_smtp_relay_transactions_total")
if c: print(f"bastide: {t} transactions over {c} connections to the smarthost ({t/c:.0f} per connection)", file=sys.stderr)
' || true
    fi
done

echo
echo "SMTP relay: $MSGS messages of $SIZE bytes, $SESSIONS sessions, medians of $RUNS runs, spools on $(df -T "$WORK" | awk 'NR==2{print $2}'), bastide $LIMIT_KEY = $LIMIT"
printf '%-10s %14s %14s\n' target "accepted/s" "relayed/s"
for t in bastide postfix; do printf '%-10s %14s %14s\n' $t "${ACC[$t]}" "${REL[$t]}"; done
python3 -c "print(f'ratio bastide/postfix: accepted {${ACC[bastide]}/${ACC[postfix]}:.2f}x, relayed {${REL[bastide]}/${REL[postfix]}:.2f}x')"
echo "zero loss: every run delivered exactly $MSGS messages"
