/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_ENGINE_CTL_H
#define KM_ENGINE_CTL_H

/*
 * The plugin's side of the engine control protocol (proto/engine.proto,
 * docs/formats.md): talks to the control thread that libkvmotion-engine
 * runs in a cooperative engine (include/kvmotion/engine.h), on the
 * abstract unix socket "\0kvmotion-engine/<nspid>" in the engine's network
 * namespace (entered in a short-lived child when it is not ours).
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "hash.h"
#include "util.h"

#define KM_ENGINE_SOCKET_PREFIX "kvmotion-engine/"

/* The protocol's version (EngineRequest/EngineReply major, minor). */
#define KM_ENGINE_PROTO_MAJOR 1
#define KM_ENGINE_PROTO_MINOR 0
/* Largest packet either side sends or accepts. */
#define KM_ENGINE_MSG_MAX (64u * 1024)

/*
 * The control socket's address for an engine whose own pid (in its pid
 * namespace) is nspid: sun_path "\0kvmotion-engine/<nspid>", no NUL at the
 * end. Shared by both sides.
 */
struct sockaddr_un;
int km_engine_socket_addr(pid_t nspid, struct sockaddr_un *ret, unsigned *ret_len);

struct km_engine_weights {
	char path[4096];
	struct km_hash id;
	uint64_t size;
};

struct km_engine_quiesced {
	struct km_engine_weights *weights; /* malloc'd */
	size_t n_weights;
	uint32_t free_blocks;
	uint64_t released_bytes;
};
void km_engine_quiesced_clear(struct km_engine_quiesced *q);

/*
 * 1 if pid (a host pid) runs a cooperative engine (its control socket
 * answers), 0 if not (no such socket: a plain process), <0 on error.
 */
int km_engine_probe(pid_t pid);

/*
 * Asks the engine in pid to quiesce and waits at most timeout_ms for the
 * answer. On timeout or error the request is cancelled (the engine goes on
 * serving) and -ETIMEDOUT or the error is returned, err saying what:
 * -ESRCH no such process, -ENOENT no engine listening, the engine's errno
 * when its callback refused, -EPROTO / -EPROTONOSUPPORT for a malformed or
 * foreign answer. On 0 the engine is quiesced and has closed the
 * connection; *ret (clear it with km_engine_quiesced_clear) lists its
 * weights files.
 */
int km_engine_quiesce(pid_t pid, uint32_t timeout_ms, struct km_engine_quiesced *ret,
		      struct km_error *err);

/*
 * Asks a quiesced engine to resume (restored: after a restore). An engine
 * that is not quiesced answers 0 at once (idempotent). A resume callback
 * that failed gives its error, err naming it.
 */
int km_engine_resume(pid_t pid, bool restored, uint32_t timeout_ms, struct km_error *err);

/* STATUS: the engine's state and counters, no effect on it. */
/*
 * Queues RESUME{restored} in the engine's socket without waiting for the
 * answer: for an engine whose task CRIU holds stopped (exit(DUMP), and
 * RESUME_DEVICES_LATE at restore). The engine carries the request out as
 * soon as it runs again, whether or not it can still answer. Confirm with
 * km_engine_status once the task runs.
 */
int km_engine_resume_queued(pid_t pid, bool restored, struct km_error *err);

struct km_engine_status {
	bool quiesced;
	int32_t engine_pid; /* in the engine's pid namespace */
	uint64_t quiesces, resumes, cancelled, refused, self_resumes;
	uint64_t last_released_bytes;
	uint32_t last_free_blocks;
	bool restored;
};
int km_engine_status(pid_t pid, uint32_t timeout_ms, struct km_engine_status *ret,
		     struct km_error *err);

/*
 * DIR/kvmotion.engines (magic "KMENGIN\n", one record, proto/engine.proto):
 * the cooperative engines of a dump and the weights files each maps,
 * written by the plugin at dump, checked at restore before any process
 * exists (every weights file present and hashing to its name).
 */
#define KM_ENGINES_NAME "kvmotion.engines"
#define KM_MAGIC_ENGINES "KMENGIN\n"

struct km_engine_record {
	int32_t pid; /* as CRIU's images name it */
	struct km_engine_weights *weights;
	size_t n_weights;
};
int km_engine_records_write(int dirfd, const struct km_engine_record *r, size_t n, bool sync);
/*
 * -ENOENT: no such file (no cooperative engine in the dump). Like format.h's
 * readers: -ENOTRECOVERABLE foreign file, -EBADMSG truncated or malformed,
 * -EPROTONOSUPPORT unknown major version; err says which.
 */
int km_engine_records_read(int dirfd, struct km_engine_record **ret, size_t *ret_n,
			   struct km_error *err);
void km_engine_records_free(struct km_engine_record *r, size_t n);

#endif
