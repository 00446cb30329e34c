/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef ENG_POOL_H
#define ENG_POOL_H

/*
 * A fixed set of worker threads that run one function over parts of a job:
 * pool_run(p, fn, arg) calls fn(arg, part, parts) once for every part in
 * 0..parts-1 (part 0 on the calling thread) and returns when all are done.
 * The caller splits its work by part number alone, so which thread runs a
 * part never changes a result: the engine's tokens are the same for any
 * number of threads.
 *
 * A pool of one thread starts none; pool_run then calls fn(arg, 0, 1).
 */

struct pool;

typedef void pool_fn(void *arg, unsigned part, unsigned parts);

/* threads >= 1; -EINVAL, -ENOMEM or pthread_create's error, negated. */
int pool_new(unsigned threads, struct pool **ret);
/* Accepts NULL. Joins the workers. */
void pool_free(struct pool *p);
/* p may be NULL: one part. */
void pool_run(struct pool *p, pool_fn *fn, void *arg);
unsigned pool_threads(const struct pool *p);

#endif
