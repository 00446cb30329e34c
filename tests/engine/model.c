/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The CPU build of the model (see model.h). The weights stay bf16 in the
 * anonymous copy; matrix products convert them to fp32 on the fly, eight at
 * a time with 16-byte GCC vector extensions (SSE2/NEON, no intrinsics), and
 * use each converted weight for up to four tokens of the batch. Every output
 * element is one dot product in one fixed order (eight lanes, a fixed
 * horizontal sum, then the tail), computed by exactly one thread: neither
 * the batch nor the thread count changes a bit. Attention uses the same dot
 * product for Q.K and accumulates V over positions in position order.
 *
 * The matrix products and the attention heads are split over --threads by
 * row (and by token and head) in contiguous ranges; everything else runs on
 * the calling thread. Built with -O2 and no -ffast-math: no reassociation.
 */
#include "model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pool.h"

#define ROW_TILE 16 /* rows of W per tile: a tile stays in cache across the batch */

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the engine reads little-endian bf16 and packs pairs of them into 32-bit words"
#endif

/* 16-byte vectors: SSE2 and NEON baselines, no ABI change. */
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));

struct cpu_model {
	struct model_opts o;
	uint8_t *weights; /* anonymous copy of the data section */
	const uint8_t *file;  /* model_load_mem: the file it came from (borrowed) */
	uint64_t data_offset; /* of the data section in file */
	const uint16_t *embed, *final_norm, *lm_head;
	const uint16_t *(*layer)[W_PER_LAYER];
	float *rope_cos, *rope_sin; /* [max_ctx][head_dim / 2] */
	struct pool *pool;
	/* scratch, max_batch rows each unless said */
	float *x, *xb, *q, *k, *v, *att, *hb, *hb2;
	float *xp;	    /* a matrix product's input, de-interleaved (max(dim, ffn) rows) */
	float *xo, *logits; /* max_outputs rows */
	float *scores;	    /* attention scratch: threads * attn_scratch() */
};

static inline float bf16_to_f32(uint16_t h)
{
	union {
		uint32_t u;
		float f;
	} v = { .u = (uint32_t)h << 16 };

	return v.f;
}

