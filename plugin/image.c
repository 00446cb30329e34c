/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "image.h"

#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "criuimg.h"
#include "late.h"
#include "scan.h"

#define DELTA_TMP_NAME ".kvmotion.delta.tmp"
#define MANIFEST_MAX (256u * 1024 * 1024)
/* A pagemap rewritten for late weights keeps its original under this prefix. */
#define LATE_ORIG_PREFIX "kvmotion.orig."

/*
 * Not part of the image: kvmotion's own files, and CRIU's logs and
 * statistics, which CRIU writes after the split (dump.log, stats-dump) and
 * during a restore: recording them would make a restore refuse.
 */
static bool is_late_orig(const char *name)
{
	return strncmp(name, LATE_ORIG_PREFIX, strlen(LATE_ORIG_PREFIX)) == 0;
}

static bool not_image_file(const char *name)
{
	return strcmp(name, KM_MANIFEST_NAME) == 0 || strcmp(name, KM_DELTA_NAME) == 0 ||
	       is_late_orig(name) || fnmatch("*.log", name, 0) == 0 || fnmatch("stats-*", name, 0) == 0;
}

int km_image_is_split(int dirfd)
{
	if (faccessat(dirfd, KM_MANIFEST_NAME, F_OK, 0) == 0)
		return 1;
	return errno == ENOENT ? 0 : -errno;
}

int km_image_read_manifest(int dirfd, struct km_manifest **ret, struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	size_t n;
	int r;

	r = km_read_file_at(dirfd, KM_MANIFEST_NAME, MANIFEST_MAX, &buf, &n);
	if (r < 0) {
		if (r == -ENOENT)
			km_error_set(err, "%s: no such file (not a split image)", KM_MANIFEST_NAME);
		else
			km_error_set(err, "%s: %s", KM_MANIFEST_NAME, strerror(-r));
		return r;
	}
	r = km_manifest_decode(buf, n, ret, err);
	if (r < 0)
		km_error_prefix(err, "%s", KM_MANIFEST_NAME);
	return r;
}

static int hash_file_at(int dirfd, const char *name, struct km_hash *ret, uint64_t *ret_size,
			uint32_t *ret_mode)
{
	_cleanup_close_ int fd = -1;
	const uint8_t *map = NULL;
	struct stat st;
	int r;

	fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		return -errno;
	r = km_map_file(fd, (uint64_t)st.st_size, &map);
	if (r < 0)
		return r;
	km_hash_buf(map ? map : (const uint8_t *)"", (size_t)st.st_size, ret);
	km_unmap_file(map, (uint64_t)st.st_size);
	if (ret_size)
		*ret_size = (uint64_t)st.st_size;
	if (ret_mode)
		*ret_mode = st.st_mode & 07777;
	return 0;
}

/* ---------------------------------------------------------------- split */


struct split_file {
	struct km_file_entry *entry;
	struct km_delta_writer *delta;
	uint64_t *delta_pos;
	struct km_split_stats *stats;
};

static int split_emit(void *userdata, const uint8_t *base, const struct km_scan_chunk *chunks,
		      size_t n)
{
	struct split_file *sf = userdata;

	for (size_t i = 0; i < n; i++) {
		const struct km_scan_chunk *c = &chunks[i];
		struct km_extent e = { .length = c->length };
		int r;

		switch (c->kind) {
		case KM_SCAN_ZERO:
			e.kind = KM_EXTENT_ZERO;
			sf->stats->bytes_zero += c->length;
			break;
		case KM_SCAN_ADDED:
			sf->stats->chunks_added++;
			sf->stats->bytes_added += c->length;
			/* fall through */
		case KM_SCAN_STORED:
			e.kind = KM_EXTENT_CHUNK;
			e.id = c->id;
			if (c->kind == KM_SCAN_STORED) {
				sf->stats->chunks_referenced++;
				sf->stats->bytes_referenced += c->length;
			}
			break;
		case KM_SCAN_NOT_STORED:
			e.kind = KM_EXTENT_DELTA;
			e.delta_offset = *sf->delta_pos;
			r = km_delta_writer_append(sf->delta, base + c->offset, c->length);
			if (r < 0)
				return r;
			*sf->delta_pos += c->length;
			sf->stats->bytes_delta += c->length;
			break;
		}
		r = km_file_entry_add_extent(sf->entry, &e);
		if (r < 0)
			return r;
	}
	return 0;
}

static int split_one(const struct km_scanner *sc, int dirfd, struct km_file_entry *entry,
		     struct km_delta_writer *delta, uint64_t *delta_pos,
		     struct km_split_stats *stats, struct km_error *err)
{
	_cleanup_close_ int fd = -1;
	struct split_file sf = { entry, delta, delta_pos, stats };
	const uint8_t *map = NULL;
	int r;

	fd = openat(dirfd, entry->name, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		km_error_set(err, "cannot open %s: %s", entry->name, strerror(-r));
		return r;
	}
	r = km_map_file(fd, entry->size, &map);
	if (r < 0) {
		km_error_set(err, "cannot map %s: %s", entry->name, strerror(-r));
		return r;
	}
	/* No whole-file hash: the extents are the file's integrity (1.2). */
	if (entry->size > 0)
		r = km_scan(sc, map, entry->size, entry->name, split_emit, &sf, NULL, err);
	km_unmap_file(map, entry->size);
	return r;
}

/*
 * A split under way. Files followed while CRIU writes them (km_split_follow)
 * come first in the delta, each in one piece; the rest are split at commit,
 * in directory order, as km_image_split does.
 */
struct followed {
	struct km_file_entry entry; /* name, mode and extents so far */
	struct split_file sf;
	struct km_scan_follow *scan;
	dev_t dev;
	ino_t ino;
	uint64_t seen;	/* bytes of it seen so far */
	bool complete;	/* split to the end at 'seen' bytes */
};

struct km_split {
	int dirfd;
	struct km_store *store;
	struct km_split_opts o;
	struct km_chunker_params chunker;
	struct km_workpool *pool;
	struct km_known *known;
	struct km_scanner sc;
	struct km_delta_params delta_params;
	struct km_delta_writer *delta;
	int delta_fd;
	bool delta_unnamed; /* O_TMPFILE: named only at commit */
	uint64_t delta_pos;
	struct km_split_stats stats;
	struct followed **followed;
	size_t n_followed;
	bool used;   /* committed, or a commit failed: nothing more to do */
	bool failed; /* a follow failed: only free is left */
};

void km_split_free(struct km_split *sp)
{
	if (!sp)
		return;
	km_delta_writer_free(sp->delta);
	if (sp->delta_fd >= 0) {
		close(sp->delta_fd);
		/* Not committed: the image stays as it was. */
		if (!sp->used && !sp->delta_unnamed)
			(void)unlinkat(sp->dirfd, DELTA_TMP_NAME, 0);
	}
	for (size_t i = 0; i < sp->n_followed; i++) {
		km_scan_follow_free(sp->followed[i]->scan);
		km_file_entry_clear(&sp->followed[i]->entry);
		free(sp->followed[i]);
	}
	free(sp->followed);
	km_workpool_free(sp->pool);
	km_known_free(sp->known);
	free(sp);
}

int km_split_begin(int dirfd, struct km_store *s, const struct km_split_opts *o,
		   struct km_split **ret, struct km_error *err)
{
	struct km_split *sp;
	int r;

