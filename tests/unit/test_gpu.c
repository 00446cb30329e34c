/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The GPU state machine (plugin/gpu.c) against the test double of libcuda
 * (tests/cuda-double, path in KM_CUDA_DOUBLE). Each test gets its own double
 * directory (KM_CUDA_DOUBLE_DIR); the double reads its environment at every
 * call, so a test sets faults right before the call they should hit.
 */
#include <check.h>

#include "km-check.h"
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu.h"

#define PID_A 4242
#define PID_B 4343
#define GPU_A "GPU-0a1b2c3d-0000-1111-2222-333344445555"
#define GPU_B "GPU-bbbbbbbb-cccc-dddd-eeee-ffffffffffff"
#define GPU_C "GPU-12345678-9abc-def0-1234-56789abcdef0"

static char dir[64];

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	return remove(path);
}

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/km-test-gpu-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	ck_assert_int_eq(setenv("KM_CUDA_DOUBLE_DIR", dir, 1), 0);
	unsetenv("KM_CUDA_DOUBLE_FAIL");
	unsetenv("KM_CUDA_DOUBLE_GPUS");
}

static void teardown(void)
{
	nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void set_fail(const char *faults)
{
	if (faults)
		ck_assert_int_eq(setenv("KM_CUDA_DOUBLE_FAIL", faults, 1), 0);
	else
		unsetenv("KM_CUDA_DOUBLE_FAIL");
}

static void write_file(const char *name, const char *text)
{
	char path[256];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_ge(fputs(text, f), 0);
	ck_assert_int_eq(fclose(f), 0);
}

/* A file of the double's directory, malloc'd; "" if absent. */
static char *read_file(const char *name)
{
	char path[256], *buf = calloc(1, 4096);
	int fd;
	ssize_t n;

	ck_assert_ptr_nonnull(buf);
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return buf;
	n = read(fd, buf, 4095);
	ck_assert_int_ge(n, 0);
	close(fd);
	return buf;
}

/* Makes pid a CUDA process of the double, in the given state. */
static void mark_cuda(int pid, const char *state)
{
	char name[32], text[32];

	snprintf(name, sizeof(name), "%d", pid);
	snprintf(text, sizeof(text), "%s\n", state);
	write_file(name, text);
}

static void assert_double_state(int pid, const char *state)
{
	char name[32], want[32];
	_cleanup_free_ char *got = NULL;

	snprintf(name, sizeof(name), "%d", pid);
	snprintf(want, sizeof(want), "%s\n", state);
	got = read_file(name);
	ck_assert_str_eq(got, want);
}

static void assert_journal(const char *want)
{
	_cleanup_free_ char *got = read_file("journal");

	ck_assert_str_eq(got, want);
}

#define assert_err_has(e, s) \
	ck_assert_msg(strstr((e).msg, (s)), "\"%s\" not in \"%s\"", (s), (e).msg)

static struct km_gpu *open_double(void)
{
	const char *lib = getenv("KM_CUDA_DOUBLE");
	struct km_error e = { "" };
	struct km_gpu *g = NULL;

	ck_assert_msg(lib, "KM_CUDA_DOUBLE must name libcuda-double.so (meson sets it)");
	ck_assert_msg(km_gpu_open(lib, &g, &e) == 0, "open: %s", e.msg);
	ck_assert(km_gpu_available(g));
	ck_assert_ptr_null(km_gpu_unavailable_reason(g));
	return g;
}

static void pause_ok(struct km_gpu *g, int pid, bool want_cuda)
{
	struct km_error e = { "" };
	bool is_cuda = !want_cuda;

	ck_assert_msg(km_gpu_pause(g, pid, 5000, &is_cuda, &e) == 0, "pause: %s", e.msg);
	ck_assert(is_cuda == want_cuda);
}

static void checkpoint_ok(struct km_gpu *g, int pid)
{
	struct km_error e = { "" };

	ck_assert_msg(km_gpu_checkpoint(g, pid, &e) == 0, "checkpoint: %s", e.msg);
}

static enum km_gpu_state driver_state(struct km_gpu *g, int pid)
{
	struct km_error e = { "" };
	enum km_gpu_state s = KM_GPU_FAILED;

	ck_assert_msg(km_gpu_get_state(g, pid, &s, &e) == 0, "get_state: %s", e.msg);
	return s;
}

START_TEST(test_gpu_state_names)
{
	ck_assert_str_eq(km_gpu_state_name(KM_GPU_NONE), "none");
	ck_assert_str_eq(km_gpu_state_name(KM_GPU_RUNNING), "running");
	ck_assert_str_eq(km_gpu_state_name(KM_GPU_LOCKED), "locked");
	ck_assert_str_eq(km_gpu_state_name(KM_GPU_CHECKPOINTED), "checkpointed");
	ck_assert_str_eq(km_gpu_state_name(KM_GPU_FAILED), "failed");
	ck_assert_str_eq(km_gpu_state_name((enum km_gpu_state)7), "unknown");
}
END_TEST

START_TEST(test_gpu_absent_library)
{
	struct km_error e = { "" };
	struct km_gpu *g = NULL;
	enum km_gpu_state s = KM_GPU_RUNNING;
	bool is_cuda = true;
	pid_t tid;

	ck_assert_int_eq(km_gpu_open("libkm-no-such-cuda.so.1", &g, &e), 0);
	ck_assert(!km_gpu_available(g));
	ck_assert_ptr_nonnull(strstr(km_gpu_unavailable_reason(g), "libkm-no-such-cuda.so.1"));
	ck_assert_int_eq(km_gpu_get_state(g, getpid(), &s, &e), 0);
	ck_assert_int_eq(s, KM_GPU_NONE);
	ck_assert_int_eq(km_gpu_pause(g, getpid(), 1000, &is_cuda, &e), 0);
	ck_assert(!is_cuda);
	ck_assert_int_eq(km_gpu_checkpoint(g, getpid(), &e), 0);
	ck_assert_int_eq(km_gpu_checkpoint(g, 1, &e), 0);
	ck_assert_int_eq(km_gpu_resume(g, getpid(), NULL, 0, &e), 0);
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	ck_assert_int_eq(km_gpu_restore_thread(g, getpid(), &tid, &e), -ENODEV);
	km_gpu_close(g);
	km_gpu_close(NULL);

	/* An explicit path that is not there is a configuration error. */
	g = NULL;
	ck_assert_int_eq(km_gpu_open("/nonexistent/km/libcuda.so.1", &g, &e), -ENOENT);
	ck_assert_ptr_null(g);
	assert_err_has(e, "/nonexistent/km/libcuda.so.1");
}
END_TEST

START_TEST(test_gpu_library_without_checkpoint_api)
{
	static const char stub[] = "/usr/local/cuda/lib64/stubs/libcuda.so";
	struct km_error e = { "" };
	struct km_gpu *g = NULL;

	ck_assert_int_eq(km_gpu_open("libc.so.6", &g, &e), -ENOTSUP);
	ck_assert_ptr_null(g);
	assert_err_has(e, "libc.so.6");
	assert_err_has(e, "cuInit");

	/* The toolkit's stub libcuda (where installed) answers cuInit with STUB_LIBRARY. */
	if (access(stub, R_OK) == 0) {
		ck_assert_msg(km_gpu_open(stub, &g, &e) == 0, "%s", e.msg);
		ck_assert(!km_gpu_available(g));
		ck_assert_ptr_nonnull(
			strstr(km_gpu_unavailable_reason(g), "CUDA_ERROR_STUB_LIBRARY"));
		km_gpu_close(g);
	}
}
END_TEST

START_TEST(test_gpu_cuinit_errors)
{
	const char *lib = getenv("KM_CUDA_DOUBLE");
	struct km_error e = { "" };
	struct km_gpu *g = NULL;

	set_fail("no_device");
	ck_assert_int_eq(km_gpu_open(lib, &g, &e), 0);
	ck_assert(!km_gpu_available(g));
	ck_assert_str_eq(km_gpu_unavailable_reason(g), "cuInit: CUDA_ERROR_NO_DEVICE");
	km_gpu_close(g);

	g = NULL;
	set_fail("init");
	ck_assert_int_eq(km_gpu_open(lib, &g, &e), -ENODEV);
	ck_assert_ptr_null(g);
	ck_assert_str_eq(e.msg, "cuInit: CUDA_ERROR_OPERATING_SYSTEM");
}
END_TEST

START_TEST(test_gpu_non_cuda_pid)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	pid_t tid;

	ck_assert_int_eq(driver_state(g, PID_A), KM_GPU_NONE);
	pause_ok(g, PID_A, false);
	checkpoint_ok(g, PID_A);
	ck_assert_int_eq(km_gpu_restore_thread(g, PID_A, &tid, &e), -ENODEV);
	ck_assert_int_eq(km_gpu_resume(g, PID_A, NULL, 0, &e), 0);
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	/* The driver was never asked to change anything. */
	assert_journal("");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_full_dump_and_resume)
{
	struct km_gpu_pair *pairs = NULL;
	struct km_error e = { "" };
	struct km_gpu *g = open_double();
	size_t n = 0;
	_cleanup_free_ char *lock_args = NULL, *recorded = NULL;

	setenv("KM_CUDA_DOUBLE_GPUS", GPU_A "," GPU_B, 1);
	mark_cuda(PID_A, "running");
	write_file("4242.gpus", GPU_A "\n");
	ck_assert_int_eq(driver_state(g, PID_A), KM_GPU_RUNNING);

	pause_ok(g, PID_A, true);
	assert_double_state(PID_A, "locked");
	ck_assert_int_eq(driver_state(g, PID_A), KM_GPU_LOCKED);
	lock_args = read_file("4242.lock_args");
	ck_assert_str_eq(lock_args, "timeout_ms=5000\n");

	checkpoint_ok(g, PID_A);
	assert_double_state(PID_A, "checkpointed");
	ck_assert_int_eq(driver_state(g, PID_A), KM_GPU_CHECKPOINTED);

	/* A successful dump that does not leave the task running undoes nothing. */
	ck_assert_int_eq(km_gpu_dump_done(g, true, false, &e), 0);
	assert_journal("lock 4242\ncheckpoint 4242\n");
	km_gpu_close(g);

	/* Restore side: a fresh handle, GPU A's state onto GPU B. */
	g = open_double();
	ck_assert_msg(km_gpu_parse_map(GPU_A "=" GPU_B, &pairs, &n, &e) == 0, "%s", e.msg);
	ck_assert_msg(km_gpu_resume(g, PID_A, pairs, n, &e) == 0, "resume: %s", e.msg);
	assert_double_state(PID_A, "running");
	ck_assert_int_eq(driver_state(g, PID_A), KM_GPU_RUNNING);
	assert_journal("lock 4242\ncheckpoint 4242\nrestore 4242\nunlock 4242\n");
	recorded = read_file("4242.pairs");
	ck_assert_str_eq(recorded, GPU_A "=" GPU_B "\n");

	/* Resuming a running process again is a no-op. */
	ck_assert_int_eq(km_gpu_resume(g, PID_A, pairs, n, &e), 0);
	assert_journal("lock 4242\ncheckpoint 4242\nrestore 4242\nunlock 4242\n");
	free(pairs);
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_resume_without_pairs)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	_cleanup_free_ char *recorded = NULL;

	mark_cuda(PID_A, "checkpointed");
	ck_assert_msg(km_gpu_resume(g, PID_A, NULL, 0, &e) == 0, "resume: %s", e.msg);
	assert_double_state(PID_A, "running");
	recorded = read_file("4242.pairs");
	ck_assert_str_eq(recorded, "");
	km_gpu_close(g);
}
END_TEST

