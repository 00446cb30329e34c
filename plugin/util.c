/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "util.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

ssize_t km_read_full(int fd, void *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t k = read(fd, (char *)buf + done, n - done);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (k == 0)
			break;
		done += (size_t)k;
	}
	return (ssize_t)done;
}

ssize_t km_pread_full(int fd, void *buf, size_t n, off_t off)
{
	size_t done = 0;

	while (done < n) {
		ssize_t k = pread(fd, (char *)buf + done, n - done, off + (off_t)done);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (k == 0)
			break;
		done += (size_t)k;
	}
	return (ssize_t)done;
}

int km_write_full(int fd, const void *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t k = write(fd, (const char *)buf + done, n - done);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (k == 0)
			return -EIO;
		done += (size_t)k;
	}
	return 0;
}

int km_pwrite_full(int fd, const void *buf, size_t n, off_t off)
{
	size_t done = 0;

	while (done < n) {
		ssize_t k = pwrite(fd, (const char *)buf + done, n - done, off + (off_t)done);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (k == 0)
			return -EIO;
		done += (size_t)k;
	}
	return 0;
}

int km_opendir_at(int dirfd, DIR **ret)
{
	int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d;

	if (fd < 0)
		return -errno;
	d = fdopendir(fd);
	if (!d) {
		int r = -errno;

		close(fd);
		return r;
	}
	*ret = d;
	return 0;
}

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

void km_free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

int km_list_files_at(int dirfd, km_name_skip_fn skip, char ***ret, size_t *ret_n)
{
	DIR *d;
	struct dirent *de;
	char **names = NULL;
	size_t n = 0, cap = 0;
	int r;

	r = km_opendir_at(dirfd, &d);
	if (r < 0)
		return r;
	while ((errno = 0, de = readdir(d))) {
		struct stat st;

		if (de->d_name[0] == '.' || (skip && skip(de->d_name)))
			continue; /* ".", "..", temporary files, the caller's */
		if (fstatat(dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			r = -errno;
			break;
		}
		if (!S_ISREG(st.st_mode))
			continue; /* e.g. the parent/ symlink of an incremental dump */
		if (n == cap) {
			char **x;

			cap = cap ? 2 * cap : 64;
			x = realloc(names, cap * sizeof(*x));
			if (!x) {
				r = -ENOMEM;
				break;
			}
			names = x;
		}
		names[n] = strdup(de->d_name);
		if (!names[n]) {
			r = -ENOMEM;
			break;
		}
		n++;
	}
	if (r == 0 && errno)
		r = -errno;
	closedir(d);
	if (r < 0) {
		km_free_names(names, n);
		return r;
	}
	if (n)
		qsort(names, n, sizeof(*names), cmp_names);
	*ret = names;
	*ret_n = n;
	return 0;
}

int km_mkdir_p(const char *path)
{
	_cleanup_free_ char *p = strdup(path);

	if (!p)
		return -ENOMEM;
	for (char *c = p + 1;; c++) {
		if (*c != '/' && *c != 0)
			continue;
		char saved = *c;

		*c = 0;
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			return -errno;
		*c = saved;
		if (!saved)
			break;
	}
	return 0;
}

void km_error_set(struct km_error *e, const char *fmt, ...)
{
	va_list ap;

	if (!e)
		return;
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
}

void km_error_prefix(struct km_error *e, const char *fmt, ...)
{
	char joined[2 * sizeof(e->msg) + 2];
	size_t n;
	va_list ap;

	if (!e)
		return;
	va_start(ap, fmt);
	n = (size_t)vsnprintf(joined, sizeof(e->msg), fmt, ap);
	va_end(ap);
	if (n >= sizeof(e->msg))
		n = sizeof(e->msg) - 1;
	if (e->msg[0]) {
		joined[n++] = ':';
		joined[n++] = ' ';
		memcpy(joined + n, e->msg, strnlen(e->msg, sizeof(e->msg) - 1) + 1);
	}
	/* Messages longer than the buffer are cut, not rejected. */
	joined[sizeof(e->msg) - 1] = 0;
	memcpy(e->msg, joined, sizeof(e->msg));
}

char *km_format_bytes(uint64_t n, char buf[32])
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)n;
	size_t u = 0;

	while (v >= 1024 && u + 1 < KM_ARRAY_SIZE(units)) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, 32, "%llu B", (unsigned long long)n);
	else
		snprintf(buf, 32, "%.2f %s", v, units[u]);
	return buf;
}

