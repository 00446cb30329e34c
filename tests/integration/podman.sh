#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# kvmotion inside podman's own checkpoint and restore (podman 4 with runc,
# CRIU from PATH), on podman "nodes" of this machine (podman-lib.sh: each its
# own mount namespace, podman storage, store, configuration and criu).
#  - install: `meson install` into a DESTDIR puts kvmotion.so in CRIU's
#    default plugin dir, /etc/kvmotion/kvmotion.conf (the template) and a
#    timeout in /etc/criu/runc.conf that CRIU accepts; a second install
#    keeps what an administrator wrote, adding only a missing timeout;
#  - with that plugin and configuration and no store, a plain container
#    (sleep) checkpoints and restores as without kvmotion;
#  - the baseline: the test engine checkpointed without the plugin;
#  - transparent mode: the engine, mid-generation, checkpointed with
#    --export: the archive's checkpoint/ holds the split image (manifest and
#    delta, no pages-*.img, the weights referenced in node A's store);
#    restored with --import on node B (given the weights ahead with
#    `kvmotion seed`), it continues token for token;
#  - cooperative mode: node A's store and weights directory bind-mounted
#    read-only, engine --coop: no weights byte in the archive (its size is
#    the live KV, not the model); restored on B token for token;
#  - in place: checkpoint, then `podman container restore` on the same node;
#  - --leave-running: the container serves on and finishes token for token,
#    and the archive restores elsewhere and finishes token for token too;
#  - missing weights on the target (chunks, or a weights file): the restore
#    fails, CRIU's log names what is missing, no process of it exists and
#    no container runs; podman keeps a Created container, and once the
#    weights are there the same archive restores (after podman rm).
# Archive sizes and checkpoint/restore wall times are logged ("measure:").
# The engine writes its tokens and status into its own rootfs (/tmp), which
# the exported archive carries and a restore puts back as at the checkpoint.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init
engine_test_init "the GPU runs of the engine are in engine_criu_gpu and engine_coop_gpu"
# shellcheck source-path=SCRIPTDIR source=podman-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/podman-lib.sh"
pod_init

T=$KM_TMP
S=$POD_SHARE
D=$POD_NODE_DIR
model=$S/model.safetensors
run "$MKMODEL" "$model" --size $((64 << 20)) --seed 5
weights=$(file_size "$model")
# a short step delay: the checkpoint finds the engine mid-generation
args=(--model "$model" --seqs 4 --total-seqs 8 --prompt-len 24 --max-new 48 --kv-mib 32
	--kv-fill-mib 16 --seed 3)
run "$ENGINE" "${args[@]}" --out "$T/ref.out" --status-file "$T/ref.json" --quiet
ref_tokens=$(json_get "$T/ref.json" tokens_generated)
ref_prefill=$(json_get "$T/ref.json" prefill_steps)
log "reference: $ref_tokens tokens, $ref_prefill prefill steps"
export KVMOTION_SYNC=no

# same_tokens NODE NAME WHAT: the container's tokens equal the reference
same_tokens() {
	local out
	out=$(pod_file "$1" "$2" /tmp/out)
	cmp "$T/ref.out" "$out" || fail "$3: token stream differs from the uninterrupted run"
	assert_eq "$3: prefill steps (no recomputation)" \
		"$(json_get "$(pod_file "$1" "$2" /tmp/status.json)" prefill_steps)" "$ref_prefill"
}
# start NODE NAME [PODMAN-RUN OPTIONS...] -- [ENGINE OPTIONS...]: the engine
# mid-generation (at least 40 tokens, not done)
start() {
	local node=$1 name=$2 opts=()
	shift 2
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		opts+=("$1")
		shift
	done
	[ "${1:-}" = -- ] && shift
	pod_run_engine "$node" "$name" "${opts[@]}" -- "${args[@]}" --out /tmp/out \
		--status-file /tmp/status.json --step-delay-ms 40 "$@"
	pod_engine_wait "$node" "$name" /tmp/status.json 40
	[ "$(json_get "$(pod_file "$node" "$name" /tmp/status.json)" tokens_generated)" -lt \
		"$ref_tokens" ] || fail "engine $name finished before the checkpoint"
}
# extract ARCHIVE DIR: its checkpoint/ into DIR
extract() {
	mkdir -p "$2"
	tar -xf "$1" -C "$2" checkpoint || fail "no checkpoint/ in $1"
}
# not_running NODE WHAT: no container of NODE runs or holds a process
not_running() {
	local name state pid
	pod "$1" ps -a --format '{{.Names}} {{.State}} {{.Pid}}' >"$T/ps.out" 2>&1 ||
		fail "podman ps on node $1 failed: $(cat "$T/ps.out")"
	while read -r name state pid; do
		[ -n "$name" ] || continue
		case $state in
		running | paused | restoring | stopping) fail "$2: container $name is $state" ;;
		esac
		[ "${pid:-0}" = 0 ] || fail "$2: container $name has a process ($pid)"
	done <"$T/ps.out"
	log "node $1 after the failed restore: $(tr '\n' ';' <"$T/ps.out")"
}

