/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Weights files: layout, materialization from the store, verification
 * (the .ok record trusted only while the file's stat is unchanged), errors
 * naming the bad chunk, concurrent materializations, resolve.
 */
#include <check.h>

#include "km-check.h"
#include "km-files.h"
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "format.h"
#include "image.h"
#include "weights.h"

#define NOSYNC KM_STORE_NOSYNC
#define MIB (1024u * 1024)

/* The model files: sizes chosen so that the layout has gaps, an empty file
 * and a zero run inside a file. */
#define A_SIZE (3 * MIB + 123)
#define B_SIZE (1 * MIB + 5)
#define C_SIZE 5000u
#define N_MODELS 4

struct model {
	const char *name;
	size_t size;
	uint8_t *bytes;
};

struct fixture {
	char root[64];
	char store_path[128];
	char wdir[160];
	char paths[N_MODELS][160];
	struct model models[N_MODELS];
	struct km_store *store;
};

static void write_path(const char *path, const void *p, size_t n)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(km_write_full(fd, p, n), 0);
	close(fd);
}

static uint8_t *read_path(const char *path, size_t *ret_n)
{
	void *p = NULL;

	ck_assert_int_eq(km_read_file_at(AT_FDCWD, path, 1u << 30, &p, ret_n), 0);
	return p;
}

