/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Incremental images by content: the page compare, the pagemap rewrite, the snapshot id. */
#include <check.h>

#include "km-check.h"
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "criu-pagemap.pb-c.h"
#include "criuimg.h"
#include "format.h"
#include "incr.h"
#include "pagesrv.h"

#define PAGE 4096u
#define P    KM_CRIU_PE_PRESENT
#define PL   (KM_CRIU_PE_PRESENT | KM_CRIU_PE_LAZY)

struct fixture {
	char dir[64];
	int img, parent;
};

static void fixture_setup(struct fixture *f)
{
	char path[128];

	strcpy(f->dir, "/tmp/km-test-incr-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->dir));
	snprintf(path, sizeof(path), "%s/img", f->dir);
	ck_assert_int_eq(mkdir(path, 0700), 0);
	f->img = open(path, O_RDONLY | O_DIRECTORY);
	snprintf(path, sizeof(path), "%s/parent", f->dir);
	ck_assert_int_eq(mkdir(path, 0700), 0);
	f->parent = open(path, O_RDONLY | O_DIRECTORY);
	ck_assert_int_ge(f->img, 0);
	ck_assert_int_ge(f->parent, 0);
}

static int rm_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

static void fixture_teardown(struct fixture *f)
{
	close(f->img);
	close(f->parent);
	ck_assert_int_eq(nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS), 0);
}

/* The content of the page at vaddr in generation gen: distinct per page and generation. */
static void page_bytes(uint64_t vaddr, unsigned gen, uint8_t *buf)
{
	uint64_t x = vaddr * 0x9e3779b97f4a7c15ull + gen * 0x632be59bd9b4e019ull + 1;

	for (unsigned i = 0; i < PAGE; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (uint8_t)x;
	}
}

/*
 * Writes pagemap-ID.img and pages-PAGES_ID.img: entries e[0..n), each
 * present page's content page_bytes(vaddr, gen(vaddr)).
 */
static void write_dump(int dirfd, const char *id, uint32_t pages_id, const struct km_criu_pme *e,
		       size_t n, unsigned (*gen)(uint64_t vaddr))
{
	struct km_criu_pagemap pm = { .pages_id = pages_id, .n = n, .e = (struct km_criu_pme *)e };
	char name[64];
	void *img;
	size_t size;
	uint8_t buf[PAGE];
	int fd;

	ck_assert_int_eq(km_criu_pagemap_encode(&pm, &img, &size), 0);
	snprintf(name, sizeof(name), "pagemap-%s.img", id);
	ck_assert_int_eq(km_write_file_atomic_at(dirfd, name, img, size, false), 0);
	free(img);
	snprintf(name, sizeof(name), "pages-%u.img", pages_id);
	fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	for (size_t i = 0; i < n; i++)
		for (uint64_t p = 0; (e[i].flags & P) && p < e[i].nr_pages; p++) {
			uint64_t v = e[i].vaddr + p * PAGE;

			page_bytes(v, gen(v), buf);
			ck_assert_int_eq(km_write_full(fd, buf, PAGE), 0);
		}
	close(fd);
}

/*
 * What CRIU's restore reads for the page at vaddr: from this image if
 * present, from the parent if PE_PARENT (recursively once), else nothing
 * (returns false).
 */
