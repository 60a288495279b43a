/* io/eng_impl.h - what eng.c shares with the two engines (private).
 *
 * eng.c owns everything both engines need: op bookkeeping (states below),
 * the pending and done lists, the per-fd slots (one read-side and one
 * write-side op per fd), timers, defers, the failure-policy table, and
 * engine selection. A backend (eng_uring.c, eng_epoll.c) supplies the
 * struct eng_backend hooks and calls back into eng.c to finish ops.
 *
 * Op states:
 *
 *   IDLE --start--> PENDING --(turn: SQE / attempt)--> ACTIVE --result--> IDLE
 *    ^                 | cancel          | retry/short send: back to PENDING
 *    |                 v                 | cancel: backend (uring: cancel SQE,
 *    +---callback---- DONE <-------------+         epoll: unpark -> DONE)
 *                      ^
 *   accept only:  ACTIVE --EMFILE..--> PAUSED --retry timer--> PENDING
 *                                        | cancel --> DONE
 *
 * Invariants: an op is on exactly one list while PENDING (e->pending),
 * DONE (e->done) or PAUSED (e->paused); while ACTIVE it is on none, except
 * the io_uring cancel queue. An op holds its fd slot from start until it
 * leaves flight (its final result is known). The callback always runs
 * with the op IDLE, or ACTIVE/PENDING/PAUSED with more=true (accept).
 * A RECV_PICK op holds no buffer while in flight (u.rd.buf NULL), except
 * on io_uring after ENOBUFS or without a ring (a heap-pool buffer); with a
 * result > 0 u.rd.buf is lent to the caller, with any other result the
 * engine recycles it before the callback (eng.c pick_settle).
 */
#ifndef IO_ENG_IMPL_H
#define IO_ENG_IMPL_H

#include "io/eng.h"

enum eng_opcode {
    ENG_OP_NONE = 0,
    ENG_OP_ACCEPT,
    ENG_OP_RECV,
    ENG_OP_READ,
    ENG_OP_SEND,
    ENG_OP_CONNECT,
    ENG_OP_RECV_PICK, /* recv into a buffer the engine picks (u.rd.buf) */
    ENG_OP_SPLICE,    /* u.spl; read or write slot by direction */
};

enum eng_opstate {
    ENG_OS_IDLE = 0,
    ENG_OS_PENDING,
    ENG_OS_ACTIVE,
    ENG_OS_DONE,
    ENG_OS_PAUSED,
};

/* op->flags, backend-private bits. */
enum {
    ENG_OF_PARKED = 1 << 0,   /* epoll: waiting for an edge */
    ENG_OF_STARTED = 1 << 1,  /* epoll: connect() in progress */
    ENG_OF_CANCEL = 1 << 2,   /* uring: cancel requested while in the kernel */
    ENG_OF_CANCEL_Q = 1 << 3, /* uring: on the cancel queue (SQE not yet made) */
};

/* What to do with a result (policy[] in eng.c). */
enum eng_verdict {
    ENG_V_DELIVER = 1, /* call back with it */
    ENG_V_RETRY,       /* swallow, try again (EAGAIN, EINTR, accept noise) */
    ENG_V_PAUSE,       /* accept: report, then rest (EMFILE & co) */
    ENG_V_FINAL,       /* accept: last callback, more=false */
};

struct eng_fdslot {
    struct eng_op *rd, *wr;
    uint32_t be; /* backend bits (epoll: registered) */
};

struct eng_backend {
    enum eng_kind kind;
    const char *name;
    size_t size; /* of the backend struct that starts with struct eng */
    /* 0, or -errno with a reason written to why */
    int (*init)(struct eng *e, char *why, size_t whylen);
    void (*fini)(struct eng *e);
    /* Submit/attempt e->pending, wait at most timeout_ms, run callbacks.
     * 0, or -errno for a fatal poll error. */
    int (*poll)(struct eng *e, int timeout_ms);
    /* op is ACTIVE: make it finish (now or later) with -ECANCELED. */
    void (*cancel)(struct eng *e, struct eng_op *op);
    /* fd is leaving the engine (no op in flight); close it if asked. */
    void (*forget)(struct eng *e, int fd, bool close_it);
    /* buf came back: take it if it is one of the backend's own (ring)
     * buffers and return true. NULL: the backend has none. */
    bool (*recycle)(struct eng *e, void *buf);
};

