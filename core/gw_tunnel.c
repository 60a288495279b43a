/* core/gw_tunnel.c - tunnels on a shard, routing of device connections,
 * the cross-shard messages that serve them, and the metrics mapping
 * (see gw.h, gw_impl.h).
 *
 * A tunnel's life on its shard:
 *
 *   gw_tunnel_start: mux_new -> list + tree by id -> hosttab_register
 *       (stale owner of the hostname closed: here, or a "replace" message
 *       to its shard) -> expiry timer at `valid`
 *   ... channels: gw_route (same shard) or on_handoff (from other shards)
 *   mux_close (peer gone, idle, expired, replaced, shutdown) -> on_dead:
 *       hosttab_remove (only names still ours) -> tree/list out -> free
 *
 * Why a pointer from the table is safe to use on the owner shard: the
 * tunnel removes its names in on_dead, on its own thread, before the mux
 * frees itself; a lookup on that thread that finds the entry therefore
 * finds a live mux. Other shards never dereference it: they post the fd
 * with the tunnel id and generation and the owner looks the name up again.
 */
#include "core/gw_impl.h"

#include <math.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- metrics ---------------------------------------------------------------- */

/* handshakes_total{result} for a token error name (token_strerror). */
static const char *token_label(const char *detail)
{
    if (!strcmp(detail, "not_utf8"))
        return "not_json";
    /* bad_base64 ... bad_padding, not_json, expired, unsupported_cipher */
    if (metrics_label_index(METRIC_HANDSHAKES, detail) !=
        metrics_label_index(METRIC_HANDSHAKES, "other"))
        return detail;
    return !strcmp(detail, "internal") ? "other" : "bad_claims";
}

void gw_metric_reject(struct gw_shard *sh, enum gw_stage st, enum gw_rej why,
                      const char *detail)
{
    struct metrics *m = sh->gw->metrics;
    enum metric_id id;
    const char *label;

    metrics_inc_reason(m, sh->idx, METRIC_DROPS, gw_rej_name(why), 1);
    switch (why) {
    case GW_REJ_HS_LIMIT:
        metrics_inc_reason(m, sh->idx, METRIC_LIMIT_REJECTS, "handshakes", 1);
        return;
    case GW_REJ_IP_LIMIT:
        metrics_inc_reason(m, sh->idx, METRIC_LIMIT_REJECTS, "connections", 1);
        return;
    case GW_REJ_STOPPING:
        return;
    default:
        break;
    }
    if (st == GW_ST_PROXY)
        id = METRIC_PROXY_REJECTS;
    else if (st == GW_ST_TOKEN || st == GW_ST_ANSWER || st == GW_ST_READY)
        id = METRIC_HANDSHAKES;
    else
        id = METRIC_SNI_REJECTS; /* classification counts as the device side */
    switch (why) {
    case GW_REJ_TIMEOUT: label = "timeout"; break;
    case GW_REJ_EOF: label = "eof"; break;
    case GW_REJ_GARBAGE: label = "not_tls"; break;
    case GW_REJ_UNKNOWN_NAME: label = "unknown_name"; break;
    case GW_REJ_CHALLENGE: label = "bad_answer"; break;
    case GW_REJ_TOKEN_TOO_LONG: label = "too_long"; break;
    case GW_REJ_GCM_REUSED: label = "gcm_key_reused"; break;
    case GW_REJ_TOKEN: label = detail != NULL ? token_label(detail) : "other"; break;
    case GW_REJ_PROXY:
    case GW_REJ_SNI: label = detail != NULL ? detail : "other"; break;
    default: label = "other"; break;
    }
    metrics_inc_reason(m, sh->idx, id, label, 1);
}

/* ---- tunnels ------------------------------------------------------------------- */

static int tunnel_cmp(const void *a, const void *b)
{
    const struct gw_tunnel *x = a, *y = b;

    return x->id < y->id ? -1 : x->id > y->id;
}

static struct gw_tunnel *tunnel_find(struct gw_shard *sh, uint64_t id)
{
    struct gw_tunnel key = { .id = id };
    void **found = tfind(&key, &sh->tunnel_tree, tunnel_cmp);

    return found != NULL ? *found : NULL;
}

