#!/usr/bin/env bash
# simpletun demo - the README's main command. Run as root on a fresh Debian machine:
#
#     bash scripts/demo.sh
#
# It sets the project up (scripts/setup.sh), builds two network namespaces joined by a veth
# pair, runs a simpletun server (ESP, aes-128-cbc) in one and a client in the other, pings and
# moves data through the tunnel (SHA-256 shown on both ends), decodes what crossed the veth
# (handshake control frames, then ESP: SPI and sequence numbers; no plaintext), and shows the
# session counters. Everything it creates is removed at the end, also on error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (network namespaces and TUN devices need it)" >&2
    exit 1
fi

bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step() { echo; bold "==> $*"; }
show() { printf '    $ %s\n' "$*"; }   # a command, as a user would type it
indent() { sed 's/^/    /'; }

step "Set-up (scripts/setup.sh: system packages, .venv, the Rust extension)"
bash scripts/setup.sh 2>&1 | indent
for tool in ip tcpdump ping; do
    command -v "$tool" >/dev/null || { echo "demo: '$tool' is missing" >&2; exit 1; }
done

ST=$ROOT/.venv/bin/simpletun
PY=$ROOT/.venv/bin/python
XFER=$ROOT/simpletun/lab/xfer.py
NS_A=st-demo-a-$$
NS_B=st-demo-b-$$
A_VETH=10.250.0.1
B_VETH=10.250.0.2
A_TUN=10.251.0.1
B_TUN=10.251.0.2
PORT=55555
WORK=$(mktemp -d /tmp/simpletun-demo.XXXXXX)
PIDS=()
MADE_NS=()

