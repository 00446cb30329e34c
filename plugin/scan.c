/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "scan.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif

/* Bytes cut per window; each window's chunks are classified before emit. */
#define SCAN_WINDOW (64u * 1024 * 1024)
/* Bytes of chunks per pool job. */
#define SCAN_JOB_BYTES (4u * 1024 * 1024)
/* Chunks handed to emit at once by the comparing scan. */
#define KNOWN_BATCH 1024
/*
 * Known chunks of one length compared before hashing the chunk instead: a
 * compare that fails costs an open and a map, a hash ~0.2 ms per 256 KiB.
 */
#define KNOWN_MAX_CANDIDATES 4

struct classify_job {
	const struct km_scanner *sc;
	const uint8_t *base;
	struct km_scan_chunk *chunks;
	size_t n;
	int error;
	size_t bad; /* chunk index of the error */
};

static int classify(void *arg)
{
	struct classify_job *j = arg;

	for (size_t i = 0; i < j->n; i++) {
		struct km_scan_chunk *c = &j->chunks[i];
		const uint8_t *p = j->base + c->offset;
		int r;

		if (km_is_zero(p, c->length)) {
			c->kind = KM_SCAN_ZERO;
			continue;
		}
		km_hash_buf(p, c->length, &c->id);
		if (j->sc->put) {
			r = km_store_put(j->sc->store, &c->id, p, c->length);
			if (r == 0)
				c->kind = KM_SCAN_ADDED;
			else if (r == -EEXIST)
				c->kind = KM_SCAN_STORED;
			else
				goto fail;
		} else {
			r = km_store_has(j->sc->store, &c->id);
			if (r < 0)
				goto fail;
			c->kind = r ? KM_SCAN_STORED : KM_SCAN_NOT_STORED;
		}
		continue;
fail:
		j->error = r;
		j->bad = i;
		return r;
	}
	return 0;
}

struct file_hash_job {
	struct km_hasher *hasher;
	const uint8_t *p;
	size_t n;
};

static int file_hash_update(void *arg)
{
	struct file_hash_job *j = arg;

	km_hasher_update(j->hasher, j->p, j->n);
	return 0;
}

/*
 * Classifies the non-zero chunk c (offset, length set) without hashing it
 * unless it has too many candidates. *ret_next gets the known chunk that
 * should follow it, KM_KNOWN_NONE if none.
 */
static int classify_known(const struct km_scanner *sc, const uint8_t *p, struct km_scan_chunk *c,
			  uint32_t *ret_next)
{
	uint32_t i = km_known_find(sc->known, c->length);
	int r;

	for (unsigned tries = 0; i != KM_KNOWN_NONE; tries++) {
		const struct km_known_chunk *k = km_known_get(sc->known, i);

		if (tries == KNOWN_MAX_CANDIDATES) {
			/* Many chunks of this length: look it up by its SHA-256. */
			km_hash_buf(p, c->length, &c->id);
			r = km_store_has(sc->store, &c->id);
			if (r < 0)
				return r;
			c->kind = r ? KM_SCAN_STORED : KM_SCAN_NOT_STORED;
			i = r ? km_known_find_id(sc->known, &c->id) : KM_KNOWN_NONE;
			*ret_next = i == KM_KNOWN_NONE ? KM_KNOWN_NONE : km_known_get(sc->known, i)->next;
			return 0;
		}
		/* A chunk the index names but the store lost is no match. */
		r = km_store_compare(sc->store, &k->id, p, c->length);
		if (r < 0 && r != -ENOENT) {
			c->id = k->id;
			return r;
		}
		if (r == 1) {
			c->kind = KM_SCAN_STORED;
			c->id = k->id;
			*ret_next = k->next;
			return 0;
		}
		i = k->same_length;
	}
	c->kind = KM_SCAN_NOT_STORED;
	*ret_next = KM_KNOWN_NONE;
	return 0;
}

/*
 * The comparing scan (see scan.h). The file is cut into one part per
 * thread; the calling thread scans the first part, handing its chunks to
 * emit as it goes (so the delta compresses meanwhile), while the pool
 * scans the others from a fresh chunker. A part's cuts are the serial
 * scan's from the first cut both share on: a cut depends only on the bytes
 * from the chunk's start (a successor is only a faster way to the same
 * cut, see known.h), so the calling thread carries on past its part, a
 * chunk at a time, until it reaches a cut of the next part, and takes that
 * part's chunks from there. The result is exactly the serial scan's.
 */

