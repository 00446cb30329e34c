#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# CRIU plugin benchmark (issue 3), one run, the same process lineage:
#   plain `criu dump` + `criu restore`  vs.  the same with kvmotion's plugin
# for the test engine (tests/engine) holding --weights-mib of bf16 weights in
# anonymous memory (default 1536) and --kv-mib of live KV cache (default 256)
# while it decodes. The KV blocks are filled with synthetic bf16 values
# (engine --kv-fill-mib): computing 256 MiB of real KV on 2 CPU cores would
# take hours, and CRIU and kvmotion see bytes, not how they were made.
# Order: plain dump (process killed), plain restore, plugin dump (killed),
# plugin restore; each restore must come back and keep running. "Split
# alone" and "join alone" are `kvmotion split` and `kvmotion join` (the same
# library calls as the plugin's) on a copy of the round's plain image, run
# while the process is dumped; each join is compared with that image.
#
# --baseline BUILD adds the plugin and CLI of another build directory (say,
# of the previous commit) to the same rounds, for a before/after table from
# one run on one machine state; new and baseline take turns going first.
#
#   scripts/bench-criu.sh [--weights-mib N] [--kv-mib N] [--dir D] [--json FILE]
#                         [--baseline BUILD] [--rounds N]
# KM_BENCH_LOGS=DIR keeps the plugin's dump.log and restore.log of each round (CRIU -v3).
#
# Images on tmpfs (--dir, default /dev/shm), store seeded with the weights.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
weights_mib=1536
kv_mib=256
loglevel=2 # CRIU's; 3 (the plugin's timings) with KM_BENCH_LOGS
[ -z "${KM_BENCH_LOGS:-}" ] || loglevel=3
base=/dev/shm
json_out=
baseline=
rounds=3
while [ $# -gt 0 ]; do
	case $1 in
	--weights-mib) weights_mib=$2; shift 2 ;;
	--kv-mib) kv_mib=$2; shift 2 ;;
	--dir) base=$2; shift 2 ;;
	--json) json_out=$2; shift 2 ;;
	--baseline) baseline=$(cd "$2" && pwd); shift 2 ;;
	--rounds) rounds=$2; shift 2 ;;
	*) echo "usage: $0 [--weights-mib N] [--kv-mib N] [--dir D] [--json FILE] [--baseline BUILD] [--rounds N]" >&2; exit 2 ;;
	esac
done

bench_setup
plugin_dir="$build/criu-hooks"
[ -f "$plugin_dir/kvmotion.so" ] || { echo "the CRIU plugin was not built" >&2; exit 1; }
if [ -n "$baseline" ] &&
	! { [ -f "$baseline/criu-hooks/kvmotion.so" ] && [ -x "$baseline/plugin/kvmotion" ]; }; then
	echo "$baseline: no built plugin and CLI" >&2
	exit 1
fi
empty_dir=$(mktemp -d)

work=$(mktemp -d "$base/km-bench-criu.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
	rm -rf "$work" "$empty_dir"
}
trap cleanup EXIT

progress() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["steps"])' "$work/status.json" 2>/dev/null || true; }
wait_gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }
wait_progress() { # the counter moves past $1
	local before=$1
	for _ in $(seq 1200); do
		[ "$(progress)" != "$before" ] && [ -n "$(progress)" ] && return 0
		sleep 0.05
	done
	echo "the process does not make progress" >&2
	exit 1
}

"$build/tests/helpers/mkmodel" "$work/weights.safetensors" --size $((weights_mib * 1024 * 1024)) --seed 11
"$km" seed "$work/weights.safetensors" --store "$work/store" --name weights --no-sync >/dev/null
setsid "$build/tests/engine/engine" --model "$work/weights.safetensors" --out "$work/tokens" \
	--seqs 2 --total-seqs 0 --prompt-len 4 --max-new 64 --kv-mib $((kv_mib + 64)) \
	--kv-fill-mib "$kv_mib" --status-file "$work/status.json" </dev/null >"$work/proc.log" 2>&1 &
