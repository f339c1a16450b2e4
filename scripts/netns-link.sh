#!/usr/bin/env bash
# Two hosts on one machine: two network namespaces, PREFIX-src (10.77.0.1/24) and
# PREFIX-dst (10.77.0.2/24), joined by a veth pair (`veth0` in each, loopback up too),
# the link shaped in both directions to RATE (tbf on each veth end) and DELAY one way
# (so a round trip takes 2*DELAY), for migrations between two `vmm` processes that see
# a real, slow network between them (`ip netns exec PREFIX-dst vmm run --incoming ...`).
#
#   scripts/netns-link.sh up [RATE] [DELAY]   # default 40mbit 5ms; RATE N{bit,kbit,mbit,gbit}, DELAY N{us,ms,s}
#   scripts/netns-link.sh down                # removes all `up` made, ends what runs inside; succeeds if nothing is there
#   scripts/netns-link.sh status              # namespaces, addresses, qdiscs, the delay lines
#
# PREFIX is $NETNS_PREFIX (default `mvm`). `up` first tears down what an earlier `up`
# with the same prefix left, and removes what it made itself if it fails halfway. With
# no right to make namespaces (no CAP_NET_ADMIN, no `ip`) it prints
# `SKIPPED: no network namespaces` and exits 77.
#
# The delay: where the kernel has sch_netem, netem (delay) over tbf (rate) on each veth
# end. Kernels without it (these machines' has no NET_SCH_NETEM) get a delay line in
# user space: the veth's ingress redirects every IPv4 packet (tc mirred) into a tun
# device, `delay0`, whose reader (a small python3 process in that namespace) writes each
# packet back DELAY later, in order; the kernel then delivers it as if it had just
# arrived. tbf still shapes each veth's egress, and
# ARP is not delayed. $NETNS_DELAY_MODE=netem|tun forces one way (default auto).
# $NETNS_OWNER_PID, if set, ends the delay lines when that process is gone (the Rust
# test helper passes its own pid; its next run removes the namespaces themselves).
set -euo pipefail

prefix=${NETNS_PREFIX:-mvm}
src="$prefix-src"
dst="$prefix-dst"
src_addr=10.77.0.1
dst_addr=10.77.0.2
dev=veth0
tun=delay0
# The delay line's first argument, how `status` tells it from other processes.
marker=netns-link-delay-line

usage() {
    echo "usage: $0 up [RATE] [DELAY] | down | status   (env NETNS_PREFIX, default mvm)" >&2
    exit 2
}

die() {
    echo "netns-link.sh: $*" >&2
    exit 1
}

# The user-space delay line: argv marker ns tun delay_us owner_pid. Reads IPv4 packets
# from the tun device and writes each back delay_us after it arrived, in order.
delay_line_py=$(
    cat <<'EOF'
import collections, fcntl, os, select, struct, sys, time

ns, name, delay, owner = sys.argv[2], sys.argv[3], int(sys.argv[4]) / 1e6, int(sys.argv[5])
fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
line = collections.deque()
next_check = time.monotonic() + 1.0
while True:
    now = time.monotonic()
    while line and line[0][0] <= now:
        try:
            os.write(fd, line.popleft()[1])
        except OSError:
            pass  # dropped, as a full queue would
    if owner and now >= next_check:
        next_check = now + 1.0
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            sys.exit(0)
    wait = min(line[0][0] - now if line else 1.0, next_check - now)
    ready, _, _ = select.select([fd], [], [], max(wait, 0.0))
    if ready:
        due = time.monotonic() + delay
        for _ in range(256):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                break
            if pkt and pkt[0] >> 4 == 4:
                line.append((due, pkt))
EOF
)

# Whether namespace $1 exists.
ns_exists() {
    ip netns list 2>/dev/null | awk -v n="$1" '$1 == n { found = 1 } END { exit !found }'
}

# The pids of the delay lines running in namespace $1.
delay_line_pids() {
    local pid args a mine ours
    for pid in $(ip netns pids "$1" 2>/dev/null); do
        args=()
        mapfile -d '' args 2>/dev/null <"/proc/$pid/cmdline" || continue
        mine=0 ours=0
        for a in "${args[@]}"; do
            [ "$a" = "$marker" ] && mine=1
            [ "$a" = "$1" ] && ours=1
        done
        if ((mine && ours)); then echo "$pid"; fi
    done
}

