/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "serve.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "archive.h"
#include "format.h"
#include "image.h"
#include "incr.h"
#include "store.h"
#include "transport_internal.h"
#include "weights.h"

/* Beyond max_connections, this many more are accepted only to be told "busy". */
#define BUSY_EXTRA     8u
#define DRAIN_MS       2000u
#define LOG_TAIL_LINES 25
#define LOG_TAIL_BYTES 3000
#define LABEL_MAX      64
/*
 * In every image directory while it is being received, locked by the
 * receiving connection: a directory whose marker nobody holds was left by a
 * receiver that died, and the next start removes it. Hidden, so no sender
 * can send a file of that name.
 */
#define INCOMPLETE_MARKER ".kvmotion-incomplete"

extern char **environ;

struct conn;

struct km_server {
	struct km_serve_opts o;
	struct km_tls *tls;
	int images_fd;
	char images_path[PATH_MAX];
	int listen_fd;
	int stop_efd; /* readable once the server stops: connections wait on it between frames */
	char address[128];
	pthread_mutex_t lock; /* conns, n_conns, each conn's fd_open */
	struct conn *conns;
	unsigned n_conns;
	unsigned next_id;
	atomic_bool stopping;
};

struct conn {
	struct km_server *srv;
	struct conn *next;
	unsigned id;
	int fd; /* the socket; the TLS connection owns it once set up */
	bool fd_open; /* under srv->lock: the fd may be shut down */
	bool busy; /* over max_connections: answer "busy" and close */
	pthread_t thread;
	atomic_bool finished;
	char peer[80];
	char label[LABEL_MAX + 1];
	uint64_t started_ns;

	struct km_tls_conn *tls;
	struct km_store *store;
	struct km_wire_io io;
	struct km_wire_rx rx;
	struct km_wire_limits lim;
	struct km_wire_codec *codec;
	uint8_t *raw; /* decoded payloads */
	size_t raw_cap;
	bool io_failed; /* the connection itself broke: no error frame can be sent */
	char detail[LOG_TAIL_BYTES + 1]; /* for the error frame: criu's log tail */
	bool hello;

	uint64_t quota_used;
	uint32_t files_total;
	uint64_t chunks, chunks_stored, chunks_existing, chunk_bytes, store_ns;

	/* the image in progress */
	bool image_active;
	bool image_unsplit; /* CRIU's files as they are: every piece hashed, no join */
	bool image_snapshot; /* a snapshot: its id is checked at the commit */
	struct km_hash snapshot_id;
	int image_fd;
	int marker_fd;
	char image_name[NAME_MAX + 1];
	uint64_t image_files, image_bytes;
	/* its file in progress */
	int file_fd;
	char file_name[NAME_MAX + 1];
	uint64_t file_size, file_off;
	uint32_t file_mode;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static __attribute__((format(printf, 2, 3))) void srv_log(const struct km_server *s,
							  const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	if (!s->o.log)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	s->o.log(s->o.log_userdata, line);
}

static __attribute__((format(printf, 2, 3))) void conn_log(const struct conn *c, const char *fmt,
							   ...)
{
	char line[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	srv_log(c->srv, "conn %u %s%s%s: %s", c->id, c->peer, c->label[0] ? " " : "", c->label,
		line);
}

/* ------------------------------------------------------------ files */

/* Removes name (a directory tree of regular files and directories) from dirfd. */
static int remove_tree_at(int dirfd, const char *name)
{
	_cleanup_close_ int fd = -1;
	DIR *d;
	struct dirent *de;
	int r = 0;

	fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	r = km_opendir_at(fd, &d);
	if (r < 0)
		return r;
	while ((de = readdir(d))) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (unlinkat(fd, de->d_name, 0) < 0) {
			if (errno == EISDIR || errno == EPERM)
				r = remove_tree_at(fd, de->d_name);
			else if (errno != ENOENT)
				r = -errno;
		}
	}
	closedir(d);
	if (unlinkat(dirfd, name, AT_REMOVEDIR) < 0 && errno != ENOENT)
		r = -errno;
	return r;
}

/* Drops the image in progress: its directory goes, so nothing half-done stays. */
static void image_abort(struct conn *c)
{
	int r;

	if (c->file_fd >= 0) {
		close(c->file_fd);
		c->file_fd = -1;
	}
	if (!c->image_active)
		return;
	close(c->image_fd);
	c->image_fd = -1;
	c->image_active = false;
	r = remove_tree_at(c->srv->images_fd, c->image_name);
	/* The marker's lock goes last: until then no restart may take the directory. */
	if (c->marker_fd >= 0) {
		close(c->marker_fd);
		c->marker_fd = -1;
	}
	if (r < 0)
		conn_log(c, "cannot remove image directory %s/%s: %s", c->srv->images_path,
			 c->image_name, strerror(-r));
	else
		conn_log(c, "image directory %s removed", c->image_name);
}

/* ------------------------------------------------------------ handlers */

/* The handlers return 0 or -errno with err saying what went wrong. */

static int ensure_raw(struct conn *c, size_t n)
{
	uint8_t *p;

	if (n <= c->raw_cap)
		return 0;
	p = realloc(c->raw, n);
	if (!p)
		return -ENOMEM;
	c->raw = p;
	c->raw_cap = n;
	return 0;
}

static int quota_take(struct conn *c, uint64_t n, const char *what, struct km_error *err)
{
	char a[32], b[32];

	if (c->srv->o.max_bytes &&
	    (c->quota_used + n > c->srv->o.max_bytes || c->quota_used + n < n)) {
		km_error_set(
			err,
			"quota exceeded: this connection may write %s, %s would bring it to %s",
			km_format_bytes(c->srv->o.max_bytes, a), what,
			km_format_bytes(c->quota_used + n, b));
		return -EDQUOT;
	}
	c->quota_used += n;
	return 0;
}

static int get_id(const ProtobufCBinaryData *b, struct km_hash *ret, struct km_error *err)
{
	if (b->len != KM_HASH_SIZE) {
		km_error_set(err, "a chunk id of %zu bytes (expected %d)", b->len, KM_HASH_SIZE);
		return -EPROTO;
	}
	memcpy(ret->b, b->data, KM_HASH_SIZE);
	return 0;
}

static int handle_hello(struct conn *c, const Kvmotion__Wire__Hello *h, struct km_error *err)
{
	Kvmotion__Wire__HelloReply hr = KVMOTION__WIRE__HELLO_REPLY__INIT;
	const struct km_chunker_params *p = km_store_chunker_params(c->store);
	char software[64];
	int r;

	if (h->label) {
		size_t i, n = 0;

		for (i = 0; h->label[i] && n < LABEL_MAX; i++)
			c->label[n++] =
				(h->label[i] >= 0x20 && h->label[i] < 0x7f) ? h->label[i] : '?';
		c->label[n] = 0;
	}
	conn_log(c, "hello from %s, protocol %u.%u",
		 h->software ? h->software : "(unknown software)", h->major, h->minor);
	r = km_wire_check_version(h->major, h->minor, "the sender", err);
	if (r < 0)
		return r;
	if (c->busy) {
		km_error_set(err, "busy: %u migrations are in progress already",
			     c->srv->o.max_connections);
		return -EBUSY;
	}
	snprintf(software, sizeof(software), "kvmotion %s", KM_VERSION);
	hr.major = KM_WIRE_MAJOR;
	hr.minor = KM_WIRE_MINOR;
	hr.software = software;
	hr.max_payload = c->lim.max_payload;
	hr.quota_bytes = c->srv->o.max_bytes;
	hr.max_files = c->srv->o.max_files;
	hr.has_chunk_min = hr.has_chunk_avg = hr.has_chunk_max = true;
	hr.chunk_min = p->min_size;
	hr.chunk_avg = p->avg_size;
	hr.chunk_max = p->max_size;
	hr.has_can_materialize = true;
	hr.can_materialize = true;
	hr.has_can_unsplit = true;
	hr.can_unsplit = true;
	hr.has_can_restore_containers = true;
	hr.can_restore_containers = c->srv->o.container.podman != NULL;
	hr.has_can_parent = true;
	hr.can_parent = !c->srv->o.no_incremental;
	c->hello = true;
	return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_HELLO_REPLY, &hr.base, NULL, 0,
			    NULL, err);
}

static int handle_query(struct conn *c, const Kvmotion__Wire__QueryChunks *q, struct km_error *err)
{
	Kvmotion__Wire__MissingChunks m = KVMOTION__WIRE__MISSING_CHUNKS__INIT;
	_cleanup_free_ uint32_t *missing = NULL;
	int r;

	if (q->n_ids > KM_WIRE_QUERY_MAX) {
		km_error_set(err, "a query of %zu chunk ids (at most %u)", q->n_ids,
			     KM_WIRE_QUERY_MAX);
		return -EMSGSIZE;
	}
	missing = malloc((q->n_ids ? q->n_ids : 1) * sizeof(*missing));
	if (!missing)
		return -ENOMEM;
	for (size_t i = 0; i < q->n_ids; i++) {
		struct km_hash id;

		r = get_id(&q->ids[i], &id, err);
		if (r < 0)
			return r;
		r = km_store_has(c->store, &id);
		if (r < 0) {
			km_error_set(err, "store %s: %s", c->srv->o.store, strerror(-r));
			return r;
		}
		if (r == 0)
			missing[m.n_missing++] = (uint32_t)i;
	}
	m.missing = missing;
	return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_MISSING_CHUNKS, &m.base, NULL, 0,
			    NULL, err);
}

