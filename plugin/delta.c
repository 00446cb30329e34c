/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "delta.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>

#include <zstd.h>
#include <zstd_errors.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "format.h"
#include "kvmotion.pb-c.h"
#include "workpool.h"

/*
 * File layout (little-endian, see proto/kvmotion.proto):
 *
 *   "KMDELTA\n"
 *   u32 len, DeltaHeader {major, minor, frame_size}
 *   per frame: u32 len, DeltaFrame {raw_offset, raw_size, compressed_size,
 *              filter}, then compressed_size bytes: one zstd frame with its
 *              content size and content checksum
 *   u32 0 (end marker), end of file
 *
 * Every frame but the last holds exactly frame_size raw bytes; the raw
 * offsets are contiguous from 0.
 */

/* Frames are limited so one fits a u32 compressed_size and the decoder's
 * default window limit (2^27): zstd sets the window to the content size. */
#define DELTA_FRAME_SIZE_MAX (128u * 1024 * 1024)
/* Header and frame records are a few dozen bytes; leave room for fields a
 * later minor version may add. */
#define DELTA_RECORD_MAX 1024u
/* Bytes compressed both ways to choose the filter for a frame. */
#define FILTER_SAMPLE_SIZE (64u * 1024)
/* The filter must save at least this many percent on the sample. */
#define FILTER_MIN_SAVING_PCT 3
#define HASH_BLOCK_SIZE (4u * 1024 * 1024)
/*
 * Filtered frames at the fast levels: a byte plane of bf16/fp16 values is
 * literals with a skewed histogram and few real repeats, so zstd's short
 * matches cost time and bytes. The smallest hash table and the longest
 * minimum match leave it mostly to the entropy coder: on bf16 KV data about
 * twice as fast and 4% smaller than level 1's own parameters.
 */
#define PLANE_LEVEL_MAX 3
#define PLANE_MIN_MATCH 7
#define PLANE_HASH_LOG 6

static void put_le32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/*
 * Byte-plane filter: the low bytes of every 16-bit element, then the high
 * bytes; an odd last byte stays last. For bf16/fp16 the high bytes (sign,
 * exponent) are very compressible once they are contiguous.
 */
static void byteplane_split(uint8_t *restrict dst, const uint8_t *restrict src, size_t n)
{
	size_t half = n / 2, i = 0;
	uint8_t *lo = dst, *hi = dst + half;

#if defined(__SSE2__)
	const __m128i mask = _mm_set1_epi16(0x00ff);

	for (; i + 16 <= half; i += 16) {
		__m128i a = _mm_loadu_si128((const __m128i *)(src + 2 * i));
		__m128i b = _mm_loadu_si128((const __m128i *)(src + 2 * i + 16));

		_mm_storeu_si128((__m128i *)(lo + i),
				 _mm_packus_epi16(_mm_and_si128(a, mask), _mm_and_si128(b, mask)));
		_mm_storeu_si128((__m128i *)(hi + i),
				 _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8)));
	}
#elif defined(__ARM_NEON)
	for (; i + 16 <= half; i += 16) {
		uint8x16x2_t v = vld2q_u8(src + 2 * i);

		vst1q_u8(lo + i, v.val[0]);
		vst1q_u8(hi + i, v.val[1]);
	}
#endif
	for (; i < half; i++) {
		lo[i] = src[2 * i];
		hi[i] = src[2 * i + 1];
	}
	if (n & 1)
		dst[n - 1] = src[n - 1];
}

static void byteplane_merge(uint8_t *restrict dst, const uint8_t *restrict src, size_t n)
{
	size_t half = n / 2, i = 0;
	const uint8_t *lo = src, *hi = src + half;

#if defined(__SSE2__)
	for (; i + 16 <= half; i += 16) {
		__m128i l = _mm_loadu_si128((const __m128i *)(lo + i));
		__m128i h = _mm_loadu_si128((const __m128i *)(hi + i));

		_mm_storeu_si128((__m128i *)(dst + 2 * i), _mm_unpacklo_epi8(l, h));
		_mm_storeu_si128((__m128i *)(dst + 2 * i + 16), _mm_unpackhi_epi8(l, h));
	}
#elif defined(__ARM_NEON)
	for (; i + 16 <= half; i += 16) {
		uint8x16x2_t v = { { vld1q_u8(lo + i), vld1q_u8(hi + i) } };

		vst2q_u8(dst + 2 * i, v);
	}
#endif
	for (; i < half; i++) {
		dst[2 * i] = lo[i];
		dst[2 * i + 1] = hi[i];
	}
	if (n & 1)
		dst[n - 1] = src[n - 1];
}

/* ---- writer ---- */

/* One frame in flight: filled by the producer, compressed by a worker,
 * written in raw order by whichever worker finds it next in line. */
struct frame_slot {
	struct km_delta_writer *w;
	uint8_t *raw;	  /* frame_size */
	uint8_t *out;	  /* out_cap */
	size_t out_cap;
	uint64_t raw_offset;
	uint32_t raw_size;
	size_t compressed_size;
	bool filtered;
	bool done; /* under w->lock */
	int error;
};

/* Per-worker compression state, kept on a free list: at most one per
 * thread is ever created. */
