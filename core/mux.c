/* core/mux.c - one tunnel's multiplexer, see mux.h.
 *
 * Channel states (c->closing, c->draining, c->fin_queued):
 *
 *   PENDING (client, fd < 0) --attach--> OPEN (fd >= 0)
 *      |                                   |
 *      +---------- chan_close() -----------+
 *                      |
 *                      v
 *   CLOSING: out of the id table, local recv cancelled; CLOSE queued unless
 *      the peer closed or the tunnel is gone; DRAINING (peer CLOSE, local
 *      EOF) keeps writing the incoming queue to the local socket first
 *                      |  no op in flight, no DATA borrowed by a batch,
 *                      v  nothing left to send, queue written or dropped
 *   FIN (eng_defer): eng_close(fd), on_chan_closed, free.
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
 * - Idle memory: a tunnel with nothing in flight holds no receive buffer
 *   (the engine picks one when data arrives and it goes back at the end of
 *   the callback, unless the decoder stalls: then the rest is copied), no
 *   decoder (allocated while a frame is split across reads), no tx context
 *   (batch, control frames: allocated while something is to be sent).
 * - Splice (see mux.h): a channel's spliced payloads wait in its own pipe
 *   in read order (out[] entries without a buffer; pipe.n counts their
 *   bytes); in a batch each is a placeholder iovec (&tx->mark) that
 *   tx_step sends with eng_splice from that pipe. Incoming, spl_c's socket
 *   is reserved (spl_wr) while the tunnel's pipe holds bytes for it. Pipes
 *   are closed after use, never handed to another stream.
 * - No channel or tunnel is freed outside an eng_defer callback; hooks
 *   never run inside a mux_* call (they run from op callbacks, timers and
 *   defers).
 */
#include "core/mux.h"
#include "core/mux_queue.h"

#include <errno.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <urcu/compiler.h>
#include <urcu/list.h>

/* Queue chunks per local send (up to 384 KiB; 6 keeps struct mux_chan in
 * the 640-byte jemalloc class). */
#define MUX_WIOV 6
/* Bytes gathered into one tunnel batch before it is sent. */
#define MUX_BATCH_BUDGET (1u << 20)
/* Mux-level frames (pong replies, pings, CLOSE for refused NEW) waiting for
 * the next batch; when full, reading the tunnel waits for the flush. */
#define MUX_CTL_MAX FRAME_BATCH_MAX
/* Largest received SIZE accepted whatever cfg.max_frame says. */
#define MUX_FRAME_CAP (256u << 20)
/* Periodic timer bounds. */
#define MUX_TICK_MIN_MS 10
#define MUX_TICK_MAX_MS 5000
/* DATA payloads a channel holds: one in the batch in flight, one read
 * ahead meanwhile. */
#define MUX_CHAN_OUT 2
/* Longest an incoming splice waits for its channel's local writes before
 * the tunnel is read again through the copy path: the added latency for
 * frames of other channels (or PINGs) behind a slow local reader. */
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
    bool spl_wr;              /* the tunnel splices into the local socket */
    bool spl_slow;            /* a splice gave up waiting for its writes:
                                 copy until its queue has drained */
    uint32_t rd_last;         /* bytes of the last local read */
    uint8_t out_n, out_tx;    /* payloads held; the first out_tx in flight */
    struct mux_out out[MUX_CHAN_OUT];
    struct mux_pipe pipe;     /* spliced payloads waiting for the tunnel */
    /* incoming */
    struct mux_queue q;
    uint8_t *prefix;          /* attach prefix, written first */
    size_t nprefix, wr_prefix;
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
    /* tunnel input: rx[rx_off..rx_len) still to decode */
    uint8_t *rx;
    size_t rx_off, rx_len;
    struct frame_dec *dec;    /* NULL at a frame boundary between reads */
    struct mux_tx *tx;        /* NULL while nothing is to be sent */
    /* incoming splice: tunnel -> pipe -> spl_c's socket */
    struct mux_chan *spl_c;
    struct mux_chan *spl_wait; /* splice waits for its local writes */
    uint64_t spl_wait_at;     /* ... since (bounded by the tick) */
    uint8_t *spl_buf;         /* draining the pipe into spl_c's queue */
    struct mux_pipe pipe;
    /* channels */
    void *root;               /* tsearch tree of open channels by id */
    size_t nchan, nobj;       /* open; allocated (open + closing) */
    struct cds_list_head all, ready;
    struct mux_queue_pool pool;
    /* timers */
    struct timer tick;        /* periodic; sooner while a splice waits */
    uint64_t last_act, next_ping, pong_deadline;
    struct eng_op rd, wr;
    struct eng_defer flush_d, start_d, dead_d, free_d;
    struct mux_stats *st;     /* &group->st */
    struct mux_group *own;    /* the group allocated when cfg had none */
    struct mux_tally tally;
    struct frame_enc enc;
};

static void chan_close(struct mux_chan *c, enum mux_reason why, bool send_close, bool drain);
static void chan_check(struct mux_chan *c);
static void schedule_flush(struct mux *m);
static void park_if_quiet(struct mux *m);

/* ---- names and defaults ------------------------------------------------- */

const char *mux_reason_name(enum mux_reason r)
{
    static const char *const names[MUX_R_COUNT] = {
        [MUX_R_NONE] = "none",
        [MUX_R_LOCAL_EOF] = "local_eof",
        [MUX_R_LOCAL_ERROR] = "local_error",
        [MUX_R_PEER_CLOSE] = "peer_close",
        [MUX_R_QUEUE_LIMIT] = "queue_limit",
        [MUX_R_CHAN_IDLE] = "chan_idle",
        [MUX_R_REFUSED] = "refused",
        [MUX_R_CONNECT_FAIL] = "connect_fail",
        [MUX_R_LIMIT] = "limit",
        [MUX_R_TUNNEL_DOWN] = "tunnel_down",
        [MUX_R_PEER_EOF] = "peer_eof",
        [MUX_R_TUNNEL_ERROR] = "tunnel_error",
        [MUX_R_PROTOCOL] = "protocol",
        [MUX_R_TUNNEL_IDLE] = "tunnel_idle",
        [MUX_R_PONG_TIMEOUT] = "pong_timeout",
        [MUX_R_REPLACED] = "replaced",
        [MUX_R_EXPIRED] = "expired",
        [MUX_R_SHUTDOWN] = "shutdown",
    };

    if ((unsigned)r >= MUX_R_COUNT)
        return "unknown";
    return names[r];
}

static const char *const splice_names[] = {
    [MUX_SPLICE_AUTO] = "auto",
    [MUX_SPLICE_ON] = "on",
    [MUX_SPLICE_OFF] = "off",
};

int mux_splice_parse(const char *s, enum mux_splice *out)
{
    for (int i = MUX_SPLICE_AUTO; s != NULL && i <= MUX_SPLICE_OFF; i++) {
        if (strcmp(s, splice_names[i]) == 0) {
            *out = (enum mux_splice)i;
            return 0;
        }
    }
    return -1;
}

const char *mux_splice_name(enum mux_splice s)
{
    return s >= MUX_SPLICE_AUTO && s <= MUX_SPLICE_OFF ? splice_names[s] : "unknown";
}

unsigned mux_flow_index(uint8_t flow)
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