# --- install ---------------------------------------------------------------
dest=$T/dest
log "\$ meson install -C $KM_BUILD_DIR --no-rebuild --destdir $dest"
DESTDIR='' meson install -C "$KM_BUILD_DIR" --no-rebuild --destdir "$dest" >"$T/install.log" 2>&1 || {
	tail -n 20 "$T/install.log"
	fail "meson install failed"
}
[ -f "$dest/usr/lib/criu/kvmotion.so" ] || fail "kvmotion.so is not in $dest/usr/lib/criu (CRIU's default plugin dir)"
cmp "$dest/usr/lib/criu/kvmotion.so" "$PLUGIN_DIR/kvmotion.so" || fail "the installed plugin is not the built one"
cmp "$dest/etc/kvmotion/kvmotion.conf" "$KM_SOURCE_DIR/criu-hooks/kvmotion.conf" ||
	fail "/etc/kvmotion/kvmotion.conf is not the template"
grep -qx 'timeout 600' "$dest/etc/criu/runc.conf" || fail "no 'timeout 600' in runc.conf: $(cat "$dest/etc/criu/runc.conf")"
"$CRIU" --config "$dest/etc/criu/runc.conf" check >/dev/null 2>&1 ||
	fail "CRIU does not accept the installed runc.conf"
pass "meson install: kvmotion.so in /usr/lib/criu, kvmotion.conf, runc.conf with timeout 600 (CRIU accepts it)"
# what an administrator wrote stays; only a missing timeout is added
printf 'store = /srv/kvmotion\n' >>"$dest/etc/kvmotion/kvmotion.conf"
cp "$dest/etc/kvmotion/kvmotion.conf" "$T/admin.conf"
printf 'tcp-established\ntimeout 45\n' >"$dest/etc/criu/runc.conf"
DESTDIR="$dest" "$KM_SOURCE_DIR/scripts/install-config.sh" "$KM_SOURCE_DIR/criu-hooks/kvmotion.conf" 600 \
	>/dev/null || fail "install-config.sh failed"
cmp "$T/admin.conf" "$dest/etc/kvmotion/kvmotion.conf" || fail "a second install changed kvmotion.conf"
[ "$(cat "$dest/etc/criu/runc.conf")" = "$(printf 'tcp-established\ntimeout 45')" ] ||
	fail "a second install changed a runc.conf that sets a timeout: $(cat "$dest/etc/criu/runc.conf")"
printf 'tcp-established' >"$dest/etc/criu/runc.conf"
DESTDIR="$dest" "$KM_SOURCE_DIR/scripts/install-config.sh" "$KM_SOURCE_DIR/criu-hooks/kvmotion.conf" 600 \
	>/dev/null || fail "install-config.sh failed"
[ "$(grep -v '^#' "$dest/etc/criu/runc.conf")" = "$(printf 'tcp-established\ntimeout 600')" ] ||
	fail "the timeout was not added after the existing line: $(cat "$dest/etc/criu/runc.conf")"
