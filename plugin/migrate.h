/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_MIGRATE_H
#define KM_MIGRATE_H

/*
 * Live migration of a process tree to a `kvmotion serve` target
 * (`kvmotion migrate`, docs/migrate.md), in three phases over one
 * connection (transport.h):
 *
 *   pre-copy  while the process serves: the weights files it maps (a
 *             cooperative engine; their index found in the store by the
 *             weights id its name carries), the weights index given, or for
 *             a plain process the model files (*.safetensors) it has open or
 *             mapped, seeded on the fly, and optionally a --leave-running
 *             snapshot of its memory; sent as chunks the target lacks;
 *             weights files materialized there
 *   stop      criu dump --leave-stopped with kvmotion's plugin (quiesce,
 *             freeze, GPU checkpoint, dump, and for a plain process split
 *             into the store), the image sent (split: with the chunks still
 *             missing, joined on the target; a cooperative engine's as CRIU
 *             wrote it) and restored on the target; the stopped source is
 *             killed only once the target reports the restored pid
 *   failure   after the stop began: the source is resumed where it was
 *             (SIGCONT to the tree, GPU restored and unlocked, a quiesced
 *             engine told to resume) and the error says why
 *
 * Errors: transport.h's, plus -ESRCH no such process, -ECHILD criu dump or
 * restore failed, -EEXIST the image directory is not empty, -ENOENT a mapped
 * weights file that no index of the store records. report->resumed tells
 * whether the source was resumed after a failure of the stop.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "transport.h"
#include "util.h"

enum km_migrate_phase {
	KM_MIGRATE_PRECOPY,
	KM_MIGRATE_DUMP,
	KM_MIGRATE_SEND,
	KM_MIGRATE_RESUME, /* a failure: the source is being resumed */
	KM_MIGRATE_DONE,
};
const char *km_migrate_phase_name(enum km_migrate_phase p);

struct km_migrate_report;
/* Called at the start of each phase, in the caller's thread. */
typedef void (*km_migrate_progress_fn)(void *userdata, enum km_migrate_phase phase,
				       const struct km_migrate_report *r);

/* Strings are borrowed for the call. */
struct km_migrate_opts {
	pid_t pid; /* root of the tree (for a pid namespace: its init, as the host sees it) */
	const char *to; /* "HOST:PORT" of kvmotion serve */
	struct km_client_opts client;
	const char *store; /* the source's chunk store */
	const char *weights_dir; /* NULL: STORE/weights */
	const char *weights_index; /* NULL: found from the weights files pid maps */
	/*
	 * Also send ahead the tree's memory as it is now (the snapshot): read
	 * live (livesnap.h: nothing stops), or with snapshot_criu by a criu
	 * dump --leave-running (the tree frozen while CRIU dumps it). To a
	 * target that takes parents (protocol 1.3) it is sent as an image that
	 * the target keeps, and the stop sends an incremental image over it:
	 * only the pages that differ from the snapshot's (incr.h), in both
	 * modes. To an older target, in transparent mode only, its pages are
	 * seeded into the store as an index and sent ahead like weights;
	 * snapshot_keep then leaves its pagemap and pages files in
	 * WORK/snapshot, else it is removed.
	 */
	bool snapshot;
	bool snapshot_criu;
	bool snapshot_keep;
	/*
	 * The incremental stop's dump: by default CRIU sends the pages to a
	 * page server in this process that compares them with the snapshot as
	 * they come (pagesrv.h: no complete dump is written); with
	 * stop_dump_file CRIU writes the complete dump, compared afterwards
	 * (km_incr_rewrite).
	 */
	bool stop_dump_file;
	const char *work; /* work directory: the image goes to WORK/img */
	const char *criu; /* NULL: "criu" in PATH */
	const char *plugin_dir; /* -L of criu dump (kvmotion.so); NULL: CRIU's default */
	const char *const *criu_args; /* extra arguments of criu dump */
	size_t n_criu_args;
	const char *libcuda; /* for the GPU resume after a failure; NULL: libcuda.so.1 */
	uint32_t engine_timeout_ms; /* the engine's resume after a failure; 0: 10 s */
	km_migrate_progress_fn progress;
	void *userdata;
	/*
	 * Tests only: the stop names a parent the target must refuse: 1 the
	 * snapshot's id with one bit flipped, 2 a directory it does not hold.
	 * 0: off.
	 */
	unsigned test_wrong_parent;
	/* Tests only: the stop's page server fails after this many pages (0: off). */
	uint64_t test_pagesrv_fail_after;
};

