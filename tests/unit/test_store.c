/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The chunk store: layout, integrity checks, concurrency, roots and gc. */
#include <check.h>

#include "km-check.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "format.h"
#include "store.h"

#define NOSYNC KM_STORE_NOSYNC

/* One temporary directory per test; the store lives in dir/s. */
struct fixture {
	char dir[64];
	char path[128];
};

static void fixture_setup(struct fixture *f)
{
	strcpy(f->dir, "/tmp/km-test-store-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/s", f->dir);
}

static int rm_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

static void fixture_teardown(struct fixture *f)
{
	ck_assert_int_eq(nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS), 0);
}

/* Deterministic pseudo-random chunk 'seed': 1000..4999 bytes. */
static size_t make_chunk(uint64_t seed, uint8_t *buf, struct km_hash *id)
{
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
	size_t n = 1000 + (size_t)(seed * 7919 % 4000);

	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (uint8_t)x;
	}
	km_hash_buf(buf, n, id);
	return n;
}

static int put_seed(struct km_store *s, uint64_t seed)
{
	uint8_t buf[5000];
	struct km_hash id;
	size_t n = make_chunk(seed, buf, &id);

	return km_store_put(s, &id, buf, n);
}

static void assert_seed_stored(struct km_store *s, uint64_t seed)
{
	uint8_t want[5000], got[5000];
	struct km_hash id;
	size_t n = make_chunk(seed, want, &id), m = 0;

	ck_assert_int_eq(km_store_get(s, &id, got, sizeof(got), &m), 0);
	ck_assert_uint_eq(m, n);
	ck_assert_mem_eq(got, want, n);
}

static struct km_hash seed_id(uint64_t seed)
{
	uint8_t buf[5000];
	struct km_hash id;

	make_chunk(seed, buf, &id);
	return id;
}

/* The chunk file of id, for tests that damage it. */
static void chunk_file(const struct fixture *f, const struct km_hash *id, char *buf, size_t size)
{
	char hex[KM_HASH_HEX_SIZE];

	km_hash_to_hex(id, hex);
	snprintf(buf, size, "%s/chunks/%.2s/%s", f->path, hex, hex);
}

/* Entries of a directory, "." and ".." aside. */
static int count_entries(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *de;
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			n++;
	closedir(d);
	return n;
}

static int count_tmp(const struct fixture *f)
{
	char p[PATH_MAX];

	snprintf(p, sizeof(p), "%s/tmp", f->path);
	return count_entries(p);
}

static int count_chunk(const struct km_hash *id, uint64_t size, void *userdata)
{
	(*(int *)userdata)++;
	return 0;
}

static int count_chunks(struct km_store *s)
{
	int n = 0;

	ck_assert_int_eq(km_store_foreach(s, count_chunk, &n), 0);
	return n;
}

static void write_file(const char *path, const void *p, size_t n)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(km_write_full(fd, p, n), 0);
	close(fd);
}

/* ------------------------------------------------------------ opening */

