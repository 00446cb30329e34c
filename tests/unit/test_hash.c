/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <check.h>

#include "km-check.h"
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"

static const struct {
	const char *msg;
	const char *hex;
} vectors[] = {
	/* FIPS 180-2 examples and the empty string. */
	{ "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
	{ "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
	{ "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
	  "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
};

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

START_TEST(test_hash_known_vectors)
{
	char hex[KM_HASH_HEX_SIZE];
	struct km_hash h;

	for (size_t i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
		km_hash_buf(vectors[i].msg, strlen(vectors[i].msg), &h);
		ck_assert_str_eq(km_hash_to_hex(&h, hex), vectors[i].hex);
	}
}
END_TEST

START_TEST(test_hash_million_a)
{
	const char *want = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
	char hex[KM_HASH_HEX_SIZE];
	struct km_hasher *hs = km_hasher_new();
	char *p = malloc(1000000);
	struct km_hash h;

	ck_assert_ptr_nonnull(p);
	ck_assert_ptr_nonnull(hs);
	memset(p, 'a', 1000000);
	km_hash_buf(p, 1000000, &h);
	ck_assert_str_eq(km_hash_to_hex(&h, hex), want);
	for (int i = 0; i < 1000; i++)
		km_hasher_update(hs, p, 1000);
	km_hasher_final(hs, &h);
	ck_assert_str_eq(km_hash_to_hex(&h, hex), want);
	km_hasher_free(hs);
	free(p);
}
END_TEST

START_TEST(test_hash_streaming_equals_oneshot)
{
	const size_t n = 300000;
	uint8_t *p = malloc(n);
	struct km_hasher *hs = km_hasher_new();
	struct km_hash one, streamed;
	uint64_t s = 1;

	ck_assert_ptr_nonnull(p);
	ck_assert_ptr_nonnull(hs);
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)splitmix64(&s);
	km_hash_buf(p, n, &one);
	for (int round = 0; round < 20; round++) {
		size_t off = 0;

		while (off < n) {
			uint64_t r = splitmix64(&s);
			size_t k = (r & 1) ? (r >> 1) % 70 : (r >> 1) % 20000;

			if (k > n - off)
				k = n - off;
			km_hasher_update(hs, p + off, k);
			off += k;
		}
		/* final resets the hasher: every round starts a fresh stream. */
		km_hasher_final(hs, &streamed);
		ck_assert(km_hash_equal(&one, &streamed));
	}
	/* An empty stream after a final is the empty-string digest. */
	km_hasher_final(hs, &streamed);
	km_hash_buf("", 0, &one);
	ck_assert(km_hash_equal(&one, &streamed));
	km_hasher_free(hs);
	km_hasher_free(NULL);
	free(p);
}
END_TEST

START_TEST(test_hash_hex_round_trip)
{
	struct km_hash h, back;
	char hex[KM_HASH_HEX_SIZE];
	uint64_t s = 2;

	for (int round = 0; round < 100; round++) {
		for (size_t i = 0; i < KM_HASH_SIZE; i++)
			h.b[i] = (uint8_t)splitmix64(&s);
		km_hash_to_hex(&h, hex);
		ck_assert_uint_eq(strlen(hex), 2 * KM_HASH_SIZE);
		ck_assert_uint_eq(strspn(hex, "0123456789abcdef"), 2 * KM_HASH_SIZE);
		memset(&back, 0, sizeof(back));
		ck_assert_int_eq(km_hash_from_hex(hex, &back), 0);
		ck_assert(km_hash_equal(&h, &back));
	}
	/* Upper case parses to the same digest. */
	ck_assert_int_eq(
		km_hash_from_hex("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
				 &back),
		0);
	km_hash_buf("abc", 3, &h);
	ck_assert(km_hash_equal(&h, &back));
}
END_TEST

START_TEST(test_hash_from_hex_rejects_bad_input)
{
	static const char good[] =
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
	static const char *const bad[] = {
		"",
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",   /* 63 */
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad0", /* 65 */
		"ga7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015aG",
		"ba7816bf8f01cfea414140de5dae2223 00361a396177a9cb410ff61f20015ad",
		"0xa816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
		"-a7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a\n",
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015:d",
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015@d",
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015`d",
	};
	struct km_hash h, before;

	ck_assert_int_eq(km_hash_from_hex(good, &h), 0);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memset(&h, 0x5a, sizeof(h));
		before = h;
		ck_assert_msg(km_hash_from_hex(bad[i], &h) == -EINVAL, "accepted \"%s\"", bad[i]);
		/* ret is written only on success. */
		ck_assert(km_hash_equal(&h, &before));
	}
}
END_TEST

START_TEST(test_hash_equal_and_null)
{
	struct km_hash a = { { 0 } }, b = { { 0 } };

	ck_assert(km_hash_is_null(&a));
	ck_assert(km_hash_equal(&a, &b));
	for (size_t i = 0; i < KM_HASH_SIZE; i++) {
		b = a;
		b.b[i] = 1;
		ck_assert(!km_hash_is_null(&b));
		ck_assert(!km_hash_equal(&a, &b));
	}
	km_hash_buf("abc", 3, &a);
	b = a;
	ck_assert(km_hash_equal(&a, &b));
	ck_assert(!km_hash_is_null(&a));
}
END_TEST

START_TEST(test_hash_is_zero_every_position)
{
	/* 8-aligned storage, used from every start misalignment. */
	static uint64_t storage[(8 + 200 + 8) / 8];
	uint8_t *base = (uint8_t *)storage;

	ck_assert(km_is_zero(base, 0));
	for (size_t align = 0; align < 8; align++) {
		uint8_t *p = base + align;

		for (size_t n = 0; n <= 200; n++) {
			memset(base, 0, sizeof(storage));
			ck_assert(km_is_zero(p, n));
			/* A nonzero byte just outside must not be seen. */
			base[align + n] = 0xff;
			if (align > 0)
				base[align - 1] = 0xff;
			ck_assert_msg(km_is_zero(p, n), "align %zu len %zu saw outside", align, n);
		}
		for (size_t pos = 0; pos < 200; pos++) {
			for (unsigned v = 1; v < 256; v <<= 1) {
				memset(base, 0, sizeof(storage));
				p[pos] = (uint8_t)v;
				ck_assert_msg(!km_is_zero(p, 200), "align %zu pos %zu value %u",
					      align, pos, v);
				ck_assert(!km_is_zero(p, pos + 1));
				ck_assert(km_is_zero(p, pos));
			}
		}
	}
}
END_TEST

START_TEST(test_hash_is_zero_large)
{
	const size_t n = 1 << 20;
	uint8_t *p = calloc(1, n + 1);

	ck_assert_ptr_nonnull(p);
	ck_assert(km_is_zero(p, n));
	ck_assert(km_is_zero(p + 1, n));
	p[n - 1] = 1;
	ck_assert(!km_is_zero(p, n));
	ck_assert(!km_is_zero(p + 3, n - 3));
	ck_assert(km_is_zero(p, n - 1));
	p[n - 1] = 0;
	p[n / 2 + 5] = 0x80;
	ck_assert(!km_is_zero(p + 1, n));
	free(p);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("hash");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_hash_known_vectors);
	tcase_add_test(tc, test_hash_million_a);
	tcase_add_test(tc, test_hash_streaming_equals_oneshot);
	tcase_add_test(tc, test_hash_hex_round_trip);
	tcase_add_test(tc, test_hash_from_hex_rejects_bad_input);
	tcase_add_test(tc, test_hash_equal_and_null);
	tcase_add_test(tc, test_hash_is_zero_every_position);
	tcase_add_test(tc, test_hash_is_zero_large);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
