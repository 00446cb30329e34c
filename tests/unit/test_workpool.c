/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <check.h>

#include "km-check.h"
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#include "workpool.h"

static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = ms % 1000 * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static atomic_uint counter;

static int count_job(void *arg)
{
	atomic_fetch_add(&counter, 1);
	return 0;
}

static int slow_count_job(void *arg)
{
	sleep_ms(1);
	atomic_fetch_add(&counter, 1);
	return 0;
}

/* arg is an int: 0 succeeds, anything else is returned as the error. */
static int error_job(void *arg)
{
	atomic_fetch_add(&counter, 1);
	return *(const int *)arg;
}

START_TEST(test_workpool_runs_all_jobs)
{
	static const unsigned threads[] = { 0, 1, 2, 3, 8 };
	static const unsigned queues[] = { 0, 1, 4, 1000 };

	for (size_t t = 0; t < sizeof(threads) / sizeof(threads[0]); t++) {
		for (size_t q = 0; q < sizeof(queues) / sizeof(queues[0]); q++) {
			struct km_workpool *w = NULL;

			ck_assert_int_eq(km_workpool_new(threads[t], queues[q], &w), 0);
			ck_assert_ptr_nonnull(w);
			ck_assert_uint_eq(km_workpool_threads(w),
					  threads[t] ? threads[t] : km_cpu_count());
			atomic_store(&counter, 0);
			for (int i = 0; i < 2000; i++)
				ck_assert_int_eq(km_workpool_submit(w, count_job, NULL), 0);
			ck_assert_int_eq(km_workpool_wait(w), 0);
			ck_assert_uint_eq(atomic_load(&counter), 2000);
			/* The pool is reusable after wait. */
			for (int i = 0; i < 100; i++)
				ck_assert_int_eq(km_workpool_submit(w, count_job, NULL), 0);
			ck_assert_int_eq(km_workpool_wait(w), 0);
			ck_assert_int_eq(km_workpool_wait(w), 0);
			ck_assert_uint_eq(atomic_load(&counter), 2100);
			km_workpool_free(w);
		}
	}
}
END_TEST

START_TEST(test_workpool_wait_without_jobs)
{
	struct km_workpool *w;

	ck_assert_int_eq(km_workpool_new(2, 2, &w), 0);
	ck_assert_int_eq(km_workpool_wait(w), 0);
	km_workpool_free(w);
	km_workpool_free(NULL);
	ck_assert_uint_ge(km_cpu_count(), 1);
}
END_TEST

START_TEST(test_workpool_first_error)
{
	static const int ok = 0, eio = -EIO, enospc = -ENOSPC;
	struct km_workpool *w;

	/* One thread: jobs run in order, so the first error is -EIO. */
	ck_assert_int_eq(km_workpool_new(1, 100, &w), 0);
	atomic_store(&counter, 0);
	ck_assert_int_eq(km_workpool_submit(w, error_job, (void *)&ok), 0);
	ck_assert_int_eq(km_workpool_submit(w, error_job, (void *)&eio), 0);
	ck_assert_int_eq(km_workpool_submit(w, error_job, (void *)&ok), 0);
	ck_assert_int_eq(km_workpool_submit(w, error_job, (void *)&enospc), 0);
	ck_assert_int_eq(km_workpool_wait(w), -EIO);
	/* Every queued job still ran. */
	ck_assert_uint_eq(atomic_load(&counter), 4);
	/* Later submits report the error and do not queue the job. */
	ck_assert_int_eq(km_workpool_submit(w, error_job, (void *)&ok), -EIO);
	ck_assert_int_eq(km_workpool_wait(w), -EIO);
	ck_assert_uint_eq(atomic_load(&counter), 4);
	km_workpool_free(w);
	ck_assert_uint_eq(atomic_load(&counter), 4);
}
END_TEST

START_TEST(test_workpool_error_stops_blocked_submit)
{
	static const int ok = 0, eio = -EIO;
	struct km_workpool *w;
	int r = 0;

	/*
	 * A producer submitting far more than the queue holds learns about
	 * the error from submit, without waiting for the end.
	 */
	ck_assert_int_eq(km_workpool_new(2, 2, &w), 0);
	atomic_store(&counter, 0);
	for (int i = 0; i < 100000 && r == 0; i++)
		r = km_workpool_submit(w, error_job, (void *)(i == 10 ? &eio : &ok));
	ck_assert_int_eq(r, -EIO);
	ck_assert_int_eq(km_workpool_wait(w), -EIO);
	ck_assert_uint_lt(atomic_load(&counter), 100000);
	km_workpool_free(w);
}
END_TEST

