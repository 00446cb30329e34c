/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_VMM_PLAN_H
#define ENG_VMM_PLAN_H

/*
 * The host-side arithmetic of the CUDA build's VMM allocations
 * (model_cuda.cu), kept apart so that it runs and is tested without a GPU:
 * sizes rounded to the allocation granularity, and the KV pool cut into
 * pieces that are mapped, released and mapped again one by one.
 *
 * cuMemUnmap releases whole mappings only, so the KV pool is mapped in
 * pieces of a whole number of granules each. KV blocks need not line up
 * with pieces: a block may straddle two of them, and a piece can be
 * released only when every block that overlaps it is free. So a used block
 * keeps at most two pieces mapped beyond its own bytes, and nothing pads
 * the blocks (a 64 KiB block padded to 2 MiB would waste 97% of the pool).
 */

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* n rounded up to a multiple of g; -EINVAL for g 0, -EOVERFLOW if it does not fit. */
int vmm_round_up(uint64_t n, uint64_t g, uint64_t *ret);

struct vmm_pieces {
	uint64_t block_bytes; /* from one block to the next */
	uint32_t n_blocks;
	uint64_t piece_bytes; /* a multiple of the granularity */
	uint32_t n_pieces;
	uint64_t span; /* n_pieces * piece_bytes >= n_blocks * block_bytes: the reserved range */
};

/*
 * Cuts n_blocks blocks into pieces of one granule each, or of as many
 * granules as keep their number at or below max_pieces (each piece is one
 * driver handle and one map call). -EINVAL for a zero argument,
 * -EOVERFLOW if the pool's size does not fit in 64 bits.
 */
int vmm_pieces_plan(uint64_t block_bytes, uint32_t n_blocks, uint64_t granularity,
		    uint32_t max_pieces, struct vmm_pieces *ret);

/* The blocks that overlap piece (< n_pieces): [*ret_first, *ret_end), never empty. */
void vmm_piece_blocks(const struct vmm_pieces *p, uint32_t piece, uint32_t *ret_first,
		      uint32_t *ret_end);

/*
 * Whether piece can be released: no block overlapping it is in use in
 * used, a bitmap of n_blocks bits (bit b of word b / 64 set: block b in
 * use, as struct kv_pool keeps it).
 */
bool vmm_piece_free(const struct vmm_pieces *p, uint32_t piece, const uint64_t *used);

#ifdef __cplusplus
}
#endif

#endif
