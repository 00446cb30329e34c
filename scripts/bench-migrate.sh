#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Live-migration benchmark (issue 5), one run: for each weights size, the test
# engine with --kv-mib of live KV, moved from host A to host B (two network
# namespaces joined by a tbf-limited veth, tests/integration/netns.sh), side
# by side:
#   plain        plain CRIU (no plugin), the faster of two ways:
#                  copy         criu dump + the image directory copied over the
#                               link (tar through a TCP socket) + criu restore on B
#                  page-server  criu dump --page-server to `criu page-server` on
#                               B (pages cross the link as they are dumped) + the
#                               other image files copied + criu restore on B
#   transparent  kvmotion migrate --weights INDEX on the plain engine: the
#                weights' chunks sent ahead, CRIU still dumps and restores them
#   coop         kvmotion migrate on the cooperative engine (weights file
#                sent ahead and materialized; not in the image)
# stop: plain = dump + copy + restore (wall clock); kvmotion = the report's
# stop_seconds.total (dump start to the restored pid). Also the bytes that
# crossed during the stop.
#
# Where things live: images and work directories on --dir (a tmpfs, as the
# issue asks); the model files and both stores on --data-dir (a disk: their
# page cache is memory the kernel can take back, where on tmpfs they would
# pin it, and both "hosts" share one machine's memory); the weights files on
# a tmpfs mounted huge=always under --dir (--weights-on: huge, tmpfs = plain
# pages on --dir, data = on --data-dir). Each mode's processes, images,
# store B and weights files are gone before the next mode starts.
#
# The stop's lower bound ("floor"): the bytes that must cross during the stop
# (the live dynamic state: plain CRIU's image less the model) over the link
# rate, plus the measured freeze and restore of a process of the same dynamic
# size (memproc with --kv-mib of dynamic memory, dumped and restored on A).
# Without plain, the dynamic bytes are taken as --kv-mib (a lower estimate).
#
#   scripts/bench-migrate.sh [--sizes "512 1024 2048 4096"] [--kv-mib 256] [--rate 10gbit]
#                            [--modes "plain transparent coop"] [--dir /dev/shm]
#                            [--data-dir /var/tmp] [--weights-on huge|tmpfs|data]
#                            [--rounds N] [--plain copy|page-server|both]
#                            [--transparent-args "..."] [--coop-args "..."]
#                            [--mem] [--plain-source keep|kill] [--json FILE]
#
# --rounds N: each migration N times, medians (default 1). --modes: a subset
# (the report says "not run" for the others). --transparent-args and
# --coop-args: extra arguments for that mode's `kvmotion migrate` (split on
# blanks). --mem: memory in use (/proc/meminfo) and each directory's size at
# each mode's peak, on stderr. The defaults are the issue's full benchmark.
#
# --plain-source keep (the default): plain CRIU's dump leaves the source
# stopped (--leave-stopped) and the source ends after B's restore, as
# kvmotion's stop does and as two hosts would see it. Here both "hosts" are
# one VM, and this VM hands the memory its guest frees back to the host at
# once (virtio-balloon free page reporting), so memory touched again costs
# a host fault per page (0.3 GB/s instead of ~2 GB/s): with `kill` (CRIU's
# default: the source killed at the end of the dump) B's restore reuses the
# gigabytes the source just freed on the same machine, which no second host
# would (docs/performance.md, "The stop's page server").
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
data_base=/var/tmp
weights_on=huge
modes="plain transparent coop"
json_out=
rounds=1
plain_ways=both
# kvmotion at its best: the live snapshot in the pre-copy, the stop
# incremental over it (pass "" to measure the full stop)
transparent_args=--snapshot
coop_args=--snapshot
mem=0
plain_source=keep
usage="usage: $0 [--sizes \"MiB ...\"] [--kv-mib N] [--rate R] [--modes \"plain transparent coop\"] [--dir D] [--data-dir D] [--weights-on huge|tmpfs|data] [--rounds N] [--plain copy|page-server|both] [--transparent-args ARGS] [--coop-args ARGS] [--mem] [--plain-source keep|kill] [--json FILE]"
while [ $# -gt 0 ]; do
	case $1 in
	--sizes) sizes=$2; shift 2 ;;
	--kv-mib) kv_mib=$2; shift 2 ;;
	--rate) rate=$2; shift 2 ;;
	--modes) modes=$2; shift 2 ;;
	--dir) base=$2; shift 2 ;;
	--data-dir) data_base=$2; shift 2 ;;
	--weights-on) weights_on=$2; shift 2 ;;
	--rounds) rounds=$2; shift 2 ;;
	--plain) plain_ways=$2; shift 2 ;;
	--transparent-args) transparent_args=$2; shift 2 ;;
	--coop-args) coop_args=$2; shift 2 ;;
	--mem) mem=1; shift ;;
	--plain-source) plain_source=$2; shift 2 ;;
	--json) json_out=$2; shift 2 ;;
	*) echo "$usage" >&2; exit 2 ;;
	esac
