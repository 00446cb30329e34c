// SPDX-License-Identifier: LGPL-2.1-or-later
/*
 * The CUDA build of the test engine's model (see model.h): the same
 * computation as model.c with the weights and the paged KV cache in device
 * memory, so that the CUDA driver's checkpoint captures them. The weights are
 * read into anonymous host memory, uploaded with cudaMemcpy and the host copy
 * freed. Kernels use a fixed reduction order, so greedy decoding is
 * deterministic run to run (its tokens need not equal the CPU build's).
 */
#include <cuda_runtime.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "model.h"

#define THREADS 256
#define RMS_EPS 1e-5f
#define ROPE_THETA 10000.0f

struct gpu_layer {
	const uint16_t *in_norm, *q, *k, *v, *o, *post_norm, *gate, *up, *down;
};

struct gpu_state {
	uint8_t *weights; /* device */
	const uint16_t *embed, *final_norm, *lm_head;
	struct gpu_layer *layer; /* host array of device pointers */
	uint16_t *kv;		 /* device: n_blocks * block_elems */
	size_t kv_blocks;
	uint32_t *blocks; /* device copy of a block table */
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

/* Block-wide sum in a fixed order (strided partials, then a tree). */
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
	ss = rsqrtf(block_sum(ss, sh) / (float)n + RMS_EPS);
	for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
		out[i] = x[i] * ss * bf16f(w[i]);
}

__global__ void k_embed(float *x, const uint16_t *embed, uint32_t token, unsigned dim)
{
	for (unsigned i = threadIdx.x; i < dim; i += blockDim.x)
		x[i] = bf16f(embed[(size_t)token * dim + i]);
}

