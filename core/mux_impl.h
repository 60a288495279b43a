/* core/mux_impl.h - what the multiplexer's files share. Not for use
 * outside core/mux*.c: everything else uses core/mux.h.
 *
 *   mux.c        names and defaults, channel lifetime (new, close, free),
 *                timers, tunnel lifetime (new, close, free), the API
 *   mux_tx.c     outgoing: local reads into DATA payloads, the ready list,
 *                control frames, batch building and the tunnel send
 *                (flush, tx_step, tx_done); the outgoing splice
 *   mux_rx.c     incoming: tunnel reads and the decoder, frame handlers
 *                (unknown and late ids, queue and tunnel limits), the
 *                incoming queue and the local writes that empty it
 *   mux_splice.c the incoming splice: tunnel -> the channel's own pipe
 *                (the tunnel's read) -> local socket (the channel's write)
 *   mux_queue.c  a channel's incoming byte queue (its own module)
 *
 * Prefixes: functions one file calls in another are mux_* (mux.c), mtx_*
 * (mux_tx.c), mrx_* (mux_rx.c), mspl_* (mux_splice.c); the static inline
 * helpers below are shared by several files and run per frame or per read.
 *
 * Channel states (c->closing, c->draining, c->fin_queued):
 *
 *   PENDING (client, fd < 0) --attach--> OPEN (fd >= 0)
 *      |                                   |
 *      +--------- mux_chan_end() ----------+
 *                      |
 *                      v
 *   CLOSING: out of the id table, local recv cancelled; CLOSE queued unless
 *      the peer closed or the tunnel is gone; DRAINING (peer CLOSE, local
 *      EOF) keeps writing its incoming pipe, then its queue, to the local
 *      socket first; otherwise both are dropped
 *                      |  no op in flight (nor the tunnel's splice into its
 *                      |  pipe), no DATA borrowed by a batch, nothing left
 *                      v  to send, pipe and queue written or dropped
 *   FIN (eng_defer): eng_close(fd), pipes closed, on_chan_closed, free.
 *
 * Tunnel: RUNNING --mux_close()--> CLOSING (SHUT_WR, ops cancelled, every
 * channel closed without CLOSE) --end of turn--> on_chan_closed for every
 * channel not yet reported, on_dead --all ops called back, all channels
 * freed--> FREE (eng_defer): eng_close(fd), streams freed.
 *
 * Invariants:
 * - One recv on the tunnel (m->rd_busy) and one send (m->tx_busy).
 * - A channel holds at most MUX_CHAN_OUT DATA payloads read from its local
 *   socket (out[], oldest first, engine buffers): the first out_tx are
 *   borrowed by the batch in flight, the others wait for the next batch.
 *   Its local recv is armed only when every payload it holds is in flight
 *   (so it reads ahead while the tunnel writes), there is room, and the
 *   peer has not paused it.
 * - The incoming queue's chunks are borrowed by the local send in flight
 *   (wr_busy); they are freed only from its callback or when it is idle.
 * - A channel's incoming bytes are its pipe's (ipipe.n), then its queue's:
 *   the queue only ever holds bytes that came after everything in the
 *   pipe, so the tunnel splices into the pipe only while the queue is
 *   empty. Once a channel has a pipe, its queue is moved into the pipe
 *   whenever there is room (one copy, as a send would be) and the socket
 *   is written from the pipe only (c->wr, one op): the queue then holds
 *   only what did not fit, and the tunnel splices again as soon as the
 *   pipe has room, not once a slow reader has caught up. An attach prefix
 *   goes before both (nothing is spliced while one is pending). Water
 *   marks and in_limit count both.
 * - Idle memory: a tunnel with nothing in flight holds no receive buffer
 *   (the engine picks one when data arrives and it goes back at the end of
 *   the callback, unless the decoder stalls: then the rest is copied), no
 *   decoder (taken while a frame is split across reads), no tx context
 *   (batch, control frames: taken while something is to be sent; both
 *   come from and go back to the group's spare slot, else the heap), and
 *   with no channel no cipher context either (tc_park, mux_park_if_quiet).
 * - Splice (see mux.h): a channel's spliced payloads wait in its own pipe
 *   in read order (out[] entries without a buffer; pipe.n counts their
 *   bytes); in a batch each is a placeholder iovec (&tx->mark) that
 *   tx_step sends with eng_splice from that pipe. Incoming, the tunnel's
 *   read splices into spl_c's ipipe (spl_c->spl_in: that channel is not
 *   freed, its pipe not closed, until it returns). The tunnel waits for a
 *   local writer only for its ONLY open channel (m->spl_wait: not read
 *   while that channel's pipe has no room or its queue holds bytes, at
 *   most MUX_SPLICE_WAIT_MS; never with several channels, never again
 *   for a channel whose wait timed out (spl_slow) until it holds
 *   nothing); the wait ends from the writer's callback or the tick, and
 *   the read resumes from start_d (never inside a mux_* call). Closing
 *   that channel or the tunnel ends it. Pipes are closed after use (ipipe: when its
 *   channel is freed or drops its bytes, or goes back to small payloads
 *   while empty), never handed to another stream.
 * - No channel or tunnel is freed outside an eng_defer callback; hooks
 *   never run inside a mux_* call (they run from op callbacks, timers and
 *   defers).
 */
