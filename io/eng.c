/* io/eng.c - engine selection and the code both engines share: op
 * bookkeeping, the failure-policy table, fd slots, timers, defers and the
 * loop turn. See eng.h for the contract and eng_impl.h for op states. */
#include "io/eng_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "core/log.h"

/* ---- Failure policy ------------------------------------------------------
 * One table for both engines (liburing proxy.c error_handlers[]). Rows are
 * matched in order; ENG_OP_NONE matches any op. No row: deliver (accept:
 * final). See the table in eng.h for the reasoning per row. */
static const struct {
    uint8_t code;
    int err;
    enum eng_verdict v;
} policy[] = {
    /* connect(2) EAGAIN means "no ephemeral port/route cache": retrying
     * would spin, so it is reported. */
    { ENG_OP_CONNECT, EAGAIN, ENG_V_DELIVER },
    { ENG_OP_NONE, EAGAIN, ENG_V_RETRY },
    { ENG_OP_NONE, EINTR, ENG_V_RETRY },
    /* Resource exhaustion: the pending connection stays in the backlog, so
     * retrying at once would spin. */
    { ENG_OP_ACCEPT, EMFILE, ENG_V_PAUSE },
    { ENG_OP_ACCEPT, ENFILE, ENG_V_PAUSE },
    { ENG_OP_ACCEPT, ENOBUFS, ENG_V_PAUSE },
    { ENG_OP_ACCEPT, ENOMEM, ENG_V_PAUSE },
    /* accept(2) NOTES: errors of the new connection, not of the listener. */
    { ENG_OP_ACCEPT, ECONNABORTED, ENG_V_RETRY },
    { ENG_OP_ACCEPT, EPROTO, ENG_V_RETRY },
    { ENG_OP_ACCEPT, EPERM, ENG_V_RETRY },
    { ENG_OP_ACCEPT, ENETDOWN, ENG_V_RETRY },
    { ENG_OP_ACCEPT, ENETUNREACH, ENG_V_RETRY },
    { ENG_OP_ACCEPT, EHOSTDOWN, ENG_V_RETRY },
    { ENG_OP_ACCEPT, EHOSTUNREACH, ENG_V_RETRY },
    { ENG_OP_ACCEPT, ENONET, ENG_V_RETRY },
    { ENG_OP_ACCEPT, ENOPROTOOPT, ENG_V_RETRY },
    { ENG_OP_ACCEPT, EOPNOTSUPP, ENG_V_RETRY },
    { ENG_OP_ACCEPT, ETIMEDOUT, ENG_V_RETRY },
};

enum eng_verdict eng_verdict(const struct eng_op *op, int res)
{
    if (res >= 0)
        return ENG_V_DELIVER;
    for (size_t i = 0; i < sizeof(policy) / sizeof(policy[0]); i++)
        if (policy[i].err == -res && (policy[i].code == ENG_OP_NONE || policy[i].code == op->code))
            return policy[i].v;
    return op->code == ENG_OP_ACCEPT ? ENG_V_FINAL : ENG_V_DELIVER;
}

_Noreturn void eng_bug(const char *what, const char *file, int line)
{
    log_msg(LOG_ERROR, "engine contract broken", "where", LOG_PRINTF("%s:%d", file, line),
            "check", what, NULL);
    abort();
}

/* ---- fd slots --------------------------------------------------------------- */