# Whether process $1 is running (neither gone nor a zombie nobody reaped yet).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    case ${stat%% *} in Z | X) return 1 ;; *) return 0 ;; esac
}

# Ends every process in namespace $1, its delay line and whatever else still runs there
# (a test killed before it could end its children): TERM, then KILL after 2 s.
stop_processes() {
    local pids pid left i
    pids=$(ip netns pids "$1" 2>/dev/null) || true
    [ -n "$pids" ] || return 0
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 40); do
        left=""
        for pid in $pids; do
            if running "$pid"; then left="$left $pid"; fi
        done
        [ -n "$left" ] || return 0
        sleep 0.05
    done
    for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
}

down() {
    local ns
    command -v ip >/dev/null || return 0
    for ns in "$src" "$dst"; do
        ns_exists "$ns" && stop_processes "$ns"
    done
    # Deleting one end deletes the pair, at once rather than when the namespace goes.
    for ns in "$src" "$dst"; do
        if ns_exists "$ns"; then ip -n "$ns" link del "$dev" 2>/dev/null || true; fi
    done
    for ns in "$src" "$dst"; do
        if ns_exists "$ns"; then
            ip netns del "$ns"
        fi
    done
}

# RATE in bits per second (tc's units: k, m, g are powers of 1000).
rate_bits() {
    [[ $1 =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "RATE must be like 5mbit, not '$1'"
    local n=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in
    bit) echo "$n" ;;
    kbit) echo $((n * 1000)) ;;
    mbit) echo $((n * 1000000)) ;;
    gbit) echo $((n * 1000000000)) ;;
    esac
}

# DELAY in microseconds.
delay_us() {
    [[ $1 =~ ^([0-9]+)(us|ms|s)$ ]] || die "DELAY must be like 20ms, not '$1'"
    local n=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in
    us) echo "$n" ;;
    ms) echo $((n * 1000)) ;;
    s) echo $((n * 1000000)) ;;
    esac
}

# Starts the delay line in namespace $1 and sends the veth's IPv4 ingress through it.
start_delay_line() {
    local ns=$1 us=$2 py i
    py=$(command -v python3) || die "no python3 for the delay line (and no sch_netem)"
    [ -c /dev/net/tun ] || die "no /dev/net/tun for the delay line (and no sch_netem)"
    ip netns exec "$ns" setsid "$py" -c "$delay_line_py" "$marker" "$ns" "$tun" "$us" \
        "${NETNS_OWNER_PID:-0}" </dev/null >/dev/null 2>&1 &
    for i in $(seq 200); do
        ip -n "$ns" link show "$tun" >/dev/null 2>&1 && break
        ((i < 200)) || die "the delay line in $ns made no $tun in 10 s"
        sleep 0.05
    done
    ip -n "$ns" link set "$tun" up
    # Packets written into the tun arrive on it, not on the veth their source is behind.
    ip netns exec "$ns" sh -c "echo 0 >/proc/sys/net/ipv4/conf/all/rp_filter &&
        echo 0 >/proc/sys/net/ipv4/conf/$tun/rp_filter"
    tc -n "$ns" qdisc add dev "$dev" ingress
    tc -n "$ns" filter add dev "$dev" parent ffff: protocol ip prio 1 u32 match u32 0 0 \
        action mirred egress redirect dev "$tun"
}

# Shapes namespace $1's veth end: RATE $2, DELAY $3. Sets $mode (netem or tun) if auto.
shape() {
    local ns=$1 rate=$2 delay=$3 bits us burst
    bits=$(rate_bits "$rate")
    us=$(delay_us "$delay")
    # At least one timer tick's worth (HZ may be 250) and two full frames.
    burst=$((bits / 8 / 200))
    ((burst >= 4096)) || burst=4096
    if ((us == 0)); then
        tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms
        mode="no delay"
        return
    fi
    if [ "$mode" != tun ]; then
        if tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 10000 2>/dev/null; then
            tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$rate" burst "$burst" latency 50ms
            mode=netem
            return
        fi
        [ "$mode" != netem ] || die "tc netem failed in $ns (no sch_netem in this kernel?)"
        mode=tun
    fi
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms
    start_delay_line "$ns" "$us"
}

