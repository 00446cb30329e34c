/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "store.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>

#include "format.h"
#include "verified.h"

#define CONFIG_NAME "config.kmstore"
#define CONFIG_TMP_PREFIX ".config.kmstore."
#define CONFIG_MAX (64u * 1024)
/* Roots are encoded records; anything larger than this cannot be one. */
#define ROOT_MAX ((size_t)KM_RECORD_MAX + 4096)
/* "ab/" + 64 hex + NUL */
#define CHUNK_PATH_SIZE (3 + KM_HASH_HEX_SIZE)
#define TMP_NAME_SIZE 96
#define VERIFY_BUF_SIZE (1024u * 1024)

/*
 * Everything but 'tmp_counter' is written once by km_store_open, so the
 * handle can be shared by threads; the counter is atomic.
 */
struct km_store {
	char *path;
	unsigned flags;
	struct km_chunker_params params;
	int dir_fd;
	int chunks_fd;
	int indexes_fd;
	int manifests_fd;
	int tmp_fd;
	int lock_fd; /* holds the flock for the handle's lifetime */
	atomic_uint_fast64_t tmp_counter;
	struct km_verified *verified; /* S/verified.kmok, thread-safe */
};

/* ------------------------------------------------------------ helpers */

static void chunk_path(const struct km_hash *id, char buf[CHUNK_PATH_SIZE])
{
	char hex[KM_HASH_HEX_SIZE];

	km_hash_to_hex(id, hex);
	buf[0] = hex[0];
	buf[1] = hex[1];
	buf[2] = '/';
	memcpy(buf + 3, hex, KM_HASH_HEX_SIZE);
}

static bool is_lower_hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/*
 * A chunk file name: exactly 64 lower-case hex digits starting with the
 * fan-out directory's two. Anything else in chunks/ is not ours to touch.
 */
static bool parse_chunk_name(const char *fanout, const char *name, struct km_hash *ret)
{
	for (size_t i = 0; i < KM_HASH_HEX_SIZE - 1; i++)
		if (!is_lower_hex(name[i]))
			return false;
	if (name[KM_HASH_HEX_SIZE - 1] != 0 || name[0] != fanout[0] || name[1] != fanout[1])
		return false;
	return km_hash_from_hex(name, ret) == 0;
}

static bool is_fanout_name(const char *name)
{
	return is_lower_hex(name[0]) && is_lower_hex(name[1]) && name[2] == 0;
}

/* A name no other put, in this or any process, uses at the same time. */
static void tmp_name(struct km_store *s, const char *what, char buf[TMP_NAME_SIZE])
{
	uint64_t nonce;
	uint64_t n = atomic_fetch_add(&s->tmp_counter, 1);

	if (getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK) != sizeof(nonce))
		nonce = 0; /* pid and counter still make it unique on this host */
	snprintf(buf, TMP_NAME_SIZE, "%s.%ld.%llu.%016llx", what, (long)getpid(),
		 (unsigned long long)n, (unsigned long long)nonce);
}

/*
 * Creates a temporary file in tmp/ holding p[0..n), fsynced unless NOSYNC.
 * *ret_st (may be NULL) gets its stat once written.
 */
static int write_tmp(struct km_store *s, const char *what, const void *p, size_t n,
		     char name[TMP_NAME_SIZE], struct stat *ret_st)
{
	_cleanup_close_ int fd = -1;
	int r;

	for (int attempt = 0;; attempt++) {
		tmp_name(s, what, name);
		fd = openat(s->tmp_fd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd >= 0)
			break;
		if (errno != EEXIST || attempt >= 8)
			return -errno;
	}
	r = km_write_full(fd, p, n);
	if (r == 0 && !(s->flags & KM_STORE_NOSYNC) && fsync(fd) < 0)
		r = -errno;
	if (r == 0 && ret_st && fstat(fd, ret_st) < 0)
		r = -errno;
	if (r == 0) {
		/* close reports delayed write errors on some file systems */
		r = close(KM_TAKE_FD(fd)) < 0 ? -errno : 0;
	}
	if (r < 0)
		(void)unlinkat(s->tmp_fd, name, 0);
	return r;
}

static int fsync_dir_at(int dirfd, const char *name)
{
	_cleanup_close_ int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	return fsync(fd) < 0 ? -errno : 0;
}

/* Opens (and unless read-only, first creates) a subdirectory of S. */
static int open_subdir(int dirfd, const char *name, int *ret)
{
	int fd;

	if (mkdirat(dirfd, name, 0755) < 0 && errno != EEXIST && errno != EROFS &&
	    errno != EACCES && errno != EPERM)
		return -errno;
	fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOTDIR ? -EBADMSG : -errno;
	*ret = fd;
	return 0;
}

