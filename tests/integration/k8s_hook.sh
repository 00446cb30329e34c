#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# `kvmotion k8s-hook` (docs/kubernetes.md) between the two test hosts of
# netns.sh, on an archive in the kubelet's layout (checkpoint/ with the
# split image, config.dump, spec.dump; the name
# checkpoint-POD_NS-CTR-TIME.tar), made here from a real `criu dump` with
# kvmotion's plugin, as CRI-O's CRIU would write it on a node:
#
#   - prepare (A): the weights index goes ahead to B's kvmotion serve;
#   - checkpoint-done (A): the archive goes, with the chunks B still lacks
#     (none: they went ahead); B keeps it and records its manifest;
#   - before-restore (B): the chunks are checked against B's store and the
#     archive becomes an OCI image layout with CRI-O's and containerd's
#     annotations (digests checked; loaded by podman where it runs);
#   - the runtime's restore is played by CRIU on B: the layer unpacked,
#     criu restore with the plugin (which joins the image with B's store);
#     the engine goes on token for token;
#   - after-restore (B): the manifest released, the archive and layout gone;
#   - the contract's failures: exit 75 (retry) for an unreachable target,
#     124 past --timeout, 1 for chunks missing on the target or a file that
#     is no checkpoint archive, 2 for a bad phase, each with its JSON.
#
#   KM_LINK_RATE (10gbit)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=netns.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
km_init
command -v openssl >/dev/null 2>&1 || skip "no openssl command (keys)"
command -v unshare >/dev/null 2>&1 || skip "no unshare (util-linux)"
engine_test_init "the Kubernetes hook runs on the CPU engine"
km_netns_setup

T=$KM_TMP
storeA=$T/storeA
storeB=$T/storeB
wdir=$T/weights
export KVMOTION_SYNC=no KVMOTION_CONFIG=/dev/null KVMOTION_WEIGHTS_DIR=$wdir
openssl rand -hex 32 >"$T/psk"
chmod 600 "$T/psk"
SPID=""

stop_server() { [ -z "$SPID" ] || kill -KILL "$SPID" 2>/dev/null || true; }
KM_CLEANUP_HOOKS+=(stop_server)

# hook OUT WANT_RC NS PHASE [ARGS...]: the hook on host NS ("-": no netns),
# its JSON in OUT (checked), stderr in OUT.err; its status must be WANT_RC
hook() {
	local out=$1 want=$2 ns=$3 rc=0
	shift 3
	log "\$ [$ns] kvmotion k8s-hook $*"
	if [ "$ns" = - ]; then
		"$KVMOTION" k8s-hook "$@" >"$out" 2>"$out.err" || rc=$?
	else
		nsenter --net="/run/netns/$ns" -- "$KVMOTION" k8s-hook "$@" >"$out" 2>"$out.err" || rc=$?
	fi
	if [ "$rc" != "$want" ]; then
		cat "$out" "$out.err"
		fail "k8s-hook $1 exited with $rc, expected $want"
	fi
	[ "$(wc -l <"$out")" = 1 ] || fail "k8s-hook $1 printed $(wc -l <"$out") lines, expected one JSON line"
	python3 -m json.tool "$out" >/dev/null 2>&1 || fail "k8s-hook $1 printed no JSON: $(head -c 300 "$out")"
	assert_eq "phase in the JSON" "$(json_get "$out" phase)" "$1"
	assert_eq "ok in the JSON" "$(json_get "$out" ok)" "$([ "$want" = 0 ] && echo True || echo False)"
	log "-> $(head -c 600 "$out")"
}

# --- the model, the reference run, B's receiver ------------------------------

