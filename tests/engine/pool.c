/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

/*
 * Jobs come every few microseconds: a worker (and the caller waiting for
 * the workers) polls for a while before it sleeps on the condition variable.
 */
#define SPIN 2000

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

struct worker {
	struct pool *pool;
	unsigned part;
	pthread_t thread;
};

struct pool {
	unsigned threads;
	pthread_mutex_t lock;
	pthread_cond_t start, done;
	atomic_ulong generation; /* bumped for each job, under lock */
	atomic_uint pending;	 /* workers still on the current job */
	atomic_bool stop;
	pool_fn *fn;
	void *arg;
	struct worker *workers; /* threads - 1 of them */
	unsigned n_started;
};

static void *worker_main(void *data)
{
	struct worker *w = data;
	struct pool *p = w->pool;
	unsigned long seen = 0;

	for (;;) {
		for (unsigned i = 0; i < SPIN && atomic_load(&p->generation) == seen &&
				     !atomic_load(&p->stop); i++)
			cpu_relax();
		if (atomic_load(&p->generation) == seen && !atomic_load(&p->stop)) {
			pthread_mutex_lock(&p->lock);
			while (!atomic_load(&p->stop) && atomic_load(&p->generation) == seen)
				pthread_cond_wait(&p->start, &p->lock);
			pthread_mutex_unlock(&p->lock);
		}
		if (atomic_load(&p->stop))
			break;
		/* fn and arg were written before generation moved */
		seen = atomic_load(&p->generation);
		p->fn(p->arg, w->part, p->threads);
		if (atomic_fetch_sub(&p->pending, 1) == 1) {
			pthread_mutex_lock(&p->lock);
			pthread_cond_signal(&p->done);
			pthread_mutex_unlock(&p->lock);
		}
	}
	return NULL;
}

int pool_new(unsigned threads, struct pool **ret)
{
	struct pool *p;
	int r;

	if (threads == 0 || threads > 1024)
		return -EINVAL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->threads = threads;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->start, NULL);
	pthread_cond_init(&p->done, NULL);
	if (threads > 1) {
		p->workers = calloc(threads - 1, sizeof(*p->workers));
		if (!p->workers) {
			pool_free(p);
			return -ENOMEM;
		}
	}
	for (unsigned i = 0; i + 1 < threads; i++) {
		p->workers[i].pool = p;
		p->workers[i].part = i + 1;
		r = pthread_create(&p->workers[i].thread, NULL, worker_main, &p->workers[i]);
		if (r) {
			pool_free(p);
			return -r;
		}
		p->n_started++;
	}
	*ret = p;
	return 0;
}

void pool_free(struct pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	atomic_store(&p->stop, true);
	pthread_cond_broadcast(&p->start);
	pthread_mutex_unlock(&p->lock);
	for (unsigned i = 0; i < p->n_started; i++)
		pthread_join(p->workers[i].thread, NULL);
	pthread_cond_destroy(&p->start);
	pthread_cond_destroy(&p->done);
	pthread_mutex_destroy(&p->lock);
	free(p->workers);
	free(p);
}

void pool_run(struct pool *p, pool_fn *fn, void *arg)
{
	if (!p || p->threads == 1) {
		fn(arg, 0, 1);
		return;
	}
	pthread_mutex_lock(&p->lock);
	p->fn = fn;
	p->arg = arg;
	atomic_store(&p->pending, p->threads - 1);
	atomic_fetch_add(&p->generation, 1);
	pthread_cond_broadcast(&p->start);
	pthread_mutex_unlock(&p->lock);

	fn(arg, 0, p->threads);

	for (unsigned i = 0; i < SPIN && atomic_load(&p->pending); i++)
		cpu_relax();
	if (atomic_load(&p->pending)) {
		pthread_mutex_lock(&p->lock);
		while (atomic_load(&p->pending))
			pthread_cond_wait(&p->done, &p->lock);
		pthread_mutex_unlock(&p->lock);
	}
}

unsigned pool_threads(const struct pool *p)
{
	return p ? p->threads : 1;
}
