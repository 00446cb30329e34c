#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Cooperative-mode benchmark (issue 4), one run: for each weights size, the
# test engine (tests/engine) with --kv-mib of live KV cache, dumped and
# restored three ways, side by side:
#   plain        `criu dump` + `criu restore`, no plugin (weights in the image)
#   transparent  the same with kvmotion's plugin, store seeded with the model
#                (weights referenced in the store, but CRIU still dumps and
#                restores them)
#   coop         the engine maps its weights from the store's weights file
#                and quiesces (engine --coop): the weights never enter the
#                image; after the restore the engine uploads them again from
#                the mapping (its "upload", reported separately)
# dump and restore are the times of the criu commands (restore -d returns once
# the tasks run; with a cooperative engine, once the plugin saw it resume,
# which includes its re-upload of the weights from the mapping, also
# reported on its own).
#
#   scripts/bench-coop.sh [--sizes "512 1024 2048 4096"] [--kv-mib N] [--rounds N]
#                         [--no-huge] [--dir D] [--json FILE]
#
# The weights files live on a tmpfs mounted with huge=always (--no-huge: in
# the store's directory, 4 KiB pages).
#
# Each mode dumps and restores the same engine --rounds times (default 3):
# medians.
#
# Images, store and weights files on tmpfs (--dir, default /dev/shm): about
# 3x the largest size must fit in memory.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
sizes="512 1024 2048 4096"
kv_mib=256
rounds=3
huge=1
base=/dev/shm
json_out=
while [ $# -gt 0 ]; do
	case $1 in
	--sizes) sizes=$2; shift 2 ;;
	--kv-mib) kv_mib=$2; shift 2 ;;
	--rounds) rounds=$2; shift 2 ;;
	--no-huge) huge=0; shift ;;
	--dir) base=$2; shift 2 ;;
	--json) json_out=$2; shift 2 ;;
	*) echo "usage: $0 [--sizes \"MiB ...\"] [--kv-mib N] [--rounds N] [--no-huge] [--dir D] [--json FILE]" >&2; exit 2 ;;
	esac
done

bench_setup
plugin_dir="$build/criu-hooks"
[ -f "$plugin_dir/kvmotion.so" ] || { echo "the CRIU plugin was not built" >&2; exit 1; }
empty_dir=$(mktemp -d)
work=$(mktemp -d "$base/km-bench-coop.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
	if mountpoint -q "$work/weights"; then umount "$work/weights"; fi
	rm -rf "$work" "$empty_dir"
}
trap cleanup EXIT

status() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$work/status.json" "$1" 2>/dev/null || true; }
wait_gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }
wait_steps() { # the step counter moves past $1
	local before=$1
	for _ in $(seq 6000); do
		[ -n "$(status steps)" ] && [ "$(status steps)" != "$before" ] && return 0
		sleep 0.02
	done
	echo "the engine makes no progress; its log:" >&2
	cat "$work/engine.log" >&2
	exit 1
}
start_engine() { # model, extra args
	local model=$1
	shift
	rm -f "$work/status.json"
	setsid "$build/tests/engine/engine" --model "$model" --out "$work/tokens" \
		--seqs 2 --total-seqs 0 --prompt-len 4 --max-new 64 --kv-mib $((kv_mib + 64)) \
		--kv-fill-mib "$kv_mib" --status-file "$work/status.json" "$@" \
		</dev/null >"$work/engine.log" 2>&1 &
	pid=$!
	disown "$pid"
	wait_steps ""
}
# once MODE LIBDIR: dump, restore, image bytes; the restored engine runs on
once() {
	local mode=$1 libdir=$2 img="$work/img-$1" t0 t1 t2 steps upload=0
	mkdir -p "$img"
	t0=$(now)
	"$criu" dump -t "$pid" -D "$img" -o dump.log -v2 -L "$libdir" ||
		{ tail -n 20 "$img/dump.log" >&2; exit 1; }
	t1=$(now)
	wait_gone "$pid"
	bytes=$(dir_bytes "$img")
	steps=$(status steps)
	t2=$(now)
	"$criu" restore -D "$img" -d -o restore.log -v2 -L "$libdir" ||
		{ tail -n 20 "$img/restore.log" >&2; exit 1; }
	t3=$(now)
	wait_steps "$steps"
	[ "$mode" = coop ] && upload=$(python3 -c 'import sys; print(float(sys.argv[1]) / 1e3)' "$(status upload_ms)")
	rm -rf "$img"
	echo "$(elapsed "$t0" "$t1") $(elapsed "$t2" "$t3") $bytes $upload"
}
# measure MODE LIBDIR: --rounds dumps and restores of the same engine, medians
measure() {
	local d=() r=() b u
	for _ in $(seq "$rounds"); do
		read -r dd rr b u < <(once "$1" "$2")
		d+=("$dd") r+=("$rr")
	done
	kill "$pid"
	wait_gone "$pid"
	echo "$(median "${d[@]}") $(median "${r[@]}") $b $u"
}

