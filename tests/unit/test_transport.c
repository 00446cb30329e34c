/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The migration protocol: the frame codec on memory streams (round trip,
 * truncation, limits, unknown types and versions, error codes, payload
 * codec), then a receiver in this process on 127.0.0.1 spoken to by the
 * client library and by hand-made frames (bad versions, path tricks,
 * corrupt chunks, quota, authentication).
 */
#include <check.h>

#include "km-check.h"
#include "km-tar.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format.h"
#include "image.h"
#include "incr.h"
#include "serve.h"
#include "store.h"
#include "transport_internal.h"

#define T_HELLO KVMOTION__WIRE__MSG_TYPE__MSG_HELLO
#define T_ERROR KVMOTION__WIRE__MSG_TYPE__MSG_ERROR
#define T_CHUNK KVMOTION__WIRE__MSG_TYPE__MSG_CHUNK

/* ------------------------------------------------------------ memory streams */

struct mem {
	uint8_t *buf;
	size_t len, cap, pos;
	size_t step; /* largest read answered at once (0: any): exercises short reads */
};

static ssize_t mem_read(void *userdata, void *buf, size_t n, struct km_error *err)
{
	struct mem *m = userdata;
	size_t k = KM_MIN(n, m->len - m->pos);

	if (m->step)
		k = KM_MIN(k, m->step);
	memcpy(buf, m->buf + m->pos, k);
	m->pos += k;
	return (ssize_t)k;
}

static int mem_write(void *userdata, const void *buf, size_t n, struct km_error *err)
{
	struct mem *m = userdata;

	if (m->len + n > m->cap) {
		m->cap = (m->len + n) * 2;
		m->buf = realloc(m->buf, m->cap);
		ck_assert_ptr_nonnull(m->buf);
	}
	memcpy(m->buf + m->len, buf, n);
	m->len += n;
	return 0;
}

static struct km_wire_io mem_io(struct mem *m)
{
	return (struct km_wire_io){ .read = mem_read, .write = mem_write, .userdata = m };
}

static const struct km_wire_limits full_limits = { KM_WIRE_META_MAX, KM_WIRE_PAYLOAD_MAX };

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;

	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (uint8_t)x;
	}
}

/* A CHUNK frame with n payload bytes into m; returns the frame's length. */
static size_t put_chunk_frame(struct mem *m, const uint8_t *data, size_t n)
{
	Kvmotion__Wire__Chunk c = KVMOTION__WIRE__CHUNK__INIT;
	struct km_wire_io io = mem_io(m);
	struct km_hash id;
	uint64_t wire = 0;
	size_t before = m->len;

	km_hash_buf(data, n, &id);
	c.id = (ProtobufCBinaryData){ KM_HASH_SIZE, id.b };
	c.raw_size = (uint32_t)n;
	c.codec = KVMOTION__WIRE__CODEC__CODEC_NONE;
	ck_assert_int_eq(km_wire_send(&io, T_CHUNK, &c.base, data, (uint32_t)n, &wire, NULL), 0);
	ck_assert_uint_eq(wire, m->len - before);
	return m->len - before;
}

/* ------------------------------------------------------------ codec */

START_TEST(test_transport_round_trip)
{
	struct mem m = { .step = 4093 };
	struct km_wire_io io = mem_io(&m);
	struct km_wire_rx rx = { 0 };
	struct km_frame f = { 0 };
	Kvmotion__Wire__Hello h = KVMOTION__WIRE__HELLO__INIT;
	Kvmotion__Wire__QueryChunks q = KVMOTION__WIRE__QUERY_CHUNKS__INIT;
	Kvmotion__Wire__File file = KVMOTION__WIRE__FILE__INIT;
	Kvmotion__Wire__ImageDone done = KVMOTION__WIRE__IMAGE_DONE__INIT;
	Kvmotion__Wire__Bye bye = KVMOTION__WIRE__BYE__INIT;
	static uint8_t ids[KM_WIRE_QUERY_MAX][KM_HASH_SIZE];
	static ProtobufCBinaryData bins[KM_WIRE_QUERY_MAX];
	static uint8_t big[300000], small[10];
	uint64_t wire = 0;

	fill(big, sizeof(big), 1);
	fill(small, sizeof(small), 2);
	fill(&ids[0][0], sizeof(ids), 3);
	h.major = KM_WIRE_MAJOR;
	h.minor = 7;
	h.software = "kvmotion test";
	h.label = "model-α";
	ck_assert_int_eq(km_wire_send(&io, T_HELLO, &h.base, NULL, 0, &wire, NULL), 0);
	for (size_t i = 0; i < KM_WIRE_QUERY_MAX; i++)
		bins[i] = (ProtobufCBinaryData){ KM_HASH_SIZE, ids[i] };
	q.n_ids = KM_WIRE_QUERY_MAX;
	q.ids = bins;
	ck_assert_int_eq(km_wire_send(&io, KVMOTION__WIRE__MSG_TYPE__MSG_QUERY_CHUNKS, &q.base,
				      NULL, 0, &wire, NULL),
			 0);
	put_chunk_frame(&m, big, sizeof(big)); /* written apart from its header */
	put_chunk_frame(&m, small, sizeof(small)); /* coalesced with it */
	file.name = "pages-1.img";
	file.mode = 0600;
	file.size = 1ull << 40;
	file.offset = 1ull << 39;
	file.raw_size = 0;
	file.codec = KVMOTION__WIRE__CODEC__CODEC_ZSTD;
	ck_assert_int_eq(km_wire_send(&io, KVMOTION__WIRE__MSG_TYPE__MSG_FILE, &file.base, NULL, 0,
				      &wire, NULL),
			 0);
	done.dir = "image-x";
	done.has_restored_pid = true;
	done.restored_pid = 4242;
	ck_assert_int_eq(km_wire_send(&io, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_DONE, &done.base,
				      NULL, 0, &wire, NULL),
			 0);
	ck_assert_int_eq(km_wire_send(&io, KVMOTION__WIRE__MSG_TYPE__MSG_BYE, &bye.base, NULL, 0,
				      &wire, NULL),
			 0);

	ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), 0);
	ck_assert_uint_eq(f.type, T_HELLO);
	{
		const Kvmotion__Wire__Hello *g = (const void *)f.msg;

		ck_assert_uint_eq(g->major, KM_WIRE_MAJOR);
		ck_assert_uint_eq(g->minor, 7);
		ck_assert_str_eq(g->software, "kvmotion test");
		ck_assert_str_eq(g->label, "model-α");
		ck_assert_uint_eq(f.payload_len, 0);
	}
	km_frame_clear(&f);
	ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), 0);
	{
		const Kvmotion__Wire__QueryChunks *g = (const void *)f.msg;

		ck_assert_uint_eq(g->n_ids, KM_WIRE_QUERY_MAX);
		for (size_t i = 0; i < g->n_ids; i++) {
			ck_assert_uint_eq(g->ids[i].len, KM_HASH_SIZE);
			ck_assert_mem_eq(g->ids[i].data, ids[i], KM_HASH_SIZE);
		}
	}
	km_frame_clear(&f);
	for (int k = 0; k < 2; k++) {
		const uint8_t *want = k ? small : big;
		size_t n = k ? sizeof(small) : sizeof(big);
		struct km_hash id;

		ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), 0);
		ck_assert_uint_eq(f.type, T_CHUNK);
		ck_assert_uint_eq(f.payload_len, n);
		ck_assert_mem_eq(f.payload, want, n);
		km_hash_buf(want, n, &id);
		ck_assert_mem_eq(((const Kvmotion__Wire__Chunk *)f.msg)->id.data, id.b,
				 KM_HASH_SIZE);
		ck_assert_uint_eq(((const Kvmotion__Wire__Chunk *)f.msg)->raw_size, n);
		km_frame_clear(&f);
	}
	ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), 0);
	ck_assert_str_eq(((const Kvmotion__Wire__File *)f.msg)->name, "pages-1.img");
	ck_assert_uint_eq(((const Kvmotion__Wire__File *)f.msg)->size, 1ull << 40);
	ck_assert_uint_eq(((const Kvmotion__Wire__File *)f.msg)->offset, 1ull << 39);
	ck_assert_int_eq(((const Kvmotion__Wire__File *)f.msg)->codec,
			 KVMOTION__WIRE__CODEC__CODEC_ZSTD);
	km_frame_clear(&f);
	ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), 0);
	ck_assert(((const Kvmotion__Wire__ImageDone *)f.msg)->has_restored_pid);
	ck_assert_int_eq(((const Kvmotion__Wire__ImageDone *)f.msg)->restored_pid, 4242);
	ck_assert(!((const Kvmotion__Wire__ImageDone *)f.msg)->has_restore_ns);
	km_frame_clear(&f);
	ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), 0);
	ck_assert_uint_eq(f.type, KVMOTION__WIRE__MSG_TYPE__MSG_BYE);
	km_frame_clear(&f);
	/* Nothing left: the end of the stream between frames. */
	ck_assert_uint_eq(m.pos, m.len);
	ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, NULL), -ECONNRESET);
	km_wire_rx_free(&rx);
	free(m.buf);
}
END_TEST

