/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * pagecmp A B: compares the task pages of two CRIU image directories (a
 * live snapshot and a criu dump of the same process), page by page by
 * virtual address: the same pagemap-<ID>.img names, the same pages at the
 * same addresses with the same bytes and the same PE_* flags. Entries may
 * be cut differently. Prints one summary line (and the first differences on
 * stderr); exits 0 if all is the same, 1 if not, 2 on an error.
 *
 *   pagecmp [--ignore-flags] [--max-diff N] [--ignore ADDR:LEN]... DIR_A DIR_B
 *
 * --max-diff N accepts up to N pages present in both with other bytes
 * (pages of a running process change while they are read). --ignore
 * leaves bytes [ADDR, ADDR+LEN) out of the comparison: what the kernel
 * writes into a stopped process, such as a thread's rseq area (its CPU
 * number, updated whenever the thread is scheduled: CRIU's ptrace calls
 * wake it).
 */
#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "criuimg.h"

#define PAGE 4096u

struct page {
	uint64_t vaddr;
	uint32_t flags;
	const uint8_t *data;
};

struct image {
	struct page *p;
	size_t n;
	void *map;
	size_t map_len;
};

struct ignore {
	uint64_t addr, len;
};
static struct ignore ignored[64];
static size_t n_ignored;

/* Whether the page at vaddr differs, outside the ignored bytes. */
static bool page_differs(uint64_t vaddr, const uint8_t *a, const uint8_t *b)
{
	if (memcmp(a, b, PAGE) == 0)
		return false;
	for (uint64_t i = 0; i < PAGE; i++) {
		bool skip = false;

		for (size_t k = 0; k < n_ignored && !skip; k++)
			skip = vaddr + i >= ignored[k].addr &&
			       vaddr + i < ignored[k].addr + ignored[k].len;
		if (!skip && a[i] != b[i])
			return true;
	}
	return false;
}

static int cmp_page(const void *a, const void *b)
{
	const struct page *x = a, *y = b;

	return x->vaddr < y->vaddr ? -1 : x->vaddr > y->vaddr;
}

