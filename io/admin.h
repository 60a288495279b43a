/* io/admin.h - the admin HTTP listener (/metrics, /healthz, /readyz).
 *
 * libmicrohttpd serves it from its own internal thread (its epoll/poll
 * mode): nothing here touches the shards' engines, and the shards never
 * wait for it. Requests:
 *
 *   GET /metrics  200, Content-Type "text/plain; version=0.0.4", the body
 *                 the render callback produced; 500 if it failed; 404 when
 *                 no render callback was given.
 *   GET /healthz  200 "ok\n" (the process is up and serving).
 *   GET /readyz   200 "ready\n" when the ready callback returns true (or
 *                 there is none), else 503 "not ready\n".
 *   other paths   404 "not found\n".
 *   other methods 405 with "Allow: GET, HEAD". HEAD is GET without a body.
 * The query string is ignored.
 *
 * Connection limits (so that idle or trickling clients cannot keep a
 * liveness probe out; io/admin.c has the why of each): at most 64
 * connections, at most 8 from one IP address (the excess is accepted and
 * closed at once), and every connection is closed 2.5 s after its accept
 * (idle or not, request finished or not; keep-alive clients reconnect;
 * libmicrohttpd's 3 s idle timeout is the backstop). A probe from an
 * address under its share is answered at once; one that finds every slot
 * taken waits at most about 2.5 s. Refused and cut connections are
 * reported through admin_cb.dropped.
 *
 * Threads: the callbacks run on libmicrohttpd's thread, concurrently with
 * the shards, so they may only read state that is safe to read from
 * another thread (metrics_render() is; a ready flag read with an atomic
 * load is). They never run after admin_stop() has returned, and never
 * two at a time. A second thread of ours (the reaper) enforces the
 * per-connection deadline; it calls nothing of the caller's.
 *
 * Exposure: admin_start() binds whatever address it is given. Refusing a
 * non-loopback address (unless the operator allowed it) is the caller's
 * policy, with admin_addr_is_loopback(). libmicrohttpd's own error
 * messages go to core/log at warn level.
 */
#ifndef IO_ADMIN_H
#define IO_ADMIN_H

#include <stdbool.h>
#include <stddef.h>

#include "core/addr.h"

/* Why the admin listener dropped a connection (admin_cb.dropped). */
enum admin_drop {
    ADMIN_DROP_LIMIT = 1,     /* refused at accept: all slots, or the IP's share, taken */
    ADMIN_DROP_DEADLINE = 2,  /* still open at its deadline (idle, slow or stuck client) */
};

struct admin_cb {
    /* Fill *out with a heap buffer (malloc; admin frees it) of *len bytes:
     * 0 on success, anything else fails the request with 500. NULL: no
     * /metrics. metrics_render() wrapped with its struct metrics as ctx. */
    int (*render)(void *ctx, char **out, size_t *len);
    /* Readiness for /readyz; NULL means always ready. */
    bool (*ready)(void *ctx);
    /* One connection dropped (for a counter: calls never overlap); NULL:
     * not reported. */
    void (*dropped)(void *ctx, enum admin_drop why);
    void *ctx;
};

struct admin;

/* Listen on `listen` (AF_INET or AF_INET6; port 0 picks a free port, see
 * admin_port()) and serve from a new thread. cb is copied. Returns the
 * listener, or NULL with a message naming the address and the cause in
 * err (errlen bytes, may be 0). */
struct admin *admin_start(const struct net_addr *listen, const struct admin_cb *cb,
                          char *err, size_t errlen);

/* Stop serving: closes the socket and every connection, waits for the
 * thread (a callback in progress finishes first), frees a. NULL is a
 * no-op. */
void admin_stop(struct admin *a);

/* The port actually bound (useful after port 0). */
unsigned admin_port(const struct admin *a);

/* 127.0.0.0/8, ::1, or ::ffff:127.0.0.0/104. */
bool admin_addr_is_loopback(const struct net_addr *a);

#endif