/* Parts smaller than this are not worth a thread. */
#define SCAN_PART_MIN (4u * 1024 * 1024)

struct known_state {
	struct km_chunker ch;
	uint32_t next; /* the known chunk expected here, KM_KNOWN_NONE if none */
};

/* Cuts and classifies the chunk at pos into *c; on error c->id names what failed. */
static int scan_one(const struct km_scanner *sc, const uint8_t *base, uint64_t size, uint64_t pos,
		    struct known_state *st, struct km_scan_chunk *c)
{
	const uint8_t *p = base + pos;
	int r;

	*c = (struct km_scan_chunk){ .offset = pos };
	if (st->next != KM_KNOWN_NONE) {
		/* The run of weights goes on if the bytes are the next chunk's. */
		const struct km_known_chunk *k = km_known_get(sc->known, st->next);

		r = k->length <= size - pos ? km_store_compare(sc->store, &k->id, p, k->length) : 0;
		if (r < 0 && r != -ENOENT) {
			c->id = k->id;
			return r;
		}
		if (r == 1) {
			c->length = k->length;
			c->kind = KM_SCAN_STORED;
			c->id = k->id;
			st->next = k->next;
			return 0;
		}
		/* The chunker state is a fresh one at every cut: resume it here. */
	}
	{
		size_t k = km_chunker_scan(&st->ch, p, size - pos);

		if (k == KM_CHUNKER_NO_BOUNDARY) {
			k = (size_t)(size - pos);
			km_chunker_reset(&st->ch);
		}
		c->length = (uint32_t)k;
	}
	if (km_is_zero(p, c->length)) {
		c->kind = KM_SCAN_ZERO;
		st->next = KM_KNOWN_NONE;
		return 0;
	}
	return classify_known(sc, p, c, &st->next);
}

static int state_init(const struct km_scanner *sc, struct known_state *st)
{
	st->next = KM_KNOWN_NONE;
	return km_chunker_init(&st->ch, sc->params);
}

static void scan_fail(struct km_error *err, const char *what, const struct km_scan_chunk *c, int r)
{
	char hex[KM_HASH_HEX_SIZE];

	km_error_set(err, "%s: chunk %s at offset %llu: %s", what, km_hash_to_hex(&c->id, hex),
		     (unsigned long long)c->offset, strerror(-r));
}

/* One part scanned by the pool: its chunks, from 'start' to the first cut at or past 'end'. */
struct part_job {
	const struct km_scanner *sc;
	const uint8_t *base;
	uint64_t size, start, end;
	struct km_scan_chunk *v;
	size_t n, cap;
	struct known_state last; /* the state after its last chunk */
	int error;
	struct km_scan_chunk bad;
};

static int part_run(void *arg)
{
	struct part_job *j = arg;
	uint64_t pos = j->start;
	int r;

	r = state_init(j->sc, &j->last);
	/* Its pages mapped in one batch, by the thread that reads them. */
	km_prefault(j->base + j->start, j->end - j->start);
	while (r == 0 && pos < j->end) {
		if (j->n == j->cap) {
			size_t cap = j->cap ? 2 * j->cap : 1024;
			struct km_scan_chunk *v = realloc(j->v, cap * sizeof(*v));

			if (!v) {
				r = -ENOMEM;
				break;
			}
			j->v = v;
			j->cap = cap;
		}
		r = scan_one(j->sc, j->base, j->size, pos, &j->last, &j->v[j->n]);
		if (r < 0) {
			j->bad = j->v[j->n];
			break;
		}
		pos += j->v[j->n++].length;
	}
	j->error = r;
	return 0; /* the error travels in the job, with its chunk */
}

/* The calling thread's batch of chunks for emit. */
struct emitter {
	km_scan_emit_fn emit;
	void *userdata;
	const uint8_t *base;
	struct km_scan_chunk *batch;
	size_t n;
};

static int emitter_add(struct emitter *e, const struct km_scan_chunk *c)
{
	e->batch[e->n++] = *c;
	if (e->n < KNOWN_BATCH)
		return 0;
	e->n = 0;
	return e->emit(e->userdata, e->base, e->batch, KNOWN_BATCH);
}

static int emitter_flush(struct emitter *e)
{
	size_t n = e->n;

	e->n = 0;
	return n ? e->emit(e->userdata, e->base, e->batch, n) : 0;
}

