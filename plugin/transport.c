/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "transport_internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>

#include <zstd.h>

#include "archive.h"
#include "format.h"
#include "image.h"
#include "workpool.h"

#define CONNECT_TIMEOUT_MS_DEFAULT 10000u
#define IO_TIMEOUT_MS_DEFAULT	   600000u
/* Frames up to this size go out in one write (one TLS record run). */
#define SEND_COALESCE_MAX (64u * 1024)
/* How long a sender whose write failed waits for the target's error frame. */
#define ERROR_GRACE_MS 2000u
/*
 * AUTO compression measures rather than guesses: the chunk stream is cut
 * into segments of SEGMENT_BYTES raw bytes; after a warm-up segment (the
 * socket buffer fills), one segment goes raw and one compressed, and the
 * faster of the two (end to end: workers, link and receiver, as the sender
 * sees them) is kept for the next EXPLOIT_SEGMENTS segments, then measured
 * again. Compression must win by PREFER_RAW_MARGIN to be chosen: it costs
 * CPU on both sides.
 */
#define SEGMENT_BYTES	  (16ull << 20)
#define EXPLOIT_SEGMENTS  8u
#define PREFER_RAW_MARGIN 1.10

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------ frame types */

#define FRAME_TYPE(name, msg, payload)    \
	[KVMOTION__WIRE__MSG_TYPE__MSG_## \
		name] = { #name, &kvmotion__wire__##msg##__descriptor, payload }

static const struct {
	const char *name;
	const ProtobufCMessageDescriptor *desc;
	bool payload; /* may carry a payload */
} frame_types[] = {
	FRAME_TYPE(HELLO, hello, false),
	FRAME_TYPE(HELLO_REPLY, hello_reply, false),
	FRAME_TYPE(ERROR, error, false),
	FRAME_TYPE(QUERY_CHUNKS, query_chunks, false),
	FRAME_TYPE(MISSING_CHUNKS, missing_chunks, false),
	FRAME_TYPE(CHUNK, chunk, true),
	FRAME_TYPE(SYNC, sync, false),
	FRAME_TYPE(SYNC_REPLY, sync_reply, false),
	FRAME_TYPE(PUT_INDEX, put_index, true),
	FRAME_TYPE(INDEX_STORED, index_stored, false),
	FRAME_TYPE(MATERIALIZE, materialize, false),
	FRAME_TYPE(MATERIALIZED, materialized, false),
	FRAME_TYPE(IMAGE_BEGIN, image_begin, false),
	FRAME_TYPE(IMAGE_BEGUN, image_begun, false),
	FRAME_TYPE(FILE, file, true),
	FRAME_TYPE(IMAGE_COMMIT, image_commit, false),
	FRAME_TYPE(IMAGE_DONE, image_done, false),
	FRAME_TYPE(BYE, bye, false),
	FRAME_TYPE(ARCHIVE_COMMIT, archive_commit, false),
	FRAME_TYPE(ARCHIVE_DONE, archive_done, false),
};

const ProtobufCMessageDescriptor *km_wire_descriptor(uint32_t type)
{
	if (type >= KM_ARRAY_SIZE(frame_types))
		return NULL;
	return frame_types[type].desc;
}

const char *km_wire_type_name(uint32_t type, char buf[24])
{
	if (km_wire_descriptor(type))
		return frame_types[type].name;
	snprintf(buf, 24, "type %u", type);
	return buf;
}

/* ------------------------------------------------------------ errors */

static const struct {
	int error;
	Kvmotion__Wire__ErrorCode code;
} error_codes[] = {
	{ EIO, KVMOTION__WIRE__ERROR_CODE__ERROR_INTERNAL },
	{ EPROTO, KVMOTION__WIRE__ERROR_CODE__ERROR_PROTOCOL },
	{ EPROTONOSUPPORT, KVMOTION__WIRE__ERROR_CODE__ERROR_VERSION },
	{ EDQUOT, KVMOTION__WIRE__ERROR_CODE__ERROR_QUOTA },
	{ EMSGSIZE, KVMOTION__WIRE__ERROR_CODE__ERROR_TOO_BIG },
	{ EINVAL, KVMOTION__WIRE__ERROR_CODE__ERROR_BAD_NAME },
	{ EBADMSG, KVMOTION__WIRE__ERROR_CODE__ERROR_CORRUPT },
	{ ENOSPC, KVMOTION__WIRE__ERROR_CODE__ERROR_NO_SPACE },
	{ ENOENT, KVMOTION__WIRE__ERROR_CODE__ERROR_MISSING },
	{ EEXIST, KVMOTION__WIRE__ERROR_CODE__ERROR_EXISTS },
	{ ENOSYS, KVMOTION__WIRE__ERROR_CODE__ERROR_NOT_SUPPORTED },
	{ ECHILD, KVMOTION__WIRE__ERROR_CODE__ERROR_RESTORE_FAILED },
	{ EBUSY, KVMOTION__WIRE__ERROR_CODE__ERROR_BUSY },
	{ ESHUTDOWN, KVMOTION__WIRE__ERROR_CODE__ERROR_SHUTDOWN },
	{ ETIMEDOUT, KVMOTION__WIRE__ERROR_CODE__ERROR_TIMEOUT },
};

Kvmotion__Wire__ErrorCode km_wire_code_from_errno(int error)
{
	if (error < 0)
		error = -error;
	for (size_t i = 0; i < KM_ARRAY_SIZE(error_codes); i++)
		if (error_codes[i].error == error)
			return error_codes[i].code;
	return KVMOTION__WIRE__ERROR_CODE__ERROR_INTERNAL;
}

int km_wire_errno_from_code(int code)
{
	for (size_t i = 0; i < KM_ARRAY_SIZE(error_codes); i++)
		if ((int)error_codes[i].code == code)
			return -error_codes[i].error;
	return -EIO;
}

int km_wire_check_version(uint32_t major, uint32_t minor, const char *who, struct km_error *err)
{
	if (major == KM_WIRE_MAJOR)
		return 0;
	km_error_set(
		err,
		"%s speaks migration protocol %u.%u; this kvmotion speaks major version %u only",
		who, major, minor, KM_WIRE_MAJOR);
	return -EPROTONOSUPPORT;
}

/* ------------------------------------------------------------ framing */

static void put_u32le(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32le(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int km_wire_pack(uint32_t type, const ProtobufCMessage *msg, uint32_t payload_len, uint8_t *buf,
		 size_t bufsize, size_t *ret_len)
{
	const ProtobufCMessageDescriptor *d = km_wire_descriptor(type);
	size_t meta;

	if (!d || !msg || msg->descriptor != d || (payload_len && !frame_types[type].payload))
		return -EINVAL;
	if (payload_len > KM_WIRE_PAYLOAD_MAX)
		return -EMSGSIZE;
	meta = protobuf_c_message_get_packed_size(msg);
	if (meta > KM_WIRE_META_MAX || KM_WIRE_HEADER_SIZE + meta > bufsize)
		return -EMSGSIZE;
	put_u32le(buf, type);
	put_u32le(buf + 4, (uint32_t)meta);
	put_u32le(buf + 8, payload_len);
	if (protobuf_c_message_pack(msg, buf + KM_WIRE_HEADER_SIZE) != meta)
		return -EINVAL;
	*ret_len = KM_WIRE_HEADER_SIZE + meta;
	return 0;
}

int km_wire_send(const struct km_wire_io *io, uint32_t type, const ProtobufCMessage *msg,
		 const void *payload, uint32_t payload_len, uint64_t *wire_bytes,
		 struct km_error *err)
{
	_cleanup_free_ uint8_t *buf = NULL;
	size_t meta, cap, len;
	bool coalesce;
	char tn[24];
	int r;

	meta = msg ? protobuf_c_message_get_packed_size(msg) : 0;
	if (meta > KM_WIRE_META_MAX) {
		km_error_set(err, "%s message of %zu bytes exceeds the %u-byte limit",
			     km_wire_type_name(type, tn), meta, KM_WIRE_META_MAX);
		return -EMSGSIZE;
	}
	coalesce = payload_len <= SEND_COALESCE_MAX;
	cap = KM_WIRE_HEADER_SIZE + meta + (coalesce ? payload_len : 0);
	buf = malloc(cap);
	if (!buf)
		return -ENOMEM;
	r = km_wire_pack(type, msg, payload_len, buf, cap, &len);
	if (r < 0) {
		km_error_set(err, "cannot encode a %s frame: %s", km_wire_type_name(type, tn),
			     strerror(-r));
		return r;
	}
	if (coalesce && payload_len) {
		memcpy(buf + len, payload, payload_len);
		len += payload_len;
	}
	r = io->write(io->userdata, buf, len, err);
	if (r == 0 && !coalesce)
		r = io->write(io->userdata, payload, payload_len, err);
	if (r < 0)
		return r;
	if (wire_bytes)
		*wire_bytes += KM_WIRE_HEADER_SIZE + meta + payload_len;
	return 0;
}

/* Reads exactly n bytes; 'what' names them for the error. */
static int read_exact(const struct km_wire_io *io, void *buf, size_t n, bool at_boundary,
		      const char *what, struct km_error *err)
{
	size_t done = 0;

	while (done < n) {
		ssize_t k = io->read(io->userdata, (uint8_t *)buf + done, n - done, err);

		if (k < 0)
			return (int)k;
		if (k == 0) {
			if (at_boundary && done == 0)
				km_error_set(err, "connection closed by the peer");
			else
				km_error_set(
					err,
					"connection lost in the middle of a frame (%s: %zu of %zu bytes)",
					what, done, n);
			return -ECONNRESET;
		}
		done += (size_t)k;
	}
	return 0;
}

static int grow(uint8_t **buf, size_t *cap, size_t n)
{
	uint8_t *p;

	if (n <= *cap)
		return 0;
	p = realloc(*buf, n);
	if (!p)
		return -ENOMEM;
	*buf = p;
	*cap = n;
	return 0;
}

void km_wire_rx_free(struct km_wire_rx *rx)
{
	free(rx->meta);
	free(rx->payload);
	memset(rx, 0, sizeof(*rx));
}

void km_frame_clear(struct km_frame *f)
{
	if (f->msg)
		protobuf_c_message_free_unpacked(f->msg, NULL);
	memset(f, 0, sizeof(*f));
}

int km_wire_recv(const struct km_wire_io *io, struct km_wire_rx *rx,
		 const struct km_wire_limits *lim, struct km_frame *ret, struct km_error *err)
{
	const ProtobufCMessageDescriptor *d;
	uint8_t hdr[KM_WIRE_HEADER_SIZE];
	uint32_t type, meta_len, payload_len;
	ProtobufCMessage *msg;
	char tn[24];
	int r;

	r = read_exact(io, hdr, sizeof(hdr), true, "header", err);
	if (r < 0)
		return r;
	type = get_u32le(hdr);
	meta_len = get_u32le(hdr + 4);
	payload_len = get_u32le(hdr + 8);
	d = km_wire_descriptor(type);
	if (!d) {
		km_error_set(err, "unknown frame type %u", type);
		return -EPROTO;
	}
	if (meta_len > KM_MIN(lim->max_meta, KM_WIRE_META_MAX)) {
		km_error_set(err, "%s frame with a %u-byte message: the limit is %u",
			     km_wire_type_name(type, tn), meta_len,
			     KM_MIN(lim->max_meta, KM_WIRE_META_MAX));
		return -EMSGSIZE;
	}
	if (payload_len && !frame_types[type].payload) {
		km_error_set(err, "%s frame with a payload (%u bytes): it takes none",
			     km_wire_type_name(type, tn), payload_len);
		return -EPROTO;
	}
	if (payload_len > KM_MIN(lim->max_payload, KM_WIRE_PAYLOAD_MAX)) {
		km_error_set(err, "%s frame with a %u-byte payload: the limit is %u",
			     km_wire_type_name(type, tn), payload_len,
			     KM_MIN(lim->max_payload, KM_WIRE_PAYLOAD_MAX));
		return -EMSGSIZE;
	}
	if (grow(&rx->meta, &rx->meta_cap, meta_len ? meta_len : 1) < 0 ||
	    grow(&rx->payload, &rx->payload_cap, payload_len ? payload_len : 1) < 0)
		return -ENOMEM;
	r = read_exact(io, rx->meta, meta_len, false, "message", err);
	if (r < 0)
		return r;
	msg = protobuf_c_message_unpack(d, NULL, meta_len, rx->meta);
	if (!msg) {
		km_error_set(err, "malformed %s message (%u bytes)", km_wire_type_name(type, tn),
			     meta_len);
		return -EPROTO;
	}
	r = read_exact(io, rx->payload, payload_len, false, "payload", err);
	if (r < 0) {
		protobuf_c_message_free_unpacked(msg, NULL);
		return r;
	}
	ret->type = type;
	ret->msg = msg;
	ret->payload = rx->payload;
	ret->payload_len = payload_len;
	return 0;
}

int km_wire_expect(const struct km_wire_io *io, struct km_wire_rx *rx,
		   const struct km_wire_limits *lim, uint32_t type, struct km_frame *ret,
		   struct km_error *err)
{
	struct km_frame f = { 0 };
	char a[24], b[24];
	int r;

	r = km_wire_recv(io, rx, lim, &f, err);
	if (r < 0)
		return r;
	if (f.type == KVMOTION__WIRE__MSG_TYPE__MSG_ERROR) {
		const Kvmotion__Wire__Error *e = (const Kvmotion__Wire__Error *)f.msg;

		r = km_wire_errno_from_code(e->code);
		if (e->detail && e->detail[0])
			km_error_set(err, "target: %s\n%s", e->message, e->detail);
		else
			km_error_set(err, "target: %s", e->message);
		km_frame_clear(&f);
		return r;
	}
	if (f.type != type) {
		km_error_set(err, "protocol error: expected %s, got %s", km_wire_type_name(type, a),
			     km_wire_type_name(f.type, b));
		km_frame_clear(&f);
		return -EPROTO;
	}
	*ret = f;
	return 0;
}

int km_wire_send_error(const struct km_wire_io *io, int error, const char *detail,
		       const char *message)
{
	Kvmotion__Wire__Error e = KVMOTION__WIRE__ERROR__INIT;
	char msg[1024];

	/* Keep the frame small whatever the message: cut, do not fail. */
	snprintf(msg, sizeof(msg), "%s", message);
	e.code = km_wire_code_from_errno(error);
	e.message = msg;
	e.detail = (char *)detail;
	return km_wire_send(io, KVMOTION__WIRE__MSG_TYPE__MSG_ERROR, &e.base, NULL, 0, NULL, NULL);
}

/* ------------------------------------------------------------ payload codec */

struct km_wire_codec {
	ZSTD_CCtx *cctx;
	ZSTD_DCtx *dctx;
};

int km_wire_codec_new(struct km_wire_codec **ret)
{
	struct km_wire_codec *c = calloc(1, sizeof(*c));

	if (!c)
		return -ENOMEM;
	*ret = c;
	return 0;
}

void km_wire_codec_free(struct km_wire_codec *c)
{
	if (!c)
		return;
	ZSTD_freeCCtx(c->cctx);
	ZSTD_freeDCtx(c->dctx);
	free(c);
}

size_t km_wire_compress_bound(size_t n)
{
	return ZSTD_compressBound(n);
}

int km_wire_compress(struct km_wire_codec *c, int level, const void *src, size_t n, void *dst,
		     size_t dst_cap, size_t *ret_len)
{
	size_t k;

	if (!c->cctx) {
		c->cctx = ZSTD_createCCtx();
		if (!c->cctx)
			return -ENOMEM;
	}
	k = ZSTD_compressCCtx(c->cctx, dst, dst_cap, src, n, level > 0 ? level : 1);
	if (ZSTD_isError(k))
		return -EIO;
	if (k >= n)
		return -EFBIG;
	*ret_len = k;
	return 0;
}

int km_wire_decode(struct km_wire_codec *c, int codec, const void *payload, size_t len,
		   uint32_t raw_size, void *dst, size_t dst_cap, const void **ret_raw,
		   struct km_error *err)
{
	unsigned long long content;
	size_t k;

	if (codec == KVMOTION__WIRE__CODEC__CODEC_NONE) {
		if (len != raw_size) {
			km_error_set(err, "%zu raw payload bytes for %u announced", len, raw_size);
			return -EBADMSG;
		}
		*ret_raw = payload;
		return 0;
	}
	if (codec != KVMOTION__WIRE__CODEC__CODEC_ZSTD) {
		km_error_set(err, "unknown payload codec %d", codec);
		return -EPROTO;
	}
	content = ZSTD_getFrameContentSize(payload, len);
	if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN ||
	    content != raw_size || raw_size > dst_cap) {
		km_error_set(err, "zstd payload does not announce %u bytes", raw_size);
		return -EBADMSG;
	}
	if (!c->dctx) {
		c->dctx = ZSTD_createDCtx();
		if (!c->dctx)
			return -ENOMEM;
	}
	k = ZSTD_decompressDCtx(c->dctx, dst, dst_cap, payload, len);
	if (ZSTD_isError(k) || k != raw_size) {
		km_error_set(err, "zstd payload does not decode: %s",
			     ZSTD_isError(k) ? ZSTD_getErrorName(k) : "wrong size");
		return -EBADMSG;
	}
	*ret_raw = dst;
	return 0;
}

/* ------------------------------------------------------------ addresses */

int km_split_address(const char *address, char *host, size_t host_size, char *port,
		     size_t port_size)
{
	const char *colon, *h = address;
	size_t hl;

	if (!address)
		return -EINVAL;
	if (address[0] == '[') {
		const char *close = strchr(address, ']');

		if (!close || close[1] != ':')
			return -EINVAL;
		h = address + 1;
		hl = (size_t)(close - h);
		colon = close + 1;
	} else {
		colon = strrchr(address, ':');
		if (!colon || memchr(address, ':', (size_t)(colon - address)))
			return -EINVAL;
		hl = (size_t)(colon - address);
	}
	if (hl >= host_size || !colon[1] || strlen(colon + 1) >= port_size ||
	    strspn(colon + 1, "0123456789") != strlen(colon + 1))
		return -EINVAL;
	memcpy(host, h, hl);
	host[hl] = 0;
	strcpy(port, colon + 1);
	return 0;
}

/* ------------------------------------------------------------ client */

enum seg_kind { SEG_WARMUP, SEG_PROBE_RAW, SEG_PROBE_ZSTD, SEG_EXPLOIT };

/* AUTO compression's state, kept across calls on one connection. */
struct auto_state {
	bool best_zstd; /* the current choice */
	bool measured; /* best_zstd comes from a measurement */
	double rate_raw; /* raw bytes per ns of the last probes */
	double rate_zstd;
};

struct km_client {
	struct km_tls *tls;
	struct km_tls_conn *conn;
	struct km_wire_io io;
	struct km_wire_rx rx;
	struct km_wire_limits lim;
	struct km_wire_codec *codec; /* the main thread's (file pieces) */
	struct km_target_info info;
	enum km_compress compress;
	int level;
	unsigned corrupt_nth;
	unsigned corrupt_piece_nth;
	uint64_t chunks_sent_total;
	uint64_t pieces_sent_total;
	uint64_t target_store_ns_seen; /* SyncReply's counter at the last Sync */
	bool broken;
	struct auto_state au;
};

static ssize_t tls_read(void *userdata, void *buf, size_t n, struct km_error *err)
{
	return km_tls_read(userdata, buf, n, err);
}

static int tls_write(void *userdata, const void *buf, size_t n, struct km_error *err)
{
	return km_tls_write(userdata, buf, n, err);
}

void km_socket_dead_peer(int fd, unsigned ms)
{
	int one = 1, idle = (int)KM_MAX(ms / 5000, 1u), intvl = (int)KM_MAX(ms / 10000, 1u),
	    cnt = 10;
	unsigned user = ms;

	/*
	 * Keepalive probes find a peer gone while we wait for a reply (its
	 * kernel answers them even when the daemon is busy restoring);
	 * TCP_USER_TIMEOUT bounds both the probes and unacknowledged data.
	 */
	(void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user, sizeof(user));
}

static int connect_tcp(const char *address, unsigned timeout_ms, unsigned dead_peer_ms, int *ret,
		       struct km_error *err)
{
	char host[256], port[16];
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	struct addrinfo *ai = NULL;
	int r, last = -ECONNREFUSED;

	if (km_split_address(address, host, sizeof(host), port, sizeof(port)) < 0 || !host[0]) {
		km_error_set(err, "'%s' is not HOST:PORT", address);
		return -EINVAL;
	}
	r = getaddrinfo(host, port, &hints, &ai);
	if (r != 0) {
		km_error_set(err, "cannot resolve %s: %s", host, gai_strerror(r));
		return -EHOSTUNREACH;
	}
	for (struct addrinfo *a = ai; a; a = a->ai_next) {
		int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
				a->ai_protocol);
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		int one = 1, soerr = 0;
		socklen_t len = sizeof(soerr);

		if (fd < 0) {
			last = -errno;
			continue;
		}
		if (connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
			if (errno != EINPROGRESS) {
				last = -errno;
				close(fd);
				continue;
			}
			r = poll(&p, 1, (int)timeout_ms);
			if (r <= 0) {
				last = r == 0 ? -ETIMEDOUT : -errno;
				close(fd);
				continue;
			}
			if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0 || soerr) {
				last = soerr ? -soerr : -errno;
				close(fd);
				continue;
			}
		}
		if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
			last = -errno;
			close(fd);
			continue;
		}
		/* Requests wait for replies: no Nagle delay on them. */
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		km_socket_dead_peer(fd, dead_peer_ms);
		freeaddrinfo(ai);
		*ret = fd;
		return 0;
	}
	freeaddrinfo(ai);
	km_error_set(err, "cannot connect to %s: %s", address, strerror(-last));
	return last;
}

