#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Cooperative mode on the real CRIU: the test engine maps its weights from
# the store's weights file through kvmotion's engine API and quiesces when
# the plugin asks (docs/engine-api.md). Checks:
#  - a cooperative dump holds no weights: the images of a 64 MiB and a
#    512 MiB model at the same KV load differ by less than 5%;
#  - the restored engine continues token for token with no extra prefill,
#    computing from the mapped file (--coop) or from a copy released at the
#    quiesce and uploaded again from it (--coop-upload, a GPU's way);
#  - free KV blocks add nothing to the image (128 MiB of stale, freed
#    blocks: the cooperative image stays put, a plain dump grows by them);
#  - a missing or altered weights file makes the restore refuse before any
#    process exists, naming the file;
#  - an engine that does not answer the quiesce leaves the dump failed and
#    the engine serving, with the same tokens as a run never asked.
#
# With KM_REQUIRE_GPU=1 and KM_ENGINE=engine-cuda (meson test engine_coop_gpu)
# it is the real-GPU check of the CUDA build's cooperative mode: weights and
# free KV pieces unmapped (cuMemUnmap + cuMemRelease) in the quiesce callback,
# before the plugin locks and checkpoints the process through the driver, so
# that the checkpoint copies neither to host memory; mapped again at the same
# addresses and the weights uploaded after the restore. What differs there:
#  - CRIU's --timeout and KVMOTION_LOCK_TIMEOUT_MS are larger (the driver's
#    lock and checkpoint happen inside the freeze), and the steps slower, so
#    that the engine is still generating when the plugin (which starts
#    libcuda first) asks for the quiesce;
#  - the GPU's live memory (held KV blocks, activations) reaches the image
#    through host memory, after the split: the images are compared as split
#    images (delta + references, kvmotion inspect), and the plain dump for
#    the freed-blocks comparison goes through the plugin too (CRIU cannot
#    dump a CUDA process without it);
#  - the device bytes released are the engine's to report (stderr line,
#    status key kv_device_released_bytes): the plugin counts host ones only.
# Without a GPU (/proc/driver/nvidia/gpus empty) or engine-cuda it SKIPs.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init

engine_test_init "the CUDA engine's cooperative dump and restore (VMM release before the driver's checkpoint) run only on a GPU host; the host-side arithmetic is tested in vmm_plan, the protocol in engine_coop"

T=$KM_TMP
store=$T/store
export KVMOTION_STORE=$store KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null
# CRIU options of every dump and restore; the GPU's lock and checkpoint must
# fit in CRIU's --timeout, its quiesce (a step, a synchronize, the unmaps)
# and its resume (maps, uploads) in the plugin's quiesce timeout.
criu_opts=(-L "$PLUGIN_DIR")
step_delay=40
if [ "$GPU" = 1 ]; then
	criu_opts+=(--timeout 120)
	export KVMOTION_LOCK_TIMEOUT_MS=60000 KVMOTION_QUIESCE_TIMEOUT_MS=20000
	step_delay=150
fi
run "$KVMOTION" store init "$store" --no-sync
# The path as an argument names the store (it once created the default
# store instead, silently).
[ -f "$store/config.kmstore" ] || fail "store init $store made no store there"
small=$T/small.safetensors
large=$T/large.safetensors
# The same layers and width, so the same KV bytes per token: the sizes
# differ in the vocabulary (embedding and lm_head), 8x.
run "$MKMODEL" "$small" --size $((64 << 20)) --seed 5 --dim 512 --layers 8
run "$MKMODEL" "$large" --size $((512 << 20)) --seed 6 --dim 512 --layers 8
# The KV load: 128 MiB of held KV blocks and four short live sequences.
args=(--seqs 4 --total-seqs 8 --prompt-len 8 --max-new 24 --kv-mib 192 --kv-fill-mib 128 --seed 3)

# start_engine NAME MODEL [ARGS...]: a cooperative engine in the background
start_engine() {
	local name=$1 model=$2
	shift 2
	setsid "$ENGINE" --model "$model" "${args[@]}" --out "$T/$name.out" \
		--status-file "$T/$name.json" --status-socket "km-coop-$name-$$" \
		--step-delay-ms "$step_delay" "$@" </dev/null >"$T/$name.log" 2>&1 &
	ENGINE_PID=$!
	disown "$ENGINE_PID"
	KM_PIDS+=("$ENGINE_PID")
	for _ in $(seq 600); do
		[ -s "$T/$name.json" ] && [ "$(json_get "$T/$name.json" tokens_generated)" -ge 12 ] && return 0
		kill -0 "$ENGINE_PID" 2>/dev/null || break
		sleep 0.05
	done
	cat "$T/$name.log" >&2
	fail "engine $name did not get going"
}

