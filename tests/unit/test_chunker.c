/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <check.h>

#include "km-check.h"
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chunker.h"
#include "hash.h"

#define MiB (1024u * 1024)

/* Cuts of fixed data, computed once by this implementation: see test_chunker_golden. */
#define GOLDEN_DEFAULT_N 27
#define GOLDEN_DEFAULT_FIRST 386408
#define GOLDEN_DEFAULT_SUM 196879450744694943ULL
#define GOLDEN_SMALL_N 7207
#define GOLDEN_SMALL_SUM 16271753284444819559ULL

/* Small sizes: thousands of chunks in a few MiB. */
static const struct km_chunker_params small = { .min_size = 256, .avg_size = 1024,
						.max_size = 4096 };

struct cuts {
	size_t *end; /* end offset of each chunk; the last is the input size */
	size_t n, cap;
};

static void cuts_push(struct cuts *c, size_t end)
{
	if (c->n == c->cap) {
		c->cap = c->cap ? 2 * c->cap : 1024;
		c->end = realloc(c->end, c->cap * sizeof(*c->end));
		ck_assert_ptr_nonnull(c->end);
	}
	c->end[c->n++] = end;
}

static void cuts_free(struct cuts *c)
{
	free(c->end);
	*c = (struct cuts){ 0 };
}

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint8_t *random_buf(size_t n, uint64_t seed)
{
	uint8_t *p = malloc(n ? n : 1);
	uint64_t s = seed;

	ck_assert_ptr_nonnull(p);
	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = splitmix64(&s);

		memcpy(p + i, &v, n - i < 8 ? n - i : 8);
	}
	return p;
}

/*
 * Chunks p[0..n) feeding the chunker pieces of random sizes drawn from
 * split_seed (0: one call on the whole buffer). Sizes mix 0, 1, small and
 * up to max_piece bytes so that pieces end in every phase of a chunk.
 */
static struct cuts chunk_split(const uint8_t *p, size_t n, const struct km_chunker_params *params,
			       uint64_t split_seed, size_t max_piece)
{
	struct cuts c = { 0 };
	struct km_chunker ch;
	size_t off = 0, chunk_start = 0;
	uint64_t s = split_seed;

	ck_assert_int_eq(km_chunker_init(&ch, params), 0);
	while (off < n) {
		size_t piece = n - off;

		if (split_seed) {
			uint64_t r = splitmix64(&s);

			switch (r & 3) {
			case 0:
				piece = (r >> 8) % 3; /* 0, 1 or 2 bytes */
				break;
			case 1:
				piece = (r >> 8) % 130;
				break;
			default:
				piece = (r >> 8) % (max_piece + 1);
				break;
			}
			if (piece > n - off)
				piece = n - off;
		}
		while (piece > 0) {
			size_t k = km_chunker_scan(&ch, p + off, piece);

			if (k == KM_CHUNKER_NO_BOUNDARY) {
				off += piece;
				break;
			}
			ck_assert_uint_ge(k, 1);
			ck_assert_uint_le(k, piece);
			off += k;
			piece -= k;
			cuts_push(&c, off);
			chunk_start = off;
		}
	}
	if (chunk_start < n || n == 0)
		cuts_push(&c, n);
	return c;
}

static struct cuts chunk_all(const uint8_t *p, size_t n, const struct km_chunker_params *params)
{
	return chunk_split(p, n, params, 0, 0);
}

/*
 * The cut rule written out the slow way, straight from the format comment
 * in chunker.c, with the gear table regenerated from its documented seed:
 * hash every byte from the chunk start, test every length from min.
 */