START_TEST(test_store_create_reopen_keeps_config)
{
	struct km_chunker_params p = { 4096, 16384, 65536 }, other = { 1024, 2048, 4096 };
	struct km_chunker_params defaults = KM_CHUNKER_PARAMS_DEFAULT;
	struct fixture f;
	struct km_store *s = NULL;
	char sub[PATH_MAX];

	fixture_setup(&f);
	/* A nested path: created like mkdir -p. */
	snprintf(sub, sizeof(sub), "%s/a/b", f.path);
	ck_assert_int_eq(km_store_open(sub, 0, NULL, &s), -ENOENT);
	ck_assert_int_eq(km_store_open(sub, KM_STORE_CREATE, &p, &s), 0);
	ck_assert_str_eq(km_store_path(s), sub);
	ck_assert_mem_eq(km_store_chunker_params(s), &p, sizeof(p));
	km_store_free(s);

	ck_assert_int_eq(km_store_open(sub, 0, NULL, &s), 0);
	ck_assert_mem_eq(km_store_chunker_params(s), &p, sizeof(p));
	km_store_free(s);
	/* An existing store keeps its own parameters. */
	ck_assert_int_eq(km_store_open(sub, KM_STORE_CREATE, &other, &s), 0);
	ck_assert_mem_eq(km_store_chunker_params(s), &p, sizeof(p));
	km_store_free(s);

	/* NULL parameters: the defaults. */
	snprintf(sub, sizeof(sub), "%s/d", f.dir);
	ck_assert_int_eq(km_store_open(sub, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_mem_eq(km_store_chunker_params(s), &defaults, sizeof(defaults));
	km_store_free(s);
	km_store_free(NULL);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_create_rejects_bad_params)
{
	struct km_chunker_params bad = { 4096, 3000, 65536 };
	struct fixture f;
	struct km_store *s = NULL;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE, &bad, &s), -EINVAL);
	ck_assert_ptr_null(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_concurrent_create_agrees)
{
	struct km_chunker_params p = { 4096, 16384, 65536 };
	struct fixture f;
	pid_t pids[8];
	int status;

	fixture_setup(&f);
	for (size_t i = 0; i < KM_ARRAY_SIZE(pids); i++) {
		pids[i] = fork();
		ck_assert_int_ge(pids[i], 0);
		if (pids[i] == 0) {
			/* Each child asks for other parameters; one wins for all. */
			struct km_chunker_params mine = p;
			struct km_store *s = NULL;
			int r;

			mine.min_size += (uint32_t)i * 64;
			if (km_store_open(f.path, KM_STORE_CREATE | NOSYNC, &mine, &s) < 0)
				_exit(1);
			r = put_seed(s, 1);
			if (r < 0 && r != -EEXIST)
				_exit(2);
			km_store_free(s);
			_exit(0);
		}
	}
	for (size_t i = 0; i < KM_ARRAY_SIZE(pids); i++) {
		ck_assert_int_eq(waitpid(pids[i], &status, 0), pids[i]);
		ck_assert(WIFEXITED(status));
		ck_assert_int_eq(WEXITSTATUS(status), 0);
	}
	{
		struct km_store *s = NULL;
		const struct km_chunker_params *q;

		ck_assert_int_eq(km_store_open(f.path, 0, NULL, &s), 0);
		q = km_store_chunker_params(s);
		ck_assert_uint_eq(q->avg_size, p.avg_size);
		ck_assert_uint_eq((q->min_size - p.min_size) % 64, 0);
		assert_seed_stored(s, 1);
		/* config, lock, 4 directories, the verified record of the puts */
		ck_assert_int_eq(count_entries(f.path), 7);
		km_store_free(s);
	}
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_open_non_store_fails)
{
	struct fixture f;
	struct km_store *s = NULL;
	char p[PATH_MAX];

	fixture_setup(&f);
	ck_assert_int_eq(mkdir(f.path, 0755), 0);
	snprintf(p, sizeof(p), "%s/precious", f.path);
	write_file(p, "data", 4);
	ck_assert_int_eq(km_store_open(f.path, 0, NULL, &s), -EBADMSG);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE, NULL, &s), -EBADMSG);
	ck_assert_ptr_null(s);
	/* Nothing was added to the foreign directory. */
	ck_assert_int_eq(count_entries(f.path), 1);

	/* A foreign file where the config belongs. */
	snprintf(p, sizeof(p), "%s/config.kmstore", f.path);
	write_file(p, "not a config", 12);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE, NULL, &s), -EBADMSG);
	ck_assert_int_eq(count_entries(f.path), 2);

	/* A regular file is not a store either. */
	snprintf(p, sizeof(p), "%s/precious", f.path);
	ck_assert_int_eq(km_store_open(p, KM_STORE_CREATE, NULL, &s), -EBADMSG);
	ck_assert_int_eq(km_store_open(p, 0, NULL, &s), -EBADMSG);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_exclusive_open_busy)
{
	struct fixture f;
	struct km_store *s = NULL, *ex = NULL, *ex2 = NULL;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &ex), -EBUSY);
	ck_assert_ptr_null(ex);
	km_store_free(s);

	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &ex), 0);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &ex2), -EBUSY);
	km_store_free(ex);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &ex2), 0);
	km_store_free(ex2);
	fixture_teardown(&f);
}
END_TEST

/* ------------------------------------------------------------- chunks */

