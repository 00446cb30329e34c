/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "format.h"
#include "format_internal.h"

#include <endian.h>
#include <fcntl.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "kvmotion.pb-c.h"

/* --- records: magic, u32 LE length, packed message --- */

static int record_encode(const char *magic, const ProtobufCMessage *msg, void **ret,
			 size_t *ret_size)
{
	size_t len = protobuf_c_message_get_packed_size(msg);
	uint32_t le;
	uint8_t *buf;

	if (len > KM_RECORD_MAX)
		return -E2BIG;
	buf = malloc(KM_MAGIC_SIZE + 4 + len);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, magic, KM_MAGIC_SIZE);
	le = htole32((uint32_t)len);
	memcpy(buf + KM_MAGIC_SIZE, &le, 4);
	protobuf_c_message_pack(msg, buf + KM_MAGIC_SIZE + 4);
	*ret = buf;
	*ret_size = KM_MAGIC_SIZE + 4 + len;
	return 0;
}

/* Finds the single record after the magic; what = "manifest" etc. for errors. */
static int record_locate(const void *p, size_t n, const char *magic, const char *what,
			 const uint8_t **ret, size_t *ret_len, struct km_error *err)
{
	const uint8_t *b = p;
	uint32_t le;

	if (n < KM_MAGIC_SIZE || memcmp(b, magic, KM_MAGIC_SIZE) != 0) {
		km_error_set(err, "not a kvmotion %s (bad magic)", what);
		return -ENOTRECOVERABLE;
	}
	if (n < KM_MAGIC_SIZE + 4) {
		km_error_set(err, "%s truncated: %zu bytes, no record length", what, n);
		return -EBADMSG;
	}
	memcpy(&le, b + KM_MAGIC_SIZE, 4);
	le = le32toh(le);
	if (le > KM_RECORD_MAX || (size_t)le > n - KM_MAGIC_SIZE - 4) {
		km_error_set(err, "%s truncated: record of %u bytes, %zu present", what, le,
			     n - KM_MAGIC_SIZE - 4);
		return -EBADMSG;
	}
	if ((size_t)le != n - KM_MAGIC_SIZE - 4) {
		km_error_set(err, "%s has %zu trailing bytes after its record", what,
			     n - KM_MAGIC_SIZE - 4 - le);
		return -EBADMSG;
	}
	*ret = b + KM_MAGIC_SIZE + 4;
	*ret_len = le;
	return 0;
}

static int check_version(uint32_t major, uint32_t minor, const char *what, struct km_error *err)
{
	if (major != KM_FORMAT_MAJOR) {
		km_error_set(err,
			     "%s has format version %u.%u; this kvmotion reads major version %u only",
			     what, major, minor, KM_FORMAT_MAJOR);
		return -EPROTONOSUPPORT;
	}
	return 0;
}

/* --- in-memory helpers --- */

