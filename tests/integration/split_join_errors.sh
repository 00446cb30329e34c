#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Every corrupt, truncated, missing or foreign input to `kvmotion join` must
# give exit status 1, one "kvmotion: ..." message naming what is wrong (the
# chunk's hash, the file), and leave the directory exactly as it was (no
# file changed, added or removed, no temporary file left). Most cases use
# synthetic image directories (a pages-1.img of random bytes around a model,
# a few small files) to stay fast; the last part does the same on a real
# CRIU dump and checks that, once the input is repaired, join and restore
# work.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
km_init

T=$KM_TMP
model=$T/model.safetensors
store=$T/store

# randbytes SEED SIZE: deterministic pseudo-random bytes on stdout
randbytes() {
	python3 -c 'import random, sys; random.seed(int(sys.argv[1]))
sys.stdout.buffer.write(random.randbytes(int(sys.argv[2])))' "$1" "$2"
}

# flip_byte FILE OFFSET: inverts one byte in place
flip_byte() {
	python3 -c 'import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2]))
    f.write(bytes([b[0] ^ 0xff]))' "$1" "$2"
}

# mkimage DIR SEED: a synthetic CRIU-like image directory
mkimage() {
	local dir=$1 seed=$2
	mkdir -p "$dir"
	randbytes "$seed" 86 >"$dir/inventory.img"
	randbytes $((seed + 1)) 2389 >"$dir/core-1.img"
	randbytes $((seed + 2)) 1582 >"$dir/pagemap-1.img"
	{
		randbytes $((seed + 3)) $((1536 << 10))
		cat "$model"
		head -c $((512 << 10)) /dev/zero
		randbytes $((seed + 4)) $((1 << 20))
	} >"$dir/pages-1.img"
}

# First referenced chunk's id in split directory DIR.
first_chunk() {
	"$KVMOTION" inspect "$1" --extents | grep -oE 'chunk [0-9a-f]{64}' | head -n1 | cut -d' ' -f2
}

chunk_path() { printf '%s/chunks/%s/%s\n' "$1" "${2:0:2}" "$2"; }

# fresh NAME: a copy of the split image A and of the store, for one case;
# sets D (directory) and S (store)
fresh() {
	D=$T/case-$1
	S=$T/store-$1
	rm -rf "$D" "$S"
	cp -a "$T/a.split" "$D"
	cp -a "$store" "$S"
}

# expect_fail NAME PATTERN DIR STORE [JOIN OPTIONS...]: join must fail with
# status 1, "kvmotion: " on stderr matching PATTERN (grep -E), DIR unchanged.
expect_fail() {
	local name=$1 pattern=$2 dir=$3 st=$4 before="" after="" rc=0 msg
	shift 4
	if [ -e "$dir" ]; then
		before=$(dir_digest "$dir")
	fi
	"$KVMOTION" join "$dir" --store "$st" --no-sync "$@" >"$T/out" 2>"$T/err" || rc=$?
	msg=$(head -n 3 "$T/err")
	[ "$rc" = 1 ] || fail "$name: join exited with status $rc, expected 1 (stderr: $msg)"
	grep -q '^kvmotion: ' "$T/err" || fail "$name: no 'kvmotion: ' message on stderr: $msg"
	grep -qE -- "$pattern" "$T/err" || fail "$name: message does not match /$pattern/: $msg"
	if [ -e "$dir" ]; then
		after=$(dir_digest "$dir")
		if [ "$before" != "$after" ]; then
			diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") | head -n 20
			fail "$name: the failed join changed $dir"
		fi
	elif [ -n "$before" ]; then
		fail "$name: $dir disappeared"
	fi
	pass "$name: status 1, directory unchanged: $msg"
}

# --- synthetic images A and B split against one store ----------------------

run "$MKMODEL" "$model" --size 8M --seed 7
kvm "$T/seed.json" seed "$model" --store "$store" --no-sync --json
mkimage "$T/a" 100
mkimage "$T/b" 200
cp -a "$T/a" "$T/a.orig"
cp -a "$T/b" "$T/b.orig"
kvm "$T/split-a.json" split "$T/a" --store "$store" --no-sync --json
json_check "$T/split-a.json" bytes_referenced
kvm "$T/split-b.json" split "$T/b" --store "$store" --no-sync --json
assert_ge "bytes_referenced (synthetic)" "$(json_get "$T/split-a.json" bytes_referenced)" \
	$(($(file_size "$model") * 9 / 10))
cp -a "$T/a" "$T/a.split"
cp -a "$T/b" "$T/b.split"

# the good case first: the copies join back byte for byte
fresh good
kvm "$T/join.json" join "$D" --store "$S" --no-sync --json
assert_same_dirs "$T/a.orig" "$D" "synthetic join"
pass "synthetic image joins byte-identical"

chunk=$(first_chunk "$T/a.split")
[ -n "$chunk" ] || fail "inspect --extents lists no chunk"
log "referenced chunk $chunk"

fresh chunk-flipped
flip_byte "$(chunk_path "$S" "$chunk")" 1000
expect_fail "chunk with a flipped byte" "$chunk" "$D" "$S"

fresh chunk-missing
rm -f "$(chunk_path "$S" "$chunk")"
expect_fail "missing chunk" "$chunk" "$D" "$S"

fresh chunk-truncated
truncate -s 100 "$(chunk_path "$S" "$chunk")"
expect_fail "truncated chunk" "$chunk" "$D" "$S"

fresh delta-truncated
truncate -s $(($(file_size "$D/kvmotion.delta") / 2)) "$D/kvmotion.delta"
expect_fail "truncated delta" "kvmotion\\.delta" "$D" "$S"

