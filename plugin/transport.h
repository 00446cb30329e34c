/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_TRANSPORT_H
#define KM_TRANSPORT_H

/*
 * The sender's side of a live migration: a client of `kvmotion serve`
 * (serve.h) over one authenticated TLS connection (tls.h), speaking the
 * protocol of proto/wire.proto (docs/formats.md, "Migration wire protocol").
 *
 * A migration uses one connection for both of its phases:
 *
 *   km_client_connect          TCP, TLS handshake, Hello (version check)
 *   -- pre-copy, while the engine keeps serving --
 *   km_client_send_weights     the chunks of a weights index that the target
 *                              lacks (query, then send), then the index
 *   km_client_materialize      the target writes the weights file
 *   -- stop: dump and split the process, then --
 *   km_client_send_image       the image: a split one's chunks that the target
 *                              lacks, every file, then join (split images)
 *                              and (optionally) criu restore on the target
 *   km_client_free             Bye, close
 *
 * Every chunk sent is read through the sender's store (hashed on read); the
 * target hashes it again before storing it. Chunks travel zstd-compressed
 * when that is faster than sending them raw (KM_COMPRESS_AUTO: a raw and a
 * compressed segment of the stream are timed, see transport.c) or
 * always/never as asked.
 *
 * Errors are negative errnos with err naming what failed; those the target
 * reported start with "target: ". Fixed meanings: -EACCES authentication
 * failed, -EPROTONOSUPPORT the target speaks another major version,
 * -ECONNRESET/-EPIPE the connection was lost, -ETIMEDOUT, -EDQUOT the
 * target's per-connection quota, -EMSGSIZE a frame above the limits,
 * -EBADMSG corrupt data (a chunk that does not hash to its id), -ENOSPC the
 * target's disk is full, -ENOENT a chunk or index missing, -ENOSYS the
 * target cannot do this, -ECHILD criu restore failed on the target.
 * After any error the client is unusable: free it.
 *
 * A client is used by one thread at a time; km_client_abort may be called
 * from any thread.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunker.h"
#include "hash.h"
#include "store.h"
#include "tls.h"
#include "util.h"

#define KM_WIRE_MAJOR		1
#define KM_WIRE_MINOR		3
#define KM_WIRE_HEADER_SIZE	12
#define KM_WIRE_META_MAX	(1u << 20) /* packed message of one frame */
#define KM_WIRE_PAYLOAD_MAX	KM_CHUNK_MAX_LIMIT /* raw bytes of one frame: 64 MiB */
#define KM_WIRE_QUERY_MAX	4096u /* chunk ids per QueryChunks */
#define KM_WIRE_FILE_PIECE	(4u << 20) /* file bytes per File frame */
#define KM_DEAD_PEER_MS_DEFAULT 10000u

enum km_compress {
	KM_COMPRESS_AUTO = 0, /* whichever measures faster (transport.c) */
	KM_COMPRESS_ALWAYS,
	KM_COMPRESS_NEVER,
};

struct km_client_opts {
	struct km_tls_opts tls;
	const char *label; /* what is migrated, for the target's log (may be NULL) */
	enum km_compress compress;
	int zstd_level; /* 0: 1 */
	unsigned connect_timeout_ms; /* 0: 10 s */
	unsigned io_timeout_ms; /* 0: 600 s (a reply may wait for a join and a restore) */
	/*
	 * Tests only: flip one byte of the n-th chunk sent (1-based) after it
	 * was read and hashed, to show that the target catches it. 0: off.
	 */
	unsigned test_corrupt_chunk;
	/* Tests only: the same for the n-th image file piece sent. */
	unsigned test_corrupt_piece;
	/*
	 * How long the peer may leave data unacknowledged, or fail TCP
	 * keepalive probes while we wait for a reply, before the connection
	 * counts as lost (-ETIMEDOUT): a cut link ends a migration in
	 * seconds, not after io_timeout_ms. 0: 10 s.
	 */
	unsigned dead_peer_ms;
};

