#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# `kvmotion migrate --container` (docs/podman.md, "Moving a container
# live") with the real podman and runc: two podman nodes (podman-lib.sh: own
# storage, store, config, criu wrapper, mount namespace) on the two network
# hosts of netns.sh; B runs `kvmotion serve --podman`.
#
#   - the test engine in a container on A moves to B mid-generation: its
#     weights index goes ahead, podman's checkpoint (split by the plugin)
#     and the archive follow, B's podman restores it; the container is gone
#     from A, runs on B and ends with the tokens of a run never stopped;
#   - B's restore fails (a bad restore option): the container is restored
#     on A from the checkpoint podman kept and goes on, tokens identical;
#   - a cooperative engine (store bind-mounted read-only): its weights file,
#     found from its mappings, is written on B ahead; quiesced, moved, resumed;
#   - the Kubernetes path (k8s-hook) on podman's archive, restored by podman
#     from the OCI checkpoint image before-restore made.
#
#   KM_LINK_RATE (10gbit)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=netns.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
# shellcheck source-path=SCRIPTDIR source=podman-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/podman-lib.sh"
km_init
command -v openssl >/dev/null 2>&1 || skip "no openssl command (keys)"
engine_test_init "containers run the CPU engine"
pod_init
pod_node_setup A
pod_node_setup B
km_netns_setup

T=$KM_TMP
D=$POD_NODE_DIR # each node's own directory, as the node sees it
export KVMOTION_SYNC=no
openssl rand -hex 32 >"$T/psk"
chmod 600 "$T/psk"
declare -A SPID SLOG

stop_servers() {
	local name
	for name in "${!SPID[@]}"; do
		# SPID is the subshell running in_node: kvmotion (nsenter, exec'd) is its child
		pkill -KILL -P "${SPID[$name]}" 2>/dev/null || true
		kill -KILL "${SPID[$name]}" 2>/dev/null || true
	done
}
KM_CLEANUP_HOOKS+=(stop_servers)

# podman as a node sees it, for kvmotion (which runs inside the node's namespaces)
cat >"$T/podman-node" <<EOF
#!/bin/sh
PATH=$D/bin:\$PATH exec podman --root $D/root --runroot $D/runroot --tmpdir $D/tmp \\
	--runtime $POD_RUNTIME --cgroup-manager cgroupfs --events-backend none "\$@"
EOF
chmod 755 "$T/podman-node"

# in_node NODE NS CMD...: CMD on podman node NODE, in network namespace NS
in_node() {
	local node=$1 ns=$2
	shift 2
	nsenter --net="/run/netns/$ns" --mount="$T/ns/$node" -- env PATH="$D/bin:$PATH" "$@"
}

# start_server NAME PORT [SERVE OPTIONS...]: kvmotion serve --podman on node B
start_server() {
	local name=$1 port=$2 log=$T/serve-$1.log
	shift 2
	log "\$ [B] kvmotion serve --listen $KM_ADDR_B:$port --store $D/store --podman podman-node $*"
	in_node B "$KM_NS_B" "$KVMOTION" serve --listen "$KM_ADDR_B:$port" --store "$D/store" \
		--images "$D/images-$name" --weights-dir "$D/weights" --psk-file "$T/psk" --no-sync \
		--podman "$T/podman-node" "$@" >/dev/null 2>"$log" &
	SPID[$name]=$!
	SLOG[$name]=$log
	for _ in $(seq 1 200); do
		grep -q "listening on" "$log" && return 0
		kill -0 "${SPID[$name]}" 2>/dev/null || fail "server $name exited: $(cat "$log")"
		sleep 0.02
	done
	fail "server $name is not listening"
}