/* Opens a directory stream on a duplicate, leaving dirfd usable. */
static DIR *opendir_at(int dirfd, const char *name)
{
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d;

	if (fd < 0)
		return NULL;
	d = fdopendir(fd);
	if (!d)
		km_closep(&fd);
	return d;
}

static void closedirp(DIR **d)
{
	if (*d)
		closedir(*d);
}
#define _cleanup_closedir_ _cleanup_(closedirp)

/* ------------------------------------------------------------- config */

static int config_decode(const void *p, size_t n, struct km_chunker_params *ret)
{
	int r = km_store_config_decode(p, n, ret, NULL);

	/* A foreign file where the config should be: not a store. */
	return r == -ENOTRECOVERABLE ? -EBADMSG : r;
}

static int config_read(int dirfd, struct km_chunker_params *ret)
{
	_cleanup_free_ void *buf = NULL;
	size_t n;
	int r;

	r = km_read_file_at(dirfd, CONFIG_NAME, CONFIG_MAX, &buf, &n);
	if (r == -EFBIG)
		return -EBADMSG;
	if (r < 0)
		return r;
	return config_decode(buf, n, ret);
}

/*
 * Only an empty directory, or one holding nothing but temporary configs of
 * a creation that was interrupted, may become a store.
 */
static int dir_is_adoptable(int dirfd)
{
	_cleanup_closedir_ DIR *d = opendir_at(dirfd, ".");
	struct dirent *de;

	if (!d)
		return -errno;
	while ((errno = 0, de = readdir(d))) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (strncmp(de->d_name, CONFIG_TMP_PREFIX, strlen(CONFIG_TMP_PREFIX)) == 0)
			continue;
		return 0;
	}
	return errno ? -errno : 1;
}

/*
 * Publishes the config with link(), which never replaces: of several
 * processes creating the store at once exactly one config wins, and every
 * one of them then uses it. The config is the first entry of a new store,
 * so its presence is what makes a directory a store.
 */
static int config_create(int dirfd, unsigned flags, const struct km_chunker_params *params,
			 struct km_chunker_params *ret)
{
	_cleanup_free_ void *buf = NULL;
	_cleanup_close_ int fd = -1;
	char tmp[TMP_NAME_SIZE];
	uint64_t nonce = 0;
	size_t n;
	int r;

	r = km_store_config_encode(params, &buf, &n);
	if (r < 0)
		return r;
	(void)getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK);
	snprintf(tmp, sizeof(tmp), CONFIG_TMP_PREFIX "%ld.%016llx.tmp", (long)getpid(),
		 (unsigned long long)nonce);
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	r = km_write_full(fd, buf, n);
	if (r == 0 && !(flags & KM_STORE_NOSYNC) && fsync(fd) < 0)
		r = -errno;
	if (r == 0 && linkat(dirfd, tmp, dirfd, CONFIG_NAME, 0) < 0)
		r = -errno;
	(void)unlinkat(dirfd, tmp, 0);
	if (r == -EEXIST)
		return config_read(dirfd, ret);
	if (r < 0)
		return r;
	if (!(flags & KM_STORE_NOSYNC) && fsync(dirfd) < 0)
		return -errno;
	*ret = *params;
	return 0;
}

static int config_load(int dirfd, unsigned flags, const struct km_chunker_params *params,
		       struct km_chunker_params *ret)
{
	int r;

	r = config_read(dirfd, ret);
	if (r != -ENOENT)
		return r;
	r = dir_is_adoptable(dirfd);
	if (r < 0)
		return r;
	if (r == 0 || !(flags & KM_STORE_CREATE)) {
		/* Another process may have created the store since we looked. */
		r = config_read(dirfd, ret);
		return r == -ENOENT ? -EBADMSG : r;
	}
	return config_create(dirfd, flags, params, ret);
}

/* --------------------------------------------------------------- open */

/* For the verified record: the stat of chunk id's file, a regular file. */
static int stat_chunk(const struct km_hash *id, struct stat *ret, void *userdata)
{
	struct km_store *s = userdata;
	char path[CHUNK_PATH_SIZE];

	chunk_path(id, path);
	if (fstatat(s->chunks_fd, path, ret, AT_SYMLINK_NOFOLLOW) < 0)
		return -errno;
	return S_ISREG(ret->st_mode) ? 0 : -EBADMSG;
}

int km_store_open(const char *path, unsigned flags, const struct km_chunker_params *params,
		  struct km_store **ret)
{
	struct km_chunker_params defaults = KM_CHUNKER_PARAMS_DEFAULT;
	struct km_store *s;
	int r;