	r = km_image_is_split(dirfd);
	if (r > 0) {
		km_error_set(err, "image is already split (%s exists)", KM_MANIFEST_NAME);
		return -EEXIST;
	}
	if (r < 0) {
		km_error_set(err, "%s: %s", KM_MANIFEST_NAME, strerror(-r));
		return r;
	}
	sp = calloc(1, sizeof(*sp));
	if (!sp)
		return -ENOMEM;
	sp->dirfd = dirfd;
	sp->store = s;
	sp->o = *o;
	sp->chunker = *km_store_chunker_params(s);
	sp->delta_fd = -1;
	r = km_workpool_new(o->threads, 0, &sp->pool);
	if (r < 0)
		goto fail;
	/* Adding chunks hashes every one anyway: then look them up by id. */
	if (!o->add_chunks) {
		r = km_known_load(s, &sp->chunker, &sp->known, err);
		if (r < 0) {
			km_error_prefix(err, "reading the store's weights indexes");
			goto fail;
		}
	}
	sp->sc = (struct km_scanner){
		.params = &sp->chunker,
		.pool = sp->pool,
		.store = s,
		.known = sp->known,
		.put = o->add_chunks,
	};
	sp->delta_params = o->delta;
	if (getrandom(sp->delta_params.image_id.b, KM_HASH_SIZE, 0) != KM_HASH_SIZE) {
		r = -EIO;
		goto fail;
	}
	(void)unlinkat(dirfd, DELTA_TMP_NAME, 0);
	/*
	 * Without a name until commit: a split begun while CRIU dumps may
	 * never be committed, nor freed if CRIU dies; then nothing is left.
	 */
	if (access("/proc/self/fd", X_OK) == 0) /* the way to name it at commit */
		sp->delta_fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
	sp->delta_unnamed = sp->delta_fd >= 0;
	if (sp->delta_fd < 0)
		sp->delta_fd = openat(dirfd, DELTA_TMP_NAME, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
				      0600);
	if (sp->delta_fd < 0) {
		r = -errno;
		km_error_set(err, "cannot create the delta: %s", strerror(-r));
		goto fail;
	}
	r = km_delta_writer_new(sp->delta_fd, &sp->delta_params, &sp->delta);
	if (r < 0)
		goto fail;
	*ret = sp;
	return 0;
fail:
	km_split_free(sp);
	return r;
}

static struct followed *find_followed(const struct km_split *sp, const char *name)
{
	for (size_t i = 0; i < sp->n_followed; i++)
		if (strcmp(sp->followed[i]->entry.name, name) == 0)
			return sp->followed[i];
	return NULL;
}

static int add_followed(struct km_split *sp, const char *name, int fd, struct followed **ret,
			struct km_error *err)
{
	struct followed **grown, *f;
	struct stat st;
	int r;

	if (sp->n_followed && !sp->followed[sp->n_followed - 1]->complete) {
		/* One at a time: each file's delta bytes in one piece. */
		km_error_set(err, "%s: %s is still being followed", name,
			     sp->followed[sp->n_followed - 1]->entry.name);
		return -EBUSY;
	}
	if (fstat(fd, &st) < 0) {
		r = -errno;
		km_error_set(err, "%s: %s", name, strerror(-r));
		return r;
	}
	grown = realloc(sp->followed, (sp->n_followed + 1) * sizeof(*grown));
	if (!grown)
		return -ENOMEM;
	sp->followed = grown;
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->entry.name = strdup(name);
	f->entry.mode = st.st_mode & 07777;
	f->entry.split = true;
	f->dev = st.st_dev;
	f->ino = st.st_ino;
	f->sf = (struct split_file){ &f->entry, sp->delta, &sp->delta_pos, &sp->stats };
	r = f->entry.name ? km_scan_follow_new(&sp->sc, split_emit, &f->sf, &f->scan) : -ENOMEM;
	if (r < 0) {
		free(f->entry.name);
		free(f);
		if (r == -EOPNOTSUPP)
			km_error_set(err, "%s: files are followed only without add_chunks", name);
		return r;
	}
	sp->followed[sp->n_followed++] = f;
	*ret = f;
	return 0;
}

int km_split_follow(struct km_split *sp, const char *name, int fd, const uint8_t *base,
		    uint64_t avail, bool complete, struct km_error *err)
{
	struct followed *f;
	int r;

	if (sp->used || sp->failed)
		return -EINVAL;
	f = find_followed(sp, name);
	if (!f) {
		r = add_followed(sp, name, fd, &f, err);
		if (r < 0)
			goto fail;
	}
	if (f->complete) {
		km_error_set(err, "%s: already split to its end", name);
		r = -EINVAL;
		goto fail;
	}
	r = complete ? km_scan_follow_finish(f->scan, base, avail, name, err)
		     : km_scan_follow_step(f->scan, base, avail, name, err);
	if (r < 0)
		goto fail;
	f->seen = avail;
	f->complete = complete;
	return 0;
fail:
	sp->failed = true;
	return r;
}

/*
 * A followed file at commit: the one CRIU wrote (same inode), with every
 * byte seen; if its end was not seen, its rest is split now.
 */
static int finish_followed(struct km_split *sp, struct followed *f, struct km_error *err)
{
	_cleanup_close_ int fd = -1;
	const uint8_t *map = NULL;
	struct stat st;
	int r;

	fd = openat(sp->dirfd, f->entry.name, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		r = -errno;
		km_error_set(err, "cannot open %s: %s", f->entry.name, strerror(-r));
		return r == -ENOENT ? -ESTALE : r;
	}
	if (st.st_dev != f->dev || st.st_ino != f->ino || (uint64_t)st.st_size < f->seen ||
	    (f->complete && (uint64_t)st.st_size != f->seen)) {
		km_error_set(err, "%s changed while it was split (%llu bytes, %llu seen)",
			     f->entry.name, (unsigned long long)st.st_size,
			     (unsigned long long)f->seen);
		return -ESTALE;
	}
	f->entry.size = (uint64_t)st.st_size;
	f->entry.mode = st.st_mode & 07777;
	if (f->complete)
		return 0;
	r = km_map_file(fd, f->entry.size, &map);
	if (r < 0) {
		km_error_set(err, "cannot map %s: %s", f->entry.name, strerror(-r));
		return r;
	}
	r = km_scan_follow_finish(f->scan, map, f->entry.size, f->entry.name, err);
	km_unmap_file(map, f->entry.size);
	if (r < 0)
		return r;
	f->seen = f->entry.size;
	f->complete = true;
	return 0;
}