# move OUT PORT [ARGS...]: kvmotion migrate --container llm from node A; MOVE_RC
move() {
	local out=$1 port=$2
	shift 2
	rm -rf "$out.work"
	log "\$ [A] kvmotion migrate --container llm --to $KM_ADDR_B:$port --store $D/store $*"
	MOVE_RC=0
	in_node A "$KM_NS_A" "$KVMOTION" migrate --container llm --to "$KM_ADDR_B:$port" \
		--psk-file "$T/psk" --store "$D/store" --weights-dir "$D/weights" --work "$out.work" \
		--podman "$T/podman-node" --json "$@" >"$out" 2>"$out.err" || MOVE_RC=$?
	python3 -m json.tool "$out" >/dev/null 2>&1 || {
		cat "$out.err"
		fail "migrate --container printed no JSON report: $(head -c 300 "$out")"
	}
	log "report: $(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(json.dumps({k: v.get(k) for k in ("ok","container","restored_pid","resumed","error","bytes_sent_before_stop","bytes_sent_during_stop","image_bytes","stop_seconds")}))' "$out")"
}

args=(--seqs 2 --total-seqs 8 --prompt-len 8 --max-new 20 --kv-mib 8 --kv-fill-mib 4 --seed 6)
run "$MKMODEL" "$POD_SHARE/model.safetensors" --size 32M --seed 11 --dim 256 --layers 4
kvm "$T/seed.json" seed "$POD_SHARE/model.safetensors" --store "$(pod_store A)" --name model --no-sync --json
run "$KVMOTION" store init --store "$(pod_store B)" --no-sync
run "$ENGINE" --model "$POD_SHARE/model.safetensors" "${args[@]}" --out "$T/ref.out" \
	--status-file "$T/ref.json" --quiet
model_bytes=$(file_size "$POD_SHARE/model.safetensors")

# start_llm NAME: the engine in container llm on A, generating
start_llm() {
	local name=$1
	rm -f "$POD_SHARE/$name.out" "$POD_SHARE/$name.json"
	pod_run_engine A llm -- --model "$POD_SHARE/model.safetensors" "${args[@]}" --step-delay-ms 60 \
		--out "$POD_SHARE/$name.out" --status-file "$POD_SHARE/$name.json" --quiet
	for _ in $(seq 400); do
		[ -s "$POD_SHARE/$name.json" ] && [ "$(json_get "$POD_SHARE/$name.json" tokens_generated)" -ge 6 ] && return 0
		sleep 0.05
	done
	fail "the engine in container llm did not get going: $(pod A logs llm 2>&1 | tail -n 5)"
}

# --- A -> B ------------------------------------------------------------------

start_server B 7480
start_llm run1
src_pid=$(pod_pid A llm)
move "$T/m1.json" 7480 --weights model
if [ "$MOVE_RC" != 0 ]; then
	cat "$T/m1.json.err"
	tail -n 20 "${SLOG[B]}"
	fail "migrate --container failed (status $MOVE_RC)"
fi
json_check "$T/m1.json" restored_pid bytes_sent_before_stop bytes_sent_during_stop image_bytes
assert_eq "source pid in the report" "$(json_get "$T/m1.json" pid)" "$src_pid"
assert_eq "weights bytes sent ahead" "$(json_get "$T/m1.json" bytes_sent_before_stop)" \
	"$(json_get "$T/seed.json" bytes_added)"
assert_lt "bytes sent during the stop" "$(json_get "$T/m1.json" bytes_sent_during_stop)" $((model_bytes / 4))
assert_lt "archive bytes" "$(json_get "$T/m1.json" image_bytes)" $((model_bytes / 4))
assert_eq "container on A" "$(pod_state A llm)" ""
assert_eq "container on B" "$(pod_state B llm)" running
assert_eq "restored pid" "$(json_get "$T/m1.json" restored_pid)" "$(pod_pid B llm)"
pod_wait_exit B llm 120
cmp "$T/ref.out" "$POD_SHARE/run1.out" || fail "the token stream differs from the run never stopped"
assert_eq "prefill steps (no recomputation)" "$(json_get "$POD_SHARE/run1.json" prefill_steps)" \
	"$(json_get "$T/ref.json" prefill_steps)"