image_bytes() { du -sb --apparent-size "$1" | cut -f1; }
# inspect_json DIR KEY...: kvmotion inspect --json of a split image into
# DIR.json, its KEYs (dotted paths) checked to be integers, for json_get
inspect_json() {
	local dir=$1
	shift
	"$KVMOTION" inspect "$dir" --json >"$dir.json" || fail "kvmotion inspect $dir failed"
	python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    x = v
    for k in key.split("."):
        x = x[k]
    assert isinstance(x, int) and not isinstance(x, bool) and x >= 0, key' "$dir.json" "$@" ||
		fail "$dir.json lacks integer field(s) among $*: $(head -c 400 "$dir.json")"
}
# device_released LOG: the bytes of free device KV memory the engine's last
# quiesce released (its stderr line), "" if it never said
device_released() {
	sed -n 's/^engine: quiesced: [0-9]* bytes of weights and \([0-9]*\) bytes of free device KV memory released$/\1/p' "$1" | tail -n 1
}
# gpu_dump_checks DIR PID: the plugin quiesced the engine, then locked and
# checkpointed its GPU, in that order (locked first, the released memory
# would be in the checkpoint, or the unmap would wait on a locked driver)
gpu_dump_checks() {
	local dir=$1 pid=$2 q l
	q=$(grep -n "kvmotion: engine in pid $pid quiesced" "$dir/dump.log" | head -n 1 | cut -d: -f1)
	l=$(grep -n "kvmotion: locked CUDA process $pid" "$dir/dump.log" | head -n 1 | cut -d: -f1)
	[ -n "$q" ] || fail "$dir: the plugin did not quiesce the engine"
	[ -n "$l" ] || fail "$dir: the plugin did not lock the CUDA process"
	[ "$q" -lt "$l" ] || fail "$dir: the CUDA process was locked (line $l) before the engine quiesced (line $q)"
	grep -q "kvmotion: GPU state of $pid checkpointed" "$dir/dump.log" ||
		fail "$dir: the plugin did not checkpoint the GPU"
}

# --- references: the same engines, never stopped (coop mode changes no token)
run "$ENGINE" --model "$small" "${args[@]}" --out "$T/ref.out" --status-file "$T/ref.json" --quiet
ref_tokens=$(json_get "$T/ref.json" tokens_generated)
ref_prefill=$(json_get "$T/ref.json" prefill_steps)
run "$ENGINE" --model "$small" "${args[@]}" --out "$T/ref-coop.out" --status-file "$T/ref-coop.json" \
	--coop --quiet