int km_client_connect(const char *address, const struct km_client_opts *o, struct km_client **ret,
		      struct km_error *err)
{
	Kvmotion__Wire__Hello hello = KVMOTION__WIRE__HELLO__INIT;
	const Kvmotion__Wire__HelloReply *hr;
	struct km_frame f = { 0 };
	struct km_client *c;
	uint64_t t0 = now_ns();
	char software[64];
	int fd = -1, r;

	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->compress = o->compress;
	c->level = o->zstd_level > 0 ? o->zstd_level : 1;
	c->corrupt_nth = o->test_corrupt_chunk;
	c->corrupt_piece_nth = o->test_corrupt_piece;
	c->lim.max_meta = KM_WIRE_META_MAX;
	c->lim.max_payload = 0; /* replies carry none */
	r = km_wire_codec_new(&c->codec);
	if (r < 0)
		goto fail;
	r = km_tls_new(&o->tls, false, &c->tls, err);
	if (r < 0)
		goto fail;
	r = connect_tcp(address,
			o->connect_timeout_ms ? o->connect_timeout_ms : CONNECT_TIMEOUT_MS_DEFAULT,
			o->dead_peer_ms ? o->dead_peer_ms : KM_DEAD_PEER_MS_DEFAULT, &fd, err);
	if (r < 0)
		goto fail;
	r = km_tls_connect(c->tls, fd, o->io_timeout_ms ? o->io_timeout_ms : IO_TIMEOUT_MS_DEFAULT,
			   &c->conn, err);
	if (r < 0) {
		km_error_prefix(err, "%s", address);
		goto fail;
	}
	c->io = (struct km_wire_io){ .read = tls_read, .write = tls_write, .userdata = c->conn };