static bool read_page(int dirfd, int pdirfd, const char *pm_name, uint64_t vaddr, uint8_t *buf)
{
	struct km_criu_pagemap pm;
	uint64_t page = 0;
	char pages[64];
	bool found = false;

	ck_assert_int_eq(km_criu_pagemap_read(dirfd, pm_name, &pm, NULL), 0);
	for (size_t i = 0; i < pm.n && !found; i++) {
		const struct km_criu_pme *e = &pm.e[i];

		if (vaddr >= e->vaddr && vaddr < e->vaddr + e->nr_pages * PAGE) {
			if (e->flags & KM_CRIU_PE_PARENT) {
				ck_assert_int_ge(pdirfd, 0);
				found = read_page(pdirfd, -1, pm_name, vaddr, buf);
				ck_assert(found);
			} else if (e->flags & P) {
				int fd;

				snprintf(pages, sizeof(pages), "pages-%u.img", pm.pages_id);
				fd = openat(dirfd, pages, O_RDONLY);
				ck_assert_int_ge(fd, 0);
				page += (vaddr - e->vaddr) / PAGE;
				ck_assert_int_eq(km_pread_full(fd, buf, PAGE, (off_t)(page * PAGE)),
						 PAGE);
				close(fd);
				found = true;
			}
			break;
		}
		if (e->flags & P)
			page += e->nr_pages;
	}
	km_criu_pagemap_clear(&pm);
	return found;
}

static unsigned gen_parent(uint64_t v)
{
	return 0;
}

/* The dump: 0x12000 and the pages the parent lacks changed. */
static unsigned gen_dump(uint64_t v)
{
	return v == 0x12000 ? 1 : 0;
}

static const struct km_criu_pme parent_pm[] = {
	{ 0x10000, 4, PL },
	{ 0x20000, 2, P },
	{ 0x30000, 1, 0 }, /* a hole */
};

static const struct km_criu_pme dump_pm[] = {
	{ 0x10000, 4, PL }, /* page 2 changed */
	{ 0x20000, 3, P },  /* the third page is new */
	{ 0x30000, 1, P },  /* a hole in the parent */
	{ 0x40000, 1, P },  /* beyond the parent */
	{ 0x50000, 2, 0 },  /* zero pages stay as they are */
};

/*
 * The incremental image of dump_pm over parent_pm in f: pagemap-7.img as
 * want, and every page reads back as the dump had it, through the parent
 * where marked.
 */
static void assert_incremental_7(struct fixture *f)
{
	static const struct km_criu_pme want[] = {
		{ 0x10000, 2, KM_CRIU_PE_PARENT }, { 0x12000, 1, PL },
		{ 0x13000, 1, KM_CRIU_PE_PARENT }, { 0x20000, 2, KM_CRIU_PE_PARENT },
		{ 0x22000, 1, P },		   { 0x30000, 1, P },
		{ 0x40000, 1, P },		   { 0x50000, 2, 0 },
	};
	struct km_error err = { { 0 } };
	struct km_criu_pagemap pm;

	ck_assert_int_eq(km_criu_pagemap_read(f->img, "pagemap-7.img", &pm, &err), 0);
	ck_assert_uint_eq(pm.pages_id, 1);
	ck_assert_uint_eq(pm.n, sizeof(want) / sizeof(want[0]));
	for (size_t i = 0; i < pm.n; i++) {
		ck_assert_uint_eq(pm.e[i].vaddr, want[i].vaddr);
		ck_assert_uint_eq(pm.e[i].nr_pages, want[i].nr_pages);
		ck_assert_uint_eq(pm.e[i].flags, want[i].flags);
	}
	km_criu_pagemap_clear(&pm);
	for (size_t i = 0; i < 4; i++)
		for (uint64_t p = 0; (dump_pm[i].flags & P) && p < dump_pm[i].nr_pages; p++) {
			uint64_t v = dump_pm[i].vaddr + p * PAGE;
			uint8_t got[PAGE], exp[PAGE];

			ck_assert(read_page(f->img, f->parent, "pagemap-7.img", v, got));
			page_bytes(v, gen_dump(v), exp);
			ck_assert_msg(memcmp(got, exp, PAGE) == 0, "page %llx differs",
				      (unsigned long long)v);
		}
}

