/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * kvmotion: the command-line front end of the library. It parses options,
 * calls one library function per command and prints what it did; every
 * error is printed once, here, as "kvmotion: what: why".
 */
#include <dirent.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "archive.h"
#include "container.h"
#include "engine_ctl.h"
#include "format.h"
#include "image.h"
#include "livesnap.h"
#include "migrate.h"
#include "oci.h"
#include "serve.h"
#include "store.h"
#include "transport.h"
#include "util.h"
#include "weights.h"

#define DEFAULT_STORE "/var/lib/kvmotion/store"

struct cli {
	const char *store_path;
	const char *name;
	unsigned threads;
	bool json;
	bool sync;
	bool add_chunks;
	bool keep;
	bool repair;
	bool extents;
	uint64_t min_split_size;
	struct km_delta_params delta;
	struct km_chunker_params chunker;
	bool chunker_set;
	const char *output;
	const char *weights_dir;
	pid_t pid;
	uint32_t timeout_ms;
	bool restored;
	/* network */
	const char *listen;
	const char *images;
	const char *to;
	const char *label;
	struct km_tls_opts tls;
	uint64_t max_bytes;
	uint32_t max_files;
	uint32_t max_message;
	unsigned max_connections;
	unsigned idle_timeout_s;
	bool no_incremental;
	bool restore;
	bool materialize;
	enum km_compress compress;
	struct km_restore_opts restore_opts;
	const char *restore_args[64];
	/* migrate */
	const char *weights_index;
	bool snapshot;
	bool snapshot_criu;
	bool keep_snapshot;
	bool stop_dump_file;
	const char *work;
	const char *criu;
	const char *plugin_dir;
	/* containers */
	const char *container;
	struct km_container_opts container_opts;
	const char *podman_args[32];
	const char *container_restore_args[32];
	const char *archive;
	const char *oci_dir;
	const char *image_ref;
	const char *import_cmd;
	const char *oci_runtime;
	unsigned hook_timeout_s;
	bool keep_archive;
};

static __attribute__((format(printf, 1, 2))) int fail(const char *fmt, ...)
{
	va_list ap;

	fputs("kvmotion: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return EXIT_FAILURE;
}

/* Prints err's message if the library left one, else strerror. */
static int fail_with(const char *what, int r, const struct km_error *err)
{
	if (err && err->msg[0])
		return fail("%s: %s", what, err->msg);
	return fail("%s: %s", what, strerror(-r));
}

/* The same with the errno's name, for the network commands ("[ENOSPC]"). */
static int fail_net(const char *what, int r, const struct km_error *err)
{
	const char *name = strerrorname_np(-r);

	if (err && err->msg[0])
		return fail("%s: %s [%s]", what, err->msg, name ? name : "?");
	return fail("%s: %s [%s]", what, strerror(-r), name ? name : "?");
}

static void usage(FILE *f)
{
	fputs("Usage:\n"
	      "  kvmotion seed FILE... [--store S] [--name NAME]   add model files to the store as a weights index\n"
	      "  kvmotion split DIR [--store S] [--add-chunks]     split a CRIU image directory in place\n"
	      "  kvmotion join DIR [--store S] [--keep]            rebuild the original image files\n"
	      "  kvmotion inspect DIR [--extents]                  show what a split image holds\n"
	      "  kvmotion store init|verify|gc|list [--store S]\n"
	      "  kvmotion store has|stat|get ID [--store S] [-o FILE]\n"
	      "  kvmotion store put FILE [--store S]\n"
	      "  kvmotion store release MANIFEST-ID [--store S]   let gc drop what a split image referenced\n"
	      "  kvmotion weights materialize NAME [--store S]    weights index NAME as one read-only file\n"
	      "  kvmotion weights check PATH                      verify a weights file against its name\n"
	      "  kvmotion weights resolve REF [--store S]         REF = index:NAME or a model file: its weights file\n"
	      "  kvmotion engine status|quiesce|resume|probe --pid PID [--timeout-ms N] [--restored]\n"
	      "                                                  talk to a cooperative engine (libkvmotion-engine)\n"
	      "  kvmotion serve --listen ADDR:PORT --store S --images DIR AUTH [--max-bytes N]\n"
	      "                [--restore-cmd CRIU] [--restore-libdir DIR] [--restore-arg ARG]... [--podman P]\n"
	      "                                                   receive migrations (foreground; SIGTERM stops)\n"
	      "  kvmotion send-weights INDEX --store S --to HOST:PORT AUTH [--json]\n"
	      "                                                   pre-copy a weights index, materialize it there\n"
	      "  kvmotion send-image DIR --store S --to HOST:PORT AUTH [--restore] [--json]\n"
	      "                                                   send an image (split, or as CRIU wrote it), restore it there\n"
	      "  kvmotion migrate --pid PID --to HOST:PORT AUTH [--weights INDEX] [--snapshot[=criu]] [--store S] [--work DIR]\n"
	      "                [--criu CRIU] [--plugin-dir DIR] [--json]\n"
	      "                                                   live-migrate a process tree (docs/migrate.md)\n"
	      "  kvmotion snapshot --pid PID DIR [--json]         the memory pages of a running process tree as\n"
	      "                                                   criu dump --leave-running writes them, not stopping it\n"
	      "  kvmotion migrate --container NAME --to HOST:PORT AUTH [--podman P] [--podman-arg ARG]...\n"
	      "                                                   live-migrate a podman container (docs/podman.md)\n"
	      "  kvmotion send-archive ARCHIVE --to HOST:PORT AUTH [--store S] [--restore --container NAME]\n"
	      "                                                   send a container checkpoint archive (and restore it)\n"
	      "  kvmotion k8s-hook prepare|checkpoint-done|before-restore|after-restore [OPTIONS]\n"
	      "                                                   Kubernetes migration hook (docs/kubernetes.md)\n"
	      "  AUTH: --psk-file F (TLS 1.3 pre-shared key) or --cert C --key K --ca CA (mutual TLS)\n"
	      "\n"
	      "Options:\n"
	      "  --store S            chunk store (default $KVMOTION_STORE, else " DEFAULT_STORE ")\n"
	      "  --threads N          worker threads (default: one per CPU)\n"
	      "  --json               print the result as one JSON object\n"
	      "  --no-sync            skip fsync (tmpfs, tests, benchmarks)\n"
	      "  --name NAME          weights index name (seed; default: the first file's name)\n"
	      "  --add-chunks         split: also store every chunk the store lacks\n"
	      "  --min-split-size N   split: files of at least N bytes are split (default 1 MiB;\n"
	      "                       pages-*.img always are)\n"
	      "  --level L            split: zstd level of the delta (default 1)\n"
	      "  --frame-size N       split: raw bytes per delta frame (default 4 MiB)\n"
	      "  --filter MODE        split: byte-plane filter auto|never|always (default auto)\n"
	      "  --keep               join: keep kvmotion.manifest and kvmotion.delta\n"
	      "  --repair             store verify: remove the bad chunks it finds\n"
	      "  --chunk-min/--chunk-avg/--chunk-max N   store init: chunker sizes\n"
	      "  --extents            inspect: list every extent\n"
	      "  -o, --output FILE    store get: write the chunk to FILE\n"
	      "  --weights-dir D      weights, serve: where weights files live (default STORE/weights)\n"
	      "  --pid PID            engine: the engine's process (as this namespace sees it)\n"
	      "  --timeout-ms N       engine: how long to wait for the answer (default 10000)\n"
	      "  --restored           engine resume: tell the engine it was restored\n"
	      "  --psk-file F         a file of one line '[IDENTITY:]HEX' (16 to 64 bytes of key)\n"
	      "  --cert C --key K --ca CA   PEM certificate, key and CA (both ends verify)\n"
	      "  --server-name NAME   send-*: the name the target's certificate must carry\n"
	      "  --max-bytes N        serve: bytes one connection may write (default 256G)\n"
	      "  --max-files N        serve: image files one connection may send (default 4096)\n"
	      "  --max-message N      serve: largest payload of one frame (default and most 64M)\n"
	      "  --max-connections N  serve: migrations at once (default 16)\n"
	      "  --idle-timeout S     serve: drop a sender silent for S seconds (default 300)\n"
	      "  --no-incremental     serve: take no snapshots or incremental images (speak as\n"
	      "                       protocol 1.2 does: senders send whole images)\n"
	      "  --restore-cmd CRIU   serve: CRIU or a wrapper taking its arguments (default criu)\n"
	      "  --restore-libdir D   serve: CRIU plugin directory, passed as -L\n"
	      "  --restore-arg ARG    serve: extra argument for criu restore (repeatable)\n"
	      "  --restore-timeout S  serve: kill a restore running longer (default 300)\n"
	      "  --compress MODE      send-*: zstd on the wire auto|always|never (default auto)\n"
	      "  --label NAME         send-*: name the migration in the target's log and image dir\n"
	      "  --restore            send-image: run criu restore on the target after the join\n"
	      "  --no-materialize     send-weights: do not write the weights file on the target\n"
	      "  --weights INDEX      migrate: pre-copy this weights index (default: the weights\n"
	      "                       files the process maps, else the *.safetensors it has open\n"
	      "                       or mapped, seeded into the store)\n"
	      "  --snapshot[=live|criu]  migrate: also pre-copy the process's memory: read while\n"
	      "                       it runs (live, the default), or a criu dump\n"
	      "                       --leave-running, which freezes it for the dump; the stop\n"
	      "                       then sends only the pages that differ from it (a target\n"
	      "                       of protocol 1.3; else transparent mode only, its pages\n"
	      "                       sent ahead as chunks)\n"
	      "  --keep-snapshot      migrate: keep the snapshot's pagemap and pages files in\n"
	      "                       WORK/snapshot (the older targets' path)\n"
	      "  --stop-dump=page-server|file  migrate with a snapshot: CRIU sends the stop's\n"
	      "                       pages to a page server here that compares them with the\n"
	      "                       snapshot as they come (the default), or writes the whole\n"
	      "                       dump, compared after it\n"
	      "  --work DIR           migrate: where the image goes (DIR/img; default a new /tmp dir)\n"
	      "  --criu CRIU          migrate: CRIU to dump with (default $KVMOTION_CRIU, else criu)\n"
	      "  --plugin-dir DIR     migrate: directory of kvmotion.so, passed to criu as -L\n"
	      "  --container NAME     migrate, send-archive, k8s-hook: the container\n"
	      "  --podman P           serve: restore container archives with podman P (or a\n"
	      "                       wrapper taking its arguments); migrate: podman to use\n"
	      "  --podman-arg ARG     serve, migrate: podman's global option (repeatable)\n"
	      "  --container-restore-arg ARG   serve: extra option of podman container restore\n"
	      "  --archive FILE       k8s-hook: the checkpoint archive\n"
	      "  --oci-dir DIR        k8s-hook before-restore: where the OCI image layout goes\n"
	      "  --image-ref REF      k8s-hook before-restore: the layout's reference name\n"
	      "  --import-cmd CMD     k8s-hook before-restore: run CMD OCI-DIR IMAGE after it\n"
	      "  --oci-runtime NAME   k8s-hook before-restore: the runtime that checkpointed (runc)\n"
	      "  --timeout S          k8s-hook: give up after S seconds (exit status 124)\n"
	      "  --keep-archive       k8s-hook after-restore: keep the archive and its layout\n",
	      f);
}

static int parse_u64(const char *s, uint64_t *ret)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 'K': case 'k': v <<= 10; end++; break;
	case 'M': case 'm': v <<= 20; end++; break;
	case 'G': case 'g': v <<= 30; end++; break;
	default: break;
	}
	if (*end)
		return -EINVAL;
	*ret = v;
	return 0;
}

static int open_store(const struct cli *c, unsigned flags, struct km_store **ret)
{
	int r;

	if (!c->sync)
		flags |= KM_STORE_NOSYNC;
	r = km_store_open(c->store_path, flags, c->chunker_set ? &c->chunker : NULL, ret);
	if (r < 0) {
		const char *why = r == -ENOENT		? "no such store (create it with 'kvmotion store init' or 'kvmotion seed')"
				  : r == -EBADMSG	? "not a kvmotion store (no valid config.kmstore)"
				  : r == -EPROTONOSUPPORT ? "store of an unsupported format version"
				  : r == -EBUSY		? "store is locked by another process (gc running?)"
							: strerror(-r);

		fail("store %s: %s", c->store_path, why);
	}
	return r;
}

static int open_dir(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0)
		fail("%s: %s", path, strerror(errno));
	return fd;
}

static void print_bytes_line(const char *label, uint64_t n)
{
	char b[32];

	printf("  %-28s %15" PRIu64 "  (%s)\n", label, n, km_format_bytes(n, b));
}

