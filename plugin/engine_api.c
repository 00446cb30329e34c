/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libkvmotion-engine: the engine's side of cooperative mode
 * (include/kvmotion/engine.h, protocol in docs/formats.md).
 *
 * A control thread serves one connection at a time on the abstract socket
 * "\0kvmotion-engine/<pid>". Everything it does to the engine happens
 * through the engine's callbacks, on that thread; the engine's own threads
 * only touch the KV bitmaps (atomics, no lock) and, rarely, the mutex that
 * guards the weights list, the counters and the state.
 *
 * The thread is written to survive a CRIU dump and restore at any point:
 * every wait is a poll() restarted on EINTR, and the quiesced engine's
 * resume timeout counts only the time the thread itself saw passing in
 * short slices, so a freeze or a monotonic clock that differs on the
 * restore's host is not taken for silence.
 */
#include "kvmotion/engine.h"

#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include "config.h"
#include "engine.pb-c.h"
#include "engine_ctl.h"
#include "format.h"
#include "hash.h"
#include "store.h"
#include "util.h"
#include "weights.h"

#define KME_EXPORT __attribute__((visibility("default")))

#define MAX_POOLS 64
#define RESUME_TIMEOUT_DEFAULT_MS 300000u
/* A connected client sends its request at once. */
#define REQUEST_WAIT_MS 2000
/* Waiting for the COMMIT: the plugin's timeout from the request, and this. */
#define COMMIT_GRACE_MS 2000
/* QUIESCE without a timeout_ms: what the callback is told it has. */
#define QUIESCE_TIMEOUT_DEFAULT_MS 30000
/*
 * The quiesced wait runs in slices; a slice that seemed to last longer than
 * itself plus this slack was a freeze (dump) or a clock jump (restore on
 * another host): not counted towards the resume timeout.
 */
#define SLICE_MS 500
#define SLICE_SLACK_MS 2000
/* Weights entries are reported in one packet: keep them well inside it. */
#define WEIGHTS_BYTES_MAX (KM_ENGINE_MSG_MAX / 2)

/* ---- weights ---- */

struct kme_weights {
	void *data; /* MAP_SHARED, PROT_READ; NULL for an empty file */
	uint64_t size;
	char path[4096];
	struct km_hash id;
	char id_hex[KM_HASH_HEX_SIZE];
	struct km_weights_index *idx; /* owns the names layout points to */
	struct km_weights_file_layout *layout;
	size_t n_files;
};

KME_EXPORT void kme_weights_close(struct kme_weights *w)
{
	if (!w)
		return;
	if (w->data)
		munmap(w->data, w->size);
	free(w->layout);
	km_weights_index_free(w->idx);
	free(w);
}

static void store_free_p(struct km_store **s)
{
	km_store_free(*s);
}

static void weights_close_p(struct kme_weights **w)
{
	kme_weights_close(*w);
}

/*
 * The store to use: the argument, $KVMOTION_STORE, the config file's. The
 * config also says whether to fsync; when the store does not come from it,
 * a bad config file is not an error here (defaults apply).
 */
static int pick_store(const char *store, struct km_config *cfg, char *buf, size_t bufsize,
		      struct km_error *err)
{
	const char *env = getenv("KVMOTION_STORE");
	struct km_error cerr = { { 0 } };
	int r;

	km_config_init(cfg);
	r = km_config_load(cfg, NULL, &cerr);
	if (r < 0) {
		if (!(store && store[0]) && !(env && env[0])) {
			km_error_set(err, "%s", cerr.msg[0] ? cerr.msg : "cannot read the kvmotion config");
			return r;
		}
		km_config_init(cfg);
	}
	if (!(store && store[0]))
		store = env && env[0] ? env : cfg->store;
	if (strlen(store) >= bufsize) {
		km_error_set(err, "store path too long");
		return -ENAMETOOLONG;
	}
	strcpy(buf, store);
	return 0;
}

