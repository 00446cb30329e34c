/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "tls.h"

#include <ctype.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "format.h"
#include "hash.h"

#define PSK_MIN		     16
#define PSK_MAX		     64
#define PSK_IDENTITY_DEFAULT "kvmotion"
#define PSK_FILE_MAX	     4096

/* TLS_AES_128_GCM_SHA256: the PSK's hash must be the cipher's (SHA-256). */
static const unsigned char psk_cipher_id[] = { 0x13, 0x01 };

struct km_tls {
	SSL_CTX *ctx;
	bool server;
	bool psk_mode;
	uint8_t psk[PSK_MAX];
	size_t psk_len;
	char identity[129];
	char server_name[256];
	char mode[200];
};

struct km_tls_conn {
	const struct km_tls *tls;
	SSL *ssl;
	int fd;
	bool got_data; /* client: a byte came from the server since the handshake */
	char identity[256];
	char cipher[96];
};

/* ------------------------------------------------------------ errors */

/* The first queued OpenSSL error's reason (the root cause), queue cleared. */
static unsigned long ssl_error_pop(char *buf, size_t size)
{
	unsigned long first = ERR_get_error(), e;
	const char *reason;

	while ((e = ERR_get_error()) != 0)
		;
	reason = first ? ERR_reason_error_string(first) : NULL;
	if (reason)
		snprintf(buf, size, "%s", reason);
	else if (first)
		ERR_error_string_n(first, buf, size);
	else
		snprintf(buf, size, "no details from OpenSSL");
	return first;
}

/*
 * OpenSSL's socket BIO writes with write(2): a peer that went away would
 * raise SIGPIPE and kill a process that did not ignore it. Block it in this
 * thread around TLS calls and take back a SIGPIPE that the call raised.
 */
struct sigpipe_guard {
	sigset_t old;
	bool was_pending;
};

static void sigpipe_block(struct sigpipe_guard *g)
{
	sigset_t pipe_set, pending;

	sigemptyset(&pipe_set);
	sigaddset(&pipe_set, SIGPIPE);
	sigemptyset(&pending);
	sigpending(&pending);
	g->was_pending = sigismember(&pending, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &pipe_set, &g->old);
}

static void sigpipe_restore(struct sigpipe_guard *g, int saved_errno)
{
	sigset_t pipe_set, pending;

	sigemptyset(&pipe_set);
	sigaddset(&pipe_set, SIGPIPE);
	if (saved_errno == EPIPE && !g->was_pending) {
		const struct timespec zero = { 0, 0 };

		sigemptyset(&pending);
		sigpending(&pending);
		if (sigismember(&pending, SIGPIPE))
			(void)sigtimedwait(&pipe_set, NULL, &zero);
	}
	pthread_sigmask(SIG_SETMASK, &g->old, NULL);
	errno = saved_errno;
}

/* ------------------------------------------------------------ PSK */

static int load_psk(struct km_tls *t, const char *path, struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	_cleanup_free_ char *text = NULL;
	size_t n, len = 0;
	char *s, *end, *colon, *hex;
	int r;

	r = km_read_file_at(AT_FDCWD, path, PSK_FILE_MAX, &buf, &n);
	if (r < 0) {
		km_error_set(err, "pre-shared key file %s: %s", path,
			     r == -EFBIG ? "too large to be a key file" : strerror(-r));
		return r;
	}
	text = malloc(n + 1);
	if (!text) {
		OPENSSL_cleanse(buf, n);
		return -ENOMEM;
	}
	memcpy(text, buf, n);
	text[n] = 0;
	OPENSSL_cleanse(buf, n);
	s = text;
	while (*s && isspace((unsigned char)*s))
		s++;
	end = s + strlen(s);
	while (end > s && isspace((unsigned char)end[-1]))
		*--end = 0;
	colon = strchr(s, ':');
	hex = s;
	snprintf(t->identity, sizeof(t->identity), "%s", PSK_IDENTITY_DEFAULT);
	if (colon) {
		*colon = 0;
		if (colon == s || (size_t)(colon - s) >= sizeof(t->identity)) {
			OPENSSL_cleanse(text, n);
			km_error_set(
				err,
				"pre-shared key file %s: the identity before ':' must be 1 to %zu characters",
				path, sizeof(t->identity) - 1);
			return -EINVAL;
		}
		snprintf(t->identity, sizeof(t->identity), "%s", s);
		hex = colon + 1;
	}
	for (char *p = hex; *p; p += 2) {
		int hi = km_hex_digit(p[0]), lo = p[1] ? km_hex_digit(p[1]) : -1;

		if (hi < 0 || lo < 0 || len == PSK_MAX) {
			len = 0;
			break;
		}
		t->psk[len++] = (uint8_t)(hi << 4 | lo);
	}
	OPENSSL_cleanse(text, n);
	if (len < PSK_MIN) {
		OPENSSL_cleanse(t->psk, sizeof(t->psk));
		km_error_set(
			err,
			"pre-shared key file %s: expected one line of %d to %d hex-encoded bytes ('[IDENTITY:]HEX', e.g. from 'openssl rand -hex 32')",
			path, PSK_MIN, PSK_MAX);
		return -EINVAL;
	}
	t->psk_len = len;
	return 0;
}