static int cmd_seed(struct cli *c, int argc, char **argv)
{
	struct km_store *s = NULL;
	struct km_seed_stats st;
	struct km_error err = { { 0 } };
	const char *name = c->name;
	_cleanup_free_ char *derived = NULL;
	int r;

	if (argc < 1)
		return fail("seed: no model file given");
	if (!name) {
		const char *base = strrchr(argv[0], '/');

		derived = strdup(base ? base + 1 : argv[0]);
		if (!derived)
			return fail("seed: %s", strerror(ENOMEM));
		name = derived;
	}
	if (open_store(c, KM_STORE_CREATE, &s) < 0)
		return EXIT_FAILURE;
	r = km_seed(s, name, (const char *const *)argv, (size_t)argc, c->threads, &st, &err);
	km_store_free(s);
	if (r < 0)
		return fail_with("seed", r, &err);
	if (c->json) {
		printf("{\"name\":\"%s\",\"files\":%" PRIu64 ",\"bytes\":%" PRIu64
		       ",\"chunks\":%" PRIu64 ",\"chunks_added\":%" PRIu64
		       ",\"bytes_added\":%" PRIu64 ",\"bytes_zero\":%" PRIu64 "}\n",
		       name, st.files, st.bytes, st.chunks, st.chunks_added, st.bytes_added,
		       st.bytes_zero);
		return EXIT_SUCCESS;
	}
	printf("seeded weights index %s into %s\n", name, c->store_path);
	print_bytes_line("model bytes", st.bytes);
	print_bytes_line("added to the store", st.bytes_added);
	print_bytes_line("zero (not stored)", st.bytes_zero);
	printf("  %-28s %15" PRIu64 " of %" PRIu64 "\n", "new chunks", st.chunks_added, st.chunks);
	return EXIT_SUCCESS;
}

static int cmd_split(struct cli *c, int argc, char **argv)
{
	struct km_split_opts o = {
		.min_split_size = c->min_split_size,
		.threads = c->threads,
		.add_chunks = c->add_chunks,
		.sync = c->sync,
		.delta = c->delta,
	};
	struct km_split_stats st;
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	_cleanup_close_ int dirfd = -1;
	char hex[KM_HASH_HEX_SIZE];
	int r;

	if (argc != 1)
		return fail("split: expected one image directory");
	dirfd = open_dir(argv[0]);
	if (dirfd < 0)
		return EXIT_FAILURE;
	if (open_store(c, c->add_chunks ? KM_STORE_CREATE : 0, &s) < 0)
		return EXIT_FAILURE;
	r = km_image_split(dirfd, s, &o, &st, &err);
	km_store_free(s);
	if (r < 0)
		return fail_with(argv[0], r, &err);
	km_hash_to_hex(&st.manifest_id, hex);
	if (c->json) {
		printf("{\"manifest_id\":\"%s\",\"files_split\":%" PRIu64 ",\"files_kept\":%" PRIu64
		       ",\"bytes_split\":%" PRIu64 ",\"bytes_referenced\":%" PRIu64
		       ",\"chunks_referenced\":%" PRIu64 ",\"bytes_added\":%" PRIu64
		       ",\"chunks_added\":%" PRIu64 ",\"bytes_zero\":%" PRIu64
		       ",\"bytes_delta\":%" PRIu64 ",\"delta_file_size\":%" PRIu64
		       ",\"manifest_size\":%" PRIu64 "}\n",
		       hex, st.files_split, st.files_kept, st.bytes_split, st.bytes_referenced,
		       st.chunks_referenced, st.bytes_added, st.chunks_added, st.bytes_zero,
		       st.bytes_delta, st.delta_file_size, st.manifest_size);
		return EXIT_SUCCESS;
	}
	printf("split %s: %" PRIu64 " files split, %" PRIu64 " kept (manifest %.16s)\n", argv[0],
	       st.files_split, st.files_kept, hex);
	print_bytes_line("split bytes", st.bytes_split);
	print_bytes_line("referenced in the store", st.bytes_referenced);
	print_bytes_line("added to the store", st.bytes_added);
	print_bytes_line("zero", st.bytes_zero);
	print_bytes_line("delta (raw)", st.bytes_delta);
	print_bytes_line("delta (compressed)", st.delta_file_size);
	print_bytes_line("manifest", st.manifest_size);
	return EXIT_SUCCESS;
}

static int cmd_join(struct cli *c, int argc, char **argv)
{
	struct km_join_opts o = { .threads = c->threads, .keep_split = c->keep, .sync = c->sync };
	struct km_join_stats st;
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	_cleanup_close_ int dirfd = -1;
	int r;

	if (argc != 1)
		return fail("join: expected one image directory");
	dirfd = open_dir(argv[0]);
	if (dirfd < 0)
		return EXIT_FAILURE;
	if (open_store(c, 0, &s) < 0)
		return EXIT_FAILURE;
	r = km_image_join(dirfd, s, &o, &st, &err);
	km_store_free(s);
	if (r < 0)
		return fail_with(argv[0], r, &err);
	if (c->json) {
		printf("{\"files_joined\":%" PRIu64 ",\"bytes_written\":%" PRIu64
		       ",\"bytes_from_store\":%" PRIu64 ",\"chunks_read\":%" PRIu64
		       ",\"bytes_from_delta\":%" PRIu64 ",\"bytes_zero\":%" PRIu64
		       ",\"chunks_recorded\":%" PRIu64 ",\"chunks_hashed\":%" PRIu64 "}\n",
		       st.files_joined, st.bytes_written, st.bytes_from_store, st.chunks_read,
		       st.bytes_from_delta, st.bytes_zero, st.chunks_recorded, st.chunks_hashed);
		return EXIT_SUCCESS;
	}
	printf("joined %s: %" PRIu64 " files rebuilt and verified\n", argv[0], st.files_joined);
	print_bytes_line("written", st.bytes_written);
	print_bytes_line("from the store", st.bytes_from_store);
	print_bytes_line("from the delta", st.bytes_from_delta);
	print_bytes_line("zero", st.bytes_zero);
	printf("  %-28s %15" PRIu64 "\n", "chunks vouched for (record)", st.chunks_recorded);
	printf("  %-28s %15" PRIu64 "\n", "chunks hashed", st.chunks_hashed);
	return EXIT_SUCCESS;
}

static void json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			printf("\\u%04x", (unsigned char)*s);
		else
			putchar(*s);
	}
	putchar('"');
}

static int cmd_inspect(struct cli *c, int argc, char **argv)
{
	struct km_error err = { { 0 } };
	struct km_manifest *m = NULL;
	_cleanup_close_ int dirfd = -1;
	uint64_t tot[3] = { 0 }, chunks = 0, kept = 0;
	char hex[KM_HASH_HEX_SIZE];
	int r;

	if (argc != 1)
		return fail("inspect: expected one image directory");
	dirfd = open_dir(argv[0]);
	if (dirfd < 0)
		return EXIT_FAILURE;
	r = km_image_read_manifest(dirfd, &m, &err);
	if (r < 0)
		return fail_with(argv[0], r, &err);

	for (size_t i = 0; i < m->n_files; i++) {
		const struct km_file_entry *f = &m->files[i];

		if (!f->split)
			kept += f->size;
		for (size_t j = 0; j < f->n_extents; j++) {
			tot[f->extents[j].kind] += f->extents[j].length;
			chunks += f->extents[j].kind == KM_EXTENT_CHUNK;
		}
	}
	if (c->json) {
		printf("{\"format\":\"%u.%u\",\"created_by\":", m->major, m->minor);
		json_string(m->created_by ? m->created_by : "");
		printf(",\"created_unix\":%" PRIu64 ",\"chunker\":{\"min\":%u,\"avg\":%u,\"max\":%u}",
		       m->created_unix, m->chunker.min_size, m->chunker.avg_size,
		       m->chunker.max_size);
		printf(",\"delta\":{\"name\":");
		json_string(m->delta.name);
		printf(",\"raw_size\":%" PRIu64 ",\"compressed_size\":%" PRIu64
		       ",\"frames\":%" PRIu64 ",\"sha256\":\"%s\"}",
		       m->delta.raw_size, m->delta.compressed_size, m->delta.frames,
		       km_hash_to_hex(&m->delta.sha256, hex));
		printf(",\"bytes_referenced\":%" PRIu64 ",\"chunks_referenced\":%" PRIu64
		       ",\"bytes_zero\":%" PRIu64 ",\"bytes_delta\":%" PRIu64
		       ",\"bytes_kept\":%" PRIu64 ",\"files\":[",
		       tot[KM_EXTENT_CHUNK], chunks, tot[KM_EXTENT_ZERO], tot[KM_EXTENT_DELTA], kept);
		for (size_t i = 0; i < m->n_files; i++) {
			const struct km_file_entry *f = &m->files[i];
			uint64_t t[3] = { 0 };

			for (size_t j = 0; j < f->n_extents; j++)
				t[f->extents[j].kind] += f->extents[j].length;
			printf("%s{\"name\":", i ? "," : "");
			json_string(f->name);
			printf(",\"size\":%" PRIu64 ",\"mode\":%u", f->size, f->mode);
			/* 1.2 split files: the extent digest instead of the whole file's. */
			if (!km_hash_is_null(&f->sha256))
				printf(",\"sha256\":\"%s\"", km_hash_to_hex(&f->sha256, hex));
			if (!km_hash_is_null(&f->extents_sha256))
				printf(",\"extents_sha256\":\"%s\"",
				       km_hash_to_hex(&f->extents_sha256, hex));
			printf(",\"storage\":\"%s\"", f->split ? "split" : "kept");
			if (f->split)
				printf(",\"extents\":%zu,\"bytes_referenced\":%" PRIu64
				       ",\"bytes_zero\":%" PRIu64 ",\"bytes_delta\":%" PRIu64,
				       f->n_extents, t[KM_EXTENT_CHUNK], t[KM_EXTENT_ZERO],
				       t[KM_EXTENT_DELTA]);
			putchar('}');
		}
		printf("]}\n");
		km_manifest_free(m);
		return EXIT_SUCCESS;
	}

	printf("split image %s (format %u.%u, %s)\n", argv[0], m->major, m->minor,
	       m->created_by ? m->created_by : "unknown creator");
	printf("  chunker %u/%u/%u, delta %s: %" PRIu64 " frames, %s\n", m->chunker.min_size,
	       m->chunker.avg_size, m->chunker.max_size, m->delta.name, m->delta.frames,
	       km_hash_to_hex(&m->delta.sha256, hex));
	print_bytes_line("referenced in the store", tot[KM_EXTENT_CHUNK]);
	printf("  %-28s %15" PRIu64 "\n", "chunk references", chunks);
	print_bytes_line("zero", tot[KM_EXTENT_ZERO]);
	print_bytes_line("delta (raw)", tot[KM_EXTENT_DELTA]);
	print_bytes_line("delta (compressed)", m->delta.compressed_size);
	print_bytes_line("kept files", kept);
	printf("  files:\n");
	for (size_t i = 0; i < m->n_files; i++) {
		const struct km_file_entry *f = &m->files[i];
		char b[32];

		printf("    %-32s %-5s %12s  %04o  %s%.16s", f->name, f->split ? "split" : "kept",
		       km_format_bytes(f->size, b), f->mode,
		       km_hash_is_null(&f->sha256) ? "extents " : "",
		       km_hash_to_hex(km_hash_is_null(&f->sha256) ? &f->extents_sha256 : &f->sha256,
				      hex));
		if (f->split)
			printf("  %zu extents", f->n_extents);
		putchar('\n');
		if (!c->extents)
			continue;
		for (size_t j = 0, off = 0; j < f->n_extents; off += f->extents[j].length, j++) {
			const struct km_extent *e = &f->extents[j];

			printf("      %12zu +%-10" PRIu64 " ", off, e->length);
			if (e->kind == KM_EXTENT_CHUNK)
				printf("chunk %s\n", km_hash_to_hex(&e->id, hex));
			else if (e->kind == KM_EXTENT_DELTA)
				printf("delta @%" PRIu64 "\n", e->delta_offset);
			else
				printf("zero\n");
		}
	}
	km_manifest_free(m);
	return EXIT_SUCCESS;
}

static void print_bad_chunk(const struct km_hash *id, int error, void *userdata)
{
	char hex[KM_HASH_HEX_SIZE];

	(void)userdata;
	fprintf(stderr, "kvmotion: chunk %s: %s\n", km_hash_to_hex(id, hex),
		error == -EBADMSG ? "corrupt (content does not match its SHA-256)" : strerror(-error));
}

static int print_root(const char *name, void *userdata)
{
	printf("%s/%s\n", (const char *)userdata, name);
	return 0;
}

static int parse_id(const char *s, struct km_hash *ret)
{
	if (km_hash_from_hex(s, ret) < 0)
		return fail("'%s' is not a SHA-256 chunk id (64 hex digits)", s);
	return 0;
}

