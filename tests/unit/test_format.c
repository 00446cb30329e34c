/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <check.h>

#include "km-check.h"
#include <endian.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

static struct km_manifest *sample_manifest(void)
{
	struct km_manifest *m = calloc(1, sizeof(*m));
	struct km_extent e;

	m->major = KM_FORMAT_MAJOR;
	m->minor = KM_FORMAT_MINOR;
	m->chunker = KM_CHUNKER_PARAMS_DEFAULT;
	m->delta.name = strdup(KM_DELTA_NAME);
	m->delta.raw_size = 1000;
	m->delta.compressed_size = 600;
	m->delta.frames = 1;
	memset(m->delta.sha256.b, 0xaa, KM_HASH_SIZE);
	m->created_by = strdup("kvmotion test");
	m->created_unix = 1234;
	m->n_files = 2;
	m->files = calloc(2, sizeof(*m->files));
	m->files[0].name = strdup("inventory.img");
	m->files[0].size = 42;
	m->files[0].mode = 0600;
	memset(m->files[0].sha256.b, 1, KM_HASH_SIZE);
	m->files[1].name = strdup("pages-1.img");
	m->files[1].size = 4096 + 1000 + 300;
	m->files[1].mode = 0644;
	m->files[1].split = true;
	memset(m->files[1].sha256.b, 2, KM_HASH_SIZE);
	e = (struct km_extent){ .kind = KM_EXTENT_CHUNK, .length = 4096 };
	memset(e.id.b, 3, KM_HASH_SIZE);
	ck_assert_int_eq(km_file_entry_add_extent(&m->files[1], &e), 0);
	e = (struct km_extent){ .kind = KM_EXTENT_DELTA, .length = 600, .delta_offset = 0 };
	ck_assert_int_eq(km_file_entry_add_extent(&m->files[1], &e), 0);
	e = (struct km_extent){ .kind = KM_EXTENT_DELTA, .length = 400, .delta_offset = 600 };
	ck_assert_int_eq(km_file_entry_add_extent(&m->files[1], &e), 0);
	e = (struct km_extent){ .kind = KM_EXTENT_ZERO, .length = 100 };
	ck_assert_int_eq(km_file_entry_add_extent(&m->files[1], &e), 0);
	e = (struct km_extent){ .kind = KM_EXTENT_ZERO, .length = 200 };
	ck_assert_int_eq(km_file_entry_add_extent(&m->files[1], &e), 0);
	return m;
}

START_TEST(test_format_extents_merge)
{
	struct km_manifest *m = sample_manifest();

	/* chunk, delta (two contiguous merged), zero (two merged) */
	ck_assert_uint_eq(m->files[1].n_extents, 3);
	ck_assert_uint_eq(m->files[1].extents[1].length, 1000);
	ck_assert_uint_eq(m->files[1].extents[2].length, 300);
	km_manifest_free(m);
}
END_TEST

START_TEST(test_format_manifest_round_trip)
{
	struct km_manifest *m = sample_manifest(), *d = NULL;
	struct km_error err = { { 0 } };
	void *buf;
	size_t n;

	ck_assert_int_eq(km_manifest_encode(m, &buf, &n), 0);
	ck_assert_int_eq(memcmp(buf, KM_MAGIC_MANIFEST, KM_MAGIC_SIZE), 0);
	ck_assert_int_eq(km_manifest_decode(buf, n, &d, &err), 0);
	ck_assert_uint_eq(d->n_files, 2);
	ck_assert_str_eq(d->files[0].name, "inventory.img");
	ck_assert(!d->files[0].split);
	ck_assert_uint_eq(d->files[0].mode, 0600);
	ck_assert(d->files[1].split);
	ck_assert_uint_eq(d->files[1].n_extents, 3);
	ck_assert_int_eq(d->files[1].extents[0].kind, KM_EXTENT_CHUNK);
	ck_assert(km_hash_equal(&d->files[1].extents[0].id, &m->files[1].extents[0].id));
	ck_assert_int_eq(d->files[1].extents[1].kind, KM_EXTENT_DELTA);
	ck_assert_uint_eq(d->files[1].extents[1].delta_offset, 0);
	ck_assert(km_hash_equal(&d->delta.sha256, &m->delta.sha256));
	ck_assert_str_eq(d->created_by, "kvmotion test");
	ck_assert_uint_eq(d->created_unix, 1234);
	km_manifest_free(d);
	km_manifest_free(m);
	free(buf);
}
END_TEST

