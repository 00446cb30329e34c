/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "follow.h"

#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/*
 * Bytes split per call while CRIU writes: a stop waits for at most one
 * step (tens of ms), and the rest is left to the commit's parallel scan.
 */
#define FOLLOW_STEP (32u * 1024 * 1024)
/* How often a file that does not grow is looked at again (no event says). */
#define FOLLOW_POLL_MS 2
#define FOLLOW_IDLE_MS 100

struct pending {
	char *name;
	bool closed; /* IN_CLOSE_WRITE seen */
};

/* The file being followed: mapped up to the size seen, never beyond. */
struct current {
	struct pending p;
	int fd;
	const uint8_t *base;
	uint64_t mapped; /* bytes mapped (the mapping is page-rounded) */
	uint64_t fed;	 /* bytes given to km_split_follow */
};

struct km_follow {
	int dirfd;
	struct km_store *store;
	struct km_split_opts opts;
	struct km_split *split; /* the thread's until stop */
	pthread_t thread;
	bool running;
	bool committed;
	int stop_fd; /* eventfd: wakes the thread */
	atomic_bool stop;
	/* Written by the thread, read after join. */
	int error;
	struct km_error err;
	struct km_follow_stats stats;
	char **existing; /* pages images there at start: not followed */
	size_t n_existing;
	struct pending *queue; /* created, in order, not yet followed */
	size_t n_queue;
};

static bool is_pages(const char *name)
{
	return fnmatch("pages-*.img", name, 0) == 0;
}

static bool skip_not_pages(const char *name)
{
	return !is_pages(name);
}

static bool is_existing(const struct km_follow *f, const char *name)
{
	for (size_t i = 0; i < f->n_existing; i++)
		if (strcmp(f->existing[i], name) == 0)
			return true;
	return false;
}

static struct pending *find_queued(struct km_follow *f, const char *name)
{
	for (size_t i = 0; i < f->n_queue; i++)
		if (strcmp(f->queue[i].name, name) == 0)
			return &f->queue[i];
	return NULL;
}

/* Reads every inotify event there is: new pages images queued, closes marked. */
static int read_events(struct km_follow *f, int in_fd, struct current *cur)
{
	char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));

	for (;;) {
		ssize_t n = read(in_fd, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return 0;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		for (char *p = buf; p < buf + n;) {
			const struct inotify_event *ev = (const struct inotify_event *)p;
			struct pending *q;

			p += sizeof(*ev) + ev->len;
			if (ev->mask & IN_Q_OVERFLOW)
				return -EOVERFLOW; /* a creation or close may be lost */
			if (!ev->len || !is_pages(ev->name) || is_existing(f, ev->name))
				continue;
			q = find_queued(f, ev->name);
			if (cur->p.name && strcmp(cur->p.name, ev->name) == 0) {
				if (ev->mask & IN_CLOSE_WRITE)
					cur->p.closed = true;
			} else if (q) {
				if (ev->mask & IN_CLOSE_WRITE)
					q->closed = true;
			} else if (ev->mask & IN_CREATE) {
				struct pending *grown =
					realloc(f->queue, (f->n_queue + 1) * sizeof(*grown));

				if (!grown)
					return -ENOMEM;
				f->queue = grown;
				f->queue[f->n_queue] = (struct pending){ strdup(ev->name), false };
				if (!f->queue[f->n_queue].name)
					return -ENOMEM;
				f->n_queue++;
			}
		}
	}
}

static void current_close(struct current *cur)
{
	if (cur->base)
		munmap((void *)cur->base, (size_t)cur->mapped);
	if (cur->fd >= 0)
		close(cur->fd);
	free(cur->p.name);
	*cur = (struct current){ .fd = -1 };
}

/* The next queued file becomes the current one. */
static int current_open(struct km_follow *f, struct current *cur)
{
	cur->p = f->queue[0];
	memmove(f->queue, f->queue + 1, (f->n_queue - 1) * sizeof(*f->queue));
	f->n_queue--;
	cur->fd = openat(f->dirfd, cur->p.name, O_RDONLY | O_CLOEXEC);
	if (cur->fd < 0) {
		int r = -errno;

		km_error_set(&f->err, "cannot open %s: %s", cur->p.name, strerror(-r));
		return r;
	}
	f->stats.files++;
	return 0;
}

/* Maps the first size bytes: bytes below the size seen exist, so no access faults. */
static int current_map(struct current *cur, uint64_t size)
{
	void *p;

	if (size <= cur->mapped)
		return 0;
	if (size > SIZE_MAX)
		return -EFBIG;
	if (!cur->base)
		p = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, cur->fd, 0);
	else
		p = mremap((void *)cur->base, (size_t)cur->mapped, (size_t)size, MREMAP_MAYMOVE);
	if (p == MAP_FAILED)
		return -errno;
	cur->base = p;
	cur->mapped = size;
	return 0;
}

