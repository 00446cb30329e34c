/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The live snapshot (livesnap.h). For each process of the tree: its
 * mappings from /proc/PID/smaps, the pages CRIU would take from
 * PAGEMAP_SCAN (or /proc/PID/pagemap before Linux 6.7), then the pages read
 * with process_vm_readv in batches of a few MiB into pages-N.img, then the
 * pagemap. Nothing is frozen: each call holds the target's mmap lock for
 * reading only, as long as one batch takes.
 */
#include "livesnap.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>

#include "criuimg.h"

#define MAX_TREE 4096
#define BATCH_BYTES (8u << 20)
#define BATCH_IOVS 1024 /* UIO_MAXIOV */
#define SCAN_REGIONS 4096

/* PAGEMAP_SCAN (Linux 6.7, <linux/fs.h>), spelled out: build hosts have older headers. */
struct km_page_region {
	uint64_t start, end, categories;
};
struct km_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define KM_PAGEMAP_SCAN _IOWR('f', 16, struct km_pm_scan_arg)
#define KM_PAGE_IS_FILE (1u << 2)
#define KM_PAGE_IS_PRESENT (1u << 3)
#define KM_PAGE_IS_SWAPPED (1u << 4)
#define KM_PAGE_IS_PFNZERO (1u << 5)
#define KM_PAGE_IS_GUARD (1u << 8) /* Linux 6.15 */

/* /proc/PID/pagemap entries (Documentation/admin-guide/mm/pagemap.rst) */
#define PME_PRESENT (1ull << 63)
#define PME_SWAP (1ull << 62)
#define PME_FILE (1ull << 61)
#define PME_GUARD (1ull << 58)
#define PME_PFN_MASK ((1ull << 55) - 1)

enum scan_mode { SCAN_UNKNOWN, SCAN_GUARD, SCAN_NOGUARD, SCAN_PAGEMAP };

struct ctx {
	size_t page;
	enum scan_mode mode;
	uint64_t zero_pfn; /* 0: unknown (pfns hidden), zero pages are then taken */
	bool zero_pfn_known;
	bool scan_ok; /* PAGEMAP_SCAN worked once */
	uint8_t *buf;	   /* BATCH_BYTES: pages, or pagemap entries while scanning */
	struct km_page_region *regs;
	struct km_live_snapshot_stats st;
	struct km_error *err;
};

struct vma {
	uint64_t start, end;
	bool all;	   /* [vdso], aio rings: every page, as CRIU does */
	bool lazy;	   /* private anonymous, not locked, not hugetlb */
	bool file_private; /* only the COW copies of its pages */
	bool readable;	   /* else read through /proc/PID/mem */
	bool empty;	   /* no page resident or swapped (smaps' Rss and Swap) */
};

struct range {
	uint64_t start, end;
	uint32_t flags;
	bool mem;
};

struct plan {
	struct range *r;
	size_t n, cap;
	bool all_stack; /* stack_pointer_aligned(): nothing lazy */
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- the tree ----------------------------------------------------------------- */

/*
 * The tree depth-first, pid first: CRIU's dump order, which numbers the
 * pages files.
 */
static int tree_preorder(pid_t pid, pid_t **ret, size_t *ret_n)
{
	_cleanup_free_ pid_t *out = calloc(MAX_TREE, sizeof(pid_t));
	_cleanup_free_ pid_t *stack = calloc(MAX_TREE, sizeof(pid_t));
	_cleanup_free_ pid_t *kids = calloc(MAX_TREE, sizeof(pid_t));
	size_t n = 0, top = 0;

	if (!out || !stack || !kids)
		return -ENOMEM;
	stack[top++] = pid;
	while (top > 0 && n < MAX_TREE) {
		pid_t p = stack[--top];
		size_t k;

		out[n++] = p;
		k = km_proc_children(p, kids, MAX_TREE);
		/* reversed on the stack, so the first child comes out first */
		while (k > 0 && top < MAX_TREE)
			stack[top++] = kids[--k];
	}
	*ret = KM_TAKE_PTR(out);
	*ret_n = n;
	return 0;
}

/* The task's pid in its own pid namespace (CRIU's vpid): NSpid's last field. */
static int task_vpid(pid_t pid, pid_t *ret)
{
	char path[64], line[512];
	_cleanup_fclose_ FILE *f = NULL;
	pid_t v = pid;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		char *p, *end;

		if (strncmp(line, "NSpid:", 6) != 0)
			continue;
		for (p = line + 6;; p = end) {
			long x = strtol(p, &end, 10);

			if (end == p)
				break;
			v = (pid_t)x;
		}
		break;
	}
	*ret = v;
	return 0;
}

