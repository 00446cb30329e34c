#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The network half of a live migration between two test hosts (netns.sh: two
# network namespaces joined by a rate-limited veth link): `kvmotion serve` on
# host B, `kvmotion send-weights` / `send-image` from host A, over TLS.
#
#   - pre-copy of a weights index: every chunk sent once, then nothing
#     (dedup), and nothing to a target that holds another copy of the model;
#   - several senders at once on one receiver;
#   - refusals that leave the target's store unchanged: wrong pre-shared key,
#     certificate of a foreign CA; a chunk damaged in flight (test knob
#     KVMOTION_TEST_CORRUPT_SEND) is caught and nothing bad is stored;
#   - clean errors: receiver killed mid-transfer, quota, full disk (ENOSPC);
#   - end to end on the real CRIU: a process dumped on A, split against A's
#     store, sent and restored on B, where it goes on in B's namespace; a
#     failing restore reports CRIU's log and removes its image directory.
#
#   KM_LINK_RATE (10gbit), KM_TEST_MODEL_MIB (24)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=netns.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
KM_NEED_CRIU=0
km_init
command -v openssl >/dev/null 2>&1 || skip "no openssl command (keys and certificates)"
command -v unshare >/dev/null 2>&1 || skip "no unshare (util-linux)"
km_netns_setup

T=$KM_TMP
model_mib=${KM_TEST_MODEL_MIB:-24}
storeA=$T/storeA
storeB=$T/storeB
declare -A SPID SPORT SLOG

# --- helpers ---------------------------------------------------------------

stop_servers() {
	local name pid
	for name in "${!SPID[@]}"; do
		pid=${SPID[$name]}
		kill -TERM "$pid" 2>/dev/null || continue
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.05
		done
		kill -KILL "$pid" 2>/dev/null || true
	done
}
KM_CLEANUP_HOOKS+=(stop_servers)

# start_server NAME PORT STORE IMAGES [SERVE OPTIONS...]: kvmotion serve on host B
start_server() {
	local name=$1 port=$2 store=$3 images=$4 log=$T/serve-$1.log
	shift 4
	log "\$ [B] kvmotion serve --listen $KM_ADDR_B:$port --store $store --images $images $*"
	# not through km_in_b: $! must be the server itself, not a subshell
	nsenter --net="/run/netns/$KM_NS_B" -- "$KVMOTION" serve --listen "$KM_ADDR_B:$port" \
		--store "$store" --images "$images" --no-sync "$@" >/dev/null 2>"$log" &
	SPID[$name]=$!
	SPORT[$name]=$port
	SLOG[$name]=$log
	wait_listening "$name"
}

wait_listening() {
	local name=$1
	for _ in $(seq 1 200); do
		grep -q "listening on" "${SLOG[$name]}" && return 0
		kill -0 "${SPID[$name]}" 2>/dev/null || {
			cat "${SLOG[$name]}"
			fail "server $name exited at start"
		}
		sleep 0.02
	done
	cat "${SLOG[$name]}"
	fail "server $name is not listening after 4 s"
}

# send OUT SERVER CMD ARGS...: kvmotion CMD from host A to SERVER, PSK unless
# the arguments bring their own; status in SEND_RC, stdout in OUT, stderr in OUT.err
send() {
	local out=$1 server=$2 cmd=$3 auth=(--psk-file "$T/psk")
	shift 3
	case " $* " in *" --psk-file "* | *" --cert "*) auth=() ;; esac
	log "\$ [A] kvmotion $cmd $* --to $KM_ADDR_B:${SPORT[$server]} ${auth[*]}"
	SEND_RC=0
	km_in_a "$KVMOTION" "$cmd" "$@" --to "$KM_ADDR_B:${SPORT[$server]}" "${auth[@]}" \
		>"$out" 2>"$out.err" || SEND_RC=$?
}

send_ok() {
	local out=$1
	send "$@"
	if [ "$SEND_RC" != 0 ]; then
		cat "$out.err"
		fail "kvmotion $3 failed (status $SEND_RC)"
	fi
	python3 -m json.tool "$out" >/dev/null 2>&1 || fail "$3 printed no JSON: $(head -c 300 "$out")"
}

