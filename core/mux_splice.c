/* core/mux_splice.c - the multiplexer's incoming splice path (see
 * mux_impl.h; the outgoing one is in mux_tx.c: mtx_chan_arm_read, tx_step).
 *
 * Each channel has a pipe of its own for incoming payloads (c->ipipe,
 * taken with its first large one), and two independent ops move bytes
 * through it:
 *
 *   tunnel side (m->rd): the rx buffer runs out inside a DATA payload
 *     (rest >= spl_min(in)), its channel open, no attach prefix pending,
 *     its queue EMPTY and room in its pipe --> eng_splice tunnel -> ipipe,
 *     ENG_SPLICE_IN, at most the room --> the same payload again while
 *     there is room, else WAIT (below) or the copy path takes the rest
 *     (into the queue, after the pipe's bytes); at the payload's end a
 *     header-only read, so that the next large payload splices too. The
 *     rest of a payload under way into a pipe splices whatever its size
 *     (copying it would take a full read, and the next payload's head
 *     with it); a small payload for a channel with a pipe is read alone
 *     with the next header (m->rx_rest), for the same reason.
 *   writer side (c->wr): while ipipe holds bytes, eng_splice ipipe ->
 *     local socket, ENG_SPLICE_OUT, all it holds at a time (it waits for
 *     the socket, which holds up nobody but this channel; its return
 *     frees the room in the pipe). Copied payloads (the queue) are
 *     written into the pipe behind the spliced ones whenever it has room
 *     (mspl_queue_in: one copy, as the send it replaces), so the queue
 *     empties as soon as the pipe has room and the tunnel splices again.
 *
 * When the pipe has no room (or the queue holds bytes) and the channel
 * is the tunnel's ONLY open one, the tunnel is not read until its writer
 * frees room (WAIT: m->spl_wait, ended from the writer's callback once
 * the queue is empty and the pipe has room), at most MUX_SPLICE_WAIT_MS
 * (the tick ends it and marks the channel spl_slow: no wait again until
 * it holds nothing). A stream to one fast reader thus stays on the splice
 * path (the pipe is smaller than in_high: without the wait, about half
 * of it would be copied). With several channels the tunnel never waits:
 * a slow reader's pipe fills up, its later payloads are copied into its
 * queue, and the water marks (which count both) PAUSE the peer. */

#include "core/mux_impl.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <urcu/compiler.h>

static void spl_in_cb(struct eng_op *op, int res);
static void spl_out_cb(struct eng_op *op, int res);

/* Splice up to left bytes of the payload in progress into c's pipe. */
static void spl_read(struct mux *m, struct mux_chan *c, uint32_t left)
{
    size_t n = (size_t)c->ipipe.cap - c->ipipe.n;

    if (n > left)
        n = left;
    m->rd.cb = spl_in_cb;
    m->rd_busy = true;
    m->spl_c = c;
    c->spl_in = true;
    eng_splice(m->e, &m->rd, m->fd, c->ipipe.fd[1], n, ENG_SPLICE_IN);
}

bool mspl_start(struct mux *m)
{
    uint8_t id[FRAME_ID_LEN];
    uint32_t left;
    struct mux_chan *c;

    if (m->dec == NULL || !frame_dec_in_data(m->dec, id, &left) || left == 0)
        return false;
    c = chan_find(m, id);
    /* Its queue must be empty: the queue holds only bytes that come after
     * everything in the pipe. A pending prefix is written before both. */
    if (c == NULL || c->fd < 0 || c->closing || c->prefix != NULL)
        return false;
    /* Below the threshold, only the rest of a payload already under way
     * for a channel that holds a pipe (a splice that ran out of room):
     * copying it would take a full read, and so the next payload's head
     * too. */
    if (left < spl_min(m, true) && (left == m->dec->size || c->ipipe.fd[0] < 0)) {
        /* A small payload of a streaming channel: read it and the next
         * header only, so that the next large one splices whole. */
        if (c->ipipe.fd[0] >= 0)
            m->rx_rest = left;
        return false;
    }
    /* Taken even when this payload cannot splice (queue bytes in a send):
     * the writer's next turn moves the queue into it. */
    if (!pipe_get(m, &c->ipipe))
        return false;
    mspl_queue_in(c);
    if (c->q.bytes > 0 || c->ipipe.n >= c->ipipe.cap || c->ipipe_full) {
        /* No room. Its only reader is busy with earlier bytes: wait for
         * it (the tunnel is not read meanwhile), unless that would hold
         * up other channels, or it is known to be slow. */
        if (m->nchan > 1 || c->spl_slow)
            return false;
        mrx_release(m);
        m->spl_wait = c;
        m->spl_wait_at = now_ms(m);
        /* The tick bounds the wait: sooner, never later (waits that start
         * back to back must not keep postponing it). */
        if (!m->tick.armed || m->tick.when > m->spl_wait_at + MUX_SPLICE_WAIT_MS)
            eng_timer_add(m->e, &m->tick, MUX_SPLICE_WAIT_MS);
        mrx_chan_kick_write(c);
        return true;
    }
    mrx_release(m);
    spl_read(m, c, left);
    return true;
}

void mspl_wait_check(struct mux *m, struct mux_chan *c)
{
    if (chan_held(c) == 0)
        c->spl_slow = false; /* its reader caught up */
    if (m->spl_wait == c && c->q.bytes == 0 && c->ipipe.n < c->ipipe.cap && !c->ipipe_full)
        mspl_wait_end(m);
}

