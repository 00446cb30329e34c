/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The stop's page server: CRIU's page-server protocol into an incremental image (pagesrv.h). */
#include "pagesrv.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "criuimg.h"

#define PAGE 4096u
/* pages received and compared at a time: 4 MiB, a few socket buffers */
#define BATCH_PAGES 1024u

/* criu/page-xfer.c */
#define PS_IOV_ADD	   1
#define PS_IOV_HOLE	   2
#define PS_IOV_OPEN	   3
#define PS_IOV_OPEN2	   4
#define PS_IOV_PARENT	   5
#define PS_IOV_ADD_F	   6
#define PS_IOV_GET	   7
#define PS_IOV_CLOSE	   0x1023
#define PS_IOV_FORCE_CLOSE 0x1024
#define PS_CMD_BITS	   16
#define PS_CMD_MASK	   ((1u << PS_CMD_BITS) - 1)
#define PS_TYPE_BITS	   8
#define PS_TYPE_MASK	   ((1u << PS_TYPE_BITS) - 1)

struct ps_iov {
	uint32_t cmd;
	uint32_t nr_pages;
	uint64_t vaddr;
	uint64_t dst_id;
};
_Static_assert(sizeof(struct ps_iov) == 24, "CRIU's struct page_server_iov");

/* The pagemap being received. */
struct cur {
	bool open, compare;
	uint64_t dst_id;
	char name[64];
	struct km_criu_pagemap out;
	size_t cap;
	struct km_incr_parent parent;
	size_t hint;
	int pages_fd;
	char pages[64];
};

