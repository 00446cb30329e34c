/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Split and join on synthetic image directories: a pages-1.img holding
 * random bytes, a model at an unaligned offset and zeros, beside small
 * images. The real-CRIU round trip is tests/integration/.
 */
#include <check.h>

#include "km-check.h"
#include "km-files.h"
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chunker.h"
#include "criuimg.h"
#include "image.h"
#include "late.h"

#define MODEL_SIZE (8u << 20)
#define PAGES_RANDOM_HEAD ((1u << 20) + 123)
#define PAGES_ZERO (2u << 20)
#define PAGES_RANDOM_TAIL (1u << 20)

struct fixture {
	char root[64];
	char dir[128];
	char store_path[128];
	char model_path[128];
	uint8_t *pages;
	size_t pages_size;
	struct km_store *store;
	int dirfd;
};

static void fixture_setup(struct fixture *f, const struct km_chunker_params *params)
{
	uint8_t *model = malloc(MODEL_SIZE);
	uint8_t small[3000];
	size_t off = 0;
	int fd;

	strcpy(f->root, "/tmp/km-test-image-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->root));
	snprintf(f->dir, sizeof(f->dir), "%s/img", f->root);
	snprintf(f->store_path, sizeof(f->store_path), "%s/store", f->root);
	snprintf(f->model_path, sizeof(f->model_path), "%s/model.bin", f->root);
	ck_assert_int_eq(mkdir(f->dir, 0700), 0);
	f->dirfd = open(f->dir, O_RDONLY | O_DIRECTORY);
	ck_assert_int_ge(f->dirfd, 0);

	fill_random(model, MODEL_SIZE, 42);
	fd = open(f->model_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_eq(km_write_full(fd, model, MODEL_SIZE), 0);
	close(fd);

	f->pages_size = PAGES_RANDOM_HEAD + MODEL_SIZE + PAGES_ZERO + PAGES_RANDOM_TAIL;
	f->pages = calloc(1, f->pages_size);
	fill_random(f->pages, PAGES_RANDOM_HEAD, 1);
	off += PAGES_RANDOM_HEAD;
	memcpy(f->pages + off, model, MODEL_SIZE);
	off += MODEL_SIZE + PAGES_ZERO;
	fill_random(f->pages + off, PAGES_RANDOM_TAIL, 2);
	write_file(f->dirfd, "pages-1.img", f->pages, f->pages_size);
	fill_random(small, sizeof(small), 3);
	write_file(f->dirfd, "inventory.img", small, 40);
	write_file(f->dirfd, "core-1.img", small, sizeof(small));
	write_file(f->dirfd, "pagemap-1.img", small + 100, 700);
	free(model);

	ck_assert_int_eq(km_store_open(f->store_path, KM_STORE_CREATE | KM_STORE_NOSYNC, params,
				       &f->store),
			 0);
}

static void fixture_teardown(struct fixture *f)
{
	km_store_free(f->store);
	close(f->dirfd);
	free(f->pages);
	rm_tree(f->root);
}

static void seed_model(struct fixture *f)
{
	const char *paths[] = { f->model_path };
	struct km_seed_stats st;
	struct km_error err = { { 0 } };

	ck_assert_int_eq(km_seed(f->store, "model", paths, 1, 2, &st, &err), 0);
	ck_assert_uint_eq(st.bytes, MODEL_SIZE);
	ck_assert_uint_eq(st.bytes_added, MODEL_SIZE);
}

static void split(struct fixture *f, bool add_chunks, struct km_split_stats *st)
{
	struct km_split_opts o = { .threads = 2, .add_chunks = add_chunks };
	struct km_error err = { { 0 } };
	int r = km_image_split(f->dirfd, f->store, &o, st, &err);

	ck_assert_msg(r == 0, "split: %d %s", r, err.msg);
}

/* Names in the directory, sorted, joined by spaces. */
static void dir_listing(const char *dir, char *buf, size_t n)
{
	struct dirent **list;
	int k = scandir(dir, &list, NULL, alphasort);

	ck_assert_int_ge(k, 0);
	buf[0] = 0;
	for (int i = 0; i < k; i++) {
		if (list[i]->d_name[0] != '.' || strlen(list[i]->d_name) > 2) {
			strncat(buf, list[i]->d_name, n - strlen(buf) - 2);
			strcat(buf, " ");
		}
		free(list[i]);
	}
	free(list);
}

static void assert_pages_intact(struct fixture *f)
{
	size_t n;
	uint8_t *p = read_all(f->dirfd, "pages-1.img", &n);

	ck_assert_uint_eq(n, f->pages_size);
	ck_assert(memcmp(p, f->pages, n) == 0);
	free(p);
}

/*
 * The split's extents of pages-1.img are what cutting with the chunker and
 * looking every chunk up by its SHA-256 gives: comparing bytes and
 * following successors changes how chunks are found, never the result.
 */
static void assert_extents_as_by_hash(struct fixture *f, const struct km_chunker_params *p)
{
	struct km_manifest *m = NULL;
	struct km_file_entry want = { 0 };
	const struct km_file_entry *got = NULL;
	struct km_error err = { { 0 } };
	struct km_chunker ch;
	uint64_t pos = 0, delta = 0;

	ck_assert_int_eq(km_image_read_manifest(f->dirfd, &m, &err), 0);
	for (size_t i = 0; i < m->n_files; i++)
		if (strcmp(m->files[i].name, "pages-1.img") == 0)
			got = &m->files[i];
	ck_assert_ptr_nonnull(got);
	ck_assert_int_eq(km_chunker_init(&ch, p), 0);
	while (pos < f->pages_size) {
		size_t k = km_chunker_scan(&ch, f->pages + pos, f->pages_size - pos);
		struct km_extent e = { 0 };

		if (k == KM_CHUNKER_NO_BOUNDARY) {
			k = f->pages_size - pos;
			km_chunker_reset(&ch);
		}
		e.length = k;
		km_hash_buf(f->pages + pos, k, &e.id);
		if (km_is_zero(f->pages + pos, k)) {
			e.kind = KM_EXTENT_ZERO;
		} else if (km_store_has(f->store, &e.id) == 1) {
			e.kind = KM_EXTENT_CHUNK;
		} else {
			e.kind = KM_EXTENT_DELTA;
			e.delta_offset = delta;
			delta += k;
		}
		if (e.kind != KM_EXTENT_CHUNK)
			memset(&e.id, 0, sizeof(e.id));
		ck_assert_int_eq(km_file_entry_add_extent(&want, &e), 0);
		pos += k;
	}
	ck_assert_uint_eq(got->n_extents, want.n_extents);
	for (size_t i = 0; i < want.n_extents; i++) {
		const struct km_extent *a = &got->extents[i], *b = &want.extents[i];

		ck_assert_int_eq(a->kind, b->kind);
		ck_assert_uint_eq(a->length, b->length);
		if (a->kind == KM_EXTENT_CHUNK)
			ck_assert(km_hash_equal(&a->id, &b->id));
		if (a->kind == KM_EXTENT_DELTA)
			ck_assert_uint_eq(a->delta_offset, b->delta_offset);
	}
	km_file_entry_clear(&want);
	km_manifest_free(m);
}

START_TEST(test_image_split_join_round_trip)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	char before[1024], after[1024];
	struct stat sb;

	fixture_setup(&f, NULL);
	seed_model(&f);
	dir_listing(f.dir, before, sizeof(before));
	split(&f, false, &st);

	ck_assert_int_eq(km_image_is_split(f.dirfd), 1);
	ck_assert_int_lt(fstatat(f.dirfd, "pages-1.img", &sb, 0), 0);
	ck_assert_int_eq(fstatat(f.dirfd, "core-1.img", &sb, 0), 0);
	ck_assert_uint_eq(st.files_split, 1);
	ck_assert_uint_eq(st.files_kept, 3);
	/* The model, shifted by an odd offset, is found in the store. */
	ck_assert_uint_ge(st.bytes_referenced, MODEL_SIZE - 2 * KM_CHUNK_MAX_DEFAULT);
	ck_assert_uint_ge(st.bytes_zero, PAGES_ZERO - 2 * KM_CHUNK_MAX_DEFAULT);
	ck_assert_uint_le(st.bytes_delta,
			  PAGES_RANDOM_HEAD + PAGES_RANDOM_TAIL + 4 * KM_CHUNK_MAX_DEFAULT);
	ck_assert_uint_eq(st.bytes_referenced + st.bytes_zero + st.bytes_delta, f.pages_size);
	ck_assert_uint_eq(st.chunks_added, 0);
	assert_extents_as_by_hash(&f, km_store_chunker_params(f.store));

	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, &js, &err), 0);
	ck_assert_uint_eq(js.files_joined, 1);
	ck_assert_uint_eq(js.bytes_written, f.pages_size);
	ck_assert_uint_eq(js.bytes_from_store, st.bytes_referenced);
	assert_pages_intact(&f);
	dir_listing(f.dir, after, sizeof(after));
	ck_assert_str_eq(before, after);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_split_without_store_match_goes_to_delta)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_opts jo = { .threads = 1 };
	struct km_error err = { { 0 } };

	fixture_setup(&f, NULL);
	split(&f, false, &st);
	ck_assert_uint_eq(st.bytes_referenced, 0);
	ck_assert_uint_eq(st.bytes_zero + st.bytes_delta, f.pages_size);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_add_chunks_dedups_second_dump)
{
	struct fixture f;
	struct km_split_stats st1, st2;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };

	fixture_setup(&f, NULL);
	split(&f, true, &st1);
	ck_assert_uint_gt(st1.chunks_added, 0);
	ck_assert_uint_eq(st1.bytes_delta, 0);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);

	/* The same image again: nothing new, everything referenced. */
	split(&f, true, &st2);
	ck_assert_uint_eq(st2.chunks_added, 0);
	ck_assert_uint_eq(st2.bytes_referenced, st1.bytes_added + st1.bytes_referenced);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_split_twice_refused)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_split_opts o = { .threads = 1 };
	struct km_error err = { { 0 } };

	fixture_setup(&f, NULL);
	split(&f, false, &st);
	ck_assert_int_eq(km_image_split(f.dirfd, f.store, &o, &st, &err), -EEXIST);
	ck_assert(strstr(err.msg, "already split"));
	fixture_teardown(&f);
}
END_TEST

