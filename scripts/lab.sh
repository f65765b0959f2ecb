#!/usr/bin/env bash
# The network-namespace lab for the kernel-bypass (XDP + AF_XDP) data path.
#
#   scripts/lab.sh up [options]        (re)create the lab, removing leftovers of a crash first
#   scripts/lab.sh down [--prefix P]   remove everything (idempotent)
#   scripts/lab.sh status [--prefix P] show it; exit 0 up, 3 down, 1 partly there
#   scripts/lab.sh exec client|brokerN COMMAND...  run COMMAND in that namespace
#                                      (broker is broker0)
#
# Options of `up`:
#   --mtu N          MTU of both veth ends (default 3500: driver-mode XDP on veth needs one
#                    frame per 4 KiB page, i.e. at most ~3.5 KB)
#   --brokers N      brokers (default 4): one namespace and one veth pair each (an AF_XDP
#                    socket owns its interface's rx queue, so brokers cannot share one);
#                    broker i is 10.77.i.2, port BASE+i; they share one hugetlbfs pool, a
#                    file on the host's /dev/hugepages, visible from every namespace
#   --base-port P    first broker port (default 9100, as scripts/cluster.sh)
#   --gso on|off     GSO/TSO/GRO of the client end (default on); generic-mode XDP on the
#                    broker end needs off, else 64 KB frames are dropped
#   --queues N       rx and tx queues of each veth end (default 1); the client's flows are
#                    spread over them, and a broker takes every queue of its end
#   --prefix P       name prefix (default emb); tests use their own so they never touch a
#                    running lab
#
# Topology (see docs/xdp.md), for i in 0..N-1:
#   namespace P-client                  namespace P-broker<i>
#   P-c<i> 10.77.<i>.1/24 <== veth ==>  P-b<i> 10.77.<i>.2/24   (--queues rx and tx queues each)
#   lo up everywhere; IPv6 off (the lab is IPv4 only, and quiet).
# `up` writes the lab's settings to /run/embarcadero-lab/P.env (source it for BROKERS=...).
#
# Sourced (`. scripts/lab.sh`), this file only defines functions, among them
# ensure_xdp_build_deps, which installs the Debian packages that building xdp-prog and
# running this lab need (only the missing ones).

# Debian packages that building xdp-prog (clang for the BPF program; a C toolchain, make,
# pkg-config, libelf and zlib headers for libbpf-sys's vendored libbpf; kernel UAPI headers)
# and running this lab and its tests (ip, ethtool, ping, curl, python3, pgrep) need.
XDP_BUILD_PACKAGES=(build-essential pkg-config clang libelf-dev zlib1g-dev linux-libc-dev iproute2 ethtool nftables jq iputils-ping curl python3 procps)

# Installs whatever of XDP_BUILD_PACKAGES is missing (dpkg -s, then apt-get install -y).
# Idempotent: does nothing, and needs no root, when everything is there.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_xdp_build_deps() {
    ensure_packages "${XDP_BUILD_PACKAGES[@]}"
}

lab_usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
lab_die() { echo "lab: $*" >&2; exit 2; }

# Prints a command, then runs it.
lab_run() {
    echo "+ $*"
    "$@"
}

lab_names() {
    client_ns=$prefix-client
    state=/run/embarcadero-lab/$prefix.env
}

lab_ns_exists() { ip netns list | awk -v name="$1" '$1 == name {found = 1} END {exit !found}'; }

# Broker namespaces of this prefix that exist now (whatever N they were created with).
lab_broker_namespaces() { ip netns list | awk -v re="^$prefix-broker[0-9]+\$" '$1 ~ re {print $1}' | sort -V; }