bool km_filename_is_plain(const char *name)
{
	if (!name || !name[0] || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
		return false;
	if (strlen(name) > 255)
		return false;
	for (const char *c = name; *c; c++)
		if (*c == '/' || (unsigned char)*c < 0x20 || *c == 0x7f)
			return false;
	return true;
}

void km_file_entry_clear(struct km_file_entry *f)
{
	free(f->name);
	free(f->extents);
	memset(f, 0, sizeof(*f));
}

static void file_entries_free(struct km_file_entry *files, size_t n)
{
	for (size_t i = 0; i < n; i++)
		km_file_entry_clear(&files[i]);
	free(files);
}

void km_manifest_free(struct km_manifest *m)
{
	if (!m)
		return;
	file_entries_free(m->files, m->n_files);
	free(m->delta.name);
	free(m->created_by);
	free(m->store_hint);
	free(m);
}

void km_weights_index_free(struct km_weights_index *idx)
{
	if (!idx)
		return;
	file_entries_free(idx->files, idx->n_files);
	free(idx->name);
	free(idx);
}

int km_file_entry_add_extent(struct km_file_entry *f, const struct km_extent *e)
{
	struct km_extent *last = f->n_extents ? &f->extents[f->n_extents - 1] : NULL;

	if (e->length == 0)
		return 0;
	/* Zero runs and contiguous delta ranges merge; chunks never do. */
	if (last && last->kind == e->kind) {
		if (e->kind == KM_EXTENT_ZERO) {
			last->length += e->length;
			return 0;
		}
		if (e->kind == KM_EXTENT_DELTA &&
		    last->delta_offset + last->length == e->delta_offset) {
			last->length += e->length;
			return 0;
		}
	}
	/* Grow geometrically: an image has thousands of extents. */
	if ((f->n_extents & (f->n_extents - 1)) == 0) {
		size_t cap = f->n_extents ? f->n_extents * 2 : 16;
		struct km_extent *x;

		if (cap > f->n_extents) {
			x = realloc(f->extents, cap * sizeof(*x));
			if (!x)
				return -ENOMEM;
			f->extents = x;
		}
	}
	f->extents[f->n_extents++] = *e;
	return 0;
}

/*
 * The extent digest, byte for byte as docs/formats.md says: it binds the
 * extent list to the delta it reads from, so that a damaged manifest (an
 * offset, a length, a chunk id) is caught before any byte is written.
 */
#define EXTENTS_DIGEST_MAGIC "KMXTNTS\n"

static void put_u64_le(struct km_hasher *h, uint64_t v)
{
	uint64_t le = htole64(v);

	km_hasher_update(h, &le, sizeof(le));
}

void km_file_entry_extents_digest(const struct km_file_entry *f, const struct km_hash *delta_sha256,
				  struct km_hash *ret)
{
	struct km_hasher *h = km_hasher_new();
	uint8_t buf[1 + 8 + KM_HASH_SIZE];
	size_t name_len = strlen(f->name);
	uint32_t le32 = htole32((uint32_t)name_len);

	if (!h) {
		/* No digest that could match: the caller's comparison fails. */
		memset(ret, 0xff, sizeof(*ret));
		return;
	}
	km_hasher_update(h, EXTENTS_DIGEST_MAGIC, 8);
	km_hasher_update(h, &le32, 4);
	km_hasher_update(h, f->name, name_len);
	put_u64_le(h, f->size);
	put_u64_le(h, f->n_extents);
	for (size_t i = 0; i < f->n_extents; i++) {
		const struct km_extent *e = &f->extents[i];
		uint64_t le = htole64(e->length);
		size_t n = 9;

		buf[0] = (uint8_t)e->kind;
		memcpy(buf + 1, &le, 8);
		if (e->kind == KM_EXTENT_CHUNK) {
			memcpy(buf + n, e->id.b, KM_HASH_SIZE);
			n += KM_HASH_SIZE;
		} else if (e->kind == KM_EXTENT_DELTA) {
			le = htole64(e->delta_offset);
			memcpy(buf + n, &le, 8);
			n += 8;
		}
		km_hasher_update(h, buf, n);
	}
	km_hasher_update(h, delta_sha256->b, KM_HASH_SIZE);
	km_hasher_final(h, ret);
	km_hasher_free(h);
}

/* --- shared encode/decode pieces --- */

static void chunker_to_pb(const struct km_chunker_params *p, Kvmotion__ChunkerParams *pb)
{
	kvmotion__chunker_params__init(pb);
	pb->min_size = p->min_size;
	pb->avg_size = p->avg_size;
	pb->max_size = p->max_size;
}

static int chunker_from_pb(const Kvmotion__ChunkerParams *pb, struct km_chunker_params *ret,
			   const char *what, struct km_error *err)
{
	struct km_chunker_params p = {
		.min_size = pb->min_size,
		.avg_size = pb->avg_size,
		.max_size = pb->max_size,
	};

	if (km_chunker_params_check(&p) < 0) {
		km_error_set(err, "%s has invalid chunker parameters %u/%u/%u", what, p.min_size,
			     p.avg_size, p.max_size);
		return -EBADMSG;
	}
	*ret = p;
	return 0;
}

static int hash_from_pb(const ProtobufCBinaryData *b, struct km_hash *ret)
{
	if (b->len != KM_HASH_SIZE)
		return -EBADMSG;
	memcpy(ret->b, b->data, KM_HASH_SIZE);
	return 0;
}

static ProtobufCBinaryData hash_to_pb(const struct km_hash *h)
{
	return (ProtobufCBinaryData){ .len = KM_HASH_SIZE, .data = (uint8_t *)h->b };
}

/*
 * Builds pb FileEntry messages that borrow from 'files'. All pb structs
 * live in two arrays owned by the caller through *ret_store.
 */
struct pb_files {
	Kvmotion__FileEntry *entries;
	Kvmotion__FileEntry **entry_ptrs;
	Kvmotion__Extent *extents;
	Kvmotion__Extent **extent_ptrs;
};

static void pb_files_free(struct pb_files *pf)
{
	free(pf->entries);
	free(pf->entry_ptrs);
	free(pf->extents);
	free(pf->extent_ptrs);
}

static int pb_files_build(const struct km_file_entry *files, size_t n, struct pb_files *pf)
{
	size_t total = 0, k = 0;

	for (size_t i = 0; i < n; i++)
		total += files[i].n_extents;
	pf->entries = calloc(n ? n : 1, sizeof(*pf->entries));
	pf->entry_ptrs = calloc(n ? n : 1, sizeof(*pf->entry_ptrs));
	pf->extents = calloc(total ? total : 1, sizeof(*pf->extents));
	pf->extent_ptrs = calloc(total ? total : 1, sizeof(*pf->extent_ptrs));
	if (!pf->entries || !pf->entry_ptrs || !pf->extents || !pf->extent_ptrs) {
		pb_files_free(pf);
		return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		const struct km_file_entry *f = &files[i];
		Kvmotion__FileEntry *e = &pf->entries[i];

		kvmotion__file_entry__init(e);
		e->name = f->name;
		e->size = f->size;
		e->mode = f->mode;
		if (!km_hash_is_null(&f->sha256)) {
			e->has_sha256 = 1;
			e->sha256 = hash_to_pb(&f->sha256);
		}
		if (f->split && !km_hash_is_null(&f->extents_sha256)) {
			e->has_extents_sha256 = 1;
			e->extents_sha256 = hash_to_pb(&f->extents_sha256);
		}
		e->storage = f->split ? KVMOTION__FILE_STORAGE__FILE_SPLIT
				      : KVMOTION__FILE_STORAGE__FILE_KEPT;
		e->n_extents = f->n_extents;
		e->extents = &pf->extent_ptrs[k];
		for (size_t j = 0; j < f->n_extents; j++, k++) {
			const struct km_extent *x = &f->extents[j];
			Kvmotion__Extent *px = &pf->extents[k];

			kvmotion__extent__init(px);
			px->kind = (Kvmotion__ExtentKind)x->kind;
			px->length = x->length;
			if (x->kind == KM_EXTENT_CHUNK) {
				px->has_chunk_id = 1;
				px->chunk_id = hash_to_pb(&x->id);
			} else if (x->kind == KM_EXTENT_DELTA) {
				px->has_delta_offset = 1;
				px->delta_offset = x->delta_offset;
			}
			pf->extent_ptrs[k] = px;
		}
		pf->entry_ptrs[i] = e;
	}
	return 0;
}

/*
 * Converts and validates pb file entries. delta_size: extents must lie
 * inside it; UINT64_MAX forbids delta extents (weights indexes). delta_sha256:
 * the manifest's delta hash, for extent digests (NULL: none may appear).
 * minor: before 2, every file has its whole-file SHA-256.
 */
static int files_from_pb(Kvmotion__FileEntry **pbs, size_t n, uint64_t delta_size,
			 const struct km_hash *delta_sha256, uint32_t minor, const char *what,
			 struct km_file_entry **ret, struct km_error *err)
{
	struct km_file_entry *files = calloc(n ? n : 1, sizeof(*files));
	int r = 0;

	if (!files)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		const Kvmotion__FileEntry *e = pbs[i];
		struct km_file_entry *f = &files[i];
		uint64_t sum = 0;

		if (!km_filename_is_plain(e->name)) {
			km_error_set(err, "%s: file entry %zu has an invalid name", what, i);
			r = -EBADMSG;
			goto fail;
		}
		for (size_t j = 0; j < i; j++)
			if (strcmp(files[j].name, e->name) == 0) {
				km_error_set(err, "%s: file %s listed twice", what, e->name);
				r = -EBADMSG;
				goto fail;
			}
		f->name = strdup(e->name);
		if (!f->name) {
			r = -ENOMEM;
			goto fail;
		}
		f->size = e->size;
		f->mode = e->mode & 07777;
		f->split = e->storage == KVMOTION__FILE_STORAGE__FILE_SPLIT;
		/* In a manifest all zero would read back as "no whole-file hash". */
		if ((e->has_sha256 && (hash_from_pb(&e->sha256, &f->sha256) < 0 ||
				       (delta_sha256 && km_hash_is_null(&f->sha256)))) ||
		    (e->has_extents_sha256 &&
		     (!f->split || !delta_sha256 ||
		      hash_from_pb(&e->extents_sha256, &f->extents_sha256) < 0 ||
		      km_hash_is_null(&f->extents_sha256)))) {
			km_error_set(err, "%s: file %s has a malformed SHA-256", what, e->name);
			r = -EBADMSG;
			goto fail;
		}
		/* Until 1.1 every file, and kept files always, carry their hash. */
		if (!e->has_sha256 && (!f->split || minor < 2 || !e->has_extents_sha256)) {
			km_error_set(err, "%s: file %s has no %s", what, e->name,
				     f->split && minor >= 2 ? "SHA-256 or extent digest" : "SHA-256");
			r = -EBADMSG;
			goto fail;
		}
		if (!f->split) {
			if (e->n_extents) {
				km_error_set(err, "%s: kept file %s has extents", what, e->name);
				r = -EBADMSG;
				goto fail;
			}
			continue;
		}
		f->extents = calloc(e->n_extents ? e->n_extents : 1, sizeof(*f->extents));
		if (!f->extents) {
			r = -ENOMEM;
			goto fail;
		}
		f->n_extents = e->n_extents;
		for (size_t j = 0; j < e->n_extents; j++) {
			const Kvmotion__Extent *px = e->extents[j];
			struct km_extent *x = &f->extents[j];

			x->kind = (enum km_extent_kind)px->kind;
			x->length = px->length;
			switch (px->kind) {
			case KVMOTION__EXTENT_KIND__EXTENT_ZERO:
				break;
			case KVMOTION__EXTENT_KIND__EXTENT_CHUNK:
				if (!px->has_chunk_id || hash_from_pb(&px->chunk_id, &x->id) < 0 ||
				    px->length == 0 || px->length > KM_CHUNK_MAX_LIMIT) {
					km_error_set(err, "%s: file %s extent %zu: bad chunk reference",
						     what, e->name, j);
					r = -EBADMSG;
					goto fail;
				}
				break;
			case KVMOTION__EXTENT_KIND__EXTENT_DELTA:
				if (delta_size == UINT64_MAX || !px->has_delta_offset ||
				    px->delta_offset > delta_size ||
				    px->length > delta_size - px->delta_offset) {
					km_error_set(err,
						     "%s: file %s extent %zu: delta range outside the delta",
						     what, e->name, j);
					r = -EBADMSG;
					goto fail;
				}
				x->delta_offset = px->delta_offset;
				break;
			default:
				km_error_set(err, "%s: file %s extent %zu: unknown kind %d", what,
					     e->name, j, (int)px->kind);
				r = -EBADMSG;
				goto fail;
			}
			if (sum + px->length < sum) {
				r = -EBADMSG;
				goto fail;
			}
			sum += px->length;
		}
		if (sum != f->size) {
			km_error_set(err, "%s: file %s: extents cover %llu bytes, size is %llu", what,
				     e->name, (unsigned long long)sum, (unsigned long long)f->size);
			r = -EBADMSG;
			goto fail;
		}
		if (e->has_extents_sha256) {
			struct km_hash d;

			km_file_entry_extents_digest(f, delta_sha256, &d);
			if (!km_hash_equal(&d, &f->extents_sha256)) {
				km_error_set(err,
					     "%s: file %s: extents do not match their digest (damaged manifest)",
					     what, e->name);
				r = -EBADMSG;
				goto fail;
			}
		}
	}
	*ret = files;
	return 0;
fail:
	file_entries_free(files, n);
	return r;
}