static void dump_then_undo(bool dump_ok, bool leave_running)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "running");
	pause_ok(g, PID_A, true);
	checkpoint_ok(g, PID_A);
	ck_assert_msg(km_gpu_dump_done(g, dump_ok, leave_running, &e) == 0, "%s", e.msg);
	assert_double_state(PID_A, "running");
	assert_journal("lock 4242\ncheckpoint 4242\nrestore 4242\nunlock 4242\n");
	/* The handle forgot the dump: a second call does nothing. */
	ck_assert_int_eq(km_gpu_dump_done(g, dump_ok, leave_running, &e), 0);
	assert_journal("lock 4242\ncheckpoint 4242\nrestore 4242\nunlock 4242\n");
	km_gpu_close(g);
}

START_TEST(test_gpu_dump_failure_restores_and_unlocks)
{
	dump_then_undo(false, false);
}
END_TEST

START_TEST(test_gpu_leave_running_restores_and_unlocks)
{
	dump_then_undo(true, true);
}
END_TEST

START_TEST(test_gpu_dump_failure_before_checkpoint_unlocks)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "running");
	pause_ok(g, PID_A, true);
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	assert_double_state(PID_A, "running");
	assert_journal("lock 4242\nunlock 4242\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_already_locked_is_not_unlocked)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "locked");
	pause_ok(g, PID_A, true);
	checkpoint_ok(g, PID_A);
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	/* Restored, but left locked as whoever locked it expects. */
	assert_double_state(PID_A, "locked");
	assert_journal("checkpoint 4242\nrestore 4242\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_already_checkpointed_is_left_alone)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "checkpointed");
	pause_ok(g, PID_A, true);
	checkpoint_ok(g, PID_A);
	ck_assert_int_eq(km_gpu_dump_done(g, false, true, &e), 0);
	assert_double_state(PID_A, "checkpointed");
	assert_journal("");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_pause_twice_locks_once)
{
	struct km_gpu *g = open_double();

	mark_cuda(PID_A, "running");
	pause_ok(g, PID_A, true);
	pause_ok(g, PID_A, true);
	assert_journal("lock 4242\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_lock_timeout)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	bool is_cuda = false;

	mark_cuda(PID_A, "running");
	set_fail("lock_timeout");
	ck_assert_int_eq(km_gpu_pause(g, PID_A, 250, &is_cuda, &e), -ETIMEDOUT);
	assert_err_has(e, "cuCheckpointProcessLock(pid 4242): CUDA_ERROR_TIMEOUT");
	assert_err_has(e, "250 ms");
	assert_double_state(PID_A, "running");
	set_fail(NULL);

	/* Not locked, so it cannot be checkpointed, and nothing is undone. */
	e.msg[0] = 0;
	ck_assert_int_eq(km_gpu_checkpoint(g, PID_A, &e), -EINVAL);
	assert_err_has(e, "running");
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	assert_double_state(PID_A, "running");
	assert_journal("lock 4242 CUDA_ERROR_TIMEOUT\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_lock_error)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	bool is_cuda = false;

	mark_cuda(PID_A, "running");
	set_fail("lock");
	ck_assert_int_eq(km_gpu_pause(g, PID_A, 0, &is_cuda, &e), -EPROTO);
	ck_assert_str_eq(e.msg, "cuCheckpointProcessLock(pid 4242): CUDA_ERROR_NOT_SUPPORTED");
	assert_double_state(PID_A, "running");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_checkpoint_error_then_undo)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "running");
	pause_ok(g, PID_A, true);
	set_fail("checkpoint");
	ck_assert_int_eq(km_gpu_checkpoint(g, PID_A, &e), -EPROTO);
	ck_assert_str_eq(e.msg,
			 "cuCheckpointProcessCheckpoint(pid 4242): CUDA_ERROR_NOT_SUPPORTED");
	assert_double_state(PID_A, "locked");
	set_fail(NULL);

	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	assert_double_state(PID_A, "running");
	assert_journal("lock 4242\ncheckpoint 4242 CUDA_ERROR_NOT_SUPPORTED\nunlock 4242\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_restore_error_at_resume)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "checkpointed");
	set_fail("restore");
	ck_assert_int_eq(km_gpu_resume(g, PID_A, NULL, 0, &e), -EPROTO);
	ck_assert_str_eq(e.msg, "cuCheckpointProcessRestore(pid 4242): CUDA_ERROR_OUT_OF_MEMORY");
	/* Still checkpointed, and not unlocked. */
	assert_double_state(PID_A, "checkpointed");
	assert_journal("restore 4242 CUDA_ERROR_OUT_OF_MEMORY\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_unlock_error)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	/* In the undo of a dump. */
	mark_cuda(PID_A, "running");
	pause_ok(g, PID_A, true);
	checkpoint_ok(g, PID_A);
	set_fail("unlock");
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), -EPROTO);
	ck_assert_str_eq(e.msg, "cuCheckpointProcessUnlock(pid 4242): CUDA_ERROR_UNKNOWN");
	assert_double_state(PID_A, "locked");

	/* At resume. */
	mark_cuda(PID_B, "checkpointed");
	e.msg[0] = 0;
	ck_assert_int_eq(km_gpu_resume(g, PID_B, NULL, 0, &e), -EPROTO);
	ck_assert_str_eq(e.msg, "cuCheckpointProcessUnlock(pid 4343): CUDA_ERROR_UNKNOWN");
	assert_double_state(PID_B, "locked");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_dump_done_keeps_going)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	_cleanup_free_ char *journal = NULL;

	mark_cuda(PID_A, "running");
	mark_cuda(PID_B, "running");
	pause_ok(g, PID_A, true);
	pause_ok(g, PID_B, true);
	checkpoint_ok(g, PID_A);
	checkpoint_ok(g, PID_B);
	set_fail("restore:4242");
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), -EPROTO);
	assert_err_has(e, "pid 4242");
	assert_err_has(e, "CUDA_ERROR_OUT_OF_MEMORY");
	assert_double_state(PID_A, "checkpointed");
	assert_double_state(PID_B, "running");
	journal = read_file("journal");
	ck_assert_str_eq(journal,
			 "lock 4242\nlock 4343\ncheckpoint 4242\ncheckpoint 4343\n"
			 "restore 4242 CUDA_ERROR_OUT_OF_MEMORY\nrestore 4343\nunlock 4343\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_checkpoint_without_pause)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "running");
	ck_assert_int_eq(km_gpu_checkpoint(g, PID_A, &e), -EINVAL);
	assert_err_has(e, "pid 4242");
	assert_err_has(e, "pause");
	assert_double_state(PID_A, "running");

	/* Nor twice. */
	pause_ok(g, PID_A, true);
	checkpoint_ok(g, PID_A);
	e.msg[0] = 0;
	ck_assert_int_eq(km_gpu_checkpoint(g, PID_A, &e), -EINVAL);
	assert_err_has(e, "checkpointed");
	assert_journal("lock 4242\ncheckpoint 4242\n");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_became_cuda_after_pause)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	pause_ok(g, PID_A, false);
	mark_cuda(PID_A, "running");
	ck_assert_int_eq(km_gpu_checkpoint(g, PID_A, &e), -EAGAIN);
	assert_err_has(e, "retry");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_query_errors)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	enum km_gpu_state s;
	bool is_cuda;

	mark_cuda(PID_A, "running");
	set_fail("get_state");
	ck_assert_int_eq(km_gpu_get_state(g, PID_A, &s, &e), -EPROTO);
	ck_assert_str_eq(e.msg, "cuCheckpointProcessGetState(pid 4242): CUDA_ERROR_UNKNOWN");
	ck_assert_int_eq(km_gpu_pause(g, PID_A, 1000, &is_cuda, &e), -EPROTO);

	set_fail("restore_thread");
	ck_assert_int_eq(km_gpu_get_state(g, PID_A, &s, &e), -EPROTO);
	ck_assert_str_eq(e.msg,
			 "cuCheckpointProcessGetRestoreThreadId(pid 4242): CUDA_ERROR_UNKNOWN");
	assert_journal("");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_failed_state)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	bool is_cuda;

	mark_cuda(PID_A, "failed");
	ck_assert_int_eq(driver_state(g, PID_A), KM_GPU_FAILED);
	ck_assert_int_eq(km_gpu_pause(g, PID_A, 1000, &is_cuda, &e), -ENODEV);
	assert_err_has(e, "failed");
	ck_assert_int_eq(km_gpu_resume(g, PID_A, NULL, 0, &e), -ENODEV);
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_resume_leaves_running_and_locked_alone)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };

	mark_cuda(PID_A, "running");
	mark_cuda(PID_B, "locked");
	ck_assert_int_eq(km_gpu_resume(g, PID_A, NULL, 0, &e), 0);
	ck_assert_int_eq(km_gpu_resume(g, PID_B, NULL, 0, &e), 0);
	assert_double_state(PID_A, "running");
	assert_double_state(PID_B, "locked");
	assert_journal("");
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_parse_map)
{
	static const unsigned char a[16] = { 0x0a, 0x1b, 0x2c, 0x3d, 0x00, 0x00, 0x11, 0x11,
					     0x22, 0x22, 0x33, 0x33, 0x44, 0x44, 0x55, 0x55 };
	static const unsigned char b[16] = { 0xbb, 0xbb, 0xbb, 0xbb, 0xcc, 0xcc, 0xdd, 0xdd,
					     0xee, 0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	static const struct {
		const char *map;
		const char *error;
	} bad[] = {
		{ "", "empty GPU map" },
		{ " \t", "empty GPU map" },
		{ GPU_A, "missing '='" },
		{ GPU_A "=" GPU_B ",", "item 2 is empty" },
		{ GPU_A "=" GPU_B ", ," GPU_B "=" GPU_A, "item 2 is empty" },
		{ "GPU-0a1b2c3d-0000-1111-2222-33334444555g=" GPU_B,
		  "bad GPU UUID \"GPU-0a1b2c3d" },
		{ GPU_A "=GPU-bbbbbbbb-cccc-dddd-eeee-fffffffffff", "bad GPU UUID" },	/* short */
		{ GPU_A "=GPU-bbbbbbbb-cccc-dddd-eeee-ffffffffffff0", "bad GPU UUID" }, /* long */
		{ GPU_A "=GPU-bbbbbbb-bcccc-dddd-eeee-ffffffffffff", "bad GPU UUID" },	/* dash */
		{ GPU_A "=GPU-bbbbbbbb--cccc-dddd-eeee-ffffffffffff", "bad GPU UUID" },
		{ GPU_A "=GPU-bbbbbbbb-cccc-dddd-eeee-ffffffffffff-", "bad GPU UUID" },
		{ GPU_A "=", "bad GPU UUID \"\"" },
		{ GPU_A "=" GPU_B "=" GPU_C, "bad GPU UUID" },
		{ GPU_A "=" GPU_B "," GPU_A "=" GPU_C, "mapped twice" },
	};
	struct km_gpu_pair *pairs = NULL;
	struct km_error e = { "" };
	size_t n = 0;

	ck_assert_msg(km_gpu_parse_map(GPU_A "=" GPU_B, &pairs, &n, &e) == 0, "%s", e.msg);
	ck_assert_uint_eq(n, 1);
	ck_assert_mem_eq(pairs[0].from, a, 16);
	ck_assert_mem_eq(pairs[0].to, b, 16);
	free(pairs);

	/* Prefix and dashes optional, upper case hex, blanks around items. */
	ck_assert_msg(km_gpu_parse_map(" 0A1B2C3D000011112222333344445555 = " GPU_B
				       " ,\tGPU-bbbbbbbbccccddddeeeeffffffffffff=" GPU_A,
				       &pairs, &n, &e) == 0,
		      "%s", e.msg);
	ck_assert_uint_eq(n, 2);
	ck_assert_mem_eq(pairs[0].from, a, 16);
	ck_assert_mem_eq(pairs[0].to, b, 16);
	ck_assert_mem_eq(pairs[1].from, b, 16);
	ck_assert_mem_eq(pairs[1].to, a, 16);
	free(pairs);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		pairs = NULL;
		n = 99;
		e.msg[0] = 0;
		ck_assert_msg(km_gpu_parse_map(bad[i].map, &pairs, &n, &e) == -EINVAL,
			      "\"%s\" parsed", bad[i].map);
		ck_assert_ptr_null(pairs);
		ck_assert_uint_eq(n, 99);
		ck_assert_msg(strstr(e.msg, bad[i].error), "\"%s\": \"%s\" not in \"%s\"",
			      bad[i].map, bad[i].error, e.msg);
	}
	ck_assert_int_eq(km_gpu_parse_map(NULL, &pairs, &n, &e), -EINVAL);
}
END_TEST