START_TEST(test_incr_rewrite_marks_equal_pages_parent)
{
	struct fixture f;
	struct km_incr_stats st;
	struct km_error err = { { 0 } };
	struct stat sb;

	fixture_setup(&f);
	write_dump(f.parent, "7", 3, parent_pm, 3, gen_parent);
	write_dump(f.img, "7", 1, dump_pm, 5, gen_dump);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, NULL, &st, &err), 0);
	ck_assert_uint_eq(st.pagemaps, 1);
	ck_assert_uint_eq(st.pages, 9);
	ck_assert_uint_eq(st.pages_parent, 5);
	ck_assert_uint_eq(st.pages_present, 4);
	ck_assert_uint_eq(st.bytes_before, 9 * PAGE);
	ck_assert_uint_eq(st.bytes_after, 4 * PAGE);

	ck_assert_int_eq(fstatat(f.img, "pages-1.img", &sb, 0), 0);
	ck_assert_int_eq(sb.st_size, 4 * PAGE);
	/* no temporary file left */
	ck_assert_int_ne(fstatat(f.img, ".pages-1.img.incr", &sb, 0), 0);

	assert_incremental_7(&f);
	fixture_teardown(&f);
}
END_TEST

static unsigned gen_all_changed(uint64_t v)
{
	return 5;
}

START_TEST(test_incr_rewrite_nothing_equal_keeps_all)
{
	struct fixture f;
	struct km_incr_stats st;
	struct km_error err = { { 0 } };
	struct km_criu_pagemap pm;

	fixture_setup(&f);
	write_dump(f.parent, "7", 3, parent_pm, 3, gen_parent);
	write_dump(f.img, "7", 1, dump_pm, 5, gen_all_changed);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, NULL, &st, &err), 0);
	ck_assert_uint_eq(st.pages_parent, 0);
	ck_assert_uint_eq(st.pages_present, 9);
	ck_assert_int_eq(km_criu_pagemap_read(f.img, "pagemap-7.img", &pm, &err), 0);
	for (size_t i = 0; i < pm.n; i++)
		ck_assert_uint_eq(pm.e[i].flags & KM_CRIU_PE_PARENT, 0);
	km_criu_pagemap_clear(&pm);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_incr_rewrite_task_without_parent_pagemap_kept)
{
	struct fixture f;
	struct km_incr_stats st;
	struct km_error err = { { 0 } };
	struct stat sb;

	fixture_setup(&f);
	write_dump(f.parent, "7", 3, parent_pm, 3, gen_parent);
	write_dump(f.img, "8", 1, dump_pm, 5, gen_dump);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, NULL, &st, &err), 0);
	ck_assert_uint_eq(st.pagemaps, 0);
	ck_assert_uint_eq(st.pagemaps_kept, 1);
	ck_assert_uint_eq(st.pages_present, 9);
	ck_assert_int_eq(fstatat(f.img, "pages-1.img", &sb, 0), 0);
	ck_assert_int_eq(sb.st_size, 9 * PAGE);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_incr_rewrite_refuses_incremental_and_bad_sizes)
{
	struct fixture f;
	struct km_error err = { { 0 } };
	static const struct km_criu_pme incr[] = { { 0x10000, 1, KM_CRIU_PE_PARENT } };
	int fd;

	fixture_setup(&f);
	write_dump(f.parent, "7", 3, parent_pm, 3, gen_parent);
	write_dump(f.img, "7", 1, incr, 1, gen_dump);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, NULL, NULL, &err), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err.msg, "parent"));

	/* a pages file one page short */
	write_dump(f.img, "7", 1, dump_pm, 5, gen_dump);
	fd = openat(f.img, "pages-1.img", O_WRONLY);
	ck_assert_int_eq(ftruncate(fd, 8 * PAGE), 0);
	close(fd);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, NULL, NULL, &err), -EBADMSG);

	/* the parent's pages file short: refused, the image left as it was */
	write_dump(f.img, "7", 1, dump_pm, 5, gen_dump);
	fd = openat(f.parent, "pages-3.img", O_WRONLY);
	ck_assert_int_eq(ftruncate(fd, 5 * PAGE), 0);
	close(fd);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, NULL, NULL, &err), -EBADMSG);
	{
		struct stat sb;

		ck_assert_int_eq(fstatat(f.img, "pages-1.img", &sb, 0), 0);
		ck_assert_int_eq(sb.st_size, 9 * PAGE);
	}
	fixture_teardown(&f);
}
END_TEST