struct cctx {
	ZSTD_CCtx *zc;
	uint8_t *scratch;    /* frame_size: the filtered frame */
	uint8_t *sample_out; /* ZSTD_compressBound(FILTER_SAMPLE_SIZE) */
	struct cctx *next;
};

struct km_delta_writer {
	int fd; /* borrowed */
	uint32_t frame_size;
	struct km_hash image_id;
	int level;
	enum km_delta_filter_mode filter;
	struct km_workpool *pool;
	struct km_hasher *hasher;

	pthread_mutex_t lock;
	pthread_cond_t frame_done; /* a frame was written, or writing failed */
	struct cctx *free_cctx; /* under lock */

	/* Ring of frames: head is the oldest not yet written, tail the one
	 * being filled (fill bytes so far). tail - head <= n_slots. head,
	 * tail, writing and write_error under lock. */
	struct frame_slot *slots;
	unsigned n_slots;
	uint64_t head, tail;
	uint32_t fill;
	/*
	 * The file is written (and hashed) by the workers, in frame order:
	 * the one that finishes the frame at head writes it and every
	 * compressed one after it, so the producer only fills frames.
	 */
	bool writing;
	int write_error;

	uint64_t raw_size, written, frames, frames_filtered; /* written: by the one writing */
	int error; /* sticky: every later call returns it */
	bool finished;
};

static void cctx_free(struct cctx *c)
{
	if (!c)
		return;
	ZSTD_freeCCtx(c->zc);
	free(c->scratch);
	free(c->sample_out);
	free(c);
}

static struct cctx *cctx_new(const struct km_delta_writer *w)
{
	struct cctx *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->zc = ZSTD_createCCtx();
	if (!c->zc)
		goto fail;
	if (ZSTD_isError(ZSTD_CCtx_setParameter(c->zc, ZSTD_c_compressionLevel, w->level)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(c->zc, ZSTD_c_checksumFlag, 1)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(c->zc, ZSTD_c_contentSizeFlag, 1)))
		goto fail;
	if (w->filter != KM_DELTA_FILTER_NEVER) {
		c->scratch = malloc(w->frame_size);
		c->sample_out = malloc(ZSTD_compressBound(FILTER_SAMPLE_SIZE));
		if (!c->scratch || !c->sample_out)
			goto fail;
	}
	return c;
fail:
	cctx_free(c);
	return NULL;
}

static struct cctx *cctx_get(struct km_delta_writer *w)
{
	struct cctx *c;

	pthread_mutex_lock(&w->lock);
	c = w->free_cctx;
	if (c)
		w->free_cctx = c->next;
	pthread_mutex_unlock(&w->lock);
	return c ? c : cctx_new(w);
}

static void cctx_put(struct km_delta_writer *w, struct cctx *c)
{
	pthread_mutex_lock(&w->lock);
	c->next = w->free_cctx;
	w->free_cctx = c;
	pthread_mutex_unlock(&w->lock);
}

static int zstd_compress_errno(size_t z)
{
	return ZSTD_getErrorCode(z) == ZSTD_error_memory_allocation ? -ENOMEM : -EIO;
}

/* Parameters for byte planes (filtered) or for anything else (0: the level's). */
static int set_plane_params(const struct km_delta_writer *w, struct cctx *c, bool planes)
{
	size_t z;

	if (w->level > PLANE_LEVEL_MAX)
		return 0;
	z = ZSTD_CCtx_setParameter(c->zc, ZSTD_c_minMatch, planes ? PLANE_MIN_MATCH : 0);
	if (!ZSTD_isError(z))
		z = ZSTD_CCtx_setParameter(c->zc, ZSTD_c_hashLog, planes ? PLANE_HASH_LOG : 0);
	return ZSTD_isError(z) ? zstd_compress_errno(z) : 0;
}

/* Compresses FILTER_SAMPLE_SIZE bytes from the middle of the frame both
 * ways; 1: the filter saves enough, 0: it does not, < 0: error. */
static int filter_helps(const struct km_delta_writer *w, struct cctx *c, const uint8_t *raw,
			size_t n)
{
	size_t cap = ZSTD_compressBound(FILTER_SAMPLE_SIZE);
	size_t len = KM_MIN(n, (size_t)FILTER_SAMPLE_SIZE);
	/* Even start, so the sample's planes are the frame's planes. */
	size_t start = ((n - len) / 2) & ~(size_t)1;
	size_t plain, filtered;

	int r;

	if (n < 2)
		return 0;
	r = set_plane_params(w, c, false);
	if (r < 0)
		return r;
	plain = ZSTD_compress2(c->zc, c->sample_out, cap, raw + start, len);
	if (ZSTD_isError(plain))
		return zstd_compress_errno(plain);
	/*
	 * The planes separately: in a whole frame each plane spans whole
	 * zstd blocks with their own literal statistics, while one sample
	 * fits a single block whose Huffman table would mix both planes.
	 */
	byteplane_split(c->scratch, raw + start, len);
	r = set_plane_params(w, c, true);
	if (r < 0)
		return r;
	filtered = 0;
	for (int i = 0; i < 2; i++) {
		size_t off = i ? len / 2 : 0, k = i ? len - len / 2 : len / 2;
		size_t z = ZSTD_compress2(c->zc, c->sample_out, cap, c->scratch + off, k);

		if (ZSTD_isError(z))
			return zstd_compress_errno(z);
		filtered += z;
	}
	return filtered * 100 <= plain * (100 - FILTER_MIN_SAVING_PCT);
}