struct first_chunk {
	const struct fixture *f;
	char path[512];
};

static int find_first_chunk(const struct km_hash *id, uint64_t size, void *userdata)
{
	struct first_chunk *fc = userdata;
	char hex[KM_HASH_HEX_SIZE];

	(void)size;
	km_hash_to_hex(id, hex);
	snprintf(fc->path, sizeof(fc->path), "%s/chunks/%.2s/%s", fc->f->store_path, hex, hex);
	return 1;
}

/* Join must fail with 'expect', name 'what', and leave the directory as it was. */
static void expect_join_failure(struct fixture *f, int expect, const char *what)
{
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	char before[1024], after[1024];
	int r;

	dir_listing(f->dir, before, sizeof(before));
	r = km_image_join(f->dirfd, f->store, &jo, NULL, &err);
	ck_assert_msg(r == expect, "join gave %d (%s), expected %d", r, err.msg, expect);
	ck_assert_msg(strstr(err.msg, what), "error '%s' does not name '%s'", err.msg, what);
	dir_listing(f->dir, after, sizeof(after));
	ck_assert_str_eq(before, after);
	ck_assert_int_eq(km_image_is_split(f->dirfd), 1);
}

START_TEST(test_image_join_missing_chunk)
{
	struct fixture f;
	struct first_chunk fc = { .f = &f };
	struct km_split_stats st;
	char hex[KM_HASH_HEX_SIZE];

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	ck_assert_int_eq(km_store_foreach(f.store, find_first_chunk, &fc), 1);
	ck_assert_int_eq(unlink(fc.path), 0);
	strcpy(hex, strrchr(fc.path, '/') + 1);
	expect_join_failure(&f, -ENOENT, hex);
	expect_join_failure(&f, -ENOENT, "missing from the store");
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_join_corrupt_chunk)
{
	struct fixture f;
	struct first_chunk fc = { .f = &f };
	struct km_split_stats st;
	char hex[KM_HASH_HEX_SIZE];
	int fd;
	uint8_t b;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	ck_assert_int_eq(km_store_foreach(f.store, find_first_chunk, &fc), 1);
	fd = open(fc.path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &b, 1, 100), 1);
	b ^= 0x40;
	ck_assert_int_eq(pwrite(fd, &b, 1, 100), 1);
	close(fd);
	strcpy(hex, strrchr(fc.path, '/') + 1);
	expect_join_failure(&f, -EBADMSG, hex);
	expect_join_failure(&f, -EBADMSG, "corrupt");
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_join_corrupt_delta)
{
	struct fixture f;
	struct km_split_stats st;
	struct stat sb;
	int fd;
	uint8_t b;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	fd = openat(f.dirfd, KM_DELTA_NAME, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fstat(fd, &sb), 0);
	ck_assert_int_eq(pread(fd, &b, 1, sb.st_size / 2), 1);
	b ^= 1;
	ck_assert_int_eq(pwrite(fd, &b, 1, sb.st_size / 2), 1);
	close(fd);
	expect_join_failure(&f, -EBADMSG, "delta");
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_join_missing_delta_and_manifest)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	ck_assert_int_eq(unlinkat(f.dirfd, KM_DELTA_NAME, 0), 0);
	expect_join_failure(&f, -ENOENT, KM_DELTA_NAME);
	ck_assert_int_eq(unlinkat(f.dirfd, KM_MANIFEST_NAME, 0), 0);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), -ENOENT);
	ck_assert(strstr(err.msg, KM_MANIFEST_NAME));
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_join_changed_kept_file)
{
	struct fixture f;
	struct km_split_stats st;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	write_file(f.dirfd, "core-1.img", "something else", 14);
	expect_join_failure(&f, -EBADMSG, "core-1.img");
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_join_foreign_delta)
{
	struct fixture f;
	struct km_split_stats st;
	size_t n;
	uint8_t *other;
	char dir2[200];
	int dirfd2;

	/* Split a second image and put its delta beside the first manifest. */
	fixture_setup(&f, NULL);
	snprintf(dir2, sizeof(dir2), "%s/img2", f.root);
	ck_assert_int_eq(mkdir(dir2, 0700), 0);
	dirfd2 = open(dir2, O_RDONLY | O_DIRECTORY);
	fill_random(f.pages, 4096, 77);
	write_file(dirfd2, "pages-1.img", f.pages, f.pages_size);
	{
		struct km_split_opts o = { .threads = 1 };
		struct km_error err = { { 0 } };

		ck_assert_int_eq(km_image_split(dirfd2, f.store, &o, &st, &err), 0);
	}
	split(&f, false, &st);
	other = read_all(dirfd2, KM_DELTA_NAME, &n);
	write_file(f.dirfd, KM_DELTA_NAME, other, n);
	free(other);
	expect_join_failure(&f, -EBADMSG, "does not belong");
	close(dirfd2);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_gc_keeps_referenced)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_store_gc_stats gs;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	struct km_store *ex = NULL;
	struct km_hash junk_id;
	uint8_t junk[5000];

	fixture_setup(&f, NULL);
	split(&f, true, &st);
	fill_random(junk, sizeof(junk), 99);
	km_hash_buf(junk, sizeof(junk), &junk_id);
	ck_assert_int_eq(km_store_put(f.store, &junk_id, junk, sizeof(junk)), 0);
	km_store_free(f.store);
	f.store = NULL;

	ck_assert_int_eq(km_store_open(f.store_path, KM_STORE_EXCLUSIVE | KM_STORE_NOSYNC, NULL, &ex),
			 0);
	ck_assert_int_eq(km_image_store_gc(ex, &gs, &err), 0);
	ck_assert_uint_eq(gs.chunks_removed, 1);
	ck_assert_int_eq(km_store_has(ex, &junk_id), 0);
	km_store_free(ex);

	ck_assert_int_eq(km_store_open(f.store_path, KM_STORE_NOSYNC, NULL, &f.store), 0);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_image_small_chunks_round_trip)
{
	struct km_chunker_params p = { 2048, 8192, 32768 };
	struct fixture f;
	struct km_split_stats st;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };

	fixture_setup(&f, &p);
	seed_model(&f);
	split(&f, false, &st);
	ck_assert_uint_ge(st.bytes_referenced, MODEL_SIZE - 2 * 32768);
	assert_extents_as_by_hash(&f, &p);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