/* Many pages over several compare jobs and threads: counts match a serial recount. */
static unsigned gen_sparse(uint64_t v)
{
	return (v / PAGE) % 7 == 3 ? 2 : 0;
}

START_TEST(test_incr_rewrite_many_pages_threads)
{
	struct fixture f;
	struct km_incr_stats st;
	struct km_error err = { { 0 } };
	struct km_incr_opts o = { .threads = 3 };
	const uint64_t n = 40000; /* three compare slices */
	struct km_criu_pme pe = { 0x100000000ull, n, P };
	uint64_t changed = 0;

	for (uint64_t p = 0; p < n; p++)
		changed += gen_sparse(pe.vaddr + p * PAGE) != 0;
	fixture_setup(&f);
	write_dump(f.parent, "1", 2, &pe, 1, gen_parent);
	write_dump(f.img, "1", 1, &pe, 1, gen_sparse);
	ck_assert_int_eq(km_incr_rewrite(f.img, f.parent, &o, &st, &err), 0);
	ck_assert_uint_eq(st.pages, n);
	ck_assert_uint_eq(st.pages_present, changed);
	ck_assert_uint_eq(st.pages_parent, n - changed);
	for (uint64_t p = 0; p < n; p += 997) {
		uint8_t got[PAGE], exp[PAGE];
		uint64_t v = pe.vaddr + p * PAGE;

		ck_assert(read_page(f.img, f.parent, "pagemap-1.img", v, got));
		page_bytes(v, gen_sparse(v), exp);
		ck_assert(memcmp(got, exp, PAGE) == 0);
	}
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_incr_snapshot_id_follows_content)
{
	struct fixture f;
	struct km_error err = { { 0 } };
	struct km_hash a, b, c;
	uint8_t byte = 0x5a;
	int fd;

	fixture_setup(&f);
	ck_assert_int_eq(km_incr_snapshot_id(f.img, 0, &a, &err), -ENOENT);
	write_dump(f.img, "7", 1, dump_pm, 5, gen_dump);
	write_dump(f.parent, "7", 1, dump_pm, 5, gen_dump);
	/* other files do not count */
	ck_assert_int_eq(km_write_file_atomic_at(f.img, "core-7.img", "x", 1, false), 0);
	ck_assert_int_eq(km_incr_snapshot_id(f.img, 0, &a, &err), 0);
	ck_assert_int_eq(km_incr_snapshot_id(f.parent, 1, &b, &err), 0);
	ck_assert(km_hash_equal(&a, &b));
	fd = openat(f.parent, "pages-1.img", O_WRONLY);
	ck_assert_int_eq(km_pwrite_full(fd, &byte, 1, 5 * PAGE + 17), 0);
	close(fd);
	ck_assert_int_eq(km_incr_snapshot_id(f.parent, 2, &c, &err), 0);
	ck_assert(!km_hash_equal(&a, &c));
	fixture_teardown(&f);
}
END_TEST