/* What the target said in its HelloReply, and the connection's set-up. */
struct km_target_info {
	uint32_t major, minor;
	char software[64];
	uint32_t max_payload;
	uint64_t quota_bytes; /* 0: no limit */
	uint32_t max_files;
	struct km_chunker_params chunker; /* of the target's store; zeros if not told */
	bool can_materialize;
	bool can_unsplit; /* takes unsplit images (protocol 1.1) */
	bool takes_archives; /* it sent can_restore_containers at all: ArchiveCommit is known */
	bool can_restore_containers; /* ArchiveCommit with restore */
	bool can_parent; /* snapshots and incremental images (protocol 1.3) */
	char cipher[96]; /* "TLSv1.3 TLS_AES_128_GCM_SHA256" */
	uint64_t connect_ns; /* TCP connect + TLS handshake + Hello */
};

/*
 * What one call sent. Chunk counts are of distinct chunks; "deduplicated"
 * chunks are those the target already had. Times are nanoseconds of the
 * sender's wall clock, but target_store_ns, which the target measured.
 */
struct km_send_stats {
	uint64_t chunks;
	uint64_t chunks_sent;
	uint64_t chunks_deduplicated;
	uint64_t chunks_compressed;
	uint64_t bytes; /* raw bytes of the chunks */
	uint64_t bytes_sent; /* raw bytes of the chunks sent */
	uint64_t bytes_deduplicated; /* raw bytes of the chunks not sent */
	uint64_t files;
	uint64_t file_bytes; /* raw bytes of the image files sent */
	uint64_t pieces_compressed; /* file pieces sent zstd-compressed */
	uint64_t wire_bytes; /* frame bytes written (compressed payloads as sent), TLS excluded */
	uint64_t query_ns; /* asking which chunks the target lacks */
	uint64_t chunks_ns; /* sending them until the target confirmed storing them */
	uint64_t index_ns; /* sending the weights index */
	uint64_t files_ns; /* sending the image files */
	uint64_t commit_ns; /* waiting for the join (and restore) */
	uint64_t total_ns;
	uint64_t target_store_ns; /* target: decoding, hashing, storing chunks */
};

/*
 * Connects to "HOST:PORT" ("[V6ADDR]:PORT"), authenticates and checks the
 * protocol version.
 */
struct km_client;
int km_client_connect(const char *address, const struct km_client_opts *o, struct km_client **ret,
		      struct km_error *err);
/* Says Bye if the connection is still sound, closes, frees. NULL is fine. */
void km_client_free(struct km_client *c);
/* Valid for the client's lifetime. */
const struct km_target_info *km_client_target(const struct km_client *c);
/* Makes a blocked call of another thread fail (-ECONNRESET) and the client unusable. */
void km_client_abort(struct km_client *c);

/*
 * Sends the chunks among ids[0..n) (any order, repeats allowed) that the
 * target lacks, read from store s, and waits until the target has stored
 * them all. A building block of the two calls below.
 */
int km_client_send_chunks(struct km_client *c, struct km_store *s, const struct km_hash *ids,
			  size_t n, struct km_send_stats *ret, struct km_error *err);

/*
 * Pre-copy of weights index 'index_name' of store s: its chunks that the
 * target lacks, then the index itself, stored on the target under the same
 * name once all its chunks are there.
 */
int km_client_send_weights(struct km_client *c, struct km_store *s, const char *index_name,
			   struct km_send_stats *ret, struct km_error *err);

struct km_remote_weights {
	char path[4096]; /* of the weights file on the target */
	struct km_hash id; /* its SHA-256 */
	uint64_t size;
	bool written; /* false: the target had it already */
	uint64_t bytes_hashed;
	uint64_t target_ns; /* the materialization, on the target */
	uint64_t ns; /* the request, as the sender waited */
};

/* Has the target materialize its weights index 'index_name' (weights.h). */
int km_client_materialize(struct km_client *c, const char *index_name,
			  struct km_remote_weights *ret, struct km_error *err);

struct km_image_send_opts {
	const char *label; /* prefix of the target's image directory name (NULL: "image") */
	bool restore; /* run criu restore on the target after the join */
	/*
	 * Protocol 1.3 (the target says can_parent, else -ENOSYS):
	 * snapshot_id: the image is a snapshot with this id (incr.h), which
	 * the target checks after the join and records for later images;
	 * parent, parent_id: an incremental image over the snapshot in
	 * directory 'parent' of the target's image area, which must be the
	 * snapshot parent_id (-ENOENT otherwise, before any file is sent).
	 */
	const struct km_hash *snapshot_id;
	const char *parent;
	const struct km_hash *parent_id;
};

