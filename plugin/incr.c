/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Incremental images by content (incr.h). */
#include "incr.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "criuimg.h"
#include "format.h"
#include "workpool.h"

#define PAGE 4096u
/* pages one compare job takes: 64 MiB, enough to amortize the queue */
#define COMPARE_SLICE 16384u
/* bytes one hash job of the snapshot id takes */
#define ID_PIECE (64u << 20)

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A read-only mapping of a whole file; size 0 maps nothing. */
struct mapped {
	const uint8_t *p;
	size_t size;
};

static void unmap(struct mapped *m)
{
	if (m->p && m->size)
		munmap((void *)m->p, m->size);
	m->p = NULL;
}

static int map_at(int dirfd, const char *name, struct mapped *ret, struct km_error *err)
{
	_cleanup_close_ int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
	struct stat st;
	void *p;

	if (fd < 0 || fstat(fd, &st) < 0) {
		km_error_set(err, "%s: %s", name, strerror(errno));
		return -errno;
	}
	ret->size = (size_t)st.st_size;
	ret->p = NULL;
	if (!ret->size)
		return 0;
	p = mmap(NULL, ret->size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		km_error_set(err, "%s: mmap: %s", name, strerror(errno));
		return -errno;
	}
	ret->p = p;
	return 0;
}

static uint64_t present_pages(const struct km_criu_pagemap *pm)
{
	uint64_t n = 0;

	for (size_t i = 0; i < pm->n; i++)
		if (pm->e[i].flags & KM_CRIU_PE_PRESENT)
			n += pm->e[i].nr_pages;
	return n;
}

/* A run of the parent's present pages: where they lie in its pages file. */
struct km_incr_prun {
	uint64_t vaddr, nr, page; /* page: index in the pages file */
};

static int prun_cmp(const void *a, const void *b)
{
	const struct km_incr_prun *x = a, *y = b;

	return x->vaddr < y->vaddr ? -1 : x->vaddr > y->vaddr;
}

void km_incr_parent_close(struct km_incr_parent *p)
{
	km_criu_pagemap_clear(&p->pm);
	if (p->pages && p->size)
		munmap((void *)p->pages, p->size);
	free(p->runs);
	*p = (struct km_incr_parent){ 0 };
}

int km_incr_parent_open(int pdirfd, const char *name, struct km_incr_parent *ret,
			struct km_error *err)
{
	struct km_incr_parent p = { 0 };
	struct mapped m = { 0 };
	char pages[64];
	uint64_t page = 0;
	int r;

	r = km_criu_pagemap_read(pdirfd, name, &p.pm, NULL);
	if (r == -ENOENT)
		return r;
	if (r < 0) {
		km_error_set(err, "the parent's %s is not a valid pagemap image", name);
		return r;
	}
	snprintf(pages, sizeof(pages), "pages-%u.img", p.pm.pages_id);
	r = map_at(pdirfd, pages, &m, err);
	if (r < 0) {
		km_error_prefix(err, "the parent's ");
		goto fail;
	}
	p.pages = m.p;
	p.size = m.size;
	p.runs = calloc(p.pm.n ? p.pm.n : 1, sizeof(*p.runs));
	if (!p.runs) {
		r = -ENOMEM;
		goto fail;
	}
	for (size_t i = 0; i < p.pm.n; i++) {
		const struct km_criu_pme *e = &p.pm.e[i];

		if (!(e->flags & KM_CRIU_PE_PRESENT))
			continue;
		p.runs[p.n_runs++] =
			(struct km_incr_prun){ .vaddr = e->vaddr, .nr = e->nr_pages, .page = page };
		page += e->nr_pages;
	}
	if (page * PAGE != p.size) {
		km_error_set(err, "the parent's %s holds %zu bytes, its pagemap lists %llu pages",
			     pages, p.size, (unsigned long long)page);
		r = -EBADMSG;
		goto fail;
	}
	/* CRIU writes them in address order; a sort costs nothing if so */
	qsort(p.runs, p.n_runs, sizeof(*p.runs), prun_cmp);
	*ret = p;
	return 0;
fail:
	km_incr_parent_close(&p);
	return r;
}

const uint8_t *km_incr_parent_page(const struct km_incr_parent *p, uint64_t vaddr, size_t *hint)
{
	size_t j = *hint;

	/* callers walk addresses upwards: go on from the last run, else bisect */
	if (j >= p->n_runs || p->runs[j].vaddr > vaddr) {
		size_t lo = 0, hi = p->n_runs;

		while (lo < hi) {
			size_t mid = lo + (hi - lo) / 2;

			if (p->runs[mid].vaddr <= vaddr)
				lo = mid + 1;
			else
				hi = mid;
		}
		j = lo ? lo - 1 : 0;
	}
	while (j < p->n_runs && p->runs[j].vaddr + p->runs[j].nr * PAGE <= vaddr)
		j++;
	*hint = j;
	if (j < p->n_runs && p->runs[j].vaddr <= vaddr)
		return p->pages + (p->runs[j].page + (vaddr - p->runs[j].vaddr) / PAGE) * PAGE;
	return NULL;
}