START_TEST(test_transport_truncated)
{
	struct mem whole = { 0 };
	static uint8_t data[70000];
	struct km_wire_rx rx = { 0 };
	size_t len;

	fill(data, sizeof(data), 5);
	len = put_chunk_frame(&whole, data, sizeof(data));
	for (size_t cut = 0; cut < len; cut += cut < 200 ? 1 : 997) {
		struct mem m = { .buf = whole.buf, .len = cut, .cap = whole.cap };
		struct km_wire_io io = mem_io(&m);
		struct km_frame f = { 0 };
		struct km_error err = { { 0 } };

		ck_assert_int_eq(km_wire_recv(&io, &rx, &full_limits, &f, &err), -ECONNRESET);
		ck_assert_ptr_null(f.msg);
		if (cut == 0)
			ck_assert_ptr_nonnull(strstr(err.msg, "closed"));
		else
			ck_assert_msg(strstr(err.msg, "middle of a frame"), "cut %zu: %s", cut,
				      err.msg);
	}
	km_wire_rx_free(&rx);
	free(whole.buf);
}
END_TEST

/* A bare frame header. */
static void put_header(struct mem *m, uint32_t type, uint32_t meta, uint32_t payload)
{
	uint8_t h[KM_WIRE_HEADER_SIZE];
	struct km_wire_io io = mem_io(m);

	for (int i = 0; i < 4; i++) {
		h[i] = (uint8_t)(type >> (8 * i));
		h[4 + i] = (uint8_t)(meta >> (8 * i));
		h[8 + i] = (uint8_t)(payload >> (8 * i));
	}
	io.write(io.userdata, h, sizeof(h), NULL);
}

static int recv_one(struct mem *m, const struct km_wire_limits *lim, struct km_error *err)
{
	struct km_wire_io io = mem_io(m);
	struct km_wire_rx rx = { 0 };
	struct km_frame f = { 0 };
	int r = km_wire_recv(&io, &rx, lim, &f, err);

	km_frame_clear(&f);
	km_wire_rx_free(&rx);
	return r;
}

START_TEST(test_transport_oversized)
{
	struct km_wire_limits small = { 1024, 65536 };
	struct km_error err = { { 0 } };
	Kvmotion__Wire__QueryChunks q = KVMOTION__WIRE__QUERY_CHUNKS__INIT;
	ProtobufCBinaryData *bins;
	static uint8_t id[KM_HASH_SIZE], buf[64];
	struct mem m = { 0 };
	struct km_wire_io io = mem_io(&m);
	size_t len;

	/* Refused from the header alone: nothing is allocated or read for them. */
	put_header(&m, T_HELLO, KM_WIRE_META_MAX + 1, 0);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EMSGSIZE);
	ck_assert_uint_eq(m.pos, KM_WIRE_HEADER_SIZE);
	m.len = m.pos = 0;
	put_header(&m, T_HELLO, 1025, 0);
	ck_assert_int_eq(recv_one(&m, &small, &err), -EMSGSIZE);
	m.len = m.pos = 0;
	put_header(&m, T_CHUNK, 40, 65537);
	ck_assert_int_eq(recv_one(&m, &small, &err), -EMSGSIZE);
	ck_assert_ptr_nonnull(strstr(err.msg, "65537"));
	m.len = m.pos = 0;
	put_header(&m, T_CHUNK, 40, UINT32_MAX);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EMSGSIZE);

	/* A message above 1 MiB cannot be sent either. */
	bins = calloc(40000, sizeof(*bins));
	ck_assert_ptr_nonnull(bins);
	for (size_t i = 0; i < 40000; i++)
		bins[i] = (ProtobufCBinaryData){ KM_HASH_SIZE, id };
	q.n_ids = 40000;
	q.ids = bins;
	m.len = m.pos = 0;
	ck_assert_int_eq(km_wire_send(&io, KVMOTION__WIRE__MSG_TYPE__MSG_QUERY_CHUNKS, &q.base,
				      NULL, 0, NULL, &err),
			 -EMSGSIZE);
	ck_assert_uint_eq(m.len, 0);
	ck_assert_int_eq(km_wire_pack(KVMOTION__WIRE__MSG_TYPE__MSG_QUERY_CHUNKS, &q.base, 0, buf,
				      sizeof(buf), &len),
			 -EMSGSIZE);
	/* A small one into a buffer too small for it. */
	q.n_ids = 3;
	ck_assert_int_eq(km_wire_pack(KVMOTION__WIRE__MSG_TYPE__MSG_QUERY_CHUNKS, &q.base, 0, buf,
				      sizeof(buf), &len),
			 -EMSGSIZE);
	/* A payload above the protocol's limit, and a message of another type. */
	{
		Kvmotion__Wire__Chunk c = KVMOTION__WIRE__CHUNK__INIT;

		c.id = (ProtobufCBinaryData){ KM_HASH_SIZE, id };
		ck_assert_int_eq(km_wire_pack(T_CHUNK, &c.base, KM_WIRE_PAYLOAD_MAX + 1, buf,
					      sizeof(buf), &len),
				 -EMSGSIZE);
		ck_assert_int_eq(
			km_wire_pack(T_CHUNK, &c.base, KM_WIRE_PAYLOAD_MAX, buf, sizeof(buf), &len),
			0);
	}
	ck_assert_int_eq(km_wire_pack(T_CHUNK, &q.base, 0, buf, sizeof(buf), &len), -EINVAL);
	free(bins);
	free(m.buf);
}
END_TEST

START_TEST(test_transport_bad_frames)
{
	struct km_error err = { { 0 } };
	struct mem m = { 0 };
	static const uint8_t garbage[16] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
					     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	struct km_wire_io io = mem_io(&m);
	Kvmotion__Wire__Hello h = KVMOTION__WIRE__HELLO__INIT;
	uint8_t buf[64];
	size_t len;

	put_header(&m, 0, 0, 0);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EPROTO);
	ck_assert_ptr_nonnull(strstr(err.msg, "unknown frame type 0"));
	m.len = m.pos = 0;
	put_header(&m, 99, 0, 0);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EPROTO);
	/* HELLO carries no payload. */
	m.len = m.pos = 0;
	put_header(&m, T_HELLO, 4, 10);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EPROTO);
	/* Garbage where the message should be. */
	m.len = m.pos = 0;
	put_header(&m, T_HELLO, sizeof(garbage), 0);
	io.write(io.userdata, garbage, sizeof(garbage), NULL);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EPROTO);
	ck_assert_ptr_nonnull(strstr(err.msg, "malformed HELLO"));
	/* An empty HELLO lacks its required major and minor. */
	m.len = m.pos = 0;
	put_header(&m, T_HELLO, 0, 0);
	ck_assert_int_eq(recv_one(&m, &full_limits, &err), -EPROTO);
	/* The sender cannot mislabel a message or add a payload to a type without one. */
	h.major = 1;
	ck_assert_int_eq(km_wire_pack(T_CHUNK, &h.base, 0, buf, sizeof(buf), &len), -EINVAL);
	ck_assert_int_eq(km_wire_pack(T_HELLO, &h.base, 5, buf, sizeof(buf), &len), -EINVAL);
	ck_assert_int_eq(km_wire_pack(T_HELLO, &h.base, 0, buf, sizeof(buf), &len), 0);
	free(m.buf);
}
END_TEST

START_TEST(test_transport_versions)
{
	struct km_error err = { { 0 } };

	ck_assert_int_eq(km_wire_check_version(KM_WIRE_MAJOR, 0, "x", &err), 0);
	ck_assert_int_eq(km_wire_check_version(KM_WIRE_MAJOR, 99, "x", &err), 0);
	ck_assert_int_eq(km_wire_check_version(KM_WIRE_MAJOR + 1, 0, "the sender", &err),
			 -EPROTONOSUPPORT);
	ck_assert_ptr_nonnull(strstr(err.msg, "the sender speaks migration protocol 2.0"));
	ck_assert_int_eq(km_wire_check_version(0, 1, "x", &err), -EPROTONOSUPPORT);
}
END_TEST

