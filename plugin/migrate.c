/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Live migration: pre-copy, stop, and the way back on failure (migrate.h).
 * The library never prints: progress goes through opts->progress, the
 * outcome through the report and err.
 */
#include "migrate.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "engine_ctl.h"
#include "format.h"
#include "gpu.h"
#include "image.h"
#include "incr.h"
#include "livesnap.h"
#include "pagesrv.h"
#include "store.h"
#include "weights.h"

#define MAX_TREE     4096
#define INDEX_SUFFIX ".kmidx"

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

const char *km_migrate_phase_name(enum km_migrate_phase p)
{
	switch (p) {
	case KM_MIGRATE_PRECOPY:
		return "pre-copy";
	case KM_MIGRATE_DUMP:
		return "dump";
	case KM_MIGRATE_SEND:
		return "send";
	case KM_MIGRATE_RESUME:
		return "resume";
	case KM_MIGRATE_DONE:
		return "done";
	}
	return "unknown";
}

static void progress(const struct km_migrate_opts *o, enum km_migrate_phase p,
		     const struct km_migrate_report *r)
{
	if (o->progress)
		o->progress(o->userdata, p, r);
}

/* --- the process tree ------------------------------------------------------ */

/* pid and its descendants (through every thread's children list), pid first. */
static size_t tree_pids(pid_t pid, pid_t *out, size_t max)
{
	size_t n = 0;

	out[n++] = pid;
	for (size_t i = 0; i < n && n < max; i++)
		n += km_proc_children(out[i], out + n, max - n);
	return n;
}

static void signal_tree(const pid_t *pids, size_t n, int sig)
{
	/* children first for SIGKILL so that none is re-parented while running */
	for (size_t i = n; i-- > 0;)
		kill(pids[i], sig);
}

/* --- weights ---------------------------------------------------------------- */

struct find_index {
	struct km_store *s;
	struct km_hash id;
	char name[256];
	bool found;
};

static int find_index_fn(const char *root, void *userdata)
{
	struct find_index *f = userdata;
	_cleanup_free_ void *buf = NULL;
	struct km_weights_index *idx = NULL;
	struct km_error err = { { 0 } };
	size_t n, len = strlen(root), sl = strlen(INDEX_SUFFIX);

	if (f->found || len <= sl || strcmp(root + len - sl, INDEX_SUFFIX) != 0)
		return 0;
	if (km_store_root_read(f->s, "indexes", root, &buf, &n) < 0)
		return 0;
	if (km_weights_index_decode(buf, n, &idx, &err) < 0)
		return 0; /* a foreign root is not ours to judge here */
	if (memcmp(&idx->weights_id, &f->id, sizeof(f->id)) == 0 && len - sl < sizeof(f->name)) {
		memcpy(f->name, root, len - sl);
		f->name[len - sl] = 0;
		f->found = true;
	}
	km_weights_index_free(idx);
	return 0;
}

/*
 * The weights files pid maps that live in weights_dir, each turned into the
 * name of the store's index that records its id.
 */
static int mapped_weights(pid_t pid, struct km_store *s, const char *weights_dir,
			  struct km_migrate_report *r, struct km_error *err)
{
	char path[64], line[4096 + 256], wdir[PATH_MAX];
	struct km_hash ids[KM_MIGRATE_MAX_WEIGHTS];
	size_t n_ids = 0;
	_cleanup_fclose_ FILE *f = NULL;

	if (!realpath(weights_dir, wdir))
		return 0; /* no weights dir: nothing can be mapped from it */
	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "re");
	if (!f) {
		km_error_set(err, "cannot read %s: %s", path, strerror(errno));
		return -errno;
	}
	while (fgets(line, sizeof(line), f)) {
		char *file = strchr(line, '/'), *slash, dir[PATH_MAX];
		struct km_hash id;
		size_t i;

		if (!file)
			continue;
		file[strcspn(file, "\n")] = 0;
		if (km_weights_id_from_path(file, &id) < 0)
			continue;
		slash = strrchr(file, '/');
		*slash = 0;
		if (!realpath(file[0] ? file : "/", dir) || strcmp(dir, wdir) != 0)
			continue;
		for (i = 0; i < n_ids; i++)
			if (memcmp(&ids[i], &id, sizeof(id)) == 0)
				break;
		if (i < n_ids)
			continue;
		if (n_ids == KM_MIGRATE_MAX_WEIGHTS) {
			km_error_set(err, "pid %d maps more than %d weights files", (int)pid,
				     KM_MIGRATE_MAX_WEIGHTS);
			return -E2BIG;
		}
		ids[n_ids++] = id;
	}
	for (size_t i = 0; i < n_ids; i++) {
		struct find_index fi = { .s = s, .id = ids[i] };
		char hex[KM_HASH_HEX_SIZE];
		int q = km_store_root_foreach(s, "indexes", find_index_fn, &fi);

		if (q < 0 && q != -ENOENT) {
			km_error_set(err, "cannot list the indexes of store %s: %s",
				     km_store_path(s), strerror(-q));
			return q;
		}
		if (!fi.found) {
			km_error_set(err,
				     "pid %d maps weights file %s/%s%s, but no index of store %s "
				     "records it (pass --weights INDEX)",
				     (int)pid, wdir, km_hash_to_hex(&ids[i], hex),
				     KM_WEIGHTS_SUFFIX, km_store_path(s));
			return -ENOENT;
		}
		snprintf(r->weights_from[r->n_weights], sizeof(r->weights_from[0]), "mapped");
		snprintf(r->weights_index[r->n_weights++], sizeof(r->weights_index[0]), "%s",
			 fi.name);
	}
	return 0;
}

