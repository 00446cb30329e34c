/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The delta writer and reader: round trips, the filter choice, and
 * rejection of corrupt, truncated and foreign files. */
#include <check.h>

#include "km-check.h"
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "delta.h"
#include "format.h"
#include "hash.h"
#include "kvmotion.pb-c.h"
#include "util.h"

#define KIB 1024u
#define MIB (1024u * 1024)

/* Unlinked at once, so nothing is left in /tmp whatever happens. */
static int tmp_fd(void)
{
	char path[] = "/tmp/test_delta.XXXXXX";
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(unlink(path), 0);
	return fd;
}

static uint64_t rng_next(uint64_t *s)
{
	/* xorshift64*: deterministic, fast, good enough for test data. */
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545F4914F6CDD1DULL;
}

static uint8_t *gen_random(size_t n, uint64_t seed)
{
	uint8_t *p = malloc(n ? n : 1);
	uint64_t s = seed | 1;

	ck_assert_ptr_nonnull(p);
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(rng_next(&s) >> 56);
	return p;
}

/* bfloat16 values of a normal distribution (sigma 0.02, like model
 * weights): the high byte (sign, exponent) is very compressible, the low
 * byte (mantissa) is not. An odd last byte is random. */
static uint8_t *gen_bf16(size_t n, uint64_t seed)
{
	uint8_t *p = malloc(n ? n : 1);
	uint64_t s = seed | 1;

	ck_assert_ptr_nonnull(p);
	for (size_t i = 0; i + 1 < n; i += 2) {
		/* Irwin-Hall: the sum of 4 uniforms is close to normal. */
		double u = 0;
		union {
			float f;
			uint32_t u;
		} v;
		uint16_t b;

		for (int k = 0; k < 4; k++)
			u += (double)(rng_next(&s) >> 11) / (double)(1ULL << 53);
		v.f = (float)((u - 2.0) * 1.7320508 * 0.02);
		b = (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
		p[i] = (uint8_t)b;
		p[i + 1] = (uint8_t)(b >> 8);
	}
	if (n & 1)
		p[n - 1] = (uint8_t)(rng_next(&s) >> 56);
	return p;
}

static uint8_t *gen_zero(size_t n)
{
	uint8_t *p = calloc(1, n ? n : 1);

	ck_assert_ptr_nonnull(p);
	return p;
}

static uint8_t *read_all(int fd, size_t *ret_size)
{
	struct stat st;
	uint8_t *p;

	ck_assert_int_eq(fstat(fd, &st), 0);
	p = malloc(st.st_size ? (size_t)st.st_size : 1);
	ck_assert_ptr_nonnull(p);
	ck_assert_int_eq(km_pread_full(fd, p, (size_t)st.st_size, 0), st.st_size);
	*ret_size = (size_t)st.st_size;
	return p;
}

static int fd_from_bytes(const void *p, size_t n)
{
	int fd = tmp_fd();

	ck_assert_int_eq(km_write_full(fd, p, n), 0);
	return fd;
}

/* Appends in odd-sized pieces so frame boundaries fall inside appends. */
static void write_delta(int fd, const uint8_t *data, size_t n, const struct km_delta_params *p,
			struct km_delta_summary *sum)
{
	static const size_t pieces[] = { 1, 3, 4093, 65537, 7, 1000003, 2 };
	struct km_delta_writer *w = NULL;
	size_t off = 0;

	ck_assert_int_eq(km_delta_writer_new(fd, p, &w), 0);
	for (size_t i = 0; off < n; i++) {
		size_t k = KM_MIN(pieces[i % KM_ARRAY_SIZE(pieces)], n - off);

		ck_assert_int_eq(km_delta_writer_append(w, data + off, k), 0);
		off += k;
	}
	ck_assert_int_eq(km_delta_writer_finish(w, sum), 0);
	km_delta_writer_free(w);
}

struct sink_state {
	uint8_t *out;
	uint64_t size;
	atomic_uint_fast64_t bytes;
	atomic_uint calls;
	unsigned fail_at; /* 1-based call that returns 'fail_with'; 0: never */
	int fail_with;
};

static int copy_sink(void *userdata, uint64_t off, const void *data, size_t n)
{
	struct sink_state *s = userdata;
	unsigned call = atomic_fetch_add(&s->calls, 1) + 1;

	if (s->fail_at && call >= s->fail_at)
		return s->fail_with;
	if (off > s->size || n > s->size - off)
		return -ERANGE;
	memcpy(s->out + off, data, n);
	atomic_fetch_add(&s->bytes, n);
	return 0;
}

/* Decodes and checks every byte came back exactly once, in place. */
static void check_decode(struct km_delta_reader *r, const uint8_t *data, size_t n,
			 unsigned threads)
{
	struct sink_state s = { .size = n };
	struct km_error err = { { 0 } };

	s.out = malloc(n ? n : 1);
	ck_assert_ptr_nonnull(s.out);
	/* Complement, so a frame never handed over shows as a mismatch. */
	for (size_t i = 0; i < n; i++)
		s.out[i] = (uint8_t)~data[i];
	ck_assert_int_eq(km_delta_reader_decode(r, threads, copy_sink, &s, &err), 0);
	ck_assert_uint_eq(atomic_load(&s.bytes), n);
	ck_assert_uint_eq(atomic_load(&s.calls), km_delta_reader_frames(r));
	ck_assert(memcmp(s.out, data, n) == 0);
	free(s.out);
}

/* Writes, checks the summary against the file, reads back with 1 and 2
 * decode threads. */
static void roundtrip(const uint8_t *data, size_t n, const struct km_delta_params *p,
		      struct km_delta_summary *ret)
{
	uint32_t fs = p->frame_size ? p->frame_size : KM_DELTA_FRAME_SIZE_DEFAULT;
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_error err = { { 0 } };
	struct km_hash file_hash;
	uint8_t *file;
	size_t file_size;
	int fd = tmp_fd();

	write_delta(fd, data, n, p, &sum);
	file = read_all(fd, &file_size);
	km_hash_buf(file, file_size, &file_hash);
	ck_assert_uint_eq(sum.raw_size, n);
	ck_assert_uint_eq(sum.frames, (n + fs - 1) / fs);
	ck_assert_uint_eq(sum.compressed_size, file_size);
	ck_assert(km_hash_equal(&sum.sha256, &file_hash));
	ck_assert(memcmp(file, KM_MAGIC_DELTA, KM_MAGIC_SIZE) == 0);

	ck_assert_msg(km_delta_reader_open(fd, &r, &err) == 0, "open: %s", err.msg);
	ck_assert_uint_eq(km_delta_reader_raw_size(r), n);
	ck_assert_uint_eq(km_delta_reader_frames(r), sum.frames);
	{
		struct km_hash rh;

		ck_assert_int_eq(km_delta_reader_sha256(r, &rh, &err), 0);
		ck_assert(km_hash_equal(&rh, &file_hash));
	}
	/* The reader keeps its own descriptor. */
	close(fd);
	check_decode(r, data, n, 1);
	check_decode(r, data, n, 2);
	km_delta_reader_free(r);
	free(file);
	if (ret)
		*ret = sum;
}

START_TEST(test_delta_roundtrip_sizes)
{
	const uint32_t fs = 64 * KIB;
	const size_t sizes[] = { 0, 1, 2, 7, 4095, fs - 1, fs, fs + 1, 3 * fs + 17 };
	const enum km_delta_filter_mode modes[] = { KM_DELTA_FILTER_AUTO, KM_DELTA_FILTER_NEVER,
						    KM_DELTA_FILTER_ALWAYS };

	for (size_t i = 0; i < KM_ARRAY_SIZE(sizes); i++)
		for (size_t m = 0; m < KM_ARRAY_SIZE(modes); m++) {
			struct km_delta_params p = { .frame_size = fs, .threads = 2,
						     .filter = modes[m] };
			uint8_t *rnd = gen_random(sizes[i], i + 1);
			uint8_t *bf = gen_bf16(sizes[i], i + 100);

			roundtrip(rnd, sizes[i], &p, NULL);
			roundtrip(bf, sizes[i], &p, NULL);
			free(rnd);
			free(bf);
		}
}
END_TEST

START_TEST(test_delta_roundtrip_many_frames)
{
	/* An odd frame size puts odd-length frames through the filter. */
	const uint32_t frame_sizes[] = { 64 * KIB, 65537, 4099 };
	const size_t n = 97 * 65537 + 12345;
	uint8_t *bf = gen_bf16(n, 7);

	for (size_t i = 0; i < KM_ARRAY_SIZE(frame_sizes); i++)
		for (unsigned threads = 1; threads <= 3; threads += 2) {
			struct km_delta_params p = { .frame_size = frame_sizes[i],
						     .threads = threads,
						     .filter = KM_DELTA_FILTER_ALWAYS };
			struct km_delta_summary sum;

			roundtrip(bf, n, &p, &sum);
			ck_assert_uint_eq(sum.frames_filtered, sum.frames);
			p.filter = KM_DELTA_FILTER_AUTO;
			roundtrip(bf, n, &p, NULL);
		}
	free(bf);
}
END_TEST

START_TEST(test_delta_roundtrip_default_params)
{
	/* Default frame size and level, one thread per CPU, NULL params. */
	const size_t n = 2 * KM_DELTA_FRAME_SIZE_DEFAULT + 3;
	struct km_delta_params p = { 0 };
	struct km_delta_summary sum;
	uint8_t *bf = gen_bf16(n, 3);

	roundtrip(bf, n, &p, &sum);
	ck_assert_uint_eq(sum.frames, 3);
	free(bf);
}
END_TEST

START_TEST(test_delta_roundtrip_zero)
{
	const size_t n = 5 * MIB + 1;
	struct km_delta_params p = { .frame_size = MIB, .threads = 2 };
	struct km_delta_summary sum;
	uint8_t *z = gen_zero(n);

	roundtrip(z, n, &p, &sum);
	ck_assert_uint_eq(sum.frames, 6);
	ck_assert_uint_lt(sum.compressed_size, n / 1000);
	free(z);
}
END_TEST

START_TEST(test_delta_roundtrip_incompressible)
{
	const size_t n = 3 * MIB + 5;
	const enum km_delta_filter_mode modes[] = { KM_DELTA_FILTER_AUTO, KM_DELTA_FILTER_NEVER,
						    KM_DELTA_FILTER_ALWAYS };
	uint8_t *rnd = gen_random(n, 42);

	for (size_t m = 0; m < KM_ARRAY_SIZE(modes); m++) {
		struct km_delta_params p = { .frame_size = MIB, .threads = 2, .filter = modes[m] };
		struct km_delta_summary sum;

		roundtrip(rnd, n, &p, &sum);
		/* Stored, not expanded beyond zstd's block headers and ours. */
		ck_assert_uint_ge(sum.compressed_size, n);
		ck_assert_uint_lt(sum.compressed_size, n + n / 100);
	}
	free(rnd);
}
END_TEST

START_TEST(test_delta_filter_chosen_for_bf16)
{
	const size_t n = 8 * MIB;
	struct km_delta_params p = { .frame_size = MIB, .threads = 2 };
	struct km_delta_summary never, autom;
	uint8_t *bf = gen_bf16(n, 11);

	p.filter = KM_DELTA_FILTER_NEVER;
	roundtrip(bf, n, &p, &never);
	p.filter = KM_DELTA_FILTER_AUTO;
	roundtrip(bf, n, &p, &autom);
	ck_assert_uint_eq(never.frames_filtered, 0);
	ck_assert_uint_gt(autom.frames_filtered, 0);
	ck_assert_uint_eq(autom.frames_filtered, autom.frames);
	ck_assert_uint_lt(autom.compressed_size, never.compressed_size);
	free(bf);
}
END_TEST

START_TEST(test_delta_filter_not_chosen_for_random)
{
	const size_t n = 4 * MIB;
	struct km_delta_params p = { .frame_size = MIB, .threads = 2 };
	struct km_delta_summary sum;
	uint8_t *rnd = gen_random(n, 5);
	uint8_t *z = gen_zero(n);

	roundtrip(rnd, n, &p, &sum);
	ck_assert_uint_eq(sum.frames, 4);
	ck_assert_uint_eq(sum.frames_filtered, 0);
	/* Zeros compress to almost nothing either way: no 3% to gain. */
	roundtrip(z, n, &p, &sum);
	ck_assert_uint_eq(sum.frames_filtered, 0);
	free(rnd);
	free(z);
}
END_TEST

/* A delta file taken apart: records unpacked, payloads pointing into it. */
struct parsed {
	uint8_t *file;
	size_t size;
	size_t header_end; /* offset after the header record */
	Kvmotion__DeltaFrame *frames[256];
	size_t payload_off[256];
	size_t n;
};

static void parse_delta(uint8_t *file, size_t size, struct parsed *ret)
{
	size_t off = KM_MAGIC_SIZE;
	uint32_t len;

	memset(ret, 0, sizeof(*ret));
	ret->file = file;
	ret->size = size;
	memcpy(&len, file + off, 4);
	len = le32toh(len);
	off += 4 + len;
	ret->header_end = off;
	for (;;) {
		memcpy(&len, file + off, 4);
		len = le32toh(len);
		off += 4;
		if (len == 0)
			break;
		ck_assert_uint_lt(ret->n, KM_ARRAY_SIZE(ret->frames));
		ret->frames[ret->n] = kvmotion__delta_frame__unpack(NULL, len, file + off);
		ck_assert_ptr_nonnull(ret->frames[ret->n]);
		off += len;
		ret->payload_off[ret->n] = off;
		off += ret->frames[ret->n]->compressed_size;
		ret->n++;
	}
	ck_assert_uint_eq(off, size);
}

static void parsed_clear(struct parsed *p)
{
	for (size_t i = 0; i < p->n; i++)
		kvmotion__delta_frame__free_unpacked(p->frames[i], NULL);
	free(p->file);
}

/* Re-assembles a file from (possibly edited) records, in 'order'. */
static int assemble(const struct parsed *p, const size_t *order, size_t n)
{
	uint8_t rec[4 + 128];
	uint32_t zero = 0;
	int fd = tmp_fd();

	ck_assert_int_eq(km_write_full(fd, p->file, p->header_end), 0);
	for (size_t k = 0; k < n; k++) {
		const Kvmotion__DeltaFrame *f = p->frames[order[k]];
		uint32_t len = (uint32_t)kvmotion__delta_frame__pack(f, rec + 4);
		uint32_t le = htole32(len);

		memcpy(rec, &le, 4);
		ck_assert_int_eq(km_write_full(fd, rec, 4 + len), 0);
		ck_assert_int_eq(km_write_full(fd, p->file + p->payload_off[order[k]],
					       f->compressed_size), 0);
	}
	ck_assert_int_eq(km_write_full(fd, &zero, 4), 0);
	return fd;
}

static int make_delta(const uint8_t *data, size_t n, const struct km_delta_params *p,
		      struct km_delta_summary *sum)
{
	int fd = tmp_fd();

	write_delta(fd, data, n, p, sum);
	return fd;
}

static int open_and_decode(int fd, unsigned threads, struct km_error *err)
{
	struct km_delta_reader *r = NULL;
	struct sink_state s = { 0 };
	int ret;

	ret = km_delta_reader_open(fd, &r, err);
	if (ret < 0)
		return ret;
	s.size = km_delta_reader_raw_size(r);
	s.out = malloc(s.size ? s.size : 1);
	ck_assert_ptr_nonnull(s.out);
	ret = km_delta_reader_decode(r, threads, copy_sink, &s, err);
	free(s.out);
	km_delta_reader_free(r);
	return ret;
}

START_TEST(test_delta_image_id)
{
	uint8_t data[1000];
	struct km_delta_params p = { .frame_size = 256, .threads = 1 };
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_error err = { { 0 } };
	int fd;

	memset(data, 7, sizeof(data));
	/* Without an id the reader reports none. */
	fd = make_delta(data, sizeof(data), &p, &sum);
	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
	ck_assert_ptr_null(km_delta_reader_image_id(r));
	km_delta_reader_free(r);
	close(fd);
	/* With one, it comes back as written. */
	memset(p.image_id.b, 0xa5, KM_HASH_SIZE);
	p.image_id.b[31] = 1;
	fd = make_delta(data, sizeof(data), &p, &sum);
	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
	ck_assert_ptr_nonnull(km_delta_reader_image_id(r));
	ck_assert(km_hash_equal(km_delta_reader_image_id(r), &p.image_id));
	ck_assert_uint_eq(km_delta_reader_raw_size(r), sizeof(data));
	km_delta_reader_free(r);
	close(fd);
}
END_TEST

START_TEST(test_delta_corrupt_frame_is_named)
{
	const size_t n = 4 * 256 * KIB;
	const enum km_delta_filter_mode modes[] = { KM_DELTA_FILTER_AUTO, KM_DELTA_FILTER_NEVER };
	uint8_t *bf = gen_bf16(n, 9);
	uint8_t *rnd = gen_random(n, 9);

	for (size_t m = 0; m < KM_ARRAY_SIZE(modes); m++)
		for (int kind = 0; kind < 2; kind++) {
			struct km_delta_params p = { .frame_size = 256 * KIB, .threads = 2,
						     .filter = modes[m] };
			struct km_delta_summary sum;
			struct km_delta_reader *r = NULL;
			struct km_error err = { { 0 } };
			struct parsed ps;
			size_t size, at;
			uint8_t *file;
			int fd;

			/* Random data is stored in raw blocks: only the
			 * checksum catches the flip there. */
			fd = make_delta(kind ? rnd : bf, n, &p, &sum);
			file = read_all(fd, &size);
			close(fd);
			parse_delta(file, size, &ps);
			ck_assert_uint_eq(ps.n, 4);
			at = ps.payload_off[2] + ps.frames[2]->compressed_size / 2;
			file[at] ^= 0x40;
			fd = fd_from_bytes(file, size);

			ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
			/* The manifest's hash would catch it too. */
			{
				struct km_hash rh;

				ck_assert_int_eq(km_delta_reader_sha256(r, &rh, &err), 0);
				ck_assert(!km_hash_equal(&rh, &sum.sha256));
			}
			for (unsigned threads = 1; threads <= 2; threads++) {
				struct sink_state s = { .size = n };

				s.out = malloc(n);
				err.msg[0] = 0;
				ck_assert_int_eq(km_delta_reader_decode(r, threads, copy_sink, &s,
									&err),
						 -EBADMSG);
				ck_assert_msg(strstr(err.msg, "frame 2 ") != NULL, "%s", err.msg);
				free(s.out);
			}
			km_delta_reader_free(r);
			close(fd);
			parsed_clear(&ps);
		}
	free(bf);
	free(rnd);
}
END_TEST

/* The cursor gives every byte front to back, then anywhere, across frame ends. */
START_TEST(test_delta_cursor_reads_in_any_order)
{
	const size_t n = 5 * 64 * KIB + 333;
	uint8_t *data = gen_bf16(n, 21);
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 2 };
	static const uint64_t probes[] = { 0, 64 * KIB - 1, 64 * KIB, 3 * 64 * KIB + 17, 100, 0 };
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_delta_cursor *c = NULL;
	struct km_error err = { { 0 } };
	uint8_t *out = malloc(n);
	uint64_t off = 0;
	int fd = make_delta(data, n, &p, &sum);

	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
	ck_assert_int_eq(km_delta_cursor_new(r, &c), 0);
	while (off < n) {
		const uint8_t *q;
		size_t k;

		ck_assert_int_eq(km_delta_cursor_get(c, off, &q, &k, &err), 0);
		/* Never past the end of the frame holding off. */
		ck_assert_uint_ge(k, 1);
		ck_assert_uint_le(k, 64 * KIB - off % (64 * KIB));
		ck_assert_uint_le(off + k, n);
		memcpy(out + off, q, k);
		off += k;
	}
	ck_assert(memcmp(out, data, n) == 0);
	for (size_t i = 0; i < KM_ARRAY_SIZE(probes); i++) {
		const uint8_t *q;
		size_t k;

		ck_assert_int_eq(km_delta_cursor_get(c, probes[i], &q, &k, &err), 0);
		ck_assert(memcmp(q, data + probes[i], k) == 0);
	}
	{
		const uint8_t *q = NULL;
		size_t k = 0;

		ck_assert_int_eq(km_delta_cursor_get(c, n, &q, &k, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "beyond"), "%s", err.msg);
	}
	km_delta_cursor_free(c);
	km_delta_reader_free(r);
	close(fd);
	free(out);
	free(data);
}
END_TEST