# send_fails OUT SERVER CMD ARGS...: must fail; its stderr is checked by the caller
send_fails() {
	local out=$1
	send "$@"
	[ "$SEND_RC" != 0 ] || fail "kvmotion $3 succeeded where it must fail: $(cat "$out")"
	log "failed as expected: $(tr '\n' ' ' <"$out.err" | head -c 400)"
}

# expect_err FILE REGEX WHAT
expect_err() {
	grep -qE "$2" "$1" || {
		cat "$1"
		fail "$3: stderr does not match /$2/"
	}
}

store_chunks() { find "$1/chunks" -type f 2>/dev/null | wc -l; }
has_index() { [ -f "$1/indexes/$2.kmidx" ]; }

# --- keys, models, servers -------------------------------------------------

openssl rand -hex 32 >"$T/psk"
openssl rand -hex 32 >"$T/psk-wrong"
chmod 600 "$T/psk" "$T/psk-wrong"

mkca() { # mkca DIR CN: a CA and, signed by it, DIR/NAME.{key,crt} for each NAME
	local dir=$1 cn=$2 name
	shift 2
	mkdir -p "$dir"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
		-keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=$cn" 2>/dev/null ||
		fail "openssl cannot make a CA"
	for name in "$@"; do
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
			-keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null ||
			fail "openssl cannot make a key for $name"
		openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
			-CAcreateserial -days 2 -out "$dir/$name.crt" 2>/dev/null ||
			fail "openssl cannot sign $name"
	done
}
mkca "$T/pki" kvmotion-test-ca receiver sender
mkca "$T/rogue" rogue-ca intruder

run "$MKMODEL" "$T/model.safetensors" --size "${model_mib}M" --seed 1
run "$MKMODEL" "$T/m2.safetensors" --size 8M --seed 2
run "$MKMODEL" "$T/m3.safetensors" --size 16M --seed 3
run "$MKMODEL" "$T/m4.safetensors" --size 2M --seed 4
model_size=$(file_size "$T/model.safetensors")
kvm "$T/seed1.json" seed "$T/model.safetensors" --store "$storeA" --name m1 --no-sync --json
for m in m2 m3 m4; do
	kvm "$T/seed-$m.json" seed "$T/$m.safetensors" --store "$storeA" --name "$m" --no-sync --json
done
json_check "$T/seed1.json" bytes bytes_added bytes_zero chunks
m1_bytes=$(json_get "$T/seed1.json" bytes_added)
m1_chunks=$(json_get "$T/seed1.json" chunks_added)

# An image area with a directory left by a receiver that died (unlocked marker)
# and a finished one: the first start removes the first only.
mkdir -p "$T/imagesB/stale-1" "$T/imagesB/done-1"
touch "$T/imagesB/stale-1/.kvmotion-incomplete" "$T/imagesB/stale-1/pages-1.img" "$T/imagesB/done-1/core-1.img"
start_server main 7447 "$storeB" "$T/imagesB" --psk-file "$T/psk" --restore-cmd "$CRIU"
[ ! -e "$T/imagesB/stale-1" ] || fail "the stale image directory was not removed at start"
[ -f "$T/imagesB/done-1/core-1.img" ] || fail "a finished image directory was removed at start"
grep -q "stale-1 was left incomplete" "${SLOG[main]}" || fail "no log line for the stale directory"
pass "serve in $KM_NS_B on $KM_ADDR_B:7447; a stale image directory removed, a finished one kept"

# --- pre-copy of weights: all, then nothing ---------------------------------

send_ok "$T/w1.json" main send-weights m1 --store "$storeA" --json
cat "$T/w1.json"
json_check "$T/w1.json" chunks chunks_sent bytes bytes_sent bytes_deduplicated wire_bytes
assert_eq "chunks sent (first)" "$(json_get "$T/w1.json" chunks_sent)" "$m1_chunks"
assert_eq "bytes sent (first)" "$(json_get "$T/w1.json" bytes_sent)" "$m1_bytes"
assert_eq "bytes deduplicated (first)" "$(json_get "$T/w1.json" bytes_deduplicated)" 0
assert_eq "store B chunks" "$(store_chunks "$storeB")" "$m1_chunks"
assert_eq "store B bytes" "$(store_bytes "$storeB")" "$m1_bytes"
# B's index is A's plus the id of the weights file B materialized
"$KVMOTION" weights resolve index:m1 --store "$storeB" --json >"$T/resolveB.json" ||
	fail "B cannot resolve index m1"
