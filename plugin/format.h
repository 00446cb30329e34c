/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_FORMAT_H
#define KM_FORMAT_H

/*
 * The manifest, the weights index, the store config and the weights file's
 * verification record: in-memory forms and their encoding
 * (proto/kvmotion.proto, docs/formats.md). Apart from the delta, the only
 * module that includes the generated protobuf-c code.
 *
 * Readers return -ENOTRECOVERABLE for a file that is not of the expected
 * kind (wrong magic: a foreign file), -EBADMSG for a truncated or malformed
 * one, -EPROTONOSUPPORT for an unknown major version; err says which.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunker.h"
#include "hash.h"
#include "util.h"

#define KM_FORMAT_MAJOR 1
/*
 * 1.1: weights file id in WeightsIndex, WeightsVerified.
 * 1.2: split files carry an extent digest instead of a whole-file SHA-256.
 */
#define KM_FORMAT_MINOR 2

#define KM_MANIFEST_NAME "kvmotion.manifest"
#define KM_DELTA_NAME "kvmotion.delta"

#define KM_MAGIC_MANIFEST "KMMANIF\n"
#define KM_MAGIC_INDEX "KMINDEX\n"
#define KM_MAGIC_STORE "KMSTORE\n"
#define KM_MAGIC_DELTA "KMDELTA\n"
#define KM_MAGIC_WEIGHTS_OK "KMWTSOK\n"
#define KM_MAGIC_SIZE 8

/* Largest record any reader accepts, against hostile length fields. */
#define KM_RECORD_MAX (256u * 1024 * 1024)

enum km_extent_kind {
	KM_EXTENT_ZERO = 0,
	KM_EXTENT_CHUNK = 1,
	KM_EXTENT_DELTA = 2,
};

struct km_extent {
	enum km_extent_kind kind;
	uint64_t length;
	uint64_t delta_offset; /* KM_EXTENT_DELTA */
	struct km_hash id;     /* KM_EXTENT_CHUNK */
};

struct km_file_entry {
	char *name;
	uint64_t size;
	uint32_t mode;
	/* Of the whole file; all zero: none (1.2 split files). */
	struct km_hash sha256;
	bool split; /* false: kept in the directory as is */
	struct km_extent *extents;
	size_t n_extents;
	/* 1.2 split files: km_file_entry_extents_digest; all zero: none. */
	struct km_hash extents_sha256;
};

struct km_delta_ref {
	char *name;
	uint64_t raw_size;
	uint64_t compressed_size;
	uint64_t frames;
	struct km_hash sha256;
	struct km_hash image_id; /* all zero: none recorded */
};

struct km_manifest {
	uint32_t major, minor;
	struct km_chunker_params chunker;
	struct km_delta_ref delta;
	struct km_file_entry *files;
	size_t n_files;
	char *created_by;
	uint64_t created_unix;
	char *store_hint;
};

struct km_weights_index {
	uint32_t major, minor;
	char *name;
	struct km_chunker_params chunker;
	struct km_file_entry *files; /* split = true; ZERO and CHUNK extents only */
	size_t n_files;
	uint64_t created_unix;
	/* The materialized weights file (weights.h); all-zero id: none recorded. */
	struct km_hash weights_id;
	uint64_t weights_size;
};

/* The .kmw.ok record beside a weights file (weights.h): its stat when verified. */
struct km_weights_verified {
	struct km_hash id;
	uint64_t size;
	uint64_t dev;
	uint64_t ino;
	int64_t ctime_sec;
	uint32_t ctime_nsec;
	int64_t mtime_sec;
	uint32_t mtime_nsec;
	uint64_t verified_unix; /* 0: not recorded */
};

/* Frees every owned member and the struct itself. NULL is fine. */
void km_manifest_free(struct km_manifest *m);
void km_weights_index_free(struct km_weights_index *idx);
/* Frees the members of one entry (not the entry). */
void km_file_entry_clear(struct km_file_entry *f);

/*
 * The digest of a split file's extent list (docs/formats.md, "Extent
 * digest"): name, size and every extent, then the delta file's SHA-256.
 */
void km_file_entry_extents_digest(const struct km_file_entry *f, const struct km_hash *delta_sha256,
				  struct km_hash *ret);

/* Appends an extent, merging with the previous one when contiguous. */
int km_file_entry_add_extent(struct km_file_entry *f, const struct km_extent *e);

/*
 * Encode to a malloc'd buffer (magic + record), decode from bytes.
 * Decoding validates: versions, hash lengths, extents adding up to sizes,
 * delta ranges within the delta, file names plain and unique, and each
 * split file's extent digest where it has one.
 */
int km_manifest_encode(const struct km_manifest *m, void **ret, size_t *ret_size);
int km_manifest_decode(const void *p, size_t n, struct km_manifest **ret, struct km_error *err);
int km_weights_index_encode(const struct km_weights_index *idx, void **ret, size_t *ret_size);
int km_weights_index_decode(const void *p, size_t n, struct km_weights_index **ret,
			    struct km_error *err);
int km_weights_verified_encode(const struct km_weights_verified *v, void **ret, size_t *ret_size);
int km_weights_verified_decode(const void *p, size_t n, struct km_weights_verified *ret,
			       struct km_error *err);
int km_store_config_encode(const struct km_chunker_params *p, void **ret, size_t *ret_size);
int km_store_config_decode(const void *p, size_t n, struct km_chunker_params *ret,
			   struct km_error *err);

/* Whole-file helpers: read_file loads at most 'max' bytes (-EFBIG beyond). */
int km_read_file_at(int dirfd, const char *name, size_t max, void **ret, size_t *ret_size);
/* Writes name atomically in dirfd: temp file, fsync, rename. */
int km_write_file_atomic_at(int dirfd, const char *name, const void *p, size_t n, bool sync);

/* A plain file name: non-empty, no '/', not "." or "..", printable. */
bool km_filename_is_plain(const char *name);

#endif