args=(--seqs 2 --total-seqs 8 --prompt-len 8 --max-new 20 --kv-mib 8 --kv-fill-mib 4 --seed 4)
run "$MKMODEL" "$T/model.safetensors" --size 32M --seed 9 --dim 256 --layers 4
run "$KVMOTION" store init --store "$storeA" --no-sync
run "$KVMOTION" store init --store "$storeB" --no-sync
kvm "$T/seed.json" seed "$T/model.safetensors" --store "$storeA" --name model --no-sync --json
run "$ENGINE" --model "$T/model.safetensors" "${args[@]}" --out "$T/ref.out" \
	--status-file "$T/ref.json" --quiet

log "\$ [$KM_NS_B] kvmotion serve --listen $KM_ADDR_B:7470 --store $storeB --images $T/images"
nsenter --net="/run/netns/$KM_NS_B" -- "$KVMOTION" serve --listen "$KM_ADDR_B:7470" \
	--store "$storeB" --images "$T/images" --weights-dir "$wdir" --psk-file "$T/psk" \
	--no-sync >/dev/null 2>"$T/serve.log" &
SPID=$!
for _ in $(seq 1 200); do
	grep -q "listening on" "$T/serve.log" && break
	kill -0 "$SPID" 2>/dev/null || fail "kvmotion serve exited: $(cat "$T/serve.log")"
	sleep 0.02
done
toB=$KM_ADDR_B:7470
auth=(--psk-file "$T/psk")

# --- the pod's engine on A: its own pid namespace, as in a container ---------

KVMOTION_STORE=$storeA nsenter --net="/run/netns/$KM_NS_A" -- unshare --pid --fork setsid \
	"$ENGINE" --model "$T/model.safetensors" "${args[@]}" --step-delay-ms 40 \
	--out "$T/run.out" --status-file "$T/run.json" </dev/null >/dev/null 2>&1 &
u=$!
pid=""
for _ in $(seq 200); do
	pid=$(pgrep -P "$u" || true)
	[ -n "$pid" ] && grep -qs "^engine$" "/proc/$pid/comm" && break
	sleep 0.01
done
[ -n "$pid" ] || fail "the engine did not start"
KM_PIDS+=("$pid")
for _ in $(seq 400); do
	[ -s "$T/run.json" ] && [ "$(json_get "$T/run.json" tokens_generated)" -ge 6 ] && break
	sleep 0.02
done

# --- source node: prepare, the kubelet's checkpoint, checkpoint-done -------

hook "$T/prepare.json" 0 "$KM_NS_A" prepare --to "$toB" "${auth[@]}" --store "$storeA" --weights model
json_check "$T/prepare.json" bytes_sent bytes_deduplicated
assert_eq "weights bytes sent ahead" "$(json_get "$T/prepare.json" bytes_sent)" \
	"$(json_get "$T/seed.json" bytes_added)"

# What CRI-O's CRIU writes with kvmotion's plugin configured on the node
# (CRIU in the engine's network namespace: it is not dumped, nor locked).
ck=$T/kubelet
mkdir -p "$ck/checkpoint"
log "\$ [$KM_NS_A] criu dump -t $pid -D $ck/checkpoint -L $PLUGIN_DIR (KVMOTION_SPLIT=yes)"
KVMOTION_STORE=$storeA KVMOTION_SPLIT=yes nsenter --net="/run/netns/$KM_NS_A" -- "$CRIU" dump \
	-t "$pid" -D "$ck/checkpoint" -o dump.log -v4 -L "$PLUGIN_DIR" || {
	km_criu_log_tail "$ck/checkpoint/dump.log"
	fail "criu dump of the engine failed"
}
grep -q "kvmotion: split" "$ck/checkpoint/dump.log" || fail "the plugin did not split the image"
rm -f "$ck/checkpoint/dump.log"
printf '{"id":"4f1d","name":"engine","rootfsImageName":"localhost/engine:latest","runtime":"runc","createdTime":"2026-11-26T15:00:00Z"}\n' >"$ck/config.dump"
printf '{"ociVersion":"1.0.2","process":{"args":["/usr/local/bin/engine"]},"annotations":{"io.kubernetes.pod.name":"llm-0","io.kubernetes.pod.namespace":"default"}}\n' >"$ck/spec.dump"
archive="$T/checkpoint-llm-0_default-engine-2026-11-26T15:20:00Z.tar"
run tar --force-local -C "$ck" -cf "$archive" checkpoint config.dump spec.dump
model_bytes=$(file_size "$T/model.safetensors")
assert_lt "archive bytes (weights split out)" "$(file_size "$archive")" $((model_bytes / 2))

