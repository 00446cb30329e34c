/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * memproc: the process the integration tests checkpoint and restore.
 *
 *   memproc --model FILE --dynamic MiB --progress FILE
 *           [--interval-ms N] [--verify-every N] [--seed N] [--map-file FILE]
 *
 * It stands in for an inference engine: the whole model file is read() into
 * private anonymous memory (like weights uploaded to a GPU, so that CRIU dumps
 * them as pages instead of recording a file mapping), and a "dynamic" region
 * of --dynamic MiB, filled with pseudo-random data, has random blocks
 * rewritten every couple of milliseconds (like a KV cache).
 *
 * With --map-file, FILE is also mapped MAP_SHARED and PROT_READ, the way an
 * engine maps a weights file (plugin/weights.h), and every page of it is read
 * at start so that all of it is resident: CRIU must record that mapping by
 * path and dump none of its pages. Its checksum is taken at start and
 * compared on SIGUSR1 (the VERIFY line covers it).
 *
 * The progress file (opened once, never resized after the first write, since
 * CRIU refuses to restore a writable file whose size changed) holds two
 * fixed-width lines, rewritten with one pwrite at offset 0 every --interval-ms
 * (default 20):
 *
 *   <counter> <model-checksum> <dynamic-checksum>
 *   VERIFY <OK  |BAD |NONE> <number of verifications>
 *
 * The counter increases by one per write. The model checksum is recomputed
 * over the whole anonymous copy at start and every --verify-every writes
 * (default 100); it stays equal to the one printed at start unless memory was
 * damaged. The dynamic checksum hashes the per-block checksums kept for the
 * region. On SIGUSR1 the model checksum is recomputed and compared with the
 * one taken at start, and every dynamic block with its recorded checksum;
 * the second line then says OK or BAD and its count increases. SIGTERM and
 * SIGINT end the process with status 0.
 *
 * Restorable by CRIU: single-threaded, no sockets, no terminal (it makes
 * itself a session leader if it is not one already), only regular files
 * open. It prints one line to stdout at start and nothing after.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "rng.h"

#define BLOCK_SIZE (64u << 10) /* dynamic region: unit of rewrite and checksum */
#define REWRITE_EVERY_NS 2000000L

static volatile sig_atomic_t got_usr1;
static volatile sig_atomic_t got_term;

static __attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...)
{
	va_list ap;

	fputs("memproc: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void on_usr1(int sig)
{
	got_usr1 = 1;
}

static void on_term(int sig)
{
	got_term = 1;
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	if (*s == '-')
		die("%s: invalid number '%s'", opt, s);
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end)
		die("%s: invalid number '%s'", opt, s);
	return v;
}


/*
 * A fast 64-bit checksum (four multiply-rotate lanes, in the manner of
 * xxHash64; not compatible with it). Not cryptographic: it only has to catch
 * damage.
 */
#define P1 0x9e3779b185ebca87ULL
#define P2 0xc2b2ae3d27d4eb4fULL
#define P3 0x165667b19e3779f9ULL

static inline uint64_t lane(uint64_t acc, uint64_t w)
{
	return rotl(acc + w * P2, 31) * P1;
}

static uint64_t checksum(const void *buf, size_t n)
{
	const unsigned char *p = buf;
	uint64_t a = P1 + P2, b = P2, c = 0, d = (uint64_t)0 - P1;
	uint64_t h, w;
	size_t i = 0;

	for (; i + 32 <= n; i += 32) {
		uint64_t x[4];

		memcpy(x, p + i, sizeof(x));
		a = lane(a, x[0]);
		b = lane(b, x[1]);
		c = lane(c, x[2]);
		d = lane(d, x[3]);
	}
	h = rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18) + (uint64_t)n;
	for (; i + 8 <= n; i += 8) {
		memcpy(&w, p + i, sizeof(w));
		h = rotl(h ^ lane(0, w), 27) * P1 + P3;
	}
	for (; i < n; i++)
		h = rotl(h ^ (p[i] * P1), 11) * P2;
	h ^= h >> 33;
	h *= P2;
	h ^= h >> 29;
	h *= P3;
	h ^= h >> 32;
	return h;
}

static void *map_anon(size_t n)
{
	void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		       0);

	if (p == MAP_FAILED)
		die("mmap %zu bytes: %s", n, strerror(errno));
	return p;
}

