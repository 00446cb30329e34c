/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_GPU_H
#define KM_GPU_H

/*
 * GPU checkpoint of a process through the CUDA driver's checkpoint API
 * (cuCheckpointProcess*), loaded with dlopen so kvmotion builds and runs on
 * hosts without CUDA. A host without libcuda has no CUDA processes: every
 * pid is KM_GPU_NONE and every step a no-op.
 *
 * Per-process state machine, driven by the CRIU adapter:
 *
 *   km_gpu_pause       PAUSE_DEVICES       RUNNING -> LOCKED (lock, timeout)
 *   km_gpu_checkpoint  CHECKPOINT_DEVICES  LOCKED -> CHECKPOINTED
 *   km_gpu_dump_done   exit(DUMP)          on failure or --leave-running:
 *                                          CHECKPOINTED -> LOCKED (restore)
 *                                          -> RUNNING (unlock, if it was
 *                                          running before the dump)
 *   km_gpu_resume      RESUME_DEVICES_LATE CHECKPOINTED -> LOCKED (restore,
 *                                          with GPU UUID pairs) -> RUNNING
 *
 * The library is handed a driver table (struct km_gpu_driver) so tests can
 * run the same state machine against a test double of libcuda.
 *
 * Errors: -ENODEV the driver or the process is not usable for this step,
 * -ETIMEDOUT lock timed out, -EPROTO the driver returned an error (err names
 * the CUDA error, e.g. "CUDA_ERROR_INVALID_VALUE"), -EINVAL bad GPU map.
 */

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "util.h"

#define KM_GPU_UUID_SIZE 16

enum km_gpu_state {
	KM_GPU_NONE = -1, /* not a CUDA process (or no driver) */
	KM_GPU_RUNNING = 0,
	KM_GPU_LOCKED = 1,
	KM_GPU_CHECKPOINTED = 2,
	KM_GPU_FAILED = 3,
};

const char *km_gpu_state_name(enum km_gpu_state s);

struct km_gpu_pair {
	unsigned char from[KM_GPU_UUID_SIZE];
	unsigned char to[KM_GPU_UUID_SIZE];
};

/*
 * Parses "GPU-<uuid>=GPU-<uuid>[,...]" (the "GPU-" prefix optional, dashes
 * optional) into a malloc'd array. -EINVAL with err describing the bad item.
 */
int km_gpu_parse_map(const char *s, struct km_gpu_pair **ret, size_t *ret_n, struct km_error *err);

struct km_gpu;

/*
 * Loads the driver: 'library' is a path or soname (NULL: "libcuda.so.1";
 * the environment variable KVMOTION_LIBCUDA, read by the CRIU adapter, can
 * point it at a test double). Returns 0 with a handle; if the library is
 * absent, 0 with a handle on which every process is KM_GPU_NONE
 * (km_gpu_available() false). A library that lacks the checkpoint API is
 * -ENOTSUP with err naming the missing symbol.
 */
int km_gpu_open(const char *library, struct km_gpu **ret, struct km_error *err);
void km_gpu_close(struct km_gpu *g);
bool km_gpu_available(const struct km_gpu *g);

/* The driver's view of pid. */
int km_gpu_get_state(struct km_gpu *g, pid_t pid, enum km_gpu_state *ret, struct km_error *err);

/* The thread that must run while the driver checkpoints/restores pid. */
int km_gpu_restore_thread(struct km_gpu *g, pid_t pid, pid_t *ret_tid, struct km_error *err);

/* --- the per-process state machine --- */

/*
 * PAUSE_DEVICES: records pid's initial state; locks it if RUNNING.
 * *ret_is_cuda tells the caller whether pid is a CUDA process at all.
 */
int km_gpu_pause(struct km_gpu *g, pid_t pid, unsigned timeout_ms, bool *ret_is_cuda,
		 struct km_error *err);

/* CHECKPOINT_DEVICES: checkpoints a locked pid (GPU memory to host memory). */
int km_gpu_checkpoint(struct km_gpu *g, pid_t pid, struct km_error *err);

/*
 * exit(DUMP): when the dump failed or the task keeps running, brings every
 * process this handle touched back to its initial state (restore if
 * checkpointed, unlock if it was running). Returns the first error; tries
 * every process regardless.
 */
int km_gpu_dump_done(struct km_gpu *g, bool dump_ok, bool leave_running, struct km_error *err);

/*
 * RESUME_DEVICES_LATE: restores a checkpointed pid (with the GPU pairs, if
 * any) and unlocks it. A pid that is not CUDA, or not checkpointed, is left
 * alone (returns 0).
 */
int km_gpu_resume(struct km_gpu *g, pid_t pid, const struct km_gpu_pair *pairs, size_t n_pairs,
		  struct km_error *err);

/* Hook for the adapter to run around checkpoint/restore calls that need
 * the driver's restore thread running inside a ptrace-frozen tree. */
typedef int (*km_gpu_thread_fn)(void *userdata, pid_t pid, pid_t tid, bool start);
void km_gpu_set_thread_hook(struct km_gpu *g, km_gpu_thread_fn fn, void *userdata);

#endif
