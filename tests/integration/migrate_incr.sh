#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# `kvmotion migrate --snapshot` to a target of protocol 1.3, between the two
# test hosts of netns.sh, on the real CRIU with kvmotion's plugin: during the
# pre-copy a criu dump --leave-running (the snapshot) goes to the target,
# which keeps it as an image directory; at the stop only the pages that
# differ from the snapshot's cross, in an incremental image whose `parent`
# is that snapshot, and CRIU restores from the two.
#
#   - cooperative engine (its weights file ahead, the snapshot unsplit) and
#     plain engine (transparent: its weights index ahead, the snapshot split
#     against it): tokens identical to a run never stopped, no join in the
#     stop, the bytes of the stop far below the dynamic bytes dumped (the
#     synthetic KV, --kv-fill-mib, does not change; a few tokens' worth does);
#   - the target refuses a parent that is not the snapshot the sender
#     compared against (its id differs, or no such directory): the engine
#     goes on on A with the same tokens and the report says why;
#   - the parent removed on the target between the image's arrival and the
#     restore: CRIU's restore refuses, the engine goes on on A;
#   - a target that takes no incremental images (serve --no-incremental):
#     the stop sends the whole image, the report says why.
#
#   KM_LINK_RATE (10gbit)
set -euo pipefail

# lib.sh, netns.sh, the two hosts and the migration helpers
# shellcheck source-path=SCRIPTDIR source=migrate-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/migrate-lib.sh"

# incremental OUT [DUMP]: the stop went incremental over a snapshot the
# target holds, its dump made as DUMP says (page-server, the default, or file)
incremental() {
	local out=$1 dump=${2:-page-server} dumped sent written
	assert_eq "incremental" "$(json_get "$out" incremental)" True
	assert_eq "the stop's dump" "$(json_get "$out" pages.dump)" "$dump"
	if [ "$dump" = page-server ]; then
		# the page server wrote the pages that differ, never a whole dump
		written=$(file_bytes "$out.work/img" -name 'pages-*.img')
		assert_eq "pages-*.img bytes on A" "$written" $(($(json_get "$out" pages.sent) * 4096))
	fi
	assert_eq "image (incremental: unsplit)" "$(json_get "$out" image)" unsplit
	[ -n "$(json_get "$out" snapshot.target_dir)" ] || fail "no snapshot directory on the target"
	# no weights byte copied on the target in the stop
	assert_eq "join in the stop" "$(sec "$out" join)" 0.0
	assert_eq "chunk bytes during the stop" "$(json_get "$out" stop.bytes_sent)" 0
	dumped=$(($(json_get "$out" pages.dumped) * 4096))
	sent=$(json_get "$out" bytes_sent_during_stop)
	assert_ge "pages read from the snapshot" "$(json_get "$out" pages.from_snapshot)" 1
	assert_lt "bytes during the stop vs the dynamic bytes dumped ($dumped)" "$sent" $((dumped / 4))
	[ ! -e "$out.work/snapshot" ] || fail "the snapshot's copy on A was left behind"
}

summary() {
	printf '%s B of %s dumped B sent in the stop (%s of %s pages from the snapshot; snapshot: %s, %s s, %s B); %s; compare %s s' \
		"$(json_get "$1" bytes_sent_during_stop)" "$(($(json_get "$1" pages.dumped) * 4096))" \
		"$(json_get "$1" pages.from_snapshot)" "$(json_get "$1" pages.dumped)" \
		"$(json_get "$1" snapshot.mode)" "$(json_get "$1" snapshot.seconds)" "$(json_get "$1" snapshot.image_bytes)" \
		"$(phases "$1")" "$(sec "$1" compare)"
}

run "$MKMODEL" "$T/coop.safetensors" --size 32M --seed 5 --dim 256 --layers 4
run "$MKMODEL" "$T/plain.safetensors" --size 32M --seed 6 --dim 256 --layers 4
run "$KVMOTION" store init --store "$storeA" --no-sync
kvm "$T/seed-plain.json" seed "$T/plain.safetensors" --store "$storeA" --name plain --no-sync --json
for m in coop plain; do
	run "$ENGINE" --model "$T/$m.safetensors" "${args[@]}" --step-delay-ms 0 \
		--out "$T/ref-$m.out" --status-file "$T/ref-$m.json" --quiet
done

start_server B "$KM_NS_B" "$KM_ADDR_B" 7470 "$storeB" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR"
toB=$KM_ADDR_B:7470

# --- both modes ---------------------------------------------------------------

start_engine coop "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_ok "$T/i1.json" "$KM_NS_A" "$storeA" "$pid" "$toB" --snapshot
assert_eq "mode" "$(json_get "$T/i1.json" mode)" cooperative
assert_eq "snapshot mode (the default)" "$(json_get "$T/i1.json" snapshot.mode)" live
incremental "$T/i1.json"
snapdir=$(json_get "$T/i1.json" snapshot.target_dir)
rdir=$(json_get "$T/i1.json" target_dir)
assert_eq "the stop image's parent on the target" "$(readlink "$T/images-B/$rdir/parent")" "../$snapdir"
# once restored from it, the snapshot is of no more use there: removed
[ ! -e "$T/images-B/$snapdir" ] || fail "the snapshot $snapdir stayed on the target after the restore"
grep -q "image $rdir: its parent $snapdir removed after the restore" "${SLOG[B]}" ||
	fail "the target's log does not say it removed the parent"
wait_pid_gone "$pid" 5
finish coop "$(json_get "$T/i1.json" restored_pid)" "$T/ref-coop.out"
assert_eq "restores seen by the engine" "$(json_get "$T/coop.json" restores)" 1
pass "cooperative, incremental: $(summary "$T/i1.json"); tokens identical"