kvm "$T/verifyB.json" store verify --store "$storeB" --json
assert_eq "bad chunks on B" "$(json_get "$T/verifyB.json" bad)" 0
wpath=$(json_get "$T/w1.json" weights.path)
[ -f "$wpath" ] || fail "materialized weights file $wpath missing on B"
assert_eq "weights file size" "$(file_size "$wpath")" "$(json_get "$T/w1.json" weights.size)"
assert_eq "B's index resolves to the sent weights file" "$(json_get "$T/resolveB.json" path)" "$wpath"
"$KVMOTION" weights check "$wpath" >/dev/null || fail "weights file $wpath on B does not check"
pass "send-weights m1: $m1_chunks chunks, $m1_bytes bytes sent in $(json_get "$T/w1.json" seconds.chunks) s; B holds exactly m1's chunks"

digest_before=$(dir_digest "$storeB")
send_ok "$T/w2.json" main send-weights m1 --store "$storeA" --json
assert_eq "chunks sent (again)" "$(json_get "$T/w2.json" chunks_sent)" 0
assert_eq "bytes sent (again)" "$(json_get "$T/w2.json" bytes_sent)" 0
assert_eq "bytes deduplicated (again)" "$(json_get "$T/w2.json" bytes_deduplicated)" "$m1_bytes"
assert_lt "wire bytes (again)" "$(json_get "$T/w2.json" wire_bytes)" 262144
[ "$digest_before" = "$(dir_digest "$storeB")" ] || fail "store B changed on a dedup-only send"
pass "send-weights m1 again: 0 chunk bytes sent, $m1_bytes deduplicated, $(json_get "$T/w2.json" wire_bytes) bytes on the wire"

# A target with another copy of the same model, seeded there under another name.
cp "$T/model.safetensors" "$T/copy.safetensors"
kvm "$T/seedB2.json" seed "$T/copy.safetensors" --store "$T/storeB2" --name local-copy --no-sync --json
start_server copy 7448 "$T/storeB2" "$T/imagesB2" --psk-file "$T/psk"
send_ok "$T/w3.json" copy send-weights m1 --store "$storeA" --json
assert_eq "bytes sent to a target with a copy" "$(json_get "$T/w3.json" bytes_sent)" 0
assert_eq "bytes deduplicated there" "$(json_get "$T/w3.json" bytes_deduplicated)" "$m1_bytes"
has_index "$T/storeB2" m1 || fail "index m1 not stored on the target with a copy"
pass "target with its own copy of the model: no weights bytes sent, index m1 stored"

# --- authentication ----------------------------------------------------------

digest_before=$(dir_digest "$storeB")
send_fails "$T/bad-psk.json" main send-weights m2 --store "$storeA" --json --psk-file "$T/psk-wrong"
expect_err "$T/bad-psk.json.err" "authentication" "wrong PSK"
expect_err "$T/bad-psk.json.err" "\[EACCES\]" "wrong PSK"
send_fails "$T/no-auth.json" main send-weights m2 --store "$storeA" --json --cert "" --psk-file ""
expect_err "$T/no-auth.json.err" "no authentication configured" "no credentials"
[ "$digest_before" = "$(dir_digest "$storeB")" ] || fail "store B changed after refused senders"
grep -q "refused" "${SLOG[main]}" || fail "the receiver did not log the refusal"
pass "wrong pre-shared key refused (EACCES), no credentials refused locally; store B unchanged"

start_server cert 7450 "$T/storeB4" "$T/imagesB4" \
	--cert "$T/pki/receiver.crt" --key "$T/pki/receiver.key" --ca "$T/pki/ca.crt"
send_ok "$T/c1.json" cert send-weights m4 --store "$storeA" --json \
	--cert "$T/pki/sender.crt" --key "$T/pki/sender.key" --ca "$T/pki/ca.crt" --server-name receiver
assert_ge "chunks sent with certificates" "$(json_get "$T/c1.json" chunks_sent)" 1
grep -q "authenticated as .*CN.*sender" "${SLOG[cert]}" || fail "receiver did not log the sender's certificate"
digest_before=$(dir_digest "$T/storeB4")
send_fails "$T/c2.json" cert send-weights m2 --store "$storeA" --json \
	--cert "$T/rogue/intruder.crt" --key "$T/rogue/intruder.key" --ca "$T/pki/ca.crt"
