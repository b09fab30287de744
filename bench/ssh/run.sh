#!/usr/bin/env bash
# SSH jump host benchmark: bastide versus OpenSSH sshd used as the jump host, same machine,
# same run, same client, same target sshd, same cipher on both hops.
#   (a) throughput of a stream:  ssh -J ... 'cat > /dev/null' < file   (default 1 GiB)
#   (b) setup time of N sequential `ssh -J ... true`                    (default 200)
#   (c) memory with N concurrent jump sessions held open                (default 200)
# Prints each figure and the ratio bastide/OpenSSH. Not part of the test suite.
#
# Usage: bench/ssh/run.sh [--size-mib 1024] [--runs 3] [--setups 200] [--sessions 200]
#                         [--ciphers "aes128-gcm@openssh.com chacha20-poly1305@openssh.com"]
# Needs: openssh-server, openssh-client, procps. Run as root (sshd privilege separation) or
# as any user with /run/sshd present. Builds bastide in release mode.
set -euo pipefail

SIZE_MIB=1024 RUNS=3 SETUPS=200 SESSIONS=200
CIPHERS="aes128-gcm@openssh.com chacha20-poly1305@openssh.com"
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --setups) SETUPS=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --ciphers) CIPHERS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

for p in sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client ps:procps; do
  prog=${p%%:*} pkg=${p#*:}
  command -v "$prog" >/dev/null || [ -x "/usr/sbin/$prog" ] || { echo "$prog missing: apt-get install -y $pkg" >&2; exit 1; }
done
SSHD=$(command -v sshd || echo /usr/sbin/sshd)

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ -n "${BASTIDE_BIN:-}" ]; then
  BASTIDE=$BASTIDE_BIN   # e.g. a debug build, to try the script quickly
else
  cargo build --release --quiet -p bastide --manifest-path "$ROOT/Cargo.toml"
  BASTIDE=${CARGO_TARGET_DIR:-$ROOT/target}/release/bastide
fi

W=$(mktemp -d /tmp/bastide-bench-ssh.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p /run/sshd 2>/dev/null || true

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

ssh-keygen -q -t ed25519 -N '' -f "$W/admin"
ssh-keygen -q -t ed25519 -N '' -f "$W/target_host"
ssh-keygen -q -t ed25519 -N '' -f "$W/jump_host"
cp "$W/admin.pub" "$W/authorized_keys"

start_sshd() { # name port hostkey
  cat > "$W/$1.conf" <<CONF
ListenAddress 127.0.0.1:$2
HostKey $3
AuthorizedKeysFile $W/authorized_keys
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
MaxStartups 2000
MaxSessions 2000
AllowTcpForwarding yes
LogLevel ERROR
CONF
  "$SSHD" -D -e -f "$W/$1.conf" 2>>"$W/$1.log" &
  PIDS+=($!)
  wait_port "$2"
}

TPORT=$(free_port); start_sshd target "$TPORT" "$W/target_host"
JPORT=$(free_port); start_sshd jump "$JPORT" "$W/jump_host"
OPENSSH_PID=${PIDS[-1]}

BPORT=$(free_port)
"$BASTIDE" init --dir "$W/state" --project bench --zone bench.test. \
    --agents-listen "127.0.0.1:$(free_port)" --metrics-listen 127.0.0.1:0 >/dev/null
cat >> "$W/state/bastide.toml" <<CONF

[ssh]
listen = "127.0.0.1:$BPORT"
audit_log = "$W/audit.jsonl"
max_sessions_per_admin = 100000
max_connections = 100000
rate_limit_burst = 100000

[[ssh.admins]]
name = "root"
keys = ["$(cat "$W/admin.pub")"]

[[ssh.rules]]
admins = ["root"]
cidrs = ["127.0.0.0/8"]
ports = [$TPORT]
CONF
RUST_LOG=warn "$BASTIDE" --config "$W/state/bastide.toml" serve 2>>"$W/bastide.log" &
BASTIDE_PID=$!
PIDS+=($BASTIDE_PID)
wait_port "$BPORT"

client_config() { # cipher
  cat > "$W/client.conf" <<CONF
Host *
  User root
  IdentityFile $W/admin
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
  Ciphers $1
  Compression no
CONF
}
jump_of() { case $1 in bastide) echo "root@127.0.0.1:$BPORT" ;; openssh) echo "root@127.0.0.1:$JPORT" ;; esac; }
j() { ssh -F "$W/client.conf" -J "$(jump_of "$1")" -p "$TPORT" 127.0.0.1 "${@:2}"; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }

