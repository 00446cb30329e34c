/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "criuimg.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "criu-pagemap.pb-c.h"
#include "format.h"

#define PAGE_SIZE_BYTES 4096u
#define PAGEMAP_MAX (256u * 1024 * 1024)

/* One pagemap image's pages_id and its pages here and in a parent. */
static int read_pagemap(int dirfd, const char *name, uint32_t *ret_pages_id,
			uint64_t *ret_present, uint64_t *ret_elsewhere, struct km_error *err)
{
	struct km_criu_pagemap pm = { 0 };
	int r;

	r = km_criu_pagemap_read(dirfd, name, &pm, err);
	if (r < 0)
		return r;
	*ret_pages_id = pm.pages_id;
	*ret_present = 0;
	*ret_elsewhere = 0;
	/*
	 * PE_LAZY marks pages a lazy restore could fetch; they are in
	 * pages-*.img unless --lazy-pages kept them out, which the size check
	 * of the caller tells.
	 */
	for (size_t i = 0; i < pm.n; i++) {
		if (pm.e[i].flags & KM_CRIU_PE_PARENT)
			*ret_elsewhere += pm.e[i].nr_pages;
		else if (pm.e[i].flags & KM_CRIU_PE_PRESENT)
			*ret_present += pm.e[i].nr_pages;
	}
	km_criu_pagemap_clear(&pm);
	return 0;
}

int km_criu_pages_local(int dirfd, bool *ret_local, struct km_criu_pages_info *ret,
			struct km_error *err)
{
	struct km_criu_pages_info info = { 0 };
	struct dirent *de;
	bool local = true;
	DIR *d;
	int r;

	r = km_opendir_at(dirfd, &d);
	if (r < 0)
		return r;
	while ((de = readdir(d))) {
		uint64_t present = 0, elsewhere = 0;
		uint32_t pages_id = 0;
		char pages[64];
		struct stat st;

		if (fnmatch("pagemap-*.img", de->d_name, 0) != 0 ||
		    fnmatch("pagemap-shmem-*.img", de->d_name, 0) == 0)
			continue;
		r = read_pagemap(dirfd, de->d_name, &pages_id, &present, &elsewhere, err);
		if (r < 0)
			break;
		info.pagemaps++;
		info.pages_present += present;
		info.pages_elsewhere += elsewhere;
		if (elsewhere && local) {
			km_error_set(err, "%s has %llu pages in a parent image (incremental dump)",
				     de->d_name, (unsigned long long)elsewhere);
			local = false;
		}
		snprintf(pages, sizeof(pages), "pages-%u.img", pages_id);
		if (fstatat(dirfd, pages, &st, 0) < 0) {
			if (local && (present || errno != ENOENT)) {
				km_error_set(err, "%s is missing (pages sent to a page server or an image streamer?)",
					     pages);
				local = false;
			}
			continue;
		}
		info.pages_bytes += (uint64_t)st.st_size;
		if ((uint64_t)st.st_size != present * PAGE_SIZE_BYTES && local) {
			km_error_set(err, "%s holds %llu bytes, its pagemap %s lists %llu present pages",
				     pages, (unsigned long long)st.st_size, de->d_name,
				     (unsigned long long)present);
			local = false;
		}
	}
	closedir(d);
	if (r < 0)
		return r;
	if (info.pagemaps == 0 && local) {
		km_error_set(err, "no pagemap images (not a CRIU dump, or images streamed elsewhere)");
		local = false;
	}
	*ret_local = local;
	if (ret)
		*ret = info;
	return 0;
}

/* --- pagemap images, whole ------------------------------------------------------ */

void km_criu_pagemap_clear(struct km_criu_pagemap *pm)
{
	free(pm->e);
	pm->e = NULL;
	pm->n = 0;
}

int km_criu_pagemap_push(struct km_criu_pagemap *pm, size_t *cap, uint64_t vaddr,
			 uint64_t nr_pages, uint32_t flags)
{
	struct km_criu_pme *last = pm->n ? &pm->e[pm->n - 1] : NULL;

	if (last && last->flags == flags &&
	    last->vaddr + last->nr_pages * PAGE_SIZE_BYTES == vaddr &&
	    last->nr_pages + nr_pages <= UINT32_MAX) {
		last->nr_pages += nr_pages;
		return 0;
	}
	if (pm->n == *cap) {
		size_t ncap = *cap ? *cap * 2 : 64;
		struct km_criu_pme *ne = realloc(pm->e, ncap * sizeof(*ne));

		if (!ne)
			return -ENOMEM;
		pm->e = ne;
		*cap = ncap;
	}
	pm->e[pm->n++] =
		(struct km_criu_pme){ .vaddr = vaddr, .nr_pages = nr_pages, .flags = flags };
	return 0;
}

bool km_criu_is_pages_image(const char *name)
{
	return fnmatch("pages-*.img", name, 0) == 0;
}

