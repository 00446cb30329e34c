#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# kvmotion weights materialize|check|resolve on model files made by mkmodel:
# the weights file's bytes and name, a second materialization that writes
# nothing, check trusting its .ok record until the file is altered (even with
# its mtime put back), missing files and chunks named, resolve seeding a
# model file once. Needs neither root nor CRIU.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for f in "$KVMOTION" "$MKMODEL"; do
	[ -x "$f" ] || fail "$f is missing: build the project first"
done
command -v python3 >/dev/null 2>&1 || skip "python3 is missing (JSON checks)"
KM_TMP=$(mktemp -d "/tmp/kvmotion-${KM_TEST_NAME}.XXXXXX")
trap km_cleanup EXIT
trap 'exit 130' INT TERM

T=$KM_TMP
S=$T/store
align=$((2 << 20))

# kvm_fails OUT EXPECTED-TEXT ARGS...: kvmotion ARGS must fail, saying EXPECTED-TEXT.
kvm_fails() {
	local out=$1 want=$2 rc=0
	shift 2
	log "\$ kvmotion $* (must fail)"
	"$KVMOTION" "$@" >"$out" 2>"$out.err" || rc=$?
	[ "$rc" != 0 ] || fail "kvmotion $* succeeded"
	grep -qF -- "$want" "$out.err" || fail "kvmotion $* said '$(cat "$out.err")', not '$want'"
}

# bytes_equal FILE OFFSET LENGTH OTHER: FILE[OFFSET, +LENGTH) equals OTHER's first LENGTH bytes.
bytes_equal() {
	cmp -s <(tail -c +$(($2 + 1)) "$1" | head -c "$3") <(head -c "$3" "$4")
}

run "$MKMODEL" "$T/one.safetensors" --size 9M --seed 11
run "$MKMODEL" "$T/two.safetensors" --size 3M --seed 12
size1=$(file_size "$T/one.safetensors")
size2=$(file_size "$T/two.safetensors")
off2=$(((size1 + align - 1) / align * align))
total=$((off2 + size2))

kvm "$T/seed.json" seed "$T/one.safetensors" "$T/two.safetensors" --name pair \
	--store "$S" --no-sync --json

# --- materialize ----------------------------------------------------------

kvm "$T/m1.json" weights materialize pair --store "$S" --no-sync --json
json_check "$T/m1.json" size bytes_hashed
path=$(json_get "$T/m1.json" path)
id=$(json_get "$T/m1.json" id)
assert_eq "written" "$(json_get "$T/m1.json" written)" True
assert_eq "size" "$(json_get "$T/m1.json" size)" "$total"
assert_eq "bytes_hashed" "$(json_get "$T/m1.json" bytes_hashed)" "$total"
assert_eq "path" "$path" "$S/weights/$id.kmw"
assert_eq "file size" "$(file_size "$path")" "$total"
assert_eq "mode" "$(stat -c %a "$path")" 444
assert_eq "name = sha256 of the file" "$(sha256sum <"$path" | cut -d' ' -f1)" "$id"
bytes_equal "$path" 0 "$size1" "$T/one.safetensors" || fail "first model not at offset 0"
bytes_equal "$path" "$off2" "$size2" "$T/two.safetensors" || fail "second model not at $off2"
bytes_equal "$path" "$size1" $((off2 - size1)) /dev/zero || fail "padding is not zero"
[ -f "$path.ok" ] || fail "no $path.ok"
pass "materialize: $total bytes, models at 0 and $off2, zero padding, named by its SHA-256, mode 444"

kvm "$T/m2.json" weights materialize pair --store "$S" --no-sync --json
assert_eq "second written" "$(json_get "$T/m2.json" written)" False
assert_eq "second bytes_hashed" "$(json_get "$T/m2.json" bytes_hashed)" 0
assert_eq "second path" "$(json_get "$T/m2.json" path)" "$path"
kvm "$T/m3.out" weights materialize pair --store "$S" --no-sync
assert_eq "plain output" "$(cat "$T/m3.out")" "$path"
pass "a second materialize reads and writes nothing"

# --- check ----------------------------------------------------------------