START_TEST(test_delta_cursor_corrupt_frame_is_named)
{
	const size_t n = 4 * 64 * KIB;
	uint8_t *data = gen_random(n, 5);
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 1 };
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_delta_cursor *c = NULL;
	struct km_error err = { { 0 } };
	struct parsed ps;
	const uint8_t *q;
	size_t size, k;
	uint8_t *file;
	int fd = make_delta(data, n, &p, &sum);

	file = read_all(fd, &size);
	close(fd);
	parse_delta(file, size, &ps);
	file[ps.payload_off[2] + ps.frames[2]->compressed_size / 2] ^= 0x10;
	fd = fd_from_bytes(file, size);
	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
	ck_assert_int_eq(km_delta_cursor_new(r, &c), 0);
	/* Frames before the bad one read fine; the bad one is named; so again. */
	ck_assert_int_eq(km_delta_cursor_get(c, 64 * KIB + 5, &q, &k, &err), 0);
	ck_assert(memcmp(q, data + 64 * KIB + 5, k) == 0);
	for (int again = 0; again < 2; again++) {
		err.msg[0] = 0;
		ck_assert_int_eq(km_delta_cursor_get(c, 2 * 64 * KIB + 1, &q, &k, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "frame 2 ") != NULL, "%s", err.msg);
	}
	ck_assert_int_eq(km_delta_cursor_get(c, 3 * 64 * KIB, &q, &k, &err), 0);
	ck_assert(memcmp(q, data + 3 * 64 * KIB, k) == 0);
	km_delta_cursor_free(c);
	km_delta_reader_free(r);
	close(fd);
	parsed_clear(&ps); /* frees file */
	free(data);
}
END_TEST