	snprintf(software, sizeof(software), "kvmotion %s", KM_VERSION);
	hello.major = KM_WIRE_MAJOR;
	hello.minor = KM_WIRE_MINOR;
	hello.software = software;
	hello.label = (char *)o->label;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_HELLO, &hello.base, NULL, 0, NULL,
			 err);
	if (r == 0)
		r = km_wire_expect(&c->io, &c->rx, &c->lim,
				   KVMOTION__WIRE__MSG_TYPE__MSG_HELLO_REPLY, &f, err);
	if (r < 0) {
		km_error_prefix(err, "%s: hello", address);
		goto fail;
	}
	hr = (const Kvmotion__Wire__HelloReply *)f.msg;
	r = km_wire_check_version(hr->major, hr->minor, "the target", err);
	if (r < 0) {
		km_frame_clear(&f);
		goto fail;
	}
	c->info.major = hr->major;
	c->info.minor = hr->minor;
	snprintf(c->info.software, sizeof(c->info.software), "%s",
		 hr->software ? hr->software : "");
	c->info.max_payload = KM_MIN(hr->max_payload, KM_WIRE_PAYLOAD_MAX);
	c->info.quota_bytes = hr->quota_bytes;
	c->info.max_files = hr->max_files;
	if (hr->has_chunk_min && hr->has_chunk_avg && hr->has_chunk_max)
		c->info.chunker =
			(struct km_chunker_params){ hr->chunk_min, hr->chunk_avg, hr->chunk_max };
	c->info.can_materialize = hr->has_can_materialize && hr->can_materialize;
	c->info.can_unsplit = hr->has_can_unsplit && hr->can_unsplit;
	/* The field's presence, true or false, says the receiver knows archives. */
	c->info.takes_archives = hr->has_can_restore_containers;
	c->info.can_restore_containers =
		hr->has_can_restore_containers && hr->can_restore_containers;
	c->info.can_parent = hr->has_can_parent && hr->can_parent;
	snprintf(c->info.cipher, sizeof(c->info.cipher), "%s", km_tls_cipher(c->conn));
	km_frame_clear(&f);
	c->info.connect_ns = now_ns() - t0;
	*ret = c;
	return 0;
fail:
	c->broken = true;
	km_client_free(c);
	return r;
}

void km_client_free(struct km_client *c)
{
	if (!c)
		return;
	if (c->conn && !c->broken) {
		Kvmotion__Wire__Bye bye = KVMOTION__WIRE__BYE__INIT;

		(void)km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_BYE, &bye.base, NULL, 0,
				   NULL, NULL);
	}
	km_tls_conn_free(c->conn, !c->broken);
	km_tls_free(c->tls);
	km_wire_rx_free(&c->rx);
	km_wire_codec_free(c->codec);
	free(c);
}

const struct km_target_info *km_client_target(const struct km_client *c)
{
	return &c->info;
}

void km_client_abort(struct km_client *c)
{
	if (c->conn)
		km_tls_abort(c->conn);
}

/* Marks the client broken and passes r through. */
static int broken(struct km_client *c, int r)
{
	c->broken = true;
	return r;
}