/* --- manifest --- */

int km_manifest_encode(const struct km_manifest *m, void **ret, size_t *ret_size)
{
	Kvmotion__Manifest pb = KVMOTION__MANIFEST__INIT;
	Kvmotion__ChunkerParams chunker;
	Kvmotion__DeltaRef delta = KVMOTION__DELTA_REF__INIT;
	struct pb_files pf = { 0 };
	int r;

	pb.major = m->major;
	pb.minor = m->minor;
	chunker_to_pb(&m->chunker, &chunker);
	pb.chunker = &chunker;
	delta.name = m->delta.name;
	delta.raw_size = m->delta.raw_size;
	delta.compressed_size = m->delta.compressed_size;
	delta.frames = m->delta.frames;
	delta.sha256 = hash_to_pb(&m->delta.sha256);
	if (!km_hash_is_null(&m->delta.image_id)) {
		delta.has_image_id = 1;
		delta.image_id = hash_to_pb(&m->delta.image_id);
	}
	pb.delta = &delta;
	pb.created_by = m->created_by;
	if (m->created_unix) {
		pb.has_created_unix = 1;
		pb.created_unix = m->created_unix;
	}
	pb.store_hint = m->store_hint;

	r = pb_files_build(m->files, m->n_files, &pf);
	if (r < 0)
		return r;
	pb.n_files = m->n_files;
	pb.files = pf.entry_ptrs;
	r = record_encode(KM_MAGIC_MANIFEST, &pb.base, ret, ret_size);
	pb_files_free(&pf);
	return r;
}