START_TEST(test_transport_error_codes)
{
	static const int errs[] = { EPROTO,  EPROTONOSUPPORT, EDQUOT,	 EMSGSIZE,  EINVAL,
				    EBADMSG, ENOSPC,	      ENOENT,	 EEXIST,    ENOSYS,
				    ECHILD,  EBUSY,	      ESHUTDOWN, ETIMEDOUT, EIO };
	struct mem m = { 0 };
	struct km_wire_io io = mem_io(&m);
	struct km_wire_rx rx = { 0 };
	struct km_frame f = { 0 };
	struct km_error err = { { 0 } };

	for (size_t i = 0; i < KM_ARRAY_SIZE(errs); i++) {
		ck_assert_int_eq(km_wire_errno_from_code(km_wire_code_from_errno(errs[i])),
				 -errs[i]);
		ck_assert_int_eq(km_wire_errno_from_code(km_wire_code_from_errno(-errs[i])),
				 -errs[i]);
		for (size_t j = 0; j < i; j++)
			ck_assert_int_ne(km_wire_code_from_errno(errs[i]),
					 km_wire_code_from_errno(errs[j]));
	}
	ck_assert_int_eq(km_wire_errno_from_code(km_wire_code_from_errno(ENOMEM)), -EIO);
	ck_assert_int_eq(km_wire_errno_from_code(0), -EIO);
	ck_assert_int_eq(km_wire_errno_from_code(1000), -EIO);

	/* An ERROR where a reply was expected becomes its errno and message. */
	ck_assert_int_eq(km_wire_send_error(&io, -ENOSPC, "line 1\nline 2", "disk full"), 0);
	ck_assert_int_eq(km_wire_expect(&io, &rx, &full_limits,
					KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &f, &err),
			 -ENOSPC);
	ck_assert_str_eq(err.msg, "target: disk full\nline 1\nline 2");
	/* Another type than expected is a protocol error. */
	ck_assert_int_eq(km_wire_send_error(&io, -EIO, NULL, "x"), 0);
	ck_assert_int_eq(km_wire_expect(&io, &rx, &full_limits, T_ERROR, &f, &err), -EIO);
	{
		Kvmotion__Wire__Bye bye = KVMOTION__WIRE__BYE__INIT;

		ck_assert_int_eq(km_wire_send(&io, KVMOTION__WIRE__MSG_TYPE__MSG_BYE, &bye.base,
					      NULL, 0, NULL, NULL),
				 0);
	}
	ck_assert_int_eq(km_wire_expect(&io, &rx, &full_limits, T_HELLO, &f, &err), -EPROTO);
	ck_assert_ptr_nonnull(strstr(err.msg, "expected HELLO, got BYE"));
	km_wire_rx_free(&rx);
	free(m.buf);
}
END_TEST

START_TEST(test_transport_payload_codec)
{
	struct km_wire_codec *c = NULL;
	static uint8_t raw[200000], z[300000], out[200000];
	struct km_error err = { { 0 } };
	const void *p;
	size_t zl;

	ck_assert_int_eq(km_wire_codec_new(&c), 0);
	for (size_t i = 0; i < sizeof(raw); i++)
		raw[i] = (uint8_t)(i % 251 < 200 ? 0 : i);
	ck_assert_int_ge(sizeof(z), km_wire_compress_bound(sizeof(raw)));
	ck_assert_int_eq(km_wire_compress(c, 1, raw, sizeof(raw), z, sizeof(z), &zl), 0);
	ck_assert_uint_lt(zl, sizeof(raw));
	ck_assert_int_eq(km_wire_decode(c, KVMOTION__WIRE__CODEC__CODEC_ZSTD, z, zl, sizeof(raw),
					out, sizeof(out), &p, &err),
			 0);
	ck_assert_ptr_eq(p, out);
	ck_assert_mem_eq(out, raw, sizeof(raw));
	/* raw: no copy, but the length must match */
	ck_assert_int_eq(km_wire_decode(c, KVMOTION__WIRE__CODEC__CODEC_NONE, raw, sizeof(raw),
					sizeof(raw), NULL, 0, &p, &err),
			 0);
	ck_assert_ptr_eq(p, raw);
	ck_assert_int_eq(km_wire_decode(c, KVMOTION__WIRE__CODEC__CODEC_NONE, raw, 100, 101, NULL,
					0, &p, &err),
			 -EBADMSG);
	/* a size that is not the frame's */
	ck_assert_int_eq(km_wire_decode(c, KVMOTION__WIRE__CODEC__CODEC_ZSTD, z, zl,
					sizeof(raw) - 1, out, sizeof(out), &p, &err),
			 -EBADMSG);
	/* damaged compressed bytes (zstd's checksum or structure catches them) */
	z[zl / 2] ^= 0x55;
	ck_assert_int_eq(km_wire_decode(c, KVMOTION__WIRE__CODEC__CODEC_ZSTD, z, zl, sizeof(raw),
					out, sizeof(out), &p, &err),
			 -EBADMSG);
	ck_assert_int_eq(km_wire_decode(c, KVMOTION__WIRE__CODEC__CODEC_ZSTD, z, 3, sizeof(raw),
					out, sizeof(out), &p, &err),
			 -EBADMSG);
	ck_assert_int_eq(km_wire_decode(c, 7, z, zl, sizeof(raw), out, sizeof(out), &p, &err),
			 -EPROTO);
	/* incompressible: the caller sends it raw */
	fill(raw, sizeof(raw), 9);
	ck_assert_int_eq(km_wire_compress(c, 1, raw, sizeof(raw), z, sizeof(z), &zl), -EFBIG);
	km_wire_codec_free(c);
}
END_TEST

START_TEST(test_transport_split_address)
{
	char h[64], p[16];

	ck_assert_int_eq(km_split_address("10.0.0.2:7447", h, sizeof(h), p, sizeof(p)), 0);
	ck_assert_str_eq(h, "10.0.0.2");
	ck_assert_str_eq(p, "7447");
	ck_assert_int_eq(km_split_address("[::1]:80", h, sizeof(h), p, sizeof(p)), 0);
	ck_assert_str_eq(h, "::1");
	ck_assert_int_eq(km_split_address(":0", h, sizeof(h), p, sizeof(p)), 0);
	ck_assert_str_eq(h, "");
	ck_assert_str_eq(p, "0");
	ck_assert_int_eq(km_split_address("node-b:1", h, sizeof(h), p, sizeof(p)), 0);
	ck_assert_str_eq(h, "node-b");
	ck_assert_int_eq(km_split_address("::1:80", h, sizeof(h), p, sizeof(p)), -EINVAL);
	ck_assert_int_eq(km_split_address("host", h, sizeof(h), p, sizeof(p)), -EINVAL);
	ck_assert_int_eq(km_split_address("host:", h, sizeof(h), p, sizeof(p)), -EINVAL);
	ck_assert_int_eq(km_split_address("host:80x", h, sizeof(h), p, sizeof(p)), -EINVAL);
	ck_assert_int_eq(km_split_address("[::1]80", h, sizeof(h), p, sizeof(p)), -EINVAL);
	ck_assert_int_eq(km_split_address(NULL, h, sizeof(h), p, sizeof(p)), -EINVAL);
}
END_TEST

/* ------------------------------------------------------------ a live receiver */

struct live {
	char dir[64];
	char server_store[128], client_store[128], images[128], psk[128], psk_wrong[128];
	char address[128];
	int stop[2];
	struct km_server *srv;
	pthread_t thread;
	struct km_store *cs; /* the sender's store */
};

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	ck_assert_ptr_nonnull(f);
	fputs(text, f);
	ck_assert_int_eq(fclose(f), 0);
}

static void *serve_thread(void *arg)
{
	struct live *l = arg;

	km_serve_run(l->srv, NULL);
	return NULL;
}

