/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "safetensors.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_MAX (64u * 1024 * 1024)

struct parser {
	const char *p, *end;
	char *err;
	struct st_file *f;
};

static __attribute__((format(printf, 2, 3))) int fail(struct parser *ps, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(ps->err, 256, fmt, ap);
	va_end(ap);
	return -EBADMSG;
}

static void skip_ws(struct parser *ps)
{
	while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\t' || *ps->p == '\r'))
		ps->p++;
}

static bool take(struct parser *ps, char c)
{
	skip_ws(ps);
	if (ps->p < ps->end && *ps->p == c) {
		ps->p++;
		return true;
	}
	return false;
}

/* A JSON string without escapes beyond \" and \\ (all safetensors needs). */
static int parse_string(struct parser *ps, char *out, size_t size)
{
	size_t n = 0;

	if (!take(ps, '"'))
		return fail(ps, "expected a string at header byte %td", ps->p - ps->end);
	while (ps->p < ps->end && *ps->p != '"') {
		char c = *ps->p++;

		if (c == '\\') {
			if (ps->p >= ps->end || (*ps->p != '"' && *ps->p != '\\' && *ps->p != '/'))
				return fail(ps, "unsupported escape in a header string");
			c = *ps->p++;
		}
		if ((unsigned char)c < 0x20)
			return fail(ps, "control character in a header string");
		if (n + 1 >= size)
			return fail(ps, "header string longer than %zu bytes", size - 1);
		out[n++] = c;
	}
	if (ps->p >= ps->end)
		return fail(ps, "unterminated string in the header");
	ps->p++;
	out[n] = 0;
	return 0;
}

static int parse_u64(struct parser *ps, uint64_t *ret)
{
	uint64_t v = 0;
	bool any = false;

	skip_ws(ps);
	while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
		uint64_t d = (uint64_t)(*ps->p++ - '0');

		if (v > (UINT64_MAX - d) / 10)
			return fail(ps, "number too large in the header");
		v = v * 10 + d;
		any = true;
	}
	if (!any)
		return fail(ps, "expected a number in the header");
	*ret = v;
	return 0;
}

/* [n, n, ...] into out (at most max numbers). */
static int parse_u64_list(struct parser *ps, uint64_t *out, unsigned max, unsigned *ret_n)
{
	unsigned n = 0;
	int r;

	if (!take(ps, '['))
		return fail(ps, "expected '['");
	if (take(ps, ']')) {
		*ret_n = 0;
		return 0;
	}
	do {
		if (n == max)
			return fail(ps, "more than %u numbers in a list", max);
		r = parse_u64(ps, &out[n++]);
		if (r < 0)
			return r;
	} while (take(ps, ','));
	if (!take(ps, ']'))
		return fail(ps, "expected ']'");
	*ret_n = n;
	return 0;
}

static int parse_metadata(struct parser *ps)
{
	int r;

	if (!take(ps, '{'))
		return fail(ps, "__metadata__ is not an object");
	if (take(ps, '}'))
		return 0;
	do {
		struct st_meta *m;

		m = realloc(ps->f->meta, (ps->f->n_meta + 1) * sizeof(*m));
		if (!m)
			return -ENOMEM;
		ps->f->meta = m;
		m = &ps->f->meta[ps->f->n_meta++];
		r = parse_string(ps, m->key, sizeof(m->key));
		if (r == 0 && !take(ps, ':'))
			r = fail(ps, "expected ':' in __metadata__");
		if (r == 0)
			r = parse_string(ps, m->value, sizeof(m->value));
		if (r < 0)
			return r;
	} while (take(ps, ','));
	return take(ps, '}') ? 0 : fail(ps, "expected '}' after __metadata__");
}

