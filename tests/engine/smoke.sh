#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The engine's quick check (meson test engine-smoke, suite 'engine'):
#  - two runs with the same arguments write identical token streams, and the
#    status counters agree with the stream and the arguments;
#  - the tokens do not depend on the batch (sequences, prefill chunk), the
#    KV block size, a KV pool so small that sequences wait for blocks, or
#    the thread count;
#  - the status socket (path and abstract), the status file and --query
#    work while it runs, and the weights are not mapped from the model file;
#  - malformed model files and bad options are refused with a clear error.
#
# Paths from the environment (tests/engine/meson.build): ENGINE, MKMODEL.
# Run by hand: ENGINE=build/tests/engine/engine MKMODEL=build/tests/helpers/mkmodel
#   bash tests/engine/smoke.sh   (KEEP_TMP=1 keeps the temporary directory)
set -euo pipefail

ENGINE=${ENGINE:?set ENGINE to the engine binary}
MKMODEL=${MKMODEL:?set MKMODEL to the mkmodel binary}
T=$(mktemp -d "${TMPDIR:-/tmp}/engine-smoke.XXXXXX")
bg_pid=""

cleanup() {
	local rc=$?
	if [ -n "$bg_pid" ] && grep -qsx engine "/proc/$bg_pid/comm"; then
		kill "$bg_pid" 2>/dev/null || true
	fi
	if [ "${KEEP_TMP:-0}" = 1 ]; then echo "# kept $T"; else rm -rf "$T"; fi
	exit "$rc"
}
trap cleanup EXIT

pass() { printf 'PASS: %s\n' "$*"; }
fail() {
	printf 'FAIL: %s\n' "$*"
	exit 1
}
# The value of a top-level number or string in a one-line JSON object.
json_get() { # file key
	sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" "$1"
}
expect_eq() { # what got want
	[ "$2" = "$3" ] || fail "$1: $2, expected $3"
}

model=$T/model.safetensors
# GQA (4 query heads over 2 KV heads), a head size of 32, 4 layers.
"$MKMODEL" "$model" --size 3M --dim 128 --heads 4 --kv-heads 2 --layers 4 --seed 9
seqs=4 total=10 plen=12 maxnew=20
args=(--model "$model" --total-seqs "$total" --prompt-len "$plen" --max-new "$maxnew" --seed 5 --quiet)

# 1. Two identical runs.
"$ENGINE" "${args[@]}" --seqs $seqs --out "$T/a.out" --status-file "$T/a.json"
"$ENGINE" "${args[@]}" --seqs $seqs --out "$T/b.out" --status-file "$T/b.json"
cmp "$T/a.out" "$T/b.out" || fail "two runs with the same arguments differ"
lines=$(wc -l <"$T/a.out")
expect_eq "output lines" "$lines" $((total * maxnew))
grep -qvE '^seq=[0-9]+ pos=[0-9]+ tok=[0-9]+$' "$T/a.out" && fail "malformed output line"
pass "two runs write the same $lines tokens"

# Counters against the stream and the arguments.
if command -v python3 >/dev/null 2>&1; then
	python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$T/a.json" ||
		fail "the status file is not JSON: $(cat "$T/a.json")"
fi
expect_eq "state" "$(json_get "$T/a.json" state)" "done"
expect_eq "tokens_generated" "$(json_get "$T/a.json" tokens_generated)" "$lines"
expect_eq "prefill_steps" "$(json_get "$T/a.json" prefill_steps)" $((total * plen))
expect_eq "decode_steps" "$(json_get "$T/a.json" decode_steps)" $((total * (maxnew - 1)))
expect_eq "sequences_done" "$(json_get "$T/a.json" sequences_done)" $total
expect_eq "sequences_started" "$(json_get "$T/a.json" sequences_started)" $total
expect_eq "kv_blocks_used at the end" "$(json_get "$T/a.json" kv_blocks_used)" 0
[ "$(json_get "$T/a.json" kv_blocks_total)" -gt 0 ] || fail "kv_blocks_total is 0"
expect_eq "second run's status" "$(sed 's/"pid":[0-9]*//' "$T/b.json")" \
	"$(sed 's/"pid":[0-9]*//' "$T/a.json")"