#ifndef CORE_MUX_IMPL_H
#define CORE_MUX_IMPL_H

#include <search.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include <urcu/list.h>

#include "core/frame.h"
#include "core/mux.h"
#include "core/mux_queue.h"
#include "io/eng.h"

/* Queue chunks per local send (up to 384 KiB; 6 keeps struct mux_chan in
 * the 640-byte jemalloc class). */
#define MUX_WIOV 6
/* Mux-level frames (pong replies, pings, CLOSE for refused NEW) waiting for
 * the next batch; when full, reading the tunnel waits for the flush. */
#define MUX_CTL_MAX FRAME_BATCH_MAX
/* DATA payloads a channel holds: one in the batch in flight, one read
 * ahead meanwhile. */
#define MUX_CHAN_OUT 2
/* Longest the tunnel's read waits for its only channel's local writer to
 * free room in that channel's pipe: the added latency for PINGs (and
 * frames of a channel opened meanwhile) behind a slow local reader. */
#define MUX_SPLICE_WAIT_MS 20

enum ctl_kind {
    CTL_PONG = 1,  /* reply to a PING request */
    CTL_PING = 2,  /* our request */
    CTL_CLOSE = 3, /* CLOSE for an id we refused */
};

struct mux_ctl {
    uint8_t id[FRAME_ID_LEN];
    uint8_t kind;
};

/* One DATA payload read from a local socket. */
struct mux_out {
    uint8_t *buf;             /* NULL when spliced: the bytes wait in the
                                 channel's pipe */
    uint32_t len;
    bool heap;                /* malloc'd (a first DATA larger than an
                                 engine buffer), else from the engine */
};

/* A pipe for splicing (eng_pipe_get), fd[0] < 0 when none is held. */
struct mux_pipe {
    int fd[2];
    uint32_t cap;
    uint32_t n;               /* bytes in it */
};

struct mux_chan {
    uint8_t id[FRAME_ID_LEN]; /* first member: the tsearch key */
    struct mux *m;
    struct net_addr caller;
    int fd;                   /* local socket, -1 while PENDING */
    void *udata;
    enum mux_reason why;
    bool closing, draining, reported, fin_queued;
    bool wr_prefix;           /* the send in flight starts with prefix */
    bool wr_q;                /* ... and borrows queue chunks */
    /* outgoing */
    bool need_new, need_close, on_ready;
    bool peer_paused;         /* PAUSE received */
    bool under_water;         /* incoming above in_high, back at in_low */
    bool q_doomed;            /* queue dropped once its send returns */
    bool pause_sent;          /* what the peer was last told */
    bool rd_busy, wr_busy;
    bool rd_big;              /* last read filled its buffer: read big */
    bool rd_spl;              /* the read in flight splices into pipe */
    bool pipe_full;           /* pipe out of slots: copy until a batch
                                 takes bytes out of it */
    bool spl_in;              /* the tunnel's read splices into ipipe */
    bool ipipe_full;          /* ipipe out of slots: copy until the local
                                 writer takes bytes out of it */
    uint32_t rd_last;         /* bytes of the last local read */
    uint8_t out_n, out_tx;    /* payloads held; the first out_tx in flight */
    bool spl_slow;            /* a wait for its writer timed out: no
                                 wait again until it holds nothing */
    struct mux_out out[MUX_CHAN_OUT];
    struct mux_pipe pipe;     /* spliced payloads waiting for the tunnel */
    /* incoming */
    struct mux_pipe ipipe;    /* spliced payloads waiting for the local
                                 socket: written before the queue */
    struct mux_queue q;       /* ... then these (copied payloads) */
    uint8_t *prefix;          /* attach prefix, written first */
    size_t nprefix;
    uint64_t last_act;
    struct eng_op rd, wr;
    struct iovec wiov[MUX_WIOV + 1];
    struct cds_list_head all, ready;
    struct eng_defer fin;
};