START_TEST(test_delta_truncated)
{
	const size_t n = 3 * 64 * KIB + 100;
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 2 };
	struct km_delta_summary sum;
	uint8_t *bf = gen_bf16(n, 13);
	struct parsed ps;
	size_t size;
	uint8_t *file;
	int fd;

	fd = make_delta(bf, n, &p, &sum);
	file = read_all(fd, &size);
	close(fd);
	parse_delta(file, size, &ps);

	const size_t cuts[] = {
		0, 1, 4, KM_MAGIC_SIZE, KM_MAGIC_SIZE + 2, KM_MAGIC_SIZE + 5, ps.header_end,
		ps.header_end + 2, ps.payload_off[0] - 1, ps.payload_off[0],
		ps.payload_off[0] + 10, ps.payload_off[1] - 4, ps.payload_off[1] + 1,
		ps.payload_off[3] + ps.frames[3]->compressed_size / 2, size - 4, size - 3,
		size - 1,
	};
	for (size_t i = 0; i < KM_ARRAY_SIZE(cuts); i++) {
		struct km_error err = { { 0 } };

		fd = fd_from_bytes(file, cuts[i]);
		ck_assert_msg(open_and_decode(fd, 2, &err) == -EBADMSG, "cut at %zu", cuts[i]);
		ck_assert_msg(err.msg[0] != 0, "no message for cut at %zu", cuts[i]);
		close(fd);
	}

	/* Anything after the end marker, even another end marker. */
	for (size_t extra = 1; extra <= 5; extra++) {
		struct km_error err = { { 0 } };
		uint8_t *longer = calloc(1, size + extra);

		memcpy(longer, file, size);
		fd = fd_from_bytes(longer, size + extra);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "after its end marker") != NULL, "%s", err.msg);
		close(fd);
		free(longer);
	}
	parsed_clear(&ps);
	free(bf);
}
END_TEST

