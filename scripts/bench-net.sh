#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Migration transport benchmark: `kvmotion send-weights` of a seeded model
# between the two test hosts of tests/integration/netns.sh (network
# namespaces joined by a tc-limited veth link), to an empty target store,
# with zstd on the wire never / always / auto, then once more (all
# deduplicated). Both stores live in --dir (default /dev/shm: tmpfs, so that
# the disk does not set the pace). Needs root.
#
#   scripts/bench-net.sh [--model-mib 512] [--rate 10gbit] [--runs 3] [--dir D]
set -euo pipefail

model_mib=512
rate=10gbit
runs=3
base=/dev/shm
while [ $# -gt 0 ]; do
	case $1 in
	--model-mib) model_mib=$2; shift 2 ;;
	--rate) rate=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--dir) base=$2; shift 2 ;;
	*) echo "usage: $0 [--model-mib N] [--rate RATE] [--runs N] [--dir D]" >&2; exit 2 ;;
	esac
done

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_setup
export KM_KVMOTION="$km" KM_MKMODEL="$build/tests/helpers/mkmodel" KM_MEMPROC="$build/tests/helpers/memproc"
export KM_LINK_RATE=$rate KM_TEST_NAME=bench-net KM_NEED_CRIU=0
# shellcheck source-path=SCRIPTDIR source=../tests/integration/lib.sh
. "$top/tests/integration/lib.sh"
# shellcheck source-path=SCRIPTDIR source=../tests/integration/netns.sh
. "$top/tests/integration/netns.sh"
km_init
work=$(mktemp -d "$base/km-bench-net.XXXXXX")
server=
bench_cleanup() {
	if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
	rm -rf "$work"
}
KM_CLEANUP_HOOKS+=(bench_cleanup)
km_netns_setup

openssl rand -hex 32 >"$work/psk"
"$MKMODEL" "$work/model.safetensors" --size "${model_mib}M" --seed 1 >/dev/null
"$km" seed "$work/model.safetensors" --store "$work/A" --name model --no-sync --json >"$work/seed.json"
model_bytes=$(json_get "$work/seed.json" bytes)

start() {
	rm -rf "$work/B" "$work/images"
	nsenter --net="/run/netns/$KM_NS_B" -- "$km" serve --listen "$KM_ADDR_B:7447" --store "$work/B" \
		--images "$work/images" --psk-file "$work/psk" --no-sync >/dev/null 2>"$work/serve.log" &
	server=$!
	for _ in $(seq 1 200); do
		grep -q "listening on" "$work/serve.log" && return 0
		sleep 0.02
	done
	cat "$work/serve.log"
	exit 1
}

stop() {
	kill "$server"
	wait "$server" || true
	server=
}

send() { # send MODE OUT
	km_in_a "$km" send-weights model --store "$work/A" --to "$KM_ADDR_B:7447" \
		--psk-file "$work/psk" --compress "$1" --no-materialize --json >"$2" 2>/dev/null
}

printf '\nsend-weights of a %s MiB model (%s bytes) over a %s veth link, %s run(s) each, %s CPUs\n' \
	"$model_mib" "$model_bytes" "$rate" "$runs" "$(nproc)"
printf '%-8s %12s %12s %10s %10s %11s %12s\n' compress "bytes sent" "wire bytes" compressed \
	"chunks s" "MiB/s raw" "Gbit/s wire"
for mode in never always auto; do
	secs=()
	for r in $(seq 1 "$runs"); do
		start
		send "$mode" "$work/$mode-$r.json"
		stop
		secs+=("$(json_get "$work/$mode-$r.json" seconds.chunks)")
	done
	med=$(median "${secs[@]}")
	f=$work/$mode-1.json
	python3 - "$f" "$med" "$mode" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1])); s = float(sys.argv[2])
print(f"{sys.argv[3]:<8} {v['bytes_sent']:>12} {v['wire_bytes']:>12} {v['chunks_compressed']:>4}/{v['chunks_sent']:<5}"
      f" {s:>10.3f} {v['bytes_sent'] / s / 2**20:>11.1f} {v['wire_bytes'] * 8 / s / 1e9:>12.2f}")
EOF
done
start
send never "$work/first.json"
send never "$work/again.json"
stop
printf 'again (all deduplicated): %s bytes sent, %s on the wire, %s s in all\n' \
	"$(json_get "$work/again.json" bytes_sent)" "$(json_get "$work/again.json" wire_bytes)" \
	"$(json_get "$work/again.json" seconds.total)"