struct km_pagesrv {
	int sock, dirfd, parent_dirfd;
	pthread_t thread;
	uint32_t next_pages_id;
	uint64_t fail_after;
	uint8_t *buf;
	struct cur cur;
	struct km_incr_stats st;
	struct km_error err;
	int ret;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The pagemap image dst_id names (CRIU's decode_pm, with its legacy type numbers). */
static int decode_dst(uint64_t dst_id, char *name, size_t size, bool *ret_task)
{
	unsigned long id = (unsigned long)(dst_id >> PS_TYPE_BITS);

	switch (dst_id & PS_TYPE_MASK) {
	case 1: case 10: case 11: case 16: case 17:
		snprintf(name, size, "pagemap-%lu.img", id);
		*ret_task = true;
		return 0;
	case 2: case 27: case 28: case 29: case 32: case 33: case 34:
		snprintf(name, size, "pagemap-shmem-%lu.img", id);
		*ret_task = false;
		return 0;
	default:
		return -EPROTO;
	}
}

/* n bytes from the socket; -EPIPE if it ends before them. */
static int recv_full(int sock, void *buf, size_t n)
{
	ssize_t got = km_read_full(sock, buf, n);

	if (got < 0)
		return (int)got;
	return (size_t)got == n ? 0 : -EPIPE;
}

/* MSG_NOSIGNAL: a socket CRIU closed must not kill the sender with SIGPIPE. */
static int send_full(int sock, const void *buf, size_t n)
{
	ssize_t w;

	do
		w = send(sock, buf, n, MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	if (w < 0)
		return -errno;
	return (size_t)w == n ? 0 : -EIO;
}

static void cur_drop(struct km_pagesrv *ps)
{
	struct cur *c = &ps->cur;

	if (c->pages_fd >= 0)
		close(c->pages_fd);
	km_criu_pagemap_clear(&c->out);
	km_incr_parent_close(&c->parent);
	*c = (struct cur){ .pages_fd = -1 };
}

/* Writes the pagemap being received; its pages file is complete already. */
static int cur_finish(struct km_pagesrv *ps)
{
	struct cur *c = &ps->cur;
	uint64_t t = now_ns();
	int r;

	if (!c->open)
		return 0;
	if (close(c->pages_fd) < 0) {
		c->pages_fd = -1;
		km_error_set(&ps->err, "%s: %s", c->pages, strerror(errno));
		return -errno;
	}
	c->pages_fd = -1;
	r = km_criu_pagemap_write(ps->dirfd, c->name, &c->out, &ps->err);
	if (r < 0)
		return r;
	if (c->compare)
		ps->st.pagemaps++;
	else
		ps->st.pagemaps_kept++;
	ps->st.write_ns += now_ns() - t;
	cur_drop(ps);
	return 0;
}

static int cur_open(struct km_pagesrv *ps, uint64_t dst_id)
{
	struct cur *c = &ps->cur;
	bool task;
	int r;

	r = cur_finish(ps);
	if (r < 0)
		return r;
	if (decode_dst(dst_id, c->name, sizeof(c->name), &task) < 0) {
		km_error_set(&ps->err, "criu sent pages for an unknown kind of image (%llu)",
			     (unsigned long long)(dst_id & PS_TYPE_MASK));
		return -EPROTO;
	}
	/* written already: a second OPEN would overwrite its entries */
	if (faccessat(ps->dirfd, c->name, F_OK, 0) == 0) {
		km_error_set(&ps->err, "criu sent %s twice", c->name);
		return -EEXIST;
	}
	c->dst_id = dst_id;
	c->out.pages_id = ps->next_pages_id++;
	snprintf(c->pages, sizeof(c->pages), "pages-%u.img", c->out.pages_id);
	c->pages_fd = openat(ps->dirfd, c->pages, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (c->pages_fd < 0) {
		km_error_set(&ps->err, "%s: %s", c->pages, strerror(errno));
		return -errno;
	}
	c->open = true;
	/* shmem and tasks the parent does not know: every page is kept */
	if (task && ps->parent_dirfd >= 0) {
		r = km_incr_parent_open(ps->parent_dirfd, c->name, &c->parent, &ps->err);
		if (r < 0 && r != -ENOENT)
			return r;
		c->compare = r == 0;
	}
	return 0;
}

/* nr pages at vaddr follow on the socket: compared, the unequal ones written. */
static int add_pages(struct km_pagesrv *ps, uint64_t vaddr, uint64_t nr, uint32_t flags)
{
	struct cur *c = &ps->cur;

	while (nr) {
		uint32_t n = (uint32_t)KM_MIN(nr, (uint64_t)BATCH_PAGES), p = 0;
		uint64_t t = now_ns();
		int r = recv_full(ps->sock, ps->buf, (size_t)n * PAGE);

		if (r < 0) {
			km_error_set(&ps->err, "receiving pages at %#llx: %s",
				     (unsigned long long)vaddr,
				     r == -EPIPE ? "criu closed the socket" : strerror(-r));
			return r;
		}
		ps->st.pages += n;
		if (ps->fail_after && ps->st.pages >= ps->fail_after) {
			km_error_set(&ps->err, "test: failure injected after %llu pages",
				     (unsigned long long)ps->st.pages);
			return -EIO;
		}
		ps->st.bytes_before += (uint64_t)n * PAGE;
		while (p < n) {
			uint32_t q = p;
			bool eq = false;

			/* a run of pages all equal to the parent's, or all not */
			do {
				const uint8_t *pp = c->compare
					? km_incr_parent_page(&c->parent, vaddr + (uint64_t)q * PAGE,
							      &c->hint)
					: NULL;
				bool e = pp && memcmp(ps->buf + (size_t)q * PAGE, pp, PAGE) == 0;

				if (q == p)
					eq = e;
				else if (e != eq)
					break;
				q++;
			} while (q < n);
			ps->st.compare_ns += now_ns() - t;
			/* CRIU marks holes in the parent with PE_PARENT alone */
			r = km_criu_pagemap_push(&c->out, &c->cap, vaddr + (uint64_t)p * PAGE, q - p,
						 eq ? KM_CRIU_PE_PARENT : flags);
			if (r < 0)
				return r;
			if (eq) {
				ps->st.pages_parent += q - p;
			} else {
				t = now_ns();
				r = km_write_full(c->pages_fd, ps->buf + (size_t)p * PAGE,
						  (size_t)(q - p) * PAGE);
				if (r < 0) {
					km_error_set(&ps->err, "%s: %s", c->pages, strerror(-r));
					return r;
				}
				ps->st.write_ns += now_ns() - t;
				ps->st.pages_present += q - p;
				ps->st.bytes_after += (uint64_t)(q - p) * PAGE;
			}
			t = now_ns();
			p = q;
		}
		vaddr += (uint64_t)n * PAGE;
		nr -= n;
	}
	return 0;
}

static int serve(struct km_pagesrv *ps)
{
	for (;;) {
		struct ps_iov pi;
		uint32_t cmd, flags;
		int32_t status = 0;
		char no_parent = 0;
		int r = recv_full(ps->sock, &pi, sizeof(pi));

		if (r < 0) {
			km_error_set(&ps->err, "%s", r == -EPIPE
				? "criu closed the page server's socket before the end of the dump"
				: strerror(-r));
			return r;
		}
		cmd = pi.cmd & PS_CMD_MASK;
		flags = pi.cmd >> PS_CMD_BITS;
		switch (cmd) {
		case PS_IOV_OPEN:
		case PS_IOV_OPEN2:
			r = cur_open(ps, pi.dst_id);
			if (r == 0 && cmd == PS_IOV_OPEN2)
				r = send_full(ps->sock, &no_parent, 1);
			break;
		case PS_IOV_PARENT:
			/* only a dump with --prev-images-dir asks */
			r = send_full(ps->sock, &status, sizeof(status));
			break;
		case PS_IOV_ADD:
		case PS_IOV_HOLE:
		case PS_IOV_ADD_F:
			if (cmd == PS_IOV_ADD)
				flags = KM_CRIU_PE_PRESENT;
			else if (cmd == PS_IOV_HOLE)
				flags = KM_CRIU_PE_PARENT;
			/* CRIU's "deprecated IO w/o open" */
			if (!ps->cur.open || ps->cur.dst_id != pi.dst_id)
				r = cur_open(ps, pi.dst_id);
			if (r == 0 && (flags & KM_CRIU_PE_PRESENT))
				r = add_pages(ps, pi.vaddr, pi.nr_pages, flags);
			else if (r == 0)
				r = km_criu_pagemap_push(&ps->cur.out, &ps->cur.cap, pi.vaddr,
							 pi.nr_pages, flags);
			break;
		case PS_IOV_CLOSE:
		case PS_IOV_FORCE_CLOSE:
			r = cur_finish(ps);
			if (r == 0)
				r = send_full(ps->sock, &status, sizeof(status));
			return r;
		default:
			km_error_set(&ps->err, "criu sent page-server command %u, not one of a dump",
				     cmd);
			return -EPROTO;
		}
		if (r < 0) {
			if (!ps->err.msg[0])
				km_error_set(&ps->err, "page server: %s", strerror(-r));
			return r;
		}
	}
}

static void *serve_thread(void *arg)
{
	struct km_pagesrv *ps = arg;

	ps->ret = serve(ps);
	/* fails CRIU's dump at its next send if we stopped early */
	shutdown(ps->sock, SHUT_RDWR);
	return NULL;
}

int km_pagesrv_start(int sock, int dirfd, int parent_dirfd, const struct km_pagesrv_opts *o,
		     struct km_pagesrv **ret, struct km_error *err)
{
	struct km_pagesrv *ps = calloc(1, sizeof(*ps));
	void *buf = MAP_FAILED;
	int r;

	if (ps)
		buf = mmap(NULL, (size_t)BATCH_PAGES * PAGE, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!ps || buf == MAP_FAILED) {
		free(ps);
		close(sock);
		km_error_set(err, "page server: out of memory");
		return -ENOMEM;
	}
	ps->sock = sock;
	ps->dirfd = dirfd;
	ps->parent_dirfd = parent_dirfd;
	ps->next_pages_id = 1;
	ps->fail_after = o ? o->test_fail_after_pages : 0;
	ps->buf = buf;
	ps->cur = (struct cur){ .pages_fd = -1 };
	r = -pthread_create(&ps->thread, NULL, serve_thread, ps);
	if (r < 0) {
		munmap(buf, (size_t)BATCH_PAGES * PAGE);
		close(sock);
		free(ps);
		km_error_set(err, "page server thread: %s", strerror(-r));
		return r;
	}
	*ret = ps;
	return 0;
}

int km_pagesrv_wait(struct km_pagesrv *ps, struct km_incr_stats *ret, struct km_error *err)
{
	int r;

	pthread_join(ps->thread, NULL);
	r = ps->ret;
	if (r < 0 && err)
		*err = ps->err;
	if (r == 0 && ret)
		*ret = ps->st;
	cur_drop(ps);
	close(ps->sock);
	munmap(ps->buf, (size_t)BATCH_PAGES * PAGE);
	free(ps);
	return r;
}