/*
 * The target answers a bad frame with an error frame and hangs up. A sender
 * that streams frames without waiting for replies looks for one between
 * frames, and after a failed write waits a little for it: its message says
 * far more than "connection reset".
 */
static int pending_error(struct km_client *c, unsigned wait_ms, struct km_error *err)
{
	struct km_frame f = { 0 };
	int r;

	if (!km_tls_readable(c->conn, wait_ms))
		return 0;
	/* Only an ERROR may come unasked: expect turns it into its errno. */
	r = km_wire_expect(&c->io, &c->rx, &c->lim, KVMOTION__WIRE__MSG_TYPE__MSG_ERROR, &f, err);
	if (r == 0) {
		km_frame_clear(&f); /* not reached: an ERROR frame gives r < 0 */
		r = -EPROTO;
	}
	return broken(c, r);
}

/* A write failed with r: report the target's error frame if one came, else r. */
static int send_failed(struct km_client *c, int r, const char *what, struct km_error *err)
{
	struct km_error e2 = { { 0 } };
	int r2;

	if (r == -EPIPE || r == -ECONNRESET || r == -ETIMEDOUT) {
		r2 = pending_error(c, ERROR_GRACE_MS, &e2);
		if (r2 < 0 && strncmp(e2.msg, "target: ", 8) == 0) {
			km_error_set(err, "%s", e2.msg);
			return broken(c, r2);
		}
	}
	km_error_prefix(err, "%s", what);
	return broken(c, r);
}

/* ------------------------------------------------------------ chunks */

struct want {
	struct km_hash id;
	uint64_t size;
};

static int cmp_want(const void *a, const void *b)
{
	return memcmp(&((const struct want *)a)->id, &((const struct want *)b)->id, KM_HASH_SIZE);
}

/* Sorts and removes repeats; returns the new count. */
static size_t unique_wants(struct want *w, size_t n)
{
	size_t k = 0;

	if (n == 0)
		return 0;
	qsort(w, n, sizeof(*w), cmp_want);
	for (size_t i = 1; i < n; i++)
		if (!km_hash_equal(&w[i].id, &w[k].id))
			w[++k] = w[i];
	return k + 1;
}

/* Asks which of w[0..n) the target lacks; missing[i] set for those. */
static int query(struct km_client *c, const struct want *w, size_t n, bool *missing,
		 struct km_send_stats *st, struct km_error *err)
{
	_cleanup_free_ ProtobufCBinaryData *ids = calloc(KM_WIRE_QUERY_MAX, sizeof(*ids));
	int r;

	if (!ids)
		return -ENOMEM;
	for (size_t base = 0; base < n; base += KM_WIRE_QUERY_MAX) {
		Kvmotion__Wire__QueryChunks q = KVMOTION__WIRE__QUERY_CHUNKS__INIT;
		const Kvmotion__Wire__MissingChunks *m;
		struct km_frame f = { 0 };
		size_t batch = KM_MIN(n - base, (size_t)KM_WIRE_QUERY_MAX);

		for (size_t i = 0; i < batch; i++)
			ids[i] = (ProtobufCBinaryData){ KM_HASH_SIZE, (uint8_t *)w[base + i].id.b };
		q.n_ids = batch;
		q.ids = ids;
		r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_QUERY_CHUNKS, &q.base, NULL,
				 0, &st->wire_bytes, err);
		if (r < 0)
			return send_failed(c, r, "query", err);
		r = km_wire_expect(&c->io, &c->rx, &c->lim,
				   KVMOTION__WIRE__MSG_TYPE__MSG_MISSING_CHUNKS, &f, err);
		if (r < 0)
			return broken(c, r);
		m = (const Kvmotion__Wire__MissingChunks *)f.msg;
		for (size_t i = 0; i < m->n_missing; i++) {
			if (m->missing[i] >= batch || (i && m->missing[i] <= m->missing[i - 1])) {
				km_frame_clear(&f);
				km_error_set(
					err,
					"protocol error: the target's missing-chunk list is not ascending indexes below %zu",
					batch);
				return broken(c, -EPROTO);
			}
			missing[base + m->missing[i]] = true;
		}
		km_frame_clear(&f);
	}
	return 0;
}

/* Segment n's kind: a warm-up, then probe pairs, each followed by exploitation. */
static enum seg_kind seg_kind_of(uint64_t n)
{
	uint64_t k;

	if (n == 0)
		return SEG_WARMUP;
	k = (n - 1) % (2 + EXPLOIT_SEGMENTS);
	return k == 0 ? SEG_PROBE_RAW : k == 1 ? SEG_PROBE_ZSTD : SEG_EXPLOIT;
}

/* Whether the chunks of segment n are compressed (decided when they are queued). */
static bool seg_compress(const struct km_client *c, uint64_t n)
{
	if (c->compress != KM_COMPRESS_AUTO)
		return c->compress == KM_COMPRESS_ALWAYS;
	switch (seg_kind_of(n)) {
	case SEG_PROBE_RAW:
		return false;
	case SEG_PROBE_ZSTD:
		return true;
	default:
		return c->au.best_zstd;
	}
}

/* Segment n, of 'bytes' raw bytes, took ns to send: learn from it. */
static void seg_measured(struct km_client *c, uint64_t n, uint64_t bytes, uint64_t ns)
{
	double rate = (double)bytes / (double)(ns ? ns : 1);

	if (c->compress != KM_COMPRESS_AUTO || bytes < SEGMENT_BYTES)
		return; /* a short tail segment says little */
	if (seg_kind_of(n) == SEG_PROBE_RAW) {
		c->au.rate_raw = rate;
	} else if (seg_kind_of(n) == SEG_PROBE_ZSTD && c->au.rate_raw > 0) {
		c->au.rate_zstd = rate;
		c->au.best_zstd = rate > c->au.rate_raw * PREFER_RAW_MARGIN;
		c->au.measured = true;
	}
}

/* One chunk in flight between a worker and the sending thread. */
struct slot {
	struct km_client *c;
	struct km_store *store;
	const struct want *w;
	uint8_t *raw;
	size_t raw_cap;
	uint8_t *z;
	size_t z_cap;
	struct km_wire_codec *codec;
	const uint8_t *payload;
	size_t payload_len;
	bool compress; /* asked: compress this one */
	bool compressed; /* done: it is (smaller than raw) */
	uint64_t segment;
	bool ready;
	int r;
	struct km_error err;
	pthread_mutex_t *lock;
	pthread_cond_t *cond;
};

static int prepare_chunk(void *arg)
{
	struct slot *sl = arg;
	struct km_client *c = sl->c;
	char hex[KM_HASH_HEX_SIZE];
	size_t got = 0, zl = 0;
	int r;

	sl->err.msg[0] = 0;
	sl->compressed = false;
	r = grow(&sl->raw, &sl->raw_cap, sl->w->size);
	if (r < 0)
		goto out;
	/* km_store_get hashes what it read: the sender sends nothing unverified. */
	r = km_store_get(sl->store, &sl->w->id, sl->raw, sl->w->size, &got);
	if (r == 0 && got != sl->w->size)
		r = -EBADMSG;
	if (r < 0) {
		km_error_set(&sl->err, "chunk %s in the sender's store: %s",
			     km_hash_to_hex(&sl->w->id, hex),
			     r == -ENOENT ? "missing" :
			     r == -EBADMSG || r == -EFBIG ?
					    "corrupt (content or size does not match)" :
					    strerror(-r));
		goto out;
	}
	sl->payload = sl->raw;
	sl->payload_len = got;
	if (got && sl->compress) {
		r = grow(&sl->z, &sl->z_cap, km_wire_compress_bound(got));
		if (r < 0)
			goto out;
		r = km_wire_compress(sl->codec, c->level, sl->raw, got, sl->z, sl->z_cap, &zl);
		if (r == 0) {
			sl->payload = sl->z;
			sl->payload_len = zl;
			sl->compressed = true;
		} else if (r != -EFBIG) {
			km_error_set(&sl->err, "compressing chunk %s: %s",
				     km_hash_to_hex(&sl->w->id, hex), strerror(-r));
			goto out;
		}
		r = 0;
	}
out:
	pthread_mutex_lock(sl->lock);
	sl->r = r;
	sl->ready = true;
	pthread_cond_broadcast(sl->cond);
	pthread_mutex_unlock(sl->lock);
	return 0;
}

static int send_one_chunk(struct km_client *c, struct slot *sl, size_t i, size_t n,
			  struct km_send_stats *st, struct km_error *err)
{
	Kvmotion__Wire__Chunk m = KVMOTION__WIRE__CHUNK__INIT;
	char hex[KM_HASH_HEX_SIZE], what[128];
	int r;

