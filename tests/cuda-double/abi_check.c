/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * TEST DOUBLE — not the NVIDIA driver.
 *
 * Compile-time comparison of the double's ABI declarations with the CUDA
 * toolkit's cuda.h; built only where meson finds that header. Nothing here
 * runs: a mismatch fails the build.
 */
#include <stddef.h>

#include <cuda.h>

#define KM_CD_NO_PROTOTYPES
#include "cuda_double_abi.h"

#define KM_SAME_LAYOUT(mine, theirs)                                     \
	_Static_assert(sizeof(mine) == sizeof(theirs), #theirs " size"); \
	_Static_assert(_Alignof(mine) == _Alignof(theirs), #theirs " alignment")

#define KM_SAME_OFFSET(mine, mf, theirs, tf) \
	_Static_assert(offsetof(mine, mf) == offsetof(theirs, tf), #theirs "." #tf)

KM_SAME_LAYOUT(struct km_cd_uuid, CUuuid);
KM_SAME_LAYOUT(struct km_cd_lock_args, CUcheckpointLockArgs);
KM_SAME_LAYOUT(struct km_cd_checkpoint_args, CUcheckpointCheckpointArgs);
KM_SAME_LAYOUT(struct km_cd_gpu_pair, CUcheckpointGpuPair);
KM_SAME_LAYOUT(struct km_cd_restore_args, CUcheckpointRestoreArgs);
KM_SAME_LAYOUT(struct km_cd_unlock_args, CUcheckpointUnlockArgs);
_Static_assert(sizeof(int) == sizeof(CUresult), "CUresult size");
_Static_assert(sizeof(int) == sizeof(CUprocessState), "CUprocessState size");

KM_SAME_OFFSET(struct km_cd_lock_args, timeout_ms, CUcheckpointLockArgs, timeoutMs);
KM_SAME_OFFSET(struct km_cd_lock_args, reserved0, CUcheckpointLockArgs, reserved0);
KM_SAME_OFFSET(struct km_cd_lock_args, reserved1, CUcheckpointLockArgs, reserved1);
KM_SAME_OFFSET(struct km_cd_gpu_pair, old_uuid, CUcheckpointGpuPair, oldUuid);
KM_SAME_OFFSET(struct km_cd_gpu_pair, new_uuid, CUcheckpointGpuPair, newUuid);
KM_SAME_OFFSET(struct km_cd_restore_args, gpu_pairs, CUcheckpointRestoreArgs, gpuPairs);
KM_SAME_OFFSET(struct km_cd_restore_args, gpu_pairs_count, CUcheckpointRestoreArgs, gpuPairsCount);
KM_SAME_OFFSET(struct km_cd_restore_args, reserved, CUcheckpointRestoreArgs, reserved);
KM_SAME_OFFSET(struct km_cd_restore_args, reserved1, CUcheckpointRestoreArgs, reserved1);

_Static_assert((int)KM_CD_SUCCESS == (int)CUDA_SUCCESS, "CUDA_SUCCESS");
_Static_assert((int)KM_CD_ERROR_INVALID_VALUE == (int)CUDA_ERROR_INVALID_VALUE, "INVALID_VALUE");
_Static_assert((int)KM_CD_ERROR_OUT_OF_MEMORY == (int)CUDA_ERROR_OUT_OF_MEMORY, "OUT_OF_MEMORY");
_Static_assert((int)KM_CD_ERROR_NOT_INITIALIZED == (int)CUDA_ERROR_NOT_INITIALIZED,
	       "NOT_INITIALIZED");
_Static_assert((int)KM_CD_ERROR_STUB_LIBRARY == (int)CUDA_ERROR_STUB_LIBRARY, "STUB_LIBRARY");
_Static_assert((int)KM_CD_ERROR_NO_DEVICE == (int)CUDA_ERROR_NO_DEVICE, "NO_DEVICE");
_Static_assert((int)KM_CD_ERROR_INVALID_DEVICE == (int)CUDA_ERROR_INVALID_DEVICE, "INVALID_DEVICE");
_Static_assert((int)KM_CD_ERROR_OPERATING_SYSTEM == (int)CUDA_ERROR_OPERATING_SYSTEM,
	       "OPERATING_SYSTEM");
_Static_assert((int)KM_CD_ERROR_ILLEGAL_STATE == (int)CUDA_ERROR_ILLEGAL_STATE, "ILLEGAL_STATE");
_Static_assert((int)KM_CD_ERROR_NOT_READY == (int)CUDA_ERROR_NOT_READY, "NOT_READY");
_Static_assert((int)KM_CD_ERROR_NOT_SUPPORTED == (int)CUDA_ERROR_NOT_SUPPORTED, "NOT_SUPPORTED");
_Static_assert((int)KM_CD_ERROR_TIMEOUT == (int)CUDA_ERROR_TIMEOUT, "TIMEOUT");
_Static_assert((int)KM_CD_ERROR_UNKNOWN == (int)CUDA_ERROR_UNKNOWN, "UNKNOWN");

_Static_assert((int)KM_CD_STATE_RUNNING == (int)CU_PROCESS_STATE_RUNNING, "RUNNING");
_Static_assert((int)KM_CD_STATE_LOCKED == (int)CU_PROCESS_STATE_LOCKED, "LOCKED");
_Static_assert((int)KM_CD_STATE_CHECKPOINTED == (int)CU_PROCESS_STATE_CHECKPOINTED, "CHECKPOINTED");
_Static_assert((int)KM_CD_STATE_FAILED == (int)CU_PROCESS_STATE_FAILED, "FAILED");

/* A translation unit must declare something. */
extern const int km_cuda_double_abi_checked;
const int km_cuda_double_abi_checked = 1;
