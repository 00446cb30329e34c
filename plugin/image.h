/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_IMAGE_H
#define KM_IMAGE_H

/*
 * Split and join of a CRIU image directory.
 *
 * split: every pages-*.img and every file of at least min_split_size bytes
 * is chunked; a chunk that is all zeros becomes a zero extent, a chunk the
 * store holds becomes a chunk reference, anything else goes to the delta.
 * Without add_chunks, "the store holds" means: a chunk that a weights index
 * of the store names and whose file holds the same bytes (known.h).
 * The manifest and delta are written and synced under temporary names,
 * renamed into place, and only then are the split files removed: at every
 * point the directory holds a complete image.
 *
 * The manifest (format 1.2) proves a split file by its extents: each chunk
 * by its id, the delta by its SHA-256 and frame checksums, the extent list
 * by its digest. Split hashes no weights bytes: a chunk is referenced only
 * when its bytes compare equal to the store's chunk file.
 *
 * join: rebuilds every split file byte for byte into temporary files and
 * renames them into place only when all are good; on any error the
 * directory is left as it was. Before writing, every chunk is opened and
 * hashed unless the store's verified record vouches for its file
 * (store.h); the delta is hashed while the chunks are copied. Files of
 * 1.0/1.1 manifests are checked by their whole-file SHA-256 as before
 * (docs/formats.md, "How join verifies").
 */

#include <stdbool.h>
#include <stdint.h>

#include "delta.h"
#include "format.h"
#include "store.h"
#include "util.h"

#define KM_MIN_SPLIT_SIZE_DEFAULT (1024u * 1024)

struct km_split_opts {
	uint64_t min_split_size; /* 0: default */
	unsigned threads;	 /* 0: one per CPU */
	bool add_chunks;	 /* put every non-zero chunk into the store */
	bool sync;		 /* fsync the manifest, delta and directory */
	struct km_delta_params delta;
};

struct km_split_stats {
	uint64_t files_split;
	uint64_t files_kept;
	uint64_t bytes_split;	   /* size of the split files */
	uint64_t bytes_referenced; /* in chunks the store already had */
	uint64_t chunks_referenced;
	uint64_t bytes_added; /* added to the store (add_chunks) */
	uint64_t chunks_added;
	uint64_t bytes_zero;
	uint64_t bytes_delta; /* raw bytes in the delta */
	uint64_t delta_file_size;
	uint64_t manifest_size;
	struct km_hash manifest_id; /* SHA-256 of the manifest file */
};

int km_image_split(int dirfd, struct km_store *s, const struct km_split_opts *o,
		   struct km_split_stats *ret, struct km_error *err);

/*
 * A split in steps, for files still being written: begin creates the
 * temporary delta; km_split_follow splits what is final of a file that is
 * written front to back (bytes below its size never change), one file at
 * a time, each to its end ('complete') before the next starts; commit
 * finishes the followed files from their complete contents, splits every
 * other file as km_image_split does, and commits the same way. Each file's
 * extents are exactly km_image_split's (the followed files' delta bytes
 * come first in the delta, so their delta offsets may differ). free
 * without a successful commit leaves the directory as it was.
 *
 * km_split_follow: fd is open on the file 'name' of the directory, base
 * maps at least its first avail bytes (and may move between calls); no
 * byte at or beyond avail is read. Errors: -EBUSY another file is not
 * complete yet, -ESTALE the file shrank, -EOPNOTSUPP with add_chunks;
 * after any error the split can only be freed. commit: -ESTALE when a
 * followed file is not the one seen (replaced, shrank, gone, or grew after
 * it was complete): a split from scratch may still succeed.
 */
struct km_split;
int km_split_begin(int dirfd, struct km_store *s, const struct km_split_opts *o,
		   struct km_split **ret, struct km_error *err);
int km_split_follow(struct km_split *sp, const char *name, int fd, const uint8_t *base,
		    uint64_t avail, bool complete, struct km_error *err);
int km_split_commit(struct km_split *sp, struct km_split_stats *ret, struct km_error *err);
void km_split_free(struct km_split *sp);

struct km_late_plan;

struct km_join_opts {
	unsigned threads; /* checking chunks, decoding the delta; 0: one per CPU */
	bool keep_split; /* keep kvmotion.manifest and kvmotion.delta */
	bool sync;
	/*
	 * Non-NULL: late weights (late.h). The weights' pages of each
	 * process's pages file are left out of it and of its pagemap, and
	 * *late gets what to write into the processes (NULL when nothing was
	 * left out). Such a directory restores only with that plan carried
	 * out; the manifest and delta stay, and km_image_late_undo (called
	 * by the next join too) turns it back into the split image.
	 */
	struct km_late_plan **late;
};

struct km_join_stats {
	uint64_t files_joined;
	uint64_t bytes_written;
	uint64_t bytes_from_store;
	uint64_t chunks_read;
	uint64_t bytes_from_delta;
	uint64_t bytes_zero;
	/* Distinct chunks of 1.2 files: hashed by this join, or vouched for by the store's record. */
	uint64_t chunks_hashed;
	uint64_t chunks_recorded;
	uint64_t bytes_late; /* left out for the plan (late weights) */
};

int km_image_join(int dirfd, struct km_store *s, const struct km_join_opts *o,
		  struct km_join_stats *ret, struct km_error *err);

/*
 * Turns a directory joined with late weights back into its split image:
 * the rebuilt pages files removed, the original pagemaps put back. 0 with
 * nothing to do.
 */
int km_image_late_undo(int dirfd, struct km_error *err);

/* True if dirfd holds a split image (a kvmotion.manifest). */
int km_image_is_split(int dirfd);

/* Reads and validates DIR's manifest. */
int km_image_read_manifest(int dirfd, struct km_manifest **ret, struct km_error *err);

/*
 * Seeding: chunks model files, puts every non-zero chunk into the store and
 * writes the weights index 'name' (a root: gc keeps its chunks).
 */
struct km_seed_stats {
	uint64_t files;
	uint64_t bytes;
	uint64_t chunks;
	uint64_t chunks_added;
	uint64_t bytes_added;
	uint64_t bytes_zero;
};
int km_seed(struct km_store *s, const char *name, const char *const *paths, size_t n_paths,
	    unsigned threads, struct km_seed_stats *ret, struct km_error *err);

/* gc with every manifest and weights index of the store as roots. */
int km_image_store_gc(struct km_store *s, struct km_store_gc_stats *ret, struct km_error *err);

#endif