	if (sl->payload_len > c->info.max_payload) {
		km_error_set(err,
			     "chunk %s of %zu bytes exceeds the target's frame limit of %u bytes",
			     km_hash_to_hex(&sl->w->id, hex), sl->payload_len, c->info.max_payload);
		return broken(c, -EMSGSIZE);
	}
	c->chunks_sent_total++;
	if (c->corrupt_nth && c->chunks_sent_total == c->corrupt_nth && sl->payload_len) {
		/* Test knob: damage the bytes after the sender's hash, as a bad link would. */
		((uint8_t *)sl->payload)[sl->payload_len / 2] ^= 0x40;
	}
	/* The target hangs up after an error: ask before writing more. */
	r = pending_error(c, 0, err);
	if (r < 0)
		return broken(c, r);
	m.id = (ProtobufCBinaryData){ KM_HASH_SIZE, (uint8_t *)sl->w->id.b };
	m.raw_size = (uint32_t)sl->w->size;
	m.codec = sl->compressed ? KVMOTION__WIRE__CODEC__CODEC_ZSTD :
				   KVMOTION__WIRE__CODEC__CODEC_NONE;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_CHUNK, &m.base, sl->payload,
			 (uint32_t)sl->payload_len, &st->wire_bytes, err);
	if (r < 0) {
		snprintf(what, sizeof(what), "sending chunk %zu of %zu (%.16s...)", i + 1, n,
			 km_hash_to_hex(&sl->w->id, hex));
		return send_failed(c, r, what, err);
	}
	st->chunks_sent++;
	st->bytes_sent += sl->w->size;
	st->chunks_compressed += sl->compressed;
	return 0;
}

/* Reads, hashes, compresses in a pool; sends in order from this thread. */
static int stream_chunks(struct km_client *c, struct km_store *s, const struct want *w,
			 const bool *missing, size_t n, size_t n_missing, struct km_send_stats *st,
			 struct km_error *err)
{
	pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
	struct km_workpool *pool = NULL;
	_cleanup_free_ struct slot *slots = NULL;
	_cleanup_free_ size_t *order = NULL;
	unsigned workers, window;
	size_t submitted = 0, k = 0;
	uint64_t sub_seg = 0, sub_bytes = 0, seg_bytes = 0, seg_t0;
	int r = 0;

	if (n_missing == 0)
		return 0;
	order = malloc(n_missing * sizeof(*order));
	if (!order)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++)
		if (missing[i])
			order[k++] = i;
	workers = KM_MIN(km_cpu_count(), 8u);
	window = 2 * workers + 2;
	slots = calloc(window, sizeof(*slots));
	if (!slots)
		return -ENOMEM;
	r = km_workpool_new(workers, window, &pool);
	if (r < 0)
		return r;
	for (unsigned i = 0; i < window; i++) {
		slots[i] = (struct slot){ .c = c, .store = s, .lock = &lock, .cond = &cond };
		r = km_wire_codec_new(&slots[i].codec);
		if (r < 0)
			goto out;
	}
	seg_t0 = now_ns();
	for (size_t i = 0; i < n_missing; i++) {
		struct slot *sl;

		while (submitted < n_missing && submitted < i + window) {
			sl = &slots[submitted % window];
			sl->w = &w[order[submitted]];
			sl->ready = false;
			/* AUTO: decided per segment when queued, measured when sent. */
			sl->segment = sub_seg;
			sl->compress = seg_compress(c, sub_seg);
			sub_bytes += sl->w->size;
			if (sub_bytes >= SEGMENT_BYTES) {
				sub_seg++;
				sub_bytes = 0;
			}
			r = km_workpool_submit(pool, prepare_chunk, sl);
			if (r < 0)
				goto out;
			submitted++;
		}
		sl = &slots[i % window];
		pthread_mutex_lock(&lock);
		while (!sl->ready)
			pthread_cond_wait(&cond, &lock);
		pthread_mutex_unlock(&lock);
		if (sl->r < 0) {
			r = sl->r;
			km_error_set(err, "%s", sl->err.msg);
			goto out;
		}
		r = send_one_chunk(c, sl, i, n_missing, st, err);
		if (r < 0)
			goto out;
		/* The next chunk was queued already: its segment is known. */
		seg_bytes += sl->w->size;
		if (i + 1 == n_missing || slots[(i + 1) % window].segment != sl->segment) {
			uint64_t t = now_ns();

			seg_measured(c, sl->segment, seg_bytes, t - seg_t0);
			seg_t0 = t;
			seg_bytes = 0;
		}
	}
out:
	/* Jobs point into slots: let them finish before freeing anything. */
	km_workpool_free(pool);
	for (unsigned i = 0; i < window; i++) {
		free(slots[i].raw);
		free(slots[i].z);
		km_wire_codec_free(slots[i].codec);
	}
	pthread_cond_destroy(&cond);
	pthread_mutex_destroy(&lock);
	if (r < 0)
		c->broken = true;
	return r;
}

static int sync_target(struct km_client *c, struct km_send_stats *st, struct km_error *err)
{
	Kvmotion__Wire__Sync m = KVMOTION__WIRE__SYNC__INIT;
	const Kvmotion__Wire__SyncReply *sr;
	struct km_frame f = { 0 };
	int r;

	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC, &m.base, NULL, 0,
			 &st->wire_bytes, err);
	if (r < 0)
		return send_failed(c, r, "sync", err);
	r = km_wire_expect(&c->io, &c->rx, &c->lim, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &f,
			   err);
	if (r < 0)
		return broken(c, r);
	sr = (const Kvmotion__Wire__SyncReply *)f.msg;
	if (sr->chunks != c->chunks_sent_total) {
		km_error_set(err, "the target received %llu chunks, %llu were sent",
			     (unsigned long long)sr->chunks,
			     (unsigned long long)c->chunks_sent_total);
		km_frame_clear(&f);
		return broken(c, -EPROTO);
	}
	st->target_store_ns += sr->store_ns - KM_MIN(sr->store_ns, c->target_store_ns_seen);
	c->target_store_ns_seen = sr->store_ns;
	km_frame_clear(&f);
	return 0;
}

static int send_wants(struct km_client *c, struct km_store *s, struct want *w, size_t n,
		      struct km_send_stats *st, struct km_error *err)
{
	_cleanup_free_ bool *missing = NULL;
	size_t n_missing = 0;
	uint64_t t0;
	int r;

	if (c->broken) {
		km_error_set(err, "the connection failed earlier");
		return -ENOTCONN;
	}
	n = unique_wants(w, n);
	missing = calloc(n ? n : 1, sizeof(*missing));
	if (!missing)
		return -ENOMEM;
	t0 = now_ns();
	r = query(c, w, n, missing, st, err);
	st->query_ns += now_ns() - t0;
	if (r < 0)
		return r;
	for (size_t i = 0; i < n; i++) {
		st->chunks++;
		st->bytes += w[i].size;
		if (missing[i]) {
			n_missing++;
		} else {
			st->chunks_deduplicated++;
			st->bytes_deduplicated += w[i].size;
		}
	}
	t0 = now_ns();
	r = stream_chunks(c, s, w, missing, n, n_missing, st, err);
	if (r == 0)
		r = sync_target(c, st, err);
	st->chunks_ns += now_ns() - t0;
	return r;
}

int km_client_send_chunks(struct km_client *c, struct km_store *s, const struct km_hash *ids,
			  size_t n, struct km_send_stats *ret, struct km_error *err)
{
	struct km_send_stats st = { 0 };
	_cleanup_free_ struct want *w = calloc(n ? n : 1, sizeof(*w));
	uint64_t t0 = now_ns();
	char hex[KM_HASH_HEX_SIZE];
	int r;

	if (!w)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		w[i].id = ids[i];
		r = km_store_stat(s, &ids[i], &w[i].size);
		if (r < 0) {
			km_error_set(err, "chunk %s: %s in the sender's store",
				     km_hash_to_hex(&ids[i], hex),
				     r == -ENOENT ? "missing" : strerror(-r));
			return r;
		}
	}
	r = send_wants(c, s, w, n, &st, err);
	if (r < 0)
		return r;
	st.total_ns = now_ns() - t0;
	if (ret)
		*ret = st;
	return 0;
}

