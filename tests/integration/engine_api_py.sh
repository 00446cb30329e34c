#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Cooperative mode end to end without CRIU: a Python engine on the ctypes
# binding (engine_api_py.py) maps seeded weights, registers a KV pool and is
# driven by `kvmotion engine status|quiesce|resume --pid`; the callbacks'
# effects are read back from its event log. Then the same across network
# namespaces (root only): the engine in its own (unshare -n) with the CLI
# outside, and the CLI in its own with the engine outside.
#
# Environment (tests/integration/meson.build): KM_KVMOTION, KM_ENGINE_LIB
# (libkvmotion-engine.so.1), KM_SOURCE_DIR, KM_SANITIZE (b_sanitize).
# stdlib Python only.

# shellcheck source=tests/integration/lib.sh
source "$(dirname "$0")/lib.sh"

LIB=${KM_ENGINE_LIB:-$KM_BUILD_DIR/plugin/libkvmotion-engine.so.1}
PYDIR=$KM_SOURCE_DIR/python
ENGINE_PY=$KM_SOURCE_DIR/tests/integration/engine_api_py.py
ENGINE_PIDS=()

command -v python3 >/dev/null 2>&1 || skip "python3 is missing"
[ -x "$KVMOTION" ] || fail "$KVMOTION is missing: build the project first"
[ -f "$LIB" ] || fail "$LIB is missing: build the project first"