static struct cuts chunk_reference(const uint8_t *p, size_t n,
				   const struct km_chunker_params *params)
{
	struct cuts c = { 0 };
	uint64_t gear[256], s = 0x6b766d6f74696f6eULL;
	int bits = __builtin_ctz(params->avg_size);
	uint64_t mask_small = ~0ULL << (64 - (bits + 2));
	uint64_t mask_large = ~0ULL << (64 - (bits - 2));
	size_t start = 0;

	for (int i = 0; i < 256; i++)
		gear[i] = splitmix64(&s);
	while (start < n) {
		uint64_t h = 0;
		size_t len = 0;

		while (start + len < n) {
			uint64_t mask;

			h = (h << 1) + gear[p[start + len]];
			len++;
			if (len == params->max_size)
				break;
			if (len < params->min_size)
				continue;
			mask = len < params->avg_size ? mask_small : mask_large;
			if (!(h & mask))
				break;
		}
		start += len;
		cuts_push(&c, start);
	}
	if (n == 0)
		cuts_push(&c, 0);
	return c;
}

static void assert_cuts_equal(const struct cuts *a, const struct cuts *b)
{
	ck_assert_uint_eq(a->n, b->n);
	for (size_t i = 0; i < a->n; i++)
		ck_assert_msg(a->end[i] == b->end[i], "chunk %zu ends at %zu, expected %zu", i,
			      a->end[i], b->end[i]);
}

static struct km_hash *chunk_hashes(const uint8_t *p, const struct cuts *c)
{
	struct km_hash *h = calloc(c->n, sizeof(*h));
	size_t start = 0;

	ck_assert_ptr_nonnull(h);
	for (size_t i = 0; i < c->n; i++) {
		km_hash_buf(p + start, c->end[i] - start, &h[i]);
		start = c->end[i];
	}
	return h;
}

static int hash_cmp(const void *a, const void *b)
{
	return memcmp(a, b, sizeof(struct km_hash));
}

/* set must be sorted with hash_cmp. */
static bool hash_in(const struct km_hash *h, const struct km_hash *set, size_t n)
{
	return bsearch(h, set, n, sizeof(*set), hash_cmp) != NULL;
}

START_TEST(test_chunker_params_check)
{
	struct km_chunker_params ok[] = {
		KM_CHUNKER_PARAMS_DEFAULT,
		{ 64, 64, 64 },
		{ 64, 128, 1000 },
		{ 100, 128, 128 },
		{ KM_CHUNK_MIN_LIMIT, 1u << 20, KM_CHUNK_MAX_LIMIT },
		{ KM_CHUNK_MAX_LIMIT, KM_CHUNK_MAX_LIMIT, KM_CHUNK_MAX_LIMIT },
	};
	struct km_chunker_params bad[] = {
		{ 0, 0, 0 },
		{ 63, 64, 128 },		      /* min below the limit */
		{ 64, 128, KM_CHUNK_MAX_LIMIT + 1 }, /* max above the limit */
		{ 256, 128, 1024 },		      /* min > avg */
		{ 64, 2048, 1024 },		      /* avg > max */
		{ 64, 96, 1024 },		      /* avg not a power of two */
		{ 64, 0, 1024 },
		{ 1024, 1024, 512 },
		{ UINT32_MAX, UINT32_MAX, UINT32_MAX },
	};
	struct km_chunker c;

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		ck_assert_int_eq(km_chunker_params_check(&ok[i]), 0);
		ck_assert_int_eq(km_chunker_init(&c, &ok[i]), 0);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(km_chunker_params_check(&bad[i]) == -EINVAL, "accepted #%zu", i);
		ck_assert_int_eq(km_chunker_init(&c, &bad[i]), -EINVAL);
	}
}
END_TEST

START_TEST(test_chunker_matches_reference)
{
	const struct km_chunker_params ps[] = {
		small,
		{ 64, 64, 64 },	    /* every chunk is max */
		{ 64, 64, 1024 },   /* no small-mask phase */
		{ 100, 512, 512 },  /* no large-mask phase */
		{ 300, 1024, 5000 }, /* nothing a multiple of 8 */
		{ 64, 256, 8192 },
		KM_CHUNKER_PARAMS_DEFAULT,
	};
	size_t n = 4 * MiB + 13;
	uint8_t *p = random_buf(n, 1);

	for (size_t i = 0; i < sizeof(ps) / sizeof(ps[0]); i++) {
		struct cuts a = chunk_all(p, n, &ps[i]);
		struct cuts b = chunk_reference(p, n, &ps[i]);

		assert_cuts_equal(&a, &b);
		cuts_free(&a);
		cuts_free(&b);
	}
	free(p);
}
END_TEST