for s in $(seq 0 $((total - 1))); do
	n=$(grep -c "^seq=$s " "$T/a.out")
	expect_eq "tokens of sequence $s" "$n" $maxnew
	first=$(grep -m1 "^seq=$s " "$T/a.out" | sed 's/.*pos=\([0-9]*\).*/\1/')
	expect_eq "first position of sequence $s" "$first" $plen
done
pass "counters agree: $lines tokens, $((total * plen)) prefill, $((total * (maxnew - 1))) decode"

# 2. The same tokens per sequence whatever the batching, blocks or threads.
sort "$T/a.out" >"$T/a.sorted"
variant() { # name, extra arguments...
	local name=$1
	shift
	rm -f "$T/v.out"
	"$ENGINE" "${args[@]}" --out "$T/v.out" --status-file "$T/v.json" "$@" ||
		fail "$name: the engine failed"
	sort "$T/v.out" | cmp -s - "$T/a.sorted" || fail "$name: tokens differ from the reference"
	expect_eq "$name: prefill_steps" "$(json_get "$T/v.json" prefill_steps)" $((total * plen))
	pass "$name: same tokens"
}
variant "one sequence at a time" --seqs 1
variant "3 sequences, prefill chunks of 5, blocks of 4 tokens" --seqs 3 --prefill-chunk 5 \
	--block-tokens 4
variant "batch cap of 7 tokens" --seqs 4 --max-batch 7
# blocks of 512 tokens (512 KiB here): a 1 MiB pool holds 2, a sequence needs 1
variant "sequences waiting for KV blocks" --seqs 6 --block-tokens 512 --kv-mib 1
variant "2 threads" --seqs $seqs --threads 2
variant "3 threads, 5 sequences" --seqs 5 --threads 3

# 3. Status while it runs: socket at a path, abstract socket, status file.
sock=$T/status.sock
name=engine-smoke-$$
"$ENGINE" --model "$model" --out "$T/live.out" --seqs 2 --total-seqs 0 --prompt-len 4 \
	--max-new 8 --step-delay-ms 20 --status "$sock" --status-socket "$name" \
	--status-file "$T/live.json" </dev/null >"$T/live.log" 2>&1 &
bg_pid=$!
for _ in $(seq 100); do
	[ -S "$sock" ] && [ -s "$T/live.out" ] && break
	sleep 0.05
done
[ -S "$sock" ] || fail "no status socket at $sock: $(cat "$T/live.log")"
"$ENGINE" --query "$sock" >"$T/q1.json" || fail "--query $sock failed"
"$ENGINE" --query "$name" >"$T/q2.json" || fail "--query @$name failed"
expect_eq "state while running" "$(json_get "$T/q1.json" state)" running
expect_eq "pid in the status" "$(json_get "$T/q2.json" pid)" "$bg_pid"
[ "$(json_get "$T/q1.json" kv_blocks_used)" -gt 0 ] || fail "no KV block in use while running"
t1=$(json_get "$T/q1.json" tokens_generated)
sleep 0.3
"$ENGINE" --query "$sock" >"$T/q3.json"
t3=$(json_get "$T/q3.json" tokens_generated)
[ "$t3" -gt "$t1" ] || fail "tokens_generated does not grow ($t1, then $t3)"
[ "$(json_get "$T/live.json" pid)" = "$bg_pid" ] || fail "the status file is not the engine's"
# clients that connect and leave before the answer must not hurt the engine (SIGPIPE)
if command -v python3 >/dev/null 2>&1; then
	python3 -c '
