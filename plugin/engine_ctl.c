/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The plugin's side of the engine control protocol (docs/formats.md,
 * "Engine control"). One exchange is one connection: connect, one request,
 * one reply; a QUIESCE adds the plugin's COMMIT and waits until the engine
 * has closed its end, so that no connection to the plugin is left in the
 * process CRIU is about to dump.
 *
 * The socket is abstract, so it lives in the engine's network namespace.
 * When that is not ours the exchange runs in a forked child that setns()s
 * into it and hands the raw reply back over a pipe: the plugin runs inside
 * CRIU, whose own namespace must not change. The child makes system calls
 * only (the request is encoded before the fork, the reply decoded after).
 */
#include "engine_ctl.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>

#include "engine.pb-c.h"
#include "format_internal.h"

/* How long the engine may take to close after the COMMIT, at least. */
#define COMMIT_CLOSE_GRACE_MS 2000
/* Extra time the parent gives a namespace child beyond the exchange's. */
#define CHILD_GRACE_MS 1000

int km_engine_socket_addr(pid_t nspid, struct sockaddr_un *ret, unsigned *ret_len)
{
	int n;

	if (nspid <= 0)
		return -EINVAL;
	memset(ret, 0, sizeof(*ret));
	ret->sun_family = AF_UNIX;
	n = snprintf(ret->sun_path + 1, sizeof(ret->sun_path) - 1, KM_ENGINE_SOCKET_PREFIX "%d",
		     (int)nspid);
	if (n < 0 || (size_t)n >= sizeof(ret->sun_path) - 1)
		return -ENAMETOOLONG;
	*ret_len = (unsigned)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
	return 0;
}

void km_engine_quiesced_clear(struct km_engine_quiesced *q)
{
	if (!q)
		return;
	free(q->weights);
	memset(q, 0, sizeof(*q));
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- where the engine's socket is --- */

/* The pid's own pid in its innermost pid namespace: last field of NSpid. */
static int engine_nspid(pid_t pid, pid_t *ret)
{
	char path[64], line[256];
	_cleanup_fclose_ FILE *f = NULL;
	long v = -1;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return errno == ENOENT ? -ESRCH : -errno;
	while (fgets(line, sizeof(line), f)) {
		char *p = line + 6, *end;

		if (strncmp(line, "NSpid:", 6) != 0)
			continue;
		/* A kernel without NSpid (< 4.1) has no nested pid namespaces to name. */
		for (;;) {
			long x = strtol(p, &end, 10);

			if (end == p)
				break;
			v = x;
			p = end;
		}
		break;
	}
	*ret = v > 0 ? (pid_t)v : pid;
	return 0;
}

/* An fd of pid's network namespace if it is not ours (*ret = -1 if it is). */
static int foreign_netns(pid_t pid, int *ret)
{
	char path[64];
	struct stat theirs, ours;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/ns/net", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	if (fstat(fd, &theirs) < 0 || stat("/proc/self/ns/net", &ours) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	if (theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino) {
		close(fd);
		fd = -1;
	}
	*ret = fd;
	return 0;
}

/* --- one exchange: system calls only, it may run in a forked child --- */

enum exch_stage {
	EXCH_DONE = 0,
	EXCH_SETNS,
	EXCH_SOCKET,
	EXCH_CONNECT,
	EXCH_SEND,
	EXCH_REPLY,  /* waiting for or reading the reply */
	EXCH_COMMIT, /* sending COMMIT */
	EXCH_CLOSE,  /* waiting for the engine to close */
};

/* What an exchange produced; the child writes it, then the reply's bytes. */
struct exch_out {
	int32_t r;
	uint32_t stage;
	uint32_t reply_len;
	uint32_t pad;
};

struct exch {
	struct sockaddr_un addr;
	unsigned addr_len;
	const void *req; /* NULL: only connect (probe) */
	size_t req_len;
	const void *commit; /* sent after the reply, then wait for the close */
	size_t commit_len;
	bool no_reply; /* only send: the engine's task cannot run now */
	uint64_t deadline; /* CLOCK_MONOTONIC ns */
	uint8_t *reply;	   /* KM_ENGINE_MSG_MAX + 1 bytes */
	struct exch_out out;
};