/*
 * A file larger than join's windows: a delta run and a zero run each span
 * several windows. The rebuilt file is byte-identical and its zero run stays
 * a hole (reading it back for the hash allocates nothing).
 */
START_TEST(test_image_join_spans_windows)
{
	const size_t head = (40u << 20) + 4097, zeros = 36u << 20, tail = 3000;
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	uint8_t *model;
	size_t n;
	struct stat sb;

	fixture_setup(&f, NULL);
	seed_model(&f);
	model = read_all(AT_FDCWD, f.model_path, &n);
	ck_assert_uint_eq(n, MODEL_SIZE);
	free(f.pages);
	f.pages_size = head + zeros + MODEL_SIZE + tail;
	f.pages = calloc(1, f.pages_size);
	fill_random(f.pages, head, 31);
	memcpy(f.pages + head + zeros, model, MODEL_SIZE);
	fill_random(f.pages + head + zeros + MODEL_SIZE, tail, 32);
	free(model);
	write_file(f.dirfd, "pages-1.img", f.pages, f.pages_size);

	split(&f, false, &st);
	assert_extents_as_by_hash(&f, km_store_chunker_params(f.store));
	ck_assert_uint_ge(st.bytes_zero, zeros - 2 * KM_CHUNK_MAX_DEFAULT);
	ck_assert_uint_ge(st.bytes_delta, head);
	ck_assert_uint_ge(st.bytes_referenced, MODEL_SIZE - 2 * KM_CHUNK_MAX_DEFAULT);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, &js, &err), 0);
	ck_assert_uint_eq(js.bytes_zero, st.bytes_zero);
	ck_assert_uint_eq(js.bytes_from_delta, st.bytes_delta);
	ck_assert_uint_eq(js.chunks_read, st.chunks_referenced);
	assert_pages_intact(&f);
	ck_assert_int_eq(fstatat(f.dirfd, "pages-1.img", &sb, 0), 0);
	ck_assert_uint_le((uint64_t)sb.st_blocks * 512,
			  f.pages_size - st.bytes_zero + (1u << 20));
	fixture_teardown(&f);
}
END_TEST

/*
 * Many known chunks of one length (constant runs are cut only at max_size):
 * past a few candidates the split looks a chunk up by its SHA-256 instead,
 * and still refers to exactly what the chunker and the hash would.
 */