int km_split_commit(struct km_split *sp, struct km_split_stats *ret, struct km_error *err)
{
	struct km_manifest m = {
		.major = KM_FORMAT_MAJOR,
		.minor = KM_FORMAT_MINOR,
		.chunker = sp->chunker,
		.created_by = (char *)"kvmotion " KM_VERSION,
		.created_unix = (uint64_t)time(NULL),
		.store_hint = (char *)km_store_path(sp->store),
	};
	const struct km_split_opts *o = &sp->o;
	int dirfd = sp->dirfd;
	uint64_t min_split = o->min_split_size ? o->min_split_size : KM_MIN_SPLIT_SIZE_DEFAULT;
	struct km_delta_summary ds;
	struct km_split_stats *stats = &sp->stats;
	_cleanup_free_ void *mbuf = NULL;
	char **names = NULL;
	size_t n_names = 0, mbuf_size = 0, n_taken = 0;
	bool delta_renamed = false;
	int r;

	if (sp->used || sp->failed)
		return -EINVAL;
	sp->used = true;
	r = km_image_is_split(dirfd);
	if (r != 0) {
		km_error_set(err, r > 0 ? "image is already split (%s exists)" : "%s: cannot check",
			     KM_MANIFEST_NAME);
		r = r > 0 ? -EEXIST : r;
		goto out;
	}
	r = km_list_files_at(dirfd, not_image_file, &names, &n_names);
	if (r < 0) {
		km_error_set(err, "cannot list the image directory: %s", strerror(-r));
		goto out;
	}
	m.files = calloc(n_names ? n_names : 1, sizeof(*m.files));
	if (!m.files) {
		r = -ENOMEM;
		goto out;
	}
	/* The followed files first: their delta bytes come first. */
	for (size_t i = 0; i < sp->n_followed; i++) {
		r = finish_followed(sp, sp->followed[i], err);
		if (r < 0)
			goto out;
	}
	for (size_t i = 0; i < n_names; i++) {
		struct km_file_entry *f = &m.files[i];
		struct followed *fl = find_followed(sp, names[i]);
		struct stat st;

		m.n_files = i + 1;
		if (fl) {
			/* The entry moves into the manifest, extents and all. */
			*f = fl->entry;
			fl->entry = (struct km_file_entry){ 0 };
			fl->entry.name = strdup(f->name); /* find_followed still looks */
			n_taken++;
			stats->files_split++;
			stats->bytes_split += f->size;
			if (!fl->entry.name) {
				r = -ENOMEM;
				goto out;
			}
			continue;
		}
		f->name = KM_TAKE_PTR(names[i]);
		if (fstatat(dirfd, f->name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			r = -errno;
			km_error_set(err, "%s: %s", f->name, strerror(-r));
			goto out;
		}
		f->size = (uint64_t)st.st_size;
		f->mode = st.st_mode & 07777;
		f->split = km_criu_is_pages_image(f->name) || f->size >= min_split;
		if (!f->split) {
			r = hash_file_at(dirfd, f->name, &f->sha256, NULL, NULL);
			if (r < 0) {
				km_error_set(err, "cannot read %s: %s", f->name, strerror(-r));
				goto out;
			}
			stats->files_kept++;
			continue;
		}
		r = split_one(&sp->sc, dirfd, f, sp->delta, &sp->delta_pos, stats, err);
		if (r < 0) {
			if (!err || !err->msg[0])
				km_error_set(err, "splitting %s: %s", f->name, strerror(-r));
			goto out;
		}
		stats->files_split++;
		stats->bytes_split += f->size;
	}
	if (n_taken != sp->n_followed) {
		km_error_set(err, "a file split while it was written is gone from the directory");
		r = -ESTALE;
		goto out;
	}

	r = km_delta_writer_finish(sp->delta, &ds);
	if (r < 0) {
		km_error_set(err, "writing the delta: %s", strerror(-r));
		goto out;
	}
	if (o->sync && fsync(sp->delta_fd) < 0) {
		r = -errno;
		km_error_set(err, "syncing the delta: %s", strerror(-r));
		goto out;
	}
	m.delta = (struct km_delta_ref){
		.name = (char *)KM_DELTA_NAME,
		.raw_size = ds.raw_size,
		.compressed_size = ds.compressed_size,
		.frames = ds.frames,
		.sha256 = ds.sha256,
		.image_id = sp->delta_params.image_id,
	};
	stats->delta_file_size = ds.compressed_size;
	for (size_t i = 0; i < m.n_files; i++)
		if (m.files[i].split)
			km_file_entry_extents_digest(&m.files[i], &ds.sha256,
						     &m.files[i].extents_sha256);

	r = km_manifest_encode(&m, &mbuf, &mbuf_size);
	if (r < 0)
		goto out;
	km_hash_buf(mbuf, mbuf_size, &stats->manifest_id);
	stats->manifest_size = mbuf_size;

	/* The store keeps what this image refers to until the root goes. */
	{
		char hex[KM_HASH_HEX_SIZE], root[KM_HASH_HEX_SIZE + 8];

		snprintf(root, sizeof(root), "%s.kmman", km_hash_to_hex(&stats->manifest_id, hex));
		r = km_store_root_write(sp->store, "manifests", root, mbuf, mbuf_size);
		if (r < 0) {
			km_error_set(err, "cannot record the manifest in the store: %s",
				     strerror(-r));
			goto out;
		}
	}

	/*
	 * Commit: delta, then manifest (its presence marks a split image),
	 * then remove the split files. Until the manifest is in place the
	 * directory is the original image plus a temporary file.
	 */
	if (sp->delta_unnamed) {
		char path[64];

		snprintf(path, sizeof(path), "/proc/self/fd/%d", sp->delta_fd);
		(void)unlinkat(dirfd, DELTA_TMP_NAME, 0);
		if (linkat(AT_FDCWD, path, dirfd, DELTA_TMP_NAME, AT_SYMLINK_FOLLOW) < 0) {
			r = -errno;
			km_error_set(err, "cannot name the delta: %s", strerror(-r));
			goto out;
		}
	}
	if (renameat(dirfd, DELTA_TMP_NAME, dirfd, KM_DELTA_NAME) < 0) {
		r = -errno;
		km_error_set(err, "cannot rename the delta into place: %s", strerror(-r));
		goto out;
	}
	delta_renamed = true;
	r = km_write_file_atomic_at(dirfd, KM_MANIFEST_NAME, mbuf, mbuf_size, o->sync);
	if (r < 0) {
		km_error_set(err, "cannot write %s: %s", KM_MANIFEST_NAME, strerror(-r));
		goto out;
	}
	for (size_t i = 0; i < m.n_files; i++)
		if (m.files[i].split && unlinkat(dirfd, m.files[i].name, 0) < 0) {
			/* The image stays valid: join skips nothing, rebuilds it. */
			r = -errno;
			km_error_set(err, "split, but cannot remove %s: %s", m.files[i].name,
				     strerror(-r));
			goto out;
		}
	if (o->sync)
		(void)fsync(dirfd);
	if (ret)
		*ret = *stats;
out:
	if (r < 0) {
		if (delta_renamed && km_image_is_split(dirfd) == 0)
			(void)unlinkat(dirfd, KM_DELTA_NAME, 0);
		(void)unlinkat(dirfd, DELTA_TMP_NAME, 0);
	}
	km_free_names(names, n_names);
	m.delta.name = NULL;
	m.created_by = NULL;
	m.store_hint = NULL;
	for (size_t i = 0; i < m.n_files; i++)
		km_file_entry_clear(&m.files[i]);
	free(m.files);
	return r;
}

int km_image_split(int dirfd, struct km_store *s, const struct km_split_opts *o,
		   struct km_split_stats *ret, struct km_error *err)
{
	struct km_split *sp = NULL;
	int r;

	r = km_split_begin(dirfd, s, o, &sp, err);
	if (r < 0)
		return r;
	r = km_split_commit(sp, ret, err);
	km_split_free(sp);
	return r;
}

/* ----------------------------------------------------------------- join */

/*
 * How join verifies files with a whole-file hash (1.0, 1.1; 1.2 files are
 * proven by their extents, see write_by_extents): every rebuilt file must
 * hash to its SHA-256 in the manifest, and every delta frame to its zstd
 * checksum. Chunks are copied
 * in the kernel without hashing each one on the way: the file hash covers
 * every byte of every chunk, so hashing both would double the CPU on the
 * restore's critical path for no extra assurance. When a file hash does
 * not match, each of its chunks is read back through km_store_get (which
 * verifies) to name the bad one. A missing chunk, or one of the wrong
 * size, is named as soon as it is met.
 *
 * How it keeps up: the file hash is serial and the longest task of a join,
 * so it runs on a thread of its own and should never wait. The calling
 * thread writes each file front to back (chunks copied in the kernel, the
 * delta decoded a frame at a time) and hands it over a window at a time;
 * the hash thread reads the window back through a mapping of the file (no
 * copy) while the next one is written. One writer: writes to one file
 * serialize on its inode lock anyway, and spin there.
 */

/* Bytes of a rebuilt file per hash step: small, so the hash starts early. */
#define JOIN_WINDOW (16u * 1024 * 1024)
#define HOLE_BUF_SIZE (1024u * 1024)

struct join_target {
	const struct km_file_entry *entry;
	char tmp_name[300];
	int fd;
	/* Late weights (late.h): late.task.n > 0 when pages were left out. */
	struct km_late_file late;
	char pagemap_name[300]; /* its pagemap-<pid>.img */
	const uint8_t *map; /* all of it, read-only: the hash reads it back */
	struct km_hasher *hasher;
};

/* A position in a file's extents: extent i, 'in' bytes into it, at file offset pos. */
struct extent_pos {
	size_t i;
	uint64_t in;
	uint64_t pos;
};

struct join_ctx {
	struct km_store *store;
	struct km_delta_cursor *delta;
	const char *delta_name;
	uint8_t *hole_buf; /* the hash thread's */
	pthread_mutex_t lock;
	struct km_error *err; /* first error wins, under lock */
	bool failed;
	uint64_t chunks_read;
};

static void join_fail(struct join_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void join_fail(struct join_ctx *c, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&c->lock);
	if (!c->failed && c->err) {
		va_start(ap, fmt);
		vsnprintf(c->err->msg, sizeof(c->err->msg), fmt, ap);
		va_end(ap);
	}
	c->failed = true;
	pthread_mutex_unlock(&c->lock);
}

/*
 * The next piece of a window that ends at 'end': the rest of the current
 * extent, cut at 'end' unless it is a chunk (chunks are copied whole, so a
 * window may run past 'end' by less than a chunk). 0 at the end.
 */
static uint64_t next_piece(const struct km_file_entry *f, const struct extent_pos *at,
			   uint64_t end)
{
	const struct km_extent *e;
	uint64_t len;

	if (at->i >= f->n_extents || at->pos >= end)
		return 0;
	e = &f->extents[at->i];
	len = e->length - at->in;
	return e->kind == KM_EXTENT_CHUNK ? len : KM_MIN(len, end - at->pos);
}

static void advance(const struct km_file_entry *f, struct extent_pos *at, uint64_t len)
{
	at->pos += len;
	at->in += len;
	if (at->in == f->extents[at->i].length) {
		at->i++;
		at->in = 0;
	}
}

/*
 * Bytes [from, from + n) of chunk extent e (at pos in the split file) into
 * t at dst; a failure names the chunk and where the file needs it.
 */
static int copy_chunk(struct join_ctx *c, const struct join_target *t, const struct km_extent *e,
		      uint64_t pos, uint64_t from, uint64_t n, uint64_t dst)
{
	char hex[KM_HASH_HEX_SIZE];
	int r = km_store_copy_range_to(c->store, &e->id, e->length, from, n, t->fd, dst);

	if (r < 0)
		join_fail(c, "chunk %s (%s at offset %llu): %s", km_hash_to_hex(&e->id, hex),
			  t->entry->name, (unsigned long long)pos,
			  r == -ENOENT	  ? "missing from the store"
			  : r == -EBADMSG ? "of the wrong size in the store"
					  : strerror(-r));
	return r;
}

static int write_piece(struct join_ctx *c, const struct join_target *t, const struct km_extent *e,
		       uint64_t in, uint64_t len, uint64_t pos)
{
	int r;

	switch (e->kind) {
	case KM_EXTENT_ZERO:
		return 0; /* a hole: ftruncate made it */
	case KM_EXTENT_CHUNK:
		r = copy_chunk(c, t, e, pos, 0, e->length, pos);
		if (r < 0)
			return r;
		c->chunks_read++;
		return 0;
	case KM_EXTENT_DELTA:
		while (len > 0) {
			struct km_error err = { { 0 } };
			const uint8_t *p;
			size_t n;

			r = km_delta_cursor_get(c->delta, e->delta_offset + in, &p, &n, &err);
			if (r < 0) {
				join_fail(c, "delta %s: %s", c->delta_name, err.msg);
				return r;
			}
			n = (size_t)KM_MIN((uint64_t)n, len);
			r = km_pwrite_full(t->fd, p, n, (off_t)pos);
			if (r < 0) {
				join_fail(c, "writing delta bytes into %s: %s", t->entry->name,
					  strerror(-r));
				return r;
			}
			in += n;
			pos += n;
			len -= n;
		}
		return 0;
	}
	return -EINVAL;
}

struct verify_job {
	struct join_ctx *ctx;
	struct join_target *target;
	struct extent_pos from;
	uint64_t end;
};

/* Runs on the single hash thread, windows in file order. */
static int verify_step(void *arg)
{
	struct verify_job *j = arg;
	const struct km_file_entry *f = j->target->entry;
	struct extent_pos at = j->from;
	uint64_t len;

	while ((len = next_piece(f, &at, j->end)) > 0) {
		if (f->extents[at.i].kind != KM_EXTENT_ZERO) {
			km_hasher_update(j->target->hasher, j->target->map + at.pos, len);
			advance(f, &at, len);
			continue;
		}
		/* A hole: read() gives its zeros; a mapping would allocate pages. */
		while (len > 0) {
			size_t want = (size_t)KM_MIN((uint64_t)HOLE_BUF_SIZE, len);
			ssize_t k = km_pread_full(j->target->fd, j->ctx->hole_buf, want,
						  (off_t)at.pos);

			if (k < 0 || (size_t)k != want) {
				join_fail(j->ctx, "reading back %s: %s", f->name,
					  k < 0 ? strerror((int)-k) : "short read");
				return k < 0 ? (int)k : -EIO;
			}
			km_hasher_update(j->target->hasher, j->ctx->hole_buf, want);
			advance(f, &at, want);
			len -= want;
		}
	}
	return 0;
}

static void targets_close(struct join_target *targets, size_t n, int dirfd, bool unlink_tmp)
{
	for (size_t i = 0; i < n; i++) {
		struct join_target *t = &targets[i];

		km_unmap_file(t->map, t->entry->size);
		if (t->fd >= 0)
			close(t->fd);
		if (unlink_tmp && t->tmp_name[0])
			(void)unlinkat(dirfd, t->tmp_name, 0);
		km_late_file_clear(&t->late);
		km_hasher_free(t->hasher);
		t->map = NULL;
		t->fd = -1;
		t->hasher = NULL;
	}
}

/* Bytes of t's rebuilt file: without the pages left out for late weights. */
static uint64_t target_size(const struct join_target *t)
{
	return t->late.task.n ? t->late.kept_pages * KM_LATE_PAGE_SIZE : t->entry->size;
}

static int target_create(int dirfd, struct join_target *t, struct km_error *err)
{
	const struct km_file_entry *f = t->entry;
	uint64_t nonce, size;
	void *map;
	int r;

	if (getrandom(&nonce, sizeof(nonce), 0) != sizeof(nonce))
		return -EIO;
	snprintf(t->tmp_name, sizeof(t->tmp_name), ".%.200s.%016llx.kmjoin", f->name,
		 (unsigned long long)nonce);
	t->fd = openat(dirfd, t->tmp_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (t->fd < 0) {
		r = -errno;
		t->tmp_name[0] = 0;
		km_error_set(err, "cannot create %s: %s", f->name, strerror(-r));
		return r;
	}
	t->hasher = km_hasher_new();
	if (!t->hasher)
		return -ENOMEM;
	/* Zero extents stay holes: nothing to write, they read as zeros. */
	size = target_size(t);
	if (ftruncate(t->fd, (off_t)size) < 0) {
		r = -errno;
		km_error_set(err, "cannot size %s to %llu bytes: %s", f->name,
			     (unsigned long long)size, strerror(-r));
		return r;
	}
	/* Only the whole-file hash reads the file back. */
	if (f->size == 0 || km_hash_is_null(&f->sha256))
		return 0;
	if (f->size > SIZE_MAX)
		return -EFBIG;
	/* Our own O_EXCL file, never truncated while mapped. */
	map = mmap(NULL, (size_t)f->size, PROT_READ, MAP_SHARED, t->fd, 0);
	if (map == MAP_FAILED) {
		r = -errno;
		km_error_set(err, "cannot map %s: %s", f->name, strerror(-r));
		return r;
	}
	t->map = map;
	return 0;
}

struct delta_range {
	uint64_t offset, length;
};

static int cmp_range(const void *a, const void *b)
{
	const struct delta_range *x = a, *y = b;

	return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* The format's promise, checked: no two delta extents share a byte. */
static int check_delta_ranges(const struct km_manifest *m, struct km_error *err)
{
	_cleanup_free_ struct delta_range *v = NULL;
	size_t n = 0, cap = 0;

	for (size_t i = 0; i < m->n_files; i++)
		if (m->files[i].split)
			cap += m->files[i].n_extents;
	v = calloc(cap ? cap : 1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (size_t i = 0; i < m->n_files; i++)
		for (size_t j = 0; m->files[i].split && j < m->files[i].n_extents; j++)
			if (m->files[i].extents[j].kind == KM_EXTENT_DELTA)
				v[n++] = (struct delta_range){ m->files[i].extents[j].delta_offset,
							       m->files[i].extents[j].length };
	qsort(v, n, sizeof(*v), cmp_range);
	for (size_t i = 1; i < n; i++)
		if (v[i - 1].offset + v[i - 1].length > v[i].offset) {
			km_error_set(err, "%s: delta ranges overlap", KM_MANIFEST_NAME);
			return -EBADMSG;
		}
	return 0;
}

/* Kept files must be there and be what the manifest says. */
static int check_kept(int dirfd, const struct km_manifest *m, struct km_error *err)
{
	for (size_t i = 0; i < m->n_files; i++) {
		const struct km_file_entry *f = &m->files[i];
		struct km_hash h;
		uint64_t size;
		int r;

		if (f->split)
			continue;
		r = hash_file_at(dirfd, f->name, &h, &size, NULL);
		if (r < 0) {
			km_error_set(err, "image file %s: %s", f->name, strerror(-r));
			return r;
		}
		if (size != f->size || !km_hash_equal(&h, &f->sha256)) {
			km_error_set(err, "image file %s does not match the manifest (%s)", f->name,
				     size != f->size ? "size differs" : "SHA-256 differs");
			return -EBADMSG;
		}
	}
	return 0;
}

static int open_delta(int dirfd, const struct km_manifest *m, struct km_delta_reader **ret,
		      struct km_error *err)
{
	_cleanup_close_ int fd = -1;
	struct km_delta_reader *r = NULL;
	const struct km_hash *image_id;
	int k;

	fd = openat(dirfd, m->delta.name, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		k = -errno;
		km_error_set(err, "delta %s: %s", m->delta.name, strerror(-k));
		return k;
	}
	k = km_delta_reader_open(fd, &r, err);
	if (k < 0) {
		km_error_prefix(err, "delta %s", m->delta.name);
		return k;
	}
	/*
	 * Identity, not content: the content is checked while the files are
	 * written (every frame by its checksum; for 1.2 files the whole delta
	 * by its SHA-256 on another thread, for 1.1 files each rebuilt file by
	 * its own SHA-256).
	 */
	image_id = km_delta_reader_image_id(r);
	if (km_delta_reader_raw_size(r) != m->delta.raw_size ||
	    km_delta_reader_frames(r) != m->delta.frames ||
	    (!km_hash_is_null(&m->delta.image_id) &&
	     (!image_id || !km_hash_equal(image_id, &m->delta.image_id)))) {
		km_error_set(err, "delta %s does not belong to this manifest (%s differs)",
			     m->delta.name,
			     km_delta_reader_raw_size(r) != m->delta.raw_size ? "size" : "image id");
		km_delta_reader_free(r);
		return -EBADMSG;
	}
	*ret = r;
	return 0;
}

/*
 * A rebuilt file did not hash right: find out why, reading each of its
 * chunks back with verification, then the delta.
 */
static int diagnose(struct km_store *s, const struct km_manifest *m,
		    const struct km_file_entry *f, struct km_delta_reader *delta,
		    struct km_error *err)
{
	_cleanup_free_ uint8_t *buf = malloc(m->chunker.max_size ? m->chunker.max_size : 1);
	uint64_t off = 0;
	struct km_hash h;

	if (!buf)
		return -ENOMEM;
	for (size_t i = 0; i < f->n_extents; off += f->extents[i].length, i++) {
		const struct km_extent *e = &f->extents[i];
		char hex[KM_HASH_HEX_SIZE];
		size_t got = 0;
		int r;

		if (e->kind != KM_EXTENT_CHUNK)
			continue;
		r = km_store_get(s, &e->id, buf, m->chunker.max_size, &got);
		if (r == 0 && got == e->length)
			continue;
		km_error_set(err, "chunk %s (%s at offset %llu): %s", km_hash_to_hex(&e->id, hex),
			     f->name, (unsigned long long)off,
			     r == -EBADMSG ? "corrupt in the store (content does not match its SHA-256)"
			     : r == 0      ? "of the wrong size in the store"
					   : strerror(-r));
		return -EBADMSG;
	}
	if (km_delta_reader_sha256(delta, &h, NULL) == 0 && !km_hash_equal(&h, &m->delta.sha256)) {
		km_error_set(err, "delta %s is damaged (its SHA-256 differs from the manifest's)",
			     m->delta.name);
		return -EBADMSG;
	}
	km_error_set(err, "rebuilt %s does not match its SHA-256 in the manifest", f->name);
	return -EBADMSG;
}

/*
 * Files with an extent digest (1.2) and no whole-file hash: their bytes are
 * proven piece by piece, before any is written. Every chunk they name is
 * opened (missing, or not exactly its length: refused) and hashed unless the
 * store's record vouches for its file (store.h); the extent lists were
 * checked against their digests when the manifest was read; the delta file
 * is hashed against the manifest while the files are written, and each of
 * its frames is checked by its zstd checksum as it is decoded.
 */

/* One chunk reference, for checking each distinct chunk once and naming the first user. */
struct chunk_ref {
	struct km_hash id;
	uint64_t length;
	const struct km_file_entry *file;
	uint64_t offset;
	size_t order; /* in file order, over all files */
};

static int cmp_chunk_ref(const void *a, const void *b)
{
	const struct chunk_ref *x = a, *y = b;
	int c = memcmp(x->id.b, y->id.b, KM_HASH_SIZE);

	if (c)
		return c;
	return x->order < y->order ? -1 : x->order > y->order;
}

struct check_ctx {
	struct km_store *store;
	pthread_mutex_t lock;
	const struct chunk_ref *bad; /* the first failure in file order, under lock */
	int bad_error;
	uint64_t hashed, recorded; /* under lock */
};

struct check_job {
	struct check_ctx *ctx;
	const struct chunk_ref *refs; /* distinct ids */
	size_t n;
};

static int check_job_run(void *arg)
{
	struct check_job *j = arg;
	struct check_ctx *c = j->ctx;
	uint64_t hashed = 0, recorded = 0;

	for (size_t i = 0; i < j->n; i++) {
		const struct chunk_ref *ref = &j->refs[i];
		bool trusted = false;
		int fd, r;

		fd = km_store_open_chunk(c->store, &ref->id, ref->length, &trusted);
		r = fd < 0 ? fd : 0;
		if (r == 0 && trusted) {
			recorded++;
		} else if (r == 0) {
			r = km_store_check_chunk(c->store, &ref->id, fd);
			hashed++;
		}
		if (fd >= 0)
			close(fd);
		if (r < 0) {
			pthread_mutex_lock(&c->lock);
			if (!c->bad || ref->order < c->bad->order) {
				c->bad = ref;
				c->bad_error = r;
			}
			pthread_mutex_unlock(&c->lock);
		}
	}
	pthread_mutex_lock(&c->lock);
	c->hashed += hashed;
	c->recorded += recorded;
	pthread_mutex_unlock(&c->lock);
	return 0;
}

#define CHECK_JOB_CHUNKS 64

/*
 * Checks every chunk the digest-verified files name, each distinct one
 * once, on 'pool'; names the first bad one in file order.
 */
static int check_chunks(struct km_store *s, struct km_workpool *pool, const struct km_manifest *m,
			struct km_join_stats *stats, struct km_error *err)
{
	_cleanup_free_ struct chunk_ref *refs = NULL;
	_cleanup_free_ struct check_job *jobs = NULL;
	struct check_ctx ctx = { .store = s };
	size_t n = 0, n_unique = 0, n_jobs = 0;
	int r = 0;

	for (size_t i = 0; i < m->n_files; i++)
		if (m->files[i].split && km_hash_is_null(&m->files[i].sha256))
			n += m->files[i].n_extents;
	refs = calloc(n ? n : 1, sizeof(*refs));
	if (!refs)
		return -ENOMEM;
	n = 0;
	for (size_t i = 0; i < m->n_files; i++) {
		const struct km_file_entry *f = &m->files[i];
		uint64_t off = 0;

		if (!f->split || !km_hash_is_null(&f->sha256))
			continue;
		for (size_t j = 0; j < f->n_extents; off += f->extents[j].length, j++)
			if (f->extents[j].kind == KM_EXTENT_CHUNK) {
				refs[n] = (struct chunk_ref){ .id = f->extents[j].id,
							      .length = f->extents[j].length,
							      .file = f,
							      .offset = off,
							      .order = n };
				n++;
			}
	}
	/* Distinct ids, each with its first use (the lowest order sorts first). */
	qsort(refs, n, sizeof(*refs), cmp_chunk_ref);
	for (size_t i = 0; i < n; i++) {
		if (n_unique && km_hash_equal(&refs[n_unique - 1].id, &refs[i].id)) {
			if (refs[i].length != refs[n_unique - 1].length) {
				char hex[KM_HASH_HEX_SIZE];

				km_error_set(err, "%s: chunk %s is listed with two lengths",
					     KM_MANIFEST_NAME, km_hash_to_hex(&refs[i].id, hex));
				return -EBADMSG;
			}
			continue;
		}
		refs[n_unique++] = refs[i];
	}
	jobs = calloc(n_unique / CHECK_JOB_CHUNKS + 1, sizeof(*jobs));
	if (!jobs)
		return -ENOMEM;
	pthread_mutex_init(&ctx.lock, NULL);
	for (size_t i = 0; i < n_unique && r == 0; i += CHECK_JOB_CHUNKS) {
		jobs[n_jobs] = (struct check_job){ .ctx = &ctx, .refs = refs + i,
						   .n = KM_MIN((size_t)CHECK_JOB_CHUNKS, n_unique - i) };
		r = km_workpool_submit(pool, check_job_run, &jobs[n_jobs++]);
	}
	{
		int w = km_workpool_wait(pool);

		if (r == 0)
			r = w;
	}
	stats->chunks_hashed = ctx.hashed;
	stats->chunks_recorded = ctx.recorded;
	if (r == 0 && ctx.bad) {
		char hex[KM_HASH_HEX_SIZE];

		r = ctx.bad_error;
		km_error_set(err, "chunk %s (%s at offset %llu): %s",
			     km_hash_to_hex(&ctx.bad->id, hex), ctx.bad->file->name,
			     (unsigned long long)ctx.bad->offset,
			     r == -ENOENT  ? "missing from the store" :
			     r == -EBADMSG ? "corrupt in the store (not its length, or its "
					     "content does not match its SHA-256)" :
					     strerror(-r));
	}
	pthread_mutex_destroy(&ctx.lock);
	/* What was hashed just now need not be hashed by the next join. */
	km_store_verified_flush(s);
	return r;
}

/* A delta extent of a digest-verified file: where its bytes go. */
struct delta_piece {
	uint64_t delta_offset, length;
	int fd;
	uint64_t pos;
	const char *name;
};

static int cmp_piece(const void *a, const void *b)
{
	const struct delta_piece *x = a, *y = b;

	return x->delta_offset < y->delta_offset ? -1 : x->delta_offset > y->delta_offset;
}

struct delta_write {
	struct delta_piece *pieces; /* by delta_offset, never overlapping */
	size_t n;
	int error;
	const char *failed; /* file name, with error */
};

/* Decoded frames, from the decode thread: their bytes go where the extents say. */
static int delta_sink(void *userdata, uint64_t raw_offset, const void *data, size_t n)
{
	struct delta_write *w = userdata;
	uint64_t end = raw_offset + n;
	size_t lo = 0, hi = w->n;

	/* The first piece that ends after raw_offset. */
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (w->pieces[mid].delta_offset + w->pieces[mid].length <= raw_offset)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (size_t i = lo; i < w->n && w->pieces[i].delta_offset < end; i++) {
		const struct delta_piece *p = &w->pieces[i];
		uint64_t from = KM_MAX(p->delta_offset, raw_offset);
		uint64_t to = KM_MIN(p->delta_offset + p->length, end);
		int r = km_pwrite_full(p->fd, (const uint8_t *)data + (from - raw_offset),
				       (size_t)(to - from), (off_t)(p->pos + (from - p->delta_offset)));

		if (r < 0) {
			w->error = r;
			w->failed = p->name;
			return r;
		}
	}
	return 0;
}

struct decode_job {
	struct km_delta_reader *delta;
	struct delta_write *write;
	int result;
	struct km_error err;
};

static int decode_job_run(void *arg)
{
	struct decode_job *j = arg;

	j->result = km_delta_reader_decode(j->delta, 1, delta_sink, j->write, &j->err);
	return 0;
}

struct delta_hash_job {
	struct km_delta_reader *delta;
	struct km_hash got;
	int result;
	struct km_error err;
};

static int delta_hash_run(void *arg)
{
	struct delta_hash_job *j = arg;

	j->result = km_delta_reader_sha256(j->delta, &j->got, &j->err);
	return 0;
}

/* A delta extent of a file with late weights: it lies in one kept run. */
static int delta_moved(void *userdata, uint64_t off, uint64_t new_off, uint64_t n)
{
	struct delta_piece *p = userdata;

	if (off != p->pos || n != p->length)
		return -EBADMSG;
	p->pos = new_off;
	return 0;
}

struct chunk_part {
	struct join_ctx *ctx;
	const struct join_target *target;
	const struct km_extent *e;
	uint64_t pos; /* of the extent in the split file */
};

/* The kept part of a chunk of a file with late weights (a run's first or last page). */
static int copy_chunk_part(void *userdata, uint64_t off, uint64_t new_off, uint64_t n)
{
	struct chunk_part *cp = userdata;

	return copy_chunk(cp->ctx, cp->target, cp->e, cp->pos, off - cp->pos, n, new_off);
}

/*
 * Writes the digest-verified files: chunks copied in the kernel on the
 * calling thread while the delta is decoded (and its bytes written) on
 * 'pool', in parallel.
 */
static int write_by_extents(struct join_ctx *ctx, struct km_workpool *pool,
			    struct km_delta_reader *delta, struct join_target *targets,
			    size_t n_targets, struct km_error *err)
{
	_cleanup_free_ struct delta_piece *pieces = NULL;
	struct delta_write w = { 0 };
	struct decode_job dj = { .delta = delta, .write = &w };
	size_t n = 0;
	int r = 0;

	for (size_t i = 0; i < n_targets; i++)
		if (km_hash_is_null(&targets[i].entry->sha256))
			n += targets[i].entry->n_extents;
	pieces = calloc(n ? n : 1, sizeof(*pieces));
	if (!pieces)
		return -ENOMEM;
	n = 0;
	for (size_t i = 0; i < n_targets; i++) {
		const struct km_file_entry *f = targets[i].entry;
		uint64_t pos = 0;

		if (!km_hash_is_null(&f->sha256))
			continue;
		for (size_t j = 0; j < f->n_extents; pos += f->extents[j].length, j++) {
			const struct km_extent *e = &f->extents[j];

			if (e->kind != KM_EXTENT_DELTA)
				continue;
			pieces[n] = (struct delta_piece){ e->delta_offset, e->length, targets[i].fd,
							  pos, f->name };
			if (targets[i].late.task.n) {
				/* Never left out (only chunk bytes are): one kept part. */
				r = km_late_file_map(&targets[i].late, pos, e->length, delta_moved,
						     &pieces[n]);
				if (r < 0) {
					km_error_set(err, "%s: delta bytes at %llu in a page left out",
						     f->name, (unsigned long long)pos);
					return r;
				}
			}
			n++;
		}
	}
	qsort(pieces, n, sizeof(*pieces), cmp_piece);
	w.pieces = pieces;
	w.n = n;
	if (n > 0) {
		r = km_workpool_submit(pool, decode_job_run, &dj);
		if (r < 0)
			return r;
	}
	for (size_t i = 0; i < n_targets && r == 0; i++) {
		const struct km_file_entry *f = targets[i].entry;
		uint64_t pos = 0;

		if (!km_hash_is_null(&f->sha256))
			continue;
		for (size_t j = 0; j < f->n_extents && r == 0; pos += f->extents[j].length, j++) {
			struct chunk_part cp = { ctx, &targets[i], &f->extents[j], pos };

			if (f->extents[j].kind != KM_EXTENT_CHUNK)
				continue;
			if (targets[i].late.task.n)
				r = km_late_file_map(&targets[i].late, pos, f->extents[j].length,
						     copy_chunk_part, &cp);
			else
				r = write_piece(ctx, &targets[i], &f->extents[j], 0,
						f->extents[j].length, pos);
		}
	}
	{
		int k = km_workpool_wait(pool);

		if (r == 0)
			r = k;
	}
	if (r < 0)
		return r;
	if (n > 0 && dj.result < 0) {
		if (w.error) {
			km_error_set(err, "writing delta bytes into %s: %s", w.failed,
				     strerror(-w.error));
			return w.error;
		}
		km_error_set(err, "delta %s: %s", ctx->delta_name, dj.err.msg);
		return dj.result;
	}
	return 0;
}

/* ------------------------------------------------------- late weights */

static bool not_pagemap(const char *name)
{
	return fnmatch("pagemap-*.img", name, 0) != 0;
}

static bool not_late_orig(const char *name)
{
	return !is_late_orig(name);
}

/*
 * Lays out each 1.2 pages file named by a process's pagemap with its
 * weights left out (late.h); a target without weights stays as it is.
 */
static int late_prepare(int dirfd, struct join_target *targets, size_t n_targets,
			struct km_error *err)
{
	char **names = NULL;
	size_t n = 0;
	int r;

	r = km_list_files_at(dirfd, not_pagemap, &names, &n);
	if (r < 0) {
		km_error_set(err, "cannot list the image directory: %s", strerror(-r));
		return r;
	}
	for (size_t i = 0; i < n && r == 0; i++) {
		struct km_criu_pagemap pm = { 0 };
		char pages_name[64];
		int pid;

		if (sscanf(names[i], "pagemap-%d.img", &pid) != 1 || pid <= 0)
			continue;
		r = km_criu_pagemap_read(dirfd, names[i], &pm, err);
		if (r < 0)
			break;
		snprintf(pages_name, sizeof(pages_name), "pages-%u.img", pm.pages_id);
		for (size_t j = 0; j < n_targets && r == 0; j++) {
			struct join_target *t = &targets[j];

			if (strcmp(t->entry->name, pages_name) != 0 ||
			    !km_hash_is_null(&t->entry->sha256) || t->late.task.n)
				continue;
			r = km_late_file_build(t->entry, &pm, KM_LATE_MIN_RUN_PAGES, &t->late, err);
			if (r == 0 && t->late.task.n) {
				t->late.task.pid = pid;
				t->late.task.pages_name = strdup(t->entry->name);
				snprintf(t->pagemap_name, sizeof(t->pagemap_name), "%s", names[i]);
				if (!t->late.task.pages_name)
					r = -ENOMEM;
			}
		}
		km_criu_pagemap_clear(&pm);
	}
	km_free_names(names, n);
	return r;
}

/*
 * Puts the rewritten pagemaps in place, each original kept under
 * LATE_ORIG_PREFIX first: at every step km_image_late_undo can go back.
 */
static int late_commit_pagemaps(int dirfd, struct join_target *targets, size_t n_targets, bool sync,
				struct km_error *err)
{
	for (size_t i = 0; i < n_targets; i++) {
		struct join_target *t = &targets[i];
		char orig[320];

		if (!t->late.task.n)
			continue;
		snprintf(orig, sizeof(orig), LATE_ORIG_PREFIX "%s", t->pagemap_name);
		if (linkat(dirfd, t->pagemap_name, dirfd, orig, 0) < 0) {
			int r = -errno;

			km_error_set(err, "cannot keep %s as %s: %s", t->pagemap_name, orig,
				     strerror(-r));
			return r;
		}
	}
	for (size_t i = 0; i < n_targets; i++) {
		struct join_target *t = &targets[i];
		_cleanup_free_ void *buf = NULL;
		size_t size = 0;
		int r;

		if (!t->late.task.n)
			continue;
		r = km_criu_pagemap_encode(&t->late.pagemap, &buf, &size);
		if (r == 0)
			r = km_write_file_atomic_at(dirfd, t->pagemap_name, buf, size, sync);
		if (r < 0) {
			km_error_set(err, "cannot write %s without its weights' pages: %s",
				     t->pagemap_name, strerror(-r));
			return r;
		}
	}
	return 0;
}

/* Moves the targets' tasks into a new plan. */
static int late_plan_take(struct join_target *targets, size_t n_targets, size_t n_late,
			  struct km_late_plan **ret)
{
	struct km_late_plan *p = calloc(1, sizeof(*p));

	if (!p || !(p->tasks = calloc(n_late, sizeof(*p->tasks)))) {
		free(p);
		return -ENOMEM;
	}
	for (size_t i = 0; i < n_targets; i++)
		if (targets[i].late.task.n) {
			p->tasks[p->n++] = targets[i].late.task;
			targets[i].late.task = (struct km_late_task){ 0 };
		}
	*ret = p;
	return 0;
}

int km_image_late_undo(int dirfd, struct km_error *err)
{
	struct km_manifest *m = NULL;
	char **names = NULL;
	size_t n = 0;
	int r;

	r = km_list_files_at(dirfd, not_late_orig, &names, &n);
	if (r < 0) {
		km_error_set(err, "cannot list the image directory: %s", strerror(-r));
		return r;
	}
	if (n == 0)
		goto out;
	r = km_image_read_manifest(dirfd, &m, err);
	if (r < 0) {
		km_error_prefix(err, "image with late weights (%s)", names[0]);
		goto out;
	}
	/* The rebuilt pages files first: a pages file beside an original pagemap would be garbage. */
	for (size_t i = 0; i < m->n_files; i++)
		if (m->files[i].split && unlinkat(dirfd, m->files[i].name, 0) < 0 && errno != ENOENT) {
			r = -errno;
			km_error_set(err, "cannot remove %s: %s", m->files[i].name, strerror(-r));
			goto out;
		}
	for (size_t i = 0; i < n; i++)
		if (renameat(dirfd, names[i], dirfd, names[i] + strlen(LATE_ORIG_PREFIX)) < 0) {
			r = -errno;
			km_error_set(err, "cannot put %s back: %s", names[i], strerror(-r));
			goto out;
		}
	(void)fsync(dirfd);
out:
	km_manifest_free(m);
	km_free_names(names, n);
	return r;
}

int km_image_join(int dirfd, struct km_store *s, const struct km_join_opts *o,
		  struct km_join_stats *ret, struct km_error *err)
{
	struct km_manifest *m = NULL;
	struct km_delta_reader *delta = NULL;
	struct km_workpool *hash_pool = NULL, *pool = NULL;
	struct join_ctx ctx = { .store = s, .err = err };
	struct km_join_stats stats = { 0 };
	struct delta_hash_job dh = { 0 };
	_cleanup_free_ struct join_target *targets = NULL;
	_cleanup_free_ struct verify_job *vjobs = NULL;
	size_t n_targets = 0, n_vjobs = 0, n_late = 0;
	bool by_extents = false, late_committing = false;
	int r;

	pthread_mutex_init(&ctx.lock, NULL);
	if (o->late)
		*o->late = NULL;
	/* A restore with late weights that never ended (see late.h): its directory first. */
	r = km_image_late_undo(dirfd, err);
	if (r < 0)
		goto out;
	r = km_image_read_manifest(dirfd, &m, err);
	if (r < 0)
		goto out;
	r = open_delta(dirfd, m, &delta, err);
	if (r < 0)
		goto out;
	r = check_delta_ranges(m, err);
	if (r < 0)
		goto out;
	r = check_kept(dirfd, m, err);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < m->n_files; i++)
		if (m->files[i].split && km_hash_is_null(&m->files[i].sha256))
			by_extents = true;
	if (by_extents) {
		/* Every chunk proven before a byte is written; the delta's hash runs beside the writes. */
		r = km_workpool_new(o->threads, 0, &pool);
		if (r < 0)
			goto out;
		km_store_verified_reload(s);
		r = check_chunks(s, pool, m, &stats, err);
		if (r < 0)
			goto out;
		dh.delta = delta;
		r = km_workpool_submit(pool, delta_hash_run, &dh);
		if (r < 0)
			goto out;
	}

	targets = calloc(m->n_files ? m->n_files : 1, sizeof(*targets));
	ctx.hole_buf = malloc(HOLE_BUF_SIZE);
	if (!targets || !ctx.hole_buf) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < m->n_files; i++) {
		const struct km_file_entry *f = &m->files[i];

		if (!f->split)
			continue;
		targets[n_targets].entry = f;
		targets[n_targets].fd = -1;
		n_targets++;
		/* Windows end past JOIN_WINDOW only by less than a chunk. */
		if (!km_hash_is_null(&f->sha256))
			n_vjobs += f->size / JOIN_WINDOW + 1;
		for (size_t j = 0; j < f->n_extents; j++) {
			const struct km_extent *e = &f->extents[j];

			if (e->kind == KM_EXTENT_DELTA)
				stats.bytes_from_delta += e->length;
			else if (e->kind == KM_EXTENT_ZERO)
				stats.bytes_zero += e->length;
			else
				stats.bytes_from_store += e->length;
		}
	}
	vjobs = calloc(n_vjobs ? n_vjobs : 1, sizeof(*vjobs));
	if (!vjobs) {
		r = -ENOMEM;
		goto out;
	}
	if (o->late && by_extents) {
		r = late_prepare(dirfd, targets, n_targets, err);
		if (r < 0)
			goto out;
		for (size_t i = 0; i < n_targets; i++)
			if (targets[i].late.task.n) {
				n_late++;
				stats.bytes_late += targets[i].late.task.bytes;
			}
	}
	for (size_t i = 0; i < n_targets; i++) {
		r = target_create(dirfd, &targets[i], err);
		if (r < 0)
			goto out;
	}
	ctx.delta_name = m->delta.name;
	r = km_delta_cursor_new(delta, &ctx.delta);
	if (r == 0)
		r = km_workpool_new(1, (unsigned)KM_MIN(n_vjobs + 1, (size_t)1024), &hash_pool);
	if (r < 0)
		goto out;

	/* Digest-verified files: chunks and delta in parallel. */
	if (by_extents) {
		r = write_by_extents(&ctx, pool, delta, targets, n_targets, err);
		if (r == 0 && dh.result < 0) {
			r = dh.result;
			km_error_set(err, "delta %s: %s", m->delta.name, dh.err.msg);
		} else if (r == 0 && !km_hash_equal(&dh.got, &m->delta.sha256)) {
			r = -EBADMSG;
			km_error_set(err, "delta %s is damaged (its SHA-256 differs from the manifest's)",
				     m->delta.name);
		}
		if (r < 0) {
			ctx.failed = true;
			goto out;
		}
	}

	/* Files with a whole-file hash (1.0, 1.1): front to back, a window at a time; the hash follows. */
	n_vjobs = 0;
	for (size_t i = 0; i < n_targets && r == 0; i++) {
		struct join_target *t = &targets[i];
		const struct km_file_entry *f = t->entry;
		struct extent_pos at = { 0 };

		if (km_hash_is_null(&f->sha256))
			continue;

		while (at.i < f->n_extents && r == 0) {
			struct verify_job *v = &vjobs[n_vjobs++];
			uint64_t end = at.pos + JOIN_WINDOW, len;

			*v = (struct verify_job){ .ctx = &ctx, .target = t, .from = at };
			while (r == 0 && (len = next_piece(f, &at, end)) > 0) {
				const struct km_extent *e = &f->extents[at.i];

				r = write_piece(&ctx, t, e, at.in, len, at.pos);
				/* Faults taken here spare the hash thread's time. */
				if (r == 0 && e->kind != KM_EXTENT_ZERO)
					km_prefault(t->map + at.pos, len);
				advance(f, &at, len);
			}
			v->end = at.pos;
			if (r == 0)
				r = km_workpool_submit(hash_pool, verify_step, v);
		}
	}
	{
		int w = km_workpool_wait(hash_pool);

		if (r == 0)
			r = w;
	}
	if (r < 0) {
		if (!ctx.failed && err)
			km_error_set(err, "rebuilding the image: %s", strerror(-r));
		goto out;
	}
	stats.chunks_read = ctx.chunks_read;

	for (size_t i = 0; i < n_targets; i++) {
		struct join_target *t = &targets[i];
		struct km_hash h;

		km_hasher_final(t->hasher, &h);
		if (!km_hash_is_null(&t->entry->sha256) && !km_hash_equal(&h, &t->entry->sha256)) {
			r = diagnose(s, m, t->entry, delta, err);
			goto out;
		}
		if (o->sync && fsync(t->fd) < 0) {
			r = -errno;
			km_error_set(err, "syncing %s: %s", t->entry->name, strerror(-r));
			goto out;
		}
		if (fchmod(t->fd, t->entry->mode) < 0) {
			r = -errno;
			km_error_set(err, "%s: %s", t->entry->name, strerror(-r));
			goto out;
		}
		stats.bytes_written += target_size(t);
	}
	if (n_late) {
		/* From here a failure goes back to the split image (at out). */
		late_committing = true;
		r = late_commit_pagemaps(dirfd, targets, n_targets, o->sync, err);
		if (r < 0)
			goto out;
	}

	/* Everything verified: put the files in place. */
	for (size_t i = 0; i < n_targets; i++) {
		struct join_target *t = &targets[i];

		if (renameat(dirfd, t->tmp_name, dirfd, t->entry->name) < 0) {
			r = -errno;
			km_error_set(err, "cannot rename rebuilt %s into place: %s", t->entry->name,
				     strerror(-r));
			goto out;
		}
		t->tmp_name[0] = 0;
		stats.files_joined++;
	}
	if (o->sync)
		(void)fsync(dirfd);
	if (n_late) {
		/* The manifest and the delta stay: km_image_late_undo goes back to them. */
		r = late_plan_take(targets, n_targets, n_late, o->late);
		if (r < 0) {
			km_error_set(err, "%s", strerror(-r));
			goto out;
		}
	} else if (!o->keep_split) {
		/* Manifest last: a directory with a manifest is still joinable. */
		(void)unlinkat(dirfd, m->delta.name, 0);
		if (unlinkat(dirfd, KM_MANIFEST_NAME, 0) < 0 && errno != ENOENT) {
			r = -errno;
			km_error_set(err, "cannot remove %s: %s", KM_MANIFEST_NAME, strerror(-r));
			goto out;
		}
		if (o->sync)
			(void)fsync(dirfd);
	}
	if (ret)
		*ret = stats;
out:
	/* Original pagemaps put back, rebuilt pages files (renamed or not) removed. */
	if (r < 0 && late_committing)
		(void)km_image_late_undo(dirfd, NULL);
	/* Jobs still queued use the targets and the delta. */
	km_workpool_free(pool);
	km_workpool_free(hash_pool);
	if (targets)
		targets_close(targets, n_targets, dirfd, true);
	free(ctx.hole_buf);
	km_delta_cursor_free(ctx.delta);
	km_delta_reader_free(delta);
	km_manifest_free(m);
	pthread_mutex_destroy(&ctx.lock);
	return r;
}

/* ------------------------------------------------------------------- gc */

static int gc_refs(struct km_store_gc *gc, const char *kind, const char *name, const void *p,
		   size_t n, void *userdata)
{
	struct km_error *err = userdata;
	int r;

	if (strcmp(kind, "manifests") == 0) {
		struct km_manifest *m = NULL;

		r = km_manifest_decode(p, n, &m, err);
		if (r < 0)
			return r;
		for (size_t i = 0; i < m->n_files; i++)
			for (size_t j = 0; j < m->files[i].n_extents; j++)
				if (m->files[i].extents[j].kind == KM_EXTENT_CHUNK)
					km_store_gc_keep(gc, &m->files[i].extents[j].id);
		km_manifest_free(m);
		return 0;
	}
	if (strcmp(kind, "indexes") == 0) {
		struct km_weights_index *idx = NULL;

		r = km_weights_index_decode(p, n, &idx, err);
		if (r < 0)
			return r;
		for (size_t i = 0; i < idx->n_files; i++)
			for (size_t j = 0; j < idx->files[i].n_extents; j++)
				if (idx->files[i].extents[j].kind == KM_EXTENT_CHUNK)
					km_store_gc_keep(gc, &idx->files[i].extents[j].id);
		km_weights_index_free(idx);
		return 0;
	}
	km_error_set(err, "unknown root kind %s (%s)", kind, name);
	return -EBADMSG;
}

int km_image_store_gc(struct km_store *s, struct km_store_gc_stats *ret, struct km_error *err)
{
	return km_store_gc_run(s, gc_refs, err, ret, err);
}
