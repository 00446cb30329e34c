/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_INCR_H
#define KM_INCR_H

/*
 * Incremental CRIU images found by content. CRIU's own incremental dumps
 * need the kernel's soft-dirty bits to know which pages changed; without
 * them, a complete dump is compared page by page with an earlier complete
 * dump of the same tree (its parent: a --leave-running snapshot whose copy
 * the target holds already) and rewritten so that every page equal to the
 * parent's page at the same address is marked PE_PARENT, as CRIU's
 * incremental dumps mark them, and only the others stay in the pages
 * files. CRIU restores such an image through a `parent` symlink to the
 * parent's directory (criu/pagemap.c, read_parent_page).
 *
 * The snapshot id names a parent by content: the SHA-256 of its pagemap and
 * pages images (docs/formats.md, "Snapshot id"), so that a target can tell
 * that the parent it holds is the one the sender compared against.
 */

#include <stdint.h>

#include "criuimg.h"
#include "hash.h"
#include "util.h"

/* A snapshot's id as a receiver records it in the snapshot's directory: hex, newline. */
#define KM_SNAPSHOT_NAME "kvmotion.snapshot"

struct km_incr_opts {
	unsigned threads; /* comparing pages; 0: one per CPU */
};

struct km_incr_stats {
	uint64_t pagemaps;	/* pagemap images rewritten */
	uint64_t pagemaps_kept; /* without a parent pagemap of the same name: kept whole */
	uint64_t pages;		/* present pages of the dump */
	uint64_t pages_parent;	/* equal to the parent's: now read from the parent */
	uint64_t pages_present; /* still in the image */
	uint64_t bytes_before;	/* of the pages files */
	uint64_t bytes_after;
	uint64_t compare_ns, write_ns;
};

/*
 * Rewrites the complete dump in dirfd as an incremental image over the
 * complete dump in parent_dirfd (pagemap-*.img of tasks; shmem pagemaps are
 * kept whole). Each pagemap's new pages file is written beside the old one
 * and renamed over it, then the pagemap is replaced; a failure between the
 * two leaves that pagemap unusable, so a caller must not restore the
 * directory after an error. -EINVAL: dirfd is incremental already;
 * -EBADMSG: a malformed pagemap, or a pages file of the wrong size.
 */
int km_incr_rewrite(int dirfd, int parent_dirfd, const struct km_incr_opts *o,
		    struct km_incr_stats *ret, struct km_error *err);

/*
 * One pagemap of a parent image, its pages mapped, found by address. Open:
 * -ENOENT if the parent has no pagemap of that name; -EBADMSG if its pages
 * file does not hold what the pagemap lists.
 */
struct km_incr_prun;
struct km_incr_parent {
	struct km_criu_pagemap pm;
	const uint8_t *pages;
	size_t size;
	struct km_incr_prun *runs; /* present runs by address */
	size_t n_runs;
};

int km_incr_parent_open(int pdirfd, const char *pagemap_name, struct km_incr_parent *ret,
			struct km_error *err);
/*
 * The parent's page at vaddr, or NULL. *hint (0 at first) keeps the place
 * between calls: walking addresses upwards costs no search.
 */
const uint8_t *km_incr_parent_page(const struct km_incr_parent *p, uint64_t vaddr, size_t *hint);
void km_incr_parent_close(struct km_incr_parent *p);

/*
 * The snapshot id of the dump in dirfd (threads: 0 one per CPU); -ENOENT
 * if it has no pagemap image.
 */
int km_incr_snapshot_id(int dirfd, unsigned threads, struct km_hash *ret, struct km_error *err);

#endif
