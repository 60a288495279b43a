/* io/sock.h - TCP socket helpers for the engines.
 *
 * Every socket made here is O_NONBLOCK and O_CLOEXEC, as io/eng.h needs.
 * Functions return an fd or 0 on success and -errno on failure (they never
 * leave a half-made socket open). The caller owns returned fds; once an op
 * has been started on one, close it with eng_close().
 */
#ifndef IO_SOCK_H
#define IO_SOCK_H

#include <stdbool.h>

#include "core/addr.h"

struct sock_opts {
    int backlog;    /* listen(2) backlog; 0 = SOMAXCONN */
    bool reuseport; /* SO_REUSEPORT: one listener per shard on one port */
    bool v6only;    /* AF_INET6 listeners: IPV6_V6ONLY (false = dual stack) */
    bool nodelay;   /* TCP_NODELAY on sock_stream() sockets, and on
                       sock_listen() sockets: accepted ones inherit it
                       (Linux), which saves a setsockopt per connection */
    int rcvbuf;     /* SO_RCVBUF / SO_SNDBUF in bytes; 0 = kernel default */
    int sndbuf;
};

/* A listening TCP socket bound to a (port 0 = any free port; read it back
 * with sock_local()). Always SO_REUSEADDR, so a restart does not wait for
 * TIME_WAIT. o may be NULL (defaults: all zero). Accepted sockets inherit
 * o's nodelay and buffer sizes. fd or -errno (-EAFNOSUPPORT for an
 * AF_UNSPEC address). */
int sock_listen(const struct net_addr *a, const struct sock_opts *o);

/* An unconnected TCP socket of `family` (AF_INET, AF_INET6) for
 * eng_connect(), with o's nodelay and buffer sizes applied. fd or -errno. */
int sock_stream(int family, const struct sock_opts *o);

/* TCP_NODELAY on or off. */
int sock_nodelay(int fd, bool on);

/* SO_RCVBUF / SO_SNDBUF; 0 leaves that one alone. The kernel doubles the
 * value and applies its own minimum. */
int sock_bufsize(int fd, int rcvbuf, int sndbuf);

/* Local (getsockname) and peer (getpeername) addresses. */
int sock_local(int fd, struct net_addr *a);
int sock_peer(int fd, struct net_addr *a);

#endif