static int compress_frame(struct km_delta_writer *w, struct cctx *c, struct frame_slot *s)
{
	const uint8_t *src = s->raw;
	int use_filter, r;
	size_t z;

	switch (w->filter) {
	case KM_DELTA_FILTER_NEVER:
		use_filter = 0;
		break;
	case KM_DELTA_FILTER_ALWAYS:
		use_filter = 1;
		break;
	default:
		use_filter = filter_helps(w, c, s->raw, s->raw_size);
		if (use_filter < 0)
			return use_filter;
		break;
	}
	if (use_filter) {
		byteplane_split(c->scratch, s->raw, s->raw_size);
		src = c->scratch;
	}
	r = set_plane_params(w, c, use_filter);
	if (r < 0)
		return r;
	/* Incompressible input needs no special case: the output buffer is
	 * compressBound() and zstd stores such blocks raw. */
	z = ZSTD_compress2(c->zc, s->out, s->out_cap, src, s->raw_size);
	if (ZSTD_isError(z))
		return zstd_compress_errno(z);
	s->compressed_size = z;
	s->filtered = use_filter;
	return 0;
}

static void drain_locked(struct km_delta_writer *w);

static int compress_job(void *arg)
{
	struct frame_slot *s = arg;
	struct km_delta_writer *w = s->w;
	struct cctx *c = cctx_get(w);
	int r = -ENOMEM;

	if (c) {
		r = compress_frame(w, c, s);
		cctx_put(w, c);
	}
	pthread_mutex_lock(&w->lock);
	/* Errors travel in the slot, so they surface in frame order. */
	s->error = r;
	s->done = true;
	drain_locked(w);
	pthread_mutex_unlock(&w->lock);
	return 0;
}

static int writer_write(struct km_delta_writer *w, const void *p, size_t n)
{
	int r = km_write_full(w->fd, p, n);

	if (r < 0)
		return r;
	km_hasher_update(w->hasher, p, n);
	w->written += n;
	return 0;
}

/* The magic and the header record. */
static int writer_write_header(struct km_delta_writer *w)
{
	Kvmotion__DeltaHeader h = KVMOTION__DELTA_HEADER__INIT;
	uint8_t buf[KM_MAGIC_SIZE + 4 + 128];
	size_t len;

	h.major = KM_FORMAT_MAJOR;
	h.minor = KM_FORMAT_MINOR;
	h.frame_size = w->frame_size;
	if (!km_hash_is_null(&w->image_id)) {
		h.has_image_id = 1;
		h.image_id = (ProtobufCBinaryData){ .len = KM_HASH_SIZE, .data = w->image_id.b };
	}
	memcpy(buf, KM_MAGIC_DELTA, KM_MAGIC_SIZE);
	len = kvmotion__delta_header__pack(&h, buf + KM_MAGIC_SIZE + 4);
	put_le32(buf + KM_MAGIC_SIZE, (uint32_t)len);
	return writer_write(w, buf, KM_MAGIC_SIZE + 4 + len);
}

/* The record and the compressed bytes of one frame; by the one writing only. */
static int write_frame(struct km_delta_writer *w, const struct frame_slot *s)
{
	Kvmotion__DeltaFrame f = KVMOTION__DELTA_FRAME__INIT;
	uint8_t rec[4 + 64];
	size_t len;
	int r;

	f.raw_offset = s->raw_offset;
	f.raw_size = s->raw_size;
	f.compressed_size = (uint32_t)s->compressed_size;
	f.filter = s->filtered ? KVMOTION__DELTA_FILTER__FILTER_BYTEPLANE2 :
				 KVMOTION__DELTA_FILTER__FILTER_NONE;
	len = kvmotion__delta_frame__pack(&f, rec + 4);
	put_le32(rec, (uint32_t)len);
	r = writer_write(w, rec, 4 + len);
	if (r < 0)
		return r;
	r = writer_write(w, s->out, s->compressed_size);
	if (r < 0)
		return r;
	w->frames++;
	w->frames_filtered += s->filtered;
	return 0;
}

/*
 * Writes, in order, every compressed frame from head on, unless another
 * thread is at it (it will get to them). Called with the lock held; drops
 * it while writing.
 */
static void drain_locked(struct km_delta_writer *w)
{
	if (w->writing)
		return;
	w->writing = true;
	while (w->head < w->tail && !w->write_error) {
		struct frame_slot *s = &w->slots[w->head % w->n_slots];
		int r;

		if (!s->done)
			break;
		if (s->error < 0) {
			w->write_error = s->error;
			break;
		}
		pthread_mutex_unlock(&w->lock);
		r = write_frame(w, s);
		pthread_mutex_lock(&w->lock);
		if (r < 0) {
			w->write_error = r;
			break;
		}
		w->head++;
		pthread_cond_broadcast(&w->frame_done);
	}
	w->writing = false;
	pthread_cond_broadcast(&w->frame_done);
}

/* Makes slot 'tail' ready to fill, writing the oldest frame first if the
 * ring is full: this is what bounds the memory in flight. */