void mux_cfg_defaults(struct mux_cfg *cfg, enum tc_side side, unsigned version)
{
    bool gw = side == TC_SIDE_GATEWAY;

    *cfg = (struct mux_cfg){
        .side = side,
        .version = version,
        .max_frame = FRAME_MAX_DATA,
        .read_size = ENG_PBUF_BIG,
        .in_high = 2u << 20,
        .in_low = 512u << 10,
        .in_limit = version >= 1 ? (size_t)68157440 : (size_t)268435456,
        .tunnel_in_limit = MUX_TUNNEL_IN_LIMIT,
        .max_channels = 0,
        .tunnel_idle_ms = 120000,
        .chan_idle_ms = gw ? 120000 : 0,
        .ping_ms = gw ? 0 : 50000,
        .pong_ms = gw ? 0 : 90000,
        .rx_size = ENG_PBUF_BIG,
        .linger_ms = 10000,
        .batch = true,
        .splice = MUX_SPLICE_AUTO,
    };
}

/* ---- small helpers ------------------------------------------------------ */

static int id_cmp(const void *a, const void *b)
{
    return memcmp(a, b, FRAME_ID_LEN);
}

static struct mux_chan *chan_find(struct mux *m, const uint8_t id[FRAME_ID_LEN])
{
    void *const *node = tfind(id, &m->root, id_cmp);

    return node != NULL ? *node : NULL;
}

static uint64_t now_ms(const struct mux *m)
{
    return eng_now(m->e);
}

/* Smallest incoming payload rest (in) or last local read (out) that
 * splices, by cfg.splice (mux.h). */
static size_t spl_min(const struct mux *m, bool in)
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
static size_t read_len(size_t cfg_size, bool big)
{
    return big || cfg_size < ENG_PBUF_SMALL ? cfg_size : ENG_PBUF_SMALL;
}

void mux_group_init(struct mux_group *g)
{
    memset(g, 0, sizeof(*g));
    g->rnd_pos = sizeof(g->rnd);
}

void mux_group_fini(struct mux_group *g)
{
    free(g->spare_tx);
    free(g->spare_dec);
    g->spare_tx = NULL;
    g->spare_dec = NULL;
}

/* tc_rng for the encoder: CSPRNG bytes from the group's pool, each byte
 * handed out once. */
static int rnd_draw(void *ctx, void *buf, size_t n)
{
    struct mux_group *g = ctx;

    if (n > sizeof(g->rnd))
        return tc_rng_draw(NULL, buf, n);
    if (sizeof(g->rnd) - g->rnd_pos < n) {
        if (tc_rng_draw(NULL, g->rnd, sizeof(g->rnd)) != 0)
            return -1;
        g->rnd_pos = 0;
    }
    memcpy(buf, g->rnd + g->rnd_pos, n);
    g->rnd_pos += (uint32_t)n;
    return 0;
}

/* ---- outgoing payloads and the tx context -------------------------------- */

/* A spliced payload has no buffer: its bytes stay in the channel's pipe
 * (which is then closed, not reused, if they are never sent). */
static void out_release(struct mux *m, struct mux_out *o)
{
    if (o->buf == NULL)
        return;
    if (o->heap)
        free(o->buf);
    else
        eng_buf_put(m->e, o->buf);
    o->buf = NULL;
}

static void pipe_init(struct mux_pipe *p)
{
    *p = (struct mux_pipe){ .fd = { -1, -1 } };
}

static bool pipe_get(struct mux *m, struct mux_pipe *p)
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

static void pipe_put(struct mux *m, struct mux_pipe *p)
{
    if (p->fd[0] < 0)
        return;
    eng_pipe_put(m->e, p->fd);
    pipe_init(p);
}

/* Drop the payloads that no batch in flight borrows. */
static void chan_drop_out(struct mux_chan *c)
{
    while (c->out_n > c->out_tx)
        out_release(c->m, &c->out[--c->out_n]);
}

/* The oldest payload has been written (sent) or never will be. A spliced
 * one that was not sent leaves its bytes in the pipe, whose count then
 * stays above zero: the pipe is closed, never reused with stale bytes. */
static void chan_out_done(struct mux_chan *c, bool sent)
{
    if (c->out[0].buf == NULL && sent) {
        c->pipe.n -= c->out[0].len;
        c->pipe_full = false;
    }
    out_release(c->m, &c->out[0]);
    memmove(&c->out[0], &c->out[1], (MUX_CHAN_OUT - 1) * sizeof(c->out[0]));
    c->out[MUX_CHAN_OUT - 1].buf = NULL;
    c->out_n--;
    c->out_tx--;
}

static struct mux_tx *tx_get(struct mux *m)
{
    struct mux_group *g = m->cfg.group;

    if (m->tx == NULL) {
        m->tx = g->spare_tx != NULL ? g->spare_tx : malloc(sizeof(*m->tx));
        g->spare_tx = NULL;
        if (m->tx == NULL)
            return NULL;
        m->tx->nchans = 0;
        m->tx->nspl = 0;
        m->tx->ctl_n = 0;
    }
    return m->tx;
}

/* Give a tx context or decoder to the group's spare slot, or free it. */
static void tx_put(struct mux_group *g, struct mux_tx *tx)
{
    if (g->spare_tx == NULL)
        g->spare_tx = tx;
    else
        free(tx);
}

static void dec_put(struct mux_group *g, struct frame_dec *d)
{
    if (g->spare_dec == NULL)
        g->spare_dec = d;
    else
        free(d);
}

/* Give the tx context back once nothing is in flight or waiting. */
static void tx_trim(struct mux *m)
{
    if (m->tx == NULL || m->tx_busy || m->tx->ctl_n > 0 || !cds_list_empty(&m->ready))
        return;
    tx_put(m->cfg.group, m->tx);
    m->tx = NULL;
}

static bool ctl_full(const struct mux *m)
{
    return m->tx != NULL && m->tx->ctl_n >= MUX_CTL_MAX;
}

/* ---- the incoming queue --------------------------------------------------- */

/* Drop the queue and the prefix. Only when no local send borrows them. */
static void queue_free(struct mux_chan *c)
{
    if (c->q_doomed) {
        c->m->q_doomed -= c->q.bytes;
        c->q_doomed = false;
    }
    mux_queue_clear(&c->q, &c->m->pool);
    free(c->prefix);
    c->prefix = NULL;
    c->nprefix = 0;
}

/* Drop the queue of a channel that gives up on its local writes: now, or
 * when the send borrowing it returns (cancelled here). Until then its
 * bytes count as doomed, not against tunnel_in_limit. */
static void queue_drop(struct mux_chan *c)
{
    if (!c->wr_busy) {
        queue_free(c);
        return;
    }
    if (!c->q_doomed) {
        c->q_doomed = true;
        c->m->q_doomed += c->q.bytes;
    }
    eng_cancel(&c->wr);
}

/* ---- outgoing scheduling ------------------------------------------------- */

static bool chan_has_frames(const struct mux_chan *c)
{
    if (c->need_new || c->out_n > c->out_tx || c->need_close)
        return true;
    return !c->closing && c->under_water != c->pause_sent;
}

static void ready_add(struct mux_chan *c)
{
    if (c->on_ready || c->m->closing)
        return;
    c->on_ready = true;
    cds_list_add_tail(&c->ready, &c->m->ready);
    schedule_flush(c->m);
}

static void ready_del(struct mux_chan *c)
{
    if (!c->on_ready)
        return;
    c->on_ready = false;
    cds_list_del(&c->ready);
}

/* A control frame for the next batch; lost when out of memory (a missed
 * pong or CLOSE is what a lost connection would cause too). */
static void ctl_push(struct mux *m, enum ctl_kind kind, const uint8_t id[FRAME_ID_LEN])
{
    struct mux_tx *tx;

    if (m->closing || ctl_full(m) || (tx = tx_get(m)) == NULL)
        return;
    memcpy(tx->ctl[tx->ctl_n].id, id, FRAME_ID_LEN);
    tx->ctl[tx->ctl_n].kind = (uint8_t)kind;
    tx->ctl_n++;
    schedule_flush(m);
}

