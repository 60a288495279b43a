/* io/sock.c - see sock.h. */
#include "io/sock.h"

#include <errno.h>
#include <linux/filter.h>
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

/* The program: A = a random 16-bit number, then one (jge, ret) pair per
 * listener but the last, against the running sum of the weights scaled to
 * 65536: listener i owns [sum(w[0..i)), sum(w[0..i])). */
int sock_steer(int fd, const uint32_t *w, unsigned n)
{
    struct sock_filter code[2 + 2 * SOCK_STEER_MAX];
    struct sock_fprog prog = { .filter = code };
    uint64_t sum = 0, run = 0;
    unsigned k = 0;

    if (n == 0 || n > SOCK_STEER_MAX)
        return -EINVAL;
    for (unsigned i = 0; i < n; i++) {
        if (w[i] > SOCK_STEER_SCALE)
            return -EINVAL;
        sum += w[i];
    }
    if (sum == 0)
        return -EINVAL;
    code[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM);
    code[k++] = (struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, SOCK_STEER_SCALE - 1);
    for (unsigned i = 0; i + 1 < n; i++) {
        run += w[i];
        /* A >= bound: skip this listener's ret. */
        code[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K,
                                                 (uint32_t)(run * SOCK_STEER_SCALE / sum), 1, 0);
        code[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, i);
    }
    code[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, n - 1);
    prog.len = (unsigned short)k;
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog)) < 0 ? -errno
                                                                                         : 0;
}

int sock_steer_off(int fd)
{
    return setint(fd, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 1);
}
