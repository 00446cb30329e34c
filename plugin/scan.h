/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_SCAN_H
#define KM_SCAN_H

/*
 * Internal to split and seed: cuts a mapped file into content-defined
 * chunks and classifies each (zero, in the store, not in the store), for
 * seed while the whole-file SHA-256 runs on a thread of its own. Results come back in
 * file order, a batch at a time, so the caller can stream the delta.
 *
 * Two ways to classify. With 'put' or without 'known', every non-zero chunk
 * is hashed (on a thread pool) and looked up, or put, by its SHA-256. With
 * 'known' and without 'put', no chunk is hashed: a chunk is a candidate for
 * the known chunks of its length and is referenced only if its bytes equal
 * the store's chunk file; a chunk without a candidate goes to the delta; a
 * run of weights is followed chunk by chunk through the successors (see
 * known.h), comparing bytes instead of running the chunker. The cuts are
 * the chunker's either way.
 */

#include <stdbool.h>
#include <stdint.h>

#include "chunker.h"
#include "hash.h"
#include "known.h"
#include "store.h"
#include "util.h"
#include "workpool.h"

enum km_scan_kind {
	KM_SCAN_ZERO,	   /* all zero bytes */
	KM_SCAN_STORED,	   /* the store had it */
	KM_SCAN_ADDED,	   /* put into the store by this scan */
	KM_SCAN_NOT_STORED /* not in the store (and not put) */
};

struct km_scan_chunk {
	uint64_t offset;
	uint32_t length;
	enum km_scan_kind kind;
	struct km_hash id; /* not set for KM_SCAN_ZERO */
};

/* Called in file order; chunks are valid during the call. */
typedef int (*km_scan_emit_fn)(void *userdata, const uint8_t *base,
			       const struct km_scan_chunk *chunks, size_t n);

struct km_scanner {
	const struct km_chunker_params *params;
	struct km_workpool *pool; /* hashing and store look-ups */
	struct km_workpool *file_hash_pool; /* one thread: whole-file SHA-256, if asked */
	struct km_store *store;
	const struct km_known *known; /* NULL: hash every chunk */
	bool put; /* put every non-zero chunk the store lacks */
};

/*
 * Scans size bytes at base (a read-only mapping of the file called 'what',
 * for errors). *ret_file_hash gets the SHA-256 of all of it, computed on
 * file_hash_pool; NULL: not computed (split: the extents carry integrity).
 */
int km_scan(const struct km_scanner *sc, const uint8_t *base, uint64_t size, const char *what,
	    km_scan_emit_fn emit, void *userdata, struct km_hash *ret_file_hash,
	    struct km_error *err);

/*
 * Splitting a file while it is written front to back (bytes below the
 * size seen are final): step scans what the bytes seen so far decide,
 * finish the rest once the file is complete. The chunks emitted, over all
 * calls, are exactly km_scan's of the complete file, however it grew.
 * Comparing scans only (known set, put false): -EOPNOTSUPP otherwise.
 * base maps at least the avail (size) bytes given; it may move between
 * calls, and emit sees each call's. No byte at or beyond avail is read.
 * After an error the follow is dead: every call returns -EINVAL. A size
 * smaller than what was split already: -ESTALE.
 */
struct km_scan_follow;
int km_scan_follow_new(const struct km_scanner *sc, km_scan_emit_fn emit, void *userdata,
		       struct km_scan_follow **ret);
void km_scan_follow_free(struct km_scan_follow *f);
int km_scan_follow_step(struct km_scan_follow *f, const uint8_t *base, uint64_t avail,
			const char *what, struct km_error *err);
int km_scan_follow_finish(struct km_scan_follow *f, const uint8_t *base, uint64_t size,
			  const char *what, struct km_error *err);

/* Maps a whole file read-only; *ret is NULL for an empty file. */
int km_map_file(int fd, uint64_t size, const uint8_t **ret);
void km_unmap_file(const uint8_t *p, uint64_t size);

/*
 * Maps the pages of n bytes at p (part of a file mapping) into the page
 * tables now, so that the thread that reads them next takes no faults: for
 * a thread with time to spare, ahead of one on the critical path. On tmpfs
 * a hole gets a page allocated, as any read through a mapping would give
 * it. Best effort (MADV_POPULATE_READ, Linux >= 5.14).
 */
void km_prefault(const void *p, uint64_t n);

#endif