/* ---- local socket: read side (local -> DATA) ------------------------------ */

static void chan_arm_read(struct mux_chan *c)
{
    struct mux *m = c->m;

    if (c->fd < 0 || c->closing || c->rd_busy || c->peer_paused || m->closing ||
        c->out_n >= MUX_CHAN_OUT || c->out_n > c->out_tx)
        return;
    if (c->rd_last >= spl_min(m, false) && !c->pipe_full && pipe_get(m, &c->pipe)) {
        size_t room = (size_t)c->pipe.cap - c->pipe.n;

        if (room == 0)
            return; /* the batch in flight empties it */
        c->rd_busy = c->rd_spl = true;
        eng_splice(m->e, &c->rd, c->fd, c->pipe.fd[1], room, ENG_SPLICE_IN);
        return;
    }
    if (c->pipe.n == 0)
        pipe_put(m, &c->pipe);
    c->rd_busy = true;
    eng_recv_pick(m->e, &c->rd, c->fd, read_len(m->cfg.read_size, c->rd_big));
}

static void chan_rd_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, rd);
    struct mux *m = c->m;
    bool spl = c->rd_spl;

    c->rd_busy = c->rd_spl = false;
    if (res > 0 && spl)
        c->pipe.n += (uint32_t)res;
    if (res == -EAGAIN && spl && !c->closing) {
        /* The pipe is out of slots (eng_splice): the next reads copy
         * until a batch takes bytes out of it. */
        c->pipe_full = c->pipe.n > 0;
        chan_arm_read(c);
        return;
    }
    if (c->closing) {
        if (res > 0 && !spl)
            eng_buf_put(m->e, eng_op_buf(op));
        chan_check(c);
        return;
    }
    if (res > 0) {
        if (spl) {
            c->rd_big = (size_t)res >= ENG_PBUF_SMALL;
            c->out[c->out_n++] = (struct mux_out){ NULL, (uint32_t)res, false };
        } else {
            c->rd_big = (size_t)res >= read_len(m->cfg.read_size, c->rd_big);
            c->out[c->out_n++] = (struct mux_out){ eng_op_buf(op), (uint32_t)res, false };
        }
        c->rd_last = (uint32_t)res;
        c->last_act = now_ms(m);
        m->st->bytes_from_local += (uint64_t)res;
        m->tally.bytes_from_local += (uint64_t)res;
        ready_add(c);
    } else if (res == 0) {
        chan_close(c, MUX_R_LOCAL_EOF, true, true);
    } else {
        chan_close(c, MUX_R_LOCAL_ERROR, true, false);
    }
}

/* ---- local socket: write side (incoming queue -> local) ------------------ */

static void chan_kick_write(struct mux_chan *c)
{
    int n = 0;

    if (c->fd < 0 || c->wr_busy || c->spl_wr || c->m->closing)
        return;
    c->wr_prefix = 0;
    if (c->prefix != NULL) {
        c->wiov[n++] = (struct iovec){ c->prefix, c->nprefix };
        c->wr_prefix = c->nprefix;
    }
    n += mux_queue_iov(&c->q, c->wiov + n, MUX_WIOV);
    if (n == 0)
        return;
    c->wr_busy = true;
    eng_send(c->m->e, &c->wr, c->fd, c->wiov, n);
}

static void start_cb(struct eng_defer *d);

/* Reading the tunnel resumes at the end of the turn (never from inside a
 * mux_* call: decoding runs hooks). */
static void spl_wait_end(struct mux *m)
{
    m->spl_wait = NULL;
    eng_defer(m->e, &m->start_d, start_cb);
}

static void chan_wr_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, wr);
    struct mux *m = c->m;
    size_t n;

    c->wr_busy = false;
    if (res < 0 || (c->closing && !c->draining)) {
        queue_free(c);
        if (c->closing) {
            c->draining = false;
            chan_check(c);
        } else {
            chan_close(c, MUX_R_LOCAL_ERROR, true, false);
        }
        return;
    }
    n = (size_t)res;
    if (c->wr_prefix > 0) {
        n -= c->wr_prefix;
        free(c->prefix);
        c->prefix = NULL;
        c->nprefix = c->wr_prefix = 0;
    }
    mux_queue_consume(&c->q, &m->pool, n);
    m->st->bytes_to_local += n;
    m->tally.bytes_to_local += n;
    c->last_act = now_ms(m);
    if (c->q.bytes == 0) {
        c->spl_slow = false; /* its reader caught up */
        if (m->spl_wait == c && c->prefix == NULL)
            spl_wait_end(m);
    }
    if (c->under_water && c->q.bytes <= m->cfg.in_low) {
        c->under_water = false;
        if (!c->closing && c->pause_sent)
            ready_add(c);
    }
    chan_kick_write(c);
    chan_check(c);
}

/* ---- channel lifetime ------------------------------------------------------ */

static struct mux_chan *chan_new(struct mux *m, const uint8_t id[FRAME_ID_LEN],
                                 const struct net_addr *caller)
{
    struct mux_chan *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return NULL;
    memcpy(c->id, id, FRAME_ID_LEN);
    if (tsearch(c, &m->root, id_cmp) == NULL) {
        free(c);
        return NULL;
    }
    c->m = m;
    c->caller = *caller;
    c->fd = -1;
    pipe_init(&c->pipe);
    c->last_act = now_ms(m);
    eng_op_init(&c->rd, chan_rd_cb);
    eng_op_init(&c->wr, chan_wr_cb);
    cds_list_add_tail(&c->all, &m->all);
    m->nchan++;
    m->nobj++;
    m->st->chan_opened++;
    m->tally.chan_opened++;
    return c;
}

static void mux_check(struct mux *m);

static void chan_fin_cb(struct eng_defer *d)
{
    struct mux_chan *c = caa_container_of(d, struct mux_chan, fin);
    struct mux *m = c->m;
    bool report = !c->reported && !m->dead_done;

    cds_list_del(&c->all);
    if (c->fd >= 0)
        eng_close(m->e, c->fd);
    c->fd = -1;
    c->reported = true;
    if (report && m->hooks.on_chan_closed != NULL)
        m->hooks.on_chan_closed(m->hooks.ctx, c, c->why);
    queue_free(c);
    pipe_put(m, &c->pipe);
    free(c);
    m->nobj--;
    mux_check(m);
}

/* A closing channel is freed once nothing refers to it any more. */
static void chan_check(struct mux_chan *c)
{
    if (!c->closing || c->fin_queued)
        return;
    if (c->draining) {
        if (c->q.bytes > 0 || c->prefix != NULL || c->wr_busy || c->spl_wr) {
            chan_kick_write(c);
            return;
        }
        c->draining = false;
    }
    if (c->rd_busy || c->wr_busy || c->spl_wr || c->out_n > 0 || c->need_close)
        return;
    ready_del(c);
    c->fin_queued = true;
    eng_defer(c->m->e, &c->fin, chan_fin_cb);
}

/* The one exit path of a channel. send_close: tell the peer (not when it
 * closed first or the tunnel is gone). drain: write what the peer already
 * sent to the local socket before closing it (peer CLOSE, local EOF). */
static void late_add(struct mux *m, const uint8_t id[FRAME_ID_LEN])
{
    memcpy(m->late[m->late_pos], id, FRAME_ID_LEN);
    m->late_pos = (uint8_t)((m->late_pos + 1) % MUX_LATE_IDS);
    if (m->late_n < MUX_LATE_IDS)
        m->late_n++;
}