/* The first chunk of j that starts at pos; SIZE_MAX if none. */
static size_t part_find(const struct part_job *j, uint64_t pos)
{
	size_t lo = 0, hi = j->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (j->v[mid].offset < pos)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < j->n && j->v[lo].offset == pos ? lo : SIZE_MAX;
}

/*
 * The comparing scan of [start, size): *from is the state at the cut
 * 'start' (a fresh one at 0).
 */
static int scan_known(const struct km_scanner *sc, const uint8_t *base, uint64_t size,
		      uint64_t start, const struct known_state *from, const char *what,
		      km_scan_emit_fn emit, void *userdata, struct km_error *err)
{
	_cleanup_free_ struct km_scan_chunk *batch = calloc(KNOWN_BATCH, sizeof(*batch));
	_cleanup_free_ struct part_job *parts = NULL;
	struct emitter e = { emit, userdata, base, batch, 0 };
	unsigned n_parts = km_workpool_threads(sc->pool) + 1;
	struct known_state st = *from;
	struct km_scan_chunk c;
	uint64_t pos = start, first_end, todo = size - start;
	int r = 0;

	if (!batch)
		return -ENOMEM;
	if (todo / SCAN_PART_MIN < n_parts)
		n_parts = (unsigned)KM_MAX(todo / SCAN_PART_MIN, 1);
	parts = calloc(n_parts, sizeof(*parts));
	if (!parts)
		return -ENOMEM;
	for (unsigned i = 1; i < n_parts && r == 0; i++) {
		parts[i] = (struct part_job){ .sc = sc, .base = base, .size = size,
					      .start = start + todo * i / n_parts,
					      .end = start + todo * (i + 1) / n_parts };
		r = km_workpool_submit(sc->pool, part_run, &parts[i]);
	}
	first_end = n_parts > 1 ? parts[1].start : size;
	km_prefault(base + start, first_end - start);
	/* The first part, emitted as it is scanned. */
	while (r == 0 && pos < first_end) {
		r = scan_one(sc, base, size, pos, &st, &c);
		if (r < 0)
			scan_fail(err, what, &c, r);
		else
			r = emitter_add(&e, &c);
		pos += c.length;
	}
	{
		int w = km_workpool_wait(sc->pool);

		if (r == 0)
			r = w;
	}
	/* Then each next part, from the first cut it shares with the serial scan. */
	for (unsigned i = 1; i < n_parts && r == 0; i++) {
		struct part_job *j = &parts[i];
		size_t at = SIZE_MAX;

		if (j->error) {
			r = j->error;
			scan_fail(err, what, &j->bad, r);
			break;
		}
		while (r == 0 && pos < size && j->n > 0 && pos <= j->v[j->n - 1].offset &&
		       (at = part_find(j, pos)) == SIZE_MAX) {
			r = scan_one(sc, base, size, pos, &st, &c);
			if (r < 0)
				scan_fail(err, what, &c, r);
			else
				r = emitter_add(&e, &c);
			pos += c.length;
		}
		if (r < 0 || at == SIZE_MAX)
			continue; /* past all its cuts: the next part, or the end, takes over */
		r = emitter_flush(&e);
		if (r == 0)
			r = emit(userdata, base, j->v + at, j->n - at);
		pos = j->v[j->n - 1].offset + j->v[j->n - 1].length;
		st = j->last;
	}
	/* Past the last part's cuts (it never shared one): serially to the end. */
	while (r == 0 && pos < size) {
		r = scan_one(sc, base, size, pos, &st, &c);
		if (r < 0)
			scan_fail(err, what, &c, r);
		else
			r = emitter_add(&e, &c);
		pos += c.length;
	}
	if (r == 0)
		r = emitter_flush(&e);
	for (unsigned i = 1; i < n_parts; i++)
		free(parts[i].v);
	return r;
}

/*
 * Following a growing file (see scan.h). A chunk at pos is cut and
 * classified from at most max(max_size, the expected successor's length)
 * bytes from pos: with that many bytes seen, the serial scan of the
 * complete file reads no byte beyond them and makes the same chunk. The
 * rest waits for more bytes, or for finish.
 */
struct km_scan_follow {
	const struct km_scanner *sc;
	km_scan_emit_fn emit;
	void *userdata;
	struct known_state st; /* at the cut pos */
	uint64_t pos;	       /* every chunk before it emitted */
	uint64_t prefaulted;
	bool failed, done;
	struct km_scan_chunk batch[KNOWN_BATCH];
};

