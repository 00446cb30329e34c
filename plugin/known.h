/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_KNOWN_H
#define KM_KNOWN_H

/*
 * Internal to split: the chunks that the store's weights indexes name, found
 * by length, each with the chunk that follows it in its model file.
 *
 * A length is a cheap fingerprint: a chunk of an image whose length no known
 * chunk has is not one of them, so it goes to the delta unhashed. A chunk
 * with candidates is referenced only once its bytes compare equal to the
 * store's chunk file (km_store_compare): the candidate is a hint, never a
 * proof. The successor lets split test the next chunk of a run of weights
 * directly, without running the chunker over it: the chunker cuts a chunk
 * from its own bytes only, so bytes equal to a known chunk that was cut by
 * content (not by the end of its file) are cut at the same place.
 */

#include <stdint.h>

#include "chunker.h"
#include "hash.h"
#include "store.h"
#include "util.h"

#define KM_KNOWN_NONE UINT32_MAX

struct km_known_chunk {
	struct km_hash id;
	uint32_t length;
	/* The chunk after it in its model file, cut by content: KM_KNOWN_NONE if none. */
	uint32_t next;
	/* The next chunk of the same length (a chain): KM_KNOWN_NONE at the end. */
	uint32_t same_length;
};

struct km_known;

/*
 * Reads every weights index of the store made with 'params' (others cut
 * differently: their chunks could not match) and lists their chunks, each
 * distinct id once. An index that cannot be read or parsed is an error.
 */
int km_known_load(struct km_store *s, const struct km_chunker_params *params, struct km_known **ret,
		  struct km_error *err);
void km_known_free(struct km_known *k);

/* Distinct chunks listed. */
uint32_t km_known_count(const struct km_known *k);

/* The first chunk of that length, then follow ->same_length; KM_KNOWN_NONE if none. */
uint32_t km_known_find(const struct km_known *k, uint64_t length);

/* The chunk of that id; KM_KNOWN_NONE if none. */
uint32_t km_known_find_id(const struct km_known *k, const struct km_hash *id);

/* Entry i (< count); valid until km_known_free. */
const struct km_known_chunk *km_known_get(const struct km_known *k, uint32_t i);

#endif