static int handle_chunk(struct conn *c, const Kvmotion__Wire__Chunk *m, const uint8_t *payload,
			uint32_t len, struct km_error *err)
{
	char hex[KM_HASH_HEX_SIZE], hex2[KM_HASH_HEX_SIZE];
	struct km_hash id, got;
	const void *raw;
	uint64_t t0 = now_ns();
	int r;

	r = get_id(&m->id, &id, err);
	if (r < 0)
		return r;
	km_hash_to_hex(&id, hex);
	if (m->raw_size == 0 || m->raw_size > KM_CHUNK_MAX_LIMIT) {
		km_error_set(err, "chunk %s of %u bytes (1 to %u allowed)", hex, m->raw_size,
			     KM_CHUNK_MAX_LIMIT);
		return -EMSGSIZE;
	}
	r = quota_take(c, m->raw_size, "this chunk", err);
	if (r < 0)
		return r;
	r = ensure_raw(c, m->raw_size);
	if (r < 0)
		return r;
	r = km_wire_decode(c->codec, m->codec, payload, len, m->raw_size, c->raw, c->raw_cap, &raw,
			   err);
	if (r < 0) {
		km_error_prefix(err, "chunk %s corrupt in flight", hex);
		return r;
	}
	/* The id is the sender's claim: only the bytes' own hash names a chunk. */
	km_hash_buf(raw, m->raw_size, &got);
	if (!km_hash_equal(&got, &id)) {
		km_error_set(err, "chunk %s corrupt in flight: its %u bytes hash to %s", hex,
			     m->raw_size, km_hash_to_hex(&got, hex2));
		return -EBADMSG;
	}
	r = km_store_put(c->store, &id, raw, m->raw_size);
	c->chunks++;
	c->chunk_bytes += m->raw_size;
	if (r == -EEXIST) {
		c->chunks_existing++;
	} else if (r < 0) {
		km_error_set(err, "store %s: cannot store chunk %s: %s", c->srv->o.store, hex,
			     strerror(-r));
		return r;
	} else {
		c->chunks_stored++;
	}
	c->store_ns += now_ns() - t0;
	return 0;
}

static int handle_sync(struct conn *c, struct km_error *err)
{
	Kvmotion__Wire__SyncReply m = KVMOTION__WIRE__SYNC_REPLY__INIT;

	m.chunks = c->chunks;
	m.chunks_stored = c->chunks_stored;
	m.chunks_existing = c->chunks_existing;
	m.raw_bytes = c->chunk_bytes;
	m.store_ns = c->store_ns;
	conn_log(
		c,
		"sync: %llu chunks received (%llu new, %llu already stored), %llu bytes, %.3f s storing",
		(unsigned long long)c->chunks, (unsigned long long)c->chunks_stored,
		(unsigned long long)c->chunks_existing, (unsigned long long)c->chunk_bytes,
		(double)c->store_ns / 1e9);
	return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_SYNC_REPLY, &m.base, NULL, 0,
			    NULL, err);
}

static int check_name(const char *name, const char *what, struct km_error *err)
{
	/* Hidden names are left to the join's temporary files. */
	if (!km_filename_is_plain(name) || name[0] == '.') {
		km_error_set(err, "%s name '%.64s' is not a plain file name", what, name);
		return -EINVAL;
	}
	return 0;
}

static bool same_files(const struct km_weights_index *a, const struct km_weights_index *b)
{
	if (a->n_files != b->n_files)
		return false;
	for (size_t i = 0; i < a->n_files; i++)
		if (strcmp(a->files[i].name, b->files[i].name) != 0 ||
		    a->files[i].size != b->files[i].size ||
		    !km_hash_equal(&a->files[i].sha256, &b->files[i].sha256))
			return false;
	return true;
}

/*
 * The target's index of that name describes the same files and records the
 * weights file's id (materialized here) where the sender's records none:
 * keep it, or the id would be lost until the next materialization.
 */
static bool index_known(struct km_store *s, const char *root, const struct km_weights_index *in)
{
	_cleanup_free_ void *p = NULL;
	struct km_weights_index *have = NULL;
	struct km_hash zero = { { 0 } };
	size_t n;
	bool keep;

	if (!km_hash_equal(&in->weights_id, &zero))
		return false;
	if (km_store_root_read(s, "indexes", root, &p, &n) < 0 ||
	    km_weights_index_decode(p, n, &have, NULL) < 0)
		return false;
	keep = !km_hash_equal(&have->weights_id, &zero) && same_files(have, in);
	km_weights_index_free(have);
	return keep;
}

static int handle_put_index(struct conn *c, const Kvmotion__Wire__PutIndex *m,
			    const uint8_t *payload, uint32_t len, struct km_error *err)
{
	Kvmotion__Wire__IndexStored reply = KVMOTION__WIRE__INDEX_STORED__INIT;
	struct km_weights_index *idx = NULL;
	char root[300], hex[KM_HASH_HEX_SIZE];
	uint64_t chunks = 0, bytes = 0;
	int r;

	r = check_name(m->name, "weights index", err);
	if (r < 0)
		return r;
	if (strlen(m->name) > 200) {
		km_error_set(err, "weights index name of %zu characters (200 at most)",
			     strlen(m->name));
		return -EINVAL;
	}
	r = quota_take(c, len, "this weights index", err);
	if (r < 0)
		return r;
	r = km_weights_index_decode(payload, len, &idx, err);
	if (r < 0) {
		km_error_prefix(err, "weights index %s", m->name);
		return r;
	}
	if (strcmp(idx->name, m->name) != 0) {
		km_error_set(err, "weights index sent as '%s' is named '%s' inside", m->name,
			     idx->name);
		r = -EINVAL;
		goto out;
	}
	/* An index is a gc root: store it only when all it names is here. */
	for (size_t i = 0; i < idx->n_files; i++) {
		bytes += idx->files[i].size;
		for (size_t j = 0; j < idx->files[i].n_extents; j++) {
			const struct km_extent *e = &idx->files[i].extents[j];

			if (e->kind != KM_EXTENT_CHUNK)
				continue;
			chunks++;
			r = km_store_has(c->store, &e->id);
			if (r == 0) {
				km_error_set(
					err,
					"weights index %s refers to chunk %s, which the target lacks",
					m->name, km_hash_to_hex(&e->id, hex));
				r = -ENOENT;
			}
			if (r < 0)
				goto out;
		}
	}
	snprintf(root, sizeof(root), "%s.kmidx", m->name);
	if (index_known(c->store, root, idx)) {
		conn_log(c, "weights index %s already here (with its weights file's id): kept",
			 m->name);
		goto stored;
	}
	r = km_store_root_write(c->store, "indexes", root, payload, len);
	if (r < 0) {
		km_error_set(err, "store %s: cannot write weights index %s: %s", c->srv->o.store,
			     root, strerror(-r));
		goto out;
	}
	conn_log(c, "weights index %s stored: %llu chunk references, %llu model bytes", m->name,
		 (unsigned long long)chunks, (unsigned long long)bytes);
stored:
	reply.name = m->name;
	reply.chunks = chunks;
	reply.bytes = bytes;
	r = km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_INDEX_STORED, &reply.base, NULL, 0,
			 NULL, err);
out:
	km_weights_index_free(idx);
	return r;
}

static int handle_materialize(struct conn *c, const Kvmotion__Wire__Materialize *m,
			      struct km_error *err)
{
	int r;

	r = check_name(m->index_name, "weights index", err);
	if (r < 0)
		return r;
	{
		Kvmotion__Wire__Materialized reply = KVMOTION__WIRE__MATERIALIZED__INIT;
		struct km_weights_info info;
		uint64_t t0 = now_ns();

		r = km_weights_materialize(c->store, m->index_name, c->srv->o.weights_dir,
					   c->srv->o.sync, &info, err);
		if (r < 0) {
			km_error_prefix(err, "materializing weights index %s", m->index_name);
			return r;
		}
		reply.path = info.path;
		reply.id = (ProtobufCBinaryData){ KM_HASH_SIZE, info.id.b };
		reply.size = info.size;
		reply.written = info.written;
		reply.bytes_hashed = info.bytes_hashed;
		reply.ns = now_ns() - t0;
		conn_log(c, "weights index %s materialized as %s (%s, %.3f s)", m->index_name,
			 info.path, info.written ? "written" : "already there",
			 (double)reply.ns / 1e9);
		return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_MATERIALIZED, &reply.base,
				    NULL, 0, NULL, err);
	}
}

static bool label_char_ok(char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
	       ch == '-' || ch == '_' || ch == '.';
}

static const char *parent_link(const char *parent, char *buf, size_t size)
{
	snprintf(buf, size, "../%s", parent);
	return buf;
}

/*
 * An incremental image's parent: a complete snapshot directory of the image
 * area whose recorded id is 'id'. Checked before the new directory exists,
 * so that a refusal leaves nothing behind; its pages are read by CRIU only.
 */
static int parent_check(struct conn *c, const char *parent, const uint8_t *id,
			struct km_error *err)
{
	_cleanup_close_ int fd = -1;
	_cleanup_free_ char *rec = NULL;
	struct km_hash want, have;
	char hex[KM_HASH_HEX_SIZE];
	struct stat st;
	size_t n;
	int r;