static SSL_SESSION *psk_session(SSL *ssl, const struct km_tls *t)
{
	const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, psk_cipher_id);
	SSL_SESSION *s;

	if (!cipher)
		return NULL;
	s = SSL_SESSION_new();
	if (!s)
		return NULL;
	if (!SSL_SESSION_set1_master_key(s, t->psk, t->psk_len) ||
	    !SSL_SESSION_set_cipher(s, cipher) ||
	    !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
		SSL_SESSION_free(s);
		return NULL;
	}
	return s;
}

static int psk_use_session(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen,
			   SSL_SESSION **sess)
{
	const struct km_tls *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
	SSL_SESSION *s = psk_session(ssl, t);

	if (!s)
		return 0;
	/* Called again after a HelloRetryRequest with the chosen hash. */
	if (md && SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(s)) != md) {
		SSL_SESSION_free(s);
		*sess = NULL;
		*id = NULL;
		*idlen = 0;
		return 1;
	}
	*sess = s;
	*id = (const unsigned char *)t->identity;
	*idlen = strlen(t->identity);
	return 1;
}

static int psk_find_session(SSL *ssl, const unsigned char *identity, size_t identity_len,
			    SSL_SESSION **sess)
{
	const struct km_tls *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));

	/* An unknown identity: no PSK, and without a certificate the handshake fails. */
	if (identity_len != strlen(t->identity) ||
	    CRYPTO_memcmp(identity, t->identity, identity_len) != 0) {
		*sess = NULL;
		return 1;
	}
	*sess = psk_session(ssl, t);
	return *sess ? 1 : 0;
}

/* ------------------------------------------------------------ contexts */