struct compare_job {
	const uint8_t *dump;
	const uint8_t *const *ppage; /* the parent's page for each dumped page, NULL: none */
	uint8_t *equal;
	uint64_t from, to;
};

static int compare_fn(void *arg)
{
	const struct compare_job *j = arg;

	for (uint64_t k = j->from; k < j->to; k++)
		j->equal[k] = j->ppage[k] && memcmp(j->dump + k * PAGE, j->ppage[k], PAGE) == 0;
	return 0;
}

struct one {
	struct km_criu_pagemap dump, out;
	struct km_incr_parent parent;
	struct mapped dm;
	const uint8_t **ppage;
	uint8_t *equal;
	struct compare_job *jobs;
	int tmp_fd;
	char tmp[64];
};

static void one_clear(int dirfd, struct one *o)
{
	km_criu_pagemap_clear(&o->dump);
	km_criu_pagemap_clear(&o->out);
	km_incr_parent_close(&o->parent);
	unmap(&o->dm);
	free(o->ppage);
	free(o->equal);
	free(o->jobs);
	if (o->tmp_fd >= 0) {
		close(o->tmp_fd);
		(void)unlinkat(dirfd, o->tmp, 0);
	}
}

/* The parent's page holding each present page of the dump (NULL: none). */
static int locate(struct one *o, uint64_t n_present)
{
	uint64_t k = 0;
	size_t hint = 0;

	o->ppage = malloc((size_t)n_present * sizeof(*o->ppage));
	if (!o->ppage)
		return -ENOMEM;
	for (size_t i = 0; i < o->dump.n; i++) {
		const struct km_criu_pme *e = &o->dump.e[i];

		if (!(e->flags & KM_CRIU_PE_PRESENT))
			continue;
		for (uint64_t p = 0; p < e->nr_pages; p++, k++)
			o->ppage[k] = km_incr_parent_page(&o->parent, e->vaddr + p * PAGE, &hint);
	}
	return 0;
}

