#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# `kvmotion migrate` between the two test hosts of netns.sh, on the real CRIU
# with kvmotion's plugin: the test engine migrated mid-generation, and its
# token stream compared with a run never stopped.
#
#   - cooperative engine A -> B: its weights file sent ahead (found from its
#     mappings), no weights in the stop, the image sent as CRIU wrote it
#     (unsplit); then B -> A while it still generates: almost nothing sent
#     before the stop (A has the weights);
#   - cooperative engine to a target that holds another replica of the model
#     (seeded and materialized there from its own copy of the model file):
#     no weights bytes at all;
#   - plain engine (transparent mode) A -> B with --weights: the chunks go
#     ahead, the stop sends only what the split did not find;
#   - plain engines with no --weights: the model file the engine keeps open
#     found in /proc/PID/fd and seeded on the fly; a --snapshot to a target
#     that takes no incremental images (serve --no-incremental, as protocol
#     1.2 was): read live, kept with --keep-snapshot as
#     pagemap-1.img/pages-1.img, then --snapshot=criu (a criu dump
#     --leave-running), seeded into the store; both sent ahead (the
#     incremental stop over a snapshot: migrate_incr.sh);
#   - failures after the stop began, each leaving the engine generating on A
#     with the same tokens and the report saying why: the target's restore
#     fails (with the libcuda test double: the GPU state is restored and
#     unlocked by migrate, a process other than the one that checkpointed
#     it), a chunk corrupted in flight, a piece of an unsplit image corrupted
#     in flight, the receiver killed during the stop, the target's image area
#     full (a 2 MiB tmpfs), the link cut during the stop (the veth set down by
#     the target's restore command: the sender finds the peer gone through
#     keepalive, within ~10 s).
#
# Same host, shared filesystem: each engine runs as the init of its own pid
# namespace (unshare --pid --fork setsid), so that CRIU restores it into a
# new one on the target while the stopped source still exists (no pid
# clash); both hosts use one weights directory, so that the restored engine
# finds its weights file at the path it mapped.
#
#   KM_LINK_RATE (10gbit)
set -euo pipefail

# lib.sh, netns.sh, the two hosts and the migration helpers
# shellcheck source-path=SCRIPTDIR source=migrate-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/migrate-lib.sh"

# --- models, references, receivers -------------------------------------------

run "$MKMODEL" "$T/coop.safetensors" --size 64M --seed 5 --dim 256 --layers 4
run "$MKMODEL" "$T/plain.safetensors" --size 48M --seed 6 --dim 256 --layers 4
run "$MKMODEL" "$T/nopre.safetensors" --size 16M --seed 7 --dim 256 --layers 4
run "$MKMODEL" "$T/open.safetensors" --size 16M --seed 8 --dim 256 --layers 4
run "$MKMODEL" "$T/snap.safetensors" --size 16M --seed 9 --dim 256 --layers 4
run "$KVMOTION" store init --store "$storeA" --no-sync
for m in plain nopre; do
	kvm "$T/seed-$m.json" seed "$T/$m.safetensors" --store "$storeA" --name "$m" --no-sync --json
done
for m in coop plain nopre open snap; do
	run "$ENGINE" --model "$T/$m.safetensors" "${args[@]}" --step-delay-ms 0 \
		--out "$T/ref-$m.out" --status-file "$T/ref-$m.json" --quiet
done
model_bytes=$(file_size "$T/coop.safetensors")

start_server B "$KM_NS_B" "$KM_ADDR_B" 7460 "$storeB" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR"
start_server A "$KM_NS_A" "$KM_ADDR_A" 7461 "$storeA" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR"
toB=$KM_ADDR_B:7460
toA=$KM_ADDR_A:7461

# --- cooperative: A -> B, then back B -> A while it generates -----------------

