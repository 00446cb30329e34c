#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The engine is CRIU-restorable (meson test criu_engine, suite 'integration'):
# started detached (setsid, stdin /dev/null, output to a file), dumped by
# the real CRIU mid-generation (`criu dump` kills it) and restored
# (`criu restore -d`), twice in one run, it writes exactly the token stream of
# an uninterrupted engine with the same arguments, and its final counters
# equal the reference's: prefill_steps above all (the KV cache came back,
# no prompt was recomputed). The status socket at a path, the abstract one
# and the status file all work after each restore. The image holds the
# weights (anonymous memory, not a file mapping). Then the same with
# --threads 2 (a multi-threaded engine).
#
# No kvmotion plugin here: plain CRIU. Needs root (77 otherwise) and a
# working CRIU: $KM_CRIU, else $KM_SOURCE_DIR/.deps/bin/criu (scripts/setup.sh),
# else criu on PATH. Paths: ENGINE, MKMODEL (tests/engine/meson.build).
# KEEP_TMP=1 keeps the temporary directory with the images and logs.
set -euo pipefail

skip() {
	printf 'SKIP: criu_engine: %s\n' "$*"
	exit 77
}
pass() { printf 'PASS: %s\n' "$*"; }
log() { printf '# %s\n' "$*"; }

