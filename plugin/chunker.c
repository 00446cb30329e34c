/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * FastCDC-style content-defined chunking.
 *
 * The cut rule is part of the on-disk format (chunk ids are hashes of the
 * chunks it produces), so it is spelled out here and must never change:
 *
 *   For a chunk starting at byte s, let H(L) for L >= 64 be the gear hash of
 *   the 64 bytes ending at s + L - 1:
 *
 *           H(L) = sum_{k=0..63} gear[x[s + L - 1 - k]] << k   (mod 2^64)
 *
 *   which is what hash = (hash << 1) + gear[byte] computes, since bytes
 *   older than 64 have been shifted out. The chunk length is the smallest L
 *   with min <= L < max and (H(L) & mask(L)) == 0, else max. mask(L) is
 *   mask_small (the top log2(avg) + 2 bits) for L < avg and mask_large (the
 *   top log2(avg) - 2 bits) for L >= avg: FastCDC normalization level 2.
 *   The last chunk of a stream is whatever is left.
 *
 * Top bits are used because bit k of H depends on the last k + 1 bytes
 * only; the low bits would see just a handful of bytes.
 *
 * Since H(L) only depends on the last 64 bytes and L >= min >= 64, the
 * first min - 64 bytes of a chunk are not hashed at all.
 */
#include "chunker.h"

#include <errno.h>

/*
 * splitmix64 seeded with 0x6b766d6f74696f6e ("kvmotion"), 256 outputs.
 * Part of the format: never regenerate or edit.
 */