# A sanitized library loads into an unsanitized python3 only behind its runtime.
PY_ENV=(env "KVMOTION_ENGINE_LIB=$LIB" "PYTHONPATH=$PYDIR")
case ${KM_SANITIZE:-none} in
*address*)
	asan=$(${CC:-cc} -print-file-name=libasan.so)
	[ -f "$asan" ] || skip "sanitized build and no libasan.so to preload into python3"
	PY_ENV+=("LD_PRELOAD=$asan" "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
	;;
esac

cleanup() {
	local rc=$? pid
	set +e
	for pid in "${ENGINE_PIDS[@]}"; do
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	if [ -n "$KM_TMP" ] && [ "${KM_KEEP_TMP:-0}" != 1 ]; then
		rm -rf "$KM_TMP"
	fi
	[ "$rc" = 0 ] && printf 'PASS: %s (%ss)\n' "$KM_TEST_NAME" "$((SECONDS - KM_STARTED))"
	exit "$rc"
}
KM_TMP=$(mktemp -d "/tmp/kvmotion-${KM_TEST_NAME}.XXXXXX")
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the library exports the engine API and nothing else ---
soname=$(objdump -p "$LIB" | awk '$1 == "SONAME" { print $2 }')
[ "$soname" = libkvmotion-engine.so.1 ] || fail "SONAME is '$soname'"
bad=$(nm -D --defined-only "$LIB" | awk '{ print $NF }' | grep -v -E '^(kme_[a-z_]+@@KVMOTION_ENGINE_1|KVMOTION_ENGINE_1)$' || true)
[ -z "$bad" ] || fail "exported beyond kme_*: $bad"
# every function the public header declares, and only those
declared=$(grep -oE '\bkme_[a-z_]+\(' "$KM_SOURCE_DIR/plugin/include/kvmotion/engine.h" | tr -d '(' | sort -u)
exported=$(nm -D --defined-only "$LIB" | awk '$2 == "T" { sub(/@.*/, "", $3); print $3 }' | sort -u)
[ "$declared" = "$exported" ] || fail "exported functions differ from engine.h's: $(diff <(echo "$declared") <(echo "$exported") | tr '\n' ' ')"
n=$(wc -l <<<"$exported")
pass "$soname exports $n kme_* functions and nothing else"

# --- a store with a seeded model ---
S=$KM_TMP/store
MODEL=$KM_TMP/model-00001.safetensors
python3 -c 'import random, sys; r = random.Random(7); sys.stdout.buffer.write(r.randbytes(3 * 1024 * 1024 + 123))' >"$MODEL"
run "$KVMOTION" seed "$MODEL" --store "$S" --name m --no-sync >/dev/null

# start_engine CTL [extra...]: starts engine_api_py.py (prefix with NETNS=1
# for a new network namespace) and waits until it serves; sets EPID.
start_engine() {
	local ctl=$1 i
	shift
	mkdir -p "$ctl"
	mkfifo "$ctl/cmd"
	if [ "${NETNS:-0}" = 1 ]; then
		"${PY_ENV[@]}" unshare -n python3 "$ENGINE_PY" --ctl "$ctl" "$@" 2>"$ctl/stderr" &
	else
		"${PY_ENV[@]}" python3 "$ENGINE_PY" --ctl "$ctl" "$@" 2>"$ctl/stderr" &
	fi
	ENGINE_PIDS+=($!)
	for ((i = 0; i < 200; i++)); do
		[ -f "$ctl/ready" ] && break
		kill -0 "${ENGINE_PIDS[-1]}" 2>/dev/null || { cat "$ctl/stderr"; fail "the engine exited"; }
		sleep 0.05
	done
	[ -f "$ctl/ready" ] || fail "the engine did not start"
	EPID=$(cat "$ctl/ready")
	# env and unshare exec: the pid we started is the engine's
	[ "$EPID" = "${ENGINE_PIDS[-1]}" ] || fail "engine pid $EPID, started ${ENGINE_PIDS[-1]}"
}

cmd() { printf '%s\n' "$2" >"$1/cmd"; }

# Like lib.sh's run, with stdout left to the command (for its JSON).
out() {
	log "\$ $*" >&2
	"$@" || {
		echo "FAIL: $KM_TEST_NAME: command failed (status $?): $*" >&2
		exit 1
	}
}

# The n-th (1-based) event of CTL's log, as JSON, or fail.
event() {
	local ctl=$1 n=$2 i
	for ((i = 0; i < 100; i++)); do
		[ "$(wc -l <"$ctl/events")" -ge "$n" ] && break
		sleep 0.05
	done
	sed -n "${n}p" "$ctl/events" >"$KM_TMP/event.json"
	[ -s "$KM_TMP/event.json" ] || fail "no event $n in $ctl/events"
}

expect() { # expect FILE KEY VALUE
	local v
	v=$(json_get "$1" "$2") || fail "no $2 in $(cat "$1")"
	[ "$v" = "$3" ] || fail "$2 is '$v', expected '$3' ($(cat "$1"))"
}

count_events() { wc -l <"$1/events"; }

E=$KM_TMP/e1
start_engine "$E" --store "$S" --ref index:m --model "$MODEL"
log "engine pid $EPID"
BS=$((2 * $(getconf PAGESIZE)))

# The weights, read through the zero-copy buffer of the mapping.
event "$E" 1
expect "$KM_TMP/event.json" event weights
expect "$KM_TMP/event.json" model_match True
expect "$KM_TMP/event.json" id_match True
expect "$KM_TMP/event.json" readonly True
WPATH=$(json_get "$KM_TMP/event.json" path)
WID=$(json_get "$KM_TMP/event.json" id)
[ "$(sha256sum <"$WPATH" | cut -d' ' -f1)" = "$WID" ] || fail "$WPATH does not hash to $WID"
grep -q " $WPATH\$" "/proc/$EPID/maps" || fail "$WPATH is not mapped in the engine"
for fd in "/proc/$EPID/fd/"*; do
	[ "$(readlink "$fd")" != "$WPATH" ] || fail "the engine keeps an fd on $WPATH"
done
pass "weights $WID mapped by path, bytes equal to the model"

run "$KVMOTION" engine probe --pid "$EPID" >/dev/null
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" state running
expect "$KM_TMP/st.json" engine_pid "$EPID"
expect "$KM_TMP/st.json" quiesces 0

# --- quiesce, then resume as after a restore ---
out "$KVMOTION" engine quiesce --pid "$EPID" --json >"$KM_TMP/q.json"
expect "$KM_TMP/q.json" free_blocks 5
expect "$KM_TMP/q.json" released_bytes $((5 * BS))
python3 - "$KM_TMP/q.json" "$WPATH" "$WID" "$(stat -c %s "$WPATH")" <<'PY' || fail "quiesce did not list the weights"
import json, sys
q = json.load(open(sys.argv[1]))
assert q["weights"] == [{"path": sys.argv[2], "sha256": sys.argv[3], "size": int(sys.argv[4])}], q
PY
event "$E" 2
expect "$KM_TMP/event.json" event quiesce
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" state quiesced
expect "$KM_TMP/st.json" last_released_bytes $((5 * BS))
run "$KVMOTION" engine resume --pid "$EPID" --restored >/dev/null
event "$E" 3
expect "$KM_TMP/event.json" event resume
expect "$KM_TMP/event.json" restored True
expect "$KM_TMP/event.json" free_zero True
expect "$KM_TMP/event.json" used_intact True
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" state running
expect "$KM_TMP/st.json" quiesces 1
expect "$KM_TMP/st.json" resumes 1
expect "$KM_TMP/st.json" restored True
pass "quiesce released 5 free blocks ($((5 * BS)) bytes), used blocks intact, resume(restored=true)"

# A resume of a running engine: answered, no callback.
run "$KVMOTION" engine resume --pid "$EPID" >/dev/null
[ "$(count_events "$E")" = 3 ] || fail "a resume of a running engine reached the callback"

# --- a refused quiesce: an error for the CLI, no resume ---
cmd "$E" refuse
if "$KVMOTION" engine quiesce --pid "$EPID" 2>"$KM_TMP/err"; then fail "a refused quiesce succeeded"; fi
grep -q "engine in pid $EPID refused the quiesce" "$KM_TMP/err" || fail "message: $(cat "$KM_TMP/err")"
event "$E" 4
expect "$KM_TMP/event.json" refuse True
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" refused 1
expect "$KM_TMP/st.json" state running
[ "$(count_events "$E")" = 4 ] || fail "a refused quiesce was resumed"
pass "refused quiesce: $(cat "$KM_TMP/err")"

# --- a quiesce slower than the plugin's timeout: cancelled, resumed ---
cmd "$E" accept
cmd "$E" "slow 1500"
t0=$(date +%s%N)
if "$KVMOTION" engine quiesce --pid "$EPID" --timeout-ms 300 2>"$KM_TMP/err"; then fail "a slow quiesce succeeded"; fi
took=$((($(date +%s%N) - t0) / 1000000))
grep -q "engine in pid $EPID did not answer the quiesce within 300 ms" "$KM_TMP/err" ||
	fail "message: $(cat "$KM_TMP/err")"
[ "$took" -lt 1300 ] || fail "the CLI waited $took ms for a 300 ms timeout"
event "$E" 6
expect "$KM_TMP/event.json" event resume
expect "$KM_TMP/event.json" restored False
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" cancelled 1
expect "$KM_TMP/st.json" state running
cmd "$E" accept
pass "quiesce past the timeout: CLI gave up after $took ms, engine resumed (cancelled 1)"

# --- stop ---
cmd "$E" stop
wait "${ENGINE_PIDS[0]}" || fail "the engine exited with $? ($(cat "$E/stderr"))"
event "$E" 7
expect "$KM_TMP/event.json" event stopped
if grep -q Traceback "$E/stderr"; then fail "the engine printed a traceback: $(cat "$E/stderr")"; fi
out=$("$KVMOTION" engine probe --pid $$ || true)
case $out in *"no cooperative engine"*) ;; *) fail "probe of a plain process: $out" ;; esac