static int cmd_store(struct cli *c, int argc, char **argv)
{
	struct km_store *s = NULL;
	struct km_error err = { { 0 } };
	struct km_hash id;
	const char *sub;
	int r, ret = EXIT_SUCCESS;

	if (argc < 1)
		return fail("store: expected a subcommand (init, verify, gc, list, has, stat, get, put, release)");
	sub = argv[0];
	argc--;
	argv++;

	if (strcmp(sub, "init") == 0) {
		/* `store init PATH` is what people type: take it, rather than
		 * silently creating the default store somewhere else. */
		if (argc > 1)
			return fail("store init: expected at most one path, got %d", argc);
		if (argc == 1)
			c->store_path = argv[0];
		if (open_store(c, KM_STORE_CREATE, &s) < 0)
			return EXIT_FAILURE;
		printf("store %s: chunker %u/%u/%u\n", c->store_path,
		       km_store_chunker_params(s)->min_size, km_store_chunker_params(s)->avg_size,
		       km_store_chunker_params(s)->max_size);
	} else if (strcmp(sub, "verify") == 0) {
		struct km_store_verify_stats vs;

		if (open_store(c, 0, &s) < 0)
			return EXIT_FAILURE;
		r = km_store_verify(s, c->repair, print_bad_chunk, NULL, &vs);
		if (r < 0 && r != -EBADMSG)
			ret = fail("store verify: %s", strerror(-r));
		else if (c->json)
			printf("{\"chunks\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"bad\":%" PRIu64 "}\n",
			       vs.chunks, vs.bytes, vs.bad);
		else
			printf("verified %" PRIu64 " chunks, %" PRIu64 " bytes: %" PRIu64 " bad%s\n",
			       vs.chunks, vs.bytes, vs.bad,
			       vs.bad && c->repair ? " (removed)" : "");
		if (r == -EBADMSG)
			ret = EXIT_FAILURE;
	} else if (strcmp(sub, "gc") == 0) {
		struct km_store_gc_stats gs;

		if (open_store(c, KM_STORE_EXCLUSIVE, &s) < 0)
			return EXIT_FAILURE;
		r = km_image_store_gc(s, &gs, &err);
		if (r < 0)
			ret = fail_with("store gc", r, &err);
		else if (c->json)
			printf("{\"roots\":%" PRIu64 ",\"chunks_kept\":%" PRIu64
			       ",\"chunks_removed\":%" PRIu64 ",\"bytes_removed\":%" PRIu64 "}\n",
			       gs.roots, gs.chunks_kept, gs.chunks_removed, gs.bytes_removed);
		else
			printf("gc: %" PRIu64 " roots, %" PRIu64 " chunks kept, %" PRIu64
			       " removed (%" PRIu64 " bytes)\n",
			       gs.roots, gs.chunks_kept, gs.chunks_removed, gs.bytes_removed);
	} else if (strcmp(sub, "list") == 0) {
		if (open_store(c, 0, &s) < 0)
			return EXIT_FAILURE;
		r = km_store_root_foreach(s, "indexes", print_root, (void *)"indexes");
		if (r == 0)
			r = km_store_root_foreach(s, "manifests", print_root, (void *)"manifests");
		if (r < 0)
			ret = fail("store list: %s", strerror(-r));
	} else if (strcmp(sub, "has") == 0 || strcmp(sub, "stat") == 0 ||
		   strcmp(sub, "get") == 0) {
		uint64_t size;

		if (argc != 1)
			return fail("store %s: expected one chunk id", sub);
		if (parse_id(argv[0], &id) != 0)
			return EXIT_FAILURE;
		if (open_store(c, 0, &s) < 0)
			return EXIT_FAILURE;
		if (strcmp(sub, "has") == 0) {
			r = km_store_has(s, &id);
			if (r < 0)
				ret = fail("store has: %s", strerror(-r));
			else
				ret = r ? EXIT_SUCCESS : EXIT_FAILURE;
		} else if (strcmp(sub, "stat") == 0) {
			r = km_store_stat(s, &id, &size);
			if (r < 0)
				ret = fail("chunk %s: %s", argv[0],
					   r == -ENOENT ? "missing from the store" : strerror(-r));
			else
				printf("%" PRIu64 "\n", size);
		} else {
			_cleanup_free_ void *buf = malloc(KM_CHUNK_MAX_LIMIT);
			size_t n = 0;

			if (!buf)
				return fail("store get: %s", strerror(ENOMEM));
			r = km_store_get(s, &id, buf, KM_CHUNK_MAX_LIMIT, &n);
			if (r < 0) {
				ret = fail("chunk %s: %s", argv[0],
					   r == -ENOENT	   ? "missing from the store"
					   : r == -EBADMSG ? "corrupt (content does not match its SHA-256)"
							   : strerror(-r));
			} else {
				_cleanup_close_ int fd = c->output ? open(c->output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)
								   : dup(STDOUT_FILENO);

				if (fd < 0 || km_write_full(fd, buf, n) < 0)
					ret = fail("store get: cannot write %s: %s",
						   c->output ? c->output : "stdout", strerror(errno));
			}
		}
	} else if (strcmp(sub, "put") == 0) {
		_cleanup_free_ void *buf = NULL;
		size_t n;
		char hex[KM_HASH_HEX_SIZE];

		if (argc != 1)
			return fail("store put: expected one file");
		r = km_read_file_at(AT_FDCWD, argv[0], KM_CHUNK_MAX_LIMIT, &buf, &n);
		if (r < 0)
			return fail("store put: %s: %s", argv[0],
				    r == -EFBIG ? "larger than a chunk may be" : strerror(-r));
		if (open_store(c, KM_STORE_CREATE, &s) < 0)
			return EXIT_FAILURE;
		km_hash_buf(buf, n, &id);
		r = km_store_put(s, &id, buf, n);
		if (r < 0 && r != -EEXIST)
			ret = fail("store put: %s", strerror(-r));
		else
			printf("%s%s\n", km_hash_to_hex(&id, hex), r == -EEXIST ? " (already stored)" : "");
	} else if (strcmp(sub, "release") == 0) {
		char root[KM_HASH_HEX_SIZE + 8];

		if (argc != 1)
			return fail("store release: expected one manifest id");
		if (parse_id(argv[0], &id) != 0)
			return EXIT_FAILURE;
		if (open_store(c, 0, &s) < 0)
			return EXIT_FAILURE;
		snprintf(root, sizeof(root), "%s.kmman", argv[0]);
		r = km_store_root_remove(s, "manifests", root);
		if (r < 0)
			ret = fail("store release %s: %s", argv[0],
				   r == -ENOENT ? "no such manifest in the store" : strerror(-r));
	} else {
		return fail("store: unknown subcommand '%s'", sub);
	}
	km_store_free(s);
	return ret;
}

static void print_weights_json(const struct km_weights_info *w, const char *index)
{
	char hex[KM_HASH_HEX_SIZE];

	printf("{\"id\":\"%s\",\"size\":%" PRIu64 ",\"path\":", km_hash_to_hex(&w->id, hex),
	       w->size);
	json_string(w->path);
	if (index) {
		printf(",\"index\":");
		json_string(index);
	}
	printf(",\"written\":%s,\"bytes_hashed\":%" PRIu64 "}\n", w->written ? "true" : "false",
	       w->bytes_hashed);
}

static int cmd_weights(struct cli *c, int argc, char **argv)
{
	struct km_weights_info w;
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	char index[256];
	const char *sub;
	int r;

	if (argc < 1)
		return fail("weights: expected a subcommand (materialize, check, resolve)");
	sub = argv[0];
	argc--;
	argv++;

	if (strcmp(sub, "check") == 0) {
		struct km_hash id;
		uint64_t hashed = 0;
		char hex[KM_HASH_HEX_SIZE];

		if (argc != 1)
			return fail("weights check: expected one weights file");
		if (km_weights_id_from_path(argv[0], &id) < 0)
			return fail("weights check: %s: not a weights file name (<64 hex>%s)", argv[0],
				    KM_WEIGHTS_SUFFIX);
		r = km_weights_check(argv[0], &id, UINT64_MAX, &hashed, &err);
		if (r < 0)
			return fail_with("weights check", r, &err);
		if (c->json) {
			printf("{\"id\":\"%s\",\"path\":", km_hash_to_hex(&id, hex));
			json_string(argv[0]);
			printf(",\"bytes_hashed\":%" PRIu64 "}\n", hashed);
		} else if (hashed) {
			printf("%s: good (%" PRIu64 " bytes hashed)\n", argv[0], hashed);
		} else {
			printf("%s: good (unchanged since verified)\n", argv[0]);
		}
		return EXIT_SUCCESS;
	}
	if (strcmp(sub, "materialize") == 0) {
		if (argc != 1)
			return fail("weights materialize: expected one weights index name");
		if (open_store(c, 0, &s) < 0)
			return EXIT_FAILURE;
		r = km_weights_materialize(s, argv[0], c->weights_dir, c->sync, &w, &err);
		snprintf(index, sizeof(index), "%s", argv[0]);
	} else if (strcmp(sub, "resolve") == 0) {
		if (argc != 1)
			return fail("weights resolve: expected one reference (index:NAME or a model file)");
		/* A model file is seeded into the store, which may be new. */
		if (open_store(c, strncmp(argv[0], "index:", 6) == 0 ? 0 : KM_STORE_CREATE, &s) < 0)
			return EXIT_FAILURE;
		r = km_weights_resolve(s, argv[0], c->weights_dir, c->sync, &w, index, sizeof(index),
				       &err);
	} else {
		return fail("weights: unknown subcommand '%s'", sub);
	}
	km_store_free(s);
	if (r < 0) {
		char what[300];

		snprintf(what, sizeof(what), "weights %s %s", sub, argv[0]);
		return fail_with(what, r, &err);
	}
	if (c->json)
		print_weights_json(&w, index);
	else
		printf("%s\n", w.path);
	return EXIT_SUCCESS;
}

static int cmd_engine(struct cli *c, int argc, char **argv)
{
	struct km_error err = { { 0 } };
	const char *sub;
	char hex[KM_HASH_HEX_SIZE];
	int r;

	if (argc != 1)
		return fail("engine: expected one subcommand (status, quiesce, resume, probe)");
	sub = argv[0];
	if (c->pid <= 0)
		return fail("engine %s: --pid PID is required", sub);

	if (strcmp(sub, "probe") == 0) {
		r = km_engine_probe(c->pid);
		if (r < 0)
			return fail("engine probe: pid %d: %s", (int)c->pid, strerror(-r));
		if (c->json)
			printf("{\"pid\":%d,\"engine\":%s}\n", (int)c->pid, r ? "true" : "false");
		else
			printf("pid %d: %s\n", (int)c->pid,
			       r ? "cooperative engine" : "no cooperative engine");
		return r ? EXIT_SUCCESS : EXIT_FAILURE;
	}
	if (strcmp(sub, "status") == 0) {
		struct km_engine_status st;

		r = km_engine_status(c->pid, c->timeout_ms, &st, &err);
		if (r < 0)
			return fail_with("engine status", r, &err);
		if (c->json) {
			printf("{\"pid\":%d,\"engine_pid\":%d,\"state\":\"%s\",\"quiesces\":%" PRIu64
			       ",\"resumes\":%" PRIu64 ",\"cancelled\":%" PRIu64 ",\"refused\":%" PRIu64
			       ",\"self_resumes\":%" PRIu64 ",\"last_free_blocks\":%u"
			       ",\"last_released_bytes\":%" PRIu64 ",\"restored\":%s}\n",
			       (int)c->pid, (int)st.engine_pid, st.quiesced ? "quiesced" : "running",
			       st.quiesces, st.resumes, st.cancelled, st.refused, st.self_resumes,
			       st.last_free_blocks, st.last_released_bytes,
			       st.restored ? "true" : "false");
			return EXIT_SUCCESS;
		}
		printf("engine in pid %d: %s\n", (int)c->pid, st.quiesced ? "quiesced" : "running");
		printf("  %-28s %15" PRIu64 "\n", "quiesces", st.quiesces);
		printf("  %-28s %15" PRIu64 "%s\n", "resumes", st.resumes,
		       st.resumes ? (st.restored ? "  (last after a restore)" : "") : "");
		printf("  %-28s %15" PRIu64 "\n", "cancelled", st.cancelled);
		printf("  %-28s %15" PRIu64 "\n", "refused", st.refused);
		printf("  %-28s %15" PRIu64 "\n", "resumed by itself", st.self_resumes);
		printf("  %-28s %15u\n", "free KV blocks (last)", st.last_free_blocks);
		print_bytes_line("released (last)", st.last_released_bytes);
		return EXIT_SUCCESS;
	}
	if (strcmp(sub, "quiesce") == 0) {
		struct km_engine_quiesced q = { 0 };

		r = km_engine_quiesce(c->pid, c->timeout_ms, &q, &err);
		if (r < 0)
			return fail_with("engine quiesce", r, &err);
		if (c->json) {
			printf("{\"pid\":%d,\"free_blocks\":%u,\"released_bytes\":%" PRIu64
			       ",\"weights\":[",
			       (int)c->pid, q.free_blocks, q.released_bytes);
			for (size_t i = 0; i < q.n_weights; i++) {
				printf("%s{\"path\":", i ? "," : "");
				json_string(q.weights[i].path);
				printf(",\"sha256\":\"%s\",\"size\":%" PRIu64 "}",
				       km_hash_to_hex(&q.weights[i].id, hex), q.weights[i].size);
			}
			printf("]}\n");
		} else {
			printf("engine in pid %d quiesced: %u free KV blocks\n", (int)c->pid,
			       q.free_blocks);
			print_bytes_line("released", q.released_bytes);
			for (size_t i = 0; i < q.n_weights; i++)
				printf("  weights %s  %.16s  %" PRIu64 " bytes\n", q.weights[i].path,
				       km_hash_to_hex(&q.weights[i].id, hex), q.weights[i].size);
		}
		km_engine_quiesced_clear(&q);
		return EXIT_SUCCESS;
	}
	if (strcmp(sub, "resume") == 0) {
		r = km_engine_resume(c->pid, c->restored, c->timeout_ms, &err);
		if (r < 0)
			return fail_with("engine resume", r, &err);
		if (c->json)
			printf("{\"pid\":%d,\"resumed\":true,\"restored\":%s}\n", (int)c->pid,
			       c->restored ? "true" : "false");
		else
			printf("engine in pid %d resumed%s\n", (int)c->pid,
			       c->restored ? " (restored)" : "");
		return EXIT_SUCCESS;
	}
	return fail("engine: unknown subcommand '%s'", sub);
}

