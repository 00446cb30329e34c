/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_VERIFIED_H
#define KM_VERIFIED_H

/*
 * Internal to the store: the record of verified chunks, S/verified.kmok
 * (docs/formats.md). For each chunk whose bytes the store saw hash to its
 * name (a put of bytes the caller hashed, a verifying get, verify, a
 * reader's check), the stat of its file then: device, inode, size, ctime
 * and mtime to the nanosecond. A reader that finds the same stat for that
 * id trusts the file without hashing it again: any write, truncate, chmod
 * or utime changes ctime, and a file put in its place is another inode.
 *
 * What it must not trust: an entry for another id, an entry whose stat
 * differs in any field, an entry that does not pass its checksum (torn or
 * damaged), and a stat taken in the clock tick of the file's last change
 * (a change in the same tick could keep the ctime): such entries are never
 * written. It is a cache, not a proof: anyone who can rewrite a chunk can
 * rewrite the record. A missing or damaged record only costs hashing.
 *
 * Entries are appended, a batch at a time with one O_APPEND write; the last
 * valid entry of an id wins. gc rewrites the file with the entries of the
 * chunks it kept. All functions are thread-safe.
 */

#include <stdbool.h>
#include <sys/stat.h>

#include "hash.h"
#include "util.h"

#define KM_VERIFIED_NAME	"verified.kmok"
#define KM_VERIFIED_MAGIC	"KMCHKOK\n"
#define KM_VERIFIED_HEADER_SIZE 16
#define KM_VERIFIED_ENTRY_SIZE	88

/* The stat of a chunk file now, by id: 0, or <0 (-ENOENT). */
typedef int (*km_verified_stat_fn)(const struct km_hash *id, struct stat *ret, void *userdata);

struct km_verified;

/* dirfd: the store's directory (borrowed). sync: fsync what is written. */
int km_verified_new(int dirfd, bool sync, km_verified_stat_fn stat_fn, void *userdata,
		    struct km_verified **ret);
/* Flushes, then frees. NULL is fine. */
void km_verified_free(struct km_verified *v);

/* Reads the record again if it changed since it was read (another process appended). */
void km_verified_reload(struct km_verified *v);

/* True if the record holds id with exactly this stat (and the entry was settled). */
bool km_verified_matches(struct km_verified *v, const struct km_hash *id, const struct stat *st);

/*
 * The file of chunk id, with stat st, holds bytes that hash to id: the
 * store wrote them itself (put), or they were hashed while the file had
 * this stat before and after and the clock had already moved past its
 * ctime ('settled', see km_verified_settled). Queued until the next flush,
 * which writes it only if the file still has this stat and the clock has
 * moved past its ctime.
 */
void km_verified_note(struct km_verified *v, const struct km_hash *id, const struct stat *st);

/* True when the file-timestamp clock has moved past st's ctime. */
bool km_verified_settled(const struct stat *st);

/* Appends what was noted since the last flush. Best effort: errors only cost re-hashing. */
void km_verified_flush(struct km_verified *v);

/*
 * Rewrites the record with the entries whose id keep() accepts and whose
 * file still has the recorded stat (gc, under the store's exclusive lock).
 */
int km_verified_compact(struct km_verified *v,
			bool (*keep)(const struct km_hash *id, void *userdata), void *userdata);

/* Counters for tests: entries in the table, entries written by this handle. */
size_t km_verified_count(struct km_verified *v);

#endif