__global__ void k_rope(float *v, unsigned n_heads, unsigned head_dim, unsigned pos)
{
	for (unsigned j = threadIdx.x; j < n_heads * head_dim / 2; j += blockDim.x) {
		unsigned h = j / (head_dim / 2), i = (j % (head_dim / 2)) * 2;
		float freq = powf(ROPE_THETA, -(float)i / (float)head_dim);
		float a = (float)pos * freq, c = cosf(a), s = sinf(a);
		float *p = v + h * head_dim + i, x0 = p[0], x1 = p[1];

		p[0] = x0 * c - x1 * s;
		p[1] = x0 * s + x1 * c;
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
	for (unsigned t = 0; t <= pos; t++)
		sum += expf(scores[t] - max);
	for (unsigned i = threadIdx.x; i < head_dim; i += blockDim.x) {
		float acc = 0;

		for (unsigned t = 0; t <= pos; t++) {
			const uint16_t *vt = slot((uint16_t *)kv, block_elems, bt, kv_dim,
						  blocks[t / bt], layer, 1, t % bt) + kvh * head_dim;

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
		if (threadIdx.x < s &&
		    (sv[threadIdx.x + s] > sv[threadIdx.x] ||
		     (sv[threadIdx.x + s] == sv[threadIdx.x] && si[threadIdx.x + s] < si[threadIdx.x]))) {
			sv[threadIdx.x] = sv[threadIdx.x + s];
			si[threadIdx.x] = si[threadIdx.x + s];
		}
		__syncthreads();
	}
	if (threadIdx.x == 0)
		*best = si[0];
}

static int cuda_fail(cudaError_t e, const char *what, char *err)
{
	snprintf(err, 256, "%s: %s", what, cudaGetErrorName(e));
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

static const uint16_t *dev_tensor(const struct st_file *f, const char *name, uint8_t *dev,
				  uint64_t rows, uint64_t cols, char *err)
{
	uint64_t off;

	if (model_find_tensor(f, name, rows, cols, &off, err) < 0)
		return NULL;
	return (const uint16_t *)(dev + off);
}

extern "C" int model_load(struct model *m, const char *path, unsigned max_ctx, char *err)
{
	struct model_config *c = &m->c;
	struct gpu_state *g;
	struct st_file f;
	uint8_t *host = NULL;
	int fd, r = 0;

	memset(m, 0, sizeof(*m));
	g = (struct gpu_state *)calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	m->gpu = g;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		snprintf(err, 256, "cannot open %s: %s", path, strerror(errno));
		free(g);
		m->gpu = NULL;
		return -errno;
	}
	r = st_open(fd, &f, err);
	if (r < 0) {
		close(fd);
		free(g);
		m->gpu = NULL;
		return r;
	}
	r = model_read_config(&f, c, err);
	if (r < 0)
		goto out;
	m->weights_size = f.data_size;
	m->max_ctx = max_ctx;

	/* Read into anonymous memory, upload, free: the GPU copy is the one. */
	r = model_read_weights(fd, &f, &host, err);
	if (r < 0)
		goto out;
	CK(cudaMalloc(&g->weights, f.data_size), "cudaMalloc(weights)");
	CK(cudaMemcpy(g->weights, host, f.data_size, cudaMemcpyHostToDevice), "cudaMemcpy(weights)");

	g->layer = (struct gpu_layer *)calloc(c->layers, sizeof(*g->layer));
	if (!g->layer) {
		r = -ENOMEM;
		goto out;
	}
	{
		uint64_t d = c->dim, kvd = c->kv_dim, ffn = c->ffn, v = c->vocab;
		char name[128];

		if (!(g->embed = dev_tensor(&f, "model.embed_tokens.weight", g->weights, v, d, err)) ||
		    !(g->final_norm = dev_tensor(&f, "model.norm.weight", g->weights, d, 0, err)) ||
		    !(g->lm_head = dev_tensor(&f, "lm_head.weight", g->weights, v, d, err))) {
			r = -EBADMSG;
			goto out;
		}
		for (unsigned l = 0; l < c->layers; l++) {
			struct gpu_layer *lw = &g->layer[l];
			const struct {
				const char *suffix;
				const uint16_t **dst;
				uint64_t rows, cols;
			} t[] = {
				{ "input_layernorm", &lw->in_norm, d, 0 },
				{ "self_attn.q_proj", &lw->q, d, d },
				{ "self_attn.k_proj", &lw->k, kvd, d },
				{ "self_attn.v_proj", &lw->v, kvd, d },
				{ "self_attn.o_proj", &lw->o, d, d },
				{ "post_attention_layernorm", &lw->post_norm, d, 0 },
				{ "mlp.gate_proj", &lw->gate, ffn, d },
				{ "mlp.up_proj", &lw->up, ffn, d },
				{ "mlp.down_proj", &lw->down, d, ffn },
			};

			for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
				snprintf(name, sizeof(name), "model.layers.%u.%s.weight", l, t[i].suffix);
				*t[i].dst = dev_tensor(&f, name, g->weights, t[i].rows, t[i].cols, err);
				if (!*t[i].dst) {
					r = -EBADMSG;
					goto out;
				}
			}
		}
	}
	CK(cudaMalloc(&g->x, c->dim * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->xb, c->dim * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->q, c->dim * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->k, c->kv_dim * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->v, c->kv_dim * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->att, c->dim * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->hb, c->ffn * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->hb2, c->ffn * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->logits, c->vocab * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->scores, (size_t)c->heads * max_ctx * sizeof(float)), "cudaMalloc");
	CK(cudaMalloc(&g->blocks, max_ctx * sizeof(uint32_t)), "cudaMalloc");
	CK(cudaMalloc(&g->best, sizeof(uint32_t)), "cudaMalloc");
out:
	if (host)
		munmap(host, f.data_size);
	st_free(&f);
	close(fd);
	if (r < 0)
		model_free(m);
	return r;
}

extern "C" void model_free(struct model *m)
{
	struct gpu_state *g = (struct gpu_state *)m->gpu;

	if (g) {
		cudaFree(g->weights);
		cudaFree(g->kv);
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

extern "C" uint32_t model_step(struct model *m, struct kv_pool *kv, const uint32_t *blocks,
			       uint32_t token, unsigned pos)
{
	struct gpu_state *g = (struct gpu_state *)m->gpu;
	const struct model_config *c = &m->c;
	unsigned bt = kv->block_tokens, n_blocks = pos / bt + 1;
	uint32_t best = 0;

	/* The KV pool lives on the device; the host pool only allocates block ids. */
	if (!g->kv) {
		g->kv_blocks = kv->n_blocks;
		if (cudaMalloc(&g->kv, g->kv_blocks * kv->block_elems * sizeof(uint16_t)) != cudaSuccess) {
			fprintf(stderr, "engine-cuda: cannot allocate the KV pool on the device\n");
			exit(1);
		}
	}
	cudaMemcpy(g->blocks, blocks, n_blocks * sizeof(uint32_t), cudaMemcpyHostToDevice);
	k_embed<<<1, THREADS>>>(g->x, g->embed, token, c->dim);
	for (unsigned l = 0; l < c->layers; l++) {
		const struct gpu_layer *lw = &g->layer[l];

		k_rmsnorm<<<1, THREADS>>>(g->xb, g->x, lw->in_norm, c->dim);
		k_matvec<<<c->dim, THREADS>>>(g->q, lw->q, g->xb, c->dim);
		k_matvec<<<c->kv_dim, THREADS>>>(g->k, lw->k, g->xb, c->dim);
		k_matvec<<<c->kv_dim, THREADS>>>(g->v, lw->v, g->xb, c->dim);
		k_rope<<<1, THREADS>>>(g->q, c->heads, c->head_dim, pos);
		k_rope<<<1, THREADS>>>(g->k, c->kv_heads, c->head_dim, pos);
		k_store_kv<<<1, THREADS>>>(g->kv, kv->block_elems, bt, c->kv_dim, g->blocks, l, pos,
					   g->k, g->v);
		k_attention<<<c->heads, THREADS>>>(g->att, g->q, g->kv, kv->block_elems, bt, c->kv_dim,
						   c->head_dim, c->heads / c->kv_heads, g->blocks, l,
						   pos, g->scores, m->max_ctx);
		k_matvec<<<c->dim, THREADS>>>(g->xb, lw->o, g->att, c->dim);
		k_add<<<8, THREADS>>>(g->x, g->xb, c->dim);
		k_rmsnorm<<<1, THREADS>>>(g->xb, g->x, lw->post_norm, c->dim);
		k_matvec<<<c->ffn, THREADS>>>(g->hb, lw->gate, g->xb, c->dim);
		k_matvec<<<c->ffn, THREADS>>>(g->hb2, lw->up, g->xb, c->dim);
		k_swiglu<<<8, THREADS>>>(g->hb, g->hb2, c->ffn);
		k_matvec<<<c->dim, THREADS>>>(g->xb, lw->down, g->hb, c->ffn);
		k_add<<<8, THREADS>>>(g->x, g->xb, c->dim);
	}
	k_rmsnorm<<<1, THREADS>>>(g->xb, g->x, g->final_norm, c->dim);
	k_matvec<<<c->vocab, THREADS>>>(g->logits, g->lm_head, g->xb, c->dim);
	k_argmax<<<1, THREADS>>>(g->best, g->logits, c->vocab);
	if (cudaMemcpy(&best, g->best, sizeof(best), cudaMemcpyDeviceToHost) != cudaSuccess) {
		fprintf(stderr, "engine-cuda: %s\n", cudaGetErrorName(cudaGetLastError()));
		exit(1);
	}
	return best;
}
