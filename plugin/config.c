/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "config.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void km_config_init(struct km_config *c)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->store, sizeof(c->store), "%s", KM_STORE_PATH_DEFAULT);
	c->split = KM_AUTO;
	c->min_split_size = 1024 * 1024;
	c->chunker = KM_CHUNKER_PARAMS_DEFAULT;
	c->delta_level = 1;
	c->sync = true;
	c->split_follow = true;
	snprintf(c->libcuda, sizeof(c->libcuda), "libcuda.so.1");
	/* Inside CRIU's default --timeout of 10 s, which bounds the freeze. */
	c->lock_timeout_ms = 8000;
	c->quiesce_timeout_ms = 5000;
	c->leave_running = KM_AUTO;
	c->late_weights = true;
	snprintf(c->source, sizeof(c->source), "defaults");
}

static int parse_bool(const char *v, enum km_tristate *ret, bool allow_auto)
{
	static const char *const yes[] = { "1", "yes", "true", "on" };
	static const char *const no[] = { "0", "no", "false", "off" };

	for (size_t i = 0; i < KM_ARRAY_SIZE(yes); i++) {
		if (strcasecmp(v, yes[i]) == 0) {
			*ret = KM_YES;
			return 0;
		}
		if (strcasecmp(v, no[i]) == 0) {
			*ret = KM_NO;
			return 0;
		}
	}
	if (allow_auto && strcasecmp(v, "auto") == 0) {
		*ret = KM_AUTO;
		return 0;
	}
	return -EINVAL;
}

static int parse_size(const char *v, uint64_t max, uint64_t *ret)
{
	char *end;
	unsigned long long n;

	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno || end == v || v[0] == '-')
		return -EINVAL;
	switch (*end) {
	case 'K': case 'k': n <<= 10; end++; break;
	case 'M': case 'm': n <<= 20; end++; break;
	case 'G': case 'g': n <<= 30; end++; break;
	default: break;
	}
	if (*end || n > max)
		return -EINVAL;
	*ret = n;
	return 0;
}

static int set_string(char *dst, size_t size, const char *v)
{
	if (strlen(v) >= size)
		return -ENAMETOOLONG;
	memcpy(dst, v, strlen(v) + 1);
	return 0;
}

int km_config_set(struct km_config *c, const char *key, const char *value, struct km_error *err)
{
	enum km_tristate t;
	uint64_t n;
	int r = 0;

	if (strcmp(key, "store") == 0) {
		r = value[0] == '/' ? set_string(c->store, sizeof(c->store), value) : -EINVAL;
	} else if (strcmp(key, "split") == 0) {
		r = parse_bool(value, &c->split, true);
	} else if (strcmp(key, "split_comm") == 0) {
		r = set_string(c->split_comm, sizeof(c->split_comm), value);
	} else if (strcmp(key, "add_chunks") == 0) {
		r = parse_bool(value, &t, false);
		c->add_chunks = t == KM_YES;
	} else if (strcmp(key, "split_engines") == 0) {
		r = parse_bool(value, &t, false);
		c->split_engines = t == KM_YES;
	} else if (strcmp(key, "late_weights") == 0) {
		r = parse_bool(value, &t, false);
		c->late_weights = t == KM_YES;
	} else if (strcmp(key, "split_follow") == 0) {
		r = parse_bool(value, &t, false);
		c->split_follow = t == KM_YES;
	} else if (strcmp(key, "sync") == 0) {
		r = parse_bool(value, &t, false);
		c->sync = t == KM_YES;
	} else if (strcmp(key, "leave_running") == 0) {
		r = parse_bool(value, &c->leave_running, true);
	} else if (strcmp(key, "min_split_size") == 0) {
		r = parse_size(value, UINT64_MAX >> 10, &c->min_split_size);
	} else if (strcmp(key, "chunk_min") == 0 || strcmp(key, "chunk_avg") == 0 ||
		   strcmp(key, "chunk_max") == 0) {
		r = parse_size(value, KM_CHUNK_MAX_LIMIT, &n);
		if (r == 0) {
			if (key[6] == 'm' && key[7] == 'i')
				c->chunker.min_size = (uint32_t)n;
			else if (key[6] == 'a')
				c->chunker.avg_size = (uint32_t)n;
			else
				c->chunker.max_size = (uint32_t)n;
		}
	} else if (strcmp(key, "delta_level") == 0) {
		r = parse_size(value, 22, &n);
		c->delta_level = (int)n;
	} else if (strcmp(key, "threads") == 0) {
		r = parse_size(value, 1024, &n);
		c->threads = (unsigned)n;
	} else if (strcmp(key, "lock_timeout_ms") == 0) {
		r = parse_size(value, UINT32_MAX, &n);
		c->lock_timeout_ms = (unsigned)n;
	} else if (strcmp(key, "quiesce_timeout_ms") == 0) {
		r = parse_size(value, UINT32_MAX, &n);
		c->quiesce_timeout_ms = (unsigned)n;
	} else if (strcmp(key, "weights_dir") == 0) {
		r = set_string(c->weights_dir, sizeof(c->weights_dir), value);
	} else if (strcmp(key, "gpu_map") == 0) {
		r = set_string(c->gpu_map, sizeof(c->gpu_map), value);
	} else if (strcmp(key, "libcuda") == 0) {
		r = set_string(c->libcuda, sizeof(c->libcuda), value);
	} else {
		km_error_set(err, "unknown setting '%s'", key);
		return -EINVAL;
	}
	if (r < 0) {
		km_error_set(err, "invalid value '%s' for %s", value, key);
		return -EINVAL;
	}
	return 0;
}