START_TEST(test_image_split_many_candidates_of_one_length)
{
	struct km_chunker_params p = { 2048, 8192, 32768 };
	enum { BLOCKS = 10 };
	struct fixture f;
	struct km_split_stats st;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	struct km_seed_stats ss;
	const char *paths[1];
	uint8_t *model = malloc(BLOCKS * 32768);
	int fd;

	fixture_setup(&f, &p);
	for (int b = 0; b < BLOCKS; b++)
		memset(model + b * 32768, b + 1, 32768);
	fd = open(f.model_path, O_WRONLY | O_TRUNC);
	ck_assert_int_eq(km_write_full(fd, model, BLOCKS * 32768), 0);
	close(fd);
	paths[0] = f.model_path;
	ck_assert_int_eq(km_seed(f.store, "runs", paths, 1, 2, &ss, &err), 0);
	/* The premise: one chunk per run, all of max_size. */
	ck_assert_uint_eq(ss.chunks, BLOCKS);
	ck_assert_uint_eq(ss.chunks_added, BLOCKS);

	/* The runs in reverse order, then a run the model does not have. */
	free(f.pages);
	f.pages_size = (BLOCKS + 1) * 32768;
	f.pages = malloc(f.pages_size);
	for (int b = 0; b < BLOCKS; b++)
		memcpy(f.pages + b * 32768, model + (BLOCKS - 1 - b) * 32768, 32768);
	memset(f.pages + BLOCKS * 32768, 0x77, 32768);
	write_file(f.dirfd, "pages-1.img", f.pages, f.pages_size);
	free(model);

	split(&f, false, &st);
	assert_extents_as_by_hash(&f, &p);
	ck_assert_uint_eq(st.chunks_referenced, BLOCKS);
	ck_assert_uint_eq(st.bytes_delta, 32768);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

/* Bytes of the model changed in the image: the run of weights breaks there and resumes. */
START_TEST(test_image_split_changed_model_bytes)
{
	struct km_chunker_params p = { 2048, 8192, 32768 };
	struct fixture f;
	struct km_split_stats st;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	const size_t model_at = PAGES_RANDOM_HEAD;

	fixture_setup(&f, &p);
	seed_model(&f);
	/* Three changes inside the model, one of them a single bit. */
	f.pages[model_at + MODEL_SIZE / 4] ^= 1;
	memset(f.pages + model_at + MODEL_SIZE / 2, 0x5a, 3000);
	f.pages[model_at + MODEL_SIZE - 40000] ^= 0x80;
	write_file(f.dirfd, "pages-1.img", f.pages, f.pages_size);
	split(&f, false, &st);
	assert_extents_as_by_hash(&f, &p);
	ck_assert_uint_ge(st.bytes_referenced, MODEL_SIZE - 8 * 32768);
	ck_assert_uint_lt(st.bytes_referenced, MODEL_SIZE);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

/* A corrupt chunk of the store does not compare equal: its bytes go to the delta. */
START_TEST(test_image_split_skips_corrupt_store_chunk)
{
	struct fixture f;
	struct km_split_stats st, clean;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	struct km_manifest *m = NULL;
	struct km_hash victim = { { 0 } };
	char hex[KM_HASH_HEX_SIZE], path[512];
	uint64_t length = 0;
	uint8_t b;
	int fd;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &clean);
	/* A chunk the image refers to: the third of pages-1.img. */
	ck_assert_int_eq(km_image_read_manifest(f.dirfd, &m, &err), 0);
	for (size_t i = 0, seen = 0; i < m->n_files; i++)
		for (size_t j = 0; strcmp(m->files[i].name, "pages-1.img") == 0 &&
				   j < m->files[i].n_extents;
		     j++)
			if (m->files[i].extents[j].kind == KM_EXTENT_CHUNK && ++seen == 3) {
				victim = m->files[i].extents[j].id;
				length = m->files[i].extents[j].length;
			}
	km_manifest_free(m);
	ck_assert_uint_gt(length, 0);
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);

	km_hash_to_hex(&victim, hex);
	snprintf(path, sizeof(path), "%s/chunks/%.2s/%s", f.store_path, hex, hex);
	fd = open(path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &b, 1, (off_t)length - 1), 1);
	b ^= 0x01;
	ck_assert_int_eq(pwrite(fd, &b, 1, (off_t)length - 1), 1);
	close(fd);

	split(&f, false, &st);
	ck_assert_uint_eq(st.chunks_referenced, clean.chunks_referenced - 1);
	ck_assert_uint_eq(st.bytes_referenced, clean.bytes_referenced - length);
	ck_assert_uint_eq(st.bytes_delta, clean.bytes_delta + length);
	/* Nothing refers to the corrupt chunk, so the image joins. */
	ck_assert_int_eq(km_image_join(f.dirfd, f.store, &jo, NULL, &err), 0);
	assert_pages_intact(&f);
	fixture_teardown(&f);
}
END_TEST

/* The path of the n-th (from 1) chunk pages-1.img refers to, and its length. */
static void nth_chunk(struct fixture *f, int nth, char *path, size_t size, uint64_t *ret_length)
{
	struct km_manifest *m = NULL;
	struct km_error err = { { 0 } };
	char hex[KM_HASH_HEX_SIZE];
	int seen = 0;

	ck_assert_int_eq(km_image_read_manifest(f->dirfd, &m, &err), 0);
	for (size_t i = 0; i < m->n_files; i++)
		for (size_t j = 0; strcmp(m->files[i].name, "pages-1.img") == 0 &&
				   j < m->files[i].n_extents;
		     j++)
			if (m->files[i].extents[j].kind == KM_EXTENT_CHUNK && ++seen == nth) {
				km_hash_to_hex(&m->files[i].extents[j].id, hex);
				snprintf(path, size, "%s/chunks/%.2s/%s", f->store_path, hex, hex);
				*ret_length = m->files[i].extents[j].length;
			}
	km_manifest_free(m);
	ck_assert_int_ge(seen, nth);
}

