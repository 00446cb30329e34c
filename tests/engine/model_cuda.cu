// SPDX-License-Identifier: LGPL-2.1-or-later
/*
 * The CUDA build of the test engine's model (see model.h): the same
 * computation as model.c with the weights and the paged KV cache in device
 * memory, so that the CUDA driver's checkpoint captures them. The weights are
 * read into anonymous host memory (model_common.c), uploaded and the host
 * copy freed: GPU memory is the only copy. In cooperative mode
 * (model_load_mem) they are uploaded straight from the engine's mapping of
 * its weights file, with no host copy at all.
 *
 * The weights and the KV pool are VMM allocations (cuMemAddressReserve,
 * cuMemCreate, cuMemMap, cuMemSetAccess), so that their memory can be given
 * back before a checkpoint keeping the addresses every kernel argument and
 * block table holds (model_release_weights, model_kv_release_free), and
 * created again at the same addresses after it. The driver calls come
 * through cudaGetDriverEntryPointByVersion: the binary links the static
 * runtime and never libcuda itself, so it starts (and says why it cannot
 * run) where no driver is installed. Small buffers (activations, RoPE
 * tables) stay cudaMalloc'd: they are checkpointed with the process.
 *
 * Kernels: bf16 matrix-
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
#include <cuda.h> /* driver types only: the calls come from cudaGetDriverEntryPointByVersion */
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "model.h"
#include "vmm_plan.h"

#define THREADS 256
/*
 * Driver entry points as of CUDA 12.0: every call used here has had this
 * ABI since 10.2, and a driver older than 12.0 cannot run this runtime.
 */
#define CU_ENTRY_VERSION 12000
#define STAGE_BYTES ((size_t)16 << 20) /* one pinned staging buffer of an upload */
#define STAGE_SLOTS 4
/* Each piece of the KV pool is a driver handle and a map call: pieces grow past this. */
#define KV_MAX_PIECES 4096

/* The driver calls this build makes, found at run time (cu_sym). */
struct cu_api {
	PFN_cuGetErrorName_v6000 GetErrorName;
	PFN_cuGetErrorString_v6000 GetErrorString;
	PFN_cuMemGetAllocationGranularity_v10020 MemGetAllocationGranularity;
	PFN_cuMemAddressReserve_v10020 MemAddressReserve;
	PFN_cuMemAddressFree_v10020 MemAddressFree;
	PFN_cuMemCreate_v10020 MemCreate;
	PFN_cuMemRelease_v10020 MemRelease;
	PFN_cuMemMap_v10020 MemMap;
	PFN_cuMemUnmap_v10020 MemUnmap;
	PFN_cuMemSetAccess_v10020 MemSetAccess;
};

