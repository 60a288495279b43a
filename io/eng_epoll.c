/* io/eng_epoll.c - the epoll engine: completions emulated over readiness.
 * See eng.h "Engines".
 *
 * A turn: register the fds that parked for the first time (one pass),
 * epoll_wait (zero timeout when ops are pending), turn each edge into a
 * retry of the ops parked on that fd, then let every pending op try its
 * syscall once. Success or a real error calls back; EAGAIN parks the op.
 *
 * Edge-triggered, registered once per fd with both directions and never
 * modified. Why that is safe: an op always tries before it parks, and a
 * new edge is queued for any readiness change after that failed try, so
 * a parked op always sees the edge that can unblock it. Why it is cheap:
 * no epoll_ctl per op, none when a direction goes idle, and EPOLLERR/HUP
 * are reported once, not on every wait as level-triggered would do for an
 * fd nobody reads (e.g. a flow-controlled channel whose peer reset).
 */
#include "io/eng_impl.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define EP_EVENTS 256

enum {
    EP_REG = 1u << 0,   /* in the epoll set */
    EP_DIRTY = 1u << 1, /* queued for registration */
};

struct eng_epoll {
    struct eng base;
    int epfd;
    int *dirty; /* fds to register before the next epoll_wait */
    size_t ndirty, cdirty;
    struct epoll_event ev[EP_EVENTS];
};

static struct eng_epoll *ep(struct eng *e)
{
    return (struct eng_epoll *)e;
}

static int ep_init(struct eng *e, char *why, size_t whylen)
{
    struct eng_epoll *p = ep(e);

    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0) {
        int err = errno;
        snprintf(why, whylen, "epoll_create1: %s", strerror(err));
        return -err;
    }
    snprintf(why, whylen, "epoll ok");
    return 0;
}

static void ep_fini(struct eng *e)
{
    struct eng_epoll *p = ep(e);

    close(p->epfd);
    free(p->dirty);
}

/* ---- Registration ---------------------------------------------------------- */

static bool parked(const struct eng_op *op)
{
    return op != NULL && (op->flags & ENG_OF_PARKED);
}

static int ep_add(struct eng_epoll *p, int fd)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.fd = fd };
    int rc = epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev);

    p->base.st.ctl++;
    if (rc < 0 && errno == EEXIST) {
        /* Still registered through a dup of an earlier file with this
         * number: take the registration over. */
        rc = epoll_ctl(p->epfd, EPOLL_CTL_MOD, fd, &ev);
        p->base.st.ctl++;
    }
    return rc < 0 ? -errno : 0;
}

/* The parked ops of an fd that cannot be watched (a regular file: EPERM)
 * fail with that error. */
static void ep_fail_parked(struct eng *e, struct eng_fdslot *s, int err)
{
    struct eng_op *rd = s->rd, *wr = s->wr;

    if (parked(rd)) {
        rd->flags &= (uint8_t)~ENG_OF_PARKED;
        eng_finish_later(e, rd, err);
    }
    if (parked(wr)) {
        wr->flags &= (uint8_t)~ENG_OF_PARKED;
        eng_finish_later(e, wr, err);
    }
}

static void ep_register_one(struct eng_epoll *p, int fd)
{
    struct eng *e = &p->base;
    struct eng_fdslot *s = eng_slot(e, fd);
    int rc;

    if (s->be & EP_REG)
        return;
    rc = ep_add(p, fd);
    if (rc == 0)
        s->be |= EP_REG;
    else
        ep_fail_parked(e, s, rc);
}

static void ep_register_dirty(struct eng_epoll *p)
{
    struct eng *e = &p->base;

    for (size_t i = 0; i < p->ndirty; i++) {
        int fd = p->dirty[i];
        struct eng_fdslot *s;

        if ((size_t)fd >= e->nslots)
            continue;
        s = eng_slot(e, fd);
        if (!(s->be & EP_DIRTY))
            continue; /* closed since */
        s->be &= ~EP_DIRTY;
        if (parked(s->rd) || parked(s->wr))
            ep_register_one(p, fd);
    }
    p->ndirty = 0;
}

static void ep_park(struct eng_epoll *p, struct eng_op *op)
{
    struct eng_fdslot *s = eng_slot(&p->base, op->fd);

    op->flags |= ENG_OF_PARKED;
    if (s->be & (EP_REG | EP_DIRTY))
        return;
    if (p->ndirty == p->cdirty) {
        size_t n = p->cdirty ? p->cdirty * 2 : 64;
        int *d = realloc(p->dirty, n * sizeof(*d));
        if (d == NULL) {
            ep_register_one(p, op->fd); /* no batch, but no stall either */
            return;
        }
        p->dirty = d;
        p->cdirty = n;
    }
    p->dirty[p->ndirty++] = op->fd;
    s->be |= EP_DIRTY;
}

