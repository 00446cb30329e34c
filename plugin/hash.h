/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_HASH_H
#define KM_HASH_H

/*
 * SHA-256 digests: chunk ids, whole-file hashes, manifest ids.
 * The only module that includes OpenSSL.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KM_HASH_SIZE 32
#define KM_HASH_HEX_SIZE (KM_HASH_SIZE * 2 + 1)

struct km_hash {
	uint8_t b[KM_HASH_SIZE];
};

/* One-shot SHA-256 of n bytes at p. */
void km_hash_buf(const void *p, size_t n, struct km_hash *ret);

/* Streaming SHA-256. km_hasher_new returns NULL on allocation failure. */
struct km_hasher;
struct km_hasher *km_hasher_new(void);
void km_hasher_free(struct km_hasher *h);
void km_hasher_update(struct km_hasher *h, const void *p, size_t n);
/* Writes the digest and resets h so it can hash a new stream. */
void km_hasher_final(struct km_hasher *h, struct km_hash *ret);

/* Lower-case hex, NUL-terminated; returns buf. */
char *km_hash_to_hex(const struct km_hash *h, char buf[KM_HASH_HEX_SIZE]);
/* The value of one hex digit (either case), -1 if c is not one. */
int km_hex_digit(char c);

/* Parses exactly 64 hex digits (either case); -EINVAL otherwise. */
int km_hash_from_hex(const char *s, struct km_hash *ret);

bool km_hash_equal(const struct km_hash *a, const struct km_hash *b);
bool km_hash_is_null(const struct km_hash *h);

/* True if all n bytes at p are zero. Fast: word-at-a-time. */
bool km_is_zero(const void *p, size_t n);

#endif