static void chan_close(struct mux_chan *c, enum mux_reason why, bool send_close, bool drain)
{
    struct mux *m = c->m;

    if (c->closing)
        return;
    c->closing = true;
    c->why = why;
    if (m->spl_wait == c)
        spl_wait_end(m);
    m->st->chan_closed[why]++;
    tdelete(c, &m->root, id_cmp);
    if (why != MUX_R_PEER_CLOSE)
        late_add(m, c->id);
    m->nchan--;
    if (c->rd_busy)
        eng_cancel(&c->rd);
    /* A NEW still unsent means the peer never heard of the channel. */
    if (c->need_new || m->closing)
        send_close = false;
    c->need_new = false;
    if (!send_close)
        chan_drop_out(c);
    c->need_close = send_close;
    c->draining = drain && c->fd >= 0 && !m->closing;
    if (c->draining)
        c->last_act = now_ms(m); /* linger_ms counts from here */
    else
        queue_drop(c);
    if (c->need_close)
        ready_add(c);
    chan_check(c);
}

/* ---- the tunnel: sending ------------------------------------------------- */

/* Add c's next frame to the batch: NEW, then a PAUSE/RESUME change, then
 * its DATA, then CLOSE (after the last DATA). *bytes grows by the frame's
 * payload. Returns -1 when the encoder failed (fatal). */
static int chan_emit(struct mux *m, struct mux_chan *c, size_t *bytes)
{
    struct mux_tx *tx = m->tx;
    struct frame_batch *b = &tx->batch;
    uint8_t flow;
    int rc;

    if (c->need_new) {
        c->need_new = false;
        flow = FRAME_NEW;
        rc = frame_batch_new(b, c->id, &c->caller);
    } else if (!c->closing && c->under_water != c->pause_sent) {
        c->pause_sent = c->under_water;
        flow = c->pause_sent ? FRAME_PAUSE : FRAME_RESUME;
        rc = c->pause_sent ? frame_batch_pause(b, c->id) : frame_batch_resume(b, c->id);
        if (c->pause_sent)
            m->st->pauses_sent++;
        else
            m->st->resumes_sent++;
    } else if (c->out_n > c->out_tx) {
        const struct mux_out *o = &c->out[c->out_tx++];

        tx->chans[tx->nchans++] = c;
        flow = FRAME_DATA;
        if (o->buf == NULL) { /* spliced: a placeholder, see tx_step */
            tx->spl[tx->nspl++] = c;
            rc = frame_batch_data(b, c->id, &tx->mark, o->len);
        } else {
            rc = frame_batch_data(b, c->id, o->buf, o->len);
        }
        *bytes += o->len;
        chan_arm_read(c); /* read the next one while this one is written */
    } else if (c->need_close) {
        c->need_close = false;
        flow = FRAME_CLOSE;
        rc = frame_batch_close(b, c->id);
    } else {
        return 0;
    }
    m->st->frames_out[mux_flow_index(flow)]++;
    *bytes += FRAME_HDR_LEN;
    return rc;
}

/* Up to max control frames into the batch, oldest first. */
static int ctl_emit(struct mux *m, size_t max)
{
    struct mux_tx *tx = m->tx;
    size_t i;
    int rc = 0;

    for (i = 0; i < tx->ctl_n && i < max && rc == 0; i++) {
        const struct mux_ctl *x = &tx->ctl[i];

        if (x->kind == CTL_CLOSE) {
            rc = frame_batch_close(&tx->batch, x->id);
            m->st->frames_out[mux_flow_index(FRAME_CLOSE)]++;
        } else {
            rc = frame_batch_ping(&tx->batch, x->id, x->kind == CTL_PONG);
            m->st->frames_out[mux_flow_index(FRAME_PING)]++;
        }
    }
    tx->ctl_n -= i;
    memmove(tx->ctl, tx->ctl + i, tx->ctl_n * sizeof(tx->ctl[0]));
    return rc;
}

static void tx_step(struct mux *m);

/* End of turn: everything queued this turn goes out as one batch, channels
 * served round-robin one frame at a time. cfg.batch off: one frame per
 * send (the ablation that shows what batching buys). */
static void flush_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, flush_d);
    size_t bytes = 0, max = m->cfg.batch ? FRAME_BATCH_MAX : 1;
    const struct iovec *iov;
    struct frame_batch *b;
    struct mux_tx *tx;
    int cnt;

    if (m->closing || m->tx_busy)
        return;
    if (m->tx == NULL && cds_list_empty(&m->ready))
        return;
    if ((tx = tx_get(m)) == NULL) {
        mux_close(m, MUX_R_TUNNEL_ERROR);
        return;
    }
    b = &tx->batch;
    frame_batch_reset(b, &m->enc);
    tx->nchans = tx->nspl = tx->spl_pos = 0;
    if (ctl_emit(m, max) != 0)
        goto fail;
    while (!cds_list_empty(&m->ready) && !frame_batch_full(b) && bytes < MUX_BATCH_BUDGET &&
           b->nframes < max) {
        struct mux_chan *c = cds_list_first_entry(&m->ready, struct mux_chan, ready);

        if (chan_emit(m, c, &bytes) != 0)
            goto fail;
        if (chan_has_frames(c)) {
            cds_list_del(&c->ready);
            cds_list_add_tail(&c->ready, &m->ready);
        } else {
            ready_del(c);
            chan_check(c);
        }
    }
    if (frame_batch_empty(b)) {
        tx_trim(m);
        return;
    }
    if (frame_batch_seal(b) != 0)
        goto fail;
    iov = frame_batch_iov(b, &cnt);
    memcpy(tx->iov, iov, (size_t)cnt * sizeof(*iov));
    tx->iovcnt = cnt;
    tx->pos = 0;
    m->st->batches++;
    m->st->batch_frames += b->nframes;
    m->tx_busy = true;
    tx_step(m);
    return;
fail:
    /* Nothing was sent: the DATA payloads are no longer borrowed. */
    for (size_t i = 0; i < tx->nchans; i++)
        tx->chans[i]->out_tx = 0;
    tx->nchans = 0;
    mux_close(m, MUX_R_TUNNEL_ERROR);
}

static void schedule_flush(struct mux *m)
{
    if (m->closing || m->tx_busy)
        return;
    eng_defer(m->e, &m->flush_d, flush_cb);
}

static void rx_process(struct mux *m);

/* Send the sealed batch in order: each run of iovecs with one eng_send
 * (MSG_MORE when a spliced payload follows), each spliced payload with
 * eng_splice from its channel's pipe. Without splicing: one send. */
static void tx_step(struct mux *m)
{
    struct mux_tx *tx = m->tx;
    int k = tx->pos;

    if (tx->iov[k].iov_base == &tx->mark) {
        struct mux_chan *c = tx->spl[tx->spl_pos++];

        tx->pos++;
        eng_splice(m->e, &m->wr, m->fd, c->pipe.fd[0], tx->iov[k].iov_len, ENG_SPLICE_OUT);
        return;
    }
    while (k < tx->iovcnt && tx->iov[k].iov_base != &tx->mark)
        k++;
    if (k < tx->iovcnt)
        eng_send_more(m->e, &m->wr, m->fd, tx->iov + tx->pos, k - tx->pos);
    else
        eng_send(m->e, &m->wr, m->fd, tx->iov + tx->pos, k - tx->pos);
    tx->pos = k;
}

static void tx_done(struct mux *m, int res, bool sent);

static void tx_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, wr);
    bool rest = m->tx->pos < m->tx->iovcnt;

    if (res >= 0 && !m->closing && rest) {
        tx_step(m);
        return;
    }
    tx_done(m, res, res >= 0 && !rest);
}

/* The whole batch is written (or failed): its payloads go back, their
 * channels read again. */
