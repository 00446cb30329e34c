/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Cooperative mode in one process: the engine side through the kme_ API of
 * libkvmotion-engine.so (callbacks recording their calls, a KV pool in an
 * anonymous mapping filled with a pattern) and the plugin side through
 * km_engine_* against our own pid. Also DIR/kvmotion.engines, and the
 * setns path with the engine in another network namespace (root only).
 */
#include <check.h>

#include "km-check.h"
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvmotion/engine.h"

#include "engine.pb-c.h"
#include "engine_ctl.h"
#include "format.h"
#include "hash.h"
#include "image.h"
#include "store.h"

#define N_BLOCKS 16

/* What the callbacks saw, and what they do. */
struct calls {
	atomic_int quiesces;
	atomic_int resumes;
	atomic_int last_restored;
	atomic_uint last_deadline;
	int quiesce_ret;
	int quiesce_sleep_ms;
};

static int cb_quiesce(void *userdata, uint32_t deadline_ms)
{
	struct calls *c = userdata;

	c->quiesces++;
	c->last_deadline = deadline_ms;
	if (c->quiesce_sleep_ms) {
		struct timespec ts = { c->quiesce_sleep_ms / 1000,
				       (long)(c->quiesce_sleep_ms % 1000) * 1000000 };

		while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
			;
	}
	return c->quiesce_ret;
}

static int cb_resume(void *userdata, bool restored)
{
	struct calls *c = userdata;

	c->last_restored = restored;
	c->resumes++;
	return 0;
}

static uint64_t ms_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static struct kme_engine *start(struct calls *c, uint32_t resume_timeout_ms)
{
	struct kme_callbacks cb = { .quiesce = cb_quiesce, .resume = cb_resume, .userdata = c };
	struct kme_engine_opts o = { .resume_timeout_ms = resume_timeout_ms };
	struct kme_engine *e = NULL;

	ck_assert_int_eq(kme_engine_start(&cb, &o, &e), 0);
	return e;
}

/* The pattern byte of block b at i: never zero. */
static uint8_t pattern(uint32_t b, size_t i)
{
	return (uint8_t)((b * 31 + i * 7) % 255 + 1);
}

struct pool {
	uint8_t *p;
	size_t bs;
	uint32_t id;
};

static void pool_make(struct kme_engine *e, struct pool *pl, int mmap_flags)
{
	pl->bs = 2 * (size_t)sysconf(_SC_PAGESIZE);
	pl->p = mmap(NULL, pl->bs * N_BLOCKS, PROT_READ | PROT_WRITE, mmap_flags | MAP_ANONYMOUS,
		     -1, 0);
	ck_assert_ptr_ne(pl->p, MAP_FAILED);
	for (uint32_t b = 0; b < N_BLOCKS; b++)
		for (size_t i = 0; i < pl->bs; i++)
			pl->p[b * pl->bs + i] = pattern(b, i);
	ck_assert_int_eq(kme_kv_pool_register(e, pl->p, pl->bs, N_BLOCKS, KME_KV_HOST, &pl->id), 0);
}

static bool block_is_pattern(const struct pool *pl, uint32_t b)
{
	for (size_t i = 0; i < pl->bs; i++)
		if (pl->p[b * pl->bs + i] != pattern(b, i))
			return false;
	return true;
}

/* Pages of block b resident (mincore): checked before reading them. */
static int block_resident_pages(const struct pool *pl, uint32_t b)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	unsigned char vec[16];
	int n = 0;

	ck_assert_int_eq(mincore(pl->p + b * pl->bs, pl->bs, vec), 0);
	for (size_t i = 0; i < pl->bs / page; i++)
		n += vec[i] & 1;
	return n;
}

static struct kme_stats stats_of(struct kme_engine *e)
{
	struct kme_stats st;

	ck_assert_int_eq(kme_engine_stats(e, &st), 0);
	return st;
}

