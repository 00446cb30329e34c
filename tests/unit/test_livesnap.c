/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * livesnap: the live snapshot of a child whose memory is known. The
 * snapshot holds exactly the pages CRIU would dump, with their bytes:
 * written anonymous pages (also behind PROT_NONE), the COW'd pages of a
 * private file mapping and nothing else of it, no page of a shared mapping,
 * no never-touched or only-read (zero page) anonymous page; one pagemap
 * per process of the tree (a thread adds none), pages files numbered in
 * CRIU's depth-first order; the same through /proc/PID/pagemap; a running
 * child can be snapshotted while it writes; a missing pid is -ESRCH.
 */
#include <check.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "km-check.h"

#include "criuimg.h"
#include "format.h"
#include "livesnap.h"

#define PG 4096u
#define ANON_PAGES 64  /* 0-31 written, 32-47 untouched, 48-63 only read */
#define FILE_PAGES 16  /* mapped privately: 3 and 7 written */
#define SHARED_PAGES 8 /* shared anonymous and shared file: written */
#define NONE_PAGES 4   /* written, then PROT_NONE */
#define GRAND_PAGES 8  /* the grandchild's own */

/* What the child tells the test: its mappings' addresses. */
struct layout {
	uint64_t anon, file, shared_anon, shared_file, none, grand;
	pid_t grandchild;
};

static uint8_t anon_byte(unsigned i)
{
	return (uint8_t)(i * 7 + 1);
}

static void fill_page(uint8_t *p, uint8_t b, uint64_t tag)
{
	memset(p, b, PG);
	memcpy(p, &tag, sizeof(tag));
}

static void *sleeper(void *arg)
{
	for (;;)
		pause();
	return arg;
}

struct child {
	pid_t pid;
	struct layout l;
	char path[64];
};

/*
 * Forks the child (with a thread and a grandchild), waits for its layout.
 * busy: the child keeps rewriting its anonymous pages instead of sleeping.
 */
