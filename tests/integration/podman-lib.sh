# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Container test scaffolding (sourced after lib.sh and km_init, never run):
# podman "nodes" on this machine, each in its own mount namespace where its
# own directory is mounted at one path common to all nodes ($POD_NODE_DIR),
# as real hosts have the same paths: its podman storage, its kvmotion store
# and configuration, its runc state (/run/runc), its `criu` first on PATH.
# A container checkpointed on one node names paths (conmon's pidfile, bind
# mounts, weights files) that exist on every node, as on a cluster. The test
# engine's image is imported from a rootfs tarball built from the build tree
# (no registry is reachable).
#
#   pod_init                  checks podman and runc (SKIP with the reason if
#                             they cannot run), builds the engine's rootfs
#                             tarball once ($POD_ROOTFS_TAR)
#   pod_node_setup NODE [--no-plugin] [--plugin-dir DIR] [--config FILE]
#                             makes node NODE: its directory $(pod_dir NODE)
#                             (seen by the node as $POD_NODE_DIR) with podman
#                             storage, store/ (weights files in store/weights;
#                             not made: an
#                             existing directory that is not a store makes
#                             the plugin refuse dumps; seed or init it), kvmotion.conf, bin/criu, plugins/;
#                             imports the engine image; its containers,
#                             mounts and namespace go at the test's exit.
#                             DIR and FILE are paths as the node sees them
#   pod NODE ARGS...          podman ARGS on NODE (its namespace, storage,
#                             runc, PATH)
#   pod_in NODE CMD...        CMD in NODE's mount namespace (PATH with its criu)
#   pod_run_engine NODE NAME [PODMAN-RUN OPTIONS...] -- [ENGINE ARGS...]
#                             runs the test engine detached as container NAME
#   pod_run NODE NAME [PODMAN-RUN OPTIONS...] -- CMD...
#                             any command of the image, detached
#   pod_pid NODE NAME         the host pid of the container's process
#   pod_state NODE NAME       podman's state: running, exited, ... ("" if none)
#   pod_wait_exit NODE NAME [TIMEOUT_S]   waits until it has exited
#   pod_file NODE NAME PATH   the host path of PATH in the container's own
#                             layer (its upper dir): what the container
#                             wrote in its rootfs, which an exported
#                             checkpoint carries (rootfs-diff.tar) and a
#                             restore puts back as it was at the checkpoint
#   pod_engine_wait NODE NAME STATUS MIN [TIMEOUT_S]   waits until the
#                             engine's --status-file STATUS (a path in its
#                             rootfs) shows at least MIN tokens generated
#   pod_checkpoint NODE NAME ARCHIVE [OPTIONS...]   checkpoint --export,
#                             CRIU's dump.log kept as ARCHIVE.dump.log; sets
#                             POD_SECONDS (wall time); fails the test on error
#   pod_restore NODE ARCHIVE [OPTIONS...]   restore --import, restore.log kept
#                             as ARCHIVE.restore.log; sets POD_SECONDS
#   pod_try_restore NODE ARCHIVE OUT [OPTIONS...]   the same, returning
#                             podman's status instead of failing (stderr in OUT)
#   pod_archive_ls ARCHIVE    "size name" per file of an archive
#   pod_archive_has ARCHIVE GLOB     0 if a member name matches GLOB
#
# Variables: POD_IMAGE (the engine image's name), POD_ENGINE (the engine's
# path inside it), POD_NODE_DIR (where every node sees its own directory),
# POD_SHARE ($KM_TMP/share, seen by the host and every node: bind-mounted
# read-write at the same path into every container of pod_run, for models,
# outputs and status files), POD_RUNTIME (runc), POD_LIMITS (the ulimits
# this VM needs), POD_NODES (the nodes made).
#
# What podman passes down: podman runs runc with a cleaned environment that
# keeps PATH, and runc runs `criu swrk` by a PATH lookup; nothing else of the
# caller's environment (KVMOTION_*, CRIU_LIBS_DIR) reaches CRIU. So a node's
# settings live in its criu wrapper (bin/criu), which exports CRIU_LIBS_DIR
# (the node's plugin dir) and KVMOTION_CONFIG and runs $CRIU.

POD_IMAGE=localhost/kvmotion-test-engine:latest
POD_ENGINE=/usr/local/bin/engine
POD_RUNTIME=runc
POD_LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
POD_NODES=()
POD_SECONDS=0
POD_SHARE=""
POD_NODE_DIR=""
POD_ROOTFS_TAR=""