/* --- which pages ------------------------------------------------------------- */

static bool has_vmflag(const char *flags, const char *f)
{
	size_t n = strlen(f);

	for (const char *p = flags; (p = strstr(p, f)); p += n)
		if ((p == flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\n' || !p[n]))
			return true;
	return false;
}

/*
 * Whether CRIU dumps pages of this mapping into the task's pagemap, and
 * how (criu/proc_parse.c handle_vma, criu/mem.c generate_vma_iovs).
 */
static bool classify(struct vma *v, const char *perms, uint64_t ino, const char *path,
		     const char *vmflags)
{
	bool shared = perms[3] == 's', anon = ino == 0;
	bool aio = strncmp(path, "/[aio]", 6) == 0;

	if (v->end <= v->start)
		return false;
	if (!strcmp(path, "[vvar]") || !strcmp(path, "[vvar_vclock]") ||
	    !strcmp(path, "[vsyscall]") || !strcmp(path, "[vectors]") ||
	    !strcmp(path, "[uprobes]"))
		return false;
	/* shared memory goes to pagemap-shmem/memfd images, not the task's */
	if (shared && !aio)
		return false;
	/* CRIU refuses VM_IO/VM_PFNMAP mappings and skips droppable ones */
	if (has_vmflag(vmflags, "io") || has_vmflag(vmflags, "pf") || has_vmflag(vmflags, "dp"))
		return false;
	v->all = aio || !strcmp(path, "[vdso]");
	v->readable = perms[0] == 'r';
	/* hugetlbfs files mapped privately count as anonymous memory */
	v->file_private = !anon && !has_vmflag(vmflags, "ht");
	v->lazy = anon && !v->all && !has_vmflag(vmflags, "lo") && !has_vmflag(vmflags, "ht");
	return true;
}

/* The mappings of pid whose pages CRIU dumps, in address order. */
static int task_vmas(pid_t pid, struct vma **ret, size_t *ret_n, struct km_error *err)
{
	char path[64], perms[8] = "", vpath[4096] = "";
	_cleanup_fclose_ FILE *f = NULL;
	_cleanup_free_ char *line = NULL;
	_cleanup_free_ struct vma *v = NULL;
	struct vma cur = { 0 };
	uint64_t ino = 0;
	size_t n = 0, cap = 0, lsz = 0;
	bool pending = false;
	ssize_t len;

	snprintf(path, sizeof(path), "/proc/%d/smaps", (int)pid);
	f = fopen(path, "re");
	if (!f) {
		int r = -errno;

		km_error_set(err, "cannot read %s: %s", path, strerror(-r));
		return r;
	}
	/* a header line per mapping, its fields, then VmFlags (the last one) */
	while ((len = getline(&line, &lsz, f)) >= 0) {
		uint64_t s, e, off;
		unsigned maj, min;
		int pos = 0;

		if (pending && (strncmp(line, "Rss:", 4) == 0 || strncmp(line, "Swap:", 5) == 0)) {
			unsigned long long kb = 0;

			if (sscanf(strchr(line, ':') + 1, "%llu", &kb) == 1 && kb > 0)
				cur.empty = false;
			continue;
		}
		if (strncmp(line, "VmFlags:", 8) == 0) {
			if (pending && classify(&cur, perms, ino, vpath, line + 8)) {
				if (n == cap) {
					struct vma *nv;

					cap = cap ? 2 * cap : 64;
					nv = realloc(v, cap * sizeof(*v));
					if (!nv)
						return -ENOMEM;
					v = nv;
				}
				v[n++] = cur;
			}
			pending = false;
			continue;
		}
		if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64 " %n", &s, &e,
			   perms, &off, &maj, &min, &ino, &pos) < 7 ||
		    pos == 0)
			continue;
		snprintf(vpath, sizeof(vpath), "%s", line + pos);
		vpath[strcspn(vpath, "\n")] = 0;
		cur = (struct vma){ .start = s, .end = e, .empty = true };
		pending = true;
	}
	*ret = KM_TAKE_PTR(v);
	*ret_n = n;
	return 0;
}