struct km_image_result {
	char dir[256]; /* the image directory's name in the target's image area */
	uint64_t files; /* received by the target */
	uint64_t bytes; /* file bytes received by the target */
	uint64_t bytes_joined; /* bytes the join rebuilt */
	uint64_t join_ns; /* target */
	bool unsplit; /* sent as CRIU wrote it, no join */
	int restored_pid; /* restore: the restored tree's root; else 0 */
	uint64_t restore_ns; /* target */
	uint64_t gpu_restore_ns, resume_ns; /* target, inside restore_ns (plugin's log) */
	uint64_t snapshot_ns; /* target: checking a snapshot's id */
};

/*
 * The stop phase: sends image directory dirfd (CRIU's *.log files stay
 * home) and has the target write it into a new directory of its image
 * area, then, with o->restore, run criu restore there. Two kinds:
 *
 *   split    (kvmotion.manifest present) the chunks its manifest refers to
 *            that the target lacks, read from store s, go first; the target
 *            joins the files with its store before the restore;
 *   unsplit  (no manifest: a cooperative dump, whose weights are not in
 *            the image) the files as CRIU wrote them, nothing else; s may
 *            be NULL. Needs a target that says can_unsplit (else -ENOSYS).
 *
 * Files go in pieces read, hashed and compressed ahead by worker threads;
 * every piece of an unsplit image carries its SHA-256, which the target
 * checks before writing it (-EBADMSG "corrupt in flight"; a split image is
 * verified by the join instead). On failure the target removes the
 * directory; for -ECHILD (restore failed) err holds the first line of
 * CRIU's complaint and, if log_tail is not NULL, log_tail gets the tail of
 * CRIU's log (log_tail_size bytes at most, NUL-terminated). *ret is filled
 * on failure too, with what was sent until then.
 */
int km_client_send_image(struct km_client *c, int dirfd, struct km_store *s,
			 const struct km_image_send_opts *o, struct km_send_stats *ret,
			 struct km_image_result *ret_result, char *log_tail, size_t log_tail_size,
			 struct km_error *err);

struct km_archive_send_opts {
	const char *label; /* prefix of the target's directory name (NULL: "archive") */
	bool restore; /* the target's container engine restores it */
	const char *name; /* the container's name there (restore: required) */
};

struct km_archive_result {
	char dir[256]; /* the directory's name in the target's image area */
	char path[4096]; /* the archive's path on the target */
	uint64_t bytes;
	bool split; /* its checkpoint/ is a split image */
	struct km_hash manifest_id; /* split: the store root on the target is HEX.kmman */
	uint64_t chunks; /* chunk references of the manifest, all present there */
	uint64_t check_ns; /* target: reading the manifest, checking the chunks */
	char container_id[128]; /* restore: as the target's container engine printed it */
	int restored_pid; /* restore: the container's init on the target; else 0 */
	uint64_t restore_ns; /* target */
};

/*
 * Protocol 1.1: sends a container checkpoint archive (archive.h: an
 * uncompressed tar, podman's --export or the kubelet's) at path, under its
 * own file name, which must be plain. The chunks its split image refers to
 * that the target lacks go first, read from store s; the target checks that
 * it holds them all, records the manifest as a store root (released with
 * `kvmotion store release`) and keeps the archive in a directory of its
 * image area; with o->restore its container engine restores it as o->name
 * and the result names the running container's pid. -ENOSYS: the target
 * knows no archives (its HelloReply has no can_restore_containers) or
 * restores no containers; -ENOENT: a chunk is missing there;
 * -ECHILD: the restore failed (log_tail: the engine's output's tail).
 */
int km_client_send_archive(struct km_client *c, const char *path, struct km_store *s,
			   const struct km_archive_send_opts *o, struct km_send_stats *ret,
			   struct km_archive_result *ret_result, char *log_tail,
			   size_t log_tail_size, struct km_error *err);

/*
 * Splits "HOST:PORT" or "[V6]:PORT" (host may be empty: any address) into
 * its parts. -EINVAL for anything else.
 */
int km_split_address(const char *address, char *host, size_t host_size, char *port,
		     size_t port_size);

#endif