# slower steps: the engine must still be generating for the way back
start_engine coop "$KM_NS_A" "$T/coop.safetensors" --coop --step-delay-ms 60
pid=$ENGINE_PID
migrate_ok "$T/m1.json" "$KM_NS_A" "$storeA" "$pid" "$toB"
rpid=$(json_get "$T/m1.json" restored_pid)
gen=$(json_get "$T/coop.json" tokens_generated)
kill -0 "$rpid" 2>/dev/null || fail "the engine restored on B is gone (or ended) before the way back"
migrate_ok "$T/m2.json" "$KM_NS_B" "$storeB" "$rpid" "$toA"
rpid2=$(json_get "$T/m2.json" restored_pid)

assert_eq "mode" "$(json_get "$T/m1.json" mode)" cooperative
assert_eq "image (cooperative: not split)" "$(json_get "$T/m1.json" image)" unsplit
assert_eq "split time (none)" "$(sec "$T/m1.json" split)" 0.0
assert_eq "chunk bytes during the stop" "$(json_get "$T/m1.json" stop.bytes_sent)" 0
assert_ge "weights bytes sent before the stop" "$(json_get "$T/m1.json" bytes_sent_before_stop)" $((model_bytes * 9 / 10))
assert_lt "bytes sent during the stop (no weights)" "$(json_get "$T/m1.json" bytes_sent_during_stop)" $((model_bytes / 4))
wait_pid_gone "$pid" 5
pass "cooperative A -> B: pid $pid -> $rpid on B; $(json_get "$T/m1.json" bytes_sent_before_stop) B before the stop, $(json_get "$T/m1.json" bytes_sent_during_stop) B during; $(phases "$T/m1.json")"

assert_eq "mode (way back)" "$(json_get "$T/m2.json" mode)" cooperative
assert_lt "weights bytes sent before the stop, back to A" "$(json_get "$T/m2.json" bytes_sent_before_stop)" 4096
assert_ge "bytes the target had" "$(json_get "$T/m2.json" bytes_deduplicated)" $((model_bytes * 9 / 10))
wait_pid_gone "$rpid" 5
[ "$(stat -L -c %i "/proc/$rpid2/ns/net")" = "$(stat -L -c %i "/run/netns/$KM_NS_A")" ] ||
	fail "the engine restored on A is not in host A's network namespace"
finish coop "$rpid2" "$T/ref-coop.out"
assert_eq "restores seen by the engine" "$(json_get "$T/coop.json" restores)" 2
pass "cooperative B -> A (at token $gen): $(json_get "$T/m2.json" bytes_sent_before_stop) B before the stop, $(json_get "$T/m2.json" bytes_deduplicated) deduplicated; $(phases "$T/m2.json"); tokens identical, no extra prefill"

# --- transparent: a plain engine, its weights index sent ahead ----------------

start_engine plain "$KM_NS_A" "$T/plain.safetensors"
pid=$ENGINE_PID
migrate_ok "$T/m3.json" "$KM_NS_A" "$storeA" "$pid" "$toB" --weights plain
plain_bytes=$(json_get "$T/seed-plain.json" bytes_added)
assert_eq "mode" "$(json_get "$T/m3.json" mode)" transparent
assert_eq "image (transparent: split)" "$(json_get "$T/m3.json" image)" split
assert_eq "weights bytes sent before the stop" "$(json_get "$T/m3.json" bytes_sent_before_stop)" "$plain_bytes"
assert_lt "chunk bytes sent during the stop" "$(json_get "$T/m3.json" stop.bytes_sent)" $((plain_bytes / 10))
assert_ge "bytes of the stop the target had" "$(json_get "$T/m3.json" stop.bytes_deduplicated)" $((plain_bytes * 9 / 10))
finish plain "$(json_get "$T/m3.json" restored_pid)" "$T/ref-plain.out"
pass "transparent A -> B: $plain_bytes B of weights before the stop, $(json_get "$T/m3.json" stop.bytes_sent) chunk bytes during it; $(phases "$T/m3.json"); tokens identical"

# --- transparent, no --weights: open model files, a snapshot ------------------

