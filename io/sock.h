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
#include <stdint.h>

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

/* ---- SO_REUSEPORT steering ----
 * The listeners bound to one address with SO_REUSEPORT form a group,
 * numbered in the order they started listening (a closed one's slot is
 * taken by the last); the kernel gives each new connection to one of them
 * by a hash of its addresses, unless a program attached to the group picks
 * the number. sock_steer() attaches a classic BPF program that picks
 * listener i with probability w[i] / sum(w), at random per connection
 * (weights 0..SOCK_STEER_SCALE, n 1..SOCK_STEER_MAX, sum > 0: else
 * -EINVAL); a number past the group's end makes the kernel fall back to the
 * hash, so a shrunken group still gets every connection. sock_steer_off()
 * detaches it (-ENOENT when none was attached). Any listener of the group
 * will do; the program stays with the group until it is replaced, detached
 * or the last listener closes. 0 or -errno. */
#define SOCK_STEER_MAX 64
#define SOCK_STEER_SCALE 65536u
int sock_steer(int fd, const uint32_t *w, unsigned n);
int sock_steer_off(int fd);

/* Local (getsockname) and peer (getpeername) addresses. */
int sock_local(int fd, struct net_addr *a);
int sock_peer(int fd, struct net_addr *a);

#endif
