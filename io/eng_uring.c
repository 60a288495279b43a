/* io/eng_uring.c - the io_uring engine (liburing). See eng.h "Engines".
 *
 * A turn: every op started since the last turn gets its SQE (plus one
 * ASYNC_CANCEL SQE per cancelled op), one io_uring_enter submits them and
 * waits, and the CQ is reaped as one batch (io_uring_for_each_cqe +
 * io_uring_cq_advance). user_data is the op pointer; 0 marks our cancel
 * and close SQEs, LIBURING_UDATA_TIMEOUT liburing's own wait timeout on
 * kernels without IORING_FEAT_EXT_ARG. Both are ignored when reaped.
 *
 * eng_close() queues the fd and the next turn closes it with an
 * IORING_OP_CLOSE SQE in the same io_uring_enter as the rest of the batch:
 * a channel costs one close(2) syscall less at each end (the fd number
 * stays taken until then, so nothing can reuse it early). Before the ring
 * is enabled, without the opcode, or when the queue cannot grow, close(2)
 * runs at once; eng_free closes what is still queued.
 */
#include "io/eng_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define UR_SQ_ENTRIES 1024
#define UR_CQ_ENTRIES 16384 /* multishot accept and many idle recvs */
#define UR_BGID 0           /* the engine's one provided-buffer group */

struct eng_uring {
    struct eng base;
    struct io_uring ring;
    struct io_uring_buf_ring *br; /* provided buffers; NULL: heap fallback */
    uint8_t *pbase;               /* ENG_RING_BUFS * ENG_PBUF_SMALL bytes */
    size_t brlen;                 /* bytes mapped for br */
    struct cds_list_head cancels; /* ops whose cancel SQE is still to make */
    int *closes;                  /* fds eng_close()d, closed next turn */
    size_t nclose, capclose;
    unsigned inflight;            /* ops the kernel holds */
    unsigned flags;               /* setup flags that worked */
    bool enabled;                 /* ring enabled by its owner thread */
    bool multishot;               /* multishot accept works */
    bool op_close;                /* IORING_OP_CLOSE is there */
};

static struct eng_uring *ur(struct eng *e)
{
    return (struct eng_uring *)e;
}

/* ---- Setup ------------------------------------------------------------------ */

/* Tried in order; EINVAL means "this kernel does not know a flag". */
static const unsigned ur_setups[] = {
    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN |
        IORING_SETUP_SUBMIT_ALL | IORING_SETUP_R_DISABLED, /* 6.1 */
    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL |
        IORING_SETUP_R_DISABLED,                           /* 6.0 */
    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL, /* 5.19 */
    IORING_SETUP_SUBMIT_ALL,                             /* 5.18 */
    0,
};

static const struct {
    unsigned flag;
    const char *name;
} ur_flag_names[] = {
    { IORING_SETUP_SINGLE_ISSUER, "single_issuer" },
    { IORING_SETUP_DEFER_TASKRUN, "defer_taskrun" },
    { IORING_SETUP_COOP_TASKRUN, "coop_taskrun" },
    { IORING_SETUP_SUBMIT_ALL, "submit_all" },
};

