/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "verified.h"

#include <endian.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "format.h"

#define VERIFIED_MAJOR 1
#define VERIFIED_MINOR 2
/* ~3 million entries: far more chunks than a node holds; beyond it, hash. */
#define VERIFIED_MAX (256u * 1024 * 1024)

struct ventry {
	struct km_hash id;
	uint64_t size, dev, ino;
	int64_t ctime_sec, mtime_sec;
	uint32_t ctime_nsec, mtime_nsec;
};

struct km_verified {
	int dirfd; /* borrowed */
	bool sync;
	km_verified_stat_fn stat_fn;
	void *userdata;

	pthread_mutex_t lock;
	/* The table: open addressing, linear probing; used[i] marks a slot. */
	struct ventry *slots;
	uint8_t *used;
	size_t cap, n;
	bool loaded;
	struct stat loaded_st; /* of the record file when read; st_ino 0: none */
	/* Noted since the last flush. */
	struct ventry *pending;
	size_t n_pending, cap_pending;
};

static struct ventry entry_of(const struct km_hash *id, const struct stat *st)
{
	return (struct ventry){
		.id = *id,
		.size = (uint64_t)st->st_size,
		.dev = (uint64_t)st->st_dev,
		.ino = (uint64_t)st->st_ino,
		.ctime_sec = (int64_t)st->st_ctim.tv_sec,
		.ctime_nsec = (uint32_t)st->st_ctim.tv_nsec,
		.mtime_sec = (int64_t)st->st_mtim.tv_sec,
		.mtime_nsec = (uint32_t)st->st_mtim.tv_nsec,
	};
}

static bool entry_equal(const struct ventry *a, const struct ventry *b)
{
	return km_hash_equal(&a->id, &b->id) && a->size == b->size && a->dev == b->dev &&
	       a->ino == b->ino && a->ctime_sec == b->ctime_sec && a->ctime_nsec == b->ctime_nsec &&
	       a->mtime_sec == b->mtime_sec && a->mtime_nsec == b->mtime_nsec;
}

/* FNV-1a, 64 bit: catches a torn or garbled entry, not an adversary. */
static uint64_t fnv1a(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static void put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return le64toh(v);
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return le32toh(v);
}

static void entry_encode(const struct ventry *e, uint8_t p[KM_VERIFIED_ENTRY_SIZE])
{
	memcpy(p, e->id.b, KM_HASH_SIZE);
	put64(p + 32, e->size);
	put64(p + 40, e->dev);
	put64(p + 48, e->ino);
	put64(p + 56, (uint64_t)e->ctime_sec);
	put32(p + 64, e->ctime_nsec);
	put32(p + 68, e->mtime_nsec);
	put64(p + 72, (uint64_t)e->mtime_sec);
	put64(p + 80, fnv1a(p, 80));
}

static bool entry_decode(const uint8_t p[KM_VERIFIED_ENTRY_SIZE], struct ventry *ret)
{
	struct ventry e;

	if (get64(p + 80) != fnv1a(p, 80))
		return false;
	memcpy(e.id.b, p, KM_HASH_SIZE);
	e.size = get64(p + 32);
	e.dev = get64(p + 40);
	e.ino = get64(p + 48);
	e.ctime_sec = (int64_t)get64(p + 56);
	e.ctime_nsec = get32(p + 64);
	e.mtime_nsec = get32(p + 68);
	e.mtime_sec = (int64_t)get64(p + 72);
	if (e.ctime_nsec >= 1000000000u || e.mtime_nsec >= 1000000000u)
		return false;
	*ret = e;
	return true;
}

static void header_encode(uint8_t p[KM_VERIFIED_HEADER_SIZE])
{
	memcpy(p, KM_VERIFIED_MAGIC, KM_MAGIC_SIZE);
	put32(p + 8, VERIFIED_MAJOR);
	put32(p + 12, VERIFIED_MINOR);
}

static bool header_ok(const uint8_t *p, size_t n)
{
	return n >= KM_VERIFIED_HEADER_SIZE && memcmp(p, KM_VERIFIED_MAGIC, KM_MAGIC_SIZE) == 0 &&
	       get32(p + 8) == VERIFIED_MAJOR;
}

/* ---------------------------------------------------------------- table */

static size_t slot_of(const struct km_hash *id, size_t cap)
{
	uint64_t k;

	memcpy(&k, id->b, sizeof(k)); /* a SHA-256 is uniform already */
	return (size_t)k & (cap - 1);
}