/* Distinct chunks pages-1.img refers to. */
static uint64_t distinct_chunks(struct fixture *f)
{
	struct km_manifest *m = NULL;
	struct km_error err = { { 0 } };
	uint64_t n = 0;

	ck_assert_int_eq(km_image_read_manifest(f->dirfd, &m, &err), 0);
	for (size_t i = 0; i < m->n_files; i++)
		for (size_t j = 0; j < m->files[i].n_extents; j++) {
			bool again = false;

			if (m->files[i].extents[j].kind != KM_EXTENT_CHUNK)
				continue;
			for (size_t k = 0; k < j; k++)
				again |= m->files[i].extents[k].kind == KM_EXTENT_CHUNK &&
					 km_hash_equal(&m->files[i].extents[k].id,
						       &m->files[i].extents[j].id);
			n += !again;
		}
	km_manifest_free(m);
	return n;
}

/* A fresh handle: what the old one recorded is on disk, nothing in memory. */
static void reopen_store(struct fixture *f)
{
	km_store_free(f->store);
	f->store = NULL;
	ck_assert_int_eq(km_store_open(f->store_path, KM_STORE_NOSYNC, NULL, &f->store), 0);
}

static void join_ok(struct fixture *f, struct km_join_stats *js)
{
	struct km_join_opts jo = { .threads = 2, .keep_split = true };
	struct km_error err = { { 0 } };
	int r = km_image_join(f->dirfd, f->store, &jo, js, &err);

	ck_assert_msg(r == 0, "join: %d %s", r, err.msg);
	assert_pages_intact(f);
	/* keep_split: the image stays split, for the next join. */
	ck_assert_int_eq(unlinkat(f->dirfd, "pages-1.img", 0), 0);
}

/* Overwrites a chunk file in place: same inode, same size, other bytes. */
static void rewrite_in_place(const char *path, uint64_t length)
{
	uint8_t *b = malloc(length);
	int fd = open(path, O_RDWR);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(km_pread_full(fd, b, length, 0), (ssize_t)length);
	b[length / 2] ^= 0x10;
	ck_assert_int_eq(km_pwrite_full(fd, b, length, 0), 0);
	close(fd);
	free(b);
}

/*
 * Chunks the store wrote itself are recorded: join copies them without
 * hashing. A chunk rewritten in place afterwards has another ctime, so
 * join hashes it, refuses it and names it and the file.
 */
START_TEST(test_image_join_chunk_rewritten_in_place)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	char path[512];
	uint64_t length;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	reopen_store(&f);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_recorded, distinct_chunks(&f));
	ck_assert_uint_eq(js.chunks_hashed, 0);

	nth_chunk(&f, 2, path, sizeof(path), &length);
	/* A tick of the timestamp clock at most: a later write has a later ctime anyway. */
	usleep(20000);
	rewrite_in_place(path, length);
	reopen_store(&f);
	expect_join_failure(&f, -EBADMSG, strrchr(path, '/') + 1);
	expect_join_failure(&f, -EBADMSG, "(pages-1.img at offset");
	expect_join_failure(&f, -EBADMSG, "corrupt in the store");
	fixture_teardown(&f);
}
END_TEST

/*
 * A chunk file replaced by another file (another inode): the record does
 * not vouch for it, so it is hashed. With the right bytes the join goes on
 * (and records it); with others it is refused.
 */
START_TEST(test_image_join_chunk_replaced)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	char path[512], tmp[600];
	uint64_t length;
	uint8_t *b;
	int fd;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	nth_chunk(&f, 3, path, sizeof(path), &length);
	b = malloc(length);
	fd = open(path, O_RDONLY);
	ck_assert_int_eq(km_read_full(fd, b, length), (ssize_t)length);
	close(fd);

	snprintf(tmp, sizeof(tmp), "%s.new", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
	ck_assert_int_eq(km_write_full(fd, b, length), 0);
	close(fd);
	ck_assert_int_eq(rename(tmp, path), 0);
	/* Hashed in the tick of its last change, it would not be recorded (racily clean). */
	usleep(20000);
	reopen_store(&f);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_hashed, 1);
	ck_assert_uint_eq(js.chunks_recorded, distinct_chunks(&f) - 1);
	/* That join recorded the new file. */
	reopen_store(&f);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_hashed, 0);

	b[0] ^= 1;
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
	ck_assert_int_eq(km_write_full(fd, b, length), 0);
	close(fd);
	ck_assert_int_eq(rename(tmp, path), 0);
	reopen_store(&f);
	expect_join_failure(&f, -EBADMSG, strrchr(path, '/') + 1);
	/* The same, with a symbolic link to a good copy: not a chunk file. */
	b[0] ^= 1;
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
	ck_assert_int_eq(km_write_full(fd, b, length), 0);
	close(fd);
	ck_assert_int_eq(unlink(path), 0);
	ck_assert_int_eq(symlink(tmp, path), 0);
	expect_join_failure(&f, -EBADMSG, strrchr(path, '/') + 1);
	free(b);
	fixture_teardown(&f);
}
END_TEST

/* The record missing, damaged or foreign: every chunk is hashed, and the join is right. */
START_TEST(test_image_join_without_record)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	char rec[256];
	uint64_t chunks;
	uint8_t *p;
	size_t n;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	chunks = distinct_chunks(&f);
	ck_assert_uint_gt(chunks, 4);
	reopen_store(&f);
	snprintf(rec, sizeof(rec), "%s/verified.kmok", f.store_path);

	/* Missing. */
	ck_assert_int_eq(unlink(rec), 0);
	reopen_store(&f);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_hashed, chunks);
	ck_assert_uint_eq(js.chunks_recorded, 0);
	/* ...and what that join hashed, it recorded. */
	reopen_store(&f);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_recorded, chunks);

	/* Every entry damaged (one bit of its inode number): none trusted. */
	km_store_free(f.store);
	f.store = NULL;
	p = read_all(AT_FDCWD, rec, &n);
	ck_assert_uint_ge(n, 16 + 88 * chunks);
	ck_assert_uint_eq((n - 16) % 88, 0);
	for (size_t off = 16; off + 88 <= n; off += 88)
		p[off + 48] ^= 1;
	write_file(AT_FDCWD, rec, p, n);
	ck_assert_int_eq(km_store_open(f.store_path, KM_STORE_NOSYNC, NULL, &f.store), 0);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_hashed, chunks);

	/* A torn last entry: the ones before it still count. */
	reopen_store(&f);
	km_store_free(f.store);
	f.store = NULL;
	free(p);
	p = read_all(AT_FDCWD, rec, &n);
	write_file(AT_FDCWD, rec, p, n - 40);
	ck_assert_int_eq(km_store_open(f.store_path, KM_STORE_NOSYNC, NULL, &f.store), 0);
	join_ok(&f, &js);
	ck_assert_uint_ge(js.chunks_recorded, 1);
	ck_assert_uint_le(js.chunks_hashed, 1);
	ck_assert_uint_eq(js.chunks_hashed + js.chunks_recorded, chunks);

	/* Not a record at all. */
	reopen_store(&f);
	km_store_free(f.store);
	f.store = NULL;
	memset(p, 'x', n);
	write_file(AT_FDCWD, rec, p, n);
	ck_assert_int_eq(km_store_open(f.store_path, KM_STORE_NOSYNC, NULL, &f.store), 0);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_hashed, chunks);
	/* ...replaced by a good one. */
	reopen_store(&f);
	join_ok(&f, &js);
	ck_assert_uint_eq(js.chunks_recorded, chunks);
	free(p);
	fixture_teardown(&f);
}
END_TEST