stop_pid() {   # stop_pid PID SIGNAL: signal it, wait up to 3 s, then SIGKILL
    local pid=$1 sig=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid" TERM; done
    for ns in "${MADE_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
    if [ "$status" -ne 0 ]; then
        echo
        echo "demo: FAILED (exit status $status); logs:" >&2
        for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    fi
    rm -rf "$WORK"
    echo
    left=$(ip netns list | grep -c -e "$NS_A" -e "$NS_B" || true)
    echo "cleaned up: processes stopped, namespaces removed ($left left), $WORK deleted"
    exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted"; exit 130' INT TERM

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
bg_in() {   # bg_in NS LOG CMD...: start CMD in the namespace, log to LOG, remember its PID
    local ns=$1 log=$2
    shift 2
    ip netns exec "$ns" "$@" >"$log" 2>&1 &
    PIDS+=("$!")   # `ip netns exec` execs the command: this is its own PID
}
wait_for() {   # wait_for SECONDS CMD...: retry CMD until it succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

step "Two network namespaces joined by a veth pair"
for ns in "$NS_A" "$NS_B"; do
    ip netns add "$ns"
    MADE_NS+=("$ns")
    ip -n "$ns" link set lo up
    # keep the demo's traffic to what we send (no IPv6 router solicitations etc.)
    ip netns exec "$ns" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
done
ip -n "$NS_A" link add veth-a type veth peer name veth-b netns "$NS_B"
ip -n "$NS_A" addr add "$A_VETH/24" dev veth-a
ip -n "$NS_B" addr add "$B_VETH/24" dev veth-b
ip -n "$NS_A" link set veth-a up
ip -n "$NS_B" link set veth-b up
echo "    $NS_A: veth-a $A_VETH/24   (server side)"
echo "    $NS_B: veth-b $B_VETH/24   (client side)"

step "A pre-shared key, made once and used by both ends"
show "simpletun genkey > key"
"$ST" genkey >"$WORK/key"
echo "    $(stat -c '%A %n' "$WORK/key")"

step "Start capturing what crosses the veth (tcpdump in $NS_A, TCP port $PORT)"
bg_in "$NS_A" "$WORK/tcpdump.log" tcpdump -i veth-a -n -s 0 -U --immediate-mode -Z root \
    -w "$WORK/veth.pcap" "tcp port $PORT"
TCPDUMP_PID=${PIDS[-1]}
wait_for 10 grep -q "listening on" "$WORK/tcpdump.log" || { echo "tcpdump did not start"; exit 1; }

step "Start the tunnel: server in $NS_A, client in $NS_B (ESP, aes-128-cbc)"
show "simpletun -i tun0 -s -d --key key --addr $A_TUN/24"
bg_in "$NS_A" "$WORK/server.log" "$ST" -i tun0 -s -d --key "$WORK/key" --addr "$A_TUN/24"
SERVER_PID=${PIDS[-1]}
wait_for 15 grep -q "listening on TCP port" "$WORK/server.log" || { echo "no server"; exit 1; }
show "simpletun -i tun0 -c $A_VETH -d --key key --addr $B_TUN/24"
bg_in "$NS_B" "$WORK/client.log" "$ST" -i tun0 -c "$A_VETH" -d --key "$WORK/key" \
    --addr "$B_TUN/24"
CLIENT_PID=${PIDS[-1]}
if ! wait_for 15 in_b ping -c 1 -W 0.3 "$A_TUN"; then
    echo "    the tunnel did not come up"
    exit 1
fi
echo "    tunnel up. Server log:"
sed 's/^[0-9:.]* //' "$WORK/server.log" | indent
echo "    client log:"
sed 's/^[0-9:.]* //' "$WORK/client.log" | indent
echo "    devices: $NS_A: $(in_a ip -br addr show tun0 | tr -s ' ')"
echo "             $NS_B: $(in_b ip -br addr show tun0 | tr -s ' ')"

step "Ping through the tunnel ($NS_B -> $A_TUN)"
show "ping -c 5 -i 0.2 $A_TUN"
in_b ping -c 5 -i 0.2 "$A_TUN" | indent

MARKER="hello-through-the-tunnel-$RANDOM$RANDOM"
step "Send a recognisable message through the tunnel: '$MARKER'"
bg_in "$NS_A" "$WORK/marker-recv.log" "$PY" "$XFER" recv "$A_TUN" 5002 --marker "$MARKER" --text \
    --timeout 20
wait_for 10 grep -q listening "$WORK/marker-recv.log"
in_b "$PY" "$XFER" send "$A_TUN" 5002 --bytes 65536 --marker "$MARKER" --text --timeout 20 |
    sed 's/^/    [client side, '"$NS_B"'] /'
wait "${PIDS[-1]}"
grep -v listening "$WORK/marker-recv.log" | sed 's/^/    [server side, '"$NS_A"'] /'

step "Stop the capture"
stop_pid "$TCPDUMP_PID" INT
grep -E "captured|dropped by kernel" "$WORK/tcpdump.log" | indent

NBYTES=$((32 * 1024 * 1024))
step "Transfer 32 MiB of random data through the tunnel ($NS_B -> $NS_A), SHA-256 on both ends"
bg_in "$NS_A" "$WORK/recv.log" "$PY" "$XFER" recv "$A_TUN" 5001 --text --timeout 30
wait_for 10 grep -q listening "$WORK/recv.log"
in_b "$PY" "$XFER" send "$A_TUN" 5001 --bytes "$NBYTES" --seed "$$" --text --timeout 30 \
    >"$WORK/send.log"
wait "${PIDS[-1]}"
sed 's/^/    [client side, '"$NS_B"'] /' "$WORK/send.log"
grep -v listening "$WORK/recv.log" | sed 's/^/    [server side, '"$NS_A"'] /'
sent_sum=$(grep -o 'sha256 [0-9a-f]*' "$WORK/send.log")
recv_sum=$(grep -o 'sha256 [0-9a-f]*' "$WORK/recv.log")
if [ -n "$sent_sum" ] && [ "$sent_sum" = "$recv_sum" ]; then
    echo "    SHA-256 equal at both ends"
else
    echo "    SHA-256 MISMATCH"
    exit 1
fi

step "What crossed the veth (decoded from the capture)"
"$PY" scripts/demo_decode.py "$WORK/veth.pcap" "$PORT" "$MARKER"

step "Stop the tunnel (SIGTERM) and show the session counters"
stop_pid "$CLIENT_PID" TERM
stop_pid "$SERVER_PID" TERM
for side in client server; do
    echo "    $side:"
    grep -o 'counters: .*' "$WORK/$side.log" | tail -n 1 | sed 's/^counters: //' | tr ' ' '\n' |
        paste -d ' ' - - - - | sed -e 's/ *$//' -e 's/^/      /'
done
echo "    (rx/tx_bytes count inner packet bytes, wire_* the framed ESP bytes on the TCP"
echo "    connection; drop counters that are zero are not listed)"
for ns in "$NS_A" "$NS_B"; do
    if ip -n "$ns" link show tun0 >/dev/null 2>&1; then
        echo "    tun0 still present in $ns"
        exit 1
    fi
done
echo "    tun0 removed from both namespaces"

step "Done"
