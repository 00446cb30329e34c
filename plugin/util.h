/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_UTIL_H
#define KM_UTIL_H

/* Small helpers shared by every module: cleanup attributes, full I/O. */

#include <dirent.h>
#include <stdbool.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

#define KM_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define KM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KM_MAX(a, b) ((a) > (b) ? (a) : (b))

static inline void km_freep(void *p)
{
	free(*(void **)p);
}

static inline void km_closep(int *fd)
{
	if (*fd >= 0) {
		int saved = errno;
		close(*fd);
		errno = saved;
	}
}

static inline void km_fclosep(FILE **f)
{
	if (*f)
		fclose(*f);
}

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _cleanup_free_ _cleanup_(km_freep)
#define _cleanup_close_ _cleanup_(km_closep)
#define _cleanup_fclose_ _cleanup_(km_fclosep)

/* Moves ownership out of a cleanup variable. */
#define KM_TAKE_PTR(p)                                                              \
	({                                                                          \
		__typeof__(p) _p = (p);                                             \
		(p) = NULL;                                                         \
		_p;                                                                 \
	})
#define KM_TAKE_FD(fd)                                                              \
	({                                                                          \
		int _fd = (fd);                                                     \
		(fd) = -1;                                                          \
		_fd;                                                                \
	})

/*
 * Full reads and writes, restarting on EINTR and short counts.
 * km_read_full/km_pread_full return bytes read (< n only at end of file) or
 * -errno; the write helpers return 0 or -errno (-EIO for a zero write).
 */
ssize_t km_read_full(int fd, void *buf, size_t n);
ssize_t km_pread_full(int fd, void *buf, size_t n, off_t off);
int km_write_full(int fd, const void *buf, size_t n);
int km_pwrite_full(int fd, const void *buf, size_t n, off_t off);

/* Opens dirfd's directory for readdir (a DIR of its own, dirfd stays open). */
int km_opendir_at(int dirfd, DIR **ret);

/*
 * The regular files of dirfd (symlinks and dotfiles left out), sorted by
 * name, minus those skip (may be NULL) returns true for. *ret is an array
 * of malloc'd names: free it with km_free_names.
 */
typedef bool (*km_name_skip_fn)(const char *name);
int km_list_files_at(int dirfd, km_name_skip_fn skip, char ***ret, size_t *ret_n);
void km_free_names(char **names, size_t n);

/* mkdir -p: every missing directory of path, mode 0755. */
int km_mkdir_p(const char *path);

/*
 * Waits for child pid to exit, for at most timeout_s seconds; past them it
 * is killed (SIGKILL) and reaped, and -ETIMEDOUT returned. *ret_status is
 * waitpid's status whenever the child was reaped.
 */
int km_wait_child(pid_t pid, unsigned int timeout_s, int *ret_status);

/*
 * The resident bytes of pid that a CRIU dump writes as pages: anonymous
 * and shared-anonymous memory, memfd and deleted files, and the private
 * copies of file pages; not the page cache of mapped files (a cooperative
 * engine's weights file), which CRIU leaves to the file. From
 * /proc/PID/smaps; -errno if it cannot be read.
 */
int km_task_dumped_bytes(pid_t pid, uint64_t *ret);

/*
 * Calls fn with the text of /proc/PID/task/TID/FILE (at most 4 KiB, NUL
 * terminated) for each thread of pid whose file reads, until fn returns
 * nonzero; returns that, 0 if none did (or pid is gone).
 */
typedef int (*km_task_text_fn)(char *text, void *userdata);
int km_proc_read_tasks(pid_t pid, const char *file, km_task_text_fn fn, void *userdata);

/*
 * pid's children (from every thread's /proc/PID/task/TID/children), at most
 * max of them into out; their number. 0 for a pid that is gone.
 */
size_t km_proc_children(pid_t pid, pid_t *out, size_t max);

/*
 * Error details for the caller to print: the library never prints. Modules
 * that can fail for reasons a user must see (which chunk, which file) take
 * an optional struct km_error * and describe the failure in it.
 */
struct km_error {
	char msg[512];
};

__attribute__((format(printf, 2, 3))) void km_error_set(struct km_error *e, const char *fmt, ...);

/* Prefixes the message already in e ("what: " + old). */
__attribute__((format(printf, 2, 3))) void km_error_prefix(struct km_error *e, const char *fmt, ...);

/* Writes 'n' bytes as "1.50 GiB" etc. into buf; returns buf. */
char *km_format_bytes(uint64_t n, char buf[32]);

#endif