/* Reading the tunnel resumes at the end of the turn (never from inside a
 * mux_* call: decoding runs hooks). */
void mspl_wait_end(struct mux *m)
{
    m->spl_wait = NULL;
    eng_defer(m->e, &m->start_d, mrx_start_cb);
}

/* The tunnel's splice into c's pipe returned: c may be freed again, and
 * its pipe closed when nobody will write it. */
static void spl_in_done(struct mux *m, struct mux_chan *c)
{
    m->rd_busy = false;
    m->rd.cb = mrx_cb;
    m->spl_c = NULL;
    c->spl_in = false;
    if (c->closing && !c->draining && !c->wr_busy)
        pipe_put(m, &c->ipipe); /* dropped: never reused with its bytes */
}

static void spl_in_cb(struct eng_op *op, int res)
{
    struct mux *m = caa_container_of(op, struct mux, rd);
    struct mux_chan *c = m->spl_c;
    uint8_t id[FRAME_ID_LEN];
    uint32_t left;

    if (res > 0) {
        c->ipipe.n += (uint32_t)res;
        m->cfg.group->st.bytes_spliced_in += (uint64_t)res;
    }
    spl_in_done(m, c);
    if (m->closing) {
        mux_chan_check(c);
        mux_check(m);
        return;
    }
    if (res == -EAGAIN) {
        /* The pipe is out of slots (eng_splice: one per socket buffer
         * fragment, so well before its byte capacity), or bytes arrived
         * just after the splice found none. Copy this read; the pipe is
         * used again once the writer has taken bytes out of it. */
        c->ipipe_full = c->ipipe.n > 0;
        mux_chan_check(c);
        mrx_process(m);
        return;
    }
    if (res <= 0) {
        mux_chan_check(c);
        mux_close(m, res == 0 ? MUX_R_PEER_EOF : MUX_R_TUNNEL_ERROR);
        return;
    }
    /* Nothing of it was decoded before: the frame is counted here. */
    if (frame_dec_in_data(m->dec, id, &left) && left == m->dec->size)
        m->cfg.group->st.frames_in[flow_index(FRAME_DATA)]++;
    frame_dec_skip(m->dec, (uint32_t)res);
    m->last_act = now_ms(m);
    if (c->closing && !c->draining) { /* nobody to write to: dropped */
        mux_chan_check(c);
    } else {
        mrx_chan_water(m, c);
        mrx_chan_kick_write(c);
    }
    /* The payload's end: read one header only, so that the next large
     * payload starts at the end of the buffer and splices too. */
    if (!frame_dec_in_data(m->dec, id, &left))
        m->rx_hdr = true;
    mrx_process(m);
}

/* A pipe write never waits (O_NONBLOCK) and is no socket op: it is done
 * here, not through the engine. Partial is fine; a full pipe (bytes or
 * slots) leaves the rest queued for the writer's next turn. */
void mspl_queue_in(struct mux_chan *c)
{
    struct iovec iov[MUX_WIOV];
    size_t room, n = 0;
    ssize_t w;
    int cnt, i;

    if (c->q.bytes == 0 || c->wr_q || c->ipipe.fd[1] < 0 || c->ipipe.n >= c->ipipe.cap)
        return;
    room = (size_t)c->ipipe.cap - c->ipipe.n;
    cnt = mux_queue_iov(&c->q, iov, MUX_WIOV);
    for (i = 0; i < cnt && n < room; i++) {
        if (iov[i].iov_len > room - n)
            iov[i].iov_len = room - n;
        n += iov[i].iov_len;
    }
    do {
        w = writev(c->ipipe.fd[1], iov, i);
    } while (w < 0 && errno == EINTR);
    if (w <= 0)
        return;
    mux_queue_consume(&c->q, &c->m->pool, (size_t)w);
    c->ipipe.n += (uint32_t)w;
}

/* All the pipe holds, in one op. Smaller pieces would hand room back to
 * the tunnel sooner, but cost a splice and a callback each: measured on a
 * single 4 GiB stream (10 interleaved runs, endpoint -> device), 256 KiB
 * pieces cost the gateway 0.300 CPU-s/GiB against 0.274 for whole pipes
 * (1.63 vs 1.66 GiB/s), and HTTPS bulk with 4 channels was no worse
 * (8 runs: -1.8 % CPU per request). */
void mspl_write(struct mux_chan *c)
{
    c->wr.cb = spl_out_cb;
    c->wr_busy = true;
    eng_splice(c->m->e, &c->wr, c->fd, c->ipipe.fd[0], c->ipipe.n, ENG_SPLICE_OUT);
}

static void spl_out_cb(struct eng_op *op, int res)
{
    struct mux_chan *c = caa_container_of(op, struct mux_chan, wr);
    struct mux *m = c->m;

    c->wr_busy = false;
    c->wr.cb = mrx_chan_wr_cb;
    if (res > 0) {
        c->ipipe.n -= (uint32_t)res;
        c->ipipe_full = false;
        m->cfg.group->st.bytes_to_local += (uint64_t)res;
        m->tally.bytes_to_local += (uint64_t)res;
        c->last_act = now_ms(m);
    }
    mrx_chan_wr_next(c, res);
}
