/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_LIVESNAP_H
#define KM_LIVESNAP_H

/*
 * A snapshot of a process tree's memory that does not stop it: the
 * pagemap-<ID>.img and pages-<pages_id>.img files `criu dump
 * --leave-running` would write for the tree's pages, read from the running
 * processes with process_vm_readv (no ptrace, no freeze). Pages change while
 * they are read, so the snapshot is not consistent: it is meant as the
 * parent image of an incremental stop, where every page is compared again
 * and a stale one only costs its bytes in the stop.
 *
 * Which pages: those CRIU's dump takes (criu/mem.c): present or swapped
 * pages of private anonymous memory and the anonymous (COW) copies of
 * private file mappings, not the zero page; all of [vdso]; nothing of
 * shared mappings (CRIU dumps those as pagemap-shmem/memfd images, not
 * here), [vvar], [vsyscall], [uprobes], VM_IO/VM_PFNMAP or MAP_DROPPABLE
 * mappings. Entries carry PE_PRESENT, with PE_LAZY where CRIU would set it
 * (private anonymous memory, not locked, not hugetlb, not a page some
 * thread's stack pointer is in as /proc/PID/task/TID/syscall reports it).
 *
 * Names: pagemap-<ID>.img, ID the task's pid in its own pid namespace (the
 * last NSpid of /proc/PID/status; CRIU's vpid), and pages-<N>.img, N = 1, 2,
 * ... in CRIU's dump order: the tree depth-first, pid first, children in
 * the order /proc/PID/task/TID/children lists them. One pair per process
 * (threads share it); a zombie or a task that exits meanwhile gets none.
 * Entries may be cut at other boundaries than CRIU's (it cuts at its pipe
 * buffers): the pages are the same.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "util.h"

struct km_live_snapshot_stats {
	uint64_t tasks;		   /* pagemap files written */
	uint64_t vmas;		   /* mappings whose pages were looked for */
	uint64_t pages;		   /* pages written into pages-*.img */
	uint64_t bytes;		   /* their bytes */
	uint64_t pages_unreadable; /* gone between the scan and the read: written as zeros */
	bool pagemap_scan;	   /* pages found with PAGEMAP_SCAN, else /proc/PID/pagemap */
	uint64_t scan_ns;	   /* mappings and page tables */
	uint64_t read_ns;	   /* process_vm_readv */
	uint64_t write_ns;	   /* the files */
	uint64_t total_ns;
};

/*
 * Snapshots the tree rooted at pid into dirfd (which should be empty:
 * files of the same names are overwritten). st may be NULL. Errors: -ESRCH
 * pid does not exist (or exited before its pages were read), -EPERM/-EACCES
 * not allowed to read its memory (needs ptrace access to it), -ENOSPC and
 * other write errors of dirfd.
 */
int km_live_snapshot(pid_t pid, int dirfd, struct km_live_snapshot_stats *st,
		     struct km_error *err);

/* The same, with KM_LIVE_SNAPSHOT_* flags. */
#define KM_LIVE_SNAPSHOT_PAGEMAP 1u /* /proc/PID/pagemap even where PAGEMAP_SCAN works (tests) */
int km_live_snapshot_flags(pid_t pid, int dirfd, unsigned flags,
			   struct km_live_snapshot_stats *st, struct km_error *err);

#endif
