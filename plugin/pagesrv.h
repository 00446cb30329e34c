/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_PAGESRV_H
#define KM_PAGESRV_H

/*
 * A page server for `criu dump --page-server --ps-socket FD`: the
 * receiving side of CRIU's page-server protocol (criu/page-xfer.c), which
 * writes what it receives as an incremental image over a parent by
 * content, as km_incr_rewrite would rewrite a complete dump: each page
 * equal to the parent's page at the same address becomes a PE_PARENT
 * entry, only the others are written. So the dump writes no complete pages
 * file, and the compare runs while CRIU dumps (docs/formats.md, "The
 * stop's page server").
 *
 * It serves one dump, in a thread of its own, on one connected stream
 * socket (the other end is CRIU's --ps-socket). CRIU sends, per pagemap,
 * OPEN2 (answered with has_parent = 0: CRIU must send every page), then
 * ADD_F runs of pages, and at the end CLOSE or FORCE_CLOSE (answered with
 * status 0 once every image is written). On an error the socket is closed,
 * which fails CRIU's dump (CRIU then resumes the tree).
 */

#include "incr.h"
#include "util.h"

struct km_pagesrv;

struct km_pagesrv_opts {
	/* tests only: fail with -EIO after receiving this many pages (0: off) */
	uint64_t test_fail_after_pages;
};

/*
 * Starts serving sock (owned from now on) into dirfd (pagemap-*.img and
 * pages-<N>.img, N from 1; the directory must hold none), comparing with
 * the parent image in parent_dirfd (-1: none, every page is kept); o may
 * be NULL. The
 * descriptors must stay open until km_pagesrv_wait returns.
 */
int km_pagesrv_start(int sock, int dirfd, int parent_dirfd, const struct km_pagesrv_opts *o,
		     struct km_pagesrv **ret, struct km_error *err);

/*
 * Waits for the end of the dump's stream: 0 if CRIU closed it properly
 * and every image is written (*ret: what was compared and kept; compare_ns
 * the thread's time spent receiving and comparing, write_ns writing);
 * <0 with err saying why otherwise (-EPIPE: the stream ended before CRIU's
 * close, as when the dump failed). Frees ps.
 */
int km_pagesrv_wait(struct km_pagesrv *ps, struct km_incr_stats *ret, struct km_error *err);

#endif
