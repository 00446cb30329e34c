/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* A checkpoint archive as a one-layer OCI image layout (oci.h). */
#include "oci.h"

#include <ctype.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define COPY_BUF (1u << 20)

static bool name_ok(const char *s, const char *extra)
{
	if (!s || !s[0] || strlen(s) > 255 || !isalnum((unsigned char)s[0]))
		return false;
	for (; *s; s++)
		if (!isalnum((unsigned char)*s) && !strchr(extra, *s))
			return false;
	return true;
}

/* The SHA-256 of a file's bytes, and its size. */
static int hash_file(int fd, struct km_hash *ret, uint64_t *ret_size)
{
	_cleanup_free_ uint8_t *buf = malloc(COPY_BUF);
	struct km_hasher *h = km_hasher_new();
	uint64_t total = 0;
	ssize_t k;

	if (!buf || !h) {
		km_hasher_free(h);
		return -ENOMEM;
	}
	while ((k = km_read_full(fd, buf, COPY_BUF)) > 0) {
		km_hasher_update(h, buf, (size_t)k);
		total += (uint64_t)k;
	}
	if (k < 0) {
		km_hasher_free(h);
		return (int)k;
	}
	km_hasher_final(h, ret);
	km_hasher_free(h);
	*ret_size = total;
	return 0;
}

static int copy_file(int in, const char *path)
{
	_cleanup_free_ uint8_t *buf = malloc(COPY_BUF);
	_cleanup_close_ int out = -1;
	ssize_t k;
	int r;

	if (!buf)
		return -ENOMEM;
	out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (out < 0)
		return -errno;
	if (lseek(in, 0, SEEK_SET) < 0)
		return -errno;
	while ((k = km_read_full(in, buf, COPY_BUF)) > 0) {
		r = km_write_full(out, buf, (size_t)k);
		if (r < 0)
			return r;
	}
	if (k < 0)
		return (int)k;
	return fsync(out) < 0 ? -errno : 0;
}

/* Writes a blob of text; its digest and size. */
static int put_blob(const char *dir, const char *text, struct km_hash *ret, uint64_t *ret_size,
		    struct km_error *err)
{
	char hex[KM_HASH_HEX_SIZE], path[PATH_MAX];
	size_t n = strlen(text);
	_cleanup_close_ int fd = -1;
	int r;

	km_hash_buf(text, n, ret);
	snprintf(path, sizeof(path), "%s/blobs/sha256/%s", dir, km_hash_to_hex(ret, hex));
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		km_error_set(err, "%s: %s", path, strerror(errno));
		return -errno;
	}
	r = km_write_full(fd, text, n);
	if (r < 0) {
		km_error_set(err, "%s: %s", path, strerror(-r));
		return r;
	}
	*ret_size = n;
	return 0;
}

static int put_file(const char *dir, const char *name, const char *text, struct km_error *err)
{
	char path[PATH_MAX];
	_cleanup_close_ int fd = -1;
	int r;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		km_error_set(err, "%s: %s", path, strerror(errno));
		return -errno;
	}
	r = km_write_full(fd, text, strlen(text));
	if (r < 0)
		km_error_set(err, "%s: %s", path, strerror(-r));
	return r;
}

static const char *oci_arch(void)
{
	struct utsname u;

	if (uname(&u) < 0)
		return "amd64";
	if (strcmp(u.machine, "x86_64") == 0)
		return "amd64";
	if (strcmp(u.machine, "aarch64") == 0)
		return "arm64";
	if (strcmp(u.machine, "ppc64le") == 0 || strcmp(u.machine, "s390x") == 0)
		return u.machine[0] == 'p' ? "ppc64le" : "s390x";
	return "amd64";
}

int km_oci_write_layout(const char *archive, const char *dir, const struct km_oci_opts *o,
			struct km_oci_result *ret, struct km_error *err)
{
	struct km_oci_result res = { 0 };
	char hl[KM_HASH_HEX_SIZE], hc[KM_HASH_HEX_SIZE], hm[KM_HASH_HEX_SIZE], hx[KM_HASH_HEX_SIZE];
	char path[PATH_MAX], created[32], text[4096], extra[160] = "";
	const char *ref = o->ref ? o->ref : "latest";
	const char *runtime = o->runtime ? o->runtime : "runc";
	_cleanup_close_ int fd = -1;
	struct tm tm;
	time_t now = time(NULL);
	int r;