/* Loads the layout of index 'name' of s into w. */
static int weights_load_layout(struct km_store *s, const char *name, struct kme_weights *w,
			       struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	char root[300];
	uint64_t size;
	size_t n;
	int r;

	if ((size_t)snprintf(root, sizeof(root), "%s.kmidx", name) >= sizeof(root))
		return -ENAMETOOLONG;
	r = km_store_root_read(s, "indexes", root, &buf, &n);
	if (r < 0) {
		km_error_set(err, "weights index %s: %s", name, strerror(-r));
		return r;
	}
	r = km_weights_index_decode(buf, n, &w->idx, err);
	if (r < 0)
		return r;
	r = km_weights_layout(w->idx, &w->layout, &w->n_files, &size);
	if (r < 0) {
		km_error_set(err, "weights index %s: no layout: %s", name, strerror(-r));
		return r;
	}
	if (size != w->size) {
		km_error_set(err, "weights file %s is %llu bytes, its index %s lays out %llu", w->path,
			     (unsigned long long)w->size, name, (unsigned long long)size);
		return -EBADMSG;
	}
	/*
	 * Only the files' names and places are used from here on: the chunk
	 * list (one entry per chunk, megabytes for a large model) would sit in
	 * the engine's heap and be dumped with it at every stop.
	 */
	for (size_t i = 0; i < w->idx->n_files; i++) {
		free(w->idx->files[i].extents);
		w->idx->files[i].extents = NULL;
		w->idx->files[i].n_extents = 0;
	}
	return 0;
}

KME_EXPORT int kme_weights_open_ex(const char *store, const char *ref, struct kme_weights **ret,
				   char *msg, size_t msg_size)
{
	_cleanup_(store_free_p) struct km_store *s = NULL;
	_cleanup_(weights_close_p) struct kme_weights *w = NULL;
	_cleanup_close_ int fd = -1;
	struct km_error err = { { 0 } };
	struct km_weights_info info;
	struct km_config cfg;
	char store_path[4096], index_name[256];
	struct stat st;
	int r;

	if (msg && msg_size)
		msg[0] = '\0';
	if (!ref || !ref[0] || !ret)
		return -EINVAL;
	r = pick_store(store, &cfg, store_path, sizeof(store_path), &err);
	if (r < 0)
		goto fail;
	r = km_store_open(store_path, cfg.sync ? 0 : KM_STORE_NOSYNC, NULL, &s);
	if (r < 0) {
		km_error_set(&err, "store %s: %s", store_path,
			     r == -ENOENT ? "no such store" : strerror(-r));
		goto fail;
	}
	memset(&info, 0, sizeof(info));
	index_name[0] = '\0';
	r = km_weights_resolve(s, ref, cfg.weights_dir[0] ? cfg.weights_dir : NULL, cfg.sync, &info,
			       index_name, sizeof(index_name), &err);
	if (r < 0) {
		if (!err.msg[0])
			km_error_set(&err, "%s: %s", ref, strerror(-r));
		goto fail;
	}
	w = calloc(1, sizeof(*w));
	if (!w) {
		r = -ENOMEM;
		goto fail;
	}
	memcpy(w->path, info.path, sizeof(w->path));
	w->path[sizeof(w->path) - 1] = '\0';
	w->id = info.id;
	w->size = info.size;
	km_hash_to_hex(&w->id, w->id_hex);
	r = weights_load_layout(s, index_name, w, &err);
	/*
	 * Seeding, materializing and decoding the index in this process used
	 * large buffers, and the store holds its record of verified chunks (an
	 * entry per chunk): free the store and hand those pages back now, or
	 * every dump of the engine carries them.
	 */
	km_store_free(KM_TAKE_PTR(s));
	malloc_trim(0);
	if (r < 0)
		goto fail;

	fd = open(w->path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		r = -errno;
		km_error_set(&err, "%s: %s", w->path, strerror(-r));
		goto fail;
	}
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != w->size) {
		km_error_set(&err, "%s: not a regular file of %llu bytes", w->path,
			     (unsigned long long)w->size);
		r = -EBADMSG;
		goto fail;
	}
	/* The mapping is what CRIU records by path; the fd is not needed after. */
	if (w->size) {
		w->data = mmap(NULL, w->size, PROT_READ, MAP_SHARED, fd, 0);
		if (w->data == MAP_FAILED) {
			w->data = NULL;
			r = -errno;
			km_error_set(&err, "cannot map %s: %s", w->path, strerror(-r));
			goto fail;
		}
	}
	*ret = KM_TAKE_PTR(w);
	return 0;
fail:
	if (msg && msg_size)
		snprintf(msg, msg_size, "%s", err.msg[0] ? err.msg : strerror(-r));
	return r;
}

KME_EXPORT int kme_weights_open(const char *store, const char *ref, struct kme_weights **ret)
{
	return kme_weights_open_ex(store, ref, ret, NULL, 0);
}

KME_EXPORT const void *kme_weights_data(const struct kme_weights *w)
{
	return w ? w->data : NULL;
}

KME_EXPORT uint64_t kme_weights_size(const struct kme_weights *w)
{
	return w ? w->size : 0;
}

KME_EXPORT const char *kme_weights_path(const struct kme_weights *w)
{
	return w ? w->path : NULL;
}

