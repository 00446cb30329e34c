/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "model.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>


#define RMS_EPS 1e-5f
#define ROPE_THETA 10000.0f

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

/* out[rows] = W[rows][cols] x[cols]; W in bf16. */
static void matvec(float *restrict out, const uint16_t *restrict w, const float *restrict x,
		   unsigned rows, unsigned cols)
{
	for (unsigned r = 0; r < rows; r++) {
		const uint16_t *row = w + (size_t)r * cols;
		float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
		unsigned c = 0;

		for (; c + 4 <= cols; c += 4) {
			s0 += bf16_to_f32(row[c]) * x[c];
			s1 += bf16_to_f32(row[c + 1]) * x[c + 1];
			s2 += bf16_to_f32(row[c + 2]) * x[c + 2];
			s3 += bf16_to_f32(row[c + 3]) * x[c + 3];
		}
		for (; c < cols; c++)
			s0 += bf16_to_f32(row[c]) * x[c];
		out[r] = (s0 + s1) + (s2 + s3);
	}
}

static void rmsnorm(float *out, const float *x, const uint16_t *w, unsigned n)
{
	float ss = 0;

	for (unsigned i = 0; i < n; i++)
		ss += x[i] * x[i];
	ss = 1.0f / sqrtf(ss / (float)n + RMS_EPS);
	for (unsigned i = 0; i < n; i++)
		out[i] = x[i] * ss * bf16_to_f32(w[i]);
}

static void rope(float *v, unsigned n_heads, unsigned head_dim, unsigned pos)
{
	for (unsigned h = 0; h < n_heads; h++)
		for (unsigned i = 0; i < head_dim; i += 2) {
			float freq = powf(ROPE_THETA, -(float)i / (float)head_dim);
			float a = (float)pos * freq, c = cosf(a), s = sinf(a);
			float *p = v + h * head_dim + i;
			float x0 = p[0], x1 = p[1];

			p[0] = x0 * c - x1 * s;
			p[1] = x0 * s + x1 * c;
		}
}

static int want(const struct st_file *f, const char *name, uint64_t rows, uint64_t cols,
		const uint8_t *base, const uint16_t **ret, char *err)
{
	uint64_t off;
	int r = model_find_tensor(f, name, rows, cols, &off, err);

	if (r == 0)
		*ret = (const uint16_t *)(base + off);
	return r;
}

int model_load(struct model *m, const char *path, unsigned max_ctx, char *err)
{
	struct model_config *c = &m->c;
	struct st_file f;
	int fd, r;
	char name[128];

	memset(m, 0, sizeof(*m));
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		snprintf(err, 256, "cannot open %s: %s", path, strerror(errno));
		return -errno;
	}
	r = st_open(fd, &f, err);
	if (r < 0)
		goto out_close;
	r = model_read_config(&f, c, err);
	if (r < 0)
		goto out;
	m->weights_size = f.data_size;
	r = model_read_weights(fd, &f, &m->weights, err);
	if (r < 0)
		goto out;

	m->layer = calloc(c->layers, sizeof(*m->layer));
	if (!m->layer) {
		r = -ENOMEM;
		goto out;
	}
	if ((r = want(&f, "model.embed_tokens.weight", c->vocab, c->dim, m->weights, &m->embed, err)) < 0 ||
	    (r = want(&f, "model.norm.weight", c->dim, 0, m->weights, &m->final_norm, err)) < 0 ||
	    (r = want(&f, "lm_head.weight", c->vocab, c->dim, m->weights, &m->lm_head, err)) < 0)
		goto out;
	for (unsigned l = 0; l < c->layers; l++) {
		struct layer_weights *lw = &m->layer[l];
		const struct {
			const char *suffix;
			const uint16_t **dst;
			uint64_t rows, cols;
		} t[] = {
			{ "input_layernorm", &lw->in_norm, c->dim, 0 },
			{ "self_attn.q_proj", &lw->q, c->dim, c->dim },
			{ "self_attn.k_proj", &lw->k, c->kv_dim, c->dim },
			{ "self_attn.v_proj", &lw->v, c->kv_dim, c->dim },
			{ "self_attn.o_proj", &lw->o, c->dim, c->dim },
			{ "post_attention_layernorm", &lw->post_norm, c->dim, 0 },
			{ "mlp.gate_proj", &lw->gate, c->ffn, c->dim },
			{ "mlp.up_proj", &lw->up, c->ffn, c->dim },
			{ "mlp.down_proj", &lw->down, c->dim, c->ffn },
		};

		for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
			snprintf(name, sizeof(name), "model.layers.%u.%s.weight", l, t[i].suffix);
			r = want(&f, name, t[i].rows, t[i].cols, m->weights, t[i].dst, err);
			if (r < 0)
				goto out;
		}
	}

	m->max_ctx = max_ctx;
	m->x = calloc(c->dim, sizeof(float));
	m->xb = calloc(c->dim, sizeof(float));
	m->q = calloc(c->dim, sizeof(float));
	m->k = calloc(c->kv_dim, sizeof(float));
	m->v = calloc(c->kv_dim, sizeof(float));
	m->att_out = calloc(c->dim, sizeof(float));
	m->hb = calloc(c->ffn, sizeof(float));
	m->hb2 = calloc(c->ffn, sizeof(float));
	m->logits = calloc(c->vocab, sizeof(float));
	m->scores = calloc(max_ctx, sizeof(float));
	if (!m->x || !m->xb || !m->q || !m->k || !m->v || !m->att_out || !m->hb || !m->hb2 ||
	    !m->logits || !m->scores)
		r = -ENOMEM;