/* A newer CRIU's page count (field 5) wins over field 2. */
START_TEST(test_criuimg_pagemap_reads_field_5)
{
	struct fixture f;
	struct km_criu_pagemap pm;
	Kvmotion__Criu__PagemapHead h = KVMOTION__CRIU__PAGEMAP_HEAD__INIT;
	Kvmotion__Criu__PagemapEntry e = KVMOTION__CRIU__PAGEMAP_ENTRY__INIT;
	uint8_t buf[128];
	uint32_t w;
	size_t off = 8, len;

	fixture_setup(&f);
	w = htole32(KM_CRIU_IMG_COMMON_MAGIC);
	memcpy(buf, &w, 4);
	w = htole32(KM_CRIU_PAGEMAP_MAGIC);
	memcpy(buf + 4, &w, 4);
	h.pages_id = 9;
	len = kvmotion__criu__pagemap_head__pack(&h, buf + off + 4);
	w = htole32((uint32_t)len);
	memcpy(buf + off, &w, 4);
	off += 4 + len;
	e.vaddr = 0x1000;
	e.nr_pages = 0;
	e.has_nr_pages_u64 = true;
	e.nr_pages_u64 = 12;
	e.has_flags = true;
	e.flags = P;
	len = kvmotion__criu__pagemap_entry__pack(&e, buf + off + 4);
	w = htole32((uint32_t)len);
	memcpy(buf + off, &w, 4);
	off += 4 + len;
	ck_assert_int_eq(km_write_file_atomic_at(f.img, "pagemap-1.img", buf, off, false), 0);
	ck_assert_int_eq(km_criu_pagemap_read(f.img, "pagemap-1.img", &pm, NULL), 0);
	ck_assert_uint_eq(pm.pages_id, 9);
	ck_assert_uint_eq(pm.n, 1);
	ck_assert_uint_eq(pm.e[0].nr_pages, 12);
	km_criu_pagemap_clear(&pm);
	ck_assert_int_eq(km_criu_pagemap_read(f.img, "pagemap-2.img", &pm, NULL), -ENOENT);
	buf[0] ^= 1;
	ck_assert_int_eq(km_write_file_atomic_at(f.img, "pagemap-1.img", buf, off, false), 0);
	ck_assert_int_eq(km_criu_pagemap_read(f.img, "pagemap-1.img", &pm, NULL), -EBADMSG);
	fixture_teardown(&f);
}
END_TEST

/* --- the stop's page server, driven as criu dump --page-server drives it --- */

struct psi {
	uint32_t cmd, nr_pages;
	uint64_t vaddr, dst_id;
};

static int client_send(int sk, const void *buf, size_t n)
{
	return send(sk, buf, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static int client_cmd(int sk, uint32_t cmd, uint32_t flags, uint64_t vaddr, uint32_t nr,
		      uint64_t dst_id)
{
	struct psi pi = { .cmd = flags << 16 | cmd, .nr_pages = nr, .vaddr = vaddr, .dst_id = dst_id };

	return client_send(sk, &pi, sizeof(pi));
}

/* OPEN2 of pagemap-ID (type 1: task, 2: shmem), then the entries as CRIU sends them. */
static int client_pagemap(int sk, uint64_t id, unsigned type, const struct km_criu_pme *e,
			  size_t n, unsigned (*gen)(uint64_t vaddr))
{
	uint64_t dst = id << 8 | type;
	uint8_t buf[PAGE];
	char has_parent = 1;

	if (client_cmd(sk, 4, 0, 0, 0, dst) || recv(sk, &has_parent, 1, MSG_WAITALL) != 1)
		return -1;
	ck_assert_int_eq(has_parent, 0);
	for (size_t i = 0; i < n; i++) {
		if (client_cmd(sk, 6, e[i].flags, e[i].vaddr, (uint32_t)e[i].nr_pages, dst))
			return -1;
		for (uint64_t p = 0; (e[i].flags & P) && p < e[i].nr_pages; p++) {
			page_bytes(e[i].vaddr + p * PAGE, gen(e[i].vaddr + p * PAGE), buf);
			if (client_send(sk, buf, PAGE))
				return -1;
		}
	}
	return 0;
}

static const struct km_criu_pme shmem_pm[] = { { 0, 2, P } };

START_TEST(test_pagesrv_writes_incremental_image)
{
	struct fixture f;
	struct km_pagesrv *ps;
	struct km_incr_stats st;
	struct km_error err = { { 0 } };
	struct km_criu_pagemap pm;
	int sv[2], status = -1;
	uint8_t got[PAGE], want_page[PAGE];

	fixture_setup(&f);
	write_dump(f.parent, "7", 3, parent_pm, 3, gen_parent);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, f.parent, NULL, &ps, &err), 0);
	ck_assert_int_eq(client_pagemap(sv[1], 7, 1, dump_pm, 5, gen_dump), 0);
	ck_assert_int_eq(client_pagemap(sv[1], 9, 2, shmem_pm, 1, gen_dump), 0);
	ck_assert_int_eq(client_cmd(sv[1], 0x1024, 0, 0, 0, 0), 0);
	ck_assert_int_eq(recv(sv[1], &status, 4, MSG_WAITALL), 4);
	ck_assert_int_eq(status, 0);
	ck_assert_int_eq(km_pagesrv_wait(ps, &st, &err), 0);
	close(sv[1]);

	/* the same image km_incr_rewrite makes of the complete dump, plus the shmem kept */
	ck_assert_uint_eq(st.pagemaps, 1);
	ck_assert_uint_eq(st.pagemaps_kept, 1);
	ck_assert_uint_eq(st.pages, 11);
	ck_assert_uint_eq(st.pages_parent, 5);
	ck_assert_uint_eq(st.pages_present, 6);
	ck_assert_uint_eq(st.bytes_after, 6 * PAGE);
	assert_incremental_7(&f);
	ck_assert_int_eq(km_criu_pagemap_read(f.img, "pagemap-shmem-9.img", &pm, &err), 0);
	ck_assert_uint_eq(pm.pages_id, 2);
	ck_assert_uint_eq(pm.n, 1);
	ck_assert_uint_eq(pm.e[0].flags, P);
	km_criu_pagemap_clear(&pm);
	ck_assert(read_page(f.img, -1, "pagemap-shmem-9.img", PAGE, got));
	page_bytes(PAGE, 0, want_page);
	ck_assert_mem_eq(got, want_page, PAGE);
	fixture_teardown(&f);
}
END_TEST