/* ---- Attempts -------------------------------------------------------------- */

/* A picked recv takes a pool buffer only for the attempt: parked, it
 * holds none. */
static void ep_pick(struct eng_epoll *p, struct eng_op *op)
{
    struct eng *e = &p->base;
    void *b = eng_pool_get(e, eng_pclass_of(op->u.rd.len));

    if (b == NULL) {
        eng_complete(e, op, -ENOMEM);
        return;
    }
    for (;;) {
        ssize_t n = recv(op->fd, b, op->u.rd.len, MSG_DONTWAIT);
        int err = errno;

        if (n > 0) {
            op->u.rd.buf = b;
            e->st.pbuf_heap++;
            eng_complete(e, op, (int)n);
            return;
        }
        if (n == 0 || eng_verdict(op, -err) != ENG_V_RETRY) {
            eng_pool_recycle(e, b);
            eng_complete(e, op, n == 0 ? 0 : -err);
            return;
        }
        if (err == EAGAIN) {
            eng_pool_recycle(e, b);
            ep_park(p, op);
            return;
        }
    }
}

static void ep_rd(struct eng_epoll *p, struct eng_op *op)
{
    for (;;) {
        ssize_t n = op->code == ENG_OP_RECV
                        ? recv(op->fd, op->u.rd.buf, op->u.rd.len, MSG_DONTWAIT)
                        : read(op->fd, op->u.rd.buf, op->u.rd.len);
        int err = errno;

        if (n >= 0) {
            eng_complete(&p->base, op, (int)n);
            return;
        }
        if (eng_verdict(op, -err) != ENG_V_RETRY) {
            eng_complete(&p->base, op, -err);
            return;
        }
        if (err == EAGAIN) {
            ep_park(p, op);
            return;
        }
    }
}

static void ep_send(struct eng_epoll *p, struct eng_op *op)
{
    for (;;) {
        struct msghdr msg = {
            .msg_iov = op->u.wr.iov,
            .msg_iovlen = (size_t)(op->u.wr.iovcnt > IOV_MAX ? IOV_MAX : op->u.wr.iovcnt),
        };
        ssize_t n = sendmsg(op->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT | op->u.wr.flags);
        int err = errno;

        if (n > 0) {
            if (eng_send_advance(op, (size_t)n) == 0) {
                eng_complete(&p->base, op, (int)op->u.wr.total);
                return;
            }
            p->base.st.send_partial++;
            continue;
        }
        if (n == 0) /* > 0 bytes asked: cannot happen on a stream */
            err = EIO;
        if (eng_verdict(op, -err) != ENG_V_RETRY) {
            eng_complete(&p->base, op, -err);
            return;
        }
        if (err == EAGAIN) {
            ep_park(p, op);
            return;
        }
    }
}

static void ep_splice(struct eng_epoll *p, struct eng_op *op)
{
    int res;

    if (eng_splice_run(&p->base, op, &res))
        eng_complete(&p->base, op, res);
    else
        ep_park(p, op);
}

/* connect(2) once; after that, readiness means "finished": read SO_ERROR. */
static void ep_connect(struct eng_epoll *p, struct eng_op *op)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int err = 0;

    if (!(op->flags & ENG_OF_STARTED)) {
        if (connect(op->fd, &op->u.conn.to.sa, op->u.conn.tolen) == 0) {
            eng_complete(&p->base, op, 0);
            return;
        }
        err = errno;
        if (err == EINPROGRESS || err == EINTR) { /* EINTR: goes on async */
            op->flags |= ENG_OF_STARTED;
            ep_park(p, op);
            return;
        }
        eng_complete(&p->base, op, -err);
        return;
    }
    len = sizeof(err);
    if (getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err != 0) {
        eng_complete(&p->base, op, -err);
        return;
    }
    len = sizeof(ss);
    if (getpeername(op->fd, (struct sockaddr *)&ss, &len) == 0)
        eng_complete(&p->base, op, 0);
    else if (errno == ENOTCONN)
        ep_park(p, op); /* spurious edge: still connecting */
    else
        eng_complete(&p->base, op, -errno);
}

