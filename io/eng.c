/* io/eng.c - engine selection and the code both engines share: op
 * bookkeeping, the failure-policy table, fd slots, timers, defers and the
 * loop turn. See eng.h for the contract and eng_impl.h for op states. */
#include "io/eng_impl.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static struct eng_op **slot_side(struct eng *e, const struct eng_op *op)
{
    struct eng_fdslot *s = eng_slot(e, op->fd);
    return op->code == ENG_OP_SEND || op->code == ENG_OP_CONNECT ? &s->wr : &s->rd;
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

/* One line per engine (so per shard): which one runs and why. A fallback
 * from io_uring is a warning: the operator may want to allow io_uring. */
static struct eng *announce(struct eng *e, bool fell_back)
{
    log_msg(fell_back ? LOG_WARN : LOG_INFO, "io engine", "engine", e->be->name, "reason",
            e->reason, NULL);
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
    e->be->fini(e);
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

void eng_read(struct eng *e, struct eng_op *op, int fd, void *buf, size_t len)
{
    start_rd(e, op, ENG_OP_READ, fd, buf, len);
}

void eng_send(struct eng *e, struct eng_op *op, int fd, struct iovec *iov, int iovcnt)
{
    size_t total = 0;

    start(e, op, ENG_OP_SEND, fd);
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
