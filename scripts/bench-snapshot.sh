#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# The pre-copy snapshot of `kvmotion migrate --snapshot`, live vs CRIU, in
# one run on one engine: the test engine (plain mode: its weights in
# anonymous memory) with --weights-mib of weights and --kv-mib of filled KV
# blocks, decoding all the while. Rounds alternate
#   live   kvmotion snapshot --pid PID DIR     (plugin/livesnap.c)
#   criu   criu dump -t PID -D DIR --leave-running -v4   (what migrate ran)
# into --dir (tmpfs by default), each round's directory removed after it.
# For each: wall time, bytes of pages-*.img (and of the whole directory),
# and how long the engine's generation paused: the longest gap between two
# decode steps that overlaps the snapshot (a sampler polls the engine's
# status file every 2 ms) against the median gap of the rounds' quiet
# times, and the engine's CPU time during the snapshot (/proc/PID/stat: a
# frozen engine gets none).
#
#   scripts/bench-snapshot.sh [--weights-mib N] [--kv-mib N] [--rounds N]
#                             [--dir D] [--json FILE]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
weights_mib=512
kv_mib=256
rounds=3
base=/dev/shm
json_out=
while [ $# -gt 0 ]; do
	case $1 in
	--weights-mib) weights_mib=$2; shift 2 ;;
	--kv-mib) kv_mib=$2; shift 2 ;;
	--rounds) rounds=$2; shift 2 ;;
	--dir) base=$2; shift 2 ;;
	--json) json_out=$2; shift 2 ;;
	*) echo "usage: $0 [--weights-mib N] [--kv-mib N] [--rounds N] [--dir D] [--json FILE]" >&2; exit 2 ;;
	esac
done

# bench_setup without re-running scripts/setup.sh (which must have run)
[ -f "$build/build.ninja" ] || meson setup "$build" -Dtests=enabled >/dev/null
ninja -C "$build" >/dev/null
km="$build/plugin/kvmotion"
criu="$top/.deps/bin/criu"
work=$(mktemp -d "$base/km-bench-snapshot.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT

"$build/tests/helpers/mkmodel" "$work/weights.safetensors" --size $((weights_mib << 20)) --seed 11
setsid "$build/tests/engine/engine" --model "$work/weights.safetensors" --out /dev/null \
	--seqs 2 --total-seqs 0 --prompt-len 4 --max-new 64 --kv-mib $((kv_mib + 64)) \
	--kv-fill-mib "$kv_mib" --status-file "$work/status.json" </dev/null >"$work/engine.log" 2>&1 &
pid=$!
disown "$pid"

python3 - "$pid" "$work" "$km" "$criu" "$rounds" "$weights_mib" "$kv_mib" "${json_out:-}" <<'EOF'
import json, os, statistics, subprocess, sys, threading, time

pid, work, km, criu = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
rounds, weights_mib, kv_mib, json_out = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
tick = os.sysconf('SC_CLK_TCK')
steps = []  # (monotonic time the step counter was seen to move, steps)
stop = False

def read_steps():
    try:
        with open(work + '/status.json') as f:
            return json.load(f)['steps']
    except (OSError, ValueError, KeyError):
        return None

def sampler():
    last = None
    while not stop:
        s = read_steps()
        if s is not None and s != last:
            steps.append((time.monotonic(), s))
            last = s
        time.sleep(0.002)

def cpu_s():
    with open(f'/proc/{pid}/stat') as f:
        v = f.read().rsplit(')', 1)[1].split()
    return (int(v[11]) + int(v[12])) / tick

def dir_bytes(d, pattern=''):
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)
               if n.startswith(pattern) and not n.endswith('.log'))

t = threading.Thread(target=sampler, daemon=True)
t.start()
deadline = time.monotonic() + 600
while len(steps) < 4:  # the engine has loaded and decodes
    if time.monotonic() > deadline or not os.path.exists(f'/proc/{pid}'):
        sys.exit('the engine does not decode')
    time.sleep(0.1)
rss = int([l for l in open(f'/proc/{pid}/status') if l.startswith('VmRSS')][0].split()[1]) * 1024

def gap_over(t0, t1):
    """The longest interval between two step changes that overlaps [t0, t1]."""
    g = 0.0
    for (a, _), (b, _) in zip(steps, steps[1:]):
        if b >= t0 and a <= t1:
            g = max(g, b - a)
    return g

rows, quiet = [], []
for r in range(rounds):
    for mode in (('live', 'criu') if r % 2 == 0 else ('criu', 'live')):
        time.sleep(2.0)  # quiet time: the engine's normal step gaps
        d = f'{work}/{mode}{r}'
        if mode == 'live':
            cmd = [km, 'snapshot', '--pid', str(pid), d, '--json']
        else:
            os.mkdir(d)
            cmd = [criu, 'dump', '-t', str(pid), '-D', d, '--leave-running', '-o', 'dump.log', '-v4']
        c0, t0 = cpu_s(), time.monotonic()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        t1, c1 = time.monotonic(), cpu_s()
        time.sleep(1.5)  # the step in progress at t1 ends
        row = {'mode': mode, 'round': r, 'seconds': round(t1 - t0, 3),
               'pages_bytes': dir_bytes(d, 'pages-'), 'dir_bytes': dir_bytes(d),
               'engine_cpu_s': round(c1 - c0, 3), 'longest_step_gap_s': round(gap_over(t0, t1), 3)}
        if mode == 'live':
            row['live'] = json.loads(out)
        rows.append(row)
        subprocess.run(['rm', '-rf', d], check=True)
        print(f"{mode:4} round {r}: {row['seconds']:.3f} s, pages {row['pages_bytes'] / 2**20:.1f} MiB "
              f"(dir {row['dir_bytes'] / 2**20:.1f} MiB), engine CPU {row['engine_cpu_s']:.2f} s, "
              f"longest step gap {row['longest_step_gap_s']:.3f} s", flush=True)
stop = True
t.join()
gaps = [b - a for (a, _), (b, _) in zip(steps, steps[1:])]
med_gap = statistics.median(gaps)

def med(mode, k):
    return statistics.median(x[k] for x in rows if x['mode'] == mode)

summary = {'weights_mib': weights_mib, 'kv_mib': kv_mib, 'rss_bytes': rss, 'rounds': rounds,
           'median_step_gap_s': round(med_gap, 3),
           'live': {k: med('live', k) for k in ('seconds', 'pages_bytes', 'dir_bytes', 'engine_cpu_s', 'longest_step_gap_s')},
           'criu': {k: med('criu', k) for k in ('seconds', 'pages_bytes', 'dir_bytes', 'engine_cpu_s', 'longest_step_gap_s')},
           'rows': rows}
print(f"engine: {weights_mib} MiB weights + {kv_mib} MiB KV, RSS {rss / 2**20:.0f} MiB, "
      f"median step gap {med_gap:.3f} s ({len(gaps)} steps)")
for m in ('live', 'criu'):
    s = summary[m]
    print(f"median {m:4}: {s['seconds']:.3f} s, pages {s['pages_bytes'] / 2**20:.1f} MiB, "
          f"engine CPU during it {s['engine_cpu_s']:.2f} s, longest step gap {s['longest_step_gap_s']:.3f} s")
if json_out:
    with open(json_out, 'w') as f:
        json.dump(summary, f, indent=1)
EOF
