/* core/mux_tx.c - the multiplexer's outgoing direction (see mux_impl.h):
 * local sockets are read into DATA payloads, channels with frames to send
 * wait on the ready list, and each turn's frames go out to the tunnel as
 * one sealed batch.
 */
#include "core/mux_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <urcu/compiler.h>
#include <urcu/list.h>

/* Bytes gathered into one tunnel batch before it is sent. */
#define MUX_BATCH_BUDGET (1u << 20)

/* ---- outgoing payloads and the tx context -------------------------------- */

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
    if (m->tx == NULL) {
        m->tx = spare_take(&m->cfg.group->spare_tx, sizeof(*m->tx));
        if (m->tx == NULL)
            return NULL;
        m->tx->nchans = 0;
        m->tx->nspl = 0;
        m->tx->ctl_n = 0;
    }
    return m->tx;
}

/* Give the tx context back once nothing is in flight or waiting. */
static void tx_trim(struct mux *m)
{
    if (m->tx == NULL || m->tx_busy || m->tx->ctl_n > 0 || !cds_list_empty(&m->ready))
        return;
    spare_put(&m->cfg.group->spare_tx, m->tx);
    m->tx = NULL;
}

/* ---- outgoing scheduling ------------------------------------------------- */

static bool chan_has_frames(const struct mux_chan *c)
{
    if (c->need_new || c->out_n > c->out_tx || c->need_close)
        return true;
    return !c->closing && c->under_water != c->pause_sent;
}

void mtx_ready_add(struct mux_chan *c)
{
    if (c->on_ready || c->m->closing)
        return;
    c->on_ready = true;
    cds_list_add_tail(&c->ready, &c->m->ready);
    mtx_schedule_flush(c->m);
}

void mtx_ready_del(struct mux_chan *c)
{
    if (!c->on_ready)
        return;
    c->on_ready = false;
    cds_list_del(&c->ready);
}

/* A control frame for the next batch; lost when out of memory (a missed
 * pong or CLOSE is what a lost connection would cause too). */
void mtx_ctl_push(struct mux *m, enum ctl_kind kind, const uint8_t id[FRAME_ID_LEN])
{
    struct mux_tx *tx;

    if (m->closing || ctl_full(m) || (tx = tx_get(m)) == NULL)
        return;
    memcpy(tx->ctl[tx->ctl_n].id, id, FRAME_ID_LEN);
    tx->ctl[tx->ctl_n].kind = (uint8_t)kind;
    tx->ctl_n++;
    mtx_schedule_flush(m);
}

/* ---- local socket: read side (local -> DATA) ------------------------------ */

void mtx_chan_arm_read(struct mux_chan *c)
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

void mtx_chan_rd_cb(struct eng_op *op, int res)
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
        mtx_chan_arm_read(c);
        return;
    }
    if (c->closing) {
        if (res > 0 && !spl)
            eng_buf_put(m->e, eng_op_buf(op));
        mux_chan_check(c);
        return;
    }
    if (res > 0) {
        if (spl) {
            m->cfg.group->st.bytes_spliced_out += (uint64_t)res;
            c->rd_big = (size_t)res >= ENG_PBUF_SMALL;
            c->out[c->out_n++] = (struct mux_out){ NULL, (uint32_t)res, false };
        } else {
            c->rd_big = (size_t)res >= read_len(m->cfg.read_size, c->rd_big);
            c->out[c->out_n++] = (struct mux_out){ eng_op_buf(op), (uint32_t)res, false };
        }
        c->rd_last = (uint32_t)res;
        c->last_act = now_ms(m);
        m->cfg.group->st.bytes_from_local += (uint64_t)res;
        m->tally.bytes_from_local += (uint64_t)res;
        mtx_ready_add(c);
    } else if (res == 0) {
        mux_chan_end(c, MUX_R_LOCAL_EOF, true, true);
    } else {
        mux_chan_end(c, MUX_R_LOCAL_ERROR, true, false);
    }
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
            m->cfg.group->st.pauses_sent++;
        else
            m->cfg.group->st.resumes_sent++;
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
        mtx_chan_arm_read(c); /* read the next one while this one is written */
    } else if (c->need_close) {
        c->need_close = false;
        flow = FRAME_CLOSE;
        rc = frame_batch_close(b, c->id);
    } else {
        return 0;
    }
    m->cfg.group->st.frames_out[flow_index(flow)]++;
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
            m->cfg.group->st.frames_out[flow_index(FRAME_CLOSE)]++;
        } else {
            rc = frame_batch_ping(&tx->batch, x->id, x->kind == CTL_PONG);
            m->cfg.group->st.frames_out[flow_index(FRAME_PING)]++;
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
            mtx_ready_del(c);
            mux_chan_check(c);
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
    m->cfg.group->st.batches++;
    m->cfg.group->st.batch_frames += b->nframes;
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

void mtx_schedule_flush(struct mux *m)
{
    if (m->closing || m->tx_busy)
        return;
    eng_defer(m->e, &m->flush_d, flush_cb);
}

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

void mtx_cb(struct eng_op *op, int res)
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
            mux_chan_check(c);
        else
            mtx_chan_arm_read(c);
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
        mrx_process(m);
    }
    if (m->closing)
        return;
    if ((m->tx != NULL && m->tx->ctl_n > 0) || !cds_list_empty(&m->ready)) {
        mtx_schedule_flush(m);
    } else {
        tx_trim(m);
        mux_park_if_quiet(m);
    }
}