int km_tls_new(const struct km_tls_opts *o, bool server, struct km_tls **ret, struct km_error *err)
{
	bool psk = o->psk_file && o->psk_file[0];
	bool cert = (o->cert && o->cert[0]) || (o->key && o->key[0]) || (o->ca && o->ca[0]);
	struct km_tls *t;
	char why[256];
	int r = -EINVAL;

	if (psk == cert) {
		km_error_set(
			err,
			psk ? "give either a pre-shared key file or certificates, not both" :
			      "no authentication configured: give a pre-shared key file (--psk-file) or --cert, --key and --ca");
		return -EINVAL;
	}
	if (cert && !(o->cert && o->cert[0] && o->key && o->key[0] && o->ca && o->ca[0])) {
		km_error_set(err, "certificate mode needs all of --cert, --key and --ca");
		return -EINVAL;
	}
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->server = server;
	t->psk_mode = psk;
	t->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
	if (!t->ctx) {
		ssl_error_pop(why, sizeof(why));
		km_error_set(err, "cannot create a TLS context: %s", why);
		r = -ENOMEM;
		goto fail;
	}
	SSL_CTX_set_app_data(t->ctx, t);
	if (!SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION)) {
		ssl_error_pop(why, sizeof(why));
		km_error_set(err, "this OpenSSL cannot do TLS 1.3: %s", why);
		goto fail;
	}
	SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_OFF);
	if (server)
		SSL_CTX_set_num_tickets(t->ctx, 0);

	if (psk) {
		r = load_psk(t, o->psk_file, err);
		if (r < 0)
			goto fail;
		r = -EINVAL;
		if (!SSL_CTX_set_ciphersuites(t->ctx, "TLS_AES_128_GCM_SHA256")) {
			ssl_error_pop(why, sizeof(why));
			km_error_set(err, "TLS_AES_128_GCM_SHA256 unavailable: %s", why);
			goto fail;
		}
		if (server) {
			SSL_CTX_set_psk_find_session_callback(t->ctx, psk_find_session);
		} else {
			SSL_CTX_set_psk_use_session_callback(t->ctx, psk_use_session);
			/*
			 * A server that ignores our key and shows a certificate
			 * instead must fail: with nothing trusted, any does.
			 */
			SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
		}
		snprintf(t->mode, sizeof(t->mode), "TLS 1.3 pre-shared key (identity %s)",
			 t->identity);
	} else {
		SSL_CTX_set_ciphersuites(
			t->ctx,
			"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
		if (SSL_CTX_use_certificate_chain_file(t->ctx, o->cert) != 1) {
			ssl_error_pop(why, sizeof(why));
			km_error_set(err, "certificate %s: %s", o->cert, why);
			goto fail;
		}
		if (SSL_CTX_use_PrivateKey_file(t->ctx, o->key, SSL_FILETYPE_PEM) != 1 ||
		    SSL_CTX_check_private_key(t->ctx) != 1) {
			ssl_error_pop(why, sizeof(why));
			km_error_set(err, "private key %s: %s", o->key, why);
			goto fail;
		}
		if (SSL_CTX_load_verify_locations(t->ctx, o->ca, NULL) != 1) {
			ssl_error_pop(why, sizeof(why));
			km_error_set(err, "CA certificates %s: %s", o->ca, why);
			goto fail;
		}
		SSL_CTX_set_verify(t->ctx,
				   server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT :
					    SSL_VERIFY_PEER,
				   NULL);
		if (o->server_name)
			snprintf(t->server_name, sizeof(t->server_name), "%s", o->server_name);
		snprintf(t->mode, sizeof(t->mode), "TLS 1.3 mutual certificates (CA %s)", o->ca);
	}
	*ret = t;
	return 0;
fail:
	km_tls_free(t);
	return r;
}

void km_tls_free(struct km_tls *t)
{
	if (!t)
		return;
	SSL_CTX_free(t->ctx);
	OPENSSL_cleanse(t->psk, sizeof(t->psk));
	free(t);
}

const char *km_tls_mode(const struct km_tls *t)
{
	return t->mode;
}

/* ------------------------------------------------------------ connections */

int km_tls_set_timeout(struct km_tls_conn *c, unsigned timeout_ms)
{
	struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };

	if (setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
	    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
		return -errno;
	return 0;
}

/*
 * Turns a failed SSL call into -errno and a message. 'ret' is the call's
 * return value, saved_errno the errno right after it.
 */
static int io_error(struct km_tls_conn *c, int ret, int saved_errno, const char *what,
		    struct km_error *err)
{
	int e = SSL_get_error(c->ssl, ret);
	unsigned long code;
	char why[256];

