#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The main job, live, on this machine: an inference engine (the project's
# test engine, cooperative mode) generates tokens on host A and is migrated
# to host B with `kvmotion migrate` while it generates. A and B are two
# network namespaces joined by a rate-limited veth pair (the test suite's
# hosts, tests/integration/netns.sh); B runs `kvmotion serve`. The weights
# cross before the stop, the stop carries the live state only, and the token
# stream goes on on B exactly as a run never stopped produces it.
#
#   scripts/demo.sh [--model-size SIZE] [--kv-mib MiB] [--rate RATE] [--keep]
#
#   --model-size SIZE   model file size, K/M/G suffixes (default 256M)
#   --kv-mib MiB        KV cache the engine holds while generating (default 64)
#   --rate RATE         link rate each way, tc syntax (default 10gbit)
#   --keep              keep the temporary directory
#
# As root. Runs scripts/setup.sh, configures build/ if needed (KM_BUILD_DIR
# overrides it) and builds it with ninja. (scripts/demo-split.sh shows the
# image engine alone: dump, split, join, restore.)
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

model_size=256M
kv_mib=64
rate=10gbit
keep=0

usage() { sed -n '12,21s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
	case $1 in
	--model-size | --kv-mib | --rate)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		case $1 in
		--model-size) model_size=$2 ;;
		--kv-mib) kv_mib=$2 ;;
		--rate) rate=$2 ;;
		esac
		shift 2
		;;
	--keep)
		keep=1
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "demo: unknown argument '$1'" >&2
		usage >&2
		exit 2
		;;
	esac
done
case $kv_mib in
'' | *[!0-9]*)
	echo "demo: --kv-mib takes a number of MiB" >&2
	exit 2
	;;
esac
[ "$(id -u)" = 0 ] || { echo "demo: run as root (CRIU, network namespaces)" >&2; exit 1; }

step_no=0
step() {
	step_no=$((step_no + 1))
	printf '\n== %d. %s\n' "$step_no" "$*"
}
say() { printf '   %s\n' "$*"; }
die() {
	printf '\ndemo: FAILED: %s\n' "$*" >&2
	exit 1
}
human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }
# jget FILE KEY[.KEY...]: a value of a JSON object
jget() {
	python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2"
}

# --- set-up and build ------------------------------------------------------

step "set-up (scripts/setup.sh) and build"
bash scripts/setup.sh
build=${KM_BUILD_DIR:-$top/build}
if [ ! -f "$build/build.ninja" ]; then
	meson setup "$build" >/dev/null
fi
ninja -C "$build" >/dev/null || die "the build failed (ninja -C $build)"
kvmotion=$build/plugin/kvmotion
mkmodel=$build/tests/helpers/mkmodel
engine=$build/tests/engine/engine
plugin_dir=$build/criu-hooks
criu=${KM_CRIU:-$top/.deps/bin/criu}
for f in "$kvmotion" "$mkmodel" "$engine" "$criu"; do
	[ -x "$f" ] || die "$f is missing (mkmodel and the engine are built with -Dtests)"
done
[ -f "$plugin_dir/kvmotion.so" ] || die "the CRIU plugin was not built (criu-plugin.h missing?)"
"$criu" check >/dev/null 2>&1 || die "'$criu check' fails: CRIU cannot run here"
say "built in $build; CRIU $("$criu" --version | sed -n 's/^Version: *//p')"