static const struct ventry *table_find(const struct km_verified *v, const struct km_hash *id)
{
	if (!v->cap)
		return NULL;
	for (size_t i = slot_of(id, v->cap); v->used[i]; i = (i + 1) & (v->cap - 1))
		if (km_hash_equal(&v->slots[i].id, id))
			return &v->slots[i];
	return NULL;
}

static void table_put_nogrow(struct ventry *slots, uint8_t *used, size_t cap, size_t *n,
			     const struct ventry *e)
{
	size_t i = slot_of(&e->id, cap);

	for (; used[i]; i = (i + 1) & (cap - 1))
		if (km_hash_equal(&slots[i].id, &e->id)) {
			slots[i] = *e; /* the later entry wins */
			return;
		}
	slots[i] = *e;
	used[i] = 1;
	(*n)++;
}

static int table_put(struct km_verified *v, const struct ventry *e)
{
	if (2 * (v->n + 1) > v->cap) {
		size_t cap = v->cap ? 2 * v->cap : 1024, n = 0;
		struct ventry *slots = malloc(cap * sizeof(*slots));
		uint8_t *used = calloc(cap, 1);

		if (!slots || !used) {
			free(slots);
			free(used);
			return -ENOMEM;
		}
		for (size_t i = 0; i < v->cap; i++)
			if (v->used[i])
				table_put_nogrow(slots, used, cap, &n, &v->slots[i]);
		free(v->slots);
		free(v->used);
		v->slots = slots;
		v->used = used;
		v->cap = cap;
		v->n = n;
	}
	table_put_nogrow(v->slots, v->used, v->cap, &v->n, e);
	return 0;
}

static void table_clear(struct km_verified *v)
{
	free(v->slots);
	free(v->used);
	v->slots = NULL;
	v->used = NULL;
	v->cap = v->n = 0;
}

/*
 * Reads the record file into the table (under lock). Anything wrong with
 * the file as a whole leaves the table empty: every chunk is then hashed.
 */
