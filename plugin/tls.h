/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_TLS_H
#define KM_TLS_H

/*
 * Authenticated, encrypted byte streams for the migration protocol: TLS 1.3
 * through OpenSSL (the only module that includes its TLS headers), in one of
 * two modes, both mutual:
 *
 *   pre-shared key  TLS 1.3 external PSK (RFC 8446 section 2.2) with
 *                   TLS_AES_128_GCM_SHA256 and an (EC)DHE exchange
 *                   (psk_dhe_ke), so a stolen key does not open recorded
 *                   sessions. OpenSSL 3.0's psk_use_session/psk_find_session
 *                   callbacks; no certificate anywhere. The key file holds
 *                   one line, "HEX" or "IDENTITY:HEX", 16 to 64 bytes of key
 *                   (e.g. `openssl rand -hex 32`); the identity defaults to
 *                   "kvmotion". Both ends read the same file.
 *   certificates    each end presents cert + key and verifies the other's
 *                   chain against 'ca' (the server requires a client
 *                   certificate). The client checks the server's name only
 *                   when server_name is set: a private cluster CA is the
 *                   trust anchor.
 *
 * No anonymous mode exists: a server without either refuses to start.
 * Session tickets are off (nothing but frames travels after the handshake,
 * so a sender can poll for an error frame while it streams).
 *
 * Errors: -EACCES authentication failed (err says what OpenSSL reported),
 * -ECONNRESET the peer went away, -ETIMEDOUT a read or write timed out,
 * -EPROTO a TLS-level failure after the handshake, other -errno from the
 * socket. A write to a connection the peer closed returns -EPIPE without
 * raising SIGPIPE (blocked around the write in the calling thread only).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "util.h"

struct km_tls_opts {
	const char *psk_file; /* PSK mode */
	const char *cert; /* certificate mode: all three */
	const char *key;
	const char *ca;
	const char *server_name; /* client, certificate mode: check this name (NULL: CA only) */
};

struct km_tls;
struct km_tls_conn;

/* Loads keys and certificates; -EINVAL for neither mode or both, with err. */
int km_tls_new(const struct km_tls_opts *o, bool server, struct km_tls **ret, struct km_error *err);
void km_tls_free(struct km_tls *t);
/* "pre-shared key (identity X)" or "certificates" */
const char *km_tls_mode(const struct km_tls *t);

/*
 * Runs the handshake on connected socket fd, which the connection owns from
 * here on (closed on failure too). timeout_ms bounds every read and write
 * (0: none).
 */
int km_tls_connect(struct km_tls *t, int fd, unsigned timeout_ms, struct km_tls_conn **ret,
		   struct km_error *err);
int km_tls_accept(struct km_tls *t, int fd, unsigned timeout_ms, struct km_tls_conn **ret,
		  struct km_error *err);

/* Frees; with 'notify' sends TLS close_notify first. Closes the fd. NULL is fine. */
void km_tls_conn_free(struct km_tls_conn *c, bool notify);

/* Reads up to n bytes: >0 bytes read, 0 at a clean end of stream, <0 error. */
ssize_t km_tls_read(struct km_tls_conn *c, void *buf, size_t n, struct km_error *err);
/* Writes all n bytes or fails. */
int km_tls_write(struct km_tls_conn *c, const void *buf, size_t n, struct km_error *err);

/* 1 if a read would not block (decrypted bytes buffered or the socket readable), else 0. */
int km_tls_readable(struct km_tls_conn *c, unsigned timeout_ms);

/* Sets the read and write timeout (0: none). */
int km_tls_set_timeout(struct km_tls_conn *c, unsigned timeout_ms);

/*
 * For a server that answered with an error: sends close_notify, shuts the
 * write side and discards what the peer still sends until it closes or
 * timeout_ms passes, so that the closing socket does not reset the
 * connection and destroy the answer before the peer reads it.
 */
void km_tls_drain(struct km_tls_conn *c, unsigned timeout_ms);
/* The same for a bare socket (a handshake that failed: its alert is sent already). */
void km_socket_drain(int fd, unsigned timeout_ms);

/* Shuts the socket down both ways (any thread): blocked reads and writes fail. */
void km_tls_abort(struct km_tls_conn *c);

/* Who the peer authenticated as: PSK identity or certificate subject. */
const char *km_tls_peer_identity(const struct km_tls_conn *c);
/* The protocol and cipher negotiated, e.g. "TLSv1.3 TLS_AES_128_GCM_SHA256". */
const char *km_tls_cipher(const struct km_tls_conn *c);

#endif