/* ------------------------------------------------------------ network */

static void serve_log(void *userdata, const char *line)
{
	struct timespec ts;
	struct tm tm;
	char stamp[32];

	(void)userdata;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
	/* One fprintf per event: stdio's lock keeps lines of threads apart. */
	fprintf(stderr, "kvmotion serve %s.%03ld: %s\n", stamp, ts.tv_nsec / 1000000, line);
}

static int cmd_serve(struct cli *c, int argc, char **argv)
{
	struct km_serve_opts o = {
		.listen = c->listen,
		.store = c->store_path,
		.images = c->images,
		.weights_dir = c->weights_dir,
		.tls = c->tls,
		.max_bytes = c->max_bytes,
		.max_files = c->max_files,
		.max_payload = c->max_message,
		.max_connections = c->max_connections,
		.idle_timeout_s = c->idle_timeout_s,
		.no_incremental = c->no_incremental,
		.sync = c->sync,
		.restore = c->restore_opts,
		.container = c->container_opts,
		.log = serve_log,
	};
	struct km_error err = { { 0 } };
	struct km_server *s = NULL;
	_cleanup_close_ int sfd = -1;
	sigset_t stop;
	int r;

	if (argc != 0)
		return fail("serve: unexpected argument '%s'", argv[0]);
	if (!c->listen || !c->images)
		return fail("serve: --listen ADDR:PORT and --images DIR are required");
	/*
	 * SIGTERM and SIGINT arrive through a signalfd that the server polls:
	 * blocked here, before any thread exists, so that every thread has
	 * them blocked.
	 */
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	sigprocmask(SIG_BLOCK, &stop, NULL);
	signal(SIGPIPE, SIG_IGN);
	sfd = signalfd(-1, &stop, SFD_CLOEXEC);
	if (sfd < 0)
		return fail("serve: signalfd: %s", strerror(errno));
	o.stop_fd = sfd;
	r = km_serve_new(&o, &s, &err);
	if (r < 0)
		return fail_net("serve", r, &err);
	r = km_serve_run(s, &err);
	km_serve_free(s);
	if (r < 0)
		return fail_net("serve", r, &err);
	return EXIT_SUCCESS;
}

static int client_connect(struct cli *c, const char *what, struct km_client **ret)
{
	struct km_client_opts o = {
		.tls = c->tls,
		.label = c->label,
		.compress = c->compress,
	};
	struct km_error err = { { 0 } };
	const char *corrupt = getenv("KVMOTION_TEST_CORRUPT_SEND");
	const char *corrupt_piece = getenv("KVMOTION_TEST_CORRUPT_PIECE");
	int r;

	if (!c->to)
		return fail("%s: --to HOST:PORT is required", what);
	/* Tests only: damage the n-th chunk or file piece after hashing it (see transport.h). */
	if (corrupt && corrupt[0])
		o.test_corrupt_chunk = (unsigned)strtoul(corrupt, NULL, 10);
	if (corrupt_piece && corrupt_piece[0])
		o.test_corrupt_piece = (unsigned)strtoul(corrupt_piece, NULL, 10);
	r = km_client_connect(c->to, &o, ret, &err);
	if (r < 0)
		fail_net(what, r, &err); /* err names the address */
	return r;
}

static double secs(uint64_t ns)
{
	return (double)ns / 1e9;
}

static const char *compress_name(enum km_compress m)
{
	return m == KM_COMPRESS_ALWAYS ? "always" : m == KM_COMPRESS_NEVER ? "never" : "auto";
}

static void print_send_stats_json(const struct km_send_stats *st)
{
	printf("\"chunks\":%" PRIu64 ",\"chunks_sent\":%" PRIu64 ",\"chunks_deduplicated\":%" PRIu64
	       ",\"chunks_compressed\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"bytes_sent\":%" PRIu64
	       ",\"bytes_deduplicated\":%" PRIu64 ",\"wire_bytes\":%" PRIu64
	       ",\"pieces_compressed\":%" PRIu64,
	       st->chunks, st->chunks_sent, st->chunks_deduplicated, st->chunks_compressed,
	       st->bytes, st->bytes_sent, st->bytes_deduplicated, st->wire_bytes,
	       st->pieces_compressed);
}

static int cmd_send_weights(struct cli *c, int argc, char **argv)
{
	const struct km_target_info *ti;
	struct km_send_stats st;
	struct km_remote_weights rw;
	struct km_error err = { { 0 } };
	struct km_client *cl = NULL;
	struct km_store *s = NULL;
	const char *skipped = NULL;
	char hex[KM_HASH_HEX_SIZE], b1[32], b2[32];
	bool materialized = false;
	int r, ret = EXIT_FAILURE;

	if (argc != 1)
		return fail("send-weights: expected one weights index name");
	memset(&rw, 0, sizeof(rw));
	if (open_store(c, 0, &s) < 0)
		return EXIT_FAILURE;
	if (client_connect(c, "send-weights", &cl) < 0)
		goto out;
	ti = km_client_target(cl);
	r = km_client_send_weights(cl, s, argv[0], &st, &err);
	if (r < 0) {
		fail_net("send-weights", r, &err);
		goto out;
	}
	if (!c->materialize) {
		skipped = "--no-materialize";
	} else if (!ti->can_materialize) {
		skipped = "the target cannot materialize weights (built without weights.c)";
		fprintf(stderr, "kvmotion: send-weights: warning: %s\n", skipped);
	} else {
		r = km_client_materialize(cl, argv[0], &rw, &err);
		if (r < 0) {
			fail_net("send-weights: materialize", r, &err);
			goto out;
		}
		materialized = true;
	}
	if (c->json) {
		printf("{\"index\":");
		json_string(argv[0]);
		printf(",\"target\":");
		json_string(c->to);
		printf(",\"cipher\":");
		json_string(ti->cipher);
		printf(",\"compress\":\"%s\",", compress_name(c->compress));
		print_send_stats_json(&st);
		printf(",\"seconds\":{\"connect\":%.6f,\"query\":%.6f,\"chunks\":%.6f,\"index\":%.6f,\"materialize\":%.6f,\"total\":%.6f}",
		       secs(ti->connect_ns), secs(st.query_ns), secs(st.chunks_ns), secs(st.index_ns),
		       secs(rw.ns), secs(ti->connect_ns + st.total_ns + rw.ns));
		printf(",\"target_seconds\":{\"store\":%.6f,\"materialize\":%.6f}",
		       secs(st.target_store_ns), secs(rw.target_ns));
		if (materialized) {
			printf(",\"weights\":{\"path\":");
			json_string(rw.path);
			printf(",\"id\":\"%s\",\"size\":%" PRIu64 ",\"written\":%s}",
			       km_hash_to_hex(&rw.id, hex), rw.size, rw.written ? "true" : "false");
		} else {
			printf(",\"weights\":null,\"materialize_skipped\":");
			json_string(skipped);
		}
		printf("}\n");
	} else {
		printf("sent weights index %s to %s (%s)\n", argv[0], c->to, ti->cipher);
		print_bytes_line("chunk bytes", st.bytes);
		print_bytes_line("sent", st.bytes_sent);
		print_bytes_line("deduplicated (target had)", st.bytes_deduplicated);
		print_bytes_line("on the wire", st.wire_bytes);
		printf("  %-28s %15" PRIu64 " of %" PRIu64 " (%" PRIu64 " compressed)\n", "chunks sent",
		       st.chunks_sent, st.chunks, st.chunks_compressed);
		printf("  %-28s %15.3f s (%s/s)\n", "chunk transfer", secs(st.chunks_ns),
		       km_format_bytes(st.chunks_ns ? (uint64_t)((double)st.bytes_sent / secs(st.chunks_ns)) : 0, b1));
		if (materialized)
			printf("  weights file %s (%s, %s)\n", rw.path, km_format_bytes(rw.size, b2),
			       rw.written ? "written" : "already there");
		else
			printf("  weights file not materialized: %s\n", skipped);
	}
	ret = EXIT_SUCCESS;
out:
	km_client_free(cl);
	km_store_free(s);
	return ret;
}

static int cmd_send_image(struct cli *c, int argc, char **argv)
{
	struct km_image_send_opts o = { .label = c->label, .restore = c->restore };
	const struct km_target_info *ti;
	struct km_send_stats st;
	struct km_image_result res;
	struct km_error err = { { 0 } };
	struct km_client *cl = NULL;
	struct km_store *s = NULL;
	_cleanup_close_ int dirfd = -1;
	char tail[4096] = "";
	int r, ret = EXIT_FAILURE;

	if (argc != 1)
		return fail("send-image: expected one image directory");
	dirfd = open_dir(argv[0]);
	if (dirfd < 0)
		return EXIT_FAILURE;
	if (open_store(c, 0, &s) < 0)
		return EXIT_FAILURE;
	if (client_connect(c, "send-image", &cl) < 0)
		goto out;
	ti = km_client_target(cl);
	r = km_client_send_image(cl, dirfd, s, &o, &st, &res, tail, sizeof(tail), &err);
	if (r < 0) {
		fail_net("send-image", r, &err);
		if (tail[0])
			fprintf(stderr, "kvmotion: criu's restore.log on the target ends with:\n%s\n", tail);
		goto out;
	}
	if (c->json) {
		printf("{\"dir\":");
		json_string(res.dir);
		printf(",\"target\":");
		json_string(c->to);
		printf(",\"compress\":\"%s\",\"files\":%" PRIu64 ",\"file_bytes\":%" PRIu64 ",",
		       compress_name(c->compress), st.files, st.file_bytes);
		print_send_stats_json(&st);
		printf(",\"unsplit\":%s,\"bytes_joined\":%" PRIu64 ",\"restored_pid\":%d",
		       res.unsplit ? "true" : "false", res.bytes_joined, res.restored_pid);
		printf(",\"seconds\":{\"connect\":%.6f,\"query\":%.6f,\"chunks\":%.6f,\"files\":%.6f,\"commit\":%.6f,\"total\":%.6f}",
		       secs(ti->connect_ns), secs(st.query_ns), secs(st.chunks_ns), secs(st.files_ns),
		       secs(st.commit_ns), secs(ti->connect_ns + st.total_ns));
		printf(",\"target_seconds\":{\"store\":%.6f,\"join\":%.6f,\"restore\":%.6f}}\n",
		       secs(st.target_store_ns), secs(res.join_ns), secs(res.restore_ns));
	} else {
		printf("sent image %s to %s: directory %s\n", argv[0], c->to, res.dir);
		printf("  %-28s %15" PRIu64 "\n", "files", st.files);
		print_bytes_line("file bytes", st.file_bytes);
		print_bytes_line("chunk bytes sent", st.bytes_sent);
		print_bytes_line("deduplicated (target had)", st.bytes_deduplicated);
		print_bytes_line("on the wire", st.wire_bytes);
		printf("  %-28s %15.3f s\n", "join on the target", secs(res.join_ns));
		if (res.restored_pid)
			printf("  restored as pid %d in %.3f s\n", res.restored_pid, secs(res.restore_ns));
	}
	ret = EXIT_SUCCESS;
out:
	km_client_free(cl);
	km_store_free(s);
	return ret;
}