static void add_stats(struct km_send_stats *a, const struct km_send_stats *b)
{
	a->chunks += b->chunks;
	a->chunks_sent += b->chunks_sent;
	a->chunks_deduplicated += b->chunks_deduplicated;
	a->chunks_compressed += b->chunks_compressed;
	a->bytes += b->bytes;
	a->bytes_sent += b->bytes_sent;
	a->bytes_deduplicated += b->bytes_deduplicated;
	a->files += b->files;
	a->file_bytes += b->file_bytes;
	a->pieces_compressed += b->pieces_compressed;
	a->wire_bytes += b->wire_bytes;
	a->query_ns += b->query_ns;
	a->chunks_ns += b->chunks_ns;
	a->index_ns += b->index_ns;
	a->files_ns += b->files_ns;
	a->commit_ns += b->commit_ns;
	a->total_ns += b->total_ns;
	a->target_store_ns += b->target_store_ns;
}

/* --- weights from open model files and from a snapshot ----------------------- */

static bool has_suffix(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);

	return n >= k && strcmp(s + n - k, suffix) == 0;
}

static bool index_exists(struct km_store *s, const char *name)
{
	_cleanup_free_ void *buf = NULL;
	char root[300];
	size_t n;

	snprintf(root, sizeof(root), "%s%s", name, INDEX_SUFFIX);
	return km_store_root_read(s, "indexes", root, &buf, &n) == 0;
}

/*
 * Seeds model file 'path' (as pid sees it) into the store as a weights index
 * named after the file's identity (base name, inode, size, mtime), unless
 * an index of that name exists already: a file that did not change is
 * chunked once, not at every migration.
 */
static int seed_model_file(struct km_store *s, const char *path, const struct stat *st,
			   struct km_migrate_report *r, struct km_error *err)
{
	const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
	char name[256], clean[81];
	struct km_seed_stats ss;
	size_t i;
	int q;

	for (i = 0; base[i] && i < sizeof(clean) - 1; i++)
		clean[i] =
			(base[i] == '.' || base[i] == '-' || base[i] == '_' ||
			 (base[i] >= '0' && base[i] <= '9') || (base[i] >= 'a' && base[i] <= 'z') ||
			 (base[i] >= 'A' && base[i] <= 'Z')) ?
				base[i] :
				'_';
	clean[i] = 0;
	snprintf(name, sizeof(name), "open-%s-%llx-%llx-%llx", clean,
		 (unsigned long long)st->st_ino, (unsigned long long)st->st_size,
		 (unsigned long long)st->st_mtim.tv_sec);
	for (i = 0; i < r->n_weights; i++)
		if (strcmp(r->weights_index[i], name) == 0)
			return 0;
	if (r->n_weights == KM_MIGRATE_MAX_WEIGHTS) {
		km_error_set(err, "more than %d model files", KM_MIGRATE_MAX_WEIGHTS);
		return -E2BIG;
	}
	if (!index_exists(s, name)) {
		const char *paths[1] = { path };

		q = km_seed(s, name, paths, 1, 0, &ss, err);
		if (q < 0) {
			km_error_prefix(err, "seeding model file %s", path);
			return q;
		}
		r->bytes_seeded += ss.bytes;
	}
	snprintf(r->weights_from[r->n_weights], sizeof(r->weights_from[0]), "open");
	snprintf(r->weights_index[r->n_weights++], sizeof(r->weights_index[0]), "%s", name);
	return 0;
}

/* Model files (*.safetensors) pid has open (/proc/PID/fd) or mapped (/proc/PID/maps). */
static int open_model_files(pid_t pid, struct km_store *s, struct km_migrate_report *r,
			    struct km_error *err)
{
	char dir[64], line[4096 + 256];
	_cleanup_fclose_ FILE *f = NULL;
	DIR *d;
	struct dirent *de;
	int q = 0;

	snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
	d = opendir(dir);
	while (d && q == 0 && (de = readdir(d))) {
		char link[sizeof(dir) + 300], path[PATH_MAX];
		struct stat st;
		ssize_t n;

		if (de->d_name[0] == '.')
			continue;
		snprintf(link, sizeof(link), "%s/%s", dir, de->d_name);
		n = readlink(link, path, sizeof(path) - 1);
		if (n <= 0)
			continue;
		path[n] = 0;
		/* stat through the link: the file the process holds, even if renamed */
		if (path[0] != '/' || !has_suffix(path, ".safetensors") || stat(link, &st) < 0 ||
		    !S_ISREG(st.st_mode))
			continue;
		q = seed_model_file(s, path, &st, r, err);
	}
	if (d)
		closedir(d);
	if (q < 0)
		return q;
	snprintf(dir, sizeof(dir), "/proc/%d/maps", (int)pid);
	f = fopen(dir, "re");
	while (f && q == 0 && fgets(line, sizeof(line), f)) {
		char *path = strchr(line, '/');
		struct stat st;

		if (!path)
			continue;
		path[strcspn(path, "\n")] = 0;
		if (!has_suffix(path, ".safetensors") || stat(path, &st) < 0 ||
		    !S_ISREG(st.st_mode))
			continue;
		q = seed_model_file(s, path, &st, r, err);
	}
	return q;
}

static int run_dump(const struct km_migrate_opts *o, const char *img, bool snap, bool split,
		    bool split_engines, int ps_fd, struct km_error *err);
static uint64_t dir_bytes(const char *dir);