/* What sending needs, allocated while there is something to send (the
 * batch alone is ~14 KiB: an idle tunnel does without). */
struct mux_tx {
    size_t nchans;            /* DATA frames in the batch in flight */
    struct mux_chan *chans[FRAME_BATCH_MAX]; /* ... their channels */
    size_t nspl, spl_pos;     /* spliced DATA frames, in batch order */
    struct mux_chan *spl[FRAME_BATCH_MAX];   /* ... their channels */
    size_t ctl_n;
    struct mux_ctl ctl[MUX_CTL_MAX];
    int iovcnt, pos;          /* iov[pos..iovcnt) still to send */
    size_t total;
    uint8_t mark;             /* &mark: the iov_base of a spliced payload */
    struct iovec iov[2 * FRAME_BATCH_MAX + 1];
    struct frame_batch batch;
};

/* Ids of the channels this side closed last: frames the peer sent before
 * it saw our CLOSE are a normal race, counted apart from ids never open.
 * Only a counter's label depends on it, so the ring is short. */
#define MUX_LATE_IDS 4

/* Kept small (an idle tunnel is little more than this): fields grouped
 * to avoid padding, 1024 bytes at most (a jemalloc size class; the
 * gateway's RSS per idle tunnel is measured by bench/ scenario 6). */
struct mux {
    struct eng *e;
    struct mux_cfg cfg;
    struct mux_hooks hooks;
    void *udata;
    struct tc_stream *seal, *open;
    int fd;
    enum mux_reason why;
    int dec_boundary;         /* frame_dec.state at a frame boundary */
    uint8_t late[MUX_LATE_IDS][FRAME_ID_LEN]; /* ring, see MUX_LATE_IDS */
    uint8_t late_pos, late_n; /* next slot, slots filled */
    size_t q_doomed;          /* queued bytes of channels whose queue goes
                                 once their cancelled send returns */
    uint32_t tick_ms;
    bool rd_busy, tx_busy, rx_stalled, closing, dead_done, free_queued;
    bool rx_eng;              /* rx is an engine buffer, else malloc'd */
    bool rx_big;              /* last read filled its buffer: read big */
    bool rx_hdr;              /* next read: one header (after a splice) */
    uint32_t rx_rest;         /* > 0: next read takes this rest of a small
                                 payload and one header (a channel with
                                 a pipe: its next payload then starts at
                                 the buffer's end and splices whole) */
    /* tunnel input: rx[rx_off..rx_len) still to decode */
    uint8_t *rx;
    size_t rx_off, rx_len;
    struct frame_dec *dec;    /* NULL at a frame boundary between reads */
    struct mux_tx *tx;        /* NULL while nothing is to be sent */
    /* incoming splice: the read in flight moves tunnel -> spl_c->ipipe */
    struct mux_chan *spl_c;
    struct mux_chan *spl_wait; /* the read waits for its writer (only
                                 channel, pipe without room) ... */
    uint64_t spl_wait_at;     /* ... since (bounded by the tick) */
    /* channels */
    void *root;               /* tsearch tree of open channels by id */
    size_t nchan, nobj;       /* open; allocated (open + closing) */
    struct cds_list_head all, ready;
    struct mux_queue_pool pool;
    /* timers */
    struct timer tick;        /* periodic; sooner while the read waits */
    uint64_t last_act, next_ping, pong_deadline;
    struct eng_op rd, wr;
    struct eng_defer flush_d, start_d, dead_d, free_d;
    struct mux_group *own;    /* the group allocated when cfg had none */
    struct mux_tally tally;
    struct frame_enc enc;
};