static void live_start_full(struct live *l, uint64_t max_bytes, unsigned max_connections,
			    unsigned idle_timeout_s, const char *podman)
{
	struct km_serve_opts o = { 0 };
	struct km_error err = { { 0 } };

	memset(l, 0, sizeof(*l));
	strcpy(l->dir, "/tmp/km-test-transport-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(l->dir));
	snprintf(l->server_store, sizeof(l->server_store), "%s/serverstore", l->dir);
	snprintf(l->client_store, sizeof(l->client_store), "%s/clientstore", l->dir);
	snprintf(l->images, sizeof(l->images), "%s/images", l->dir);
	snprintf(l->psk, sizeof(l->psk), "%s/psk", l->dir);
	snprintf(l->psk_wrong, sizeof(l->psk_wrong), "%s/psk-wrong", l->dir);
	write_text(l->psk,
		   "test:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n");
	write_text(l->psk_wrong,
		   "test:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n");
	ck_assert_int_eq(pipe(l->stop), 0);
	o.listen = "127.0.0.1:0";
	o.store = l->server_store;
	o.images = l->images;
	o.tls.psk_file = l->psk;
	o.max_bytes = max_bytes;
	o.max_files = 3;
	o.max_connections = max_connections;
	o.idle_timeout_s = idle_timeout_s;
	o.stop_fd = l->stop[0];
	o.container.podman = podman;
	ck_assert_msg(km_serve_new(&o, &l->srv, &err) == 0, "%s", err.msg);
	snprintf(l->address, sizeof(l->address), "%s", km_serve_address(l->srv));
	ck_assert_int_eq(pthread_create(&l->thread, NULL, serve_thread, l), 0);
	ck_assert_int_eq(
		km_store_open(l->client_store, KM_STORE_CREATE | KM_STORE_NOSYNC, NULL, &l->cs), 0);
}

static void live_start_with(struct live *l, uint64_t max_bytes, unsigned max_connections,
			    unsigned idle_timeout_s)
{
	live_start_full(l, max_bytes, max_connections, idle_timeout_s, NULL);
}

static void live_start(struct live *l, uint64_t max_bytes)
{
	live_start_with(l, max_bytes, 0, 30);
}

static int rm_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

static void live_stop(struct live *l)
{
	ck_assert_int_eq(write(l->stop[1], "x", 1), 1);
	ck_assert_int_eq(pthread_join(l->thread, NULL), 0);
	km_serve_free(l->srv);
	km_store_free(l->cs);
	close(l->stop[0]);
	close(l->stop[1]);
	ck_assert_int_eq(nftw(l->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS), 0);
}

static struct km_client_opts client_opts(const struct live *l, const char *psk)
{
	struct km_client_opts o = { 0 };

	o.tls.psk_file = psk ? psk : l->psk;
	o.io_timeout_ms = 20000;
	return o;
}

/* n chunks of about 'size' bytes into the sender's store; ids into ids[]. */
static void put_chunks(struct live *l, struct km_hash *ids, size_t n, size_t size, uint64_t seed)
{
	uint8_t *buf = malloc(size);

	ck_assert_ptr_nonnull(buf);
	for (size_t i = 0; i < n; i++) {
		fill(buf, size, seed + i);
		km_hash_buf(buf, size, &ids[i]);
		ck_assert_int_eq(km_store_put(l->cs, &ids[i], buf, size), 0);
	}
	free(buf);
}

static int server_has(const struct live *l, const struct km_hash *id)
{
	struct km_store *s = NULL;
	int r;

	ck_assert_int_eq(km_store_open(l->server_store, 0, NULL, &s), 0);
	r = km_store_has(s, id);
	km_store_free(s);
	return r;
}

static int count_dir(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *de;
	int n = 0;

	if (!d)
		return -1;
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			n++;
	closedir(d);
	return n;
}

/* A raw TLS connection to the live receiver, for frames the client library never sends. */
struct raw {
	struct km_tls *tls;
	struct km_tls_conn *conn;
	struct km_wire_io io;
	struct km_wire_rx rx;
};

static ssize_t raw_read(void *u, void *buf, size_t n, struct km_error *err)
{
	return km_tls_read(u, buf, n, err);
}

static int raw_write(void *u, const void *buf, size_t n, struct km_error *err)
{
	return km_tls_write(u, buf, n, err);
}

static void raw_connect(struct raw *r, const struct live *l)
{
	struct km_tls_opts o = { .psk_file = l->psk };
	struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *ai = NULL;
	char host[64], port[16];
	struct km_error err = { { 0 } };
	int fd;

	memset(r, 0, sizeof(*r));
	ck_assert_int_eq(km_split_address(l->address, host, sizeof(host), port, sizeof(port)), 0);
	ck_assert_int_eq(getaddrinfo(host, port, &hints, &ai), 0);
	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(connect(fd, ai->ai_addr, ai->ai_addrlen), 0);
	freeaddrinfo(ai);
	ck_assert_int_eq(km_tls_new(&o, false, &r->tls, &err), 0);
	ck_assert_msg(km_tls_connect(r->tls, fd, 20000, &r->conn, &err) == 0, "%s", err.msg);
	r->io = (struct km_wire_io){ .read = raw_read, .write = raw_write, .userdata = r->conn };
}

static void raw_close(struct raw *r)
{
	km_tls_conn_free(r->conn, true);
	km_tls_free(r->tls);
	km_wire_rx_free(&r->rx);
}

static void raw_send(struct raw *r, uint32_t type, const ProtobufCMessage *m, const void *payload,
		     uint32_t len)
{
	ck_assert_int_eq(km_wire_send(&r->io, type, m, payload, len, NULL, NULL), 0);
}

/* Receives the next frame, which must be 'type' (ERROR: returns its errno and message). */
static int raw_expect(struct raw *r, uint32_t type, struct km_error *err)
{
	struct km_frame f = { 0 };
	int k = km_wire_expect(&r->io, &r->rx, &full_limits, type, &f, err);

	km_frame_clear(&f);
	return k;
}

static void raw_hello(struct raw *r)
{
	Kvmotion__Wire__Hello h = KVMOTION__WIRE__HELLO__INIT;

	h.major = KM_WIRE_MAJOR;
	h.minor = KM_WIRE_MINOR;
	raw_send(r, T_HELLO, &h.base, NULL, 0);
	ck_assert_int_eq(raw_expect(r, KVMOTION__WIRE__MSG_TYPE__MSG_HELLO_REPLY, NULL), 0);
}

START_TEST(test_transport_live_chunks_dedup)
{
	struct live l;
	struct km_client *c = NULL;
	struct km_client_opts o;
	struct km_send_stats st;
	struct km_error err = { { 0 } };
	struct km_hash ids[24];

	live_start(&l, 0);
	put_chunks(&l, ids, 20, 70000, 100);
	ids[20] = ids[3]; /* repeats count once */
	ids[21] = ids[3];
	o = client_opts(&l, NULL);
	o.compress = KM_COMPRESS_ALWAYS;
	ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(km_client_target(c)->major, KM_WIRE_MAJOR);
	ck_assert_uint_eq(km_client_target(c)->max_files, 3);
	ck_assert_uint_eq(km_client_target(c)->chunker.avg_size, KM_CHUNK_AVG_DEFAULT);
	ck_assert_msg(km_client_send_chunks(c, l.cs, ids, 22, &st, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(st.chunks, 20);
	ck_assert_uint_eq(st.chunks_sent, 20);
	ck_assert_uint_eq(st.bytes_sent, 20 * 70000);
	ck_assert_uint_eq(st.chunks_deduplicated, 0);
	for (int i = 0; i < 20; i++)
		ck_assert_int_eq(server_has(&l, &ids[i]), 1);
	/* again on the same connection: all there */
	ck_assert_msg(km_client_send_chunks(c, l.cs, ids, 20, &st, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(st.chunks_sent, 0);
	ck_assert_uint_eq(st.chunks_deduplicated, 20);
	ck_assert_uint_eq(st.bytes_deduplicated, 20 * 70000);
	/* a chunk the sender lacks is named before anything is sent */
	fill((uint8_t *)&ids[22], sizeof(ids[22]), 77);
	ck_assert_int_eq(km_client_send_chunks(c, l.cs, &ids[22], 1, &st, &err), -ENOENT);
	ck_assert_ptr_nonnull(strstr(err.msg, "sender's store"));
	km_client_free(c);
	live_stop(&l);
}
END_TEST

START_TEST(test_transport_live_weights)
{
	struct live l;
	struct km_client *c = NULL;
	struct km_client_opts o;
	struct km_send_stats st;
	struct km_seed_stats ss;
	struct km_remote_weights rw;
	struct km_error err = { { 0 } };
	char model[160];
	const char *paths[1] = { model };
	static uint8_t data[3 << 20];
	struct km_store *s = NULL;
	void *idx = NULL;
	size_t n;
	FILE *f;
	int r;

	live_start(&l, 0);
	snprintf(model, sizeof(model), "%s/model.bin", l.dir);
	fill(data, sizeof(data), 11);
	memset(data + (1 << 20), 0, 1 << 20); /* zero extents are never sent */
	f = fopen(model, "w");
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fwrite(data, 1, sizeof(data), f), sizeof(data));
	fclose(f);
	ck_assert_int_eq(km_seed(l.cs, "m", paths, 1, 1, &ss, &err), 0);
	o = client_opts(&l, NULL);
	ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
	ck_assert_msg(km_client_send_weights(c, l.cs, "m", &st, &err) == 0, "%s", err.msg);
	ck_assert_uint_ge(st.chunks_sent, 2);
	ck_assert_uint_eq(st.chunks_sent, ss.chunks_added);
	ck_assert_uint_eq(st.bytes_sent, ss.bytes_added);
	ck_assert_uint_le(st.bytes_sent, sizeof(data) - (1u << 20) + 2 * KM_CHUNK_MAX_DEFAULT);
	ck_assert_int_eq(km_store_open(l.server_store, 0, NULL, &s), 0);
	ck_assert_int_eq(km_store_root_read(s, "indexes", "m.kmidx", &idx, &n), 0);
	free(idx);
	km_store_free(s);
	ck_assert(km_client_target(c)->can_materialize);
	r = km_client_materialize(c, "m", &rw, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_ge(rw.size, sizeof(data));
	km_client_free(c);
	/* an index the sender does not have */
	ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(km_client_send_weights(c, l.cs, "nope", &st, &err), -ENOENT);
	km_client_free(c);
	live_stop(&l);
}
END_TEST

START_TEST(test_transport_live_wrong_psk)
{
	struct live l;
	struct km_client *c = NULL;
	struct km_client_opts o;
	struct km_error err = { { 0 } };

	live_start(&l, 0);
	o = client_opts(&l, l.psk_wrong);
	ck_assert_int_eq(km_client_connect(l.address, &o, &c, &err), -EACCES);
	ck_assert_ptr_nonnull(strstr(err.msg, "authentication"));
	ck_assert_ptr_null(c);
	/* no credentials at all: refused before connecting */
	o.tls.psk_file = NULL;
	ck_assert_int_eq(km_client_connect(l.address, &o, &c, &err), -EINVAL);
	/* a key file that is no key */
	write_text(l.psk_wrong, "not hex\n");
	o.tls.psk_file = l.psk_wrong;
	ck_assert_int_eq(km_client_connect(l.address, &o, &c, &err), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err.msg, "hex"));
	live_stop(&l);
}
END_TEST

START_TEST(test_transport_live_unknown_major)
{
	struct live l;
	struct raw r;
	struct km_error err = { { 0 } };
	Kvmotion__Wire__Hello h = KVMOTION__WIRE__HELLO__INIT;

	live_start(&l, 0);
	raw_connect(&r, &l);
	h.major = KM_WIRE_MAJOR + 1;
	h.minor = 0;
	raw_send(&r, T_HELLO, &h.base, NULL, 0);
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_HELLO_REPLY, &err),
			 -EPROTONOSUPPORT);
	ck_assert_ptr_nonnull(strstr(err.msg, "target: the sender speaks migration protocol 2.0"));
	raw_close(&r);

	/* anything before HELLO is refused too */
	raw_connect(&r, &l);
	{
		Kvmotion__Wire__Sync s = KVMOTION__WIRE__SYNC__INIT;

		raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC, &s.base, NULL, 0);
	}
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &err), -EPROTO);
	ck_assert_ptr_nonnull(strstr(err.msg, "before HELLO"));
	raw_close(&r);
	live_stop(&l);
}
END_TEST