START_TEST(test_chunker_golden)
{
	/*
	 * Chunk ids are hashes of chunks: if these numbers change, every stored
	 * chunk is orphaned. Never update them to make the test pass.
	 */
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	size_t n = 8 * MiB;
	uint8_t *p = random_buf(n, 0x676f6c64);
	struct cuts a = chunk_all(p, n, &def), b = chunk_all(p, n, &small);
	uint64_t sa = 0, sb = 0;

	for (size_t i = 0; i < a.n; i++)
		sa = sa * 1000003 + a.end[i];
	for (size_t i = 0; i < b.n; i++)
		sb = sb * 1000003 + b.end[i];
	ck_assert_uint_eq(a.n, GOLDEN_DEFAULT_N);
	ck_assert_uint_eq(a.end[0], GOLDEN_DEFAULT_FIRST);
	ck_assert_uint_eq(sa, GOLDEN_DEFAULT_SUM);
	ck_assert_uint_eq(b.n, GOLDEN_SMALL_N);
	ck_assert_uint_eq(sb, GOLDEN_SMALL_SUM);
	cuts_free(&a);
	cuts_free(&b);
	free(p);
}
END_TEST

START_TEST(test_chunker_deterministic)
{
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	size_t n = 16 * MiB;
	uint8_t *p = random_buf(n, 2);
	struct cuts a = chunk_all(p, n, &def), b = chunk_all(p, n, &def);

	ck_assert_uint_gt(a.n, 10);
	assert_cuts_equal(&a, &b);
	cuts_free(&a);
	cuts_free(&b);
	free(p);
}
END_TEST

START_TEST(test_chunker_streaming_equals_oneshot)
{
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	const struct km_chunker_params odd = { 300, 1024, 5000 };
	size_t n = 2 * MiB + 7;
	uint8_t *p = random_buf(n, 3);
	struct cuts ref_small = chunk_all(p, n, &small);
	struct cuts ref_odd = chunk_all(p, n, &odd);
	struct cuts ref_def = chunk_all(p, n, &def);

	for (uint64_t seed = 1; seed <= 40; seed++) {
		/* Pieces up to a few chunks, and for default sizes up to 1.5 max. */
		struct cuts a = chunk_split(p, n, &small, seed, 3 * small.max_size);
		struct cuts b = chunk_split(p, n, &odd, seed, 2 * odd.avg_size);
		struct cuts c = chunk_split(p, n, &def, seed, 3 * def.max_size / 2);

		assert_cuts_equal(&a, &ref_small);
		assert_cuts_equal(&b, &ref_odd);
		assert_cuts_equal(&c, &ref_def);
		cuts_free(&a);
		cuts_free(&b);
		cuts_free(&c);
	}
	cuts_free(&ref_small);
	cuts_free(&ref_odd);
	cuts_free(&ref_def);
	free(p);
}
END_TEST

START_TEST(test_chunker_streaming_forced_cuts)
{
	/*
	 * Random data almost never reaches max_size: check forced cuts with
	 * zeros, a short repeating pattern and min == max, split every way,
	 * including pieces that end exactly on the forced cut.
	 */
	const struct km_chunker_params ps[] = { small, { 64, 64, 64 }, { 64, 128, 200 } };
	size_t n = 512 * 1024 + 5;
	uint8_t *zero = calloc(1, n), *pattern = malloc(n);
	struct km_chunker c;

	ck_assert_ptr_nonnull(zero);
	ck_assert_ptr_nonnull(pattern);
	for (size_t i = 0; i < n; i++)
		pattern[i] = (uint8_t)(i % 7 * 37);
	for (size_t pi = 0; pi < sizeof(ps) / sizeof(ps[0]); pi++) {
		struct cuts rz = chunk_all(zero, n, &ps[pi]);
		struct cuts rp = chunk_all(pattern, n, &ps[pi]);
		struct cuts ref = chunk_reference(pattern, n, &ps[pi]);

		assert_cuts_equal(&rp, &ref);
		for (uint64_t seed = 1; seed <= 20; seed++) {
			struct cuts a = chunk_split(zero, n, &ps[pi], seed, 2 * ps[pi].max_size);
			struct cuts b = chunk_split(pattern, n, &ps[pi], seed, 2 * ps[pi].max_size);

			assert_cuts_equal(&a, &rz);
			assert_cuts_equal(&b, &rp);
			cuts_free(&a);
			cuts_free(&b);
		}
		/* A buffer holding exactly the rest of a max-size chunk ends it. */
		ck_assert_int_eq(km_chunker_init(&c, &ps[pi]), 0);
		ck_assert_uint_eq(km_chunker_scan(&c, zero, ps[pi].max_size), ps[pi].max_size);
		ck_assert_uint_eq(km_chunker_scan(&c, zero, ps[pi].max_size - 1),
				  KM_CHUNKER_NO_BOUNDARY);
		ck_assert_uint_eq(km_chunker_scan(&c, zero, 1), 1);
		ck_assert_uint_eq(c.chunk_len, 0);
		cuts_free(&rz);
		cuts_free(&rp);
		cuts_free(&ref);
	}
	free(zero);
	free(pattern);
}
END_TEST