open_bytes=$(file_size "$T/open.safetensors")
start_engine open "$KM_NS_A" "$T/open.safetensors" --keep-model-open
pid=$ENGINE_PID
migrate_ok "$T/m5.json" "$KM_NS_A" "$storeA" "$pid" "$toB"
assert_eq "mode" "$(json_get "$T/m5.json" mode)" transparent
assert_eq "where the weights were found" "$(json_get "$T/m5.json" weights_from)" "['open']"
json_get "$T/m5.json" weights | grep -q "open-open.safetensors-" || fail "index name: $(json_get "$T/m5.json" weights)"
assert_ge "model bytes seeded" "$(json_get "$T/m5.json" bytes_seeded)" "$open_bytes"
assert_ge "weights bytes sent before the stop" "$(json_get "$T/m5.json" bytes_sent_before_stop)" $((open_bytes * 9 / 10))
assert_lt "chunk bytes sent during the stop" "$(json_get "$T/m5.json" stop.bytes_sent)" $((open_bytes / 10))
finish open "$(json_get "$T/m5.json" restored_pid)" "$T/ref-open.out"
pass "transparent, model file found open (/proc/PID/fd): $(json_get "$T/m5.json" bytes_sent_before_stop) B before the stop, $(json_get "$T/m5.json" stop.bytes_sent) chunk bytes during it; $(phases "$T/m5.json"); tokens identical"

snap_bytes=$(file_size "$T/snap.safetensors")
start_server old "$KM_NS_B" "$KM_ADDR_B" 7467 "$storeB" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR" --no-incremental
start_engine snap "$KM_NS_A" "$T/snap.safetensors"
pid=$ENGINE_PID
migrate_ok "$T/m6.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7467" --snapshot --keep-snapshot
assert_eq "where the weights were found" "$(json_get "$T/m6.json" weights_from)" "['snapshot']"
assert_eq "snapshot mode (the default)" "$(json_get "$T/m6.json" snapshot.mode)" live
assert_eq "incremental (an old target)" "$(json_get "$T/m6.json" incremental)" False
json_get "$T/m6.json" incremental_why | grep -q "protocol 1.3" || fail "incremental_why: $(json_get "$T/m6.json" incremental_why)"
assert_ge "weights bytes sent before the stop" "$(json_get "$T/m6.json" bytes_sent_before_stop)" $((snap_bytes * 9 / 10))
assert_lt "chunk bytes sent during the stop" "$(json_get "$T/m6.json" stop.bytes_sent)" $((snap_bytes / 10))
# kept: named as CRIU names them, the engine being pid 1 of its namespace
if [ ! -f "$T/m6.json.work/snapshot/pagemap-1.img" ] || [ ! -f "$T/m6.json.work/snapshot/pages-1.img" ]; then
	fail "--keep-snapshot: WORK/snapshot holds $(ls "$T/m6.json.work/snapshot" 2>&1)"
fi
assert_eq "kept pages bytes" "$(file_size "$T/m6.json.work/snapshot/pages-1.img")" "$(json_get "$T/m6.json" snapshot.image_bytes)"
finish snap "$(json_get "$T/m6.json" restored_pid)" "$T/ref-snap.out"
pass "transparent with --snapshot (live, $(json_get "$T/m6.json" snapshot.seconds) s): $(json_get "$T/m6.json" bytes_seeded) B of pages seeded, $(json_get "$T/m6.json" bytes_sent_before_stop) B before the stop, $(json_get "$T/m6.json" bytes_sent_during_stop) B during it; $(phases "$T/m6.json"); tokens identical"

