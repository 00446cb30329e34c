/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "image.h"

#include <fcntl.h>
#include <libgen.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "scan.h"

struct seed_file {
	struct km_file_entry *entry;
	struct km_seed_stats *stats;
};

static int seed_emit(void *userdata, const uint8_t *base, const struct km_scan_chunk *chunks,
		     size_t n)
{
	struct seed_file *sf = userdata;

	for (size_t i = 0; i < n; i++) {
		const struct km_scan_chunk *c = &chunks[i];
		struct km_extent e = { .length = c->length };
		int r;

		if (c->kind == KM_SCAN_ZERO) {
			e.kind = KM_EXTENT_ZERO;
			sf->stats->bytes_zero += c->length;
		} else {
			e.kind = KM_EXTENT_CHUNK;
			e.id = c->id;
			sf->stats->chunks++;
			if (c->kind == KM_SCAN_ADDED) {
				sf->stats->chunks_added++;
				sf->stats->bytes_added += c->length;
			}
		}
		r = km_file_entry_add_extent(sf->entry, &e);
		if (r < 0)
			return r;
	}
	return 0;
}

static int seed_one(const struct km_scanner *sc, const char *path, struct km_file_entry *entry,
		    struct km_seed_stats *stats, struct km_error *err)
{
	_cleanup_close_ int fd = -1;
	_cleanup_free_ char *copy = NULL;
	struct seed_file sf = { .entry = entry, .stats = stats };
	const uint8_t *map = NULL;
	struct stat st;
	int r;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		km_error_set(err, "cannot open model file %s: %s", path, strerror(-r));
		return r;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		km_error_set(err, "model file %s is not a regular file", path);
		return -EINVAL;
	}
	copy = strdup(path);
	if (!copy)
		return -ENOMEM;
	entry->name = strdup(basename(copy));
	if (!entry->name)
		return -ENOMEM;
	entry->size = (uint64_t)st.st_size;
	entry->mode = st.st_mode & 07777;
	entry->split = true;

	r = km_map_file(fd, entry->size, &map);
	if (r < 0) {
		km_error_set(err, "cannot map model file %s: %s", path, strerror(-r));
		return r;
	}
	if (entry->size == 0)
		km_hash_buf("", 0, &entry->sha256);
	else
		r = km_scan(sc, map, entry->size, path, seed_emit, &sf, &entry->sha256, err);
	km_unmap_file(map, entry->size);
	if (r < 0)
		return r;
	stats->files++;
	stats->bytes += entry->size;
	return 0;
}

int km_seed(struct km_store *s, const char *name, const char *const *paths, size_t n_paths,
	    unsigned threads, struct km_seed_stats *ret, struct km_error *err)
{
	struct km_weights_index idx = {
		.major = KM_FORMAT_MAJOR,
		.minor = KM_FORMAT_MINOR,
		.chunker = *km_store_chunker_params(s),
		.created_unix = (uint64_t)time(NULL),
	};
	struct km_workpool *pool = NULL, *hash_pool = NULL;
	struct km_seed_stats stats = { 0 };
	_cleanup_free_ void *buf = NULL;
	size_t buf_size;
	char root[300];
	int r;

	if (!km_filename_is_plain(name) || strlen(name) > 200) {
		km_error_set(err, "invalid weights index name '%s'", name);
		return -EINVAL;
	}
	idx.name = (char *)name;
	idx.files = calloc(n_paths ? n_paths : 1, sizeof(*idx.files));
	if (!idx.files)
		return -ENOMEM;
	r = km_workpool_new(threads, 0, &pool);
	if (r == 0)
		r = km_workpool_new(1, 4, &hash_pool);
	if (r < 0)
		goto out;

	{
		struct km_scanner sc = {
			.params = &idx.chunker,
			.pool = pool,
			.file_hash_pool = hash_pool,
			.store = s,
			.put = true,
		};

		for (size_t i = 0; i < n_paths; i++) {
			r = seed_one(&sc, paths[i], &idx.files[i], &stats, err);
			idx.n_files = i + 1;
			if (r < 0)
				goto out;
			for (size_t j = 0; j < i; j++)
				if (strcmp(idx.files[j].name, idx.files[i].name) == 0) {
					km_error_set(err, "two model files are named %s",
						     idx.files[i].name);
					r = -EINVAL;
					goto out;
				}
		}
	}

	r = km_weights_index_encode(&idx, &buf, &buf_size);
	if (r < 0)
		goto out;
	snprintf(root, sizeof(root), "%s.kmidx", name);
	r = km_store_root_write(s, "indexes", root, buf, buf_size);
	if (r < 0) {
		km_error_set(err, "cannot write weights index %s: %s", root, strerror(-r));
		goto out;
	}
	if (ret)
		*ret = stats;
out:
	km_workpool_free(pool);
	km_workpool_free(hash_pool);
	for (size_t i = 0; i < idx.n_files; i++)
		km_file_entry_clear(&idx.files[i]);
	free(idx.files);
	return r;
}
