#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Live-migration benchmark (issue 5), one run: for each weights size, the test
# engine with --kv-mib of live KV, moved from host A to host B (two network
# namespaces joined by a tbf-limited veth, tests/integration/netns.sh) three
# ways, side by side:
#   plain        criu dump (no plugin) + the image directory copied over the
#                link (tar through a TCP socket) + criu restore on B
#   transparent  kvmotion migrate --weights INDEX on the plain engine: the
#                weights' chunks sent ahead, CRIU still dumps and restores them
#   coop         kvmotion migrate on the cooperative engine (weights file
#                sent ahead and materialized; not in the image)
# stop: plain = dump + copy + restore (wall clock); kvmotion = the report's
# stop_seconds.total (dump start to the restored pid). Also the bytes that
# crossed during the stop. Images, stores and weights on tmpfs (--dir).
#
#   scripts/bench-migrate.sh [--sizes "512 1024 2048 4096"] [--kv-mib 256] [--rate 10gbit]
#                            [--dir /dev/shm] [--json FILE]
#
# Each engine runs as the init of its own pid namespace (restore on the same
# kernel while the stopped source exists; docs/migrate.md).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
sizes="512 1024 2048 4096"
kv_mib=256
rate=10gbit
base=/dev/shm
json_out=
while [ $# -gt 0 ]; do
	case $1 in
	--sizes) sizes=$2; shift 2 ;;
	--kv-mib) kv_mib=$2; shift 2 ;;
	--rate) rate=$2; shift 2 ;;
	--dir) base=$2; shift 2 ;;
	--json) json_out=$2; shift 2 ;;
	*) echo "usage: $0 [--sizes \"MiB ...\"] [--kv-mib N] [--rate R] [--dir D] [--json FILE]" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (CRIU, network namespaces)" >&2; exit 1; }

# what netns.sh expects of its host script
log() { printf '# %s\n' "$*" >&2; }
fail() { echo "bench-migrate: $*" >&2; exit 1; }
KM_CLEANUP_HOOKS=()
KM_LINK_RATE=$rate
# shellcheck source-path=SCRIPTDIR source=../tests/integration/netns.sh
. "$top/tests/integration/netns.sh"

bench_setup
plugin_dir="$build/criu-hooks"
engine="$build/tests/engine/engine"
[ -f "$plugin_dir/kvmotion.so" ] || fail "the CRIU plugin was not built"
work=$(mktemp -d "$base/km-bench-migrate.XXXXXX")
pids=()
cleanup() {
	local p h
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	for h in "${KM_CLEANUP_HOOKS[@]}"; do "$h"; done
	rm -rf "$work"
}
trap cleanup EXIT
km_netns_setup
openssl rand -hex 32 >"$work/psk"
export KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null KVMOTION_WEIGHTS_DIR=$work/weights

wait_gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.02; done; }
# start_engine NAME STORE MODEL [ARGS...]: ENGINE_PID, on host A, own pid namespace
start_engine() {
	local name=$1 store=$2 model=$3 u
	shift 3
	rm -f "$work/$name.json"
	# nsenter itself, not km_in_a (a function: $! would be a subshell)
	KVMOTION_STORE=$store nsenter --net="/run/netns/$KM_NS_A" -- unshare --pid --fork setsid "$engine" --model "$model" \
		--out "$work/$name.out" --seqs 2 --total-seqs 0 --prompt-len 4 --max-new 64 \
		--kv-mib $((kv_mib + 64)) --kv-fill-mib "$kv_mib" --status-file "$work/$name.json" \
		"$@" </dev/null >/dev/null 2>&1 &
	u=$!
	ENGINE_PID=
	for _ in $(seq 6000); do
		ENGINE_PID=$(pgrep -P "$u" || true)
		[ -n "$ENGINE_PID" ] && [ -s "$work/$name.json" ] && break
		sleep 0.02
	done
	[ -s "$work/$name.json" ] || { fail "engine $name did not start"; }
	pids+=("$ENGINE_PID")
}
restored_pid() { python3 -c 'import sys; print(open(sys.argv[1]).read().strip())' "$1"; }

# plain: dump, copy over the link, restore on B
plain_run() {
	local mib=$1 model=$2 img=$work/plain-img dst=$work/plain-dst t0 t1 t2 t3 bytes rpid
	rm -rf "$img" "$dst"
	mkdir -p "$img" "$dst"
	start_engine plain "$work/empty-store" "$model"
	sleep 0.5
	t0=$(now)
	km_in_a "$criu" dump -t "$ENGINE_PID" -D "$img" -o dump.log -v1 ||
		{ tail -n 20 "$img/dump.log" >&2; fail "plain dump failed"; }
	t1=$(now)
	bytes=$(dir_bytes "$img")
	# receiver on B, sender on A: a tar stream over one TCP connection
	km_in_b python3 -c '
import socket, subprocess, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7480)); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
p = subprocess.Popen(["tar", "x", "-C", sys.argv[2]], stdin=subprocess.PIPE)
while True:
    b = c.recv(1 << 20)
    if not b: break
    p.stdin.write(b)
p.stdin.close(); sys.exit(p.wait())' "$KM_ADDR_B" "$dst" >"$work/recv.out" &
	local recv=$!
	for _ in $(seq 500); do grep -q ready "$work/recv.out" 2>/dev/null && break; sleep 0.01; done
	t1b=$(now)
	tar c -C "$img" --exclude '*.log' . | km_in_a python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], 7480))
while True:
    b = sys.stdin.buffer.read(1 << 20)
    if not b: break
    s.sendall(b)