static void tunnel_free(struct gw_tunnel *t)
{
    for (size_t i = 0; i < t->nnames; i++)
        free(t->names[i]);
    free(t->names);
    free(t);
}

static void on_chan_closed(void *ctx, struct mux_chan *ch, enum mux_reason why)
{
    struct gw_tunnel *t = ctx;
    struct gw_shard *sh = t->sh;

    (void)ch;
    if ((unsigned)why < MUX_R_COUNT)
        sh->ctr.chan_closed[why]++;
    sh->nchans--;
    metrics_gauge_add(sh->gw->metrics, sh->idx, METRIC_CHANNELS_OPEN, -1);
    metrics_inc_reason(sh->gw->metrics, sh->idx, METRIC_CHANNEL_CLOSES, metrics_channel_close_label(why), 1);
    gw_shard_check_drained(sh); /* a drain waits for the last channel */
}

/* Add what the shard's tunnels counted since the last fold: they share
 * one struct mux_group per shard (plain totals), the metrics take the
 * difference. */
void gw_tunnel_fold_all(struct gw_shard *sh)
{
    struct metrics *m = sh->gw->metrics;
    const struct mux_stats *st = &sh->mux_group.st;
    struct mux_stats *f = &sh->mux_folded;
    uint64_t to_dev = st->bytes_to_local - f->bytes_to_local;
    uint64_t from_dev = st->bytes_from_local - f->bytes_from_local;

    sh->ctr.bytes_to_device += to_dev;
    sh->ctr.bytes_from_device += from_dev;
    metrics_inc_label(m, sh->idx, METRIC_BYTES, METRICS_DEVICE_TO_TUNNEL, from_dev);
    metrics_inc_label(m, sh->idx, METRIC_BYTES, METRICS_TUNNEL_TO_DEVICE, to_dev);
    metrics_add_mux(m, sh->idx, st, f);
    if (st->chan_closed[MUX_R_LIMIT] != f->chan_closed[MUX_R_LIMIT]) /* a name lookup */
        metrics_inc_reason(m, sh->idx, METRIC_LIMIT_REJECTS, "channels",
                           st->chan_closed[MUX_R_LIMIT] - f->chan_closed[MUX_R_LIMIT]);
    if (st->tunnel_overflows != f->tunnel_overflows)
        metrics_inc_reason(m, sh->idx, METRIC_LIMIT_REJECTS, "tunnel_queue",
                           st->tunnel_overflows - f->tunnel_overflows);
    *f = *st;
}

/* snitun_tunnels_connected and its split by version and cipher. */
static void tunnel_gauges(struct gw_tunnel *t, int64_t d)
{
    struct gw_shard *sh = t->sh;
    struct metrics *m = sh->gw->metrics;
    int v = metrics_label_index(METRIC_TUNNELS_BY_VERSION, LOG_U64(t->version));
    int c = metrics_label_index(METRIC_TUNNELS_BY_CIPHER, tc_kind_name(t->cipher));

    metrics_gauge_add(m, sh->idx, METRIC_TUNNELS_CONNECTED, d);
    if (v >= 0)
        metrics_gauge_add_label(m, sh->idx, METRIC_TUNNELS_BY_VERSION, (unsigned)v, d);
    if (c >= 0)
        metrics_gauge_add_label(m, sh->idx, METRIC_TUNNELS_BY_CIPHER, (unsigned)c, d);
}

static void on_dead(void *ctx, struct mux *m, enum mux_reason why)
{
    struct gw_tunnel *t = ctx;
    struct gw_shard *sh = t->sh;
    const struct mux_tally *st = mux_tally(m);
    char peer[ADDR_STRLEN];
    size_t removed;

    /* Before the mux goes: from now on no lookup on this shard finds it,
     * and lookups elsewhere only carry its id to us (re-checked). */
    removed = hosttab_remove(sh->gw->tab, (const char *const *)t->names, t->nnames, t->id);
    eng_timer_del(sh->eng, &t->expiry);
    tdelete(t, &sh->tunnel_tree, tunnel_cmp);
    cds_list_del(&t->link);
    sh->ntunnels--;
    if ((unsigned)why < MUX_R_COUNT)
        sh->ctr.tunnels_closed[why]++;
    gw_tunnel_fold_all(sh); /* the metrics move with the gauges */
    tunnel_gauges(t, -1);
    metrics_inc_reason(sh->gw->metrics, sh->idx, METRIC_TUNNEL_CLOSES, metrics_tunnel_close_label(why), 1);
    log_msg(LOG_INFO, "tunnel down", "shard", LOG_U64(sh->idx), "tunnel", LOG_U64(t->id),
            "reason", mux_reason_name(why), "peer", addr_format(&t->peer, peer, sizeof(peer)),
            "host", t->names[0], "names_removed", LOG_U64(removed), "channels",
            LOG_U64(st->chan_opened), "bytes_to_device", LOG_U64(st->bytes_to_local),
            "bytes_from_device", LOG_U64(st->bytes_from_local), NULL);
    tunnel_free(t);
    gw_shard_check_drained(sh);
}