KME_EXPORT const char *kme_weights_id(const struct kme_weights *w)
{
	return w ? w->id_hex : NULL;
}

KME_EXPORT size_t kme_weights_n_files(const struct kme_weights *w)
{
	return w ? w->n_files : 0;
}

KME_EXPORT int kme_weights_file(const struct kme_weights *w, size_t i, const char **name,
				uint64_t *offset, uint64_t *size)
{
	if (!w)
		return -EINVAL;
	if (i >= w->n_files)
		return -ERANGE;
	if (name)
		*name = w->layout[i].name;
	if (offset)
		*offset = w->layout[i].offset;
	if (size)
		*size = w->layout[i].size;
	return 0;
}

/* ---- engine ---- */

struct kv_pool {
	uint8_t *base;
	size_t block_size;
	uint32_t n_blocks;
	unsigned flags;
	/* How free runs are released; learnt at the first run (control thread). */
	enum { RELEASE_UNKNOWN, RELEASE_REMOVE, RELEASE_DONTNEED } release;
	_Atomic uint64_t free_bits[]; /* bit set: block free */
};

struct weights_ref {
	char *path;
	struct km_hash id;
	uint64_t size;
};

struct kme_engine {
	struct kme_callbacks cb;
	uint32_t resume_timeout_ms;
	pid_t pid;
	int listen_fd;
	int stop_fd; /* eventfd: kme_engine_stop wakes the thread */
	pthread_t thread;
	bool started;
	uint8_t *buf; /* control thread: one packet in or out */

	/* Published once, never removed before stop: set_free reads them unlocked. */
	_Atomic(struct kv_pool *) pools[MAX_POOLS];
	_Atomic uint32_t n_pools;

	pthread_mutex_t lock; /* the rest */
	struct weights_ref *weights;
	size_t n_weights;
	size_t weights_bytes;
	struct kme_stats stats; /* stats.quiesced is the state */
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

KME_EXPORT int kme_kv_pool_register(struct kme_engine *e, void *base, size_t block_size,
				    uint32_t n_blocks, unsigned flags, uint32_t *ret_pool)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t words = ((size_t)n_blocks + 63) / 64;
	struct kv_pool *p;
	uint32_t n;

	if (!e || !base || !block_size || !n_blocks || (flags & ~(unsigned)KME_KV_DEVICE))
		return -EINVAL;
	if (block_size > SIZE_MAX / n_blocks ||
	    (uintptr_t)base > UINTPTR_MAX - block_size * (size_t)n_blocks)
		return -EOVERFLOW;
	if (!(flags & KME_KV_DEVICE) && ((uintptr_t)base % page || block_size % page))
		return -EINVAL;
	p = calloc(1, sizeof(*p) + words * sizeof(p->free_bits[0]));
	if (!p)
		return -ENOMEM;
	p->base = base;
	p->block_size = block_size;
	p->n_blocks = n_blocks;
	p->flags = flags;
	for (size_t i = 0; i < words; i++)
		atomic_init(&p->free_bits[i], 0);

	pthread_mutex_lock(&e->lock);
	n = atomic_load_explicit(&e->n_pools, memory_order_relaxed);
	if (n >= MAX_POOLS) {
		pthread_mutex_unlock(&e->lock);
		free(p);
		return -ENOSPC;
	}
	atomic_store_explicit(&e->pools[n], p, memory_order_release);
	atomic_store_explicit(&e->n_pools, n + 1, memory_order_release);
	pthread_mutex_unlock(&e->lock);
	if (ret_pool)
		*ret_pool = n;
	return 0;
}

KME_EXPORT int kme_kv_block_set_free(struct kme_engine *e, uint32_t pool, uint32_t block,
				     bool free)
{
	struct kv_pool *p;
	uint64_t bit;

	if (!e || pool >= atomic_load_explicit(&e->n_pools, memory_order_acquire))
		return -EINVAL;
	p = atomic_load_explicit(&e->pools[pool], memory_order_acquire);
	if (block >= p->n_blocks)
		return -ERANGE;
	bit = UINT64_C(1) << (block % 64);
	/* release: the engine's last writes to a block come before its freeing */
	if (free)
		atomic_fetch_or_explicit(&p->free_bits[block / 64], bit, memory_order_release);
	else
		atomic_fetch_and_explicit(&p->free_bits[block / 64], ~bit, memory_order_release);
	return 0;
}