/* Re-encodes m after 'mutate' and expects decode to fail with 'expect'. */
static void expect_decode_error(void (*mutate)(struct km_manifest *), int expect,
				const char *msg_part)
{
	struct km_manifest *m = sample_manifest(), *d = NULL;
	struct km_error err = { { 0 } };
	void *buf;
	size_t n;

	mutate(m);
	ck_assert_int_eq(km_manifest_encode(m, &buf, &n), 0);
	ck_assert_int_eq(km_manifest_decode(buf, n, &d, &err), expect);
	ck_assert_ptr_null(d);
	ck_assert_msg(strstr(err.msg, msg_part), "error '%s' lacks '%s'", err.msg, msg_part);
	km_manifest_free(m);
	free(buf);
}

static void set_major_2(struct km_manifest *m)
{
	m->major = 2;
}
static void bad_sum(struct km_manifest *m)
{
	m->files[1].size += 1;
}
static void delta_outside(struct km_manifest *m)
{
	m->delta.raw_size = 500;
}
static void dup_name(struct km_manifest *m)
{
	free(m->files[0].name);
	m->files[0].name = strdup("pages-1.img");
}
static void bad_name(struct km_manifest *m)
{
	free(m->files[0].name);
	m->files[0].name = strdup("../etc/passwd");
}
static void bad_chunker(struct km_manifest *m)
{
	m->chunker.avg_size = 3000;
}

START_TEST(test_format_manifest_rejects_bad)
{
	expect_decode_error(set_major_2, -EPROTONOSUPPORT, "major version");
	expect_decode_error(bad_sum, -EBADMSG, "extents cover");
	expect_decode_error(delta_outside, -EBADMSG, "outside the delta");
	expect_decode_error(dup_name, -EBADMSG, "twice");
	expect_decode_error(bad_name, -EBADMSG, "invalid name");
	expect_decode_error(bad_chunker, -EBADMSG, "chunker");
}
END_TEST

/* The 1.2 form of the sample: its split file proven by an extent digest only. */
static void to_digest(struct km_manifest *m)
{
	memset(&m->files[1].sha256, 0, sizeof(m->files[1].sha256));
	km_file_entry_extents_digest(&m->files[1], &m->delta.sha256, &m->files[1].extents_sha256);
}

/* The digest as docs/formats.md spells it, written out independently. */
static void digest_by_the_doc(const struct km_file_entry *f, const struct km_hash *delta_sha,
			      struct km_hash *ret)
{
	uint8_t buf[4096];
	size_t n = 0;
	uint32_t l32 = htole32((uint32_t)strlen(f->name));
	uint64_t l64;

	memcpy(buf + n, "KMXTNTS\n", 8);
	n += 8;
	memcpy(buf + n, &l32, 4);
	n += 4;
	memcpy(buf + n, f->name, strlen(f->name));
	n += strlen(f->name);
	l64 = htole64(f->size);
	memcpy(buf + n, &l64, 8);
	n += 8;
	l64 = htole64(f->n_extents);
	memcpy(buf + n, &l64, 8);
	n += 8;
	for (size_t i = 0; i < f->n_extents; i++) {
		buf[n++] = (uint8_t)f->extents[i].kind;
		l64 = htole64(f->extents[i].length);
		memcpy(buf + n, &l64, 8);
		n += 8;
		if (f->extents[i].kind == KM_EXTENT_CHUNK) {
			memcpy(buf + n, f->extents[i].id.b, KM_HASH_SIZE);
			n += KM_HASH_SIZE;
		} else if (f->extents[i].kind == KM_EXTENT_DELTA) {
			l64 = htole64(f->extents[i].delta_offset);
			memcpy(buf + n, &l64, 8);
			n += 8;
		}
	}
	memcpy(buf + n, delta_sha->b, KM_HASH_SIZE);
	n += KM_HASH_SIZE;
	km_hash_buf(buf, n, ret);
}

START_TEST(test_format_manifest_extent_digest)
{
	struct km_manifest *m = sample_manifest(), *d = NULL;
	struct km_error err = { { 0 } };
	struct km_hash want;
	void *buf;
	size_t n;

	to_digest(m);
	digest_by_the_doc(&m->files[1], &m->delta.sha256, &want);
	ck_assert(km_hash_equal(&want, &m->files[1].extents_sha256));
	ck_assert_int_eq(km_manifest_encode(m, &buf, &n), 0);
	ck_assert_int_eq(km_manifest_decode(buf, n, &d, &err), 0);
	ck_assert_uint_eq(d->minor, 2);
	ck_assert(km_hash_is_null(&d->files[1].sha256));
	ck_assert(km_hash_equal(&d->files[1].extents_sha256, &want));
	/* The kept file keeps its whole-file hash. */
	ck_assert(!km_hash_is_null(&d->files[0].sha256));
	ck_assert(km_hash_is_null(&d->files[0].extents_sha256));
	km_manifest_free(d);
	km_manifest_free(m);
	free(buf);
}
END_TEST