/* Rewrites DIR's manifest as a 1.1 writer would have: whole-file hashes, no digests. */
static void manifest_to_v11(struct fixture *f)
{
	struct km_manifest *m = NULL;
	struct km_error err = { { 0 } };
	void *buf;
	size_t n;

	ck_assert_int_eq(km_image_read_manifest(f->dirfd, &m, &err), 0);
	m->minor = 1;
	for (size_t i = 0; i < m->n_files; i++)
		if (strcmp(m->files[i].name, "pages-1.img") == 0) {
			km_hash_buf(f->pages, f->pages_size, &m->files[i].sha256);
			memset(&m->files[i].extents_sha256, 0, sizeof(m->files[i].extents_sha256));
		}
	ck_assert_int_eq(km_manifest_encode(m, &buf, &n), 0);
	ck_assert_int_eq(km_write_file_atomic_at(f->dirfd, KM_MANIFEST_NAME, buf, n, false), 0);
	free(buf);
	km_manifest_free(m);
}

/* A 1.1 image joins by its whole-file hash; a corrupt chunk is still named. */
START_TEST(test_image_join_v11_manifest)
{
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	struct km_manifest *m = NULL;
	struct km_error err = { { 0 } };
	char path[512];
	uint64_t length;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	manifest_to_v11(&f);
	ck_assert_int_eq(km_image_read_manifest(f.dirfd, &m, &err), 0);
	ck_assert_uint_eq(m->minor, 1);
	km_manifest_free(m);
	join_ok(&f, &js);
	/* The chunks were not checked one by one: the file hash covered them. */
	ck_assert_uint_eq(js.chunks_hashed + js.chunks_recorded, 0);
	ck_assert_uint_eq(js.chunks_read, st.chunks_referenced);

	nth_chunk(&f, 2, path, sizeof(path), &length);
	rewrite_in_place(path, length);
	expect_join_failure(&f, -EBADMSG, strrchr(path, '/') + 1);
	fixture_teardown(&f);
}
END_TEST

/* A manifest damaged in its extents (a chunk id, with the protobuf intact) is refused by its digest. */
START_TEST(test_image_join_damaged_extents)
{
	struct fixture f;
	struct km_split_stats st;
	uint8_t *p;
	size_t n;
	struct km_manifest *m = NULL;
	struct km_error err = { { 0 } };
	struct km_hash id = { { 0 } };
	uint8_t *hit;

	fixture_setup(&f, NULL);
	seed_model(&f);
	split(&f, false, &st);
	ck_assert_int_eq(km_image_read_manifest(f.dirfd, &m, &err), 0);
	for (size_t i = 0; i < m->n_files; i++)
		for (size_t j = 0; j < m->files[i].n_extents; j++)
			if (m->files[i].extents[j].kind == KM_EXTENT_CHUNK)
				id = m->files[i].extents[j].id;
	km_manifest_free(m);
	p = read_all(f.dirfd, KM_MANIFEST_NAME, &n);
	hit = memmem(p, n, id.b, KM_HASH_SIZE);
	ck_assert_ptr_nonnull(hit);
	hit[5] ^= 0x20;
	write_file(f.dirfd, KM_MANIFEST_NAME, p, n);
	free(p);
	expect_join_failure(&f, -EBADMSG, "digest");
	fixture_teardown(&f);
}
END_TEST

/*
 * The comparing scan in many parts (4 threads: 5 parts of ~4 MiB, their
 * borders inside the model and inside random bytes, small chunks): the
 * extents are exactly the serial scan's, and the image joins.
 */
START_TEST(test_image_split_parts_as_serial)
{
	struct km_chunker_params p = { 2048, 8192, 32768 };
	struct km_split_opts o = { .threads = 4 };
	struct fixture f;
	struct km_split_stats st;
	struct km_join_stats js;
	struct km_error err = { { 0 } };
	uint8_t *model;
	size_t n;

	fixture_setup(&f, &p);
	seed_model(&f);
	model = read_all(AT_FDCWD, f.model_path, &n);
	free(f.pages);
	/* random, model, random, the model again from its middle, zeros */
	f.pages_size = (3u << 20) + MODEL_SIZE + 777 + MODEL_SIZE / 2 + (1u << 20);
	f.pages = calloc(1, f.pages_size);
	fill_random(f.pages, 3u << 20, 61);
	memcpy(f.pages + (3u << 20), model, MODEL_SIZE);
	fill_random(f.pages + (3u << 20) + MODEL_SIZE, 777, 62);
	memcpy(f.pages + (3u << 20) + MODEL_SIZE + 777, model + MODEL_SIZE / 2, MODEL_SIZE / 2);
	free(model);
	write_file(f.dirfd, "pages-1.img", f.pages, f.pages_size);
	ck_assert_int_eq(km_image_split(f.dirfd, f.store, &o, &st, &err), 0);
	assert_extents_as_by_hash(&f, &p);
	ck_assert_uint_ge(st.bytes_referenced, MODEL_SIZE + MODEL_SIZE / 2 - 4 * 32768);
	join_ok(&f, &js);
	fixture_teardown(&f);
}
END_TEST

/* ------------------------------------------------------- late weights */

#define LATE_PAGE 4096u
/* Three pagemap entries over pages-1.img: (vaddr, pages); the rest goes to the last. */
static const uint64_t late_vaddr[3] = { 0x10000000ull, 0x20000000ull, 0x30000000ull };
static const uint64_t late_pages[2] = { 700, 1200 };

