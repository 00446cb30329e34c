/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "workpool.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

struct job {
	km_job_fn fn;
	void *arg;
};

struct km_workpool {
	pthread_mutex_t lock;
	pthread_cond_t has_job;	   /* queue not empty, or stopping */
	pthread_cond_t has_room;   /* queue not full */
	pthread_cond_t idle;	   /* queue empty and nothing running */
	struct job *queue;	   /* ring of queue_max */
	unsigned queue_max, head, count;
	unsigned running;
	int error;		   /* first job error */
	bool stopping;
	unsigned n_threads;
	pthread_t *threads;
	int nice; /* added to each thread's nice value at its start */
};

unsigned km_cpu_count(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n > 0 ? (unsigned)n : 1;
}

static void *worker(void *p)
{
	struct km_workpool *w = p;

	if (w->nice) {
		int cur;

		/* Per thread on Linux: who 0 is the calling thread. Best effort. */
		errno = 0;
		cur = getpriority(PRIO_PROCESS, 0);
		if (errno == 0)
			(void)setpriority(PRIO_PROCESS, 0, cur + w->nice);
	}

	pthread_mutex_lock(&w->lock);
	for (;;) {
		struct job j;
		int r;

		while (w->count == 0 && !w->stopping)
			pthread_cond_wait(&w->has_job, &w->lock);
		if (w->count == 0)
			break;
		j = w->queue[w->head];
		w->head = (w->head + 1) % w->queue_max;
		w->count--;
		w->running++;
		pthread_cond_signal(&w->has_room);
		pthread_mutex_unlock(&w->lock);

		r = j.fn(j.arg);

		pthread_mutex_lock(&w->lock);
		w->running--;
		if (r < 0 && w->error == 0)
			w->error = r;
		if (w->count == 0 && w->running == 0)
			pthread_cond_broadcast(&w->idle);
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

static int pool_new(unsigned threads, unsigned queue_max, int nice, struct km_workpool **ret)
{
	struct km_workpool *w;

	if (threads == 0)
		threads = km_cpu_count();
	if (queue_max == 0)
		queue_max = 2 * threads;

	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->queue = calloc(queue_max, sizeof(*w->queue));
	w->threads = calloc(threads, sizeof(*w->threads));
	if (!w->queue || !w->threads) {
		free(w->queue);
		free(w->threads);
		free(w);
		return -ENOMEM;
	}
	w->queue_max = queue_max;
	w->nice = nice;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->has_job, NULL);
	pthread_cond_init(&w->has_room, NULL);
	pthread_cond_init(&w->idle, NULL);

	for (unsigned i = 0; i < threads; i++) {
		int r = pthread_create(&w->threads[i], NULL, worker, w);

		if (r != 0) {
			km_workpool_free(w);
			return -r;
		}
		w->n_threads++;
	}
	*ret = w;
	return 0;
}

int km_workpool_new(unsigned threads, unsigned queue_max, struct km_workpool **ret)
{
	return pool_new(threads, queue_max, 0, ret);
}

int km_workpool_new_background(unsigned threads, unsigned queue_max, struct km_workpool **ret)
{
	return pool_new(threads, queue_max, KM_WORKPOOL_BACKGROUND_NICE, ret);
}

int km_workpool_submit(struct km_workpool *w, km_job_fn fn, void *arg)
{
	int r;

	pthread_mutex_lock(&w->lock);
	while (w->count == w->queue_max && w->error == 0)
		pthread_cond_wait(&w->has_room, &w->lock);
	r = w->error;
	if (r == 0) {
		w->queue[(w->head + w->count) % w->queue_max] = (struct job){ fn, arg };
		w->count++;
		pthread_cond_signal(&w->has_job);
	}
	pthread_mutex_unlock(&w->lock);
	return r;
}

int km_workpool_wait(struct km_workpool *w)
{
	int r;

	pthread_mutex_lock(&w->lock);
	while (w->count > 0 || w->running > 0)
		pthread_cond_wait(&w->idle, &w->lock);
	r = w->error;
	pthread_mutex_unlock(&w->lock);
	return r;
}

void km_workpool_free(struct km_workpool *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&w->lock);
	w->stopping = true;
	pthread_cond_broadcast(&w->has_job);
	pthread_mutex_unlock(&w->lock);
	for (unsigned i = 0; i < w->n_threads; i++)
		pthread_join(w->threads[i], NULL);
	pthread_mutex_destroy(&w->lock);
	pthread_cond_destroy(&w->has_job);
	pthread_cond_destroy(&w->has_room);
	pthread_cond_destroy(&w->idle);
	free(w->queue);
	free(w->threads);
	free(w);
}

unsigned km_workpool_threads(const struct km_workpool *w)
{
	return w->n_threads;
}