pass "container llm A -> B: $(json_get "$T/m1.json" bytes_sent_before_stop) B ahead, $(json_get "$T/m1.json" bytes_sent_during_stop) B during the stop (archive $(json_get "$T/m1.json" image_bytes) B); stop $(json_get "$T/m1.json" stop_seconds.total) s (checkpoint $(json_get "$T/m1.json" stop_seconds.dump), transfer $(json_get "$T/m1.json" stop_seconds.transfer), restore $(json_get "$T/m1.json" stop_seconds.restore)); removed from A, ran to the end on B, tokens identical"
pod B rm -f llm >/dev/null

# --- B's restore fails: A restores its own ------------------------------------

start_server bad 7481 --container-restore-arg --no-such-option
start_llm run2
move "$T/f1.json" 7481 --weights model
[ "$MOVE_RC" != 0 ] || fail "migrate --container succeeded where B's restore must fail"
assert_eq "ok" "$(json_get "$T/f1.json" ok)" False
assert_eq "resumed" "$(json_get "$T/f1.json" resumed)" True
json_get "$T/f1.json" error | grep -q "restore failed" ||
	fail "the error does not say the target's restore failed: $(json_get "$T/f1.json" error)"
assert_eq "container on A" "$(pod_state A llm)" running
assert_eq "container on B" "$(pod_state B llm)" ""
pod_wait_exit A llm 120
cmp "$T/ref.out" "$POD_SHARE/run2.out" || fail "after the failed move: the token stream differs"
pass "B's restore fails: '$(json_get "$T/f1.json" error | cut -c1-90)'; llm restored on A in $(json_get "$T/f1.json" stop_seconds.resume) s and finished, tokens identical"
pod A rm -f llm >/dev/null

# --- a cooperative engine: its weights file found from its mappings, written
# on B before the stop; the archive holds no weights

run pod_in A "$KVMOTION" weights materialize model --store "$D/store" >/dev/null
start_server coop 7483 --weights-dir "$D/store/weights"
rm -f "$POD_SHARE/run4.out" "$POD_SHARE/run4.json"
pod_run_engine A llm -v "$D/store:$D/store:ro" -- --coop --store "$D/store" --model index:model \
	"${args[@]}" --step-delay-ms 60 --out "$POD_SHARE/run4.out" --status-file "$POD_SHARE/run4.json" --quiet
for _ in $(seq 400); do
	[ -s "$POD_SHARE/run4.json" ] && [ "$(json_get "$POD_SHARE/run4.json" tokens_generated)" -ge 6 ] && break
	sleep 0.05
done
move "$T/m4.json" 7483 --weights-dir "$D/store/weights"
if [ "$MOVE_RC" != 0 ]; then
	cat "$T/m4.json.err"
	tail -n 20 "${SLOG[coop]}"
	fail "migrate --container of a cooperative engine failed (status $MOVE_RC)"
fi
assert_eq "mode" "$(json_get "$T/m4.json" mode)" cooperative
# B has the chunks from the first move: the pre-copy sends the index, and B writes the file
assert_ge "weights bytes of the pre-copy (sent or had)" "$(json_get "$T/m4.json" precopy.bytes)" $((model_bytes * 9 / 10))
compgen -G "$(pod_dir B)/store/weights/*.kmw" >/dev/null || fail "no weights file on B"
assert_lt "archive bytes (no weights)" "$(json_get "$T/m4.json" image_bytes)" $((model_bytes / 4))
assert_eq "container on B" "$(pod_state B llm)" running
pod_wait_exit B llm 120
cmp "$T/ref.out" "$POD_SHARE/run4.out" || fail "cooperative move: the token stream differs"
assert_eq "restores seen by the engine" "$(json_get "$POD_SHARE/run4.json" restores)" 1
pass "cooperative container A -> B: weights file written on B ahead ($(json_get "$T/m4.json" precopy.bytes) B of index, $(json_get "$T/m4.json" bytes_sent_before_stop) B sent), archive $(json_get "$T/m4.json" image_bytes) B; stop $(json_get "$T/m4.json" stop_seconds.total) s (quiesce $(json_get "$T/m4.json" stop_seconds.quiesce)); tokens identical"
pod B rm -f llm >/dev/null

