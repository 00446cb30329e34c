/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the CPU and the CUDA builds of the model share: reading the config
 * from the safetensors metadata, finding and checking the tensors, reading
 * the weights into anonymous memory (the CPU build computes from that copy,
 * the CUDA build uploads it and frees it), and checking a batch.
 */
#include <errno.h>
#include <fcntl.h>
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
		snprintf(err, MODEL_ERR_SIZE, "__metadata__ has no %s (not written by mkmodel?)",
			 key);
		return -EBADMSG;
	}
	errno = 0;
	n = strtoul(v, &end, 10);
	if (errno || end == v || *end || *v == '-' || *v == '+' || n == 0 || n > 1u << 24) {
		snprintf(err, MODEL_ERR_SIZE, "__metadata__ %s=\"%s\" is not an integer in 1..%u",
			 key, v, 1u << 24);
		return -EBADMSG;
	}
	*ret = (unsigned)n;
	return 0;
}

int model_read_config(const struct st_file *f, struct model_config *c, char *err)
{
	const char *arch = st_meta_get(f, "kvmotion.arch");
	int r;

	if (arch && strcmp(arch, "llama") != 0) {
		snprintf(err, MODEL_ERR_SIZE, "kvmotion.arch is \"%s\", not \"llama\"", arch);
		return -EBADMSG;
	}
	if ((r = meta_uint(f, "kvmotion.layers", &c->layers, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.dim", &c->dim, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.heads", &c->heads, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.kv_heads", &c->kv_heads, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.ffn", &c->ffn, err)) < 0 ||
	    (r = meta_uint(f, "kvmotion.vocab", &c->vocab, err)) < 0)
		return r;
	if (c->dim % c->heads || c->heads % c->kv_heads || (c->dim / c->heads) % 2) {
		snprintf(
			err, MODEL_ERR_SIZE,
			"inconsistent shape: dim %u, heads %u, kv_heads %u (dim must be a multiple "
			"of heads, heads of kv_heads, and the head size even)",
			c->dim, c->heads, c->kv_heads);
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

	if (!t) {
		snprintf(err, MODEL_ERR_SIZE, "tensor %s is missing", name);
		return -EBADMSG;
	}
	if (strcmp(t->dtype, "BF16") != 0) {
		snprintf(err, MODEL_ERR_SIZE, "tensor %s is %s, not BF16", name, t->dtype);
		return -EBADMSG;
	}
	/* st_parse checked that the byte size matches the shape. */
	if (t->n_dims != (cols ? 2u : 1u) || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
		snprintf(err, MODEL_ERR_SIZE,
			 "tensor %s has %u dimensions [%llu, %llu], the config wants [%llu, %llu]",
			 name, t->n_dims, (unsigned long long)t->shape[0],
			 (unsigned long long)(t->n_dims > 1 ? t->shape[1] : 0),
			 (unsigned long long)rows, (unsigned long long)cols);
		return -EBADMSG;
	}
	*ret_offset = t->begin;
	return 0;
}

int model_read_layout(const struct st_file *f, const struct model_config *c,
		      struct model_layout *ret, char *err)
{
	static const char *const suffix[W_PER_LAYER] = {
		[W_IN_NORM] = "input_layernorm",
		[W_Q] = "self_attn.q_proj",
		[W_K] = "self_attn.k_proj",
		[W_V] = "self_attn.v_proj",
		[W_O] = "self_attn.o_proj",
		[W_POST_NORM] = "post_attention_layernorm",
		[W_GATE] = "mlp.gate_proj",
		[W_UP] = "mlp.up_proj",
		[W_DOWN] = "mlp.down_proj",
	};
	const uint64_t rows[W_PER_LAYER] = { c->dim, c->dim, c->kv_dim, c->kv_dim, c->dim,
					     c->dim, c->ffn, c->ffn, c->dim };
	const uint64_t cols[W_PER_LAYER] = { 0, c->dim, c->dim, c->dim, c->dim,
					     0, c->dim, c->dim, c->ffn };
	struct model_layout l = { 0 };
	char name[160];
	int r;

	if ((r = model_find_tensor(f, "model.embed_tokens.weight", c->vocab, c->dim, &l.embed,
				   err)) < 0 ||
	    (r = model_find_tensor(f, "model.norm.weight", c->dim, 0, &l.final_norm, err)) < 0 ||
	    (r = model_find_tensor(f, "lm_head.weight", c->vocab, c->dim, &l.lm_head, err)) < 0)
		return r;
	l.layer = calloc(c->layers, sizeof(*l.layer));
	if (!l.layer) {
		snprintf(err, MODEL_ERR_SIZE, "out of memory");
		return -ENOMEM;
	}
	for (unsigned i = 0; i < c->layers; i++)
		for (unsigned w = 0; w < W_PER_LAYER; w++) {
			snprintf(name, sizeof(name), "model.layers.%u.%s.weight", i, suffix[w]);
			r = model_find_tensor(f, name, rows[w], cols[w], &l.layer[i][w], err);
			if (r < 0) {
				model_layout_free(&l);
				return r;
			}
		}
	*ret = l;
	return 0;
}

void model_layout_free(struct model_layout *l)
{
	free(l->layer);
	memset(l, 0, sizeof(*l));
}

int model_read_weights(int fd, const struct st_file *f, uint8_t **ret, char *err)
{
	uint8_t *p;
	uint64_t off = 0;

	/* The upload: anonymous memory, filled with pread, never a file mapping. */
	p = mmap(NULL, f->data_size ? f->data_size : 1, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		snprintf(err, MODEL_ERR_SIZE, "cannot allocate %llu bytes for the weights: %s",
			 (unsigned long long)f->data_size, strerror(errno));
		return -ENOMEM;
	}
	while (off < f->data_size) {
		uint64_t want = f->data_size - off;
		ssize_t k = pread(fd, p + off, want > (1u << 30) ? (1u << 30) : want,
				  (off_t)(f->data_offset + off));
		int r;

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0) {
			r = k < 0 ? -errno : -EIO;
			snprintf(err, MODEL_ERR_SIZE,
				 "cannot read the weights at data offset %llu: %s",
				 (unsigned long long)off, k < 0 ? strerror(-r) : "file truncated");
			munmap(p, f->data_size ? f->data_size : 1);
			return r;
		}
		off += (uint64_t)k;
	}
	*ret = p;
	return 0;
}

