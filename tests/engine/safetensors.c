/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The safetensors header reader (see safetensors.h): a small recursive-descent
 * JSON parser that accepts exactly the shape safetensors defines. Every byte
 * access checks the cursor against the end of the header.
 */
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

#define HEADER_MAX (64u << 20)

struct parser {
	const char *start, *p, *end;
	char *err;
	struct st_file *f;
	size_t cap_tensors, cap_meta;
};

static __attribute__((format(printf, 2, 3))) int fail(struct parser *ps, const char *fmt, ...)
{
	char what[192];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	snprintf(ps->err, ST_ERR_SIZE, "malformed safetensors header at byte %td: %s",
		 ps->p - ps->start, what);
	return -EBADMSG;
}

static void skip_ws(struct parser *ps)
{
	while (ps->p < ps->end &&
	       (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\t' || *ps->p == '\r'))
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

static int hex4(struct parser *ps, unsigned *ret)
{
	unsigned v = 0;

	if (ps->end - ps->p < 4)
		return fail(ps, "truncated \\u escape");
	for (int i = 0; i < 4; i++) {
		char c = *ps->p++;

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (unsigned)(c - 'A' + 10);
		else
			return fail(ps, "bad hex digit in a \\u escape");
	}
	*ret = v;
	return 0;
}

/* A JSON string into out (NUL-terminated, at most size - 1 bytes). */
static int parse_string(struct parser *ps, char *out, size_t size, const char *what)
{
	size_t n = 0;
	int r;

	if (!take(ps, '"'))
		return fail(ps, "expected a string (%s)", what);
	for (;;) {
		char buf[4];
		size_t k = 1;
		unsigned char c;

		if (ps->p >= ps->end)
			return fail(ps, "unterminated string (%s)", what);
		c = (unsigned char)*ps->p++;
		if (c == '"')
			break;
		if (c < 0x20)
			return fail(ps, "control character in a string (%s)", what);
		buf[0] = (char)c;
		if (c == '\\') {
			unsigned u = 0;

			if (ps->p >= ps->end)
				return fail(ps, "unterminated escape (%s)", what);
			switch (*ps->p++) {
			case '"': buf[0] = '"'; break;
			case '\\': buf[0] = '\\'; break;
			case '/': buf[0] = '/'; break;
			case 'b': buf[0] = '\b'; break;
			case 'f': buf[0] = '\f'; break;
			case 'n': buf[0] = '\n'; break;
			case 'r': buf[0] = '\r'; break;
			case 't': buf[0] = '\t'; break;
			case 'u':
				r = hex4(ps, &u);
				if (r < 0)
					return r;
				if (u == 0 || (u >= 0xd800 && u <= 0xdfff))
					return fail(ps, "\\u%04x is not supported (%s)", u, what);
				if (u < 0x80) {
					buf[0] = (char)u;
				} else if (u < 0x800) {
					buf[0] = (char)(0xc0 | (u >> 6));
					buf[1] = (char)(0x80 | (u & 0x3f));
					k = 2;
				} else {
					buf[0] = (char)(0xe0 | (u >> 12));
					buf[1] = (char)(0x80 | ((u >> 6) & 0x3f));
					buf[2] = (char)(0x80 | (u & 0x3f));
					k = 3;
				}
				break;
			default:
				return fail(ps, "unknown escape \\%c (%s)", ps->p[-1], what);
			}
		}
		if (n + k >= size)
			return fail(ps, "string longer than %zu bytes (%s)", size - 1, what);
		memcpy(out + n, buf, k);
		n += k;
	}
	out[n] = 0;
	return 0;
}

static int parse_u64(struct parser *ps, uint64_t *ret)
{
	uint64_t v = 0;
	const char *first;

	skip_ws(ps);
	first = ps->p;
	while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
		uint64_t d = (uint64_t)(*ps->p - '0');

		if (v > (UINT64_MAX - d) / 10)
			return fail(ps, "number too large");
		v = v * 10 + d;
		ps->p++;
	}
	if (ps->p == first)
		return fail(ps, "expected a non-negative integer");
	if (ps->p - first > 1 && *first == '0')
		return fail(ps, "number with a leading zero");
	if (ps->p < ps->end && (*ps->p == '.' || *ps->p == 'e' || *ps->p == 'E'))
		return fail(ps, "expected an integer, not a fraction");
	*ret = v;
	return 0;
}

/* [n, n, ...] into out (at most max numbers). */
static int parse_u64_list(struct parser *ps, uint64_t *out, unsigned max, unsigned *ret_n,
			  const char *what)
{
	unsigned n = 0;
	int r;

	if (!take(ps, '['))
		return fail(ps, "expected '[' (%s)", what);
	if (!take(ps, ']')) {
		do {
			if (n == max)
				return fail(ps, "more than %u numbers (%s)", max, what);
			r = parse_u64(ps, &out[n++]);
			if (r < 0)
				return r;
		} while (take(ps, ','));
		if (!take(ps, ']'))
			return fail(ps, "expected ',' or ']' (%s)", what);
	}
	*ret_n = n;
	return 0;
}

static int grow(void **arr, size_t *cap, size_t n, size_t elem)
{
	void *p;
	size_t c;

	if (n < *cap)
		return 0;
	c = *cap ? *cap * 2 : 64;
	p = realloc(*arr, c * elem);
	if (!p)
		return -ENOMEM;
	*arr = p;
	*cap = c;
	return 0;
}

static int parse_metadata(struct parser *ps)
{
	struct st_file *f = ps->f;
	int r;

	if (!take(ps, '{'))
		return fail(ps, "__metadata__ is not an object");
	if (take(ps, '}'))
		return 0;
	do {
		struct st_meta *m;

		r = grow((void **)&f->meta, &ps->cap_meta, f->n_meta, sizeof(*m));
		if (r < 0)
			return r;
		m = &f->meta[f->n_meta];
		r = parse_string(ps, m->key, sizeof(m->key), "a __metadata__ key");
		if (r < 0)
			return r;
		if (st_meta_get(f, m->key))
			return fail(ps, "duplicate __metadata__ key %s", m->key);
		if (!take(ps, ':'))
			return fail(ps, "expected ':' after __metadata__ key %s", m->key);
		r = parse_string(ps, m->value, sizeof(m->value), "a __metadata__ value");
		if (r < 0)
			return r;
		f->n_meta++;
	} while (take(ps, ','));
	return take(ps, '}') ? 0 : fail(ps, "expected ',' or '}' in __metadata__");
}

static int parse_tensor(struct parser *ps, struct st_tensor *t)
{
	bool have_dtype = false, have_shape = false, have_offsets = false;
	uint64_t elems = 1;
	unsigned esize;
	char key[32];
	int r;

	if (!take(ps, '{'))
		return fail(ps, "tensor %s is not an object", t->name);
	do {
		r = parse_string(ps, key, sizeof(key), "a tensor field");
		if (r < 0)
			return r;
		if (!take(ps, ':'))
			return fail(ps, "expected ':' after %s in tensor %s", key, t->name);
		if (strcmp(key, "dtype") == 0 && !have_dtype) {
			r = parse_string(ps, t->dtype, sizeof(t->dtype), "dtype");
			have_dtype = true;
		} else if (strcmp(key, "shape") == 0 && !have_shape) {
			r = parse_u64_list(ps, t->shape, ST_MAX_DIMS, &t->n_dims, "shape");
			have_shape = true;
		} else if (strcmp(key, "data_offsets") == 0 && !have_offsets) {
			uint64_t off[2];
			unsigned n;

			r = parse_u64_list(ps, off, 2, &n, "data_offsets");
			if (r == 0 && n != 2)
				r = fail(ps, "tensor %s: data_offsets needs two numbers", t->name);
			t->begin = off[0];
			t->end = off[1];
			have_offsets = true;
		} else {
			r = fail(ps, "tensor %s: unknown or repeated field %s", t->name, key);
		}
		if (r < 0)
			return r;
	} while (take(ps, ','));
	if (!take(ps, '}'))
		return fail(ps, "expected ',' or '}' in tensor %s", t->name);
	if (!have_dtype || !have_shape || !have_offsets)
		return fail(ps, "tensor %s lacks dtype, shape or data_offsets", t->name);
	esize = st_dtype_size(t->dtype);
	if (!esize)
		return fail(ps, "tensor %s: unknown dtype %s", t->name, t->dtype);
	for (unsigned i = 0; i < t->n_dims; i++) {
		if (t->shape[i] && elems > UINT64_MAX / esize / t->shape[i])
			return fail(ps, "tensor %s: shape too large", t->name);
		elems *= t->shape[i];
	}
	if (t->begin > t->end || t->end > ps->f->data_size)
		return fail(ps,
			    "tensor %s: data_offsets [%llu, %llu] lie outside the %llu-byte data "
			    "section",
			    t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
			    (unsigned long long)ps->f->data_size);
	if (t->end - t->begin != elems * esize)
		return fail(ps, "tensor %s: %llu bytes for a %s shape of %llu elements", t->name,
			    (unsigned long long)(t->end - t->begin), t->dtype,
			    (unsigned long long)elems);
	return 0;
}

static int cmp_begin(const void *a, const void *b)
{
	const struct st_tensor *x = *(const struct st_tensor *const *)a;
	const struct st_tensor *y = *(const struct st_tensor *const *)b;

	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	return x->end < y->end ? -1 : x->end > y->end;
}

/* The tensors tile the data section: no overlap, no hole, nothing after. */
static int check_layout(struct parser *ps)
{
	struct st_file *f = ps->f;
	const struct st_tensor **v;
	uint64_t at = 0;
	int r = 0;

	if (!f->n_tensors) {
		if (f->data_size)
			return fail(ps, "no tensors but a %llu-byte data section",
				    (unsigned long long)f->data_size);
		return 0;
	}
	v = malloc(f->n_tensors * sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (size_t i = 0; i < f->n_tensors; i++)
		v[i] = &f->tensors[i];
	qsort(v, f->n_tensors, sizeof(*v), cmp_begin);
	for (size_t i = 0; i < f->n_tensors && r == 0; i++) {
		if (v[i]->begin < at)
			r = fail(ps, "tensor %s overlaps another", v[i]->name);
		else if (v[i]->begin > at)
			r = fail(ps, "a hole in the data section before tensor %s", v[i]->name);
		at = v[i]->end;
	}
	if (r == 0 && at != f->data_size)
		r = fail(ps, "the data section has %llu bytes after the last tensor",
			 (unsigned long long)(f->data_size - at));
	free(v);
	return r;
}

int st_parse(const char *json, size_t len, uint64_t data_size, struct st_file *ret, char *err)
{
	struct st_file f = { .data_size = data_size };
	struct parser ps = { .start = json, .p = json, .end = json + len, .err = err, .f = &f };
	bool have_meta = false;
	int r = 0;

	err[0] = 0;
	if (!take(&ps, '{'))
		r = fail(&ps, "the header is not a JSON object");
	else if (take(&ps, '}'))
		goto end;
	while (r == 0) {
		char name[sizeof(f.tensors->name)];

		r = parse_string(&ps, name, sizeof(name), "a tensor name");
		if (r < 0)
			break;
		if (!take(&ps, ':')) {
			r = fail(&ps, "expected ':' after %s", name);
			break;
		}
		if (strcmp(name, "__metadata__") == 0) {
			if (have_meta) {
				r = fail(&ps, "two __metadata__ objects");
				break;
			}
			have_meta = true;
			r = parse_metadata(&ps);
		} else {
			struct st_tensor *t;

			if (st_find(&f, name)) {
				r = fail(&ps, "duplicate tensor %s", name);
				break;
			}
			r = grow((void **)&f.tensors, &ps.cap_tensors, f.n_tensors, sizeof(*t));
			if (r < 0)
				break;
			t = &f.tensors[f.n_tensors];
			memset(t, 0, sizeof(*t));
			memcpy(t->name, name, sizeof(t->name));
			r = parse_tensor(&ps, t);
			if (r == 0)
				f.n_tensors++;
		}
		if (r < 0 || !take(&ps, ','))
			break;
	}
	if (r == 0 && !take(&ps, '}'))
		r = fail(&ps, "expected ',' or '}' after an entry");
end:
	skip_ws(&ps);
	if (r == 0 && ps.p != ps.end)
		r = fail(&ps, "trailing bytes after the header object");
	if (r == 0)
		r = check_layout(&ps);
	if (r < 0) {
		if (r == -ENOMEM)
			snprintf(err, ST_ERR_SIZE, "out of memory reading the safetensors header");
		st_free(&f);
		return r;
	}
	*ret = f;
	return 0;
}

int st_open(int fd, struct st_file *ret, char *err)
{
	uint64_t header_len;
	unsigned char len_le[8];
	struct stat sb;
	char *header;
	ssize_t k;
	int r;

	err[0] = 0;
	if (fstat(fd, &sb) < 0) {
		r = -errno;
		snprintf(err, ST_ERR_SIZE, "cannot stat the model file: %s", strerror(-r));
		return r;
	}
	if (!S_ISREG(sb.st_mode)) {
		snprintf(err, ST_ERR_SIZE, "the model is not a regular file");
		return -EBADMSG;
	}
	k = pread(fd, len_le, sizeof(len_le), 0);
	if (k != (ssize_t)sizeof(len_le)) {
		snprintf(err, ST_ERR_SIZE,
			 "file of %lld bytes is too short for a safetensors header",
			 (long long)sb.st_size);
		return -EBADMSG;
	}
	memcpy(&header_len, len_le, sizeof(header_len));
	header_len = le64toh(header_len);
	if (header_len < 2 || header_len > HEADER_MAX ||
	    header_len > (uint64_t)sb.st_size - sizeof(len_le)) {
		snprintf(err, ST_ERR_SIZE,
			 "header length %llu does not fit a %lld-byte file (or exceeds %u bytes)",
			 (unsigned long long)header_len, (long long)sb.st_size, HEADER_MAX);
		return -EBADMSG;
	}
	header = malloc(header_len);
	if (!header) {
		snprintf(err, ST_ERR_SIZE, "out of memory for a %llu-byte header",
			 (unsigned long long)header_len);
		return -ENOMEM;
	}
	k = pread(fd, header, header_len, sizeof(len_le));
	if (k != (ssize_t)header_len) {
		r = k < 0 ? -errno : -EIO;
		snprintf(err, ST_ERR_SIZE, "cannot read the %llu-byte header: %s",
			 (unsigned long long)header_len, k < 0 ? strerror(-r) : "short read");
		free(header);
		return r;
	}
	r = st_parse(header, header_len, (uint64_t)sb.st_size - sizeof(len_le) - header_len, ret,
		     err);
	free(header);
	if (r == 0)
		ret->data_offset = sizeof(len_le) + header_len;
	return r;
}

void st_free(struct st_file *f)
{
	if (!f)
		return;
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

unsigned st_dtype_size(const char *dtype)
{
	static const struct {
		const char *name;
		unsigned size;
	} types[] = {
		{ "BOOL", 1 }, { "U8", 1 },  { "I8", 1 },	{ "F8_E4M3", 1 }, { "F8_E5M2", 1 },
		{ "I16", 2 },  { "U16", 2 }, { "F16", 2 },	{ "BF16", 2 },	  { "I32", 4 },
		{ "U32", 4 },  { "F32", 4 }, { "I64", 8 },	{ "U64", 8 },	  { "F64", 8 },
	};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		if (strcmp(types[i].name, dtype) == 0)
			return types[i].size;
	return 0;
}