static void ep_accept(struct eng_epoll *p, struct eng_op *op)
{
    struct eng *e = &p->base;

    for (int i = 0; i < ENG_ACCEPT_BATCH; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(op->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        int err = errno;

        if (fd >= 0) {
            addr_from_sockaddr(&op->u.acc.peer, (struct sockaddr *)&ss);
            eng_accept_deliver(e, op, fd);
            if (op->state != ENG_OS_ACTIVE)
                return; /* cancelled from the callback */
            continue;
        }
        switch (eng_verdict(op, -err)) {
        case ENG_V_RETRY:
            if (err == EAGAIN) {
                ep_park(p, op);
                return;
            }
            if (err != EINTR)
                e->st.accept_dropped++;
            continue;
        case ENG_V_PAUSE:
            eng_accept_pause(e, op, -err);
            return;
        default:
            eng_complete(e, op, -err);
            return;
        }
    }
    eng_requeue(e, op); /* more may be waiting: go on next turn, fairly */
}

static void ep_attempt(struct eng_epoll *p, struct eng_op *op)
{
    switch (op->code) {
    case ENG_OP_ACCEPT:
        ep_accept(p, op);
        break;
    case ENG_OP_RECV:
    case ENG_OP_READ:
        ep_rd(p, op);
        break;
    case ENG_OP_RECV_PICK:
        ep_pick(p, op);
        break;
    case ENG_OP_SPLICE:
        ep_splice(p, op);
        break;
    case ENG_OP_SEND:
        ep_send(p, op);
        break;
    case ENG_OP_CONNECT:
        ep_connect(p, op);
        break;
    default:
        ENG_BUG_ON(1);
    }
}

/* ---- The turn ---------------------------------------------------------------- */

static void ep_wake(struct eng *e, struct eng_op *op)
{
    if (parked(op)) {
        op->flags &= (uint8_t)~ENG_OF_PARKED;
        eng_requeue(e, op);
    }
}

static void ep_event(struct eng_epoll *p, const struct epoll_event *ev)
{
    struct eng *e = &p->base;
    int fd = ev->data.fd;
    struct eng_fdslot *s;

    if (fd < 0 || (size_t)fd >= e->nslots)
        return;
    s = eng_slot(e, fd);
    if (ev->events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
        ep_wake(e, s->rd);
    if (ev->events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
        ep_wake(e, s->wr);
}

static int ep_poll(struct eng *e, int timeout_ms)
{
    struct eng_epoll *p = ep(e);
    struct cds_list_head todo;
    int n;

    ep_register_dirty(p);
    if (!cds_list_empty(&e->pending))
        timeout_ms = 0;
    n = epoll_wait(p->epfd, p->ev, EP_EVENTS, timeout_ms);
    e->st.polls++;
    e->now = timer_clock_ms();
    if (n < 0 && errno != EINTR)
        return -errno;
    for (int i = 0; i < n; i++)
        ep_event(p, &p->ev[i]);

    /* Only the ops pending now: what callbacks start runs next turn. */
    CDS_INIT_LIST_HEAD(&todo);
    cds_list_splice(&e->pending, &todo);
    CDS_INIT_LIST_HEAD(&e->pending);
    while (!cds_list_empty(&todo)) {
        struct eng_op *op = cds_list_first_entry(&todo, struct eng_op, link);
        cds_list_del(&op->link);
        op->state = ENG_OS_ACTIVE;
        ep_attempt(p, op);
    }
    return 0;
}

static void ep_cancel(struct eng *e, struct eng_op *op)
{
    /* ACTIVE here means parked, or an accept inside its own callback. */
    op->flags &= (uint8_t)~ENG_OF_PARKED;
    eng_finish_later(e, op, -ECANCELED);
}

static void ep_forget(struct eng *e, int fd, bool close_it)
{
    struct eng_epoll *p = ep(e);

    if ((size_t)fd < e->nslots) {
        struct eng_fdslot *s = eng_slot(e, fd);
        /* close() drops the registration itself; a detached fd lives on. */
        if (!close_it && (s->be & EP_REG)) {
            epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
            e->st.ctl++;
        }
        s->be = 0;
    }
    if (close_it)
        close(fd);
}

const struct eng_backend eng_epoll_backend = {
    .kind = ENG_EPOLL,
    .name = "epoll",
    .size = sizeof(struct eng_epoll),
    .init = ep_init,
    .fini = ep_fini,
    .poll = ep_poll,
    .cancel = ep_cancel,
    .forget = ep_forget,
};
