/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Reading checkpoint archives in place (archive.h): a walk over tar
 * headers, nothing extracted.
 */
#include "archive.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define BLOCK	     512u
#define PAX_MAX	     (1u << 20) /* a pax header larger than this is not a checkpoint's */
#define MANIFEST_MAX (64u << 20)
#define LONGNAME_MAX 4096u

/* An octal field, or GNU's base-256 (high bit of the first byte set). */
static int tar_number(const uint8_t *p, size_t n, uint64_t *ret)
{
	uint64_t v = 0;
	size_t i = 0;

	if (p[0] & 0x80) {
		v = p[0] & 0x7f;
		for (i = 1; i < n; i++) {
			if (v >> 56)
				return -EBADMSG;
			v = v << 8 | p[i];
		}
		*ret = v;
		return 0;
	}
	while (i < n && (p[i] == ' ' || p[i] == 0))
		i++;
	for (; i < n && p[i] >= '0' && p[i] <= '7'; i++) {
		if (v >> 60)
			return -EBADMSG;
		v = v * 8 + (uint64_t)(p[i] - '0');
	}
	for (; i < n; i++)
		if (p[i] != ' ' && p[i] != 0)
			return -EBADMSG;
	*ret = v;
	return 0;
}

static bool checksum_ok(const uint8_t *h)
{
	uint64_t want, sum = 0;

	if (tar_number(h + 148, 8, &want) < 0)
		return false;
	for (size_t i = 0; i < BLOCK; i++)
		sum += (i >= 148 && i < 156) ? ' ' : h[i];
	return sum == want;
}

/* Without a leading "./" (or several). */
static const char *strip_dot(const char *s)
{
	while (s[0] == '.' && s[1] == '/')
		s += 2;
	return s;
}

/* The path= and size= records of a pax extended header. */
static void pax_parse(const char *p, size_t n, char *path, size_t path_size, uint64_t *size,
		      bool *has_size)
{
	size_t off = 0;

	while (off < n) {
		char *end;
		unsigned long len = strtoul(p + off, &end, 10);
		const char *kv, *eq;

		if (end == p + off || *end != ' ' || len == 0 || off + len > n)
			return;
		kv = end + 1;
		eq = memchr(kv, '=', (size_t)(p + off + len - kv));
		if (eq) {
			size_t klen = (size_t)(eq - kv),
			       vlen = (size_t)(p + off + len - 1 - (eq + 1));

			if (klen == 4 && memcmp(kv, "path", 4) == 0 && vlen < path_size) {
				memcpy(path, eq + 1, vlen);
				path[vlen] = 0;
			} else if (klen == 4 && memcmp(kv, "size", 4) == 0) {
				*size = strtoull(eq + 1, NULL, 10);
				*has_size = true;
			}
		}
		off += len;
	}
}

int km_archive_foreach(int fd, km_archive_fn fn, void *userdata, struct km_error *err)
{
	uint8_t h[BLOCK];
	uint64_t off = 0;
	char next_name[LONGNAME_MAX] = "";
	uint64_t next_size = 0;
	bool has_next_size = false;
	struct stat st;
	int r;

	if (fstat(fd, &st) < 0) {
		km_error_set(err, "archive: %s", strerror(errno));
		return -errno;
	}
	for (;;) {
		struct km_archive_member m = { .type = 0 };
		ssize_t k = km_pread_full(fd, h, BLOCK, (off_t)off);
		uint64_t size, data;

		if (k < 0) {
			km_error_set(err, "archive: cannot read: %s", strerror((int)-k));
			return (int)k;
		}
		if (k == 0 && off > 0)
			return 0; /* no end-of-archive blocks: GNU tar reads that too */
		if (k != BLOCK) {
			km_error_set(err, "archive: truncated at byte %llu",
				     (unsigned long long)off);
			return -EBADMSG;
		}
		if (off == 0 && ((h[0] == 0x1f && h[1] == 0x8b) ||
				 (h[0] == 0x28 && h[1] == 0xb5 && h[2] == 0x2f && h[3] == 0xfd))) {
			km_error_set(err,
				     "archive is %s-compressed: export it uncompressed "
				     "(podman container checkpoint --compress none)",
				     h[0] == 0x1f ? "gzip" : "zstd");
			return -EPROTONOSUPPORT;
		}
		if (km_is_zero(h, BLOCK))
			return 0; /* the end */
		if (!checksum_ok(h)) {
			km_error_set(err, "archive: not a tar header at byte %llu (bad checksum)",
				     (unsigned long long)off);
			return -EBADMSG;
		}
		if (tar_number(h + 124, 12, &size) < 0) {
			km_error_set(err, "archive: bad size field at byte %llu",
				     (unsigned long long)off);
			return -EBADMSG;
		}
		m.type = (char)(h[156] ? h[156] : '0');
		data = off + BLOCK;
		if (m.type == 'x' || m.type == 'L') {
			_cleanup_free_ char *buf = NULL;

			if (size > (m.type == 'x' ? PAX_MAX : LONGNAME_MAX - 1)) {
				km_error_set(err, "archive: %s header of %llu bytes",
					     m.type == 'x' ? "pax" : "long-name",
					     (unsigned long long)size);
				return -EBADMSG;
			}
			buf = malloc(size + 1);
			if (!buf)
				return -ENOMEM;
			k = km_pread_full(fd, buf, size, (off_t)data);
			if (k < 0 || (uint64_t)k != size) {
				km_error_set(err, "archive: truncated at byte %llu",
					     (unsigned long long)data);
				return -EBADMSG;
			}
			buf[size] = 0;
			if (m.type == 'x')
				pax_parse(buf, size, next_name, sizeof(next_name), &next_size,
					  &has_next_size);
			else
				snprintf(next_name, sizeof(next_name), "%s", buf);
			off = data + (size + BLOCK - 1) / BLOCK * BLOCK;
			continue;
		}
		if (has_next_size)
			size = next_size;
		if (next_name[0]) {
			snprintf(m.name, sizeof(m.name), "%s", strip_dot(next_name));
		} else {
			char full[256 + 1 + 100 + 1];
			/* ustar: a prefix (345, 155 bytes) before the name (0, 100 bytes) */
			if (memcmp(h + 257, "ustar", 5) == 0 && h[345])
				snprintf(full, sizeof(full), "%.155s/%.100s", (const char *)h + 345,
					 (const char *)h);
			else
				snprintf(full, sizeof(full), "%.100s", (const char *)h);
			snprintf(m.name, sizeof(m.name), "%s", strip_dot(full));
		}
		next_name[0] = 0;
		has_next_size = false;
		next_size = 0;
		/* Entries without data in the stream. */
		if (m.type == '1' || m.type == '2' || m.type == '3' || m.type == '4' ||
		    m.type == '5' || m.type == '6')
			size = 0;
		m.offset = data;
		m.size = size;
		if (data + size > (uint64_t)st.st_size) {
			km_error_set(err, "archive: member %s truncated", m.name);
			return -EBADMSG;
		}
		r = fn(&m, userdata);
		if (r != 0)
			return r;
		off = data + (size + BLOCK - 1) / BLOCK * BLOCK;
	}
}

