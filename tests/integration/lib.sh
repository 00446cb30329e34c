# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Shared helpers of the integration tests (sourced, never run).
#
# Paths come from the environment meson's test() sets (tests/integration/meson.build):
#   KM_SOURCE_DIR, KM_BUILD_DIR, KM_KVMOTION, KM_MKMODEL, KM_MEMPROC
# and, optionally, KM_CRIU (default: $KM_SOURCE_DIR/.deps/bin/criu, from
# scripts/setup.sh). Run by hand, they default to the source tree and its build/.
# KM_KEEP_TMP=1 keeps the test's temporary directory. KM_NEED_CRIU=0 (set before
# km_init) lets a test run without a working CRIU: KM_HAVE_CRIU then says 0.
#
# Conventions: "PASS: ..." / "FAIL: ..." lines on stdout; a failure ends the
# test with status 1, a missing requirement with 77 (meson's SKIP).

set -euo pipefail

KM_SOURCE_DIR=${KM_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
KM_BUILD_DIR=${KM_BUILD_DIR:-$KM_SOURCE_DIR/build}
KVMOTION=${KM_KVMOTION:-$KM_BUILD_DIR/plugin/kvmotion}
MKMODEL=${KM_MKMODEL:-$KM_BUILD_DIR/tests/helpers/mkmodel}
MEMPROC=${KM_MEMPROC:-$KM_BUILD_DIR/tests/helpers/memproc}
CRIU=${KM_CRIU:-$KM_SOURCE_DIR/.deps/bin/criu}

KM_TEST_NAME=${KM_TEST_NAME:-$(basename "$0" .sh)}
KM_PIDS=()     # processes started or restored by the test: killed on exit
KM_CLEANUP_HOOKS=() # functions km_cleanup calls first, last registered first
# shellcheck disable=SC2034 # read by the tests
KM_HAVE_CRIU=0
KM_TMP=""
KM_STARTED=$SECONDS

log() { printf '# %s\n' "$*"; }
pass() { printf 'PASS: %s\n' "$*"; }
fail() {
	printf 'FAIL: %s: %s\n' "$KM_TEST_NAME" "$*"
	exit 1
}
skip() {
	printf 'SKIP: %s: %s\n' "$KM_TEST_NAME" "$*"
	exit 77
}

km_cleanup() {
	local rc=$? pid i
	set +e
	for ((i = ${#KM_CLEANUP_HOOKS[@]} - 1; i >= 0; i--)); do
		"${KM_CLEANUP_HOOKS[i]}"
	done
	for pid in "${KM_PIDS[@]}"; do
		# only what is still a memproc: the pid may have been reused
		if grep -qsE "^(memproc|engine|engine-cuda)$" "/proc/$pid/comm"; then
			kill -KILL "$pid" 2>/dev/null
		fi
	done
	if [ -n "$KM_TMP" ] && [ -d "$KM_TMP" ]; then
		if [ "${KM_KEEP_TMP:-0}" = 1 ]; then
			echo "# kept $KM_TMP"
		else
			rm -rf "$KM_TMP"
		fi
	fi
	if [ "$rc" = 0 ]; then
		printf 'PASS: %s (%ss)\n' "$KM_TEST_NAME" "$((SECONDS - KM_STARTED))"
	fi
	exit "$rc"
}

# Checks what every test needs, makes the temporary directory KM_TMP.
km_init() {
	local f out
	[ "$(id -u)" = 0 ] || skip "needs root (CRIU dumps and restores processes)"
	for f in "$KVMOTION" "$MKMODEL" "$MEMPROC"; do
		[ -x "$f" ] || fail "$f is missing: build the project first"
	done
	if [ ! -x "$CRIU" ]; then
		if command -v criu >/dev/null 2>&1 && [ -z "${KM_CRIU:-}" ]; then
			CRIU=$(command -v criu)
		elif [ "${KM_NEED_CRIU:-1}" = 0 ]; then
			log "no CRIU at $CRIU: the steps that need it are skipped"
		else
			skip "no CRIU at $CRIU (run scripts/setup.sh, or set KM_CRIU)"
		fi
	fi
	if [ -x "$CRIU" ]; then
		if out=$("$CRIU" check 2>&1); then
			# shellcheck disable=SC2034 # read by the tests
			KM_HAVE_CRIU=1
		elif [ "${KM_NEED_CRIU:-1}" = 0 ]; then
			log "'$CRIU check' fails: the steps that need CRIU are skipped"
		else
			printf '%s\n' "$out" | tail -n 20
			skip "'$CRIU check' fails on this machine: CRIU cannot work here"
		fi
	fi
	command -v python3 >/dev/null 2>&1 || skip "python3 is missing (JSON checks)"
	KM_TMP=$(mktemp -d "/tmp/kvmotion-${KM_TEST_NAME}.XXXXXX")
	trap km_cleanup EXIT
	trap 'exit 130' INT TERM
	log "kvmotion $KVMOTION"
	log "criu $CRIU ($("$CRIU" --version 2>/dev/null | sed -n 's/^Version: *//p'))"
	log "tmp $KM_TMP"
}

# Runs "$@", printing it first; fails the test if it fails.
run() {
	log "\$ $*"
	"$@" || fail "command failed (status $?): $*"
}

# The value of KEY in the JSON object in FILE (top level; numbers, strings);
# check the keys with json_check first: a failure inside $(...) cannot end the test.
json_get() {
	python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2" 2>/dev/null || {
		echo "FAIL: no '$2' in the JSON of $1" >&2
		return 1
	}
}

file_size() { stat -c %s "$1"; }

# A listing of DIR: one "sha256  size  mode  name" line per entry, sorted.
# Any file added, removed or changed (temporary files included) changes it.
dir_digest() {
	local dir=$1 f
	(
		cd "$dir"
		LC_ALL=C find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort | while IFS= read -r f; do
			if [ -f "$f" ] && [ ! -L "$f" ]; then
				printf '%s  %s  %s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" \
					"$(stat -c %s "$f")" "$(stat -c %a "$f")" "$f"
			else
				printf '%s  -  %s  %s\n' "$(stat -c %F "$f")" "$(stat -c %a "$f")" "$f"
			fi
		done
	)
}

# Fails unless directories A and B hold the same names with the same bytes.
assert_same_dirs() {
	local a=$1 b=$2 what=${3:-"$2 equals $1"}
	if ! diff -r "$a" "$b" >"$KM_TMP/diff.out" 2>&1; then
		head -n 20 "$KM_TMP/diff.out"
		fail "$what: diff -r reports differences"
	fi
	if ! diff <(dir_digest "$a") <(dir_digest "$b") >"$KM_TMP/diff.out"; then
		head -n 20 "$KM_TMP/diff.out"
		fail "$what: sha256/size/mode differ"
	fi
}

# --- the test process ---------------------------------------------------

# Progress file fields: counter model-sum dynamic-sum / VERIFY status count.
# A reader can race a pwrite: read until two reads agree.
progress_read() {
	local file=$1 a b
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		a=$(cat "$file" 2>/dev/null) || a=""
		b=$(cat "$file" 2>/dev/null) || b=""
		if [ -n "$a" ] && [ "$a" = "$b" ]; then
			printf '%s\n' "$a"
			return 0
		fi
		sleep 0.01
	done
	return 1
}

# counter (decimal, leading zeros removed)
progress_counter() {
	local c
	c=$(progress_read "$1" | awk 'NR == 1 { print $1 }') || return 1
	[ -n "$c" ] || return 1
	echo $((10#$c))
}

progress_model_sum() { progress_read "$1" | awk 'NR == 1 { print $2 }'; }

# Starts memproc in its own session, stdin from /dev/null, output to LOG;
# sets MEMPROC_PID and waits for its first progress line.
# start_memproc MODEL DYNAMIC_MIB PROGRESS LOG [MEMPROC OPTIONS...]
start_memproc() {
	local model=$1 dyn=$2 progress=$3 out=$4
	shift 4
	rm -f "$progress"
	setsid "$MEMPROC" --model "$model" --dynamic "$dyn" --progress "$progress" "$@" \
		</dev/null >"$out" 2>&1 &
	MEMPROC_PID=$!
	KM_PIDS+=("$MEMPROC_PID")
	# no "Killed" job message when CRIU's dump ends it; bash still reaps it
	disown "$MEMPROC_PID" 2>/dev/null || true
	for _ in $(seq 1 600); do
		if [ -s "$progress" ] && progress_counter "$progress" >/dev/null; then
			break
		fi
		kill -0 "$MEMPROC_PID" 2>/dev/null || {
			cat "$out"
			fail "memproc exited at start"
		}
		sleep 0.05
	done
	[ -s "$progress" ] || fail "memproc wrote no progress in 30 s"
	# setsid execs in place (no fork) when not a group leader: check it
	grep -qs memproc "/proc/$MEMPROC_PID/comm" ||
		fail "pid $MEMPROC_PID is not memproc (setsid forked?)"
	log "memproc pid $MEMPROC_PID: $(cat "$out")"
}

# wait_progress FILE AFTER [TIMEOUT_S]: waits until the counter exceeds AFTER.
wait_progress() {
	local file=$1 after=$2 timeout=${3:-10} c=0
	for _ in $(seq 1 $((timeout * 20))); do
		c=$(progress_counter "$file") || c=0
		if [ "$c" -gt "$after" ]; then
			return 0
		fi
		sleep 0.05
	done
	fail "progress counter stuck at $c (waited for > $after, $timeout s)"
}

# verify_memproc PID FILE: SIGUSR1, then expects "VERIFY OK" with a new count.
verify_memproc() {
	local pid=$1 file=$2 before after status
	before=$(progress_read "$file" | awk 'NR == 2 { print $3 }') ||
		fail "cannot read $file"
	before=$((10#${before:-0}))
	kill -USR1 "$pid" || fail "cannot signal pid $pid"
	for _ in $(seq 1 200); do
		after=$(progress_read "$file" | awk 'NR == 2 { print $3 }') || after=0
		after=$((10#${after:-0}))
		if [ "$after" -gt "$before" ]; then
			status=$(progress_read "$file" | awk 'NR == 2 { print $2 }') || status="(unreadable)"
			[ "$status" = OK ] || fail "memproc $pid reports VERIFY $status: memory damaged"
			return 0
		fi
		sleep 0.05
	done
	fail "memproc $pid did not answer SIGUSR1 in 10 s"
}

# wait_pid_gone PID [TIMEOUT_S]: waits until the pid no longer exists (reaped).
wait_pid_gone() {
	local pid=$1 timeout=${2:-20}
	for _ in $(seq 1 $((timeout * 20))); do
		[ -e "/proc/$pid" ] || return 0
		sleep 0.05
	done
	fail "pid $pid still exists after $timeout s ($(grep -s State "/proc/$pid/status"), parent $(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)): its parent does not reap it"
}

# --- CRIU ----------------------------------------------------------------

km_criu_log_tail() {
	local log=$1
	if [ -f "$log" ]; then
		echo "--- last lines of $log (errors first) ---"
		grep -E 'Error|error|Warn' "$log" | grep -v 'RLIMIT_NOFILE' | tail -n 15 || true
		echo "..."
		tail -n 30 "$log"
		echo "---"
	else
		echo "--- no CRIU log at $log ---"
	fi
}

# criu_dump PID DIR [CRIU OPTIONS...]: dumps PID's tree into DIR (dump.log there).
criu_dump() {
	local pid=$1 dir=$2 t0=$SECONDS
	shift 2
	mkdir -p "$dir"
	log "\$ criu dump -t $pid -D $dir -o dump.log -v4 $*"
	if ! "$CRIU" dump -t "$pid" -D "$dir" -o dump.log -v4 "$@"; then
		km_criu_log_tail "$dir/dump.log"
		fail "criu dump of pid $pid failed"
	fi
	log "dumped pid $pid in $((SECONDS - t0))s: $(du -sh "$dir" | cut -f1)"
}

# criu_restore DIR [CRIU OPTIONS...]: restores DIR detached (restore.log there);
# the restored tree is reparented to init when criu exits. Sets RESTORED_PID.
criu_restore() {
	local dir=$1 pid
	shift
	pid=$(python3 - "$dir" <<'EOF' 2>/dev/null || true
import sys, glob, os, re
# core-<pid>.img names the dumped tasks; the smallest pid is the root here
pids = sorted(int(re.match(r'core-(\d+)\.img', os.path.basename(p)).group(1))
              for p in glob.glob(sys.argv[1] + '/core-*.img'))
print(pids[0] if pids else '')
EOF
)
	# the dumped pid must be free: wait until the old process is reaped
	if [ -n "$pid" ]; then
		wait_pid_gone "$pid"
	fi
	log "\$ criu restore -D $dir -d -o restore.log -v4 $*"
	if ! "$CRIU" restore -D "$dir" -d -o restore.log -v4 "$@"; then
		km_criu_log_tail "$dir/restore.log"
		fail "criu restore of $dir failed"
	fi
	# shellcheck disable=SC2034 # read by the tests
	RESTORED_PID=$pid
	if [ -n "$pid" ]; then
		KM_PIDS+=("$pid")
		kill -0 "$pid" 2>/dev/null || fail "restored pid $pid is not running"
	fi
}

# kill_memproc PID: ends it and waits until it has exited (a restored process
# is reparented to init, which may take a moment to reap it: a zombie is fine).
kill_memproc() {
	local pid=$1 state
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 200); do
		state=$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || state=""
		case $state in
		'' | Z | X) return 0 ;;
		esac
		sleep 0.05
	done
	fail "pid $pid did not exit on SIGTERM (state $state)"
}

# --- kvmotion ------------------------------------------------------------

# kvm OUT ARGS...: runs kvmotion ARGS with stdout to OUT and stderr to OUT.err;
# fails the test, showing stderr, if it fails.
kvm() {
	local out=$1 rc=0
	shift
	log "\$ kvmotion $*"
	"$KVMOTION" "$@" >"$out" 2>"$out.err" || rc=$?
	if [ "$rc" != 0 ]; then
		cat "$out.err"
		fail "kvmotion $1 failed (status $rc)"
	fi
	case " $* " in
	*" --json "*)
		python3 -m json.tool "$out" >/dev/null 2>&1 ||
			fail "kvmotion $1 --json printed no valid JSON object: '$(head -c 300 "$out")'"
		;;
	esac
}

# json_check FILE KEY...: fails the test unless each KEY is in FILE's object
# as a non-negative integer (so that json_get can be used in $(...) safely).
json_check() {
	local file=$1 missing
	shift
	missing=$(python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
bad = [k for k in sys.argv[2:]
       if not isinstance(v.get(k), int) or isinstance(v.get(k), bool) or v[k] < 0]
print(" ".join(bad))' "$file" "$@") || fail "$file is not a JSON object"
	[ -z "$missing" ] ||
		fail "$file lacks integer field(s) $missing: $(head -c 400 "$file")"
}

# assert_ge NAME VALUE MIN / assert_lt NAME VALUE MAX
assert_ge() {
	[ "$2" -ge "$3" ] || fail "$1 = $2, expected >= $3"
}
assert_lt() {
	[ "$2" -lt "$3" ] || fail "$1 = $2, expected < $3"
}
assert_eq() {
	[ "$2" = "$3" ] || fail "$1 = $2, expected $3"
}

# file_bytes DIR [FIND TESTS...]: bytes in the regular files under DIR (that pass the tests)
file_bytes() {
	find "$@" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'
}

# Bytes in the files of a store's chunks/ (what the store holds).
store_bytes() { file_bytes "$1/chunks"; }

# engine_test_init WHAT: ENGINE and PLUGIN_DIR for the engine tests, GPU=1
# when KM_REQUIRE_GPU=1 asks for the real-GPU variant (which SKIPs without a
# GPU or engine-cuda; WHAT says what runs there and where else it is tested).
engine_test_init() {
	GPU=${KM_REQUIRE_GPU:-0}
	if [ "$GPU" = 1 ] && ! compgen -G '/proc/driver/nvidia/gpus/*' >/dev/null; then
		skip "no NVIDIA GPU on this host (/proc/driver/nvidia/gpus is empty or absent): $1"
	fi
	if [ "$GPU" = 1 ] && [ -z "${KM_ENGINE:-}" ]; then
		skip "engine-cuda was not built: no CUDA toolkit (nvcc and libcudart_static.a under meson's gpu_toolkit)"
	fi
	ENGINE=${KM_ENGINE:-$KM_BUILD_DIR/tests/engine/engine}
	PLUGIN_DIR=${KM_PLUGIN_DIR:-$KM_BUILD_DIR/criu-hooks}
	[ -x "$ENGINE" ] || fail "$ENGINE is missing: build the project first"
	[ -f "$PLUGIN_DIR/kvmotion.so" ] || skip "the CRIU plugin was not built (no criu-plugin.h)"
}
