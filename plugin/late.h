/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_LATE_H
#define KM_LATE_H

/*
 * Late weights: a restore in which CRIU does not read the weights.
 *
 * A split pages file's whole pages that lie inside chunk extents (the
 * weights) need not pass through a rebuilt pages file. Join leaves them out
 * of the pages file and out of the pagemap (CRIU then maps the memory but
 * reads nothing into it) and returns a plan; the plugin writes those bytes
 * into each restored process straight from the store's chunk files
 * (process_vm_writev) in RESUME_DEVICES_LATE, while the task is still
 * stopped and before its GPU state is restored. The weights are copied once
 * (chunk file to process) instead of twice (chunk file to pages file to
 * process), by every thread.
 *
 * Pages partly outside the weights (a run's first and last) stay in the
 * pages file, as do runs shorter than min_run_pages.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "criuimg.h"
#include "format.h"
#include "hash.h"
#include "store.h"
#include "util.h"

#define KM_LATE_PAGE_SIZE 4096u
#define KM_LATE_MIN_RUN_PAGES 16u

/* length bytes of chunk 'id' from chunk_off go to vaddr. */
struct km_late_piece {
	uint64_t vaddr;
	uint64_t length;
	uint64_t chunk_off;
	uint64_t chunk_length;
	struct km_hash id;
};

/* What one process (pagemap-<pid>.img) gets after CRIU's restore. */
struct km_late_task {
	pid_t pid; /* as in the image: the task's pid in its own namespace */
	char *pages_name; /* the pages file it was left out of, for errors */
	struct km_late_piece *pieces; /* by vaddr */
	size_t n;
	uint64_t bytes;
	bool filled;
};

struct km_late_plan {
	struct km_late_task *tasks;
	size_t n;
};

/* A kept run of pages: 'pages' pages at page 'from' of the split file, at page 'to' in the rebuilt one. */
struct km_late_run {
	uint64_t from, pages, to;
};

/* One split pages file with its weights left out. */
struct km_late_file {
	struct km_late_run *kept;
	size_t n_kept;
	uint64_t kept_pages;		/* size of the rebuilt file, in pages */
	struct km_criu_pagemap pagemap; /* its rewritten pagemap */
	struct km_late_task task;	/* task.n == 0: nothing left out */
};

/*
 * Lays out pages file f (a 1.2 split entry) whose pagemap is pm. Nothing
 * is left out (ret->task.n == 0, not an error) when pm has pages that are
 * not plainly present (parent, lazy) or does not describe exactly f's size.
 */
int km_late_file_build(const struct km_file_entry *f, const struct km_criu_pagemap *pm,
		       uint64_t min_run_pages, struct km_late_file *ret, struct km_error *err);
void km_late_file_clear(struct km_late_file *lf);

/*
 * Where bytes [off, off + len) of the split file go in the rebuilt one:
 * fn(userdata, off, new_off, n) for each kept part, in order; bytes left
 * out are skipped. Stops at fn's first error.
 */
typedef int (*km_late_part_fn)(void *userdata, uint64_t off, uint64_t new_off, uint64_t n);
int km_late_file_map(const struct km_late_file *lf, uint64_t off, uint64_t len, km_late_part_fn fn,
		     void *userdata);

/*
 * Writes task t's pieces into process pid (stopped, memory in place) from
 * the store, on 'threads' threads (0: one per CPU). Each chunk file must be
 * of its length and vouched for by the store's verified record, or hash
 * right now. Read-only mappings are written through /proc/PID/mem.
 */
int km_late_fill(struct km_store *s, const struct km_late_task *t, pid_t pid, unsigned threads,
		 struct km_error *err);

/* The task of plan p with image pid 'pid', or NULL. */
struct km_late_task *km_late_plan_task(struct km_late_plan *p, pid_t pid);
void km_late_plan_free(struct km_late_plan *p);

/* pid's pid in its innermost pid namespace (/proc/PID/status NSpid). */
int km_late_ns_pid(pid_t pid, pid_t *ret);

#endif