/* The CHUNK extents of files[0..n) as wants (with repeats). */
static int wants_of(const struct km_file_entry *files, size_t n_files, struct want **ret,
		    size_t *ret_n)
{
	struct want *w;
	size_t n = 0, k = 0;

	for (size_t i = 0; i < n_files; i++)
		for (size_t j = 0; j < files[i].n_extents; j++)
			n += files[i].extents[j].kind == KM_EXTENT_CHUNK;
	w = calloc(n ? n : 1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	for (size_t i = 0; i < n_files; i++)
		for (size_t j = 0; j < files[i].n_extents; j++) {
			const struct km_extent *e = &files[i].extents[j];

			if (e->kind == KM_EXTENT_CHUNK)
				w[k++] = (struct want){ .id = e->id, .size = e->length };
		}
	*ret = w;
	*ret_n = n;
	return 0;
}

int km_client_send_weights(struct km_client *c, struct km_store *s, const char *index_name,
			   struct km_send_stats *ret, struct km_error *err)
{
	Kvmotion__Wire__PutIndex m = KVMOTION__WIRE__PUT_INDEX__INIT;
	struct km_send_stats st = { 0 };
	struct km_weights_index *idx = NULL;
	_cleanup_free_ void *buf = NULL;
	_cleanup_free_ struct want *w = NULL;
	struct km_frame f = { 0 };
	char root[300];
	uint64_t t0 = now_ns(), t1;
	size_t size, n;
	int r;

	if (!km_filename_is_plain(index_name) || strlen(index_name) > 200) {
		km_error_set(err, "invalid weights index name '%s'", index_name);
		return -EINVAL;
	}
	snprintf(root, sizeof(root), "%s.kmidx", index_name);
	r = km_store_root_read(s, "indexes", root, &buf, &size);
	if (r < 0) {
		km_error_set(err, "weights index %s of store %s: %s", index_name, km_store_path(s),
			     r == -ENOENT ? "no such index (seed it first)" : strerror(-r));
		return r;
	}
	if (size > c->info.max_payload) {
		km_error_set(err, "weights index %s (%zu bytes) exceeds the target's frame limit",
			     index_name, size);
		return -EMSGSIZE;
	}
	r = km_weights_index_decode(buf, size, &idx, err);
	if (r < 0) {
		km_error_prefix(err, "weights index %s", index_name);
		return r;
	}
	r = wants_of(idx->files, idx->n_files, &w, &n);
	km_weights_index_free(idx);
	if (r < 0)
		return r;
	r = send_wants(c, s, w, n, &st, err);
	if (r < 0)
		return r;

	t1 = now_ns();
	m.name = (char *)index_name;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_PUT_INDEX, &m.base, buf,
			 (uint32_t)size, &st.wire_bytes, err);
	if (r < 0)
		return send_failed(c, r, "sending the weights index", err);
	r = km_wire_expect(&c->io, &c->rx, &c->lim, KVMOTION__WIRE__MSG_TYPE__MSG_INDEX_STORED, &f,
			   err);
	if (r < 0)
		return broken(c, r);
	km_frame_clear(&f);
	st.index_ns = now_ns() - t1;
	st.total_ns = now_ns() - t0;
	if (ret)
		*ret = st;
	return 0;
}

int km_client_materialize(struct km_client *c, const char *index_name,
			  struct km_remote_weights *ret, struct km_error *err)
{
	Kvmotion__Wire__Materialize m = KVMOTION__WIRE__MATERIALIZE__INIT;
	const Kvmotion__Wire__Materialized *mr;
	struct km_frame f = { 0 };
	uint64_t t0 = now_ns();
	int r;

	if (c->broken) {
		km_error_set(err, "the connection failed earlier");
		return -ENOTCONN;
	}
	m.index_name = (char *)index_name;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_MATERIALIZE, &m.base, NULL, 0, NULL,
			 err);
	if (r < 0)
		return send_failed(c, r, "materialize", err);
	r = km_wire_expect(&c->io, &c->rx, &c->lim, KVMOTION__WIRE__MSG_TYPE__MSG_MATERIALIZED, &f,
			   err);
	if (r < 0)
		return broken(c, r);
	mr = (const Kvmotion__Wire__Materialized *)f.msg;
	if (mr->id.len != KM_HASH_SIZE) {
		km_frame_clear(&f);
		km_error_set(err, "protocol error: a weights id of %zu bytes", mr->id.len);
		return broken(c, -EPROTO);
	}
	if (ret) {
		memset(ret, 0, sizeof(*ret));
		snprintf(ret->path, sizeof(ret->path), "%s", mr->path);
		memcpy(ret->id.b, mr->id.data, KM_HASH_SIZE);
		ret->size = mr->size;
		ret->written = mr->written;
		ret->bytes_hashed = mr->bytes_hashed;
		ret->target_ns = mr->ns;
		ret->ns = now_ns() - t0;
	}
	km_frame_clear(&f);
	return 0;
}

/* ------------------------------------------------------------ images */

/* Sent besides the regular files: not CRIU's logs (written during the dump). */
static bool not_sent(const char *name)
{
	return fnmatch("*.log", name, 0) == 0;
}

/* One file piece in flight between a worker and the sending thread. */
struct piece {
	struct km_client *c;
	int dirfd;
	const char *name;
	uint64_t off;
	uint32_t len;
	bool hash; /* send the piece's SHA-256 */
	bool compress; /* asked */
	bool compressed; /* done: smaller than raw */
	uint64_t segment;
	uint8_t *raw;
	uint8_t *z;
	size_t z_cap;
	struct km_wire_codec *codec;
	const uint8_t *payload;
	size_t payload_len;
	struct km_hash sha;
	bool ready;
	int r;
	struct km_error err;
	pthread_mutex_t *lock;
	pthread_cond_t *cond;
};

/* Reads, hashes and (if asked) compresses one piece; runs in a worker. */
static int prepare_piece(void *arg)
{
	struct piece *p = arg;
	_cleanup_close_ int fd = -1;
	size_t zl = 0;
	ssize_t k;
	int r = 0;

	p->err.msg[0] = 0;
	p->compressed = false;
	fd = openat(p->dirfd, p->name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		r = -errno;
		km_error_set(&p->err, "image file %s: %s", p->name, strerror(-r));
		goto out;
	}
	k = km_pread_full(fd, p->raw, p->len, (off_t)p->off);
	if (k < 0 || (size_t)k != p->len) {
		r = k < 0 ? (int)k : -EIO;
		km_error_set(&p->err, "image file %s: %s", p->name,
			     k < 0 ? strerror(-r) : "changed size while being sent");
		goto out;
	}
	/*
	 * The receiver checks this before writing a byte of the piece. A
	 * split image goes without: its join verifies every byte (manifest,
	 * delta, chunks), and hashing costs ~0.7 ns a byte on each side.
	 */
	if (p->hash)
		km_hash_buf(p->raw, p->len, &p->sha);
	p->payload = p->raw;
	p->payload_len = p->len;
	if (p->len && p->compress) {
		r = km_wire_compress(p->codec, p->c->level, p->raw, p->len, p->z, p->z_cap, &zl);
		if (r == 0) {
			p->payload = p->z;
			p->payload_len = zl;
			p->compressed = true;
		} else if (r != -EFBIG) {
			km_error_set(&p->err, "compressing image file %s: %s", p->name,
				     strerror(-r));
			goto out;
		}
		r = 0;
	}
out:
	pthread_mutex_lock(p->lock);
	p->r = r;
	p->ready = true;
	pthread_cond_broadcast(p->cond);
	pthread_mutex_unlock(p->lock);
	return 0;
}

#define UNMEASURED UINT64_MAX

struct image_file {
	char *name; /* borrowed from the listing */
	uint64_t size;
	uint32_t mode;
	bool may_compress;
};

/* Whether the pieces of 'segment' of the file stream are compressed. */
static bool piece_compress(const struct km_client *c, const struct image_file *f, uint64_t segment)
{
	if (!f->may_compress)
		return false;
	/*
	 * AUTO before a measurement of this stream: as the chunks measured
	 * on this connection, else yes (CRIU's small images compress well
	 * and cost little); then segments probed as for chunks.
	 */
	if (c->compress == KM_COMPRESS_AUTO && seg_kind_of(segment) == SEG_WARMUP)
		return c->au.measured ? c->au.best_zstd : true;
	return seg_compress(c, segment);
}

static int send_piece(struct km_client *c, const struct image_file *f, struct piece *p,
		      struct km_send_stats *st, struct km_error *err)
{
	Kvmotion__Wire__File m = KVMOTION__WIRE__FILE__INIT;
	char what[300];
	int r;

	c->pieces_sent_total++;
	if (c->corrupt_piece_nth && c->pieces_sent_total == c->corrupt_piece_nth &&
	    p->payload_len) {
		/* Test knob: damage the bytes after the sender's hash, as a bad link would. */
		((uint8_t *)p->payload)[p->payload_len / 2] ^= 0x40;
	}
	r = pending_error(c, 0, err);
	if (r < 0)
		return broken(c, r);
	m.name = f->name;
	m.mode = f->mode;
	m.size = f->size;
	m.offset = p->off;
	m.raw_size = p->len;
	m.codec = p->compressed ? KVMOTION__WIRE__CODEC__CODEC_ZSTD :
				  KVMOTION__WIRE__CODEC__CODEC_NONE;
	m.has_sha256 = p->hash;
	m.sha256 = (ProtobufCBinaryData){ KM_HASH_SIZE, p->sha.b };
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_FILE, &m.base, p->payload,
			 (uint32_t)p->payload_len, &st->wire_bytes, err);
	if (r < 0) {
		snprintf(what, sizeof(what), "sending image file %s", f->name);
		return send_failed(c, r, what, err);
	}
	st->file_bytes += p->len;
	st->pieces_compressed += p->compressed;
	if (p->off + p->len == f->size)
		st->files++;
	return 0;
}

/*
 * Sends files[0..n) piece by piece: workers read, hash and compress pieces
 * ahead, this thread sends them in order (the receiver writes each file
 * front to back). AUTO compression measures segments of the file bytes as
 * it does for chunks.
 */
