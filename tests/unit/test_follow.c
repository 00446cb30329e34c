/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Splitting files while they are written (km_split_follow, and the
 * follower process of follow.h): whatever steps a file grows in, the
 * manifest's extents are the serial split's and the image joins to the
 * same bytes; a file that changes under the follower, or a split that is
 * dropped, leaves the directory as it was.
 */
#include <check.h>

#include "km-check.h"
#include "km-files.h"
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "follow.h"
#include "image.h"

#define MODEL_SIZE (8u << 20)
#define OTHER_SIZE ((1u << 20) + 5000) /* a large file that is not pages: split too */

static const struct km_chunker_params params = { 2048, 8192, 32768 };

struct fixture {
	char root[64];
	char serial[128], follow[128], store_path[128];
	int serial_fd, follow_fd;
	struct km_store *store;
	uint8_t *pages;
	size_t pages_size;
	uint8_t *other;
};

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* Small images and one large file that is not pages (it sorts before them). */
static void write_others(const struct fixture *f, int dirfd)
{
	uint8_t small[3000];

	fill_random(small, sizeof(small), 3);
	write_file(dirfd, "inventory.img", small, 40);
	write_file(dirfd, "core-1.img", small, sizeof(small));
	write_file(dirfd, "pagemap-1.img", small + 100, 700);
	write_file(dirfd, "core-big.img", f->other, OTHER_SIZE);
}

/*
 * A store seeded with a model; pages: random, the model, random, the
 * model's second half, zeros, random: runs of known chunks, delta and
 * zeros, with borders at odd offsets.
 */
