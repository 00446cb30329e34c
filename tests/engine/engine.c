/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * engine: the test suite's LLM inference engine. Several sequences decode
 * at once with greedy sampling over a paged KV cache; every generated token
 * is appended to --out as "seq=<id> pos=<n> tok=<id>" (pos: the position the
 * token takes in its sequence). Everything that decides a token is
 * deterministic, so a run that was dumped and restored by CRIU mid-way
 * writes exactly the tokens of a run that never stopped, and its counters
 * show no extra prefill (the KV cache came back, nothing was recomputed).
 *
 *   engine --model F --out F [--seqs N] [--total-seqs N] [--prompt-len N]
 *          [--max-new N] [--prefill-chunk N] [--max-batch N] [--block-tokens N]
 *          [--kv-mib N] [--kv-fill-mib N] [--kv-churn-mib N] [--threads N]
 *          [--step-delay-ms N]
 *          [--seed N] [--status PATH] [--status-socket NAME] [--status-file PATH]
 *          [--coop|--coop-upload [--store DIR]] [--keep-model-open] [--quiet]
 *   engine --query PATH|NAME   print the status line of a running engine
 *
 * A step: every active sequence contributes its next prompt chunk (prefill)
 * or its last token (decode) to one batch, which runs through the model in
 * one pass over the weights; the sequences that reach --max-new tokens give
 * their KV blocks back and the next sequence (ids increasing, prompt from
 * --seed and the id) takes the slot, until --total-seqs have started (0:
 * forever). Then the engine exits 0.
 *
 * Status, one line of JSON with the counters: --status PATH is a listening
 * UNIX stream socket at a path, --status-socket NAME one in the abstract
 * namespace ("@NAME"); each connection gets the line and is closed. Both
 * are polled without blocking between steps (and during --step-delay-ms).
 * --status-file is rewritten atomically (temp file + rename) after each step.
 *
 * --coop: cooperative mode through kvmotion's engine API (kvmotion/engine.h).
 * The weights come from the store's content-addressed weights file for
 * --model (a model file, seeded and materialized if needed, or
 * "index:NAME" for a weights index of the store), mapped read-only. The CPU
 * build computes straight from that mapping, as a CPU engine would; with
 * --coop-upload it keeps its own anonymous copy, and the CUDA build always
 * uploads them to device memory, as a GPU engine does. When kvmotion's CRIU
 * plugin asks for a quiesce, the engine parks after the step in progress
 * (the CPU build gives the step up between two layers and runs it again
 * later) and drops its copy, keeping the addresses. Free KV blocks, which
 * the engine reports as it allocates and frees them, are released too: a
 * host pool by the library, a device pool (the CUDA build) by the model, in
 * the quiesce callback. On resume (after a restore, or a failed or
 * --leave-running dump) the device KV pool is mapped whole again and the
 * weights are uploaded again from the mapping. So a dump holds neither the
 * weights nor the free KV blocks.
 *
 * Single-threaded unless --threads N > 1 (the matrix products then run on N
 * threads; the tokens are the same for any N).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <kvmotion/engine.h>

#include "kvcache.h"
#include "model.h"
#include "rng.h"

#define STATUS_MAX 1024
#define LINE_MAX_LEN 64 /* "seq=4294967295 pos=4294967295 tok=4294967295\n" fits */

struct seq {
	bool active;
	uint32_t id;
	uint32_t *prompt;
	unsigned pos;	 /* next position to run */
	unsigned n_new;	 /* tokens generated so far */
	uint32_t last;	 /* last generated token */
	uint32_t *blocks; /* block table */
	unsigned n_blocks;
	unsigned first, batched; /* its tokens in the current batch */
};

struct options {
	const char *model, *out, *status_path, *status_name, *status_file;
	unsigned seqs, prompt_len, max_new, prefill_chunk, max_batch, block_tokens, threads;
	unsigned delay_ms;
	uint64_t total_seqs, seed, kv_mib, fill_mib, churn_mib;
	bool quiet;
	bool keep_model_open; /* as engines that keep a handle on their model files */
	bool coop;
	bool coop_upload; /* --coop-upload: keep an uploaded copy, as on a GPU */
	const char *store; /* --coop: the kvmotion store (NULL: kvmotion's default) */
};

/* Cooperative mode: the main loop parks between steps when asked. */
enum coop_phase { COOP_RUNNING, COOP_WANT_QUIESCE, COOP_PARKED };

struct coop {
	struct kme_weights *weights;
	struct kme_engine *ctl;
	pthread_mutex_t lock;
	pthread_cond_t changed;	 /* phase changed */
	enum coop_phase phase;
	int wake[2];		 /* pipe: wakes the main loop out of --step-delay-ms */
	int cancel;		 /* the model gives up its step (model_opts.cancel) */
	const uint8_t *file;	 /* the model's safetensors bytes in the weights file */
	uint64_t file_size;
	uint64_t quiesces, resumes, restores, steps_cancelled;
	double upload_s; /* the last upload of the weights after a resume */
	uint64_t kv_released; /* device KV bytes the model released at the last quiesce */
};

