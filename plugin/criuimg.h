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
/* A PagemapEntry's page count: field 5 where a newer CRIU wrote it, else field 2. */
#define KM_CRIU_PE_NR_PAGES(e) ((e)->has_nr_pages_u64 ? (e)->nr_pages_u64 : (uint64_t)(e)->nr_pages)

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

/*
 * One pagemap-<id>.img: the pages_id of its pages-<pages_id>.img and its
 * entries as CRIU wrote them (vaddr order). An entry's present pages
 * (flags & KM_CRIU_PE_PRESENT) lie in the pages file one after the other,
 * in entry order.
 */
struct km_criu_pme {
	uint64_t vaddr;
	uint64_t nr_pages;
	uint32_t flags; /* old images without flags: PE_PARENT or PE_PRESENT */
};
struct km_criu_pagemap {
	uint32_t pages_id;
	size_t n;
	struct km_criu_pme *e;
};

/* A pages-<id>.img name. */
bool km_criu_is_pages_image(const char *name);

/* -ENOENT: no such file; -EBADMSG: not a pagemap image. */
int km_criu_pagemap_read(int dirfd, const char *name, struct km_criu_pagemap *ret,
			 struct km_error *err);
/* The image bytes of pm (*ret malloc'd); -E2BIG for an entry of 2^32 pages or more. */
int km_criu_pagemap_encode(const struct km_criu_pagemap *pm, void **ret, size_t *ret_size);
/* Writes pm as name in dirfd (created or truncated, mode 0600). */
int km_criu_pagemap_write(int dirfd, const char *name, const struct km_criu_pagemap *pm,
			  struct km_error *err);
void km_criu_pagemap_clear(struct km_criu_pagemap *pm);
/*
 * Appends an entry to pm (room for *cap entries, grown as needed), merged
 * into the last one when it continues it with the same flags and the sum
 * stays below 2^32 pages (what km_criu_pagemap_encode writes). -ENOMEM.
 */
int km_criu_pagemap_push(struct km_criu_pagemap *pm, size_t *cap, uint64_t vaddr,
			 uint64_t nr_pages, uint32_t flags);

#endif
