/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * TEST DOUBLE — not the NVIDIA driver.
 *
 * libcuda-double.so exports the CUDA driver's checkpoint API (and the few
 * calls a client makes around it) with the real signatures and CUresult
 * values, so kvmotion's GPU state machine and the CRIU plugin can be tested
 * on hosts without a GPU. It keeps no state in memory: everything lives in
 * the directory named by KM_CUDA_DOUBLE_DIR, so that several processes (a
 * test, criu dump, criu restore) share one picture of the "GPU":
 *
 *   DIR/<pid>          a CUDA process: "running", "locked", "checkpointed"
 *                      or "failed". A test creates it with "running". A pid
 *                      without this file is a process that does not use
 *                      CUDA, answered as the real driver answers one
 *                      (CUDA_ERROR_INVALID_VALUE).
 *   DIR/<pid>.gpus     optional: the GPUs the process used, as UUIDs
 *                      ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"),
 *                      separated by commas, spaces or newlines.
 *   DIR/<pid>.lock_args written by every lock call: "timeout_ms=N".
 *   DIR/<pid>.pairs    written by every restore call that gets as far as
 *                      the pairs: one "GPU-old=GPU-new" line per pair
 *                      (empty without pairs).
 *   DIR/journal        one line per lock/checkpoint/restore/unlock call, in
 *                      call order: "<op> <pid>" when it succeeded, "<op>
 *                      <pid> <CUDA_ERROR_NAME>" when it failed. Queries
 *                      (state, restore thread) are not journalled.
 *   DIR/.init.<pid>    cuInit was called by process <pid>; checkpoint calls
 *                      from a process without it get
 *                      CUDA_ERROR_NOT_INITIALIZED.
 *   DIR/.lock          flock'd around every call.
 *
 * Environment, read at every call:
 *   KM_CUDA_DOUBLE_DIR   the directory above; unset: cuInit reports
 *                        CUDA_ERROR_NO_DEVICE.
 *   KM_CUDA_DOUBLE_GPUS  the GPUs present, as UUIDs separated by commas;
 *                        when set, a restore pair's new UUID must be one of
 *                        them (else CUDA_ERROR_INVALID_DEVICE).
 *   KM_CUDA_DOUBLE_FAIL  faults, a comma list of NAME or NAME:PID:
 *                          lock            lock: CUDA_ERROR_NOT_SUPPORTED
 *                          lock_timeout    lock: CUDA_ERROR_TIMEOUT
 *                          checkpoint      CUDA_ERROR_NOT_SUPPORTED
 *                          restore         CUDA_ERROR_OUT_OF_MEMORY
 *                          unlock          CUDA_ERROR_UNKNOWN
 *                          get_state       CUDA_ERROR_UNKNOWN
 *                          restore_thread  CUDA_ERROR_UNKNOWN
 *                          init            cuInit: CUDA_ERROR_OPERATING_SYSTEM
 *                          no_device       cuInit: CUDA_ERROR_NO_DEVICE
 *                        A failed call leaves the process's state as it was.
 *
 * Legal transitions are the real API's: lock RUNNING -> LOCKED, checkpoint
 * LOCKED -> CHECKPOINTED, restore CHECKPOINTED -> LOCKED, unlock LOCKED ->
 * RUNNING; anything else is CUDA_ERROR_ILLEGAL_STATE. Reserved argument
 * fields must be zero (CUDA_ERROR_INVALID_VALUE otherwise). The restore
 * thread of a process is the process itself (its main thread is a real
 * thread the CRIU adapter can ptrace). A lock timeout returns at once.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "cuda_double_abi.h"

#define KM_CD_EXPORT   __attribute__((visibility("default")))
#define KM_CD_MAX_GPUS 64

enum { KM_CD_STATE_NONE = -1 };

