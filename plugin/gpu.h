/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_GPU_H
#define KM_GPU_H

/*
 * GPU checkpoint of a process through the CUDA driver's checkpoint API
 * (cuCheckpointProcess*), loaded with dlopen so kvmotion builds and runs on
 * hosts without CUDA. A host without libcuda (or whose driver reports no
 * device) has no CUDA processes: every pid is KM_GPU_NONE and every step a
 * no-op.
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
 * A process is "not CUDA" when the driver answers cuCheckpointProcess-
 * GetRestoreThreadId with CUDA_ERROR_INVALID_VALUE or CUDA_ERROR_NOT_-
 * INITIALIZED (what the driver says of a live process without CUDA state,
 * and of one that loaded CUDA but has not initialised it); any other error
 * is an error. Tests load a test double of libcuda by path
 * (tests/cuda-double) instead of the driver.
 *
 * Errors: -ENODEV the driver or the process is not usable for this step
 * (cuInit failed; the process is in the FAILED state; not a CUDA process),
 * -ETIMEDOUT lock timed out (the process keeps running), -EPROTO the driver
 * returned an error (err names the CUDA error, e.g.
 * "cuCheckpointProcessLock(pid 1234): CUDA_ERROR_TIMEOUT"), -EINVAL bad GPU
 * map or an illegal step (checkpoint without a pause, a process not
 * locked), -EAGAIN a process started using CUDA between its pause and its
 * checkpoint (retry the dump), -ENOTSUP the library lacks the checkpoint
 * API (driver older than r570 / CUDA 12.8), -ENOMEM.
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

/* "none", "running", "locked", "checkpointed", "failed"; "unknown" else. */
const char *km_gpu_state_name(enum km_gpu_state s);

struct km_gpu_pair {
	unsigned char from[KM_GPU_UUID_SIZE];
	unsigned char to[KM_GPU_UUID_SIZE];
};

/*
 * Parses "GPU-<uuid>=GPU-<uuid>[,...]" (the "GPU-" prefix optional, each
 * dash of the 8-4-4-4-12 form optional, blanks around UUIDs ignored) into a
 * malloc'd array the caller frees. -EINVAL with err describing the bad
 * item: empty map or item, missing '=', bad UUID, a GPU mapped twice.
 */
int km_gpu_parse_map(const char *s, struct km_gpu_pair **ret, size_t *ret_n, struct km_error *err);

struct km_gpu;

/*
 * Loads the driver and initialises it (cuInit): 'library' is a path or
 * soname (NULL: "libcuda.so.1"; the environment variable KVMOTION_LIBCUDA,
 * read by the CRIU adapter, can point it at a test double). Returns 0 with
 * a handle; if a soname cannot be loaded, or the driver reports no device
 * (CUDA_ERROR_NO_DEVICE, CUDA_ERROR_STUB_LIBRARY), 0 with a handle on which
 * every process is KM_GPU_NONE (km_gpu_available() false, the reason in
 * km_gpu_unavailable_reason). A path (containing '/') that cannot be loaded
 * is -ENOENT (absent) or -ELIBBAD. A library that lacks the checkpoint API
 * is -ENOTSUP with err naming the missing symbol; another cuInit failure
 * is -ENODEV with err naming the CUDA error.
 *
 * cuInit starts driver threads and opens /dev/nvidia* in the caller: open
 * the handle in criu only where that is harmless (dump: any time; restore:
 * not before the restored tree is forked, i.e. at RESUME_DEVICES_LATE).
 */
int km_gpu_open(const char *library, struct km_gpu **ret, struct km_error *err);
/* Frees the handle; does not undo anything (see km_gpu_dump_done). NULL ok. */
void km_gpu_close(struct km_gpu *g);
bool km_gpu_available(const struct km_gpu *g);
/* Why the handle is not available (e.g. the dlopen error); NULL if it is. */
const char *km_gpu_unavailable_reason(const struct km_gpu *g);

/* The driver's view of pid: KM_GPU_NONE if it is not a CUDA process. */
int km_gpu_get_state(struct km_gpu *g, pid_t pid, enum km_gpu_state *ret, struct km_error *err);

/* The thread that must run while the driver checkpoints/restores pid.
 * -ENODEV if pid is not a CUDA process (or no driver). */
int km_gpu_restore_thread(struct km_gpu *g, pid_t pid, pid_t *ret_tid, struct km_error *err);

/* --- the per-process state machine --- */

/*
 * PAUSE_DEVICES: records pid's initial state; locks it if RUNNING, with
 * timeout_ms (0: wait forever). *ret_is_cuda tells the caller whether pid
 * is a CUDA process at all. A second pause of a pid is a no-op. A lock that
 * times out is -ETIMEDOUT and leaves the process RUNNING (and recorded, so
 * km_gpu_dump_done leaves it alone). A process in the FAILED state is
 * -ENODEV. *ret_is_cuda is written on success only.
 */
int km_gpu_pause(struct km_gpu *g, pid_t pid, unsigned timeout_ms, bool *ret_is_cuda,
		 struct km_error *err);

/*
 * CHECKPOINT_DEVICES: checkpoints a locked pid (GPU memory to host memory).
 * 0 without doing anything for a pid that is not CUDA or was already
 * CHECKPOINTED before the pause. -EINVAL for a pid never paused or not
 * locked; -EAGAIN for a pid that was not CUDA at its pause and is now.
 */
int km_gpu_checkpoint(struct km_gpu *g, pid_t pid, struct km_error *err);

/*
 * exit(DUMP): when the dump failed or the task keeps running, brings every
 * process this handle touched back to its initial state (restore if we
 * checkpointed it, unlock if we locked it, i.e. it was RUNNING at pause).
 * Returns the first error; tries every process regardless. Either way the
 * handle forgets the dump's processes.
 */
int km_gpu_dump_done(struct km_gpu *g, bool dump_ok, bool leave_running, struct km_error *err);

/*
 * RESUME_DEVICES_LATE: restores a checkpointed pid (with the GPU pairs, if
 * any: every GPU it used must then be listed) and unlocks it. Needs no
 * prior pause. A pid that is not CUDA, or RUNNING or LOCKED, is left alone
 * (returns 0); a FAILED one is -ENODEV. If the restore fails the process
 * stays CHECKPOINTED and is not unlocked.
 */
int km_gpu_resume(struct km_gpu *g, pid_t pid, const struct km_gpu_pair *pairs, size_t n_pairs,
		  struct km_error *err);

/*
 * Hook for the adapter to let the driver's restore thread run inside a
 * ptrace-frozen tree. Called with start=true before, and start=false
 * after, every cuCheckpointProcessCheckpoint and every restore+unlock (or
 * lone unlock) sequence, never around lock or the queries. If start fails
 * (negative errno) the driver is not called for that process, there is no
 * start=false call, and the error is returned; a start=false error is
 * returned when the driver calls succeeded. The hook must return 0 when it
 * has nothing to do (e.g. the thread is not stopped by the caller: dump
 * failures can come before the whole tree is frozen). NULL fn: no hook.
 */
typedef int (*km_gpu_thread_fn)(void *userdata, pid_t pid, pid_t tid, bool start);
void km_gpu_set_thread_hook(struct km_gpu *g, km_gpu_thread_fn fn, void *userdata);

#endif