int km_manifest_decode(const void *p, size_t n, struct km_manifest **ret, struct km_error *err)
{
	const uint8_t *rec;
	size_t len;
	Kvmotion__Manifest *pb;
	struct km_manifest *m = NULL;
	int r;

	r = record_locate(p, n, KM_MAGIC_MANIFEST, "manifest", &rec, &len, err);
	if (r < 0)
		return r;
	pb = kvmotion__manifest__unpack(NULL, len, rec);
	if (!pb) {
		km_error_set(err, "manifest is malformed (protobuf decoding failed)");
		return -EBADMSG;
	}
	r = check_version(pb->major, pb->minor, "manifest", err);
	if (r < 0)
		goto out;
	m = calloc(1, sizeof(*m));
	if (!m) {
		r = -ENOMEM;
		goto out;
	}
	m->major = pb->major;
	m->minor = pb->minor;
	r = chunker_from_pb(pb->chunker, &m->chunker, "manifest", err);
	if (r < 0)
		goto out;
	if (!km_filename_is_plain(pb->delta->name) ||
	    hash_from_pb(&pb->delta->sha256, &m->delta.sha256) < 0 ||
	    (pb->delta->has_image_id && hash_from_pb(&pb->delta->image_id, &m->delta.image_id) < 0)) {
		km_error_set(err, "manifest has a malformed delta reference");
		r = -EBADMSG;
		goto out;
	}
	m->delta.name = strdup(pb->delta->name);
	m->delta.raw_size = pb->delta->raw_size;
	m->delta.compressed_size = pb->delta->compressed_size;
	m->delta.frames = pb->delta->frames;
	m->created_by = pb->created_by ? strdup(pb->created_by) : NULL;
	m->created_unix = pb->has_created_unix ? pb->created_unix : 0;
	m->store_hint = pb->store_hint ? strdup(pb->store_hint) : NULL;
	if (!m->delta.name || (pb->created_by && !m->created_by) ||
	    (pb->store_hint && !m->store_hint)) {
		r = -ENOMEM;
		goto out;
	}
	r = files_from_pb(pb->files, pb->n_files, m->delta.raw_size, &m->delta.sha256, m->minor,
			  "manifest", &m->files, err);
	if (r < 0)
		goto out;
	m->n_files = pb->n_files;
	for (size_t i = 0; i < m->n_files; i++)
		if (strcmp(m->files[i].name, m->delta.name) == 0 ||
		    strcmp(m->files[i].name, KM_MANIFEST_NAME) == 0) {
			km_error_set(err, "manifest lists its own file %s", m->files[i].name);
			r = -EBADMSG;
			goto out;
		}
	*ret = KM_TAKE_PTR(m);
out:
	km_manifest_free(m);
	kvmotion__manifest__free_unpacked(pb, NULL);
	return r;
}