	r = check_name(parent, "parent image", err);
	if (r < 0)
		return r;
	memcpy(want.b, id, KM_HASH_SIZE);
	fd = openat(c->srv->images_fd, parent, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		km_error_set(err, "parent image %s: %s", parent,
			     r == -ENOENT ? "not in the image area" : strerror(-r));
		return r == -ENOENT || r == -ENOTDIR ? -ENOENT : r;
	}
	if (fstatat(fd, INCOMPLETE_MARKER, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		km_error_set(err, "parent image %s is incomplete", parent);
		return -ENOENT;
	}
	r = km_read_file_at(fd, KM_SNAPSHOT_NAME, 256, (void **)&rec, &n);
	if (r < 0) {
		km_error_set(err, "parent image %s is no snapshot (%s: %s)", parent,
			     KM_SNAPSHOT_NAME, strerror(-r));
		return -ENOENT;
	}
	if (n == KM_HASH_HEX_SIZE)
		rec[n - 1] = 0;
	if (n != KM_HASH_HEX_SIZE || km_hash_from_hex(rec, &have) < 0 ||
	    !km_hash_equal(&have, &want)) {
		km_error_set(err, "parent image %s is not snapshot %s", parent,
			     km_hash_to_hex(&want, hex));
		return -ENOENT;
	}
	return 0;
}

static int handle_image_begin(struct conn *c, const Kvmotion__Wire__ImageBegin *m,
			      struct km_error *err)
{
	Kvmotion__Wire__ImageBegun reply = KVMOTION__WIRE__IMAGE_BEGUN__INIT;
	const char *label = m->label && m->label[0] ? m->label : "image";
	struct tm tm;
	time_t now = time(NULL);
	char stamp[32], link[NAME_MAX + 8];
	int r;

	if (c->image_active) {
		km_error_set(err, "protocol error: IMAGE_BEGIN while image %s is in progress",
			     c->image_name);
		return -EPROTO;
	}
	if (strlen(label) > LABEL_MAX || label[0] == '.') {
		km_error_set(
			err,
			"image label '%.64s' is not a name of 1 to %d characters [A-Za-z0-9._-]",
			label, LABEL_MAX);
		return -EINVAL;
	}
	for (const char *p = label; *p; p++)
		if (!label_char_ok(*p)) {
			km_error_set(
				err,
				"image label '%.64s' is not a name of 1 to %d characters [A-Za-z0-9._-]",
				label, LABEL_MAX);
			return -EINVAL;
		}
	if ((m->has_snapshot_id && m->snapshot_id.len != KM_HASH_SIZE) ||
	    (m->parent && (!m->has_parent_id || m->parent_id.len != KM_HASH_SIZE))) {
		km_error_set(err, "protocol error: IMAGE_BEGIN with a snapshot or parent id of the wrong size");
		return -EPROTO;
	}
	if ((m->has_snapshot_id || m->parent) && c->srv->o.no_incremental) {
		km_error_set(err, "this receiver takes no snapshots or incremental images");
		return -ENOSYS;
	}
	if (m->parent) {
		r = parent_check(c, m->parent, m->parent_id.data, err);
		if (r < 0)
			return r;
	}
	gmtime_r(&now, &tm);
	strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", &tm);
	for (int attempt = 0;; attempt++) {
		uint32_t rnd = 0;

		if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd))
			rnd = (uint32_t)now_ns();
		snprintf(c->image_name, sizeof(c->image_name), "%s-%s-%06x", label, stamp,
			 rnd & 0xffffff);
		if (mkdirat(c->srv->images_fd, c->image_name, 0700) == 0)
			break;
		if (errno != EEXIST || attempt == 16) {
			r = -errno;
			km_error_set(err, "image area %s: cannot create a directory: %s",
				     c->srv->images_path, strerror(-r));
			return r;
		}
	}
	c->image_fd = openat(c->srv->images_fd, c->image_name,
			     O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (c->image_fd < 0) {
		r = -errno;
		(void)unlinkat(c->srv->images_fd, c->image_name, AT_REMOVEDIR);
		km_error_set(err, "image directory %s: %s", c->image_name, strerror(-r));
		return r;
	}
	c->marker_fd = openat(c->image_fd, INCOMPLETE_MARKER,
			      O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (c->marker_fd < 0 || flock(c->marker_fd, LOCK_EX | LOCK_NB) < 0) {
		r = -errno;
		km_error_set(err, "image directory %s: cannot create its marker: %s", c->image_name,
			     strerror(-r));
		c->image_active = true; /* so that image_abort removes it */
		return r;
	}
	c->image_active = true;
	c->image_unsplit = m->has_unsplit && m->unsplit;
	c->image_snapshot = m->has_snapshot_id;
	if (c->image_snapshot)
		memcpy(c->snapshot_id.b, m->snapshot_id.data, KM_HASH_SIZE);
	c->image_files = c->image_bytes = 0;
	if (m->parent && symlinkat(parent_link(m->parent, link, sizeof(link)), c->image_fd,
				   "parent") < 0) {
		r = -errno;
		km_error_set(err, "image directory %s: cannot link its parent: %s", c->image_name,
			     strerror(-r));
		return r;
	}
	if (m->parent)
		conn_log(c, "image %s: incremental over snapshot %s", c->image_name, m->parent);
	conn_log(c, "%s image %s begun in %s", c->image_unsplit ? "unsplit" : "split",
		 c->image_name, c->srv->images_path);
	reply.dir = c->image_name;
	return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGUN, &reply.base, NULL, 0,
			    NULL, err);
}

static int file_finish(struct conn *c, struct km_error *err)
{
	int r = 0;

	if (fchmod(c->file_fd, c->file_mode & 0777) < 0 ||
	    (c->srv->o.sync && fsync(c->file_fd) < 0))
		r = -errno;
	if (close(c->file_fd) < 0 && r == 0)
		r = -errno;
	c->file_fd = -1;
	if (r < 0) {
		km_error_set(err, "image file %s: %s", c->file_name, strerror(-r));
		return r;
	}
	c->image_files++;
	return 0;
}

