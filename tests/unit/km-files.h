/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_FILES_H
#define KM_FILES_H

/*
 * Test helpers for suites that build image directories: deterministic
 * bytes, whole-file writes and reads that fail the test on error, and
 * removing a scratch tree.
 */

#include <check.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#include "format.h"
#include "util.h"

/* xorshift bytes: the same seed, the same bytes. */
static inline void fill_random(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;

	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (uint8_t)(x >> 24);
	}
}

static inline void write_file(int dirfd, const char *name, const void *p, size_t n)
{
	int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(km_write_full(fd, p, n), 0);
	close(fd);
}

/* The whole file, malloc'd. */
static inline uint8_t *read_all(int dirfd, const char *name, size_t *ret_n)
{
	void *p = NULL;

	ck_assert_int_eq(km_read_file_at(dirfd, name, 1u << 30, &p, ret_n), 0);
	return p;
}

static inline int km_files_rm_entry(const char *path, const struct stat *st, int flag,
				    struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static inline void rm_tree(const char *root)
{
	nftw(root, km_files_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

#endif