static int writer_begin_frame(struct km_delta_writer *w)
{
	struct frame_slot *s;
	int r;

	pthread_mutex_lock(&w->lock);
	while (w->tail - w->head >= w->n_slots && !w->write_error)
		pthread_cond_wait(&w->frame_done, &w->lock);
	r = w->write_error;
	pthread_mutex_unlock(&w->lock);
	if (r < 0)
		return r;
	s = &w->slots[w->tail % w->n_slots];
	if (!s->raw) {
		s->raw = malloc(w->frame_size);
		if (!s->raw)
			return -ENOMEM;
	}
	if (!s->out) {
		s->out_cap = ZSTD_compressBound(w->frame_size);
		s->out = malloc(s->out_cap);
		if (!s->out)
			return -ENOMEM;
	}
	s->w = w;
	s->raw_offset = w->raw_size;
	return 0;
}

static int writer_submit_frame(struct km_delta_writer *w)
{
	struct frame_slot *s = &w->slots[w->tail % w->n_slots];
	int r;

	/* The slot is ours until it is queued. */
	s->raw_size = w->fill;
	s->done = false;
	s->error = 0;
	w->fill = 0;
	pthread_mutex_lock(&w->lock);
	w->tail++;
	pthread_mutex_unlock(&w->lock);
	r = km_workpool_submit(w->pool, compress_job, s);
	if (r < 0) {
		/* Not queued: nothing will complete it. */
		pthread_mutex_lock(&w->lock);
		s->error = r;
		s->done = true;
		drain_locked(w);
		pthread_mutex_unlock(&w->lock);
		return r;
	}
	return 0;
}

int km_delta_writer_new(int fd, const struct km_delta_params *p, struct km_delta_writer **ret)
{
	struct km_delta_params def = { 0 };
	struct km_delta_writer *w;
	unsigned threads;
	int r;

	if (!p)
		p = &def;
	if (fd < 0)
		return -EBADF;
	if (p->frame_size > DELTA_FRAME_SIZE_MAX ||
	    (p->level != 0 && (p->level < ZSTD_minCLevel() || p->level > ZSTD_maxCLevel())) ||
	    (p->filter != KM_DELTA_FILTER_AUTO && p->filter != KM_DELTA_FILTER_NEVER &&
	     p->filter != KM_DELTA_FILTER_ALWAYS))
		return -EINVAL;

	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->fd = fd;
	w->frame_size = p->frame_size ? p->frame_size : KM_DELTA_FRAME_SIZE_DEFAULT;
	w->image_id = p->image_id;
	w->level = p->level ? p->level : KM_DELTA_LEVEL_DEFAULT;
	w->filter = p->filter;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->frame_done, NULL);

	threads = p->threads ? p->threads : km_cpu_count();
	/* Two frames per thread: one being compressed, one waiting, so the
	 * workers never starve while the producer copies and writes. */
	w->n_slots = 2 * threads;
	w->slots = calloc(w->n_slots, sizeof(*w->slots));
	w->hasher = km_hasher_new();
	if (!w->slots || !w->hasher) {
		r = -ENOMEM;
		goto fail;
	}
	/*
	 * Not in the background (workpool.h): since format 1.2 no serial file
	 * hash runs beside it, and these threads also write the file in order,
	 * so the producer would wait for them.
	 */
	r = km_workpool_new(threads, w->n_slots, &w->pool);
	if (r < 0)
		goto fail;
	r = writer_write_header(w);
	if (r < 0)
		goto fail;
	*ret = w;
	return 0;
fail:
	km_delta_writer_free(w);
	return r;
}

int km_delta_writer_append(struct km_delta_writer *w, const void *p, size_t n)
{
	const uint8_t *src = p;
	int r;

	if (w->error)
		return w->error;
	if (w->finished)
		return -EINVAL;
	while (n > 0) {
		size_t k;

		if (w->fill == 0) {
			r = writer_begin_frame(w);
			if (r < 0)
				return (w->error = r);
		}
		k = KM_MIN(n, (size_t)(w->frame_size - w->fill));
		memcpy(w->slots[w->tail % w->n_slots].raw + w->fill, src, k);
		w->fill += (uint32_t)k;
		w->raw_size += k;
		src += k;
		n -= k;
		if (w->fill == w->frame_size) {
			r = writer_submit_frame(w);
			if (r < 0)
				return (w->error = r);
		}
	}
	return 0;
}

int km_delta_writer_finish(struct km_delta_writer *w, struct km_delta_summary *ret)
{
	uint8_t end[4] = { 0 };
	int r;

	if (w->error)
		return w->error;
	if (w->finished)
		return -EINVAL;
	if (w->fill > 0) {
		r = writer_submit_frame(w);
		if (r < 0)
			return (w->error = r);
	}
	pthread_mutex_lock(&w->lock);
	while (w->head < w->tail && !w->write_error)
		pthread_cond_wait(&w->frame_done, &w->lock);
	r = w->write_error;
	pthread_mutex_unlock(&w->lock);
	if (r < 0)
		return (w->error = r);
	r = writer_write(w, end, sizeof(end));
	if (r < 0)
		return (w->error = r);
	w->finished = true;

	ret->raw_size = w->raw_size;
	ret->compressed_size = w->written;
	ret->frames = w->frames;
	ret->frames_filtered = w->frames_filtered;
	km_hasher_final(w->hasher, &ret->sha256);
	return 0;
}