static int handle_file(struct conn *c, const Kvmotion__Wire__File *m, const uint8_t *payload,
		       uint32_t len, struct km_error *err)
{
	const void *raw;
	int r;

	if (!c->image_active) {
		km_error_set(err, "protocol error: FILE outside an image");
		return -EPROTO;
	}
	r = check_name(m->name, "image file", err);
	if (r < 0)
		return r;
	if (m->has_sha256 && m->sha256.len != KM_HASH_SIZE) {
		km_error_set(err, "protocol error: piece of %s with a SHA-256 of %zu bytes",
			     m->name, m->sha256.len);
		return -EPROTO;
	}
	if (c->image_unsplit && !m->has_sha256) {
		/* nothing else verifies an unsplit image: no piece without its hash */
		km_error_set(err,
			     "protocol error: piece of %s of an unsplit image without its SHA-256",
			     m->name);
		return -EPROTO;
	}
	if (c->image_unsplit && strcmp(m->name, KM_MANIFEST_NAME) == 0) {
		km_error_set(err, "an unsplit image cannot hold %s", KM_MANIFEST_NAME);
		return -EINVAL;
	}
	if (c->file_fd < 0) {
		if (m->offset != 0) {
			km_error_set(err, "protocol error: file %s starts at offset %llu", m->name,
				     (unsigned long long)m->offset);
			return -EPROTO;
		}
		if (c->srv->o.max_files && c->files_total >= c->srv->o.max_files) {
			km_error_set(err, "quota exceeded: this connection may send %u files",
				     c->srv->o.max_files);
			return -EDQUOT;
		}
		c->file_fd = openat(c->image_fd, m->name,
				    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (c->file_fd < 0) {
			r = -errno;
			km_error_set(err, "image file %s: %s", m->name,
				     r == -EEXIST ? "sent twice" : strerror(-r));
			return r;
		}
		c->files_total++;
		snprintf(c->file_name, sizeof(c->file_name), "%s", m->name);
		c->file_size = m->size;
		c->file_off = 0;
		c->file_mode = m->mode;
	} else if (strcmp(m->name, c->file_name) != 0 || m->offset != c->file_off ||
		   m->size != c->file_size) {
		km_error_set(err,
			     "protocol error: piece of %s at %llu while %s is incomplete at %llu",
			     m->name, (unsigned long long)m->offset, c->file_name,
			     (unsigned long long)c->file_off);
		return -EPROTO;
	}
	if (m->raw_size > c->lim.max_payload || m->offset + m->raw_size > m->size ||
	    (m->raw_size == 0 && m->size != 0)) {
		km_error_set(err, "protocol error: piece [%llu, +%u) of file %s of %llu bytes",
			     (unsigned long long)m->offset, m->raw_size, m->name,
			     (unsigned long long)m->size);
		return -EPROTO;
	}
	r = quota_take(c, m->raw_size, "this file piece", err);
	if (r < 0)
		return r;
	r = ensure_raw(c, m->raw_size ? m->raw_size : 1);
	if (r < 0)
		return r;
	r = km_wire_decode(c->codec, m->codec, payload, len, m->raw_size, c->raw, c->raw_cap, &raw,
			   err);
	if (r < 0) {
		km_error_prefix(err, "image file %s corrupt in flight", m->name);
		return r;
	}
	if (m->has_sha256) {
		struct km_hash h;

		km_hash_buf(raw, m->raw_size, &h);
		if (memcmp(h.b, m->sha256.data, KM_HASH_SIZE) != 0) {
			km_error_set(
				err,
				"image file %s corrupt in flight: the piece at offset %llu does "
				"not hash to its SHA-256",
				m->name, (unsigned long long)m->offset);
			return -EBADMSG;
		}
	}
	r = km_pwrite_full(c->file_fd, raw, m->raw_size, (off_t)m->offset);
	if (r < 0) {
		km_error_set(err, "image file %s/%s: cannot write: %s", c->image_name, m->name,
			     strerror(-r));
		return r;
	}
	c->file_off += m->raw_size;
	c->image_bytes += m->raw_size;
	if (c->file_off == c->file_size)
		return file_finish(c, err);
	return 0;
}

/* The last lines of a file (at most LOG_TAIL_BYTES), for an error report. */
static void file_tail(int dirfd, const char *name, char *buf, size_t size)
{
	_cleanup_close_ int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	char tmp[LOG_TAIL_BYTES + 1];
	struct stat st;
	off_t off;
	ssize_t k;
	char *p;
	int lines = 0;

	buf[0] = 0;
	if (fd < 0 || fstat(fd, &st) < 0)
		return;
	off = st.st_size > LOG_TAIL_BYTES ? st.st_size - LOG_TAIL_BYTES : 0;
	k = km_pread_full(fd, tmp, LOG_TAIL_BYTES, off);
	if (k <= 0)
		return;
	tmp[k] = 0;
	p = tmp + k;
	while (p > tmp && lines <= LOG_TAIL_LINES)
		if (*--p == '\n')
			lines++;
	if (p > tmp || off > 0)
		p = strchr(p, '\n') ? strchr(p, '\n') + 1 : p;
	snprintf(buf, size, "%s", p);
}

/* The last line of CRIU's log that says "Error", for the one-line message. */
static void first_error_line(const char *log, char *buf, size_t size)
{
	const char *best = NULL, *p = log;

	while ((p = strstr(p, "Error"))) {
		best = p;
		p++;
	}
	buf[0] = 0;
	if (!best)
		return;
	while (best > log && best[-1] != '\n')
		best--;
	snprintf(buf, size, "%.*s", (int)strcspn(best, "\n"), best);
}

/* A child's signals: none blocked, and those the daemon handles back at their defaults. */
static void child_signals(posix_spawnattr_t *attr)
{
	sigset_t none, defaults;

	sigemptyset(&none);
	sigemptyset(&defaults);
	sigaddset(&defaults, SIGPIPE);
	sigaddset(&defaults, SIGTERM);
	sigaddset(&defaults, SIGINT);
	sigaddset(&defaults, SIGHUP);
	posix_spawnattr_init(attr);
	posix_spawnattr_setsigmask(attr, &none);
	posix_spawnattr_setsigdefault(attr, &defaults);
	posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
}

static int run_restore(struct conn *c, int *ret_pid, char *tail, size_t tail_size,
		       struct km_error *err)
{
	const struct km_restore_opts *ro = &c->srv->o.restore;
	const char *criu = ro->criu && ro->criu[0] ? ro->criu : "criu";
	unsigned timeout_s = ro->timeout_s ? ro->timeout_s : KM_SERVE_RESTORE_TIMEOUT_S_DEFAULT;
	char dir[PATH_MAX + NAME_MAX + 2], pidfile[sizeof(dir) + 16], out[sizeof(dir) + 16];
	_cleanup_free_ const char **argv = NULL;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	size_t n = 0;
	pid_t pid;
	int r, status = 0;
	_cleanup_free_ void *pidbuf = NULL;
	size_t pidlen;
	char errline[300];

	snprintf(dir, sizeof(dir), "%s/%s", c->srv->images_path, c->image_name);
	snprintf(pidfile, sizeof(pidfile), "%s/restore.pid", dir);
	snprintf(out, sizeof(out), "%s/restore.out", dir);
	argv = calloc(16 + ro->n_args, sizeof(*argv));
	if (!argv)
		return -ENOMEM;
	argv[n++] = criu;
	argv[n++] = "restore";
	argv[n++] = "-D";
	argv[n++] = dir;
	argv[n++] = "-d";
	argv[n++] = "--pidfile";
	argv[n++] = pidfile;
	argv[n++] = "-o";
	argv[n++] = "restore.log";
	argv[n++] = "-v4";
	if (ro->libdir && ro->libdir[0]) {
		argv[n++] = "-L";
		argv[n++] = ro->libdir;
	}
	for (size_t i = 0; i < ro->n_args; i++)
		argv[n++] = ro->args[i];
	argv[n] = NULL;

	/* CRIU and what it restores start with default signals, whatever the daemon blocks. */
	child_signals(&attr);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	posix_spawn_file_actions_adddup2(&fa, 1, 2);
	posix_spawn_file_actions_addchdir_np(&fa, dir);
	r = posix_spawnp(&pid, criu, &fa, &attr, (char *const *)argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
	if (r != 0) {
		km_error_set(err, "cannot run %s: %s", criu, strerror(r));
		return -r;
	}
	conn_log(c, "image %s: running %s restore (pid %d)", c->image_name, criu, (int)pid);

	r = km_wait_child(pid, timeout_s, &status);
	if (r == -ETIMEDOUT) {
		file_tail(c->image_fd, "restore.log", tail, tail_size);
		km_error_set(err, "criu restore did not finish in %u s (killed)", timeout_s);
		return r;
	}
	if (r < 0) {
		km_error_set(err, "waiting for criu restore: %s", strerror(-r));
		return r;
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		file_tail(c->image_fd, "restore.log", tail, tail_size);
		if (!tail[0])
			file_tail(c->image_fd, "restore.out", tail, tail_size);
		first_error_line(tail, errline, sizeof(errline));
		if (WIFEXITED(status))
			km_error_set(err, "criu restore failed (exit status %d)%s%s",
				     WEXITSTATUS(status), errline[0] ? ": " : "", errline);
		else
			km_error_set(err, "criu restore killed by signal %d", WTERMSIG(status));
		return -ECHILD;
	}
	r = km_read_file_at(c->image_fd, "restore.pid", 64, &pidbuf, &pidlen);
	if (r == 0) {
		char num[65];
		long v;
		char *end;

		memcpy(num, pidbuf, pidlen);
		num[pidlen] = 0;
		v = strtol(num, &end, 10);
		if (end == num || v <= 0 || v > INT32_MAX)
			r = -EBADMSG;
		else
			*ret_pid = (int)v;
	}
	if (r < 0) {
		file_tail(c->image_fd, "restore.log", tail, tail_size);
		km_error_set(err, "criu restore succeeded but left no usable pid file %s", pidfile);
		return -ECHILD;
	}
	return 0;
}

/*
 * The plugin's share of the restore, from its lines in restore.log (criu
 * -v4: "(SS.uuuuuu) kvmotion: ..."): GPU state resumed, and for cooperative
 * engines the time from "told to resume" to "resumed after the restore".
 */
static void restore_phases(struct conn *c, Kvmotion__Wire__ImageDone *reply)
{
	_cleanup_close_ int fd = openat(c->image_fd, "restore.log", O_RDONLY | O_CLOEXEC);
	_cleanup_fclose_ FILE *f = NULL;
	double gpu = 0, told = -1, resumed = -1;
	char line[1024];

	if (fd < 0 || !(f = fdopen(fd, "r")))
		return;
	fd = -1; /* f owns it */
	while (fgets(line, sizeof(line), f)) {
		const char *k = strstr(line, "kvmotion: ");
		double t = -1, v;
		int pid;

		if (!k)
			continue;
		if (line[0] == '(')
			t = strtod(line + 1, NULL);
		if (sscanf(k, "kvmotion: GPU state of %d resumed in %lf s", &pid, &v) == 2)
			gpu += v;
		else if (t >= 0 && strstr(k, " told to resume after the restore") && told < 0)
			told = t;
		else if (t >= 0 && strstr(k, " resumed after the restore"))
			resumed = t;
	}
	reply->has_gpu_restore_ns = true;
	reply->gpu_restore_ns = (uint64_t)(gpu * 1e9);
	reply->has_resume_ns = true;
	reply->resume_ns = told >= 0 && resumed > told ? (uint64_t)((resumed - told) * 1e9) : 0;
}

/*
 * A snapshot, complete: its files must have the id the sender computed of
 * its own (what later incremental images were compared against); recorded
 * for parent_check.
 */
static int snapshot_record(struct conn *c, Kvmotion__Wire__ImageDone *reply, struct km_error *err)
{
	struct km_hash id;
	char hex[KM_HASH_HEX_SIZE], want[KM_HASH_HEX_SIZE];
	uint64_t t0 = now_ns(), t1;
	int r;

	r = km_incr_snapshot_id(c->image_fd, 0, &id, err);
	if (r < 0) {
		km_error_prefix(err, "snapshot %s", c->image_name);
		return r;
	}
	if (!km_hash_equal(&id, &c->snapshot_id)) {
		km_error_set(err, "snapshot %s has id %s, the sender's is %s", c->image_name,
			     km_hash_to_hex(&id, hex), km_hash_to_hex(&c->snapshot_id, want));
		return -EBADMSG;
	}
	km_hash_to_hex(&id, hex);
	hex[KM_HASH_HEX_SIZE - 1] = '\n';
	r = km_write_file_atomic_at(c->image_fd, KM_SNAPSHOT_NAME, hex, KM_HASH_HEX_SIZE,
				    c->srv->o.sync);
	if (r < 0) {
		km_error_set(err, "snapshot %s: cannot record its id: %s", c->image_name,
			     strerror(-r));
		return r;
	}
	conn_log(c, "snapshot %s: id checked in %.3f s", c->image_name,
		 (double)(now_ns() - t0) / 1e9);
	/*
	 * The snapshot ends the pre-copy: what it and the weights before it
	 * wrote goes to disk now, while the engine still serves. Unsynced
	 * (--no-sync), the kernel's flusher would write it back later, maybe
	 * in the stop, where a dump then competes with gigabytes of
	 * writeback (seen: 1.3 s dumps taking 7 s).
	 */
	t1 = now_ns();
	r = km_store_flush(c->store);
	if (r == 0 && syncfs(c->srv->images_fd) < 0)
		r = -errno;
	if (r < 0)
		conn_log(c, "snapshot %s: flushing the store: %s", c->image_name, strerror(-r));
	else
		conn_log(c, "snapshot %s: store and image area written back in %.3f s",
			 c->image_name, (double)(now_ns() - t1) / 1e9);
	reply->has_snapshot_ns = true;
	reply->snapshot_ns = now_ns() - t0;
	return 0;
}

/*
 * After the restore of an incremental image: its parent, the snapshot made
 * for this migration, holds pages the restored process now has in memory,
 * and nobody else's. Removed, or the image area would keep a copy of every
 * migrated process's memory.
 */
static void drop_parent(struct conn *c)
{
	char link[NAME_MAX + 8];
	ssize_t n;

	n = readlinkat(c->image_fd, "parent", link, sizeof(link) - 1);
	if (n <= 3)
		return;
	link[n] = 0;
	if (strncmp(link, "../", 3) != 0 || check_name(link + 3, "parent image", NULL) < 0)
		return;
	if (remove_tree_at(c->srv->images_fd, link + 3) == 0)
		conn_log(c, "image %s: its parent %s removed after the restore", c->image_name,
			 link + 3);
}

static int handle_commit(struct conn *c, const Kvmotion__Wire__ImageCommit *m, struct km_error *err)
{
	Kvmotion__Wire__ImageDone reply = KVMOTION__WIRE__IMAGE_DONE__INIT;
	struct km_join_opts jo = { .threads = 0, .keep_split = false, .sync = c->srv->o.sync };
	struct km_join_stats js;
	uint64_t t0;
	int r, pid = 0;

	if (!c->image_active) {
		km_error_set(err, "protocol error: IMAGE_COMMIT outside an image");
		return -EPROTO;
	}
	if (c->file_fd >= 0) {
		km_error_set(
			err,
			"protocol error: IMAGE_COMMIT while file %s is incomplete (%llu of %llu bytes)",
			c->file_name, (unsigned long long)c->file_off,
			(unsigned long long)c->file_size);
		return -EPROTO;
	}
	conn_log(c, "image %s: %llu files, %llu bytes received%s", c->image_name,
		 (unsigned long long)c->image_files, (unsigned long long)c->image_bytes,
		 c->image_unsplit ? " (unsplit, every piece verified)" : "; joining");
	if (!c->image_unsplit) {
		t0 = now_ns();
		r = km_image_join(c->image_fd, c->store, &jo, &js, err);
		if (r < 0) {
			km_error_prefix(err, "join of image %s", c->image_name);
			return r;
		}
		reply.join_ns = now_ns() - t0;
		reply.bytes_joined = js.bytes_written;
		conn_log(c, "image %s joined: %llu files, %llu bytes rebuilt in %.3f s",
			 c->image_name, (unsigned long long)js.files_joined,
			 (unsigned long long)js.bytes_written, (double)reply.join_ns / 1e9);
	}
	if (c->image_snapshot) {
		r = snapshot_record(c, &reply, err);
		if (r < 0)
			return r;
	}
	if (m->restore) {
		t0 = now_ns();
		r = run_restore(c, &pid, c->detail, sizeof(c->detail), err);
		if (r < 0) {
			km_error_prefix(err, "image %s", c->image_name);
			return r;
		}
		reply.has_restore_ns = true;
		reply.restore_ns = now_ns() - t0;
		reply.has_restored_pid = true;
		reply.restored_pid = pid;
		restore_phases(c, &reply);
		conn_log(c, "image %s restored: pid %d in %.3f s", c->image_name, pid,
			 (double)reply.restore_ns / 1e9);
		drop_parent(c);
	}
	reply.dir = c->image_name;
	reply.files = c->image_files;
	reply.bytes = c->image_bytes;
	/* Done: the directory stays (it is the restored process's record). */
	if (unlinkat(c->image_fd, INCOMPLETE_MARKER, 0) < 0) {
		r = -errno;
		km_error_set(err, "image %s: cannot remove its marker: %s", c->image_name,
			     strerror(-r));
		return r;
	}
	close(c->marker_fd);
	c->marker_fd = -1;
	close(c->image_fd);
	c->image_fd = -1;
	c->image_active = false;
	return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_DONE, &reply.base, NULL, 0,
			    NULL, err);
}

/* ------------------------------------------------------------ container archives */

#define CMD_ARGS_MAX 96

/*
 * Runs argv with stdout into DIR/out_name and stderr into DIR/err_name (the
 * image directory), kvmotion's plugin settings in its environment, at most
 * timeout_s seconds; *ret_status gets its wait status.
 */
static int run_cmd(struct conn *c, const char *const *argv, const char *out_name,
		   const char *err_name, unsigned timeout_s, int *ret_status, struct km_error *err)
{
	char dir[PATH_MAX + NAME_MAX + 2], out[sizeof(dir) + 32], errp[sizeof(dir) + 32];
	char store_env[PATH_MAX + 32], wdir_env[PATH_MAX + 32];
	_cleanup_free_ char **envp = NULL;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	size_t n_env = 0, n = 0;
	pid_t pid;
	int r, status = 0;

	snprintf(dir, sizeof(dir), "%s/%s", c->srv->images_path, c->image_name);
	snprintf(out, sizeof(out), "%s/%s", dir, out_name);
	snprintf(errp, sizeof(errp), "%s/%s", dir, err_name);
	while (environ[n_env])
		n_env++;
	envp = calloc(n_env + 3, sizeof(*envp));
	if (!envp)
		return -ENOMEM;
	/* The plugin joins the split image with this receiver's store. */
	for (size_t i = 0; i < n_env; i++)
		if (strncmp(environ[i], "KVMOTION_STORE=", 15) != 0 &&
		    strncmp(environ[i], "KVMOTION_WEIGHTS_DIR=", 21) != 0)
			envp[n++] = environ[i];
	snprintf(store_env, sizeof(store_env), "KVMOTION_STORE=%s", c->srv->o.store);
	envp[n++] = store_env;
	if (c->srv->o.weights_dir) {
		snprintf(wdir_env, sizeof(wdir_env), "KVMOTION_WEIGHTS_DIR=%s",
			 c->srv->o.weights_dir);
		envp[n++] = wdir_env;
	}
	envp[n] = NULL;

	child_signals(&attr);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	posix_spawn_file_actions_addopen(&fa, 2, errp, O_WRONLY | O_CREAT | O_APPEND, 0600);
	r = posix_spawnp(&pid, argv[0], &fa, &attr, (char *const *)argv, envp);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
	if (r != 0) {
		km_error_set(err, "cannot run %s: %s", argv[0], strerror(r));
		return -r;
	}
	r = km_wait_child(pid, timeout_s, &status);
	if (r == -ETIMEDOUT) {
		km_error_set(err, "%s %s did not finish in %u s (killed)", argv[0],
			     argv[1] ? argv[1] : "", timeout_s);
		return r;
	}
	if (r < 0) {
		km_error_set(err, "waiting for %s: %s", argv[0], strerror(-r));
		return r;
	}
	*ret_status = status;
	return 0;
}

/* PODMAN GLOBAL-ARGS WORDS... ARGS..., NULL-terminated, into argv[CMD_ARGS_MAX]. */
static int podman_argv(const struct km_container_opts *co, const char **argv,
		       const char *const *words, size_t n_words, const char *const *extra,
		       size_t n_extra, struct km_error *err)
{
	size_t n = 0;

	if (1 + co->n_args + n_words + n_extra + 1 > CMD_ARGS_MAX) {
		km_error_set(err, "too many podman arguments");
		return -E2BIG;
	}
	argv[n++] = co->podman;
	for (size_t i = 0; i < co->n_args; i++)
		argv[n++] = co->args[i];
	for (size_t i = 0; i < n_words; i++)
		argv[n++] = words[i];
	for (size_t i = 0; i < n_extra; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	return 0;
}

/* Best effort: a container that did not come up is not left behind. */
static void container_remove(struct conn *c, const char *name)
{
	const struct km_container_opts *co = &c->srv->o.container;
	const char *words[] = { "container", "rm", "-f", name }, *argv[CMD_ARGS_MAX];
	struct km_error e = { { 0 } };
	int st = 0;

	if (podman_argv(co, argv, words, KM_ARRAY_SIZE(words), NULL, 0, &e) < 0 ||
	    run_cmd(c, argv, "rm.out", "rm.out", 60, &st, &e) < 0)
		conn_log(c, "cannot remove container %s: %s", name, e.msg);
	else
		conn_log(c, "container %s removed (%s)", name,
			 WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "done" : "podman rm failed");
}

/* podman's container names: [a-zA-Z0-9][a-zA-Z0-9_.-]*, and not an option. */
static bool container_name_ok(const char *name)
{
	if (!name || !name[0] || strlen(name) > 253 || !isalnum((unsigned char)name[0]))
		return false;
	for (const char *p = name; *p; p++)
		if (!label_char_ok(*p))
			return false;
	return true;
}

static int container_restore(struct conn *c, const char *archive, const char *name, int *ret_pid,
			     char *ret_id, size_t id_size, struct km_error *err)
{
	const struct km_container_opts *co = &c->srv->o.container;
	const struct km_restore_opts *ro = &c->srv->o.restore;
	unsigned timeout_s = ro->timeout_s ? ro->timeout_s : KM_SERVE_RESTORE_TIMEOUT_S_DEFAULT;
	const char *argv[CMD_ARGS_MAX];
	_cleanup_free_ void *out = NULL;
	size_t out_len;
	char errline[300], state[32] = "";
	int r, st = 0, pid = 0;

	if (!co->podman) {
		km_error_set(err, "this receiver restores no containers (kvmotion serve --podman)");
		return -ENOSYS;
	}
	if (!container_name_ok(name)) {
		km_error_set(err, "container name '%.64s' is not [a-zA-Z0-9][a-zA-Z0-9_.-]*",
			     name ? name : "");
		return -EINVAL;
	}
	{
		const char *words[] = { "container", "exists", name };

		r = podman_argv(co, argv, words, KM_ARRAY_SIZE(words), NULL, 0, err);
		if (r < 0)
			return r;
		r = run_cmd(c, argv, "exists.out", "exists.out", 60, &st, err);
		if (r < 0)
			return r;
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
			km_error_set(err, "a container named %s exists on the target already",
				     name);
			return -EEXIST;
		}
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 1) {
			file_tail(c->image_fd, "exists.out", c->detail, sizeof(c->detail));
			km_error_set(err, "%s container exists failed", co->podman);
			return -ECHILD;
		}
	}
	{
		const char *words[] = {
			"container", "restore", "--import", archive, "--name", name
		};

		r = podman_argv(co, argv, words, KM_ARRAY_SIZE(words), co->restore_args,
				co->n_restore_args, err);
		if (r < 0)
			return r;
		conn_log(c, "image %s: restoring container %s with %s", c->image_name, name,
			 co->podman);
		r = run_cmd(c, argv, "restore.out", "restore.err", timeout_s, &st, err);
		if (r < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			file_tail(c->image_fd, "restore.err", c->detail, sizeof(c->detail));
			if (r == 0) {
				first_error_line(c->detail, errline, sizeof(errline));
				if (!errline[0])
					snprintf(errline, sizeof(errline), "%.*s",
						 (int)strcspn(c->detail, "\n"), c->detail);
				km_error_set(err, "podman container restore failed (%s %d)%s%s",
					     WIFEXITED(st) ? "exit status" : "signal",
					     WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st),
					     errline[0] ? ": " : "", errline);
				r = -ECHILD;
			}
			container_remove(c, name);
			return r;
		}
		if (km_read_file_at(c->image_fd, "restore.out", 4096, &out, &out_len) == 0) {
			char *p = out;

			p[out_len ? out_len - 1 : 0] = 0;
			snprintf(ret_id, id_size, "%.*s", (int)strcspn(p, "\n"), p);
			free(out);
			out = NULL;
		}
	}
	{
		const char *words[] = { "container", "inspect", "--format",
					"{{.State.Status}} {{.State.Pid}}", name };

		r = podman_argv(co, argv, words, KM_ARRAY_SIZE(words), NULL, 0, err);
		if (r == 0)
			r = run_cmd(c, argv, "inspect.out", "inspect.err", 60, &st, err);
		if (r == 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0 &&
		    km_read_file_at(c->image_fd, "inspect.out", 4096, &out, &out_len) == 0) {
			char *p = out;

			p[out_len ? out_len - 1 : 0] = 0;
			if (sscanf(p, "%31s %d", state, &pid) != 2)
				state[0] = 0;
		}
		if (r == 0 && (strcmp(state, "running") != 0 || pid <= 0)) {
			km_error_set(err, "container %s was restored but is %s, not running", name,
				     state[0] ? state : "in an unknown state");
			r = -ECHILD;
		}
		if (r < 0) {
			container_remove(c, name);
			return r;
		}
	}
	*ret_pid = pid;
	return 0;
}