/*
 * Whether CRIU would take every page of the task as a stack page, never
 * lazy. Its test (criu/mem.c is_stack) is !((sp ^ vaddr) & ~PAGE_MASK): it
 * compares offsets within the page, so it holds for every page when some
 * thread's stack pointer is page-aligned, and for none otherwise; done the
 * same here so that the flags match. The stack pointers come from
 * /proc/PID/task/TID/syscall; a thread running now reports none (only a
 * lazy restore reads PE_LAZY).
 */
static int sp_aligned(char *text, void *userdata)
{
	const size_t *page = userdata;
	char *tok[16], *save = NULL;
	size_t nt = 0;

	/* "NR ARG1..ARG6 SP PC", "-1 SP PC" or "running" */
	for (char *t = strtok_r(text, " \n", &save); t && nt < KM_ARRAY_SIZE(tok);
	     t = strtok_r(NULL, " \n", &save))
		tok[nt++] = t;
	return (nt == 3 || nt == 9) && (strtoull(tok[nt - 2], NULL, 16) & (*page - 1)) == 0;
}

static bool stack_pointer_aligned(pid_t pid, size_t page)
{
	return km_proc_read_tasks(pid, "syscall", sp_aligned, &page) > 0;
}

static int plan_push(struct plan *p, uint64_t start, uint64_t end, uint32_t flags, bool mem)
{
	struct range *last = p->n ? &p->r[p->n - 1] : NULL;

	if (last && last->end == start && last->flags == flags && last->mem == mem) {
		last->end = end;
		return 0;
	}
	if (p->n == p->cap) {
		size_t cap = p->cap ? 2 * p->cap : 256;
		struct range *nr = realloc(p->r, cap * sizeof(*nr));

		if (!nr)
			return -ENOMEM;
		p->r = nr;
		p->cap = cap;
	}
	p->r[p->n++] = (struct range){ start, end, flags, mem };
	return 0;
}

/* Pages [start, end) of v, lazy where CRIU would mark them so. */
static int plan_add(struct plan *p, const struct vma *v, uint64_t start, uint64_t end)
{
	bool lazy = v->lazy && !p->all_stack;

	return plan_push(p, start, end, KM_CRIU_PE_PRESENT | (lazy ? KM_CRIU_PE_LAZY : 0),
			 !v->readable);
}

/*
 * PAGEMAP_SCAN over v, asking what CRIU asks (criu/pagemap-cache.c):
 * present or swapped, not the zero page, not a file's page. 1 if the
 * kernel lacks it.
 */
static int scan_vma(struct ctx *c, int pmfd, const struct vma *v, struct plan *p)
{
	struct km_pm_scan_arg a = {
		.size = sizeof(a),
		.start = v->start,
		.end = v->end,
		.vec = (uintptr_t)c->regs,
		.vec_len = SCAN_REGIONS,
		.category_inverted = KM_PAGE_IS_PFNZERO | KM_PAGE_IS_FILE,
		.category_mask = KM_PAGE_IS_PFNZERO | KM_PAGE_IS_FILE,
		.category_anyof_mask = KM_PAGE_IS_PRESENT | KM_PAGE_IS_SWAPPED,
	};
	int r;

	while (a.start < v->end) {
		long k;

		a.return_mask = KM_PAGE_IS_PRESENT | KM_PAGE_IS_SWAPPED |
				(c->mode == SCAN_NOGUARD ? 0 : KM_PAGE_IS_GUARD);
		k = ioctl(pmfd, KM_PAGEMAP_SCAN, &a);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			/* before 6.15 the guard category is unknown, before 6.7 the ioctl */
			if (errno == EINVAL && c->mode != SCAN_NOGUARD) {
				c->mode = SCAN_NOGUARD;
				continue;
			}
			if ((errno == ENOTTY || errno == EINVAL) && !c->scan_ok)
				return 1;
			r = -errno;
			km_error_set(c->err, "PAGEMAP_SCAN: %s", strerror(-r));
			return r;
		}
		c->scan_ok = true;
		for (long i = 0; i < k; i++) {
			/* guard regions (MADV_GUARD_INSTALL) read as swapped; CRIU skips them */
			if (c->regs[i].categories & KM_PAGE_IS_GUARD)
				continue;
			r = plan_add(p, v, c->regs[i].start, c->regs[i].end);
			if (r < 0)
				return r;
		}
		if (a.walk_end <= a.start)
			break;
		a.start = a.walk_end;
	}
	if (c->mode == SCAN_UNKNOWN)
		c->mode = SCAN_GUARD;
	return 0;
}