START_TEST(test_chunker_byte_at_a_time)
{
	size_t n = 256 * 1024;
	uint8_t *p = random_buf(n, 4);
	struct cuts ref = chunk_all(p, n, &small);
	struct cuts a = { 0 };
	struct km_chunker c;

	ck_assert_int_eq(km_chunker_init(&c, &small), 0);
	for (size_t i = 0; i < n; i++) {
		size_t k = km_chunker_scan(&c, p + i, 1);

		if (k != KM_CHUNKER_NO_BOUNDARY) {
			ck_assert_uint_eq(k, 1);
			cuts_push(&a, i + 1);
		}
	}
	if (a.n == 0 || a.end[a.n - 1] != n)
		cuts_push(&a, n);
	assert_cuts_equal(&a, &ref);
	cuts_free(&a);
	cuts_free(&ref);
	free(p);
}
END_TEST

START_TEST(test_chunker_empty_scan)
{
	struct km_chunker c;
	uint8_t b = 0;

	ck_assert_int_eq(km_chunker_init(&c, &small), 0);
	ck_assert_uint_eq(km_chunker_scan(&c, &b, 0), KM_CHUNKER_NO_BOUNDARY);
	ck_assert_uint_eq(c.chunk_len, 0);
	ck_assert_uint_eq(km_chunker_scan(&c, NULL, 0), KM_CHUNKER_NO_BOUNDARY);
}
END_TEST

START_TEST(test_chunker_reset)
{
	size_t n = 64 * 1024;
	uint8_t *p = random_buf(n, 5);
	struct km_chunker a, b;
	size_t ka, kb;

	ck_assert_int_eq(km_chunker_init(&a, &small), 0);
	ck_assert_int_eq(km_chunker_init(&b, &small), 0);
	/* Feed junk into a, then reset: it must behave as if fresh. */
	ck_assert_uint_eq(km_chunker_scan(&a, p + n / 2, 200), KM_CHUNKER_NO_BOUNDARY);
	km_chunker_reset(&a);
	ka = km_chunker_scan(&a, p, n);
	kb = km_chunker_scan(&b, p, n);
	ck_assert_uint_ne(kb, KM_CHUNKER_NO_BOUNDARY);
	ck_assert_uint_eq(ka, kb);
	free(p);
}
END_TEST

static void check_bounds(const struct km_chunker_params *params, size_t n, uint64_t seed)
{
	uint8_t *p = random_buf(n, seed);
	struct cuts c = chunk_all(p, n, params);
	size_t start = 0;

	for (size_t i = 0; i < c.n; i++) {
		size_t len = c.end[i] - start;

		ck_assert_uint_le(len, params->max_size);
		ck_assert_uint_ge(len, 1);
		if (i + 1 < c.n)
			ck_assert_uint_ge(len, params->min_size);
		start = c.end[i];
	}
	ck_assert_uint_eq(start, n);
	cuts_free(&c);
	free(p);
}

