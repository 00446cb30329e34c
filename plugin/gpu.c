/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The CUDA checkpoint state machine over a dlopen'd libcuda (see gpu.h).
 *
 * The handle remembers, per process it paused, the state the driver
 * reported at the pause and what this handle did to it (locked,
 * checkpointed), so that km_gpu_dump_done can undo exactly that. After a
 * driver call fails, the process's state is read back from the driver
 * rather than guessed.
 */
#include "gpu.h"

#include "hash.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

/*
 * --- The driver's ABI ---
 *
 * Declared here so that CUDA is no build dependency. Layouts as in CUDA
 * 13.0's cuda.h, checked on x86-64 by compiling a program against
 * /usr/local/cuda/include/cuda.h (sizeof/offsetof): CUcheckpointLockArgs
 * 64 (timeoutMs@0, reserved0@4, reserved1@8), CUcheckpointCheckpointArgs
 * and CUcheckpointUnlockArgs 64, CUuuid 16, CUcheckpointGpuPair 32
 * (newUuid@16), CUcheckpointRestoreArgs 64 (gpuPairs@0, gpuPairsCount@8,
 * reserved@12, reserved1@56, alignment 8); CUresult and CUprocessState are
 * int-sized enums. tests/cuda-double/abi_check.c compares the test
 * double's copy of these declarations with cuda.h wherever it is found.
 */
enum {
	KM_CU_SUCCESS = 0,
	KM_CU_ERROR_INVALID_VALUE = 1,
	KM_CU_ERROR_NOT_INITIALIZED = 3,
	KM_CU_ERROR_STUB_LIBRARY = 34,
	KM_CU_ERROR_NO_DEVICE = 100,
	KM_CU_ERROR_TIMEOUT = 909,
};

struct km_cu_lock_args {
	unsigned int timeout_ms;
	unsigned int reserved0;
	uint64_t reserved1[7];
};

struct km_cu_checkpoint_args {
	uint64_t reserved[8];
};

struct km_cu_gpu_pair {
	unsigned char old_uuid[KM_GPU_UUID_SIZE];
	unsigned char new_uuid[KM_GPU_UUID_SIZE];
};

struct km_cu_restore_args {
	struct km_cu_gpu_pair *gpu_pairs;
	unsigned int gpu_pairs_count;
	char reserved[52 - sizeof(struct km_cu_gpu_pair *)];
	uint64_t reserved1;
};

struct km_cu_unlock_args {
	uint64_t reserved[8];
};

_Static_assert(sizeof(struct km_cu_lock_args) == 64, "CUcheckpointLockArgs");
_Static_assert(offsetof(struct km_cu_lock_args, reserved1) == 8, "CUcheckpointLockArgs");
_Static_assert(sizeof(struct km_cu_checkpoint_args) == 64, "CUcheckpointCheckpointArgs");
_Static_assert(sizeof(struct km_cu_gpu_pair) == 32, "CUcheckpointGpuPair");
_Static_assert(offsetof(struct km_cu_gpu_pair, new_uuid) == 16, "CUcheckpointGpuPair");
_Static_assert(sizeof(struct km_cu_restore_args) == 64, "CUcheckpointRestoreArgs");
_Static_assert(offsetof(struct km_cu_restore_args, gpu_pairs_count) == 8,
	       "CUcheckpointRestoreArgs");
_Static_assert(offsetof(struct km_cu_restore_args, reserved1) == 56, "CUcheckpointRestoreArgs");
_Static_assert(sizeof(struct km_cu_unlock_args) == 64, "CUcheckpointUnlockArgs");
_Static_assert(sizeof(void *) == sizeof(void (*)(void)),
	       "dlsym results are stored as function pointers");

struct km_cuda {
	int (*init)(unsigned int flags);
	int (*get_error_name)(int error, const char **str);
	int (*driver_get_version)(int *version); /* optional */
	int (*get_restore_thread_id)(int pid, int *tid);
	int (*get_state)(int pid, int *state);
	int (*lock)(int pid, struct km_cu_lock_args *args);
	int (*checkpoint)(int pid, struct km_cu_checkpoint_args *args);
	int (*restore)(int pid, struct km_cu_restore_args *args);
	int (*unlock)(int pid, struct km_cu_unlock_args *args);
};