/* The same from /proc/PID/pagemap, as CRIU's should_dump_page reads it. */
static int read_vma_pagemap(struct ctx *c, int pmfd, const struct vma *v, struct plan *p)
{
	uint64_t *pme = (uint64_t *)c->buf;
	const size_t max = BATCH_BYTES / sizeof(uint64_t);
	int r;

	for (uint64_t a = v->start; a < v->end;) {
		size_t n = KM_MIN(max, (v->end - a) / c->page);
		ssize_t k = km_pread_full(pmfd, pme, n * sizeof(*pme),
					  (off_t)(a / c->page * sizeof(*pme)));

		if (k < 0) {
			km_error_set(c->err, "cannot read the pagemap: %s", strerror((int)-k));
			return (int)k;
		}
		n = (size_t)k / sizeof(*pme);
		if (n == 0)
			break;
		for (size_t i = 0; i < n; i++, a += c->page) {
			uint64_t e = pme[i];

			if (e & PME_GUARD)
				continue;
			if (v->file_private && (e & PME_FILE))
				continue;
			if (!(e & (PME_PRESENT | PME_SWAP)))
				continue;
			if ((e & PME_PRESENT) && c->zero_pfn && (e & PME_PFN_MASK) == c->zero_pfn)
				continue;
			r = plan_add(p, v, a, a + c->page);
			if (r < 0)
				return r;
		}
	}
	return 0;
}

/*
 * The zero page's pfn, as CRIU's kerndat finds it: a page of our own that
 * was only read. 0 when pfns are hidden (no CAP_SYS_ADMIN).
 */
static uint64_t zero_page_pfn(size_t page)
{
	_cleanup_close_ int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	volatile uint8_t *m;
	uint64_t e = 0;

	if (fd < 0)
		return 0;
	m = mmap(NULL, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 0;
	(void)m[0];
	if (km_pread_full(fd, &e, sizeof(e), (off_t)((uintptr_t)m / page * sizeof(e))) !=
	    sizeof(e))
		e = 0;
	munmap((void *)m, page);
	return (e & PME_PRESENT) ? (e & PME_PFN_MASK) : 0;
}

/* --- reading and writing ---------------------------------------------------- */

/*
 * Reads len bytes at addr through /proc/PID/mem (it can read mappings
 * without read permission); what cannot be read is left as zeros.
 */
static void read_mem(struct ctx *c, int memfd, uint64_t addr, uint8_t *buf, size_t len)
{
	while (len > 0) {
		ssize_t m = pread(memfd, buf, len, (off_t)addr);
		size_t piece;

		if (m < 0 && errno == EINTR)
			continue;
		if (m > 0) {
			piece = (size_t)m;
		} else {
			piece = KM_MIN(len, c->page - addr % c->page);
			memset(buf, 0, piece);
			c->st.pages_unreadable++;
		}
		buf += piece;
		addr += piece;
		len -= piece;
	}
}

/*
 * process_vm_readv of riov[0..n) into buf (total bytes). It stops at the
 * first page it cannot read (unmapped meanwhile, PROT_NONE): that page is
 * tried through /proc/PID/mem, else zeroed, and the read goes on after it.
 */
static int read_vm(struct ctx *c, pid_t pid, int memfd, struct iovec *riov, size_t n,
		   uint8_t *buf, size_t total)
{
	size_t done = 0, k = 0, koff = 0;

	while (done < total) {
		struct iovec local = { buf + done, total - done }, saved = riov[k];
		uint64_t addr = (uintptr_t)riov[k].iov_base + koff;
		ssize_t m;

		riov[k].iov_base = (uint8_t *)riov[k].iov_base + koff;
		riov[k].iov_len -= koff;
		m = process_vm_readv(pid, &local, 1, riov + k, n - k, 0);
		riov[k] = saved;
		if (m < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EFAULT && errno != ENOMEM && errno != EIO) {
				int r = -errno;

				km_error_set(c->err, "process_vm_readv of pid %d: %s", (int)pid,
					     strerror(-r));
				return r;
			}
			m = 0;
		}
		if (m == 0) {
			m = (ssize_t)KM_MIN(c->page - addr % c->page, riov[k].iov_len - koff);
			read_mem(c, memfd, addr, buf + done, (size_t)m);
		}
		done += (size_t)m;
		while (m > 0 && k < n) {
			size_t rest = riov[k].iov_len - koff;

			if ((size_t)m >= rest) {
				m -= (ssize_t)rest;
				k++;
				koff = 0;
			} else {
				koff += (size_t)m;
				m = 0;
			}
		}
	}
	return 0;
}