KME_EXPORT int kme_engine_add_weights(struct kme_engine *e, const struct kme_weights *w)
{
	struct weights_ref *x;
	size_t cost;
	int r = 0;

	if (!e || !w)
		return -EINVAL;
	cost = strlen(w->path) + 64;
	pthread_mutex_lock(&e->lock);
	for (size_t i = 0; i < e->n_weights; i++)
		if (km_hash_equal(&e->weights[i].id, &w->id) &&
		    strcmp(e->weights[i].path, w->path) == 0)
			goto out; /* already listed */
	if (e->weights_bytes + cost > WEIGHTS_BYTES_MAX) {
		r = -E2BIG;
		goto out;
	}
	x = realloc(e->weights, (e->n_weights + 1) * sizeof(*x));
	if (!x) {
		r = -ENOMEM;
		goto out;
	}
	e->weights = x;
	x = &e->weights[e->n_weights];
	x->path = strdup(w->path);
	if (!x->path) {
		r = -ENOMEM;
		goto out;
	}
	x->id = w->id;
	x->size = w->size;
	e->n_weights++;
	e->weights_bytes += cost;
out:
	pthread_mutex_unlock(&e->lock);
	return r;
}

KME_EXPORT int kme_engine_stats(struct kme_engine *e, struct kme_stats *ret)
{
	if (!e || !ret)
		return -EINVAL;
	pthread_mutex_lock(&e->lock);
	*ret = e->stats;
	pthread_mutex_unlock(&e->lock);
	return 0;
}

/* --- the control thread --- */

static bool engine_quiesced(struct kme_engine *e)
{
	bool q;

	pthread_mutex_lock(&e->lock);
	q = e->stats.quiesced;
	pthread_mutex_unlock(&e->lock);
	return q;
}

/* Releases [first, first + n) of a host pool: 0 or -errno. */
static int release_run(struct kv_pool *p, uint32_t first, uint32_t n)
{
	uint8_t *addr = p->base + (size_t)first * p->block_size;
	size_t len = (size_t)n * p->block_size;

	/*
	 * Shared memory (shmem, memfd) keeps its pages under MADV_DONTNEED:
	 * punch them out so they read back as zeros and are not dumped. For
	 * private memory MADV_REMOVE fails at once (EINVAL or EACCES).
	 */
	if (p->release != RELEASE_DONTNEED) {
		if (madvise(addr, len, MADV_REMOVE) == 0) {
			p->release = RELEASE_REMOVE;
			return 0;
		}
		if (p->release == RELEASE_REMOVE)
			return -errno;
		p->release = RELEASE_DONTNEED;
	}
	return madvise(addr, len, MADV_DONTNEED) == 0 ? 0 : -errno;
}

/*
 * Counts the free blocks of every pool and releases those of host pools,
 * one madvise per run. The first failure is described in warn.
 */
static void release_free_blocks(struct kme_engine *e, uint32_t *ret_free, uint64_t *ret_bytes,
				char *warn, size_t warn_size)
{
	uint32_t n_pools = atomic_load_explicit(&e->n_pools, memory_order_acquire);
	uint64_t bytes = 0;
	uint32_t nfree = 0;

	for (uint32_t i = 0; i < n_pools; i++) {
		struct kv_pool *p = atomic_load_explicit(&e->pools[i], memory_order_acquire);
		uint32_t b = 0;

		while (b < p->n_blocks) {
			uint64_t word = atomic_load_explicit(&p->free_bits[b / 64],
							     memory_order_acquire);
			uint32_t first, n;
			int r;

			if (!(word >> (b % 64))) { /* nothing free in the rest of this word */
				b = (b / 64 + 1) * 64;
				continue;
			}
			b += (uint32_t)__builtin_ctzll(word >> (b % 64));
			if (b >= p->n_blocks)
				break;
			first = b;
			while (b < p->n_blocks &&
			       (atomic_load_explicit(&p->free_bits[b / 64], memory_order_acquire) >>
				(b % 64)) & 1)
				b++;
			n = b - first;
			nfree += n;
			if (p->flags & KME_KV_DEVICE)
				continue;
			r = release_run(p, first, n);
			if (r == 0)
				bytes += (uint64_t)n * p->block_size;
			else if (warn[0] == '\0')
				snprintf(warn, warn_size,
					 "KV pool %u blocks %u-%u not released: %s", i, first,
					 b - 1, strerror(-r));
		}
	}
	*ret_free = nfree;
	*ret_bytes = bytes;
}

/*
 * Waits for events on conn, or for stop: 0 ready, -ETIMEDOUT, -ECANCELED
 * (stopping), other -errno.
 */
