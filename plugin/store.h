/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_STORE_H
#define KM_STORE_H

/*
 * The node-local content-addressed chunk store: a directory that any number
 * of processes use at once.
 *
 *   S/config.kmstore            store format version and chunker parameters
 *   S/lock                      flock: shared by every handle, exclusive for gc
 *   S/chunks/ab/abcd...(64 hex) one chunk, raw bytes, named by its SHA-256
 *   S/indexes/NAME.kmidx        weights indexes (gc roots)
 *   S/manifests/ID.kmman        kept manifests (gc roots)
 *   S/tmp/                      temporary files of puts in progress
 *   S/verified.kmok             stat of chunk files found to hash right
 *
 * A put writes a temporary file (O_EXCL), fsyncs it and renames it into
 * place without replacing (renameat2 RENAME_NOREPLACE), so a chunk file is
 * either absent or complete. A get hashes what it read: no chunk is trusted
 * by its name alone.
 *
 * Errors: -ENOENT missing chunk, -EBADMSG chunk content does not match its
 * name (or a malformed store file), -EEXIST from put means "already stored"
 * (deduplicated, not an error for callers that count it), -EBUSY gc could
 * not get the exclusive lock.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunker.h"
#include "hash.h"
#include "util.h"

struct km_store;

enum {
	KM_STORE_CREATE = 1 << 0,    /* create S if it does not exist */
	KM_STORE_EXCLUSIVE = 1 << 1, /* exclusive lock (gc); -EBUSY if held */
	KM_STORE_NOSYNC = 1 << 2,    /* skip fsync (tests, benchmarks on tmpfs) */
};

/*
 * Opens (or with KM_STORE_CREATE creates) the store at path. A new store
 * records 'params' (NULL: defaults) in its config; an existing store keeps
 * its own, see km_store_chunker_params. -ENOENT if absent without CREATE,
 * -EBADMSG if path holds something that is not a kvmotion store (or a store
 * of an unknown major version: -EPROTONOSUPPORT). CREATE adopts only an
 * empty directory. A shared open waits while a gc holds the exclusive lock.
 */
int km_store_open(const char *path, unsigned flags, const struct km_chunker_params *params,
		  struct km_store **ret);
void km_store_free(struct km_store *s);

const struct km_chunker_params *km_store_chunker_params(const struct km_store *s);
const char *km_store_path(const struct km_store *s);

/* 1 if a chunk file of that name exists, 0 if not, <0 on error. */
int km_store_has(struct km_store *s, const struct km_hash *id);

/*
 * Stores n bytes whose SHA-256 the caller computed from these very bytes
 * as 'id'. 0 if written, -EEXIST if already stored.
 */
int km_store_put(struct km_store *s, const struct km_hash *id, const void *p, size_t n);

/*
 * Reads chunk 'id' into buf (size bufsize) and verifies its hash.
 * *ret_size gets its length. -ENOENT missing, -EBADMSG corrupt,
 * -EFBIG larger than bufsize.
 */
int km_store_get(struct km_store *s, const struct km_hash *id, void *buf, size_t bufsize,
		 size_t *ret_size);

/*
 * Copies chunk 'id' into dst_fd at dst_off in the kernel (copy_file_range,
 * else read + pwrite), WITHOUT hashing it: for a caller that verifies the
 * destination by other means and, when that fails, names the bad chunk
 * with km_store_get (join does both: see image.c). -ENOENT missing,
 * -EBADMSG not exactly 'length' bytes, other <0 from the copy (-ENOSPC).
 */
int km_store_copy_to(struct km_store *s, const struct km_hash *id, uint64_t length, int dst_fd,
		     uint64_t dst_off);
/* The same for bytes [from, from + n) of the chunk; -EINVAL if not inside it. */
int km_store_copy_range_to(struct km_store *s, const struct km_hash *id, uint64_t length,
			   uint64_t from, uint64_t n, int dst_fd, uint64_t dst_off);

/*
 * Verified chunks (plugin/verified.h): S/verified.kmok records the stat
 * (device, inode, size, ctime, mtime) of each chunk file whose bytes the
 * store saw hash to its name: written by put (the caller hashed the bytes),
 * get, verify and km_store_check_chunk, appended when the handle is freed
 * or flushed; gc rewrites it. It lets a reader skip hashing a chunk file
 * that has not changed since: a cache, not a proof.
 *
 * km_store_open_chunk opens chunk 'id', which must be a regular file of
 * exactly 'length' bytes: returns its fd (the caller closes it), -ENOENT if
 * missing, -EBADMSG if not a regular file or of another size.
 * *ret_recorded is true when the record vouches for this very file.
 */