start_engine snap "$KM_NS_A" "$T/snap.safetensors"
pid=$ENGINE_PID
migrate_ok "$T/m7.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7467" --snapshot=criu
assert_eq "snapshot mode" "$(json_get "$T/m7.json" snapshot.mode)" criu
assert_eq "where the weights were found" "$(json_get "$T/m7.json" weights_from)" "['snapshot']"
[ ! -e "$T/m7.json.work/snapshot" ] || fail "the snapshot directory was left behind"
finish snap "$(json_get "$T/m7.json" restored_pid)" "$T/ref-snap.out"
pass "transparent with --snapshot=criu ($(json_get "$T/m7.json" snapshot.seconds) s): $(json_get "$T/m7.json" bytes_seeded) B of pages seeded, $(json_get "$T/m7.json" bytes_sent_during_stop) B during the stop; tokens identical"

# --- failures: the engine goes on on A ----------------------------------------

# The target's restore fails; the engine's "GPU" is the test double's: the
# plugin locks and checkpoints it in the dump, migrate restores and unlocks it.
start_server bad "$KM_NS_B" "$KM_ADDR_B" 7462 "$storeB" --restore-cmd false
start_engine fail1 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
if [ -n "${KM_CUDA_DOUBLE:-}" ] && [ -f "$KM_CUDA_DOUBLE" ]; then
	mkdir -p "$T/cuda"
	echo running >"$T/cuda/$pid"
	export KVMOTION_LIBCUDA=$KM_CUDA_DOUBLE KM_CUDA_DOUBLE_DIR=$T/cuda
fi
migrate_fails "$T/f1.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7462" "restore failed"
if [ -n "${KVMOTION_LIBCUDA:-}" ]; then
	grep -q "GPU state of $pid checkpointed" "$T/f1.json.work/img/dump.log" ||
		fail "the plugin did not checkpoint the double's GPU state"
	assert_eq "GPU state after the failed migration" "$(cat "$T/cuda/$pid")" running
	unset KVMOTION_LIBCUDA KM_CUDA_DOUBLE_DIR
	gpu_note="GPU (test double) restored and unlocked, "
fi
finish fail1 "$pid" "$T/ref-coop.out"
pass "target restore fails: '$(json_get "$T/f1.json" error | cut -c1-100)'; ${gpu_note:-}engine resumed, tokens identical; $(phases "$T/f1.json")"

# A chunk damaged in flight: no pre-copy, so the stop carries the weights.
start_engine fail2 "$KM_NS_A" "$T/nopre.safetensors"
pid=$ENGINE_PID
KVMOTION_TEST_CORRUPT_SEND=2 migrate_fails "$T/f2.json" "$KM_NS_A" "$storeA" "$pid" "$toB" "corrupt"
grep -q "EBADMSG" "$T/f2.json" || fail "the report does not say EBADMSG"
finish fail2 "$pid" "$T/ref-nopre.out"
pass "chunk corrupted in flight: '$(json_get "$T/f2.json" error | cut -c1-100)'; engine resumed, tokens identical"

# The receiver dies during the stop (its restore command kills it).
# shellcheck disable=SC2016 # $PPID is the wrapper's
printf '#!/bin/sh\nkill -KILL $PPID\nsleep 5\n' >"$T/kill-serve"
chmod +x "$T/kill-serve"
start_server victim "$KM_NS_B" "$KM_ADDR_B" 7463 "$storeB" --restore-cmd "$T/kill-serve"
start_engine fail3 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_fails "$T/f3.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7463" "connection|reset|closed"
kill -0 "${SPID[victim]}" 2>/dev/null && fail "the receiver was not killed"
finish fail3 "$pid" "$T/ref-coop.out"
pass "receiver killed during the stop: '$(json_get "$T/f3.json" error | cut -c1-100)'; engine resumed, tokens identical; $(phases "$T/f3.json")"

# A piece of the unsplit image damaged in flight (after the sender hashed it).
start_engine fail4 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
KVMOTION_TEST_CORRUPT_PIECE=3 migrate_fails "$T/f4.json" "$KM_NS_A" "$storeA" "$pid" "$toB" "corrupt in flight"
assert_eq "errno" "$(json_get "$T/f4.json" errno)" EBADMSG
finish fail4 "$pid" "$T/ref-coop.out"
pass "unsplit image piece corrupted in flight: '$(json_get "$T/f4.json" error | cut -c1-100)'; engine resumed, tokens identical"

