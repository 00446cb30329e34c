#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The image engine, end to end, on this machine: a process holding a model in
# memory (memproc, standing in for an inference engine) is dumped with CRIU;
# kvmotion splits the image against a store seeded from the model file, so
# only the delta would travel; the image is joined back byte for byte and
# CRIU restores the process, which carries on where it stopped.
#
#   scripts/demo-split.sh [--model-size SIZE] [--dynamic MiB] [--keep]
#
# (The live-migration demo is scripts/demo.sh.)
#
#   --model-size SIZE   model file size, K/M/G suffixes (default 256M)
#   --dynamic MiB       memory the process keeps rewriting, like a KV cache (default 64)
#   --keep              keep the temporary directory
#
# Runs scripts/setup.sh (as root), configures build/ if needed (KM_BUILD_DIR
# overrides it) and builds it with ninja.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

model_size=256M
dyn_mib=64
keep=0

usage() { sed -n '10,19s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
	case $1 in
	--model-size)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		model_size=$2
		shift 2
		;;
	--model-size=*)
		model_size=${1#*=}
		shift
		;;
	--dynamic)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		dyn_mib=$2
		shift 2
		;;
	--dynamic=*)
		dyn_mib=${1#*=}
		shift
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
case $dyn_mib in
'' | *[!0-9]*)
	echo "demo: --dynamic takes a number of MiB" >&2
	exit 2
	;;
esac

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
now_ms() { date +%s%3N; }
json_get() {
	python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}