struct late_fixture {
	struct fixture f;
	uint64_t n_pages;
	uint64_t entry_pages[3];
	uint64_t entry_off[3]; /* in pages-1.img */
};

/* The model at an unaligned offset across the three entries, page-multiple file. */
static void late_setup(struct late_fixture *lf)
{
	struct km_chunker_params p = { 4096, 16384, 65536 };
	struct km_criu_pagemap pm = { .pages_id = 1 };
	struct km_criu_pme e[3];
	struct km_error err = { { 0 } };
	size_t padded;

	fixture_setup(&lf->f, &p);
	seed_model(&lf->f);
	padded = (lf->f.pages_size + LATE_PAGE - 1) / LATE_PAGE * LATE_PAGE;
	lf->f.pages = realloc(lf->f.pages, padded);
	fill_random(lf->f.pages + lf->f.pages_size, padded - lf->f.pages_size, 77);
	lf->f.pages_size = padded;
	write_file(lf->f.dirfd, "pages-1.img", lf->f.pages, padded);
	lf->n_pages = padded / LATE_PAGE;
	lf->entry_pages[0] = late_pages[0];
	lf->entry_pages[1] = late_pages[1];
	lf->entry_pages[2] = lf->n_pages - late_pages[0] - late_pages[1];
	for (int i = 0; i < 3; i++) {
		lf->entry_off[i] = i ? lf->entry_off[i - 1] + lf->entry_pages[i - 1] * LATE_PAGE : 0;
		e[i] = (struct km_criu_pme){ late_vaddr[i], lf->entry_pages[i],
					     KM_CRIU_PE_PRESENT | KM_CRIU_PE_LAZY };
	}
	pm.n = 3;
	pm.e = e;
	ck_assert_int_eq(km_criu_pagemap_write(lf->f.dirfd, "pagemap-1.img", &pm, &err), 0);
	split(&lf->f, false, &(struct km_split_stats){ 0 });
}

/* Offset in the split pages file of vaddr, by the original pagemap. */
static uint64_t late_off(const struct late_fixture *lf, uint64_t vaddr)
{
	for (int i = 0; i < 3; i++)
		if (vaddr >= late_vaddr[i] && vaddr < late_vaddr[i] + lf->entry_pages[i] * LATE_PAGE)
			return lf->entry_off[i] + (vaddr - late_vaddr[i]);
	ck_abort_msg("vaddr 0x%llx outside the pagemap", (unsigned long long)vaddr);
	return 0;
}

/* Joins lf's image with late weights: the plan, never NULL. */
static struct km_late_plan *late_join(struct late_fixture *lf, struct km_join_stats *js)
{
	struct km_join_opts o = { .threads = 2 };
	struct km_late_plan *plan = NULL;
	struct km_error err = { { 0 } };

	o.late = &plan;
	ck_assert_msg(km_image_join(lf->f.dirfd, lf->f.store, &o, js, &err) == 0, "join: %s",
		      err.msg);
	ck_assert_ptr_nonnull(plan);
	return plan;
}

static uint8_t *chunk_bytes(struct km_store *s, const struct km_late_piece *p)
{
	uint8_t *buf = malloc(p->chunk_length);
	size_t n = 0;

	ck_assert_int_eq(km_store_get(s, &p->id, buf, p->chunk_length, &n), 0);
	ck_assert_uint_eq(n, p->chunk_length);
	return buf;
}

/*
 * Joined with late weights: the rebuilt pages file and pagemap plus the
 * plan's pieces give back every byte of the process's memory, once; the
 * weights' pages are not in the pages file; undo restores the split image.
 */
START_TEST(test_image_join_late_weights)
{
	struct late_fixture lf;
	struct km_late_plan *plan;
	struct km_join_stats js;
	struct km_criu_pagemap pm = { 0 };
	struct km_error err = { { 0 } };
	char split_listing[4096], listing[4096];
	uint8_t *pages, *mem, *seen, *orig_pm, *pm_now;
	size_t n, orig_pm_size, pm_size;
	uint64_t pos = 0;
	struct km_late_task *t;

	late_setup(&lf);
	dir_listing(lf.f.dir, split_listing, sizeof(split_listing));
	orig_pm = read_all(lf.f.dirfd, "pagemap-1.img", &orig_pm_size);
	plan = late_join(&lf, &js);
	ck_assert_uint_eq(plan->n, 1);
	t = km_late_plan_task(plan, 1);
	ck_assert_ptr_nonnull(t);
	ck_assert_str_eq(t->pages_name, "pages-1.img");
	ck_assert_uint_eq(t->bytes, js.bytes_late);
	/* every whole page of the model but those at its ends and at entry edges */
	ck_assert_uint_ge(t->bytes, MODEL_SIZE - 8 * 65536);
	pages = read_all(lf.f.dirfd, "pages-1.img", &n);
	ck_assert_uint_eq(n + t->bytes, lf.f.pages_size);
	ck_assert_int_eq(km_criu_pagemap_read(lf.f.dirfd, "pagemap-1.img", &pm, &err), 0);
	ck_assert_int_eq(faccessat(lf.f.dirfd, "kvmotion.orig.pagemap-1.img", F_OK, 0), 0);
	ck_assert_int_eq(km_image_is_split(lf.f.dirfd), 1);

	/* Memory as CRIU plus the plan would make it, in split-file coordinates. */
	mem = calloc(1, lf.f.pages_size);
	seen = calloc(1, lf.f.pages_size);
	for (size_t i = 0; i < pm.n; i++) {
		uint64_t len = pm.e[i].nr_pages * LATE_PAGE, at = late_off(&lf, pm.e[i].vaddr);

		ck_assert_uint_eq(pm.e[i].flags, KM_CRIU_PE_PRESENT | KM_CRIU_PE_LAZY);
		ck_assert_uint_eq(late_off(&lf, pm.e[i].vaddr + len - 1), at + len - 1);
		memcpy(mem + at, pages + pos, len);
		memset(seen + at, 1, len);
		pos += len;
	}
	ck_assert_uint_eq(pos, n);
	for (size_t i = 0; i < t->n; i++) {
		const struct km_late_piece *p = &t->pieces[i];
		uint8_t *c = chunk_bytes(lf.f.store, p);
		uint64_t at = late_off(&lf, p->vaddr);

		ck_assert_uint_le(p->chunk_off + p->length, p->chunk_length);
		for (uint64_t k = 0; k < p->length; k++)
			ck_assert_msg(!seen[at + k], "byte %llu twice", (unsigned long long)(at + k));
		memcpy(mem + at, c + p->chunk_off, p->length);
		memset(seen + at, 1, p->length);
		free(c);
	}
	ck_assert(memchr(seen, 0, lf.f.pages_size) == NULL);
	ck_assert(memcmp(mem, lf.f.pages, lf.f.pages_size) == 0);

	/* Back to the split image; a whole join then gives the original file. */
	ck_assert_int_eq(km_image_late_undo(lf.f.dirfd, &err), 0);
	dir_listing(lf.f.dir, listing, sizeof(listing));
	ck_assert_str_eq(listing, split_listing);
	pm_now = read_all(lf.f.dirfd, "pagemap-1.img", &pm_size);
	ck_assert_uint_eq(pm_size, orig_pm_size);
	ck_assert(memcmp(pm_now, orig_pm, pm_size) == 0);
	join_ok(&lf.f, &js); /* and the pages are the original ones */

	free(pm_now);
	free(orig_pm);
	free(mem);
	free(seen);
	free(pages);
	km_criu_pagemap_clear(&pm);
	km_late_plan_free(plan);
	fixture_teardown(&lf.f);
}
END_TEST

