# SPDX-License-Identifier: LGPL-2.1-or-later
"""A stand-in Python engine on the kvmotion_engine binding, for engine_api_py.sh.

It maps weights (with --store), registers a KV pool of BLOCKS blocks filled
with a pattern, frees FREE of them, starts the engine and obeys commands read
line by line from the FIFO CTL/cmd:
    accept | refuse | slow MS | check | stop
Each callback and check appends one JSON line to CTL/events; CTL/ready holds
the pid once serving. The memory checks run in the resume callback, before
anything touches the pool again: free blocks must read as zeros, used ones
must keep their pattern.
"""

import argparse
import errno
import hashlib
import json
import mmap
import os
import sys
import time

import kvmotion_engine as kme

BLOCKS = 16
FREE = (1, 2, 3, 7, 15)


def pattern(b, size):
    return bytes(((b * 31 + i * 7) % 255 + 1) for i in range(256)) * (size // 256)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctl", required=True)
    ap.add_argument("--store")
    ap.add_argument("--ref")
    ap.add_argument("--model", help="a model file that --ref holds, to compare bytes")
    ap.add_argument("--resume-timeout-ms", type=int, default=0)
    a = ap.parse_args()

    events = open(os.path.join(a.ctl, "events"), "a", buffering=1)

    def event(**kw):
        events.write(json.dumps(kw) + "\n")

    bs = 2 * mmap.PAGESIZE
    kv = mmap.mmap(-1, bs * BLOCKS)
    for b in range(BLOCKS):
        kv[b * bs:(b + 1) * bs] = pattern(b, bs)
    mode = {"refuse": False, "slow_ms": 0}

    def check(where):
        free_zero = all(kv[b * bs:(b + 1) * bs].count(0) == bs for b in FREE)
        used_intact = all(kv[b * bs:(b + 1) * bs] == pattern(b, bs)
                          for b in range(BLOCKS) if b not in FREE)
        return {"where": where, "free_zero": free_zero, "used_intact": used_intact}

    def quiesce(deadline_ms):
        event(event="quiesce", deadline_ms=deadline_ms, refuse=mode["refuse"])
        if mode["slow_ms"]:
            time.sleep(mode["slow_ms"] / 1000)
        if mode["refuse"]:
            raise OSError(errno.EBUSY, "busy with a long prefill")
        return 0

    def resume(restored):
        event(event="resume", restored=restored, **check("resume"))

    weights = None
    if a.store:
        weights = kme.Weights(a.ref, store=a.store)
        info = {"event": "weights", "path": weights.path, "id": weights.id,
                "size": weights.size, "files": weights.files}
        if a.model:
            name = os.path.basename(a.model)
            with open(a.model, "rb") as f:
                info["model_match"] = weights.file_view(name) == f.read()
            info["id_match"] = hashlib.sha256(weights.buffer).hexdigest() == weights.id
            info["readonly"] = weights.buffer.readonly
        event(**info)

    engine = kme.Engine(quiesce=quiesce, resume=resume, resume_timeout_ms=a.resume_timeout_ms)
    if weights:
        engine.add_weights(weights)
    pool = engine.kv_pool_register(kv, bs, BLOCKS)
    for b in FREE:
        engine.block_set_free(pool, b, True)

    fifo = os.path.join(a.ctl, "cmd")
    fd = os.open(fifo, os.O_RDWR)  # never EOF while we hold a writer
    with open(os.path.join(a.ctl, "ready.tmp"), "w") as f:
        f.write("%d\n" % os.getpid())
    os.rename(os.path.join(a.ctl, "ready.tmp"), os.path.join(a.ctl, "ready"))

    buf = b""
    while True:
        chunk = os.read(fd, 4096)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "refuse":
                mode["refuse"] = True
            elif cmd[0] == "accept":
                mode["refuse"] = False
                mode["slow_ms"] = 0
            elif cmd[0] == "slow":
                mode["slow_ms"] = int(cmd[1])
            elif cmd[0] == "check":
                event(event="check", **check("check"), stats=engine.stats())
            elif cmd[0] == "stop":
                st = engine.stats()
                engine.stop()
                if weights:
                    weights.close()
                event(event="stopped", stats=st)
                return 0
            else:
                print("unknown command %r" % cmd, file=sys.stderr)
                return 2


if __name__ == "__main__":
    sys.exit(main())