cmp "$T/ref.out" "$T/ref-coop.out" || fail "cooperative mode changed the tokens"
pass "cooperative mode gives the same $ref_tokens tokens"
weights_file=$(ls "$store"/weights/*.kmw | head -1)
[ -f "$weights_file" ] || fail "no weights file in $store/weights"

# --- image size does not depend on the model size. These two dumps are
# split anyway (split_engines): the store holds both models, so a split
# that found weights in the pages would show them as referenced bytes.
export KVMOTION_SPLIT_ENGINES=yes
start_engine small "$small" --coop
small_pid=$ENGINE_PID
criu_dump "$small_pid" "$T/img-small" "${criu_opts[@]}"
grep -q "kvmotion: engine in pid $small_pid quiesced" "$T/img-small/dump.log" ||
	fail "the plugin did not quiesce the engine"
[ -f "$T/img-small/kvmotion.engines" ] || fail "no kvmotion.engines in the image"
[ "$GPU" = 1 ] && gpu_dump_checks "$T/img-small" "$small_pid"
wait_pid_gone "$small_pid"
# On the CPU, no delay between its steps: the quiesce nearly always finds
# it computing and stops the step between two layers.
large_delay=()
[ "$GPU" = 1 ] || large_delay=(--step-delay-ms 0)
start_engine large "$large" --coop "${large_delay[@]}"
large_pid=$ENGINE_PID
criu_dump "$large_pid" "$T/img-large" "${criu_opts[@]}"
[ "$GPU" = 1 ] && gpu_dump_checks "$T/img-large" "$large_pid"
unset KVMOTION_SPLIT_ENGINES
wait_pid_gone "$large_pid"
s_bytes=$(image_bytes "$T/img-small")
l_bytes=$(image_bytes "$T/img-large")
log "cooperative images: 64 MiB model $s_bytes B, 512 MiB model $l_bytes B"
diff=$((l_bytes > s_bytes ? l_bytes - s_bytes : s_bytes - l_bytes))
assert_lt "image size difference x20" $((diff * 20)) "$s_bytes"
assert_lt "image of the 512 MiB model vs its weights" "$l_bytes" $((256 << 20))
# The split would reference weights that were dumped (the model is in the
# store) and keep the image small anyway: what was dumped must not hold them.
inspect_json "$T/img-large" bytes_referenced
l_ref=$(json_get "$T/img-large.json" bytes_referenced)
assert_lt "bytes of the 512 MiB model's image found in the store" "$l_ref" $((512 << 20 >> 4))
pass "image sizes differ by $diff B (< 5%), no weights in either ($l_ref B referenced)"
if [ "$GPU" = 1 ]; then
	# 192 MiB pool, 128 MiB held, 4 short sequences: ~60 MiB free, in 2 MiB pieces
	released=$(device_released "$T/large.log")
	[ -n "$released" ] || fail "the CUDA engine did not report its quiesce (large.log)"
	assert_ge "free device KV bytes released by the 512 MiB model's engine" "$released" $((32 << 20))
	pass "the CUDA engine released $released B of free device KV memory before the checkpoint"
fi

# --- restore: token for token, weights uploaded again from the mapping
criu_restore "$T/img-small" "${criu_opts[@]}"
grep -q "weights files present and verified" "$T/img-small/restore.log" ||
	fail "restore.log does not show the weights check"
if [ "$GPU" = 1 ]; then
	grep -q "kvmotion: GPU state of $small_pid resumed" "$T/img-small/restore.log" ||
		fail "the plugin did not resume the restored GPU state"
fi
wait_pid_gone "$small_pid" 120
cmp "$T/ref.out" "$T/small.out" || fail "token streams differ after the cooperative restore"
assert_eq "prefill steps (no recomputation)" "$(json_get "$T/small.json" prefill_steps)" "$ref_prefill"
assert_eq "restores seen by the engine" "$(json_get "$T/small.json" restores)" 1
pass "restored engine continued token for token ($ref_tokens tokens, no extra prefill)"
if [ "$GPU" = 1 ]; then
	# the pieces went before the checkpoint and came back at their addresses:
	# the tokens above ran on them (and on re-uploaded weights)
	json_check "$T/small.json" kv_device_released_bytes
	released=$(json_get "$T/small.json" kv_device_released_bytes)
	assert_ge "free device KV bytes released before the checkpoint" "$released" $((32 << 20))
	log "upload after the restore: $(json_get "$T/small.json" upload_ms) ms"
	pass "device KV pieces ($released B) released and mapped again across the restore"
fi

# The large model's steps are long (~0.3 s here): the quiesce stops one
# half-way, between two layers, and the rerun after the restore must give
# the same tokens as a run never stopped.
run "$ENGINE" --model "$large" "${args[@]}" --out "$T/ref-large.out" --quiet
criu_restore "$T/img-large" "${criu_opts[@]}"
wait_pid_gone "$large_pid" 300
cmp "$T/ref-large.out" "$T/large.out" || fail "token streams of the large model differ after the restore"
log "steps given up half-way by the quiesce: $(json_get "$T/large.json" steps_cancelled)"
pass "large model restored, token for token"

# --- the GPU's way: an uploaded copy, released at the quiesce, uploaded again
start_engine upload "$small" --coop-upload
upload_pid=$ENGINE_PID
criu_dump "$upload_pid" "$T/img-upload" "${criu_opts[@]}"
grep -q "kvmotion: split skipped: the weights of the cooperative engines" "$T/img-upload/dump.log" ||
	fail "the plugin split a cooperative dump (nothing to deduplicate in it)"
wait_pid_gone "$upload_pid"
u_bytes=$(image_bytes "$T/img-upload")
log "image with the uploaded copy released: $u_bytes B (not split: raw pages)"
if [ "$GPU" != 1 ]; then
	# 128 MiB of held KV and the CPU state; the 64 MiB copy would not fit
	assert_lt "image with the upload released" "$u_bytes" $(((128 + 32) << 20))
fi
criu_restore "$T/img-upload" "${criu_opts[@]}"
wait_pid_gone "$upload_pid" 120
cmp "$T/ref.out" "$T/upload.out" || fail "token streams differ after restoring the uploaded copy"
assert_eq "restores seen by the engine" "$(json_get "$T/upload.json" restores)" 1
upload_ms=$(json_get "$T/upload.json" upload_ms)
python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)' "$upload_ms" ||
	fail "the engine did not upload its weights again (upload_ms $upload_ms)"
pass "released copy uploaded again from the mapping in $upload_ms ms; tokens identical"

# --- free KV blocks add nothing
start_engine churn "$small" --coop --kv-mib 320 --kv-churn-mib 128
churn_pid=$ENGINE_PID
criu_dump "$churn_pid" "$T/img-churn" "${criu_opts[@]}"
[ "$GPU" = 1 ] && gpu_dump_checks "$T/img-churn" "$churn_pid"
wait_pid_gone "$churn_pid"
start_engine plainchurn "$small" --kv-mib 320 --kv-churn-mib 128
if [ "$GPU" = 1 ]; then
	# CRIU cannot dump a CUDA process without the plugin's checkpoint
	criu_dump "$ENGINE_PID" "$T/img-plainchurn" "${criu_opts[@]}"
else
	criu_dump "$ENGINE_PID" "$T/img-plainchurn"
fi
wait_pid_gone "$ENGINE_PID"
c_bytes=$(image_bytes "$T/img-churn")
p_bytes=$(image_bytes "$T/img-plainchurn")
log "128 MiB of freed KV blocks: cooperative image $c_bytes B, plain image $p_bytes B"
# both raw cooperative images of the small model at the same load
assert_lt "cooperative image with freed blocks vs without (+4 MiB)" "$c_bytes" $((u_bytes + (4 << 20)))
if [ "$GPU" = 1 ]; then
	# plain: the split image, whose compressed delta says little of what was
	# dumped; the dumped bytes are the delta's raw size plus the references
	# (the weights, 64 MiB, found in the store)
	inspect_json "$T/img-plainchurn" delta.raw_size bytes_referenced
	p_dumped=$(($(json_get "$T/img-plainchurn.json" delta.raw_size) + $(json_get "$T/img-plainchurn.json" bytes_referenced)))
	log "plain GPU dump: $p_dumped B dumped (delta raw + referenced)"
	assert_ge "plain GPU dump holds the freed blocks" "$p_dumped" $(((64 + 128 + 128) << 20))
	# 320 MiB pool, 128 MiB held: the 128 MiB churned and ~60 MiB never used, free
	released=$(device_released "$T/churn.log")
	[ -n "$released" ] || fail "the CUDA engine did not report its quiesce (churn.log)"
	assert_ge "free device KV bytes released with 128 MiB churned" "$released" $((160 << 20))
else
	# plain: weights + held KV + the freed blocks, all as raw pages
	assert_ge "plain image holds the freed blocks" "$p_bytes" $(((64 + 128 + 128) << 20))
fi
pass "freed KV blocks are not in the cooperative image"

# --- a missing or altered weights file: the restore refuses, nothing runs
mv "$weights_file" "$weights_file.away"
if "$CRIU" restore -D "$T/img-churn" -d -o restore-missing.log -v4 "${criu_opts[@]}"; then
	fail "restore went ahead without its weights file"
fi
grep -q "weights file.*$(basename "$weights_file").*missing\|$(basename "$weights_file").*No such file" \
	"$T/img-churn/restore-missing.log" || {
	km_criu_log_tail "$T/img-churn/restore-missing.log"
	fail "the refusal does not name the missing weights file"
}
grep -q "forking\|Forking task" "$T/img-churn/restore-missing.log" &&
	fail "CRIU created processes before the refusal"
pass "restore without its weights file refused, naming it"
mv "$weights_file.away" "$weights_file"
chmod u+w "$weights_file"
printf '\x5a' | dd of="$weights_file" bs=1 seek=$((3 << 20)) conv=notrunc status=none
chmod a-w "$weights_file"
if "$CRIU" restore -D "$T/img-churn" -d -o restore-altered.log -v4 "${criu_opts[@]}"; then
	fail "restore went ahead with an altered weights file"
fi
grep -q "does not hash to its name" "$T/img-churn/restore-altered.log" || {
	km_criu_log_tail "$T/img-churn/restore-altered.log"
	fail "the refusal does not say the weights file was altered"
}
pass "restore with an altered weights file refused"
rm -f "$weights_file" "$weights_file.ok"

# --- an engine that does not answer: the dump fails, the engine serves on
start_engine mute "$small" --coop
kill -STOP "$ENGINE_PID"
mkdir -p "$T/img-mute"
if KVMOTION_QUIESCE_TIMEOUT_MS=1000 "$CRIU" dump -t "$ENGINE_PID" -D "$T/img-mute" -o dump.log -v4 \
	"${criu_opts[@]}" 2>/dev/null; then
	fail "the dump succeeded although the engine never answered"
fi
grep -q "did not answer\|timed out" "$T/img-mute/dump.log" || {
	km_criu_log_tail "$T/img-mute/dump.log"
	fail "dump.log does not say the engine did not answer"
}
kill -CONT "$ENGINE_PID"
kill -0 "$ENGINE_PID" || fail "the engine died"
wait_pid_gone "$ENGINE_PID" 120
cmp "$T/ref.out" "$T/mute.out" || fail "the engine's tokens changed after the failed quiesce"
pass "unanswered quiesce: dump failed, engine went on and finished its $ref_tokens tokens"