START_TEST(test_chunker_sizes_within_bounds)
{
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;

	check_bounds(&small, 4 * MiB + 3, 6);
	check_bounds(&def, 16 * MiB + 5, 7);
	check_bounds(&(struct km_chunker_params){ 64, 64, 200 }, MiB + 1, 8);
	check_bounds(&(struct km_chunker_params){ 1000, 1024, 1030 }, MiB, 9);
}
END_TEST

static double mean_size(const struct km_chunker_params *params, size_t n, uint64_t seed)
{
	uint8_t *p = random_buf(n, seed);
	struct cuts c = chunk_all(p, n, params);
	double mean = (double)n / (double)c.n;

	cuts_free(&c);
	free(p);
	return mean;
}

START_TEST(test_chunker_average_size)
{
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	const struct km_chunker_params mid = { 2048, 8192, 32768 };
	double m;

	m = mean_size(&def, 32 * MiB, 10);
	ck_assert_msg(m > def.avg_size / 2.0 && m < def.avg_size * 2.0, "default mean %.0f", m);
	m = mean_size(&small, 4 * MiB, 11);
	ck_assert_msg(m > small.avg_size / 2.0 && m < small.avg_size * 2.0, "small mean %.0f", m);
	m = mean_size(&mid, 8 * MiB, 12);
	ck_assert_msg(m > mid.avg_size / 2.0 && m < mid.avg_size * 2.0, "mid mean %.0f", m);
}
END_TEST

/*
 * Chunks 'orig' and 'edited' and returns how many chunks of 'edited' are
 * neither in the common prefix nor in the common suffix of the two lists:
 * the chunks around the edit that did not resynchronize.
 */
static size_t count_new_chunks(const uint8_t *orig, size_t n_orig, const uint8_t *edited,
			       size_t n_edited, const struct km_chunker_params *params,
			       size_t *ret_total)
{
	struct cuts co = chunk_all(orig, n_orig, params);
	struct cuts ce = chunk_all(edited, n_edited, params);
	struct km_hash *ho = chunk_hashes(orig, &co);
	struct km_hash *he = chunk_hashes(edited, &ce);
	size_t pre = 0, suf = 0;

	while (pre < ce.n && pre < co.n && km_hash_equal(&he[pre], &ho[pre]))
		pre++;
	while (suf < ce.n - pre && suf < co.n - pre &&
	       km_hash_equal(&he[ce.n - 1 - suf], &ho[co.n - 1 - suf]))
		suf++;
	*ret_total = ce.n;
	free(ho);
	free(he);
	cuts_free(&co);
	cuts_free(&ce);
	return *ret_total - pre - suf;
}

START_TEST(test_chunker_resync_after_edit)
{
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	const size_t n = 16 * MiB;
	static const struct {
		size_t at;
		int delta; /* > 0 inserts, < 0 deletes */
	} edits[] = {
		{ 0, 1 }, { 10, 3 }, { 1000, -5 }, { 4097, 7 }, { 70000, -1 }, { 300000, 2 },
	};
	uint8_t *orig = random_buf(n, 13);
	uint8_t *edited = malloc(n + 64);

	ck_assert_ptr_nonnull(edited);
	for (size_t e = 0; e < sizeof(edits) / sizeof(edits[0]); e++) {
		size_t at = edits[e].at, m, total, diff;

		memcpy(edited, orig, at);
		if (edits[e].delta > 0) {
			memset(edited + at, 0xa5, (size_t)edits[e].delta);
			memcpy(edited + at + edits[e].delta, orig + at, n - at);
			m = n + (size_t)edits[e].delta;
		} else {
			size_t d = (size_t)-edits[e].delta;

			memcpy(edited + at, orig + at + d, n - at - d);
			m = n - d;
		}
		diff = count_new_chunks(orig, n, edited, m, &def, &total);
		ck_assert_msg(diff <= 3, "edit %zu: %zu of %zu chunks differ", e, diff, total);
		diff = count_new_chunks(orig, n, edited, m, &small, &total);
		ck_assert_msg(diff <= 3, "edit %zu small: %zu of %zu chunks differ", e, diff,
			      total);
	}
	free(orig);
	free(edited);
}
END_TEST