struct gpu_state {
	struct model_opts o;
	struct cu_api cu;
	int dev;
	CUmemAllocationProp prop; /* pinned memory on dev */
	CUmemAccessDesc access;	  /* read-write from dev */
	uint64_t gran;		  /* allocation granularity: sizes and pieces are multiples */
	/* the weights: one mapping over a reserved range of w_span bytes */
	CUdeviceptr w_va;
	uint64_t w_span;
	CUmemGenericAllocationHandle w_handle;
	bool w_mapped;
	const uint8_t *file;  /* model_load_mem: the file the weights come from (borrowed) */
	uint64_t data_offset; /* of the data section in file */
	uint8_t *weights;     /* device: w_va */
	const uint16_t *embed, *final_norm, *lm_head;
	const uint16_t *(*layer)[W_PER_LAYER]; /* host array of device pointers */
	/* the KV pool: kvp.n_pieces mappings over a reserved range of kvp.span bytes */
	struct vmm_pieces kvp;
	CUdeviceptr kv_va;
	CUmemGenericAllocationHandle *kv_handles; /* per piece */
	bool *kv_mapped;			  /* per piece */
	uint16_t *kv;				  /* device: kv_va, n_blocks * block_elems */
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
	return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

/* Driver errors by name, through the driver's own cuGetErrorName. */
static int cu_fail(const struct gpu_state *g, CUresult e, const char *what, char *err)
{
	const char *name = NULL, *desc = NULL;

	if (g->cu.GetErrorName && g->cu.GetErrorName(e, &name) != CUDA_SUCCESS)
		name = NULL;
	if (g->cu.GetErrorString && g->cu.GetErrorString(e, &desc) != CUDA_SUCCESS)
		desc = NULL;
	if (name)
		snprintf(err, MODEL_ERR_SIZE, "%s: %s (%s)", what, name, desc ? desc : "?");
	else
		snprintf(err, MODEL_ERR_SIZE, "%s: CUresult %d", what, (int)e);
	return e == CUDA_ERROR_OUT_OF_MEMORY ? -ENOMEM : -EIO;
}

#define CK(call, what)                                                                             \
	do {                                                                                       \
		cudaError_t _e = (call);                                                           \
		if (_e != cudaSuccess) {                                                           \
			r = cuda_fail(_e, what, err);                                              \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

#define CU(call, what)                                                                             \
	do {                                                                                       \
		CUresult _c = (call);                                                              \
		if (_c != CUDA_SUCCESS) {                                                          \
			r = cu_fail(g, _c, what, err);                                             \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

template <typename T> static cudaError_t dev_alloc(T **p, size_t n)
{
	return cudaMalloc((void **)p, (n ? n : 1) * sizeof(T));
}

static void *dev_ptr(CUdeviceptr va)
{
	return (void *)(uintptr_t)va;
}

/* ---- the driver's VMM calls, without linking libcuda ---- */

static int cu_sym(const char *name, void **ret, char *err)
{
	cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
	void *fn = NULL;
	cudaError_t e = cudaGetDriverEntryPointByVersion(name, &fn, CU_ENTRY_VERSION,
							 cudaEnableDefault, &q);

	if (e != cudaSuccess) {
		snprintf(err, MODEL_ERR_SIZE, "driver entry point %s (CUDA %d.%d): %s (%s)", name,
			 CU_ENTRY_VERSION / 1000, CU_ENTRY_VERSION % 1000 / 10, cudaGetErrorName(e),
			 cudaGetErrorString(e));
		return -EIO;
	}
	if (!fn || q != cudaDriverEntryPointSuccess) {
		snprintf(err, MODEL_ERR_SIZE, "the CUDA driver has no %s as of CUDA %d.%d (%s)",
			 name, CU_ENTRY_VERSION / 1000, CU_ENTRY_VERSION % 1000 / 10,
			 q == cudaDriverEntryPointVersionNotSufficent ? "driver too old"
								      : "symbol not found");
		return -ENOTSUP;
	}
	*ret = fn;
	return 0;
}

#define CU_LOAD(field)                                                                             \
	do {                                                                                       \
		void *fn_ = NULL;                                                                  \
		r = cu_sym("cu" #field, &fn_, err);                                                \
		if (r < 0)                                                                         \
			goto out;                                                                  \
		g->cu.field = reinterpret_cast<decltype(g->cu.field)>(fn_);                        \
	} while (0)

/*
 * The runtime on the current device, the driver's entry points, and what
 * every VMM allocation of this model uses: pinned memory on that device,
 * read-write from it, sizes in multiples of its granularity.
 */
static int gpu_init(struct gpu_state *g, char *err)
{
	size_t gran = 0;
	int r = 0;

	CK(cudaGetDevice(&g->dev), "cudaGetDevice");
	/* creates the primary context: the driver is initialised before any cu* call */
	CK(cudaFree(0), "initialising the CUDA runtime");
	CU_LOAD(GetErrorName);
	CU_LOAD(GetErrorString);
	CU_LOAD(MemGetAllocationGranularity);
	CU_LOAD(MemAddressReserve);
	CU_LOAD(MemAddressFree);
	CU_LOAD(MemCreate);
	CU_LOAD(MemRelease);
	CU_LOAD(MemMap);
	CU_LOAD(MemUnmap);
	CU_LOAD(MemSetAccess);
	g->prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
	g->prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
	g->prop.location.id = g->dev;
	g->access.location = g->prop.location;
	g->access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
	CU(g->cu.MemGetAllocationGranularity(&gran, &g->prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
	   "cuMemGetAllocationGranularity");
	g->gran = gran;
out:
	return r;
}

/*
 * New physical memory behind [va, va + size) of a reserved range: create,
 * map, allow access (a new mapping starts with none). *h and *mapped
 * change only on success.
 */
static int dev_map(struct gpu_state *g, CUdeviceptr va, size_t size,
		   CUmemGenericAllocationHandle *h, bool *mapped, const char *what, char *err)
{
	CUmemGenericAllocationHandle nh = 0;
	char call[64];
	CUresult c;
	int r;

	c = g->cu.MemCreate(&nh, size, &g->prop, 0);
	if (c != CUDA_SUCCESS) {
		snprintf(call, sizeof(call), "cuMemCreate(%s, %zu bytes)", what, size);
		return cu_fail(g, c, call, err);
	}
	c = g->cu.MemMap(va, size, 0, nh, 0);
	if (c != CUDA_SUCCESS) {
		snprintf(call, sizeof(call), "cuMemMap(%s)", what);
		r = cu_fail(g, c, call, err);
		(void)g->cu.MemRelease(nh);
		return r;
	}
	c = g->cu.MemSetAccess(va, size, &g->access, 1);
	if (c != CUDA_SUCCESS) {
		snprintf(call, sizeof(call), "cuMemSetAccess(%s)", what);
		r = cu_fail(g, c, call, err);
		(void)g->cu.MemUnmap(va, size);
		(void)g->cu.MemRelease(nh);
		return r;
	}
	*h = nh;
	*mapped = true;
	return 0;
}

/*
 * Gives the physical memory behind a mapping back, keeping the range
 * reserved (cuMemAddressFree only when the model is freed). The caller
 * synchronized: unmapping under a running kernel is an illegal address.
 * *mapped is false once the unmap went through, even if the release fails.
 */
static int dev_unmap(struct gpu_state *g, CUdeviceptr va, size_t size,
		     CUmemGenericAllocationHandle *h, bool *mapped, const char *what, char *err)
{
	char call[64];
	CUresult c;

	c = g->cu.MemUnmap(va, size);
	if (c != CUDA_SUCCESS) {
		snprintf(call, sizeof(call), "cuMemUnmap(%s)", what);
		return cu_fail(g, c, call, err);
	}
	*mapped = false;
	c = g->cu.MemRelease(*h);
	*h = 0;
	if (c != CUDA_SUCCESS) {
		snprintf(call, sizeof(call), "cuMemRelease(%s)", what);
		return cu_fail(g, c, call, err);
	}
	return 0;
}

/*
 * Host to device through a ring of pinned staging buffers: copying the
 * next chunk out of the (maybe cold) file mapping overlaps the DMA of the
 * previous ones, where a cudaMemcpy from pageable memory would fault the
 * pages in and copy one chunk after the other. The ring lives for one
 * upload only: pinned memory kept across a checkpoint would be dumped.
 */
static int upload(void *dst, const uint8_t *src, uint64_t size, char *err)
{
	void *stage[STAGE_SLOTS] = {};
	cudaEvent_t done[STAGE_SLOTS] = {};
	cudaStream_t s = NULL;
	uint64_t chunks = (size + STAGE_BYTES - 1) / STAGE_BYTES, off = 0;
	unsigned slots = chunks < STAGE_SLOTS ? (unsigned)chunks : STAGE_SLOTS;
	int r = 0;

	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate(upload)");
	for (unsigned i = 0; i < slots; i++) {
		CK(cudaHostAlloc(&stage[i], STAGE_BYTES, cudaHostAllocDefault),
		   "cudaHostAlloc(staging buffer)");
		CK(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming),
		   "cudaEventCreate(staging buffer)");
	}
	for (uint64_t k = 0; off < size; k++) {
		size_t n = size - off < STAGE_BYTES ? (size_t)(size - off) : STAGE_BYTES;
		unsigned i = (unsigned)(k % slots);

		/* a slot used before: its copy must have left it */
		if (k >= slots)
			CK(cudaEventSynchronize(done[i]), "cudaEventSynchronize(staging buffer)");
		memcpy(stage[i], src + off, n);
		CK(cudaMemcpyAsync((uint8_t *)dst + off, stage[i], n, cudaMemcpyHostToDevice, s),
		   "cudaMemcpyAsync(weights)");
		CK(cudaEventRecord(done[i], s), "cudaEventRecord(staging buffer)");
		off += n;
	}
	CK(cudaStreamSynchronize(s), "cudaStreamSynchronize(upload)");
out:
	if (s)
		(void)cudaStreamSynchronize(s); /* no copy may still read a buffer freed below */
	for (unsigned i = 0; i < slots; i++) {
		if (done[i])
			(void)cudaEventDestroy(done[i]);
		if (stage[i])
			(void)cudaFreeHost(stage[i]);
	}
	if (s)
		(void)cudaStreamDestroy(s);
	return r;
}

/* Unmaps what is mapped of the KV pool and frees its range. */
static void kv_teardown(struct gpu_state *g)
{
	char scratch[MODEL_ERR_SIZE];

	for (uint32_t i = 0; g->kv_mapped && i < g->kvp.n_pieces; i++)
		if (g->kv_mapped[i])
			(void)dev_unmap(g, g->kv_va + (CUdeviceptr)i * g->kvp.piece_bytes,
					g->kvp.piece_bytes, &g->kv_handles[i], &g->kv_mapped[i],
					"KV pool", scratch);
	if (g->kv_va)
		(void)g->cu.MemAddressFree(g->kv_va, g->kvp.span);
	free(g->kv_handles);
	free(g->kv_mapped);
	g->kv_handles = NULL;
	g->kv_mapped = NULL;
	g->kv_va = 0;
	g->kv = NULL;
}

/*
 * model_load and model_load_mem: one path. The weights go into a reserved
 * range with one mapping over it, uploaded from an anonymous host copy
 * (model_load, freed after) or straight from the caller's file (model_load_mem,
 * kept for the uploads after a release).
 */
static int load(struct model *m, const char *path, const uint8_t *file, uint64_t file_size,
		const struct model_opts *o, char *err)
{
	struct model_config *c = &m->c;
	struct model_layout l = {};
	struct gpu_state *g;
	const uint8_t *src;
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
	if (file) {
		r = model_read_mem(file, file_size, path, c, &l, NULL, &m->weights_size,
				   &g->data_offset, err);
		g->file = file;
		src = file + g->data_offset;
	} else {
		r = model_read_file(path, c, &l, &host, &m->weights_size, err);
		src = host;
	}
	if (r < 0)
		goto out;
	r = gpu_init(g, err);
	if (r < 0)
		goto out;

	r = vmm_round_up(m->weights_size ? m->weights_size : 1, g->gran, &g->w_span);
	if (r < 0) {
		snprintf(err, MODEL_ERR_SIZE, "%llu bytes of weights: too large",
			 (unsigned long long)m->weights_size);
		goto out;
	}
	CU(g->cu.MemAddressReserve(&g->w_va, g->w_span, 0, 0, 0), "cuMemAddressReserve(weights)");
	r = dev_map(g, g->w_va, g->w_span, &g->w_handle, &g->w_mapped, "weights", err);
	if (r < 0)
		goto out;
	g->weights = (uint8_t *)dev_ptr(g->w_va);
	r = upload(g->weights, src, m->weights_size, err);
	if (r < 0)
		goto out;
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

extern "C" int model_load(struct model *m, const char *path, const struct model_opts *o,
			  char *err)
{
	return load(m, path, NULL, 0, o, err);
}

extern "C" int model_load_mem(struct model *m, const uint8_t *file, uint64_t file_size,
			      const char *what, const struct model_opts *o, char *err)
{
	return load(m, what, file, file_size, o, err);
}

static struct gpu_state *coop_state(struct model *m, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;

	if (!g || !g->file) {
		snprintf(err, MODEL_ERR_SIZE, "the weights were not loaded from a weights file");
		return NULL;
	}
	return g;
}

extern "C" int model_release_weights(struct model *m, char *err)
{
	struct gpu_state *g = coop_state(m, err);
	int r = 0;

	if (!g)
		return -EINVAL;
	if (!g->w_mapped)
		return 0;
	/* the caller's thread may be another than the loader's: the same device there */
	CK(cudaSetDevice(g->dev), "cudaSetDevice");
	CK(cudaDeviceSynchronize(), "cudaDeviceSynchronize(before releasing the weights)");
	r = dev_unmap(g, g->w_va, g->w_span, &g->w_handle, &g->w_mapped, "weights", err);
out:
	return r;
}

extern "C" int model_upload_weights(struct model *m, char *err)
{
	struct gpu_state *g = coop_state(m, err);
	int r = 0;

	if (!g)
		return -EINVAL;
	CK(cudaSetDevice(g->dev), "cudaSetDevice");
	if (!g->w_mapped) {
		r = dev_map(g, g->w_va, g->w_span, &g->w_handle, &g->w_mapped, "weights", err);
		if (r < 0)
			goto out;
	}
	r = upload(g->weights, g->file + g->data_offset, m->weights_size, err);
out:
	return r;
}

extern "C" void model_free(struct model *m)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	char scratch[MODEL_ERR_SIZE];

	if (g) {
		if (g->cu.MemUnmap) {
			/* nothing may run on what is unmapped below */
			(void)cudaSetDevice(g->dev);
			(void)cudaDeviceSynchronize();
			kv_teardown(g);
			if (g->w_mapped)
				(void)dev_unmap(g, g->w_va, g->w_span, &g->w_handle, &g->w_mapped,
						"weights", scratch);
			if (g->w_va)
				(void)g->cu.MemAddressFree(g->w_va, g->w_span);
		}
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

/*
 * The KV pool in a reserved range, mapped in pieces (vmm_plan.h) so that
 * the memory under free blocks can be released piece by piece.
 */
extern "C" int model_kv_init(struct model *m, struct kv_pool *kv, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	int r = 0;

	if (kv->data || kv->layers != m->c.layers || kv->kv_dim != m->c.kv_dim || g->kv_va ||
	    kv->block_stride != kv->block_elems) {
		snprintf(err, MODEL_ERR_SIZE, "the KV pool does not fit the model");
		return -EINVAL;
	}
	r = vmm_pieces_plan(kv_block_bytes(kv), kv->n_blocks, g->gran, KV_MAX_PIECES, &g->kvp);
	if (r < 0) {
		snprintf(err, MODEL_ERR_SIZE, "%u KV blocks of %zu bytes: %s", kv->n_blocks,
			 kv_block_bytes(kv), strerror(-r));
		return r;
	}
	g->kv_handles = (CUmemGenericAllocationHandle *)calloc(g->kvp.n_pieces,
							       sizeof(*g->kv_handles));
	g->kv_mapped = (bool *)calloc(g->kvp.n_pieces, sizeof(*g->kv_mapped));
	if (!g->kv_handles || !g->kv_mapped) {
		snprintf(err, MODEL_ERR_SIZE, "out of memory");
		r = -ENOMEM;
		goto out;
	}
	CU(g->cu.MemAddressReserve(&g->kv_va, g->kvp.span, 0, 0, 0),
	   "cuMemAddressReserve(KV pool)");
	for (uint32_t i = 0; i < g->kvp.n_pieces; i++) {
		r = dev_map(g, g->kv_va + (CUdeviceptr)i * g->kvp.piece_bytes, g->kvp.piece_bytes,
			    &g->kv_handles[i], &g->kv_mapped[i], "KV pool", err);
		if (r < 0)
			goto out;
	}
	g->kv = (uint16_t *)dev_ptr(g->kv_va);
	m->kv_device = g->kv;
out:
	if (r < 0)
		kv_teardown(g);
	return r;
}

extern "C" int model_kv_release_free(struct model *m, const struct kv_pool *kv,
				     uint64_t *ret_bytes, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	uint64_t bytes = 0;
	int r = 0;

	if (!g || !g->kv || kv->n_blocks != g->kvp.n_blocks) {
		snprintf(err, MODEL_ERR_SIZE, "no device KV pool of %u blocks", kv->n_blocks);
		return -EINVAL;
	}
	CK(cudaSetDevice(g->dev), "cudaSetDevice");
	CK(cudaDeviceSynchronize(), "cudaDeviceSynchronize(before releasing KV blocks)");
	for (uint32_t i = 0; i < g->kvp.n_pieces; i++) {
		if (!g->kv_mapped[i] || !vmm_piece_free(&g->kvp, i, kv->used))
			continue;
		r = dev_unmap(g, g->kv_va + (CUdeviceptr)i * g->kvp.piece_bytes,
			      g->kvp.piece_bytes, &g->kv_handles[i], &g->kv_mapped[i], "KV pool",
			      err);
		if (r < 0)
			goto out;
		bytes += g->kvp.piece_bytes;
	}
	*ret_bytes = bytes;
out:
	return r;
}

extern "C" int model_kv_restore(struct model *m, const struct kv_pool *kv, char *err)
{
	struct gpu_state *g = (struct gpu_state *)m->priv;
	int r = 0;

	if (!g || !g->kv || kv->n_blocks != g->kvp.n_blocks) {
		snprintf(err, MODEL_ERR_SIZE, "no device KV pool of %u blocks", kv->n_blocks);
		return -EINVAL;
	}
	CK(cudaSetDevice(g->dev), "cudaSetDevice");
	for (uint32_t i = 0; i < g->kvp.n_pieces; i++) {
		if (g->kv_mapped[i])
			continue;
		r = dev_map(g, g->kv_va + (CUdeviceptr)i * g->kvp.piece_bytes, g->kvp.piece_bytes,
			    &g->kv_handles[i], &g->kv_mapped[i], "KV pool", err);
		if (r < 0)
			goto out;
	}
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
