#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# End to end on the real CRIU: a process holding a model in anonymous memory
# is dumped, the image split against a store seeded from the model file
# (the weights must come out as store references, not delta bytes), joined
# back byte for byte and restored; the process must go on with intact memory.
# Then a second dump of the restored process is split with --add-chunks (the
# store grows by the changed bytes only), and a --leave-running dump is split
# and joined while its source keeps running.
#
#   KM_TEST_MODEL_MIB (64), KM_TEST_DYNAMIC_MIB (16): sizes.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init

model_mib=${KM_TEST_MODEL_MIB:-64}
dyn_mib=${KM_TEST_DYNAMIC_MIB:-16}
T=$KM_TMP
model=$T/model.safetensors
store=$T/store
progress=$T/progress

# --- the model, the process, the store ------------------------------------

run "$MKMODEL" "$model" --size "${model_mib}M" --seed 1
model_size=$(file_size "$model")
dyn_size=$((dyn_mib << 20))

start_memproc "$model" "$dyn_mib" "$progress" "$T/memproc.out"
pid=$MEMPROC_PID
wait_progress "$progress" 3
sum0=$(progress_model_sum "$progress")
pass "memproc $pid runs with a ${model_mib} MiB model (checksum $sum0) and ${dyn_mib} MiB changing"

kvm "$T/seed.json" seed "$model" --store "$store" --no-sync --json
json_check "$T/seed.json" files bytes chunks chunks_added bytes_added
assert_eq "seed bytes" "$(json_get "$T/seed.json" bytes)" "$model_size"
assert_eq "seed files" "$(json_get "$T/seed.json" files)" 1
seed_chunks=$(json_get "$T/seed.json" chunks)
assert_ge "seed chunks" "$seed_chunks" 1
store0=$(store_bytes "$store")
pass "seed: $seed_chunks chunks, store holds $store0 bytes"

# --- dump 1: split, inspect, join, compare, restore ------------------------

criu_dump "$pid" "$T/img1"
counter_dump=$(progress_counter "$progress") || fail "cannot read $progress"
wait_pid_gone "$pid"
[ -n "$(compgen -G "$T/img1/pages-*.img")" ] || fail "criu wrote no pages-*.img"
image_bytes=$(du -sb "$T/img1" | cut -f1)
pass "criu dump: $image_bytes bytes of image, process gone at counter $counter_dump"
cp -a "$T/img1" "$T/img1.orig"

kvm "$T/split1.json" split "$T/img1" --store "$store" --no-sync --json
cat "$T/split1.json"
json_check "$T/split1.json" files_split bytes_split bytes_referenced chunks_referenced \
	bytes_zero bytes_delta delta_file_size manifest_size
[ -z "$(compgen -G "$T/img1/pages-*.img")" ] || fail "pages-*.img still in the split directory"
[ -f "$T/img1/kvmotion.manifest" ] || fail "no kvmotion.manifest after split"
[ -f "$T/img1/kvmotion.delta" ] || fail "no kvmotion.delta after split"
files_split=$(json_get "$T/split1.json" files_split)
bytes_split=$(json_get "$T/split1.json" bytes_split)
referenced=$(json_get "$T/split1.json" bytes_referenced)
chunks_ref=$(json_get "$T/split1.json" chunks_referenced)
delta_size=$(json_get "$T/split1.json" delta_file_size)
manifest_size=$(json_get "$T/split1.json" manifest_size)
bytes_zero=$(json_get "$T/split1.json" bytes_zero)
bytes_delta=$(json_get "$T/split1.json" bytes_delta)
assert_ge "files_split" "$files_split" 1
assert_eq "manifest_size" "$manifest_size" "$(file_size "$T/img1/kvmotion.manifest")"
assert_eq "delta_file_size" "$delta_size" "$(file_size "$T/img1/kvmotion.delta")"
assert_eq "referenced + zero + delta" "$((referenced + bytes_zero + bytes_delta))" "$bytes_split"
# the weights were found in the memory image ...
assert_ge "bytes_referenced" "$referenced" $((model_size * 9 / 10))
assert_ge "chunks_referenced" "$chunks_ref" $((seed_chunks * 9 / 10))
# ... and are not in the delta: it holds the dynamic region plus a little
assert_lt "delta_file_size" "$delta_size" $((dyn_size + model_size / 8))
pass "split: $bytes_split bytes split, $referenced referenced ($((referenced * 100 / model_size))% of the model), delta file $delta_size bytes"