static void tx_done(struct mux *m, int res, bool sent)
{
    struct mux_tx *tx = m->tx;
    size_t i;

    m->tx_busy = false;
    /* Oldest first, once per DATA frame (a channel may have had two). */
    for (i = 0; i < tx->nchans; i++)
        chan_out_done(tx->chans[i], sent);
    for (i = 0; i < tx->nchans; i++) {
        struct mux_chan *c = tx->chans[i];

        if (c->closing)
            chan_check(c);
        else
            chan_arm_read(c);
    }
    tx->nchans = 0;
    if (m->closing) {
        mux_check(m);
        return;
    }
    if (res < 0) {
        mux_close(m, MUX_R_TUNNEL_ERROR);
        return;
    }
    m->last_act = now_ms(m);
    if (m->rx_stalled) {
        m->rx_stalled = false;
        rx_process(m);
    }
    if (m->closing)
        return;
    if ((m->tx != NULL && m->tx->ctl_n > 0) || !cds_list_empty(&m->ready)) {
        schedule_flush(m);
    } else {
        tx_trim(m);
        park_if_quiet(m);
    }
}

/* ---- the tunnel: receiving ----------------------------------------------- */

/* Incoming queue crossed in_high: PAUSE the peer (protocol >= 1). */
static void chan_water(struct mux *m, struct mux_chan *c)
{
    if (m->cfg.version >= 1 && !c->under_water && c->q.bytes >= m->cfg.in_high) {
        c->under_water = true;
        if (!c->pause_sent)
            ready_add(c);
    }
}


/* A frame for an id not open: dropped, counted as late when this side
 * closed that channel recently, else as an unknown id. */
static void drop_unknown(struct mux *m, const uint8_t id[FRAME_ID_LEN])
{
    for (unsigned i = 0; i < m->late_n; i++) {
        if (memcmp(m->late[i], id, FRAME_ID_LEN) == 0) {
            m->st->dropped_late++;
            return;
        }
    }
    m->st->dropped_unknown_id++;
}

static void biggest_walk(const void *node, VISIT which, void *ctx)
{
    struct mux_chan *c = *(struct mux_chan *const *)node, **best = ctx;

    if ((which == postorder || which == leaf) && (*best == NULL || c->q.bytes > (*best)->q.bytes))
        *best = c;
}

/* The tunnel's incoming queues together passed tunnel_in_limit: close the
 * channel holding the most (CLOSE sent, counted as queue_limit). Closing
 * the biggest, not the one that just received, keeps a slow reader from
 * getting well-behaved channels of the same tunnel closed. */
static void tunnel_overflow(struct mux *m)
{
    struct mux_chan *best = NULL;

    twalk_r(m->root, biggest_walk, &best);
    if (best == NULL)
        return;
    m->st->tunnel_overflows++;
    chan_close(best, MUX_R_QUEUE_LIMIT, true, false);
}

static void on_data(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c = chan_find(m, ev->id);

    if (c == NULL) {
        if (ev->offset == 0)
            drop_unknown(m, ev->id);
        return;
    }
    if (ev->offset == 0 && c->q.bytes >= m->cfg.in_limit) {
        chan_close(c, MUX_R_QUEUE_LIMIT, true, false);
        return;
    }
    /* A PENDING channel's first frame stays contiguous for mux_chan_peek. */
    if (ev->len > 0 && mux_queue_append(&c->q, &m->pool, ev->data, ev->len,
                                        c->fd < 0 ? ev->size : 0) != 0) {
        chan_close(c, MUX_R_LOCAL_ERROR, true, false);
        return;
    }
    if (m->cfg.tunnel_in_limit > 0 && m->pool.bytes - m->q_doomed > m->cfg.tunnel_in_limit) {
        tunnel_overflow(m);
        if (c->closing)
            return;
    }
    chan_water(m, c);
    if (c->fd >= 0)
        chan_kick_write(c);
    else if (ev->last && ev->len + ev->offset > 0 && m->hooks.on_pending_data != NULL)
        m->hooks.on_pending_data(m->hooks.ctx, c);
}

