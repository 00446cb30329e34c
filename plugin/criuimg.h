/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_CRIUIMG_H
#define KM_CRIUIMG_H

/*
 * What kvmotion needs to know of CRIU's own images: whether every page a
 * dump recorded lies in a local pages-<id>.img. With --page-server,
 * --lazy-pages, --stream or an incremental dump (pages in a parent image)
 * it does not, and the split must leave the directory alone.
 */

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

#define KM_CRIU_IMG_COMMON_MAGIC 0x54564319u
#define KM_CRIU_PAGEMAP_MAGIC 0x56084025u
#define KM_CRIU_PE_PARENT 1u
#define KM_CRIU_PE_LAZY 2u
#define KM_CRIU_PE_PRESENT 4u

struct km_criu_pages_info {
	uint64_t pagemaps;
	uint64_t pages_present; /* pages CRIU wrote into local pages-*.img */
	uint64_t pages_elsewhere; /* in a parent image */
	uint64_t pages_bytes;	/* size of the local pages-*.img files */
};

/*
 * Reads every pagemap-*.img of dirfd and checks each pages-<id>.img holds
 * exactly its present pages. 0 and *ret_local = true if the image is
 * complete and local; *ret_local = false with err saying why otherwise
 * (no pagemap at all, lazy or parent pages, a pages file missing or of
 * another size). <0 for unreadable or malformed images.
 */
int km_criu_pages_local(int dirfd, bool *ret_local, struct km_criu_pages_info *ret,
			struct km_error *err);

/* One PagemapEntry: nr_pages pages from vaddr, flags KM_CRIU_PE_*. */
struct km_criu_pagemap_entry {
	uint64_t vaddr;
	uint32_t nr_pages;
	uint32_t flags;
};

/*
 * Writes name in dirfd (created or truncated, mode 0600) as CRIU writes a
 * pagemap-<id>.img: the two magics, a PagemapHead of pages_id, then e[0..n)
 * in that order, each a little-endian u32 length and the message.
 */
int km_criu_pagemap_write_at(int dirfd, const char *name, uint32_t pages_id,
			     const struct km_criu_pagemap_entry *e, size_t n, struct km_error *err);

/*
 * Reads pagemap image name of dirfd: its pages_id and entries (*ret is
 * malloc'd, NULL if none; old images' in_parent turned into flags).
 * -EBADMSG for a malformed image.
 */
int km_criu_pagemap_read_at(int dirfd, const char *name, uint32_t *ret_pages_id,
			    struct km_criu_pagemap_entry **ret, size_t *ret_n, struct km_error *err);

#endif
