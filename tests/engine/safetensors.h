/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_SAFETENSORS_H
#define ENG_SAFETENSORS_H

/*
 * A strict reader of safetensors headers (https://github.com/huggingface/safetensors):
 * u64 little-endian header length N, N bytes of JSON, then the data section.
 * The JSON is one object: tensors {"dtype", "shape", "data_offsets"} by name
 * and an optional "__metadata__" object of string values. Offsets are
 * relative to the data section; the tensors must not overlap and must cover
 * it exactly. Anything else is refused, with the header byte where it went
 * wrong in the error. Every read is bounds-checked.
 *
 * Errors: -EBADMSG malformed header (err says what and where), -ENOMEM,
 * -EIO or -errno when the file cannot be read.
 */

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8
#define ST_ERR_SIZE 256

struct st_tensor {
	char name[160];
	char dtype[8];
	unsigned n_dims;
	uint64_t shape[ST_MAX_DIMS];
	uint64_t begin, end; /* data offsets, relative to the data section */
};

struct st_meta {
	char key[128];
	char value[256];
};

struct st_file {
	uint64_t data_offset; /* file offset of the data section */
	uint64_t data_size;
	struct st_tensor *tensors;
	size_t n_tensors;
	struct st_meta *meta;
	size_t n_meta;
};

#ifdef __cplusplus
extern "C" {
#endif

/* Reads and checks the header of fd; err (ST_ERR_SIZE bytes) says what is wrong. */
int st_open(int fd, struct st_file *ret, char *err);
/* The same on a header already in memory (JSON only) for a data section of data_size. */
int st_parse(const char *json, size_t len, uint64_t data_size, struct st_file *ret, char *err);
void st_free(struct st_file *f);
/* Borrowed from f, valid until st_free(f). */
const struct st_tensor *st_find(const struct st_file *f, const char *name);
const char *st_meta_get(const struct st_file *f, const char *key);
/* Bytes per element of a safetensors dtype name, 0 if unknown. */
unsigned st_dtype_size(const char *dtype);

#ifdef __cplusplus
}
#endif

#endif