static int load(int dirfd, const char *name, struct image *img)
{
	struct km_error err = { { 0 } };
	struct km_criu_pagemap pm = { 0 };
	struct km_criu_pme *e;
	uint32_t pages_id;
	size_t n, total = 0, k = 0;
	const uint8_t *data = NULL;
	char pages[64];
	struct stat st;
	int fd, r;

	r = km_criu_pagemap_read(dirfd, name, &pm, &err);
	if (r < 0) {
		fprintf(stderr, "pagecmp: %s\n", err.msg);
		return -1;
	}
	pages_id = pm.pages_id;
	e = pm.e;
	n = pm.n;
	for (size_t i = 0; i < n; i++)
		if (e[i].flags & KM_CRIU_PE_PRESENT)
			total += e[i].nr_pages;
	snprintf(pages, sizeof(pages), "pages-%u.img", pages_id);
	fd = openat(dirfd, pages, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0 || (uint64_t)st.st_size != total * PAGE) {
		fprintf(stderr, "pagecmp: %s missing or not %zu pages\n", pages, total);
		free(e);
		return -1;
	}
	img->map_len = (size_t)st.st_size;
	img->map = NULL;
	if (img->map_len) {
		img->map = mmap(NULL, img->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
		if (img->map == MAP_FAILED) {
			close(fd);
			free(e);
			return -1;
		}
		data = img->map;
	}
	close(fd);
	img->p = calloc(total ? total : 1, sizeof(*img->p));
	img->n = total;
	for (size_t i = 0; i < n; i++) {
		if (!(e[i].flags & KM_CRIU_PE_PRESENT))
			continue;
		for (uint32_t j = 0; j < e[i].nr_pages; j++, k++)
			img->p[k] = (struct page){ e[i].vaddr + (uint64_t)j * PAGE, e[i].flags,
						   data + k * PAGE };
	}
	qsort(img->p, img->n, sizeof(*img->p), cmp_page);
	free(e);
	return 0;
}

static int names(int dirfd, char ***ret, size_t *ret_n)
{
	DIR *d = fdopendir(dup(dirfd));
	struct dirent *de;
	char **v = NULL;
	size_t n = 0;

	if (!d)
		return -1;
	while ((de = readdir(d)))
		if (fnmatch("pagemap-*.img", de->d_name, 0) == 0 &&
		    fnmatch("pagemap-shmem-*.img", de->d_name, 0) != 0) {
			v = realloc(v, (n + 1) * sizeof(*v));
			v[n++] = strdup(de->d_name);
		}
	closedir(d);
	*ret = v;
	*ret_n = n;
	return 0;
}

int main(int argc, char **argv)
{
	bool flags = true, missing = false;
	uint64_t max_diff = 0, pages = 0, only_a = 0, only_b = 0, differ = 0, flags_differ = 0;
	size_t na, nb, shown = 0;
	char **a, **b;
	int da, db, i = 1;

	for (; i < argc && argv[i][0] == '-'; i++) {
		if (strcmp(argv[i], "--ignore-flags") == 0)
			flags = false;
		else if (strcmp(argv[i], "--max-diff") == 0 && i + 1 < argc)
			max_diff = strtoull(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--ignore") == 0 && i + 1 < argc &&
			 n_ignored < sizeof(ignored) / sizeof(ignored[0]) &&
			 sscanf(argv[i + 1], "%" SCNx64 ":%" SCNu64, &ignored[n_ignored].addr,
				&ignored[n_ignored].len) == 2) {
			n_ignored++;
			i++;
		}
		else
			break;
	}
	if (argc - i != 2) {
		fprintf(stderr, "usage: pagecmp [--ignore-flags] [--max-diff N] [--ignore ADDR:LEN]... "
				"DIR_A DIR_B\n");
		return 2;
	}
	da = open(argv[i], O_RDONLY | O_DIRECTORY);
	db = open(argv[i + 1], O_RDONLY | O_DIRECTORY);
	if (da < 0 || db < 0 || names(da, &a, &na) < 0 || names(db, &b, &nb) < 0) {
		perror("pagecmp");
		return 2;
	}
	for (size_t x = 0; x < na; x++) {
		struct image ia = { 0 }, ib = { 0 };
		size_t p = 0, q = 0;
		bool found = false;

		for (size_t y = 0; y < nb; y++)
			found |= strcmp(a[x], b[y]) == 0;
		if (!found) {
			printf("only in A: %s\n", a[x]);
			missing = true;
			break;
		}
		if (load(da, a[x], &ia) < 0 || load(db, a[x], &ib) < 0)
			return 2;
		while (p < ia.n || q < ib.n) {
			if (q == ib.n || (p < ia.n && ia.p[p].vaddr < ib.p[q].vaddr)) {
				if (shown++ < 10)
					fprintf(stderr, "%s: page %#" PRIx64 " only in A\n", a[x],
						ia.p[p].vaddr);
				only_a++;
				p++;
			} else if (p == ia.n || ib.p[q].vaddr < ia.p[p].vaddr) {
				if (shown++ < 10)
					fprintf(stderr, "%s: page %#" PRIx64 " only in B\n", a[x],
						ib.p[q].vaddr);
				only_b++;
				q++;
			} else {
				pages++;
				if (page_differs(ia.p[p].vaddr, ia.p[p].data, ib.p[q].data)) {
					if (shown++ < 10)
						fprintf(stderr, "%s: page %#" PRIx64 " differs\n",
							a[x], ia.p[p].vaddr);
					differ++;
				}
				if (ia.p[p].flags != ib.p[q].flags) {
					if (flags && shown++ < 10)
						fprintf(stderr,
							"%s: page %#" PRIx64 " flags %u vs %u\n",
							a[x], ia.p[p].vaddr, ia.p[p].flags,
							ib.p[q].flags);
					flags_differ++;
				}
				p++;
				q++;
			}
		}
		if (ia.map_len)
			munmap(ia.map, ia.map_len);
		if (ib.map_len)
			munmap(ib.map, ib.map_len);
		free(ia.p);
		free(ib.p);
	}
	for (size_t x = 0; x < na; x++)
		free(a[x]);
	for (size_t y = 0; y < nb; y++)
		free(b[y]);
	free(a);
	free(b);
	close(da);
	close(db);
	printf("pagemaps %zu/%zu, pages in both %" PRIu64 ", only in A %" PRIu64
	       ", only in B %" PRIu64 ", bytes differ %" PRIu64 ", flags differ %" PRIu64 "\n",
	       na, nb, pages, only_a, only_b, differ, flags_differ);
	if (missing || na != nb || only_a || only_b || differ > max_diff || (flags && flags_differ))
		return 1;
	return 0;
}
