/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "known.h"

#include <stdlib.h>
#include <string.h>

#include "format.h"

struct km_known {
	struct km_known_chunk *chunks;
	uint32_t n;
	/* Open addressing, linear probing, capacity a power of two. */
	uint32_t *by_id; /* chunk index + 1, 0 = empty */
	uint32_t *by_length;
	size_t cap;
};

static size_t slot_of_id(const struct km_hash *id, size_t cap)
{
	uint64_t k;

	memcpy(&k, id->b, sizeof(k)); /* a SHA-256 is uniform already */
	return (size_t)k & (cap - 1);
}

static size_t slot_of_length(uint32_t length, size_t cap)
{
	/* Lengths cluster: spread them (Fibonacci hashing). */
	return (size_t)(((uint64_t)length * 0x9E3779B97F4A7C15ull) >> 32) & (cap - 1);
}

/* The index of chunk 'id', adding it if new. */
static uint32_t add_chunk(struct km_known *k, const struct km_hash *id, uint32_t length)
{
	size_t i = slot_of_id(id, k->cap);
	struct km_known_chunk *c;

	for (; k->by_id[i]; i = (i + 1) & (k->cap - 1))
		if (km_hash_equal(&k->chunks[k->by_id[i] - 1].id, id))
			return k->by_id[i] - 1;
	c = &k->chunks[k->n];
	*c = (struct km_known_chunk){
		.id = *id, .length = length, .next = KM_KNOWN_NONE, .same_length = KM_KNOWN_NONE
	};
	k->by_id[i] = ++k->n;
	return k->n - 1;
}

static void add_length(struct km_known *k, uint32_t c)
{
	uint32_t length = k->chunks[c].length;
	size_t i = slot_of_length(length, k->cap);

	for (; k->by_length[i]; i = (i + 1) & (k->cap - 1)) {
		struct km_known_chunk *head = &k->chunks[k->by_length[i] - 1];

		if (head->length == length) {
			k->chunks[c].same_length = k->by_length[i] - 1;
			k->by_length[i] = c + 1;
			return;
		}
	}
	k->by_length[i] = c + 1;
}

static void add_file(struct km_known *k, const struct km_file_entry *f)
{
	uint32_t prev = KM_KNOWN_NONE;
	uint64_t off = 0;

	for (size_t j = 0; j < f->n_extents; off += f->extents[j].length, j++) {
		const struct km_extent *e = &f->extents[j];
		uint32_t c;

		if (e->kind != KM_EXTENT_CHUNK || e->length == 0 ||
		    e->length > KM_CHUNK_MAX_LIMIT) {
			prev = KM_KNOWN_NONE;
			continue;
		}
		c = add_chunk(k, &e->id, (uint32_t)e->length);
		/*
		 * A chunk that ends the file may have been cut there by the end
		 * of its input, not by content: an image holding the same bytes
		 * followed by more would be cut elsewhere. Never predict it.
		 */
		if (prev != KM_KNOWN_NONE && k->chunks[prev].next == KM_KNOWN_NONE &&
		    off + e->length < f->size)
			k->chunks[prev].next = c;
		prev = c;
	}
}

struct load_ctx {
	struct km_store *store;
	const struct km_chunker_params *params;
	struct km_weights_index **idx;
	size_t n_idx, cap_idx;
	uint64_t n_extents;
	struct km_error *err;
};

static int load_one(const char *name, void *userdata)
{
	struct load_ctx *l = userdata;
	_cleanup_free_ void *buf = NULL;
	struct km_weights_index *idx = NULL;
	size_t n;
	int r;

	r = km_store_root_read(l->store, "indexes", name, &buf, &n);
	if (r < 0) {
		km_error_set(l->err, "weights index %s: %s", name, strerror(-r));
		return r;
	}
	r = km_weights_index_decode(buf, n, &idx, l->err);
	if (r < 0) {
		km_error_prefix(l->err, "weights index %s", name);
		return r;
	}
	if (idx->chunker.min_size != l->params->min_size ||
	    idx->chunker.avg_size != l->params->avg_size ||
	    idx->chunker.max_size != l->params->max_size) {
		km_weights_index_free(idx);
		return 0;
	}
	if (l->n_idx == l->cap_idx) {
		size_t cap = l->cap_idx ? 2 * l->cap_idx : 4;
		struct km_weights_index **x = reallocarray(l->idx, cap, sizeof(*x));

		if (!x) {
			km_weights_index_free(idx);
			return -ENOMEM;
		}
		l->idx = x;
		l->cap_idx = cap;
	}
	l->idx[l->n_idx++] = idx;
	for (size_t i = 0; i < idx->n_files; i++)
		l->n_extents += idx->files[i].n_extents;
	return 0;
}

int km_known_load(struct km_store *s, const struct km_chunker_params *params, struct km_known **ret,
		  struct km_error *err)
{
	struct load_ctx l = { .store = s, .params = params, .err = err };
	struct km_known *k;
	int r;

	k = calloc(1, sizeof(*k));
	if (!k)
		return -ENOMEM;
	r = km_store_root_foreach(s, "indexes", load_one, &l);
	if (r < 0)
		goto out;
	if (l.n_extents >= UINT32_MAX / 4) {
		km_error_set(err, "weights indexes list too many chunks (%llu)",
			     (unsigned long long)l.n_extents);
		r = -EFBIG;
		goto out;
	}
	/* Load factor at most 1/2. */
	for (k->cap = 16; k->cap < 2 * l.n_extents; k->cap *= 2)
		;
	k->chunks = malloc((l.n_extents ? l.n_extents : 1) * sizeof(*k->chunks));
	k->by_id = calloc(k->cap, sizeof(*k->by_id));
	k->by_length = calloc(k->cap, sizeof(*k->by_length));
	if (!k->chunks || !k->by_id || !k->by_length) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < l.n_idx; i++)
		for (size_t j = 0; j < l.idx[i]->n_files; j++)
			add_file(k, &l.idx[i]->files[j]);
	for (uint32_t c = 0; c < k->n; c++)
		add_length(k, c);
out:
	for (size_t i = 0; i < l.n_idx; i++)
		km_weights_index_free(l.idx[i]);
	free(l.idx);
	if (r < 0) {
		km_known_free(k);
		return r;
	}
	*ret = k;
	return 0;
}

void km_known_free(struct km_known *k)
{
	if (!k)
		return;
	free(k->chunks);
	free(k->by_id);
	free(k->by_length);
	free(k);
}

uint32_t km_known_count(const struct km_known *k)
{
	return k->n;
}

uint32_t km_known_find(const struct km_known *k, uint64_t length)
{
	size_t i;

	if (k->n == 0 || length == 0 || length > UINT32_MAX)
		return KM_KNOWN_NONE;
	for (i = slot_of_length((uint32_t)length, k->cap); k->by_length[i];
	     i = (i + 1) & (k->cap - 1))
		if (k->chunks[k->by_length[i] - 1].length == length)
			return k->by_length[i] - 1;
	return KM_KNOWN_NONE;
}

uint32_t km_known_find_id(const struct km_known *k, const struct km_hash *id)
{
	if (k->n == 0)
		return KM_KNOWN_NONE;
	for (size_t i = slot_of_id(id, k->cap); k->by_id[i]; i = (i + 1) & (k->cap - 1))
		if (km_hash_equal(&k->chunks[k->by_id[i] - 1].id, id))
			return k->by_id[i] - 1;
	return KM_KNOWN_NONE;
}

const struct km_known_chunk *km_known_get(const struct km_known *k, uint32_t i)
{
	return &k->chunks[i];
}