hook "$T/done.json" 0 "$KM_NS_A" checkpoint-done --to "$toB" "${auth[@]}" --store "$storeA" --archive "$archive"
json_check "$T/done.json" bytes_sent chunk_bytes_sent bytes_deduplicated chunk_references
assert_eq "split" "$(json_get "$T/done.json" split)" True
assert_lt "chunk bytes sent after the checkpoint" "$(json_get "$T/done.json" chunk_bytes_sent)" $((model_bytes / 10))
assert_ge "chunk bytes B had (sent ahead)" "$(json_get "$T/done.json" bytes_deduplicated)" $((model_bytes * 9 / 10))
tarch=$(json_get "$T/done.json" target_archive)
mid=$(json_get "$T/done.json" manifest_id)
cmp "$archive" "$tarch" || fail "the archive on B differs from A's"
[ -f "$storeB/manifests/$mid.kmman" ] || fail "B's store has no root for manifest $mid"
pass "source: $(json_get "$T/prepare.json" bytes_sent) B of weights ahead, then the archive ($(file_size "$archive") B) and $(json_get "$T/done.json" chunk_bytes_sent) chunk bytes after the checkpoint"

# --- target node: before-restore, the runtime's restore, after-restore -------

hook "$T/before.json" 0 "$KM_NS_B" before-restore --archive "$tarch" --store "$storeB" --container engine
oci=$(json_get "$T/before.json" oci_layout)
python3 - "$oci" "$tarch" engine "$mid" <<'EOF' || fail "the OCI layout is not the archive's image"
import hashlib, json, os, sys
oci, archive, name, mid = sys.argv[1:]
def blob(d):
    assert d.startswith("sha256:"), d
    p = os.path.join(oci, "blobs", "sha256", d[7:])
    b = open(p, "rb").read()
    assert hashlib.sha256(b).hexdigest() == d[7:], "digest of " + p
    return b
assert json.load(open(os.path.join(oci, "oci-layout")))["imageLayoutVersion"] == "1.0.0"
idx = json.load(open(os.path.join(oci, "index.json")))
m = idx["manifests"][0]
man = blob(m["digest"])
assert len(man) == m["size"]
man = json.loads(man)
assert man["schemaVersion"] == 2
a = man["annotations"]
assert a["io.kubernetes.cri-o.annotations.checkpoint.name"] == name, a
assert a["org.criu.checkpoint.container.name"] == name, a
assert a["io.kvmotion.checkpoint.manifest"] == mid, a
cfg = json.loads(blob(man["config"]["digest"]))
layer = man["layers"][0]
assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
assert blob(layer["digest"]) == open(archive, "rb").read(), "the layer is not the archive"
assert cfg["rootfs"]["diff_ids"] == [layer["digest"]], cfg
print("ok")
EOF
podman_note="podman not installed: layout checked by digest only"
if command -v podman >/dev/null 2>&1; then
	pr=$T/podman
	mkdir -p "$pr"
	# podman names the image after the path: it must be lower case
	lower=/tmp/kvmotion-oci-$$
	ln -sfn "$oci" "$lower"
	rm_lower() { rm -f "$lower"; }
	KM_CLEANUP_HOOKS+=(rm_lower)
	if podman --root "$pr/root" --runroot "$pr/run" --storage-driver vfs --events-backend none \
		pull -q "oci:$lower:latest" >"$T/pull.out" 2>&1; then
		podman --root "$pr/root" --runroot "$pr/run" --storage-driver vfs --events-backend none \
			image inspect --format '{{json .Annotations}}' "$(tail -n 1 "$T/pull.out")" >"$T/annot.json" 2>&1 ||
			fail "podman image inspect of the pulled layout failed: $(cat "$T/annot.json")"
		grep -q '"io.kubernetes.cri-o.annotations.checkpoint.name":"engine"' "$T/annot.json" ||
			fail "podman does not see CRI-O's annotation: $(cat "$T/annot.json")"
		podman_note="podman pulled it (oci:) and reads CRI-O's annotation"
		podman --root "$pr/root" --runroot "$pr/run" --storage-driver vfs rmi -a -f >/dev/null 2>&1 || true
	else
		fail "podman cannot pull the OCI layout: $(tail -n 3 "$T/pull.out")"
	fi