/* Waits (at most 10 s) until the engine's stats satisfy cond. */
#define WAIT_FOR(e, cond)                                                       \
	do {                                                                    \
		uint64_t _until = ms_now() + 10000;                             \
		struct kme_stats st;                                            \
		for (;;) {                                                      \
			st = stats_of(e);                                       \
			if (cond)                                               \
				break;                                          \
			ck_assert_msg(ms_now() < _until, "timed out: " #cond);  \
			usleep(10000);                                          \
		}                                                               \
	} while (0)

static const uint32_t free_set[] = { 1, 2, 3, 7, 15 };

static bool in_free_set(uint32_t b)
{
	for (size_t i = 0; i < KM_ARRAY_SIZE(free_set); i++)
		if (free_set[i] == b)
			return true;
	return false;
}

static void quiesce_resume_with(int mmap_flags)
{
	struct calls c = { 0 };
	struct kme_engine *e = start(&c, 0);
	struct km_error err = { { 0 } };
	struct km_engine_quiesced q = { 0 };
	struct km_engine_status s;
	struct kme_stats st;
	struct pool pl;
	uint8_t dev[1000];
	uint32_t dev_pool;

	pool_make(e, &pl, mmap_flags);
	for (size_t i = 0; i < KM_ARRAY_SIZE(free_set); i++)
		ck_assert_int_eq(kme_kv_block_set_free(e, pl.id, free_set[i], true), 0);
	/* freed then reused: in use again, kept */
	ck_assert_int_eq(kme_kv_block_set_free(e, pl.id, 4, true), 0);
	ck_assert_int_eq(kme_kv_block_set_free(e, pl.id, 4, false), 0);
	/* a device pool: its free blocks are counted, its memory is the engine's */
	memset(dev, 0xab, sizeof(dev));
	ck_assert_int_eq(kme_kv_pool_register(e, dev, 100, 10, KME_KV_DEVICE, &dev_pool), 0);
	ck_assert_uint_eq(dev_pool, pl.id + 1);
	ck_assert_int_eq(kme_kv_block_set_free(e, dev_pool, 0, true), 0);
	ck_assert_int_eq(kme_kv_block_set_free(e, dev_pool, 9, true), 0);

	ck_assert_msg(km_engine_quiesce(getpid(), 5000, &q, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(c.quiesces, 1);
	ck_assert_int_eq(c.resumes, 0);
	ck_assert_uint_gt(c.last_deadline, 4000);
	ck_assert_uint_le(c.last_deadline, 5000);
	ck_assert_uint_eq(q.free_blocks, KM_ARRAY_SIZE(free_set) + 2);
	ck_assert_uint_eq(q.released_bytes, KM_ARRAY_SIZE(free_set) * pl.bs);
	ck_assert_uint_eq(q.n_weights, 0);

	for (uint32_t b = 0; b < N_BLOCKS; b++) {
		if (in_free_set(b)) {
			ck_assert_msg(block_resident_pages(&pl, b) == 0, "free block %u resident", b);
			ck_assert_msg(km_is_zero(pl.p + b * pl.bs, pl.bs), "free block %u not zero", b);
		} else {
			ck_assert_msg(block_is_pattern(&pl, b), "used block %u changed", b);
		}
	}
	for (size_t i = 0; i < sizeof(dev); i++)
		ck_assert_uint_eq(dev[i], 0xab);

	st = stats_of(e);
	ck_assert(st.quiesced);
	ck_assert_uint_eq(st.quiesces, 1);
	ck_assert_uint_eq(st.last_free_blocks, KM_ARRAY_SIZE(free_set) + 2);
	ck_assert_uint_eq(st.last_released_bytes, KM_ARRAY_SIZE(free_set) * pl.bs);
	ck_assert_msg(km_engine_status(getpid(), 5000, &s, &err) == 0, "%s", err.msg);
	ck_assert(s.quiesced);
	ck_assert_int_eq(s.engine_pid, getpid());
	ck_assert_uint_eq(s.quiesces, 1);
	ck_assert_uint_eq(s.last_released_bytes, KM_ARRAY_SIZE(free_set) * pl.bs);

	ck_assert_msg(km_engine_resume(getpid(), true, 5000, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(c.resumes, 1);
	ck_assert_int_eq(c.last_restored, 1);
	st = stats_of(e);
	ck_assert(!st.quiesced);
	ck_assert(st.restored);
	ck_assert_uint_eq(st.resumes, 1);
	ck_assert_uint_eq(st.self_resumes, 0);
	ck_assert_uint_eq(st.cancelled, 0);

	/* A second resume: answered, no callback. */
	ck_assert_msg(km_engine_resume(getpid(), false, 5000, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(c.resumes, 1);
	ck_assert(stats_of(e).restored);

	/* And a second cycle: resume(false) reaches the callback as false. */
	km_engine_quiesced_clear(&q);
	ck_assert_msg(km_engine_quiesce(getpid(), 5000, &q, &err) == 0, "%s", err.msg);
	ck_assert_msg(km_engine_resume(getpid(), false, 5000, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(c.quiesces, 2);
	ck_assert_int_eq(c.resumes, 2);
	ck_assert_int_eq(c.last_restored, 0);

	km_engine_quiesced_clear(&q);
	kme_engine_stop(e);
	munmap(pl.p, pl.bs * N_BLOCKS);
}

START_TEST(test_engine_api_quiesce_releases_free_blocks)
{
	quiesce_resume_with(MAP_PRIVATE);
}
END_TEST

/* Shared memory keeps pages under MADV_DONTNEED: they must still go. */
START_TEST(test_engine_api_quiesce_releases_shared_pool)
{
	quiesce_resume_with(MAP_SHARED);
}
END_TEST

START_TEST(test_engine_api_refused_quiesce)
{
	struct calls c = { .quiesce_ret = -EBUSY };
	struct kme_engine *e = start(&c, 0);
	struct km_error err = { { 0 } };
	struct km_engine_quiesced q = { 0 };
	char want[64];
	struct kme_stats st;
	struct pool pl;

	pool_make(e, &pl, MAP_PRIVATE);
	ck_assert_int_eq(kme_kv_block_set_free(e, pl.id, 0, true), 0);
	ck_assert_int_eq(km_engine_quiesce(getpid(), 5000, &q, &err), -EBUSY);
	snprintf(want, sizeof(want), "engine in pid %d refused the quiesce", (int)getpid());
	ck_assert_msg(strstr(err.msg, want), "%s", err.msg);
	ck_assert_int_eq(c.quiesces, 1);
	ck_assert_int_eq(c.resumes, 0);
	st = stats_of(e);
	ck_assert(!st.quiesced);
	ck_assert_uint_eq(st.refused, 1);
	ck_assert_uint_eq(st.quiesces, 0);
	/* nothing released for a refused quiesce */
	ck_assert(block_is_pattern(&pl, 0));

	/* still serving: the next quiesce works */
	c.quiesce_ret = 0;
	ck_assert_msg(km_engine_quiesce(getpid(), 5000, &q, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(q.released_bytes, pl.bs);
	ck_assert_int_eq(c.resumes, 0);
	km_engine_quiesced_clear(&q);
	kme_engine_stop(e);
	munmap(pl.p, pl.bs * N_BLOCKS);
}
END_TEST

START_TEST(test_engine_api_slow_quiesce_is_cancelled)
{
	struct calls c = { .quiesce_sleep_ms = 1500 };
	struct kme_engine *e = start(&c, 0);
	struct km_error err = { { 0 } };
	struct km_engine_quiesced q = { 0 };
	struct km_engine_status s;
	char want[128];
	uint64_t t0 = ms_now(), took;

	ck_assert_int_eq(km_engine_quiesce(getpid(), 300, &q, &err), -ETIMEDOUT);
	took = ms_now() - t0;
	ck_assert_uint_ge(took, 300);
	ck_assert_uint_lt(took, 1200);
	snprintf(want, sizeof(want), "engine in pid %d did not answer the quiesce within 300 ms",
		 (int)getpid());
	ck_assert_msg(strstr(err.msg, want), "%s", err.msg);

	/* The engine finishes its step, sees the plugin gone and resumes. */
	WAIT_FOR(e, st.cancelled == 1 && !st.quiesced);
	ck_assert_int_eq(c.quiesces, 1);
	ck_assert_int_eq(c.resumes, 1);
	ck_assert_int_eq(c.last_restored, 0);
	ck_assert_uint_eq(stats_of(e).quiesces, 0);
	ck_assert_msg(km_engine_status(getpid(), 5000, &s, &err) == 0, "%s", err.msg);
	ck_assert(!s.quiesced);
	ck_assert_uint_eq(s.cancelled, 1);
	kme_engine_stop(e);
}
END_TEST

/* A raw client on our own engine's socket. */
static int raw_connect(void)
{
	struct sockaddr_un sa;
	unsigned len;
	int fd;

	ck_assert_int_eq(km_engine_socket_addr(getpid(), &sa, &len), 0);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, len), 0);
	return fd;
}

static void raw_send(int fd, uint32_t major, Kvmotion__EngineOp op)
{
	Kvmotion__EngineRequest req = KVMOTION__ENGINE_REQUEST__INIT;
	uint8_t buf[64];
	size_t n;

	req.major = major;
	req.op = op;
	req.has_timeout_ms = 1;
	req.timeout_ms = 5000;
	n = kvmotion__engine_request__pack(&req, buf);
	ck_assert_int_eq(send(fd, buf, n, MSG_NOSIGNAL), (ssize_t)n);
}

/* The next reply on fd (NULL at end of connection), waiting at most 5 s. */
static Kvmotion__EngineReply *raw_reply(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	uint8_t buf[KM_ENGINE_MSG_MAX];
	ssize_t n;

	ck_assert_int_eq(poll(&p, 1, 5000), 1);
	n = recv(fd, buf, sizeof(buf), 0);
	ck_assert_int_ge(n, 0);
	if (n == 0)
		return NULL;
	return kvmotion__engine_reply__unpack(NULL, (size_t)n, buf);
}

START_TEST(test_engine_api_missing_commit_cancels)
{
	struct calls c = { 0 };
	struct kme_engine *e = start(&c, 0);
	Kvmotion__EngineReply *rep;
	int fd = raw_connect();

	raw_send(fd, KM_ENGINE_PROTO_MAJOR, KVMOTION__ENGINE_OP__ENGINE_QUIESCE);
	rep = raw_reply(fd);
	ck_assert_ptr_nonnull(rep);
	ck_assert(rep->ok);
	ck_assert_int_eq(rep->state, KVMOTION__ENGINE_STATE__ENGINE_QUIESCED);
	kvmotion__engine_reply__free_unpacked(rep, NULL);
	/* read the answer, then gone without COMMIT: nobody will resume it */
	close(fd);
	WAIT_FOR(e, st.cancelled == 1 && !st.quiesced);
	ck_assert_int_eq(c.resumes, 1);
	ck_assert_int_eq(c.last_restored, 0);
	ck_assert_uint_eq(stats_of(e).quiesces, 0);
	kme_engine_stop(e);
}
END_TEST

START_TEST(test_engine_api_protocol_errors)
{
	struct calls c = { 0 };
	struct kme_engine *e = start(&c, 0);
	struct km_engine_status s;
	struct km_error err = { { 0 } };
	Kvmotion__EngineReply *rep;
	int fd;

	/* an unknown major version: a clear refusal, no callback */
	fd = raw_connect();
	raw_send(fd, KM_ENGINE_PROTO_MAJOR + 1, KVMOTION__ENGINE_OP__ENGINE_QUIESCE);
	rep = raw_reply(fd);
	ck_assert_ptr_nonnull(rep);
	ck_assert(!rep->ok);
	ck_assert_int_eq(rep->error, EPROTONOSUPPORT);
	ck_assert_uint_eq(rep->major, KM_ENGINE_PROTO_MAJOR);
	ck_assert_msg(strstr(rep->message, "2.0 not supported"), "%s", rep->message);
	kvmotion__engine_reply__free_unpacked(rep, NULL);
	ck_assert_ptr_null(raw_reply(fd)); /* and the engine closed */
	close(fd);

	/* garbage: closed without an answer */
	fd = raw_connect();
	ck_assert_int_eq(send(fd, "\xff\xff\xff", 3, MSG_NOSIGNAL), 3);
	ck_assert_ptr_null(raw_reply(fd));
	close(fd);

	/* a connection that says nothing (a probe): closed, no effect */
	fd = raw_connect();
	close(fd);

	ck_assert_int_eq(c.quiesces, 0);
	ck_assert_msg(km_engine_status(getpid(), 5000, &s, &err) == 0, "%s", err.msg);
	ck_assert(!s.quiesced);
	ck_assert_uint_eq(s.quiesces + s.cancelled + s.refused, 0);
	kme_engine_stop(e);
}
END_TEST

START_TEST(test_engine_api_resume_timeout)
{
	struct calls c = { 0 };
	struct kme_engine *e = start(&c, 300);
	struct km_error err = { { 0 } };
	struct km_engine_quiesced q = { 0 };
	struct kme_stats st2;
	uint64_t t0;

	ck_assert_msg(km_engine_quiesce(getpid(), 5000, &q, &err) == 0, "%s", err.msg);
	t0 = ms_now();
	ck_assert(stats_of(e).quiesced);
	WAIT_FOR(e, !st.quiesced);
	ck_assert_uint_ge(ms_now() - t0, 250);
	ck_assert_int_eq(c.resumes, 1);
	ck_assert_int_eq(c.last_restored, 0);
	st2 = stats_of(e);
	ck_assert_uint_eq(st2.self_resumes, 1);
	ck_assert_uint_eq(st2.resumes, 1);
	ck_assert(!st2.restored);

	/* The plugin's resume after that: answered, no second callback. */
	ck_assert_msg(km_engine_resume(getpid(), true, 5000, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(c.resumes, 1);
	km_engine_quiesced_clear(&q);
	kme_engine_stop(e);
}
END_TEST

START_TEST(test_engine_api_resume_when_running)
{
	struct calls c = { 0 };
	struct kme_engine *e = start(&c, 0);
	struct km_error err = { { 0 } };

	ck_assert_msg(km_engine_resume(getpid(), true, 5000, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(c.resumes, 0);
	ck_assert_uint_eq(stats_of(e).resumes, 0);
	kme_engine_stop(e);
}
END_TEST

START_TEST(test_engine_api_probe)
{
	struct calls c = { 0 };
	struct km_error err = { { 0 } };
	struct km_engine_quiesced q = { 0 };
	struct kme_engine *e;
	pid_t child;
	char want[64];
	int status;

	/* a process without an engine */
	child = fork();
	ck_assert_int_ge(child, 0);
	if (child == 0) {
		pause();
		_exit(0);
	}
	ck_assert_int_eq(km_engine_probe(child), 0);
	ck_assert_int_eq(km_engine_quiesce(child, 1000, &q, &err), -ENOENT);
	snprintf(want, sizeof(want), "no cooperative engine in pid %d", (int)child);
	ck_assert_msg(strstr(err.msg, want), "%s", err.msg);
	kill(child, SIGKILL);
	ck_assert_int_eq(waitpid(child, &status, 0), child);
	/* and no process at all */
	ck_assert_int_eq(km_engine_probe(child), -ESRCH);

	ck_assert_int_eq(km_engine_probe(getpid()), 0);
	e = start(&c, 0);
	ck_assert_int_eq(km_engine_probe(getpid()), 1);
	ck_assert_int_eq(km_engine_probe(getpid()), 1);
	/* probes are no requests */
	ck_assert_int_eq(c.quiesces + c.resumes, 0);
	kme_engine_stop(e);
	ck_assert_int_eq(km_engine_probe(getpid()), 0);
}
END_TEST

START_TEST(test_engine_api_bad_arguments)
{
	struct calls c = { 0 };
	struct kme_callbacks nocb = { .quiesce = cb_quiesce };
	struct kme_engine *e = start(&c, 0), *e2 = NULL;
	struct kme_callbacks cb = { .quiesce = cb_quiesce, .resume = cb_resume, .userdata = &c };
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	uint8_t *p = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t id;

	ck_assert_ptr_ne(p, MAP_FAILED);
	ck_assert_int_eq(kme_engine_start(&nocb, NULL, &e2), -EINVAL);
	/* one engine per process: the socket is named by the pid */
	ck_assert_int_eq(kme_engine_start(&cb, NULL, &e2), -EADDRINUSE);
	ck_assert_ptr_null(e2);
	ck_assert_int_eq(kme_kv_pool_register(e, p + 1, page, 2, KME_KV_HOST, &id), -EINVAL);
	ck_assert_int_eq(kme_kv_pool_register(e, p, page + 8, 2, KME_KV_HOST, &id), -EINVAL);
	ck_assert_int_eq(kme_kv_pool_register(e, p, page, 0, KME_KV_HOST, &id), -EINVAL);
	ck_assert_int_eq(kme_kv_pool_register(e, p, page, 2, 0x80, &id), -EINVAL);
	ck_assert_int_eq(kme_kv_block_set_free(e, 0, 0, true), -EINVAL); /* no pool yet */
	ck_assert_int_eq(kme_kv_pool_register(e, p, page, 4, KME_KV_HOST, &id), 0);
	ck_assert_uint_eq(id, 0);
	ck_assert_int_eq(kme_kv_block_set_free(e, 0, 3, true), 0);
	ck_assert_int_eq(kme_kv_block_set_free(e, 0, 4, true), -ERANGE);
	ck_assert_int_eq(kme_kv_block_set_free(e, 1, 0, true), -EINVAL);
	for (uint32_t i = 1; i < 64; i++)
		ck_assert_int_eq(kme_kv_pool_register(e, p, page, 1, KME_KV_DEVICE, &id), 0);
	ck_assert_uint_eq(id, 63);
	ck_assert_int_eq(kme_kv_pool_register(e, p, page, 1, KME_KV_DEVICE, &id), -ENOSPC);
	ck_assert_str_eq(kme_strerror(-EADDRINUSE), "an engine is already started in this process");
	ck_assert_str_eq(kme_strerror(-EACCES), "Permission denied");
	ck_assert_str_eq(kme_strerror(-100000), "unknown error");
	kme_engine_stop(e);
	kme_engine_stop(NULL);
	munmap(p, 4 * page);
}
END_TEST

/* --- weights (kme_weights_*: weights.c, or the test stand-in before the merge) --- */

struct wfix {
	char dir[64];
	char store[128];
	char model[2][128];
	uint8_t *bytes[2];
	size_t size[2];
};

static int rm_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

static void wfix_setup(struct wfix *f)
{
	struct km_store *s = NULL;
	struct km_seed_stats ss;
	struct km_error err = { { 0 } };
	const char *paths[2];
	uint64_t x = 0x1234567;

	strcpy(f->dir, "/tmp/km-test-engine-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->dir));
	snprintf(f->store, sizeof(f->store), "%s/store", f->dir);
	f->size[0] = 300001;
	f->size[1] = 4096 * 3 + 5;
	for (int i = 0; i < 2; i++) {
		int fd;

		snprintf(f->model[i], sizeof(f->model[i]), "%s/part-%d.safetensors", f->dir, i);
		f->bytes[i] = malloc(f->size[i]);
		ck_assert_ptr_nonnull(f->bytes[i]);
		for (size_t j = 0; j < f->size[i]; j++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			f->bytes[i][j] = (uint8_t)x;
		}
		fd = open(f->model[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(write(fd, f->bytes[i], f->size[i]), (ssize_t)f->size[i]);
		close(fd);
		paths[i] = f->model[i];
	}
	ck_assert_int_eq(km_store_open(f->store, KM_STORE_CREATE | KM_STORE_NOSYNC, NULL, &s), 0);
	ck_assert_msg(km_seed(s, "m", paths, 2, 1, &ss, &err) == 0, "%s", err.msg);
	km_store_free(s);
}

static void wfix_teardown(struct wfix *f)
{
	for (int i = 0; i < 2; i++)
		free(f->bytes[i]);
	ck_assert_int_eq(nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS), 0);
}

/* True if an fd of this process refers to path. */
static bool fd_open_on(const char *path)
{
	char link[300], target[4096];
	bool found = false;
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d))) {
		ssize_t n;

		snprintf(link, sizeof(link), "/proc/self/fd/%s", de->d_name);
		n = readlink(link, target, sizeof(target) - 1);
		if (n < 0)
			continue;
		target[n] = '\0';
		if (strcmp(target, path) == 0)
			found = true;
	}
	closedir(d);
	return found;
}

static bool mapped(const char *path)
{
	char line[4400];
	bool found = false;
	FILE *f = fopen("/proc/self/maps", "re");

	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof(line), f)) {
		char *p = strchr(line, '/');

		line[strcspn(line, "\n")] = '\0';
		if (p && strcmp(p, path) == 0)
			found = true;
	}
	fclose(f);
	return found;
}

START_TEST(test_engine_api_weights_open)
{
	struct wfix f;
	struct kme_weights *w = NULL;
	struct km_hash id;
	char hex[KM_HASH_HEX_SIZE], prefix[200], msg[512];
	const char *name;
	uint64_t off, size;
	struct stat st;

	wfix_setup(&f);
	ck_assert_msg(kme_weights_open_ex(f.store, "index:m", &w, msg, sizeof(msg)) == 0, "%s", msg);
	snprintf(prefix, sizeof(prefix), "%s/weights/", f.store);
	ck_assert_msg(strncmp(kme_weights_path(w), prefix, strlen(prefix)) == 0, "%s",
		      kme_weights_path(w));
	ck_assert_int_eq(stat(kme_weights_path(w), &st), 0);
	ck_assert_uint_eq(kme_weights_size(w), (uint64_t)st.st_size);
	/* the id is the hash of the mapped bytes, and the file's name */
	km_hash_buf(kme_weights_data(w), kme_weights_size(w), &id);
	ck_assert_str_eq(kme_weights_id(w), km_hash_to_hex(&id, hex));
	ck_assert_ptr_nonnull(strstr(kme_weights_path(w), hex));
	/* each model file's bytes at its offset */
	ck_assert_uint_eq(kme_weights_n_files(w), 2);
	for (size_t i = 0; i < 2; i++) {
		ck_assert_int_eq(kme_weights_file(w, i, &name, &off, &size), 0);
		ck_assert_str_eq(name, strrchr(f.model[i], '/') + 1);
		ck_assert_uint_eq(size, f.size[i]);
		ck_assert_uint_eq(off % (2u << 20), 0);
		ck_assert_uint_le(off + size, kme_weights_size(w));
		ck_assert(memcmp((const uint8_t *)kme_weights_data(w) + off, f.bytes[i], size) == 0);
	}
	ck_assert_int_eq(kme_weights_file(w, 2, &name, &off, &size), -ERANGE);
	/* the mapping stays, the fd does not */
	ck_assert(mapped(kme_weights_path(w)));
	ck_assert(!fd_open_on(kme_weights_path(w)));
	/* read-only */
	ck_assert_int_eq(mprotect((void *)kme_weights_data(w), 4096, PROT_READ | PROT_WRITE),
			 -1);
	ck_assert_int_eq(errno, EACCES);

	/* $KVMOTION_STORE when no store is given */
	{
		struct kme_weights *w2 = NULL;

		setenv("KVMOTION_STORE", f.store, 1);
		ck_assert_int_eq(kme_weights_open(NULL, "index:m", &w2), 0);
		ck_assert_str_eq(kme_weights_path(w2), kme_weights_path(w));
		kme_weights_close(w2);
		unsetenv("KVMOTION_STORE");
	}
	snprintf(prefix, sizeof(prefix), "%s", kme_weights_path(w));
	kme_weights_close(w);
	ck_assert(!mapped(prefix));

	/* errors */
	ck_assert_int_lt(kme_weights_open_ex(f.store, "index:nope", &w, msg, sizeof(msg)), 0);
	ck_assert_msg(strstr(msg, "nope"), "%s", msg);
	snprintf(prefix, sizeof(prefix), "%s/none", f.dir);
	ck_assert_int_eq(kme_weights_open_ex(prefix, "index:m", &w, msg, sizeof(msg)), -ENOENT);
	ck_assert_msg(strstr(msg, "no such store"), "%s", msg);
	ck_assert_int_eq(kme_weights_open(f.store, "", &w), -EINVAL);
	wfix_teardown(&f);
}
END_TEST

START_TEST(test_engine_api_quiesce_lists_weights)
{
	struct calls c = { 0 };
	struct wfix f;
	struct kme_weights *w = NULL;
	struct kme_engine *e;
	struct km_engine_quiesced q = { 0 };
	struct km_error err = { { 0 } };
	char hex[KM_HASH_HEX_SIZE];

	wfix_setup(&f);
	ck_assert_int_eq(kme_weights_open(f.store, "index:m", &w), 0);
	e = start(&c, 0);
	ck_assert_int_eq(kme_engine_add_weights(e, w), 0);
	ck_assert_int_eq(kme_engine_add_weights(e, w), 0); /* listed once */
	ck_assert_msg(km_engine_quiesce(getpid(), 5000, &q, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(q.n_weights, 1);
	ck_assert_str_eq(q.weights[0].path, kme_weights_path(w));
	ck_assert_str_eq(km_hash_to_hex(&q.weights[0].id, hex), kme_weights_id(w));
	ck_assert_uint_eq(q.weights[0].size, kme_weights_size(w));
	km_engine_quiesced_clear(&q);
	ck_assert_ptr_null(q.weights);
	kme_engine_stop(e);
	kme_weights_close(w);
	wfix_teardown(&f);
}
END_TEST

/* --- the engine in another network namespace (the setns path) --- */

START_TEST(test_engine_api_other_netns)
{
	struct km_error err = { { 0 } };
	struct km_engine_quiesced q = { 0 };
	struct km_engine_status s;
	struct sockaddr_un sa;
	int ready[2], done[2], status, fd;
	unsigned len;
	char b;
	pid_t child;
	int report[3];

	if (geteuid() != 0)
		return; /* needs CAP_SYS_ADMIN for unshare and setns: nothing to test */
	ck_assert_int_eq(pipe(ready), 0);
	ck_assert_int_eq(pipe(done), 0);
	child = fork();
	ck_assert_int_ge(child, 0);
	if (child == 0) {
		struct calls c = { 0 };
		struct kme_callbacks cb = { cb_quiesce, cb_resume, &c };
		struct kme_engine *e = NULL;
		struct pool pl;

		if (unshare(CLONE_NEWNET) < 0)
			_exit(77);
		if (kme_engine_start(&cb, NULL, &e) < 0)
			_exit(2);
		pool_make(e, &pl, MAP_PRIVATE);
		kme_kv_block_set_free(e, pl.id, 5, true);
		if (write(ready[1], "r", 1) != 1 || read(done[0], &b, 1) != 1)
			_exit(3);
		report[0] = c.quiesces;
		report[1] = c.resumes;
		report[2] = c.last_restored;
		if (write(ready[1], report, sizeof(report)) != sizeof(report))
			_exit(4);
		kme_engine_stop(e);
		_exit(0);
	}
	close(ready[1]);
	close(done[0]);
	if (read(ready[0], &b, 1) != 1) {
		ck_assert_int_eq(waitpid(child, &status, 0), child);
		ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 77,
			      "engine child failed: %d", status);
		return; /* no network namespaces here */
	}
	/* not reachable from our namespace... */
	ck_assert_int_eq(km_engine_socket_addr(child, &sa, &len), 0);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, len), -1);
	ck_assert_int_eq(errno, ECONNREFUSED);
	close(fd);
	/* ...but through its namespace */
	ck_assert_int_eq(km_engine_probe(child), 1);
	ck_assert_msg(km_engine_quiesce(child, 5000, &q, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(q.free_blocks, 1);
	ck_assert_uint_eq(q.released_bytes, 2 * (size_t)sysconf(_SC_PAGESIZE));
	ck_assert_msg(km_engine_status(child, 5000, &s, &err) == 0, "%s", err.msg);
	ck_assert(s.quiesced);
	ck_assert_int_eq(s.engine_pid, child); /* same pid namespace */
	ck_assert_msg(km_engine_resume(child, true, 5000, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(write(done[1], "d", 1), 1);
	ck_assert_int_eq(read(ready[0], report, sizeof(report)), (ssize_t)sizeof(report));
	ck_assert_int_eq(report[0], 1);
	ck_assert_int_eq(report[1], 1);
	ck_assert_int_eq(report[2], 1);
	ck_assert_int_eq(waitpid(child, &status, 0), child);
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	km_engine_quiesced_clear(&q);
	close(ready[0]);
	close(done[1]);
}
END_TEST

/* --- DIR/kvmotion.engines --- */

struct rfix {
	char dir[64];
	int dirfd;
};

static void rfix_setup(struct rfix *f)
{
	strcpy(f->dir, "/tmp/km-test-engines-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->dir));
	f->dirfd = open(f->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(f->dirfd, 0);
}

static void rfix_teardown(struct rfix *f)
{
	close(f->dirfd);
	ck_assert_int_eq(nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS), 0);
}

static void put_file(struct rfix *f, const void *p, size_t n)
{
	ck_assert_int_eq(km_write_file_atomic_at(f->dirfd, KM_ENGINES_NAME, p, n, false), 0);
}

START_TEST(test_engine_api_records_round_trip)
{
	struct rfix f;
	struct km_engine_weights w[3] = { { "/s/weights/a.kmw", { { 1 } }, 10 },
					  { "/s/weights/b.kmw", { { 2 } }, 20 },
					  { "/s/weights/c.kmw", { { 3 } }, 30 } };
	struct km_engine_record in[3] = { { 100, &w[0], 2 }, { 7, NULL, 0 }, { 250, &w[2], 1 } };
	struct km_engine_record *out = NULL;
	struct km_error err = { { 0 } };
	size_t n = 99;

	rfix_setup(&f);
	ck_assert_int_eq(km_engine_records_read(f.dirfd, &out, &n, &err), -ENOENT);
	ck_assert_int_eq(km_engine_records_write(f.dirfd, in, 3, false), 0);
	ck_assert_msg(km_engine_records_read(f.dirfd, &out, &n, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(n, 3);
	for (size_t i = 0; i < 3; i++) {
		ck_assert_int_eq(out[i].pid, in[i].pid);
		ck_assert_uint_eq(out[i].n_weights, in[i].n_weights);
		for (size_t j = 0; j < in[i].n_weights; j++) {
			ck_assert_str_eq(out[i].weights[j].path, in[i].weights[j].path);
			ck_assert(km_hash_equal(&out[i].weights[j].id, &in[i].weights[j].id));
			ck_assert_uint_eq(out[i].weights[j].size, in[i].weights[j].size);
		}
	}
	km_engine_records_free(out, n);
	/* no engines: an empty list, not an absent file */
	ck_assert_int_eq(km_engine_records_write(f.dirfd, NULL, 0, false), 0);
	ck_assert_int_eq(km_engine_records_read(f.dirfd, &out, &n, &err), 0);
	ck_assert_uint_eq(n, 0);
	km_engine_records_free(out, n);
	in[0].pid = 0;
	ck_assert_int_eq(km_engine_records_write(f.dirfd, in, 1, false), -EINVAL);
	rfix_teardown(&f);
}
END_TEST

/* Packs an EngineRecords with one engine; the knobs break it. */
static size_t pack_records(uint8_t *buf, uint32_t major, int32_t pid2, size_t id_len,
			   const char *path)
{
	Kvmotion__EngineRecords pb = KVMOTION__ENGINE_RECORDS__INIT;
	Kvmotion__EngineRecord r[2], *rp[2] = { &r[0], &r[1] };
	Kvmotion__EngineWeights w = KVMOTION__ENGINE_WEIGHTS__INIT, *wp = &w;
	uint8_t id[40] = { 9 };
	uint32_t le;
	size_t n;

	kvmotion__engine_record__init(&r[0]);
	kvmotion__engine_record__init(&r[1]);
	w.path = (char *)path;
	w.sha256.len = id_len;
	w.sha256.data = id;
	w.size = 5;
	r[0].pid = 42;
	r[0].n_weights = 1;
	r[0].weights = &wp;
	r[1].pid = pid2;
	pb.major = major;
	pb.minor = 0;
	pb.n_engines = 2;
	pb.engines = rp;
	n = kvmotion__engine_records__pack(&pb, buf + 12);
	memcpy(buf, KM_MAGIC_ENGINES, 8);
	le = htole32((uint32_t)n);
	memcpy(buf + 8, &le, 4);
	return n + 12;
}

static int read_records(struct rfix *f, struct km_error *err)
{
	struct km_engine_record *out = NULL;
	size_t n = 0;
	int r;

	memset(err, 0, sizeof(*err));
	r = km_engine_records_read(f->dirfd, &out, &n, err);
	if (r == 0)
		km_engine_records_free(out, n);
	return r;
}

START_TEST(test_engine_api_records_bad_files)
{
	struct rfix f;
	struct km_error err;
	uint8_t buf[512];
	size_t n;

	rfix_setup(&f);
	/* the well-formed reference */
	n = pack_records(buf, 1, 43, 32, "/w/a.kmw");
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), 0);
	/* truncated anywhere */
	for (size_t k = 0; k < n; k++) {
		put_file(&f, buf, k);
		ck_assert_msg(read_records(&f, &err) < 0, "accepted %zu of %zu bytes", k, n);
	}
	put_file(&f, buf, n - 1);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, "truncated"), "%s", err.msg);
	/* trailing bytes */
	buf[n] = 0;
	put_file(&f, buf, n + 1);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	/* a foreign file */
	put_file(&f, "KMMANIF\n\0\0\0\0", 12);
	ck_assert_int_eq(read_records(&f, &err), -ENOTRECOVERABLE);
	ck_assert_msg(strstr(err.msg, "bad magic"), "%s", err.msg);
	/* corrupt record bytes */
	n = pack_records(buf, 1, 43, 32, "/w/a.kmw");
	memset(buf + 12, 0xff, 6);
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	/* an unknown major version */
	n = pack_records(buf, 2, 43, 32, "/w/a.kmw");
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), -EPROTONOSUPPORT);
	ck_assert_msg(strstr(err.msg, "format version 2.0"), "%s", err.msg);
	/* content that parses but makes no sense */
	n = pack_records(buf, 1, 42, 32, "/w/a.kmw"); /* pid twice */
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, "listed twice"), "%s", err.msg);
	n = pack_records(buf, 1, -1, 32, "/w/a.kmw");
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	n = pack_records(buf, 1, 43, 31, "/w/a.kmw");
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	n = pack_records(buf, 1, 43, 32, "relative.kmw");
	put_file(&f, buf, n);
	ck_assert_int_eq(read_records(&f, &err), -EBADMSG);
	rfix_teardown(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("engine_api");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_engine_api_quiesce_releases_free_blocks);
	tcase_add_test(tc, test_engine_api_quiesce_releases_shared_pool);
	tcase_add_test(tc, test_engine_api_refused_quiesce);
	tcase_add_test(tc, test_engine_api_slow_quiesce_is_cancelled);
	tcase_add_test(tc, test_engine_api_missing_commit_cancels);
	tcase_add_test(tc, test_engine_api_protocol_errors);
	tcase_add_test(tc, test_engine_api_resume_timeout);
	tcase_add_test(tc, test_engine_api_resume_when_running);
	tcase_add_test(tc, test_engine_api_probe);
	tcase_add_test(tc, test_engine_api_bad_arguments);
	tcase_add_test(tc, test_engine_api_weights_open);
	tcase_add_test(tc, test_engine_api_quiesce_lists_weights);
	tcase_add_test(tc, test_engine_api_other_netns);
	tcase_add_test(tc, test_engine_api_records_round_trip);
	tcase_add_test(tc, test_engine_api_records_bad_files);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