void km_delta_writer_free(struct km_delta_writer *w)
{
	if (!w)
		return;
	/* Jobs still queued reference the slots and the cctx list. */
	km_workpool_free(w->pool);
	while (w->free_cctx) {
		struct cctx *c = w->free_cctx;

		w->free_cctx = c->next;
		cctx_free(c);
	}
	if (w->slots)
		for (unsigned i = 0; i < w->n_slots; i++) {
			free(w->slots[i].raw);
			free(w->slots[i].out);
		}
	free(w->slots);
	km_hasher_free(w->hasher);
	pthread_mutex_destroy(&w->lock);
	pthread_cond_destroy(&w->frame_done);
	free(w);
}

/* ---- reader ---- */

struct frame_entry {
	uint64_t raw_offset;
	uint64_t file_offset; /* of the compressed bytes */
	uint32_t raw_size;
	uint32_t compressed_size;
	bool filtered;
};

struct km_delta_reader {
	int fd; /* our own duplicate */
	uint32_t frame_size;
	uint64_t raw_size;
	struct frame_entry *frames;
	size_t n_frames, frames_cap;
	uint32_t max_raw, max_compressed;
	bool any_filtered;
	bool has_image_id;
	struct km_hash image_id;
};

static void delta_header_freep(Kvmotion__DeltaHeader **h)
{
	if (*h)
		kvmotion__delta_header__free_unpacked(*h, NULL);
}

static void delta_frame_freep(Kvmotion__DeltaFrame **f)
{
	if (*f)
		kvmotion__delta_frame__free_unpacked(*f, NULL);
}

static int hash_file(int fd, uint64_t size, struct km_hash *ret, struct km_error *err)
{
	_cleanup_free_ uint8_t *buf = malloc(HASH_BLOCK_SIZE);
	struct km_hasher *h;
	uint64_t off = 0;

	if (!buf)
		return -ENOMEM;
	h = km_hasher_new();
	if (!h)
		return -ENOMEM;
	while (off < size) {
		size_t want = (size_t)KM_MIN(size - off, (uint64_t)HASH_BLOCK_SIZE);
		ssize_t n = km_pread_full(fd, buf, want, (off_t)off);

		if (n < 0 || (size_t)n != want) {
			km_hasher_free(h);
			if (n < 0) {
				km_error_set(err, "reading delta at offset %" PRIu64 ": %s", off,
					     strerror((int)-n));
				return (int)n;
			}
			km_error_set(err, "delta file shrank while reading it (file offset %" PRIu64 ")",
				     off + (uint64_t)n);
			return -EBADMSG;
		}
		km_hasher_update(h, buf, want);
		off += want;
	}
	km_hasher_final(h, ret);
	km_hasher_free(h);
	return 0;
}

/* Reads exactly n bytes at off, which the caller checked lie in the file. */
static int pread_exact(int fd, void *buf, size_t n, uint64_t off, struct km_error *err)
{
	ssize_t k = km_pread_full(fd, buf, n, (off_t)off);

	if (k < 0) {
		km_error_set(err, "reading delta at offset %" PRIu64 ": %s", off, strerror((int)-k));
		return (int)k;
	}
	if ((size_t)k != n) {
		km_error_set(err, "delta truncated at offset %" PRIu64, off + (uint64_t)k);
		return -EBADMSG;
	}
	return 0;
}

static int reader_read_header(struct km_delta_reader *r, uint64_t size, uint64_t *off,
			      struct km_error *err)
{
	_cleanup_(delta_header_freep) Kvmotion__DeltaHeader *h = NULL;
	uint8_t magic[KM_MAGIC_SIZE], rec[DELTA_RECORD_MAX];
	ssize_t n;
	uint32_t len;
	int ret;

	n = km_pread_full(r->fd, magic, sizeof(magic), 0);
	if (n < 0) {
		km_error_set(err, "reading delta magic: %s", strerror((int)-n));
		return (int)n;
	}
	if (memcmp(magic, KM_MAGIC_DELTA, (size_t)n) != 0) {
		km_error_set(err, "not a kvmotion delta file");
		return -ENOTRECOVERABLE;
	}
	/* A prefix of the magic: our file, cut short. */
	if ((size_t)n < sizeof(magic) || size < KM_MAGIC_SIZE + 4) {
		km_error_set(err, "delta truncated in its header (%" PRIu64 " bytes)", size);
		return -EBADMSG;
	}
	ret = pread_exact(r->fd, rec, 4, KM_MAGIC_SIZE, err);
	if (ret < 0)
		return ret;
	len = get_le32(rec);
	if (len == 0 || len > DELTA_RECORD_MAX) {
		km_error_set(err, "delta header record length %" PRIu32 " is invalid", len);
		return -EBADMSG;
	}
	if (KM_MAGIC_SIZE + 4 + (uint64_t)len > size) {
		km_error_set(err, "delta truncated in its header (%" PRIu64 " bytes)", size);
		return -EBADMSG;
	}
	ret = pread_exact(r->fd, rec, len, KM_MAGIC_SIZE + 4, err);
	if (ret < 0)
		return ret;
	h = kvmotion__delta_header__unpack(NULL, len, rec);
	if (!h) {
		km_error_set(err, "delta header record is malformed");
		return -EBADMSG;
	}
	if (h->major != KM_FORMAT_MAJOR) {
		km_error_set(err, "delta format version %" PRIu32 ".%" PRIu32
			     " is not supported (this build reads version %d.x)",
			     h->major, h->minor, KM_FORMAT_MAJOR);
		return -EPROTONOSUPPORT;
	}
	if (h->frame_size == 0 || h->frame_size > DELTA_FRAME_SIZE_MAX) {
		km_error_set(err, "delta frame size %" PRIu32 " is invalid", h->frame_size);
		return -EBADMSG;
	}
	if (h->has_image_id) {
		if (h->image_id.len != KM_HASH_SIZE) {
			km_error_set(err, "delta header has a malformed image id");
			return -EBADMSG;
		}
		memcpy(r->image_id.b, h->image_id.data, KM_HASH_SIZE);
		r->has_image_id = true;
	}
	r->frame_size = h->frame_size;
	*off = KM_MAGIC_SIZE + 4 + (uint64_t)len;
	return 0;
}