/* A delta range that moves: both ranges still add up to the size. */
static void digest_then_shift_delta(struct km_manifest *m)
{
	to_digest(m);
	m->files[1].extents[1].length -= 100;
	m->files[1].extents[2].length += 100;
}
static void digest_then_other_chunk(struct km_manifest *m)
{
	to_digest(m);
	m->files[1].extents[0].id.b[31] ^= 1;
}
static void digest_then_other_delta(struct km_manifest *m)
{
	to_digest(m);
	m->delta.sha256.b[0] ^= 1;
}
static void split_without_any_hash(struct km_manifest *m)
{
	memset(&m->files[1].sha256, 0, sizeof(m->files[1].sha256));
}
static void v11_split_with_digest_only(struct km_manifest *m)
{
	to_digest(m);
	m->minor = 1;
}
static void kept_without_hash(struct km_manifest *m)
{
	to_digest(m);
	memset(&m->files[0].sha256, 0, sizeof(m->files[0].sha256));
}

START_TEST(test_format_manifest_digest_rejects)
{
	expect_decode_error(digest_then_shift_delta, -EBADMSG, "do not match their digest");
	expect_decode_error(digest_then_other_chunk, -EBADMSG, "do not match their digest");
	expect_decode_error(digest_then_other_delta, -EBADMSG, "do not match their digest");
	expect_decode_error(split_without_any_hash, -EBADMSG, "no SHA-256 or extent digest");
	/* Until 1.1 a split file must have its whole-file hash. */
	expect_decode_error(v11_split_with_digest_only, -EBADMSG, "has no SHA-256");
	expect_decode_error(kept_without_hash, -EBADMSG, "inventory.img has no SHA-256");
}
END_TEST

START_TEST(test_format_manifest_rejects_foreign_and_truncated)
{
	struct km_manifest *m = sample_manifest(), *d = NULL;
	struct km_error err = { { 0 } };
	uint8_t *buf;
	size_t n;

	ck_assert_int_eq(km_manifest_encode(m, (void **)&buf, &n), 0);
	/* every truncation point fails cleanly */
	for (size_t k = 0; k < n; k++) {
		int r = km_manifest_decode(buf, k, &d, &err);

		ck_assert_msg(r == -EBADMSG || r == -ENOTRECOVERABLE, "cut at %zu gave %d", k, r);
		ck_assert_ptr_null(d);
	}
	/* trailing garbage */
	{
		uint8_t *big = malloc(n + 3);

		memcpy(big, buf, n);
		memset(big + n, 0x55, 3);
		ck_assert_int_eq(km_manifest_decode(big, n + 3, &d, &err), -EBADMSG);
		free(big);
	}
	/* a weights index is not a manifest */
	buf[0] ^= 0xff;
	ck_assert_int_eq(km_manifest_decode(buf, n, &d, &err), -ENOTRECOVERABLE);
	ck_assert(strstr(err.msg, "not a kvmotion manifest"));
	/* hostile record length */
	buf[0] ^= 0xff;
	{
		uint32_t le = htole32(0xfffffff0u);

		memcpy(buf + KM_MAGIC_SIZE, &le, 4);
		ck_assert_int_eq(km_manifest_decode(buf, n, &d, &err), -EBADMSG);
	}
	free(buf);
	km_manifest_free(m);
}
END_TEST

