/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_FORMAT_INTERNAL_H
#define KM_FORMAT_INTERNAL_H

/*
 * The record framing of format.c (magic, u32 LE length, packed message) for
 * the other modules that own a kvmotion file of their own (engine_ctl.c's
 * DIR/kvmotion.engines), so that every file is framed and checked by one
 * piece of code. Includes protobuf-c: only for modules that include
 * generated code anyway.
 */

#include <protobuf-c/protobuf-c.h>

#include "format.h"

/* magic (KM_MAGIC_SIZE bytes) + u32 LE length + msg packed, malloc'd. */
int km_record_encode(const char *magic, const ProtobufCMessage *msg, void **ret,
		     size_t *ret_size);

/*
 * Finds the one record of a file of n bytes at p: -ENOTRECOVERABLE wrong
 * magic, -EBADMSG truncated, oversized or trailing bytes; err names 'what'.
 * *ret points into p.
 */
int km_record_locate(const void *p, size_t n, const char *magic, const char *what,
		     const uint8_t **ret, size_t *ret_len, struct km_error *err);

#endif