done
case $plain_source in kill) plain_dump_args=() ;; keep) plain_dump_args=(--leave-stopped) ;; *) echo "$usage" >&2; exit 2 ;; esac
case $plain_ways in copy | page-server | both) ;; *) echo "$usage" >&2; exit 2 ;; esac
case $weights_on in huge | tmpfs | data) ;; *) echo "$usage" >&2; exit 2 ;; esac
for m in $modes; do
	case $m in plain | transparent | coop) ;; *) echo "--modes: unknown mode '$m'" >&2; exit 2 ;; esac
done
[ -n "${modes// /}" ] || { echo "--modes: no mode" >&2; exit 2; }
has_mode() { case " $modes " in *" $1 "*) return 0 ;; esac; return 1; }
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
data=
pids=()
cleanup() {
	local p h
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	for h in "${KM_CLEANUP_HOOKS[@]}"; do "$h"; done
	weights_clear
	if mountpoint -q "$work/weights"; then umount "$work/weights"; fi
	rm -rf "$work" ${data:+"$data"}
}
trap cleanup EXIT
data=$(mktemp -d "$data_base/km-bench-migrate-data.XXXXXX")
case $weights_on in
huge)
	# huge pages: a cooperative dump walks 2048 page-table entries of a
	# 4 GiB mapping, not a million (docs/performance.md, cooperative mode)
	mkdir "$work/weights"
	mount -t tmpfs -o huge=always,mode=755 tmpfs "$work/weights"
	weights_dir=$work/weights ;;
tmpfs) weights_dir=$work/weights ;;
data) weights_dir=$data/weights ;;
esac
# the weights files (not the directory: it may be a mount point)
weights_clear() { [ -z "${weights_dir:-}" ] || find "$weights_dir" -mindepth 1 -delete 2>/dev/null || true; }
km_netns_setup
openssl rand -hex 32 >"$work/psk"
export KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null KVMOTION_WEIGHTS_DIR=$weights_dir