START_TEST(test_format_index_round_trip)
{
	struct km_weights_index idx = {
		.major = KM_FORMAT_MAJOR,
		.minor = KM_FORMAT_MINOR,
		.name = (char *)"model",
		.chunker = KM_CHUNKER_PARAMS_DEFAULT,
	};
	struct km_file_entry f = { .name = (char *)"model.safetensors", .size = 5000, .split = true };
	struct km_extent e = { .kind = KM_EXTENT_CHUNK, .length = 4000 };
	struct km_weights_index *d = NULL;
	struct km_error err = { { 0 } };
	struct km_manifest *m = NULL;
	void *buf;
	size_t n;

	memset(e.id.b, 9, KM_HASH_SIZE);
	ck_assert_int_eq(km_file_entry_add_extent(&f, &e), 0);
	e = (struct km_extent){ .kind = KM_EXTENT_ZERO, .length = 1000 };
	ck_assert_int_eq(km_file_entry_add_extent(&f, &e), 0);
	idx.files = &f;
	idx.n_files = 1;
	ck_assert_int_eq(km_weights_index_encode(&idx, &buf, &n), 0);
	ck_assert_int_eq(km_weights_index_decode(buf, n, &d, &err), 0);
	ck_assert_str_eq(d->name, "model");
	ck_assert_uint_eq(d->n_files, 1);
	ck_assert_uint_eq(d->files[0].n_extents, 2);
	ck_assert_uint_eq(d->files[0].extents[0].id.b[0], 9);
	/* an index is not a manifest */
	ck_assert_int_eq(km_manifest_decode(buf, n, &m, &err), -ENOTRECOVERABLE);
	km_weights_index_free(d);
	free(f.extents);
	free(buf);
}
END_TEST

START_TEST(test_format_index_rejects_delta_extents)
{
	struct km_weights_index idx = {
		.major = KM_FORMAT_MAJOR,
		.name = (char *)"model",
		.chunker = KM_CHUNKER_PARAMS_DEFAULT,
	};
	struct km_file_entry f = { .name = (char *)"m", .size = 10, .split = true };
	struct km_extent e = { .kind = KM_EXTENT_DELTA, .length = 10 };
	struct km_weights_index *d = NULL;
	struct km_error err = { { 0 } };
	void *buf;
	size_t n;

	ck_assert_int_eq(km_file_entry_add_extent(&f, &e), 0);
	idx.files = &f;
	idx.n_files = 1;
	ck_assert_int_eq(km_weights_index_encode(&idx, &buf, &n), 0);
	ck_assert_int_eq(km_weights_index_decode(buf, n, &d, &err), -EBADMSG);
	free(f.extents);
	free(buf);
}
END_TEST

/* Appends raw protobuf bytes to an encoded record, fixing its length. */
static uint8_t *append_to_record(const uint8_t *buf, size_t n, const uint8_t *extra, size_t k,
				 size_t *ret_n)
{
	uint8_t *out = malloc(n + k);
	uint32_t le;

	memcpy(out, buf, n);
	memcpy(out + n, extra, k);
	memcpy(&le, out + KM_MAGIC_SIZE, 4);
	le = htole32(le32toh(le) + (uint32_t)k);
	memcpy(out + KM_MAGIC_SIZE, &le, 4);
	*ret_n = n + k;
	return out;
}

START_TEST(test_format_index_weights_id)
{
	struct km_weights_index idx = {
		.major = KM_FORMAT_MAJOR,
		.minor = KM_FORMAT_MINOR,
		.name = (char *)"model",
		.chunker = KM_CHUNKER_PARAMS_DEFAULT,
		.weights_size = 123456789,
	};
	struct km_weights_index *d = NULL;
	struct km_error err = { { 0 } };
	/* field 7 (bytes) of 31 bytes, field 8 = 5: an id one byte short */
	uint8_t short_id[2 + 31 + 2] = { 0x3a, 31 };
	/* field 8 alone: a size with no id */
	uint8_t size_only[] = { 0x40, 5 };
	uint8_t *buf, *bad;
	size_t n, m;

	short_id[33] = 0x40;
	short_id[34] = 5;
	/* No id: none decoded. */
	ck_assert_int_eq(km_weights_index_encode(&idx, (void **)&buf, &n), 0);
	ck_assert_int_eq(km_weights_index_decode(buf, n, &d, &err), 0);
	ck_assert(km_hash_is_null(&d->weights_id));
	ck_assert_uint_eq(d->weights_size, 0);
	km_weights_index_free(d);

	bad = append_to_record(buf, n, short_id, sizeof(short_id), &m);
	ck_assert_int_eq(km_weights_index_decode(bad, m, &d, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, "weights file id"), "%s", err.msg);
	free(bad);
	bad = append_to_record(buf, n, size_only, sizeof(size_only), &m);
	ck_assert_int_eq(km_weights_index_decode(bad, m, &d, &err), -EBADMSG);
	free(bad);
	free(buf);

	/* Recorded: both come back. */
	memset(idx.weights_id.b, 0xc3, KM_HASH_SIZE);
	ck_assert_int_eq(km_weights_index_encode(&idx, (void **)&buf, &n), 0);
	ck_assert_int_eq(km_weights_index_decode(buf, n, &d, &err), 0);
	ck_assert(km_hash_equal(&d->weights_id, &idx.weights_id));
	ck_assert_uint_eq(d->weights_size, 123456789);
	km_weights_index_free(d);
	free(buf);
}
END_TEST