START_TEST(test_store_round_trip)
{
	struct fixture f;
	struct km_store *s = NULL;
	uint8_t buf[5000], out[5000];
	struct km_hash id;
	size_t n, m = 0;
	uint64_t size = 0;

	fixture_setup(&f);
	/* With fsync: the default path. */
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE, NULL, &s), 0);
	n = make_chunk(42, buf, &id);
	ck_assert_int_eq(km_store_has(s, &id), 0);
	ck_assert_int_eq(km_store_put(s, &id, buf, n), 0);
	ck_assert_int_eq(km_store_has(s, &id), 1);
	ck_assert_int_eq(km_store_get(s, &id, out, sizeof(out), &m), 0);
	ck_assert_uint_eq(m, n);
	ck_assert_mem_eq(out, buf, n);
	ck_assert_int_eq(km_store_stat(s, &id, &size), 0);
	ck_assert_uint_eq(size, n);
	ck_assert_int_eq(km_store_get(s, &id, out, n - 1, &m), -EFBIG);
	ck_assert_int_eq(km_store_get(s, &id, out, n, &m), 0);
	ck_assert_int_eq(count_chunks(s), 1);
	ck_assert_int_eq(count_tmp(&f), 0);

	/* An empty chunk is a chunk like any other. */
	km_hash_buf(buf, 0, &id);
	ck_assert_int_eq(km_store_put(s, &id, buf, 0), 0);
	ck_assert_int_eq(km_store_get(s, &id, out, 0, &m), 0);
	ck_assert_uint_eq(m, 0);
	ck_assert_int_eq(km_store_remove(s, &id), 0);

	n = make_chunk(42, buf, &id);
	ck_assert_int_eq(km_store_remove(s, &id), 0);
	ck_assert_int_eq(km_store_has(s, &id), 0);
	ck_assert_int_eq(km_store_remove(s, &id), -ENOENT);
	ck_assert_int_eq(count_chunks(s), 0);
	/* Gone and put again: stored anew. */
	ck_assert_int_eq(km_store_put(s, &id, buf, n), 0);
	km_store_free(s);

	/* Still there for the next handle. */
	ck_assert_int_eq(km_store_open(f.path, 0, NULL, &s), 0);
	assert_seed_stored(s, 42);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_put_twice_dedups)
{
	struct fixture f;
	struct km_store *s = NULL;
	uint8_t buf[5000];
	struct km_hash id;
	char hex[KM_HASH_HEX_SIZE], p[PATH_MAX];
	size_t n;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	n = make_chunk(7, buf, &id);
	ck_assert_int_eq(km_store_put(s, &id, buf, n), 0);
	ck_assert_int_eq(km_store_put(s, &id, buf, n), -EEXIST);
	snprintf(p, sizeof(p), "%s/chunks/%.2s", f.path, km_hash_to_hex(&id, hex));
	ck_assert_int_eq(count_entries(p), 1);
	ck_assert_int_eq(count_tmp(&f), 0);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_get_missing)
{
	struct fixture f;
	struct km_store *s = NULL;
	uint8_t out[16];
	struct km_hash id = seed_id(3);
	uint64_t size;
	size_t m;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_get(s, &id, out, sizeof(out), &m), -ENOENT);
	ck_assert_int_eq(km_store_stat(s, &id, &size), -ENOENT);
	ck_assert_int_eq(km_store_has(s, &id), 0);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_compare_bytes)
{
	struct fixture f;
	struct km_store *s = NULL;
	uint8_t buf[5000], other[5000];
	struct km_hash id, missing = seed_id(9);
	size_t n;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	n = make_chunk(4, buf, &id);
	ck_assert_int_eq(km_store_put(s, &id, buf, n), 0);
	ck_assert_int_eq(km_store_compare(s, &id, buf, n), 1);
	/* One byte anywhere, the length, or another chunk's name: no match. */
	memcpy(other, buf, n);
	other[n - 1] ^= 1;
	ck_assert_int_eq(km_store_compare(s, &id, other, n), 0);
	other[n - 1] ^= 1;
	other[0] ^= 0x80;
	ck_assert_int_eq(km_store_compare(s, &id, other, n), 0);
	ck_assert_int_eq(km_store_compare(s, &id, buf, n - 1), 0);
	ck_assert_int_eq(km_store_compare(s, &missing, buf, n), -ENOENT);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

/* ---------------------------------------------------------- integrity */

struct bad_list {
	struct km_hash ids[8];
	int errors[8];
	size_t n;
};

static void collect_bad(const struct km_hash *id, int error, void *userdata)
{
	struct bad_list *l = userdata;

	ck_assert_uint_lt(l->n, KM_ARRAY_SIZE(l->ids));
	l->ids[l->n] = *id;
	l->errors[l->n++] = error;
}

/* get gives -EBADMSG; verify reports exactly 'bad' and with repair removes it. */
static void assert_detected(struct km_store *s, const struct km_hash *bad, int total)
{
	struct km_store_verify_stats vs;
	struct bad_list l = { .n = 0 };
	uint8_t out[5000];
	size_t m;

	ck_assert_int_eq(km_store_get(s, bad, out, sizeof(out), &m), -EBADMSG);
	ck_assert_int_eq(km_store_verify(s, false, collect_bad, &l, &vs), -EBADMSG);
	ck_assert_uint_eq(l.n, 1);
	ck_assert(km_hash_equal(&l.ids[0], bad));
	ck_assert_int_eq(l.errors[0], -EBADMSG);
	ck_assert_uint_eq(vs.chunks, total);
	ck_assert_uint_eq(vs.bad, 1);
	ck_assert_int_eq(km_store_has(s, bad), 1);

	l.n = 0;
	ck_assert_int_eq(km_store_verify(s, true, collect_bad, &l, &vs), -EBADMSG);
	ck_assert_uint_eq(l.n, 1);
	ck_assert_int_eq(km_store_has(s, bad), 0);
	ck_assert_int_eq(km_store_verify(s, false, NULL, NULL, &vs), 0);
	ck_assert_uint_eq(vs.chunks, total - 1);
	ck_assert_uint_eq(vs.bad, 0);
}

START_TEST(test_store_flipped_byte_detected)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_hash id = seed_id(2);
	char p[PATH_MAX];
	uint8_t c;
	int fd;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	for (int i = 1; i <= 3; i++)
		ck_assert_int_eq(put_seed(s, i), 0);
	chunk_file(&f, &id, p, sizeof(p));
	fd = open(p, O_RDWR | O_CLOEXEC);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &c, 1, 500), 1);
	c ^= 0x01;
	ck_assert_int_eq(pwrite(fd, &c, 1, 500), 1);
	close(fd);

	assert_detected(s, &id, 3);
	assert_seed_stored(s, 1);
	assert_seed_stored(s, 3);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_truncated_detected)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_hash id = seed_id(5);
	char p[PATH_MAX];

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(put_seed(s, 4), 0);
	ck_assert_int_eq(put_seed(s, 5), 0);
	chunk_file(&f, &id, p, sizeof(p));
	ck_assert_int_eq(truncate(p, 100), 0);
	assert_detected(s, &id, 2);
	assert_seed_stored(s, 4);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_wrong_name_detected)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_hash a = seed_id(10), b = seed_id(11);
	char pa[PATH_MAX], pb[PATH_MAX], dir[PATH_MAX];
	char hex[KM_HASH_HEX_SIZE];

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(put_seed(s, 10), 0);
	ck_assert_int_eq(put_seed(s, 12), 0);
	/* Chunk a's bytes under b's name. */
	chunk_file(&f, &a, pa, sizeof(pa));
	chunk_file(&f, &b, pb, sizeof(pb));
	snprintf(dir, sizeof(dir), "%s/chunks/%.2s", f.path, km_hash_to_hex(&b, hex));
	ck_assert(mkdir(dir, 0755) == 0 || errno == EEXIST);
	ck_assert_int_eq(rename(pa, pb), 0);
	ck_assert_int_eq(km_store_has(s, &a), 0);
	assert_detected(s, &b, 2);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_ignores_foreign_names)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_store_verify_stats vs;
	char p[PATH_MAX];

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(put_seed(s, 1), 0);
	/* Not chunk names: foreach, verify and gc leave them alone. */
	snprintf(p, sizeof(p), "%s/chunks/zz", f.path);
	ck_assert_int_eq(mkdir(p, 0755), 0);
	snprintf(p, sizeof(p), "%s/chunks/README", f.path);
	write_file(p, "x", 1);
	ck_assert_int_eq(count_chunks(s), 1);
	ck_assert_int_eq(km_store_verify(s, true, NULL, NULL, &vs), 0);
	ck_assert_uint_eq(vs.chunks, 1);
	ck_assert_int_eq(access(p, F_OK), 0);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