static void fixture_setup(struct fixture *f)
{
	uint8_t *model = malloc(MODEL_SIZE);
	char model_path[128];
	const char *paths[] = { model_path };
	struct km_seed_stats ss;
	struct km_error err = { { 0 } };
	size_t off = 0;
	int fd;

	strcpy(f->root, "/tmp/km-test-follow-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(f->root));
	snprintf(f->serial, sizeof(f->serial), "%s/serial", f->root);
	snprintf(f->follow, sizeof(f->follow), "%s/follow", f->root);
	snprintf(f->store_path, sizeof(f->store_path), "%s/store", f->root);
	snprintf(model_path, sizeof(model_path), "%s/model.bin", f->root);
	ck_assert_int_eq(mkdir(f->serial, 0700), 0);
	ck_assert_int_eq(mkdir(f->follow, 0700), 0);
	f->serial_fd = open(f->serial, O_RDONLY | O_DIRECTORY);
	f->follow_fd = open(f->follow, O_RDONLY | O_DIRECTORY);
	ck_assert_int_ge(f->serial_fd, 0);
	ck_assert_int_ge(f->follow_fd, 0);

	ck_assert_ptr_nonnull(model);
	fill_random(model, MODEL_SIZE, 42);
	fd = open(model_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_eq(km_write_full(fd, model, MODEL_SIZE), 0);
	close(fd);
	ck_assert_int_eq(km_store_open(f->store_path, KM_STORE_CREATE | KM_STORE_NOSYNC, &params,
				       &f->store),
			 0);
	ck_assert_int_eq(km_seed(f->store, "model", paths, 1, 2, &ss, &err), 0);

	f->pages_size = (3u << 20) + 11 + MODEL_SIZE + 777 + MODEL_SIZE / 2 + (1u << 20) + 4096;
	f->pages = calloc(1, f->pages_size);
	ck_assert_ptr_nonnull(f->pages);
	fill_random(f->pages, (3u << 20) + 11, 61);
	off = (3u << 20) + 11;
	memcpy(f->pages + off, model, MODEL_SIZE);
	off += MODEL_SIZE;
	fill_random(f->pages + off, 777, 62);
	off += 777;
	memcpy(f->pages + off, model + MODEL_SIZE / 2, MODEL_SIZE / 2);
	off += MODEL_SIZE / 2 + (1u << 20);
	fill_random(f->pages + off, 4096, 63);
	f->other = malloc(OTHER_SIZE);
	ck_assert_ptr_nonnull(f->other);
	fill_random(f->other, OTHER_SIZE, 64);
	free(model);
}

static void fixture_teardown(struct fixture *f)
{
	km_store_free(f->store);
	close(f->serial_fd);
	close(f->follow_fd);
	free(f->pages);
	free(f->other);
	rm_tree(f->root);
}

static const struct km_split_opts split_opts = { .threads = 3 };

/* The reference: the serial split of the complete image. */
static void split_serial(struct fixture *f, struct km_split_stats *st)
{
	struct km_error err = { { 0 } };
	int r;

	write_others(f, f->serial_fd);
	write_file(f->serial_fd, "pages-1.img", f->pages, f->pages_size);
	r = km_image_split(f->serial_fd, f->store, &split_opts, st, &err);
	ck_assert_msg(r == 0, "serial split: %d %s", r, err.msg);
}

static const struct km_file_entry *find_entry(const struct km_manifest *m, const char *name)
{
	for (size_t i = 0; i < m->n_files; i++)
		if (strcmp(m->files[i].name, name) == 0)
			return &m->files[i];
	ck_abort_msg("%s is not in the manifest", name);
	return NULL;
}

/*
 * Both manifests list the same files, each with the same extents: kinds,
 * lengths, chunk ids (delta offsets differ: the followed file's delta
 * bytes come first). Both images join to the original bytes.
 */
static void assert_as_serial(struct fixture *f, const struct km_split_stats *a,
			     const struct km_split_stats *b)
{
	struct km_manifest *ms = NULL, *mf = NULL;
	struct km_join_opts jo = { .threads = 2 };
	struct km_error err = { { 0 } };
	int fds[2] = { f->serial_fd, f->follow_fd };

	ck_assert_uint_eq(a->bytes_referenced, b->bytes_referenced);
	ck_assert_uint_eq(a->bytes_zero, b->bytes_zero);
	ck_assert_uint_eq(a->bytes_delta, b->bytes_delta);
	ck_assert_uint_eq(a->files_split, b->files_split);
	ck_assert_uint_ge(a->bytes_referenced, MODEL_SIZE + MODEL_SIZE / 2 - 4 * params.max_size);
	ck_assert_int_eq(km_image_read_manifest(f->serial_fd, &ms, &err), 0);
	ck_assert_int_eq(km_image_read_manifest(f->follow_fd, &mf, &err), 0);
	ck_assert_uint_eq(ms->n_files, mf->n_files);
	for (size_t i = 0; i < ms->n_files; i++) {
		const struct km_file_entry *x = &ms->files[i];
		const struct km_file_entry *y = find_entry(mf, x->name);

		ck_assert_uint_eq(x->size, y->size);
		ck_assert_int_eq(x->split, y->split);
		ck_assert(km_hash_equal(&x->sha256, &y->sha256));
		ck_assert_uint_eq(x->n_extents, y->n_extents);
		for (size_t j = 0; j < x->n_extents; j++) {
			ck_assert_int_eq(x->extents[j].kind, y->extents[j].kind);
			ck_assert_uint_eq(x->extents[j].length, y->extents[j].length);
			if (x->extents[j].kind == KM_EXTENT_CHUNK)
				ck_assert(km_hash_equal(&x->extents[j].id, &y->extents[j].id));
		}
	}
	km_manifest_free(ms);
	km_manifest_free(mf);
	for (int i = 0; i < 2; i++) {
		size_t n;
		uint8_t *p;
		int r = km_image_join(fds[i], f->store, &jo, NULL, &err);

		ck_assert_msg(r == 0, "join: %d %s", r, err.msg);
		p = read_all(fds[i], "pages-1.img", &n);
		ck_assert_uint_eq(n, f->pages_size);
		ck_assert(memcmp(p, f->pages, n) == 0);
		free(p);
		p = read_all(fds[i], "core-big.img", &n);
		ck_assert_uint_eq(n, OTHER_SIZE);
		ck_assert(memcmp(p, f->other, n) == 0);
		free(p);
	}
}

/*
 * What the follower maps, as a test can check it: the bytes seen so far,
 * then garbage to the end of their page, then pages that fault when read.
 * Two such views take turns, so the base moves between calls.
 */
struct view {
	uint8_t *p;
	size_t len;
};

static void view_init(struct view *v, size_t size)
{
	long page = sysconf(_SC_PAGESIZE);

	v->len = (size + 2 * (size_t)page) & ~((size_t)page - 1);
	v->p = mmap(NULL, v->len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert(v->p != MAP_FAILED);
}

static const uint8_t *view_show(struct view *v, const uint8_t *src, size_t avail)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t open_len = (avail + page - 1) / page * page;

	ck_assert_int_eq(mprotect(v->p, v->len, PROT_NONE), 0);
	if (open_len == 0)
		return v->p;
	ck_assert_int_eq(mprotect(v->p, open_len, PROT_READ | PROT_WRITE), 0);
	memcpy(v->p, src, avail);
	memset(v->p + avail, 0xa5, open_len - avail);
	ck_assert_int_eq(mprotect(v->p, open_len, PROT_READ), 0);
	return v->p;
}

static void view_free(struct view *v)
{
	munmap(v->p, v->len);
}

/*
 * Feeds pages-1.img to a split in random steps (from a byte to a few
 * MiB), writing the file as it goes; 'end' says how its end is split: by
 * a last complete call, or by the commit.
 */
static void follow_in_steps(struct fixture *f, uint64_t seed, bool complete_by_call,
			    struct km_split_stats *st)
{
	struct km_split *sp = NULL;
	struct km_error err = { { 0 } };
	struct view views[2];
	size_t avail = 0;
	unsigned calls = 0;
	int fd, r;

	view_init(&views[0], f->pages_size);
	view_init(&views[1], f->pages_size);
	write_others(f, f->follow_fd);
	fd = openat(f->follow_fd, "pages-1.img", O_RDWR | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(km_split_begin(f->follow_fd, f->store, &split_opts, &sp, &err), 0);
	while (avail < f->pages_size) {
		uint64_t k = rnd(&seed);
		size_t step = k % 4 == 0 ? k % 5 : k % 4 == 1 ? k % 40000 : k % (3u << 20);
		size_t next = KM_MIN(f->pages_size, avail + step);
		const uint8_t *base;

		ck_assert_int_eq(km_pwrite_full(fd, f->pages + avail, next - avail, (off_t)avail), 0);
		avail = next;
		base = view_show(&views[calls % 2], f->pages, avail);
		r = km_split_follow(sp, "pages-1.img", fd, base, avail,
				    complete_by_call && avail == f->pages_size, &err);
		ck_assert_msg(r == 0, "follow at %zu: %d %s", avail, r, err.msg);
		calls++;
	}
	close(fd);
	view_free(&views[0]);
	view_free(&views[1]);
	r = km_split_commit(sp, st, &err);
	ck_assert_msg(r == 0, "commit: %d %s", r, err.msg);
	km_split_free(sp);
	ck_assert_int_eq(faccessat(f->follow_fd, "pages-1.img", F_OK, 0), -1);
}

START_TEST(test_follow_steps_as_serial)
{
	for (uint64_t seed = 1; seed <= 4; seed++) {
		struct fixture f;
		struct km_split_stats a, b;

		fixture_setup(&f);
		split_serial(&f, &a);
		follow_in_steps(&f, seed * 7919, seed % 2 == 0, &b);
		assert_as_serial(&f, &a, &b);
		fixture_teardown(&f);
	}
}
END_TEST

/* Names in the directory, sorted, joined by spaces (dot files too). */
static void dir_listing(const char *dir, char *buf, size_t n)
{
	struct dirent **list;
	int k = scandir(dir, &list, NULL, alphasort);

	ck_assert_int_ge(k, 0);
	buf[0] = 0;
	for (int i = 0; i < k; i++) {
		if (strcmp(list[i]->d_name, ".") && strcmp(list[i]->d_name, "..")) {
			strncat(buf, list[i]->d_name, n - strlen(buf) - 2);
			strcat(buf, " ");
		}
		free(list[i]);
	}
	free(list);
}

/*
 * A followed file that is not what was followed at commit (replaced,
 * grown after its end was split), or a split that is dropped: -ESTALE or
 * nothing, and the directory as it was, the temporary delta gone.
 */
START_TEST(test_follow_changed_file_leaves_image)
{
	struct fixture f;
	struct km_error err = { { 0 } };
	char after[1024];

	fixture_setup(&f);
	write_others(&f, f.follow_fd);
	for (int mode = 0; mode < 4; mode++) {
		struct km_split *sp = NULL;
		int fd, r;

		write_file(f.follow_fd, "pages-1.img", f.pages, f.pages_size / 2);
		fd = openat(f.follow_fd, "pages-1.img", O_RDONLY);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(km_split_begin(f.follow_fd, f.store, &split_opts, &sp, &err), 0);
		ck_assert_int_eq(km_split_follow(sp, "pages-1.img", fd, f.pages, f.pages_size / 2,
						 mode == 1, &err),
				 0);
		close(fd);
		if (mode == 0) { /* replaced by another file of the same bytes */
			write_file(f.follow_fd, "new.tmp", f.pages, f.pages_size / 2);
			ck_assert_int_eq(renameat(f.follow_fd, "new.tmp", f.follow_fd, "pages-1.img"), 0);
		}
		else if (mode == 1) /* grew after its end was split */
			write_file(f.follow_fd, "pages-1.img", f.pages, f.pages_size);
		else if (mode == 2) { /* shrank */
			char path[256];

			snprintf(path, sizeof(path), "%s/pages-1.img", f.follow);
			ck_assert_int_eq(truncate(path, 4096), 0);
		}
		/* mode 3: dropped without a commit */
		dir_listing(f.follow, after, sizeof(after));
		/* a split under way leaves no file in the directory (O_TMPFILE delta) */
		ck_assert_str_eq(after, "core-1.img core-big.img inventory.img pagemap-1.img pages-1.img ");
		if (mode < 3) {
			r = km_split_commit(sp, NULL, &err);
			ck_assert_msg(r == -ESTALE, "mode %d: %d %s", mode, r, err.msg);
		}
		km_split_free(sp);
		dir_listing(f.follow, after, sizeof(after));
		ck_assert_str_eq(after, "core-1.img core-big.img inventory.img pagemap-1.img pages-1.img ");
		ck_assert_int_eq(km_image_is_split(f.follow_fd), 0);
	}
	fixture_teardown(&f);
}
END_TEST

/* One file at a time: another may start only once the first is complete. */
START_TEST(test_follow_one_file_at_a_time)
{
	struct fixture f;
	struct km_split *sp = NULL;
	struct km_error err = { { 0 } };
	int fd1, fd2;

	fixture_setup(&f);
	write_file(f.follow_fd, "pages-1.img", f.pages, 1u << 20);
	write_file(f.follow_fd, "pages-2.img", f.pages, 1u << 20);
	fd1 = openat(f.follow_fd, "pages-1.img", O_RDONLY);
	fd2 = openat(f.follow_fd, "pages-2.img", O_RDONLY);
	ck_assert_int_eq(km_split_begin(f.follow_fd, f.store, &split_opts, &sp, &err), 0);
	ck_assert_int_eq(km_split_follow(sp, "pages-1.img", fd1, f.pages, 1u << 19, false, &err), 0);
	ck_assert_int_eq(km_split_follow(sp, "pages-2.img", fd2, f.pages, 1u << 19, false, &err),
			 -EBUSY);
	/* and after an error, nothing more */
	ck_assert_int_eq(km_split_follow(sp, "pages-1.img", fd1, f.pages, 1u << 20, true, &err),
			 -EINVAL);
	ck_assert_int_eq(km_split_commit(sp, NULL, &err), -EINVAL);
	km_split_free(sp);
	ck_assert_int_eq(faccessat(f.follow_fd, ".kvmotion.delta.tmp", F_OK, 0), -1);
	close(fd1);
	close(fd2);
	fixture_teardown(&f);
}
END_TEST

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };

	nanosleep(&ts, NULL);
}

/* Writes a file as CRIU does: created, written front to back in steps, closed or left open. */
static int write_slowly(int dirfd, const char *name, const uint8_t *p, size_t n, bool keep_open)
{
	int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	size_t off = 0;

	ck_assert_int_ge(fd, 0);
	while (off < n) {
		size_t k = KM_MIN(n - off, (size_t)(1u << 20) + 4096 * (off % 7));

		ck_assert_int_eq(km_write_full(fd, p + off, k), 0);
		off += k;
		sleep_ms(3);
	}
	if (keep_open)
		return fd;
	close(fd);
	return -1;
}

/*
 * The follower process: pages-1.img written and closed (followed to its
 * end), pages-2.img written and left open (its tail split at commit),
 * pages-9.img there before the start (left to the commit): the manifest
 * is the serial split's of the same files.
 */
START_TEST(test_follow_process_as_serial)
{
	struct fixture f;
	struct km_follow *fw = NULL;
	struct km_follow_stats fs;
	struct km_split_stats a, b;
	struct km_error err = { { 0 } };
	uint8_t *tail;
	int fd, r;

	fixture_setup(&f);
	tail = f.pages + f.pages_size / 3;
	write_file(f.serial_fd, "pages-2.img", tail, f.pages_size / 3);
	write_file(f.serial_fd, "pages-9.img", tail, 5000);
	split_serial(&f, &a);

	write_file(f.follow_fd, "pages-9.img", tail, 5000);
	ck_assert_int_eq(km_follow_start(f.follow_fd, f.store_path, KM_STORE_NOSYNC, &split_opts, &fw, &err), 0);
	sleep_ms(20);
	write_others(&f, f.follow_fd);
	write_slowly(f.follow_fd, "pages-1.img", f.pages, f.pages_size, false);
	fd = write_slowly(f.follow_fd, "pages-2.img", tail, f.pages_size / 3, true);
	sleep_ms(50);
	r = km_follow_stop(fw, &fs, &err);
	ck_assert_msg(r == 0, "follower: %d %s", r, err.msg);
	close(fd);
	/* how far it got depends on the machine's load; the result does not */
	ck_assert_uint_ge(fs.files, 1);
	ck_assert_uint_le(fs.files, 2);
	ck_assert_uint_gt(fs.bytes_followed, 0);
	r = km_follow_commit(fw, &b, &err);
	ck_assert_msg(r == 0, "commit: %d %s", r, err.msg);
	km_follow_free(fw);
	assert_as_serial(&f, &a, &b);
	fixture_teardown(&f);
}
END_TEST

/* A follower dropped without a commit leaves the directory as it was, and is gone. */
START_TEST(test_follow_process_dropped)
{
	struct fixture f;
	struct km_follow *fw = NULL;
	struct km_error err = { { 0 } };
	char listing[1024];
	int fd;

	fixture_setup(&f);
	ck_assert_int_eq(km_follow_start(f.follow_fd, f.store_path, KM_STORE_NOSYNC, &split_opts, &fw, &err), 0);
	write_others(&f, f.follow_fd);
	fd = write_slowly(f.follow_fd, "pages-1.img", f.pages, 4u << 20, true);
	sleep_ms(20);
	km_follow_free(fw);
	close(fd);
	dir_listing(f.follow, listing, sizeof(listing));
	ck_assert_str_eq(listing, "core-1.img core-big.img inventory.img pagemap-1.img pages-1.img ");
	fixture_teardown(&f);
}
END_TEST

/* A follower that fails (no store there): stop says why, commit refuses, nothing left. */
START_TEST(test_follow_process_error)
{
	struct fixture f;
	struct km_follow *fw = NULL;
	struct km_split_stats st;
	struct km_error err = { { 0 } };
	char listing[1024], path[256];
	int r;

	fixture_setup(&f);
	snprintf(path, sizeof(path), "%s/no-store", f.root);
	ck_assert_int_eq(km_follow_start(f.follow_fd, path, KM_STORE_NOSYNC, &split_opts, &fw, &err), 0);
	write_others(&f, f.follow_fd);
	write_slowly(f.follow_fd, "pages-1.img", f.pages, 2u << 20, false);
	r = km_follow_stop(fw, NULL, &err);
	ck_assert_msg(r == -ENOENT, "stop: %d %s", r, err.msg);
	ck_assert_msg(strstr(err.msg, "no-store"), "%s", err.msg);
	ck_assert_int_eq(km_follow_commit(fw, &st, &err), -EINVAL);
	km_follow_free(fw);
	dir_listing(f.follow, listing, sizeof(listing));
	ck_assert_str_eq(listing, "core-1.img core-big.img inventory.img pagemap-1.img pages-1.img ");
	fixture_teardown(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("follow");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, test_follow_steps_as_serial);
	tcase_add_test(tc, test_follow_changed_file_leaves_image);
	tcase_add_test(tc, test_follow_one_file_at_a_time);
	tcase_add_test(tc, test_follow_process_as_serial);
	tcase_add_test(tc, test_follow_process_dropped);
	tcase_add_test(tc, test_follow_process_error);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
