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
 * - A channel's rbuf holds at most one DATA: unsent (out_data) or borrowed
 *   by the batch in flight (in_batch); its local recv is armed only when
 *   neither holds and the peer has not paused it.
 * - The incoming queue's chunks are borrowed by the local send in flight
 *   (wr_busy); they are freed only from its callback or when it is idle.
 * - Nothing is freed outside an eng_defer callback; hooks never run inside
 *   a mux_* call (they run from op callbacks and defers).
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

/* Queue chunks per local send. */
#define MUX_WIOV 8
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

enum ctl_kind {
    CTL_PONG = 1,  /* reply to a PING request */
    CTL_PING = 2,  /* our request */
    CTL_CLOSE = 3, /* CLOSE for an id we refused */
};

struct mux_ctl {
    uint8_t id[FRAME_ID_LEN];
    uint8_t kind;
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
    bool need_new, need_close, out_data, in_batch, on_ready;
    bool peer_paused;         /* PAUSE received */
    bool under_water;         /* incoming above in_high, back at in_low */
    bool pause_sent;          /* what the peer was last told */
    bool rd_busy, wr_busy;
    uint8_t *rbuf;
    size_t rcap, out_len;
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

struct mux {
    struct eng *e;
    int fd;
    struct mux_cfg cfg;
    struct mux_hooks hooks;
    void *udata;
    struct tc_stream *seal, *open;
    enum mux_reason why;
    bool rd_busy, tx_busy, rx_stalled, closing, dead_done, free_queued;
    /* tunnel input */
    uint8_t *rx;
    size_t rx_cap, rx_off, rx_len;
    /* channels */
    void *root;               /* tsearch tree of open channels by id */
    size_t nchan, nobj;       /* open; allocated (open + closing) */
    struct cds_list_head all, ready;
    struct mux_ctl ctl[MUX_CTL_MAX];
    size_t ctl_n;
    struct mux_queue_pool pool;
    /* timers */
    struct timer tick;
    uint32_t tick_ms;
    uint64_t last_act, next_ping, pong_deadline;
    struct eng_op rd, wr;
    struct eng_defer flush_d, start_d, dead_d, free_d;
    struct mux_stats st;
    size_t ntx;
    struct mux_chan *txchans[FRAME_BATCH_MAX];
    struct iovec txiov[2 * FRAME_BATCH_MAX + 1];
    struct frame_enc enc;
    struct frame_dec dec;
    struct frame_batch batch;
};

static void chan_close(struct mux_chan *c, enum mux_reason why, bool send_close, bool drain);
static void chan_check(struct mux_chan *c);
static void schedule_flush(struct mux *m);

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
        .read_size = 64u << 10,
        .in_high = 2u << 20,
        .in_low = 512u << 10,
        .in_limit = version >= 1 ? (size_t)68157440 : (size_t)268435456,
        .max_channels = 0,
        .tunnel_idle_ms = 120000,
        .chan_idle_ms = gw ? 120000 : 0,
        .ping_ms = gw ? 0 : 50000,
        .pong_ms = gw ? 0 : 90000,
        .rx_size = 256u << 10,
        .linger_ms = 10000,
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

/* ---- the incoming queue --------------------------------------------------- */

/* Drop the queue and the prefix. Only when no local send borrows them. */
static void queue_free(struct mux_chan *c)
{
    mux_queue_clear(&c->q, &c->m->pool);
    free(c->prefix);
    c->prefix = NULL;
    c->nprefix = 0;
}

/* ---- outgoing scheduling ------------------------------------------------- */

static bool chan_has_frames(const struct mux_chan *c)
{
    if (c->need_new || c->out_data || c->need_close)
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

static void ctl_push(struct mux *m, enum ctl_kind kind, const uint8_t id[FRAME_ID_LEN])
{
    if (m->closing || m->ctl_n >= MUX_CTL_MAX)
        return;
    memcpy(m->ctl[m->ctl_n].id, id, FRAME_ID_LEN);
    m->ctl[m->ctl_n].kind = (uint8_t)kind;
    m->ctl_n++;
    schedule_flush(m);
}

/* ---- local socket: read side (local -> DATA) ------------------------------ */

static void chan_arm_read(struct mux_chan *c)
{
    struct mux *m = c->m;

    if (c->fd < 0 || c->closing || c->rd_busy || c->out_data || c->in_batch ||
        c->peer_paused || m->closing)
        return;
    c->rd_busy = true;
    eng_recv(m->e, &c->rd, c->fd, c->rbuf, m->cfg.read_size);
}

static void chan_rd_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, rd);
    struct mux *m = c->m;