# --- network namespaces (setns in a helper child) ---
if [ "$(id -u)" != 0 ] || ! unshare -n true 2>/dev/null; then
	log "SKIP network namespace part: needs root and unshare -n"
	exit 0
fi
E2=$KM_TMP/e2
NETNS=1 start_engine "$E2" --resume-timeout-ms 1500
[ "$(readlink "/proc/$EPID/ns/net")" != "$(readlink /proc/self/ns/net)" ] ||
	fail "the engine is not in its own network namespace"
out "$KVMOTION" engine quiesce --pid "$EPID" --json >"$KM_TMP/q.json"
expect "$KM_TMP/q.json" released_bytes $((5 * BS))
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" state quiesced
# nobody resumes it: it resumes by itself after 1500 ms
event "$E2" 2
expect "$KM_TMP/event.json" event resume
expect "$KM_TMP/event.json" restored False
expect "$KM_TMP/event.json" free_zero True
out "$KVMOTION" engine status --pid "$EPID" --json >"$KM_TMP/st.json"
expect "$KM_TMP/st.json" self_resumes 1
expect "$KM_TMP/st.json" state running
pass "engine in another network namespace: quiesce, status, self-resume after 1500 ms"

# The CLI in a namespace of its own, the engine in ours... (E2's is another)
E3=$KM_TMP/e3
start_engine "$E3"
out unshare -n "$KVMOTION" engine quiesce --pid "$EPID" --json >"$KM_TMP/q.json"
expect "$KM_TMP/q.json" free_blocks 5
run unshare -n "$KVMOTION" engine resume --pid "$EPID" --restored >/dev/null
event "$E3" 2
expect "$KM_TMP/event.json" restored True
expect "$KM_TMP/event.json" used_intact True
pass "CLI in another network namespace: quiesce and resume(restored=true)"
cmd "$E2" stop
cmd "$E3" stop
wait "${ENGINE_PIDS[1]}" || fail "engine 2 exited with $?"
wait "${ENGINE_PIDS[2]}" || fail "engine 3 exited with $?"