/*
 * The tree's memory into dir (dfd), which must be empty: read live by
 * km_live_snapshot (nothing stopped) or, with opts->snapshot_criu, by criu
 * dump --leave-running (the tree frozen for the dump). Sets the report's
 * snapshot_mode and snapshot_ns. A live snapshot that fails leaves dir
 * empty.
 */
static int take_snapshot(const struct km_migrate_opts *o, const char *dir, int dfd,
			 struct km_migrate_report *r, struct km_error *err)
{
	char **names = NULL;
	size_t n_names = 0;
	uint64_t t;
	int q;

	q = km_list_files_at(dfd, NULL, &names, &n_names);
	if (q < 0) {
		km_error_set(err, "snapshot %s: %s", dir, strerror(-q));
		return q;
	}
	km_free_names(names, n_names);
	names = NULL;
	if (n_names) {
		/* pages of another process or time would be taken for this one's */
		km_error_set(err, "snapshot directory %s is not empty", dir);
		return -EEXIST;
	}
	t = now_ns();
	if (o->snapshot_criu) {
		snprintf(r->snapshot_mode, sizeof(r->snapshot_mode), "criu");
		q = run_dump(o, dir, true, false, false, -1, err);
		if (q < 0) {
			km_error_prefix(err, "snapshot (criu dump --leave-running, log %s/dump.log)",
					dir);
			return q;
		}
	} else {
		struct km_live_snapshot_stats ls;

		snprintf(r->snapshot_mode, sizeof(r->snapshot_mode), "live");
		q = km_live_snapshot(o->pid, dfd, &ls, err);
		if (q < 0) {
			km_error_prefix(err, "live snapshot of pid %d into %s", (int)o->pid, dir);
			/* what it wrote is of no use, and would block the next try */
			if (km_list_files_at(dfd, NULL, &names, &n_names) == 0) {
				for (size_t i = 0; i < n_names; i++)
					(void)unlinkat(dfd, names[i], 0);
				km_free_names(names, n_names);
			}
			return q;
		}
	}
	r->snapshot_ns = now_ns() - t;
	return 0;
}

/*
 * The tree's memory as it is now, into WORK/snapshot (which must be empty
 * or absent): read live by km_live_snapshot (the default: nothing is
 * stopped) or, with opts->snapshot_criu, by criu dump --leave-running (the
 * tree frozen for the dump). Its pages files are seeded into the store as a
 * weights index "snapshot-PID-TIME" (so that the stop's split finds their
 * chunks, as it finds a model's) and the index is sent ahead like any
 * other: the stop then carries what changed since.
 *
 * For the incremental stop: with opts->snapshot_keep, WORK/snapshot keeps
 * its files after this, as CRIU names them: pagemap-<vpid>.img and
 * pages-<N>.img per process of the tree (livesnap.h; with the CRIU
 * snapshot also CRIU's other images and dump.log), usable as a parent
 * image. The live snapshot's pages were read while the tree ran: any may
 * be torn or stale, so a stop that uses them must compare each page (a
 * wrong one then only costs its bytes). Without snapshot_keep the
 * directory is removed.
 */
static int snapshot(const struct km_migrate_opts *o, struct km_store *s,
		    struct km_migrate_report *r, struct km_error *err)
{
	char dir[4200], name[256];
	_cleanup_close_ int dfd = -1;
	char **names = NULL;
	const char **paths = NULL;
	size_t n_names = 0, n = 0;
	struct km_seed_stats ss;
	int q;

	if (r->n_weights == KM_MIGRATE_MAX_WEIGHTS) {
		km_error_set(err, "no room for the snapshot's index");
		return -E2BIG;
	}
	snprintf(dir, sizeof(dir), "%s/snapshot", o->work);
	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		km_error_set(err, "cannot create %s: %s", dir, strerror(errno));
		return -errno;
	}
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		km_error_set(err, "snapshot %s: %s", dir, strerror(errno));
		return -errno;
	}
	q = take_snapshot(o, dir, dfd, r, err);
	if (q < 0) {
		(void)rmdir(dir);
		return q;
	}
	q = km_list_files_at(dfd, NULL, &names, &n_names);
	if (q < 0) {
		km_error_set(err, "snapshot %s: %s", dir, strerror(-q));
		return q;
	}
	paths = calloc(n_names ? n_names : 1, sizeof(*paths));
	for (size_t i = 0; paths && i < n_names; i++)
		if (strncmp(names[i], "pages-", 6) == 0 && has_suffix(names[i], ".img")) {
			char *p = malloc(strlen(dir) + strlen(names[i]) + 2);

			if (!p)
				break;
			sprintf(p, "%s/%s", dir, names[i]);
			paths[n++] = p;
		}
	for (size_t i = 0; i < n; i++) {
		struct stat st;

		if (stat(paths[i], &st) == 0)
			r->snapshot_bytes += (uint64_t)st.st_size;
	}
	if (!paths) {
		q = -ENOMEM;
	} else if (n == 0) {
		km_error_set(err, "snapshot %s holds no pages files", dir);
		q = -ENOENT;
	} else {
		snprintf(name, sizeof(name), "snapshot-%d-%lld", (int)o->pid,
			 (long long)time(NULL));
		q = km_seed(s, name, paths, n, 0, &ss, err);
		if (q < 0) {
			km_error_prefix(err, "seeding the snapshot");
		} else {
			r->bytes_seeded += ss.bytes;
			snprintf(r->weights_from[r->n_weights], sizeof(r->weights_from[0]),
				 "snapshot");
			snprintf(r->weights_index[r->n_weights++], sizeof(r->weights_index[0]),
				 "%s", name);
		}
	}
	for (size_t i = 0; paths && i < n; i++)
		free((void *)paths[i]);
	free(paths);
	/* the pages live on as chunks in the store; the rest is not needed */
	for (size_t i = 0; !o->snapshot_keep && i < n_names; i++)
		(void)unlinkat(dfd, names[i], 0);
	km_free_names(names, n_names);
	if (!o->snapshot_keep)
		(void)rmdir(dir);
	return q;
}