START_TEST(test_gpu_remap_errors)
{
	struct km_gpu_pair *pairs = NULL;
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	size_t n;

	setenv("KM_CUDA_DOUBLE_GPUS", GPU_A "," GPU_B, 1);
	mark_cuda(PID_A, "checkpointed");
	write_file("4242.gpus", GPU_A);

	/* Onto a GPU this host does not have. */
	ck_assert_int_eq(km_gpu_parse_map(GPU_A "=" GPU_C, &pairs, &n, &e), 0);
	ck_assert_int_eq(km_gpu_resume(g, PID_A, pairs, n, &e), -EPROTO);
	ck_assert_str_eq(e.msg, "cuCheckpointProcessRestore(pid 4242): CUDA_ERROR_INVALID_DEVICE "
				"(with 1 GPU pair)");
	assert_double_state(PID_A, "checkpointed");
	free(pairs);

	/* From a GPU the process did not use. */
	ck_assert_int_eq(km_gpu_parse_map(GPU_B "=" GPU_A, &pairs, &n, &e), 0);
	ck_assert_int_eq(km_gpu_resume(g, PID_A, pairs, n, &e), -EPROTO);
	assert_err_has(e, "CUDA_ERROR_INVALID_VALUE");
	assert_double_state(PID_A, "checkpointed");
	free(pairs);

	assert_journal(
		"restore 4242 CUDA_ERROR_INVALID_DEVICE\nrestore 4242 CUDA_ERROR_INVALID_VALUE\n");
	km_gpu_close(g);
}
END_TEST

