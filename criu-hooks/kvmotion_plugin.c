/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * kvmotion's CRIU plugin: a thin adapter between CRIU's hooks and the
 * kvmotion library. One .so does both jobs, because CRIU stops at the first
 * plugin that handles a device hook:
 *
 *   GPU     PAUSE_DEVICES: lock the CUDA process; CHECKPOINT_DEVICES: GPU
 *           memory into host memory; exit(DUMP): on failure or
 *           --leave-running, restore and unlock; RESUME_DEVICES_LATE:
 *           restore (with GPU UUID remapping) and unlock.
 *   Images  init(DUMP): a process starts splitting the pages images while
 *           CRIU writes them (split_follow); exit(DUMP): the split of the
 *           complete image directory against the node's chunk store is
 *           finished and committed; init(RESTORE): join and verify it before
 *           CRIU opens any image or creates any process, the weights' pages
 *           left out (late_weights); RESUME_DEVICES_LATE: the weights written
 *           into the stopped task, before its GPU state; exit(RESTORE): the
 *           directory back to its split image.
 *   Engines PAUSE_DEVICES: a cooperative engine (kvmotion/engine.h) is asked
 *           to quiesce before its task is seized (and before its GPU is
 *           locked), and the weights files it maps are recorded in
 *           kvmotion.engines; init(RESTORE): every such file must be there
 *           and hash to its name; RESUME_DEVICES_LATE, and exit(DUMP) after
 *           a failed or --leave-running dump: the engine is told to resume.
 *
 * This file is the only place with global state: CRIU's plugin API passes
 * no context between hooks. Docs: docs/criu.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criu/criu-plugin.h>

#include "config.h"
#include "criuimg.h"
#include "engine_ctl.h"
#include "follow.h"
#include "format.h"
#include "gpu.h"
#include "image.h"
#include "late.h"
#include "store.h"
#include "util.h"
#include "weights.h"

#define PLUGIN_NAME "kvmotion"

/* CRIU's log levels (criu/include/log.h) and the functions CRIU exports. */
enum { KM_LOG_ERROR = 1, KM_LOG_WARN = 2, KM_LOG_INFO = 3, KM_LOG_DEBUG = 4 };
extern void print_on_level(unsigned int loglevel, const char *format, ...)
	__attribute__((format(printf, 2, 3)));
extern int add_inventory_plugin(const char *name) __attribute__((weak));
extern bool check_and_remove_inventory_plugin(const char *name, size_t n) __attribute__((weak));
extern void set_compel_interrupt_only_mode(void) __attribute__((weak));

extern cr_plugin_desc_t CR_PLUGIN_DESC __attribute__((visibility("default")));

#define pr_err(fmt, ...) print_on_level(KM_LOG_ERROR, PLUGIN_NAME ": " fmt "\n", ##__VA_ARGS__)
#define pr_warn(fmt, ...) print_on_level(KM_LOG_WARN, PLUGIN_NAME ": " fmt "\n", ##__VA_ARGS__)
#define pr_info(fmt, ...) print_on_level(KM_LOG_INFO, PLUGIN_NAME ": " fmt "\n", ##__VA_ARGS__)

#define MAX_PIDS 1024

