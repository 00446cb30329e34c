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
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init

ENGINE=${KM_ENGINE:-$KM_BUILD_DIR/tests/engine/engine}
PLUGIN_DIR=${KM_PLUGIN_DIR:-$KM_BUILD_DIR/criu-hooks}
[ -x "$ENGINE" ] || fail "$ENGINE is missing: build the project first"
[ -f "$PLUGIN_DIR/kvmotion.so" ] || skip "the CRIU plugin was not built (no criu-plugin.h)"

T=$KM_TMP
store=$T/store
export KVMOTION_STORE=$store KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null
run "$KVMOTION" store init "$store" --no-sync
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
		--step-delay-ms 40 "$@" </dev/null >"$T/$name.log" 2>&1 &
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

# --- image size does not depend on the model size
start_engine small "$small" --coop
small_pid=$ENGINE_PID
criu_dump "$small_pid" "$T/img-small" -L "$PLUGIN_DIR"
grep -q "kvmotion: engine in pid $small_pid quiesced" "$T/img-small/dump.log" ||
	fail "the plugin did not quiesce the engine"
[ -f "$T/img-small/kvmotion.engines" ] || fail "no kvmotion.engines in the image"
grep -q "kvmotion: split skipped: the weights of the cooperative engines" "$T/img-small/dump.log" ||
	fail "the plugin split a cooperative dump (nothing to deduplicate in it)"
wait_pid_gone "$small_pid"
# no delay between its steps: the quiesce nearly always finds it computing
start_engine large "$large" --coop --step-delay-ms 0
large_pid=$ENGINE_PID
criu_dump "$large_pid" "$T/img-large" -L "$PLUGIN_DIR"
wait_pid_gone "$large_pid"
s_bytes=$(image_bytes "$T/img-small")
l_bytes=$(image_bytes "$T/img-large")
log "cooperative images: 64 MiB model $s_bytes B, 512 MiB model $l_bytes B"
diff=$((l_bytes > s_bytes ? l_bytes - s_bytes : s_bytes - l_bytes))
assert_lt "image size difference x20" $((diff * 20)) "$s_bytes"
assert_lt "image of the 512 MiB model vs its weights" "$l_bytes" $((256 << 20))
pass "image sizes differ by $diff B (< 5%), no weights in either"

# --- restore: token for token, weights uploaded again from the mapping
criu_restore "$T/img-small" -L "$PLUGIN_DIR"
grep -q "weights files present and verified" "$T/img-small/restore.log" ||
	fail "restore.log does not show the weights check"
wait_pid_gone "$small_pid" 120
cmp "$T/ref.out" "$T/small.out" || fail "token streams differ after the cooperative restore"
assert_eq "prefill steps (no recomputation)" "$(json_get "$T/small.json" prefill_steps)" "$ref_prefill"
assert_eq "restores seen by the engine" "$(json_get "$T/small.json" restores)" 1
pass "restored engine continued token for token ($ref_tokens tokens, no extra prefill)"

# The large model's steps are long (~0.3 s here): the quiesce stops one
# half-way, between two layers, and the rerun after the restore must give
# the same tokens as a run never stopped.
run "$ENGINE" --model "$large" "${args[@]}" --out "$T/ref-large.out" --quiet
criu_restore "$T/img-large" -L "$PLUGIN_DIR"
wait_pid_gone "$large_pid" 300
cmp "$T/ref-large.out" "$T/large.out" || fail "token streams of the large model differ after the restore"
log "steps given up half-way by the quiesce: $(json_get "$T/large.json" steps_cancelled)"
pass "large model restored, token for token"

# --- the GPU's way: an uploaded copy, released at the quiesce, uploaded again
start_engine upload "$small" --coop-upload
upload_pid=$ENGINE_PID
criu_dump "$upload_pid" "$T/img-upload" -L "$PLUGIN_DIR"
wait_pid_gone "$upload_pid"
u_bytes=$(image_bytes "$T/img-upload")
log "image with the uploaded copy released: $u_bytes B"
assert_lt "image with a released upload vs in place (+4 MiB)" "$u_bytes" $((s_bytes + (4 << 20)))
criu_restore "$T/img-upload" -L "$PLUGIN_DIR"
wait_pid_gone "$upload_pid" 120
cmp "$T/ref.out" "$T/upload.out" || fail "token streams differ after restoring the uploaded copy"
assert_eq "restores seen by the engine" "$(json_get "$T/upload.json" restores)" 1
upload_ms=$(json_get "$T/upload.json" upload_ms)
python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)' "$upload_ms" ||
	fail "the engine did not upload its weights again (upload_ms $upload_ms)"
pass "released copy uploaded again from the mapping in $upload_ms ms; tokens identical"

# --- free KV blocks add nothing
start_engine churn "$small" --coop --kv-mib 320 --kv-churn-mib 128
criu_dump "$ENGINE_PID" "$T/img-churn" -L "$PLUGIN_DIR"
wait_pid_gone "$ENGINE_PID"
start_engine plainchurn "$small" --kv-mib 320 --kv-churn-mib 128
criu_dump "$ENGINE_PID" "$T/img-plainchurn"
wait_pid_gone "$ENGINE_PID"
c_bytes=$(image_bytes "$T/img-churn")
p_bytes=$(image_bytes "$T/img-plainchurn")
log "128 MiB of freed KV blocks: cooperative image $c_bytes B, plain image $p_bytes B"
assert_lt "cooperative image with freed blocks vs without (+4 MiB)" "$c_bytes" $((s_bytes + (4 << 20)))
# plain: weights + held KV + the freed blocks, all as raw pages
assert_ge "plain image holds the freed blocks" "$p_bytes" $(((64 + 128 + 128) << 20))
pass "freed KV blocks are not in the cooperative image"

# --- a missing or altered weights file: the restore refuses, nothing runs
mv "$weights_file" "$weights_file.away"
if "$CRIU" restore -D "$T/img-churn" -d -o restore-missing.log -v4 -L "$PLUGIN_DIR"; then
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
if "$CRIU" restore -D "$T/img-churn" -d -o restore-altered.log -v4 -L "$PLUGIN_DIR"; then
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
	-L "$PLUGIN_DIR" 2>/dev/null; then
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
