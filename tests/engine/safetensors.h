/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_SAFETENSORS_H
#define ENG_SAFETENSORS_H

/*
 * A strict reader of safetensors headers: u64 LE header length, a JSON
 * object of tensors {dtype, shape, data_offsets} and "__metadata__" strings.
 * Only what the test engine needs; anything malformed is refused by name.
 */

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 4

struct st_tensor {
	char name[128];
	char dtype[8];
	unsigned n_dims;
	uint64_t shape[ST_MAX_DIMS];
	uint64_t begin, end; /* data offsets, relative to the data section */
};

struct st_meta {
	char key[64];
	char value[64];
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

/* Reads and checks the header of fd; err (256 bytes) says what is wrong. */
int st_open(int fd, struct st_file *ret, char err[256]);
void st_free(struct st_file *f);
const struct st_tensor *st_find(const struct st_file *f, const char *name);
const char *st_meta_get(const struct st_file *f, const char *key);

#ifdef __cplusplus
}
#endif

#endif