static void on_expiry(struct timer *tm)
{
    struct gw_tunnel *t = caa_container_of(tm, struct gw_tunnel, expiry);

    log_msg(LOG_INFO, "token expired, closing tunnel", "shard", LOG_U64(t->sh->idx), "tunnel",
            LOG_U64(t->id), "host", t->names[0], NULL);
    mux_close(t->mux, MUX_R_EXPIRED);
}

static void tunnel_close_id(struct gw_shard *sh, uint64_t id, uint64_t by)
{
    struct gw_tunnel *t = tunnel_find(sh, id);

    if (t == NULL)
        return; /* already gone */
    sh->ctr.tunnels_replaced++;
    log_msg(LOG_INFO, "stale tunnel replaced", "shard", LOG_U64(sh->idx), "tunnel",
            LOG_U64(id), "by", LOG_U64(by), "host", t->names[0], NULL);
    mux_close(t->mux, MUX_R_REPLACED);
}

struct gw_replace {
    struct mbox_msg msg;
    struct gw_shard *to;
    uint64_t tunnel, by;
};

static void on_replace_msg(struct mbox_msg *msg)
{
    struct gw_replace *r = caa_container_of(msg, struct gw_replace, msg);

    if (!r->to->finalizing)
        tunnel_close_id(r->to, r->tunnel, r->by);
    free(r);
}

/* The tunnel that held our hostname is stale (PROTOCOL.md 6.7): close it
 * on its own shard. */
static void close_stale(struct gw_shard *sh, const struct hosttab_ent *old, uint64_t by)
{
    struct gw *g = sh->gw;
    struct gw_replace *r;

    if (old->shard == sh->idx) {
        tunnel_close_id(sh, old->tunnel, by);
        return;
    }
    if (old->shard >= g->nshards || (r = malloc(sizeof(*r))) == NULL)
        return; /* it stays up but no longer owns the name */
    r->to = &g->shards[old->shard];
    r->tunnel = old->tunnel;
    r->by = by;
    mbox_post(&r->to->mbox, &r->msg, on_replace_msg);
}

static int tunnel_names(struct gw_tunnel *t, const struct claims *cl)
{
    t->nnames = 0;
    t->names = calloc(claims_nnames(cl), sizeof(*t->names));
    if (t->names == NULL)
        return -1;
    for (size_t i = 0; i < claims_nnames(cl); i++) {
        t->names[i] = strdup(claims_name(cl, i));
        if (t->names[i] == NULL)
            return -1;
        t->nnames++;
    }
    return 0;
}

/* Map every name to the tunnel. The previous owner of the hostname is a
 * stale peer and is closed, as the reference does; a name taken from
 * another tunnel as an alias only moves (the reference checks the
 * hostname alone), and that tunnel keeps its other names. */
