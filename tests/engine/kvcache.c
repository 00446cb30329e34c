/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "kvcache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int kv_pool_init(struct kv_pool *p, unsigned layers, unsigned kv_dim, unsigned block_tokens,
		 uint64_t bytes)
{
	size_t block_bytes;
	void *data;

	memset(p, 0, sizeof(*p));
	p->layers = layers;
	p->kv_dim = kv_dim;
	p->block_tokens = block_tokens;
	p->block_elems = (size_t)layers * 2 * block_tokens * kv_dim;
	block_bytes = p->block_elems * sizeof(uint16_t);
	p->n_blocks = (uint32_t)(bytes / block_bytes);
	if (p->n_blocks == 0)
		return -EINVAL;
	data = mmap(NULL, (size_t)p->n_blocks * block_bytes, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (data == MAP_FAILED)
		return -errno;
	p->data = data;
	p->free_stack = malloc(p->n_blocks * sizeof(*p->free_stack));
	if (!p->free_stack) {
		munmap(data, (size_t)p->n_blocks * block_bytes);
		return -ENOMEM;
	}
	/* Lowest block first out: allocation order is deterministic. */
	for (uint32_t i = 0; i < p->n_blocks; i++)
		p->free_stack[i] = p->n_blocks - 1 - i;
	p->n_free = p->n_blocks;
	return 0;
}

void kv_pool_free(struct kv_pool *p)
{
	if (p->data)
		munmap(p->data, (size_t)p->n_blocks * p->block_elems * sizeof(uint16_t));
	free(p->free_stack);
	memset(p, 0, sizeof(*p));
}

int64_t kv_alloc(struct kv_pool *p)
{
	if (p->n_free == 0)
		return -1;
	return p->free_stack[--p->n_free];
}

void kv_release(struct kv_pool *p, uint32_t block)
{
	p->free_stack[p->n_free++] = block;
}