/* Sends IMAGE_BEGIN and one FILE named 'name'; returns the receiver's answer. */
static int try_file_name(struct live *l, const char *name, struct km_error *err)
{
	Kvmotion__Wire__ImageBegin b = KVMOTION__WIRE__IMAGE_BEGIN__INIT;
	Kvmotion__Wire__File fm = KVMOTION__WIRE__FILE__INIT;
	Kvmotion__Wire__Sync s = KVMOTION__WIRE__SYNC__INIT;
	struct raw r;
	int k;

	raw_connect(&r, l);
	raw_hello(&r);
	raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGIN, &b.base, NULL, 0);
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGUN, NULL), 0);
	ck_assert_int_eq(count_dir(l->images), 1);
	fm.name = (char *)name;
	fm.mode = 0644;
	fm.size = 5;
	fm.offset = 0;
	fm.raw_size = 5;
	fm.codec = KVMOTION__WIRE__CODEC__CODEC_NONE;
	raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_FILE, &fm.base, "evil\n", 5);
	raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC, &s.base, NULL, 0);
	k = raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, err);
	raw_close(&r);
	/* The receiver removes the image directory once the connection is gone. */
	for (int i = 0; i < 500 && count_dir(l->images) != 0; i++)
		usleep(10000);
	return k;
}

START_TEST(test_transport_live_path_tricks)
{
	static const char *const bad[] = {
		"../evil", "/tmp/evil", "a/b", "..", ".", "", ".kvmotion-incomplete", "x\ny"
	};
	struct live l;
	struct km_error err = { { 0 } };
	char path[200];
	struct stat st;

	live_start(&l, 0);
	for (size_t i = 0; i < KM_ARRAY_SIZE(bad); i++) {
		ck_assert_int_eq(try_file_name(&l, bad[i], &err), -EINVAL);
		ck_assert_msg(strstr(err.msg, "not a plain file name"), "%s: %s", bad[i], err.msg);
		ck_assert_int_eq(count_dir(l.images), 0);
	}
	snprintf(path, sizeof(path), "%s/evil", l.dir);
	ck_assert_int_ne(stat(path, &st), 0);
	ck_assert_int_ne(stat("/tmp/evil", &st), 0);
	/* a plain name is taken; the image, never committed, goes with the connection */
	ck_assert_int_eq(try_file_name(&l, "core-1.img", &err), 0);
	ck_assert_int_eq(count_dir(l.images), 0);
	live_stop(&l);
}
END_TEST

START_TEST(test_transport_live_corrupt_chunk)
{
	Kvmotion__Wire__Chunk m = KVMOTION__WIRE__CHUNK__INIT;
	static uint8_t data[50000];
	struct km_hash id;
	struct live l;
	struct raw r;
	struct km_error err = { { 0 } };

	live_start(&l, 0);
	fill(data, sizeof(data), 21);
	km_hash_buf(data, sizeof(data), &id);
	data[100] ^= 1; /* the id no longer matches */
	raw_connect(&r, &l);
	raw_hello(&r);
	m.id = (ProtobufCBinaryData){ KM_HASH_SIZE, id.b };
	m.raw_size = sizeof(data);
	m.codec = KVMOTION__WIRE__CODEC__CODEC_NONE;
	raw_send(&r, T_CHUNK, &m.base, data, sizeof(data));
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &err), -EBADMSG);
	ck_assert_ptr_nonnull(strstr(err.msg, "corrupt in flight"));
	raw_close(&r);
	ck_assert_int_eq(server_has(&l, &id), 0);

	/* a raw_size that is not the payload's */
	data[100] ^= 1;
	raw_connect(&r, &l);
	raw_hello(&r);
	m.raw_size = sizeof(data) + 1;
	raw_send(&r, T_CHUNK, &m.base, data, sizeof(data));
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &err), -EBADMSG);
	raw_close(&r);
	ck_assert_int_eq(server_has(&l, &id), 0);
	live_stop(&l);
}
END_TEST

START_TEST(test_transport_live_quota)
{
	struct live l;
	struct km_client *c = NULL;
	struct km_client_opts o;
	struct km_send_stats st;
	struct km_error err = { { 0 } };
	struct km_hash ids[5];

	live_start(&l, 100000);
	put_chunks(&l, ids, 5, 40000, 300);
	o = client_opts(&l, NULL);
	o.compress = KM_COMPRESS_NEVER;
	ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(km_client_target(c)->quota_bytes, 100000);
	ck_assert_int_eq(km_client_send_chunks(c, l.cs, ids, 5, &st, &err), -EDQUOT);
	ck_assert_ptr_nonnull(strstr(err.msg, "quota exceeded"));
	km_client_free(c);
	live_stop(&l);
}
END_TEST

START_TEST(test_transport_live_busy_and_idle)
{
	struct live l;
	struct km_client *a = NULL, *b = NULL;
	struct km_client_opts o;
	struct km_error err = { { 0 } };
	struct raw r;

	live_start_with(&l, 0, 1, 1);
	o = client_opts(&l, NULL);
	ck_assert_msg(km_client_connect(l.address, &o, &a, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(km_client_connect(l.address, &o, &b, &err), -EBUSY);
	ck_assert_ptr_nonnull(strstr(err.msg, "busy"));
	km_client_free(a);
	/* a sender silent for longer than the idle timeout (1 s) is dropped, and told */
	for (int i = 0; i < 100; i++) {
		/* the first connection's slot frees once its thread is reaped */
		if (km_client_connect(l.address, &o, &b, &err) == 0)
			break;
		usleep(20000);
	}
	ck_assert_ptr_nonnull(b);
	km_client_free(b);
	raw_connect(&r, &l);
	for (int i = 0; i < 100; i++) {
		Kvmotion__Wire__Hello h = KVMOTION__WIRE__HELLO__INIT;
		int k;

		h.major = KM_WIRE_MAJOR;
		raw_send(&r, T_HELLO, &h.base, NULL, 0);
		k = raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_HELLO_REPLY, &err);
		if (k == 0)
			break;
		/* still busy with the one before: try again */
		ck_assert_int_eq(k, -EBUSY);
		raw_close(&r);
		usleep(20000);
		raw_connect(&r, &l);
	}
	sleep(2);
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &err),
			 -ETIMEDOUT);
	ck_assert_ptr_nonnull(strstr(err.msg, "idle"));
	raw_close(&r);
	live_stop(&l);
}
END_TEST

/*
 * Sends files[] as one image (split, or unsplit with pieces that carry no
 * SHA-256) and commits; returns the answer to the commit or first refusal.
 */
static int send_files_as(struct live *l, const char *const *names, size_t n, bool complete,
			 bool unsplit)
{
	Kvmotion__Wire__ImageBegin b = KVMOTION__WIRE__IMAGE_BEGIN__INIT;
	Kvmotion__Wire__ImageCommit cm = KVMOTION__WIRE__IMAGE_COMMIT__INIT;
	struct km_error err = { { 0 } };
	struct raw r;
	int k;

	raw_connect(&r, l);
	raw_hello(&r);
	b.has_unsplit = unsplit;
	b.unsplit = unsplit;
	raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGIN, &b.base, NULL, 0);
	ck_assert_int_eq(raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGUN, NULL), 0);
	for (size_t i = 0; i < n; i++) {
		Kvmotion__Wire__File fm = KVMOTION__WIRE__FILE__INIT;

		fm.name = (char *)names[i];
		fm.mode = 0600;
		fm.size = complete ? 4 : 8;
		fm.raw_size = 4;
		fm.codec = KVMOTION__WIRE__CODEC__CODEC_NONE;
		raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_FILE, &fm.base, "data", 4);
	}
	raw_send(&r, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_COMMIT, &cm.base, NULL, 0);
	k = raw_expect(&r, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_DONE, &err);
	raw_close(&r);
	for (int i = 0; i < 500 && count_dir(l->images) != 0; i++)
		usleep(10000);
	return k;
}

