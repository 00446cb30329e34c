/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the CPU and the CUDA builds of the model share: reading the config
 * from the safetensors metadata, checking tensors, and reading the weights
 * into anonymous memory (the CPU build computes from that copy, the CUDA
 * build uploads it and frees it).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "model.h"

static int meta_uint(const struct st_file *f, const char *key, unsigned *ret, char *err)
{
	const char *v = st_meta_get(f, key);
	char *end;
	unsigned long n;

	if (!v) {
		snprintf(err, 256, "metadata %s is missing", key);
		return -ENOENT;
	}
	n = strtoul(v, &end, 10);
	if (*end || n == 0 || n > 1u << 24) {
		snprintf(err, 256, "metadata %s=%s is invalid", key, v);
		return -EBADMSG;
	}
	*ret = (unsigned)n;
	return 0;
}

int model_read_config(const struct st_file *f, struct model_config *c, char *err)
{
	int r;

	if ((r = meta_uint(f, "kvmotion.layers", &c->layers, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.dim", &c->dim, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.heads", &c->heads, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.kv_heads", &c->kv_heads, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.ffn", &c->ffn, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.vocab", &c->vocab, err)) < 0)
		return r;
	if (c->dim % c->heads || c->heads % c->kv_heads || (c->dim / c->heads) % 2) {
		snprintf(err, 256, "inconsistent shape: dim %u heads %u kv_heads %u", c->dim,
			 c->heads, c->kv_heads);
		return -EBADMSG;
	}
	c->head_dim = c->dim / c->heads;
	c->kv_dim = c->head_dim * c->kv_heads;
	return 0;
}

int model_find_tensor(const struct st_file *f, const char *name, uint64_t rows, uint64_t cols,
		      uint64_t *ret_offset, char *err)
{
	const struct st_tensor *t = st_find(f, name);
	uint64_t n = rows * (cols ? cols : 1);

	if (!t) {
		snprintf(err, 256, "tensor %s is missing", name);
		return -ENOENT;
	}
	if (strcmp(t->dtype, "BF16") != 0 || t->n_dims != (cols ? 2u : 1u) || t->shape[0] != rows ||
	    (cols && t->shape[1] != cols) || t->end - t->begin != n * 2) {
		snprintf(err, 256, "tensor %s has the wrong dtype or shape", name);
		return -EBADMSG;
	}
	*ret_offset = t->begin;
	return 0;
}

int model_read_weights(int fd, const struct st_file *f, uint8_t **ret, char *err)
{
	uint8_t *p;
	uint64_t off = 0;

	/* The upload: anonymous memory, filled with pread, never a file mapping. */
	p = mmap(NULL, f->data_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		snprintf(err, 256, "cannot allocate %llu bytes for the weights",
			 (unsigned long long)f->data_size);
		return -ENOMEM;
	}
	while (off < f->data_size) {
		ssize_t k = pread(fd, p + off, f->data_size - off, (off_t)(f->data_offset + off));

		if (k <= 0) {
			snprintf(err, 256, "cannot read the weights (offset %llu)",
				 (unsigned long long)off);
			munmap(p, f->data_size);
			return k < 0 ? -errno : -EIO;
		}
		off += (uint64_t)k;
	}
	*ret = p;
	return 0;
}