kvm "$T/inspect.json" inspect "$T/img1" --json
python3 -m json.tool "$T/inspect.json" >/dev/null || fail "inspect --json is not valid JSON"
kvm "$T/inspect.txt" inspect "$T/img1"
pass "inspect --json parses"

kvm "$T/join1.json" join "$T/img1" --store "$store" --no-sync --json
cat "$T/join1.json"
json_check "$T/join1.json" files_joined bytes_written bytes_from_store bytes_from_delta
assert_eq "files_joined" "$(json_get "$T/join1.json" files_joined)" "$files_split"
assert_eq "bytes_written" "$(json_get "$T/join1.json" bytes_written)" "$bytes_split"
assert_eq "bytes_from_store" "$(json_get "$T/join1.json" bytes_from_store)" "$referenced"
assert_eq "bytes_from_delta" "$(json_get "$T/join1.json" bytes_from_delta)" "$bytes_delta"
assert_same_dirs "$T/img1.orig" "$T/img1" "joined image"
pass "join: the directory is byte-identical to the dump (diff -r, sha256 of each file)"

criu_restore "$T/img1"
[ "$RESTORED_PID" = "$pid" ] || fail "restored pid $RESTORED_PID, expected $pid"
wait_progress "$progress" $((counter_dump + 5))
counter_after=$(progress_counter "$progress")
verify_memproc "$pid" "$progress"
assert_eq "model checksum after restore" "$(progress_model_sum "$progress")" "$sum0"
pass "restore: pid $pid continues, counter $counter_dump -> $counter_after, VERIFY OK"

# --- dump 2 of the restored process, split --add-chunks --------------------

wait_progress "$progress" $((counter_after + 10))
criu_dump "$pid" "$T/img2"
counter_dump=$(progress_counter "$progress")
wait_pid_gone "$pid"
cp -a "$T/img2" "$T/img2.orig"
kvm "$T/split2.json" split "$T/img2" --store "$store" --add-chunks --no-sync --json
cat "$T/split2.json"
json_check "$T/split2.json" bytes_referenced
store1=$(store_bytes "$store")
growth=$((store1 - store0))
assert_ge "bytes_referenced (second dump)" "$(json_get "$T/split2.json" bytes_referenced)" \
	$((model_size * 9 / 10))
# the store keeps one copy of the weights: it grows by the changed bytes only
assert_lt "store growth" "$growth" $((model_size / 2))
assert_lt "store size" "$store1" $((model_size + dyn_size * 2 + (8 << 20)))
pass "split --add-chunks: store grew by $growth bytes (model $model_size), holds $store1"

kvm "$T/join2.json" join "$T/img2" --store "$store" --no-sync --json
assert_same_dirs "$T/img2.orig" "$T/img2" "joined second image"
pass "join of the --add-chunks split is byte-identical"
criu_restore "$T/img2"
wait_progress "$progress" $((counter_dump + 5))
verify_memproc "$pid" "$progress"
pass "second restore: pid $pid continues, VERIFY OK"

# --- dump 3 with --leave-running ------------------------------------------

counter_before=$(progress_counter "$progress")
criu_dump "$pid" "$T/img3" --leave-running
kill -0 "$pid" 2>/dev/null || fail "pid $pid died with --leave-running"
wait_progress "$progress" $((counter_before + 5))
cp -a "$T/img3" "$T/img3.orig"
kvm "$T/split3.json" split "$T/img3" --store "$store" --no-sync --json
json_check "$T/split3.json" bytes_referenced
assert_ge "bytes_referenced (--leave-running)" "$(json_get "$T/split3.json" bytes_referenced)" \
	$((model_size * 9 / 10))
kvm "$T/join3.json" join "$T/img3" --store "$store" --no-sync --json
assert_same_dirs "$T/img3.orig" "$T/img3" "joined --leave-running image"
verify_memproc "$pid" "$progress"
pass "dump --leave-running: source runs on (counter $counter_before -> $(progress_counter "$progress")), split/join byte-identical"

kill_memproc "$pid"
