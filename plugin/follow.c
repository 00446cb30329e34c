/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "follow.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "criuimg.h"

/*
 * Bytes split per call while CRIU writes: a stop waits for at most one
 * step (tens of ms), and the rest is left to the commit's parallel scan.
 */
#define FOLLOW_STEP (32u * 1024 * 1024)
/* How often a file that does not grow is looked at again (no event says). */
#define FOLLOW_POLL_MS 2
#define FOLLOW_IDLE_MS 100
/* A stop waits for one step; past this the follower is taken for stuck. */
#define FOLLOW_STOP_TIMEOUT_MS 30000

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

/* The follower process's state (it ends with _exit: what it allocated goes with it). */
struct follower {
	int dirfd;
	int sock;
	struct km_split *split;
	struct km_error err;
	struct km_follow_stats stats;
	bool stop_read; /* CMD_STOP received */
	char **existing; /* pages images there at start: not followed */
	size_t n_existing;
	struct pending *queue; /* created, in order, not yet followed */
	size_t n_queue;
};

/* What the follower process answers to each command. */
struct reply {
	int32_t error;
	struct km_follow_stats follow;
	struct km_split_stats split;
	char msg[sizeof(((struct km_error *)0)->msg)];
};

enum { CMD_STOP = 'S', CMD_COMMIT = 'C' };

struct km_follow {
	int sock; /* to the follower process */
	bool stopped, committed;
	int error; /* the follower's, from stop */
};

static bool skip_not_pages(const char *name)
{
	return !km_criu_is_pages_image(name);
}

static bool is_existing(const struct follower *f, const char *name)
{
	for (size_t i = 0; i < f->n_existing; i++)
		if (strcmp(f->existing[i], name) == 0)
			return true;
	return false;
}

static struct pending *find_queued(struct follower *f, const char *name)
{
	for (size_t i = 0; i < f->n_queue; i++)
		if (strcmp(f->queue[i].name, name) == 0)
			return &f->queue[i];
	return NULL;
}

/* Reads every inotify event there is: new pages images queued, closes marked. */
static int read_events(struct follower *f, int in_fd, struct current *cur)
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
			if (!ev->len || !km_criu_is_pages_image(ev->name) || is_existing(f, ev->name))
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
static int current_open(struct follower *f, struct current *cur)
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
static int current_step(struct follower *f, struct current *cur, bool *ret_progress)
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

/*
 * Follows until the command to stop comes (or the socket closes: the
 * plugin's process is gone, and the split with it). Returns 0 on CMD_STOP,
 * -EPIPE on EOF, or the error that ended the following.
 */
static int follow_run(struct follower *f, const char *store_path, unsigned store_flags,
		      const struct km_split_opts *o, struct km_store **ret_store)
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
	r = km_store_open(store_path, store_flags, NULL, ret_store);
	if (r < 0) {
		km_error_set(&f->err, "chunk store %s: %s", store_path, strerror(-r));
		return r;
	}
	r = km_split_begin(f->dirfd, *ret_store, o, &f->split, &f->err);
	while (r == 0) {
		struct pollfd pfd[2] = { { .fd = in_fd, .events = POLLIN },
					 { .fd = f->sock, .events = POLLIN } };
		bool progress = false;
		int n;

		n = poll(pfd + 1, 1, 0);
		if (n > 0) {
			char cmd = 0;
			ssize_t k = recv(f->sock, &cmd, 1, 0);

			f->stop_read = k == 1 && cmd == CMD_STOP;
			r = f->stop_read ? 0 : -EPIPE;
			break;
		}
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
	if (r < 0 && r != -EPIPE && !f->err.msg[0])
		km_error_set(&f->err, "%s", strerror(-r));
	return r;
}

static void send_reply(int sock, int error, const struct follower *f,
		       const struct km_split_stats *split, const struct km_error *err)
{
	struct reply m = { .error = error, .follow = f->stats };

	if (split)
		m.split = *split;
	if (error < 0)
		snprintf(m.msg, sizeof(m.msg), "%s", err->msg[0] ? err->msg : strerror(-error));
	(void)send(sock, &m, sizeof(m), MSG_NOSIGNAL);
}

/* Closes every descriptor but keep[0..1] (and 0-2, pointed at /dev/null). */
static void close_others(int a, int b)
{
	int lo = KM_MIN(a, b), hi = KM_MAX(a, b), null;

	null = open("/dev/null", O_RDWR | O_CLOEXEC);
	for (int i = 0; i < 3 && null >= 0; i++)
		if (i != a && i != b)
			dup2(null, i);
	if (null > 2 && null != a && null != b)
		close(null);
	if (lo > 3)
		close_range(3, (unsigned)lo - 1, 0);
	if (hi > lo + 1)
		close_range((unsigned)lo + 1, (unsigned)hi - 1, 0);
	close_range((unsigned)hi + 1, ~0u, 0);
}