[ "$(id -u)" = 0 ] || skip "needs root: CRIU dumps and restores processes"
ENGINE=${ENGINE:?set ENGINE to the engine binary}
MKMODEL=${MKMODEL:?set MKMODEL to the mkmodel binary}
SRC=${KM_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
CRIU=${KM_CRIU:-$SRC/.deps/bin/criu}
if [ ! -x "$CRIU" ]; then
	if [ -n "${KM_CRIU:-}" ] || ! command -v criu >/dev/null 2>&1; then
		skip "no CRIU at $CRIU (run scripts/setup.sh, or set KM_CRIU)"
	fi
	CRIU=$(command -v criu)
fi
if ! out=$("$CRIU" check 2>&1); then
	printf '%s\n' "$out" | tail -n 5
	skip "'$CRIU check' fails: CRIU cannot work on this machine"
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/criu-engine.XXXXXX")
pids=()
cur_img=""

cleanup() {
	local rc=$? pid
	set +e
	for pid in "${pids[@]}"; do
		# only what is still an engine: the pid may have been reused
		grep -qsx engine "/proc/$pid/comm" && kill -KILL "$pid" 2>/dev/null
	done
	if [ "${KEEP_TMP:-0}" = 1 ]; then echo "# kept $T"; else rm -rf "$T"; fi
	exit "$rc"
}
trap cleanup EXIT

criu_logs() {
	local f
	[ -n "$cur_img" ] || return 0
	for f in "$cur_img"/dump.log "$cur_img"/restore.log; do
		[ -f "$f" ] || continue
		echo "--- last lines of $f"
		grep -E 'Error|error|Warn' "$f" | tail -n 20
		tail -n 30 "$f"
	done
}
fail() {
	printf 'FAIL: criu_engine: %s\n' "$*"
	criu_logs
	[ -f "${engine_log:-}" ] && { echo "--- engine log"; cat "$engine_log"; }
	exit 1
}
json_get() { # file key: a top-level number or string of a one-line JSON object
	sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" "$1"
}
# Gone from /proc, zombie included: CRIU cannot restore a pid still taken
# ("Can't fork for PID: File exists"). A restored engine's parent is init,
# which may take a few seconds to reap it here.
wait_gone() { # pid [seconds]
	for _ in $(seq $((${2:-60} * 20))); do
		[ -e "/proc/$1" ] || return 0
		sleep 0.05
	done
	fail "pid $1 still there after ${2:-60} s"
}
wait_tokens() { # status file, at least this many tokens
	local n
	for _ in $(seq 600); do
		n=$(json_get "$1" tokens_generated 2>/dev/null || true)
		[ -n "$n" ] && [ "$n" -ge "$2" ] && return 0
		sleep 0.02
	done
	fail "the engine did not reach $2 tokens (status: $(cat "$1" 2>/dev/null))"
}

model=$T/model.safetensors
"$MKMODEL" "$model" --size 8M --heads 4 --kv-heads 2 --seed 3
weights=$(stat -c %s "$model")

# name, extra engine arguments...
scenario() {
	local name=$1 pid cycle before after total ref_prefill lines pages sock abs
	shift
	local dir=$T/$name
	local args=(--model "$model" --seqs 4 --total-seqs 8 --prompt-len 24 --max-new 48
		--kv-mib 16 --seed 7 --quiet "$@")
	mkdir -p "$dir"
	engine_log=$dir/engine.log
	sock=$dir/status.sock
	abs=kvmotion-criu-engine-$$-$name

	# The reference: the same arguments, never stopped.
	"$ENGINE" "${args[@]}" --out "$dir/ref.out" --status-file "$dir/ref.json"
	total=$(json_get "$dir/ref.json" tokens_generated)
	ref_prefill=$(json_get "$dir/ref.json" prefill_steps)
	log "$name: reference $total tokens, $ref_prefill prefill steps"

	setsid "$ENGINE" "${args[@]}" --out "$dir/live.out" --status-file "$dir/live.json" \
		--status "$sock" --status-socket "$abs" --step-delay-ms 30 </dev/null \
		>"$engine_log" 2>&1 &
	pid=$!
	disown "$pid" # bash still reaps it; no job notice when CRIU kills it
	pids+=("$pid")
	grep -qsx engine "/proc/$pid/comm" || sleep 0.1
	grep -qsx engine "/proc/$pid/comm" || fail "$name: pid $pid is not the engine"

	for cycle in 1 2; do
		cur_img=$dir/img$cycle
		mkdir -p "$cur_img"
		wait_tokens "$dir/live.json" $((total * cycle / 3))
		"$ENGINE" --query "$sock" >"$dir/before$cycle.json" ||
			fail "$name: the status socket does not answer before dump $cycle"
		[ "$(json_get "$dir/before$cycle.json" state)" = running ] ||
			fail "$name: the engine finished before dump $cycle"

		"$CRIU" dump -t "$pid" -D "$cur_img" -o dump.log -v4 ||
			fail "$name: criu dump $cycle failed"
		wait_gone "$pid"
		before=$(wc -l <"$dir/live.out")
		[ "$before" -lt "$total" ] || fail "$name: finished before dump $cycle"
		pages=$(cat "$cur_img"/pages-*.img | wc -c)
		[ "$pages" -ge "$weights" ] ||
			fail "$name: the image has $pages bytes of pages, less than the $weights bytes of weights"
		pass "$name: dump $cycle at $before/$total tokens, $pages bytes of pages (weights $weights)"

		"$CRIU" restore -D "$cur_img" -d -o restore.log -v4 ||
			fail "$name: criu restore $cycle failed"
		grep -qsx engine "/proc/$pid/comm" || fail "$name: no engine at pid $pid after restore $cycle"
		"$ENGINE" --query "$sock" >"$dir/after$cycle.json" ||
			fail "$name: the status socket at $sock does not answer after restore $cycle"
		"$ENGINE" --query "$abs" >/dev/null ||
			fail "$name: the abstract status socket @$abs does not answer after restore $cycle"
		after=$(json_get "$dir/after$cycle.json" tokens_generated)
		[ "$after" -ge "$before" ] || fail "$name: tokens went back from $before to $after"
		[ "$(json_get "$dir/after$cycle.json" prefill_steps)" -le "$ref_prefill" ] ||
			fail "$name: prefill_steps beyond the reference after restore $cycle"
		pass "$name: restore $cycle: status sockets answer ($after tokens)"
	done

	wait_gone "$pid" 120
	cur_img=""
	lines=$(wc -l <"$dir/live.out")
	cmp "$dir/ref.out" "$dir/live.out" ||
		fail "$name: token streams differ (reference $total lines, restored run $lines)"
	pass "$name: token stream identical to the uninterrupted run ($lines tokens)"
	[ "$(json_get "$dir/live.json" state)" = "done" ] || fail "$name: the status file does not say done"
	for k in tokens_generated prefill_steps decode_steps sequences_done kv_blocks_used; do
		[ "$(json_get "$dir/live.json" "$k")" = "$(json_get "$dir/ref.json" "$k")" ] ||
			fail "$name: $k is $(json_get "$dir/live.json" "$k"), the reference's $(json_get "$dir/ref.json" "$k")"
	done
	pass "$name: final counters equal the reference's: prefill_steps $ref_prefill (no recomputation)"
	[ ! -e "$sock" ] || fail "$name: the engine left its socket file behind"
}

scenario single
scenario threads --threads 2
echo "criu_engine: all checks passed"