static int stream_files(struct km_client *c, int dirfd, const struct image_file *files, size_t n,
			bool hash, struct km_send_stats *st, struct km_error *err)
{
	pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
	struct km_workpool *pool = NULL;
	_cleanup_free_ struct piece *slots = NULL;
	_cleanup_free_ size_t *slot_file = NULL;
	uint32_t piece_max = KM_MIN((uint32_t)KM_WIRE_FILE_PIECE, c->info.max_payload);
	unsigned workers, window;
	size_t q_file = 0, done = 0, queued = 0;
	uint64_t q_off = 0, sub_seg = 0, sub_bytes = 0, seg_bytes = 0, seg_t0, t_send;
	bool q_end = n == 0;
	int r = 0;

	if (piece_max == 0)
		piece_max = KM_WIRE_FILE_PIECE;
	workers = KM_MIN(km_cpu_count(), 4u);
	window = 2 * workers + 1;
	slots = calloc(window, sizeof(*slots));
	slot_file = calloc(window, sizeof(*slot_file));
	if (!slots || !slot_file)
		return -ENOMEM;
	r = km_workpool_new(workers, window, &pool);
	if (r < 0)
		return r;
	for (unsigned i = 0; i < window; i++) {
		slots[i] = (struct piece){
			.c = c, .dirfd = dirfd, .hash = hash, .lock = &lock, .cond = &cond
		};
		slots[i].raw = malloc(piece_max);
		slots[i].z_cap = km_wire_compress_bound(piece_max);
		slots[i].z = malloc(slots[i].z_cap);
		r = slots[i].raw && slots[i].z ? km_wire_codec_new(&slots[i].codec) : -ENOMEM;
		if (r < 0)
			goto out;
	}
	seg_t0 = now_ns();
	while (!q_end || done < queued) {
		struct piece *p;

		/* Queue pieces up to the window; an empty file is one empty piece. */
		while (!q_end && queued < done + window) {
			const struct image_file *f = &files[q_file];

			p = &slots[queued % window];
			slot_file[queued % window] = q_file;
			p->name = f->name;
			p->off = q_off;
			p->len = (uint32_t)KM_MIN((uint64_t)piece_max, f->size - q_off);
			p->ready = false;
			/* a file never compressed (the delta) is no part of the measurement */
			p->segment = f->may_compress ? sub_seg : UNMEASURED;
			p->compress = piece_compress(c, f, sub_seg);
			sub_bytes += f->may_compress ? p->len : 0;
			if (sub_bytes >= SEGMENT_BYTES) {
				sub_seg++;
				sub_bytes = 0;
			}
			q_off += p->len;
			if (q_off >= f->size) {
				q_off = 0;
				q_end = ++q_file == n;
			}
			r = km_workpool_submit(pool, prepare_piece, p);
			if (r < 0)
				goto out;
			queued++;
		}
		p = &slots[done % window];
		pthread_mutex_lock(&lock);
		while (!p->ready)
			pthread_cond_wait(&cond, &lock);
		pthread_mutex_unlock(&lock);
		if (p->r < 0) {
			r = p->r;
			km_error_set(err, "%s", p->err.msg);
			goto out;
		}
		t_send = now_ns();
		r = send_piece(c, &files[slot_file[done % window]], p, st, err);
		if (r < 0)
			goto out;
		done++;
		if (p->segment == UNMEASURED) {
			seg_t0 += now_ns() - t_send;
			continue;
		}
		seg_bytes += p->len;
		if (done == queued || slots[done % window].segment != p->segment) {
			uint64_t t = now_ns();

			seg_measured(c, p->segment, seg_bytes, t - seg_t0);
			seg_t0 = t;
			seg_bytes = 0;
		}
	}
out:
	/* Jobs point into slots: let them finish before freeing anything. */
	km_workpool_free(pool);
	for (unsigned i = 0; i < window; i++) {
		free(slots[i].raw);
		free(slots[i].z);
		km_wire_codec_free(slots[i].codec);
	}
	pthread_cond_destroy(&cond);
	pthread_mutex_destroy(&lock);
	if (r < 0)
		c->broken = true;
	return r;
}

int km_client_send_image(struct km_client *c, int dirfd, struct km_store *s,
			 const struct km_image_send_opts *o, struct km_send_stats *ret,
			 struct km_image_result *ret_result, char *log_tail, size_t log_tail_size,
			 struct km_error *err)
{
	Kvmotion__Wire__ImageBegin begin = KVMOTION__WIRE__IMAGE_BEGIN__INIT;
	Kvmotion__Wire__ImageCommit commit = KVMOTION__WIRE__IMAGE_COMMIT__INIT;
	const Kvmotion__Wire__ImageDone *done;
	struct km_send_stats st = { 0 };
	struct km_image_result res = { 0 };
	struct km_manifest *m = NULL;
	_cleanup_free_ struct want *w = NULL;
	_cleanup_free_ struct image_file *files = NULL;
	char **names = NULL;
	struct km_frame f = { 0 };
	size_t n_names = 0, n_w = 0;
	uint64_t t0 = now_ns(), t1, t_commit = 0;
	bool unsplit;
	int r;

	if (c->broken) {
		km_error_set(err, "the connection failed earlier");
		return -ENOTCONN;
	}
	if (o && (o->snapshot_id || o->parent) && !c->info.can_parent) {
		km_error_set(err, "the target (%s, protocol %u.%u) takes no snapshots or incremental images",
			     c->info.software, c->info.major, c->info.minor);
		return -ENOSYS;
	}
	if (o && o->parent && !o->parent_id) {
		km_error_set(err, "an incremental image needs its parent's id");
		return -EINVAL;
	}
	r = km_image_read_manifest(dirfd, &m, err);
	unsplit = r == -ENOENT;
	if (unsplit) {
		/* CRIU's image as it wrote it: its files are all there is to send. */
		if (!c->info.can_unsplit) {
			km_error_set(
				err,
				"the target (%s, protocol %u.%u) takes split images only: split it first with 'kvmotion split DIR --store S'",
				c->info.software, c->info.major, c->info.minor);
			return -ENOSYS;
		}
		if (err)
			err->msg[0] = 0;
	} else if (r < 0) {
		return r;
	} else {
		r = wants_of(m->files, m->n_files, &w, &n_w);
		km_manifest_free(m);
		if (r < 0)
			return r;
	}
	r = km_list_files_at(dirfd, not_sent, &names, &n_names);
	if (r < 0) {
		km_error_set(err, "cannot list the image directory: %s", strerror(-r));
		return r;
	}
	if (c->info.max_files && n_names > c->info.max_files) {
		km_error_set(err, "the image has %zu files, the target takes %u per connection",
			     n_names, c->info.max_files);
		r = -EDQUOT;
		goto out;
	}
	files = calloc(n_names ? n_names : 1, sizeof(*files));
	if (!files) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < n_names; i++) {
		struct stat sb;

		if (fstatat(dirfd, names[i], &sb, AT_SYMLINK_NOFOLLOW) < 0) {
			r = -errno;
			km_error_set(err, "image file %s: %s", names[i], strerror(-r));
			goto out;
		}
		files[i] = (struct image_file){
			.name = names[i],
			.size = (uint64_t)sb.st_size,
			.mode = sb.st_mode & 0777,
			/* The delta is zstd frames already. */
			.may_compress = c->compress != KM_COMPRESS_NEVER &&
					strcmp(names[i], KM_DELTA_NAME) != 0,
		};
	}

	/* Chunks first: the target joins with them once the files are in. */
	if (!unsplit) {
		r = send_wants(c, s, w, n_w, &st, err);
		if (r < 0)
			goto out;
	}

	t1 = now_ns();
	begin.label = (char *)(o && o->label ? o->label : NULL);
	begin.has_unsplit = unsplit;
	begin.unsplit = unsplit;
	if (o && o->snapshot_id) {
		begin.has_snapshot_id = true;
		begin.snapshot_id.data = (uint8_t *)o->snapshot_id->b;
		begin.snapshot_id.len = KM_HASH_SIZE;
	}
	if (o && o->parent) {
		begin.parent = (char *)o->parent;
		begin.has_parent_id = true;
		begin.parent_id.data = (uint8_t *)o->parent_id->b;
		begin.parent_id.len = KM_HASH_SIZE;
	}
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGIN, &begin.base, NULL, 0,
			 &st.wire_bytes, err);
	if (r < 0) {
		r = send_failed(c, r, "image begin", err);
		goto out;
	}
	r = km_wire_expect(&c->io, &c->rx, &c->lim, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGUN, &f,
			   err);
	if (r < 0) {
		r = broken(c, r);
		goto out;
	}
	snprintf(res.dir, sizeof(res.dir), "%s", ((const Kvmotion__Wire__ImageBegun *)f.msg)->dir);
	res.unsplit = unsplit;
	km_frame_clear(&f);
	r = stream_files(c, dirfd, files, n_names, unsplit, &st, err);
	if (r < 0)
		goto out;
	st.files_ns = now_ns() - t1;

	t1 = t_commit = now_ns();
	commit.restore = o && o->restore;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_COMMIT, &commit.base, NULL, 0,
			 &st.wire_bytes, err);
	if (r < 0) {
		r = send_failed(c, r, "image commit", err);
		goto out;
	}
	r = km_wire_recv(&c->io, &c->rx, &c->lim, &f, err);
	if (r == 0 && f.type == KVMOTION__WIRE__MSG_TYPE__MSG_ERROR) {
		const Kvmotion__Wire__Error *e = (const Kvmotion__Wire__Error *)f.msg;

		r = km_wire_errno_from_code(e->code);
		km_error_set(err, "target: %s", e->message);
		if (log_tail && log_tail_size)
			snprintf(log_tail, log_tail_size, "%s", e->detail ? e->detail : "");
		km_frame_clear(&f);
		r = broken(c, r);
		goto out;
	}
	if (r == 0 && f.type != KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_DONE) {
		km_frame_clear(&f);
		km_error_set(err, "protocol error: expected IMAGE_DONE");
		r = -EPROTO;
	}
	if (r < 0) {
		r = broken(c, r);
		goto out;
	}
	done = (const Kvmotion__Wire__ImageDone *)f.msg;
	res.files = done->files;
	res.bytes = done->bytes;
	res.bytes_joined = done->bytes_joined;
	res.join_ns = done->join_ns;
	res.restored_pid = done->has_restored_pid ? done->restored_pid : 0;
	res.restore_ns = done->has_restore_ns ? done->restore_ns : 0;
	res.gpu_restore_ns = done->has_gpu_restore_ns ? done->gpu_restore_ns : 0;
	res.resume_ns = done->has_resume_ns ? done->resume_ns : 0;
	res.snapshot_ns = done->has_snapshot_ns ? done->snapshot_ns : 0;
	km_frame_clear(&f);
	st.commit_ns = now_ns() - t1;
	if (ret_result)
		*ret_result = res;