import socket, sys
for _ in range(20):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.close()' "$sock"
	sleep 0.1
	"$ENGINE" --query "$sock" >/dev/null || fail "the engine died after clients went away"
fi
if grep -qF "$model" "/proc/$bg_pid/maps"; then
	fail "the model file is mapped: the weights must be copied into anonymous memory"
fi
kill "$bg_pid"
wait "$bg_pid" 2>/dev/null || true
bg_pid=""
pass "status socket (path and abstract) and status file answer while running ($t1 -> $t3 tokens); weights not file-mapped"

# 4. Refusals, each with its reason.
refuse() { # what, expected message part, arguments...
	local what=$1 want=$2 rc=0
	shift 2
	"$ENGINE" "$@" >"$T/err.out" 2>&1 || rc=$?
	[ "$rc" != 0 ] || fail "$what: accepted"
	grep -qF -- "$want" "$T/err.out" || fail "$what: expected '$want', got: $(cat "$T/err.out")"
	pass "$what: refused ($(head -n1 "$T/err.out"))"
}
le64() { # the 8 bytes of a little-endian u64
	local i
	for i in 0 1 2 3 4 5 6 7; do
		# shellcheck disable=SC2059
		printf "\\x$(printf %02x $((($1 >> (8 * i)) & 255)))"
	done
}
mkst() { # file, JSON header, data bytes
	{
		le64 ${#2}
		printf '%s' "$2"
		head -c "$3" /dev/zero
	} >"$1"
}
bad=$T/bad.safetensors
run_bad() { # what, expected message part
	refuse "$1" "$2" --model "$bad" --out "$T/bad.out" --quiet
}
: >"$bad"
run_bad "empty model file" "too short"
mkst "$bad" '{}' 0
printf 'xxxxxxxx' | dd of="$bad" bs=1 seek=0 conv=notrunc status=none
run_bad "header length beyond the file" "does not fit"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}' 4
run_bad "unterminated object" "malformed safetensors header"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},}' 4
run_bad "trailing comma" "expected a string"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,400]}}' 4
run_bad "offsets outside the file" "outside"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}' 4
run_bad "size not matching the shape" "elements"
mkst "$bad" '{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,4]}}' 4
run_bad "unknown dtype" "unknown dtype"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}}' 8
run_bad "duplicate tensor" "duplicate tensor"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[-2],"data_offsets":[0,4]}}' 4
run_bad "negative dimension" "non-negative integer"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}' 6
run_bad "bytes after the last tensor" "after the last tensor"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}} x' 4
run_bad "trailing bytes after the header" "trailing bytes"
mkst "$bad" '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}' 4
run_bad "no config in __metadata__" "kvmotion.layers"
head -c -2 "$model" >"$bad"
run_bad "truncated model file" "outside"
# the real header with one tensor renamed: the loader names the missing one
python_free_rename() {
	local hl
	hl=$(od -An -t u8 -N 8 "$model" | tr -d ' ')
	{
		head -c 8 "$model"
		head -c $((8 + hl)) "$model" | tail -c "$hl" | sed 's/model\.norm\.weight/model.norX.weight/'
		tail -c +$((9 + hl)) "$model"
	} >"$bad"
}
python_free_rename
run_bad "missing tensor" "tensor model.norm.weight is missing"
refuse "missing model file" "cannot open the model" --model "$T/nope" --out "$T/x.out"
refuse "bad number" "--seqs: 'x' is not an integer" --model "$model" --out "$T/x.out" --seqs x
refuse "KV pool smaller than one sequence" "one sequence needs 9 KV blocks" --model "$model" \
	--out "$T/x.out" --block-tokens 512 --kv-mib 1 --prompt-len 4000 --max-new 200
refuse "KV pool smaller than one block" "holds no KV block" --model "$model" --out "$T/x.out" \
	--block-tokens 4096 --kv-mib 1
refuse "no --out" "--model and --out are required" --model "$model"

echo "engine smoke test: all checks passed"
