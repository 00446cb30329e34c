/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Chunker and SHA-256 throughput.
 *
 *   bench_chunk [--size MiB] [--threads N] [--min B] [--avg B] [--max B]
 *               [--repeat R]
 *
 * Times, on deterministic random data, chunking alone, SHA-256 alone and
 * chunking + SHA-256 of every chunk (what the store does), on one thread
 * and on N threads that each take their own contiguous region. Each figure
 * is the best of R runs. Prints human lines, then one line of JSON.
 * Sizes accept a K, M or G suffix (powers of 1024).
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chunker.h"
#include "hash.h"
#include "workpool.h"

enum mode { MODE_CHUNK, MODE_HASH, MODE_CHUNK_HASH };

struct region {
	const uint8_t *p;
	size_t n;
	enum mode mode;
	const struct km_chunker_params *params;
	uint64_t chunks;
	uint64_t sink; /* keeps the hashes alive */
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fill_random(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t s = seed;
	size_t i;

	/* splitmix64, 8 bytes at a time. */
	for (i = 0; i + 8 <= n; i += 8) {
		uint64_t z = (s += 0x9e3779b97f4a7c15ULL);

		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
		z ^= z >> 31;
		memcpy(p + i, &z, 8);
	}
	for (; i < n; i++)
		p[i] = (uint8_t)(i * 131);
}

static void *run_region(void *arg)
{
	struct region *r = arg;
	struct km_chunker c;
	struct km_hash h;
	const uint8_t *p = r->p;
	size_t n = r->n;

	r->chunks = 0;
	r->sink = 0;
	if (r->mode == MODE_HASH) {
		/* Average-sized pieces, as the store hashes chunks. */
		size_t piece = r->params->avg_size;

		while (n > 0) {
			size_t k = n < piece ? n : piece;

			km_hash_buf(p, k, &h);
			r->sink += h.b[0];
			r->chunks++;
			p += k;
			n -= k;
		}
		return NULL;
	}

	km_chunker_init(&c, r->params);
	while (n > 0) {
		size_t k = km_chunker_scan(&c, p, n);

		if (k == KM_CHUNKER_NO_BOUNDARY)
			k = n;
		if (r->mode == MODE_CHUNK_HASH) {
			km_hash_buf(p, k, &h);
			r->sink += h.b[0];
		}
		r->chunks++;
		p += k;
		n -= k;
	}
	return NULL;
}

/* Returns the best GB/s over repeat runs; fills *ret_chunks. */
static double measure(const uint8_t *buf, size_t size, unsigned threads, enum mode mode,
		      const struct km_chunker_params *params, unsigned repeat,
		      uint64_t *ret_chunks)
{
	struct region *rs = calloc(threads, sizeof(*rs));
	pthread_t *tids = calloc(threads, sizeof(*tids));
	double best = 0;

	if (!rs || !tids) {
		fprintf(stderr, "bench_chunk: out of memory\n");
		exit(EXIT_FAILURE);
	}
	for (unsigned t = 0; t < threads; t++) {
		size_t a = size / threads * t;
		size_t b = t + 1 == threads ? size : size / threads * (t + 1);

		rs[t] = (struct region){ .p = buf + a, .n = b - a, .mode = mode, .params = params };
	}
	for (unsigned rep = 0; rep < repeat; rep++) {
		double t0 = now(), dt;
		uint64_t chunks = 0;

		if (threads == 1) {
			run_region(&rs[0]);
		} else {
			for (unsigned t = 0; t < threads; t++) {
				int r = pthread_create(&tids[t], NULL, run_region, &rs[t]);

				if (r != 0) {
					fprintf(stderr, "bench_chunk: pthread_create: %s\n",
						strerror(r));
					exit(EXIT_FAILURE);
				}
			}
			for (unsigned t = 0; t < threads; t++)
				pthread_join(tids[t], NULL);
		}
		dt = now() - t0;
		for (unsigned t = 0; t < threads; t++)
			chunks += rs[t].chunks;
		*ret_chunks = chunks;
		if ((double)size / dt / 1e9 > best)
			best = (double)size / dt / 1e9;
	}
	free(rs);
	free(tids);
	return best;
}

static int parse_size(const char *s, uint64_t unit, uint64_t *ret)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 'k': case 'K': unit = 1024; end++; break;
	case 'm': case 'M': unit = 1024 * 1024; end++; break;
	case 'g': case 'G': unit = 1024 * 1024 * 1024; end++; break;
	default: break;
	}
	if (*end || v > UINT64_MAX / unit)
		return -EINVAL;
	*ret = v * unit;
	return 0;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: bench_chunk [--size MiB] [--threads N] [--min B] [--avg B] [--max B]"
		   " [--repeat R]\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "threads", required_argument, NULL, 't' },
		{ "min", required_argument, NULL, 'm' },
		{ "avg", required_argument, NULL, 'a' },
		{ "max", required_argument, NULL, 'M' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct km_chunker_params params = KM_CHUNKER_PARAMS_DEFAULT;
	uint64_t size = 1024ULL * 1024 * 1024, v, chunks = 0, ignored;
	unsigned threads = km_cpu_count(), repeat = 3;
	double chunk1, hash1, both1, chunkn, hashn, bothn;
	uint8_t *buf;
	int o;

	while ((o = getopt_long(argc, argv, "s:t:r:h", opts, NULL)) != -1) {
		switch (o) {
		case 's':
			if (parse_size(optarg, 1024 * 1024, &size) < 0 || size == 0)
				goto bad;
			break;
		case 't':
		case 'r':
			if (parse_size(optarg, 1, &v) < 0 || v == 0 || v > 4096)
				goto bad;
			if (o == 't')
				threads = (unsigned)v;
			else
				repeat = (unsigned)v;
			break;
		case 'm':
		case 'a':
		case 'M':
			if (parse_size(optarg, 1, &v) < 0 || v > UINT32_MAX)
				goto bad;
			if (o == 'm')
				params.min_size = (uint32_t)v;
			else if (o == 'a')
				params.avg_size = (uint32_t)v;
			else
				params.max_size = (uint32_t)v;
			break;
		case 'h':
			usage(stdout);
			return EXIT_SUCCESS;
		default:
			goto bad;
		}
	}
	if (optind != argc)
		goto bad;
	if (km_chunker_params_check(&params) < 0) {
		fprintf(stderr, "bench_chunk: bad chunk sizes %u/%u/%u: %s\n", params.min_size,
			params.avg_size, params.max_size, strerror(EINVAL));
		return EXIT_FAILURE;
	}

	buf = malloc(size);
	if (!buf) {
		fprintf(stderr, "bench_chunk: cannot allocate %llu bytes\n",
			(unsigned long long)size);
		return EXIT_FAILURE;
	}
	fill_random(buf, size, 0x62656e6368ULL);

	printf("data: %.0f MiB random, chunks min/avg/max %u/%u/%u, best of %u\n",
	       (double)size / (1024 * 1024), params.min_size, params.avg_size, params.max_size,
	       repeat);

	chunk1 = measure(buf, size, 1, MODE_CHUNK, &params, repeat, &chunks);
	hash1 = measure(buf, size, 1, MODE_HASH, &params, repeat, &ignored);
	both1 = measure(buf, size, 1, MODE_CHUNK_HASH, &params, repeat, &ignored);
	printf("1 thread:   chunk %.2f GB/s, sha256 %.2f GB/s, chunk+sha256 %.2f GB/s\n", chunk1,
	       hash1, both1);
	printf("chunks: %llu, mean size %.0f bytes\n", (unsigned long long)chunks,
	       (double)size / (double)chunks);

	chunkn = measure(buf, size, threads, MODE_CHUNK, &params, repeat, &ignored);
	hashn = measure(buf, size, threads, MODE_HASH, &params, repeat, &ignored);
	bothn = measure(buf, size, threads, MODE_CHUNK_HASH, &params, repeat, &ignored);
	printf("%u threads: chunk %.2f GB/s, sha256 %.2f GB/s, chunk+sha256 %.2f GB/s\n", threads,
	       chunkn, hashn, bothn);

	printf("{\"chunk_gbps_1t\":%.3f,\"hash_gbps_1t\":%.3f,\"chunk_hash_gbps_1t\":%.3f,"
	       "\"chunk_gbps_nt\":%.3f,\"hash_gbps_nt\":%.3f,\"chunk_hash_gbps_nt\":%.3f,"
	       "\"threads\":%u,\"size_mib\":%.0f,\"chunks\":%llu,\"mean_chunk\":%.0f,"
	       "\"min\":%u,\"avg\":%u,\"max\":%u}\n",
	       chunk1, hash1, both1, chunkn, hashn, bothn, threads, (double)size / (1024 * 1024),
	       (unsigned long long)chunks, (double)size / (double)chunks, params.min_size,
	       params.avg_size, params.max_size);
	free(buf);
	return EXIT_SUCCESS;

bad:
	usage(stderr);
	return EXIT_FAILURE;
}
