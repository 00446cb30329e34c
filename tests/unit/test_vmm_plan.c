/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The CUDA build's VMM arithmetic (tests/engine/vmm_plan.c) on the CPU:
 * the device code can only be compiled here, this part can be checked.
 */
#include <check.h>

#include "km-check.h"
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmm_plan.h"

#define MIB (1ull << 20)

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void set_used(uint64_t *used, uint32_t b)
{
	used[b / 64] |= 1ull << (b % 64);
}

START_TEST(test_vmm_plan_round_up)
{
	uint64_t r = 12345;

	ck_assert_int_eq(vmm_round_up(0, 2 * MIB, &r), 0);
	ck_assert_uint_eq(r, 0);
	ck_assert_int_eq(vmm_round_up(1, 2 * MIB, &r), 0);
	ck_assert_uint_eq(r, 2 * MIB);
	ck_assert_int_eq(vmm_round_up(2 * MIB, 2 * MIB, &r), 0);
	ck_assert_uint_eq(r, 2 * MIB);
	ck_assert_int_eq(vmm_round_up(2 * MIB + 1, 2 * MIB, &r), 0);
	ck_assert_uint_eq(r, 4 * MIB);
	ck_assert_int_eq(vmm_round_up(7, 3, &r), 0);
	ck_assert_uint_eq(r, 9);
	/* the largest multiple of 2 MiB fits, one byte more does not */
	ck_assert_int_eq(vmm_round_up(UINT64_MAX - 2 * MIB + 1, 2 * MIB, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX - 2 * MIB + 1);
	r = 5;
	ck_assert_int_eq(vmm_round_up(UINT64_MAX - 2 * MIB + 2, 2 * MIB, &r), -EOVERFLOW);
	ck_assert_int_eq(vmm_round_up(UINT64_MAX, 2, &r), -EOVERFLOW);
	ck_assert_uint_eq(r, 5); /* untouched on failure */
	ck_assert_int_eq(vmm_round_up(5, 0, &r), -EINVAL);
}
END_TEST

START_TEST(test_vmm_plan_pieces_fixed)
{
	struct vmm_pieces p;
	uint32_t first, end;

	/* 64 KiB blocks, 2 MiB granules: 32 blocks a piece, no straddling */
	ck_assert_int_eq(vmm_pieces_plan(64 << 10, 96, 2 * MIB, 4096, &p), 0);
	ck_assert_uint_eq(p.piece_bytes, 2 * MIB);
	ck_assert_uint_eq(p.n_pieces, 3);
	ck_assert_uint_eq(p.span, 6 * MIB);
	vmm_piece_blocks(&p, 1, &first, &end);
	ck_assert_uint_eq(first, 32);
	ck_assert_uint_eq(end, 64);

	/* 3 MiB blocks: 15 MiB in 8 pieces, blocks straddle */
	ck_assert_int_eq(vmm_pieces_plan(3 * MIB, 5, 2 * MIB, 4096, &p), 0);
	ck_assert_uint_eq(p.n_pieces, 8);
	ck_assert_uint_eq(p.span, 16 * MIB);
	vmm_piece_blocks(&p, 1, &first, &end); /* [2, 4) MiB: blocks 0 and 1 */
	ck_assert_uint_eq(first, 0);
	ck_assert_uint_eq(end, 2);
	vmm_piece_blocks(&p, 7, &first, &end); /* [14, 16) MiB: block 4, then the tail */
	ck_assert_uint_eq(first, 4);
	ck_assert_uint_eq(end, 5);

	/* a cap on the number of pieces: 100 granules, at most 30 pieces */
	ck_assert_int_eq(vmm_pieces_plan(MIB, 200, 2 * MIB, 30, &p), 0);
	ck_assert_uint_eq(p.piece_bytes, 8 * MIB);
	ck_assert_uint_eq(p.n_pieces, 25);
	ck_assert_uint_eq(p.span, 200 * MIB);

	/* one block smaller than a granule: one piece */
	ck_assert_int_eq(vmm_pieces_plan(4096, 1, 2 * MIB, 4096, &p), 0);
	ck_assert_uint_eq(p.n_pieces, 1);
	ck_assert_uint_eq(p.span, 2 * MIB);

	ck_assert_int_eq(vmm_pieces_plan(0, 5, 2 * MIB, 10, &p), -EINVAL);
	ck_assert_int_eq(vmm_pieces_plan(MIB, 0, 2 * MIB, 10, &p), -EINVAL);
	ck_assert_int_eq(vmm_pieces_plan(MIB, 5, 0, 10, &p), -EINVAL);
	ck_assert_int_eq(vmm_pieces_plan(MIB, 5, 2 * MIB, 0, &p), -EINVAL);
	ck_assert_int_eq(vmm_pieces_plan(UINT64_MAX / 2, 3, 2 * MIB, 10, &p), -EOVERFLOW);
	/* the pool fits, its span rounded to pieces does not */
	ck_assert_int_eq(vmm_pieces_plan(UINT64_MAX / 2, 2, 1ull << 62, 1, &p), -EOVERFLOW);
}
END_TEST

/* A block and a piece overlap: they share a byte. */
static int overlaps(const struct vmm_pieces *p, uint32_t b, uint32_t piece)
{
	uint64_t bs = b * p->block_bytes, be = bs + p->block_bytes;
	uint64_t ps = piece * p->piece_bytes, pe = ps + p->piece_bytes;

	return bs < pe && ps < be;
}

/* Every plan against brute force: sizes, coverage, the blocks of each piece. */
START_TEST(test_vmm_plan_pieces_invariants)
{
	uint64_t st = 7;

	for (int round = 0; round < 3000; round++) {
		uint64_t g = (splitmix(&st) % 8 + 1) * 4096;
		uint64_t bb = splitmix(&st) % (4 * g) + 1;
		uint32_t n = (uint32_t)(splitmix(&st) % 300 + 1);
		uint32_t cap = (uint32_t)(splitmix(&st) % 80 + 1);
		uint32_t prev_end = 0;
		struct vmm_pieces p;

		ck_assert_int_eq(vmm_pieces_plan(bb, n, g, cap, &p), 0);
		ck_assert_uint_eq(p.piece_bytes % g, 0);
		ck_assert_uint_le(p.n_pieces, cap);
		ck_assert_uint_eq(p.span, p.n_pieces * p.piece_bytes);
		ck_assert_uint_ge(p.span, bb * n);
		ck_assert_uint_lt(p.span - bb * n, p.piece_bytes); /* no piece beyond the pool */
		for (uint32_t i = 0; i < p.n_pieces; i++) {
			uint32_t first, end, want_first = UINT32_MAX, want_end = 0;

			vmm_piece_blocks(&p, i, &first, &end);
			for (uint32_t b = 0; b < n; b++)
				if (overlaps(&p, b, i)) {
					if (want_first == UINT32_MAX)
						want_first = b;
					want_end = b + 1;
				}
			ck_assert_uint_eq(first, want_first);
			ck_assert_uint_eq(end, want_end);
			/* pieces in order, every block in one or more of them */
			ck_assert_uint_le(first, prev_end);
			ck_assert_uint_ge(end, prev_end);
			prev_end = end;
		}
		ck_assert_uint_eq(prev_end, n);
	}
}
END_TEST

/*
 * A piece is free exactly when no byte of a used block lies in it: what
 * the release may drop never holds live KV, and nothing else is kept.
 */
START_TEST(test_vmm_plan_piece_free)
{
	uint64_t st = 11;

	for (int round = 0; round < 2000; round++) {
		uint64_t g = (splitmix(&st) % 4 + 1) * 4096;
		uint64_t bb = splitmix(&st) % (3 * g) + 1;
		uint32_t n = (uint32_t)(splitmix(&st) % 200 + 1);
		unsigned density = (unsigned)(splitmix(&st) % 100);
		uint64_t used[4] = { 0 };
		struct vmm_pieces p;

		for (uint32_t b = 0; b < n; b++)
			if (splitmix(&st) % 100 < density)
				set_used(used, b);
		ck_assert_int_eq(vmm_pieces_plan(bb, n, g, 1000, &p), 0);
		for (uint32_t i = 0; i < p.n_pieces; i++) {
			int live = 0;

			for (uint32_t b = 0; b < n; b++)
				live |= (used[b / 64] >> (b % 64) & 1) && overlaps(&p, b, i);
			ck_assert_int_eq(vmm_piece_free(&p, i, used), !live);
		}
	}
}
END_TEST

/* A used block straddling two pieces keeps both; its neighbours' pieces go. */
START_TEST(test_vmm_plan_straddling_block)
{
	uint64_t used[1] = { 0 };
	struct vmm_pieces p;

	ck_assert_int_eq(vmm_pieces_plan(3 * MIB, 5, 2 * MIB, 4096, &p), 0);
	for (uint32_t i = 0; i < p.n_pieces; i++)
		ck_assert(vmm_piece_free(&p, i, used));
	set_used(used, 1); /* [3, 6) MiB: pieces 1 and 2 */
	ck_assert(vmm_piece_free(&p, 0, used));
	ck_assert(!vmm_piece_free(&p, 1, used));
	ck_assert(!vmm_piece_free(&p, 2, used));
	ck_assert(vmm_piece_free(&p, 3, used));
	set_used(used, 4); /* [12, 15) MiB: pieces 6 and 7 (the tail) */
	ck_assert(vmm_piece_free(&p, 5, used));
	ck_assert(!vmm_piece_free(&p, 6, used));
	ck_assert(!vmm_piece_free(&p, 7, used));
}
END_TEST

int main(void)
{
	Suite *s = suite_create("vmm_plan");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_vmm_plan_round_up);
	tcase_add_test(tc, test_vmm_plan_pieces_fixed);
	tcase_add_test(tc, test_vmm_plan_pieces_invariants);
	tcase_add_test(tc, test_vmm_plan_piece_free);
	tcase_add_test(tc, test_vmm_plan_straddling_block);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
