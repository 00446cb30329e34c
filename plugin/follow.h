/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_FOLLOW_H
#define KM_FOLLOW_H

/*
 * Splitting the pages images while CRIU writes them, for the plugin's
 * dump: CRIU writes each pages-*.img front to back with one core while the
 * others idle, so a thread splits what is already written (km_split_follow)
 * and exit(DUMP) is left with the tails.
 *
 * The thread watches the directory (inotify) for pages-*.img files created
 * after start, follows them one at a time in the order they appear, each
 * up to the size seen (its mapping never reaches past it), and a file to
 * its end once CRIU has closed it (IN_CLOSE_WRITE, read before the size).
 * Files present at start are left to the commit. It runs with every signal
 * blocked (CRIU's are for its main thread), as do the pools it creates. At
 * the usual priority: its work is part of the freeze as much as CRIU's, and
 * a raised nice value starved it behind the node's other work (measured,
 * docs/performance.md).
 *
 * Use: start; when CRIU is done, stop (the thread's first error, if any);
 * then commit, or free alone to drop the split and leave the directory as
 * CRIU wrote it.
 */

#include <stdint.h>

#include "image.h"
#include "store.h"
#include "util.h"

struct km_follow;

struct km_follow_stats {
	uint64_t files;		/* pages images followed */
	uint64_t bytes_followed; /* of them split before stop */
};

/*
 * dirfd and s are borrowed until free; o is copied. Errors of the thread
 * (the store's indexes, the temporary delta, a file) come from stop.
 */
int km_follow_start(int dirfd, struct km_store *s, const struct km_split_opts *o,
		    struct km_follow **ret, struct km_error *err);

/* Stops the thread and waits for it: 0, or its error (err says). Once only. */
int km_follow_stop(struct km_follow *f, struct km_follow_stats *ret, struct km_error *err);

/* After a stop that returned 0: km_split_commit (see image.h, -ESTALE). */
int km_follow_commit(struct km_follow *f, struct km_split_stats *ret, struct km_error *err);

/* Stops the thread if it runs; without a commit the directory is left as it was. NULL is fine. */
void km_follow_free(struct km_follow *f);

#endif
