/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_CUDA_DOUBLE_ABI_H
#define KM_CUDA_DOUBLE_ABI_H

/*
 * TEST DOUBLE — not the NVIDIA driver.
 *
 * The slice of libcuda's ABI that the double implements, declared without
 * cuda.h so that it builds on hosts without CUDA. Layouts follow CUDA 13.0's
 * cuda.h (x86-64 and aarch64, LP64); abi_check.c compares them with cuda.h
 * where meson finds that header. Names carry a km_cd_ prefix so the two can
 * meet in one translation unit.
 */

#include <stdint.h>

/* CUresult values, as in cuda.h's enum cudaError_enum. */
enum {
	KM_CD_SUCCESS = 0,
	KM_CD_ERROR_INVALID_VALUE = 1,
	KM_CD_ERROR_OUT_OF_MEMORY = 2,
	KM_CD_ERROR_NOT_INITIALIZED = 3,
	KM_CD_ERROR_STUB_LIBRARY = 34,
	KM_CD_ERROR_NO_DEVICE = 100,
	KM_CD_ERROR_INVALID_DEVICE = 101,
	KM_CD_ERROR_OPERATING_SYSTEM = 304,
	KM_CD_ERROR_ILLEGAL_STATE = 401,
	KM_CD_ERROR_NOT_READY = 600,
	KM_CD_ERROR_NOT_SUPPORTED = 801,
	KM_CD_ERROR_TIMEOUT = 909,
	KM_CD_ERROR_UNKNOWN = 999,
};

/* CUprocessState. */
enum {
	KM_CD_STATE_RUNNING = 0,
	KM_CD_STATE_LOCKED = 1,
	KM_CD_STATE_CHECKPOINTED = 2,
	KM_CD_STATE_FAILED = 3,
};

struct km_cd_uuid { /* CUuuid */
	char bytes[16];
};

struct km_cd_lock_args { /* CUcheckpointLockArgs, 64 bytes */
	unsigned int timeout_ms;
	unsigned int reserved0;
	uint64_t reserved1[7];
};

struct km_cd_checkpoint_args { /* CUcheckpointCheckpointArgs, 64 bytes */
	uint64_t reserved[8];
};

struct km_cd_gpu_pair { /* CUcheckpointGpuPair, 32 bytes */
	struct km_cd_uuid old_uuid;
	struct km_cd_uuid new_uuid;
};

struct km_cd_restore_args { /* CUcheckpointRestoreArgs, 64 bytes */
	struct km_cd_gpu_pair *gpu_pairs;
	unsigned int gpu_pairs_count;
	char reserved[52 - sizeof(struct km_cd_gpu_pair *)];
	uint64_t reserved1;
};

struct km_cd_unlock_args { /* CUcheckpointUnlockArgs, 64 bytes */
	uint64_t reserved[8];
};

_Static_assert(sizeof(struct km_cd_lock_args) == 64, "CUcheckpointLockArgs");
_Static_assert(sizeof(struct km_cd_checkpoint_args) == 64, "CUcheckpointCheckpointArgs");
_Static_assert(sizeof(struct km_cd_gpu_pair) == 32, "CUcheckpointGpuPair");
_Static_assert(sizeof(struct km_cd_restore_args) == 64, "CUcheckpointRestoreArgs");
_Static_assert(sizeof(struct km_cd_unlock_args) == 64, "CUcheckpointUnlockArgs");

/*
 * The exported entry points (cuda.h declares them with CUresult, an
 * int-sized enum; abi_check.c, which includes cuda.h, skips these).
 */
#ifndef KM_CD_NO_PROTOTYPES
int cuInit(unsigned int flags);
int cuDriverGetVersion(int *version);
int cuGetErrorName(int error, const char **str);
int cuCheckpointProcessGetRestoreThreadId(int pid, int *tid);
int cuCheckpointProcessGetState(int pid, int *state);
int cuCheckpointProcessLock(int pid, struct km_cd_lock_args *args);
int cuCheckpointProcessCheckpoint(int pid, struct km_cd_checkpoint_args *args);
int cuCheckpointProcessRestore(int pid, struct km_cd_restore_args *args);
int cuCheckpointProcessUnlock(int pid, struct km_cd_unlock_args *args);
#endif

#endif
