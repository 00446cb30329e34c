/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * engine: the test suite's LLM inference engine. Several sequences decode
 * at once with greedy sampling over a paged KV cache; every generated token
 * is appended to --out as "seq=<id> pos=<n> tok=<id>". Everything is
 * deterministic, so a run that was dumped and restored by CRIU mid-way must
 * write exactly the tokens of a run that never stopped, and its counters
 * must show no extra prefill (the KV cache came back, nothing recomputed).
 *
 *   engine --model F --out F [--seqs N] [--total-seqs N] [--prompt-len N]
 *          [--max-new N] [--block-tokens N] [--kv-mib N] [--step-delay-ms N]
 *          [--status-file F] [--status-socket NAME] [--seed N] [--kv-fill-mib N]
 *   engine --query NAME        print the status of the engine serving NAME
 *
 * The status socket is a UNIX socket in the abstract namespace ("@NAME"),
 * which CRIU restores without a file to collide with; each connection gets
 * one line of JSON. --status-file is rewritten atomically after each step.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "kvcache.h"
#include "model.h"
#include "rng.h"

struct seq {
	bool active;
	uint32_t id;
	uint32_t *prompt;
	unsigned pos;	    /* next position to run */
	unsigned n_new;	    /* tokens generated so far */
	uint32_t last;	    /* last generated token */
	uint32_t *blocks;
	unsigned n_blocks;
};