expect_err "$T/c2.json.err" "\[EACCES\]" "foreign client certificate"
send_fails "$T/c3.json" cert send-weights m2 --store "$storeA" --json --psk-file "$T/psk"
expect_err "$T/c3.json.err" "\[EACCES\]" "PSK against a certificate receiver"
send_fails "$T/c4.json" cert send-weights m2 --store "$storeA" --json \
	--cert "$T/pki/sender.crt" --key "$T/pki/sender.key" --ca "$T/rogue/ca.crt"
expect_err "$T/c4.json.err" "not trusted|\[EACCES\]" "receiver of a foreign CA"
[ "$digest_before" = "$(dir_digest "$T/storeB4")" ] || fail "store B4 changed after refused senders"
has_index "$T/storeB4" m2 && fail "index m2 stored by a refused sender"
pass "certificates: CA-signed sender accepted; foreign certificate, PSK and untrusted receiver refused (EACCES); store unchanged"

# --- a chunk damaged in flight ----------------------------------------------

n0=$(store_chunks "$storeB")
KVMOTION_TEST_CORRUPT_SEND=3 send_fails "$T/corrupt.json" main send-weights m2 --store "$storeA" --json
expect_err "$T/corrupt.json.err" "corrupt in flight" "damaged chunk"
expect_err "$T/corrupt.json.err" "\[EBADMSG\]" "damaged chunk"
n1=$(store_chunks "$storeB")
kvm "$T/verifyB2.json" store verify --store "$storeB" --json
assert_eq "bad chunks on B after a damaged chunk" "$(json_get "$T/verifyB2.json" bad)" 0
assert_lt "chunks stored before the damaged one" $((n1 - n0)) 3
has_index "$storeB" m2 && fail "index m2 stored although a chunk was refused"
send_ok "$T/corrupt2.json" main send-weights m2 --store "$storeA" --json
assert_eq "chunks the clean resend found there" "$(json_get "$T/corrupt2.json" chunks_deduplicated)" $((n1 - n0))
has_index "$storeB" m2 || fail "index m2 missing after the clean resend"
pass "damaged chunk refused (EBADMSG, 'corrupt in flight'); B verifies clean; a resend completes"

# --- several senders at once -------------------------------------------------

km_link_rate 100mbit
hellos=$(grep -c "hello from" "${SLOG[main]}")
(
	send "$T/slow.json" main send-weights m3 --store "$storeA" --json --compress never
	exit "$SEND_RC"
) &
slow=$!
for _ in $(seq 1 200); do
	[ "$(grep -c "hello from" "${SLOG[main]}")" -gt "$hellos" ] && break
	sleep 0.01
done
t0=$(date +%s%N)
# m1 is there already: a few round trips, no bulk data to queue behind m3's
send_ok "$T/fast.json" main send-weights m1 --store "$storeA" --json
fast_ms=$((($(date +%s%N) - t0) / 1000000))
kill -0 "$slow" 2>/dev/null || fail "the slow transfer ended before the second one: no overlap to show"
wait "$slow" || fail "the slow transfer failed: $(cat "$T/slow.json.err")"
python3 -m json.tool "$T/slow.json" >/dev/null || fail "slow transfer printed no JSON"
assert_eq "m3 sent" "$(json_get "$T/slow.json" bytes_sent)" "$(json_get "$T/seed-m3.json" bytes_added)"
pass "two senders at once: m1 (dedup) done in $fast_ms ms while m3 ($(json_get "$T/seed-m3.json" bytes) bytes at 100mbit) was still in flight"

# --- the receiver killed mid-transfer ---------------------------------------

start_server victim 7451 "$T/storeB5" "$T/imagesB5" --psk-file "$T/psk"
(
	send "$T/killed.json" victim send-weights m3 --store "$storeA" --json --compress never
	exit "$SEND_RC"
) &
spid=$!
for _ in $(seq 1 200); do
	grep -q "hello from" "${SLOG[victim]}" && break
	sleep 0.01