static void child_start(struct child *c, bool busy)
{
	int pfd[2];
	int fd;

	strcpy(c->path, "/tmp/km-test-livesnap-XXXXXX");
	fd = mkstemp(c->path);
	ck_assert_int_ge(fd, 0);
	{
		static uint8_t buf[FILE_PAGES * PG];

		memset(buf, 0xab, sizeof(buf));
		ck_assert_int_eq(write(fd, buf, sizeof(buf)), (ssize_t)sizeof(buf));
	}
	ck_assert_int_eq(pipe(pfd), 0);
	c->pid = fork();
	ck_assert_int_ge(c->pid, 0);
	if (c->pid == 0) {
		struct layout l = { 0 };
		volatile uint8_t sum = 0;
		uint8_t *anon, *file, *sa, *sf, *none;
		pthread_t t;
		int gpfd[2];

		close(pfd[0]);
		anon = mmap(NULL, ANON_PAGES * PG, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		file = mmap(NULL, FILE_PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		sa = mmap(NULL, SHARED_PAGES * PG, PROT_READ | PROT_WRITE,
			  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		sf = mmap(NULL, SHARED_PAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		none = mmap(NULL, NONE_PAGES * PG, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (anon == MAP_FAILED || file == MAP_FAILED || sa == MAP_FAILED ||
		    sf == MAP_FAILED || none == MAP_FAILED)
			_exit(2);
		for (unsigned i = 0; i < 32; i++)
			fill_page(anon + i * PG, anon_byte(i), i);
		for (unsigned i = 48; i < ANON_PAGES; i++)
			sum += anon[i * PG];
		for (unsigned i = 0; i < FILE_PAGES; i++)
			sum += file[i * PG]; /* mapped from the page cache, not copied */
		fill_page(file + 3 * PG, 0x33, 3);
		fill_page(file + 7 * PG, 0x77, 7);
		memset(sa, 0x5a, SHARED_PAGES * PG);
		memset(sf, 0x5b, SHARED_PAGES * PG);
		for (unsigned i = 0; i < NONE_PAGES; i++)
			fill_page(none + i * PG, 0xc0, 100 + i);
		mprotect(none, NONE_PAGES * PG, PROT_NONE);
		if (pthread_create(&t, NULL, sleeper, NULL) != 0 || pipe(gpfd) != 0)
			_exit(3);
		l.grandchild = fork();
		if (l.grandchild == 0) {
			uint8_t *g = mmap(NULL, GRAND_PAGES * PG, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			uint64_t a = (uintptr_t)g;

			for (unsigned i = 0; i < GRAND_PAGES; i++)
				fill_page(g + i * PG, 0xe0, 200 + i);
			if (write(gpfd[1], &a, sizeof(a)) != sizeof(a))
				_exit(4);
			for (;;)
				pause();
		}
		if (read(gpfd[0], &l.grand, sizeof(l.grand)) != sizeof(l.grand))
			_exit(5);
		l.anon = (uintptr_t)anon;
		l.file = (uintptr_t)file;
		l.shared_anon = (uintptr_t)sa;
		l.shared_file = (uintptr_t)sf;
		l.none = (uintptr_t)none;
		if (write(pfd[1], &l, sizeof(l)) != sizeof(l))
			_exit(6);
		(void)sum;
		for (unsigned k = 0; busy; k++)
			for (unsigned i = 0; i < 32; i++)
				anon[i * PG + 100] = (uint8_t)k;
		for (;;)
			pause();
	}
	close(fd);
	close(pfd[1]);
	ck_assert_int_eq(read(pfd[0], &c->l, sizeof(c->l)), (ssize_t)sizeof(c->l));
	close(pfd[0]);
}

static void child_stop(struct child *c)
{
	kill(c->l.grandchild, SIGKILL);
	kill(c->pid, SIGKILL);
	waitpid(c->pid, NULL, 0);
	unlink(c->path);
}

/* One task's snapshot: its entries and its pages file. */
struct snap {
	uint32_t pages_id;
	struct km_criu_pme *e;
	size_t n;
	uint8_t *data;
	size_t len;
};

static void snap_load(int dirfd, pid_t pid, struct snap *s)
{
	struct km_error err = { { 0 } };
	char name[64];
	size_t pages = 0;
	void *buf = NULL;

	snprintf(name, sizeof(name), "pagemap-%d.img", (int)pid);
	{
		struct km_criu_pagemap pm = { 0 };

		ck_assert_msg(km_criu_pagemap_read(dirfd, name, &pm, &err) == 0, "%s: %s", name,
			      err.msg);
		s->pages_id = pm.pages_id;
		s->e = pm.e;
		s->n = pm.n;
	}
	for (size_t i = 0; i < s->n; i++) {
		ck_assert(s->e[i].flags & KM_CRIU_PE_PRESENT);
		ck_assert_uint_eq(s->e[i].vaddr % PG, 0);
		if (i > 0)
			ck_assert_uint_ge(s->e[i].vaddr,
					  s->e[i - 1].vaddr + (uint64_t)s->e[i - 1].nr_pages * PG);
		pages += s->e[i].nr_pages;
	}
	snprintf(name, sizeof(name), "pages-%u.img", s->pages_id);
	ck_assert_int_eq(km_read_file_at(dirfd, name, 1u << 30, &buf, &s->len), 0);
	s->data = buf;
	ck_assert_uint_eq(s->len, pages * PG);
}

static void snap_free(struct snap *s)
{
	free(s->e);
	free(s->data);
}

/* The page at vaddr in the snapshot, NULL if it is not there. */
static const uint8_t *snap_page(const struct snap *s, uint64_t vaddr, uint32_t *ret_flags)
{
	size_t off = 0;

	for (size_t i = 0; i < s->n; i++) {
		uint64_t end = s->e[i].vaddr + (uint64_t)s->e[i].nr_pages * PG;

		if (vaddr >= s->e[i].vaddr && vaddr < end) {
			if (ret_flags)
				*ret_flags = s->e[i].flags;
			return s->data + off + (vaddr - s->e[i].vaddr);
		}
		off += (size_t)s->e[i].nr_pages * PG;
	}
	return NULL;
}

static void assert_page(const struct snap *s, uint64_t vaddr, uint8_t b, uint64_t tag)
{
	uint8_t want[PG];
	const uint8_t *p = snap_page(s, vaddr, NULL);

	ck_assert_msg(p != NULL, "page %#llx missing", (unsigned long long)vaddr);
	fill_page(want, b, tag);
	ck_assert_msg(memcmp(p, want, PG) == 0, "page %#llx has other bytes",
		      (unsigned long long)vaddr);
}

static int tmpdir(char *path)
{
	int fd;

	ck_assert_ptr_nonnull(mkdtemp(path));
	fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(fd, 0);
	return fd;
}

static void rmdir_all(int dirfd, const char *path)
{
	char **names = NULL;
	size_t n = 0;

	if (km_list_files_at(dirfd, NULL, &names, &n) == 0) {
		for (size_t i = 0; i < n; i++)
			unlinkat(dirfd, names[i], 0);
		km_free_names(names, n);
	}
	close(dirfd);
	rmdir(path);
}

static void check_snapshot(unsigned flags)
{
	struct km_live_snapshot_stats st;
	struct km_error err = { { 0 } };
	char path[] = "/tmp/km-test-livesnap-dir-XXXXXX";
	struct child c;
	struct snap s = { 0 }, g = { 0 };
	uint32_t pf = 0;
	char **names = NULL;
	size_t n_names = 0;
	int dfd = tmpdir(path);

	child_start(&c, false);
	ck_assert_msg(km_live_snapshot_flags(c.pid, dfd, flags, &st, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(st.tasks, 2);
	ck_assert(st.pagemap_scan == !(flags & KM_LIVE_SNAPSHOT_PAGEMAP) || !st.pagemap_scan);
	ck_assert_uint_eq(st.pages_unreadable, 0);
	/* two pagemaps and two pages files, nothing else */
	ck_assert_int_eq(km_list_files_at(dfd, NULL, &names, &n_names), 0);
	ck_assert_uint_eq(n_names, 4);
	km_free_names(names, n_names);

	snap_load(dfd, c.pid, &s);
	snap_load(dfd, c.l.grandchild, &g);
	ck_assert_uint_eq(s.pages_id, 1); /* the root first: CRIU's order */
	ck_assert_uint_eq(g.pages_id, 2);
	ck_assert_uint_eq(st.pages * PG, s.len + g.len);
	ck_assert_uint_eq(st.bytes, s.len + g.len);

	for (unsigned i = 0; i < 32; i++)
		assert_page(&s, c.l.anon + i * PG, anon_byte(i), i);
	ck_assert(snap_page(&s, c.l.anon, &pf));
	ck_assert_uint_eq(pf, KM_CRIU_PE_PRESENT | KM_CRIU_PE_LAZY);
	for (unsigned i = 32; i < 48; i++)
		ck_assert_msg(!snap_page(&s, c.l.anon + i * PG, NULL), "untouched page %u taken", i);
	/* only-read pages map the zero page: CRIU leaves them out when it sees pfns */
	if (st.pagemap_scan || geteuid() == 0)
		for (unsigned i = 48; i < ANON_PAGES; i++)
			ck_assert_msg(!snap_page(&s, c.l.anon + i * PG, NULL), "zero page %u taken",
				      i);
	for (unsigned i = 0; i < FILE_PAGES; i++)
		if (i != 3 && i != 7)
			ck_assert_msg(!snap_page(&s, c.l.file + i * PG, NULL),
				      "file page %u (not written) taken", i);
	assert_page(&s, c.l.file + 3 * PG, 0x33, 3);
	assert_page(&s, c.l.file + 7 * PG, 0x77, 7);
	ck_assert(snap_page(&s, c.l.file + 3 * PG, &pf));
	ck_assert_uint_eq(pf, KM_CRIU_PE_PRESENT); /* not anonymous: not lazy */
	for (unsigned i = 0; i < SHARED_PAGES; i++) {
		ck_assert(!snap_page(&s, c.l.shared_anon + i * PG, NULL));
		ck_assert(!snap_page(&s, c.l.shared_file + i * PG, NULL));
	}
	for (unsigned i = 0; i < NONE_PAGES; i++)
		assert_page(&s, c.l.none + i * PG, 0xc0, 100 + i);
	/* the grandchild: its own pages, and the parent's it shares copy-on-write */
	for (unsigned i = 0; i < GRAND_PAGES; i++)
		assert_page(&g, c.l.grand + i * PG, 0xe0, 200 + i);
	for (unsigned i = 0; i < 32; i++)
		assert_page(&g, c.l.anon + i * PG, anon_byte(i), i);

	snap_free(&s);
	snap_free(&g);
	child_stop(&c);
	rmdir_all(dfd, path);
}

START_TEST(test_livesnap_pages)
{
	check_snapshot(0);
}
END_TEST

/*
 * Not under ASan: its shadow is one mapping of terabytes with resident
 * pages, of which the /proc/PID/pagemap path (as CRIU's without
 * PAGEMAP_SCAN) reads 8 bytes per page: minutes.
 */
START_TEST(test_livesnap_pagemap_file)
{
#ifndef __SANITIZE_ADDRESS__
	check_snapshot(KM_LIVE_SNAPSHOT_PAGEMAP);
#endif
}
END_TEST

/* A child that writes all the while: the snapshot does not stop it or fail. */
START_TEST(test_livesnap_running)
{
	struct km_live_snapshot_stats st;
	struct km_error err = { { 0 } };
	char path[] = "/tmp/km-test-livesnap-dir-XXXXXX";
	struct child c;
	struct snap s = { 0 };
	int dfd = tmpdir(path);
	char state = 0;

	child_start(&c, true);
	ck_assert_msg(km_live_snapshot(c.pid, dfd, &st, &err) == 0, "%s", err.msg);
	snap_load(dfd, c.pid, &s);
	for (unsigned i = 0; i < 32; i++) {
		const uint8_t *p = snap_page(&s, c.l.anon + i * PG, NULL);
		uint64_t tag;

		/* byte 100 changes under the read; the rest is the pattern */
		ck_assert_ptr_nonnull(p);
		memcpy(&tag, p, sizeof(tag));
		ck_assert_uint_eq(tag, i);
		ck_assert_uint_eq(p[PG - 1], anon_byte(i));
	}
	{
		char spath[64], buf[512];
		FILE *f;

		snprintf(spath, sizeof(spath), "/proc/%d/stat", (int)c.pid);
		f = fopen(spath, "r");
		ck_assert_ptr_nonnull(f);
		ck_assert_ptr_nonnull(fgets(buf, sizeof(buf), f));
		fclose(f);
		state = strrchr(buf, ')')[2];
	}
	ck_assert_msg(state == 'R' || state == 'S', "child state %c", state);
	snap_free(&s);
	child_stop(&c);
	rmdir_all(dfd, path);
}
END_TEST

START_TEST(test_livesnap_no_such_pid)
{
	struct km_error err = { { 0 } };
	char path[] = "/tmp/km-test-livesnap-dir-XXXXXX";
	int dfd = tmpdir(path);
	pid_t pid = fork();

	ck_assert_int_ge(pid, 0);
	if (pid == 0)
		_exit(0);
	waitpid(pid, NULL, 0);
	ck_assert_int_eq(km_live_snapshot(pid, dfd, NULL, &err), -ESRCH);
	ck_assert(err.msg[0]);
	ck_assert_int_eq(km_live_snapshot(0, dfd, NULL, NULL), -ESRCH);
	rmdir_all(dfd, path);
}
END_TEST

/* The pagemap writer and reader agree, and the reader refuses garbage. */
START_TEST(test_livesnap_pagemap_roundtrip)
{
	struct km_criu_pme e[] = {
		{ 0x400000, 1, KM_CRIU_PE_PRESENT },
		{ 0x7fff00000000ull, 70000, KM_CRIU_PE_PRESENT | KM_CRIU_PE_LAZY },
	};
	struct km_criu_pagemap w = { .pages_id = 42, .n = 2, .e = e }, r = { 0 };
	char path[] = "/tmp/km-test-livesnap-dir-XXXXXX";
	int dfd = tmpdir(path);
	bool local = false;
	struct km_criu_pages_info info;

	ck_assert_int_eq(km_criu_pagemap_write(dfd, "pagemap-7.img", &w, NULL), 0);
	ck_assert_int_eq(km_criu_pagemap_read(dfd, "pagemap-7.img", &r, NULL), 0);
	ck_assert_uint_eq(r.pages_id, 42);
	ck_assert_uint_eq(r.n, 2);
	for (size_t i = 0; i < 2; i++) {
		ck_assert_uint_eq(r.e[i].vaddr, e[i].vaddr);
		ck_assert_uint_eq(r.e[i].nr_pages, e[i].nr_pages);
		ck_assert_uint_eq(r.e[i].flags, e[i].flags);
	}
	km_criu_pagemap_clear(&r);
	/* the existing checker reads it too: 70001 pages, no pages-42.img */
	ck_assert_int_eq(km_criu_pages_local(dfd, &local, &info, NULL), 0);
	ck_assert(!local);
	ck_assert_uint_eq(info.pages_present, 70001);
	ck_assert_int_eq(km_write_file_atomic_at(dfd, "pagemap-8.img", "garbage!", 8, false), 0);
	ck_assert_int_eq(km_criu_pagemap_read(dfd, "pagemap-8.img", &r, NULL), -EBADMSG);
	rmdir_all(dfd, path);
}
END_TEST

static Suite *livesnap_suite(void)
{
	Suite *s = suite_create("livesnap");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_livesnap_pages);
	tcase_add_test(tc, test_livesnap_pagemap_file);
	tcase_add_test(tc, test_livesnap_running);
	tcase_add_test(tc, test_livesnap_no_such_pid);
	tcase_add_test(tc, test_livesnap_pagemap_roundtrip);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return km_check_run(livesnap_suite());
}
