/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_CONTAINER_H
#define KM_CONTAINER_H

/*
 * Live migration of a podman container (`kvmotion migrate --container`,
 * docs/podman.md) to a `kvmotion serve --podman` target, over the
 * migration transport (transport.h), with the report of km_migrate:
 *
 *   pre-copy  while the container serves: the weights its process maps or
 *             the index given (km_migrate_precopy), materialized there for
 *             a cooperative engine
 *   stop      podman container checkpoint --export ARCHIVE --compress none
 *             --keep: kvmotion's CRIU plugin, loaded by the node's CRIU,
 *             splits the image inside, so the archive holds the live state
 *             and references to chunks the target has; the archive is sent
 *             (with the chunks still missing there) and the target's podman
 *             restores it; the source container is removed only once the
 *             target reports it running
 *   failure   after the checkpoint: the source is restored in place from
 *             the checkpoint podman kept (`podman container restore`), and
 *             the report says why and whether it runs again (resumed)
 *
 * The source node's plugin must split against opts->m.store (its
 * kvmotion.conf's store): the sender reads the chunks from there.
 * Errors as km_migrate's, plus -ENOENT no such container, -EINVAL it is not
 * running.
 */

#include "migrate.h"

struct km_container_move_opts {
	const char *name; /* the container, on both nodes */
	const char *podman; /* podman, or a wrapper taking its arguments (NULL: "podman") */
	const char *const *podman_args; /* its global options (--root, --runroot, ...) */
	size_t n_podman_args;
	const char *const *checkpoint_args; /* extra options of container checkpoint */
	size_t n_checkpoint_args;
	unsigned timeout_s; /* of each podman command; 0: 600 */
	/*
	 * to, client, store, weights_dir, weights_index, work, progress:
	 * as for km_migrate (pid, criu, plugin_dir and criu_args unused).
	 */
	struct km_migrate_opts m;
};

/*
 * Moves container o->name. The report is km_migrate's: pid is the
 * container's process on this node, restored_pid the one on the target,
 * image_dir the archive, image_bytes its size, join_ns 0 (the join is
 * inside the target's restore, restore_ns). 0: it runs on the target and
 * is gone here.
 */
int km_container_move(const struct km_container_move_opts *o, struct km_migrate_report *r,
		      struct km_error *err);

#endif