	switch (e) {
	case SSL_ERROR_ZERO_RETURN:
		ERR_clear_error();
		km_error_set(err, "%s: the peer closed the connection", what);
		return -ECONNRESET;
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		/* A blocking socket says "retry" only when SO_RCVTIMEO/SNDTIMEO ran out. */
		ERR_clear_error();
		km_error_set(err, "%s: timed out", what);
		return -ETIMEDOUT;
	case SSL_ERROR_SYSCALL:
		ERR_clear_error();
		if (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK) {
			km_error_set(err, "%s: timed out", what);
			return -ETIMEDOUT;
		}
		if (saved_errno == 0 || saved_errno == ECONNRESET) {
			km_error_set(err, "%s: connection lost (the peer went away)", what);
			return -ECONNRESET;
		}
		if (saved_errno == EPIPE) {
			km_error_set(err, "%s: connection lost (the peer closed it)", what);
			return -EPIPE;
		}
		if (saved_errno == ETIMEDOUT || saved_errno == EHOSTUNREACH) {
			/* keepalive or TCP_USER_TIMEOUT gave up: a cut link, a host gone */
			km_error_set(err, "%s: connection lost (the peer stopped answering: %s)",
				     what, strerror(saved_errno));
			return -saved_errno;
		}
		km_error_set(err, "%s: %s", what, strerror(saved_errno));
		return -saved_errno;
	default:
		code = ssl_error_pop(why, sizeof(why));
		if (ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
			km_error_set(err, "%s: connection lost (the peer went away)", what);
			return -ECONNRESET;
		}
		if (saved_errno == EPIPE || saved_errno == ECONNRESET) {
			km_error_set(err, "%s: connection lost (%s)", what, strerror(saved_errno));
			return -saved_errno;
		}
		if (!c->tls->server && !c->got_data) {
			/* TLS 1.3: the server judges our certificate after our handshake ended. */
			km_error_set(
				err,
				"%s: authentication refused by the peer (TLS alert: %s): wrong pre-shared key, or a certificate it does not trust",
				what, why);
			return -EACCES;
		}
		km_error_set(err, "%s: TLS error: %s", what, why);
		return -EPROTO;
	}
}

static void describe(struct km_tls_conn *c)
{
	snprintf(c->cipher, sizeof(c->cipher), "%s %s", SSL_get_version(c->ssl),
		 SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
	if (c->tls->psk_mode) {
		snprintf(c->identity, sizeof(c->identity), "psk:%s", c->tls->identity);
	} else {
		X509 *peer = SSL_get1_peer_certificate(c->ssl);

		if (peer) {
			X509_NAME_oneline(X509_get_subject_name(peer), c->identity,
					  sizeof(c->identity));
			X509_free(peer);
		} else {
			snprintf(c->identity, sizeof(c->identity), "(no certificate)");
		}
	}
}

static int handshake(struct km_tls *t, int fd, unsigned timeout_ms, struct km_tls_conn **ret,
		     struct km_error *err)
{
	struct km_tls_conn *c;
	struct sigpipe_guard g;
	char why[256];
	int k, saved, r;

	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return -ENOMEM;
	}
	c->tls = t;
	c->fd = fd;
	r = km_tls_set_timeout(c, timeout_ms);
	if (r < 0)
		goto fail;
	c->ssl = SSL_new(t->ctx);
	if (!c->ssl || !SSL_set_fd(c->ssl, fd)) {
		ssl_error_pop(why, sizeof(why));
		km_error_set(err, "cannot set up TLS: %s", why);
		r = -ENOMEM;
		goto fail;
	}
	if (!t->server && t->server_name[0]) {
		SSL_set_tlsext_host_name(c->ssl, t->server_name);
		if (!SSL_set1_host(c->ssl, t->server_name)) {
			r = -ENOMEM;
			goto fail;
		}
	}
	ERR_clear_error();
	sigpipe_block(&g);
	errno = 0;
	k = t->server ? SSL_accept(c->ssl) : SSL_connect(c->ssl);
	saved = errno;
	sigpipe_restore(&g, saved);
	if (k != 1) {
		long v = SSL_get_verify_result(c->ssl);

		r = io_error(c, k, saved, "TLS handshake", err);
		if (r == -EPROTO || r == -ECONNRESET) {
			/* During the handshake, a TLS error or a hang-up is the peer refusing us. */
			r = -EACCES;
		}
		if (v != X509_V_OK) {
			km_error_set(
				err,
				"TLS handshake: authentication failed: the peer's certificate is not trusted: %s",
				X509_verify_cert_error_string(v));
			r = -EACCES;
		} else if (r == -EACCES && err && !strstr(err->msg, "authentication")) {
			km_error_prefix(err, "authentication failed");
		}
		goto fail;
	}
	if (t->psk_mode && !SSL_session_reused(c->ssl)) {
		/* Belt and braces: the handshake must have used the pre-shared key. */
		km_error_set(
			err,
			"TLS handshake: authentication failed: the peer did not use the pre-shared key");
		r = -EACCES;
		goto fail;
	}
	describe(c);
	*ret = c;
	return 0;
fail:
	km_tls_conn_free(c, false);
	return r;
}