# Host paths of a node's directory and store (the node sees $POD_NODE_DIR).
pod_dir() { printf '%s/nodes/%s' "$KM_TMP" "$1"; }
pod_store() { printf '%s/nodes/%s/store' "$KM_TMP" "$1"; }

pod_in() {
	local node=$1
	shift
	nsenter --mount="$KM_TMP/ns/$node" -- env PATH="$POD_NODE_DIR/bin:$PATH" "$@"
}

pod() {
	local node=$1 d=$POD_NODE_DIR
	shift
	pod_in "$node" podman --root "$d/root" --runroot "$d/runroot" --tmpdir "$d/tmp" \
		--runtime "$POD_RUNTIME" --cgroup-manager cgroupfs --events-backend none "$@"
}

# The engine (ENGINE from engine_test_init, else the build tree's), the
# loader and every library ldd names, sh and sleep: a few MiB.
pod_build_rootfs() {
	local engine=${ENGINE:-$KM_BUILD_DIR/tests/engine/engine} root=$KM_TMP/rootfs f dir
	[ -x "$engine" ] || fail "$engine is missing: build the project first"
	rm -rf "$root"
	mkdir -p "$root/usr/local/bin" "$root/bin" "$root/tmp" "$root/etc" "$root/proc" \
		"$root/sys" "$root/dev"
	chmod 1777 "$root/tmp"
	cp "$engine" "$root$POD_ENGINE"
	cp "$(command -v sleep)" "$(command -v sh)" "$root/bin/"
	# "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
	while read -r f; do
		case $f in
		/lib/* | /lib64/* | /usr/*) dir=$(dirname "$f") ;;
		# the build tree's libraries (rpath): the image's default path
		*) dir=/lib/x86_64-linux-gnu ;;
		esac
		mkdir -p "$root$dir"
		cp -L "$f" "$root$dir/"
	done < <({
		ldd "$engine"
		ldd "$(command -v sleep)"
		ldd "$(command -v sh)"
	} | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
	printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
	POD_ROOTFS_TAR=$KM_TMP/engine-rootfs.tar
	tar -C "$root" -cf "$POD_ROOTFS_TAR" . || fail "cannot pack $root"
	rm -rf "$root"
	log "engine rootfs: $POD_ROOTFS_TAR ($(file_size "$POD_ROOTFS_TAR") B)"
}

pod_init() {
	local out
	command -v podman >/dev/null 2>&1 || skip "podman is not installed (apt-get install podman runc uidmap; scripts/setup.sh does)"
	command -v "$POD_RUNTIME" >/dev/null 2>&1 || skip "$POD_RUNTIME is not installed (podman checkpoints need runc: Debian's crun has no CRIU)"
	[ "$KM_HAVE_CRIU" = 1 ] || skip "no working CRIU"
	{ command -v nsenter && command -v unshare; } >/dev/null 2>&1 ||
		skip "nsenter and unshare (util-linux) are needed for the node namespaces"
	POD_SHARE=$KM_TMP/share
	POD_NODE_DIR=$KM_TMP/node
	mkdir -p "$POD_SHARE" "$POD_NODE_DIR" "$KM_TMP/ns"
	KM_CLEANUP_HOOKS+=(pod_cleanup)
	# a namespace is kept by a bind mount of its nsfs file, which must not
	# propagate: the files live on a private mount
	{ mount --bind "$KM_TMP/ns" "$KM_TMP/ns" && mount --make-private "$KM_TMP/ns"; } ||
		skip "cannot make a private mount for the node namespaces"
	pod_build_rootfs
	# can a container run here at all?
	pod_node_setup probe --no-plugin
	if ! out=$(pod probe run --rm --network none "${POD_LIMITS[@]}" "$POD_IMAGE" /bin/sh -c 'echo ok' 2>&1) ||
		[ "$out" != ok ]; then
		printf '%s\n' "$out" | tail -n 20
		skip "podman cannot run a container on this machine: $(printf '%s' "$out" | tail -n 1)"
	fi
	log "podman $(podman --version | awk '{ print $3 }'), $("$POD_RUNTIME" --version | head -n 1)"
}

# pod_node_setup NODE [--no-plugin] [--plugin-dir DIR] [--config FILE]
pod_node_setup() {
	local node=$1 n d=$POD_NODE_DIR plugin_dir="" config="" with_plugin=1
	shift
	while [ $# -gt 0 ]; do
		case $1 in
		--no-plugin) with_plugin=0 ;;
		--plugin-dir) plugin_dir=$2 && shift ;;
		--config) config=$2 && shift ;;
		*) fail "pod_node_setup: unknown option $1" ;;
		esac
		shift
	done
	n=$(pod_dir "$node")
	mkdir -p "$n/root" "$n/runroot" "$n/tmp" "$n/bin" "$n/plugins" "$n/runc"
	if [ -z "$plugin_dir" ]; then
		plugin_dir=$d/plugins
		if [ "$with_plugin" = 1 ]; then
			local so=${PLUGIN_DIR:-$KM_BUILD_DIR/criu-hooks}/kvmotion.so
			[ -f "$so" ] || skip "the CRIU plugin was not built (no criu-plugin.h)"
			cp "$so" "$n/plugins/"
		fi
	fi
	if [ -z "$config" ]; then
		config=$d/kvmotion.conf
		cat >"$n/kvmotion.conf" <<EOF
# node $node of $KM_TEST_NAME
store = $d/store
sync = no
EOF
	fi
	cat >"$n/bin/criu" <<EOF
#!/bin/sh
# node $node: CRIU with this node's plugin dir and kvmotion configuration
export CRIU_LIBS_DIR='$plugin_dir' KVMOTION_CONFIG='$config'
exec '$CRIU' "\$@"
EOF
	chmod 755 "$n/bin/criu"
	# the node's mount namespace: its directory at $POD_NODE_DIR, its runc
	# state at /run/runc (a restored container keeps its id)
	touch "$KM_TMP/ns/$node"
	unshare --mount="$KM_TMP/ns/$node" --propagation private true ||
		fail "cannot make the mount namespace of node $node"
	POD_NODES+=("$node")
	mkdir -p /run/runc
	# shellcheck disable=SC2016 # expanded by that sh
	nsenter --mount="$KM_TMP/ns/$node" -- sh -c \
		'mount --bind "$1" "$2" && mount --bind "$3" /run/runc' sh "$n" "$d" "$n/runc" ||
		fail "cannot mount node $node's directories in its namespace"
	pod "$node" import "$POD_ROOTFS_TAR" "$POD_IMAGE" >"$n/import.log" 2>&1 || {
		cat "$n/import.log"
		fail "podman import on node $node failed"
	}
}

# Containers, images and namespaces of every node (lib.sh runs it).
pod_cleanup() {
	local node
	for node in "${POD_NODES[@]}"; do
		pod "$node" rm -f -a -t 0 >/dev/null 2>&1
		pod "$node" rmi -f -a >/dev/null 2>&1
		# the namespace's mounts go with it once nothing holds it
		umount "$KM_TMP/ns/$node" 2>/dev/null || umount -l "$KM_TMP/ns/$node"
	done
	POD_NODES=()
	if [ -n "$KM_TMP" ] && mountpoint -q "$KM_TMP/ns"; then
		umount -l "$KM_TMP/ns"
	fi
}

# pod_run NODE NAME [PODMAN-RUN OPTIONS...] -- CMD...
pod_run() {
	local node=$1 name=$2 opts=()
	shift 2
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		opts+=("$1")
		shift
	done
	[ "${1:-}" = -- ] && shift
	log "\$ podman run [$node] --name $name ${opts[*]} $POD_IMAGE $*"
	pod "$node" run -d --name "$name" --network none "${POD_LIMITS[@]}" \
		-v "$POD_SHARE:$POD_SHARE" "${opts[@]}" "$POD_IMAGE" "$@" >/dev/null ||
		fail "podman run of $name on node $node failed"
}

# pod_run_engine NODE NAME [PODMAN-RUN OPTIONS...] -- [ENGINE ARGS...]
pod_run_engine() {
	local node=$1 name=$2 opts=()
	shift 2
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		opts+=("$1")
		shift
	done
	[ "${1:-}" = -- ] && shift
	pod_run "$node" "$name" "${opts[@]}" -- "$POD_ENGINE" "$@"
}

pod_state() {
	pod "$1" inspect -f '{{.State.Status}}' "$2" 2>/dev/null || true
}

pod_pid() {
	local pid
	pid=$(pod "$1" inspect -f '{{.State.Pid}}' "$2" 2>/dev/null) || pid=""
	printf '%s\n' "${pid:-0}"
}

pod_wait_exit() {
	local node=$1 name=$2 timeout=${3:-60} state=""
	for _ in $(seq 1 $((timeout * 10))); do
		state=$(pod_state "$node" "$name")
		case $state in
		exited | stopped | "") return 0 ;;
		esac
		sleep 0.1
	done
	fail "container $name on node $node still $state after $timeout s"
}

pod_file() {
	local upper
	upper=$(pod "$1" inspect -f '{{.GraphDriver.Data.UpperDir}}' "$2" 2>/dev/null) || upper=""
	[ -n "$upper" ] || fail "no container $2 on node $1"
	# the node sees its directory at $POD_NODE_DIR
	printf '%s%s%s\n' "$(pod_dir "$1")" "${upper#"$POD_NODE_DIR"}" "$3"
}

pod_engine_wait() {
	local node=$1 name=$2 status min=$4 timeout=${5:-30} n=0
	status=$(pod_file "$1" "$2" "$3")
	for _ in $(seq 1 $((timeout * 20))); do
		if [ -s "$status" ]; then
			n=$(json_get "$status" tokens_generated 2>/dev/null) || n=0
			[ "$n" -ge "$min" ] && return 0
		fi
		case $(pod_state "$node" "$name") in
		running | "") ;;
		*) break ;;
		esac
		sleep 0.05
	done
	pod "$node" logs "$name" 2>&1 | tail -n 20
	fail "engine $name on node $node: $n tokens, not $min, after $timeout s ($(pod_state "$node" "$name"))"
}

# The CRIU log of the last checkpoint or restore of container NAME, kept by
# --keep in its userdata directory.
pod_userdata() {
	local id
	id=$(pod "$1" inspect -f '{{.Id}}' "$2" 2>/dev/null) || return 1
	printf '%s/root/overlay-containers/%s/userdata\n' "$(pod_dir "$1")" "$id"
}

# pod_checkpoint NODE NAME ARCHIVE [OPTIONS...]
pod_checkpoint() {
	local node=$1 name=$2 archive=$3 t0 rc=0 ud
	shift 3
	log "\$ podman container checkpoint [$node] $name --export $archive --keep $*"
	t0=$(date +%s.%N)
	pod "$node" container checkpoint "$name" --export "$archive" --keep "$@" \
		>"$archive.out" 2>&1 || rc=$?
	POD_SECONDS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
	ud=$(pod_userdata "$node" "$name") && [ -f "$ud/dump.log" ] && cp "$ud/dump.log" "$archive.dump.log"
	if [ "$rc" != 0 ]; then
		cat "$archive.out"
		km_criu_log_tail "$archive.dump.log"
		fail "podman container checkpoint of $name on node $node failed (status $rc)"
	fi
	log "checkpointed $name in $POD_SECONDS s: $(file_size "$archive") B"
}

# pod_try_restore NODE ARCHIVE OUT [OPTIONS...]: status of podman's restore
pod_try_restore() {
	local node=$1 archive=$2 out=$3 t0 rc=0 name ud
	shift 3
	log "\$ podman container restore [$node] --import $archive --keep $*"
	t0=$(date +%s.%N)
	pod "$node" container restore --import "$archive" --keep "$@" >"$out" 2>&1 || rc=$?
	POD_SECONDS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
	# the container's name: --name, else the one in the archive
	name=$(python3 - "$@" <<'EOF'
import sys
a = sys.argv[1:]
for i, x in enumerate(a):
    if x in ("-n", "--name") and i + 1 < len(a):
        print(a[i + 1])
    elif x.startswith("--name="):
        print(x.split("=", 1)[1])
EOF
)
	[ -n "$name" ] || name=$(tar -xOf "$archive" config.dump 2>/dev/null |
		python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])' 2>/dev/null) || name=""
	rm -f "$archive.restore.log"
	if [ -n "$name" ] && ud=$(pod_userdata "$node" "$name") && [ -f "$ud/restore.log" ]; then
		cp "$ud/restore.log" "$archive.restore.log"
	fi
	return "$rc"
}

# pod_restore NODE ARCHIVE [OPTIONS...]
pod_restore() {
	local node=$1 archive=$2
	shift 2
	if ! pod_try_restore "$node" "$archive" "$archive.restore.out" "$@"; then
		cat "$archive.restore.out"
		km_criu_log_tail "$archive.restore.log"
		fail "podman container restore of $archive on node $node failed"
	fi
	log "restored $archive on node $node in $POD_SECONDS s"
}

pod_archive_ls() {
	tar -tvf "$1" | awk '{ print $3, $6 }'
}

# pod_archive_has ARCHIVE GLOB: a member whose name matches GLOB
pod_archive_has() {
	local m
	while read -r m; do
		# shellcheck disable=SC2053 # GLOB is a pattern
		[[ $m == $2 ]] && return 0
	done < <(tar -tf "$1")
	return 1
}
