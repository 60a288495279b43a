/* io/eng.h - the I/O engine: one completion-shaped event loop per shard.
 *
 * One interface, two engines: io_uring (liburing) and an epoll emulation.
 * Both pass the same conformance suite (tests/unit/test_eng.c).
 *
 * ---- Model -----------------------------------------------------------------
 * "Receive into / send from this, call me back" (h2o style), never "tell me
 * when readable". The caller embeds a struct eng_op in its own object,
 * initialises it once with eng_op_init(op, cb), and starts operations on it.
 * Each started operation calls back exactly once with
 *
 *     op->cb(op, res)        res >= 0: success;  res < 0: -errno
 *
 * except eng_accept, which calls back once per accepted connection (and
 * once per resource error such as EMFILE) with op->more == true while it
 * stays armed, and a last time with op->more == false (after eng_cancel,
 * or on a fatal error).
 *
 *  - EAGAIN and EINTR never reach a callback: the engine retries them.
 *  - Callbacks run only from eng_run_once(), after the engine has polled.
 *    Starting, cancelling or re-arming an operation never runs a callback,
 *    even when it fails at once (bad fd, bad arguments): that result is
 *    queued and delivered in the next turn. So submitting never re-enters
 *    the caller.
 *  - Inside a callback the op is idle again (except an armed accept) and may
 *    be restarted, or its object torn down (see Ownership).
 *  - The engine never allocates per operation. What grows with load is a
 *    per-engine table indexed by fd and, on epoll, the list of fds to
 *    register (on io_uring, the queue of fds to close next turn; all
 *    amortised, all kept), and the pools of picked receive buffers
 *    (eng_recv_pick; a bounded number of spares is kept).
 *
 * ---- Ownership (the rule every caller must keep) ----------------------------
 *  - Buffers and iovec arrays passed to an operation are BORROWED until its
 *    callback runs: keep them alive and unmodified until then.
 *  - A picked buffer (eng_recv_pick, eng_buf_get) is the caller's from the
 *    callback on and goes back with eng_buf_put(); a ring buffer held for
 *    long shrinks the ring of every connection of the engine (they fall
 *    back to heap buffers), so hold them only until the data is forwarded.
 *  - An object that embeds ops may be freed only after EVERY op it started
 *    has called back. To tear down: eng_cancel() each op in flight, wait for
 *    their callbacks (each runs exactly once, with -ECANCELED or with its
 *    real result if it had already finished), then eng_close() the fd and
 *    free the object, typically from an eng_defer() callback so that nothing
 *    dispatched later in the same turn can still see it.
 *  - Never close(2) an fd that has an op in flight (io_uring keeps using the
 *    file; epoll would lose the op). Close fds with eng_close() (or hand
 *    them to another shard with eng_detach()); both require that no op is
 *    in flight on that fd (checked: abort on violation).
 *  - Timers (struct timer, io/timer.h) and deferred calls (struct eng_defer)
 *    are embedded too and borrowed while armed/queued.
 *  - All functions are for the owner thread only, the one that runs
 *    eng_run_once(). Other threads talk to it through io/mbox.h.
 *
 * ---- Operations and their rules ---------------------------------------------
 *  - Sockets and fds must be O_NONBLOCK (io/sock.h makes them so).
 *  - At most one read-side op (accept, recv, read) and one write-side op
 *    (send, connect) in flight per fd. A second one fails with -EBUSY
 *    (counted in eng_stats.busy): two sends in flight on one TCP socket
 *    could be reordered, so the engine refuses rather than guesses. Queue
 *    further frames in the caller until the send calls back.
 *  - eng_send completes only when every byte of every iovec is written
 *    (res = total) or on error; short writes are continued by the engine,
 *    which advances the caller's iovec array IN PLACE (its contents are
 *    undefined after the callback). Total must be 1..INT_MAX bytes.
 *  - eng_send is for sockets (sendmsg, MSG_NOSIGNAL); eng_read for
 *    anything read(2) takes (eventfd, pipe).
 *  - Starting an op that is already in flight is a caller bug: abort().
 *
 * ---- Failure policy, per op (one table: eng.c policy[]) ---------------------
 *   op        result                          engine                  caller
 *   any       EAGAIN, EINTR                   retried, never reported  -
 *   any       ECANCELED                       after eng_cancel         expected at teardown
 *   any       EBADF, EINVAL (len 0, iovcnt<1,
 *             total>INT_MAX), EBUSY (2nd op)  reported                 bug: close + log
 *   accept    fd >= 0                         delivered, stays armed   owns the fd
 *   accept    ECONNABORTED EPROTO EPERM
 *             ENETDOWN ENETUNREACH EHOSTDOWN
 *             EHOSTUNREACH ENONET ENOPROTOOPT
 *             EOPNOTSUPP ETIMEDOUT            swallowed, counted
 *                                             (accept_dropped), keeps
 *                                             accepting (accept(2) NOTES)
 *   accept    EMFILE ENFILE ENOBUFS ENOMEM    reported with more=true,
 *                                             then the listener pauses
 *                                             ENG_ACCEPT_PAUSE_MS and
 *                                             retries: no spinning    log (rate-limited)
 *   accept    anything else                   final (more=false)      close listener
 *   recv/read 0                               EOF                      half-close
 *   recv/send/connect other -errno            reported                 close the connection
 *   pick      ENOBUFS (io_uring ring empty)   resubmitted with a heap  -
 *                                             buffer (never reported)
 *
 * ---- Engines ----------------------------------------------------------------
 * eng_new(ENG_AUTO) tries io_uring, then epoll. io_uring is skipped when the
 * environment variable SNITUN_IO_URING_DISABLE=1 is set (tests and operators
 * use it to force the fallback), when /proc/sys/kernel/io_uring_disabled is
 * 2, or when io_uring_setup fails (ENOSYS: old kernel or seccomp; EPERM:
 * seccomp or io_uring_disabled=1 without privilege; EACCES...), or the kernel
 * lacks an opcode or IORING_FEAT_FAST_POLL. eng_new() logs one line
 * (core/log.h) "msg=\"io engine\" engine=epoll reason=\"...\"", at warn
 * level when ENG_AUTO fell back, else info; eng_reason()/eng_describe()
 * give the same text to callers.
 *
 * io_uring: flags SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN|SUBMIT_ALL, fewer
 * on EINVAL (older kernels). The ring is created disabled and enabled by the
 * first eng_run_once(), so the thread that runs the loop, not the one that
 * created the engine, becomes its single issuer. One io_uring_enter per
 * turn submits everything started in the previous turn and waits (timers
 * via the wait timeout); CQEs are reaped as a batch. Accept is multishot
 * (single-shot fallback on old kernels); the peer address comes from
 * getpeername(). Short sends are resubmitted. eng_read relies on the
 * kernel polling a pollable O_NONBLOCK fd instead of failing with EAGAIN
 * (true on the 6.x kernels that pass the setup flags above; on older ones
 * such a read would be retried every turn).
 *   A small eng_recv_pick uses a provided buffer ring (one group per
 *   engine, ENG_RING_BUFS buffers of ENG_PBUF_SMALL, registered by
 *   eng_new; kernels without it use heap buffers held while the recv
 *   waits): the recv SQE carries IOSQE_BUFFER_SELECT and the kernel picks
 *   a buffer only when data arrives, so an idle connection holds none. A
 *   picked buffer goes back to the ring when the caller puts it. An empty
 *   ring completes the recv with ENOBUFS: the engine then resubmits that
 *   one recv into a heap buffer (held while it waits: the old cost, only
 *   under a burst of more than ENG_RING_BUFS completions in one turn or
 *   while callers hold ring buffers), counted in pbuf_nobufs. The ring is
 *   FIFO, so its buffers are cold; big picks use the LIFO heap pool.
 *   A small pick's SQE carries IORING_RECVSEND_POLL_FIRST: a caller reads
 *   small after a read that drained the socket, so the kernel arms its
 *   poll at once rather than first trying a recv that finds nothing.
 *   eng_splice does NOT use IORING_OP_SPLICE: the kernel always runs that
 *   in a blocking io-wq worker, which a splice from an idle socket would
 *   hold. It tries splice(SPLICE_F_NONBLOCK) when the op is started and,
 *   on EAGAIN, waits with a single-shot IORING_OP_POLL_ADD on the socket,
 *   then tries again: the epoll engine's scheme on io_uring's poller.
 *
 * epoll: emulates completions. Started ops go on a pending list; each turn,
 * after epoll_wait, every pending op tries its syscall once (optimistic: a
 * recv often finds data already there). On EAGAIN the op parks on its fd,
 * and fds parked for the first time are registered in one pass before the
 * next epoll_wait. Edge-triggered (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET),
 * registered once per fd lifetime and never modified: an edge re-queues
 * the parked ops of that fd, which retry. Because every op tries first
 * and parks only on EAGAIN, an edge is never lost; an idle direction costs
 * at most a spurious wakeup, never a syscall. eng_close() forgets the fd.
 *
 * ---- Loop turn --------------------------------------------------------------
 * eng_run_once: submit/attempt what was started -> poll (at most `timeout`,
 * less if a timer is due, zero if work is queued) -> completion callbacks
 * -> expired timers (deadline order, FIFO on ties) -> deferred calls (FIFO;
 * a defer queued by a defer callback runs in the same turn).
 */