/* Removes every file of dir (not recursive) and dir itself. */
static void remove_dir(const char *dir)
{
	_cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d;
	struct dirent *de;

	if (fd < 0 || km_opendir_at(fd, &d) < 0)
		return;
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			(void)unlinkat(fd, de->d_name, 0);
	closedir(d);
	(void)rmdir(dir);
}

/* A directory removed by a thread of its own. */
struct dir_dropper {
	pthread_t thread;
	bool started;
	const char *dir;
};

static void *drop_fn(void *arg)
{
	remove_dir(((struct dir_dropper *)arg)->dir);
	return NULL;
}

static bool is_log(const char *name)
{
	return has_suffix(name, ".log");
}

/* Hard links of from's files (CRIU's logs aside) in to. */
static int link_files(int from, int to, struct km_error *err)
{
	char **names = NULL;
	size_t n = 0;
	int q;

	q = km_list_files_at(from, is_log, &names, &n);
	for (size_t i = 0; q == 0 && i < n; i++)
		if (linkat(from, names[i], to, names[i], 0) < 0) {
			q = -errno;
			km_error_set(err, "cannot link %s: %s", names[i], strerror(errno));
		}
	km_free_names(names, n);
	return q;
}

static __attribute__((format(printf, 2, 3))) void why_full(struct km_migrate_report *r,
							    const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(r->incremental_why, sizeof(r->incremental_why), fmt, ap);
	va_end(ap);
}

/*
 * The snapshot as a parent (protocol 1.3): criu dump --leave-running into
 * WORK/snapshot, which stays until the end of the migration for the stop's
 * compare: its pages files are read in place, at memory speed, where
 * reading them back from the store would hash every chunk (about 1 s per
 * GiB here) inside the stop. Then its id, and the image sent to the target,
 * which keeps it as a directory of its image area: split in transparent
 * mode (its weights chunks are there already; hard links in
 * WORK/snapshot-send, so that the split's removal of the pages files
 * leaves WORK/snapshot whole), unsplit in cooperative mode (its image is
 * the KV; the weights file is not in it). The tree serves all along but
 * during the dump itself.
 *
 * A failure before anything is sent is no failure of the migration: the
 * stop then sends the whole image, and r->incremental_why says why. A
 * failure to send is (the connection is unusable).
 */
static int snapshot_parent(const struct km_migrate_opts *o, struct km_store *s,
			   struct km_client *c, struct km_migrate_report *r, struct km_error *err)
{
	char dir[4200], send[4200];
	_cleanup_close_ int dfd = -1, sfd = -1;
	struct km_error e = { { 0 } };
	struct km_image_result res = { 0 };
	struct km_image_send_opts io = { .label = "snapshot",
					 .restore = false,
					 .snapshot_id = &r->snapshot_id };
	uint64_t t;
	int q;