struct find {
	const char *name;
	struct km_archive_member m;
};

static int find_fn(const struct km_archive_member *m, void *userdata)
{
	struct find *f = userdata;

	/* The last of several members of one name wins, as tar extracts them. */
	if ((m->type == '0' || m->type == '7') && strcmp(m->name, f->name) == 0)
		f->m = *m;
	return 0;
}

int km_archive_find(int fd, const char *name, struct km_archive_member *ret, struct km_error *err)
{
	struct find f = { .name = strip_dot(name) };
	int r = km_archive_foreach(fd, find_fn, &f, err);

	if (r < 0)
		return r;
	if (!f.m.name[0]) {
		km_error_set(err, "archive has no %s", f.name);
		return -ENOENT;
	}
	*ret = f.m;
	return 0;
}

int km_archive_read(int fd, const char *name, size_t max, void **ret, size_t *ret_size,
		    struct km_error *err)
{
	struct km_archive_member m;
	_cleanup_free_ void *buf = NULL;
	ssize_t k;
	int r;

	r = km_archive_find(fd, name, &m, err);
	if (r < 0)
		return r;
	if (m.size > max) {
		km_error_set(err, "archive member %s: %llu bytes (at most %zu)", m.name,
			     (unsigned long long)m.size, max);
		return -EFBIG;
	}
	buf = malloc(m.size ? m.size : 1);
	if (!buf)
		return -ENOMEM;
	k = km_pread_full(fd, buf, m.size, (off_t)m.offset);
	if (k < 0 || (uint64_t)k != m.size) {
		km_error_set(err, "archive member %s: short read", m.name);
		return k < 0 ? (int)k : -EBADMSG;
	}
	*ret = buf;
	buf = NULL;
	*ret_size = m.size;
	return 0;
}

int km_archive_manifest(int fd, struct km_manifest **ret, struct km_hash *ret_id,
			struct km_error *err)
{
	_cleanup_free_ void *buf = NULL;
	size_t n;
	int r;

	r = km_archive_read(fd, KM_ARCHIVE_MANIFEST, MANIFEST_MAX, &buf, &n, err);
	if (r < 0)
		return r;
	r = km_manifest_decode(buf, n, ret, err);
	if (r < 0) {
		km_error_prefix(err, "archive member %s", KM_ARCHIVE_MANIFEST);
		return r;
	}
	if (ret_id)
		km_hash_buf(buf, n, ret_id);
	return 0;
}

struct layout {
	bool inventory, config, spec;
};

static int layout_fn(const struct km_archive_member *m, void *userdata)
{
	struct layout *l = userdata;

	if (strcmp(m->name, KM_ARCHIVE_CHECKPOINT_DIR "/inventory.img") == 0)
		l->inventory = true;
	else if (strcmp(m->name, "config.dump") == 0)
		l->config = true;
	else if (strcmp(m->name, "spec.dump") == 0)
		l->spec = true;
	return 0;
}

int km_archive_check_layout(int fd, struct km_error *err)
{
	struct layout l = { false, false, false };
	int r = km_archive_foreach(fd, layout_fn, &l, err);

	if (r < 0)
		return r;
	if (!l.inventory || !l.config || !l.spec) {
		km_error_set(err, "not a container checkpoint archive: no %s",
			     !l.inventory ? KM_ARCHIVE_CHECKPOINT_DIR "/inventory.img" :
			     !l.config	  ? "config.dump" :
					    "spec.dump");
		return -ENOENT;
	}
	return 0;
}