/* Spare heap buffers of one class, linked through their first bytes. */
struct eng_pool {
    void *free;
    size_t nfree;
};

/* Picked-buffer classes (eng.h ENG_PBUF_SMALL / ENG_PBUF_BIG). */
enum eng_pclass {
    ENG_PC_SMALL = 0,
    ENG_PC_BIG = 1,
};

static inline enum eng_pclass eng_pclass_of(size_t len)
{
    return len > ENG_PBUF_SMALL ? ENG_PC_BIG : ENG_PC_SMALL;
}

struct eng {
    const struct eng_backend *be;
    struct cds_list_head pending; /* started, to submit/attempt this turn */
    struct cds_list_head done;    /* result known, callback not yet run */
    struct cds_list_head paused;  /* accepts resting after EMFILE & co */
    struct timer accept_retry;
    struct timer_heap timers;
    struct eng_defer *defer_head, **defer_tail;
    struct eng_fdslot *slots;
    size_t nslots;
    uint64_t now;
    uint64_t callbacks; /* this turn, for eng_run_once's result */
    bool stopped;
    bool in_turn;
    struct eng_pool pool[2]; /* by enum eng_pclass */
    struct eng_stats st;
    char reason[192];
};

extern const struct eng_backend eng_uring_backend;
extern const struct eng_backend eng_epoll_backend;

/* Abort with a message: a broken invariant or caller contract, where going
 * on would corrupt memory. Enabled in release builds (HAProxy BUG_ON). */
#define ENG_BUG_ON(cond)                                   \
    do {                                                   \
        if (cond)                                          \
            eng_bug(#cond, __FILE__, __LINE__);            \
    } while (0)

_Noreturn void eng_bug(const char *what, const char *file, int line);

enum eng_verdict eng_verdict(const struct eng_op *op, int res);

/* The slot of fd; fd must be < e->nslots (true for any op in flight). */
static inline struct eng_fdslot *eng_slot(struct eng *e, int fd)
{
    return &e->slots[fd];
}

/* Final result now, from the poll phase: release the slot, make the op
 * IDLE, run the callback. */
void eng_complete(struct eng *e, struct eng_op *op, int res);

/* Final result, callback later in this turn (done list). */
void eng_finish_later(struct eng *e, struct eng_op *op, int res);

/* accept: hand over connection fd (more=true), op state unchanged. */
void eng_accept_deliver(struct eng *e, struct eng_op *op, int fd);

/* accept: report err with more=true and rest ENG_ACCEPT_PAUSE_MS. */
void eng_accept_pause(struct eng *e, struct eng_op *op, int err);

/* Back to the pending list (retry, short send, re-arm). */
void eng_requeue(struct eng *e, struct eng_op *op);

/* Nonblocking splice(2) steps of a splice op until it is finished (true,
 * its result in *res) or must wait for its socket (false: EAGAIN). */
bool eng_splice_run(struct eng *e, struct eng_op *op, int *res);

/* Advance a send's iovec by n written bytes; returns bytes still left. */
size_t eng_send_advance(struct eng_op *op, size_t n);

/* Heap-pool buffer of class pc (NULL: out of memory); not counted as
 * lent. */
void *eng_pool_get(struct eng *e, enum eng_pclass pc);

/* A buffer the engine holds goes back: to the backend's ring if it is a
 * ring buffer, else to the heap pool (or free() beyond the spares). */
void eng_pool_recycle(struct eng *e, void *buf);

#endif