# Whether this shell has CAP_NET_ADMIN (12) and CAP_SYS_ADMIN (21, for `ip netns add`).
have_caps() {
    local key value eff=0
    while read -r key value; do
        if [ "$key" = CapEff: ]; then eff=$((16#$value)); fi
    done </proc/self/status
    (((eff >> 12) & 1 && (eff >> 21) & 1))
}

# On a failure halfway through `up`: remove what it made.
up_failed() {
    local rc=$?
    trap - EXIT
    if ((rc != 0)); then
        echo "netns-link.sh: up failed; removing what it made" >&2
        down >/dev/null 2>&1 || true
    fi
    exit "$rc"
}

up() {
    local rate=${1:-40mbit} delay=${2:-5ms} err
    rate_bits "$rate" >/dev/null
    delay_us "$delay" >/dev/null
    mode=${NETNS_DELAY_MODE:-auto}
    case $mode in auto | netem | tun) ;; *) die "NETNS_DELAY_MODE must be auto, netem or tun" ;; esac
    if ! command -v ip >/dev/null; then
        echo "SKIPPED: no network namespaces"
        echo "netns-link.sh: no ip command (iproute2)" >&2
        exit 77
    fi
    if ! have_caps; then
        echo "SKIPPED: no network namespaces"
        echo "netns-link.sh: needs CAP_NET_ADMIN and CAP_SYS_ADMIN" >&2
        exit 77
    fi
    down
    if ! err=$(ip netns add "$src" 2>&1); then
        echo "SKIPPED: no network namespaces"
        echo "netns-link.sh: ip netns add $src: $err" >&2
        exit 77
    fi
    trap up_failed EXIT
    trap 'exit 130' INT TERM HUP
    ip netns add "$dst"
    ip link add "$dev" netns "$src" type veth peer name "$dev" netns "$dst"
    ip -n "$src" addr add "$src_addr/24" dev "$dev"
    ip -n "$dst" addr add "$dst_addr/24" dev "$dev"
    local ns
    for ns in "$src" "$dst"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$dev" up
        shape "$ns" "$rate" "$delay"
    done
    # Until the kernel's link watch says UP, the qdisc drops what is sent (a lost SYN
    # costs a second); wait for it rather than hand out a link that is not there yet.
    local i
    for ns in "$src" "$dst"; do
        for i in $(seq 100); do
            [[ $(ip -n "$ns" link show "$dev") == *"state UP"* ]] && break
            ((i < 100)) || die "$dev in $ns not UP after 5 s"
            sleep 0.05
        done
    done
    trap - EXIT INT TERM HUP
    echo "up: $src $src_addr <-> $dst $dst_addr, $rate and $delay each way ($mode)"
}

status() {
    local ns rc=0 pids filters f
    for ns in "$src" "$dst"; do
        if ! ns_exists "$ns"; then
            echo "$ns: absent"
            rc=1
            continue
        fi
        echo "$ns:"
        ip -n "$ns" -br addr show | sed 's/^/  /'
        tc -n "$ns" qdisc show | sed 's/^/  qdisc: /'
        filters=$(tc -n "$ns" filter show dev "$dev" ingress 2>/dev/null | grep mirred) || true
        if [ -n "$filters" ]; then
            while read -r f; do echo "  filter: $f"; done <<<"$filters"
        fi
        pids=$(delay_line_pids "$ns")
        if [ -n "$pids" ]; then
            echo "  delay line: pid ${pids//$'\n'/ }"
        elif [ -n "$filters" ]; then
            echo "  delay line: NOT RUNNING (IPv4 from the peer is lost)"
            rc=1
        fi
    done
    return "$rc"
}

case ${1:-} in
up)
    shift
    (($# <= 2)) || usage
    up "$@"
    ;;
down)
    (($# == 1)) || usage
    down
    ;;
status)
    (($# == 1)) || usage
    status
    ;;
*) usage ;;
esac
