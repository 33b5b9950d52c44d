// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * pagefusion's hook front: the part of the libvirt qemu hook that runs on
 * every call.
 *
 * libvirtd waits for its hooks, and a Python process that imports the hook's
 * code costs about 100 ms, three times per domain start. The daemon already
 * has that code loaded, so this front hands it the call over a root-only
 * Unix socket and relays the answer. Whenever the daemon cannot take the call
 * (not running, frozen, gone in the middle), the front runs the Python hook
 * itself with the same argv and stdin, so the answer never depends on the
 * daemon being up.
 *
 *     hookfront PYTHON DOMAIN OPERATION SUB-OPERATION EXTRA < XML
 *
 * Protocol (stream socket, integers are native 32-bit unsigned):
 *   front  -> daemon: "PFH1", argc, then argc times (length, bytes),
 *                     then (length, bytes) of stdin
 *   daemon -> front:  'R' once it holds the whole call
 *   front  -> daemon: 'G' if the front still wants the answer; without it
 *                     the daemon drops the call, so a call never runs twice
 *   daemon -> front:  exit status, (length, bytes) for stdout and for stderr
 *
 * The race this protocol closes: a front that waited too long for 'R' runs
 * the call itself, and a daemon that then reads the call must not run it
 * too. Only after 'G' is the call the daemon's; from then on the front waits
 * for the answer, or, if the daemon dies first (the socket closes), runs the
 * call itself, as the daemon died with it.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CALL_MAGIC		"PFH1"
/* The daemon answers 'R' within this, or the front runs the hook itself. */
#define READY_TIMEOUT_MS	500
/* After 'G' the daemon may wait for the host lock (20 s) before answering. */
#define ANSWER_TIMEOUT_MS	60000
#define MAX_STDIN_BYTES		(64u << 20)
#define MAX_ANSWER_BYTES	(16u << 20)
#define BUFFER_STEP_BYTES	65536

struct buffer {
	char *data;
	size_t len;
	size_t cap;
};

static int buffer_reserve(struct buffer *b, size_t more)
{
	size_t cap = b->cap ? b->cap : BUFFER_STEP_BYTES;
	char *data;

	if (b->len + more <= b->cap)
		return 0;
	while (cap < b->len + more)
		cap *= 2;
	data = realloc(b->data, cap);
	if (!data)
		return -ENOMEM;
	b->data = data;
	b->cap = cap;
	return 0;
}

static int buffer_append(struct buffer *b, const void *data, size_t len)
{
	int err = buffer_reserve(b, len);

	if (err)
		return err;
	memcpy(b->data + b->len, data, len);
	b->len += len;
	return 0;
}

static int buffer_append_sized(struct buffer *b, const void *data, size_t len)
{
	uint32_t len32 = (uint32_t)len;
	int err = buffer_append(b, &len32, sizeof(len32));

	return err ? err : buffer_append(b, data, len);
}