/* Maps path shared and read-only, reading every page so that all are resident. */
static size_t map_file(const char *path, const unsigned char **out)
{
	struct stat st;
	size_t size;
	long page = sysconf(_SC_PAGESIZE);
	volatile unsigned char sink = 0;
	const unsigned char *p;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		die("%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		die("%s: not a regular file", path);
	size = (size_t)st.st_size;
	if (!size)
		die("%s: empty file, nothing to map", path);
	p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s: %s", path, strerror(errno));
	/* the mapping keeps the file: no descriptor of it stays open */
	close(fd);
	for (size_t off = 0; off < size; off += (size_t)page)
		sink ^= p[off];
	(void)sink;
	*out = p;
	return size;
}

static size_t read_model(const char *path, unsigned char **out)
{
	struct stat st;
	size_t size, done = 0;
	unsigned char *mem;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		die("%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0)
		die("%s: %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode))
		die("%s: not a regular file", path);
	size = (size_t)st.st_size;
	mem = map_anon(size);
	while (done < size) {
		ssize_t k = read(fd, mem + done, size - done);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			die("reading %s: %s", path, strerror(errno));
		}
		if (k == 0)
			die("%s: file shrank while being read", path);
		done += (size_t)k;
	}
	/* no file of the model stays open or mapped: its bytes are only in memory */
	close(fd);
	*out = mem;
	return size;
}

static void fill_random(struct rng *r, unsigned char *p, size_t n)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		uint64_t v = rng_next(r);

		memcpy(p + i, &v, sizeof(v));
	}
	for (; i < n; i++)
		p[i] = (unsigned char)rng_next(r);
}

struct state {
	const unsigned char *map; /* --map-file, or NULL */
	size_t map_size;
	uint64_t map_sum0;
	unsigned char *model;
	size_t model_size;
	uint64_t model_sum0; /* at start */
	uint64_t model_sum;  /* last recomputed */
	unsigned char *dyn;
	size_t dyn_size;
	size_t nblocks;
	uint64_t *block_sum;
	uint64_t counter;
	uint64_t verifications;
	const char *verify_status;
	int progress_fd;
	struct rng rng;
};

static size_t block_len(const struct state *s, size_t b)
{
	size_t off = b * BLOCK_SIZE;

	return s->dyn_size - off < BLOCK_SIZE ? s->dyn_size - off : BLOCK_SIZE;
}

static void rewrite_block(struct state *s)
{
	size_t b;

	if (!s->nblocks)
		return;
	b = (size_t)(rng_next(&s->rng) % s->nblocks);
	fill_random(&s->rng, s->dyn + b * BLOCK_SIZE, block_len(s, b));
	s->block_sum[b] = checksum(s->dyn + b * BLOCK_SIZE, block_len(s, b));
}

static uint64_t dyn_checksum(const struct state *s)
{
	return checksum(s->block_sum, s->nblocks * sizeof(*s->block_sum));
}

static void verify(struct state *s)
{
	bool ok = true;

	s->model_sum = checksum(s->model, s->model_size);
	if (s->model_sum != s->model_sum0)
		ok = false;
	if (s->map && checksum(s->map, s->map_size) != s->map_sum0)
		ok = false;
	for (size_t b = 0; b < s->nblocks; b++)
		if (checksum(s->dyn + b * BLOCK_SIZE, block_len(s, b)) != s->block_sum[b])
			ok = false;
	s->verifications++;
	s->verify_status = ok ? "OK  " : "BAD ";
}