static void print_phases_json(const struct km_migrate_report *r)
{
	printf("\"stop_seconds\":{\"quiesce\":%.6f,\"freeze\":%.6f,\"gpu_checkpoint\":%.6f,"
	       "\"dump\":%.6f,\"split\":%.6f,\"transfer\":%.6f,\"join\":%.6f,\"restore\":%.6f,"
	       "\"commit_wait\":%.6f,\"gpu_restore\":%.6f,\"resume\":%.6f,\"kill\":%.6f,\"total\":%.6f,"
	       "\"compare\":%.6f}",
	       secs(r->quiesce_ns), secs(r->freeze_ns), secs(r->gpu_checkpoint_ns), secs(r->dump_ns),
	       secs(r->split_ns), secs(r->transfer_ns), secs(r->join_ns), secs(r->restore_ns),
	       secs(r->commit_wait_ns), secs(r->gpu_restore_ns), secs(r->resume_ns),
	       secs(r->kill_ns), secs(r->stop_ns), secs(r->compare_ns));
}

static void print_migrate_json(const struct cli *c, const struct km_migrate_report *r, int rc,
			       const struct km_error *err)
{
	const char *name = rc < 0 ? strerrorname_np(-rc) : NULL;

	printf("{\"ok\":%s,\"pid\":%d,\"target\":", rc == 0 ? "true" : "false", (int)r->pid);
	json_string(c->to);
	if (c->container) {
		printf(",\"container\":");
		json_string(c->container);
	}
	printf(",\"mode\":\"%s\",\"weights\":[", r->cooperative ? "cooperative" : "transparent");
	for (size_t i = 0; i < r->n_weights; i++) {
		if (i)
			putchar(',');
		json_string(r->weights_index[i]);
	}
	printf("],\"weights_from\":[");
	for (size_t i = 0; i < r->n_weights; i++) {
		if (i)
			putchar(',');
		json_string(r->weights_from[i]);
	}
	printf("],\"bytes_seeded\":%" PRIu64, r->bytes_seeded);
	printf(",\"restored_pid\":%d,\"resumed\":%s,\"error\":", r->restored_pid,
	       r->resumed ? "true" : "false");
	if (rc < 0) {
		json_string(err->msg[0] ? err->msg : strerror(-rc));
		printf(",\"errno\":\"%s\"", name ? name : "?");
	} else {
		printf("null");
	}
	printf(",\"image_dir\":");
	json_string(r->image_dir);
	printf(",\"target_dir\":");
	json_string(r->target_dir);
	printf(",\"image\":\"%s\",\"image_bytes\":%" PRIu64, r->image_split ? "split" : "unsplit",
	       r->image_bytes);
	printf(",\"bytes_sent_before_stop\":%" PRIu64 ",\"bytes_sent_during_stop\":%" PRIu64
	       ",\"bytes_deduplicated\":%" PRIu64 ",\"wire_bytes_before_stop\":%" PRIu64
	       ",\"wire_bytes_during_stop\":%" PRIu64,
	       r->precopy.bytes_sent + r->snapshot.bytes_sent + r->snapshot.file_bytes,
	       r->stop.bytes_sent + r->stop.file_bytes,
	       r->precopy.bytes_deduplicated + r->snapshot.bytes_deduplicated +
		       r->stop.bytes_deduplicated,
	       r->precopy.wire_bytes + r->snapshot.wire_bytes, r->stop.wire_bytes);
	printf(",\"incremental\":%s,\"incremental_why\":", r->incremental ? "true" : "false");
	if (r->incremental_why[0])
		json_string(r->incremental_why);
	else
		printf("null");
	printf(",\"snapshot\":");
	if (r->snapshot_mode[0]) {
		char hex[KM_HASH_HEX_SIZE];

		/* seconds: taking it (a criu snapshot freezes the tree that long) */
		printf("{\"mode\":\"%s\",\"image_bytes\":%" PRIu64 ",\"seconds\":%.6f,\"target_dir\":",
		       r->snapshot_mode, r->snapshot_bytes, secs(r->snapshot_ns));
		json_string(r->snapshot_dir);
		printf(",\"id\":\"%s\",\"id_seconds\":%.6f,\"split_seconds\":%.6f,"
		       "\"send_seconds\":%.6f,",
		       r->snapshot_dir[0] ? km_hash_to_hex(&r->snapshot_id, hex) : "",
		       secs(r->snapshot_id_ns), secs(r->snapshot_split_ns), secs(r->snapshot_send_ns));
		print_send_stats_json(&r->snapshot);
		printf(",\"files\":%" PRIu64 ",\"file_bytes\":%" PRIu64 "}", r->snapshot.files,
		       r->snapshot.file_bytes);
	} else {
		printf("null");
	}
	printf(",\"pages\":{\"dumped\":%" PRIu64 ",\"from_snapshot\":%" PRIu64
	       ",\"sent\":%" PRIu64 ",\"dump\":",
	       r->pages, r->pages_parent, r->pages_present);
	if (r->stop_dump[0])
		json_string(r->stop_dump);
	else
		printf("null");
	/* page-server: its receiving, comparing and writing, while CRIU dumped */
	printf(",\"page_server_seconds\":%.6f}", secs(r->pagesrv_ns));
	printf(",\"precopy\":{");
	print_send_stats_json(&r->precopy);
	printf(",\"seconds\":%.6f,\"discover_seconds\":%.6f},\"stop\":{", secs(r->precopy_ns),
	       secs(r->discover_ns));
	print_send_stats_json(&r->stop);
	printf(",\"files\":%" PRIu64 ",\"file_bytes\":%" PRIu64 "},", r->stop.files,
	       r->stop.file_bytes);
	print_phases_json(r);
	printf(",\"total_seconds\":%.6f}\n", secs(r->total_ns));
}

static void migrate_progress(void *userdata, enum km_migrate_phase phase,
			     const struct km_migrate_report *r)
{
	char b[32];

	(void)userdata;
	if (phase == KM_MIGRATE_DUMP)
		fprintf(stderr, "\rkvmotion migrate: pre-copy done (%s sent), stopping pid %d...   ",
			km_format_bytes(r->precopy.bytes_sent, b), (int)r->pid);
	else if (phase == KM_MIGRATE_SEND)
		fprintf(stderr, "\rkvmotion migrate: dumped (%s), sending and restoring...        ",
			km_format_bytes(r->image_bytes, b));
	else if (phase == KM_MIGRATE_RESUME)
		fprintf(stderr, "\rkvmotion migrate: failed (%s), resuming the source...\n", r->why);
	else if (phase == KM_MIGRATE_DONE)
		fprintf(stderr, "\rkvmotion migrate: restored as pid %d, stop %.3f s              \n",
			r->restored_pid, secs(r->stop_ns));
	else
		fprintf(stderr, "\rkvmotion migrate: pre-copy of pid %d's weights...   ",
			(int)r->pid);
	fflush(stderr);
}

/* The live snapshot alone (livesnap.h): for tests and to measure it. */
static int cmd_snapshot(struct cli *c, int argc, char **argv)
{
	struct km_live_snapshot_stats st;
	struct km_error err = { { 0 } };
	_cleanup_close_ int dfd = -1;
	int r;

	if (argc != 1 || c->pid <= 0)
		return fail("snapshot: --pid PID and a directory are required");
	if (mkdir(argv[0], 0700) < 0 && errno != EEXIST)
		return fail("snapshot: cannot create %s: %s", argv[0], strerror(errno));
	dfd = open_dir(argv[0]);
	if (dfd < 0)
		return EXIT_FAILURE;
	r = km_live_snapshot(c->pid, dfd, &st, &err);
	if (r < 0)
		return fail_with("snapshot", r, &err);
	if (c->json) {
		printf("{\"tasks\":%" PRIu64 ",\"vmas\":%" PRIu64 ",\"pages\":%" PRIu64
		       ",\"bytes\":%" PRIu64 ",\"pages_unreadable\":%" PRIu64
		       ",\"pagemap_scan\":%s,\"scan_s\":%.6f,\"read_s\":%.6f,\"write_s\":%.6f"
		       ",\"total_s\":%.6f}\n",
		       st.tasks, st.vmas, st.pages, st.bytes, st.pages_unreadable,
		       st.pagemap_scan ? "true" : "false", secs(st.scan_ns), secs(st.read_ns),
		       secs(st.write_ns), secs(st.total_ns));
	} else {
		char b[32];

		printf("snapshot of pid %d: %" PRIu64 " tasks, %" PRIu64 " pages (%s) in %.3f s "
		       "(scan %.3f, read %.3f, write %.3f)\n",
		       (int)c->pid, st.tasks, st.pages, km_format_bytes(st.bytes, b),
		       secs(st.total_ns), secs(st.scan_ns), secs(st.read_ns), secs(st.write_ns));
	}
	return EXIT_SUCCESS;
}

static int cmd_migrate(struct cli *c, int argc, char **argv)
{
	struct km_migrate_opts o = {
		.pid = c->pid,
		.to = c->to,
		.client = { .tls = c->tls, .label = c->label, .compress = c->compress },
		.store = c->store_path,
		/* the plugin's setting: both must agree on where weights files are */
		.weights_dir = c->weights_dir ? c->weights_dir : getenv("KVMOTION_WEIGHTS_DIR"),
		.weights_index = c->weights_index,
		.snapshot = c->snapshot,
		.snapshot_criu = c->snapshot_criu,
		.snapshot_keep = c->keep_snapshot,
		.stop_dump_file = c->stop_dump_file,
		.work = c->work,
		.criu = c->criu ? c->criu : getenv("KVMOTION_CRIU"),
		.plugin_dir = c->plugin_dir,
		.libcuda = getenv("KVMOTION_LIBCUDA"),
		.engine_timeout_ms = c->timeout_ms,
	};
	struct km_migrate_report rep;
	struct km_error err = { { 0 } };
	const char *corrupt = getenv("KVMOTION_TEST_CORRUPT_SEND");
	const char *corrupt_piece = getenv("KVMOTION_TEST_CORRUPT_PIECE");
	const char *wrong_parent = getenv("KVMOTION_TEST_WRONG_PARENT");
	const char *pagesrv_fail = getenv("KVMOTION_TEST_PAGESRV_FAIL");
	char work[] = "/tmp/kvmotion-migrate-XXXXXX";
	int r;

	if (argc != 0)
		return fail("migrate: unexpected argument '%s'", argv[0]);
	if ((c->pid <= 0) == !c->container || !c->to)
		return fail(
			"migrate: --pid PID or --container NAME, and --to HOST:PORT are required");
	if (!o.work) {
		if (!mkdtemp(work))
			return fail("migrate: cannot create a work directory: %s", strerror(errno));
		o.work = work;
	}
	if (corrupt && corrupt[0])
		o.client.test_corrupt_chunk = (unsigned)strtoul(corrupt, NULL, 10);
	if (corrupt_piece && corrupt_piece[0])
		o.client.test_corrupt_piece = (unsigned)strtoul(corrupt_piece, NULL, 10);
	if (wrong_parent && wrong_parent[0])
		o.test_wrong_parent = (unsigned)strtoul(wrong_parent, NULL, 10);
	if (pagesrv_fail && pagesrv_fail[0])
		o.test_pagesrv_fail_after = strtoull(pagesrv_fail, NULL, 10);
	if (!c->json && isatty(STDERR_FILENO))
		o.progress = migrate_progress;
	signal(SIGPIPE, SIG_IGN);
	if (c->container) {
		struct km_container_move_opts co = {
			.name = c->container,
			.podman = c->container_opts.podman,
			.podman_args = c->container_opts.args,
			.n_podman_args = c->container_opts.n_args,
			.m = o,
		};

		r = km_container_move(&co, &rep, &err);
	} else {
		r = km_migrate(&o, &rep, &err);
	}
	/* the fallback to a whole image is worth a line in any mode */
	if (!rep.incremental && rep.incremental_why[0])
		fprintf(stderr, "kvmotion: migrate: the stop is not incremental: %s\n",
			rep.incremental_why);
	if (c->json) {
		print_migrate_json(c, &rep, r, &err);
	} else if (r == 0) {
		char b1[32], b2[32], b3[32];

		printf("migrated %s%s%spid %d to %s: restored as pid %d (%s mode)\n",
		       c->container ? "container " : "", c->container ? c->container : "",
		       c->container ? ", " : "", (int)rep.pid, c->to, rep.restored_pid,
		       rep.cooperative ? "cooperative" : "transparent");
		printf("  stop %.3f s: quiesce %.3f, freeze %.3f, GPU checkpoint %.3f, dump %.3f, "
		       "split %.3f, transfer %.3f, join %.3f, restore %.3f, GPU restore %.3f, "
		       "resume %.3f\n",
		       secs(rep.stop_ns), secs(rep.quiesce_ns), secs(rep.freeze_ns),
		       secs(rep.gpu_checkpoint_ns), secs(rep.dump_ns), secs(rep.split_ns),
		       secs(rep.transfer_ns), secs(rep.join_ns), secs(rep.restore_ns),
		       secs(rep.gpu_restore_ns), secs(rep.resume_ns));
		if (rep.incremental)
			printf("  incremental over snapshot %s (its dump %.3f s): %" PRIu64
			       " of %" PRIu64 " pages sent, compared in %.3f s\n",
			       rep.snapshot_dir, secs(rep.snapshot_ns), rep.pages_present, rep.pages,
			       secs(rep.compare_ns));
		printf("  sent %s before the stop, %s during it; %s deduplicated\n",
		       km_format_bytes(rep.precopy.bytes_sent + rep.snapshot.bytes_sent +
					       rep.snapshot.file_bytes,
				       b1),
		       km_format_bytes(rep.stop.bytes_sent + rep.stop.file_bytes, b2),
		       km_format_bytes(rep.precopy.bytes_deduplicated + rep.stop.bytes_deduplicated, b3));
	}
	if (r < 0) {
		fail_net("migrate", r, &err);
		if (rep.resumed)
			fprintf(stderr, "kvmotion: migrate: the source (pid %d) was resumed\n", (int)rep.pid);
		return EXIT_FAILURE;
	}
	return EXIT_SUCCESS;
}