struct hook_log {
	int calls;
	pid_t pid[8], tid[8];
	bool start[8];
	char journal_at[8][256]; /* the double's journal when the hook ran */
	int fail_start;		 /* returned by start=true calls */
};

static int hook(void *userdata, pid_t pid, pid_t tid, bool start)
{
	struct hook_log *log = userdata;
	_cleanup_free_ char *journal = read_file("journal");

	ck_assert_int_lt(log->calls, 8);
	log->pid[log->calls] = pid;
	log->tid[log->calls] = tid;
	log->start[log->calls] = start;
	snprintf(log->journal_at[log->calls], sizeof(log->journal_at[0]), "%s", journal);
	log->calls++;
	return start ? log->fail_start : 0;
}

START_TEST(test_gpu_thread_hook)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	struct hook_log log = { 0 };
	pid_t me = getpid(), tid = 0;

	km_gpu_set_thread_hook(g, hook, &log);
	mark_cuda(me, "running");
	ck_assert_int_eq(km_gpu_restore_thread(g, me, &tid, &e), 0);
	ck_assert_int_eq(tid, me);

	/* No hook around the lock: the process is not frozen yet. */
	pause_ok(g, me, true);
	ck_assert_int_eq(log.calls, 0);

	checkpoint_ok(g, me);
	ck_assert_int_eq(log.calls, 2);
	ck_assert(log.start[0] && !log.start[1]);
	ck_assert_int_eq(log.pid[0], me);
	ck_assert_int_eq(log.tid[0], me);
	ck_assert_int_eq(log.tid[1], me);
	ck_assert_ptr_null(strstr(log.journal_at[0], "checkpoint"));
	ck_assert_ptr_nonnull(strstr(log.journal_at[1], "checkpoint"));

	/* One start/stop around restore and unlock together. */
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	ck_assert_int_eq(log.calls, 4);
	ck_assert(log.start[2] && !log.start[3]);
	ck_assert_int_eq(log.tid[2], me);
	ck_assert_ptr_null(strstr(log.journal_at[2], "restore"));
	ck_assert_ptr_nonnull(strstr(log.journal_at[3], "restore"));
	ck_assert_ptr_nonnull(strstr(log.journal_at[3], "unlock"));

	/* And at resume. */
	mark_cuda(me, "checkpointed");
	ck_assert_int_eq(km_gpu_resume(g, me, NULL, 0, &e), 0);
	ck_assert_int_eq(log.calls, 6);
	ck_assert(log.start[4] && !log.start[5]);
	ck_assert_int_eq(log.tid[5], me);
	assert_double_state(me, "running");

	/* Without a hook, nothing is called. */
	km_gpu_set_thread_hook(g, NULL, NULL);
	pause_ok(g, PID_A, false);
	mark_cuda(me, "checkpointed");
	ck_assert_int_eq(km_gpu_resume(g, me, NULL, 0, &e), 0);
	ck_assert_int_eq(log.calls, 6);
	km_gpu_close(g);
}
END_TEST

