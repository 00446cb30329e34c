/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_TAR_H
#define KM_TAR_H

/*
 * Tests only: tar archives built in memory, one ustar member at a time, for
 * the suites that read checkpoint archives (archive, transport).
 */

#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

struct tarbuf {
	uint8_t *p;
	size_t n, cap;
};

static inline void tb_put(struct tarbuf *t, const void *p, size_t n)
{
	if (n == 0)
		return; /* memcpy may not take NULL, even for nothing */
	if (t->n + n > t->cap) {
		t->cap = (t->n + n) * 2 + 4096;
		t->p = realloc(t->p, t->cap);
		ck_assert_ptr_nonnull(t->p);
	}
	memcpy(t->p + t->n, p, n);
	t->n += n;
}

static inline void tb_pad(struct tarbuf *t)
{
	static const uint8_t zero[512];

	if (t->n % 512)
		tb_put(t, zero, 512 - t->n % 512);
}

/* One member: a ustar header (name split into prefix/name when given) and its data. */
static inline void tb_entry(struct tarbuf *t, const char *prefix, const char *name, char type,
			    const void *data, size_t len)
{
	uint8_t h[512] = { 0 };
	unsigned sum = 0;

	snprintf((char *)h, 100, "%s", name);
	snprintf((char *)h + 100, 8, "%07o", 0644);
	snprintf((char *)h + 108, 8, "%07o", 0);
	snprintf((char *)h + 116, 8, "%07o", 0);
	snprintf((char *)h + 124, 12, "%011zo", len);
	snprintf((char *)h + 136, 12, "%011o", 0);
	h[156] = (uint8_t)type;
	memcpy(h + 257,
	       "ustar\0"
	       "00",
	       8);
	if (prefix)
		snprintf((char *)h + 345, 155, "%s", prefix);
	memset(h + 148, ' ', 8);
	for (int i = 0; i < 512; i++)
		sum += h[i];
	snprintf((char *)h + 148, 8, "%06o", sum);
	tb_put(t, h, 512);
	tb_put(t, data, len);
	tb_pad(t);
}

static inline void tb_end(struct tarbuf *t)
{
	static const uint8_t zero[1024];

	tb_put(t, zero, sizeof(zero));
}

/* A manifest of one file: chunk ids[0], a zero run, chunk ids[1]. */
static inline void *km_test_manifest(const struct km_hash *ids, size_t *ret_n)
{
	struct km_extent ext[3] = {
		{ .kind = KM_EXTENT_CHUNK, .length = 4096, .id = ids[0] },
		{ .kind = KM_EXTENT_ZERO, .length = 4096 },
		{ .kind = KM_EXTENT_CHUNK, .length = 4096, .id = ids[1] },
	};
	struct km_file_entry fe = { .name = (char *)"pages-1.img",
				    .size = 3 * 4096,
				    .mode = 0600,
				    .split = true,
				    .extents = ext,
				    .n_extents = 3 };
	struct km_manifest m = { .major = KM_FORMAT_MAJOR,
				 .minor = KM_FORMAT_MINOR,
				 .chunker = KM_CHUNKER_PARAMS_DEFAULT,
				 .files = &fe,
				 .n_files = 1,
				 .delta = { .name = (char *)KM_DELTA_NAME } };
	void *buf = NULL;

	/* 1.2: a split file carries the digest of its extents and the delta's hash */
	km_file_entry_extents_digest(&fe, &m.delta.sha256, &fe.extents_sha256);
	ck_assert_int_eq(km_manifest_encode(&m, &buf, ret_n), 0);
	return buf;
}

#endif