static int wait_conn(struct kme_engine *e, int conn, short events, uint64_t deadline)
{
	for (;;) {
		struct pollfd p[2] = { { .fd = conn, .events = events },
				       { .fd = e->stop_fd, .events = POLLIN } };
		uint64_t now = now_ms();
		int k;

		if (now >= deadline)
			return -ETIMEDOUT;
		k = poll(p, 2, (int)KM_MIN(deadline - now, (uint64_t)INT32_MAX));
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (p[1].revents)
			return -ECANCELED;
		if (k > 0)
			return 0;
	}
}

/* Receives one packet: its length, 0 at end of connection, or -errno. */
static ssize_t recv_packet(struct kme_engine *e, int conn, uint64_t deadline)
{
	for (;;) {
		ssize_t n;
		int r = wait_conn(e, conn, POLLIN, deadline);

		if (r < 0)
			return r;
		n = recv(conn, e->buf, KM_ENGINE_MSG_MAX + 1, MSG_TRUNC | MSG_DONTWAIT);
		if (n > (ssize_t)KM_ENGINE_MSG_MAX)
			return -EMSGSIZE;
		if (n >= 0)
			return n;
		if (errno == ECONNRESET)
			return 0;
		if (errno != EINTR && errno != EAGAIN)
			return -errno;
	}
}

/* True if the client has gone: its close is what cancels a quiesce. */
static bool peer_gone(int conn)
{
	struct pollfd p = { .fd = conn, .events = POLLRDHUP };

	while (poll(&p, 1, 0) < 0)
		if (errno != EINTR)
			return true;
	return p.revents & (POLLHUP | POLLRDHUP | POLLERR);
}

struct reply {
	Kvmotion__EngineReply pb;
	Kvmotion__EngineStats stats;
	Kvmotion__EngineWeights *ws;
	Kvmotion__EngineWeights **w_ptrs;
	struct km_hash *ids; /* copies: e->weights may move once unlocked */
};

static void reply_init(struct kme_engine *e, struct reply *rp, Kvmotion__EngineOp op)
{
	memset(rp, 0, sizeof(*rp));
	kvmotion__engine_reply__init(&rp->pb);
	kvmotion__engine_stats__init(&rp->stats);
	rp->pb.major = KM_ENGINE_PROTO_MAJOR;
	rp->pb.minor = KM_ENGINE_PROTO_MINOR;
	rp->pb.op = op;
	rp->pb.ok = 1;
	rp->pb.engine_pid = e->pid;
	rp->pb.stats = &rp->stats;
}

static void reply_error(struct reply *rp, int error, const char *msg)
{
	rp->pb.ok = 0;
	rp->pb.has_error = 1;
	rp->pb.error = error < 0 ? -error : error;
	rp->pb.message = (char *)msg;
}

/* Fills state and counters (and, with_weights, the weights) under the lock. */
static int reply_fill(struct kme_engine *e, struct reply *rp, bool quiesced, bool with_weights)
{
	pthread_mutex_lock(&e->lock);
	rp->pb.state = quiesced ? KVMOTION__ENGINE_STATE__ENGINE_QUIESCED
				: KVMOTION__ENGINE_STATE__ENGINE_RUNNING;
	rp->stats.quiesces = e->stats.quiesces;
	rp->stats.resumes = e->stats.resumes;
	rp->stats.cancelled = e->stats.cancelled;
	rp->stats.refused = e->stats.refused;
	rp->stats.self_resumes = e->stats.self_resumes;
	rp->stats.last_released_bytes = e->stats.last_released_bytes;
	rp->stats.last_free_blocks = e->stats.last_free_blocks;
	rp->stats.restored = e->stats.restored;
	if (with_weights && e->n_weights) {
		rp->ws = calloc(e->n_weights, sizeof(*rp->ws));
		rp->w_ptrs = calloc(e->n_weights, sizeof(*rp->w_ptrs));
		rp->ids = calloc(e->n_weights, sizeof(*rp->ids));
		if (!rp->ws || !rp->w_ptrs || !rp->ids) {
			pthread_mutex_unlock(&e->lock);
			return -ENOMEM;
		}
		for (size_t i = 0; i < e->n_weights; i++) {
			Kvmotion__EngineWeights *w = &rp->ws[i];

			kvmotion__engine_weights__init(w);
			/* strdup'd paths stay until stop, which waits for this thread */
			w->path = e->weights[i].path;
			rp->ids[i] = e->weights[i].id;
			w->sha256.len = KM_HASH_SIZE;
			w->sha256.data = rp->ids[i].b;
			w->size = e->weights[i].size;
			rp->w_ptrs[i] = w;
		}
		rp->pb.weights = rp->w_ptrs;
		rp->pb.n_weights = e->n_weights;
	}
	pthread_mutex_unlock(&e->lock);
	return 0;
}

