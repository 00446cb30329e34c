#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Image-engine benchmark (issue 2), one run, side by side on this machine:
#   1. chunk+hash throughput, 1 thread and all threads (tests/bench/bench_chunk)
#   2. delta compression of bf16-like data with and without the byte-plane
#      filter (tests/bench/bench_delta)
#   3. a real CRIU dump of a process holding a seeded model (default 1.75 GiB)
#      plus dynamic memory (default 256 MiB): split and join time vs. a plain
#      `cp` of the same image, on the same file system
#   4. stored bytes for two dumps of that process (split --add-chunks) vs. one
#      copy of the model plus the changed bytes
#
#   scripts/bench-image.sh [--model-mib N] [--dynamic-mib N] [--dir D] [--json FILE]
#
# Images live in --dir (default a fresh directory under /dev/shm: tmpfs).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
model_mib=1792
dynamic_mib=256
base=/dev/shm
json_out=
while [ $# -gt 0 ]; do
	case $1 in
	--model-mib) model_mib=$2; shift 2 ;;
	--dynamic-mib) dynamic_mib=$2; shift 2 ;;
	--dir) base=$2; shift 2 ;;
	--json) json_out=$2; shift 2 ;;
	*) echo "usage: $0 [--model-mib N] [--dynamic-mib N] [--dir D] [--json FILE]" >&2; exit 2 ;;
	esac
done

bench_setup