struct engine {
	struct options o;
	struct model m;
	struct kv_pool kv;
	struct seq *seqs;
	struct model_tok *toks;
	char *lines; /* one step's output */
	unsigned max_blocks, max_batch;
	uint64_t started;
	int out_fd;
	int listen_fd[2]; /* --status, --status-socket */
	char *status_tmp;
	bool done;
	uint64_t tokens_generated, prefill_steps, decode_steps, sequences_done, steps;
	uint32_t parked_blocks; /* --kv-fill-mib: blocks held with synthetic KV */
	struct coop coop;
};

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("engine: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void usage(FILE *f)
{
	fputs("usage: engine --model FILE --out FILE [--seqs N] [--total-seqs N (0: forever)]\n"
	      "              [--prompt-len N] [--max-new N] [--prefill-chunk N (0: whole prompt)]\n"
	      "              [--max-batch N] [--block-tokens N] [--kv-mib N] [--kv-fill-mib N]\n"
	      "              [--kv-churn-mib N]\n"
	      "              [--threads N] [--step-delay-ms N] [--seed N] [--status PATH]\n"
	      "              [--status-socket NAME] [--status-file PATH]\n"
	      "              [--coop|--coop-upload [--store DIR]]\n"
	      "              [--keep-model-open] [--quiet]\n"
	      "       engine --query PATH|NAME (a NAME without '/' is an abstract socket)\n",
	      f);
}

static uint64_t parse_num(const char *opt, const char *s, uint64_t min, uint64_t max)
{
	unsigned long long v;
	char *end;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-' || *s == '+' || v < min || v > max)
		die("--%s: '%s' is not an integer in %" PRIu64 "..%" PRIu64, opt, s, min, max);
	return v;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* The prompt of sequence id: a function of --seed and id only. */
static void seq_start(struct engine *e, struct seq *s)
{
	uint64_t st = e->o.seed * 1000003u + e->started;

	s->active = true;
	s->id = (uint32_t)e->started++;
	s->pos = 0;
	s->n_new = 0;
	s->n_blocks = 0;
	for (unsigned i = 0; i < e->o.prompt_len; i++)
		s->prompt[i] = (uint32_t)(splitmix64(&st) % e->m.c.vocab);
}

static bool more_to_start(const struct engine *e)
{
	return e->o.total_seqs == 0 || e->started < e->o.total_seqs;
}

static void seq_finish(struct engine *e, struct seq *s)
{
	for (unsigned i = 0; i < s->n_blocks; i++)
		if (kv_release(&e->kv, s->blocks[i]) < 0)
			die("internal error: sequence %u gave back KV block %u twice", s->id,
			    s->blocks[i]);
	s->n_blocks = 0;
	s->active = false;
	e->sequences_done++;
	if (more_to_start(e))
		seq_start(e, s);
}

static int status_json(const struct engine *e, char *buf, size_t n)
{
	unsigned active = 0;
	int len;

	for (unsigned i = 0; i < e->o.seqs; i++)
		active += e->seqs[i].active;
	len = snprintf(buf, n,
		       "{\"state\":\"%s\",\"tokens_generated\":%" PRIu64
		       ",\"prefill_steps\":%" PRIu64 ",\"decode_steps\":%" PRIu64
		       ",\"sequences_done\":%" PRIu64 ",\"sequences_started\":%" PRIu64
		       ",\"sequences_active\":%u,\"steps\":%" PRIu64
		       ",\"kv_blocks_used\":%u,\"kv_blocks_total\":%u,\"kv_blocks_parked\":%u"
		       ",\"kv_block_tokens\":%u,\"weights_bytes\":%" PRIu64 ",\"pid\":%d"
		       ",\"mode\":\"%s\",\"quiesces\":%" PRIu64 ",\"resumes\":%" PRIu64
		       ",\"restores\":%" PRIu64 ",\"steps_cancelled\":%" PRIu64
		       ",\"upload_ms\":%.1f,\"kv_device_released_bytes\":%" PRIu64 "}\n",
		       e->done ? "done" : "running", e->tokens_generated, e->prefill_steps,
		       e->decode_steps, e->sequences_done, e->started, active, e->steps,
		       kv_used(&e->kv), e->kv.n_blocks, e->parked_blocks, e->kv.block_tokens,
		       e->m.weights_size, (int)getpid(),
		       e->o.coop_upload ? "coop-upload" : e->o.coop ? "coop" : "plain",
		       e->coop.quiesces, e->coop.resumes, e->coop.restores, e->coop.steps_cancelled,
		       e->coop.upload_s * 1e3, e->coop.kv_released);
	return len < 0 || (size_t)len >= n ? -EOVERFLOW : len;
}

/* The status file, replaced atomically: readers see the old or the new line. */
static int write_status_file(const struct engine *e)
{
	char buf[STATUS_MAX];
	int len, fd, r;

	if (!e->o.status_file)
		return 0;
	len = status_json(e, buf, sizeof(buf));
	if (len < 0)
		return len;
	fd = open(e->status_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	r = write_all(fd, buf, (size_t)len);
	if (close(fd) < 0 && r == 0)
		r = -errno;
	if (r == 0 && rename(e->status_tmp, e->o.status_file) < 0)
		r = -errno;
	return r;
}

/* Answers every pending connection: one line, then close. Never blocks. */
static void serve_status(const struct engine *e)
{
	char buf[STATUS_MAX];
	int len = -1;

	for (unsigned i = 0; i < 2; i++) {
		int c;

		if (e->listen_fd[i] < 0)
			continue;
		while ((c = accept4(e->listen_fd[i], NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >=
		       0) {
			if (len < 0)
				len = status_json(e, buf, sizeof(buf));
			/* MSG_NOSIGNAL: a client that went away must not kill us */
			if (len > 0 && send(c, buf, (size_t)len, MSG_NOSIGNAL) != len) {
				/* nothing to do: the client gets what it gets */
			}
			close(c);
		}
	}
}

static int status_addr(const char *where, bool abstract, struct sockaddr_un *sa,
		       socklen_t *ret_len)
{
	size_t n = strlen(where);

	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (n == 0 || n + 1 > sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	memcpy(sa->sun_path + abstract, where, n);
	*ret_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + abstract + n +
			       (abstract ? 0 : 1));
	return 0;
}

static int status_listen(const char *where, bool abstract, int *ret_fd)
{
	struct sockaddr_un sa;
	socklen_t len;
	struct stat st;
	int fd, r;

	r = status_addr(where, abstract, &sa, &len);
	if (r < 0)
		return r;
	/* A socket file left by an earlier run (or a killed one) is stale. */
	if (!abstract && lstat(where, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return -EEXIST;
		if (unlink(where) < 0)
			return -errno;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, len) < 0 || listen(fd, 64) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	*ret_fd = fd;
	return 0;
}

static int query(const char *where)
{
	bool abstract = !strchr(where, '/');
	struct sockaddr_un sa;
	char buf[STATUS_MAX];
	socklen_t len;
	ssize_t k;
	int fd, r;

	r = status_addr(where, abstract, &sa, &len);
	if (r < 0)
		die("--query %s: %s", where, strerror(-r));
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, len) < 0)
		die("cannot connect to %s%s: %s", abstract ? "@" : "", where, strerror(errno));
	while ((k = read(fd, buf, sizeof(buf))) != 0) {
		if (k < 0) {
			if (errno == EINTR)
				continue;
			die("reading the status from %s: %s", where, strerror(errno));
		}
		if (write_all(STDOUT_FILENO, buf, (size_t)k) < 0)
			die("writing the status: %s", strerror(errno));
	}
	close(fd);
	return 0;
}

/*
 * Adds up to 'want' tokens of s, from its position on, to the batch at
 * e->toks + n, taking KV blocks as they are needed; returns how many fit.
 */
static unsigned seq_batch(struct engine *e, struct seq *s, unsigned n, unsigned want)
{
	unsigned bt = e->kv.block_tokens, got = 0;

	while (got < want) {
		unsigned p = s->pos + got;
		struct model_tok *t = &e->toks[n + got];

		if (p / bt >= s->n_blocks) {
			int64_t b = kv_alloc(&e->kv);

			if (b < 0)
				break; /* waits for a block */
			s->blocks[s->n_blocks++] = (uint32_t)b;
		}
		t->blocks = s->blocks;
		t->token = p < e->o.prompt_len ? s->prompt[p] : s->last;
		t->pos = p;
		/* the last prompt position and every decode step yield a token */
		t->want_next = p + 1 >= e->o.prompt_len;
		got++;
	}
	return got;
}

/*
 * One step of every active sequence; -ENOSPC if none could go on,
 * -ECANCELED if a quiesce stopped it half-way (nothing was counted).
 */
static int engine_step(struct engine *e)
{
	unsigned n = 0, chunk = e->o.prefill_chunk;
	size_t out_len = 0;
	char err[MODEL_ERR_SIZE];
	bool any = false;
	int r;

	/* Decode tokens first: max_batch >= seqs, so each of them fits. */
	for (unsigned i = 0; i < e->o.seqs; i++) {
		struct seq *s = &e->seqs[i];

		s->batched = 0;
		if (!s->active)
			continue;
		any = true;
		if (s->pos >= e->o.prompt_len) {
			s->first = n;
			s->batched = seq_batch(e, s, n, 1);
			n += s->batched;
		}
	}
	if (!any)
		return 0;
	for (unsigned i = 0; i < e->o.seqs && n < e->max_batch; i++) {
		struct seq *s = &e->seqs[i];
		unsigned want;

		if (!s->active || s->pos >= e->o.prompt_len)
			continue;
		want = e->o.prompt_len - s->pos;
		if (want > chunk)
			want = chunk;
		if (want > e->max_batch - n)
			want = e->max_batch - n;
		s->first = n;
		s->batched = seq_batch(e, s, n, want);
		n += s->batched;
	}
	if (n == 0)
		return -ENOSPC;

	/* The batch is in slot order per phase; the model does not care. */
	r = model_forward(&e->m, &e->kv, e->toks, n, err);
	if (r == -ECANCELED)
		return -ECANCELED; /* a quiesce: the same step runs again after it */
	if (r < 0)
		die("model: %s", err);

	for (unsigned i = 0; i < e->o.seqs; i++) {
		struct seq *s = &e->seqs[i];
		const struct model_tok *last;

		if (!s->batched)
			continue;
		last = &e->toks[s->first + s->batched - 1];
		for (unsigned k = 0; k < s->batched; k++) {
			if (s->pos + k < e->o.prompt_len)
				e->prefill_steps++;
			else
				e->decode_steps++;
		}
		s->pos += s->batched;
		if (!last->want_next)
			continue;
		s->last = last->next;
		out_len += (size_t)snprintf(e->lines + out_len, LINE_MAX_LEN,
					    "seq=%u pos=%u tok=%u\n", s->id, s->pos, s->last);
		e->tokens_generated++;
		if (++s->n_new == e->o.max_new)
			seq_finish(e, s);
	}
	/* One write per step, before anything else can happen to us. */
	r = write_all(e->out_fd, e->lines, out_len);
	if (r < 0)
		die("cannot write to %s: %s", e->o.out, strerror(-r));
	e->steps++;
	return 1;
}

/* --step-delay-ms, answering status connections meanwhile. */
static void delay(const struct engine *e)
{
	struct pollfd pfd[3];
	unsigned nfds = 0;
	double start = now_s(), left;

	for (unsigned i = 0; i < 2; i++)
		if (e->listen_fd[i] >= 0)
			pfd[nfds++] = (struct pollfd){ .fd = e->listen_fd[i], .events = POLLIN };
	if (e->o.coop)
		pfd[nfds++] = (struct pollfd){ .fd = e->coop.wake[0], .events = POLLIN };
	for (;;) {
		double t = now_s();

		/* the clock may jump across a restore: never wait longer than asked */
		if (t < start)
			break;
		left = (double)e->o.delay_ms / 1e3 - (t - start);
		if (left <= 0)
			break;
		if (poll(pfd, nfds, (int)(left * 1e3) + 1) > 0) {
			serve_status(e);
			/* a quiesce request: the step is over, park now */
			if (e->o.coop && (pfd[nfds - 1].revents & POLLIN))
				break;
		}
	}
}

/*
 * --kv-churn-mib: blocks written and given back, as by finished requests:
 * free, but their memory is touched and holds stale KV.
 */
/*
 * A staging buffer of one KV block, mapped and unmapped outright: from the
 * heap it would stay resident once freed (glibc's mmap threshold rises when
 * large mapped buffers are freed, as kvmotion's seeding does in --coop), and
 * every dump would carry a block of stale bytes sized by the model's width.
 */
static uint16_t *block_buf_new(const struct engine *e)
{
	void *p = mmap(NULL, kv_block_bytes(&e->kv), PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static void block_buf_free(const struct engine *e, uint16_t *buf)
{
	munmap(buf, kv_block_bytes(&e->kv));
}

static void churn_blocks(struct engine *e)
{
	uint64_t bytes = e->o.churn_mib << 20, done = 0;
	uint32_t *ids, n = 0;
	uint16_t *buf;
	char err[MODEL_ERR_SIZE];

	if (!bytes)
		return;
	buf = block_buf_new(e);
	ids = calloc(e->kv.n_blocks, sizeof(*ids));
	if (!buf || !ids)
		die("out of memory");
	for (size_t i = 0; i < e->kv.block_elems; i++)
		buf[i] = (uint16_t)(0x3c00 | (i & 0x3ff));
	for (; done < bytes; done += kv_block_bytes(&e->kv)) {
		int64_t b = kv_alloc(&e->kv);

		if (b < 0)
			die("--kv-churn-mib %" PRIu64 " is larger than the free KV pool",
			    e->o.churn_mib);
		if (model_kv_write(&e->m, &e->kv, (uint32_t)b, buf, err) < 0)
			die("--kv-churn-mib: %s", err);
		ids[n++] = (uint32_t)b;
	}
	/* given back in allocation order: the lowest ids are handed out next */
	while (n)
		(void)kv_release(&e->kv, ids[--n]);
	free(ids);
	block_buf_free(e, buf);
}

/* Blocks held with synthetic KV content, as a long-lived context would. */
static void park_blocks(struct engine *e)
{
	uint64_t bytes = e->o.fill_mib << 20, st = e->o.seed;
	uint16_t *buf;
	char err[MODEL_ERR_SIZE];

	if (!bytes)
		return;
	buf = block_buf_new(e);
	if (!buf)
		die("out of memory");
	while ((uint64_t)e->parked_blocks * kv_block_bytes(&e->kv) < bytes) {
		int64_t b = kv_alloc(&e->kv);

		if (b < 0)
			die("--kv-fill-mib %" PRIu64
			    " is larger than the KV pool (--kv-mib %" PRIu64 ")",
			    e->o.fill_mib, e->o.kv_mib);
		for (size_t i = 0; i < e->kv.block_elems; i++)
			buf[i] = (uint16_t)(0x3c00 |
					    (splitmix64(&st) & 0x3ff)); /* small bf16 values */
		if (model_kv_write(&e->m, &e->kv, (uint32_t)b, buf, err) < 0)
			die("--kv-fill-mib: %s", err);
		e->parked_blocks++;
	}
	block_buf_free(e, buf);
}


/* ---- cooperative mode ---- */

/*
 * The parked engine's device copies: the weights, and the memory under the
 * free blocks of a device KV pool (the library releases a host pool's).
 */
static int release_device_memory(struct engine *e, char *err)
{
	uint64_t bytes = 0;
	int r;

	e->coop.kv_released = 0;
	r = model_release_weights(&e->m, err);
	if (r == 0 && e->m.kv_on_device) {
		r = model_kv_release_free(&e->m, &e->kv, &bytes, err);
		if (r == 0)
			e->coop.kv_released = bytes;
	}
	return r;
}

/* The pool first: the weights upload is the longer part, and the last one. */
static int restore_device_memory(struct engine *e, char *err)
{
	int r = 0;

	if (e->m.kv_on_device)
		r = model_kv_restore(&e->m, &e->kv, err);
	if (r == 0)
		r = model_upload_weights(&e->m, err);
	return r;
}

/* Called on the library's control thread. */
static int coop_quiesce(void *userdata, uint32_t deadline_ms)
{
	struct engine *e = userdata;
	struct coop *c = &e->coop;
	char err[MODEL_ERR_SIZE];
	struct timespec until;
	int r = 0;

	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += deadline_ms / 1000;
	until.tv_nsec += (long)(deadline_ms % 1000) * 1000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&c->lock);
	if (c->phase == COOP_RUNNING) {
		c->phase = COOP_WANT_QUIESCE;
		__atomic_store_n(&c->cancel, 1, __ATOMIC_RELAXED);
		if (write(c->wake[1], "q", 1) < 0) {
			/* the pipe is never full: the main loop drains it when parking */
		}
	}
	while (c->phase == COOP_WANT_QUIESCE && r == 0)
		r = pthread_cond_timedwait(&c->changed, &c->lock, &until);
	if (c->phase != COOP_PARKED) {
		/* the step did not end in time: go on as if nothing was asked */
		c->phase = COOP_RUNNING;
		__atomic_store_n(&c->cancel, 0, __ATOMIC_RELAXED);
		pthread_mutex_unlock(&c->lock);
		return -ETIMEDOUT;
	}
	r = release_device_memory(e, err);
	if (r < 0) {
		fprintf(stderr, "engine: quiesce: %s\n", err);
		/* a refused quiesce gets no resume: take back what was released */
		if (restore_device_memory(e, err) < 0)
			die("quiesce refused and the model cannot be restored: %s", err);
		c->phase = COOP_RUNNING;
		pthread_cond_broadcast(&c->changed);
	} else {
		c->quiesces++;
		/* the released device bytes are nowhere else to see: the plugin counts host ones */
		if (e->m.kv_on_device && !e->o.quiet)
			fprintf(stderr,
				"engine: quiesced: %" PRIu64 " bytes of weights and %" PRIu64
				" bytes of free device KV memory released\n",
				e->m.weights_size, c->kv_released);
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

static int coop_resume(void *userdata, bool restored)
{
	struct engine *e = userdata;
	struct coop *c = &e->coop;
	char err[MODEL_ERR_SIZE];
	int r = 0;

	pthread_mutex_lock(&c->lock);
	if (c->phase == COOP_PARKED) {
		double t0 = now_s();

		r = restore_device_memory(e, err);
		c->upload_s = now_s() - t0;
		if (r < 0) {
			fprintf(stderr, "engine: resume: %s\n", err);
		} else {
			c->resumes++;
			c->restores += restored;
			c->phase = COOP_RUNNING;
			pthread_cond_broadcast(&c->changed);
		}
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

/* Between steps: parks while a quiesce holds the engine. */
static void coop_park(struct engine *e)
{
	struct coop *c = &e->coop;
	char buf[16];

	if (!e->o.coop)
		return;
	pthread_mutex_lock(&c->lock);
	if (c->phase == COOP_WANT_QUIESCE) {
		while (read(c->wake[0], buf, sizeof(buf)) > 0) {
			/* drained: the pipe is non-blocking */
		}
		__atomic_store_n(&c->cancel, 0, __ATOMIC_RELAXED);
		(void)write_status_file(e);
		c->phase = COOP_PARKED;
		pthread_cond_broadcast(&c->changed);
		while (c->phase == COOP_PARKED)
			pthread_cond_wait(&c->changed, &c->lock);
	}
	pthread_mutex_unlock(&c->lock);
}

static void coop_kv_change(void *userdata, uint32_t block, bool free)
{
	struct engine *e = userdata;

	(void)kme_kv_block_set_free(e->coop.ctl, 0, block, free);
}

/* Maps the weights file; the model is then loaded from the mapping. */
static void coop_open_weights(struct engine *e)
{
	uint64_t offset, size;
	const char *name;
	int r;

	r = kme_weights_open(e->o.store, e->o.model, &e->coop.weights);
	if (r < 0)
		die("--coop: cannot open the weights of %s through kvmotion: %s", e->o.model,
		    kme_strerror(r));
	r = kme_weights_file(e->coop.weights, 0, &name, &offset, &size);
	if (r < 0)
		die("--coop: weights file %s: %s", kme_weights_path(e->coop.weights),
		    kme_strerror(r));
	e->coop.file = (const uint8_t *)kme_weights_data(e->coop.weights) + offset;
	e->coop.file_size = size;
}

/* After the KV pool exists: the control thread starts answering kvmotion. */
static void coop_start(struct engine *e)
{
	struct coop *c = &e->coop;
	const struct kme_callbacks cb = { .quiesce = coop_quiesce,
					  .resume = coop_resume,
					  .userdata = e };
	pthread_condattr_t ca;
	uint32_t pool;
	int r;

	pthread_mutex_init(&c->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->changed, &ca);
	pthread_condattr_destroy(&ca);
	if (pipe2(c->wake, O_CLOEXEC | O_NONBLOCK) < 0)
		die("pipe: %s", strerror(errno));
	r = kme_engine_start(&cb, NULL, &c->ctl);
	if (r < 0)
		die("--coop: cannot start kvmotion's engine control: %s", kme_strerror(r));
	r = kme_engine_add_weights(c->ctl, c->weights);
	if (r < 0)
		die("--coop: %s", kme_strerror(r));
	/* a device pool: the library counts its free blocks, the model releases them */
	if (e->m.kv_on_device)
		r = kme_kv_pool_register(c->ctl, e->m.kv_device, kv_block_stride_bytes(&e->kv),
					 e->kv.n_blocks, KME_KV_DEVICE, &pool);
	else
		r = kme_kv_pool_register(c->ctl, e->kv.data, kv_block_stride_bytes(&e->kv),
					 e->kv.n_blocks, KME_KV_HOST, &pool);
	if (r < 0 || pool != 0)
		die("--coop: cannot register the KV pool: %s", kme_strerror(r < 0 ? r : -EINVAL));
	/* every block starts in use for the library: tell it which are free */
	for (uint32_t i = 0; i < e->kv.n_free; i++)
		(void)kme_kv_block_set_free(c->ctl, 0, e->kv.free_stack[i], true);
	e->kv.on_change = coop_kv_change;
	e->kv.on_change_data = e;
}

static void coop_stop(struct engine *e)
{
	if (!e->o.coop)
		return;
	e->kv.on_change = NULL;
	kme_engine_stop(e->coop.ctl);
	kme_weights_close(e->coop.weights);
	close(e->coop.wake[0]);
	close(e->coop.wake[1]);
}

static void parse_args(int argc, char **argv, struct options *o)
{
	static const struct option opts[] = {
		{ "model", required_argument, NULL, 'm' },
		{ "out", required_argument, NULL, 'o' },
		{ "seqs", required_argument, NULL, 's' },
		{ "total-seqs", required_argument, NULL, 't' },
		{ "prompt-len", required_argument, NULL, 'p' },
		{ "max-new", required_argument, NULL, 'n' },
		{ "prefill-chunk", required_argument, NULL, 'c' },
		{ "max-batch", required_argument, NULL, 'B' },
		{ "block-tokens", required_argument, NULL, 'b' },
		{ "kv-mib", required_argument, NULL, 'k' },
		{ "kv-fill-mib", required_argument, NULL, 'F' },
		{ "kv-churn-mib", required_argument, NULL, 'K' },
		{ "threads", required_argument, NULL, 'j' },
		{ "step-delay-ms", required_argument, NULL, 'd' },
		{ "seed", required_argument, NULL, 'r' },
		{ "status", required_argument, NULL, 'S' },
		{ "status-socket", required_argument, NULL, 'U' },
		{ "status-file", required_argument, NULL, 'f' },
		{ "quiet", no_argument, NULL, 'Q' },
		{ "keep-model-open", no_argument, NULL, 'O' },
		{ "coop", no_argument, NULL, 'C' },
		{ "coop-upload", no_argument, NULL, 'u' },
		{ "store", required_argument, NULL, 'D' },
		{ "query", required_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{}
	};
	int opt, idx;

	while ((opt = getopt_long(argc, argv, "", opts, &idx)) != -1) {
		const char *name = opt == '?' ? "" : opts[idx].name;

		switch (opt) {
		case 'm': o->model = optarg; break;
		case 'o': o->out = optarg; break;
		case 's': o->seqs = (unsigned)parse_num(name, optarg, 1, 4096); break;
		case 't': o->total_seqs = parse_num(name, optarg, 0, UINT32_MAX); break;
		case 'p': o->prompt_len = (unsigned)parse_num(name, optarg, 1, 1 << 20); break;
		case 'n': o->max_new = (unsigned)parse_num(name, optarg, 1, 1 << 20); break;
		case 'c': o->prefill_chunk = (unsigned)parse_num(name, optarg, 0, 1 << 20); break;
		case 'B': o->max_batch = (unsigned)parse_num(name, optarg, 1, 1 << 16); break;
		case 'b': o->block_tokens = (unsigned)parse_num(name, optarg, 1, 1 << 16); break;
		case 'k': o->kv_mib = parse_num(name, optarg, 1, 1 << 24); break;
		case 'F': o->fill_mib = parse_num(name, optarg, 0, 1 << 24); break;
		case 'K': o->churn_mib = parse_num(name, optarg, 0, 1 << 24); break;
		case 'j': o->threads = (unsigned)parse_num(name, optarg, 1, 256); break;
		case 'd': o->delay_ms = (unsigned)parse_num(name, optarg, 0, 3600000); break;
		case 'r': o->seed = parse_num(name, optarg, 0, UINT64_MAX); break;
		case 'S': o->status_path = optarg; break;
		case 'U': o->status_name = optarg; break;
		case 'f': o->status_file = optarg; break;
		case 'Q': o->quiet = true; break;
		case 'O': o->keep_model_open = true; break;
		case 'C': o->coop = true; break;
		case 'u': o->coop = o->coop_upload = true; break;
		case 'D': o->store = optarg; break;
		case 'q': exit(query(optarg));
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); exit(2);
		}
	}
	if (optind != argc) {
		fprintf(stderr, "engine: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		exit(2);
	}
	if (!o->model || !o->out) {
		fprintf(stderr, "engine: --model and --out are required\n");
		usage(stderr);
		exit(2);
	}
	if (!o->prefill_chunk || o->prefill_chunk > o->prompt_len)
		o->prefill_chunk = o->prompt_len;
	if ((uint64_t)o->prompt_len + o->max_new > 1 << 20)
		die("--prompt-len + --max-new must be at most %u", 1 << 20);
}

static void engine_init(struct engine *e)
{
	const struct options *o = &e->o;
	struct model_opts mo;
	char err[MODEL_ERR_SIZE];
	uint64_t want;
	int r;

	/* a batch: a chunk of prompt for every sequence, capped by --max-batch */
	want = (uint64_t)o->seqs * o->prefill_chunk;
	e->max_batch = want < o->max_batch ? (unsigned)want : o->max_batch;
	if (e->max_batch < o->seqs)
		e->max_batch = o->seqs;
	mo = (struct model_opts){ .max_ctx = o->prompt_len + o->max_new,
				  .max_batch = e->max_batch,
				  .max_outputs = o->seqs,
				  .threads = o->threads,
				  .in_place = o->coop && !o->coop_upload,
				  .cancel = o->coop ? &e->coop.cancel : NULL };
	if (o->coop) {
		coop_open_weights(e);
		r = model_load_mem(&e->m, e->coop.file, e->coop.file_size,
				   kme_weights_path(e->coop.weights), &mo, err);
	} else {
		r = model_load(&e->m, o->model, &mo, err);
	}
	if (r < 0)
		die("%s", err);
	r = kv_pool_init(&e->kv, e->m.c.layers, e->m.c.kv_dim, o->block_tokens, o->kv_mib << 20,
			 !e->m.kv_on_device);
	if (r == -EINVAL)
		die("--kv-mib %" PRIu64 " holds no KV block of this model (%zu bytes each)",
		    o->kv_mib, (size_t)e->m.c.layers * 2 * o->block_tokens * e->m.c.kv_dim * 2);
	if (r < 0)
		die("cannot allocate the KV pool (--kv-mib %" PRIu64 "): %s", o->kv_mib,
		    strerror(-r));
	r = model_kv_init(&e->m, &e->kv, err);
	if (r < 0)
		die("KV pool: %s", err);
	e->max_blocks = (o->prompt_len + o->max_new + o->block_tokens - 1) / o->block_tokens;
	if (e->max_blocks > e->kv.n_blocks)
		die("one sequence needs %u KV blocks of %u tokens, --kv-mib %" PRIu64 " holds %u",
		    e->max_blocks, o->block_tokens, o->kv_mib, e->kv.n_blocks);
	if (o->coop)
		coop_start(e);
	park_blocks(e);
	churn_blocks(e);

	e->seqs = calloc(o->seqs, sizeof(*e->seqs));
	e->toks = calloc(e->max_batch, sizeof(*e->toks));
	e->lines = malloc((size_t)o->seqs * LINE_MAX_LEN);
	if (!e->seqs || !e->toks || !e->lines)
		die("out of memory");
	for (unsigned i = 0; i < o->seqs; i++) {
		e->seqs[i].prompt = calloc(o->prompt_len, sizeof(uint32_t));
		e->seqs[i].blocks = calloc(e->max_blocks, sizeof(uint32_t));
		if (!e->seqs[i].prompt || !e->seqs[i].blocks)
			die("out of memory");
		if (more_to_start(e))
			seq_start(e, &e->seqs[i]);
	}

	/* kept for the process's life: kvmotion migrate finds model files this way */
	if (o->keep_model_open && open(o->model, O_RDONLY | O_CLOEXEC) < 0)
		die("cannot open %s: %s", o->model, strerror(errno));
	e->out_fd = open(o->out, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (e->out_fd < 0)
		die("cannot open %s: %s", o->out, strerror(errno));
	if (o->status_file) {
		if (asprintf(&e->status_tmp, "%s.tmp", o->status_file) < 0)
			die("out of memory");
		r = write_status_file(e);
		if (r < 0)
			die("cannot write the status file %s: %s", o->status_file, strerror(-r));
	}
	if (o->status_path) {
		r = status_listen(o->status_path, false, &e->listen_fd[0]);
		if (r == -EEXIST)
			die("--status %s exists and is not a socket", o->status_path);
		if (r < 0)
			die("--status %s: %s", o->status_path, strerror(-r));
	}
	if (o->status_name) {
		r = status_listen(o->status_name, true, &e->listen_fd[1]);
		if (r < 0)
			die("--status-socket @%s: %s", o->status_name, strerror(-r));
	}
	if (!o->quiet)
		fprintf(stderr,
			"engine: %s: %u layers, dim %u, heads %u/%u, ffn %u, vocab %u, %.1f MiB "
			"of bf16 weights (%s); KV pool %u blocks of %u tokens (%.1f MiB); %u "
			"sequences of %u+%u tokens, %u threads\n",
			o->model, e->m.c.layers, e->m.c.dim, e->m.c.heads, e->m.c.kv_heads,
			e->m.c.ffn, e->m.c.vocab, (double)e->m.weights_size / (1 << 20),
			e->m.kv_on_device ? "device" : "host", e->kv.n_blocks, o->block_tokens,
			(double)e->kv.n_blocks * kv_block_bytes(&e->kv) / (1 << 20), o->seqs,
			o->prompt_len, o->max_new, o->threads);
}

static void engine_free(struct engine *e)
{
	for (unsigned i = 0; e->seqs && i < e->o.seqs; i++) {
		free(e->seqs[i].prompt);
		free(e->seqs[i].blocks);
	}
	free(e->seqs);
	free(e->toks);
	free(e->lines);
	free(e->status_tmp);
	for (unsigned i = 0; i < 2; i++)
		if (e->listen_fd[i] >= 0)
			close(e->listen_fd[i]);
	if (e->o.status_path)
		unlink(e->o.status_path);
	if (e->out_fd >= 0)
		close(e->out_fd);
	coop_stop(e);
	kv_pool_free(&e->kv);
	model_free(&e->m);
}

int main(int argc, char **argv)
{
	struct engine e = {
		.o = { .seqs = 4, .total_seqs = 8, .prompt_len = 16, .max_new = 32,
		       .max_batch = 512, .block_tokens = 16, .threads = 1, .kv_mib = 64 },
		.out_fd = -1,
		.listen_fd = { -1, -1 },
	};
	double t0, t;
	int r;

	parse_args(argc, argv, &e.o);
	engine_init(&e);
	t0 = now_s();
	for (;;) {
		r = engine_step(&e);
		if (r == 0)
			break;
		if (r == -ECANCELED) {
			e.coop.steps_cancelled++;
			coop_park(&e);
			continue;
		}
		if (r == -ENOSPC)
			die("KV pool too small: every active sequence waits for a block (%u "
			    "blocks of %u tokens, %u parked); raise --kv-mib",
			    e.kv.n_blocks, e.kv.block_tokens, e.parked_blocks);
		/* errors after the start are not worth stopping the generation for */
		(void)write_status_file(&e);
		serve_status(&e);
		if (e.o.delay_ms)
			delay(&e);
		coop_park(&e);
	}
	e.done = true;
	(void)write_status_file(&e);
	serve_status(&e);
	t = now_s() - t0;
	if (!e.o.quiet)
		fprintf(stderr,
			"engine: done: %" PRIu64 " sequences, %" PRIu64
			" tokens generated, %" PRIu64 " prefill + %" PRIu64
			" decode positions in %" PRIu64 " steps, %.2f s: %.1f "
			"tokens/s, %.1f positions/s (wall clock, delays included)\n",
			e.sequences_done, e.tokens_generated, e.prefill_steps, e.decode_steps,
			e.steps, t, t > 0 ? (double)e.tokens_generated / t : 0.0,
			t > 0 ? (double)(e.prefill_steps + e.decode_steps) / t : 0.0);
	engine_free(&e);
	return 0;
}
