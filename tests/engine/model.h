/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_MODEL_H
#define ENG_MODEL_H

/*
 * A Llama-shaped decoder-only transformer with bf16 weights and fp32
 * compute: RMSNorm, rotary position embeddings, grouped-query attention
 * over a paged KV cache, SwiGLU MLP, final norm and lm_head, greedy
 * sampling (argmax, lowest id on ties).
 *
 * Two builds implement the functions below: model.c on the CPU (weights
 * copied from the safetensors file into anonymous memory, as an upload to a
 * GPU would be: CRIU dumps them with the process, which is the point) and
 * model_cuda.cu (weights and KV blocks in device memory, in VMM allocations
 * that can be released in place; the host copy freed after the upload). Both are deterministic: every sum has a fixed order
 * that depends neither on the batch a token is in nor on the number of
 * threads, so the same inputs give bit-identical tokens on every run. The
 * two builds need not give the same tokens as each other.
 *
 * Errors: negative errno, with err (MODEL_ERR_SIZE bytes) saying what.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvcache.h"
#include "safetensors.h"

#define MODEL_ERR_SIZE ST_ERR_SIZE
#define MODEL_RMS_EPS 1e-5f
#define MODEL_ROPE_THETA 10000.0f

struct model_config {
	unsigned layers, dim, heads, kv_heads, ffn, vocab;
	unsigned head_dim, kv_dim;
};

struct model_opts {
	unsigned max_ctx;     /* positions per sequence */
	unsigned max_batch;   /* tokens per model_forward() */
	unsigned max_outputs; /* of which at most this many want_next */
	unsigned threads;     /* CPU threads for the matrix products (the CUDA build ignores it) */
	/*
	 * model_load_mem on the CPU: compute straight from the file in memory
	 * (the mapped weights file), as a CPU engine would; release and upload
	 * then have nothing to do. The CUDA build always uploads.
	 */
	bool in_place;
	/*
	 * When it reads nonzero, model_forward gives up (within a few hundred
	 * rows of a matrix product) with -ECANCELED: the KV slots it wrote are
	 * written again, identically, when the step runs again, and nothing else
	 * changed. A cooperative engine quiesces in well under a step's time, as
	 * a GPU engine, whose steps take milliseconds, would. NULL: never; the CUDA
	 * build ignores it (its steps are short).
	 */
	const int *cancel; /* read with __atomic_load_n */
};

/* One token of one sequence in a model_forward() batch. */
struct model_tok {
	const uint32_t *blocks; /* the sequence's block table: blocks for positions 0..pos */
	uint32_t token;
	unsigned pos;
	bool want_next; /* compute the logits and the greedy next token */
	uint32_t next;	/* out, when want_next */
};

struct model {
	struct model_config c;
	uint64_t weights_size;
	bool kv_on_device; /* the KV blocks are not in kv_pool.data */
	void *kv_device;   /* kv_on_device: the pool's device address (model_kv_init), never
			      dereferenced on the host; kvmotion is told of it (KME_KV_DEVICE) */
	void *priv;	   /* the build's state */
};

/* The tensors of each layer, in this order. */
enum {
	W_IN_NORM,
	W_Q,
	W_K,
	W_V,
	W_O,
	W_POST_NORM,
	W_GATE,
	W_UP,
	W_DOWN,
	W_PER_LAYER,
};

/* Offsets of every tensor in the data section. */
struct model_layout {
	uint64_t embed, final_norm, lm_head;
	uint64_t (*layer)[W_PER_LAYER];
};