static const struct {
	int code;
	const char *name;
} error_names[] = {
	{ KM_CD_SUCCESS, "CUDA_SUCCESS" },
	{ KM_CD_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE" },
	{ KM_CD_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY" },
	{ KM_CD_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED" },
	{ KM_CD_ERROR_STUB_LIBRARY, "CUDA_ERROR_STUB_LIBRARY" },
	{ KM_CD_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE" },
	{ KM_CD_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE" },
	{ KM_CD_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM" },
	{ KM_CD_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE" },
	{ KM_CD_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY" },
	{ KM_CD_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED" },
	{ KM_CD_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT" },
	{ KM_CD_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN" },
};

static const char *const state_names[] = {
	[KM_CD_STATE_RUNNING] = "running",
	[KM_CD_STATE_LOCKED] = "locked",
	[KM_CD_STATE_CHECKPOINTED] = "checkpointed",
	[KM_CD_STATE_FAILED] = "failed",
};

static const char *error_name(int code)
{
	for (size_t i = 0; i < sizeof(error_names) / sizeof(error_names[0]); i++)
		if (error_names[i].code == code)
			return error_names[i].name;
	return NULL;
}

static const char *double_dir(void)
{
	const char *d = getenv("KM_CUDA_DOUBLE_DIR");

	return d && *d ? d : NULL;
}

/* True if KM_CUDA_DOUBLE_FAIL names 'what' for every pid or for this one. */
static bool fault(const char *what, int pid)
{
	const char *p = getenv("KM_CUDA_DOUBLE_FAIL");
	size_t n = strlen(what);

	while (p && *p) {
		size_t len = strcspn(p, ",");

		if (len >= n && strncmp(p, what, n) == 0) {
			if (len == n)
				return true;
			if (p[n] == ':') {
				char num[16];
				size_t k = len - n - 1;

				if (k > 0 && k < sizeof(num)) {
					memcpy(num, p + n + 1, k);
					num[k] = 0;
					if (atoi(num) == pid)
						return true;
				}
			}
		}
		p += len;
		if (*p == ',')
			p++;
	}
	return false;
}

static int path_of(char *buf, size_t size, const char *dir, int pid, const char *suffix)
{
	int n = snprintf(buf, size, "%s/%d%s", dir, pid, suffix);

	return n > 0 && (size_t)n < size ? 0 : -ENAMETOOLONG;
}

/* Reads a small file into buf (NUL-terminated). -errno on failure. */
static int read_small(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t done = 0;

	if (fd < 0)
		return -errno;
	while (done + 1 < size) {
		ssize_t k = read(fd, buf + done, size - 1 - done);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		done += (size_t)k;
	}
	buf[done] = 0;
	close(fd);
	return 0;
}

/* Replaces path's content (write to a temporary name, then rename). */
static void write_small(const char *path, const char *text)
{
	char tmp[4096 + 8];
	size_t len = strlen(text);
	int fd;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	if (write(fd, text, len) != (ssize_t)len) {
		close(fd);
		unlink(tmp);
		return;
	}
	close(fd);
	if (rename(tmp, path) < 0)
		unlink(tmp);
}

/* Appends one line to DIR/journal. */
static void journal(const char *dir, const char *op, int pid, int result)
{
	char path[4096], line[128];
	const char *name = error_name(result);
	int fd, n;

	if (snprintf(path, sizeof(path), "%s/journal", dir) >= (int)sizeof(path))
		return;
	if (result == KM_CD_SUCCESS)
		n = snprintf(line, sizeof(line), "%s %d\n", op, pid);
	else if (name)
		n = snprintf(line, sizeof(line), "%s %d %s\n", op, pid, name);
	else
		n = snprintf(line, sizeof(line), "%s %d CUresult %d\n", op, pid, result);
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	/* One write per line: O_APPEND keeps lines of concurrent callers whole. */
	if (write(fd, line, (size_t)n) != n) {
		/* Nothing to do: a test that reads the journal will notice. */
	}
	close(fd);
}

/* One call on one pid: the directory locked and the pid's state read. */
struct call {
	const char *dir;
	int pid;
	int lock_fd;
	int state; /* KM_CD_STATE_NONE: not a CUDA process */
};

static int read_state(const char *dir, int pid, int *ret)
{
	char path[4096], buf[64];
	size_t len;

	if (path_of(path, sizeof(path), dir, pid, "") < 0)
		return KM_CD_ERROR_INVALID_VALUE;
	if (read_small(path, buf, sizeof(buf)) < 0) {
		*ret = KM_CD_STATE_NONE;
		return KM_CD_SUCCESS;
	}
	len = strcspn(buf, " \t\r\n");
	for (int s = 0; s < (int)(sizeof(state_names) / sizeof(state_names[0])); s++) {
		if (strlen(state_names[s]) == len && strncmp(buf, state_names[s], len) == 0) {
			*ret = s;
			return KM_CD_SUCCESS;
		}
	}
	return KM_CD_ERROR_UNKNOWN; /* a test wrote something odd */
}

static int call_begin(struct call *c, int pid)
{
	char path[4096];
	int r;

	c->lock_fd = -1;
	c->pid = pid;
	c->dir = double_dir();
	if (!c->dir)
		return KM_CD_ERROR_NOT_INITIALIZED;
	if (snprintf(path, sizeof(path), "%s/.init.%d", c->dir, (int)getpid()) >= (int)sizeof(path))
		return KM_CD_ERROR_INVALID_VALUE;
	if (access(path, F_OK) < 0)
		return KM_CD_ERROR_NOT_INITIALIZED;
	if (pid <= 0)
		return KM_CD_ERROR_INVALID_VALUE;
	if (snprintf(path, sizeof(path), "%s/.lock", c->dir) >= (int)sizeof(path))
		return KM_CD_ERROR_INVALID_VALUE;
	c->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (c->lock_fd < 0)
		return KM_CD_ERROR_OPERATING_SYSTEM;
	while (flock(c->lock_fd, LOCK_EX) < 0)
		if (errno != EINTR)
			return KM_CD_ERROR_OPERATING_SYSTEM;
	r = read_state(c->dir, pid, &c->state);
	return r;
}

static void call_set_state(struct call *c, int state)
{
	char path[4096], text[32];

	if (path_of(path, sizeof(path), c->dir, c->pid, "") < 0)
		return;
	snprintf(text, sizeof(text), "%s\n", state_names[state]);
	write_small(path, text);
	c->state = state;
}

/* Ends a state-changing call: journal it, unlock. Returns result. */
static int call_end(struct call *c, const char *op, int result)
{
	if (c->dir)
		journal(c->dir, op, c->pid, result);
	if (c->lock_fd >= 0)
		close(c->lock_fd);
	c->lock_fd = -1;
	return result;
}

static bool all_zero(const void *p, size_t n)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < n; i++)
		if (b[i])
			return false;
	return true;
}

/* --- GPU UUIDs --- */

static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Parses one UUID of length len ("GPU-" optional, dashes ignored). */
static bool parse_uuid(const char *s, size_t len, struct km_cd_uuid *ret)
{
	size_t digits = 0;

	if (len >= 4 && strncmp(s, "GPU-", 4) == 0) {
		s += 4;
		len -= 4;
	}
	for (size_t i = 0; i < len; i++) {
		int v;

		if (s[i] == '-')
			continue;
		v = hex_value(s[i]);
		if (v < 0 || digits >= 32)
			return false;
		if (digits % 2 == 0)
			ret->bytes[digits / 2] = (char)(v << 4);
		else
			ret->bytes[digits / 2] = (char)(ret->bytes[digits / 2] | v);
		digits++;
	}
	return digits == 32;
}

static void format_uuid(const struct km_cd_uuid *u, char buf[41])
{
	const unsigned char *b = (const unsigned char *)u->bytes;

	snprintf(buf, 41,
		 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
		 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
		 b[14], b[15]);
}

/* Parses a list of UUIDs separated by commas or white space. -1 if malformed. */
static int parse_uuid_list(const char *s, struct km_cd_uuid *out, size_t max)
{
	size_t n = 0;

	while (*s) {
		size_t len;

		s += strspn(s, ", \t\r\n");
		len = strcspn(s, ", \t\r\n");
		if (len == 0)
			break;
		if (n == max || !parse_uuid(s, len, &out[n]))
			return -1;
		n++;
		s += len;
	}
	return (int)n;
}

static bool uuid_in(const struct km_cd_uuid *u, const struct km_cd_uuid *list, int n)
{
	for (int i = 0; i < n; i++)
		if (memcmp(u->bytes, list[i].bytes, sizeof(u->bytes)) == 0)
			return true;
	return false;
}

/* Checks restore pairs against the GPUs present and those pid used. */
static int check_pairs(const struct call *c, const struct km_cd_gpu_pair *pairs, unsigned n)
{
	struct km_cd_uuid present[KM_CD_MAX_GPUS], used[KM_CD_MAX_GPUS];
	int n_present = -1, n_used = -1;
	const char *env = getenv("KM_CUDA_DOUBLE_GPUS");
	char path[4096], text[4096];

	if (env) {
		n_present = parse_uuid_list(env, present, KM_CD_MAX_GPUS);
		if (n_present < 0)
			return KM_CD_ERROR_UNKNOWN; /* the test's configuration is broken */
	}
	if (path_of(path, sizeof(path), c->dir, c->pid, ".gpus") == 0 &&
	    read_small(path, text, sizeof(text)) == 0) {
		n_used = parse_uuid_list(text, used, KM_CD_MAX_GPUS);
		if (n_used < 0)
			return KM_CD_ERROR_UNKNOWN;
	}
	for (unsigned i = 0; i < n; i++) {
		if (n_present >= 0 && !uuid_in(&pairs[i].new_uuid, present, n_present))
			return KM_CD_ERROR_INVALID_DEVICE;
		if (n_used >= 0 && !uuid_in(&pairs[i].old_uuid, used, n_used))
			return KM_CD_ERROR_INVALID_VALUE;
		for (unsigned j = 0; j < i; j++)
			if (memcmp(pairs[i].old_uuid.bytes, pairs[j].old_uuid.bytes, 16) == 0)
				return KM_CD_ERROR_INVALID_VALUE;
	}
	/* With pairs, every GPU the process used must be remapped. */
	if (n > 0 && n_used > 0) {
		for (int u = 0; u < n_used; u++) {
			bool found = false;

			for (unsigned i = 0; i < n && !found; i++)
				found = memcmp(used[u].bytes, pairs[i].old_uuid.bytes, 16) == 0;
			if (!found)
				return KM_CD_ERROR_INVALID_VALUE;
		}
	}
	return KM_CD_SUCCESS;
}

static void record_pairs(const struct call *c, const struct km_cd_gpu_pair *pairs, unsigned n)
{
	char path[4096], text[4096] = "";
	size_t used = 0;

	if (path_of(path, sizeof(path), c->dir, c->pid, ".pairs") < 0)
		return;
	for (unsigned i = 0; i < n; i++) {
		char from[41], to[41];
		int k;

		format_uuid(&pairs[i].old_uuid, from);
		format_uuid(&pairs[i].new_uuid, to);
		k = snprintf(text + used, sizeof(text) - used, "%s=%s\n", from, to);
		if (k < 0 || (size_t)k >= sizeof(text) - used)
			break;
		used += (size_t)k;
	}
	write_small(path, text);
}

/* --- the exported API --- */

KM_CD_EXPORT int cuInit(unsigned int flags)
{
	const char *dir = double_dir();
	char path[4096];
	int fd;

	if (flags != 0)
		return KM_CD_ERROR_INVALID_VALUE;
	if (!dir || fault("no_device", 0))
		return KM_CD_ERROR_NO_DEVICE;
	if (fault("init", 0))
		return KM_CD_ERROR_OPERATING_SYSTEM;
	if (snprintf(path, sizeof(path), "%s/.init.%d", dir, (int)getpid()) >= (int)sizeof(path))
		return KM_CD_ERROR_INVALID_VALUE;
	fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		return KM_CD_ERROR_OPERATING_SYSTEM;
	close(fd);
	return KM_CD_SUCCESS;
}

KM_CD_EXPORT int cuDriverGetVersion(int *version)
{
	if (!version)
		return KM_CD_ERROR_INVALID_VALUE;
	*version = 13000;
	return KM_CD_SUCCESS;
}

KM_CD_EXPORT int cuGetErrorName(int error, const char **str)
{
	const char *name = error_name(error);

	if (!str)
		return KM_CD_ERROR_INVALID_VALUE;
	*str = name;
	return name ? KM_CD_SUCCESS : KM_CD_ERROR_INVALID_VALUE;
}

KM_CD_EXPORT int cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
	struct call c;
	int r = call_begin(&c, pid);

	if (r == KM_CD_SUCCESS) {
		if (!tid || c.state == KM_CD_STATE_NONE)
			r = KM_CD_ERROR_INVALID_VALUE;
		else if (fault("restore_thread", pid))
			r = KM_CD_ERROR_UNKNOWN;
		else
			*tid = pid;
	}
	if (c.lock_fd >= 0)
		close(c.lock_fd);
	return r;
}

KM_CD_EXPORT int cuCheckpointProcessGetState(int pid, int *state)
{
	struct call c;
	int r = call_begin(&c, pid);

	if (r == KM_CD_SUCCESS) {
		if (!state || c.state == KM_CD_STATE_NONE)
			r = KM_CD_ERROR_INVALID_VALUE;
		else if (fault("get_state", pid))
			r = KM_CD_ERROR_UNKNOWN;
		else
			*state = c.state;
	}
	if (c.lock_fd >= 0)
		close(c.lock_fd);
	return r;
}

KM_CD_EXPORT int cuCheckpointProcessLock(int pid, struct km_cd_lock_args *args)
{
	struct call c;
	int r = call_begin(&c, pid);

	if (r != KM_CD_SUCCESS)
		return call_end(&c, "lock", r);
	if (args) {
		char path[4096], text[32];

		if (path_of(path, sizeof(path), c.dir, pid, ".lock_args") == 0) {
			snprintf(text, sizeof(text), "timeout_ms=%u\n", args->timeout_ms);
			write_small(path, text);
		}
		if (args->reserved0 || !all_zero(args->reserved1, sizeof(args->reserved1)))
			return call_end(&c, "lock", KM_CD_ERROR_INVALID_VALUE);
	}
	if (c.state == KM_CD_STATE_NONE)
		return call_end(&c, "lock", KM_CD_ERROR_INVALID_VALUE);
	if (c.state != KM_CD_STATE_RUNNING)
		return call_end(&c, "lock", KM_CD_ERROR_ILLEGAL_STATE);
	if (fault("lock", pid))
		return call_end(&c, "lock", KM_CD_ERROR_NOT_SUPPORTED);
	if (fault("lock_timeout", pid))
		return call_end(&c, "lock", KM_CD_ERROR_TIMEOUT);
	call_set_state(&c, KM_CD_STATE_LOCKED);
	return call_end(&c, "lock", KM_CD_SUCCESS);
}

KM_CD_EXPORT int cuCheckpointProcessCheckpoint(int pid, struct km_cd_checkpoint_args *args)
{
	struct call c;
	int r = call_begin(&c, pid);

	if (r != KM_CD_SUCCESS)
		return call_end(&c, "checkpoint", r);
	if (args && !all_zero(args, sizeof(*args)))
		return call_end(&c, "checkpoint", KM_CD_ERROR_INVALID_VALUE);
	if (c.state == KM_CD_STATE_NONE)
		return call_end(&c, "checkpoint", KM_CD_ERROR_INVALID_VALUE);
	if (c.state != KM_CD_STATE_LOCKED)
		return call_end(&c, "checkpoint", KM_CD_ERROR_ILLEGAL_STATE);
	if (fault("checkpoint", pid))
		return call_end(&c, "checkpoint", KM_CD_ERROR_NOT_SUPPORTED);
	call_set_state(&c, KM_CD_STATE_CHECKPOINTED);
	return call_end(&c, "checkpoint", KM_CD_SUCCESS);
}

KM_CD_EXPORT int cuCheckpointProcessRestore(int pid, struct km_cd_restore_args *args)
{
	const struct km_cd_gpu_pair *pairs = NULL;
	unsigned n = 0;
	struct call c;
	int r = call_begin(&c, pid);

	if (r != KM_CD_SUCCESS)
		return call_end(&c, "restore", r);
	if (args) {
		if (!all_zero(args->reserved, sizeof(args->reserved)) || args->reserved1)
			return call_end(&c, "restore", KM_CD_ERROR_INVALID_VALUE);
		if (args->gpu_pairs_count > 0 && !args->gpu_pairs)
			return call_end(&c, "restore", KM_CD_ERROR_INVALID_VALUE);
		pairs = args->gpu_pairs;
		n = args->gpu_pairs_count;
	}
	if (c.state == KM_CD_STATE_NONE)
		return call_end(&c, "restore", KM_CD_ERROR_INVALID_VALUE);
	if (c.state != KM_CD_STATE_CHECKPOINTED)
		return call_end(&c, "restore", KM_CD_ERROR_ILLEGAL_STATE);
	record_pairs(&c, pairs, n);
	r = check_pairs(&c, pairs, n);
	if (r != KM_CD_SUCCESS)
		return call_end(&c, "restore", r);
	if (fault("restore", pid))
		return call_end(&c, "restore", KM_CD_ERROR_OUT_OF_MEMORY);
	call_set_state(&c, KM_CD_STATE_LOCKED);
	return call_end(&c, "restore", KM_CD_SUCCESS);
}

KM_CD_EXPORT int cuCheckpointProcessUnlock(int pid, struct km_cd_unlock_args *args)
{
	struct call c;
	int r = call_begin(&c, pid);

	if (r != KM_CD_SUCCESS)
		return call_end(&c, "unlock", r);
	if (args && !all_zero(args, sizeof(*args)))
		return call_end(&c, "unlock", KM_CD_ERROR_INVALID_VALUE);
	if (c.state == KM_CD_STATE_NONE)
		return call_end(&c, "unlock", KM_CD_ERROR_INVALID_VALUE);
	if (c.state != KM_CD_STATE_LOCKED)
		return call_end(&c, "unlock", KM_CD_ERROR_ILLEGAL_STATE);
	if (fault("unlock", pid))
		return call_end(&c, "unlock", KM_CD_ERROR_UNKNOWN);
	call_set_state(&c, KM_CD_STATE_RUNNING);
	return call_end(&c, "unlock", KM_CD_SUCCESS);
}