pid=$!
disown "$pid"
wait_progress ""
rss=$(awk '/VmRSS/ { print $2 * 1024 }' "/proc/$pid/status")

export KVMOTION_STORE="$work/store" KVMOTION_SYNC=0
dump() { # $1 dir, $2 plugin dir
	mkdir -p "$1"
	local t0 t1
	t0=$(now)
	"$criu" dump -t "$pid" -D "$1" -o dump.log -v"$loglevel" -L "$2" ||
		{ tail -n 20 "$1/dump.log" >&2; exit 1; }
	t1=$(now)
	wait_gone "$pid"
	elapsed "$t0" "$t1"
}
restore() { # $1 dir, $2 plugin dir
	local t0 t1 before
	before=$(progress)
	t0=$(now)
	"$criu" restore -D "$1" -d -o restore.log -v"$loglevel" -L "$2" ||
		{ tail -n 20 "$1/restore.log" >&2; exit 1; }
	t1=$(now)
	wait_progress "$before"
	elapsed "$t0" "$t1"
}

# The split and join alone, with a build's CLI, on a copy of the plain image.
split_join() { # $1 CLI; prints "split_s join_s"
	local t0 t1 t2
	rm -rf "$work/cli"
	cp -r "$work/plain" "$work/cli"
	t0=$(now)
	"$1" split "$work/cli" --no-sync >/dev/null
	t1=$(now)
	"$1" join "$work/cli" --no-sync >/dev/null
	t2=$(now)
	diff -r -x '*.log' -x 'stats-*' "$work/plain" "$work/cli" >/dev/null ||
		{ echo "join output differs from the dump" >&2; exit 1; }
	rm -rf "$work/cli"
	echo "$(elapsed "$t0" "$t1") $(elapsed "$t1" "$t2")"
}
cli_round() { # $1 label (new|base), $2 build dir
	local sj
	sj=$(split_join "$2/plugin/kvmotion")
	if [ "$1" = new ]; then
		ks+=("${sj% *}") kj+=("${sj#* }")
	else
		bs+=("${sj% *}") bj+=("${sj#* }")
	fi
	echo "  $1: split alone ${sj% *} s, join alone ${sj#* } s"
}
plugin_round() { # $1 label (new|base), $2 build dir
	local d r
	d=$(dump "$work/plugin" "$2/criu-hooks")
	if [ "$1" = new ]; then
		plugin_bytes=$(dir_bytes "$work/plugin")
		plugin_json=$("$km" inspect "$work/plugin" --json)
	else
		base_bytes=$(dir_bytes "$work/plugin")
	fi
	r=$(restore "$work/plugin" "$2/criu-hooks")
	# KM_BENCH_LOGS=DIR: the plugin's dump and restore logs of each round kept there
	[ -z "${KM_BENCH_LOGS:-}" ] || for f in dump restore; do
		cp "$work/plugin/$f.log" "$KM_BENCH_LOGS/$1-$round.$f.log"
	done
	rm -rf "$work/plugin"
	if [ "$1" = new ]; then
		kd+=("$d") kr+=("$r")
	else
		bd+=("$d") br+=("$r")
	fi
	echo "  $1: plugin dump $d s, restore $r s"
}
both() { # $1 function; new and baseline take turns going first
	if [ -n "$baseline" ] && [ $((round % 2)) = 0 ]; then
		"$1" base "$baseline"
		"$1" new "$build"
	else
		"$1" new "$build"
		[ -z "$baseline" ] || "$1" base "$baseline"
	fi
}

# Rounds (default 3) on the same process lineage; medians. The CLI runs while
# the process is dumped (not running), on copies of the plain image.
pd=() pr=() kd=() kr=() ks=() kj=() bd=() br=() bs=() bj=() base_bytes=0
for round in $(seq "$rounds"); do
	pd+=("$(dump "$work/plain" "$empty_dir")")
	plain_bytes=$(dir_bytes "$work/plain")
	echo "round $round: plain dump ${pd[-1]} s"
	both cli_round
	pr+=("$(restore "$work/plain" "$empty_dir")")
	rm -rf "$work/plain"
	echo "  plain restore ${pr[-1]} s"
	both plugin_round