/* --- weights index --- */

int km_weights_index_encode(const struct km_weights_index *idx, void **ret, size_t *ret_size)
{
	Kvmotion__WeightsIndex pb = KVMOTION__WEIGHTS_INDEX__INIT;
	Kvmotion__ChunkerParams chunker;
	Kvmotion__IndexFile *ifiles, **iptrs;
	struct pb_files pf = { 0 };
	int r;

	pb.major = idx->major;
	pb.minor = idx->minor;
	pb.name = idx->name;
	chunker_to_pb(&idx->chunker, &chunker);
	pb.chunker = &chunker;
	if (idx->created_unix) {
		pb.has_created_unix = 1;
		pb.created_unix = idx->created_unix;
	}
	if (!km_hash_is_null(&idx->weights_id)) {
		pb.has_weights_id = 1;
		pb.weights_id = hash_to_pb(&idx->weights_id);
		pb.has_weights_size = 1;
		pb.weights_size = idx->weights_size;
	}
	r = pb_files_build(idx->files, idx->n_files, &pf);
	if (r < 0)
		return r;
	/* IndexFile has FileEntry's fields 1..4 minus mode and storage. */
	ifiles = calloc(idx->n_files ? idx->n_files : 1, sizeof(*ifiles));
	iptrs = calloc(idx->n_files ? idx->n_files : 1, sizeof(*iptrs));
	if (!ifiles || !iptrs) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < idx->n_files; i++) {
		kvmotion__index_file__init(&ifiles[i]);
		ifiles[i].name = pf.entries[i].name;
		ifiles[i].size = pf.entries[i].size;
		ifiles[i].sha256 = hash_to_pb(&idx->files[i].sha256);
		ifiles[i].n_extents = pf.entries[i].n_extents;
		ifiles[i].extents = pf.entries[i].extents;
		iptrs[i] = &ifiles[i];
	}
	pb.n_files = idx->n_files;
	pb.files = iptrs;
	r = record_encode(KM_MAGIC_INDEX, &pb.base, ret, ret_size);
