// SPDX-License-Identifier: LGPL-2.1-or-later
/*
 * The CUDA build of the test engine's model (see model.h): the same
 * computation as model.c with the weights and the paged KV cache in device
 * memory, so that the CUDA driver's checkpoint captures them. The weights are
 * read into anonymous host memory (model_common.c), uploaded with cudaMemcpy
 * and the host copy freed: GPU memory is the only copy. Kernels: bf16 matrix-
 * vector products (fp32 accumulation), RMSNorm, RoPE (tables computed on the
 * host as in model.c), attention over the paged KV pool, SwiGLU, argmax.
 *
 * Every reduction has a fixed order (per-thread strided partial sums, then a
 * fixed tree), and no atomics are used, so greedy decoding is deterministic
 * run to run. Its tokens need not equal the CPU build's.
 *
 * The tokens of a batch run one after the other, in batch order (a later
 * token of a sequence needs the earlier one's K and V); a token's result does
 * not depend on the rest of its batch.
 */
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "model.h"

#define THREADS 256

struct gpu_state {
	struct model_opts o;
	uint8_t *weights; /* device */
	const uint16_t *embed, *final_norm, *lm_head;
	const uint16_t *(*layer)[W_PER_LAYER]; /* host array of device pointers */
	uint16_t *kv;			       /* device: n_blocks * block_elems */
	size_t kv_elems;
	float *rope_cos, *rope_sin; /* device: [max_ctx][head_dim / 2] */
	uint32_t *blocks;	    /* device copy of a block table */
	float *x, *xb, *q, *k, *v, *att, *hb, *hb2, *logits, *scores;
	uint32_t *best; /* device */
};

__device__ static inline float bf16f(uint16_t h)
{
	return __uint_as_float((uint32_t)h << 16);
}

