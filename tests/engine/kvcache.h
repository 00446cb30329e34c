/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_KVCACHE_H
#define ENG_KVCACHE_H

/*
 * A paged KV cache: a pool of fixed-size blocks preallocated in anonymous
 * memory, each holding block_tokens tokens of K and V for every layer (bf16),
 * and a stack of free blocks. Sequences own blocks through block tables.
 */

#include <stddef.h>
#include <stdint.h>

struct kv_pool {
	unsigned layers, kv_dim, block_tokens;
	uint32_t n_blocks, n_free;
	uint32_t *free_stack;
	uint16_t *data;
	size_t block_elems; /* layers * 2 * block_tokens * kv_dim */
};

/* bytes: pool size; at least one block. */
int kv_pool_init(struct kv_pool *p, unsigned layers, unsigned kv_dim, unsigned block_tokens,
		 uint64_t bytes);
void kv_pool_free(struct kv_pool *p);
/* A free block, or -1 when the pool is exhausted. */
int64_t kv_alloc(struct kv_pool *p);
void kv_release(struct kv_pool *p, uint32_t block);

static inline uint16_t *kv_slot(struct kv_pool *p, uint32_t block, unsigned layer, unsigned which,
				unsigned slot)
{
	return p->data + block * p->block_elems +
	       ((size_t)(layer * 2 + which) * p->block_tokens + slot) * p->kv_dim;
}

#endif
