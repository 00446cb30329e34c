#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The test engine (tests/engine) dumped mid-generation by CRIU with
# kvmotion's plugin and restored: the token stream is identical to that of an
# engine that never stopped, its counters show no extra prefill (the KV cache
# came back, nothing was recomputed), the image holds no raw pages file, the
# weights are referenced from the store rather than copied, and the delta is
# smaller than the engine's live dynamic memory. The status socket answers
# after the restore.
#
# With KM_REQUIRE_GPU=1 and KM_ENGINE=engine-cuda it is the real-GPU check:
# the CUDA engine under the real driver, the plugin locking, checkpointing,
# restoring and unlocking it through libcuda. Without a GPU that check
# reports SKIP; the same plugin logic runs against the libcuda test double in
# criu_plugin.sh (case h) and tests/unit/test_gpu.c.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init

engine_test_init "the CUDA engine's dump and restore through the real driver run only on a GPU host; the plugin's GPU state machine is tested against the libcuda test double (criu_plugin.sh case h, test_gpu)"

T=$KM_TMP
model=$T/model.safetensors
store=$T/store
sock=kvmotion-test-engine-$$
args=(--model "$model" --seqs 4 --total-seqs 8 --prompt-len 24 --max-new 40 --kv-mib 32 --seed 3)

run "$MKMODEL" "$model" --size $((24 << 20)) --seed 5
weights=$(file_size "$model")
run "$KVMOTION" seed "$model" --store "$store" --no-sync
export KVMOTION_STORE=$store KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null
# The GPU freeze (lock + checkpoint) must fit in CRIU's --timeout.
criu_gpu_opts=()
[ "$GPU" = 1 ] && criu_gpu_opts=(--timeout 120) && export KVMOTION_LOCK_TIMEOUT_MS=60000

# The reference: the same engine, never stopped.
run "$ENGINE" "${args[@]}" --out "$T/ref.out" --status-file "$T/ref.json"
ref_tokens=$(json_get "$T/ref.json" tokens_generated)
ref_prefill=$(json_get "$T/ref.json" prefill_steps)
log "reference: $ref_tokens tokens, $ref_prefill prefill steps"

setsid "$ENGINE" "${args[@]}" --out "$T/live.out" --status-file "$T/live.json" \
	--status-socket "$sock" --step-delay-ms 25 </dev/null >"$T/engine.log" 2>&1 &
pid=$!
disown "$pid"
KM_PIDS+=("$pid")
for _ in $(seq 200); do
	[ -s "$T/live.json" ] && [ "$(json_get "$T/live.json" tokens_generated)" -ge 60 ] && break
	sleep 0.05
done
before=$(json_get "$T/live.json" tokens_generated)
[ "$before" -ge 60 ] || fail "the engine did not get going ($before tokens)"
[ "$before" -lt "$ref_tokens" ] || fail "the engine finished before the dump"
rss=$(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$pid/status")

criu_dump "$pid" "$T/img" -L "$PLUGIN_DIR" "${criu_gpu_opts[@]}"
wait_pid_gone "$pid"
grep -q 'kvmotion: split' "$T/img/dump.log" || fail "dump.log has no split line"
if compgen -G "$T/img/pages-*.img" >/dev/null; then
	fail "the split image still holds a raw pages file"
fi
pass "no pages-*.img after the dump"
"$KVMOTION" inspect "$T/img" --json >"$T/inspect.json"
referenced=$(json_get "$T/inspect.json" bytes_referenced)
delta=$(json_get "$T/inspect.json" delta.compressed_size)
dynamic=$((rss - weights))
log "weights $weights B, referenced $referenced B; delta $delta B; RSS $rss B, dynamic $dynamic B"
assert_ge "weights referenced from the store" "$referenced" $((weights * 9 / 10))
if [ "$GPU" = 1 ]; then
	# GPU memory came into the image through the checkpoint: the host RSS
	# before the dump does not count it. The weights must still be referenced.
	grep -q 'kvmotion: GPU state of' "$T/img/dump.log" || fail "the plugin did not checkpoint the GPU"
	assert_lt "delta vs the weights" "$delta" $((weights / 4))
else
	assert_lt "delta vs the live dynamic memory" "$delta" "$dynamic"
fi
assert_lt "image bytes vs the weights" "$(du -sb --apparent-size "$T/img" | cut -f1)" "$weights"
pass "weights referenced ($referenced B), delta $delta B < dynamic $dynamic B"

criu_restore "$T/img" -L "$PLUGIN_DIR" "${criu_gpu_opts[@]}"
grep -q 'kvmotion: joined' "$T/img/restore.log" || fail "restore.log has no join line"
"$ENGINE" --query "$sock" >"$T/query.json" || fail "the status socket does not answer after the restore"
json_check "$T/query.json" tokens_generated
pass "status socket answers after the restore: $(cat "$T/query.json")"
wait_pid_gone "$pid" 120

cmp "$T/ref.out" "$T/live.out" || fail "token streams differ"
pass "token stream identical to the uninterrupted run ($(wc -l <"$T/live.out") tokens)"
assert_eq "tokens generated" "$(json_get "$T/live.json" tokens_generated)" "$ref_tokens"
assert_eq "prefill steps (no recomputation)" "$(json_get "$T/live.json" prefill_steps)" "$ref_prefill"
pass "counters equal the reference: no extra prefill"
