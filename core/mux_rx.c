/* core/mux_rx.c - the multiplexer's incoming direction (see mux_impl.h):
 * the tunnel is read and decoded, frames act on their channels, DATA goes
 * into each channel's incoming queue (or its pipe: mux_splice.c) and from
 * there to its local socket.
 */
#include "core/mux_impl.h"

#include <search.h>
#include <stdlib.h>
#include <string.h>

#include <urcu/compiler.h>

/* ---- the incoming queue --------------------------------------------------- */

/* Drop the queue, the prefix and the pipe (closed with its bytes, never
 * reused). Only when no local write borrows them; the pipe stays while
 * the tunnel splices into it (spl_in_cb closes it then). */
void mrx_queue_free(struct mux_chan *c)
{
    if (c->q_doomed) {
        c->m->q_doomed -= c->q.bytes;
        c->q_doomed = false;
    }
    mux_queue_clear(&c->q, &c->m->pool);
    free(c->prefix);
    c->prefix = NULL;
    c->nprefix = 0;
    if (!c->spl_in)
        pipe_put(c->m, &c->ipipe);
}

/* Drop the queue and pipe of a channel that gives up on its local writes:
 * now, or when the write borrowing them returns (cancelled here). Until
 * then its queue's bytes count as doomed, not against tunnel_in_limit. */
void mrx_queue_drop(struct mux_chan *c)
{
    if (!c->wr_busy) {
        mrx_queue_free(c);
        return;
    }
    if (!c->q_doomed) {
        c->q_doomed = true;
        c->m->q_doomed += c->q.bytes;
    }
    eng_cancel(&c->wr);
}

/* ---- local socket: write side (pipe, then queue -> local) ---------------- */

/* One write op per channel, in stream order: the attach prefix (nothing
 * is spliced while it is pending), then the pipe's bytes, then the
 * queue's (which all came after the pipe's). A channel with a pipe moves
 * its queue into it (behind the bytes being spliced out, even while that
 * splice runs) and writes the socket from the pipe only. */
void mrx_chan_kick_write(struct mux_chan *c)
{
    int n = 0;

    if (c->fd < 0 || c->m->closing || (c->closing && !c->draining))
        return;
    if (c->prefix == NULL)
        mspl_queue_in(c);
    if (c->wr_busy)
        return;
    if (c->prefix == NULL && c->ipipe.n > 0) {
        mspl_write(c);
        return;
    }
    c->wr_prefix = c->prefix != NULL;
    if (c->wr_prefix)
        c->wiov[n++] = (struct iovec){ c->prefix, c->nprefix };
    n += mux_queue_iov(&c->q, c->wiov + n, MUX_WIOV);
    if (n == 0)
        return;
    c->wr_busy = c->wr_q = true;
    eng_send(c->m->e, &c->wr, c->fd, c->wiov, n);
}

void mrx_chan_wr_next(struct mux_chan *c, int res)
{
    struct mux *m = c->m;

    if (res < 0 || (c->closing && !c->draining)) {
        mrx_queue_free(c);
        if (c->closing) {
            c->draining = false;
            mux_chan_check(c);
        } else {
            mux_chan_end(c, MUX_R_LOCAL_ERROR, true, false);
        }
        return;
    }
    if (c->under_water && chan_held(c) <= m->cfg.in_low) {
        c->under_water = false;
        if (!c->closing && c->pause_sent)
            mtx_ready_add(c);
    }
    mrx_chan_kick_write(c);
    mspl_wait_check(m, c);
    mux_chan_check(c);
}

void mrx_chan_wr_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, wr);
    struct mux *m = c->m;
    size_t n = res > 0 ? (size_t)res : 0;

    c->wr_busy = c->wr_q = false;
    if (res >= 0 && !(c->closing && !c->draining)) {
        if (c->wr_prefix) {
            n -= c->nprefix;
            free(c->prefix);
            c->prefix = NULL;
            c->nprefix = 0;
            c->wr_prefix = false;
        }
        mux_queue_consume(&c->q, &m->pool, n);
        m->cfg.group->st.bytes_to_local += n;
        m->tally.bytes_to_local += n;
        c->last_act = now_ms(m);
    }
    mrx_chan_wr_next(c, res);
}

