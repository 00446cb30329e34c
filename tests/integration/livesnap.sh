#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The live snapshot (`kvmotion snapshot`, plugin/livesnap.c) against the real
# CRIU, on the test engine (two threads, KV blocks filled):
#   - taken while the engine generates: the engine is not stopped, and its
#     token stream stays identical to a run without snapshots;
#   - of the engine stopped with SIGSTOP, it matches a `criu dump
#     --leave-running` of the same stopped engine: the same pagemap file
#     names (one per process, threads share it), the same pages at the same
#     addresses, byte-identical, with the same PE_* flags (tests/helpers/
#     pagecmp), but for the threads' rseq areas, which the kernel updates
#     when a thread is scheduled. CRIU dumps first: its code injection
#     copies a page of the engine's text on write, which a snapshot taken
#     before would not hold.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init
ENGINE=${KM_ENGINE:-$KM_BUILD_DIR/tests/engine/engine}
PAGECMP=${KM_PAGECMP:-$KM_BUILD_DIR/tests/helpers/pagecmp}
[ -x "$ENGINE" ] || fail "$ENGINE is missing: build the project first"
[ -x "$PAGECMP" ] || fail "$PAGECMP is missing: build the project first"

T=$KM_TMP
model=$T/model.safetensors
args=(--model "$model" --seqs 4 --total-seqs 16 --prompt-len 24 --max-new 60 --kv-mib 64
	--kv-fill-mib 32 --threads 2 --seed 3)
run "$MKMODEL" "$model" --size $((32 << 20)) --seed 5

run "$ENGINE" "${args[@]}" --out "$T/ref.out" --status-file "$T/ref.json"
ref_tokens=$(json_get "$T/ref.json" tokens_generated)

setsid "$ENGINE" "${args[@]}" --out "$T/live.out" --status-file "$T/live.json" \
	--step-delay-ms 20 </dev/null >"$T/engine.log" 2>&1 &
pid=$!
disown "$pid"
KM_PIDS+=("$pid")
for _ in $(seq 200); do
	[ -s "$T/live.json" ] && [ "$(json_get "$T/live.json" tokens_generated)" -ge 40 ] && break
	sleep 0.05
done
[ "$(json_get "$T/live.json" tokens_generated)" -ge 40 ] || fail "the engine did not get going"

# --- while it runs -------------------------------------------------------------
for i in 1 2 3; do
	before=$(json_get "$T/live.json" tokens_generated)
	"$KVMOTION" snapshot --pid "$pid" "$T/run$i" --json >"$T/run$i.json" ||
		fail "kvmotion snapshot of the running engine failed"
	state=$(awk '/^State:/ { print $2 }' "/proc/$pid/status")
	[ "$state" != T ] || fail "the engine is stopped after a live snapshot"
	assert_eq "pagemap files (one process, two threads)" "$(find "$T/run$i" -name 'pagemap-*.img' | wc -l)" 1
	[ -f "$T/run$i/pagemap-$pid.img" ] && [ -f "$T/run$i/pages-1.img" ] ||
		fail "snapshot files: $(ls "$T/run$i")"
	assert_ge "pages bytes (weights and KV)" "$(json_get "$T/run$i.json" bytes)" $((64 << 20))
	log "snapshot $i at $before tokens: $(cat "$T/run$i.json")"
	rm -rf "$T/run$i"
	sleep 0.3
done
after=$(json_get "$T/live.json" tokens_generated)
[ "$after" -lt "$ref_tokens" ] || fail "the engine finished before the stopped comparison"
pass "3 live snapshots of the running engine, which kept generating ($after tokens)"

# --- the stopped engine: CRIU and the live snapshot --------------------------
kill -STOP "$pid"
for _ in $(seq 100); do
	[ "$(awk '/^State:/ { print $2 }' "/proc/$pid/status")" = T ] && break
	sleep 0.02
done
criu_dump "$pid" "$T/criu" --leave-running
"$KVMOTION" snapshot --pid "$pid" "$T/live" --json >"$T/live-snap.json"
log "live snapshot: $(cat "$T/live-snap.json")"
criu_names=$(cd "$T/criu" && ls pagemap-*.img pages-*.img | sort | tr '\n' ' ')
live_names=$(cd "$T/live" && ls | sort | tr '\n' ' ')
assert_eq "file names" "$live_names" "$criu_names"
# The kernel writes each thread's CPU number into its rseq area whenever it
# is scheduled, stopped or not, and CRIU's ptrace calls wake the threads:
# those 32 bytes (CRIU's dump.log names them) may differ, nothing else.
ignore=()
for a in $(sed -n 's/.*Dump rseq of [0-9]*: ptr = \(0x[0-9a-f]*\).*/\1/p' "$T/criu/dump.log"); do
	ignore+=(--ignore "$a:32")
done
log "rseq areas left out of the comparison: ${ignore[*]:-none}"
"$PAGECMP" "${ignore[@]}" "$T/live" "$T/criu" >"$T/pagecmp.out" 2>&1 || {
	cat "$T/pagecmp.out"
	fail "the live snapshot differs from criu dump's pages"
}
cat "$T/pagecmp.out"
pages=$(json_get "$T/live-snap.json" pages)
assert_eq "pages (criu's pages-1.img)" $((pages * 4096)) "$(file_size "$T/criu/pages-1.img")"
pass "the stopped engine: live snapshot = criu dump --leave-running ($live_names; $pages pages, bytes and flags identical)"

# the comparison can fail: one byte changed in the live copy
printf 'X' | dd of="$T/live/pages-1.img" bs=1 seek=$((pages * 4096 / 2)) conv=notrunc status=none
if "$PAGECMP" "$T/live" "$T/criu" >/dev/null 2>&1; then
	fail "pagecmp did not see a changed byte"
fi

kill -CONT "$pid"
wait_pid_gone "$pid" 120
cmp "$T/ref.out" "$T/live.out" || fail "token streams differ"
assert_eq "tokens generated" "$(json_get "$T/live.json" tokens_generated)" "$ref_tokens"
pass "token stream identical to a run without snapshots ($ref_tokens tokens)"