/* Whether a mapping's name is a file CRIU leaves to the file system. */
static bool mapped_file_kept(const char *name)
{
	if (name[0] != '/')
		return false; /* anonymous, [heap], [stack], [anon:...] */
	return strncmp(name, "/dev/zero", 9) != 0 && strncmp(name, "/SYSV", 5) != 0 &&
	       strncmp(name, "/memfd:", 7) != 0 && !strstr(name, " (deleted)");
}

int km_task_dumped_bytes(pid_t pid, uint64_t *ret)
{
	_cleanup_fclose_ FILE *f = NULL;
	char path[64], line[4096];
	unsigned long long kb;
	uint64_t total = 0;
	bool kept = false;

	snprintf(path, sizeof(path), "/proc/%d/smaps", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long start, end, off, inode;
		unsigned int major, minor;
		char perms[5], *name;
		int n = 0;

		/* "start-end perms offset major:minor inode   name": a mapping */
		if (sscanf(line, "%llx-%llx %4s %llx %x:%x %llu %n", &start, &end, perms, &off,
			   &major, &minor, &inode, &n) == 7 &&
		    n > 0) {
			name = line + n;
			name[strcspn(name, "\n")] = 0;
			kept = mapped_file_kept(name);
		} else if (sscanf(line, "Rss: %llu kB", &kb) == 1) {
			if (!kept)
				total += (uint64_t)kb * 1024;
		} else if (sscanf(line, "Anonymous: %llu kB", &kb) == 1) {
			if (kept)
				total += (uint64_t)kb * 1024;
		}
	}
	if (ferror(f))
		return -EIO;
	*ret = total;
	return 0;
}

int km_wait_child(pid_t pid, unsigned int timeout_s, int *ret_status)
{
	struct timespec now, deadline;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += timeout_s;
	for (;;) {
		pid_t w = waitpid(pid, ret_status, WNOHANG);

		if (w == pid)
			return 0;
		if (w < 0 && errno != EINTR)
			return -errno;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec > deadline.tv_sec ||
		    (now.tv_sec == deadline.tv_sec && now.tv_nsec > deadline.tv_nsec)) {
			kill(pid, SIGKILL);
			(void)waitpid(pid, ret_status, 0);
			return -ETIMEDOUT;
		}
		/* a poll, not SIGCHLD: the callers' daemons leave signals to others */
		usleep(10000);
	}
}

int km_proc_read_tasks(pid_t pid, const char *file, km_task_text_fn fn, void *userdata)
{
	char path[64];
	struct dirent *de;
	int r = 0;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	d = opendir(path);
	if (!d)
		return 0;
	while (r == 0 && (de = readdir(d))) {
		char fpath[sizeof(path) + 300], buf[4096];
		_cleanup_close_ int fd = -1;
		ssize_t len;

		if (de->d_name[0] == '.')
			continue;
		snprintf(fpath, sizeof(fpath), "%s/%s/%s", path, de->d_name, file);
		fd = open(fpath, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		len = km_read_full(fd, buf, sizeof(buf) - 1);
		if (len <= 0)
			continue;
		buf[len] = 0;
		r = fn(buf, userdata);
	}
	closedir(d);
	return r;
}

struct children {
	pid_t *out;
	size_t n, max;
};

static int add_children(char *text, void *userdata)
{
	struct children *c = userdata;
	char *end;

	for (char *p = text; c->n < c->max; p = end) {
		long pid = strtol(p, &end, 10);

		if (end == p)
			break;
		if (pid > 0)
			c->out[c->n++] = (pid_t)pid;
	}
	return c->n == c->max;
}

size_t km_proc_children(pid_t pid, pid_t *out, size_t max)
{
	struct children c = { out, 0, max };

	if (max)
		(void)km_proc_read_tasks(pid, "children", add_children, &c);
	return c.n;
}