# need_json FILE KEY...: dies unless FILE is a JSON object with these integer keys
need_json() {
	python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
sys.exit(any(not isinstance(v.get(k), int) for k in sys.argv[2:]))' "$@" 2>/dev/null ||
		die "unexpected JSON from kvmotion in $1: $(head -c 300 "$1")"
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
memproc=$build/tests/helpers/memproc
criu=${KM_CRIU:-$top/.deps/bin/criu}
for f in "$kvmotion" "$mkmodel" "$memproc" "$criu"; do
	[ -x "$f" ] || die "$f is missing (mkmodel and memproc are built with -Dtests)"
done
"$criu" check >/dev/null 2>&1 || die "'$criu check' fails: CRIU cannot run here"
say "built in $build; CRIU $("$criu" --version | sed -n 's/^Version: *//p')"

work=$(mktemp -d /tmp/kvmotion-demo.XXXXXX)
pid=""
cleanup() {
	local rc=$?
	set +e
	if [ -n "$pid" ] && grep -qs memproc "/proc/$pid/comm"; then
		kill -KILL "$pid" 2>/dev/null
	fi
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
store=$work/store
img=$work/image
progress=$work/progress

counter() {
	local c
	c=$(head -n1 "$progress" 2>/dev/null | cut -d' ' -f1)
	case $c in
	'' | *[!0-9]*) echo 0 ;;
	*) echo $((10#$c)) ;;
	esac
}

wait_counter() {
	local after=$1
	for _ in $(seq 1 400); do
		[ "$(counter)" -gt "$after" ] && return 0
		grep -qs memproc "/proc/$pid/comm" || {
			cat "$work/memproc.out" >&2
			die "the process (pid $pid) is gone"
		}
		sleep 0.05
	done
	die "the process made no progress (counter $(counter), waited for > $after)"
}

criu_log_tail() {
	grep -E 'Error|error' "$1" | grep -v RLIMIT_NOFILE | tail -n 10 >&2 || true
	tail -n 20 "$1" >&2 || true
}

# --- the model and the process ---------------------------------------------

step "a model file ($model_size, safetensors, bf16) and a process holding it"
"$mkmodel" "$model" --size "$model_size" --seed 1 || die "mkmodel failed"
msize=$(stat -c %s "$model")
say "model: $(human "$msize") in $(python3 -c 'import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]
print(len(json.loads(f.read(n))) - 1)' "$model") tensors"
setsid "$memproc" --model "$model" --dynamic "$dyn_mib" --progress "$progress" \
	</dev/null >"$work/memproc.out" 2>&1 &
pid=$!
disown "$pid" 2>/dev/null || true
wait_counter 5
say "memproc pid $pid: the whole model read into anonymous memory, plus ${dyn_mib} MiB it keeps"
say "rewriting (like a KV cache); progress counter $(counter)"

step "seed the store from the model file (done ahead of any migration)"
t0=$(now_ms)
"$kvmotion" seed "$model" --store "$store" --no-sync --json >"$work/seed.json" ||
	die "kvmotion seed failed"
need_json "$work/seed.json" chunks bytes
say "$(json_get "$work/seed.json" chunks) chunks, $(human "$(json_get "$work/seed.json" bytes)") in $(($(now_ms) - t0)) ms"

# --- dump and split ----------------------------------------------------------

step "checkpoint the process with CRIU"
c_before=$(counter)
t0=$(now_ms)
mkdir -p "$img"
if ! "$criu" dump -t "$pid" -D "$img" -o dump.log -v4; then
	criu_log_tail "$img/dump.log"
	die "criu dump failed"
fi
t_dump=$(($(now_ms) - t0))
c_dump=$(counter)
image_bytes=$(find "$img" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
say "dumped in $t_dump ms at counter $c_dump: $(human "$image_bytes") of image"
(cd "$img" && sha256sum -- pages-*.img) >"$work/pages.sha256"

step "kvmotion split: weights become store references, the rest a zstd delta"
t0=$(now_ms)
"$kvmotion" split "$img" --store "$store" --no-sync --json >"$work/split.json" ||
	die "kvmotion split failed"
need_json "$work/split.json" bytes_split bytes_referenced bytes_zero bytes_delta delta_file_size \
	manifest_size
t_split=$(($(now_ms) - t0))
s=$work/split.json
bytes_split=$(json_get "$s" bytes_split)
referenced=$(json_get "$s" bytes_referenced)
zero=$(json_get "$s" bytes_zero)
delta_raw=$(json_get "$s" bytes_delta)
delta_file=$(json_get "$s" delta_file_size)
manifest=$(json_get "$s" manifest_size)
sent=$(find "$img" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%5.1f%%", b ? 100 * a / b : 0 }'; }
say "split in $t_split ms"
echo
printf '   %-52s %14s %10s %8s\n' "" bytes "" "of image"
row() { printf '   %-52s %14d %10s %8s\n' "$1" "$2" "$(human "$2")" "$(pct "$2" "$image_bytes")"; }
row "CRIU image (all files)" "$image_bytes"
row "  pages split" "$bytes_split"
row "  referenced from the store (not sent)" "$referenced"
row "  zero (not sent)" "$zero"
row "  delta, raw" "$delta_raw"
row "  delta, compressed (kvmotion.delta)" "$delta_file"
row "  manifest" "$manifest"
row "sent: the split directory (delta, manifest, rest)" "$sent"
echo
say "referenced: $(pct "$referenced" "$msize") of the model's bytes were found in the memory image"

# --- join and restore --------------------------------------------------------

step "kvmotion join: rebuild the image from the store plus the delta"
t0=$(now_ms)
"$kvmotion" join "$img" --store "$store" --no-sync --json >"$work/join.json" ||
	die "kvmotion join failed"
need_json "$work/join.json" bytes_written bytes_from_store
say "joined in $(($(now_ms) - t0)) ms: $(human "$(json_get "$work/join.json" bytes_written)") written," \
	"$(human "$(json_get "$work/join.json" bytes_from_store)") from the store"
(cd "$img" && sha256sum --quiet -c "$work/pages.sha256") || die "the joined pages differ from the dump"
say "pages-*.img byte-identical to the dump (sha256)"

step "restore with CRIU: the process carries on"
for _ in $(seq 1 200); do
	[ -e "/proc/$pid" ] || break
	sleep 0.05
done
[ ! -e "/proc/$pid" ] || die "the dumped pid $pid is still there"
t0=$(now_ms)
if ! "$criu" restore -D "$img" -d -o restore.log -v4; then
	criu_log_tail "$img/restore.log"
	die "criu restore failed"
fi
say "restored in $(($(now_ms) - t0)) ms"
wait_counter $((c_dump + 10))
v0=$(sed -n 2p "$progress" | awk '{ print $3 }')
kill -USR1 "$pid"
for _ in $(seq 1 200); do
	[ "$(sed -n 2p "$progress" | awk '{ print $3 }')" != "$v0" ] && break
	sleep 0.05
done
verify=$(sed -n 2p "$progress" | awk '{ print $2 }')
say "progress counter: $c_before before the dump, $c_dump at the dump, $(counter) now (pid $pid)"
[ "$verify" = OK ] || die "the restored process reports VERIFY $verify: memory damaged"
say "memory check after restore (model checksum, every dynamic block): VERIFY OK"

step "clean up"
kill -TERM "$pid"
for _ in $(seq 1 100); do
	grep -qs memproc "/proc/$pid/comm" || break
	sleep 0.05
done
pid=""
say "done: $(human "$image_bytes") image, $(human "$sent") to send ($(pct "$sent" "$image_bytes" | tr -d ' '))"