static const struct {
    int op;
    const char *name;
} ur_needed_ops[] = {
    { IORING_OP_ACCEPT, "ACCEPT" }, { IORING_OP_RECV, "RECV" },
    { IORING_OP_READ, "READ" },     { IORING_OP_SEND, "SEND" },
    { IORING_OP_SENDMSG, "SENDMSG" }, { IORING_OP_CONNECT, "CONNECT" },
    { IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL" }, { IORING_OP_POLL_ADD, "POLL_ADD" },
};

/* kernel.io_uring_disabled: 0 on, 1 privileged only, 2 off; -1 unknown. */
static int sysctl_disabled(void)
{
    char buf[16] = "";
    int fd = open("/proc/sys/kernel/io_uring_disabled", O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    return n > 0 ? atoi(buf) : -1;
}

/* The SNITUN_IO_URING_DISABLE switch and the sysctl: refuse before trying. */
static int ur_refused(char *why, size_t whylen)
{
    const char *env = getenv("SNITUN_IO_URING_DISABLE");

    if (env != NULL && env[0] != '\0' && strcmp(env, "0") != 0) {
        snprintf(why, whylen, "io_uring refused: SNITUN_IO_URING_DISABLE=%.16s", env);
        return -EPERM;
    }
    if (sysctl_disabled() == 2) {
        snprintf(why, whylen, "io_uring refused: kernel.io_uring_disabled=2");
        return -EPERM;
    }
    return 0;
}

static int ur_check_ops(struct eng_uring *u, char *why, size_t whylen)
{
    struct io_uring_probe *p = io_uring_get_probe_ring(&u->ring);
    int rc = 0;

    if (p == NULL)
        return 0; /* probing itself is new; FAST_POLL was checked already */
    u->op_close = io_uring_opcode_supported(p, IORING_OP_CLOSE);
    for (size_t i = 0; i < sizeof(ur_needed_ops) / sizeof(ur_needed_ops[0]); i++) {
        if (!io_uring_opcode_supported(p, ur_needed_ops[i].op)) {
            snprintf(why, whylen, "io_uring refused: kernel lacks IORING_OP_%s",
                     ur_needed_ops[i].name);
            rc = -EOPNOTSUPP;
            break;
        }
    }
    io_uring_free_probe(p);
    return rc;
}

/* The provided-buffer ring for eng_recv_pick. On a kernel without it
 * (< 5.19) picks fall back to heap buffers held while the recv waits. */
static void ur_ring_init(struct eng_uring *u)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = (ENG_RING_BUFS * sizeof(struct io_uring_buf) + page - 1) / page * page;
    struct io_uring_buf_reg reg;
    void *r, *b;

    r = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED)
        return;
    b = mmap(NULL, (size_t)ENG_RING_BUFS * ENG_PBUF_SMALL, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b == MAP_FAILED) {
        munmap(r, len);
        return;
    }
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)r;
    reg.ring_entries = ENG_RING_BUFS;
    reg.bgid = UR_BGID;
    if (io_uring_register_buf_ring(&u->ring, &reg, 0) < 0) {
        munmap(b, (size_t)ENG_RING_BUFS * ENG_PBUF_SMALL);
        munmap(r, len);
        return;
    }
    u->br = r;
    u->brlen = len;
    u->pbase = b;
    io_uring_buf_ring_init(u->br);
    for (int i = 0; i < ENG_RING_BUFS; i++)
        io_uring_buf_ring_add(u->br, u->pbase + (size_t)i * ENG_PBUF_SMALL, ENG_PBUF_SMALL,
                              (unsigned short)i, io_uring_buf_ring_mask(ENG_RING_BUFS), i);
    io_uring_buf_ring_advance(u->br, ENG_RING_BUFS);
}

static void ur_ring_fini(struct eng_uring *u)
{
    if (u->br == NULL)
        return;
    munmap(u->pbase, (size_t)ENG_RING_BUFS * ENG_PBUF_SMALL);
    munmap(u->br, u->brlen);
    u->br = NULL;
    u->pbase = NULL;
}

/* A ring buffer goes back to the kernel. */
static bool ur_recycle(struct eng *e, void *buf)
{
    struct eng_uring *u = ur(e);
    uint8_t *p = buf;
    size_t off;

    if (u->br == NULL || p < u->pbase || p >= u->pbase + (size_t)ENG_RING_BUFS * ENG_PBUF_SMALL)
        return false;
    off = (size_t)(p - u->pbase);
    ENG_BUG_ON(off % ENG_PBUF_SMALL != 0); /* not the pointer the engine gave */
    io_uring_buf_ring_add(u->br, p, ENG_PBUF_SMALL, (unsigned short)(off / ENG_PBUF_SMALL),
                          io_uring_buf_ring_mask(ENG_RING_BUFS), 0);
    io_uring_buf_ring_advance(u->br, 1);
    return true;
}