	snprintf(dir, sizeof(dir), "%s/snapshot", o->work);
	snprintf(send, sizeof(send), "%s/snapshot-send", o->work);
	if (mkdir(dir, 0700) < 0) {
		km_error_set(err, "cannot create %s: %s", dir,
			     errno == EEXIST ? "it exists (left by another migration?)" :
					       strerror(errno));
		return -errno;
	}
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	q = dfd < 0 ? -errno : take_snapshot(o, dir, dfd, r, &e);
	if (q < 0) {
		why_full(r, "snapshot failed: %s", dfd < 0 ? strerror(-q) : e.msg);
		return 0;
	}
	r->snapshot_bytes = dir_bytes(dir);
	t = now_ns();
	q = km_incr_snapshot_id(dfd, 0, &r->snapshot_id, &e);
	r->snapshot_id_ns = now_ns() - t;
	if (q < 0) {
		why_full(r, "snapshot %s unusable: %s", dir, e.msg);
		return 0;
	}
	if (!r->cooperative) {
		struct km_split_opts so = { .add_chunks = r->n_weights == 0 };
		struct km_split_stats ss;

		t = now_ns();
		if (mkdir(send, 0700) < 0 ||
		    (sfd = open(send, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
			q = -errno;
			km_error_set(&e, "%s: %s", send, strerror(errno));
		} else {
			q = link_files(dfd, sfd, &e);
		}
		if (q == 0)
			q = km_image_split(sfd, s, &so, &ss, &e);
		r->snapshot_split_ns = now_ns() - t;
		if (q < 0) {
			why_full(r, "split of the snapshot failed: %s", e.msg);
			remove_dir(send);
			return 0;
		}
	}
	t = now_ns();
	q = km_client_send_image(c, r->cooperative ? dfd : sfd, s, &io, &r->snapshot, &res, NULL, 0,
				 err);
	r->snapshot_send_ns = now_ns() - t;
	if (!r->cooperative)
		remove_dir(send);
	if (q < 0) {
		km_error_prefix(err, "sending the snapshot");
		return q;
	}
	snprintf(r->snapshot_dir, sizeof(r->snapshot_dir), "%s", res.dir);
	return 0;
}

/* --- criu dump -------------------------------------------------------------- */

/*
 * criu dump of the tree into img: the stop (--leave-stopped) or a snapshot
 * (--leave-running); split by the plugin as split and split_engines say.
 */
static int run_dump(const struct km_migrate_opts *o, const char *img, bool snap, bool split,
		    bool split_engines, int ps_fd, struct km_error *err)
{
	const char *argv[32 + 64];
	char pidbuf[16], psbuf[16];
	size_t n = 0;
	int status;
	pid_t child;

	if (o->n_criu_args > 64) {
		km_error_set(err, "at most 64 extra criu arguments");
		return -E2BIG;
	}
	snprintf(pidbuf, sizeof(pidbuf), "%d", (int)o->pid);
	argv[n++] = o->criu ? o->criu : "criu";
	argv[n++] = "dump";
	argv[n++] = "-t";
	argv[n++] = pidbuf;
	argv[n++] = "-D";
	argv[n++] = img;
	argv[n++] = "-o";
	argv[n++] = "dump.log";
	argv[n++] = "-v4";
	argv[n++] = snap ? "--leave-running" : "--leave-stopped";
	if (o->plugin_dir) {
		argv[n++] = "-L";
		argv[n++] = o->plugin_dir;
	}
	if (ps_fd >= 0) {
		snprintf(psbuf, sizeof(psbuf), "%d", ps_fd);
		argv[n++] = "--page-server";
		argv[n++] = "--ps-socket";
		argv[n++] = psbuf;
	}
	for (size_t i = 0; i < o->n_criu_args; i++)
		argv[n++] = o->criu_args[i];
	argv[n] = NULL;

	child = fork();
	if (child < 0) {
		km_error_set(err, "fork: %s", strerror(errno));
		return -errno;
	}
	if (child == 0) {
		int nul = open("/dev/null", O_RDWR | O_CLOEXEC);

		/*
		 * The plugin reads its settings from the environment: the
		 * image is split against our store, but for a cooperative
		 * engine (its weights are not in the image: the split would
		 * only cost time in the stop), unless the target takes split
		 * images only.
		 */
		setenv("KVMOTION_STORE", o->store, 1);
		setenv("KVMOTION_SPLIT", split ? "yes" : "no", 1);
		setenv("KVMOTION_SPLIT_ENGINES", split_engines ? "yes" : "no", 1);
		setenv("KVMOTION_LEAVE_RUNNING", snap ? "yes" : "no", 1);
		if (o->weights_dir)
			setenv("KVMOTION_WEIGHTS_DIR", o->weights_dir, 1);
		if (nul >= 0) {
			dup2(nul, STDIN_FILENO);
			dup2(nul, STDOUT_FILENO);
			dup2(nul, STDERR_FILENO);
		}
		if (ps_fd >= 0 && fcntl(ps_fd, F_SETFD, 0) < 0)
			_exit(127);
		execvp(argv[0], (char *const *)argv);
		_exit(127);
	}
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR) {
			km_error_set(err, "waitpid: %s", strerror(errno));
			return -errno;
		}
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
		km_error_set(err, "cannot run %s", argv[0]);
	else
		km_error_set(err, "criu dump failed (%s %d)",
			     WIFEXITED(status) ? "status" : "signal",
			     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	return -ECHILD;
}

/* "(SS.uuuuuu) text": seconds since criu started, -1 if the line has none. */
static double log_ts(const char *line, const char **text)
{
	char *end;
	double t;

	if (line[0] != '(')
		return -1;
	t = strtod(line + 1, &end);
	if (end == line + 1 || *end != ')')
		return -1;
	*text = end + 1 + (end[1] == ' ');
	return t;
}

int km_migrate_parse_dump_log(int fd, uint64_t total_ns, struct km_migrate_report *r)
{
	_cleanup_fclose_ FILE *f = NULL;
	char line[4096];
	double t_begin = -1, t_frozen = -1, t_quiesced = -1, q = 0, g = 0, sp = 0;
	bool tasks = false;
	uint64_t rest;
	int nfd = dup(fd);

	if (nfd < 0)
		return -errno;
	f = fdopen(nfd, "r");
	if (!f) {
		close(nfd);
		return -errno;
	}
	while (fgets(line, sizeof(line), f)) {
		const char *text = line, *k;
		double t = log_ts(line, &text), v;
		int pid;

		k = strstr(text, "kvmotion: ");
		if (k && sscanf(k, "kvmotion: engine in pid %d quiesced in %lf s", &pid, &v) == 2) {
			q += v;
			t_quiesced = t;
		} else if (k && sscanf(k, "kvmotion: GPU state of %d checkpointed in %lf s", &pid,
				       &v) == 2) {
			g += v;
		} else if (k && strncmp(k, "kvmotion: split ", 16) == 0 &&
			   (k = strstr(k, " files in ")) && sscanf(k, " files in %lf s", &v) == 1) {
			sp += v;
		} else if (t >= 0 && !tasks && strncmp(text, "Dumping processes (pid:", 23) == 0) {
			t_begin = t;
		} else if (t >= 0 && !tasks && t_begin >= 0 &&
			   strncmp(text, "Collected ", 10) == 0) {
			t_frozen = t;
		} else if (t >= 0 && strncmp(text, "Dumping task (pid:", 18) == 0) {
			tasks = true;
		}
	}
	r->quiesce_ns = (uint64_t)(q * 1e9);
	r->gpu_checkpoint_ns = (uint64_t)(g * 1e9);
	r->split_ns = (uint64_t)(sp * 1e9);
	r->freeze_ns = 0;
	if (t_begin >= 0 && t_frozen > t_begin) {
		double fr = t_frozen - t_begin;

		/* the plugin quiesces the engine inside CRIU's seize */
		if (t_quiesced >= t_begin && t_quiesced <= t_frozen)
			fr -= q;
		r->freeze_ns = fr > 0 ? (uint64_t)(fr * 1e9) : 0;
	}
	rest = r->quiesce_ns + r->freeze_ns + r->gpu_checkpoint_ns + r->split_ns;
	r->dump_ns = total_ns > rest ? total_ns - rest : 0;
	return 0;
}

static uint64_t dir_bytes(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	uint64_t n = 0;

	if (!d)
		return 0;
	while ((de = readdir(d))) {
		struct stat st;

		if (de->d_name[0] != '.' && fstatat(dirfd(d), de->d_name, &st, 0) == 0 &&
		    S_ISREG(st.st_mode) && !strstr(de->d_name, ".log"))
			n += (uint64_t)st.st_size;
	}
	closedir(d);
	return n;
}

/*
 * The incremental stop's dump: criu dump --page-server into a page server
 * of ours (pagesrv.h) that writes the pages differing from the snapshot's
 * in sfd into the image as they come. r->compare_ns: what the comparing
 * took after CRIU had ended; r->pagesrv_ns: the server's busy time, most
 * of it while CRIU dumped.
 */
static int dump_to_pagesrv(const struct km_migrate_opts *o, int dirfd, int sfd,
			   struct km_migrate_report *r, struct km_incr_stats *is,
			   struct km_error *err)
{
	struct km_pagesrv_opts po = { .test_fail_after_pages = o->test_pagesrv_fail_after };
	struct km_pagesrv *ps = NULL;
	struct km_error perr = { { 0 } };
	int sv[2], ret, q;
	uint64_t t;

	snprintf(r->stop_dump, sizeof(r->stop_dump), "page-server");
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		km_error_set(err, "socketpair: %s", strerror(errno));
		return -errno;
	}
	ret = km_pagesrv_start(sv[0], dirfd, sfd, &po, &ps, err);
	if (ret < 0) {
		close(sv[1]);
		return ret;
	}
	ret = run_dump(o, r->image_dir, false, false, false, sv[1], err);
	close(sv[1]);
	t = now_ns();
	q = km_pagesrv_wait(ps, is, &perr);
	r->compare_ns = now_ns() - t;
	if (q == 0) {
		r->pagesrv_ns = is->compare_ns + is->write_ns;
		return ret;
	}
	if (ret == 0 || q != -EPIPE) {
		/* the page server's failure is the reason of CRIU's (or CRIU saw none) */
		*err = perr;
		km_error_prefix(err, "the stop's page server");
	}
	return ret < 0 ? ret : q;
}

/* --- the way back ------------------------------------------------------------ */

/*
 * The tree is stopped (--leave-stopped) or, after a failed dump, running
 * already (CRIU and the plugin resumed it). SIGCONT first: the driver's
 * restore runs in the process and a locked process makes no CUDA call,
 * then the GPU, then the engine, whose resume maps device memory again.
 */
static int resume_source(const struct km_migrate_opts *o, const pid_t *pids, size_t n,
			 struct km_migrate_report *r, struct km_error *err)
{
	struct km_gpu *g = NULL;
	uint64_t t0 = now_ns(), t1;
	int ret = 0, q;

