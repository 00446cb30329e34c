/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_FOLLOW_H
#define KM_FOLLOW_H

/*
 * Splitting the pages images while CRIU writes them, for the plugin's
 * dump: CRIU writes each pages-*.img front to back with one core while the
 * others idle, so a follower splits what is already written
 * (km_split_follow) and exit(DUMP) is left with the tails.
 *
 * The follower is a process, not a thread: CRIU must stay single-threaded
 * (setns into a mount namespace fails in a process whose threads share
 * their fs, so container dumps fail), and it is no child of CRIU (CRIU's
 * SIGCHLD handler during a parasite's run ends the dump on any child's
 * exit). It keeps only the image directory and its socket, watches the
 * directory (inotify) for pages-*.img files created after start, follows
 * them one at a time in the order they appear, each up to the size seen
 * (its mapping never reaches past it), and a file to its end once CRIU has
 * closed it (IN_CLOSE_WRITE, read before the size). Files present at start
 * are left to the commit. Its temporary delta has no name until the
 * commit (O_TMPFILE): a follower that ends or is killed leaves nothing.
 *
 * Use: start; when CRIU is done, stop (the follower's first error, if
 * any); then commit, or free alone to drop the split and leave the
 * directory as CRIU wrote it. free waits (a few seconds at most) until the
 * follower process has gone.
 */

#include <stdint.h>

#include "image.h"
#include "util.h"

struct km_follow;

struct km_follow_stats {
	uint64_t files;		/* pages images followed */
	uint64_t bytes_followed; /* of them split before stop */
};

/*
 * Forks the follower, which opens the store at store_path (km_store_open
 * flags) itself. Errors of the follower (the store, its indexes, the
 * delta, a file) come from stop.
 */
int km_follow_start(int dirfd, const char *store_path, unsigned store_flags,
		    const struct km_split_opts *o, struct km_follow **ret, struct km_error *err);

/* Stops the following: 0, or the follower's error (err says; -EPIPE: it died). Once only. */
int km_follow_stop(struct km_follow *f, struct km_follow_stats *ret, struct km_error *err);

/* After a stop that returned 0: km_split_commit (see image.h, -ESTALE). */
int km_follow_commit(struct km_follow *f, struct km_split_stats *ret, struct km_error *err);

/* Ends the follower; without a commit the directory is left as it was. NULL is fine. */
void km_follow_free(struct km_follow *f);

#endif