/* One round on the current file; *ret_progress: whether anything was split. */
static int current_step(struct km_follow *f, struct current *cur, bool *ret_progress)
{
	bool closed = cur->p.closed; /* before the size: then the size is final */
	uint64_t size, avail;
	struct stat st;
	bool complete;
	int r;

	*ret_progress = false;
	if (fstat(cur->fd, &st) < 0)
		return -errno;
	size = (uint64_t)st.st_size;
	if (size < cur->fed) {
		km_error_set(&f->err, "%s shrank from %llu to %llu bytes while CRIU wrote it",
			     cur->p.name, (unsigned long long)cur->fed, (unsigned long long)size);
		return -ESTALE;
	}
	avail = KM_MIN(size, cur->fed + FOLLOW_STEP);
	complete = closed && avail == size;
	if (avail == cur->fed && !complete)
		return 0;
	r = current_map(cur, avail);
	if (r < 0) {
		km_error_set(&f->err, "cannot map %s: %s", cur->p.name, strerror(-r));
		return r;
	}
	r = km_split_follow(f->split, cur->p.name, cur->fd, cur->base, avail, complete, &f->err);
	if (r < 0)
		return r;
	f->stats.bytes_followed += avail - cur->fed;
	cur->fed = avail;
	*ret_progress = true;
	if (complete)
		current_close(cur);
	return 0;
}

static int follow_run(struct km_follow *f)
{
	_cleanup_close_ int in_fd = -1;
	struct current cur = { .fd = -1 };
	char path[64];
	int r;

	in_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (in_fd < 0) {
		r = -errno;
		km_error_set(&f->err, "inotify: %s", strerror(-r));
		return r;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", f->dirfd);
	if (inotify_add_watch(in_fd, path, IN_CREATE | IN_CLOSE_WRITE | IN_ONLYDIR) < 0) {
		r = -errno;
		km_error_set(&f->err, "watching the image directory: %s", strerror(-r));
		return r;
	}
	/* Watched first, listed second: a file in both is left alone. */
	r = km_list_files_at(f->dirfd, skip_not_pages, &f->existing, &f->n_existing);
	if (r < 0) {
		km_error_set(&f->err, "cannot list the image directory: %s", strerror(-r));
		return r;
	}
	r = km_split_begin(f->dirfd, f->store, &f->opts, &f->split, &f->err);
	while (r == 0 && !atomic_load(&f->stop)) {
		struct pollfd pfd[2] = { { .fd = in_fd, .events = POLLIN },
					 { .fd = f->stop_fd, .events = POLLIN } };
		bool progress = false;

		r = read_events(f, in_fd, &cur);
		if (r < 0) {
			km_error_set(&f->err, "watching the image directory: %s", strerror(-r));
			break;
		}
		if (cur.fd < 0 && f->n_queue > 0) {
			r = current_open(f, &cur);
			if (r < 0)
				break;
		}
		if (cur.fd >= 0) {
			r = current_step(f, &cur, &progress);
			if (r < 0)
				break;
		}
		if (!progress &&
		    poll(pfd, 2, cur.fd >= 0 ? FOLLOW_POLL_MS : FOLLOW_IDLE_MS) < 0 && errno != EINTR) {
			r = -errno;
			break;
		}
	}
	current_close(&cur);
	if (r < 0 && !f->err.msg[0])
		km_error_set(&f->err, "%s", strerror(-r));
	return r;
}

static void *follow_main(void *arg)
{
	struct km_follow *f = arg;

	f->error = follow_run(f);
	return NULL;
}

void km_follow_free(struct km_follow *f)
{
	if (!f)
		return;
	if (f->running)
		(void)km_follow_stop(f, NULL, NULL);
	km_split_free(f->split);
	if (f->stop_fd >= 0)
		close(f->stop_fd);
	km_free_names(f->existing, f->n_existing);
	for (size_t i = 0; i < f->n_queue; i++)
		free(f->queue[i].name);
	free(f->queue);
	free(f);
}

int km_follow_start(int dirfd, struct km_store *s, const struct km_split_opts *o,
		    struct km_follow **ret, struct km_error *err)
{
	struct km_follow *f = calloc(1, sizeof(*f));
	sigset_t all, old;
	int r;

	if (!f)
		return -ENOMEM;
	f->dirfd = dirfd;
	f->store = s;
	f->opts = *o;
	atomic_init(&f->stop, false);
	f->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (f->stop_fd < 0) {
		r = -errno;
		km_error_set(err, "eventfd: %s", strerror(-r));
		free(f);
		return r;
	}
	/* The thread, and every thread it starts, with all signals blocked. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	r = -pthread_create(&f->thread, NULL, follow_main, f);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r < 0) {
		km_error_set(err, "cannot start the follower thread: %s", strerror(-r));
		km_follow_free(f);
		return r;
	}
	f->running = true;
	*ret = f;
	return 0;
}

int km_follow_stop(struct km_follow *f, struct km_follow_stats *ret, struct km_error *err)
{
	uint64_t one = 1;

	if (!f->running)
		return -EINVAL;
	atomic_store(&f->stop, true);
	(void)!write(f->stop_fd, &one, sizeof(one));
	pthread_join(f->thread, NULL);
	f->running = false;
	if (ret)
		*ret = f->stats;
	if (f->error < 0 && err)
		*err = f->err;
	return f->error;
}

int km_follow_commit(struct km_follow *f, struct km_split_stats *ret, struct km_error *err)
{
	if (f->running || f->error < 0 || !f->split || f->committed)
		return -EINVAL;
	f->committed = true;
	return km_split_commit(f->split, ret, err);
}