head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom > "$W/blob"
sessions_rss() { # pid list -> "rss_kib pss_kib"
  local rss=0 pss=0 p
  for p in "$@"; do
    [ -r "/proc/$p/smaps_rollup" ] || continue
    rss=$((rss + $(awk '/^Rss:/ {print $2}' "/proc/$p/smaps_rollup")))
    pss=$((pss + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")))
  done
  echo "$rss $pss"
}
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }

echo "load average at start: $(cut -d" " -f1-3 /proc/loadavg)"
echo "bastide vs OpenSSH $(ssh -V 2>&1 | cut -d, -f1) as jump host; target sshd on 127.0.0.1:$TPORT; $(nproc) CPUs"
echo "stream ${SIZE_MIB} MiB x $RUNS runs (median), $SETUPS sequential setups, $SESSIONS concurrent sessions"
echo
for cipher in $CIPHERS; do
  client_config "$cipher"
  echo "== cipher $cipher"
  declare -A MBPS TS=([openssh]="" [bastide]="")
  for host in openssh bastide; do j "$host" true; done # warm up
  # The hosts alternate run by run, so load changes on the (shared) machine hit both alike.
  for _ in $(seq "$RUNS"); do
    for host in openssh bastide; do
      t0=$(now); j "$host" 'cat > /dev/null' < "$W/blob"; t1=$(now)
      TS[$host]+="$(awk -v a="$t0" -v b="$t1" -v m="$SIZE_MIB" 'BEGIN { printf "%.1f", m / (b - a) }') "
    done
  done
  for host in openssh bastide; do
    MBPS[$host]=$(printf '%s\n' ${TS[$host]} | median)
    printf '  %-8s stream %8s MiB/s (runs: %s)\n' "$host" "${MBPS[$host]}" "${TS[$host]% }"
  done
  echo "  ratio bastide/OpenSSH throughput: $(ratio "${MBPS[bastide]}" "${MBPS[openssh]}") (goal >= 1.0)"
  echo
done

# (b) setup time, with the first cipher (the handshake cost hardly depends on it). The two
# hosts alternate in rounds of 10 so load changes on the machine hit both alike.
client_config "${CIPHERS%% *}"
echo "== $SETUPS sequential 'ssh -J ... true' (${CIPHERS%% *})"
declare -A SETUP_S=([openssh]=0 [bastide]=0)
for _ in $(seq $((SETUPS / 10))); do
  for host in openssh bastide; do
    t0=$(now)
    for _ in $(seq 10); do j "$host" true; done
    t1=$(now)
    SETUP_S[$host]=$(awk -v s="${SETUP_S[$host]}" -v a="$t0" -v b="$t1" 'BEGIN { print s + b - a }')
  done
done
declare -A SETUP
for host in openssh bastide; do
  SETUP[$host]=$(awk -v s="${SETUP_S[$host]}" -v n="$SETUPS" 'BEGIN { printf "%.1f", s * 1000 / n }')
  printf '  %-8s %6s ms per connection (%s s in all)\n' "$host" "${SETUP[$host]}" "${SETUP_S[$host]}"
done
echo "  ratio bastide/OpenSSH setup time: $(ratio "${SETUP[bastide]}" "${SETUP[openssh]}") (goal <= 1.0)"
echo

# (c) concurrent sessions: memory of the jump host only (the target sshd is the same for both).
client_config "aes128-gcm@openssh.com"
echo "== $SESSIONS concurrent jump sessions (aes128-gcm)"
declare -A PER
for host in openssh bastide; do
  if [ "$host" = bastide ]; then base=$(sessions_rss "$BASTIDE_PID"); else base="0 0"; fi
  CPIDS=()
  for _ in $(seq "$SESSIONS"); do
    j "$host" 'echo up; sleep 600' > "$W/up.$host.$_" 2>/dev/null &
    CPIDS+=($!)
  done
  for _ in $(seq 600); do
    n=$(cat "$W"/up."$host".* 2>/dev/null | grep -c up || true)
    [ "$n" -ge "$SESSIONS" ] && break
    sleep 0.5
  done
  sleep 1
  if [ "$host" = bastide ]; then
    read -r rss pss < <(sessions_rss "$BASTIDE_PID")
    read -r brss bpss <<< "$base"
    total_rss=$rss; used_rss=$((rss - brss)); used_pss=$((pss - bpss))
  else
    mapfile -t kids < <(descendants "$OPENSSH_PID")
    read -r used_rss used_pss < <(sessions_rss "${kids[@]}")
    total_rss=$((used_rss + $(sessions_rss "$OPENSSH_PID" | cut -d' ' -f1)))
  fi
  PER[$host]=$(awk -v r="$used_rss" -v n="$SESSIONS" 'BEGIN { printf "%.1f", r / n }')
  PSS=$(awk -v r="$used_pss" -v n="$SESSIONS" 'BEGIN { printf "%.1f", r / n }')
  printf '  %-8s %4s sessions up; jump host RSS total %7s KiB, per session %7s KiB RSS (%s KiB PSS)\n' \
    "$host" "$n" "$total_rss" "${PER[$host]}" "$PSS"
  kill "${CPIDS[@]}" 2>/dev/null || true
  wait "${CPIDS[@]}" 2>/dev/null || true
  rm -f "$W"/up."$host".*
  sleep 2
done
echo "  ratio bastide/OpenSSH per-session memory: $(ratio "${PER[bastide]}" "${PER[openssh]}") (goal < 1.0)"
echo
echo "load average at end: $(cut -d" " -f1-3 /proc/loadavg)"