static const uint64_t gear[256] = {
	0x94f835a4dc8d575bULL, 0x835ba6ce1897cee7ULL, 0x9efebe36108fb2faULL,
	0x2683ff35cd1a9c6eULL, 0x79f0a32f92599c95ULL, 0x97a9d21426b2a38fULL,
	0x2da15d8d7b479c4aULL, 0x62c9e005c0f3021dULL, 0xcb77a3e6a174e31fULL,
	0x4022bf630f467952ULL, 0xe4d62bc043258ec1ULL, 0x74a18ddbf9933ffbULL,
	0x98c930afacc73aa1ULL, 0x6d9e4ff9a9a6d11cULL, 0x74637abed7028a16ULL,
	0x8b574e06966f2260ULL, 0x84061571664b1a7dULL, 0xd2ff020cf1e160f1ULL,
	0x9e306bb6a24f9218ULL, 0x8adf08838cca2230ULL, 0x0362b5d6fcd81cb0ULL,
	0x49cc6501b359dbaaULL, 0x66d12597b074d720ULL, 0xd2f058f3162c5e42ULL,
	0xc0faf7420de474e5ULL, 0x7eb1cc1e6f7250fdULL, 0xa2da137bde4c72f1ULL,
	0x85b6ad01008e003dULL, 0xe71a7d16dc2c409dULL, 0xe8dd12d28e69c054ULL,
	0x410a92d0fe62e404ULL, 0x2c95843b334d3348ULL, 0x2a2d497b730e9a53ULL,
	0x85e71ac32490a743ULL, 0x8b15a98b5ff3b8a5ULL, 0xf19fbb7c403f354fULL,
	0x51978879e930b819ULL, 0xa68c3e9d66dc7ddaULL, 0x5f099c6a377c6af4ULL,
	0x0ccca929eb68f3e1ULL, 0xaa7faaae5cf920caULL, 0xc0647de3c6629613ULL,
	0x83821c1c9c15bc62ULL, 0xd487c04266ada804ULL, 0x651ad9dc114248daULL,
	0xf75ca607b2da6606ULL, 0xb20558519e38fb52ULL, 0x668d8a3950be9045ULL,
	0x80dd25a601d8a957ULL, 0x33fb8eb8c74f82c6ULL, 0x7aa8ff8838b29dc1ULL,
	0x424af629e2a98d2eULL, 0xc615d943159ac7ecULL, 0xfb2599e099db8224ULL,
	0x487aba6c3e258b68ULL, 0xbe0cda735790a5ebULL, 0x9656414cd84312e0ULL,
	0x89c6be517b5856d3ULL, 0x190a9fae6959de9bULL, 0x1d507c6b61fb9e61ULL,
	0xa60c42137c9f3059ULL, 0xd02be7688d12c314ULL, 0x0f5d46e9b2427b43ULL,
	0x20c97747d36346a8ULL, 0xcc87b0b5b7f76c8cULL, 0x1fe77301fb01af6bULL,
	0x95eff6e56d8bc0f5ULL, 0x48135bf92a9cffdaULL, 0x5b8dd0a2bc4e9d94ULL,
	0x2a170cb59aaf5828ULL, 0x8e53a0fbf4cbcb55ULL, 0xfaec32366d8aeccfULL,
	0x6094fc319fd4f8a4ULL, 0x33cf75801fc65390ULL, 0x84a5f60037ab3aefULL,
	0xacddcd650b758a86ULL, 0x2eda03502e482b0dULL, 0x59a04700b6730c2aULL,
	0x43c73f32a1aca15dULL, 0x7413df5e2835e334ULL, 0xc8f4ecaac138b530ULL,
	0x615d678e47ae0003ULL, 0xf61bb8809f6e7499ULL, 0x15f5992850a1a916ULL,
	0xa452088da685d59cULL, 0x3ef9b745af138bd9ULL, 0x095c56752b0304bbULL,
	0xf068c6c3d0138a3eULL, 0xd0f8cec4e9383955ULL, 0xa1e1576f6f4d72deULL,
	0xe19d240a147829e2ULL, 0xbcba9ed9c610361fULL, 0x140593d7b375cc71ULL,
	0x53507d2bb68297caULL, 0xa6d5410cd54f7dffULL, 0xbb3f6f81f3624c38ULL,
	0xa9feb8068c9b6d8cULL, 0x3ed0fe5bf362a7d7ULL, 0x2d398487c5f53b9fULL,
	0x34a9b77dd1c5e2e0ULL, 0x03765f095ff2e9a9ULL, 0xde876e58044fd56bULL,
	0x2007e7e3994afa17ULL, 0xee63c74b26c0983eULL, 0x157685220806d1f6ULL,
	0xc2f7bb80717cce97ULL, 0x20aae299140c7ebdULL, 0xf771ed4d994ea1d9ULL,
	0xd814d407fdfa564cULL, 0x75f17acf1e8161d4ULL, 0x313e5151098815ebULL,
	0xfe3ed69ce3308583ULL, 0xdfadbad10cbd7c0cULL, 0xebe164804b28e990ULL,
	0x2345b8d89c4a449fULL, 0x3385de6fd1548fc8ULL, 0x47118f860d4d2377ULL,
	0x1e1f8c47ffa0a4d1ULL, 0xdc9df9d0583fa316ULL, 0x167428473d0a174aULL,
	0x0ab0712eab48fb68ULL, 0x7a7d81ac2461a477ULL, 0xadaeaa7b780710f8ULL,
	0xc192f300502757bdULL, 0x7abd9dd824adf07eULL, 0x56d9df49a991a620ULL,
	0xea1540c960cbd15dULL, 0xd91ea1f4f6e9fe6fULL, 0x52a66b0e93be9db1ULL,
	0x3fa3d7c659d16d4eULL, 0xda37b3548316793eULL, 0xcfe4c0bae3a50d67ULL,
	0x63166329bcf78565ULL, 0xcd702d1d5995b391ULL, 0x08064fb6d6e422caULL,
	0x57d4bb8f3a23da5dULL, 0xd0b36f8887191834ULL, 0xa9ad37c2f0cac4f9ULL,
	0xb0b9918bed916247ULL, 0x5f70555d0b2ce10fULL, 0xc6c41c62fbf534adULL,
	0xce659e1619c2ce7dULL, 0x036b4111284fafa5ULL, 0xb79562326cca97f1ULL,
	0x017a140a34b41829ULL, 0x97afd22cf1c4d1f2ULL, 0xbb9b47463980610bULL,
	0x0214fd2ea1775b7fULL, 0x56f0f539870a28ddULL, 0x0aa3dbe7618ef49dULL,
	0xc2ede3327d168894ULL, 0xdb615ba76fb9e0f2ULL, 0x13805d93f9b01197ULL,
	0xe046aaa3d2fcfec9ULL, 0x27d17a7a453256d6ULL, 0x3936114c67ebf735ULL,
	0x2aba4a672ca4695fULL, 0xc27ef2961d66952dULL, 0xc6abc1392af4515dULL,
	0x2776ddcb14528254ULL, 0xa8e9ed75d6d14600ULL, 0x94966a91cf0cc305ULL,
	0xd5cbad900a56a84eULL, 0x00720c5fcf39a067ULL, 0x52d66a31ccea7b8cULL,
	0xffd3129ff8ecd051ULL, 0xdc68b6b036681184ULL, 0xef743196bba0be9cULL,
	0x4a523f838b2ed213ULL, 0xb09384baa3573b04ULL, 0xe98b770b83455f6dULL,
	0x1ccf340253f2f187ULL, 0x805eac9a01288c95ULL, 0x2d4e8916f398939aULL,
	0x109a0de8c1aee4ebULL, 0xbe5189d2e31a1ba7ULL, 0x61c313f70cbf015bULL,
	0x80790e951ca774a4ULL, 0xad9f1ac6522e7da1ULL, 0x81fee466e0e54168ULL,
	0xc7a872a36f8a5e93ULL, 0x67953d1e52973661ULL, 0xbf951989f4570619ULL,
	0xa07444bd18140b26ULL, 0x4f3ca453912292dbULL, 0xdc393e321f6eaa18ULL,
	0x1e16332c49de041cULL, 0x884bedc3f9df4be7ULL, 0x46e6cbc9a1d59382ULL,
	0x8e9a13ccb71c181eULL, 0x92b76b592772fa50ULL, 0x0729ea89f64de97aULL,
	0x663762dc90cf9806ULL, 0xb8a3a0a68a3c7d69ULL, 0x399cb3c1e511415eULL,
	0x2dbba27262801b77ULL, 0x3211f6bdc4774ac8ULL, 0xc98503ced94051b0ULL,
	0x16738d7093e17f86ULL, 0x578c05ad8fa01f48ULL, 0xc741d14342d88b05ULL,
	0x5d20882c84c65697ULL, 0xd1b74086ce8d2580ULL, 0xceabde5ebd8d530fULL,
	0xb6f6c772cadcd3bcULL, 0x2a97e74faf8be908ULL, 0xe5f579beddac823eULL,
	0x666b879432e7b6beULL, 0xa902b9885310b898ULL, 0x547315597bd60d90ULL,
	0x52905c513775beafULL, 0x1a39643721a893c7ULL, 0x182540fb5474275bULL,
	0xc3d8c49f93501846ULL, 0xeaaf77a5fb88e404ULL, 0x7023308e9dee6c9aULL,
	0x1d704a2db771b19aULL, 0x0b6b66baa46d1eb1ULL, 0x6804b1210747c1faULL,
	0x80bc48fa475aab24ULL, 0x9e831df98657843aULL, 0x76187fa420ad583cULL,
	0x87fb1714e89de27eULL, 0x799e829b51e3833eULL, 0x57b9b77ccfaff723ULL,
	0xade248cb8ef7def5ULL, 0x082c3b28105ffa0dULL, 0xab1e15cb5ae49ef4ULL,
	0x785f13f09c683dbbULL, 0xb6d3b64d52d07d45ULL, 0xf5ddc29f81449d88ULL,
	0x9c844e5e656b73d2ULL, 0x4b9e3dc0df2208a7ULL, 0xc9ab42753fc35383ULL,
	0x74b03c310827184bULL, 0xd368d3ed2e2d3fe7ULL, 0xe31afa4f556f951eULL,
	0x42deaed04ecdec22ULL, 0xf074b2956fae37e1ULL, 0x888ddb7b0a094f45ULL,
	0xa334a056c15cd0abULL, 0x332a1f699f984e1cULL, 0x002c1df0eecb165dULL,
	0x1f30cbd67e7fd7a3ULL, 0x624a111fae58b760ULL, 0x4f505ae76fbb02e3ULL,
	0x01376c42dfae48b0ULL, 0x96e1dc8efd5eb733ULL, 0x87127a6a6556f96fULL,
	0xa2adaff1cbdfeafaULL, 0xf2fca08f2a9e9d1bULL, 0x34389dc5af207ad3ULL,
	0x9bf135620e6c34bdULL, 0xe5a303a161675082ULL, 0x6d6b5438ce0d2d52ULL,
	0x4f3750f74f38297fULL,
};