START_TEST(test_format_weights_verified)
{
	struct km_weights_verified v = {
		.size = 1ull << 33,
		.dev = 0x803,
		.ino = 987654321,
		.ctime_sec = 1700000000,
		.ctime_nsec = 999999999,
		.mtime_sec = -5,
		.mtime_nsec = 1,
		.verified_unix = 1700000001,
	}, d;
	struct km_error err = { { 0 } };
	uint8_t *buf;
	size_t n;

	memset(v.id.b, 0x11, KM_HASH_SIZE);
	ck_assert_int_eq(km_weights_verified_encode(&v, (void **)&buf, &n), 0);
	ck_assert(memcmp(buf, KM_MAGIC_WEIGHTS_OK, KM_MAGIC_SIZE) == 0);
	ck_assert_int_eq(km_weights_verified_decode(buf, n, &d, &err), 0);
	ck_assert(km_hash_equal(&d.id, &v.id));
	ck_assert_uint_eq(d.size, v.size);
	ck_assert_uint_eq(d.dev, v.dev);
	ck_assert_uint_eq(d.ino, v.ino);
	ck_assert_int_eq(d.ctime_sec, v.ctime_sec);
	ck_assert_uint_eq(d.ctime_nsec, v.ctime_nsec);
	ck_assert_int_eq(d.mtime_sec, v.mtime_sec);
	ck_assert_uint_eq(d.mtime_nsec, v.mtime_nsec);
	ck_assert_uint_eq(d.verified_unix, v.verified_unix);
	for (size_t k = 0; k < n; k++)
		ck_assert_int_lt(km_weights_verified_decode(buf, k, &d, &err), 0);
	buf[0] ^= 1;
	ck_assert_int_eq(km_weights_verified_decode(buf, n, &d, &err), -ENOTRECOVERABLE);
	free(buf);

	v.ctime_nsec = 1000000000;
	ck_assert_int_eq(km_weights_verified_encode(&v, (void **)&buf, &n), 0);
	ck_assert_int_eq(km_weights_verified_decode(buf, n, &d, &err), -EBADMSG);
	free(buf);
}
END_TEST

START_TEST(test_format_store_config)
{
	struct km_chunker_params p = { 1024, 4096, 16384 }, q;
	struct km_error err = { { 0 } };
	uint8_t *buf;
	size_t n;

	ck_assert_int_eq(km_store_config_encode(&p, (void **)&buf, &n), 0);
	ck_assert_int_eq(km_store_config_decode(buf, n, &q, &err), 0);
	ck_assert_uint_eq(q.min_size, 1024);
	ck_assert_uint_eq(q.avg_size, 4096);
	ck_assert_uint_eq(q.max_size, 16384);
	buf[3] = 'X';
	ck_assert_int_eq(km_store_config_decode(buf, n, &q, &err), -ENOTRECOVERABLE);
	free(buf);
}
END_TEST

START_TEST(test_format_plain_names)
{
	ck_assert(km_filename_is_plain("pages-1.img"));
	ck_assert(!km_filename_is_plain(""));
	ck_assert(!km_filename_is_plain("."));
	ck_assert(!km_filename_is_plain(".."));
	ck_assert(!km_filename_is_plain("a/b"));
	ck_assert(!km_filename_is_plain("a\nb"));
}
END_TEST

int main(void)
{
	Suite *s = suite_create("format");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_format_extents_merge);
	tcase_add_test(tc, test_format_manifest_round_trip);
	tcase_add_test(tc, test_format_manifest_rejects_bad);
	tcase_add_test(tc, test_format_manifest_extent_digest);
	tcase_add_test(tc, test_format_manifest_digest_rejects);
	tcase_add_test(tc, test_format_manifest_rejects_foreign_and_truncated);
	tcase_add_test(tc, test_format_index_round_trip);
	tcase_add_test(tc, test_format_index_rejects_delta_extents);
	tcase_add_test(tc, test_format_index_weights_id);
	tcase_add_test(tc, test_format_weights_verified);
	tcase_add_test(tc, test_format_store_config);
	tcase_add_test(tc, test_format_plain_names);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