static int send_files(struct live *l, const char *const *names, size_t n, bool complete)
{
	return send_files_as(l, names, n, complete, false);
}

START_TEST(test_transport_live_file_rules)
{
	static const char *const four[] = { "a.img", "b.img", "c.img", "d.img" };
	static const char *const twice[] = { "a.img", "a.img" };
	struct live l;

	live_start(&l, 0);
	/* the receiver's limit is 3 files per connection */
	ck_assert_int_eq(send_files(&l, four, 4, true), -EDQUOT);
	ck_assert_int_eq(count_dir(l.images), 0);
	ck_assert_int_eq(send_files(&l, twice, 2, true), -EEXIST);
	ck_assert_int_eq(count_dir(l.images), 0);
	/* a commit with a file half sent */
	ck_assert_int_eq(send_files(&l, four, 1, false), -EPROTO);
	ck_assert_int_eq(count_dir(l.images), 0);
	/* no manifest: the join refuses, and the directory goes */
	ck_assert_int_eq(send_files(&l, four, 1, true), -ENOENT);
	ck_assert_int_eq(count_dir(l.images), 0);
	/* an unsplit image: nothing but the piece's hash verifies it, so it must come */
	ck_assert_int_eq(send_files_as(&l, four, 1, true, true), -EPROTO);
	ck_assert_int_eq(count_dir(l.images), 0);
	live_stop(&l);
}
END_TEST

static void write_bytes(const char *path, const uint8_t *p, size_t n)
{
	FILE *f = fopen(path, "w");

	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fwrite(p, 1, n, f), n);
	ck_assert_int_eq(fclose(f), 0);
}

static void assert_same_file(const char *a, const char *b)
{
	void *pa = NULL, *pb = NULL;
	size_t na, nb;

	ck_assert_int_eq(km_read_file_at(AT_FDCWD, a, 64u << 20, &pa, &na), 0);
	ck_assert_int_eq(km_read_file_at(AT_FDCWD, b, 64u << 20, &pb, &nb), 0);
	ck_assert_uint_eq(na, nb);
	ck_assert_mem_eq(pa, pb, na);
	free(pa);
	free(pb);
}