#define NOT_FOUND ((size_t)-1)

int km_chunker_params_check(const struct km_chunker_params *p)
{
	if (!p)
		return -EINVAL;
	if (p->min_size < KM_CHUNK_MIN_LIMIT || p->max_size > KM_CHUNK_MAX_LIMIT)
		return -EINVAL;
	if (p->min_size > p->avg_size || p->avg_size > p->max_size)
		return -EINVAL;
	if (p->avg_size & (p->avg_size - 1))
		return -EINVAL;
	return 0;
}

int km_chunker_init(struct km_chunker *c, const struct km_chunker_params *p)
{
	int bits, r;

	r = km_chunker_params_check(p);
	if (r < 0)
		return r;
	/* avg >= min >= 64, so 6 <= bits <= 26: both shifts are in range. */
	bits = __builtin_ctz(p->avg_size);
	c->params = *p;
	c->mask_small = ~0ULL << (64 - (bits + 2));
	c->mask_large = ~0ULL << (64 - (bits - 2));
	km_chunker_reset(c);
	return 0;
}

void km_chunker_reset(struct km_chunker *c)
{
	c->hash = 0;
	c->chunk_len = 0;
}

/* Hashes p[i..end) into *hp without looking for cuts. */
static void warm(const uint8_t *p, size_t i, size_t end, uint64_t *hp)
{
	uint64_t h = *hp;

	for (; i < end; i++)
		h = (h << 1) + gear[p[i]];
	*hp = h;
}

