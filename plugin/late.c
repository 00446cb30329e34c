/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "late.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "workpool.h"

#define PAGE KM_LATE_PAGE_SIZE

/* A run of page indexes [from, to). */
struct page_run {
	uint64_t from, to;
};

/* Room in *v (of *cap elements of 'size' bytes) for element n. -ENOMEM. */
static int grow(void *v, size_t n, size_t *cap, size_t size)
{
	void **p = v, *g;
	size_t c;

	if (n < *cap)
		return 0;
	c = *cap ? *cap * 2 : 16;
	g = realloc(*p, c * size);
	if (!g)
		return -ENOMEM;
	*p = g;
	*cap = c;
	return 0;
}

static int runs_push(struct page_run **v, size_t *n, size_t *cap, uint64_t from, uint64_t to)
{
	int r = grow(v, *n, cap, sizeof(**v));

	if (r == 0)
		(*v)[(*n)++] = (struct page_run){ from, to };
	return r;
}

/* Whole pages inside runs of consecutive chunk extents, min_run_pages or more at a time. */
static int weights_pages(const struct km_file_entry *f, uint64_t min_run_pages,
			 struct page_run **ret, size_t *ret_n)
{
	struct page_run *v = NULL;
	size_t n = 0, cap = 0;
	uint64_t off = 0, run_start = 0;
	bool in_run = false;
	int r = 0;

	for (size_t i = 0; i <= f->n_extents && r == 0; i++) {
		bool chunk = i < f->n_extents && f->extents[i].kind == KM_EXTENT_CHUNK;

		if (chunk && !in_run) {
			run_start = off;
			in_run = true;
		} else if (!chunk && in_run) {
			uint64_t from = (run_start + PAGE - 1) / PAGE, to = off / PAGE;

			if (to > from && to - from >= min_run_pages)
				r = runs_push(&v, &n, &cap, from, to);
			in_run = false;
		}
		if (i < f->n_extents)
			off += f->extents[i].length;
	}
	if (r < 0) {
		free(v);
		return r;
	}
	*ret = v;
	*ret_n = n;
	return 0;
}