out:
	free(ifiles);
	free(iptrs);
	pb_files_free(&pf);
	return r;
}

int km_weights_index_decode(const void *p, size_t n, struct km_weights_index **ret,
			    struct km_error *err)
{
	const uint8_t *rec;
	size_t len;
	Kvmotion__WeightsIndex *pb;
	Kvmotion__FileEntry *entries = NULL, **ptrs = NULL;
	struct km_weights_index *idx = NULL;
	int r;

	r = record_locate(p, n, KM_MAGIC_INDEX, "weights index", &rec, &len, err);
	if (r < 0)
		return r;
	pb = kvmotion__weights_index__unpack(NULL, len, rec);
	if (!pb) {
		km_error_set(err, "weights index is malformed (protobuf decoding failed)");
		return -EBADMSG;
	}
	r = check_version(pb->major, pb->minor, "weights index", err);
	if (r < 0)
		goto out;
	idx = calloc(1, sizeof(*idx));
	entries = calloc(pb->n_files ? pb->n_files : 1, sizeof(*entries));
	ptrs = calloc(pb->n_files ? pb->n_files : 1, sizeof(*ptrs));
	if (!idx || !entries || !ptrs) {
		r = -ENOMEM;
		goto out;
	}
	idx->major = pb->major;
	idx->minor = pb->minor;
	idx->created_unix = pb->has_created_unix ? pb->created_unix : 0;
	idx->name = strdup(pb->name);
	if (!idx->name) {
		r = -ENOMEM;
		goto out;
	}
	r = chunker_from_pb(pb->chunker, &idx->chunker, "weights index", err);
	if (r < 0)
		goto out;
	/* Both or neither; an all-zero id would read back as "none recorded". */
	if (pb->has_weights_id != pb->has_weights_size ||
	    (pb->has_weights_id && (hash_from_pb(&pb->weights_id, &idx->weights_id) < 0 ||
				    km_hash_is_null(&idx->weights_id)))) {
		km_error_set(err, "weights index has a malformed weights file id");
		r = -EBADMSG;
		goto out;
	}
	idx->weights_size = pb->has_weights_size ? pb->weights_size : 0;
	for (size_t i = 0; i < pb->n_files; i++) {
		kvmotion__file_entry__init(&entries[i]);
		entries[i].name = pb->files[i]->name;
		entries[i].size = pb->files[i]->size;
		entries[i].has_sha256 = 1;
		entries[i].sha256 = pb->files[i]->sha256;
		entries[i].storage = KVMOTION__FILE_STORAGE__FILE_SPLIT;
		entries[i].n_extents = pb->files[i]->n_extents;
		entries[i].extents = pb->files[i]->extents;
		ptrs[i] = &entries[i];
	}
	r = files_from_pb(ptrs, pb->n_files, UINT64_MAX, NULL, 1, "weights index", &idx->files, err);
	if (r < 0)
		goto out;
	idx->n_files = pb->n_files;
	*ret = KM_TAKE_PTR(idx);
out:
	free(entries);
	free(ptrs);
	km_weights_index_free(idx);
	kvmotion__weights_index__free_unpacked(pb, NULL);
	return r;
}

