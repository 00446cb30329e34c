/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_DELTA_H
#define KM_DELTA_H

/*
 * The delta: every byte of an image not in the weights image, as a stream
 * of independent zstd frames, so it can be streamed, checked and decoded in
 * parallel. Each frame may be stored through a 2-byte byte-plane filter
 * (low bytes of every 16-bit element, then high bytes), chosen per frame
 * when that compresses better (bf16/fp16 data). Format: docs/formats.md,
 * proto/kvmotion.proto. The only module that includes zstd.h.
 *
 * Errors: -EBADMSG corrupt or truncated data (the error names the frame),
 * -EPROTONOSUPPORT unknown major version, -ENOTRECOVERABLE not a delta file.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hash.h"
#include "util.h"

#define KM_DELTA_FRAME_SIZE_DEFAULT (4u * 1024 * 1024)
#define KM_DELTA_LEVEL_DEFAULT 1

enum km_delta_filter_mode {
	KM_DELTA_FILTER_AUTO = 0, /* per frame, whichever compresses better */
	KM_DELTA_FILTER_NEVER,
	KM_DELTA_FILTER_ALWAYS,
};

struct km_delta_params {
	uint32_t frame_size;  /* raw bytes per frame; 0: default */
	int level;	      /* zstd level; 0: default */
	unsigned threads;     /* 0: one per CPU */
	enum km_delta_filter_mode filter;
	struct km_hash image_id; /* recorded in the header; all zero: none */
};

struct km_delta_summary {
	uint64_t raw_size;
	uint64_t compressed_size; /* bytes of the delta file */
	uint64_t frames;
	uint64_t frames_filtered;
	struct km_hash sha256; /* of the whole delta file */
};

/*
 * Writer: appends bytes, compresses full frames on a thread pool, writes
 * them to fd in order. fd is written sequentially from its current offset;
 * the magic and header are written at once. -EINVAL for a frame size over
 * 128 MiB, a bad level or filter mode, and for any call after finish.
 */
struct km_delta_writer;
int km_delta_writer_new(int fd, const struct km_delta_params *p, struct km_delta_writer **ret);
int km_delta_writer_append(struct km_delta_writer *w, const void *p, size_t n);
/* Flushes the last frame and the end marker, fills *ret. */
int km_delta_writer_finish(struct km_delta_writer *w, struct km_delta_summary *ret);
void km_delta_writer_free(struct km_delta_writer *w);

/*
 * Reader: checks the header and reads the frame table (the frame headers
 * only), then decodes frames on a thread pool. The delta starts at offset 0
 * of fd; open duplicates fd, so the caller may close its own.
 */
struct km_delta_reader;
int km_delta_reader_open(int fd, struct km_delta_reader **ret, struct km_error *err);
void km_delta_reader_free(struct km_delta_reader *r);
uint64_t km_delta_reader_raw_size(const struct km_delta_reader *r);
uint64_t km_delta_reader_frames(const struct km_delta_reader *r);
/* The image id of the header, NULL if the writer recorded none. */
const struct km_hash *km_delta_reader_image_id(const struct km_delta_reader *r);
/*
 * SHA-256 of the whole file: reads it all. Decoding checks every frame by
 * its zstd checksum, so a join needs this only to tell what went wrong.
 */
int km_delta_reader_sha256(struct km_delta_reader *r, struct km_hash *ret, struct km_error *err);

/*
 * Decodes every frame and hands its raw bytes to sink(userdata, raw_offset,
 * data, n), from worker threads, in no particular order: sink must be
 * thread-safe. data is valid during the call. Returns 0, sink's first
 * nonzero return, or an error naming the frame in err.
 */
typedef int (*km_delta_sink_fn)(void *userdata, uint64_t raw_offset, const void *data, size_t n);
int km_delta_reader_decode(struct km_delta_reader *r, unsigned threads, km_delta_sink_fn sink,
			   void *userdata, struct km_error *err);

/*
 * In-order reading of the decoded stream on the calling thread, a frame at
 * a time, each checked by its zstd checksum as it is decoded: for a reader
 * that needs the bytes front to back (join writes them as it goes, so its
 * file hash can follow). Moving backwards decodes a frame again.
 */
struct km_delta_cursor;
int km_delta_cursor_new(const struct km_delta_reader *r, struct km_delta_cursor **ret);
void km_delta_cursor_free(struct km_delta_cursor *c);
/*
 * Points *ret at the decoded bytes from raw offset 'off' on, *ret_n of them
 * (to the end of that frame, at least 1); valid until the next call or free.
 * -EBADMSG for an offset beyond the stream or a corrupt frame (err says).
 */
int km_delta_cursor_get(struct km_delta_cursor *c, uint64_t off, const uint8_t **ret,
			size_t *ret_n, struct km_error *err);

#endif