/* Polls fd for events until deadline: 0, or -ETIMEDOUT / -errno. */
static int wait_fd(int fd, short events, uint64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		uint64_t now = now_ns();
		int ms, k;

		if (now >= deadline)
			return -ETIMEDOUT;
		ms = (int)KM_MIN((deadline - now + 999999) / 1000000, (uint64_t)INT32_MAX);
		k = poll(&p, 1, ms);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (k > 0)
			return 0;
	}
}

static void exch_fail(struct exch *x, enum exch_stage stage, int r)
{
	x->out.stage = stage;
	x->out.r = r;
}

#define EXCH_FAIL(x, stage, r)                 \
	do {                                   \
		exch_fail((x), (stage), (r));  \
		return;                        \
	} while (0)

static void exch_run(struct exch *x)
{
	_cleanup_close_ int fd = -1;
	ssize_t n;
	int r;

	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		EXCH_FAIL(x, EXCH_SOCKET, -errno);
	/* A full backlog (the engine serves one connection at a time) is EAGAIN. */
	while (connect(fd, (struct sockaddr *)&x->addr, x->addr_len) < 0) {
		struct timespec ts = { 0, 5 * 1000000 };

		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			EXCH_FAIL(x, EXCH_CONNECT, errno == ENOENT ? -ECONNREFUSED : -errno);
		if (now_ns() >= x->deadline)
			EXCH_FAIL(x, EXCH_CONNECT, -ETIMEDOUT);
		nanosleep(&ts, NULL);
	}
	if (!x->req)
		EXCH_FAIL(x, EXCH_DONE, 0);

	for (;;) {
		if (send(fd, x->req, x->req_len, MSG_NOSIGNAL) >= 0)
			break;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			EXCH_FAIL(x, EXCH_SEND, -errno);
		r = wait_fd(fd, POLLOUT, x->deadline);
		if (r < 0)
			EXCH_FAIL(x, EXCH_SEND, r);
	}
	if (x->no_reply)
		EXCH_FAIL(x, EXCH_DONE, 0);

	/* Closing fd on any failure from here on is what cancels a quiesce. */
	for (;;) {
		r = wait_fd(fd, POLLIN, x->deadline);
		if (r < 0)
			EXCH_FAIL(x, EXCH_REPLY, r);
		n = recv(fd, x->reply, KM_ENGINE_MSG_MAX + 1, MSG_TRUNC | MSG_DONTWAIT);
		if (n >= 0)
			break;
		if (errno != EINTR && errno != EAGAIN)
			EXCH_FAIL(x, EXCH_REPLY, -errno);
	}
	if (n == 0)
		EXCH_FAIL(x, EXCH_REPLY, -ECONNRESET);
	if (n > (ssize_t)KM_ENGINE_MSG_MAX)
		EXCH_FAIL(x, EXCH_REPLY, -EMSGSIZE);
	x->out.reply_len = (uint32_t)n;
	if (!x->commit)
		EXCH_FAIL(x, EXCH_DONE, 0);

	/*
	 * The answer is read: commit. Then wait for the engine to close its
	 * end, however late the answer came (the engine knows it was read).
	 */
	for (;;) {
		if (send(fd, x->commit, x->commit_len, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
			break;
		if (errno != EINTR)
			EXCH_FAIL(x, EXCH_COMMIT, -errno);
	}
	{
		uint64_t close_by = KM_MAX(x->deadline,
					   now_ns() + (uint64_t)COMMIT_CLOSE_GRACE_MS * 1000000);
		uint8_t b;

		for (;;) {
			r = wait_fd(fd, POLLIN, close_by);
			if (r < 0)
				EXCH_FAIL(x, EXCH_CLOSE, r);
			n = recv(fd, &b, 1, MSG_DONTWAIT);
			if (n == 0)
				break;
			if (n > 0)
				EXCH_FAIL(x, EXCH_CLOSE, -EPROTO);
			if (errno == ECONNRESET)
				break;
			if (errno != EINTR && errno != EAGAIN)
				EXCH_FAIL(x, EXCH_CLOSE, -errno);
		}
	}
	exch_fail(x, EXCH_DONE, 0);
}

/* Runs x in a child inside the network namespace netns_fd. */
static int exch_in_netns(struct exch *x, int netns_fd)
{
	_cleanup_close_ int rd = -1;
	int p[2], status;
	uint64_t until;
	pid_t child;
	ssize_t k;
	int r;

	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	child = fork();
	if (child < 0) {
		r = -errno;
		close(p[0]);
		close(p[1]);
		return r;
	}
	if (child == 0) {
		close(p[0]);
		if (setns(netns_fd, CLONE_NEWNET) < 0)
			exch_fail(x, EXCH_SETNS, -errno);
		else
			exch_run(x);
		if (km_write_full(p[1], &x->out, sizeof(x->out)) < 0 ||
		    km_write_full(p[1], x->reply, x->out.reply_len) < 0)
			_exit(1);
		_exit(0);
	}
	close(p[1]);
	rd = p[0];

	/* The child's own deadlines end it first; this only guards a stuck one. */
	until = x->deadline + (uint64_t)(COMMIT_CLOSE_GRACE_MS + CHILD_GRACE_MS) * 1000000;
	r = wait_fd(rd, POLLIN, until);
	if (r == 0) {
		k = km_read_full(rd, &x->out, sizeof(x->out));
		if (k != (ssize_t)sizeof(x->out)) {
			r = k < 0 ? (int)k : -EPIPE;
		} else if (x->out.reply_len > KM_ENGINE_MSG_MAX) {
			r = -EPROTO;
		} else if (x->out.reply_len) {
			k = km_read_full(rd, x->reply, x->out.reply_len);
			if (k != (ssize_t)x->out.reply_len)
				r = k < 0 ? (int)k : -EPIPE;
		}
	}
	if (r < 0) {
		/* Killing it closes its socket: a quiesce in flight is cancelled. */
		kill(child, SIGKILL);
		exch_fail(x, EXCH_REPLY, r);
	}
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	return 0;
}

/*
 * Runs one exchange with pid's engine. Returns 0 with x->out filled in
 * (x->out.r says how the exchange went), or <0 when it could not be tried
 * (no such process, no namespace), err saying so.
 */
static int exchange(pid_t pid, pid_t *ret_nspid, struct exch *x, struct km_error *err)
{
	_cleanup_close_ int netns = -1;
	pid_t nspid;
	int r;

	r = engine_nspid(pid, &nspid);
	if (r == 0)
		r = foreign_netns(pid, &netns);
	if (r < 0) {
		km_error_set(err, r == -ESRCH ? "no process %d" : "process %d: %s", (int)pid,
			     strerror(-r));
		return r;
	}
	r = km_engine_socket_addr(nspid, &x->addr, &x->addr_len);
	if (r < 0) {
		km_error_set(err, "process %d: no socket name for pid %d", (int)pid, (int)nspid);
		return r;
	}
	memset(&x->out, 0, sizeof(x->out));
	if (netns < 0) {
		exch_run(x);
	} else {
		r = exch_in_netns(x, netns);
		if (r < 0) {
			km_error_set(err, "engine in pid %d: cannot start a helper in its network namespace: %s",
				     (int)pid, strerror(-r));
			return r;
		}
	}
	*ret_nspid = nspid;
	return 0;
}

int km_engine_probe(pid_t pid)
{
	struct exch x = { .deadline = now_ns() + 1000u * 1000000 };
	uint8_t buf[1];
	pid_t nspid;
	int r;

	x.reply = buf; /* never written: no request */
	r = exchange(pid, &nspid, &x, NULL);
	if (r < 0)
		return r;
	if (x.out.r == 0)
		return 1;
	if (x.out.stage == EXCH_CONNECT && x.out.r == -ECONNREFUSED)
		return 0;
	/* A full backlog: something listens there. */
	if (x.out.stage == EXCH_CONNECT && x.out.r == -ETIMEDOUT)
		return 1;
	return x.out.r;
}

/* --- requests and replies --- */

static const char *op_name(Kvmotion__EngineOp op)
{
	switch (op) {
	case KVMOTION__ENGINE_OP__ENGINE_QUIESCE: return "quiesce";
	case KVMOTION__ENGINE_OP__ENGINE_RESUME: return "resume";
	case KVMOTION__ENGINE_OP__ENGINE_STATUS: return "status request";
	default: return "request";
	}
}

static int encode_request(Kvmotion__EngineOp op, uint32_t timeout_ms, bool restored,
			  uint8_t *buf, size_t bufsize, size_t *ret_len)
{
	Kvmotion__EngineRequest req = KVMOTION__ENGINE_REQUEST__INIT;

	req.major = KM_ENGINE_PROTO_MAJOR;
	req.minor = KM_ENGINE_PROTO_MINOR;
	req.op = op;
	if (op == KVMOTION__ENGINE_OP__ENGINE_QUIESCE) {
		req.has_timeout_ms = 1;
		req.timeout_ms = timeout_ms;
	}
	if (op == KVMOTION__ENGINE_OP__ENGINE_RESUME) {
		req.has_restored = 1;
		req.restored = restored;
	}
	if (kvmotion__engine_request__get_packed_size(&req) > bufsize)
		return -E2BIG;
	*ret_len = kvmotion__engine_request__pack(&req, buf);
	return 0;
}

/* Validates and copies pb weights (what: for messages). */
static int weights_from_pb(Kvmotion__EngineWeights *const *pbs, size_t n, const char *what,
			   struct km_engine_weights **ret, struct km_error *err)
{
	struct km_engine_weights *w = calloc(n ? n : 1, sizeof(*w));

	if (!w)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		const Kvmotion__EngineWeights *p = pbs[i];
		size_t len = p->path ? strlen(p->path) : 0;

		if (len == 0 || len >= sizeof(w[i].path) || p->path[0] != '/' ||
		    p->sha256.len != KM_HASH_SIZE) {
			km_error_set(err, "%s: weights entry %zu is malformed", what, i);
			free(w);
			return -EBADMSG;
		}
		memcpy(w[i].path, p->path, len + 1);
		memcpy(w[i].id.b, p->sha256.data, KM_HASH_SIZE);
		w[i].size = p->size;
	}
	*ret = w;
	return 0;
}

/*
 * Turns the outcome of an exchange into 0 and a decoded reply, or an error
 * naming pid and what happened. *ret_reply must be freed by the caller.
 */
static int exchange_result(pid_t pid, pid_t nspid, Kvmotion__EngineOp op, uint32_t timeout_ms,
			   const struct exch *x, Kvmotion__EngineReply **ret_reply,
			   struct km_error *err)
{
	Kvmotion__EngineReply *rep = NULL;
	const char *what = op_name(op);
	int r = x->out.r;

	switch (x->out.r == 0 ? EXCH_DONE : (enum exch_stage)x->out.stage) {
	case EXCH_DONE:
	case EXCH_COMMIT:
		break;
	case EXCH_SETNS:
		km_error_set(err, "engine in pid %d: cannot enter its network namespace: %s",
			     (int)pid, strerror(-r));
		return r;
	case EXCH_CONNECT:
		if (r == -ECONNREFUSED) {
			km_error_set(err, "no cooperative engine in pid %d (nothing listens on @%s%d)",
				     (int)pid, KM_ENGINE_SOCKET_PREFIX, (int)nspid);
			return -ENOENT;
		}
		if (r == -ETIMEDOUT)
			km_error_set(err, "engine in pid %d did not accept the %s within %u ms",
				     (int)pid, what, timeout_ms);
		else
			km_error_set(err, "engine in pid %d: cannot connect: %s", (int)pid,
				     strerror(-r));
		return r;
	case EXCH_REPLY:
		if (r == -ETIMEDOUT)
			km_error_set(err, "engine in pid %d did not answer the %s within %u ms",
				     (int)pid, what, timeout_ms);
		else if (r == -ECONNRESET)
			km_error_set(err, "engine in pid %d closed the connection without answering the %s",
				     (int)pid, what);
		else if (r == -EMSGSIZE)
			km_error_set(err, "engine in pid %d answered the %s with more than %u bytes",
				     (int)pid, what, KM_ENGINE_MSG_MAX);
		else
			km_error_set(err, "engine in pid %d: no answer to the %s: %s", (int)pid, what,
				     strerror(-r));
		return r;
	case EXCH_CLOSE:
		km_error_set(err, "engine in pid %d did not close its control connection after the %s: %s",
			     (int)pid, what, strerror(-r));
		return r;
	default:
		km_error_set(err, "engine in pid %d: cannot send the %s: %s", (int)pid, what,
			     strerror(-r));
		return r;
	}

	rep = kvmotion__engine_reply__unpack(NULL, x->out.reply_len, x->reply);
	if (!rep) {
		km_error_set(err, "engine in pid %d answered the %s with a malformed message", (int)pid,
			     what);
		return -EPROTO;
	}
	if (rep->major != KM_ENGINE_PROTO_MAJOR) {
		km_error_set(err, "engine in pid %d speaks engine protocol %u.%u; this kvmotion speaks major version %u only",
			     (int)pid, rep->major, rep->minor, KM_ENGINE_PROTO_MAJOR);
		r = -EPROTONOSUPPORT;
		goto fail;
	}
	if (rep->op != op || rep->engine_pid != (int32_t)nspid) {
		km_error_set(err, "engine in pid %d: the answer is for another %s (op %d, pid %d)",
			     (int)pid, rep->op != op ? "request" : "process", (int)rep->op,
			     (int)rep->engine_pid);
		r = -EPROTO;
		goto fail;
	}
	if (!rep->ok) {
		int e = rep->has_error && rep->error > 0 && rep->error < 4096 ? rep->error : EIO;

		km_error_set(err, "engine in pid %d %s the %s: %s", (int)pid,
			     op == KVMOTION__ENGINE_OP__ENGINE_QUIESCE ? "refused" : "failed",
			     what, rep->message && rep->message[0] ? rep->message : strerror(e));
		r = -e;
		goto fail;
	}
	if (x->out.r < 0) {
		/* Only an ok quiesce gets here: its COMMIT could not be sent. */
		km_error_set(err, "engine in pid %d gave up the quiesce before it was committed: %s",
			     (int)pid, strerror(-x->out.r));
		r = x->out.r;
		goto fail;
	}
	*ret_reply = rep;
	return 0;
fail:
	kvmotion__engine_reply__free_unpacked(rep, NULL);
	return r;
}

/* One request/reply with pid's engine; *ret_reply is unpacked (free it). */
static int request(pid_t pid, Kvmotion__EngineOp op, uint32_t timeout_ms, bool restored,
		   Kvmotion__EngineReply **ret_reply, struct km_error *err)
{
	_cleanup_free_ uint8_t *reply = malloc(KM_ENGINE_MSG_MAX + 1);
	uint8_t req[64], commit[64];
	struct exch x = { .req = req, .commit = NULL };
	pid_t nspid;
	int r;

	if (!reply)
		return -ENOMEM;
	r = encode_request(op, timeout_ms, restored, req, sizeof(req), &x.req_len);
	if (r == 0 && op == KVMOTION__ENGINE_OP__ENGINE_QUIESCE) {
		r = encode_request(KVMOTION__ENGINE_OP__ENGINE_COMMIT, 0, false, commit,
				   sizeof(commit), &x.commit_len);
		x.commit = commit;
	}
	if (r < 0)
		return r;
	x.reply = reply;
	x.deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
	r = exchange(pid, &nspid, &x, err);
	if (r < 0)
		return r;
	return exchange_result(pid, nspid, op, timeout_ms, &x, ret_reply, err);
}

int km_engine_quiesce(pid_t pid, uint32_t timeout_ms, struct km_engine_quiesced *ret,
		      struct km_error *err)
{
	Kvmotion__EngineReply *rep = NULL;
	struct km_engine_quiesced q = { 0 };
	char what[64];
	int r;

	r = request(pid, KVMOTION__ENGINE_OP__ENGINE_QUIESCE, timeout_ms, false, &rep, err);
	if (r < 0)
		return r;
	snprintf(what, sizeof(what), "engine in pid %d", (int)pid);
	r = weights_from_pb(rep->weights, rep->n_weights, what, &q.weights, err);
	if (r == 0) {
		q.n_weights = rep->n_weights;
		q.free_blocks = rep->free_blocks;
		q.released_bytes = rep->released_bytes;
		*ret = q;
	}
	kvmotion__engine_reply__free_unpacked(rep, NULL);
	/*
	 * The engine is quiesced and committed even if its list was bad: the
	 * caller fails the dump and resumes it, as after any later failure.
	 */
	return r;
}

int km_engine_resume(pid_t pid, bool restored, uint32_t timeout_ms, struct km_error *err)
{
	Kvmotion__EngineReply *rep = NULL;
	int r;

	r = request(pid, KVMOTION__ENGINE_OP__ENGINE_RESUME, timeout_ms, restored, &rep, err);
	if (r < 0)
		return r;
	kvmotion__engine_reply__free_unpacked(rep, NULL);
	return 0;
}

int km_engine_resume_queued(pid_t pid, bool restored, struct km_error *err)
{
	uint8_t req[64], none[1];
	struct exch x = { .req = req, .no_reply = true, .reply = none };
	pid_t nspid;
	int r;

	r = encode_request(KVMOTION__ENGINE_OP__ENGINE_RESUME, 0, restored, req, sizeof(req),
			   &x.req_len);
	if (r < 0)
		return r;
	/* connect and send only wait for a full backlog: one second is plenty */
	x.deadline = now_ns() + 1000u * 1000000;
	r = exchange(pid, &nspid, &x, err);
	if (r < 0)
		return r;
	if (x.out.r < 0) {
		km_error_set(err, "engine in pid %d: cannot queue the resume request: %s", (int)pid,
			     strerror(-x.out.r));
		return x.out.r;
	}
	return 0;
}

int km_engine_status(pid_t pid, uint32_t timeout_ms, struct km_engine_status *ret,
		     struct km_error *err)
{
	Kvmotion__EngineReply *rep = NULL;
	struct km_engine_status st = { 0 };
	int r;

	r = request(pid, KVMOTION__ENGINE_OP__ENGINE_STATUS, timeout_ms, false, &rep, err);
	if (r < 0)
		return r;
	st.quiesced = rep->state == KVMOTION__ENGINE_STATE__ENGINE_QUIESCED;
	st.engine_pid = rep->engine_pid;
	if (rep->stats) {
		st.quiesces = rep->stats->quiesces;
		st.resumes = rep->stats->resumes;
		st.cancelled = rep->stats->cancelled;
		st.refused = rep->stats->refused;
		st.self_resumes = rep->stats->self_resumes;
		st.last_released_bytes = rep->stats->last_released_bytes;
		st.last_free_blocks = rep->stats->last_free_blocks;
		st.restored = rep->stats->restored;
	}
	kvmotion__engine_reply__free_unpacked(rep, NULL);
	*ret = st;
	return 0;
}

/* --- DIR/kvmotion.engines --- */

int km_engine_records_write(int dirfd, const struct km_engine_record *r, size_t n, bool sync)
{
	Kvmotion__EngineRecords pb = KVMOTION__ENGINE_RECORDS__INIT;
	_cleanup_free_ Kvmotion__EngineRecord *recs = NULL;
	_cleanup_free_ Kvmotion__EngineRecord **rec_ptrs = NULL;
	_cleanup_free_ Kvmotion__EngineWeights *ws = NULL;
	_cleanup_free_ Kvmotion__EngineWeights **w_ptrs = NULL;
	_cleanup_free_ void *buf = NULL;
	size_t total = 0, k = 0, size;
	int ret;

	for (size_t i = 0; i < n; i++)
		total += r[i].n_weights;
	recs = calloc(n ? n : 1, sizeof(*recs));
	rec_ptrs = calloc(n ? n : 1, sizeof(*rec_ptrs));
	ws = calloc(total ? total : 1, sizeof(*ws));
	w_ptrs = calloc(total ? total : 1, sizeof(*w_ptrs));
	if (!recs || !rec_ptrs || !ws || !w_ptrs)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (r[i].pid <= 0)
			return -EINVAL;
		kvmotion__engine_record__init(&recs[i]);
		recs[i].pid = r[i].pid;
		recs[i].n_weights = r[i].n_weights;
		recs[i].weights = &w_ptrs[k];
		for (size_t j = 0; j < r[i].n_weights; j++, k++) {
			kvmotion__engine_weights__init(&ws[k]);
			ws[k].path = (char *)r[i].weights[j].path;
			ws[k].sha256.len = KM_HASH_SIZE;
			ws[k].sha256.data = (uint8_t *)r[i].weights[j].id.b;
			ws[k].size = r[i].weights[j].size;
			w_ptrs[k] = &ws[k];
		}
		rec_ptrs[i] = &recs[i];
	}
	pb.major = KM_ENGINE_PROTO_MAJOR;
	pb.minor = KM_ENGINE_PROTO_MINOR;
	pb.n_engines = n;
	pb.engines = rec_ptrs;
	ret = km_record_encode(KM_MAGIC_ENGINES, &pb.base, &buf, &size);
	if (ret < 0)
		return ret;
	return km_write_file_atomic_at(dirfd, KM_ENGINES_NAME, buf, size, sync);
}