static void print_archive_json(const struct km_archive_result *res)
{
	char hex[KM_HASH_HEX_SIZE];

	printf("\"target_dir\":");
	json_string(res->dir);
	printf(",\"target_archive\":");
	json_string(res->path);
	printf(",\"archive_bytes\":%" PRIu64 ",\"split\":%s,\"manifest_id\":", res->bytes,
	       res->split ? "true" : "false");
	if (res->split)
		printf("\"%s\"", km_hash_to_hex(&res->manifest_id, hex));
	else
		printf("null");
	printf(",\"chunk_references\":%" PRIu64, res->chunks);
}

static int cmd_send_archive(struct cli *c, int argc, char **argv)
{
	struct km_archive_send_opts o = { .label = c->label,
					  .restore = c->restore,
					  .name = c->container };
	struct km_archive_result res;
	struct km_send_stats st;
	struct km_error err = { { 0 } };
	struct km_client *cl = NULL;
	struct km_store *s = NULL;
	char tail[4096] = "";
	int r, ret = EXIT_FAILURE;

	if (argc != 1)
		return fail("send-archive: expected one archive");
	if (c->restore && !c->container)
		return fail("send-archive: --restore needs --container NAME");
	/* A plain archive needs no store; a split one is refused below without it. */
	if (km_store_open(c->store_path, c->sync ? 0 : KM_STORE_NOSYNC, NULL, &s) < 0)
		s = NULL;
	if (client_connect(c, "send-archive", &cl) < 0)
		goto out;
	r = km_client_send_archive(cl, argv[0], s, &o, &st, &res, tail, sizeof(tail), &err);
	if (r < 0) {
		fail_net("send-archive", r, &err);
		if (tail[0])
			fprintf(stderr, "kvmotion: the target's podman said:\n%s\n", tail);
		goto out;
	}
	if (c->json) {
		printf("{\"archive\":");
		json_string(argv[0]);
		printf(",\"target\":");
		json_string(c->to);
		printf(",");
		print_archive_json(&res);
		printf(",\"file_bytes\":%" PRIu64 ",", st.file_bytes);
		print_send_stats_json(&st);
		printf(",\"container_id\":");
		json_string(res.container_id);
		printf(",\"restored_pid\":%d,\"seconds\":{\"chunks\":%.6f,\"files\":%.6f,"
		       "\"commit\":%.6f,\"total\":%.6f},\"target_seconds\":{\"check\":%.6f,"
		       "\"restore\":%.6f}}\n",
		       res.restored_pid, secs(st.chunks_ns), secs(st.files_ns), secs(st.commit_ns),
		       secs(st.total_ns), secs(res.check_ns), secs(res.restore_ns));
	} else {
		printf("sent archive %s to %s: %s\n", argv[0], c->to, res.path);
		print_bytes_line("archive bytes", st.file_bytes);
		print_bytes_line("chunk bytes sent", st.bytes_sent);
		print_bytes_line("deduplicated (target had)", st.bytes_deduplicated);
		if (res.restored_pid)
			printf("  container %s restored as pid %d in %.3f s\n", c->container,
			       res.restored_pid, secs(res.restore_ns));
	}
	ret = EXIT_SUCCESS;
out:
	km_client_free(cl);
	km_store_free(s);
	return ret;
}

/* ------------------------------------------------------------ Kubernetes hook */

/*
 * The contract is docs/kubernetes.md's: one JSON object on stdout, exit 0
 * done, 1 failed (the migration must be abandoned: the source keeps
 * running), 2 bad arguments, 75 failed but worth retrying (the target
 * unreachable, busy or stopping), 124 out of time.
 */
extern char **environ;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define HOOK_EXIT_FAILED  1
#define HOOK_EXIT_USAGE	  2
#define HOOK_EXIT_RETRY	  75
#define HOOK_EXIT_TIMEOUT 124

static char hook_timeout_json[256];

static void hook_alarm(int sig)
{
	(void)sig;
	/* Only async-signal-safe calls: the line was made before. */
	(void)!write(STDOUT_FILENO, hook_timeout_json, strlen(hook_timeout_json));
	_exit(HOOK_EXIT_TIMEOUT);
}

static bool hook_retryable(int r)
{
	return r == -ECONNREFUSED || r == -EHOSTUNREACH || r == -ENETUNREACH || r == -EBUSY ||
	       r == -ESHUTDOWN || r == -ECONNRESET || r == -EPIPE || r == -ETIMEDOUT ||
	       r == -EAGAIN;
}

static int hook_fail(const char *phase, int r, const struct km_error *err, uint64_t t0)
{
	const char *name = strerrorname_np(-r);
	bool retry = hook_retryable(r);

	printf("{\"ok\":false,\"phase\":\"%s\",\"error\":", phase);
	json_string(err && err->msg[0] ? err->msg : strerror(-r));
	printf(",\"errno\":\"%s\",\"retry\":%s,\"seconds\":%.6f}\n", name ? name : "?",
	       retry ? "true" : "false", secs(now_ns() - t0));
	fprintf(stderr, "kvmotion: k8s-hook %s: %s\n", phase,
		err && err->msg[0] ? err->msg : strerror(-r));
	return retry ? HOOK_EXIT_RETRY : HOOK_EXIT_FAILED;
}

static int hook_usage(const char *phase, const char *what)
{
	printf("{\"ok\":false,\"phase\":\"%s\",\"error\":", phase);
	json_string(what);
	printf(",\"errno\":\"EINVAL\",\"retry\":false,\"seconds\":0}\n");
	fprintf(stderr, "kvmotion: k8s-hook %s: %s\n", phase, what);
	return HOOK_EXIT_USAGE;
}

/* Source node, while the pod serves: the weights go ahead. */
static int hook_prepare(struct cli *c, uint64_t t0)
{
	struct km_migrate_opts o = {
		.pid = c->pid,
		.to = c->to,
		.client = { .tls = c->tls, .label = c->label, .compress = c->compress },
		.store = c->store_path,
		.weights_dir = c->weights_dir ? c->weights_dir : getenv("KVMOTION_WEIGHTS_DIR"),
		.weights_index = c->weights_index,
	};
	struct km_migrate_report rep = { 0 };
	struct km_error err = { { 0 } };
	struct km_client *cl = NULL;
	struct km_store *s = NULL;
	int r;

	if (!c->to || (c->pid <= 0 && !c->weights_index))
		return hook_usage("prepare",
				  "--to HOST:PORT and --pid PID or --weights INDEX are required");
	r = km_store_open(c->store_path, 0, NULL, &s);
	if (r < 0) {
		km_error_set(&err, "store %s: %s", c->store_path, strerror(-r));
		return hook_fail("prepare", r, &err, t0);
	}
	r = km_migrate_precopy(&o, s, &rep, &cl, &err);
	km_client_free(cl);
	km_store_free(s);
	if (r < 0)
		return hook_fail("prepare", r, &err, t0);
	printf("{\"ok\":true,\"phase\":\"prepare\",\"target\":");
	json_string(c->to);
	printf(",\"mode\":\"%s\",\"weights\":[", rep.cooperative ? "cooperative" : "transparent");
	for (size_t i = 0; i < rep.n_weights; i++) {
		if (i)
			putchar(',');
		json_string(rep.weights_index[i]);
	}
	printf("],\"bytes_sent\":%" PRIu64 ",\"bytes_deduplicated\":%" PRIu64
	       ",\"wire_bytes\":%" PRIu64 ",\"seconds\":%.6f}\n",
	       rep.precopy.bytes_sent, rep.precopy.bytes_deduplicated, rep.precopy.wire_bytes,
	       secs(now_ns() - t0));
	return 0;
}

/* Source node, after the kubelet wrote the archive: the small remainder goes. */
static int hook_checkpoint_done(struct cli *c, uint64_t t0)
{
	struct km_client_opts co = { .tls = c->tls, .label = c->label, .compress = c->compress };
	struct km_archive_send_opts o = { .label = c->label ? c->label : "k8s" };
	struct km_archive_result res;
	struct km_send_stats st;
	struct km_error err = { { 0 } };
	struct km_client *cl = NULL;
	struct km_store *s = NULL;
	int r;

	if (!c->to || !c->archive)
		return hook_usage("checkpoint-done",
				  "--to HOST:PORT and --archive FILE are required");
	if (km_store_open(c->store_path, 0, NULL, &s) < 0)
		s = NULL; /* an archive without a split image needs none */
	r = km_client_connect(c->to, &co, &cl, &err);
	if (r == 0)
		r = km_client_send_archive(cl, c->archive, s, &o, &st, &res, NULL, 0, &err);
	km_client_free(cl);
	km_store_free(s);
	if (r < 0)
		return hook_fail("checkpoint-done", r, &err, t0);
	printf("{\"ok\":true,\"phase\":\"checkpoint-done\",\"target\":");
	json_string(c->to);
	printf(",\"archive\":");
	json_string(c->archive);
	printf(",");
	print_archive_json(&res);
	printf(",\"bytes_sent\":%" PRIu64 ",\"chunk_bytes_sent\":%" PRIu64
	       ",\"bytes_deduplicated\":%" PRIu64 ",\"wire_bytes\":%" PRIu64 ",\"seconds\":%.6f}\n",
	       st.file_bytes + st.bytes_sent, st.bytes_sent, st.bytes_deduplicated, st.wire_bytes,
	       secs(now_ns() - t0));
	if (!res.split)
		fprintf(stderr, "kvmotion: k8s-hook checkpoint-done: warning: the archive's image "
				"is not split (was kvmotion's CRIU plugin loaded?): sent whole\n");
	return 0;
}

