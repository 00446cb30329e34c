/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * migrate: the dump.log parser behind the report's stop phases, and the
 * checks that fail a migration before anything is touched. The migration
 * itself runs on the real CRIU in tests/integration/migrate.sh.
 */
#include <check.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "km-check.h"

#include "migrate.h"
#include "store.h"

static int log_fd(const char *text)
{
	char path[] = "/tmp/km-test-migrate-XXXXXX";
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	unlink(path);
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	ck_assert_int_eq(lseek(fd, 0, SEEK_SET), 0);
	return fd;
}

#define MS 1000000ull

START_TEST(test_migrate_parse_dump_log)
{
	/* CRIU's order: seize (with the plugin's quiesce inside), checkpoint, dump, split */
	const char *text =
		"(00.030000) kvmotion: dump: store /s, split on, GPU none, config /dev/null+env\n"
		"(00.040000) ========================================\n"
		"(00.040010) Dumping processes (pid: 42 comm: engine)\n"
		"(00.040020) ========================================\n"
		"(00.041000) Seized task 42, state 1\n"
		"(00.061000) kvmotion: engine in pid 42 quiesced in 0.020 s: 1 weights files, 3 free KV blocks (1 bytes) released\n"
		"(00.062000) Collected (4 attempts, 0 in_progress)\n"
		"(00.065010) Collected 42 in 1 state\n"
		"(00.066000) kvmotion: GPU state of 42 checkpointed in 0.150 s\n"
		"(00.216000) Dumping task (pid: 42 comm: engine)\n"
		"(00.300000) Collected something later that is not the seize\n"
		"(00.400000) kvmotion: split 2 files in 0.125 s: 10 bytes referenced in the store, 0 zero, 5 to the delta (3 compressed), 0 added to the store\n";
	struct km_migrate_report r = { 0 };
	int fd = log_fd(text);

	ck_assert_int_eq(km_migrate_parse_dump_log(fd, 600 * MS, &r), 0);
	close(fd);
	ck_assert_uint_eq(r.quiesce_ns, 20 * MS);
	ck_assert_uint_eq(r.gpu_checkpoint_ns, 150 * MS);
	ck_assert_uint_eq(r.split_ns, 125 * MS);
	/* 65.010 - 40.010 ms, less the quiesce inside it */
	ck_assert_uint_ge(r.freeze_ns, 5 * MS - 1000);
	ck_assert_uint_le(r.freeze_ns, 5 * MS + 1000);
	ck_assert_uint_eq(r.dump_ns,
			  600 * MS - r.quiesce_ns - r.freeze_ns - r.gpu_checkpoint_ns - r.split_ns);
}
END_TEST

START_TEST(test_migrate_parse_dump_log_empty)
{
	struct km_migrate_report r = { 0 };
	int fd = log_fd("(00.001000) Error (criu/cr-dump.c:2111): Dumping FAILED.\nno stamp\n");

	ck_assert_int_eq(km_migrate_parse_dump_log(fd, 7 * MS, &r), 0);
	close(fd);
	ck_assert_uint_eq(r.quiesce_ns + r.freeze_ns + r.gpu_checkpoint_ns + r.split_ns, 0);
	ck_assert_uint_eq(r.dump_ns, 7 * MS);
	/* phases longer than the measured total (clock skew): dump is 0, not negative */
	fd = log_fd("(00.000000) kvmotion: split 1 files in 9.000 s: x\n");
	ck_assert_int_eq(km_migrate_parse_dump_log(fd, 7 * MS, &r), 0);
	close(fd);
	ck_assert_uint_eq(r.dump_ns, 0);
}
END_TEST

/* Failures before the stop touch nothing: the process is this test itself. */
START_TEST(test_migrate_refusals_before_the_stop)
{
	char dir[] = "/tmp/km-test-migrate-XXXXXX", store[128], work[128], junk[160];
	struct km_migrate_opts o = { 0 };
	struct km_migrate_report r;
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	int fd;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(store, sizeof(store), "%s/store", dir);
	snprintf(work, sizeof(work), "%s/work", dir);
	ck_assert_int_eq(km_store_open(store, KM_STORE_CREATE | KM_STORE_NOSYNC, NULL, &s), 0);
	km_store_free(s);

	ck_assert_int_eq(km_migrate(&o, &r, &err), -EINVAL);

	o.pid = getpid();
	o.to = "127.0.0.1:1";
	o.store = store;
	o.work = work;
	o.client.tls.psk_file = "/nonexistent/psk";
	/* nothing listens there (or no key): an error, and nothing was stopped */
	ck_assert_int_lt(km_migrate(&o, &r, &err), 0);
	ck_assert(!r.resumed);
	ck_assert_int_eq(r.restored_pid, 0);
	ck_assert_uint_eq(r.stop_ns, 0);
	ck_assert(r.why[0] != 0);
	ck_assert(!r.cooperative);

	/* a leftover image directory is never mixed with a new dump */
	snprintf(junk, sizeof(junk), "%s/img/core-1.img", work);
	fd = open(junk, O_CREAT | O_WRONLY, 0600);
	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_int_eq(km_migrate(&o, &r, &err), -EEXIST);
	ck_assert_ptr_nonnull(strstr(err.msg, "not empty"));

	/* no such process */
	o.pid = 0x3ffffff0;
	ck_assert_int_eq(km_migrate(&o, &r, &err), -ESRCH);

	/* a weights index the store lacks: refused before connecting */
	unlink(junk);
	o.pid = getpid();
	o.weights_index = "no-such-index";
	o.client.tls.psk_file = NULL;
	ck_assert_int_lt(km_migrate(&o, &r, &err), 0);
	ck_assert(!r.resumed);

	unlink(junk);
	{
		char cmd[256];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		ck_assert_int_eq(system(cmd), 0);
	}
}
END_TEST

START_TEST(test_migrate_phase_names)
{
	ck_assert_str_eq(km_migrate_phase_name(KM_MIGRATE_PRECOPY), "pre-copy");
	ck_assert_str_eq(km_migrate_phase_name(KM_MIGRATE_RESUME), "resume");
	ck_assert_str_eq(km_migrate_phase_name((enum km_migrate_phase)99), "unknown");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("migrate");
	TCase *tc = tcase_create("migrate");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_migrate_parse_dump_log);
	tcase_add_test(tc, test_migrate_parse_dump_log_empty);
	tcase_add_test(tc, test_migrate_refusals_before_the_stop);
	tcase_add_test(tc, test_migrate_phase_names);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
