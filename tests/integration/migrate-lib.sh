# SPDX-License-Identifier: LGPL-2.1-or-later
# shellcheck shell=bash
#
# The set-up and helpers of the `kvmotion migrate` tests (migrate.sh,
# migrate_incr.sh): lib.sh, netns.sh and the two hosts (km_netns_setup),
# then the hosts' stores, receivers and engines, a migration and its checks.
#
# Same host, shared filesystem: each engine runs as the init of its own pid
# namespace (unshare --pid --fork setsid), so that CRIU restores it into a
# new one on the target while the stopped source still exists (no pid
# clash); both hosts use one weights directory, so that the restored engine
# finds its weights file at the path it mapped.

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=netns.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
km_init
command -v openssl >/dev/null 2>&1 || skip "no openssl command (keys)"
command -v unshare >/dev/null 2>&1 || skip "no unshare (util-linux)"
ENGINE=${KM_ENGINE:-$KM_BUILD_DIR/tests/engine/engine}
PLUGIN_DIR=${KM_PLUGIN_DIR:-$KM_BUILD_DIR/criu-hooks}
[ -x "$ENGINE" ] || fail "$ENGINE is missing: build the project first"
[ -f "$PLUGIN_DIR/kvmotion.so" ] || skip "the CRIU plugin was not built (no criu-plugin.h)"
km_netns_setup

T=$KM_TMP
storeA=$T/storeA
storeB=$T/storeB
wdir=$T/weights # one weights directory for both hosts (same path everywhere)
export KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null KVMOTION_WEIGHTS_DIR=$wdir
openssl rand -hex 32 >"$T/psk"
chmod 600 "$T/psk"
declare -A SPID SLOG

stop_servers() {
	local name
	for name in "${!SPID[@]}"; do
		kill -KILL "${SPID[$name]}" 2>/dev/null || true
	done
}
KM_CLEANUP_HOOKS+=(stop_servers)

# start_server NAME NS ADDR PORT STORE [SERVE OPTIONS...]: kvmotion serve on a host
start_server() {
	local name=$1 ns=$2 addr=$3 port=$4 store=$5 log=$T/serve-$1.log
	shift 5
	log "\$ [$ns] kvmotion serve --listen $addr:$port --store $store $*"
	KVMOTION_STORE=$store nsenter --net="/run/netns/$ns" -- "$KVMOTION" serve \
		--listen "$addr:$port" --store "$store" --images "$T/images-$name" \
		--weights-dir "$wdir" --psk-file "$T/psk" --no-sync "$@" >/dev/null 2>"$log" &
	SPID[$name]=$!
	SLOG[$name]=$log
	for _ in $(seq 1 200); do
		grep -q "listening on" "$log" && return 0
		kill -0 "${SPID[$name]}" 2>/dev/null || {
			cat "$log"
			fail "server $name exited at start"
		}
		sleep 0.02
	done
	fail "server $name is not listening"
}

# Engine runs: long enough to be caught mid-generation, short for the suite.
args=(--seqs 2 --total-seqs 12 --prompt-len 8 --max-new 24 --kv-mib 16 --kv-fill-mib 8 --seed 3
	--step-delay-ms 30)

# start_engine NAME NS MODEL [ARGS...]: the engine as the init of a new pid
# namespace on host NS; ENGINE_PID is its host pid
start_engine() {
	local name=$1 ns=$2 model=$3 u
	shift 3
	rm -f "$T/$name.out" "$T/$name.json"
	KVMOTION_STORE=$storeA nsenter --net="/run/netns/$ns" -- unshare --pid --fork setsid \
		"$ENGINE" --model "$model" "${args[@]}" --out "$T/$name.out" \
		--status-file "$T/$name.json" "$@" </dev/null >"$T/$name.log" 2>&1 &
	u=$!
	for _ in $(seq 200); do
		ENGINE_PID=$(pgrep -P "$u" || true)
		[ -n "$ENGINE_PID" ] && grep -qs "^engine$" "/proc/$ENGINE_PID/comm" && break
		sleep 0.01
	done
	[ -n "$ENGINE_PID" ] || fail "engine $name did not start"
	KM_PIDS+=("$ENGINE_PID")
	for _ in $(seq 400); do
		[ -s "$T/$name.json" ] && [ "$(json_get "$T/$name.json" tokens_generated)" -ge 6 ] && return 0
		kill -0 "$ENGINE_PID" 2>/dev/null || break
		sleep 0.02
	done
	cat "$T/$name.log" >&2
	fail "engine $name did not get going"
}