START_TEST(test_gpu_thread_hook_errors)
{
	struct km_gpu *g = open_double();
	struct km_error e = { "" };
	struct hook_log log = { .fail_start = -EPERM };
	pid_t me = getpid();
	char want[128];

	km_gpu_set_thread_hook(g, hook, &log);
	mark_cuda(me, "running");
	pause_ok(g, me, true);

	/* A start that fails: no driver call, no stop. */
	ck_assert_int_eq(km_gpu_checkpoint(g, me, &e), -EPERM);
	assert_err_has(e, "restore thread");
	ck_assert_int_eq(log.calls, 1);
	assert_double_state(me, "locked");

	/* No restore thread id: the error names the CUDA error, the hook is not called. */
	log.fail_start = 0;
	set_fail("restore_thread");
	ck_assert_int_eq(km_gpu_checkpoint(g, me, &e), -EPROTO);
	snprintf(want, sizeof(want),
		 "cuCheckpointProcessGetRestoreThreadId(pid %d): CUDA_ERROR_UNKNOWN", (int)me);
	ck_assert_str_eq(e.msg, want);
	ck_assert_int_eq(log.calls, 1);
	set_fail(NULL);

	checkpoint_ok(g, me);
	ck_assert_int_eq(log.calls, 3);
	ck_assert_int_eq(km_gpu_dump_done(g, false, false, &e), 0);
	assert_double_state(me, "running");
	km_gpu_close(g);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("gpu");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_gpu_state_names);
	tcase_add_test(tc, test_gpu_absent_library);
	tcase_add_test(tc, test_gpu_library_without_checkpoint_api);
	tcase_add_test(tc, test_gpu_cuinit_errors);
	tcase_add_test(tc, test_gpu_non_cuda_pid);
	tcase_add_test(tc, test_gpu_full_dump_and_resume);
	tcase_add_test(tc, test_gpu_resume_without_pairs);
	tcase_add_test(tc, test_gpu_dump_failure_restores_and_unlocks);
	tcase_add_test(tc, test_gpu_leave_running_restores_and_unlocks);
	tcase_add_test(tc, test_gpu_dump_failure_before_checkpoint_unlocks);
	tcase_add_test(tc, test_gpu_already_locked_is_not_unlocked);
	tcase_add_test(tc, test_gpu_already_checkpointed_is_left_alone);
	tcase_add_test(tc, test_gpu_pause_twice_locks_once);
	tcase_add_test(tc, test_gpu_lock_timeout);
	tcase_add_test(tc, test_gpu_lock_error);
	tcase_add_test(tc, test_gpu_checkpoint_error_then_undo);
	tcase_add_test(tc, test_gpu_restore_error_at_resume);
	tcase_add_test(tc, test_gpu_unlock_error);
	tcase_add_test(tc, test_gpu_dump_done_keeps_going);
	tcase_add_test(tc, test_gpu_checkpoint_without_pause);
	tcase_add_test(tc, test_gpu_became_cuda_after_pause);
	tcase_add_test(tc, test_gpu_query_errors);
	tcase_add_test(tc, test_gpu_failed_state);
	tcase_add_test(tc, test_gpu_resume_leaves_running_and_locked_alone);
	tcase_add_test(tc, test_gpu_parse_map);
	tcase_add_test(tc, test_gpu_remap_errors);
	tcase_add_test(tc, test_gpu_thread_hook);
	tcase_add_test(tc, test_gpu_thread_hook_errors);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
