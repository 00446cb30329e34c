/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "hash.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

struct km_hasher {
	EVP_MD_CTX *ctx;
};

void km_hash_buf(const void *p, size_t n, struct km_hash *ret)
{
	/* SHA256() uses the SHA extensions where the CPU has them. */
	SHA256(p, n, ret->b);
}

struct km_hasher *km_hasher_new(void)
{
	struct km_hasher *h = calloc(1, sizeof(*h));

	if (!h)
		return NULL;
	h->ctx = EVP_MD_CTX_new();
	if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
		km_hasher_free(h);
		return NULL;
	}
	return h;
}

void km_hasher_free(struct km_hasher *h)
{
	if (!h)
		return;
	EVP_MD_CTX_free(h->ctx);
	free(h);
}

void km_hasher_update(struct km_hasher *h, const void *p, size_t n)
{
	EVP_DigestUpdate(h->ctx, p, n);
}

void km_hasher_final(struct km_hasher *h, struct km_hash *ret)
{
	unsigned int len = 0;

	EVP_DigestFinal_ex(h->ctx, ret->b, &len);
	EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL);
}

char *km_hash_to_hex(const struct km_hash *h, char buf[KM_HASH_HEX_SIZE])
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < KM_HASH_SIZE; i++) {
		buf[2 * i] = digits[h->b[i] >> 4];
		buf[2 * i + 1] = digits[h->b[i] & 15];
	}
	buf[KM_HASH_HEX_SIZE - 1] = 0;
	return buf;
}

int km_hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int km_hash_from_hex(const char *s, struct km_hash *ret)
{
	struct km_hash h;

	if (strlen(s) != KM_HASH_SIZE * 2)
		return -EINVAL;
	for (size_t i = 0; i < KM_HASH_SIZE; i++) {
		int hi = km_hex_digit(s[2 * i]), lo = km_hex_digit(s[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -EINVAL;
		h.b[i] = (uint8_t)(hi << 4 | lo);
	}
	*ret = h;
	return 0;
}

bool km_hash_equal(const struct km_hash *a, const struct km_hash *b)
{
	return memcmp(a->b, b->b, KM_HASH_SIZE) == 0;
}

bool km_hash_is_null(const struct km_hash *h)
{
	return km_is_zero(h->b, KM_HASH_SIZE);
}

bool km_is_zero(const void *p, size_t n)
{
	const uint8_t *b = p;
	size_t i = 0;

	/* Head bytes until aligned, then 8 words at a time, then the tail. */
	while (i < n && ((uintptr_t)(b + i) & 7))
		if (b[i++])
			return false;
	for (; i + 64 <= n; i += 64) {
		/* The bytes may have any effective type: read them as may_alias. */
		typedef uint64_t __attribute__((may_alias)) word_t;
		const word_t *w = (const word_t *)(b + i);

		if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
			return false;
	}
	for (; i < n; i++)
		if (b[i])
			return false;
	return true;
}