    c->rd_busy = false;
    if (c->closing) {
        chan_check(c);
        return;
    }
    if (res > 0) {
        c->out_len = (size_t)res;
        c->out_data = true;
        c->last_act = now_ms(m);
        m->st.bytes_from_local += (uint64_t)res;
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

    if (c->fd < 0 || c->wr_busy || c->m->closing)
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
    m->st.bytes_to_local += n;
    c->last_act = now_ms(m);
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
                                 const struct net_addr *caller, size_t first)
{
    struct mux_chan *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return NULL;
    c->rcap = first > m->cfg.read_size ? first : m->cfg.read_size;
    c->rbuf = malloc(c->rcap);
    if (c->rbuf == NULL) {
        free(c);
        return NULL;
    }
    memcpy(c->id, id, FRAME_ID_LEN);
    if (tsearch(c, &m->root, id_cmp) == NULL) {
        free(c->rbuf);
        free(c);
        return NULL;
    }
    c->m = m;
    c->caller = *caller;
    c->fd = -1;
    c->last_act = now_ms(m);
    eng_op_init(&c->rd, chan_rd_cb);
    eng_op_init(&c->wr, chan_wr_cb);
    cds_list_add_tail(&c->all, &m->all);
    m->nchan++;
    m->nobj++;
    m->st.chan_opened++;
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
    free(c->rbuf);
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
        if (c->q.bytes > 0 || c->prefix != NULL || c->wr_busy) {
            chan_kick_write(c);
            return;
        }
        c->draining = false;
    }
    if (c->rd_busy || c->wr_busy || c->in_batch || c->need_close || c->out_data)
        return;
    ready_del(c);
    c->fin_queued = true;
    eng_defer(c->m->e, &c->fin, chan_fin_cb);
}

/* The one exit path of a channel. send_close: tell the peer (not when it
 * closed first or the tunnel is gone). drain: write what the peer already
 * sent to the local socket before closing it (peer CLOSE, local EOF). */
static void chan_close(struct mux_chan *c, enum mux_reason why, bool send_close, bool drain)
{
    struct mux *m = c->m;

    if (c->closing)
        return;
    c->closing = true;
    c->why = why;
    m->st.chan_closed[why]++;
    tdelete(c, &m->root, id_cmp);
    m->nchan--;
    if (c->rd_busy)
        eng_cancel(&c->rd);
    /* A NEW still unsent means the peer never heard of the channel. */
    if (c->need_new || m->closing)
        send_close = false;
    c->need_new = false;
    if (!send_close)
        c->out_data = false;
    c->need_close = send_close;
    c->draining = drain && c->fd >= 0 && !m->closing;
    if (c->draining) {
        c->last_act = now_ms(m); /* linger_ms counts from here */
    } else if (c->wr_busy) {
        eng_cancel(&c->wr);
    } else {
        queue_free(c);
    }
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
    struct frame_batch *b = &m->batch;
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
            m->st.pauses_sent++;
        else
            m->st.resumes_sent++;
    } else if (c->out_data) {
        c->out_data = false;
        c->in_batch = true;
        m->txchans[m->ntx++] = c;
        flow = FRAME_DATA;
        rc = frame_batch_data(b, c->id, c->rbuf, (uint32_t)c->out_len);
        *bytes += c->out_len;
    } else if (c->need_close) {
        c->need_close = false;
        flow = FRAME_CLOSE;
        rc = frame_batch_close(b, c->id);
    } else {
        return 0;
    }
    m->st.frames_out[mux_flow_index(flow)]++;
    *bytes += FRAME_HDR_LEN;
    return rc;
}