/*
 * Hashes p[i..end) into *hp and returns the index just past the first byte
 * after which (hash & m) == 0, or NOT_FOUND (then *hp is updated).
 *
 * Eight bytes per round: the hash after byte j of the round is
 * (h << (j + 1)) + s_j with s_j = (s_{j-1} << 1) + g_j, so the only serial
 * dependency between rounds is h = (h << 8) + s_7, and the eight tests
 * run in parallel. Same values as the byte loop, hence the same cuts.
 */
static size_t scan_mask(const uint8_t *p, size_t i, size_t end, uint64_t *hp, uint64_t m)
{
	uint64_t h = *hp;

	while (end - i >= 8) {
		const uint8_t *q = p + i;
		uint64_t s0 = gear[q[0]];
		uint64_t s1 = (s0 << 1) + gear[q[1]];
		uint64_t s2 = (s1 << 1) + gear[q[2]];
		uint64_t s3 = (s2 << 1) + gear[q[3]];
		uint64_t s4 = (s3 << 1) + gear[q[4]];
		uint64_t s5 = (s4 << 1) + gear[q[5]];
		uint64_t s6 = (s5 << 1) + gear[q[6]];
		uint64_t s7 = (s6 << 1) + gear[q[7]];

		if (__builtin_expect(!(((h << 1) + s0) & m), 0))
			return i + 1;
		if (__builtin_expect(!(((h << 2) + s1) & m), 0))
			return i + 2;
		if (__builtin_expect(!(((h << 3) + s2) & m), 0))
			return i + 3;
		if (__builtin_expect(!(((h << 4) + s3) & m), 0))
			return i + 4;
		if (__builtin_expect(!(((h << 5) + s4) & m), 0))
			return i + 5;
		if (__builtin_expect(!(((h << 6) + s5) & m), 0))
			return i + 6;
		if (__builtin_expect(!(((h << 7) + s6) & m), 0))
			return i + 7;
		h = (h << 8) + s7;
		if (__builtin_expect(!(h & m), 0))
			return i + 8;
		i += 8;
	}
	for (; i < end; i++) {
		h = (h << 1) + gear[p[i]];
		if (!(h & m))
			return i + 1;
	}
	*hp = h;
	return NOT_FOUND;
}

/* Chunk position pos as an index into a buffer that starts at chunk byte len, within [0, n]. */
static inline size_t clamp_pos(uint64_t pos, uint64_t len, size_t n)
{
	if (pos <= len)
		return 0;
	return pos - len < n ? pos - len : n;
}

size_t km_chunker_scan(struct km_chunker *c, const void *data, size_t n)
{
	const uint8_t *p = data;
	const uint64_t len = c->chunk_len;
	const uint64_t min = c->params.min_size, max = c->params.max_size;
	const uint64_t avg = c->params.avg_size;
	uint64_t h = c->hash;
	size_t i, end, k;

	/*
	 * p[i] is byte len + i of the chunk. Byte pos completes length pos + 1:
	 * bytes [min - 64, min - 1) are only hashed, [min - 1, avg - 1) are
	 * tested against mask_small, [avg - 1, max - 1) against mask_large,
	 * and byte max - 1 always ends the chunk.
	 */
	i = clamp_pos(min - 64, len, n);
	end = clamp_pos(min - 1, len, n);
	warm(p, i, end, &h);

	i = end;
	end = clamp_pos(avg - 1, len, n);
	k = scan_mask(p, i, end, &h, c->mask_small);
	if (k != NOT_FOUND)
		goto cut;

	i = end;
	end = clamp_pos(max - 1, len, n);
	k = scan_mask(p, i, end, &h, c->mask_large);
	if (k != NOT_FOUND)
		goto cut;

	if (len + n >= max) {
		k = (size_t)(max - len);
		goto cut;
	}
	c->hash = h;
	c->chunk_len = len + n;
	return KM_CHUNKER_NO_BOUNDARY;

cut:
	km_chunker_reset(c);
	return k;
}