static void write_progress(struct state *s)
{
	char line[128];
	int n = snprintf(line, sizeof(line),
			 "%020" PRIu64 " %016" PRIx64 " %016" PRIx64 "\nVERIFY %s %010" PRIu64 "\n",
			 s->counter, s->model_sum, dyn_checksum(s), s->verify_status,
			 (uint64_t)(s->verifications % 10000000000ULL));
	ssize_t k;

	do
		k = pwrite(s->progress_fd, line, (size_t)n, 0);
	while (k < 0 && errno == EINTR);
	if (k != n)
		die("writing the progress file: %s", k < 0 ? strerror(errno) : "short write");
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, NULL, 'm' },
		{ "dynamic", required_argument, NULL, 'd' },
		{ "progress", required_argument, NULL, 'p' },
		{ "interval-ms", required_argument, NULL, 'i' },
		{ "verify-every", required_argument, NULL, 'v' },
		{ "seed", required_argument, NULL, 's' },
		{ "map-file", required_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	const char *model_path = NULL, *progress_path = NULL, *map_path = NULL;
	uint64_t dyn_mib = 0, interval_ms = 20, verify_every = 100, seed = 1;
	struct state s = { .verify_status = "NONE" };
	struct sigaction sa = { 0 };
	int64_t last_write, interval_ns;
	unsigned writes = 0;
	int opt;

	while ((opt = getopt_long(argc, argv, "m:d:p:i:v:s:f:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'm':
			model_path = optarg;
			break;
		case 'd':
			dyn_mib = parse_u64("--dynamic", optarg);
			if (dyn_mib > (1u << 20))
				die("--dynamic: at most 1048576 MiB");
			break;
		case 'p':
			progress_path = optarg;
			break;
		case 'i':
			interval_ms = parse_u64("--interval-ms", optarg);
			if (!interval_ms || interval_ms > 60000)
				die("--interval-ms must be 1..60000");
			break;
		case 'v':
			verify_every = parse_u64("--verify-every", optarg);
			break;
		case 's':
			seed = parse_u64("--seed", optarg);
			break;
		case 'f':
			map_path = optarg;
			break;
		case 'h':
			puts("usage: memproc --model FILE --dynamic MiB --progress FILE\n"
			     "               [--interval-ms N] [--verify-every N] [--seed N]\n"
			     "               [--map-file FILE]");
			return 0;
		default:
			return 2;
		}
	}
	if (!model_path || !progress_path || optind != argc)
		die("usage: memproc --model FILE --dynamic MiB --progress FILE");

	/* no controlling terminal, own session: CRIU needs no --shell-job */
	if (getsid(0) != getpid())
		setsid();

	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	rng_seed(&s.rng, seed, 0);
	s.model_size = read_model(model_path, &s.model);
	s.model_sum0 = s.model_sum = checksum(s.model, s.model_size);
	if (map_path) {
		s.map_size = map_file(map_path, &s.map);
		s.map_sum0 = checksum(s.map, s.map_size);
	}

	s.dyn_size = (size_t)dyn_mib << 20;
	s.dyn = map_anon(s.dyn_size);
	s.nblocks = (s.dyn_size + BLOCK_SIZE - 1) / BLOCK_SIZE;
	s.block_sum = calloc(s.nblocks ? s.nblocks : 1, sizeof(*s.block_sum));
	if (!s.block_sum)
		die("out of memory");
	for (size_t b = 0; b < s.nblocks; b++) {
		fill_random(&s.rng, s.dyn + b * BLOCK_SIZE, block_len(&s, b));
		s.block_sum[b] = checksum(s.dyn + b * BLOCK_SIZE, block_len(&s, b));
	}

	s.progress_fd = open(progress_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (s.progress_fd < 0)
		die("%s: %s", progress_path, strerror(errno));

	printf("memproc: pid %d model %zu bytes checksum %016" PRIx64 " dynamic %zu bytes",
	       (int)getpid(), s.model_size, s.model_sum0, s.dyn_size);
	if (s.map)
		printf(" mapped %zu bytes checksum %016" PRIx64, s.map_size, s.map_sum0);
	putchar('\n');
	fflush(stdout);

	s.counter = 1;
	write_progress(&s);
	interval_ns = (int64_t)interval_ms * 1000000;
	last_write = now_ns();
	while (!got_term) {
		struct timespec ts = { 0, REWRITE_EVERY_NS };
		int64_t now;

		nanosleep(&ts, NULL);
		rewrite_block(&s);
		if (got_usr1) {
			got_usr1 = 0;
			verify(&s);
			s.counter++;
			write_progress(&s);
			last_write = now_ns();
			continue;
		}
		now = now_ns();
		/* the monotonic clock may differ after a restore on another host */
		if (now < last_write || now - last_write > 60 * (int64_t)1000000000)
			last_write = now;
		if (now - last_write < interval_ns)
			continue;
		last_write = now;
		if (verify_every && ++writes % verify_every == 0)
			s.model_sum = checksum(s.model, s.model_size);
		s.counter++;
		write_progress(&s);
	}
	close(s.progress_fd);
	free(s.block_sum);
	munmap(s.dyn, s.dyn_size ? s.dyn_size : 1);
	munmap(s.model, s.model_size ? s.model_size : 1);
	if (s.map)
		munmap((void *)s.map, s.map_size);
	return 0;
}
