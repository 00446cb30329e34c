/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * mkmodel: writes a deterministic safetensors model file for the tests.
 *
 *   mkmodel OUT --size BYTES [--seed N] [--layers N] [--dim D] [--heads H]
 *               [--kv-heads K] [--ffn F] [--vocab V] [--verbose]
 *
 * The file is a Llama-shaped decoder: model.embed_tokens.weight [vocab, dim],
 * per layer input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm
 * and mlp.{gate,up,down}_proj, then model.norm.weight and lm_head.weight. Every
 * tensor is BF16. Projection weights are normal-ish values with a standard
 * deviation of 0.02 (a sum of four uniforms), norm weights 1.0 plus a little
 * noise. Values come from a xoshiro256** generator seeded from --seed and the
 * tensor's index, so the same arguments always give the same bytes.
 *
 * Shapes: --dim/--layers/--vocab default from --size. With no --dim, the
 * largest multiple of 64 whose layers fill about 80% of --size is taken (8
 * layers unless --layers is given); with no --vocab, the vocabulary is sized so
 * that the embeddings fill the rest, which puts the file within a few
 * kilobytes of --size. The configuration is also recorded as string values
 * in the header's "__metadata__" ("kvmotion.dim", ...), for a loader.
 *
 * Layout (https://github.com/huggingface/safetensors): u64 LE header length N,
 * N bytes of JSON padded with spaces to a multiple of 8, then the tensors'
 * data back to back; "data_offsets" are relative to the end of the header.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rng.h"

#define MAX_TENSORS 4096
#define BUF_VALUES (1u << 19) /* 1 MiB of bf16 per write */

enum init_kind {
	INIT_WEIGHT, /* normal-ish, sd 0.02 */
	INIT_NORM,   /* 1.0 + small noise */
};

struct tensor {
	char name[96];
	uint64_t rows, cols; /* cols == 0: a vector of rows values */
	enum init_kind init;
	uint64_t begin, end; /* data_offsets */
};

struct config {
	uint64_t size;
	uint64_t seed;
	uint64_t layers, dim, heads, kv_heads, ffn, vocab;
	bool verbose;
};

static struct tensor tensors[MAX_TENSORS];
static unsigned n_tensors;

static __attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...)
{
	va_list ap;

	fputs("mkmodel: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void usage(FILE *f)
{
	fputs("usage: mkmodel OUT --size BYTES [--seed N] [--layers N] [--dim D]\n"
	      "               [--heads H] [--kv-heads K] [--ffn F] [--vocab V] [--verbose]\n"
	      "BYTES may end in K, M or G (powers of 1024). Same arguments, same bytes.\n",
	      f);
}

/* Parses a non-negative integer with an optional K/M/G suffix. */
static uint64_t parse_size(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	errno = 0;
	if (*s == '-' || *s == '\0')
		die("%s: invalid number '%s'", opt, s);
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		die("%s: invalid number '%s'", opt, s);
	switch (*end) {
	case '\0':
		break;
	case 'k':
	case 'K':
		shift = 10;
		break;
	case 'm':
	case 'M':
		shift = 20;
		break;
	case 'g':
	case 'G':
		shift = 30;
		break;
	default:
		die("%s: invalid number '%s'", opt, s);
	}
	if (*end && end[1] != '\0' && strcmp(end + 1, "iB") != 0)
		die("%s: invalid number '%s'", opt, s);
	if (shift && v > (UINT64_MAX >> shift))
		die("%s: '%s' is too large", opt, s);
	return (uint64_t)v << shift;
}


/* float to bf16, rounding to nearest even (no NaN can occur here). */
static inline uint16_t to_bf16(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

/*
 * One normal-ish value from 64 random bits: the sum of four 16-bit uniforms
 * (Irwin-Hall, mean 2, variance 1/3) centred and scaled to unit variance.
 */
static inline float normalish(uint64_t bits)
{
	uint32_t sum = (uint32_t)(bits & 0xffff) + (uint32_t)((bits >> 16) & 0xffff) +
		       (uint32_t)((bits >> 32) & 0xffff) + (uint32_t)(bits >> 48);

	/* sum / 65536 - 2, divided by sqrt(1/3) */
	return ((float)sum * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
}

static void add_tensor(const char *name, uint64_t rows, uint64_t cols, enum init_kind init)
{
	struct tensor *t;

	if (n_tensors == MAX_TENSORS)
		die("too many tensors (at most %d)", MAX_TENSORS);
	t = &tensors[n_tensors++];
	if ((size_t)snprintf(t->name, sizeof(t->name), "%s", name) >= sizeof(t->name))
		die("tensor name too long: %s", name);
	t->rows = rows;
	t->cols = cols;
	t->init = init;
}

static uint64_t layer_bytes(const struct config *c)
{
	uint64_t kv_dim = c->dim / c->heads * c->kv_heads;
	uint64_t params = 2 * c->dim * c->dim + 2 * kv_dim * c->dim + 3 * c->ffn * c->dim + 2 * c->dim;

	return 2 * params;
}

static uint64_t default_ffn(uint64_t dim)
{
	return (8 * dim / 3 + 63) / 64 * 64;
}

static void build_tensors(const struct config *c)
{
	uint64_t kv_dim = c->dim / c->heads * c->kv_heads;
	char name[96];

	n_tensors = 0;
	add_tensor("model.embed_tokens.weight", c->vocab, c->dim, INIT_WEIGHT);
	for (uint64_t l = 0; l < c->layers; l++) {
		static const char *const attn[] = { "q_proj", "k_proj", "v_proj", "o_proj" };
		static const char *const mlp[] = { "gate_proj", "up_proj", "down_proj" };

		snprintf(name, sizeof(name), "model.layers.%" PRIu64 ".input_layernorm.weight", l);
		add_tensor(name, c->dim, 0, INIT_NORM);
		for (unsigned i = 0; i < 4; i++) {
			uint64_t out = (i == 1 || i == 2) ? kv_dim : c->dim;

			snprintf(name, sizeof(name), "model.layers.%" PRIu64 ".self_attn.%s.weight", l,
				 attn[i]);
			add_tensor(name, out, c->dim, INIT_WEIGHT);
		}
		snprintf(name, sizeof(name),
			 "model.layers.%" PRIu64 ".post_attention_layernorm.weight", l);
		add_tensor(name, c->dim, 0, INIT_NORM);
		for (unsigned i = 0; i < 3; i++) {
			snprintf(name, sizeof(name), "model.layers.%" PRIu64 ".mlp.%s.weight", l,
				 mlp[i]);
			if (i == 2)
				add_tensor(name, c->dim, c->ffn, INIT_WEIGHT);
			else
				add_tensor(name, c->ffn, c->dim, INIT_WEIGHT);
		}
	}
	add_tensor("model.norm.weight", c->dim, 0, INIT_NORM);
	add_tensor("lm_head.weight", c->vocab, c->dim, INIT_WEIGHT);
}

struct strbuf {
	char *p;
	size_t len, cap;
};

static __attribute__((format(printf, 2, 3))) void sb_printf(struct strbuf *sb, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		size_t room = sb->cap - sb->len;

		va_start(ap, fmt);
		n = vsnprintf(sb->p + sb->len, room, fmt, ap);
		va_end(ap);
		if (n < 0)
			die("formatting the header failed");
		if ((size_t)n < room)
			break;
		sb->cap = sb->cap * 2 + (size_t)n + 1;
		sb->p = realloc(sb->p, sb->cap);
		if (!sb->p)
			die("out of memory");
	}
	sb->len += (size_t)n;
}

/* Assigns data offsets and renders the header, padded to a multiple of 8. */
static void render_header(const struct config *c, struct strbuf *sb, uint64_t *data_size)
{
	uint64_t off = 0;

	sb->len = 0;
	if (!sb->p) {
		sb->cap = 1 << 16;
		sb->p = malloc(sb->cap);
		if (!sb->p)
			die("out of memory");
	}
	sb_printf(sb,
		  "{\"__metadata__\":{\"format\":\"pt\",\"kvmotion.generator\":\"mkmodel\","
		  "\"kvmotion.arch\":\"llama\",\"kvmotion.seed\":\"%" PRIu64 "\","
		  "\"kvmotion.layers\":\"%" PRIu64 "\",\"kvmotion.dim\":\"%" PRIu64 "\","
		  "\"kvmotion.heads\":\"%" PRIu64 "\",\"kvmotion.kv_heads\":\"%" PRIu64 "\","
		  "\"kvmotion.ffn\":\"%" PRIu64 "\",\"kvmotion.vocab\":\"%" PRIu64 "\"}",
		  c->seed, c->layers, c->dim, c->heads, c->kv_heads, c->ffn, c->vocab);
	for (unsigned i = 0; i < n_tensors; i++) {
		struct tensor *t = &tensors[i];
		uint64_t n = t->cols ? t->rows * t->cols : t->rows;

		t->begin = off;
		t->end = off + 2 * n;
		off = t->end;
		if (t->cols)
			sb_printf(sb,
				  ",\"%s\":{\"dtype\":\"BF16\",\"shape\":[%" PRIu64 ",%" PRIu64
				  "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}",
				  t->name, t->rows, t->cols, t->begin, t->end);
		else
			sb_printf(sb,
				  ",\"%s\":{\"dtype\":\"BF16\",\"shape\":[%" PRIu64
				  "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}",
				  t->name, t->rows, t->begin, t->end);
	}
	sb_printf(sb, "}");
	while (sb->len % 8)
		sb_printf(sb, " ");
	*data_size = off;
}

static uint64_t total_size(const struct config *c, struct strbuf *sb)
{
	uint64_t data;

	build_tensors(c);
	render_header(c, sb, &data);
	return 8 + sb->len + data;
}

static void choose_shapes(struct config *c, bool dim_set, bool vocab_set, bool ffn_set,
			  bool heads_set, bool kv_set, struct strbuf *sb)
{
	if (!c->layers)
		c->layers = 8;
	if (!dim_set) {
		if (!c->size)
			die("give --size, or --dim (with --layers and --vocab)");
		c->dim = 64;
		for (uint64_t d = 128;; d += 64) {
			struct config t = *c;

			t.dim = d;
			t.heads = heads_set ? c->heads : d / 64;
			t.kv_heads = kv_set ? c->kv_heads : t.heads;
			t.ffn = ffn_set ? c->ffn : default_ffn(d);
			if (d % t.heads || t.heads % t.kv_heads)
				continue;
			if (t.layers * layer_bytes(&t) > c->size / 10 * 8)
				break;
			c->dim = d;
		}
	}
	if (!heads_set)
		c->heads = c->dim % 64 == 0 ? c->dim / 64 : 1;
	if (!kv_set)
		c->kv_heads = c->heads;
	if (!c->heads || c->dim % c->heads)
		die("--dim %" PRIu64 " is not a multiple of --heads %" PRIu64, c->dim, c->heads);
	if (!c->kv_heads || c->heads % c->kv_heads)
		die("--heads %" PRIu64 " is not a multiple of --kv-heads %" PRIu64, c->heads,
		    c->kv_heads);
	if (!ffn_set)
		c->ffn = default_ffn(c->dim);
	if (!vocab_set) {
		uint64_t fixed;

		c->vocab = 256;
		if (c->size) {
			/* a few passes: the header's length depends on the numbers in it */
			for (int pass = 0; pass < 3; pass++) {
				uint64_t per_token = 2 * 2 * c->dim; /* embed + lm_head */

				fixed = total_size(c, sb) - c->vocab * per_token;
				if (fixed < c->size && (c->size - fixed) / per_token > 256)
					c->vocab = (c->size - fixed) / per_token;
				else
					c->vocab = 256;
			}
		}
	}
}

static void write_full(int fd, const void *buf, size_t n, const char *path)
{
	const char *p = buf;

	while (n) {
		ssize_t k = write(fd, p, n);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			die("writing %s: %s", path, strerror(errno));
		}
		p += k;
		n -= (size_t)k;
	}
}

static void write_tensor(int fd, const struct config *c, unsigned idx, uint16_t *buf,
			 const char *path)
{
	const struct tensor *t = &tensors[idx];
	uint64_t left = (t->end - t->begin) / 2;
	struct rng r;

	rng_seed(&r, c->seed, idx + 1);
	while (left) {
		size_t n = left < BUF_VALUES ? (size_t)left : BUF_VALUES;

		if (t->init == INIT_NORM) {
			for (size_t i = 0; i < n; i++)
				buf[i] = to_bf16(1.0f + 0.05f * normalish(rng_next(&r)));
		} else {
			for (size_t i = 0; i < n; i++)
				buf[i] = to_bf16(0.02f * normalish(rng_next(&r)));
		}
		/* bf16 little-endian: this is an x86/arm little-endian helper */
		write_full(fd, buf, n * 2, path);
		left -= n;
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "seed", required_argument, NULL, 'S' },
		{ "layers", required_argument, NULL, 'l' },
		{ "dim", required_argument, NULL, 'd' },
		{ "heads", required_argument, NULL, 'H' },
		{ "kv-heads", required_argument, NULL, 'K' },
		{ "ffn", required_argument, NULL, 'f' },
		{ "vocab", required_argument, NULL, 'V' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct config c = { 0 };
	bool dim_set = false, vocab_set = false, ffn_set = false, heads_set = false,
	     kv_set = false;
	struct strbuf sb = { 0 };
	uint64_t data_size, hlen;
	unsigned char len_le[8];
	uint16_t *buf;
	char *tmp;
	const char *out;
	int opt, fd;

	while ((opt = getopt_long(argc, argv, "s:S:l:d:H:K:f:V:vh", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			c.size = parse_size("--size", optarg);
			break;
		case 'S':
			c.seed = parse_size("--seed", optarg);
			break;
		case 'l':
			c.layers = parse_size("--layers", optarg);
			if (!c.layers || c.layers > 400)
				die("--layers must be 1..400");
			break;
		case 'd':
			c.dim = parse_size("--dim", optarg);
			if (c.dim < 1 || c.dim > (1 << 20))
				die("--dim must be 1..1048576");
			dim_set = true;
			break;
		case 'H':
			c.heads = parse_size("--heads", optarg);
			heads_set = true;
			break;
		case 'K':
			c.kv_heads = parse_size("--kv-heads", optarg);
			kv_set = true;
			break;
		case 'f':
			c.ffn = parse_size("--ffn", optarg);
			if (!c.ffn || c.ffn > (1 << 22))
				die("--ffn must be 1..4194304");
			ffn_set = true;
			break;
		case 'V':
			c.vocab = parse_size("--vocab", optarg);
			if (!c.vocab || c.vocab > (1 << 24))
				die("--vocab must be 1..16777216");
			vocab_set = true;
			break;
		case 'v':
			c.verbose = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc - 1) {
		usage(stderr);
		return 2;
	}
	out = argv[optind];
	if (!c.size && !dim_set)
		die("--size is required unless --dim is given");

	choose_shapes(&c, dim_set, vocab_set, ffn_set, heads_set, kv_set, &sb);
	build_tensors(&c);
	render_header(&c, &sb, &data_size);
	hlen = sb.len;

	if (asprintf(&tmp, "%s.mkmodel-tmp", out) < 0)
		die("out of memory");
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("%s: %s", tmp, strerror(errno));
	for (int i = 0; i < 8; i++)
		len_le[i] = (unsigned char)(hlen >> (8 * i));
	write_full(fd, len_le, sizeof(len_le), tmp);
	write_full(fd, sb.p, sb.len, tmp);
	buf = malloc(BUF_VALUES * sizeof(*buf));
	if (!buf)
		die("out of memory");
	for (unsigned i = 0; i < n_tensors; i++)
		write_tensor(fd, &c, i, buf, tmp);
	if (close(fd) < 0)
		die("%s: %s", tmp, strerror(errno));
	if (rename(tmp, out) < 0)
		die("renaming %s to %s: %s", tmp, out, strerror(errno));

	if (c.verbose)
		fprintf(stderr,
			"mkmodel: %s: %" PRIu64 " bytes (header %" PRIu64 ", %u tensors), layers %" PRIu64
			" dim %" PRIu64 " heads %" PRIu64 "/%" PRIu64 " ffn %" PRIu64
			" vocab %" PRIu64 " seed %" PRIu64 "\n",
			out, 8 + hlen + data_size, hlen, n_tensors, c.layers, c.dim, c.heads,
			c.kv_heads, c.ffn, c.vocab, c.seed);
	free(buf);
	free(tmp);
	free(sb.p);
	return 0;
}