# migrate OUT NS STORE PID PORT [ARGS...]: kvmotion migrate from host NS;
# status in MIG_RC, the JSON report in OUT, stderr in OUT.err
migrate() {
	local out=$1 ns=$2 store=$3 pid=$4 to=$5
	shift 5
	rm -rf "$out.work"
	log "\$ [$ns] kvmotion migrate --pid $pid --to $to --store $store $*"
	MIG_RC=0
	nsenter --net="/run/netns/$ns" -- "$KVMOTION" migrate --pid "$pid" --to "$to" \
		--psk-file "$T/psk" --store "$store" --work "$out.work" --criu "$CRIU" \
		--plugin-dir "$PLUGIN_DIR" --json "$@" >"$out" 2>"$out.err" || MIG_RC=$?
	python3 -m json.tool "$out" >/dev/null 2>&1 || {
		cat "$out.err"
		fail "migrate printed no JSON report: $(head -c 300 "$out")"
	}
	log "report: $(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(json.dumps({k: v[k] for k in ("ok","mode","restored_pid","resumed","error","bytes_sent_before_stop","bytes_sent_during_stop","bytes_deduplicated","stop_seconds")}))' "$out")"
}

migrate_ok() {
	migrate "$@"
	if [ "$MIG_RC" != 0 ]; then
		cat "$1.err"
		km_criu_log_tail "$1.work/img/dump.log" 2>/dev/null || true
		for name in "${!SLOG[@]}"; do
			echo "--- ${SLOG[$name]}"
			tail -n 5 "${SLOG[$name]}"
		done
		fail "kvmotion migrate failed (status $MIG_RC)"
	fi
	json_check "$1" restored_pid bytes_sent_before_stop bytes_sent_during_stop bytes_deduplicated
	KM_PIDS+=("$(json_get "$1" restored_pid)")
}

# migrate_fails OUT NS STORE PID TO REGEX [ARGS...]: must fail, resume the
# source and name the cause
migrate_fails() {
	local out=$1 re=$6 pid=$4
	migrate "$1" "$2" "$3" "$4" "$5" "${@:7}"
	[ "$MIG_RC" != 0 ] || fail "migrate succeeded where it must fail"
	assert_eq "ok in the report" "$(json_get "$out" ok)" False
	assert_eq "resumed in the report" "$(json_get "$out" resumed)" True
	json_get "$out" error | grep -qE "$re" || fail "the report's error '$(json_get "$out" error)' does not match /$re/"
	grep -q "was resumed" "$out.err" || fail "stderr does not say the source was resumed"
	kill -0 "$pid" 2>/dev/null || fail "the source engine is gone"
	# running, sleeping, or in a disk wait (writing its output): not stopped (T), not a zombie
	grep -q "State:.*[RSD]" "/proc/$pid/status" || fail "the source is not running: $(grep State "/proc/$pid/status")"
}

# finish NAME PID REF: the engine (host pid PID) runs to its end with REF's tokens
finish() {
	local name=$1 pid=$2 ref=$3
	wait_pid_gone "$pid" 60
	cmp "$ref" "$T/$name.out" || fail "$name: the token stream differs from the run never stopped"
	assert_eq "$name: prefill steps (no recomputation)" "$(json_get "$T/$name.json" prefill_steps)" \
		"$(json_get "${ref%.out}.json" prefill_steps)"
}

sec() { json_get "$1" "stop_seconds.$2"; }
phases() {
	printf 'stop %s s (quiesce %s, freeze %s, GPU checkpoint %s, dump %s, split %s, transfer %s, join %s, restore %s, GPU restore %s, resume %s)' \
		"$(sec "$1" total)" "$(sec "$1" quiesce)" "$(sec "$1" freeze)" "$(sec "$1" gpu_checkpoint)" \
		"$(sec "$1" dump)" "$(sec "$1" split)" "$(sec "$1" transfer)" "$(sec "$1" join)" \
		"$(sec "$1" restore)" "$(sec "$1" gpu_restore)" "$(sec "$1" resume)"
}