START_TEST(test_pagesrv_without_parent_keeps_all)
{
	struct fixture f;
	struct km_pagesrv *ps;
	struct km_incr_stats st;
	struct km_error err = { { 0 } };
	int sv[2], status = -1;

	fixture_setup(&f);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, -1, NULL, &ps, &err), 0);
	ck_assert_int_eq(client_pagemap(sv[1], 7, 1, dump_pm, 5, gen_dump), 0);
	ck_assert_int_eq(client_cmd(sv[1], 0x1023, 0, 0, 0, 0), 0);
	ck_assert_int_eq(recv(sv[1], &status, 4, MSG_WAITALL), 4);
	ck_assert_int_eq(km_pagesrv_wait(ps, &st, &err), 0);
	close(sv[1]);
	ck_assert_uint_eq(st.pagemaps_kept, 1);
	ck_assert_uint_eq(st.pages_parent, 0);
	ck_assert_uint_eq(st.pages_present, 9);
	fixture_teardown(&f);
}
END_TEST

/* The stream's end before CRIU's close, a command of no dump, a failure: errors, the socket shut. */
START_TEST(test_pagesrv_refuses_cut_and_foreign_streams)
{
	struct fixture f;
	struct km_pagesrv *ps;
	struct km_pagesrv_opts o = { .test_fail_after_pages = 2 };
	struct km_error err = { { 0 } };
	uint8_t page[PAGE] = { 0 };
	char c;
	int sv[2];

	fixture_setup(&f);
	/* cut in the middle of a run of pages */
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, f.parent, NULL, &ps, &err), 0);
	ck_assert_int_eq(client_cmd(sv[1], 4, 0, 0, 0, 7 << 8 | 1), 0);
	ck_assert_int_eq(recv(sv[1], &c, 1, MSG_WAITALL), 1);
	ck_assert_int_eq(client_cmd(sv[1], 6, P, 0x10000, 4, 7 << 8 | 1), 0);
	ck_assert_int_eq(client_send(sv[1], page, PAGE), 0);
	close(sv[1]);
	ck_assert_int_eq(km_pagesrv_wait(ps, NULL, &err), -EPIPE);
	ck_assert_ptr_nonnull(strstr(err.msg, "criu closed the socket"));

	/* PS_IOV_GET belongs to lazy pages, not to a dump */
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	(void)unlinkat(f.img, "pages-1.img", 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, f.parent, NULL, &ps, &err), 0);
	ck_assert_int_eq(client_cmd(sv[1], 7, 0, 0x10000, 1, 7 << 8 | 1), 0);
	ck_assert_int_eq(km_pagesrv_wait(ps, NULL, &err), -EPROTO);
	ck_assert_ptr_nonnull(strstr(err.msg, "command 7"));
	ck_assert_int_eq(recv(sv[1], &c, 1, 0), 0); /* shut: CRIU's next send fails */
	close(sv[1]);

	/* an unknown kind of pagemap */
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, f.parent, NULL, &ps, &err), 0);
	ck_assert_int_eq(client_cmd(sv[1], 4, 0, 0, 0, 7 << 8 | 99), 0);
	ck_assert_int_eq(km_pagesrv_wait(ps, NULL, &err), -EPROTO);
	ck_assert_ptr_nonnull(strstr(err.msg, "unknown kind"));
	close(sv[1]);

	/* the same pagemap opened twice */
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	(void)unlinkat(f.img, "pages-1.img", 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, f.parent, NULL, &ps, &err), 0);
	ck_assert_int_eq(client_pagemap(sv[1], 7, 1, dump_pm, 5, gen_dump), 0);
	ck_assert_int_eq(client_cmd(sv[1], 4, 0, 0, 0, 7 << 8 | 1), 0);
	ck_assert_int_eq(km_pagesrv_wait(ps, NULL, &err), -EEXIST);
	ck_assert_ptr_nonnull(strstr(err.msg, "pagemap-7.img twice"));
	close(sv[1]);
	(void)unlinkat(f.img, "pagemap-7.img", 0);

	/* a failure of ours while CRIU sends */
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	(void)unlinkat(f.img, "pages-1.img", 0);
	ck_assert_int_eq(km_pagesrv_start(sv[0], f.img, f.parent, &o, &ps, &err), 0);
	ck_assert_int_eq(client_cmd(sv[1], 4, 0, 0, 0, 7 << 8 | 1), 0);
	ck_assert_int_eq(recv(sv[1], &c, 1, MSG_WAITALL), 1);
	ck_assert_int_eq(client_cmd(sv[1], 6, P, 0x10000, 2, 7 << 8 | 1), 0);
	ck_assert_int_eq(client_send(sv[1], page, PAGE), 0);
	ck_assert_int_eq(client_send(sv[1], page, PAGE), 0);
	ck_assert_int_eq(km_pagesrv_wait(ps, NULL, &err), -EIO);
	ck_assert_ptr_nonnull(strstr(err.msg, "failure injected"));
	close(sv[1]);
	fixture_teardown(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("incr");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_incr_rewrite_marks_equal_pages_parent);
	tcase_add_test(tc, test_incr_rewrite_nothing_equal_keeps_all);
	tcase_add_test(tc, test_incr_rewrite_task_without_parent_pagemap_kept);
	tcase_add_test(tc, test_incr_rewrite_refuses_incremental_and_bad_sizes);
	tcase_add_test(tc, test_incr_rewrite_many_pages_threads);
	tcase_add_test(tc, test_incr_snapshot_id_follows_content);
	tcase_add_test(tc, test_criuimg_pagemap_reads_field_5);
	tcase_add_test(tc, test_pagesrv_writes_incremental_image);
	tcase_add_test(tc, test_pagesrv_without_parent_keeps_all);
	tcase_add_test(tc, test_pagesrv_refuses_cut_and_foreign_streams);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