/* Model files a (random), empty, b (random around 600 KiB of zeros), c. */
static void fixture_setup(struct fixture *f)
{
	static const char *const names[N_MODELS] = { "a.bin", "empty.bin", "b.bin", "c.bin" };
	static const size_t sizes[N_MODELS] = { A_SIZE, 0, B_SIZE, C_SIZE };
	const char *paths[N_MODELS];
	struct km_error err = { { 0 } };

	memset(f, 0, sizeof(*f));
	strcpy(f->root, "/tmp/km-test-weights-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->root));
	snprintf(f->store_path, sizeof(f->store_path), "%s/store", f->root);
	snprintf(f->wdir, sizeof(f->wdir), "%s/store/%s", f->root, KM_WEIGHTS_DIRNAME);
	for (int i = 0; i < N_MODELS; i++) {
		struct model *m = &f->models[i];

		m->name = names[i];
		m->size = sizes[i];
		m->bytes = calloc(1, m->size ? m->size : 1);
		fill_random(m->bytes, m->size, (uint64_t)i + 7);
		snprintf(f->paths[i], sizeof(f->paths[i]), "%s/%s", f->root, m->name);
		paths[i] = f->paths[i];
	}
	memset(f->models[2].bytes + 200 * 1024, 0, 600 * 1024);
	for (int i = 0; i < N_MODELS; i++)
		write_path(f->paths[i], f->models[i].bytes, f->models[i].size);
	ck_assert_int_eq(km_store_open(f->store_path, KM_STORE_CREATE | NOSYNC, NULL, &f->store), 0);
	ck_assert_msg(km_seed(f->store, "m", paths, N_MODELS, 2, NULL, &err) == 0, "seed: %s",
		      err.msg);
}

static void fixture_teardown(struct fixture *f)
{
	km_store_free(f->store);
	for (int i = 0; i < N_MODELS; i++)
		free(f->models[i].bytes);
	rm_tree(f->root);
}

static struct km_weights_index *read_index(struct km_store *s, const char *name)
{
	struct km_weights_index *idx = NULL;
	struct km_error err = { { 0 } };
	char root[256];
	void *buf = NULL;
	size_t n;

	snprintf(root, sizeof(root), "%s.kmidx", name);
	ck_assert_int_eq(km_store_root_read(s, "indexes", root, &buf, &n), 0);
	ck_assert_msg(km_weights_index_decode(buf, n, &idx, &err) == 0, "%s", err.msg);
	free(buf);
	return idx;
}

static void write_index(struct km_store *s, const char *name, const struct km_weights_index *idx)
{
	char root[256];
	void *buf = NULL;
	size_t n;

	snprintf(root, sizeof(root), "%s.kmidx", name);
	ck_assert_int_eq(km_weights_index_encode(idx, &buf, &n), 0);
	ck_assert_int_eq(km_store_root_write(s, "indexes", root, buf, n), 0);
	free(buf);
}

static void materialize_ok(struct fixture *f, bool sync, struct km_weights_info *w)
{
	struct km_error err = { { 0 } };
	int r = km_weights_materialize(f->store, "m", NULL, sync, w, &err);

	ck_assert_msg(r == 0, "materialize: %d %s", r, err.msg);
}

/* Entries of dir other than "." and "..". */
static int count_entries(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	int n = 0;

	if (!d)
		return 0;
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			n++;
	closedir(d);
	return n;
}

/* The first chunk extent of model file i in index m, and its chunk file. */
static struct km_hash first_chunk(struct fixture *f, size_t i, char *path, size_t size)
{
	struct km_weights_index *idx = read_index(f->store, "m");
	struct km_hash id = { { 0 } };
	char hex[KM_HASH_HEX_SIZE];
	bool found = false;

	for (size_t j = 0; j < idx->files[i].n_extents && !found; j++)
		if (idx->files[i].extents[j].kind == KM_EXTENT_CHUNK) {
			id = idx->files[i].extents[j].id;
			found = true;
		}
	ck_assert(found);
	km_weights_index_free(idx);
	km_hash_to_hex(&id, hex);
	snprintf(path, size, "%s/chunks/%.2s/%s", f->store_path, hex, hex);
	return id;
}

START_TEST(test_weights_layout_aligned_in_order)
{
	struct km_file_entry files[6] = {
		{ .size = 0 },	       { .size = 1 },	    { .size = KM_WEIGHTS_ALIGN },
		{ .size = KM_WEIGHTS_ALIGN + 1 }, { .size = 0 }, { .size = 5 },
	};
	static const uint64_t want[6] = { 0, 0, KM_WEIGHTS_ALIGN, 2 * KM_WEIGHTS_ALIGN,
					  4 * KM_WEIGHTS_ALIGN, 4 * KM_WEIGHTS_ALIGN };
	struct km_weights_index idx = { .files = files, .n_files = 6 };
	struct km_weights_file_layout *l = NULL;
	uint64_t size = 0, end = 0;
	size_t n = 0;

	for (int i = 0; i < 6; i++)
		files[i].name = (char *)"x";
	ck_assert_int_eq(km_weights_layout(&idx, &l, &n, &size), 0);
	ck_assert_uint_eq(n, 6);
	for (size_t i = 0; i < n; i++) {
		ck_assert_uint_eq(l[i].offset % KM_WEIGHTS_ALIGN, 0);
		ck_assert_uint_ge(l[i].offset, end);
		ck_assert_uint_eq(l[i].offset, want[i]);
		ck_assert_uint_eq(l[i].size, files[i].size);
		ck_assert_ptr_eq(l[i].name, files[i].name);
		end = l[i].offset + l[i].size;
	}
	ck_assert_uint_eq(size, 4 * KM_WEIGHTS_ALIGN + 5);
	free(l);

	/* An empty index is an empty file. */
	idx.n_files = 0;
	ck_assert_int_eq(km_weights_layout(&idx, &l, &n, &size), 0);
	ck_assert_uint_eq(size, 0);
	free(l);

	/* Beyond what a file can hold. */
	files[1].size = (uint64_t)INT64_MAX;
	idx.n_files = 3;
	ck_assert_int_eq(km_weights_layout(&idx, &l, &n, &size), -EFBIG);
}
END_TEST

START_TEST(test_weights_materialize_bytes)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_weights_index *idx;
	struct km_weights_file_layout *l = NULL;
	struct km_hash h, from_name;
	char want_path[300], hex[KM_HASH_HEX_SIZE];
	uint64_t size, end = 0;
	struct stat st;
	uint8_t *p;
	size_t n, nl;

	fixture_setup(&f);
	materialize_ok(&f, true, &w);
	ck_assert(w.written);

	idx = read_index(f.store, "m");
	ck_assert_int_eq(km_weights_layout(idx, &l, &nl, &size), 0);
	ck_assert_uint_eq(nl, N_MODELS);
	ck_assert_uint_eq(w.size, size);
	ck_assert_uint_eq(w.bytes_hashed, size);
	/* The index now records the file. */
	ck_assert(km_hash_equal(&idx->weights_id, &w.id));
	ck_assert_uint_eq(idx->weights_size, size);

	snprintf(want_path, sizeof(want_path), "%s/%s.kmw", f.wdir, km_hash_to_hex(&w.id, hex));
	ck_assert_str_eq(w.path, want_path);
	ck_assert_int_eq(km_weights_id_from_path(w.path, &from_name), 0);
	ck_assert(km_hash_equal(&from_name, &w.id));

	ck_assert_int_eq(stat(w.path, &st), 0);
	ck_assert_uint_eq(st.st_mode & 07777, 0444);
	ck_assert_uint_eq((uint64_t)st.st_size, size);

	p = read_path(w.path, &n);
	ck_assert_uint_eq(n, size);
	km_hash_buf(p, n, &h);
	ck_assert(km_hash_equal(&h, &w.id));
	for (size_t i = 0; i < nl; i++) {
		const struct model *m = &f.models[i];

		ck_assert_str_eq(l[i].name, m->name);
		ck_assert_uint_eq(l[i].size, m->size);
		ck_assert_uint_eq(l[i].offset % KM_WEIGHTS_ALIGN, 0);
		ck_assert_msg(km_is_zero(p + end, (size_t)(l[i].offset - end)),
			      "padding before %s not zero", m->name);
		ck_assert_msg(memcmp(p + l[i].offset, m->bytes, m->size) == 0, "%s differs",
			      m->name);
		end = l[i].offset + l[i].size;
	}
	ck_assert_uint_eq(end, n);
	/* Offsets as the rule says: a at 0, empty and b at 4 MiB, c at 6 MiB. */
	ck_assert_uint_eq(l[1].offset, 2 * KM_WEIGHTS_ALIGN);
	ck_assert_uint_eq(l[2].offset, 2 * KM_WEIGHTS_ALIGN);
	ck_assert_uint_eq(l[3].offset, 3 * KM_WEIGHTS_ALIGN);
	/* The file, its .ok record, no temporary files. */
	ck_assert_int_eq(count_entries(f.wdir), 2);

	free(p);
	free(l);
	km_weights_index_free(idx);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_materialize_twice_writes_nothing)
{
	struct fixture f;
	struct km_weights_info w1, w2;
	struct stat st1, st2;

	fixture_setup(&f);
	materialize_ok(&f, false, &w1);
	ck_assert_int_eq(stat(w1.path, &st1), 0);
	materialize_ok(&f, false, &w2);
	ck_assert(!w2.written);
	ck_assert_uint_eq(w2.bytes_hashed, 0);
	ck_assert_str_eq(w2.path, w1.path);
	ck_assert(km_hash_equal(&w2.id, &w1.id));
	ck_assert_uint_eq(w2.size, w1.size);
	ck_assert_int_eq(stat(w2.path, &st2), 0);
	ck_assert_uint_eq(st2.st_ino, st1.st_ino);
	ck_assert_int_eq(st2.st_ctim.tv_nsec, st1.st_ctim.tv_nsec);
	ck_assert_int_eq(count_entries(f.wdir), 2);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_check_trusts_record_until_changed)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	struct timespec times[2];
	char ok[4200];
	struct stat st;
	uint64_t hashed = 99;
	uint8_t byte;
	int fd;

	fixture_setup(&f);
	materialize_ok(&f, false, &w);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size, &hashed, &err), 0);
	ck_assert_uint_eq(hashed, 0);

	/* Without the record the file is hashed, and the record comes back. */
	snprintf(ok, sizeof(ok), "%s.ok", w.path);
	ck_assert_int_eq(unlink(ok), 0);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, UINT64_MAX, &hashed, &err), 0);
	ck_assert_uint_eq(hashed, w.size);
	ck_assert_int_eq(access(ok, F_OK), 0);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size, &hashed, &err), 0);
	ck_assert_uint_eq(hashed, 0);

	/* A wrong size is caught before any hashing. */
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size + 1, &hashed, &err), -EBADMSG);

	/* Altered in place, mtime put back: ctime still tells. */
	ck_assert_int_eq(stat(w.path, &st), 0);
	times[0] = st.st_atim;
	times[1] = st.st_mtim;
	ck_assert_int_eq(chmod(w.path, 0644), 0);
	fd = open(w.path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &byte, 1, 12345), 1);
	byte ^= 0x01;
	ck_assert_int_eq(pwrite(fd, &byte, 1, 12345), 1);
	close(fd);
	ck_assert_int_eq(chmod(w.path, 0444), 0);
	ck_assert_int_eq(utimensat(AT_FDCWD, w.path, times, 0), 0);
	err.msg[0] = 0;
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size, &hashed, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, "does not hash to its name"), "%s", err.msg);
	ck_assert_msg(strstr(err.msg, w.path), "%s", err.msg);
	ck_assert_uint_eq(hashed, 0); /* untouched on failure */

	/* materialize replaces the damaged file with a verified one */
	{
		struct km_weights_info w2;
		uint8_t *p;
		size_t n;
		struct km_hash h;

		materialize_ok(&f, false, &w2);
		ck_assert(w2.written);
		p = read_path(w2.path, &n);
		km_hash_buf(p, n, &h);
		ck_assert(km_hash_equal(&h, &w.id));
		free(p);
	}
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_check_missing_and_not_regular)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	uint64_t hashed;

	fixture_setup(&f);
	materialize_ok(&f, false, &w);
	ck_assert_int_eq(unlink(w.path), 0);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size, &hashed, &err), -ENOENT);
	ck_assert_msg(strstr(err.msg, "is missing") && strstr(err.msg, w.path), "%s", err.msg);
	ck_assert_int_eq(mkdir(w.path, 0755), 0);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, UINT64_MAX, &hashed, &err), -EINVAL);
	ck_assert_int_eq(rmdir(w.path), 0);
	/* The index records the id: materialize writes it again. */
	materialize_ok(&f, false, &w);
	ck_assert(w.written);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size, &hashed, &err), 0);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_missing_chunk_named)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	char chunk[300], hex[KM_HASH_HEX_SIZE];
	struct km_hash id;

	fixture_setup(&f);
	id = first_chunk(&f, 2, chunk, sizeof(chunk));
	ck_assert_int_eq(km_store_remove(f.store, &id), 0);
	ck_assert_int_eq(km_weights_materialize(f.store, "m", NULL, false, &w, &err), -ENOENT);
	ck_assert_msg(strstr(err.msg, km_hash_to_hex(&id, hex)), "%s", err.msg);
	ck_assert_msg(strstr(err.msg, "missing") && strstr(err.msg, "b.bin"), "%s", err.msg);
	/* Nothing left behind. */
	ck_assert_int_eq(count_entries(f.wdir), 0);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_corrupt_chunk_named)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	char chunk[300], hex[KM_HASH_HEX_SIZE];
	struct km_hash id;
	uint8_t byte;
	int fd;

	fixture_setup(&f);
	id = first_chunk(&f, 3, chunk, sizeof(chunk));
	fd = open(chunk, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &byte, 1, 10), 1);
	byte ^= 0x80;
	ck_assert_int_eq(pwrite(fd, &byte, 1, 10), 1);
	close(fd);
	ck_assert_int_eq(km_weights_materialize(f.store, "m", NULL, false, &w, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, km_hash_to_hex(&id, hex)), "%s", err.msg);
	ck_assert_msg(strstr(err.msg, "corrupt") && strstr(err.msg, "c.bin"), "%s", err.msg);
	ck_assert_int_eq(count_entries(f.wdir), 0);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_recorded_id_mismatch)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_weights_index *idx;
	struct km_error err = { { 0 } };
	char hex[KM_HASH_HEX_SIZE];
	struct km_hash other;

	fixture_setup(&f);
	/* The index says another file: a node's materialization disagrees. */
	idx = read_index(f.store, "m");
	{
		struct km_weights_file_layout *l;
		size_t n;

		ck_assert_int_eq(km_weights_layout(idx, &l, &n, &idx->weights_size), 0);
		free(l);
	}
	memset(other.b, 0x5a, sizeof(other.b));
	idx->weights_id = other;
	write_index(f.store, "m", idx);
	ck_assert_int_eq(km_weights_materialize(f.store, "m", NULL, false, &w, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, km_hash_to_hex(&other, hex)), "%s", err.msg);
	ck_assert_msg(strstr(err.msg, "materialize to"), "%s", err.msg);
	ck_assert_int_eq(count_entries(f.wdir), 0);

	/* A recorded size that the files cannot have. */
	idx->weights_size += 1;
	write_index(f.store, "m", idx);
	ck_assert_int_eq(km_weights_materialize(f.store, "m", NULL, false, &w, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, "bytes"), "%s", err.msg);
	km_weights_index_free(idx);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_concurrent_processes)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	pid_t pids[4];
	uint64_t hashed;

	fixture_setup(&f);
	for (int i = 0; i < 4; i++) {
		pids[i] = fork();
		ck_assert_int_ge(pids[i], 0);
		if (pids[i] == 0) {
			struct km_store *s = NULL;
			struct km_weights_info cw;
			int r = km_store_open(f.store_path, NOSYNC, NULL, &s);

			if (r == 0)
				r = km_weights_materialize(s, "m", NULL, false, &cw, NULL);
			if (r < 0)
				fprintf(stderr, "child %d: %s\n", i, strerror(-r));
			km_store_free(s);
			_exit(r == 0 ? 0 : 1);
		}
	}
	for (int i = 0; i < 4; i++) {
		int status;

		ck_assert_int_eq(waitpid(pids[i], &status, 0), pids[i]);
		ck_assert(WIFEXITED(status));
		ck_assert_int_eq(WEXITSTATUS(status), 0);
	}
	/* One file, its record, nothing else; and it checks out. */
	ck_assert_int_eq(count_entries(f.wdir), 2);
	materialize_ok(&f, false, &w);
	ck_assert(!w.written);
	ck_assert_int_eq(km_weights_check(w.path, &w.id, w.size, &hashed, &err), 0);
	ck_assert_uint_eq(hashed, 0);
	fixture_teardown(&f);
}
END_TEST

