/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "kvcache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int kv_pool_init(struct kv_pool *p, unsigned layers, unsigned kv_dim, unsigned block_tokens,
		 uint64_t bytes, bool host_data)
{
	uint64_t n;

	memset(p, 0, sizeof(*p));
	if (!layers || !kv_dim || !block_tokens)
		return -EINVAL;
	p->layers = layers;
	p->kv_dim = kv_dim;
	p->block_tokens = block_tokens;
	p->block_elems = (size_t)layers * 2 * block_tokens * kv_dim;
	if (host_data) {
		size_t page = (size_t)sysconf(_SC_PAGESIZE) / sizeof(uint16_t);

		p->block_stride = (p->block_elems + page - 1) / page * page;
	} else {
		p->block_stride = p->block_elems;
	}
	n = bytes / kv_block_stride_bytes(p);
	if (n == 0 || n > UINT32_MAX / 2)
		return -EINVAL;
	p->n_blocks = (uint32_t)n;
	if (host_data) {
		void *data = mmap(NULL, (size_t)n * kv_block_stride_bytes(p), PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (data == MAP_FAILED)
			return -ENOMEM;
		p->data = data;
	}
	p->free_stack = malloc(n * sizeof(*p->free_stack));
	p->used = calloc((n + 63) / 64, sizeof(*p->used));
	if (!p->free_stack || !p->used) {
		kv_pool_free(p);
		return -ENOMEM;
	}
	/* The stack pops from the top: lowest id first. */
	for (uint32_t i = 0; i < p->n_blocks; i++)
		p->free_stack[i] = p->n_blocks - 1 - i;
	p->n_free = p->n_blocks;
	return 0;
}

void kv_pool_free(struct kv_pool *p)
{
	if (p->data)
		munmap(p->data, (size_t)p->n_blocks * kv_block_stride_bytes(p));
	free(p->free_stack);
	free(p->used);
	memset(p, 0, sizeof(*p));
}

int64_t kv_alloc(struct kv_pool *p)
{
	uint32_t b;

	if (p->n_free == 0)
		return -ENOSPC;
	b = p->free_stack[--p->n_free];
	p->used[b / 64] |= 1ull << (b % 64);
	if (p->on_change)
		p->on_change(p->on_change_data, b, false);
	return b;
}

int kv_release(struct kv_pool *p, uint32_t block)
{
	if (block >= p->n_blocks || !(p->used[block / 64] & (1ull << (block % 64))))
		return -EINVAL;
	p->used[block / 64] &= ~(1ull << (block % 64));
	p->free_stack[p->n_free++] = block;
	if (p->on_change)
		p->on_change(p->on_change_data, block, true);
	return 0;
}