#ifndef IO_ENG_H
#define IO_ENG_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <urcu/list.h>

#include "core/addr.h"
#include "io/timer.h"

/* Engine-picked receive buffers (eng_recv_pick) come in two classes, both
 * jemalloc size classes: small for connections that may idle (io_uring:
 * from a provided ring, so a waiting recv holds nothing), big for streams
 * that just filled a buffer (a heap buffer taken when the recv starts,
 * reused LIFO so it is still in cache: on loopback a 256 KiB read+write
 * costs ~0.38 CPU-s/GiB against ~0.55 in 64 KiB steps). */
#define ENG_PBUF_SMALL (64u << 10)
#define ENG_PBUF_BIG (256u << 10)
/* io_uring: small buffers in the provided ring of each engine (a power of
 * 2): 4 MiB of virtual memory, resident as the kernel first writes it. */
#define ENG_RING_BUFS 64
/* Spare heap buffers kept per engine and class; more are freed when put. */
#define ENG_PBUF_SPARE_SMALL 32
#define ENG_PBUF_SPARE_BIG 8

/* How long a listener rests after EMFILE/ENFILE/ENOBUFS/ENOMEM. */
#define ENG_ACCEPT_PAUSE_MS 100
/* Connections accepted per listener per turn by the epoll engine. */
#define ENG_ACCEPT_BATCH 64