int km_scan_follow_new(const struct km_scanner *sc, km_scan_emit_fn emit, void *userdata,
		       struct km_scan_follow **ret)
{
	struct km_scan_follow *f;
	int r;

	if (!sc->known || sc->put)
		return -EOPNOTSUPP;
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	*f = (struct km_scan_follow){ .sc = sc, .emit = emit, .userdata = userdata };
	r = state_init(sc, &f->st);
	if (r < 0) {
		free(f);
		return r;
	}
	*ret = f;
	return 0;
}

void km_scan_follow_free(struct km_scan_follow *f)
{
	free(f);
}

/* A follow call may go on: not ended, and the file not shorter than what was split. */
static int follow_check(struct km_scan_follow *f, uint64_t size, const char *what,
			struct km_error *err)
{
	if (f->failed || f->done)
		return -EINVAL;
	if (size < f->pos) {
		km_error_set(err, "%s: shrank to %llu bytes, %llu already split", what,
			     (unsigned long long)size, (unsigned long long)f->pos);
		f->failed = true;
		return -ESTALE;
	}
	return 0;
}

/* Bytes from pos that the chunk at pos may read. */
static uint64_t follow_need(const struct km_scan_follow *f)
{
	uint64_t need = f->sc->params->max_size;

	if (f->st.next != KM_KNOWN_NONE)
		need = KM_MAX(need, (uint64_t)km_known_get(f->sc->known, f->st.next)->length);
	return need;
}

int km_scan_follow_step(struct km_scan_follow *f, const uint8_t *base, uint64_t avail,
			const char *what, struct km_error *err)
{
	struct emitter e = { f->emit, f->userdata, base, f->batch, 0 };
	struct km_scan_chunk c;
	int r = 0;

	r = follow_check(f, avail, what, err);
	if (r < 0)
		return r;
	/* The follower's pages mapped in batches, not a fault at a time. */
	if (avail > KM_MAX(f->prefaulted, f->pos)) {
		uint64_t from = KM_MAX(f->prefaulted, f->pos);

		km_prefault(base + from, avail - from);
		f->prefaulted = avail;
	}
	while (r == 0 && avail - f->pos >= follow_need(f)) {
		r = scan_one(f->sc, base, avail, f->pos, &f->st, &c);
		if (r < 0) {
			scan_fail(err, what, &c, r);
			break;
		}
		r = emitter_add(&e, &c);
		f->pos += c.length;
	}
	if (r == 0)
		r = emitter_flush(&e);
	if (r < 0)
		f->failed = true;
	return r;
}

int km_scan_follow_finish(struct km_scan_follow *f, const uint8_t *base, uint64_t size,
			  const char *what, struct km_error *err)
{
	int r;

	r = follow_check(f, size, what, err);
	if (r < 0)
		return r;
	if (size > f->pos)
		r = scan_known(f->sc, base, size, f->pos, &f->st, what, f->emit, f->userdata, err);
	if (r < 0) {
		f->failed = true;
		return r;
	}
	f->pos = size;
	f->done = true;
	return 0;
}

int km_scan(const struct km_scanner *sc, const uint8_t *base, uint64_t size, const char *what,
	    km_scan_emit_fn emit, void *userdata, struct km_hash *ret_file_hash,
	    struct km_error *err)
{
	size_t max_chunks = SCAN_WINDOW / sc->params->min_size + 2;
	size_t max_jobs = SCAN_WINDOW / SCAN_JOB_BYTES + max_chunks / 64 + 2;
	_cleanup_free_ struct km_scan_chunk *chunks = NULL;
	_cleanup_free_ struct classify_job *jobs = NULL;
	struct file_hash_job hash_job;
	struct km_hasher *hasher = NULL;
	struct km_chunker ch;
	uint64_t pos = 0;
	int r;

	r = km_chunker_init(&ch, sc->params);
	if (r < 0)
		return r;
	chunks = calloc(max_chunks, sizeof(*chunks));
	jobs = calloc(max_jobs, sizeof(*jobs));
	if (ret_file_hash)
		hasher = km_hasher_new();
	if (!chunks || !jobs || (ret_file_hash && !hasher)) {
		km_hasher_free(hasher);
		return -ENOMEM;
	}