int km_store_open_chunk(struct km_store *s, const struct km_hash *id, uint64_t length,
			bool *ret_recorded);

/*
 * Hashes the chunk open as fd (km_store_open_chunk): 0 if it hashes to id
 * (and records it), -EBADMSG if not, <0 if it cannot be read.
 */
int km_store_check_chunk(struct km_store *s, const struct km_hash *id, int fd);

/* Reads the record again if another handle appended to it since. */
void km_store_verified_reload(struct km_store *s);
/* Appends what this handle recorded so far. Best effort. */
void km_store_verified_flush(struct km_store *s);
/* Entries this handle knows (the record's and its own): for tests. */
size_t km_store_verified_count(struct km_store *s);

/*
 * Compares n bytes at p with the content of chunk file 'id': 1 if the file
 * holds exactly these bytes, 0 if it differs (content or length), -ENOENT
 * if absent, other <0 on errors. Equal bytes prove what a matching SHA-256
 * would, without hashing: split uses it to reference a chunk it found by
 * length (see scan.c). Reads through a mapping: no copy.
 */
int km_store_compare(struct km_store *s, const struct km_hash *id, const void *p, size_t n);

/* Size of the stored chunk without reading it (not verified). */
int km_store_stat(struct km_store *s, const struct km_hash *id, uint64_t *ret_size);

/* Removes one chunk. -ENOENT if absent. */
int km_store_remove(struct km_store *s, const struct km_hash *id);

/*
 * Calls fn for every chunk in the store. Stops and returns fn's value if it
 * returns nonzero.
 */
typedef int (*km_store_chunk_fn)(const struct km_hash *id, uint64_t size, void *userdata);
int km_store_foreach(struct km_store *s, km_store_chunk_fn fn, void *userdata);

struct km_store_verify_stats {
	uint64_t chunks;
	uint64_t bytes;
	uint64_t bad; /* content does not hash to its name, or unreadable */
};
/*
 * Re-hashes every chunk. For each bad one calls bad_fn (may be NULL).
 * With 'repair' the bad chunk files are removed. Returns 0 if all good,
 * -EBADMSG if any was bad (*ret is filled in both cases), other <0 on I/O
 * errors.
 */
typedef void (*km_store_bad_fn)(const struct km_hash *id, int error, void *userdata);
int km_store_verify(struct km_store *s, bool repair, km_store_bad_fn bad_fn, void *userdata,
		    struct km_store_verify_stats *ret);

/*
 * Writes back everything of the store's file system now (syncfs), e.g. at
 * the end of a pre-copy whose puts did not sync: 0 or -errno.
 */
int km_store_flush(struct km_store *s);

/*
 * Roots: named files whose chunk references keep chunks alive through gc.
 * kind is "indexes" or "manifests"; name is a plain file name (no '/').
 * Written atomically like chunks; replaces an existing root of that name.
 */
int km_store_root_write(struct km_store *s, const char *kind, const char *name, const void *p,
			size_t n);
/* Reads a root into a malloc'd buffer (*ret, *ret_size). -ENOENT if absent. */
int km_store_root_read(struct km_store *s, const char *kind, const char *name, void **ret,
		       size_t *ret_size);
int km_store_root_remove(struct km_store *s, const char *kind, const char *name);
/* Calls fn(name) for each root of that kind, in name order. */
typedef int (*km_store_root_fn)(const char *name, void *userdata);
int km_store_root_foreach(struct km_store *s, const char *kind, km_store_root_fn fn,
			  void *userdata);

/*
 * Collects garbage: removes every chunk that no root refers to. The store
 * must be open with KM_STORE_EXCLUSIVE. 'refs' is called once per root
 * (kind, name, bytes) and must call km_store_gc_keep for each chunk id the
 * root refers to; it returns 0 or <0 (a root that cannot be parsed aborts
 * gc with nothing removed: better keep garbage than lose data).
 * Also removes stale temporary files.
 */
struct km_store_gc;
typedef int (*km_store_refs_fn)(struct km_store_gc *gc, const char *kind, const char *name,
				const void *p, size_t n, void *userdata);
void km_store_gc_keep(struct km_store_gc *gc, const struct km_hash *id);
struct km_store_gc_stats {
	uint64_t roots;
	uint64_t chunks_kept;
	uint64_t chunks_removed;
	uint64_t bytes_removed;
};
int km_store_gc_run(struct km_store *s, km_store_refs_fn refs, void *userdata,
		    struct km_store_gc_stats *ret, struct km_error *err);

#endif