static void reply_clear(struct reply *rp)
{
	free(rp->ws);
	free(rp->w_ptrs);
	free(rp->ids);
}

/* Sends the reply: 0, or -errno (-EPIPE, -ECONNRESET: the client has gone). */
static int reply_send(struct kme_engine *e, int conn, struct reply *rp)
{
	size_t len = kvmotion__engine_reply__get_packed_size(&rp->pb);

	if (len > KM_ENGINE_MSG_MAX) {
		/* cannot happen with WEIGHTS_BYTES_MAX; say so rather than truncate */
		reply_clear(rp);
		rp->pb.n_weights = 0;
		rp->pb.weights = NULL;
		rp->ws = NULL;
		rp->w_ptrs = NULL;
		rp->ids = NULL;
		reply_error(rp, E2BIG, "the reply does not fit in a packet");
		len = kvmotion__engine_reply__get_packed_size(&rp->pb);
	}
	kvmotion__engine_reply__pack(&rp->pb, e->buf);
	for (;;) {
		int r;

		if (send(conn, e->buf, len, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return -errno;
		r = wait_conn(e, conn, POLLOUT, now_ms() + REQUEST_WAIT_MS);
		if (r < 0)
			return r;
	}
}

/* Undoes a quiesce the plugin gave up on: the engine goes on serving. */
static void quiesce_cancel(struct kme_engine *e)
{
	e->cb.resume(e->cb.userdata, false);
	pthread_mutex_lock(&e->lock);
	e->stats.cancelled++;
	e->stats.quiesced = false;
	pthread_mutex_unlock(&e->lock);
}

/*
 * Waits for the COMMIT that follows the answer to a QUIESCE: true if it
 * came, false if the connection ended or nothing came by deadline.
 */
static bool wait_commit(struct kme_engine *e, int conn, uint64_t deadline)
{
	Kvmotion__EngineRequest *c;
	bool ok;
	ssize_t n = recv_packet(e, conn, deadline);

	if (n <= 0)
		return false;
	c = kvmotion__engine_request__unpack(NULL, (size_t)n, e->buf);
	ok = c && c->major == KM_ENGINE_PROTO_MAJOR && c->op == KVMOTION__ENGINE_OP__ENGINE_COMMIT;
	kvmotion__engine_request__free_unpacked(c, NULL);
	return ok;
}

static void serve_quiesce(struct kme_engine *e, int conn, const Kvmotion__EngineRequest *req,
			  uint64_t t0)
{
	uint32_t timeout = req->has_timeout_ms ? req->timeout_ms : QUIESCE_TIMEOUT_DEFAULT_MS;
	uint64_t commit_by = t0 + timeout + COMMIT_GRACE_MS;
	uint64_t released = 0, elapsed;
	char warn[256] = "", msg[300];
	uint32_t nfree = 0;
	struct reply rp;
	int r;

	reply_init(e, &rp, KVMOTION__ENGINE_OP__ENGINE_QUIESCE);
	if (engine_quiesced(e)) {
		/* Asked twice: answer as before, nothing to undo either way. */
		if (reply_fill(e, &rp, true, true) == 0) {
			rp.pb.has_free_blocks = rp.pb.has_released_bytes = 1;
			rp.pb.free_blocks = rp.stats.last_free_blocks;
			rp.pb.released_bytes = rp.stats.last_released_bytes;
			if (reply_send(e, conn, &rp) == 0)
				wait_commit(e, conn, commit_by);
		}
		reply_clear(&rp);
		return;
	}

	elapsed = now_ms() - t0;
	r = e->cb.quiesce(e->cb.userdata, elapsed < timeout ? (uint32_t)(timeout - elapsed) : 0);
	if (r < 0) {
		pthread_mutex_lock(&e->lock);
		e->stats.refused++;
		pthread_mutex_unlock(&e->lock);
		snprintf(msg, sizeof(msg), "%s (quiesce callback returned %d)", kme_strerror(r), r);
		reply_error(&rp, r, msg);
		if (reply_fill(e, &rp, false, false) == 0 && reply_send(e, conn, &rp) == 0)
			wait_commit(e, conn, commit_by);
		reply_clear(&rp);
		return;
	}

	/* The engine has stopped: its bitmaps are stable. */
	release_free_blocks(e, &nfree, &released, warn, sizeof(warn));
	pthread_mutex_lock(&e->lock);
	e->stats.last_free_blocks = nfree;
	e->stats.last_released_bytes = released;
	e->stats.quiesced = true; /* tentatively: undone if no COMMIT */
	pthread_mutex_unlock(&e->lock);

	if (peer_gone(conn)) {
		quiesce_cancel(e);
		reply_clear(&rp);
		return;
	}
	r = reply_fill(e, &rp, true, true);
	if (r < 0) {
		reply_error(&rp, r, "out of memory building the reply");
	} else {
		rp.pb.has_free_blocks = rp.pb.has_released_bytes = 1;
		rp.pb.free_blocks = nfree;
		rp.pb.released_bytes = released;
		if (warn[0])
			rp.pb.message = warn;
	}
	if (r < 0 || reply_send(e, conn, &rp) < 0 || !rp.pb.ok ||
	    !wait_commit(e, conn, KM_MAX(commit_by, now_ms() + COMMIT_GRACE_MS))) {
		quiesce_cancel(e);
		reply_clear(&rp);
		return;
	}
	pthread_mutex_lock(&e->lock);
	e->stats.quiesces++;
	pthread_mutex_unlock(&e->lock);
	reply_clear(&rp);
}

/* Calls the resume callback of a quiesced engine; returns the callback's value. */
static int do_resume(struct kme_engine *e, bool restored, bool self)
{
	int r = e->cb.resume(e->cb.userdata, restored);

	pthread_mutex_lock(&e->lock);
	/* The callback ran: the engine owns its state whatever it returned. */
	e->stats.quiesced = false;
	e->stats.resumes++;
	e->stats.restored = restored;
	if (self)
		e->stats.self_resumes++;
	pthread_mutex_unlock(&e->lock);
	return r;
}

static void serve(struct kme_engine *e, int conn)
{
	Kvmotion__EngineRequest *req = NULL;
	uint64_t t0 = now_ms();
	struct reply rp;
	char msg[300];
	ssize_t n;
	int r;

	n = recv_packet(e, conn, t0 + REQUEST_WAIT_MS);
	if (n <= 0)
		return; /* a probe, a client gone, or stopping */
	req = kvmotion__engine_request__unpack(NULL, (size_t)n, e->buf);
	if (!req)
		return; /* not our protocol: nothing sensible to answer */
	reply_init(e, &rp, req->op);
	if (req->major != KM_ENGINE_PROTO_MAJOR) {
		snprintf(msg, sizeof(msg),
			 "engine protocol %u.%u not supported; this engine speaks major version %u",
			 req->major, req->minor, KM_ENGINE_PROTO_MAJOR);
		reply_error(&rp, EPROTONOSUPPORT, msg);
		if (reply_fill(e, &rp, engine_quiesced(e), false) == 0)
			reply_send(e, conn, &rp);
		goto out;
	}
	switch (req->op) {
	case KVMOTION__ENGINE_OP__ENGINE_QUIESCE:
		serve_quiesce(e, conn, req, t0);
		break;
	case KVMOTION__ENGINE_OP__ENGINE_RESUME:
		/* Not quiesced (never, cancelled, resumed by itself): nothing to do. */
		if (engine_quiesced(e)) {
			r = do_resume(e, req->has_restored && req->restored, false);
			if (r < 0) {
				snprintf(msg, sizeof(msg), "%s (resume callback returned %d)",
					 kme_strerror(r), r);
				reply_error(&rp, r, msg);
			}
		}
		if (reply_fill(e, &rp, false, false) == 0)
			reply_send(e, conn, &rp);
		break;
	case KVMOTION__ENGINE_OP__ENGINE_STATUS:
		if (reply_fill(e, &rp, engine_quiesced(e), false) == 0)
			reply_send(e, conn, &rp);
		break;
	default:
		snprintf(msg, sizeof(msg), "unknown request %d", (int)req->op);
		reply_error(&rp, EOPNOTSUPP, msg);
		if (reply_fill(e, &rp, engine_quiesced(e), false) == 0)
			reply_send(e, conn, &rp);
		break;
	}
out:
	reply_clear(&rp);
	kvmotion__engine_request__free_unpacked(req, NULL);
}

static void *control_main(void *arg)
{
	struct kme_engine *e = arg;
	uint64_t waited = 0, last = now_ms();

	for (;;) {
		struct pollfd p[2] = { { .fd = e->listen_fd, .events = POLLIN },
				       { .fd = e->stop_fd, .events = POLLIN } };
		bool quiesced = engine_quiesced(e);
		int timeout = -1, k, conn;
		uint64_t now, delta;

		if (quiesced) {
			uint64_t left = e->resume_timeout_ms > waited ? e->resume_timeout_ms - waited : 0;

			timeout = (int)KM_MIN(left, (uint64_t)SLICE_MS);
		}
		k = poll(p, 2, timeout);
		now = now_ms();
		delta = now - last; /* wraps to huge if the clock went back */
		last = now;
		if (quiesced && delta <= (uint64_t)timeout + SLICE_SLACK_MS)
			waited += delta;
		if (k < 0) {
			if (errno != EINTR) {
				struct timespec ts = { 0, 100 * 1000000 };

				nanosleep(&ts, NULL); /* ENOMEM: try again shortly */
			}
			continue;
		}
		if (p[1].revents)
			break;
		if (quiesced && waited >= e->resume_timeout_ms) {
			do_resume(e, false, true);
			quiesced = false;
		}
		if (!(p[0].revents & POLLIN))
			continue;
		conn = accept4(e->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (conn < 0)
			continue;
		serve(e, conn);
		/* No connection to the plugin outlives its request. */
		close(conn);
		if (!quiesced && engine_quiesced(e))
			waited = 0; /* a new quiesce: its own timeout */
		last = now_ms();
	}
	return NULL;
}

static void engine_free(struct kme_engine *e)
{
	uint32_t n = atomic_load(&e->n_pools);

	if (e->listen_fd >= 0)
		close(e->listen_fd);
	if (e->stop_fd >= 0)
		close(e->stop_fd);
	for (uint32_t i = 0; i < n; i++)
		free(atomic_load(&e->pools[i]));
	for (size_t i = 0; i < e->n_weights; i++)
		free(e->weights[i].path);
	free(e->weights);
	free(e->buf);
	pthread_mutex_destroy(&e->lock);
	free(e);
}

KME_EXPORT int kme_engine_start(const struct kme_callbacks *cb, const struct kme_engine_opts *opts,
				struct kme_engine **ret)
{
	struct kme_engine *e;
	struct sockaddr_un sa;
	sigset_t all, old;
	unsigned len;
	int r;

	if (!cb || !cb->quiesce || !cb->resume || !ret || (opts && opts->flags))
		return -EINVAL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->listen_fd = e->stop_fd = -1;
	pthread_mutex_init(&e->lock, NULL);
	e->cb = *cb;
	e->resume_timeout_ms = opts && opts->resume_timeout_ms ? opts->resume_timeout_ms
							       : RESUME_TIMEOUT_DEFAULT_MS;
	e->pid = getpid();
	atomic_init(&e->n_pools, 0);
	for (size_t i = 0; i < MAX_POOLS; i++)
		atomic_init(&e->pools[i], NULL);
	e->buf = malloc(KM_ENGINE_MSG_MAX + 1);
	if (!e->buf) {
		r = -ENOMEM;
		goto fail;
	}
	e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->stop_fd < 0) {
		r = -errno;
		goto fail;
	}
	r = km_engine_socket_addr(e->pid, &sa, &len);
	if (r < 0)
		goto fail;
	e->listen_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (e->listen_fd < 0 || bind(e->listen_fd, (struct sockaddr *)&sa, len) < 0 ||
	    listen(e->listen_fd, 8) < 0) {
		r = -errno; /* EADDRINUSE: an engine already runs in this process */
		goto fail;
	}
	/* The engine's signals are for its own threads, never this one. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	r = -pthread_create(&e->thread, NULL, control_main, e);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r < 0)
		goto fail;
	e->started = true;
	*ret = e;
	return 0;
fail:
	engine_free(e);
	return r;
}

KME_EXPORT void kme_engine_stop(struct kme_engine *e)
{
	uint64_t one = 1;

	if (!e)
		return;
	if (e->started) {
		while (write(e->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR)
			;
		pthread_join(e->thread, NULL);
	}
	engine_free(e);
}

KME_EXPORT const char *kme_strerror(int error)
{
	switch (error) {
	case 0: return "success";
	case -EINVAL: return "invalid argument";
	case -ENOENT: return "not found (no such store, index or file)";
	case -EBADMSG: return "corrupt or inconsistent data";
	case -EPROTONOSUPPORT: return "unsupported format or protocol version";
	case -EADDRINUSE: return "an engine is already started in this process";
	case -ENOSPC: return "too many KV pools";
	case -E2BIG: return "too many weights for one reply";
	case -ERANGE: return "index out of range";
	case -ENOMEM: return "out of memory";
	case -ETIMEDOUT: return "timed out";
	case -EBUSY: return "busy";
	default: {
		const char *s = error < 0 ? strerrordesc_np(-error) : NULL;

		return s ? s : "unknown error";
	}
	}
}