/* The follower process: follow, report, then commit or drop, and exit. */
static __attribute__((noreturn)) void follower_main(int dirfd, int sock, const char *store_path,
						    unsigned store_flags,
						    const struct km_split_opts *o)
{
	struct follower f = { .dirfd = dirfd, .sock = sock };
	struct km_store *store = NULL;
	struct km_split_stats st;
	struct km_error err = { { 0 } };
	sigset_t none;
	char cmd = 0;
	int r;

	/* CRIU's handlers are for CRIU; a dead peer is seen as EOF, never SIGPIPE. */
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	close_others(dirfd, sock);

	r = follow_run(&f, store_path, store_flags, o, &store);
	/*
	 * Strictly one reply per command: a socket closed with a command
	 * unread resets the connection, and the reply would be lost.
	 */
	if (!f.stop_read && (r == -EPIPE || recv(sock, &cmd, 1, 0) != 1 || cmd != CMD_STOP))
		goto out;
	send_reply(sock, r, &f, NULL, &f.err);
	if (r < 0 || recv(sock, &cmd, 1, 0) != 1 || cmd != CMD_COMMIT)
		goto out;
	r = km_split_commit(f.split, &st, &err);
	send_reply(sock, r, &f, &st, &err);
out:
	/* Not committed: the delta has no name yet (O_TMPFILE) or loses it here. */
	km_split_free(f.split);
	km_store_free(store);
	_exit(0);
}

/* Waits until the follower process has closed its end (it has exited), a few seconds at most. */
static void wait_gone(int sock)
{
	struct pollfd p = { .fd = sock, .events = POLLIN };
	char buf[64];

	shutdown(sock, SHUT_WR);
	while (poll(&p, 1, 5000) > 0 && recv(sock, buf, sizeof(buf), MSG_DONTWAIT) > 0)
		;
}

void km_follow_free(struct km_follow *f)
{
	if (!f)
		return;
	if (f->sock >= 0) {
		/* One that did not answer is left to notice the socket's end. */
		if (f->error != -ETIMEDOUT)
			wait_gone(f->sock);
		close(f->sock);
	}
	free(f);
}

int km_follow_start(int dirfd, const char *store_path, unsigned store_flags,
		    const struct km_split_opts *o, struct km_follow **ret, struct km_error *err)
{
	struct km_follow *f = calloc(1, sizeof(*f));
	int sv[2], status;
	pid_t pid;

	if (!f)
		return -ENOMEM;
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		int r = -errno;

		km_error_set(err, "socketpair: %s", strerror(-r));
		free(f);
		return r;
	}
	/*
	 * Twice: the follower is no child of CRIU, whose SIGCHLD handler
	 * ends the dump when a child exits while a parasite runs.
	 */
	pid = fork();
	if (pid == 0) {
		close(sv[0]);
		if (fork() == 0)
			follower_main(dirfd, sv[1], store_path, store_flags, o);
		_exit(0);
	}
	close(sv[1]);
	if (pid < 0) {
		int r = -errno;

		km_error_set(err, "cannot start the follower process: %s", strerror(-r));
		close(sv[0]);
		free(f);
		return r;
	}
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	f->sock = sv[0];
	*ret = f;
	return 0;
}

/*
 * Sends cmd and reads the reply, waiting timeout_ms at most (-1: as long
 * as it takes); a follower that is gone says -EPIPE, one that does not
 * answer -ETIMEDOUT.
 */
static int command(struct km_follow *f, char cmd, int timeout_ms, struct reply *m,
		   struct km_error *err)
{
	struct pollfd p = { .fd = f->sock, .events = POLLIN };
	ssize_t k;
	int n;

	*m = (struct reply){ 0 };
	/* A follower that failed has sent its reply and gone: read it anyway. */
	(void)send(f->sock, &cmd, 1, MSG_NOSIGNAL);
	do
		n = poll(&p, 1, timeout_ms);
	while (n < 0 && errno == EINTR);
	if (n == 0) {
		km_error_set(err, "the follower process does not answer");
		return -ETIMEDOUT;
	}
	do
		k = recv(f->sock, m, sizeof(*m), MSG_DONTWAIT);
	while (k < 0 && errno == EINTR);
	if (k != (ssize_t)sizeof(*m)) {
		km_error_set(err, "the follower process is gone");
		return -EPIPE;
	}
	if (m->error < 0)
		km_error_set(err, "%s", m->msg);
	return m->error;
}

int km_follow_stop(struct km_follow *f, struct km_follow_stats *ret, struct km_error *err)
{
	struct reply m;
	struct km_error e = { { 0 } };

	if (f->stopped)
		return -EINVAL;
	f->stopped = true;
	f->error = command(f, CMD_STOP, FOLLOW_STOP_TIMEOUT_MS, &m, &e);
	if (ret)
		*ret = m.follow;
	if (f->error < 0 && err)
		*err = e;
	return f->error;
}

int km_follow_commit(struct km_follow *f, struct km_split_stats *ret, struct km_error *err)
{
	struct reply m;
	int r;

	if (!f->stopped || f->error < 0 || f->committed)
		return -EINVAL;
	f->committed = true;
	r = command(f, CMD_COMMIT, -1, &m, err);
	if (r == 0 && ret)
		*ret = m.split;
	return r;
}