/* -------------------------------------------------------- concurrency */

#define SHARED_CHUNKS 200
#define OWN_CHUNKS 50
#define WORKERS 8

/*
 * Every worker puts the shared chunks 0..199 and its own 50; 'stored'
 * counts, per chunk, the puts that returned 0: exactly one each.
 */
static int put_all(struct km_store *s, int worker, atomic_int *stored)
{
	for (int i = 0; i < SHARED_CHUNKS + OWN_CHUNKS; i++) {
		int c = i < SHARED_CHUNKS ? i : SHARED_CHUNKS + worker * OWN_CHUNKS + i - SHARED_CHUNKS;
		int r = put_seed(s, (uint64_t)c + 1000);

		if (r == 0)
			atomic_fetch_add(&stored[c], 1);
		else if (r != -EEXIST)
			return r;
	}
	return 0;
}

static void assert_all_stored(struct fixture *f, atomic_int *stored)
{
	struct km_store *s = NULL;
	struct km_store_verify_stats vs;
	int total = SHARED_CHUNKS + WORKERS * OWN_CHUNKS;

	ck_assert_int_eq(km_store_open(f->path, 0, NULL, &s), 0);
	for (int c = 0; c < total; c++) {
		ck_assert_int_eq(atomic_load(&stored[c]), 1);
		assert_seed_stored(s, (uint64_t)c + 1000);
	}
	ck_assert_int_eq(km_store_verify(s, false, NULL, NULL, &vs), 0);
	ck_assert_uint_eq(vs.chunks, total);
	ck_assert_int_eq(count_chunks(s), total);
	ck_assert_int_eq(count_tmp(f), 0);
	km_store_free(s);
}