"$CRIU" --config "$dest/etc/criu/runc.conf" check >/dev/null 2>&1 ||
	fail "CRIU does not accept runc.conf with the added timeout"
pass "reinstall: kvmotion.conf and a runc.conf timeout kept; a missing timeout added on its own line"

# --- a plain container, the installed plugin and configuration, no store
plain_conf=$dest/etc/kvmotion/plain.conf
cp "$KM_SOURCE_DIR/criu-hooks/kvmotion.conf" "$plain_conf"
store_default=$(sed -n 's/^# store = //p' "$plain_conf")
if [ -e "$store_default" ]; then
	# this machine has a store there: point the copy elsewhere
	printf 'store = %s\n' "$T/no-store" >>"$plain_conf"
	store_default=$T/no-store
fi
pod_node_setup plain --plugin-dir "$dest/usr/lib/criu" --config "$plain_conf"
pod_run plain sleeper -- /bin/sleep 600
pod_checkpoint plain sleeper "$T/sleeper.tar"
grep -q "kvmotion: dump: store $store_default, split off" "$T/sleeper.tar.dump.log" ||
	fail "the installed plugin did not run passive (dump.log: $(grep kvmotion: "$T/sleeper.tar.dump.log" | head -n 3))"
pod_archive_has "$T/sleeper.tar" 'checkpoint/pages-*.img' || fail "the plain archive has no pages file"
pod_archive_has "$T/sleeper.tar" 'checkpoint/kvmotion.*' && fail "the plain archive holds kvmotion files"
pod plain rm sleeper >/dev/null
pod_restore plain "$T/sleeper.tar"
assert_eq "the restored sleeper's state" "$(pod_state plain sleeper)" running
pid=$(pod_pid plain sleeper)
[ "$pid" != 0 ] || fail "the restored sleeper has no pid"
[ "$(tr '\0' ' ' <"/proc/$pid/cmdline")" = "/bin/sleep 600 " ] ||
	fail "the restored container does not run the sleeper"
pod plain rm -f -t 0 sleeper >/dev/null
pass "plain container with the installed plugin and no store: checkpoint and restore as without kvmotion"

# --- the baseline: the engine, no plugin
pod_node_setup raw --no-plugin
start raw e0
pod_checkpoint raw e0 "$T/plain.tar"
plain_ckpt=$POD_SECONDS
plain_bytes=$(file_size "$T/plain.tar")
assert_ge "plain archive vs the weights" "$plain_bytes" "$weights"
pod raw rm e0 >/dev/null
pod_restore raw "$T/plain.tar"
plain_rest=$POD_SECONDS
pod_wait_exit raw e0 120
same_tokens raw e0 "plain restore"
log "measure: plain podman checkpoint: archive $plain_bytes B, checkpoint $plain_ckpt s, restore $plain_rest s"