struct engine {
	struct model m;
	struct kv_pool kv;
	struct seq *seqs;
	unsigned n_seqs, prompt_len, max_new, max_blocks;
	uint64_t total_seqs, started, seed;
	int out_fd, listen_fd;
	const char *status_file;
	uint64_t tokens_generated, prefill_steps, decode_steps, sequences_done, steps;
	uint32_t parked_blocks; /* --kv-fill-mib: blocks held with synthetic KV */
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

static void seq_start(struct engine *e, struct seq *s)
{
	uint64_t st = e->seed * 1000003u + e->started;

	s->active = true;
	s->id = (uint32_t)e->started++;
	s->pos = 0;
	s->n_new = 0;
	s->n_blocks = 0;
	for (unsigned i = 0; i < e->prompt_len; i++)
		s->prompt[i] = (uint32_t)(splitmix64(&st) % e->m.c.vocab);
}

static void seq_finish(struct engine *e, struct seq *s)
{
	for (unsigned i = 0; i < s->n_blocks; i++)
		kv_release(&e->kv, s->blocks[i]);
	s->n_blocks = 0;
	s->active = false;
	e->sequences_done++;
	if (e->total_seqs == 0 || e->started < e->total_seqs)
		seq_start(e, s);
}

static int status_json(const struct engine *e, char *buf, size_t n)
{
	return snprintf(buf, n,
			"{\"tokens_generated\":%" PRIu64 ",\"prefill_steps\":%" PRIu64
			",\"decode_steps\":%" PRIu64 ",\"sequences_done\":%" PRIu64
			",\"sequences_started\":%" PRIu64 ",\"steps\":%" PRIu64
			",\"kv_blocks_used\":%u,\"kv_blocks_total\":%u,\"kv_blocks_parked\":%u"
			",\"weights_bytes\":%" PRIu64 ",\"pid\":%d}\n",
			e->tokens_generated, e->prefill_steps, e->decode_steps, e->sequences_done,
			e->started, e->steps, e->kv.n_blocks - e->kv.n_free, e->kv.n_blocks,
			e->parked_blocks, e->m.weights_size, (int)getpid());
}

static void write_status(const struct engine *e)
{
	char buf[512], tmp[4200];
	int len = status_json(e, buf, sizeof(buf)), fd;

	if (!e->status_file)
		return;
	snprintf(tmp, sizeof(tmp), "%s.tmp", e->status_file);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	if (write(fd, buf, (size_t)len) == len)
		(void)rename(tmp, e->status_file);
	close(fd);
}

static void serve_status(const struct engine *e)
{
	char buf[512];
	int len, c;

	if (e->listen_fd < 0)
		return;
	len = status_json(e, buf, sizeof(buf));
	while ((c = accept4(e->listen_fd, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
		if (write(c, buf, (size_t)len) != len) {
			/* the client went away: nothing to do */
		}
		close(c);
	}
}

static socklen_t abstract_addr(const char *name, struct sockaddr_un *sa)
{
	size_t n = strlen(name);

	if (n + 1 > sizeof(sa->sun_path))
		die("status socket name too long");
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	memcpy(sa->sun_path + 1, name, n);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

static int query(const char *name)
{
	struct sockaddr_un sa;
	socklen_t len = abstract_addr(name, &sa);
	char buf[512];
	ssize_t k;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, len) < 0)
		die("cannot connect to @%s: %s", name, strerror(errno));
	while ((k = read(fd, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, (size_t)k, stdout);
	close(fd);
	return 0;
}

/* One position of one sequence; false if it waits for a KV block. */
static bool seq_step(struct engine *e, struct seq *s)
{
	unsigned bt = e->kv.block_tokens;
	uint32_t token, next;
	char line[96];
	int len;

	if (s->pos / bt >= s->n_blocks) {
		int64_t b = kv_alloc(&e->kv);

		if (b < 0)
			return false;
		s->blocks[s->n_blocks++] = (uint32_t)b;
	}
	token = s->pos < e->prompt_len ? s->prompt[s->pos] : s->last;
	next = model_step(&e->m, &e->kv, s->blocks, token, s->pos);
	if (s->pos < e->prompt_len)
		e->prefill_steps++;
	else
		e->decode_steps++;
	s->pos++;
	if (s->pos < e->prompt_len)
		return true;
	/* The last prompt position and every decode step yield a token. */
	s->last = next;
	len = snprintf(line, sizeof(line), "seq=%u pos=%u tok=%u\n", s->id, s->pos, next);
	if (write(e->out_fd, line, (size_t)len) != len)
		die("cannot write the output: %s", strerror(errno));
	e->tokens_generated++;
	if (++s->n_new == e->max_new)
		seq_finish(e, s);
	return true;
}

/* Blocks held with synthetic KV content, as a long-lived context would. */
static void park_blocks(struct engine *e, uint64_t bytes)
{
	uint64_t block_bytes = e->kv.block_elems * sizeof(uint16_t), st = e->seed;

	while ((uint64_t)e->parked_blocks * block_bytes < bytes) {
		int64_t b = kv_alloc(&e->kv);
		uint16_t *p;

		if (b < 0)
			die("--kv-fill-mib is larger than the KV pool");
		p = e->kv.data + (uint64_t)b * e->kv.block_elems;
		for (size_t i = 0; i < e->kv.block_elems; i++)
			p[i] = (uint16_t)(0x3c00 | (splitmix64(&st) & 0x3ff)); /* small bf16 values */
		e->parked_blocks++;
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, NULL, 'm' },
		{ "out", required_argument, NULL, 'o' },
		{ "seqs", required_argument, NULL, 's' },
		{ "total-seqs", required_argument, NULL, 't' },
		{ "prompt-len", required_argument, NULL, 'p' },
		{ "max-new", required_argument, NULL, 'n' },
		{ "block-tokens", required_argument, NULL, 'b' },
		{ "kv-mib", required_argument, NULL, 'k' },
		{ "kv-fill-mib", required_argument, NULL, 'F' },
		{ "step-delay-ms", required_argument, NULL, 'd' },
		{ "status-file", required_argument, NULL, 'S' },
		{ "status-socket", required_argument, NULL, 'U' },
		{ "seed", required_argument, NULL, 'r' },
		{ "query", required_argument, NULL, 'q' },
		{}
	};
	struct engine e = { .n_seqs = 4, .total_seqs = 8, .prompt_len = 16, .max_new = 32,
			    .out_fd = -1, .listen_fd = -1 };
	const char *model_path = NULL, *out_path = NULL, *sock_name = NULL;
	unsigned block_tokens = 16, delay_ms = 0;
	uint64_t kv_mib = 64, fill_mib = 0;
	char err[256];
	int opt, r;

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		unsigned long long v = optarg ? strtoull(optarg, NULL, 10) : 0;

		switch (opt) {
		case 'm': model_path = optarg; break;
		case 'o': out_path = optarg; break;
		case 's': e.n_seqs = (unsigned)v; break;
		case 't': e.total_seqs = v; break;
		case 'p': e.prompt_len = (unsigned)v; break;
		case 'n': e.max_new = (unsigned)v; break;
		case 'b': block_tokens = (unsigned)v; break;
		case 'k': kv_mib = v; break;
		case 'F': fill_mib = v; break;
		case 'd': delay_ms = (unsigned)v; break;
		case 'S': e.status_file = optarg; break;
		case 'U': sock_name = optarg; break;
		case 'r': e.seed = v; break;
		case 'q': return query(optarg);
		default: die("usage: see the comment at the top of tests/engine/engine.c");
		}
	}
	if (!model_path || !out_path)
		die("--model and --out are required");
	if (!e.n_seqs || !e.prompt_len || !e.max_new || !block_tokens)
		die("--seqs, --prompt-len, --max-new and --block-tokens must be positive");

	r = model_load(&e.m, model_path, e.prompt_len + e.max_new, err);
	if (r < 0)
		die("%s", err);
	r = kv_pool_init(&e.kv, e.m.c.layers, e.m.c.kv_dim, block_tokens, kv_mib << 20);
	if (r < 0)
		die("--kv-mib %" PRIu64 " holds no KV block of this model", kv_mib);
	park_blocks(&e, fill_mib << 20);
	e.max_blocks = (e.prompt_len + e.max_new + block_tokens - 1) / block_tokens;
	e.out_fd = open(out_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (e.out_fd < 0)
		die("cannot open %s: %s", out_path, strerror(errno));
	if (sock_name) {
		struct sockaddr_un sa;
		socklen_t len = abstract_addr(sock_name, &sa);

		e.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (e.listen_fd < 0 || bind(e.listen_fd, (struct sockaddr *)&sa, len) < 0 ||
		    listen(e.listen_fd, 16) < 0)
			die("status socket @%s: %s", sock_name, strerror(errno));
	}
	e.seqs = calloc(e.n_seqs, sizeof(*e.seqs));
	if (!e.seqs)
		die("out of memory");
	for (unsigned i = 0; i < e.n_seqs; i++) {
		e.seqs[i].prompt = calloc(e.prompt_len, sizeof(uint32_t));
		e.seqs[i].blocks = calloc(e.max_blocks, sizeof(uint32_t));
		if (!e.seqs[i].prompt || !e.seqs[i].blocks)
			die("out of memory");
		if (e.total_seqs == 0 || e.started < e.total_seqs)
			seq_start(&e, &e.seqs[i]);
	}

	for (;;) {
		bool any = false, progressed = false;

		for (unsigned i = 0; i < e.n_seqs; i++)
			if (e.seqs[i].active) {
				any = true;
				progressed |= seq_step(&e, &e.seqs[i]);
			}
		if (!any)
			break;
		if (!progressed)
			die("KV pool too small: no sequence can take another block");
		e.steps++;
		write_status(&e);
		serve_status(&e);
		if (delay_ms) {
			struct timespec ts = { delay_ms / 1000, (long)(delay_ms % 1000) * 1000000L };

			nanosleep(&ts, NULL);
		}
	}
	write_status(&e);
	serve_status(&e);
	return 0;
}