export KVMOTION_STORE="$work/store" KVMOTION_SYNC=0 KVMOTION_CONFIG=/dev/null
# The weights files on a tmpfs of huge pages (docs/engine-api.md): the kernel
# maps and unmaps 4 GiB in 2048 entries instead of a million, which is what a
# cooperative dump still pays per byte of weights (the smaps walk, the exit).
if [ "$huge" = 1 ]; then
	mkdir -p "$work/weights"
	mount -t tmpfs -o huge=always,mode=755 tmpfs "$work/weights"
	export KVMOTION_WEIGHTS_DIR="$work/weights"
fi
results=()
for mib in $sizes; do
	rm -rf "$work/store"
	"$km" store init "$work/store" --no-sync >/dev/null
	model="$work/weights-$mib.safetensors"
	"$build/tests/helpers/mkmodel" "$model" --size $((mib * 1024 * 1024)) --seed 11
	start_engine "$model"
	plain=$(measure plain "$empty_dir")
	# memory: the model file goes once the engine holds its copy and the
	# store its chunks (peak ~3x the weights, not 4x)
	start_engine "$model"
	"$km" seed "$model" --store "$work/store" --name "w$mib" --no-sync >/dev/null
	rm -f "$model"
	transparent=$(measure transparent "$plugin_dir")
	"$km" weights materialize "w$mib" --store "$work/store" --no-sync ${KVMOTION_WEIGHTS_DIR:+--weights-dir "$KVMOTION_WEIGHTS_DIR"} >/dev/null
	start_engine "index:w$mib" --coop
	coop=$(measure coop "$plugin_dir")
	echo "$mib MiB: plain $plain | transparent $transparent | coop $coop  (dump s, restore s, image B, upload s)"
	results+=("$mib $plain $transparent $coop")
	rm -rf "$work/store" "${KVMOTION_WEIGHTS_DIR:-/nonexistent}"/*
done

python3 - "$kv_mib" "${json_out:-}" "${results[@]}" <<'EOF'
import json, sys
kv, out = int(sys.argv[1]), sys.argv[2]
rows = []
for line in sys.argv[3:]:
    v = line.split()
    mib = int(v[0])
    modes = {}
    for i, name in enumerate(["plain", "transparent", "coop"]):
        d, r, b, u = float(v[1 + 4 * i]), float(v[2 + 4 * i]), int(v[3 + 4 * i]), float(v[4 + 4 * i])
        modes[name] = {"dump_s": d, "restore_s": r, "image_bytes": b, "upload_s": u,
                       "stop_s": d + r}
    rows.append({"weights_mib": mib, **modes})
mibs = lambda b: f"{b / 2**20:8.1f}"
print(f"engine with {kv} MiB of live KV; dump/restore: criu's own time; stop = dump + restore")
print("(coop: the plugin's restore waits until the engine has resumed, re-upload included)")
print(f"{'weights':>8} {'mode':12} {'dump s':>7} {'restore s':>9} {'upload s':>8} {'stop s':>7} {'image MiB':>10}")
for r in rows:
    for m in ["plain", "transparent", "coop"]:
        x = r[m]
        print(f"{r['weights_mib']:>5} MiB {m:12} {x['dump_s']:7.2f} {x['restore_s']:9.2f} "
              f"{x['upload_s']:8.2f} {x['stop_s']:7.2f} {mibs(x['image_bytes']):>10}")
by = {r["weights_mib"]: r for r in rows}
summary = {}
if 4096 in by and 512 in by:
    a = by[4096]["coop"]["dump_s"] + by[4096]["coop"]["restore_s"]
    b = by[512]["coop"]["dump_s"] + by[512]["coop"]["restore_s"]
    summary["coop_dump_restore_4096_over_512"] = a / b
    print(f"coop dump+restore, 4 GiB / 0.5 GiB: {a / b:.3f} (target <= 1.1)")
if 2048 in by:
    c = by[2048]["coop"]["dump_s"] + by[2048]["coop"]["restore_s"]
    p = by[2048]["plain"]["dump_s"] + by[2048]["plain"]["restore_s"]
    summary["coop_over_plain_2048"] = c / p
    print(f"coop / plain dump+restore at 2 GiB: {c / p:.3f} (target <= 0.2)")
if out:
    with open(out, "w") as f:
        json.dump({"kv_mib": kv, "rows": rows, "summary": summary}, f, indent=1)
EOF