#ifdef __cplusplus
extern "C" {
#endif

int model_load(struct model *m, const char *path, const struct model_opts *o, char *err);
/*
 * Cooperative mode: loads from a safetensors file in memory (the mapped
 * weights file, which must outlive the model: the weights are uploaded
 * again from it after a release). what names it in errors.
 */
int model_load_mem(struct model *m, const uint8_t *file, uint64_t file_size, const char *what,
		   const struct model_opts *o, char *err);
/*
 * Drops the uploaded weights, keeping their addresses (the CUDA build:
 * synchronize, cuMemUnmap + cuMemRelease, the range stays reserved; the
 * CPU build: MADV_DONTNEED): the memory is given back and a dump holds
 * none of it. Only after model_load_mem; with in_place (CPU) there is no
 * copy and nothing to do.
 */
int model_release_weights(struct model *m, char *err);
/*
 * Uploads the weights again from the file given to model_load_mem, to the
 * same addresses (the CUDA build: cuMemCreate + cuMemMap + cuMemSetAccess
 * first). Either of the two may be called from another thread than the
 * one that loaded the model, while that one makes no model call.
 */
int model_upload_weights(struct model *m, char *err);
/* Accepts a model that failed to load or was never loaded (zeroed). */
void model_free(struct model *m);

/*
 * Binds the KV pool (made with host_data = !m->kv_on_device) to the model:
 * the CUDA build allocates the blocks in device memory.
 */
int model_kv_init(struct model *m, struct kv_pool *kv, char *err);
/*
 * Cooperative mode, for a pool in device memory (kv_on_device; a host pool
 * is released by kvmotion's library itself, and these do nothing): drops
 * the device memory under free blocks, keeping the addresses, as a quiesce
 * wants. The pool is mapped in pieces (vmm_plan.h); a piece goes when no
 * block overlapping it is in use in kv->used. *ret_bytes: bytes released by
 * this call. Only while nothing runs on the device and the pool does not
 * change (the engine is parked).
 */
int model_kv_release_free(struct model *m, const struct kv_pool *kv, uint64_t *ret_bytes,
			  char *err);
/*
 * Maps every released piece again, at the same addresses. The memory is
 * new: the free blocks in it hold garbage, which is harmless (a block is
 * written before it is read).
 */
int model_kv_restore(struct model *m, const struct kv_pool *kv, char *err);
/* Overwrites one whole KV block (kv_block_bytes) with src. */
int model_kv_write(struct model *m, struct kv_pool *kv, uint32_t block, const uint16_t *src,
		   char *err);

/*
 * Runs n tokens through the model (1 <= n <= max_batch, at most max_outputs
 * of them want_next): each token's K and V are written into its sequence's
 * block at pos, then it attends to positions 0..pos of its sequence. Tokens
 * of one sequence must come in increasing positions with none missing, so
 * a whole prompt can be prefilled in one call; a token's result does not
 * depend on the other tokens of the batch.
 */
int model_forward(struct model *m, struct kv_pool *kv, struct model_tok *toks, unsigned n,
		  char *err);

/* Shared by both builds (model_common.c). */
int model_read_config(const struct st_file *f, struct model_config *c, char *err);
/* Offset in the data section of a BF16 tensor of rows x cols (cols 0: a vector). */
int model_find_tensor(const struct st_file *f, const char *name, uint64_t rows, uint64_t cols,
		      uint64_t *ret_offset, char *err);
int model_read_layout(const struct st_file *f, const struct model_config *c,
		      struct model_layout *ret, char *err);
void model_layout_free(struct model_layout *l);
/* The data section read into anonymous memory (munmap with f->data_size). */
int model_read_weights(int fd, const struct st_file *f, uint8_t **ret, char *err);
/*
 * All of the above on a file: config, layout and the weights in anonymous
 * memory (*ret_weights, *ret_size bytes, for munmap).
 */
int model_read_file(const char *path, struct model_config *ret_config,
		    struct model_layout *ret_layout, uint8_t **ret_weights, uint64_t *ret_size,
		    char *err);
/*
 * The same from a safetensors file already in memory (cooperative mode:
 * the engine's mapping of its weights file). *ret_data_offset: where the
 * data section starts in file. what names the file in errors. ret_weights
 * may be NULL: no host copy is made (the CUDA build uploads straight from
 * file + *ret_data_offset).
 */
int model_read_mem(const uint8_t *file, uint64_t file_size, const char *what,
		   struct model_config *ret_config, struct model_layout *ret_layout,
		   uint8_t **ret_weights, uint64_t *ret_size, uint64_t *ret_data_offset, char *err);
/* Config, layout and where the data section is, without copying anything. */
int model_parse_mem(const uint8_t *file, uint64_t file_size, const char *what,
		    struct model_config *ret_config, struct model_layout *ret_layout,
		    uint64_t *ret_data_offset, uint64_t *ret_data_size, char *err);
/* Checks a batch against the model and the options. */
int model_check_batch(const struct model_config *c, const struct model_opts *o,
		      const struct kv_pool *kv, const struct model_tok *toks, unsigned n,
		      char *err);
#ifdef __cplusplus
}
#endif

#endif
