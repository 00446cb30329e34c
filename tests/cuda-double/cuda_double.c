/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Placeholder. */
int km_cuda_double_placeholder(void);
int km_cuda_double_placeholder(void) { return 0; }