# The target's image area is full: a 2 MiB tmpfs, the image is larger.
mkdir -p "$T/images-full"
mount -t tmpfs -o size=2m kmfull "$T/images-full" || skip "cannot mount a tmpfs"
umount_full() { umount -l "$T/images-full" 2>/dev/null || true; }
KM_CLEANUP_HOOKS+=(umount_full)
start_server full "$KM_NS_B" "$KM_ADDR_B" 7464 "$storeB" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR"
start_engine fail5 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_fails "$T/f5.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7464" "No space left"
assert_eq "errno" "$(json_get "$T/f5.json" errno)" ENOSPC
[ -z "$(ls -A "$T/images-full")" ] || fail "the full image area still holds $(ls -A "$T/images-full")"
finish fail5 "$pid" "$T/ref-coop.out"
pass "target's disk full: '$(json_get "$T/f5.json" error | cut -c1-100)'; image directory removed, engine resumed, tokens identical; $(phases "$T/f5.json")"

# The link is cut in the middle of the stop: the target's restore command
# sets its end of the veth down (no error frame can come back, no FIN).
printf '#!/bin/sh\nip link set dev %s down\nsleep 15\nexit 1\n' "$KM_VETH_B" >"$T/cut-link"
chmod +x "$T/cut-link"
start_server cut "$KM_NS_B" "$KM_ADDR_B" 7465 "$storeB" --restore-cmd "$T/cut-link"
start_engine fail6 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
t0=$(date +%s)
migrate_fails "$T/f6.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7465" "timed out|connection"
# TCP gives up with ETIMEDOUT, or with EHOSTUNREACH when A's neighbour entry for
# B expired meanwhile and could not be resolved again (the kernel reports that
# soft error instead): both say the peer stopped answering
case $(json_get "$T/f6.json" errno) in
ETIMEDOUT | EHOSTUNREACH) ;;
*) fail "errno: $(json_get "$T/f6.json" errno), expected ETIMEDOUT or EHOSTUNREACH" ;;
esac
assert_lt "seconds until the sender gave up" $(($(date +%s) - t0)) 40
ip -n "$KM_NS_B" link set "$KM_VETH_B" up
finish fail6 "$pid" "$T/ref-coop.out"
pass "link cut during the stop: '$(json_get "$T/f6.json" error | cut -c1-100)'; engine resumed, tokens identical; $(phases "$T/f6.json")"
for _ in $(seq 100); do
	ip -n "$KM_NS_A" -br link show dev "$KM_VETH_A" | grep -q ' UP ' && break
	sleep 0.05
done

# A target that holds another replica of the model: a new store on B, seeded
# and materialized from B's own copy of the model file (as an engine started
# there would). The weights directory is the one both hosts share.
mkdir -p "$T/replica"
cp "$T/coop.safetensors" "$T/replica/model.safetensors"
run "$KVMOTION" weights resolve "$T/replica/model.safetensors" --store "$T/storeC" --weights-dir "$wdir" --no-sync
start_server C "$KM_NS_B" "$KM_ADDR_B" 7466 "$T/storeC" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR"
start_engine rep "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_ok "$T/m4.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7466"
assert_eq "weights bytes sent before the stop" "$(json_get "$T/m4.json" bytes_sent_before_stop)" 0
assert_eq "chunk bytes sent during the stop" "$(json_get "$T/m4.json" stop.bytes_sent)" 0
assert_ge "weights bytes the target had" "$(json_get "$T/m4.json" bytes_deduplicated)" $((model_bytes * 9 / 10))
finish rep "$(json_get "$T/m4.json" restored_pid)" "$T/ref-coop.out"
pass "target with its own replica of the model: 0 weights bytes sent, $(json_get "$T/m4.json" bytes_deduplicated) B deduplicated; $(phases "$T/m4.json"); tokens identical"
