/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * util: km_task_dumped_bytes, the plugin's estimate of what CRIU writes for
 * a task (its free-space check), measured on this test's own memory; and
 * km_wait_child, the bounded wait for podman and criu restore.
 */
#include <check.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "km-check.h"

#include "util.h"

#define MIB (1u << 20)

static uint64_t dumped(void)
{
	uint64_t n = 0;

	ck_assert_int_eq(km_task_dumped_bytes(getpid(), &n), 0);
	return n;
}

/* A file of 'size' bytes, unlinked later by the caller's path. */
static int make_file(char *path, size_t size)
{
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	for (size_t off = 0; off < size; off += MIB) {
		static char buf[MIB];

		memset(buf, 0x5a, sizeof(buf));
		ck_assert_int_eq(pwrite(fd, buf, MIB, (off_t)off), MIB);
	}
	return fd;
}

START_TEST(test_util_dumped_bytes)
{
	char path[] = "/tmp/km-test-util-XXXXXX";
	volatile uint8_t sum = 0;
	uint64_t before, after;
	uint8_t *anon, *shared, *priv;
	int fd = make_file(path, 64 * MIB);

	/* anonymous memory, touched: all of it counts */
	before = dumped();
	anon = mmap(NULL, 32 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(anon, MAP_FAILED);
	memset(anon, 1, 32 * MIB);
	after = dumped();
	ck_assert_uint_ge(after - before, 31 * MIB);

	/* a shared read-only file mapping read through (a weights file): none of it */
	before = after;
	shared = mmap(NULL, 64 * MIB, PROT_READ, MAP_SHARED, fd, 0);
	ck_assert_ptr_ne(shared, MAP_FAILED);
	for (size_t i = 0; i < 64 * MIB; i += 4096)
		sum += shared[i];
	after = dumped();
	ck_assert_uint_lt(after > before ? after - before : 0, 2 * MIB);

	/* a private file mapping: only the pages written (copied) count */
	before = after;
	priv = mmap(NULL, 64 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	ck_assert_ptr_ne(priv, MAP_FAILED);
	for (size_t i = 0; i < 64 * MIB; i += 4096)
		sum += priv[i];
	memset(priv, 2, 8 * MIB);
	after = dumped();
	ck_assert_uint_ge(after - before, 8 * MIB);
	ck_assert_uint_lt(after - before, 10 * MIB);

	/* a deleted file's mapping: CRIU dumps it (a ghost file), so all of it */
	before = after;
	ck_assert_int_eq(unlink(path), 0);
	after = dumped();
	ck_assert_uint_ge(after - before, 60 * MIB);

	munmap(anon, 32 * MIB);
	munmap(shared, 64 * MIB);
	munmap(priv, 64 * MIB);
	close(fd);
	(void)sum;
}
END_TEST

START_TEST(test_util_dumped_bytes_no_task)
{
	uint64_t n = 7;

	/* pid 0 has no /proc entry */
	ck_assert_int_lt(km_task_dumped_bytes(0, &n), 0);
	ck_assert_uint_eq(n, 7);
}
END_TEST

static pid_t spawn(const char *what)
{
	pid_t pid = fork();

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		if (strcmp(what, "hang") == 0)
			pause();
		_exit(strcmp(what, "fail") == 0 ? 3 : 0);
	}
	return pid;
}

START_TEST(test_util_wait_child)
{
	struct timespec t0, t1;
	int status = -1;

	ck_assert_int_eq(km_wait_child(spawn("ok"), 5, &status), 0);
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	ck_assert_int_eq(km_wait_child(spawn("fail"), 5, &status), 0);
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 3);
	/* one that never ends: killed and reaped once its second is over */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ck_assert_int_eq(km_wait_child(spawn("hang"), 1, &status), -ETIMEDOUT);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
	ck_assert_int_ge(t1.tv_sec - t0.tv_sec, 1);
	ck_assert_int_le(t1.tv_sec - t0.tv_sec, 3);
	/* not a child of ours */
	ck_assert_int_eq(km_wait_child(1, 1, &status), -ECHILD);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("util");
	TCase *tc = tcase_create("core");

	tcase_add_test(tc, test_util_dumped_bytes);
	tcase_add_test(tc, test_util_dumped_bytes_no_task);
	tcase_add_test(tc, test_util_wait_child);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