START_TEST(test_delta_bad_frame_table)
{
	const size_t n = 3 * 64 * KIB + 100;
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 2 };
	struct km_delta_summary sum;
	uint8_t *bf = gen_bf16(n, 17);
	struct km_error err = { { 0 } };
	struct parsed ps;
	size_t size;
	uint8_t *file;
	int fd;

	fd = make_delta(bf, n, &p, &sum);
	file = read_all(fd, &size);
	close(fd);
	parse_delta(file, size, &ps);
	ck_assert_uint_eq(ps.n, 4);

	{
		/* Re-assembled unchanged: byte-identical, so the test's
		 * assembly is faithful. */
		const size_t order[] = { 0, 1, 2, 3 };
		uint8_t *again;
		size_t again_size;

		fd = assemble(&ps, order, 4);
		again = read_all(fd, &again_size);
		ck_assert_uint_eq(again_size, size);
		ck_assert(memcmp(again, file, size) == 0);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), 0);
		free(again);
		close(fd);
	}
	{
		/* Frames swapped: raw offsets not contiguous. */
		const size_t order[] = { 0, 2, 1, 3 };

		fd = assemble(&ps, order, 4);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "frame 1 ") != NULL, "%s", err.msg);
		close(fd);
	}
	{
		/* A frame missing: a gap in the raw stream. */
		const size_t order[] = { 0, 1, 3 };

		fd = assemble(&ps, order, 3);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "frame 2 ") != NULL, "%s", err.msg);
		close(fd);
	}
	{
		/* The last frame dropped: a valid, shorter file. */
		const size_t order[] = { 0, 1, 2 };

		fd = assemble(&ps, order, 3);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), 0);
		close(fd);
	}
	{
		/* A short frame that is not the last. */
		const size_t order[] = { 0, 3 };

		ps.frames[3]->raw_offset = 64 * KIB;
		fd = assemble(&ps, order, 2);
		ps.frames[3]->raw_offset = 3 * 64 * KIB;
		ck_assert_int_eq(open_and_decode(fd, 2, &err), 0);
		close(fd);
		{
			const size_t order2[] = { 0, 3, 2 };

			ps.frames[3]->raw_offset = 64 * KIB;
			ps.frames[2]->raw_offset = 64 * KIB + 100;
			fd = assemble(&ps, order2, 3);
			ps.frames[3]->raw_offset = 3 * 64 * KIB;
			ps.frames[2]->raw_offset = 2 * 64 * KIB;
			ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
			ck_assert_msg(strstr(err.msg, "frame 2 ") != NULL, "%s", err.msg);
			close(fd);
		}
	}
	{
		/* raw_size larger than the frame size, then one that disagrees
		 * with the zstd frame's content size. */
		const size_t order[] = { 0, 1, 2, 3 };

		ps.frames[3]->raw_size = 64 * KIB + 1;
		fd = assemble(&ps, order, 4);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
		close(fd);
		ps.frames[3]->raw_size = 99;
		fd = assemble(&ps, order, 4);
		ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "frame 3 ") != NULL, "%s", err.msg);
		ck_assert_msg(strstr(err.msg, "content size") != NULL, "%s", err.msg);
		close(fd);
		ps.frames[3]->raw_size = 100;
	}
	{
		/* An unknown filter. */
		const size_t order[] = { 0, 1, 2, 3 };
		Kvmotion__DeltaFilter saved = ps.frames[1]->filter;

		ps.frames[1]->filter = (Kvmotion__DeltaFilter)7;
		fd = assemble(&ps, order, 4);
		ps.frames[1]->filter = saved;
		ck_assert_int_eq(open_and_decode(fd, 2, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "frame 1 ") != NULL, "%s", err.msg);
		close(fd);
	}
	parsed_clear(&ps);
	free(bf);
}
END_TEST

