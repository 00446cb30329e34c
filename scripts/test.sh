#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Sets up, builds and runs every test: the warning-free build (-Werror) with
# the whole suite (unit + integration on the real CRIU), then an ASan/UBSan
# build running the suite again.
#
#   scripts/test.sh              everything
#   KM_TEST_SANITIZE=0 scripts/test.sh   skip the sanitizer run
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash scripts/setup.sh

configure() {
	local dir=$1
	shift
	if [ -d "$dir" ] && [ -f "$dir/build.ninja" ]; then
		meson configure "$dir" "$@" >/dev/null
	else
		meson setup "$dir" "$@" >/dev/null
	fi
}

logs=(build/meson-logs/testlog.json)
configure build --werror -Dtests=enabled
ninja -C build
meson test -C build --print-errorlogs --num-processes 2

if [ "${KM_TEST_SANITIZE:-1}" != 0 ]; then
	# The sanitized CLI runs under the integration tests too; the plugin's
	# tests (suite 'plugin') are left out: a sanitized .so cannot be loaded
	# into CRIU, which is not built with the sanitizer runtime.
	configure build-asan --werror -Dtests=enabled -Db_sanitize=address,undefined \
		-Db_lundef=false -Dbuildtype=debug
	ninja -C build-asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		meson test -C build-asan --print-errorlogs --num-processes 2 --no-suite plugin
	logs+=(build-asan/meson-logs/testlog.json)
fi

# One closing line for whoever reads the log: every test of both runs.
python3 - "${logs[@]}" <<'PY'
import json, os, sys
counts = {"passed": 0, "failed": 0, "skipped": 0}
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    for line in open(path):
        result = json.loads(line)["result"]
        key = {"OK": "passed", "EXPECTEDFAIL": "passed", "SKIP": "skipped"}.get(result, "failed")
        counts[key] += 1
print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
PY