static inline uint16_t f32_to_bf16(float f)
{
	union {
		float f;
		uint32_t u;
	} v = { .f = f };

	/* Round to nearest even; NaN stays NaN. */
	if ((v.u & 0x7fffffff) > 0x7f800000)
		return (uint16_t)((v.u >> 16) | 0x40);
	return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

static inline v4f load_f32x4(const float *p)
{
	v4f f;

	memcpy(&f, p, sizeof(f));
	return f;
}

/*
 * Eight bf16 weights, columns 8g..8g+7, as two fp32 vectors: the even
 * columns (the low halves of four 32-bit words) and the odd ones (the high
 * halves). The input x is de-interleaved to match (deinterleave()).
 */
static inline void load_bf16x8(const uint16_t *p, v4f *even, v4f *odd)
{
	v4u u;

	memcpy(&u, p, sizeof(u));
	*even = (v4f)(u << 16);
	*odd = (v4f)(u & 0xffff0000u);
}

/* Per group of eight: x0 x2 x4 x6 x1 x3 x5 x7; a tail of cols % 8 as is. */
static void deinterleave(float *restrict xp, const float *restrict x, unsigned cols)
{
	unsigned c = 0;

	for (; c + 8 <= cols; c += 8)
		for (unsigned j = 0; j < 4; j++) {
			xp[c + j] = x[c + 2 * j];
			xp[c + 4 + j] = x[c + 2 * j + 1];
		}
	for (; c < cols; c++)
		xp[c] = x[c];
}

/* The eight lanes of a dot product summed in a fixed order. */
static inline float hsum8(v4f e, v4f o)
{
	return ((e[0] + o[0]) + (e[1] + o[1])) + ((e[2] + o[2]) + (e[3] + o[3]));
}

/*
 * The dot product of row (bf16) and x (de-interleaved), in the one order
 * every kernel below uses: lane sums over the groups of eight, hsum8, then
 * the tail added in column order.
 */
static inline float tail_sum(const uint16_t *restrict row, const float *restrict xp, unsigned c,
			     unsigned cols)
{
	float t = 0;

	for (; c < cols; c++)
		t += bf16_to_f32(row[c]) * xp[c];
	return t;
}

/* row . x, with x de-interleaved: one dot product in the fixed order. */
static inline float dot_bf16(const uint16_t *restrict row, const float *restrict xp, unsigned n)
{
	unsigned full = n & ~7u;
	v4f e = { 0 }, o = { 0 };

	for (unsigned c = 0; c < full; c += 8) {
		v4f we, wo;

		load_bf16x8(row + c, &we, &wo);
		e += we * load_f32x4(xp + c);
		o += wo * load_f32x4(xp + c + 4);
	}
	return hsum8(e, o) + tail_sum(row, xp, full, n);
}

/* out[r] = W[r] . x for r in [r0, r1), one input. */
static void dot_rows1(float *restrict out, const uint16_t *restrict w, const float *restrict xp,
		      unsigned cols, unsigned r0, unsigned r1)
{
	for (unsigned r = r0; r < r1; r++)
		out[r] = dot_bf16(w + (size_t)r * cols, xp, cols);
}

/* The same for four inputs at once (xp, xp + cols, ...), each weight loaded once. */
static void dot_rows4(float *restrict out, const uint16_t *restrict w, const float *restrict xp,
		      unsigned rows, unsigned cols, unsigned r0, unsigned r1)
{
	const float *restrict x0 = xp, *restrict x1 = xp + cols,
			      *restrict x2 = xp + 2 * (size_t)cols,
			      *restrict x3 = xp + 3 * (size_t)cols;
	unsigned full = cols & ~7u;

	for (unsigned r = r0; r < r1; r++) {
		const uint16_t *restrict row = w + (size_t)r * cols;
		v4f e0 = { 0 }, o0 = { 0 }, e1 = { 0 }, o1 = { 0 };
		v4f e2 = { 0 }, o2 = { 0 }, e3 = { 0 }, o3 = { 0 };

		for (unsigned c = 0; c < full; c += 8) {
			v4f we, wo;

			load_bf16x8(row + c, &we, &wo);
			e0 += we * load_f32x4(x0 + c);
			o0 += wo * load_f32x4(x0 + c + 4);
			e1 += we * load_f32x4(x1 + c);
			o1 += wo * load_f32x4(x1 + c + 4);
			e2 += we * load_f32x4(x2 + c);
			o2 += wo * load_f32x4(x2 + c + 4);
			e3 += we * load_f32x4(x3 + c);
			o3 += wo * load_f32x4(x3 + c + 4);
		}
		out[r] = hsum8(e0, o0) + tail_sum(row, x0, full, cols);
		out[rows + r] = hsum8(e1, o1) + tail_sum(row, x1, full, cols);
		out[2 * (size_t)rows + r] = hsum8(e2, o2) + tail_sum(row, x2, full, cols);
		out[3 * (size_t)rows + r] = hsum8(e3, o3) + tail_sum(row, x3, full, cols);
	}
}

/* out[b * rows + r] = W[r] . x[b] for r in [r0, r1) and every b < nb. */
static void matmul_rows(float *restrict out, const uint16_t *restrict w, const float *restrict xp,
			unsigned rows, unsigned cols, unsigned nb, unsigned r0, unsigned r1)
{
	for (unsigned rt = r0; rt < r1; rt += ROW_TILE) {
		unsigned re = r1 - rt < ROW_TILE ? r1 : rt + ROW_TILE, b = 0;

		for (; b + 4 <= nb; b += 4)
			dot_rows4(out + (size_t)b * rows, w, xp + (size_t)b * cols, rows, cols, rt,
				  re);
		for (; b < nb; b++)
			dot_rows1(out + (size_t)b * rows, w, xp + (size_t)b * cols, cols, rt, re);
	}
}

/* Up to three products of the same input, run as one parallel job. */
struct matmul_job {
	const float *xp; /* de-interleaved input, nb rows of cols */
	unsigned nb, cols, n;
	const int *cancel; /* model_opts.cancel */
	int stopped;	   /* some part gave up: the outputs are incomplete */
	struct {
		float *out;
		const uint16_t *w;
		unsigned rows;
	} p[3];
};

static void range(unsigned n, unsigned part, unsigned parts, unsigned *r0, unsigned *r1)
{
	*r0 = (unsigned)((uint64_t)n * part / parts);
	*r1 = (unsigned)((uint64_t)n * (part + 1) / parts);
}

/* Rows between two looks at the cancel flag: a quiesce waits for at most this. */
#define CANCEL_ROWS 256u

static void matmul_part(void *arg, unsigned part, unsigned parts)
{
	struct matmul_job *j = arg;

	for (unsigned i = 0; i < j->n; i++) {
		unsigned r0, r1;

		range(j->p[i].rows, part, parts, &r0, &r1);
		for (unsigned r = r0; r < r1; r += CANCEL_ROWS) {
			unsigned end = r1 - r > CANCEL_ROWS ? r + CANCEL_ROWS : r1;

			if (j->cancel && __atomic_load_n(j->cancel, __ATOMIC_RELAXED)) {
				__atomic_store_n(&j->stopped, 1, __ATOMIC_RELAXED);
				return;
			}
			matmul_rows(j->p[i].out, j->p[i].w, j->xp, j->p[i].rows, j->cols, j->nb, r,
				    end);
		}
	}
}

static void job_init(struct matmul_job *j, struct cpu_model *cm, const float *x, unsigned nb,
		     unsigned cols)
{
	for (unsigned b = 0; b < nb; b++)
		deinterleave(cm->xp + (size_t)b * cols, x + (size_t)b * cols, cols);
	*j = (struct matmul_job){ .xp = cm->xp, .nb = nb, .cols = cols, .cancel = cm->o.cancel };
}

static void job_add(struct matmul_job *j, float *out, const uint16_t *w, unsigned rows)
{
	j->p[j->n].out = out;
	j->p[j->n].w = w;
	j->p[j->n].rows = rows;
	j->n++;
}

static void rmsnorm(float *restrict out, const float *restrict x, const uint16_t *restrict w,
		    unsigned n)
{
	float ss = 0;

	for (unsigned i = 0; i < n; i++)
		ss += x[i] * x[i];
	ss = 1.0f / sqrtf(ss / (float)n + MODEL_RMS_EPS);
	for (unsigned i = 0; i < n; i++)
		out[i] = x[i] * ss * bf16_to_f32(w[i]);
}

static void rope(const struct cpu_model *cm, float *v, unsigned n_heads, unsigned head_dim,
		 unsigned pos)
{
	const float *cs = cm->rope_cos + (size_t)pos * (head_dim / 2);
	const float *sn = cm->rope_sin + (size_t)pos * (head_dim / 2);

	for (unsigned h = 0; h < n_heads; h++)
		for (unsigned i = 0; i < head_dim / 2; i++) {
			float *p = v + h * head_dim + 2 * i;
			float x0 = p[0], x1 = p[1];

			p[0] = x0 * cs[i] - x1 * sn[i];
			p[1] = x0 * sn[i] + x1 * cs[i];
		}
}

/* Attention of every (token, head) pair of the batch, for one layer. */
struct attn_job {
	const struct model *m;
	struct kv_pool *kv;
	const struct model_tok *toks;
	unsigned n, layer;
};

/*
 * One head of one token: scores over positions 0..pos, softmax, the
 * weighted sum of V. K rows are dotted with the de-interleaved query; V rows
 * are accumulated de-interleaved (even and odd columns of each group of
 * eight) and put back in order at the end. ws: the part's scratch.
 */
static void attn_one(const struct attn_job *j, unsigned b, unsigned h, float *ws)
{
	const struct model_config *c = &j->m->c;
	const struct cpu_model *cm = j->m->priv;
	const struct model_tok *t = &j->toks[b];
	unsigned hd = c->head_dim, full = hd & ~7u, bt = j->kv->block_tokens;
	unsigned kvh = h / (c->heads / c->kv_heads);
	float *out = cm->att + (size_t)b * c->dim + (size_t)h * hd;
	float *qp = ws, *acc = ws + hd, *scores = ws + 2 * (size_t)hd;
	float scale = 1.0f / sqrtf((float)hd), max = -INFINITY, sum = 0;

	deinterleave(qp, cm->q + (size_t)b * c->dim + (size_t)h * hd, hd);
	for (unsigned p = 0; p <= t->pos; p++) {
		const uint16_t *kp = kv_slot(j->kv, t->blocks[p / bt], j->layer, 0, p % bt) +
				     (size_t)kvh * hd;

		scores[p] = dot_bf16(kp, qp, hd) * scale;
		if (scores[p] > max)
			max = scores[p];
	}
	for (unsigned p = 0; p <= t->pos; p++) {
		scores[p] = expf(scores[p] - max);
		sum += scores[p];
	}
	memset(acc, 0, hd * sizeof(float));
	for (unsigned p = 0; p <= t->pos; p++) {
		const uint16_t *vp = kv_slot(j->kv, t->blocks[p / bt], j->layer, 1, p % bt) +
				     (size_t)kvh * hd;
		float a = scores[p] / sum;
		v4f av = { a, a, a, a };

		for (unsigned i = 0; i < full; i += 8) {
			v4f ve, vo, e = load_f32x4(acc + i), o = load_f32x4(acc + i + 4);

			load_bf16x8(vp + i, &ve, &vo);
			e += av * ve;
			o += av * vo;
			memcpy(acc + i, &e, sizeof(e));
			memcpy(acc + i + 4, &o, sizeof(o));
		}
		for (unsigned i = full; i < hd; i++)
			acc[i] += a * bf16_to_f32(vp[i]);
	}
	for (unsigned i = 0; i < full; i += 8)
		for (unsigned k = 0; k < 4; k++) {
			out[i + 2 * k] = acc[i + k];
			out[i + 2 * k + 1] = acc[i + 4 + k];
		}
	for (unsigned i = full; i < hd; i++)
		out[i] = acc[i];
}

static size_t attn_scratch(const struct model_config *c, const struct model_opts *o)
{
	return 2 * (size_t)c->head_dim + o->max_ctx;
}

static void attn_part(void *arg, unsigned part, unsigned parts)
{
	const struct attn_job *j = arg;
	const struct cpu_model *cm = j->m->priv;
	unsigned heads = j->m->c.heads, p0, p1;
	float *ws = cm->scores + (size_t)part * attn_scratch(&j->m->c, &cm->o);

	range(j->n * heads, part, parts, &p0, &p1);
	for (unsigned p = p0; p < p1; p++)
		attn_one(j, p / heads, p % heads, ws);
}

static float *falloc(size_t n, int *r)
{
	float *p = calloc(n ? n : 1, sizeof(float));

	if (!p)
		*r = -ENOMEM;
	return p;
}

/* One loader for both sources: path, or file/file_size (cooperative mode). */
static int load(struct model *m, const char *path, const uint8_t *file, uint64_t file_size,
		const struct model_opts *o, char *err)
{
	struct model_config *c = &m->c;
	struct model_layout l = { 0 };
	struct cpu_model *cm;
	size_t B, half;
	int r = 0;

	memset(m, 0, sizeof(*m));
	if (!o->max_ctx || !o->max_batch || !o->max_outputs || !o->threads) {
		snprintf(err, MODEL_ERR_SIZE, "model options must be positive");
		return -EINVAL;
	}
	cm = calloc(1, sizeof(*cm));
	if (!cm) {
		snprintf(err, MODEL_ERR_SIZE, "out of memory");
		return -ENOMEM;
	}
	m->priv = cm;
	cm->o = *o;
	if (file && o->in_place) {
		r = model_parse_mem(file, file_size, path, c, &l, &cm->data_offset,
				    &m->weights_size, err);
		cm->file = file;
		/* read-only file pages: the model never writes its weights */
		cm->weights = (uint8_t *)(uintptr_t)(file + cm->data_offset);
	} else if (file) {
		r = model_read_mem(file, file_size, path, c, &l, &cm->weights, &m->weights_size,
				   &cm->data_offset, err);
		cm->file = file;
	} else {
		r = model_read_file(path, c, &l, &cm->weights, &m->weights_size, err);
	}
	if (r < 0)
		goto fail;

	cm->embed = (const uint16_t *)(cm->weights + l.embed);
	cm->final_norm = (const uint16_t *)(cm->weights + l.final_norm);
	cm->lm_head = (const uint16_t *)(cm->weights + l.lm_head);
	cm->layer = calloc(c->layers, sizeof(*cm->layer));
	if (!cm->layer) {
		r = -ENOMEM;
		goto fail_oom;
	}
	for (unsigned i = 0; i < c->layers; i++)
		for (unsigned w = 0; w < W_PER_LAYER; w++)
			cm->layer[i][w] = (const uint16_t *)(cm->weights + l.layer[i][w]);

	B = o->max_batch;
	half = c->head_dim / 2;
	cm->x = falloc(B * c->dim, &r);
	cm->xb = falloc(B * c->dim, &r);
	cm->q = falloc(B * c->dim, &r);
	cm->k = falloc(B * c->kv_dim, &r);
	cm->v = falloc(B * c->kv_dim, &r);
	cm->att = falloc(B * c->dim, &r);
	cm->hb = falloc(B * c->ffn, &r);
	cm->hb2 = falloc(B * c->ffn, &r);
	cm->xp = falloc(B * (c->dim > c->ffn ? c->dim : c->ffn), &r);
	cm->xo = falloc((size_t)o->max_outputs * c->dim, &r);
	cm->logits = falloc((size_t)o->max_outputs * c->vocab, &r);
	cm->scores = falloc((size_t)o->threads * attn_scratch(c, o), &r);
	cm->rope_cos = falloc((size_t)o->max_ctx * half, &r);
	cm->rope_sin = falloc((size_t)o->max_ctx * half, &r);
	if (r < 0)
		goto fail_oom;
	for (unsigned i = 0; i < half; i++) {
		float freq = powf(MODEL_ROPE_THETA, -(float)(2 * i) / (float)c->head_dim);

		for (unsigned p = 0; p < o->max_ctx; p++) {
			float a = (float)p * freq;

			cm->rope_cos[(size_t)p * half + i] = cosf(a);
			cm->rope_sin[(size_t)p * half + i] = sinf(a);
		}
	}
	if (o->threads > 1) {
		r = pool_new(o->threads, &cm->pool);
		if (r < 0) {
			snprintf(err, MODEL_ERR_SIZE, "cannot start %u threads: %s", o->threads,
				 strerror(-r));
			goto fail;
		}
	}
	model_layout_free(&l);
	return 0;

fail_oom:
	snprintf(err, MODEL_ERR_SIZE, "out of memory for the model's buffers");
fail:
	model_layout_free(&l);
	model_free(m);
	return r;
}

int model_load(struct model *m, const char *path, const struct model_opts *o, char *err)
{
	return load(m, path, NULL, 0, o, err);
}

int model_load_mem(struct model *m, const uint8_t *file, uint64_t file_size, const char *what,
		   const struct model_opts *o, char *err)
{
	return load(m, what, file, file_size, o, err);
}

int model_release_weights(struct model *m, char *err)
{
	struct cpu_model *cm = m->priv;

	if (!cm || !cm->file) {
		snprintf(err, MODEL_ERR_SIZE, "the weights were not loaded from a weights file");
		return -EINVAL;
	}
	if (cm->o.in_place)
		return 0;
	/* MADV_DONTNEED: the pages are gone, the range stays (reads give zeros) */
	if (madvise(cm->weights, m->weights_size ? m->weights_size : 1, MADV_DONTNEED) < 0) {
		int r = -errno;

		snprintf(err, MODEL_ERR_SIZE, "cannot release the weights: %s", strerror(-r));
		return r;
	}
	return 0;
}

int model_upload_weights(struct model *m, char *err)
{
	struct cpu_model *cm = m->priv;

	if (!cm || !cm->file) {
		snprintf(err, MODEL_ERR_SIZE, "the weights were not loaded from a weights file");
		return -EINVAL;
	}
	if (!cm->o.in_place)
		memcpy(cm->weights, cm->file + cm->data_offset, m->weights_size);
	return 0;
}

/* A host pool: kvmotion's library releases its free blocks (MADV_DONTNEED). */
int model_kv_release_free(struct model *m, const struct kv_pool *kv, uint64_t *ret_bytes,
			  char *err)
{
	(void)m, (void)kv, (void)err;
	*ret_bytes = 0;
	return 0;
}

int model_kv_restore(struct model *m, const struct kv_pool *kv, char *err)
{
	(void)m, (void)kv, (void)err;
	return 0;
}

void model_free(struct model *m)
{
	struct cpu_model *cm = m->priv;

	if (cm) {
		pool_free(cm->pool);
		if (cm->weights && !(cm->file && cm->o.in_place))
			munmap(cm->weights, m->weights_size ? m->weights_size : 1);
		free(cm->layer);
		free(cm->x);
		free(cm->xb);
		free(cm->q);
		free(cm->k);
		free(cm->v);
		free(cm->att);
		free(cm->hb);
		free(cm->hb2);
		free(cm->xp);
		free(cm->xo);
		free(cm->logits);
		free(cm->scores);
		free(cm->rope_cos);
		free(cm->rope_sin);
		free(cm);
	}
	memset(m, 0, sizeof(*m));
}

int model_kv_init(struct model *m, struct kv_pool *kv, char *err)
{
	if (!kv->data || kv->layers != m->c.layers || kv->kv_dim != m->c.kv_dim) {
		snprintf(err, MODEL_ERR_SIZE, "the KV pool does not fit the model");
		return -EINVAL;
	}
	return 0;
}

int model_kv_write(struct model *m, struct kv_pool *kv, uint32_t block, const uint16_t *src,
		   char *err)
{
	(void)m; /* the host pool holds the blocks */
	if (block >= kv->n_blocks) {
		snprintf(err, MODEL_ERR_SIZE, "KV block %u outside the pool", block);
		return -EINVAL;
	}
	memcpy(kv->data + (size_t)block * kv->block_stride, src, kv_block_bytes(kv));
	return 0;
}

static uint32_t argmax(const float *v, unsigned n)
{
	uint32_t best = 0;

	for (uint32_t i = 1; i < n; i++)
		if (v[i] > v[best])
			best = i;
	return best;
}

int model_forward(struct model *m, struct kv_pool *kv, struct model_tok *toks, unsigned n,
		  char *err)
{
	const struct model_config *c = &m->c;
	struct cpu_model *cm = m->priv;
	unsigned bt = kv->block_tokens, n_out = 0;
	struct matmul_job j;
	int r;

	r = model_check_batch(c, &cm->o, kv, toks, n, err);
	if (r < 0)
		return r;
	for (unsigned b = 0; b < n; b++)
		for (unsigned i = 0; i < c->dim; i++)
			cm->x[(size_t)b * c->dim + i] =
				bf16_to_f32(cm->embed[(size_t)toks[b].token * c->dim + i]);

	for (unsigned l = 0; l < c->layers; l++) {
		const uint16_t *const *w = cm->layer[l];
		struct attn_job aj = { .m = m, .kv = kv, .toks = toks, .n = n, .layer = l };

		/* a step abandoned half-way changes nothing that a rerun does not redo */
		if (cm->o.cancel && __atomic_load_n(cm->o.cancel, __ATOMIC_RELAXED)) {
			snprintf(err, MODEL_ERR_SIZE, "step cancelled at layer %u", l);
			return -ECANCELED;
		}

		for (unsigned b = 0; b < n; b++)
			rmsnorm(cm->xb + (size_t)b * c->dim, cm->x + (size_t)b * c->dim,
				w[W_IN_NORM], c->dim);
		job_init(&j, cm, cm->xb, n, c->dim);
		job_add(&j, cm->q, w[W_Q], c->dim);
		job_add(&j, cm->k, w[W_K], c->kv_dim);
		job_add(&j, cm->v, w[W_V], c->kv_dim);
		pool_run(cm->pool, matmul_part, &j);
		if (j.stopped)
			goto cancelled;

		/* Rotate, then store this layer's K and V of every token first. */
		for (unsigned b = 0; b < n; b++) {
			const struct model_tok *t = &toks[b];
			float *kb = cm->k + (size_t)b * c->kv_dim,
			      *vb = cm->v + (size_t)b * c->kv_dim;
			uint16_t *kd = kv_slot(kv, t->blocks[t->pos / bt], l, 0, t->pos % bt);
			uint16_t *vd = kv_slot(kv, t->blocks[t->pos / bt], l, 1, t->pos % bt);

			rope(cm, cm->q + (size_t)b * c->dim, c->heads, c->head_dim, t->pos);
			rope(cm, kb, c->kv_heads, c->head_dim, t->pos);
			for (unsigned i = 0; i < c->kv_dim; i++) {
				kd[i] = f32_to_bf16(kb[i]);
				vd[i] = f32_to_bf16(vb[i]);
			}
		}
		pool_run(cm->pool, attn_part, &aj);

		job_init(&j, cm, cm->att, n, c->dim);
		job_add(&j, cm->xb, w[W_O], c->dim);
		pool_run(cm->pool, matmul_part, &j);
		if (j.stopped)
			goto cancelled;
		for (size_t i = 0; i < (size_t)n * c->dim; i++)
			cm->x[i] += cm->xb[i];

		for (unsigned b = 0; b < n; b++)
			rmsnorm(cm->xb + (size_t)b * c->dim, cm->x + (size_t)b * c->dim,
				w[W_POST_NORM], c->dim);
		job_init(&j, cm, cm->xb, n, c->dim);
		job_add(&j, cm->hb, w[W_GATE], c->ffn);
		job_add(&j, cm->hb2, w[W_UP], c->ffn);
		pool_run(cm->pool, matmul_part, &j);
		if (j.stopped)
			goto cancelled;
		for (size_t i = 0; i < (size_t)n * c->ffn; i++) {
			float g = cm->hb[i];

			cm->hb[i] = g / (1.0f + expf(-g)) * cm->hb2[i];
		}
		job_init(&j, cm, cm->hb, n, c->ffn);
		job_add(&j, cm->xb, w[W_DOWN], c->dim);
		pool_run(cm->pool, matmul_part, &j);
		if (j.stopped)
			goto cancelled;
		for (size_t i = 0; i < (size_t)n * c->dim; i++)
			cm->x[i] += cm->xb[i];
	}
	if (cm->o.cancel && __atomic_load_n(cm->o.cancel, __ATOMIC_RELAXED)) {
		snprintf(err, MODEL_ERR_SIZE, "step cancelled before the lm_head");
		return -ECANCELED;
	}

	/* Final norm and lm_head only for the tokens that want a next token. */
	for (unsigned b = 0; b < n; b++)
		if (toks[b].want_next)
			rmsnorm(cm->xo + (size_t)n_out++ * c->dim, cm->x + (size_t)b * c->dim,
				cm->final_norm, c->dim);
	if (n_out) {
		job_init(&j, cm, cm->xo, n_out, c->dim);
		job_add(&j, cm->logits, cm->lm_head, c->vocab);
		pool_run(cm->pool, matmul_part, &j);
		if (j.stopped)
			goto cancelled;
	}
	n_out = 0;
	for (unsigned b = 0; b < n; b++)
		if (toks[b].want_next)
			toks[b].next = argmax(cm->logits + (size_t)n_out++ * c->vocab, c->vocab);
	return 0;

cancelled:
	snprintf(err, MODEL_ERR_SIZE, "step cancelled");
	return -ECANCELED;
}
