#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# A weights file mapped MAP_SHARED, PROT_READ, every page resident, is
# recorded by CRIU by path: the dump's pages-*.img hold none of the weights,
# and the restored process maps the same file with the same bytes.
#
#   KM_TEST_MODEL_MIB (128): size of the weights.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init

model_mib=${KM_TEST_MODEL_MIB:-128}
dyn_mib=4
T=$KM_TMP
S=$T/store
progress=$T/progress

run "$MKMODEL" "$T/model.safetensors" --size "${model_mib}M" --seed 21
run "$MKMODEL" "$T/small.safetensors" --size 1M --seed 22
kvm "$T/seed.json" seed "$T/model.safetensors" --name model --store "$S" --no-sync --json
kvm "$T/m.json" weights materialize model --store "$S" --no-sync --json
weights=$(json_get "$T/m.json" path)
wsize=$(json_get "$T/m.json" size)
pass "weights file $weights, $wsize bytes"

start_memproc "$T/small.safetensors" "$dyn_mib" "$progress" "$T/memproc.out" --map-file "$weights"
pid=$MEMPROC_PID
grep -q "mapped $wsize bytes" "$T/memproc.out" || fail "memproc did not map the weights: $(cat "$T/memproc.out")"
# the mapping is shared, read-only and resident
rss_kib=$(awk -v f="$weights" '
	$0 ~ /^[0-9a-f]+-[0-9a-f]+ / { cur = ($NF == f) ? 1 : 0; if (cur) perms = $2 }
	cur && /^Rss:/ { s += $2 }
	END { print s + 0; print perms > "/dev/stderr" }' "/proc/$pid/smaps" 2>"$T/perms")
assert_eq "mapping permissions" "$(cat "$T/perms")" "r--s"
assert_ge "resident KiB of the mapping" "$rss_kib" $((wsize * 9 / 10 / 1024))
wait_progress "$progress" 3
verify_memproc "$pid" "$progress"
pass "memproc $pid maps the weights r--s, $rss_kib KiB resident"

criu_dump "$pid" "$T/img"
wait_pid_gone "$pid"
pages=$(find "$T/img" -name 'pages-*.img' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
image=$(du -sb "$T/img" | cut -f1)
log "pages-*.img: $pages bytes, whole image $image bytes, weights $wsize bytes"
[ "$pages" -gt 0 ] || fail "no pages-*.img in the dump"
# the anonymous memory (1 MiB model, 4 MiB dynamic) and a little more: not the weights
assert_lt "pages-*.img bytes" "$pages" $((wsize / 8))
assert_lt "image bytes" "$image" $((wsize / 8))
grep -qaF "$(basename "$weights")" "$T"/img/*.img || fail "no image names the weights file"
pass "criu dump: $pages bytes of pages for $wsize bytes of mapped weights; the file is named, not copied"

criu_restore "$T/img"
wait_progress "$progress" 5
verify_memproc "$pid" "$progress"
[ -n "$(awk -v f="$weights" '$NF == f && $2 == "r--s"' "/proc/$pid/maps")" ] ||
	fail "restored process does not map $weights shared read-only"
pass "restore: pid $pid maps the same weights file again, VERIFY OK"
kill_memproc "$pid"