/* --- weights file verification record --- */

int km_weights_verified_encode(const struct km_weights_verified *v, void **ret, size_t *ret_size)
{
	Kvmotion__WeightsVerified pb = KVMOTION__WEIGHTS_VERIFIED__INIT;

	pb.major = KM_FORMAT_MAJOR;
	pb.minor = KM_FORMAT_MINOR;
	pb.id = hash_to_pb(&v->id);
	pb.size = v->size;
	pb.dev = v->dev;
	pb.ino = v->ino;
	pb.ctime_sec = v->ctime_sec;
	pb.ctime_nsec = v->ctime_nsec;
	pb.mtime_sec = v->mtime_sec;
	pb.mtime_nsec = v->mtime_nsec;
	if (v->verified_unix) {
		pb.has_verified_unix = 1;
		pb.verified_unix = v->verified_unix;
	}
	return record_encode(KM_MAGIC_WEIGHTS_OK, &pb.base, ret, ret_size);
}

int km_weights_verified_decode(const void *p, size_t n, struct km_weights_verified *ret,
			       struct km_error *err)
{
	struct km_weights_verified v = { 0 };
	Kvmotion__WeightsVerified *pb;
	const uint8_t *rec;
	size_t len;
	int r;

	r = record_locate(p, n, KM_MAGIC_WEIGHTS_OK, "weights verification record", &rec, &len,
			  err);
	if (r < 0)
		return r;
	pb = kvmotion__weights_verified__unpack(NULL, len, rec);
	if (!pb) {
		km_error_set(err, "weights verification record is malformed (protobuf decoding failed)");
		return -EBADMSG;
	}
	r = check_version(pb->major, pb->minor, "weights verification record", err);
	if (r == 0 && (hash_from_pb(&pb->id, &v.id) < 0 || pb->ctime_nsec >= 1000000000u ||
		       pb->mtime_nsec >= 1000000000u)) {
		km_error_set(err, "weights verification record is malformed");
		r = -EBADMSG;
	}
	if (r == 0) {
		v.size = pb->size;
		v.dev = pb->dev;
		v.ino = pb->ino;
		v.ctime_sec = pb->ctime_sec;
		v.ctime_nsec = pb->ctime_nsec;
		v.mtime_sec = pb->mtime_sec;
		v.mtime_nsec = pb->mtime_nsec;
		v.verified_unix = pb->has_verified_unix ? pb->verified_unix : 0;
		*ret = v;
	}
	kvmotion__weights_verified__free_unpacked(pb, NULL);
	return r;
}