# mem_note LABEL: with --mem, the machine's memory and what each of the
# benchmark's directories holds, on stderr
mem_note() {
	[ "$mem" = 1 ] || return 0
	local d k line=
	for d in "$work"/* "$data"/* "$weights_dir"; do
		[ -e "$d" ] || continue
		k=$(du -sxk "$d" | cut -f1)
		[ "$k" -ge 1024 ] || continue
		case $line in *" ${d##*/}="*) continue ;; esac
		line+=" ${d##*/}=$((k / 1024))"
	done
	awk -v l="$1" -v dirs="$line" '
		/^(MemTotal|MemAvailable|Cached|Shmem|AnonPages|Dirty|Writeback):/ { v[$1] = int($2 / 1024) }
		END { printf "# mem %s: used %d avail %d anon %d cached %d (shmem %d) dirty %d writeback %d MiB; dirs MiB:%s\n",
			l, v["MemTotal:"] - v["MemAvailable:"], v["MemAvailable:"], v["AnonPages:"], v["Cached:"],
			v["Shmem:"], v["Dirty:"], v["Writeback:"], dirs }' /proc/meminfo >&2
}
# kill_wait PID: SIGKILL and wait until its memory is gone
kill_wait() {
	local st
	kill -9 "$1" 2>/dev/null || return 0
	for _ in $(seq 500); do
		st=$(ps -o stat= -p "$1" || true)
		case $st in '' | Z*) return 0 ;; esac
		sleep 0.01
	done
}

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
# bytes of a directory's files but CRIU's logs
image_bytes() { find "$1" -maxdepth 1 -type f ! -name '*.log' -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

# recv_start DST: a receiver on B that untars one TCP stream into DST,
# started before the clock runs (its start-up is no part of a stop)
recv_start() {
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
p.stdin.close(); sys.exit(p.wait())' "$KM_ADDR_B" "$1" >"$work/recv.out" &
	RECV_PID=$!
	for _ in $(seq 500); do grep -q ready "$work/recv.out" 2>/dev/null && break; sleep 0.01; done
}

# copy_dir SRC: SRC's files but CRIU's logs over the link to recv_start's receiver
copy_dir() {
	# shellcheck disable=SC2016 # expanded by the inner bash
	km_in_a bash -c 'tar c -C "$1" --exclude "*.log" . >"/dev/tcp/$2/7480"' copy "$1" "$KM_ADDR_B"
	wait "$RECV_PID"
}

# plain_run MODEL WAY: plain CRIU from A to B; WAY = copy (dump, copy the
# directory, restore) or page-server (pages streamed to B while dumping, the
# rest copied, restore). Prints "dump copy restore bytes-that-crossed".
plain_run() {
	local model=$1 way=$2 img=$work/plain-img dst=$work/plain-dst t0 t1 t2 t1b t3 bytes rpid ps
	rm -rf "$img" "$dst"
	mkdir -p "$img" "$dst"
	start_engine plain "$data/empty-store" "$model"
	recv_start "$dst"
	sleep 0.5
	if [ "$way" = page-server ]; then
		rm -f "$work/ps.pid"
		km_in_b "$criu" page-server -D "$dst" --address "$KM_ADDR_B" --port 7482 -o ps.log -v1 \
			--pidfile "$work/ps.pid" -d || fail "criu page-server did not start"
		ps=$(cat "$work/ps.pid")
		t0=$(now)
		km_in_a "$criu" dump -t "$ENGINE_PID" -D "$img" -o dump.log -v1 "${plain_dump_args[@]}" \
			--page-server --address "$KM_ADDR_B" --port 7482 ||
			{ tail -n 20 "$img/dump.log" >&2; fail "plain dump to the page server failed"; }
		t1=$(now)
		# the page server has written every page once it exits (a zombie
		# counts: whoever reaps orphans here may take its time)
		while ps -o stat= -p "$ps" | grep -qv Z; do sleep 0.005; done
	else
		t0=$(now)
		km_in_a "$criu" dump -t "$ENGINE_PID" -D "$img" -o dump.log -v1 "${plain_dump_args[@]}" ||
			{ tail -n 20 "$img/dump.log" >&2; fail "plain dump failed"; }
		t1=$(now)
	fi
	copy_dir "$img"
	t2=$(now)
	bytes=$(image_bytes "$dst")
	mem_note "plain $way, image on A and B"
	# A's copy is no part of B's restore: free it (off the clock), or at
	# 4 GiB the two images, the restored task, the stores and the weights
	# file outgrow one machine's memory, where each host would have its own
	rm -rf "$img"
	t1b=$(now)
	km_in_b "$criu" restore -D "$dst" -d -o restore.log -v1 --pidfile "$dst/pid" ||
		{ tail -n 20 "$dst/restore.log" >&2; fail "plain restore failed"; }
	t3=$(now)
	rpid=$(restored_pid "$dst/pid")
	pids+=("$rpid")
	mem_note "plain $way, restored on B"
	kill_wait "$rpid"
	# --plain-source keep: the stopped source ends now, after the restore
	[ "$plain_source" = kill ] || kill_wait "$ENGINE_PID"
	rm -rf "$img" "$dst"
	echo "$(elapsed "$t0" "$t1") $(elapsed "$t1" "$t2") $(elapsed "$t1b" "$t3") $bytes"
}

# The floor's measured part: freeze and restore of memproc with --kv-mib of
# dynamic memory (and a 1 MiB model), on A. Prints "freeze restore".
floor_run() {
	local d=$work/floor img=$work/floor/img pid t0 t1 fr
	rm -rf "$d"
	mkdir -p "$img"
	head -c 1048576 /dev/urandom >"$d/model"
	setsid "$build/tests/helpers/memproc" --model "$d/model" --dynamic "$kv_mib" \
		--progress "$d/progress" </dev/null >"$d/out" 2>&1 &
	pid=$!
	pids+=("$pid")
	for _ in $(seq 600); do [ -s "$d/progress" ] && break; sleep 0.05; done
	sleep 0.3
	"$criu" dump -t "$pid" -D "$img" -o dump.log -v4 || fail "floor: dump of memproc failed"
	fr=$(python3 - "$img/dump.log" <<'PY'
import re, sys
t0 = t1 = None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\((\d+\.\d+)\) (.*)", line)
    if not m:
        continue
    t, text = float(m.group(1)), m.group(2)
    if t0 is None and text.startswith("Dumping processes (pid:"):
        t0 = t
    elif t0 is not None and text.startswith("Collected "):
        t1 = t
    elif text.startswith("Dumping task (pid:"):
        break
print(f"{(t1 - t0) if t0 is not None and t1 is not None else 0:.6f}")
PY
)
	t0=$(now)
	"$criu" restore -D "$img" -d -o restore.log -v1 --pidfile "$d/pid" || fail "floor: restore of memproc failed"
	t1=$(now)
	kill -9 "$(restored_pid "$d/pid")" 2>/dev/null || true
	rm -rf "$d"
	echo "$fr $(elapsed "$t0" "$t1")"
}

# km_run NAME STORE MODEL [ENGINE ARGS...]: kvmotion from A to B, serve on B
# with a fresh store; migrate's extra arguments in the array margs
km_run() {
	local name=$1 store=$2 model=$3 spid rpid out=$work/$1-report.json
	shift 3
	rm -rf "$data/storeB" "$work/imagesB" "$work/$name-work"
	KVMOTION_STORE=$data/storeB nsenter --net="/run/netns/$KM_NS_B" -- "$km" serve --listen "$KM_ADDR_B:7481" \
		--store "$data/storeB" --images "$work/imagesB" --weights-dir "$weights_dir" --psk-file "$work/psk" --no-sync \
		--restore-cmd "$criu" --restore-libdir "$plugin_dir" 2>"$work/serve.log" &
	spid=$!
	for _ in $(seq 500); do grep -q "listening on" "$work/serve.log" && break; sleep 0.01; done
	start_engine "$name" "$store" "$model" "$@"
	sleep 0.5
	mem_note "$name, engine on A"
	km_in_a "$km" migrate --pid "$ENGINE_PID" --to "$KM_ADDR_B:7481" --psk-file "$work/psk" \
		--store "$store" --work "$work/$name-work" --criu "$criu" --plugin-dir "$plugin_dir" \
		--json "${margs[@]}" >"$out" || {
		cat "$out" >&2
		tail -n 30 "$work/$name-work"/*/dump.log >&2 2>/dev/null
		fail "$name migration failed"
	}
	rpid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["restored_pid"])' "$out")
	pids+=("$rpid")
	mem_note "$name, restored on B"
	kill_wait "$rpid"
	kill "$spid"
	wait "$spid" || true
	# nothing of this mode is left for the next one
	# KM_BENCH_LOGS=DIR: B's restore.log of each kvmotion stop kept there
	[ -z "${KM_BENCH_LOGS:-}" ] || for f in "$work"/imagesB/*/restore.log; do cp "$f" "$KM_BENCH_LOGS/$(basename "$(dirname "$f")").restore.log"; done
	rm -rf "$work/$name-work" "$data/storeB" "$work/imagesB"
	cat "$out"
}

mkdir -p "$data/empty-store"
floors=()
for _ in $(seq "$rounds"); do floors+=("$(floor_run)"); done
floor_freeze=$(median "${floors[@]% *}")
floor_restore=$(median "${floors[@]#* }")
echo "floor: freeze $floor_freeze s, restore $floor_restore s (memproc, $kv_mib MiB dynamic)" >&2

compact() { python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(",",":")))' "$1"; }
read -r -a targs <<<"$transparent_args"
read -r -a cargs <<<"$coop_args"
results=()
for mib in $sizes; do
	model="$data/weights-$mib.safetensors"
	rm -rf "$data/storeA"
	weights_clear
	"$km" store init --store "$data/storeA" --no-sync >/dev/null
	"$build/tests/helpers/mkmodel" "$model" --size $((mib * 1024 * 1024)) --seed 11 >/dev/null
	"$km" seed "$model" --store "$data/storeA" --name "w$mib" --no-sync >/dev/null
	# the model and store A on --data-dir (a disk) written back before any
	# clock runs: the flusher would otherwise write gigabytes during stops
	sync
	for round in $(seq "$rounds"); do
		copy=- ps=- t=- c=-
		if has_mode plain; then
			[ "$plain_ways" = page-server ] || copy=$(plain_run "$model" copy)
			[ "$plain_ways" = copy ] || ps=$(plain_run "$model" page-server)
		fi
		if has_mode transparent; then
			margs=(--weights "w$mib" "${targs[@]}")
			km_run transparent "$data/storeA" "$model" >"$work/t.json"
			t=$(compact "$work/t.json")
		fi
		if has_mode coop; then
			margs=("${cargs[@]}")
			km_run coop "$data/storeA" "$model" --coop >"$work/c.json"
			c=$(compact "$work/c.json")
		fi
		# the weights file is made again for the next round's engine (and
		# takes no memory meanwhile)
		weights_clear
		results+=("$mib|$round|$(stat -c %s "$model")|$copy|$ps|$t|$c")
		# kept as it goes: a long run's rows survive a failure of the report
		[ -z "$json_out" ] || printf '%s\n' "${results[-1]}" >>"$json_out.rows"
		echo "$mib MiB, round $round done" >&2
	done
	rm -rf "$model" "$data/storeA"
done

python3 - "$kv_mib" "$rate" "${json_out:-}" "$floor_freeze" "$floor_restore" "$modes" "$plain_source" "${results[@]}" <<'PY'
import json, re, statistics, sys
kv, rate, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
floor_freeze, floor_restore = float(sys.argv[4]), float(sys.argv[5])
modes = sys.argv[6].split()
plain_source = sys.argv[7]
del sys.argv[7]
m = re.fullmatch(r"(\d+(?:\.\d+)?)(gbit|mbit|kbit|bit)?", rate)
bps = float(m.group(1)) * {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1, None: 1}[m.group(2)]
med = statistics.median
KM = [x for x in ("transparent", "coop") if x in modes]
NAMES = {"transparent": "transparent", "coop": "coop"}


def plain(v):
    if v == "-":
        return None
    d, c, r, b = v.split()
    d, c, r = float(d), float(c), float(r)
    return {"dump_s": d, "copy_s": c, "restore_s": r, "stop_s": d + c + r, "bytes_during_stop": int(float(b))}


runs = {}
for line in sys.argv[7:]:
    mib, rnd, model_bytes, copy, ps, t, k = line.split("|", 6)
    runs.setdefault(int(mib), []).append({"model_bytes": int(model_bytes), "copy": plain(copy),
                                          "page_server": plain(ps),
                                          "transparent": None if t == "-" else json.loads(t),
                                          "coop": None if k == "-" else json.loads(k)})
PHASES = ("quiesce", "freeze", "gpu_checkpoint", "dump", "split", "transfer", "join", "restore",
          "gpu_restore", "resume")
rows = []
for mib in sorted(runs):
    rs = runs[mib]
    row = {"weights_mib": mib, "rounds": rs, "plain_stop_s": None}
    ways = {w: med([r[w]["stop_s"] for r in rs]) for w in ("copy", "page_server") if rs[0][w]}
    if ways:
        best = min(ways, key=ways.get)
        row["plain_way"], row["plain_stop_s"], row["plain_ways_s"] = best, ways[best], ways
        row["plain_bytes"] = med([r[best]["bytes_during_stop"] for r in rs])
        # the live dynamic state: what plain CRIU sent, less the model
        row["dynamic_bytes"] = max(row["plain_bytes"] - rs[0]["model_bytes"], kv << 20)
        row["dynamic_from"] = "plain image less the model"
    else:
        row["plain_ways_s"] = {}
        row["dynamic_bytes"] = kv << 20
        row["dynamic_from"] = "--kv-mib (plain not run: a lower estimate)"
    row["floor_s"] = row["dynamic_bytes"] * 8 / bps + floor_freeze + floor_restore
    for mode in KM:
        row[mode] = {"stop_s": med([r[mode]["stop_seconds"]["total"] for r in rs]),
                     "before_bytes": med([r[mode]["bytes_sent_before_stop"] for r in rs]),
                     "during_bytes": med([r[mode]["bytes_sent_during_stop"] for r in rs]),
                     "during_wire_bytes": med([r[mode]["wire_bytes_during_stop"] for r in rs]),
                     "dedup_bytes": med([r[mode]["bytes_deduplicated"] for r in rs]),
                     "phases": {p: med([r[mode]["stop_seconds"][p] for r in rs]) for p in PHASES}}
    rows.append(row)


def M(x):
    return x / 2**20


print(f"engine with {kv} MiB of live KV, link {rate}; stop = dump start to running on B; floor = "
      f"dynamic bytes / link + freeze {floor_freeze:.3f} s + restore {floor_restore:.3f} s (memproc)")
print(f"{'weights':>9} {'mode':18} {'stop s':>7} {'x floor':>7} {'before MiB':>10} {'stop MiB':>9} "
      f"{'wire MiB':>9}  phases (s)")
for r in rows:
    w = f"{r['weights_mib']:>5} MiB"
    if "plain" not in modes:
        print(f"{w} {'plain':18} not run")
    for way, s in r["plain_ways_s"].items():
        p = r["rounds"][0][way]
        print(f"{w} {'plain ' + way:18} {s:7.2f} {s / r['floor_s']:7.2f} {0:10.1f} "
              f"{M(p['bytes_during_stop']):9.1f} {'':>9}  "
              f"dump {p['dump_s']:.2f} copy {p['copy_s']:.2f} restore {p['restore_s']:.2f}")
    for mode in ("transparent", "coop"):
        if mode not in KM:
            print(f"{w} {mode:18} not run")
            continue
        x = r[mode]
        print(f"{w} {mode:18} {x['stop_s']:7.2f} {x['stop_s'] / r['floor_s']:7.2f} "
              f"{M(x['before_bytes']):10.1f} {M(x['during_bytes']):9.1f} {M(x['during_wire_bytes']):9.1f}  "
              + " ".join(f"{p} {x['phases'][p]:.3f}" for p in PHASES))
    print(f"{w} {'floor':18} {r['floor_s']:7.2f} {1:7.2f} {'':>10} {M(r['dynamic_bytes']):9.1f}"
          + ("" if "plain" in modes else "  (dynamic bytes = --kv-mib: plain not run)"))
by = {r["weights_mib"]: r for r in rows}
summary = {"floor_freeze_s": floor_freeze, "floor_restore_s": floor_restore, "modes": modes}


def target(name, value, ok):
    summary[name] = {"value": value, "met": ok}
    print(f"{name}: {value:.3f} ({'met' if ok else 'NOT met'})")


def not_run(name, why):
    summary[name] = {"value": None, "met": None, "not_run": why}
    print(f"{name}: not run ({why})")


def need(*ms):
    return ", ".join(x for x in ms if x not in modes)


name = "coop stop / plain stop at 2 GiB (<= 0.2)"
if 2048 in by:
    if need("coop", "plain"):
        not_run(name, "no " + need("coop", "plain"))
    else:
        v = by[2048]["coop"]["stop_s"] / by[2048]["plain_stop_s"]
        target(name, v, v <= 0.2)
name = "coop stop 4 GiB / 1 GiB (<= 1.15)"
if 4096 in by and 1024 in by:
    if need("coop"):
        not_run(name, "no coop")
    else:
        v = by[4096]["coop"]["stop_s"] / by[1024]["coop"]["stop_s"]
        target(name, v, v <= 1.15)
for r in rows:
    name = f"transparent stop / plain stop at {r['weights_mib']} MiB (< 1)"
    if need("transparent", "plain"):
        not_run(name, "no " + need("transparent", "plain"))
    else:
        v = r["transparent"]["stop_s"] / r["plain_stop_s"]
        target(name, v, v < 1)
    for mode in ("transparent", "coop"):
        # what crossed the link: the wire bytes (zstd on the wire counts; the
        # file bytes before it are in during_bytes)
        name = f"{mode} wire bytes in the stop / dynamic bytes at {r['weights_mib']} MiB (<= 1)"
        if need(mode, "plain"):
            not_run(name, "no " + need(mode, "plain"))
            continue
        v = r[mode]["during_wire_bytes"] / r["dynamic_bytes"]
        target(name, v, v <= 1)
if out:
    with open(out, "w") as f:
        json.dump({"kv_mib": kv, "rate": rate, "modes": modes, "plain_source": plain_source, "rows": rows, "summary": summary}, f, indent=1)
PY