/* ---- the tunnel: receiving ----------------------------------------------- */

/* Incoming bytes (pipe and queue) crossed in_high: PAUSE the peer
 * (protocol >= 1). */
void mrx_chan_water(struct mux *m, struct mux_chan *c)
{
    if (m->cfg.version >= 1 && !c->under_water && chan_held(c) >= m->cfg.in_high) {
        c->under_water = true;
        if (!c->pause_sent)
            mtx_ready_add(c);
    }
}


/* A frame for an id not open: dropped, counted as late when this side
 * closed that channel recently, else as an unknown id. */
static void drop_unknown(struct mux *m, const uint8_t id[FRAME_ID_LEN])
{
    for (unsigned i = 0; i < m->late_n; i++) {
        if (memcmp(m->late[i], id, FRAME_ID_LEN) == 0) {
            m->cfg.group->st.dropped_late++;
            return;
        }
    }
    m->cfg.group->st.dropped_unknown_id++;
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
 * getting well-behaved channels of the same tunnel closed.
 * Pipes count in neither the limit nor the walk: the limit bounds this
 * process's heap (queue chunks, which only in_limit bounds per channel),
 * while a pipe's bytes sit in kernel pages, at most its capacity
 * (ENG_PIPE_SIZE) per channel and capped per user by the kernel's pipe
 * limits; and closing a channel for its pipe would not bring the queues
 * below the limit. */
static void tunnel_overflow(struct mux *m)
{
    struct mux_chan *best = NULL;

    twalk_r(m->root, biggest_walk, &best);
    if (best == NULL)
        return;
    m->cfg.group->st.tunnel_overflows++;
    mux_chan_end(best, MUX_R_QUEUE_LIMIT, true, false);
}

static void on_data(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c = chan_find(m, ev->id);

    if (c == NULL) {
        if (ev->offset == 0)
            drop_unknown(m, ev->id);
        return;
    }
    if (ev->offset == 0 && chan_held(c) >= m->cfg.in_limit) {
        mux_chan_end(c, MUX_R_QUEUE_LIMIT, true, false);
        return;
    }
    /* Back to small payloads with an empty pipe: close it, as the outgoing
     * side does (two fds per channel that no longer streams). */
    if (ev->offset == 0 && ev->size < spl_min(m, true) && c->ipipe.n == 0 && !c->spl_in)
        pipe_put(m, &c->ipipe);
    /* A PENDING channel's first frame stays contiguous for mux_chan_peek. */
    if (ev->len > 0 && mux_queue_append(&c->q, &m->pool, ev->data, ev->len,
                                        c->fd < 0 ? ev->size : 0) != 0) {
        mux_chan_end(c, MUX_R_LOCAL_ERROR, true, false);
        return;
    }
    m->cfg.group->st.bytes_queued_in += ev->len;
    if (m->cfg.tunnel_in_limit > 0 && m->pool.bytes - m->q_doomed > m->cfg.tunnel_in_limit) {
        tunnel_overflow(m);
        if (c->closing)
            return;
    }
    mrx_chan_water(m, c);
    if (c->fd >= 0)
        mrx_chan_kick_write(c);
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
        m->cfg.group->st.bad_new++;
        mtx_ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    if (m->hooks.on_new == NULL ||
        (m->cfg.max_channels > 0 && m->nchan >= m->cfg.max_channels)) {
        m->cfg.group->st.chan_closed[m->hooks.on_new == NULL ? MUX_R_REFUSED : MUX_R_LIMIT]++;
        mtx_ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    c = mux_chan_new(m, ev->id, &ev->caller);
    if (c == NULL) {
        m->cfg.group->st.chan_closed[MUX_R_LIMIT]++;
        mtx_ctl_push(m, CTL_CLOSE, ev->id);
        return;
    }
    m->hooks.on_new(m->hooks.ctx, c, &c->caller);
}

static void on_frame(struct mux *m, const struct frame_ev *ev)
{
    struct mux_chan *c;

    m->cfg.group->st.frames_in[flow_index(ev->flow)]++;
    switch (ev->flow) {
    case FRAME_NEW:
        on_new(m, ev);
        return;
    case FRAME_PING:
        if (memcmp(ev->extra, "pong", 4) != 0) {
            mtx_ctl_push(m, CTL_PONG, ev->id);
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
        mux_chan_end(c, MUX_R_PEER_CLOSE, false, true);
    } else if (ev->flow == FRAME_PAUSE) {
        c->peer_paused = true;
    } else if (ev->flow == FRAME_RESUME) {
        c->peer_paused = false;
        mtx_chan_arm_read(c);
    }
}

void mrx_release(struct mux *m)
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
    mrx_release(m);
    m->rx = p;
    m->rx_len = n;
    return 0;
}

static int dec_get(struct mux *m)
{
    if (m->dec != NULL)
        return 0;
    m->dec = spare_take(&m->cfg.group->spare_dec, sizeof(*m->dec));
    if (m->dec == NULL)
        return -1;
    frame_dec_init(m->dec, m->open, m->cfg.version, m->cfg.max_frame);
    return 0;
}

/* Everything read is decoded: give the buffer back, drop the decoder if
 * no frame is split across reads, and read again (one header only right
 * after a spliced payload, or a small payload's rest and one header, so
 * that the next large one splices too). */
static void rx_arm(struct mux *m)
{
    size_t hdr = frame_wire_len(&m->enc, FRAME_PING, 0, NULL);
    size_t len = m->rx_hdr ? hdr : read_len(m->cfg.rx_size, m->rx_big);

    if (!m->rx_hdr && m->rx_rest > 0 && m->rx_rest + hdr < len)
        len = m->rx_rest + hdr;
    mrx_release(m);
    if (m->dec != NULL && m->dec->state == m->dec_boundary && m->dec->have == 0) {
        spare_put(&m->cfg.group->spare_dec, m->dec);
        m->dec = NULL;
    }
    m->rx_hdr = false;
    m->rx_rest = 0;
    m->rd_busy = true;
    eng_recv_pick(m->e, &m->rd, m->fd, len);
    mux_park_if_quiet(m);
}

/* Decode what is in rx[off..len) and act on it; then read more. Stops
 * early (stalled) when the control queue is full, so pings cannot pile up
 * replies without bound; the flush's callback resumes it. */
void mrx_process(struct mux *m)
{
    while (!m->closing) {
        struct frame_ev ev;
        enum frame_res r;
        size_t used = 0;

        if (m->rx_off >= m->rx_len) {
            if (!mspl_start(m))
                rx_arm(m);
            return;
        }
        if (ctl_full(m)) {
            if (rx_keep(m) != 0) {
                mux_close(m, MUX_R_TUNNEL_ERROR);
                break;
            }
            m->rx_stalled = true;
            mtx_schedule_flush(m);
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
                m->cfg.group->st.frames_in[flow_index(FRAME_DATA)]++;
            on_data(m, &ev);
        } else if (ev.kind == FRAME_EV_UNKNOWN) {
            m->cfg.group->st.frames_in[flow_index(ev.flow)]++;
        } else {
            on_frame(m, &ev);
        }
    }
    mrx_release(m);
}

void mrx_cb(struct eng_op *op, int res)
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
    mrx_process(m);
}

void mrx_start_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, start_d);

    /* Not while a read (or a splice) is in flight, nor while the read
     * waits for a local writer. */
    if (!m->closing && !m->rd_busy && m->spl_wait == NULL)
        mrx_process(m);
}