enum eng_kind {
    ENG_AUTO = 0, /* io_uring if the kernel lets us, else epoll */
    ENG_URING,
    ENG_EPOLL,
};

struct eng;
struct eng_op;

typedef void eng_cb(struct eng_op *op, int res);

/* The embedded operation. Public fields: cb (set by eng_op_init) and
 * more (read it in an accept callback); the rest is the engine's. */
struct eng_op {
    eng_cb *cb;
    bool more; /* accept: true while the op stays armed */
    /* private */
    uint8_t code;  /* enum eng_opcode (eng_impl.h) */
    uint8_t state; /* enum eng_opstate */
    uint8_t flags;
    int fd;
    int res;
    struct eng *eng;
    struct cds_list_head link;
    union {
        struct {
            void *buf;
            size_t len;
        } rd; /* recv, read */
        struct {
            struct iovec *iov;
            int iovcnt;
            int flags; /* MSG_MORE or 0 */
            size_t left, total;
            struct msghdr msg; /* io_uring sendmsg */
        } wr; /* send */
        struct {
            int pfd;
            uint8_t dir;  /* enum eng_splice_dir */
            size_t len, left;
        } spl; /* splice */
        struct {
            union {
                struct sockaddr sa;
                struct sockaddr_in in;
                struct sockaddr_in6 in6;
            } to;
            socklen_t tolen;
        } conn; /* connect */
        struct {
            struct net_addr peer;
        } acc; /* accept */
    } u;
};