int km_tls_connect(struct km_tls *t, int fd, unsigned timeout_ms, struct km_tls_conn **ret,
		   struct km_error *err)
{
	return handshake(t, fd, timeout_ms, ret, err);
}

int km_tls_accept(struct km_tls *t, int fd, unsigned timeout_ms, struct km_tls_conn **ret,
		  struct km_error *err)
{
	return handshake(t, fd, timeout_ms, ret, err);
}

void km_tls_conn_free(struct km_tls_conn *c, bool notify)
{
	if (!c)
		return;
	if (c->ssl) {
		if (notify) {
			struct sigpipe_guard g;

			sigpipe_block(&g);
			errno = 0;
			(void)SSL_shutdown(c->ssl);
			sigpipe_restore(&g, errno);
		}
		SSL_free(c->ssl);
	}
	ERR_clear_error();
	if (c->fd >= 0)
		close(c->fd);
	free(c);
}

ssize_t km_tls_read(struct km_tls_conn *c, void *buf, size_t n, struct km_error *err)
{
	size_t got = 0;
	int k, saved;

	if (n == 0)
		return 0;
	/*
	 * A read that has SO_RCVTIMEO is not restarted after a signal: it
	 * fails with EINTR, which OpenSSL reports as "retry" (seen when a
	 * receiver thread of the same process reaps its podman child): retry.
	 */
	do {
		ERR_clear_error();
		errno = 0;
		k = SSL_read_ex(c->ssl, buf, n, &got);
		saved = errno;
	} while (k != 1 && saved == EINTR && SSL_get_error(c->ssl, k) == SSL_ERROR_WANT_READ);
	if (k == 1) {
		c->got_data = true;
		return (ssize_t)got;
	}
	if (SSL_get_error(c->ssl, k) == SSL_ERROR_ZERO_RETURN) {
		ERR_clear_error();
		return 0;
	}
	return io_error(c, k, saved, "receive", err);
}

int km_tls_write(struct km_tls_conn *c, const void *buf, size_t n, struct km_error *err)
{
	struct sigpipe_guard g;
	size_t done = 0;
	int k = 1, saved = 0;

	ERR_clear_error();
	sigpipe_block(&g);
	while (done < n) {
		size_t w = 0;

		errno = 0;
		k = SSL_write_ex(c->ssl, (const char *)buf + done, n - done, &w);
		saved = errno;
		if (k != 1)
			break;
		done += w;
	}
	sigpipe_restore(&g, saved);
	if (k != 1)
		return io_error(c, k, saved, "send", err);
	return 0;
}

int km_tls_readable(struct km_tls_conn *c, unsigned timeout_ms)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN };

	if (SSL_pending(c->ssl) > 0)
		return 1;
	return poll(&p, 1, (int)timeout_ms) > 0 ? 1 : 0;
}

void km_tls_drain(struct km_tls_conn *c, unsigned timeout_ms)
{
	struct sigpipe_guard g;

	sigpipe_block(&g);
	errno = 0;
	(void)SSL_shutdown(c->ssl);
	sigpipe_restore(&g, errno);
	ERR_clear_error();
	km_socket_drain(c->fd, timeout_ms);
}

void km_socket_drain(int fd, unsigned timeout_ms)
{
	struct timespec t0, now;
	char buf[16384];

	(void)shutdown(fd, SHUT_WR);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		long left;
		ssize_t k;

		clock_gettime(CLOCK_MONOTONIC, &now);
		left = (long)timeout_ms -
		       ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000);
		if (left <= 0 || poll(&p, 1, (int)left) <= 0)
			break;
		k = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
			break;
	}
}

void km_tls_abort(struct km_tls_conn *c)
{
	(void)shutdown(c->fd, SHUT_RDWR);
}

const char *km_tls_peer_identity(const struct km_tls_conn *c)
{
	return c->identity;
}

const char *km_tls_cipher(const struct km_tls_conn *c)
{
	return c->cipher;
}
