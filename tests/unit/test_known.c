/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The known-chunk table: what the weights indexes name, by length and id, with successors. */
#include <check.h>

#include "km-check.h"
#include "km-files.h"
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format.h"
#include "image.h"
#include "known.h"

#define HALF (1u << 20)

static const struct km_chunker_params small = { 2048, 8192, 32768 };

struct fixture {
	char root[64];
	char store_path[128];
	char model_path[128];
	struct km_store *store;
	struct km_weights_index *idx;
};

/* A model whose second half repeats its first: the same chunks twice. */
static void fixture_setup(struct fixture *f)
{
	uint8_t *model = malloc(2 * HALF + 5000);
	const char *paths[1];
	struct km_seed_stats st;
	struct km_error err = { { 0 } };
	void *buf = NULL;
	size_t n;
	int fd;

	strcpy(f->root, "/tmp/km-test-known-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->root));
	snprintf(f->store_path, sizeof(f->store_path), "%s/store", f->root);
	snprintf(f->model_path, sizeof(f->model_path), "%s/model.bin", f->root);
	fill_random(model, HALF, 5);
	memcpy(model + HALF, model, HALF);
	fill_random(model + 2 * HALF, 5000, 6);
	fd = open(f->model_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_eq(km_write_full(fd, model, 2 * HALF + 5000), 0);
	close(fd);
	free(model);

	ck_assert_int_eq(
		km_store_open(f->store_path, KM_STORE_CREATE | KM_STORE_NOSYNC, &small, &f->store),
		0);
	paths[0] = f->model_path;
	ck_assert_int_eq(km_seed(f->store, "model", paths, 1, 2, &st, &err), 0);
	ck_assert_int_eq(km_store_root_read(f->store, "indexes", "model.kmidx", &buf, &n), 0);
	ck_assert_int_eq(km_weights_index_decode(buf, n, &f->idx, &err), 0);
	free(buf);
	ck_assert_uint_eq(f->idx->n_files, 1);
}

static void fixture_teardown(struct fixture *f)
{
	km_weights_index_free(f->idx);
	km_store_free(f->store);
	rm_tree(f->root);
}

/* True if 'id' is on the chain of chunks of its length. */
static bool on_length_chain(const struct km_known *k, const struct km_hash *id, uint64_t length)
{
	for (uint32_t i = km_known_find(k, length); i != KM_KNOWN_NONE;
	     i = km_known_get(k, i)->same_length) {
		ck_assert_uint_eq(km_known_get(k, i)->length, length);
		if (km_hash_equal(&km_known_get(k, i)->id, id))
			return true;
	}
	return false;
}

START_TEST(test_known_lists_index_chunks)
{
	struct fixture f;
	struct km_known *k = NULL;
	struct km_error err = { { 0 } };
	const struct km_file_entry *file;
	size_t chunks = 0, distinct = 0;

	fixture_setup(&f);
	file = &f.idx->files[0];
	ck_assert_int_eq(km_known_load(f.store, &small, &k, &err), 0);
	for (size_t j = 0; j < file->n_extents; j++) {
		const struct km_extent *e = &file->extents[j];
		bool seen = false;

		ck_assert_int_eq(e->kind, KM_EXTENT_CHUNK);
		chunks++;
		for (size_t i = 0; i < j; i++)
			seen |= km_hash_equal(&file->extents[i].id, &e->id);
		distinct += !seen;
		ck_assert(on_length_chain(k, &e->id, e->length));
		ck_assert_uint_ne(km_known_find_id(k, &e->id), KM_KNOWN_NONE);
		ck_assert_uint_eq(km_known_get(k, km_known_find_id(k, &e->id))->length, e->length);
	}
	/* The repeated half gives the same chunks again: each is listed once. */
	ck_assert_uint_lt(distinct, chunks * 3 / 4);
	ck_assert_uint_eq(km_known_count(k), distinct);
	ck_assert_uint_eq(km_known_find(k, small.max_size + 1), KM_KNOWN_NONE);
	ck_assert_uint_eq(km_known_find(k, 0), KM_KNOWN_NONE);
	km_known_free(k);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_known_successors)
{
	struct fixture f;
	struct km_known *k = NULL;
	struct km_error err = { { 0 } };
	const struct km_file_entry *file;
	const struct km_extent *last;
	uint64_t off = 0;
	size_t linked = 0;

	fixture_setup(&f);
	file = &f.idx->files[0];
	last = &file->extents[file->n_extents - 1];
	ck_assert_int_eq(km_known_load(f.store, &small, &k, &err), 0);
	for (size_t j = 0; j + 1 < file->n_extents; j++) {
		const struct km_known_chunk *c =
			km_known_get(k, km_known_find_id(k, &file->extents[j].id));
		const struct km_extent *e = &file->extents[j + 1];

		off += file->extents[j].length;
		if (off + e->length == file->size) {
			/* Cut by the end of the file: never a successor. */
			ck_assert_uint_eq(c->next, KM_KNOWN_NONE);
			continue;
		}
		/* The first occurrence's successor wins for a repeated chunk. */
		if (c->next != KM_KNOWN_NONE &&
		    km_hash_equal(&km_known_get(k, c->next)->id, &e->id))
			linked++;
		ck_assert_uint_ne(c->next, KM_KNOWN_NONE);
	}
	ck_assert_uint_ge(linked, (file->n_extents - 2) * 3 / 4);
	for (uint32_t i = 0; i < km_known_count(k); i++)
		if (km_known_get(k, i)->next != KM_KNOWN_NONE)
			ck_assert(!km_hash_equal(&km_known_get(k, km_known_get(k, i)->next)->id,
						 &last->id));
	km_known_free(k);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_known_other_params_and_bad_index)
{
	struct fixture f;
	struct km_known *k = NULL;
	struct km_error err = { { 0 } };
	struct km_weights_index other;
	void *buf = NULL;
	size_t n;
	uint32_t count;

	fixture_setup(&f);
	ck_assert_int_eq(km_known_load(f.store, &small, &k, &err), 0);
	count = km_known_count(k);
	km_known_free(k);

	/* An index cut with other parameters names chunks split cannot meet. */
	other = *f.idx;
	other.name = (char *)"other";
	other.chunker = KM_CHUNKER_PARAMS_DEFAULT;
	ck_assert_int_eq(km_weights_index_encode(&other, &buf, &n), 0);
	ck_assert_int_eq(km_store_root_write(f.store, "indexes", "other.kmidx", buf, n), 0);
	free(buf);
	ck_assert_int_eq(km_known_load(f.store, &small, &k, &err), 0);
	ck_assert_uint_eq(km_known_count(k), count);
	km_known_free(k);
	ck_assert_int_eq(km_known_load(f.store, &other.chunker, &k, &err), 0);
	ck_assert_uint_eq(km_known_count(k), count);
	km_known_free(k);

	ck_assert_int_eq(km_store_root_write(f.store, "indexes", "broken.kmidx", "KMINDEX\nxx", 10),
			 0);
	k = NULL;
	ck_assert_int_lt(km_known_load(f.store, &small, &k, &err), 0);
	ck_assert_ptr_null(k);
	ck_assert_msg(strstr(err.msg, "broken.kmidx"), "error '%s'", err.msg);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_known_empty_store)
{
	struct fixture f;
	struct km_known *k = NULL;
	struct km_error err = { { 0 } };

	fixture_setup(&f);
	ck_assert_int_eq(km_store_root_remove(f.store, "indexes", "model.kmidx"), 0);
	ck_assert_int_eq(km_known_load(f.store, &small, &k, &err), 0);
	ck_assert_uint_eq(km_known_count(k), 0);
	ck_assert_uint_eq(km_known_find(k, 8192), KM_KNOWN_NONE);
	ck_assert_uint_eq(km_known_find_id(k, &f.idx->files[0].extents[0].id), KM_KNOWN_NONE);
	km_known_free(k);
	fixture_teardown(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("known");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_known_lists_index_chunks);
	tcase_add_test(tc, test_known_successors);
	tcase_add_test(tc, test_known_other_params_and_bad_index);
	tcase_add_test(tc, test_known_empty_store);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
