/* core/mux.c - one tunnel's multiplexer, see mux.h: names and defaults,
 * channel and tunnel lifetime, timers and the role-facing API. The send
 * side is in mux_tx.c, the receive side in mux_rx.c, the incoming splice
 * in mux_splice.c; mux_impl.h says what they share and holds the states
 * and invariants all of them keep.
 */
#include "core/mux_impl.h"

#include <search.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <urcu/compiler.h>
#include <urcu/list.h>

/* Largest received SIZE accepted whatever cfg.max_frame says. */
#define MUX_FRAME_CAP (256u << 20)
/* Periodic timer bounds. */
#define MUX_TICK_MIN_MS 10
#define MUX_TICK_MAX_MS 5000

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
    return flow_index(flow);
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

/* ---- channel lifetime ------------------------------------------------------ */

/* 640 bytes is a jemalloc size class (MUX_WIOV says what fits). */
_Static_assert(sizeof(struct mux_chan) <= 640, "struct mux_chan outgrew its size class");

/* Drop the payloads that no batch in flight borrows. */
static void chan_drop_out(struct mux_chan *c)
{
    while (c->out_n > c->out_tx)
        out_release(c->m, &c->out[--c->out_n]);
}

struct mux_chan *mux_chan_new(struct mux *m, const uint8_t id[FRAME_ID_LEN],
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
    pipe_init(&c->ipipe);
    c->last_act = now_ms(m);
    eng_op_init(&c->rd, mtx_chan_rd_cb);
    eng_op_init(&c->wr, mrx_chan_wr_cb);
    cds_list_add_tail(&c->all, &m->all);
    m->nchan++;
    /* The read waits only for a tunnel's only channel (mux_splice.c). */
    if (m->spl_wait != NULL)
        mspl_wait_end(m);
    m->nobj++;
    m->cfg.group->st.chan_opened++;
    m->tally.chan_opened++;
    return c;
}

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
    mrx_queue_free(c);
    pipe_put(m, &c->pipe);
    pipe_put(m, &c->ipipe);
    free(c);
    m->nobj--;
    mux_check(m);
}

/* A closing channel is freed once nothing refers to it any more. */
void mux_chan_check(struct mux_chan *c)
{
    if (!c->closing || c->fin_queued)
        return;
    if (c->draining) {
        if (chan_held(c) > 0 || c->prefix != NULL || c->wr_busy || c->spl_in) {
            mrx_chan_kick_write(c);
            return;
        }
        c->draining = false;
    }
    if (c->rd_busy || c->wr_busy || c->spl_in || c->out_n > 0 || c->need_close)
        return;
    mtx_ready_del(c);
    c->fin_queued = true;
    eng_defer(c->m->e, &c->fin, chan_fin_cb);
}

static void late_add(struct mux *m, const uint8_t id[FRAME_ID_LEN])
{
    memcpy(m->late[m->late_pos], id, FRAME_ID_LEN);
    m->late_pos = (uint8_t)((m->late_pos + 1) % MUX_LATE_IDS);
    if (m->late_n < MUX_LATE_IDS)
        m->late_n++;
}

/* The one exit path of a channel. send_close: tell the peer (not when it
 * closed first or the tunnel is gone). drain: write what the peer already
 * sent to the local socket before closing it (peer CLOSE, local EOF). */
void mux_chan_end(struct mux_chan *c, enum mux_reason why, bool send_close, bool drain)
{
    struct mux *m = c->m;

    if (c->closing)
        return;
    c->closing = true;
    c->why = why;
    if (m->spl_wait == c)
        mspl_wait_end(m);
    m->cfg.group->st.chan_closed[why]++;
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
        mrx_queue_drop(c);
    if (c->need_close)
        mtx_ready_add(c);
    mux_chan_check(c);
}

/* ---- timers ----------------------------------------------------------------- */

