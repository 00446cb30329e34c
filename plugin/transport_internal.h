/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_TRANSPORT_INTERNAL_H
#define KM_TRANSPORT_INTERNAL_H

/*
 * The frame codec of the migration protocol, shared by the sender
 * (transport.c), the receiver (serve.c) and the unit tests: the only place
 * besides those two that sees the generated wire.pb-c.h. It works on any
 * byte stream (struct km_wire_io): TLS in use, memory in the tests.
 *
 * A frame: u32 LE type, u32 LE meta_len, u32 LE payload_len, then meta_len
 * bytes of the packed message of that type, then payload_len raw bytes.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "transport.h"
#include "util.h"
#include "wire.pb-c.h"

struct km_wire_io {
	/* >0 bytes read, 0 at the end of the stream, <0 -errno (err set) */
	ssize_t (*read)(void *userdata, void *buf, size_t n, struct km_error *err);
	/* all n bytes or -errno (err set) */
	int (*write)(void *userdata, const void *buf, size_t n, struct km_error *err);
	void *userdata;
};

struct km_wire_limits {
	uint32_t max_meta; /* <= KM_WIRE_META_MAX */
	uint32_t max_payload; /* <= KM_WIRE_PAYLOAD_MAX */
};

/* Receive buffers, reused from frame to frame. Zero-initialize. */
struct km_wire_rx {
	uint8_t *meta;
	size_t meta_cap;
	uint8_t *payload;
	size_t payload_cap;
};
void km_wire_rx_free(struct km_wire_rx *rx);

struct km_frame {
	uint32_t type;
	ProtobufCMessage *msg; /* the unpacked message; km_frame_clear frees it */
	const uint8_t *payload; /* in the rx buffer: valid until the next receive */
	uint32_t payload_len;
};
void km_frame_clear(struct km_frame *f);

/* The message descriptor of a frame type, NULL for an unknown type. */
const ProtobufCMessageDescriptor *km_wire_descriptor(uint32_t type);
/* "HELLO", "CHUNK", ...; "type N" for an unknown one (static or buf). */
const char *km_wire_type_name(uint32_t type, char buf[24]);

/*
 * Packs a frame's header and message into buf (at most bufsize bytes);
 * *ret_len gets its length. -EMSGSIZE if the message exceeds
 * KM_WIRE_META_MAX or the buffer, -EINVAL for a message that is not of
 * 'type'.
 */
int km_wire_pack(uint32_t type, const ProtobufCMessage *msg, uint32_t payload_len, uint8_t *buf,
		 size_t bufsize, size_t *ret_len);

/* Packs and writes one frame; adds the bytes written to *wire_bytes (may be NULL). */
int km_wire_send(const struct km_wire_io *io, uint32_t type, const ProtobufCMessage *msg,
		 const void *payload, uint32_t payload_len, uint64_t *wire_bytes,
		 struct km_error *err);

/*
 * Reads one frame. Errors: -ECONNRESET the stream ended (between frames or
 * inside one: err says which), -EMSGSIZE meta or payload above 'lim',
 * -EPROTO an unknown type or a message that does not unpack, other <0 from
 * io->read.
 */
int km_wire_recv(const struct km_wire_io *io, struct km_wire_rx *rx,
		 const struct km_wire_limits *lim, struct km_frame *ret, struct km_error *err);

/*
 * Reads one frame that must be of 'type'. A MSG_ERROR is turned into its
 * errno with err = "target: MESSAGE" (plus "\n" and the detail, if any);
 * any other type is -EPROTO.
 */
int km_wire_expect(const struct km_wire_io *io, struct km_wire_rx *rx,
		   const struct km_wire_limits *lim, uint32_t type, struct km_frame *ret,
		   struct km_error *err);

/* Sends MSG_ERROR for -errno 'error'; detail may be NULL. Best effort: returns io's error. */
int km_wire_send_error(const struct km_wire_io *io, int error, const char *detail,
		       const char *message);

Kvmotion__Wire__ErrorCode km_wire_code_from_errno(int error);
/* A negative errno. */
int km_wire_errno_from_code(int code);

/* 0 for a major version this build speaks, else -EPROTONOSUPPORT with err. */
int km_wire_check_version(uint32_t major, uint32_t minor, const char *who, struct km_error *err);

/*
 * Makes a lost peer fail the socket's calls with ETIMEDOUT after about ms
 * (keepalive and TCP_USER_TIMEOUT), on both sides of a connection.
 */
void km_socket_dead_peer(int fd, unsigned ms);

/* zstd contexts of one connection (the only other file that includes zstd.h is delta.c). */
struct km_wire_codec;
int km_wire_codec_new(struct km_wire_codec **ret);
void km_wire_codec_free(struct km_wire_codec *c);
/* Upper bound of a compressed payload of n raw bytes. */
size_t km_wire_compress_bound(size_t n);
/*
 * Compresses n bytes into dst (dst_cap >= km_wire_compress_bound(n)).
 * -EFBIG when the result would not be smaller than n (send it raw).
 */
int km_wire_compress(struct km_wire_codec *c, int level, const void *src, size_t n, void *dst,
		     size_t dst_cap, size_t *ret_len);
/*
 * Decodes a payload of 'codec' to exactly raw_size bytes: *ret_raw points
 * to them, the payload itself for CODEC_NONE (no copy), else dst (dst_cap
 * >= raw_size). -EBADMSG (err says why) for a payload that does not decode
 * to raw_size bytes, -EPROTO for an unknown codec.
 */
int km_wire_decode(struct km_wire_codec *c, int codec, const void *payload, size_t len,
		   uint32_t raw_size, void *dst, size_t dst_cap, const void **ret_raw,
		   struct km_error *err);

#endif
