/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_MODEL_H
#define ENG_MODEL_H

/*
 * A Llama-shaped decoder-only transformer with bf16 weights and fp32
 * compute: RMSNorm, rotary attention with grouped KV heads over a paged KV
 * cache, SwiGLU MLP. The weights are copied from the safetensors file into
 * anonymous memory, as an upload to a GPU would be: CRIU dumps them with the
 * process, which is the point. Deterministic: one thread, fixed order.
 */

#include <stddef.h>
#include <stdint.h>

#include "kvcache.h"
#include "safetensors.h"

struct model_config {
	unsigned layers, dim, heads, kv_heads, ffn, vocab;
	unsigned head_dim, kv_dim;
};

struct layer_weights {
	const uint16_t *in_norm, *q, *k, *v, *o, *post_norm, *gate, *up, *down;
};

struct model {
	struct model_config c;
	uint8_t *weights; /* anonymous copy of the data section */
	uint64_t weights_size;
	const uint16_t *embed, *final_norm, *lm_head;
	struct layer_weights *layer;
	/* scratch */
	float *x, *xb, *q, *k, *v, *att_out, *hb, *hb2, *logits, *scores;
	unsigned max_ctx;
	void *gpu; /* the CUDA build's device state (model_cuda.cu) */
};

#ifdef __cplusplus
extern "C" {
#endif

/*
 * err: 256 bytes. The CPU build is model.c; the CUDA build (model_cuda.cu)
 * implements the same three functions with the weights and the KV cache in
 * device memory.
 */
int model_load(struct model *m, const char *path, unsigned max_ctx, char *err);
void model_free(struct model *m);

/*
 * Runs token at position pos of a sequence whose KV blocks are 'blocks'
 * (enough for pos + 1 tokens): writes its K/V into the cache and returns
 * the greedy next token (argmax, lowest id on ties).
 */
uint32_t model_step(struct model *m, struct kv_pool *kv, const uint32_t *blocks, uint32_t token,
		    unsigned pos);

/* Shared by both builds (model_common.c). */
int model_read_config(const struct st_file *f, struct model_config *c, char *err);
/* Offset in the data section of a BF16 tensor of rows x cols (cols 0: a vector). */
int model_find_tensor(const struct st_file *f, const char *name, uint64_t rows, uint64_t cols,
		      uint64_t *ret_offset, char *err);
/* The data section read into anonymous memory (munmap with f->data_size). */
int model_read_weights(int fd, const struct st_file *f, uint8_t **ret, char *err);
#ifdef __cplusplus
}
#endif

#endif