/* Reads the frame record at *off (frame index i); 0 with *done set at the
 * end marker. */
static int reader_read_frame(struct km_delta_reader *r, size_t i, uint64_t size, uint64_t *off,
			     bool *done, struct km_error *err)
{
	_cleanup_(delta_frame_freep) Kvmotion__DeltaFrame *f = NULL;
	uint8_t rec[DELTA_RECORD_MAX];
	struct frame_entry *e;
	uint64_t at = *off;
	uint32_t len;
	int ret;

	if (at + 4 > size) {
		km_error_set(err, "delta truncated at frame %zu (file offset %" PRIu64
			     "): end marker missing", i, at);
		return -EBADMSG;
	}
	ret = pread_exact(r->fd, rec, 4, at, err);
	if (ret < 0)
		return ret;
	len = get_le32(rec);
	if (len == 0) {
		if (at + 4 != size) {
			km_error_set(err, "delta has %" PRIu64 " bytes after its end marker at offset %"
				     PRIu64, size - at - 4, at);
			return -EBADMSG;
		}
		*off = size;
		*done = true;
		return 0;
	}
	if (len > DELTA_RECORD_MAX) {
		km_error_set(err, "delta frame %zu (file offset %" PRIu64 "): record length %" PRIu32
			     " is invalid", i, at, len);
		return -EBADMSG;
	}
	if (at + 4 + len > size) {
		km_error_set(err, "delta truncated in frame %zu record (file offset %" PRIu64 ")", i, at);
		return -EBADMSG;
	}
	ret = pread_exact(r->fd, rec, len, at + 4, err);
	if (ret < 0)
		return ret;
	f = kvmotion__delta_frame__unpack(NULL, len, rec);
	if (!f) {
		km_error_set(err, "delta frame %zu (file offset %" PRIu64 "): malformed record", i, at);
		return -EBADMSG;
	}
	if (f->raw_offset != r->raw_size) {
		km_error_set(err, "delta frame %zu (file offset %" PRIu64 "): raw offset %" PRIu64
			     ", expected %" PRIu64, i, at, f->raw_offset, r->raw_size);
		return -EBADMSG;
	}
	/* Only the last frame may be short, so a short one must be last. */
	if (f->raw_size == 0 || f->raw_size > r->frame_size ||
	    (r->n_frames > 0 && r->frames[r->n_frames - 1].raw_size != r->frame_size)) {
		km_error_set(err, "delta frame %zu (file offset %" PRIu64 "): raw size %" PRIu32
			     " is invalid (frame size %" PRIu32 ")", i, at, f->raw_size,
			     r->frame_size);
		return -EBADMSG;
	}
	if (f->compressed_size == 0 ||
	    (f->filter != KVMOTION__DELTA_FILTER__FILTER_NONE &&
	     f->filter != KVMOTION__DELTA_FILTER__FILTER_BYTEPLANE2)) {
		km_error_set(err, "delta frame %zu (file offset %" PRIu64 "): invalid record", i, at);
		return -EBADMSG;
	}
	if (at + 4 + len + f->compressed_size > size) {
		km_error_set(err, "delta truncated in frame %zu data (file offset %" PRIu64 ")", i, at);
		return -EBADMSG;
	}

	if (r->n_frames == r->frames_cap) {
		size_t cap = r->frames_cap ? 2 * r->frames_cap : 16;
		struct frame_entry *n = reallocarray(r->frames, cap, sizeof(*n));

		if (!n)
			return -ENOMEM;
		r->frames = n;
		r->frames_cap = cap;
	}
	e = &r->frames[r->n_frames++];
	e->raw_offset = f->raw_offset;
	e->file_offset = at + 4 + len;
	e->raw_size = f->raw_size;
	e->compressed_size = f->compressed_size;
	e->filtered = f->filter == KVMOTION__DELTA_FILTER__FILTER_BYTEPLANE2;
	r->raw_size += f->raw_size;
	r->max_raw = KM_MAX(r->max_raw, f->raw_size);
	r->max_compressed = KM_MAX(r->max_compressed, f->compressed_size);
	r->any_filtered |= e->filtered;
	*off = e->file_offset + f->compressed_size;
	return 0;
}

