/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef KM_OCI_H
#define KM_OCI_H

/*
 * A checkpoint archive as an OCI image (image-spec 1.0 layout: oci-layout,
 * index.json, blobs/sha256/), the form in which Kubernetes' runtimes
 * restore a container: the archive itself is the image's one layer (an
 * uncompressed tar whose top holds checkpoint/, config.dump, spec.dump),
 * and the manifest carries the annotations that mark it a checkpoint:
 *
 *   io.kubernetes.cri-o.annotations.checkpoint.name   CRI-O (its first name)
 *   org.criu.checkpoint.container.name                checkpointctl's metadata:
 *                                                     containerd 2.x, current CRI-O
 *   io.podman.annotations.checkpoint.name             podman
 *
 * each with the container's name, the runtime's name under podman's and
 * checkpointctl's keys (podman refuses a checkpoint image without it), and
 * io.kvmotion.checkpoint.manifest (the split image's manifest id, when there
 * is one). The layout is what
 * `skopeo copy oci:DIR:REF containers-storage:REF` (CRI-O) or, packed with
 * tar, `ctr -n k8s.io images import` (containerd) load; docs/kubernetes.md.
 */

#include <stdbool.h>
#include <stdint.h>

#include "hash.h"
#include "util.h"

#define KM_OCI_ANNOTATION_CRIO	   "io.kubernetes.cri-o.annotations.checkpoint.name"
#define KM_OCI_ANNOTATION_CRIU	   "org.criu.checkpoint.container.name"
#define KM_OCI_ANNOTATION_PODMAN   "io.podman.annotations.checkpoint.name"
#define KM_OCI_ANNOTATION_MANIFEST "io.kvmotion.checkpoint.manifest"
/* The runtime that checkpointed it: podman restores only with the same. */
#define KM_OCI_ANNOTATION_PODMAN_RUNTIME "io.podman.annotations.checkpoint.runtime.name"
#define KM_OCI_ANNOTATION_CRIU_RUNTIME	 "org.criu.checkpoint.runtime.name"

struct km_oci_opts {
	const char *container; /* the checkpointed container's name: [a-zA-Z0-9][a-zA-Z0-9_.-]* */
	const char *ref; /* index.json's org.opencontainers.image.ref.name (NULL: "latest") */
	const struct km_hash *manifest_id; /* NULL: not a split image */
	const char *runtime; /* the OCI runtime that checkpointed it (NULL: "runc") */
};

struct km_oci_result {
	struct km_hash layer, config, manifest;
	uint64_t layer_size, config_size, manifest_size;
	bool linked; /* the layer blob is a hard link to the archive (else a copy) */
};

/*
 * Writes the layout into dir (created; must not hold one already:
 * -EEXIST). The layer blob is a hard link to the archive where the file
 * system allows, else a copy.
 */
int km_oci_write_layout(const char *archive, const char *dir, const struct km_oci_opts *o,
			struct km_oci_result *ret, struct km_error *err);

#endif