static void on_new(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c;

    if (m->cfg.side == TC_SIDE_GATEWAY)
        return; /* a gateway accepts no channels (4.10) */
    if (chan_find(m, ev->id) != NULL) {
        mux_close(m, MUX_R_PROTOCOL);
        return;
    }
    if (ev->bad_block) {
        m->st->bad_new++;
        ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    if (m->hooks.on_new == NULL ||
        (m->cfg.max_channels > 0 && m->nchan >= m->cfg.max_channels)) {
        m->st->chan_closed[m->hooks.on_new == NULL ? MUX_R_REFUSED : MUX_R_LIMIT]++;
        ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    c = chan_new(m, ev->id, &ev->caller);
    if (c == NULL) {
        m->st->chan_closed[MUX_R_LIMIT]++;
        ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    m->hooks.on_new(m->hooks.ctx, c, &c->caller);
}

static void on_frame(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c;

    m->st->frames_in[mux_flow_index(ev->flow)]++;
    switch (ev->flow) {
    case FRAME_NEW:
        on_new(m, ev);
        return;
    case FRAME_PING:
        if (memcmp(ev->extra, "pong", 4) != 0) {
            ctl_push(m, CTL_PONG, ev->id);
            return;
        }
        m->pong_deadline = 0;
        if (m->hooks.on_pong != NULL)
            m->hooks.on_pong(m->hooks.ctx, m);
        return;
    default:
        break;
    }
    c = chan_find(m, ev->id);
    if (c == NULL) {
        drop_unknown(m, ev->id); /* CLOSE/PAUSE/RESUME: ignored, counted */
        return;
    }
    if (ev->flow == FRAME_CLOSE) {
        chan_close(c, MUX_R_PEER_CLOSE, false, true);
    } else if (ev->flow == FRAME_PAUSE) {
        c->peer_paused = true;
    } else if (ev->flow == FRAME_RESUME) {
        c->peer_paused = false;
        chan_arm_read(c);
    }
}

static void rx_cb(struct eng_op *op, int res);

static void rx_release(struct mux *m)
{
    if (m->rx != NULL) {
        if (m->rx_eng)
            eng_buf_put(m->e, m->rx);
        else
            free(m->rx);
    }
    m->rx = NULL;
    m->rx_eng = false;
    m->rx_off = m->rx_len = 0;
}

/* The undecoded rest must outlive this callback: copy it out of an engine
 * buffer, so that a stalled tunnel never pins one (io_uring: a provided
 * ring buffer every connection of the shard shares). */
static int rx_keep(struct mux *m)
{
    size_t n = m->rx_len - m->rx_off;
    uint8_t *p;

    if (!m->rx_eng)
        return 0;
    p = malloc(n);
    if (p == NULL)
        return -1;
    memcpy(p, m->rx + m->rx_off, n);
    rx_release(m);
    m->rx = p;
    m->rx_len = n;
    return 0;
}

static int dec_get(struct mux *m)
{
    struct mux_group *g = m->cfg.group;

    if (m->dec != NULL)
        return 0;
    m->dec = g->spare_dec != NULL ? g->spare_dec : malloc(sizeof(*m->dec));
    g->spare_dec = NULL;
    if (m->dec == NULL)
        return -1;
    frame_dec_init(m->dec, m->open, m->cfg.version, m->cfg.max_frame);
    return 0;
}

/* A tunnel with no channel and nothing to send gives back its cipher
 * contexts (tc_park, ~1.3 KiB of OpenSSL state for the pair): idle tunnels
 * are most tunnels, and their next PING makes them again (~1 us). A
 * tunnel with channels keeps them, so the data path never pays for it. */
static void park_if_quiet(struct mux *m)
{
    if (m->nobj != 0 || m->tx != NULL || m->tx_busy || m->closing)
        return;
    (void)tc_park(m->seal); /* -1 leaves the stream as it was: fine */
    (void)tc_park(m->open);
}

/* Everything read is decoded: give the buffer back, drop the decoder if
 * no frame is split across reads, and read again (one header only right
 * after a spliced payload, so that the next large one splices too). */
static void rx_arm(struct mux *m)
{
    size_t len = m->rx_hdr ? frame_wire_len(&m->enc, FRAME_PING, 0, NULL)
                           : read_len(m->cfg.rx_size, m->rx_big);

    rx_release(m);
    if (m->dec != NULL && m->dec->state == m->dec_boundary && m->dec->have == 0) {
        dec_put(m->cfg.group, m->dec);
        m->dec = NULL;
    }
    m->rx_hdr = false;
    m->rd_busy = true;
    eng_recv_pick(m->e, &m->rd, m->fd, len);
    park_if_quiet(m);
}

/* ---- the tunnel: incoming splice -------------------------------------------
 *
 *   rx buffer runs out inside a DATA payload (rest >= spl_min(in), channel
 *   socket free, queue empty; else, with no other channel, WAIT up to
 *   MUX_SPLICE_WAIT_MS for its queue to drain) --> IN: eng_splice tunnel
 *   -> pipe (m->rd) --> OUT: eng_splice pipe -> local, OUT_TRY (c->wr)
 *   --all moved--> IN again while the payload lasts, then a header-only
 *   read; --some left--> DRAIN: eng_read pipe -> queue (c->wr), then the
 *   copy path takes over. c->spl_wr keeps every other writer off the
 *   local socket meanwhile. */

static void spl_in_cb(struct eng_op *op, int res);
static void spl_out_cb(struct eng_op *op, int res);
static void spl_drain_cb(struct eng_op *op, int res);
static void chan_wr_cb(struct eng_op *op, int res);

static void spl_end(struct mux *m);

/* A local write or pipe read of the splice failed: back to the copy path,
 * the channel closes, the tunnel is read again. */
static void spl_fail(struct mux *m, struct mux_chan *c)
{
    spl_end(m);
    chan_close(c, MUX_R_LOCAL_ERROR, true, false);
    rx_process(m);
}

/* Back to the copy path: the pipe goes back (closed if it holds bytes),
 * the channel's socket is free again. */
static void spl_end(struct mux *m)
{
    struct mux_chan *c = m->spl_c;

    if (m->spl_buf != NULL)
        eng_buf_put(m->e, m->spl_buf);
    m->spl_buf = NULL;
    pipe_put(m, &m->pipe);
    m->spl_c = NULL;
    if (c != NULL) {
        c->spl_wr = false;
        chan_check(c);
    }
}

static void spl_read(struct mux *m, uint32_t left)
{
    size_t n = (size_t)m->pipe.cap - m->pipe.n;

    if (n > left)
        n = left;
    m->rd.cb = spl_in_cb;
    m->rd_busy = true;
    eng_splice(m->e, &m->rd, m->fd, m->pipe.fd[1], n, ENG_SPLICE_IN);
}

static bool spl_start(struct mux *m)
{
    uint8_t id[FRAME_ID_LEN];
    uint32_t left;
    struct mux_chan *c;

    if (m->dec == NULL || !frame_dec_in_data(m->dec, id, &left) || left < spl_min(m, true))
        return false;
    c = chan_find(m, id);
    if (c == NULL || c->fd < 0 || c->closing || c->spl_wr || c->prefix != NULL)
        return false;
    if (c->wr_busy || c->q.bytes > 0) {
        /* Its earlier bytes are still being written. A streaming channel
         * is always in that state when the tunnel buffer runs out: wait
         * for them (the tunnel is not read meanwhile), unless that would
         * hold up other channels, or its reader is known to be slow. */
        if (m->nchan > 1 || c->spl_slow)
            return false;
        rx_release(m);
        m->spl_wait = c;
        m->spl_wait_at = now_ms(m);
        eng_timer_add(m->e, &m->tick, MUX_SPLICE_WAIT_MS);
        return true;
    }
    if (!pipe_get(m, &m->pipe))
        return false;
    /* Nothing of it was decoded: the frame is counted here. */
    if (left == m->dec->size)
        m->st->frames_in[mux_flow_index(FRAME_DATA)]++;
    rx_release(m);
    m->spl_c = c;
    c->spl_wr = true;
    spl_read(m, left);
    return true;
}

static void spl_in_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, rd);
    struct mux_chan *c = m->spl_c;

    m->rd_busy = false;
    m->rd.cb = rx_cb;
    if (res > 0)
        m->pipe.n += (uint32_t)res;
    if (m->closing) {
        spl_end(m);
        mux_check(m);
        return;
    }
    if (res == -EAGAIN) {
        /* Pipe out of slots (eng_splice): it is empty here, so bytes
         * arrived just after the splice found none. Try again. */
        uint8_t id[FRAME_ID_LEN];
        uint32_t left;

        if (m->pipe.n == 0 && frame_dec_in_data(m->dec, id, &left)) {
            spl_read(m, left);
            return;
        }
    }
    if (res <= 0) {
        spl_end(m);
        mux_close(m, res == 0 ? MUX_R_PEER_EOF : MUX_R_TUNNEL_ERROR);
        return;
    }
    frame_dec_skip(m->dec, (uint32_t)res);
    m->last_act = now_ms(m);
    if (c->closing && !c->draining) { /* nobody to write to: dropped */
        spl_end(m);
        rx_process(m);
        return;
    }
    /* Never wait on the local socket here: the tunnel would not be read
     * (other channels, PINGs) for as long as that reader sleeps. */
    c->wr.cb = spl_out_cb;
    c->wr_busy = true;
    eng_splice(m->e, &c->wr, c->fd, m->pipe.fd[0], m->pipe.n, ENG_SPLICE_OUT_TRY);
}

/* What the local socket did not take moves to its queue. */
static void spl_drain(struct mux *m)
{
    struct mux_chan *c = m->spl_c;
    size_t n = m->pipe.n > ENG_PBUF_BIG ? ENG_PBUF_BIG : m->pipe.n;

    if (m->spl_buf == NULL && (m->spl_buf = eng_buf_get(m->e, ENG_PBUF_BIG)) == NULL) {
        spl_fail(m, c);
        return;
    }
    c->wr.cb = spl_drain_cb;
    c->wr_busy = true;
    eng_read(m->e, &c->wr, m->pipe.fd[0], m->spl_buf, n);
}

static void spl_out_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, wr);
    struct mux *m = c->m;
    uint8_t id[FRAME_ID_LEN];
    uint32_t left;

    c->wr_busy = false;
    c->wr.cb = chan_wr_cb;
    if (res > 0) {
        m->pipe.n -= (uint32_t)res;
        m->st->bytes_to_local += (uint64_t)res;
        m->tally.bytes_to_local += (uint64_t)res;
        c->last_act = now_ms(m);
    }
    if (m->closing) {
        spl_end(m);
        return;
    }
    if (res < 0) {
        spl_fail(m, c);
        return;
    }
    if (m->pipe.n > 0) {
        spl_drain(m);
        return;
    }
    if ((!c->closing || c->draining) && frame_dec_in_data(m->dec, id, &left) &&
        memcmp(id, c->id, FRAME_ID_LEN) == 0) {
        spl_read(m, left); /* the same payload goes on */
        return;
    }
    m->rx_hdr = true;
    spl_end(m);
    rx_process(m);
}