START_TEST(test_store_concurrent_processes)
{
	int total = SHARED_CHUNKS + WORKERS * OWN_CHUNKS;
	struct fixture f;
	atomic_int *stored;
	pid_t pids[WORKERS];
	int go[2], status;

	fixture_setup(&f);
	stored = mmap(NULL, total * sizeof(*stored), PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(stored, MAP_FAILED);
	ck_assert_int_eq(pipe(go), 0);
	for (int w = 0; w < WORKERS; w++) {
		pids[w] = fork();
		ck_assert_int_ge(pids[w], 0);
		if (pids[w] == 0) {
			struct km_store *s = NULL;
			char c;
			int r;

			close(go[1]);
			/* Every child creates the store and waits for the others. */
			if (km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s) < 0)
				_exit(1);
			if (read(go[0], &c, 1) != 0)
				_exit(2);
			r = put_all(s, w, stored);
			km_store_free(s);
			_exit(r < 0 ? 3 : 0);
		}
	}
	close(go[0]);
	close(go[1]); /* start */
	for (int w = 0; w < WORKERS; w++) {
		ck_assert_int_eq(waitpid(pids[w], &status, 0), pids[w]);
		ck_assert(WIFEXITED(status));
		ck_assert_int_eq(WEXITSTATUS(status), 0);
	}
	assert_all_stored(&f, stored);
	munmap(stored, total * sizeof(*stored));
	fixture_teardown(&f);
}
END_TEST

struct thread_arg {
	struct km_store *s;
	int worker;
	atomic_int *stored;
	pthread_barrier_t *barrier;
	int result;
};

static void *put_thread(void *p)
{
	struct thread_arg *a = p;

	pthread_barrier_wait(a->barrier);
	a->result = put_all(a->s, a->worker, a->stored);
	return NULL;
}

START_TEST(test_store_concurrent_threads)
{
	_cleanup_free_ atomic_int *stored = calloc(SHARED_CHUNKS + WORKERS * OWN_CHUNKS,
						   sizeof(*stored));
	struct fixture f;
	struct km_store *s = NULL;
	pthread_t threads[WORKERS];
	struct thread_arg args[WORKERS];
	pthread_barrier_t barrier;

	ck_assert_ptr_nonnull(stored);
	fixture_setup(&f);
	/* With fsync, to race the directory syncs too. */
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE, NULL, &s), 0);
	ck_assert_int_eq(pthread_barrier_init(&barrier, NULL, WORKERS), 0);
	for (int w = 0; w < WORKERS; w++) {
		args[w] = (struct thread_arg){ s, w, stored, &barrier, -1 };
		ck_assert_int_eq(pthread_create(&threads[w], NULL, put_thread, &args[w]), 0);
	}
	for (int w = 0; w < WORKERS; w++) {
		ck_assert_int_eq(pthread_join(threads[w], NULL), 0);
		ck_assert_int_eq(args[w].result, 0);
	}
	pthread_barrier_destroy(&barrier);
	km_store_free(s);
	assert_all_stored(&f, stored);
	fixture_teardown(&f);
}
END_TEST

/* -------------------------------------------------------------- roots */

static int collect_name(const char *name, void *userdata)
{
	char *out = userdata;

	strcat(out, name);
	strcat(out, ",");
	return 0;
}

static int stop_at_first(const char *name, void *userdata)
{
	return 7;
}

