/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_WORKPOOL_H
#define KM_WORKPOOL_H

/*
 * A fixed pool of threads running jobs from a bounded queue. Submitting
 * blocks while the queue is full, which bounds the memory a producer can
 * have in flight. The first job error is kept and returned by wait.
 */

#include <stddef.h>

typedef int (*km_job_fn)(void *arg);

struct km_workpool;

/* threads == 0: one per online CPU. queue_max == 0: 2 x threads. */
int km_workpool_new(unsigned threads, unsigned queue_max, struct km_workpool **ret);

/*
 * The same, with threads that yield to the others: their nice value is
 * raised by KM_WORKPOOL_BACKGROUND_NICE (Linux sets it per thread). For
 * parallel work beside a serial task that bounds the whole (a hash
 * stream): on few cores the scheduler would otherwise share the serial
 * task's core with them and stretch it.
 */
#define KM_WORKPOOL_BACKGROUND_NICE 10
int km_workpool_new_background(unsigned threads, unsigned queue_max, struct km_workpool **ret);

/*
 * Queues fn(arg). fn returns 0 or a negative errno. Returns 0, or the first
 * error a job returned so far (the job is then not queued).
 */
int km_workpool_submit(struct km_workpool *w, km_job_fn fn, void *arg);

/* Waits until every queued job has run; returns the first job error or 0. */
int km_workpool_wait(struct km_workpool *w);

/* Waits for queued jobs, joins the threads and frees. NULL is fine. */
void km_workpool_free(struct km_workpool *w);

unsigned km_workpool_threads(const struct km_workpool *w);

/* Online CPUs, at least 1. */
unsigned km_cpu_count(void);

#endif