int km_delta_reader_open(int fd, struct km_delta_reader **ret, struct km_error *err)
{
	struct km_delta_reader *r;
	struct stat st;
	uint64_t off = 0;
	bool done = false;
	int rv;

	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	/* Our own descriptor: the caller may close theirs; we only pread. */
	r->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (r->fd < 0) {
		rv = -errno;
		km_error_set(err, "duplicating the delta descriptor: %s", strerror(errno));
		goto fail;
	}
	if (fstat(r->fd, &st) < 0) {
		rv = -errno;
		km_error_set(err, "stat on the delta: %s", strerror(errno));
		goto fail;
	}
	rv = reader_read_header(r, (uint64_t)st.st_size, &off, err);
	if (rv < 0)
		goto fail;
	for (size_t i = 0; !done; i++) {
		rv = reader_read_frame(r, i, (uint64_t)st.st_size, &off, &done, err);
		if (rv < 0)
			goto fail;
	}
	*ret = r;
	return 0;
fail:
	km_delta_reader_free(r);
	return rv;
}

void km_delta_reader_free(struct km_delta_reader *r)
{
	if (!r)
		return;
	if (r->fd >= 0)
		close(r->fd);
	free(r->frames);
	free(r);
}

uint64_t km_delta_reader_raw_size(const struct km_delta_reader *r)
{
	return r->raw_size;
}

uint64_t km_delta_reader_frames(const struct km_delta_reader *r)
{
	return r->n_frames;
}

const struct km_hash *km_delta_reader_image_id(const struct km_delta_reader *r)
{
	return r->has_image_id ? &r->image_id : NULL;
}

int km_delta_reader_sha256(struct km_delta_reader *r, struct km_hash *ret, struct km_error *err)
{
	struct stat st;

	if (fstat(r->fd, &st) < 0) {
		km_error_set(err, "stat on the delta: %s", strerror(errno));
		return -errno;
	}
	return hash_file(r->fd, (uint64_t)st.st_size, ret, err);
}

/* One decode call: workers take the next frame index until none is left
 * or one of them failed. */
struct decode {
	const struct km_delta_reader *r;
	km_delta_sink_fn sink;
	void *userdata;
	atomic_size_t next;
	atomic_bool stop;
	pthread_mutex_t lock;
	int result; /* first nonzero, under lock */
	struct km_error err;
};