START_TEST(test_delta_wrong_magic)
{
	const char *magics[] = { "KMDELTX\n", KM_MAGIC_MANIFEST, "\x28\xb5\x2f\xfd\0\0\0\0" };
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 1 };
	struct km_delta_summary sum;
	uint8_t *bf = gen_bf16(1000, 1);
	size_t size;
	uint8_t *file;
	int fd;

	fd = make_delta(bf, 1000, &p, &sum);
	file = read_all(fd, &size);
	close(fd);
	for (size_t i = 0; i < KM_ARRAY_SIZE(magics); i++) {
		struct km_delta_reader *r = NULL;
		struct km_error err = { { 0 } };

		memcpy(file, magics[i], KM_MAGIC_SIZE);
		fd = fd_from_bytes(file, size);
		ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), -ENOTRECOVERABLE);
		ck_assert_ptr_null(r);
		ck_assert_msg(strstr(err.msg, "not a kvmotion delta file") != NULL, "%s", err.msg);
		close(fd);
		/* Too short to hold the magic, and not a prefix of it. */
		fd = fd_from_bytes("KMX", 3);
		ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), -ENOTRECOVERABLE);
		close(fd);
	}
	free(file);
	free(bf);
}
END_TEST

START_TEST(test_delta_major_version)
{
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 1 };
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_error err = { { 0 } };
	uint8_t *bf = gen_bf16(1000, 1);
	size_t size;
	uint8_t *file;
	int fd;

	fd = make_delta(bf, 1000, &p, &sum);
	file = read_all(fd, &size);
	close(fd);
	/* DeltaHeader starts with field 1 (major), varint: 0x08 0x01. */
	ck_assert_uint_eq(file[KM_MAGIC_SIZE + 4], 0x08);
	ck_assert_uint_eq(file[KM_MAGIC_SIZE + 5], KM_FORMAT_MAJOR);
	file[KM_MAGIC_SIZE + 5] = 2;
	fd = fd_from_bytes(file, size);
	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), -EPROTONOSUPPORT);
	{
		char version[32];

		/* The writer's minor version rides along. */
		snprintf(version, sizeof(version), "2.%u", KM_FORMAT_MINOR);
		ck_assert_msg(strstr(err.msg, version) != NULL && strstr(err.msg, "1") != NULL,
			      "%s", err.msg);
	}
	close(fd);
	free(file);
	free(bf);
}
END_TEST

