/* core/mux_splice.c - the multiplexer's incoming splice path (see
 * mux_impl.h; the outgoing one is in mux_tx.c: mtx_chan_arm_read, tx_step).
 *
 *   rx buffer runs out inside a DATA payload (rest >= spl_min(in), channel
 *   socket free, queue empty; else, with no other channel, WAIT up to
 *   MUX_SPLICE_WAIT_MS for its queue to drain) --> IN: eng_splice tunnel
 *   -> pipe (m->rd) --> OUT: eng_splice pipe -> local, OUT_TRY (c->wr)
 *   --all moved--> IN again while the payload lasts, then a header-only
 *   read; --some left--> DRAIN: eng_read pipe -> queue (c->wr), then the
 *   copy path takes over. c->spl_wr keeps every other writer off the
 *   local socket meanwhile. */

#include "core/mux_impl.h"

#include <errno.h>
#include <string.h>

#include <urcu/compiler.h>

static void spl_in_cb(struct eng_op *op, int res);
static void spl_out_cb(struct eng_op *op, int res);
static void spl_drain_cb(struct eng_op *op, int res);

/* A local write or pipe read of the splice failed: back to the copy path,
 * the channel closes, the tunnel is read again. */
static void spl_fail(struct mux *m, struct mux_chan *c)
{
    mspl_end(m);
    mux_chan_end(c, MUX_R_LOCAL_ERROR, true, false);
    mrx_process(m);
}

/* Back to the copy path: the pipe goes back (closed if it holds bytes),
 * the channel's socket is free again. */
void mspl_end(struct mux *m)
{
    struct mux_chan *c = m->spl_c;

    if (m->spl_buf != NULL)
        eng_buf_put(m->e, m->spl_buf);
    m->spl_buf = NULL;
    pipe_put(m, &m->pipe);
    m->spl_c = NULL;
    if (c != NULL) {
        c->spl_wr = false;
        mux_chan_check(c);
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

bool mspl_start(struct mux *m)
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
        mrx_release(m);
        m->spl_wait = c;
        m->spl_wait_at = now_ms(m);
        eng_timer_add(m->e, &m->tick, MUX_SPLICE_WAIT_MS);
        return true;
    }
    if (!pipe_get(m, &m->pipe))
        return false;
    /* Nothing of it was decoded: the frame is counted here. */
    if (left == m->dec->size)
        m->cfg.group->st.frames_in[flow_index(FRAME_DATA)]++;
    mrx_release(m);
    m->spl_c = c;
    c->spl_wr = true;
    spl_read(m, left);
    return true;
}

/* Reading the tunnel resumes at the end of the turn (never from inside a
 * mux_* call: decoding runs hooks). */
void mspl_wait_end(struct mux *m)
{
    m->spl_wait = NULL;
    eng_defer(m->e, &m->start_d, mrx_start_cb);
}

static void spl_in_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, rd);
    struct mux_chan *c = m->spl_c;

    m->rd_busy = false;
    m->rd.cb = mrx_cb;
    if (res > 0)
        m->pipe.n += (uint32_t)res;
    if (m->closing) {
        mspl_end(m);
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
        mspl_end(m);
        mux_close(m, res == 0 ? MUX_R_PEER_EOF : MUX_R_TUNNEL_ERROR);
        return;
    }
    frame_dec_skip(m->dec, (uint32_t)res);
    m->last_act = now_ms(m);
    if (c->closing && !c->draining) { /* nobody to write to: dropped */
        mspl_end(m);
        mrx_process(m);
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
    c->wr.cb = mrx_chan_wr_cb;
    if (res > 0) {
        m->pipe.n -= (uint32_t)res;
        m->cfg.group->st.bytes_to_local += (uint64_t)res;
        m->tally.bytes_to_local += (uint64_t)res;
        c->last_act = now_ms(m);
    }
    if (m->closing) {
        mspl_end(m);
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
    mspl_end(m);
    mrx_process(m);
}

static void spl_drain_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, wr);
    struct mux *m = c->m;
    bool keep = !c->closing || c->draining;

    c->wr_busy = false;
    c->wr.cb = mrx_chan_wr_cb;
    if (res > 0) {
        m->pipe.n -= (uint32_t)res;
        if (!m->closing && keep &&
            mux_queue_append(&c->q, &m->pool, m->spl_buf, (size_t)res, 0) != 0)
            res = -ENOMEM;
    }
    if (m->closing) {
        mspl_end(m);
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
    mspl_end(m);
    if (keep) {
        mrx_chan_water(m, c);
        mrx_chan_kick_write(c);
    }
    mrx_process(m);
}