/* A call to run at the end of the current (or next) loop turn. */
struct eng_defer {
    void (*cb)(struct eng_defer *d);
    struct eng_defer *next; /* private */
    bool queued;            /* private */
};

/* Counters, plain uint64_t bumped by the owner thread; read them from the
 * owner (or sum per shard at scrape time) via eng_stats(). */
struct eng_stats {
    uint64_t turns;          /* eng_run_once calls */
    uint64_t polls;          /* epoll_wait / io_uring_enter(GETEVENTS) */
    uint64_t submitted;      /* ops started by callers */
    uint64_t completed;      /* op callbacks run (one per accepted fd too) */
    uint64_t cancelled;      /* eng_cancel that hit an op in flight */
    uint64_t sqes;           /* io_uring SQEs prepared (ops + cancels) */
    uint64_t ctl;            /* epoll_ctl calls */
    uint64_t send_partial;   /* short writes continued by the engine */
    uint64_t accept_paused;  /* listener pauses (EMFILE & co) */
    uint64_t accept_dropped; /* connections lost in accept (see policy) */
    uint64_t busy;           /* second op on one fd direction, -EBUSY */
    uint64_t timers;         /* timer callbacks run */
    uint64_t defers;         /* deferred callbacks run */
    uint64_t pbuf_ring;      /* eng_recv_pick results in a ring buffer */
    uint64_t pbuf_heap;      /* ... in a heap-pool buffer (small or big) */
    uint64_t pbuf_nobufs;    /* io_uring: ring empty, recv resubmitted with a
                                heap buffer */
    uint64_t pbuf_lent;      /* buffers callers hold now (picked results and
                                eng_buf_get, minus eng_buf_put): 0 when
                                every owner gave its buffers back */
    uint64_t splices;        /* splice(2) calls that moved bytes */
    uint64_t pipes_made;     /* pipes made by eng_pipe_get */
};

/* ---- Lifetime ---- */

/* A new engine of kind `want` (ENG_AUTO: io_uring, falling back to epoll),
 * announced with one log line. Returns NULL when the requested engine
 * cannot run, with the reason in err (always NUL-terminated when
 * errlen > 0); ENG_AUTO fails only when epoll fails too. Call it on any
 * thread; the first eng_run_once() binds the engine to its thread. */
struct eng *eng_new(enum eng_kind want, char *err, size_t errlen);

/* Frees the engine. Ops still in flight are abandoned WITHOUT callbacks
 * (io_uring: cancelled and reaped first, so the kernel no longer touches
 * their buffers after this returns); timers and defers are dropped. Call
 * it on the owner thread, never from a callback. NULL is ignored. */
void eng_free(struct eng *e);

/* ENG_URING or ENG_EPOLL: what actually runs. */
enum eng_kind eng_kind(const struct eng *e);

/* "io_uring" or "epoll". */
const char *eng_name(const struct eng *e);

/* Why this engine runs, e.g. "io_uring ok flags=single_issuer,..." or
 * "io_uring refused: SNITUN_IO_URING_DISABLE=1". Owned by the engine. */
const char *eng_reason(const struct eng *e);

/* "engine=epoll reason=\"...\"" into buf, for the startup log line. */
const char *eng_describe(const struct eng *e, char *buf, size_t len);

/* ---- The loop ---- */

/* One turn (see "Loop turn" above). timeout_ms: -1 waits until something
 * happens, 0 polls, > 0 waits at most that long. Returns the number of
 * callbacks run (ops, timers, defers), or -errno if polling failed in a
 * way that will not fix itself (the engine is then unusable). Never call it
 * from a callback. */
int eng_run_once(struct eng *e, int timeout_ms);

/* Turns until eng_stop(); returns 0, or -errno as eng_run_once. */
int eng_run(struct eng *e);

/* Make eng_run() return after the current turn. Owner thread only; from
 * another thread post a mailbox message that calls it. */
void eng_stop(struct eng *e);
bool eng_stopped(const struct eng *e);

