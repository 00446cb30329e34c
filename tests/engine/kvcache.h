/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_KVCACHE_H
#define ENG_KVCACHE_H

/*
 * A paged KV cache: a pool of fixed-size blocks preallocated in anonymous
 * memory, each holding block_tokens tokens of K and V for every layer (bf16),
 * a stack of free block ids and a bitmap of used ones. Sequences own blocks through block tables
 * and give them back when they finish. The lowest free id is handed out
 * first after init, so allocation is deterministic.
 *
 * Block layout: [layer][K, V][slot][kv_dim] bf16. Host blocks start at
 * multiples of block_stride elements, a whole number of pages, so that a
 * free block can be released on its own (madvise) while the pool keeps its
 * addresses.
 *
 * The CUDA build keeps the blocks in device memory: it creates the pool with
 * host_data false (ids only, data NULL) and allocates the blocks itself.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kv_pool {
	unsigned layers, kv_dim, block_tokens;
	uint32_t n_blocks, n_free;
	uint32_t *free_stack;
	uint64_t *used; /* bitmap of allocated blocks: catches double frees */
	uint16_t *data;	     /* host blocks, or NULL */
	size_t block_elems;  /* layers * 2 * block_tokens * kv_dim */
	size_t block_stride; /* elements from one host block to the next */
	/* Told of every allocation and release (cooperative mode), may be NULL. */
	void (*on_change)(void *userdata, uint32_t block, bool free);
	void *on_change_data;
};

/*
 * bytes: the pool's size, rounded down to whole blocks. -EINVAL if it holds
 * no block, -ENOMEM if it cannot be allocated.
 */
int kv_pool_init(struct kv_pool *p, unsigned layers, unsigned kv_dim, unsigned block_tokens,
		 uint64_t bytes, bool host_data);
/* Accepts a pool that was never initialised (zeroed). */
void kv_pool_free(struct kv_pool *p);
/* A free block id, or -ENOSPC when the pool is exhausted. */
int64_t kv_alloc(struct kv_pool *p);
/* Gives a block back; -EINVAL if it is out of range or already free. */
int kv_release(struct kv_pool *p, uint32_t block);

static inline uint32_t kv_used(const struct kv_pool *p)
{
	return p->n_blocks - p->n_free;
}

static inline size_t kv_block_bytes(const struct kv_pool *p)
{
	return p->block_elems * sizeof(uint16_t);
}

/* Element offset of one token's K (which 0) or V (which 1) of one layer. */
static inline size_t kv_block_stride_bytes(const struct kv_pool *p)
{
	return p->block_stride * sizeof(uint16_t);
}

static inline size_t kv_offset(const struct kv_pool *p, uint32_t block, unsigned layer,
			       unsigned which, unsigned slot)
{
	return (size_t)block * p->block_stride +
	       ((size_t)(layer * 2 + which) * p->block_tokens + slot) * p->kv_dim;
}

static inline uint16_t *kv_slot(struct kv_pool *p, uint32_t block, unsigned layer, unsigned which,
				unsigned slot)
{
	return p->data + kv_offset(p, block, layer, which, slot);
}

#endif