/* err = "what: why", cut to MODEL_ERR_SIZE. */
static void name_error(char *err, const char *what, const char *why)
{
	int k = snprintf(err, MODEL_ERR_SIZE, "%s: ", what);

	if (k >= 0 && k < MODEL_ERR_SIZE)
		snprintf(err + k, MODEL_ERR_SIZE - (size_t)k, "%s", why);
}

int model_read_file(const char *path, struct model_config *ret_config,
		    struct model_layout *ret_layout, uint8_t **ret_weights, uint64_t *ret_size,
		    char *err)
{
	char why[MODEL_ERR_SIZE];
	struct model_config c;
	struct model_layout l = { 0 };
	struct st_file f = { 0 };
	uint8_t *w = NULL;
	int fd, r;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		snprintf(err, MODEL_ERR_SIZE, "cannot open the model %s: %s", path, strerror(-r));
		return r;
	}
	r = st_open(fd, &f, why);
	if (r == 0)
		r = model_read_config(&f, &c, why);
	if (r == 0)
		r = model_read_layout(&f, &c, &l, why);
	if (r == 0)
		r = model_read_weights(fd, &f, &w, why);
	close(fd);
	if (r < 0) {
		name_error(err, path, why);
		model_layout_free(&l);
		st_free(&f);
		return r;
	}
	*ret_config = c;
	*ret_layout = l;
	*ret_weights = w;
	*ret_size = f.data_size;
	st_free(&f);
	return 0;
}