# Removes the lab's namespaces, links left in the root namespace, XDP programs on the
# broker ends, and the state file. Quiet about what is not there.
lab_remove() {
    local ns i details link
    for ns in $(lab_broker_namespaces); do
        i=${ns#"$prefix-broker"}
        if details=$(ip -n "$ns" -d link show "$prefix-b$i" 2>/dev/null) && grep -q 'prog/xdp' <<<"$details"; then
            lab_run ip -n "$ns" link set dev "$prefix-b$i" xdpgeneric off
            lab_run ip -n "$ns" link set dev "$prefix-b$i" xdpdrv off
        fi
        lab_run ip netns del "$ns"
    done
    if lab_ns_exists "$client_ns"; then lab_run ip netns del "$client_ns"; fi
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$prefix-[bc][0-9]+\$"); do
        lab_run ip link del "$link"
    done
    if [[ -f $state ]]; then lab_run rm -f "$state"; fi
    rm -f "/run/embarcadero-lab/$prefix-xdp-pass"-*.o
}

# The client ends' XDP program: veth delivers the frames an XDP program sends back
# (XDP_TX: the brokers' SYN-cookie SYN-ACKs) only to a peer that has an XDP program of its
# own in driver mode. It passes everything but IPv4 addressed to another host than client
# end $1 (10.77.$1.1): the SYN-ACKs answering a flood of spoofed SYNs, which on a real
# network go to the forged addresses, not back to the host that sent them (here they would
# cost the client's core a trip through its IP stack each). Built with clang (in
# XDP_BUILD_PACKAGES); prints the object's path.
lab_pass_program() {
    local object=/run/embarcadero-lab/$prefix-xdp-pass-$1.o
    mkdir -p "$(dirname "$object")"
    # The address in network byte order, as a little-endian load of the header sees it.
    local address=$((($1 << 16) | (77 << 8) | 10 | (1 << 24)))
    clang -target bpf -O2 -c -x c - -o "$object" -DCLIENT_ADDRESS="$address" <<'EOF_C' || lab_die "cannot build the client ends' XDP program (needs clang: . scripts/lab.sh && ensure_xdp_build_deps)"
struct xdp_md { unsigned int data, data_end; };
__attribute__((section("xdp"), used)) int xdp_client(struct xdp_md *ctx)
{
	unsigned char *frame = (unsigned char *)(long)ctx->data;
	unsigned char *end = (unsigned char *)(long)ctx->data_end;
	unsigned int destination;
	if (frame + 34 > end || frame[12] != 0x08 || frame[13] != 0x00)
		return 2; /* XDP_PASS: not IPv4 */
	__builtin_memcpy(&destination, frame + 30, 4);
	return destination == CLIENT_ADDRESS ? 2 : 1; /* XDP_PASS : XDP_DROP */
}
char _license[] __attribute__((section("license"), used)) = "GPL";
EOF_C
    echo "$object"
}

lab_quiet_ns() {
    lab_run ip netns add "$1"
    lab_run ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    lab_run ip -n "$1" link set lo up
}

lab_up() {
    [[ $(id -u) -eq 0 ]] || lab_die "needs root (creates network namespaces)"
    command -v ip >/dev/null || lab_die "ip not found: apt-get install -y iproute2"
    if [[ $gso == off ]]; then
        command -v ethtool >/dev/null || lab_die "--gso off needs ethtool: apt-get install -y ethtool"
    fi
    echo "== lab $prefix: removing leftovers"
    lab_remove
    echo "== lab $prefix: creating (MTU $mtu, GSO $gso, $brokers brokers, $queues queue(s) per veth end)"
    local pass
    lab_quiet_ns "$client_ns"
    local i ns list=()
    for ((i = 0; i < brokers; i++)); do
        ns=$prefix-broker$i
        lab_quiet_ns "$ns"
        lab_run ip -n "$ns" link add "$prefix-b$i" numrxqueues "$queues" numtxqueues "$queues" mtu "$mtu" type veth \
            peer name "$prefix-c$i" numrxqueues "$queues" numtxqueues "$queues" mtu "$mtu" netns "$client_ns"
        lab_run ip -n "$client_ns" addr add "10.77.$i.1/24" dev "$prefix-c$i"
        lab_run ip -n "$ns" addr add "10.77.$i.2/24" dev "$prefix-b$i"
        if [[ $gso == off ]]; then
            lab_run ip netns exec "$client_ns" ethtool -K "$prefix-c$i" gso off tso off gro off
        fi
        lab_run ip -n "$client_ns" link set "$prefix-c$i" up
        lab_run ip -n "$ns" link set "$prefix-b$i" up
        pass=$(lab_pass_program "$i")
        if ! lab_run ip -n "$client_ns" link set dev "$prefix-c$i" xdpdrv obj "$pass" sec xdp; then
            echo "note: no driver-mode XDP pass program on $prefix-c$i (MTU $mtu?): brokers in driver mode cannot answer SYNs there; use --xdp-mode generic" >&2
        fi
        list+=("10.77.$i.2:$((base_port + i))")
    done
    mkdir -p "$(dirname "$state")"
    cat >"$state" <<EOF
LAB_PREFIX=$prefix
LAB_CLIENT_NS=$client_ns
LAB_BROKER_NS_PREFIX=$prefix-broker
LAB_CLIENT_IF_PREFIX=$prefix-c
LAB_BROKER_IF_PREFIX=$prefix-b
LAB_MTU=$mtu
LAB_GSO=$gso
LAB_BROKERS=$brokers
LAB_BASE_PORT=$base_port
BROKERS=$(IFS=,; echo "${list[*]}")
EOF
    echo "== lab $prefix is up; settings in $state"
    lab_status
}

# Prints one end of a veth; returns 1 when it is missing or has no address.
lab_show_end() {
    local ns_name=$1 link=$2 details address xdp gso_state
    if ! details=$(ip -n "$ns_name" -d link show "$link" 2>/dev/null); then
        echo "$ns_name: $link missing"
        return 1
    fi
    address=$(ip -n "$ns_name" -br -4 addr show "$link" | awk '{print $3}')
    xdp=none
    if grep -q 'prog/xdp' <<<"$details"; then
        xdp="$(grep -o 'xdp[a-z]*' <<<"$details" | head -1) $(grep -o 'prog/xdp id [0-9]*' <<<"$details")"
    fi
    gso_state=""
    if command -v ethtool >/dev/null; then
        gso_state=$(ip netns exec "$ns_name" ethtool -k "$link" 2>/dev/null |
            awk -F': ' '/^(generic-segmentation-offload|tcp-segmentation-offload):/ {printf ", %s %s", ($1 ~ /generic/ ? "gso" : "tso"), $2}')
    fi
    printf '%s: %s %s, mtu %s, %s%s, rx queues %s, xdp: %s\n' "$ns_name" "$link" "${address:-no-address}" \
        "$(grep -o 'mtu [0-9]*' <<<"$details" | head -1 | cut -d' ' -f2)" \
        "$(grep -q 'state UP' <<<"$details" && echo up || echo down)" "$gso_state" \
        "$(grep -o 'numrxqueues [0-9]*' <<<"$details" | cut -d' ' -f2)" "$xdp"
    [[ -n $address ]]
}

# Prints the state of the lab; returns 0 up, 3 down, 1 partly there.
lab_status() {
    local namespaces ns i complete=1 expected=0
    namespaces=$(lab_broker_namespaces)
    if ! lab_ns_exists "$client_ns" && [[ -z $namespaces ]]; then
        echo "lab $prefix: down"
        return 3
    fi
    lab_ns_exists "$client_ns" || { echo "namespace $client_ns: missing"; complete=0; }
    if [[ -f $state ]]; then
        expected=$(grep '^LAB_BROKERS=' "$state" | cut -d= -f2)
    else
        complete=0
    fi
    for ((i = 0; i < expected; i++)); do
        lab_ns_exists "$prefix-broker$i" || { echo "namespace $prefix-broker$i: missing"; complete=0; }
    done
    for ns in $namespaces; do
        i=${ns#"$prefix-broker"}
        lab_show_end "$ns" "$prefix-b$i" || complete=0
        if lab_ns_exists "$client_ns"; then lab_show_end "$client_ns" "$prefix-c$i" || complete=0; fi
    done
    if [[ -f $state ]]; then
        echo "brokers: $(grep '^BROKERS=' "$state" | cut -d= -f2)"
    fi
    if [[ $complete -eq 1 ]]; then
        echo "lab $prefix: up"
        return 0
    fi
    echo "lab $prefix: partly there (run: scripts/lab.sh up, or scripts/lab.sh down)"
    return 1
}

lab_main() {
    set -euo pipefail
    local action=${1:-}
    [[ -n $action ]] || { lab_usage; exit 2; }
    [[ $action == -h || $action == --help ]] && { lab_usage; exit 0; }
    shift
    prefix=emb mtu=3500 brokers=4 base_port=9100 gso=on queues=1
    if [[ $action == exec ]]; then
        local side=${1:-}
        [[ $side == broker ]] && side=broker0
        [[ $side == client || $side =~ ^broker[0-9]+$ ]] || lab_die "exec needs client or brokerN (broker is broker0), then a command"
        shift
        [[ ${1:-} == --prefix ]] && { prefix=$2; shift 2; }
        [[ $# -gt 0 ]] || lab_die "exec $side needs a command"
        lab_names
        local ns=$client_ns
        [[ $side != client ]] && ns=$prefix-$side
        lab_ns_exists "$ns" || lab_die "namespace $ns does not exist: run scripts/lab.sh up first"
        exec ip netns exec "$ns" "$@"
    fi
    while [[ $# -gt 0 ]]; do
        case $1 in
            --mtu) mtu=${2:-}; shift 2 ;;
            --brokers) brokers=${2:-}; shift 2 ;;
            --base-port) base_port=${2:-}; shift 2 ;;
            --gso) gso=${2:-}; shift 2 ;;
            --queues) queues=${2:-}; shift 2 ;;
            --prefix) prefix=${2:-}; shift 2 ;;
            -h|--help) lab_usage; exit 0 ;;
            *) lab_die "unknown option $1 (see --help)" ;;
        esac
    done
    [[ $mtu =~ ^[0-9]+$ && $mtu -ge 68 && $mtu -le 65535 ]] || lab_die "--mtu needs a number from 68 to 65535, got '$mtu'"
    [[ $brokers =~ ^[0-9]+$ && $brokers -ge 1 ]] || lab_die "--brokers needs a positive number, got '$brokers'"
    [[ $queues =~ ^[0-9]+$ && $queues -ge 1 && $queues -le 64 ]] || lab_die "--queues needs a number from 1 to 64, got '$queues'"
    [[ $brokers -le 250 ]] || lab_die "--brokers is at most 250 (10.77.i.0/24 per broker), got '$brokers'"
    [[ $base_port =~ ^[0-9]+$ && $base_port -ge 1 && $((base_port + brokers - 1)) -le 65535 ]] ||
        lab_die "--base-port needs a port such that base-port + brokers - 1 <= 65535, got '$base_port'"
    [[ $gso == on || $gso == off ]] || lab_die "--gso needs on or off, got '$gso'"
    [[ $prefix =~ ^[a-z][a-z0-9]{0,11}$ ]] || lab_die "--prefix needs 1 to 12 lower-case letters or digits, starting with a letter (interface names are at most 15 characters), got '$prefix'"
    if [[ $mtu -gt 3500 ]]; then
        echo "note: driver-mode XDP on veth refuses an MTU above ~3.5 KB; the broker will fall back to generic mode (which needs --gso off)"
    fi
    lab_names
    case $action in
        up) lab_up ;;
        down)
            [[ $(id -u) -eq 0 ]] || lab_die "needs root (removes network namespaces)"
            echo "== lab $prefix: removing"
            lab_remove
            echo "lab $prefix: down"
            ;;
        status) lab_status ;;
        *) lab_die "unknown action $action (up, down, status, exec; see --help)" ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    lab_main "$@"
fi