/* Runs CMD OCI-DIR IMAGE, waiting for it. */
static int hook_import(const char *cmd, const char *dir, const char *image, struct km_error *err)
{
	const char *argv[] = { cmd, dir, image, NULL };
	pid_t pid;
	int r, status;

	r = posix_spawnp(&pid, cmd, NULL, NULL, (char *const *)argv, environ);
	if (r != 0) {
		km_error_set(err, "cannot run %s: %s", cmd, strerror(r));
		return -r;
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -errno;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		km_error_set(err, "%s %s %s failed (%s %d)", cmd, dir, image,
			     WIFEXITED(status) ? "status" : "signal",
			     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
		return -ECHILD;
	}
	return 0;
}

/* Target node, before the pod is created: the archive as a checkpoint image. */
static int hook_before_restore(struct cli *c, uint64_t t0)
{
	struct km_error err = { { 0 } };
	struct km_manifest *m = NULL;
	struct km_store *s = NULL;
	struct km_hash mid;
	struct km_oci_result res;
	_cleanup_close_ int fd = -1;
	char oci[PATH_MAX], image[512], hex[KM_HASH_HEX_SIZE], first[KM_HASH_HEX_SIZE] = "";
	uint64_t chunks = 0, missing = 0;
	bool split;
	int r;

	if (!c->archive || !c->container)
		return hook_usage("before-restore",
				  "--archive FILE and --container NAME are required");
	fd = open(c->archive, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		km_error_set(&err, "archive %s: %s", c->archive, strerror(-r));
		return hook_fail("before-restore", r, &err, t0);
	}
	r = km_archive_check_layout(fd, &err);
	if (r < 0)
		return hook_fail("before-restore", r, &err, t0);
	r = km_archive_manifest(fd, &m, &mid, &err);
	split = r == 0;
	if (r < 0 && r != -ENOENT)
		return hook_fail("before-restore", r, &err, t0);
	if (split) {
		/* The runtime's CRIU joins the image with this node's store: it must be complete. */
		r = km_store_open(c->store_path, 0, NULL, &s);
		if (r < 0) {
			km_manifest_free(m);
			km_error_set(&err, "store %s: %s", c->store_path, strerror(-r));
			return hook_fail("before-restore", r, &err, t0);
		}
		for (size_t i = 0; i < m->n_files; i++)
			for (size_t j = 0; j < m->files[i].n_extents; j++) {
				const struct km_extent *e = &m->files[i].extents[j];

				if (e->kind != KM_EXTENT_CHUNK)
					continue;
				chunks++;
				if (km_store_has(s, &e->id) <= 0 && missing++ == 0)
					km_hash_to_hex(&e->id, first);
			}
		km_manifest_free(m);
		km_store_free(s);
		if (missing) {
			km_error_set(&err,
				     "store %s lacks %" PRIu64 " of the %" PRIu64
				     " chunks the archive refers to, the first %s (run prepare "
				     "and checkpoint-done towards this node first)",
				     c->store_path, missing, chunks, first);
			return hook_fail("before-restore", -ENOENT, &err, t0);
		}
	}
	if (c->oci_dir) {
		snprintf(oci, sizeof(oci), "%s", c->oci_dir);
	} else {
		const char *slash = strrchr(c->archive, '/');

		snprintf(oci, sizeof(oci), "%.*s/oci", slash ? (int)(slash - c->archive) : 1,
			 slash ? c->archive : ".");
	}
	{
		struct km_oci_opts oo = { .container = c->container,
					  .ref = c->image_ref,
					  .manifest_id = split ? &mid : NULL,
					  .runtime = c->oci_runtime };

		r = km_oci_write_layout(c->archive, oci, &oo, &res, &err);
		if (r < 0)
			return hook_fail("before-restore", r, &err, t0);
	}
	snprintf(image, sizeof(image), "localhost/kvmotion-checkpoint-%s:%.12s", c->container,
		 km_hash_to_hex(&res.manifest, hex));
	if (c->import_cmd) {
		r = hook_import(c->import_cmd, oci, image, &err);
		if (r < 0)
			return hook_fail("before-restore", r, &err, t0);
	}
	printf("{\"ok\":true,\"phase\":\"before-restore\",\"archive\":");
	json_string(c->archive);
	printf(",\"container\":");
	json_string(c->container);
	printf(",\"split\":%s,\"manifest_id\":", split ? "true" : "false");
	if (split)
		printf("\"%s\"", km_hash_to_hex(&mid, hex));
	else
		printf("null");
	printf(",\"chunk_references\":%" PRIu64 ",\"oci_layout\":", chunks);
	json_string(oci);
	printf(",\"oci_ref\":");
	json_string(c->image_ref ? c->image_ref : "latest");
	printf(",\"image\":");
	json_string(image);
	printf(",\"imported\":%s,\"layer_digest\":\"sha256:%s\"", c->import_cmd ? "true" : "false",
	       km_hash_to_hex(&res.layer, hex));
	printf(",\"manifest_digest\":\"sha256:%s\",\"layer_linked\":%s,\"annotations\":{\"%s\":",
	       km_hash_to_hex(&res.manifest, hex), res.linked ? "true" : "false",
	       KM_OCI_ANNOTATION_CRIO);
	json_string(c->container);
	printf(",\"%s\":", KM_OCI_ANNOTATION_CRIU);
	json_string(c->container);
	printf("},\"seconds\":%.6f}\n", secs(now_ns() - t0));
	return 0;
}

/* Removes an OCI layout this hook wrote: its known files only. */
static int remove_layout(const char *dir)
{
	char path[PATH_MAX + 64];
	DIR *d;
	struct dirent *de;

	snprintf(path, sizeof(path), "%s/index.json", dir);
	if (access(path, F_OK) < 0)
		return errno == ENOENT ? 0 : -errno;
	snprintf(path, sizeof(path), "%s/blobs/sha256", dir);
	d = opendir(path);
	while (d && (de = readdir(d))) {
		char f[sizeof(path) + 300];

		if (km_hash_from_hex(de->d_name, &(struct km_hash){ { 0 } }) == 0) {
			snprintf(f, sizeof(f), "%s/%s", path, de->d_name);
			(void)unlink(f);
		}
	}
	if (d)
		closedir(d);
	(void)rmdir(path);
	snprintf(path, sizeof(path), "%s/blobs", dir);
	(void)rmdir(path);
	snprintf(path, sizeof(path), "%s/oci-layout", dir);
	(void)unlink(path);
	snprintf(path, sizeof(path), "%s/index.json", dir);
	(void)unlink(path);
	return rmdir(dir) < 0 ? -errno : 0;
}

/* Target node, once the restored container runs: what the migration left goes. */
static int hook_after_restore(struct cli *c, uint64_t t0)
{
	struct km_error err = { { 0 } };
	struct km_store *s = NULL;
	struct km_hash mid;
	struct km_manifest *m = NULL;
	_cleanup_close_ int fd = -1;
	char hex[KM_HASH_HEX_SIZE], root[KM_HASH_HEX_SIZE + 8], dir[PATH_MAX], oci[PATH_MAX + 8];
	bool released = false, removed = false;
	const char *slash;
	int r;

	if (!c->archive)
		return hook_usage("after-restore", "--archive FILE is required");
	if (c->pid > 0 && kill(c->pid, 0) < 0) {
		r = -errno;
		km_error_set(&err, "the restored container's process %d: %s", (int)c->pid,
			     strerror(-r));
		return hook_fail("after-restore", r == -ESRCH ? -ESRCH : r, &err, t0);
	}
	fd = open(c->archive, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		km_error_set(&err, "archive %s: %s", c->archive, strerror(-r));
		return hook_fail("after-restore", r, &err, t0);
	}
	r = km_archive_manifest(fd, &m, &mid, &err);
	if (r < 0 && r != -ENOENT)
		return hook_fail("after-restore", r, &err, t0);
	if (r == 0) {
		km_manifest_free(m);
		/* The runtime joined it: the store need not keep its chunks for it. */
		r = km_store_open(c->store_path, 0, NULL, &s);
		if (r < 0) {
			km_error_set(&err, "store %s: %s", c->store_path, strerror(-r));
			return hook_fail("after-restore", r, &err, t0);
		}
		snprintf(root, sizeof(root), "%s.kmman", km_hash_to_hex(&mid, hex));
		r = km_store_root_remove(s, "manifests", root);
		km_store_free(s);
		if (r < 0 && r != -ENOENT) {
			km_error_set(&err, "store %s: cannot release %s: %s", c->store_path, root,
				     strerror(-r));
			return hook_fail("after-restore", r, &err, t0);
		}
		released = r == 0;
	}
	slash = strrchr(c->archive, '/');
	snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - c->archive) : 1,
		 slash ? c->archive : ".");
	snprintf(oci, sizeof(oci), "%s", c->oci_dir ? c->oci_dir : dir);
	if (!c->oci_dir)
		snprintf(oci, sizeof(oci), "%s/oci", dir);
	if (!c->keep_archive) {
		(void)remove_layout(oci);
		if (unlink(c->archive) < 0) {
			r = -errno;
			km_error_set(&err, "cannot remove %s: %s", c->archive, strerror(-r));
			return hook_fail("after-restore", r, &err, t0);
		}
		/* The receiver's directory of this archive, if nothing else is left in it. */
		removed = rmdir(dir) == 0;
	}
	printf("{\"ok\":true,\"phase\":\"after-restore\",\"archive\":");
	json_string(c->archive);
	printf(",\"released_manifest\":");
	if (released)
		printf("\"%s\"", hex);
	else
		printf("null");
	printf(",\"archive_removed\":%s,\"dir_removed\":%s,\"seconds\":%.6f}\n",
	       c->keep_archive ? "false" : "true", removed ? "true" : "false", secs(now_ns() - t0));
	return 0;
}

static int cmd_k8s_hook(struct cli *c, int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*fn)(struct cli *c, uint64_t t0);
		unsigned timeout_s;
	} phases[] = {
		{ "prepare", hook_prepare, 1800 },
		{ "checkpoint-done", hook_checkpoint_done, 300 },
		{ "before-restore", hook_before_restore, 300 },
		{ "after-restore", hook_after_restore, 60 },
	};
	uint64_t t0 = now_ns();

	if (argc != 1)
		return hook_usage(argc ? argv[0] : "none",
				  "expected one phase: prepare, checkpoint-done, before-restore, "
				  "after-restore");
	for (size_t i = 0; i < KM_ARRAY_SIZE(phases); i++) {
		if (strcmp(argv[0], phases[i].name) != 0)
			continue;
		if (!c->hook_timeout_s)
			c->hook_timeout_s = phases[i].timeout_s;
		snprintf(hook_timeout_json, sizeof(hook_timeout_json),
			 "{\"ok\":false,\"phase\":\"%s\",\"error\":\"timed out after %u s\","
			 "\"errno\":\"ETIMEDOUT\",\"retry\":true,\"seconds\":%u}\n",
			 phases[i].name, c->hook_timeout_s, c->hook_timeout_s);
		signal(SIGALRM, hook_alarm);
		signal(SIGPIPE, SIG_IGN);
		alarm(c->hook_timeout_s);
		return phases[i].fn(c, t0);
	}
	return hook_usage(argv[0], "unknown phase: expected prepare, checkpoint-done, "
				   "before-restore or after-restore");
}

