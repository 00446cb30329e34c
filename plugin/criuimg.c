/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "criuimg.h"

#include <dirent.h>
#include <endian.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <string.h>
#include <sys/stat.h>

#include "criu-pagemap.pb-c.h"
#include "format.h"

#define PAGE_SIZE_BYTES 4096u
#define PAGEMAP_MAX (256u * 1024 * 1024)

/* Walks one pagemap image; adds its pages to info. */
static int read_pagemap(int dirfd, const char *name, uint32_t *ret_pages_id,
			uint64_t *ret_present, uint64_t *ret_elsewhere, struct km_error *err)
{
	_cleanup_free_ uint8_t *buf = NULL;
	size_t n, off = 8;
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
	*ret_present = 0;
	*ret_elsewhere = 0;
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
			*ret_pages_id = h->pages_id;
			kvmotion__criu__pagemap_head__free_unpacked(h, NULL);
			head = false;
		} else {
			Kvmotion__Criu__PagemapEntry *e =
				kvmotion__criu__pagemap_entry__unpack(NULL, len, buf + off);
			uint32_t flags;

			if (!e)
				goto bad;
			/* Old images: no flags, in_parent or present. */
			flags = e->has_flags ? e->flags
					     : (e->has_in_parent && e->in_parent ? KM_CRIU_PE_PARENT
										 : KM_CRIU_PE_PRESENT);
			/*
			 * PE_LAZY marks pages a lazy restore could fetch; they
			 * are in pages-*.img unless --lazy-pages kept them out,
			 * which the size check below tells.
			 */
			if (flags & KM_CRIU_PE_PARENT)
				*ret_elsewhere += e->nr_pages;
			else if (flags & KM_CRIU_PE_PRESENT)
				*ret_present += e->nr_pages;
			kvmotion__criu__pagemap_entry__free_unpacked(e, NULL);
		}
		off += len;
	}
	if (head)
		goto bad;
	return 0;
bad:
	km_error_set(err, "%s is not a valid CRIU pagemap image", name);
	return -EBADMSG;
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

int km_criu_pagemap_write_at(int dirfd, const char *name, uint32_t pages_id,
			     const struct km_criu_pagemap_entry *e, size_t n, struct km_error *err)
{
	Kvmotion__Criu__PagemapHead h = KVMOTION__CRIU__PAGEMAP_HEAD__INIT;
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_close_ int fd = -1;
	uint32_t le;
	size_t off = 0;
	int r;

	/* a varint message: 1 + 10 + 1 + 5 + 1 + 5 bytes at most, plus its length */
	buf = malloc(8 + 4 + 16 + n * (4 + 24));
	if (!buf)
		return -ENOMEM;
	le = htole32(KM_CRIU_IMG_COMMON_MAGIC);
	memcpy(buf, &le, 4);
	le = htole32(KM_CRIU_PAGEMAP_MAGIC);
	memcpy(buf + 4, &le, 4);
	off = 8;
	h.pages_id = pages_id;
	le = htole32((uint32_t)kvmotion__criu__pagemap_head__get_packed_size(&h));
	memcpy(buf + off, &le, 4);
	off += 4;
	off += kvmotion__criu__pagemap_head__pack(&h, buf + off);
	for (size_t i = 0; i < n; i++) {
		Kvmotion__Criu__PagemapEntry pe = KVMOTION__CRIU__PAGEMAP_ENTRY__INIT;

		pe.vaddr = e[i].vaddr;
		pe.nr_pages = e[i].nr_pages;
		pe.has_flags = true;
		pe.flags = e[i].flags;
		le = htole32((uint32_t)kvmotion__criu__pagemap_entry__get_packed_size(&pe));
		memcpy(buf + off, &le, 4);
		off += 4;
		off += kvmotion__criu__pagemap_entry__pack(&pe, buf + off);
	}
	fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		km_error_set(err, "cannot create %s: %s", name, strerror(-r));
		return r;
	}
	r = km_write_full(fd, buf, off);
	if (r < 0)
		km_error_set(err, "cannot write %s: %s", name, strerror(-r));
	return r;
}

int km_criu_pagemap_read_at(int dirfd, const char *name, uint32_t *ret_pages_id,
			    struct km_criu_pagemap_entry **ret, size_t *ret_n, struct km_error *err)
{
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_free_ struct km_criu_pagemap_entry *v = NULL;
	size_t n, off = 8, nv = 0, cap = 0;
	uint32_t magic[2], pages_id = 0;
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
			pages_id = h->pages_id;
			kvmotion__criu__pagemap_head__free_unpacked(h, NULL);
			head = false;
		} else {
			Kvmotion__Criu__PagemapEntry *e =
				kvmotion__criu__pagemap_entry__unpack(NULL, len, buf + off);

			if (!e)
				goto bad;
			if (nv == cap) {
				struct km_criu_pagemap_entry *nvp;

				cap = cap ? 2 * cap : 64;
				nvp = realloc(v, cap * sizeof(*v));
				if (!nvp) {
					kvmotion__criu__pagemap_entry__free_unpacked(e, NULL);
					return -ENOMEM;
				}
				v = nvp;
			}
			v[nv].vaddr = e->vaddr;
			v[nv].nr_pages = e->nr_pages;
			v[nv].flags = e->has_flags ? e->flags
				      : (e->has_in_parent && e->in_parent) ? KM_CRIU_PE_PARENT
									    : KM_CRIU_PE_PRESENT;
			nv++;
			kvmotion__criu__pagemap_entry__free_unpacked(e, NULL);
		}
		off += len;
	}
	if (head)
		goto bad;
	*ret_pages_id = pages_id;
	*ret = KM_TAKE_PTR(v);
	*ret_n = nv;
	return 0;
bad:
	km_error_set(err, "%s is not a valid CRIU pagemap image", name);
	return -EBADMSG;
}