out:
	st_free(&f);
out_close:
	close(fd);
	if (r < 0)
		model_free(m);
	return r;
}

void model_free(struct model *m)
{
	if (m->weights)
		munmap(m->weights, m->weights_size);
	free(m->layer);
	free(m->x);
	free(m->xb);
	free(m->q);
	free(m->k);
	free(m->v);
	free(m->att_out);
	free(m->hb);
	free(m->hb2);
	free(m->logits);
	free(m->scores);
	memset(m, 0, sizeof(*m));
}

uint32_t model_step(struct model *m, struct kv_pool *kv, const uint32_t *blocks, uint32_t token,
		    unsigned pos)
{
	const struct model_config *c = &m->c;
	unsigned group = c->heads / c->kv_heads, bt = kv->block_tokens;
	float scale = 1.0f / sqrtf((float)c->head_dim);
	uint32_t best = 0;

	for (unsigned i = 0; i < c->dim; i++)
		m->x[i] = bf16_to_f32(m->embed[(size_t)token * c->dim + i]);

	for (unsigned l = 0; l < c->layers; l++) {
		const struct layer_weights *lw = &m->layer[l];
		uint16_t *kd = kv_slot(kv, blocks[pos / bt], l, 0, pos % bt);
		uint16_t *vd = kv_slot(kv, blocks[pos / bt], l, 1, pos % bt);

		rmsnorm(m->xb, m->x, lw->in_norm, c->dim);
		matvec(m->q, lw->q, m->xb, c->dim, c->dim);
		matvec(m->k, lw->k, m->xb, c->kv_dim, c->dim);
		matvec(m->v, lw->v, m->xb, c->kv_dim, c->dim);
		rope(m->q, c->heads, c->head_dim, pos);
		rope(m->k, c->kv_heads, c->head_dim, pos);
		for (unsigned i = 0; i < c->kv_dim; i++) {
			kd[i] = f32_to_bf16(m->k[i]);
			vd[i] = f32_to_bf16(m->v[i]);
		}

		for (unsigned h = 0; h < c->heads; h++) {
			const float *qh = m->q + h * c->head_dim;
			unsigned kvh = h / group;
			float max = -INFINITY, sum = 0;
			float *out = m->att_out + h * c->head_dim;

			for (unsigned t = 0; t <= pos; t++) {
				const uint16_t *kt = kv_slot(kv, blocks[t / bt], l, 0, t % bt) +
						     kvh * c->head_dim;
				float s = 0;

				for (unsigned i = 0; i < c->head_dim; i++)
					s += qh[i] * bf16_to_f32(kt[i]);
				m->scores[t] = s * scale;
				if (m->scores[t] > max)
					max = m->scores[t];
			}
			for (unsigned t = 0; t <= pos; t++) {
				m->scores[t] = expf(m->scores[t] - max);
				sum += m->scores[t];
			}
			memset(out, 0, c->head_dim * sizeof(float));
			for (unsigned t = 0; t <= pos; t++) {
				const uint16_t *vt = kv_slot(kv, blocks[t / bt], l, 1, t % bt) +
						     kvh * c->head_dim;
				float a = m->scores[t] / sum;

				for (unsigned i = 0; i < c->head_dim; i++)
					out[i] += a * bf16_to_f32(vt[i]);
			}
		}
		matvec(m->xb, lw->o, m->att_out, c->dim, c->dim);
		for (unsigned i = 0; i < c->dim; i++)
			m->x[i] += m->xb[i];

		rmsnorm(m->xb, m->x, lw->post_norm, c->dim);
		matvec(m->hb, lw->gate, m->xb, c->ffn, c->dim);
		matvec(m->hb2, lw->up, m->xb, c->ffn, c->dim);
		for (unsigned i = 0; i < c->ffn; i++) {
			float g = m->hb[i];

			m->hb[i] = g / (1.0f + expf(-g)) * m->hb2[i];
		}
		matvec(m->xb, lw->down, m->hb, c->dim, c->ffn);
		for (unsigned i = 0; i < c->dim; i++)
			m->x[i] += m->xb[i];
	}

	rmsnorm(m->xb, m->x, m->final_norm, c->dim);
	matvec(m->logits, m->lm_head, m->xb, c->vocab, c->dim);
	for (uint32_t i = 1; i < c->vocab; i++)
		if (m->logits[i] > m->logits[best])
			best = i;
	return best;
}