__device__ static inline uint16_t f32bf16(float f)
{
	uint32_t u = __float_as_uint(f);

	if ((u & 0x7fffffff) > 0x7f800000)
		return (uint16_t)((u >> 16) | 0x40);
	return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* Block-wide sum in a fixed order (the callers' strided partials, then a tree). */
__device__ static float block_sum(float v, float *sh)
{
	sh[threadIdx.x] = v;
	__syncthreads();
	for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
		if (threadIdx.x < s)
			sh[threadIdx.x] += sh[threadIdx.x + s];
		__syncthreads();
	}
	v = sh[0];
	__syncthreads();
	return v;
}

/* out[row] = W[row] . x: one block per row. */
__global__ void k_matvec(float *out, const uint16_t *w, const float *x, unsigned cols)
{
	__shared__ float sh[THREADS];
	const uint16_t *row = w + (size_t)blockIdx.x * cols;
	float s = 0;

	for (unsigned c = threadIdx.x; c < cols; c += blockDim.x)
		s += bf16f(row[c]) * x[c];
	s = block_sum(s, sh);
	if (threadIdx.x == 0)
		out[blockIdx.x] = s;
}

__global__ void k_rmsnorm(float *out, const float *x, const uint16_t *w, unsigned n)
{
	__shared__ float sh[THREADS];
	float ss = 0;

	for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
		ss += x[i] * x[i];
	ss = rsqrtf(block_sum(ss, sh) / (float)n + MODEL_RMS_EPS);
	for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
		out[i] = x[i] * ss * bf16f(w[i]);
}

__global__ void k_embed(float *x, const uint16_t *embed, uint32_t token, unsigned dim)
{
	for (unsigned i = threadIdx.x; i < dim; i += blockDim.x)
		x[i] = bf16f(embed[(size_t)token * dim + i]);
}

/* cs, sn: the tables' row for this position (head_dim / 2 values). */
__global__ void k_rope(float *v, unsigned n_heads, unsigned head_dim, const float *cs,
		       const float *sn)
{
	unsigned half = head_dim / 2;

	for (unsigned j = threadIdx.x; j < n_heads * half; j += blockDim.x) {
		unsigned h = j / half, i = j % half;
		float *p = v + h * head_dim + 2 * i, x0 = p[0], x1 = p[1];

		p[0] = x0 * cs[i] - x1 * sn[i];
		p[1] = x0 * sn[i] + x1 * cs[i];
	}
}

__device__ static inline uint16_t *slot(uint16_t *kv, size_t block_elems, unsigned bt,
					unsigned kv_dim, uint32_t block, unsigned layer,
					unsigned which, unsigned s)
{
	return kv + block * block_elems + ((size_t)(layer * 2 + which) * bt + s) * kv_dim;
}

__global__ void k_store_kv(uint16_t *kv, size_t block_elems, unsigned bt, unsigned kv_dim,
			   const uint32_t *blocks, unsigned layer, unsigned pos, const float *k,
			   const float *v)
{
	uint16_t *kd = slot(kv, block_elems, bt, kv_dim, blocks[pos / bt], layer, 0, pos % bt);
	uint16_t *vd = slot(kv, block_elems, bt, kv_dim, blocks[pos / bt], layer, 1, pos % bt);

	for (unsigned i = threadIdx.x; i < kv_dim; i += blockDim.x) {
		kd[i] = f32bf16(k[i]);
		vd[i] = f32bf16(v[i]);
	}
}

/* One block per head: scores, softmax, weighted sum of V. */
__global__ void k_attention(float *out, const float *q, const uint16_t *kv, size_t block_elems,
			    unsigned bt, unsigned kv_dim, unsigned head_dim, unsigned group,
			    const uint32_t *blocks, unsigned layer, unsigned pos, float *scores_all,
			    unsigned max_ctx)
{
	__shared__ float sh[THREADS];
	unsigned h = blockIdx.x, kvh = h / group;
	const float *qh = q + h * head_dim;
	float *scores = scores_all + (size_t)h * max_ctx;
	float scale = rsqrtf((float)head_dim), max = -INFINITY, sum = 0;

	for (unsigned t = 0; t <= pos; t++) {
		const uint16_t *kt = slot((uint16_t *)kv, block_elems, bt, kv_dim, blocks[t / bt],
					  layer, 0, t % bt) + kvh * head_dim;
		float s = 0;

		for (unsigned i = threadIdx.x; i < head_dim; i += blockDim.x)
			s += qh[i] * bf16f(kt[i]);
		s = block_sum(s, sh) * scale;
		if (threadIdx.x == 0)
			scores[t] = s;
		max = fmaxf(max, s);
	}
	__syncthreads();
	/* every thread sums in the same order: the same sum everywhere */
	for (unsigned t = 0; t <= pos; t++)
		sum += expf(scores[t] - max);
	for (unsigned i = threadIdx.x; i < head_dim; i += blockDim.x) {
		float acc = 0;

		for (unsigned t = 0; t <= pos; t++) {
			const uint16_t *vt = slot((uint16_t *)kv, block_elems, bt, kv_dim,
						  blocks[t / bt], layer, 1, t % bt) +
					     kvh * head_dim;

			acc += expf(scores[t] - max) / sum * bf16f(vt[i]);
		}
		out[h * head_dim + i] = acc;
	}
}

__global__ void k_add(float *x, const float *y, unsigned n)
{
	for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
		x[i] += y[i];
}

__global__ void k_swiglu(float *g, const float *u, unsigned n)
{
	for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
		g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Greedy: the highest logit, the lowest id on ties, in one block. */
__global__ void k_argmax(uint32_t *best, const float *logits, unsigned n)
{
	__shared__ float sv[THREADS];
	__shared__ uint32_t si[THREADS];
	float bv = -INFINITY;
	uint32_t bi = 0;

	for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
		if (logits[i] > bv) {
			bv = logits[i];
			bi = i;
		}
	sv[threadIdx.x] = bv;
	si[threadIdx.x] = bi;
	__syncthreads();
	for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
		unsigned a = threadIdx.x, b = threadIdx.x + s;

		if (a < s && (sv[b] > sv[a] || (sv[b] == sv[a] && si[b] < si[a]))) {
			sv[a] = sv[b];
			si[a] = si[b];
		}
		__syncthreads();
	}
	if (threadIdx.x == 0)
		*best = si[0];
}

static int cuda_fail(cudaError_t e, const char *what, char *err)
{
	snprintf(err, MODEL_ERR_SIZE, "%s: %s (%s)", what, cudaGetErrorName(e),
		 cudaGetErrorString(e));
	return -EIO;
}

#define CK(call, what)                                                                             \
	do {                                                                                       \
		cudaError_t _e = (call);                                                           \
		if (_e != cudaSuccess) {                                                           \
			r = cuda_fail(_e, what, err);                                              \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

template <typename T> static cudaError_t dev_alloc(T **p, size_t n)
{
	return cudaMalloc((void **)p, (n ? n : 1) * sizeof(T));
}

extern "C" int model_load(struct model *m, const char *path, const struct model_opts *o,
			  char *err)
{
	struct model_config *c = &m->c;
	struct model_layout l = {};
	struct gpu_state *g;
	uint8_t *host = NULL;
	float *tab = NULL;
	size_t half;
	int r = 0;

	memset(m, 0, sizeof(*m));
	if (!o->max_ctx || !o->max_batch || !o->max_outputs) {
		snprintf(err, MODEL_ERR_SIZE, "model options must be positive");
		return -EINVAL;
	}
	g = (struct gpu_state *)calloc(1, sizeof(*g));
	if (!g) {
		snprintf(err, MODEL_ERR_SIZE, "out of memory");
		return -ENOMEM;
	}
	m->priv = g;
	m->kv_on_device = true;
	g->o = *o;
	r = model_read_file(path, c, &l, &host, &m->weights_size, err);
	if (r < 0)
		goto out;

	/* Upload and free the host copy: the GPU copy is the one. */
	CK(dev_alloc(&g->weights, m->weights_size), "cudaMalloc(weights)");
	CK(cudaMemcpy(g->weights, host, m->weights_size, cudaMemcpyHostToDevice),
	   "cudaMemcpy(weights)");
	g->embed = (const uint16_t *)(g->weights + l.embed);
	g->final_norm = (const uint16_t *)(g->weights + l.final_norm);
	g->lm_head = (const uint16_t *)(g->weights + l.lm_head);
	g->layer = (const uint16_t *(*)[W_PER_LAYER])calloc(c->layers, sizeof(*g->layer));
	if (!g->layer) {
		snprintf(err, MODEL_ERR_SIZE, "out of memory");
		r = -ENOMEM;
		goto out;
	}
	for (unsigned i = 0; i < c->layers; i++)
		for (unsigned w = 0; w < W_PER_LAYER; w++)
			g->layer[i][w] = (const uint16_t *)(g->weights + l.layer[i][w]);

	/* RoPE tables computed as model.c does, then uploaded. */
	half = c->head_dim / 2;
	tab = (float *)malloc(2 * (size_t)o->max_ctx * half * sizeof(float));
	if (!tab) {
		snprintf(err, MODEL_ERR_SIZE, "out of memory");
		r = -ENOMEM;
		goto out;
	}
	for (unsigned i = 0; i < half; i++) {
		float freq = powf(MODEL_ROPE_THETA, -(float)(2 * i) / (float)c->head_dim);

		for (unsigned p = 0; p < o->max_ctx; p++) {
			float a = (float)p * freq;

			tab[(size_t)p * half + i] = cosf(a);
			tab[((size_t)o->max_ctx + p) * half + i] = sinf(a);
		}
	}
	CK(dev_alloc(&g->rope_cos, (size_t)o->max_ctx * half), "cudaMalloc(rope)");
	CK(dev_alloc(&g->rope_sin, (size_t)o->max_ctx * half), "cudaMalloc(rope)");
	CK(cudaMemcpy(g->rope_cos, tab, (size_t)o->max_ctx * half * sizeof(float),
		      cudaMemcpyHostToDevice), "cudaMemcpy(rope)");
	CK(cudaMemcpy(g->rope_sin, tab + (size_t)o->max_ctx * half,
		      (size_t)o->max_ctx * half * sizeof(float), cudaMemcpyHostToDevice),
	   "cudaMemcpy(rope)");

	CK(dev_alloc(&g->x, c->dim), "cudaMalloc(activations)");
	CK(dev_alloc(&g->xb, c->dim), "cudaMalloc(activations)");
	CK(dev_alloc(&g->q, c->dim), "cudaMalloc(activations)");
	CK(dev_alloc(&g->k, c->kv_dim), "cudaMalloc(activations)");
	CK(dev_alloc(&g->v, c->kv_dim), "cudaMalloc(activations)");
	CK(dev_alloc(&g->att, c->dim), "cudaMalloc(activations)");
	CK(dev_alloc(&g->hb, c->ffn), "cudaMalloc(activations)");
	CK(dev_alloc(&g->hb2, c->ffn), "cudaMalloc(activations)");
	CK(dev_alloc(&g->logits, c->vocab), "cudaMalloc(logits)");
	CK(dev_alloc(&g->scores, (size_t)c->heads * o->max_ctx), "cudaMalloc(scores)");
	CK(dev_alloc(&g->blocks, o->max_ctx), "cudaMalloc(block table)");
	CK(dev_alloc(&g->best, 1), "cudaMalloc");
out:
	free(tab);
	if (host)
		munmap(host, m->weights_size ? m->weights_size : 1);
	model_layout_free(&l);
	if (r < 0)
		model_free(m);
	return r;
}

/*
 * Cooperative mode needs the weights in VMM allocations (cuMemCreate +
 * cuMemMap) so that they can be released keeping their addresses; this
 * build allocates them with cudaMalloc, so it refuses the mode by name.
 */
extern "C" int model_load_mem(struct model *m, const uint8_t *file, uint64_t file_size,
			      const char *what, const struct model_opts *o, char *err)
{
	(void)m, (void)file, (void)file_size, (void)o;
	snprintf(err, MODEL_ERR_SIZE,
		 "%s: cooperative mode is not available in the CUDA build (its weights are "
		 "cudaMalloc'd, not VMM allocations that can be released in place)",
		 what);
	return -ENOTSUP;
}

extern "C" int model_release_weights(struct model *m, char *err)
{
	(void)m;
	snprintf(err, MODEL_ERR_SIZE, "cooperative mode is not available in the CUDA build");
	return -ENOTSUP;
}

extern "C" int model_upload_weights(struct model *m, char *err)
{
	(void)m;
	snprintf(err, MODEL_ERR_SIZE, "cooperative mode is not available in the CUDA build");
	return -ENOTSUP;
}

extern "C" void model_free(struct model *m)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;

	if (g) {
		cudaFree(g->weights);
		cudaFree(g->kv);
		cudaFree(g->rope_cos);
		cudaFree(g->rope_sin);
		cudaFree(g->x);
		cudaFree(g->xb);
		cudaFree(g->q);
		cudaFree(g->k);
		cudaFree(g->v);
		cudaFree(g->att);
		cudaFree(g->hb);
		cudaFree(g->hb2);
		cudaFree(g->logits);
		cudaFree(g->scores);
		cudaFree(g->blocks);
		cudaFree(g->best);
		free(g->layer);
		free(g);
	}
	memset(m, 0, sizeof(*m));
}

extern "C" int model_kv_init(struct model *m, struct kv_pool *kv, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	int r = 0;

	if (kv->data || kv->layers != m->c.layers || kv->kv_dim != m->c.kv_dim || g->kv) {
		snprintf(err, MODEL_ERR_SIZE, "the KV pool does not fit the model");
		return -EINVAL;
	}
	g->kv_elems = (size_t)kv->n_blocks * kv->block_elems;
	CK(dev_alloc(&g->kv, g->kv_elems), "cudaMalloc(KV pool)");
out:
	return r;
}

extern "C" int model_kv_write(struct model *m, struct kv_pool *kv, uint32_t block,
			      const uint16_t *src, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	int r = 0;

	if (block >= kv->n_blocks || !g->kv) {
		snprintf(err, MODEL_ERR_SIZE, "KV block %u outside the pool", block);
		return -EINVAL;
	}
	CK(cudaMemcpy(g->kv + (size_t)block * kv->block_elems, src, kv_block_bytes(kv),
		      cudaMemcpyHostToDevice), "cudaMemcpy(KV block)");
out:
	return r;
}

static int forward_one(struct model *m, struct kv_pool *kv, struct model_tok *t, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	const struct model_config *c = &m->c;
	unsigned bt = kv->block_tokens, half = c->head_dim / 2;
	const float *cs = g->rope_cos + (size_t)t->pos * half;
	const float *sn = g->rope_sin + (size_t)t->pos * half;
	int r = 0;

	CK(cudaMemcpy(g->blocks, t->blocks, (t->pos / bt + 1) * sizeof(uint32_t),
		      cudaMemcpyHostToDevice), "cudaMemcpy(block table)");
	k_embed<<<1, THREADS>>>(g->x, g->embed, t->token, c->dim);
	for (unsigned l = 0; l < c->layers; l++) {
		const uint16_t *const *w = g->layer[l];

		k_rmsnorm<<<1, THREADS>>>(g->xb, g->x, w[W_IN_NORM], c->dim);
		k_matvec<<<c->dim, THREADS>>>(g->q, w[W_Q], g->xb, c->dim);
		k_matvec<<<c->kv_dim, THREADS>>>(g->k, w[W_K], g->xb, c->dim);
		k_matvec<<<c->kv_dim, THREADS>>>(g->v, w[W_V], g->xb, c->dim);
		k_rope<<<1, THREADS>>>(g->q, c->heads, c->head_dim, cs, sn);
		k_rope<<<1, THREADS>>>(g->k, c->kv_heads, c->head_dim, cs, sn);
		k_store_kv<<<1, THREADS>>>(g->kv, kv->block_elems, bt, c->kv_dim, g->blocks, l,
					   t->pos, g->k, g->v);
		k_attention<<<c->heads, THREADS>>>(g->att, g->q, g->kv, kv->block_elems, bt,
						   c->kv_dim, c->head_dim, c->heads / c->kv_heads,
						   g->blocks, l, t->pos, g->scores, g->o.max_ctx);
		k_matvec<<<c->dim, THREADS>>>(g->xb, w[W_O], g->att, c->dim);
		k_add<<<8, THREADS>>>(g->x, g->xb, c->dim);
		k_rmsnorm<<<1, THREADS>>>(g->xb, g->x, w[W_POST_NORM], c->dim);
		k_matvec<<<c->ffn, THREADS>>>(g->hb, w[W_GATE], g->xb, c->dim);
		k_matvec<<<c->ffn, THREADS>>>(g->hb2, w[W_UP], g->xb, c->dim);
		k_swiglu<<<8, THREADS>>>(g->hb, g->hb2, c->ffn);
		k_matvec<<<c->dim, THREADS>>>(g->xb, w[W_DOWN], g->hb, c->ffn);
		k_add<<<8, THREADS>>>(g->x, g->xb, c->dim);
	}
	CK(cudaGetLastError(), "kernel launch");
	if (t->want_next) {
		k_rmsnorm<<<1, THREADS>>>(g->xb, g->x, g->final_norm, c->dim);
		k_matvec<<<c->vocab, THREADS>>>(g->logits, g->lm_head, g->xb, c->dim);
		k_argmax<<<1, THREADS>>>(g->best, g->logits, c->vocab);
		CK(cudaGetLastError(), "kernel launch");
		CK(cudaMemcpy(&t->next, g->best, sizeof(t->next), cudaMemcpyDeviceToHost),
		   "cudaMemcpy(next token)");
	}
out:
	return r;
}

extern "C" int model_forward(struct model *m, struct kv_pool *kv, struct model_tok *toks,
			     unsigned n, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	int r = model_check_batch(&m->c, &g->o, kv, toks, n, err);

	for (unsigned i = 0; r == 0 && i < n; i++)
		r = forward_one(m, kv, &toks[i], err);
	if (r == 0) {
		cudaError_t e = cudaDeviceSynchronize();

		if (e != cudaSuccess)
			r = cuda_fail(e, "cudaDeviceSynchronize", err);
	}
	return r;
}
