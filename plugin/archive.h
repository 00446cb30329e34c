/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_ARCHIVE_H
#define KM_ARCHIVE_H

/*
 * Container checkpoint archives, read in place: the tar files written by
 * `podman container checkpoint --export` and by the kubelet's checkpoint API
 * (CRI-O: /var/lib/kubelet/checkpoints/checkpoint-POD_NS-CTR-TIME.tar). Both
 * hold checkpoint/ (CRIU's images; split by kvmotion's plugin: a
 * kvmotion.manifest and a kvmotion.delta instead of pages-*.img),
 * config.dump and spec.dump at the top, and a few more files.
 *
 * Only what the migration needs: find a member by name, read a small one,
 * the split image's manifest. ustar, GNU long names and pax path/size
 * records are understood; the archive must be uncompressed (podman:
 * --compress none; the kubelet's always is): a gzip or zstd archive is
 * -EPROTONOSUPPORT. A member name is compared without a leading "./".
 *
 * Errors: -ENOENT no such member, -EBADMSG not a tar archive (bad header
 * checksum, truncated), -EFBIG a member above 'max', other -errno of read.
 */

#include <stddef.h>
#include <stdint.h>

#include "format.h"
#include "util.h"

#define KM_ARCHIVE_CHECKPOINT_DIR "checkpoint"
#define KM_ARCHIVE_MANIFEST	  "checkpoint/" KM_MANIFEST_NAME

struct km_archive_member {
	char name[512];
	char type; /* the tar type flag: '0' a regular file, '5' a directory, ... */
	uint64_t offset; /* of its data in the archive */
	uint64_t size;
};

/*
 * Calls fn for every member of the archive open at fd, in order; fn
 * returns 0 to go on, >0 to stop (km_archive_foreach then returns it), <0
 * an error (returned as is).
 */
typedef int (*km_archive_fn)(const struct km_archive_member *m, void *userdata);
int km_archive_foreach(int fd, km_archive_fn fn, void *userdata, struct km_error *err);

/* The member 'name' (a regular file). */
int km_archive_find(int fd, const char *name, struct km_archive_member *ret, struct km_error *err);

/* Reads member 'name' (at most max bytes) into a new buffer. */
int km_archive_read(int fd, const char *name, size_t max, void **ret, size_t *ret_size,
		    struct km_error *err);

/*
 * The manifest of the split image in checkpoint/ (-ENOENT: the image is
 * not split) and, if ret_id is not NULL, its id (SHA-256 of its bytes: the
 * name of its root in a store, "ID.kmman").
 */
int km_archive_manifest(int fd, struct km_manifest **ret, struct km_hash *ret_id,
			struct km_error *err);

/*
 * Checks the checkpoint layout: checkpoint/inventory.img, config.dump and
 * spec.dump are there (-ENOENT naming the first missing one).
 */
int km_archive_check_layout(int fd, struct km_error *err);

#endif
