/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "weights.h"

#include <fcntl.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "image.h"
#include "workpool.h"

/* One read of the hashing pass: large, so the pass is one sequential stream. */
#define HASH_BUF_SIZE (8u * 1024 * 1024)
#define OK_SUFFIX ".ok"
#define OK_MAX (64u * 1024)
#define INDEX_SUFFIX ".kmidx"
#define ID_PREFIX_HEX 16 /* "file-<16 hex>" index names of resolved model files */

/* ------------------------------------------------------------ helpers */

int km_weights_dir(const struct km_store *s, const char *dir, char *buf, size_t bufsize)
{
	int k;

	if (dir && dir[0])
		k = snprintf(buf, bufsize, "%s", dir);
	else if (s)
		k = snprintf(buf, bufsize, "%s/%s", km_store_path(s), KM_WEIGHTS_DIRNAME);
	else
		return -EINVAL;
	if (k < 0 || (size_t)k >= bufsize)
		return -ENAMETOOLONG;
	return 0;
}

int km_weights_id_from_path(const char *path, struct km_hash *ret)
{
	const char *base = strrchr(path, '/');
	char hex[KM_HASH_HEX_SIZE];

	base = base ? base + 1 : path;
	if (strlen(base) != KM_HASH_HEX_SIZE - 1 + strlen(KM_WEIGHTS_SUFFIX) ||
	    strcmp(base + KM_HASH_HEX_SIZE - 1, KM_WEIGHTS_SUFFIX) != 0)
		return -EINVAL;
	/* Lower case only: the name is made, never typed, and must be one path. */
	for (size_t i = 0; i < KM_HASH_HEX_SIZE - 1; i++)
		if (!((base[i] >= '0' && base[i] <= '9') || (base[i] >= 'a' && base[i] <= 'f')))
			return -EINVAL;
	memcpy(hex, base, KM_HASH_HEX_SIZE - 1);
	hex[KM_HASH_HEX_SIZE - 1] = 0;
	return km_hash_from_hex(hex, ret);
}

/* DIR/<hex>.kmw */
static int weights_path(const char *dir, const struct km_hash *id, char *buf, size_t bufsize)
{
	char hex[KM_HASH_HEX_SIZE];
	int k = snprintf(buf, bufsize, "%s/%s%s", dir, km_hash_to_hex(id, hex), KM_WEIGHTS_SUFFIX);

	return k < 0 || (size_t)k >= bufsize ? -ENAMETOOLONG : 0;
}

int km_weights_layout(const struct km_weights_index *idx, struct km_weights_file_layout **ret,
		      size_t *ret_n, uint64_t *ret_size)
{
	struct km_weights_file_layout *l = calloc(idx->n_files ? idx->n_files : 1, sizeof(*l));
	uint64_t end = 0;

	if (!l)
		return -ENOMEM;
	for (size_t i = 0; i < idx->n_files; i++) {
		uint64_t off = (end + KM_WEIGHTS_ALIGN - 1) & ~(uint64_t)(KM_WEIGHTS_ALIGN - 1);

		/* Within off_t: the file must be possible to write and map. */
		if (off < end || off > (uint64_t)INT64_MAX ||
		    idx->files[i].size > (uint64_t)INT64_MAX - off) {
			free(l);
			return -EFBIG;
		}
		l[i].name = idx->files[i].name;
		l[i].offset = off;
		l[i].size = idx->files[i].size;
		end = off + l[i].size;
	}
	*ret = l;
	*ret_n = idx->n_files;
	*ret_size = end;
	return 0;
}