int km_criu_pagemap_read(int dirfd, const char *name, struct km_criu_pagemap *ret,
			 struct km_error *err)
{
	_cleanup_free_ uint8_t *buf = NULL;
	struct km_criu_pagemap pm = { 0 };
	size_t n, off = 8, cap = 0;
	uint32_t magic[2];
	bool head = true;
	int r;

	r = km_read_file_at(dirfd, name, PAGEMAP_MAX, (void **)&buf, &n);
	if (r < 0) {
		km_error_set(err, "%s: %s", name, strerror(-r));
		return r;
	}
	if (n < 8)
		goto bad;
	memcpy(magic, buf, 8);
	if (le32toh(magic[0]) != KM_CRIU_IMG_COMMON_MAGIC ||
	    le32toh(magic[1]) != KM_CRIU_PAGEMAP_MAGIC)
		goto bad;
	while (off < n) {
		uint32_t len;

		if (n - off < 4)
			goto bad;
		memcpy(&len, buf + off, 4);
		len = le32toh(len);
		off += 4;
		if (len > n - off)
			goto bad;
		if (head) {
			Kvmotion__Criu__PagemapHead *h =
				kvmotion__criu__pagemap_head__unpack(NULL, len, buf + off);

			if (!h)
				goto bad;
			pm.pages_id = h->pages_id;
			kvmotion__criu__pagemap_head__free_unpacked(h, NULL);
			head = false;
		} else {
			Kvmotion__Criu__PagemapEntry *e =
				kvmotion__criu__pagemap_entry__unpack(NULL, len, buf + off);

			if (!e)
				goto bad;
			if (pm.n == cap) {
				struct km_criu_pme *ne;

				cap = cap ? cap * 2 : 64;
				ne = realloc(pm.e, cap * sizeof(*ne));
				if (!ne) {
					kvmotion__criu__pagemap_entry__free_unpacked(e, NULL);
					km_criu_pagemap_clear(&pm);
					return -ENOMEM;
				}
				pm.e = ne;
			}
			pm.e[pm.n++] = (struct km_criu_pme){
				.vaddr = e->vaddr,
				.nr_pages = KM_CRIU_PE_NR_PAGES(e),
				.flags = e->has_flags ? e->flags
					 : (e->has_in_parent && e->in_parent) ? KM_CRIU_PE_PARENT
									      : KM_CRIU_PE_PRESENT,
			};
			kvmotion__criu__pagemap_entry__free_unpacked(e, NULL);
		}
		off += len;
	}
	if (head)
		goto bad;
	*ret = pm;
	return 0;
bad:
	km_criu_pagemap_clear(&pm);
	km_error_set(err, "%s is not a valid CRIU pagemap image", name);
	return -EBADMSG;
}

int km_criu_pagemap_encode(const struct km_criu_pagemap *pm, void **ret, size_t *ret_size)
{
	Kvmotion__Criu__PagemapHead h = KVMOTION__CRIU__PAGEMAP_HEAD__INIT;
	uint32_t word;
	size_t n = 8 + 4 + 16, off = 0, len;
	uint8_t *buf;

	/* an entry packs into at most 1 + 10 + 1 + 5 + 1 + 5 bytes */
	n += pm->n * (4 + 24);
	buf = malloc(n);
	if (!buf)
		return -ENOMEM;
	word = htole32(KM_CRIU_IMG_COMMON_MAGIC);
	memcpy(buf, &word, 4);
	word = htole32(KM_CRIU_PAGEMAP_MAGIC);
	memcpy(buf + 4, &word, 4);
	off = 8;
	h.pages_id = pm->pages_id;
	len = kvmotion__criu__pagemap_head__pack(&h, buf + off + 4);
	word = htole32((uint32_t)len);
	memcpy(buf + off, &word, 4);
	off += 4 + len;
	for (size_t i = 0; i < pm->n; i++) {
		Kvmotion__Criu__PagemapEntry e = KVMOTION__CRIU__PAGEMAP_ENTRY__INIT;

		if (pm->e[i].nr_pages > UINT32_MAX) {
			free(buf);
			return -E2BIG;
		}
		e.vaddr = pm->e[i].vaddr;
		e.nr_pages = (uint32_t)pm->e[i].nr_pages;
		e.has_flags = true;
		e.flags = pm->e[i].flags;
		len = kvmotion__criu__pagemap_entry__pack(&e, buf + off + 4);
		word = htole32((uint32_t)len);
		memcpy(buf + off, &word, 4);
		off += 4 + len;
	}
	*ret = buf;
	*ret_size = off;
	return 0;
}

int km_criu_pagemap_write(int dirfd, const char *name, const struct km_criu_pagemap *pm,
			  struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	_cleanup_close_ int fd = -1;
	size_t size;
	int r;

	r = km_criu_pagemap_encode(pm, &buf, &size);
	if (r < 0) {
		km_error_set(err, "cannot encode %s: %s", name, strerror(-r));
		return r;
	}
	fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		km_error_set(err, "cannot create %s: %s", name, strerror(-r));
		return r;
	}
	r = km_write_full(fd, buf, size);
	if (r < 0)
		km_error_set(err, "cannot write %s: %s", name, strerror(-r));
	return r;
}