start_engine plain "$KM_NS_A" "$T/plain.safetensors"
pid=$ENGINE_PID
migrate_ok "$T/i2.json" "$KM_NS_A" "$storeA" "$pid" "$toB" --snapshot --weights plain
assert_eq "mode" "$(json_get "$T/i2.json" mode)" transparent
incremental "$T/i2.json"
plain_bytes=$(file_size "$T/plain.safetensors")
assert_ge "dynamic bytes dumped (the weights are anonymous memory)" \
	$(($(json_get "$T/i2.json" pages.dumped) * 4096)) "$plain_bytes"
# the snapshot's weights chunks were at the target already
assert_lt "chunk bytes of the snapshot" "$(json_get "$T/i2.json" snapshot.bytes_sent)" $((plain_bytes / 10))
wait_pid_gone "$pid" 5
finish plain "$(json_get "$T/i2.json" restored_pid)" "$T/ref-plain.out"
pass "transparent, incremental: $(summary "$T/i2.json"); tokens identical"

# the same over a snapshot taken by criu dump --leave-running
start_engine coop3 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_ok "$T/i3.json" "$KM_NS_A" "$storeA" "$pid" "$toB" --snapshot=criu --stop-dump=file
assert_eq "snapshot mode" "$(json_get "$T/i3.json" snapshot.mode)" criu
incremental "$T/i3.json" file
wait_pid_gone "$pid" 5
finish coop3 "$(json_get "$T/i3.json" restored_pid)" "$T/ref-coop.out"
pass "cooperative, incremental over a criu snapshot, the whole dump written and compared after it: $(summary "$T/i3.json"); tokens identical"

# --- a parent that is not the one compared against ------------------------------

start_engine w1 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
KVMOTION_TEST_WRONG_PARENT=1 migrate_fails "$T/f1.json" "$KM_NS_A" "$storeA" "$pid" "$toB" \
	"is not snapshot" --snapshot
assert_eq "errno" "$(json_get "$T/f1.json" errno)" ENOENT
finish w1 "$pid" "$T/ref-coop.out"
pass "parent of another id refused: '$(json_get "$T/f1.json" error | cut -c1-110)'; engine resumed, tokens identical"

start_engine w2 "$KM_NS_A" "$T/plain.safetensors"
pid=$ENGINE_PID
KVMOTION_TEST_WRONG_PARENT=2 migrate_fails "$T/f2.json" "$KM_NS_A" "$storeA" "$pid" "$toB" \
	"not in the image area" --snapshot --weights plain
finish w2 "$pid" "$T/ref-plain.out"
pass "missing parent refused: '$(json_get "$T/f2.json" error | cut -c1-110)'; engine resumed, tokens identical"

# --- the stop's page server fails while CRIU dumps ------------------------------

start_engine w4 "$KM_NS_A" "$T/plain.safetensors"
pid=$ENGINE_PID
KVMOTION_TEST_PAGESRV_FAIL=64 migrate_fails "$T/f4.json" "$KM_NS_A" "$storeA" "$pid" "$toB" \
	"page server: test: failure injected after" --snapshot --weights plain
assert_eq "resumed" "$(json_get "$T/f4.json" resumed)" True
assert_eq "bytes during the stop" "$(json_get "$T/f4.json" bytes_sent_during_stop)" 0
finish w4 "$pid" "$T/ref-plain.out"
pass "page server failing in the dump: '$(json_get "$T/f4.json" error | cut -c1-110)'; CRIU's dump failed, engine resumed, tokens identical"

# The parent goes between the image's arrival and the restore: CRIU itself
# refuses (its pagemap names pages of a parent it cannot open).
# shellcheck disable=SC2016 # expanded by the wrapper, in the restore's directory
printf '#!/bin/sh\nrm -rf "$(readlink -f parent)"\nexec %s "$@"\n' "$CRIU" >"$T/drop-parent"
chmod +x "$T/drop-parent"
start_server drop "$KM_NS_B" "$KM_ADDR_B" 7471 "$storeB" --restore-cmd "$T/drop-parent" --restore-libdir "$PLUGIN_DIR"
start_engine w3 "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_fails "$T/f3.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7471" "restore failed" --snapshot
assert_eq "incremental attempted" "$(json_get "$T/f3.json" incremental)" True
finish w3 "$pid" "$T/ref-coop.out"
pass "parent gone before the restore: '$(json_get "$T/f3.json" error | cut -c1-110)'; engine resumed, tokens identical"

# --- a target without incremental images: the whole image ---------------------

start_server old "$KM_NS_B" "$KM_ADDR_B" 7472 "$storeB" --restore-cmd "$CRIU" --restore-libdir "$PLUGIN_DIR" --no-incremental
start_engine old "$KM_NS_A" "$T/coop.safetensors" --coop
pid=$ENGINE_PID
migrate_ok "$T/i3.json" "$KM_NS_A" "$storeA" "$pid" "$KM_ADDR_B:7472" --snapshot
assert_eq "incremental" "$(json_get "$T/i3.json" incremental)" False
json_get "$T/i3.json" incremental_why | grep -q "protocol 1.3" || fail "incremental_why: $(json_get "$T/i3.json" incremental_why)"
grep -q "the stop is not incremental" "$T/i3.json.err" || fail "no line on stderr says the stop is not incremental"
assert_ge "bytes during the stop (the whole KV)" "$(json_get "$T/i3.json" bytes_sent_during_stop)" $((8 << 20))
finish old "$(json_get "$T/i3.json" restored_pid)" "$T/ref-coop.out"
pass "old target: not incremental ('$(json_get "$T/i3.json" incremental_why)'), $(json_get "$T/i3.json" bytes_sent_during_stop) B in the stop; tokens identical"