# --- transparent mode, node A to node B
pod_node_setup a
pod_node_setup b
run pod_in a "$KVMOTION" seed "$model" --store "$D/store" --name model --no-sync >/dev/null
# B gets the weights ahead, as send-weights gives them
run pod_in b "$KVMOTION" seed "$model" --store "$D/store" --name model --no-sync >/dev/null
start a e1
rss=$(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$(pod_pid a e1)/status")
pod_checkpoint a e1 "$T/e1.tar"
tr_ckpt=$POD_SECONDS
tr_bytes=$(file_size "$T/e1.tar")
grep -q 'kvmotion: split' "$T/e1.tar.dump.log" || fail "dump.log has no split line"
pod_archive_has "$T/e1.tar" 'checkpoint/kvmotion.manifest' || fail "no kvmotion.manifest in the archive"
pod_archive_has "$T/e1.tar" 'checkpoint/kvmotion.delta' || fail "no kvmotion.delta in the archive"
pod_archive_has "$T/e1.tar" 'checkpoint/pages-*.img' && fail "the archive still holds a raw pages file"
extract "$T/e1.tar" "$T/e1"
"$KVMOTION" inspect "$T/e1/checkpoint" --json >"$T/e1.json" || fail "kvmotion inspect of the archive's checkpoint/ failed"
referenced=$(json_get "$T/e1.json" bytes_referenced)
dynamic=$((rss - weights))
assert_ge "weights referenced from node A's store" "$referenced" $((weights * 9 / 10))
assert_lt "archive vs the weights" "$tr_bytes" "$weights"
assert_lt "archive vs the live dynamic memory + 4 MiB" "$tr_bytes" $((dynamic + (4 << 20)))
pass "transparent archive: split image ($referenced B referenced, no pages-*.img), $tr_bytes B < dynamic $dynamic B"
pod_restore b "$T/e1.tar"
tr_rest=$POD_SECONDS
grep -q 'kvmotion: joined' "$T/e1.tar.restore.log" || fail "restore.log on node B has no join line"
# late weights, the task found by its pid inside the container (NSpid)
grep -qE 'kvmotion: late weights: [0-9]+ bytes written into pid [0-9]+ \([0-9]+ in the image\)' \
	"$T/e1.tar.restore.log" || {
	km_criu_log_tail "$T/e1.tar.restore.log"
	fail "restore.log on node B: the weights were not written late"
}
log "CRIU's log: $(grep -m1 'late weights: [0-9]* bytes written' "$T/e1.tar.restore.log")"
pod_wait_exit b e1 120
same_tokens b e1 "transparent restore on node B"
pass "transparent mode: restored on node B, token for token ($ref_tokens tokens, no extra prefill)"
log "measure: transparent: archive $tr_bytes B, checkpoint $tr_ckpt s, restore $tr_rest s"

# --- in place: checkpoint, then restore on the same node
start a e2
pod_checkpoint a e2 "$T/e2.tar"
assert_eq "state after the checkpoint" "$(pod_state a e2)" exited
log "\$ podman container restore [a] e2"
pod a container restore --keep e2 >"$T/e2.restore.out" 2>&1 || {
	cat "$T/e2.restore.out"
	fail "in-place restore failed"
}
pod_wait_exit a e2 120
same_tokens a e2 "in-place restore"
pass "in place: checkpoint and restore on node A, token for token"

# --- cooperative mode: the store and weights read-only in the container
run pod_in a "$KVMOTION" weights materialize model --store "$D/store" >/dev/null
# the node's store, with its weights directory, at the same path read-only;
# the engine opens the weights index the node seeded and materialized
coop_opts=(-v "$D/store:$D/store:ro")
coop_args=(--coop --store "$D/store" --model index:model)
start a e3 "${coop_opts[@]}" -- "${coop_args[@]}"
pod_checkpoint a e3 "$T/e3.tar"
coop_ckpt=$POD_SECONDS
coop_bytes=$(file_size "$T/e3.tar")
grep -q 'kvmotion: engine in pid .* quiesced' "$T/e3.tar.dump.log" || fail "the plugin did not quiesce the engine"
pod_archive_has "$T/e3.tar" 'checkpoint/kvmotion.engines' || fail "no kvmotion.engines in the archive"
extract "$T/e3.tar" "$T/e3"
# no 4 KiB of the model anywhere in the archive's memory pages
python3 - "$model" "$T/e3/checkpoint" <<'EOF' || fail "the cooperative archive holds weights"
import glob, sys
model = open(sys.argv[1], "rb").read()
pages = b"".join(open(p, "rb").read() for p in glob.glob(sys.argv[2] + "/pages-*.img"))
step = len(model) // 16
found = [o for o in range(4096, len(model) - 4096, step) if model[o:o + 4096] in pages]
print("# model pieces found in the pages:", found)
sys.exit(1 if found else 0)
EOF
assert_lt "cooperative archive vs the weights / 2" "$coop_bytes" $((weights / 2))
pass "cooperative archive: $coop_bytes B, no weights in it (model $weights B)"
run pod_in b "$KVMOTION" weights materialize model --store "$D/store" >/dev/null
pod_restore b "$T/e3.tar"
coop_rest=$POD_SECONDS
grep -q 'weights files present and verified' "$T/e3.tar.restore.log" ||
	fail "restore.log on node B does not show the weights check"
pod_wait_exit b e3 120
same_tokens b e3 "cooperative restore on node B"
assert_eq "restores seen by the engine" "$(json_get "$(pod_file b e3 /tmp/status.json)" restores)" 1
pass "cooperative mode: restored on node B, token for token"
log "measure: cooperative: archive $coop_bytes B, checkpoint $coop_ckpt s, restore $coop_rest s"

# --- --leave-running: serves on, and the archive restores elsewhere too
start a e4 "${coop_opts[@]}" -- "${coop_args[@]}"
pod_checkpoint a e4 "$T/e4.tar" --leave-running
assert_eq "state after a --leave-running checkpoint" "$(pod_state a e4)" running
# another name, so another id: the cgroup (cgroupfs) and runc state of the
# container still running must not be shared on this one machine
pod_restore b "$T/e4.tar" --name e4b
[ "$(pod a inspect -f '{{.Id}}' e4)" != "$(pod b inspect -f '{{.Id}}' e4b)" ] ||
	fail "the restored copy has the id of the container left running"
pod_wait_exit a e4 120
same_tokens a e4 "the container left running"
pod_wait_exit b e4b 120
same_tokens b e4b "the copy restored from the --leave-running archive"
pass "--leave-running: the container finished token for token, and so did its copy on node B"

# --- weights missing on the target: refused, nothing left running
pod_node_setup c
run pod_in c "$KVMOTION" store init --store "$D/store" --no-sync >/dev/null
WHAT="transparent archive without its chunks"
if pod_try_restore c "$T/e1.tar" "$T/c1.out"; then
	fail "$WHAT: the restore succeeded"
fi
grep -q 'kvmotion: .*chunk [0-9a-f]*.*missing\|kvmotion: .*missing.*chunk' "$T/e1.tar.restore.log" || {
	cat "$T/c1.out"
	km_criu_log_tail "$T/e1.tar.restore.log"
	fail "$WHAT: CRIU's log does not name the missing chunk"
}
not_running c "$WHAT"
log "podman said: $(tail -n 1 "$T/c1.out")"
log "CRIU's log: $(grep 'kvmotion:' "$T/e1.tar.restore.log" | grep -i missing | head -n 1)"
pass "$WHAT: refused, the missing chunk named, no container running on node C"
pod c rm -a -f >/dev/null 2>&1 || true
WHAT="cooperative archive without its weights file"
run pod_in c "$KVMOTION" seed "$model" --store "$D/store" --name model --no-sync >/dev/null
wfile=$(basename "$(ls "$(pod_store a)"/weights/*.kmw)")
if pod_try_restore c "$T/e3.tar" "$T/c2.out"; then
	fail "$WHAT: the restore succeeded"
fi
grep -q "kvmotion: weights file.*$wfile" "$T/e3.tar.restore.log" || {
	cat "$T/c2.out"
	km_criu_log_tail "$T/e3.tar.restore.log"
	fail "$WHAT: CRIU's log does not name the missing weights file $wfile"
}
not_running c "$WHAT"
log "CRIU's log: $(grep 'kvmotion:' "$T/e3.tar.restore.log" | grep "$wfile" | head -n 1)"
pass "$WHAT: refused, $wfile named, no container running on node C"
# podman keeps the container it made for the import (Created, no process):
# once the weights are there, remove it and import again
run pod_in c "$KVMOTION" weights materialize model --store "$D/store" >/dev/null
pod c rm e3 >/dev/null
pod_restore c "$T/e3.tar"
pod_wait_exit c e3 120
same_tokens c e3 "the cooperative restore retried on node C"
pass "retried on node C once its weights file was there: token for token"

log "measure: archives: plain $plain_bytes B, transparent $tr_bytes B, cooperative $coop_bytes B (model $weights B)"
log "measure: checkpoint s: plain $plain_ckpt, transparent $tr_ckpt, cooperative $coop_ckpt; restore s: plain $plain_rest, transparent $tr_rest, cooperative $coop_rest"