fi

# The runtime's part: the layer unpacked, CRIU restores checkpoint/ with the
# plugin, which joins it with B's store (the weights came ahead).
wait_pid_gone "$pid" 10
mkdir -p "$T/rootfs"
run tar --force-local -C "$T/rootfs" -xf "$tarch"
KVMOTION_STORE=$storeB nsenter --net="/run/netns/$KM_NS_B" -- "$CRIU" restore -D "$T/rootfs/checkpoint" \
	-d --pidfile "$T/restored.pid" -L "$PLUGIN_DIR" -o restore.log -v4 ||
	{
		km_criu_log_tail "$T/rootfs/checkpoint/restore.log"
		fail "criu restore of the unpacked archive on B failed"
	}
rpid=$(cat "$T/restored.pid")
KM_PIDS+=("$rpid")
grep -q "kvmotion: joined" "$T/rootfs/checkpoint/restore.log" || fail "the plugin did not join the image on B"
pass "target: before-restore made the OCI layout ($podman_note); CRIU on B restored it as pid $rpid"

hook "$T/after.json" 0 "$KM_NS_B" after-restore --archive "$tarch" --store "$storeB" --pid "$rpid"
assert_eq "released manifest" "$(json_get "$T/after.json" released_manifest)" "$mid"
[ ! -e "$storeB/manifests/$mid.kmman" ] || fail "B's store still holds the root of $mid"
[ ! -e "$tarch" ] || fail "the archive is still on B"
[ ! -e "$oci" ] || fail "the OCI layout is still on B"
assert_eq "dir removed" "$(json_get "$T/after.json" dir_removed)" True

wait_pid_gone "$rpid" 60
cmp "$T/ref.out" "$T/run.out" || fail "the token stream differs from the run never stopped"
assert_eq "prefill steps (no recomputation)" "$(json_get "$T/run.json" prefill_steps)" \
	"$(json_get "$T/ref.json" prefill_steps)"
pass "after-restore released $mid and removed the archive; the engine finished on B, tokens identical"

# --- the contract's failures --------------------------------------------------

hook "$T/f-unreach.json" 75 "$KM_NS_A" prepare --to "$KM_ADDR_B:7479" "${auth[@]}" --store "$storeA" --weights model
assert_eq "retry" "$(json_get "$T/f-unreach.json" retry)" True

# a listener that never answers the TLS handshake
python3 -c 'import socket, sys, time; s = socket.socket(); s.bind(("127.0.0.1", 7478)); s.listen(); open(sys.argv[1], "w").close(); time.sleep(30)' "$T/listening" &
hang=$!
for _ in $(seq 500); do
	[ -e "$T/listening" ] && break
	sleep 0.02
done
[ -e "$T/listening" ] || fail "the silent listener did not start"
t0=$SECONDS
hook "$T/f-timeout.json" 124 - prepare --to 127.0.0.1:7478 "${auth[@]}" --store "$storeA" --weights model --timeout 2
assert_lt "seconds until the timeout" $((SECONDS - t0)) 10
assert_eq "errno" "$(json_get "$T/f-timeout.json" errno)" ETIMEDOUT
kill -KILL "$hang" 2>/dev/null || true
wait "$hang" 2>/dev/null || true

