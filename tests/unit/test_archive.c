/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Checkpoint archives read in place (archive.h): ustar, prefix, GNU long
 * names, pax records, the checkpoint layout, the manifest inside, refusals;
 * and the OCI image layout made of one (oci.h).
 */
#include <check.h>

#include "km-check.h"
#include "km-tar.h"
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "archive.h"
#include "format.h"
#include "hash.h"
#include "oci.h"

static int tb_fd(const struct tarbuf *t, char *path)
{
	int fd;

	strcpy(path, "/tmp/km-archive-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, t->p, t->n), (ssize_t)t->n);
	return fd;
}

static void expect_member(int fd, const char *name, const char *want)
{
	struct km_error err = { { 0 } };
	void *buf = NULL;
	size_t n = 0;

	ck_assert_msg(km_archive_read(fd, name, 1 << 20, &buf, &n, &err) == 0, "%s: %s", name,
		      err.msg);
	ck_assert_uint_eq(n, strlen(want));
	ck_assert(memcmp(buf, want, n) == 0);
	free(buf);
}

START_TEST(test_archive_members)
{
	struct tarbuf t = { 0 };
	char path[64], longname[300], hex[KM_HASH_HEX_SIZE];
	struct km_archive_member m;
	struct km_error err = { { 0 } };
	struct km_manifest *man = NULL;
	struct km_hash ids[2], mid, want_mid;
	size_t mlen;
	void *mbuf;
	int fd;

	km_hash_buf("one", 3, &ids[0]);
	km_hash_buf("two", 3, &ids[1]);
	mbuf = km_test_manifest(ids, &mlen);
	memset(longname, 'x', 150);
	strcpy(longname + 150, "/deep-name");
	tb_entry(&t, NULL, "./", '5', NULL, 0);
	tb_entry(&t, NULL, "./checkpoint/", '5', NULL, 0);
	tb_entry(&t, NULL, "./checkpoint/inventory.img", '0', "INV", 3);
	tb_entry(&t, NULL, "checkpoint/" KM_MANIFEST_NAME, '0', mbuf, mlen);
	tb_entry(&t, NULL, "config.dump", '0', "{\"name\":\"c\"}", 12);
	tb_entry(&t, NULL, "spec.dump", 0, "{}", 2); /* old-style regular file */
	tb_entry(&t, "some/prefix/dir", "file-in-prefix", '0', "PFX", 3);
	/* GNU long name for the next member */
	tb_entry(&t, NULL, "././@LongLink", 'L', longname, strlen(longname) + 1);
	tb_entry(&t, NULL, "truncated-name", '0', "LONG", 4);
	/* pax: path and size records override the header */
	{
		const char *pax = "29 path=checkpoint/pax-named\n"
				  "10 size=3\n";

		tb_entry(&t, NULL, "PaxHeaders/x", 'x', pax, strlen(pax));
		tb_entry(&t, NULL, "ignored", '0', "PAX", 3);
	}
	tb_entry(&t, NULL, "link-to-spec", '2', NULL, 0);
	tb_end(&t);
	fd = tb_fd(&t, path);

	expect_member(fd, "checkpoint/inventory.img", "INV");
	expect_member(fd, "./config.dump", "{\"name\":\"c\"}");
	expect_member(fd, "spec.dump", "{}");
	expect_member(fd, "some/prefix/dir/file-in-prefix", "PFX");
	expect_member(fd, longname, "LONG");
	expect_member(fd, "checkpoint/pax-named", "PAX");
	ck_assert_int_eq(km_archive_find(fd, "ignored", &m, &err), -ENOENT);
	ck_assert_int_eq(km_archive_find(fd, "checkpoint", &m, &err), -ENOENT); /* a directory */
	ck_assert_int_eq(km_archive_find(fd, "link-to-spec", &m, &err), -ENOENT);
	ck_assert_int_eq(km_archive_find(fd, "checkpoint/pages-1.img", &m, &err), -ENOENT);
	ck_assert(strstr(err.msg, "pages-1.img"));
	{
		void *b = NULL;
		size_t n;

		ck_assert_int_eq(km_archive_read(fd, "config.dump", 4, &b, &n, &err), -EFBIG);
	}
	ck_assert_int_eq(km_archive_check_layout(fd, &err), 0);
	ck_assert_int_eq(km_archive_manifest(fd, &man, &mid, &err), 0);
	km_hash_buf(mbuf, mlen, &want_mid);
	ck_assert_str_eq(km_hash_to_hex(&mid, hex), km_hash_to_hex(&want_mid, longname));
	ck_assert_uint_eq(man->n_files, 1);
	ck_assert(km_hash_equal(&man->files[0].extents[2].id, &ids[1]));
	km_manifest_free(man);
	close(fd);
	unlink(path);
	free(mbuf);
	free(t.p);
}
END_TEST

START_TEST(test_archive_refusals)
{
	struct tarbuf t = { 0 };
	char path[64];
	struct km_archive_member m;
	struct km_error err = { { 0 } };
	struct km_manifest *man = NULL;
	static const uint8_t gz[512] = { 0x1f, 0x8b, 8 }, zst[512] = { 0x28, 0xb5, 0x2f, 0xfd };
	int fd;

	/* compressed archives: said so */
	tb_put(&t, gz, sizeof(gz));
	fd = tb_fd(&t, path);
	ck_assert_int_eq(km_archive_find(fd, "spec.dump", &m, &err), -EPROTONOSUPPORT);
	ck_assert(strstr(err.msg, "gzip") && strstr(err.msg, "--compress none"));
	close(fd);
	unlink(path);
	t.n = 0;
	tb_put(&t, zst, sizeof(zst));
	fd = tb_fd(&t, path);
	ck_assert_int_eq(km_archive_check_layout(fd, &err), -EPROTONOSUPPORT);
	ck_assert(strstr(err.msg, "zstd"));
	close(fd);
	unlink(path);

	/* a damaged header */
	t.n = 0;
	tb_entry(&t, NULL, "config.dump", '0', "{}", 2);
	tb_end(&t);
	t.p[10] ^= 1;
	fd = tb_fd(&t, path);
	ck_assert_int_eq(km_archive_find(fd, "config.dump", &m, &err), -EBADMSG);
	ck_assert(strstr(err.msg, "checksum"));
	close(fd);
	unlink(path);

	/* a member cut short */
	t.n = 0;
	tb_entry(&t, NULL, "config.dump", '0', "0123456789", 10);
	t.n = 512 + 4;
	fd = tb_fd(&t, path);
	ck_assert_int_eq(km_archive_find(fd, "config.dump", &m, &err), -EBADMSG);
	close(fd);
	unlink(path);

	/* no spec.dump: not a checkpoint; no manifest: not split */
	t.n = 0;
	tb_entry(&t, NULL, "checkpoint/inventory.img", '0', "I", 1);
	tb_entry(&t, NULL, "config.dump", '0', "{}", 2);
	tb_end(&t);
	fd = tb_fd(&t, path);
	ck_assert_int_eq(km_archive_check_layout(fd, &err), -ENOENT);
	ck_assert(strstr(err.msg, "spec.dump"));
	ck_assert_int_eq(km_archive_manifest(fd, &man, NULL, &err), -ENOENT);
	close(fd);
	unlink(path);

	/* a manifest that is not one */
	t.n = 0;
	tb_entry(&t, NULL, "checkpoint/" KM_MANIFEST_NAME, '0', "KMMANIF\nbroken", 14);
	tb_end(&t);
	fd = tb_fd(&t, path);
	ck_assert_int_lt(km_archive_manifest(fd, &man, NULL, &err), 0);
	ck_assert(strstr(err.msg, KM_ARCHIVE_MANIFEST));
	close(fd);
	unlink(path);
	free(t.p);
}
END_TEST

static int rm_one(const char *p, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st;
	(void)type;
	(void)ftw;
	return remove(p);
}

static char *slurp(const char *path, size_t *ret_n)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;

	ck_assert_ptr_nonnull(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = calloc(1, (size_t)n + 1);
	ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	*ret_n = (size_t)n;
	return buf;
}

/* The blob named by "sha256:HEX" at the first occurrence of key in json hashes to HEX. */
static char *blob_after(const char *dir, const char *json, const char *key, size_t *ret_n)
{
	const char *p = strstr(json, key);
	char hex[KM_HASH_HEX_SIZE], path[512], got[KM_HASH_HEX_SIZE];
	struct km_hash h;
	char *b;

	ck_assert_ptr_nonnull(p);
	p = strstr(p, "sha256:");
	ck_assert_ptr_nonnull(p);
	memcpy(hex, p + 7, 64);
	hex[64] = 0;
	snprintf(path, sizeof(path), "%s/blobs/sha256/%s", dir, hex);
	b = slurp(path, ret_n);
	km_hash_buf(b, *ret_n, &h);
	ck_assert_str_eq(km_hash_to_hex(&h, got), hex);
	return b;
}

START_TEST(test_archive_oci_layout)
{
	char dir[] = "/tmp/km-oci-XXXXXX", archive[600], layout[600];
	struct km_error err = { { 0 } };
	struct km_oci_result res;
	struct km_hash mid;
	struct km_oci_opts o = { .container = "engine-1", .ref = "v1", .manifest_id = &mid };
	char *index, *man, *cfg, *layer, *arch;
	size_t n, an;
	FILE *f;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(archive, sizeof(archive), "%s/checkpoint.tar", dir);
	snprintf(layout, sizeof(layout), "%s/oci", dir);
	f = fopen(archive, "wb");
	ck_assert_ptr_nonnull(f);
	fputs("not really a tar, the layout does not look inside", f);
	fclose(f);
	km_hash_buf("m", 1, &mid);

	ck_assert_int_eq(km_oci_write_layout(archive, layout, &o, &res, &err), 0);
	ck_assert(res.linked);
	{
		char ip[700];

		snprintf(ip, sizeof(ip), "%s/index.json", layout);
		index = slurp(ip, &n);
	}
	ck_assert(strstr(index, "\"org.opencontainers.image.ref.name\":\"v1\""));
	man = blob_after(layout, index, "\"digest\"", &n);
	ck_assert(strstr(man, "\"" KM_OCI_ANNOTATION_CRIO "\":\"engine-1\""));
	ck_assert(strstr(man, "\"" KM_OCI_ANNOTATION_CRIU "\":\"engine-1\""));
	ck_assert(strstr(man, "\"" KM_OCI_ANNOTATION_MANIFEST "\":\""));
	ck_assert(strstr(man, "\"" KM_OCI_ANNOTATION_PODMAN_RUNTIME "\":\"runc\""));
	cfg = blob_after(layout, man, "\"config\"", &n);
	ck_assert(strstr(cfg, "\"os\":\"linux\""));
	layer = blob_after(layout, man, "\"layers\"", &n);
	arch = slurp(archive, &an);
	ck_assert_uint_eq(n, an);
	ck_assert(memcmp(layer, arch, n) == 0);
	/* the config's diff_id is the layer's digest (uncompressed) */
	{
		char want[80], hex[KM_HASH_HEX_SIZE];

		snprintf(want, sizeof(want), "\"diff_ids\":[\"sha256:%s\"]",
			 km_hash_to_hex(&res.layer, hex));
		ck_assert(strstr(cfg, want));
	}
	/* a second layout into the same place, a bad container name: refused */
	ck_assert_int_eq(km_oci_write_layout(archive, layout, &o, &res, &err), -EEXIST);
	o.container = "-rm";
	snprintf(layout, sizeof(layout), "%s/oci2", dir);
	ck_assert_int_eq(km_oci_write_layout(archive, layout, &o, &res, &err), -EINVAL);
	o.container = "a\"b";
	ck_assert_int_eq(km_oci_write_layout(archive, layout, &o, &res, &err), -EINVAL);
	o.container = "ok";
	o.runtime = "run c";
	ck_assert_int_eq(km_oci_write_layout(archive, layout, &o, &res, &err), -EINVAL);
	free(index);
	free(man);
	free(cfg);
	free(layer);
	free(arch);
	nftw(dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("archive");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_archive_members);
	tcase_add_test(tc, test_archive_refusals);
	tcase_add_test(tc, test_archive_oci_layout);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