	signal_tree(pids, n, SIGCONT);
	t1 = now_ns();
	q = km_gpu_open(o->libcuda, &g, err);
	if (q < 0) {
		km_error_prefix(err, "GPU resume: ");
		ret = q;
	} else if (km_gpu_available(g)) {
		for (size_t i = 0; i < n; i++) {
			enum km_gpu_state st = KM_GPU_NONE;
			struct km_error e = { { 0 } };

			if (km_gpu_get_state(g, pids[i], &st, &e) < 0 || st != KM_GPU_CHECKPOINTED)
				continue;
			q = km_gpu_resume(g, pids[i], NULL, 0, &e);
			if (q < 0 && ret == 0) {
				*err = e;
				km_error_prefix(err, "GPU resume of pid %d: ", (int)pids[i]);
				ret = q;
			}
		}
	}
	km_gpu_close(g);
	r->gpu_restore_ns = now_ns() - t1;
	if (r->cooperative) {
		struct km_error e = { { 0 } };

		/* an engine that is not quiesced answers at once */
		q = km_engine_resume(o->pid, false,
				     o->engine_timeout_ms ? o->engine_timeout_ms : 10000, &e);
		if (q < 0 && ret == 0) {
			*err = e;
			km_error_prefix(err, "engine resume: ");
			ret = q;
		}
	}
	r->resume_ns = now_ns() - t0 - r->gpu_restore_ns;
	r->resumed = ret == 0;
	return ret;
}

/*
 * The pre-copy; with incremental, a snapshot (opts.snapshot) goes to a
 * target of protocol 1.3 as a parent for the stop's image (km_migrate's
 * stop only: a container's stop is podman's).
 */
static int precopy(const struct km_migrate_opts *o, struct km_store *s, bool incremental,
		   struct km_migrate_report *r, struct km_client **ret_client, struct km_error *err)
{
	struct km_client *c = NULL;
	char wdir[PATH_MAX];
	uint64_t t;
	int ret, q;