START_TEST(test_transport_live_image)
{
	struct live l;
	struct km_client *c = NULL;
	struct km_client_opts o;
	struct km_send_stats st;
	struct km_image_result res;
	struct km_image_send_opts io = { .label = "unit", .restore = false };
	struct km_split_opts so = { .add_chunks = true, .threads = 1 };
	struct km_split_stats ss;
	struct km_error err = { { 0 } };
	static uint8_t pages[3 << 20], core[5000];
	char img[160], orig[160], path[400], path2[400], tail[256];
	struct stat sb;
	int dirfd;

	live_start(&l, 0);
	snprintf(img, sizeof(img), "%s/img", l.dir);
	snprintf(orig, sizeof(orig), "%s/orig", l.dir);
	ck_assert_int_eq(mkdir(img, 0700), 0);
	ck_assert_int_eq(mkdir(orig, 0700), 0);
	fill(pages, sizeof(pages), 31);
	memset(pages + (1 << 20), 0, 1 << 20);
	fill(core, sizeof(core), 32);
	snprintf(path, sizeof(path), "%s/pages-1.img", img);
	write_bytes(path, pages, sizeof(pages));
	snprintf(path, sizeof(path), "%s/pages-1.img", orig);
	write_bytes(path, pages, sizeof(pages));
	snprintf(path, sizeof(path), "%s/core-1.img", img);
	write_bytes(path, core, sizeof(core));
	snprintf(path, sizeof(path), "%s/dump.log", img);
	write_text(path, "CRIU's log stays home\n");
	dirfd = open(img, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(dirfd, 0);
	ck_assert_msg(km_image_split(dirfd, l.cs, &so, &ss, &err) == 0, "%s", err.msg);

	o = client_opts(&l, NULL);
	ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
	ck_assert_msg(
		km_client_send_image(c, dirfd, l.cs, &io, &st, &res, tail, sizeof(tail), &err) == 0,
		"%s", err.msg);
	km_client_free(c);
	close(dirfd);
	ck_assert_uint_eq(st.files, 3); /* core-1.img, kvmotion.manifest, kvmotion.delta */
	ck_assert_uint_eq(st.bytes_sent, ss.bytes_added);
	ck_assert_uint_eq(res.bytes_joined, sizeof(pages));
	ck_assert_int_eq(res.restored_pid, 0);
	ck_assert_ptr_nonnull(strstr(res.dir, "unit-"));
	/* the target holds the original image, joined, and nothing else */
	snprintf(path, sizeof(path), "%s/%s/pages-1.img", l.images, res.dir);
	snprintf(path2, sizeof(path2), "%s/pages-1.img", orig);
	assert_same_file(path, path2);
	snprintf(path, sizeof(path), "%s/%s/core-1.img", l.images, res.dir);
	snprintf(path2, sizeof(path2), "%s/core-1.img", img);
	assert_same_file(path, path2);
	snprintf(path, sizeof(path), "%s/%s", l.images, res.dir);
	ck_assert_int_eq(count_dir(path), 2);
	snprintf(path, sizeof(path), "%s/%s/dump.log", l.images, res.dir);
	ck_assert_int_ne(stat(path, &sb), 0);
	live_stop(&l);
}
END_TEST

/* An unsplit image (a cooperative dump): its files as they are, every piece verified. */
START_TEST(test_transport_live_unsplit_image)
{
	struct live l;
	struct km_client *c = NULL;
	struct km_client_opts o;
	struct km_send_stats st;
	struct km_image_result res;
	struct km_image_send_opts io = { .label = "unsplit", .restore = false };
	struct km_error err = { { 0 } };
	static uint8_t pages[(9 << 20) + 1], core[5000];
	char img[160], path[400], path2[400], tail[256];
	int dirfd;

	live_start(&l, 0);
	snprintf(img, sizeof(img), "%s/img", l.dir);
	ck_assert_int_eq(mkdir(img, 0700), 0);
	fill(pages, sizeof(pages), 41); /* three pieces: 4 + 4 MiB + 1 MiB and a byte */
	memset(pages + (2 << 20), 0, 3 << 20);
	fill(core, sizeof(core), 42);
	snprintf(path, sizeof(path), "%s/pages-1.img", img);
	write_bytes(path, pages, sizeof(pages));
	snprintf(path, sizeof(path), "%s/core-1.img", img);
	write_bytes(path, core, sizeof(core));
	snprintf(path, sizeof(path), "%s/empty.img", img);
	write_bytes(path, core, 0);
	snprintf(path, sizeof(path), "%s/dump.log", img);
	write_text(path, "CRIU's log stays home\n");
	dirfd = open(img, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(dirfd, 0);

	/* a piece damaged after the sender hashed it: refused, nothing stays */
	for (int compress = 0; compress < 2; compress++) {
		o = client_opts(&l, NULL);
		o.compress = compress ? KM_COMPRESS_ALWAYS : KM_COMPRESS_NEVER;
		o.test_corrupt_piece = 3;
		ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
		ck_assert_int_eq(km_client_send_image(c, dirfd, NULL, &io, &st, &res, tail,
						      sizeof(tail), &err),
				 -EBADMSG);
		ck_assert_msg(strstr(err.msg, "corrupt in flight"), "%s", err.msg);
		km_client_free(c);
		for (int i = 0; i < 500 && count_dir(l.images) != 0; i++)
			usleep(10000);
		ck_assert_int_eq(count_dir(l.images), 0);
	}

	o = client_opts(&l, NULL);
	ck_assert_msg(km_client_connect(l.address, &o, &c, &err) == 0, "%s", err.msg);
	ck_assert(km_client_target(c)->can_unsplit);
	ck_assert_msg(
		km_client_send_image(c, dirfd, NULL, &io, &st, &res, tail, sizeof(tail), &err) == 0,
		"%s", err.msg);
	km_client_free(c);
	close(dirfd);
	ck_assert(res.unsplit);
	ck_assert_uint_eq(st.files, 3);
	ck_assert_uint_eq(st.file_bytes, sizeof(pages) + sizeof(core));
	ck_assert_uint_eq(st.chunks, 0);
	ck_assert_uint_eq(st.bytes_sent, 0);
	ck_assert_uint_eq(res.bytes_joined, 0);
	ck_assert_uint_eq(res.bytes, sizeof(pages) + sizeof(core));
	snprintf(path, sizeof(path), "%s/%s/pages-1.img", l.images, res.dir);
	snprintf(path2, sizeof(path2), "%s/pages-1.img", img);
	assert_same_file(path, path2);
	snprintf(path, sizeof(path), "%s/%s/core-1.img", l.images, res.dir);
	snprintf(path2, sizeof(path2), "%s/core-1.img", img);
	assert_same_file(path, path2);
	snprintf(path, sizeof(path), "%s/%s/empty.img", l.images, res.dir);
	snprintf(path2, sizeof(path2), "%s/empty.img", img);
	assert_same_file(path, path2);
	snprintf(path, sizeof(path), "%s/%s", l.images, res.dir);
	ck_assert_int_eq(count_dir(path), 3); /* no log, no marker */
	live_stop(&l);
}
END_TEST

/* send_image of dirfd on a connection of its own (3 files a connection here). */
static int send_one(struct live *l, int dirfd, const struct km_image_send_opts *io,
		    struct km_image_result *res, struct km_error *err)
{
	struct km_client *c = NULL;
	struct km_client_opts o = client_opts(l, NULL);
	struct km_send_stats st;
	char tail[256];
	int r;

	ck_assert_msg(km_client_connect(l->address, &o, &c, err) == 0, "%s", err->msg);
	ck_assert(km_client_target(c)->can_parent);
	r = km_client_send_image(c, dirfd, NULL, io, &st, res, tail, sizeof(tail), err);
	km_client_free(c);
	return r;
}

/*
 * 1.3: a snapshot is kept only with the id its files have; an incremental
 * image is taken only over the snapshot of the id it names, and gets its
 * `parent` link.
 */
START_TEST(test_transport_live_snapshot_parent)
{
	struct live l;
	struct km_image_result res, snap;
	struct km_error err = { { 0 } };
	struct km_hash id, bad;
	static uint8_t pages[3 << 20];
	char img[160], path[400], hex[KM_HASH_HEX_SIZE], link[300];
	_cleanup_free_ char *rec = NULL;
	size_t n;
	ssize_t len;
	int dirfd;

	live_start(&l, 0);
	snprintf(img, sizeof(img), "%s/img", l.dir);
	ck_assert_int_eq(mkdir(img, 0700), 0);
	fill(pages, sizeof(pages), 51);
	snprintf(path, sizeof(path), "%s/pages-1.img", img);
	write_bytes(path, pages, sizeof(pages));
	snprintf(path, sizeof(path), "%s/pagemap-7.img", img);
	write_bytes(path, pages, 100);
	dirfd = open(img, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(dirfd, 0);
	ck_assert_int_eq(km_incr_snapshot_id(dirfd, 0, &id, &err), 0);
	bad = id;
	bad.b[3] ^= 1;

	/* a snapshot whose files do not have the id sent: refused, removed */
	{
		struct km_image_send_opts io = { .label = "snapshot", .snapshot_id = &bad };

		ck_assert_int_eq(send_one(&l, dirfd, &io, &res, &err), -EBADMSG);
		ck_assert_msg(strstr(err.msg, "has id"), "%s", err.msg);
		for (int i = 0; i < 500 && count_dir(l.images) != 0; i++)
			usleep(10000);
		ck_assert_int_eq(count_dir(l.images), 0);
	}
	{
		struct km_image_send_opts io = { .label = "snapshot", .snapshot_id = &id };

		ck_assert_msg(send_one(&l, dirfd, &io, &snap, &err) == 0, "%s", err.msg);
		ck_assert(snap.unsplit);
	}
	snprintf(path, sizeof(path), "%s/%s", l.images, snap.dir);
	{
		int fd = open(path, O_RDONLY | O_DIRECTORY);

		ck_assert_int_eq(km_read_file_at(fd, KM_SNAPSHOT_NAME, 256, (void **)&rec, &n), 0);
		close(fd);
	}
	ck_assert_uint_eq(n, KM_HASH_HEX_SIZE);
	ck_assert(memcmp(rec, km_hash_to_hex(&id, hex), KM_HASH_HEX_SIZE - 1) == 0);
	ck_assert_int_eq(rec[n - 1], '\n');

	/* incremental images over it: another id, no such directory, not a name */
	{
		struct km_image_send_opts io = { .label = "incr", .parent = snap.dir, .parent_id = &bad };

		ck_assert_int_eq(send_one(&l, dirfd, &io, &res, &err), -ENOENT);
		ck_assert_msg(strstr(err.msg, "is not snapshot"), "%s", err.msg);
		io.parent = "snapshot-nope";
		io.parent_id = &id;
		ck_assert_int_eq(send_one(&l, dirfd, &io, &res, &err), -ENOENT);
		ck_assert_msg(strstr(err.msg, "not in the image area"), "%s", err.msg);
		io.parent = "../images";
		ck_assert_int_eq(send_one(&l, dirfd, &io, &res, &err), -EINVAL);
		/* an image that is no snapshot */
		io.parent = NULL;
		io.parent_id = NULL;
		ck_assert_msg(send_one(&l, dirfd, &io, &res, &err) == 0, "%s", err.msg);
		io.parent = res.dir;
		io.parent_id = &id;
		ck_assert_int_eq(send_one(&l, dirfd, &io, &res, &err), -ENOENT);
		ck_assert_msg(strstr(err.msg, "is no snapshot"), "%s", err.msg);
		/* a parent without its id: refused by the sender */
		io.parent = snap.dir;
		io.parent_id = NULL;
		ck_assert_int_eq(send_one(&l, dirfd, &io, &res, &err), -EINVAL);
		ck_assert_int_eq(count_dir(l.images), 2);

		io.parent_id = &id;
		ck_assert_msg(send_one(&l, dirfd, &io, &res, &err) == 0, "%s", err.msg);
	}
	snprintf(path, sizeof(path), "%s/%s/parent", l.images, res.dir);
	len = readlink(path, link, sizeof(link) - 1);
	ck_assert_int_gt(len, 0);
	link[len] = 0;
	snprintf(path, sizeof(path), "../%s", snap.dir);
	ck_assert_str_eq(link, path);
	close(dirfd);
	live_stop(&l);
}
END_TEST

/* ------------------------------------------------------------ container archives */

/*
 * A stand-in for podman: logs its arguments; "container exists" answers
 * from STATE/exists, "restore" fails with STATE/fail, "inspect" says
 * exited with STATE/exited.
 */
static void fake_podman(const char *dir, char *ret_path, size_t size)
{
	char text[2048];

	snprintf(ret_path, size, "%s/podman", dir);
	snprintf(
		text, sizeof(text),
		"#!/bin/sh\n"
		"echo \"$*\" >>%s/podman.log\n"
		"case \"$1 $2\" in\n"
		"'container exists') [ -f %s/exists ] && exit 0; exit 1 ;;\n"
		"'container restore') [ -f %s/fail ] && { echo 'Error: restore broke' >&2; exit 125; }\n"
		"  echo abc123 ;;\n"
		"'container inspect') if [ -f %s/exited ]; then echo 'exited 0'; else echo 'running 4242'; fi ;;\n"
		"esac\n"
		"exit 0\n",
		dir, dir, dir, dir);
	write_text(ret_path, text);
	ck_assert_int_eq(chmod(ret_path, 0755), 0);
}

/* A checkpoint archive whose split image refers to chunks ids[0..1]. */
static void write_archive(const char *path, const struct km_hash *ids, struct km_hash *ret_mid)
{
	struct tarbuf t = { 0 };
	size_t mlen;
	void *mbuf = km_test_manifest(ids, &mlen);
	FILE *f;

	km_hash_buf(mbuf, mlen, ret_mid);
	tb_entry(&t, NULL, "checkpoint/inventory.img", '0', "INV", 3);
	tb_entry(&t, NULL, "checkpoint/" KM_MANIFEST_NAME, '0', mbuf, mlen);
	tb_entry(&t, NULL, "checkpoint/" KM_DELTA_NAME, '0', "DELTA", 5);
	tb_entry(&t, NULL, "config.dump", '0', "{}", 2);
	tb_entry(&t, NULL, "spec.dump", '0', "{}", 2);
	tb_end(&t);
	f = fopen(path, "wb");
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fwrite(t.p, 1, t.n, f), t.n);
	ck_assert_int_eq(fclose(f), 0);
	free(mbuf);
	free(t.p);
}

static int send_archive(struct live *l, const char *path, bool restore,
			struct km_archive_result *res, char *tail, size_t tail_size,
			struct km_error *err)
{
	struct km_client_opts o = client_opts(l, NULL);
	struct km_archive_send_opts ao = { .label = "unit", .restore = restore, .name = "llm" };
	struct km_send_stats st;
	struct km_client *c = NULL;
	int r;

	ck_assert_msg(km_client_connect(l->address, &o, &c, err) == 0, "%s", err->msg);
	r = km_client_send_archive(c, path, l->cs, &ao, &st, res, tail, tail_size, err);
	km_client_free(c);
	return r;
}

START_TEST(test_transport_live_archive)
{
	char sdir[] = "/tmp/km-test-podman-XXXXXX", podman[128], path[256], got[4200], root[400];
	char hex[KM_HASH_HEX_SIZE], tail[512], logp[160], text[4096];
	struct km_archive_result res;
	struct km_error err = { { 0 } };
	struct km_hash ids[2], mid;
	struct live l;
	FILE *f;
	size_t n;
	int r;

	ck_assert_ptr_nonnull(mkdtemp(sdir));
	fake_podman(sdir, podman, sizeof(podman));
	snprintf(logp, sizeof(logp), "%s/podman.log", sdir);
	live_start_full(&l, 0, 0, 30, podman);
	put_chunks(&l, ids, 2, 4096, 77); /* the manifest says 4096 */
	snprintf(path, sizeof(path), "%s/checkpoint-llm.tar", l.dir);
	write_archive(path, ids, &mid);

	/* kept: the chunks go, the manifest becomes a root there */
	ck_assert_msg(send_archive(&l, path, false, &res, tail, sizeof(tail), &err) == 0, "%s",
		      err.msg);
	ck_assert(res.split);
	ck_assert_uint_eq(res.chunks, 2);
	ck_assert(km_hash_equal(&res.manifest_id, &mid));
	ck_assert_int_eq(res.restored_pid, 0);
	ck_assert_int_eq(server_has(&l, &ids[0]), 1);
	ck_assert_int_eq(server_has(&l, &ids[1]), 1);
	snprintf(got, sizeof(got), "%s/%s/checkpoint-llm.tar", l.images, res.dir);
	ck_assert_str_eq(res.path + strlen(res.path) - strlen(got + strlen(l.images)),
			 got + strlen(l.images));
	assert_same_file(got, path);
	snprintf(root, sizeof(root), "%s/manifests/%s.kmman", l.server_store,
		 km_hash_to_hex(&mid, hex));
	ck_assert_int_eq(access(root, F_OK), 0);
	ck_assert_int_ne(access(logp, F_OK), 0); /* no restore asked: podman not run */

	/* restored: podman's restore, then inspect says it runs */
	ck_assert_msg(send_archive(&l, path, true, &res, tail, sizeof(tail), &err) == 0, "%s",
		      err.msg);
	ck_assert_int_eq(res.restored_pid, 4242);
	ck_assert_str_eq(res.container_id, "abc123");
	f = fopen(logp, "r");
	ck_assert_ptr_nonnull(f);
	n = fread(text, 1, sizeof(text) - 1, f);
	text[n] = 0;
	fclose(f);
	snprintf(got, sizeof(got), "container restore --import %s --name llm", res.path);
	ck_assert_msg(strstr(text, got), "%s", text);
	ck_assert(strstr(text, "container exists llm"));

	/* a container of that name exists there: refused, nothing run */
	write_text(strcat(strcpy(got, sdir), "/exists"), "");
	r = send_archive(&l, path, true, &res, tail, sizeof(tail), &err);
	ck_assert_int_eq(r, -EEXIST);
	ck_assert(strstr(err.msg, "exists"));
	unlink(got);

	/* restored but not running: removed again, the error says so */
	write_text(strcat(strcpy(got, sdir), "/exited"), "");
	r = send_archive(&l, path, true, &res, tail, sizeof(tail), &err);
	ck_assert_int_eq(r, -ECHILD);
	ck_assert_msg(strstr(err.msg, "not running"), "%s", err.msg);
	unlink(got);
	f = fopen(logp, "r");
	n = fread(text, 1, sizeof(text) - 1, f);
	text[n] = 0;
	fclose(f);
	ck_assert(strstr(text, "container rm -f llm"));

	/* podman's restore fails: its complaint comes back */
	write_text(strcat(strcpy(got, sdir), "/fail"), "");
	r = send_archive(&l, path, true, &res, tail, sizeof(tail), &err);
	ck_assert_int_eq(r, -ECHILD);
	ck_assert_msg(strstr(err.msg, "restore broke"), "%s", err.msg);
	ck_assert(strstr(tail, "restore broke"));
	unlink(got);
	/* the failed ones left no directory (removed once the sender hung up) */
	for (int i = 0; i < 150 && count_dir(l.images) != 2; i++)
		usleep(20000);
	ck_assert_int_eq(count_dir(l.images), 2);

	/* chunks the target lacks: refused at the commit, directory removed */
	{
		struct raw rw;
		Kvmotion__Wire__ImageBegin b = KVMOTION__WIRE__IMAGE_BEGIN__INIT;
		Kvmotion__Wire__File fm = KVMOTION__WIRE__FILE__INIT;
		Kvmotion__Wire__ArchiveCommit ac = KVMOTION__WIRE__ARCHIVE_COMMIT__INIT;
		struct km_hash other[2];
		void *buf;
		long len;

		km_hash_buf("absent-1", 8, &other[0]);
		km_hash_buf("absent-2", 8, &other[1]);
		snprintf(path, sizeof(path), "%s/other.tar", l.dir);
		write_archive(path, other, &mid);
		f = fopen(path, "rb");
		fseek(f, 0, SEEK_END);
		len = ftell(f);
		fseek(f, 0, SEEK_SET);
		buf = malloc((size_t)len);
		ck_assert_uint_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
		fclose(f);
		raw_connect(&rw, &l);
		raw_hello(&rw);
		raw_send(&rw, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGIN, &b.base, NULL, 0);
		ck_assert_int_eq(raw_expect(&rw, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGUN, NULL),
				 0);
		fm.name = (char *)"other.tar";
		fm.mode = 0600;
		fm.size = (uint64_t)len;
		fm.raw_size = (uint32_t)len;
		fm.codec = KVMOTION__WIRE__CODEC__CODEC_NONE;
		raw_send(&rw, KVMOTION__WIRE__MSG_TYPE__MSG_FILE, &fm.base, buf, (uint32_t)len);
		ac.file = (char *)"other.tar";
		ac.restore = false;
		raw_send(&rw, KVMOTION__WIRE__MSG_TYPE__MSG_ARCHIVE_COMMIT, &ac.base, NULL, 0);
		r = raw_expect(&rw, KVMOTION__WIRE__MSG_TYPE__MSG_ARCHIVE_DONE, &err);
		ck_assert_int_eq(r, -ENOENT);
		ck_assert_msg(strstr(err.msg, "2 chunks (of 2)"), "%s", err.msg);
		raw_close(&rw);
		free(buf);
	}
	/* the receiver removes the refused directory before it closes */
	for (int i = 0; i < 100 && count_dir(l.images) != 2; i++)
		usleep(20000);
	ck_assert_int_eq(count_dir(l.images), 2);
	live_stop(&l);
	snprintf(got, sizeof(got), "rm -rf %s", sdir);
	ck_assert_int_eq(system(got), 0);
}
END_TEST

START_TEST(test_transport_live_archive_no_podman)
{
	struct km_archive_result res;
	struct km_error err = { { 0 } };
	struct km_hash ids[2], mid;
	char path[256], tail[64];
	struct live l;

	live_start(&l, 0);
	put_chunks(&l, ids, 2, 4096, 3);
	snprintf(path, sizeof(path), "%s/a.tar", l.dir);
	write_archive(path, ids, &mid);
	ck_assert_int_eq(send_archive(&l, path, true, &res, tail, sizeof(tail), &err), -ENOSYS);
	ck_assert(strstr(err.msg, "--podman"));
	/* a file that is no checkpoint archive is refused before anything is sent */
	write_text(path, "hello");
	ck_assert_int_lt(send_archive(&l, path, false, &res, tail, sizeof(tail), &err), 0);
	ck_assert_int_eq(count_dir(l.images), 0);
	live_stop(&l);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("transport");
	TCase *tc = tcase_create("codec");
	TCase *live = tcase_create("live");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_transport_round_trip);
	tcase_add_test(tc, test_transport_truncated);
	tcase_add_test(tc, test_transport_oversized);
	tcase_add_test(tc, test_transport_bad_frames);
	tcase_add_test(tc, test_transport_versions);
	tcase_add_test(tc, test_transport_error_codes);
	tcase_add_test(tc, test_transport_payload_codec);
	tcase_add_test(tc, test_transport_split_address);
	suite_add_tcase(s, tc);
	tcase_set_timeout(live, 60);
	tcase_add_test(live, test_transport_live_chunks_dedup);
	tcase_add_test(live, test_transport_live_weights);
	tcase_add_test(live, test_transport_live_wrong_psk);
	tcase_add_test(live, test_transport_live_unknown_major);
	tcase_add_test(live, test_transport_live_path_tricks);
	tcase_add_test(live, test_transport_live_corrupt_chunk);
	tcase_add_test(live, test_transport_live_quota);
	tcase_add_test(live, test_transport_live_busy_and_idle);
	tcase_add_test(live, test_transport_live_file_rules);
	tcase_add_test(live, test_transport_live_image);
	tcase_add_test(live, test_transport_live_unsplit_image);
	tcase_add_test(live, test_transport_live_snapshot_parent);
	tcase_add_test(live, test_transport_live_archive);
	tcase_add_test(live, test_transport_live_archive_no_podman);
	suite_add_tcase(s, live);
	return km_check_run(s);
}