	if (!name_ok(o->container, "_.-")) {
		km_error_set(err, "container name '%.64s' is not [a-zA-Z0-9][a-zA-Z0-9_.-]*",
			     o->container ? o->container : "");
		return -EINVAL;
	}
	if (!name_ok(runtime, "_.-")) {
		km_error_set(err, "runtime name '%.64s' is not [a-zA-Z0-9][a-zA-Z0-9_.-]*",
			     runtime);
		return -EINVAL;
	}
	if (!name_ok(ref, "_.-:/@")) {
		km_error_set(err,
			     "image reference '%.64s' has characters other than [a-zA-Z0-9_.-:/@]",
			     ref);
		return -EINVAL;
	}
	snprintf(path, sizeof(path), "%s/index.json", dir);
	if (access(path, F_OK) == 0) {
		km_error_set(err, "%s holds an image layout already", dir);
		return -EEXIST;
	}
	snprintf(path, sizeof(path), "%s/blobs/sha256", dir);
	r = km_mkdir_p(path);
	if (r < 0) {
		km_error_set(err, "cannot create %s: %s", path, strerror(-r));
		return r;
	}
	fd = open(archive, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		km_error_set(err, "archive %s: %s", archive, strerror(errno));
		return -errno;
	}
	r = hash_file(fd, &res.layer, &res.layer_size);
	if (r < 0) {
		km_error_set(err, "archive %s: %s", archive, strerror(-r));
		return r;
	}
	snprintf(path, sizeof(path), "%s/blobs/sha256/%s", dir, km_hash_to_hex(&res.layer, hl));
	(void)unlink(path);
	if (link(archive, path) == 0) {
		res.linked = true;
	} else {
		r = copy_file(fd, path);
		if (r < 0) {
			km_error_set(err, "cannot copy %s to %s: %s", archive, path, strerror(-r));
			return r;
		}
	}

	gmtime_r(&now, &tm);
	strftime(created, sizeof(created), "%Y-%m-%dT%H:%M:%SZ", &tm);
	snprintf(text, sizeof(text),
		 "{\"created\":\"%s\",\"architecture\":\"%s\",\"os\":\"linux\",\"config\":{},"
		 "\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:%s\"]},"
		 "\"history\":[{\"created\":\"%s\",\"created_by\":\"kvmotion: checkpoint of "
		 "container %s\"}]}",
		 created, oci_arch(), hl, created, o->container);
	r = put_blob(dir, text, &res.config, &res.config_size, err);
	if (r < 0)
		return r;
	if (o->manifest_id)
		snprintf(extra, sizeof(extra), ",\"" KM_OCI_ANNOTATION_MANIFEST "\":\"%s\"",
			 km_hash_to_hex(o->manifest_id, hx));
	snprintf(
		text, sizeof(text),
		"{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
		"\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\","
		"\"digest\":\"sha256:%s\",\"size\":%llu},"
		"\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\","
		"\"digest\":\"sha256:%s\",\"size\":%llu}],"
		"\"annotations\":{\"" KM_OCI_ANNOTATION_CRIO "\":\"%s\",\"" KM_OCI_ANNOTATION_CRIU
		"\":\"%s\",\"" KM_OCI_ANNOTATION_PODMAN
		"\":\"%s\",\"" KM_OCI_ANNOTATION_PODMAN_RUNTIME
		"\":\"%s\",\"" KM_OCI_ANNOTATION_CRIU_RUNTIME "\":\"%s\"%s}}",
		km_hash_to_hex(&res.config, hc), (unsigned long long)res.config_size, hl,
		(unsigned long long)res.layer_size, o->container, o->container, o->container,
		runtime, runtime, extra);
	r = put_blob(dir, text, &res.manifest, &res.manifest_size, err);
	if (r < 0)
		return r;
	r = put_file(dir, "oci-layout", "{\"imageLayoutVersion\":\"1.0.0\"}", err);
	if (r < 0)
		return r;
	/* index.json last: its presence says the layout is complete. */
	snprintf(text, sizeof(text),
		 "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\","
		 "\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
		 "\"digest\":\"sha256:%s\",\"size\":%llu,"
		 "\"annotations\":{\"org.opencontainers.image.ref.name\":\"%s\"}}]}",
		 km_hash_to_hex(&res.manifest, hm), (unsigned long long)res.manifest_size, ref);
	r = put_file(dir, "index.json", text, err);
	if (r < 0)
		return r;
	if (ret)
		*ret = res;
	return 0;
}
