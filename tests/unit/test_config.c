/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "km-check.h"

#include "config.h"

static const char *const env_vars[] = {
	"KVMOTION_CONFIG", "KVMOTION_STORE", "KVMOTION_SPLIT", "KVMOTION_SPLIT_COMM",
	"KVMOTION_ADD_CHUNKS", "KVMOTION_MIN_SPLIT_SIZE", "KVMOTION_CHUNK_MIN",
	"KVMOTION_CHUNK_AVG", "KVMOTION_CHUNK_MAX", "KVMOTION_DELTA_LEVEL", "KVMOTION_THREADS",
	"KVMOTION_SYNC", "KVMOTION_GPU_MAP", "KVMOTION_LIBCUDA", "KVMOTION_LOCK_TIMEOUT_MS",
	"KVMOTION_LEAVE_RUNNING", "KVMOTION_SPLIT_ENGINES", "KVMOTION_QUIESCE_TIMEOUT_MS",
	"KVMOTION_WEIGHTS_DIR", "KVMOTION_SPLIT_FOLLOW",
};

static void clear_env(void)
{
	for (size_t i = 0; i < sizeof(env_vars) / sizeof(env_vars[0]); i++)
		unsetenv(env_vars[i]);
}

/* A config file with these contents; the path is returned in path. */
static void write_conf(char path[64], const char *text)
{
	int fd;

	strcpy(path, "/tmp/km-test-config-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
}

START_TEST(test_config_defaults)
{
	struct km_config c;
	struct km_error err = { { 0 } };
	char path[64];

	clear_env();
	write_conf(path, "");
	km_config_init(&c);
	ck_assert_int_eq(km_config_load(&c, path, &err), 0);
	ck_assert_str_eq(c.store, KM_STORE_PATH_DEFAULT);
	ck_assert_int_eq(c.split, KM_AUTO);
	ck_assert(c.sync);
	ck_assert(!c.add_chunks);
	ck_assert(c.split_follow);
	ck_assert_uint_eq(c.lock_timeout_ms, 8000);
	ck_assert_uint_eq(c.chunker.avg_size, KM_CHUNK_AVG_DEFAULT);
	ck_assert_str_eq(c.libcuda, "libcuda.so.1");
	unlink(path);
}
END_TEST

START_TEST(test_config_file_then_env)
{
	struct km_config c;
	struct km_error err = { { 0 } };
	char path[64];

	clear_env();
	write_conf(path, "# a comment\n"
			 "store = /srv/store   # trailing comment\n"
			 "\n"
			 "split = yes\n"
			 "split_comm = engine,python3\n"
			 "min_split_size = 4M\n"
			 "chunk_min = 16K\n chunk_avg=64K\nchunk_max = 256K\n"
			 "sync = no\n"
			 "split_follow = yes\n"
			 "gpu_map = GPU-1=GPU-2\n");
	setenv("KVMOTION_SPLIT_FOLLOW", "no", 1);
	setenv("KVMOTION_STORE", "/env/store", 1);
	setenv("KVMOTION_THREADS", "3", 1);
	km_config_init(&c);
	ck_assert_msg(km_config_load(&c, path, &err) == 0, "%s", err.msg);
	ck_assert_str_eq(c.store, "/env/store"); /* the environment wins */
	ck_assert_int_eq(c.split, KM_YES);
	ck_assert_uint_eq(c.min_split_size, 4u << 20);
	ck_assert_uint_eq(c.chunker.min_size, 16u << 10);
	ck_assert_uint_eq(c.chunker.avg_size, 64u << 10);
	ck_assert_uint_eq(c.chunker.max_size, 256u << 10);
	ck_assert(!c.sync);
	ck_assert(!c.split_follow);
	ck_assert_uint_eq(c.threads, 3);
	ck_assert_str_eq(c.gpu_map, "GPU-1=GPU-2");
	ck_assert(strstr(c.source, path) && strstr(c.source, "+env"));
	ck_assert(km_config_wants_comm(&c, "engine"));
	ck_assert(km_config_wants_comm(&c, "python3"));
	ck_assert(!km_config_wants_comm(&c, "python"));
	ck_assert(!km_config_wants_comm(&c, "engine2"));
	clear_env();
	unlink(path);
}
END_TEST

static void expect_bad(const char *text, const char *msg_part)
{
	struct km_config c;
	struct km_error err = { { 0 } };
	char path[64];

	clear_env();
	write_conf(path, text);
	km_config_init(&c);
	ck_assert_int_eq(km_config_load(&c, path, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, msg_part), "'%s' lacks '%s'", err.msg, msg_part);
	unlink(path);
}

START_TEST(test_config_rejects_bad_input)
{
	expect_bad("store = relative/path\n", "store");
	expect_bad("split = maybe\n", "split");
	expect_bad("split_follow = sometimes\n", "split_follow");
	expect_bad("no equals sign\n", ":1: expected 'key = value'");
	expect_bad("\n\nfrobnicate = 1\n", ":3");
	expect_bad("threads = -1\n", "threads");
	expect_bad("chunk_avg = 3000\n", "chunk sizes");
	expect_bad("min_split_size = 12Q\n", "min_split_size");
}
END_TEST

START_TEST(test_config_env_errors_and_missing_file)
{
	struct km_config c;
	struct km_error err = { { 0 } };

	clear_env();
	setenv("KVMOTION_SPLIT", "sometimes", 1);
	km_config_init(&c);
	ck_assert_int_eq(km_config_load(&c, "/nonexistent/kvmotion.conf", &err), -ENOENT);
	km_config_init(&c);
	setenv("KVMOTION_CONFIG", "/dev/null", 1);
	ck_assert_int_eq(km_config_load(&c, NULL, &err), -EINVAL);
	ck_assert(strstr(err.msg, "$KVMOTION_SPLIT"));
	clear_env();
}
END_TEST

START_TEST(test_config_empty_comm_list_selects_all)
{
	struct km_config c;

	km_config_init(&c);
	ck_assert(km_config_wants_comm(&c, "anything"));
	ck_assert(km_config_wants_comm(&c, ""));
}
END_TEST

static void assert_same_settings(const struct km_config *a, const struct km_config *b)
{
	ck_assert_str_eq(a->store, b->store);
	ck_assert_int_eq(a->split, b->split);
	ck_assert_str_eq(a->split_comm, b->split_comm);
	ck_assert_int_eq(a->add_chunks, b->add_chunks);
	ck_assert_int_eq(a->split_engines, b->split_engines);
	ck_assert_int_eq(a->late_weights, b->late_weights);
	ck_assert_int_eq(a->split_follow, b->split_follow);
	ck_assert_uint_eq(a->min_split_size, b->min_split_size);
	ck_assert_uint_eq(a->chunker.min_size, b->chunker.min_size);
	ck_assert_uint_eq(a->chunker.avg_size, b->chunker.avg_size);
	ck_assert_uint_eq(a->chunker.max_size, b->chunker.max_size);
	ck_assert_int_eq(a->delta_level, b->delta_level);
	ck_assert_uint_eq(a->threads, b->threads);
	ck_assert_int_eq(a->sync, b->sync);
	ck_assert_str_eq(a->gpu_map, b->gpu_map);
	ck_assert_str_eq(a->libcuda, b->libcuda);
	ck_assert_uint_eq(a->lock_timeout_ms, b->lock_timeout_ms);
	ck_assert_uint_eq(a->quiesce_timeout_ms, b->quiesce_timeout_ms);
	ck_assert_str_eq(a->weights_dir, b->weights_dir);
	ck_assert_int_eq(a->leave_running, b->leave_running);
}

/*
 * The installed /etc/kvmotion/kvmotion.conf (criu-hooks/kvmotion.conf)
 * loads as it is, and with every "# key = value" line uncommented it still
 * loads and changes nothing: its lines name real keys with the defaults.
 */
START_TEST(test_config_installed_template)
{
	const char *src = getenv("KM_SOURCE_DIR");
	struct km_config defaults, c;
	struct km_error err = { { 0 } };
	char template[4096], path[64], line[512], key[64];
	FILE *in, *out;
	int fd, keys = 0;

	ck_assert_msg(src, "KM_SOURCE_DIR is not set (tests/meson.build sets it)");
	snprintf(template, sizeof(template), "%s/criu-hooks/kvmotion.conf", src);
	clear_env();
	km_config_init(&defaults);
	km_config_init(&c);
	ck_assert_int_eq(km_config_load(&c, template, &err), 0);
	assert_same_settings(&c, &defaults);

	strcpy(path, "/tmp/km-test-config-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	out = fdopen(fd, "w");
	in = fopen(template, "r");
	ck_assert(out && in);
	while (fgets(line, sizeof(line), in)) {
		int n = 0;

		if (sscanf(line, "# %63[a-z_] =%n", key, &n) == 1 && n > 0) {
			fputs(line + 2, out);
			keys++;
		}
	}
	fclose(in);
	fclose(out);
	ck_assert_int_ge(keys, 18);
	km_config_init(&c);
	ck_assert_msg(km_config_load(&c, path, &err) == 0, "%s", err.msg);
	assert_same_settings(&c, &defaults);
	unlink(path);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("config");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_config_defaults);
	tcase_add_test(tc, test_config_file_then_env);
	tcase_add_test(tc, test_config_rejects_bad_input);
	tcase_add_test(tc, test_config_env_errors_and_missing_file);
	tcase_add_test(tc, test_config_empty_comm_list_selects_all);
	tcase_add_test(tc, test_config_installed_template);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