static int ctl_emit(struct mux *m)
{
    size_t i;
    int rc = 0;

    for (i = 0; i < m->ctl_n && rc == 0; i++) {
        const struct mux_ctl *x = &m->ctl[i];

        if (x->kind == CTL_CLOSE) {
            rc = frame_batch_close(&m->batch, x->id);
            m->st.frames_out[mux_flow_index(FRAME_CLOSE)]++;
        } else {
            rc = frame_batch_ping(&m->batch, x->id, x->kind == CTL_PONG);
            m->st.frames_out[mux_flow_index(FRAME_PING)]++;
        }
    }
    m->ctl_n = 0;
    return rc;
}

static void tx_cb(struct eng_op *op, int res);

/* End of turn: everything queued this turn goes out as one batch, channels
 * served round-robin one frame at a time. */
static void flush_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, flush_d);
    struct frame_batch *b = &m->batch;
    const struct iovec *iov;
    size_t bytes = 0;
    int cnt;

    if (m->closing || m->tx_busy)
        return;
    frame_batch_reset(b, &m->enc);
    m->ntx = 0;
    if (ctl_emit(m) != 0)
        goto fail;
    while (!cds_list_empty(&m->ready) && !frame_batch_full(b) && bytes < MUX_BATCH_BUDGET) {
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
    if (frame_batch_empty(b))
        return;
    if (frame_batch_seal(b) != 0)
        goto fail;
    iov = frame_batch_iov(b, &cnt);
    memcpy(m->txiov, iov, (size_t)cnt * sizeof(*iov));
    m->st.batches++;
    m->st.batch_frames += b->nframes;
    m->tx_busy = true;
    eng_send(m->e, &m->wr, m->fd, m->txiov, cnt);
    return;
fail:
    /* Nothing was sent: the DATA buffers are no longer borrowed. */
    for (size_t i = 0; i < m->ntx; i++)
        m->txchans[i]->in_batch = false;
    m->ntx = 0;
    mux_close(m, MUX_R_TUNNEL_ERROR);
}

static void schedule_flush(struct mux *m)
{
    if (m->closing || m->tx_busy)
        return;
    eng_defer(m->e, &m->flush_d, flush_cb);
}

static void rx_process(struct mux *m);

static void tx_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, wr);
    size_t i;

    m->tx_busy = false;
    for (i = 0; i < m->ntx; i++) {
        struct mux_chan *c = m->txchans[i];

        c->in_batch = false;
        if (c->closing)
            chan_check(c);
        else
            chan_arm_read(c);
    }
    m->ntx = 0;
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
    if (!m->closing && (m->ctl_n > 0 || !cds_list_empty(&m->ready)))
        schedule_flush(m);
}

/* ---- the tunnel: receiving ----------------------------------------------- */

static void on_data(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c = chan_find(m, ev->id);

    if (c == NULL) {
        if (ev->offset == 0)
            m->st.dropped_unknown_id++;
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
    if (m->cfg.version >= 1 && !c->under_water && c->q.bytes >= m->cfg.in_high) {
        c->under_water = true;
        if (!c->pause_sent)
            ready_add(c);
    }
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
        m->st.bad_new++;
        ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    if (m->hooks.on_new == NULL ||
        (m->cfg.max_channels > 0 && m->nchan >= m->cfg.max_channels)) {
        m->st.chan_closed[m->hooks.on_new == NULL ? MUX_R_REFUSED : MUX_R_LIMIT]++;
        ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    c = chan_new(m, ev->id, &ev->caller, 0);
    if (c == NULL) {
        m->st.chan_closed[MUX_R_LIMIT]++;
        ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    m->hooks.on_new(m->hooks.ctx, c, &c->caller);
}

static void on_frame(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c;

    m->st.frames_in[mux_flow_index(ev->flow)]++;
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
    if (c == NULL)
        return; /* CLOSE/PAUSE/RESUME for unknown ids are ignored */
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
            m->rx_off = m->rx_len = 0;
            m->rd_busy = true;
            eng_recv(m->e, &m->rd, m->fd, m->rx, m->rx_cap);
            return;
        }
        if (m->ctl_n >= MUX_CTL_MAX) {
            m->rx_stalled = true;
            schedule_flush(m);
            return;
        }
        r = frame_dec_feed(&m->dec, m->rx + m->rx_off, m->rx_len - m->rx_off, &used, &ev);
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
                m->st.frames_in[mux_flow_index(FRAME_DATA)]++;
            on_data(m, &ev);
        } else if (ev.kind == FRAME_EV_UNKNOWN) {
            m->st.frames_in[mux_flow_index(ev.flow)]++;
        } else {
            on_frame(m, &ev);
        }
    }
}