START_TEST(test_delta_sha256_matches_file)
{
	const size_t n = 5 * 64 * KIB + 3;
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 3 };
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_error err = { { 0 } };
	struct km_hash h;
	uint8_t *bf = gen_bf16(n, 21);
	size_t size;
	uint8_t *file;
	int fd;

	fd = make_delta(bf, n, &p, &sum);
	file = read_all(fd, &size);
	km_hash_buf(file, size, &h);
	ck_assert(km_hash_equal(&h, &sum.sha256));
	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
	{
		struct km_hash rh;

		ck_assert_int_eq(km_delta_reader_sha256(r, &rh, &err), 0);
		ck_assert(km_hash_equal(&rh, &h));
	}
	km_delta_reader_free(r);
	close(fd);

	/* The same input gives the same file, whatever the thread count. */
	p.threads = 1;
	fd = make_delta(bf, n, &p, &sum);
	ck_assert(km_hash_equal(&h, &sum.sha256));
	close(fd);
	free(file);
	free(bf);
}
END_TEST

START_TEST(test_delta_sink_error_stops)
{
	const size_t n = 20 * 64 * KIB;
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 2 };
	struct km_delta_summary sum;
	struct km_delta_reader *r = NULL;
	struct km_error err = { { 0 } };
	uint8_t *bf = gen_bf16(n, 23);
	int fd;

	fd = make_delta(bf, n, &p, &sum);
	ck_assert_int_eq(km_delta_reader_open(fd, &r, &err), 0);
	for (unsigned threads = 1; threads <= 2; threads++) {
		const int codes[] = { 7, -ENOSPC };

		for (size_t c = 0; c < KM_ARRAY_SIZE(codes); c++) {
			struct sink_state s = { .size = n, .fail_at = 2, .fail_with = codes[c] };

			s.out = malloc(n);
			ck_assert_int_eq(km_delta_reader_decode(r, threads, copy_sink, &s, &err),
					 codes[c]);
			/* Stopped early; one worker stops right at the failure. */
			if (threads == 1)
				ck_assert_uint_eq(atomic_load(&s.calls), 2);
			else
				ck_assert_uint_lt(atomic_load(&s.calls), 20);
			free(s.out);
		}
	}
	km_delta_reader_free(r);
	close(fd);
	free(bf);
}
END_TEST