static struct {
	int stage;
	struct km_config cfg;
	struct km_gpu *gpu;
	struct km_gpu_pair *pairs;
	size_t n_pairs;
	int image_dir; /* dup of CRIU's image directory fd */
	bool split_wanted;
	bool comm_selected; /* some task of the tree matches split_comm */
	bool leave_running;
	uint64_t rss_bytes; /* memory CRIU dumps of the tasks paused so far (smaps) */
	bool inventory_recorded;
	uint64_t saved_mask; /* the restore thread's signal mask while it runs */
	pid_t thread_stopped_by_us;
	struct km_engine_record *engines; /* dump: the engines quiesced so far */
	size_t n_engines;
	bool image_has_engines; /* restore: the image holds kvmotion.engines */
	struct km_late_plan *late; /* restore: weights to write in RESUME_DEVICES_LATE */
	struct km_store *late_store;
	struct km_follow *follow; /* dump: splitting while CRIU writes */
} km = { .image_dir = -1 };

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * --leave-running (-R) on CRIU's command line. Only a command line with the
 * "dump" command word can say no: a worker serving an RPC request (criu swrk
 * under runc and podman) has retitled itself ("criu: dump --rpc -t PID -D
 * DIR", or a truncated title when CRIU runs through a loader), and the
 * request's leave_running is not visible to plugins: that is unknown.
 */
static enum km_tristate cmdline_leave_running(void)
{
	char buf[8192];
	ssize_t n;
	_cleanup_close_ int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
	bool cli_dump = false;

	if (fd < 0)
		return KM_AUTO;
	n = km_read_full(fd, buf, sizeof(buf) - 1);
	if (n <= 0)
		return KM_AUTO;
	buf[n] = 0;
	for (char *p = buf; p < buf + n; p += strlen(p) + 1) {
		if (strcmp(p, "--leave-running") == 0 || strcmp(p, "-R") == 0)
			return KM_YES;
		if (strcmp(p, "dump") == 0 || strcmp(p, "pre-dump") == 0)
			cli_dump = true;
	}
	return cli_dump ? KM_NO : KM_AUTO;
}

/*
 * The driver's restore thread must run while the tree is ptrace-frozen
 * (during CHECKPOINT_DEVICES, RESUME_DEVICES_LATE and exit(DUMP)): let that
 * one thread go with every signal but SIGTRAP blocked and seccomp
 * suspension off, then stop it again and put its options and mask back,
 * as CRIU's own cuda_plugin does. The kernel's mask for PTRACE_*SIGMASK
 * is 8 bytes, not a glibc sigset_t.
 */
static int restore_thread_hook(void *userdata, pid_t pid, pid_t tid, bool start)
{
	int status;

	(void)userdata;
	(void)pid;
	if (start) {
		uint64_t run_mask = ~(1ull << (SIGTRAP - 1));

		km.thread_stopped_by_us = 0;
		if (ptrace(PTRACE_GETSIGMASK, tid, sizeof(km.saved_mask), &km.saved_mask) < 0) {
			if (errno == ESRCH)
				return 0; /* not frozen by CRIU (yet): it runs anyway */
			pr_err("ptrace(GETSIGMASK, %d): %s", tid, strerror(errno));
			return -errno;
		}
		if (ptrace(PTRACE_SETSIGMASK, tid, sizeof(run_mask), &run_mask) < 0 ||
		    ptrace(PTRACE_SETOPTIONS, tid, NULL, 0) < 0 ||
		    ptrace(PTRACE_CONT, tid, NULL, NULL) < 0) {
			pr_err("cannot let restore thread %d run: %s", tid, strerror(errno));
			return -errno;
		}
		km.thread_stopped_by_us = tid;
		return 0;
	}
	if (km.thread_stopped_by_us != tid)
		return 0;
	km.thread_stopped_by_us = 0;
	if (ptrace(PTRACE_INTERRUPT, tid, NULL, NULL) < 0) {
		pr_err("ptrace(INTERRUPT, %d): %s", tid, strerror(errno));
		return -errno;
	}
	/* Signals that arrive first are passed on until the interrupt's stop. */
	for (;;) {
		if (wait4(tid, &status, __WALL, NULL) < 0) {
			if (errno == EINTR)
				continue;
			pr_err("wait4(%d): %s", tid, strerror(errno));
			return -errno;
		}
		if (!WIFSTOPPED(status)) {
			pr_err("restore thread %d ended while the driver ran it", tid);
			return -ESRCH;
		}
		if ((status >> 16) == PTRACE_EVENT_STOP)
			break;
		if (ptrace(PTRACE_CONT, tid, NULL, (void *)(long)WSTOPSIG(status)) < 0) {
			pr_err("ptrace(CONT, %d): %s", tid, strerror(errno));
			return -errno;
		}
	}
	if (ptrace(PTRACE_SETOPTIONS, tid, NULL,
		   (void *)(long)(PTRACE_O_SUSPEND_SECCOMP | PTRACE_O_TRACESYSGOOD)) < 0 ||
	    ptrace(PTRACE_SETSIGMASK, tid, sizeof(km.saved_mask), &km.saved_mask) < 0) {
		pr_err("cannot put restore thread %d back: %s", tid, strerror(errno));
		return -errno;
	}
	return 0;
}

static void free_state(void)
{
	km_engine_records_free(km.engines, km.n_engines);
	km.engines = NULL;
	km.n_engines = 0;
	km_gpu_close(km.gpu);
	km.gpu = NULL;
	free(km.pairs);
	km.pairs = NULL;
	km.n_pairs = 0;
	km_late_plan_free(km.late);
	km.late = NULL;
	km_store_free(km.late_store);
	km.late_store = NULL;
	if (km.image_dir >= 0)
		close(km.image_dir);
	km.image_dir = -1;
}

static int open_gpu(void)
{
	struct km_error err = { { 0 } };
	int r;

	r = km_gpu_open(km.cfg.libcuda, &km.gpu, &err);
	if (r < 0) {
		pr_err("GPU driver %s: %s", km.cfg.libcuda, err.msg[0] ? err.msg : strerror(-r));
		return r;
	}
	if (!km_gpu_available(km.gpu)) {
		pr_info("no CUDA driver (%s): processes are handled as plain processes",
			km.cfg.libcuda);
		return 0;
	}
	km_gpu_set_thread_hook(km.gpu, restore_thread_hook, NULL);
	if (set_compel_interrupt_only_mode)
		set_compel_interrupt_only_mode();
	return 0;
}

/* A store we can write: created when split is forced on, else it must exist. */
static int probe_store(bool create)
{
	struct km_store *s = NULL;
	char probe[4200];
	int r, fd;

	r = km_store_open(km.cfg.store, create ? KM_STORE_CREATE : 0, &km.cfg.chunker, &s);
	if (r < 0)
		return r;
	km_store_free(s);
	/* An unwritable store must stop the dump now, before anything is frozen. */
	snprintf(probe, sizeof(probe), "%s/tmp/.probe-%d", km.cfg.store, (int)getpid());
	fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	close(fd);
	unlink(probe);
	return 0;
}

/* A restore without kvmotion must refuse this image rather than misread it. */
static int record_inventory(void)
{
	if (km.inventory_recorded || !add_inventory_plugin)
		return 0;
	if (add_inventory_plugin(PLUGIN_NAME) != 0) {
		pr_err("cannot record the plugin in the inventory");
		return -EIO;
	}
	km.inventory_recorded = true;
	return 0;
}

static struct km_split_opts split_opts(void)
{
	return (struct km_split_opts){
		.min_split_size = km.cfg.min_split_size,
		.threads = km.cfg.threads,
		.add_chunks = km.cfg.add_chunks,
		.sync = km.cfg.sync,
		.delta = { .level = km.cfg.delta_level, .threads = km.cfg.threads },
	};
}

/* Ends the follower; without a commit nothing of its split is left. */
static void drop_follower(void)
{
	km_follow_free(km.follow);
	km.follow = NULL;
}

/*
 * CRIU writes the pages with one core: the split of what it has written
 * runs meanwhile, so exit(DUMP) is left with the tail. Whether the image
 * is split at all is decided there, as without the follower.
 */
static void start_follower(void)
{
	struct km_split_opts o = split_opts();
	struct km_error err = { { 0 } };
	int r;

	r = km_follow_start(km.image_dir, km.cfg.store, km.cfg.sync ? 0 : KM_STORE_NOSYNC, &o,
			    &km.follow, &err);
	if (r < 0)
		pr_warn("cannot split while CRIU writes (%s): the image is split after the dump",
			err.msg[0] ? err.msg : strerror(-r));
}

static int init_dump(void)
{
	int r;

	/* No list: every tree, even where CRIU calls no PAUSE_DEVICES. */
	km.comm_selected = km.cfg.split_comm[0] == 0;
	km.leave_running = km.cfg.leave_running == KM_AUTO
				   ? cmdline_leave_running() != KM_NO
				   : km.cfg.leave_running == KM_YES;
	r = open_gpu();
	if (r < 0)
		return r;
	/*
	 * Seize task by task rather than freeze the cgroup first: a
	 * cooperative engine must still run when PAUSE_DEVICES asks it to
	 * quiesce (CRIU's cuda_plugin does the same for the driver's lock).
	 */
	if (set_compel_interrupt_only_mode)
		set_compel_interrupt_only_mode();
	if (km.cfg.split != KM_NO) {
		r = probe_store(km.cfg.split == KM_YES);
		if (r == 0) {
			km.split_wanted = true;
		} else if (km.cfg.split == KM_YES || r != -ENOENT) {
			pr_err("chunk store %s is not usable: %s; refusing to dump", km.cfg.store,
			       r == -EBADMSG ? "not a kvmotion store" : strerror(-r));
			return r;
		} else {
			pr_info("no chunk store at %s: images are not split", km.cfg.store);
		}
	}
	if (km.split_wanted) {
		r = record_inventory();
		if (r < 0)
			return r;
	}
	/* add_chunks hashes every chunk for the store: it splits after the dump. */
	if (km.split_wanted && km.cfg.split_follow && !km.cfg.add_chunks)
		start_follower();
	pr_info("dump: store %s, split %s%s, GPU %s, config %s", km.cfg.store,
		km.split_wanted ? "on" : "off", km.follow ? " (while CRIU writes)" : "",
		km_gpu_available(km.gpu) ? "checkpoint API" : "none", km.cfg.source);
	return 0;
}

/*
 * A cooperative engine's weights are not in the image: CRIU maps them again
 * from their files. Each must be there, with the bytes it was named after,
 * before any process exists (a .ok record spares re-reading it).
 */
static int check_engine_weights(void)
{
	struct km_engine_record *rec = NULL;
	struct km_error err = { { 0 } };
	size_t n = 0;
	double t0 = now_s();
	uint64_t hashed = 0, files = 0;
	int r;

	r = km_engine_records_read(km.image_dir, &rec, &n, &err);
	if (r == -ENOENT)
		return 0;
	if (r < 0) {
		pr_err("%s: %s; refusing to restore", KM_ENGINES_NAME,
		       err.msg[0] ? err.msg : strerror(-r));
		return r;
	}
	km.image_has_engines = true;
	for (size_t i = 0; i < n && r == 0; i++)
		for (size_t j = 0; j < rec[i].n_weights && r == 0; j++) {
			const struct km_engine_weights *w = &rec[i].weights[j];
			uint64_t h = 0;

			r = km_weights_check(w->path, &w->id, w->size, &h, &err);
			if (r < 0)
				pr_err("weights file of the engine in pid %d: %s; refusing to restore",
				       (int)rec[i].pid, err.msg[0] ? err.msg : strerror(-r));
			hashed += h;
			files++;
		}
	km_engine_records_free(rec, n);
	if (r == 0)
		pr_info("%llu weights files present and verified in %.3f s (%llu bytes re-hashed)",
			(unsigned long long)files, now_s() - t0, (unsigned long long)hashed);
	return r;
}

static int init_restore(void)
{
	struct km_join_opts jo = { .threads = km.cfg.threads, .sync = km.cfg.sync,
				   .late = km.cfg.late_weights ? &km.late : NULL };
	struct km_join_stats st;
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	double t0;
	int r;

	/* A dump that used kvmotion: the tree may hold CUDA processes whose
	 * restore thread must run inside the frozen tree. */
	if (check_and_remove_inventory_plugin &&
	    check_and_remove_inventory_plugin(PLUGIN_NAME, strlen(PLUGIN_NAME)) &&
	    set_compel_interrupt_only_mode)
		set_compel_interrupt_only_mode();
	/* The driver is opened at the first RESUME_DEVICES_LATE: not before CRIU forks. */
	if (km.cfg.gpu_map[0]) {
		r = km_gpu_parse_map(km.cfg.gpu_map, &km.pairs, &km.n_pairs, &err);
		if (r < 0) {
			pr_err("gpu_map: %s", err.msg);
			return r;
		}
	}
	r = check_engine_weights();
	if (r < 0)
		return r;
	r = km_image_is_split(km.image_dir);
	if (r <= 0) {
		if (r < 0)
			pr_err("image directory: %s", strerror(-r));
		return r;
	}
	r = km_store_open(km.cfg.store, km.cfg.sync ? 0 : KM_STORE_NOSYNC, NULL, &s);
	if (r < 0) {
		pr_err("split image, but chunk store %s cannot be opened: %s; refusing to restore",
		       km.cfg.store, r == -EBADMSG ? "not a kvmotion store" : strerror(-r));
		return r;
	}
	t0 = now_s();
	r = km_image_join(km.image_dir, s, &jo, &st, &err);
	if (r < 0) {
		km_store_free(s);
		pr_err("join failed, refusing to restore: %s", err.msg[0] ? err.msg : strerror(-r));
		return r;
	}
	pr_info("joined %llu files (%llu bytes: %llu from the store, %llu from the delta; "
		"chunks: %llu vouched for by the store's record, %llu hashed) in %.3f s",
		(unsigned long long)st.files_joined, (unsigned long long)st.bytes_written,
		(unsigned long long)st.bytes_from_store - st.bytes_late,
		(unsigned long long)st.bytes_from_delta, (unsigned long long)st.chunks_recorded,
		(unsigned long long)st.chunks_hashed, now_s() - t0);
	if (km.late) {
		/* The fill reads the same store after CRIU's restore. */
		km.late_store = s;
		pr_info("late weights: %llu bytes of %zu processes left out of the pages files, "
			"written into the processes before they run",
			(unsigned long long)st.bytes_late, km.late->n);
	} else {
		km_store_free(s);
	}
	return 0;
}

/*
 * Before the task's GPU state (the weights may be part of it) and before it
 * runs. A failure kills the task so that CRIU fails the restore, as for the
 * GPU below: it must not run without its weights.
 */
static int write_late_weights(pid_t pid)
{
	struct km_error err = { { 0 } };
	struct km_late_task *t;
	pid_t image_pid = pid;
	double t0 = now_s();
	int r;

	if (!km.late)
		return 0;
	r = km_late_ns_pid(pid, &image_pid);
	if (r < 0) {
		pr_err("late weights: pid %d: %s; killing the task so that the restore fails", pid,
		       strerror(-r));
		kill(pid, SIGKILL);
		return r;
	}
	t = km_late_plan_task(km.late, image_pid);
	if (!t)
		return 0;
	r = km_late_fill(km.late_store, t, pid, km.cfg.threads, &err);
	if (r < 0) {
		pr_err("late weights: %s; killing the task so that the restore fails",
		       err.msg[0] ? err.msg : strerror(-r));
		kill(pid, SIGKILL);
		return r;
	}
	t->filled = true;
	pr_info("late weights: %llu bytes written into pid %d (%d in the image) in %.3f s",
		(unsigned long long)t->bytes, pid, image_pid, now_s() - t0);
	return 0;
}

/* The image directory goes back to the split image it was before the restore. */
static void late_weights_done(int ret)
{
	struct km_error err = { { 0 } };

	for (size_t i = 0; ret == 0 && i < km.late->n; i++)
		if (!km.late->tasks[i].filled)
			pr_err("late weights: no restored task took the %llu bytes of pid %d",
			       (unsigned long long)km.late->tasks[i].bytes, km.late->tasks[i].pid);
	if (km_image_late_undo(km.image_dir, &err) < 0)
		pr_err("late weights: the image directory is left joined for them (the next "
		       "restore with kvmotion puts it back): %s", err.msg);
	else
		pr_info("late weights: image directory back to its split image");
}

static int kvmotion_init(int stage)
{
	struct km_error err = { { 0 } };
	int r;

	km.stage = stage;
	if (stage == CR_PLUGIN_STAGE__PRE_DUMP)
		return 0; /* pre-dump never reaches exit: nothing to do */
	km_config_init(&km.cfg);
	r = km_config_load(&km.cfg, NULL, &err);
	if (r < 0) {
		pr_err("%s", err.msg);
		return -1;
	}
	km.image_dir = dup(criu_get_image_dir());
	if (km.image_dir < 0) {
		pr_err("cannot use the image directory: %s", strerror(errno));
		return -1;
	}
	r = stage == CR_PLUGIN_STAGE__DUMP ? init_dump() : init_restore();
	if (r < 0) {
		free_state();
		return -1;
	}
	return 0;
}

/*
 * The follower's split, finished and committed: true when that is done
 * with, logged (committed, or failed where a split from scratch fails
 * too); false when the follower failed for its own reasons (its thread
 * failed, or a file changed under it): then the image is as CRIU wrote it
 * and is split from scratch.
 */
static bool commit_follower(double t0)
{
	struct km_follow_stats fs = { 0 };
	struct km_split_stats st;
	struct km_error err = { { 0 } };
	int r;

	r = km_follow_stop(km.follow, &fs, &err);
	if (r < 0) {
		pr_warn("split while CRIU wrote failed (%s); splitting the complete image",
			err.msg[0] ? err.msg : strerror(-r));
		return false;
	}
	r = km_follow_commit(km.follow, &st, &err);
	if (r == -ESTALE) {
		pr_warn("split while CRIU wrote: %s; splitting the complete image",
			err.msg[0] ? err.msg : strerror(-r));
		return false;
	}
	if (r < 0) {
		/* The split never removes a file before its replacement is complete. */
		pr_err("split failed, image left as CRIU wrote it: %s",
		       err.msg[0] ? err.msg : strerror(-r));
		return true;
	}
	pr_info("split %llu files in %.3f s after the dump (%llu bytes of %llu pages images split "
		"while CRIU wrote them): %llu bytes referenced in the store, %llu zero, %llu to the "
		"delta (%llu compressed)",
		(unsigned long long)st.files_split, now_s() - t0,
		(unsigned long long)fs.bytes_followed, (unsigned long long)fs.files,
		(unsigned long long)st.bytes_referenced, (unsigned long long)st.bytes_zero,
		(unsigned long long)st.bytes_delta, (unsigned long long)st.delta_file_size);
	return true;
}

static void split_image(void)
{
	struct km_split_opts o = split_opts();
	struct km_criu_pages_info info;
	struct km_split_stats st;
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	bool local = false;
	double t0 = now_s();
	int r;

	r = km_criu_pages_local(km.image_dir, &local, &info, &err);
	if (r < 0 || !local) {
		pr_warn("split skipped, image left as CRIU wrote it: %s",
			err.msg[0] ? err.msg : strerror(-r));
		return;
	}
	if (km.follow && commit_follower(t0))
		return;
	/* Its temporary files go before a split from scratch makes its own. */
	drop_follower();
	r = km_store_open(km.cfg.store, km.cfg.sync ? 0 : KM_STORE_NOSYNC, NULL, &s);
	if (r == 0)
		r = km_image_split(km.image_dir, s, &o, &st, &err);
	km_store_free(s);
	if (r < 0) {
		/* The split never removes a file before its replacement is complete. */
		pr_err("split failed, image left as CRIU wrote it: %s",
		       err.msg[0] ? err.msg : strerror(-r));
		return;
	}
	pr_info("split %llu files in %.3f s: %llu bytes referenced in the store, %llu zero, "
		"%llu to the delta (%llu compressed), %llu added to the store",
		(unsigned long long)st.files_split, now_s() - t0,
		(unsigned long long)st.bytes_referenced, (unsigned long long)st.bytes_zero,
		(unsigned long long)st.bytes_delta, (unsigned long long)st.delta_file_size,
		(unsigned long long)st.bytes_added);
}

/* Before the split: kvmotion.engines is a small file the split keeps as is. */
static void record_engines(void)
{
	int r = km_engine_records_write(km.image_dir, km.engines, km.n_engines, km.cfg.sync);

	if (r < 0)
		pr_err("cannot write %s: %s; a restore will not check the weights files first",
		       KM_ENGINES_NAME, strerror(-r));
}

/*
 * The tasks are still frozen here: the request waits in the engine's socket
 * and is carried out as soon as CRIU lets the task go (the engine resumes
 * whether or not it can answer).
 */
static void resume_engines(bool restored)
{
	for (size_t i = 0; i < km.n_engines; i++) {
		struct km_error err = { { 0 } };
		int r = km_engine_resume_queued(km.engines[i].pid, restored, &err);

		if (r < 0)
			pr_err("cannot tell the engine in pid %d to resume: %s", km.engines[i].pid,
			       err.msg[0] ? err.msg : strerror(-r));
		else
			pr_info("engine in pid %d told to resume", km.engines[i].pid);
	}
}

/*
 * After a restore the tasks run (criu restore -d: exit(RESTORE) comes after
 * CRIU let them go): each engine told to resume must have done so. Without
 * -d, CRIU calls exit only once the root task has ended: nothing to check.
 */
static void confirm_engines(void)
{
	for (size_t i = 0; i < km.n_engines; i++) {
		struct km_engine_status st = { 0 };
		struct km_error err = { { 0 } };
		double until = now_s() + km.cfg.quiesce_timeout_ms / 1e3;
		int r;

		do {
			r = km_engine_status(km.engines[i].pid, km.cfg.quiesce_timeout_ms, &st, &err);
			if (r < 0 || !st.quiesced)
				break;
			usleep(2000);
		} while (now_s() < until);
		if (r == -ESRCH)
			continue;
		if (r < 0)
			pr_err("engine in pid %d after the restore: %s", km.engines[i].pid,
			       err.msg[0] ? err.msg : strerror(-r));
		else if (st.quiesced)
			pr_err("engine in pid %d is still quiesced %u ms after the restore",
			       km.engines[i].pid, km.cfg.quiesce_timeout_ms);
		else
			pr_info("engine in pid %d resumed after the restore", km.engines[i].pid);
	}
}

static void kvmotion_exit(int stage, int ret)
{
	struct km_error err = { { 0 } };

	if (stage == CR_PLUGIN_STAGE__DUMP && km.gpu) {
		/* First give the source its GPU back when it lives on. */
		if (km_gpu_dump_done(km.gpu, ret == 0, km.leave_running, &err) < 0)
			pr_err("GPU after dump: %s", err.msg);
		if (ret == 0 && km.n_engines)
			record_engines();
		if (ret == 0 && km.split_wanted && km.n_engines && !km.cfg.split_engines)
			pr_info("split skipped: the weights of the cooperative engines are not in the "
				"image (split_engines=yes splits it anyway)");
		else if (ret == 0 && km.split_wanted && km.comm_selected)
			split_image();
		else if (ret == 0 && km.split_wanted)
			pr_info("split skipped: no task matches split_comm '%s'", km.cfg.split_comm);
		if (ret != 0 || km.leave_running)
			resume_engines(false);
	}
	/* Committed, or dropped: a skipped or failed dump leaves the image as CRIU wrote it. */
	if (stage == CR_PLUGIN_STAGE__DUMP)
		drop_follower();
	if (stage == CR_PLUGIN_STAGE__RESTORE && ret == 0)
		confirm_engines();
	if (stage == CR_PLUGIN_STAGE__RESTORE && km.late)
		late_weights_done(ret);
	free_state();
}

CR_PLUGIN_REGISTER(PLUGIN_NAME, kvmotion_init, kvmotion_exit)

static bool task_comm_selected(pid_t pid)
{
	char path[64], comm[64] = "";
	ssize_t n;
	_cleanup_close_ int fd = -1;

	snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return km_config_wants_comm(&km.cfg, "");
	n = km_read_full(fd, comm, sizeof(comm) - 1);
	if (n > 0 && comm[n - 1] == '\n')
		n--;
	comm[n > 0 ? n : 0] = 0;
	return km_config_wants_comm(&km.cfg, comm);
}

/*
 * The split needs room beside CRIU's images for its delta, up to the size
 * of the pages in the worst case. A full disk found now fails the dump
 * while the tasks still run; found in exit(DUMP), it could only leave the
 * image unsplit (complete, but a failure nonetheless).
 */
static int check_space(pid_t pid)
{
	struct statvfs sv;
	uint64_t avail, need, bytes = 0;

	/* not the mapped weights file of a cooperative engine: CRIU leaves it */
	if (km_task_dumped_bytes(pid, &bytes) < 0)
		bytes = 0;
	km.rss_bytes += bytes;
	if (fstatvfs(km.image_dir, &sv) < 0)
		return 0;
	avail = (uint64_t)sv.f_bavail * sv.f_frsize;
	need = 2 * km.rss_bytes + (16u << 20);
	if (avail >= need)
		return 0;
	pr_err("not enough space in the image directory: %llu bytes free, the dump and its split "
	       "may need %llu (twice the tasks' memory that CRIU dumps); refusing to dump",
	       (unsigned long long)avail, (unsigned long long)need);
	return -ENOSPC;
}

/* A cooperative engine in pid finishes its step and releases what it can. */
static int quiesce_engine(pid_t pid)
{
	struct km_engine_quiesced q = { 0 };
	struct km_engine_record *grown;
	struct km_error err = { { 0 } };
	double t0 = now_s();
	int r;

	r = km_engine_probe(pid);
	if (r <= 0) {
		if (r < 0)
			pr_warn("pid %d: cannot tell whether it runs a cooperative engine: %s", pid,
				strerror(-r));
		return 0;
	}
	grown = realloc(km.engines, (km.n_engines + 1) * sizeof(*grown));
	if (!grown)
		return -ENOMEM;
	km.engines = grown;
	r = km_engine_quiesce(pid, km.cfg.quiesce_timeout_ms, &q, &err);
	if (r < 0) {
		struct km_error rerr = { { 0 } };

		pr_err("engine in pid %d: %s; refusing to dump (the engine goes on serving)", pid,
		       err.msg[0] ? err.msg : strerror(-r));
		/* whatever state the failure left it in: a resume is harmless */
		if (km_engine_resume_queued(pid, false, &rerr) < 0)
			pr_warn("%s", rerr.msg);
		return r;
	}
	/* the record takes the weights array over */
	km.engines[km.n_engines++] = (struct km_engine_record){ .pid = pid,
								 .weights = q.weights,
								 .n_weights = q.n_weights };
	pr_info("engine in pid %d quiesced in %.3f s: %zu weights files, %u free KV blocks "
		"(%llu bytes) released",
		pid, now_s() - t0, q.n_weights, q.free_blocks,
		(unsigned long long)q.released_bytes);
	q.weights = NULL;
	q.n_weights = 0;
	km_engine_quiesced_clear(&q);
	return 0;
}

static int kvmotion_pause_devices(int pid)
{
	struct km_error err = { { 0 } };
	bool is_cuda = false;
	int r;

	if (km.stage != CR_PLUGIN_STAGE__DUMP)
		return 0;
	if (task_comm_selected(pid))
		km.comm_selected = true;
	if (km.split_wanted) {
		r = check_space(pid);
		if (r < 0)
			return r;
	}
	/* The engine releases its device memory before the GPU is locked. */
	r = quiesce_engine(pid);
	if (r < 0)
		return r;
	if (!km.gpu)
		return 0;
	if (km_gpu_available(km.gpu)) {
		enum km_gpu_state state = KM_GPU_NONE;

		if (km_gpu_get_state(km.gpu, pid, &state, &err) == 0 && state != KM_GPU_NONE) {
			r = record_inventory();
			if (r < 0)
				return r;
		}
	}
	r = km_gpu_pause(km.gpu, pid, km.cfg.lock_timeout_ms, &is_cuda, &err);
	if (r < 0) {
		pr_err("pause %d: %s", pid, err.msg);
		return r;
	}
	if (is_cuda)
		pr_info("locked CUDA process %d", pid);
	return 0;
}
CR_PLUGIN_REGISTER_HOOK(CR_PLUGIN_HOOK__PAUSE_DEVICES, kvmotion_pause_devices)

static int kvmotion_checkpoint_devices(int pid)
{
	struct km_error err = { { 0 } };
	double t0 = now_s();
	int r;

	if (!km.gpu)
		return 0;
	r = km_gpu_checkpoint(km.gpu, pid, &err);
	if (r < 0) {
		pr_err("checkpoint %d: %s", pid, err.msg);
		return r;
	}
	if (km_gpu_available(km.gpu))
		pr_info("GPU state of %d checkpointed in %.3f s", pid, now_s() - t0);
	return 0;
}
CR_PLUGIN_REGISTER_HOOK(CR_PLUGIN_HOOK__CHECKPOINT_DEVICES, kvmotion_checkpoint_devices)

static int remember_restored_engine(pid_t pid)
{
	struct km_engine_record *grown = realloc(km.engines, (km.n_engines + 1) * sizeof(*grown));

	if (!grown)
		return -ENOMEM;
	km.engines = grown;
	km.engines[km.n_engines++] = (struct km_engine_record){ .pid = pid };
	return 0;
}

static int kvmotion_resume_devices_late(int pid)
{
	struct km_error err = { { 0 } };
	double t0 = now_s();
	int r;

	r = write_late_weights(pid);
	if (r < 0)
		return r;
	t0 = now_s();
	if (!km.gpu) {
		r = open_gpu();
		if (r < 0)
			return r;
	}
	r = km_gpu_resume(km.gpu, pid, km.pairs, km.n_pairs, &err);
	if (r < 0) {
		/*
		 * CRIU 4.1 only logs a failed RESUME_DEVICES_LATE and resumes
		 * the task, which would then run without its GPU memory. Kill
		 * it instead: CRIU then fails the restore, and the image is
		 * still there to retry (on another GPU, say).
		 */
		pr_err("resume %d: %s; killing the task so that the restore fails", pid, err.msg);
		kill(pid, SIGKILL);
		return r;
	}
	if (km_gpu_available(km.gpu))
		pr_info("GPU state of %d resumed in %.3f s", pid, now_s() - t0);
	if (km.image_has_engines && km_engine_probe(pid) == 1) {
		/* The task is still stopped: the engine acts when CRIU lets it go. */
		r = km_engine_resume_queued(pid, true, &err);
		if (r == 0)
			r = remember_restored_engine(pid);
		if (r < 0) {
			pr_err("engine in pid %d: %s; killing the task so that the restore fails",
			       pid, err.msg[0] ? err.msg : strerror(-r));
			kill(pid, SIGKILL);
			return r;
		}
		pr_info("engine in pid %d told to resume after the restore", pid);
	}
	return 0;
}
CR_PLUGIN_REGISTER_HOOK(CR_PLUGIN_HOOK__RESUME_DEVICES_LATE, kvmotion_resume_devices_late)
