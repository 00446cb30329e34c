/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KVMOTION_ENGINE_H
#define KVMOTION_ENGINE_H

/*
 * kvmotion's engine API (libkvmotion-engine.so): what an inference engine
 * calls so that its weights never enter a CRIU image (cooperative mode).
 *
 *  1. Weights: kme_weights_open() maps the weights read-only from a
 *     content-addressed weights file of the node's store (MAP_SHARED,
 *     PROT_READ). CRIU records such a mapping by path, with no pages; the
 *     target of a migration holds the same file at the same path.
 *  2. KV cache: kme_kv_pool_register() tells kvmotion where the engine's
 *     KV block pool lies; kme_kv_block_set_free() keeps it told which
 *     blocks are free. At a quiesce, free host blocks are released
 *     (MADV_DONTNEED: they read back as zeros), so they are never dumped.
 *  3. Quiesce/resume: kme_engine_start() starts a control thread that
 *     answers kvmotion's CRIU plugin on the abstract unix socket
 *     "\0kvmotion-engine/<pid>" (pid as the engine's own pid namespace
 *     sees it). Before the freeze the plugin asks for a quiesce: the
 *     library calls the engine's quiesce callback (finish the current
 *     step, stop scheduling, release device copies of the weights and of
 *     free KV blocks, keeping their virtual addresses), releases free host
 *     KV blocks and answers. After a restore, or after a dump that failed
 *     or left the engine running, the plugin asks for a resume: the
 *     library calls the resume callback (re-upload the weights from the
 *     mapping to the same addresses, start scheduling again).
 *     A quiesce the plugin gave up on (it closed the connection before the
 *     answer) is undone at once: the engine keeps serving. A quiesced
 *     engine that hears nothing for resume_timeout_ms resumes by itself.
 *
 * Every function returns 0 or a negative errno. Thread-safe unless noted.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KME_API_VERSION 1

/* ---- weights ---- */

struct kme_weights;

/*
 * Opens weights. store: the store's path (NULL: $KVMOTION_STORE, then the
 * config file's, then /var/lib/kvmotion/store). ref: "index:NAME" or the
 * path of a model file (seeded into the store if needed). The weights file
 * is materialized if absent and verified.
 */
int kme_weights_open(const char *store, const char *ref, struct kme_weights **ret);
/*
 * The same, and on failure a message saying what failed (which store,
 * index or file) in msg (msg_size bytes, NUL-terminated; may be NULL).
 */
int kme_weights_open_ex(const char *store, const char *ref, struct kme_weights **ret,
			char *msg, size_t msg_size);
/* Unmaps the weights: no pointer into kme_weights_data() may be used after. */
void kme_weights_close(struct kme_weights *w);

const void *kme_weights_data(const struct kme_weights *w);
uint64_t kme_weights_size(const struct kme_weights *w);
const char *kme_weights_path(const struct kme_weights *w);
/* 64 hex digits of the weights file's SHA-256, NUL-terminated. */
const char *kme_weights_id(const struct kme_weights *w);
size_t kme_weights_n_files(const struct kme_weights *w);
/* The i-th model file in the weights file: base name, offset, size. */
int kme_weights_file(const struct kme_weights *w, size_t i, const char **name,
		     uint64_t *offset, uint64_t *size);

/* ---- engine control ---- */

struct kme_engine;

struct kme_callbacks {
	/*
	 * Called on the control thread. Finish the step in progress, stop
	 * scheduling, release device memory that the weights file or nothing
	 * at all can rebuild. deadline_ms: what is left of the plugin's
	 * timeout. Return 0, or <0 to refuse (the dump then fails and the
	 * engine must go on serving: resume is NOT called after a refusal).
	 */
	int (*quiesce)(void *userdata, uint32_t deadline_ms);
	/*
	 * Called on the control thread after a successful quiesce. restored:
	 * true in the restored process, false in the source after a failed
	 * dump, --leave-running or a cancelled quiesce. Return 0 or <0 (the
	 * plugin then reports the restore as failed).
	 */
	int (*resume)(void *userdata, bool restored);
	void *userdata;
};

struct kme_engine_opts {
	uint32_t resume_timeout_ms; /* 0: 300000 */
	unsigned flags;		    /* none yet: 0 */
};

/*
 * Starts the control thread (all signals blocked in it). opts may be NULL.
 * -EADDRINUSE: an engine already runs in this process (the socket is named
 * by the pid); -EINVAL: a callback missing or unknown flags.
 */
int kme_engine_start(const struct kme_callbacks *cb, const struct kme_engine_opts *opts,
		     struct kme_engine **ret);
/*
 * Stops the control thread and frees e (pools included). A quiesced engine
 * is not resumed. Not from inside a callback.
 */
void kme_engine_stop(struct kme_engine *e);

/*
 * The weights this engine uses, reported to the plugin with each quiesce.
 * The entry is copied (w may be closed after); the same file twice is
 * listed once. -E2BIG beyond what one answer can carry (32 KiB of paths).
 */
int kme_engine_add_weights(struct kme_engine *e, const struct kme_weights *w);

enum kme_kv_flags {
	KME_KV_HOST = 0,	  /* pool in host memory: freed blocks madvised */
	KME_KV_DEVICE = 1 << 0, /* pool in device memory: the engine releases it */
};

/*
 * Registers a KV block pool: n_blocks blocks of block_size bytes from
 * base. For KME_KV_HOST, base and block_size must be multiples of the page
 * size. Every block starts as in use. *ret_pool gets the pool's number
 * (0, 1, ... in registration order). Register private anonymous memory or
 * shared memory (shmem, memfd): both read back as zeros once released.
 * -EINVAL bad arguments, -ENOSPC more than 64 pools.
 */
int kme_kv_pool_register(struct kme_engine *e, void *base, size_t block_size, uint32_t n_blocks,
			 unsigned flags, uint32_t *ret_pool);
/*
 * Marks a block free or in use: lock-free, cheap enough for every alloc.
 * The engine must not change the bitmap while its quiesce callback has
 * returned and the quiesce is not over (its threads are stopped anyway).
 * -EINVAL unknown pool, -ERANGE block out of range.
 */
int kme_kv_block_set_free(struct kme_engine *e, uint32_t pool, uint32_t block, bool free);

struct kme_stats {
	uint64_t quiesces;
	uint64_t resumes;
	uint64_t cancelled;	     /* quiesces the plugin gave up on (resumed, not counted in resumes) */
	uint64_t last_released_bytes; /* free host KV bytes released at the last quiesce */
	uint32_t last_free_blocks;
	bool quiesced;
	bool restored; /* the last resume was after a restore */
	uint64_t refused;      /* quiesces the quiesce callback refused */
	uint64_t self_resumes; /* resumes after resume_timeout_ms without a RESUME */
};
int kme_engine_stats(struct kme_engine *e, struct kme_stats *ret);

/* Name of a negative errno from this API, for messages. */
const char *kme_strerror(int error);

#ifdef __cplusplus
}
#endif

#endif