enum {
	OPT_STORE = 256,
	OPT_NAME,
	OPT_THREADS,
	OPT_JSON,
	OPT_NO_SYNC,
	OPT_ADD_CHUNKS,
	OPT_KEEP,
	OPT_REPAIR,
	OPT_EXTENTS,
	OPT_MIN_SPLIT,
	OPT_LEVEL,
	OPT_FRAME,
	OPT_FILTER,
	OPT_CMIN,
	OPT_CAVG,
	OPT_CMAX,
	OPT_WEIGHTS_DIR,
	OPT_PID,
	OPT_TIMEOUT_MS,
	OPT_RESTORED,
	OPT_LISTEN,
	OPT_IMAGES,
	OPT_TO,
	OPT_PSK,
	OPT_CERT,
	OPT_KEY,
	OPT_CA,
	OPT_SERVER_NAME,
	OPT_MAX_BYTES,
	OPT_MAX_FILES,
	OPT_MAX_MESSAGE,
	OPT_MAX_CONNS,
	OPT_IDLE,
	OPT_NO_INCREMENTAL,
	OPT_RESTORE,
	OPT_RESTORE_CMD,
	OPT_RESTORE_LIBDIR,
	OPT_RESTORE_ARG,
	OPT_RESTORE_TIMEOUT,
	OPT_COMPRESS,
	OPT_LABEL,
	OPT_NO_MATERIALIZE,
	OPT_WEIGHTS,
	OPT_SNAPSHOT,
	OPT_KEEP_SNAPSHOT,
	OPT_STOP_DUMP,
	OPT_WORK,
	OPT_CRIU,
	OPT_PLUGIN_DIR,
	OPT_CONTAINER,
	OPT_PODMAN,
	OPT_PODMAN_ARG,
	OPT_CONTAINER_RESTORE_ARG,
	OPT_ARCHIVE,
	OPT_OCI_DIR,
	OPT_IMAGE_REF,
	OPT_IMPORT_CMD,
	OPT_TIMEOUT,
	OPT_KEEP_ARCHIVE,
	OPT_OCI_RUNTIME,
};

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "store", required_argument, NULL, OPT_STORE },
		{ "name", required_argument, NULL, OPT_NAME },
		{ "threads", required_argument, NULL, OPT_THREADS },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "no-sync", no_argument, NULL, OPT_NO_SYNC },
		{ "add-chunks", no_argument, NULL, OPT_ADD_CHUNKS },
		{ "keep", no_argument, NULL, OPT_KEEP },
		{ "repair", no_argument, NULL, OPT_REPAIR },
		{ "extents", no_argument, NULL, OPT_EXTENTS },
		{ "min-split-size", required_argument, NULL, OPT_MIN_SPLIT },
		{ "level", required_argument, NULL, OPT_LEVEL },
		{ "frame-size", required_argument, NULL, OPT_FRAME },
		{ "filter", required_argument, NULL, OPT_FILTER },
		{ "chunk-min", required_argument, NULL, OPT_CMIN },
		{ "chunk-avg", required_argument, NULL, OPT_CAVG },
		{ "chunk-max", required_argument, NULL, OPT_CMAX },
		{ "pid", required_argument, NULL, OPT_PID },
		{ "timeout-ms", required_argument, NULL, OPT_TIMEOUT_MS },
		{ "restored", no_argument, NULL, OPT_RESTORED },
		{ "output", required_argument, NULL, 'o' },
		{ "weights-dir", required_argument, NULL, OPT_WEIGHTS_DIR },
		{ "listen", required_argument, NULL, OPT_LISTEN },
		{ "images", required_argument, NULL, OPT_IMAGES },
		{ "to", required_argument, NULL, OPT_TO },
		{ "psk-file", required_argument, NULL, OPT_PSK },
		{ "cert", required_argument, NULL, OPT_CERT },
		{ "key", required_argument, NULL, OPT_KEY },
		{ "ca", required_argument, NULL, OPT_CA },
		{ "server-name", required_argument, NULL, OPT_SERVER_NAME },
		{ "max-bytes", required_argument, NULL, OPT_MAX_BYTES },
		{ "max-files", required_argument, NULL, OPT_MAX_FILES },
		{ "max-message", required_argument, NULL, OPT_MAX_MESSAGE },
		{ "max-connections", required_argument, NULL, OPT_MAX_CONNS },
		{ "idle-timeout", required_argument, NULL, OPT_IDLE },
		{ "no-incremental", no_argument, NULL, OPT_NO_INCREMENTAL },
		{ "restore", no_argument, NULL, OPT_RESTORE },
		{ "restore-cmd", required_argument, NULL, OPT_RESTORE_CMD },
		{ "restore-libdir", required_argument, NULL, OPT_RESTORE_LIBDIR },
		{ "restore-arg", required_argument, NULL, OPT_RESTORE_ARG },
		{ "restore-timeout", required_argument, NULL, OPT_RESTORE_TIMEOUT },
		{ "compress", required_argument, NULL, OPT_COMPRESS },
		{ "label", required_argument, NULL, OPT_LABEL },
		{ "no-materialize", no_argument, NULL, OPT_NO_MATERIALIZE },
		{ "weights", required_argument, NULL, OPT_WEIGHTS },
		{ "snapshot", optional_argument, NULL, OPT_SNAPSHOT },
		{ "keep-snapshot", no_argument, NULL, OPT_KEEP_SNAPSHOT },
		{ "stop-dump", required_argument, NULL, OPT_STOP_DUMP },
		{ "work", required_argument, NULL, OPT_WORK },
		{ "criu", required_argument, NULL, OPT_CRIU },
		{ "plugin-dir", required_argument, NULL, OPT_PLUGIN_DIR },
		{ "container", required_argument, NULL, OPT_CONTAINER },
		{ "podman", required_argument, NULL, OPT_PODMAN },
		{ "podman-arg", required_argument, NULL, OPT_PODMAN_ARG },
		{ "container-restore-arg", required_argument, NULL, OPT_CONTAINER_RESTORE_ARG },
		{ "archive", required_argument, NULL, OPT_ARCHIVE },
		{ "oci-dir", required_argument, NULL, OPT_OCI_DIR },
		{ "image-ref", required_argument, NULL, OPT_IMAGE_REF },
		{ "import-cmd", required_argument, NULL, OPT_IMPORT_CMD },
		{ "timeout", required_argument, NULL, OPT_TIMEOUT },
		{ "keep-archive", no_argument, NULL, OPT_KEEP_ARCHIVE },
		{ "oci-runtime", required_argument, NULL, OPT_OCI_RUNTIME },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{}
	};
	struct cli c = {
		.store_path = getenv("KVMOTION_STORE") ? getenv("KVMOTION_STORE") : DEFAULT_STORE,
		.sync = true,
		.chunker = KM_CHUNKER_PARAMS_DEFAULT,
		.timeout_ms = 10000,
		.materialize = true,
	};
	const char *cmd;
	uint64_t v;
	int opt;

	/* Options may come before or after the command and its arguments. */
	while ((opt = getopt_long(argc, argv, "o:hV", options, NULL)) != -1) {
		switch (opt) {
		case OPT_STORE: c.store_path = optarg; break;
		case OPT_NAME: c.name = optarg; break;
		case OPT_JSON: c.json = true; break;
		case OPT_NO_SYNC: c.sync = false; break;
		case OPT_NO_INCREMENTAL: c.no_incremental = true; break;
		case OPT_ADD_CHUNKS: c.add_chunks = true; break;
		case OPT_KEEP: c.keep = true; break;
		case OPT_REPAIR: c.repair = true; break;
		case OPT_EXTENTS: c.extents = true; break;
		case 'o': c.output = optarg; break;
		case OPT_WEIGHTS_DIR: c.weights_dir = optarg; break;
		case OPT_RESTORED: c.restored = true; break;
		case OPT_LISTEN: c.listen = optarg; break;
		case OPT_IMAGES: c.images = optarg; break;
		case OPT_TO: c.to = optarg; break;
		case OPT_PSK: c.tls.psk_file = optarg; break;
		case OPT_CERT: c.tls.cert = optarg; break;
		case OPT_KEY: c.tls.key = optarg; break;
		case OPT_CA: c.tls.ca = optarg; break;
		case OPT_SERVER_NAME: c.tls.server_name = optarg; break;
		case OPT_RESTORE: c.restore = true; break;
		case OPT_RESTORE_CMD: c.restore_opts.criu = optarg; break;
		case OPT_RESTORE_LIBDIR: c.restore_opts.libdir = optarg; break;
		case OPT_RESTORE_ARG:
			if (c.restore_opts.n_args == KM_ARRAY_SIZE(c.restore_args))
				return fail("--restore-arg: at most %zu", KM_ARRAY_SIZE(c.restore_args));
			c.restore_args[c.restore_opts.n_args++] = optarg;
			c.restore_opts.args = c.restore_args;
			break;
		case OPT_LABEL: c.label = optarg; break;
		case OPT_NO_MATERIALIZE: c.materialize = false; break;
		case OPT_WEIGHTS: c.weights_index = optarg; break;
		case OPT_SNAPSHOT:
			c.snapshot = true;
			if (optarg && strcmp(optarg, "criu") == 0)
				c.snapshot_criu = true;
			else if (optarg && strcmp(optarg, "live") != 0)
				return fail("--snapshot: expected live or criu, not '%s'", optarg);
			break;
		case OPT_KEEP_SNAPSHOT: c.keep_snapshot = true; break;
		case OPT_STOP_DUMP:
			if (strcmp(optarg, "file") == 0)
				c.stop_dump_file = true;
			else if (strcmp(optarg, "page-server") != 0)
				return fail("--stop-dump: expected page-server or file, not '%s'",
					    optarg);
			break;
		case OPT_WORK: c.work = optarg; break;
		case OPT_CRIU: c.criu = optarg; break;
		case OPT_PLUGIN_DIR: c.plugin_dir = optarg; break;
		case OPT_CONTAINER: c.container = optarg; break;
		case OPT_PODMAN: c.container_opts.podman = optarg; break;
		case OPT_PODMAN_ARG:
			if (c.container_opts.n_args == KM_ARRAY_SIZE(c.podman_args))
				return fail("--podman-arg: at most %zu",
					    KM_ARRAY_SIZE(c.podman_args));
			c.podman_args[c.container_opts.n_args++] = optarg;
			c.container_opts.args = c.podman_args;
			break;
		case OPT_CONTAINER_RESTORE_ARG:
			if (c.container_opts.n_restore_args ==
			    KM_ARRAY_SIZE(c.container_restore_args))
				return fail("--container-restore-arg: at most %zu",
					    KM_ARRAY_SIZE(c.container_restore_args));
			c.container_restore_args[c.container_opts.n_restore_args++] = optarg;
			c.container_opts.restore_args = c.container_restore_args;
			break;
		case OPT_ARCHIVE: c.archive = optarg; break;
		case OPT_OCI_DIR: c.oci_dir = optarg; break;
		case OPT_IMAGE_REF: c.image_ref = optarg; break;
		case OPT_IMPORT_CMD: c.import_cmd = optarg; break;
		case OPT_KEEP_ARCHIVE: c.keep_archive = true; break;
		case OPT_OCI_RUNTIME: c.oci_runtime = optarg; break;
		case OPT_TIMEOUT:
			if (parse_u64(optarg, &v) < 0 || v == 0 || v > 86400)
				return fail(
					"--timeout: '%s' is not a number of seconds (1 to 86400)",
					optarg);
			c.hook_timeout_s = (unsigned)v;
			break;
		case OPT_COMPRESS:
			if (strcmp(optarg, "auto") == 0)
				c.compress = KM_COMPRESS_AUTO;
			else if (strcmp(optarg, "always") == 0)
				c.compress = KM_COMPRESS_ALWAYS;
			else if (strcmp(optarg, "never") == 0)
				c.compress = KM_COMPRESS_NEVER;
			else
				return fail("--compress: expected auto, always or never, not '%s'", optarg);
			break;
		case OPT_MAX_BYTES:
			if (parse_u64(optarg, &v) < 0 || v == 0)
				return fail("--max-bytes: '%s' is not a valid size", optarg);
			c.max_bytes = v;
			break;
		case OPT_MAX_MESSAGE:
			if (parse_u64(optarg, &v) < 0 || v < 4096 || v > KM_WIRE_PAYLOAD_MAX)
				return fail("--max-message: '%s' is not a size from 4K to 64M", optarg);
			c.max_message = (uint32_t)v;
			break;
		case OPT_MAX_FILES:
		case OPT_MAX_CONNS:
		case OPT_IDLE:
		case OPT_RESTORE_TIMEOUT:
			if (parse_u64(optarg, &v) < 0 || v == 0 || v > UINT32_MAX)
				return fail("%s: '%s' is not a valid number", argv[optind - 1], optarg);
			if (opt == OPT_MAX_FILES)
				c.max_files = (uint32_t)v;
			else if (opt == OPT_MAX_CONNS)
				c.max_connections = (unsigned)v;
			else if (opt == OPT_IDLE)
				c.idle_timeout_s = (unsigned)v;
			else
				c.restore_opts.timeout_s = (unsigned)v;
			break;
		case OPT_FILTER:
			if (strcmp(optarg, "auto") == 0)
				c.delta.filter = KM_DELTA_FILTER_AUTO;
			else if (strcmp(optarg, "never") == 0)
				c.delta.filter = KM_DELTA_FILTER_NEVER;
			else if (strcmp(optarg, "always") == 0)
				c.delta.filter = KM_DELTA_FILTER_ALWAYS;
			else
				return fail("--filter: expected auto, never or always, not '%s'", optarg);
			break;
		case OPT_THREADS:
		case OPT_MIN_SPLIT:
		case OPT_LEVEL:
		case OPT_FRAME:
		case OPT_CMIN:
		case OPT_CAVG:
		case OPT_CMAX:
		case OPT_PID:
		case OPT_TIMEOUT_MS:
			if (parse_u64(optarg, &v) < 0 || v > UINT32_MAX)
				return fail("%s: '%s' is not a valid number", argv[optind - 1], optarg);
			if (opt == OPT_THREADS)
				c.threads = (unsigned)v;
			else if (opt == OPT_MIN_SPLIT)
				c.min_split_size = v;
			else if (opt == OPT_LEVEL)
				c.delta.level = (int)v;
			else if (opt == OPT_FRAME)
				c.delta.frame_size = (uint32_t)v;
			else if (opt == OPT_PID)
				c.pid = v <= INT32_MAX ? (pid_t)v : 0;
			else if (opt == OPT_TIMEOUT_MS)
				c.timeout_ms = (uint32_t)v;
			else {
				c.chunker_set = true;
				if (opt == OPT_CMIN)
					c.chunker.min_size = (uint32_t)v;
				else if (opt == OPT_CAVG)
					c.chunker.avg_size = (uint32_t)v;
				else
					c.chunker.max_size = (uint32_t)v;
			}
			break;
		case 'h': usage(stdout); return EXIT_SUCCESS;
		case 'V': printf("kvmotion %s\n", KM_VERSION); return EXIT_SUCCESS;
		default: usage(stderr); return 2;
		}
	}
	if (c.chunker_set && km_chunker_params_check(&c.chunker) < 0)
		return fail("chunk sizes %u/%u/%u: need 64 <= min <= avg <= max <= 64 MiB, avg a power of two",
			    c.chunker.min_size, c.chunker.avg_size, c.chunker.max_size);
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
	cmd = argv[optind];
	argc -= optind + 1;
	argv += optind + 1;

	if (strcmp(cmd, "seed") == 0)
		return cmd_seed(&c, argc, argv);
	if (strcmp(cmd, "split") == 0)
		return cmd_split(&c, argc, argv);
	if (strcmp(cmd, "join") == 0)
		return cmd_join(&c, argc, argv);
	if (strcmp(cmd, "inspect") == 0)
		return cmd_inspect(&c, argc, argv);
	if (strcmp(cmd, "store") == 0)
		return cmd_store(&c, argc, argv);
	if (strcmp(cmd, "weights") == 0)
		return cmd_weights(&c, argc, argv);
	if (strcmp(cmd, "engine") == 0)
		return cmd_engine(&c, argc, argv);
	if (strcmp(cmd, "serve") == 0)
		return cmd_serve(&c, argc, argv);
	if (strcmp(cmd, "send-weights") == 0)
		return cmd_send_weights(&c, argc, argv);
	if (strcmp(cmd, "send-image") == 0)
		return cmd_send_image(&c, argc, argv);
	if (strcmp(cmd, "snapshot") == 0)
		return cmd_snapshot(&c, argc, argv);
	if (strcmp(cmd, "migrate") == 0)
		return cmd_migrate(&c, argc, argv);
	if (strcmp(cmd, "send-archive") == 0)
		return cmd_send_archive(&c, argc, argv);
	if (strcmp(cmd, "k8s-hook") == 0)
		return cmd_k8s_hook(&c, argc, argv);
	fail("unknown command '%s'", cmd);
	usage(stderr);
	return 2;
}