#define KM_MIGRATE_MAX_WEIGHTS 8

struct km_migrate_report {
	pid_t pid;
	bool cooperative; /* an engine answered on its control socket */
	size_t n_weights;
	char weights_index[KM_MIGRATE_MAX_WEIGHTS][256]; /* indexes sent ahead */
	/* where each was found: "index" (given), "mapped", "open", "snapshot" */
	char weights_from[KM_MIGRATE_MAX_WEIGHTS][16];
	uint64_t bytes_seeded; /* model files and snapshot pages seeded for the pre-copy */
	char snapshot_mode[8]; /* "live", "criu", "" without a snapshot */
	uint64_t snapshot_bytes; /* its pages-*.img */
	/* taking it (live read, or criu dump: the tree frozen for most of it), not the seeding */
	uint64_t snapshot_ns;
	char image_dir[4096]; /* WORK/img */
	bool image_split; /* the plugin split the dump (else sent as CRIU wrote it) */
	char target_dir[256]; /* the image's directory on the target */
	int restored_pid; /* on the target; 0 unless it succeeded */
	bool resumed; /* a failure after the stop began: the source runs again */
	char why[512]; /* the failure, "" on success */
	/* bytes */
	struct km_send_stats precopy; /* the weights (sum over indexes) */
	struct km_send_stats stop; /* the image and its missing chunks */
	uint64_t image_bytes; /* bytes of the image directory sent (its files) */
	/* the snapshot as a parent (opts.snapshot, a target of protocol 1.3) */
	bool incremental; /* the stop sent an incremental image over the snapshot */
	char incremental_why[256]; /* opts.snapshot but not incremental: why ("" otherwise) */
	char snapshot_dir[256]; /* the snapshot's directory on the target */
	struct km_hash snapshot_id;
	struct km_send_stats snapshot; /* sending it (in the pre-copy) */
	uint64_t snapshot_id_ns, snapshot_split_ns, snapshot_send_ns; /* after it, while serving */
	uint64_t pages, pages_parent, pages_present; /* the stop's dump: present, equal, sent */
	uint64_t compare_ns; /* the stop: comparing with the snapshot, rewriting the image */
	char stop_dump[16]; /* the incremental stop's dump: "page-server", "file"; "" none */
	uint64_t pagesrv_ns; /* page-server: its busy time, overlapping the dump */
	/*
	 * nanoseconds; the stop's phases (dump.log, the target's reply, ours).
	 * gpu_restore_ns and resume_ns: on success the target's (its plugin's
	 * share of the restore, not in restore_ns), after a failure the
	 * source's.
	 */
	uint64_t precopy_ns;
	uint64_t discover_ns; /* seeding open model files, the snapshot */
	uint64_t quiesce_ns, freeze_ns, gpu_checkpoint_ns, dump_ns, split_ns; /* split: or compare */
	uint64_t transfer_ns, join_ns, restore_ns, commit_wait_ns;
	uint64_t gpu_restore_ns, resume_ns, kill_ns;
	uint64_t stop_ns; /* dump start to the restored pid (or to the source resumed) */
	uint64_t total_ns;
};

/*
 * Migrates opts->pid to opts->to. The report is filled as far as the
 * migration got, on failure too. 0: the tree runs on the target as
 * report->restored_pid and the source tree is gone.
 */
int km_migrate(const struct km_migrate_opts *opts, struct km_migrate_report *report,
	       struct km_error *err);

/*
 * The pre-copy alone, for callers that stop the process their own way
 * (container.h): finds the weights (opts->weights_index, else the weights
 * files opts->pid maps; pid 0: none but the index), connects to opts->to,
 * sends them and, for a cooperative engine, has the target materialize
 * them. Fills the report's weights, cooperative, precopy and precopy_ns;
 * *ret_client is the connection, to be used for the stop and freed by the
 * caller.
 */
struct km_store;
int km_migrate_precopy(const struct km_migrate_opts *opts, struct km_store *s,
		       struct km_migrate_report *r, struct km_client **ret_client,
		       struct km_error *err);

/*
 * Parses the plugin's and CRIU's lines of a dump.log (criu -v4) into the
 * report's quiesce, freeze, GPU checkpoint and split times; total_ns is
 * the criu dump's wall time, of which dump_ns gets what is left. For tests.
 */
int km_migrate_parse_dump_log(int fd, uint64_t total_ns, struct km_migrate_report *r);

#endif
