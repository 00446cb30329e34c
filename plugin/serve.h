/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_SERVE_H
#define KM_SERVE_H

/*
 * The receiver of live migrations (`kvmotion serve`): accepts TLS
 * connections from authenticated senders (tls.h; there is no anonymous
 * mode), one thread per connection, and for each:
 *
 *   - answers which chunks its store lacks, takes chunks, hashes each one
 *     (the sender's id is never trusted) and puts it into the store;
 *   - stores weights indexes once every chunk they refer to is there, and
 *     materializes them into weights files (weights.h);
 *   - receives a split CRIU image into a directory of its own under the
 *     image area, joins it with the store and runs criu restore there
 *     (detached, inside the receiver's own namespaces), reporting the
 *     restored pid or CRIU's log tail;
 *   - receives a container checkpoint archive (podman's or the kubelet's),
 *     checks that the store holds every chunk its split image refers to,
 *     keeps it and, if asked and configured, restores the container from
 *     it with podman.
 *
 * Limits per connection: max_bytes of chunk, index and file bytes
 * (decoded), max_files image files, max_payload bytes per frame; file names
 * must be plain (no '/', no "..", not hidden). A connection that breaks a
 * limit, sends a corrupt chunk or fails for any reason gets an error frame
 * and is closed; its image directory, if any, is removed (chunks stay:
 * they are content-addressed and verified).
 *
 * The store is opened per connection, so that `kvmotion store gc` can run
 * while no migration is in progress. The library never prints: every event
 * is one line through opts.log (from any thread, so the function must be
 * thread-safe).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tls.h"
#include "util.h"

#define KM_SERVE_MAX_BYTES_DEFAULT	   (256ull << 30)
#define KM_SERVE_MAX_FILES_DEFAULT	   4096u
#define KM_SERVE_MAX_CONNECTIONS_DEFAULT   16u
#define KM_SERVE_IDLE_TIMEOUT_S_DEFAULT	   300u
#define KM_SERVE_RESTORE_TIMEOUT_S_DEFAULT 300u

typedef void (*km_serve_log_fn)(void *userdata, const char *line);

struct km_restore_opts {
	const char *criu; /* CRIU, or a wrapper taking its arguments (NULL: "criu" in PATH) */
	const char *libdir; /* passed as -L (CRIU plugins), NULL: none */
	const char *const *args; /* extra arguments after kvmotion's own */
	size_t n_args;
	unsigned timeout_s; /* 0: KM_SERVE_RESTORE_TIMEOUT_S_DEFAULT */
};

/*
 * Container restores of checkpoint archives (protocol 1.1, archive.h):
 * `PODMAN ARGS... container restore --import ARCHIVE --name NAME
 * RESTORE_ARGS...`, then `container inspect` must say it runs. PODMAN may
 * be a wrapper taking podman's arguments. It runs with KVMOTION_STORE and
 * KVMOTION_WEIGHTS_DIR set to the receiver's, for kvmotion's CRIU plugin,
 * which joins the split image at the restore; restore.timeout_s bounds it.
 */
struct km_container_opts {
	const char *podman; /* NULL: archives are kept, never restored */
	const char *const *args; /* podman's global options (--root, --runroot, ...) */
	size_t n_args;
	const char *const *restore_args; /* after kvmotion's own */
	size_t n_restore_args;
};

/* Strings are borrowed: they must outlive the server. */
struct km_serve_opts {
	const char *listen; /* "ADDR:PORT", "[V6]:PORT", ":PORT"; port 0 picks one */
	const char *store; /* the chunk store (created if absent) */
	const char *images; /* the image area (created if absent) */
	const char *weights_dir; /* NULL: STORE/weights */
	struct km_tls_opts tls;
	uint64_t max_bytes; /* per connection; 0: default */
	uint32_t max_files; /* per connection; 0: default */
	uint32_t max_payload; /* per frame; 0: KM_WIRE_PAYLOAD_MAX */
	unsigned max_connections; /* at once; 0: default */
	unsigned idle_timeout_s; /* a silent sender is dropped; 0: default */
	/* no snapshots or incremental images (HelloReply.can_parent false), as before 1.3 */
	bool no_incremental;
	bool sync; /* fsync chunks, files, directories */
	struct km_restore_opts restore;
	struct km_container_opts container;
	int stop_fd; /* km_serve_run returns once it is readable; -1: none */
	km_serve_log_fn log;
	void *log_userdata;
};

struct km_server;

/* Loads the TLS set-up, checks store and image area, binds and listens. */
int km_serve_new(const struct km_serve_opts *o, struct km_server **ret, struct km_error *err);

/* The bound address, "ADDR:PORT" with the actual port. */
const char *km_serve_address(const struct km_server *s);

/*
 * Serves until stop_fd becomes readable, then cancels the connections in
 * progress (their image directories are removed; a restore already running
 * is waited for) and returns 0.
 */
int km_serve_run(struct km_server *s, struct km_error *err);

void km_serve_free(struct km_server *s);

#endif