/* The manifest's chunks must all be here; its root keeps them until released. */
static int archive_check(struct conn *c, int fd, const char *file,
			 Kvmotion__Wire__ArchiveDone *reply, struct km_hash *mid,
			 struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	struct km_manifest *m = NULL;
	struct km_archive_member dm;
	char hex[KM_HASH_HEX_SIZE], first[KM_HASH_HEX_SIZE] = "", root[KM_HASH_HEX_SIZE + 8];
	uint64_t chunks = 0, missing = 0;
	size_t n;
	int r;

	r = km_archive_check_layout(fd, err);
	if (r < 0) {
		km_error_prefix(err, "archive %s", file);
		return r == -ENOENT ? -EINVAL : r;
	}
	r = km_archive_read(fd, KM_ARCHIVE_MANIFEST, 64u << 20, &buf, &n, err);
	if (r == -ENOENT) {
		err->msg[0] = 0;
		reply->split = false;
		return 0; /* a plain image: nothing to check */
	}
	if (r < 0)
		return r;
	r = km_manifest_decode(buf, n, &m, err);
	if (r < 0) {
		km_error_prefix(err, "archive %s: %s", file, KM_ARCHIVE_MANIFEST);
		return r;
	}
	km_hash_buf(buf, n, mid);
	for (size_t i = 0; i < m->n_files && r == 0; i++)
		for (size_t j = 0; j < m->files[i].n_extents; j++) {
			const struct km_extent *e = &m->files[i].extents[j];

			if (e->kind != KM_EXTENT_CHUNK)
				continue;
			chunks++;
			r = km_store_has(c->store, &e->id);
			if (r < 0) {
				km_error_set(err, "store %s: %s", c->srv->o.store, strerror(-r));
				break;
			}
			if (r == 0 && missing++ == 0)
				km_hash_to_hex(&e->id, first);
			r = 0;
		}
	km_manifest_free(m);
	if (r < 0)
		return r;
	if (missing) {
		km_error_set(err,
			     "archive %s refers to %llu chunks (of %llu) that the target's store "
			     "lacks, the first %s: send the weights ahead",
			     file, (unsigned long long)missing, (unsigned long long)chunks, first);
		return -ENOENT;
	}
	r = km_archive_find(fd, "checkpoint/" KM_DELTA_NAME, &dm, err);
	if (r < 0) {
		km_error_prefix(err, "archive %s: a split image without its delta", file);
		return r == -ENOENT ? -EINVAL : r;
	}
	snprintf(root, sizeof(root), "%s.kmman", km_hash_to_hex(mid, hex));
	r = km_store_root_write(c->store, "manifests", root, buf, n);
	if (r < 0) {
		km_error_set(err, "store %s: cannot record manifest %s: %s", c->srv->o.store, root,
			     strerror(-r));
		return r;
	}
	reply->split = true;
	reply->chunks = chunks;
	return 0;
}