	ret = km_weights_dir(s, o->weights_dir, wdir, sizeof(wdir));
	if (ret < 0) {
		km_error_set(err, "weights directory: %s", strerror(-ret));
		return ret;
	}
	q = o->pid > 0 ? km_engine_probe(o->pid) : 0;
	r->cooperative = q == 1;
	if (o->weights_index) {
		_cleanup_free_ void *buf = NULL;
		char root[300];
		size_t n;

		/* refuse a missing index now, before the target is even asked */
		snprintf(root, sizeof(root), "%s%s", o->weights_index, INDEX_SUFFIX);
		ret = km_store_root_read(s, "indexes", root, &buf, &n);
		if (ret < 0) {
			km_error_set(err, "weights index %s: %s in store %s", o->weights_index,
				     strerror(-ret), o->store);
			return ret;
		}
		snprintf(r->weights_index[0], sizeof(r->weights_index[0]), "%s", o->weights_index);
		snprintf(r->weights_from[0], sizeof(r->weights_from[0]), "index");
		r->n_weights = 1;
	} else if (o->pid > 0) {
		ret = mapped_weights(o->pid, s, wdir, r, err);
		if (ret < 0)
			return ret;
	}
	/* a plain process: its weights are anonymous memory read from model files */
	if (o->pid > 0 && !o->weights_index && r->n_weights == 0 && !r->cooperative) {
		t = now_ns();
		ret = open_model_files(o->pid, s, r, err);
		r->discover_ns += now_ns() - t;
		if (ret < 0)
			return ret;
	}
	ret = km_client_connect(o->to, &o->client, &c, err);
	if (ret < 0)
		return ret;
	incremental = incremental && o->pid > 0 && o->snapshot && km_client_target(c)->can_parent;
	if (o->pid > 0 && o->snapshot && !incremental) {
		snprintf(r->incremental_why, sizeof(r->incremental_why), "%s",
			 !km_client_target(c)->can_parent ?
				 "the target takes no incremental images (protocol 1.3)" :
				 "the caller stops the process its own way");
		if (!r->cooperative) {
			/* older targets: the snapshot's pages as chunks, sent like weights */
			t = now_ns();
			ret = snapshot(o, s, r, err);
			r->discover_ns += now_ns() - t;
			if (ret < 0)
				goto fail;
		}
	}
	t = now_ns();
	for (size_t i = 0; i < r->n_weights; i++) {
		struct km_send_stats st;
		struct km_remote_weights rw;

		ret = km_client_send_weights(c, s, r->weights_index[i], &st, err);
		if (ret < 0)
			goto fail;
		add_stats(&r->precopy, &st);
		/* a plain process needs only the chunks; an engine maps the file */
		if (r->cooperative) {
			if (!km_client_target(c)->can_materialize) {
				km_error_set(err, "the target cannot materialize weights files");
				ret = -ENOSYS;
				goto fail;
			}
			ret = km_client_materialize(c, r->weights_index[i], &rw, err);
			if (ret < 0)
				goto fail;
			if (strncmp(rw.path, wdir, strlen(wdir)) != 0) {
				km_error_set(
					err,
					"the target materialized %s outside %s: the engine would "
					"not find it (use the same weights directory on both)",
					rw.path, wdir);
				ret = -EXDEV;
				goto fail;
			}
		}
	}
	if (incremental) {
		ret = snapshot_parent(o, s, c, r, err);
		if (ret < 0)
			goto fail;
	}
	r->precopy_ns = now_ns() - t;
	*ret_client = c;
	return 0;
fail:
	km_client_free(c);
	return ret;
}

int km_migrate_precopy(const struct km_migrate_opts *o, struct km_store *s,
		       struct km_migrate_report *r, struct km_client **ret_client,
		       struct km_error *err)
{
	return precopy(o, s, false, r, ret_client, err);
}

/* --- the migration ---------------------------------------------------------- */

int km_migrate(const struct km_migrate_opts *o, struct km_migrate_report *r, struct km_error *err)
{
	struct km_client *c = NULL;
	struct km_store *s = NULL;
	_cleanup_free_ pid_t *pids = NULL;
	_cleanup_close_ int dirfd = -1;
	char tail[2048] = "";
	size_t n_pids;
	uint64_t t_all = now_ns(), t_stop = 0, t;
	struct km_image_result res = { 0 };
	struct km_image_send_opts so = { .label = "migrate", .restore = true };
	struct km_hash wrong_id;
	struct km_incr_stats is = { 0 };
	struct dir_dropper drop = { .started = false };
	char snap[4200]; /* WORK/snapshot: the snapshot's pages for the stop's compare */
	_cleanup_close_ int sfd = -1;
	int q, ret;

	memset(r, 0, sizeof(*r));
	r->pid = o->pid;
	if (!o->to || !o->store || !o->work || o->pid <= 0) {
		km_error_set(err, "pid, target, store and work directory are required");
		return -EINVAL;
	}
	if (kill(o->pid, 0) < 0) {
		km_error_set(err, "pid %d: %s", (int)o->pid, strerror(errno));
		return -errno;
	}
	pids = calloc(MAX_TREE, sizeof(*pids));
	if (!pids)
		return -ENOMEM;
	snprintf(r->image_dir, sizeof(r->image_dir), "%s/img", o->work);
	snprintf(snap, sizeof(snap), "%s/snapshot", o->work);
	if (mkdir(o->work, 0700) < 0 && errno != EEXIST) {
		km_error_set(err, "cannot create %s: %s", o->work, strerror(errno));
		return -errno;
	}
	if (mkdir(r->image_dir, 0700) < 0 && errno != EEXIST) {
		km_error_set(err, "cannot create %s: %s", r->image_dir, strerror(errno));
		return -errno;
	}
	dirfd = open(r->image_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0) {
		km_error_set(err, "cannot open %s: %s", r->image_dir, strerror(errno));
		return -errno;
	}
	{
		DIR *d = opendir(r->image_dir);
		struct dirent *de;
		bool empty = true;

		while (d && (de = readdir(d)))
			if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
				empty = false;
		if (d)
			closedir(d);
		if (!empty) {
			km_error_set(err, "image directory %s is not empty", r->image_dir);
			return -EEXIST;
		}
	}

	/* --- pre-copy, while the process serves --- */
	progress(o, KM_MIGRATE_PRECOPY, r);
	ret = km_store_open(o->store, 0, NULL, &s);
	if (ret < 0) {
		km_error_set(err, "cannot open store %s: %s", o->store, strerror(-ret));
		goto out;
	}
	ret = precopy(o, s, true, r, &c, err);
	if (ret < 0)
		goto out;

	/* --- stop --- */
	if (r->snapshot_dir[0]) {
		sfd = open(snap, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (sfd < 0) {
			ret = -errno;
			km_error_set(err, "snapshot %s: %s", snap, strerror(errno));
			goto out;
		}
	}
	n_pids = tree_pids(o->pid, pids, MAX_TREE);
	progress(o, KM_MIGRATE_DUMP, r);
	t_stop = now_ns();
	if (sfd >= 0 && !o->stop_dump_file)
		ret = dump_to_pagesrv(o, dirfd, sfd, r, &is, err);
	else if (sfd >= 0)
		ret = run_dump(o, r->image_dir, false, false, false, -1, err);
	else
		ret = run_dump(o, r->image_dir, false, true, !km_client_target(c)->can_unsplit, -1,
			       err);
	t = now_ns() - t_stop;
	{
		_cleanup_close_ int lfd = openat(dirfd, "dump.log", O_RDONLY | O_CLOEXEC);

		if (lfd >= 0)
			km_migrate_parse_dump_log(lfd, t, r);
	}
	if (ret < 0)
		goto fail;
	if (sfd >= 0) {
		if (o->stop_dump_file) {
			/* only the pages that differ from the snapshot's cross */
			snprintf(r->stop_dump, sizeof(r->stop_dump), "file");
			t = now_ns();
			ret = km_incr_rewrite(dirfd, sfd, NULL, &is, err);
			r->compare_ns = now_ns() - t;
			if (ret < 0) {
				km_error_prefix(err, "comparing the dump with the snapshot");
				goto fail;
			}
		}
		r->pages = is.pages;
		r->pages_parent = is.pages_parent;
		r->pages_present = is.pages_present;
		r->incremental = true;
		if (!o->snapshot_keep) {
			/*
			 * Compared: the snapshot's pages on A are of no more use
			 * (a new attempt takes a new snapshot). Freed while the
			 * image crosses, not after the target's restore.
			 */
			close(sfd);
			sfd = -1;
			drop.dir = snap;
			drop.started = pthread_create(&drop.thread, NULL, drop_fn, &drop) == 0;
		}
		so.parent = r->snapshot_dir;
		so.parent_id = &r->snapshot_id;
		if (o->test_wrong_parent == 1) {
			wrong_id = r->snapshot_id;
			wrong_id.b[7] ^= 0x10;
			so.parent_id = &wrong_id;
		} else if (o->test_wrong_parent == 2) {
			so.parent = "snapshot-that-is-not-there";
		}
	}
	r->image_bytes = dir_bytes(r->image_dir);
	q = km_image_is_split(dirfd);
	r->image_split = q > 0;
	progress(o, KM_MIGRATE_SEND, r);
	t = now_ns();
	ret = km_client_send_image(c, dirfd, s, &so, &r->stop, &res, tail, sizeof(tail), err);
	r->commit_wait_ns = r->stop.commit_ns;
	r->transfer_ns =
		r->stop.total_ns > r->stop.commit_ns ? r->stop.total_ns - r->stop.commit_ns : 0;
	if (ret < 0)
		goto fail;
	r->join_ns = res.join_ns;
	/* the plugin's GPU restore and engine resume, inside the target's restore */
	r->gpu_restore_ns = res.gpu_restore_ns;
	r->resume_ns = res.resume_ns;
	r->restore_ns = res.restore_ns - KM_MIN(res.restore_ns, res.gpu_restore_ns + res.resume_ns);
	r->restored_pid = res.restored_pid;
	snprintf(r->target_dir, sizeof(r->target_dir), "%s", res.dir);
	if (res.restored_pid <= 0) {
		km_error_set(err, "the target reported no restored pid");
		ret = -EPROTO;
		goto fail;
	}
	t = now_ns();
	signal_tree(pids, n_pids, SIGKILL);
	r->kill_ns = now_ns() - t;
	r->stop_ns = now_ns() - t_stop;
	progress(o, KM_MIGRATE_DONE, r);
	ret = 0;
	goto out;

fail:
	snprintf(r->why, sizeof(r->why), "%s", err->msg[0] ? err->msg : strerror(-ret));
	if (tail[0]) {
		size_t l = strlen(r->why);

		snprintf(r->why + l, sizeof(r->why) - l, " (criu restore on the target failed)");
	}
	progress(o, KM_MIGRATE_RESUME, r);
	{
		struct km_error rerr = { { 0 } };

		q = resume_source(o, pids, n_pids, r, &rerr);
		if (q < 0)
			km_error_set(err, "%s; and the source could not be resumed: %s", r->why,
				     rerr.msg[0] ? rerr.msg : strerror(-q));
	}
	r->stop_ns = now_ns() - t_stop;
out:
	if (ret < 0 && !r->why[0])
		snprintf(r->why, sizeof(r->why), "%s", err->msg[0] ? err->msg : strerror(-ret));
	if (drop.started)
		pthread_join(drop.thread, NULL);
	else if (r->snapshot_bytes && !o->snapshot_keep)
		/* its copy on the target is the parent; here it held the compare's pages */
		remove_dir(snap);
	km_client_free(c);
	km_store_free(s);
	r->total_ns = now_ns() - t_all;
	return ret;
}