static void spl_drain_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, wr);
    struct mux *m = c->m;
    bool keep = !c->closing || c->draining;

    c->wr_busy = false;
    c->wr.cb = chan_wr_cb;
    if (res > 0) {
        m->pipe.n -= (uint32_t)res;
        if (!m->closing && keep &&
            mux_queue_append(&c->q, &m->pool, m->spl_buf, (size_t)res, 0) != 0)
            res = -ENOMEM;
    }
    if (m->closing) {
        spl_end(m);
        return;
    }
    if (res <= 0) {
        spl_fail(m, c);
        return;
    }
    if (m->pipe.n > 0) {
        spl_drain(m);
        return;
    }
    spl_end(m);
    if (keep) {
        chan_water(m, c);
        chan_kick_write(c);
    }
    rx_process(m);
}

/* Decode what is in rx[off..len) and act on it; then read more. Stops
 * early (stalled) when the control queue is full, so pings cannot pile up
 * replies without bound; the flush's callback resumes it. */
static void rx_process(struct mux *m)
{
    while (!m->closing) {
        struct frame_ev ev;
        enum frame_res r;
        size_t used = 0;

        if (m->rx_off >= m->rx_len) {
            if (!spl_start(m))
                rx_arm(m);
            return;
        }
        if (ctl_full(m)) {
            if (rx_keep(m) != 0) {
                mux_close(m, MUX_R_TUNNEL_ERROR);
                break;
            }
            m->rx_stalled = true;
            schedule_flush(m);
            return;
        }
        if (dec_get(m) != 0) {
            mux_close(m, MUX_R_TUNNEL_ERROR);
            break;
        }
        r = frame_dec_feed(m->dec, m->rx + m->rx_off, m->rx_len - m->rx_off, &used, &ev);
        m->rx_off += used;
        if (r == FRAME_AGAIN)
            continue;
        if (r == FRAME_BAD) {
            mux_close(m, MUX_R_PROTOCOL);
            return;
        }
        m->last_act = now_ms(m);
        if (ev.kind == FRAME_EV_DATA) {
            if (ev.offset == 0)
                m->st->frames_in[mux_flow_index(FRAME_DATA)]++;
            on_data(m, &ev);
        } else if (ev.kind == FRAME_EV_UNKNOWN) {
            m->st->frames_in[mux_flow_index(ev.flow)]++;
        } else {
            on_frame(m, &ev);
        }
    }
    rx_release(m);
}

static void rx_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, rd);

    m->rd_busy = false;
    if (res > 0 && m->closing)
        eng_buf_put(m->e, eng_op_buf(op));
    if (m->closing) {
        mux_check(m);
        return;
    }
    if (res <= 0) {
        mux_close(m, res == 0 ? MUX_R_PEER_EOF : MUX_R_TUNNEL_ERROR);
        return;
    }
    m->rx_big = (size_t)res >= read_len(m->cfg.rx_size, m->rx_big);
    m->rx = eng_op_buf(op);
    m->rx_eng = true;
    m->rx_off = 0;
    m->rx_len = (size_t)res;
    rx_process(m);
}

static void start_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, start_d);

    /* Not while a splice or a wait owns the tunnel's reading. */
    if (!m->closing && !m->rd_busy && m->spl_c == NULL && m->spl_wait == NULL)
        rx_process(m);
}

/* ---- timers ----------------------------------------------------------------- */

static void tick_chans(struct mux *m, uint64_t now)
{
    struct mux_chan *c, *tmp;

    cds_list_for_each_entry_safe(c, tmp, &m->all, all) {
        if (!c->closing && m->cfg.chan_idle_ms > 0 &&
            now - c->last_act >= m->cfg.chan_idle_ms) {
            chan_close(c, MUX_R_CHAN_IDLE, true, false);
        } else if (c->draining && m->cfg.linger_ms > 0 &&
                   now - c->last_act >= m->cfg.linger_ms) {
            /* The local reader stopped reading: give up on the rest. */
            c->draining = false;
            queue_drop(c);
            chan_check(c);
        }
    }
}

static void tick_cb(struct timer *t)
{
    struct mux *m = caa_container_of(t, struct mux, tick);
    uint64_t now = now_ms(m);

    if (m->closing)
        return;
    if (m->cfg.tunnel_idle_ms > 0 && now - m->last_act >= m->cfg.tunnel_idle_ms) {
        mux_close(m, MUX_R_TUNNEL_IDLE);
        return;
    }
    if (m->pong_deadline > 0 && now >= m->pong_deadline) {
        mux_close(m, MUX_R_PONG_TIMEOUT);
        return;
    }
    if (m->cfg.ping_ms > 0 && now >= m->next_ping) {
        mux_ping(m);
        m->next_ping = now + m->cfg.ping_ms;
    }
    if (m->spl_wait != NULL && now - m->spl_wait_at >= MUX_SPLICE_WAIT_MS) {
        /* That reader is slow: copy for it until its queue has drained,
         * and read the tunnel again now. */
        m->spl_wait->spl_slow = true;
        spl_wait_end(m);
    }
    tick_chans(m, now);
    mux_queue_pool_tick(&m->pool);
    if (!m->closing)
        eng_timer_add(m->e, &m->tick, m->spl_wait != NULL ? MUX_SPLICE_WAIT_MS : m->tick_ms);
}

/* A quarter of the shortest timeout, so each fires at most 25% late. */
static uint32_t tick_period(const struct mux_cfg *cfg)
{
    const uint32_t v[] = { cfg->tunnel_idle_ms, cfg->chan_idle_ms, cfg->ping_ms,
                           cfg->pong_ms, cfg->linger_ms };
    uint32_t best = MUX_TICK_MAX_MS * 4;
    size_t i;

    for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        if (v[i] > 0 && v[i] < best)
            best = v[i];
    }
    best /= 4;
    if (best < MUX_TICK_MIN_MS)
        best = MUX_TICK_MIN_MS;
    return best > MUX_TICK_MAX_MS ? MUX_TICK_MAX_MS : best;
}

/* ---- tunnel lifetime ---------------------------------------------------- */

static void free_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, free_d);

    eng_timer_del(m->e, &m->tick);
    eng_close(m->e, m->fd);
    tc_free(m->seal);
    tc_free(m->open);
    mux_queue_pool_trim(&m->pool);
    rx_release(m);
    spl_end(m);
    if (m->dec != NULL)
        dec_put(m->cfg.group, m->dec);
    if (m->tx != NULL)
        tx_put(m->cfg.group, m->tx);
    if (m->own != NULL)
        mux_group_fini(m->own);
    free(m->own);
    free(m);
}

static void mux_check(struct mux *m)
{
    if (!m->closing || !m->dead_done || m->nobj > 0 || m->rd_busy || m->tx_busy ||
        m->free_queued)
        return;
    m->free_queued = true;
    eng_defer(m->e, &m->free_d, free_cb);
}

static void dead_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, dead_d);
    struct mux_chan *c, *tmp;

    cds_list_for_each_entry_safe(c, tmp, &m->all, all) {
        if (c->reported)
            continue;
        c->reported = true;
        if (m->hooks.on_chan_closed != NULL)
            m->hooks.on_chan_closed(m->hooks.ctx, c, c->why);
    }
    m->dead_done = true;
    if (m->hooks.on_dead != NULL)
        m->hooks.on_dead(m->hooks.ctx, m, m->why);
    mux_check(m);
}

void mux_close(struct mux *m, enum mux_reason why)
{
    struct mux_chan *c, *tmp;

    if (m->closing)
        return;
    m->closing = true;
    m->why = why;
    /* FIN first (6.5); a send still in flight fails with EPIPE or is
     * cancelled, either way nothing more is written. Not an engine op:
     * shutdown(2) on an fd with ops in flight is safe. */
    shutdown(m->fd, SHUT_WR);
    if (m->rd_busy)
        eng_cancel(&m->rd);
    if (m->tx_busy)
        eng_cancel(&m->wr);
    eng_timer_del(m->e, &m->tick);
    if (m->tx != NULL)
        m->tx->ctl_n = 0;
    cds_list_for_each_entry_safe(c, tmp, &m->all, all) {
        ready_del(c);
        if (!c->closing) {
            chan_close(c, MUX_R_TUNNEL_DOWN, false, false);
            continue;
        }
        c->need_close = false;
        chan_drop_out(c);
        if (c->draining) {
            c->draining = false;
            queue_drop(c);
        }
        chan_check(c);
    }
    eng_defer(m->e, &m->dead_d, dead_cb);
}

