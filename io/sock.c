/* io/sock.c - see sock.h. */
#include "io/sock.h"

#include <errno.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

static int setint(int fd, int level, int name, int v)
{
    return setsockopt(fd, level, name, &v, sizeof(v)) < 0 ? -errno : 0;
}

/* Close fd keeping the error that made us give up. */
static int fail(int fd, int err)
{
    close(fd);
    return err;
}

int sock_nodelay(int fd, bool on)
{
    return setint(fd, IPPROTO_TCP, TCP_NODELAY, on);
}

int sock_bufsize(int fd, int rcvbuf, int sndbuf)
{
    int rc = 0;

    if (rcvbuf > 0)
        rc = setint(fd, SOL_SOCKET, SO_RCVBUF, rcvbuf);
    if (rc == 0 && sndbuf > 0)
        rc = setint(fd, SOL_SOCKET, SO_SNDBUF, sndbuf);
    return rc;
}

int sock_listen(const struct net_addr *a, const struct sock_opts *o)
{
    static const struct sock_opts defaults;
    struct sockaddr_storage ss;
    socklen_t len = addr_to_sockaddr(a, &ss);
    int fd, rc;

    if (o == NULL)
        o = &defaults;
    if (len == 0)
        return -EAFNOSUPPORT;
    fd = socket(a->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    rc = setint(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    if (rc == 0 && o->reuseport)
        rc = setint(fd, SOL_SOCKET, SO_REUSEPORT, 1);
    if (rc == 0 && a->family == AF_INET6)
        rc = setint(fd, IPPROTO_IPV6, IPV6_V6ONLY, o->v6only);
    /* Accepted sockets inherit TCP_NODELAY and the buffer sizes from the
     * listener: set here once, not once per connection. */
    if (rc == 0 && o->nodelay)
        rc = sock_nodelay(fd, true);
    if (rc == 0)
        rc = sock_bufsize(fd, o->rcvbuf, o->sndbuf);
    if (rc < 0)
        return fail(fd, rc);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0 ||
        listen(fd, o->backlog > 0 ? o->backlog : SOMAXCONN) < 0)
        return fail(fd, -errno);
    return fd;
}

int sock_stream(int family, const struct sock_opts *o)
{
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int rc = 0;

    if (fd < 0)
        return -errno;
    if (o != NULL && o->nodelay)
        rc = sock_nodelay(fd, true);
    if (rc == 0 && o != NULL)
        rc = sock_bufsize(fd, o->rcvbuf, o->sndbuf);
    return rc < 0 ? fail(fd, rc) : fd;
}

static int name_of(int fd, struct net_addr *a, bool peer)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int rc = peer ? getpeername(fd, (struct sockaddr *)&ss, &len)
                  : getsockname(fd, (struct sockaddr *)&ss, &len);

    if (rc < 0)
        return -errno;
    addr_from_sockaddr(a, (struct sockaddr *)&ss);
    return 0;
}

int sock_local(int fd, struct net_addr *a)
{
    return name_of(fd, a, false);
}

int sock_peer(int fd, struct net_addr *a)
{
    return name_of(fd, a, true);
}