static char *strip(char *s)
{
	char *e;

	while (isspace((unsigned char)*s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = 0;
	return s;
}

static int load_file(struct km_config *c, const char *path, bool must_exist, struct km_error *err)
{
	_cleanup_fclose_ FILE *f = fopen(path, "re");
	char line[4352];
	unsigned lineno = 0;

	if (!f) {
		if (errno == ENOENT && !must_exist)
			return 0;
		km_error_set(err, "config %s: %s", path, strerror(errno));
		return -errno;
	}
	while (fgets(line, sizeof(line), f)) {
		char *key, *value, *eq, *hash;
		int r;

		lineno++;
		hash = strchr(line, '#');
		if (hash)
			*hash = 0;
		key = strip(line);
		if (!key[0])
			continue;
		eq = strchr(key, '=');
		if (!eq) {
			km_error_set(err, "config %s:%u: expected 'key = value'", path, lineno);
			return -EINVAL;
		}
		*eq = 0;
		value = strip(eq + 1);
		key = strip(key);
		r = km_config_set(c, key, value, err);
		if (r < 0) {
			km_error_prefix(err, "config %s:%u", path, lineno);
			return r;
		}
	}
	snprintf(c->source, sizeof(c->source), "%s", path);
	return 0;
}

int km_config_load(struct km_config *c, const char *path, struct km_error *err)
{
	static const struct {
		const char *env, *key;
	} vars[] = {
		{ "KVMOTION_STORE", "store" },
		{ "KVMOTION_SPLIT", "split" },
		{ "KVMOTION_SPLIT_COMM", "split_comm" },
		{ "KVMOTION_ADD_CHUNKS", "add_chunks" },
		{ "KVMOTION_SPLIT_ENGINES", "split_engines" },
		{ "KVMOTION_SPLIT_FOLLOW", "split_follow" },
		{ "KVMOTION_MIN_SPLIT_SIZE", "min_split_size" },
		{ "KVMOTION_CHUNK_MIN", "chunk_min" },
		{ "KVMOTION_CHUNK_AVG", "chunk_avg" },
		{ "KVMOTION_CHUNK_MAX", "chunk_max" },
		{ "KVMOTION_DELTA_LEVEL", "delta_level" },
		{ "KVMOTION_THREADS", "threads" },
		{ "KVMOTION_SYNC", "sync" },
		{ "KVMOTION_LATE_WEIGHTS", "late_weights" },
		{ "KVMOTION_GPU_MAP", "gpu_map" },
		{ "KVMOTION_LIBCUDA", "libcuda" },
		{ "KVMOTION_LOCK_TIMEOUT_MS", "lock_timeout_ms" },
		{ "KVMOTION_QUIESCE_TIMEOUT_MS", "quiesce_timeout_ms" },
		{ "KVMOTION_WEIGHTS_DIR", "weights_dir" },
		{ "KVMOTION_LEAVE_RUNNING", "leave_running" },
	};
	const char *env_path = getenv("KVMOTION_CONFIG");
	bool named = path || env_path;
	int r;

	r = load_file(c, path ? path : env_path ? env_path : KM_CONFIG_PATH, named, err);
	if (r < 0)
		return r;
	for (size_t i = 0; i < KM_ARRAY_SIZE(vars); i++) {
		const char *v = getenv(vars[i].env);

		if (!v)
			continue;
		r = km_config_set(c, vars[i].key, v, err);
		if (r < 0) {
			km_error_prefix(err, "$%s", vars[i].env);
			return r;
		}
		if (!strstr(c->source, "+env")) {
			size_t n = strlen(c->source);

			snprintf(c->source + n, sizeof(c->source) - n, "+env");
		}
	}
	if (km_chunker_params_check(&c->chunker) < 0) {
		km_error_set(err, "chunk sizes %u/%u/%u are invalid", c->chunker.min_size,
			     c->chunker.avg_size, c->chunker.max_size);
		return -EINVAL;
	}
	return 0;
}

bool km_config_wants_comm(const struct km_config *c, const char *comm)
{
	const char *p = c->split_comm;
	size_t n = strlen(comm);

	if (!p[0])
		return true;
	while (*p) {
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);

		if (len == n && strncmp(p, comm, n) == 0)
			return true;
		if (!end)
			break;
		p = end + 1;
	}
	return false;
}