/* Millisecond clock of the current turn (timer_clock_ms() at poll return). */
uint64_t eng_now(const struct eng *e);

const struct eng_stats *eng_stats(const struct eng *e);

/* ---- Operations ---- */

/* Make op idle with callback cb. Call once before the first use, never on
 * an op in flight. */
static inline void eng_op_init(struct eng_op *op, eng_cb *cb)
{
    *op = (struct eng_op){ .cb = cb, .fd = -1 };
}

/* Accept connections on listening socket lfd until cancelled: one callback
 * per connection with res = new fd (O_NONBLOCK, O_CLOEXEC; the callback
 * owns it) and op->more = true; the peer address is eng_accept_peer(op),
 * valid during that callback. Errors: see the policy table. */
void eng_accept(struct eng *e, struct eng_op *op, int lfd);

static inline const struct net_addr *eng_accept_peer(const struct eng_op *op)
{
    return &op->u.acc.peer;
}

/* recv(2) into buf (borrowed): res = bytes (1..len), 0 = EOF, or -errno.
 * len must be 1..INT_MAX (larger is clamped). */
void eng_recv(struct eng *e, struct eng_op *op, int fd, void *buf, size_t len);

/* recv(2) right now, without an op and without waiting: for a caller
 * that expects the bytes to be there already (a connection just accepted:
 * the client spoke first) and would otherwise spend a loop turn arming a
 * recv that completes at once. res: bytes (1..len), 0 = EOF, -EAGAIN when
 * nothing is there yet (then start eng_recv), or -errno. No read-side op
 * may be in flight on fd (abort). len 1..INT_MAX. */
int eng_try_recv(struct eng *e, int fd, void *buf, size_t len);

/* recv(2) of at most len bytes into a buffer the ENGINE picks. len up to
 * ENG_PBUF_SMALL: a small buffer picked when data is there (io_uring:
 * provided buffer ring; epoll: its pool, after readiness), so an idle
 * connection holds none. len above (clamped to ENG_PBUF_BIG): a big buffer
 * (epoll: picked after readiness too; io_uring: taken from the pool when
 * the recv starts), for a stream whose last read filled its buffer. res
 * as eng_recv. When res > 0 the callback TAKES OWNERSHIP of eng_op_buf(op)
 * (the data at its start) and gives it back with eng_buf_put(), in the
 * callback or later, before eng_free(). With res <= 0 there is no buffer. */
void eng_recv_pick(struct eng *e, struct eng_op *op, int fd, size_t len);

/* The buffer of a picked recv; valid in its callback when res > 0. */
static inline uint8_t *eng_op_buf(const struct eng_op *op)
{
    return (uint8_t *)op->u.rd.buf;
}

/* A buffer of at least len bytes (1..ENG_PBUF_BIG) from the engine's heap
 * pool (never a ring buffer), for a caller that needs one of its own; NULL
 * when out of memory or len is out of range. Give it back with
 * eng_buf_put(). */
uint8_t *eng_buf_get(struct eng *e, size_t len);

/* Give back a buffer from eng_op_buf() or eng_buf_get(): the pointer as
 * it was returned, to the engine it came from. */
void eng_buf_put(struct eng *e, void *buf);

/* read(2) into buf, for non-sockets (eventfd, pipe); as eng_recv. */
void eng_read(struct eng *e, struct eng_op *op, int fd, void *buf, size_t len);

/* Write all of iov[0..iovcnt) (array and buffers borrowed; the array is
 * advanced in place). res = total bytes, or -errno (EPIPE, ECONNRESET...;
 * never SIGPIPE). */
void eng_send(struct eng *e, struct eng_op *op, int fd, struct iovec *iov, int iovcnt);

/* eng_send with MSG_MORE: the kernel may hold back a partial segment for
 * the next send or splice on fd (a frame header before its spliced
 * payload, on a TCP_NODELAY socket). */
void eng_send_more(struct eng *e, struct eng_op *op, int fd, struct iovec *iov, int iovcnt);

/* ---- Splice: socket <-> pipe, the bytes never cross user memory ---- */

