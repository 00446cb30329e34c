/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_CHUNKER_H
#define KM_CHUNKER_H

/*
 * Content-defined chunking: FastCDC-style gear hash with normalized chunk
 * sizes. Pure: no I/O, no allocation. The cut points depend only on the
 * bytes since the previous cut, so the same tensor bytes give the same
 * chunks in a model file and, shifted, inside a memory image.
 *
 *   struct km_chunker c;
 *   km_chunker_init(&c, &params);
 *   while (n > 0) {
 *           size_t k = km_chunker_scan(&c, p, n);
 *           if (k == KM_CHUNKER_NO_BOUNDARY) { buffer all n bytes; break; }
 *           the current chunk ends after p[k - 1]; p += k; n -= k;
 *   }
 *   at end of input, whatever is buffered is the last chunk.
 */

#include <stddef.h>
#include <stdint.h>

#define KM_CHUNK_MIN_DEFAULT (64u * 1024)
#define KM_CHUNK_AVG_DEFAULT (256u * 1024)
#define KM_CHUNK_MAX_DEFAULT (1024u * 1024)

/* Bounds on what km_chunker_params_check accepts. */
#define KM_CHUNK_MIN_LIMIT 64u
#define KM_CHUNK_MAX_LIMIT (64u * 1024 * 1024)

#define KM_CHUNKER_NO_BOUNDARY ((size_t)-1)

struct km_chunker_params {
	uint32_t min_size;
	uint32_t avg_size; /* a power of two */
	uint32_t max_size;
};

#define KM_CHUNKER_PARAMS_DEFAULT                                                   \
	((struct km_chunker_params){ .min_size = KM_CHUNK_MIN_DEFAULT,               \
				     .avg_size = KM_CHUNK_AVG_DEFAULT,               \
				     .max_size = KM_CHUNK_MAX_DEFAULT })

struct km_chunker {
	struct km_chunker_params params;
	uint64_t mask_small; /* harder to match: used before avg_size */
	uint64_t mask_large; /* easier to match: used after avg_size */
	uint64_t hash;
	uint64_t chunk_len; /* bytes of the current chunk seen so far */
};

/*
 * 0 if min <= avg <= max, avg is a power of two, min >= KM_CHUNK_MIN_LIMIT,
 * max <= KM_CHUNK_MAX_LIMIT; -EINVAL otherwise.
 */
int km_chunker_params_check(const struct km_chunker_params *p);

/* Returns 0 or -EINVAL (bad params). */
int km_chunker_init(struct km_chunker *c, const struct km_chunker_params *p);

/* Starts a new chunk (forgets the bytes seen since the last cut). */
void km_chunker_reset(struct km_chunker *c);

/*
 * Feeds n bytes. Returns the number of bytes of p that complete the current
 * chunk (1..n) and resets for the next chunk, or KM_CHUNKER_NO_BOUNDARY if
 * all n bytes belong to the current chunk and no cut was found.
 */
size_t km_chunker_scan(struct km_chunker *c, const void *p, size_t n);

#endif