static void decode_fail(struct decode *d, int result, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void decode_fail(struct decode *d, int result, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&d->lock);
	if (d->result == 0) {
		d->result = result;
		va_start(ap, fmt);
		vsnprintf(d->err.msg, sizeof(d->err.msg), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&d->lock);
	atomic_store(&d->stop, true);
}

struct dctx {
	ZSTD_DCtx *zd;
	uint8_t *in, *raw, *scratch;
};

/* The zstd frame must carry a content checksum (frame header descriptor
 * bit 2): it is what catches corruption inside a frame. */
static bool zstd_has_checksum(const uint8_t *p, size_t n)
{
	return n >= 5 && get_le32(p) == ZSTD_MAGICNUMBER && (p[4] & 0x04);
}

/* Decodes frame i into c->raw, checking it; err names the frame on failure. */
static int frame_decode(const struct km_delta_reader *r, struct dctx *c, size_t i,
			struct km_error *err)
{
	const struct frame_entry *f = &r->frames[i];
	uint8_t *dst = f->filtered ? c->scratch : c->raw;
	unsigned long long content;
	ssize_t n;
	size_t z;

	n = km_pread_full(r->fd, c->in, f->compressed_size, (off_t)f->file_offset);
	if (n < 0) {
		km_error_set(err, "delta frame %zu (raw offset %" PRIu64 "): reading: %s", i,
			     f->raw_offset, strerror((int)-n));
		return (int)n;
	}
	if ((size_t)n != f->compressed_size) {
		km_error_set(err, "delta frame %zu (raw offset %" PRIu64 "): truncated", i,
			     f->raw_offset);
		return -EBADMSG;
	}
	if (!zstd_has_checksum(c->in, f->compressed_size)) {
		km_error_set(err, "delta frame %zu (raw offset %" PRIu64
			     "): not a checksummed zstd frame", i, f->raw_offset);
		return -EBADMSG;
	}
	z = ZSTD_findFrameCompressedSize(c->in, f->compressed_size);
	if (ZSTD_isError(z) || z != f->compressed_size) {
		km_error_set(err, "delta frame %zu (raw offset %" PRIu64 "): %s", i, f->raw_offset,
			     ZSTD_isError(z) ? ZSTD_getErrorName(z) : "not exactly one zstd frame");
		return -EBADMSG;
	}
	content = ZSTD_getFrameContentSize(c->in, f->compressed_size);
	if (content != f->raw_size) {
		km_error_set(err, "delta frame %zu (raw offset %" PRIu64
			     "): zstd content size %s, expected %" PRIu32, i, f->raw_offset,
			     content == ZSTD_CONTENTSIZE_UNKNOWN ? "unknown" :
			     content == ZSTD_CONTENTSIZE_ERROR	 ? "unreadable" :
								   "different",
			     f->raw_size);
		return -EBADMSG;
	}
	z = ZSTD_decompressDCtx(c->zd, dst, f->raw_size, c->in, f->compressed_size);
	if (ZSTD_isError(z) || z != f->raw_size) {
		km_error_set(err, "delta frame %zu (raw offset %" PRIu64 "): %s", i, f->raw_offset,
			     ZSTD_isError(z) ? ZSTD_getErrorName(z) : "short decompressed size");
		return -EBADMSG;
	}
	if (f->filtered)
		byteplane_merge(c->raw, c->scratch, f->raw_size);
	return 0;
}

static void decode_frame(struct decode *d, struct dctx *c, size_t i)
{
	const struct frame_entry *f = &d->r->frames[i];
	struct km_error err = { { 0 } };
	int r;

	r = frame_decode(d->r, c, i, &err);
	if (r < 0) {
		decode_fail(d, r, "%s", err.msg);
		return;
	}
	r = d->sink(d->userdata, f->raw_offset, c->raw, f->raw_size);
	if (r != 0)
		decode_fail(d, r, "delta frame %zu (raw offset %" PRIu64 "): sink returned %d", i,
			    f->raw_offset, r);
}

/* Buffers for decoding any frame of r; 0 or -ENOMEM. */
static int dctx_init(struct dctx *c, const struct km_delta_reader *r)
{
	*c = (struct dctx){ 0 };
	c->zd = ZSTD_createDCtx();
	c->in = malloc(r->max_compressed ? r->max_compressed : 1);
	c->raw = malloc(r->max_raw ? r->max_raw : 1);
	if (r->any_filtered)
		c->scratch = malloc(r->max_raw);
	if (!c->zd || !c->in || !c->raw || (r->any_filtered && !c->scratch))
		return -ENOMEM;
	return 0;
}

static void dctx_clear(struct dctx *c)
{
	ZSTD_freeDCtx(c->zd);
	free(c->in);
	free(c->raw);
	free(c->scratch);
	*c = (struct dctx){ 0 };
}

static int decode_job(void *arg)
{
	struct decode *d = arg;
	const struct km_delta_reader *r = d->r;
	struct dctx c;

	if (dctx_init(&c, r) < 0) {
		decode_fail(d, -ENOMEM, "decoding the delta: out of memory");
		goto out;
	}
	while (!atomic_load(&d->stop)) {
		size_t i = atomic_fetch_add(&d->next, 1);

		if (i >= r->n_frames)
			break;
		decode_frame(d, &c, i);
	}
out:
	dctx_clear(&c);
	/* The result travels in d: a positive sink return is no job error. */
	return 0;
}

int km_delta_reader_decode(struct km_delta_reader *r, unsigned threads, km_delta_sink_fn sink,
			   void *userdata, struct km_error *err)
{
	struct km_workpool *pool = NULL;
	struct decode d = { .r = r, .sink = sink, .userdata = userdata };
	unsigned jobs;
	int rv;

	if (r->n_frames == 0)
		return 0;
	if (threads == 0)
		threads = km_cpu_count();
	jobs = (unsigned)KM_MIN((size_t)threads, r->n_frames);
	atomic_init(&d.next, 0);
	atomic_init(&d.stop, false);
	pthread_mutex_init(&d.lock, NULL);

	rv = km_workpool_new(jobs, jobs, &pool);
	if (rv < 0) {
		km_error_set(err, "starting %u decode threads: %s", jobs, strerror(-rv));
		goto out;
	}
	for (unsigned i = 0; i < jobs; i++) {
		/* Cannot fail: jobs return 0 and the queue holds them all. */
		rv = km_workpool_submit(pool, decode_job, &d);
		if (rv < 0)
			break;
	}
	km_workpool_wait(pool);
	km_workpool_free(pool);
	if (rv == 0 && d.result != 0) {
		rv = d.result;
		if (err)
			*err = d.err;
	}
out:
	pthread_mutex_destroy(&d.lock);
	return rv;
}

/* ---- cursor ---- */

struct km_delta_cursor {
	const struct km_delta_reader *r;
	struct dctx c;
	size_t frame; /* decoded in c.raw; SIZE_MAX: none */
};

int km_delta_cursor_new(const struct km_delta_reader *r, struct km_delta_cursor **ret)
{
	struct km_delta_cursor *cur = calloc(1, sizeof(*cur));

	if (!cur)
		return -ENOMEM;
	cur->r = r;
	cur->frame = SIZE_MAX;
	if (dctx_init(&cur->c, r) < 0) {
		km_delta_cursor_free(cur);
		return -ENOMEM;
	}
	*ret = cur;
	return 0;
}

void km_delta_cursor_free(struct km_delta_cursor *cur)
{
	if (!cur)
		return;
	dctx_clear(&cur->c);
	free(cur);
}

int km_delta_cursor_get(struct km_delta_cursor *cur, uint64_t off, const uint8_t **ret,
			size_t *ret_n, struct km_error *err)
{
	const struct km_delta_reader *r = cur->r;
	const struct frame_entry *f;
	size_t i;
	int k;

	if (off >= r->raw_size) {
		km_error_set(err, "delta offset %" PRIu64 " beyond its %" PRIu64 " bytes", off,
			     r->raw_size);
		return -EBADMSG;
	}
	/* Every frame but the last holds frame_size bytes (checked at open). */
	i = (size_t)(off / r->frame_size);
	f = &r->frames[i];
	if (i != cur->frame) {
		cur->frame = SIZE_MAX;
		k = frame_decode(r, &cur->c, i, err);
		if (k < 0)
			return k;
		cur->frame = i;
	}
	*ret = cur->c.raw + (off - f->raw_offset);
	*ret_n = (size_t)(f->raw_offset + f->raw_size - off);
	return 0;
}