/* ---- small helpers (several files, per frame or per read) ---------------- */

/* Any total order will do for the tree: two native-endian words compare
 * in a few instructions where memcmp costs a call per tree level (~0.7 %
 * of the gateway's keep-alive samples). */
_Static_assert(FRAME_ID_LEN == 2 * sizeof(uint64_t), "id_cmp reads two words");

static inline int id_cmp(const void *a, const void *b)
{
    uint64_t x[2], y[2];

    memcpy(x, a, sizeof(x));
    memcpy(y, b, sizeof(y));
    if (x[0] != y[0])
        return x[0] < y[0] ? -1 : 1;
    return (x[1] > y[1]) - (x[1] < y[1]);
}

static inline struct mux_chan *chan_find(struct mux *m, const uint8_t id[FRAME_ID_LEN])
{
    void *const *node = tfind(id, &m->root, id_cmp);

    return node != NULL ? *node : NULL;
}

static inline uint64_t now_ms(const struct mux *m)
{
    return eng_now(m->e);
}

/* Smallest incoming payload rest (in) or last local read (out) that
 * splices, by cfg.splice (mux.h). */
static inline size_t spl_min(const struct mux *m, bool in)
{
    switch (m->cfg.splice) {
    case MUX_SPLICE_ON:
        return in ? 1 : 0;
    case MUX_SPLICE_OFF:
        return SIZE_MAX;
    default:
        return in ? MUX_SPLICE_IN_AUTO : MUX_SPLICE_OUT_AUTO;
    }
}

/* Bytes for the next recv of a socket: a small engine buffer (that an
 * idle socket does not hold, see eng_recv_pick) until a read fills one,
 * then the configured size while they keep coming full. */
static inline size_t read_len(size_t cfg_size, bool big)
{
    return big || cfg_size < ENG_PBUF_SMALL ? cfg_size : ENG_PBUF_SMALL;
}

/* mux_flow_index(), inlined where frames are counted. */
static inline unsigned flow_index(uint8_t flow)
{
    switch (flow) {
    case FRAME_NEW: return 0;
    case FRAME_DATA: return 1;
    case FRAME_CLOSE: return 2;
    case FRAME_PING: return 3;
    case FRAME_PAUSE: return 4;
    case FRAME_RESUME: return 5;
    default: return 6;
    }
}

/* A spliced payload has no buffer: its bytes stay in the channel's pipe
 * (which is then closed, not reused, if they are never sent). */
static inline void out_release(struct mux *m, struct mux_out *o)
{
    if (o->buf == NULL)
        return;
    if (o->heap)
        free(o->buf);
    else
        eng_buf_put(m->e, o->buf);
    o->buf = NULL;
}

/* A group's spare slot (struct mux_group): the object in it, or a new
 * one of size bytes (NULL when out of memory); putting back fills an empty
 * slot, else frees. */
static inline void *spare_take(void **slot, size_t size)
{
    void *p = *slot != NULL ? *slot : malloc(size);

    *slot = NULL;
    return p;
}

static inline void spare_put(void **slot, void *p)
{
    if (*slot == NULL)
        *slot = p;
    else
        free(p);
}

static inline void pipe_init(struct mux_pipe *p)
{
    *p = (struct mux_pipe){ .fd = { -1, -1 } };
}

static inline bool pipe_get(struct mux *m, struct mux_pipe *p)
{
    int cap;

    if (p->fd[0] >= 0)
        return true;
    cap = eng_pipe_get(m->e, p->fd);
    if (cap <= 0) {
        pipe_init(p);
        return false;
    }
    p->cap = (uint32_t)cap;
    p->n = 0;
    return true;
}

static inline void pipe_put(struct mux *m, struct mux_pipe *p)
{
    if (p->fd[0] < 0)
        return;
    eng_pipe_put(m->e, p->fd);
    pipe_init(p);
}

/* What c received and has not written to its local socket yet: its
 * pipe's bytes, then its queue's (the water marks and in_limit). */
