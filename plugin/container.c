/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Moving a podman container (container.h): podman does the checkpoint and
 * both restores, the transport carries the weights and the archive. The
 * library never prints: podman's output goes to files of the work
 * directory, the outcome to the report and err.
 */
#include "container.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "format.h"
#include "store.h"

#define ARGS_MAX	  128
#define TIMEOUT_S_DEFAULT 600u
#define ARCHIVE_NAME	  "checkpoint.tar"

extern char **environ;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * podman [global options] WORDS..., stdout to WORK/TAG.out, stderr to
 * WORK/TAG.err; *ret_status: its wait status.
 */
static int podman(const struct km_container_move_opts *o, const char *tag, const char *const *words,
		  size_t n_words, const char *const *extra, size_t n_extra, int *ret_status,
		  struct km_error *err)
{
	const char *argv[ARGS_MAX];
	char out[PATH_MAX], errp[PATH_MAX];
	unsigned timeout_s = o->timeout_s ? o->timeout_s : TIMEOUT_S_DEFAULT;
	posix_spawn_file_actions_t fa;
	size_t n = 0;
	pid_t pid;
	int r, status = 0;

	if (1 + o->n_podman_args + n_words + n_extra + 1 > ARGS_MAX) {
		km_error_set(err, "too many podman arguments");
		return -E2BIG;
	}
	argv[n++] = o->podman ? o->podman : "podman";
	for (size_t i = 0; i < o->n_podman_args; i++)
		argv[n++] = o->podman_args[i];
	for (size_t i = 0; i < n_words; i++)
		argv[n++] = words[i];
	for (size_t i = 0; i < n_extra; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	snprintf(out, sizeof(out), "%s/%s.out", o->m.work, tag);
	snprintf(errp, sizeof(errp), "%s/%s.err", o->m.work, tag);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	posix_spawn_file_actions_addopen(&fa, 2, errp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	r = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (r != 0) {
		km_error_set(err, "cannot run %s: %s", argv[0], strerror(r));
		return -r;
	}
	r = km_wait_child(pid, timeout_s, &status);
	if (r == -ETIMEDOUT) {
		km_error_set(err, "podman %s did not finish in %u s (killed)", tag, timeout_s);
		return r;
	}
	if (r < 0) {
		km_error_set(err, "waiting for podman: %s", strerror(-r));
		return r;
	}
	*ret_status = status;
	return 0;
}

/* WORK/TAG.EXT's first line (or, with last, the last "Error" line, else the last line). */
static void output_line(const struct km_container_move_opts *o, const char *tag, const char *ext,
			bool last, char *buf, size_t size)
{
	char path[PATH_MAX], line[1024];
	_cleanup_fclose_ FILE *f = NULL;
	bool error_seen = false;

	buf[0] = 0;
	snprintf(path, sizeof(path), "%s/%s.%s", o->m.work, tag, ext);
	f = fopen(path, "re");
	while (f && fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = 0;
		if (!line[0])
			continue;
		if (!last) {
			snprintf(buf, size, "%s", line);
			return;
		}
		if (strstr(line, "Error") || strstr(line, "error")) {
			snprintf(buf, size, "%s", line);
			error_seen = true;
		} else if (!error_seen) {
			snprintf(buf, size, "%s", line);
		}
	}
}

static bool exited_ok(int status)
{
	return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* The container's state ("running", "exited", ...) and host pid. */
static int inspect(const struct km_container_move_opts *o, char *state, size_t size, pid_t *pid,
		   struct km_error *err)
{
	const char *words[] = { "container", "inspect", "--format",
				"{{.State.Status}} {{.State.Pid}}", o->name };
	char line[256], st[64];
	int status, p, r;

	r = podman(o, "inspect", words, KM_ARRAY_SIZE(words), NULL, 0, &status, err);
	if (r < 0)
		return r;
	if (!exited_ok(status)) {
		output_line(o, "inspect", "err", true, line, sizeof(line));
		km_error_set(err, "container %s: %s", o->name,
			     line[0] ? line : "podman inspect failed");
		return -ENOENT;
	}
	output_line(o, "inspect", "out", false, line, sizeof(line));
	if (sscanf(line, "%63s %d", st, &p) != 2) {
		km_error_set(err, "container %s: podman inspect said '%s'", o->name, line);
		return -EPROTO;
	}
	snprintf(state, size, "%s", st);
	*pid = (pid_t)p;
	return 0;
}

/* The source's way back: restore from the checkpoint podman kept (--keep). */
static int restore_source(const struct km_container_move_opts *o, struct km_migrate_report *r,
			  struct km_error *err)
{
	const char *words[] = { "container", "restore", "--keep", o->name };
	char state[64] = "", line[512];
	pid_t pid = 0;
	uint64_t t0 = now_ns();
	int status, q;

	q = inspect(o, state, sizeof(state), &pid, err);
	if (q == 0 && strcmp(state, "running") == 0) {
		r->resumed = true; /* the checkpoint failed early: CRIU resumed it */
		return 0;
	}
	q = podman(o, "restore-source", words, KM_ARRAY_SIZE(words), NULL, 0, &status, err);
	if (q == 0 && !exited_ok(status)) {
		output_line(o, "restore-source", "err", true, line, sizeof(line));
		km_error_set(err, "podman container restore %s: %s", o->name,
			     line[0] ? line : "failed");
		q = -ECHILD;
	}
	if (q == 0)
		q = inspect(o, state, sizeof(state), &pid, err);
	if (q == 0 && strcmp(state, "running") != 0) {
		km_error_set(err, "container %s is %s after its restore", o->name, state);
		q = -ECHILD;
	}
	r->resume_ns = now_ns() - t0;
	r->resumed = q == 0;
	return q;
}

/* CRIU's dump.log, which podman keeps in the container's userdata with --keep. */
static void parse_dump_log(const struct km_container_move_opts *o, uint64_t total_ns,
			   struct km_migrate_report *r)
{
	const char *words[] = { "container", "inspect", "--format", "{{.StaticDir}}", o->name };
	char dir[PATH_MAX - 16], path[PATH_MAX];
	struct km_error e = { { 0 } };
	_cleanup_close_ int fd = -1;
	int status;

	r->dump_ns = total_ns;
	if (podman(o, "staticdir", words, KM_ARRAY_SIZE(words), NULL, 0, &status, &e) < 0 ||
	    !exited_ok(status))
		return;
	output_line(o, "staticdir", "out", false, dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/dump.log", dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0)
		km_migrate_parse_dump_log(fd, total_ns, r);
}

int km_container_move(const struct km_container_move_opts *o, struct km_migrate_report *r,
		      struct km_error *err)
{
	struct km_client *c = NULL;
	struct km_store *s = NULL;
	struct km_migrate_opts m = o->m;
	struct km_archive_send_opts so = { .label = "container", .restore = true, .name = o->name };
	struct km_archive_result res = { 0 };
	char state[64] = "", archive[PATH_MAX], tail[2048] = "", line[512];
	uint64_t t_all = now_ns(), t_stop = 0, t;
	struct stat st;
	pid_t pid = 0;
	int ret, q, status;

	memset(r, 0, sizeof(*r));
	if (!o->name || !m.to || !m.store || !m.work) {
		km_error_set(err, "container, target, store and work directory are required");
		return -EINVAL;
	}
	if (mkdir(m.work, 0700) < 0 && errno != EEXIST) {
		km_error_set(err, "cannot create %s: %s", m.work, strerror(errno));
		return -errno;
	}
	snprintf(archive, sizeof(archive), "%s/%s", m.work, ARCHIVE_NAME);
	if (lstat(archive, &st) == 0) {
		km_error_set(err, "%s exists already", archive);
		return -EEXIST;
	}
	snprintf(r->image_dir, sizeof(r->image_dir), "%s", archive);
	ret = inspect(o, state, sizeof(state), &pid, err);
	if (ret < 0)
		return ret;
	r->pid = pid;
	if (strcmp(state, "running") != 0 || pid <= 0) {
		km_error_set(err, "container %s is %s, not running", o->name, state);
		return -EINVAL;
	}

	/* --- pre-copy, while the container serves --- */
	if (m.progress)
		m.progress(m.userdata, KM_MIGRATE_PRECOPY, r);
	ret = km_store_open(m.store, 0, NULL, &s);
	if (ret < 0) {
		km_error_set(err, "cannot open store %s: %s", m.store, strerror(-ret));
		goto out;
	}
	m.pid = pid;
	ret = km_migrate_precopy(&m, s, r, &c, err);
	if (ret < 0)
		goto out;

	/* --- stop: podman's checkpoint, with kvmotion's plugin inside --- */
	if (m.progress)
		m.progress(m.userdata, KM_MIGRATE_DUMP, r);
	t_stop = now_ns();
	{
		const char *words[] = { "container",  "checkpoint", "--export", archive,
					"--compress", "none",	    "--keep",	o->name };

		ret = podman(o, "checkpoint", words, KM_ARRAY_SIZE(words), o->checkpoint_args,
			     o->n_checkpoint_args, &status, err);
		if (ret == 0 && !exited_ok(status)) {
			output_line(o, "checkpoint", "err", true, line, sizeof(line));
			km_error_set(err, "podman container checkpoint failed: %s",
				     line[0] ? line : "(no output)");
			ret = -ECHILD;
		}
	}
	t = now_ns() - t_stop;
	if (ret < 0)
		goto fail;
	parse_dump_log(o, t, r);
	if (stat(archive, &st) == 0)
		r->image_bytes = (uint64_t)st.st_size;
	if (m.progress)
		m.progress(m.userdata, KM_MIGRATE_SEND, r);
	ret = km_client_send_archive(c, archive, s, &so, &r->stop, &res, tail, sizeof(tail), err);
	if (ret < 0)
		goto fail;
	r->restore_ns = res.restore_ns;
	r->commit_wait_ns = r->stop.commit_ns;
	r->transfer_ns =
		r->stop.total_ns > r->stop.commit_ns ? r->stop.total_ns - r->stop.commit_ns : 0;
	r->restored_pid = res.restored_pid;
	snprintf(r->target_dir, sizeof(r->target_dir), "%s", res.dir);

	/* --- the target runs it: the source goes --- */
	t = now_ns();
	{
		const char *words[] = { "container", "rm", "-f", o->name };

		q = podman(o, "rm", words, KM_ARRAY_SIZE(words), NULL, 0, &status, err);
		if (q == 0 && !exited_ok(status)) {
			output_line(o, "rm", "err", true, line, sizeof(line));
			km_error_set(err,
				     "the container runs on the target (pid %d) but podman rm of "
				     "the source failed: %s",
				     res.restored_pid, line);
			q = -ECHILD;
		}
	}
	r->kill_ns = now_ns() - t;
	r->stop_ns = now_ns() - t_stop;
	if (q < 0) {
		/* not resumed: the target's copy is the one that runs */
		ret = q;
		goto out;
	}
	if (m.progress)
		m.progress(m.userdata, KM_MIGRATE_DONE, r);
	ret = 0;
	goto out;

fail:
	snprintf(r->why, sizeof(r->why), "%s", err->msg[0] ? err->msg : strerror(-ret));
	if (m.progress)
		m.progress(m.userdata, KM_MIGRATE_RESUME, r);
	{
		struct km_error rerr = { { 0 } };

		q = restore_source(o, r, &rerr);
		if (q < 0)
			km_error_set(err, "%s; and the source could not be restored: %s", r->why,
				     rerr.msg[0] ? rerr.msg : strerror(-q));
	}
	r->stop_ns = now_ns() - t_stop;
out:
	if (ret < 0 && !r->why[0])
		snprintf(r->why, sizeof(r->why), "%s", err->msg[0] ? err->msg : strerror(-ret));
	km_client_free(c);
	km_store_free(s);
	r->total_ns = now_ns() - t_all;
	return ret;
}