static bool same_stat(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/*
 * Waits until the clock that file timestamps come from has moved past st's
 * ctime, so that any later change to the file gives it a different ctime:
 * timestamps come from a coarse clock (one tick, 1 to 10 ms) and a write in
 * the tick of the last change could leave ctime as it was, making a record
 * taken now vouch for bytes it never saw (git's "racily clean" entries).
 * False if the file changed meanwhile, or the clock does not get there in
 * 200 ms (a file system with a clock of its own): then record nothing.
 */
static bool ctime_settled(int fd, const struct stat *st)
{
	for (int i = 0; i < 200; i++) {
		struct timespec now, ms = { 0, 1000000 };
		struct stat now_st;

		if (clock_gettime(CLOCK_REALTIME_COARSE, &now) < 0)
			return false;
		if (now.tv_sec > st->st_ctim.tv_sec ||
		    (now.tv_sec == st->st_ctim.tv_sec && now.tv_nsec > st->st_ctim.tv_nsec))
			return true;
		nanosleep(&ms, NULL);
		if (fstat(fd, &now_st) < 0 || !same_stat(st, &now_st))
			return false;
	}
	return false;
}

/* "DIR/NAME.kmw" -> dirfd of DIR (or AT_FDCWD) and "NAME.kmw.ok". */
static int ok_location(const char *path, int *ret_dirfd, char *name, size_t namesize)
{
	const char *slash = strrchr(path, '/');
	int k;

	k = snprintf(name, namesize, "%s%s", slash ? slash + 1 : path, OK_SUFFIX);
	if (k < 0 || (size_t)k >= namesize)
		return -ENAMETOOLONG;
	if (!slash) {
		*ret_dirfd = AT_FDCWD;
		return 0;
	}
	{
		_cleanup_free_ char *dir = strndup(path, (size_t)(slash - path));
		int fd;

		if (!dir)
			return -ENOMEM;
		fd = open(dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (fd < 0)
			return -errno;
		*ret_dirfd = fd;
	}
	return 0;
}

static bool record_matches(const struct km_weights_verified *v, const struct km_hash *id,
			   const struct stat *st)
{
	return km_hash_equal(&v->id, id) && v->size == (uint64_t)st->st_size &&
	       v->dev == (uint64_t)st->st_dev && v->ino == (uint64_t)st->st_ino &&
	       v->ctime_sec == (int64_t)st->st_ctim.tv_sec &&
	       v->ctime_nsec == (uint32_t)st->st_ctim.tv_nsec &&
	       v->mtime_sec == (int64_t)st->st_mtim.tv_sec &&
	       v->mtime_nsec == (uint32_t)st->st_mtim.tv_nsec;
}

/* True if path's .ok record describes exactly this file (st) with this id. */
static bool record_trusted(const char *path, const struct km_hash *id, const struct stat *st)
{
	_cleanup_free_ void *buf = NULL;
	struct km_weights_verified v;
	char name[4200];
	int dirfd = AT_FDCWD;
	size_t n;
	int r;

	if (ok_location(path, &dirfd, name, sizeof(name)) < 0)
		return false;
	r = km_read_file_at(dirfd, name, OK_MAX, &buf, &n);
	if (dirfd >= 0)
		close(dirfd);
	if (r < 0)
		return false;
	return km_weights_verified_decode(buf, n, &v, NULL) == 0 && record_matches(&v, id, st);
}

/*
 * Writes path's .ok record for the file open as fd, whose bytes were found
 * to hash to id while its stat was st. Best effort: without a record the
 * next check hashes the file again, which is slow but right, so a failure
 * (a read-only directory) is not an error.
 */
static void record_write(const char *path, int fd, const struct km_hash *id,
			 const struct stat *st, bool sync)
{
	_cleanup_free_ void *buf = NULL;
	struct km_weights_verified v = {
		.id = *id,
		.size = (uint64_t)st->st_size,
		.dev = (uint64_t)st->st_dev,
		.ino = (uint64_t)st->st_ino,
		.ctime_sec = (int64_t)st->st_ctim.tv_sec,
		.ctime_nsec = (uint32_t)st->st_ctim.tv_nsec,
		.mtime_sec = (int64_t)st->st_mtim.tv_sec,
		.mtime_nsec = (uint32_t)st->st_mtim.tv_nsec,
		.verified_unix = (uint64_t)time(NULL),
	};
	char name[4200];
	int dirfd = AT_FDCWD;
	size_t n;

	if (!ctime_settled(fd, st))
		return;
	if (km_weights_verified_encode(&v, &buf, &n) < 0)
		return;
	if (ok_location(path, &dirfd, name, sizeof(name)) < 0)
		return;
	(void)km_write_file_atomic_at(dirfd, name, buf, n, sync);
	if (dirfd >= 0)
		close(dirfd);
}

/* ------------------------------------------------------- hashing pass */

/*
 * The whole-file SHA-256 runs on a thread of its own while the caller
 * hashes the model files' ranges of the same buffer: two SHA-256 streams
 * over every byte, in the time of one.
 */
struct whole_job {
	struct km_hasher *h;
	const uint8_t *p;
	size_t n;
};

static int whole_hash_job(void *arg)
{
	struct whole_job *j = arg;

	km_hasher_update(j->h, j->p, j->n);
	return 0;
}

struct pass_result {
	struct km_hash id;
	uint64_t hashed;
	/* -EBADMSG from the pass: */
	size_t bad_file;      /* index of the file whose range does not match, or SIZE_MAX */
	struct km_hash got;   /* what that file's range hashed to */
	uint64_t bad_gap_off; /* bad_file == SIZE_MAX: offset of a non-zero padding byte */
	bool shrank;	      /* ... or the file ended there, before 'size' */
};

/*
 * One sequential pass over fd's first 'size' bytes: *ret->id gets the
 * SHA-256 of all of them. With a layout, each file's range is compared
 * with its SHA-256 in idx and the padding between ranges must be zero;
 * the first mismatch ends the pass with -EBADMSG, described in *ret.
 * -EBADMSG also when the file is shorter than size (shrank).
 */
static int hash_pass(int fd, uint64_t size, const struct km_weights_index *idx,
		     const struct km_weights_file_layout *l, size_t n, struct pass_result *ret)
{
	_cleanup_free_ uint8_t *buf = malloc(HASH_BUF_SIZE);
	struct km_hasher *whole = km_hasher_new(), *part = km_hasher_new();
	struct km_workpool *pool = NULL;
	uint64_t pos = 0;
	size_t cur = 0;
	int r = 0;

	ret->hashed = 0;
	ret->bad_file = SIZE_MAX;
	ret->shrank = false;
	if (!buf || !whole || !part) {
		r = -ENOMEM;
		goto out;
	}
	if (l && size) {
		r = km_workpool_new(1, 1, &pool);
		if (r < 0)
			goto out;
	}
	(void)posix_fadvise(fd, 0, (off_t)size, POSIX_FADV_SEQUENTIAL);

	while (r == 0 && pos < size) {
		size_t want = (size_t)KM_MIN((uint64_t)HASH_BUF_SIZE, size - pos);
		ssize_t k = km_pread_full(fd, buf, want, (off_t)pos);
		struct whole_job job = { whole, buf, want };
		uint64_t p = pos, end = pos + want;

		if (k < 0) {
			r = (int)k;
			break;
		}
		if ((size_t)k != want) {
			ret->bad_gap_off = pos + (uint64_t)k;
			ret->shrank = true;
			r = -EBADMSG;
			break;
		}
		if (!pool) {
			km_hasher_update(whole, buf, want);
			pos = end;
			ret->hashed += want;
			continue;
		}
		r = km_workpool_submit(pool, whole_hash_job, &job);
		/* The model files' ranges and the zero padding between them. */
		while (r == 0 && p < end) {
			uint64_t q;

			if (cur >= n || p < l[cur].offset) {
				q = cur >= n ? end : KM_MIN(l[cur].offset, end);
				if (!km_is_zero(buf + (p - pos), (size_t)(q - p))) {
					for (uint64_t b = p; b < q; b++)
						if (buf[b - pos]) {
							ret->bad_gap_off = b;
							break;
						}
					r = -EBADMSG;
				}
				p = q;
				continue;
			}
			q = KM_MIN(l[cur].offset + l[cur].size, end);
			km_hasher_update(part, buf + (p - pos), (size_t)(q - p));
			p = q;
			/* Finish every file that ends here (several if some are empty). */
			while (r == 0 && cur < n && l[cur].offset + l[cur].size == p &&
			       l[cur].offset <= p) {
				km_hasher_final(part, &ret->got);
				if (!km_hash_equal(&ret->got, &idx->files[cur].sha256)) {
					ret->bad_file = cur;
					r = -EBADMSG;
				} else {
					cur++;
				}
			}
		}
		/* The buffer is reused: wait for the whole-file hash of this one. */
		{
			int w = km_workpool_wait(pool);

			if (r == 0)
				r = w;
		}
		pos = end;
		ret->hashed += want;
	}
	/* Empty files at the very end (or of an empty weights file). */
	while (r == 0 && l && cur < n) {
		km_hasher_final(part, &ret->got);
		if (l[cur].offset + l[cur].size != size ||
		    !km_hash_equal(&ret->got, &idx->files[cur].sha256)) {
			ret->bad_file = cur;
			r = -EBADMSG;
		}
		cur++;
	}
	if (r == 0)
		km_hasher_final(whole, &ret->id);
out:
	km_workpool_free(pool);
	km_hasher_free(whole);
	km_hasher_free(part);
	return r;
}

/* ---------------------------------------------------------------- check */

int km_weights_check(const char *path, const struct km_hash *id, uint64_t size,
		     uint64_t *ret_hashed, struct km_error *err)
{
	_cleanup_close_ int fd = -1;
	struct pass_result pr;
	struct stat st, after;
	char got[KM_HASH_HEX_SIZE], want[KM_HASH_HEX_SIZE];
	bool settled;
	int r;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		if (r == -ENOENT)
			km_error_set(err, "weights file %s is missing", path);
		else
			km_error_set(err, "cannot open weights file %s: %s", path, strerror(-r));
		return r;
	}
	if (fstat(fd, &st) < 0) {
		r = -errno;
		km_error_set(err, "cannot stat weights file %s: %s", path, strerror(-r));
		return r;
	}
	if (!S_ISREG(st.st_mode)) {
		km_error_set(err, "weights file %s is not a regular file", path);
		return -EINVAL;
	}
	if (size != UINT64_MAX && (uint64_t)st.st_size != size) {
		km_error_set(err, "weights file %s is %llu bytes, expected %llu", path,
			     (unsigned long long)st.st_size, (unsigned long long)size);
		return -EBADMSG;
	}
	if (record_trusted(path, id, &st)) {
		if (ret_hashed)
			*ret_hashed = 0;
		return 0;
	}

	/* Before hashing: a change during or after the pass must show in ctime. */
	settled = ctime_settled(fd, &st);
	r = hash_pass(fd, (uint64_t)st.st_size, NULL, NULL, 0, &pr);
	if (r == -EBADMSG) {
		km_error_set(err, "weights file %s shrank while it was being hashed", path);
		return r;
	}
	if (r < 0) {
		km_error_set(err, "cannot read weights file %s: %s", path, strerror(-r));
		return r;
	}
	if (!km_hash_equal(&pr.id, id)) {
		km_error_set(err, "weights file %s does not hash to its name (got %s, expected %s)",
			     path, km_hash_to_hex(&pr.id, got), km_hash_to_hex(id, want));
		return -EBADMSG;
	}
	if (settled && fstat(fd, &after) == 0 && same_stat(&st, &after))
		record_write(path, fd, id, &after, false);
	if (ret_hashed)
		*ret_hashed = pr.hashed;
	return 0;
}

/* ---------------------------------------------------------- materialize */

static int read_index(struct km_store *s, const char *name, struct km_weights_index **ret,
		      struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	char root[300];
	size_t n;
	int r;

	if (!km_filename_is_plain(name) || strlen(name) > 200) {
		km_error_set(err, "invalid weights index name '%s'", name);
		return -EINVAL;
	}
	snprintf(root, sizeof(root), "%s%s", name, INDEX_SUFFIX);
	r = km_store_root_read(s, "indexes", root, &buf, &n);
	if (r == -ENOENT) {
		km_error_set(err, "no weights index %s in store %s", name, km_store_path(s));
		return r;
	}
	if (r < 0) {
		km_error_set(err, "cannot read weights index %s: %s", name, strerror(-r));
		return r;
	}
	r = km_weights_index_decode(buf, n, ret, err);
	if (r < 0)
		km_error_prefix(err, "weights index %s", name);
	return r;
}

/* True if a and b describe the same weights file bytes (names aside). */
static bool same_weights(const struct km_weights_index *a, const struct km_weights_index *b)
{
	if (a->n_files != b->n_files)
		return false;
	for (size_t i = 0; i < a->n_files; i++)
		if (a->files[i].size != b->files[i].size ||
		    !km_hash_equal(&a->files[i].sha256, &b->files[i].sha256))
			return false;
	return true;
}

/*
 * Records the weights file's id and size in index 'name'. The index is read
 * again first: another process may have recorded them (they must agree) or
 * seeded the index anew meanwhile (its id is recorded only if it describes
 * the same bytes). What is between that read and the write is not locked:
 * seed writes roots without a lock, and both writes replace atomically.
 */
static int index_record_id(struct km_store *s, const char *name,
			   const struct km_weights_index *built, const struct km_hash *id,
			   uint64_t size, struct km_error *err)
{
	struct km_weights_index *now = NULL;
	_cleanup_free_ void *buf = NULL;
	char root[300], a[KM_HASH_HEX_SIZE], b[KM_HASH_HEX_SIZE];
	size_t n;
	int r;

	r = read_index(s, name, &now, err);
	if (r < 0)
		return r;
	if (!same_weights(now, built)) {
		km_weights_index_free(now);
		return 0; /* re-seeded with other files: not ours to stamp */
	}
	if (!km_hash_is_null(&now->weights_id)) {
		r = 0;
		if (!km_hash_equal(&now->weights_id, id) || now->weights_size != size) {
			km_error_set(err,
				     "weights index %s records weights file %s, but its files materialize to %s",
				     name, km_hash_to_hex(&now->weights_id, a), km_hash_to_hex(id, b));
			r = -EBADMSG;
		}
		km_weights_index_free(now);
		return r;
	}
	now->weights_id = *id;
	now->weights_size = size;
	/* The index is rewritten in the version of this kvmotion. */
	now->minor = KM_FORMAT_MINOR;
	r = km_weights_index_encode(now, &buf, &n);
	km_weights_index_free(now);
	if (r < 0)
		return r;
	snprintf(root, sizeof(root), "%s%s", name, INDEX_SUFFIX);
	r = km_store_root_write(s, "indexes", root, buf, n);
	if (r < 0)
		km_error_set(err, "cannot record the weights file in index %s: %s", name,
			     strerror(-r));
	return r;
}

/*
 * A model file's range did not hash right: read each of its chunks back
 * through the store's verifying get to name the bad one.
 */
static int diagnose(struct km_store *s, const struct km_weights_index *idx, size_t i,
		    const struct km_hash *got, struct km_error *err)
{
	const struct km_file_entry *f = &idx->files[i];
	size_t bufsize = idx->chunker.max_size ? idx->chunker.max_size : 1;
	_cleanup_free_ uint8_t *buf = malloc(bufsize);
	char hex[KM_HASH_HEX_SIZE], hex2[KM_HASH_HEX_SIZE];
	uint64_t off = 0;

	if (!buf)
		return -ENOMEM;
	for (size_t j = 0; j < f->n_extents; off += f->extents[j].length, j++) {
		const struct km_extent *e = &f->extents[j];
		size_t n = 0;
		int r;

		if (e->kind != KM_EXTENT_CHUNK)
			continue;
		r = km_store_get(s, &e->id, buf, bufsize, &n);
		if (r == 0 && n == e->length)
			continue;
		km_error_set(err, "chunk %s (model file %s at offset %llu): %s",
			     km_hash_to_hex(&e->id, hex), f->name, (unsigned long long)off,
			     r == -EBADMSG ? "corrupt in the store (content does not match its SHA-256)"
			     : r == -ENOENT ? "missing from the store"
			     : r == 0 || r == -EFBIG ? "of the wrong size in the store"
						     : strerror(-r));
		return r == -ENOENT ? -ENOENT : -EBADMSG;
	}
	km_error_set(err,
		     "model file %s does not match its SHA-256 in the index (got %s, index says %s) although each of its chunks verifies",
		     f->name, km_hash_to_hex(got, hex), km_hash_to_hex(&f->sha256, hex2));
	return -EBADMSG;
}

/* Copies every chunk of the index into fd at the layout's offsets. */
static int fill(struct km_store *s, const struct km_weights_index *idx,
		const struct km_weights_file_layout *l, int fd, struct km_error *err)
{
	for (size_t i = 0; i < idx->n_files; i++) {
		const struct km_file_entry *f = &idx->files[i];
		uint64_t off = 0;

		for (size_t j = 0; j < f->n_extents; off += f->extents[j].length, j++) {
			const struct km_extent *e = &f->extents[j];
			char hex[KM_HASH_HEX_SIZE];
			int r;

			/* Zero extents stay holes of the truncated file. */
			if (e->kind != KM_EXTENT_CHUNK)
				continue;
			r = km_store_copy_to(s, &e->id, e->length, fd, l[i].offset + off);
			if (r < 0) {
				km_error_set(err, "chunk %s (model file %s at offset %llu): %s",
					     km_hash_to_hex(&e->id, hex), f->name,
					     (unsigned long long)off,
					     r == -ENOENT    ? "missing from the store"
					     : r == -EBADMSG ? "of the wrong size in the store"
							     : strerror(-r));
				return r;
			}
		}
	}
	return 0;
}

/* Renames without replacing; link + unlink where RENAME_NOREPLACE is missing. */
static int rename_noreplace(int dirfd, const char *from, const char *to)
{
	if (renameat2(dirfd, from, dirfd, to, RENAME_NOREPLACE) == 0)
		return 0;
	if (errno != EINVAL && errno != ENOSYS)
		return -errno;
	if (linkat(dirfd, from, dirfd, to, 0) < 0)
		return -errno;
	(void)unlinkat(dirfd, from, 0);
	return 0;
}

struct build {
	int dirfd;
	int fd;
	char tmp[96];
};

static void build_clear(struct build *b)
{
	if (b->fd >= 0) {
		close(b->fd);
		(void)unlinkat(b->dirfd, b->tmp, 0);
		b->fd = -1;
	}
}

/* A temporary file in the weights directory that no other writer uses. */
static int build_open(struct build *b, int dirfd)
{
	b->dirfd = dirfd;
	for (int attempt = 0;; attempt++) {
		uint64_t nonce = 0;

		(void)getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK);
		snprintf(b->tmp, sizeof(b->tmp), ".kmw-tmp.%ld.%016llx", (long)getpid(),
			 (unsigned long long)nonce);
		b->fd = openat(dirfd, b->tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (b->fd >= 0)
			return 0;
		if (errno != EEXIST || attempt >= 8)
			return -errno;
	}
}

int km_weights_materialize(struct km_store *s, const char *index_name, const char *weights_dir,
			   bool sync, struct km_weights_info *ret, struct km_error *err)
{
	struct km_weights_info info = { .written = true };
	struct km_weights_index *idx = NULL;
	_cleanup_free_ struct km_weights_file_layout *l = NULL;
	struct build b = { .fd = -1 };
	_cleanup_close_ int dirfd = -1;
	char dir[4096], name[KM_HASH_HEX_SIZE + 8];
	char hex[KM_HASH_HEX_SIZE], hex2[KM_HASH_HEX_SIZE];
	struct pass_result pr;
	bool recorded, replace = false;
	struct stat st;
	size_t n;
	int r;

	r = km_weights_dir(s, weights_dir, dir, sizeof(dir));
	if (r < 0) {
		km_error_set(err, "weights directory: %s", strerror(-r));
		return r;
	}
	r = read_index(s, index_name, &idx, err);
	if (r < 0)
		return r;
	r = km_weights_layout(idx, &l, &n, &info.size);
	if (r < 0) {
		km_error_set(err, "weights index %s: its files do not fit one file", index_name);
		goto out;
	}
	recorded = !km_hash_is_null(&idx->weights_id);
	if (recorded && idx->weights_size != info.size) {
		km_error_set(err,
			     "weights index %s records a weights file of %llu bytes, its files lay out to %llu",
			     index_name, (unsigned long long)idx->weights_size,
			     (unsigned long long)info.size);
		r = -EBADMSG;
		goto out;
	}

	/* Already there and still as verified: nothing to write or read. */
	if (recorded) {
		struct km_error cerr = { { 0 } };

		r = weights_path(dir, &idx->weights_id, info.path, sizeof(info.path));
		if (r < 0)
			goto out;
		r = km_weights_check(info.path, &idx->weights_id, info.size, &info.bytes_hashed,
				     &cerr);
		if (r == 0) {
			info.id = idx->weights_id;
			info.written = false;
			goto done;
		}
		/* A damaged file in the way is replaced by a verified one. */
		if (r == -EBADMSG)
			replace = true;
		else if (r != -ENOENT) {
			km_error_set(err, "%s", cerr.msg);
			goto out;
		}
	}

	r = km_mkdir_p(dir);
	if (r == 0) {
		dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		r = dirfd < 0 ? -errno : 0;
	}
	if (r == 0)
		r = build_open(&b, dirfd);
	if (r < 0) {
		km_error_set(err, "weights directory %s: %s", dir, strerror(-r));
		goto out;
	}
	if (ftruncate(b.fd, (off_t)info.size) < 0) {
		r = -errno;
		km_error_set(err, "cannot size a weights file in %s: %s", dir, strerror(-r));
		goto out;
	}
	r = fill(s, idx, l, b.fd, err);
	if (r < 0)
		goto out;

	/* Every byte: each model file against the index, the whole for the id. */
	r = hash_pass(b.fd, info.size, idx, l, n, &pr);
	info.bytes_hashed += pr.hashed;
	if (r == -EBADMSG && pr.bad_file != SIZE_MAX) {
		r = diagnose(s, idx, pr.bad_file, &pr.got, err);
		goto out;
	}
	if (r == -EBADMSG) {
		km_error_set(err, "weights file being written in %s %s %llu", dir,
			     pr.shrank ? "ends before its size, at" : "has a non-zero byte between model files at",
			     (unsigned long long)pr.bad_gap_off);
		goto out;
	}
	if (r < 0) {
		km_error_set(err, "cannot read back the weights file being written in %s: %s", dir,
			     strerror(-r));
		goto out;
	}
	info.id = pr.id;
	if (recorded && !km_hash_equal(&pr.id, &idx->weights_id)) {
		km_error_set(err,
			     "weights index %s records weights file %s, but its files materialize to %s",
			     index_name, km_hash_to_hex(&idx->weights_id, hex),
			     km_hash_to_hex(&pr.id, hex2));
		r = -EBADMSG;
		goto out;
	}
	r = weights_path(dir, &info.id, info.path, sizeof(info.path));
	if (r < 0)
		goto out;
	snprintf(name, sizeof(name), "%s%s", km_hash_to_hex(&info.id, hex), KM_WEIGHTS_SUFFIX);

	if (fchmod(b.fd, 0444) < 0 || (sync && fsync(b.fd) < 0)) {
		r = -errno;
		km_error_set(err, "cannot finish weights file %s: %s", info.path, strerror(-r));
		goto out;
	}
	r = replace ? (renameat(dirfd, b.tmp, dirfd, name) < 0 ? -errno : 0)
		    : rename_noreplace(dirfd, b.tmp, name);
	if (r == -EEXIST) {
		/* Another process was first: keep theirs if it is good. */
		struct km_error cerr = { { 0 } };
		uint64_t hashed = 0;

		r = km_weights_check(info.path, &info.id, info.size, &hashed, &cerr);
		info.bytes_hashed += hashed;
		if (r == 0) {
			info.written = false;
			build_clear(&b);
		} else if (r == -EBADMSG) {
			r = renameat(dirfd, b.tmp, dirfd, name) < 0 ? -errno : 0;
		} else {
			km_error_set(err, "%s", cerr.msg);
			goto out;
		}
	}
	if (r < 0) {
		km_error_set(err, "cannot rename the weights file to %s: %s", info.path,
			     strerror(-r));
		goto out;
	}
	if (info.written) {
		/* Renamed: the name is no longer ours to remove on failure. */
		if (sync && fsync(dirfd) < 0) {
			r = -errno;
			km_error_set(err, "cannot sync %s: %s", dir, strerror(-r));
			close(KM_TAKE_FD(b.fd));
			goto out;
		}
		if (fstat(b.fd, &st) == 0)
			record_write(info.path, b.fd, &info.id, &st, sync);
		close(KM_TAKE_FD(b.fd));
	}

done:
	if (!recorded) {
		r = index_record_id(s, index_name, idx, &info.id, info.size, err);
		if (r < 0)
			goto out;
	}
	if (ret)
		*ret = info;
	r = 0;
out:
	build_clear(&b);
	km_weights_index_free(idx);
	return r;
}

/* -------------------------------------------------------------- resolve */

int km_weights_resolve(struct km_store *s, const char *ref, const char *weights_dir, bool sync,
		       struct km_weights_info *ret, char *index_name, size_t index_name_size,
		       struct km_error *err)
{
	static const char prefix[] = "index:";
	struct km_weights_index *idx = NULL;
	char name[256], hex[KM_HASH_HEX_SIZE];
	int r;

	if (!ref || !ref[0]) {
		km_error_set(err, "empty weights reference");
		return -EINVAL;
	}
	if (strncmp(ref, prefix, sizeof(prefix) - 1) == 0) {
		if (snprintf(name, sizeof(name), "%s", ref + sizeof(prefix) - 1) >= (int)sizeof(name)) {
			km_error_set(err, "weights index name in '%s' is too long", ref);
			return -EINVAL;
		}
	} else {
		_cleanup_close_ int fd = open(ref, O_RDONLY | O_CLOEXEC);
		struct pass_result pr;
		struct stat st;

		if (fd < 0 || fstat(fd, &st) < 0) {
			r = -errno;
			km_error_set(err, "cannot open model file %s: %s", ref, strerror(-r));
			return r;
		}
		if (!S_ISREG(st.st_mode)) {
			km_error_set(err, "model file %s is not a regular file", ref);
			return -EINVAL;
		}
		r = hash_pass(fd, (uint64_t)st.st_size, NULL, NULL, 0, &pr);
		if (r < 0) {
			km_error_set(err, "cannot read model file %s: %s", ref,
				     r == -EBADMSG ? "it shrank while being read" : strerror(-r));
			return r;
		}
		snprintf(name, sizeof(name), "file-%.*s", ID_PREFIX_HEX, km_hash_to_hex(&pr.id, hex));

		r = read_index(s, name, &idx, NULL);
		if (r == -ENOENT) {
			const char *paths[] = { ref };

			r = km_seed(s, name, paths, 1, 0, NULL, err);
			if (r < 0)
				return r;
			r = read_index(s, name, &idx, err);
		}
		if (r < 0) {
			if (err && !err->msg[0])
				km_error_set(err, "weights index %s: %s", name, strerror(-r));
			return r;
		}
		/* The name is the model's hash: the index must hold that model, alone. */
		if (idx->n_files != 1 || !km_hash_equal(&idx->files[0].sha256, &pr.id) ||
		    idx->files[0].size != (uint64_t)st.st_size) {
			km_error_set(err,
				     "weights index %s does not describe model file %s (SHA-256 %s)",
				     name, ref, hex);
			km_weights_index_free(idx);
			return -EBADMSG;
		}
		km_weights_index_free(idx);
	}
	if (index_name && index_name_size) {
		if (strlen(name) >= index_name_size) {
			km_error_set(err, "weights index name %s does not fit the caller's buffer", name);
			return -ENAMETOOLONG;
		}
		strcpy(index_name, name);
	}
	return km_weights_materialize(s, name, weights_dir, sync, ret, err);
}