static int handle_archive_commit(struct conn *c, const Kvmotion__Wire__ArchiveCommit *m,
				 struct km_error *err)
{
	Kvmotion__Wire__ArchiveDone reply = KVMOTION__WIRE__ARCHIVE_DONE__INIT;
	char path[PATH_MAX + 2 * NAME_MAX + 4], id[128] = "";
	_cleanup_close_ int fd = -1;
	struct km_hash mid;
	struct stat st;
	uint64_t t0 = now_ns();
	int r, pid = 0;

	if (!c->image_active) {
		km_error_set(err, "protocol error: ARCHIVE_COMMIT outside an image");
		return -EPROTO;
	}
	if (c->file_fd >= 0) {
		km_error_set(err, "protocol error: ARCHIVE_COMMIT while file %s is incomplete",
			     c->file_name);
		return -EPROTO;
	}
	r = check_name(m->file, "archive", err);
	if (r < 0)
		return r;
	fd = openat(c->image_fd, m->file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		r = -errno;
		km_error_set(err, "archive %s: %s", m->file,
			     r == -ENOENT ? "not sent in this image" : strerror(-r));
		return r == -ENOENT ? -EPROTO : r;
	}
	snprintf(path, sizeof(path), "%s/%s/%s", c->srv->images_path, c->image_name, m->file);
	r = archive_check(c, fd, m->file, &reply, &mid, err);
	if (r < 0)
		return r;
	reply.check_ns = now_ns() - t0;
	conn_log(c, "archive %s: %s, %llu chunk references present (%.3f s)", m->file,
		 reply.split ? "split image" : "plain image", (unsigned long long)reply.chunks,
		 (double)reply.check_ns / 1e9);
	if (m->restore) {
		t0 = now_ns();
		r = container_restore(c, path, m->name, &pid, id, sizeof(id), err);
		if (r < 0) {
			char hex[KM_HASH_HEX_SIZE], root[KM_HASH_HEX_SIZE + 8];

			/* The archive goes with its directory: so does its root. */
			if (reply.split) {
				snprintf(root, sizeof(root), "%s.kmman", km_hash_to_hex(&mid, hex));
				(void)km_store_root_remove(c->store, "manifests", root);
			}
			km_error_prefix(err, "image %s", c->image_name);
			return r;
		}
		reply.has_restore_ns = true;
		reply.restore_ns = now_ns() - t0;
		reply.has_restored_pid = true;
		reply.restored_pid = pid;
		reply.container_id = id;
		conn_log(c, "container %s restored from %s: pid %d in %.3f s", m->name, m->file,
			 pid, (double)reply.restore_ns / 1e9);
	}
	reply.dir = c->image_name;
	reply.path = path;
	reply.bytes = (uint64_t)st.st_size;
	if (reply.split) {
		reply.has_manifest_id = true;
		reply.manifest_id = (ProtobufCBinaryData){ KM_HASH_SIZE, mid.b };
	}
	/* Kept: the directory holds the archive until someone removes it. */
	if (unlinkat(c->image_fd, INCOMPLETE_MARKER, 0) < 0) {
		r = -errno;
		km_error_set(err, "image %s: cannot remove its marker: %s", c->image_name,
			     strerror(-r));
		return r;
	}
	close(c->marker_fd);
	c->marker_fd = -1;
	close(c->image_fd);
	c->image_fd = -1;
	c->image_active = false;
	return km_wire_send(&c->io, KVMOTION__WIRE__MSG_TYPE__MSG_ARCHIVE_DONE, &reply.base, NULL,
			    0, NULL, err);
}