done
sleep 0.3
kill -KILL "${SPID[victim]}"
t0=$(date +%s%N)
rc=0
wait "$spid" || rc=$?
ms=$((($(date +%s%N) - t0) / 1000000))
[ "$rc" != 0 ] || fail "the sender succeeded although the receiver was killed"
expect_err "$T/killed.json.err" "connection lost|reset|closed" "receiver killed"
expect_err "$T/killed.json.err" "\[(ECONNRESET|EPIPE)\]" "receiver killed"
assert_lt "ms the sender needed to notice" "$ms" 5000
has_index "$T/storeB5" m3 && fail "index m3 stored by a transfer that was cut"
pass "receiver killed mid-transfer: the sender says '$(head -n1 "$T/killed.json.err")' after $ms ms"

# SIGTERM mid-transfer: the receiver stops at once and tells the sender why.
start_server term 7454 "$T/storeB8" "$T/imagesB8" --psk-file "$T/psk"
(
	send "$T/term.json" term send-weights m3 --store "$storeA" --json --compress never
	exit "$SEND_RC"
) &
spid=$!
for _ in $(seq 1 200); do
	grep -q "hello from" "${SLOG[term]}" && break
	sleep 0.01
done
sleep 0.3
t0=$(date +%s%N)
kill -TERM "${SPID[term]}"
rc=0
wait "${SPID[term]}" || rc=$?
ms=$((($(date +%s%N) - t0) / 1000000))
unset 'SPID[term]'
assert_eq "exit status of serve stopped mid-transfer" "$rc" 0
assert_lt "ms serve needed to stop" "$ms" 5000
grep -q "cancelled: the receiver is stopping" "${SLOG[term]}" || fail "no cancellation in the receiver's log"
rc=0
wait "$spid" || rc=$?
[ "$rc" != 0 ] || fail "the sender succeeded although the receiver stopped"
expect_err "$T/term.json.err" "receiver is stopping|connection lost" "receiver stopped"
has_index "$T/storeB8" m3 && fail "index m3 stored by a cancelled transfer"
pass "SIGTERM mid-transfer: serve exits 0 after $ms ms, the sender says '$(head -n1 "$T/term.json.err")'"
km_link_rate "$KM_LINK_RATE"

# --- limits: quota and a full disk -----------------------------------------

start_server quota 7449 "$T/storeB3" "$T/imagesB3" --psk-file "$T/psk" --max-bytes 1M
send_fails "$T/quota.json" quota send-weights m2 --store "$storeA" --json
expect_err "$T/quota.json.err" "quota exceeded" "quota"
expect_err "$T/quota.json.err" "\[EDQUOT\]" "quota"
assert_lt "bytes stored under a 1 MiB quota" "$(store_bytes "$T/storeB3")" $((1048576 + 1))
has_index "$T/storeB3" m2 && fail "index m2 stored past the quota"
pass "quota of 1 MiB: refused with EDQUOT, $(store_bytes "$T/storeB3") bytes stored"

# The full disk: a 6 MiB tmpfs for the store, in the receiver's own mount namespace.
mkdir -p "$T/small"
log "\$ [B] unshare -m: tmpfs of 6 MiB on $T/small, kvmotion serve"
# shellcheck disable=SC2016 # $1.. are the inner shell's
nsenter --net="/run/netns/$KM_NS_B" -- unshare -m --propagation private sh -c \
	'mount -t tmpfs -o size=6m kvmotion-test "$1" && exec "$2" serve --listen "$3" --store "$1/store" --images "$1/images" --psk-file "$4" --no-sync' \
	sh "$T/small" "$KVMOTION" "$KM_ADDR_B:7452" "$T/psk" >/dev/null 2>"$T/serve-small.log" &
SPID[small]=$!
SPORT[small]=7452
SLOG[small]=$T/serve-small.log
wait_listening small
send_fails "$T/full.json" small send-weights m2 --store "$storeA" --json
expect_err "$T/full.json.err" "No space left on device" "full disk"
expect_err "$T/full.json.err" "\[ENOSPC\]" "full disk"
nsenter -t "${SPID[small]}" -m -- test -f "$T/small/store/indexes/m2.kmidx" &&
	fail "index m2 stored on a full disk"
nsenter -t "${SPID[small]}" -m -- "$KVMOTION" store verify --store "$T/small/store" --json \
	>"$T/verify-small.json" || fail "the full store does not verify: $(cat "$T/verify-small.json")"
pass "full disk on the target: refused with ENOSPC, named; the store verifies"

# --- end to end: dump on A, send, restore on B -------------------------------