int model_parse_mem(const uint8_t *file, uint64_t file_size, const char *what,
		    struct model_config *ret_config, struct model_layout *ret_layout,
		    uint64_t *ret_data_offset, uint64_t *ret_data_size, char *err)
{
	char why[MODEL_ERR_SIZE];
	struct model_config c;
	struct model_layout l = { 0 };
	struct st_file f = { 0 };
	uint64_t n = 0;
	int r = 0;

	if (file_size < 8) {
		snprintf(why, sizeof(why), "%llu bytes: no safetensors header",
			 (unsigned long long)file_size);
		r = -EBADMSG;
	}
	for (unsigned i = 0; r == 0 && i < 8; i++)
		n |= (uint64_t)file[i] << (8 * i);
	if (r == 0 && n > file_size - 8) {
		snprintf(why, sizeof(why), "header of %llu bytes in a file of %llu",
			 (unsigned long long)n, (unsigned long long)file_size);
		r = -EBADMSG;
	}
	if (r == 0)
		r = st_parse((const char *)file + 8, (size_t)n, file_size - 8 - n, &f, why);
	if (r == 0) {
		f.data_offset = 8 + n;
		r = model_read_config(&f, &c, why);
	}
	if (r == 0)
		r = model_read_layout(&f, &c, &l, why);
	if (r < 0) {
		name_error(err, what, why);
		model_layout_free(&l);
		st_free(&f);
		return r;
	}
	*ret_config = c;
	*ret_layout = l;
	*ret_data_offset = f.data_offset;
	*ret_data_size = f.data_size;
	st_free(&f);
	return 0;
}

int model_read_mem(const uint8_t *file, uint64_t file_size, const char *what,
		   struct model_config *ret_config, struct model_layout *ret_layout,
		   uint8_t **ret_weights, uint64_t *ret_size, uint64_t *ret_data_offset, char *err)
{
	struct model_layout l = { 0 };
	struct model_config c;
	uint64_t off, size;
	uint8_t *w;
	int r;

	r = model_parse_mem(file, file_size, what, &c, &l, &off, &size, err);
	if (r < 0)
		return r;
	if (!ret_weights) {
		/* the caller uploads from file itself (the CUDA build) */
		*ret_config = c;
		*ret_layout = l;
		*ret_size = size;
		*ret_data_offset = off;
		return 0;
	}
	/* the upload: an anonymous copy, as model_read_weights makes */
	w = mmap(NULL, size ? size : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		 0);
	if (w == MAP_FAILED) {
		snprintf(err, MODEL_ERR_SIZE, "%s: cannot allocate %llu bytes for the weights", what,
			 (unsigned long long)size);
		model_layout_free(&l);
		return -ENOMEM;
	}
	memcpy(w, file + off, size);
	*ret_config = c;
	*ret_layout = l;
	*ret_weights = w;
	*ret_size = size;
	*ret_data_offset = off;
	return 0;
}

int model_check_batch(const struct model_config *c, const struct model_opts *o,
		      const struct kv_pool *kv, const struct model_tok *toks, unsigned n, char *err)
{
	unsigned outputs = 0;

	if (n == 0 || n > o->max_batch) {
		snprintf(err, MODEL_ERR_SIZE, "batch of %u tokens (1..%u)", n, o->max_batch);
		return -EINVAL;
	}
	for (unsigned i = 0; i < n; i++) {
		const struct model_tok *t = &toks[i];

		if (t->token >= c->vocab || t->pos >= o->max_ctx) {
			snprintf(err, MODEL_ERR_SIZE,
				 "token %u at position %u: out of range (vocab %u, context %u)",
				 t->token, t->pos, c->vocab, o->max_ctx);
			return -EINVAL;
		}
		if (t->blocks[t->pos / kv->block_tokens] >= kv->n_blocks) {
			snprintf(err, MODEL_ERR_SIZE, "position %u: KV block %u outside the pool",
				 t->pos, t->blocks[t->pos / kv->block_tokens]);
			return -EINVAL;
		}
		outputs += t->want_next;
	}
	if (outputs > o->max_outputs) {
		snprintf(err, MODEL_ERR_SIZE, "%u outputs in one batch (at most %u)", outputs,
			 o->max_outputs);
		return -EINVAL;
	}
	return 0;
}