static inline size_t chan_held(const struct mux_chan *c)
{
    return c->q.bytes + c->ipipe.n;
}

static inline bool ctl_full(const struct mux *m)
{
    return m->tx != NULL && m->tx->ctl_n >= MUX_CTL_MAX;
}

/* ---- mux.c ---------------------------------------------------------------- */

/* A channel for id, open (in the id table, counted); NULL when out of
 * memory. PENDING (c->fd < 0) until the caller sets c->fd. */
struct mux_chan *mux_chan_new(struct mux *m, const uint8_t id[FRAME_ID_LEN],
                              const struct net_addr *caller);
/* The one exit path of a channel (mux_chan_close() is the role's way in):
 * send_close tells the peer, drain writes what the peer sent first. */
void mux_chan_end(struct mux_chan *c, enum mux_reason why, bool send_close, bool drain);
/* Free a closing channel (eng_defer) once nothing refers to it. */
void mux_chan_check(struct mux_chan *c);
/* Free a closing tunnel (eng_defer) once nothing refers to it. */
void mux_check(struct mux *m);
/* Park the cipher contexts of a tunnel with nothing to do. */
void mux_park_if_quiet(struct mux *m);

/* ---- mux_tx.c ------------------------------------------------------------- */

/* Arm the channel's local read when it may hold one more payload. */
void mtx_chan_arm_read(struct mux_chan *c);
/* The local read's callback (c->rd). */
void mtx_chan_rd_cb(struct eng_op *op, int res);
/* On/off the ready list (channels with frames to send). */
void mtx_ready_add(struct mux_chan *c);
void mtx_ready_del(struct mux_chan *c);
/* Queue a control frame for the next batch. */
void mtx_ctl_push(struct mux *m, enum ctl_kind kind, const uint8_t id[FRAME_ID_LEN]);
/* Send what is queued at the end of the turn. */
void mtx_schedule_flush(struct mux *m);
/* The tunnel send's callback (m->wr). */
void mtx_cb(struct eng_op *op, int res);

/* ---- mux_rx.c ------------------------------------------------------------- */

/* Decode what is buffered, act on it, then read the tunnel again. */
void mrx_process(struct mux *m);
/* The tunnel recv's callback (m->rd). */
void mrx_cb(struct eng_op *op, int res);
/* Defer callback (m->start_d): start or resume reading the tunnel. */
void mrx_start_cb(struct eng_defer *d);
/* Give the receive buffer back. */
void mrx_release(struct mux *m);
/* PAUSE the peer once c's incoming bytes (chan_held) cross in_high. */
void mrx_chan_water(struct mux *m, struct mux_chan *c);
/* Start c's next local write (prefix, then pipe, then queue), unless one
 * is in flight. */
void mrx_chan_kick_write(struct mux_chan *c);
/* The local send's callback (c->wr). */
void mrx_chan_wr_cb(struct eng_op *op, int res);
/* What follows any local write (res < 0: it failed), its bytes counted:
 * drop everything or RESUME, write on, finish closing. */
void mrx_chan_wr_next(struct mux_chan *c, int res);
/* Drop c's queue, prefix and pipe now (no local write may borrow them)
 * ... */
void mrx_queue_free(struct mux_chan *c);
/* ... or once the write borrowing them returns. */
void mrx_queue_drop(struct mux_chan *c);

/* ---- mux_splice.c --------------------------------------------------------- */

/* At the end of the rx buffer: splice the DATA payload in progress into
 * its channel's pipe, or (only channel, no room) wait for its writer.
 * True when it took over the tunnel's reading. */
bool mspl_start(struct mux *m);
/* Move what fits of c's queue into its pipe (no send may borrow it). */
void mspl_queue_in(struct mux_chan *c);
/* Splice c's pipe to its local socket (c->wr, which must be idle). */
void mspl_write(struct mux_chan *c);
/* c's writer made progress: end the tunnel's wait for it once its queue
 * is empty and its pipe has room (the read resumes at end of turn). */
void mspl_wait_check(struct mux *m, struct mux_chan *c);
/* Stop waiting; the tunnel is read at end of turn (start_d). */
void mspl_wait_end(struct mux *m);

#endif /* CORE_MUX_IMPL_H */