/* The plan's pages, in its order, into outfd. */
static int write_pages(struct ctx *c, pid_t pid, int memfd, const struct plan *p, int outfd)
{
	struct iovec riov[BATCH_IOVS];
	size_t i = 0;
	uint64_t at = p->n ? p->r[0].start : 0;
	int r;

	while (i < p->n) {
		size_t fill = 0, niov = 0;
		uint64_t t = now_ns();

		if (p->r[i].mem) {
			/* a mapping without read permission: alone in its batch */
			fill = (size_t)KM_MIN(p->r[i].end - at, BATCH_BYTES);
			read_mem(c, memfd, at, c->buf, fill);
			at += fill;
		} else {
			while (i < p->n && !p->r[i].mem && fill < BATCH_BYTES && niov < BATCH_IOVS) {
				size_t len = (size_t)KM_MIN(p->r[i].end - at, BATCH_BYTES - fill);

				riov[niov++] = (struct iovec){ (void *)(uintptr_t)at, len };
				fill += len;
				at += len;
				if (at == p->r[i].end && ++i < p->n)
					at = p->r[i].start;
			}
			r = read_vm(c, pid, memfd, riov, niov, c->buf, fill);
			if (r < 0)
				return r;
		}
		if (i < p->n && at == p->r[i].end && ++i < p->n)
			at = p->r[i].start;
		c->st.read_ns += now_ns() - t;
		t = now_ns();
		r = km_write_full(outfd, c->buf, fill);
		c->st.write_ns += now_ns() - t;
		if (r < 0) {
			km_error_set(c->err, "cannot write the pages: %s", strerror(-r));
			return r;
		}
		c->st.bytes += fill;
		c->st.pages += fill / c->page;
	}
	return 0;
}

/* --- one task ---------------------------------------------------------------- */

/*
 * Writes pid's pagemap-<vpid>.img and pages-<pages_id>.img. 1 if the task
 * has no memory (a zombie) or is gone: nothing written.
 */