static void tick_chans(struct mux *m, uint64_t now)
{
    struct mux_chan *c, *tmp;

    cds_list_for_each_entry_safe(c, tmp, &m->all, all) {
        if (!c->closing && m->cfg.chan_idle_ms > 0 &&
            now - c->last_act >= m->cfg.chan_idle_ms) {
            mux_chan_end(c, MUX_R_CHAN_IDLE, true, false);
        } else if (c->draining && m->cfg.linger_ms > 0 &&
                   now - c->last_act >= m->cfg.linger_ms) {
            /* The local reader stopped reading: give up on the rest. */
            c->draining = false;
            mrx_queue_drop(c);
            mux_chan_check(c);
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
        /* That reader is slow: copy for it until it holds nothing, and
         * read the tunnel again now. */
        m->spl_wait->spl_slow = true;
        mspl_wait_end(m);
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

/* A tunnel with no channel and nothing to send gives back its cipher
 * contexts (tc_park, ~1.3 KiB of OpenSSL state for the pair): idle tunnels
 * are most tunnels, and their next PING makes them again (~1 us). A
 * tunnel with channels keeps them, so the data path never pays for it. */
void mux_park_if_quiet(struct mux *m)
{
    if (m->nobj != 0 || m->tx != NULL || m->tx_busy || m->closing)
        return;
    (void)tc_park(m->seal); /* -1 leaves the stream as it was: fine */
    (void)tc_park(m->open);
}

static void free_cb(struct eng_defer *d)
{
    struct mux *m = caa_container_of(d, struct mux, free_d);

    eng_timer_del(m->e, &m->tick);
    eng_close(m->e, m->fd);
    tc_free(m->seal);
    tc_free(m->open);
    mux_queue_pool_trim(&m->pool);
    mrx_release(m);
    if (m->dec != NULL)
        spare_put(&m->cfg.group->spare_dec, m->dec);
    if (m->tx != NULL)
        spare_put(&m->cfg.group->spare_tx, m->tx);
    if (m->own != NULL)
        mux_group_fini(m->own);
    free(m->own);
    free(m);
}

void mux_check(struct mux *m)
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
        mtx_ready_del(c);
        if (!c->closing) {
            mux_chan_end(c, MUX_R_TUNNEL_DOWN, false, false);
            continue;
        }
        c->need_close = false;
        chan_drop_out(c);
        if (c->draining) {
            c->draining = false;
            mrx_queue_drop(c);
        }
        mux_chan_check(c);
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
    m->e = e;
    m->fd = fd;
    m->hooks = *hooks;
    m->seal = seal;
    m->open = open;
    CDS_INIT_LIST_HEAD(&m->all);
    CDS_INIT_LIST_HEAD(&m->ready);
    frame_enc_init(&m->enc, seal, cfg->version,
                   &(struct tc_rng){ .draw = rnd_draw, .ctx = m->cfg.group });
    eng_op_init(&m->rd, mrx_cb);
    eng_op_init(&m->wr, mtx_cb);
    m->last_act = now_ms(m);
    m->next_ping = m->last_act + m->cfg.ping_ms;
    m->tick_ms = tick_period(&m->cfg);
    timer_init(&m->tick, tick_cb);
    eng_timer_add(e, &m->tick, m->tick_ms);
    /* Pending bytes may hold frames whose hooks must not run inside
     * mux_new(): decode them, then start reading, at the end of the turn. */
    eng_defer(e, &m->start_d, mrx_start_cb);
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
        m->cfg.group->st.chan_closed[MUX_R_LIMIT] += m->closing ? 0 : 1;
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
            c = mux_chan_new(m, id, caller);
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
        m->cfg.group->st.bytes_from_local += n;
        m->tally.bytes_from_local += n;
    }
    mtx_ready_add(c);
    mtx_chan_arm_read(c);
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
            mux_chan_end(c, MUX_R_LOCAL_ERROR, true, false);
            return;
        }
        memcpy(c->prefix, prefix, n);
        c->nprefix = n;
    }
    c->fd = fd;
    c->last_act = now_ms(m);
    mrx_chan_kick_write(c);
    mtx_chan_arm_read(c);
}

void mux_chan_close(struct mux_chan *c, enum mux_reason why)
{
    if ((unsigned)why >= MUX_R_COUNT)
        why = MUX_R_NONE;
    mux_chan_end(c, why, true, false);
}

const uint8_t *mux_chan_peek(const struct mux_chan *c, size_t *n)
{
    return mux_queue_peek(&c->q, n);
}

size_t mux_chan_queued(const struct mux_chan *c)
{
    return chan_held(c);
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
    mtx_ctl_push(m, CTL_PING, id);
    if (m->cfg.pong_ms > 0 && m->pong_deadline == 0)
        m->pong_deadline = now_ms(m) + m->cfg.pong_ms;
}

size_t mux_channels(const struct mux *m)
{
    return m->nchan;
}

const struct mux_stats *mux_stats(const struct mux *m)
{
    return &m->cfg.group->st;
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