struct thread_arg {
	struct km_store *s;
	struct km_weights_info w;
	struct km_error err;
	int r;
};

static void *materialize_thread(void *p)
{
	struct thread_arg *a = p;

	a->r = km_weights_materialize(a->s, "m", NULL, false, &a->w, &a->err);
	return NULL;
}

START_TEST(test_weights_concurrent_threads)
{
	struct fixture f;
	struct thread_arg a[3];
	pthread_t t[3];
	int written = 0;

	fixture_setup(&f);
	for (int i = 0; i < 3; i++) {
		memset(&a[i], 0, sizeof(a[i]));
		a[i].s = f.store; /* one handle, shared: it is thread-safe */
		ck_assert_int_eq(pthread_create(&t[i], NULL, materialize_thread, &a[i]), 0);
	}
	for (int i = 0; i < 3; i++) {
		ck_assert_int_eq(pthread_join(t[i], NULL), 0);
		ck_assert_msg(a[i].r == 0, "thread %d: %d %s", i, a[i].r, a[i].err.msg);
		ck_assert_str_eq(a[i].w.path, a[0].w.path);
		written += a[i].w.written;
	}
	ck_assert_int_ge(written, 1);
	ck_assert_int_eq(count_entries(f.wdir), 2);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_resolve_seeds_once)
{
	struct fixture f;
	struct km_weights_info w1, w2, w3;
	struct km_error err = { { 0 } };
	char name[64], name2[64], want[64], hex[KM_HASH_HEX_SIZE], root[300];
	struct km_hash h;
	struct stat st1, st2;
	uint8_t *p;
	size_t n;
	int r;

	fixture_setup(&f);
	km_hash_buf(f.models[0].bytes, f.models[0].size, &h);
	snprintf(want, sizeof(want), "file-%.16s", km_hash_to_hex(&h, hex));
	r = km_weights_resolve(f.store, f.paths[0], NULL, false, &w1, name, sizeof(name), &err);
	ck_assert_msg(r == 0, "resolve: %d %s", r, err.msg);
	ck_assert_str_eq(name, want);
	ck_assert(w1.written);
	/* One model file at offset 0: the weights file is the model file. */
	p = read_path(w1.path, &n);
	ck_assert_uint_eq(n, f.models[0].size);
	ck_assert(memcmp(p, f.models[0].bytes, n) == 0);
	free(p);
	snprintf(root, sizeof(root), "%s/indexes/%s.kmidx", f.store_path, name);
	ck_assert_int_eq(stat(root, &st1), 0);

	/* Again: no seed (the index file is the same inode), nothing written. */
	r = km_weights_resolve(f.store, f.paths[0], NULL, false, &w2, name2, sizeof(name2), &err);
	ck_assert_msg(r == 0, "resolve: %d %s", r, err.msg);
	ck_assert_str_eq(name2, name);
	ck_assert(!w2.written);
	ck_assert_uint_eq(w2.bytes_hashed, 0);
	ck_assert_str_eq(w2.path, w1.path);
	ck_assert_int_eq(stat(root, &st2), 0);
	ck_assert_uint_eq(st2.st_ino, st1.st_ino);

	/* index:NAME names an index; an unknown one is -ENOENT. */
	r = km_weights_resolve(f.store, "index:m", NULL, false, &w3, name2, sizeof(name2), &err);
	ck_assert_msg(r == 0, "resolve: %d %s", r, err.msg);
	ck_assert_str_eq(name2, "m");
	ck_assert_str_ne(w3.path, w1.path);
	ck_assert_int_eq(km_weights_resolve(f.store, "index:nope", NULL, false, &w3, NULL, 0, &err),
			 -ENOENT);
	ck_assert_msg(strstr(err.msg, "nope"), "%s", err.msg);
	ck_assert_int_eq(km_weights_resolve(f.store, "/nonexistent/model", NULL, false, &w3, NULL,
					    0, &err),
			 -ENOENT);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_resolve_rejects_foreign_index)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	const char *paths[1];
	char name[64], hex[KM_HASH_HEX_SIZE];
	struct km_hash h;

	fixture_setup(&f);
	/* An index named after model a's hash that holds model c. */
	km_hash_buf(f.models[0].bytes, f.models[0].size, &h);
	snprintf(name, sizeof(name), "file-%.16s", km_hash_to_hex(&h, hex));
	paths[0] = f.paths[3];
	ck_assert_int_eq(km_seed(f.store, name, paths, 1, 1, NULL, &err), 0);
	ck_assert_int_eq(km_weights_resolve(f.store, f.paths[0], NULL, false, &w, NULL, 0, &err),
			 -EBADMSG);
	ck_assert_msg(strstr(err.msg, "does not describe"), "%s", err.msg);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_weights_weights_dir_and_names)
{
	struct fixture f;
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	struct km_hash id;
	char dir[300], buf[300];

	fixture_setup(&f);
	ck_assert_int_eq(km_weights_dir(f.store, NULL, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, f.wdir);
	ck_assert_int_eq(km_weights_dir(f.store, "", buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, f.wdir);
	ck_assert_int_eq(km_weights_dir(f.store, "/x/y", buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/x/y");
	ck_assert_int_eq(km_weights_dir(f.store, NULL, buf, 8), -ENAMETOOLONG);

	/* A weights dir of its own, made with its parents. */
	snprintf(dir, sizeof(dir), "%s/deep/w", f.root);
	ck_assert_int_eq(km_weights_materialize(f.store, "m", dir, false, &w, &err), 0);
	ck_assert(strncmp(w.path, dir, strlen(dir)) == 0);
	ck_assert_int_eq(count_entries(dir), 2);

	ck_assert_int_eq(km_weights_id_from_path(w.path, &id), 0);
	ck_assert(km_hash_equal(&id, &w.id));
	ck_assert_int_eq(km_weights_id_from_path(w.path + strlen(dir) + 1, &id), 0);
	ck_assert_int_eq(km_weights_id_from_path("/a/b.kmw", &id), -EINVAL);
	ck_assert_int_eq(
		km_weights_id_from_path(
			"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.kmx", &id),
		-EINVAL);
	ck_assert_int_eq(
		km_weights_id_from_path(
			"0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef.kmw", &id),
		-EINVAL);
	ck_assert_int_eq(
		km_weights_id_from_path(
			"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0.kmw", &id),
		-EINVAL);
	ck_assert_int_eq(
		km_weights_id_from_path(
			"x/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.kmw", &id),
		0);
	ck_assert_uint_eq(id.b[0], 0x01);
	ck_assert_uint_eq(id.b[31], 0xef);
	ck_assert_int_eq(km_weights_materialize(f.store, "no/such", NULL, false, &w, &err),
			 -EINVAL);
	fixture_teardown(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("weights");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_weights_layout_aligned_in_order);
	tcase_add_test(tc, test_weights_materialize_bytes);
	tcase_add_test(tc, test_weights_materialize_twice_writes_nothing);
	tcase_add_test(tc, test_weights_check_trusts_record_until_changed);
	tcase_add_test(tc, test_weights_check_missing_and_not_regular);
	tcase_add_test(tc, test_weights_missing_chunk_named);
	tcase_add_test(tc, test_weights_corrupt_chunk_named);
	tcase_add_test(tc, test_weights_recorded_id_mismatch);
	tcase_add_test(tc, test_weights_concurrent_processes);
	tcase_add_test(tc, test_weights_concurrent_threads);
	tcase_add_test(tc, test_weights_resolve_seeds_once);
	tcase_add_test(tc, test_weights_resolve_rejects_foreign_index);
	tcase_add_test(tc, test_weights_weights_dir_and_names);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