static int snapshot_task(struct ctx *c, pid_t pid, uint32_t pages_id, int dirfd)
{
	_cleanup_free_ struct vma *vmas = NULL;
	_cleanup_free_ struct km_criu_pme *pe = NULL;
	_cleanup_close_ int pmfd = -1, memfd = -1, outfd = -1;
	struct plan p = { 0 };
	char path[64], pages[64], pagemap[64];
	size_t n_vmas = 0, n_pe = 0;
	uint64_t t = now_ns();
	pid_t vpid = pid;
	int r;

	r = task_vpid(pid, &vpid);
	if (r == -ENOENT || r == -ESRCH)
		return 1;
	if (r < 0) {
		km_error_set(c->err, "cannot read /proc/%d/status: %s", (int)pid, strerror(-r));
		return r;
	}
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	pmfd = open(path, O_RDONLY | O_CLOEXEC);
	snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
	memfd = pmfd < 0 ? -1 : open(path, O_RDONLY | O_CLOEXEC);
	if (pmfd < 0 || memfd < 0) {
		r = -errno;
		if (r == -ENOENT || r == -ESRCH)
			return 1;
		km_error_set(c->err, "cannot open %s: %s", path, strerror(-r));
		return r;
	}
	r = task_vmas(pid, &vmas, &n_vmas, c->err);
	if (r == -ENOENT || r == -ESRCH)
		return 1;
	if (r < 0)
		return r;
	if (n_vmas == 0)
		return 1; /* a zombie, or a kernel thread: no mm */
	p.all_stack = stack_pointer_aligned(pid, c->page);
	for (size_t i = 0; i < n_vmas && r >= 0; i++) {
		/*
		 * Nothing resident: no page to look for. It also spares the
		 * pagemap path reading 8 bytes for every page of a large
		 * reservation (ASan's shadow is terabytes).
		 */
		if (vmas[i].empty && !vmas[i].all)
			continue;
		c->st.vmas++;
		if (vmas[i].all) {
			r = plan_push(&p, vmas[i].start, vmas[i].end, KM_CRIU_PE_PRESENT,
				      !vmas[i].readable);
			continue;
		}
		r = c->mode == SCAN_PAGEMAP ? 1 : scan_vma(c, pmfd, &vmas[i], &p);
		if (r == 1) {
			c->mode = SCAN_PAGEMAP;
			if (!c->zero_pfn_known) {
				c->zero_pfn = zero_page_pfn(c->page);
				c->zero_pfn_known = true;
			}
			r = read_vma_pagemap(c, pmfd, &vmas[i], &p);
		}
	}
	c->st.scan_ns += now_ns() - t;
	if (r < 0)
		goto out;

	snprintf(pages, sizeof(pages), "pages-%u.img", pages_id);
	snprintf(pagemap, sizeof(pagemap), "pagemap-%d.img", (int)vpid);
	outfd = openat(dirfd, pages, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (outfd < 0) {
		r = -errno;
		km_error_set(c->err, "cannot create %s: %s", pages, strerror(-r));
		goto out;
	}
	r = write_pages(c, pid, memfd, &p, outfd);
	if (r == -ESRCH) {
		(void)unlinkat(dirfd, pages, 0);
		r = 1;
		goto out;
	}
	if (r < 0)
		goto out;

	t = now_ns();
	pe = calloc(p.n ? p.n : 1, sizeof(*pe));
	if (!pe) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < p.n; i++) {
		uint64_t a = p.r[i].start;

		while (a < p.r[i].end) {
			uint64_t np = KM_MIN((p.r[i].end - a) / c->page, UINT32_MAX);

			if (n_pe == p.n) { /* a range of 16 TiB or more: cut in two */
				struct km_criu_pme *ne = realloc(pe, (n_pe + 1) * sizeof(*pe));

				if (!ne) {
					r = -ENOMEM;
					goto out;
				}
				pe = ne;
				p.n++;
			}
			pe[n_pe++] = (struct km_criu_pme){ a, np, p.r[i].flags };
			a += np * c->page;
		}
	}
	r = km_criu_pagemap_write(dirfd, pagemap,
				  &(struct km_criu_pagemap){ .pages_id = pages_id, .n = n_pe, .e = pe },
				  c->err);
	c->st.write_ns += now_ns() - t;
	if (r == 0)
		c->st.tasks++;
out:
	free(p.r);
	return r;
}

int km_live_snapshot(pid_t pid, int dirfd, struct km_live_snapshot_stats *st,
		     struct km_error *err)
{
	return km_live_snapshot_flags(pid, dirfd, 0, st, err);
}

int km_live_snapshot_flags(pid_t pid, int dirfd, unsigned flags,
			   struct km_live_snapshot_stats *st, struct km_error *err)
{
	struct ctx c = { .err = err,
			 .mode = (flags & KM_LIVE_SNAPSHOT_PAGEMAP) ? SCAN_PAGEMAP : SCAN_UNKNOWN };
	_cleanup_free_ pid_t *pids = NULL;
	uint64_t t = now_ns();
	size_t n = 0;
	int r = 0;

	if (pid <= 0 || kill(pid, 0) < 0) {
		r = pid <= 0 ? -ESRCH : -errno;
		km_error_set(err, "pid %d: %s", (int)pid, strerror(-r));
		return r;
	}
	c.page = (size_t)sysconf(_SC_PAGESIZE);
	c.buf = malloc(BATCH_BYTES);
	c.regs = calloc(SCAN_REGIONS, sizeof(*c.regs));
	if (!c.buf || !c.regs) {
		r = -ENOMEM;
		goto out;
	}
	r = tree_preorder(pid, &pids, &n);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < n; i++) {
		r = snapshot_task(&c, pids[i], (uint32_t)c.st.tasks + 1, dirfd);
		if (r < 0) {
			km_error_prefix(err, "pid %d", (int)pids[i]);
			goto out;
		}
		/* a child that exited is left out; the root must be there */
		if (r == 1 && i == 0) {
			r = -ESRCH;
			km_error_set(err, "pid %d exited, or has no memory", (int)pid);
			goto out;
		}
	}
	r = 0;
	c.st.pagemap_scan = c.mode != SCAN_PAGEMAP;
	c.st.total_ns = now_ns() - t;
	if (st)
		*st = c.st;
out:
	free(c.buf);
	free(c.regs);
	return r;
}