static int read_stdin(struct buffer *b)
{
	ssize_t got;
	int err;

	for (;;) {
		err = buffer_reserve(b, BUFFER_STEP_BYTES);
		if (err)
			return err;
		got = read(STDIN_FILENO, b->data + b->len, b->cap - b->len);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return -errno;
		if (got == 0)
			return 0;
		b->len += (size_t)got;
		if (b->len > MAX_STDIN_BYTES)
			return -EFBIG;
	}
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events, or -ETIMEDOUT at the deadline. */
static int wait_for(int fd, short events, int64_t deadline_ms)
{
	struct pollfd p = { .fd = fd, .events = events };
	int64_t left_ms;
	int n;

	for (;;) {
		left_ms = deadline_ms - now_ms();
		if (left_ms <= 0)
			return -ETIMEDOUT;
		n = poll(&p, 1, (int)left_ms);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		return n ? 0 : -ETIMEDOUT;
	}
}

static int send_all(int fd, const char *data, size_t len, int64_t deadline_ms)
{
	ssize_t sent;
	int err;

	while (len > 0) {
		err = wait_for(fd, POLLOUT, deadline_ms);
		if (err)
			return err;
		sent = send(fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (sent < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (sent < 0)
			return -errno;
		data += sent;
		len -= (size_t)sent;
	}
	return 0;
}

/* Receive exactly len bytes; -ECONNRESET if the peer closes first. */
static int recv_all(int fd, void *into, size_t len, int64_t deadline_ms)
{
	char *at = into;
	ssize_t got;
	int err;

	while (len > 0) {
		err = wait_for(fd, POLLIN, deadline_ms);
		if (err)
			return err;
		got = recv(fd, at, len, MSG_DONTWAIT);
		if (got < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (got < 0)
			return -errno;
		if (got == 0)
			return -ECONNRESET;
		at += got;
		len -= (size_t)got;
	}
	return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
	ssize_t done;

	while (len > 0) {
		done = write(fd, data, len);
		if (done < 0 && errno == EINTR)
			continue;
		if (done < 0)
			return -errno;
		data += done;
		len -= (size_t)done;
	}
	return 0;
}

static void hook_socket_address(struct sockaddr_un *addr)
{
	const char *run_dir = getenv("PAGEFUSION_RUN_DIR");

	memset(addr, 0, sizeof(*addr));
	addr->sun_family = AF_UNIX;
	snprintf(addr->sun_path, sizeof(addr->sun_path), "%s/hook.sock",
		 run_dir && *run_dir ? run_dir : "/run/pagefusion");
}

/* Relay one answer part, (length, bytes), from the socket to fd. */
static int relay_part(int sock, int fd, int64_t deadline_ms)
{
	uint32_t len;
	char *data;
	int err;

	err = recv_all(sock, &len, sizeof(len), deadline_ms);
	if (err)
		return err;
	if (len > MAX_ANSWER_BYTES)
		return -EFBIG;
	data = malloc(len ? len : 1);
	if (!data)
		return -ENOMEM;
	err = recv_all(sock, data, len, deadline_ms);
	if (!err)
		err = write_all(fd, data, len);
	free(data);
	return err;
}

static int encode_call(struct buffer *request, int argc, char **argv,
		       const struct buffer *in)
{
	uint32_t argc32 = (uint32_t)argc;
	int err;

	err = buffer_append(request, CALL_MAGIC, 4);
	if (!err)
		err = buffer_append(request, &argc32, sizeof(argc32));
	for (int i = 0; !err && i < argc; i++)
		err = buffer_append_sized(request, argv[i], strlen(argv[i]));
	if (!err)
		err = buffer_append_sized(request, in->data, in->len);
	return err;
}

/* Send the call and hand it over: 0 once the daemon holds it and has 'G'. */
static int hand_over(int sock, const struct buffer *request,
		     int64_t deadline_ms)
{
	char ready = 0;
	int err;

	err = send_all(sock, request->data, request->len, deadline_ms);
	if (!err)
		err = recv_all(sock, &ready, 1, deadline_ms);
	if (!err && ready != 'R')
		err = -EPROTO;
	if (!err)
		err = send_all(sock, "G", 1, deadline_ms);
	return err;
}

enum outcome {
	/* The daemon never took the call: the front must run it. */
	NOT_TAKEN,
	ANSWERED,
	/* The daemon took it, then went away before answering; it died with
	 * the call, so running it again is safe. */
	LOST,
	/* The daemon took it and still works on it: running it again beside
	 * the daemon is not safe. */
	TIMED_OUT,
};

static enum outcome ask_daemon(int argc, char **argv, const struct buffer *in,
			       int *status)
{
	int64_t deadline_ms = now_ms() + READY_TIMEOUT_MS;
	enum outcome outcome = NOT_TAKEN;
	struct buffer request = { 0 };
	struct sockaddr_un addr;
	uint32_t code;
	int sock, err;

	hook_socket_address(&addr);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (sock < 0)
		return NOT_TAKEN;
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0 &&
	    (errno != EINPROGRESS || wait_for(sock, POLLOUT, deadline_ms)))
		goto close_socket;
	if (encode_call(&request, argc, argv, in) ||
	    hand_over(sock, &request, deadline_ms))
		goto free_request;

	deadline_ms = now_ms() + ANSWER_TIMEOUT_MS;
	err = recv_all(sock, &code, sizeof(code), deadline_ms);
	if (err) {
		outcome = err == -ETIMEDOUT ? TIMED_OUT : LOST;
		goto free_request;
	}
	/* The status is what counts; a part cut short loses only its text. */
	if (!relay_part(sock, STDOUT_FILENO, deadline_ms))
		relay_part(sock, STDERR_FILENO, deadline_ms);
	*status = (int)code;
	outcome = ANSWERED;

free_request:
	free(request.data);
close_socket:
	close(sock);
	return outcome;
}

/* Run the Python hook with the same argv and the stdin already read. */
static int run_python(const char *python, int argc, char **argv,
		      const struct buffer *in)
{
	char **args;
	int fd, n = 0;

	fd = memfd_create("pagefusion-hook-stdin", MFD_CLOEXEC);
	if (fd < 0 || write_all(fd, in->data ? in->data : "", in->len) ||
	    lseek(fd, 0, SEEK_SET) < 0 || dup2(fd, STDIN_FILENO) < 0) {
		fprintf(stderr, "pagefusion: hook front cannot pass the domain XML on: %s\n",
			strerror(errno));
		return 1;
	}
	close(fd);

	args = calloc((size_t)argc + 5, sizeof(*args));
	if (!args)
		return 1;
	args[n++] = (char *)python;
	args[n++] = "-I";
	args[n++] = "-m";
	args[n++] = "pagefusion.hook";
	for (int i = 0; i < argc; i++)
		args[n++] = argv[i];
	execv(python, args);
	fprintf(stderr, "pagefusion: hook front cannot run %s: %s\n", python,
		strerror(errno));
	return 1;
}

/* Only prepare, migrate and restore may stop libvirt by failing. */
static int may_refuse(int argc, char **argv)
{
	return argc > 1 && (strcmp(argv[1], "prepare") == 0 ||
			    strcmp(argv[1], "migrate") == 0 ||
			    strcmp(argv[1], "restore") == 0);
}

int main(int argc, char **argv)
{
	struct buffer in = { 0 };
	const char *python;
	char **call_argv;
	int call_argc, status = 0, err;

	if (argc < 2) {
		fprintf(stderr, "usage: %s PYTHON HOOK-ARGUMENTS... < DOMAIN-XML\n",
			argv[0]);
		return 2;
	}
	python = argv[1];
	call_argc = argc - 2;
	call_argv = argv + 2;

	err = read_stdin(&in);
	if (err) {
		fprintf(stderr, "pagefusion: hook front cannot read the domain XML: %s\n",
			strerror(-err));
		return 1;
	}

	switch (ask_daemon(call_argc, call_argv, &in, &status)) {
	case ANSWERED:
		return status;
	case TIMED_OUT:
		fprintf(stderr, "pagefusion: the daemon took the %s call but did not answer within %d s\n",
			call_argc > 1 ? call_argv[1] : "hook",
			ANSWER_TIMEOUT_MS / 1000);
		return may_refuse(call_argc, call_argv);
	default:
		return run_python(python, call_argc, call_argv, &in);
	}
}