START_TEST(test_workpool_bounded_queue_no_deadlock)
{
	struct km_workpool *w;

	ck_assert_int_eq(km_workpool_new(1, 1, &w), 0);
	atomic_store(&counter, 0);
	for (int i = 0; i < 50; i++)
		ck_assert_int_eq(km_workpool_submit(w, slow_count_job, NULL), 0);
	for (int i = 0; i < 5000; i++)
		ck_assert_int_eq(km_workpool_submit(w, count_job, NULL), 0);
	ck_assert_int_eq(km_workpool_wait(w), 0);
	ck_assert_uint_eq(atomic_load(&counter), 5050);
	km_workpool_free(w);
}
END_TEST

START_TEST(test_workpool_free_runs_pending_jobs)
{
	struct km_workpool *w;

	ck_assert_int_eq(km_workpool_new(1, 64, &w), 0);
	atomic_store(&counter, 0);
	for (int i = 0; i < 60; i++)
		ck_assert_int_eq(km_workpool_submit(w, slow_count_job, NULL), 0);
	/* Most are still queued: free must run them, not drop them. */
	km_workpool_free(w);
	ck_assert_uint_eq(atomic_load(&counter), 60);

	ck_assert_int_eq(km_workpool_new(4, 0, &w), 0);
	atomic_store(&counter, 0);
	for (int i = 0; i < 200; i++)
		ck_assert_int_eq(km_workpool_submit(w, slow_count_job, NULL), 0);
	km_workpool_free(w);
	ck_assert_uint_eq(atomic_load(&counter), 200);
}
END_TEST

struct concurrent {
	atomic_uint running, peak;
};

static int concurrency_job(void *arg)
{
	struct concurrent *c = arg;
	unsigned now = atomic_fetch_add(&c->running, 1) + 1, peak = atomic_load(&c->peak);

	while (now > peak && !atomic_compare_exchange_weak(&c->peak, &peak, now))
		;
	sleep_ms(20);
	atomic_fetch_sub(&c->running, 1);
	return 0;
}

START_TEST(test_workpool_runs_in_parallel)
{
	struct concurrent c = { 0 };
	struct km_workpool *w;

	/* Sleeping jobs overlap on any machine: the threads really run. */
	ck_assert_int_eq(km_workpool_new(4, 0, &w), 0);
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(km_workpool_submit(w, concurrency_job, &c), 0);
	ck_assert_int_eq(km_workpool_wait(w), 0);
	ck_assert_uint_ge(atomic_load(&c.peak), 2);
	ck_assert_uint_le(atomic_load(&c.peak), 4);
	km_workpool_free(w);
}
END_TEST

static int record_nice(void *arg)
{
	errno = 0;
	*(int *)arg = getpriority(PRIO_PROCESS, 0);
	return errno ? -errno : 0;
}

/* Background threads yield: their nice value is the creator's plus 10. */
START_TEST(test_workpool_background_nice)
{
	struct km_workpool *w = NULL;
	int base, plain = -100, background = -100;

	errno = 0;
	base = getpriority(PRIO_PROCESS, 0);
	ck_assert_int_eq(errno, 0);
	ck_assert_int_eq(km_workpool_new(1, 0, &w), 0);
	ck_assert_int_eq(km_workpool_submit(w, record_nice, &plain), 0);
	ck_assert_int_eq(km_workpool_wait(w), 0);
	km_workpool_free(w);
	ck_assert_int_eq(km_workpool_new_background(1, 0, &w), 0);
	ck_assert_int_eq(km_workpool_submit(w, record_nice, &background), 0);
	ck_assert_int_eq(km_workpool_wait(w), 0);
	km_workpool_free(w);
	ck_assert_int_eq(plain, base);
	ck_assert_int_eq(background, base + KM_WORKPOOL_BACKGROUND_NICE > 19
					     ? 19
					     : base + KM_WORKPOOL_BACKGROUND_NICE);
	/* The calling thread keeps its own. */
	ck_assert_int_eq(getpriority(PRIO_PROCESS, 0), base);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("workpool");
	TCase *tc = tcase_create("core");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_workpool_runs_all_jobs);
	tcase_add_test(tc, test_workpool_wait_without_jobs);
	tcase_add_test(tc, test_workpool_first_error);
	tcase_add_test(tc, test_workpool_error_stops_blocked_submit);
	tcase_add_test(tc, test_workpool_bounded_queue_no_deadlock);
	tcase_add_test(tc, test_workpool_free_runs_pending_jobs);
	tcase_add_test(tc, test_workpool_runs_in_parallel);
	tcase_add_test(tc, test_workpool_background_nice);
	suite_add_tcase(s, tc);
	return km_check_run(s);
}