/* --- store config --- */

int km_store_config_encode(const struct km_chunker_params *p, void **ret, size_t *ret_size)
{
	Kvmotion__StoreConfig pb = KVMOTION__STORE_CONFIG__INIT;
	Kvmotion__ChunkerParams chunker;

	pb.major = KM_FORMAT_MAJOR;
	pb.minor = KM_FORMAT_MINOR;
	chunker_to_pb(p, &chunker);
	pb.chunker = &chunker;
	return record_encode(KM_MAGIC_STORE, &pb.base, ret, ret_size);
}

int km_store_config_decode(const void *p, size_t n, struct km_chunker_params *ret,
			   struct km_error *err)
{
	const uint8_t *rec;
	size_t len;
	Kvmotion__StoreConfig *pb;
	int r;

	r = record_locate(p, n, KM_MAGIC_STORE, "store config", &rec, &len, err);
	if (r < 0)
		return r;
	pb = kvmotion__store_config__unpack(NULL, len, rec);
	if (!pb) {
		km_error_set(err, "store config is malformed (protobuf decoding failed)");
		return -EBADMSG;
	}
	r = check_version(pb->major, pb->minor, "store config", err);
	if (r == 0)
		r = chunker_from_pb(pb->chunker, ret, "store config", err);
	kvmotion__store_config__free_unpacked(pb, NULL);
	return r;
}

/* --- whole files --- */

int km_read_file_at(int dirfd, const char *name, size_t max, void **ret, size_t *ret_size)
{
	_cleanup_close_ int fd = -1;
	_cleanup_free_ void *buf = NULL;
	struct stat st;
	ssize_t k;

	fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EBADMSG;
	if ((uint64_t)st.st_size > max)
		return -EFBIG;
	buf = malloc(st.st_size ? (size_t)st.st_size : 1);
	if (!buf)
		return -ENOMEM;
	k = km_read_full(fd, buf, (size_t)st.st_size);
	if (k < 0)
		return (int)k;
	*ret = KM_TAKE_PTR(buf);
	*ret_size = (size_t)k;
	return 0;
}

int km_write_file_atomic_at(int dirfd, const char *name, const void *p, size_t n, bool sync)
{
	char tmp[300];
	_cleanup_close_ int fd = -1;
	uint64_t nonce;
	int r;

	/* A random name: concurrent writers of the same file never collide. */
	if (getrandom(&nonce, sizeof(nonce), 0) != sizeof(nonce))
		return -EIO;
	snprintf(tmp, sizeof(tmp), ".%.200s.%016llx.tmp", name, (unsigned long long)nonce);
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	r = km_write_full(fd, p, n);
	if (r == 0 && sync && fsync(fd) < 0)
		r = -errno;
	if (r == 0 && renameat(dirfd, tmp, dirfd, name) < 0)
		r = -errno;
	if (r < 0)
		unlinkat(dirfd, tmp, 0);
	else if (sync)
		(void)fsync(dirfd);
	return r;
}

/* --- the framing, for other modules' files (format_internal.h) --- */

int km_record_encode(const char *magic, const ProtobufCMessage *msg, void **ret,
		     size_t *ret_size)
{
	return record_encode(magic, msg, ret, ret_size);
}

int km_record_locate(const void *p, size_t n, const char *magic, const char *what,
		     const uint8_t **ret, size_t *ret_len, struct km_error *err)
{
	return record_locate(p, n, magic, what, ret, ret_len, err);
}