done
plain_dump_s=$(median "${pd[@]}")
plain_restore_s=$(median "${pr[@]}")
plugin_dump_s=$(median "${kd[@]}")
plugin_restore_s=$(median "${kr[@]}")
split_s=$(median "${ks[@]}")
join_s=$(median "${kj[@]}")
base_row=
if [ -n "$baseline" ]; then
	base_row="$(median "${bd[@]}") $(median "${br[@]}") $(median "${bs[@]}") $(median "${bj[@]}") $base_bytes"
fi
kill "$pid"

python3 - "$plain_dump_s" "$plain_restore_s" "$plain_bytes" "$plugin_dump_s" "$plugin_restore_s" \
	"$plugin_bytes" "$plugin_json" "$weights_mib" "$kv_mib" "$rss" "${json_out:-}" \
	"$split_s" "$join_s" "$base_row" "$rounds" <<'EOF'
import json, sys
pd, pr = float(sys.argv[1]), float(sys.argv[2])
pb = int(sys.argv[3])
kd, kr = float(sys.argv[4]), float(sys.argv[5])
kb = int(sys.argv[6])
ins = json.loads(sys.argv[7])
wmib, kvmib, rss, out = int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10]), sys.argv[11]
ks, kj = float(sys.argv[12]), float(sys.argv[13])
base = [float(x) for x in sys.argv[14].split()] if sys.argv[14] else None
rounds = int(sys.argv[15])
# Bytes not in the weights image: everything the plugin's image holds itself.
not_weights = kb
live = kvmib * 2**20
r = {
    "weights_mib": wmib, "kv_mib": kvmib, "rss_bytes": rss, "rounds": rounds,
    "plain": {"dump_s": pd, "restore_s": pr, "image_bytes": pb, "bytes_not_in_weights": pb},
    "plugin": {"dump_s": kd, "restore_s": kr, "split_alone_s": ks, "join_alone_s": kj,
               "image_bytes": kb, "bytes_not_in_weights": not_weights,
               "bytes_referenced": ins["bytes_referenced"], "delta_raw": ins["bytes_delta"],
               "delta_compressed": ins["delta"]["compressed_size"]},
    "dump_ratio": kd / pd, "restore_ratio": kr / pr,
}
if base:
    r["baseline"] = {"dump_s": base[0], "restore_s": base[1], "split_alone_s": base[2],
                     "join_alone_s": base[3], "image_bytes": int(base[4])}
mib = lambda b: f"{b / 2**20:.1f} MiB"
print(f"engine: {wmib} MiB weights + {kvmib} MiB live KV, RSS {mib(rss)}")
print(f"medians of {rounds} rounds")
print(f"{'':9} {'dump':>8} {'restore':>8} {'split':>8} {'join':>8} {'image':>12} {'not in weights':>15}")
print(f"{'plain':9} {pd:7.2f}s {pr:7.2f}s {'':>8} {'':>8} {mib(pb):>12} {mib(pb):>15}")
if base:
    print(f"{'baseline':9} {base[0]:7.2f}s {base[1]:7.2f}s {base[2]:7.2f}s {base[3]:7.2f}s {mib(base[4]):>12}")
print(f"{'plugin':9} {kd:7.2f}s {kr:7.2f}s {ks:7.2f}s {kj:7.2f}s {mib(kb):>12} {mib(not_weights):>15}")
if base:
    print(f"baseline/plain: dump {base[0] / pd:.2f}x, restore {base[1] / pr:.2f}x")
print(f"plugin/plain: dump {kd / pd:.2f}x, restore {kr / pr:.2f}x; "
      f"referenced {mib(ins['bytes_referenced'])}; not in weights {mib(not_weights)} "
      f"vs live {mib(live)} + CPU state")
if out:
    with open(out, "w") as f:
        json.dump(r, f, indent=1)
EOF