static void tunnel_register(struct gw_tunnel *t)
{
    struct gw_shard *sh = t->sh;
    struct hosttab_ent ent = { .shard = sh->idx, .tunnel = t->id, .gen = t->gen, .mux = t->mux };
    struct hosttab_ent *prev = calloc(t->nnames, sizeof(*prev));
    size_t refused = 0;
    int n;

    n = prev == NULL ? -1
                     : hosttab_register(sh->gw->tab, (const char *const *)t->names, t->nnames,
                                        &ent, prev, &refused);
    if (n < 0) {
        free(prev);
        mux_close(t->mux, MUX_R_TUNNEL_ERROR); /* on_dead removes what got in */
        return;
    }
    for (size_t i = 0; i < t->nnames; i++) {
        if (prev[i].tunnel == 0 || prev[i].tunnel == t->id)
            continue;
        if (i == 0) {
            close_stale(sh, &prev[i], t->id);
        } else {
            sh->ctr.alias_takeovers++;
            log_msg(LOG_INFO, "alias taken over", "shard", LOG_U64(sh->idx), "tunnel",
                    LOG_U64(t->id), "from", LOG_U64(prev[i].tunnel), "name", t->names[i], NULL);
        }
    }
    if (refused > 0)
        log_msg(LOG_WARN, "names not registered (empty or longer than 255 bytes)", "shard",
                LOG_U64(sh->idx), "tunnel", LOG_U64(t->id), "count", LOG_U64(refused), NULL);
    free(prev);
}