static const struct {
	const char *name;
	size_t offset;
	bool optional;
} cu_symbols[] = {
	{ "cuInit", offsetof(struct km_cuda, init), false },
	{ "cuGetErrorName", offsetof(struct km_cuda, get_error_name), false },
	{ "cuDriverGetVersion", offsetof(struct km_cuda, driver_get_version), true },
	{ "cuCheckpointProcessGetRestoreThreadId", offsetof(struct km_cuda, get_restore_thread_id),
	  false },
	{ "cuCheckpointProcessGetState", offsetof(struct km_cuda, get_state), false },
	{ "cuCheckpointProcessLock", offsetof(struct km_cuda, lock), false },
	{ "cuCheckpointProcessCheckpoint", offsetof(struct km_cuda, checkpoint), false },
	{ "cuCheckpointProcessRestore", offsetof(struct km_cuda, restore), false },
	{ "cuCheckpointProcessUnlock", offsetof(struct km_cuda, unlock), false },
};

/* Names for when cuGetErrorName cannot help (a stub libcuda answers every call with 34). */
static const struct {
	int code;
	const char *name;
} cu_fallback_names[] = {
	{ 1, "CUDA_ERROR_INVALID_VALUE" },
	{ 2, "CUDA_ERROR_OUT_OF_MEMORY" },
	{ 3, "CUDA_ERROR_NOT_INITIALIZED" },
	{ 4, "CUDA_ERROR_DEINITIALIZED" },
	{ 34, "CUDA_ERROR_STUB_LIBRARY" },
	{ 100, "CUDA_ERROR_NO_DEVICE" },
	{ 101, "CUDA_ERROR_INVALID_DEVICE" },
	{ 304, "CUDA_ERROR_OPERATING_SYSTEM" },
	{ 401, "CUDA_ERROR_ILLEGAL_STATE" },
	{ 600, "CUDA_ERROR_NOT_READY" },
	{ 800, "CUDA_ERROR_NOT_PERMITTED" },
	{ 801, "CUDA_ERROR_NOT_SUPPORTED" },
	{ 803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH" },
	{ 909, "CUDA_ERROR_TIMEOUT" },
	{ 999, "CUDA_ERROR_UNKNOWN" },
};

/* --- The handle --- */

struct km_gpu_proc {
	pid_t pid;
	enum km_gpu_state initial; /* the driver's state at the pause */
	enum km_gpu_state state;   /* the driver's state as far as we know */
	bool locked;		   /* we locked it: unlock when undoing */
	bool checkpointed;	   /* we checkpointed it: restore when undoing */
};

struct km_gpu {
	void *dl; /* NULL: no usable driver, every pid is KM_GPU_NONE */
	struct km_cuda cu;
	char reason[256]; /* why dl is NULL */
	km_gpu_thread_fn hook;
	void *hook_data;
	struct km_gpu_proc *procs;
	size_t n_procs, n_alloc;
};

const char *km_gpu_state_name(enum km_gpu_state s)
{
	switch (s) {
	case KM_GPU_NONE:
		return "none";
	case KM_GPU_RUNNING:
		return "running";
	case KM_GPU_LOCKED:
		return "locked";
	case KM_GPU_CHECKPOINTED:
		return "checkpointed";
	case KM_GPU_FAILED:
		return "failed";
	}
	return "unknown";
}

/* The CUDA error's name: from the driver, our table, or "CUresult N" in buf. */
static const char *cu_name(const struct km_gpu *g, int r, char buf[32])
{
	const char *s = NULL;

	if (g->cu.get_error_name && g->cu.get_error_name(r, &s) == KM_CU_SUCCESS && s)
		return s;
	for (size_t i = 0; i < KM_ARRAY_SIZE(cu_fallback_names); i++)
		if (cu_fallback_names[i].code == r)
			return cu_fallback_names[i].name;
	snprintf(buf, 32, "CUresult %d", r);
	return buf;
}

/* Describes a failed driver call; -ETIMEDOUT for a timeout, else -EPROTO. */
static int cu_fail(const struct km_gpu *g, struct km_error *err, int r, const char *call, pid_t pid)
{
	char buf[32];

	km_error_set(err, "%s(pid %d): %s", call, (int)pid, cu_name(g, r, buf));
	return r == KM_CU_ERROR_TIMEOUT ? -ETIMEDOUT : -EPROTO;
}

/*
 * What the driver says of a process without CUDA: INVALID_VALUE for a live
 * process without CUDA state, NOT_INITIALIZED for one that has not (yet)
 * initialised CUDA. Our own cuInit ran at open, so NOT_INITIALIZED is not
 * about us.
 */
static bool cu_not_cuda(int r)
{
	return r == KM_CU_ERROR_INVALID_VALUE || r == KM_CU_ERROR_NOT_INITIALIZED;
}

static bool valid_state(int s)
{
	return s >= KM_GPU_RUNNING && s <= KM_GPU_FAILED;
}

void km_gpu_close(struct km_gpu *g)
{
	if (!g)
		return;
	/* Opened with RTLD_NODELETE: the driver's threads keep their code. */
	if (g->dl)
		dlclose(g->dl);
	free(g->procs);
	free(g);
}

static void km_gpu_closep(struct km_gpu **g)
{
	km_gpu_close(*g);
}

bool km_gpu_available(const struct km_gpu *g)
{
	return g && g->dl;
}

const char *km_gpu_unavailable_reason(const struct km_gpu *g)
{
	if (!g)
		return "no handle";
	return g->dl ? NULL : g->reason;
}

static void set_unavailable(struct km_gpu *g, const char *prefix, const char *what)
{
	snprintf(g->reason, sizeof(g->reason), "%s%s", prefix, what);
	if (g->dl)
		dlclose(g->dl);
	g->dl = NULL;
	memset(&g->cu, 0, sizeof(g->cu));
}

int km_gpu_open(const char *library, struct km_gpu **ret, struct km_error *err)
{
	_cleanup_(km_gpu_closep) struct km_gpu *g = NULL;
	const char *lib = library ? library : "libcuda.so.1";
	char buf[32];
	int r;

	g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	dlerror();
	g->dl = dlopen(lib, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
	if (!g->dl) {
		const char *e = dlerror();

		if (strchr(lib, '/')) {
			/* An explicit path that does not load is a mistake, not "no GPU". */
			r = access(lib, F_OK) < 0 ? -ENOENT : -ELIBBAD;
			km_error_set(err, "%s", e ? e : lib);
			return r;
		}
		set_unavailable(g, "", e ? e : lib);
		*ret = KM_TAKE_PTR(g);
		return 0;
	}

	for (size_t i = 0; i < KM_ARRAY_SIZE(cu_symbols); i++) {
		void *p = dlsym(g->dl, cu_symbols[i].name);

		memcpy((char *)&g->cu + cu_symbols[i].offset, &p, sizeof(p));
		if (p || cu_symbols[i].optional)
			continue;
		if (!g->cu.init) {
			km_error_set(err, "%s has no %s: not a CUDA driver library", lib,
				     cu_symbols[i].name);
		} else {
			int v = 0;

			if (g->cu.driver_get_version &&
			    g->cu.driver_get_version(&v) == KM_CU_SUCCESS)
				km_error_set(
					err,
					"%s has no %s (driver API %d.%d): the checkpoint API needs "
					"driver r570 / CUDA 12.8 or later",
					lib, cu_symbols[i].name, v / 1000, v % 1000 / 10);
			else
				km_error_set(err,
					     "%s has no %s: the checkpoint API needs driver r570 / "
					     "CUDA 12.8 or later",
					     lib, cu_symbols[i].name);
		}
		return -ENOTSUP;
	}

	/*
	 * Initialise the driver in this process: restore needs it (or
	 * persistence mode), and without it every query could be
	 * NOT_INITIALIZED, which would read as "not a CUDA process".
	 */
	r = g->cu.init(0);
	if (r == KM_CU_ERROR_NO_DEVICE || r == KM_CU_ERROR_STUB_LIBRARY) {
		set_unavailable(g, "cuInit: ", cu_name(g, r, buf));
	} else if (r != KM_CU_SUCCESS) {
		km_error_set(err, "cuInit: %s", cu_name(g, r, buf));
		return -ENODEV;
	}
	*ret = KM_TAKE_PTR(g);
	return 0;
}

void km_gpu_set_thread_hook(struct km_gpu *g, km_gpu_thread_fn fn, void *userdata)
{
	g->hook = fn;
	g->hook_data = fn ? userdata : NULL;
}

static struct km_gpu_proc *find_proc(struct km_gpu *g, pid_t pid)
{
	for (size_t i = 0; i < g->n_procs; i++)
		if (g->procs[i].pid == pid)
			return &g->procs[i];
	return NULL;
}

static int add_proc(struct km_gpu *g, pid_t pid, enum km_gpu_state s, struct km_gpu_proc **ret)
{
	if (g->n_procs == g->n_alloc) {
		size_t n = g->n_alloc ? 2 * g->n_alloc : 8;
		struct km_gpu_proc *p = reallocarray(g->procs, n, sizeof(*p));

		if (!p)
			return -ENOMEM;
		g->procs = p;
		g->n_alloc = n;
	}
	g->procs[g->n_procs] = (struct km_gpu_proc){ .pid = pid, .initial = s, .state = s };
	*ret = &g->procs[g->n_procs++];
	return 0;
}

/* After a failed call: learn the process's state from the driver if it tells. */
static void refresh_state(struct km_gpu *g, struct km_gpu_proc *p)
{
	int s = -1;

	if (g->cu.get_state(p->pid, &s) == KM_CU_SUCCESS && valid_state(s))
		p->state = (enum km_gpu_state)s;
}

/* The driver's state of pid and its restore thread; KM_GPU_NONE if pid is not CUDA. */
static int probe(struct km_gpu *g, pid_t pid, enum km_gpu_state *ret_state, pid_t *ret_tid,
		 struct km_error *err)
{
	int tid = 0, s = -1, r;

	r = g->cu.get_restore_thread_id(pid, &tid);
	if (cu_not_cuda(r)) {
		*ret_state = KM_GPU_NONE;
		*ret_tid = 0;
		return 0;
	}
	if (r != KM_CU_SUCCESS)
		return cu_fail(g, err, r, "cuCheckpointProcessGetRestoreThreadId", pid);
	r = g->cu.get_state(pid, &s);
	if (cu_not_cuda(r)) {
		/* Gone between the two calls. */
		*ret_state = KM_GPU_NONE;
		*ret_tid = 0;
		return 0;
	}
	if (r != KM_CU_SUCCESS)
		return cu_fail(g, err, r, "cuCheckpointProcessGetState", pid);
	if (!valid_state(s)) {
		km_error_set(err, "cuCheckpointProcessGetState(pid %d): unknown state %d", (int)pid,
			     s);
		return -EPROTO;
	}
	*ret_state = (enum km_gpu_state)s;
	*ret_tid = tid;
	return 0;
}

int km_gpu_get_state(struct km_gpu *g, pid_t pid, enum km_gpu_state *ret, struct km_error *err)
{
	pid_t tid;

	if (!g->dl) {
		*ret = KM_GPU_NONE;
		return 0;
	}
	return probe(g, pid, ret, &tid, err);
}

int km_gpu_restore_thread(struct km_gpu *g, pid_t pid, pid_t *ret_tid, struct km_error *err)
{
	int tid = 0, r;

	if (!g->dl) {
		km_error_set(err, "pid %d: no CUDA driver (%s)", (int)pid, g->reason);
		return -ENODEV;
	}
	r = g->cu.get_restore_thread_id(pid, &tid);
	if (cu_not_cuda(r)) {
		km_error_set(err, "pid %d is not a CUDA process", (int)pid);
		return -ENODEV;
	}
	if (r != KM_CU_SUCCESS)
		return cu_fail(g, err, r, "cuCheckpointProcessGetRestoreThreadId", pid);
	*ret_tid = tid;
	return 0;
}

/*
 * The restore thread around a checkpoint or restore: learn its tid (only
 * when a hook wants it) and let the hook start it.
 */
static int thread_start(struct km_gpu *g, pid_t pid, pid_t known_tid, pid_t *ret_tid,
			struct km_error *err)
{
	pid_t tid = known_tid;
	int r;

	*ret_tid = 0;
	if (!g->hook)
		return 0;
	if (tid <= 0) {
		r = km_gpu_restore_thread(g, pid, &tid, err);
		if (r < 0)
			return r;
	}
	r = g->hook(g->hook_data, pid, tid, true);
	if (r < 0) {
		km_error_set(err, "pid %d: cannot let CUDA restore thread %d run: %s", (int)pid,
			     (int)tid, strerror(-r));
		return r;
	}
	*ret_tid = tid;
	return 0;
}

/* Stops the thread again; reports into err only if 'failed' is false. */
static int thread_stop(struct km_gpu *g, pid_t pid, pid_t tid, bool failed, struct km_error *err)
{
	int r;

	if (!g->hook)
		return 0;
	r = g->hook(g->hook_data, pid, tid, false);
	if (r < 0 && !failed)
		km_error_set(err, "pid %d: cannot stop CUDA restore thread %d again: %s", (int)pid,
			     (int)tid, strerror(-r));
	return r < 0 ? r : 0;
}

int km_gpu_pause(struct km_gpu *g, pid_t pid, unsigned timeout_ms, bool *ret_is_cuda,
		 struct km_error *err)
{
	struct km_cu_lock_args args = { .timeout_ms = timeout_ms };
	struct km_gpu_proc *p;
	enum km_gpu_state s;
	pid_t tid;
	char buf[32];
	int r;

	if (!g->dl) {
		*ret_is_cuda = false;
		return 0;
	}
	p = find_proc(g, pid);
	if (p) {
		*ret_is_cuda = p->initial != KM_GPU_NONE;
		return 0;
	}
	r = probe(g, pid, &s, &tid, err);
	if (r < 0)
		return r;
	if (s == KM_GPU_FAILED) {
		km_error_set(err, "pid %d: its CUDA state is \"failed\"; it cannot be checkpointed",
			     (int)pid);
		return -ENODEV;
	}
	if (add_proc(g, pid, s, &p) < 0) {
		km_error_set(err, "pid %d: out of memory", (int)pid);
		return -ENOMEM;
	}
	if (s == KM_GPU_RUNNING) {
		r = g->cu.lock(pid, &args);
		if (r != KM_CU_SUCCESS) {
			int e = r;

			/* A timed out lock leaves it running; should one not, unlock it later. */
			refresh_state(g, p);
			p->locked = p->state == KM_GPU_LOCKED;
			r = cu_fail(g, err, e, "cuCheckpointProcessLock", pid);
			if (r == -ETIMEDOUT)
				km_error_set(
					err,
					"cuCheckpointProcessLock(pid %d): %s (not locked within %u "
					"ms; the process keeps running)",
					(int)pid, cu_name(g, e, buf), timeout_ms);
			return r;
		}
		p->state = KM_GPU_LOCKED;
		p->locked = true;
	}
	*ret_is_cuda = s != KM_GPU_NONE;
	return 0;
}

int km_gpu_checkpoint(struct km_gpu *g, pid_t pid, struct km_error *err)
{
	struct km_cu_checkpoint_args args = { { 0 } };
	struct km_gpu_proc *p;
	enum km_gpu_state s;
	pid_t tid;
	int r, e;

	if (!g->dl)
		return 0;
	p = find_proc(g, pid);
	if (!p) {
		km_error_set(err, "pid %d: checkpoint without a prior pause (PAUSE_DEVICES)",
			     (int)pid);
		return -EINVAL;
	}
	if (p->initial == KM_GPU_NONE) {
		r = probe(g, pid, &s, &tid, err);
		if (r < 0)
			return r;
		if (s != KM_GPU_NONE) {
			km_error_set(
				err,
				"pid %d started using CUDA after it was paused (now %s); retry "
				"the dump",
				(int)pid, km_gpu_state_name(s));
			return -EAGAIN;
		}
		return 0;
	}
	if (p->initial == KM_GPU_CHECKPOINTED)
		return 0; /* checkpointed before the dump: left as found */
	if (p->state != KM_GPU_LOCKED) {
		km_error_set(err, "pid %d: cannot checkpoint a CUDA process that is %s, not locked",
			     (int)pid, km_gpu_state_name(p->state));
		return -EINVAL;
	}

	r = thread_start(g, pid, 0, &tid, err);
	if (r < 0)
		return r;
	e = g->cu.checkpoint(pid, &args);
	if (e == KM_CU_SUCCESS) {
		p->state = KM_GPU_CHECKPOINTED;
		p->checkpointed = true;
	} else {
		refresh_state(g, p);
		p->checkpointed = p->state == KM_GPU_CHECKPOINTED;
		r = cu_fail(g, err, e, "cuCheckpointProcessCheckpoint", pid);
	}
	e = thread_stop(g, pid, tid, r < 0, err);
	return r < 0 ? r : e;
}

/*
 * Restore (optionally) and unlock (optionally) one process, inside one
 * start/stop of its restore thread. Updates p.
 */
static int restore_unlock(struct km_gpu *g, struct km_gpu_proc *p, pid_t known_tid, bool restore,
			  bool unlock, struct km_cu_restore_args *args, struct km_error *err)
{
	struct km_cu_unlock_args unlock_args = { { 0 } };
	pid_t tid;
	int r, e;

	r = thread_start(g, p->pid, known_tid, &tid, err);
	if (r < 0)
		return r;
	if (restore) {
		e = g->cu.restore(p->pid, args);
		if (e == KM_CU_SUCCESS) {
			p->state = KM_GPU_LOCKED;
			p->checkpointed = false;
		} else {
			char buf[32];

			refresh_state(g, p);
			r = cu_fail(g, err, e, "cuCheckpointProcessRestore", p->pid);
			if (args->gpu_pairs_count > 0)
				km_error_set(
					err,
					"cuCheckpointProcessRestore(pid %d): %s (with %u GPU pair%s)",
					(int)p->pid, cu_name(g, e, buf), args->gpu_pairs_count,
					args->gpu_pairs_count == 1 ? "" : "s");
		}
	}
	if (r == 0 && unlock && p->state == KM_GPU_LOCKED) {
		e = g->cu.unlock(p->pid, &unlock_args);
		if (e == KM_CU_SUCCESS) {
			p->state = KM_GPU_RUNNING;
			p->locked = false;
		} else {
			refresh_state(g, p);
			r = cu_fail(g, err, e, "cuCheckpointProcessUnlock", p->pid);
		}
	}
	e = thread_stop(g, p->pid, tid, r < 0, err);
	return r < 0 ? r : e;
}

/* Brings one paused process back to its state at the pause. */
static int undo(struct km_gpu *g, struct km_gpu_proc *p, struct km_error *err)
{
	struct km_cu_restore_args args = { 0 };
	bool restore = p->checkpointed && p->state == KM_GPU_CHECKPOINTED;
	bool unlock = p->locked;

	if (p->state == KM_GPU_FAILED) {
		km_error_set(err, "pid %d: its CUDA state is \"failed\"; it cannot be brought back",
			     (int)p->pid);
		return -ENODEV;
	}
	if (!restore && !(unlock && p->state == KM_GPU_LOCKED))
		return 0;
	return restore_unlock(g, p, 0, restore, unlock, &args, err);
}

int km_gpu_dump_done(struct km_gpu *g, bool dump_ok, bool leave_running, struct km_error *err)
{
	int first = 0;

	if (!g->dl)
		return 0;
	if (!dump_ok || leave_running) {
		for (size_t i = 0; i < g->n_procs; i++) {
			struct km_error e = { "" };
			int r = undo(g, &g->procs[i], &e);

			if (r < 0 && first == 0) {
				first = r;
				km_error_set(err, "%s", e.msg);
			}
		}
	}
	g->n_procs = 0;
	return first;
}

int km_gpu_resume(struct km_gpu *g, pid_t pid, const struct km_gpu_pair *pairs, size_t n_pairs,
		  struct km_error *err)
{
	_cleanup_free_ struct km_cu_gpu_pair *cu_pairs = NULL;
	struct km_cu_restore_args args = { 0 };
	struct km_gpu_proc *tracked, local;
	enum km_gpu_state s;
	pid_t tid;
	int r;

	if (!g->dl)
		return 0;
	r = probe(g, pid, &s, &tid, err);
	if (r < 0)
		return r;
	if (s == KM_GPU_FAILED) {
		km_error_set(err, "pid %d: its CUDA state is \"failed\"; it cannot be restored",
			     (int)pid);
		return -ENODEV;
	}
	if (s != KM_GPU_CHECKPOINTED)
		return 0;

	if (n_pairs > 0) {
		if (n_pairs > UINT_MAX) {
			km_error_set(err, "too many GPU pairs: %zu", n_pairs);
			return -EINVAL;
		}
		cu_pairs = calloc(n_pairs, sizeof(*cu_pairs));
		if (!cu_pairs) {
			km_error_set(err, "pid %d: out of memory", (int)pid);
			return -ENOMEM;
		}
		for (size_t i = 0; i < n_pairs; i++) {
			memcpy(cu_pairs[i].old_uuid, pairs[i].from, KM_GPU_UUID_SIZE);
			memcpy(cu_pairs[i].new_uuid, pairs[i].to, KM_GPU_UUID_SIZE);
		}
		args.gpu_pairs = cu_pairs;
		args.gpu_pairs_count = (unsigned int)n_pairs;
	}

	/* A process this handle paused keeps its record in step. */
	local = (struct km_gpu_proc){ .pid = pid, .initial = s, .state = s };
	r = restore_unlock(g, &local, tid, true, true, &args, err);
	tracked = find_proc(g, pid);
	if (tracked) {
		tracked->state = local.state;
		if (local.state != KM_GPU_CHECKPOINTED)
			tracked->checkpointed = false;
		if (local.state == KM_GPU_RUNNING)
			tracked->locked = false;
	}
	return r;
}

/* --- GPU maps --- */

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" in s[0..len), prefix and dashes optional. */
static bool parse_uuid(const char *s, size_t len, unsigned char ret[KM_GPU_UUID_SIZE])
{
	unsigned char u[KM_GPU_UUID_SIZE] = { 0 };
	size_t digits = 0;

	if (len >= 4 && strncmp(s, "GPU-", 4) == 0) {
		s += 4;
		len -= 4;
	}
	for (size_t i = 0; i < len; i++) {
		int v;

		if (s[i] == '-') {
			/* Only where the 8-4-4-4-12 form has one, and not twice. */
			if (!(digits == 8 || digits == 12 || digits == 16 || digits == 20) ||
			    (i > 0 && s[i - 1] == '-'))
				return false;
			continue;
		}
		v = km_hex_digit(s[i]);
		if (v < 0 || digits == 2 * KM_GPU_UUID_SIZE)
			return false;
		u[digits / 2] = (unsigned char)(u[digits / 2] | (digits % 2 ? v : v << 4));
		digits++;
	}
	if (digits != 2 * KM_GPU_UUID_SIZE || (len > 0 && s[len - 1] == '-'))
		return false;
	memcpy(ret, u, sizeof(u));
	return true;
}

static void format_uuid(const unsigned char u[KM_GPU_UUID_SIZE], char buf[41])
{
	snprintf(buf, 41,
		 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
		 u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
		 u[14], u[15]);
}

static bool is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

int km_gpu_parse_map(const char *s, struct km_gpu_pair **ret, size_t *ret_n, struct km_error *err)
{
	_cleanup_free_ struct km_gpu_pair *pairs = NULL;
	size_t n = 0, alloc = 0, item = 0;
	const char *p = s;

	if (!s || !s[strspn(s, " \t\r\n")]) {
		km_error_set(err, "empty GPU map (want GPU-<uuid>=GPU-<uuid>[,...])");
		return -EINVAL;
	}
	for (;;) {
		const char *end = strchr(p, ',');
		const char *b = p, *e = end ? end : p + strlen(p), *eq;
		struct km_gpu_pair pair;

		item++;
		while (b < e && is_blank(*b))
			b++;
		while (e > b && is_blank(e[-1]))
			e--;
		if (b == e) {
			km_error_set(err, "GPU map item %zu is empty", item);
			return -EINVAL;
		}
		eq = memchr(b, '=', (size_t)(e - b));
		if (!eq) {
			km_error_set(err, "GPU map item %zu \"%.*s\": missing '=' (want FROM=TO)",
				     item, (int)(e - b), b);
			return -EINVAL;
		}
		for (int side = 0; side < 2; side++) {
			const char *ub = side ? eq + 1 : b, *ue = side ? e : eq;

			while (ub < ue && is_blank(*ub))
				ub++;
			while (ue > ub && is_blank(ue[-1]))
				ue--;
			if (!parse_uuid(ub, (size_t)(ue - ub), side ? pair.to : pair.from)) {
				km_error_set(err,
					     "GPU map item %zu: bad GPU UUID \"%.*s\" (want "
					     "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
					     item, (int)(ue - ub), ub);
				return -EINVAL;
			}
		}
		for (size_t i = 0; i < n; i++) {
			if (memcmp(pairs[i].from, pair.from, KM_GPU_UUID_SIZE) == 0) {
				char buf[41];

				format_uuid(pair.from, buf);
				km_error_set(err, "GPU map item %zu: %s is mapped twice", item,
					     buf);
				return -EINVAL;
			}
		}
		if (n == alloc) {
			size_t na = alloc ? 2 * alloc : 4;
			struct km_gpu_pair *np = reallocarray(pairs, na, sizeof(*np));

			if (!np) {
				km_error_set(err, "GPU map: out of memory");
				return -ENOMEM;
			}
			pairs = np;
			alloc = na;
		}
		pairs[n++] = pair;
		if (!end)
			break;
		p = end + 1;
	}
	*ret = KM_TAKE_PTR(pairs);
	*ret_n = n;
	return 0;
}