static int parse_tensor(struct parser *ps, struct st_tensor *t)
{
	bool have_dtype = false, have_shape = false, have_offsets = false;
	char key[32];
	int r;

	if (!take(ps, '{'))
		return fail(ps, "tensor %s is not an object", t->name);
	do {
		r = parse_string(ps, key, sizeof(key));
		if (r == 0 && !take(ps, ':'))
			r = fail(ps, "expected ':' in tensor %s", t->name);
		if (r < 0)
			return r;
		if (strcmp(key, "dtype") == 0) {
			r = parse_string(ps, t->dtype, sizeof(t->dtype));
			have_dtype = true;
		} else if (strcmp(key, "shape") == 0) {
			r = parse_u64_list(ps, t->shape, ST_MAX_DIMS, &t->n_dims);
			have_shape = true;
		} else if (strcmp(key, "data_offsets") == 0) {
			uint64_t off[2];
			unsigned n;

			r = parse_u64_list(ps, off, 2, &n);
			if (r == 0 && n != 2)
				r = fail(ps, "tensor %s: data_offsets needs two numbers", t->name);
			t->begin = off[0];
			t->end = off[1];
			have_offsets = true;
		} else {
			r = fail(ps, "tensor %s: unknown key %s", t->name, key);
		}
		if (r < 0)
			return r;
	} while (take(ps, ','));
	if (!take(ps, '}'))
		return fail(ps, "expected '}' after tensor %s", t->name);
	if (!have_dtype || !have_shape || !have_offsets)
		return fail(ps, "tensor %s lacks dtype, shape or data_offsets", t->name);
	return 0;
}

int st_open(int fd, struct st_file *ret, char err[256])
{
	struct st_file f = { 0 };
	struct parser ps = { .err = err, .f = &f };
	uint64_t header_len;
	struct stat sb;
	char *header = NULL;
	int r;

	err[0] = 0;
	if (fstat(fd, &sb) < 0)
		return -errno;
	if (pread(fd, &header_len, 8, 0) != 8) {
		snprintf(err, 256, "file too short for a safetensors header");
		return -EBADMSG;
	}
	header_len = le64toh(header_len);
	if (header_len == 0 || header_len > HEADER_MAX || 8 + header_len > (uint64_t)sb.st_size) {
		snprintf(err, 256, "header length %llu does not fit the file", (unsigned long long)header_len);
		return -EBADMSG;
	}
	header = malloc(header_len);
	if (!header)
		return -ENOMEM;
	if (pread(fd, header, header_len, 8) != (ssize_t)header_len) {
		free(header);
		snprintf(err, 256, "cannot read the header");
		return -EIO;
	}
	ps.p = header;
	ps.end = header + header_len;
	f.data_offset = 8 + header_len;
	f.data_size = (uint64_t)sb.st_size - f.data_offset;

	r = take(&ps, '{') ? 0 : fail(&ps, "header is not a JSON object");
	while (r == 0) {
		char name[128];

		r = parse_string(&ps, name, sizeof(name));
		if (r == 0 && !take(&ps, ':'))
			r = fail(&ps, "expected ':' after %s", name);
		if (r < 0)
			break;
		if (strcmp(name, "__metadata__") == 0) {
			r = parse_metadata(&ps);
		} else {
			struct st_tensor *t = realloc(f.tensors, (f.n_tensors + 1) * sizeof(*t));

			if (!t) {
				r = -ENOMEM;
				break;
			}
			f.tensors = t;
			t = &f.tensors[f.n_tensors++];
			memset(t, 0, sizeof(*t));
			memcpy(t->name, name, sizeof(t->name));
			r = parse_tensor(&ps, t);
			if (r == 0 && (t->begin > t->end || t->end > f.data_size))
				r = fail(&ps, "tensor %s lies outside the file", t->name);
		}
		if (r < 0 || !take(&ps, ','))
			break;
	}
	if (r == 0 && !take(&ps, '}'))
		r = fail(&ps, "expected '}' at the end of the header");
	skip_ws(&ps);
	if (r == 0 && ps.p != ps.end)
		r = fail(&ps, "trailing bytes after the header");
	free(header);
	if (r < 0) {
		st_free(&f);
		return r;
	}
	*ret = f;
	return 0;
}

void st_free(struct st_file *f)
{
	free(f->tensors);
	free(f->meta);
	memset(f, 0, sizeof(*f));
}

const struct st_tensor *st_find(const struct st_file *f, const char *name)
{
	for (size_t i = 0; i < f->n_tensors; i++)
		if (strcmp(f->tensors[i].name, name) == 0)
			return &f->tensors[i];
	return NULL;
}

const char *st_meta_get(const struct st_file *f, const char *key)
{
	for (size_t i = 0; i < f->n_meta; i++)
		if (strcmp(f->meta[i].key, key) == 0)
			return f->meta[i].value;
	return NULL;
}