static void ur_describe(struct eng_uring *u, char *why, size_t whylen)
{
    size_t off = (size_t)snprintf(why, whylen, "io_uring ok flags=");
    const char *sep = "";

    for (size_t i = 0; i < sizeof(ur_flag_names) / sizeof(ur_flag_names[0]); i++) {
        if ((u->flags & ur_flag_names[i].flag) && off < whylen) {
            off += (size_t)snprintf(why + off, whylen - off, "%s%s", sep, ur_flag_names[i].name);
            sep = ",";
        }
    }
    if (off < whylen)
        snprintf(why + off, whylen - off, "%s sq=%u cq=%u pbuf=%s", *sep ? "" : "none",
                 u->ring.sq.ring_entries, u->ring.cq.ring_entries,
                 u->br != NULL ? "ring" : "heap");
}

static int ur_init(struct eng *e, char *why, size_t whylen)
{
    struct eng_uring *u = ur(e);
    struct io_uring_params p;
    int rc = ur_refused(why, whylen);

    if (rc < 0)
        return rc;
    for (size_t i = 0; i < sizeof(ur_setups) / sizeof(ur_setups[0]); i++) {
        memset(&p, 0, sizeof(p));
        p.flags = ur_setups[i] | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
        p.cq_entries = UR_CQ_ENTRIES;
        rc = io_uring_queue_init_params(UR_SQ_ENTRIES, &u->ring, &p);
        if (rc != -EINVAL)
            break;
    }
    if (rc < 0) {
        snprintf(why, whylen, "io_uring refused: io_uring_setup: %s%s", strerror(-rc),
                 rc == -EPERM && sysctl_disabled() == 1 ? " (kernel.io_uring_disabled=1)" : "");
        return rc;
    }
    u->flags = p.flags;
    if (!(p.features & IORING_FEAT_FAST_POLL)) {
        /* Without it every idle socket op would hold an io-wq thread. */
        snprintf(why, whylen, "io_uring refused: kernel lacks IORING_FEAT_FAST_POLL");
        io_uring_queue_exit(&u->ring);
        return -EOPNOTSUPP;
    }
    rc = ur_check_ops(u, why, whylen);
    if (rc < 0) {
        io_uring_queue_exit(&u->ring);
        return rc;
    }
    CDS_INIT_LIST_HEAD(&u->cancels);
    u->multishot = true; /* falls back on the first EINVAL */
    /* Before the ring is enabled: no single issuer is bound yet. */
    ur_ring_init(u);
    ur_describe(u, why, whylen);
    return 0;
}

/* On the first turn, from the owner thread: it becomes the single issuer. */
static int ur_enable(struct eng_uring *u)
{
    if (u->flags & IORING_SETUP_R_DISABLED) {
        /* io_uring_enable_rings() is missing from liburing 2.3's shared
         * library exports; this is the same call. */
        int rc = io_uring_register(u->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        if (rc < 0)
            return rc;
    }
    /* Registered ring fds are per thread, hence here and not in init. */
    io_uring_register_ring_fd(&u->ring);
    u->enabled = true;
    return 0;
}

/* Called on the owner thread after its last turn: hand back everything the
 * kernel holds, so that no CQE (and no write into a buffer) comes later. */
static void ur_drain(struct eng_uring *u)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);

    if (sqe == NULL)
        return;
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, 0);
    for (int i = 0; i < 50 && u->inflight > 0; i++) {
        struct __kernel_timespec ts = { .tv_nsec = 20 * 1000 * 1000 };
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        int rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);

        io_uring_for_each_cqe(&u->ring, head, cqe) {
            struct eng_op *op = io_uring_cqe_get_data(cqe);
            n++;
            if (op == NULL || cqe->user_data == LIBURING_UDATA_TIMEOUT)
                continue;
            if (!(cqe->flags & IORING_CQE_F_MORE))
                u->inflight--;
            if (op->code == ENG_OP_ACCEPT && cqe->res >= 0)
                close(cqe->res); /* nobody will own it */
            if (op->code == ENG_OP_RECV_PICK && op->u.rd.buf != NULL) {
                eng_pool_recycle(&u->base, op->u.rd.buf); /* heap fallback */
                op->u.rd.buf = NULL;
            }
        }
        io_uring_cq_advance(&u->ring, n);
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
            break; /* e.g. -EEXIST: not the issuer thread */
    }
}