work=$(mktemp -d "$base/km-bench.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT


echo "== 1. chunk + SHA-256 throughput (bench_chunk, 1024 MiB)"
chunk_json=$("$build/tests/bench/bench_chunk" --size 1024 | tail -n1)
echo "$chunk_json"

echo "== 2. delta compression of bf16-like data (bench_delta, 512 MiB)"
delta_json=$("$build/tests/bench/bench_delta" --size 512 | tail -n1)
echo "$delta_json"

echo "== 3. split and join of a ${model_mib} MiB model + ${dynamic_mib} MiB dynamic process image"
"$build/tests/helpers/mkmodel" "$work/model.safetensors" --size $((model_mib * 1024 * 1024)) --seed 7
store="$work/store"
t0=$(now)
seed_json=$("$km" seed "$work/model.safetensors" --store "$store" --name model --no-sync --json)
t1=$(now)
seed_s=$(elapsed "$t0" "$t1")
setsid "$build/tests/helpers/memproc" --model "$work/model.safetensors" \
	--dynamic "$dynamic_mib" --progress "$work/progress" </dev/null >"$work/memproc.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
	[ -s "$work/progress" ] && break
	sleep 0.1
done
[ -s "$work/progress" ] || { echo "memproc did not start" >&2; exit 1; }

dump() { # $1: image dir
	mkdir -p "$1"
	"$criu" dump -t "$pid" -D "$1" --leave-running -o dump.log -v2 ||
		{ tail -n 20 "$1/dump.log" >&2; exit 1; }
}
# Two dumps a second apart; then the process goes, so that the timings
# below run on a quiet machine.
dump "$work/d1"
sleep 1
dump "$work/d2"
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
pid=
image_bytes=$(dir_bytes "$work/d1")

# median of three runs of each, on fresh copies of the same image
cp_runs=() split_runs=() join_runs=()
for _ in 1 2 3; do
	rm -rf "$work/img" "$work/img-cp"
	t0=$(now); cp -r "$work/d1" "$work/img-cp"; t1=$(now)
	cp_runs+=("$(elapsed "$t0" "$t1")")
	mv "$work/img-cp" "$work/img"
	t0=$(now); split_json=$("$km" split "$work/img" --store "$store" --no-sync --json); t1=$(now)
	split_runs+=("$(elapsed "$t0" "$t1")")
	t0=$(now); join_json=$("$km" join "$work/img" --store "$store" --no-sync --json); t1=$(now)
	join_runs+=("$(elapsed "$t0" "$t1")")
	diff -r "$work/img" "$work/d1" >/dev/null ||
		{ echo "join output differs from the dump" >&2; exit 1; }
done
rm -rf "$work/img"
cp_s=$(median "${cp_runs[@]}")
split_s=$(median "${split_runs[@]}")
join_s=$(median "${join_runs[@]}")
echo "cp ${cp_runs[*]} s; split ${split_runs[*]} s; join ${join_runs[*]} s"

echo "== 4. stored bytes for two dumps of the same process (split --add-chunks)"
store2="$work/store2"
"$km" seed "$work/model.safetensors" --store "$store2" --name model --no-sync --json >/dev/null
store_after_seed=$(dir_bytes "$store2/chunks")
a1=$("$km" split "$work/d1" --store "$store2" --add-chunks --no-sync --json)
a2=$("$km" split "$work/d2" --store "$store2" --add-chunks --no-sync --json)
store_after=$(dir_bytes "$store2/chunks")
d1_bytes=$(dir_bytes "$work/d1")
d2_bytes=$(dir_bytes "$work/d2")
# The changed bytes, counted independently of kvmotion: 4 KiB pages of the
# second dump that differ from the first at the same offset of pages-*.img
# (the split directories no longer hold them: join copies first).
"$km" join "$work/d1" --store "$store2" --no-sync --keep >/dev/null
"$km" join "$work/d2" --store "$store2" --no-sync --keep >/dev/null
changed_pages=$(python3 - "$work/d1" "$work/d2" <<'PY'
import glob, os, sys
a = sorted(glob.glob(os.path.join(sys.argv[1], "pages-*.img")))
b = sorted(glob.glob(os.path.join(sys.argv[2], "pages-*.img")))
changed = 0
for x, y in zip(a, b):
    with open(x, "rb") as f, open(y, "rb") as g:
        while True:
            p, q = f.read(4096), g.read(4096)
            if not p and not q:
                break
            changed += p != q
print(changed * 4096)
PY
)

python3 - "$chunk_json" "$delta_json" "$seed_json" "$split_json" "$join_json" "$a1" "$a2" \
	"$seed_s" "$split_s" "$join_s" "$cp_s" "$image_bytes" "$store_after_seed" "$store_after" \
	"$d1_bytes" "$d2_bytes" "$model_mib" "$dynamic_mib" "${json_out:-}" "$changed_pages" <<'EOF'
import json, sys
(chunk, delta, seed, split, join, a1, a2) = (json.loads(x) for x in sys.argv[1:8])
seed_s, split_s, join_s, cp_s = (float(x) for x in sys.argv[8:12])
image_bytes, store_seed, store_after, d1, d2 = (int(x) for x in sys.argv[12:17])
model_mib, dynamic_mib, out = int(sys.argv[17]), int(sys.argv[18]), sys.argv[19]
changed_pages = int(sys.argv[20])
model = seed["bytes"]
# What two dumps must store at least: one model, dump 1's other bytes, and
# the pages dump 2 changed.
changed = (image_bytes - model) + changed_pages
stored_two = (store_after - store_seed) + store_seed + d1 + d2
r = {
    "chunk": chunk, "delta": delta,
    "image_bytes": image_bytes, "model_bytes": model,
    "seed_s": seed_s, "split_s": split_s, "join_s": join_s, "cp_s": cp_s,
    "join_over_cp": join_s / cp_s, "split_over_cp": split_s / cp_s,
    "split": split, "join": join,
    "two_dumps": {
        "store_after_seed": store_seed, "store_after_two_splits": store_after,
        "chunks_added_dump1": a1["chunks_added"], "bytes_added_dump1": a1["bytes_added"],
        "chunks_added_dump2": a2["chunks_added"], "bytes_added_dump2": a2["bytes_added"],
        "split_dirs_bytes": d1 + d2,
        "dump2_changed_page_bytes": changed_pages,
        "stored_total": stored_two,
        "stored_over_model_plus_changed": stored_two / (model + changed),
        "plain_two_images": 2 * image_bytes,
    },
}
mib = lambda b: f"{b / 2**20:.1f} MiB"
print()
print(f"chunk+hash: {chunk['chunk_hash_gbps_1t']:.2f} GB/s on 1 thread, "
      f"{chunk['chunk_hash_gbps_nt']:.2f} GB/s on {chunk['threads']} threads")
print(f"image {mib(image_bytes)} (model {mib(model)}), medians of 3: split {split_s:.2f} s, "
      f"join {join_s:.2f} s, cp {cp_s:.2f} s -> join/cp {join_s / cp_s:.2f}x, split/cp {split_s / cp_s:.2f}x")
print(f"  referenced {mib(split['bytes_referenced'])}, delta raw {mib(split['bytes_delta'])}, "
      f"delta file {mib(split['delta_file_size'])}, zero {mib(split['bytes_zero'])}")
print(f"two dumps: store {mib(store_seed)} after seed -> {mib(store_after)} after both splits; "
      f"split dirs {mib(d1 + d2)}; total {mib(stored_two)} = "
      f"{stored_two / (model + changed):.3f} x (model + dump 1's other bytes + dump 2's changed pages = "
      f"{mib(changed)}); "
      f"two plain images would be {mib(2 * image_bytes)}")
if out:
    with open(out, "w") as f:
        json.dump(r, f, indent=1)
EOF
