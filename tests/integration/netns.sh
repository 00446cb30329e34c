# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Test hosts for the network tests (sourced after lib.sh, never run): two
# network namespaces, "host A" and "host B", joined by a veth pair whose two
# ends are rate-limited with tc (tbf), each with lo up.
#
#   km_netns_setup        creates them; the test's exit tears them down
#   km_in_a CMD...        runs CMD on host A (km_in_b: on host B)
#   km_link_rate RATE     changes the rate of both directions (tc syntax: 200mbit)
#
#   KM_LINK_RATE (10gbit) the rate of each direction
#   KM_NS_A, KM_NS_B      the namespaces' names, unique per test run
#   KM_ADDR_A, KM_ADDR_B  their addresses on the link
#
# Commands enter the network namespace only (nsenter --net), not a new mount
# namespace as `ip netns exec` does: CRIU refuses to dump a process of
# another mount namespace than its own, and a restored process should land
# in the receiver's network namespace and nowhere else. The test skips only
# when network namespaces cannot be made at all.

KM_LINK_RATE=${KM_LINK_RATE:-10gbit}
KM_NS_A=km-a-$$
KM_NS_B=km-b-$$
KM_VETH_A=kmva$$
KM_VETH_B=kmvb$$
KM_ADDR_A=10.77.0.1
KM_ADDR_B=10.77.0.2
KM_NETNS_MADE=()

km_in_a() { nsenter --net="/run/netns/$KM_NS_A" -- "$@"; }
km_in_b() { nsenter --net="/run/netns/$KM_NS_B" -- "$@"; }

km_netns_teardown() {
	local ns
	for ns in "${KM_NETNS_MADE[@]}"; do
		ip netns del "$ns" 2>/dev/null || true
	done
	KM_NETNS_MADE=()
}

# tbf's burst must hold at least rate/HZ bytes: give it 10 ms of the rate.
km_rate_burst() {
	local rate=$1 num unit bits
	num=${rate%%[a-zA-Z]*}
	unit=${rate#"$num"}
	case $unit in
	gbit) bits=$((num * 1000000000)) ;;
	mbit) bits=$((num * 1000000)) ;;
	kbit) bits=$((num * 1000)) ;;
	bit | '') bits=$num ;;
	*) fail "KM_LINK_RATE=$rate: expected a number with gbit, mbit or kbit" ;;
	esac
	echo $((bits / 8 / 100 > 65536 ? bits / 8 / 100 : 65536))
}

km_link_rate() {
	local rate=$1 burst
	burst=$(km_rate_burst "$rate")
	tc -n "$KM_NS_A" qdisc replace dev "$KM_VETH_A" root tbf rate "$rate" burst "$burst" latency 20ms ||
		fail "tc cannot limit $KM_VETH_A to $rate"
	tc -n "$KM_NS_B" qdisc replace dev "$KM_VETH_B" root tbf rate "$rate" burst "$burst" latency 20ms ||
		fail "tc cannot limit $KM_VETH_B to $rate"
	log "link $KM_NS_A <-> $KM_NS_B: $rate each way (tbf, burst $burst bytes)"
}

km_netns_setup() {
	local out
	command -v ip >/dev/null 2>&1 || skip "no 'ip' command (iproute2)"
	command -v nsenter >/dev/null 2>&1 || skip "no 'nsenter' (util-linux)"
	if ! out=$(ip netns add "$KM_NS_A" 2>&1); then
		skip "cannot create a network namespace (ip netns add: $out)"
	fi
	KM_NETNS_MADE+=("$KM_NS_A")
	KM_CLEANUP_HOOKS+=(km_netns_teardown)
	ip netns add "$KM_NS_B" || fail "ip netns add $KM_NS_B failed after $KM_NS_A worked"
	KM_NETNS_MADE+=("$KM_NS_B")
	command -v tc >/dev/null 2>&1 || fail "no 'tc' command (iproute2): the link cannot be rate-limited"
	ip link add "$KM_VETH_A" type veth peer name "$KM_VETH_B" || fail "cannot create a veth pair"
	ip link set "$KM_VETH_A" netns "$KM_NS_A" || fail "cannot move $KM_VETH_A into $KM_NS_A"
	ip link set "$KM_VETH_B" netns "$KM_NS_B" || fail "cannot move $KM_VETH_B into $KM_NS_B"
	ip -n "$KM_NS_A" addr add "$KM_ADDR_A/24" dev "$KM_VETH_A" || fail "cannot address $KM_VETH_A"
	ip -n "$KM_NS_B" addr add "$KM_ADDR_B/24" dev "$KM_VETH_B" || fail "cannot address $KM_VETH_B"
	ip -n "$KM_NS_A" link set lo up || fail "cannot bring lo up in $KM_NS_A"
	ip -n "$KM_NS_B" link set lo up || fail "cannot bring lo up in $KM_NS_B"
	ip -n "$KM_NS_A" link set "$KM_VETH_A" up || fail "cannot bring $KM_VETH_A up"
	ip -n "$KM_NS_B" link set "$KM_VETH_B" up || fail "cannot bring $KM_VETH_B up"
	km_link_rate "$KM_LINK_RATE"
	for _ in $(seq 1 100); do
		if ip -n "$KM_NS_A" -br link show dev "$KM_VETH_A" | grep -q ' UP ' &&
			ip -n "$KM_NS_B" -br link show dev "$KM_VETH_B" | grep -q ' UP '; then
			return 0
		fi
		sleep 0.02
	done
	fail "the veth link $KM_VETH_A <-> $KM_VETH_B did not come up"
}