	if (!path || !path[0] || !ret)
		return -EINVAL;
	if (!params)
		params = &defaults;
	if ((flags & KM_STORE_CREATE) && km_chunker_params_check(params) < 0)
		return -EINVAL;
	if (flags & KM_STORE_CREATE) {
		r = km_mkdir_p(path);
		if (r < 0)
			return r;
	}

	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->dir_fd = s->chunks_fd = s->indexes_fd = s->manifests_fd = s->tmp_fd = s->lock_fd = -1;
	s->flags = flags;
	atomic_init(&s->tmp_counter, 0);
	s->path = strdup(path);
	if (!s->path) {
		r = -ENOMEM;
		goto fail;
	}

	s->dir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (s->dir_fd < 0) {
		r = errno == ENOTDIR ? -EBADMSG : -errno;
		goto fail;
	}
	r = config_load(s->dir_fd, flags, params, &s->params);
	if (r < 0)
		goto fail;

	/* After the config: a directory with these but no config is not a store. */
	s->lock_fd = openat(s->dir_fd, "lock", O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
	if (s->lock_fd < 0) {
		r = -errno;
		goto fail;
	}
	for (;;) {
		if (flock(s->lock_fd, (flags & KM_STORE_EXCLUSIVE) ? LOCK_EX | LOCK_NB : LOCK_SH) == 0)
			break;
		if (errno == EINTR)
			continue;
		r = errno == EWOULDBLOCK ? -EBUSY : -errno;
		goto fail;
	}

	r = open_subdir(s->dir_fd, "chunks", &s->chunks_fd);
	if (r == 0)
		r = open_subdir(s->dir_fd, "indexes", &s->indexes_fd);
	if (r == 0)
		r = open_subdir(s->dir_fd, "manifests", &s->manifests_fd);
	if (r == 0)
		r = open_subdir(s->dir_fd, "tmp", &s->tmp_fd);
	if (r == 0)
		r = km_verified_new(s->dir_fd, !(flags & KM_STORE_NOSYNC), stat_chunk, s,
				    &s->verified);
	if (r < 0)
		goto fail;
	if ((flags & KM_STORE_CREATE) && !(flags & KM_STORE_NOSYNC) && fsync(s->dir_fd) < 0) {
		r = -errno;
		goto fail;
	}

	*ret = s;
	return 0;
fail:
	km_store_free(s);
	return r;
}

void km_store_free(struct km_store *s)
{
	if (!s)
		return;
	/* Flushes what it noted: needs chunks/ still open. */
	km_verified_free(s->verified);
	km_closep(&s->chunks_fd);
	km_closep(&s->indexes_fd);
	km_closep(&s->manifests_fd);
	km_closep(&s->tmp_fd);
	km_closep(&s->dir_fd);
	km_closep(&s->lock_fd); /* releases the flock */
	free(s->path);
	free(s);
}

const struct km_chunker_params *km_store_chunker_params(const struct km_store *s)
{
	return &s->params;
}

const char *km_store_path(const struct km_store *s)
{
	return s->path;
}

/* ------------------------------------------------------------- chunks */

int km_store_has(struct km_store *s, const struct km_hash *id)
{
	char path[CHUNK_PATH_SIZE];
	struct stat st;

	chunk_path(id, path);
	if (fstatat(s->chunks_fd, path, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 0 : -errno;
	return 1;
}

/* Renames without replacing; link+unlink where RENAME_NOREPLACE is missing. */
static int rename_noreplace(int from_fd, const char *from, int to_fd, const char *to)
{
	if (renameat2(from_fd, from, to_fd, to, RENAME_NOREPLACE) == 0)
		return 0;
	if (errno != EINVAL && errno != ENOSYS)
		return -errno;
	if (linkat(from_fd, from, to_fd, to, 0) < 0)
		return -errno;
	(void)unlinkat(from_fd, from, 0);
	return 0;
}

int km_store_put(struct km_store *s, const struct km_hash *id, const void *p, size_t n)
{
	char path[CHUNK_PATH_SIZE], tmp[TMP_NAME_SIZE];
	struct stat st, written;
	bool sync = !(s->flags & KM_STORE_NOSYNC);
	int r;

	chunk_path(id, path);
	/* Cheap dedup before writing anything; the rename below decides races. */
	if (fstatat(s->chunks_fd, path, &st, AT_SYMLINK_NOFOLLOW) == 0)
		return -EEXIST;

	r = write_tmp(s, "chunk", p, n, tmp, &written);
	if (r < 0)
		return r;
	r = rename_noreplace(s->tmp_fd, tmp, s->chunks_fd, path);
	if (r == -ENOENT) {
		/* First chunk of this fan-out directory. */
		path[2] = 0;
		if (mkdirat(s->chunks_fd, path, 0755) < 0 && errno != EEXIST)
			r = -errno;
		else if (sync)
			r = fsync(s->chunks_fd) < 0 ? -errno : 0;
		else
			r = 0;
		path[2] = '/';
		if (r == 0)
			r = rename_noreplace(s->tmp_fd, tmp, s->chunks_fd, path);
	}
	if (r < 0) {
		(void)unlinkat(s->tmp_fd, tmp, 0);
		return r;
	}
	/*
	 * The caller hashed these bytes: record the file we wrote (the
	 * rename changed its ctime, so stat it under its name, and only if
	 * it is still our inode).
	 */
	if (fstatat(s->chunks_fd, path, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
	    st.st_ino == written.st_ino && st.st_dev == written.st_dev && (uint64_t)st.st_size == n)
		km_verified_note(s->verified, id, &st);
	if (sync) {
		path[2] = 0;
		r = fsync_dir_at(s->chunks_fd, path);
	}
	return r;
}

/*
 * Opens chunk id for reading: the fd, or -ENOENT, or -EBADMSG for anything
 * but a regular file under its name. *st gets its stat.
 */
static int open_chunk(struct km_store *s, const struct km_hash *id, struct stat *st)
{
	char path[CHUNK_PATH_SIZE];
	int fd;

	chunk_path(id, path);
	fd = openat(s->chunks_fd, path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return errno == ELOOP ? -EBADMSG : -errno;
	if (fstat(fd, st) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	if (!S_ISREG(st->st_mode)) {
		close(fd);
		return -EBADMSG;
	}
	return fd;
}

static bool same_stat(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/*
 * The bytes of chunk id, read through fd, hashed right. They are what the
 * file holds now if its stat did not change while they were read, and the
 * clock had moved past its ctime before ('settled': a change in that tick
 * could have kept the ctime). Then the store records it.
 */
static void note_if_unchanged(struct km_store *s, const struct km_hash *id, int fd,
			      const struct stat *before, bool settled, struct stat *scratch)
{
	if (settled && fstat(fd, scratch) == 0 && same_stat(before, scratch))
		km_verified_note(s->verified, id, before);
}

int km_store_get(struct km_store *s, const struct km_hash *id, void *buf, size_t bufsize,
		 size_t *ret_size)
{
	_cleanup_close_ int fd = -1;
	struct km_hash h;
	struct stat st, after;
	bool settled;
	ssize_t k;

	fd = open_chunk(s, id, &st);
	if (fd < 0)
		return fd;
	if ((uint64_t)st.st_size > bufsize)
		return -EFBIG;
	settled = km_verified_settled(&st);
	/* Straight into the caller's buffer: the only copy is the kernel's. */
	k = km_read_full(fd, buf, (size_t)st.st_size);
	if (k < 0)
		return (int)k;
	if ((size_t)k != (size_t)st.st_size)
		return -EBADMSG;
	km_hash_buf(buf, (size_t)k, &h);
	if (!km_hash_equal(&h, id))
		return -EBADMSG;
	note_if_unchanged(s, id, fd, &st, settled, &after);
	if (ret_size)
		*ret_size = (size_t)k;
	return 0;
}

int km_store_copy_range_to(struct km_store *s, const struct km_hash *id, uint64_t length,
			   uint64_t from, uint64_t n, int dst_fd, uint64_t dst_off)
{
	_cleanup_close_ int fd = -1;
	loff_t in = (loff_t)from, out = (loff_t)dst_off;
	uint64_t end = from + n;
	struct stat st;

	if (from > length || n > length - from)
		return -EINVAL;
	fd = open_chunk(s, id, &st);
	if (fd < 0)
		return fd;
	if ((uint64_t)st.st_size != length)
		return -EBADMSG;
	while ((uint64_t)in < end) {
		ssize_t k = copy_file_range(fd, &in, dst_fd, &out, (size_t)(end - (uint64_t)in), 0);

		if (k > 0)
			continue;
		if (k == 0)
			return -EBADMSG; /* shrank under us */
		if (errno == EINTR)
			continue;
		if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
			return -errno;
		/* No in-kernel copy between these file systems: by hand. */
		{
			uint8_t buf[64 * 1024];

			while ((uint64_t)in < end) {
				size_t want = (size_t)KM_MIN(sizeof(buf), end - (uint64_t)in);
				ssize_t got = km_pread_full(fd, buf, want, in);
				int r;

				if (got < 0)
					return (int)got;
				if ((size_t)got != want)
					return -EBADMSG;
				r = km_pwrite_full(dst_fd, buf, want, out);
				if (r < 0)
					return r;
				in += (loff_t)want;
				out += (loff_t)want;
			}
		}
	}
	return 0;
}

int km_store_copy_to(struct km_store *s, const struct km_hash *id, uint64_t length, int dst_fd,
		     uint64_t dst_off)
{
	return km_store_copy_range_to(s, id, length, 0, length, dst_fd, dst_off);
}

int km_store_open_chunk(struct km_store *s, const struct km_hash *id, uint64_t length,
			bool *ret_recorded)
{
	struct stat st;
	int fd;

	fd = open_chunk(s, id, &st);
	if (fd < 0)
		return fd;
	if ((uint64_t)st.st_size != length) {
		close(fd);
		return -EBADMSG;
	}
	*ret_recorded = km_verified_matches(s->verified, id, &st);
	return fd;
}

int km_store_check_chunk(struct km_store *s, const struct km_hash *id, int fd)
{
	struct stat st, after;
	struct km_hash h;
	bool settled;
	void *map;

	if (fstat(fd, &st) < 0)
		return -errno;
	settled = km_verified_settled(&st);
	if (st.st_size == 0) {
		km_hash_buf("", 0, &h);
	} else {
		map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
		if (map == MAP_FAILED)
			return -errno;
		km_hash_buf(map, (size_t)st.st_size, &h);
		munmap(map, (size_t)st.st_size);
	}
	if (!km_hash_equal(&h, id))
		return -EBADMSG;
	note_if_unchanged(s, id, fd, &st, settled, &after);
	return 0;
}

void km_store_verified_reload(struct km_store *s)
{
	km_verified_reload(s->verified);
}

void km_store_verified_flush(struct km_store *s)
{
	km_verified_flush(s->verified);
}

size_t km_store_verified_count(struct km_store *s)
{
	return km_verified_count(s->verified);
}

int km_store_compare(struct km_store *s, const struct km_hash *id, const void *p, size_t n)
{
	_cleanup_close_ int fd = -1;
	struct stat st;
	void *map;
	int equal;

	fd = open_chunk(s, id, &st);
	if (fd < 0)
		return fd;
	if ((uint64_t)st.st_size != n)
		return 0;
	if (n == 0)
		return 1;
	/*
	 * A mapping beats read() into a buffer (no copy of the chunk). Chunk
	 * files are never rewritten in place (puts rename complete files, gc
	 * unlinks), so none shrinks under the mapping; split maps the image
	 * files it reads the same way.
	 */
	map = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED)
		return -errno;
	equal = memcmp(map, p, n) == 0;
	munmap(map, n);
	return equal;
}

int km_store_stat(struct km_store *s, const struct km_hash *id, uint64_t *ret_size)
{
	char path[CHUNK_PATH_SIZE];
	struct stat st;

	chunk_path(id, path);
	if (fstatat(s->chunks_fd, path, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EBADMSG;
	if (ret_size)
		*ret_size = (uint64_t)st.st_size;
	return 0;
}

int km_store_remove(struct km_store *s, const struct km_hash *id)
{
	char path[CHUNK_PATH_SIZE];

	chunk_path(id, path);
	return unlinkat(s->chunks_fd, path, 0) < 0 ? -errno : 0;
}

/*
 * Calls fn for every well-named chunk file: its fan-out directory fd, its
 * name and id. Stops at fn's first nonzero return and returns it.
 */
typedef int (*walk_fn)(int fanout_fd, const char *name, const struct km_hash *id,
		       void *userdata);

static int walk_chunks(struct km_store *s, walk_fn fn, void *userdata)
{
	_cleanup_closedir_ DIR *top = opendir_at(s->chunks_fd, ".");
	struct dirent *de;

	if (!top)
		return -errno;
	while ((errno = 0, de = readdir(top))) {
		_cleanup_closedir_ DIR *d = NULL;
		struct dirent *ce;

		if (!is_fanout_name(de->d_name))
			continue;
		d = opendir_at(s->chunks_fd, de->d_name);
		if (!d) {
			if (errno == ENOENT || errno == ENOTDIR)
				continue;
			return -errno;
		}
		while ((errno = 0, ce = readdir(d))) {
			struct km_hash id;
			int r;

			if (!parse_chunk_name(de->d_name, ce->d_name, &id))
				continue;
			r = fn(dirfd(d), ce->d_name, &id, userdata);
			if (r != 0)
				return r;
		}
		if (errno)
			return -errno;
	}
	return errno ? -errno : 0;
}

struct foreach_ctx {
	km_store_chunk_fn fn;
	void *userdata;
};

static int foreach_one(int fanout_fd, const char *name, const struct km_hash *id,
		       void *userdata)
{
	struct foreach_ctx *c = userdata;
	struct stat st;

	if (fstatat(fanout_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 0 : -errno; /* removed meanwhile */
	return c->fn(id, (uint64_t)st.st_size, c->userdata);
}

int km_store_foreach(struct km_store *s, km_store_chunk_fn fn, void *userdata)
{
	struct foreach_ctx c = { fn, userdata };

	return walk_chunks(s, foreach_one, &c);
}

struct verify_ctx {
	struct km_store *store;
	bool repair;
	km_store_bad_fn bad_fn;
	void *userdata;
	struct km_hasher *hasher;
	uint8_t *buf;
	struct km_store_verify_stats stats;
};

/* 0 if the file hashes to id, -EBADMSG if not, -errno if unreadable. */
static int verify_file(struct verify_ctx *c, int fd, const struct km_hash *id)
{
	struct km_hash h;
	ssize_t k;

	for (;;) {
		k = km_read_full(fd, c->buf, VERIFY_BUF_SIZE);
		if (k < 0)
			return (int)k;
		c->stats.bytes += (uint64_t)k;
		km_hasher_update(c->hasher, c->buf, (size_t)k);
		if ((size_t)k < VERIFY_BUF_SIZE)
			break;
	}
	km_hasher_final(c->hasher, &h);
	return km_hash_equal(&h, id) ? 0 : -EBADMSG;
}

static int verify_one(int fanout_fd, const char *name, const struct km_hash *id, void *userdata)
{
	struct verify_ctx *c = userdata;
	_cleanup_close_ int fd = -1;
	struct stat st;
	int r;

	fd = openat(fanout_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0 && errno == ENOENT)
		return 0; /* removed meanwhile */
	if (fd < 0)
		r = errno == ELOOP ? -EBADMSG : -errno;
	else if (fstat(fd, &st) < 0)
		r = -errno;
	else if (!S_ISREG(st.st_mode))
		r = -EBADMSG;
	else {
		bool settled = km_verified_settled(&st);
		struct stat after;

		r = verify_file(c, fd, id);
		if (r == 0)
			note_if_unchanged(c->store, id, fd, &st, settled, &after);
	}
	/* The hasher may hold a partial stream after a read error. */
	if (r < 0 && r != -EBADMSG) {
		struct km_hash ignored;

		km_hasher_final(c->hasher, &ignored);
	}
	if (r == -ENOMEM || r == -EMFILE || r == -ENFILE)
		return r; /* our trouble, not the chunk's */
	c->stats.chunks++;
	if (r == 0)
		return 0;
	c->stats.bad++;
	if (c->bad_fn)
		c->bad_fn(id, r, c->userdata);
	if (c->repair && unlinkat(fanout_fd, name, 0) < 0 && errno != ENOENT)
		return -errno;
	return 0;
}

int km_store_verify(struct km_store *s, bool repair, km_store_bad_fn bad_fn, void *userdata,
		    struct km_store_verify_stats *ret)
{
	_cleanup_free_ uint8_t *buf = malloc(VERIFY_BUF_SIZE);
	struct verify_ctx c = { .store = s, .repair = repair, .bad_fn = bad_fn, .userdata = userdata };
	int r;

	if (!buf)
		return -ENOMEM;
	c.buf = buf;
	c.hasher = km_hasher_new();
	if (!c.hasher)
		return -ENOMEM;
	r = walk_chunks(s, verify_one, &c);
	km_hasher_free(c.hasher);
	km_verified_flush(s->verified);
	if (r < 0)
		return r;
	if (ret)
		*ret = c.stats;
	return c.stats.bad ? -EBADMSG : 0;
}

/* -------------------------------------------------------------- roots */

/* The directory fd of a root kind; -EINVAL for an unknown kind. */
static int kind_dir(struct km_store *s, const char *kind)
{
	if (kind && strcmp(kind, "indexes") == 0)
		return s->indexes_fd;
	if (kind && strcmp(kind, "manifests") == 0)
		return s->manifests_fd;
	return -EINVAL;
}

/* As kind_dir, and -EINVAL for a name that is not a plain file name. */
static int root_dir(struct km_store *s, const char *kind, const char *name)
{
	return km_filename_is_plain(name) ? kind_dir(s, kind) : -EINVAL;
}

int km_store_root_write(struct km_store *s, const char *kind, const char *name, const void *p,
			size_t n)
{
	char tmp[TMP_NAME_SIZE];
	int fd = root_dir(s, kind, name);
	int r;

	if (fd < 0)
		return fd;
	r = write_tmp(s, "root", p, n, tmp, NULL);
	if (r < 0)
		return r;
	if (renameat(s->tmp_fd, tmp, fd, name) < 0) {
		r = -errno;
		(void)unlinkat(s->tmp_fd, tmp, 0);
		return r;
	}
	if (!(s->flags & KM_STORE_NOSYNC) && fsync(fd) < 0)
		return -errno;
	return 0;
}

int km_store_root_read(struct km_store *s, const char *kind, const char *name, void **ret,
		       size_t *ret_size)
{
	int fd = root_dir(s, kind, name);

	if (fd < 0)
		return fd;
	return km_read_file_at(fd, name, ROOT_MAX, ret, ret_size);
}

int km_store_root_remove(struct km_store *s, const char *kind, const char *name)
{
	int fd = root_dir(s, kind, name);

	if (fd < 0)
		return fd;
	if (unlinkat(fd, name, 0) < 0)
		return -errno;
	if (!(s->flags & KM_STORE_NOSYNC) && fsync(fd) < 0)
		return -errno;
	return 0;
}

struct name_list {
	char **names;
	size_t n, cap;
};

static void name_list_clear(struct name_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->names[i]);
	free(l->names);
	memset(l, 0, sizeof(*l));
}

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The plain regular files of one root directory, sorted. */
static int list_roots(int dirfd, struct name_list *ret)
{
	_cleanup_closedir_ DIR *d = opendir_at(dirfd, ".");
	struct name_list l = { 0 };
	struct dirent *de;
	int r = 0;

	if (!d)
		return -errno;
	while ((errno = 0, de = readdir(d))) {
		struct stat st;

		if (!km_filename_is_plain(de->d_name))
			continue;
		if (de->d_type != DT_REG) {
			if (de->d_type != DT_UNKNOWN)
				continue;
			if (fstatat(dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
			    !S_ISREG(st.st_mode))
				continue;
		}
		if (l.n == l.cap) {
			size_t cap = l.cap ? 2 * l.cap : 16;
			char **names = realloc(l.names, cap * sizeof(*names));

			if (!names) {
				r = -ENOMEM;
				break;
			}
			l.names = names;
			l.cap = cap;
		}
		l.names[l.n] = strdup(de->d_name);
		if (!l.names[l.n]) {
			r = -ENOMEM;
			break;
		}
		l.n++;
	}
	if (r == 0 && errno)
		r = -errno;
	if (r < 0) {
		name_list_clear(&l);
		return r;
	}
	if (l.n)
		qsort(l.names, l.n, sizeof(*l.names), cmp_names);
	*ret = l;
	return 0;
}

int km_store_root_foreach(struct km_store *s, const char *kind, km_store_root_fn fn,
			  void *userdata)
{
	struct name_list l;
	int fd = kind_dir(s, kind);
	int r;

	if (fd < 0)
		return fd;
	r = list_roots(fd, &l);
	if (r < 0)
		return r;
	for (size_t i = 0; i < l.n && r == 0; i++)
		r = fn(l.names[i], userdata);
	name_list_clear(&l);
	return r;
}

/* ----------------------------------------------------------------- gc */

/*
 * The set of kept ids: open addressing with linear probing, keyed by the
 * first 8 bytes of the id (a SHA-256 is uniform already).
 */
struct km_store_gc {
	struct km_hash *slots;
	uint8_t *used;
	size_t cap; /* a power of two, or 0 */
	size_t n;
	int error; /* first failure of km_store_gc_keep */
};

static size_t gc_slot(const struct km_hash *id, size_t cap)
{
	uint64_t k;

	memcpy(&k, id->b, sizeof(k));
	return (size_t)k & (cap - 1);
}

static bool gc_contains(const struct km_store_gc *gc, const struct km_hash *id)
{
	if (!gc->cap)
		return false;
	for (size_t i = gc_slot(id, gc->cap); gc->used[i]; i = (i + 1) & (gc->cap - 1))
		if (km_hash_equal(&gc->slots[i], id))
			return true;
	return false;
}

static void gc_insert(struct km_store_gc *gc, const struct km_hash *id)
{
	size_t i = gc_slot(id, gc->cap);

	while (gc->used[i]) {
		if (km_hash_equal(&gc->slots[i], id))
			return;
		i = (i + 1) & (gc->cap - 1);
	}
	gc->slots[i] = *id;
	gc->used[i] = 1;
	gc->n++;
}

static int gc_grow(struct km_store_gc *gc)
{
	struct km_store_gc bigger = { 0 };

	bigger.cap = gc->cap ? 2 * gc->cap : 1024;
	bigger.slots = malloc(bigger.cap * sizeof(*bigger.slots));
	bigger.used = calloc(bigger.cap, 1);
	if (!bigger.slots || !bigger.used) {
		free(bigger.slots);
		free(bigger.used);
		return -ENOMEM;
	}
	for (size_t i = 0; i < gc->cap; i++)
		if (gc->used[i])
			gc_insert(&bigger, &gc->slots[i]);
	free(gc->slots);
	free(gc->used);
	gc->slots = bigger.slots;
	gc->used = bigger.used;
	gc->cap = bigger.cap;
	return 0;
}

void km_store_gc_keep(struct km_store_gc *gc, const struct km_hash *id)
{
	if (gc->error)
		return;
	/* Load factor at most 1/2 keeps probe runs short. */
	if (2 * (gc->n + 1) > gc->cap) {
		int r = gc_grow(gc);

		if (r < 0) {
			gc->error = r;
			return;
		}
	}
	gc_insert(gc, id);
}

struct sweep_ctx {
	const struct km_store_gc *gc;
	struct km_store_gc_stats *stats;
	struct km_error *err;
};

static int sweep_one(int fanout_fd, const char *name, const struct km_hash *id, void *userdata)
{
	struct sweep_ctx *c = userdata;
	struct stat st;

	if (gc_contains(c->gc, id)) {
		c->stats->chunks_kept++;
		return 0;
	}
	if (fstatat(fanout_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		st.st_size = 0;
	if (unlinkat(fanout_fd, name, 0) < 0) {
		int r = -errno;

		km_error_set(c->err, "cannot remove chunk %s: %s", name, strerror(-r));
		return r;
	}
	c->stats->chunks_removed++;
	c->stats->bytes_removed += (uint64_t)st.st_size;
	return 0;
}

static bool gc_keeps(const struct km_hash *id, void *userdata)
{
	return gc_contains(userdata, id);
}

static int gc_mark(struct km_store *s, struct km_store_gc *gc, km_store_refs_fn refs,
		   void *userdata, struct km_store_gc_stats *stats, struct km_error *err)
{
	static const char *const kinds[] = { "indexes", "manifests" };

	for (size_t k = 0; k < KM_ARRAY_SIZE(kinds); k++) {
		int fd = kind_dir(s, kinds[k]);
		struct name_list l;
		int r;

		r = list_roots(fd, &l);
		if (r < 0) {
			km_error_set(err, "cannot list %s: %s", kinds[k], strerror(-r));
			return r;
		}
		for (size_t i = 0; i < l.n && r == 0; i++) {
			_cleanup_free_ void *buf = NULL;
			size_t n;

			r = km_read_file_at(fd, l.names[i], ROOT_MAX, &buf, &n);
			if (r < 0) {
				km_error_set(err, "cannot read root %s/%s: %s", kinds[k],
					     l.names[i], strerror(-r));
				break;
			}
			r = refs(gc, kinds[k], l.names[i], buf, n, userdata);
			if (r == 0 && gc->error)
				r = gc->error;
			if (r < 0) {
				km_error_prefix(err, "root %s/%s", kinds[k], l.names[i]);
				break;
			}
			stats->roots++;
		}
		name_list_clear(&l);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Under the exclusive lock no put is in progress: everything in tmp/ is stale. */
static int gc_clean_tmp(struct km_store *s, struct km_error *err)
{
	_cleanup_closedir_ DIR *d = opendir_at(s->tmp_fd, ".");
	struct dirent *de;

	if (!d)
		return -errno;
	while ((errno = 0, de = readdir(d))) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (unlinkat(s->tmp_fd, de->d_name, 0) < 0 && errno != ENOENT &&
		    errno != EISDIR) {
			int r = -errno;

			km_error_set(err, "cannot remove tmp/%s: %s", de->d_name, strerror(-r));
			return r;
		}
	}
	return errno ? -errno : 0;
}

int km_store_gc_run(struct km_store *s, km_store_refs_fn refs, void *userdata,
		    struct km_store_gc_stats *ret, struct km_error *err)
{
	struct km_store_gc gc = { 0 };
	struct km_store_gc_stats stats = { 0 };
	struct sweep_ctx sweep = { &gc, &stats, err };
	int r;

	if (!refs)
		return -EINVAL;
	if (!(s->flags & KM_STORE_EXCLUSIVE)) {
		km_error_set(err, "gc needs the store opened exclusively");
		return -EBUSY;
	}
	if (err)
		err->msg[0] = 0; /* refs may describe its failure; we prefix it */

	r = gc_mark(s, &gc, refs, userdata, &stats, err);
	if (r == 0) {
		r = walk_chunks(s, sweep_one, &sweep);
		if (r < 0 && err && !err->msg[0])
			km_error_set(err, "cannot list chunks: %s", strerror(-r));
	}
	if (r == 0)
		r = gc_clean_tmp(s, err);
	/* Only the kept chunks' entries, and only those still true. */
	if (r == 0)
		(void)km_verified_compact(s->verified, gc_keeps, &gc);
	free(gc.slots);
	free(gc.used);
	if (r < 0)
		return r;
	if (ret)
		*ret = stats;
	return 0;
}

int km_store_flush(struct km_store *s)
{
	return syncfs(s->dir_fd) < 0 ? -errno : 0;
}