static double now_real(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void tunnel_expiry_arm(struct gw_tunnel *t, double valid)
{
    double ms = ceil((valid - now_real()) * 1000.0);

    /* Close at the expiry instant (PROTOCOL.md 2.6 allows it exactly). */
    timer_init(&t->expiry, on_expiry);
    eng_timer_add(t->sh->eng, &t->expiry,
                  ms <= 0 ? 0 : ms > 1e15 ? (uint64_t)1e15 : (uint64_t)ms);
}

int gw_tunnel_start(struct gw_conn *c)
{
    struct gw_shard *sh = c->sh;
    const struct gw_cfg *cfg = sh->gw->cfg;
    struct gw_tunnel *t = calloc(1, sizeof(*t));
    struct mux_cfg mc;
    struct mux_hooks hooks = { .ctx = t, .on_chan_closed = on_chan_closed, .on_dead = on_dead };
    char peer[ADDR_STRLEN];

    if (t == NULL || tunnel_names(t, &c->claims) != 0) {
        if (t != NULL)
            tunnel_free(t);
        return -1;
    }
    t->sh = sh;
    t->id = atomic_fetch_add(&sh->gw->next_tunnel, 1);
    t->gen = atomic_fetch_add(&sh->gw->next_gen, 1);
    t->version = (unsigned)claims_version(&c->claims);
    t->cipher = c->claims.cipher;
    t->peer = c->peer;
    mux_cfg_defaults(&mc, TC_SIDE_GATEWAY, t->version);
    mc.max_frame = cfg->max_frame;
    mc.max_channels = cfg->max_channels;
    mc.tunnel_idle_ms = cfg->tunnel_idle_ms;
    mc.chan_idle_ms = cfg->chan_idle_ms;
    if (cfg->chan_queue != 0)
        mc.in_limit = cfg->chan_queue;
    mc.tunnel_in_limit = cfg->tunnel_queue;
    if (cfg->splice != 0)
        mc.splice = cfg->splice;
    mc.batch = !cfg->no_batch;
    mc.group = &sh->mux_group;
    t->mux = mux_new(sh->eng, c->fd, &mc, &hooks, c->seal, c->open, c->buf + c->off,
                     c->len - c->off);
    if (t->mux == NULL) {
        tunnel_free(t);
        return -1;
    }
    /* The mux owns the socket and both streams now. */
    c->fd = -1;
    c->seal = c->open = NULL;
    mux_set_udata(t->mux, t);
    cds_list_add_tail(&t->link, &sh->tunnels);
    sh->ntunnels++;
    timer_init(&t->expiry, on_expiry);
    sh->ctr.tunnels_opened++;
    metrics_inc(sh->gw->metrics, sh->idx, METRIC_TUNNELS_TOTAL, 1);
    metrics_inc_label(sh->gw->metrics, sh->idx, METRIC_HANDSHAKES, METRICS_HANDSHAKE_OK, 1);
    tunnel_gauges(t, 1);
    if (tsearch(t, &sh->tunnel_tree, tunnel_cmp) == NULL) {
        mux_close(t->mux, MUX_R_TUNNEL_ERROR);
        return 0;
    }
    log_msg(LOG_INFO, "tunnel up", "shard", LOG_U64(sh->idx), "tunnel", LOG_U64(t->id), "peer",
            addr_format(&t->peer, peer, sizeof(peer)), "host", t->names[0], "aliases",
            LOG_U64(t->nnames - 1), "version", LOG_U64(t->version), "cipher",
            tc_kind_name(t->cipher), "valid", LOG_PRINTF("%.0f", c->claims.valid), NULL);
    tunnel_expiry_arm(t, c->claims.valid);
    tunnel_register(t);
    return 0;
}

/* ---- routing and handoff ------------------------------------------------------ */

struct gw_handoff {
    struct mbox_msg msg;
    struct gw_shard *to;
    int fd;
    struct net_addr caller;
    uint64_t tunnel, gen;
    size_t namelen;
    char name[SNI_NAME_MAX + 1];
    size_t n;
    uint8_t bytes[];
};

/* Open a channel on a tunnel of this shard; takes fd. */
static void chan_open(struct gw_shard *sh, struct mux *m, int fd, const struct net_addr *caller,
                      const uint8_t *first, size_t n, uint64_t *ok_ctr)
{
    if (mux_chan_open(m, fd, caller, first, n) != NULL) {
        (*ok_ctr)++;
        sh->nchans++;
        gw_steer_count(sh);
        metrics_inc(sh->gw->metrics, sh->idx, METRIC_CHANNELS_OPENED, 1);
        metrics_gauge_add(sh->gw->metrics, sh->idx, METRIC_CHANNELS_OPEN, 1);
    } else {
        sh->ctr.chan_refused++; /* tunnel closing, or --max-channels */
    }
}

static void on_handoff(struct mbox_msg *msg)
{
    struct gw_handoff *h = caa_container_of(msg, struct gw_handoff, msg);
    struct gw_shard *sh = h->to;
    struct hosttab_ent e;

    if (sh->finalizing || sh->draining) {
        close(h->fd); /* never registered with this shard's engine */
        free(h);
        return;
    }
    /* Re-check: the name may have moved, or its tunnel died, in flight. */
    if (hosttab_lookup(sh->gw->tab, h->name, h->namelen, &e) && e.shard == sh->idx &&
        e.tunnel == h->tunnel && e.gen == h->gen) {
        chan_open(sh, e.mux, h->fd, &h->caller, h->bytes, h->n, &sh->ctr.handoffs_in);
    } else {
        sh->ctr.handoffs_stale++;
        log_msg(LOG_DEBUG, "handoff for a tunnel gone meanwhile", "shard", LOG_U64(sh->idx),
                "tunnel", LOG_U64(h->tunnel), NULL);
        close(h->fd);
    }
    free(h);
}

enum gw_rej gw_route(struct gw_conn *c, const char *name, size_t n)
{
    struct gw_shard *sh = c->sh;
    struct gw *g = sh->gw;
    struct hosttab_ent e;
    struct gw_handoff *h;
    int fd = c->fd;

    if (!hosttab_lookup(g->tab, name, n, &e))
        return GW_REJ_UNKNOWN_NAME;
    if (e.shard == sh->idx) {
        c->fd = -1;
        chan_open(sh, e.mux, fd, &c->caller, c->buf + c->off, c->len - c->off,
                  &sh->ctr.channels_local);
        return GW_REJ_NONE;
    }
    if (e.shard >= g->nshards || n > SNI_NAME_MAX)
        return GW_REJ_UNKNOWN_NAME;
    h = malloc(sizeof(*h) + (c->len - c->off));
    if (h == NULL)
        return GW_REJ_NOMEM;
    h->to = &g->shards[e.shard];
    h->caller = c->caller;
    h->tunnel = e.tunnel;
    h->gen = e.gen;
    h->namelen = n;
    memcpy(h->name, name, n);
    h->name[n] = '\0';
    h->n = c->len - c->off;
    memcpy(h->bytes, c->buf + c->off, h->n);
    /* A move (STYLE.md 4): the fd leaves our engine, the message owns it. */
    eng_detach(sh->eng, fd);
    c->fd = -1;
    h->fd = fd;
    sh->ctr.handoffs_out++;
    metrics_inc(g->metrics, sh->idx, METRIC_HANDOFFS, 1);
    mbox_post(&h->to->mbox, &h->msg, on_handoff);
    return GW_REJ_NONE;
}