/* The first extent that ends after byte 'pos' (offsets[i]: where extent i starts). */
static size_t extent_at(const uint64_t *offsets, const struct km_file_entry *f, uint64_t pos)
{
	size_t lo = 0, hi = f->n_extents;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (offsets[mid] + f->extents[mid].length <= pos)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int pieces_push(struct km_late_task *t, size_t *cap, const struct km_late_piece *p)
{
	int r = grow(&t->pieces, t->n, cap, sizeof(*t->pieces));

	if (r < 0)
		return r;
	t->pieces[t->n++] = *p;
	t->bytes += p->length;
	return 0;
}

/* Pieces for bytes [from, to) of the file, all inside chunk extents, at vaddr. */
static int add_pieces(struct km_late_task *t, size_t *cap, const struct km_file_entry *f,
		      const uint64_t *offsets, uint64_t from, uint64_t to, uint64_t vaddr)
{
	for (size_t i = extent_at(offsets, f, from); i < f->n_extents && offsets[i] < to; i++) {
		const struct km_extent *e = &f->extents[i];
		uint64_t s = KM_MAX(offsets[i], from), end = KM_MIN(offsets[i] + e->length, to);
		struct km_late_piece p = {
			.vaddr = vaddr + (s - from),
			.length = end - s,
			.chunk_off = s - offsets[i],
			.chunk_length = e->length,
			.id = e->id,
		};
		int r;

		if (e->kind != KM_EXTENT_CHUNK)
			return -EINVAL; /* weights_pages() said otherwise */
		r = pieces_push(t, cap, &p);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Pages [at, to) of the split file, at vaddr, stay: in the pagemap and the kept runs. */
static int keep_pages(struct km_late_file *lf, size_t *pm_cap, size_t *kept_cap, uint64_t vaddr,
		      uint64_t at, uint64_t to, uint32_t flags)
{
	struct km_late_run *last = lf->n_kept ? &lf->kept[lf->n_kept - 1] : NULL;
	int r = km_criu_pagemap_push(&lf->pagemap, pm_cap, vaddr, to - at, flags);

	if (r < 0)
		return r;
	if (last && last->from + last->pages == at) {
		last->pages += to - at;
	} else {
		r = grow(&lf->kept, lf->n_kept, kept_cap, sizeof(*lf->kept));
		if (r < 0)
			return r;
		lf->kept[lf->n_kept++] = (struct km_late_run){ at, to - at, lf->kept_pages };
	}
	lf->kept_pages += to - at;
	return 0;
}

int km_late_file_build(const struct km_file_entry *f, const struct km_criu_pagemap *pm,
		       uint64_t min_run_pages, struct km_late_file *ret, struct km_error *err)
{
	_cleanup_free_ struct page_run *late = NULL;
	_cleanup_free_ uint64_t *offsets = NULL;
	struct km_late_file lf = { 0 };
	size_t n_late = 0, kept_cap = 0, pm_cap = 0, piece_cap = 0, li = 0;
	uint64_t pages = 0, q = 0, off = 0;
	int r;

	*ret = lf;
	for (size_t i = 0; i < pm->n; i++) {
		/* CRIU marks anonymous pages PE_LAZY|PE_PRESENT: lazy-able, and in the file. */
		if (!(pm->e[i].flags & KM_CRIU_PE_PRESENT) || (pm->e[i].flags & KM_CRIU_PE_PARENT))
			return 0; /* pages elsewhere: leave the file as join makes it */
		pages += pm->e[i].nr_pages;
	}
	if (pages > UINT64_MAX / PAGE || pages * PAGE != f->size)
		return 0;
	r = weights_pages(f, min_run_pages ? min_run_pages : 1, &late, &n_late);
	if (r < 0)
		return r;
	if (n_late == 0)
		return 0;
	offsets = calloc(f->n_extents ? f->n_extents : 1, sizeof(*offsets));
	if (!offsets)
		return -ENOMEM;
	for (size_t i = 0; i < f->n_extents; off += f->extents[i].length, i++)
		offsets[i] = off;

	lf.pagemap.pages_id = pm->pages_id;
	/* Each entry's pages [q, q + nr): kept parts stay in the pagemap, late ones become pieces. */
	for (size_t i = 0; i < pm->n; q += pm->e[i].nr_pages, i++) {
		uint64_t at = q, end = q + pm->e[i].nr_pages;

		while (at < end) {
			uint64_t vaddr = pm->e[i].vaddr + (at - q) * PAGE, to;
			bool is_late;

			while (li < n_late && late[li].to <= at)
				li++;
			is_late = li < n_late && late[li].from <= at;
			to = is_late ? KM_MIN(end, late[li].to)
				     : (li < n_late ? KM_MIN(end, late[li].from) : end);
			if (is_late)
				r = add_pieces(&lf.task, &piece_cap, f, offsets, at * PAGE, to * PAGE,
					       vaddr);
			else
				r = keep_pages(&lf, &pm_cap, &kept_cap, vaddr, at, to, pm->e[i].flags);
			if (r < 0)
				break;
			at = to;
		}
		if (r < 0)
			break;
	}
	if (r < 0) {
		if (r == -EINVAL)
			km_error_set(err, "%s: a weights run holds bytes that are not chunks", f->name);
		km_late_file_clear(&lf);
		return r;
	}
	*ret = lf;
	return 0;
}

void km_late_file_clear(struct km_late_file *lf)
{
	free(lf->kept);
	km_criu_pagemap_clear(&lf->pagemap);
	free(lf->task.pieces);
	free(lf->task.pages_name);
	*lf = (struct km_late_file){ 0 };
}

int km_late_file_map(const struct km_late_file *lf, uint64_t off, uint64_t len, km_late_part_fn fn,
		     void *userdata)
{
	uint64_t end = off + len;
	size_t lo = 0, hi = lf->n_kept;

	/* The first kept run that ends after off. */
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if ((lf->kept[mid].from + lf->kept[mid].pages) * PAGE <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (size_t i = lo; i < lf->n_kept && lf->kept[i].from * PAGE < end; i++) {
		const struct km_late_run *k = &lf->kept[i];
		uint64_t s = KM_MAX(off, k->from * PAGE);
		uint64_t e = KM_MIN(end, (k->from + k->pages) * PAGE);
		int r = fn(userdata, s, k->to * PAGE + (s - k->from * PAGE), e - s);

		if (r < 0)
			return r;
	}
	return 0;
}

/* ----------------------------------------------------------------- fill */

#define FILL_JOB_PIECES 64

struct fill_ctx {
	struct km_store *store;
	const struct km_late_task *task;
	pid_t pid;
	int mem_fd; /* /proc/PID/mem, for what process_vm_writev cannot write */
	pthread_mutex_t lock;
	struct km_error *err; /* the first error, under lock */
	bool failed;
};

struct fill_job {
	struct fill_ctx *ctx;
	size_t first, n;
};

static void fill_fail(struct fill_ctx *c, const struct km_late_piece *p, const char *what, int r)
{
	char hex[KM_HASH_HEX_SIZE];

	pthread_mutex_lock(&c->lock);
	if (!c->failed)
		km_error_set(c->err, "chunk %s (%s, %" PRIu64 " bytes at 0x%" PRIx64 " in pid %d): %s: %s",
			     km_hash_to_hex(&p->id, hex), c->task->pages_name, p->length, p->vaddr,
			     (int)c->pid, what, strerror(-r));
	c->failed = true;
	pthread_mutex_unlock(&c->lock);
}

/* Maps piece p's chunk read-only, after checking it is the store's chunk. */
static int map_chunk(struct fill_ctx *c, const struct km_late_piece *p, void **ret)
{
	_cleanup_close_ int fd = -1;
	bool recorded = false;
	void *map;
	int r;

	fd = km_store_open_chunk(c->store, &p->id, p->chunk_length, &recorded);
	if (fd < 0) {
		fill_fail(c, p,
			  fd == -ENOENT	   ? "missing from the store"
			  : fd == -EBADMSG ? "not of its length in the store"
					   : "opening it",
			  fd);
		return fd;
	}
	if (!recorded) {
		r = km_store_check_chunk(c->store, &p->id, fd);
		if (r < 0) {
			fill_fail(c, p, r == -EBADMSG ? "corrupt in the store" : "reading it", r);
			return r;
		}
	}
	map = mmap(NULL, (size_t)p->chunk_length, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (map == MAP_FAILED) {
		r = -errno;
		fill_fail(c, p, "mapping it", r);
		return r;
	}
	*ret = map;
	return 0;
}

/* Piece by piece through /proc/PID/mem: it writes read-only private mappings too. */
static int write_mem(struct fill_ctx *c, const struct km_late_piece *p, void *const *maps, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		int r = km_pwrite_full(c->mem_fd, (const uint8_t *)maps[i] + p[i].chunk_off,
				       (size_t)p[i].length, (off_t)p[i].vaddr);

		if (r < 0) {
			fill_fail(c, &p[i], "writing it into the process", r);
			return r;
		}
	}
	return 0;
}

static int fill_job_run(void *arg)
{
	struct fill_job *j = arg;
	struct fill_ctx *c = j->ctx;
	const struct km_late_piece *p = c->task->pieces + j->first;
	void *maps[FILL_JOB_PIECES] = { NULL };
	struct iovec local[FILL_JOB_PIECES] = { { 0 } }, remote[FILL_JOB_PIECES] = { { 0 } };
	size_t mapped = 0, done = 0;
	uint64_t total = 0;
	ssize_t k;
	int r = 0;

	for (; mapped < j->n && r == 0; mapped++) {
		r = map_chunk(c, &p[mapped], &maps[mapped]);
		if (r < 0)
			break;
		local[mapped] = (struct iovec){ (uint8_t *)maps[mapped] + p[mapped].chunk_off,
						(size_t)p[mapped].length };
		remote[mapped] = (struct iovec){ (void *)(uintptr_t)p[mapped].vaddr,
						 (size_t)p[mapped].length };
		total += p[mapped].length;
	}
	if (r == 0) {
		/* One call for the job; what it could not write (read-only pages) goes through mem. */
		k = process_vm_writev(c->pid, local, j->n, remote, j->n, 0);
		if (k < 0 && errno != EFAULT) {
			r = -errno;
			fill_fail(c, p, "process_vm_writev", r);
		} else if (k < 0 || (uint64_t)k < total) {
			uint64_t written = k < 0 ? 0 : (uint64_t)k;

			while (done < j->n && written >= p[done].length) {
				written -= p[done].length;
				done++;
			}
			r = write_mem(c, p + done, maps + done, j->n - done);
		}
	}
	for (size_t i = 0; i < mapped; i++)
		munmap(maps[i], (size_t)p[i].chunk_length);
	return r;
}

int km_late_fill(struct km_store *s, const struct km_late_task *t, pid_t pid, unsigned threads,
		 struct km_error *err)
{
	struct fill_ctx c = { .store = s, .task = t, .pid = pid, .mem_fd = -1, .err = err };
	_cleanup_free_ struct fill_job *jobs = NULL;
	struct km_workpool *pool = NULL;
	size_t n_jobs = (t->n + FILL_JOB_PIECES - 1) / FILL_JOB_PIECES;
	char path[64];
	int r = 0, w;

	if (t->n == 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
	c.mem_fd = open(path, O_RDWR | O_CLOEXEC);
	if (c.mem_fd < 0) {
		r = -errno;
		km_error_set(err, "cannot open %s: %s", path, strerror(-r));
		return r;
	}
	jobs = calloc(n_jobs, sizeof(*jobs));
	if (!jobs) {
		close(c.mem_fd);
		return -ENOMEM;
	}
	pthread_mutex_init(&c.lock, NULL);
	r = km_workpool_new(threads, (unsigned)KM_MIN(n_jobs, (size_t)4096), &pool);
	for (size_t i = 0; i < n_jobs && r == 0; i++) {
		jobs[i] = (struct fill_job){ &c, i * FILL_JOB_PIECES,
					     KM_MIN((size_t)FILL_JOB_PIECES, t->n - i * FILL_JOB_PIECES) };
		r = km_workpool_submit(pool, fill_job_run, &jobs[i]);
	}
	w = pool ? km_workpool_wait(pool) : 0;
	if (r == 0)
		r = w;
	km_workpool_free(pool);
	if (r < 0 && !c.failed)
		km_error_set(err, "writing the weights into pid %d: %s", (int)pid, strerror(-r));
	pthread_mutex_destroy(&c.lock);
	close(c.mem_fd);
	/* What was hashed just now need not be hashed by the next restore. */
	km_store_verified_flush(s);
	return r;
}

struct km_late_task *km_late_plan_task(struct km_late_plan *p, pid_t pid)
{
	for (size_t i = 0; p && i < p->n; i++)
		if (p->tasks[i].pid == pid)
			return &p->tasks[i];
	return NULL;
}

void km_late_plan_free(struct km_late_plan *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->n; i++) {
		free(p->tasks[i].pieces);
		free(p->tasks[i].pages_name);
	}
	free(p->tasks);
	free(p);
}

int km_late_ns_pid(pid_t pid, pid_t *ret)
{
	_cleanup_fclose_ FILE *f = NULL;
	char path[64], line[512];

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		char *last, *end;
		long v;

		if (strncmp(line, "NSpid:", 6) != 0)
			continue;
		end = line + strcspn(line, "\n");
		*end = 0;
		last = strrchr(line, '\t');
		if (!last)
			last = strrchr(line, ' ');
		if (!last)
			return -EBADMSG;
		v = strtol(last + 1, &end, 10);
		if (*end || v <= 0)
			return -EBADMSG;
		*ret = (pid_t)v;
		return 0;
	}
	*ret = pid; /* kernels without NSpid: one namespace */
	return 0;
}