out:
	/* on failure too: what was sent before it, for the report */
	if (t_commit && !st.commit_ns)
		st.commit_ns = now_ns() - t_commit;
	st.total_ns = now_ns() - t0;
	if (ret)
		*ret = st;
	km_free_names(names, n_names);
	return r;
}

/* ------------------------------------------------------------ archives */

static int archive_commit(struct km_client *c, const char *name,
			  const struct km_archive_send_opts *o, struct km_archive_result *res,
			  char *log_tail, size_t log_tail_size, struct km_error *err)
{
	Kvmotion__Wire__ArchiveCommit commit = KVMOTION__WIRE__ARCHIVE_COMMIT__INIT;
	const Kvmotion__Wire__ArchiveDone *done;
	struct km_frame f = { 0 };
	int r;

	commit.file = (char *)name;
	commit.restore = o->restore;
	commit.name = (char *)o->name;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_ARCHIVE_COMMIT, &commit.base, NULL,
			 0, NULL, err);
	if (r < 0)
		return send_failed(c, r, "archive commit", err);
	r = km_wire_recv(&c->io, &c->rx, &c->lim, &f, err);
	if (r == 0 && f.type == KVMOTION__WIRE__MSG_TYPE__MSG_ERROR) {
		const Kvmotion__Wire__Error *e = (const Kvmotion__Wire__Error *)f.msg;

		r = km_wire_errno_from_code(e->code);
		km_error_set(err, "target: %s", e->message);
		if (log_tail && log_tail_size)
			snprintf(log_tail, log_tail_size, "%s", e->detail ? e->detail : "");
		km_frame_clear(&f);
		return broken(c, r);
	}
	if (r == 0 && f.type != KVMOTION__WIRE__MSG_TYPE__MSG_ARCHIVE_DONE) {
		km_frame_clear(&f);
		km_error_set(err, "protocol error: expected ARCHIVE_DONE");
		r = -EPROTO;
	}
	if (r < 0)
		return broken(c, r);
	done = (const Kvmotion__Wire__ArchiveDone *)f.msg;
	snprintf(res->dir, sizeof(res->dir), "%s", done->dir);
	snprintf(res->path, sizeof(res->path), "%s", done->path);
	res->bytes = done->bytes;
	res->split = done->split;
	res->chunks = done->chunks;
	res->check_ns = done->check_ns;
	if (done->has_manifest_id && done->manifest_id.len == KM_HASH_SIZE)
		memcpy(res->manifest_id.b, done->manifest_id.data, KM_HASH_SIZE);
	snprintf(res->container_id, sizeof(res->container_id), "%s",
		 done->container_id ? done->container_id : "");
	res->restored_pid = done->has_restored_pid ? done->restored_pid : 0;
	res->restore_ns = done->has_restore_ns ? done->restore_ns : 0;
	km_frame_clear(&f);
	return 0;
}

int km_client_send_archive(struct km_client *c, const char *path, struct km_store *s,
			   const struct km_archive_send_opts *o, struct km_send_stats *ret,
			   struct km_archive_result *ret_result, char *log_tail,
			   size_t log_tail_size, struct km_error *err)
{
	Kvmotion__Wire__ImageBegin begin = KVMOTION__WIRE__IMAGE_BEGIN__INIT;
	struct km_send_stats st = { 0 };
	struct km_archive_result res = { 0 };
	struct km_manifest *m = NULL;
	_cleanup_free_ struct want *w = NULL;
	_cleanup_free_ char *dir = NULL;
	_cleanup_close_ int fd = -1, dirfd = -1;
	struct km_frame f = { 0 };
	struct image_file af;
	struct stat ast;
	const char *name;
	size_t n_w = 0;
	uint64_t t0 = now_ns(), t1;
	int r;

	if (c->broken) {
		km_error_set(err, "the connection failed earlier");
		return -ENOTCONN;
	}
	if (!c->info.takes_archives) {
		km_error_set(err, "the target (%s, protocol %u.%u) takes no container archives",
			     c->info.software, c->info.major, c->info.minor);
		return -ENOSYS;
	}
	if (o->restore && !c->info.can_restore_containers) {
		km_error_set(err, "the target restores no containers (kvmotion serve --podman)");
		return -ENOSYS;
	}
	if (o->restore && (!o->name || !o->name[0])) {
		km_error_set(err, "a container restore needs the container's name");
		return -EINVAL;
	}
	/* Sent under its own name, which must be a plain one for the target. */
	name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
	dir = name == path ? strdup(".") : strndup(path, (size_t)(name - path));
	if (!dir)
		return -ENOMEM;
	if (!km_filename_is_plain(name) || name[0] == '.') {
		km_error_set(err, "archive %s: its name must be a plain file name", path);
		return -EINVAL;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || dirfd < 0) {
		r = -errno;
		km_error_set(err, "archive %s: %s", path, strerror(-r));
		return r;
	}
	r = km_archive_check_layout(fd, err);
	if (r < 0) {
		km_error_prefix(err, "archive %s", path);
		return r;
	}
	/* A split image refers to chunks: those the target lacks go first. */
	r = km_archive_manifest(fd, &m, NULL, err);
	if (r == 0) {
		r = wants_of(m->files, m->n_files, &w, &n_w);
		km_manifest_free(m);
		if (r < 0)
			return r;
	} else if (r != -ENOENT) {
		km_error_prefix(err, "archive %s", path);
		return r;
	}
	err->msg[0] = 0;
	if (fstat(fd, &ast) < 0) {
		r = -errno;
		km_error_set(err, "archive %s: %s", path, strerror(-r));
		return r;
	}
	if (n_w) {
		if (!s) {
			km_error_set(err, "archive %s holds a split image: a store is needed",
				     path);
			return -EINVAL;
		}
		r = send_wants(c, s, w, n_w, &st, err);
		if (r < 0)
			return r;
	}

	t1 = now_ns();
	begin.label = (char *)(o->label ? o->label : "archive");
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGIN, &begin.base, NULL, 0,
			 &st.wire_bytes, err);
	if (r < 0)
		return send_failed(c, r, "image begin", err);
	r = km_wire_expect(&c->io, &c->rx, &c->lim, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGUN, &f,
			   err);
	if (r < 0)
		return broken(c, r);
	km_frame_clear(&f);
	/* The archive's own files are verified by nothing else: hash its pieces. */
	af = (struct image_file){ .name = (char *)name,
				  .size = (uint64_t)ast.st_size,
				  .mode = ast.st_mode & 0777,
				  .may_compress = true };
	r = stream_files(c, dirfd, &af, 1, true, &st, err);
	if (r < 0)
		return r;
	st.files_ns = now_ns() - t1;
	t1 = now_ns();
	r = archive_commit(c, name, o, &res, log_tail, log_tail_size, err);
	if (r < 0)
		return r;
	st.commit_ns = now_ns() - t1;
	st.total_ns = now_ns() - t0;
	if (ret)
		*ret = st;
	if (ret_result)
		*ret_result = res;
	return 0;
}