/* Writes the pages not equal to the parent's, in order, and the new entries. */
static int write_pages(int dirfd, struct one *o, uint64_t *ret_kept, struct km_error *err)
{
	size_t cap = 0;
	uint64_t k = 0, kept = 0;
	int r;

	snprintf(o->tmp, sizeof(o->tmp), ".pages-%u.img.incr", o->dump.pages_id);
	(void)unlinkat(dirfd, o->tmp, 0);
	o->tmp_fd = openat(dirfd, o->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (o->tmp_fd < 0) {
		km_error_set(err, "%s: %s", o->tmp, strerror(errno));
		return -errno;
	}
	o->out.pages_id = o->dump.pages_id;
	for (size_t i = 0; i < o->dump.n; i++) {
		const struct km_criu_pme *e = &o->dump.e[i];
		uint64_t p = 0;

		if (!(e->flags & KM_CRIU_PE_PRESENT)) {
			r = km_criu_pagemap_push(&o->out, &cap, e->vaddr, e->nr_pages, e->flags);
			if (r < 0)
				return r;
			continue;
		}
		while (p < e->nr_pages) {
			bool eq = o->equal[k + p];
			uint64_t q = p;

			while (q < e->nr_pages && (bool)o->equal[k + q] == eq)
				q++;
			/* CRIU marks holes in the parent with PE_PARENT alone */
			r = km_criu_pagemap_push(&o->out, &cap, e->vaddr + p * PAGE, q - p,
						 eq ? KM_CRIU_PE_PARENT : e->flags);
			if (r < 0)
				return r;
			if (!eq) {
				r = km_write_full(o->tmp_fd, o->dm.p + (k + p) * PAGE,
						  (size_t)(q - p) * PAGE);
				if (r < 0) {
					km_error_set(err, "%s: %s", o->tmp, strerror(-r));
					return r;
				}
				kept += q - p;
			}
			p = q;
		}
		k += e->nr_pages;
	}
	*ret_kept = kept;
	return 0;
}

static int rewrite_one(int dirfd, int pdirfd, const char *name, struct km_workpool *pool,
		       struct km_incr_stats *st, struct km_error *err)
{
	struct one o = { .tmp_fd = -1 };
	char pages[64];
	_cleanup_free_ void *img = NULL;
	size_t img_size;
	uint64_t n_present, kept = 0, t0 = now_ns(), n_jobs;
	int r;

	r = km_criu_pagemap_read(dirfd, name, &o.dump, err);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < o.dump.n; i++)
		if (o.dump.e[i].flags & KM_CRIU_PE_PARENT) {
			km_error_set(err, "%s has pages in a parent image already", name);
			r = -EINVAL;
			goto out;
		}
	n_present = present_pages(&o.dump);
	st->pages += n_present;
	st->bytes_before += n_present * PAGE;
	r = n_present ? km_incr_parent_open(pdirfd, name, &o.parent, err) : -ENOENT;
	if (r == -ENOENT) {
		/* a task the snapshot did not know: all its pages cross */
		st->pagemaps_kept++;
		st->pages_present += n_present;
		st->bytes_after += n_present * PAGE;
		r = 0;
		goto out;
	}
	if (r < 0)
		goto out;
	snprintf(pages, sizeof(pages), "pages-%u.img", o.dump.pages_id);
	r = map_at(dirfd, pages, &o.dm, err);
	if (r < 0)
		goto out;
	if (o.dm.size != n_present * PAGE) {
		km_error_set(err, "%s holds %zu bytes, its pagemap %s lists %llu pages", pages,
			     o.dm.size, name, (unsigned long long)n_present);
		r = -EBADMSG;
		goto out;
	}
	r = locate(&o, n_present);
	if (r < 0)
		goto out;
	o.equal = calloc((size_t)n_present, 1);
	n_jobs = (n_present + COMPARE_SLICE - 1) / COMPARE_SLICE;
	o.jobs = calloc((size_t)n_jobs, sizeof(*o.jobs));
	if (!o.equal || !o.jobs) {
		r = -ENOMEM;
		goto out;
	}
	for (uint64_t i = 0; i < n_jobs; i++) {
		o.jobs[i] = (struct compare_job){
			.dump = o.dm.p,
			.ppage = o.ppage,
			.equal = o.equal,
			.from = i * COMPARE_SLICE,
			.to = KM_MIN((i + 1) * COMPARE_SLICE, n_present),
		};
		r = km_workpool_submit(pool, compare_fn, &o.jobs[i]);
		if (r < 0)
			break;
	}
	if (km_workpool_wait(pool) < 0 && r == 0)
		r = -EIO;
	if (r < 0)
		goto out;
	st->compare_ns += now_ns() - t0;
	t0 = now_ns();
	r = write_pages(dirfd, &o, &kept, err);
	if (r < 0)
		goto out;
	r = km_criu_pagemap_encode(&o.out, &img, &img_size);
	if (r < 0) {
		km_error_set(err, "%s: cannot encode the new pagemap: %s", name, strerror(-r));
		goto out;
	}
	if (close(o.tmp_fd) < 0 || renameat(dirfd, o.tmp, dirfd, pages) < 0) {
		o.tmp_fd = -1;
		r = -errno;
		km_error_set(err, "%s: %s", pages, strerror(-r));
		(void)unlinkat(dirfd, o.tmp, 0);
		goto out;
	}
	o.tmp_fd = -1;
	r = km_write_file_atomic_at(dirfd, name, img, img_size, false);
	if (r < 0) {
		km_error_set(err, "%s: cannot write it: %s (the image is unusable)", name,
			     strerror(-r));
		goto out;
	}
	st->write_ns += now_ns() - t0;
	st->pagemaps++;
	st->pages_parent += n_present - kept;
	st->pages_present += kept;
	st->bytes_after += kept * PAGE;
out:
	one_clear(dirfd, &o);
	return r;
}

static bool is_task_pagemap(const char *name)
{
	return fnmatch("pagemap-*.img", name, 0) == 0 &&
	       fnmatch("pagemap-shmem-*.img", name, 0) != 0;
}

static bool skip_not_task_pagemap(const char *name)
{
	return !is_task_pagemap(name);
}

int km_incr_rewrite(int dirfd, int parent_dirfd, const struct km_incr_opts *o,
		    struct km_incr_stats *ret, struct km_error *err)
{
	struct km_incr_stats st = { 0 };
	struct km_workpool *pool = NULL;
	char **names = NULL;
	size_t n = 0;
	int r;

	r = km_list_files_at(dirfd, skip_not_task_pagemap, &names, &n);
	if (r < 0) {
		km_error_set(err, "cannot list the image: %s", strerror(-r));
		return r;
	}
	if (n == 0) {
		km_error_set(err, "no pagemap images");
		r = -ENOENT;
		goto out;
	}
	r = km_workpool_new(o ? o->threads : 0, 0, &pool);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < n && r == 0; i++)
		r = rewrite_one(dirfd, parent_dirfd, names[i], pool, &st, err);
