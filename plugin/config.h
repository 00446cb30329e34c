/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_CONFIG_H
#define KM_CONFIG_H

/*
 * Configuration of the CRIU plugin. runc, crun and podman start CRIU
 * themselves, so the plugin reads a config file and the environment
 * rather than command-line options. Environment variables override the
 * file; the file's path is $KVMOTION_CONFIG, default KM_CONFIG_PATH.
 *
 *   file key         environment               default
 *   store            KVMOTION_STORE            /var/lib/kvmotion/store
 *   split            KVMOTION_SPLIT            auto (on when the store exists)
 *   split_comm       KVMOTION_SPLIT_COMM       (empty: every process tree)
 *   add_chunks       KVMOTION_ADD_CHUNKS       no
 *   split_engines    KVMOTION_SPLIT_ENGINES    no (split dumps of cooperative engines too)
 *   split_follow     KVMOTION_SPLIT_FOLLOW     yes (split pages images while CRIU writes them)
 *   min_split_size   KVMOTION_MIN_SPLIT_SIZE   1M
 *   chunk_min/avg/max KVMOTION_CHUNK_MIN/AVG/MAX 64K/256K/1M (new stores only)
 *   delta_level      KVMOTION_DELTA_LEVEL      1
 *   threads          KVMOTION_THREADS          0 (one per CPU)
 *   sync             KVMOTION_SYNC             yes
 *   gpu_map          KVMOTION_GPU_MAP          (none) "GPU-a=GPU-b,..."
 *   libcuda          KVMOTION_LIBCUDA          libcuda.so.1
 *   lock_timeout_ms  KVMOTION_LOCK_TIMEOUT_MS  8000 (keep below CRIU's --timeout)
 *   quiesce_timeout_ms KVMOTION_QUIESCE_TIMEOUT_MS 5000 (a cooperative engine's answer)
 *   weights_dir      KVMOTION_WEIGHTS_DIR      (empty: STORE/weights)
 *   leave_running    KVMOTION_LEAVE_RUNNING    auto (from CRIU's command line)
 *   late_weights     KVMOTION_LATE_WEIGHTS     yes (restore: weights written into the
 *                                              process after CRIU's restore, see late.h)
 *
 * File syntax: "key = value" lines, '#' comments, blank lines ignored.
 */

#include <stdbool.h>
#include <stdint.h>

#include "chunker.h"
#include "util.h"

#define KM_CONFIG_PATH "/etc/kvmotion/kvmotion.conf"
#define KM_STORE_PATH_DEFAULT "/var/lib/kvmotion/store"

enum km_tristate { KM_AUTO = -1, KM_NO = 0, KM_YES = 1 };

struct km_config {
	char store[4096];
	enum km_tristate split;
	char split_comm[1024]; /* comma-separated process names */
	bool add_chunks;
	bool split_engines;
	bool split_follow;
	uint64_t min_split_size;
	struct km_chunker_params chunker;
	int delta_level;
	unsigned threads;
	bool sync;
	char gpu_map[2048];
	char libcuda[1024];
	unsigned lock_timeout_ms;
	unsigned quiesce_timeout_ms;
	char weights_dir[4096];
	enum km_tristate leave_running;
	bool late_weights;
	char source[4200]; /* where the settings came from, for the log */
};

void km_config_init(struct km_config *c);

/*
 * Applies the file at path (NULL: $KVMOTION_CONFIG or KM_CONFIG_PATH; a
 * missing default file is fine, a missing named one is -ENOENT), then
 * the environment. -EINVAL with err naming the key and line for bad input.
 */
int km_config_load(struct km_config *c, const char *path, struct km_error *err);

/* Applies one "key", "value" pair (used by the file and env readers). */
int km_config_set(struct km_config *c, const char *key, const char *value, struct km_error *err);

/* True if comm is selected by split_comm (empty list: everything). */
bool km_config_wants_comm(const struct km_config *c, const char *comm);

#endif