if [ "$KM_HAVE_CRIU" != 1 ]; then
	log "no working CRIU: end-to-end image transfer not run"
else
	# memproc runs on host A (its network namespace only)
	printf '#!/bin/sh\nexec nsenter --net=/run/netns/%s -- %s "$@"\n' "$KM_NS_A" "$MEMPROC" >"$T/memproc-in-a"
	chmod +x "$T/memproc-in-a"
	MEMPROC=$T/memproc-in-a start_memproc "$T/model.safetensors" 4 "$T/progress" "$T/memproc.out"
	pid=$MEMPROC_PID
	wait_progress "$T/progress" 3
	sum0=$(progress_model_sum "$T/progress")
	log "\$ [A] criu dump -t $pid -D $T/img -o dump.log -v4"
	mkdir -p "$T/img"
	km_in_a "$CRIU" dump -t "$pid" -D "$T/img" -o dump.log -v4 || {
		km_criu_log_tail "$T/img/dump.log"
		fail "criu dump on host A failed"
	}
	counter_dump=$(progress_counter "$T/progress")
	wait_pid_gone "$pid"
	kvm "$T/split.json" split "$T/img" --store "$storeA" --no-sync --json
	assert_ge "bytes referenced by the split" "$(json_get "$T/split.json" bytes_referenced)" $((model_size * 9 / 10))

	# A receiver whose CRIU fails: the error names it, its image directory goes.
	start_server badcriu 7453 "$storeB" "$T/imagesB7" --psk-file "$T/psk" \
		--restore-cmd "$CRIU" --restore-arg=--no-such-option
	send_fails "$T/badrestore.json" badcriu send-image "$T/img" --store "$storeA" --restore --json
	expect_err "$T/badrestore.json.err" "criu restore failed" "failing restore"
	expect_err "$T/badrestore.json.err" "\[ECHILD\]" "failing restore"
	[ -z "$(ls -A "$T/imagesB7")" ] || fail "image directory left after a failed restore: $(ls -A "$T/imagesB7")"
	pass "failing criu restore: '$(head -n1 "$T/badrestore.json.err" | cut -c1-150)', image directory removed"

	send_ok "$T/image.json" main send-image "$T/img" --store "$storeA" --restore --json --label memproc
	cat "$T/image.json"
	json_check "$T/image.json" files file_bytes bytes_sent bytes_deduplicated wire_bytes restored_pid
	rpid=$(json_get "$T/image.json" restored_pid)
	KM_PIDS+=("$rpid")
	assert_eq "restored pid" "$rpid" "$pid"
	assert_ge "weights bytes the target had" "$(json_get "$T/image.json" bytes_deduplicated)" $((model_size * 9 / 10))
	assert_lt "bytes on the wire" "$(json_get "$T/image.json" wire_bytes)" $((model_size / 2))
	dir=$(json_get "$T/image.json" dir)
	[ -d "$T/imagesB/$dir" ] || fail "no image directory $dir on B"
	[ ! -e "$T/imagesB/$dir/.kvmotion-incomplete" ] || fail "image $dir still marked incomplete"
	[ -n "$(compgen -G "$T/imagesB/$dir/pages-*.img")" ] || fail "image $dir was not joined"
	wait_progress "$T/progress" $((counter_dump + 5))
	verify_memproc "$pid" "$T/progress"
	assert_eq "model checksum after the migration" "$(progress_model_sum "$T/progress")" "$sum0"
	assert_eq "network namespace of the restored process" "$(stat -L -c %i "/proc/$pid/ns/net")" \
		"$(stat -L -c %i "/run/netns/$KM_NS_B")"
	pass "send-image --restore: pid $pid runs on host B ($KM_NS_B), counter $counter_dump -> $(progress_counter "$T/progress"), VERIFY OK; $(json_get "$T/image.json" wire_bytes) bytes on the wire"
	kill_memproc "$pid"
fi

# --- SIGTERM stops the receiver cleanly --------------------------------------

kill -TERM "${SPID[main]}"
rc=0
wait "${SPID[main]}" || rc=$?
unset 'SPID[main]'
assert_eq "exit status of serve after SIGTERM" "$rc" 0
grep -q "stopped" "${SLOG[main]}" || fail "no 'stopped' line in the receiver's log"
pass "SIGTERM: serve exits 0 ('$(tail -n1 "${SLOG[main]}" | cut -c1-80)')"