/* Closes still queued (the ring never got to them): close(2) now. */
static void ur_close_queued(struct eng_uring *u)
{
    for (size_t i = 0; i < u->nclose; i++)
        close(u->closes[i]);
    u->nclose = 0;
}

static void ur_fini(struct eng *e)
{
    struct eng_uring *u = ur(e);

    /* CANCEL_ANY is 5.19+; SINGLE_ISSUER (6.0) tells us we have it. */
    if (u->enabled && u->inflight > 0 && (u->flags & IORING_SETUP_SINGLE_ISSUER))
        ur_drain(u);
    io_uring_queue_exit(&u->ring);
    ur_ring_fini(u);
    ur_close_queued(u);
    free(u->closes);
    u->closes = NULL;
}

/* ---- Submission ------------------------------------------------------------ */

static struct io_uring_sqe *ur_sqe(struct eng_uring *u)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);

    if (sqe == NULL) {
        /* SQ full: push this part of the batch out and go on. */
        io_uring_submit(&u->ring);
        sqe = io_uring_get_sqe(&u->ring);
    }
    if (sqe != NULL)
        u->base.st.sqes++;
    return sqe;
}

static void ur_prep(struct eng_uring *u, struct eng_op *op, struct io_uring_sqe *sqe)
{
    switch (op->code) {
    case ENG_OP_ACCEPT:
        if (u->multishot)
            io_uring_prep_multishot_accept(sqe, op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        else
            io_uring_prep_accept(sqe, op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        break;
    case ENG_OP_RECV:
        io_uring_prep_recv(sqe, op->fd, op->u.rd.buf, op->u.rd.len, 0);
        break;
    case ENG_OP_READ:
        io_uring_prep_read(sqe, op->fd, op->u.rd.buf, (unsigned)op->u.rd.len, (__u64)-1);
        break;
    case ENG_OP_RECV_PICK:
        if (op->u.rd.buf != NULL) { /* heap fallback, see ur_pick_cqe */
            io_uring_prep_recv(sqe, op->fd, op->u.rd.buf, op->u.rd.len, 0);
            break;
        }
        io_uring_prep_recv(sqe, op->fd, NULL, op->u.rd.len, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = UR_BGID;
        /* A small pick is a connection that drained its socket last time
         * (a stream that fills its buffers reads big): arm the poll at
         * once instead of trying a recv that finds nothing. Ring buffers
         * mean 5.19+, which has the flag. */
        sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
        break;
    case ENG_OP_SEND:
        if (op->u.wr.iovcnt == 1) {
            io_uring_prep_send(sqe, op->fd, op->u.wr.iov->iov_base, op->u.wr.iov->iov_len,
                               MSG_NOSIGNAL | op->u.wr.flags);
        } else {
            memset(&op->u.wr.msg, 0, sizeof(op->u.wr.msg));
            op->u.wr.msg.msg_iov = op->u.wr.iov;
            op->u.wr.msg.msg_iovlen = (size_t)(op->u.wr.iovcnt > IOV_MAX ? IOV_MAX : op->u.wr.iovcnt);
            io_uring_prep_sendmsg(sqe, op->fd, &op->u.wr.msg, MSG_NOSIGNAL | (unsigned)op->u.wr.flags);
        }
        break;
    case ENG_OP_SPLICE:
        /* Not ready at the last try: wait for the socket, then try again. */
        io_uring_prep_poll_add(sqe, op->fd,
                               op->u.spl.dir == ENG_SPLICE_IN ? POLLIN | POLLRDHUP : POLLOUT);
        break;
    case ENG_OP_CONNECT:
        io_uring_prep_connect(sqe, op->fd, &op->u.conn.to.sa, op->u.conn.tolen);
        break;
    default:
        ENG_BUG_ON(1);
    }
    io_uring_sqe_set_data(sqe, op);
}

/* SQEs for everything started, then for the cancels. */
static void ur_flush(struct eng_uring *u)
{
    struct eng *e = &u->base;
    struct io_uring_sqe *sqe;

    while (!cds_list_empty(&e->pending)) {
        struct eng_op *op = cds_list_first_entry(&e->pending, struct eng_op, link);
        int res;

        if (op->code == ENG_OP_SPLICE && eng_splice_run(e, op, &res)) {
            cds_list_del(&op->link);
            eng_finish_later(e, op, res);
            continue;
        }
        if ((sqe = ur_sqe(u)) == NULL)
            break;
        cds_list_del(&op->link);
        /* Big picks (a busy stream) and picks without a ring take their
         * buffer now. */
        if (op->code == ENG_OP_RECV_PICK && op->u.rd.buf == NULL &&
            (u->br == NULL || eng_pclass_of(op->u.rd.len) == ENG_PC_BIG) &&
            (op->u.rd.buf = eng_pool_get(e, eng_pclass_of(op->u.rd.len))) == NULL) {
            /* No memory: the SQE is left unused (a NOP). */
            io_uring_prep_nop(sqe);
            io_uring_sqe_set_data64(sqe, 0);
            eng_finish_later(e, op, -ENOMEM);
            continue;
        }
        ur_prep(u, op, sqe);
        op->state = ENG_OS_ACTIVE;
        u->inflight++;
    }
    for (size_t i = 0; i < u->nclose; i++) {
        if ((sqe = ur_sqe(u)) == NULL) {
            close(u->closes[i]); /* SQ full even after a submit */
            continue;
        }
        io_uring_prep_close(sqe, u->closes[i]);
        io_uring_sqe_set_data64(sqe, 0);
        if (u->ring.features & IORING_FEAT_CQE_SKIP)
            sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    }
    u->nclose = 0;
    while (!cds_list_empty(&u->cancels) && (sqe = ur_sqe(u)) != NULL) {
        struct eng_op *op = cds_list_first_entry(&u->cancels, struct eng_op, link);
        cds_list_del(&op->link);
        op->flags &= (uint8_t)~ENG_OF_CANCEL_Q;
        io_uring_prep_cancel64(sqe, (__u64)(uintptr_t)op, 0);
        io_uring_sqe_set_data64(sqe, 0);
        if (u->ring.features & IORING_FEAT_CQE_SKIP)
            sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    }
}

/* ---- Completion ------------------------------------------------------------ */

static void ur_finish(struct eng_uring *u, struct eng_op *op, int res)
{
    if (op->flags & ENG_OF_CANCEL_Q)
        cds_list_del(&op->link); /* finished before its cancel SQE was made */
    op->flags = 0;
    eng_complete(&u->base, op, res);
}

/* A retryable result: again, unless the caller asked us to stop. */
static void ur_retry(struct eng_uring *u, struct eng_op *op)
{
    if (op->flags & ENG_OF_CANCEL)
        ur_finish(u, op, -ECANCELED);
    else
        eng_requeue(&u->base, op);
}

static void ur_simple_cqe(struct eng_uring *u, struct eng_op *op, int res)
{
    if (eng_verdict(op, res) == ENG_V_RETRY)
        ur_retry(u, op);
    else
        ur_finish(u, op, res);
}

static void ur_send_cqe(struct eng_uring *u, struct eng_op *op, int res)
{
    if (res > 0) {
        if (eng_send_advance(op, (size_t)res) == 0) {
            ur_finish(u, op, (int)op->u.wr.total);
            return;
        }
        u->base.st.send_partial++;
        ur_retry(u, op);
        return;
    }
    /* A stream send of > 0 bytes never returns 0; if it did, retrying
     * could spin, so it is reported as an I/O error. */
    if (res == 0)
        res = -EIO;
    ur_simple_cqe(u, op, res);
}

/* A picked recv: a ring buffer is the caller's with res > 0 and goes
 * straight back otherwise; ENOBUFS (ring empty) retries into a heap
 * buffer, so a burst of completions never fails a connection. */
static void ur_pick_cqe(struct eng_uring *u, struct eng_op *op, int res, unsigned flags)
{
    struct eng *e = &u->base;

    if (flags & IORING_CQE_F_BUFFER) {
        uint8_t *b = u->pbase + (size_t)(flags >> IORING_CQE_BUFFER_SHIFT) * ENG_PBUF_SMALL;
        if (res > 0) {
            op->u.rd.buf = b;
            e->st.pbuf_ring++;
            ur_finish(u, op, res);
            return;
        }
        ur_recycle(e, b);
    }
    if (res == -ENOBUFS && op->u.rd.buf == NULL) {
        e->st.pbuf_nobufs++;
        if (op->flags & ENG_OF_CANCEL) {
            ur_finish(u, op, -ECANCELED);
            return;
        }
        op->u.rd.buf = eng_pool_get(e, ENG_PC_SMALL);
        if (op->u.rd.buf == NULL) {
            ur_finish(u, op, -ENOMEM);
            return;
        }
        eng_requeue(e, op);
        return;
    }
    if (res > 0)
        e->st.pbuf_heap++;
    ur_simple_cqe(u, op, res);
}

/* The socket of a splice op became ready (or the poll failed). */
static void ur_splice_cqe(struct eng_uring *u, struct eng_op *op, int res)
{
    if (op->flags & ENG_OF_CANCEL) {
        ur_finish(u, op, -ECANCELED);
        return;
    }
    if (res < 0) {
        ur_finish(u, op, res);
        return;
    }
    if (eng_splice_run(&u->base, op, &res))
        ur_finish(u, op, res);
    else
        eng_requeue(&u->base, op); /* spurious: poll again */
}

static bool peer_of(int fd, struct net_addr *a)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    if (getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
        return false;
    addr_from_sockaddr(a, (struct sockaddr *)&ss);
    return true;
}

static void ur_accept_ok(struct eng_uring *u, struct eng_op *op, int fd, bool more)
{
    struct eng *e = &u->base;

    if (op->flags & ENG_OF_CANCEL) {
        /* Accepted while being cancelled: the caller asked for no more. */
        close(fd);
        e->st.accept_dropped++;
        if (!more)
            ur_finish(u, op, -ECANCELED);
        return;
    }
    if (!more)
        eng_requeue(e, op); /* multishot ended or single-shot: re-arm first */
    if (!peer_of(fd, &op->u.acc.peer)) {
        /* Multishot accept cannot carry one address per CQE, so ask; if
         * the peer is already gone, so is the connection. */
        close(fd);
        e->st.accept_dropped++;
        return;
    }
    eng_accept_deliver(e, op, fd);
}

static void ur_accept_cqe(struct eng_uring *u, struct eng_op *op, int res, bool more)
{
    struct eng *e = &u->base;

    if (res >= 0) {
        ur_accept_ok(u, op, res, more);
        return;
    }
    if (more) { /* an error that did not end the multishot: nothing to do */
        e->st.accept_dropped++;
        return;
    }
    if (res == -EINVAL && u->multishot && !(op->flags & ENG_OF_CANCEL)) {
        u->multishot = false; /* kernel < 5.19: single-shot from now on */
        eng_requeue(e, op);
        return;
    }
    switch (eng_verdict(op, res)) {
    case ENG_V_RETRY:
        if (res != -EAGAIN && res != -EINTR)
            e->st.accept_dropped++;
        ur_retry(u, op);
        break;
    case ENG_V_PAUSE:
        if (op->flags & ENG_OF_CANCEL) {
            ur_finish(u, op, -ECANCELED);
        } else {
            op->flags = 0;
            eng_accept_pause(e, op, res);
        }
        break;
    default:
        ur_finish(u, op, res);
        break;
    }
}

static void ur_cqe(struct eng_uring *u, const struct io_uring_cqe *cqe)
{
    struct eng_op *op = io_uring_cqe_get_data(cqe);
    bool more = cqe->flags & IORING_CQE_F_MORE;

    if (op == NULL || cqe->user_data == LIBURING_UDATA_TIMEOUT)
        return;
    if (!more)
        u->inflight--;
    switch (op->code) {
    case ENG_OP_ACCEPT:
        ur_accept_cqe(u, op, cqe->res, more);
        break;
    case ENG_OP_SEND:
        ur_send_cqe(u, op, cqe->res);
        break;
    case ENG_OP_RECV_PICK:
        ur_pick_cqe(u, op, cqe->res, cqe->flags);
        break;
    case ENG_OP_SPLICE:
        ur_splice_cqe(u, op, cqe->res);
        break;
    default:
        ur_simple_cqe(u, op, cqe->res);
        break;
    }
}

static int ur_poll(struct eng *e, int timeout_ms)
{
    struct eng_uring *u = ur(e);
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    int rc;

    if (!u->enabled && (rc = ur_enable(u)) < 0)
        return rc;
    ur_flush(u);
    if (!cds_list_empty(&e->pending) || !cds_list_empty(&u->cancels))
        timeout_ms = 0; /* SQ was full: finish the batch next turn */
    if (!cds_list_empty(&e->done))
        timeout_ms = 0; /* a splice finished at its first try */
    if (timeout_ms == 0) {
        /* GETEVENTS even without waiting: DEFER_TASKRUN completions only
         * run inside io_uring_enter. */
        rc = io_uring_submit_and_get_events(&u->ring);
    } else if (timeout_ms < 0) {
        rc = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        struct __kernel_timespec ts = {
            .tv_sec = timeout_ms / 1000,
            .tv_nsec = (long long)(timeout_ms % 1000) * 1000000,
        };
        rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    e->st.polls++;
    e->now = timer_clock_ms();
    /* Callbacks may start or cancel ops (lists only), never touch the ring,
     * so running them inside the CQ walk is safe. */
    io_uring_for_each_cqe(&u->ring, head, cqe) {
        n++;
        ur_cqe(u, cqe);
    }
    io_uring_cq_advance(&u->ring, n);
    if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
        return rc;
    return 0;
}

static void ur_cancel(struct eng *e, struct eng_op *op)
{
    struct eng_uring *u = ur(e);

    if (op->flags & ENG_OF_CANCEL)
        return;
    op->flags |= ENG_OF_CANCEL | ENG_OF_CANCEL_Q;
    cds_list_add_tail(&op->link, &u->cancels);
}

/* Queue fd for the next turn's batch (see the top of the file). */
static bool ur_close_later(struct eng_uring *u, int fd)
{
    if (!u->enabled || !u->op_close)
        return false;
    if (u->nclose == u->capclose) {
        size_t n = u->capclose ? u->capclose * 2 : 64;
        int *v = realloc(u->closes, n * sizeof(*v));
        if (v == NULL)
            return false;
        u->closes = v;
        u->capclose = n;
    }
    u->closes[u->nclose++] = fd;
    return true;
}

static void ur_forget(struct eng *e, int fd, bool close_it)
{
    if (close_it && !ur_close_later(ur(e), fd))
        close(fd);
}

const struct eng_backend eng_uring_backend = {
    .kind = ENG_URING,
    .name = "io_uring",
    .size = sizeof(struct eng_uring),
    .init = ur_init,
    .fini = ur_fini,
    .poll = ur_poll,
    .cancel = ur_cancel,
    .forget = ur_forget,
    .recycle = ur_recycle,
};
