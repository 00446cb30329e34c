/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_CHECK_H
#define KM_CHECK_H

/*
 * The one main() tail every Check suite shares: run with CK_ENV (meson sets
 * CK_VERBOSITY=silent and CK_TAP_LOG_FILE_NAME=- so stdout is pure TAP),
 * exit nonzero if anything failed.
 */

#include <check.h>
#include <stdlib.h>

static inline int km_check_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