# --- the Kubernetes path with a real runtime: the kubelet's archive (podman's
# export has its layout) through the hook, restored from the OCI checkpoint
# image that before-restore made, by podman (containers/storage, as CRI-O)

start_server k8s 7482
start_llm run3
archive=$T/checkpoint-llm-0_default-llm-2026-11-26T16:00:00Z.tar
rm -rf "$T/k8s.json"*
in_node A "$KM_NS_A" "$KVMOTION" k8s-hook prepare --to "$KM_ADDR_B:7482" --psk-file "$T/psk" \
	--store "$D/store" --weights model >"$T/k8s-prepare.json" 2>&1 ||
	fail "k8s-hook prepare: $(cat "$T/k8s-prepare.json")"
pod_checkpoint A llm "$archive" --compress none
in_node A "$KM_NS_A" "$KVMOTION" k8s-hook checkpoint-done --to "$KM_ADDR_B:7482" --psk-file "$T/psk" \
	--store "$D/store" --archive "$archive" >"$T/k8s-done.json" 2>"$T/k8s-done.err" ||
	fail "k8s-hook checkpoint-done: $(cat "$T/k8s-done.json" "$T/k8s-done.err")"
assert_eq "split" "$(json_get "$T/k8s-done.json" split)" True
assert_eq "chunk bytes after the checkpoint" "$(json_get "$T/k8s-done.json" chunk_bytes_sent)" 0
tarch=$(json_get "$T/k8s-done.json" target_archive)
# the import: podman names an oci: image after its path, which must be lower case
cat >"$T/import" <<EOF2
#!/bin/sh
set -e
ln -sfn "\$1" /tmp/kvmotion-oci-\$\$
id=\$($T/podman-node pull -q oci:/tmp/kvmotion-oci-\$\$:latest)
rm -f /tmp/kvmotion-oci-\$\$
$T/podman-node tag "\$id" "\$2"
EOF2
chmod 755 "$T/import"
in_node B "$KM_NS_B" "$KVMOTION" k8s-hook before-restore --archive "$tarch" --store "$D/store" \
	--container llm --import-cmd "$T/import" >"$T/k8s-before.json" 2>"$T/k8s-before.err" ||
	fail "k8s-hook before-restore: $(cat "$T/k8s-before.json" "$T/k8s-before.err")"
image=$(json_get "$T/k8s-before.json" image)
assert_eq "imported" "$(json_get "$T/k8s-before.json" imported)" True
pod A rm -f llm >/dev/null # the controller deletes the source pod once B runs; here first, one output file
pod B container restore --keep "$image" >"$T/k8s-restore.out" 2>&1 || {
	cat "$T/k8s-restore.out"
	fail "podman could not restore the checkpoint image $image"
}
assert_eq "container on B" "$(pod_state B llm)" running
rpid=$(pod_pid B llm)
in_node B "$KM_NS_B" "$KVMOTION" k8s-hook after-restore --archive "$tarch" --store "$D/store" \
	--pid "$rpid" >"$T/k8s-after.json" 2>&1 || fail "k8s-hook after-restore: $(cat "$T/k8s-after.json")"
pod_wait_exit B llm 120
cmp "$T/ref.out" "$POD_SHARE/run3.out" || fail "restored from the checkpoint image: the token stream differs"
pass "Kubernetes path: podman's archive ($(file_size "$archive") B) through k8s-hook, restored by podman from the OCI checkpoint image $image on B; tokens identical"