/* ------------------------------------------------------------ connections */

static ssize_t conn_read(void *userdata, void *buf, size_t n, struct km_error *err)
{
	struct conn *c = userdata;
	ssize_t k = km_tls_read(c->tls, buf, n, err);

	if (k <= 0)
		c->io_failed = true;
	return k;
}

static int conn_write(void *userdata, const void *buf, size_t n, struct km_error *err)
{
	struct conn *c = userdata;
	int r = km_tls_write(c->tls, buf, n, err);

	if (r < 0)
		c->io_failed = true;
	return r;
}

/* One frame: 1 after BYE, 0 to go on, <0 error. */
static int dispatch(struct conn *c, const struct km_frame *f, struct km_error *err)
{
	char tn[24];

	if (!c->hello && f->type != KVMOTION__WIRE__MSG_TYPE__MSG_HELLO) {
		km_error_set(err, "protocol error: %s before HELLO",
			     km_wire_type_name(f->type, tn));
		return -EPROTO;
	}
	switch (f->type) {
	case KVMOTION__WIRE__MSG_TYPE__MSG_HELLO:
		if (c->hello) {
			km_error_set(err, "protocol error: a second HELLO");
			return -EPROTO;
		}
		return handle_hello(c, (const Kvmotion__Wire__Hello *)f->msg, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_QUERY_CHUNKS:
		return handle_query(c, (const Kvmotion__Wire__QueryChunks *)f->msg, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_CHUNK:
		return handle_chunk(c, (const Kvmotion__Wire__Chunk *)f->msg, f->payload,
				    f->payload_len, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_SYNC:
		return handle_sync(c, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_PUT_INDEX:
		return handle_put_index(c, (const Kvmotion__Wire__PutIndex *)f->msg, f->payload,
					f->payload_len, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_MATERIALIZE:
		return handle_materialize(c, (const Kvmotion__Wire__Materialize *)f->msg, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_BEGIN:
		return handle_image_begin(c, (const Kvmotion__Wire__ImageBegin *)f->msg, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_FILE:
		return handle_file(c, (const Kvmotion__Wire__File *)f->msg, f->payload,
				   f->payload_len, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_IMAGE_COMMIT:
		return handle_commit(c, (const Kvmotion__Wire__ImageCommit *)f->msg, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_ARCHIVE_COMMIT:
		return handle_archive_commit(c, (const Kvmotion__Wire__ArchiveCommit *)f->msg, err);
	case KVMOTION__WIRE__MSG_TYPE__MSG_BYE:
		return 1;
	default:
		km_error_set(err, "protocol error: a sender does not send %s",
			     km_wire_type_name(f->type, tn));
		return -EPROTO;
	}
}

static void session(struct conn *c)
{
	struct km_server *s = c->srv;
	struct km_error err = { { 0 } };
	unsigned idle_ms = s->o.idle_timeout_s * 1000u;
	int r;

	/*
	 * TLS owns (and closes) a duplicate: c->fd stays open until the thread
	 * ends, so that km_serve_run can shut the socket down at any time.
	 */
	r = fcntl(c->fd, F_DUPFD_CLOEXEC, 3);
	if (r < 0) {
		conn_log(c, "refused: %s", strerror(errno));
		return;
	}
	r = km_tls_accept(s->tls, r, idle_ms, &c->tls, &err);
	if (r < 0) {
		conn_log(c, "refused: %s", err.msg);
		/* Let the sender read our alert: closing on its unread data would reset it. */
		km_socket_drain(c->fd, DRAIN_MS);
		return;
	}
	conn_log(c, "authenticated as %s (%s)", km_tls_peer_identity(c->tls),
		 km_tls_cipher(c->tls));
	c->io = (struct km_wire_io){ .read = conn_read, .write = conn_write, .userdata = c };
	r = km_store_open(s->o.store, KM_STORE_CREATE | (s->o.sync ? 0 : KM_STORE_NOSYNC), NULL,
			  &c->store);
	if (r < 0) {
		km_error_set(&err, "store %s: %s", s->o.store, strerror(-r));
		goto fail;
	}
	r = km_wire_codec_new(&c->codec);
	if (r < 0)
		goto fail;
	c->lim.max_meta = KM_WIRE_META_MAX;
	c->lim.max_payload = s->o.max_payload;

	for (;;) {
		struct km_frame f = { 0 };

		err.msg[0] = 0;
		/* Between frames: wait for the next one, the server's stop or the idle timeout. */
		if (!km_tls_readable(c->tls, 0)) {
			struct pollfd p[2] = { { .fd = c->fd, .events = POLLIN },
					       { .fd = s->stop_efd, .events = POLLIN } };
			int k = poll(p, 2, (int)idle_ms);

			if (k == 0) {
				km_error_set(&err, "no frame for %u s: idle timeout",
					     s->o.idle_timeout_s);
				r = -ETIMEDOUT;
				break;
			}
			if (k > 0 && p[1].revents) {
				r = -ESHUTDOWN; /* answered below */
				break;
			}
		}
		r = km_wire_recv(&c->io, &c->rx, &c->lim, &f, &err);
		if (r < 0)
			break;
		r = dispatch(c, &f, &err);
		km_frame_clear(&f);
		if (r != 0)
			break;
		/* A sender streaming chunks never leaves the socket idle: ask here too. */
		if (atomic_load(&s->stopping)) {
			r = -ESHUTDOWN;
			break;
		}
	}
	if (r == 1) {
		image_abort(c); /* an image not committed is not kept */
		conn_log(c, "done: %llu chunks (%llu new), %llu bytes written, %.3f s",
			 (unsigned long long)c->chunks, (unsigned long long)c->chunks_stored,
			 (unsigned long long)c->quota_used,
			 (double)(now_ns() - c->started_ns) / 1e9);
		km_tls_conn_free(c->tls, true);
		c->tls = NULL;
		return;
	}
fail:
	if (atomic_load(&s->stopping) && !c->io_failed) {
		conn_log(c, "cancelled: the receiver is stopping");
		(void)km_wire_send_error(&c->io, -ESHUTDOWN, NULL, "the receiver is stopping");
		km_tls_drain(c->tls, DRAIN_MS);
	} else if (c->io_failed) {
		conn_log(c, "connection lost: %s", err.msg[0] ? err.msg : strerror(-r));
	} else {
		conn_log(c, "error: %s (%s)", err.msg[0] ? err.msg : strerror(-r), strerror(-r));
		if (c->detail[0])
			conn_log(c, "criu's log ends with:\n%s", c->detail);
		(void)km_wire_send_error(&c->io, r, c->detail[0] ? c->detail : NULL,
					 err.msg[0] ? err.msg : strerror(-r));
		km_tls_drain(c->tls, DRAIN_MS);
	}
	image_abort(c);
}

static void *conn_thread(void *arg)
{
	struct conn *c = arg;
	struct km_server *s = c->srv;
	sigset_t all;

	/* Signals are the main thread's business (the CLI's signalfd). */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	c->started_ns = now_ns();
	c->file_fd = -1;
	c->image_fd = -1;
	c->marker_fd = -1;
	session(c);
	km_tls_conn_free(c->tls, false);
	c->tls = NULL;
	pthread_mutex_lock(&s->lock);
	c->fd_open = false;
	close(c->fd);
	pthread_mutex_unlock(&s->lock);
	km_store_free(c->store);
	c->store = NULL;
	km_wire_rx_free(&c->rx);
	km_wire_codec_free(c->codec);
	c->codec = NULL;
	free(c->raw);
	c->raw = NULL;
	atomic_store(&c->finished, true);
	return NULL;
}

/* Joins and frees finished connections (all of them with 'all'). */
static void reap(struct km_server *s, bool all)
{
	for (;;) {
		struct conn **pp, *done = NULL;

		pthread_mutex_lock(&s->lock);
		for (pp = &s->conns; *pp; pp = &(*pp)->next)
			if (all || atomic_load(&(*pp)->finished)) {
				done = *pp;
				*pp = done->next;
				s->n_conns--;
				break;
			}
		pthread_mutex_unlock(&s->lock);
		if (!done)
			return;
		pthread_join(done->thread, NULL);
		free(done);
	}
}

static void peer_name(const struct sockaddr_storage *sa, char *buf, size_t size)
{
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;

	if (sa->ss_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
		port = ntohs(in->sin_port);
		snprintf(buf, size, "%s:%u", host, port);
	} else if (sa->ss_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;

		inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
		port = ntohs(in6->sin6_port);
		snprintf(buf, size, "[%s]:%u", host, port);
	} else {
		snprintf(buf, size, "(unknown)");
	}
}

static void accept_one(struct km_server *s)
{
	struct sockaddr_storage sa;
	socklen_t len = sizeof(sa);
	struct conn *c;
	int fd, one = 1, r;

	fd = accept4(s->listen_fd, (struct sockaddr *)&sa, &len, SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
			srv_log(s, "accept: %s", strerror(errno));
		return;
	}
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	/* a sender cut off mid-image: its directory goes in seconds, not at the idle timeout */
	km_socket_dead_peer(fd, KM_DEAD_PEER_MS_DEFAULT);
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->srv = s;
	c->fd = fd;
	c->fd_open = true;
	peer_name(&sa, c->peer, sizeof(c->peer));
	pthread_mutex_lock(&s->lock);
	if (s->n_conns >= s->o.max_connections + BUSY_EXTRA) {
		pthread_mutex_unlock(&s->lock);
		srv_log(s, "connection from %s dropped: %u connections open", c->peer, s->n_conns);
		close(fd);
		free(c);
		return;
	}
	c->busy = s->n_conns >= s->o.max_connections;
	c->id = ++s->next_id;
	r = pthread_create(&c->thread, NULL, conn_thread, c);
	if (r != 0) {
		pthread_mutex_unlock(&s->lock);
		srv_log(s, "connection from %s dropped: cannot start a thread: %s", c->peer,
			strerror(r));
		close(fd);
		free(c);
		return;
	}
	c->next = s->conns;
	s->conns = c;
	s->n_conns++;
	pthread_mutex_unlock(&s->lock);
	srv_log(s, "conn %u %s: connected", c->id, c->peer);
}

/* ------------------------------------------------------------ server */

static int bind_listen(struct km_server *s, struct km_error *err)
{
	char host[256], port[16];
	struct addrinfo hints = { .ai_family = AF_UNSPEC,
				  .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE };
	struct addrinfo *ai = NULL;
	struct sockaddr_storage sa;
	socklen_t len = sizeof(sa);
	int r, last = -EADDRNOTAVAIL;

	if (km_split_address(s->o.listen, host, sizeof(host), port, sizeof(port)) < 0) {
		km_error_set(err, "--listen '%s' is not ADDR:PORT", s->o.listen);
		return -EINVAL;
	}
	r = getaddrinfo(host[0] ? host : NULL, port, &hints, &ai);
	if (r != 0) {
		km_error_set(err, "--listen %s: %s", s->o.listen, gai_strerror(r));
		return -EADDRNOTAVAIL;
	}
	for (struct addrinfo *a = ai; a; a = a->ai_next) {
		int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol),
		    one = 1;

		if (fd < 0) {
			last = -errno;
			continue;
		}
		(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 64) < 0) {
			last = -errno;
			close(fd);
			continue;
		}
		s->listen_fd = fd;
		break;
	}
	freeaddrinfo(ai);
	if (s->listen_fd < 0) {
		km_error_set(err, "cannot listen on %s: %s", s->o.listen, strerror(-last));
		return last;
	}
	if (getsockname(s->listen_fd, (struct sockaddr *)&sa, &len) == 0)
		peer_name(&sa, s->address, sizeof(s->address));
	return 0;
}

/* Removes image directories whose receiver died mid-transfer (marker not locked). */
static void remove_stale_images(struct km_server *s)
{
	DIR *d;
	struct dirent *de;

	if (km_opendir_at(s->images_fd, &d) < 0)
		return;
	while ((de = readdir(d))) {
		char marker[NAME_MAX + sizeof(INCOMPLETE_MARKER) + 2];
		_cleanup_close_ int fd = -1;
		int r;

		if (de->d_name[0] == '.')
			continue;
		snprintf(marker, sizeof(marker), "%s/%s", de->d_name, INCOMPLETE_MARKER);
		fd = openat(s->images_fd, marker, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) < 0)
			continue; /* complete, or a live receiver's */
		r = remove_tree_at(s->images_fd, de->d_name);
		srv_log(s, "image directory %s was left incomplete by a receiver that died: %s",
			de->d_name, r < 0 ? strerror(-r) : "removed");
	}
	closedir(d);
}

int km_serve_new(const struct km_serve_opts *o, struct km_server **ret, struct km_error *err)
{
	struct km_server *s;
	struct km_store *store = NULL;
	int r;

	if (!o->listen || !o->store || !o->images) {
		km_error_set(err, "--listen, --store and --images are required");
		return -EINVAL;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->o = *o;
	s->listen_fd = -1;
	s->images_fd = -1;
	s->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (s->stop_efd < 0) {
		r = -errno;
		free(s);
		return r;
	}
	pthread_mutex_init(&s->lock, NULL);
	if (!s->o.max_bytes)
		s->o.max_bytes = KM_SERVE_MAX_BYTES_DEFAULT;
	if (!s->o.max_files)
		s->o.max_files = KM_SERVE_MAX_FILES_DEFAULT;
	if (!s->o.max_payload || s->o.max_payload > KM_WIRE_PAYLOAD_MAX)
		s->o.max_payload = KM_WIRE_PAYLOAD_MAX;
	if (!s->o.max_connections)
		s->o.max_connections = KM_SERVE_MAX_CONNECTIONS_DEFAULT;
	if (!s->o.idle_timeout_s)
		s->o.idle_timeout_s = KM_SERVE_IDLE_TIMEOUT_S_DEFAULT;

	r = km_tls_new(&o->tls, true, &s->tls, err);
	if (r < 0)
		goto fail;
	/* Fail now rather than at the first migration. */
	r = km_store_open(o->store, KM_STORE_CREATE | (o->sync ? 0 : KM_STORE_NOSYNC), NULL,
			  &store);
	if (r < 0) {
		km_error_set(err, "store %s: %s", o->store, strerror(-r));
		goto fail;
	}
	km_store_free(store);
	if (mkdir(o->images, 0700) < 0 && errno != EEXIST) {
		r = -errno;
		km_error_set(err, "image area %s: %s", o->images, strerror(-r));
		goto fail;
	}
	if (!realpath(o->images, s->images_path)) {
		r = -errno;
		km_error_set(err, "image area %s: %s", o->images, strerror(-r));
		goto fail;
	}
	s->images_fd = open(s->images_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (s->images_fd < 0) {
		r = -errno;
		km_error_set(err, "image area %s: %s", o->images, strerror(-r));
		goto fail;
	}
	remove_stale_images(s);
	r = bind_listen(s, err);
	if (r < 0)
		goto fail;
	*ret = s;
	return 0;
fail:
	km_serve_free(s);
	return r;
}

const char *km_serve_address(const struct km_server *s)
{
	return s->address;
}

/* Shuts down the sockets of the connections still running (how: SHUT_RD or SHUT_RDWR). */
static unsigned shutdown_all(struct km_server *s, int how)
{
	unsigned n = 0;

	pthread_mutex_lock(&s->lock);
	for (struct conn *c = s->conns; c; c = c->next)
		if (c->fd_open && !atomic_load(&c->finished)) {
			(void)shutdown(c->fd, how);
			n++;
		}
	pthread_mutex_unlock(&s->lock);
	return n;
}

int km_serve_run(struct km_server *s, struct km_error *err)
{
	unsigned n;
	int r = 0;

	srv_log(s,
		"listening on %s (%s), store %s, images %s, quota %llu bytes and %u files per connection",
		s->address, km_tls_mode(s->tls), s->o.store, s->images_path,
		(unsigned long long)s->o.max_bytes, s->o.max_files);
	for (;;) {
		struct pollfd p[2] = { { .fd = s->listen_fd, .events = POLLIN },
				       { .fd = s->o.stop_fd, .events = POLLIN } };
		int k = poll(p, s->o.stop_fd >= 0 ? 2 : 1, 1000);

		if (k < 0 && errno != EINTR) {
			r = -errno;
			km_error_set(err, "poll: %s", strerror(-r));
			break;
		}
		reap(s, false);
		if (k > 0 && s->o.stop_fd >= 0 && p[1].revents)
			break;
		if (k > 0 && p[0].revents & POLLIN)
			accept_one(s);
	}
	/*
	 * Connections in progress are cancelled: each sees stop_efd at its next
	 * frame boundary, tells its sender why (ERROR_SHUTDOWN) and removes its
	 * image directory. One that does not finish in 2 s (a sender that
	 * stalls mid-frame) has its socket shut down. A restore under way is
	 * waited for.
	 */
	atomic_store(&s->stopping, true);
	(void)eventfd_write(s->stop_efd, 1);
	n = s->n_conns;
	srv_log(s, "stopping: %u connection%s cancelled", n, n == 1 ? "" : "s");
	for (int i = 0; i < 200; i++) {
		reap(s, false);
		if (s->n_conns == 0)
			break;
		usleep(10000);
	}
	(void)shutdown_all(s, SHUT_RDWR);
	reap(s, true);
	srv_log(s, "stopped");
	return r;
}

void km_serve_free(struct km_server *s)
{
	if (!s)
		return;
	reap(s, true);
	if (s->listen_fd >= 0)
		close(s->listen_fd);
	if (s->images_fd >= 0)
		close(s->images_fd);
	if (s->stop_efd >= 0)
		close(s->stop_efd);
	km_tls_free(s->tls);
	pthread_mutex_destroy(&s->lock);
	free(s);
}