/* Pipe size asked for by eng_pipe_get (the default pipe-max-size). */
#define ENG_PIPE_SIZE (1u << 20)

enum eng_splice_dir {
    ENG_SPLICE_IN = 1,      /* socket fd -> pipe pfd (write end): at most len
                               bytes; res = bytes (1..len), 0 = EOF, -errno.
                               Takes fd's read slot. The pipe must have room
                               for len bytes. */
    ENG_SPLICE_OUT = 2,     /* pipe pfd (read end) -> socket fd: all len
                               bytes, which the pipe must hold; res = len or
                               -errno. Takes fd's write slot. */
    ENG_SPLICE_OUT_TRY = 3, /* as OUT, but never waits for the socket: moves
                               what it takes now; res = bytes (0..len). */
};

/* splice(2) between socket fd and pipe pfd (see enum eng_splice_dir);
 * len 1..INT_MAX. Both engines splice with SPLICE_F_NONBLOCK and wait for
 * the socket's readiness on EAGAIN (see "Engines"), except ENG_SPLICE_IN
 * into a pipe that is out of slots while the socket holds bytes: that
 * completes with -EAGAIN, and the caller must empty the pipe first. */
void eng_splice(struct eng *e, struct eng_op *op, int fd, int pfd, size_t len,
                enum eng_splice_dir dir);

/* A pipe for eng_splice: p[0] read end, p[1] write end, both
 * O_NONBLOCK|O_CLOEXEC. Returns its capacity (ENG_PIPE_SIZE, or what the
 * kernel allowed: per-user pipe limits), or -errno. The caller owns it
 * until eng_pipe_put(). Callers take one per splice session (a stream
 * that stays bulky), not per payload, so pipes are not pooled: an idle
 * process holds no pipe fds. */
int eng_pipe_get(struct eng *e, int p[2]);

/* Close a pipe from eng_pipe_get (whatever it still holds is dropped). No
 * op may be in flight on either end. */
void eng_pipe_put(struct eng *e, const int p[2]);

/* Connect non-blocking socket fd to `to` (copied): res = 0 or -errno
 * (ECONNREFUSED, ETIMEDOUT, ENETUNREACH...). */
void eng_connect(struct eng *e, struct eng_op *op, int fd, const struct net_addr *to);

/* Ask op to stop. If it is in flight, its callback runs later exactly once,
 * with -ECANCELED or with its real result if it finished first (an accept:
 * no more connections are delivered, then one final callback with
 * more=false). An idle op, or one whose result is already queued, is left
 * alone (its callback is coming or has run). Never runs a callback itself. */
void eng_cancel(struct eng_op *op);

/* close(2) fd and forget its engine state. No op may be in flight on it.
 * io_uring: the close is queued and submitted with the next turn's batch
 * (IORING_OP_CLOSE, one syscall less per connection); until then the fd
 * number stays taken, so it cannot be reused early. eng_free() closes what
 * is still queued. epoll: at once. */
void eng_close(struct eng *e, int fd);

/* Forget fd without closing it (cross-shard handoff: the sender forgets,
 * the receiving shard starts ops on its own engine). No op in flight. */
void eng_detach(struct eng *e, int fd);

/* ---- Timers and deferred calls ---- */

/* Arm t (timer_init()ed) to fire delay_ms from now (inside a turn: from
 * eng_now(), so timers armed in one turn share a base); an armed t is
 * re-armed. The callback runs from eng_run_once; a timer armed with delay
 * 0 from a timer callback runs in the next turn, not in this one. */
void eng_timer_add(struct eng *e, struct timer *t, uint64_t delay_ms);

/* Disarm t; it will not fire. Disarming an idle timer is a no-op. */
void eng_timer_del(struct eng *e, struct timer *t);

/* Run cb(d) at the end of the current loop turn (or of the next turn when
 * called outside one), after all completions and timers: the place for
 * deferred frees. d is borrowed until then. Deferring a queued d again
 * only replaces its callback. FIFO. */
void eng_defer(struct eng *e, struct eng_defer *d, void (*cb)(struct eng_defer *d));

#endif