START_TEST(test_delta_writer_errors)
{
	struct km_delta_params bad[] = {
		{ .level = 1000 },
		{ .frame_size = 1024u * MIB },
		{ .filter = (enum km_delta_filter_mode)9 },
	};
	struct km_delta_params p = { .frame_size = 64 * KIB, .threads = 2 };
	struct km_delta_writer *w = NULL;
	struct km_delta_summary sum;
	char path[] = "/tmp/test_delta.XXXXXX";
	uint8_t *bf = gen_bf16(MIB, 2);
	int fd = tmp_fd(), ro;

	for (size_t i = 0; i < KM_ARRAY_SIZE(bad); i++) {
		ck_assert_int_eq(km_delta_writer_new(fd, &bad[i], &w), -EINVAL);
		ck_assert_ptr_null(w);
	}
	ck_assert_int_eq(km_delta_writer_new(-1, &p, &w), -EBADF);

	/* NULL params: all defaults. */
	ck_assert_int_eq(km_delta_writer_new(fd, NULL, &w), 0);
	ck_assert_int_eq(km_delta_writer_finish(w, &sum), 0);
	ck_assert_uint_eq(sum.frames, 0);
	km_delta_writer_free(w);
	ck_assert_int_eq(ftruncate(fd, 0), 0);
	ck_assert_int_eq(lseek(fd, 0, SEEK_SET), 0);

	/* Append after finish; finish twice. */
	ck_assert_int_eq(km_delta_writer_new(fd, &p, &w), 0);
	ck_assert_int_eq(km_delta_writer_append(w, bf, 1000), 0);
	ck_assert_int_eq(km_delta_writer_finish(w, &sum), 0);
	ck_assert_int_eq(km_delta_writer_append(w, bf, 1), -EINVAL);
	ck_assert_int_eq(km_delta_writer_finish(w, &sum), -EINVAL);
	km_delta_writer_free(w);

	/* Freed with frames in flight: no leak, no hang (ASan checks). */
	ck_assert_int_eq(km_delta_writer_new(fd, &p, &w), 0);
	ck_assert_int_eq(km_delta_writer_append(w, bf, MIB), 0);
	km_delta_writer_free(w);
	km_delta_writer_free(NULL);
	km_delta_reader_free(NULL);
	close(fd);

	/* A descriptor that cannot be written. */
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ro = open(path, O_RDONLY | O_CLOEXEC);
	unlink(path);
	close(fd);
	ck_assert_int_ge(ro, 0);
	ck_assert_int_eq(km_delta_writer_new(ro, &p, &w), -EBADF);
	close(ro);
	free(bf);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("delta");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_delta_roundtrip_sizes);
	tcase_add_test(tc, test_delta_roundtrip_many_frames);
	tcase_add_test(tc, test_delta_roundtrip_default_params);
	tcase_add_test(tc, test_delta_roundtrip_zero);
	tcase_add_test(tc, test_delta_roundtrip_incompressible);
	tcase_add_test(tc, test_delta_filter_chosen_for_bf16);
	tcase_add_test(tc, test_delta_filter_not_chosen_for_random);
	tcase_add_test(tc, test_delta_corrupt_frame_is_named);
	tcase_add_test(tc, test_delta_truncated);
	tcase_add_test(tc, test_delta_bad_frame_table);
	tcase_add_test(tc, test_delta_wrong_magic);
	tcase_add_test(tc, test_delta_major_version);
	tcase_add_test(tc, test_delta_sha256_matches_file);
	tcase_add_test(tc, test_delta_sink_error_stops);
	tcase_add_test(tc, test_delta_writer_errors);
	tcase_add_test(tc, test_delta_image_id);
	tcase_add_test(tc, test_delta_cursor_reads_in_any_order);
	tcase_add_test(tc, test_delta_cursor_corrupt_frame_is_named);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