out:
	km_workpool_free(pool);
	km_free_names(names, n);
	if (r == 0 && ret)
		*ret = st;
	return r;
}

/* --- the snapshot id ----------------------------------------------------------- */

static bool skip_not_pages(const char *name)
{
	return fnmatch("pagemap-*.img", name, 0) != 0 && !km_criu_is_pages_image(name);
}

struct id_job {
	int fd;
	uint64_t off, len;
	struct km_hash h;
};

static int id_fn(void *arg)
{
	struct id_job *j = arg;
	_cleanup_free_ uint8_t *buf = NULL;
	struct km_hasher *h;
	uint64_t done = 0;

	buf = malloc(1u << 20);
	h = km_hasher_new();
	if (!buf || !h) {
		km_hasher_free(h);
		return -ENOMEM;
	}
	while (done < j->len) {
		size_t want = (size_t)KM_MIN(j->len - done, (uint64_t)(1u << 20));
		ssize_t got = km_pread_full(j->fd, buf, want, (off_t)(j->off + done));

		if (got != (ssize_t)want) {
			km_hasher_free(h);
			return got < 0 ? (int)got : -EIO;
		}
		km_hasher_update(h, buf, want);
		done += want;
	}
	km_hasher_final(h, &j->h);
	km_hasher_free(h);
	return 0;
}

/*
 * SHA-256 over, for each pagemap-*.img and pages-*.img in name order: the
 * name, a NUL, the size (u64 LE), then the SHA-256 of each 64 MiB piece of
 * the file (pieces: so that several threads hash one large pages file).
 */
int km_incr_snapshot_id(int dirfd, unsigned threads, struct km_hash *ret, struct km_error *err)
{
	struct km_workpool *pool = NULL;
	struct km_hasher *h = NULL;
	char **names = NULL;
	int *fds = NULL;
	uint64_t *sizes = NULL;
	struct id_job *jobs = NULL;
	size_t n = 0, n_jobs = 0, j;
	bool pagemap = false;
	int r;

	r = km_list_files_at(dirfd, skip_not_pages, &names, &n);
	if (r < 0) {
		km_error_set(err, "cannot list the image: %s", strerror(-r));
		return r;
	}
	fds = calloc(n ? n : 1, sizeof(*fds));
	sizes = calloc(n ? n : 1, sizeof(*sizes));
	if (!fds || !sizes) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		fds[i] = -1;
	for (size_t i = 0; i < n; i++) {
		struct stat sb;

		pagemap |= strncmp(names[i], "pagemap-", 8) == 0;
		fds[i] = openat(dirfd, names[i], O_RDONLY | O_CLOEXEC);
		if (fds[i] < 0 || fstat(fds[i], &sb) < 0) {
			r = -errno;
			km_error_set(err, "%s: %s", names[i], strerror(-r));
			goto out;
		}
		sizes[i] = (uint64_t)sb.st_size;
		n_jobs += sizes[i] ? (sizes[i] + ID_PIECE - 1) / ID_PIECE : 0;
	}
	if (!pagemap) {
		km_error_set(err, "no pagemap images");
		r = -ENOENT;
		goto out;
	}
	jobs = calloc(n_jobs ? n_jobs : 1, sizeof(*jobs));
	h = km_hasher_new();
	if (!jobs || !h) {
		r = -ENOMEM;
		goto out;
	}
	r = km_workpool_new(threads, 0, &pool);
	if (r < 0)
		goto out;
	j = 0;
	for (size_t i = 0; i < n && r == 0; i++)
		for (uint64_t off = 0; off < sizes[i] && r == 0; off += ID_PIECE, j++) {
			jobs[j] = (struct id_job){ .fd = fds[i],
						   .off = off,
						   .len = KM_MIN(sizes[i] - off, (uint64_t)ID_PIECE) };
			r = km_workpool_submit(pool, id_fn, &jobs[j]);
		}
	{
		int q = km_workpool_wait(pool);

		if (r == 0)
			r = q;
	}
	if (r < 0) {
		km_error_set(err, "hashing the snapshot's pages: %s", strerror(-r));
		goto out;
	}
	j = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t le = htole64(sizes[i]);

		km_hasher_update(h, names[i], strlen(names[i]) + 1);
		km_hasher_update(h, &le, sizeof(le));
		for (uint64_t off = 0; off < sizes[i]; off += ID_PIECE, j++)
			km_hasher_update(h, jobs[j].h.b, KM_HASH_SIZE);
	}
	km_hasher_final(h, ret);
out:
	km_workpool_free(pool);
	km_hasher_free(h);
	free(jobs);
	for (size_t i = 0; fds && i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free(fds);
	free(sizes);
	km_free_names(names, n);
	return r;
}