START_TEST(test_chunker_embedded_dedup)
{
	/*
	 * The product's dedup: a tensor chunked in its model file and the same
	 * bytes at an arbitrary offset in a memory image share all but the
	 * first few chunks.
	 */
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	static const size_t prefixes[] = { 1, 7, 4093, 65537, 262147, 1000003 };
	const size_t n_model = 12 * MiB, n_suffix = 3 * MiB + 11;
	uint8_t *model = random_buf(n_model, 14);
	uint8_t *image = malloc(prefixes[5] + n_model + n_suffix);
	const struct km_chunker_params *ps[] = { &def, &small };

	ck_assert_ptr_nonnull(image);
	for (size_t pi = 0; pi < sizeof(ps) / sizeof(ps[0]); pi++) {
		struct cuts cm = chunk_all(model, n_model, ps[pi]);
		struct km_hash *hm = chunk_hashes(model, &cm);

		for (size_t e = 0; e < sizeof(prefixes) / sizeof(prefixes[0]); e++) {
			size_t pre = prefixes[e], n = pre + n_model + n_suffix, missing = 0;
			uint8_t *junk = random_buf(pre + n_suffix, 100 + e);
			struct cuts ci;
			struct km_hash *hi;

			memcpy(image, junk, pre);
			memcpy(image + pre, model, n_model);
			memcpy(image + pre + n_model, junk + pre, n_suffix);
			free(junk);
			ci = chunk_all(image, n, ps[pi]);
			hi = chunk_hashes(image, &ci);
			qsort(hi, ci.n, sizeof(*hi), hash_cmp);
			/* The model's last chunk ends where the model does: no cut there. */
			for (size_t i = 0; i + 1 < cm.n; i++)
				if (!hash_in(&hm[i], hi, ci.n)) {
					missing++;
					/* Only the first few may be missing. */
					ck_assert_msg(i < 3, "model chunk %zu of %zu not in image "
						      "(prefix %zu)", i, cm.n, pre);
				}
			ck_assert_uint_le(missing, 3);
			free(hi);
			cuts_free(&ci);
		}
		free(hm);
		cuts_free(&cm);
	}
	free(model);
	free(image);
}
END_TEST

START_TEST(test_chunker_zeros_give_max_chunks)
{
	const struct km_chunker_params def = KM_CHUNKER_PARAMS_DEFAULT;
	const struct km_chunker_params *ps[] = { &def, &small,
						 &(struct km_chunker_params){ 64, 64, 1000 } };
	size_t n = 10 * MiB + 123;
	uint8_t *p = calloc(1, n);

	ck_assert_ptr_nonnull(p);
	for (size_t pi = 0; pi < sizeof(ps) / sizeof(ps[0]); pi++) {
		struct cuts c = chunk_all(p, n, ps[pi]);
		size_t max = ps[pi]->max_size;

		ck_assert_uint_eq(c.n, (n + max - 1) / max);
		for (size_t i = 0; i + 1 < c.n; i++)
			ck_assert_uint_eq(c.end[i], (i + 1) * max);
		ck_assert_uint_eq(c.end[c.n - 1], n);
		cuts_free(&c);
	}
	free(p);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("chunker");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_chunker_params_check);
	tcase_add_test(tc, test_chunker_matches_reference);
	tcase_add_test(tc, test_chunker_golden);
	tcase_add_test(tc, test_chunker_deterministic);
	tcase_add_test(tc, test_chunker_streaming_equals_oneshot);
	tcase_add_test(tc, test_chunker_streaming_forced_cuts);
	tcase_add_test(tc, test_chunker_byte_at_a_time);
	tcase_add_test(tc, test_chunker_empty_scan);
	tcase_add_test(tc, test_chunker_reset);
	tcase_add_test(tc, test_chunker_sizes_within_bounds);
	tcase_add_test(tc, test_chunker_average_size);
	tcase_add_test(tc, test_chunker_resync_after_edit);
	tcase_add_test(tc, test_chunker_embedded_dedup);
	tcase_add_test(tc, test_chunker_zeros_give_max_chunks);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
