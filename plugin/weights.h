/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_WEIGHTS_H
#define KM_WEIGHTS_H

/*
 * Weights files: a weights index of the store materialized as one
 * read-only file, so that an engine can map its weights (MAP_SHARED,
 * PROT_READ) and CRIU records the mapping by path with no pages.
 *
 * Layout: the index's files in index order, each starting at an offset
 * that is a multiple of KM_WEIGHTS_ALIGN, zero bytes between them. The
 * file's id is the SHA-256 of all its bytes and its path is
 *   WEIGHTS_DIR/<64 hex of the id>.kmw
 * so that the same weights have the same path on every node whose
 * weights_dir is the same (default: STORE/weights).
 *
 * A weights file is verified when written (every byte hashed: each model
 * file's range against the index, the whole file against the id). Beside
 * it, WEIGHTS_DIR/<hex>.kmw.ok records (device, inode, size, ctime, mtime)
 * of the file as verified; km_weights_check trusts a file whose stat still
 * matches that record and re-hashes it otherwise, so an altered or replaced
 * file is caught (any write changes ctime) while a restore does not read
 * gigabytes it already verified. The record is a cache, not a proof: whoever
 * can rewrite the file can rewrite the record. docs/formats.md has both
 * formats byte for byte.
 *
 * Any number of processes may materialize, check and resolve at once: every
 * file is written under a temporary name and renamed, the weights file
 * without replacing, so the first complete one wins and the others check it.
 * A process that dies while writing leaves WEIGHTS_DIR/.kmw-tmp.<pid>.<hex>
 * behind; nothing removes those yet.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format.h"
#include "hash.h"
#include "store.h"
#include "util.h"

#define KM_WEIGHTS_ALIGN (2u * 1024 * 1024)
#define KM_WEIGHTS_SUFFIX ".kmw"
#define KM_WEIGHTS_DIRNAME "weights" /* default weights_dir: STORE/weights */

struct km_weights_file_layout {
	const char *name; /* points into the index */
	uint64_t offset;  /* in the weights file, multiple of KM_WEIGHTS_ALIGN */
	uint64_t size;
};

struct km_weights_info {
	struct km_hash id;	/* SHA-256 of the weights file */
	uint64_t size;		/* of the weights file */
	char path[4096];	/* WEIGHTS_DIR/<hex>.kmw */
	bool written;		/* this call wrote it (false: already there) */
	uint64_t bytes_hashed;	/* 0 when the .ok record was trusted */
};

/* WEIGHTS_DIR for a store: dir if non-NULL and non-empty, else STORE/weights. */
int km_weights_dir(const struct km_store *s, const char *dir, char *buf, size_t bufsize);

/* Offsets of the index's files in its weights file; *ret is malloc'd. */
int km_weights_layout(const struct km_weights_index *idx, struct km_weights_file_layout **ret,
		      size_t *ret_n, uint64_t *ret_size);

/*
 * Materializes weights index 'index_name' of store s into weights_dir
 * (NULL: default; created with its parents). Chunks come from the store
 * (-ENOENT naming the first missing chunk in err). If the index records its
 * weights id (see below) and that file is already present and checks out,
 * nothing is written. Otherwise a temporary file is written, verified, made
 * 0444, synced (with 'sync') and renamed to its id's name; the id is then
 * recorded in the index (a root of the store), so that another node's
 * materialization of the same index can be checked against it.
 *
 * Uses s as it is (under its shared lock): never opens the store again, so
 * a caller holding it exclusively cannot deadlock against itself.
 *
 * Errors: -ENOENT no such index, or a chunk missing; -EBADMSG a chunk
 * corrupt (err names it and its model file), or the index records an id
 * (or size) other than what its files make (err names both ids); -EFBIG
 * the files cannot fit one file. A file at the id's name that does not
 * verify (a crash with sync off) is replaced by the verified one.
 * ret->bytes_hashed counts the weights file bytes this call read back.
 */
int km_weights_materialize(struct km_store *s, const char *index_name, const char *weights_dir,
			   bool sync, struct km_weights_info *ret, struct km_error *err);

/*
 * Checks that path is a weights file whose bytes hash to 'id' (and, when
 * size != UINT64_MAX, that it is 'size' bytes long). Trusts a matching .ok
 * record; otherwise re-hashes and, when good, writes a new record.
 * -ENOENT absent, -EBADMSG content does not match (err names the file and
 * both hashes), -EINVAL not a regular file. *ret_hashed (may be NULL) gets
 * the bytes hashed.
 */
int km_weights_check(const char *path, const struct km_hash *id, uint64_t size,
		     uint64_t *ret_hashed, struct km_error *err);

/*
 * Parses a weights file name "<64 hex>.kmw" (the base name of path) into
 * its id. -EINVAL if the name is not of that form.
 */
int km_weights_id_from_path(const char *path, struct km_hash *ret);

/*
 * For engines: resolves 'ref' to a materialized weights file.
 *   ref = "index:NAME"   the store's weights index NAME
 *   ref = a file path    a model file: seeded into the store as index
 *                        "file-<first 16 hex of its SHA-256>" if no index
 *                        of that name exists yet, then materialized
 * The model file is hashed on every call (to find its index; an existing
 * index of that name must hold exactly that file, else -EBADMSG). Its
 * weights file is the model file itself: one file at offset 0, no padding.
 * index_name (may be NULL) gets the index's name.
 */
int km_weights_resolve(struct km_store *s, const char *ref, const char *weights_dir, bool sync,
		       struct km_weights_info *ret, char *index_name, size_t index_name_size,
		       struct km_error *err);

#endif