static void load_locked(struct km_verified *v)
{
	_cleanup_free_ void *buf = NULL;
	_cleanup_close_ int fd = -1;
	struct stat st;
	const uint8_t *p;
	size_t n;
	ssize_t k;

	table_clear(v);
	v->loaded = true;
	memset(&v->loaded_st, 0, sizeof(v->loaded_st));
	fd = openat(v->dirfd, KM_VERIFIED_NAME, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		goto pending;
	v->loaded_st = st;
	if ((uint64_t)st.st_size > VERIFIED_MAX || st.st_size < KM_VERIFIED_HEADER_SIZE)
		goto pending;
	buf = malloc((size_t)st.st_size);
	if (!buf)
		goto pending;
	k = km_read_full(fd, buf, (size_t)st.st_size);
	if (k < 0 || !header_ok(buf, (size_t)k))
		goto pending;
	p = buf;
	n = (size_t)k;
	for (size_t off = KM_VERIFIED_HEADER_SIZE; off + KM_VERIFIED_ENTRY_SIZE <= n;
	     off += KM_VERIFIED_ENTRY_SIZE) {
		struct ventry e;

		if (entry_decode(p + off, &e) && table_put(v, &e) < 0)
			break;
	}
pending:
	/* What this handle noted and has not written yet stays known. */
	for (size_t i = 0; i < v->n_pending; i++)
		(void)table_put(v, &v->pending[i]);
}

static bool same_file_stat(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
	       a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* ------------------------------------------------------------------ api */

int km_verified_new(int dirfd, bool sync, km_verified_stat_fn stat_fn, void *userdata,
		    struct km_verified **ret)
{
	struct km_verified *v = calloc(1, sizeof(*v));

	if (!v)
		return -ENOMEM;
	v->dirfd = dirfd;
	v->sync = sync;
	v->stat_fn = stat_fn;
	v->userdata = userdata;
	pthread_mutex_init(&v->lock, NULL);
	*ret = v;
	return 0;
}

void km_verified_free(struct km_verified *v)
{
	if (!v)
		return;
	km_verified_flush(v);
	table_clear(v);
	free(v->pending);
	pthread_mutex_destroy(&v->lock);
	free(v);
}

void km_verified_reload(struct km_verified *v)
{
	struct stat st;
	bool changed;

	if (fstatat(v->dirfd, KM_VERIFIED_NAME, &st, AT_SYMLINK_NOFOLLOW) < 0)
		memset(&st, 0, sizeof(st));
	pthread_mutex_lock(&v->lock);
	changed = !v->loaded || !same_file_stat(&st, &v->loaded_st);
	if (changed)
		load_locked(v);
	pthread_mutex_unlock(&v->lock);
}

bool km_verified_matches(struct km_verified *v, const struct km_hash *id, const struct stat *st)
{
	struct ventry want = entry_of(id, st);
	const struct ventry *e;
	bool ok;

	pthread_mutex_lock(&v->lock);
	if (!v->loaded)
		load_locked(v);
	e = table_find(v, id);
	ok = e && entry_equal(e, &want);
	pthread_mutex_unlock(&v->lock);
	return ok;
}

void km_verified_note(struct km_verified *v, const struct km_hash *id, const struct stat *st)
{
	struct ventry e = entry_of(id, st);

	pthread_mutex_lock(&v->lock);
	if (v->n_pending == v->cap_pending) {
		size_t cap = v->cap_pending ? 2 * v->cap_pending : 256;
		struct ventry *p = realloc(v->pending, cap * sizeof(*p));

		if (!p)
			goto out; /* forgetting costs a hash later, nothing else */
		v->pending = p;
		v->cap_pending = cap;
	}
	v->pending[v->n_pending++] = e;
	if (v->loaded)
		(void)table_put(v, &e);
out:
	pthread_mutex_unlock(&v->lock);
}

static bool ts_after(const struct timespec *now, int64_t sec, uint32_t nsec)
{
	return now->tv_sec > sec || (now->tv_sec == sec && now->tv_nsec > (long)nsec);
}

bool km_verified_settled(const struct stat *st)
{
	struct timespec now;

	/* File timestamps come from the coarse clock (one tick, 1 to 10 ms). */
	return clock_gettime(CLOCK_REALTIME_COARSE, &now) == 0 &&
	       ts_after(&now, (int64_t)st->st_ctim.tv_sec, (uint32_t)st->st_ctim.tv_nsec);
}

/* Creates the record file with just its header if there is none (link: never replaces). */
static int create_file(struct km_verified *v)
{
	uint8_t header[KM_VERIFIED_HEADER_SIZE];
	char tmp[64];
	uint64_t nonce = 0;
	int fd, r = 0;

	(void)getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK);
	snprintf(tmp, sizeof(tmp), ".%s.%016llx.tmp", KM_VERIFIED_NAME, (unsigned long long)nonce);
	fd = openat(v->dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	header_encode(header);
	r = km_write_full(fd, header, sizeof(header));
	if (r == 0 && v->sync && fsync(fd) < 0)
		r = -errno;
	close(fd);
	if (r == 0 && linkat(v->dirfd, tmp, v->dirfd, KM_VERIFIED_NAME, 0) < 0 && errno != EEXIST)
		r = -errno;
	(void)unlinkat(v->dirfd, tmp, 0);
	return r;
}

/* Writes header + entries as the whole record file, atomically. */
static int replace_file(struct km_verified *v, const uint8_t *entries, size_t n)
{
	_cleanup_free_ uint8_t *buf = malloc(KM_VERIFIED_HEADER_SIZE + n);

	if (!buf)
		return -ENOMEM;
	header_encode(buf);
	if (n)
		memcpy(buf + KM_VERIFIED_HEADER_SIZE, entries, n);
	return km_write_file_atomic_at(v->dirfd, KM_VERIFIED_NAME, buf, KM_VERIFIED_HEADER_SIZE + n,
				       v->sync);
}

/* Appends encoded entries; a file that is not a record is replaced. */
static int append_entries(struct km_verified *v, const uint8_t *entries, size_t n)
{
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_close_ int fd = -1;
	uint8_t header[KM_VERIFIED_HEADER_SIZE];
	struct stat st;
	size_t pad;
	int r;

	fd = openat(v->dirfd, KM_VERIFIED_NAME, O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0 && errno == ENOENT) {
		r = create_file(v);
		if (r < 0)
			return r;
		fd = openat(v->dirfd, KM_VERIFIED_NAME,
			    O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW);
	}
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EBADMSG;
	{
		_cleanup_close_ int rfd =
			openat(v->dirfd, KM_VERIFIED_NAME, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		ssize_t k = rfd < 0 ? -1 : km_pread_full(rfd, header, sizeof(header), 0);

		if (k != (ssize_t)sizeof(header) || !header_ok(header, sizeof(header)))
			return replace_file(v, entries, n);
	}
	/* A torn entry at the end (a crash): pad it to a whole, invalid one. */
	pad = ((size_t)st.st_size - KM_VERIFIED_HEADER_SIZE) % KM_VERIFIED_ENTRY_SIZE;
	pad = pad ? KM_VERIFIED_ENTRY_SIZE - pad : 0;
	buf = calloc(1, pad + n);
	if (!buf)
		return -ENOMEM;
	memcpy(buf + pad, entries, n);
	/* One write: appends of concurrent handles do not interleave. */
	r = km_write_full(fd, buf, pad + n);
	if (r == 0 && v->sync && fsync(fd) < 0)
		r = -errno;
	return r;
}

void km_verified_flush(struct km_verified *v)
{
	_cleanup_free_ struct ventry *todo = NULL;
	_cleanup_free_ uint8_t *out = NULL;
	size_t n, k = 0;
	int64_t max_sec = 0;
	uint32_t max_nsec = 0;

	pthread_mutex_lock(&v->lock);
	todo = v->pending;
	n = v->n_pending;
	v->pending = NULL;
	v->n_pending = v->cap_pending = 0;
	pthread_mutex_unlock(&v->lock);
	if (n == 0)
		return;
	for (size_t i = 0; i < n; i++)
		if (todo[i].ctime_sec > max_sec ||
		    (todo[i].ctime_sec == max_sec && todo[i].ctime_nsec > max_nsec)) {
			max_sec = todo[i].ctime_sec;
			max_nsec = todo[i].ctime_nsec;
		}
	/*
	 * A change in the tick of the recorded ctime could keep it: wait
	 * until the clock is past every ctime (at most a tick), then check
	 * that no file changed meanwhile. Later changes get a later ctime.
	 */
	for (int i = 0; i < 200; i++) {
		struct timespec now, ms = { 0, 1000000 };

		if (clock_gettime(CLOCK_REALTIME_COARSE, &now) < 0)
			return;
		if (ts_after(&now, max_sec, max_nsec))
			break;
		if (i == 199)
			return;
		nanosleep(&ms, NULL);
	}
	out = malloc(n * KM_VERIFIED_ENTRY_SIZE);
	if (!out)
		return;
	for (size_t i = 0; i < n; i++) {
		struct stat st;
		struct ventry now;

		if (v->stat_fn(&todo[i].id, &st, v->userdata) < 0)
			continue;
		now = entry_of(&todo[i].id, &st);
		if (!entry_equal(&now, &todo[i]))
			continue;
		entry_encode(&todo[i], out + k * KM_VERIFIED_ENTRY_SIZE);
		k++;
	}
	if (k)
		(void)append_entries(v, out, k * KM_VERIFIED_ENTRY_SIZE);
}

int km_verified_compact(struct km_verified *v,
			bool (*keep)(const struct km_hash *id, void *userdata), void *userdata)
{
	_cleanup_free_ uint8_t *out = NULL;
	size_t k = 0;
	int r;

	km_verified_flush(v);
	pthread_mutex_lock(&v->lock);
	load_locked(v);
	out = malloc((v->n ? v->n : 1) * KM_VERIFIED_ENTRY_SIZE);
	if (!out) {
		pthread_mutex_unlock(&v->lock);
		return -ENOMEM;
	}
	for (size_t i = 0; i < v->cap; i++) {
		const struct ventry *e = &v->slots[i];
		struct stat st;
		struct ventry now;

		if (!v->used[i] || !keep(&e->id, userdata))
			continue;
		if (v->stat_fn(&e->id, &st, v->userdata) < 0)
			continue;
		now = entry_of(&e->id, &st);
		if (!entry_equal(&now, e))
			continue;
		entry_encode(e, out + k * KM_VERIFIED_ENTRY_SIZE);
		k++;
	}
	pthread_mutex_unlock(&v->lock);
	r = replace_file(v, out, k * KM_VERIFIED_ENTRY_SIZE);
	km_verified_reload(v);
	return r;
}

size_t km_verified_count(struct km_verified *v)
{
	size_t n;

	pthread_mutex_lock(&v->lock);
	if (!v->loaded)
		load_locked(v);
	n = v->n;
	pthread_mutex_unlock(&v->lock);
	return n;
}
