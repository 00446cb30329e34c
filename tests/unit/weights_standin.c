/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * TEST STAND-IN for plugin/weights.c, which is written in another branch.
 * It implements only what engine_api.c needs, in the simplest way the
 * header allows, so that kme_weights_open can be built and tested before
 * the two branches meet:
 *   km_weights_dir, km_weights_layout, and km_weights_resolve for
 *   "index:NAME" refs (model-file refs: -ENOSYS).
 * No .ok records, no id recorded in the index, no verification beyond
 * hashing the file it writes. plugin/meson.build links it into
 * libkvmotion-engine only while plugin/weights.c does not exist; delete it
 * once weights.c is merged.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>

#include "weights.h"

int km_weights_dir(const struct km_store *s, const char *dir, char *buf, size_t bufsize)
{
	int n = dir && dir[0] ? snprintf(buf, bufsize, "%s", dir)
			      : snprintf(buf, bufsize, "%s/" KM_WEIGHTS_DIRNAME, km_store_path(s));

	return n < 0 || (size_t)n >= bufsize ? -ENAMETOOLONG : 0;
}

int km_weights_layout(const struct km_weights_index *idx, struct km_weights_file_layout **ret,
		      size_t *ret_n, uint64_t *ret_size)
{
	struct km_weights_file_layout *l = calloc(idx->n_files ? idx->n_files : 1, sizeof(*l));
	uint64_t off = 0, end = 0;

	if (!l)
		return -ENOMEM;
	for (size_t i = 0; i < idx->n_files; i++) {
		off = (end + KM_WEIGHTS_ALIGN - 1) / KM_WEIGHTS_ALIGN * KM_WEIGHTS_ALIGN;
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

static int write_weights(struct km_store *s, const struct km_weights_index *idx,
			 const struct km_weights_file_layout *l, int fd, uint64_t size)
{
	size_t bufsize = km_store_chunker_params(s)->max_size;
	_cleanup_free_ uint8_t *buf = malloc(bufsize);
	int r;

	if (!buf)
		return -ENOMEM;
	if (ftruncate(fd, (off_t)size) < 0)
		return -errno;
	for (size_t i = 0; i < idx->n_files; i++) {
		uint64_t off = l[i].offset;

		for (size_t j = 0; j < idx->files[i].n_extents; j++) {
			const struct km_extent *x = &idx->files[i].extents[j];
			size_t n;

			if (x->kind == KM_EXTENT_CHUNK) {
				r = km_store_get(s, &x->id, buf, bufsize, &n);
				if (r < 0)
					return r;
				if (n != x->length)
					return -EBADMSG;
				r = km_pwrite_full(fd, buf, n, (off_t)off);
				if (r < 0)
					return r;
			}
			off += x->length;
		}
	}
	return 0;
}

static int hash_fd(int fd, uint64_t size, struct km_hash *ret)
{
	struct km_hasher *h = km_hasher_new();
	_cleanup_free_ uint8_t *buf = malloc(1 << 20);
	uint64_t off = 0;

	if (!h || !buf) {
		km_hasher_free(h);
		return -ENOMEM;
	}
	while (off < size) {
		ssize_t k = km_pread_full(fd, buf, KM_MIN((uint64_t)1 << 20, size - off), (off_t)off);

		if (k <= 0) {
			km_hasher_free(h);
			return k < 0 ? (int)k : -EIO;
		}
		km_hasher_update(h, buf, (size_t)k);
		off += (uint64_t)k;
	}
	km_hasher_final(h, ret);
	km_hasher_free(h);
	return 0;
}

int km_weights_resolve(struct km_store *s, const char *ref, const char *weights_dir, bool sync,
		       struct km_weights_info *ret, char *index_name, size_t index_name_size,
		       struct km_error *err)
{
	_cleanup_free_ void *ibuf = NULL;
	_cleanup_free_ struct km_weights_file_layout *l = NULL;
	struct km_weights_index *idx = NULL;
	char dir[4096], tmp[4200], hex[KM_HASH_HEX_SIZE], root[300];
	struct km_weights_info info = { 0 };
	_cleanup_close_ int fd = -1;
	size_t n;
	int r;

	if (strncmp(ref, "index:", 6) != 0) {
		km_error_set(err, "%s: the weights stand-in resolves only index:NAME refs", ref);
		return -ENOSYS;
	}
	snprintf(root, sizeof(root), "%s.kmidx", ref + 6);
	r = km_store_root_read(s, "indexes", root, &ibuf, &n);
	if (r < 0) {
		km_error_set(err, "no weights index %s in the store", ref + 6);
		return r;
	}
	r = km_weights_index_decode(ibuf, n, &idx, err);
	if (r < 0)
		return r;
	r = km_weights_layout(idx, &l, &n, &info.size);
	if (r == 0)
		r = km_weights_dir(s, weights_dir, dir, sizeof(dir));
	if (r == 0 && mkdir(dir, 0755) < 0 && errno != EEXIST)
		r = -errno;
	if (r < 0)
		goto out;
	snprintf(tmp, sizeof(tmp), "%s/.standin-XXXXXX", dir);
	fd = mkstemp(tmp);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	r = write_weights(s, idx, l, fd, info.size);
	if (r == 0)
		r = hash_fd(fd, info.size, &info.id);
	if (r == 0 && sync && fsync(fd) < 0)
		r = -errno;
	if (r == 0 && fchmod(fd, 0444) < 0)
		r = -errno;
	if (r == 0) {
		int k = snprintf(info.path, sizeof(info.path), "%s/%s" KM_WEIGHTS_SUFFIX, dir,
				 km_hash_to_hex(&info.id, hex));

		/* The same bytes under the same name: keep the one already there. */
		if (k < 0 || (size_t)k >= sizeof(info.path))
			r = -ENAMETOOLONG;
		else if (renameat2(AT_FDCWD, tmp, AT_FDCWD, info.path, RENAME_NOREPLACE) == 0)
			info.written = true;
		else if (errno != EEXIST)
			r = -errno;
	}
	if (!info.written)
		unlink(tmp);
	if (r < 0)
		goto out;
	info.bytes_hashed = info.size;
	if (snprintf(index_name, index_name_size, "%s", ref + 6) >= (int)index_name_size) {
		r = -ENAMETOOLONG;
		goto out;
	}
	*ret = info;
out:
	if (r < 0 && err && !err->msg[0])
		km_error_set(err, "weights stand-in: %s: %s", ref, strerror(-r));
	km_weights_index_free(idx);
	return r;
}