run "$KVMOTION" store init --store "$T/storeC" --no-sync
cp "$archive" "$T/again.tar"
hook "$T/f-missing.json" 1 - before-restore --archive "$T/again.tar" --store "$T/storeC" --container engine
assert_eq "errno" "$(json_get "$T/f-missing.json" errno)" ENOENT
json_get "$T/f-missing.json" error | grep -q "lacks" || fail "the error does not say what is missing"
[ ! -e "$T/oci" ] || fail "before-restore wrote a layout for an archive it refused"

head -c 4096 /dev/urandom >"$T/junk.tar"
hook "$T/f-junk.json" 1 "$KM_NS_A" checkpoint-done --to "$toB" "${auth[@]}" --store "$storeA" --archive "$T/junk.tar"
hook "$T/f-phase.json" 2 - restore-everything
pass "failures: unreachable target exit 75, --timeout 2 exit 124 in $((SECONDS - t0)) s, missing chunks exit 1 ($(json_get "$T/f-missing.json" error | cut -c1-80)...), a non-archive exit 1, a bad phase exit 2"

# --- deploy/kubernetes: the manifests parse, and the DaemonSet's command runs --

if python3 -c 'import yaml' 2>/dev/null; then
	python3 - "$KM_SOURCE_DIR/deploy/kubernetes" "$T/ds-args" <<'EOF2' || fail "deploy/kubernetes does not hold the expected objects"
import glob, os, sys, yaml
objs = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.yaml"))):
    for d in yaml.safe_load_all(open(f)):
        if d:
            objs[(d["kind"], d["metadata"]["name"])] = d
for want in [("DaemonSet", "kvmotion"), ("ServiceAccount", "kvmotion-node"), ("Role", "kvmotion-node"),
             ("RoleBinding", "kvmotion-node"), ("ClusterRole", "kvmotion-controller-checkpoint"),
             ("ConfigMap", "kvmotion-config"), ("Secret", "kvmotion-psk")]:
    assert want in objs, want
ds = objs[("DaemonSet", "kvmotion")]["spec"]["template"]["spec"]
assert ds["serviceAccountName"] == "kvmotion-node"
c = ds["containers"][0]
cmd = c["command"]
assert cmd[:2] == ["kvmotion", "serve"], cmd
mounts = {m["mountPath"] for m in c["volumeMounts"]}
for a in cmd[2:]:
    if a.startswith("/") and not a.startswith("/proc"):
        assert any(a.startswith(m) for m in mounts), "not mounted: " + a
# the DaemonSet's arguments, one a line, for the CLI to run below
open(sys.argv[2], "w").write("\n".join(cmd[2:]) + "\n")
EOF2
	mapfile -t ds_args <"$T/ds-args"
	ds_args=("${ds_args[@]//\$(NODE_IP):7447/127.0.0.1:0}")
	ds_args=("${ds_args[@]//\/var\/lib\/kvmotion/$T/ds}")
	ds_args=("${ds_args[@]//\/etc\/kvmotion-psk\/psk/$T/psk}")
	"$KVMOTION" store init --store "$T/ds/store" --no-sync >/dev/null
	"$KVMOTION" serve "${ds_args[@]}" 2>"$T/ds-serve.log" &
	ds_pid=$!
	for _ in $(seq 200); do
		grep -q "listening on" "$T/ds-serve.log" && break
		kill -0 "$ds_pid" 2>/dev/null || fail "the DaemonSet's kvmotion serve command fails: $(cat "$T/ds-serve.log")"
		sleep 0.02
	done
	grep -q "listening on" "$T/ds-serve.log" || fail "the DaemonSet's kvmotion serve does not listen"
	kill -TERM "$ds_pid"
	wait "$ds_pid" || fail "kvmotion serve did not stop cleanly on SIGTERM"
	pass "deploy/kubernetes: the objects parse; the DaemonSet's kvmotion serve command line runs"
else
	log "no python3-yaml: the manifests are not checked"
fi