/* A join with late weights that never ended: the next join undoes it first. */
START_TEST(test_image_join_after_interrupted_late)
{
	struct late_fixture lf;
	struct km_join_stats js;

	late_setup(&lf);
	km_late_plan_free(late_join(&lf, &js));
	join_ok(&lf.f, &js); /* and the pages are the original ones */
	ck_assert_int_eq(faccessat(lf.f.dirfd, "kvmotion.orig.pagemap-1.img", F_OK, 0), -1);
	fixture_teardown(&lf.f);
}
END_TEST

/*
 * km_late_fill writes the plan into a live process (a child with the three
 * regions mapped where the pagemap says, the second read-only: written
 * through /proc/PID/mem), and names a chunk gone from the store.
 */
START_TEST(test_image_late_fill_process)
{
	struct late_fixture lf;
	struct km_late_plan *plan;
	struct km_join_stats js;
	struct km_error err = { { 0 } };
	struct km_late_task *t;
	int ready[2];
	pid_t child;
	char c;

	late_setup(&lf);
	plan = late_join(&lf, &js);
	t = km_late_plan_task(plan, 1);
	ck_assert_ptr_nonnull(t);
	ck_assert_int_eq(pipe(ready), 0);
	child = fork();
	ck_assert_int_ge(child, 0);
	if (child == 0) {
		for (int i = 0; i < 3; i++) {
			void *want = (void *)(uintptr_t)late_vaddr[i];
			void *p = mmap(want, lf.entry_pages[i] * LATE_PAGE,
				       i == 1 ? PROT_READ : PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
			if (p != want)
				_exit(1);
		}
		if (write(ready[1], "x", 1) != 1)
			_exit(1);
		pause();
		_exit(0);
	}
	close(ready[1]);
	ck_assert_int_eq(read(ready[0], &c, 1), 1);
	ck_assert_msg(km_late_fill(lf.f.store, t, child, 2, &err) == 0, "fill: %s", err.msg);
	for (size_t i = 0; i < t->n; i++) {
		const struct km_late_piece *p = &t->pieces[i];
		uint8_t *got = malloc(p->length);
		struct iovec l = { got, p->length }, r = { (void *)(uintptr_t)p->vaddr, p->length };

		ck_assert_int_eq(process_vm_readv(child, &l, 1, &r, 1, 0), (ssize_t)p->length);
		ck_assert(memcmp(got, lf.f.pages + late_off(&lf, p->vaddr), p->length) == 0);
		free(got);
	}
	/* A chunk gone from the store is named, with its file and address. */
	{
		char hex[KM_HASH_HEX_SIZE], want[160];

		ck_assert_int_eq(km_store_remove(lf.f.store, &t->pieces[t->n / 2].id), 0);
		ck_assert_int_eq(km_late_fill(lf.f.store, t, child, 2, &err), -ENOENT);
		snprintf(want, sizeof(want), "chunk %s (pages-1.img",
			 km_hash_to_hex(&t->pieces[t->n / 2].id, hex));
		ck_assert_msg(strstr(err.msg, want) && strstr(err.msg, "missing from the store"),
			      "%s", err.msg);
	}
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	close(ready[0]);
	km_late_plan_free(plan);
	fixture_teardown(&lf.f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("image");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_image_split_join_round_trip);
	tcase_add_test(tc, test_image_split_without_store_match_goes_to_delta);
	tcase_add_test(tc, test_image_add_chunks_dedups_second_dump);
	tcase_add_test(tc, test_image_split_twice_refused);
	tcase_add_test(tc, test_image_join_missing_chunk);
	tcase_add_test(tc, test_image_join_corrupt_chunk);
	tcase_add_test(tc, test_image_join_corrupt_delta);
	tcase_add_test(tc, test_image_join_missing_delta_and_manifest);
	tcase_add_test(tc, test_image_join_changed_kept_file);
	tcase_add_test(tc, test_image_join_foreign_delta);
	tcase_add_test(tc, test_image_gc_keeps_referenced);
	tcase_add_test(tc, test_image_small_chunks_round_trip);
	tcase_add_test(tc, test_image_join_spans_windows);
	tcase_add_test(tc, test_image_split_changed_model_bytes);
	tcase_add_test(tc, test_image_split_many_candidates_of_one_length);
	tcase_add_test(tc, test_image_split_skips_corrupt_store_chunk);
	tcase_add_test(tc, test_image_join_chunk_rewritten_in_place);
	tcase_add_test(tc, test_image_join_chunk_replaced);
	tcase_add_test(tc, test_image_join_without_record);
	tcase_add_test(tc, test_image_join_v11_manifest);
	tcase_add_test(tc, test_image_join_damaged_extents);
	tcase_add_test(tc, test_image_split_parts_as_serial);
	tcase_add_test(tc, test_image_join_late_weights);
	tcase_add_test(tc, test_image_join_after_interrupted_late);
	tcase_add_test(tc, test_image_late_fill_process);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