START_TEST(test_store_roots)
{
	struct fixture f;
	struct km_store *s = NULL;
	void *p = NULL;
	size_t n = 0;
	char names[256] = "";

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_root_write(s, "indexes", "b.kmidx", "one", 3), 0);
	ck_assert_int_eq(km_store_root_write(s, "indexes", "a.kmidx", "two", 3), 0);
	ck_assert_int_eq(km_store_root_write(s, "indexes", "c.kmidx", "", 0), 0);
	ck_assert_int_eq(km_store_root_write(s, "manifests", "m.kmman", "three", 5), 0);
	/* Replacing is allowed. */
	ck_assert_int_eq(km_store_root_write(s, "indexes", "b.kmidx", "four!", 5), 0);

	ck_assert_int_eq(km_store_root_read(s, "indexes", "b.kmidx", &p, &n), 0);
	ck_assert_uint_eq(n, 5);
	ck_assert_mem_eq(p, "four!", 5);
	free(p);
	ck_assert_int_eq(km_store_root_read(s, "indexes", "c.kmidx", &p, &n), 0);
	ck_assert_uint_eq(n, 0);
	free(p);
	ck_assert_int_eq(km_store_root_read(s, "indexes", "m.kmman", &p, &n), -ENOENT);

	ck_assert_int_eq(km_store_root_foreach(s, "indexes", collect_name, names), 0);
	ck_assert_str_eq(names, "a.kmidx,b.kmidx,c.kmidx,");
	names[0] = 0;
	ck_assert_int_eq(km_store_root_foreach(s, "manifests", collect_name, names), 0);
	ck_assert_str_eq(names, "m.kmman,");
	ck_assert_int_eq(km_store_root_foreach(s, "indexes", stop_at_first, NULL), 7);

	ck_assert_int_eq(km_store_root_remove(s, "indexes", "a.kmidx"), 0);
	ck_assert_int_eq(km_store_root_remove(s, "indexes", "a.kmidx"), -ENOENT);
	names[0] = 0;
	ck_assert_int_eq(km_store_root_foreach(s, "indexes", collect_name, names), 0);
	ck_assert_str_eq(names, "b.kmidx,c.kmidx,");
	ck_assert_int_eq(count_tmp(&f), 0);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_roots_reject_bad_names)
{
	static const char *const bad[] = { "", ".", "..", "a/b", "../config.kmstore", "/etc" };
	struct fixture f;
	struct km_store *s = NULL;
	void *p = NULL;
	size_t n;

	fixture_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	for (size_t i = 0; i < KM_ARRAY_SIZE(bad); i++) {
		ck_assert_int_eq(km_store_root_write(s, "indexes", bad[i], "x", 1), -EINVAL);
		ck_assert_int_eq(km_store_root_read(s, "indexes", bad[i], &p, &n), -EINVAL);
		ck_assert_int_eq(km_store_root_remove(s, "indexes", bad[i]), -EINVAL);
	}
	ck_assert_int_eq(km_store_root_write(s, "indexes", NULL, "x", 1), -EINVAL);
	ck_assert_int_eq(km_store_root_write(s, "chunks", "x", "x", 1), -EINVAL);
	ck_assert_int_eq(km_store_root_write(s, NULL, "x", "x", 1), -EINVAL);
	ck_assert_int_eq(km_store_root_foreach(s, "tmp", collect_name, NULL), -EINVAL);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

/* ----------------------------------------------------------------- gc */

/* Test-only root format: concatenated 32-byte ids. */
static int refs_ids(struct km_store_gc *gc, const char *kind, const char *name, const void *p,
		    size_t n, void *userdata)
{
	const uint8_t *b = p;

	if (n % KM_HASH_SIZE)
		return -EBADMSG;
	for (size_t i = 0; i < n; i += KM_HASH_SIZE) {
		struct km_hash id;

		memcpy(id.b, b + i, KM_HASH_SIZE);
		km_store_gc_keep(gc, &id);
	}
	return 0;
}

static int refs_fail_on_b(struct km_store_gc *gc, const char *kind, const char *name,
			  const void *p, size_t n, void *userdata)
{
	if (strcmp(name, "b") == 0)
		return -EBADMSG;
	return refs_ids(gc, kind, name, p, n, userdata);
}

/* A root referring to chunks first..last (seeds). */
static void write_id_root(struct km_store *s, const char *kind, const char *name, int first,
			  int last)
{
	struct km_hash ids[64];
	size_t n = 0;

	for (int i = first; i <= last; i++)
		ids[n++] = seed_id((uint64_t)i);
	ck_assert_int_eq(km_store_root_write(s, kind, name, ids, n * sizeof(ids[0])), 0);
}

/* 20 chunks (seeds 0..19), roots for 0..9 and 5..14, and a stale temp file. */
static void gc_setup(struct fixture *f)
{
	struct km_store *s = NULL;
	char p[PATH_MAX];

	ck_assert_int_eq(km_store_open(f->path, KM_STORE_CREATE | NOSYNC, NULL, &s), 0);
	for (int i = 0; i < 20; i++)
		ck_assert_int_eq(put_seed(s, (uint64_t)i), 0);
	write_id_root(s, "indexes", "a", 0, 9);
	write_id_root(s, "manifests", "m", 5, 14);
	km_store_free(s);
	snprintf(p, sizeof(p), "%s/tmp/chunk.1.2.stale", f->path);
	write_file(p, "partial", 7);
}

START_TEST(test_store_gc_keeps_referenced)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_store_gc_stats gs;
	struct km_error err = { { 0 } };
	uint64_t bytes = 0;
	uint8_t buf[5000];
	struct km_hash id;

	fixture_setup(&f);
	gc_setup(&f);
	for (int i = 15; i < 20; i++)
		bytes += make_chunk((uint64_t)i, buf, &id);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_gc_run(s, refs_ids, NULL, &gs, &err), 0);
	ck_assert_uint_eq(gs.roots, 2);
	ck_assert_uint_eq(gs.chunks_kept, 15);
	ck_assert_uint_eq(gs.chunks_removed, 5);
	ck_assert_uint_eq(gs.bytes_removed, bytes);
	for (int i = 0; i < 15; i++)
		assert_seed_stored(s, (uint64_t)i);
	for (int i = 15; i < 20; i++) {
		id = seed_id((uint64_t)i);
		ck_assert_int_eq(km_store_has(s, &id), 0);
	}
	ck_assert_int_eq(count_tmp(&f), 0);

	/* Once a root goes, so do the chunks only it kept. */
	ck_assert_int_eq(km_store_root_remove(s, "indexes", "a"), 0);
	ck_assert_int_eq(km_store_gc_run(s, refs_ids, NULL, &gs, &err), 0);
	ck_assert_uint_eq(gs.roots, 1);
	ck_assert_uint_eq(gs.chunks_kept, 10);
	ck_assert_uint_eq(gs.chunks_removed, 5);
	ck_assert_int_eq(count_chunks(s), 10);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_gc_many_kept)
{
	/* Enough ids to make the kept set grow several times. */
	enum { N = 5000 };
	struct fixture f;
	struct km_store *s = NULL;
	struct km_store_gc_stats gs;
	_cleanup_free_ struct km_hash *ids = calloc(N, sizeof(*ids));

	fixture_setup(&f);
	ck_assert_ptr_nonnull(ids);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_CREATE | KM_STORE_EXCLUSIVE | NOSYNC,
				       NULL, &s), 0);
	for (int i = 0; i < 40; i++)
		ck_assert_int_eq(put_seed(s, (uint64_t)i), 0);
	/* Every other stored chunk, among many ids that are not stored. */
	for (int i = 0; i < N; i++)
		ids[i] = seed_id(i < 20 ? (uint64_t)i * 2 : (uint64_t)i + 100000);
	ck_assert_int_eq(km_store_root_write(s, "indexes", "big", ids, N * sizeof(*ids)), 0);
	ck_assert_int_eq(km_store_gc_run(s, refs_ids, NULL, &gs, NULL), 0);
	ck_assert_uint_eq(gs.chunks_kept, 20);
	ck_assert_uint_eq(gs.chunks_removed, 20);
	for (int i = 0; i < 40; i++) {
		struct km_hash id = seed_id((uint64_t)i);

		ck_assert_int_eq(km_store_has(s, &id), i % 2 == 0);
	}
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_gc_failing_refs_removes_nothing)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_store_gc_stats gs = { 0 };
	struct km_error err = { { 0 } };

	fixture_setup(&f);
	gc_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_root_write(s, "indexes", "b", "not ids", 7), 0);
	ck_assert_int_eq(km_store_gc_run(s, refs_fail_on_b, NULL, &gs, &err), -EBADMSG);
	ck_assert_ptr_nonnull(strstr(err.msg, "indexes/b"));
	ck_assert_uint_eq(gs.chunks_removed, 0);
	ck_assert_int_eq(count_chunks(s), 20);
	ck_assert_int_eq(count_tmp(&f), 1);
	/* A root of the test format that does not parse fails the same way. */
	ck_assert_int_eq(km_store_gc_run(s, refs_ids, NULL, &gs, NULL), -EBADMSG);
	ck_assert_int_eq(count_chunks(s), 20);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_store_gc_needs_exclusive)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_store_gc_stats gs;

	fixture_setup(&f);
	gc_setup(&f);
	ck_assert_int_eq(km_store_open(f.path, NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_gc_run(s, refs_ids, NULL, &gs, NULL), -EBUSY);
	ck_assert_int_eq(count_chunks(s), 20);
	ck_assert_int_eq(count_tmp(&f), 1);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

/* 1 if the record vouches for chunk 'seed', 0 if not, <0 from the open. */
static int recorded(struct km_store *s, uint64_t seed)
{
	uint8_t buf[5000];
	struct km_hash id;
	size_t n = make_chunk(seed, buf, &id);
	bool rec = false;
	int fd = km_store_open_chunk(s, &id, n, &rec);

	if (fd < 0)
		return fd;
	close(fd);
	return rec;
}

/*
 * The verified record: puts are recorded (on disk once the handle is
 * freed); a chunk rewritten in place is not vouched for and fails its
 * check; a get that hashed it right records it again; gc keeps only the
 * entries of kept chunks.
 */
START_TEST(test_store_verified_record)
{
	struct fixture f;
	struct km_store *s = NULL;
	struct km_store_gc_stats gs;
	struct km_error err = { { 0 } };
	uint8_t buf[5000], got[5000];
	struct km_hash id;
	char path[256];
	size_t n, m;
	bool rec;
	int fd;

	fixture_setup(&f);
	gc_setup(&f); /* 20 chunks put, roots keeping 0..14 */
	ck_assert_int_eq(km_store_open(f.path, NOSYNC, NULL, &s), 0);
	ck_assert_uint_eq(km_store_verified_count(s), 20);
	for (int i = 0; i < 20; i++)
		ck_assert_int_eq(recorded(s, (uint64_t)i), 1);
	/* Asked for another length: not the chunk file. */
	n = make_chunk(3, buf, &id);
	ck_assert_int_eq(km_store_open_chunk(s, &id, n + 1, &rec), -EBADMSG);
	km_store_free(s);

	/* Rewritten in place, same size: another ctime, so no longer vouched for. */
	usleep(20000);
	chunk_file(&f, &id, path, sizeof(path));
	buf[10] ^= 1;
	write_file(path, buf, n);
	ck_assert_int_eq(km_store_open(f.path, NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(recorded(s, 3), 0);
	fd = km_store_open_chunk(s, &id, n, &rec);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(km_store_check_chunk(s, &id, fd), -EBADMSG);
	close(fd);
	/* Put back right: a get that hashed it records it. */
	buf[10] ^= 1;
	write_file(path, buf, n);
	usleep(20000);
	ck_assert_int_eq(km_store_get(s, &id, got, sizeof(got), &m), 0);
	ck_assert_int_eq(recorded(s, 3), 1);
	km_store_free(s);
	ck_assert_int_eq(km_store_open(f.path, NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(recorded(s, 3), 1);
	km_store_free(s);

	/* gc keeps the entries of the 15 chunks it keeps, and no others. */
	ck_assert_int_eq(km_store_open(f.path, KM_STORE_EXCLUSIVE | NOSYNC, NULL, &s), 0);
	ck_assert_int_eq(km_store_gc_run(s, refs_ids, NULL, &gs, &err), 0);
	ck_assert_uint_eq(gs.chunks_kept, 15);
	km_store_free(s);
	ck_assert_int_eq(km_store_open(f.path, NOSYNC, NULL, &s), 0);
	ck_assert_uint_eq(km_store_verified_count(s), 15);
	for (int i = 0; i < 15; i++)
		ck_assert_int_eq(recorded(s, (uint64_t)i), 1);
	km_store_free(s);
	fixture_teardown(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("store");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_store_create_reopen_keeps_config);
	tcase_add_test(tc, test_store_create_rejects_bad_params);
	tcase_add_test(tc, test_store_concurrent_create_agrees);
	tcase_add_test(tc, test_store_open_non_store_fails);
	tcase_add_test(tc, test_store_exclusive_open_busy);
	tcase_add_test(tc, test_store_round_trip);
	tcase_add_test(tc, test_store_put_twice_dedups);
	tcase_add_test(tc, test_store_get_missing);
	tcase_add_test(tc, test_store_compare_bytes);
	tcase_add_test(tc, test_store_flipped_byte_detected);
	tcase_add_test(tc, test_store_truncated_detected);
	tcase_add_test(tc, test_store_wrong_name_detected);
	tcase_add_test(tc, test_store_ignores_foreign_names);
	tcase_add_test(tc, test_store_concurrent_processes);
	tcase_add_test(tc, test_store_concurrent_threads);
	tcase_add_test(tc, test_store_roots);
	tcase_add_test(tc, test_store_roots_reject_bad_names);
	tcase_add_test(tc, test_store_gc_keeps_referenced);
	tcase_add_test(tc, test_store_gc_many_kept);
	tcase_add_test(tc, test_store_gc_failing_refs_removes_nothing);
	tcase_add_test(tc, test_store_gc_needs_exclusive);
	tcase_add_test(tc, test_store_verified_record);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