static void rx_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, rd);

    m->rd_busy = false;
    if (m->closing) {
        mux_check(m);
        return;
    }
    if (res <= 0) {
        mux_close(m, res == 0 ? MUX_R_PEER_EOF : MUX_R_TUNNEL_ERROR);
        return;
    }
    m->rx_off = 0;
    m->rx_len = (size_t)res;
    rx_process(m);
}

static void start_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, start_d);

    if (!m->closing && !m->rd_busy)
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
            if (c->wr_busy)
                eng_cancel(&c->wr);
            else
                queue_free(c);
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
    tick_chans(m, now);
    mux_queue_pool_tick(&m->pool);
    if (!m->closing)
        eng_timer_add(m->e, &m->tick, m->tick_ms);
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
    free(m->rx);
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
    m->ctl_n = 0;
    cds_list_for_each_entry_safe(c, tmp, &m->all, all) {
        ready_del(c);
        if (!c->closing) {
            chan_close(c, MUX_R_TUNNEL_DOWN, false, false);
            continue;
        }
        c->need_close = c->out_data = false;
        if (c->draining) {
            c->draining = false;
            if (c->wr_busy)
                eng_cancel(&c->wr);
            else
                queue_free(c);
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
    if (m->cfg.read_size == 0 || m->cfg.read_size > FRAME_MAX_DATA)
        m->cfg.read_size = 64u << 10;
    /* A queue chunk holds a PENDING channel's whole first frame: keep any
     * one local send far below INT_MAX. */
    if (m->cfg.max_frame == 0 || m->cfg.max_frame > MUX_FRAME_CAP)
        m->cfg.max_frame = m->cfg.max_frame == 0 ? FRAME_MAX_DATA : MUX_FRAME_CAP;
    if (m->cfg.rx_size < 4096)
        m->cfg.rx_size = 256u << 10;
    m->rx_cap = npending > m->cfg.rx_size ? npending : m->cfg.rx_size;
    m->rx = malloc(m->rx_cap);
    if (m->rx == NULL) {
        free(m);
        return NULL;
    }
    if (npending > 0)
        memcpy(m->rx, pending, npending);
    m->rx_len = npending;
    m->e = e;
    m->fd = fd;
    m->hooks = *hooks;
    m->seal = seal;
    m->open = open;
    CDS_INIT_LIST_HEAD(&m->all);
    CDS_INIT_LIST_HEAD(&m->ready);
    frame_enc_init(&m->enc, seal, cfg->version, NULL);
    frame_dec_init(&m->dec, open, cfg->version, m->cfg.max_frame);
    frame_batch_reset(&m->batch, &m->enc);
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
    int tries;

    if (m->closing || n > FRAME_MAX_DATA ||
        (m->cfg.max_channels > 0 && m->nchan >= m->cfg.max_channels)) {
        m->st.chan_closed[MUX_R_LIMIT] += m->closing ? 0 : 1;
        eng_close(m->e, fd);
        return NULL;
    }
    for (tries = 0; tries < 4; tries++) {
        if (frame_new_id(&m->enc, id) != 0)
            break;
        if (chan_find(m, id) == NULL) {
            c = chan_new(m, id, caller, n);
            break;
        }
    }
    if (c == NULL) {
        eng_close(m->e, fd);
        return NULL;
    }
    c->fd = fd;
    c->need_new = true;
    if (n > 0) {
        memcpy(c->rbuf, first, n);
        c->out_len = n;
        c->out_data = true;
        m->st.bytes_from_local += n;
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

    if (m->closing || m->ctl_n >= MUX_CTL_MAX || frame_new_id(&m->enc, id) != 0)
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
    return &m->st;
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
