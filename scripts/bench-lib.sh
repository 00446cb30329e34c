# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Shared by the scripts/bench-*.sh benchmarks (sourced): set-up and build,
# and the timing helpers. Sets top, build, km (the CLI) and criu.

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="$top/build"

# km and criu are for the scripts that source this file.
# shellcheck disable=SC2034
bench_setup() {
	bash "$top/scripts/setup.sh"
	[ -f "$build/build.ninja" ] || meson setup "$build" -Dtests=enabled >/dev/null
	ninja -C "$build" >/dev/null
	km="$build/plugin/kvmotion"
	criu="$top/.deps/bin/criu"
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
median() { python3 -c 'import sys; v = sorted(map(float, sys.argv[1:])); print(v[len(v) // 2])' "$@"; }
dir_bytes() { du -sb --apparent-size "$1" | cut -f1; }