s.shutdown(socket.SHUT_WR); s.recv(1)' "$KM_ADDR_B"
	wait "$recv"
	t2=$(now)
	km_in_b "$criu" restore -D "$dst" -d -o restore.log -v1 --pidfile "$dst/pid" ||
		{ tail -n 20 "$dst/restore.log" >&2; fail "plain restore failed"; }
	t3=$(now)
	rpid=$(restored_pid "$dst/pid")
	pids+=("$rpid")
	kill -9 "$rpid"
	rm -rf "$img" "$dst"
	echo "$(elapsed "$t0" "$t1") $(elapsed "$t1b" "$t2") $(elapsed "$t2" "$t3") $bytes"
}

# kvmotion: serve on B with a fresh store, migrate from A
km_run() {
	local name=$1 store=$2 model=$3 spid out=$work/$1-report.json
	shift 3
	rm -rf "$work/storeB" "$work/imagesB" "$work/$name-work"
	KVMOTION_STORE=$work/storeB nsenter --net="/run/netns/$KM_NS_B" -- "$km" serve --listen "$KM_ADDR_B:7481" \
		--store "$work/storeB" --images "$work/imagesB" --weights-dir "$work/weights" --psk-file "$work/psk" --no-sync \
		--restore-cmd "$criu" --restore-libdir "$plugin_dir" 2>"$work/serve.log" &
	spid=$!
	for _ in $(seq 500); do grep -q "listening on" "$work/serve.log" && break; sleep 0.01; done
	start_engine "$name" "$store" "$model" "$@"
	sleep 0.5
	km_in_a "$km" migrate --pid "$ENGINE_PID" --to "$KM_ADDR_B:7481" --psk-file "$work/psk" \
		--store "$store" --work "$work/$name-work" --criu "$criu" --plugin-dir "$plugin_dir" \
		--json ${weights:+--weights "$weights"} >"$out" || { cat "$out" >&2; fail "$name migration failed"; }
	pids+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["restored_pid"])' "$out")")
	kill -9 "${pids[-1]}"
	kill "$spid"
	wait "$spid" || true
	rm -rf "$work/$name-work"
	cat "$out"
}

results=()
mkdir -p "$work/empty-store"
for mib in $sizes; do
	model="$work/weights-$mib.safetensors"
	rm -rf "$work/storeA" "$work/weights"
	"$km" store init --store "$work/storeA" --no-sync >/dev/null
	"$build/tests/helpers/mkmodel" "$model" --size $((mib * 1024 * 1024)) --seed 11 >/dev/null
	plain=$(plain_run "$mib" "$model")
	"$km" seed "$model" --store "$work/storeA" --name "w$mib" --no-sync >/dev/null
	weights="w$mib" km_run transparent "$work/storeA" "$model" >"$work/t.json"
	weights="" km_run coop "$work/storeA" "$model" --coop >"$work/c.json"
	results+=("$mib $plain $(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(",",":")))' "$work/t.json") $(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(",",":")))' "$work/c.json")")
	echo "$mib MiB done" >&2
	rm -f "$model"
done

python3 - "$kv_mib" "$rate" "${json_out:-}" "${results[@]}" <<'EOF'
import json, sys
kv, rate, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = []
for line in sys.argv[4:]:
    v = line.split(" ", 7)
    mib = int(v[0])
    d, c, r, b = float(v[1]), float(v[2]), float(v[3]), int(v[4])
    t, k = json.loads(v[5]), json.loads(v[6])
    rows.append({"weights_mib": mib,
                 "plain": {"dump_s": d, "copy_s": c, "restore_s": r, "stop_s": d + c + r,
                           "bytes_during_stop": b},
                 "transparent": t, "coop": k})
print(f"engine with {kv} MiB of live KV, link {rate}; stop = dump start to running on B")
print(f"{'weights':>8} {'mode':12} {'stop s':>7} {'pre-copy MiB':>12} {'stop MiB':>9}  phases (s)")
mib = lambda x: x / 2**20
for r in rows:
    p = r["plain"]
    print(f"{r['weights_mib']:>5} MiB {'plain':12} {p['stop_s']:7.2f} {0:12.1f} {mib(p['bytes_during_stop']):9.1f}  "
          f"dump {p['dump_s']:.2f} copy {p['copy_s']:.2f} restore {p['restore_s']:.2f}")
    for m in ["transparent", "coop"]:
        x = r[m]; s = x["stop_seconds"]
        print(f"{r['weights_mib']:>5} MiB {m:12} {s['total']:7.2f} {mib(x['bytes_sent_before_stop']):12.1f} "
              f"{mib(x['bytes_sent_during_stop']):9.1f}  quiesce {s['quiesce']:.2f} freeze {s['freeze']:.2f} "
              f"dump {s['dump']:.2f} split {s['split']:.2f} transfer {s['transfer']:.2f} "
              f"join {s['join']:.2f} restore {s['restore']:.2f}")
by = {r["weights_mib"]: r for r in rows}
summary = {}
if 2048 in by:
    summary["coop_over_plain_2048"] = by[2048]["coop"]["stop_seconds"]["total"] / by[2048]["plain"]["stop_s"]
    print(f"coop / plain stop at 2 GiB: {summary['coop_over_plain_2048']:.3f} (target <= 0.2)")
if 4096 in by and 1024 in by:
    summary["coop_4096_over_1024"] = by[4096]["coop"]["stop_seconds"]["total"] / by[1024]["coop"]["stop_seconds"]["total"]
    print(f"coop stop 4 GiB / 1 GiB: {summary['coop_4096_over_1024']:.3f} (target <= 1.15)")
if out:
    with open(out, "w") as f:
        json.dump({"kv_mib": kv, "rate": rate, "rows": rows, "summary": summary}, f, indent=1)
EOF