void km_engine_records_free(struct km_engine_record *r, size_t n)
{
	if (!r)
		return;
	for (size_t i = 0; i < n; i++)
		free(r[i].weights);
	free(r);
}

int km_engine_records_read(int dirfd, struct km_engine_record **ret, size_t *ret_n,
			   struct km_error *err)
{
	static const char what[] = KM_ENGINES_NAME;
	_cleanup_free_ void *buf = NULL;
	Kvmotion__EngineRecords *pb = NULL;
	struct km_engine_record *recs = NULL;
	const uint8_t *rec;
	size_t n, len;
	int r;

	r = km_read_file_at(dirfd, KM_ENGINES_NAME, KM_RECORD_MAX + KM_MAGIC_SIZE + 4, &buf, &n);
	if (r < 0) {
		if (r != -ENOENT)
			km_error_set(err, "cannot read %s: %s", what, strerror(-r));
		return r == -EFBIG ? -EBADMSG : r;
	}
	r = km_record_locate(buf, n, KM_MAGIC_ENGINES, "engines file " KM_ENGINES_NAME, &rec,
			     &len, err);
	if (r < 0)
		return r;
	pb = kvmotion__engine_records__unpack(NULL, len, rec);
	if (!pb) {
		km_error_set(err, "%s is malformed (not an EngineRecords message)", what);
		return -EBADMSG;
	}
	if (pb->major != KM_ENGINE_PROTO_MAJOR) {
		km_error_set(err, "%s has format version %u.%u; this kvmotion reads major version %u only",
			     what, pb->major, pb->minor, KM_ENGINE_PROTO_MAJOR);
		r = -EPROTONOSUPPORT;
		goto out;
	}
	recs = calloc(pb->n_engines ? pb->n_engines : 1, sizeof(*recs));
	if (!recs) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < pb->n_engines; i++) {
		const Kvmotion__EngineRecord *e = pb->engines[i];

		if (e->pid <= 0) {
			km_error_set(err, "%s: engine %zu has pid %d", what, i, (int)e->pid);
			r = -EBADMSG;
			goto out;
		}
		for (size_t j = 0; j < i; j++)
			if (recs[j].pid == e->pid) {
				km_error_set(err, "%s: pid %d listed twice", what, (int)e->pid);
				r = -EBADMSG;
				goto out;
			}
		recs[i].pid = e->pid;
		r = weights_from_pb(e->weights, e->n_weights, what, &recs[i].weights, err);
		if (r < 0)
			goto out;
		recs[i].n_weights = e->n_weights;
	}
	*ret = KM_TAKE_PTR(recs);
	*ret_n = pb->n_engines;
	r = 0;
out:
	if (recs)
		km_engine_records_free(recs, pb->n_engines);
	kvmotion__engine_records__free_unpacked(pb, NULL);
	return r;
}