struct mux *mux_new(struct eng *e, int fd, const struct mux_cfg *cfg,
                    const struct mux_hooks *hooks, struct tc_stream *seal,
                    struct tc_stream *open, const uint8_t *pending, size_t npending)
{
    struct mux *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->cfg = *cfg;
    if (cfg->group == NULL) {
        if ((m->own = malloc(sizeof(*m->own))) == NULL) {
            free(m);
            return NULL;
        }
        mux_group_init(m->own);
        m->cfg.group = m->own;
    }
    m->st = &m->cfg.group->st;
    if (m->cfg.read_size == 0 || m->cfg.read_size > ENG_PBUF_BIG)
        m->cfg.read_size = ENG_PBUF_BIG;
    /* A queue chunk holds a PENDING channel's whole first frame: keep any
     * one local send far below INT_MAX. */
    if (m->cfg.max_frame == 0 || m->cfg.max_frame > MUX_FRAME_CAP)
        m->cfg.max_frame = m->cfg.max_frame == 0 ? FRAME_MAX_DATA : MUX_FRAME_CAP;
    if (m->cfg.rx_size < 4096 || m->cfg.rx_size > ENG_PBUF_BIG)
        m->cfg.rx_size = ENG_PBUF_BIG;
    /* The decoder exists from the start (pending bytes may need it); its
     * state now is the one every frame boundary returns to. */
    m->dec = malloc(sizeof(*m->dec));
    if (m->dec == NULL || (npending > 0 && (m->rx = malloc(npending)) == NULL)) {
        free(m->dec);
        free(m->own);
        free(m);
        return NULL;
    }
    frame_dec_init(m->dec, open, cfg->version, m->cfg.max_frame);
    m->dec_boundary = m->dec->state;
    if (npending > 0)
        memcpy(m->rx, pending, npending);
    m->rx_len = npending;
    pipe_init(&m->pipe);
    m->e = e;
    m->fd = fd;
    m->hooks = *hooks;
    m->seal = seal;
    m->open = open;
    CDS_INIT_LIST_HEAD(&m->all);
    CDS_INIT_LIST_HEAD(&m->ready);
    frame_enc_init(&m->enc, seal, cfg->version,
                   &(struct tc_rng){ .draw = rnd_draw, .ctx = m->cfg.group });
    eng_op_init(&m->rd, rx_cb);
    eng_op_init(&m->wr, tx_cb);
    m->last_act = now_ms(m);
    m->next_ping = m->last_act + m->cfg.ping_ms;
    m->tick_ms = tick_period(&m->cfg);
    timer_init(&m->tick, tick_cb);
    eng_timer_add(e, &m->tick, m->tick_ms);
    /* Pending bytes may hold frames whose hooks must not run inside
     * mux_new(): decode them, then start reading, at the end of the turn. */
    eng_defer(e, &m->start_d, start_cb);
    return m;
}

/* ---- channels: the role's side ------------------------------------------- */

struct mux_chan *mux_chan_open(struct mux *m, int fd, const struct net_addr *caller,
                               const uint8_t *first, size_t n)
{
    uint8_t id[FRAME_ID_LEN];
    struct mux_chan *c = NULL;
    struct mux_out o = { .heap = n > ENG_PBUF_BIG };
    int tries;

    if (m->closing || n > FRAME_MAX_DATA ||
        (m->cfg.max_channels > 0 && m->nchan >= m->cfg.max_channels)) {
        m->st->chan_closed[MUX_R_LIMIT] += m->closing ? 0 : 1;
        eng_close(m->e, fd);
        return NULL;
    }
    /* The first bytes travel as the channel's first payload. */
    if (n > 0 && (o.buf = o.heap ? malloc(n) : eng_buf_get(m->e, n)) == NULL) {
        eng_close(m->e, fd);
        return NULL;
    }
    for (tries = 0; tries < 4; tries++) {
        if (frame_new_id(&m->enc, id) != 0)
            break;
        if (chan_find(m, id) == NULL) {
            c = chan_new(m, id, caller);
            break;
        }
    }
    if (c == NULL) {
        if (o.buf != NULL)
            out_release(m, &o);
        eng_close(m->e, fd);
        return NULL;
    }
    c->fd = fd;
    c->need_new = true;
    if (n > 0) {
        memcpy(o.buf, first, n);
        o.len = (uint32_t)n;
        c->out[c->out_n++] = o;
        m->st->bytes_from_local += n;
        m->tally.bytes_from_local += n;
    }
    ready_add(c);
    chan_arm_read(c);
    return c;
}

void mux_chan_attach(struct mux_chan *c, int fd, const void *prefix, size_t n)
{
    struct mux *m = c->m;

    if (c->closing || c->fd >= 0 || m->closing) {
        eng_close(m->e, fd);
        return;
    }
    if (n > 0) {
        c->prefix = malloc(n);
        if (c->prefix == NULL) {
            eng_close(m->e, fd);
            chan_close(c, MUX_R_LOCAL_ERROR, true, false);
            return;
        }
        memcpy(c->prefix, prefix, n);
        c->nprefix = n;
    }
    c->fd = fd;
    c->last_act = now_ms(m);
    chan_kick_write(c);
    chan_arm_read(c);
}

void mux_chan_close(struct mux_chan *c, enum mux_reason why)
{
    if ((unsigned)why >= MUX_R_COUNT)
        why = MUX_R_NONE;
    chan_close(c, why, true, false);
}

const uint8_t *mux_chan_peek(const struct mux_chan *c, size_t *n)
{
    return mux_queue_peek(&c->q, n);
}

size_t mux_chan_queued(const struct mux_chan *c)
{
    return c->q.bytes;
}

bool mux_chan_paused(const struct mux_chan *c)
{
    return c->peer_paused;
}

const struct net_addr *mux_chan_caller(const struct mux_chan *c)
{
    return &c->caller;
}

const uint8_t *mux_chan_id(const struct mux_chan *c)
{
    return c->id;
}

struct mux *mux_chan_mux(const struct mux_chan *c)
{
    return c->m;
}

void mux_chan_set_udata(struct mux_chan *c, void *udata)
{
    c->udata = udata;
}

void *mux_chan_udata(const struct mux_chan *c)
{
    return c->udata;
}

/* ---- tunnel: the role's side --------------------------------------------- */

void mux_ping(struct mux *m)
{
    uint8_t id[FRAME_ID_LEN];

    if (m->closing || ctl_full(m) || frame_new_id(&m->enc, id) != 0)
        return;
    ctl_push(m, CTL_PING, id);
    if (m->cfg.pong_ms > 0 && m->pong_deadline == 0)
        m->pong_deadline = now_ms(m) + m->cfg.pong_ms;
}

size_t mux_channels(const struct mux *m)
{
    return m->nchan;
}

const struct mux_stats *mux_stats(const struct mux *m)
{
    return m->st;
}

const struct mux_tally *mux_tally(const struct mux *m)
{
    return &m->tally;
}

struct eng *mux_eng(const struct mux *m)
{
    return m->e;
}

void mux_set_udata(struct mux *m, void *udata)
{
    m->udata = udata;
}

void *mux_udata(const struct mux *m)
{
    return m->udata;
}
