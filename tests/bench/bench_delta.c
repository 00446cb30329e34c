/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * bench_delta [--size MiB] [--threads N] [--level L] [--repeat R]
 *
 * Compresses and decompresses deterministic bf16-like data (a normal
 * distribution, sigma 0.02, as model weights) through the delta writer and
 * reader, with the filter NEVER and AUTO, on N threads and on 1, each run R
 * times keeping the fastest (shared machines are noisy). Prints one line
 * per filter, then one JSON object on the last line for scripts. GB/s are
 * 1e9 bytes of raw data per second. The delta goes to an unlinked file in
 * $TMPDIR (default /tmp), so the page cache is part of what is measured.
 */
#include <errno.h>
#include <getopt.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "delta.h"
#include "workpool.h"

#define MIB (1024u * 1024)

struct run {
	double compress_s, open_s, decode_s;
	struct km_delta_summary sum;
};

struct result {
	const char *name;
	struct km_delta_summary sum;
	double compress_gbps_n, compress_gbps_1;
	double decompress_gbps_n, decompress_gbps_1;
	double open_gbps; /* reader open (frame table) plus SHA-256 of the whole file */
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng_next(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545F4914F6CDD1DULL;
}

/* Same generator as the unit test: Irwin-Hall (4 uniforms) ~ normal. */
static void gen_bf16(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t s = seed | 1;

	for (size_t i = 0; i + 1 < n; i += 2) {
		union {
			float f;
			uint32_t u;
		} v;
		double u = 0;
		uint16_t b;

		for (int k = 0; k < 4; k++)
			u += (double)(rng_next(&s) >> 11) / (double)(1ULL << 53);
		v.f = (float)((u - 2.0) * 1.7320508 * 0.02);
		b = (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
		p[i] = (uint8_t)b;
		p[i + 1] = (uint8_t)(b >> 8);
	}
	if (n & 1)
		p[n - 1] = 0;
}

static int tmp_fd(void)
{
	const char *dir = getenv("TMPDIR");
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/bench_delta.XXXXXX", dir && *dir ? dir : "/tmp");
	fd = mkstemp(path);
	if (fd >= 0)
		unlink(path);
	return fd;
}

struct sink_state {
	uint8_t *out;
	uint64_t size;
};

static int copy_sink(void *userdata, uint64_t off, const void *data, size_t n)
{
	struct sink_state *s = userdata;

	if (off > s->size || n > s->size - off)
		return -ERANGE;
	memcpy(s->out + off, data, n);
	return 0;
}

static int run_once(const uint8_t *data, uint8_t *out, size_t n, enum km_delta_filter_mode mode,
		    unsigned threads, int level, struct run *ret)
{
	struct km_delta_params p = { .level = level, .threads = threads, .filter = mode };
	struct km_delta_writer *w = NULL;
	struct km_delta_reader *rd = NULL;
	struct km_error err = { { 0 } };
	struct sink_state s = { .out = out, .size = n };
	double t;
	int fd, r;

	fd = tmp_fd();
	if (fd < 0) {
		fprintf(stderr, "bench_delta: temporary file: %s\n", strerror(errno));
		return -errno;
	}

	t = now();
	r = km_delta_writer_new(fd, &p, &w);
	for (size_t off = 0; r == 0 && off < n; off += MIB)
		r = km_delta_writer_append(w, data + off, n - off < MIB ? n - off : MIB);
	if (r == 0)
		r = km_delta_writer_finish(w, &ret->sum);
	km_delta_writer_free(w);
	ret->compress_s = now() - t;
	if (r < 0) {
		fprintf(stderr, "bench_delta: writing the delta: %s\n", strerror(-r));
		goto out;
	}

	t = now();
	r = km_delta_reader_open(fd, &rd, &err);
	if (r == 0) {
		struct km_hash h;

		r = km_delta_reader_sha256(rd, &h, &err);
	}
	ret->open_s = now() - t;
	if (r < 0) {
		fprintf(stderr, "bench_delta: opening the delta: %s\n", err.msg);
		goto out;
	}
	memset(out, 0, n);
	t = now();
	r = km_delta_reader_decode(rd, threads, copy_sink, &s, &err);
	ret->decode_s = now() - t;
	km_delta_reader_free(rd);
	if (r != 0) {
		fprintf(stderr, "bench_delta: decoding the delta: %s\n", err.msg);
		r = r < 0 ? r : -EIO;
		goto out;
	}
	if (memcmp(out, data, n) != 0) {
		fprintf(stderr, "bench_delta: round trip mismatch\n");
		r = -EIO;
	}
out:
	close(fd);
	return r;
}

/* The fastest of 'repeat' runs, phase by phase. */
static int run_best(const uint8_t *data, uint8_t *out, size_t n, enum km_delta_filter_mode mode,
		    unsigned threads, int level, unsigned repeat, struct run *ret)
{
	for (unsigned i = 0; i < repeat; i++) {
		struct run r;

		if (run_once(data, out, n, mode, threads, level, &r) < 0)
			return -1;
		if (i == 0) {
			*ret = r;
			continue;
		}
		ret->compress_s = r.compress_s < ret->compress_s ? r.compress_s : ret->compress_s;
		ret->open_s = r.open_s < ret->open_s ? r.open_s : ret->open_s;
		ret->decode_s = r.decode_s < ret->decode_s ? r.decode_s : ret->decode_s;
	}
	return 0;
}

static double gbps(size_t n, double s)
{
	return s > 0 ? (double)n / s / 1e9 : 0;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: bench_delta [--size MiB] [--threads N] [--level L] [--repeat R]\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "threads", required_argument, NULL, 't' },
		{ "level", required_argument, NULL, 'l' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{},
	};
	const enum km_delta_filter_mode modes[] = { KM_DELTA_FILTER_NEVER, KM_DELTA_FILTER_AUTO };
	const char *names[] = { "never", "auto" };
	struct result res[2];
	unsigned long size_mib = 256, threads = 0, repeat = 3;
	long level = KM_DELTA_LEVEL_DEFAULT;
	uint8_t *data, *out;
	size_t n;
	int c;

	while ((c = getopt_long(argc, argv, "s:t:l:r:h", opts, NULL)) >= 0) {
		char *end;

		switch (c) {
		case 's':
			size_mib = strtoul(optarg, &end, 10);
			if (*end || size_mib == 0) {
				usage(stderr);
				return 2;
			}
			break;
		case 't':
			threads = strtoul(optarg, &end, 10);
			if (*end || threads > 1024) {
				usage(stderr);
				return 2;
			}
			break;
		case 'l':
			level = strtol(optarg, &end, 10);
			if (*end || level < -100 || level > 22 || level == 0) {
				usage(stderr);
				return 2;
			}
			break;
		case 'r':
			repeat = strtoul(optarg, &end, 10);
			if (*end || repeat == 0 || repeat > 100) {
				usage(stderr);
				return 2;
			}
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (threads == 0)
		threads = km_cpu_count();

	n = (size_t)size_mib * MIB;
	data = malloc(n);
	out = malloc(n);
	if (!data || !out) {
		fprintf(stderr, "bench_delta: out of memory for %lu MiB\n", size_mib);
		return 1;
	}
	gen_bf16(data, n, 0x6b766d6f74696f6eULL);
	printf("bench_delta: %lu MiB bf16-like, level %ld, frame %u KiB, %lu threads, best of %lu\n",
	       size_mib, level, KM_DELTA_FRAME_SIZE_DEFAULT / 1024, threads, repeat);

	{
		/* Untimed: faults in the heap and the page cache's first pages. */
		struct run warm;

		if (run_once(data, out, n < 64 * MIB ? n : 64 * MIB, KM_DELTA_FILTER_AUTO,
			     (unsigned)threads, (int)level, &warm) < 0)
			return 1;
	}
	for (size_t m = 0; m < 2; m++) {
		struct run rn, r1;

		if (run_best(data, out, n, modes[m], (unsigned)threads, (int)level,
			     (unsigned)repeat, &rn) < 0)
			return 1;
		if (threads == 1)
			r1 = rn;
		else if (run_best(data, out, n, modes[m], 1, (int)level, (unsigned)repeat, &r1) < 0)
			return 1;
		res[m] = (struct result){
			.name = names[m],
			.sum = rn.sum,
			.compress_gbps_n = gbps(n, rn.compress_s),
			.compress_gbps_1 = gbps(n, r1.compress_s),
			.decompress_gbps_n = gbps(n, rn.decode_s),
			.decompress_gbps_1 = gbps(n, r1.decode_s),
			.open_gbps = gbps(rn.sum.compressed_size, rn.open_s),
		};
		printf("%-5s ratio %.4f (%llu -> %llu bytes, %llu/%llu frames filtered)  "
		       "compress %.3f GB/s (%lu thr) %.3f GB/s (1 thr)  "
		       "decompress %.3f GB/s (%lu thr) %.3f GB/s (1 thr)  open %.3f GB/s\n",
		       names[m], (double)n / (double)rn.sum.compressed_size,
		       (unsigned long long)n, (unsigned long long)rn.sum.compressed_size,
		       (unsigned long long)rn.sum.frames_filtered,
		       (unsigned long long)rn.sum.frames, res[m].compress_gbps_n, threads,
		       res[m].compress_gbps_1, res[m].decompress_gbps_n, threads,
		       res[m].decompress_gbps_1, res[m].open_gbps);
	}

	printf("{\"size_mib\":%lu,\"threads\":%lu,\"level\":%ld,\"frame_size\":%u,\"repeat\":%lu",
	       size_mib, threads, level, KM_DELTA_FRAME_SIZE_DEFAULT, repeat);
	for (size_t m = 0; m < 2; m++)
		printf(",\"%s\":{\"ratio\":%.4f,\"compressed_bytes\":%llu,\"frames\":%llu,"
		       "\"frames_filtered\":%llu,\"compress_gbps\":%.3f,\"compress_gbps_1t\":%.3f,"
		       "\"decompress_gbps\":%.3f,\"decompress_gbps_1t\":%.3f,\"open_gbps\":%.3f}",
		       res[m].name, (double)n / (double)res[m].sum.compressed_size,
		       (unsigned long long)res[m].sum.compressed_size,
		       (unsigned long long)res[m].sum.frames,
		       (unsigned long long)res[m].sum.frames_filtered, res[m].compress_gbps_n,
		       res[m].compress_gbps_1, res[m].decompress_gbps_n, res[m].decompress_gbps_1,
		       res[m].open_gbps);
	printf("}\n");
	free(data);
	free(out);
	return 0;
}
