#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Run by `meson install` (criu-hooks/meson.build): the host-wide files that
# CRIU's plugin and runc read, under $DESTDIR when meson sets it. Fixed
# paths, whatever the prefix: the plugin reads /etc/kvmotion/kvmotion.conf,
# runc /etc/criu/runc.conf. Nothing an administrator wrote is overwritten:
#  - kvmotion.conf is installed only where there is none;
#  - runc.conf keeps its lines; a `timeout` line is added only if it has none
#    (CRIU's default of 10 s bounds the whole freeze: too short for a GPU
#    process's checkpoint, or a quiesce and a large dump).
#
#   install-config.sh TEMPLATE TIMEOUT_S
set -eu

template=$1
timeout=$2
root=${DESTDIR:-}
conf_dir=$root/etc/kvmotion
criu_dir=$root/etc/criu

mkdir -p "$conf_dir" "$criu_dir"
if [ -e "$conf_dir/kvmotion.conf" ]; then
	echo "kvmotion: kept the existing $conf_dir/kvmotion.conf"
else
	cp "$template" "$conf_dir/kvmotion.conf.new"
	chmod 644 "$conf_dir/kvmotion.conf.new"
	mv "$conf_dir/kvmotion.conf.new" "$conf_dir/kvmotion.conf"
	echo "kvmotion: installed $conf_dir/kvmotion.conf"
fi

runc=$criu_dir/runc.conf
# CRIU's config syntax: long option names without "--", one per line
if [ -f "$runc" ] && grep -Eq '^[[:space:]]*(--)?timeout([[:space:]=]|$)' "$runc"; then
	echo "kvmotion: kept the timeout of $runc: $(grep -E '^[[:space:]]*(--)?timeout' "$runc" | head -n 1)"
else
	# a file without a final newline must not glue the new line to its last
	if [ -s "$runc" ] && [ "$(tail -c 1 "$runc" | od -An -c | tr -d ' ')" != '\n' ]; then
		echo >>"$runc"
	fi
	{
		echo "# Added by kvmotion's install: CRIU's default timeout (10 s) bounds the"
		echo "# whole freeze, too short for a GPU process (docs/criu.md)."
		echo "timeout $timeout"
	} >>"$runc"
	echo "kvmotion: added 'timeout $timeout' to $runc"
fi