fresh delta-flipped
flip_byte "$D/kvmotion.delta" $(($(file_size "$D/kvmotion.delta") / 2))
expect_fail "delta with a flipped byte" "kvmotion\\.delta" "$D" "$S"

fresh delta-missing
rm -f "$D/kvmotion.delta"
expect_fail "missing delta" "kvmotion\\.delta" "$D" "$S"

fresh delta-foreign
cp "$T/b.split/kvmotion.delta" "$D/kvmotion.delta"
expect_fail "delta of another image" "kvmotion\\.delta" "$D" "$S"

fresh manifest-foreign
cp "$T/b.split/kvmotion.manifest" "$D/kvmotion.manifest"
expect_fail "manifest of another image" "kvmotion\\.delta|inventory\\.img|core-1\\.img|pagemap-1\\.img" \
	"$D" "$S"

fresh foreign-pair
cp "$T/b.split/kvmotion.manifest" "$T/b.split/kvmotion.delta" "$D/"
expect_fail "manifest and delta of another image" "inventory\\.img|core-1\\.img|pagemap-1\\.img" \
	"$D" "$S"

fresh kept-changed
flip_byte "$D/core-1.img" 10
expect_fail "kept file changed" "core-1\\.img" "$D" "$S"

fresh kept-missing
rm -f "$D/inventory.img"
expect_fail "kept file missing" "inventory\\.img" "$D" "$S"

fresh manifest-major
[ "$(od -An -tx1 -j12 -N2 "$D/kvmotion.manifest" | tr -d ' ')" = 0801 ] ||
	fail "manifest does not start with field 1 = 1 (08 01) at offset 12"
printf '\x09' | dd of="$D/kvmotion.manifest" bs=1 seek=13 conv=notrunc status=none
expect_fail "manifest with major version 9" "version" "$D" "$S"

fresh manifest-truncated
truncate -s $(($(file_size "$D/kvmotion.manifest") / 2)) "$D/kvmotion.manifest"
expect_fail "truncated manifest" "kvmotion\\.manifest" "$D" "$S"

fresh manifest-header-only
truncate -s 10 "$D/kvmotion.manifest"
expect_fail "manifest cut inside its header" "kvmotion\\.manifest" "$D" "$S"

fresh manifest-garbage
randbytes 999 4096 >"$D/kvmotion.manifest"
expect_fail "garbage manifest" "kvmotion\\.manifest" "$D" "$S"

fresh manifest-trailing
printf 'x' >>"$D/kvmotion.manifest"
expect_fail "manifest with a trailing byte" "kvmotion\\.manifest" "$D" "$S"

fresh manifest-missing
rm -f "$D/kvmotion.manifest"
expect_fail "missing manifest (not a split image)" "kvmotion\\.manifest" "$D" "$S"

fresh not-a-store
mkdir -p "$T/not-a-store"
expect_fail "store that is an empty directory" "store" "$D" "$T/not-a-store"
expect_fail "store that is a regular file" "store" "$D" "$model"
expect_fail "store that does not exist" "store" "$D" "$T/no-such-store"
[ ! -e "$T/no-such-store" ] || fail "join created the missing store"

expect_fail "directory that does not exist" "no-such-dir" "$T/no-such-dir" "$store"
[ ! -e "$T/no-such-dir" ] || fail "join created the missing directory"

# the store is unharmed by all this: the pristine copies still join
for x in a b; do
	kvm "$T/join-$x.json" join "$T/$x.split" --store "$store" --no-sync --json
	assert_same_dirs "$T/$x.orig" "$T/$x.split" "join of $x after the failures"
done
pass "pristine images still join byte-identical"

# --- a real CRIU dump -------------------------------------------------------

start_memproc "$model" 4 "$T/progress" "$T/memproc.out"
pid=$MEMPROC_PID
wait_progress "$T/progress" 3
criu_dump "$pid" "$T/real"
counter_dump=$(progress_counter "$T/progress")
wait_pid_gone "$pid"
cp -a "$T/real" "$T/real.orig"
kvm "$T/split-real.json" split "$T/real" --store "$store" --no-sync --json
chunk=$(first_chunk "$T/real")
[ -n "$chunk" ] || fail "the real dump references no chunk"
cp "$(chunk_path "$store" "$chunk")" "$T/chunk.bak"
cp "$T/real/kvmotion.delta" "$T/delta.bak"

flip_byte "$(chunk_path "$store" "$chunk")" 5
expect_fail "real dump, chunk with a flipped byte" "$chunk" "$T/real" "$store"
rm -f "$(chunk_path "$store" "$chunk")"
expect_fail "real dump, missing chunk" "$chunk" "$T/real" "$store"
cp "$T/chunk.bak" "$(chunk_path "$store" "$chunk")"
truncate -s $(($(file_size "$T/real/kvmotion.delta") - 7)) "$T/real/kvmotion.delta"
expect_fail "real dump, truncated delta" "kvmotion\\.delta" "$T/real" "$store"
cp "$T/delta.bak" "$T/real/kvmotion.delta"

kvm "$T/join-real.json" join "$T/real" --store "$store" --no-sync --json
assert_same_dirs "$T/real.orig" "$T/real" "real dump joined after repair"
pass "real dump: after repairing the inputs, join is byte-identical"
criu_restore "$T/real"
wait_progress "$T/progress" $((counter_dump + 3))
verify_memproc "$pid" "$T/progress"
pass "real dump: restored pid $pid continues, VERIFY OK"
kill_memproc "$pid"