static int slot_grow(struct eng *e, int fd)
{
    size_t n = e->nslots ? e->nslots : 256;
    struct eng_fdslot *s;

    while (n <= (size_t)fd)
        n *= 2;
    s = realloc(e->slots, n * sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    memset(s + e->nslots, 0, (n - e->nslots) * sizeof(*s));
    e->slots = s;
    e->nslots = n;
    return 0;
}

/* ---- Picked-buffer pool ---------------------------------------------------- */

static const size_t pclass_size[2] = { ENG_PBUF_SMALL, ENG_PBUF_BIG };
static const size_t pclass_spare[2] = { ENG_PBUF_SPARE_SMALL, ENG_PBUF_SPARE_BIG };

void *eng_pool_get(struct eng *e, enum eng_pclass pc)
{
    struct eng_pool *p = &e->pool[pc];
    void *b = p->free;

    if (b != NULL) {
        memcpy(&p->free, b, sizeof(void *));
        p->nfree--;
        return b;
    }
    return malloc(pclass_size[pc]);
}

void eng_pool_recycle(struct eng *e, void *buf)
{
    enum eng_pclass pc;
    struct eng_pool *p;

    if (e->be->recycle != NULL && e->be->recycle(e, buf))
        return;
    /* The allocator knows the class: usable size is at least what was
     * asked (exact with jemalloc, a little more with glibc). */
    pc = malloc_usable_size(buf) >= ENG_PBUF_BIG ? ENG_PC_BIG : ENG_PC_SMALL;
    p = &e->pool[pc];
    if (p->nfree >= pclass_spare[pc]) {
        free(buf);
        return;
    }
    memcpy(buf, &p->free, sizeof(void *));
    p->free = buf;
    p->nfree++;
}

/* ---- Splice and the pipe pool -------------------------------------------- */

static long splice_step(struct eng *e, struct eng_op *op)
{
    bool in = op->u.spl.dir == ENG_SPLICE_IN;
    ssize_t n;

    do {
        n = in ? splice(op->fd, NULL, op->u.spl.pfd, NULL, op->u.spl.left,
                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
               : splice(op->u.spl.pfd, NULL, op->fd, NULL, op->u.spl.left,
                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n > 0)
        e->st.splices++;
    return n;
}

bool eng_splice_run(struct eng *e, struct eng_op *op, int *res)
{
    for (;;) {
        long n = splice_step(e, op);

        if (op->u.spl.dir == ENG_SPLICE_IN) {
            int avail = 0;

            /* EAGAIN while the socket holds bytes: the pipe is out of
             * slots (one per socket buffer fragment, so it can be full
             * long before its byte capacity). Waiting for the socket
             * would wait for an edge that a sender with a full window
             * never makes: report it, the caller drains the pipe. */
            if (n == -EAGAIN && ioctl(op->fd, FIONREAD, &avail) == 0 && avail > 0) {
                *res = -EAGAIN;
                return true;
            }
            if (n == -EAGAIN)
                return false;
            *res = (int)n; /* bytes, 0 = EOF, or -errno */
            return true;
        }
        if (n > 0) {
            op->u.spl.left -= (size_t)n;
            if (op->u.spl.left > 0)
                continue;
            *res = (int)op->u.spl.len;
            return true;
        }
        if (n == -EAGAIN) {
            if (op->u.spl.dir != ENG_SPLICE_OUT_TRY)
                return false;
            *res = (int)(op->u.spl.len - op->u.spl.left);
            return true;
        }
        /* 0 out of a pipe means it was empty: the caller broke the contract
         * ("the pipe holds len bytes"); report it rather than spin. */
        *res = n == 0 ? -EIO : (int)n;
        return true;
    }
}

int eng_pipe_get(struct eng *e, int p[2])
{
    int cap;

    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return -errno;
    e->st.pipes_made++;
    /* Fails beyond the per-user pipe limits: keep the default size. */
    cap = fcntl(p[1], F_SETPIPE_SZ, ENG_PIPE_SIZE);
    if (cap < 0)
        cap = fcntl(p[1], F_GETPIPE_SZ);
    if (cap <= 0) {
        int err = cap < 0 ? errno : EINVAL;
        close(p[0]);
        close(p[1]);
        return -err;
    }
    return cap;
}

static void forget(struct eng *e, int fd, bool close_it);

/* Pipes are closed at once, not batched into the next turn as sockets are
 * on io_uring: they are few (one per splice session), and a caller that
 * gives one back may be counting its fds. */
void eng_pipe_put(struct eng *e, const int p[2])
{
    for (int i = 0; i < 2; i++) {
        forget(e, p[i], false);
        if (p[i] >= 0)
            close(p[i]);
    }
}

static void pool_fini(struct eng *e)
{
    for (int pc = ENG_PC_SMALL; pc <= ENG_PC_BIG; pc++) {
        struct eng_pool *p = &e->pool[pc];

        while (p->free != NULL) {
            void *b = p->free;
            memcpy(&p->free, b, sizeof(void *));
            free(b);
        }
        p->nfree = 0;
    }
}

/* A picked recv is ending with res: the buffer is the caller's (res > 0)
 * or goes back before the callback. */
static void pick_settle(struct eng *e, struct eng_op *op, int res)
{
    if (op->code != ENG_OP_RECV_PICK)
        return;
    if (res > 0) {
        ENG_BUG_ON(op->u.rd.buf == NULL);
        e->st.pbuf_lent++;
        return;
    }
    if (op->u.rd.buf != NULL)
        eng_pool_recycle(e, op->u.rd.buf);
    op->u.rd.buf = NULL;
}

uint8_t *eng_buf_get(struct eng *e, size_t len)
{
    uint8_t *b;

    if (len == 0 || len > ENG_PBUF_BIG)
        return NULL;
    b = eng_pool_get(e, eng_pclass_of(len));

    if (b != NULL)
        e->st.pbuf_lent++;
    return b;
}

void eng_buf_put(struct eng *e, void *buf)
{
    ENG_BUG_ON(buf == NULL || e->st.pbuf_lent == 0);
    e->st.pbuf_lent--;
    eng_pool_recycle(e, buf);
}

static bool writes(const struct eng_op *op)
{
    return op->code == ENG_OP_SEND || op->code == ENG_OP_CONNECT ||
           (op->code == ENG_OP_SPLICE && op->u.spl.dir != ENG_SPLICE_IN);
}

static struct eng_op **slot_side(struct eng *e, const struct eng_op *op)
{
    struct eng_fdslot *s = eng_slot(e, op->fd);
    return writes(op) ? &s->wr : &s->rd;
}

static int slot_take(struct eng *e, struct eng_op *op)
{
    struct eng_op **side;

    if (op->fd < 0)
        return -EBADF;
    if ((size_t)op->fd >= e->nslots && slot_grow(e, op->fd) < 0)
        return -ENOMEM;
    side = slot_side(e, op);
    if (*side != NULL) {
        e->st.busy++;
        return -EBUSY;
    }
    *side = op;
    return 0;
}

static void slot_release(struct eng *e, struct eng_op *op)
{
    struct eng_op **side;

    if (op->fd < 0 || (size_t)op->fd >= e->nslots)
        return;
    side = slot_side(e, op);
    if (*side == op)
        *side = NULL;
}

/* ---- Finishing ops (called by the backends) ------------------------------ */

void eng_complete(struct eng *e, struct eng_op *op, int res)
{
    slot_release(e, op);
    pick_settle(e, op, res);
    op->state = ENG_OS_IDLE;
    op->more = false;
    e->st.completed++;
    e->callbacks++;
    op->cb(op, res);
}

void eng_finish_later(struct eng *e, struct eng_op *op, int res)
{
    slot_release(e, op);
    op->res = res;
    op->state = ENG_OS_DONE;
    cds_list_add_tail(&op->link, &e->done);
}

void eng_accept_deliver(struct eng *e, struct eng_op *op, int fd)
{
    op->more = true;
    e->st.completed++;
    e->callbacks++;
    op->cb(op, fd);
}

void eng_accept_pause(struct eng *e, struct eng_op *op, int err)
{
    e->st.accept_paused++;
    op->state = ENG_OS_PAUSED;
    cds_list_add_tail(&op->link, &e->paused);
    if (!timer_armed(&e->accept_retry))
        eng_timer_add(e, &e->accept_retry, ENG_ACCEPT_PAUSE_MS);
    /* PAUSED before the callback, so that eng_cancel() from inside it
     * takes the common path. */
    eng_accept_deliver(e, op, err);
}

void eng_requeue(struct eng *e, struct eng_op *op)
{
    op->state = ENG_OS_PENDING;
    cds_list_add_tail(&op->link, &e->pending);
}

size_t eng_send_advance(struct eng_op *op, size_t n)
{
    op->u.wr.left -= n;
    while (op->u.wr.iovcnt > 0 && (n > 0 || op->u.wr.iov->iov_len == 0)) {
        struct iovec *v = op->u.wr.iov;
        if (n < v->iov_len) {
            v->iov_base = (char *)v->iov_base + n;
            v->iov_len -= n;
            break;
        }
        n -= v->iov_len;
        op->u.wr.iov++;
        op->u.wr.iovcnt--;
    }
    return op->u.wr.left;
}

static void accept_retry_cb(struct timer *t)
{
    struct eng *e = caa_container_of(t, struct eng, accept_retry);

    while (!cds_list_empty(&e->paused)) {
        struct eng_op *op = cds_list_first_entry(&e->paused, struct eng_op, link);
        cds_list_del(&op->link);
        eng_requeue(e, op);
    }
}

/* ---- Selection --------------------------------------------------------- */

static struct eng *try_backend(const struct eng_backend *be, char *why, size_t whylen)
{
    struct eng *e = calloc(1, be->size);

    if (e == NULL) {
        snprintf(why, whylen, "%s: out of memory", be->name);
        return NULL;
    }
    e->be = be;
    CDS_INIT_LIST_HEAD(&e->pending);
    CDS_INIT_LIST_HEAD(&e->done);
    CDS_INIT_LIST_HEAD(&e->paused);
    timer_init(&e->accept_retry, accept_retry_cb);
    timer_heap_init(&e->timers);
    e->defer_tail = &e->defer_head;
    e->now = timer_clock_ms();
    if (be->init(e, why, whylen) < 0) {
        free(e);
        return NULL;
    }
    return e;
}

/* Which engine runs and why. A fallback from io_uring is a warning: the
 * operator may want to allow io_uring. Every shard makes an engine, and
 * they all say the same: a line that repeats the previous one is debug,
 * so a 64-core host logs it once. */
static struct eng *announce(struct eng *e, bool fell_back)
{
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static char last[sizeof(e->reason) + 16];
    char line[sizeof(last)];
    bool repeat;

    snprintf(line, sizeof(line), "%s %s", e->be->name, e->reason);
    pthread_mutex_lock(&mu);
    repeat = strcmp(line, last) == 0;
    memcpy(last, line, sizeof(last));
    pthread_mutex_unlock(&mu);
    log_msg(repeat ? LOG_DEBUG : fell_back ? LOG_WARN : LOG_INFO, "io engine", "engine",
            e->be->name, "reason", e->reason, NULL);
    return e;
}

struct eng *eng_new(enum eng_kind want, char *err, size_t errlen)
{
    char why[sizeof(((struct eng *)0)->reason)] = "";
    char why2[sizeof(why)] = "";
    struct eng *e;

    if (errlen > 0)
        err[0] = '\0';
    if (want == ENG_AUTO || want == ENG_URING) {
        e = try_backend(&eng_uring_backend, why, sizeof(why));
        if (e != NULL) {
            snprintf(e->reason, sizeof(e->reason), "%s", why);
            return announce(e, false);
        }
        if (want == ENG_URING) {
            snprintf(err, errlen, "%s", why);
            return NULL;
        }
    } else if (want != ENG_EPOLL) {
        snprintf(err, errlen, "unknown engine kind %d", (int)want);
        return NULL;
    }
    e = try_backend(&eng_epoll_backend, why2, sizeof(why2));
    if (e == NULL) {
        snprintf(err, errlen, "%s%s%s", why, why[0] ? "; " : "", why2);
        return NULL;
    }
    snprintf(e->reason, sizeof(e->reason), "%s", want == ENG_AUTO ? why : "requested");
    return announce(e, want == ENG_AUTO);
}

void eng_free(struct eng *e)
{
    if (e == NULL)
        return;
    ENG_BUG_ON(e->in_turn);
    /* Results nobody will see: their buffers go back first. */
    while (!cds_list_empty(&e->done)) {
        struct eng_op *op = cds_list_first_entry(&e->done, struct eng_op, link);
        cds_list_del(&op->link);
        pick_settle(e, op, 0);
    }
    e->be->fini(e);
    pool_fini(e);
    free(e->slots);
    free(e);
}

enum eng_kind eng_kind(const struct eng *e)
{
    return e->be->kind;
}

const char *eng_name(const struct eng *e)
{
    return e->be->name;
}

const char *eng_reason(const struct eng *e)
{
    return e->reason;
}

const char *eng_describe(const struct eng *e, char *buf, size_t len)
{
    snprintf(buf, len, "engine=%s reason=\"%s\"", e->be->name, e->reason);
    return buf;
}

/* ---- The loop turn -------------------------------------------------------- */

static int turn_timeout(struct eng *e, int timeout_ms)
{
    struct timer *t = timer_heap_min(&e->timers);

    if (!cds_list_empty(&e->done) || e->defer_head != NULL || e->stopped)
        return 0;
    if (t != NULL) {
        uint64_t d = t->when > e->now ? t->when - e->now : 0;
        if (d > INT_MAX)
            d = INT_MAX;
        if (timeout_ms < 0 || (int)d < timeout_ms)
            timeout_ms = (int)d;
    }
    return timeout_ms;
}

static void run_done(struct eng *e)
{
    struct cds_list_head batch;

    /* Only what is queued now: results queued by these callbacks wait for
     * the next turn, which then does not block. */
    CDS_INIT_LIST_HEAD(&batch);
    cds_list_splice(&e->done, &batch);
    CDS_INIT_LIST_HEAD(&e->done);
    while (!cds_list_empty(&batch)) {
        struct eng_op *op = cds_list_first_entry(&batch, struct eng_op, link);
        cds_list_del(&op->link);
        op->state = ENG_OS_IDLE;
        op->more = false;
        pick_settle(e, op, op->res);
        e->st.completed++;
        e->callbacks++;
        op->cb(op, op->res);
    }
}

static void run_timers(struct eng *e)
{
    uint64_t limit = timer_heap_seq(&e->timers);
    struct timer *t;

    while ((t = timer_heap_pop(&e->timers, e->now, limit)) != NULL) {
        e->st.timers++;
        e->callbacks++;
        t->cb(t);
    }
}

static void run_defers(struct eng *e)
{
    struct eng_defer *d;

    while ((d = e->defer_head) != NULL) {
        e->defer_head = d->next;
        if (e->defer_head == NULL)
            e->defer_tail = &e->defer_head;
        d->next = NULL;
        d->queued = false;
        e->st.defers++;
        e->callbacks++;
        d->cb(d);
    }
}

int eng_run_once(struct eng *e, int timeout_ms)
{
    int rc;

    ENG_BUG_ON(e->in_turn);
    e->in_turn = true;
    e->callbacks = 0;
    e->st.turns++;
    e->now = timer_clock_ms();
    rc = e->be->poll(e, turn_timeout(e, timeout_ms));
    run_done(e);
    run_timers(e);
    run_defers(e);
    e->in_turn = false;
    if (rc < 0)
        return rc;
    return e->callbacks > INT_MAX ? INT_MAX : (int)e->callbacks;
}

int eng_run(struct eng *e)
{
    int rc = 0;

    while (!e->stopped && rc >= 0)
        rc = eng_run_once(e, -1);
    e->stopped = false;
    return rc < 0 ? rc : 0;
}

void eng_stop(struct eng *e)
{
    e->stopped = true;
}

bool eng_stopped(const struct eng *e)
{
    return e->stopped;
}

uint64_t eng_now(const struct eng *e)
{
    return e->now;
}

const struct eng_stats *eng_stats(const struct eng *e)
{
    return &e->st;
}

/* ---- Starting and stopping ops ------------------------------------------ */

static void start(struct eng *e, struct eng_op *op, enum eng_opcode code, int fd)
{
    ENG_BUG_ON(op->state != ENG_OS_IDLE);
    ENG_BUG_ON(op->cb == NULL);
    op->eng = e;
    op->code = (uint8_t)code;
    op->fd = fd;
    op->flags = 0;
    op->more = false;
    op->res = 0;
    e->st.submitted++;
}

/* Queue a validated op for this turn, or fail it (-EBADF, -EBUSY...). */
static void enqueue(struct eng *e, struct eng_op *op)
{
    int err = slot_take(e, op);

    if (err < 0) {
        eng_finish_later(e, op, err); /* slot_release leaves others' slots */
        return;
    }
    eng_requeue(e, op);
}

void eng_accept(struct eng *e, struct eng_op *op, int lfd)
{
    start(e, op, ENG_OP_ACCEPT, lfd);
    memset(&op->u.acc, 0, sizeof(op->u.acc));
    enqueue(e, op);
}

static void start_rd(struct eng *e, struct eng_op *op, enum eng_opcode code, int fd, void *buf,
                     size_t len)
{
    start(e, op, code, fd);
    if (buf == NULL || len == 0) {
        eng_finish_later(e, op, -EINVAL);
        return;
    }
    op->u.rd.buf = buf;
    op->u.rd.len = len > INT_MAX ? INT_MAX : len;
    enqueue(e, op);
}

void eng_recv(struct eng *e, struct eng_op *op, int fd, void *buf, size_t len)
{
    start_rd(e, op, ENG_OP_RECV, fd, buf, len);
}

void eng_recv_pick(struct eng *e, struct eng_op *op, int fd, size_t len)
{
    start(e, op, ENG_OP_RECV_PICK, fd);
    op->u.rd.buf = NULL;
    if (len == 0) {
        eng_finish_later(e, op, -EINVAL);
        return;
    }
    op->u.rd.len = len > ENG_PBUF_BIG ? ENG_PBUF_BIG : len;
    enqueue(e, op);
}

void eng_read(struct eng *e, struct eng_op *op, int fd, void *buf, size_t len)
{
    start_rd(e, op, ENG_OP_READ, fd, buf, len);
}

static void send_flags(struct eng *e, struct eng_op *op, int fd, struct iovec *iov, int iovcnt,
                       int flags)
{
    size_t total = 0;

    start(e, op, ENG_OP_SEND, fd);
    op->u.wr.flags = flags;
    for (int i = 0; iov != NULL && i < iovcnt && total <= INT_MAX; i++)
        total += iov[i].iov_len;
    if (iov == NULL || iovcnt < 1 || total == 0 || total > INT_MAX) {
        eng_finish_later(e, op, -EINVAL);
        return;
    }
    op->u.wr.iov = iov;
    op->u.wr.iovcnt = iovcnt;
    op->u.wr.left = op->u.wr.total = total;
    eng_send_advance(op, 0); /* skip leading empty entries */
    enqueue(e, op);
}

void eng_send(struct eng *e, struct eng_op *op, int fd, struct iovec *iov, int iovcnt)
{
    send_flags(e, op, fd, iov, iovcnt, 0);
}

void eng_send_more(struct eng *e, struct eng_op *op, int fd, struct iovec *iov, int iovcnt)
{
    send_flags(e, op, fd, iov, iovcnt, MSG_MORE);
}

void eng_splice(struct eng *e, struct eng_op *op, int fd, int pfd, size_t len,
                enum eng_splice_dir dir)
{
    start(e, op, ENG_OP_SPLICE, fd);
    op->u.spl.pfd = pfd;
    op->u.spl.dir = (uint8_t)dir;
    op->u.spl.len = op->u.spl.left = len;
    if (pfd < 0 || len == 0 || len > INT_MAX || dir < ENG_SPLICE_IN ||
        dir > ENG_SPLICE_OUT_TRY) {
        op->u.spl.dir = ENG_SPLICE_IN; /* a valid slot side for the slot code */
        eng_finish_later(e, op, -EINVAL);
        return;
    }
    enqueue(e, op);
}

void eng_connect(struct eng *e, struct eng_op *op, int fd, const struct net_addr *to)
{
    struct sockaddr_storage ss;
    socklen_t len = addr_to_sockaddr(to, &ss);

    start(e, op, ENG_OP_CONNECT, fd);
    if (len == 0 || len > sizeof(op->u.conn.to)) {
        eng_finish_later(e, op, -EAFNOSUPPORT);
        return;
    }
    memcpy(&op->u.conn.to, &ss, len);
    op->u.conn.tolen = len;
    enqueue(e, op);
}

void eng_cancel(struct eng_op *op)
{
    struct eng *e = op->eng;

    switch (op->state) {
    case ENG_OS_PENDING:
    case ENG_OS_PAUSED:
        cds_list_del(&op->link);
        e->st.cancelled++;
        eng_finish_later(e, op, -ECANCELED);
        break;
    case ENG_OS_ACTIVE:
        e->st.cancelled++;
        e->be->cancel(e, op);
        break;
    default: /* idle, or result already queued */
        break;
    }
}

static void forget(struct eng *e, int fd, bool close_it)
{
    if (fd < 0)
        return;
    if ((size_t)fd < e->nslots) {
        struct eng_fdslot *s = eng_slot(e, fd);
        ENG_BUG_ON(s->rd != NULL || s->wr != NULL); /* op in flight on fd */
    }
    e->be->forget(e, fd, close_it);
}

int eng_try_recv(struct eng *e, int fd, void *buf, size_t len)
{
    ssize_t n;

    ENG_BUG_ON(fd >= 0 && (size_t)fd < e->nslots && eng_slot(e, fd)->rd != NULL);
    if (len > INT_MAX)
        len = INT_MAX;
    do {
        n = recv(fd, buf, len, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return (int)n;
}

void eng_close(struct eng *e, int fd)
{
    forget(e, fd, true);
}

void eng_detach(struct eng *e, int fd)
{
    forget(e, fd, false);
}

/* ---- Timers and defers ------------------------------------------------------- */

void eng_timer_add(struct eng *e, struct timer *t, uint64_t delay_ms)
{
    /* Outside a turn the cached clock may be old: read it afresh. */
    uint64_t now = e->in_turn ? e->now : timer_clock_ms();

    timer_heap_add(&e->timers, t, now + delay_ms);
}

void eng_timer_del(struct eng *e, struct timer *t)
{
    timer_heap_del(&e->timers, t);
}

void eng_defer(struct eng *e, struct eng_defer *d, void (*cb)(struct eng_defer *d))
{
    d->cb = cb;
    if (d->queued)
        return;
    d->queued = true;
    d->next = NULL;
    *e->defer_tail = d;
    e->defer_tail = &d->next;
}