	/*
	 * The whole-file hash (seed's) is the longest serial task: it gets
	 * all the file at once and never waits for the scan.
	 */
	if (hasher) {
		hash_job = (struct file_hash_job){ .hasher = hasher, .p = base, .n = size };
		r = km_workpool_submit(sc->file_hash_pool, file_hash_update, &hash_job);
		if (r < 0)
			goto out;
	}
	if (sc->known && !sc->put) {
		struct known_state st;

		r = state_init(sc, &st);
		if (r == 0)
			r = scan_known(sc, base, size, 0, &st, what, emit, userdata, err);
		goto out;
	}
	/* Page faults in one batch, cheaper than one at a time while reading. */
	km_prefault(base, size);

	while (pos < size) {
		uint64_t window_end = KM_MIN(size, pos + SCAN_WINDOW);
		size_t n = 0, n_jobs = 0, job_start = 0;
		uint64_t job_bytes = 0;

		/*
		 * Cut until the window is covered; the last chunk of a window
		 * may run past it (up to max_size), never past the file.
		 */
		while (pos < window_end) {
			uint64_t chunk_start = pos;
			size_t k = km_chunker_scan(&ch, base + pos, size - pos);

			pos = k == KM_CHUNKER_NO_BOUNDARY ? size : pos + k;
			if (k == KM_CHUNKER_NO_BOUNDARY)
				km_chunker_reset(&ch);
			chunks[n] = (struct km_scan_chunk){ .offset = chunk_start,
							    .length = (uint32_t)(pos - chunk_start) };
			job_bytes += chunks[n].length;
			n++;
			if (job_bytes >= SCAN_JOB_BYTES || pos >= window_end || n == max_chunks) {
				jobs[n_jobs] = (struct classify_job){ .sc = sc, .base = base,
								      .chunks = chunks + job_start,
								      .n = n - job_start };
				n_jobs++;
				job_start = n;
				job_bytes = 0;
			}
			if (n == max_chunks || n_jobs == max_jobs)
				break;
		}
		if (job_start < n) {
			jobs[n_jobs] = (struct classify_job){ .sc = sc, .base = base,
							      .chunks = chunks + job_start,
							      .n = n - job_start };
			n_jobs++;
		}

		for (size_t i = 0; i < n_jobs; i++) {
			r = km_workpool_submit(sc->pool, classify, &jobs[i]);
			if (r < 0)
				break;
		}
		{
			int w = km_workpool_wait(sc->pool);

			if (r == 0)
				r = w;
		}
		if (r < 0) {
			for (size_t i = 0; i < n_jobs; i++)
				if (jobs[i].error) {
					char hex[KM_HASH_HEX_SIZE];
					const struct km_scan_chunk *c = &jobs[i].chunks[jobs[i].bad];

					km_error_set(err, "%s: chunk %s at offset %llu: %s", what,
						     km_hash_to_hex(&c->id, hex),
						     (unsigned long long)c->offset,
						     strerror(-jobs[i].error));
					break;
				}
			goto out;
		}
		r = emit(userdata, base, chunks, n);
		if (r < 0)
			goto out;
	}
out:
	if (hasher) {
		int w = km_workpool_wait(sc->file_hash_pool);

		if (r == 0)
			r = w;
		if (r == 0)
			km_hasher_final(hasher, ret_file_hash);
	}
	km_hasher_free(hasher);
	return r;
}

int km_map_file(int fd, uint64_t size, const uint8_t **ret)
{
	void *p;

	if (size == 0) {
		*ret = NULL;
		return 0;
	}
	if (size > SIZE_MAX)
		return -EFBIG;
	p = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	/* One sequential pass: let the kernel read ahead aggressively. */
	(void)madvise(p, (size_t)size, MADV_SEQUENTIAL);
	*ret = p;
	return 0;
}

void km_prefault(const void *p, uint64_t n)
{
	long page = sysconf(_SC_PAGESIZE);
	uintptr_t from = (uintptr_t)p;

	if (page <= 0 || n == 0 || n > SIZE_MAX)
		return;
	from &= ~(uintptr_t)(page - 1);
	(void)madvise((void *)from, (size_t)((uintptr_t)p + n - from), MADV_POPULATE_READ);
}

void km_unmap_file(const uint8_t *p, uint64_t size)
{
	if (p)
		munmap((void *)p, (size_t)size);
}