kvm "$T/c1.json" weights check "$path" --json
assert_eq "check bytes_hashed (record trusted)" "$(json_get "$T/c1.json" bytes_hashed)" 0
rm "$path.ok"
kvm "$T/c2.json" weights check "$path" --json
assert_eq "check bytes_hashed (no record)" "$(json_get "$T/c2.json" bytes_hashed)" "$total"
[ -f "$path.ok" ] || fail "check did not write the record back"
kvm "$T/c3.json" weights check "$path" --json
assert_eq "check bytes_hashed (record rewritten)" "$(json_get "$T/c3.json" bytes_hashed)" 0
pass "check: trusts the .ok record, re-hashes without one and writes it back"

mtime=$(stat -c %Y "$path")
chmod u+w "$path"
printf '\x5a' | dd of="$path" bs=1 seek=4096 conv=notrunc status=none
chmod 444 "$path"
touch -m -d "@$mtime" "$path"
assert_eq "mtime put back" "$(stat -c %Y "$path")" "$mtime"
kvm_fails "$T/c4" "does not hash to its name" weights check "$path"
pass "check: a flipped byte is caught although size and mtime are as before"

kvm "$T/m4.json" weights materialize pair --store "$S" --no-sync --json
assert_eq "rewritten" "$(json_get "$T/m4.json" written)" True
assert_eq "sha256 after rewrite" "$(sha256sum <"$path" | cut -d' ' -f1)" "$id"
kvm "$T/c5" weights check "$path"
pass "materialize replaces a damaged weights file"

kvm_fails "$T/c6" "is missing" weights check "$S/weights/$(printf '%064d' 0).kmw"
kvm_fails "$T/c7" "not a weights file name" weights check "$T/one.safetensors"
pass "check: missing file and foreign name refused"

# --- resolve --------------------------------------------------------------

model_id=$(sha256sum <"$T/one.safetensors" | cut -d' ' -f1)
kvm "$T/r1.json" weights resolve "$T/one.safetensors" --store "$S" --no-sync --json
assert_eq "resolve index" "$(json_get "$T/r1.json" index)" "file-${model_id:0:16}"
rpath=$(json_get "$T/r1.json" path)
# one model file at offset 0: its weights file is the model file
assert_eq "resolved id" "$(json_get "$T/r1.json" id)" "$model_id"
cmp -s "$rpath" "$T/one.safetensors" || fail "resolved weights file differs from the model"
idx=$S/indexes/file-${model_id:0:16}.kmidx
ino=$(stat -c %i "$idx")
kvm "$T/r2.out" weights resolve "$T/one.safetensors" --store "$S" --no-sync
assert_eq "resolve again" "$(cat "$T/r2.out")" "$rpath"
assert_eq "index inode (seeded once)" "$(stat -c %i "$idx")" "$ino"
kvm "$T/list" store list --store "$S"
assert_eq "indexes" "$(grep -c '^indexes/' "$T/list")" 2
kvm "$T/r3.out" weights resolve index:pair --store "$S" --no-sync
assert_eq "resolve index:pair" "$(cat "$T/r3.out")" "$path"
kvm_fails "$T/r4" "no weights index nope" weights resolve index:nope --store "$S"
pass "resolve: a model file is seeded once as file-${model_id:0:16}, index:NAME materializes NAME"

kvm "$T/w.json" weights materialize pair --store "$S" --weights-dir "$T/elsewhere/w" --no-sync --json
assert_eq "--weights-dir path" "$(json_get "$T/w.json" path)" "$T/elsewhere/w/$id.kmw"
cmp -s "$T/elsewhere/w/$id.kmw" "$path" || fail "the two weights files differ"
pass "--weights-dir: the same file elsewhere"

# --- errors from the store ------------------------------------------------

kvm_fails "$T/e1" "no weights index" weights materialize nope --store "$S"
chunk=$(find "$S/chunks" -type f -print -quit)
rm "$chunk" "$path"
kvm_fails "$T/e2" "chunk $(basename "$chunk")" weights materialize pair --store "$S" --no-sync
grep -qF "missing from the store" "$T/e2.err" || fail "missing chunk not called missing: $(cat "$T/e2.err")"
[ -z "$(find "$S/weights" -name '.kmw-tmp*')" ] || fail "temporary file left behind"
pass "a missing chunk is named, nothing is left behind"
