/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "vmm_plan.h"

#include <errno.h>
#include <string.h>

int vmm_round_up(uint64_t n, uint64_t g, uint64_t *ret)
{
	uint64_t k;

	if (g == 0)
		return -EINVAL;
	k = n / g + (n % g != 0);
	if (k > UINT64_MAX / g)
		return -EOVERFLOW;
	*ret = k * g;
	return 0;
}

int vmm_pieces_plan(uint64_t block_bytes, uint32_t n_blocks, uint64_t granularity,
		    uint32_t max_pieces, struct vmm_pieces *ret)
{
	uint64_t total, granules, per_piece, n_pieces;

	if (!block_bytes || !n_blocks || !granularity || !max_pieces)
		return -EINVAL;
	if (block_bytes > UINT64_MAX / n_blocks)
		return -EOVERFLOW;
	total = block_bytes * n_blocks;
	granules = total / granularity + (total % granularity != 0);
	per_piece = granules / max_pieces + (granules % max_pieces != 0);
	n_pieces = granules / per_piece + (granules % per_piece != 0);
	/* n_pieces <= max_pieces < 2^32; the span covers total, so it fits if total did */
	if (per_piece > UINT64_MAX / granularity ||
	    n_pieces > UINT64_MAX / (per_piece * granularity))
		return -EOVERFLOW;
	memset(ret, 0, sizeof(*ret));
	ret->block_bytes = block_bytes;
	ret->n_blocks = n_blocks;
	ret->piece_bytes = per_piece * granularity;
	ret->n_pieces = (uint32_t)n_pieces;
	ret->span = n_pieces * ret->piece_bytes;
	return 0;
}

void vmm_piece_blocks(const struct vmm_pieces *p, uint32_t piece, uint32_t *ret_first,
		      uint32_t *ret_end)
{
	uint64_t start = (uint64_t)piece * p->piece_bytes, end = start + p->piece_bytes;
	uint64_t last = end / p->block_bytes + (end % p->block_bytes != 0);

	*ret_first = (uint32_t)(start / p->block_bytes);
	*ret_end = last < p->n_blocks ? (uint32_t)last : p->n_blocks;
}

bool vmm_piece_free(const struct vmm_pieces *p, uint32_t piece, const uint64_t *used)
{
	uint32_t b, end;

	vmm_piece_blocks(p, piece, &b, &end);
	for (; b < end; b++)
		if (used[b / 64] >> (b % 64) & 1)
			return false;
	return true;
}