work=$(mktemp -d /tmp/kvmotion-demo.XXXXXX)
pids=()
# what netns.sh expects of the script that sources it
log() { say "$*"; }
fail() { die "$*"; }
skip() { die "$*"; }
KM_CLEANUP_HOOKS=()
KM_LINK_RATE=$rate
# shellcheck source-path=SCRIPTDIR source=../tests/integration/netns.sh
. "$top/tests/integration/netns.sh"
cleanup() {
	local rc=$? p h
	set +e
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
	for h in "${KM_CLEANUP_HOOKS[@]}"; do "$h"; done
	if [ "$keep" = 1 ]; then
		echo "demo: kept $work"
	else
		rm -rf "$work"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

model=$work/model.safetensors
storeA=$work/hostA/store
storeB=$work/hostB/store
# one path on both hosts: the engine maps its weights file by path, and CRIU
# restores that mapping by path (on one machine, both hosts share it)
wdir=$work/weights
export KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null KVMOTION_WEIGHTS_DIR=$wdir
# a short run: caught mid-generation, done in seconds
eargs=(--seqs 2 --total-seqs 8 --prompt-len 8 --max-new 32 --kv-mib $((kv_mib + 32))
	--kv-fill-mib "$kv_mib" --seed 3)

# --- the model, the reference, the hosts ------------------------------------

step "a model ($model_size of bf16 weights, safetensors) and a reference run never stopped"
"$mkmodel" "$model" --size "$model_size" --seed 1 >/dev/null || die "mkmodel failed"
"$engine" --model "$model" "${eargs[@]}" --out "$work/ref.out" --status-file "$work/ref.json" \
	--quiet || die "the reference run failed"
say "$(human "$(stat -c %s "$model")") model; the reference run generated" \
	"$(jget "$work/ref.json" tokens_generated) tokens ($(wc -l <"$work/ref.out") lines in $work/ref.out)"

step "two hosts: network namespaces A and B, a veth pair limited to $rate each way"
km_netns_setup
say "A is $KM_ADDR_A, B is $KM_ADDR_B"

step "host B: kvmotion serve (its own chunk store and image area, TLS 1.3 with a pre-shared key)"
# 32 random bytes in hex (coreutils only: a fresh machine may lack the openssl command)
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$work/psk"
chmod 600 "$work/psk"
KVMOTION_STORE=$storeB nsenter --net="/run/netns/$KM_NS_B" -- "$kvmotion" serve \
	--listen "$KM_ADDR_B:7447" --store "$storeB" --images "$work/hostB/images" \
	--weights-dir "$wdir" --psk-file "$work/psk" --no-sync \
	--restore-cmd "$criu" --restore-libdir "$plugin_dir" >/dev/null 2>"$work/serve.log" &
pids+=($!)
disown $! # no "Killed" line at the end
for _ in $(seq 200); do
	grep -q "listening on" "$work/serve.log" && break
	sleep 0.02
done
grep -q "listening on" "$work/serve.log" || { cat "$work/serve.log" >&2; die "kvmotion serve did not start"; }
say "$(grep -m1 "listening on" "$work/serve.log" | sed 's/^[^ ]* //')"

# --- the engine on A ----------------------------------------------------------

"$kvmotion" store init --store "$storeA" --no-sync >/dev/null || die "kvmotion store init failed"

step "host A: the engine generates (cooperative mode: weights mapped from the store's weights file)"
# the init of its own pid namespace: B restores it while A's copy still exists
KVMOTION_STORE=$storeA nsenter --net="/run/netns/$KM_NS_A" -- unshare --pid --fork setsid \
	"$engine" --model "$model" "${eargs[@]}" --step-delay-ms 20 --coop \
	--out "$work/live.out" --status-file "$work/live.json" </dev/null >"$work/engine.log" 2>&1 &
u=$!
disown "$u"
pid=
for _ in $(seq 1000); do
	pid=$(cut -d" " -f1 "/proc/$u/task/$u/children" 2>/dev/null || true)
	[ -n "$pid" ] && [ -s "$work/live.json" ] &&
		[ "$(jget "$work/live.json" tokens_generated)" -ge 20 ] && break
	sleep 0.02
done
if [ -z "$pid" ] || [ ! -s "$work/live.json" ]; then
	cat "$work/engine.log" >&2
	die "the engine did not start"
fi
pids+=("$pid")
say "engine pid $pid on A, $(jget "$work/live.json" mode) mode, $(jget "$work/live.json" tokens_generated) tokens so far"

# --- the migration ---------------------------------------------------------------

step "kvmotion migrate --pid $pid --to $KM_ADDR_B:7447 (while it generates)"
nsenter --net="/run/netns/$KM_NS_A" -- "$kvmotion" migrate --pid "$pid" --to "$KM_ADDR_B:7447" \
	--psk-file "$work/psk" --store "$storeA" --work "$work/migrate" --criu "$criu" \
	--plugin-dir "$plugin_dir" --json >"$work/report.json" 2>"$work/migrate.err" || {
	cat "$work/migrate.err" "$work/report.json" >&2
	tail -n 5 "$work/serve.log" >&2
	die "kvmotion migrate failed"
}
r=$work/report.json
rpid=$(jget "$r" restored_pid)
pids+=("$rpid")
at=$(wc -l <"$work/live.out")
say "migrated: pid $pid on A -> pid $rpid on B ($(jget "$r" mode) mode, image $(jget "$r" image))"
say "before the stop, while it served: $(human "$(jget "$r" bytes_sent_before_stop)") of weights chunks" \
	"sent (index $(jget "$r" weights | tr -d "[]'")); host B already had $(human "$(jget "$r" bytes_deduplicated)")"
say "during the stop:                  $(human "$(jget "$r" bytes_sent_during_stop)") (CRIU's image: KV," \
	"CPU state; no weights), $(human "$(jget "$r" wire_bytes_during_stop)") on the wire"
python3 - "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["stop_seconds"]
names = [("quiesce", "quiesce the engine"), ("freeze", "freeze"), ("gpu_checkpoint", "GPU checkpoint"),
         ("dump", "criu dump"), ("split", "split"), ("transfer", "transfer to B"), ("join", "join"),
         ("restore", "criu restore on B"), ("gpu_restore", "GPU restore"), ("resume", "engine resume")]
print(f"   the stop: {s['total'] * 1e3:.0f} ms, dump start to the engine running on B")
for k, label in names:
    print(f"      {label:20} {s[k] * 1e3:8.1f} ms")
PY
[ "$(stat -L -c %i "/proc/$rpid/ns/net")" = "$(stat -L -c %i "/run/netns/$KM_NS_B")" ] ||
	die "the restored engine is not in host B's network namespace"
kill -0 "$pid" 2>/dev/null && die "the source engine (pid $pid) still runs on A"

step "the engine goes on on B: same tokens as the run never stopped"
for _ in $(seq 3000); do
	kill -0 "$rpid" 2>/dev/null || break
	sleep 0.02
done
kill -0 "$rpid" 2>/dev/null && die "the engine on B did not finish"
say "$at token lines when migrate returned, $(wc -l <"$work/live.out") at the end (one file, written on A then on B)"
cmp -s "$work/ref.out" "$work/live.out" ||
	die "the token stream differs from the reference ($(cmp "$work/ref.out" "$work/live.out" 2>&1))"
[ "$(jget "$work/live.json" prefill_steps)" = "$(jget "$work/ref.json" prefill_steps)" ] ||
	die "the migrated engine recomputed prompts (prefill steps differ)"
say "token stream identical to the reference ($(jget "$work/live.json" tokens_generated) tokens)," \
	"no prompt recomputed, restores seen by the engine: $(jget "$work/live.json" restores)"
say "done: report in $r$([ "$keep" = 1 ] || echo ' (use --keep to keep it)')"
